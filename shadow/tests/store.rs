//! The service over a real SQLite file: durability across reopen, concurrent
//! updates, delete and recreate, and the shapes of every answer.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};
use umbra_shadow::fleet::IndexStatus;
use umbra_shadow::store::{
    change_entry_bytes, ChangeKind, PostgresConfig, PostgresStore, ShadowStore, SnapshotPart,
    StoreError,
};
use umbra_shadow::{Limits, Message, Operation, Request, ShadowKey, SqliteStore, StoreConfig};

#[macro_use]
mod support;

use support::{unlimited, TestStore};

/// The versions each task's accepted updates got, by shadow: `total` in
/// all, and each shadow's running 1..=n (none repeated or skipped).
async fn contiguous_versions(
    tasks: Vec<tokio::task::JoinHandle<Vec<(usize, u64)>>>,
    total: usize,
) -> HashMap<usize, Vec<u64>> {
    let mut per_shadow: HashMap<usize, Vec<u64>> = HashMap::new();
    for task in tasks {
        for (s, v) in task.await.expect("task") {
            per_shadow.entry(s).or_default().push(v);
        }
    }
    assert_eq!(per_shadow.values().map(Vec::len).sum::<usize>(), total);
    for (s, versions) in &mut per_shadow {
        versions.sort_unstable();
        let want: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, &want, "versions of dev-{s} are not contiguous");
    }
    per_shadow
}

fn req(key: &ShadowKey, op: Operation, payload: Value) -> Request {
    Request {
        key: key.clone(),
        op,
        payload: serde_json::to_vec(&payload).unwrap_or_default().into(),
        client: "test".into(),
        user_properties: None,
    }
}

on_both_stores! {
    #[tokio::test]
    async fn shadows_survive_reopen(store: TestStore) {
        let keys = [
            ShadowKey::classic("a"),
            ShadowKey::named("a", "cfg"),
            ShadowKey::classic("b"),
        ];
        let mut before = Vec::new();
        {
            let (service, outbox) = store.start(unlimited());
            drop(outbox);
            for (i, key) in keys.iter().enumerate() {
                for n in 0..=i {
                    let body = json!({"state": {"desired": {"n": n, "l": [1, {"x": n}]}, "reported": {"n": 0}}});
                    assert!(service
                        .handle(req(key, Operation::Update, body))
                        .await
                        .result
                        .is_ok());
                }
                before.push(
                    service
                        .handle(req(key, Operation::Get, json!({})))
                        .await
                        .reply_json(),
                );
            }
            service.close().await;
        }
        let (service, outbox) = store.start(unlimited());
        drop(outbox);
        for (key, want) in keys.iter().zip(&before) {
            let mut got = service
                .handle(req(key, Operation::Get, json!({})))
                .await
                .reply_json();
            let mut want = want.clone();
            // The answer's own timestamp is the time of the get, not stored state.
            got["timestamp"] = Value::Null;
            want["timestamp"] = Value::Null;
            assert_eq!(got, want, "{key}");
        }
        assert_eq!(before[2]["version"], 3);
        service.close().await;
    }
}

on_both_stores! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_updates_lose_nothing_and_versions_are_contiguous(store: TestStore) {
        const TASKS: usize = 64;
        const SHADOWS: usize = 1000;
        const UPDATES_PER_TASK: usize = 100;
        let (service, mut outbox) = store.start(unlimited());
        // Everything published, in order, as the broker would see it.
        let published = tokio::spawn(async move {
            let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
            while let Some(m) = outbox.recv().await {
                if m.topic.ends_with("/update/accepted") {
                    let body: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                    let v = body["version"].as_u64().unwrap_or(0);
                    seen.entry(m.topic).or_default().push(v);
                }
            }
            seen
        });
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let service = Arc::clone(&service);
            tasks.push(tokio::spawn(async move {
                let mut accepted: Vec<(usize, u64)> = Vec::new();
                for i in 0..UPDATES_PER_TASK {
                    let s = (t * 7919 + i * 104_729) % SHADOWS;
                    let key = ShadowKey::classic(format!("dev-{s}"));
                    let body = json!({"state": {"reported": {format!("t{t}"): i}}});
                    let answer = service.handle(req(&key, Operation::Update, body)).await;
                    let v = answer.result.expect("update accepted");
                    accepted.push((s, v));
                }
                accepted
            }));
        }
        let per_shadow = contiguous_versions(tasks, TASKS * UPDATES_PER_TASK).await;
        for (s, versions) in &per_shadow {
            let key = ShadowKey::classic(format!("dev-{s}"));
            let stored = service.store().load(&key).expect("load").expect("exists");
            assert_eq!(stored.version, versions.len() as u64);
        }
        service.close().await;
        drop(service);
        let seen = published.await.expect("publisher");
        for (topic, versions) in seen {
            let mut sorted = versions.clone();
            sorted.sort_unstable();
            assert_eq!(
                versions, sorted,
                "answers on {topic} left out of version order"
            );
        }
    }
}

on_both_stores! {
    #[tokio::test]
    async fn delete_then_get_is_404_and_recreate_continues_the_version(store: TestStore) {
        let (service, outbox) = store.start(Limits::default());
        drop(outbox);
        let key = ShadowKey::named("lamp", "cfg");
        for _ in 0..3 {
            let a = service
                .handle(req(
                    &key,
                    Operation::Update,
                    json!({"state": {"desired": {"on": true}}}),
                ))
                .await;
            assert!(a.result.is_ok());
        }
        let del = service
            .handle(req(&key, Operation::Delete, json!({"clientToken": "d1"})))
            .await;
        assert_eq!(
            del.reply().topic,
            "$aws/things/lamp/shadow/name/cfg/delete/accepted"
        );
        let body = del.reply_json();
        assert_eq!(body["version"], 3);
        assert_eq!(body["clientToken"], "d1");

        let get = service
            .handle(req(&key, Operation::Get, json!({"clientToken": "g"})))
            .await;
        assert_eq!(
            get.reply().topic,
            "$aws/things/lamp/shadow/name/cfg/get/rejected"
        );
        let body = get.reply_json();
        assert_eq!(body["code"], 404);
        assert_eq!(body["message"], "No shadow exists with name: 'cfg'");
        assert_eq!(body["clientToken"], "g");

        let again = service
            .handle(req(&key, Operation::Delete, json!({})))
            .await;
        assert_eq!(again.reply_json()["code"], 404);

        let recreated = service
            .handle(req(
                &key,
                Operation::Update,
                json!({"state": {"reported": {"on": false}}}),
            ))
            .await;
        assert_eq!(recreated.reply_json()["version"], 4);
        let documents = recreated
            .messages
            .iter()
            .find(|m| m.topic.ends_with("/update/documents"))
            .expect("a documents message");
        assert_eq!(
            serde_json::from_slice::<Value>(&documents.payload).expect("JSON")["previous"],
            Value::Null,
            "a recreated shadow has no previous document"
        );
        let get = service
            .handle(req(&key, Operation::Get, json!({})))
            .await
            .reply_json();
        assert_eq!(
            get["state"],
            json!({"reported": {"on": false}}),
            "delete cleared the old state"
        );

        let classic = ShadowKey::classic("lamp");
        let get = service
            .handle(req(&classic, Operation::Get, json!({})))
            .await
            .reply_json();
        assert_eq!(get["message"], "No shadow exists with name: 'lamp'");

        let changes = service.store().changes_since(0, 100).expect("changes");
        let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.kind).collect();
        use ChangeKind::*;
        assert_eq!(kinds, vec![Update, Update, Update, Delete, Update]);
        assert!(changes.windows(2).all(|w| w[0].seq < w[1].seq));
        service.close().await;
    }
}

on_both_stores! {
    #[tokio::test]
    async fn answer_shapes_match_aws(store: TestStore) {
        let (service, mut outbox) = store.start(Limits::default());
        let key = ShadowKey::classic("lamp");
        let body = json!({"state": {"desired": {"color": "red", "l": [1, 2]}, "reported": {"color": "blue"}}, "clientToken": "tok"});
        let answer = service.handle(req(&key, Operation::Update, body)).await;
        let topics: Vec<&str> = answer.messages.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(
            topics,
            vec![
                "$aws/things/lamp/shadow/update/accepted",
                "$aws/things/lamp/shadow/update/documents",
                "$aws/things/lamp/shadow/update/delta",
            ]
        );
        // The outbox carries the same messages, in the same order.
        for m in &answer.messages {
            assert_eq!(outbox.recv().await.as_ref(), Some(m));
        }
        let json = |m: &Message| serde_json::from_slice::<Value>(&m.payload).unwrap_or_default();
        let accepted = json(&answer.messages[0]);
        let ts = accepted["timestamp"].as_i64().expect("timestamp");
        assert!(
            ts > 1_600_000_000 && ts < 10_000_000_000,
            "epoch seconds: {ts}"
        );
        assert_eq!(
            accepted,
            json!({
                "state": {"desired": {"color": "red", "l": [1, 2]}, "reported": {"color": "blue"}},
                "metadata": {
                    "desired": {"color": {"timestamp": ts}, "l": [{"timestamp": ts}, {"timestamp": ts}]},
                    "reported": {"color": {"timestamp": ts}}
                },
                "version": 1, "timestamp": ts, "clientToken": "tok"
            })
        );
        let documents = json(&answer.messages[1]);
        assert_eq!(documents["previous"], Value::Null, "a new shadow has none");
        assert_eq!(documents["current"]["version"], 1);
        assert_eq!(
            documents["current"]["state"]["reported"],
            json!({"color": "blue"})
        );
        assert_eq!(documents["clientToken"], "tok");
        let delta = json(&answer.messages[2]);
        assert_eq!(
            delta,
            json!({
                "state": {"color": "red", "l": [1, 2]},
                "metadata": {"color": {"timestamp": ts}, "l": [{"timestamp": ts}, {"timestamp": ts}]},
                "version": 1, "timestamp": ts, "clientToken": "tok"
            })
        );
        let get = service
            .handle(req(&key, Operation::Get, json!({"clientToken": "g"})))
            .await;
        let get = get.reply_json();
        assert_eq!(get["state"]["delta"], json!({"color": "red", "l": [1, 2]}));
        assert_eq!(
            get["state"]["desired"],
            json!({"color": "red", "l": [1, 2]})
        );
        assert_eq!(
            get["metadata"]["reported"],
            json!({"color": {"timestamp": ts}})
        );
        assert_eq!(get["version"], 1);
        assert_eq!(get["clientToken"], "g");

        let conflict = service
            .handle(req(
                &key,
                Operation::Update,
                json!({"state": {"desired": {}}, "version": 7, "clientToken": "c"}),
            ))
            .await;
        let c = conflict.reply_json();
        assert_eq!(
            conflict.reply().topic,
            "$aws/things/lamp/shadow/update/rejected"
        );
        assert_eq!(
            (
                c["code"].clone(),
                c["message"].clone(),
                c["clientToken"].clone()
            ),
            (json!(409), json!("Version conflict"), json!("c"))
        );
        service.close().await;
    }
}

on_both_stores! {
    #[tokio::test]
    async fn limits_are_enforced_with_aws_errors(store: TestStore) {
        let limits = Limits {
            max_state_bytes: 64,
            ..Limits::default()
        };
        let (service, outbox) = store.start(limits);
        drop(outbox);
        let key = ShadowKey::classic("big");
        let big = json!({"state": {"reported": {"blob": "x".repeat(100)}}});
        let a = service
            .handle(req(&key, Operation::Update, big))
            .await
            .reply_json();
        assert_eq!(
            (a["code"].clone(), a["message"].clone()),
            (
                json!(413),
                json!("The payload exceeds the maximum size allowed")
            )
        );
        assert!(
            service.store().load(&key).expect("load").is_none(),
            "nothing stored"
        );

        let bad = ShadowKey::classic("no/slash");
        let a = service.handle(req(&bad, Operation::Get, json!({}))).await;
        assert_eq!(a.reply_json()["code"], 400);
        let long = ShadowKey::named("ok", "n".repeat(65));
        assert_eq!(
            service
                .handle(req(&long, Operation::Get, json!({})))
                .await
                .reply_json()["code"],
            400
        );
        service.close().await;
    }
}

on_both_stores! {
    #[tokio::test(start_paused = true)]
    async fn a_thing_over_its_rate_gets_429_not_silence(store: TestStore) {
        let (service, outbox) = store.start(Limits::default());
        drop(outbox);
        let key = ShadowKey::classic("chatty");
        let mut codes = Vec::new();
        for i in 0..25 {
            let body = json!({"state": {"reported": {"i": i}}, "clientToken": format!("t{i}")});
            let a = service.handle(req(&key, Operation::Update, body)).await;
            codes.push(a.result.as_ref().map_or_else(|r| r.code(), |_| 200));
            if i == 24 {
                assert_eq!(a.reply_json()["message"], "Too Many Requests");
                assert_eq!(
                    a.reply_json()["clientToken"],
                    "t24",
                    "a 429 still echoes the token"
                );
            }
        }
        assert_eq!(codes.iter().filter(|c| **c == 200).count(), 20);
        assert_eq!(codes.iter().filter(|c| **c == 429).count(), 5);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let a = service
            .handle(req(
                &key,
                Operation::Update,
                json!({"state": {"reported": {"i": 99}}}),
            ))
            .await;
        assert_eq!(a.result, Ok(21));
        service.close().await;
    }
}

on_both_stores! {
    #[tokio::test]
    async fn connectivity_does_not_survive_a_restart(store: TestStore) {
        {
            let (service, outbox) = store.start(Limits::default());
            drop(outbox);
            let mut changes = service.subscribe_changes();
            assert!(service.record_presence("lamp", true, 1_000, None));
            changes.recv().await.expect("the connect is committed");
            let c = service.store().connectivity("lamp").expect("read");
            assert_eq!(c.map(|c| c.connected), Some(true));
            service.close().await;
        }
        let (service, outbox) = store.start(Limits::default());
        drop(outbox);
        let c = service
            .store()
            .connectivity("lamp")
            .expect("read")
            .expect("known");
        assert!(!c.connected, "a new process starts with nothing connected");
        assert_eq!(c.last_seen_ms, 1_000);
        service.close().await;
    }
}

on_both_stores! {
    /// Deleting a thing is an operator's act, not the device's requests: it is
    /// not held to the thing's request rate, however many shadows it has.
    #[tokio::test]
    async fn deleting_a_thing_is_not_held_to_its_request_rate(store: TestStore) {
        let limits = Limits {
            requests_per_second: 2,
            max_in_flight: 0,
            ..Limits::default()
        };
        let (service, _outbox) = store.start(unlimited());
        for name in ["a", "b", "c", "d", "e"] {
            let key = ShadowKey::named("many", name);
            let answer = service
                .handle(req(
                    &key,
                    Operation::Update,
                    json!({"state": {"reported": {"x": 1}}}),
                ))
                .await;
            assert!(answer.result.is_ok(), "{key:?}");
        }
        service.close().await;
        // Reopened with a rate of 2 a second: five deletes in one go.
        let (service, _outbox) = store.start(limits);
        let deleted = service.delete_thing("many", "test").await.expect("deleted");
        assert_eq!(deleted.shadows.len(), 5, "{deleted:?}");
        assert!(!deleted.connectivity);
        service.close().await;
    }
}

#[test]
fn a_second_store_on_one_database_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shadows.db");
    let config = || StoreConfig::new(&path);
    let (first, _committed) = SqliteStore::open(config(), Limits::default()).expect("first");
    match SqliteStore::open(config(), Limits::default()) {
        Err(StoreError::Locked { path: locked, pid }) => {
            assert_eq!(locked, path);
            assert_eq!(pid, Some(std::process::id().to_string()));
        }
        other => panic!("second store opened: {:?}", other.map(|_| ())),
    }
    first.close().expect("close");
    drop(first);
    let (second, _committed) = SqliteStore::open(config(), Limits::default()).expect("reopen");
    second.close().expect("close");
}

/// Two nodes on one PostgreSQL database update the same shadows at once:
/// every update is accepted exactly once, each shadow's versions run
/// 1..=n across both nodes, and the change log holds every change once,
/// under gap-free sequences in the order of each shadow's versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgresql"]
async fn two_nodes_on_one_database_never_repeat_or_skip_a_version() {
    const TASKS_PER_NODE: usize = 16;
    const SHADOWS: usize = 50;
    const UPDATES_PER_TASK: usize = 40;
    let store = TestStore::postgres();
    let nodes = [store.start(unlimited()).0, store.start(unlimited()).0];
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..TASKS_PER_NODE {
            let node = Arc::clone(node);
            tasks.push(tokio::spawn(async move {
                let mut accepted = Vec::new();
                for i in 0..UPDATES_PER_TASK {
                    let s = (t * 31 + i * 7 + n) % SHADOWS;
                    let key = ShadowKey::classic(format!("dev-{s}"));
                    let body = json!({"state": {"reported": {format!("n{n}t{t}"): i}}});
                    let answer = node.handle(req(&key, Operation::Update, body)).await;
                    accepted.push((s, answer.result.expect("update accepted")));
                }
                accepted
            }));
        }
    }
    let total = 2 * TASKS_PER_NODE * UPDATES_PER_TASK;
    contiguous_versions(tasks, total).await;
    let log = nodes[1]
        .store()
        .changes_since(0, total + 1)
        .expect("changes");
    let seqs: Vec<u64> = log.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>(), "gap-free");
    let mut last_version: HashMap<&str, u64> = HashMap::new();
    for change in &log {
        let last = last_version.entry(&change.thing).or_default();
        assert_eq!(change.version, *last + 1, "{change:?}");
        *last = change.version;
    }
    for node in nodes {
        node.close().await;
    }
}

on_both_stores! {
    /// A change log over its size drops its oldest entries between batches,
    /// and what it keeps is the newest, within the size.
    #[tokio::test]
    async fn a_change_log_over_its_size_keeps_the_newest_within_it(store: TestStore) {
        const LIMIT: u64 = 3000;
        let retention = support::Retention {
            bytes: LIMIT,
            ..support::Retention::default()
        };
        let (service, _outbox) = store.start_retaining(unlimited(), retention);
        let key = ShadowKey::classic("chatty");
        for n in 0..40 {
            let body = json!({"state": {"reported": {"n": n, "pad": "x".repeat(100)}}});
            assert!(service.handle(req(&key, Operation::Update, body)).await.result.is_ok());
        }
        // The writer prunes after each batch, before it takes the next: once
        // this get (a batch of its own) is answered, no pruning is due.
        let got = service.handle(req(&key, Operation::Get, json!({}))).await;
        assert!(got.result.is_ok());
        let bounds = service.store().change_log_bounds().expect("bounds");
        let oldest = bounds.oldest.expect("entries kept");
        assert_eq!(bounds.last, 40);
        assert!(oldest > 20, "oldest kept is {oldest}");
        let kept = service.store().changes_since(0, 100).expect("changes");
        let seqs: Vec<u64> = kept.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (oldest..=40).collect::<Vec<_>>());
        let bytes: u64 = kept
            .iter()
            .map(|c| change_entry_bytes(&c.thing, c.name.as_deref(), &c.document))
            .sum();
        assert!(bytes <= LIMIT, "{bytes} bytes kept");
        assert!(!bounds.retains_after(0));
        service.close().await;
    }
}

on_both_stores! {
    /// The fleet read for the index: every live shadow (not a deleted one)
    /// and every thing's connectivity, with the sequence it holds up to.
    #[tokio::test]
    async fn a_fleet_snapshot_holds_every_live_shadow_and_its_sequence(store: TestStore) {
        let (service, _outbox) = store.start(unlimited());
        for n in 0..5000 {
            let key = ShadowKey::classic(format!("t{n:04}"));
            let body = json!({"state": {"reported": {"n": n}}});
            assert!(service.handle(req(&key, Operation::Update, body)).await.result.is_ok());
        }
        let named = ShadowKey::named("t0001", "cfg");
        let body = json!({"state": {"desired": {"on": true}}});
        assert!(service.handle(req(&named, Operation::Update, body)).await.result.is_ok());
        let gone = ShadowKey::classic("t0002");
        assert!(service.handle(req(&gone, Operation::Delete, json!({}))).await.result.is_ok());
        let mut changes = service.subscribe_changes();
        assert!(service.record_presence("t0003", true, 7, None));
        while changes.recv().await.expect("change").kind != ChangeKind::Connect {}
        let (mut shadows, mut things) = (Vec::new(), Vec::new());
        let store = Arc::clone(service.store());
        let through = tokio::task::spawn_blocking(move || {
            store.fleet_snapshot(&mut |part| match part {
                SnapshotPart::Shadows(rows) => shadows.extend(rows),
                SnapshotPart::Things(rows) => things.extend(rows),
            })
            .map(|through| (through, shadows, things))
        })
        .await
        .expect("read");
        let (through, shadows, things) = through.expect("snapshot");
        assert_eq!(through, 5003);
        assert_eq!(shadows.len(), 5000);
        assert!(shadows.iter().all(|s| s.key != gone));
        let cfg = shadows.iter().find(|s| s.key == named).expect("named shadow");
        assert_eq!(cfg.version, 1);
        let state: Value = serde_json::from_str(&cfg.state).expect("state");
        assert_eq!(state["desired"], json!({"on": true}));
        assert_eq!(things.len(), 1);
        assert!(things[0].connected && things[0].last_seen_ms == 7);
        assert!(service.fleet().wait_loaded().await == IndexStatus::Ready);
        service.close().await;
    }
}

/// A start applies the schema once; a database from a newer Umbra is
/// refused with a message that says so, not misread.
#[test]
#[ignore = "needs postgresql"]
fn a_database_with_a_newer_schema_is_refused() {
    let store = TestStore::postgres();
    let TestStore::Postgres(db) = &store else {
        unreachable!("a postgresql store");
    };
    let open = || PostgresStore::open(PostgresConfig::new(&db.url), Limits::default(), None);
    let (first, _committed) = open().expect("first start creates the schema");
    first.close().expect("close");
    let (again, _committed) = open().expect("a second start finds it");
    again.close().expect("close");
    db.execute("UPDATE umbra_schema SET version = 99");
    match open() {
        Err(StoreError::Postgres(message)) => {
            assert!(message.contains("schema version 99"), "{message}")
        }
        other => panic!("opened: {:?}", other.map(|_| ())),
    }
}

/// Two nodes on one PostgreSQL database each see every node's changes:
/// both change streams deliver every change once, in sequence order, and
/// an update made through one node is found by the other's search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgresql"]
async fn each_node_sees_every_nodes_changes_once_in_order() {
    const UPDATES: u64 = 200;
    let store = TestStore::postgres();
    let nodes = [store.start(unlimited()).0, store.start(unlimited()).0];
    let mut streams: Vec<_> = nodes.iter().map(|n| n.subscribe_changes()).collect();
    for n in 0..UPDATES {
        let node = &nodes[(n % 2) as usize];
        let key = ShadowKey::classic(format!("both-{}", n % 10));
        let body = json!({"state": {"reported": {"n": n, "via": n % 2}}});
        assert!(node
            .handle(req(&key, Operation::Update, body))
            .await
            .result
            .is_ok());
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut seqs = Vec::new();
        while seqs.len() < UPDATES as usize {
            seqs.push(stream.recv().await.expect("a change").seq);
        }
        assert_eq!(seqs, (1..=UPDATES).collect::<Vec<_>>(), "node {i}");
    }
    // both-9's last update (n = 199) went through node 2; node 1 finds it.
    assert_eq!(nodes[0].fleet().wait_loaded().await, IndexStatus::Ready);
    let query =
        umbra_shadow::search::Query::parse("shadow.reported.via:1 AND shadow.reported.n:199")
            .expect("query");
    let found = nodes[0]
        .fleet()
        .search(Some(&query), None, 10, |t| t.name().to_string())
        .expect("search");
    assert_eq!(found.0, ["both-9"]);
    for node in nodes {
        node.close().await;
    }
}

/// With `ca_file`, the store speaks only TLS and verifies the server: it
/// works with the CA that signed the server's certificate (every one of
/// its connections encrypted), and is refused with any other CA.
/// `.ci/run` gives the test server such a certificate and its CA
/// (`UMBRA_TEST_POSTGRES_CA`).
#[test]
#[ignore = "needs postgresql with TLS (.ci/run sets it up)"]
fn over_tls_the_store_verifies_the_server() {
    let ca = std::env::var_os("UMBRA_TEST_POSTGRES_CA")
        .expect("UMBRA_TEST_POSTGRES_CA: the CA of the test server's certificate");
    let db = support::TestDatabase::create();
    let config = |ca_file: std::path::PathBuf| PostgresConfig {
        ca_file: Some(ca_file),
        ..PostgresConfig::new(&db.url)
    };
    let (store, _committed) =
        PostgresStore::open(config(ca.into()), unlimited(), None).expect("open over tls");
    let connections = |ssl: bool| {
        db.value(&format!(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE datname = '{}' AND ssl = {ssl}",
            db.name()
        ))
    };
    // The writer's, a reader's, and the follower's (which connects on its
    // own task, so the count is awaited).
    assert!(store.change_log_bounds().is_ok());
    let count = |ssl| {
        connections(ssl)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count(true) + count(false) < 3 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    let encrypted = count(true);
    assert!(encrypted >= 3, "{encrypted} encrypted connections");
    assert_eq!(connections(false).as_deref(), Some("0"));
    store.close().expect("close");

    let dir = tempfile::tempdir().expect("tempdir");
    let other = dir.path().join("other-ca.pem");
    let stranger =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    std::fs::write(&other, stranger.cert.pem()).expect("write ca");
    match PostgresStore::open(config(other), unlimited(), None) {
        Err(err) => {
            let err = err.to_string();
            assert!(err.to_lowercase().contains("certificate"), "{err}");
        }
        Ok(_) => panic!("a server the CA did not sign was trusted"),
    }
}

/// Over TLS the server's certificate must also name the host the URL
/// dials: the test server's names 127.0.0.1 and localhost, so a URL that
/// calls it `db.example` (reaching it through `hostaddr`) is refused.
#[test]
#[ignore = "needs postgresql with TLS (.ci/run sets it up)"]
fn over_tls_a_server_under_another_name_is_refused() {
    let ca = std::env::var_os("UMBRA_TEST_POSTGRES_CA")
        .expect("UMBRA_TEST_POSTGRES_CA: the CA of the test server's certificate");
    let db = support::TestDatabase::create();
    let pg: tokio_postgres::Config = db.url.parse().expect("test url");
    let url = format!(
        "host=db.example hostaddr=127.0.0.1 port={} user={} password={} dbname={}",
        pg.get_ports().first().copied().unwrap_or(5432),
        pg.get_user().unwrap_or_default(),
        String::from_utf8_lossy(pg.get_password().unwrap_or_default()),
        pg.get_dbname().unwrap_or_default(),
    );
    let config = PostgresConfig {
        ca_file: Some(ca.into()),
        ..PostgresConfig::new(url)
    };
    match PostgresStore::open(config, unlimited(), None) {
        Err(err) => {
            let err = err.to_string();
            assert!(err.to_lowercase().contains("certificate"), "{err}");
        }
        Ok(_) => panic!("a certificate for another name was trusted"),
    }
}

/// A search on one node finds every update another node answered before
/// it: the read waits for the node's index to take the log up to its last
/// sequence (the API's fleet routes do this before each read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgresql"]
async fn a_search_finds_what_any_node_answered_before_it() {
    let store = TestStore::postgres();
    let nodes = [store.start(unlimited()).0, store.start(unlimited()).0];
    for node in &nodes {
        assert_eq!(node.fleet().wait_loaded().await, IndexStatus::Ready);
    }
    let key = ShadowKey::classic("read-your-writes");
    for n in 0..50 {
        let (writer, reader) = (&nodes[n % 2], &nodes[(n + 1) % 2]);
        let body = json!({"state": {"reported": {"n": n}}});
        assert!(writer
            .handle(req(&key, Operation::Update, body))
            .await
            .result
            .is_ok());
        reader.fleet_caught_up().await.expect("caught up");
        let query =
            umbra_shadow::search::Query::parse(&format!("shadow.reported.n:{n}")).expect("query");
        let found = reader
            .fleet()
            .search(Some(&query), None, 10, |t| t.name().to_string())
            .expect("search");
        assert_eq!(found.0, ["read-your-writes"], "update {n}");
    }
    for node in nodes {
        node.close().await;
    }
}

/// A server's store marks every thing disconnected when it opens (its
/// broker is in-process); an import's store, opened beside a running
/// server, leaves connectivity as it is.
#[tokio::test]
#[ignore = "needs postgresql"]
async fn only_a_servers_store_resets_connectivity() {
    let store = TestStore::postgres();
    let TestStore::Postgres(db) = &store else {
        unreachable!("a postgresql store");
    };
    let (service, _outbox) = store.start(unlimited());
    let mut changes = service.subscribe_changes();
    assert!(service.record_presence("lamp", true, 1_000, None));
    changes.recv().await.expect("the connect is committed");
    let connected = || {
        let found = service.store().connectivity("lamp").expect("read");
        found.expect("known").connected
    };
    for (resets_presence, still_connected) in [(false, true), (true, false)] {
        let config = PostgresConfig {
            resets_presence,
            ..PostgresConfig::new(&db.url)
        };
        let (other, _committed) = PostgresStore::open(config, unlimited(), None).expect("open");
        other.close().expect("close");
        assert_eq!(
            connected(),
            still_connected,
            "resets_presence: {resets_presence}"
        );
    }
    service.close().await;
}
