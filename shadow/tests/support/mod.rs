//! Shared by the shadow crate's tests: the service over a real SQLite file
//! or a real PostgreSQL database.
#![allow(dead_code)] // each test binary uses its own part

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
        let (store, committed) = self.open(limits.clone(), retention, None);
        let config = ServiceConfig {
            limits,
            ..ServiceConfig::default()
        };
        ShadowService::start(config, store, committed)
    }
}

/// The PostgreSQL server the tests use: `UMBRA_TEST_POSTGRES_URL`, a
/// `postgres://` URL of a user who may create databases (`.ci/run` makes
/// this one).
const DEFAULT_TEST_POSTGRES: &str = "postgres://umbra:umbra@127.0.0.1:5432/postgres";

/// A database of one test's own on the test server, dropped with it.
pub struct TestDatabase {
    pub url: String,
    name: String,
    admin: String,
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let admin = std::env::var("UMBRA_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_TEST_POSTGRES.to_string());
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("umbra_test_{}_{n}", std::process::id());
        admin_sql(
            &admin,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        admin_sql(&admin, &format!("CREATE DATABASE {name}"));
        let (server, _) = admin
            .rsplit_once('/')
            .expect("UMBRA_TEST_POSTGRES_URL is postgres://user:password@host:port/database");
        TestDatabase {
            url: format!("{server}/{name}"),
            name,
            admin,
        }
    }

    /// Runs `sql` in this database.
    pub fn execute(&self, sql: &str) {
        admin_sql(&self.url, sql);
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        admin_sql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs `sql` on the test server, from a thread of its own (so that it
/// works from sync and async tests alike).
fn admin_sql(url: &str, sql: &str) {
    let (url, statement) = (url.to_string(), sql.to_string());
    let done = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|err| {
                    panic!("cannot reach the test PostgreSQL ({err}); set UMBRA_TEST_POSTGRES_URL")
                });
            tokio::spawn(connection);
            client.batch_execute(&statement).await
        })
    });
    if let Err(err) = done.join().expect("admin thread") {
        panic!("{sql}: {err}");
    }
}
