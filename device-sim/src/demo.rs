//! `demo`: the monitoring demo in one command. An Umbra started in this process (or the one
//! `--broker` and `--api` name), a fleet of devices that keep their shadows in sync and send
//! telemetry, and an operator changing desired state over the HTTP API at a gentle rate, until
//! Ctrl-C (or `--duration`, or `--changes` converged). Prints where to look.

use crate::fleet::{self, FleetConfig};
use crate::mqtt::{BrokerAddr, ClientSettings};
use crate::operator::{OperatorPlan, TargetOrder};
use crate::report::Summary;
use crate::units::Rate;
use crate::Error;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use umbra_broker::embedded::ListenerSettings;

/// A demo run.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The Umbra to use: `None` starts one in this process.
    pub umbra: Option<External>,
    /// The embedded Umbra's data directory (a temporary one, removed at the end, when `None`).
    pub data_dir: Option<PathBuf>,
    pub devices: usize,
    pub telemetry_interval: Option<Duration>,
    pub operator_rate: Rate,
    /// End once this many operator changes have converged.
    pub changes: Option<u64>,
    pub duration: Duration,
    pub quiet: bool,
}

/// An Umbra running elsewhere.
#[derive(Debug, Clone)]
pub struct External {
    pub broker: BrokerAddr,
    /// Its HTTP API, `http://host:port`.
    pub api: String,
}

/// Runs the demo until `shutdown`, its duration, or its changes converged; the fleet's summary.
pub async fn run(config: DemoConfig, shutdown: CancellationToken) -> Result<Summary, Error> {
    let mut temporary = None;
    let (server, external) = match config.umbra.clone() {
        Some(external) => (None, external),
        None => {
            let data_dir = match &config.data_dir {
                Some(dir) => dir.clone(),
                None => temporary.insert(tempfile::tempdir()?).path().to_path_buf(),
            };
            let server = start_umbra(data_dir).await?;
            let addrs = server.addrs();
            let mqtt = addrs
                .mqtt
                .ok_or(Error::Config("the embedded Umbra has no MQTT listener"))?;
            let external = External {
                broker: BrokerAddr::tcp(mqtt.ip().to_string(), mqtt.port()),
                api: format!("http://{}", addrs.http),
            };
            (Some(server), external)
        }
    };
    let api = &external.api;
    println!(
        "device-sim demo: {} devices, an operator changing desired state {}",
        config.devices, config.operator_rate
    );
    println!("  dashboard      {api}/");
    println!("  a device       {api}/#/thing/demo-00000");
    println!("  fleet          {api}/v1/things");
    println!("  change stream  {api}/v1/changes");
    println!("  metrics        {api}/metrics (Grafana: dashboards/umbra.json)");
    println!("  Ctrl-C stops everything");
    let fleet = FleetConfig {
        clients: vec![ClientSettings::new(external.broker.clone())],
        devices: config.devices,
        first: 0,
        prefix: "demo-".into(),
        ramp: 200.0,
        actuation_delay: Duration::from_millis(200),
        telemetry_interval: config.telemetry_interval,
        duration: config.duration,
        operator: Some(OperatorPlan {
            rate: config.operator_rate,
            client_id: "demo-operator".into(),
            http: Some(external.api.clone()),
            order: TargetOrder::Random,
            max_changes: config.changes,
        }),
        until_converged: config.changes.is_some(),
        quiet: config.quiet,
    };
    let summary = fleet::run(fleet, shutdown).await;
    if let Some(server) = server {
        server.shutdown().await;
    }
    drop(temporary);
    summary.map(|mut summary| {
        summary.command = "demo".into();
        summary
    })
}

/// Umbra on free loopback ports (MQTT, MQTT over WebSocket, HTTP) with data in `data_dir`.
async fn start_umbra(data_dir: PathBuf) -> Result<umbra_broker::Server, Error> {
    let mut config = umbra_broker::Config {
        data_dir,
        http_addr: ([127, 0, 0, 1], 0).into(),
        ..umbra_broker::Config::default()
    };
    config.mqtt.mqtt_v4 = Some(ListenerSettings::local(0));
    config.mqtt.mqtt_v5 = None;
    config.mqtt.websocket = Some(ListenerSettings::local(0));
    config.validate().map_err(|e| Error::Umbra(e.to_string()))?;
    umbra_broker::Server::start(config)
        .await
        .map_err(|e| Error::Umbra(e.to_string()))
}
