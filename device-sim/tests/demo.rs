//! `device-sim demo`, the binary: it starts Umbra in its process, runs a fleet and an operator
//! over the HTTP API, prints where to look, and stops cleanly on its own or on Ctrl-C.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEVICE_SIM: &str = env!("CARGO_BIN_EXE_device-sim");
/// The longest a test waits for something it expects.
const WAIT: Duration = Duration::from_secs(60);

fn demo(args: &[&str]) -> Child {
    Command::new(DEVICE_SIM)
        .arg("demo")
        .args(["--devices", "20", "--telemetry-interval", "1s", "-q"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("device-sim runs")
}

/// Reads the demo's stdout up to its "Ctrl-C" line; the API URL it printed.
fn api_url(child: &mut Child) -> (String, BufReader<std::process::ChildStdout>) {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    let mut api = None;
    let mut line = String::new();
    while lines.read_line(&mut line).expect("stdout") > 0 {
        if let Some(url) = line.trim().strip_prefix("fleet") {
            api = url.trim().strip_suffix("/v1/things").map(str::to_string);
        }
        if line.contains("Ctrl-C stops everything") {
            break;
        }
        line.clear();
    }
    (api.expect("the demo prints the fleet URL"), lines)
}

/// What the process printed after `lines`, and its exit status.
fn finish(
    mut child: Child,
    mut lines: BufReader<std::process::ChildStdout>,
) -> (String, String, bool) {
    let mut out = String::new();
    lines.read_to_string(&mut out).expect("stdout");
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_string(&mut err).expect("stderr");
    }
    let status = child.wait().expect("device-sim ends");
    (out, err, status.success())
}

fn count(summary: &str, name: &str) -> u64 {
    summary
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .map(|rest| rest.split_whitespace().next().unwrap_or(""))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{summary}"))
}

#[test]
fn the_demo_runs_until_its_changes_converge() {
    // The duration only bounds a run that fails to converge.
    let mut child = demo(&[
        "--operator-rate",
        "20/s",
        "--changes",
        "10",
        "--duration",
        "120s",
    ]);
    let (api, lines) = api_url(&mut child);
    assert!(api.starts_with("http://127.0.0.1:"), "{api}");
    let (out, err, ok) = finish(child, lines);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("every operator change had converged"), "{out}");
    assert_eq!(count(&out, "devices_synced"), 20, "{out}");
    assert_eq!(count(&out, "operator_changes_sent"), 10, "{out}");
    assert_eq!(count(&out, "changes_not_converged"), 0, "{out}");
    assert!(out.contains("errors: none"), "{out}");
}

#[test]
fn ctrl_c_stops_the_demo_cleanly() {
    let mut child = demo(&["--operator-rate", "5/s"]);
    let (api, lines) = api_url(&mut child);
    // The dashboard it points at is served.
    let page = ureq::get(&format!("{api}/"))
        .call()
        .expect("dashboard")
        .into_string()
        .expect("html");
    assert!(page.contains("<title>Umbra</title>"), "{page}");
    // Once the fleet is in the API's listing, the demo is running.
    let deadline = Instant::now() + WAIT;
    loop {
        let listed = ureq::get(&format!("{api}/v1/things"))
            .call()
            .ok()
            .and_then(|r| r.into_json::<serde_json::Value>().ok())
            .and_then(|page| page["things"].as_array().map(Vec::len))
            .unwrap_or(0);
        if listed == 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet never showed in {api}/v1/things"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(interrupted.success());
    let (out, err, ok) = finish(child, lines);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("interrupted, shutting down"), "{err}");
    assert_eq!(count(&out, "devices_synced"), 20, "{out}");
    // The embedded Umbra is gone with it.
    assert!(ureq::get(&format!("{api}/healthz")).call().is_err());
}
