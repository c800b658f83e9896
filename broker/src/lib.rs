//! Umbra's embedded MQTT broker: rumqttd run under Umbra's control, with the
//! `$aws` topic space, per-device authorization, presence and shadow request
//! hand-off added at the connection edge.
//!
//! # Layout
//!
//! - [`cli`]: the operator commands (`umbra shadow ...`, `umbra changes`).
//! - [`config`]: umbra's configuration (file < env < flags) and its validation.
//! - [`server`]: the umbra server: store, shadow service and broker wired
//!   together; ordered start-up and a draining shutdown.
//! - [`embedded`]: settings and their guard, starting the router, listeners
//!   and answer publisher on free ports, shutdown.
//! - [`edge`]: the per-connection protocol wrapper (keep-alive 0, `$aws`
//!   mapping, authorization, presence, synthetic acks, packet counters).
//! - [`topics`]: pure rules of the `$aws` topic space (mapping, shadow request
//!   parsing, who may publish/subscribe where).
//! - [`requests`]: how shadow requests leave the edge (sink trait, bounded
//!   channels, overload path for 429 answers).
//! - [`publisher`]: publishing answers into the broker through a local link.
//! - [`metrics`]: atomic counters for Umbra's metrics endpoint.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod edge;
pub mod embedded;
pub mod metrics;
pub mod publisher;
pub mod requests;
pub mod server;
pub mod topics;

pub use config::{Config, ConfigError, Overrides};
pub use edge::{EdgeHooks, EdgeSettings, PresenceEvent};
pub use embedded::{start, BrokerSettings, ListenerAddrs, ListenerSettings, RunningBroker};
pub use metrics::{CursorJumpLayer, EdgeCollector, EdgeMetrics};
pub use publisher::AnswerPublisher;
pub use requests::{ChannelShadowSink, Overloaded, ShadowInbox, ShadowPublish, ShadowRequestSink};
pub use server::{Server, ServerAddrs};
