//! `bench relay`: pure broker throughput and end-to-end latency (p2p, fan-in, fan-out), each
//! message carrying its send time so the subscriber records latency in an HDR histogram.

use crate::backoff::Backoff;
use crate::mqtt::{disconnect, error_kind, ClientSettings};
use crate::report::{ProgressLine, Summary};
use crate::stats::{Counter, LatencySeries, RunStats};
use crate::units::{Pacer, Rate};
use crate::Error;
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS, SubscribeReasonCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Bytes at the start of every payload: send time (u64 ns), publisher (u32), sequence (u32).
pub const HEADER_LEN: usize = 16;

/// How publishers and subscribers are wired to topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum RelayMode {
    /// Publisher i -> `bench/{run}/{i}` -> subscriber(s) j with j % P == i.
    P2p,
    /// All publishers -> one topic -> every subscriber.
    FanIn,
    /// One publisher -> one topic -> every subscriber.
    FanOut,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub client: ClientSettings,
    pub publishers: usize,
    pub subscribers: usize,
    pub mode: RelayMode,
    pub qos: QoS,
    pub payload: usize,
    pub duration: Duration,
    /// Per publisher.
    pub rate: Rate,
    /// How long to wait for the last messages after publishing stops.
    pub drain_timeout: Duration,
    /// Clients connecting at the same time.
    pub connect_concurrency: usize,
    pub quiet: bool,
}

/// Encodes the payload header; the rest of the payload is zero padding.
pub fn encode_payload(size: usize, sent_ns: u64, publisher: u32, seq: u32) -> Vec<u8> {
    let mut payload = vec![0u8; size.max(HEADER_LEN)];
    payload[0..8].copy_from_slice(&sent_ns.to_be_bytes());
    payload[8..12].copy_from_slice(&publisher.to_be_bytes());
    payload[12..16].copy_from_slice(&seq.to_be_bytes());
    payload
}

/// Decodes (send time ns, publisher, sequence); `None` for a payload that is not ours.
pub fn decode_payload(payload: &[u8]) -> Option<(u64, u32, u32)> {
    let header = payload.get(..HEADER_LEN)?;
    let ns = u64::from_be_bytes(header[0..8].try_into().ok()?);
    let publisher = u32::from_be_bytes(header[8..12].try_into().ok()?);
    let seq = u32::from_be_bytes(header[12..16].try_into().ok()?);
    Some((ns, publisher, seq))
}

/// The topic publisher `i` sends on and how many subscribers each publisher's messages reach.
struct Wiring {
    publisher_topics: Vec<String>,
    subscriber_filters: Vec<String>,
    fanout: Vec<u64>,
}

fn wiring(run: &str, mode: RelayMode, publishers: usize, subscribers: usize) -> Wiring {
    match mode {
        RelayMode::P2p => {
            let mut fanout = vec![0u64; publishers];
            let subscriber_filters = (0..subscribers)
                .map(|j| {
                    fanout[j % publishers] += 1;
                    format!("bench/{run}/{}", j % publishers)
                })
                .collect();
            Wiring {
                publisher_topics: (0..publishers)
                    .map(|i| format!("bench/{run}/{i}"))
                    .collect(),
                subscriber_filters,
                fanout,
            }
        }
        RelayMode::FanIn | RelayMode::FanOut => {
            let topic = format!("bench/{run}/shared");
            Wiring {
                publisher_topics: vec![topic.clone(); publishers],
                subscriber_filters: vec![topic; subscribers],
                fanout: vec![subscribers as u64; publishers],
            }
        }
    }
}

/// Shared between publisher, subscriber and controller tasks.
struct Shared {
    stats: Arc<RunStats>,
    latency: Arc<LatencySeries>,
    /// Nanoseconds are measured from this instant by every task (one process, one clock).
    epoch: Instant,
    last_receive_ns: AtomicU64,
    published: Counter,
    acked: Counter,
    connect_gate: Semaphore,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Polls until CONNACK, retrying with backoff; holds a connect-gate permit meanwhile.
/// Returns false if `cancel` fired first.
async fn connect(eventloop: &mut EventLoop, shared: &Shared, cancel: &CancellationToken) -> bool {
    let _permit = tokio::select! {
        permit = shared.connect_gate.acquire() => permit.ok(),
        _ = cancel.cancelled() => return false,
    };
    let mut backoff = Backoff::reconnect();
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = cancel.cancelled() => return false,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                shared.stats.connects.incr();
                shared.stats.connected.up();
                return true;
            }
            Ok(_) => {}
            Err(e) => {
                shared.stats.errors.add(&error_kind(&e));
                let delay = backoff.next_delay(&mut rand::thread_rng());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return false,
                }
            }
        }
    }
}

struct PublisherPlan {
    index: u32,
    topic: String,
    qos: QoS,
    payload: usize,
    rate: Rate,
    drain_timeout: Duration,
}

/// When a publisher starts (`go`), stops producing (`stop`) and gives up draining (`hard_stop`).
struct PublisherSignals {
    go: CancellationToken,
    stop: CancellationToken,
    hard_stop: CancellationToken,
}

/// Acknowledged (QoS 1) or written (QoS 0) messages of one publisher.
struct PublisherOutcome {
    index: usize,
    delivered: u64,
}

async fn publisher(
    plan: PublisherPlan,
    client: AsyncClient,
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    ready: mpsc::Sender<()>,
    signals: PublisherSignals,
) -> PublisherOutcome {
    let PublisherSignals {
        go,
        stop,
        hard_stop,
    } = signals;
    let index = plan.index as usize;
    let mut outcome = PublisherOutcome {
        index,
        delivered: 0,
    };
    if !connect(&mut eventloop, &shared, &stop).await {
        return outcome;
    }
    let _ = ready.send(()).await;

    // The producer feeds the client's bounded channel; this task drives the event loop.
    let producer = {
        let client = client.clone();
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        let go = go.clone();
        let PublisherPlan {
            index,
            topic,
            qos,
            payload,
            rate,
            ..
        } = plan;
        tokio::spawn(async move {
            tokio::select! {
                _ = go.cancelled() => {}
                _ = stop.cancelled() => return 0u64,
            }
            let mut enqueued = 0u64;
            let mut seq = 0u32;
            let mut pacer = rate.per_second().map(Pacer::new);
            'produce: loop {
                let batch = match pacer.as_mut() {
                    Some(pacer) => tokio::select! {
                        n = pacer.next_batch() => n,
                        _ = stop.cancelled() => break,
                    },
                    None => 1,
                };
                for _ in 0..batch {
                    if stop.is_cancelled() {
                        break 'produce;
                    }
                    let body = encode_payload(payload, shared.now_ns(), index, seq);
                    // Not raced against `stop`: a cancelled send may already have handed its
                    // message over, which would then go uncounted. The event loop keeps
                    // draining the channel, and dropping it ends this send with an error.
                    if client
                        .publish(topic.as_str(), qos, false, body)
                        .await
                        .is_err()
                    {
                        break 'produce;
                    }
                    enqueued += 1;
                    seq = seq.wrapping_add(1);
                }
            }
            enqueued
        })
    };

    let mut producer = Some(producer);
    let mut enqueued: Option<u64> = None;
    let mut written = 0u64;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let qos1 = plan.qos != QoS::AtMostOnce;
    let mut connected = true;
    loop {
        if let Some(total) = enqueued {
            let done = if qos1 { outcome.delivered } else { written };
            if done >= total {
                break;
            }
        }
        let deadline = drain_deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                    written += 1;
                    shared.published.incr();
                    shared.stats.messages_out.incr();
                    if !qos1 {
                        outcome.delivered += 1;
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    outcome.delivered += 1;
                    shared.acked.incr();
                }
                Ok(Event::Incoming(Packet::PubComp(_))) => {
                    outcome.delivered += 1;
                    shared.acked.incr();
                }
                Ok(_) => {}
                Err(e) => {
                    shared.stats.errors.add(&error_kind(&e));
                    shared.stats.connected.down();
                    connected = false;
                    // Unacknowledged messages are resent by rumqttc after reconnecting; give up
                    // at the drain deadline or on shutdown.
                    let limit = drain_deadline.unwrap_or(deadline);
                    match tokio::time::timeout_at(limit, connect(&mut eventloop, &shared, &hard_stop)).await {
                        Ok(true) => connected = true,
                        _ => break,
                    }
                }
            },
            joined = async { match producer.as_mut() { Some(p) => p.await, None => std::future::pending().await } } => {
                producer = None;
                enqueued = Some(joined.unwrap_or(0));
                drain_deadline = Some(tokio::time::Instant::now() + plan.drain_timeout);
            }
            _ = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => {
                shared.stats.errors.add("publisher drain timeout");
                break;
            }
        }
    }
    if connected {
        disconnect(&client, &mut eventloop, Duration::from_secs(2)).await;
        shared.stats.connected.down();
    }
    outcome
}

async fn subscriber(
    filter: String,
    qos: QoS,
    client: AsyncClient,
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    ready: mpsc::Sender<()>,
    stop: CancellationToken,
) {
    let mut announced = false;
    loop {
        if !connect(&mut eventloop, &shared, &stop).await {
            return;
        }
        if client.try_subscribe(filter.as_str(), qos).is_err() {
            shared.stats.errors.add("subscribe not queued");
        }
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = stop.cancelled() => {
                    disconnect(&client, &mut eventloop, Duration::from_secs(2)).await;
                    shared.stats.connected.down();
                    return;
                }
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let now = shared.now_ns();
                    shared.stats.messages_in.incr();
                    shared.last_receive_ns.fetch_max(now, Ordering::Relaxed);
                    match decode_payload(&publish.payload) {
                        Some((sent_ns, _, _)) => shared
                            .latency
                            .record(Duration::from_nanos(now.saturating_sub(sent_ns))),
                        None => shared.stats.errors.add("foreign payload"),
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|code| matches!(code, SubscribeReasonCode::Failure));
                    if refused {
                        shared.stats.errors.add("subscribe refused");
                    } else if !announced {
                        announced = true;
                        let _ = ready.send(()).await;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    shared.stats.errors.add(&error_kind(&e));
                    shared.stats.connected.down();
                    break;
                }
            }
        }
    }
}

/// Runs the relay benchmark and returns its summary.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<Summary, Error> {
    if config.publishers == 0 || config.subscribers == 0 {
        return Err(Error::Config(
            "publishers and subscribers must be at least 1",
        ));
    }
    if config.mode == RelayMode::FanOut && config.publishers != 1 {
        return Err(Error::Config(
            "fan-out takes exactly one publisher (--publishers 1)",
        ));
    }
    if config.payload < HEADER_LEN {
        return Err(Error::Config(
            "payload must be at least 16 bytes (send time header)",
        ));
    }
    if config.payload > config.client.max_packet_size.saturating_sub(256) {
        return Err(Error::Config(
            "payload exceeds the client's maximum packet size",
        ));
    }
    let run_id = format!("{:08x}", rand::random::<u32>());
    let wiring = wiring(&run_id, config.mode, config.publishers, config.subscribers);
    let stats = RunStats::new(&["end-to-end"]);
    let latency = stats
        .latency("end-to-end")
        .unwrap_or_else(|| Arc::new(LatencySeries::new("end-to-end")));
    let shared = Arc::new(Shared {
        stats: Arc::clone(&stats),
        latency,
        epoch: Instant::now(),
        last_receive_ns: AtomicU64::new(0),
        published: Counter::default(),
        acked: Counter::default(),
        connect_gate: Semaphore::new(config.connect_concurrency.max(1)),
    });
    let clients = config.publishers + config.subscribers;
    let (ready_tx, mut ready_rx) = mpsc::channel(clients);
    let go = CancellationToken::new();
    let stop_publishers = shutdown.child_token();
    let stop_subscribers = CancellationToken::new();
    let load_start = Instant::now();
    let progress = ProgressLine::start(&stats, load_start, config.quiet);

    let mut subscriber_tasks = JoinSet::new();
    for (j, filter) in wiring.subscriber_filters.iter().enumerate() {
        let (client, eventloop) = config.client.client(&format!("bench-sub-{run_id}-{j}"));
        subscriber_tasks.spawn(subscriber(
            filter.clone(),
            config.qos,
            client,
            eventloop,
            Arc::clone(&shared),
            ready_tx.clone(),
            stop_subscribers.clone(),
        ));
    }
    let mut publisher_tasks = JoinSet::new();
    for (i, topic) in wiring.publisher_topics.iter().enumerate() {
        let (client, eventloop) = config.client.client(&format!("bench-pub-{run_id}-{i}"));
        let plan = PublisherPlan {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            topic: topic.clone(),
            qos: config.qos,
            payload: config.payload,
            rate: config.rate,
            drain_timeout: config.drain_timeout,
        };
        publisher_tasks.spawn(publisher(
            plan,
            client,
            eventloop,
            Arc::clone(&shared),
            ready_tx.clone(),
            PublisherSignals {
                go: go.clone(),
                stop: stop_publishers.clone(),
                hard_stop: shutdown.clone(),
            },
        ));
    }
    drop(ready_tx);

    // Start only when every subscription is confirmed, so no message can miss its subscriber.
    let ready_deadline = Duration::from_secs(30 + clients as u64 / 50);
    let mut ready = 0usize;
    let all_ready = tokio::time::timeout(ready_deadline, async {
        while ready < clients {
            tokio::select! {
                got = ready_rx.recv() => match got {
                    Some(()) => ready += 1,
                    None => return false,
                },
                _ = shutdown.cancelled() => return false,
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if !all_ready {
        stop_publishers.cancel();
        stop_subscribers.cancel();
        while publisher_tasks.join_next().await.is_some() {}
        while subscriber_tasks.join_next().await.is_some() {}
        progress.stop().await;
        return Err(Error::NotReady {
            ready,
            total: clients,
        });
    }

    let measure_start = Instant::now();
    let start_ns = shared.now_ns();
    go.cancel();
    tokio::select! {
        _ = tokio::time::sleep(config.duration) => {}
        _ = shutdown.cancelled() => {}
    }
    stop_publishers.cancel();
    let window = measure_start.elapsed();

    let mut delivered = vec![0u64; config.publishers];
    while let Some(joined) = publisher_tasks.join_next().await {
        match joined {
            Ok(outcome) => delivered[outcome.index] = outcome.delivered,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    let sent: u64 = delivered.iter().sum();
    let expected: u64 = delivered
        .iter()
        .zip(&wiring.fanout)
        .map(|(d, f)| d * f)
        .sum();

    // Drain: wait for the expected count, giving up after a second without progress.
    let drain_started = Instant::now();
    let mut last = (stats.messages_in.get(), Instant::now());
    while stats.messages_in.get() < expected
        && drain_started.elapsed() < config.drain_timeout
        && last.1.elapsed() < Duration::from_secs(1)
        && !shutdown.is_cancelled()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = stats.messages_in.get();
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    stop_subscribers.cancel();
    while let Some(joined) = subscriber_tasks.join_next().await {
        if let Err(e) = joined {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    progress.stop().await;

    let received = stats.messages_in.get();
    let mut summary = Summary::from_stats(
        &format!("bench relay {:?}", config.mode).to_lowercase(),
        &config.client.broker.to_string(),
        &stats,
        window,
    );
    let receive_window = Duration::from_nanos(
        shared
            .last_receive_ns
            .load(Ordering::Relaxed)
            .saturating_sub(start_ns),
    )
    .max(window);
    summary.messages_in_per_s = received as f64 / receive_window.as_secs_f64().max(1e-9);
    let qos_level = match config.qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    };
    for (name, value) in [
        ("publishers", config.publishers as u64),
        ("subscribers", config.subscribers as u64),
        ("qos", qos_level),
        ("payload_bytes", config.payload as u64),
        ("published", shared.published.get()),
        ("sent", sent),
        ("expected", expected),
        ("received", received),
        ("lost", expected.saturating_sub(received)),
        ("extra", received.saturating_sub(expected)),
    ] {
        summary.counts.insert(name.to_owned(), value);
    }
    summary.rates.insert(
        "sent".to_owned(),
        sent as f64 / window.as_secs_f64().max(1e-9),
    );
    summary
        .rates
        .insert("received".to_owned(), summary.messages_in_per_s);
    summary.notes.push(if qos_level == 0 {
        "sent = publishes written to the socket".to_owned()
    } else {
        "sent = publishes acknowledged by the broker".to_owned()
    });
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let payload = encode_payload(64, 123_456_789, 7, 42);
        assert_eq!(payload.len(), 64);
        assert_eq!(decode_payload(&payload), Some((123_456_789, 7, 42)));
        assert_eq!(encode_payload(3, 1, 2, 3).len(), HEADER_LEN);
        assert_eq!(decode_payload(&[1, 2, 3]), None);
    }

    #[test]
    fn wiring_counts_fanout() {
        let p2p = wiring("r", RelayMode::P2p, 5, 5);
        assert_eq!(p2p.publisher_topics[3], "bench/r/3");
        assert_eq!(p2p.subscriber_filters[3], "bench/r/3");
        assert_eq!(p2p.fanout, vec![1; 5]);
        let uneven = wiring("r", RelayMode::P2p, 2, 5);
        assert_eq!(uneven.fanout, vec![3, 2]);
        let fan_in = wiring("r", RelayMode::FanIn, 4, 3);
        assert_eq!(fan_in.fanout, vec![3; 4]);
        assert!(fan_in
            .subscriber_filters
            .iter()
            .all(|f| f == "bench/r/shared"));
    }
}
