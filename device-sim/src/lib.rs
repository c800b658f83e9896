//! device-sim: a simulated device fleet and MQTT load generator for Umbra (and any MQTT broker).
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap derive) and its translation into run configurations.
//! - [`units`]: parsing of `60s`, `100/s`, `max`, and the [`units::Pacer`] that keeps a rate.
//! - [`backoff`]: exponential backoff with jitter for reconnects and `429` answers.
//! - [`telemetry`]: the device model behind `devices/{thing}/telemetry` messages.
//! - [`mqtt`]: broker address, small-footprint rumqttc options, shadow topics, error kinds.
//! - [`fleet`]: `fleet`: N devices keeping their shadows in sync, with an optional in-process
//!   operator measuring desired -> delta and desired -> reported latency.
//! - [`operator`]: `operator`: desired-state changes at a fixed rate, over MQTT or HTTP
//!   (ureq).
//! - [`convergence`]: the changes in flight and their desired -> delta -> reported latency.
//! - [`relay`]: `bench relay`: broker throughput and end-to-end latency.
//! - [`shadow_bench`]: `bench shadow`: durable shadow updates per second.
//! - [`stats`], [`report`], [`plot`]: counters and HDR histograms, the live line and summary
//!   (table or JSON), the charts (SVG or PNG).
//!
//! Every mode takes a [`CancellationToken`](tokio_util::sync::CancellationToken) for shutdown
//! (Ctrl-C in the binary), stops at the end of its `--duration`, disconnects its clients and
//! returns a [`report::Summary`].

pub mod backoff;
pub mod cli;
pub mod convergence;
pub mod demo;
pub mod fleet;
pub mod mqtt;
pub mod operator;
pub mod plot;
pub mod relay;
pub mod report;
pub mod shadow_bench;
pub mod stats;
pub mod telemetry;
pub mod units;

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    #[error("only {ready} of {total} clients connected and subscribed in time")]
    NotReady { ready: usize, total: usize },
    #[error("http operator: {0}")]
    Http(#[from] operator::HttpError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("starting Umbra: {0}")]
    Umbra(String),
}
