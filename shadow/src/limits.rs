//! The configurable limits of the shadow service, with AWS IoT's defaults.

use serde::Deserialize;

use crate::error::Rejection;

/// Limits on shadow requests. Every field can be set in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Largest desired + reported state stored, in bytes (serialized JSON).
    pub max_state_bytes: usize,
    /// Deepest object nesting in desired or reported; the section itself is level 1.
    pub max_depth: usize,
    /// Longest thing name, in bytes.
    pub max_thing_name: usize,
    /// Longest named-shadow name, in bytes.
    pub max_shadow_name: usize,
    /// Longest clientToken, in bytes.
    pub max_client_token: usize,
    /// Requests per second one thing may make (all its shadows together).
    pub requests_per_second: u32,
    /// Requests of one thing that may be in progress at once.
    pub max_in_flight: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_payload_bytes: 128 * 1024,
            max_state_bytes: 8 * 1024,
            max_depth: 6,
            max_thing_name: 128,
            max_shadow_name: 64,
            max_client_token: 64,
            requests_per_second: 20,
            max_in_flight: 10,
        }
    }
}

impl Limits {
    /// Thing names are `[a-zA-Z0-9:_-]{1,max_thing_name}`.
    pub fn check_thing_name(&self, name: &str) -> Result<(), Rejection> {
        valid_name(name, self.max_thing_name)
            .then_some(())
            .ok_or(Rejection::InvalidThingName)
    }

    /// Shadow names are `[a-zA-Z0-9:_-]{1,max_shadow_name}`.
    pub fn check_shadow_name(&self, name: &str) -> Result<(), Rejection> {
        valid_name(name, self.max_shadow_name)
            .then_some(())
            .ok_or(Rejection::InvalidShadowName)
    }
}

fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        let l = Limits::default();
        assert!(l.check_thing_name("lamp:1_a-B").is_ok());
        assert!(l.check_thing_name("").is_err());
        assert!(l.check_thing_name("a/b").is_err());
        assert!(l.check_thing_name("a b").is_err());
        assert!(l.check_thing_name(&"a".repeat(128)).is_ok());
        assert!(l.check_thing_name(&"a".repeat(129)).is_err());
        assert!(l.check_shadow_name(&"a".repeat(64)).is_ok());
        assert!(l.check_shadow_name(&"a".repeat(65)).is_err());
        assert!(l.check_shadow_name("caf\u{e9}").is_err());
    }
}
