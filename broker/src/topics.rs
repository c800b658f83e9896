//! The `$aws/...` topic space: mapping to the broker-internal prefix, shadow
//! request topic parsing, and the per-client authorization rules.
//!
//! rumqttd refuses subscriptions to filters that start with `$` and never
//! matches a `$` topic against any filter. Umbra therefore stores every
//! `$aws/X` topic and filter as [`INTERNAL_PREFIX`]`X` inside the router and
//! maps it back at the connection edge. Clients may never use the internal
//! prefix directly.
//!
//! Authorization follows AWS IoT's default device policy: a device (client id
//! == thing name) may only touch `$aws/things/{its own name}/...`; privileged
//! (service) clients may use all of `$aws/...`. Everything else under `$aws/`
//! is read-only and reserved to privileged clients. Topics outside `$` are
//! unrestricted.

use rumqttd::protocol::matches;
use umbra_shadow::topic::{parse_request_topic, RequestTopic};

/// Prefix of the real AWS IoT reserved topics.
pub const AWS_PREFIX: &str = "$aws/";
/// Prefix under which `$aws/` topics live inside the router.
pub const INTERNAL_PREFIX: &str = "umbra-aws/";
/// Filter substituted for a subscription Umbra refuses with a failure SUBACK.
/// Nobody can publish to it: the internal prefix is forbidden to clients and
/// `$aws/$refused` is never an answer topic.
pub const REFUSED_FILTER: &str = "umbra-aws/$refused";
/// Client ids starting with this are reserved for Umbra's own local links.
pub const RESERVED_CLIENT_PREFIX: &str = "umbra-internal";

/// `$aws/X` -> `umbra-aws/X`; `None` if `topic` is not under `$aws/`.
pub fn to_internal(topic: &str) -> Option<String> {
    topic
        .strip_prefix(AWS_PREFIX)
        .map(|rest| format!("{INTERNAL_PREFIX}{rest}"))
}

/// `umbra-aws/X` -> `$aws/X`; `None` if `topic` is not internal.
pub fn to_aws(topic: &str) -> Option<String> {
    topic
        .strip_prefix(INTERNAL_PREFIX)
        .map(|rest| format!("{AWS_PREFIX}{rest}"))
}

/// Whether `topic` uses the reserved internal prefix.
pub fn is_internal(topic: &str) -> bool {
    topic.starts_with(INTERNAL_PREFIX)
}

/// Whether an internal-prefix topic matches one of the internal-prefix filters
/// a connection subscribed through `$aws/...`.
pub fn matches_any(internal_topic: &str, internal_filters: &[String]) -> bool {
    internal_filters
        .iter()
        .any(|filter| matches(internal_topic, filter))
}

/// The thing named by `$aws/things/{thing}/...` (topic or filter).
fn thing_of(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let thing = rest.split('/').next()?;
    (!thing.is_empty()).then_some(thing)
}

/// Why an operation is forbidden (logged; the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// The broker-internal prefix is not for clients.
    ReservedTopic,
    /// `$aws/things/{thing}/...` of a thing other than the client itself.
    OtherThing,
    /// Shadow answer topics (`accepted`, `rejected`, `delta`, `documents`)
    /// are published by Umbra only.
    AnswerTopic,
    /// Other `$aws/...` topics are read-only and reserved to privileged clients.
    ReservedAws,
}

impl Forbidden {
    pub fn as_str(self) -> &'static str {
        match self {
            Forbidden::ReservedTopic => "reserved internal topic",
            Forbidden::OtherThing => "topic of another thing",
            Forbidden::AnswerTopic => "shadow answer topic",
            Forbidden::ReservedAws => "reserved $aws topic",
        }
    }
}

/// What the edge does with an incoming PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishRoute {
    /// Hand to the router unchanged (ordinary topics; other `$` topics, which
    /// the router acknowledges and drops).
    PassThrough,
    /// A shadow request: pass through unchanged (acknowledged, reaches no
    /// subscriber) and hand it to the shadow service.
    ShadowRequest(RequestTopic),
    /// An `$aws/...` topic that subscribers should receive: rewrite to this
    /// internal topic.
    MapToInternal(String),
    /// Close the connection.
    Forbidden(Forbidden),
}

/// Decides the route of a publish to `topic` by `client_id`.
pub fn route_publish(topic: &str, client_id: &str, privileged: bool) -> PublishRoute {
    if is_internal(topic) {
        return PublishRoute::Forbidden(Forbidden::ReservedTopic);
    }
    let Some(internal) = to_internal(topic) else {
        return PublishRoute::PassThrough;
    };
    if let Ok(request) = parse_request_topic(topic) {
        if privileged || request.key.thing == client_id {
            return PublishRoute::ShadowRequest(request);
        }
        return PublishRoute::Forbidden(Forbidden::OtherThing);
    }
    if privileged {
        return PublishRoute::MapToInternal(internal);
    }
    match thing_of(topic) {
        Some(thing) if thing != client_id => PublishRoute::Forbidden(Forbidden::OtherThing),
        Some(_) if topic.split('/').nth(3) == Some("shadow") => {
            PublishRoute::Forbidden(Forbidden::AnswerTopic)
        }
        Some(_) => PublishRoute::MapToInternal(internal),
        None => PublishRoute::Forbidden(Forbidden::ReservedAws),
    }
}

/// What the edge does with one filter of an incoming SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeRoute {
    PassThrough,
    /// An allowed `$aws/...` filter, rewritten to this internal filter.
    MapToInternal(String),
    /// Answer with a failure code in the SUBACK (unsupported `$` filters such
    /// as `$SYS/#`); the connection stays open.
    Refuse,
    /// Close the connection.
    Forbidden(Forbidden),
}

/// Decides the route of a subscription to `filter` by `client_id`.
pub fn route_subscribe(filter: &str, client_id: &str, privileged: bool) -> SubscribeRoute {
    if let Some(shared) = filter.strip_prefix("$share/") {
        // `$share/{group}/{filter}`: the router matches `{filter}`.
        let inner = shared.split_once('/').map(|(_, f)| f).unwrap_or("");
        if is_internal(inner) {
            return SubscribeRoute::Forbidden(Forbidden::ReservedTopic);
        }
        if inner.starts_with('$') {
            return SubscribeRoute::Refuse;
        }
        return SubscribeRoute::PassThrough;
    }
    if is_internal(filter) {
        return SubscribeRoute::Forbidden(Forbidden::ReservedTopic);
    }
    let Some(internal) = to_internal(filter) else {
        if filter.starts_with('$') {
            return SubscribeRoute::Refuse;
        }
        return SubscribeRoute::PassThrough;
    };
    if privileged {
        return SubscribeRoute::MapToInternal(internal);
    }
    match thing_of(filter) {
        Some(thing) if thing == client_id => SubscribeRoute::MapToInternal(internal),
        Some(_) => SubscribeRoute::Forbidden(Forbidden::OtherThing),
        None => SubscribeRoute::Forbidden(Forbidden::ReservedAws),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways() {
        assert_eq!(
            to_internal("$aws/things/a/shadow/get").as_deref(),
            Some("umbra-aws/things/a/shadow/get")
        );
        assert_eq!(
            to_aws("umbra-aws/things/a/shadow/get").as_deref(),
            Some("$aws/things/a/shadow/get")
        );
        assert_eq!(to_internal("things/a"), None);
        assert_eq!(to_aws("$aws/x"), None);
    }

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
        assert_eq!(
            route("umbra-aws/things/dev1/shadow/get/accepted"),
            PublishRoute::Forbidden(Forbidden::ReservedTopic)
        );
        assert_eq!(
            route("$aws/things/dev1/jobs/notify"),
            PublishRoute::MapToInternal("umbra-aws/things/dev1/jobs/notify".into())
        );
        assert_eq!(route("telemetry/dev1"), PublishRoute::PassThrough);
        assert_eq!(route("$SYS/x"), PublishRoute::PassThrough);
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
            PublishRoute::MapToInternal("umbra-aws/things/dev2/shadow/get/accepted".into())
        );
        assert_eq!(
            route("umbra-aws/x"),
            PublishRoute::Forbidden(Forbidden::ReservedTopic)
        );
    }

    #[test]
    fn subscribe_rules() {
        let device = |f: &str| route_subscribe(f, "dev1", false);
        assert_eq!(
            device("$aws/things/dev1/shadow/#"),
            SubscribeRoute::MapToInternal("umbra-aws/things/dev1/shadow/#".into())
        );
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
        assert_eq!(
            device("umbra-aws/#"),
            SubscribeRoute::Forbidden(Forbidden::ReservedTopic)
        );
        assert_eq!(device("$SYS/#"), SubscribeRoute::Refuse);
        assert_eq!(device("$share/g/$aws/#"), SubscribeRoute::Refuse);
        assert_eq!(
            device("$share/g/umbra-aws/#"),
            SubscribeRoute::Forbidden(Forbidden::ReservedTopic)
        );
        assert_eq!(device("$share/g/telemetry/#"), SubscribeRoute::PassThrough);
        assert_eq!(device("#"), SubscribeRoute::PassThrough);
        assert_eq!(
            route_subscribe("$aws/things/+/shadow/#", "svc", true),
            SubscribeRoute::MapToInternal("umbra-aws/things/+/shadow/#".into())
        );
    }

    #[test]
    fn delivery_needs_a_matching_aws_filter() {
        let filters = vec!["umbra-aws/things/dev1/shadow/+/accepted".to_owned()];
        assert!(matches_any(
            "umbra-aws/things/dev1/shadow/get/accepted",
            &filters
        ));
        assert!(!matches_any(
            "umbra-aws/things/dev1/shadow/get/rejected",
            &filters
        ));
        assert!(!matches_any(
            "umbra-aws/things/dev1/shadow/get/accepted",
            &[]
        ));
    }
}
