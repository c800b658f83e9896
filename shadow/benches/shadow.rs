//! Benchmarks of the shadow engine: merge + delta per update (pure), and
//! durable store throughput (updates/s) by group-commit batch size and sync mode.
//!
//! `cargo bench -p umbra-shadow --bench shadow`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use umbra_shadow::engine::{self, Command};
use umbra_shadow::request::parse_update;
use umbra_shadow::store::{Job, ShadowStore};
use umbra_shadow::{Limits, ShadowKey, SqliteStore, StoreConfig, Synchronous};

fn update_payload(i: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "state": {
            "desired": {"mode": "eco", "setpoint": 20 + (i % 5), "schedule": {"on": "07:00", "off": "23:00"}},
            "reported": {"mode": "eco", "setpoint": 20 + (i % 7), "temp": 21.5, "battery": 87,
                         "fw": {"version": "1.4.2", "channel": "stable"}}
        },
        "clientToken": format!("t-{i}")
    }))
    .unwrap_or_default()
}

fn merge_and_delta(c: &mut Criterion) {
    let limits = Limits::default();
    let key = ShadowKey::classic("bench");
    let first = parse_update(&update_payload(0), &limits).expect("valid");
    let stored = engine::apply(&key, None, &Command::Update(first), 1, &limits)
        .expect("applied")
        .store;
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse+merge+delta per update", |b| {
        let mut i = 1;
        b.iter(|| {
            i += 1;
            let update = parse_update(&update_payload(i), &limits).expect("valid");
            let applied =
                engine::apply(&key, stored.as_ref(), &Command::Update(update), 2, &limits)
                    .expect("applied");
            applied.store.map(|s| s.state.delta())
        })
    });
    group.finish();
}

/// Submits `count` updates over 1,000 shadows and waits until all committed.
fn run_updates(
    store: &SqliteStore,
    committed: &mut tokio::sync::mpsc::Receiver<Vec<umbra_shadow::store::Committed>>,
    count: u64,
    offset: u64,
) -> Duration {
    let limits = Limits::default();
    let jobs: Vec<Job> = (0..count)
        .map(|i| Job::Shadow {
            key: ShadowKey::classic(format!("dev-{}", (offset + i) % 1000)),
            command: Command::Update(
                parse_update(&update_payload(offset + i), &limits).expect("valid"),
            ),
            ticket: None,
        })
        .collect();
    let start = Instant::now();
    for job in jobs {
        store.submit(job).expect("queued");
    }
    let mut done = 0;
    while done < count {
        let batch = committed.blocking_recv().expect("writer alive");
        done += batch.len() as u64;
    }
    start.elapsed()
}

fn store_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    for sync in [Synchronous::Full, Synchronous::Normal] {
        for batch in [1usize, 16, 256] {
            let count: u64 = if batch == 1 { 256 } else { 4096 };
            let dir = tempfile::tempdir().expect("tempdir");
            let config = StoreConfig {
                synchronous: sync,
                max_batch: batch,
                queue_capacity: 8192,
                ..StoreConfig::new(dir.path().join("bench.db"))
            };
            let (store, mut committed) =
                SqliteStore::open(config, Limits::default()).expect("open");
            group.throughput(Throughput::Elements(count));
            let name = format!("{sync:?}").to_lowercase();
            let mut offset = 0;
            group.bench_with_input(
                BenchmarkId::new(name, format!("batch {batch}")),
                &batch,
                |b, _| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += run_updates(&store, &mut committed, count, offset);
                            offset += count;
                        }
                        total
                    })
                },
            );
            store.close().expect("close");
        }
    }
    group.finish();
}

criterion_group!(benches, merge_and_delta, store_throughput);
criterion_main!(benches);
