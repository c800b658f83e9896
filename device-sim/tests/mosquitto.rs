//! End-to-end tests of device-sim against a real Mosquitto broker started on a free port.

mod support;

use device_sim::fleet::{self, FleetConfig};
use device_sim::mqtt::{BrokerAddr, ClientSettings};
use device_sim::operator::OperatorPlan;
use device_sim::units::Rate;
use std::process::Command;
use std::time::Duration;
use support::{fake_shadow_service, Mosquitto};
use tokio_util::sync::CancellationToken;

#[test]
#[ignore = "needs mosquitto"]
fn relay_p2p_qos1_delivers_every_message() {
    let broker = Mosquitto::start();
    let output = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args(["bench", "relay", "--broker", &broker.url()])
        .args([
            "--mode",
            "p2p",
            "--qos",
            "1",
            "--publishers",
            "5",
            "--subscribers",
            "5",
        ])
        .args(["--duration", "2s", "--rate", "500/s", "--json", "--quiet"])
        .output()
        .expect("device-sim runs");
    assert!(
        output.status.success(),
        "device-sim failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("JSON summary on stdout");
    let counts = &summary["counts"];
    let sent = counts["sent"].as_u64().expect("sent");
    assert!(sent >= 4000, "only {sent} sent at 5 x 500/s over 2s");
    assert_eq!(counts["received"], counts["sent"], "{summary:#}");
    assert_eq!(counts["expected"], counts["sent"]);
    assert_eq!(counts["lost"], 0);
    assert_eq!(
        summary["latency"]["end-to-end"]["count"],
        counts["received"]
    );
    assert_eq!(summary["peak_connected"], 10);
    assert!(
        summary["errors"].as_object().is_some_and(|e| e.is_empty()),
        "{summary:#}"
    );
}

#[test]
#[ignore = "needs mosquitto"]
fn relay_fan_out_counts_every_copy() {
    let broker = Mosquitto::start();
    let output = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args(["bench", "relay", "--broker", &broker.url()])
        .args([
            "--mode",
            "fan-out",
            "--qos",
            "1",
            "--publishers",
            "1",
            "--subscribers",
            "4",
        ])
        .args(["--duration", "1s", "--rate", "200/s", "--json", "--quiet"])
        .output()
        .expect("device-sim runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let sent = summary["counts"]["sent"].as_u64().expect("sent");
    assert!(sent > 0);
    assert_eq!(summary["counts"]["expected"].as_u64(), Some(sent * 4));
    assert_eq!(summary["counts"]["received"].as_u64(), Some(sent * 4));
}

#[tokio::test]
#[ignore = "needs mosquitto"]
async fn fleet_follows_operator_changes_through_a_shadow_service() {
    let broker = Mosquitto::start();
    let stop_shadow = CancellationToken::new();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let shadow = tokio::spawn(fake_shadow_service(
        broker.port,
        stop_shadow.clone(),
        ready_tx,
    ));
    ready.await.expect("the fake shadow service subscribed");
    let settings = ClientSettings::new(BrokerAddr::tcp("127.0.0.1", broker.port));
    let config = FleetConfig {
        clients: vec![settings],
        devices: 5,
        first: 0,
        prefix: "test-".to_owned(),
        ramp: 1000.0,
        actuation_delay: Duration::from_millis(10),
        telemetry_interval: Some(Duration::from_millis(100)),
        duration: Duration::from_secs(3),
        operator: Some(OperatorPlan::new(Rate::PerSecond(20.0), "umbra-operator")),
        until_converged: false,
        quiet: true,
    };
    let summary = fleet::run(config, CancellationToken::new())
        .await
        .expect("fleet runs");
    stop_shadow.cancel();
    let _ = shadow.await;
    // Five devices and the operator, each connected once.
    assert_eq!(summary.peak_connected, 6);
    assert_eq!(summary.connects, 6);
    let delta = summary.latency["desired->delta"].count;
    let converged = summary.latency["desired->reported"].count;
    assert!(
        delta >= 20,
        "only {delta} deltas measured: {}",
        summary.table()
    );
    assert!(
        converged >= 20,
        "only {converged} convergences: {}",
        summary.table()
    );
    // Telemetry: 5 devices x ~10/s x 3 s, plus shadow traffic.
    assert!(summary.messages_out > 100, "{}", summary.table());
    assert!(summary.errors.is_empty(), "{}", summary.table());
    // First connect gets 404 from the fake service; nothing else is rejected.
    assert!(
        summary.rejected.keys().all(|code| code == "404"),
        "{:?}",
        summary.rejected
    );
}
