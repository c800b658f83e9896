//! Shared by the shadow crate's tests: the service over a real SQLite file
//! or a real PostgreSQL database.
#![allow(dead_code)] // each test binary uses its own part

mod postgres;

pub use postgres::TestDatabase;

use std::sync::Arc;

use tokio::sync::mpsc;
use umbra_shadow::store::{CommittedBatch, PostgresConfig, PostgresStore, ShadowStore};
use umbra_shadow::{
    Limits, Message, ServiceConfig, ShadowMetrics, ShadowService, SqliteStore, StoreConfig,
};

/// AWS's limits without the request rate and in-flight budgets.
pub fn unlimited() -> Limits {
    Limits {
        requests_per_second: 0,
        max_in_flight: 0,
        ..Limits::default()
    }
}

/// The service over the store `config` opens, with `limits` for both, and
/// the channel its answers are published on.
pub fn start(
    config: StoreConfig,
    limits: Limits,
    metrics: Option<ShadowMetrics>,
) -> (Arc<ShadowService>, mpsc::Receiver<Message>) {
    let (store, committed) =
        SqliteStore::open_with_metrics(config, limits.clone(), metrics.clone())
            .expect("open store");
    let config = ServiceConfig {
        limits,
        ..ServiceConfig::default()
    };
    ShadowService::start_with_metrics(config, Arc::new(store), committed, metrics)
}

/// Runs a test body on each store: `sqlite` always, `postgres` with
/// `--include-ignored` (`.ci/run` starts PostgreSQL). The body takes a
/// [`TestStore`] of its own:
///
/// ```ignore
/// on_both_stores! {
///     #[tokio::test]
///     async fn survives(store: TestStore) { ... }
/// }
/// ```
#[macro_export]
macro_rules! on_both_stores {
    ($(#[$attr:meta])* async fn $name:ident($store:ident: TestStore) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body($store: $crate::support::TestStore) $body

            $(#[$attr])*
            async fn sqlite() {
                body($crate::support::TestStore::sqlite()).await
            }

            $(#[$attr])*
            #[ignore = "needs postgresql"]
            async fn postgres() {
                body($crate::support::TestStore::postgres()).await
            }
        }
    };
}

/// A store for one test: a SQLite file in a temporary directory, or a
/// PostgreSQL database of its own (dropped afterwards).
pub enum TestStore {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

/// Retention settings a test may change; the rest are the defaults.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub window: std::time::Duration,
    pub bytes: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        let d = StoreConfig::new("");
        Retention {
            window: d.change_retention,
            bytes: d.change_retention_bytes,
        }
    }
}

impl TestStore {
    pub fn sqlite() -> TestStore {
        TestStore::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    pub fn postgres() -> TestStore {
        TestStore::Postgres(TestDatabase::create())
    }

    /// Opens the store (again, for a test of what survives a restart).
    pub fn open(
        &self,
        limits: Limits,
        retention: Retention,
        metrics: Option<ShadowMetrics>,
    ) -> (Arc<dyn ShadowStore>, mpsc::Receiver<CommittedBatch>) {
        match self {
            TestStore::Sqlite(dir) => {
                let config = StoreConfig {
                    change_retention: retention.window,
                    change_retention_bytes: retention.bytes,
                    ..StoreConfig::new(dir.path().join("shadows.db"))
                };
                let (store, committed) =
                    SqliteStore::open_with_metrics(config, limits, metrics).expect("open sqlite");
                (Arc::new(store), committed)
            }
            TestStore::Postgres(db) => {
                let config = PostgresConfig {
                    change_retention: retention.window,
                    change_retention_bytes: retention.bytes,
                    ..PostgresConfig::new(&db.url)
                };
                let (store, committed) =
                    PostgresStore::open(config, limits, metrics).expect("open postgresql");
                (Arc::new(store), committed)
            }
        }
    }

    /// The service over this store, with `limits` for both.
    pub fn start(&self, limits: Limits) -> (Arc<ShadowService>, mpsc::Receiver<Message>) {
        self.start_retaining(limits, Retention::default())
    }

    /// [`TestStore::start`] with a change log kept as `retention` says.
    pub fn start_retaining(
        &self,
        limits: Limits,
        retention: Retention,
    ) -> (Arc<ShadowService>, mpsc::Receiver<Message>) {
        self.start_with(limits, retention, None)
    }

    /// [`TestStore::start_retaining`] with the store and service counted
    /// in `metrics`.
    pub fn start_with(
        &self,
        limits: Limits,
        retention: Retention,
        metrics: Option<ShadowMetrics>,
    ) -> (Arc<ShadowService>, mpsc::Receiver<Message>) {
        let (store, committed) = self.open(limits.clone(), retention, metrics.clone());
        let config = ServiceConfig {
            limits,
            ..ServiceConfig::default()
        };
        ShadowService::start_with_metrics(config, store, committed, metrics)
    }

    /// Runs `sql` in the store's database, as another program could.
    pub fn execute(&self, sql: &str) {
        match self {
            TestStore::Sqlite(dir) => rusqlite::Connection::open(dir.path().join("shadows.db"))
                .and_then(|db| db.execute_batch(sql))
                .expect("run sql on sqlite"),
            TestStore::Postgres(db) => db.execute(sql),
        }
    }
}
