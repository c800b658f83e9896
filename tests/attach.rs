//! Attach mode: Umbra without a broker of its own, serving shadow requests
//! as a client of Debian's Mosquitto, alone on SQLite and as two nodes on
//! one PostgreSQL database.

use std::net::SocketAddr;

use serde_json::{json, Value};
use umbra_broker::{Config, Server};
use umbra_tests::{http, start, test_config, wait_ready, Device, Mosquitto, REMAPPED_REQUESTS};

#[path = "../shadow/tests/support/postgres.rs"]
mod postgres;

/// A node attached to `mosquitto` as `client_id`, taking the requests it
/// remaps.
fn attached(data_dir: &std::path::Path, mosquitto: &Mosquitto, client_id: &str) -> Config {
    let mut config = test_config(data_dir);
    config.mqtt.attach = Some(mosquitto.url());
    config.mqtt.attach_client.client_id = client_id.into();
    config.mqtt.attach_client.request_prefix = REMAPPED_REQUESTS.into();
    config
}

fn broker(mosquitto: &Mosquitto) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], mosquitto.port))
}

fn shadow_url(server: &Server, thing: &str) -> String {
    format!("http://{}/things/{thing}/shadow", server.addrs().http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto"]
async fn an_attached_node_serves_devices_on_another_broker() {
    let mosquitto = Mosquitto::start_remapping_requests();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(attached(dir.path(), &mosquitto, "umbra-solo")).await;
    assert_eq!(server.addrs().mqtt, None, "no broker of its own");
    wait_ready(server.addrs().http).await;

    let mut lamp = Device::connect(broker(&mosquitto), "lamp-1").await;
    lamp.subscribe("$aws/things/lamp-1/shadow/update/+").await;
    let update = json!({"state": {"reported": {"on": false}}, "clientToken": "t1"});
    lamp.publish("$aws/things/lamp-1/shadow/update", update.to_string())
        .await;
    let accepted = lamp
        .next_on("$aws/things/lamp-1/shadow/update/accepted")
        .await;
    assert_eq!(accepted["version"], 1, "{accepted}");
    assert_eq!(accepted["clientToken"], "t1");

    // An operator's change reaches the device through Mosquitto.
    let (status, _) = http(
        "POST",
        shadow_url(&server, "lamp-1"),
        Some(json!({"state": {"desired": {"on": true}}}).to_string()),
    )
    .await;
    assert_eq!(status, 200);
    let delta = lamp.next_on("$aws/things/lamp-1/shadow/update/delta").await;
    assert_eq!(delta["state"], json!({"on": true}), "{delta}");
    assert_eq!(delta["version"], 2);

    // A malformed request is answered on /rejected, as AWS does.
    lamp.publish("$aws/things/lamp-1/shadow/update", "{not json")
        .await;
    let rejected = lamp
        .next_on("$aws/things/lamp-1/shadow/update/rejected")
        .await;
    assert_eq!(rejected["code"], 400, "{rejected}");
    server.shutdown().await;
}

/// Attached over TLS: Umbra verifies the broker's certificate against the
/// CA it is given, and serves devices as over a plain connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto"]
async fn an_attached_node_reaches_its_broker_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let ca = umbra_broker::certs::make_ca(&certs).expect("ca");
    let cert = umbra_broker::certs::make_server(&certs, &["localhost".into()]).expect("server");
    let (mosquitto, tls_port) =
        Mosquitto::start_remapping_requests_with_tls(&cert, &certs.join("server.key"));
    let mut config = attached(&dir.path().join("data"), &mosquitto, "umbra-tls");
    config.mqtt.attach = Some(format!("mqtts://localhost:{tls_port}"));
    config.mqtt.attach_client.ca_file = Some(ca);
    let server = start(config).await;
    wait_ready(server.addrs().http).await;

    let mut lamp = Device::connect(broker(&mosquitto), "lamp-3").await;
    lamp.subscribe("$aws/things/lamp-3/shadow/update/accepted")
        .await;
    let update = json!({"state": {"reported": {"on": true}}});
    lamp.publish("$aws/things/lamp-3/shadow/update", update.to_string())
        .await;
    let accepted = lamp
        .next_on("$aws/things/lamp-3/shadow/update/accepted")
        .await;
    assert_eq!(accepted["version"], 1, "{accepted}");
    server.shutdown().await;
}

/// The broker goes away (killed, its sessions with it) and comes back: the
/// node reconnects by itself, subscribes again and serves requests as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto"]
async fn an_attached_node_reconnects_when_the_broker_returns() {
    let mut mosquitto = Mosquitto::start_remapping_requests();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(attached(dir.path(), &mosquitto, "umbra-back")).await;
    wait_ready(server.addrs().http).await;
    let update = |n: u64| json!({"state": {"reported": {"n": n}}}).to_string();
    let mut lamp = Device::connect(broker(&mosquitto), "lamp-2").await;
    lamp.subscribe("$aws/things/lamp-2/shadow/update/accepted")
        .await;
    lamp.publish("$aws/things/lamp-2/shadow/update", update(1))
        .await;
    let accepted = lamp
        .next_on("$aws/things/lamp-2/shadow/update/accepted")
        .await;
    assert_eq!(accepted["version"], 1);

    mosquitto.restart();
    // The node comes back by itself; until it has subscribed again, a
    // request has no taker, so the device sends it again every 2 s, as a
    // device waiting for an answer would.
    let mut lamp = Device::connect(broker(&mosquitto), "lamp-2").await;
    lamp.subscribe("$aws/things/lamp-2/shadow/update/accepted")
        .await;
    let accepted = tokio::time::timeout(umbra_tests::WAIT, async {
        loop {
            lamp.publish("$aws/things/lamp-2/shadow/update", update(2))
                .await;
            let answer = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                lamp.next_on("$aws/things/lamp-2/shadow/update/accepted"),
            )
            .await;
            if let Ok(accepted) = answer {
                return accepted;
            }
        }
    })
    .await
    .expect("served again after the broker came back");
    assert_eq!(accepted["version"], 2, "{accepted}");
    wait_ready(server.addrs().http).await;
    server.shutdown().await;
}

/// A node whose broker is gone still shuts down, within its grace: what
/// it could not acknowledge stays with the broker's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto"]
async fn an_attached_node_shuts_down_without_its_broker() {
    let mosquitto = Mosquitto::start_remapping_requests();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = attached(dir.path(), &mosquitto, "umbra-alone");
    config.shutdown_grace_secs = 1;
    let server = start(config).await;
    wait_ready(server.addrs().http).await;
    drop(mosquitto);
    tokio::time::timeout(umbra_tests::WAIT, server.shutdown())
        .await
        .expect("shut down within its grace");
}

/// The check: two nodes attached to one Mosquitto and one
/// PostgreSQL serve 200 devices that follow their deltas; updates made
/// through node 2 reach devices whose requests either node took; and both
/// nodes' change streams deliver every change once, in sequence order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and postgresql"]
async fn two_attached_nodes_share_the_requests_and_every_change() {
    const DEVICES: usize = 200;
    let mosquitto = Mosquitto::start_remapping_requests();
    let db = postgres::TestDatabase::create();
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let mut nodes = Vec::new();
    for (n, dir) in dirs.iter().enumerate() {
        let mut config = attached(dir.path(), &mosquitto, &format!("umbra-{n}"));
        config.store.url = Some(db.url.clone());
        nodes.push(start(config).await);
    }
    for node in &nodes {
        wait_ready(node.addrs().http).await;
    }
    let mut streams: Vec<_> = nodes
        .iter()
        .map(|n| n.service().subscribe_changes())
        .collect();

    let mut devices = Vec::new();
    for d in 0..DEVICES {
        let id = format!("att-{d:03}");
        let mut device = Device::connect(broker(&mosquitto), &id).await;
        device
            .subscribe(&format!("$aws/things/{id}/shadow/update/+"))
            .await;
        let report = json!({"state": {"reported": {"setpoint": 0}}});
        device
            .publish(
                &format!("$aws/things/{id}/shadow/update"),
                report.to_string(),
            )
            .await;
        devices.push(device);
    }
    for device in &mut devices {
        let topic = format!("$aws/things/{}/shadow/update/accepted", device.id);
        assert_eq!(device.next_on(&topic).await["version"], 1, "{}", device.id);
    }
    // The operator sets each device's setpoint through node 2; each device
    // answers its delta by reporting it, through whichever node takes it.
    for (d, device) in devices.iter().enumerate() {
        let desired = json!({"state": {"desired": {"setpoint": d + 1}}});
        let (status, body) = http(
            "POST",
            shadow_url(&nodes[1], &device.id),
            Some(desired.to_string()),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    for (d, device) in devices.iter_mut().enumerate() {
        let id = device.id.clone();
        let delta = device
            .next_on(&format!("$aws/things/{id}/shadow/update/delta"))
            .await;
        assert_eq!(delta["state"]["setpoint"], d + 1, "{id}: {delta}");
        let report = json!({"state": {"reported": {"setpoint": d + 1}}});
        device
            .publish(
                &format!("$aws/things/{id}/shadow/update"),
                report.to_string(),
            )
            .await;
    }
    for device in &mut devices {
        let topic = format!("$aws/things/{}/shadow/update/accepted", device.id);
        loop {
            let accepted = device.next_on(&topic).await;
            if accepted["version"] == 3 {
                break;
            }
        }
    }
    // In sync, as both nodes read it.
    for node in &nodes {
        for (d, device) in devices.iter().enumerate() {
            let (status, shadow) = http("GET", shadow_url(node, &device.id), None).await;
            assert_eq!(status, 200);
            assert_eq!(shadow["version"], 3, "{shadow}");
            assert_eq!(shadow["state"]["reported"]["setpoint"], d + 1, "{shadow}");
            assert_eq!(shadow["state"].get("delta"), None, "{shadow}");
        }
    }
    // Node 1, which took no HTTP update, served device requests: the
    // broker shares them out.
    let metrics = node_metrics(&nodes[0]).await;
    assert!(
        metrics.contains("umbra_shadow_requests_total{code=\"200\",operation=\"update\"}"),
        "{metrics}"
    );
    let changes = 3 * DEVICES as u64;
    for (n, stream) in streams.iter_mut().enumerate() {
        let mut seqs = Vec::new();
        while seqs.len() < changes as usize {
            seqs.push(stream.recv().await.expect("a change").seq);
        }
        assert_eq!(seqs, (1..=changes).collect::<Vec<_>>(), "node {n}");
    }
    for node in nodes {
        node.shutdown().await;
    }
}

async fn node_metrics(node: &Server) -> String {
    let url = format!("http://{}/metrics", node.addrs().http);
    let (_, body) = http("GET", url, None).await;
    match body {
        Value::String(text) => text,
        other => other.to_string(),
    }
}
