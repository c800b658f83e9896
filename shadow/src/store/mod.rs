//! Durable storage of shadows, the change log and thing connectivity.
//!
//! A store applies [`Job`]s in the order they were submitted, commits them in
//! groups, and only after each commit hands the batch's results, in order, to
//! the channel returned when it was opened. Nothing leaves before it is durable.

mod postgres;
mod sqlite;

pub use postgres::{PostgresConfig, PostgresStore};
pub use sqlite::{backup, SqliteStore, StoreConfig, Synchronous};

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::answer::{Answer, UserProperties};
use crate::document::{ShadowState, Timestamp};
use crate::engine::{Command, Outcome, StoredShadow};
use crate::error::Rejection;
use crate::metrics::ShadowMetrics;
use crate::throttle::Permit;
use crate::topic::ShadowKey;

/// Where the caller waits for its answer, and what its request holds until
/// then: the thing's in-flight slot. The service's publisher frees the slot
/// and answers before it publishes the answer's messages, so a device that
/// sees its answer can always send its next request.
#[derive(Debug)]
pub struct Ticket {
    pub reply: oneshot::Sender<Answer>,
    pub slot: Option<Permit>,
    /// Repeated on the reply.
    pub user_properties: Option<UserProperties>,
}

/// A unit of work for the store's writer.
#[derive(Debug)]
pub enum Job {
    /// A validated shadow request.
    Shadow {
        key: ShadowKey,
        command: Command,
        ticket: Option<Ticket>,
    },
    /// A thing connected or disconnected (`at_ms`: epoch milliseconds).
    Presence {
        thing: String,
        connected: bool,
        at_ms: i64,
        reason: Option<String>,
    },
    /// A deleted thing's connectivity is forgotten (its shadows are deleted
    /// by shadow jobs before this one). `reply` hears whether there was any,
    /// once committed.
    Forget {
        thing: String,
        reply: oneshot::Sender<Result<bool, Rejection>>,
    },
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub seq: u64,
    pub thing: String,
    pub name: Option<String>,
    pub version: u64,
    pub kind: ChangeKind,
    pub time: Timestamp,
    /// The shadow after the change (`{"state":..,"metadata":..,"version":N}`),
    /// `{"version":N}` for a delete, or the connectivity for presence; raw JSON.
    pub document: String,
    /// An update's shadow as the writer holds it, shared rather than copied
    /// (the fleet index keeps it, and the change stream's `?q=` reads it);
    /// `None` for a change read back from the log, whose `document` says it.
    pub state: Option<Arc<ShadowState>>,
}

/// What a change log entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Update,
    Delete,
    Connect,
    Disconnect,
    /// A deleted thing's connectivity was forgotten.
    Forget,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Update => "update",
            ChangeKind::Delete => "delete",
            ChangeKind::Connect => "connect",
            ChangeKind::Disconnect => "disconnect",
            ChangeKind::Forget => "forget",
        }
    }

    pub fn parse(s: &str) -> Option<ChangeKind> {
        [
            ChangeKind::Update,
            ChangeKind::Delete,
            ChangeKind::Connect,
            ChangeKind::Disconnect,
            ChangeKind::Forget,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// The result of one job, released after its batch committed.
#[allow(clippy::large_enum_variant)] // moved once per job; see `Outcome`
#[derive(Debug)]
pub enum Committed {
    Shadow {
        key: ShadowKey,
        command: Command,
        result: Result<Outcome, Rejection>,
        /// The change log entry this job wrote, if it changed anything.
        change: Option<Change>,
        ticket: Option<Ticket>,
    },
    Presence {
        change: Option<Change>,
    },
    Forget {
        change: Option<Change>,
        reply: oneshot::Sender<Result<bool, Rejection>>,
        /// The batch's transaction failed: nothing was forgotten.
        failed: bool,
    },
}

/// A group of results in commit order.
pub type CommittedBatch = Vec<Committed>;

/// A thing's connectivity as last recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connectivity {
    pub thing: String,
    pub connected: bool,
    pub last_seen_ms: i64,
}

/// The change log's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeLogBounds {
    /// The oldest retained entry, `None` when the log is empty.
    pub oldest: Option<u64>,
    /// The last sequence number ever assigned (0 before the first change).
    pub last: u64,
}

impl ChangeLogBounds {
    /// Whether every change after `since` is still retained.
    pub fn retains_after(&self, since: u64) -> bool {
        let first_retained = self.oldest.unwrap_or(self.last + 1);
        first_retained <= since.saturating_add(1)
    }
}

/// One live shadow as committed, for building the fleet index.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowRow {
    pub key: ShadowKey,
    pub version: u64,
    /// `{"desired":..,"reported":..}`, raw JSON.
    pub state: String,
}

/// A part of the fleet as a store reads it for the fleet index, at most
/// [`SNAPSHOT_PART`] rows.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotPart {
    Shadows(Vec<ShadowRow>),
    Things(Vec<Connectivity>),
}

/// Rows per [`SnapshotPart`]: small enough to spread over cores, large
/// enough that handing one over costs nothing.
pub const SNAPSHOT_PART: usize = 4096;

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgresql: {0}")]
    Postgres(String),
    #[error("stored document is not valid json: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("store queue is full")]
    Busy,
    #[error("store is closed")]
    Closed,
    #[error("store writer failed")]
    WriterFailed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{} is in use by another umbra process{}; stop it first (one process per data directory)", path.display(), pid.as_deref().map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        path: std::path::PathBuf,
        pid: Option<String>,
    },
}

/// A shadow store: SQLite (one node) or PostgreSQL (shared by nodes).
pub trait ShadowStore: Send + Sync {
    /// Queues a job without waiting. `Busy` when the queue is full.
    fn submit(&self, job: Job) -> Result<(), StoreError>;

    /// Reads one shadow as last committed (deleted shadows included).
    fn load(&self, key: &ShadowKey) -> Result<Option<StoredShadow>, StoreError>;

    /// Names of a thing's named shadows, after `after`, at most `limit`.
    fn named_shadows(
        &self,
        thing: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// A thing's connectivity, if it was ever seen.
    fn connectivity(&self, thing: &str) -> Result<Option<Connectivity>, StoreError>;

    /// Change log entries with `seq > after`, oldest first, at most `limit`.
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError>;

    /// The oldest retained and the last assigned change sequence.
    fn change_log_bounds(&self) -> Result<ChangeLogBounds, StoreError>;

    /// Changes of one shadow after version `since_version`, oldest first, with
    /// `seq > after_seq`, at most `limit`. A delete keeps the version it
    /// deleted, so the delete of version N counts as after N.
    fn shadow_changes(
        &self,
        key: &ShadowKey,
        since_version: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError>;

    /// Every live shadow and every thing's connectivity, read consistently
    /// (as of one commit) and handed to `each` in parts as they are read.
    /// Returns the change sequence of that commit: the parts hold every
    /// change up to it and none after.
    fn fleet_snapshot(&self, each: &mut dyn FnMut(SnapshotPart)) -> Result<u64, StoreError>;

    /// Stops taking jobs, finishes and commits what is queued, and waits for the writer.
    fn close(&self) -> Result<(), StoreError>;

    /// For a store that other processes write too: every writer's changes,
    /// in sequence order, from the last one committed when the store
    /// opened (taken once). The service then feeds its change stream and
    /// fleet index from this, not from its own commits. `None` for a store
    /// that only this process writes.
    fn follow(&self) -> Option<Followed> {
        None
    }
}

/// Every writer's changes to a shared store, in sequence order (see
/// [`ShadowStore::follow`]).
#[derive(Debug)]
pub struct Followed {
    /// The last sequence committed when the store opened: the changes
    /// handed on start after it.
    pub after: u64,
    pub changes: tokio::sync::mpsc::Receiver<Change>,
}

/// A writer's queue: jobs go in until the store closes it.
struct JobQueue(std::sync::Mutex<Option<tokio::sync::mpsc::Sender<Job>>>);

impl JobQueue {
    fn new(sender: tokio::sync::mpsc::Sender<Job>) -> JobQueue {
        JobQueue(std::sync::Mutex::new(Some(sender)))
    }

    /// Queues `job` without waiting: `Busy` when the queue is full,
    /// `Closed` once the store closed it.
    fn submit(&self, job: Job) -> Result<(), StoreError> {
        use tokio::sync::mpsc::error::TrySendError;
        let queue = self.0.lock().map_err(|_| StoreError::WriterFailed)?;
        let queue = queue.as_ref().ok_or(StoreError::Closed)?;
        queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => StoreError::Busy,
            TrySendError::Closed(_) => StoreError::Closed,
        })
    }

    /// Takes no more jobs: the writer drains what is queued and stops.
    fn close(&self) {
        if let Ok(mut queue) = self.0.lock() {
            queue.take();
        }
    }
}

/// How many committed batches may wait for the publisher before a writer waits.
const COMMITTED_BACKLOG: usize = 64;
/// How often a writer looks for change log entries past the retention window.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// Most change log entries dropped in one step (one short transaction
/// between two batches, so pruning never stalls the writer for long).
const PRUNE_STEP: usize = 1024;
/// What an entry costs beyond its names and document (row header, sequence,
/// version, kind, time, index entry), roughly.
const CHANGE_ENTRY_OVERHEAD: u64 = 64;

/// The bytes a change log entry counts for retention: its thing and shadow
/// names, its document and a fixed overhead.
pub fn change_entry_bytes(thing: &str, name: Option<&str>, document: &str) -> u64 {
    (thing.len() + name.map_or(0, str::len) + document.len()) as u64 + CHANGE_ENTRY_OVERHEAD
}

/// Adds what is already queued to `batch`, up to `max` jobs.
fn fill_batch(queue: &mut tokio::sync::mpsc::Receiver<Job>, batch: &mut Vec<Job>, max: usize) {
    while batch.len() < max {
        match queue.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// Records a commit of `jobs` that started at `started` on `metrics`.
fn record_commit(
    metrics: Option<&ShadowMetrics>,
    started: std::time::Instant,
    jobs: usize,
    applied: &Result<Vec<Done>, StoreError>,
) {
    let Some(metrics) = metrics else { return };
    metrics
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.batch_size.observe(jobs as f64);
    if let Ok(outcomes) = applied {
        let logged = outcomes.iter().filter(|(_, c)| c.is_some()).count();
        metrics.change_log_entries.add(logged as i64);
    }
}

/// One pruning step: the last sequence dropped, the bytes it frees and the
/// entries it drops.
struct Pruned {
    last: i64,
    freed: u64,
    dropped: usize,
}

/// Which of the `oldest` entries (sequence, time, bytes; oldest first) to
/// drop: as many as free `excess` bytes, and those older than `cutoff`
/// (times rise with the sequence). `None` when none is due.
fn plan_prune(
    oldest: impl IntoIterator<Item = (i64, i64, u64)>,
    excess: u64,
    cutoff: Timestamp,
) -> Option<Pruned> {
    let (mut last, mut freed, mut dropped) = (None, 0, 0);
    for (seq, time, bytes) in oldest {
        if freed >= excess && time >= cutoff {
            break;
        }
        last = Some(seq);
        freed += bytes;
        dropped += 1;
    }
    last.map(|last| Pruned {
        last,
        freed,
        dropped,
    })
}

/// What one job did: a shadow job's result (none for presence) and its change log entry.
type Done = (Option<Result<Outcome, Rejection>>, Option<Change>);

/// A batch's results, in job order, from what its transaction did; if it
/// failed, every shadow job is answered 500 and nothing of it was kept.
fn committed(jobs: Vec<Job>, applied: Result<Vec<Done>, StoreError>) -> CommittedBatch {
    let failed = applied.is_err();
    let outcomes = match applied {
        Ok(outcomes) => outcomes,
        Err(err) => {
            tracing::error!(cause = %err, jobs = jobs.len(), "store commit failed");
            jobs.iter().map(|_| (None, None)).collect()
        }
    };
    jobs.into_iter()
        .zip(outcomes)
        .map(|(job, (result, change))| match job {
            Job::Shadow {
                key,
                command,
                ticket,
            } => Committed::Shadow {
                key,
                command,
                result: result.unwrap_or(Err(Rejection::Internal)),
                change,
                ticket,
            },
            Job::Presence { .. } => Committed::Presence { change },
            Job::Forget { reply, .. } => Committed::Forget {
                change,
                reply,
                failed,
            },
        })
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
