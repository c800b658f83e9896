//! End-to-end tests of device-sim against an in-process Umbra server (store, shadow service and
//! embedded broker) on free loopback ports. Every wait is on an observable event: the fleet
//! ends when every operator change has converged, the shadow bench when every answer came.

use device_sim::fleet::{self, FleetConfig};
use device_sim::mqtt::{BrokerAddr, ClientSettings};
use device_sim::operator::{thing_name, OperatorPlan, TargetOrder};
use device_sim::shadow_bench::{self, ShadowBenchConfig};
use device_sim::units::Rate;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use umbra_broker::Server;
use umbra_shadow::ShadowKey;

const OPERATOR: &str = "umbra-operator";

/// Umbra on free ports over a database in `dir`, with the operator privileged.
async fn start_umbra(dir: &std::path::Path) -> Server {
    let mut config = umbra_tests::test_config(dir);
    config
        .mqtt
        .edge
        .privileged_clients
        .insert(OPERATOR.to_owned());
    umbra_tests::start(config).await
}

fn client_settings(server: &Server) -> ClientSettings {
    let addr = server.addrs().mqtt.expect("mqtt listener");
    ClientSettings::new(BrokerAddr::tcp(addr.ip().to_string(), addr.port()))
}

/// `devices` devices with `prefix` over `settings`, and an operator that
/// changes each once and waits until every change has converged.
fn converging_fleet(settings: ClientSettings, devices: usize, prefix: &str) -> FleetConfig {
    FleetConfig {
        clients: vec![settings],
        devices,
        first: 0,
        prefix: prefix.to_owned(),
        ramp: 1000.0,
        actuation_delay: Duration::from_millis(5),
        telemetry_interval: None,
        // An upper bound only: the run ends when every change has converged.
        duration: Duration::from_secs(60),
        operator: Some(OperatorPlan {
            order: TargetOrder::Sweep,
            max_changes: Some(devices as u64),
            ..OperatorPlan::new(Rate::PerSecond(200.0), OPERATOR)
        }),
        until_converged: true,
        quiet: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_converges_on_every_operator_change() {
    const DEVICES: usize = 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_umbra(dir.path()).await;
    let config = converging_fleet(client_settings(&server), DEVICES, "conv-");
    let summary = fleet::run(config, CancellationToken::new())
        .await
        .expect("fleet runs");
    let table = summary.table();
    let count = |name: &str| summary.counts.get(name).copied().unwrap_or(0);

    assert!(
        summary
            .notes
            .iter()
            .any(|n| n.contains("every operator change had converged")),
        "{table}"
    );
    assert_eq!(count("changes_not_converged"), 0, "{table}");
    assert_eq!(count("devices_synced"), DEVICES as u64, "{table}");
    assert_eq!(count("operator_changes_sent"), DEVICES as u64, "{table}");
    assert_eq!(
        // A device whose reported setpoint the operator happens to choose gets no delta.
        summary.latency["desired->delta"].count + count("changes_converged_without_delta"),
        DEVICES as u64,
        "{table}"
    );
    assert_eq!(
        summary.latency["desired->reported"].count, DEVICES as u64,
        "{table}"
    );
    assert!(summary.errors.is_empty(), "{table}");
    // A new shadow answers get with 404 once per device: expected, counted
    // apart, and said so in the summary; nothing is rejected.
    assert!(summary.rejected.is_empty(), "{table}");
    assert_eq!(
        summary.expected.values().sum::<u64>(),
        DEVICES as u64,
        "{table}"
    );
    assert!(table.contains("expected: 404 on a first get"), "{table}");

    // Every device converged, as stored: reported equals desired.
    let store = server.service().store();
    let mut versions = 0;
    for i in 0..DEVICES {
        let thing = thing_name("conv-", i);
        let stored = store
            .load(&ShadowKey::classic(thing.as_str()))
            .expect("store readable")
            .unwrap_or_else(|| panic!("{thing}: no shadow"));
        let desired = stored.state.desired.as_ref().expect("desired");
        let reported = stored.state.reported.as_ref().expect("reported");
        assert!(desired.state.get("setpoint").is_some(), "{thing}");
        for (key, value) in &desired.state {
            assert_eq!(reported.state.get(key), Some(value), "{thing}: {key}");
        }
        versions += stored.version;
    }
    // A version per accepted update: the devices' own reports and the operator's changes.
    assert_eq!(
        versions,
        count("reports_accepted") + count("operator_changes_sent"),
        "{table}"
    );
    // Every shadow request the run sent was answered (convergence comes last), so the broker's
    // edge has seen each one, and nothing more.
    let metrics = server.broker().expect("embedded broker").metrics();
    assert_eq!(
        metrics.shadow_requests.load(Ordering::Relaxed),
        count("shadow_requests_sent"),
        "{table}"
    );
    // Every answer found its subscriber's queue.
    assert_eq!(metrics.answers_dropped.load(Ordering::Relaxed), 0);
    // Each device and the operator connected once.
    assert_eq!(summary.connects, DEVICES as u64 + 1, "{table}");
    assert_eq!(
        metrics.connections_accepted.load(Ordering::Relaxed),
        summary.connects
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_bench_updates_are_all_answered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_umbra(dir.path()).await;
    let config = ShadowBenchConfig {
        client: client_settings(&server),
        devices: 10,
        first: 0,
        prefix: "bench-".to_owned(),
        duration: Duration::from_millis(500),
        inflight: 2,
        ramp: 1000.0,
        drain_timeout: Duration::from_secs(20),
        all_answers: false,
        interval: Duration::ZERO,
        flood: false,
        quiet: true,
    };
    let summary = shadow_bench::run(config, CancellationToken::new())
        .await
        .expect("bench runs");
    let table = summary.table();
    let count = |name: &str| summary.counts.get(name).copied().unwrap_or(0);
    assert!(count("accepted") > 0, "{table}");
    assert_eq!(count("unanswered"), 0, "{table}");
    assert!(summary.errors.is_empty(), "{table}");
    // Every update sent was answered: accepted or rejected (429 beyond 20 per second per thing).
    assert_eq!(
        count("accepted_total") + count("rejected"),
        count("sent"),
        "{table}"
    );
    let metrics = server.broker().expect("embedded broker").metrics();
    assert_eq!(
        metrics.shadow_requests.load(Ordering::Relaxed),
        count("sent")
    );
    // Each thing's version counts its accepted updates.
    let store = server.service().store();
    let mut versions = 0;
    for i in 0..10 {
        if let Some(stored) = store
            .load(&ShadowKey::classic(thing_name("bench-", i)))
            .expect("store readable")
        {
            versions += stored.version;
        }
    }
    assert_eq!(versions, count("accepted_total"), "{table}");
    server.shutdown().await;
}

/// A standalone operator (MQTT unless its plan says HTTP) that changes each
/// of `devices` devices once.
fn sweeping_operator(
    server: &Server,
    devices: usize,
    prefix: &str,
) -> device_sim::operator::OperatorConfig {
    device_sim::operator::OperatorConfig {
        client: client_settings(server),
        devices,
        first: 0,
        prefix: prefix.to_owned(),
        plan: OperatorPlan {
            order: TargetOrder::Sweep,
            max_changes: Some(devices as u64),
            ..OperatorPlan::new(Rate::PerSecond(100.0), OPERATOR)
        },
        // An upper bound only: the run ends after its changes.
        duration: Duration::from_secs(60),
        quiet: true,
    }
}

/// The operator in HTTP mode sends its changes to the API and names the API
/// (not an MQTT broker it never used) in its summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_operator_names_the_api_it_used() {
    use device_sim::operator;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_umbra(dir.path()).await;
    let api = format!("http://{}", server.addrs().http);
    let mut config = sweeping_operator(&server, 3, "http-op-");
    config.plan.http = Some(api.clone());
    let summary = operator::run(config, CancellationToken::new())
        .await
        .expect("the operator runs");
    assert_eq!(summary.broker, api);
    assert!(summary.table().contains(&format!("against {api}")));
    assert_eq!(summary.counts["changes_sent"], 3);
    let store = server.service().store();
    for n in 0..3 {
        let key = ShadowKey::classic(thing_name("http-op-", n));
        let stored = store.load(&key).expect("store readable");
        assert!(stored.is_some_and(|s| s.version >= 1), "{key:?} changed");
    }
    server.shutdown().await;
}

/// The operator in MQTT mode counts its connection (the live line showed
/// "connected 0" while it was connected), and gives it back at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_operator_counts_its_connection() {
    use device_sim::operator;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_umbra(dir.path()).await;
    let config = sweeping_operator(&server, 2, "mqtt-op-");
    let summary = operator::run(config, CancellationToken::new())
        .await
        .expect("the operator runs");
    assert_eq!(summary.counts["changes_sent"], 2);
    assert_eq!(summary.peak_connected, 1, "{}", summary.table());
    server.shutdown().await;
}

/// A small fleet over `settings` converges on every operator change.
async fn converges_over(server: &Server, settings: ClientSettings, prefix: &str) {
    const DEVICES: usize = 3;
    let config = converging_fleet(settings, DEVICES, prefix);
    let summary = fleet::run(config, CancellationToken::new())
        .await
        .expect("fleet runs");
    let table = summary.table();
    assert!(summary.errors.is_empty(), "{table}");
    assert_eq!(summary.counts["devices_synced"], DEVICES as u64, "{table}");
    assert_eq!(summary.counts["changes_not_converged"], 0, "{table}");
    let store = server.service().store();
    for i in 0..DEVICES {
        let key = ShadowKey::classic(thing_name(prefix, i));
        let stored = store.load(&key).expect("store readable");
        assert!(stored.is_some(), "{key:?} created over the transport");
    }
}

/// device-sim load-tests the other transports: MQTT over WebSocket
/// (`ws://`) and over TLS (`mqtts://`, trusting `--ca-file`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_run_over_websocket_and_tls() {
    use device_sim::mqtt::CaFile;
    use umbra_broker::certs;
    use umbra_broker::embedded::{ListenerSettings, TlsFiles};

    let dir = tempfile::tempdir().expect("temp dir");
    let pki = dir.path().join("pki");
    let ca = certs::make_ca(&pki).expect("ca");
    certs::make_server(&pki, &["localhost".to_string()]).expect("server cert");
    let mut config = umbra_tests::test_config(&dir.path().join("data"));
    config
        .mqtt
        .edge
        .privileged_clients
        .insert(OPERATOR.to_owned());
    config.mqtt.mqtt_v4 = Some(ListenerSettings {
        tls: Some(TlsFiles::new(
            pki.join("server.pem"),
            pki.join("server.key"),
        )),
        ..ListenerSettings::local(0)
    });
    let server = umbra_tests::start(config).await;

    let ws = server.addrs().websocket.expect("websocket listener");
    let url = format!("ws://{ws}/mqtt");
    let broker: BrokerAddr = url.parse().expect("a ws:// URL");
    converges_over(&server, ClientSettings::new(broker), "ws-").await;

    let port = server.addrs().mqtt.expect("tls listener").port();
    let broker: BrokerAddr = format!("mqtts://localhost:{port}").parse().expect("a URL");
    let mut settings = ClientSettings::new(broker);
    settings.ca = Some(
        ca.to_str()
            .unwrap_or_default()
            .parse::<CaFile>()
            .expect("the CA"),
    );
    converges_over(&server, settings, "tls-").await;
    server.shutdown().await;
}

/// An MQTT operator that the broker keeps to its own topics (Umbra's default) gets no change
/// through; the summary says why and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_refused_by_the_broker_is_explained() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Not privileged.
    let server = umbra_tests::start(umbra_tests::test_config(dir.path())).await;
    let mut config = converging_fleet(client_settings(&server), 3, "refused-");
    // The changes never converge: the run ends at its duration.
    config.duration = Duration::from_secs(8);
    let summary = fleet::run(config, CancellationToken::new())
        .await
        .expect("fleet runs");
    let table = summary.table();
    assert_eq!(
        summary.counts.get("operator_changes_confirmed"),
        Some(&0),
        "{table}"
    );
    assert!(
        summary.notes.iter().any(|n| n.contains(&format!(
            "privileged_clients = [\"{OPERATOR}\"]) or use --operator-http"
        ))),
        "{table}"
    );
    server.shutdown().await;
}
