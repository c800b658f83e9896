//! Attach mode: the shadow service as an MQTT 5 client of a broker that is
//! already there (Mosquitto, EMQX, HiveMQ, VerneMQ), instead of the
//! embedded broker.
//!
//! - Requests come through a shared subscription to the request topics only
//!   (`$share/<group>/$aws/things/+/shadow/+` and the named shadows'), at
//!   QoS 1, in a persistent session. Several nodes in one group share them.
//! - A request is acknowledged to the broker only once it is committed (or
//!   refused), in the order the requests came. A node that dies before that
//!   leaves the request with the broker, which delivers it again: at least
//!   once, never lost once the broker took it.
//! - Answers and deltas are published at QoS 1, in commit order.
//! - The connection is kept: after a drop the client reconnects with
//!   backoff and resumes its session.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, Packet, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use umbra_shadow::topic::parse_request_topic;
use umbra_shadow::{Message, Pending, Request, ShadowService};

/// How Umbra attaches to the broker that `[mqtt] attach` names.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttachClient {
    /// The session's client id: its own on every node, and the same after
    /// a restart (the broker keeps the session's requests meanwhile).
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The shared subscription's group: nodes in one group share requests.
    pub share_group: String,
    /// Where the broker has the request topics: `$aws/things/` itself, or
    /// where a broker that cannot share `$`-topics remaps them to (Mosquitto
    /// 2.0: see the README's "Attach mode").
    pub request_prefix: String,
    /// How long the broker keeps the session (and the requests it holds
    /// for this node) while the node is away. Short: Mosquitto goes on
    /// handing a share of new requests to an absent node's session until it
    /// expires (see the README's "Attach mode").
    pub session_expiry_secs: u32,
    /// Requests the broker may hand this node before it answers them.
    pub receive_maximum: u16,
    pub keep_alive_secs: u64,
    /// Lets an `mqtt://` URL name another machine, to which Umbra then
    /// connects without TLS (only on a network you trust).
    pub allow_plaintext: bool,
    /// `mqtts://`: the CA certificates (PEM) that the broker's certificate
    /// must chain to; `/etc/ssl/certs/ca-certificates.crt` for a broker
    /// with a public certificate.
    pub ca_file: Option<PathBuf>,
    /// `mqtts://`: a client certificate and its key (PEM), for a broker
    /// that wants one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for AttachClient {
    fn default() -> AttachClient {
        AttachClient {
            client_id: "umbra".into(),
            username: None,
            password: None,
            share_group: "umbra".into(),
            request_prefix: AWS_PREFIX.into(),
            session_expiry_secs: 60,
            receive_maximum: 256,
            keep_alive_secs: 30,
            allow_plaintext: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// Where to attach: `mqtt://host:port` or `mqtts://host:port`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl AttachClient {
    /// Checks `url` and these settings; the broker's address.
    pub fn check(&self, url: &str) -> Result<BrokerAddress, String> {
        let parsed = url::Url::parse(url).map_err(|err| format!("{url}: {err}"))?;
        let tls = match parsed.scheme() {
            "mqtt" => false,
            "mqtts" => true,
            _ => return Err(format!("{url}: the scheme must be mqtt:// or mqtts://")),
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{url}: no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(
                "put the broker's user name and password in [mqtt.attach_client], not in the URL"
                    .into(),
            );
        }
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !tls && !loopback && !self.allow_plaintext {
            return Err(format!(
                "{host} is not this machine: use mqtts:// (with attach_client.ca_file), \
                 or set [mqtt.attach_client] allow_plaintext = true on a network you trust"
            ));
        }
        if tls && self.ca_file.is_none() {
            return Err(
                "mqtts:// needs attach_client.ca_file: the CA certificates the \
                 broker's certificate chains to (/etc/ssl/certs/ca-certificates.crt for a \
                 public one)"
                    .into(),
            );
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("attach_client.cert_file and key_file go together".into());
        }
        for file in [&self.ca_file, &self.cert_file, &self.key_file]
            .into_iter()
            .flatten()
        {
            if !file.is_file() {
                return Err(format!("{} does not exist", file.display()));
            }
        }
        if self.client_id.is_empty() {
            return Err("attach_client.client_id must not be empty".into());
        }
        let group = &self.share_group;
        if group.is_empty() || group.contains(['/', '+', '#']) {
            return Err(format!(
                "attach_client.share_group {group:?} must be a non-empty topic level"
            ));
        }
        let prefix = &self.request_prefix;
        if !prefix.ends_with('/') || prefix.contains(['+', '#']) || prefix.starts_with("$share/") {
            return Err(format!(
                "attach_client.request_prefix {prefix:?} must end with / and hold no wildcard"
            ));
        }
        if self.receive_maximum == 0 {
            return Err("attach_client.receive_maximum must be at least 1".into());
        }
        Ok(BrokerAddress {
            host,
            port: parsed.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
        })
    }
}

/// Where AWS's shadow topics live.
const AWS_PREFIX: &str = "$aws/things/";

/// The shared subscriptions that take the request topics of classic and
/// named shadows (and not their answers, one level further down), under
/// `prefix`.
pub fn request_filters(group: &str, prefix: &str) -> [String; 2] {
    [
        format!("$share/{group}/{prefix}+/shadow/+"),
        format!("$share/{group}/{prefix}+/shadow/name/+/+"),
    ]
}

/// The shadow topic a request came on, under `$aws/things/` whatever
/// prefix the broker had it under.
fn request_topic(topic: &[u8], prefix: &str) -> Option<String> {
    let rest = std::str::from_utf8(topic).ok()?.strip_prefix(prefix)?;
    Some(format!("{AWS_PREFIX}{rest}"))
}

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Client requests (publishes, acks) that may wait for the connection.
const REQUEST_CHANNEL: usize = 4096;

/// A running attachment.
pub struct Attachment {
    client: AsyncClient,
    filters: [String; 2],
    events: JoinHandle<()>,
    acker: JoinHandle<()>,
    forwarder: JoinHandle<()>,
    /// Marks the end of what the acker has to acknowledge.
    acks: mpsc::UnboundedSender<Taken>,
    stop_forwarding: CancellationToken,
    stop_events: CancellationToken,
    subscribed: watch::Receiver<bool>,
}

/// A request taken from the broker, acknowledged once `pending` answers.
#[allow(clippy::large_enum_variant)] // moved once per request; the marker is rare
enum Taken {
    Request {
        /// The connection it came on; an ack is only sent on that one.
        connection: u64,
        publish: Publish,
        pending: Option<Pending>,
    },
    /// Everything before this was acknowledged.
    Drained(oneshot::Sender<()>),
}

/// Connects to the broker (in the background; it keeps reconnecting) and
/// serves the shadow requests it hands over. `answers` is the service's
/// outbox: every message the service publishes, in commit order.
pub fn start(
    address: &BrokerAddress,
    settings: &AttachClient,
    service: Arc<ShadowService>,
    answers: mpsc::Receiver<Message>,
) -> Result<Attachment, String> {
    let mut options = MqttOptions::new(&settings.client_id, &address.host, address.port);
    if address.tls {
        options.set_transport(Transport::tls_with_config(tls_configuration(settings)?));
    }
    options
        .set_clean_start(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(settings.keep_alive_secs.max(5)))
        .set_request_channel_capacity(REQUEST_CHANNEL)
        .set_connect_properties(ConnectProperties {
            session_expiry_interval: Some(settings.session_expiry_secs),
            receive_maximum: Some(settings.receive_maximum),
            ..ConnectProperties::new()
        });
    if let Some(user) = &settings.username {
        options.set_credentials(user, settings.password.clone().unwrap_or_default());
    }
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
    let connection = Arc::new(AtomicU64::new(0));
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let filters = request_filters(&settings.share_group, &settings.request_prefix);
    let stop_events = CancellationToken::new();
    let stop_forwarding = CancellationToken::new();
    let (subscribed_tx, subscribed) = watch::channel(false);
    let events = tokio::spawn(
        Events {
            client: client.clone(),
            service,
            filters: filters.clone(),
            taken: acks_tx.clone(),
            connection: Arc::clone(&connection),
            broker: format!("{}:{}", address.host, address.port),
            prefix: settings.request_prefix.clone(),
            subscribed: subscribed_tx,
        }
        .run(eventloop, stop_events.clone()),
    );
    let acker = tokio::spawn(acknowledge(acks_rx, client.clone(), connection));
    let forwarder = tokio::spawn(forward(answers, client.clone(), stop_forwarding.clone()));
    Ok(Attachment {
        client,
        filters,
        events,
        acker,
        forwarder,
        acks: acks_tx,
        stop_forwarding,
        stop_events,
        subscribed,
    })
}

/// The CA to verify the broker with and, if set, the client certificate.
fn tls_configuration(settings: &AttachClient) -> Result<TlsConfiguration, String> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    let ca = match &settings.ca_file {
        Some(path) => read(path)?,
        None => return Err("mqtts:// needs attach_client.ca_file".into()),
    };
    let client_auth = match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    Ok(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    })
}

impl Attachment {
    /// Whether the broker has granted the request subscriptions on the
    /// current connection (`/readyz` waits for it).
    pub fn subscribed(&self) -> watch::Receiver<bool> {
        self.subscribed.clone()
    }

    /// Asks the broker to send further requests to the other nodes of the
    /// group (requests already on their way are still served).
    pub fn stop_taking(&self) {
        for filter in &self.filters {
            if let Err(err) = self.client.try_unsubscribe(filter) {
                warn!(cause = %err, "could not unsubscribe from the shadow requests");
            }
        }
    }

    /// After the service has closed: acknowledges what it answered,
    /// publishes the answers left, and disconnects, within `grace`. A
    /// broker that is gone by then keeps what was not acknowledged and
    /// delivers it again when this session returns.
    pub async fn shutdown(mut self, grace: Duration) {
        let flushed = tokio::time::timeout(grace, async {
            let (drained_tx, drained_rx) = oneshot::channel();
            if self.acks.send(Taken::Drained(drained_tx)).is_ok() {
                let _ = drained_rx.await;
            }
            self.stop_forwarding.cancel();
            umbra_shadow::tasks::joined("answer forwarder", (&mut self.forwarder).await);
            // The disconnect goes out after the acks and answers queued before it.
            if let Err(err) = self.client.disconnect().await {
                debug!(cause = %err, "broker connection already gone");
                self.stop_events.cancel();
            }
            umbra_shadow::tasks::joined("broker connection", (&mut self.events).await);
        })
        .await;
        if flushed.is_err() {
            warn!(
                ?grace,
                "the broker did not take the last acknowledgements and answers in time; \
                 it delivers the unacknowledged requests again"
            );
            self.stop_events.cancel();
            self.forwarder.abort();
            let _ = (&mut self.events).await;
        }
        self.acker.abort();
    }
}

/// The connection's event loop: takes requests, (re)subscribes on every
/// connect, reconnects with backoff.
struct Events {
    client: AsyncClient,
    service: Arc<ShadowService>,
    filters: [String; 2],
    taken: mpsc::UnboundedSender<Taken>,
    connection: Arc<AtomicU64>,
    broker: String,
    prefix: String,
    subscribed: watch::Sender<bool>,
}

impl Events {
    async fn run(self, mut eventloop: EventLoop, stop: CancellationToken) {
        let mut backoff = MIN_BACKOFF;
        // SUBACKs that granted a request filter on this connection.
        let mut granted = 0;
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                () = stop.cancelled() => return,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = MIN_BACKOFF;
                    granted = 0;
                    let connection = self.connection.fetch_add(1, Ordering::SeqCst) + 1;
                    info!(
                        broker = %self.broker,
                        session_present = ack.session_present,
                        connection,
                        "attached to the broker"
                    );
                    // Every time: subscribing again is harmless, and a
                    // session that unsubscribed at shutdown needs it.
                    for filter in &self.filters {
                        if let Err(err) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
                            error!(cause = %err, "could not subscribe to the shadow requests");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack.return_codes.iter().any(|code| {
                        !matches!(
                            code,
                            SubscribeReasonCode::Success(QoS::AtLeastOnce | QoS::ExactlyOnce)
                        )
                    });
                    if refused {
                        error!(codes = ?ack.return_codes, "the broker refused (or downgraded) the shadow request subscription; requests are not served");
                    }
                    // One SUBACK per filter (each subscribe asks for one).
                    granted += usize::from(!refused);
                    self.subscribed.send_replace(granted >= self.filters.len());
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => self.take(publish),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(err) => {
                    self.subscribed.send_replace(false);
                    warn!(broker = %self.broker, cause = %err, retry_in = ?backoff, "lost the broker");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Submits a request in arrival order and queues its acknowledgement.
    fn take(&self, publish: Publish) {
        let topic = request_topic(&publish.topic, &self.prefix);
        let pending = match topic.as_deref().map(parse_request_topic) {
            Some(Ok(topic)) => {
                let user_properties = publish
                    .properties
                    .as_ref()
                    .filter(|p| !p.user_properties.is_empty())
                    .map(|p| p.user_properties.clone().into());
                Some(self.service.submit(Request {
                    key: topic.key,
                    op: topic.op,
                    payload: publish.payload.clone(),
                    client: "attached".into(),
                    user_properties,
                }))
            }
            // Not a request (the filters let `.../shadow/name` through, say):
            // acknowledged and dropped.
            _ => {
                debug!(topic = ?publish.topic, "not a shadow request topic");
                None
            }
        };
        let connection = self.connection.load(Ordering::SeqCst);
        let _ = self.taken.send(Taken::Request {
            connection,
            publish,
            pending,
        });
    }
}

/// Acknowledges requests in the order they came, each once answered; a
/// request that came on an earlier connection is left to the broker's
/// redelivery.
async fn acknowledge(
    mut taken: mpsc::UnboundedReceiver<Taken>,
    client: AsyncClient,
    current: Arc<AtomicU64>,
) {
    while let Some(taken) = taken.recv().await {
        match taken {
            Taken::Request {
                connection,
                publish,
                pending,
            } => {
                if let Some(pending) = pending {
                    pending.answer().await;
                }
                if connection == current.load(Ordering::SeqCst) {
                    if let Err(err) = client.ack(&publish).await {
                        debug!(cause = %err, "request not acknowledged; the broker sends it again");
                    }
                }
            }
            Taken::Drained(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Publishes the service's messages at QoS 1, in order; once stopped,
/// publishes what is left and ends.
async fn forward(
    mut answers: mpsc::Receiver<Message>,
    client: AsyncClient,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            message = answers.recv() => message,
            () = stop.cancelled() => break,
        };
        let Some(message) = message else { return };
        publish(&client, message).await;
    }
    while let Ok(message) = answers.try_recv() {
        publish(&client, message).await;
    }
}

async fn publish(client: &AsyncClient, message: Message) {
    let properties = PublishProperties {
        user_properties: message
            .user_properties
            .map(|p| p.to_vec())
            .unwrap_or_default(),
        ..PublishProperties::default()
    };
    let sent = client
        .publish_with_properties(
            message.topic,
            QoS::AtLeastOnce,
            false,
            message.payload,
            properties,
        )
        .await;
    if let Err(err) = sent {
        warn!(cause = %err, "answer not published: the connection is closing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_local_broker_is_reached_without_tls_unless_allowed() {
        let settings = AttachClient::default();
        assert_eq!(
            settings.check("mqtt://127.0.0.1:1884"),
            Ok(BrokerAddress {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false,
            })
        );
        assert_eq!(settings.check("mqtt://localhost").map(|a| a.port), Ok(1883));
        assert!(settings.check("mqtt://[::1]:1883").is_ok());
        let refused = settings
            .check("mqtt://broker.example.com")
            .expect_err("remote");
        assert!(refused.contains("allow_plaintext"), "{refused}");
        let allowed = AttachClient {
            allow_plaintext: true,
            ..AttachClient::default()
        };
        assert!(allowed.check("mqtt://broker.example.com").is_ok());
        // mqtts:// reaches anywhere, verified against a CA file.
        let refused = settings
            .check("mqtts://broker.example.com")
            .expect_err("no CA");
        assert!(refused.contains("ca_file"), "{refused}");
        let ca = tempfile::NamedTempFile::new().expect("file");
        let tls = AttachClient {
            ca_file: Some(ca.path().to_path_buf()),
            ..AttachClient::default()
        };
        let address = tls.check("mqtts://broker.example.com").expect("tls");
        assert_eq!((address.port, address.tls), (8883, true));
        let half = AttachClient {
            cert_file: Some(ca.path().to_path_buf()),
            ..tls.clone()
        };
        assert!(half.check("mqtts://broker.example.com").is_err());
        assert!(settings.check("ws://127.0.0.1").is_err());
        assert!(settings.check("mqtt://u:p@127.0.0.1").is_err());
        let bad_group = AttachClient {
            share_group: "a/b".into(),
            ..AttachClient::default()
        };
        assert!(bad_group.check("mqtt://127.0.0.1").is_err());
    }

    #[test]
    fn the_filters_take_requests_and_not_answers() {
        let [classic, named] = request_filters("g", AWS_PREFIX);
        assert_eq!(classic, "$share/g/$aws/things/+/shadow/+");
        assert_eq!(named, "$share/g/$aws/things/+/shadow/name/+/+");
        let [remapped, _] = request_filters("g", "shadow-requests/");
        assert_eq!(remapped, "$share/g/shadow-requests/+/shadow/+");
    }

    #[test]
    fn a_remapped_request_is_read_as_its_aws_topic() {
        let topic = request_topic(b"shadow-requests/lamp/shadow/update", "shadow-requests/");
        assert_eq!(topic.as_deref(), Some("$aws/things/lamp/shadow/update"));
        let same = request_topic(b"$aws/things/lamp/shadow/get", AWS_PREFIX);
        assert_eq!(same.as_deref(), Some("$aws/things/lamp/shadow/get"));
        assert_eq!(request_topic(b"other/lamp/shadow/get", AWS_PREFIX), None);
        let bad_prefix = AttachClient {
            request_prefix: "no-slash".into(),
            ..AttachClient::default()
        };
        assert!(bad_prefix.check("mqtt://127.0.0.1").is_err());
    }
}
