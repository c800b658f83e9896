//! Test harness: a Mosquitto broker on a free port, and a fake shadow service for the fleet.

#![allow(dead_code)]

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::Duration;

pub use umbra_tests::Mosquitto;

/// desired, reported, version.
type FakeShadow = (Map<String, Value>, Map<String, Value>, u64);

/// Minimal stand-in for Umbra's shadow service over Mosquitto: flat desired/reported maps per
/// thing, `accepted` answers, and a delta whenever desired differs from reported.
/// `ready` fires once both request subscriptions are acknowledged, so that
/// no device request can reach the broker before the service listens.
pub async fn fake_shadow_service(
    port: u16,
    stop: tokio_util::sync::CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut subacks = 0;
    let mut options = MqttOptions::new("fake-shadow", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let mut shadows: HashMap<String, FakeShadow> = HashMap::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = eventloop.poll() => event,
        };
        let publish = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                for filter in ["$aws/things/+/shadow/update", "$aws/things/+/shadow/get"] {
                    let _ = client.try_subscribe(filter, QoS::AtLeastOnce);
                }
                continue;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subacks += 1;
                if subacks == 2 {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
                continue;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => p,
            Ok(_) => continue,
            // The broker may not accept connections yet: the next poll
            // reconnects (after a short backoff, so as not to spin).
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(rest) = publish.topic.strip_prefix("$aws/things/") else {
            continue;
        };
        let Some((thing, op)) = rest.split_once("/shadow/") else {
            continue;
        };
        let request: Value = serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
        let token = request.get("clientToken").cloned().unwrap_or(Value::Null);
        let prefix = format!("$aws/things/{thing}/shadow");
        let mut answers = Vec::new();
        match op {
            "get" => match shadows.get(thing) {
                None => answers.push((
                    format!("{prefix}/get/rejected"),
                    json!({"code":404,"message":format!("No shadow exists with name: '{thing}'"),"clientToken":token}),
                )),
                Some((desired, reported, version)) => {
                    let delta = delta(desired, reported);
                    let mut state = json!({"desired":desired,"reported":reported});
                    if !delta.is_empty() {
                        state["delta"] = Value::Object(delta);
                    }
                    answers.push((
                        format!("{prefix}/get/accepted"),
                        json!({"state":state,"version":version,"clientToken":token}),
                    ));
                }
            },
            "update" => {
                let entry = shadows.entry(thing.to_owned()).or_default();
                let state = request.get("state").cloned().unwrap_or(Value::Null);
                for (section, target) in [("desired", &mut entry.0), ("reported", &mut entry.1)] {
                    if let Some(values) = state.get(section).and_then(Value::as_object) {
                        for (k, v) in values {
                            target.insert(k.clone(), v.clone());
                        }
                    }
                }
                entry.2 += 1;
                answers.push((
                    format!("{prefix}/update/accepted"),
                    json!({"state":state,"version":entry.2,"clientToken":token}),
                ));
                let delta = delta(&entry.0, &entry.1);
                if !delta.is_empty() {
                    answers.push((
                        format!("{prefix}/update/delta"),
                        json!({"state":delta,"version":entry.2}),
                    ));
                }
            }
            _ => {}
        }
        for (topic, body) in answers {
            let _ = client
                .publish(topic, QoS::AtLeastOnce, false, body.to_string())
                .await;
        }
    }
}

fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    desired
        .iter()
        .filter(|(k, v)| reported.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
