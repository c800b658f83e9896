//! MQTT plumbing shared by every mode: broker address, small-footprint client options, error
//! kinds, shadow topic names, and a clean disconnect.

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, TlsConfiguration,
    Transport,
};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// How a client reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    /// MQTT over TCP (`mqtt://`, `tcp://`).
    #[default]
    Mqtt,
    /// MQTT over TLS (`mqtts://`, `ssl://`).
    Mqtts,
    /// MQTT over WebSocket (`ws://`).
    Ws,
    /// MQTT over WebSocket over TLS (`wss://`).
    Wss,
}

impl Scheme {
    fn parse(text: &str) -> Option<Scheme> {
        Some(match text {
            "mqtt" | "tcp" => Scheme::Mqtt,
            "mqtts" | "ssl" => Scheme::Mqtts,
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Mqtt => "mqtt",
            Scheme::Mqtts => "mqtts",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Mqtt => 1883,
            Scheme::Mqtts => 8883,
            Scheme::Ws => 80,
            Scheme::Wss => 443,
        }
    }

    fn websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }
}

/// `mqtt://host:port` (also `tcp://`, or bare `host[:port]`), `mqtts://host:port`,
/// `ws://host:port/path` or `wss://host:port/path`; the port defaults to the scheme's
/// (1883, 8883, 80, 443) and a WebSocket path to `/mqtt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// The WebSocket path (unused for MQTT over TCP or TLS).
    pub path: String,
}

impl BrokerAddr {
    /// `mqtt://host:port`.
    pub fn tcp(host: impl Into<String>, port: u16) -> BrokerAddr {
        BrokerAddr {
            scheme: Scheme::Mqtt,
            host: host.into(),
            port,
            path: String::new(),
        }
    }
}

/// A broker address that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerAddrError {
    #[error("unsupported scheme (use mqtt://, mqtts://, ws:// or wss://)")]
    Scheme,
    #[error("missing host")]
    Host,
    #[error("invalid port")]
    Port,
}

impl FromStr for BrokerAddr {
    type Err = BrokerAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme, rest)) => (Scheme::parse(scheme).ok_or(BrokerAddrError::Scheme)?, rest),
            None => (Scheme::Mqtt, text),
        };
        let (rest, path) = match rest.split_once('/') {
            Some((rest, path)) if scheme.websocket() && !path.is_empty() => {
                (rest, format!("/{path}"))
            }
            Some((rest, _)) => (rest, "/mqtt".to_owned()),
            None => (rest, "/mqtt".to_owned()),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| BrokerAddrError::Port)?),
            None => (rest, scheme.default_port()),
        };
        if host.is_empty() {
            return Err(BrokerAddrError::Host);
        }
        Ok(BrokerAddr {
            scheme,
            host: host.to_owned(),
            port,
            path: if scheme.websocket() {
                path
            } else {
                String::new()
            },
        })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}:{}{}",
            self.scheme.as_str(),
            self.host,
            self.port,
            self.path
        )
    }
}

/// A CA certificate (PEM) that TLS clients trust instead of the system's roots, read once
/// and shared by every client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile(pub Arc<Vec<u8>>);

impl FromStr for CaFile {
    type Err = String;

    fn from_str(path: &str) -> Result<Self, Self::Err> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!("{path} holds no PEM certificate"));
        }
        Ok(CaFile(Arc::new(pem)))
    }
}

/// How every client of a run connects. Defaults keep a client's memory small, which is what
/// lets one process hold 10,000 devices.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub broker: BrokerAddr,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: Duration,
    /// Largest MQTT packet accepted or sent.
    pub max_packet_size: usize,
    /// Outgoing QoS 1 messages awaiting their PUBACK.
    pub inflight: u16,
    /// Capacity of the request channel between a client handle and its event loop.
    pub channel_capacity: usize,
    pub connect_timeout_s: u64,
    /// The CA that `mqtts://` and `wss://` trust (the system's roots when absent).
    pub ca: Option<CaFile>,
}

impl ClientSettings {
    pub fn new(broker: BrokerAddr) -> Self {
        ClientSettings {
            broker,
            username: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            max_packet_size: 16 * 1024,
            inflight: 10,
            channel_capacity: 16,
            connect_timeout_s: 10,
            ca: None,
        }
    }

    pub fn options(&self, client_id: &str) -> MqttOptions {
        let broker = &self.broker;
        let mut options = match broker.scheme.websocket() {
            // rumqttc takes a WebSocket broker as its URL.
            true => MqttOptions::new(client_id, broker.to_string(), broker.port),
            false => MqttOptions::new(client_id, broker.host.clone(), broker.port),
        };
        let tls = || match &self.ca {
            Some(CaFile(pem)) => TlsConfiguration::Simple {
                ca: pem.to_vec(),
                alpn: None,
                client_auth: None,
            },
            // The system's roots, loaded once for every client.
            None => {
                static SYSTEM: std::sync::OnceLock<TlsConfiguration> = std::sync::OnceLock::new();
                SYSTEM.get_or_init(TlsConfiguration::default).clone()
            }
        };
        match broker.scheme {
            Scheme::Mqtt => {}
            Scheme::Mqtts => {
                options.set_transport(Transport::tls_with_config(tls()));
            }
            Scheme::Ws => {
                options.set_transport(Transport::Ws);
            }
            Scheme::Wss => {
                options.set_transport(Transport::wss_with_config(tls()));
            }
        }
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(true)
            .set_max_packet_size(self.max_packet_size, self.max_packet_size)
            .set_inflight(self.inflight.max(1));
        if let Some(username) = &self.username {
            options.set_credentials(username.clone(), self.password.clone().unwrap_or_default());
        }
        options
    }

    /// A client handle and its event loop (not connected until the loop is polled).
    pub fn client(&self, client_id: &str) -> (AsyncClient, EventLoop) {
        let (client, mut eventloop) =
            AsyncClient::new(self.options(client_id), self.channel_capacity.max(1));
        let mut network = eventloop.network_options();
        network.set_connection_timeout(self.connect_timeout_s.max(1));
        eventloop.set_network_options(network);
        (client, eventloop)
    }
}

/// A short, fixed label for a connection failure, used as an error-tally key.
pub fn error_kind(error: &ConnectionError) -> String {
    match error {
        ConnectionError::Io(e) => format!("io {:?}", e.kind()),
        ConnectionError::ConnectionRefused(code) => format!("connack {code:?}"),
        ConnectionError::NetworkTimeout => "connect timeout".to_owned(),
        ConnectionError::FlushTimeout => "flush timeout".to_owned(),
        ConnectionError::MqttState(state) => match state {
            rumqttc::StateError::Io(e) => format!("io {:?}", e.kind()),
            rumqttc::StateError::AwaitPingResp => "ping timeout".to_owned(),
            rumqttc::StateError::Deserialization(_) => "malformed packet".to_owned(),
            _ => "mqtt state".to_owned(),
        },
        ConnectionError::NotConnAck(_) => "no connack".to_owned(),
        ConnectionError::RequestsDone => "requests done".to_owned(),
        _ => "other".to_owned(),
    }
}

/// Sends DISCONNECT and drives the event loop until it is written (or `deadline` passes), so
/// the broker sees a clean disconnect rather than a dropped socket.
pub async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop, deadline: Duration) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(deadline, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// The topics of one device's classic shadow.
#[derive(Debug, Clone)]
pub struct ShadowTopics {
    pub update: String,
    pub get: String,
    pub get_accepted: String,
    pub get_rejected: String,
    pub update_accepted: String,
    pub update_rejected: String,
    pub update_delta: String,
}

impl ShadowTopics {
    pub fn new(thing: &str) -> Self {
        let prefix = format!("$aws/things/{thing}/shadow");
        ShadowTopics {
            update: format!("{prefix}/update"),
            get: format!("{prefix}/get"),
            get_accepted: format!("{prefix}/get/accepted"),
            get_rejected: format!("{prefix}/get/rejected"),
            update_accepted: format!("{prefix}/update/accepted"),
            update_rejected: format!("{prefix}/update/rejected"),
            update_delta: format!("{prefix}/update/delta"),
        }
    }

    /// The answer topics a device subscribes to.
    pub fn answers(&self) -> [&str; 5] {
        [
            &self.get_accepted,
            &self.get_rejected,
            &self.update_accepted,
            &self.update_rejected,
            &self.update_delta,
        ]
    }
}

/// Which answer a shadow topic carries, for a topic under `$aws/things/{thing}/shadow/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowAnswer {
    GetAccepted,
    GetRejected,
    UpdateAccepted,
    UpdateRejected,
    UpdateDelta,
    Other,
}

impl ShadowAnswer {
    pub fn of(topic: &str) -> Self {
        let Some(rest) = topic
            .strip_prefix("$aws/things/")
            .and_then(|rest| rest.split_once("/shadow/"))
            .map(|(_, rest)| rest)
        else {
            return ShadowAnswer::Other;
        };
        match rest {
            "get/accepted" => ShadowAnswer::GetAccepted,
            "get/rejected" => ShadowAnswer::GetRejected,
            "update/accepted" => ShadowAnswer::UpdateAccepted,
            "update/rejected" => ShadowAnswer::UpdateRejected,
            "update/delta" => ShadowAnswer::UpdateDelta,
            _ => ShadowAnswer::Other,
        }
    }
}

/// The thing name in a `$aws/things/{thing}/shadow/...` topic.
pub fn thing_of(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("$aws/things/")
        .and_then(|rest| rest.split_once("/shadow/"))
        .map(|(thing, _)| thing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses() {
        let addr = "mqtt://127.0.0.1:18830".parse::<BrokerAddr>();
        assert_eq!(addr, Ok(BrokerAddr::tcp("127.0.0.1", 18830)));
        assert_eq!(
            addr.map(|a| a.to_string()),
            Ok("mqtt://127.0.0.1:18830".to_owned())
        );
        assert_eq!("tcp://h".parse::<BrokerAddr>().map(|a| a.port), Ok(1883));
        assert_eq!("h:1".parse::<BrokerAddr>().map(|a| a.port), Ok(1));
        let tls = "mqtts://h".parse::<BrokerAddr>();
        assert_eq!(tls.map(|a| (a.scheme, a.port)), Ok((Scheme::Mqtts, 8883)));
        // WebSocket: the path is kept (`/mqtt` when there is none).
        let ws = "ws://h:8083".parse::<BrokerAddr>().map(|a| a.to_string());
        assert_eq!(ws, Ok("ws://h:8083/mqtt".to_owned()));
        let wss = "wss://h/ws/mqtt"
            .parse::<BrokerAddr>()
            .map(|a| a.to_string());
        assert_eq!(wss, Ok("wss://h:443/ws/mqtt".to_owned()));
        assert_eq!(
            "http://h:1".parse::<BrokerAddr>(),
            Err(BrokerAddrError::Scheme)
        );
        assert_eq!(
            "mqtt://h:x".parse::<BrokerAddr>(),
            Err(BrokerAddrError::Port)
        );
        assert_eq!(
            "mqtt://:1".parse::<BrokerAddr>(),
            Err(BrokerAddrError::Host)
        );
    }

    #[test]
    fn shadow_topics_round_trip() {
        let topics = ShadowTopics::new("sim-00001");
        assert_eq!(topics.update, "$aws/things/sim-00001/shadow/update");
        assert_eq!(
            ShadowAnswer::of(&topics.update_delta),
            ShadowAnswer::UpdateDelta
        );
        assert_eq!(
            ShadowAnswer::of(&topics.get_rejected),
            ShadowAnswer::GetRejected
        );
        assert_eq!(ShadowAnswer::of(&topics.update), ShadowAnswer::Other);
        assert_eq!(ShadowAnswer::of("devices/x/telemetry"), ShadowAnswer::Other);
        assert_eq!(thing_of(&topics.update_accepted), Some("sim-00001"));
        assert_eq!(thing_of("a/b"), None);
    }
}
