//! The Grafana dashboard (`dashboards/umbra.json`) against a real
//! Prometheus scraping a running Umbra under load: every PromQL expression
//! of every panel evaluates to data.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use umbra_tests::{free_port, mqtt_addr, start, test_config, Device, WAIT};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards/umbra.json");

/// Every `expr` of the dashboard's panels.
fn expressions(dashboard: &Value) -> Vec<String> {
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_string))
        .collect()
}

/// A Prometheus server, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, as job `umbra`.
    fn start(dir: &std::path::Path, target: SocketAddr) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: umbra\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write config");
        // Prometheus takes no port 0.
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The instant vector `expr` evaluates to now, or why there is none.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let answer: Value = ureq::get(&format!("{}/api/v1/query", self.url))
            .query("query", expr)
            .call()
            .map_err(|e| e.to_string())?
            .into_json()
            .map_err(|e| e.to_string())?;
        match answer["data"]["result"].as_array() {
            Some(result) => Ok(result.clone()),
            None => Err(answer.to_string()),
        }
    }
}

/// Whether a result holds a sample with a number (not NaN: a quantile of
/// nothing observed).
fn has_data(result: &[Value]) -> bool {
    result.iter().any(|series| {
        series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// The metric names an expression reads (`umbra_*`, `process_*`).
fn metric_names(expr: &str) -> Vec<&str> {
    let is_name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    expr.split(|c: char| !is_name(c))
        .filter(|word| word.starts_with("umbra_") || word.starts_with("process_"))
        .collect()
}

/// Without Prometheus: every metric the dashboard reads is on `/metrics`
/// of a node that has served one shadow update (series labelled by
/// operation, code or route appear with their first request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_reads_is_exposed() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard"))
            .expect("dashboard is JSON");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.http.public_metrics = true;
    let server = start(config).await;
    let api = server.addrs().http;
    let text = tokio::task::spawn_blocking(move || {
        ureq::post(&format!("http://{api}/things/dash-1/shadow"))
            .send_string(r#"{"state":{"desired":{"level":1}}}"#)
            .expect("update accepted");
        ureq::get(&format!("http://{api}/metrics"))
            .call()
            .expect("metrics")
            .into_string()
            .expect("text")
    })
    .await
    .expect("scrape");
    let exposed: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let expressions = expressions(&dashboard);
    let missing: Vec<&str> = expressions
        .iter()
        .flat_map(|expr| metric_names(expr))
        .filter(|name| !exposed.contains(name))
        .collect();
    assert!(missing.is_empty(), "not on /metrics: {missing:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus (Debian package prometheus)"]
async fn every_dashboard_expression_has_data_from_a_running_umbra() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard"))
            .expect("dashboard is JSON");
    let expressions = expressions(&dashboard);
    assert!(expressions.len() >= 20, "{expressions:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(&dir.path().join("data"));
    config.http.public_metrics = true;
    let server = start(config).await;
    let api = server.addrs().http;

    // Load until the test ends: an operator changes desired state and reads
    // the shadow over HTTP; the device is told the delta and reports it.
    let mut device = Device::connect(mqtt_addr(&server), "dash-1").await;
    device
        .subscribe("$aws/things/dash-1/shadow/update/delta")
        .await;
    let load = tokio::spawn(async move {
        // At a device's pace: a thing's requests per second are limited.
        let mut pace = tokio::time::interval(Duration::from_millis(200));
        for n in 0u64.. {
            pace.tick().await;
            let desired = format!(r#"{{"state":{{"desired":{{"level":{n}}}}}}}"#);
            let url = format!("http://{api}/things/dash-1/shadow");
            tokio::task::spawn_blocking(move || {
                ureq::post(&url)
                    .send_string(&desired)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await
            .expect("operator")
            .expect("desired accepted");
            let delta = device
                .next_on("$aws/things/dash-1/shadow/update/delta")
                .await;
            let level = delta["state"]["level"].clone();
            device
                .publish(
                    "$aws/things/dash-1/shadow/update",
                    format!(r#"{{"state":{{"reported":{{"level":{level}}}}}}}"#),
                )
                .await;
            let url = format!("http://{api}/things/dash-1/shadow");
            tokio::task::spawn_blocking(move || {
                ureq::get(&url).call().map(drop).map_err(|e| e.to_string())
            })
            .await
            .expect("operator")
            .expect("shadow read");
        }
    });

    let prometheus = Prometheus::start(dir.path(), api);
    let check = tokio::task::spawn_blocking(move || {
        // Grafana's variables as the dashboard's defaults set them.
        let queries: Vec<(String, String)> = expressions
            .iter()
            .map(|e| {
                let q = e
                    .replace("$__rate_interval", "10s")
                    .replace("$instance", ".*");
                (e.clone(), q)
            })
            .collect();
        let deadline = Instant::now() + 3 * WAIT;
        loop {
            let missing: Vec<String> = queries
                .iter()
                .filter(|(_, query)| !prometheus.query(query).is_ok_and(|r| has_data(&r)))
                .map(|(expr, query)| format!("{expr}: {:?}", prometheus.query(query)))
                .collect();
            if missing.is_empty() {
                return Ok(queries.len());
            }
            if Instant::now() > deadline {
                return Err(missing);
            }
            // Prometheus scrapes each second; look again after the next.
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await
    .expect("check");
    load.abort();
    match check {
        Ok(n) => assert!(n >= 20),
        Err(missing) => panic!("expressions without data:\n{}", missing.join("\n")),
    }
    server.shutdown().await;
}
