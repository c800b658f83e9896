//! The shadow protocol end to end: real rumqttc devices against a real
//! `umbra` server (embedded broker, shadow service, SQLite file) on free ports.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::Mutex;
use umbra_tests::{mqtt_addr, start, test_config, vector_cases, Device, Device5};

/// Reads messages until the `get/accepted` answer carrying `token`; since one
/// shadow's answers leave in order and a device's single `shadow/#`
/// subscription delivers in order, everything published before it has arrived.
async fn sync(device: &mut Device, prefix: &str, token: &str) -> (Vec<(String, Value)>, Value) {
    device
        .publish(
            &format!("{prefix}/get"),
            json!({ "clientToken": token }).to_string(),
        )
        .await;
    let mut before = Vec::new();
    loop {
        let p = device
            .next_message()
            .await
            .unwrap_or_else(|e| panic!("sync {token}: {e}"));
        let body: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
        let is_answer = p.topic.ends_with("/get/accepted") || p.topic.ends_with("/get/rejected");
        if is_answer && body["clientToken"] == token {
            return (before, body);
        }
        before.push((p.topic, body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vector_over_mqtt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let addr = mqtt_addr(&server);
    for (i, case) in vector_cases().into_iter().enumerate() {
        let name = case["name"].as_str().unwrap_or("?").to_string();
        let thing = format!("vec-{i}");
        let prefix = format!("$aws/things/{thing}/shadow");
        let mut device = Device::connect(addr, &thing).await;
        device.subscribe(&format!("{prefix}/#")).await;

        // Bring the shadow to the case's "before" with real updates.
        let before = &case["before"];
        if !before.is_null() {
            let mut state = serde_json::Map::new();
            for part in ["desired", "reported"] {
                if before[part].is_object() {
                    state.insert(part.into(), before[part].clone());
                }
            }
            let mut payload = json!({ "state": state });
            for _ in 0..before["version"].as_u64().unwrap_or(1) {
                device
                    .publish(&format!("{prefix}/update"), payload.to_string())
                    .await;
                payload = json!({"state": {"reported": {}}});
            }
        }
        let (_, got) = sync(&mut device, &prefix, "before").await;
        if !before.is_null() {
            assert_eq!(
                got["version"], before["version"],
                "{name}: prepared version"
            );
        }

        let request = case["request"].as_str().unwrap_or("").to_string();
        device.publish(&format!("{prefix}/update"), request).await;
        let (answers, after) = sync(&mut device, &prefix, "after").await;
        let topics: Vec<&str> = answers.iter().map(|(t, _)| t.as_str()).collect();
        if let Some(want) = case.get("rejected") {
            assert_eq!(topics, vec![format!("{prefix}/update/rejected")], "{name}");
            assert_eq!(answers[0].1["code"], want["code"], "{name}");
            assert_eq!(answers[0].1["message"], want["message"], "{name}");
            device.disconnect().await;
            continue;
        }
        let want = &case["accepted"];
        let mut expected = vec![
            format!("{prefix}/update/accepted"),
            format!("{prefix}/update/documents"),
        ];
        if want["delta_published"].as_bool().unwrap_or(false) {
            expected.push(format!("{prefix}/update/delta"));
        }
        assert_eq!(topics, expected, "{name}: answers and their order");
        for (topic, body) in &answers {
            let version = if topic.ends_with("/documents") {
                &body["current"]["version"]
            } else {
                &body["version"]
            };
            assert_eq!(version, &want["version"], "{name}: version on {topic}");
        }
        if let Some((_, delta)) = answers.iter().find(|(t, _)| t.ends_with("/delta")) {
            assert_eq!(delta["state"], want["delta"], "{name}: delta message");
        }
        assert_eq!(after["version"], want["version"], "{name}");
        for part in ["desired", "reported", "delta"] {
            assert_eq!(after["state"][part], want[part], "{name}: {part}");
        }
        device.disconnect().await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_and_named_shadows_get_delete_and_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let mut dev = Device::connect(mqtt_addr(&server), "lamp-7").await;
    dev.subscribe("$aws/things/lamp-7/shadow/#").await;
    let classic = "$aws/things/lamp-7/shadow";
    let named = "$aws/things/lamp-7/shadow/name/config";

    let (_, missing) = sync(&mut dev, named, "g0").await;
    assert_eq!(missing["code"], 404);
    assert_eq!(missing["message"], "No shadow exists with name: 'config'");

    dev.publish(
        &format!("{classic}/update"),
        r#"{"state":{"desired":{"on":true}},"clientToken":"c1"}"#,
    )
    .await;
    dev.publish(
        &format!("{named}/update"),
        r#"{"state":{"reported":{"rate":5}},"clientToken":"n1"}"#,
    )
    .await;
    let accepted = dev.next_on(&format!("{classic}/update/accepted")).await;
    assert_eq!(
        (accepted["version"].clone(), accepted["clientToken"].clone()),
        (json!(1), json!("c1"))
    );
    let accepted = dev.next_on(&format!("{named}/update/accepted")).await;
    assert_eq!(
        (accepted["version"].clone(), accepted["clientToken"].clone()),
        (json!(1), json!("n1"))
    );

    let (_, c) = sync(&mut dev, classic, "g1").await;
    assert_eq!(
        c["state"],
        json!({"desired": {"on": true}, "delta": {"on": true}})
    );
    let (_, n) = sync(&mut dev, named, "g2").await;
    assert_eq!(
        n["state"],
        json!({"reported": {"rate": 5}}),
        "named shadow is its own document"
    );

    dev.publish(&format!("{named}/delete"), r#"{"clientToken":"d1"}"#)
        .await;
    let deleted = dev.next_on(&format!("{named}/delete/accepted")).await;
    assert_eq!(
        (deleted["version"].clone(), deleted["clientToken"].clone()),
        (json!(1), json!("d1"))
    );
    let (_, gone) = sync(&mut dev, named, "g3").await;
    assert_eq!(gone["code"], 404);
    let (_, still) = sync(&mut dev, classic, "g4").await;
    assert_eq!(
        still["version"], 1,
        "deleting the named shadow left the classic one"
    );

    dev.publish(
        &format!("{classic}/update"),
        r#"{"state":{"desired":{"on":false}},"version":5,"clientToken":"v"}"#,
    )
    .await;
    let conflict = dev.next_on(&format!("{classic}/update/rejected")).await;
    assert_eq!(
        (
            conflict["code"].clone(),
            conflict["message"].clone(),
            conflict["clientToken"].clone()
        ),
        (json!(409), json!("Version conflict"), json!("v"))
    );
    dev.disconnect().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_subscriber_sees_telemetry_but_no_aws_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let addr = mqtt_addr(&server);
    let mut watcher = Device::connect(addr, "dashboard").await;
    watcher.subscribe("#").await;
    let mut dev = Device::connect(addr, "sensor-1").await;
    dev.subscribe("$aws/things/sensor-1/shadow/#").await;
    for i in 0..5 {
        dev.publish("devices/sensor-1/telemetry", json!({"t": i}).to_string())
            .await;
        dev.publish(
            "$aws/things/sensor-1/shadow/update",
            json!({"state": {"desired": {"t": i}}}).to_string(),
        )
        .await;
        dev.next_on("$aws/things/sensor-1/shadow/update/delta")
            .await;
    }
    dev.publish("devices/sensor-1/telemetry", "end").await;
    let mut telemetry = 0;
    loop {
        let p = watcher.next_message().await.expect("watcher receives");
        assert!(
            !p.topic.starts_with("$aws") && !p.topic.starts_with("umbra-aws"),
            "# delivered {}",
            p.topic
        );
        if &p.payload[..] == b"end" {
            break;
        }
        telemetry += 1;
    }
    assert_eq!(telemetry, 5);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_and_versions_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    let server = start(config.clone()).await;
    let mut dev = Device::connect(mqtt_addr(&server), "keeper").await;
    dev.subscribe("$aws/things/keeper/shadow/#").await;
    for i in 0..3 {
        dev.publish(
            "$aws/things/keeper/shadow/update",
            json!({"state": {"reported": {"i": i}}}).to_string(),
        )
        .await;
    }
    let (_, before) = sync(&mut dev, "$aws/things/keeper/shadow", "b").await;
    assert_eq!(before["version"], 3);
    dev.disconnect().await;
    server.shutdown().await;

    config.mqtt.mqtt_v4 = Some(umbra_broker::ListenerSettings::local(0));
    let server = start(config).await;
    let mut dev = Device::connect(mqtt_addr(&server), "keeper").await;
    dev.subscribe("$aws/things/keeper/shadow/#").await;
    let (_, after) = sync(&mut dev, "$aws/things/keeper/shadow", "a").await;
    assert_eq!(after["state"], before["state"]);
    assert_eq!(after["metadata"], before["metadata"]);
    assert_eq!(after["version"], 3);
    dev.publish(
        "$aws/things/keeper/shadow/update",
        r#"{"state":{"reported":{"i":9}}}"#,
    )
    .await;
    let next = dev
        .next_on("$aws/things/keeper/shadow/update/accepted")
        .await;
    assert_eq!(next["version"], 4, "numbering continues after restart");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_no_acknowledged_update() {
    const DEVICES: usize = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    // Devices update as fast as their answers come back.
    config.shadow.requests_per_second = 0;
    let server = start(config.clone()).await;
    let addr = mqtt_addr(&server);
    // The highest version each device saw accepted.
    let acknowledged: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let mut tasks = Vec::new();
    // Unbounded: test-only, one message per accepted update until shutdown.
    let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel::<usize>();
    for d in 0..DEVICES {
        let thing = format!("load-{d}");
        let acknowledged = Arc::clone(&acknowledged);
        let progress = progress_tx.clone();
        let mut dev = Device::connect(addr, &thing).await;
        dev.subscribe(&format!("$aws/things/{thing}/shadow/update/accepted"))
            .await;
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let body = json!({"state": {"reported": {"i": i}}}).to_string();
                let topic = format!("$aws/things/{thing}/shadow/update");
                let sent = dev
                    .client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, body)
                    .await;
                if sent.is_err() {
                    break;
                }
                let Ok(p) = dev.next_message().await else {
                    break;
                };
                let answer: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                if let Some(v) = answer["version"].as_u64() {
                    acknowledged.lock().await.insert(thing.clone(), v);
                    let _ = progress.send(d);
                }
            }
        }));
    }
    // Shut down once every device has had an update accepted, and the
    // fleet a few per device.
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    while seen.len() < DEVICES || total < DEVICES * 3 {
        seen.insert(progress.recv().await.expect("progress"));
        total += 1;
    }
    server.shutdown().await;
    for task in tasks {
        task.await.expect("device task");
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert_eq!(acknowledged.len(), DEVICES);

    config.mqtt.mqtt_v4 = Some(umbra_broker::ListenerSettings::local(0));
    let server = start(config).await;
    for (thing, version) in acknowledged {
        let key = umbra_shadow::ShadowKey::classic(thing.clone());
        let stored = server
            .service()
            .store()
            .load(&key)
            .expect("load")
            .expect("stored");
        assert!(
            stored.version >= version,
            "{thing}: acknowledged v{version}, stored v{}",
            stored.version
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_each_updating_twenty_times() {
    const DEVICES: usize = 1000;
    const UPDATES: u64 = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let addr = mqtt_addr(&server);
    let started = std::time::Instant::now();
    // Devices connect at most 64 at a time, as a fleet ramps up.
    let connecting = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        let connecting = Arc::clone(&connecting);
        tasks.push(tokio::spawn(async move {
            let thing = format!("fleet-{d:04}");
            let prefix = format!("$aws/things/{thing}/shadow");
            let permit = connecting.acquire().await.expect("semaphore");
            let mut dev = Device::connect(addr, &thing).await;
            dev.subscribe(&format!("{prefix}/#")).await;
            drop(permit);
            let mut versions = Vec::new();
            for i in 0..UPDATES {
                let body = json!({"state": {"reported": {"i": i}}, "clientToken": format!("u{i}")});
                dev.publish(&format!("{prefix}/update"), body.to_string())
                    .await;
                let accepted = dev.next_on(&format!("{prefix}/update/accepted")).await;
                assert_eq!(
                    accepted["clientToken"],
                    format!("u{i}"),
                    "{thing}: answers in order"
                );
                versions.push(accepted["version"].as_u64().unwrap_or(0));
            }
            // Exactly once: no second accepted answer before the final get.
            let (extra, last) = sync(&mut dev, &prefix, "end").await;
            let repeats: Vec<_> = extra
                .iter()
                .filter(|(t, _)| t.ends_with("/update/accepted"))
                .collect();
            assert!(repeats.is_empty(), "{thing}: duplicate answers {repeats:?}");
            assert_eq!(last["version"], UPDATES);
            dev.disconnect().await;
            versions
        }));
    }
    for task in tasks {
        let versions = task.await.expect("device");
        assert_eq!(
            versions,
            (1..=UPDATES).collect::<Vec<_>>(),
            "contiguous versions"
        );
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < std::time::Duration::from_secs(60),
        "took {elapsed:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_and_connectivity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.mqtt.edge.privileged_clients.insert("watcher".into());
    let server = start(config).await;
    let addr = mqtt_addr(&server);
    let mut watcher = Device::connect(addr, "watcher").await;
    watcher.subscribe("$aws/events/presence/#").await;

    let device = Device::connect(addr, "porch-light").await;
    let connected = watcher
        .next_on("$aws/events/presence/connected/porch-light")
        .await;
    assert_eq!(connected["clientId"], "porch-light");
    assert_eq!(connected["eventType"], "connected");
    let ts = connected["timestamp"].as_i64().expect("timestamp");
    assert!(ts > 1_600_000_000_000, "milliseconds: {ts}");

    device.disconnect().await;
    let disconnected = watcher
        .next_on("$aws/events/presence/disconnected/porch-light")
        .await;
    assert_eq!(disconnected["eventType"], "disconnected");
    assert_eq!(
        disconnected["sessionIdentifier"],
        connected["sessionIdentifier"]
    );

    // The store records connectivity once the change is committed: wait for
    // it on the change stream rather than polling.
    let mut changes = server.service().subscribe_changes();
    let store = std::sync::Arc::clone(server.service().store());
    let recorded = loop {
        if let Some(c) = store.connectivity("porch-light").expect("readable") {
            if !c.connected {
                break c;
            }
        }
        tokio::time::timeout(umbra_tests::WAIT, changes.recv())
            .await
            .expect("a change arrives")
            .expect("stream open");
    };
    assert!(recorded.last_seen_ms >= ts);
    server.shutdown().await;
}

/// Like AWS IoT's persistent sessions: a device that connected with clean
/// session 0 gets the delta published while it was offline when it comes
/// back, without asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_gets_the_delta_published_while_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let addr = mqtt_addr(&server);
    let delta = "$aws/things/sleepy/shadow/update/delta";
    let persistent = || {
        let mut options = rumqttc::MqttOptions::new("sleepy", addr.ip().to_string(), addr.port());
        options.set_keep_alive(std::time::Duration::from_secs(30));
        options.set_clean_session(false);
        options
    };
    let mut device = Device::connect_with(persistent()).await;
    device.subscribe(delta).await;
    device.client.disconnect().await.expect("disconnect queued");
    // Gone once the server saw it go.
    while device.next_packet(|_| false).await.is_ok() {}

    let answer = server
        .service()
        .handle(umbra_shadow::Request {
            key: umbra_shadow::ShadowKey::classic("sleepy".to_owned()),
            op: umbra_shadow::Operation::Update,
            payload: json!({"state": {"desired": {"mode": "eco"}}})
                .to_string()
                .into(),
            client: "operator".into(),
            user_properties: None,
        })
        .await;
    assert_eq!(answer.result, Ok(1));

    let mut device = Device::connect_with(persistent()).await;
    let body = device.next_on(delta).await;
    assert_eq!(body["state"]["mode"], "eco");
    assert_eq!(body["version"], 1);
    server.shutdown().await;
}

/// One device flooding shadow updates at QoS 0 as fast as its socket takes
/// them costs the others neither answers nor 429s: it is slowed down by its
/// own connection's request window and, once its thing's request rate is
/// used up, by its connection waiting until the rate allows the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_does_not_cost_the_others_answers() {
    const DEVICES: usize = 10;
    const UPDATES: u64 = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let addr = mqtt_addr(&server);

    let flooder = Device::connect(addr, "flood").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = json!({"state": {"reported": {"n": sent}}}).to_string();
                if flooder
                    .client
                    .publish(
                        "$aws/things/flood/shadow/update",
                        rumqttc::QoS::AtMostOnce,
                        false,
                        body,
                    )
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };

    let mut devices = Vec::new();
    for d in 0..DEVICES {
        let thing = format!("calm-{d}");
        let mut device = Device::connect(addr, &thing).await;
        device
            .subscribe(&format!("$aws/things/{thing}/shadow/update/+"))
            .await;
        devices.push(tokio::spawn(async move {
            for i in 1..=UPDATES {
                let token = format!("t{i}");
                device
                    .publish(
                        &format!("$aws/things/{thing}/shadow/update"),
                        json!({"state": {"reported": {"i": i}}, "clientToken": token}).to_string(),
                    )
                    .await;
                let answer = device
                    .next_on(&format!("$aws/things/{thing}/shadow/update/accepted"))
                    .await;
                assert_eq!(answer["clientToken"], token.as_str(), "{thing}: {answer}");
                assert_eq!(answer["version"], i, "{thing}");
            }
        }));
    }
    for device in devices {
        device.await.expect("every calm device got every answer");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.await.expect("flood task");
    assert!(sent > 0);
    let metrics = server.broker().expect("embedded broker").metrics();
    let load =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    let pauses = load(&metrics.rate_pauses);
    assert!(pauses > 0, "the flooder was slowed down ({sent} sent)");
    // Every request past the rate is refused once and then the connection
    // waits until the rate allows the next one, so the flooder's refusals
    // stay in step with its accepted updates (not one per request sent).
    let handed = load(&metrics.shadow_requests) - DEVICES as u64 * UPDATES;
    let accepted = server
        .service()
        .store()
        .load(&umbra_shadow::ShadowKey::classic("flood"))
        .expect("store read")
        .expect("the flooder's shadow exists")
        .version;
    // Requests still being handled count as refused here: the margin.
    let refused = handed - accepted;
    assert!(
        refused <= accepted + 32,
        "{refused} refused for {accepted} accepted ({sent} sent, {pauses} pauses)"
    );
    server.shutdown().await;
}

/// MQTT 5 request/response: a shadow request with a response topic gets its
/// reply there as well, with the request's correlation data and user
/// properties; a response topic the device may not publish to closes the
/// connection with DISCONNECT 0x87, as any forbidden publish does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_request_gets_its_reply_on_its_response_topic() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let mut device = Device5::connect(mqtt_addr(&server), "lamp-5").await;
    for filter in ["things/lamp-5/replies", "$aws/things/lamp-5/replies"] {
        device.subscribe(filter).await;
    }
    let request = |response_topic: &str, correlation: &'static [u8]| PublishProperties {
        response_topic: Some(response_topic.into()),
        correlation_data: Some(correlation.into()),
        user_properties: vec![("trace".into(), "t-9".into())],
        ..PublishProperties::default()
    };

    let cases = [
        (
            "$aws/things/lamp-5/shadow/update",
            r#"{"state":{"reported":{"on":true}}}"#,
            "things/lamp-5/replies",
            &b"c-1"[..],
        ),
        (
            "$aws/things/lamp-5/shadow/get",
            "{}",
            "$aws/things/lamp-5/replies",
            &b"c-2"[..],
        ),
    ];
    for (topic, payload, response_topic, correlation) in cases {
        device
            .publish(topic, payload, request(response_topic, correlation))
            .await;
        let reply = device.next_publish().await;
        assert_eq!(reply.topic.as_ref(), response_topic.as_bytes());
        let body: Value = serde_json::from_slice(&reply.payload).expect("JSON");
        assert_eq!(body["state"]["reported"]["on"], true, "{body}");
        let props = reply.properties.expect("properties");
        assert_eq!(props.correlation_data.as_deref(), Some(correlation));
        assert_eq!(
            props.user_properties,
            vec![("trace".to_string(), "t-9".to_string())]
        );
    }

    device
        .publish(
            "$aws/things/lamp-5/shadow/get",
            "{}",
            request("$aws/things/lamp-6/replies", b"c-3"),
        )
        .await;
    // rumqttc reports the server's DISCONNECT as the end of its connection.
    let ended = device.next(|_| false).await.expect_err("disconnected");
    assert!(ended.contains("NotAuthorized"), "{ended}");
    server.shutdown().await;
}

/// MQTT 5 user properties on a shadow request come back on its reply
/// (`/accepted` or `/rejected`), and only there: `/documents` and `/delta`,
/// which other subscribers get, carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_requests_user_properties_come_back_on_its_reply() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let mut device = Device5::connect(mqtt_addr(&server), "lamp-7").await;
    let shadow = "$aws/things/lamp-7/shadow";
    for answer in ["update/accepted", "update/rejected", "update/documents"] {
        device.subscribe(&format!("{shadow}/{answer}")).await;
    }
    let traced = |trace: &str| PublishProperties {
        user_properties: vec![("trace".into(), trace.into())],
        ..PublishProperties::default()
    };
    let trace_of = |publish: &rumqttc::v5::mqttbytes::v5::Publish| {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let pairs = publish
            .properties
            .as_ref()
            .map(|p| p.user_properties.clone())
            .unwrap_or_default();
        (topic, pairs)
    };

    let update = format!("{shadow}/update");
    device
        .publish(
            &update,
            r#"{"state":{"reported":{"on":true}}}"#,
            traced("t-1"),
        )
        .await;
    let mut got = vec![
        trace_of(&device.next_publish().await),
        trace_of(&device.next_publish().await),
    ];
    got.sort();
    let pair = |trace: &str| vec![("trace".to_string(), trace.to_string())];
    assert_eq!(
        got,
        [
            (format!("{shadow}/update/accepted"), pair("t-1")),
            (format!("{shadow}/update/documents"), vec![]),
        ]
    );

    device.publish(&update, "not json", traced("t-2")).await;
    assert_eq!(
        trace_of(&device.next_publish().await),
        (format!("{shadow}/update/rejected"), pair("t-2"))
    );
    server.shutdown().await;
}
