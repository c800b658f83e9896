//! A PostgreSQL database of a test's own, on the server the tests use.
//! Shared by the shadow crate's tests and the binary's (by path).
#![allow(dead_code)] // each test binary uses its own part

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

    /// The first value of the first row `sql` returns, run on the test
    /// server (`NULL` as `None`).
    pub fn value(&self, sql: &str) -> Option<String> {
        admin_sql(&self.admin, sql)
    }

    /// This database's name.
    pub fn name(&self) -> &str {
        &self.name
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
/// works from sync and async tests alike): the first value of the first
/// row it returns.
fn admin_sql(url: &str, sql: &str) -> Option<String> {
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
            client.simple_query(&statement).await
        })
    });
    let messages = done
        .join()
        .expect("admin thread")
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
    messages.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_string)),
        _ => None,
    })?
}
