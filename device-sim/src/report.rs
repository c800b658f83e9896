//! Reporting: the live progress line (stderr, once per second), the end-of-run summary as a text
//! table or JSON.

use crate::stats::{FailurePoint, IntervalPoint, LatencySummary, RunStats};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The machine-readable result of one run (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub command: String,
    pub broker: String,
    /// Length of the measured window in seconds (rates are per second of it).
    pub duration_s: f64,
    pub messages_out: u64,
    pub messages_in: u64,
    pub messages_out_per_s: f64,
    pub messages_in_per_s: f64,
    pub connects: u64,
    pub connects_per_s: f64,
    pub peak_connected: u64,
    /// Mode-specific counts (sent, received, expected, lost, accepted, ...).
    pub counts: BTreeMap<String, u64>,
    /// Mode-specific rates per second.
    pub rates: BTreeMap<String, f64>,
    pub errors: BTreeMap<String, u64>,
    /// Shadow rejections by code.
    pub rejected: BTreeMap<String, u64>,
    /// Answers of normal operation that look like failures (see
    /// [`RunStats::expected`]).
    pub expected: BTreeMap<String, u64>,
    pub latency: BTreeMap<String, LatencySummary>,
    pub notes: Vec<String>,
    /// Per-second latency points per series (for plots; left out of the JSON to keep it short).
    #[serde(skip)]
    pub timelines: Vec<(String, Vec<IntervalPoint>)>,
    /// (latency ms, quantile) per series, for the distribution chart.
    #[serde(skip)]
    pub distributions: Vec<(String, Vec<(f64, f64)>)>,
    /// Errors and rejections per second, for the failures chart.
    #[serde(skip)]
    pub failures: Vec<FailurePoint>,
}

impl Summary {
    /// Collects the shared figures of `stats` over a measured window of `window`.
    pub fn from_stats(command: &str, broker: &str, stats: &RunStats, window: Duration) -> Self {
        let secs = window.as_secs_f64().max(1e-9);
        let messages_out = stats.messages_out.get();
        let messages_in = stats.messages_in.get();
        let connects = stats.connects.get();
        Summary {
            command: command.to_owned(),
            broker: broker.to_owned(),
            duration_s: secs,
            messages_out,
            messages_in,
            messages_out_per_s: messages_out as f64 / secs,
            messages_in_per_s: messages_in as f64 / secs,
            connects,
            connects_per_s: connects as f64 / secs,
            peak_connected: stats.connected.peak(),
            counts: BTreeMap::new(),
            rates: BTreeMap::new(),
            errors: stats.errors.snapshot(),
            rejected: stats.rejected.snapshot(),
            expected: stats.expected.snapshot(),
            latency: stats
                .latencies
                .iter()
                .map(|s| (s.name().to_owned(), s.summary()))
                .collect(),
            notes: Vec::new(),
            timelines: stats
                .latencies
                .iter()
                .map(|s| (s.name().to_owned(), s.timeline()))
                .collect(),
            distributions: stats
                .latencies
                .iter()
                .map(|s| (s.name().to_owned(), s.distribution()))
                .collect(),
            failures: stats.failures.points(),
        }
    }

    /// The human-readable summary table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== device-sim {} against {} ==",
            self.command, self.broker
        );
        let _ = writeln!(out, "{:<28}{:>14.1} s", "measured window", self.duration_s);
        let rows: [(&str, u64, f64); 3] = [
            ("messages out", self.messages_out, self.messages_out_per_s),
            ("messages in", self.messages_in, self.messages_in_per_s),
            ("connects", self.connects, self.connects_per_s),
        ];
        for (name, count, rate) in rows {
            let _ = writeln!(out, "{name:<28}{count:>14}   {rate:>12.1}/s");
        }
        let _ = writeln!(out, "{:<28}{:>14}", "peak connected", self.peak_connected);
        for (name, count) in &self.counts {
            let _ = writeln!(out, "{name:<28}{count:>14}");
        }
        for (name, rate) in &self.rates {
            let _ = writeln!(out, "{name:<28}{:>14}   {rate:>12.1}/s", "");
        }
        if !self.latency.is_empty() {
            let _ = writeln!(
                out,
                "{:<28}{:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
                "latency (ms)", "p50", "p90", "p99", "p99.9", "max", "count"
            );
            for (name, l) in &self.latency {
                let _ = writeln!(
                    out,
                    "  {name:<26}{:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10}",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
                );
            }
        }
        if self.errors.is_empty() && self.rejected.is_empty() {
            let _ = writeln!(out, "errors: none");
        } else {
            for (kind, n) in &self.errors {
                let _ = writeln!(out, "error {kind:<22}{n:>14}");
            }
            for (code, n) in &self.rejected {
                let _ = writeln!(out, "rejected {code:<19}{n:>14}");
            }
        }
        for (what, n) in &self.expected {
            let _ = writeln!(out, "expected: {what} {n}");
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}

/// The live progress line of a run: started with the run, stopped before its summary.
#[derive(Debug)]
pub struct ProgressLine {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressLine {
    /// Starts printing; `measure_from` is the time zero of the latency timeline.
    pub fn start(stats: &Arc<RunStats>, measure_from: Instant, quiet: bool) -> ProgressLine {
        let stop = CancellationToken::new();
        let task = tokio::spawn(progress(
            Arc::clone(stats),
            measure_from,
            quiet,
            stop.clone(),
        ));
        ProgressLine { stop, task }
    }

    /// Stops printing and waits for the last interval to close.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(err) = self.task.await {
            if err.is_panic() {
                std::panic::resume_unwind(err.into_panic());
            }
        }
    }
}

/// Prints one progress line per second to stderr and closes each latency interval, until
/// `stop` is cancelled. `measure_from` is the time zero of the latency timeline.
async fn progress(
    stats: Arc<RunStats>,
    measure_from: Instant,
    quiet: bool,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut last = (
        stats.messages_out.get(),
        stats.messages_in.get(),
        stats.connects.get(),
    );
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let dt = now.duration_since(last_at).as_secs_f64().max(1e-9);
        let current = (
            stats.messages_out.get(),
            stats.messages_in.get(),
            stats.connects.get(),
        );
        let t = now.saturating_duration_since(measure_from).as_secs_f64();
        stats.tick_failures(t);
        let mut latency = String::new();
        for series in &stats.latencies {
            let point = series.tick(t);
            if point.count > 0 {
                let _ = write!(
                    latency,
                    " | {} p50 {:.2}ms p99 {:.2}ms",
                    series.name(),
                    point.p50_ms,
                    point.p99_ms
                );
            }
        }
        if !quiet {
            let line = format!(
                "[{:>5.0}s] connected {:>6} | out {:>9.0}/s | in {:>9.0}/s | connects {:>6.0}/s | errors {}{}",
                stats.elapsed().as_secs_f64(),
                stats.connected.get(),
                (current.0 - last.0) as f64 / dt,
                (current.1 - last.1) as f64 / dt,
                (current.2 - last.2) as f64 / dt,
                stats.errors.total() + stats.rejected.total(),
                latency
            );
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "{line}");
        }
        last = current;
        last_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_json_carry_the_figures() {
        let stats = RunStats::new(&["e2e"]);
        stats.messages_out.add(1000);
        stats.messages_in.add(900);
        stats.connects.add(10);
        stats.errors.add("timeout");
        if let Some(series) = stats.latency("e2e") {
            series.record(Duration::from_millis(3));
        }
        let mut summary =
            Summary::from_stats("bench relay", "mqtt://x:1", &stats, Duration::from_secs(10));
        summary.counts.insert("lost".into(), 100);
        let table = summary.table();
        assert!(table.contains("messages out"), "{table}");
        assert!(table.contains("100.0/s"), "{table}");
        assert!(table.contains("lost"), "{table}");
        assert!(table.contains("timeout"), "{table}");
        let json = serde_json::to_value(&summary).unwrap_or_default();
        assert_eq!(json["messages_in"], 900);
        assert_eq!(json["counts"]["lost"], 100);
        assert_eq!(json["latency"]["e2e"]["count"], 1);
        assert!(json.get("timelines").is_none());
    }
}
