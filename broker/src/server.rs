//! The `umbra` server: the shadow service, its store and the embedded
//! broker wired together, with ordered start-up and a draining shutdown.
//!
//! Each connection task submits its device's requests to the service in
//! arrival order; the service hands answers, in commit order, straight to the
//! broker's `$aws` table, from which subscribers' connections write them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use umbra_shadow::http::{ApiState, MqttWebSocket};
use umbra_shadow::store::{CommittedBatch, PostgresConfig, PostgresStore, ShadowStore, StoreError};
use umbra_shadow::tasks;
use umbra_shadow::{ServiceConfig, ShadowMetrics, ShadowService, SqliteStore};

use crate::attach::{self, Attachment};
use crate::config::Config;
use crate::connection::PresenceEvent;
use crate::embedded::{self, EdgeHooks, RunningBroker};
use crate::fanout::Publisher;
use crate::metrics::EdgeMetrics;

/// Presence events that may wait to be recorded.
const PRESENCE_QUEUE: usize = 16_384;

/// Opens the store `config` names: PostgreSQL when `[store] url` is set,
/// otherwise SQLite in the data directory (which must exist). A `server`
/// (with its broker) marks every thing disconnected; an import does not.
pub fn open_store(
    config: &Config,
    metrics: Option<ShadowMetrics>,
    server: bool,
) -> Result<(Arc<dyn ShadowStore>, mpsc::Receiver<CommittedBatch>), StoreError> {
    let limits = config.shadow.clone();
    Ok(match config.store.postgres_config() {
        Some(postgres) => {
            let postgres = PostgresConfig {
                resets_presence: server,
                ..postgres
            };
            let (store, committed) = PostgresStore::open(postgres, limits, metrics)?;
            (Arc::new(store), committed)
        }
        None => {
            let sqlite = config.store.store_config(&config.database_path());
            let (store, committed) = SqliteStore::open_with_metrics(sqlite, limits, metrics)?;
            (Arc::new(store), committed)
        }
    })
}

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
    edge: Edge,
    service: Arc<ShadowService>,
    grace: std::time::Duration,
}

/// Where devices' requests come from.
enum Edge {
    /// Umbra's own broker, with presence from its connections.
    Embedded {
        broker: RunningBroker,
        /// Stops recording presence events.
        presence_stop: CancellationToken,
        presence: JoinHandle<()>,
    },
    /// Another broker, as its client (attach mode).
    Attached(Attachment),
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
        // process_*: resident memory, CPU, open files (and their limit).
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let metrics = ShadowMetrics::register(&registry)?;
        let (store, committed) = open_store(&config, Some(metrics.clone()), true)?;
        let service_config = ServiceConfig {
            limits: config.shadow.clone(),
            ..ServiceConfig::default()
        };
        // Attach mode: the service's answers go to the other broker, in order.
        let attach = match &config.mqtt.attach {
            Some(url) => {
                let client = &config.mqtt.attach_client;
                let address = client.check(url).map_err(|reason| {
                    embedded::StartError::Config(embedded::ConfigError::Attach(reason))
                })?;
                Some((address, client.clone()))
            }
            None => None,
        };
        let publisher = Publisher::new(Arc::new(EdgeMetrics::default()));
        let (service, answers) = match &attach {
            Some(_) => {
                let (service, answers) = ShadowService::start_with_metrics(
                    service_config,
                    store,
                    committed,
                    Some(metrics.clone()),
                );
                (service, Some(answers))
            }
            None => {
                let sink = Arc::new(publisher.clone());
                let service = ShadowService::start_with_sink(
                    service_config,
                    store,
                    committed,
                    Some(metrics.clone()),
                    sink,
                );
                (service, None)
            }
        };
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

        let edge = match (attach, answers) {
            (Some((address, settings)), Some(answers)) => {
                match attach::start(&address, &settings, Arc::clone(&service), answers) {
                    Ok(attachment) => Edge::Attached(attachment),
                    Err(reason) => {
                        service.close().await;
                        return Err(embedded::StartError::Config(embedded::ConfigError::Attach(
                            reason,
                        ))
                        .into());
                    }
                }
            }
            _ => {
                let (presence_tx, presence_rx) = mpsc::channel(PRESENCE_QUEUE);
                let hooks = EdgeHooks {
                    shadow: Arc::clone(&service) as Arc<dyn crate::requests::ShadowRequests>,
                    publisher: publisher.clone(),
                    presence: Some(presence_tx),
                };
                let broker = match embedded::start(config.mqtt.clone(), hooks) {
                    Ok(broker) => broker,
                    Err(err) => {
                        service.close().await;
                        return Err(err.into());
                    }
                };
                registry.register(Box::new(crate::metrics::EdgeCollector::new(
                    broker.metrics(),
                )?))?;
                let presence_stop = CancellationToken::new();
                let presence = tokio::spawn(record_presence(
                    presence_rx,
                    Arc::clone(&service),
                    publisher,
                    presence_stop.clone(),
                ));
                Edge::Embedded {
                    broker,
                    presence_stop,
                    presence,
                }
            }
        };

        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        let mut api = ApiState::new(
            Arc::clone(&service),
            config.http.clone(),
            registry,
            ready_rx,
        )
        .with_metrics(metrics);
        if let (Edge::Embedded { broker, .. }, Some(listener)) = (&edge, &config.mqtt.websocket) {
            if let Some(addr) = broker.addrs().websocket {
                api = api.with_mqtt_web_socket(MqttWebSocket {
                    port: addr.port(),
                    tls: listener.tls.is_some(),
                });
            }
        }
        let http_stop = CancellationToken::new();
        let stopped = http_stop.clone();
        let http = tokio::spawn(umbra_shadow::http::serve(http_listener, api, async move {
            stopped.cancelled().await;
        }));
        // Ready once the store, the broker and the fleet index are up (and,
        // attached, while the other broker hands requests over).
        let fleet = Arc::clone(service.fleet());
        let subscribed = match &edge {
            Edge::Attached(attachment) => Some(attachment.subscribed()),
            Edge::Embedded { .. } => None,
        };
        let readiness = tokio::spawn(async move {
            fleet.wait_loaded().await;
            if let Some(mut subscribed) = subscribed {
                loop {
                    if subscribed.wait_for(|s| *s).await.is_err() {
                        break;
                    }
                    let _ = ready_tx.send(true);
                    if subscribed.wait_for(|s| !*s).await.is_err() {
                        break;
                    }
                    let _ = ready_tx.send(false);
                }
            }
            let _ = ready_tx.send(true);
            // Keep the sender so that /readyz keeps answering until shutdown.
            std::future::pending::<()>().await;
        });

        let server = Server {
            http_addr,
            http_stop,
            http,
            readiness,
            edge,
            service,
            grace: config.shutdown_grace(),
        };
        info!(addrs = ?server.addrs(), "umbra started");
        Ok(server)
    }

    /// Where it listens (no MQTT addresses in attach mode).
    pub fn addrs(&self) -> ServerAddrs {
        let a = match &self.edge {
            Edge::Embedded { broker, .. } => broker.addrs(),
            Edge::Attached(_) => embedded::ListenerAddrs::default(),
        };
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

    /// The embedded broker; `None` in attach mode.
    pub fn broker(&self) -> Option<&RunningBroker> {
        match &self.edge {
            Edge::Embedded { broker, .. } => Some(broker),
            Edge::Attached(_) => None,
        }
    }

    /// Stops accepting connections, handles and commits every request that
    /// had arrived, publishes their answers, then closes every connection.
    pub async fn shutdown(mut self) {
        // HTTP first: its in-flight requests finish (the service still runs)
        // and its change streams end.
        self.http_stop.cancel();
        if let Some(Err(err)) = tasks::joined("http api", (&mut self.http).await) {
            error!(cause = %err, "http api failed");
        }
        self.readiness.abort();
        match self.edge {
            Edge::Embedded {
                mut broker,
                presence_stop,
                presence,
            } => {
                broker.stop_accepting().await;
                // Requests already submitted are committed and answered (into
                // the connections' mailboxes) before the store stops; one that
                // arrives after that is answered 500.
                self.service.close().await;
                presence_stop.cancel();
                tasks::joined("presence recorder", presence.await);
                // Each connection writes what its mailbox holds, then closes.
                broker.shutdown(self.grace).await;
            }
            Edge::Attached(attachment) => {
                // The broker sends further requests to the other nodes; those
                // already taken are committed, answered and acknowledged.
                attachment.stop_taking();
                self.service.close().await;
                attachment.shutdown(self.grace).await;
            }
        }
        info!("umbra stopped");
    }
}

/// Records connects and disconnects in the store and publishes AWS presence
/// events. A disconnect of a connection that a newer one replaced is stale
/// and ignored.
async fn record_presence(
    mut events: mpsc::Receiver<PresenceEvent>,
    service: Arc<ShadowService>,
    publisher: Publisher,
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
        if let Err(err) = publisher.publish(&topic, Bytes::from(event.to_string())) {
            warn!(cause = %err, client_id, "presence event not published");
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
