//! MQTT plumbing shared by every mode: broker address, small-footprint client options, error
//! kinds, shadow topic names, and a clean disconnect.

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// `mqtt://host:port` (also `tcp://`, or bare `host[:port]`; port defaults to 1883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

/// A broker address that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerAddrError {
    #[error("unsupported scheme (use mqtt:// or tcp://)")]
    Scheme,
    #[error("missing host")]
    Host,
    #[error("invalid port")]
    Port,
}

impl FromStr for BrokerAddr {
    type Err = BrokerAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = match text.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some(_) => return Err(BrokerAddrError::Scheme),
            None => text,
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| BrokerAddrError::Port)?),
            None => (rest, 1883),
        };
        if host.is_empty() {
            return Err(BrokerAddrError::Host);
        }
        Ok(BrokerAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mqtt://{}:{}", self.host, self.port)
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
        }
    }

    pub fn options(&self, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.broker.host.clone(), self.broker.port);
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
        let addr: BrokerAddr = "mqtt://127.0.0.1:18830"
            .parse()
            .unwrap_or_else(|_| BrokerAddr {
                host: String::new(),
                port: 0,
            });
        assert_eq!(
            addr,
            BrokerAddr {
                host: "127.0.0.1".into(),
                port: 18830
            }
        );
        assert_eq!(addr.to_string(), "mqtt://127.0.0.1:18830");
        assert_eq!("tcp://h".parse::<BrokerAddr>().map(|a| a.port), Ok(1883));
        assert_eq!("h:1".parse::<BrokerAddr>().map(|a| a.port), Ok(1));
        assert_eq!(
            "ws://h:1".parse::<BrokerAddr>(),
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
