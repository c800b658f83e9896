//! A million shadows on one node, end to end through the `umbra` binary:
//! `umbra import` of 1,000,000 shadows, then a restart on that data
//! directory, timing the first answered `get` and `/readyz`, the resident
//! memory once idle (against an empty node), the fleet index's own estimate
//! of its size, and the latency of the README's search queries over HTTP.
//!
//! `cargo bench -p umbra-broker --bench million` (about three minutes;
//! `UMBRA_BENCH_SHADOWS=N` for another count, `UMBRA_BENCH_ORDER=random` to
//! list the fleet shuffled in the import file, `UMBRA_BENCH_SORT_CHUNK=N`
//! for `umbra import --sort-chunk N`: 1 stores the fleet in the file's
//! order, as devices that created their shadows in random order would have).
//! Prints a Markdown table.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const UMBRA: &str = env!("CARGO_BIN_EXE_umbra");

/// The README's search query table.
const QUERIES: [&str; 5] = [
    "thingName:sensor-01*",
    "shadow.reported.temp>39.5",
    "shadow.desired.mode:eco AND shadow.hasDelta:true AND shadow.reported.battery:7",
    "connectivity.connected:true AND shadow.reported.temp:[20 TO 20.5] AND shadow.reported.fw.version:1.3.0",
    "NOT shadow.reported.mode:off AND (thingName:gw-* OR thingName:lamp-*) AND shadow.reported.setpoint>=22 AND shadow.reported.battery<1",
];
/// Runs of each query.
const RUNS: usize = 40;
/// Idle time before memory is read: jemalloc returns freed pages after ~10 s.
const SETTLE: Duration = Duration::from_secs(15);

/// Thing `i`: 2 desired and 5 reported keys (one of them nested).
fn line(i: u64) -> String {
    let prefix = ["sensor", "lamp", "gw", "meter"][(i % 4) as usize];
    let mode = ["eco", "comfort", "off"][(i % 3) as usize];
    let reported_mode = ["eco", "comfort", "off"][(i / 3 % 3) as usize];
    json!({
        "thing": format!("{prefix}-{i:07}"),
        "state": {
            "desired": {"mode": mode, "setpoint": 18 + i % 6},
            "reported": {"mode": reported_mode, "setpoint": 18 + i % 5, "temp": (i % 400) as f64 / 10.0,
                         "battery": i % 100, "fw": {"version": format!("1.{}.0", i % 4)}}
        }
    })
    .to_string()
}

struct Node {
    child: Child,
    http: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `umbra` on `data`; returns once it printed its HTTP address.
fn start(data: &Path) -> (Node, Instant) {
    let started = Instant::now();
    let mut child = Command::new(UMBRA)
        .args(["--mqtt-addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("umbra starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let http = loop {
        let line = lines.next().expect("umbra prints").expect("stdout");
        if let Some(rest) = line.strip_prefix("umbra: http listening on ") {
            break rest.split(' ').next().expect("address").to_string();
        }
    };
    // Keep draining stdout so umbra never blocks on it.
    std::thread::spawn(move || lines.for_each(drop));
    (
        Node {
            child,
            http: format!("http://{http}"),
        },
        started,
    )
}

/// Polls `path` until it answers 200; the time since `since`.
fn until_ok(node: &Node, path: &str, since: Instant) -> Duration {
    let url = format!("{}{path}", node.http);
    loop {
        if ureq::get(&url).call().is_ok() {
            return since.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn rss_mib(node: &Node) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", node.child.id())).expect("proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

fn metric(node: &Node, name: &str) -> f64 {
    let text = ureq::get(&format!("{}/metrics", node.http))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let shadows: u64 = std::env::var("UMBRA_BENCH_SHADOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    let data = dir.path().join("data");
    let file = dir.path().join("fleet.jsonl");

    // In the order of `i` (four name prefixes interleaved), or with
    // `UMBRA_BENCH_ORDER=random` shuffled, as a fleet of random names is stored.
    let mut order: Vec<u64> = (0..shadows).collect();
    if std::env::var("UMBRA_BENCH_ORDER").is_ok_and(|o| o == "random") {
        use rand::{seq::SliceRandom, SeedableRng};
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(14));
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(&file).expect("create"));
    for i in order {
        writeln!(out, "{}", line(i)).expect("write");
    }
    drop(out);
    eprintln!("wrote {shadows} lines to {}", file.display());

    let started = Instant::now();
    let status = Command::new(UMBRA)
        .arg("--data-dir")
        .arg(&data)
        .arg("import")
        .arg(&file)
        .args(
            std::env::var("UMBRA_BENCH_SORT_CHUNK")
                .map(|n| vec!["--sort-chunk".to_string(), n])
                .unwrap_or_default(),
        )
        .stderr(Stdio::inherit())
        .status()
        .expect("import runs");
    assert!(status.success(), "import failed");
    let import = started.elapsed();
    let db_bytes = std::fs::metadata(data.join("umbra.db")).map_or(0, |m| m.len())
        + std::fs::metadata(data.join("umbra.db-wal")).map_or(0, |m| m.len());

    // The reference: an idle node with nothing stored.
    let (node, since) = start(&empty);
    until_ok(&node, "/readyz", since);
    std::thread::sleep(SETTLE);
    let rss_empty = rss_mib(&node);
    drop(node);

    let (node, since) = start(&data);
    let first_get = until_ok(&node, "/things/sensor-0000000/shadow", since);
    let ready = until_ok(&node, "/readyz", since);
    std::thread::sleep(SETTLE);
    let rss = rss_mib(&node);
    let index_bytes = metric(&node, "umbra_fleet_index_bytes");
    let indexed = metric(&node, "umbra_fleet_index_shadows");
    assert_eq!(indexed as u64, shadows, "every shadow indexed");

    let mut rows = Vec::new();
    for query in QUERIES {
        let url = format!("{}/v1/search", node.http);
        let mut times = Vec::with_capacity(RUNS);
        let mut found = 0;
        for _ in 0..RUNS {
            let t = Instant::now();
            let page: serde_json::Value = ureq::get(&url)
                .query("q", query)
                .query("pageSize", "250")
                .call()
                .expect("search answered")
                .into_json()
                .expect("JSON");
            times.push(t.elapsed());
            found = page["things"].as_array().map_or(0, Vec::len);
        }
        times.sort();
        rows.push((
            query,
            found,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
        ));
    }
    drop(node);

    let per_shadow = |mib: f64| mib * 1024.0 * 1024.0 / shadows as f64;
    println!("| what | measured |");
    println!("|---|---|");
    println!(
        "| `umbra import` of {shadows} shadows | {:.1} s ({:.0}/s); database {:.0} MiB |",
        import.as_secs_f64(),
        shadows as f64 / import.as_secs_f64(),
        db_bytes as f64 / 1048576.0
    );
    println!("| restart to first answered `get` | {} |", ms(first_get));
    println!("| restart to `/readyz` 200 | {} |", ms(ready));
    println!(
        "| RSS idle | {rss:.0} MiB (empty node {rss_empty:.0} MiB: {:.0} bytes per shadow) |",
        per_shadow(rss - rss_empty)
    );
    println!(
        "| fleet index (its own estimate) | {:.0} MiB, {:.0} bytes per shadow |",
        index_bytes / 1048576.0,
        index_bytes / shadows as f64
    );
    println!();
    println!("| query (page of 250, over HTTP) | on the page | p50 | p99 |");
    println!("|---|---|---|---|");
    for (query, found, p50, p99) in rows {
        println!("| `{query}` | {found} | {} | {} |", ms(p50), ms(p99));
    }
}
