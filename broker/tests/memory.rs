//! Measures router memory per device: each device holds its own shadow
//! answer filters, and every distinct filter gets its own commit log.
//! Run alone (RSS is per process):
//! `cargo test -p umbra-broker --release --test memory -- --ignored --nocapture`.

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{local::LinkBuilder, Notification, Router, RouterConfig};

const DEVICES: usize = 2_000;
const ANSWER_FILTERS: [&str; 5] = [
    "update/accepted",
    "update/rejected",
    "update/delta",
    "get/accepted",
    "get/rejected",
];

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

/// Waits until `rx` received `count` notifications matching `pick`.
fn await_notifications(rx: &mut LinkRx, count: usize, pick: fn(&Notification) -> bool) {
    let mut seen = 0;
    while seen < count {
        if let Some(notification) = rx.recv().expect("router alive") {
            if pick(&notification) {
                seen += 1;
            }
        }
    }
}

/// Returns (idle KiB/device, KiB/device after one answer each).
fn measure(filters_per_device: usize) -> (f64, f64) {
    let config = RouterConfig {
        max_connections: DEVICES + 10,
        max_outgoing_packet_count: 200,
        max_segment_size: 64 * 1024,
        max_segment_count: 2,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let router_tx = Router::new(0, config).spawn();
    let (mut publisher, _publisher_rx, _) = LinkBuilder::new("publisher", router_tx.clone())
        .build()
        .expect("link");
    let before = rss_kib();
    let mut links: Vec<(LinkTx, LinkRx)> = Vec::with_capacity(DEVICES);
    for device in 0..DEVICES {
        let (mut tx, rx, _) = LinkBuilder::new(&format!("dev{device}"), router_tx.clone())
            .build()
            .expect("link");
        for op in ANSWER_FILTERS.iter().take(filters_per_device) {
            tx.subscribe(format!("umbra-aws/things/dev{device}/shadow/{op}"))
                .expect("subscribe");
        }
        links.push((tx, rx));
    }
    for (_, rx) in &mut links {
        await_notifications(rx, filters_per_device, |n| {
            matches!(n, Notification::DeviceAck(_))
        });
    }
    let subscribed = rss_kib();
    for device in 0..DEVICES {
        publisher
            .publish(
                format!("umbra-aws/things/dev{device}/shadow/update/accepted"),
                vec![b'x'; 200],
            )
            .expect("publish");
    }
    for (_, rx) in &mut links {
        await_notifications(rx, 1, |n| matches!(n, Notification::Forward(_)));
    }
    let published = rss_kib();
    (
        (subscribed - before) as f64 / DEVICES as f64,
        (published - before) as f64 / DEVICES as f64,
    )
}

#[test]
#[ignore = "measurement; run alone with --nocapture"]
fn router_memory_per_device() {
    for filters in [1, ANSWER_FILTERS.len()] {
        let (idle, answered) = measure(filters);
        println!(
            "devices={DEVICES} filters/device={filters}: idle {idle:.1} KiB/device, \
             after one 200-byte answer each {answered:.1} KiB/device"
        );
    }
}
