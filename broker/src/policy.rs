//! Who may publish and subscribe where outside `$aws/`: roles of topic
//! rules with placeholders for the client's identity, assigned by identity.
//!
//! `$aws/` keeps its own rules ([`crate::topics`]): a device uses only its
//! own thing's topics, and a role with `all_things` (like
//! `privileged_clients`) every thing's. Outside `$aws/` a publish (retained
//! messages and last wills included) must match one of the role's
//! `publish` filters, and a subscription must lie inside one of its
//! `subscribe` filters, and outside its `deny_publish` and `deny_subscribe`
//! filters (an explicit deny wins, as in AWS IoT policies); a role with
//! `receive` filters is delivered only
//! messages whose topic matches one of them (without, whatever its
//! subscriptions let in). In a rule, `${thing}` stands for the client's
//! identity (its thing name: the password-file user, or the certificate's
//! common name; without one, its client id) and `${client_id}` for its
//! client id; an identity with `/`, `+` or `#` in it matches no rule.
//!
//! Built-in roles (a role of the same name in the config replaces one):
//! - `device`, for clients that proved an identity: its own `things/${thing}/#`;
//! - `open`, for anonymous clients and the shared credential's: every topic
//!   (what a broker without per-device identities can offer);
//! - `service`: every topic and every thing's `$aws` topics.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

/// A role's rules, as configured.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RoleSettings {
    /// Filters a published topic must match.
    pub publish: Vec<String>,
    /// Filters a subscription must lie inside.
    pub subscribe: Vec<String>,
    /// Filters a delivered message's topic must match (`None`: whatever
    /// the subscriptions let in).
    pub receive: Option<Vec<String>>,
    /// Topics refused even where `publish` allows them (matching filters).
    pub deny_publish: Vec<String>,
    /// Subscriptions refused even where `subscribe` allows them: filters
    /// that lie inside one of these.
    pub deny_subscribe: Vec<String>,
    /// Every thing's `$aws` topics, not only the client's own.
    pub all_things: bool,
}

/// `[mqtt.policy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySettings {
    /// The role of a client that proved an identity and has none assigned.
    pub device_role: String,
    /// The role of anonymous clients and of the shared credential's.
    pub anonymous_role: String,
    /// Roles by identity (password-file user or certificate common name).
    pub identities: HashMap<String, String>,
    /// Roles by a client certificate's subject organizational unit (OU),
    /// for identities without a role of their own.
    pub units: HashMap<String, String>,
    /// Roles by name, besides (or replacing) the built-in ones.
    pub roles: HashMap<String, RoleSettings>,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            device_role: "device".into(),
            anonymous_role: "open".into(),
            identities: HashMap::new(),
            units: HashMap::new(),
            roles: HashMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy: no role named {0:?}")]
    UnknownRole(String),
    #[error("policy: role {role:?} has an invalid filter {filter:?}")]
    Filter { role: String, filter: String },
}

fn builtin_roles() -> HashMap<String, RoleSettings> {
    let all = || vec!["#".to_string()];
    HashMap::from([
        (
            "device".to_string(),
            RoleSettings {
                publish: vec!["things/${thing}/#".into()],
                subscribe: vec!["things/${thing}/#".into()],
                receive: None,
                deny_publish: Vec::new(),
                deny_subscribe: Vec::new(),
                all_things: false,
            },
        ),
        (
            "open".to_string(),
            RoleSettings {
                publish: all(),
                subscribe: all(),
                receive: None,
                deny_publish: Vec::new(),
                deny_subscribe: Vec::new(),
                all_things: false,
            },
        ),
        (
            "service".to_string(),
            RoleSettings {
                publish: all(),
                subscribe: all(),
                receive: None,
                deny_publish: Vec::new(),
                deny_subscribe: Vec::new(),
                all_things: true,
            },
        ),
    ])
}

/// A role ready to check against: its filters split into levels.
#[derive(Debug, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    publish: Vec<Vec<String>>,
    subscribe: Vec<Vec<String>>,
    receive: Option<Vec<Vec<String>>>,
    deny_publish: Vec<Vec<String>>,
    deny_subscribe: Vec<Vec<String>>,
    pub all_things: bool,
}

/// Whose rules apply: the values of the placeholders.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub thing: &'a str,
    pub client_id: &'a str,
}

impl Subject<'_> {
    /// The value a rule level stands for: itself, or a placeholder's value
    /// (`None` when that value cannot stand in a topic level).
    fn level<'r>(&'r self, rule: &'r str) -> Option<&'r str> {
        let value = match rule {
            "${thing}" => self.thing,
            "${client_id}" => self.client_id,
            literal => return Some(literal),
        };
        (!value.is_empty() && !value.contains(['/', '+', '#'])).then_some(value)
    }
}

impl Role {
    fn new(name: &str, settings: &RoleSettings) -> Result<Role, PolicyError> {
        let split = |filters: &[String]| {
            filters
                .iter()
                .map(|f| {
                    if crate::topics::valid_filter(f) {
                        Ok(f.split('/').map(str::to_owned).collect())
                    } else {
                        Err(PolicyError::Filter {
                            role: name.to_owned(),
                            filter: f.clone(),
                        })
                    }
                })
                .collect::<Result<Vec<Vec<String>>, _>>()
        };
        Ok(Role {
            name: name.to_owned(),
            publish: split(&settings.publish)?,
            subscribe: split(&settings.subscribe)?,
            receive: settings.receive.as_deref().map(split).transpose()?,
            deny_publish: split(&settings.deny_publish)?,
            deny_subscribe: split(&settings.deny_subscribe)?,
            all_things: settings.all_things,
        })
    }

    /// Whether `subject` may publish to `topic` (outside `$aws/`).
    pub fn may_publish(&self, topic: &str, subject: Subject<'_>) -> bool {
        self.publish.iter().any(|rule| covers(rule, topic, subject))
            && !self
                .deny_publish
                .iter()
                .any(|rule| covers(rule, topic, subject))
    }

    /// Whether a message on `topic` (outside `$aws/`) may be delivered to
    /// `subject`.
    pub fn may_receive(&self, topic: &str, subject: Subject<'_>) -> bool {
        self.receive
            .as_ref()
            .is_none_or(|rules| rules.iter().any(|rule| covers(rule, topic, subject)))
    }

    /// Whether `subject` may subscribe to `filter` (outside `$aws/`; a
    /// `$share/{group}/` prefix is looked through).
    pub fn may_subscribe(&self, filter: &str, subject: Subject<'_>) -> bool {
        let filter = filter
            .strip_prefix("$share/")
            .and_then(|s| s.split_once('/'))
            .map_or(filter, |(_group, inner)| inner);
        self.subscribe
            .iter()
            .any(|rule| covers(rule, filter, subject))
            && !self
                .deny_subscribe
                .iter()
                .any(|rule| covers(rule, filter, subject))
    }
}

/// Whether every topic `filter` matches is matched by `rule` (a topic is a
/// filter without wildcards). A `#` in the rule covers the rest; a `+`
/// covers one level, a `+` in the filter included; a literal covers only
/// itself.
fn covers(rule: &[String], filter: &str, subject: Subject<'_>) -> bool {
    let mut levels = filter.split('/');
    for rule_level in rule {
        let Some(value) = subject.level(rule_level) else {
            return false;
        };
        if value == "#" {
            // `a/#` also matches `a` itself, as in MQTT.
            return true;
        }
        let Some(level) = levels.next() else {
            return false;
        };
        match (value, level) {
            (_, "#") => return false,
            ("+", _) => {}
            (literal, level) if literal == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Every role, and which one a client gets.
#[derive(Debug)]
pub struct Policy {
    roles: HashMap<String, Arc<Role>>,
    identities: HashMap<String, Arc<Role>>,
    units: HashMap<String, Arc<Role>>,
    device: Arc<Role>,
    anonymous: Arc<Role>,
}

impl Policy {
    pub fn new(settings: &PolicySettings) -> Result<Policy, PolicyError> {
        let mut all = builtin_roles();
        all.extend(settings.roles.clone());
        let roles = all
            .iter()
            .map(|(name, role)| Ok((name.clone(), Arc::new(Role::new(name, role)?))))
            .collect::<Result<HashMap<_, _>, PolicyError>>()?;
        let role = |name: &String| {
            roles
                .get(name)
                .cloned()
                .ok_or_else(|| PolicyError::UnknownRole(name.clone()))
        };
        let by = |map: &HashMap<String, String>| {
            map.iter()
                .map(|(key, name)| Ok((key.clone(), role(name)?)))
                .collect::<Result<HashMap<_, _>, PolicyError>>()
        };
        let identities = by(&settings.identities)?;
        let units = by(&settings.units)?;
        Ok(Policy {
            device: role(&settings.device_role)?,
            anonymous: role(&settings.anonymous_role)?,
            roles,
            identities,
            units,
        })
    }

    /// The role of a client with `identity` (`None`: anonymous, or the
    /// shared credential) whose certificate, if any, names `units`: the
    /// identity's own role, else its first unit's that has one, else the
    /// device role.
    pub fn role_of(&self, identity: Option<&str>, units: &[String]) -> Arc<Role> {
        let Some(identity) = identity else {
            return Arc::clone(&self.anonymous);
        };
        let role = self
            .identities
            .get(identity)
            .or_else(|| units.iter().find_map(|unit| self.units.get(unit)))
            .unwrap_or(&self.device);
        Arc::clone(role)
    }

    /// A role by name (tests and tools).
    pub fn role(&self, name: &str) -> Option<Arc<Role>> {
        self.roles.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(&PolicySettings::default()).expect("the default policy is valid")
    }

    const LAMP: Subject<'static> = Subject {
        thing: "lamp-1",
        client_id: "lamp-1",
    };

    #[test]
    fn a_device_stays_in_its_own_namespace() {
        let device = policy().role("device").expect("built in");
        assert!(device.may_publish("things/lamp-1/telemetry", LAMP));
        assert!(device.may_publish("things/lamp-1", LAMP), "a/# matches a");
        assert!(!device.may_publish("things/lamp-2/telemetry", LAMP));
        assert!(!device.may_publish("cmd/lamp-1/unlock", LAMP));
        assert!(device.may_subscribe("things/lamp-1/#", LAMP));
        assert!(device.may_subscribe("things/lamp-1/+/state", LAMP));
        assert!(device.may_subscribe("$share/g/things/lamp-1/cmd", LAMP));
        assert!(!device.may_subscribe("#", LAMP));
        assert!(!device.may_subscribe("things/+/telemetry", LAMP));
        assert!(!device.may_subscribe("things/#", LAMP));
        let sneaky = Subject {
            thing: "+",
            client_id: "+",
        };
        assert!(!device.may_publish("things/x/t", sneaky));
        assert!(!device.may_subscribe("things/+/t", sneaky));
    }

    #[test]
    fn roles_are_assigned_by_identity() {
        let settings: PolicySettings = toml::from_str(
            r##"
            identities = { console = "service", "gw-1" = "gateway" }
            units = { gateways = "gateway" }
            [roles.gateway]
            publish = ["things/+/telemetry", "gateways/${client_id}/#"]
            subscribe = ["things/+/cmd", "fleet/#"]
            receive = ["things/+/cmd", "fleet/public/#"]
            "##,
        )
        .expect("parses");
        let policy = Policy::new(&settings).expect("valid");
        assert_eq!(policy.role_of(None, &[]).name, "open");
        assert_eq!(policy.role_of(Some("lamp-1"), &[]).name, "device");
        assert!(policy.role_of(Some("console"), &[]).all_things);
        let ou = ["field".to_string(), "gateways".to_string()];
        assert_eq!(policy.role_of(Some("gw-9"), &ou).name, "gateway", "by OU");
        assert!(
            policy.role_of(Some("console"), &ou).all_things,
            "identity first"
        );
        let gateway = policy.role_of(Some("gw-1"), &[]);
        let gw = Subject {
            thing: "gw-1",
            client_id: "gw-1",
        };
        assert!(gateway.may_publish("things/lamp-9/telemetry", gw));
        assert!(gateway.may_publish("gateways/gw-1/status", gw));
        assert!(!gateway.may_publish("gateways/gw-2/status", gw));
        assert!(gateway.may_subscribe("things/+/cmd", gw));
        assert!(!gateway.may_subscribe("things/#", gw));
        assert!(gateway.may_subscribe("fleet/#", gw));
        assert!(gateway.may_receive("fleet/public/news", gw));
        assert!(
            !gateway.may_receive("fleet/secret/keys", gw),
            "subscribed, not received"
        );
        assert!(policy
            .role_of(Some("lamp-1"), &[])
            .may_receive("anything", gw));
        assert!(policy.role_of(None, &[]).may_subscribe("#", gw), "open");
    }

    #[test]
    fn an_explicit_deny_wins() {
        let settings: PolicySettings = toml::from_str(
            r##"
            anonymous_role = "guarded"
            [roles.guarded]
            publish = ["#"]
            subscribe = ["#"]
            deny_publish = ["cmd/#"]
            deny_subscribe = ["test/nosubscribe", "secret/#"]
            "##,
        )
        .expect("parses");
        let role = Policy::new(&settings).expect("valid").role_of(None, &[]);
        let anyone = Subject {
            thing: "c",
            client_id: "c",
        };
        assert!(role.may_subscribe("#", anyone), "# is not inside a deny");
        assert!(role.may_subscribe("test/other", anyone));
        assert!(!role.may_subscribe("test/nosubscribe", anyone));
        assert!(!role.may_subscribe("secret/+/x", anyone));
        assert!(role.may_publish("telemetry/1", anyone));
        assert!(!role.may_publish("cmd/lamp-1/unlock", anyone));
    }

    #[test]
    fn a_policy_naming_what_is_not_there_is_refused() {
        let unknown = PolicySettings {
            identities: HashMap::from([("x".into(), "nope".into())]),
            ..PolicySettings::default()
        };
        assert_eq!(
            Policy::new(&unknown).err(),
            Some(PolicyError::UnknownRole("nope".into()))
        );
        let bad = PolicySettings {
            roles: HashMap::from([(
                "r".into(),
                RoleSettings {
                    publish: vec!["a/#/b".into()],
                    ..RoleSettings::default()
                },
            )]),
            ..PolicySettings::default()
        };
        assert!(matches!(Policy::new(&bad), Err(PolicyError::Filter { .. })));
    }
}
