//! Pure rules of the topic space: where a publish or a subscription goes
//! (Umbra's `$aws` table, the shadow service, rumqttd's router), who may
//! publish and subscribe where, and MQTT's topic and filter syntax.
//!
//! Authorization follows AWS IoT's default device policy: a device (client id
//! == thing name) may only touch `$aws/things/{its own name}/...`; privileged
//! (service) clients may use all of `$aws/...`. Everything else under `$aws/`
//! is read-only and reserved to privileged clients. Topics outside `$` are
//! governed by the client's role ([`crate::policy`]).

use umbra_shadow::topic::{parse_request_topic, RequestTopic};

/// Prefix of the AWS IoT reserved topics, which Umbra serves itself.
pub const AWS_PREFIX: &str = "$aws/";

/// The thing named by `$aws/things/{thing}/...` (topic or filter).
fn thing_of(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let thing = rest.split('/').next()?;
    (!thing.is_empty()).then_some(thing)
}

/// Why an operation is forbidden (logged; the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// `$aws/things/{thing}/...` of a thing other than the client itself.
    OtherThing,
    /// Shadow answer topics (`accepted`, `rejected`, `delta`, `documents`)
    /// are published by Umbra only.
    AnswerTopic,
    /// Other `$aws/...` topics are read-only and reserved to privileged clients.
    ReservedAws,
    /// Outside `$aws/`, a topic the client's role does not allow.
    Policy,
}

impl Forbidden {
    pub fn as_str(self) -> &'static str {
        match self {
            Forbidden::OtherThing => "topic of another thing",
            Forbidden::AnswerTopic => "shadow answer topic",
            Forbidden::ReservedAws => "reserved $aws topic",
            Forbidden::Policy => "topic outside the client's policy",
        }
    }
}

/// Where an incoming PUBLISH goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishRoute {
    /// An ordinary topic: rumqttd's router.
    Router,
    /// A shadow request: the shadow service.
    ShadowRequest(RequestTopic),
    /// Another `$aws/...` topic the client may publish to: Umbra's
    /// subscribers of it.
    Aws,
    /// Another `$` topic: acknowledged, reaches nobody.
    Drop,
    /// Close the connection.
    Forbidden(Forbidden),
}

/// Decides the route of a publish to `topic` by `client_id`.
pub fn route_publish(topic: &str, client_id: &str, privileged: bool) -> PublishRoute {
    if !topic.starts_with(AWS_PREFIX) {
        if topic.starts_with('$') {
            return PublishRoute::Drop;
        }
        return PublishRoute::Router;
    }
    if let Ok(request) = parse_request_topic(topic) {
        if privileged || request.key.thing == client_id {
            return PublishRoute::ShadowRequest(request);
        }
        return PublishRoute::Forbidden(Forbidden::OtherThing);
    }
    if privileged {
        return PublishRoute::Aws;
    }
    match thing_of(topic) {
        Some(thing) if thing != client_id => PublishRoute::Forbidden(Forbidden::OtherThing),
        Some(_) if topic.split('/').nth(3) == Some("shadow") => {
            PublishRoute::Forbidden(Forbidden::AnswerTopic)
        }
        Some(_) => PublishRoute::Aws,
        None => PublishRoute::Forbidden(Forbidden::ReservedAws),
    }
}

/// Where one filter of an incoming SUBSCRIBE goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeRoute {
    /// rumqttd's router (ordinary filters and `$share/...`).
    Router,
    /// Umbra's `$aws` subscription table.
    Aws,
    /// Answer with a failure code (a malformed filter, or a `$` filter Umbra
    /// does not serve, such as `$SYS/#`); the connection stays open.
    Refuse,
    /// Close the connection.
    Forbidden(Forbidden),
}

/// Decides the route of a subscription to `filter` by `client_id`.
pub fn route_subscribe(filter: &str, client_id: &str, privileged: bool) -> SubscribeRoute {
    if let Some(shared) = filter.strip_prefix("$share/") {
        // `$share/{group}/{filter}`: the router matches `{filter}`.
        let inner = match shared.split_once('/') {
            Some((group, inner)) if !group.is_empty() && !has_wildcard(group) => inner,
            _ => return SubscribeRoute::Refuse,
        };
        if inner.starts_with('$') || !valid_filter(inner) {
            return SubscribeRoute::Refuse;
        }
        return SubscribeRoute::Router;
    }
    if !valid_filter(filter) {
        return SubscribeRoute::Refuse;
    }
    if !filter.starts_with(AWS_PREFIX) {
        if filter.starts_with('$') {
            return SubscribeRoute::Refuse;
        }
        return SubscribeRoute::Router;
    }
    if privileged {
        return SubscribeRoute::Aws;
    }
    match thing_of(filter) {
        Some(thing) if thing == client_id => SubscribeRoute::Aws,
        Some(_) => SubscribeRoute::Forbidden(Forbidden::OtherThing),
        None => SubscribeRoute::Forbidden(Forbidden::ReservedAws),
    }
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['+', '#'])
}

/// A topic name a PUBLISH may carry: not empty, no wildcards, no NUL
/// (MQTT-3.3.2-2, MQTT-4.7.3-1).
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A topic filter as MQTT defines it: `#` only as the whole last level, `+`
/// only as a whole level (MQTT-4.7.1).
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        level => !has_wildcard(level),
    })
}

/// Whether `topic` matches `filter` (`+` one level, `#` the rest, the parent
/// included). Unlike rumqttd's matcher this applies to `$` topics too; a
/// filter starting with a wildcard never matches a `$` topic (MQTT-4.7.2-1).
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            level => {
                if topic_levels.next() != Some(level) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_publish_rules() {
        let route = |t: &str| route_publish(t, "dev1", false);
        assert!(matches!(
            route("$aws/things/dev1/shadow/get"),
            PublishRoute::ShadowRequest(_)
        ));
        assert_eq!(
            route("$aws/things/dev2/shadow/get"),
            PublishRoute::Forbidden(Forbidden::OtherThing)
        );
        assert_eq!(
            route("$aws/things/dev1/shadow/update/accepted"),
            PublishRoute::Forbidden(Forbidden::AnswerTopic)
        );
        assert_eq!(
            route("$aws/things/dev1/shadow/name/x/update/delta"),
            PublishRoute::Forbidden(Forbidden::AnswerTopic)
        );
        assert_eq!(
            route("$aws/events/presence/connected/dev1"),
            PublishRoute::Forbidden(Forbidden::ReservedAws)
        );
        assert_eq!(route("$aws/things/dev1/jobs/notify"), PublishRoute::Aws);
        assert_eq!(route("telemetry/dev1"), PublishRoute::Router);
        assert_eq!(route("$SYS/x"), PublishRoute::Drop);
    }

    #[test]
    fn privileged_publish_rules() {
        let route = |t: &str| route_publish(t, "svc", true);
        assert!(matches!(
            route("$aws/things/dev2/shadow/get"),
            PublishRoute::ShadowRequest(_)
        ));
        assert_eq!(
            route("$aws/things/dev2/shadow/get/accepted"),
            PublishRoute::Aws
        );
    }

    #[test]
    fn subscribe_rules() {
        let device = |f: &str| route_subscribe(f, "dev1", false);
        assert_eq!(device("$aws/things/dev1/shadow/#"), SubscribeRoute::Aws);
        assert_eq!(
            device("$aws/things/dev2/shadow/#"),
            SubscribeRoute::Forbidden(Forbidden::OtherThing)
        );
        assert_eq!(
            device("$aws/things/+/shadow/#"),
            SubscribeRoute::Forbidden(Forbidden::OtherThing)
        );
        assert_eq!(
            device("$aws/events/presence/#"),
            SubscribeRoute::Forbidden(Forbidden::ReservedAws)
        );
        assert_eq!(device("$SYS/#"), SubscribeRoute::Refuse);
        assert_eq!(device("$share/g/$aws/#"), SubscribeRoute::Refuse);
        assert_eq!(device("$share/g/telemetry/#"), SubscribeRoute::Router);
        assert_eq!(device("$share//telemetry/#"), SubscribeRoute::Refuse);
        assert_eq!(device("#"), SubscribeRoute::Router);
        assert_eq!(device("a/#/b"), SubscribeRoute::Refuse);
        assert_eq!(device("a/b+"), SubscribeRoute::Refuse);
        assert_eq!(
            route_subscribe("$aws/things/+/shadow/#", "svc", true),
            SubscribeRoute::Aws
        );
    }

    #[test]
    fn topic_and_filter_syntax() {
        assert!(valid_topic("a/b"));
        assert!(!valid_topic("dt/+/x"));
        assert!(!valid_topic("a/#"));
        assert!(!valid_topic(""));
        assert!(valid_filter("a/+/c/#"));
        assert!(valid_filter("#"));
        assert!(!valid_filter("a/#/c"));
        assert!(!valid_filter("a+"));
    }

    #[test]
    fn matching() {
        let t = "$aws/things/d1/shadow/get/accepted";
        assert!(topic_matches(t, t));
        assert!(topic_matches(t, "$aws/things/d1/shadow/#"));
        assert!(topic_matches(t, "$aws/things/+/shadow/+/accepted"));
        assert!(topic_matches(
            "$aws/things/d1/shadow",
            "$aws/things/d1/shadow/#"
        ));
        assert!(!topic_matches(t, "$aws/things/d1/shadow/+"));
        assert!(!topic_matches(t, "#"));
        assert!(!topic_matches(t, "+/things/d1/shadow/get/accepted"));
        assert!(!topic_matches("$aws/things/d1", "$aws/things/d1/shadow"));
    }
}
