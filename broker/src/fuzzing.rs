//! Entry points of the fuzz targets (`fuzz/`) for the connection layer,
//! shared with the tests that replay their corpora and the inputs that once
//! failed (`broker/tests/fuzz_corpora.rs`). Each takes arbitrary bytes and
//! panics when the result breaks an invariant.

use bytes::BytesMut;
use rumqttd::protocol::{self, Packet};

use crate::codec::{sniff, Codec};
use crate::policy::{Policy, PolicySettings, Subject};
use crate::topics::{route_publish, route_subscribe, topic_matches, valid_filter, valid_topic};
use crate::topics::{PublishRoute, SubscribeRoute};

/// The largest packet the target frames (the connection layer's
/// `max_payload_size` plays this part).
const MAX_PACKET: usize = 64 * 1024;

/// A client's byte stream as a connection reads it: the first byte picks
/// MQTT 3.1.1 (even) or 5 (odd), the rest is framed packet by packet until
/// it runs out or is malformed. Each packet is routed as the connection
/// routes it, and encoded again, which must frame back to a packet of the
/// same kind.
pub fn mqtt_packets(data: &[u8]) {
    let _ = sniff(data);
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let codec = if first % 2 == 0 { Codec::V4 } else { Codec::V5 };
    let policy = Policy::new(&PolicySettings::default()).expect("the default policy is valid");
    let device = policy.role_of(Some("lamp-1"), &[]);
    let subject = Subject {
        thing: "lamp-1",
        client_id: "lamp-1",
    };
    let mut buffer = BytesMut::from(rest);
    loop {
        let packet = match codec.read(&mut buffer, MAX_PACKET) {
            Ok(packet) => packet,
            Err(_) => return,
        };
        match &packet {
            Packet::Publish(publish, _) => {
                if let Ok(topic) = std::str::from_utf8(&publish.topic) {
                    if route_publish(topic, "lamp-1", false) == PublishRoute::Router {
                        let _ = device.may_publish(topic, subject);
                    }
                }
            }
            Packet::Subscribe(subscribe, _) => {
                for filter in &subscribe.filters {
                    if route_subscribe(&filter.path, "lamp-1", false) == SubscribeRoute::Router {
                        let _ = device.may_subscribe(&filter.path, subject);
                    }
                }
            }
            _ => {}
        }
        let kind = std::mem::discriminant(&packet);
        let mut encoded = BytesMut::new();
        if codec.write(packet, &mut encoded).is_ok() {
            match codec.read(&mut encoded, usize::MAX) {
                Ok(again) => assert_eq!(std::mem::discriminant(&again), kind),
                Err(protocol::Error::InsufficientBytes(_)) => {
                    panic!("an encoded packet is incomplete")
                }
                // The codec writes some packets it would not take from a
                // client (e.g. an empty topic without an alias); the
                // connection never writes those.
                Err(_) => {}
            }
        }
    }
}

/// A topic (before the first newline) and a client id (after it): the
/// `$aws` topic parser, the routes and the device role, as a connection
/// applies them to a PUBLISH and a SUBSCRIBE.
pub fn aws_topic(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (topic, client_id) = text.split_once('\n').unwrap_or((text, "lamp-1"));
    match route_publish(topic, client_id, false) {
        PublishRoute::ShadowRequest(request) => {
            assert_eq!(request.key.thing, client_id, "a device's own thing only");
            let again = format!("{}/{}", request.key.topic_prefix(), request.op.as_str());
            let parsed = umbra_shadow::topic::parse_request_topic(&again);
            assert_eq!(
                parsed.as_ref(),
                Ok(&request),
                "the request topic round-trips"
            );
        }
        PublishRoute::Router => assert!(!topic.starts_with('$')),
        _ => {}
    }
    let _ = route_subscribe(topic, client_id, false);
    if valid_topic(topic) {
        assert!(valid_filter(topic), "a topic is a filter");
        assert!(topic_matches(topic, topic), "a topic matches itself");
        if !topic.starts_with('$') {
            assert!(topic_matches(topic, "#"), "# matches every non-$ topic");
        }
    }
    let policy = Policy::new(&PolicySettings::default()).expect("the default policy is valid");
    let subject = Subject {
        thing: client_id,
        client_id,
    };
    let device = policy.role_of(Some(client_id), &[]);
    if device.may_publish(topic, subject) {
        assert!(
            topic.starts_with(&format!("things/{client_id}")),
            "a device publishes only under things/{{itself}}"
        );
    }
}
