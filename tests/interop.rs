//! Interoperability with the Debian `mosquitto_pub` / `mosquitto_sub`
//! clients: a device update through the real CLI tools, answered on `$aws`.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use umbra_tests::{mqtt_addr, start, test_config, WAIT};

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

async fn next_line(lines: &mut Lines) -> String {
    tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("mosquitto_sub prints in time")
        .expect("readable")
        .expect("mosquitto_sub still running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto-clients (mosquitto_pub, mosquitto_sub)"]
async fn mosquitto_clients_update_and_receive_accepted_documents_and_delta() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.mqtt.edge.privileged_clients.insert("console".into());
    let server = start(config).await;
    let port = mqtt_addr(&server).port().to_string();

    // The console (a privileged client) watches lamp-1's shadow topics; -d
    // prints the SUBACK, -v the topic of each message.
    // stdbuf: mosquitto_sub's debug lines are block-buffered on a pipe.
    let mut sub = Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "console",
            "-q",
            "1",
            "-d",
            "-v",
        ])
        .args(["-t", "$aws/things/lamp-1/shadow/#", "-C", "3"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub runs");
    let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
    loop {
        if next_line(&mut lines).await.contains("received SUBACK") {
            break;
        }
    }

    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "lamp-1", "-q", "1"])
        .args(["-t", "$aws/things/lamp-1/shadow/update"])
        .args([
            "-m",
            r#"{"state":{"desired":{"color":"red"}},"clientToken":"cli"}"#,
        ])
        .status()
        .await
        .expect("mosquitto_pub runs");
    assert!(status.success());

    let mut answers = Vec::new();
    while answers.len() < 3 {
        let line = next_line(&mut lines).await;
        // -v prints "topic payload"; debug lines start with "Client".
        if let Some((topic, payload)) = line.split_once(' ').filter(|(t, _)| t.starts_with("$aws/"))
        {
            let body: Value = serde_json::from_str(payload).unwrap_or(Value::Null);
            answers.push((topic.to_string(), body));
        }
    }
    let topics: Vec<&str> = answers.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        vec![
            "$aws/things/lamp-1/shadow/update/accepted",
            "$aws/things/lamp-1/shadow/update/documents",
            "$aws/things/lamp-1/shadow/update/delta",
        ]
    );
    assert_eq!(answers[0].1["clientToken"], "cli");
    assert_eq!(answers[2].1["state"]["color"], "red");
    let exit = tokio::time::timeout(WAIT, sub.wait())
        .await
        .expect("exits after 3")
        .expect("status");
    assert!(exit.success());

    // A device may not publish to another thing's shadow: AWS IoT disconnects it.
    let refused = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "lamp-2", "-q", "1"])
        .args(["-t", "$aws/things/lamp-1/shadow/update", "-m", "{}"])
        .stderr(Stdio::null())
        .status()
        .await
        .expect("mosquitto_pub runs");
    assert!(!refused.success(), "a foreign shadow publish must fail");
    server.shutdown().await;
}

/// `mosquitto_rr` (MQTT 5 request/response) against a shadow: the reply
/// comes to the response topic it names, one of its own topics outside
/// `$aws` or its own `/accepted` topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto-clients (mosquitto_rr)"]
async fn mosquitto_rr_gets_shadow_replies_over_mqtt_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let port = mqtt_addr(&server).port().to_string();
    let rr = |request: &'static str, response: &'static str, payload: &'static str| {
        let port = port.clone();
        async move {
            let out = Command::new("mosquitto_rr")
                .args(["-V", "5", "-h", "127.0.0.1", "-p", &port, "-i", "lamp-rr"])
                .args(["-t", request, "-e", response, "-m", payload, "-W", "20"])
                .args(["-D", "PUBLISH", "correlation-data", "c-1"])
                .output()
                .await
                .expect("mosquitto_rr runs");
            assert!(out.status.success(), "{out:?}");
            serde_json::from_slice::<Value>(&out.stdout).expect("a JSON reply")
        }
    };
    let accepted = rr(
        "$aws/things/lamp-rr/shadow/update",
        "things/lamp-rr/replies",
        r#"{"state":{"reported":{"on":true}}}"#,
    )
    .await;
    assert_eq!(accepted["version"], 1);
    assert_eq!(accepted["state"]["reported"]["on"], true);
    let document = rr(
        "$aws/things/lamp-rr/shadow/get",
        "$aws/things/lamp-rr/shadow/get/accepted",
        "{}",
    )
    .await;
    assert_eq!(document["version"], 1);
    assert_eq!(document["state"]["reported"]["on"], true);
    server.shutdown().await;
}

/// Eclipse paho-mqtt for Python with MQTT 5 (`tests/python/paho_mqtt5.py`):
/// a shadow update and get with a response topic, correlation data and a
/// user property, the delta, and QoS 2 through the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs paho-mqtt (PyPI)"]
async fn paho_mqtt_python_speaks_mqtt_5_with_umbra() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let addr = mqtt_addr(&server);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/paho_mqtt5.py");
    let (ok, stdout, stderr) = run_script(
        "python3",
        &[script, &addr.ip().to_string(), &addr.port().to_string()],
    )
    .await;
    assert!(ok && stdout.starts_with("ok"), "{stdout}\n{stderr}");
    server.shutdown().await;
}

/// MQTT.js (npm `mqtt`, Node) over Umbra's WebSocket listener, as MQTT
/// 3.1.1 and as MQTT 5 (`tests/node/mqttjs_ws.js`): a shadow update, its
/// accepted answer and delta, and an MQTT 5 get answered on its response
/// topic with its correlation data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node and tests/node's packages (npm ci --prefix tests/node)"]
async fn mqtt_js_over_websocket_with_mqtt_3_1_1_and_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let ws = server.addrs().websocket.expect("websocket listener");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/node/mqttjs_ws.js");
    let (ok, stdout, stderr) = run_script("node", &[script, &format!("ws://{ws}/mqtt")]).await;
    assert!(
        ok && stdout.contains("ok v4") && stdout.contains("ok v5"),
        "{stdout}\n{stderr}"
    );
    server.shutdown().await;
}

/// Runs a client script to its end (within [`WAIT`]): whether it succeeded,
/// and what it printed.
async fn run_script(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(program).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("the script ends in time")
    .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
