//! Property tests of the shadow rules.

use proptest::prelude::*;
use serde_json::{Map, Value};
use umbra_shadow::document::{SectionPatch, ShadowState};
use umbra_shadow::engine::{self, Command, StoredShadow};
use umbra_shadow::request::UpdateRequest;
use umbra_shadow::{Limits, ShadowKey};

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::from),
        (-5i64..5).prop_map(Value::from),
        (-5i64..5).prop_map(|n| Value::from(n as f64)),
        "[ab]{0,2}".prop_map(Value::from),
        prop::collection::vec(0i64..3, 0..3).prop_map(Value::from),
    ]
}

/// Small objects over a small key space so that desired and reported overlap.
fn object(nulls: bool) -> impl Strategy<Value = Map<String, Value>> {
    let value = leaf().prop_recursive(3, 24, 4, move |inner| {
        prop::collection::btree_map("[abcd]", inner, 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    });
    let value = if nulls {
        prop_oneof![1 => Just(Value::Null), 4 => value].boxed()
    } else {
        value.boxed()
    };
    prop::collection::btree_map("[abcde]", value, 0..5).prop_map(|m| m.into_iter().collect())
}

fn patch() -> impl Strategy<Value = Option<SectionPatch>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(SectionPatch::Clear)),
        4 => object(true).prop_map(|o| Some(SectionPatch::Merge(o))),
    ]
}

fn update() -> impl Strategy<Value = UpdateRequest> {
    (patch(), patch())
        .prop_filter("an update names desired or reported", |(d, r)| {
            d.is_some() || r.is_some()
        })
        .prop_map(|(desired, reported)| UpdateRequest {
            desired,
            reported,
            version: None,
            client_token: None,
        })
}

/// Every path in the delta exists in desired with the same value, so no key
/// can come from reported alone.
fn delta_within_desired(delta: &Map<String, Value>, desired: &Map<String, Value>) -> bool {
    delta.iter().all(|(k, v)| match (v, desired.get(k)) {
        (Value::Object(d), Some(Value::Object(want))) => delta_within_desired(d, want) || d == want,
        (v, Some(want)) => v == want,
        (_, None) => false,
    })
}

proptest! {
    #[test]
    fn delta_never_holds_a_key_only_in_reported(updates in prop::collection::vec(update(), 1..8)) {
        let limits = Limits { max_state_bytes: usize::MAX, ..Limits::default() };
        let key = ShadowKey::classic("p");
        let mut stored: Option<StoredShadow> = None;
        for u in updates {
            let applied = engine::apply(&key, stored.as_ref(), &Command::Update(u), 1, &limits);
            let applied = applied.map_err(|e| TestCaseError::fail(e.to_string()))?;
            stored = applied.store;
            let state = &stored.as_ref().map(|s| ShadowState::clone(&s.state)).unwrap_or_default();
            if let Some(delta) = state.delta() {
                let desired = state.desired.as_ref().map(|d| d.state.clone()).unwrap_or_default();
                prop_assert!(delta_within_desired(&delta, &desired), "delta {delta:?} not within desired {desired:?}");
            }
        }
    }

    #[test]
    fn has_delta_says_whether_the_delta_is_empty(updates in prop::collection::vec(update(), 1..8)) {
        let limits = Limits { max_state_bytes: usize::MAX, ..Limits::default() };
        let key = ShadowKey::classic("p");
        let mut stored: Option<StoredShadow> = None;
        for u in updates {
            let applied = engine::apply(&key, stored.as_ref(), &Command::Update(u), 1, &limits);
            stored = applied.map_err(|e| TestCaseError::fail(e.to_string()))?.store;
            let state = stored.as_ref().map(|s| ShadowState::clone(&s.state)).unwrap_or_default();
            prop_assert_eq!(state.has_delta(), state.delta().is_some(), "{:?}", state);
        }
    }

    #[test]
    fn reporting_exactly_desired_empties_the_delta(desired in object(false), reported in object(false)) {
        let limits = Limits { max_state_bytes: usize::MAX, ..Limits::default() };
        let key = ShadowKey::classic("p");
        let first = UpdateRequest {
            desired: Some(SectionPatch::Merge(desired)),
            reported: Some(SectionPatch::Merge(reported)),
            version: None,
            client_token: None,
        };
        let applied = engine::apply(&key, None, &Command::Update(first), 1, &limits)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let stored = applied.store;
        let desired_now = stored.as_ref().and_then(|s| s.state.desired.clone());
        let Some(desired_now) = desired_now else { return Ok(()); };
        let report = UpdateRequest {
            desired: None,
            reported: Some(SectionPatch::Merge(desired_now.state.clone())),
            version: None,
            client_token: None,
        };
        let applied = engine::apply(&key, stored.as_ref(), &Command::Update(report), 2, &limits)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let state: ShadowState = applied.store.map(|s| ShadowState::clone(&s.state)).unwrap_or_default();
        prop_assert_eq!(state.delta(), None);
    }

    #[test]
    fn versions_rise_by_exactly_one_per_accepted_update(updates in prop::collection::vec(update(), 1..12)) {
        let limits = Limits { max_state_bytes: usize::MAX, ..Limits::default() };
        let key = ShadowKey::classic("p");
        let mut stored: Option<StoredShadow> = None;
        for (i, u) in updates.into_iter().enumerate() {
            let before = stored.as_ref().map_or(0, |s| s.version);
            prop_assert_eq!(before, i as u64);
            let applied = engine::apply(&key, stored.as_ref(), &Command::Update(u), 1, &limits)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(applied.outcome.version(), before + 1);
            stored = applied.store;
        }
    }
}
