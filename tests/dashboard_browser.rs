//! The web dashboard in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`), driven over WebDriver against a running Umbra with a
//! small fleet of real MQTT devices that follow their desired state: the
//! operator gives the page a token, sees the fleet counted and a change go
//! by in the live feed, searches, opens a thing, changes its desired state
//! and sees the device's reported state converge on the page, and watches
//! another device's telemetry arrive over MQTT over WebSocket. A read token
//! may look but not change. Screenshots go to `target/dashboard/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use umbra_shadow::http::{Role, TokenConfig};
use umbra_tests::{free_port, mqtt_addr, start, test_config};

const DEVICES: usize = 5;
const WRITE_TOKEN: &str = "dashboard-write-token";
const READ_TOKEN: &str = "dashboard-read-token";
/// The page polls and streams; on a loaded machine a browser is slow.
const TIMEOUT: Duration = Duration::from_secs(60);

/// chromedriver on a free loopback port, stopped when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
    /// Chromium's temporary files, removed with it.
    _tmp: tempfile::TempDir,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        // chromedriver takes no port 0.
        let port = free_port();
        let tmp = tempfile::tempdir().expect("tempdir");
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (Debian: chromium-driver)");
        ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _tmp: tmp,
        }
    }

    /// A headless Chromium session, once chromedriver answers.
    async fn session(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1400,1000"],
            }),
        );
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&self.url)
                .await
            {
                Ok(client) => return client,
                Err(e) if Instant::now() > deadline => panic!("no WebDriver session: {e}"),
                // chromedriver is still starting: poll again.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device that reports its initial state and then every delta it gets,
/// as a device following its shadow does; with `telemetry`, it also sends
/// a sample ten times a second.
fn spawn_device(addr: SocketAddr, thing: String, telemetry: bool) -> tokio::task::JoinHandle<()> {
    let mut options = MqttOptions::new(&thing, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 64);
    let delta = format!("$aws/things/{thing}/shadow/update/delta");
    let update = format!("$aws/things/{thing}/shadow/update");
    let samples = format!("devices/{thing}/telemetry");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut seq = 0u64;
        loop {
            let event = tokio::select! {
                event = events.poll() => event,
                _ = tick.tick(), if telemetry => {
                    seq += 1;
                    let sample = json!({"seq": seq, "temperature": 20.0 + (seq % 10) as f64 / 10.0, "battery": 90.0});
                    let _ = client.try_publish(&samples, QoS::AtMostOnce, false, sample.to_string());
                    continue;
                }
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .subscribe(&delta, QoS::AtLeastOnce)
                        .await
                        .expect("subscribe");
                    let report = json!({"state":{"reported":{"setpoint": 21, "firmware": "1.0"}}});
                    client
                        .publish(&update, QoS::AtLeastOnce, false, report.to_string())
                        .await
                        .expect("publish");
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == delta => {
                    let delta: Value = serde_json::from_slice(&p.payload).expect("delta JSON");
                    let report = json!({"state":{"reported": delta["state"]}});
                    client
                        .publish(&update, QoS::AtLeastOnce, false, report.to_string())
                        .await
                        .expect("publish");
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    })
}

/// Polls the element at `css` until its text satisfies `want`; panics with
/// the last text seen after [`TIMEOUT`].
async fn wait_text(browser: &Client, css: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = String::from("(no element)");
    loop {
        if let Ok(element) = browser.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                if want(&text) {
                    return text;
                }
                last = text;
            }
        }
        assert!(Instant::now() < deadline, "{css}: still {last:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until the page shows `want` as the reported setpoint.
async fn wait_reported_setpoint(browser: &Client, want: &str) {
    wait_text(
        browser,
        "#reported tr[data-path='setpoint'] td.value",
        |t| t == want,
    )
    .await;
}

/// Polls until the element at `css` exists and returns it.
async fn wait_element(browser: &Client, css: &str) -> fantoccini::elements::Element {
    browser
        .wait()
        .at_most(TIMEOUT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
}

/// A thing's classic shadow over the API, with the read token.
fn read_shadow(api: &str, thing: &str) -> Value {
    ureq::get(&format!("{api}/things/{thing}/shadow"))
        .set("Authorization", &format!("Bearer {READ_TOKEN}"))
        .call()
        .expect("get")
        .into_json()
        .expect("json")
}

/// Clicks the element at `css` once it exists.
async fn click(browser: &Client, css: &str) {
    wait_element(browser, css)
        .await
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn screenshot(browser: &Client, name: &str) {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/dashboard"));
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let png = browser.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(name), png).expect("write screenshot");
}

/// Gives the page a token through its access dialog.
async fn enter_token(browser: &Client, token: &str) {
    let dialog = wait_element(browser, "#settings").await;
    if !dialog.is_displayed().await.expect("displayed") {
        click(browser, "#settings-open").await;
    }
    let input = wait_element(browser, "#token").await;
    input.clear().await.expect("clear");
    input.send_keys(token).await.expect("type");
    click(browser, "#settings-save").await;
}

async fn set_desired(browser: &Client, json: &str) {
    let editor = wait_element(browser, "#desired-editor").await;
    editor.clear().await.expect("clear");
    editor.send_keys(json).await.expect("type");
    click(browser, "#desired-save").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromium-driver"]
async fn an_operator_watches_the_fleet_and_changes_a_device_in_the_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.http.tokens = vec![
        TokenConfig {
            name: "operator".into(),
            token: WRITE_TOKEN.into(),
            role: Role::Write,
        },
        TokenConfig {
            name: "viewer".into(),
            token: READ_TOKEN.into(),
            role: Role::Read,
        },
    ];
    let server = start(config).await;
    let mqtt = mqtt_addr(&server);
    let api = format!("http://{}", server.addrs().http);
    let devices: Vec<_> = (0..DEVICES)
        .map(|i| spawn_device(mqtt, format!("dash-{i}"), i == 0))
        .collect();

    let driver = ChromeDriver::start();
    let browser = driver.session().await;
    browser.goto(&format!("{api}/")).await.expect("open");

    // Tokens are configured: the page asks for one before it shows data.
    enter_token(&browser, WRITE_TOKEN).await;
    wait_text(&browser, "#connected", |t| t == DEVICES.to_string()).await;
    wait_text(&browser, "#things", |t| t == DEVICES.to_string()).await;
    wait_text(&browser, "#in-sync", |t| t == DEVICES.to_string()).await;
    wait_text(&browser, "#feed-state", |t| t == "live").await;

    // A change made elsewhere shows in the live feed.
    let answer: Value = ureq::post(&format!("{api}/things/dash-2/shadow"))
        .set("Authorization", &format!("Bearer {WRITE_TOKEN}"))
        .send_json(json!({"state":{"desired":{"setpoint": 19}}}))
        .expect("update over HTTP")
        .into_json()
        .expect("json");
    let version = answer["version"].as_u64().expect("version");
    wait_element(&browser, "#feed a[data-thing='dash-2']").await;
    wait_text(&browser, "#update-rate", |t| t.parse::<f64>().is_ok()).await;
    screenshot(&browser, "overview.png").await;

    // Search narrows the list.
    let search = wait_element(&browser, "#search-q").await;
    search.send_keys("thingName:dash-3").await.expect("type");
    click(&browser, "#search-form button").await;
    wait_text(&browser, "#things-list", |t| {
        t.contains("dash-3") && !t.contains("dash-1")
    })
    .await;

    // Open a thing from the list and change its desired state.
    click(&browser, "#things-list a[data-thing='dash-3']").await;
    wait_text(&browser, "#thing-name", |t| t == "dash-3").await;
    wait_text(&browser, "#thing-connectivity", |t| {
        t.starts_with("connected")
    })
    .await;
    wait_reported_setpoint(&browser, "21").await;
    set_desired(&browser, r#"{"setpoint": 23.5}"#).await;
    // Accepted (the device may already have answered by the time we look).
    wait_text(&browser, "#desired-status", |t| {
        t.starts_with("accepted as version") || t.starts_with("the device reported it")
    })
    .await;
    // The device gets the delta and reports it; the page follows.
    wait_reported_setpoint(&browser, "23.5").await;
    wait_text(&browser, "#sync-state", |t| t == "in sync").await;
    wait_text(&browser, "#desired-status", |t| {
        t.starts_with("the device reported it")
    })
    .await;
    wait_text(&browser, "#thing-changes", |t| t.contains("23.5")).await;
    screenshot(&browser, "thing.png").await;

    // A named shadow gets a tab of its own.
    ureq::post(&format!("{api}/things/dash-3/shadow?name=config"))
        .set("Authorization", &format!("Bearer {WRITE_TOKEN}"))
        .send_json(json!({"state":{"desired":{"mode": "eco"}}}))
        .expect("named shadow over HTTP");
    click(&browser, "#shadow-tabs a[href='#/thing/dash-3/config']").await;
    wait_text(&browser, "#desired tr[data-path='mode'] td.value", |t| {
        t == "\"eco\""
    })
    .await;
    wait_text(&browser, "#sync-state", |t| t == "delta: mode").await;
    let shadow = read_shadow(&api, "dash-3");
    assert_eq!(shadow["state"]["desired"]["setpoint"], json!(23.5));
    assert_eq!(shadow["state"]["reported"]["setpoint"], json!(23.5));
    assert!(shadow["state"]["delta"].is_null(), "{shadow}");

    // Live telemetry of another device, over MQTT over WebSocket.
    browser
        .goto(&format!("{api}/#/thing/dash-0"))
        .await
        .expect("open dash-0");
    wait_text(&browser, "#thing-name", |t| t == "dash-0").await;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let count = wait_element(&browser, "#telemetry-state")
            .await
            .attr("data-count")
            .await
            .expect("attr")
            .and_then(|c| c.parse::<u64>().ok())
            .unwrap_or(0);
        if count >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "{count} telemetry messages");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_text(&browser, "#telemetry-legend", |t| t.contains("temperature")).await;
    screenshot(&browser, "telemetry.png").await;

    // A read token shows the shadow but may not change it.
    enter_token(&browser, READ_TOKEN).await;
    wait_reported_setpoint(&browser, "21").await;
    set_desired(&browser, r#"{"setpoint": 30}"#).await;
    wait_text(&browser, "#desired-status", |t| t.contains("write token")).await;
    let shadow = read_shadow(&api, "dash-0");
    assert!(shadow["state"]["desired"].is_null(), "{shadow}");
    // The HTTP update made earlier is still the latest of dash-2.
    let shadow = read_shadow(&api, "dash-2");
    assert!(shadow["version"].as_u64().expect("version") >= version);

    browser.close().await.expect("end the session");
    for device in devices {
        device.abort();
    }
    server.shutdown().await;
}
