//! The PostgreSQL store: the same jobs, group commit and change log as the
//! SQLite store, in a database that several Umbra nodes may write at once.
//!
//! What keeps several writers correct:
//! - A batch first takes a transaction-scoped advisory lock for every shadow
//!   and thing it touches, in one sorted order (so two nodes' batches never
//!   deadlock), then reads those shadows. Each shadow is read, changed and
//!   written under its lock: its version never repeats or skips, whichever
//!   node commits.
//! - The change log's sequence comes from one counter row, taken last and
//!   held until commit. Change log entries are therefore committed in
//!   sequence order, without gaps: a reader that has seen sequence N has
//!   seen every change up to N.
//!
//! The driver is `tokio-postgres` with a `deadpool` pool of readers, on a
//! small runtime of the store's own (the service calls the store from
//! blocking threads, as it does SQLite).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, IsolationLevel, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{
    change_entry_bytes, committed, fill_batch, now_ms, plan_prune, record_commit, Change,
    ChangeKind, ChangeLogBounds, CommittedBatch, Connectivity, Done, Followed, Job, JobQueue,
    Pruned, ShadowRow, ShadowStore, SnapshotPart, StoreError, COMMITTED_BACKLOG, PRUNE_STEP,
    RETENTION_EVERY, SNAPSHOT_PART,
};
use crate::document::{ShadowState, Timestamp};
use crate::engine::{self, Command, StoredShadow};
use crate::limits::Limits;
use crate::metrics::ShadowMetrics;
use crate::topic::ShadowKey;

/// Settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database` or a key=value string.
    pub url: String,
    /// Most jobs committed in one transaction.
    pub max_batch: usize,
    /// Jobs that may wait for the writer; beyond that `submit` answers `Busy`.
    pub queue_capacity: usize,
    /// How long change log entries are kept.
    pub change_retention: Duration,
    /// The most bytes the change log keeps; the oldest go first.
    pub change_retention_bytes: u64,
    /// Connections for reads (the writer has one of its own).
    pub readers: usize,
    /// Whether this process's broker is where the database's things
    /// connect: then whatever the database says is connected is not, at
    /// open (a server; not an import).
    pub resets_presence: bool,
    /// The CA certificates (PEM) that signed the server's certificate:
    /// with them, the store speaks only TLS and verifies the server,
    /// its name included. Without them, no TLS.
    pub ca_file: Option<PathBuf>,
}

impl PostgresConfig {
    pub fn new(url: impl Into<String>) -> PostgresConfig {
        let d = super::StoreConfig::new("");
        PostgresConfig {
            url: url.into(),
            max_batch: d.max_batch,
            queue_capacity: d.queue_capacity,
            change_retention: d.change_retention,
            change_retention_bytes: d.change_retention_bytes,
            readers: 8,
            resets_presence: true,
            ca_file: None,
        }
    }
}

impl PostgresConfig {
    /// Checks the URL before anything connects: that it parses, and that
    /// it does not send a password in the clear to another machine. With
    /// `tls` (a CA file is set) any host is taken; without it, only a Unix
    /// socket or a loopback address, unless `allow_plaintext` says otherwise.
    pub fn check_url(url: &str, allow_plaintext: bool, tls: bool) -> Result<(), String> {
        let pg: tokio_postgres::Config = url.parse().map_err(|err| format!("{err}"))?;
        if pg.get_ssl_mode() == SslMode::Require && !tls {
            return Err(
                "sslmode=require needs [store] ca_file, the CA certificates to verify the server with"
                    .into(),
            );
        }
        if allow_plaintext || tls {
            return Ok(());
        }
        let remote: Vec<String> = pg
            .get_hosts()
            .iter()
            .filter_map(|host| match host {
                Host::Tcp(name) if !is_loopback(name) => Some(name.clone()),
                _ => None,
            })
            .chain(
                pg.get_hostaddrs()
                    .iter()
                    .filter(|addr| !addr.is_loopback())
                    .map(|addr| addr.to_string()),
            )
            .collect();
        match remote.as_slice() {
            [] => Ok(()),
            hosts => Err(format!(
                "{} is not this machine, and without [store] ca_file Umbra connects to \
                 PostgreSQL without TLS; set ca_file (the CA that signed the server's \
                 certificate), use a Unix socket or a loopback address, or set \
                 [store] allow_plaintext = true on a network you trust",
                hosts.join(", ")
            )),
        }
    }
}

/// How this node reaches PostgreSQL: the parsed URL, and TLS when the
/// settings name a CA (then required, and the server verified by it).
#[derive(Clone)]
struct Connector {
    pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl Connector {
    fn new(url: &str, ca_file: Option<&Path>) -> Result<Connector, StoreError> {
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|err| StoreError::Postgres(format!("store url: {err}")))?;
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                pg.ssl_mode(SslMode::Require);
                let unreadable = |err: &dyn std::fmt::Display| {
                    StoreError::Postgres(format!("store ca_file {}: {err}", path.display()))
                };
                let pem = std::fs::read(path).map_err(|err| unreadable(&err))?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|err| unreadable(&err))?;
                    roots.add(cert).map_err(|err| unreadable(&err))?;
                }
                if roots.is_empty() {
                    return Err(unreadable(&"no certificate in it"));
                }
            }
            // Never a TLS connection that verifies nothing.
            None => {
                pg.ssl_mode(SslMode::Disable);
            }
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Connector {
            pg,
            tls: MakeRustlsConnect::new(tls),
        })
    }

    /// A connection of its own, driven on the current runtime.
    async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = self.pg.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                warn!(cause = %err, "postgresql connection ended");
            }
        });
        Ok(client)
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The schema, one migration per step; a database records the steps it has
/// (`umbra_schema`) and a start applies the ones it lacks. Names and thing
/// names sort bytewise (`COLLATE "C"`), as they do in SQLite and Rust.
const MIGRATIONS: &[&str] = &["
CREATE TABLE shadows (
    thing      TEXT COLLATE \"C\" NOT NULL,
    name       TEXT COLLATE \"C\" NOT NULL,   -- '' is the classic shadow
    version    BIGINT NOT NULL,
    deleted    BOOLEAN NOT NULL,
    state      TEXT NOT NULL,                -- {\"desired\":..,\"reported\":..}
    metadata   TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (thing, name)
);
CREATE TABLE changes (
    seq      BIGINT PRIMARY KEY,
    thing    TEXT COLLATE \"C\" NOT NULL,
    name     TEXT COLLATE \"C\" NOT NULL,
    version  BIGINT NOT NULL,
    kind     TEXT NOT NULL,
    time     BIGINT NOT NULL,
    document TEXT NOT NULL
);
CREATE INDEX changes_by_shadow ON changes (thing, name, version);
-- One row: the last sequence assigned and the log's bytes. Its row lock
-- orders every commit that writes the log.
CREATE TABLE change_log (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    last_seq BIGINT NOT NULL,
    bytes    BIGINT NOT NULL
);
INSERT INTO change_log (last_seq, bytes) VALUES (0, 0);
CREATE TABLE things (
    thing        TEXT COLLATE \"C\" PRIMARY KEY,
    connected    BOOLEAN NOT NULL,
    last_seen_ms BIGINT NOT NULL
);
"];

/// The advisory lock that lets one node at a time migrate the schema.
const MIGRATION_LOCK: i64 = 0x756d_6272_615f_6d69; // "umbra_mi"

/// The PostgreSQL implementation of [`ShadowStore`].
pub struct PostgresStore {
    /// Runs the writer and the pool's connections; shut down at close.
    runtime: Mutex<Option<StoreRuntime>>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    queue: JobQueue,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Every writer's changes, in sequence order, until taken by `follow`.
    followed: Mutex<Option<Followed>>,
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Tells the follower to read what is left and stop.
    stop_following: CancellationToken,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, applies the migrations the database lacks and starts the
    /// writer. The receiver yields every batch this node commits, in commit
    /// order. It blocks the calling thread until then (from async code too:
    /// the work runs on the store's own runtime).
    pub fn open(
        config: PostgresConfig,
        limits: Limits,
        metrics: Option<ShadowMetrics>,
    ) -> Result<(PostgresStore, mpsc::Receiver<CommittedBatch>), StoreError> {
        let connector = Connector::new(&config.url, config.ca_file.as_deref())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("umbra-postgres")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let runtime = StoreRuntime(Some(runtime));
        let manager = Manager::from_config(
            connector.pg.clone(),
            connector.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.readers.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|err| StoreError::Postgres(err.to_string()))?;
        let connecting = connector.clone();
        let resets_presence = config.resets_presence;
        let (client, log_bytes, entries, last_seq) = run(&handle, async move {
            let mut client = connecting.connect().await?;
            migrate(&mut client).await?;
            if resets_presence {
                // The broker lives in this process: whatever it had connected
                // when it stopped (or was killed) is not connected now.
                client
                    .execute("UPDATE things SET connected = false WHERE connected", &[])
                    .await?;
            }
            let row = client
                .query_one(
                    "SELECT bytes, last_seq - coalesce((SELECT min(seq) FROM changes), last_seq + 1) + 1,
                            last_seq
                     FROM change_log",
                    &[],
                )
                .await?;
            let (bytes, entries, last): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            Ok::<_, StoreError>((client, bytes, entries, last as u64))
        })?;
        if let Some(metrics) = &metrics {
            metrics.change_log_entries.set(entries);
            metrics.change_log_bytes.set(log_bytes);
        }
        let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity.max(1));
        let (committed_tx, committed_rx) = mpsc::channel(COMMITTED_BACKLOG);
        let writer = Writer {
            client,
            connector: connector.clone(),
            limits,
            max_batch: config.max_batch.max(1),
            retention: config.change_retention,
            retention_bytes: config.change_retention_bytes,
            log_bytes: log_bytes as u64,
            metrics,
        };
        let writer = handle.spawn(writer.run(queue_rx, committed_tx));
        let (followed_tx, followed_rx) = mpsc::channel(FOLLOW_PAGE as usize);
        let stop_following = CancellationToken::new();
        let follower = Follower {
            connector,
            after: last_seq,
            changes: followed_tx,
            stop: stop_following.clone(),
        };
        let follower = handle.spawn(follower.run());
        Ok((
            PostgresStore {
                runtime: Mutex::new(Some(runtime)),
                handle,
                pool,
                queue: JobQueue::new(queue_tx),
                writer: Mutex::new(Some(writer)),
                followed: Mutex::new(Some(Followed {
                    after: last_seq,
                    changes: followed_rx,
                })),
                follower: Mutex::new(Some(follower)),
                stop_following,
            },
            committed_rx,
        ))
    }

    /// Runs `read` with a pooled connection on the store's runtime, and
    /// waits for it.
    fn with_reader<T, F>(
        &self,
        read: impl FnOnce(deadpool_postgres::Client) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send,
    {
        let pool = self.pool.clone();
        run(&self.handle, async move {
            let client = pool
                .get()
                .await
                .map_err(|err| StoreError::Postgres(err.to_string()))?;
            read(client).await
        })
    }
}

/// Runs `work` on the store's runtime and waits for it on this thread,
/// whatever runs here (a blocking thread, a test, async code; a runtime
/// cannot be blocked on from inside another, a channel can).
fn run<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = done_tx.send(work.await);
    });
    done_rx.recv().map_err(|_| StoreError::Closed)?
}

/// Applies the migrations the database lacks, one node at a time.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS umbra_schema (version INTEGER NOT NULL)")
        .await?;
    let applied: i32 = tx
        .query_opt("SELECT version FROM umbra_schema", &[])
        .await?
        .map_or(0, |row| row.get(0));
    let known = MIGRATIONS.len() as i32;
    if applied > known {
        return Err(StoreError::Postgres(format!(
            "the database has schema version {applied}, newer than this umbra knows ({known}); \
             run a newer umbra"
        )));
    }
    for migration in &MIGRATIONS[applied as usize..] {
        tx.batch_execute(migration).await?;
    }
    tx.execute("DELETE FROM umbra_schema", &[]).await?;
    tx.execute("INSERT INTO umbra_schema (version) VALUES ($1)", &[&known])
        .await?;
    tx.commit().await?;
    Ok(())
}

impl ShadowStore for PostgresStore {
    fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.queue.submit(job)
    }

    fn load(&self, key: &ShadowKey) -> Result<Option<StoredShadow>, StoreError> {
        let (thing, name) = (key.thing.clone(), key.name.clone().unwrap_or_default());
        self.with_reader(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT version, deleted, state, metadata, updated_at FROM shadows
                     WHERE thing = $1 AND name = $2",
                    &[&thing, &name],
                )
                .await?;
            row.map(|row| stored_shadow(&row, 0)).transpose()
        })
    }

    fn named_shadows(
        &self,
        thing: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (thing, after) = (thing.to_string(), after.unwrap_or("").to_string());
        let limit = limit as i64;
        self.with_reader(move |client| async move {
            let rows = client
                .query(
                    "SELECT name FROM shadows WHERE thing = $1 AND name > $2 AND NOT deleted
                     ORDER BY name LIMIT $3",
                    &[&thing, &after, &limit],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn connectivity(&self, thing: &str) -> Result<Option<Connectivity>, StoreError> {
        let thing = thing.to_string();
        self.with_reader(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT connected, last_seen_ms FROM things WHERE thing = $1",
                    &[&thing],
                )
                .await?;
            Ok(row.map(|r| Connectivity {
                thing,
                connected: r.get(0),
                last_seen_ms: r.get(1),
            }))
        })
    }

    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let (after, limit) = (after as i64, limit as i64);
        self.with_reader(move |client| async move {
            let rows = client
                .query(
                    "SELECT seq, thing, name, version, kind, time, document FROM changes
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            Ok(rows.iter().map(change_row).collect())
        })
    }

    fn change_log_bounds(&self) -> Result<ChangeLogBounds, StoreError> {
        self.with_reader(|client| async move { change_log_bounds(&client).await })
    }

    fn shadow_changes(
        &self,
        key: &ShadowKey,
        since_version: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        let (thing, name) = (key.thing.clone(), key.name.clone().unwrap_or_default());
        let (since, after, limit) = (since_version as i64, after_seq as i64, limit as i64);
        self.with_reader(move |client| async move {
            let rows = client
                .query(
                    "SELECT seq, thing, name, version, kind, time, document FROM changes
                     WHERE thing = $1 AND name = $2
                       AND (version > $3 OR (version = $3 AND kind = 'delete'))
                       AND seq > $4
                     ORDER BY seq LIMIT $5",
                    &[&thing, &name, &since, &after, &limit],
                )
                .await?;
            Ok(rows.iter().map(change_row).collect())
        })
    }

    fn fleet_snapshot(&self, each: &mut dyn FnMut(SnapshotPart)) -> Result<u64, StoreError> {
        // The store's runtime reads; this thread takes the parts as they come.
        let (parts_tx, mut parts_rx) = mpsc::channel(2);
        let pool = self.pool.clone();
        let read = self.handle.spawn(async move {
            let mut client = pool
                .get()
                .await
                .map_err(|err| StoreError::Postgres(err.to_string()))?;
            // One repeatable-read transaction: the rows and the sequence are
            // of one instant.
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let through = change_log_bounds(&tx).await?.last;
            let shadows = "SELECT thing, name, version, state FROM shadows WHERE NOT deleted";
            stream_parts(&tx, shadows, SnapshotPart::Shadows, &parts_tx, |r| {
                let name: String = r.get(1);
                ShadowRow {
                    key: ShadowKey {
                        thing: r.get(0),
                        name: (!name.is_empty()).then_some(name),
                    },
                    version: r.get::<_, i64>(2) as u64,
                    state: r.get(3),
                }
            })
            .await?;
            let things = "SELECT thing, connected, last_seen_ms FROM things";
            stream_parts(&tx, things, SnapshotPart::Things, &parts_tx, |r| {
                Connectivity {
                    thing: r.get(0),
                    connected: r.get(1),
                    last_seen_ms: r.get(2),
                }
            })
            .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(through)
        });
        while let Some(part) = parts_rx.blocking_recv() {
            each(part);
        }
        run(&self.handle, async move {
            read.await.map_err(|_| StoreError::WriterFailed)?
        })
    }

    fn close(&self) -> Result<(), StoreError> {
        self.queue.close();
        let writer = self
            .writer
            .lock()
            .map_err(|_| StoreError::WriterFailed)?
            .take();
        let stopped = match writer {
            Some(writer) => run(&self.handle, async move {
                writer.await.map_err(|err| {
                    error!(cause = %err, "store writer failed");
                    StoreError::WriterFailed
                })
            }),
            None => Ok(()),
        };
        // The writer's last changes are in the log: the follower reads them
        // and stops.
        self.stop_following.cancel();
        let follower = self.follower.lock().ok().and_then(|mut f| f.take());
        if let Some(follower) = follower {
            let _ = run(&self.handle, async move {
                follower.await.map_err(|_| StoreError::WriterFailed)
            });
        }
        self.pool.close();
        // Dropping it shuts it down.
        self.runtime.lock().ok().and_then(|mut r| r.take());
        stopped
    }

    fn follow(&self) -> Option<Followed> {
        self.followed.lock().ok().and_then(|mut f| f.take())
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Err(err) = self.close() {
            error!(cause = %err, "store writer did not stop cleanly");
        }
    }
}

/// The store's own runtime. Dropped, it shuts down without waiting for its
/// tasks: a runtime dropped the ordinary way from async code (a server
/// whose store failed to open, say) would panic.
struct StoreRuntime(Option<tokio::runtime::Runtime>);

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The writer task: owns the only write connection of this node.
struct Writer {
    client: Client,
    connector: Connector,
    limits: Limits,
    max_batch: usize,
    retention: Duration,
    retention_bytes: u64,
    /// The change log's bytes as this node last saw them committed (other
    /// nodes add to them too; the database's count is the one that counts).
    log_bytes: u64,
    metrics: Option<ShadowMetrics>,
}

impl Writer {
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<Job>,
        committed: mpsc::Sender<CommittedBatch>,
    ) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut last_check = std::time::Instant::now();
        let mut pruning = true;
        loop {
            let job = if pruning {
                match queue.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        pruning = self.prune_step().await;
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                match queue.recv().await {
                    Some(job) => job,
                    None => break,
                }
            };
            batch.push(job);
            fill_batch(&mut queue, &mut batch, self.max_batch);
            let results = self.commit(std::mem::take(&mut batch)).await;
            if committed.send(results).await.is_err() {
                warn!("nobody takes committed answers any more");
            }
            if self.log_bytes > self.retention_bytes || last_check.elapsed() >= RETENTION_EVERY {
                last_check = std::time::Instant::now();
                pruning = true;
            }
            if pruning {
                pruning = self.prune_step().await;
            }
        }
    }

    /// A new connection when the old one is gone (the database restarted,
    /// say): the next batch then commits instead of failing too.
    async fn reconnect_if_closed(&mut self) {
        if !self.client.is_closed() {
            return;
        }
        match self.connector.connect().await {
            Ok(client) => self.client = client,
            Err(err) => warn!(cause = %err, "store writer cannot reconnect to postgresql"),
        }
    }

    /// Applies a batch in one transaction. If the transaction fails, every
    /// shadow job in it is answered 500 and nothing of it is kept.
    async fn commit(&mut self, jobs: Vec<Job>) -> CommittedBatch {
        self.reconnect_if_closed().await;
        let now = now_ms() / 1000;
        let started = std::time::Instant::now();
        let applied = self.apply_all(&jobs, now).await;
        record_commit(self.metrics.as_ref(), started, jobs.len(), &applied);
        committed(jobs, applied)
    }

    async fn apply_all(&mut self, jobs: &[Job], now: Timestamp) -> Result<Vec<Done>, StoreError> {
        let tx = self.client.transaction().await?;
        lock_all(&tx, jobs).await?;
        let mut shadows = read_shadows(&tx, jobs).await?;
        let mut things = read_things(&tx, jobs).await?;
        let mut written: HashMap<ShadowKey, StoredShadow> = HashMap::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
            outcomes.push(match job {
                Job::Shadow { key, command, .. } => {
                    apply_shadow(&mut shadows, &mut written, key, command, now, &self.limits)
                }
                Job::Presence {
                    thing,
                    connected,
                    at_ms,
                    reason,
                } => {
                    let presence = Connectivity {
                        thing: thing.clone(),
                        connected: *connected,
                        last_seen_ms: *at_ms,
                    };
                    things.insert(thing.clone(), (Some(presence), true));
                    let kind = if *connected {
                        ChangeKind::Connect
                    } else {
                        ChangeKind::Disconnect
                    };
                    let mut document = json!({ "connected": connected, "timestamp": at_ms });
                    if let (Some(reason), Value::Object(map)) = (reason, &mut document) {
                        map.insert("disconnectReason".into(), reason.clone().into());
                    }
                    let key = ShadowKey::classic(thing.clone());
                    (None, Some(change(&key, 0, kind, now, document.to_string())))
                }
                Job::Forget { thing, .. } => {
                    let known = things.get(thing).is_some_and(|(c, _)| c.is_some());
                    let change = known.then(|| {
                        things.insert(thing.clone(), (None, true));
                        let key = ShadowKey::classic(thing.clone());
                        change(&key, 0, ChangeKind::Forget, now, "{}".to_owned())
                    });
                    (None, change)
                }
            });
        }
        write_shadows(&tx, &written).await?;
        write_things(&tx, &things).await?;
        let changes: Vec<&mut Change> = outcomes
            .iter_mut()
            .filter_map(|(_, change)| change.as_mut())
            .collect();
        let log_bytes = log_changes(&tx, changes).await?;
        tx.commit().await?;
        if let Some(log_bytes) = log_bytes {
            self.log_bytes = log_bytes;
            if let Some(metrics) = &self.metrics {
                metrics.change_log_bytes.set(log_bytes as i64);
            }
        }
        Ok(outcomes)
    }

    async fn prune_step(&mut self) -> bool {
        match self.prune().await {
            Ok(more) => more,
            Err(err) => {
                error!(cause = %err, "could not prune the change log");
                false
            }
        }
    }

    /// Drops up to [`PRUNE_STEP`] of the oldest change log entries: as many
    /// as bring the log within its size, and those older than the window.
    /// Returns whether more may be due.
    async fn prune(&mut self) -> Result<bool, StoreError> {
        self.reconnect_if_closed().await;
        let cutoff = now_ms() / 1000 - self.retention.as_secs() as i64;
        let tx = self.client.transaction().await?;
        // The counter row first: nodes prune one at a time, from one count.
        let log_bytes: i64 = tx
            .query_one("SELECT bytes FROM change_log FOR UPDATE", &[])
            .await?
            .get(0);
        let excess = (log_bytes as u64).saturating_sub(self.retention_bytes);
        let oldest = tx
            .query(
                "SELECT seq, time, octet_length(thing) + octet_length(name)
                        + octet_length(document) + 64
                 FROM changes ORDER BY seq LIMIT $1",
                &[&(PRUNE_STEP as i64)],
            )
            .await?;
        let oldest = oldest
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get::<_, i32>(2) as u64));
        let Some(Pruned {
            last,
            freed,
            dropped,
        }) = plan_prune(oldest, excess, cutoff)
        else {
            self.log_bytes = log_bytes as u64;
            return Ok(false);
        };
        tx.execute("DELETE FROM changes WHERE seq <= $1", &[&last])
            .await?;
        let log_bytes: i64 = tx
            .query_one(
                "UPDATE change_log SET bytes = greatest(bytes - $1, 0) RETURNING bytes",
                &[&(freed as i64)],
            )
            .await?
            .get(0);
        tx.commit().await?;
        self.log_bytes = log_bytes as u64;
        if let Some(metrics) = &self.metrics {
            metrics.change_log_entries.sub(dropped as i64);
            metrics.change_log_bytes.set(log_bytes);
        }
        Ok(dropped == PRUNE_STEP)
    }
}

/// The channel a commit that logged changes notifies.
const NOTIFY_CHANNEL: &str = "umbra_changes";
/// Change log entries the follower reads at a time.
const FOLLOW_PAGE: i64 = 1024;
/// How often the follower reads the log without being notified (a
/// notification is lost while its connection is down).
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// Reads the change log as every node appends to it, in sequence order,
/// and hands each change on: this node's change stream and fleet index
/// then see every node's changes, each once and in order (sequences are
/// committed in order and without gaps, see the module's notes).
struct Follower {
    connector: Connector,
    /// The last sequence handed on.
    after: u64,
    changes: mpsc::Sender<Change>,
    stop: CancellationToken,
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow().await {
                Ok(()) => return,
                Err(err) => {
                    warn!(cause = %err, "change log follower lost postgresql; reconnecting")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Listens and reads until told to stop (then reads what is left) or
    /// until nobody takes changes; an error when the connection fails.
    async fn follow(&mut self) -> Result<(), StoreError> {
        let connector = &self.connector;
        let (client, mut connection) = connector.pg.connect(connector.tls.clone()).await?;
        let notified = Arc::new(tokio::sync::Notify::new());
        let wake = Arc::clone(&notified);
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(_) = message {
                    wake.notify_one();
                }
            }
            // The connection ended: the reader's next query fails.
            wake.notify_one();
        });
        client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .await?;
        loop {
            let stopping = self.stop.is_cancelled();
            if !self.read(&client).await? || stopping {
                return Ok(());
            }
            tokio::select! {
                _ = notified.notified() => {}
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
                _ = self.stop.cancelled() => {}
            }
        }
    }

    /// Hands on every change after `after`; false when nobody takes them.
    async fn read(&mut self, client: &Client) -> Result<bool, StoreError> {
        loop {
            let rows = client
                .query(
                    "SELECT seq, thing, name, version, kind, time, document FROM changes
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&(self.after as i64), &FOLLOW_PAGE],
                )
                .await?;
            for row in &rows {
                let change = change_row(row);
                if change.seq != self.after + 1 {
                    warn!(
                        after = self.after,
                        next = change.seq,
                        "the change log was pruned past what this node had read; \
                         its fleet index may miss changes until restart"
                    );
                }
                self.after = change.seq;
                if self.changes.send(change).await.is_err() {
                    return Ok(false);
                }
            }
            if (rows.len() as i64) < FOLLOW_PAGE {
                return Ok(true);
            }
        }
    }
}

/// The advisory lock of a shadow or of a thing's connectivity: the first 8
/// bytes of a SHA-256 of its kind and names, the same on every node.
fn lock_key(job: &Job) -> Option<i64> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    match job {
        Job::Shadow { key, command, .. } => {
            if matches!(command, Command::Refused { .. }) {
                return None;
            }
            digest.update(b"shadow\0");
            digest.update(key.thing.as_bytes());
            digest.update(b"\0");
            digest.update(key.name.as_deref().unwrap_or("").as_bytes());
        }
        Job::Presence { thing, .. } | Job::Forget { thing, .. } => {
            digest.update(b"thing\0");
            digest.update(thing.as_bytes());
        }
    }
    let hash = digest.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_ref()[..8]);
    Some(i64::from_be_bytes(first))
}

/// Takes the batch's locks, in ascending order on every node.
async fn lock_all(tx: &Transaction<'_>, jobs: &[Job]) -> Result<(), StoreError> {
    let mut keys: Vec<i64> = jobs.iter().filter_map(lock_key).collect();
    keys.sort_unstable();
    keys.dedup();
    if !keys.is_empty() {
        tx.execute(
            "SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) WITH ORDINALITY AS l(k, i)
             ORDER BY i",
            &[&keys],
        )
        .await?;
    }
    Ok(())
}

/// The stored shadows the batch's shadow jobs name (`None`: none stored).
async fn read_shadows(
    tx: &Transaction<'_>,
    jobs: &[Job],
) -> Result<HashMap<ShadowKey, Option<StoredShadow>>, StoreError> {
    let mut shadows: HashMap<ShadowKey, Option<StoredShadow>> = HashMap::new();
    for job in jobs {
        if let Job::Shadow { key, command, .. } = job {
            if !matches!(command, Command::Refused { .. }) {
                shadows.entry(key.clone()).or_insert(None);
            }
        }
    }
    if shadows.is_empty() {
        return Ok(shadows);
    }
    let things: Vec<&str> = shadows.keys().map(|k| k.thing.as_str()).collect();
    let names: Vec<&str> = shadows
        .keys()
        .map(|k| k.name.as_deref().unwrap_or(""))
        .collect();
    let rows = tx
        .query(
            "SELECT s.version, s.deleted, s.state, s.metadata, s.updated_at, s.thing, s.name
             FROM unnest($1::text[], $2::text[]) AS k(thing, name)
             JOIN shadows s ON s.thing = k.thing AND s.name = k.name",
            &[&things, &names],
        )
        .await?;
    for row in &rows {
        let name: String = row.get(6);
        let key = ShadowKey {
            thing: row.get(5),
            name: (!name.is_empty()).then_some(name),
        };
        shadows.insert(key, Some(stored_shadow(row, 0)?));
    }
    Ok(shadows)
}

/// Connectivity of the things the batch's presence and forget jobs name,
/// each with whether the batch changed it (not yet).
type Things = HashMap<String, (Option<Connectivity>, bool)>;

async fn read_things(tx: &Transaction<'_>, jobs: &[Job]) -> Result<Things, StoreError> {
    let names: Vec<&str> = jobs
        .iter()
        .filter_map(|job| match job {
            Job::Presence { thing, .. } | Job::Forget { thing, .. } => Some(thing.as_str()),
            Job::Shadow { .. } => None,
        })
        .collect();
    let mut things: Things = names
        .iter()
        .map(|t| (t.to_string(), (None, false)))
        .collect();
    if names.is_empty() {
        return Ok(things);
    }
    let rows = tx
        .query(
            "SELECT thing, connected, last_seen_ms FROM things WHERE thing = ANY($1)",
            &[&names],
        )
        .await?;
    for row in &rows {
        let thing: String = row.get(0);
        let connectivity = Connectivity {
            thing: thing.clone(),
            connected: row.get(1),
            last_seen_ms: row.get(2),
        };
        things.insert(thing, (Some(connectivity), false));
    }
    Ok(things)
}

/// Applies one shadow job to the batch's view of its shadow.
fn apply_shadow(
    shadows: &mut HashMap<ShadowKey, Option<StoredShadow>>,
    written: &mut HashMap<ShadowKey, StoredShadow>,
    key: &ShadowKey,
    command: &Command,
    now: Timestamp,
    limits: &Limits,
) -> Done {
    if let Command::Refused { refused, .. } = command {
        // Queued only for its place in line: nothing to read or write.
        return (Some(Err(refused.rejection.clone())), None);
    }
    let stored = shadows.get(key).and_then(Option::as_ref);
    let applied = match engine::apply(key, stored, command, now, limits) {
        Ok(applied) => applied,
        Err(rejection) => return (Some(Err(rejection)), None),
    };
    let Some(shadow) = applied.store else {
        return (Some(Ok(applied.outcome)), None);
    };
    let version = shadow.version;
    let change = if shadow.deleted {
        let document = format!(r#"{{"version":{version}}}"#);
        change(key, version, ChangeKind::Delete, now, document)
    } else {
        let (state, metadata) = (shadow.state.state_json(), shadow.state.metadata_json());
        let document = format!(r#"{{"state":{state},"metadata":{metadata},"version":{version}}}"#);
        Change {
            state: Some(Arc::clone(&shadow.state)),
            ..change(key, version, ChangeKind::Update, now, document)
        }
    };
    shadows.insert(key.clone(), Some(shadow.clone()));
    written.insert(key.clone(), shadow);
    (Some(Ok(applied.outcome)), Some(change))
}

/// A change log entry before the log gives it its sequence.
fn change(
    key: &ShadowKey,
    version: u64,
    kind: ChangeKind,
    now: Timestamp,
    document: String,
) -> Change {
    Change {
        seq: 0,
        thing: key.thing.clone(),
        name: key.name.clone(),
        version,
        kind,
        time: now,
        document,
        state: None,
    }
}

/// Writes the batch's shadows as they ended, in one statement.
async fn write_shadows(
    tx: &Transaction<'_>,
    written: &HashMap<ShadowKey, StoredShadow>,
) -> Result<(), StoreError> {
    if written.is_empty() {
        return Ok(());
    }
    let mut columns = ShadowColumns::default();
    for (key, shadow) in written {
        columns.thing.push(&key.thing);
        columns.name.push(key.name.as_deref().unwrap_or(""));
        columns.version.push(shadow.version as i64);
        columns.deleted.push(shadow.deleted);
        columns.state.push(shadow.state.state_json());
        columns.metadata.push(shadow.state.metadata_json());
        columns.updated_at.push(shadow.updated_at);
    }
    tx.execute(
        "INSERT INTO shadows (thing, name, version, deleted, state, metadata, updated_at)
         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::bool[], $5::text[],
                              $6::text[], $7::int8[])
         ON CONFLICT (thing, name) DO UPDATE SET version = excluded.version,
         deleted = excluded.deleted, state = excluded.state,
         metadata = excluded.metadata, updated_at = excluded.updated_at",
        &[
            &columns.thing,
            &columns.name,
            &columns.version,
            &columns.deleted,
            &columns.state,
            &columns.metadata,
            &columns.updated_at,
        ],
    )
    .await?;
    Ok(())
}

#[derive(Default)]
struct ShadowColumns<'a> {
    thing: Vec<&'a str>,
    name: Vec<&'a str>,
    version: Vec<i64>,
    deleted: Vec<bool>,
    state: Vec<String>,
    metadata: Vec<String>,
    updated_at: Vec<i64>,
}

/// Writes the connectivity the batch changed: recorded or forgotten.
async fn write_things(tx: &Transaction<'_>, things: &Things) -> Result<(), StoreError> {
    let (mut seen, mut forgotten) = (Vec::new(), Vec::new());
    for (thing, (connectivity, changed)) in things {
        match (connectivity, changed) {
            (_, false) => {}
            (Some(c), true) => seen.push(c),
            (None, true) => forgotten.push(thing.as_str()),
        }
    }
    if !seen.is_empty() {
        let names: Vec<&str> = seen.iter().map(|c| c.thing.as_str()).collect();
        let connected: Vec<bool> = seen.iter().map(|c| c.connected).collect();
        let at: Vec<i64> = seen.iter().map(|c| c.last_seen_ms).collect();
        tx.execute(
            "INSERT INTO things (thing, connected, last_seen_ms)
             SELECT * FROM unnest($1::text[], $2::bool[], $3::int8[])
             ON CONFLICT (thing) DO UPDATE SET connected = excluded.connected,
             last_seen_ms = excluded.last_seen_ms",
            &[&names, &connected, &at],
        )
        .await?;
    }
    if !forgotten.is_empty() {
        tx.execute("DELETE FROM things WHERE thing = ANY($1)", &[&forgotten])
            .await?;
    }
    Ok(())
}

/// Gives the batch's changes their sequence numbers and writes them. Takes
/// the counter row last, so that it is held only for this and the commit.
/// Returns the log's bytes after them, when there were any.
async fn log_changes(
    tx: &Transaction<'_>,
    mut changes: Vec<&mut Change>,
) -> Result<Option<u64>, StoreError> {
    if changes.is_empty() {
        return Ok(None);
    }
    let bytes: u64 = changes
        .iter()
        .map(|c| change_entry_bytes(&c.thing, c.name.as_deref(), &c.document))
        .sum();
    let row = tx
        .query_one(
            "UPDATE change_log SET last_seq = last_seq + $1, bytes = bytes + $2
             RETURNING last_seq, bytes",
            &[&(changes.len() as i64), &(bytes as i64)],
        )
        .await?;
    let (last, log_bytes): (i64, i64) = (row.get(0), row.get(1));
    let first = last - changes.len() as i64 + 1;
    for (i, change) in changes.iter_mut().enumerate() {
        change.seq = (first + i as i64) as u64;
    }
    let seq: Vec<i64> = changes.iter().map(|c| c.seq as i64).collect();
    let thing: Vec<&str> = changes.iter().map(|c| c.thing.as_str()).collect();
    let name: Vec<&str> = changes
        .iter()
        .map(|c| c.name.as_deref().unwrap_or(""))
        .collect();
    let version: Vec<i64> = changes.iter().map(|c| c.version as i64).collect();
    let kind: Vec<&str> = changes.iter().map(|c| c.kind.as_str()).collect();
    let time: Vec<i64> = changes.iter().map(|c| c.time).collect();
    let document: Vec<&str> = changes.iter().map(|c| c.document.as_str()).collect();
    tx.execute(
        "INSERT INTO changes (seq, thing, name, version, kind, time, document)
         SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::text[],
                              $6::int8[], $7::text[])",
        &[&seq, &thing, &name, &version, &kind, &time, &document],
    )
    .await?;
    // Delivered at commit, to every node's follower.
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&NOTIFY_CHANNEL, &last.to_string()],
    )
    .await?;
    Ok(Some(log_bytes as u64))
}

async fn change_log_bounds(client: &impl GenericClient) -> Result<ChangeLogBounds, StoreError> {
    let row = client
        .query_one(
            "SELECT (SELECT min(seq) FROM changes), last_seq FROM change_log",
            &[],
        )
        .await?;
    let oldest: Option<i64> = row.get(0);
    let last: i64 = row.get(1);
    Ok(ChangeLogBounds {
        oldest: oldest.map(|s| s as u64),
        last: last as u64,
    })
}

/// Sends the rows of `sql` to `parts` as they arrive, in parts of
/// [`SNAPSHOT_PART`].
async fn stream_parts<T>(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    part: impl Fn(Vec<T>) -> SnapshotPart,
    parts: &mpsc::Sender<SnapshotPart>,
    row: impl Fn(&tokio_postgres::Row) -> T,
) -> Result<(), StoreError> {
    let rows = tx
        .query_raw(sql, std::iter::empty::<&(dyn ToSql + Sync)>())
        .await?;
    let mut rows = std::pin::pin!(rows);
    let mut items = Vec::with_capacity(SNAPSHOT_PART);
    while let Some(r) = rows.next().await {
        items.push(row(&r?));
        if items.len() == SNAPSHOT_PART {
            let full = std::mem::replace(&mut items, Vec::with_capacity(SNAPSHOT_PART));
            parts
                .send(part(full))
                .await
                .map_err(|_| StoreError::Closed)?;
        }
    }
    if !items.is_empty() {
        parts
            .send(part(items))
            .await
            .map_err(|_| StoreError::Closed)?;
    }
    Ok(())
}

/// A shadow from the columns `version, deleted, state, metadata,
/// updated_at`, starting at column `at`.
fn stored_shadow(row: &tokio_postgres::Row, at: usize) -> Result<StoredShadow, StoreError> {
    let state: Value = serde_json::from_str(row.get::<_, &str>(at + 2))?;
    let metadata: Value = serde_json::from_str(row.get::<_, &str>(at + 3))?;
    Ok(StoredShadow {
        state: Arc::new(ShadowState::from_values(&state, &metadata)),
        version: row.get::<_, i64>(at) as u64,
        deleted: row.get(at + 1),
        updated_at: row.get(at + 4),
    })
}

fn change_row(r: &tokio_postgres::Row) -> Change {
    let name: String = r.get(2);
    let kind: &str = r.get(4);
    Change {
        seq: r.get::<_, i64>(0) as u64,
        thing: r.get(1),
        name: (!name.is_empty()).then_some(name),
        version: r.get::<_, i64>(3) as u64,
        kind: ChangeKind::parse(kind).unwrap_or(ChangeKind::Update),
        time: r.get(5),
        document: r.get(6),
        state: None,
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> StoreError {
        // The driver's Display leaves out the server's message; its source has it.
        match std::error::Error::source(&err) {
            Some(cause) => StoreError::Postgres(format!("{err}: {cause}")),
            None => StoreError::Postgres(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_local_server_is_reached_without_tls_unless_allowed() {
        for local in [
            "postgres://u:p@127.0.0.1:5432/db",
            "postgres://u:p@localhost/db",
            "postgres://u:p@[::1]:5432/db",
            "host=/var/run/postgresql user=umbra dbname=umbra",
        ] {
            assert_eq!(
                PostgresConfig::check_url(local, false, false),
                Ok(()),
                "{local}"
            );
        }
        let remote = "postgres://u:p@db.example.com:5432/db";
        let refused = PostgresConfig::check_url(remote, false, false).expect_err("refused");
        assert!(refused.contains("db.example.com"), "{refused}");
        assert!(refused.contains("ca_file"), "{refused}");
        assert!(refused.contains("allow_plaintext"), "{refused}");
        assert_eq!(PostgresConfig::check_url(remote, true, false), Ok(()));
        assert_eq!(PostgresConfig::check_url(remote, false, true), Ok(()));
        assert!(
            PostgresConfig::check_url("host=127.0.0.1 hostaddr=10.0.0.5", false, false).is_err()
        );
        assert!(PostgresConfig::check_url("postgres://u@h:notaport/db", true, false).is_err());
        // TLS that the URL asks for needs a CA to verify the server with.
        let required = "postgres://u:p@127.0.0.1/db?sslmode=require";
        let refused = PostgresConfig::check_url(required, true, false).expect_err("refused");
        assert!(refused.contains("ca_file"), "{refused}");
        assert_eq!(PostgresConfig::check_url(required, false, true), Ok(()));
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = Connector::new("postgres://u@127.0.0.1/db", Some(&empty))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("no certificate"), "{err}");
        let missing = dir.path().join("missing.pem");
        assert!(Connector::new("postgres://u@127.0.0.1/db", Some(&missing)).is_err());
    }
}
