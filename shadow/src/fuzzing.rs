//! Entry points of the fuzz targets (`fuzz/`), shared with the tests that
//! replay their corpora and the inputs that once failed
//! (`shadow/tests/fuzz_corpora.rs`). Each takes arbitrary bytes, drives one
//! parser the way the service does, and panics when the result breaks an
//! invariant; a panic is what the fuzzer reports.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::answer::Answer;
use crate::document::ShadowState;
use crate::engine::{apply, Command, StoredShadow};
use crate::http::changes::{ChangeFilter, StreamParams};
use crate::request::parse_update;
use crate::search::{Query, ShadowFields, ThingFields};
use crate::store::{Change, ChangeKind};
use crate::topic::ShadowKey;
use crate::Limits;

/// `{"state": ..}` update bytes: parse, apply to a new shadow and again to
/// the result (as the service does), answer, and read the stored state back
/// the way the store does.
pub fn shadow_update(data: &[u8]) {
    let limits = Limits::default();
    let Ok(request) = parse_update(data, &limits) else {
        return;
    };
    let key = ShadowKey::classic("fuzz");
    let command = Command::Update(request);
    let mut stored: Option<StoredShadow> = None;
    for round in 1..=2u64 {
        let Ok(applied) = apply(
            &key,
            stored.as_ref(),
            &command,
            1_000 + round as i64,
            &limits,
        ) else {
            return;
        };
        let answer = Answer::accepted(&key, &command, &applied.outcome);
        assert!(
            answer.reply_json().is_object(),
            "an answer is a JSON object"
        );
        let Some(next) = applied.store else {
            panic!("an accepted update stores the shadow");
        };
        assert_eq!(next.version, round, "each update adds one to the version");
        let state = &next.state;
        if let Some(delta) = state.delta() {
            let desired = state.desired.as_ref().expect("a delta comes from desired");
            for name in delta.keys() {
                assert!(
                    desired.state.contains_key(name),
                    "delta key {name} not desired"
                );
            }
        }
        let state_value: Value = serde_json::from_str(&state.state_json()).expect("state JSON");
        let metadata: Value = serde_json::from_str(&state.metadata_json()).expect("metadata JSON");
        let back = ShadowState::from_values(&state_value, &metadata);
        assert_eq!(&back, state.as_ref(), "what is stored reads back the same");
        stored = Some(next);
    }
}

/// A thing the search and change-stream targets evaluate queries against.
struct Thing {
    state: Arc<ShadowState>,
}

impl Thing {
    fn new() -> Thing {
        let state = json!({
            "desired": {"temp": 21, "mode": "eco", "tags": ["a", "b"], "nested": {"x": 1.5}},
            "reported": {"temp": 30, "mode": "eco", "fw": "1.2.3", "on": true, "none": null}
        });
        Thing {
            state: Arc::new(ShadowState::from_values(&state, &json!({}))),
        }
    }
}

impl ThingFields for Thing {
    fn thing_name(&self) -> &str {
        "sensor-7"
    }

    fn connectivity(&self) -> Option<(bool, i64)> {
        Some((true, 1_700_000_000_000))
    }

    fn shadow(&self, name: Option<&str>) -> Option<ShadowFields<'_>> {
        matches!(name, None | Some("config")).then(|| ShadowFields {
            version: 7,
            state: &self.state,
            has_delta: self.state.has_delta(),
        })
    }
}

/// A fleet search query: parsed and evaluated against one thing.
pub fn search_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(query) = Query::parse(text) {
        let thing = Thing::new();
        let _ = query.matches(&thing);
    }
}

/// The change stream's `fields` pointers (before the first newline) and
/// `q` query (after it): a filter is made from them as from the URL, then
/// matched against and rendering one change, which must give a JSON object
/// with its `seq`.
pub fn change_fields(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (fields, q) = match text.split_once('\n') {
        Some((fields, q)) => (fields, Some(q.to_owned())),
        None => (text, None),
    };
    let params = StreamParams {
        fields: Some(fields.to_owned()),
        q,
        ..StreamParams::default()
    };
    let Ok(filter) = ChangeFilter::from_params(&params) else {
        return;
    };
    let thing = Thing::new();
    let document = json!({
        "state": thing.state.state_value(),
        "metadata": thing.state.metadata_value(),
        "version": 7
    });
    let change = Change {
        seq: 42,
        thing: "sensor-7".into(),
        name: Some("a/b~c".into()),
        version: 7,
        kind: ChangeKind::Update,
        time: 1_700_000_000,
        document: document.to_string(),
        state: Some(Arc::clone(&thing.state)),
    };
    let _ = filter.matches(&change);
    let rendered: Value = serde_json::from_str(&filter.render(&change)).expect("JSON");
    assert_eq!(rendered["seq"], 42, "every event names its seq");
}
