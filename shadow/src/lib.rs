//! Umbra's device shadow engine: AWS IoT Device Shadow compatible documents,
//! validation, a durable SQLite store with group commit, and the
//! transport-agnostic service that MQTT and HTTP both call.
//!
//! # Layout
//! - [`json`]: value equality by number value, nesting depth.
//! - [`document`]: the shadow state, merge, delta and metadata.
//! - [`topic`]: `$aws/things/...` topics, parsed and built.
//! - [`limits`]: configurable limits with AWS's defaults; name rules.
//! - [`request`]: request payloads parsed and validated.
//! - [`error`]: why a request is refused, with AWS's codes and messages.
//! - [`engine`]: the rules as one pure function over a stored shadow.
//! - [`answer`]: the exact answer messages (`/accepted`, `/rejected`, `/delta`, `/documents`).
//! - [`store`]: the store trait and the SQLite store (WAL, group commit).
//! - [`throttle`]: per-thing rate and in-flight budgets.
//! - [`service`]: the request path: validate, throttle, store, answer in commit order.
//! - [`metrics`]: the Prometheus metrics of the service, store and API.
//! - [`search`]: fleet search queries (AWS fleet-indexing syntax subset).
//! - [`fleet`]: the in-memory fleet index that listing and search read.
//! - [`http`]: the operator API (axum): shadows, fleet, change stream, metrics.
//! - [`import`]: bulk loading of shadows from JSON lines (`umbra import`).
//! - [`tasks`]: the one panic policy of every task and thread.
//! - [`fuzzing`]: what the fuzz targets in `fuzz/` call (update parsing,
//!   merge and delta, search queries, change-stream fields).
#![forbid(unsafe_code)]

pub mod answer;
pub mod document;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod fuzzing;
pub mod http;
pub mod import;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod request;
pub mod search;
pub mod service;
pub mod store;
pub mod tasks;
pub mod throttle;
pub mod topic;

pub use answer::{Answer, Message, UserProperties};
pub use error::Rejection;
pub use limits::Limits;
pub use metrics::ShadowMetrics;
pub use service::{DeletedThing, MessageSink, Pending, Request, ServiceConfig, ShadowService};
pub use store::{ShadowStore, SqliteStore, StoreConfig, Synchronous};
pub use topic::{Operation, ShadowKey};
