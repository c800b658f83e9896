//! Prometheus metrics of the shadow service, its store and its HTTP API.
//!
//! Registered once on a registry the caller owns (the binary registers the
//! broker's metrics on the same one). Labels carry operations, codes and route
//! templates, never thing names: a fleet must not become a label set.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Every metric of the shadow crate. Cloning is cheap (the handles are shared).
#[derive(Clone, Debug)]
pub struct ShadowMetrics {
    /// Shadow requests by `operation` and answer `code` (200 on accept).
    pub requests: IntCounterVec,
    /// Seconds from taking a request to its durable answer, by `operation`.
    pub request_seconds: HistogramVec,
    /// Seconds one group commit took (apply + COMMIT).
    pub commit_seconds: Histogram,
    /// Jobs per group commit.
    pub batch_size: Histogram,
    /// `/update/delta` messages published.
    pub deltas_published: IntCounter,
    /// Open change-stream (SSE) subscribers.
    pub stream_subscribers: IntGauge,
    /// Entries in the change log (within the retention window).
    pub change_log_entries: IntGauge,
    /// Bytes of the change log as its size limit counts them.
    pub change_log_bytes: IntGauge,
    /// HTTP requests by `route` template, `method` and `status`.
    pub http_requests: IntCounterVec,
    /// Shadows in the fleet index (set when metrics are read).
    pub fleet_index_shadows: IntGauge,
    /// Estimated heap bytes of the fleet index (set when metrics are read).
    pub fleet_index_bytes: IntGauge,
    /// Things in the fleet, and those connected now (set when metrics are read).
    pub fleet_things: IntGauge,
    pub fleet_things_connected: IntGauge,
    /// Shadows with an outstanding delta (set when metrics are read).
    pub fleet_shadows_with_delta: IntGauge,
}

impl ShadowMetrics {
    /// Creates the metrics and registers them on `registry`. Fails if they are
    /// already registered there.
    pub fn register(registry: &Registry) -> Result<ShadowMetrics, prometheus::Error> {
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let metrics = ShadowMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "umbra_shadow_requests_total",
                    "Shadow requests by operation and answer code",
                ),
                &["operation", "code"],
            )?,
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "umbra_shadow_request_seconds",
                    "Time from taking a shadow request to its durable answer",
                )
                .buckets(latency.clone()),
                &["operation"],
            )?,
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "umbra_store_commit_seconds",
                    "Time one group commit of the shadow store took",
                )
                .buckets(latency),
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new("umbra_store_batch_size", "Jobs per group commit").buckets(
                    vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                ),
            )?,
            deltas_published: IntCounter::new(
                "umbra_shadow_deltas_published_total",
                "Delta messages published to devices",
            )?,
            stream_subscribers: IntGauge::new(
                "umbra_change_stream_subscribers",
                "Open change-stream subscribers",
            )?,
            change_log_entries: IntGauge::new(
                "umbra_change_log_entries",
                "Entries in the change log",
            )?,
            change_log_bytes: IntGauge::new(
                "umbra_change_log_bytes",
                "Bytes of the change log as its size limit counts them",
            )?,
            http_requests: IntCounterVec::new(
                Opts::new(
                    "umbra_http_requests_total",
                    "Operator API requests by route template, method and status",
                ),
                &["route", "method", "status"],
            )?,
            fleet_index_shadows: IntGauge::new(
                "umbra_fleet_index_shadows",
                "Shadows in the fleet index",
            )?,
            fleet_index_bytes: IntGauge::new(
                "umbra_fleet_index_bytes",
                "Estimated heap bytes of the fleet index",
            )?,
            fleet_things: IntGauge::new(
                "umbra_fleet_things",
                "Things in the fleet index (with a shadow or a known connectivity)",
            )?,
            fleet_things_connected: IntGauge::new(
                "umbra_fleet_things_connected",
                "Things whose device is connected now",
            )?,
            fleet_shadows_with_delta: IntGauge::new(
                "umbra_fleet_shadows_with_delta",
                "Shadows whose desired state differs from their reported state",
            )?,
        };
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.request_seconds.clone()))?;
        registry.register(Box::new(metrics.commit_seconds.clone()))?;
        registry.register(Box::new(metrics.batch_size.clone()))?;
        registry.register(Box::new(metrics.deltas_published.clone()))?;
        registry.register(Box::new(metrics.stream_subscribers.clone()))?;
        registry.register(Box::new(metrics.change_log_entries.clone()))?;
        registry.register(Box::new(metrics.change_log_bytes.clone()))?;
        registry.register(Box::new(metrics.http_requests.clone()))?;
        registry.register(Box::new(metrics.fleet_index_shadows.clone()))?;
        registry.register(Box::new(metrics.fleet_index_bytes.clone()))?;
        registry.register(Box::new(metrics.fleet_things.clone()))?;
        registry.register(Box::new(metrics.fleet_things_connected.clone()))?;
        registry.register(Box::new(metrics.fleet_shadows_with_delta.clone()))?;
        Ok(metrics)
    }
}
