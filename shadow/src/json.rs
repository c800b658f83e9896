//! JSON helpers the shadow rules need: value equality by number value, nesting depth.

use serde_json::{Map, Value};

/// Compares two JSON values the way the shadow service does: numbers by value
/// (`20` equals `20.0`), objects key by key, arrays element by element.
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                x == y
            } else if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                x == y
            } else {
                x.as_f64() == y.as_f64()
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (Value::Object(x), Value::Object(y)) => same_object(x, y),
        _ => a == b,
    }
}

/// [`same_value`] for two objects.
pub fn same_object(x: &Map<String, Value>, y: &Map<String, Value>) -> bool {
    x.len() == y.len()
        && x.iter()
            .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
}

/// Levels of object nesting in `value`: an object is one level more than its
/// deepest child; scalars and arrays add none (objects inside arrays count).
pub fn object_depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(object_depth).max().unwrap_or(0),
        Value::Array(items) => items.iter().map(object_depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_compare_by_value() {
        assert!(same_value(&json!(20), &json!(20.0)));
        assert!(same_value(&json!({"a": [1, 2.0]}), &json!({"a": [1.0, 2]})));
        assert!(!same_value(&json!(20), &json!(20.5)));
        assert!(!same_value(&json!(-1), &json!(u64::MAX)));
        assert!(!same_value(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!same_value(&json!("1"), &json!(1)));
    }

    #[test]
    fn depth_counts_objects_only() {
        assert_eq!(object_depth(&json!(1)), 0);
        assert_eq!(object_depth(&json!({})), 1);
        assert_eq!(object_depth(&json!({"a": {"b": 1}})), 2);
        assert_eq!(object_depth(&json!({"a": [{"b": {"c": 1}}]})), 3);
    }
}
