//! Fleet search over 100,000 stored shadows (`UMBRA_BENCH_FLEET=N` for another size): the fleet index is loaded from
//! a real SQLite store (as at start-up), then typical queries are timed,
//! each scanning the whole fleet for one page of results.
//!
//! `cargo bench -p umbra-shadow --bench search`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde_json::json;
use umbra_shadow::engine::Command;
use umbra_shadow::fleet::FleetIndex;
use umbra_shadow::request::parse_update;
use umbra_shadow::search::Query;
use umbra_shadow::store::{Job, ShadowStore};
use umbra_shadow::{Limits, ShadowKey, SqliteStore, StoreConfig, Synchronous};

/// Shadows in the fleet; `UMBRA_BENCH_FLEET` overrides.
fn fleet_size() -> u64 {
    std::env::var("UMBRA_BENCH_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn payload(i: u64) -> Vec<u8> {
    let mode = ["eco", "comfort", "off"][(i % 3) as usize];
    let reported_mode = ["eco", "comfort", "off"][(i / 3 % 3) as usize];
    serde_json::to_vec(&json!({
        "state": {
            "desired": {"mode": mode, "setpoint": 18 + i % 6},
            "reported": {"mode": reported_mode, "setpoint": 18 + i % 5, "temp": (i % 400) as f64 / 10.0,
                         "battery": i % 100, "fw": {"version": format!("1.{}.0", i % 4)}}
        }
    }))
    .unwrap_or_default()
}

/// Writes the fleet through the store and loads an index from it.
fn build_fleet(dir: &std::path::Path) -> FleetIndex {
    let fleet = fleet_size();
    let limits = Limits::default();
    let config = StoreConfig {
        synchronous: Synchronous::Normal,
        ..StoreConfig::new(dir.join("fleet.db"))
    };
    let (store, mut committed) = SqliteStore::open(config, limits.clone()).expect("open");
    let drain = std::thread::spawn(move || {
        let mut done = 0u64;
        while done < fleet + fleet / 2 {
            match committed.blocking_recv() {
                Some(batch) => done += batch.len() as u64,
                None => break,
            }
        }
    });
    let started = Instant::now();
    for i in 0..fleet {
        let prefix = ["sensor", "lamp", "gw", "meter"][(i % 4) as usize];
        let job = Job::Shadow {
            key: ShadowKey::classic(format!("{prefix}-{i:06}")),
            command: Command::Update(parse_update(&payload(i), &limits).expect("valid")),
            ticket: None,
        };
        if i % 2 == 0 {
            let presence = Job::Presence {
                thing: format!("{prefix}-{i:06}"),
                connected: i % 4 == 0,
                at_ms: 1_700_000_000_000 + i as i64,
                reason: None,
            };
            submit(&store, presence);
        }
        submit(&store, job);
    }
    drain.join().expect("drain");
    eprintln!("wrote {fleet} shadows in {:?}", started.elapsed());
    let rss_before = rss_kib();
    let started = Instant::now();
    let index = FleetIndex::new();
    index.load(|each| store.fleet_snapshot(each));
    let size = index.size().expect("loaded");
    eprintln!(
        "loaded the fleet index in {:?} (RSS +{} MiB; index ~{} bytes per shadow)",
        started.elapsed(),
        rss_kib().saturating_sub(rss_before) / 1024,
        size.bytes / size.shadows.max(1)
    );
    store.close().expect("close");
    index
}

/// Submits, waiting while the writer's queue is full.
fn submit(store: &SqliteStore, job: Job) {
    let mut job = Some(job);
    while let Some(j) = job.take() {
        // `submit` consumes the job even when refusing it: keep a copy to retry.
        let retry = clone_job(&j);
        if store.submit(j).is_err() {
            std::thread::sleep(Duration::from_millis(1));
            job = retry;
        }
    }
}

fn clone_job(job: &Job) -> Option<Job> {
    match job {
        Job::Shadow { key, command, .. } => Some(Job::Shadow {
            key: key.clone(),
            command: command.clone(),
            ticket: None,
        }),
        Job::Presence {
            thing,
            connected,
            at_ms,
            reason,
        } => Some(Job::Presence {
            thing: thing.clone(),
            connected: *connected,
            at_ms: *at_ms,
            reason: reason.clone(),
        }),
        // Its reply cannot be cloned; the benchmark submits none.
        Job::Forget { .. } => None,
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn search(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Arc::new(build_fleet(dir.path()));
    let mut group = c.benchmark_group(format!("search {} shadows", fleet_size()));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for query in [
        "thingName:sensor-01*",
        "shadow.reported.temp>39.5",
        "shadow.desired.mode:eco AND shadow.hasDelta:true AND shadow.reported.battery:7",
        "connectivity.connected:true AND shadow.reported.temp:[20 TO 20.5] AND shadow.reported.fw.version:1.3.0",
        "NOT shadow.reported.mode:off AND (thingName:gw-* OR thingName:lamp-*) AND shadow.reported.setpoint>=22 AND shadow.reported.battery<1",
    ] {
        let parsed = Query::parse(query).expect("valid query");
        let (found, _) = index
            .search(Some(&parsed), None, 250, |t| t.name().to_string())
            .expect("index ready");
        eprintln!("{query}: {} on the first page", found.len());
        group.bench_with_input(BenchmarkId::new("page of 250", query), &query, |b, q| {
            b.iter(|| {
                let parsed = Query::parse(q).expect("valid query");
                index
                    .search(Some(&parsed), None, 250, |t| t.to_json())
                    .map(|(page, _)| page.len())
            })
        });
    }
    group.bench_function("list first page of 25", |b| {
        b.iter(|| {
            index
                .search(None, None, 25, |t| t.name().len())
                .map(|(p, _)| p.len())
        })
    });
    group.finish();
}

criterion_group!(benches, search);
criterion_main!(benches);
