//! The other transports: MQTT over TLS from configured certificate files, and
//! MQTT over WebSocket, each with a real client.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use umbra_broker::embedded::{ListenerSettings, TlsFiles};
use umbra_tests::{start, test_config, Device};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_keeps_its_shadow_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A CA and a server certificate for localhost, written as PEM files.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("cert");
    let cert_path = dir.path().join("server.pem");
    let key_path = dir.path().join("server.key");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");

    let mut config = test_config(&dir.path().join("data"));
    config.mqtt.mqtt_v4 = Some(ListenerSettings {
        tls: Some(TlsFiles {
            cert: cert_path,
            key: key_path,
        }),
        ..ListenerSettings::local(0)
    });
    let server = start(config).await;
    let port = server.addrs().mqtt.expect("tls listener").port();

    let mut options = MqttOptions::new("tls-lamp", "localhost", port);
    options.set_keep_alive(std::time::Duration::from_secs(30));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: ca.pem().into_bytes(),
        alpn: None,
        client_auth: None,
    }));
    let mut device = Device::connect_with(options).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_keeps_its_shadow_over_websocket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(test_config(dir.path())).await;
    let ws = server.addrs().websocket.expect("websocket listener");
    let mut options = MqttOptions::new("ws-lamp", format!("ws://{ws}/mqtt"), ws.port());
    options.set_keep_alive(std::time::Duration::from_secs(30));
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
