//! End-to-end tests of the embedded broker with real MQTT clients (rumqttc)
//! on free ports. Every wait is on an observable event with a timeout.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;
use tokio::time::timeout;
use umbra_broker::embedded::ListenerKind;
use umbra_broker::{
    start, BrokerSettings, ChannelShadowSink, EdgeHooks, ListenerSettings, PresenceEvent,
    RunningBroker, ShadowInbox,
};

const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    broker: RunningBroker,
    inbox: ShadowInbox,
    presence: mpsc::Receiver<PresenceEvent>,
}

fn settings() -> BrokerSettings {
    let mut settings = BrokerSettings {
        mqtt_v4: Some(ListenerSettings::local(0)),
        mqtt_v5: Some(ListenerSettings::local(0)),
        websocket: Some(ListenerSettings::local(0)),
        ..BrokerSettings::default()
    };
    settings.router.max_connections = 200;
    settings
}

fn start_broker(settings: BrokerSettings) -> Harness {
    let (sink, inbox) = ChannelShadowSink::channel(64, 8);
    let (presence_tx, presence) = mpsc::channel(64);
    let hooks = EdgeHooks {
        shadow_sink: Arc::new(sink),
        presence: Some(presence_tx),
    };
    let broker = start(settings, hooks).expect("broker starts");
    Harness {
        broker,
        inbox,
        presence,
    }
}

/// A v4 client whose event loop runs in a task; incoming packets (or the
/// final error) arrive on `events`.
struct Client {
    client: AsyncClient,
    // Unbounded: test-only, the test drains it.
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
}

fn connect(id: &str, port: u16, keep_alive: Duration) -> Client {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(keep_alive);
    connect_with(options)
}

fn connect_with(options: MqttOptions) -> Client {
    let (client, eventloop) = AsyncClient::new(options, 512);
    Client {
        client,
        events: pump(eventloop),
    }
}

fn pump(mut eventloop: EventLoop) -> mpsc::UnboundedReceiver<Result<Packet, String>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(packet)) => {
                    if tx.send(Ok(packet)).is_err() {
                        break;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    tx.send(Err(e.to_string())).ok();
                    break;
                }
            }
        }
    });
    rx
}

impl Client {
    async fn next(&mut self) -> Result<Packet, String> {
        match timeout(WAIT, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => Err("event loop ended".into()),
            Err(_) => panic!("no event within {WAIT:?}"),
        }
    }

    /// Waits for a packet matching `pick`, skipping others.
    async fn wait_for<T>(&mut self, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
        loop {
            let packet = self.next().await.expect("connection stays up");
            if let Some(found) = pick(&packet) {
                return found;
            }
        }
    }

    async fn connected(&mut self) {
        self.wait_for(|p| matches!(p, Packet::ConnAck(_)).then_some(()))
            .await;
    }

    async fn subscribe(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queued");
        self.wait_for(|p| match p {
            Packet::SubAck(ack) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await
    }

    async fn publish(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .expect("queued");
    }

    async fn next_publish(&mut self) -> (String, String) {
        self.wait_for(|p| match p {
            Packet::Publish(p) => Some((
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )),
            _ => None,
        })
        .await
    }

    /// Waits until the broker closes the connection.
    async fn closed(&mut self) {
        loop {
            if self.next().await.is_err() {
                return;
            }
        }
    }
}

async fn shadow_request(inbox: &mut ShadowInbox) -> umbra_broker::ShadowPublish {
    timeout(WAIT, inbox.requests.recv())
        .await
        .expect("a shadow request in time")
        .expect("sink open")
}

fn port(broker: &RunningBroker, kind: ListenerKind) -> u16 {
    let addrs = broker.addrs();
    let addr = match kind {
        ListenerKind::MqttV4 => addrs.mqtt_v4,
        ListenerKind::MqttV5 => addrs.mqtt_v5,
        ListenerKind::WebSocket => addrs.websocket,
    };
    addr.expect("listener configured").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_request_and_answer_round_trip_on_aws_topics() {
    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut dev = connect("dev1", port, Duration::from_secs(30));
    dev.connected().await;
    let codes = dev
        .subscribe("$aws/things/dev1/shadow/update/accepted")
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    dev.publish(
        "$aws/things/dev1/shadow/update",
        r#"{"state":{"reported":{"on":true}}}"#,
    )
    .await;
    let request = shadow_request(&mut h.inbox).await;
    assert_eq!(request.client_id, "dev1");
    assert_eq!(request.topic, "$aws/things/dev1/shadow/update");
    assert_eq!(request.request.key.thing, "dev1");
    assert_eq!(
        request.payload.as_ref(),
        br#"{"state":{"reported":{"on":true}}}"#
    );

    h.broker
        .publisher()
        .publish("$aws/things/dev1/shadow/update/accepted", "accepted!")
        .await
        .expect("published");
    let (topic, payload) = dev.next_publish().await;
    assert_eq!(topic, "$aws/things/dev1/shadow/update/accepted");
    assert_eq!(payload, "accepted!");

    h.broker.shutdown(WAIT).await;
}

/// `#` must never deliver `$aws` answers, and the synthetic acks for the
/// suppressed QoS 1 copies must keep the subscriber flowing well past
/// rumqttd's 100-message inflight limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscriber_never_sees_aws_answers_and_keeps_flowing() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut dev = connect("dev1", port, Duration::from_secs(30));
    dev.connected().await;
    dev.subscribe("$aws/things/dev1/shadow/update/accepted")
        .await;
    let mut spy = connect("spy", port, Duration::from_secs(30));
    spy.connected().await;
    assert_eq!(
        spy.subscribe("#").await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    const ANSWERS: usize = 350;
    let publisher = h.broker.publisher();
    for round in 0..3 {
        dev.publish("telemetry/dev1", &format!("t{round}")).await;
        // Wait for the telemetry so that answers and telemetry interleave in
        // the spy's stream in a known order.
        let (topic, payload) = spy.next_publish().await;
        assert_eq!(
            (topic.as_str(), payload.as_str()),
            ("telemetry/dev1", &*format!("t{round}"))
        );
        for n in 0..ANSWERS / 3 {
            publisher
                .publish("$aws/things/dev1/shadow/update/accepted", format!("a{n}"))
                .await
                .expect("published");
        }
    }
    dev.publish("telemetry/dev1", "last").await;
    let (topic, payload) = spy.next_publish().await;
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("telemetry/dev1", "last")
    );

    // The device itself received every answer on its `$aws` topic.
    for _ in 0..(ANSWERS / 3) * 3 {
        let (topic, _) = dev.next_publish().await;
        assert_eq!(topic, "$aws/things/dev1/shadow/update/accepted");
    }
    let metrics = h.broker.metrics();
    assert!(metrics.synthetic_acks.load(Ordering::Relaxed) >= ((ANSWERS / 3) * 3) as u64);
    assert!(h.broker.router_alive());
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut dev = connect("ka0", port, Duration::ZERO);
    dev.connected().await;
    dev.subscribe("ka0/echo").await;
    dev.publish("ka0/echo", "hello").await;
    assert_eq!(
        dev.next_publish().await,
        ("ka0/echo".into(), "hello".into())
    );
    assert_eq!(
        h.broker
            .metrics()
            .keep_alive_zero_rewrites
            .load(Ordering::Relaxed),
        1
    );
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_another_things_shadow_disconnects() {
    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut dev = connect("dev1", port, Duration::from_secs(30));
    dev.connected().await;
    dev.publish("$aws/things/dev2/shadow/update", "{}").await;
    dev.closed().await;
    assert!(h.inbox.requests.try_recv().is_err());
    assert_eq!(h.broker.metrics().forbidden.load(Ordering::Relaxed), 1);
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_another_things_topics_disconnects() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut dev = connect("dev1", port, Duration::from_secs(30));
    dev.connected().await;
    dev.client
        .subscribe("$aws/things/other/shadow/update/accepted", QoS::AtLeastOnce)
        .await
        .expect("queued");
    dev.closed().await;
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_dollar_filter_gets_a_failure_suback() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut dev = connect("dev1", port, Duration::from_secs(30));
    dev.connected().await;
    assert_eq!(
        dev.subscribe("$SYS/#").await,
        vec![SubscribeReasonCode::Failure]
    );
    // Still connected and working.
    dev.subscribe("dev1/echo").await;
    dev.publish("dev1/echo", "still here").await;
    assert_eq!(dev.next_publish().await.1, "still here");
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_listener_serves_the_shadow_topics() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV5);
    let mut options = Options5::new("dev5", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = Client5::new(options, 64);
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event5::Incoming(packet) = event {
                if tx.send(packet).is_err() {
                    break;
                }
            }
        }
    });
    async fn next_of(rx: &mut mpsc::UnboundedReceiver<Packet5>) -> Packet5 {
        timeout(WAIT, rx.recv())
            .await
            .expect("event in time")
            .expect("connection up")
    }
    assert!(matches!(next_of(&mut rx).await, Packet5::ConnAck(_)));
    client
        .subscribe("$aws/things/dev5/shadow/get/accepted", QoS5::AtLeastOnce)
        .await
        .expect("queued");
    while !matches!(next_of(&mut rx).await, Packet5::SubAck(_)) {}
    client
        .publish(
            "$aws/things/dev5/shadow/get",
            QoS5::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .expect("queued");
    let request = shadow_request(&mut h.inbox).await;
    assert_eq!(request.client_id, "dev5");
    h.broker
        .publisher()
        .publish("$aws/things/dev5/shadow/get/accepted", "doc")
        .await
        .expect("published");
    loop {
        if let Packet5::Publish(p) = next_of(&mut rx).await {
            assert_eq!(p.topic.as_ref(), b"$aws/things/dev5/shadow/get/accepted");
            assert_eq!(p.payload.as_ref(), b"doc");
            break;
        }
    }
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_follow_connect_and_disconnect() {
    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut dev = connect("dev-p", port, Duration::from_secs(30));
    dev.connected().await;
    let event = timeout(WAIT, h.presence.recv()).await.expect("in time");
    let Some(PresenceEvent::Connected { client_id, session }) = event else {
        panic!("expected Connected, got {event:?}");
    };
    assert_eq!(client_id, "dev-p");

    dev.client.disconnect().await.expect("queued");
    let event = timeout(WAIT, h.presence.recv()).await.expect("in time");
    assert_eq!(
        event,
        Some(PresenceEvent::Disconnected {
            client_id: "dev-p".into(),
            session
        })
    );
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_stops_accepting() {
    let mut h = start_broker(settings());
    let addr = h.broker.addrs().mqtt_v4.expect("v4 listener");
    let mut dev = connect("dev-s", addr.port(), Duration::from_secs(30));
    dev.connected().await;
    assert!(matches!(
        timeout(WAIT, h.presence.recv()).await.expect("in time"),
        Some(PresenceEvent::Connected { .. })
    ));

    timeout(WAIT, h.broker.shutdown(Duration::from_secs(5)))
        .await
        .expect("shutdown returns");
    dev.closed().await;
    assert!(matches!(
        timeout(WAIT, h.presence.recv()).await.expect("in time"),
        Some(PresenceEvent::Disconnected { .. })
    ));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_required_when_configured() {
    let mut settings = settings();
    settings.auth = Some(umbra_broker::embedded::Credentials {
        username: "umbra".into(),
        password: "secret".into(),
    });
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);

    // Refused with CONNACK code 4, not a silently closed socket.
    let mut anonymous = connect("anon", port, Duration::from_secs(30));
    let refused = loop {
        if let Err(e) = anonymous.next().await {
            break e;
        }
    };
    assert!(refused.contains("BadUserNamePassword"), "{refused}");

    let mut options = MqttOptions::new("authed", "127.0.0.1", port);
    options.set_credentials("umbra", "secret");
    let mut authed = connect_with(options);
    authed.connected().await;
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_listener_upgrades_to_mqtt() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let h = start_broker(settings());
    let addr = h.broker.addrs().websocket.expect("ws listener");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("sent");
    let mut response = vec![0u8; 512];
    let n = timeout(WAIT, stream.read(&mut response))
        .await
        .expect("in time")
        .expect("read");
    let response = String::from_utf8_lossy(&response[..n]);
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    h.broker.shutdown(WAIT).await;
}

#[test]
fn anonymous_remote_listener_is_refused_by_the_guard() {
    let mut settings = settings();
    settings.mqtt_v5 = Some(ListenerSettings {
        addr: "0.0.0.0:0".parse().expect("addr"),
        tls: None,
    });
    let err = settings.validate().expect_err("refused");
    assert!(err.to_string().contains("mqtt-v5"), "{err}");
    settings.allow_anonymous_remote = true;
    settings.validate().expect("explicitly allowed");
}
