//! The `umbra` binary as a user runs it: flags, exit codes, the addresses it
//! prints, SIGTERM, and durability across kill -9.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::process::Command;
use tokio::sync::mpsc;

#[path = "../../shadow/tests/support/postgres.rs"]
mod postgres;
mod support;

use support::{spawn, spawn_with, FREE_PORTS, UMBRA, WAIT};

async fn run_to_exit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(UMBRA)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("umbra runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A device that keeps its answers in a channel.
async fn device(addr: SocketAddr, id: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Value>) {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = ready_tx.try_send(());
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send(body).is_err() {
                        break;
                    }
                }
                _ => {}
            }
        }
    });
    client
        .subscribe(
            format!("$aws/things/{id}/shadow/+/accepted"),
            QoS::AtLeastOnce,
        )
        .await
        .expect("subscribe");
    tokio::time::timeout(WAIT, ready.recv())
        .await
        .expect("suback");
    (client, rx)
}

#[tokio::test]
async fn bad_flags_and_config_exit_64_naming_the_problem() {
    let (code, _, err) = run_to_exit(&["--mqtt-addr", "not-an-address"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--mqtt-addr"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("umbra.toml");
    std::fs::write(&file, "[shadow]\nmax_depht = 3\n").expect("write");
    let (code, _, err) = run_to_exit(&["--config", file.to_str().unwrap_or_default()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("max_depht"), "{err}");

    // A password file that does not parse stops the start, naming the line.
    std::fs::write(dir.path().join("passwd"), "# devices\nlamp-1:plaintext\n").expect("write");
    std::fs::write(&file, "[mqtt]\npassword_file = \"passwd\"\n").expect("write");
    let (code, _, err) = run_to_exit(&["--config", file.to_str().unwrap_or_default()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("password file line 2"), "{err}");

    let (code, _, err) = run_to_exit(&["--mqtt-addr", "0.0.0.0:0"]).await;
    assert_eq!(
        code, 64,
        "anonymous non-loopback listener must be refused: {err}"
    );
    assert!(err.contains("authentication"), "{err}");

    // PostgreSQL on another machine, without TLS: refused, and the
    // password is not repeated.
    let url = "postgres://umbra:secret@db.example.com:5432/umbra";
    let (code, _, err) = run_to_exit(&["--store-url", url]).await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("store.url") && err.contains("db.example.com"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");

    let (code, out, _) = run_to_exit(&["--help"]).await;
    assert_eq!(code, 0);
    for flag in ["--config", "--mqtt-addr", "--ws-addr", "--data-dir"] {
        assert!(out.contains(flag), "--help lacks {flag}: {out}");
    }
}

/// A port another process holds: umbra names it and the cause, once (the
/// cause was printed twice).
#[tokio::test]
async fn a_taken_port_is_reported_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().unwrap_or_default();
    let free = "127.0.0.1:0";
    let (code, _, err) = run_to_exit(&[
        "--http-addr",
        &addr,
        "--mqtt-addr",
        free,
        "--ws-addr",
        free,
        "--data-dir",
        data,
    ])
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&addr), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
}

#[tokio::test]
async fn sigterm_stops_cleanly_with_exit_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut umbra = spawn(dir.path()).await;
    let (client, mut answers) = device(umbra.mqtt, "term-1").await;
    client
        .publish(
            "$aws/things/term-1/shadow/update",
            QoS::AtLeastOnce,
            false,
            r#"{"state":{"reported":{"a":1}}}"#,
        )
        .await
        .expect("publish");
    let accepted = tokio::time::timeout(WAIT, answers.recv())
        .await
        .expect("answer");
    assert_eq!(accepted.and_then(|a| a["version"].as_u64()), Some(1));
    let pid = umbra.child.id().expect("pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, umbra.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(status.code(), Some(0));
    // Every line up to the end of its output (the reader may still be
    // forwarding the last ones after the process exited).
    let mut said_stopped = false;
    while let Some(line) = tokio::time::timeout(WAIT, umbra.lines.recv())
        .await
        .expect("umbra's output ends")
    {
        said_stopped |= line.contains("stopped");
    }
    assert!(said_stopped, "umbra reports that it stopped");
}

/// `things` devices named `{prefix}-{d}` each report `i` = 0..`updates`,
/// one at a time; each thing with the version its last update was
/// acknowledged with.
async fn report_counts(
    mqtt: SocketAddr,
    prefix: &str,
    things: usize,
    updates: u64,
) -> Vec<(String, u64)> {
    let mut acknowledged = Vec::new();
    for d in 0..things {
        let thing = format!("{prefix}-{d}");
        let (client, mut answers) = device(mqtt, &thing).await;
        let mut last = 0;
        for i in 0..updates {
            client
                .publish(
                    format!("$aws/things/{thing}/shadow/update"),
                    QoS::AtLeastOnce,
                    false,
                    json!({"state": {"reported": {"i": i}}}).to_string(),
                )
                .await
                .expect("publish");
            let answer = tokio::time::timeout(WAIT, answers.recv())
                .await
                .expect("answer");
            last = answer.and_then(|a| a["version"].as_u64()).unwrap_or(last);
        }
        acknowledged.push((thing, last));
    }
    acknowledged
}

/// `thing`'s shadow, as a device gets it over MQTT.
async fn get_shadow(mqtt: SocketAddr, thing: &str) -> Value {
    let (client, mut answers) = device(mqtt, thing).await;
    client
        .publish(
            format!("$aws/things/{thing}/shadow/get"),
            QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .expect("publish");
    tokio::time::timeout(WAIT, answers.recv())
        .await
        .expect("answer")
        .unwrap_or_default()
}

#[tokio::test]
async fn kill_9_loses_no_acknowledged_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut umbra = spawn(dir.path()).await;
    let acknowledged = report_counts(umbra.mqtt, "k9", 5, 15).await;
    umbra.child.kill().await.expect("SIGKILL");
    let umbra = spawn(dir.path()).await;
    for (thing, version) in acknowledged {
        let doc = get_shadow(umbra.mqtt, &thing).await;
        assert_eq!(doc["version"].as_u64(), Some(version), "{thing}");
        assert_eq!(doc["state"]["reported"]["i"], 14, "{thing}");
    }
}

#[tokio::test]
async fn operator_cli_reads_and_changes_shadows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let umbra = spawn(dir.path()).await;
    let api = format!("http://{}", umbra.http);
    let cli = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--api".to_string(), api.clone()]);
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            run_to_exit(&refs).await
        }
    };
    let (code, out, err) = cli(&[
        "shadow",
        "update",
        "cli-1",
        r#"{"state":{"desired":{"on":true}}}"#,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"version\": 1"), "{out}");

    let (code, out, _) = cli(&["shadow", "get", "cli-1", "--json"]).await;
    assert_eq!(code, 0);
    let doc: Value = serde_json::from_str(out.trim()).expect("--json prints JSON");
    assert_eq!(doc["state"]["delta"]["on"], true);

    let (code, out, _) = cli(&["shadow", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("cli-1")), "{out}");
    // The API flags are global: before the command too.
    let (code, out, err) = run_to_exit(&["--api", &api, "shadow", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with("cli-1")), "{out}");

    let (code, out, _) = cli(&["shadow", "search", "shadow.hasDelta:true", "--json"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("cli-1"), "{out}");

    // The fleet at a glance: cli-1 has a desired state nobody reported.
    let (code, out, err) = cli(&["fleet"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("things     1") && out.contains("shadows    1 (0 in sync, 1 with a delta)"),
        "{out}"
    );

    // Paging: one thing a page, a hint to the next, --all for every page;
    // columns line up under the header whatever the names' lengths.
    let long = "cli-2-with-a-name-longer-than-thirty-two-characters";
    let (code, _, err) = cli(&[
        "shadow",
        "update",
        long,
        r#"{"state":{"reported":{"on":false}}}"#,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(&["shadow", "list", "--page-size", "1"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("--next-token cli-1"), "{out}");
    let (code, out, _) = cli(&[
        "shadow",
        "list",
        "--page-size",
        "1",
        "--next-token",
        "cli-1",
    ])
    .await;
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with(long)), "{out}");
    let (code, out, _) = cli(&["shadow", "list", "--page-size", "1", "--all"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two things, no hint: {out}");
    let column = |line: &str| line.find(" no").or_else(|| line.find(" -"));
    let header_at = lines[0].find(" connected");
    assert!(lines[1..].iter().all(|l| column(l) == header_at), "{out}");
    // Search prints a table too, unless --json.
    let (code, out, _) = cli(&["shadow", "search", "shadow.hasDelta:true"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("thing"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("cli-1") && l.contains("yes")),
        "{out}"
    );

    let (code, out, err) = cli(&["changes", "--since", "0", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let events: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(events.len(), 2, "{out}");
    assert_eq!(
        (events[0]["kind"].clone(), events[0]["thing"].clone()),
        (json!("update"), json!("cli-1"))
    );

    let (code, _, err) = cli(&["shadow", "get", "nobody"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");

    // Deleting a thing: its shadows go, then it is not listed; twice is 404.
    let (code, out, err) = cli(&["thing", "delete", long]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(classic)"), "{out}");
    let (code, out, _) = cli(&["shadow", "list"]).await;
    assert_eq!(code, 0);
    assert!(!out.contains(long), "{out}");
    let (code, _, err) = cli(&["thing", "delete", long]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = cli(&["shadow", "update", "cli-1", "{not json"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not JSON"), "{err}");
}

/// What the broker answers a CONNECT with `login`: `Ok` or the refusal.
async fn connack(
    addr: SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
) -> Result<(AsyncClient, rumqttc::EventLoop), rumqttc::ConnectReturnCode> {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    loop {
        let event = tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("an answer to the CONNECT");
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok((client, eventloop)),
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Err(code),
            Err(e) => panic!("no CONNACK: {e}"),
        }
    }
}

/// `umbra passwd` writes per-device passwords; a device proves its identity
/// with its own and can use no other client id; a removed device is refused
/// after SIGHUP while connected devices stay connected.
#[tokio::test]
async fn devices_authenticate_with_their_own_passwords() {
    use rumqttc::ConnectReturnCode::{BadUserNamePassword, NotAuthorized};
    let dir = tempfile::tempdir().expect("tempdir");
    let passwd = dir.path().join("passwd");
    let passwd_arg = passwd.to_str().expect("utf-8 path");
    for (name, password) in [("lamp-1", "s3cret"), ("lamp-2", "other")] {
        let mut child = Command::new(UMBRA)
            .args(["passwd", passwd_arg, name, "--stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("umbra passwd runs");
        let mut stdin = child.stdin.take().expect("stdin");
        tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{password}\n").as_bytes())
            .await
            .expect("password written");
        drop(stdin);
        assert!(child.wait().await.expect("exits").success());
    }
    let text = std::fs::read_to_string(&passwd).expect("written");
    assert!(text.starts_with("lamp-1:$argon2id$"), "{text}");
    assert!(!text.contains("s3cret"));

    // Relative to the config file; reloaded on SIGHUP only, for this test.
    let config = dir.path().join("umbra.toml");
    std::fs::write(
        &config,
        "[mqtt]\npassword_file = \"passwd\"\npassword_file_check_ms = 3600000\n",
    )
    .expect("config written");
    let data = dir.path().join("data");
    let umbra = support::spawn_with(&data, &["--config", config.to_str().expect("utf-8")]).await;
    let addr = umbra.mqtt;

    let (lamp, mut lamp_loop) = connack(addr, "lamp-1", Some(("lamp-1", "s3cret")))
        .await
        .expect("own password");
    assert_eq!(
        connack(addr, "lamp-1", Some(("lamp-1", "wrong")))
            .await
            .err(),
        Some(BadUserNamePassword)
    );
    assert_eq!(
        connack(addr, "lamp-2", Some(("lamp-1", "s3cret")))
            .await
            .err(),
        Some(NotAuthorized),
        "lamp-1's password does not open lamp-2"
    );
    assert_eq!(
        connack(addr, "lamp-1", None).await.err(),
        Some(BadUserNamePassword)
    );
    assert!(connack(addr, "lamp-2", Some(("lamp-2", "other")))
        .await
        .is_ok());

    let (code, out, err) = run_to_exit(&["passwd", passwd_arg, "lamp-2", "-D"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let pid = umbra.child.id().expect("pid").to_string();
    let hup = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .await
        .expect("kill");
    assert!(hup.success());
    let refused = async {
        while connack(addr, "lamp-2", Some(("lamp-2", "other")))
            .await
            .is_ok()
        {}
    };
    tokio::time::timeout(WAIT, refused)
        .await
        .expect("lamp-2 refused once the file is reloaded");

    // lamp-1's connection lived through the reload.
    lamp.publish(
        "$aws/things/lamp-1/shadow/get",
        QoS::AtLeastOnce,
        false,
        "{}",
    )
    .await
    .expect("queued");
    let acked = async {
        loop {
            match lamp_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("lamp-1 was disconnected: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, acked).await.expect("puback");
}

/// `umbra backup FILE` copies the database while the server serves
/// updates; a server started on a copy of the backup has the fleet exactly
/// as of one commit (the things updated one after another form an unbroken
/// run, and the change log holds one change for each), and nothing
/// acknowledged before the backup began is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_serving_restores_as_of_one_commit() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    const THINGS: u64 = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let (live, restored) = (dir.path().join("live"), dir.path().join("restored"));
    let umbra = spawn(&live).await;
    let api = format!("http://{}", umbra.http);
    let acknowledged = std::sync::Arc::new(AtomicU64::new(0));
    let writer = {
        let (api, acknowledged) = (api.clone(), acknowledged.clone());
        // One update per thing, each acknowledged before the next is sent.
        tokio::task::spawn_blocking(move || {
            for n in 0..THINGS {
                let body = json!({"state": {"desired": {"n": n}}}).to_string();
                ureq::post(&format!("{api}/things/b-{n}/shadow"))
                    .send_string(&body)
                    .expect("update accepted");
                acknowledged.store(n + 1, SeqCst);
            }
        })
    };
    while acknowledged.load(SeqCst) < 20 {
        tokio::task::yield_now().await;
    }
    let before = acknowledged.load(SeqCst);
    let file = dir.path().join("umbra-backup.db");
    let (code, out, err) = run_to_exit(&[
        "--data-dir",
        live.to_str().expect("utf-8"),
        "backup",
        file.to_str().expect("utf-8"),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("backed up"), "{out}");
    let during = acknowledged.load(SeqCst);
    writer.await.expect("every update acknowledged");

    // Restore: the backup as the database of a fresh data directory.
    std::fs::create_dir_all(&restored).expect("mkdir");
    std::fs::copy(&file, restored.join("umbra.db")).expect("copied");
    let copy = spawn(&restored).await;
    let http = copy.http;
    let present = move |n: u64| {
        let url = format!("http://{http}/things/b-{n}/shadow");
        match ureq::get(&url).call() {
            Ok(reply) => {
                let shadow: Value = reply.into_json().expect("JSON");
                assert_eq!(shadow["state"]["desired"]["n"], n);
                true
            }
            Err(ureq::Error::Status(404, _)) => false,
            Err(e) => panic!("{e}"),
        }
    };
    let kept = tokio::task::spawn_blocking(move || {
        let kept = (0..THINGS).take_while(|n| present(*n)).count() as u64;
        assert!(
            (kept..THINGS).all(|n| !present(n)),
            "the things kept are an unbroken run"
        );
        kept
    })
    .await
    .expect("checked");
    assert!(
        kept >= before,
        "{kept} < {before} acknowledged before the backup"
    );
    assert!(
        kept <= during + 1,
        "{kept} > {during} acknowledged by its end"
    );
    let (code, out, err) = run_to_exit(&[
        "--api",
        &format!("http://{}", copy.http),
        "changes",
        "--since",
        "0",
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().count() as u64,
        kept,
        "one change per thing kept"
    );
    drop(umbra);
}

#[tokio::test]
async fn a_backup_without_a_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, _, err) = run_to_exit(&[
        "--data-dir",
        dir.path().to_str().expect("utf-8"),
        "backup",
        dir.path().join("b.db").to_str().expect("utf-8"),
    ])
    .await;
    assert_eq!(code, 64);
    assert!(err.contains("no database"), "{err}");
}

/// `umbra import` loads the good lines through the shadow rules, names each
/// bad line with its number and reason, and exits 65; a server started on
/// the data directory then serves, lists and searches what was imported.
#[tokio::test]
async fn import_loads_good_lines_and_names_each_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let file = dir.path().join("fleet.jsonl");
    let mut lines: Vec<String> = (0..50)
        .map(|n| {
            json!({"thing": format!("imp-{n:02}"), "state": {"desired": {"n": n}, "reported": {"n": n % 7}}})
                .to_string()
        })
        .collect();
    lines.insert(10, "{not json".into());
    lines.insert(
        20,
        json!({"thing": "imp-x", "state": {"bad": 1}}).to_string(),
    );
    lines.push(
        json!({"thing": "imp-01", "name": "cfg", "state": {"reported": {"rate": 5}}}).to_string(),
    );
    std::fs::write(&file, lines.join("\n")).expect("write");
    let (code, out, err) = run_to_exit(&[
        "--data-dir",
        data.to_str().expect("utf-8"),
        "import",
        file.to_str().expect("utf-8"),
    ])
    .await;
    assert_eq!(code, 65, "{out}{err}");
    assert!(err.contains("line 11: not an import line"), "{err}");
    assert!(
        err.contains("line 21: State contains an invalid node"),
        "{err}"
    );
    assert!(out.contains("imported 51 shadows from 53 lines"), "{out}");
    assert!(out.contains("2 lines refused"), "{out}");

    let umbra = spawn(&data).await;
    let api = format!("http://{}", umbra.http);
    let shadows = tokio::task::spawn_blocking(move || {
        let get = |path: &str| -> Value {
            ureq::get(&format!("{api}{path}"))
                .call()
                .expect("answered")
                .into_json()
                .expect("JSON")
        };
        let shadow = get("/things/imp-07/shadow");
        assert_eq!(shadow["state"]["delta"], json!({"n": 7}));
        assert_eq!(shadow["version"], 1);
        let cfg = get("/things/imp-01/shadow?name=cfg");
        assert_eq!(cfg["state"]["reported"]["rate"], 5);
        // Searched once the fleet index has loaded what was imported.
        while ureq::get(&format!("{api}/readyz")).call().is_err() {
            std::thread::yield_now();
        }
        let found = get("/v1/search?q=shadow.reported.n:3&pageSize=100");
        found["things"].as_array().map_or(0, Vec::len)
    })
    .await
    .expect("checked");
    // n % 7 == 3 for n in 0..50: 3, 10, 17, 24, 31, 38, 45.
    assert_eq!(shadows, 7);
}

/// A second `umbra` (server or import) on a data directory in use is
/// refused with exit 64 naming the process, and loses nothing.
#[tokio::test]
async fn a_second_umbra_on_one_data_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let umbra = spawn(dir.path()).await;
    let data = dir.path().to_str().expect("utf-8");
    let (code, _, err) = run_to_exit(&[&FREE_PORTS[..], &["--data-dir", data]].concat()).await;
    assert_eq!(code, 64, "{err}");
    let pid = umbra.child.id().expect("running");
    assert!(
        err.contains(&format!("is in use by another umbra process (pid {pid})")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = run_to_exit(&["--data-dir", data, "import", "-"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("in use by another umbra process"), "{err}");
}

/// With `--store-url` the shadows live in PostgreSQL: an import and a
/// device's acknowledged updates survive kill -9 and a restart on another
/// (empty) data directory, and the fleet index loads from PostgreSQL.
#[tokio::test]
#[ignore = "needs postgresql"]
async fn with_a_store_url_shadows_live_in_postgresql() {
    let db = postgres::TestDatabase::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("fleet.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|n| {
            json!({"thing": format!("pg-imp-{n:02}"), "state": {"reported": {"n": n % 4}}})
                .to_string()
        })
        .collect();
    std::fs::write(&file, lines.join("\n")).expect("write");
    let store = ["--store-url", db.url.as_str()];
    let path = file.to_str().expect("utf-8");
    let (code, out, err) = run_to_exit(&[&store[..], &["import", path]].concat()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("imported 20 shadows"), "{out}");
    assert!(
        out.contains("PostgreSQL") && !out.contains("umbra:umbra"),
        "{out}"
    );

    let mut umbra = spawn_with(&dir.path().join("first"), &store).await;
    let acknowledged = report_counts(umbra.mqtt, "pg-k9", 3, 10).await;
    umbra.child.kill().await.expect("SIGKILL");

    let second = dir.path().join("second");
    let umbra = spawn_with(&second, &store).await;
    for (thing, version) in acknowledged {
        let doc = get_shadow(umbra.mqtt, &thing).await;
        assert_eq!(doc["version"].as_u64(), Some(10), "{thing}");
        assert_eq!(doc["version"].as_u64(), Some(version), "{thing}");
        assert_eq!(doc["state"]["reported"]["i"], 9, "{thing}");
    }
    let api = format!("http://{}", umbra.http);
    let found = tokio::task::spawn_blocking(move || {
        while ureq::get(&format!("{api}/readyz")).call().is_err() {
            std::thread::yield_now();
        }
        let found: Value = ureq::get(&format!("{api}/v1/search?q=shadow.reported.n:3"))
            .call()
            .expect("answered")
            .into_json()
            .expect("JSON");
        found["things"].as_array().map_or(0, Vec::len)
    })
    .await
    .expect("searched");
    assert_eq!(found, 5, "n % 4 == 3 for 5 of 20 imported things");
    assert!(
        !second.join("umbra.db").exists(),
        "nothing is kept in SQLite"
    );
}

/// GET `url` as JSON, off the async runtime; `None` unless 200.
async fn get_json(url: String) -> Option<Value> {
    tokio::task::spawn_blocking(move || ureq::get(&url).call().ok()?.into_json().ok())
        .await
        .expect("http call")
}

/// Waits until `/readyz` on `http` answers 200.
async fn ready(http: SocketAddr) {
    let url = format!("http://{http}/readyz");
    let is_ready = move || {
        let url = url.clone();
        tokio::task::spawn_blocking(move || ureq::get(&url).call().is_ok())
    };
    tokio::time::timeout(WAIT, async {
        while !is_ready().await.expect("http call") {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("ready in time");
}

/// A device that reports a rising counter, one update at a time, until
/// `stop`: each update is sent again (same clientToken) when no answer comes
/// within 2 s. Reports each acknowledged (counter, version).
async fn count_up(
    broker: SocketAddr,
    thing: String,
    acked: mpsc::UnboundedSender<(String, u64, u64)>,
    stop: tokio_util::sync::CancellationToken,
) {
    let (client, mut answers) = device(broker, &thing).await;
    let topic = format!("$aws/things/{thing}/shadow/update");
    let mut i = 0u64;
    while !stop.is_cancelled() {
        let token = i.to_string();
        let body = json!({"state": {"reported": {"i": i}}, "clientToken": token});
        client
            .publish(&topic, QoS::AtLeastOnce, false, body.to_string())
            .await
            .expect("publish");
        let answered = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(answer) = answers.recv().await {
                if answer["clientToken"].as_str() == Some(token.as_str()) {
                    return answer["version"].as_u64();
                }
            }
            None
        })
        .await;
        if let Ok(Some(version)) = answered {
            let _ = acked.send((thing.clone(), i, version));
            i += 1;
        }
    }
}

/// The issue's check: two attached nodes on one Mosquitto and one
/// PostgreSQL, one of them killed with SIGKILL under load and started
/// again, three times. No acknowledged update is lost, no shadow's version
/// repeats or skips, and the other node keeps answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and postgresql"]
async fn kill_9_of_an_attached_node_loses_no_acknowledged_update() {
    const DEVICES: usize = 20;
    let mosquitto = umbra_tests::Mosquitto::start_remapping_requests();
    let db = postgres::TestDatabase::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |node: &str| {
        let path = dir.path().join(format!("{node}.toml"));
        let text = format!(
            "[shadow]\nrequests_per_second = 0\nmax_in_flight = 0\n[store]\nurl = {:?}\n\
             [mqtt]\nattach = {:?}\n[mqtt.attach_client]\nclient_id = \"umbra-{node}\"\n\
             request_prefix = {:?}\n",
            db.url,
            mosquitto.url(),
            umbra_tests::REMAPPED_REQUESTS
        );
        std::fs::write(&path, text).expect("config");
        path.to_str().expect("utf-8").to_string()
    };
    let (config_a, config_b) = (config("a"), config("b"));
    let node = |config: &str, data: &str| {
        let data = dir.path().join(data);
        let args = ["--config".to_string(), config.to_string()];
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            support::spawn_attached(&data, &args).await
        }
    };
    let mut a = node(&config_a, "a").await;
    let b = node(&config_b, "b").await;
    ready(a.http).await;
    ready(b.http).await;

    let broker = SocketAddr::from(([127, 0, 0, 1], mosquitto.port));
    let stop = tokio_util::sync::CancellationToken::new();
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel();
    let mut devices = Vec::new();
    for d in 0..DEVICES {
        let thing = format!("k9a-{d:02}");
        devices.push(tokio::spawn(count_up(
            broker,
            thing,
            acked_tx.clone(),
            stop.clone(),
        )));
    }
    drop(acked_tx);
    let mut last: std::collections::HashMap<String, (u64, u64)> = Default::default();
    // Every device gets `more` further updates acknowledged.
    let mut progress = async |more: u64| {
        let start: std::collections::HashMap<String, u64> =
            last.iter().map(|(t, (i, _))| (t.clone(), *i)).collect();
        let behind = |last: &std::collections::HashMap<String, (u64, u64)>| {
            last.len() < DEVICES
                || last
                    .iter()
                    .any(|(t, (i, _))| *i < start.get(t).copied().unwrap_or(0) + more)
        };
        while behind(&last) {
            let (thing, i, version) = tokio::time::timeout(WAIT, acked_rx.recv())
                .await
                .expect("devices keep being answered")
                .expect("devices run");
            last.insert(thing, (i, version));
        }
    };
    progress(3).await;
    for _ in 0..3 {
        a.child.kill().await.expect("SIGKILL");
        // The other node alone keeps answering.
        progress(3).await;
        a = node(&config_a, "a").await;
        ready(a.http).await;
        progress(3).await;
    }
    stop.cancel();
    for device in devices {
        device.await.expect("device");
    }
    while let Some((thing, i, version)) = acked_rx.recv().await {
        last.insert(thing, (i, version));
    }
    for (thing, (i, version)) in &last {
        let shadow = get_json(format!("http://{}/things/{thing}/shadow", b.http))
            .await
            .expect("shadow");
        let stored = shadow["version"].as_u64().unwrap_or(0);
        assert!(
            stored >= *version,
            "{thing}: acknowledged {version}, stored {shadow}"
        );
        let reported = shadow["state"]["reported"]["i"].as_u64().unwrap_or(0);
        assert!(
            reported >= *i,
            "{thing}: acknowledged i={i}, stored {shadow}"
        );
        let mut versions: Vec<u64> = Vec::new();
        let mut next = String::new();
        loop {
            let url = format!(
                "http://{}/v1/things/{thing}/shadow/changes?since_version=0{next}",
                b.http
            );
            let page = get_json(url).await.expect("changes");
            let changes = page["changes"].as_array().cloned().unwrap_or_default();
            versions.extend(changes.iter().filter_map(|c| c["version"].as_u64()));
            match page["nextToken"].as_str() {
                Some(token) => next = format!("&nextToken={token}"),
                None => break,
            }
        }
        assert_eq!(versions, (1..=stored).collect::<Vec<_>>(), "{thing}");
    }
}

/// Attached over TLS to a broker whose certificate its CA did not sign, a
/// node refuses the connection: it logs why, keeps trying, and is not ready.
#[tokio::test]
#[ignore = "needs mosquitto"]
async fn an_attached_node_refuses_a_broker_its_ca_did_not_sign() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    umbra_broker::certs::make_ca(&certs).expect("ca");
    let cert = umbra_broker::certs::make_server(&certs, &["localhost".into()]).expect("server");
    let (mosquitto, tls_port) =
        umbra_tests::Mosquitto::start_remapping_requests_with_tls(&cert, &certs.join("server.key"));
    let stranger = umbra_broker::certs::make_ca(&dir.path().join("stranger")).expect("ca");
    let config = dir.path().join("umbra.toml");
    let text = format!(
        "[mqtt]\nattach = \"mqtts://localhost:{tls_port}\"\n[mqtt.attach_client]\n\
         ca_file = {:?}\nrequest_prefix = {:?}\n",
        stranger,
        umbra_tests::REMAPPED_REQUESTS
    );
    std::fs::write(&config, text).expect("config");
    let config = config.to_str().expect("utf-8");
    let (node, mut log) = support::spawn_attached_logging(dir.path(), &["--config", config]).await;
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            let line = log.recv().await.expect("umbra runs");
            if line.contains("lost the broker") {
                break line;
            }
        }
    })
    .await
    .expect("the refusal is logged");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    let url = format!("http://{}/readyz", node.http);
    let status = tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
        Ok(response) => response.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(other) => panic!("readyz: {other}"),
    })
    .await
    .expect("http call");
    assert_eq!(status, 503, "not ready without its broker");
    drop(node);
    drop(mosquitto);
}

/// A PostgreSQL store that cannot be reached stops the start with a message
/// that says so (it used to panic while the store's runtime was dropped).
#[tokio::test]
async fn an_unreachable_store_is_reported_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8");
    let url = "postgres://umbra:secret@127.0.0.1:1/umbra";
    let args = [&FREE_PORTS[..], &["--data-dir", data, "--store-url", url]].concat();
    let (code, _, err) = run_to_exit(&args).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot open the shadow store: postgresql"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("secret"),
        "{err}"
    );
}
