//! Shared run statistics: counters, error tallies and HDR latency histograms with a per-second timeline.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Highest latency a histogram records (60 s, in microseconds); larger values are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

/// A monotonically increasing count shared between tasks.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn incr(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A level that goes up and down (connected clients), remembering its peak.
#[derive(Debug, Default)]
pub struct Gauge {
    value: AtomicI64,
    peak: AtomicI64,
}

impl Gauge {
    pub fn up(&self) {
        let now = self.value.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    pub fn down(&self) {
        self.value.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed).max(0).unsigned_abs()
    }
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed).max(0).unsigned_abs()
    }
}

/// Counts by kind (error kinds, rejection codes); kinds are few and fixed, never per device.
#[derive(Debug, Default)]
pub struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    pub fn add(&self, kind: &str) {
        let mut map = lock(&self.0);
        match map.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                map.insert(kind.to_owned(), 1);
            }
        }
    }
    pub fn total(&self) -> u64 {
        lock(&self.0).values().sum()
    }
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        lock(&self.0).clone()
    }
}

/// Latency over one reporting interval (one point of the latency-over-time chart).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct IntervalPoint {
    /// Seconds since the run started, at the end of the interval.
    pub t_s: f64,
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Failures over one reporting interval (one point of the failures-over-time chart).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FailurePoint {
    /// Seconds since the run started, at the end of the interval.
    pub t_s: f64,
    /// Errors (connection errors, dropped requests, ...) in the interval.
    pub errors: u64,
    /// Shadow rejections with code 429 (throttled) in the interval.
    pub throttled: u64,
    /// Other shadow rejections in the interval.
    pub rejected: u64,
}

/// The per-interval failure counts of a run, and the totals at the last tick.
#[derive(Debug, Default)]
pub struct FailureTimeline(Mutex<(FailurePoint, Vec<FailurePoint>)>);

impl FailureTimeline {
    pub fn points(&self) -> Vec<FailurePoint> {
        lock(&self.0).1.clone()
    }
}

struct LatencyInner {
    total: Histogram<u64>,
    interval: Histogram<u64>,
    timeline: Vec<IntervalPoint>,
}

/// A named latency measurement: a whole-run histogram, an interval histogram for the live
/// line, and the per-interval timeline for plots. Values are recorded in microseconds.
pub struct LatencySeries {
    name: &'static str,
    inner: Mutex<LatencyInner>,
}

impl std::fmt::Debug for LatencySeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencySeries")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn new_histogram() -> Histogram<u64> {
    // Bounds and precision are constants that hdrhistogram accepts; this cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl LatencySeries {
    pub fn new(name: &'static str) -> Self {
        LatencySeries {
            name,
            inner: Mutex::new(LatencyInner {
                total: new_histogram(),
                interval: new_histogram(),
                timeline: Vec::new(),
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(MAX_LATENCY_US)
            .clamp(1, MAX_LATENCY_US);
        let mut inner = lock(&self.inner);
        inner.total.saturating_record(us);
        inner.interval.saturating_record(us);
    }

    /// Closes the current interval: appends it to the timeline and starts a new one.
    pub fn tick(&self, t_s: f64) -> IntervalPoint {
        let mut inner = lock(&self.inner);
        let point = IntervalPoint {
            t_s,
            count: inner.interval.len(),
            p50_ms: us_to_ms(inner.interval.value_at_quantile(0.5)),
            p99_ms: us_to_ms(inner.interval.value_at_quantile(0.99)),
            max_ms: us_to_ms(inner.interval.max()),
        };
        inner.interval.reset();
        inner.timeline.push(point);
        point
    }

    pub fn summary(&self) -> LatencySummary {
        let inner = lock(&self.inner);
        let h = &inner.total;
        LatencySummary {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: us_to_ms(h.value_at_quantile(0.5)),
            p90_ms: us_to_ms(h.value_at_quantile(0.9)),
            p99_ms: us_to_ms(h.value_at_quantile(0.99)),
            p999_ms: us_to_ms(h.value_at_quantile(0.999)),
            max_ms: us_to_ms(h.max()),
        }
    }

    pub fn timeline(&self) -> Vec<IntervalPoint> {
        lock(&self.inner).timeline.clone()
    }

    /// (latency ms, quantile) pairs of the whole run, for the distribution chart.
    pub fn distribution(&self) -> Vec<(f64, f64)> {
        let inner = lock(&self.inner);
        let h = &inner.total;
        if h.is_empty() {
            return Vec::new();
        }
        [
            0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
        ]
        .iter()
        .map(|&q| (us_to_ms(h.value_at_quantile(q)), q))
        .collect()
    }
}

/// Whole-run latency figures of one series, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Everything a run measures. Modes use the counters that apply to them; mode-specific figures
/// go into the summary's `counts`.
#[derive(Debug)]
pub struct RunStats {
    pub started: Instant,
    /// Messages handed to the network by this process.
    pub messages_out: Counter,
    /// Messages received by this process.
    pub messages_in: Counter,
    /// Successful MQTT connects (CONNACK accepted).
    pub connects: Counter,
    pub connected: Gauge,
    /// Failures by kind (connection errors, dropped requests, ...).
    pub errors: Tally,
    /// Shadow rejections by code.
    pub rejected: Tally,
    /// Answers that are part of normal operation though they look like
    /// failures (a first `get`'s 404: the shadow does not exist yet),
    /// counted apart from errors and rejections.
    pub expected: Tally,
    pub latencies: Vec<Arc<LatencySeries>>,
    /// Errors and rejections per interval, for plots.
    pub failures: FailureTimeline,
}

impl RunStats {
    pub fn new(latency_names: &[&'static str]) -> Arc<Self> {
        Arc::new(RunStats {
            started: Instant::now(),
            messages_out: Counter::default(),
            messages_in: Counter::default(),
            connects: Counter::default(),
            connected: Gauge::default(),
            errors: Tally::default(),
            rejected: Tally::default(),
            expected: Tally::default(),
            latencies: latency_names
                .iter()
                .map(|name| Arc::new(LatencySeries::new(name)))
                .collect(),
            failures: FailureTimeline::default(),
        })
    }

    /// Closes a failure interval at `t_s` seconds: what was counted since
    /// the last one becomes a point of [`RunStats::failures`].
    pub fn tick_failures(&self, t_s: f64) {
        let rejected = self.rejected.snapshot();
        let throttled = rejected.get("429").copied().unwrap_or(0);
        let totals = FailurePoint {
            t_s,
            errors: self.errors.total(),
            throttled,
            rejected: rejected.values().sum::<u64>() - throttled,
        };
        let mut timeline = lock(&self.failures.0);
        let (last, points) = &mut *timeline;
        let point = FailurePoint {
            t_s,
            errors: totals.errors.saturating_sub(last.errors),
            throttled: totals.throttled.saturating_sub(last.throttled),
            rejected: totals.rejected.saturating_sub(last.rejected),
        };
        *last = totals;
        points.push(point);
    }

    /// The latency series registered under `name` at construction.
    pub fn latency(&self, name: &str) -> Option<Arc<LatencySeries>> {
        self.latencies.iter().find(|s| s.name() == name).cloned()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: statistics stay
/// usable and the panic itself is reported by the task's join.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_series_summarises_and_ticks() {
        let series = LatencySeries::new("x");
        for ms in 1..=100 {
            series.record(Duration::from_millis(ms));
        }
        let point = series.tick(1.0);
        assert_eq!(point.count, 100);
        assert!((point.p50_ms - 50.0).abs() < 0.1, "{point:?}");
        let empty = series.tick(2.0);
        assert_eq!(empty.count, 0);
        let summary = series.summary();
        assert_eq!(summary.count, 100);
        assert!((summary.p99_ms - 99.0).abs() < 0.1);
        assert!((summary.max_ms - 100.0).abs() < 0.1);
        assert_eq!(series.timeline().len(), 2);
        series.record(Duration::from_secs(3600));
        assert!((series.summary().max_ms - 60_000.0).abs() < 60.0);
    }

    #[test]
    fn gauge_keeps_peak_and_tally_counts() {
        let gauge = Gauge::default();
        gauge.up();
        gauge.up();
        gauge.down();
        assert_eq!((gauge.get(), gauge.peak()), (1, 2));
        let tally = Tally::default();
        tally.add("429");
        tally.add("429");
        tally.add("409");
        assert_eq!(tally.total(), 3);
        assert_eq!(tally.snapshot().get("429"), Some(&2));
    }
}
