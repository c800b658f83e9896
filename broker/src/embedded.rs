//! Runs rumqttd inside Umbra: router sizing, listeners, authentication, the
//! config guard, startup on free ports, and shutdown.
//!
//! rumqttd's `Broker::start()` blocks forever, cannot be stopped and hides
//! its pieces, so Umbra assembles the broker from the public lower-level
//! parts: `Router::new(..).spawn()`, one `Server` per listener wrapped in
//! [`EdgeProtocol`], and a local link for the [`AnswerPublisher`].
//!
//! Threads and shutdown:
//! - listeners and every connection task run on a multi-thread tokio runtime
//!   owned by [`RunningBroker`] (rumqttd spawns connection tasks with
//!   `tokio::spawn` on the current runtime, so they cannot be tracked one by
//!   one; shutting the runtime down drops all of them, which closes their
//!   sockets and emits `Disconnected` presence events);
//! - the answer publisher has its own thread, stopped and joined on shutdown;
//! - the router thread cannot be stopped: it keeps a sender to its own
//!   channel, so its receive loop never ends, and `Router::spawn` does not
//!   return its join handle. After shutdown it idles, blocked on that channel,
//!   until the process exits. [`RunningBroker::router_alive`] reports whether
//!   it has died (a panic drops its receiver).

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use rumqttd::local::LinkBuilder;
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings, TlsConfig,
};
use serde::Deserialize;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::edge::{EdgeContext, EdgeHooks, EdgeProtocol, EdgeSettings};
use crate::metrics::EdgeMetrics;
use crate::publisher::{AnswerPublisher, Command, PublisherWorker, PUBLISHER_CLIENT_ID};

/// Everything the embedded broker needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSettings {
    pub router: RouterSizing,
    pub connection: ConnectionLimits,
    /// MQTT 3.1.1 over TCP.
    pub mqtt_v4: Option<ListenerSettings>,
    /// MQTT 5 over TCP.
    pub mqtt_v5: Option<ListenerSettings>,
    /// MQTT 3.1.1 over WebSocket (rumqttd's WebSocket listener speaks 3.1.1 only).
    pub websocket: Option<ListenerSettings>,
    /// Username and password every client must present; `None` = anonymous.
    pub auth: Option<Credentials>,
    /// Accept anonymous clients on listeners reachable from other hosts.
    pub allow_anonymous_remote: bool,
    /// Worker threads of the broker's runtime.
    pub worker_threads: usize,
    /// Capacity of the answer publisher's queue.
    pub publisher_queue: usize,
    pub edge: EdgeSettings,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            router: RouterSizing::default(),
            connection: ConnectionLimits::default(),
            mqtt_v4: Some(ListenerSettings::local(1883)),
            mqtt_v5: None,
            websocket: None,
            auth: None,
            allow_anonymous_remote: false,
            worker_threads: 2,
            publisher_queue: 4096,
            edge: EdgeSettings::default(),
        }
    }
}

/// Router sizing. Every distinct subscription filter gets its own in-memory
/// commit log of at most `max_segment_count` segments of `max_segment_size`
/// bytes, and every device subscribes to a few filters of its own (its shadow
/// answer topics), so segments are small: shadow answers are small and a
/// subscriber that falls more than a segment count behind loses the oldest
/// messages (rumqttd raises a `CursorJump` alert).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterSizing {
    /// Connections the router accepts (remote and local), for tens of
    /// thousands of devices.
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

/// Per-connection limits, applied by rumqttd.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Time a new connection has to send CONNECT.
    pub connect_timeout_ms: u16,
    /// Largest accepted packet payload (AWS IoT: 128 KiB).
    pub max_payload_size: usize,
    /// Packets read from one connection before handing them to the router.
    pub max_inflight_count: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            connect_timeout_ms: 5_000,
            max_payload_size: 128 * 1024,
            max_inflight_count: 100,
        }
    }
}

/// One listener. Port 0 picks a free port (see [`RunningBroker::addrs`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    pub addr: SocketAddr,
    /// Serve TLS with this certificate chain and key (PEM). rumqttd reads the
    /// files on every accept and runs the handshake inside its accept loop.
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
    #[error("router max_connections must be at least 2")]
    TooFewConnections,
    #[error("worker_threads must be at least 1")]
    NoWorkerThreads,
    #[error("auth username must not be empty")]
    EmptyUsername,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid broker config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot build the broker runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot listen on {addr} ({listener})")]
    Bind {
        listener: ListenerKind,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach the answer publisher to the router")]
    Publisher(#[source] io::Error),
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
        if self.listeners().next().is_none() {
            return Err(ConfigError::NoListener);
        }
        if self.router.max_segment_size < 1024 {
            return Err(ConfigError::SegmentTooSmall(self.router.max_segment_size));
        }
        if self.router.max_segment_count == 0 {
            return Err(ConfigError::NoSegments);
        }
        // One connection is the answer publisher's.
        if self.router.max_connections < 2 {
            return Err(ConfigError::TooFewConnections);
        }
        if self.worker_threads == 0 {
            return Err(ConfigError::NoWorkerThreads);
        }
        if self.auth.as_ref().is_some_and(|a| a.username.is_empty()) {
            return Err(ConfigError::EmptyUsername);
        }
        for (listener, settings) in self.listeners() {
            if self.auth.is_none()
                && !self.allow_anonymous_remote
                && !settings.addr.ip().is_loopback()
            {
                return Err(ConfigError::AnonymousRemoteListener {
                    listener,
                    addr: settings.addr,
                });
            }
            if let Some(tls) = &settings.tls {
                for path in [&tls.cert, &tls.key] {
                    if !path.exists() {
                        return Err(ConfigError::TlsFileMissing {
                            listener,
                            path: path.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
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

    fn connection_settings(&self) -> ConnectionSettings {
        let mut connections = ConnectionSettings {
            connection_timeout_ms: self.connection.connect_timeout_ms,
            max_payload_size: self.connection.max_payload_size,
            max_inflight_count: self.connection.max_inflight_count,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        };
        if let Some(credentials) = self.auth.clone() {
            connections.set_auth_handler(move |_client_id, username: String, password: String| {
                let ok = constant_time_eq(username.as_bytes(), credentials.username.as_bytes())
                    & constant_time_eq(password.as_bytes(), credentials.password.as_bytes());
                std::future::ready(ok)
            });
        }
        connections
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The actual addresses the listeners are bound to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerAddrs {
    pub mqtt_v4: Option<SocketAddr>,
    pub mqtt_v5: Option<SocketAddr>,
    pub websocket: Option<SocketAddr>,
}

/// A started broker. Call [`shutdown`](Self::shutdown); dropping it without
/// shutdown stops the runtime in the background without waiting.
pub struct RunningBroker {
    runtime: Option<Runtime>,
    addrs: ListenerAddrs,
    listeners: Vec<(ListenerKind, JoinHandle<()>)>,
    publisher: AnswerPublisher,
    publisher_thread: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<EdgeMetrics>,
    router_alive: Box<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for RunningBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningBroker")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

macro_rules! server_future {
    ($settings:expr, $router_tx:expr, $protocol:expr, $link:expr) => {{
        let mut server = Server::new($settings, $router_tx, $protocol);
        Box::pin(async move { server.start($link).await.map_err(|e| e.to_string()) })
            as ServerFuture
    }};
}

/// Starts the broker: validates `settings`, spawns the router, binds every
/// listener (port 0 resolves to a free port) and attaches the answer
/// publisher. Returns once every listener accepts connections. Callable from
/// inside or outside a tokio runtime.
pub fn start(settings: BrokerSettings, hooks: EdgeHooks) -> Result<RunningBroker, StartError> {
    settings.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.worker_threads)
        .thread_name("umbra-broker")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;

    let router_tx = Router::new(0, settings.router_config()).spawn();
    let router_probe = router_tx.clone();
    let router_alive = Box::new(move || !router_probe.is_disconnected());

    let metrics = Arc::new(EdgeMetrics::default());
    let edge = EdgeContext::new(settings.edge.clone(), hooks, metrics.clone());
    let connections = settings.connection_settings();

    // A closure, because rumqttd does not export the router channel's type.
    let make_server = |kind: ListenerKind, server: ServerSettings| -> ServerFuture {
        let router_tx = router_tx.clone();
        let edge = edge.clone();
        match kind {
            ListenerKind::MqttV4 => server_future!(
                server,
                router_tx,
                EdgeProtocol::new(V4, edge),
                LinkType::Remote
            ),
            ListenerKind::MqttV5 => server_future!(
                server,
                router_tx,
                EdgeProtocol::new(V5, edge),
                LinkType::Remote
            ),
            ListenerKind::WebSocket => server_future!(
                server,
                router_tx,
                EdgeProtocol::new(V4, edge),
                LinkType::Websocket
            ),
        }
    };

    let mut addrs = ListenerAddrs::default();
    let mut listeners = Vec::new();
    for (kind, listener) in settings.listeners() {
        let (addr, task) = bind_listener(&runtime, kind, listener, &connections, &make_server)?;
        match kind {
            ListenerKind::MqttV4 => addrs.mqtt_v4 = Some(addr),
            ListenerKind::MqttV5 => addrs.mqtt_v5 = Some(addr),
            ListenerKind::WebSocket => addrs.websocket = Some(addr),
        }
        listeners.push((kind, task));
    }

    // Blocks briefly on the router's reply: it is running and idle.
    let (link_tx, link_rx, _connack) = LinkBuilder::new(PUBLISHER_CLIENT_ID, router_tx.clone())
        .build()
        .map_err(|e| StartError::Publisher(io::Error::other(e.to_string())))?;
    let worker =
        PublisherWorker::spawn(link_tx, link_rx, settings.publisher_queue, metrics.clone())
            .map_err(StartError::Publisher)?;

    info!(?addrs, "embedded broker started");
    Ok(RunningBroker {
        runtime: Some(runtime),
        addrs,
        listeners,
        publisher: worker.handle,
        publisher_thread: Some(worker.thread),
        metrics,
        router_alive,
    })
}

/// A waker that does nothing: used to poll a listener future once, which
/// binds its socket synchronously; the runtime re-polls it with a real waker.
struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

type ServerFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Builds the (not yet polled) accept loop of one listener.
type MakeServer<'a> = &'a dyn Fn(ListenerKind, ServerSettings) -> ServerFuture;

fn bind_listener(
    runtime: &Runtime,
    kind: ListenerKind,
    listener: &ListenerSettings,
    connections: &ConnectionSettings,
    make_server: MakeServer<'_>,
) -> Result<(SocketAddr, JoinHandle<()>), StartError> {
    // A requested port 0 is resolved to a concrete free port first, because
    // rumqttd binds the listener itself and never reveals the bound address.
    // Another process could grab that port before rumqttd binds it: retry.
    let attempts = if listener.addr.port() == 0 { 5 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let addr = resolve_port(listener.addr).map_err(|source| StartError::Bind {
            listener: kind,
            addr: listener.addr,
            source,
        })?;
        let settings = ServerSettings {
            name: kind.to_string(),
            listen: addr,
            tls: listener.tls.as_ref().map(|tls| TlsConfig::Rustls {
                capath: None,
                certpath: tls.cert.display().to_string(),
                keypath: tls.key.display().to_string(),
            }),
            // rumqttd sleeps this long after every accept.
            next_connection_delay_ms: 0,
            connections: connections.clone(),
        };
        let mut server = make_server(kind, settings);

        // The first poll binds the socket (tokio binds synchronously) and then
        // waits in accept: a bind error surfaces here, not in a log line.
        let _entered = runtime.enter();
        let waker = Waker::from(Arc::new(NoopWake));
        match server.as_mut().poll(&mut Context::from_waker(&waker)) {
            Poll::Pending => {
                let task = runtime.spawn(async move {
                    if let Err(cause) = server.await {
                        error!(listener = %kind, cause, "listener stopped");
                    }
                });
                info!(listener = %kind, %addr, "listening");
                return Ok((addr, task));
            }
            Poll::Ready(result) => {
                let message = match result {
                    Ok(()) => "listener ended at once".to_owned(),
                    Err(message) => message,
                };
                last_error = Some(io::Error::new(io::ErrorKind::AddrInUse, message));
            }
        }
    }
    Err(StartError::Bind {
        listener: kind,
        addr: listener.addr,
        source: last_error.unwrap_or_else(|| io::Error::other("bind failed")),
    })
}

fn resolve_port(addr: SocketAddr) -> io::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let probe = StdTcpListener::bind(addr)?;
    probe.local_addr()
}

impl RunningBroker {
    /// The bound listener addresses (port 0 resolved).
    pub fn addrs(&self) -> ListenerAddrs {
        self.addrs
    }

    /// A handle for publishing answers; clone it freely.
    pub fn publisher(&self) -> AnswerPublisher {
        self.publisher.clone()
    }

    pub fn metrics(&self) -> Arc<EdgeMetrics> {
        self.metrics.clone()
    }

    /// False once the router thread has died (it panicked).
    pub fn router_alive(&self) -> bool {
        (self.router_alive)()
    }

    /// Stops accepting, closes every connection, stops the answer publisher
    /// and waits up to `deadline` for the runtime's blocking work. Must be
    /// called from within a tokio runtime (not the broker's own). Panics of
    /// listener tasks or the publisher thread are re-raised here.
    pub async fn shutdown(mut self, deadline: Duration) {
        // 1. Stop accepting (if the caller has not already).
        self.stop_accepting().await;

        // 2. Stop the publisher after what is already queued.
        let stopped = tokio::time::timeout(deadline, self.publisher.queue_stop()).await;
        if stopped.is_err() {
            warn!("answer publisher queue did not drain before the deadline");
        }
        if let Some(thread) = self.publisher_thread.take() {
            if stopped.is_ok() {
                join_thread(thread).await;
            }
        }

        // 3. Close every connection: dropping the runtime drops their tasks.
        if let Some(runtime) = self.runtime.take() {
            let joined =
                tokio::task::spawn_blocking(move || runtime.shutdown_timeout(deadline)).await;
            if let Err(e) = joined {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        info!("embedded broker stopped");
    }

    /// Stops accepting new connections; connected clients stay connected
    /// (so that answers to their requests can still reach them).
    pub async fn stop_accepting(&mut self) {
        for (_, task) in &self.listeners {
            task.abort();
        }
        for (kind, task) in std::mem::take(&mut self.listeners) {
            rethrow(kind.to_string(), task.await);
        }
    }
}

async fn join_thread(thread: std::thread::JoinHandle<()>) {
    match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => {}
    }
}

fn rethrow(what: String, result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result {
        if e.is_panic() {
            error!(task = what, "broker task panicked");
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

impl AnswerPublisher {
    async fn queue_stop(&self) {
        // Err means the thread already ended (router gone): nothing to stop.
        let _ignored_if_already_stopped = self.queue.send(Command::Stop).await;
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Not shut down: stop without waiting (safe in async context).
            self.publisher.queue.try_send(Command::Stop).ok();
            runtime.shutdown_background();
        }
    }
}
