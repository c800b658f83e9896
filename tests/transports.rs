//! The other transports: MQTT over TLS from configured certificate files, and
//! MQTT over WebSocket, each with a real client.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use umbra_broker::embedded::{ListenerSettings, TlsFiles};
use umbra_tests::{start, test_config, Device};

/// A CA and a server certificate for localhost, written as PEM files into
/// `dir`; returns the CA's PEM and the listener settings.
fn tls_listener(dir: &std::path::Path) -> (String, TlsFiles) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("cert");
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (ca.pem(), TlsFiles::new(cert_path, key_path))
}

/// A test configuration whose MQTT listener serves TLS; returns the CA's PEM.
fn tls_config(dir: &std::path::Path) -> (String, umbra_broker::Config) {
    let (ca, files) = tls_listener(dir);
    let mut config = test_config(&dir.join("data"));
    config.mqtt.mqtt_v4 = Some(ListenerSettings {
        tls: Some(files),
        ..ListenerSettings::local(0)
    });
    (ca, config)
}

fn tls_options(client_id: &str, port: u16, ca: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: ca.as_bytes().to_vec(),
        alpn: None,
        client_auth: None,
    }));
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_keeps_its_shadow_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, config) = tls_config(dir.path());
    let server = start(config).await;
    let port = server.addrs().mqtt.expect("tls listener").port();
    let mut device = Device::connect_with(tls_options("tls-lamp", port, &ca)).await;
    device
        .subscribe("$aws/things/tls-lamp/shadow/update/accepted")
        .await;
    device
        .publish(
            "$aws/things/tls-lamp/shadow/update",
            r#"{"state":{"reported":{"on":true}}}"#,
        )
        .await;
    let accepted = device
        .next_on("$aws/things/tls-lamp/shadow/update/accepted")
        .await;
    assert_eq!(accepted["version"], 1);
    server.shutdown().await;
}

/// What the server answers a TLS CONNECT with: `Ok` (a CONNACK; the
/// connection is then dropped), a CONNACK refusal, or a failed handshake.
async fn tls_connack(options: MqttOptions) -> Result<(), String> {
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 8);
    loop {
        let event = tokio::time::timeout(umbra_tests::WAIT, eventloop.poll())
            .await
            .expect("an answer in time");
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                return Err(format!("{code:?}"))
            }
            Err(e) => return Err(format!("no CONNACK: {e}")),
        }
    }
}

/// Mutual TLS with certificates from `umbra certs`' code: a device proves
/// its identity with its certificate (subject CN = thing name) and can use
/// no other client id; no certificate, no handshake; a revoked certificate
/// is refused once the revocation list (serials, then a CRL) is reloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_authenticate_with_their_certificates() {
    use umbra_broker::certs;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let ca_path = certs::make_ca(&pki).expect("ca");
    certs::make_server(&pki, &["localhost".to_string()]).expect("server cert");
    let (_, serial) = certs::make_device(&pki, "lamp-1").expect("device cert");
    let revoked = dir.path().join("revoked.txt");
    std::fs::write(&revoked, "# serials\n").expect("written");

    let mut config = test_config(&dir.path().join("data"));
    let mut files = TlsFiles::new(pki.join("server.pem"), pki.join("server.key"));
    files.client_ca = Some(ca_path.clone());
    config.mqtt.mqtt_v4 = Some(ListenerSettings {
        tls: Some(files),
        ..ListenerSettings::local(0)
    });
    config.mqtt.revoked_certificates = Some(revoked.clone());
    config.mqtt.password_file_check_ms = 20;
    let server = start(config).await;
    let port = server.addrs().mqtt.expect("tls listener").port();
    let ca = std::fs::read_to_string(&ca_path).expect("ca pem");
    let read = |name: &str| std::fs::read(pki.join(name)).expect("pem");
    let with_cert = |client_id: &str| {
        let mut options = tls_options(client_id, port, &ca);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: ca.as_bytes().to_vec(),
            alpn: None,
            client_auth: Some((read("lamp-1.pem"), read("lamp-1.key"))),
        }));
        options
    };

    let mut lamp = Device::connect_with(with_cert("lamp-1")).await;
    lamp.subscribe("$aws/things/lamp-1/shadow/update/accepted")
        .await;
    lamp.publish(
        "$aws/things/lamp-1/shadow/update",
        r#"{"state":{"reported":{"on":true}}}"#,
    )
    .await;
    let accepted = lamp
        .next_on("$aws/things/lamp-1/shadow/update/accepted")
        .await;
    assert_eq!(accepted["version"], 1);

    assert_eq!(
        tls_connack(with_cert("lamp-2")).await.err().as_deref(),
        Some("NotAuthorized"),
        "lamp-1's certificate does not open lamp-2"
    );
    let no_cert = tls_connack(tls_options("lamp-1", port, &ca)).await.err();
    assert!(
        no_cert
            .as_deref()
            .is_some_and(|e| e.starts_with("no CONNACK")),
        "no certificate, no handshake: {no_cert:?}"
    );

    std::fs::write(&revoked, format!("{}\n", serial.to_uppercase())).expect("revoked");
    let refused = async { while tls_connack(with_cert("lamp-1")).await.is_ok() {} };
    tokio::time::timeout(umbra_tests::WAIT, refused)
        .await
        .expect("refused once the revocation list is reloaded");
    assert_eq!(
        tls_connack(with_cert("lamp-1")).await.err().as_deref(),
        Some("NotAuthorized")
    );

    // The list may be a CRL signed by the client CA instead: one that
    // revokes nothing lets lamp-1 in again, one that revokes it does not.
    let crl = certs::make_crl(&pki, &[], 30).expect("crl");
    std::fs::copy(&crl, &revoked).expect("copied");
    let back = async { while tls_connack(with_cert("lamp-1")).await.is_err() {} };
    tokio::time::timeout(umbra_tests::WAIT, back)
        .await
        .expect("let in once the empty CRL is loaded");
    let crl = certs::make_crl(&pki, std::slice::from_ref(&serial), 30).expect("crl");
    std::fs::copy(&crl, &revoked).expect("copied");
    let refused = async { while tls_connack(with_cert("lamp-1")).await.is_ok() {} };
    tokio::time::timeout(umbra_tests::WAIT, refused)
        .await
        .expect("refused once the CRL revoking it is loaded");
    server.shutdown().await;
}

/// AWS's own device SDK (v2, Python), unmodified, with its mutual-TLS
/// connection builder and a certificate from `umbra certs`: get (404 for a
/// new thing), an update with a delta, the report, in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs awsiotsdk (PyPI)"]
async fn the_aws_iot_device_sdk_keeps_its_shadow_over_mutual_tls() {
    use umbra_broker::certs;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let ca = certs::make_ca(&pki).expect("ca");
    certs::make_server(&pki, &["localhost".to_string()]).expect("server cert");
    certs::make_device(&pki, "sdk-lamp").expect("device cert");
    let mut config = test_config(&dir.path().join("data"));
    let mut files = TlsFiles::new(pki.join("server.pem"), pki.join("server.key"));
    files.client_ca = Some(ca.clone());
    config.mqtt.mqtt_v4 = Some(ListenerSettings {
        tls: Some(files),
        ..ListenerSettings::local(0)
    });
    let server = start(config).await;
    let port = server.addrs().mqtt.expect("tls listener").port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/aws/shadow_mtls.py");
    let path = |p: std::path::PathBuf| p.to_str().expect("utf-8 path").to_owned();
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .args(["localhost", &port.to_string()])
        .args([
            path(ca),
            path(pki.join("sdk-lamp.pem")),
            path(pki.join("sdk-lamp.key")),
        ])
        .arg("sdk-lamp")
        .output();
    let out = tokio::time::timeout(umbra_tests::WAIT * 3, run)
        .await
        .expect("the SDK's run ends")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    for step in [
        "connected",
        "get rejected 404",
        "delta {\"color\": \"green\"}",
        "in sync at version 2",
    ] {
        assert!(stdout.contains(step), "no {step:?} in: {stdout}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_keeps_its_shadow_over_websocket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let ws = server.addrs().websocket.expect("websocket listener");
    let mut options = MqttOptions::new("ws-lamp", format!("ws://{ws}/mqtt"), ws.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::Ws);
    let mut device = Device::connect_with(options).await;
    device
        .subscribe("$aws/things/ws-lamp/shadow/update/delta")
        .await;
    device
        .publish(
            "$aws/things/ws-lamp/shadow/update",
            r#"{"state":{"desired":{"on":true}}}"#,
        )
        .await;
    let delta = device
        .next_on("$aws/things/ws-lamp/shadow/update/delta")
        .await;
    assert_eq!(delta["state"]["on"], true);
    server.shutdown().await;
}

/// Waits until the server closes `stream` (it reads nothing but EOF).
async fn closed_by_server(stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        let read = tokio::time::timeout(umbra_tests::WAIT, stream.read(&mut buf))
            .await
            .expect("closed in time");
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A client that opens a TCP connection to a TLS (or WebSocket) listener
/// and never starts its handshake delays no one: handshakes run in the
/// connection's task, not the accept loop. It is closed at the connect
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_handshake_delays_no_other_client_and_is_closed_at_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, mut config) = tls_config(dir.path());
    // Longer than the test waits: if the idle client blocked the accept
    // loop, the others could not connect before it gave up.
    config.mqtt.connection.connect_timeout_ms = 60_000;
    let server = start(config.clone()).await;
    let tls = server.addrs().mqtt.expect("tls listener");
    let ws = server.addrs().websocket.expect("websocket listener");
    let _idle_tls = TcpStream::connect(tls).await.expect("tcp connect");
    let _idle_ws = TcpStream::connect(ws).await.expect("tcp connect");

    let started = std::time::Instant::now();
    let device = Device::connect_with(tls_options("tls-2", tls.port(), &ca)).await;
    let mut options = MqttOptions::new("ws-2", format!("ws://{ws}/mqtt"), ws.port());
    options.set_transport(Transport::Ws);
    let ws_device = Device::connect_with(options).await;
    println!("connected past idle handshakes in {:?}", started.elapsed());
    device.disconnect().await;
    ws_device.disconnect().await;
    server.shutdown().await;

    // With a short timeout the idle connections are closed.
    config.mqtt.connection.connect_timeout_ms = 300;
    config.mqtt.mqtt_v4 = Some(ListenerSettings {
        addr: "127.0.0.1:0".parse().expect("addr"),
        ..config.mqtt.mqtt_v4.clone().expect("tls listener")
    });
    let server = start(config).await;
    let mut idle_tls = TcpStream::connect(server.addrs().mqtt.expect("tls"))
        .await
        .expect("tcp connect");
    let mut idle_ws = TcpStream::connect(server.addrs().websocket.expect("ws"))
        .await
        .expect("tcp connect");
    closed_by_server(&mut idle_tls).await;
    closed_by_server(&mut idle_ws).await;
    let timeouts = server
        .broker()
        .expect("embedded broker")
        .metrics()
        .connect_timeouts
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(timeouts, 2);
    server.shutdown().await;
}
