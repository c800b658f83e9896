//! End-to-end tests of Umbra's connection layer with real MQTT clients
//! (rumqttc 3.1.1 and 5, and raw packets for what a well-behaved client never
//! sends) on free ports. Every wait is on an observable event with a timeout.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::{MqttOptions, Packet, QoS, SubscribeReasonCode};
use rumqttd::protocol::{
    self as wire, ConnAck, Connect, ConnectReturnCode, Login, Packet as WirePacket,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use umbra_broker::codec::Codec;
use umbra_broker::embedded::ListenerKind;
use umbra_broker::requests::Submitted;
use umbra_broker::{
    start, BrokerSettings, EdgeHooks, EdgeMetrics, ListenerSettings, PresenceEvent, Publisher,
    RunningBroker, ShadowPublish, ShadowRequests,
};
use umbra_tests::{Device, WAIT};

/// Records every shadow request and answers it at once.
struct Recorder {
    // Unbounded: test-only, the test drains it.
    requests: mpsc::UnboundedSender<ShadowPublish>,
}

impl ShadowRequests for Recorder {
    fn submit(&self, request: ShadowPublish) -> Submitted {
        let _ignored_when_the_test_ended = self.requests.send(request);
        Submitted::answered(async { None })
    }
}

struct Harness {
    broker: RunningBroker,
    requests: mpsc::UnboundedReceiver<ShadowPublish>,
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
    let (tx, requests) = mpsc::unbounded_channel();
    let (presence_tx, presence) = mpsc::channel(64);
    let hooks = EdgeHooks {
        shadow: Arc::new(Recorder { requests: tx }),
        publisher: Publisher::new(Arc::new(EdgeMetrics::default())),
        presence: Some(presence_tx),
    };
    let broker = start(settings, hooks).expect("broker starts");
    Harness {
        broker,
        requests,
        presence,
    }
}

/// A v4 client whose event loop runs in a task; incoming packets (or the
/// final error) arrive on `events`.
fn connect(id: &str, port: u16, keep_alive: Duration) -> Device {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(keep_alive);
    connect_with(options)
}

/// A client on its way to connecting ([`Device::connected`] waits for the
/// CONNACK).
fn connect_with(options: MqttOptions) -> Device {
    Device::open(options)
}

async fn shadow_request(h: &mut Harness) -> ShadowPublish {
    timeout(WAIT, h.requests.recv())
        .await
        .expect("a shadow request in time")
        .expect("recorder alive")
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

/// A client speaking raw MQTT 3.1.1 packets, for what rumqttc never sends.
struct Raw {
    stream: TcpStream,
    read: BytesMut,
    codec: Codec,
}

impl Raw {
    async fn connect(port: u16, client_id: &str) -> Raw {
        Raw::connect_with(port, connect_packet(client_id)).await
    }

    /// The same, speaking MQTT 5 (rumqttc ends its connection on an UNSUBACK
    /// that reports a failure, so such answers are read raw).
    async fn connect_v5(port: u16, client_id: &str) -> Raw {
        Raw::open(port, connect_packet(client_id), Codec::V5).await
    }

    async fn connect_with(port: u16, connect: WirePacket) -> Raw {
        Raw::open(port, connect, Codec::V4).await
    }

    async fn open(port: u16, connect: WirePacket, codec: Codec) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("tcp connect");
        let mut raw = Raw {
            stream,
            read: BytesMut::new(),
            codec,
        };
        raw.send(connect).await;
        raw
    }

    async fn send(&mut self, packet: WirePacket) {
        self.send_all(vec![packet]).await;
    }

    /// Sends `packets` with one write, so that the server reads them together.
    async fn send_all(&mut self, packets: Vec<WirePacket>) {
        let mut out = BytesMut::new();
        for packet in packets {
            self.codec.write(packet, &mut out).expect("encodes");
        }
        self.stream.write_all(&out).await.expect("sent");
    }

    /// Reads what the server sent next; false once it closed the connection.
    async fn read_more(&mut self) -> bool {
        let read = timeout(WAIT, self.stream.read_buf(&mut self.read))
            .await
            .expect("the server answers or closes in time");
        matches!(read, Ok(n) if n > 0)
    }

    /// The next packet from an MQTT 5 connection, read with rumqttc's client
    /// codec (Umbra's reads only what clients send).
    async fn next_v5(&mut self) -> Option<rumqttc::v5::mqttbytes::v5::Packet> {
        use rumqttc::v5::mqttbytes::{v5::Packet as Packet5, Error as Error5};
        loop {
            match Packet5::read(&mut self.read, Some(1 << 20)) {
                Ok(packet) => return Some(packet),
                Err(Error5::InsufficientBytes(_)) => {}
                Err(e) => panic!("server sent garbage: {e}"),
            }
            if !self.read_more().await {
                return None;
            }
        }
    }

    /// Reads an MQTT 5 connection until the server closes it; the last
    /// packet it sent (its DISCONNECT, if it sent one).
    async fn last_v5(&mut self) -> Option<rumqttc::v5::mqttbytes::v5::Packet> {
        let mut last = None;
        while let Some(packet) = self.next_v5().await {
            last = Some(packet);
        }
        last
    }

    /// The next packet, or `None` once the server closed the connection.
    async fn next(&mut self) -> Option<WirePacket> {
        loop {
            match Codec::V4.read(&mut self.read, 1 << 20) {
                Ok(packet) => return Some(packet),
                Err(wire::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("server sent garbage: {e}"),
            }
            if !self.read_more().await {
                return None;
            }
        }
    }

    async fn connack(&mut self) -> ConnAck {
        match self.next().await {
            Some(WirePacket::ConnAck(ack, _)) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn closed(&mut self) {
        while let Some(packet) = self.next().await {
            assert!(
                !matches!(packet, WirePacket::PubAck(..)),
                "nothing is acknowledged: {packet:?}"
            );
        }
    }
}

fn connect_packet(client_id: &str) -> WirePacket {
    WirePacket::Connect(
        Connect {
            keep_alive: 30,
            client_id: client_id.to_owned(),
            clean_session: true,
        },
        None,
        None,
        None,
        None::<Login>,
    )
}

/// A SUBSCRIBE of one filter.
fn raw_subscribe(pkid: u16, filter: &str, qos: wire::QoS) -> WirePacket {
    subscribe_with(pkid, filter, |f| f.qos = qos)
}

/// A SUBSCRIBE of one filter at QoS 1 with the default options (retained
/// messages on every subscribe), changed by `edit`.
fn subscribe_with(pkid: u16, filter: &str, edit: impl FnOnce(&mut wire::Filter)) -> WirePacket {
    let mut filter = wire::Filter {
        path: filter.to_owned(),
        qos: wire::QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: wire::RetainForwardRule::OnEverySubscribe,
    };
    edit(&mut filter);
    WirePacket::Subscribe(
        wire::Subscribe {
            pkid,
            filters: vec![filter],
        },
        None,
    )
}

fn raw_publish(topic: &str, qos: wire::QoS, pkid: u16) -> WirePacket {
    let mut publish = wire::Publish::new(
        Bytes::from(topic.to_owned()),
        Bytes::from_static(b"x"),
        false,
    );
    publish.qos = qos;
    publish.pkid = pkid;
    WirePacket::Publish(publish, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_requests_reach_the_service_and_answers_arrive_at_the_subscription_qos() {
    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut dev = connect("dev1", port, Duration::from_secs(30));
    dev.connected().await;
    let codes = dev
        .subscribe("$aws/things/dev1/shadow/update/accepted")
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let codes = dev
        .subscribe_at("$aws/things/dev1/shadow/get/accepted", QoS::AtMostOnce)
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]);

    dev.publish(
        "$aws/things/dev1/shadow/update",
        r#"{"state":{"reported":{"on":true}}}"#,
    )
    .await;
    let request = shadow_request(&mut h).await;
    assert_eq!(request.client_id, "dev1");
    assert_eq!(request.request.key.thing, "dev1");
    assert_eq!(
        request.payload.as_ref(),
        br#"{"state":{"reported":{"on":true}}}"#
    );

    let publisher = h.broker.publisher();
    let accepted = "$aws/things/dev1/shadow/update/accepted";
    assert_eq!(publisher.publish(accepted, Bytes::from("accepted!")), Ok(1));
    let publish = dev.next_publish().await;
    assert_eq!(publish.topic, accepted);
    assert_eq!(publish.payload.as_ref(), b"accepted!");
    assert_eq!(publish.qos, QoS::AtLeastOnce, "QoS 1 to a QoS 1 subscriber");
    assert_ne!(publish.pkid, 0);

    let got = "$aws/things/dev1/shadow/get/accepted";
    assert_eq!(publisher.publish(got, Bytes::from("doc")), Ok(1));
    let publish = dev.next_publish().await;
    assert_eq!(publish.topic, got);
    assert_eq!(publish.qos, QoS::AtMostOnce, "QoS 0 to a QoS 0 subscriber");

    h.broker.shutdown(WAIT).await;
}

/// `#` carries router traffic only: `$aws` messages never reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_subscriber_never_sees_aws_messages() {
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
    let publisher = h.broker.publisher();
    for n in 0..300 {
        publisher
            .publish(
                "$aws/things/dev1/shadow/update/accepted",
                Bytes::from(format!("a{n}")),
            )
            .expect("aws topic");
    }
    dev.publish("telemetry/dev1", "last").await;
    let publish = spy.next_publish().await;
    assert_eq!(publish.topic, "telemetry/dev1");
    assert_eq!(publish.payload.as_ref(), b"last");
    for n in 0..300 {
        let publish = dev.next_publish().await;
        assert_eq!(publish.payload, format!("a{n}").into_bytes(), "in order");
    }
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
    assert_eq!(dev.next_publish().await.payload.as_ref(), b"hello");
    assert_eq!(
        h.broker.metrics().keep_alive_zero.load(Ordering::Relaxed),
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
    assert!(h.requests.try_recv().is_err());
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
    assert_eq!(dev.next_publish().await.payload.as_ref(), b"still here");
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_and_5_clients_share_one_port() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut v4 = connect("dev4", port, Duration::from_secs(30));
    v4.connected().await;
    v4.subscribe("fleet/news").await;

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
    let request = shadow_request(&mut h).await;
    assert_eq!(request.client_id, "dev5");
    h.broker
        .publisher()
        .publish("$aws/things/dev5/shadow/get/accepted", Bytes::from("doc"))
        .expect("aws topic");
    loop {
        if let Packet5::Publish(p) = next_of(&mut rx).await {
            assert_eq!(p.topic.as_ref(), b"$aws/things/dev5/shadow/get/accepted");
            assert_eq!(p.payload.as_ref(), b"doc");
            break;
        }
    }
    // And MQTT 5 to 3.1.1 through the router.
    client
        .publish("fleet/news", QoS5::AtLeastOnce, false, "from v5")
        .await
        .expect("queued");
    assert_eq!(v4.next_publish().await.payload.as_ref(), b"from v5");
    // MQTT 5 properties are left out for an MQTT 3.1.1 subscriber (its
    // protocol has no place for them), and the message still arrives.
    let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("origin".into(), "v5".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    client
        .publish_with_properties(
            "fleet/news",
            QoS5::AtLeastOnce,
            false,
            "with properties",
            properties,
        )
        .await
        .expect("queued");
    assert_eq!(v4.next_publish().await.payload.as_ref(), b"with properties");
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
    assert!(TcpStream::connect(addr).await.is_err());
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
    assert_eq!(
        h.broker.metrics().connects_refused.load(Ordering::Relaxed),
        1
    );
    h.broker.shutdown(WAIT).await;
}

async fn websocket_upgrade(addr: std::net::SocketAddr, protocol_header: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         {protocol_header}\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("sent");
    let mut response = vec![0u8; 1024];
    let n = timeout(WAIT, stream.read(&mut response))
        .await
        .expect("in time")
        .expect("read");
    String::from_utf8_lossy(&response[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_answers_the_offered_subprotocol_and_refuses_none() {
    let h = start_broker(settings());
    let addr = h.broker.addrs().websocket.expect("ws listener");
    let response = websocket_upgrade(addr, "Sec-WebSocket-Protocol: mqttv3.1, mqtt\r\n").await;
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol: mqttv3.1"),
        "{response}"
    );
    let response = websocket_upgrade(addr, "Sec-WebSocket-Protocol: mqtt\r\n").await;
    assert!(
        response
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol: mqtt\r\n"),
        "{response}"
    );
    let response = websocket_upgrade(addr, "").await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_closes_the_connection() {
    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut raw = Raw::connect(port, "twice").await;
    assert_eq!(raw.connack().await.code, ConnectReturnCode::Success);
    let Some(PresenceEvent::Connected { session, .. }) =
        timeout(WAIT, h.presence.recv()).await.expect("in time")
    else {
        panic!("connected first");
    };
    raw.send(connect_packet("twice")).await;
    raw.closed().await;
    assert_eq!(
        timeout(WAIT, h.presence.recv()).await.expect("in time"),
        Some(PresenceEvent::Disconnected {
            client_id: "twice".into(),
            session
        })
    );
    assert_eq!(
        h.broker.metrics().protocol_errors.load(Ordering::Relaxed),
        1
    );
    h.broker.shutdown(WAIT).await;
}

/// Packets only a server sends, from an MQTT 5 client, close its
/// connection as a protocol error, and the connection ends as every
/// connection does (rumqttd's MQTT 5 reader once panicked on a CONNACK or
/// UNSUBACK with a body, which skipped the end: found by the fuzzer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_only_a_server_sends_closes_the_connection() {
    use rumqttc::v5::mqttbytes::v5::{
        DisconnectReasonCode as DisconnectReasonCode5, Packet as Packet5,
    };
    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let server_only = [
        WirePacket::ConnAck(
            wire::ConnAck {
                session_present: false,
                code: wire::ConnectReturnCode::Success,
            },
            None,
        ),
        WirePacket::UnsubAck(
            wire::UnsubAck {
                pkid: 1,
                reasons: vec![wire::UnsubAckReason::Success],
            },
            None,
        ),
    ];
    for (n, packet) in server_only.into_iter().enumerate() {
        let client_id = format!("impostor-{n}");
        let mut raw = Raw::connect_v5(port, &client_id).await;
        assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(..))));
        let Some(PresenceEvent::Connected { session, .. }) =
            timeout(WAIT, h.presence.recv()).await.expect("in time")
        else {
            panic!("connected first");
        };
        raw.send(packet).await;
        let last = raw.last_v5().await;
        assert!(
            matches!(&last, Some(Packet5::Disconnect(d)) if d.reason_code == DisconnectReasonCode5::ProtocolError),
            "{last:?}"
        );
        assert_eq!(
            timeout(WAIT, h.presence.recv()).await.expect("in time"),
            Some(PresenceEvent::Disconnected { client_id, session })
        );
    }
    assert_eq!(
        h.broker.metrics().protocol_errors.load(Ordering::Relaxed),
        2
    );
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_a_wildcard_topic_closes_the_connection() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut spy = connect("spy", port, Duration::from_secs(30));
    spy.connected().await;
    spy.subscribe("dt/#").await;
    for topic in ["dt/+/x", "dt/#"] {
        let mut raw = Raw::connect(port, "wild").await;
        assert_eq!(raw.connack().await.code, ConnectReturnCode::Success);
        raw.send(raw_publish(topic, wire::QoS::AtLeastOnce, 7))
            .await;
        raw.closed().await;
    }
    // Nothing was delivered: the next message the spy sees is this one.
    let mut dev = connect("dev", port, Duration::from_secs(30));
    dev.connected().await;
    dev.publish("dt/ok", "fine").await;
    assert_eq!(spy.next_publish().await.topic, "dt/ok");
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlong_client_id_is_refused_as_identifier_rejected() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut raw = Raw::connect(port, &"x".repeat(129)).await;
    assert_eq!(
        raw.connack().await.code,
        ConnectReturnCode::ClientIdentifierNotValid
    );
    raw.closed().await;
    let mut raw = Raw::connect(port, &"x".repeat(128)).await;
    assert_eq!(raw.connack().await.code, ConnectReturnCode::Success);
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_beyond_the_limit_are_refused() {
    let mut settings = settings();
    settings.connection.max_subscriptions = 3;
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut dev = connect("dev1", port, Duration::from_secs(30));
    dev.connected().await;
    let filters = [
        "$aws/things/dev1/shadow/get/accepted",
        "$aws/things/dev1/shadow/get/rejected",
        "telemetry/a",
        "telemetry/b",
    ];
    let subscribe = rumqttc::Subscribe::new_many(
        filters.map(|f| rumqttc::SubscribeFilter::new(f.to_owned(), QoS::AtLeastOnce)),
    );
    dev.client
        .subscribe_many(subscribe.filters)
        .await
        .expect("queued");
    let codes = dev
        .wait_for(|p| match p {
            Packet::SubAck(ack) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
        ]
    );
    // Re-subscribing to a held filter is not a new subscription.
    assert_eq!(
        dev.subscribe("telemetry/a").await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_with_the_same_client_id_takes_over() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut first = connect("dev1", port, Duration::from_secs(30));
    first.connected().await;
    first
        .subscribe("$aws/things/dev1/shadow/get/accepted")
        .await;
    let mut second = connect("dev1", port, Duration::from_secs(30));
    second.connected().await;
    first.closed().await;
    second
        .subscribe("$aws/things/dev1/shadow/get/accepted")
        .await;
    h.broker
        .publisher()
        .publish("$aws/things/dev1/shadow/get/accepted", Bytes::from("doc"))
        .expect("aws topic");
    assert_eq!(second.next_publish().await.payload.as_ref(), b"doc");
    h.broker.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_gets_what_was_published_while_it_was_away() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let delta = "$aws/things/dev1/shadow/update/delta";
    let persistent = || {
        let mut options = MqttOptions::new("dev1", "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(false);
        connect_with(options)
    };
    let mut dev = persistent();
    assert!(!dev.connected().await, "no session yet");
    dev.subscribe(delta).await;
    dev.client.disconnect().await.expect("queued");
    dev.closed().await;
    // Parked once the connection's task has ended.
    parked(&h).await;

    let publisher = h.broker.publisher();
    assert_eq!(publisher.publish(delta, Bytes::from("d1")), Ok(1));
    assert_eq!(
        publisher.publish_at(
            delta,
            Bytes::from("lost"),
            rumqttd::protocol::QoS::AtMostOnce
        ),
        Ok(0),
        "QoS 0 is not kept for an offline session"
    );
    let mut dev = persistent();
    assert!(dev.connected().await, "session present");
    let publish = dev.next_publish().await;
    assert_eq!(
        (publish.topic.as_str(), publish.payload.as_ref()),
        (delta, &b"d1"[..])
    );
    assert_eq!(publish.qos, QoS::AtLeastOnce);

    // A clean connection ends the session: nothing is kept for it any more.
    dev.client.disconnect().await.expect("queued");
    dev.closed().await;
    let mut clean = connect("dev1", port, Duration::from_secs(30));
    assert!(!clean.connected().await);
    assert_eq!(publisher.publish(delta, Bytes::from("d2")), Ok(0));
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

/// Router traffic is delivered at min(publish QoS, subscription QoS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_messages_arrive_at_the_lower_of_publish_and_subscription_qos() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut sub = connect("sub", port, Duration::from_secs(30));
    sub.connected().await;
    sub.subscribe("fleet/q").await;
    let mut sub2 = connect("sub2", port, Duration::from_secs(30));
    sub2.connected().await;
    sub2.subscribe_at("fleet/q", QoS::ExactlyOnce).await;
    let publisher = connect("pub", port, Duration::from_secs(30));
    // Twice: the second round shows each QoS 2 exchange completed (the
    // router and rumqttc keep a packet id until its PUBCOMP).
    for round in 0..2 {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let payload = format!("{qos:?} {round}");
            publisher
                .client
                .publish("fleet/q", qos, false, payload.clone())
                .await
                .expect("queued");
            let got = sub.next_publish().await;
            assert_eq!(got.payload, payload.clone().into_bytes());
            let expected = match qos {
                QoS::AtMostOnce => QoS::AtMostOnce,
                _ => QoS::AtLeastOnce,
            };
            assert_eq!(got.qos, expected, "published at {qos:?}, subscribed at 1");
            let got = sub2.next_publish().await;
            assert_eq!(got.payload, payload.into_bytes());
            assert_eq!(got.qos, qos, "published at {qos:?}, subscribed at 2");
        }
    }
    h.broker.shutdown(WAIT).await;
}

/// A device added to the password file can connect within the file check
/// interval, without a restart; one removed cannot any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_file_is_reloaded_when_it_changes() {
    use umbra_broker::auth::PasswordFile;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("passwd");
    let cheap = || argon2::Params::new(64, 1, 1, None).expect("params");
    PasswordFile::set(&path, "lamp-1", "one", cheap()).expect("set");
    let mut settings = settings();
    settings.password_file = Some(path.clone());
    settings.password_file_check_ms = 10;
    // This test fails logins until the reload: not a guessing attack.
    settings.addresses.max_failed_logins = 0;
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    let answer = |id: &'static str, password: &'static str| async move {
        let mut raw = Raw::connect_with(port, login_packet(id, password)).await;
        raw.connack().await.code
    };
    assert_eq!(answer("lamp-1", "one").await, ConnectReturnCode::Success);
    assert_eq!(
        answer("lamp-2", "two").await,
        ConnectReturnCode::BadUserNamePassword
    );

    // Removed first: a file that has lamp-2 no longer has lamp-1.
    PasswordFile::remove(&path, "lamp-1").expect("removed");
    PasswordFile::set(&path, "lamp-2", "two", cheap()).expect("set");
    let reloaded = async { while answer("lamp-2", "two").await != ConnectReturnCode::Success {} };
    timeout(WAIT, reloaded)
        .await
        .expect("lamp-2 accepted after the change");
    assert_eq!(
        answer("lamp-1", "one").await,
        ConnectReturnCode::BadUserNamePassword
    );
    h.broker.shutdown(WAIT).await;
}

/// Failed logins from an address are slowed, then the address is refused
/// for a while, right password or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_keeps_failing_to_log_in_is_refused_for_a_while() {
    use umbra_broker::auth::PasswordFile;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("passwd");
    let cheap = argon2::Params::new(64, 1, 1, None).expect("params");
    PasswordFile::set(&path, "lamp-1", "right", cheap).expect("set");
    let mut settings = settings();
    settings.password_file = Some(path);
    settings.addresses.max_failed_logins = 3;
    settings.addresses.failed_login_delay_ms = 1;
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    let answer = |password: &'static str| async move {
        let mut raw = Raw::connect_with(port, login_packet("lamp-1", password)).await;
        raw.connack().await.code
    };
    assert_eq!(answer("right").await, ConnectReturnCode::Success);
    for _ in 0..3 {
        assert_eq!(
            answer("guess").await,
            ConnectReturnCode::BadUserNamePassword
        );
    }
    assert_eq!(
        answer("right").await,
        ConnectReturnCode::NotAuthorized,
        "refused for the block's length"
    );
    h.broker.shutdown(WAIT).await;
}

/// An address holds at most `max_connections` connections; more are
/// closed on accept and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_holds_at_most_its_connections() {
    let mut settings = settings();
    settings.addresses.max_connections = 2;
    settings.addresses.loopback_unlimited = false;
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut first = Raw::connect(port, "dev1").await;
    assert_eq!(first.connack().await.code, ConnectReturnCode::Success);
    let mut second = Raw::connect(port, "dev2").await;
    assert_eq!(second.connack().await.code, ConnectReturnCode::Success);
    let mut third = Raw::connect(port, "dev3").await;
    assert!(third.next().await.is_none(), "closed without a CONNACK");
    assert_eq!(
        h.broker.metrics().address_limited.load(Ordering::Relaxed),
        1
    );
    drop(first);
    let again = async {
        loop {
            let mut raw = Raw::connect(port, "dev4").await;
            if raw.next().await.is_some() {
                return;
            }
        }
    };
    timeout(WAIT, again)
        .await
        .expect("a place is given back when a connection ends");
    h.broker.shutdown(WAIT).await;
}

/// A device that proved its identity stays in its own namespace outside
/// `$aws/` (the built-in `device` role: `things/{its name}/#`), a refused
/// subscription gets a failure code and a refused publish or will is
/// refused; an identity assigned the `service` role may go everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_keep_to_their_roles() {
    use umbra_broker::auth::PasswordFile;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("passwd");
    let cheap = || argon2::Params::new(64, 1, 1, None).expect("params");
    for name in ["lamp-1", "lamp-2", "console"] {
        PasswordFile::set(&path, name, "pw", cheap()).expect("set");
    }
    let mut settings = settings();
    settings.password_file = Some(path);
    settings
        .policy
        .identities
        .insert("console".into(), "service".into());
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    let login = |id: &str| {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_credentials(id, "pw");
        options
    };

    let mut console = connect_with(login("console"));
    console.connected().await;
    assert_eq!(
        console.subscribe("#").await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut lamp = connect_with(login("lamp-1"));
    lamp.connected().await;
    assert_eq!(
        lamp.subscribe("#").await,
        vec![SubscribeReasonCode::Failure],
        "a device cannot read the whole fleet"
    );
    assert_eq!(
        lamp.subscribe("things/lamp-2/cmd").await,
        vec![SubscribeReasonCode::Failure]
    );
    assert_eq!(
        lamp.subscribe("things/lamp-1/cmd").await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // Its own telemetry reaches the service; a service command reaches it.
    lamp.publish("things/lamp-1/telemetry", "21.5").await;
    let seen = console.next_publish().await;
    assert_eq!(seen.topic, "things/lamp-1/telemetry");
    console.publish("things/lamp-1/cmd", "on").await;
    loop {
        let got = lamp.next_publish().await;
        if got.topic == "things/lamp-1/cmd" {
            assert_eq!(got.payload.as_ref(), b"on");
            break;
        }
    }
    // The service may use a thing's shadow topics; a device only its own.
    assert_eq!(
        console
            .subscribe("$aws/things/lamp-1/shadow/update/delta")
            .await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    lamp.publish("cmd/lamp-2/unlock", "open").await;
    lamp.closed().await;
    assert_eq!(h.broker.metrics().forbidden.load(Ordering::Relaxed), 1);

    // A will is a publish too.
    let mut with_will = login("lamp-2");
    with_will.set_last_will(rumqttc::LastWill::new(
        "things/lamp-1/status",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let mut lamp2 = connect_with(with_will);
    let refused = lamp2.next().await;
    assert!(
        matches!(&refused, Err(e) if e.contains("NotAuthorized")),
        "{refused:?}"
    );
    h.broker.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_role_receives_only_what_its_receive_rules_allow() {
    let mut settings = settings();
    settings.policy.anonymous_role = "watcher".into();
    settings.policy.roles.insert(
        "watcher".into(),
        toml::from_str(
            r#"
            publish = ["fleet/#"]
            subscribe = ["fleet/#"]
            receive = ["fleet/public/#"]
            "#,
        )
        .expect("role"),
    );
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut watcher = connect("watcher", port, Duration::from_secs(30));
    watcher.connected().await;
    assert_eq!(
        watcher.subscribe("fleet/#").await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut publisher = connect("publisher", port, Duration::from_secs(30));
    publisher.connected().await;
    // More withheld QoS 1 messages than the router's in-flight window
    // (100): were they not acknowledged for the watcher, the router would
    // stop forwarding to it.
    for n in 0..150 {
        publisher.publish("fleet/secret/keys", n.to_string()).await;
    }
    publisher.publish("fleet/public/news", "hello").await;
    // One publisher's messages arrive in order, so the first one the
    // watcher gets comes after every withheld one.
    let first = watcher.next_publish().await;
    assert_eq!(first.topic, "fleet/public/news");
    assert_eq!(first.payload.as_ref(), b"hello");
    assert_eq!(h.broker.metrics().withheld.load(Ordering::Relaxed), 150);
    h.broker.shutdown(WAIT).await;
}

fn login_packet(client_id: &str, password: &str) -> WirePacket {
    match connect_packet(client_id) {
        WirePacket::Connect(connect, props, will, will_props, _) => WirePacket::Connect(
            connect,
            props,
            will,
            will_props,
            Some(Login {
                username: client_id.to_owned(),
                password: password.to_owned(),
            }),
        ),
        other => other,
    }
}

/// Waits until a session is parked (its connection's task has ended).
async fn parked(h: &Harness) {
    let parked = async {
        while h.broker.parked_sessions() == 0 {
            tokio::task::yield_now().await;
        }
    };
    timeout(WAIT, parked).await.expect("session parked");
}

/// Filters rumqttd's router keeps a message log for now.
fn router_filters(h: &Harness) -> usize {
    h.broker
        .metrics()
        .router_filters
        .get()
        .expect("set at start")
        .load(Ordering::Relaxed)
}

/// Waits until the router keeps exactly `n` filters (it frees them on its
/// own thread, after the connection that let go of them moved on).
async fn router_filters_become(h: &Harness, n: usize) {
    let settled = async {
        while router_filters(h) != n {
            tokio::task::yield_now().await;
        }
    };
    if timeout(WAIT, settled).await.is_err() {
        panic!("router keeps {} filters, not {n}", router_filters(h));
    }
}

/// A filter's log lives while some session, connected or saved, subscribes
/// to it: unsubscribing, a clean session's end and a persistent session's
/// end each give the memory back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_filters_nobody_subscribes_to_are_freed() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    assert_eq!(router_filters(&h), 0);
    let mut many = connect("many", port, Duration::from_secs(30));
    many.connected().await;
    let filters: Vec<String> = (0..40).map(|i| format!("fleet/{i}/cmd")).collect();
    many.client
        .subscribe_many(
            filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        )
        .await
        .expect("queued");
    many.wait_for(|p| matches!(p, Packet::SubAck(_)).then_some(()))
        .await;
    assert_eq!(many.subscribe("fleet/+/all").await.len(), 1);
    assert_eq!(router_filters(&h), 41);
    let mut other = connect("other", port, Duration::from_secs(30));
    other.connected().await;
    other.subscribe("fleet/0/cmd").await;
    assert_eq!(router_filters(&h), 41, "a second subscriber shares the log");

    // Unsubscribed.
    many.client
        .unsubscribe("fleet/1/cmd")
        .await
        .expect("queued");
    many.wait_for(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    assert_eq!(router_filters(&h), 40);
    // A clean session's end frees what only it held.
    many.client.disconnect().await.expect("queued");
    many.closed().await;
    router_filters_become(&h, 1).await;
    other.publish("fleet/0/cmd", "still routed").await;
    assert_eq!(other.next_publish().await.payload.as_ref(), b"still routed");

    // A persistent session keeps its filter while it is away, and gets it
    // back when it returns, until it unsubscribes.
    let persistent = || {
        let mut options = MqttOptions::new("saved", "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(false);
        connect_with(options)
    };
    let mut saved = persistent();
    saved.connected().await;
    saved.subscribe("fleet/saved").await;
    assert_eq!(router_filters(&h), 2);
    saved.client.disconnect().await.expect("queued");
    saved.closed().await;
    parked(&h).await;
    assert_eq!(router_filters(&h), 2, "kept for the saved session");
    let mut saved = persistent();
    assert!(saved.connected().await, "session present");
    saved
        .client
        .unsubscribe("fleet/saved")
        .await
        .expect("queued");
    saved
        .wait_for(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    router_filters_become(&h, 1).await;

    // A saved session ended by a clean one (which never uses the router)
    // frees its filters too.
    saved.subscribe("fleet/saved").await;
    saved.client.disconnect().await.expect("queued");
    saved.closed().await;
    parked(&h).await;
    assert_eq!(router_filters(&h), 2);
    let mut clean = connect("saved", port, Duration::from_secs(30));
    assert!(!clean.connected().await);
    router_filters_become(&h, 1).await;
    h.broker.shutdown(WAIT).await;
}

/// An UNSUBSCRIBE of filters held by Umbra (`$aws`), by the router and by
/// nobody is answered with exactly one UNSUBACK with a reason per filter
/// (the router answered once per filter it removed, with one reason each,
/// and not at all when it held none of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_gets_one_unsuback_with_a_reason_per_filter() {
    use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, UnsubAckReason};
    use UnsubAckReason::{NoSubscriptionExisted, Success};
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut raw = Raw::connect_v5(port, "dev1").await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(..))));
    let aws = "$aws/things/dev1/shadow/get/accepted";
    let subscribe = |pkid: u16, filters: &[&str]| {
        WirePacket::Subscribe(
            wire::Subscribe {
                pkid,
                filters: filters
                    .iter()
                    .map(|f| wire::Filter {
                        path: (*f).to_owned(),
                        qos: wire::QoS::AtLeastOnce,
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: wire::RetainForwardRule::OnEverySubscribe,
                    })
                    .collect(),
            },
            None,
        )
    };
    let unsubscribe = |pkid: u16, filters: &[&str]| {
        WirePacket::Unsubscribe(
            wire::Unsubscribe {
                pkid,
                filters: filters.iter().map(|f| (*f).to_owned()).collect(),
            },
            None,
        )
    };
    raw.send(subscribe(1, &["fleet/a", "fleet/b", aws])).await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::SubAck(ack)) if ack.pkid == 1));

    raw.send(unsubscribe(2, &["fleet/a", "fleet/gone", aws, "fleet/b"]))
        .await;
    match raw.next_v5().await {
        Some(Packet5::UnsubAck(ack)) => {
            assert_eq!(ack.pkid, 2);
            assert_eq!(
                ack.reasons,
                [Success, NoSubscriptionExisted, Success, Success]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    // Only filters nobody holds, which the router is asked about too.
    raw.send(unsubscribe(3, &["fleet/a", "fleet/never"])).await;
    match raw.next_v5().await {
        Some(Packet5::UnsubAck(ack)) => {
            assert_eq!(ack.pkid, 3);
            assert_eq!(ack.reasons, [NoSubscriptionExisted, NoSubscriptionExisted]);
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    // The router answers in order: a second UNSUBACK for either would come
    // before this SUBACK.
    raw.send(subscribe(4, &["fleet/c"])).await;
    let next = raw.next_v5().await;
    assert!(
        matches!(&next, Some(Packet5::SubAck(ack)) if ack.pkid == 4),
        "{next:?}"
    );
    h.broker.shutdown(WAIT).await;
}

/// An MQTT 5 device that touches another thing's topics learns why: the
/// server's DISCONNECT carries 0x87 (not authorized).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_device_is_told_it_is_not_authorized() {
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient as Client5, MqttOptions as Options5};

    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut options = Options5::new("dev5", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = Client5::new(options, 16);
    client
        .publish(
            "$aws/things/other/shadow/update",
            QoS5::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .expect("queued");
    let error = timeout(WAIT, async {
        loop {
            if let Err(error) = eventloop.poll().await {
                return error.to_string();
            }
        }
    })
    .await
    .expect("disconnected in time");
    assert!(error.contains("NotAuthorized"), "{error}");
    assert_eq!(h.broker.metrics().forbidden.load(Ordering::Relaxed), 1);
    h.broker.shutdown(WAIT).await;
}

/// A QoS 1 message a persistent session received but did not acknowledge is
/// sent again, with DUP and the same packet id, when the client comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_are_sent_again_on_resume() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let persistent = || {
        WirePacket::Connect(
            Connect {
                keep_alive: 30,
                client_id: "dev1".to_owned(),
                clean_session: false,
            },
            None,
            None,
            None,
            None,
        )
    };
    let delta = "$aws/things/dev1/shadow/update/delta";
    let mut raw = Raw::connect_with(port, persistent()).await;
    assert_eq!(raw.connack().await.code, ConnectReturnCode::Success);
    let filter = wire::Filter {
        path: delta.to_owned(),
        qos: wire::QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: wire::RetainForwardRule::Never,
    };
    raw.send(WirePacket::Subscribe(
        wire::Subscribe {
            pkid: 1,
            filters: vec![filter],
        },
        None,
    ))
    .await;
    assert!(matches!(raw.next().await, Some(WirePacket::SubAck(..))));
    h.broker
        .publisher()
        .publish(delta, Bytes::from("d1"))
        .expect("aws topic");
    let Some(WirePacket::Publish(first, _)) = raw.next().await else {
        panic!("the delta");
    };
    assert_eq!(first.qos, wire::QoS::AtLeastOnce);
    assert!(!first.dup);
    // Gone without acknowledging it.
    drop(raw);

    let mut raw = Raw::connect_with(port, persistent()).await;
    let ack = raw.connack().await;
    assert!(ack.session_present);
    let Some(WirePacket::Publish(again, _)) = raw.next().await else {
        panic!("the delta again");
    };
    assert_eq!(again.payload, first.payload);
    assert_eq!(again.pkid, first.pkid, "same packet id");
    assert!(again.dup, "marked as a retransmission");
    h.broker.shutdown(WAIT).await;
}

/// A client silent for 1.5× its keep-alive is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_disconnected_after_one_and_a_half_keep_alives() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let connect = WirePacket::Connect(
        Connect {
            keep_alive: 1,
            client_id: "quiet".to_owned(),
            clean_session: true,
        },
        None,
        None,
        None,
        None,
    );
    let started = std::time::Instant::now();
    let mut raw = Raw::connect_with(port, connect).await;
    assert_eq!(raw.connack().await.code, ConnectReturnCode::Success);
    raw.closed().await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}",
        started.elapsed()
    );
    h.broker.shutdown(WAIT).await;
}

/// A QoS 2 publish sent again before its PUBREL (DUP) is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmitted_qos2_publish_is_delivered_once() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut sub = connect("sub", port, Duration::from_secs(30));
    sub.connected().await;
    sub.subscribe("once/#").await;
    let mut raw = Raw::connect(port, "pub2").await;
    assert_eq!(raw.connack().await.code, ConnectReturnCode::Success);
    let first = raw_publish("once/x", wire::QoS::ExactlyOnce, 9);
    let mut again = first.clone();
    if let WirePacket::Publish(p, _) = &mut again {
        p.dup = true;
    }
    raw.send(first).await;
    raw.send(again).await;
    let mut recs = 0;
    while recs < 2 {
        match raw.next().await {
            Some(WirePacket::PubRec(rec, _)) => {
                assert_eq!(rec.pkid, 9);
                recs += 1;
            }
            other => panic!("expected PUBREC, got {other:?}"),
        }
    }
    raw.send(WirePacket::PubRel(
        wire::PubRel {
            pkid: 9,
            reason: wire::PubRelReason::Success,
        },
        None,
    ))
    .await;
    assert!(matches!(raw.next().await, Some(WirePacket::PubComp(..))));
    raw.send(raw_publish("once/marker", wire::QoS::AtLeastOnce, 10))
        .await;
    assert_eq!(sub.next_publish().await.topic, "once/x");
    assert_eq!(
        sub.next_publish().await.topic,
        "once/marker",
        "no second copy"
    );
    h.broker.shutdown(WAIT).await;
}

/// A client's QoS 1 messages for the router are taken at most
/// `receive_maximum` at a time: past it Umbra stops reading from the client
/// until the router has taken some, and nothing is lost. MQTT 5 clients are
/// told the figure in their CONNACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_has_at_most_receive_maximum_messages_waiting_for_the_router() {
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

    let mut settings = settings();
    settings.connection.receive_maximum = 2;
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut sub = connect("sub", port, Duration::from_secs(30));
    sub.connected().await;
    sub.subscribe("burst/#").await;

    let mut raw = Raw::connect(port, "burster").await;
    assert_eq!(raw.connack().await.code, ConnectReturnCode::Success);
    const BURST: u16 = 20;
    let burst = (1..=BURST)
        .map(|pkid| raw_publish(&format!("burst/{pkid}"), wire::QoS::AtLeastOnce, pkid))
        .collect();
    raw.send_all(burst).await;
    let mut acked = Vec::new();
    while acked.len() < usize::from(BURST) {
        match raw.next().await {
            Some(WirePacket::PubAck(ack, _)) => acked.push(ack.pkid),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(
        acked,
        (1..=BURST).collect::<Vec<_>>(),
        "every one, in order"
    );
    for pkid in 1..=BURST {
        assert_eq!(sub.next_publish().await.topic, format!("burst/{pkid}"));
    }
    let stalls = h.broker.metrics().receive_stalls.load(Ordering::Relaxed);
    assert!(
        stalls > 0,
        "20 messages read at once went past a maximum of 2"
    );

    let (_client, mut eventloop) = Client5::new(Options5::new("dev5", "127.0.0.1", port), 4);
    let receive_max = timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event5::Incoming(rumqttc::v5::Incoming::ConnAck(ack))) => {
                    return ack.properties.and_then(|p| p.receive_max);
                }
                Ok(_) => {}
                Err(e) => panic!("MQTT 5 connect failed: {e}"),
            }
        }
    })
    .await
    .expect("CONNACK in time");
    assert_eq!(receive_max, Some(2));
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5 topic aliases from a client: the CONNACK says how many it may
/// set; a topic set with an alias is used for later publishes with the
/// alias and an empty topic; an alias of 0 or above the maximum closes the
/// connection with DISCONNECT 0x94 (topic alias invalid).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_topic_aliases_within_the_announced_maximum() {
    use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode as Reason5, Packet as Packet5};
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut watcher = connect("watcher", port, Duration::from_secs(30));
    watcher.connected().await;
    watcher.subscribe("fleet/alias").await;

    let aliased = |topic: &str, alias: u16, payload: &'static [u8]| {
        let mut publish = wire::Publish::new(
            Bytes::from(topic.to_owned()),
            Bytes::from_static(payload),
            false,
        );
        publish.qos = wire::QoS::AtMostOnce;
        let props = wire::PublishProperties {
            topic_alias: Some(alias),
            ..wire::PublishProperties::default()
        };
        WirePacket::Publish(publish, Some(props))
    };
    let mut raw = Raw::connect_v5(port, "aliaser").await;
    let Some(Packet5::ConnAck(ack)) = raw.next_v5().await else {
        panic!("a CONNACK first");
    };
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.topic_alias_max, Some(10));
    assert_eq!(props.max_packet_size, Some(128 * 1024));
    // Absent: subscription identifiers are available.
    assert_eq!(props.subscription_identifiers_available, None);

    raw.send(aliased("fleet/alias", 10, b"set")).await;
    raw.send(aliased("", 10, b"used")).await;
    for expected in [&b"set"[..], b"used"] {
        let got = watcher.next_publish().await;
        assert_eq!(
            (got.topic.as_str(), got.payload.as_ref()),
            ("fleet/alias", expected)
        );
    }

    for bad in [0, 11] {
        let mut raw = Raw::connect_v5(port, &format!("bad-alias-{bad}")).await;
        assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(..))));
        raw.send(aliased("fleet/alias", bad, b"refused")).await;
        let last = raw.last_v5().await;
        assert!(
            matches!(&last, Some(Packet5::Disconnect(d)) if d.reason_code == Reason5::TopicAliasInvalid),
            "alias {bad}: {last:?}"
        );
    }
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5 sessions follow the session expiry, not clean start alone, for
/// router traffic too: clean start 1 with an expiry starts a session that
/// outlives the connection; clean start 0 without one resumes it (with
/// what was published meanwhile) and ends it at the disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_router_sessions_follow_the_session_expiry() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let connect = |clean_start: bool, expiry: Option<u32>| {
        connect5_with("offline5", |connect, props| {
            connect.clean_session = clean_start;
            props.session_expiry_interval = expiry;
        })
    };
    let session_present = |packet: Option<Packet5>| match packet {
        Some(Packet5::ConnAck(ack)) => ack.session_present,
        other => panic!("expected CONNACK, got {other:?}"),
    };

    let mut first = Raw::open(port, connect(true, Some(600)), Codec::V5).await;
    assert!(!session_present(first.next_v5().await));
    first
        .send(raw_subscribe(1, "fleet/offline", wire::QoS::AtLeastOnce))
        .await;
    assert!(matches!(first.next_v5().await, Some(Packet5::SubAck(_))));
    first
        .send(WirePacket::Disconnect(
            wire::Disconnect {
                reason_code: wire::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        ))
        .await;
    while first.next_v5().await.is_some() {}
    parked(&h).await;

    let mut publisher = self::connect("pub5", port, Duration::from_secs(30));
    publisher.connected().await;
    publisher.publish("fleet/offline", "while away").await;
    publisher
        .wait_for(|p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await;

    let mut back = Raw::open(port, connect(false, None), Codec::V5).await;
    assert!(session_present(back.next_v5().await), "kept by its expiry");
    let got = loop {
        if let Some(Packet5::Publish(p)) = back.next_v5().await {
            break p;
        }
    };
    assert_eq!(
        (got.topic.as_ref(), got.payload.as_ref()),
        (&b"fleet/offline"[..], &b"while away"[..])
    );
    drop(back);
    // No expiry this time: the session ended with that connection, which
    // is seen disconnected once its session is (its second disconnect).
    let mut disconnects = 0;
    while disconnects < 2 {
        let event = timeout(WAIT, h.presence.recv()).await.expect("in time");
        if matches!(event, Some(PresenceEvent::Disconnected { client_id, .. }) if client_id == "offline5")
        {
            disconnects += 1;
        }
    }
    assert_eq!(h.broker.parked_sessions(), 0);
    let mut again = Raw::open(port, connect(false, None), Codec::V5).await;
    assert!(!session_present(again.next_v5().await), "no session left");
    h.broker.shutdown(WAIT).await;
}

/// An MQTT 5 client's receive maximum bounds the QoS 1 messages Umbra has
/// sent it and not had acknowledged: with 2, a third waits for a PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_clients_receive_maximum_bounds_what_is_unacknowledged() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let delta = "$aws/things/flow5/shadow/update/delta";
    let connect = connect5_with("flow5", |_, props| props.receive_maximum = Some(2));
    let mut raw = Raw::open(port, connect, Codec::V5).await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(_))));
    raw.send(raw_subscribe(1, delta, wire::QoS::AtLeastOnce))
        .await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::SubAck(_))));
    let publisher = h.broker.publisher();
    for n in 1..=3 {
        assert_eq!(
            publisher.publish(delta, Bytes::from(format!("d{n}"))),
            Ok(1)
        );
    }
    // The messages were queued before the PINGREQ was sent, and a
    // connection moves queued messages to the wire before it reads: what
    // comes before the PINGRESP is all it would send now.
    raw.send(WirePacket::PingReq(wire::PingReq)).await;
    let mut sent = Vec::new();
    loop {
        match raw.next_v5().await {
            Some(Packet5::PingResp(_)) => break,
            Some(Packet5::Publish(p)) => sent.push(p),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sent.len(), 2, "two unacknowledged at most: {sent:?}");
    raw.send(WirePacket::PubAck(
        wire::PubAck {
            pkid: sent[0].pkid,
            reason: wire::PubAckReason::Success,
        },
        None,
    ))
    .await;
    match raw.next_v5().await {
        Some(Packet5::Publish(p)) => assert_eq!(p.payload.as_ref(), b"d3"),
        other => panic!("the third once one is acknowledged: {other:?}"),
    }
    h.broker.shutdown(WAIT).await;
}

/// A CONNECT as an MQTT 5 client sends it (clean start, keep-alive 30 s,
/// no properties set), changed by `edit`.
fn connect5_with(
    client_id: &str,
    edit: impl FnOnce(&mut Connect, &mut wire::ConnectProperties),
) -> WirePacket {
    let mut connect = Connect {
        keep_alive: 30,
        client_id: client_id.into(),
        clean_session: true,
    };
    let mut props = wire::ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    };
    edit(&mut connect, &mut props);
    WirePacket::Connect(connect, Some(props), None, None, None::<Login>)
}

/// [`connect5_with`] a keep-alive and a maximum packet size.
fn connect5(client_id: &str, keep_alive: u16, max_packet_size: Option<u32>) -> WirePacket {
    connect5_with(client_id, |connect, props| {
        connect.keep_alive = keep_alive;
        props.max_packet_size = max_packet_size;
    })
}

/// An MQTT 5 client's maximum packet size: what is larger is not sent to
/// it (and counted), whether Umbra or the router delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_larger_than_an_mqtt5_clients_maximum_packet_size_is_sent() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let delta = "$aws/things/small5/shadow/update/delta";
    let mut raw = Raw::open(port, connect5("small5", 30, Some(64)), Codec::V5).await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(_))));
    let subscribe = |pkid: u16, path: &str| raw_subscribe(pkid, path, wire::QoS::AtLeastOnce);
    raw.send(subscribe(1, delta)).await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::SubAck(_))));
    raw.send(subscribe(2, "fleet/size")).await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::SubAck(_))));

    let big = "x".repeat(100);
    let publisher = h.broker.publisher();
    assert_eq!(publisher.publish(delta, Bytes::from(big.clone())), Ok(1));
    assert_eq!(publisher.publish(delta, Bytes::from("small")), Ok(1));
    let mut other = connect("sender", port, Duration::from_secs(30));
    other.connected().await;
    other.publish("fleet/size", big.as_str()).await;
    other.publish("fleet/size", "small too").await;
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Some(Packet5::Publish(p)) = raw.next_v5().await {
            raw.send(WirePacket::PubAck(
                wire::PubAck {
                    pkid: p.pkid,
                    reason: wire::PubAckReason::Success,
                },
                None,
            ))
            .await;
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    // Umbra's and the router's deliveries are not ordered with each other.
    got.sort();
    assert_eq!(got, ["small", "small too"]);
    assert_eq!(
        h.broker.metrics().oversize_dropped.load(Ordering::Relaxed),
        2
    );
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5: a keep-alive above `max_keep_alive_secs`, or none, is replaced
/// by it, and the CONNACK says so; one within it is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_keep_alive_above_the_maximum_is_lowered_in_the_connack() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let mut settings = settings();
    settings.connection.max_keep_alive_secs = 60;
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    for (asked, told) in [(120, Some(60)), (0, Some(60)), (30, None), (60, None)] {
        let mut raw = Raw::open(
            port,
            connect5(&format!("ka-{asked}"), asked, None),
            Codec::V5,
        )
        .await;
        let Some(Packet5::ConnAck(ack)) = raw.next_v5().await else {
            panic!("a CONNACK");
        };
        let props = ack.properties.expect("properties");
        assert_eq!(props.server_keep_alive, told, "asked for {asked}");
    }
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5: a client that sends more QoS 2 messages than the receive
/// maximum without releasing them (no PUBREL) is disconnected with 0x93.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_client_beyond_the_receive_maximum_is_disconnected() {
    use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode as Reason5, Packet as Packet5};
    let mut settings = settings();
    settings.connection.receive_maximum = 4;
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut raw = Raw::open(port, connect5("greedy5", 30, None), Codec::V5).await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(_))));
    let publishes = (1..=5)
        .map(|pkid| raw_publish("fleet/greedy", wire::QoS::ExactlyOnce, pkid))
        .collect();
    raw.send_all(publishes).await;
    let last = raw.last_v5().await;
    assert!(
        matches!(&last, Some(Packet5::Disconnect(d)) if d.reason_code == Reason5::ReceiveMaximumExceeded),
        "{last:?}"
    );
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5 topic aliases from the server: a client that allows one gets its
/// first topic with an alias, later messages on it with the alias alone, and
/// other topics in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn umbra_sets_topic_aliases_a_client_allows() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let connect = connect5_with("alias-out", |_, props| props.topic_alias_max = Some(1));
    let mut raw = Raw::open(port, connect, Codec::V5).await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(_))));
    let [delta, documents] = [
        "$aws/things/alias-out/shadow/update/delta",
        "$aws/things/alias-out/shadow/update/documents",
    ];
    for (pkid, filter) in [(1, delta), (2, documents)] {
        raw.send(raw_subscribe(pkid, filter, wire::QoS::AtMostOnce))
            .await;
        assert!(matches!(raw.next_v5().await, Some(Packet5::SubAck(_))));
    }
    let publisher = h.broker.publisher();
    for (topic, payload) in [(delta, "1"), (delta, "2"), (documents, "3"), (delta, "4")] {
        assert_eq!(publisher.publish(topic, Bytes::from(payload)), Ok(1));
    }
    let mut seen = Vec::new();
    while seen.len() < 4 {
        if let Some(Packet5::Publish(p)) = raw.next_v5().await {
            let alias = p.properties.and_then(|props| props.topic_alias);
            seen.push((String::from_utf8_lossy(&p.topic).into_owned(), alias));
        }
    }
    assert_eq!(
        seen,
        [
            (delta.to_owned(), Some(1)),
            (String::new(), Some(1)),
            (documents.to_owned(), None),
            (String::new(), Some(1)),
        ]
    );
    h.broker.shutdown(WAIT).await;
}

/// An MQTT 5 will carries its properties (user properties, content type)
/// to its subscribers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_will_carries_its_properties() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut watcher = Raw::open(port, connect5("will-watcher", 30, None), Codec::V5).await;
    assert!(matches!(watcher.next_v5().await, Some(Packet5::ConnAck(_))));
    watcher
        .send(raw_subscribe(1, "fleet/wills", wire::QoS::AtLeastOnce))
        .await;
    assert!(matches!(watcher.next_v5().await, Some(Packet5::SubAck(_))));

    let mut connect = connect5("will-5", 30, None);
    if let WirePacket::Connect(_, _, will, will_props, _) = &mut connect {
        *will = Some(wire::LastWill {
            topic: Bytes::from_static(b"fleet/wills"),
            message: Bytes::from_static(b"gone"),
            qos: wire::QoS::AtLeastOnce,
            retain: false,
        });
        *will_props = Some(wire::LastWillProperties {
            delay_interval: None,
            payload_format_indicator: Some(1),
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![("reason".into(), "power".into())],
        });
    }
    let mut dying = Raw::open(port, connect, Codec::V5).await;
    assert!(matches!(dying.next_v5().await, Some(Packet5::ConnAck(_))));
    drop(dying); // no DISCONNECT: the will is due

    let will = loop {
        if let Some(Packet5::Publish(p)) = watcher.next_v5().await {
            break p;
        }
    };
    assert_eq!(will.payload.as_ref(), b"gone");
    let props = will.properties.expect("the will's properties");
    assert_eq!(
        props.user_properties,
        [("reason".to_string(), "power".to_string())]
    );
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.payload_format_indicator, Some(1));
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5: a DISCONNECT may change the session expiry (to 0: the session
/// ends now), but not from 0 to some (a protocol error, 0x82).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_disconnect_may_change_the_session_expiry() {
    use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode as Reason5, Packet as Packet5};
    let mut h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let connect = |clean_start: bool, expiry: u32| {
        connect5_with("expiring5", |connect, props| {
            connect.clean_session = clean_start;
            props.session_expiry_interval = Some(expiry);
        })
    };
    let disconnect = |expiry: u32| {
        WirePacket::Disconnect(
            wire::Disconnect {
                reason_code: wire::DisconnectReasonCode::NormalDisconnection,
            },
            Some(wire::DisconnectProperties {
                session_expiry_interval: Some(expiry),
                reason_string: None,
                user_properties: Vec::new(),
                server_reference: None,
            }),
        )
    };
    let present = |packet: Option<Packet5>| match packet {
        Some(Packet5::ConnAck(ack)) => ack.session_present,
        other => panic!("expected CONNACK, got {other:?}"),
    };

    // Kept for 600 s by its CONNECT; ended by its DISCONNECT.
    let mut raw = Raw::open(port, connect(true, 600), Codec::V5).await;
    assert!(!present(raw.next_v5().await));
    raw.send(disconnect(0)).await;
    while raw.next_v5().await.is_some() {}
    // Its session is parked or ended by the time it is seen disconnected.
    loop {
        let event = timeout(WAIT, h.presence.recv()).await.expect("in time");
        if matches!(event, Some(PresenceEvent::Disconnected { .. })) {
            break;
        }
    }
    let mut raw = Raw::open(port, connect(false, 600), Codec::V5).await;
    assert!(!present(raw.next_v5().await), "ended by the DISCONNECT");
    raw.send(disconnect(600)).await;
    while raw.next_v5().await.is_some() {}
    parked(&h).await;
    let mut raw = Raw::open(port, connect(false, 0), Codec::V5).await;
    assert!(present(raw.next_v5().await), "kept");

    // 0 on CONNECT, then an expiry on DISCONNECT: refused.
    raw.send(disconnect(60)).await;
    let last = raw.last_v5().await;
    assert!(
        matches!(&last, Some(Packet5::Disconnect(d)) if d.reason_code == Reason5::ProtocolError),
        "{last:?}"
    );
    h.broker.shutdown(WAIT).await;
}

/// The receive maximum holds for router messages too, without holding up
/// the router's acknowledgements of the client's own publishes: a client
/// with a window of 2 that publishes 3 QoS 1 messages to a topic it
/// subscribes to gets its 3 PUBACKs and 2 of the messages, and the third
/// once it acknowledges one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receive_maximum_holds_router_messages_but_not_acknowledgements() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let connect = connect5_with("window5", |_, props| props.receive_maximum = Some(2));
    let mut raw = Raw::open(port, connect, Codec::V5).await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(_))));
    raw.send(raw_subscribe(1, "fleet/window", wire::QoS::AtLeastOnce))
        .await;
    assert!(matches!(raw.next_v5().await, Some(Packet5::SubAck(_))));
    let publishes = (10..13)
        .map(|pkid| raw_publish("fleet/window", wire::QoS::AtLeastOnce, pkid))
        .collect();
    raw.send_all(publishes).await;
    let (mut acks, mut received) = (0, Vec::new());
    while acks < 3 || received.len() < 2 {
        match raw.next_v5().await {
            Some(Packet5::PubAck(_)) => acks += 1,
            Some(Packet5::Publish(p)) => {
                received.push(p.pkid);
                assert!(received.len() <= 2, "a third before any acknowledgement");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    raw.send(WirePacket::PubAck(
        wire::PubAck {
            pkid: received[0],
            reason: wire::PubAckReason::Success,
        },
        None,
    ))
    .await;
    assert!(
        matches!(raw.next_v5().await, Some(Packet5::Publish(_))),
        "the third once one is acknowledged"
    );
    h.broker.shutdown(WAIT).await;
}

/// An explicit deny in a role wins over what it allows, end to end: a
/// subscription inside `deny_subscribe` gets a failure code while `#` is
/// granted; a publish inside `deny_publish` closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roles_explicit_deny_wins() {
    let mut settings = settings();
    settings.policy.anonymous_role = "guarded".into();
    settings.policy.roles.insert(
        "guarded".into(),
        toml::from_str(
            r##"
            publish = ["#"]
            subscribe = ["#"]
            deny_publish = ["cmd/#"]
            deny_subscribe = ["test/nosubscribe"]
            "##,
        )
        .expect("role"),
    );
    let h = start_broker(settings);
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut client = connect("guarded-1", port, Duration::from_secs(30));
    client.connected().await;
    assert_eq!(
        client.subscribe("test/nosubscribe").await,
        vec![SubscribeReasonCode::Failure]
    );
    assert_eq!(
        client.subscribe("#").await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    client.publish("cmd/lamp-1/unlock", "open").await;
    client.closed().await;
    assert_eq!(h.broker.metrics().forbidden.load(Ordering::Relaxed), 1);
    h.broker.shutdown(WAIT).await;
}

/// An MQTT 5 client's next PUBLISH (acknowledgements skipped); `None` once
/// the server closed the connection.
async fn next_publish_v5(raw: &mut Raw) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    loop {
        match raw.next_v5().await? {
            Packet5::Publish(publish) => return Some(publish),
            _ => continue,
        }
    }
}

/// Publishes `payload` at QoS 1.
async fn send_publish(raw: &mut Raw, pkid: u16, topic: &str, payload: &'static str, retain: bool) {
    let mut publish = wire::Publish::new(
        Bytes::from(topic.to_owned()),
        Bytes::from_static(payload.as_bytes()),
        retain,
    );
    publish.qos = wire::QoS::AtLeastOnce;
    publish.pkid = pkid;
    raw.send(WirePacket::Publish(publish, None)).await;
}

/// [`send_publish`], then waits for the PUBACK (the router has taken it);
/// for a client that subscribes to nothing (it skips what else comes).
async fn publish_v5(raw: &mut Raw, pkid: u16, topic: &str, payload: &'static str, retain: bool) {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    send_publish(raw, pkid, topic, payload, retain).await;
    while !matches!(raw.next_v5().await, Some(Packet5::PubAck(ack)) if ack.pkid == pkid) {}
}

/// Subscribes and waits for the SUBACK.
async fn subscribe_v5(raw: &mut Raw, packet: WirePacket) {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    raw.send(packet).await;
    while !matches!(raw.next_v5().await, Some(Packet5::SubAck(_))) {}
}

/// MQTT 5 no-local: a client's subscription with it does not get what the
/// client itself publishes, and others' subscriptions still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_no_local_subscription_skips_the_clients_own_messages() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let nolocal = |f: &mut wire::Filter| f.nolocal = true;
    let mut a = Raw::open(port, connect5("nolocal-a", 30, None), Codec::V5).await;
    let mut b = Raw::open(port, connect5("nolocal-b", 30, None), Codec::V5).await;
    subscribe_v5(&mut a, subscribe_with(1, "chat/room", nolocal)).await;
    subscribe_v5(&mut b, subscribe_with(1, "chat/room", nolocal)).await;

    // Each gets the other's and not its own, which would come first.
    send_publish(&mut a, 2, "chat/room", "from a", false).await;
    let got = next_publish_v5(&mut b).await.expect("a message");
    assert_eq!(got.payload.as_ref(), b"from a");
    send_publish(&mut b, 2, "chat/room", "from b", false).await;
    let got = next_publish_v5(&mut a).await.expect("a message");
    assert_eq!(got.payload.as_ref(), b"from b");
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5 retain-as-published keeps the retain flag of messages forwarded
/// as they are published (others get 0), and retain handling decides when
/// a subscribe sends the retained messages: on every subscribe (also MQTT
/// 3.1.1's rule), only for a new subscription, or never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_retain_as_published_and_retain_handling() {
    use wire::RetainForwardRule as Rule;
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut publisher = Raw::open(port, connect5("retain-pub", 30, None), Codec::V5).await;
    publish_v5(&mut publisher, 1, "lamps/l1", "on", true).await;

    let mut keeps = Raw::open(port, connect5("retain-keeps", 30, None), Codec::V5).await;
    let mut plain = Raw::open(port, connect5("retain-plain", 30, None), Codec::V5).await;
    subscribe_v5(
        &mut keeps,
        subscribe_with(1, "lamps/+", |f| f.preserve_retain = true),
    )
    .await;
    subscribe_v5(&mut plain, subscribe_with(1, "lamps/+", |_| {})).await;
    for subscriber in [&mut keeps, &mut plain] {
        let got = next_publish_v5(subscriber).await.expect("the retained one");
        assert_eq!((got.payload.as_ref(), got.retain), (&b"on"[..], true));
    }
    publish_v5(&mut publisher, 2, "lamps/l1", "off", true).await;
    let got = next_publish_v5(&mut keeps).await.expect("as published");
    assert_eq!((got.payload.as_ref(), got.retain), (&b"off"[..], true));
    let got = next_publish_v5(&mut plain).await.expect("as forwarded");
    assert_eq!((got.payload.as_ref(), got.retain), (&b"off"[..], false));

    // Subscribing again: retained messages only when the rule says so;
    // a message published after the SUBACK shows what came before it.
    let mut marker = 3;
    let mut resubscribe = async |raw: &mut Raw, rule: Rule| {
        subscribe_v5(
            raw,
            subscribe_with(marker, "lamps/+", |f| f.retain_forward_rule = rule),
        )
        .await;
        publish_v5(&mut publisher, marker, "lamps/marker", "marker", false).await;
        marker += 1;
        let mut got = Vec::new();
        loop {
            let publish = next_publish_v5(raw).await.expect("a message");
            got.push(String::from_utf8_lossy(&publish.payload).into_owned());
            if publish.payload.as_ref() == b"marker" {
                return got;
            }
        }
    };
    assert_eq!(
        resubscribe(&mut plain, Rule::OnNewSubscribe).await,
        ["marker"]
    );
    assert_eq!(resubscribe(&mut plain, Rule::Never).await, ["marker"]);
    assert_eq!(
        resubscribe(&mut plain, Rule::OnEverySubscribe).await,
        ["off", "marker"]
    );
    let mut fresh = Raw::open(port, connect5("retain-fresh", 30, None), Codec::V5).await;
    assert_eq!(resubscribe(&mut fresh, Rule::Never).await, ["marker"]);
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5 will delay: the will waits for its delay or the session's end,
/// whichever is sooner, and a new connection of the client in the meantime
/// cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_will_waits_for_its_delay_and_a_reconnect_cancels_it() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let mut watcher = Raw::open(port, connect5("will-watcher", 30, None), Codec::V5).await;
    subscribe_v5(
        &mut watcher,
        raw_subscribe(1, "fleet/wills", wire::QoS::AtLeastOnce),
    )
    .await;
    let with_will = |client_id: &str, payload: &'static str, delay: u32, expiry: u32| {
        let mut connect = connect5_with(client_id, |connect, props| {
            connect.clean_session = false;
            props.session_expiry_interval = Some(expiry);
        });
        if let WirePacket::Connect(_, _, will, will_props, _) = &mut connect {
            *will = Some(wire::LastWill {
                topic: Bytes::from_static(b"fleet/wills"),
                message: Bytes::from_static(payload.as_bytes()),
                qos: wire::QoS::AtLeastOnce,
                retain: false,
            });
            *will_props = Some(wire::LastWillProperties {
                delay_interval: Some(delay),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            });
        }
        connect
    };
    let connected = async |raw: &mut Raw| {
        use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
        assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(_))));
    };

    // The session ends after 1 s, before the 600 s delay: the will then.
    let mut short = Raw::open(port, with_will("will-short", "short", 600, 1), Codec::V5).await;
    connected(&mut short).await;
    let dropped = tokio::time::Instant::now();
    drop(short);
    let got = next_publish_v5(&mut watcher).await.expect("the will");
    assert_eq!(got.payload.as_ref(), b"short");
    assert!(
        dropped.elapsed() >= Duration::from_millis(900),
        "not before the session ended"
    );

    // Due after 4 s, but the client is back before that: never sent. The
    // control, due after 6 s, arrives first (so the cancelled one would
    // have arrived before it).
    let mut back = Raw::open(port, with_will("will-back", "back", 4, 600), Codec::V5).await;
    connected(&mut back).await;
    let mut control = Raw::open(
        port,
        with_will("will-control", "control", 6, 600),
        Codec::V5,
    )
    .await;
    connected(&mut control).await;
    drop(back);
    let dropped = tokio::time::Instant::now();
    drop(control);
    let mut again = Raw::open(port, with_will("will-back", "back", 4, 600), Codec::V5).await;
    connected(&mut again).await;
    let got = next_publish_v5(&mut watcher)
        .await
        .expect("the control's will");
    assert_eq!(got.payload.as_ref(), b"control");
    assert!(
        dropped.elapsed() >= Duration::from_millis(5900),
        "not before its delay"
    );
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5 subscription identifiers: a `$aws` message comes once with the
/// identifiers of every matching subscription; a router message comes once
/// per matching filter with that filter's; subscribing again without one
/// drops it; 0 is a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_messages_carry_their_subscriptions_identifiers() {
    use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode as Reason5, Packet as Packet5};
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let with_id = |pkid: u16, filter: &str, id: Option<usize>| {
        let WirePacket::Subscribe(subscribe, _) = subscribe_with(pkid, filter, |_| {}) else {
            unreachable!("a SUBSCRIBE");
        };
        let props = wire::SubscribeProperties {
            id,
            user_properties: Vec::new(),
        };
        WirePacket::Subscribe(subscribe, Some(props))
    };
    let ids_of = |publish: &rumqttc::v5::mqttbytes::v5::Publish| {
        let mut ids = publish
            .properties
            .as_ref()
            .map(|p| p.subscription_identifiers.clone())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    };
    let mut raw = Raw::open(port, connect5("ids-1", 30, None), Codec::V5).await;
    let delta = "$aws/things/ids-1/shadow/update/delta";
    subscribe_v5(&mut raw, with_id(1, delta, Some(7))).await;
    subscribe_v5(&mut raw, with_id(2, "$aws/things/ids-1/shadow/#", Some(9))).await;
    subscribe_v5(&mut raw, with_id(3, "fleet/ids", Some(3))).await;
    subscribe_v5(&mut raw, with_id(4, "fleet/+", Some(4))).await;

    h.broker
        .publisher()
        .publish(delta, Bytes::from_static(b"{}"))
        .expect("routed");
    let got = next_publish_v5(&mut raw).await.expect("the delta");
    assert_eq!(ids_of(&got), [7, 9], "once, with both");

    let mut publisher = Raw::open(port, connect5("ids-pub", 30, None), Codec::V5).await;
    publish_v5(&mut publisher, 1, "fleet/ids", "one", false).await;
    let mut copies = vec![
        ids_of(&next_publish_v5(&mut raw).await.expect("a copy")),
        ids_of(&next_publish_v5(&mut raw).await.expect("another")),
    ];
    copies.sort();
    assert_eq!(copies, [vec![3], vec![4]]);

    // Again without identifiers: none any more.
    subscribe_v5(&mut raw, with_id(5, delta, None)).await;
    subscribe_v5(&mut raw, with_id(6, "$aws/things/ids-1/shadow/#", None)).await;
    h.broker
        .publisher()
        .publish(delta, Bytes::from_static(b"{}"))
        .expect("routed");
    let got = next_publish_v5(&mut raw).await.expect("the delta");
    assert_eq!(ids_of(&got), Vec::<usize>::new());

    raw.send(with_id(7, "fleet/zero", Some(0))).await;
    assert!(matches!(
        raw.last_v5().await,
        Some(Packet5::Disconnect(d)) if d.reason_code == Reason5::ProtocolError
    ));
    h.broker.shutdown(WAIT).await;
}

/// MQTT 5 reason strings: a refused CONNECT, a refused subscription (unless
/// the client asked for no problem information) and the server's
/// DISCONNECT say why in words, besides the reason code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_refusals_say_why_in_a_reason_string() {
    use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode as Reason5, Packet as Packet5};
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);

    let too_long = "x".repeat(1024);
    let mut refused = Raw::open(port, connect5(&too_long, 30, None), Codec::V5).await;
    let Some(Packet5::ConnAck(ack)) = refused.next_v5().await else {
        panic!("a CONNACK");
    };
    let reason = ack.properties.and_then(|p| p.reason_string);
    assert_eq!(reason.as_deref(), Some("client id too long"));

    let suback_reason = async |raw: &mut Raw| match raw.next_v5().await {
        Some(Packet5::SubAck(ack)) => ack.properties.and_then(|p| p.reason_string),
        other => panic!("expected a SUBACK, got {other:?}"),
    };
    let mut quiet = Raw::open(
        port,
        connect5_with("why-quiet", |_, props| props.request_problem_info = Some(0)),
        Codec::V5,
    )
    .await;
    let mut device = Raw::open(port, connect5("why-5", 30, None), Codec::V5).await;
    for raw in [&mut quiet, &mut device] {
        assert!(matches!(raw.next_v5().await, Some(Packet5::ConnAck(_))));
        raw.send(raw_subscribe(1, "$SYS/#", wire::QoS::AtLeastOnce))
            .await;
    }
    assert_eq!(suback_reason(&mut quiet).await, None);
    assert_eq!(
        suback_reason(&mut device).await.as_deref(),
        Some("topic filter not supported")
    );

    device
        .send(raw_publish(
            "$aws/things/other/shadow/update",
            wire::QoS::AtLeastOnce,
            2,
        ))
        .await;
    let Some(Packet5::Disconnect(disconnect)) = device.last_v5().await else {
        panic!("a DISCONNECT last");
    };
    assert_eq!(disconnect.reason_code, Reason5::NotAuthorized);
    let reason = disconnect.properties.and_then(|p| p.reason_string);
    assert_eq!(
        reason.as_deref(),
        Some("publish forbidden: topic of another thing")
    );
    h.broker.shutdown(WAIT).await;
}

/// What a client sends before its DISCONNECT reaches the router even when
/// both come in one read: here a QoS 0 retained publish, which a later
/// subscriber gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_read_together_with_the_disconnect_is_not_lost() {
    let h = start_broker(settings());
    let port = port(&h.broker, ListenerKind::MqttV4);
    let retained = |payload: &'static [u8]| {
        let publish = wire::Publish::new(
            Bytes::from_static(b"fleet/last"),
            Bytes::from_static(payload),
            true,
        );
        WirePacket::Publish(publish, None)
    };
    let disconnect = || {
        WirePacket::Disconnect(
            wire::Disconnect {
                reason_code: wire::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        )
    };
    let mut publisher = Raw::connect(port, "last-words").await;
    assert_eq!(publisher.connack().await.code, ConnectReturnCode::Success);
    publisher
        .send_all(vec![retained(b"kept"), disconnect()])
        .await;
    assert!(
        publisher.next().await.is_none(),
        "closed after the DISCONNECT"
    );

    let mut subscriber = Raw::connect(port, "last-reader").await;
    assert_eq!(subscriber.connack().await.code, ConnectReturnCode::Success);
    subscriber
        .send(raw_subscribe(1, "fleet/last", wire::QoS::AtMostOnce))
        .await;
    let got = loop {
        match subscriber.next().await {
            Some(WirePacket::Publish(publish, _)) => break publish,
            Some(_) => continue,
            None => panic!("closed"),
        }
    };
    assert_eq!((got.payload.as_ref(), got.retain), (&b"kept"[..], true));
    h.broker.shutdown(WAIT).await;
}
