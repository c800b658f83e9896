//! The embedded broker: Umbra's own listeners and connection tasks (see
//! [`crate::connection`]) in front of rumqttd's router, which routes every
//! topic outside `$aws/`. Settings, their guard, start-up on free ports, and
//! shutdown.
//!
//! Threads and shutdown:
//! - listeners and every connection task run on the caller's tokio runtime
//!   (the same one as the shadow service, so that an answer wakes its
//!   subscriber's connection without a hop between thread pools);
//!   connections are tracked, so shutdown stops the accept loops, tells
//!   every connection to end (an MQTT 5 client hears "server shutting
//!   down"), and waits for them with a deadline;
//! - the router thread cannot be stopped: it keeps a sender to its own
//!   channel, so its receive loop never ends, and `Router::spawn` does not
//!   return its join handle. After shutdown it idles, blocked on that channel,
//!   until the process exits. [`RunningBroker::router_alive`] reports whether
//!   it has died (a panic drops its receiver).

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::{Router, RouterConfig, RouterTx};
use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::addresses::{AddressLimits, Addresses};
use crate::auth::{
    Authenticator, CertificateIdentity, PasswordFile, PasswordFileError, RevocationList,
};
use crate::connection::{Broker, PresenceEvent};
use crate::fanout::Publisher;
use crate::metrics::EdgeMetrics;
use crate::policy::{Policy, PolicyError, PolicySettings};
use crate::requests::ShadowRequests;
use crate::sessions::Sessions;
use crate::transport::{self, Transport};

/// How often parked sessions are checked for expiry.
const EXPIRY_SWEEP: Duration = Duration::from_secs(5);

/// Rules of the connection edge.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeSettings {
    /// Client ids allowed to publish and subscribe anywhere under `$aws/`
    /// (services, operators' tools). Everyone else is a device limited to
    /// `$aws/things/{its client id}/...`.
    pub privileged_clients: HashSet<String>,
}

/// Where the broker sends what it takes from connections.
#[derive(Clone)]
pub struct EdgeHooks {
    pub shadow: Arc<dyn ShadowRequests>,
    /// The `$aws` table answers are published into (made before the broker,
    /// so that the shadow service can publish into it).
    pub publisher: Publisher,
    /// Presence events, sent with `try_send` (dropped and counted when full).
    pub presence: Option<mpsc::Sender<PresenceEvent>>,
}

/// Everything the embedded broker needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSettings {
    pub router: RouterSizing,
    pub connection: ConnectionLimits,
    /// MQTT 3.1.1 and 5 over TCP (or TLS).
    pub mqtt_v4: Option<ListenerSettings>,
    /// Another MQTT 3.1.1 and 5 listener (kept for configurations that
    /// named a separate MQTT 5 port; every listener speaks both).
    pub mqtt_v5: Option<ListenerSettings>,
    /// MQTT 3.1.1 and 5 over WebSocket (or WebSocket over TLS).
    pub websocket: Option<ListenerSettings>,
    /// A user name and password shared by the whole fleet; it proves no
    /// identity (see `password_file`).
    pub auth: Option<Credentials>,
    /// Per-device credentials: `name:argon2id-hash` lines, managed with
    /// `umbra passwd`; reloaded when the file changes and on SIGHUP.
    pub password_file: Option<PathBuf>,
    /// A password-file user must use its user name as client id (so that
    /// its credentials cannot act for another thing).
    pub client_id_is_user: bool,
    /// How often the password file is checked for changes, in ms.
    pub password_file_check_ms: u64,
    /// Which part of a client certificate is the device's identity:
    /// `common_name` (the subject's CN) or `dns_name` (its first DNS SAN).
    pub certificate_identity: CertificateIdentity,
    /// Serial numbers (hex, one per line) of client certificates that are
    /// refused; reloaded like the password file.
    pub revoked_certificates: Option<PathBuf>,
    /// Connections and failed logins per source address.
    pub addresses: AddressLimits,
    /// Roles: who may publish and subscribe where outside `$aws/`.
    pub policy: PolicySettings,
    /// Accept anonymous clients on listeners reachable from other hosts.
    pub allow_anonymous_remote: bool,
    pub edge: EdgeSettings,
    /// `mqtt://host:port`: run no broker of Umbra's own and serve shadow
    /// requests as a client of this one (attach mode; the listener settings
    /// above then do not apply).
    pub attach: Option<String>,
    /// How attach mode connects.
    pub attach_client: crate::attach::AttachClient,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            router: RouterSizing::default(),
            connection: ConnectionLimits::default(),
            mqtt_v4: Some(ListenerSettings::local(1883)),
            mqtt_v5: None,
            websocket: Some(ListenerSettings::local(8083)),
            auth: None,
            password_file: None,
            client_id_is_user: true,
            password_file_check_ms: 2000,
            certificate_identity: CertificateIdentity::default(),
            revoked_certificates: None,
            addresses: AddressLimits::default(),
            policy: PolicySettings::default(),
            allow_anonymous_remote: false,
            edge: EdgeSettings::default(),
            attach: None,
            attach_client: crate::attach::AttachClient::default(),
        }
    }
}

/// Router sizing (rumqttd's router carries every topic outside `$aws/`).
/// Every distinct subscription filter gets its own in-memory commit log of
/// at most `max_segment_count` segments of `max_segment_size` bytes; a
/// subscriber that falls more than that behind loses the oldest messages
/// (logged and counted as a cursor jump).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterSizing {
    /// Router links at once (connections that use non-`$aws` topics).
    pub max_connections: usize,
    /// Packets the router moves per connection per scheduling round.
    pub max_outgoing_packet_count: u64,
    /// Bytes per commit log segment (rumqttd panics below 1024).
    pub max_segment_size: usize,
    /// Segments kept per filter (at least 1).
    pub max_segment_count: usize,
}

impl Default for RouterSizing {
    fn default() -> Self {
        RouterSizing {
            max_connections: 50_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 64 * 1024,
            max_segment_count: 2,
        }
    }
}

/// Per-connection limits, applied by Umbra's connection tasks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Connections open at once (all listeners); more wait in the backlog.
    pub max_connections: usize,
    /// Connections the kernel queues for each listener before they are accepted.
    pub listen_backlog: u32,
    /// Time a new connection has for its TLS/WebSocket handshake and CONNECT.
    pub connect_timeout_ms: u64,
    /// Largest accepted packet (AWS IoT: 128 KiB).
    pub max_payload_size: usize,
    /// Longest client id (AWS IoT's thing-name limit); longer ones are refused.
    pub max_client_id_bytes: usize,
    /// Subscriptions one connection may hold; more are refused.
    pub max_subscriptions: usize,
    /// Shadow requests of one connection being handled at once; while it has
    /// that many, Umbra stops reading from it.
    pub max_pending_requests: usize,
    /// The same for privileged clients (operators' tools and services act
    /// for many things at once).
    pub max_pending_requests_privileged: usize,
    /// QoS 1 messages sent to a client and not yet acknowledged.
    pub max_inflight_count: usize,
    /// QoS 1 and 2 messages from a client that rumqttd's router has not
    /// taken yet (its "receive maximum", announced to MQTT 5 clients); while
    /// a connection has that many, Umbra stops reading from it, so one
    /// client cannot fill the router's queues.
    pub receive_maximum: usize,
    /// Topic aliases an MQTT 5 client may set (announced in its CONNACK);
    /// an alias of 0 or above it closes the connection (0x94).
    pub topic_alias_maximum: u16,
    /// The longest keep-alive an MQTT 5 client gets, in seconds (AWS IoT's
    /// limit): one that asks for more, or for none (0), is given this one
    /// in its CONNACK. MQTT 3.1.1 clients keep theirs. 0: no maximum.
    pub max_keep_alive_secs: u16,
    /// Messages kept for one session while its client is slow or away.
    pub max_queued_messages: usize,
    /// How long a persistent session outlives its connection (and the most an
    /// MQTT 5 client may ask for).
    pub session_expiry_secs: u64,
    /// How long a write to a client may take before it is disconnected.
    pub write_timeout_ms: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 50_000,
            listen_backlog: 4096,
            connect_timeout_ms: 5_000,
            max_payload_size: 128 * 1024,
            max_client_id_bytes: 128,
            max_subscriptions: 50,
            max_pending_requests: 16,
            max_pending_requests_privileged: 4096,
            max_inflight_count: 100,
            receive_maximum: 32,
            topic_alias_maximum: 10,
            max_keep_alive_secs: 1200,
            max_queued_messages: 1000,
            session_expiry_secs: 3600,
            write_timeout_ms: 30_000,
        }
    }
}

impl ConnectionLimits {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

/// One listener. Port 0 picks a free port (see [`RunningBroker::addrs`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    pub addr: SocketAddr,
    /// Serve TLS with this certificate chain and key (PEM), read at start.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
}

impl ListenerSettings {
    /// A plain listener on 127.0.0.1.
    pub fn local(port: u16) -> Self {
        ListenerSettings {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Verify client certificates against this CA (PEM): mutual TLS, the
    /// way AWS IoT devices authenticate. A verified certificate's subject
    /// common name is the device's identity.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: a client without a certificate is refused in the
    /// handshake (false: it may authenticate with a password instead).
    #[serde(default = "yes")]
    pub require_client_cert: bool,
}

fn yes() -> bool {
    true
}

impl TlsFiles {
    /// Server certificate and key, no client certificates.
    pub fn new(cert: PathBuf, key: PathBuf) -> TlsFiles {
        TlsFiles {
            cert,
            key,
            client_ca: None,
            require_client_cert: true,
        }
    }

    /// Whether every client of the listener proves its identity with a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.client_ca.is_some() && self.require_client_cert
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Which listener a setting or error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    MqttV4,
    MqttV5,
    WebSocket,
}

impl std::fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ListenerKind::MqttV4 => "mqtt-v4",
            ListenerKind::MqttV5 => "mqtt-v5",
            ListenerKind::WebSocket => "websocket",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no listener configured")]
    NoListener,
    #[error(
        "listener {listener} on {addr} is reachable from other hosts without authentication \
         (configure auth or set allow_anonymous_remote)"
    )]
    AnonymousRemoteListener {
        listener: ListenerKind,
        addr: SocketAddr,
    },
    #[error("tls file {path} of listener {listener} does not exist")]
    TlsFileMissing {
        listener: ListenerKind,
        path: PathBuf,
    },
    #[error("router max_segment_size must be at least 1024 bytes, got {0}")]
    SegmentTooSmall(usize),
    #[error("router max_segment_count must be at least 1")]
    NoSegments,
    #[error("router max_connections must be at least 1")]
    TooFewConnections,
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("auth username must not be empty")]
    EmptyUsername,
    #[error(transparent)]
    PasswordFile(#[from] PasswordFileError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("attach: {0}")]
    Attach(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid broker config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({listener})")]
    Bind {
        listener: ListenerKind,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("tls of listener {listener}: {source}")]
    Tls {
        listener: ListenerKind,
        #[source]
        source: transport::TlsError,
    },
    #[error(transparent)]
    PasswordFile(#[from] PasswordFileError),
}

impl BrokerSettings {
    fn listeners(&self) -> impl Iterator<Item = (ListenerKind, &ListenerSettings)> {
        [
            (ListenerKind::MqttV4, &self.mqtt_v4),
            (ListenerKind::MqttV5, &self.mqtt_v5),
            (ListenerKind::WebSocket, &self.websocket),
        ]
        .into_iter()
        .filter_map(|(kind, listener)| listener.as_ref().map(|l| (kind, l)))
    }

    /// The config guard: refuses settings rumqttd would panic on, missing TLS
    /// files, and anonymous listeners reachable from other hosts (any address
    /// that is not loopback, `0.0.0.0` included) unless
    /// `allow_anonymous_remote` is set.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.attach {
            self.attach_client.check(url).map_err(ConfigError::Attach)?;
        }
        if self.listeners().next().is_none() {
            return Err(ConfigError::NoListener);
        }
        if self.router.max_segment_size < 1024 {
            return Err(ConfigError::SegmentTooSmall(self.router.max_segment_size));
        }
        if self.router.max_segment_count == 0 {
            return Err(ConfigError::NoSegments);
        }
        if self.router.max_connections == 0 {
            return Err(ConfigError::TooFewConnections);
        }
        let c = &self.connection;
        for (field, value) in [
            ("connection.max_connections", c.max_connections),
            ("connection.max_payload_size", c.max_payload_size),
            ("connection.max_client_id_bytes", c.max_client_id_bytes),
            ("connection.max_pending_requests", c.max_pending_requests),
            (
                "connection.max_pending_requests_privileged",
                c.max_pending_requests_privileged,
            ),
            ("connection.max_inflight_count", c.max_inflight_count),
            ("connection.receive_maximum", c.receive_maximum),
            ("connection.max_queued_messages", c.max_queued_messages),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(field));
            }
        }
        if c.connect_timeout_ms == 0 || c.write_timeout_ms == 0 {
            return Err(ConfigError::Zero(
                "connection.connect_timeout_ms/write_timeout_ms",
            ));
        }
        if self.auth.as_ref().is_some_and(|a| a.username.is_empty()) {
            return Err(ConfigError::EmptyUsername);
        }
        Policy::new(&self.policy)?;
        if let Some(path) = &self.password_file {
            PasswordFile::read(path)?;
        }
        for (listener, settings) in self.listeners() {
            let certificates = settings
                .tls
                .as_ref()
                .is_some_and(TlsFiles::requires_client_cert);
            if self.auth.is_none()
                && self.password_file.is_none()
                && !certificates
                && !self.allow_anonymous_remote
                && !settings.addr.ip().is_loopback()
            {
                return Err(ConfigError::AnonymousRemoteListener {
                    listener,
                    addr: settings.addr,
                });
            }
            if let Some(tls) = &settings.tls {
                for path in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    if !path.exists() {
                        return Err(ConfigError::TlsFileMissing {
                            listener,
                            path: path.clone(),
                        });
                    }
                }
            }
        }
        if let Some(list) = self.revocation_list() {
            list.read()?;
        }
        Ok(())
    }

    /// The revocation list, with the listeners' client CAs as the issuers
    /// of the CRLs it may hold (a CA file that cannot be read adds none;
    /// the listener reports it).
    fn revocation_list(&self) -> Option<RevocationList> {
        let path = self.revoked_certificates.clone()?;
        let issuers = self
            .listeners()
            .filter_map(|(_, listener)| listener.tls.as_ref()?.client_ca.as_ref())
            .filter_map(|ca| std::fs::File::open(ca).ok())
            .flat_map(|file| {
                rustls_pemfile::certs(&mut std::io::BufReader::new(file))
                    .filter_map(Result::ok)
                    .map(|der| der.to_vec())
                    .collect::<Vec<_>>()
            })
            .collect();
        Some(RevocationList { path, issuers })
    }

    fn router_config(&self) -> RouterConfig {
        RouterConfig {
            max_connections: self.router.max_connections,
            max_outgoing_packet_count: self.router.max_outgoing_packet_count,
            max_segment_size: self.router.max_segment_size,
            max_segment_count: self.router.max_segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        }
    }
}

/// The actual addresses the listeners are bound to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerAddrs {
    pub mqtt_v4: Option<SocketAddr>,
    pub mqtt_v5: Option<SocketAddr>,
    pub websocket: Option<SocketAddr>,
}

/// A started broker. Call [`shutdown`](Self::shutdown); dropping it without
/// shutdown ends every connection in the background without waiting.
pub struct RunningBroker {
    addrs: ListenerAddrs,
    listeners: Vec<(ListenerKind, JoinHandle<()>)>,
    stop_accepting: CancellationToken,
    connections: TaskTracker,
    broker: Arc<Broker>,
    /// Session expiry and password-file reloads.
    housekeeping: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningBroker")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// Starts the broker: validates `settings`, spawns the router and binds
/// every listener (port 0 resolves to a free port). Returns once every
/// listener accepts connections. Must be called within a tokio runtime,
/// which then runs every listener and connection.
pub fn start(settings: BrokerSettings, hooks: EdgeHooks) -> Result<RunningBroker, StartError> {
    settings.validate()?;
    let mut transports = Vec::new();
    for (kind, listener) in settings.listeners() {
        let tls = match &listener.tls {
            Some(files) => {
                Some(
                    transport::tls_acceptor(files).map_err(|source| StartError::Tls {
                        listener: kind,
                        source,
                    })?,
                )
            }
            None => None,
        };
        let transport = match (kind, tls) {
            (ListenerKind::WebSocket, tls) => Transport::WebSocket(tls),
            (_, Some(tls)) => Transport::Tls(tls),
            (_, None) => Transport::Tcp,
        };
        transports.push((kind, listener.addr, transport));
    }
    let auth = Authenticator::new(
        settings.auth.clone(),
        settings.password_file.clone(),
        settings.revocation_list(),
        settings.client_id_is_user,
        settings.certificate_identity,
    )?;
    let router = Router::new(0, settings.router_config());
    let publisher = hooks.publisher;
    let metrics = publisher.metrics();
    // A second start with the same hooks keeps the first router's gauge.
    let _ = metrics.router_filters.set(router.filter_gauge());
    let router: RouterTx = router.spawn();
    let stop = CancellationToken::new();
    let broker = Arc::new(Broker {
        limits: settings.connection.clone(),
        edge: settings.edge.clone(),
        auth,
        addresses: Addresses::new(settings.addresses.clone()),
        policy: Policy::new(&settings.policy).map_err(ConfigError::from)?,
        sessions: Sessions::new(
            publisher.clone(),
            router.clone(),
            settings.connection.max_queued_messages,
            stop.clone(),
        ),
        publisher,
        shadow: hooks.shadow,
        presence: hooks.presence,
        metrics,
        router,
        next_session: AtomicU64::new(1),
        stop,
    });

    let stop_accepting = CancellationToken::new();
    let connections = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(settings.connection.max_connections));
    let mut addrs = ListenerAddrs::default();
    let mut listeners = Vec::new();
    for (kind, addr, transport) in transports {
        let listener =
            transport::bind(addr, settings.connection.listen_backlog).map_err(|source| {
                StartError::Bind {
                    listener: kind,
                    addr,
                    source,
                }
            })?;
        let bound = listener.local_addr().map_err(|source| StartError::Bind {
            listener: kind,
            addr,
            source,
        })?;
        info!(listener = %kind, addr = %bound, transport = ?transport, "listening");
        match kind {
            ListenerKind::MqttV4 => addrs.mqtt_v4 = Some(bound),
            ListenerKind::MqttV5 => addrs.mqtt_v5 = Some(bound),
            ListenerKind::WebSocket => addrs.websocket = Some(bound),
        }
        let task = tokio::spawn(transport::accept_loop(
            listener,
            transport,
            Arc::clone(&broker),
            Arc::clone(&limit),
            connections.clone(),
            stop_accepting.clone(),
        ));
        listeners.push((kind, task));
    }
    let housekeeping = tokio::spawn(housekeeping(
        Arc::clone(&broker),
        Duration::from_millis(settings.password_file_check_ms.max(1)),
    ));

    info!(?addrs, "embedded broker started");
    Ok(RunningBroker {
        addrs,
        listeners,
        stop_accepting,
        connections,
        broker,
        housekeeping: Some(housekeeping),
    })
}

impl RunningBroker {
    /// The bound listener addresses (port 0 resolved).
    pub fn addrs(&self) -> ListenerAddrs {
        self.addrs
    }

    /// Publishes into the `$aws` topic space; clone it freely.
    pub fn publisher(&self) -> Publisher {
        self.broker.publisher.clone()
    }

    pub fn metrics(&self) -> Arc<EdgeMetrics> {
        Arc::clone(&self.broker.metrics)
    }

    /// Persistent sessions waiting for their client.
    pub fn parked_sessions(&self) -> usize {
        self.broker.sessions.parked()
    }

    /// False once the router thread has died (it panicked).
    pub fn router_alive(&self) -> bool {
        !self.broker.router.is_disconnected()
    }

    /// Stops accepting, ends every connection, and waits up to `deadline`
    /// for them. Panics of listener tasks are re-raised.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.stop_accepting().await;
        self.broker.stop.cancel();
        self.connections.close();
        if tokio::time::timeout(deadline, self.connections.wait())
            .await
            .is_err()
        {
            warn!("connections did not end before the deadline");
        }
        if let Some(housekeeping) = self.housekeeping.take() {
            umbra_shadow::tasks::joined("housekeeping", housekeeping.await);
        }
        info!("embedded broker stopped");
    }

    /// Stops accepting new connections; connected clients stay connected
    /// (so that answers to their requests can still reach them).
    pub async fn stop_accepting(&mut self) {
        self.stop_accepting.cancel();
        for (kind, task) in std::mem::take(&mut self.listeners) {
            umbra_shadow::tasks::joined(&kind.to_string(), task.await);
        }
    }
}

/// Ends expired persistent sessions, and reloads the password file when it
/// changes or the process gets SIGHUP, until the broker stops.
async fn housekeeping(broker: Arc<Broker>, file_check: Duration) {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let watching = broker.auth.has_files();
    let mut hangup = match watching {
        true => signal(SignalKind::hangup())
            .map_err(|err| warn!(%err, "SIGHUP will not reload the password file"))
            .ok(),
        false => None,
    };
    async fn hung_up(signal: &mut Option<Signal>) -> Option<()> {
        match signal {
            Some(signal) => signal.recv().await,
            None => std::future::pending().await,
        }
    }
    let mut expiry = tokio::time::interval(EXPIRY_SWEEP);
    let mut check = tokio::time::interval(file_check);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = expiry.tick() => {
                let expired = broker.sessions.expire();
                if expired > 0 {
                    info!(expired, "persistent sessions expired");
                }
            }
            _ = check.tick(), if watching => broker.auth.reload_if_changed(),
            Some(()) = hung_up(&mut hangup) => broker.auth.reload_logged(),
            () = broker.stop.cancelled() => return,
        }
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        // Not shut down (or already): every task ends on its own.
        self.stop_accepting.cancel();
        self.broker.stop.cancel();
    }
}
