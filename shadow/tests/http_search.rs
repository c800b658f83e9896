//! Fleet listing and search through the API, compared with a brute-force
//! filter over the same generated fleet: once as the index was built live
//! from committed changes, and again after a restart, as loaded from the store.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use prometheus::Registry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;
use tower::ServiceExt;
use umbra_shadow::fleet::IndexStatus;
use umbra_shadow::http::{router, ApiConfig, ApiState};
use umbra_shadow::{
    Operation, Request as ShadowRequest, ShadowKey, ShadowService, StoreConfig, Synchronous,
};

/// One generated thing, as the brute force sees it.
#[derive(Debug, Clone)]
struct Model {
    name: String,
    /// The classic shadow, if live: (reported temp, desired mode, reported mode, version).
    classic: Option<(f64, Option<&'static str>, Option<&'static str>, u64)>,
    cfg_x: Option<i64>,
    connected: Option<bool>,
}

impl Model {
    fn exists(&self) -> bool {
        self.classic.is_some() || self.cfg_x.is_some() || self.connected.is_some()
    }
    fn temp(&self) -> Option<f64> {
        self.classic.map(|c| c.0)
    }
    fn desired_mode(&self) -> Option<&str> {
        self.classic.and_then(|c| c.1)
    }
    fn has_delta(&self) -> bool {
        self.classic
            .is_some_and(|(_, desired, reported, _)| desired.is_some() && desired != reported)
    }
}

const MODES: [&str; 3] = ["eco", "comfort", "off"];

mod support;

fn start(path: &Path) -> Arc<ShadowService> {
    let config = StoreConfig {
        synchronous: Synchronous::Normal,
        ..StoreConfig::new(path)
    };
    let (service, outbox) = support::start(config, support::unlimited(), None);
    drop(outbox);
    service
}

fn app(service: &Arc<ShadowService>) -> Router {
    router(ApiState::new(
        Arc::clone(service),
        ApiConfig::default(),
        Registry::new(),
        watch::channel(true).1,
    ))
}

fn req(key: ShadowKey, op: Operation, body: Value) -> ShadowRequest {
    ShadowRequest {
        key,
        op,
        payload: serde_json::to_vec(&body).unwrap_or_default().into(),
        client: "gen".into(),
        user_properties: None,
    }
}

/// Writes a random fleet through the service and returns what it should hold.
async fn generate(service: &ShadowService, count: usize) -> Vec<Model> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut models = Vec::new();
    let mut pending = Vec::new();
    for i in 0..count {
        let prefix = ["sensor", "lamp", "gw"][rng.gen_range(0..3)];
        let name = format!("{prefix}-{i:04}");
        let mut model = Model {
            name: name.clone(),
            classic: None,
            cfg_x: None,
            connected: None,
        };
        if rng.gen_bool(0.85) {
            let temp = f64::from(rng.gen_range(0..500)) / 10.0;
            let desired = rng.gen_bool(0.7).then(|| MODES[rng.gen_range(0..3)]);
            let reported = rng.gen_bool(0.8).then(|| MODES[rng.gen_range(0..3)]);
            let mut state = json!({"reported": {"temp": temp, "mode": reported}});
            if let Some(d) = desired {
                state["desired"] = json!({"mode": d});
            }
            let key = ShadowKey::classic(name.clone());
            pending.push(service.submit(req(
                key.clone(),
                Operation::Update,
                json!({"state": state}),
            )));
            // A second update bumps the version on some.
            let mut version = 1;
            if rng.gen_bool(0.3) {
                pending.push(service.submit(req(
                    key.clone(),
                    Operation::Update,
                    json!({"state": {"reported": {"temp": temp}}}),
                )));
                version = 2;
            }
            model.classic = Some((temp, desired, reported, version));
            if rng.gen_bool(0.1) {
                pending.push(service.submit(req(key, Operation::Delete, json!({}))));
                model.classic = None;
            }
        }
        if rng.gen_bool(0.3) {
            let x = rng.gen_range(0..10);
            pending.push(service.submit(req(
                ShadowKey::named(name.clone(), "cfg"),
                Operation::Update,
                json!({"state": {"reported": {"x": x}}}),
            )));
            model.cfg_x = Some(x);
        }
        if rng.gen_bool(0.5) {
            let connected = rng.gen_bool(0.6);
            assert!(service.record_presence(&name, connected, 1_700_000_000_000 + i as i64, None));
            model.connected = Some(connected);
        }
        models.push(model);
    }
    for p in pending {
        assert!(p.answer().await.result.is_ok());
    }
    // Presence is not answered: one more update, committed after all of it,
    // returns only once everything before it is indexed.
    let marker = ShadowKey::named("zz-marker", "cfg");
    assert!(service
        .handle(req(
            marker,
            Operation::Update,
            json!({"state":{"reported":{"x":100}}})
        ))
        .await
        .result
        .is_ok());
    models.push(Model {
        name: "zz-marker".into(),
        classic: None,
        cfg_x: Some(100),
        connected: None,
    });
    models
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Every page of a listing or search, concatenated.
async fn all_pages(app: &Router, base: &str) -> Vec<Value> {
    let mut things = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let sep = if base.contains('?') { '&' } else { '?' };
        let uri = match &token {
            Some(t) => format!("{base}{sep}pageSize=7&nextToken={t}"),
            None => format!("{base}{sep}pageSize=7"),
        };
        let (status, page) = get(app, &uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {page}");
        things.extend(page["things"].as_array().cloned().unwrap_or_default());
        match page["nextToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => return things,
        }
    }
}

type Predicate = fn(&Model) -> bool;

fn cases() -> Vec<(&'static str, Predicate)> {
    vec![
        ("thingName:sensor-*", |m| m.name.starts_with("sensor-")),
        ("shadow.reported.temp>30", |m| {
            m.temp().is_some_and(|t| t > 30.0)
        }),
        ("shadow.desired.mode:eco", |m| {
            m.desired_mode() == Some("eco")
        }),
        ("shadow.hasDelta:true", |m| m.has_delta()),
        ("shadow.hasDelta:false", |m| {
            m.classic.is_some() && !m.has_delta()
        }),
        ("shadow.name.cfg.reported.x:5", |m| m.cfg_x == Some(5)),
        ("connectivity.connected:true", |m| m.connected == Some(true)),
        ("shadow.reported.temp:[10 TO 20]", |m| {
            m.temp().is_some_and(|t| (10.0..=20.0).contains(&t))
        }),
        ("shadow.reported.temp:{10 TO 20}", |m| {
            m.temp().is_some_and(|t| t > 10.0 && t < 20.0)
        }),
        (
            "thingName:lamp-* AND (shadow.reported.temp<5 OR NOT connectivity.connected:true)",
            |m| {
                m.name.starts_with("lamp-")
                    && (m.temp().is_some_and(|t| t < 5.0) || m.connected != Some(true))
            },
        ),
        ("NOT thingName:gw-*", |m| !m.name.starts_with("gw-")),
        (
            "shadow.name.cfg.reported.x>=7 OR shadow.desired.mode:off",
            |m| m.cfg_x.is_some_and(|x| x >= 7) || m.desired_mode() == Some("off"),
        ),
        ("shadow.version:2 sensor-*", |m| {
            m.classic.is_some_and(|c| c.3 == 2) && m.name.starts_with("sensor-")
        }),
    ]
}

async fn check_against_brute_force(app: &Router, models: &[Model]) {
    let mut universe: Vec<&Model> = models.iter().filter(|m| m.exists()).collect();
    universe.sort_by(|a, b| a.name.cmp(&b.name));
    // The listing: every thing with a shadow (not those known only from
    // their connectivity), with its shadows' versions.
    let listed = all_pages(app, "/v1/things").await;
    let fleet: Vec<&Model> = universe
        .iter()
        .copied()
        .filter(|m| m.classic.is_some() || m.cfg_x.is_some())
        .collect();
    let names: Vec<&str> = listed
        .iter()
        .filter_map(|t| t["thingName"].as_str())
        .collect();
    let want: Vec<&str> = fleet.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, want);
    for (thing, model) in listed.iter().zip(&fleet) {
        let classic = thing["shadows"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"].is_null()))
            .and_then(|s| s["version"].as_u64());
        assert_eq!(classic, model.classic.map(|c| c.3), "{}", model.name);
        assert_eq!(
            thing["connectivity"]["connected"].as_bool(),
            model.connected,
            "{}",
            model.name
        );
    }
    for (query, predicate) in cases() {
        let uri = format!("/v1/search?q={}", urlencode(query));
        let found = all_pages(app, &uri).await;
        let got: Vec<&str> = found
            .iter()
            .filter_map(|t| t["thingName"].as_str())
            .collect();
        let want: Vec<&str> = universe
            .iter()
            .filter(|m| predicate(m))
            .map(|m| m.name.as_str())
            .collect();
        assert!(!want.is_empty(), "{query} matches nothing: a weak case");
        assert_eq!(got, want, "{query}");
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_matches_brute_force_live_and_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleet.db");
    let service = start(&path);
    assert_eq!(service.fleet().wait_loaded().await, IndexStatus::Ready);
    let models = generate(&service, 400).await;
    let router = app(&service);
    check_against_brute_force(&router, &models).await;

    // A result carries the shadow as the query sees it.
    let (_, page) = get(&router, "/v1/search?q=thingName:zz-marker").await;
    assert_eq!(
        page["things"][0]["shadow"]["name"]["cfg"],
        json!({"reported": {"x": 100}, "hasDelta": false, "version": 1})
    );
    let (status, err) = get(&router, "/v1/search?q=thingName:a%20AND%20(").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["position"], 17);
    assert!(err["message"]
        .as_str()
        .is_some_and(|m| m.contains("position 17")));
    service.close().await;
    drop(router);
    drop(service);

    // Restarted: the index is loaded from the store's snapshot. A new
    // process starts with nothing connected (the broker restarted with it).
    let mut models = models;
    for model in &mut models {
        if model.connected.is_some() {
            model.connected = Some(false);
        }
    }
    let service = start(&path);
    assert_eq!(service.fleet().wait_loaded().await, IndexStatus::Ready);
    // Some things connect again; the index follows the committed changes.
    let mut changes = service.subscribe_changes();
    let mut reconnected = 0;
    for (i, model) in models.iter_mut().enumerate() {
        if model.connected.is_some() && i % 3 == 0 {
            assert!(service.record_presence(&model.name, true, 1_800_000_000_000, None));
            model.connected = Some(true);
            reconnected += 1;
        }
    }
    for _ in 0..reconnected {
        changes.recv().await.expect("the connect is committed");
    }
    check_against_brute_force(&app(&service), &models).await;
    service.close().await;
}

/// A store whose fleet read waits until the test opens its gate: the index
/// stays loading for as long as the test needs.
struct GatedStore {
    inner: umbra_shadow::SqliteStore,
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl umbra_shadow::store::ShadowStore for GatedStore {
    fn submit(&self, job: umbra_shadow::store::Job) -> Result<(), umbra_shadow::store::StoreError> {
        self.inner.submit(job)
    }
    fn load(
        &self,
        key: &ShadowKey,
    ) -> Result<Option<umbra_shadow::engine::StoredShadow>, umbra_shadow::store::StoreError> {
        self.inner.load(key)
    }
    fn named_shadows(
        &self,
        thing: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, umbra_shadow::store::StoreError> {
        self.inner.named_shadows(thing, after, limit)
    }
    fn connectivity(
        &self,
        thing: &str,
    ) -> Result<Option<umbra_shadow::store::Connectivity>, umbra_shadow::store::StoreError> {
        self.inner.connectivity(thing)
    }
    fn changes_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<umbra_shadow::store::Change>, umbra_shadow::store::StoreError> {
        self.inner.changes_since(after, limit)
    }
    fn change_log_bounds(
        &self,
    ) -> Result<umbra_shadow::store::ChangeLogBounds, umbra_shadow::store::StoreError> {
        self.inner.change_log_bounds()
    }
    fn shadow_changes(
        &self,
        key: &ShadowKey,
        since_version: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<umbra_shadow::store::Change>, umbra_shadow::store::StoreError> {
        self.inner
            .shadow_changes(key, since_version, after_seq, limit)
    }
    fn fleet_snapshot(
        &self,
        each: &mut dyn FnMut(umbra_shadow::store::SnapshotPart),
    ) -> Result<u64, umbra_shadow::store::StoreError> {
        // Waits for the test (or for it to drop the gate).
        let _ = self.gate.lock().map(|gate| gate.recv());
        self.inner.fleet_snapshot(each)
    }
    fn close(&self) -> Result<(), umbra_shadow::store::StoreError> {
        self.inner.close()
    }
}

/// While the fleet index loads, device requests are answered at once, and
/// search and listing answer 503 with Retry-After; once loaded, search
/// finds what was stored before and during the load.
#[tokio::test]
async fn requests_are_answered_while_the_index_loads_and_search_says_retry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleet.db");
    let service = start(&path);
    update(&service, "before", json!({"state": {"reported": {"t": 1}}})).await;
    service.close().await;
    drop(service);

    let limits = support::unlimited();
    let (inner, committed) =
        umbra_shadow::SqliteStore::open(StoreConfig::new(&path), limits.clone()).expect("open");
    let (open_gate, gate) = std::sync::mpsc::channel();
    let store = Arc::new(GatedStore {
        inner,
        gate: std::sync::Mutex::new(gate),
    });
    let config = umbra_shadow::ServiceConfig {
        limits,
        ..umbra_shadow::ServiceConfig::default()
    };
    let (service, outbox) = ShadowService::start(config, store, committed);
    drop(outbox);
    let app = app(&service);
    assert_eq!(service.fleet().status(), IndexStatus::Loading);

    // A device's update and get are answered while the index loads.
    update(&service, "during", json!({"state": {"reported": {"t": 2}}})).await;
    let (status, shadow) = get(&app, "/things/before/shadow").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shadow["state"]["reported"]["t"], 1);
    for uri in ["/v1/search?q=shadow.reported.t:*", "/v1/things"] {
        let response = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1"),
            "{uri}"
        );
    }
    assert_eq!(service.fleet().status(), IndexStatus::Loading);

    open_gate.send(()).expect("gate");
    assert_eq!(service.fleet().wait_loaded().await, IndexStatus::Ready);
    let (status, found) = get(&app, "/v1/search?q=shadow.reported.t:*").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = found["things"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["thingName"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["before", "during"]);
    service.close().await;
}

async fn update(service: &ShadowService, thing: &str, body: Value) {
    let answer = service
        .handle(req(ShadowKey::classic(thing), Operation::Update, body))
        .await;
    assert!(answer.result.is_ok(), "{thing}: {:?}", answer.result);
}
