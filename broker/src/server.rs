//! The `umbra` server: the shadow service, its SQLite store and the embedded
//! broker wired together, with ordered start-up and a draining shutdown.
//!
//! Device requests arrive from the broker's edge in arrival order and are
//! submitted to the service in that order; answers leave the service's
//! outbox in commit order and go back into the broker through one publisher.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};
use umbra_shadow::http::ApiState;
use umbra_shadow::store::ShadowStore;
use umbra_shadow::{
    Message, Rejection, Request, ServiceConfig, ShadowMetrics, ShadowService, SqliteStore,
};

use crate::config::Config;
use crate::edge::{EdgeHooks, PresenceEvent};
use crate::embedded::{self, RunningBroker};
use crate::publisher::AnswerPublisher;
use crate::requests::{ChannelShadowSink, ShadowInbox, ShadowPublish};

/// Presence events that may wait to be recorded.
const PRESENCE_QUEUE: usize = 16_384;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the shadow store: {0}")]
    Store(#[from] umbra_shadow::store::StoreError),
    #[error(transparent)]
    Broker(#[from] embedded::StartError),
    #[error("cannot bind the http api on {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Where a running server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerAddrs {
    pub http: SocketAddr,
    pub mqtt: Option<SocketAddr>,
    pub mqtt_v5: Option<SocketAddr>,
    pub websocket: Option<SocketAddr>,
}

/// A running Umbra server.
pub struct Server {
    http_addr: SocketAddr,
    /// Ends the HTTP API (and its open change streams).
    http_stop: CancellationToken,
    http: JoinHandle<std::io::Result<()>>,
    /// Waits for the fleet index, then reports ready.
    readiness: JoinHandle<()>,
    broker: RunningBroker,
    service: Arc<ShadowService>,
    /// Stops taking device requests and presence events (after draining what arrived).
    intake: CancellationToken,
    intake_tasks: TaskTracker,
    /// Requests being handled.
    requests: TaskTracker,
    /// Tells the outbox pump that the service is closed and it may finish.
    service_closed: CancellationToken,
    outbox_pump: JoinHandle<()>,
    grace: std::time::Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addrs", &self.addrs())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store, starts the service and the broker, and binds every
    /// listener. `config` must have been validated ([`Config::load`] does).
    pub async fn start(config: Config) -> Result<Server, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let registry = prometheus::Registry::new();
        let metrics = ShadowMetrics::register(&registry)?;
        let store_config = config.store.store_config(&config.database_path());
        let (store, committed) = SqliteStore::open_with_metrics(
            store_config,
            config.shadow.clone(),
            Some(metrics.clone()),
        )?;
        let store: Arc<dyn ShadowStore> = Arc::new(store);
        let service_config = ServiceConfig {
            limits: config.shadow.clone(),
            ..ServiceConfig::default()
        };
        let (service, outbox) = ShadowService::start_with_metrics(
            service_config,
            store,
            committed,
            Some(metrics.clone()),
        );
        let http_listener = match tokio::net::TcpListener::bind(config.http_addr).await {
            Ok(listener) => listener,
            Err(source) => {
                service.close().await;
                return Err(StartError::HttpBind {
                    addr: config.http_addr,
                    source,
                });
            }
        };
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| StartError::HttpBind {
                addr: config.http_addr,
                source,
            })?;

        let (sink, inbox) =
            ChannelShadowSink::channel(config.requests.queue, config.requests.overload_queue);
        let (presence_tx, presence_rx) = mpsc::channel(PRESENCE_QUEUE);
        let hooks = EdgeHooks {
            shadow_sink: Arc::new(sink),
            presence: Some(presence_tx),
        };
        let broker = match embedded::start(config.mqtt.clone(), hooks) {
            Ok(broker) => broker,
            Err(err) => {
                service.close().await;
                return Err(err.into());
            }
        };
        let publisher = broker.publisher();
        registry.register(Box::new(crate::metrics::EdgeCollector::new(
            broker.metrics(),
        )?))?;

        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        let api = ApiState::new(
            Arc::clone(&service),
            config.http.clone(),
            registry,
            ready_rx,
        )
        .with_metrics(metrics);
        let http_stop = CancellationToken::new();
        let stopped = http_stop.clone();
        let http = tokio::spawn(umbra_shadow::http::serve(http_listener, api, async move {
            stopped.cancelled().await;
        }));
        // Ready once the store, the broker and the fleet index are up.
        let fleet = Arc::clone(service.fleet());
        let readiness = tokio::spawn(async move {
            fleet.wait_loaded().await;
            let _ = ready_tx.send(true);
            // Keep the sender so that /readyz keeps answering until shutdown.
            std::future::pending::<()>().await;
        });

        let intake = CancellationToken::new();
        let intake_tasks = TaskTracker::new();
        let requests = TaskTracker::new();
        let ShadowInbox {
            requests: request_rx,
            overloaded,
        } = inbox;
        intake_tasks.spawn(take_requests(
            request_rx,
            Arc::clone(&service),
            requests.clone(),
            Arc::new(Semaphore::new(config.requests.max_in_flight)),
            intake.clone(),
        ));
        intake_tasks.spawn(refuse_overloaded(
            overloaded,
            Arc::clone(&service),
            intake.clone(),
        ));
        intake_tasks.spawn(record_presence(
            presence_rx,
            Arc::clone(&service),
            publisher.clone(),
            intake.clone(),
        ));
        intake_tasks.close();
        let service_closed = CancellationToken::new();
        let outbox_pump = tokio::spawn(pump_outbox(outbox, publisher, service_closed.clone()));

        let server = Server {
            http_addr,
            http_stop,
            http,
            readiness,
            broker,
            service,
            intake,
            intake_tasks,
            requests,
            service_closed,
            outbox_pump,
            grace: config.shutdown_grace(),
        };
        info!(addrs = ?server.addrs(), "umbra started");
        Ok(server)
    }

    pub fn addrs(&self) -> ServerAddrs {
        let a = self.broker.addrs();
        ServerAddrs {
            http: self.http_addr,
            mqtt: a.mqtt_v4,
            mqtt_v5: a.mqtt_v5,
            websocket: a.websocket,
        }
    }

    pub fn service(&self) -> &Arc<ShadowService> {
        &self.service
    }

    pub fn broker(&self) -> &RunningBroker {
        &self.broker
    }

    /// Stops accepting connections, handles and commits every request that
    /// had arrived, publishes their answers, then closes every connection.
    pub async fn shutdown(mut self) {
        // HTTP first: its in-flight requests finish (the service still runs)
        // and its change streams end.
        self.http_stop.cancel();
        match (&mut self.http).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => error!(cause = %err, "http api failed"),
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => {}
        }
        self.readiness.abort();
        self.broker.stop_accepting().await;
        // Requests already received are drained and submitted by the intake
        // loops before they stop; later ones are refused at the edge.
        self.intake.cancel();
        self.intake_tasks.wait().await;
        self.requests.close();
        self.requests.wait().await;
        self.service.close().await;
        self.service_closed.cancel();
        if let Err(err) = (&mut self.outbox_pump).await {
            if err.is_panic() {
                std::panic::resume_unwind(err.into_panic());
            }
        }
        self.broker.shutdown(self.grace).await;
        info!("umbra stopped");
    }
}

fn to_request(publish: ShadowPublish) -> Request {
    Request {
        key: publish.request.key,
        op: publish.request.op,
        payload: publish.payload,
        client: publish.client_id,
    }
}

/// Submits device requests in arrival order; waits for their answers on
/// tracked tasks, at most `in_flight` at once (beyond that the edge's queue
/// fills and its overload path answers 429).
async fn take_requests(
    mut inbox: mpsc::Receiver<ShadowPublish>,
    service: Arc<ShadowService>,
    requests: TaskTracker,
    in_flight: Arc<Semaphore>,
    stop: CancellationToken,
) {
    loop {
        let publish = tokio::select! {
            biased;
            publish = inbox.recv() => match publish {
                Some(publish) => publish,
                None => break,
            },
            () = stop.cancelled() => {
                // Close first, so nothing new arrives, then take what did.
                inbox.close();
                match inbox.recv().await {
                    Some(publish) => publish,
                    None => break,
                }
            }
        };
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let pending = service.submit(to_request(publish));
        requests.spawn(async move {
            pending.answer().await;
            drop(permit);
        });
    }
}

/// Answers 429 to requests the edge could not queue.
async fn refuse_overloaded(
    mut overloaded: mpsc::Receiver<crate::requests::Overloaded>,
    service: Arc<ShadowService>,
    stop: CancellationToken,
) {
    loop {
        let lost = tokio::select! {
            biased;
            lost = overloaded.recv() => lost,
            () = stop.cancelled() => {
                overloaded.close();
                overloaded.recv().await
            }
        };
        let Some(lost) = lost else { break };
        debug!(client_id = lost.0.client_id, "request refused: overloaded");
        service
            .refuse(to_request(*lost.0), Rejection::Throttled)
            .await;
    }
}

/// Records connects and disconnects in the store and publishes AWS presence
/// events. A disconnect of a connection that a newer one replaced is stale
/// and ignored.
async fn record_presence(
    mut events: mpsc::Receiver<PresenceEvent>,
    service: Arc<ShadowService>,
    publisher: AnswerPublisher,
    stop: CancellationToken,
) {
    let mut sessions: HashMap<String, u64> = HashMap::new();
    loop {
        let event = tokio::select! {
            biased;
            event = events.recv() => event,
            () = stop.cancelled() => break,
        };
        let Some(event) = event else { break };
        let now = now_ms();
        let (client_id, session, connected) = match event {
            PresenceEvent::Connected { client_id, session } => {
                sessions.insert(client_id.clone(), session);
                (client_id, session, true)
            }
            PresenceEvent::Disconnected { client_id, session } => {
                if sessions.get(&client_id) != Some(&session) {
                    debug!(client_id, session, "stale disconnect ignored");
                    continue;
                }
                sessions.remove(&client_id);
                (client_id, session, false)
            }
        };
        let kind = if connected {
            "connected"
        } else {
            "disconnected"
        };
        if service.limits().check_thing_name(&client_id).is_ok() {
            service.record_presence(&client_id, connected, now, None);
        }
        let event = json!({
            "clientId": client_id,
            "timestamp": now,
            "eventType": kind,
            "sessionIdentifier": session.to_string(),
            "versionNumber": session,
        });
        let topic = format!("$aws/events/presence/{kind}/{client_id}");
        if let Err(err) = publisher.try_publish(&topic, event.to_string()) {
            warn!(cause = %err, client_id, "presence event not published");
        }
    }
}

/// Publishes the service's messages into the broker, in order. After the
/// service has closed, publishes what is left and stops.
async fn pump_outbox(
    mut outbox: mpsc::Receiver<Message>,
    publisher: AnswerPublisher,
    service_closed: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            biased;
            message = outbox.recv() => message,
            () = service_closed.cancelled() => {
                while let Ok(message) = outbox.try_recv() {
                    publish(&publisher, message).await;
                }
                break;
            }
        };
        match message {
            Some(message) => publish(&publisher, message).await,
            None => break,
        }
    }
}

async fn publish(publisher: &AnswerPublisher, message: Message) {
    if let Err(err) = publisher.publish(&message.topic, message.payload).await {
        error!(cause = %err, topic = message.topic, "answer not published");
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
