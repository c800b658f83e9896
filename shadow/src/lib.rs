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
#![forbid(unsafe_code)]

pub mod answer;
pub mod document;
pub mod engine;
pub mod error;
pub mod json;
pub mod limits;
pub mod request;
pub mod service;
pub mod store;
pub mod throttle;
pub mod topic;

pub use answer::{Answer, Message};
pub use error::Rejection;
pub use limits::Limits;
pub use service::{Pending, Request, ServiceConfig, ShadowService};
pub use store::{ShadowStore, SqliteStore, StoreConfig, Synchronous};
pub use topic::{Operation, ShadowKey};
