//! Runs every case of Umbra's own `tests/cases/shadow_update.json`, and of
//! `shared/vectors/shadow_update.json` when it is there, through the pure
//! engine and through the service over a real SQLite file.

use serde_json::{json, Value};
use umbra_shadow::document::{SectionPatch, ShadowState};
use umbra_shadow::engine::{self, Command, Outcome, StoredShadow};
use umbra_shadow::request::parse_update;
use umbra_shadow::topic::AnswerKind;
use umbra_shadow::StoreConfig;
use umbra_shadow::{Limits, Operation, Request, ShadowKey, ShadowService};

mod support;

/// Umbra's own cases, and the shared protocol vectors when they are beside
/// the clone (`UMBRA_VECTORS` names another file); CI has them.
fn vectors() -> Vec<Value> {
    let own = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/cases/shadow_update.json"
    );
    let mut cases = read_cases(own).unwrap_or_else(|e| panic!("cannot read {own}: {e}"));
    assert!(cases.len() >= 15, "expected Umbra's own cases");
    let shared = std::env::var("UMBRA_VECTORS").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/vectors/shadow_update.json"
        )
        .into()
    });
    if std::path::Path::new(&shared).exists() {
        let more = read_cases(&shared).unwrap_or_else(|e| panic!("cannot read {shared}: {e}"));
        assert!(more.len() >= 20, "expected the full shared vector set");
        cases.extend(more);
    }
    cases
}

fn read_cases(path: &str) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    doc["cases"]
        .as_array()
        .cloned()
        .ok_or_else(|| "no cases".to_owned())
}

fn section(v: &Value) -> Option<SectionPatch> {
    v.as_object().map(|o| SectionPatch::Merge(o.clone()))
}

fn stored_before(before: &Value) -> Option<StoredShadow> {
    if before.is_null() {
        return None;
    }
    let mut state = ShadowState::default();
    if let Some(p) = section(&before["desired"]) {
        ShadowState::apply(&mut state.desired, &p, 1);
    }
    if let Some(p) = section(&before["reported"]) {
        ShadowState::apply(&mut state.reported, &p, 1);
    }
    Some(StoredShadow {
        state: state.into(),
        version: before["version"].as_u64().expect("version"),
        deleted: false,
        updated_at: 1,
    })
}

fn section_value(state: &ShadowState, name: &str) -> Value {
    state
        .state_value()
        .get(name)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn every_vector_through_the_engine() {
    let limits = Limits::default();
    let key = ShadowKey::classic("thing-1");
    for case in vectors() {
        let name = case["name"].as_str().unwrap_or("?");
        let before = stored_before(&case["before"]);
        let request = case["request"].as_str().expect("request text");
        let command = parse_update(request.as_bytes(), &limits)
            .map(Command::Update)
            .map_err(|r| r.rejection);
        let result = command
            .clone()
            .and_then(|c| engine::apply(&key, before.as_ref(), &c, 100, &limits));
        if let Some(want) = case.get("rejected") {
            let err = result.err().unwrap_or_else(|| panic!("{name}: accepted"));
            assert_eq!(
                u64::from(err.code()),
                want["code"].as_u64().unwrap_or(0),
                "{name}"
            );
            assert_eq!(
                err.to_string(),
                want["message"].as_str().unwrap_or(""),
                "{name}"
            );
            continue;
        }
        let want = &case["accepted"];
        let applied = result.unwrap_or_else(|e| panic!("{name}: rejected {e}"));
        let Outcome::Updated { current, .. } = &applied.outcome else {
            panic!("{name}: not an update outcome");
        };
        assert_eq!(
            current.version,
            want["version"].as_u64().unwrap_or(0),
            "{name}"
        );
        assert_eq!(
            section_value(&current.state, "desired"),
            want["desired"],
            "{name}"
        );
        assert_eq!(
            section_value(&current.state, "reported"),
            want["reported"],
            "{name}"
        );
        let delta = current.state.delta().map_or(Value::Null, Value::Object);
        assert_eq!(delta, want["delta"], "{name}: delta");
        let answer = umbra_shadow::Answer::accepted(
            &key,
            command.as_ref().expect("parsed"),
            &applied.outcome,
        );
        let delta_topic = key.answer_topic(Operation::Update, AnswerKind::Delta);
        let published = answer.messages.iter().any(|m| m.topic == delta_topic);
        assert_eq!(
            published,
            want["delta_published"].as_bool().unwrap_or(false),
            "{name}"
        );
    }
}

/// Brings a shadow to the vector's `before` through real requests: one update
/// that sets the sections, then empty updates until the version matches.
async fn prepare(service: &ShadowService, key: &ShadowKey, before: &Value) {
    if before.is_null() {
        return;
    }
    let mut state = serde_json::Map::new();
    for name in ["desired", "reported"] {
        if before[name].is_object() {
            state.insert(name.into(), before[name].clone());
        }
    }
    let mut payload = json!({ "state": state });
    for _ in 0..before["version"].as_u64().unwrap_or(1) {
        let answer = service
            .handle(request(key, Operation::Update, &payload))
            .await;
        assert!(
            answer.result.is_ok(),
            "preparing {key}: {:?}",
            answer.result
        );
        payload = json!({"state": {"reported": {}}});
    }
}

fn request(key: &ShadowKey, op: Operation, payload: &Value) -> Request {
    Request {
        key: key.clone(),
        op,
        payload: serde_json::to_vec(payload).unwrap_or_default().into(),
        client: "test".into(),
        user_properties: None,
    }
}

#[tokio::test]
async fn every_vector_through_the_service_and_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StoreConfig::new(dir.path().join("shadows.db"));
    let (service, outbox) = support::start(store, support::unlimited(), None);
    drop(outbox);
    for (i, case) in vectors().into_iter().enumerate() {
        let name = case["name"].as_str().unwrap_or("?").to_string();
        let key = ShadowKey::classic(format!("vector-{i}"));
        prepare(&service, &key, &case["before"]).await;
        let req = Request {
            payload: case["request"]
                .as_str()
                .unwrap_or("")
                .as_bytes()
                .to_vec()
                .into(),
            ..request(&key, Operation::Update, &Value::Null)
        };
        let answer = service.handle(req).await;
        if let Some(want) = case.get("rejected") {
            assert_eq!(
                answer.reply().topic,
                key.answer_topic(Operation::Update, AnswerKind::Rejected)
            );
            let body = answer.reply_json();
            assert_eq!(body["code"], want["code"], "{name}");
            assert_eq!(body["message"], want["message"], "{name}");
            continue;
        }
        let want = &case["accepted"];
        assert_eq!(
            answer.reply().topic,
            key.answer_topic(Operation::Update, AnswerKind::Accepted),
            "{name}"
        );
        assert_eq!(answer.reply_json()["version"], want["version"], "{name}");
        let delta_topic = key.answer_topic(Operation::Update, AnswerKind::Delta);
        let delta_msg = answer.messages.iter().find(|m| m.topic == delta_topic);
        assert_eq!(
            delta_msg.is_some(),
            want["delta_published"].as_bool().unwrap_or(false),
            "{name}"
        );

        let got = service
            .handle(request(&key, Operation::Get, &json!({})))
            .await;
        let doc = got.reply_json();
        assert_eq!(doc["version"], want["version"], "{name}");
        for part in ["desired", "reported", "delta"] {
            assert_eq!(doc["state"][part], want[part], "{name}: {part}");
        }
    }
    service.close().await;
}
