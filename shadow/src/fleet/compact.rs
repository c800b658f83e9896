//! One shadow's state as the fleet index keeps it: a *shape* (which sections
//! exist and every field path, parents before children) shared by all
//! shadows that have the same fields, and the shadow's own values packed in
//! one byte string in shape order.
//!
//! A fleet's shadows mostly share a handful of shapes, so a shadow costs its
//! values and little else: a 6-field shadow's values pack into about 30
//! bytes, against ~2 KB as a tree of JSON maps.
//!
//! Values are packed as a tag byte and a payload: integers as varints,
//! floats as 8 bytes, strings as a length and their bytes, an object as the
//! tag alone (its fields are entries of their own), an array as its JSON text.

use serde_json::{Map, Number, Value};

use crate::document::Object;
use crate::search::Scalar;

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const UINT: u8 = 3;
const NEGINT: u8 = 4;
const FLOAT: u8 = 5;
const TEXT: u8 = 6;
const OBJECT: u8 = 7;
const ARRAY: u8 = 8;

/// Section bits of a shape.
pub const DESIRED: u8 = 1;
pub const REPORTED: u8 = 2;

/// A shadow's packed state, before its shape is interned.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Packed {
    /// The shape: a byte of the sections present, then each path as its
    /// section, its depth, and each segment's length (a varint) and bytes.
    pub shape: Vec<u8>,
    pub values: Vec<u8>,
}

impl Packed {
    /// Packs `desired` and `reported` (each absent or an object).
    pub fn pack(desired: Option<&Object>, reported: Option<&Object>) -> Packed {
        // Room for a typical shadow: growing the buffers costs more than packing.
        let mut packed = Packed {
            shape: Vec::with_capacity(128),
            values: Vec::with_capacity(64),
        };
        let sections = desired.map_or(0, |_| DESIRED) | reported.map_or(0, |_| REPORTED);
        packed.shape.push(sections);
        let mut path = Vec::new();
        for (bit, object) in [(DESIRED, desired), (REPORTED, reported)] {
            if let Some(object) = object {
                packed.object(bit, object, &mut path);
            }
        }
        packed
    }

    fn object<'a>(&mut self, section: u8, object: &'a Object, path: &mut Vec<&'a str>) {
        for (key, value) in object {
            path.push(key);
            self.path(section, path);
            self.value(value);
            if let Value::Object(child) = value {
                self.object(section, child, path);
            }
            path.pop();
        }
    }

    fn value(&mut self, value: &Value) {
        match value {
            Value::Null => self.values.push(NULL),
            Value::Bool(b) => self.values.push(if *b { TRUE } else { FALSE }),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    self.uint(u);
                } else if let Some(i) = n.as_i64() {
                    self.negint(i);
                } else {
                    self.float(n.as_f64().unwrap_or(0.0));
                }
            }
            Value::String(s) => self.text(TEXT, s),
            Value::Object(_) => self.values.push(OBJECT),
            Value::Array(_) => self.text(ARRAY, &value.to_string()),
        }
    }

    fn uint(&mut self, u: u64) {
        self.values.push(UINT);
        put_varint(&mut self.values, u);
    }

    fn negint(&mut self, i: i64) {
        self.values.push(NEGINT);
        // Negative: stored as its magnitude less one.
        put_varint(&mut self.values, !(i as u64));
    }

    fn float(&mut self, f: f64) {
        self.values.push(FLOAT);
        self.values.extend_from_slice(&f.to_le_bytes());
    }

    fn text(&mut self, tag: u8, s: &str) {
        self.values.push(tag);
        put_varint(&mut self.values, s.len() as u64);
        self.values.extend_from_slice(s.as_bytes());
    }

    /// Appends the shape entry of `path` in `section`.
    fn path<S: AsRef<str>>(&mut self, section: u8, path: &[S]) {
        self.shape.push(section);
        // Depth fits a byte: request limits cap nesting far lower.
        self.shape.push(path.len().min(255) as u8);
        for segment in path {
            let segment = segment.as_ref();
            put_varint(&mut self.shape, segment.len() as u64);
            self.shape.extend_from_slice(segment.as_bytes());
        }
    }
}

/// Packs a stored state, `{"desired":{..},"reported":{..}}` as Umbra writes
/// it (keys in order, each once), straight from its text: no tree of values
/// is built, which is most of the cost of loading a large fleet. Also says
/// whether the shadow has a delta. `None` for any other text (keys out of
/// order, other shapes): parse it into values and [`Packed::pack`] instead.
pub fn pack_state_text(text: &str) -> Option<(Packed, bool)> {
    let mut packer = TextPacker {
        packed: Packed {
            shape: Vec::with_capacity(128),
            values: Vec::with_capacity(64),
        },
        path: Vec::new(),
        entries: Vec::new(),
        sections: 0,
    };
    packer.packed.shape.push(0);
    let mut de = serde_json::Deserializer::from_str(text);
    serde::de::DeserializeSeed::deserialize(Top(&mut packer), &mut de).ok()?;
    de.end().ok()?;
    packer.packed.shape[0] = packer.sections;
    let has_delta = packer.has_delta();
    Some((packer.packed, has_delta))
}

/// What [`pack_state_text`] keeps while it reads.
struct TextPacker {
    packed: Packed,
    /// The current path, a reused buffer per depth.
    path: Vec<String>,
    /// Per field, in no particular order: section, and where its path
    /// (without the section byte) and its value are in the packed bytes.
    entries: Vec<(u8, std::ops::Range<usize>, std::ops::Range<usize>)>,
    sections: u8,
}

impl TextPacker {
    /// Whether some desired field is not reported as the same value (as
    /// `document::differs` decides over values: objects by their fields,
    /// numbers by value).
    fn has_delta(&self) -> bool {
        let shape = &self.packed.shape;
        let values = &self.packed.values;
        let mut reported: Vec<_> = self
            .entries
            .iter()
            .filter(|(section, _, _)| *section == REPORTED)
            .map(|(_, path, value)| (&shape[path.clone()], &values[value.clone()]))
            .collect();
        reported.sort_unstable_by(|a, b| a.0.cmp(b.0));
        self.entries
            .iter()
            .filter(|(section, _, _)| *section == DESIRED)
            .any(|(_, path, value)| {
                let path = &shape[path.clone()];
                let Ok(at) = reported.binary_search_by(|(p, _)| (*p).cmp(path)) else {
                    return true;
                };
                let want = fields(&values[value.clone()]).next();
                let have = fields(reported[at].1).next();
                !match (want, have) {
                    (Some(want), Some(have)) => same_field(want, have),
                    _ => false,
                }
            })
    }
}

/// Two packed values compared as `json::same_value` compares values.
fn same_field(a: Field<'_>, b: Field<'_>) -> bool {
    match (a, b) {
        (Field::UInt(x), Field::UInt(y)) => x == y,
        (Field::NegInt(x), Field::NegInt(y)) => x == y,
        (Field::Array(x), Field::Array(y)) => {
            x == y
                || match (serde_json::from_str(x), serde_json::from_str(y)) {
                    (Ok(x), Ok(y)) => crate::json::same_value(&x, &y),
                    _ => false,
                }
        }
        (Field::Array(_), _) | (_, Field::Array(_)) => false,
        (Field::Scalar(Scalar::Object), Field::Scalar(Scalar::Object)) => true,
        _ => match (a.scalar(), b.scalar()) {
            (Some(Scalar::Number(x)), Some(Scalar::Number(y))) => x == y,
            (x, y) => x == y,
        },
    }
}

/// The whole state: `desired` then `reported`, each an object.
struct Top<'p>(&'p mut TextPacker);

impl<'de> serde::de::DeserializeSeed<'de> for Top<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Top<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a shadow state")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut key = String::new();
        while map.next_key_seed(Key(&mut key))?.is_some() {
            let section = match key.as_str() {
                "desired" if self.0.sections == 0 => DESIRED,
                "reported" if self.0.sections & REPORTED == 0 => REPORTED,
                _ => return Err(serde::de::Error::custom("not a stored state")),
            };
            self.0.sections |= section;
            map.next_value_seed(ObjectSeed {
                packer: &mut *self.0,
                section,
                depth: 0,
            })?;
        }
        Ok(())
    }
}

/// A key, read into a reused buffer.
struct Key<'b>(&'b mut String);

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<(), E> {
        self.0.clear();
        self.0.push_str(key);
        Ok(())
    }
}

/// An object's fields at `depth` of `section`.
struct ObjectSeed<'p> {
    packer: &'p mut TextPacker,
    section: u8,
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ObjectSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let packer = self.packer;
        let depth = self.depth;
        if packer.path.len() <= depth {
            packer.path.resize_with(depth + 1, String::new);
        }
        let mut key = String::new();
        let mut first = true;
        while map.next_key_seed(Key(&mut key))?.is_some() {
            // In order and once each, as a map of values would hold them.
            if !first && key.as_str() <= packer.path[depth].as_str() {
                return Err(serde::de::Error::custom("keys out of order"));
            }
            first = false;
            std::mem::swap(&mut packer.path[depth], &mut key);
            let path_start = packer.packed.shape.len() + 1;
            packer.packed.path(self.section, &packer.path[..=depth]);
            let path = path_start..packer.packed.shape.len();
            let value_start = packer.packed.values.len();
            map.next_value_seed(Leaf {
                packer: &mut *packer,
                section: self.section,
                depth,
            })?;
            // An object's own entry is its tag, before its fields' entries.
            let value_end =
                packer.packed.values[value_start..]
                    .first()
                    .map_or(value_start, |&tag| match tag {
                        OBJECT => value_start + 1,
                        _ => packer.packed.values.len(),
                    });
            packer
                .entries
                .push((self.section, path, value_start..value_end));
        }
        Ok(())
    }
}

/// One field's value.
struct Leaf<'p> {
    packer: &'p mut TextPacker,
    section: u8,
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Leaf<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Leaf<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a value")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.packer.packed.values.push(NULL);
        Ok(())
    }
    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<(), E> {
        self.packer.packed.values.push(if b { TRUE } else { FALSE });
        Ok(())
    }
    fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<(), E> {
        self.packer.packed.uint(u);
        Ok(())
    }
    fn visit_i64<E: serde::de::Error>(self, i: i64) -> Result<(), E> {
        match u64::try_from(i) {
            Ok(u) => self.packer.packed.uint(u),
            Err(_) => self.packer.packed.negint(i),
        }
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<(), E> {
        self.packer.packed.float(f);
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        self.packer.packed.text(TEXT, s);
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        self.packer
            .packed
            .text(ARRAY, &Value::Array(items).to_string());
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.packer.packed.values.push(OBJECT);
        serde::de::Visitor::visit_map(
            ObjectSeed {
                packer: self.packer,
                section: self.section,
                depth: self.depth + 1,
            },
            map,
        )
    }
}

/// One field path of a shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapePath<'a> {
    pub section: u8,
    pub segments: Vec<&'a str>,
}

/// The sections a shape holds (`DESIRED | REPORTED` bits).
pub fn sections(shape: &[u8]) -> u8 {
    shape.first().copied().unwrap_or(0)
}

/// The field paths of a shape, in order.
pub fn paths(shape: &[u8]) -> Vec<ShapePath<'_>> {
    let mut out = Vec::new();
    let mut at = 1;
    while at + 2 <= shape.len() {
        let section = shape[at];
        let depth = shape[at + 1] as usize;
        at += 2;
        let mut segments = Vec::with_capacity(depth);
        for _ in 0..depth {
            let Some((len, next)) = get_varint(shape, at) else {
                return out;
            };
            let end = next + len as usize;
            let Some(segment) = shape
                .get(next..end)
                .and_then(|b| std::str::from_utf8(b).ok())
            else {
                return out;
            };
            segments.push(segment);
            at = end;
        }
        out.push(ShapePath { section, segments });
    }
    out
}

/// One packed value, borrowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Field<'a> {
    Scalar(Scalar<'a>),
    /// An array, as its JSON text.
    Array(&'a str),
    /// An integer that keeps its exact value when rendered.
    UInt(u64),
    NegInt(i64),
}

impl<'a> Field<'a> {
    /// The value as a search test sees it; arrays are matched separately.
    pub fn scalar(self) -> Option<Scalar<'a>> {
        match self {
            Field::Scalar(s) => Some(s),
            Field::UInt(u) => Some(Scalar::Number(u as f64)),
            Field::NegInt(i) => Some(Scalar::Number(i as f64)),
            Field::Array(_) => None,
        }
    }

    fn to_value(self) -> Value {
        match self {
            Field::Scalar(Scalar::Null) => Value::Null,
            Field::Scalar(Scalar::Bool(b)) => Value::Bool(b),
            Field::Scalar(Scalar::Number(f)) => {
                Number::from_f64(f).map_or(Value::Null, Value::Number)
            }
            Field::Scalar(Scalar::Text(s)) => Value::String(s.to_string()),
            Field::Scalar(Scalar::Object) => Value::Object(Map::new()),
            Field::UInt(u) => Value::from(u),
            Field::NegInt(i) => Value::from(i),
            Field::Array(text) => serde_json::from_str(text).unwrap_or(Value::Null),
        }
    }
}

/// The `n`th packed value (skipping those before it without reading them).
pub fn field(values: &[u8], n: usize) -> Option<Field<'_>> {
    let mut at = 0;
    for _ in 0..n {
        let tag = *values.get(at)?;
        at += 1;
        match tag {
            UINT | NEGINT => {
                while *values.get(at)? & 0x80 != 0 {
                    at += 1;
                }
                at += 1;
            }
            FLOAT => at += 8,
            TEXT | ARRAY => {
                let (len, next) = get_varint(values, at)?;
                at = next.checked_add(len as usize)?;
            }
            _ => {}
        }
    }
    Fields { values, at }.next()
}

/// The packed values, in shape order.
pub fn fields(values: &[u8]) -> Fields<'_> {
    Fields { values, at: 0 }
}

/// Iterator over packed values.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    values: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Field<'a>;

    fn next(&mut self) -> Option<Field<'a>> {
        let tag = *self.values.get(self.at)?;
        self.at += 1;
        let field = match tag {
            NULL => Field::Scalar(Scalar::Null),
            FALSE => Field::Scalar(Scalar::Bool(false)),
            TRUE => Field::Scalar(Scalar::Bool(true)),
            OBJECT => Field::Scalar(Scalar::Object),
            UINT | NEGINT => {
                let (n, next) = get_varint(self.values, self.at)?;
                self.at = next;
                match tag {
                    UINT => Field::UInt(n),
                    _ => Field::NegInt(!n as i64),
                }
            }
            FLOAT => {
                let bytes = self.values.get(self.at..self.at + 8)?;
                self.at += 8;
                let mut raw = [0u8; 8];
                raw.copy_from_slice(bytes);
                Field::Scalar(Scalar::Number(f64::from_le_bytes(raw)))
            }
            TEXT | ARRAY => {
                let (len, next) = get_varint(self.values, self.at)?;
                let end = next.checked_add(len as usize)?;
                let text = std::str::from_utf8(self.values.get(next..end)?).ok()?;
                self.at = end;
                match tag {
                    TEXT => Field::Scalar(Scalar::Text(text)),
                    _ => Field::Array(text),
                }
            }
            _ => return None,
        };
        Some(field)
    }
}

/// The `desired` and `reported` objects back from a shape and its values.
pub fn unpack(shape: &[u8], values: &[u8]) -> (Option<Object>, Option<Object>) {
    let present = sections(shape);
    let mut desired = (present & DESIRED != 0).then(Object::new);
    let mut reported = (present & REPORTED != 0).then(Object::new);
    for (path, field) in paths(shape).into_iter().zip(fields(values)) {
        let root = match path.section {
            DESIRED => desired.as_mut(),
            _ => reported.as_mut(),
        };
        let (Some(root), Some((last, parents))) = (root, path.segments.split_last()) else {
            continue;
        };
        // Parents come before their children, so each parent is there.
        let parent = parents.iter().try_fold(root, |object, key| {
            object.get_mut(*key).and_then(Value::as_object_mut)
        });
        if let Some(parent) = parent {
            parent.insert(last.to_string(), field.to_value());
        }
    }
    (desired, reported)
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn get_varint(bytes: &[u8], mut at: usize) -> Option<(u64, usize)> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(at)?;
        at += 1;
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((n, at));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn roundtrip(desired: Value, reported: Value) {
        let d = desired.as_object();
        let r = reported.as_object();
        let packed = Packed::pack(d, r);
        let (d2, r2) = unpack(&packed.shape, &packed.values);
        assert_eq!(d2.as_ref(), d);
        assert_eq!(r2.as_ref(), r);
    }

    #[test]
    fn every_kind_of_value_comes_back_as_it_was() {
        roundtrip(
            json!({"mode": "eco", "setpoint": 21, "empty": {}, "nested": {"a": {"b": -3}}}),
            json!({"temp": 21.5, "big": u64::MAX, "min": i64::MIN, "ok": true, "no": false,
                   "none": null, "list": [1, "two", {"three": 3}], "ünï": "cödé"}),
        );
        roundtrip(Value::Null, json!({}));
        roundtrip(json!({}), Value::Null);
        roundtrip(Value::Null, Value::Null);
    }

    #[test]
    fn a_small_shadow_packs_small_and_shares_its_shape() {
        let a = Packed::pack(
            json!({"mode": "eco", "setpoint": 21}).as_object(),
            json!({"mode": "off", "setpoint": 20, "temp": 19.5, "battery": 80}).as_object(),
        );
        let b = Packed::pack(
            json!({"mode": "comfort", "setpoint": 18}).as_object(),
            json!({"mode": "eco", "setpoint": 19, "temp": 7.25, "battery": 3}).as_object(),
        );
        assert_eq!(a.shape, b.shape);
        assert!(a.values.len() <= 30, "{} bytes", a.values.len());
        let paths = paths(&a.shape);
        assert_eq!(paths.len(), 6);
        assert_eq!(paths[0].section, DESIRED);
        assert_eq!(paths[0].segments, vec!["mode"]);
        assert_eq!(paths[5].segments, vec!["temp"]);
    }

    #[test]
    fn parents_come_before_children() {
        let packed = Packed::pack(None, json!({"fw": {"version": "1.3.0"}}).as_object());
        let paths = paths(&packed.shape);
        assert_eq!(paths[0].segments, vec!["fw"]);
        assert_eq!(paths[1].segments, vec!["fw", "version"]);
        let values: Vec<_> = fields(&packed.values).collect();
        assert_eq!(
            values,
            vec![
                Field::Scalar(Scalar::Object),
                Field::Scalar(Scalar::Text("1.3.0"))
            ]
        );
    }

    #[test]
    fn any_field_is_reached_by_skipping_those_before() {
        let packed = Packed::pack(
            None,
            json!({"a": -300, "b": 1.5, "c": "x", "d": [1], "e": 7, "f": null}).as_object(),
        );
        let all: Vec<_> = fields(&packed.values).collect();
        assert_eq!(all.len(), 6);
        for (n, expected) in all.iter().enumerate() {
            assert_eq!(field(&packed.values, n).as_ref(), Some(expected));
        }
        assert_eq!(field(&packed.values, 6), None);
    }

    /// `pack_state_text` agrees with parsing into values, packing and
    /// `document::differs`, on generated states as Umbra stores them.
    #[test]
    fn packing_from_text_agrees_with_packing_values() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        fn value(rng: &mut rand::rngs::SmallRng, depth: usize) -> Value {
            match rng.gen_range(0..if depth > 2 { 7 } else { 9 }) {
                0 => Value::Null,
                1 => Value::Bool(rng.gen()),
                2 => json!(rng.gen_range(0..4u64)),
                3 => json!(-rng.gen_range(1..4i64)),
                4 => json!(rng.gen_range(0..4) as f64 / 2.0),
                5 => json!(["a", "b", "c"][rng.gen_range(0..3)]),
                6 => json!([rng.gen_range(0..2), 1]),
                _ => Value::Object(
                    (0..rng.gen_range(0..4))
                        .map(|_| {
                            (
                                ["a", "b", "c", "d"][rng.gen_range(0..4)].to_string(),
                                value(rng, depth + 1),
                            )
                        })
                        .collect(),
                ),
            }
        }
        let mut deltas = 0;
        for _ in 0..5000 {
            let mut state = Map::new();
            for section in ["desired", "reported"] {
                if rng.gen_bool(0.8) {
                    let object: Map<String, Value> = (0..rng.gen_range(0..4))
                        .map(|_| {
                            let key = ["a", "b", "c", "d"][rng.gen_range(0..4)];
                            (key.to_string(), value(&mut rng, 1))
                        })
                        .collect();
                    state.insert(section.into(), Value::Object(object));
                }
            }
            let state = Value::Object(state);
            let text = state.to_string();
            let desired = state.get("desired").and_then(Value::as_object);
            let reported = state.get("reported").and_then(Value::as_object);
            let expected = Packed::pack(desired, reported);
            let delta = desired.is_some_and(|d| crate::document::differs(d, reported));
            assert_eq!(pack_state_text(&text), Some((expected, delta)), "{text}");
            deltas += usize::from(delta);
        }
        // Both outcomes were tried, many times.
        assert!(
            (500..4500).contains(&deltas),
            "{deltas} of 5000 with a delta"
        );
        // Not as Umbra writes it: left to the values path.
        assert_eq!(pack_state_text(r#"{"reported":{"b":1,"a":2}}"#), None);
        assert_eq!(pack_state_text(r#"{"reported":{"a":1,"a":2}}"#), None);
        assert_eq!(pack_state_text(r#"{"other":{}}"#), None);
        assert_eq!(pack_state_text(r#"{"desired":1}"#), None);
    }
}
