//! The command line (clap derive) and its translation into each mode's configuration.

use crate::demo::{DemoConfig, External};
use crate::fleet::FleetConfig;
use crate::mqtt::{BrokerAddr, CaFile, ClientSettings};
use crate::operator::{OperatorConfig, OperatorPlan, TargetOrder};
use crate::relay::{RelayConfig, RelayMode};
use crate::shadow_bench::ShadowBenchConfig;
use crate::units::{parse_duration, Rate};
use clap::{Args, Parser, Subcommand};
use rumqttc::QoS;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "device-sim",
    version,
    about = "Simulated device fleet and MQTT load generator"
)]
pub struct Cli {
    /// Print the summary as JSON on stdout (the table then goes to stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// Write charts of the run (latency over time, errors and rejections over time, latency
    /// distribution) to this file: SVG, or PNG when it ends in .png.
    #[arg(long, global = true, value_name = "FILE.svg|FILE.png")]
    pub plot: Option<PathBuf>,
    /// No live progress line.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run N devices that keep their shadows in sync and send telemetry.
    Fleet(FleetArgs),
    /// Change desired state of random devices at a fixed rate.
    Operator(OperatorArgs),
    /// The monitoring demo: Umbra, a fleet with telemetry and an operator, until Ctrl-C.
    Demo(DemoArgs),
    /// Broker and shadow-service benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Pure broker throughput and end-to-end latency.
    Relay(RelayArgs),
    /// Durable shadow updates per second (update -> update/accepted).
    Shadow(ShadowArgs),
}

/// How to reach the broker; shared by every command.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Broker URL(s), comma separated: `mqtt://host:port`, `mqtts://host:port` (TLS),
    /// `ws://host:port/path` or `wss://host:port/path` (WebSocket). Devices are spread over
    /// them round-robin, which also spreads sockets over several destination addresses.
    #[arg(
        long,
        env = "DEVICE_SIM_BROKER",
        default_value = "mqtt://127.0.0.1:1883",
        value_delimiter = ','
    )]
    pub broker: Vec<BrokerAddr>,
    #[arg(long, env = "DEVICE_SIM_USERNAME")]
    pub username: Option<String>,
    #[arg(long, env = "DEVICE_SIM_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Largest MQTT packet sent or accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_packet_size: usize,
    /// Seconds to wait for a TCP connect + CONNACK.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
    /// MQTT keep-alive.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub keep_alive: Duration,
    /// CA certificate (PEM) that `mqtts://` and `wss://` trust instead of the system's
    /// roots (e.g. the `ca.pem` of `umbra certs ca`).
    #[arg(long, env = "DEVICE_SIM_CA_FILE")]
    pub ca_file: Option<CaFile>,
}

impl ConnectArgs {
    fn settings(&self, inflight: u16, channel_capacity: usize) -> Vec<ClientSettings> {
        self.broker
            .iter()
            .map(|broker| {
                let mut settings = ClientSettings::new(broker.clone());
                settings.username = self.username.clone();
                settings.password = self.password.clone();
                settings.max_packet_size = self.max_packet_size;
                settings.connect_timeout_s = self.connect_timeout;
                settings.keep_alive = self.keep_alive.max(Duration::from_secs(1));
                settings.inflight = inflight;
                settings.channel_capacity = channel_capacity;
                settings.ca = self.ca_file.clone();
                settings
            })
            .collect()
    }

    fn first(&self, inflight: u16, channel_capacity: usize) -> ClientSettings {
        let mut all = self.settings(inflight, channel_capacity);
        if all.is_empty() {
            ClientSettings::new(BrokerAddr::tcp("127.0.0.1", 1883))
        } else {
            all.swap_remove(0)
        }
    }
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Run time after which devices disconnect and the summary is printed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Thing-name prefix; device i is `{prefix}{i:05}` (also its MQTT client id).
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// Index of the first device (to split one fleet over several processes).
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 500.0)]
    pub ramp: f64,
    /// Time a device takes to apply a desired change before reporting it.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub actuation_delay: Duration,
    /// Telemetry period per device (`0s` turns telemetry off).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub telemetry_interval: Duration,
    /// Also run an operator in this process changing desired state at this rate, measuring
    /// desired -> delta received and desired -> reported accepted latency.
    #[arg(long)]
    pub operator_rate: Option<Rate>,
    /// Client id of the in-process operator.
    #[arg(long, default_value = "umbra-operator")]
    pub operator_client_id: String,
    /// Send the in-process operator's changes over HTTP to this base URL instead of MQTT.
    #[arg(long)]
    pub operator_http: Option<String>,
    /// Which device each of the in-process operator's changes goes to.
    #[arg(long, value_enum, default_value = "random")]
    pub operator_order: TargetOrder,
    /// The in-process operator stops after this many changes.
    #[arg(long)]
    pub operator_changes: Option<u64>,
    /// End as soon as the operator's changes (`--operator-changes`) have all converged;
    /// `--duration` is then an upper bound.
    #[arg(long, requires = "operator_changes")]
    pub until_converged: bool,
}

#[derive(Debug, Args)]
pub struct OperatorArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Desired-state changes per second.
    #[arg(long, default_value = "100/s")]
    pub rate: Rate,
    /// Number of devices to choose from.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    /// Operator's MQTT client id (privileged on Umbra).
    #[arg(long, default_value = "umbra-operator")]
    pub client_id: String,
    /// Send changes as `POST {http}/things/{thing}/shadow` instead of over MQTT.
    #[arg(long)]
    pub http: Option<String>,
    /// Which device each change goes to (`sweep`: every device in turn).
    #[arg(long, value_enum, default_value = "random")]
    pub order: TargetOrder,
    /// Stop after this many changes.
    #[arg(long)]
    pub changes: Option<u64>,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QosArg {
    #[value(name = "0")]
    Zero,
    #[value(name = "1")]
    One,
    #[value(name = "2")]
    Two,
}

impl From<QosArg> for QoS {
    fn from(q: QosArg) -> Self {
        match q {
            QosArg::Zero => QoS::AtMostOnce,
            QosArg::One => QoS::AtLeastOnce,
            QosArg::Two => QoS::ExactlyOnce,
        }
    }
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    #[arg(long, default_value_t = 1)]
    pub subscribers: usize,
    #[arg(long, value_enum, default_value = "p2p")]
    pub mode: RelayMode,
    #[arg(long, value_enum, default_value = "1")]
    pub qos: QosArg,
    /// Payload size in bytes (at least 16: send time, publisher, sequence).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Messages per second per publisher, or `max` (as fast as flow control allows).
    #[arg(long, default_value = "max")]
    pub rate: Rate,
    /// Unacknowledged QoS 1 messages per publisher.
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// How long to wait for in-flight messages after publishing stops.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Clients connecting at the same time.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
}

#[derive(Debug, Args)]
pub struct ShadowArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Shadow updates in flight per device (Umbra rejects more than 10 with 429).
    #[arg(long, default_value_t = 1)]
    pub inflight: usize,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 500.0)]
    pub ramp: f64,
    /// How long to wait for answers still owed after the window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Also subscribe to `update/delta` and `update/documents`, not only to the answers the
    /// benchmark reads (`update/accepted|rejected`).
    #[arg(long)]
    pub all_answers: bool,
    /// Pause after each accepted update (e.g. `1s` for one update per second per device).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Also run one device (`{prefix}flood`) flooding its shadow with QoS 0 updates, and
    /// measure what that costs the others.
    #[arg(long)]
    pub flood: bool,
}

impl FleetArgs {
    pub fn config(&self, quiet: bool) -> FleetConfig {
        FleetConfig {
            clients: self.connect.settings(5, 16),
            devices: self.devices,
            first: self.first,
            prefix: self.prefix.clone(),
            ramp: self.ramp,
            actuation_delay: self.actuation_delay,
            telemetry_interval: (!self.telemetry_interval.is_zero())
                .then_some(self.telemetry_interval),
            duration: self.duration,
            operator: self.operator_rate.map(|rate| OperatorPlan {
                rate,
                client_id: self.operator_client_id.clone(),
                http: self.operator_http.clone(),
                order: self.operator_order,
                max_changes: self.operator_changes,
            }),
            until_converged: self.until_converged,
            quiet,
        }
    }
}

impl OperatorArgs {
    pub fn config(&self, quiet: bool) -> OperatorConfig {
        OperatorConfig {
            // Subscriptions to every target's answers go out in batches through this client.
            client: self.connect.first(100, 64),
            devices: self.devices,
            first: self.first,
            prefix: self.prefix.clone(),
            plan: OperatorPlan {
                rate: self.rate,
                client_id: self.client_id.clone(),
                http: self.http.clone(),
                order: self.order,
                max_changes: self.changes,
            },
            duration: self.duration,
            quiet,
        }
    }
}

impl RelayArgs {
    pub fn config(&self, quiet: bool) -> RelayConfig {
        // A publisher's channel holds a few messages only: a message's latency clock starts
        // when it enters the channel, so a deep channel would be measured as broker latency.
        let mut client = self.connect.first(self.inflight, 8);
        client.max_packet_size = client.max_packet_size.max(self.payload + 1024);
        RelayConfig {
            client,
            publishers: self.publishers,
            subscribers: self.subscribers,
            mode: self.mode,
            qos: self.qos.into(),
            payload: self.payload,
            duration: self.duration,
            rate: self.rate,
            drain_timeout: self.drain_timeout,
            connect_concurrency: self.connect_concurrency,
            quiet,
        }
    }
}

impl ShadowArgs {
    pub fn config(&self, quiet: bool) -> ShadowBenchConfig {
        ShadowBenchConfig {
            client: self
                .connect
                .first(self.inflight.clamp(1, 100) as u16 + 2, 16),
            devices: self.devices,
            first: self.first,
            prefix: self.prefix.clone(),
            duration: self.duration,
            inflight: self.inflight.max(1),
            ramp: self.ramp,
            drain_timeout: self.drain_timeout,
            all_answers: self.all_answers,
            interval: self.interval,
            flood: self.flood,
            quiet,
        }
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Devices in the fleet.
    #[arg(long, default_value_t = 300)]
    pub devices: usize,
    /// Desired-state changes per second by the operator (over the HTTP API).
    #[arg(long, default_value = "2/s")]
    pub operator_rate: Rate,
    /// Telemetry from each device (`0s`: none).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub telemetry_interval: Duration,
    /// Use the Umbra at this MQTT URL instead of starting one (needs `--api` too).
    #[arg(long, requires = "api")]
    pub broker: Option<BrokerAddr>,
    /// That Umbra's HTTP API (`http://host:port`; needs `--broker` too).
    #[arg(long, requires = "broker")]
    pub api: Option<String>,
    /// The started Umbra's data directory (a temporary one, removed at the end, by default).
    #[arg(long, conflicts_with = "broker")]
    pub data_dir: Option<PathBuf>,
    /// End once this many operator changes have converged (until Ctrl-C by default).
    #[arg(long)]
    pub changes: Option<u64>,
    /// End after this long (until Ctrl-C by default).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

impl DemoArgs {
    pub fn config(&self, quiet: bool) -> DemoConfig {
        DemoConfig {
            umbra: self
                .broker
                .clone()
                .zip(self.api.clone())
                .map(|(broker, api)| External { broker, api }),
            data_dir: self.data_dir.clone(),
            devices: self.devices,
            telemetry_interval: (!self.telemetry_interval.is_zero())
                .then_some(self.telemetry_interval),
            operator_rate: self.operator_rate,
            changes: self.changes,
            // "Until Ctrl-C": a year.
            duration: self
                .duration
                .unwrap_or(Duration::from_secs(365 * 24 * 3600)),
            quiet,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        match Cli::try_parse_from(args) {
            Ok(cli) => cli,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn fleet_arguments() {
        let cli = parse(&[
            "device-sim",
            "fleet",
            "--devices",
            "10000",
            "--duration",
            "60s",
            "--broker",
            "mqtt://127.0.0.1:1884,mqtt://127.0.0.2:1884",
            "--ramp",
            "500",
            "--actuation-delay",
            "50ms",
            "--operator-rate",
            "100/s",
            "--json",
        ]);
        assert!(cli.json);
        let Command::Fleet(fleet) = cli.command else {
            panic!("not fleet")
        };
        let config = fleet.config(true);
        assert_eq!(config.devices, 10_000);
        assert_eq!(config.duration, Duration::from_secs(60));
        assert_eq!(config.actuation_delay, Duration::from_millis(50));
        assert_eq!(config.clients.len(), 2);
        assert_eq!(config.clients[1].broker.host, "127.0.0.2");
        assert_eq!(
            config.operator.map(|o| o.rate),
            Some(Rate::PerSecond(100.0))
        );
        assert_eq!(config.telemetry_interval, Some(Duration::from_secs(1)));
    }

    #[test]
    fn relay_arguments() {
        let cli = parse(&[
            "device-sim",
            "bench",
            "relay",
            "--publishers",
            "5",
            "--subscribers",
            "5",
            "--mode",
            "fan-in",
            "--qos",
            "0",
            "--payload",
            "128",
            "--duration",
            "2s",
            "--rate",
            "50/s",
        ]);
        let Command::Bench(BenchCommand::Relay(relay)) = cli.command else {
            panic!("not relay")
        };
        let config = relay.config(false);
        assert_eq!(config.mode, RelayMode::FanIn);
        assert_eq!(config.qos, QoS::AtMostOnce);
        assert_eq!(config.rate, Rate::PerSecond(50.0));
        assert_eq!(config.duration, Duration::from_secs(2));
        assert!(config.client.max_packet_size >= 128);
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(Cli::try_parse_from(["device-sim", "fleet", "--duration", "soon"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "operator", "--rate", "0/s"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "bench", "relay", "--qos", "3"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "fleet", "--broker", "http://x"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "fleet", "--ca-file", "/no/such.pem"]).is_err());
    }

    #[test]
    fn demo_takes_an_umbra_as_both_its_addresses_or_none() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["device-sim", "demo"], args].concat());
        assert!(parse(&["--broker", "mqtt://h:1883"]).is_err());
        assert!(parse(&["--api", "http://h:8080"]).is_err());
        assert!(parse(&[
            "--broker",
            "mqtt://h:1883",
            "--api",
            "http://h:8080",
            "--data-dir",
            "d"
        ])
        .is_err());
        let Ok(Cli {
            command: Command::Demo(demo),
            ..
        }) = parse(&["--broker", "mqtt://h:1883", "--api", "http://h:8080"])
        else {
            panic!("demo with both addresses parses");
        };
        let config = demo.config(true);
        assert_eq!(
            config.umbra.map(|u| u.api),
            Some("http://h:8080".to_string())
        );
        assert_eq!(config.devices, 300);
        let Ok(Cli {
            command: Command::Demo(demo),
            ..
        }) = parse(&[])
        else {
            panic!("demo parses");
        };
        assert!(demo.config(true).umbra.is_none());
    }
}
