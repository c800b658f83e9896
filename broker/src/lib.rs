//! Umbra's embedded MQTT broker: Umbra's own connection layer serving the
//! `$aws` topic space (shadow requests, answers, presence) in front of
//! rumqttd's router, which carries every other topic.
//!
//! # Layout
//!
//! - [`addresses`]: limits per source address (connections at once,
//!   failed logins slowed, then refused for a while).
//! - [`auth`]: who a client is: the password file (argon2id), the shared
//!   credential, anonymous clients; `umbra passwd`'s file edits.
//! - [`certs`]: `umbra certs`: a development CA, server and device
//!   certificates for mutual TLS.
//! - [`cli`]: the operator commands (`umbra shadow ...`, `umbra changes`).
//! - [`config`]: umbra's configuration (file < env < flags) and its validation.
//! - [`server`]: the umbra server: store, shadow service and broker wired
//!   together; ordered start-up and a draining shutdown.
//! - [`attach`]: attach mode: the shadow service as an MQTT 5 client of
//!   another broker, instead of the embedded one.
//! - [`embedded`]: broker settings and their guard, start-up on free ports,
//!   shutdown.
//! - [`transport`]: listeners, the accept loop, TLS and WebSocket handshakes.
//! - [`codec`]: MQTT 3.1.1 or 5, chosen from the CONNECT.
//! - [`connection`]: one connection's task: CONNECT rules, keep-alive,
//!   shadow requests, `$aws` deliveries, its router link.
//! - [`sessions`]: sessions by client id: takeover, persistence, expiry.
//! - [`fanout`]: the `$aws` subscription table and per-session mailboxes.
//! - [`topics`]: pure rules of the topic space (routes, authorization,
//!   topic and filter syntax, matching).
//! - [`policy`]: roles: who may publish and subscribe where outside
//!   `$aws/`, by identity.
//! - [`requests`]: how shadow requests leave a connection.
//! - [`metrics`]: atomic counters for Umbra's metrics endpoint.
//! - [`fuzzing`]: what the fuzz targets in `fuzz/` call (the codec, the
//!   topic rules and roles on arbitrary packets).
//!
//! A device's shadow update takes one chain: its connection task
//! ([`connection`]) → [`umbra_shadow::ShadowService::submit`] → the store's
//! writer thread (group commit) → the service's commit task, which hands
//! each answer to [`fanout::Publisher`] → the subscribers' mailboxes → their
//! connection tasks, which write them.

#![forbid(unsafe_code)]

pub mod addresses;
pub mod attach;
pub mod auth;
pub mod certs;
pub mod cli;
pub mod codec;
pub mod config;
pub mod connection;
pub mod embedded;
pub mod fanout;
pub mod fuzzing;
pub mod metrics;
pub mod policy;
pub mod requests;
pub mod server;
pub mod sessions;
pub mod topics;
pub mod transport;

pub use config::{Config, ConfigError, Overrides};
pub use connection::PresenceEvent;
pub use embedded::{
    start, BrokerSettings, EdgeHooks, EdgeSettings, ListenerAddrs, ListenerSettings, RunningBroker,
};
pub use fanout::Publisher;
pub use metrics::{CursorJumpLayer, EdgeCollector, EdgeMetrics};
pub use requests::{ShadowPublish, ShadowRequests};
pub use server::{Server, ServerAddrs};
