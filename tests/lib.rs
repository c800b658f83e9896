//! Harness for Umbra's end-to-end tests: a real `umbra` server (store,
//! service, embedded broker) on free ports over a SQLite file in a temporary
//! directory, and real MQTT devices (rumqttc) that record what they receive.
//! Every wait is on an observable event, bounded by [`WAIT`].

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode};
use serde_json::Value;
use tokio::sync::mpsc;
use umbra_broker::embedded::ListenerSettings;
use umbra_broker::{Config, Server};

/// The longest any test waits for something it expects.
pub const WAIT: Duration = Duration::from_secs(20);

/// Path of the shared protocol vectors (override with `UMBRA_VECTORS`).
pub fn vectors_path() -> String {
    std::env::var("UMBRA_VECTORS").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/vectors/shadow_update.json"
        )
        .into()
    })
}

/// Umbra's own protocol cases (`shadow/tests/cases/shadow_update.json`),
/// followed by the shared vectors' cases when they are beside the clone.
pub fn vector_cases() -> Vec<Value> {
    let own = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shadow/tests/cases/shadow_update.json"
    );
    let mut cases = read_cases(own);
    let shared = vectors_path();
    if Path::new(&shared).exists() {
        cases.extend(read_cases(&shared));
    }
    cases
}

fn read_cases(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let doc: Value = serde_json::from_str(&text).expect("cases are JSON");
    doc["cases"].as_array().cloned().expect("cases")
}

/// A configuration on free loopback ports with data in `data_dir`.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config {
        data_dir: data_dir.to_path_buf(),
        http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    };
    config.mqtt.mqtt_v4 = Some(ListenerSettings::local(0));
    config.mqtt.mqtt_v5 = Some(ListenerSettings::local(0));
    config.mqtt.websocket = Some(ListenerSettings::local(0));
    config.mqtt.router.max_connections = 5000;
    config
}

/// One blocking HTTP call (ureq), run off the async runtime.
pub async fn http(method: &'static str, url: String, body: Option<String>) -> (u16, Value) {
    tokio::task::spawn_blocking(move || {
        let request = ureq::request(method, &url).timeout(WAIT);
        let result = match body {
            Some(body) => request.send_string(&body),
            None => request.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {url}: {e}"),
        };
        let status = response.status();
        let text = response.into_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    })
    .await
    .expect("http call")
}

/// Waits until a server's `/readyz` answers 200.
pub async fn wait_ready(http: SocketAddr) {
    tokio::time::timeout(WAIT, async {
        while http_status(format!("http://{http}/readyz")).await != 200 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("ready in time");
}

async fn http_status(url: String) -> u16 {
    tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(status, _)) => status,
        Err(_) => 0,
    })
    .await
    .expect("http call")
}

/// A free loopback port, for a program that cannot bind port 0 itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts a server; panics with the cause if it cannot.
pub async fn start(config: Config) -> Server {
    config.validate().expect("valid test config");
    Server::start(config).await.expect("server starts")
}

/// The MQTT address of a running server.
pub fn mqtt_addr(server: &Server) -> SocketAddr {
    server.addrs().mqtt.expect("mqtt listener")
}

/// The next event matching `want` from a client's event loop, skipping
/// others; `Err` with the reason once the loop ended or nothing came within
/// [`WAIT`].
async fn next_event<P>(
    events: &mut mpsc::UnboundedReceiver<Result<P, String>>,
    want: impl Fn(&P) -> bool,
) -> Result<P, String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return Err("timed out".into()),
            Ok(None) => return Err("event loop ended".into()),
            Ok(Some(Err(e))) => return Err(e),
            Ok(Some(Ok(p))) if want(&p) => return Ok(p),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// A connected MQTT client whose incoming publishes are queued for the test.
#[derive(Debug)]
pub struct Device {
    pub id: String,
    pub client: AsyncClient,
    // Unbounded: test-only; every test drains what it asked for.
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
}

impl Device {
    /// Connects with `id` as client id and waits for the CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str) -> Device {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        Device::connect_with(options).await
    }

    pub async fn connect_with(options: MqttOptions) -> Device {
        let mut device = Device::open(options);
        device
            .next_packet(|p| matches!(p, Packet::ConnAck(_)))
            .await
            .unwrap_or_else(|e| panic!("{}: no CONNACK: {e}", device.id));
        device
    }

    /// Starts connecting without waiting for the CONNACK (for a test that
    /// expects a refusal, or reads the CONNACK with [`Device::connected`]).
    pub fn open(options: MqttOptions) -> Device {
        let id = options.client_id();
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        // rumqttc's 5 s connect timeout is short for a debug build with a
        // thousand devices connecting on two cores.
        eventloop
            .network_options
            .set_connection_timeout(WAIT.as_secs());
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(err) => {
                        let _ = tx.send(Err(err.to_string()));
                        break;
                    }
                }
            }
        });
        Device { id, client, events }
    }

    /// The next packet, whatever it is; `Err` with the reason once the
    /// connection ended (a refused CONNECT's code, for one).
    pub async fn next(&mut self) -> Result<Packet, String> {
        self.next_packet(|_| true).await
    }

    /// Waits for the CONNACK; whether the session was present.
    pub async fn connected(&mut self) -> bool {
        self.wait_for(|p| match p {
            Packet::ConnAck(ack) => Some(ack.session_present),
            _ => None,
        })
        .await
    }

    /// Waits for a packet that `pick` takes, skipping others; panics if the
    /// connection ends first.
    pub async fn wait_for<T>(&mut self, pick: impl Fn(&Packet) -> Option<T>) -> T {
        loop {
            let packet = self.next_packet(|_| true).await;
            let packet = packet
                .unwrap_or_else(|e| panic!("{}: connection ended while waiting: {e}", self.id));
            if let Some(found) = pick(&packet) {
                return found;
            }
        }
    }

    /// Waits until the broker closes the connection.
    pub async fn closed(&mut self) {
        let id = self.id.clone();
        match self.next_packet(|_| false).await {
            Err(e) if e != "timed out" => {}
            other => panic!("{id}: not closed: {other:?}"),
        }
    }

    /// Waits for the next packet matching `want`, skipping others; `Err` if
    /// the connection ended or nothing came within [`WAIT`].
    pub async fn next_packet(&mut self, want: impl Fn(&Packet) -> bool) -> Result<Packet, String> {
        next_event(&mut self.events, want).await
    }

    /// Subscribes at QoS 1 and waits for the SUBACK; its return codes.
    pub async fn subscribe(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
        self.subscribe_at(filter, QoS::AtLeastOnce).await
    }

    /// Subscribes at `qos` and waits for the SUBACK; its return codes.
    pub async fn subscribe_at(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe queued");
        self.wait_for(|p| match p {
            Packet::SubAck(ack) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await
    }

    /// Publishes at QoS 1.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish queued");
    }

    /// The next publish received (any topic); panics if the connection ends.
    pub async fn next_publish(&mut self) -> Publish {
        self.wait_for(|p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// The next publish received (any topic).
    pub async fn next_message(&mut self) -> Result<Publish, String> {
        match self
            .next_packet(|p| matches!(p, Packet::Publish(_)))
            .await?
        {
            Packet::Publish(p) => Ok(p),
            _ => Err("not a publish".into()),
        }
    }

    /// The next publish received on `topic`, as JSON; others are skipped.
    pub async fn next_on(&mut self, topic: &str) -> Value {
        loop {
            let p = self
                .next_message()
                .await
                .unwrap_or_else(|e| panic!("{}: nothing on {topic}: {e}", self.id));
            if p.topic == topic {
                return serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
            }
        }
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
    }
}

/// An MQTT 5 client (rumqttc's v5 client) whose incoming packets are queued
/// for the test, like [`Device`].
pub struct Device5 {
    pub client: rumqttc::v5::AsyncClient,
    // Unbounded: test-only; every test drains what it asked for.
    events: mpsc::UnboundedReceiver<Result<rumqttc::v5::mqttbytes::v5::Packet, String>>,
}

impl Device5 {
    /// Connects with `id` as client id and waits for the CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str) -> Device5 {
        use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => Ok(packet),
                    Ok(Event::Outgoing(_)) => continue,
                    Err(err) => Err(err.to_string()),
                };
                let ended = event.is_err();
                if tx.send(event).is_err() || ended {
                    break;
                }
            }
        });
        let mut device = Device5 { client, events };
        device
            .next(|p| matches!(p, Packet5::ConnAck(_)))
            .await
            .unwrap_or_else(|e| panic!("{id}: no CONNACK: {e}"));
        device
    }

    /// Waits for the next packet matching `want`, skipping others; `Err`
    /// with the reason once the connection ended (or nothing came in time).
    pub async fn next(
        &mut self,
        want: impl Fn(&rumqttc::v5::mqttbytes::v5::Packet) -> bool,
    ) -> Result<rumqttc::v5::mqttbytes::v5::Packet, String> {
        next_event(&mut self.events, want).await
    }

    /// The next publish received (any topic).
    pub async fn next_publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
        match self.next(|p| matches!(p, Packet5::Publish(_))).await {
            Ok(Packet5::Publish(p)) => p,
            other => panic!("expected a publish, got {other:?}"),
        }
    }

    /// Subscribes at QoS 1 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
        use rumqttc::v5::mqttbytes::QoS;
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        self.next(|p| matches!(p, Packet5::SubAck(_)))
            .await
            .unwrap_or_else(|e| panic!("no SUBACK for {filter}: {e}"));
    }

    /// Publishes at QoS 1 with `properties`.
    pub async fn publish(
        &self,
        topic: &str,
        payload: &str,
        properties: rumqttc::v5::mqttbytes::v5::PublishProperties,
    ) {
        use rumqttc::v5::mqttbytes::QoS;
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                payload.to_owned(),
                properties,
            )
            .await
            .expect("publish queued");
    }
}

/// Mosquitto's bridge to itself (on `port`) that republishes shadow
/// requests under [`REMAPPED_REQUESTS`].
fn remap_requests(port: u16) -> String {
    format!(
        "connection shadow-requests\naddress 127.0.0.1:{port}\ncleansession false\n\
         bridge_protocol_version mqttv50\ntry_private false\n\
         topic +/shadow/+ out 1 $aws/things/ {REMAPPED_REQUESTS}\n\
         topic +/shadow/name/+/+ out 1 $aws/things/ {REMAPPED_REQUESTS}\n"
    )
}

/// Where [`Mosquitto::start_remapping_requests`] republishes shadow requests.
pub const REMAPPED_REQUESTS: &str = "shadow-requests/";

/// A Mosquitto process listening on 127.0.0.1:`port`, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto and returns once it logs that its listener is open.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(|_| String::new())
    }

    /// Mosquitto that also republishes shadow requests under
    /// [`REMAPPED_REQUESTS`], through a bridge to itself: Mosquitto 2.0 does
    /// not deliver `$`-topics to shared subscriptions (see the README's
    /// "Attach mode").
    pub fn start_remapping_requests() -> Mosquitto {
        Mosquitto::start_with(remap_requests)
    }

    /// [`Mosquitto::start_remapping_requests`] with a second listener, on
    /// TLS with `cert` and `key` (PEM files); also returns its port.
    pub fn start_remapping_requests_with_tls(cert: &Path, key: &Path) -> (Mosquitto, u16) {
        let tls_port = free_port();
        let mosquitto = Mosquitto::start_with(|port| {
            format!(
                // As root, Mosquitto reads its key after dropping to its own
                // user, who cannot read a key in a test's private directory.
                "user root\nlistener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n{}",
                cert.display(),
                key.display(),
                remap_requests(port)
            )
        });
        (mosquitto, tls_port)
    }

    /// Starts Mosquitto with `more(port)` appended to its configuration.
    fn start_with(more: impl Fn(u16) -> String) -> Mosquitto {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\nlog_dest stderr\nlog_type all\n{}",
                more(port)
            ),
        )
        .expect("write config");
        Mosquitto {
            port,
            child: Mosquitto::spawn(&config),
            _dir: dir,
        }
    }

    /// Stops Mosquitto (SIGKILL: its sessions are lost with it) and starts
    /// it again on the same port.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Mosquitto::spawn(&self._dir.path().join("mosquitto.conf"));
    }

    /// Runs Mosquitto on `config`; returns once it logs that its listener is open.
    fn spawn(config: &Path) -> Child {
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto)");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        // Wait for the broker's own word that every listener is open.
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains(" running") => break,
                Some(Ok(_)) => {}
                _ => panic!("mosquitto exited before opening its listener"),
            }
        }
        // Keep draining the log so the broker never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        child
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
