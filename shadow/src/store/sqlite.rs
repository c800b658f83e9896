//! The SQLite store: WAL mode, one writer thread with group commit, readers on
//! their own connections.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{error, warn};

use super::{
    change_entry_bytes, committed, fill_batch, now_ms, plan_prune, record_commit, Change,
    ChangeKind, ChangeLogBounds, CommittedBatch, Connectivity, Done, Job, JobQueue, Pruned,
    ShadowRow, ShadowStore, SnapshotPart, StoreError, COMMITTED_BACKLOG, PRUNE_STEP,
    RETENTION_EVERY, SNAPSHOT_PART,
};
use crate::document::{ShadowState, Timestamp};
use crate::engine::{self, Command, Outcome, StoredShadow};
use crate::error::Rejection;
use crate::limits::Limits;
use crate::metrics::ShadowMetrics;
use crate::topic::ShadowKey;

/// How hard SQLite syncs each commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync the WAL on every commit: an acknowledged update survives power loss.
    #[default]
    Full,
    /// fsync only at checkpoints: survives a process crash, not power loss.
    Normal,
}

/// Settings of the SQLite store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The database file.
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// Most jobs committed in one transaction.
    pub max_batch: usize,
    /// Jobs that may wait for the writer; beyond that `submit` answers `Busy`.
    pub queue_capacity: usize,
    /// How long change log entries are kept.
    pub change_retention: Duration,
    /// The most bytes the change log keeps (its entries as
    /// [`change_entry_bytes`] counts them); the oldest go first.
    pub change_retention_bytes: u64,
    /// Shadows the writer keeps decoded in memory, so that an update does not
    /// read and parse its shadow back from SQLite.
    pub cache_shadows: usize,
}

impl StoreConfig {
    pub fn new(path: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            path: path.into(),
            synchronous: Synchronous::Full,
            max_batch: 256,
            queue_capacity: 16_384,
            change_retention: Duration::from_secs(24 * 3600),
            change_retention_bytes: 1 << 30,
            cache_shadows: 100_000,
        }
    }
}

/// Most of the database a fleet read maps into memory at once (SQLite's
/// own ceiling is about 2 GiB); beyond it, pages are read.
const SNAPSHOT_MMAP_BYTES: i64 = 1 << 40;

/// [`change_entry_bytes`] in SQL, over a `changes` row.
const CHANGE_ENTRY_BYTES_SQL: &str = "length(CAST(thing AS BLOB)) + length(CAST(name AS BLOB)) \
     + length(CAST(document AS BLOB)) + 64";

const SCHEMA: &str = "
-- A rowid table, not WITHOUT ROWID: rows carry whole documents (up to a few
-- KiB), and SQLite's WITHOUT ROWID tables suit small rows only.
CREATE TABLE IF NOT EXISTS shadows (
    id         INTEGER PRIMARY KEY,
    thing      TEXT NOT NULL,
    name       TEXT NOT NULL,          -- '' is the classic shadow
    version    INTEGER NOT NULL,
    deleted    INTEGER NOT NULL,
    state      TEXT NOT NULL,          -- {\"desired\":..,\"reported\":..}
    metadata   TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (thing, name)
);
CREATE TABLE IF NOT EXISTS changes (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    thing    TEXT NOT NULL,
    name     TEXT NOT NULL,
    version  INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    time     INTEGER NOT NULL,
    document TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_shadow ON changes (thing, name, version);
-- Counters kept in step with the tables they describe.
CREATE TABLE IF NOT EXISTS store_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS things (
    thing        TEXT PRIMARY KEY,
    connected    INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// The SQLite implementation of [`ShadowStore`].
pub struct SqliteStore {
    /// The database's lock, held until the store is closed.
    lock: Mutex<Option<std::fs::File>>,
    queue: JobQueue,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Copies the database at `from` to `to` while it is in use: SQLite's
/// online backup in one step, under one read transaction, so the copy is
/// the database as of one commit (in WAL mode the writer goes on
/// meanwhile). The copy is written beside `to` and renamed over it once
/// complete and synced, so `to` is never a partial copy. Returns the pages
/// copied.
pub fn backup(from: &Path, to: &Path) -> Result<i32, StoreError> {
    let source = Connection::open_with_flags(
        from,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    source.busy_timeout(Duration::from_secs(5))?;
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let _stale = std::fs::remove_file(&partial);
    let pages = {
        let mut copy = Connection::open(&partial)?;
        let backup = rusqlite::backup::Backup::new(&source, &mut copy)?;
        // -1: every page in one step (one read transaction). Busy only
        // while another connection holds a lock the read must wait for.
        while backup.step(-1)? != rusqlite::backup::StepResult::Done {
            std::thread::sleep(Duration::from_millis(10));
        }
        let pages = backup.progress().pagecount;
        drop(backup);
        // A single file: the copy keeps no WAL of its own.
        copy.pragma_update(None, "journal_mode", "DELETE")?;
        pages
    };
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, to)?;
    Ok(pages)
}

impl SqliteStore {
    /// Opens (creating if needed) the database and starts the writer thread.
    /// The receiver yields every committed batch in commit order.
    pub fn open(
        config: StoreConfig,
        limits: Limits,
    ) -> Result<(SqliteStore, mpsc::Receiver<CommittedBatch>), StoreError> {
        SqliteStore::open_with_metrics(config, limits, None)
    }

    /// [`SqliteStore::open`], with the writer recording commit latency, batch
    /// sizes and the change log's size on `metrics`.
    pub fn open_with_metrics(
        config: StoreConfig,
        limits: Limits,
        metrics: Option<ShadowMetrics>,
    ) -> Result<(SqliteStore, mpsc::Receiver<CommittedBatch>), StoreError> {
        let lock = lock_database(&config.path)?;
        let conn = Connection::open(&config.path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match config.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        // The writer's page cache: enough to keep the hot part of the shadow
        // table and its indexes in memory (negative = KiB).
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // The broker lives in this process: whatever was connected when the
        // previous process stopped (or was killed) is not connected now.
        conn.execute("UPDATE things SET connected = 0 WHERE connected = 1", [])?;
        if let Some(metrics) = &metrics {
            // Sequences are contiguous and trimmed from the front, so the
            // span is the count, without scanning the log.
            let entries: i64 = conn.query_row(
                "SELECT coalesce(max(seq) - min(seq) + 1, 0) FROM changes",
                [],
                |r| r.get(0),
            )?;
            metrics.change_log_entries.set(entries);
        }
        let log_bytes = change_log_bytes(&conn)?;
        if let Some(metrics) = &metrics {
            metrics.change_log_bytes.set(log_bytes as i64);
        }

        let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity.max(1));
        let (committed_tx, committed_rx) = mpsc::channel(COMMITTED_BACKLOG);
        let writer = Writer {
            conn,
            limits,
            max_batch: config.max_batch.max(1),
            retention: config.change_retention,
            retention_bytes: config.change_retention_bytes,
            log_bytes,
            cache: HashMap::new(),
            cache_capacity: config.cache_shadows,
            metrics,
        };
        let handle = std::thread::Builder::new()
            .name("umbra-store-writer".into())
            .spawn(move || writer.run(queue_rx, committed_tx))
            .map_err(|_| StoreError::WriterFailed)?;
        Ok((
            SqliteStore {
                lock: Mutex::new(Some(lock)),
                queue: JobQueue::new(queue_tx),
                writer: Mutex::new(Some(handle)),
                readers: Mutex::new(Vec::new()),
                path: config.path,
            },
            committed_rx,
        ))
    }

    fn with_reader<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self
            .readers
            .lock()
            .map_err(|_| StoreError::WriterFailed)?
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => {
                let conn = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(Duration::from_secs(5))?;
                conn
            }
        };
        let result = read(&conn);
        if let Ok(mut pool) = self.readers.lock() {
            pool.push(conn);
        }
        result
    }
}

impl ShadowStore for SqliteStore {
    fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.queue.submit(job)
    }

    fn load(&self, key: &ShadowKey) -> Result<Option<StoredShadow>, StoreError> {
        self.with_reader(|conn| load(conn, key))
    }

    fn named_shadows(
        &self,
        thing: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name FROM shadows WHERE thing = ?1 AND name > ?2 AND deleted = 0
                 ORDER BY name LIMIT ?3",
            )?;
            let names = stmt
                .query_map(params![thing, after.unwrap_or(""), limit as i64], |r| {
                    r.get(0)
                })?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(names)
        })
    }

    fn connectivity(&self, thing: &str) -> Result<Option<Connectivity>, StoreError> {
        self.with_reader(|conn| {
            let row = conn
                .prepare_cached("SELECT connected, last_seen_ms FROM things WHERE thing = ?1")?
                .query_row(params![thing], |r| {
                    Ok(Connectivity {
                        thing: thing.to_string(),
                        connected: r.get::<_, i64>(0)? != 0,
                        last_seen_ms: r.get(1)?,
                    })
                })
                .optional()?;
            Ok(row)
        })
    }

    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, thing, name, version, kind, time, document FROM changes
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after as i64, limit as i64], change_row)?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(StoreError::from)
        })
    }

    fn change_log_bounds(&self) -> Result<ChangeLogBounds, StoreError> {
        self.with_reader(|conn| {
            let tx = conn.unchecked_transaction()?;
            let bounds = change_log_bounds(&tx)?;
            tx.commit()?;
            Ok(bounds)
        })
    }

    fn shadow_changes(
        &self,
        key: &ShadowKey,
        since_version: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        self.with_reader(|conn| {
            // Served by `changes_by_shadow (thing, name, version)`.
            let mut stmt = conn.prepare_cached(
                "SELECT seq, thing, name, version, kind, time, document FROM changes
                 WHERE thing = ?1 AND name = ?2
                   AND (version > ?3 OR (version = ?3 AND kind = 'delete'))
                   AND seq > ?4
                 ORDER BY seq LIMIT ?5",
            )?;
            let rows = stmt.query_map(
                params![
                    key.thing,
                    key.name.as_deref().unwrap_or(""),
                    since_version as i64,
                    after_seq as i64,
                    limit as i64
                ],
                change_row,
            )?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(StoreError::from)
        })
    }

    fn fleet_snapshot(&self, each: &mut dyn FnMut(SnapshotPart)) -> Result<u64, StoreError> {
        // A connection of its own that reads the file through a memory map
        // (no copy of every page into SQLite's cache), closed afterwards so
        // that the mapping does not stay resident.
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "mmap_size", SNAPSHOT_MMAP_BYTES)?;
        {
            // One read transaction: the rows and the sequence are of one instant.
            let tx = conn.unchecked_transaction()?;
            let through_seq = change_log_bounds(&tx)?.last;
            let shadows = "SELECT thing, name, version, state FROM shadows WHERE deleted = 0";
            stream_parts(&tx, shadows, SnapshotPart::Shadows, each, |r| {
                let name: String = r.get(1)?;
                Ok(ShadowRow {
                    key: ShadowKey {
                        thing: r.get(0)?,
                        name: (!name.is_empty()).then_some(name),
                    },
                    version: r.get::<_, i64>(2)? as u64,
                    state: r.get(3)?,
                })
            })?;
            let things = "SELECT thing, connected, last_seen_ms FROM things";
            stream_parts(&tx, things, SnapshotPart::Things, each, |r| {
                Ok(Connectivity {
                    thing: r.get(0)?,
                    connected: r.get::<_, i64>(1)? != 0,
                    last_seen_ms: r.get(2)?,
                })
            })?;
            tx.commit()?;
            Ok(through_seq)
        }
    }

    fn close(&self) -> Result<(), StoreError> {
        self.queue.close();
        let handle = self
            .writer
            .lock()
            .map_err(|_| StoreError::WriterFailed)?
            .take();
        let stopped = match handle {
            Some(handle) => crate::tasks::joined_thread("store writer", handle.join())
                .ok_or(StoreError::WriterFailed),
            None => Ok(()),
        };
        // The writer is gone: another process may have the database now.
        if let Ok(mut lock) = self.lock.lock() {
            lock.take();
        }
        stopped
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Err(err) = self.close() {
            error!(cause = %err, "store writer did not stop cleanly");
        }
    }
}

/// The writer thread: owns the only write connection.
struct Writer {
    conn: Connection,
    limits: Limits,
    max_batch: usize,
    retention: Duration,
    retention_bytes: u64,
    /// The change log's bytes as committed (also in `store_meta`).
    log_bytes: u64,
    /// Shadows as the writer last wrote them; cleared whenever a transaction
    /// fails, so it never holds what SQLite does not.
    cache: HashMap<ShadowKey, StoredShadow>,
    cache_capacity: usize,
    metrics: Option<ShadowMetrics>,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Job>, committed: mpsc::Sender<CommittedBatch>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut last_check = std::time::Instant::now();
        // Whether the change log may hold entries to drop: then the writer
        // drops one step of them after each batch, and while it has no work.
        let mut pruning = true;
        loop {
            let job = if pruning {
                match queue.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        pruning = self.prune_step();
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                match queue.blocking_recv() {
                    Some(job) => job,
                    None => break,
                }
            };
            batch.push(job);
            fill_batch(&mut queue, &mut batch, self.max_batch);
            let results = self.commit(std::mem::take(&mut batch));
            if committed.blocking_send(results).is_err() {
                warn!("nobody takes committed answers any more");
            }
            if self.log_bytes > self.retention_bytes || last_check.elapsed() >= RETENTION_EVERY {
                last_check = std::time::Instant::now();
                pruning = true;
            }
            if pruning {
                pruning = self.prune_step();
            }
        }
    }

    /// Applies a batch in one transaction. If the transaction fails, every
    /// shadow job in it is answered 500 and nothing of it is kept.
    fn commit(&mut self, jobs: Vec<Job>) -> CommittedBatch {
        let now_ms = now_ms();
        let now = now_ms / 1000;
        let started = std::time::Instant::now();
        let applied = self.apply_all(&jobs, now);
        record_commit(self.metrics.as_ref(), started, jobs.len(), &applied);
        if applied.is_err() {
            self.cache.clear();
        }
        committed(jobs, applied)
    }

    fn apply_all(&mut self, jobs: &[Job], now: Timestamp) -> Result<Vec<Done>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
            outcomes.push(match job {
                Job::Shadow { key, command, .. } => {
                    let (result, change) = apply_shadow(
                        &tx,
                        &mut self.cache,
                        self.cache_capacity,
                        key,
                        command,
                        now,
                        &self.limits,
                    )?;
                    (Some(result), change)
                }
                Job::Presence {
                    thing,
                    connected,
                    at_ms,
                    reason,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO things (thing, connected, last_seen_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT (thing) DO UPDATE SET connected = excluded.connected,
                         last_seen_ms = excluded.last_seen_ms",
                    )?
                    .execute(params![thing, *connected as i64, at_ms])?;
                    let kind = if *connected {
                        ChangeKind::Connect
                    } else {
                        ChangeKind::Disconnect
                    };
                    let mut document = json!({ "connected": connected, "timestamp": at_ms });
                    if let (Some(reason), Value::Object(map)) = (reason, &mut document) {
                        map.insert("disconnectReason".into(), reason.clone().into());
                    }
                    let document = document.to_string();
                    let key = ShadowKey::classic(thing.clone());
                    let change = log_change(&tx, &key, 0, kind, now, document)?;
                    (None, Some(change))
                }
                Job::Forget { thing, .. } => {
                    let removed = tx
                        .prepare_cached("DELETE FROM things WHERE thing = ?1")?
                        .execute(params![thing])?;
                    let change = match removed {
                        0 => None,
                        _ => {
                            let key = ShadowKey::classic(thing.clone());
                            let document = "{}".to_owned();
                            Some(log_change(&tx, &key, 0, ChangeKind::Forget, now, document)?)
                        }
                    };
                    (None, change)
                }
            });
        }
        let logged: u64 = outcomes
            .iter()
            .filter_map(|(_, change)| change.as_ref())
            .map(|c| change_entry_bytes(&c.thing, c.name.as_deref(), &c.document))
            .sum();
        let log_bytes = self.log_bytes + logged;
        if logged > 0 {
            set_change_log_bytes(&tx, log_bytes)?;
        }
        tx.commit()?;
        self.log_bytes = log_bytes;
        if let Some(metrics) = &self.metrics {
            metrics.change_log_bytes.set(log_bytes as i64);
        }
        Ok(outcomes)
    }

    /// Drops up to [`PRUNE_STEP`] of the oldest change log entries: as many
    /// as bring the log within its size, and those older than the window
    /// (times rise with the sequence). Returns whether more may be due.
    fn prune_step(&mut self) -> bool {
        match self.prune() {
            Ok(more) => more,
            Err(err) => {
                error!(cause = %err, "could not prune the change log");
                false
            }
        }
    }

    fn prune(&mut self) -> Result<bool, StoreError> {
        let cutoff = now_ms() / 1000 - self.retention.as_secs() as i64;
        let excess = self.log_bytes.saturating_sub(self.retention_bytes);
        let tx = self.conn.transaction()?;
        let oldest: Vec<(i64, i64, u64)> = tx
            .prepare_cached(&format!(
                "SELECT seq, time, {CHANGE_ENTRY_BYTES_SQL} FROM changes ORDER BY seq LIMIT ?1"
            ))?
            .query_map(params![PRUNE_STEP as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })?
            .collect::<Result<_, _>>()?;
        let Some(Pruned {
            last,
            freed,
            dropped,
        }) = plan_prune(oldest, excess, cutoff)
        else {
            return Ok(false);
        };
        tx.prepare_cached("DELETE FROM changes WHERE seq <= ?1")?
            .execute(params![last])?;
        let log_bytes = self.log_bytes.saturating_sub(freed);
        set_change_log_bytes(&tx, log_bytes)?;
        tx.commit()?;
        self.log_bytes = log_bytes;
        if let Some(metrics) = &self.metrics {
            metrics.change_log_entries.sub(dropped as i64);
            metrics.change_log_bytes.set(log_bytes as i64);
        }
        Ok(dropped == PRUNE_STEP)
    }
}

/// The change log's bytes as `store_meta` keeps them; counted once from the
/// log itself for a database from before the counter.
fn change_log_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let kept: Option<i64> = conn
        .query_row(
            "SELECT value FROM store_meta WHERE key = 'change_log_bytes'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(bytes) = kept {
        return Ok(bytes as u64);
    }
    let bytes: i64 = conn.query_row(
        &format!("SELECT coalesce(sum({CHANGE_ENTRY_BYTES_SQL}), 0) FROM changes"),
        [],
        |r| r.get(0),
    )?;
    set_change_log_bytes(conn, bytes as u64)?;
    Ok(bytes as u64)
}

fn set_change_log_bytes(conn: &Connection, bytes: u64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO store_meta (key, value) VALUES ('change_log_bytes', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![bytes as i64])?;
    Ok(())
}

fn apply_shadow(
    tx: &Transaction<'_>,
    cache: &mut HashMap<ShadowKey, StoredShadow>,
    cache_capacity: usize,
    key: &ShadowKey,
    command: &Command,
    now: Timestamp,
    limits: &Limits,
) -> Result<(Result<Outcome, Rejection>, Option<Change>), StoreError> {
    if let Command::Refused { refused, .. } = command {
        // Queued only for its place in line: nothing to read or write.
        return Ok((Err(refused.rejection.clone()), None));
    }
    let loaded;
    let stored = match cache.get(key) {
        Some(stored) => Some(stored),
        None => {
            loaded = load(tx, key)?;
            loaded.as_ref()
        }
    };
    let applied = match engine::apply(key, stored, command, now, limits) {
        Ok(applied) => applied,
        Err(rejection) => return Ok((Err(rejection), None)),
    };
    let change = match applied.store {
        None => None,
        Some(shadow) => {
            let state = shadow.state.state_json();
            let metadata = shadow.state.metadata_json();
            tx.prepare_cached(
                "INSERT INTO shadows (thing, name, version, deleted, state, metadata, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (thing, name) DO UPDATE SET version = excluded.version,
                 deleted = excluded.deleted, state = excluded.state,
                 metadata = excluded.metadata, updated_at = excluded.updated_at",
            )?
            .execute(params![
                key.thing,
                key.name.as_deref().unwrap_or(""),
                shadow.version as i64,
                shadow.deleted as i64,
                state,
                metadata,
                shadow.updated_at,
            ])?;
            let version = shadow.version;
            let (kind, document, shared) = if shadow.deleted {
                (
                    ChangeKind::Delete,
                    format!(r#"{{"version":{version}}}"#),
                    None,
                )
            } else {
                let document =
                    format!(r#"{{"state":{state},"metadata":{metadata},"version":{version}}}"#);
                (
                    ChangeKind::Update,
                    document,
                    Some(Arc::clone(&shadow.state)),
                )
            };
            if cache_capacity > 0 {
                // Bounded the simple way: start over when full.
                if cache.len() >= cache_capacity {
                    cache.clear();
                }
                cache.insert(key.clone(), shadow);
            }
            Some(Change {
                state: shared,
                ..log_change(tx, key, version, kind, now, document)?
            })
        }
    };
    Ok((Ok(applied.outcome), change))
}

fn log_change(
    tx: &Transaction<'_>,
    key: &ShadowKey,
    version: u64,
    kind: ChangeKind,
    now: Timestamp,
    document: String,
) -> Result<Change, StoreError> {
    tx.prepare_cached(
        "INSERT INTO changes (thing, name, version, kind, time, document)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        key.thing,
        key.name.as_deref().unwrap_or(""),
        version as i64,
        kind.as_str(),
        now,
        document
    ])?;
    Ok(Change {
        seq: tx.last_insert_rowid() as u64,
        thing: key.thing.clone(),
        name: key.name.clone(),
        version,
        kind,
        time: now,
        document,
        state: None,
    })
}

/// Takes the database's lock file (`<database>.lock`, holding the pid), for
/// as long as the returned file is open. The service assumes it is the only
/// writer (its cache, versions and fleet index); two processes on one
/// database would lose acknowledged updates, so the second is refused.
fn lock_database(path: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::Write;
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: path.to_path_buf(),
            pid: std::fs::read_to_string(&lock_path)
                .ok()
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty()),
        }),
        Err(std::fs::TryLockError::Error(err)) => Err(err.into()),
    }
}

/// Hands the rows of `sql` to `each` as they are read, in parts of
/// [`SNAPSHOT_PART`].
fn stream_parts<T>(
    conn: &Connection,
    sql: &str,
    part: impl Fn(Vec<T>) -> SnapshotPart,
    each: &mut dyn FnMut(SnapshotPart),
    row: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<(), StoreError> {
    let mut statement = conn.prepare(sql)?;
    let mut rows = statement.query([])?;
    let mut items = Vec::with_capacity(SNAPSHOT_PART);
    while let Some(r) = rows.next()? {
        items.push(row(r)?);
        if items.len() == SNAPSHOT_PART {
            each(part(std::mem::replace(
                &mut items,
                Vec::with_capacity(SNAPSHOT_PART),
            )));
        }
    }
    if !items.is_empty() {
        each(part(items));
    }
    Ok(())
}

fn change_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Change> {
    let name: String = r.get(2)?;
    let kind: String = r.get(4)?;
    Ok(Change {
        seq: r.get::<_, i64>(0)? as u64,
        thing: r.get(1)?,
        name: (!name.is_empty()).then_some(name),
        version: r.get::<_, i64>(3)? as u64,
        kind: ChangeKind::parse(&kind).unwrap_or(ChangeKind::Update),
        time: r.get(5)?,
        document: r.get(6)?,
        state: None,
    })
}

fn change_log_bounds(conn: &Connection) -> Result<ChangeLogBounds, StoreError> {
    let oldest: Option<i64> = conn
        .prepare_cached("SELECT min(seq) FROM changes")?
        .query_row([], |r| r.get(0))?;
    // AUTOINCREMENT keeps the last sequence even when trimming emptied the log.
    let last: Option<i64> = conn
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'changes'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(ChangeLogBounds {
        oldest: oldest.map(|s| s as u64),
        last: last.unwrap_or(0).max(oldest.unwrap_or(0)) as u64,
    })
}

fn load(conn: &Connection, key: &ShadowKey) -> Result<Option<StoredShadow>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT version, deleted, state, metadata, updated_at FROM shadows
             WHERE thing = ?1 AND name = ?2",
        )?
        .query_row(params![key.thing, key.name.as_deref().unwrap_or("")], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .optional()?;
    let Some((version, deleted, state, metadata, updated_at)) = row else {
        return Ok(None);
    };
    let state: Value = serde_json::from_str(&state)?;
    let metadata: Value = serde_json::from_str(&metadata)?;
    Ok(Some(StoredShadow {
        state: Arc::new(ShadowState::from_values(&state, &metadata)),
        version: version as u64,
        deleted: deleted != 0,
        updated_at,
    }))
}
