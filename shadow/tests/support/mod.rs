//! Shared by the shadow crate's tests: the service over a real SQLite file.
#![allow(dead_code)] // each test binary uses its own part

use std::sync::Arc;

use tokio::sync::mpsc;
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
