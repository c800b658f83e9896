//! What an idle device costs the `umbra` process: N raw MQTT 3.1.1 clients
//! connect to the real binary, each subscribing to its five shadow answer
//! topics and storing one shadow; the process's resident memory must grow
//! by at most the per-device budget.

mod support;

use bytes::BytesMut;
use rumqttd::protocol::{
    self as wire, Connect, Filter, Packet, Publish, QoS, RetainForwardRule, Subscribe,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use umbra_broker::codec::Codec;

use support::{spawn_with, WAIT};

const DEVICES: usize = 2_000;
/// The budget per idle device (DESIGN.md), with the default settings: the
/// writer's cache of decoded shadows on, and the fleet index sharing the
/// shadows that the cache holds.
const BUDGET_BYTES: u64 = 8 * 1024;
const ANSWERS: [&str; 5] = [
    "update/accepted",
    "update/rejected",
    "update/delta",
    "get/accepted",
    "get/rejected",
];

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn encode(packets: Vec<Packet>) -> Vec<u8> {
    let mut out = BytesMut::new();
    for packet in packets {
        Codec::V4.write(packet, &mut out).expect("encodes");
    }
    out.to_vec()
}

/// CONNECT, SUBSCRIBE to the answers, one reported update (QoS 1).
fn device_packets(thing: &str) -> Vec<u8> {
    let filters = ANSWERS
        .iter()
        .map(|op| Filter {
            path: format!("$aws/things/{thing}/shadow/{op}"),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::Never,
        })
        .collect();
    let mut update = Publish::new(
        format!("$aws/things/{thing}/shadow/update"),
        r#"{"state":{"reported":{"temp":21.5,"fw":"1.3.0"}}}"#.to_owned(),
        false,
    );
    update.qos = QoS::AtLeastOnce;
    update.pkid = 2;
    encode(vec![
        Packet::Connect(
            Connect {
                keep_alive: 60,
                client_id: thing.to_owned(),
                clean_session: true,
            },
            None,
            None,
            None,
            None,
        ),
        Packet::Subscribe(Subscribe { pkid: 1, filters }, None),
        Packet::Publish(update, None),
    ])
}

/// Reads until the update is accepted (its answer arrives on a subscribed topic).
async fn until_accepted(stream: &mut TcpStream, thing: &str) {
    let accepted = format!("$aws/things/{thing}/shadow/update/accepted");
    let mut buffer = BytesMut::new();
    loop {
        match Codec::V4.read(&mut buffer, 1 << 20) {
            Ok(Packet::Publish(p, _)) if p.topic == accepted.as_bytes() => return,
            Ok(_) => continue,
            Err(wire::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("{thing}: bad packet from umbra: {e}"),
        }
        let read = tokio::time::timeout(WAIT, stream.read_buf(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("{thing}: no answer in time"))
            .expect("read");
        assert!(read > 0, "{thing}: umbra closed the connection");
    }
}

/// A device that connected, subscribed and stored its shadow, left idle.
async fn idle_device(addr: std::net::SocketAddr, thing: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&device_packets(thing))
        .await
        .expect("send");
    until_accepted(&mut stream, thing).await;
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_device_costs_at_most_its_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("umbra.toml");
    std::fs::write(&config, "[shadow]\nrequests_per_second = 0\n").expect("config");
    let umbra = spawn_with(
        &dir.path().join("data"),
        &["--config", config.to_str().expect("utf-8 path")],
    )
    .await;
    let pid = umbra.child.id().expect("running");
    // A few devices first, so that one-time allocations (pools, tables)
    // are not counted per device.
    let mut warm = Vec::new();
    for i in 0..50 {
        warm.push(idle_device(umbra.mqtt, &format!("warm-{i:04}")).await);
    }
    let before = rss_bytes(pid);
    // One device after the other: what is measured is what idle devices
    // keep, not the transient memory of thousands of requests at once
    // (which the allocator keeps mapped, in amounts that vary by run).
    let mut devices = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        devices.push(idle_device(umbra.mqtt, &format!("idle-{i:05}")).await);
    }
    // Every shadow is stored and indexed: the service indexes a change
    // before it answers.
    let after = rss_bytes(pid);
    let per_device = after.saturating_sub(before) / DEVICES as u64;
    println!("{DEVICES} idle devices: {per_device} bytes each (RSS {before} -> {after})");
    assert!(
        per_device <= BUDGET_BYTES,
        "an idle device costs {per_device} bytes, budget {BUDGET_BYTES}"
    );
}
