//! `bench shadow`: every device updates its own shadow as fast as answers come back (at most K
//! in flight), measuring durable updates per second (update/accepted) and update -> accepted
//! latency, and counting rejections by code. After the measured window, devices stop sending and
//! wait (up to a drain timeout) for the answers still owed, so `unanswered` counts requests the
//! service never answered, not requests cut off by the end of the window.

use crate::backoff::Backoff;
use crate::mqtt::{disconnect, error_kind, ClientSettings, ShadowAnswer, ShadowTopics};
use crate::operator::thing_name;
use crate::report::{ProgressLine, Summary};
use crate::stats::{Counter, LatencySeries, RunStats};
use crate::Error;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeFilter};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct ShadowBenchConfig {
    pub client: ClientSettings,
    pub devices: usize,
    pub first: usize,
    pub prefix: String,
    pub duration: Duration,
    /// Updates in flight per device.
    pub inflight: usize,
    pub ramp: f64,
    /// How long to wait for answers still owed after the window.
    pub drain_timeout: Duration,
    /// Also subscribe to `update/delta` and `update/documents` (as many SDK clients do), not
    /// only to the answers the benchmark reads.
    pub all_answers: bool,
    /// Time a device waits after an accepted update before its next one (`ZERO`: none).
    pub interval: Duration,
    /// Also run one more device (`{prefix}flood`) that publishes updates at QoS 0 as fast as
    /// its connection takes them, without waiting for answers; the other devices' figures
    /// show what it costs them.
    pub flood: bool,
    pub quiet: bool,
}

struct Shared {
    stats: Arc<RunStats>,
    latency: Arc<LatencySeries>,
    accepted: Counter,
    rejected: Counter,
    unanswered: Counter,
}

/// The `clientToken` and error `code` of an answer; `None` when it is not a JSON object.
fn token_of(payload: &[u8]) -> Option<(Option<String>, Option<u64>)> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let object = value.as_object()?;
    let token = object
        .get("clientToken")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Some((token, object.get("code").and_then(Value::as_u64)))
}

#[allow(clippy::too_many_arguments)]
async fn bench_device(
    thing: String,
    inflight: usize,
    interval: Duration,
    all_answers: bool,
    client: AsyncClient,
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    ready: mpsc::Sender<()>,
    go: CancellationToken,
    window_over: CancellationToken,
    stop: CancellationToken,
) {
    let topics = ShadowTopics::new(&thing);
    let mut in_flight: HashMap<String, Instant> = HashMap::with_capacity(inflight);
    let mut seq = 0u64;
    let mut connected = false;
    let mut subscribed = false;
    let mut reconnect = Backoff::reconnect();
    let mut throttle = Backoff::throttled();
    let mut paused_until: Option<TokioInstant> = None;
    let mut announced = false;
    loop {
        // Refill the window while running and not throttled.
        let draining = window_over.is_cancelled();
        if draining && in_flight.is_empty() {
            break;
        }
        let sending = go.is_cancelled() && !draining && !stop.is_cancelled() && subscribed;
        let throttled = paused_until.is_some_and(|t| t > TokioInstant::now());
        if sending && !throttled {
            paused_until = None;
            while in_flight.len() < inflight {
                seq += 1;
                let token = format!("{thing}:{seq}");
                let body = serde_json::json!({
                    "state": { "reported": { "counter": seq } },
                    "clientToken": token,
                })
                .to_string();
                if client
                    .try_publish(topics.update.as_str(), QoS::AtLeastOnce, false, body)
                    .is_err()
                {
                    break;
                }
                in_flight.insert(token, Instant::now());
            }
        }
        let pause = paused_until;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = go.cancelled(), if !go.is_cancelled() => {}
            _ = window_over.cancelled(), if !window_over.is_cancelled() => {}
            _ = async { match pause { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                paused_until = None;
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    reconnect.reset();
                    shared.stats.connects.incr();
                    shared.stats.connected.up();
                    let mut filters = vec![
                        SubscribeFilter::new(topics.update_accepted.clone(), QoS::AtLeastOnce),
                        SubscribeFilter::new(topics.update_rejected.clone(), QoS::AtLeastOnce),
                    ];
                    if all_answers {
                        filters.push(SubscribeFilter::new(topics.update_delta.clone(), QoS::AtLeastOnce));
                        filters.push(SubscribeFilter::new(format!("{}/documents", topics.update), QoS::AtLeastOnce));
                    }
                    if client.try_subscribe_many(filters).is_err() {
                        shared.stats.errors.add("subscribe not queued");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subscribed = true;
                    if !announced {
                        announced = true;
                        let _ = ready.send(()).await;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    shared.stats.messages_in.incr();
                    let kind = ShadowAnswer::of(&publish.topic);
                    let Some((token, code)) = token_of(&publish.payload) else {
                        shared.stats.errors.add("malformed shadow answer");
                        continue;
                    };
                    let Some(token) = token else {
                        // Which request it answers is unknown: that request stays in flight
                        // and counts as unanswered if nothing else answers it.
                        if kind == ShadowAnswer::UpdateRejected {
                            let code = code.unwrap_or(0);
                            shared.stats.rejected.add(&format!("{code} without clientToken"));
                        }
                        shared.stats.errors.add("answer without clientToken");
                        continue;
                    };
                    let Some(sent) = in_flight.remove(&token) else { continue };
                    match kind {
                        ShadowAnswer::UpdateAccepted => {
                            shared.accepted.incr();
                            shared.latency.record(sent.elapsed());
                            throttle.reset();
                            if !interval.is_zero() {
                                paused_until = Some(TokioInstant::now() + interval);
                            }
                        }
                        ShadowAnswer::UpdateRejected => {
                            shared.rejected.incr();
                            let code = code.unwrap_or(0);
                            shared.stats.rejected.add(&code.to_string());
                            if code == 429 {
                                let delay = throttle.next_delay(&mut rand::thread_rng());
                                paused_until = Some(TokioInstant::now() + delay);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => shared.stats.messages_out.incr(),
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        connected = false;
                        shared.stats.connected.down();
                    }
                    subscribed = false;
                    // Answers to requests of the lost session will not come.
                    shared.unanswered.add(in_flight.len() as u64);
                    in_flight.clear();
                    shared.stats.errors.add(&error_kind(&e));
                    let delay = reconnect.next_delay(&mut rand::thread_rng());
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            },
        }
    }
    shared.unanswered.add(in_flight.len() as u64);
    if connected {
        disconnect(&client, &mut eventloop, Duration::from_secs(2)).await;
        shared.stats.connected.down();
    }
}

/// The flooding device: QoS 0 updates of its own shadow as fast as its client takes them,
/// from `go` to `window_over`; it reads no answers. Returns how many it sent.
async fn flood_device(
    thing: String,
    client: AsyncClient,
    mut eventloop: EventLoop,
    go: CancellationToken,
    window_over: CancellationToken,
    stop: CancellationToken,
) -> u64 {
    let topic = ShadowTopics::new(&thing).update;
    let body = serde_json::json!({ "state": { "reported": { "flood": true } } }).to_string();
    let mut sent = 0u64;
    loop {
        let flooding = go.is_cancelled();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = window_over.cancelled() => break,
            _ = go.cancelled(), if !flooding => {}
            event = eventloop.poll() => {
                if event.is_err() {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            }
            queued = client.publish(topic.as_str(), QoS::AtMostOnce, false, body.clone()), if flooding => {
                if queued.is_ok() {
                    sent += 1;
                }
            }
        }
    }
    disconnect(&client, &mut eventloop, Duration::from_secs(2)).await;
    sent
}

/// Runs the shadow benchmark: connect and subscribe every device, then update for `duration`.
pub async fn run(config: ShadowBenchConfig, shutdown: CancellationToken) -> Result<Summary, Error> {
    if config.devices == 0 {
        return Err(Error::Config("--devices must be at least 1"));
    }
    if !(config.ramp.is_finite() && config.ramp > 0.0) {
        return Err(Error::Config("--ramp must be positive"));
    }
    let stats = RunStats::new(&["update->accepted"]);
    let shared = Arc::new(Shared {
        latency: stats
            .latency("update->accepted")
            .unwrap_or_else(|| Arc::new(LatencySeries::new("update->accepted"))),
        stats: Arc::clone(&stats),
        accepted: Counter::default(),
        rejected: Counter::default(),
        unanswered: Counter::default(),
    });
    let (ready_tx, mut ready_rx) = mpsc::channel(config.devices);
    let go = CancellationToken::new();
    let window_over = CancellationToken::new();
    let stop = shutdown.child_token();
    let started = Instant::now();
    let progress = ProgressLine::start(&stats, started, config.quiet);
    let mut devices = JoinSet::new();
    let spacing = Duration::from_secs_f64(1.0 / config.ramp);
    let ramp_start = TokioInstant::now();
    for n in 0..config.devices {
        tokio::select! {
            _ = tokio::time::sleep_until(ramp_start + spacing.mul_f64(n as f64)) => {}
            _ = stop.cancelled() => break,
        }
        let thing = thing_name(&config.prefix, config.first + n);
        let (client, eventloop) = config.client.client(&thing);
        devices.spawn(bench_device(
            thing,
            config.inflight,
            config.interval,
            config.all_answers,
            client,
            eventloop,
            Arc::clone(&shared),
            ready_tx.clone(),
            go.clone(),
            window_over.clone(),
            stop.clone(),
        ));
    }
    drop(ready_tx);
    let flooder = config.flood.then(|| {
        let thing = format!("{}flood", config.prefix);
        let (client, eventloop) = config.client.client(&thing);
        tokio::spawn(flood_device(
            thing,
            client,
            eventloop,
            go.clone(),
            window_over.clone(),
            stop.clone(),
        ))
    });
    let mut ready = 0;
    let all_ready = tokio::time::timeout(Duration::from_secs(30), async {
        while ready < config.devices {
            tokio::select! {
                got = ready_rx.recv() => match got { Some(()) => ready += 1, None => return false },
                _ = stop.cancelled() => return false,
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if !all_ready {
        stop.cancel();
        while devices.join_next().await.is_some() {}
        progress.stop().await;
        return Err(Error::NotReady {
            ready,
            total: config.devices,
        });
    }
    let measure_start = Instant::now();
    go.cancel();
    tokio::select! {
        _ = tokio::time::sleep(config.duration) => {}
        _ = stop.cancelled() => {}
    }
    let window = measure_start.elapsed();
    let accepted_in_window = shared.accepted.get();
    window_over.cancel();
    let drain = async {
        while let Some(joined) = devices.join_next().await {
            if let Err(e) = joined {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    };
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {}
        _ = tokio::time::sleep(config.drain_timeout) => {
            // Answers still owed now are counted as unanswered.
            stop.cancel();
            drain.await;
        }
    }
    stop.cancel();
    let flood_sent = match flooder {
        Some(task) => Some(match task.await {
            Ok(sent) => sent,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => 0,
        }),
        None => None,
    };
    progress.stop().await;
    let mut summary = Summary::from_stats(
        "bench shadow",
        &config.client.broker.to_string(),
        &stats,
        window,
    );
    summary
        .counts
        .insert("devices".to_owned(), config.devices as u64);
    summary
        .counts
        .insert("inflight_per_device".to_owned(), config.inflight as u64);
    summary
        .counts
        .insert("accepted".to_owned(), accepted_in_window);
    summary
        .counts
        .insert("accepted_total".to_owned(), shared.accepted.get());
    summary
        .counts
        .insert("sent".to_owned(), shared.stats.messages_out.get());
    summary
        .counts
        .insert("rejected".to_owned(), shared.rejected.get());
    summary
        .counts
        .insert("unanswered".to_owned(), shared.unanswered.get());
    if let Some(sent) = flood_sent {
        summary.counts.insert("flood_sent".to_owned(), sent);
    }
    summary.rates.insert(
        "accepted (durable updates)".to_owned(),
        accepted_in_window as f64 / window.as_secs_f64().max(1e-9),
    );
    Ok(summary)
}
