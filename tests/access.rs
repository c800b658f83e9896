//! The access matrix: for each way of connecting (a password, a client
//! certificate, anonymous on loopback, a service identity) and each kind of
//! target (its own thing, another thing, everything), what the real server
//! allows: connect, publish, subscribe, receive, retained messages, wills,
//! the HTTP API.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use umbra_broker::auth::PasswordFile;
use umbra_broker::certs;
use umbra_broker::embedded::{ListenerSettings, TlsFiles};
use umbra_shadow::http::{Role, TokenConfig};
use umbra_tests::{start, test_config, WAIT};

/// A connection under test: its client and its event loop, polled here.
struct Conn {
    client: AsyncClient,
    events: EventLoop,
}

/// What came of a CONNECT: a connection, a refusal code, or a failed handshake.
async fn connect(options: MqttOptions) -> Result<Conn, String> {
    let (client, mut events) = AsyncClient::new(options, 16);
    loop {
        match tokio::time::timeout(WAIT, events.poll())
            .await
            .expect("an answer in time")
        {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(Conn { client, events }),
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => return Err(format!("{code:?}")),
            Err(e) => return Err(format!("no CONNACK: {e}")),
        }
    }
}

impl Conn {
    /// Polls until `pick` takes an event; `None` once the server closed the connection.
    async fn until<T>(&mut self, mut pick: impl FnMut(&Packet) -> Option<T>) -> Option<T> {
        loop {
            match tokio::time::timeout(WAIT, self.events.poll())
                .await
                .expect("in time")
            {
                Ok(Event::Incoming(packet)) => {
                    if let Some(found) = pick(&packet) {
                        return Some(found);
                    }
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// A QoS 1 publish: acknowledged (`true`) or the connection closed (`false`).
    async fn publish(&mut self, topic: &str, retain: bool) -> bool {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, "x")
            .await
            .expect("queued");
        self.until(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
            .is_some()
    }

    async fn subscribe(&mut self, filter: &str) -> bool {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queued");
        let codes = self
            .until(|p| match p {
                Packet::SubAck(ack) => Some(ack.return_codes.clone()),
                _ => None,
            })
            .await
            .expect("a SUBACK");
        codes == [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    }

    /// Whether a message on `topic` arrives.
    async fn receives(&mut self, topic: &str) -> bool {
        self.until(|p| match p {
            Packet::Publish(publish) if publish.topic == topic => Some(()),
            _ => None,
        })
        .await
        .is_some()
    }
}

struct Fleet {
    pki: std::path::PathBuf,
    ca: String,
    mqtt: SocketAddr,
    tls: SocketAddr,
    http: SocketAddr,
}

impl Fleet {
    fn password(&self, client_id: &str, user: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.mqtt.ip().to_string(), self.mqtt.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_credentials(user, "pw");
        options
    }

    fn certificate(&self, client_id: &str, device: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "localhost", self.tls.port());
        options.set_keep_alive(Duration::from_secs(30));
        let read = |file: String| std::fs::read(self.pki.join(file)).expect("pem");
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: self.ca.as_bytes().to_vec(),
            alpn: None,
            client_auth: Some((read(format!("{device}.pem")), read(format!("{device}.key")))),
        }));
        options
    }
}

/// A server with per-device passwords, a mutual-TLS listener, a console
/// with the service role, and an HTTP token.
async fn secured(dir: &Path) -> (umbra_broker::Server, Fleet) {
    let pki = dir.join("pki");
    let ca = certs::make_ca(&pki).expect("ca");
    certs::make_server(&pki, &["localhost".to_string()]).expect("server cert");
    certs::make_device(&pki, "cert-1").expect("device cert");
    let passwd = dir.join("passwd");
    let cheap = || argon2::Params::new(64, 1, 1, None).expect("params");
    for user in ["pass-1", "pass-2", "console"] {
        PasswordFile::set(&passwd, user, "pw", cheap()).expect("set");
    }
    let mut config = test_config(&dir.join("data"));
    config.mqtt.password_file = Some(passwd);
    config
        .mqtt
        .policy
        .identities
        .insert("console".into(), "service".into());
    let mut files = TlsFiles::new(pki.join("server.pem"), pki.join("server.key"));
    files.client_ca = Some(ca.clone());
    config.mqtt.mqtt_v5 = Some(ListenerSettings {
        tls: Some(files),
        ..ListenerSettings::local(0)
    });
    // Stored hashed: printf %s ops-token | sha256sum
    config.http.tokens = vec![TokenConfig {
        name: "ops".into(),
        token: "sha256:d9310c002af91822beb0b3487d8b04f85bf6bf1f8a5496bff7d35fc7c5a29def".into(),
        role: Role::Write,
    }];
    let server = start(config).await;
    let addrs = server.addrs();
    let fleet = Fleet {
        ca: std::fs::read_to_string(&ca).expect("ca pem"),
        pki,
        mqtt: addrs.mqtt.expect("mqtt"),
        tls: addrs.mqtt_v5.expect("tls"),
        http: addrs.http,
    };
    (server, fleet)
}

/// The rows a device with a proven identity must get: its own thing
/// allowed, another thing's and everything refused.
async fn a_proven_device(fleet: &Fleet, options: impl Fn(&str) -> MqttOptions, me: &str) {
    let other = "pass-2";
    // connect: as itself, not as another thing
    assert_eq!(
        connect(options(other)).await.err().as_deref(),
        Some("NotAuthorized"),
        "{me} connecting as {other}"
    );
    let mut dev = connect(options(me)).await.expect("connects as itself");
    // subscribe + receive + retain: its own namespace
    assert!(
        dev.subscribe(&format!("things/{me}/#")).await,
        "{me}: own subscribe"
    );
    assert!(
        dev.publish(&format!("things/{me}/state"), true).await,
        "{me}: own retained publish"
    );
    assert!(
        dev.receives(&format!("things/{me}/state")).await,
        "{me}: own receive"
    );
    assert!(
        dev.subscribe(&format!("$aws/things/{me}/shadow/get/accepted"))
            .await
    );
    // subscribe: not another thing's, not everything
    assert!(
        !dev.subscribe(&format!("things/{other}/#")).await,
        "{me}: other's subscribe"
    );
    assert!(!dev.subscribe("#").await, "{me}: subscribe everything");
    assert!(
        !dev.subscribe("things/+/state").await,
        "{me}: subscribe every thing"
    );
    // publish (retained or not) to another thing's topic: disconnected
    assert!(
        !dev.publish(&format!("things/{other}/cmd"), true).await,
        "{me}: other's publish"
    );
    let mut dev = connect(options(me)).await.expect("connects again");
    assert!(
        !dev.publish(&format!("$aws/things/{other}/shadow/update"), false)
            .await,
        "{me}: other's shadow"
    );
    // will: only on its own topics
    let mut will = options(me);
    will.set_last_will(LastWill::new(
        format!("things/{other}/status"),
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    assert_eq!(
        connect(will).await.err().as_deref(),
        Some("NotAuthorized"),
        "{me}: other's will"
    );
    let mut will = options(me);
    will.set_last_will(LastWill::new(
        format!("things/{me}/status"),
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    assert!(connect(will).await.is_ok(), "{me}: own will");
    // HTTP: a device's credentials are not an API token
    let url = format!("http://{}/things/{me}/shadow", fleet.http);
    assert_eq!(
        http_status(&url, "pw"),
        401,
        "{me}: HTTP with a device secret"
    );
    assert_ne!(
        http_status(&url, "ops-token"),
        401,
        "the operator's token, stored hashed, opens the API"
    );
}

/// The status of a GET of `url` with `token` as its bearer token.
fn http_status(url: &str, token: &str) -> u16 {
    match ureq::get(url)
        .set("Authorization", &format!("Bearer {token}"))
        .call()
    {
        Ok(response) => response.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_matrix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, fleet) = secured(dir.path()).await;

    // A password: wrong or missing ones are refused outright.
    let wrong = {
        let mut o = fleet.password("pass-1", "pass-1");
        o.set_credentials("pass-1", "nope");
        o
    };
    assert_eq!(
        connect(wrong).await.err().as_deref(),
        Some("BadUserNamePassword")
    );
    let anonymous = MqttOptions::new("pass-1", fleet.mqtt.ip().to_string(), fleet.mqtt.port());
    assert_eq!(
        connect(anonymous).await.err().as_deref(),
        Some("BadUserNamePassword")
    );
    a_proven_device(&fleet, |id| fleet.password(id, "pass-1"), "pass-1").await;

    // A certificate: without one there is no handshake.
    let mut bare = MqttOptions::new("cert-1", "localhost", fleet.tls.port());
    bare.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: fleet.ca.as_bytes().to_vec(),
        alpn: None,
        client_auth: None,
    }));
    assert!(connect(bare)
        .await
        .err()
        .is_some_and(|e| e.starts_with("no CONNACK")));
    a_proven_device(&fleet, |id| fleet.certificate(id, "cert-1"), "cert-1").await;

    // A service identity: everything, every thing's shadow.
    let mut console = connect(fleet.password("console", "console"))
        .await
        .expect("console");
    assert!(console.subscribe("#").await);
    assert!(
        console
            .subscribe("$aws/things/+/shadow/update/accepted")
            .await
    );
    assert!(console.publish("things/pass-2/cmd", true).await);
    assert!(console.receives("things/pass-2/cmd").await);
    server.shutdown().await;

    // Anonymous on loopback (no credentials configured): every ordinary
    // topic, but only its own thing's shadow.
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let mqtt = server.addrs().mqtt.expect("mqtt");
    let options = |id: &str| {
        let mut o = MqttOptions::new(id, mqtt.ip().to_string(), mqtt.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    let mut anon = connect(options("anon-1"))
        .await
        .expect("anonymous on loopback");
    assert!(anon.subscribe("#").await);
    assert!(anon.publish("things/anon-2/cmd", true).await);
    assert!(anon.receives("things/anon-2/cmd").await);
    assert!(
        anon.subscribe("$aws/things/anon-1/shadow/get/accepted")
            .await
    );
    assert!(
        !anon
            .publish("$aws/things/anon-2/shadow/update", false)
            .await,
        "another thing's shadow"
    );
    server.shutdown().await;
}
