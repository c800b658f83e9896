//! The operator API driven through `Router::oneshot` (no socket), over a real
//! SQLite store in a tempdir (and, where the store answers, over PostgreSQL
//! too, with `--include-ignored`): every route, the token/role matrix, the change
//! stream's resume, filters, 410 and lag handling, and catch-up by version.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use prometheus::Registry;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;
use umbra_shadow::http::{router, ApiConfig, ApiState, Role, TokenConfig};
use umbra_shadow::store::change_entry_bytes;
use umbra_shadow::{
    Message, Operation, Request as ShadowRequest, ShadowKey, ShadowMetrics, ShadowService,
};

struct Harness {
    service: Arc<ShadowService>,
    outbox: mpsc::Receiver<Message>,
    app: Router,
    ready: watch::Sender<bool>,
    /// Last, so that the database outlives the service.
    store: TestStore,
}

#[macro_use]
mod support;

use support::{unlimited, Retention, TestStore};

/// The API over a service on a SQLite file of its own.
fn harness(config: ApiConfig) -> Harness {
    harness_on(TestStore::sqlite(), config, Retention::default())
}

/// The API over a service on `store`, keeping its change log as
/// `retention` says.
fn harness_on(store: TestStore, config: ApiConfig, retention: Retention) -> Harness {
    let registry = Registry::new();
    let metrics = ShadowMetrics::register(&registry).expect("register metrics");
    let (service, outbox) = store.start_with(unlimited(), retention, Some(metrics.clone()));
    let (ready, ready_rx) = watch::channel(false);
    let state =
        ApiState::new(Arc::clone(&service), config, registry, ready_rx).with_metrics(metrics);
    Harness {
        service,
        outbox,
        app: router(state),
        ready,
        store,
    }
}

fn tokens() -> ApiConfig {
    ApiConfig {
        tokens: vec![
            TokenConfig {
                name: "viewer".into(),
                token: "read-token".into(),
                role: Role::Read,
            },
            TokenConfig {
                name: "operator".into(),
                token: "write-token".into(),
                role: Role::Write,
            },
        ],
        ..ApiConfig::default()
    }
}

fn request(method: Method, uri: &str, token: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        // What `curl -d` sends: the body must be read anyway.
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Body::from(body.to_string())).expect("request")
}

/// The router's response to `req`.
async fn respond(app: &Router, req: Request<Body>) -> axum::response::Response {
    app.clone().oneshot(req).await.expect("infallible")
}

async fn call_raw(app: &Router, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let response = respond(app, req).await;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, body.to_vec())
}

async fn call(app: &Router, method: Method, uri: &str, body: &str) -> (StatusCode, Value) {
    let (status, body) = call_raw(app, request(method, uri, None, body)).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn drain(outbox: &mut mpsc::Receiver<Message>) -> Vec<String> {
    let mut topics = Vec::new();
    while let Ok(m) = outbox.try_recv() {
        topics.push(m.topic);
    }
    topics
}

async fn update(service: &ShadowService, key: &ShadowKey, body: Value) -> u64 {
    let answer = service
        .handle(ShadowRequest {
            key: key.clone(),
            op: Operation::Update,
            payload: serde_json::to_vec(&body).unwrap_or_default().into(),
            client: "test".into(),
            user_properties: None,
        })
        .await;
    answer.result.expect("update accepted")
}

on_both_stores! {
    #[tokio::test]
    async fn shadow_routes_answer_like_aws_and_publish(store: TestStore) {
        let mut h = harness_on(store, ApiConfig::default(), Retention::default());
        let body =
            r#"{"state":{"desired":{"mode":"eco","t":20},"reported":{"t":18}},"clientToken":"c1"}"#;
        let (status, doc) = call(&h.app, Method::POST, "/things/lamp-1/shadow", body).await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["clientToken"], "c1");
        assert_eq!(doc["state"]["desired"]["mode"], "eco");
        assert!(doc["metadata"]["desired"]["mode"]["timestamp"].is_i64());
        assert_eq!(
            drain(&mut h.outbox),
            [
                "$aws/things/lamp-1/shadow/update/accepted",
                "$aws/things/lamp-1/shadow/update/documents",
                "$aws/things/lamp-1/shadow/update/delta",
            ]
        );

        let (status, doc) = call(&h.app, Method::GET, "/things/lamp-1/shadow", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(doc["state"]["delta"], json!({"mode": "eco", "t": 20}));
        assert_eq!(doc["state"]["reported"], json!({"t": 18}));
        assert_eq!(doc["version"], 1);
        assert_eq!(
            drain(&mut h.outbox),
            ["$aws/things/lamp-1/shadow/get/accepted"]
        );

        // Named shadows go through ?name=.
        let (status, doc) = call(
            &h.app,
            Method::POST,
            "/things/lamp-1/shadow?name=cfg",
            r#"{"state":{"reported":{"x":1}}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        assert!(drain(&mut h.outbox)
            .iter()
            .all(|t| t.starts_with("$aws/things/lamp-1/shadow/name/cfg/update/")));

        // Errors: AWS's shape and codes.
        let (status, doc) = call(&h.app, Method::GET, "/things/lamp-1/shadow?name=nope", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(doc["code"], 404);
        assert_eq!(doc["message"], "No shadow exists with name: 'nope'");
        assert!(doc["timestamp"].is_i64());
        let (status, doc) = call(&h.app, Method::POST, "/things/lamp-1/shadow", "{nope").await;
        assert_eq!(
            (status, doc["message"].clone()),
            (StatusCode::BAD_REQUEST, json!("Invalid JSON"))
        );
        let (status, doc) = call(
            &h.app,
            Method::POST,
            "/things/lamp-1/shadow",
            r#"{"state":{"desired":{"t":1}},"version":7}"#,
        )
        .await;
        assert_eq!(
            (status, doc["code"].clone()),
            (StatusCode::CONFLICT, json!(409))
        );
        let (status, doc) = call(&h.app, Method::GET, "/things/bad%20name/shadow", "").await;
        assert_eq!(
            (status, doc["message"].clone()),
            (StatusCode::BAD_REQUEST, json!("Invalid thing name"))
        );

        // Delete keeps the version; the shadow is gone afterwards.
        let (status, doc) = call(&h.app, Method::DELETE, "/things/lamp-1/shadow", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(doc["version"], 1);
        let (status, _) = call(&h.app, Method::GET, "/things/lamp-1/shadow", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        h.service.close().await;
    }
}

#[tokio::test]
async fn oversized_body_is_413_in_aws_shape() {
    let h = harness(ApiConfig {
        body_limit_bytes: 1024,
        ..ApiConfig::default()
    });
    let big = format!(
        r#"{{"state":{{"desired":{{"x":"{}"}}}}}}"#,
        "a".repeat(4096)
    );
    let (status, doc) = call(&h.app, Method::POST, "/things/t/shadow", &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        doc["message"],
        "The payload exceeds the maximum size allowed"
    );
    h.service.close().await;
}

on_both_stores! {
    #[tokio::test]
    async fn list_named_shadows_pages_like_aws(store: TestStore) {
        let h = harness_on(store, ApiConfig::default(), Retention::default());
        for name in ["a", "b", "c", "d", "e"] {
            update(
                &h.service,
                &ShadowKey::named("t1", name),
                json!({"state":{"reported":{"n":1}}}),
            )
            .await;
        }
        update(
            &h.service,
            &ShadowKey::classic("t1"),
            json!({"state":{"reported":{"n":1}}}),
        )
        .await;
        let uri = "/api/things/shadow/ListNamedShadowsForThing/t1";
        let (status, page) = call(&h.app, Method::GET, &format!("{uri}?pageSize=2"), "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["results"], json!(["a", "b"]));
        assert!(page["timestamp"].is_i64());
        let token = page["nextToken"].as_str().unwrap_or_default().to_string();
        let (_, page) = call(
            &h.app,
            Method::GET,
            &format!("{uri}?pageSize=2&nextToken={token}"),
            "",
        )
        .await;
        assert_eq!(page["results"], json!(["c", "d"]));
        let token = page["nextToken"].as_str().unwrap_or_default().to_string();
        let (_, page) = call(
            &h.app,
            Method::GET,
            &format!("{uri}?pageSize=2&nextToken={token}"),
            "",
        )
        .await;
        assert_eq!(page["results"], json!(["e"]));
        assert!(page.get("nextToken").is_none());
        let (status, _) = call(&h.app, Method::GET, &format!("{uri}?pageSize=0"), "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        h.service.close().await;
    }
}

#[tokio::test]
async fn tokens_and_roles() {
    let h = harness(tokens());
    update(
        &h.service,
        &ShadowKey::classic("t"),
        json!({"state":{"reported":{"n":1}}}),
    )
    .await;
    let update_body = r#"{"state":{"desired":{"n":2}}}"#;
    let read_routes = [
        "/things/t/shadow",
        "/api/things/shadow/ListNamedShadowsForThing/t",
        "/v1/things",
        "/v1/search?q=thingName:t",
        "/v1/things/t/shadow/changes?since_version=0",
        "/metrics",
    ];
    for uri in read_routes {
        for (token, want) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some("wrong"), StatusCode::UNAUTHORIZED),
            (Some("read-token"), StatusCode::OK),
            (Some("write-token"), StatusCode::OK),
        ] {
            let (status, body) = call_raw(&h.app, request(Method::GET, uri, token, "")).await;
            // The index loads in the background; it may answer 503 the first time.
            let status = if status == StatusCode::SERVICE_UNAVAILABLE {
                h.service.fleet().wait_loaded().await;
                call_raw(&h.app, request(Method::GET, uri, token, ""))
                    .await
                    .0
            } else {
                status
            };
            assert_eq!(
                status,
                want,
                "GET {uri} with {token:?}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    for (method, uri, body) in [
        (Method::POST, "/things/t/shadow", update_body),
        (Method::DELETE, "/things/t/shadow", ""),
    ] {
        for (token, want) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some("read-token"), StatusCode::FORBIDDEN),
            (Some("write-token"), StatusCode::OK),
        ] {
            let (status, body) = call_raw(&h.app, request(method.clone(), uri, token, body)).await;
            assert_eq!(status, want, "{method} {uri} with {token:?}");
            if want == StatusCode::UNAUTHORIZED {
                let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                assert_eq!(doc["code"], 401);
            }
        }
    }
    // The change stream needs read too (checked before any streaming).
    let (status, _) = call_raw(&h.app, request(Method::GET, "/v1/changes", None, "")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Health, readiness and the OpenAPI document are open.
    for uri in ["/healthz", "/openapi.json"] {
        let (status, _) = call_raw(&h.app, request(Method::GET, uri, None, "")).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
    }
    let (status, _) = call_raw(&h.app, request(Method::GET, "/readyz", None, "")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    h.ready.send_replace(true);
    let (status, _) = call_raw(&h.app, request(Method::GET, "/readyz", None, "")).await;
    assert_eq!(status, StatusCode::OK);
    h.service.close().await;
}

#[tokio::test]
async fn public_metrics_need_no_token() {
    let h = harness(ApiConfig {
        public_metrics: true,
        ..tokens()
    });
    let (status, _) = call_raw(&h.app, request(Method::GET, "/metrics", None, "")).await;
    assert_eq!(status, StatusCode::OK);
    h.service.close().await;
}

#[tokio::test]
async fn metrics_render_the_registry() {
    let h = harness(ApiConfig::default());
    update(
        &h.service,
        &ShadowKey::classic("m"),
        json!({"state":{"desired":{"n":1}}}),
    )
    .await;
    let (status, _) = call(&h.app, Method::GET, "/things/m/shadow?name=x", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = call_raw(&h.app, request(Method::GET, "/metrics", None, "")).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    for needle in [
        r#"umbra_shadow_requests_total{code="200",operation="update"} 1"#,
        r#"umbra_shadow_requests_total{code="404",operation="get"} 1"#,
        "umbra_shadow_request_seconds_bucket",
        "umbra_store_commit_seconds_count",
        "umbra_store_batch_size_count",
        "umbra_shadow_deltas_published_total 1",
        "umbra_change_log_entries 1",
        "umbra_change_stream_subscribers 0",
        r#"umbra_http_requests_total{method="GET",route="/things/:thing/shadow",status="404"} 1"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains("thing=\"m\""));
    h.service.close().await;
}

#[tokio::test]
async fn openapi_lists_every_route() {
    let h = harness(ApiConfig::default());
    let (status, doc) = call(&h.app, Method::GET, "/openapi.json", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in [
        "/things/{thing}/shadow",
        "/api/things/shadow/ListNamedShadowsForThing/{thing}",
        "/v1/changes",
        "/v1/things/{thing}/shadow/changes",
        "/v1/fleet",
        "/v1/things",
        "/v1/things/{thing}",
        "/v1/search",
        "/metrics",
        "/healthz",
        "/readyz",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    for method in ["get", "post", "delete"] {
        assert!(doc["paths"]["/things/{thing}/shadow"].get(method).is_some());
    }
    h.service.close().await;
}

/// Reads SSE frames from a streaming body.
struct EventReader {
    body: Body,
    buffer: String,
}

#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: Option<u64>,
    event: Option<String>,
    data: String,
    comment: bool,
}

impl EventReader {
    fn new(body: Body) -> EventReader {
        EventReader {
            body,
            buffer: String::new(),
        }
    }

    /// The next event or comment; `None` at the end of the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: None,
                    data: String::new(),
                    comment: false,
                };
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
                        event.id = v.parse().ok();
                    } else if let Some(v) =
                        line.strip_prefix("event: ").or(line.strip_prefix("event:"))
                    {
                        event.event = Some(v.to_string());
                    } else if let Some(v) =
                        line.strip_prefix("data: ").or(line.strip_prefix("data:"))
                    {
                        event.data.push_str(v);
                    } else if line.starts_with(':') {
                        event.comment = true;
                    }
                }
                return Some(event);
            }
            let frame = tokio::time::timeout(Duration::from_secs(20), self.body.frame())
                .await
                .expect("stream stalled")?
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }

    /// The next event that is not a heartbeat.
    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let event = self.next().await?;
            if !event.comment {
                return Some(event);
            }
        }
    }
}

async fn open_stream(app: &Router, uri: &str, last_event_id: Option<u64>) -> (StatusCode, Body) {
    let mut req = request(Method::GET, uri, None, "");
    if let Some(id) = last_event_id {
        req.headers_mut()
            .insert("last-event-id", id.to_string().parse().expect("header"));
    }
    let response = respond(app, req).await;
    (response.status(), response.into_body())
}

fn last_seq(h: &Harness) -> u64 {
    h.service.store().change_log_bounds().expect("bounds").last
}

on_both_stores! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resume_with_last_event_id_is_gap_free_and_duplicate_free(store: TestStore) {
        let h = harness_on(store, ApiConfig::default(), Retention::default());
        let keys: Vec<ShadowKey> = (0..5)
            .map(|i| ShadowKey::classic(format!("dev-{i}")))
            .collect();
        for n in 0..40 {
            update(
                &h.service,
                &keys[n % 5],
                json!({"state":{"reported":{"n": n}}}),
            )
            .await;
        }
        // Resume mid-history while more updates commit concurrently: the handoff
        // from history to live must neither skip nor repeat a sequence.
        let writer = {
            let service = Arc::clone(&h.service);
            let keys = keys.clone();
            tokio::spawn(async move {
                for n in 40..240 {
                    update(
                        &service,
                        &keys[n % 5],
                        json!({"state":{"reported":{"n": n}}}),
                    )
                    .await;
                }
            })
        };
        let (status, body) = open_stream(&h.app, "/v1/changes?since=1", Some(17)).await;
        assert_eq!(status, StatusCode::OK);
        let mut reader = EventReader::new(body);
        writer.await.expect("writer");
        let last = last_seq(&h);
        assert_eq!(last, 240);
        let mut seen = Vec::new();
        while seen.last() != Some(&last) {
            let event = reader.next_event().await.expect("event");
            assert_eq!(event.event.as_deref(), Some("update"));
            let data: Value = serde_json::from_str(&event.data).expect("json data");
            assert_eq!(data["seq"].as_u64(), event.id);
            assert!(data["document"]["state"]["reported"]["n"].is_u64());
            seen.push(event.id.expect("id"));
        }
        let want: Vec<u64> = (18..=last).collect();
        assert_eq!(seen, want);
        h.service.close().await;
    }
}

on_both_stores! {
    #[tokio::test]
    async fn since_older_than_retention_is_410(store: TestStore) {
        let h = harness_on(store, ApiConfig::default(), Retention::default());
        let key = ShadowKey::classic("old");
        for n in 0..6 {
            update(&h.service, &key, json!({"state":{"reported":{"n": n}}})).await;
        }
        // Trim the log as the retention sweep would: seqs 1..=3 are gone.
        h.store.execute("DELETE FROM changes WHERE seq <= 3");
        let (status, body) = open_stream(&h.app, "/v1/changes?since=1", None).await;
        assert_eq!(status, StatusCode::GONE);
        let doc: Value = serde_json::from_slice(&body.collect().await.expect("body").to_bytes())
            .unwrap_or(Value::Null);
        assert_eq!(doc["code"], 410);
        let (status, _) = open_stream(&h.app, "/v1/changes", Some(2)).await;
        assert_eq!(status, StatusCode::GONE);
        // since=3: the oldest retained (4) is since+1, nothing is missing.
        let (status, body) = open_stream(&h.app, "/v1/changes?since=3", None).await;
        assert_eq!(status, StatusCode::OK);
        let mut reader = EventReader::new(body);
        assert_eq!(reader.next_event().await.and_then(|e| e.id), Some(4));

        // Catch-up by version: version 2's successor (3) was trimmed.
        let (status, _) = call(
            &h.app,
            Method::GET,
            "/v1/things/old/shadow/changes?since_version=1",
            "",
        )
        .await;
        assert_eq!(status, StatusCode::GONE);
        let (status, page) = call(
            &h.app,
            Method::GET,
            "/v1/things/old/shadow/changes?since_version=3",
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let versions: Vec<u64> = page["changes"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["version"].as_u64()).collect())
            .unwrap_or_default();
        assert_eq!(versions, [4, 5, 6]);
        h.service.close().await;
    }
}

on_both_stores! {
    #[tokio::test]
    async fn catch_up_by_version_includes_delete_and_pages(store: TestStore) {
        let h = harness_on(store, ApiConfig::default(), Retention::default());
        let key = ShadowKey::named("cu", "cfg");
        for n in 0..3 {
            update(&h.service, &key, json!({"state":{"desired":{"n": n}}})).await;
        }
        update(
            &h.service,
            &ShadowKey::classic("cu"),
            json!({"state":{"desired":{"other": 1}}}),
        )
        .await;
        let (status, _) = call(&h.app, Method::DELETE, "/things/cu/shadow?name=cfg", "").await;
        assert_eq!(status, StatusCode::OK);
        update(&h.service, &key, json!({"state":{"desired":{"n": 9}}})).await;
        let uri = "/v1/things/cu/shadow/changes?name=cfg&since_version=1";
        let (status, page) = call(&h.app, Method::GET, uri, "").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let got: Vec<(String, u64)> = page["changes"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|c| {
                        (
                            c["kind"].as_str().unwrap_or("").to_string(),
                            c["version"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            got,
            [
                ("update".into(), 2),
                ("update".into(), 3),
                ("delete".into(), 3),
                ("update".into(), 4)
            ]
        );
        assert_eq!(page["changes"][0]["document"]["state"]["desired"]["n"], 1);
        // The delete of version 3 comes after 3.
        let (_, page) = call(
            &h.app,
            Method::GET,
            "/v1/things/cu/shadow/changes?name=cfg&since_version=3",
            "",
        )
        .await;
        assert_eq!(page["changes"].as_array().map(Vec::len), Some(2));
        // Paging.
        let (_, first) = call(&h.app, Method::GET, &format!("{uri}&pageSize=3"), "").await;
        assert_eq!(first["changes"].as_array().map(Vec::len), Some(3));
        let token = first["nextToken"].as_str().unwrap_or_default().to_string();
        let (_, second) = call(
            &h.app,
            Method::GET,
            &format!("{uri}&pageSize=3&nextToken={token}"),
            "",
        )
        .await;
        assert_eq!(second["changes"][0]["version"], 4);
        assert!(second.get("nextToken").is_none());
        // Up to date: nothing, 200.
        let (status, page) = call(
            &h.app,
            Method::GET,
            "/v1/things/cu/shadow/changes?name=cfg&since_version=4",
            "",
        )
        .await;
        assert_eq!(
            (status, page["changes"].clone()),
            (StatusCode::OK, json!([]))
        );
        let (status, _) = call(&h.app, Method::GET, "/v1/things/cu/shadow/changes", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        h.service.close().await;
    }
}

on_both_stores! {
    #[tokio::test]
    async fn stream_filters_by_thing_query_and_fields(store: TestStore) {
        let h = harness_on(store, ApiConfig::default(), Retention::default());
        update(
            &h.service,
            &ShadowKey::classic("sensor-1"),
            json!({"state":{"reported":{"temp": 35, "fw": "1"}}}),
        )
        .await;
        update(
            &h.service,
            &ShadowKey::classic("sensor-2"),
            json!({"state":{"reported":{"temp": 10}}}),
        )
        .await;
        update(
            &h.service,
            &ShadowKey::classic("lamp-1"),
            json!({"state":{"reported":{"temp": 50}}}),
        )
        .await;
        h.service
            .record_presence("sensor-2", true, 1_700_000_000_000, None);
        update(
            &h.service,
            &ShadowKey::classic("sensor-1"),
            json!({"state":{"reported":{"temp": 20}}}),
        )
        .await;
        let last = last_seq(&h);
        assert_eq!(last, 5);

        let ids = |uri: String| {
            let app = h.app.clone();
            async move {
                let (status, body) = open_stream(&app, &uri, None).await;
                assert_eq!(status, StatusCode::OK, "{uri}");
                let mut reader = EventReader::new(body);
                let mut out = Vec::new();
                // A marker change after the filtered ones tells us history is done.
                while let Some(event) = reader.next_event().await {
                    let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                    if event.id == Some(last) || data["seq"] == last {
                        out.push((event.id.unwrap_or(0), data));
                        break;
                    }
                    out.push((event.id.unwrap_or(0), data));
                }
                out
            }
        };
        let thing: Vec<u64> = ids("/v1/changes?since=0&thing=sensor-1".into())
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(thing, [1, 5]);
        let hot: Vec<u64> =
            ids("/v1/changes?since=0&q=shadow.reported.temp%3E30%20OR%20thingName:sensor-1".into())
                .await
                .into_iter()
                .map(|(id, _)| id)
                .collect();
        assert_eq!(hot, [1, 3, 5]);
        let online: Vec<u64> = ids(
            "/v1/changes?since=0&q=connectivity.connected:true%20OR%20shadow.reported.temp:20".into(),
        )
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
        assert_eq!(online, [4, 5]);
        let fields =
            ids("/v1/changes?since=4&fields=/document/state/reported/temp,/version".into()).await;
        assert_eq!(fields.len(), 1);
        assert_eq!(
            fields[0].1,
            json!({"seq": 5, "kind": "update", "thing": "sensor-1", "version": 2,
                   "document": {"state": {"reported": {"temp": 20}}}})
        );
        let (status, body) = open_stream(&h.app, "/v1/changes?q=shadow.reported.temp%3E", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let doc: Value = serde_json::from_slice(&body.collect().await.expect("body").to_bytes())
            .unwrap_or(Value::Null);
        assert_eq!(doc["position"], 21);
        let (status, _) = open_stream(&h.app, "/v1/changes?fields=nopointer", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        h.service.close().await;
    }
}

on_both_stores! {
    #[tokio::test]
    async fn lagging_subscriber_is_ended_and_others_continue(store: TestStore) {
        let config = ApiConfig {
            stream_buffer: 1,
            ..ApiConfig::default()
        };
        let h = harness_on(store, config, Retention::default());
        let (status, slow) = open_stream(&h.app, "/v1/changes", None).await;
        assert_eq!(status, StatusCode::OK);
        let (_, fast) = open_stream(&h.app, "/v1/changes?since=0", None).await;
        let mut fast = EventReader::new(fast);
        let key = ShadowKey::classic("busy");
        for n in 0..20u64 {
            update(&h.service, &key, json!({"state":{"reported":{"n": n}}})).await;
            // The fast subscriber keeps up.
            assert_eq!(fast.next_event().await.and_then(|e| e.id), Some(n + 1));
        }
        // The slow one never read: it got what fit its buffer, then the end.
        let mut slow = EventReader::new(slow);
        let mut ids = Vec::new();
        let end = loop {
            let event = slow
                .next_event()
                .await
                .expect("end event before the stream closes");
            match event.event.as_deref() {
                Some("end") => break event,
                _ => ids.push(event.id.unwrap_or(0)),
            }
        };
        let end: Value = serde_json::from_str(&end.data).unwrap_or(Value::Null);
        assert_eq!(end["reason"], "lagged");
        assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
        assert!(ids.len() < 20);
        assert_eq!(end["lastEventId"].as_u64(), ids.last().copied());
        assert!(slow.next().await.is_none());
        h.service.close().await;
    }
}

#[tokio::test(start_paused = true)]
async fn idle_stream_sends_heartbeats() {
    let h = harness(ApiConfig {
        heartbeat_secs: 5,
        ..ApiConfig::default()
    });
    let (status, body) = open_stream(&h.app, "/v1/changes", None).await;
    assert_eq!(status, StatusCode::OK);
    let mut reader = EventReader::new(body);
    let started = tokio::time::Instant::now();
    let beat = reader.next().await.expect("heartbeat");
    assert!(beat.comment);
    assert!(started.elapsed() >= Duration::from_secs(5));
    h.service.close().await;
}

on_both_stores! {
    #[tokio::test]
    async fn shutdown_ends_open_streams(store: TestStore) {
        let (service, _outbox) = store.start(unlimited());
        let state = ApiState::new(
            Arc::clone(&service),
            ApiConfig::default(),
            Registry::new(),
            watch::channel(true).1,
        );
        let shutdown = state.shutdown_token();
        let app = router(state);
        let (_, body) = open_stream(&app, "/v1/changes", None).await;
        let mut reader = EventReader::new(body);
        shutdown.cancel();
        let end = reader.next_event().await.expect("end event");
        assert_eq!(end.event.as_deref(), Some("end"));
        assert!(end.data.contains("shutdown"));
        assert!(reader.next().await.is_none());
        service.close().await;
    }
}

/// CORS is off by default (a preflight is refused, like any method a route
/// does not take, and no answer carries an allow-origin header); with `cors_origins`, a
/// listed origin's preflight and requests are allowed, and another's not.
#[tokio::test]
async fn cors_is_off_by_default_and_allows_only_configured_origins() {
    let preflight = |origin: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/things/lamp-1/shadow")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                "authorization,content-type",
            )
            .body(Body::empty())
            .expect("request")
    };
    let from = |origin: &str| {
        let mut req = request(Method::GET, "/things/lamp-1/shadow", Some("read-token"), "");
        req.headers_mut()
            .insert(header::ORIGIN, origin.parse().expect("header"));
        req
    };
    let allowed = |response: &axum::response::Response| {
        response
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .map(|v| v.to_str().expect("ascii").to_owned())
    };

    let off = harness(tokens());
    let response = respond(&off.app, preflight("https://dash.example")).await;
    assert!(
        response.status().is_client_error(),
        "no preflight answer: {}",
        response.status()
    );
    assert_eq!(allowed(&response), None);
    let response = respond(&off.app, from("https://dash.example")).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND, "no shadow yet");
    assert_eq!(allowed(&response), None);

    let on = harness(ApiConfig {
        cors_origins: vec!["https://dash.example".into()],
        ..tokens()
    });
    let response = respond(&on.app, preflight("https://dash.example")).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "a preflight needs no token"
    );
    assert_eq!(allowed(&response).as_deref(), Some("https://dash.example"));
    let methods = response.headers()[header::ACCESS_CONTROL_ALLOW_METHODS]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let response = respond(&on.app, from("https://dash.example")).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND, "no shadow yet");
    assert_eq!(allowed(&response).as_deref(), Some("https://dash.example"));
    let response = respond(&on.app, from("https://evil.example")).await;
    assert_eq!(allowed(&response), None, "another origin is not allowed");
    let response = respond(
        &on.app,
        request(Method::GET, "/things/lamp-1/shadow", None, ""),
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "CORS grants no access"
    );
}

#[test]
fn a_cors_origin_must_be_an_origin() {
    use umbra_shadow::http::{check_listen_addr, ListenError};
    let addr = "127.0.0.1:8080".parse().expect("addr");
    for bad in ["dash.example", "https://dash.example/", "https://"] {
        let config = ApiConfig {
            cors_origins: vec![bad.into()],
            ..ApiConfig::default()
        };
        assert_eq!(
            check_listen_addr(&config, addr),
            Err(ListenError::BadCorsOrigin(bad.into()))
        );
    }
    for good in ["*", "http://localhost:3000", "https://dash.example"] {
        let config = ApiConfig {
            cors_origins: vec![good.into()],
            ..ApiConfig::default()
        };
        assert_eq!(check_listen_addr(&config, addr), Ok(()));
    }
}

on_both_stores! {
    /// `DELETE /v1/things/{thing}` deletes every shadow of the thing as a
    /// shadow delete would (answers published, change log entries written),
    /// then forgets its connectivity; a thing with nothing left is 404.
    #[tokio::test]
    async fn deleting_a_thing_deletes_its_shadows_and_connectivity(store: TestStore) {
        let mut h = harness_on(store, ApiConfig::default(), Retention::default());
        let classic = ShadowKey::classic("lamp-9");
        let named = ShadowKey::named("lamp-9", "cfg");
        update(
            &h.service,
            &classic,
            json!({"state": {"reported": {"on": true}}}),
        )
        .await;
        update(&h.service, &named, json!({"state": {"desired": {"x": 1}}})).await;
        assert!(h.service.record_presence("lamp-9", true, 1_000, None));
        drain(&mut h.outbox);

        let (status, body) = call(&h.app, Method::DELETE, "/v1/things/lamp-9", "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body,
            json!({"thingName": "lamp-9", "shadows": [null, "cfg"], "connectivity": true})
        );
        let topics = drain(&mut h.outbox);
        for topic in [
            "$aws/things/lamp-9/shadow/delete/accepted",
            "$aws/things/lamp-9/shadow/name/cfg/delete/accepted",
        ] {
            assert!(topics.iter().any(|t| t == topic), "{topic}: {topics:?}");
        }
        for uri in ["/things/lamp-9/shadow", "/things/lamp-9/shadow?name=cfg"] {
            let (status, _) = call(&h.app, Method::GET, uri, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        }
        let store = Arc::clone(h.service.store());
        assert_eq!(store.connectivity("lamp-9").ok().flatten(), None);
        let kinds: Vec<&str> = store
            .changes_since(0, 100)
            .expect("change log")
            .iter()
            .map(|c| c.kind.as_str())
            .collect();
        assert_eq!(
            kinds,
            ["update", "update", "connect", "delete", "delete", "forget"]
        );

        let (status, body) = call(&h.app, Method::DELETE, "/v1/things/lamp-9", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["message"], "No thing exists with name: 'lamp-9'");
        h.service.close().await;
    }
}

on_both_stores! {
    /// `/v1/fleet` counts things, connected things and shadows in and out of
    /// sync, as updates, presence and deletes change them.
    #[tokio::test]
    async fn the_fleet_summary_counts_things_connections_and_deltas(store: TestStore) {
        let h = harness_on(store, ApiConfig::default(), Retention::default());
        let summary = |body: &Value| {
            [
                "things",
                "connected",
                "shadows",
                "shadowsInSync",
                "shadowsWithDelta",
            ]
            .map(|k| body[k].as_u64().unwrap_or(u64::MAX))
        };
        h.service.fleet().wait_loaded().await;
        let (status, body) = call(&h.app, Method::GET, "/v1/fleet", "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(summary(&body), [0, 0, 0, 0, 0]);
        // Presence is committed like an update; each update below is answered
        // after its commit, so after the presence recorded before it.
        assert!(h.service.record_presence("lamp-1", true, 1_000, None));
        assert!(h.service.record_presence("gw-1", true, 1_000, None));
        let lamp = ShadowKey::classic("lamp-1");
        update(
            &h.service,
            &lamp,
            json!({"state": {"desired": {"on": true}}}),
        )
        .await;
        update(
            &h.service,
            &ShadowKey::named("lamp-1", "cfg"),
            json!({"state": {"desired": {"x": 1}, "reported": {"x": 1}}}),
        )
        .await;
        update(
            &h.service,
            &ShadowKey::classic("meter-1"),
            json!({"state": {"reported": {"kwh": 2}}}),
        )
        .await;
        let (_, body) = call(&h.app, Method::GET, "/v1/fleet", "").await;
        assert_eq!(summary(&body), [3, 2, 3, 2, 1], "{body}");
        // The gateway goes away, the lamp reaches its desired state.
        assert!(h.service.record_presence("gw-1", false, 2_000, None));
        update(
            &h.service,
            &lamp,
            json!({"state": {"reported": {"on": true}}}),
        )
        .await;
        let (_, body) = call(&h.app, Method::GET, "/v1/fleet", "").await;
        assert_eq!(summary(&body), [3, 1, 3, 3, 0], "{body}");
        h.service.close().await;
    }
}

on_both_stores! {
    /// A change log over its size drops its oldest entries (in steps, between
    /// batches), keeps its byte count in step, and answers 410 for what it
    /// dropped, as for entries past the time window.
    #[tokio::test]
    async fn a_change_log_over_its_size_drops_the_oldest_and_answers_410_for_them(store: TestStore) {
        const LIMIT: u64 = 3000;
        let retention = Retention {
            bytes: LIMIT,
            ..Retention::default()
        };
        let h = harness_on(store, ApiConfig::default(), retention);
        let key = ShadowKey::classic("chatty");
        for n in 0..40 {
            let padding = "x".repeat(100);
            update(
                &h.service,
                &key,
                json!({"state":{"reported":{"n": n, "pad": padding}}}),
            )
            .await;
        }
        update(&h.service, &key, json!({"state":{"reported":{"n": 40}}})).await;
        // The writer prunes after each batch, before it takes the next: once
        // this get (a batch of its own, which logs nothing) is answered, the
        // pruning after the last update is done and nothing more is due.
        let got = h
            .service
            .handle(ShadowRequest {
                key: key.clone(),
                op: Operation::Get,
                payload: Vec::new().into(),
                client: "test".into(),
                user_properties: None,
            })
            .await;
        assert!(got.result.is_ok());
        let kept = h.service.store().changes_since(0, 100).expect("change log");
        let oldest = kept.first().map_or(0, |c| c.seq);
        let entries = kept.len() as u64;
        let bytes: u64 = kept
            .iter()
            .map(|c| change_entry_bytes(&c.thing, c.name.as_deref(), &c.document))
            .sum();
        assert!(oldest > 20, "oldest kept is {oldest}");
        assert_eq!(oldest + entries - 1, 41, "the newest are kept");
        assert!(bytes <= LIMIT, "{bytes} bytes kept");

        let (status, _) = open_stream(&h.app, "/v1/changes?since=0", None).await;
        assert_eq!(status, StatusCode::GONE);
        let since = format!("/v1/changes?since={}", oldest - 1);
        let (status, body) = open_stream(&h.app, &since, None).await;
        assert_eq!(status, StatusCode::OK);
        let mut reader = EventReader::new(body);
        assert_eq!(reader.next_event().await.and_then(|e| e.id), Some(oldest));
        let (_, metrics) = call_raw(&h.app, request(Method::GET, "/metrics", None, "")).await;
        let metrics = String::from_utf8_lossy(&metrics).into_owned();
        let gauge = metrics
            .lines()
            .find_map(|l| l.strip_prefix("umbra_change_log_bytes "))
            .and_then(|v| v.parse::<u64>().ok());
        // The store's count of its log's bytes, which it keeps as it
        // writes and prunes, matches what the log holds.
        assert_eq!(gauge, Some(bytes));
        h.service.close().await;
    }
}

#[tokio::test]
async fn the_dashboard_is_served_without_a_token_and_its_data_is_not() {
    let h = harness(tokens());
    let response = respond(&h.app, request(Method::GET, "/", None, "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    let csp = headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("ascii");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let page = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let page = String::from_utf8_lossy(&page);
    // Nothing from another origin, and no inline script the policy would block.
    assert!(!page.contains("http://") && !page.contains("https://"));
    assert!(page.contains(r#"<script type="module" src="/ui/app.js"></script>"#));
    assert!(!page.contains("<script>"));

    for (path, content_type) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        let response = respond(&h.app, request(Method::GET, path, None, "")).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()[header::CONTENT_TYPE], content_type);
    }
    let (status, body) = call_raw(&h.app, request(Method::GET, "/ui/config.json", None, "")).await;
    assert_eq!(status, StatusCode::OK);
    let config: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        config,
        json!({"tokens": true, "mqttWebSocket": null, "telemetryTopic": "devices/{thing}/telemetry"})
    );
    // The page's data still needs the token.
    let (status, _) = call_raw(&h.app, request(Method::GET, "/v1/fleet", None, "")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    h.service.close().await;
}

#[tokio::test]
async fn the_dashboard_can_be_turned_off() {
    let h = harness(ApiConfig {
        dashboard: false,
        ..ApiConfig::default()
    });
    for path in ["/", "/ui/app.js", "/ui/config.json"] {
        let (status, _) = call_raw(&h.app, request(Method::GET, path, None, "")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    h.service.close().await;
}
