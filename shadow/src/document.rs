//! The shadow document: desired and reported state with per-leaf metadata, the
//! update merge, and the delta between desired and reported.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::{json, Map, Value};

use crate::json::same_value;

/// A JSON object, the shape of every state section.
pub type Object = Map<String, Value>;

/// Epoch seconds, the unit of every shadow timestamp.
pub type Timestamp = i64;

/// One section of a shadow (`desired` or `reported`) with its metadata tree,
/// which mirrors the state: a timestamp at every leaf, and an array's
/// metadata is an array of per-element metadata.
///
/// In memory a leaf's metadata is the bare number `T`; it is written out as
/// `{"timestamp": T}` ([`ShadowState::metadata_value`],
/// [`ShadowState::metadata_json`]). A one-key object per leaf would cost a
/// whole B-tree node (~640 bytes) per leaf in every shadow Umbra holds.
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
            SectionPatch::Clear => written_out_leaf(now),
            SectionPatch::Merge(object) => Value::Object(mirror(object, &written_out_leaf(now))),
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

    /// Whether [`ShadowState::delta`] is non-empty, without building it.
    pub fn has_delta(&self) -> bool {
        self.desired
            .as_ref()
            .is_some_and(|d| differs(&d.state, self.reported.as_ref().map(|r| &r.state)))
    }

    /// The delta's metadata, taken from desired's metadata (written out).
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

    /// The metadata tree matching [`ShadowState::state_value`], written out
    /// (`{"timestamp": T}` at each leaf).
    pub fn metadata_value(&self) -> Value {
        let mut out = Object::new();
        if let Some(d) = &self.desired {
            out.insert("desired".into(), written_out(&d.metadata));
        }
        if let Some(r) = &self.reported {
            out.insert("reported".into(), written_out(&r.metadata));
        }
        Value::Object(out)
    }

    /// [`ShadowState::state_value`] as JSON text, without copying the state.
    pub fn state_json(&self) -> String {
        self.sections_json(|s| &s.state)
    }

    /// [`ShadowState::metadata_value`] as JSON text, without copying the metadata.
    pub fn metadata_json(&self) -> String {
        self.sections_json(|s| WrittenOut(&s.metadata))
    }

    fn sections_json<'a, T: Serialize>(&'a self, part: impl Fn(&'a Section) -> T) -> String {
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
            let metadata = match metadata.get(name).map(read_back) {
                Some(Value::Object(metadata)) => metadata,
                _ => Object::new(),
            };
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
                metadata.insert(key.clone(), stamp(leaf, now));
            }
        }
    }
}

/// A value's metadata as kept in memory: objects mirror their keys, arrays
/// hold one entry per element, everything else is the bare timestamp.
fn stamp(value: &Value, now: Timestamp) -> Value {
    mirror_value(value, &Value::from(now))
}

/// The metadata tree of `object` with `leaf` at every leaf.
fn mirror(object: &Object, leaf: &Value) -> Object {
    object
        .iter()
        .map(|(k, v)| (k.clone(), mirror_value(v, leaf)))
        .collect()
}

fn mirror_value(value: &Value, leaf: &Value) -> Value {
    match value {
        Value::Object(object) => Value::Object(mirror(object, leaf)),
        Value::Array(items) => Value::Array(items.iter().map(|v| mirror_value(v, leaf)).collect()),
        _ => leaf.clone(),
    }
}

/// One leaf's metadata as written out.
fn written_out_leaf(time: impl Serialize) -> Value {
    json!({ "timestamp": time })
}

/// In-memory metadata written out: each bare timestamp becomes `{"timestamp": T}`.
fn written_out(metadata: &Object) -> Value {
    Value::Object(
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), written_out_value(v)))
            .collect(),
    )
}

fn written_out_value(meta: &Value) -> Value {
    match meta {
        Value::Object(object) => written_out(object),
        Value::Array(items) => Value::Array(items.iter().map(written_out_value).collect()),
        leaf => written_out_leaf(leaf),
    }
}

/// Metadata as written out, read back into its in-memory form: an object
/// whose only key is `timestamp` with a number is a leaf. (A state key named
/// `timestamp` has metadata `{"timestamp": {"timestamp": T}}`: an object, not
/// a number, at the key.)
fn read_back(meta: &Value) -> Value {
    match meta {
        Value::Object(object) => match object.get("timestamp") {
            Some(time @ Value::Number(_)) if object.len() == 1 => time.clone(),
            _ => Value::Object(
                object
                    .iter()
                    .map(|(k, v)| (k.clone(), read_back(v)))
                    .collect(),
            ),
        },
        Value::Array(items) => Value::Array(items.iter().map(read_back).collect()),
        other => other.clone(),
    }
}

/// Serializes in-memory metadata as written out, without building a copy.
struct WrittenOut<'a>(&'a Object);

struct WrittenOutValue<'a>(&'a Value);

impl Serialize for WrittenOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, meta) in self.0 {
            map.serialize_entry(key, &WrittenOutValue(meta))?;
        }
        map.end()
    }
}

impl Serialize for WrittenOutValue<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(object) => WrittenOut(object).serialize(serializer),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&WrittenOutValue(item))?;
                }
                seq.end()
            }
            leaf => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("timestamp", leaf)?;
                map.end()
            }
        }
    }
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

/// Whether [`delta`] of the same arguments is non-empty.
pub(crate) fn differs(desired: &Object, reported: Option<&Object>) -> bool {
    desired.iter().any(
        |(key, want)| match (want, reported.and_then(|r| r.get(key))) {
            (Value::Object(want_child), Some(Value::Object(have_child))) => {
                differs(want_child, Some(have_child))
            }
            (_, Some(have)) => !same_value(want, have),
            (_, None) => true,
        },
    )
}

/// The part of `metadata` that covers the keys of `shape`, written out.
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
                out.insert(key.clone(), written_out_value(meta));
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
        let written = json!({"a": {"timestamp": 10}, "b": {"c": {"timestamp": 10}},
                             "l": [{"timestamp": 10}, {"k": {"timestamp": 10}}]});
        assert_eq!(s.metadata_value(), json!({ "desired": written }));
        // In memory, each leaf is the bare timestamp.
        let meta = s.desired.as_ref().map(|d| d.metadata.clone());
        assert_eq!(
            meta.map(Value::Object),
            Some(json!({"a": 10, "b": {"c": 10}, "l": [10, {"k": 10}]}))
        );
    }

    #[test]
    fn metadata_follows_merge_and_delete() {
        let mut s = with_desired(json!({"a": 1, "b": {"c": 1, "d": 2}}));
        let patch = SectionPatch::Merge(obj(json!({"a": null, "b": {"c": 5}})));
        ShadowState::apply(&mut s.desired, &patch, 20);
        assert_eq!(
            s.metadata_value(),
            json!({"desired": {"b": {"c": {"timestamp": 20}, "d": {"timestamp": 10}}}})
        );
        let d = s.desired.unwrap_or_default();
        assert_eq!(Value::Object(d.state), json!({"b": {"c": 5, "d": 2}}));
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

    #[test]
    fn stored_metadata_round_trips_keys_named_timestamp() {
        let mut s =
            with_desired(json!({"timestamp": 5, "t": {"timestamp": {"x": [1, {"timestamp": 2}]}}}));
        ShadowState::apply(
            &mut s.reported,
            &SectionPatch::Merge(obj(json!({"timestamp": [3]}))),
            2,
        );
        let stored: Value = serde_json::from_str(&s.metadata_json()).expect("json");
        assert_eq!(
            stored,
            s.metadata_value(),
            "the stored text is the written-out form"
        );
        assert_eq!(stored["desired"]["timestamp"], json!({"timestamp": 10}));
        assert_eq!(
            stored["desired"]["t"],
            json!({"timestamp": {"x": [{"timestamp": 10}, {"timestamp": {"timestamp": 10}}]}})
        );
        let state: Value = serde_json::from_str(&s.state_json()).expect("json");
        assert_eq!(ShadowState::from_values(&state, &stored), s);
    }
}
