//! One shadow's state as the fleet index keeps it: a *shape* (which sections
//! exist and every field path, parents before children) shared by all
//! shadows that have the same fields, and the shadow's own values packed in
//! one byte string in shape order.
//!
//! A fleet's shadows mostly share a handful of shapes, so a shadow costs its
//! values and little else: a 6-field shadow packs into ~60 bytes, against
//! ~2 KB as a tree of JSON maps.
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
    /// The shape: a section byte, then each path as
    /// `[section][segments]` + `[len][bytes]` per segment.
    pub shape: Vec<u8>,
    pub values: Vec<u8>,
}

impl Packed {
    /// Packs `desired` and `reported` (each absent or an object).
    pub fn pack(desired: Option<&Object>, reported: Option<&Object>) -> Packed {
        let mut packed = Packed::default();
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
            self.shape.push(section);
            // Depth fits a byte: request limits cap nesting far lower.
            self.shape.push(path.len().min(255) as u8);
            for segment in path.iter() {
                put_varint(&mut self.shape, segment.len() as u64);
                self.shape.extend_from_slice(segment.as_bytes());
            }
            self.value(value);
            if let Value::Object(child) = value {
                self.object(section, child, path);
            }
            path.pop();
        }
    }

    fn value(&mut self, value: &Value) {
        let out = &mut self.values;
        match value {
            Value::Null => out.push(NULL),
            Value::Bool(false) => out.push(FALSE),
            Value::Bool(true) => out.push(TRUE),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    out.push(UINT);
                    put_varint(out, u);
                } else if let Some(i) = n.as_i64() {
                    out.push(NEGINT);
                    // Negative: store its magnitude less one.
                    put_varint(out, !(i as u64));
                } else {
                    out.push(FLOAT);
                    out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes());
                }
            }
            Value::String(s) => {
                out.push(TEXT);
                put_varint(out, s.len() as u64);
                out.extend_from_slice(s.as_bytes());
            }
            Value::Object(_) => out.push(OBJECT),
            Value::Array(_) => {
                let text = value.to_string();
                out.push(ARRAY);
                put_varint(out, text.len() as u64);
                out.extend_from_slice(text.as_bytes());
            }
        }
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
}
