//! The shadow document: desired and reported state with per-leaf metadata, the
//! update merge, and the delta between desired and reported.

use serde_json::{json, Map, Value};

use crate::json::same_value;

/// A JSON object, the shape of every state section.
pub type Object = Map<String, Value>;

/// Epoch seconds, the unit of every shadow timestamp.
pub type Timestamp = i64;

/// One section of a shadow (`desired` or `reported`) with its metadata tree,
/// which mirrors the state: `{"timestamp": T}` at every leaf, and an array's
/// metadata is an array of per-element metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Section {
    pub state: Object,
    pub metadata: Object,
}

/// The state of one shadow: each section is absent until something is stored in it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowState {
    pub desired: Option<Section>,
    pub reported: Option<Section>,
}

/// What an update asks for one section: clear it, or merge an object into it.
#[derive(Debug, Clone, PartialEq)]
pub enum SectionPatch {
    Clear,
    Merge(Object),
}

impl SectionPatch {
    /// The patch as it was sent (`null` or the object), for `/update/accepted`.
    pub fn to_value(&self) -> Value {
        match self {
            SectionPatch::Clear => Value::Null,
            SectionPatch::Merge(object) => Value::Object(object.clone()),
        }
    }

    /// Metadata for the patch as sent: every leaf, `null` included, stamped `now`.
    pub fn metadata(&self, now: Timestamp) -> Value {
        match self {
            SectionPatch::Clear => leaf_metadata(&Value::Null, now),
            SectionPatch::Merge(object) => Value::Object(mirror(object, now)),
        }
    }
}

impl ShadowState {
    /// Applies one section patch. A section left empty disappears.
    pub fn apply(section: &mut Option<Section>, patch: &SectionPatch, now: Timestamp) {
        match patch {
            SectionPatch::Clear => *section = None,
            SectionPatch::Merge(changes) => {
                let current = section.get_or_insert_with(Section::default);
                merge(&mut current.state, &mut current.metadata, changes, now);
                if current.state.is_empty() {
                    *section = None;
                }
            }
        }
    }

    /// Every key of desired whose value differs from reported, with full paths.
    /// `None` when there is no difference.
    pub fn delta(&self) -> Option<Object> {
        let desired = self.desired.as_ref()?;
        let reported = self.reported.as_ref().map(|r| &r.state);
        let delta = delta(&desired.state, reported);
        (!delta.is_empty()).then_some(delta)
    }

    /// The delta's metadata, taken from desired's metadata.
    pub fn delta_metadata(&self, delta: &Object) -> Object {
        match &self.desired {
            Some(desired) => project(delta, &desired.metadata),
            None => Object::new(),
        }
    }

    /// Size in bytes of desired and reported serialized, the figure AWS limits.
    pub fn state_size(&self) -> usize {
        [&self.desired, &self.reported]
            .into_iter()
            .flatten()
            .map(|s| serde_json::to_vec(&s.state).map_or(0, |v| v.len()))
            .sum()
    }

    /// `{"desired":..,"reported":..}` with absent sections left out.
    pub fn state_value(&self) -> Value {
        let mut out = Object::new();
        if let Some(d) = &self.desired {
            out.insert("desired".into(), Value::Object(d.state.clone()));
        }
        if let Some(r) = &self.reported {
            out.insert("reported".into(), Value::Object(r.state.clone()));
        }
        Value::Object(out)
    }

    /// The metadata tree matching [`ShadowState::state_value`].
    pub fn metadata_value(&self) -> Value {
        let mut out = Object::new();
        if let Some(d) = &self.desired {
            out.insert("desired".into(), Value::Object(d.metadata.clone()));
        }
        if let Some(r) = &self.reported {
            out.insert("reported".into(), Value::Object(r.metadata.clone()));
        }
        Value::Object(out)
    }

    /// [`ShadowState::state_value`] as JSON text, without copying the state.
    pub fn state_json(&self) -> String {
        self.sections_json(|s| &s.state)
    }

    /// [`ShadowState::metadata_value`] as JSON text, without copying the state.
    pub fn metadata_json(&self) -> String {
        self.sections_json(|s| &s.metadata)
    }

    fn sections_json(&self, part: impl Fn(&Section) -> &Object) -> String {
        let mut sections = std::collections::BTreeMap::new();
        if let Some(d) = &self.desired {
            sections.insert("desired", part(d));
        }
        if let Some(r) = &self.reported {
            sections.insert("reported", part(r));
        }
        serde_json::to_string(&sections).unwrap_or_else(|_| "{}".into())
    }

    /// Rebuilds a state from its stored `state_value` and `metadata_value`.
    pub fn from_values(state: &Value, metadata: &Value) -> ShadowState {
        let section = |name: &str| {
            let state = state.get(name)?.as_object()?.clone();
            let metadata = metadata
                .get(name)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            Some(Section { state, metadata })
        };
        ShadowState {
            desired: section("desired"),
            reported: section("reported"),
        }
    }
}

/// Deep merge of `changes` into `state`, keeping `metadata` in step: objects
/// merge key by key, scalars and arrays replace, `null` deletes.
fn merge(state: &mut Object, metadata: &mut Object, changes: &Object, now: Timestamp) {
    for (key, change) in changes {
        match change {
            Value::Null => {
                state.remove(key);
                metadata.remove(key);
            }
            Value::Object(child_changes) => match state.get_mut(key) {
                Some(Value::Object(child)) => {
                    let child_meta = metadata
                        .entry(key.clone())
                        .or_insert_with(|| Value::Object(Object::new()));
                    if !child_meta.is_object() {
                        *child_meta = Value::Object(Object::new());
                    }
                    if let Value::Object(child_meta) = child_meta {
                        merge(child, child_meta, child_changes, now);
                    }
                }
                _ => {
                    // A new object (or one replacing a scalar) is created from
                    // its non-null children; with none it is not created at all.
                    let mut child = Object::new();
                    let mut child_meta = Object::new();
                    merge(&mut child, &mut child_meta, child_changes, now);
                    if !child.is_empty() || child_changes.is_empty() {
                        state.insert(key.clone(), Value::Object(child));
                        metadata.insert(key.clone(), Value::Object(child_meta));
                    }
                }
            },
            leaf => {
                state.insert(key.clone(), leaf.clone());
                metadata.insert(key.clone(), leaf_metadata(leaf, now));
            }
        }
    }
}

/// Metadata for one value: objects mirror their keys, arrays hold one entry
/// per element, everything else is `{"timestamp": now}`.
fn leaf_metadata(value: &Value, now: Timestamp) -> Value {
    match value {
        Value::Object(object) => Value::Object(mirror(object, now)),
        Value::Array(items) => Value::Array(items.iter().map(|v| leaf_metadata(v, now)).collect()),
        _ => json!({ "timestamp": now }),
    }
}

fn mirror(object: &Object, now: Timestamp) -> Object {
    object
        .iter()
        .map(|(k, v)| (k.clone(), leaf_metadata(v, now)))
        .collect()
}

fn delta(desired: &Object, reported: Option<&Object>) -> Object {
    let mut out = Object::new();
    for (key, want) in desired {
        let have = reported.and_then(|r| r.get(key));
        match (want, have) {
            (Value::Object(want_child), Some(Value::Object(have_child))) => {
                let child = delta(want_child, Some(have_child));
                if !child.is_empty() {
                    out.insert(key.clone(), Value::Object(child));
                }
            }
            (_, Some(have)) if same_value(want, have) => {}
            _ => {
                out.insert(key.clone(), want.clone());
            }
        }
    }
    out
}

/// The part of `metadata` that covers the keys of `shape`.
fn project(shape: &Object, metadata: &Object) -> Object {
    let mut out = Object::new();
    for (key, value) in shape {
        let Some(meta) = metadata.get(key) else {
            continue;
        };
        match (value, meta) {
            (Value::Object(child), Value::Object(child_meta)) => {
                out.insert(key.clone(), Value::Object(project(child, child_meta)));
            }
            _ => {
                out.insert(key.clone(), meta.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Object {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    fn with_desired(v: Value) -> ShadowState {
        let mut s = ShadowState::default();
        ShadowState::apply(&mut s.desired, &SectionPatch::Merge(obj(v)), 10);
        s
    }

    #[test]
    fn metadata_mirrors_the_state_tree() {
        let s = with_desired(json!({"a": 1, "b": {"c": "x"}, "l": [1, {"k": 2}]}));
        let meta = &s
            .desired
            .as_ref()
            .map(|d| d.metadata.clone())
            .unwrap_or_default();
        assert_eq!(
            Value::Object(meta.clone()),
            json!({"a": {"timestamp": 10}, "b": {"c": {"timestamp": 10}},
                   "l": [{"timestamp": 10}, {"k": {"timestamp": 10}}]})
        );
    }

    #[test]
    fn metadata_follows_merge_and_delete() {
        let mut s = with_desired(json!({"a": 1, "b": {"c": 1, "d": 2}}));
        let patch = SectionPatch::Merge(obj(json!({"a": null, "b": {"c": 5}})));
        ShadowState::apply(&mut s.desired, &patch, 20);
        let d = s.desired.unwrap_or_default();
        assert_eq!(Value::Object(d.state), json!({"b": {"c": 5, "d": 2}}));
        assert_eq!(
            Value::Object(d.metadata),
            json!({"b": {"c": {"timestamp": 20}, "d": {"timestamp": 10}}})
        );
    }

    #[test]
    fn delta_metadata_comes_from_desired() {
        let mut s = with_desired(json!({"a": 1, "b": {"c": 1, "d": 2}}));
        let patch = SectionPatch::Merge(obj(json!({"a": 1, "b": {"c": 1}})));
        ShadowState::apply(&mut s.reported, &patch, 30);
        let delta = s.delta().unwrap_or_default();
        assert_eq!(Value::Object(delta.clone()), json!({"b": {"d": 2}}));
        assert_eq!(
            Value::Object(s.delta_metadata(&delta)),
            json!({"b": {"d": {"timestamp": 10}}})
        );
    }

    #[test]
    fn numbers_equal_by_value_make_no_delta() {
        let mut s = with_desired(json!({"t": 20}));
        ShadowState::apply(
            &mut s.reported,
            &SectionPatch::Merge(obj(json!({"t": 20.0}))),
            1,
        );
        assert_eq!(s.delta(), None);
    }

    #[test]
    fn empty_section_disappears() {
        let mut s = with_desired(json!({"a": 1}));
        ShadowState::apply(
            &mut s.desired,
            &SectionPatch::Merge(obj(json!({"a": null}))),
            1,
        );
        assert_eq!(s.desired, None);
    }

    #[test]
    fn values_round_trip() {
        let mut s = with_desired(json!({"a": {"b": [1, 2]}}));
        ShadowState::apply(
            &mut s.reported,
            &SectionPatch::Merge(obj(json!({"x": 1}))),
            2,
        );
        let back = ShadowState::from_values(&s.state_value(), &s.metadata_value());
        assert_eq!(back, s);
    }
}
