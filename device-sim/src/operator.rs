//! The operator: changes the desired `setpoint` of random devices at a fixed rate, over MQTT
//! (privileged client id) or HTTP (`POST /things/{thing}/shadow`). What its changes became is
//! measured in [`crate::convergence`].

use crate::backoff::Backoff;
use crate::convergence::PendingChanges;
use crate::mqtt::{disconnect, error_kind, ClientSettings, ShadowTopics};
use crate::report::{ProgressLine, Summary};
use crate::stats::{LatencySeries, RunStats};
use crate::units::{Pacer, Rate};
use crate::Error;
use rand::Rng;
use rumqttc::{Event, Outgoing, Packet, QoS};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the operator does, wherever it runs.
#[derive(Debug, Clone)]
pub struct OperatorPlan {
    pub rate: Rate,
    pub client_id: String,
    /// Base URL (`http://host:port`) for HTTP mode.
    pub http: Option<String>,
    /// Which device each change goes to.
    pub order: TargetOrder,
    /// Stop after this many changes (`None`: until the run ends).
    pub max_changes: Option<u64>,
}

impl OperatorPlan {
    /// Random targets at `rate`, until the run ends.
    pub fn new(rate: Rate, client_id: impl Into<String>) -> Self {
        OperatorPlan {
            rate,
            client_id: client_id.into(),
            http: None,
            order: TargetOrder::Random,
            max_changes: None,
        }
    }
}

/// How the operator picks the device of its next change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetOrder {
    /// A uniformly random device each time.
    Random,
    /// Every device in turn (device 0, 1, ..., N-1, 0, ...): with as many changes as devices
    /// (`operator --changes`, `fleet --operator-changes`) each device gets exactly one.
    Sweep,
}

#[derive(Debug, Clone)]
pub struct OperatorConfig {
    pub client: ClientSettings,
    pub devices: usize,
    pub first: usize,
    pub prefix: String,
    pub plan: OperatorPlan,
    pub duration: Duration,
    pub quiet: bool,
}

/// The thing name of device `index`.
pub fn thing_name(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:05}")
}

/// The update body the operator sends.
pub fn desired_body(setpoint: f64, client_token: &str) -> String {
    serde_json::json!({
        "state": { "desired": { "setpoint": setpoint } },
        "clientToken": client_token,
    })
    .to_string()
}

/// A setpoint between 16.0 and 28.0 in 0.5 steps, different from `previous` so that every
/// change produces a delta.
pub fn next_setpoint(rng: &mut impl Rng, previous: Option<f64>) -> f64 {
    loop {
        let candidate = f64::from(rng.gen_range(32..=56u8)) / 2.0;
        if previous != Some(candidate) {
            return candidate;
        }
    }
}

/// An operator URL that is not `http://host[:port][/base]`.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("only http://host[:port][/base] URLs are supported")]
    Url,
}

/// `http://host[:port][/base]`: where the operator's HTTP requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// The base URL without a trailing `/`.
    pub base: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let rest = url.strip_prefix("http://").ok_or(HttpError::Url)?;
        if rest.split('/').next().is_none_or(str::is_empty) {
            return Err(HttpError::Url);
        }
        Ok(HttpTarget {
            base: url.trim_end_matches('/').to_owned(),
        })
    }
}

/// What an operator did: changes handed to its sender, and changes the broker acknowledged
/// (PUBACK over MQTT, `200` over HTTP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OperatorOutcome {
    pub sent: u64,
    pub confirmed: u64,
}

/// Sends desired changes until `stop` (or `max_changes`); `pending` (in-process fleet) learns
/// every change.
/// Latency of the operator's own request is recorded in `request_latency` (PUBACK over MQTT,
/// the HTTP response over HTTP, which Umbra sends after the commit).
pub async fn drive(
    plan: OperatorPlan,
    client: ClientSettings,
    things: Vec<String>,
    pending: Option<Arc<PendingChanges>>,
    stats: Arc<RunStats>,
    request_latency: Arc<LatencySeries>,
    stop: CancellationToken,
) -> Result<OperatorOutcome, Error> {
    if things.is_empty() {
        return Err(Error::Config("the operator needs at least one device"));
    }
    let rate = plan.rate.per_second().unwrap_or(1000.0);
    // Jobs wait here for the sender (bounded: when the sender falls behind, changes are
    // dropped and counted rather than queued without limit).
    let (jobs_tx, jobs_rx) = mpsc::channel::<(String, String)>(256);
    let sender = match &plan.http {
        Some(url) => {
            let target = HttpTarget::parse(url)?;
            tokio::spawn(http_sender(
                target,
                jobs_rx,
                Arc::clone(&stats),
                request_latency,
            ))
        }
        None => tokio::spawn(mqtt_sender(
            client,
            plan.client_id.clone(),
            jobs_rx,
            Arc::clone(&stats),
            request_latency,
            stop.clone(),
        )),
    };
    let mut pacer = Pacer::new(rate);
    let mut last: HashMap<usize, f64> = HashMap::new();
    let mut seq = 0u64;
    let limit = plan.max_changes.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    'send: while seq < limit {
        let batch = tokio::select! {
            n = pacer.next_batch() => n,
            _ = stop.cancelled() => break,
        };
        for _ in 0..batch {
            if seq >= limit {
                break;
            }
            let (index, setpoint) = {
                let mut rng = rand::thread_rng();
                let index = match plan.order {
                    TargetOrder::Random => rng.gen_range(0..things.len()),
                    TargetOrder::Sweep => (seq % things.len() as u64) as usize,
                };
                (index, next_setpoint(&mut rng, last.get(&index).copied()))
            };
            last.insert(index, setpoint);
            seq += 1;
            let thing = &things[index];
            let body = desired_body(setpoint, &format!("op-{seq}"));
            if let Some(pending) = &pending {
                pending.sent(thing, setpoint);
            }
            match jobs_tx.try_send((thing.clone(), body)) {
                Ok(()) => sent += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    stats.errors.add("operator backlog full")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break 'send,
            }
        }
    }
    drop(jobs_tx);
    let confirmed = match sender.await {
        Ok(result) => result?,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => 0,
    };
    Ok(OperatorOutcome { sent, confirmed })
}

/// Longest the MQTT operator waits for outstanding acknowledgements after the run ends.
const OPERATOR_DRAIN: Duration = Duration::from_secs(5);

async fn mqtt_sender(
    client: ClientSettings,
    client_id: String,
    mut jobs: mpsc::Receiver<(String, String)>,
    stats: Arc<RunStats>,
    latency: Arc<LatencySeries>,
    stop: CancellationToken,
) -> Result<u64, Error> {
    let (handle, mut eventloop) = client.client(&client_id);
    let mut backoff = Backoff::reconnect();
    let mut connected = false;
    let mut in_flight: HashMap<u16, Instant> = HashMap::new();
    let mut acked = 0u64;
    let mut jobs_open = true;
    // Publishes handed to the client but not yet written: the run ends only after every
    // change has been written and acknowledged, not with changes still in the client's queue.
    let mut queued = 0usize;
    // After `stop`, acknowledgements are awaited this long at most.
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        if !jobs_open && queued == 0 && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            _ = stop.cancelled(), if drain_until.is_none() => {
                drain_until = Some(tokio::time::Instant::now() + OPERATOR_DRAIN);
            }
            _ = async {
                match drain_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => break,
            job = jobs.recv(), if jobs_open && connected => match job {
                Some((thing, body)) => {
                    let topic = ShadowTopics::new(&thing).update;
                    if handle.try_publish(topic, QoS::AtLeastOnce, false, body).is_err() {
                        stats.errors.add("operator publish not queued");
                    } else {
                        queued += 1;
                    }
                }
                None => jobs_open = false,
            },
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff.reset();
                    stats.connects.incr();
                    stats.connected.up();
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    stats.messages_out.incr();
                    queued = queued.saturating_sub(1);
                    in_flight.insert(pkid, Instant::now());
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(sent) = in_flight.remove(&ack.pkid) {
                        latency.record(sent.elapsed());
                    }
                    acked += 1;
                }
                Ok(_) => {}
                Err(e) => {
                    if std::mem::take(&mut connected) {
                        stats.connected.down();
                    }
                    // rumqttc retransmits unacknowledged publishes after a reconnect; those
                    // still queued go out then too.
                    in_flight.clear();
                    stats.errors.add(&format!("operator {}", error_kind(&e)));
                    if stop.is_cancelled() {
                        return Ok(acked);
                    }
                    let delay = backoff.next_delay(&mut rand::thread_rng());
                    tokio::time::sleep(delay).await;
                }
            },
        }
    }
    disconnect(&handle, &mut eventloop, Duration::from_secs(2)).await;
    if connected {
        stats.connected.down();
    }
    Ok(acked)
}

/// Concurrent HTTP requests the operator keeps open.
const HTTP_CONNECTIONS: usize = 4;

/// How long one HTTP request may take, connect included.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends the operator's changes as `POST {base}/things/{thing}/shadow` from
/// [`HTTP_CONNECTIONS`] blocking workers sharing one keep-alive pool (ureq).
async fn http_sender(
    target: HttpTarget,
    jobs: mpsc::Receiver<(String, String)>,
    stats: Arc<RunStats>,
    latency: Arc<LatencySeries>,
) -> Result<u64, Error> {
    let agent = ureq::AgentBuilder::new()
        .max_idle_connections(HTTP_CONNECTIONS)
        .timeout(HTTP_TIMEOUT)
        .build();
    let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..HTTP_CONNECTIONS {
        let (agent, jobs) = (agent.clone(), Arc::clone(&jobs));
        let (stats, latency) = (Arc::clone(&stats), Arc::clone(&latency));
        let base = target.base.clone();
        workers.spawn_blocking(move || {
            let mut accepted = 0u64;
            loop {
                let job = jobs.blocking_lock().blocking_recv();
                let Some((thing, body)) = job else { break };
                let started = Instant::now();
                stats.messages_out.incr();
                let sent = agent
                    .post(&format!("{base}/things/{thing}/shadow"))
                    .set("Content-Type", "application/json")
                    .send_string(&body);
                // A response's body is read to its end, so that its connection is reused.
                match sent {
                    Ok(response) if response.status() == 200 => {
                        let _ = response.into_string();
                        accepted += 1;
                        latency.record(started.elapsed());
                    }
                    Ok(response) | Err(ureq::Error::Status(_, response)) => {
                        stats.rejected.add(&format!("http {}", response.status()));
                        let _ = response.into_string();
                    }
                    Err(ureq::Error::Transport(e)) => {
                        stats.errors.add(&format!("http {:?}", e.kind()))
                    }
                }
            }
            accepted
        });
    }
    let mut accepted = 0;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(n) => accepted += n,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    Ok(accepted)
}

/// `device-sim operator`: desired changes at a fixed rate, standalone.
pub async fn run(config: OperatorConfig, shutdown: CancellationToken) -> Result<Summary, Error> {
    let things: Vec<String> = (config.first..config.first + config.devices)
        .map(|i| thing_name(&config.prefix, i))
        .collect();
    let latency_name = if config.plan.http.is_some() {
        "http accepted"
    } else {
        "mqtt puback"
    };
    let stats = RunStats::new(&[latency_name]);
    let latency = stats
        .latency(latency_name)
        .unwrap_or_else(|| Arc::new(LatencySeries::new(latency_name)));
    let stop = shutdown.child_token();
    let started = Instant::now();
    let progress = ProgressLine::start(&stats, started, config.quiet);
    let timer = {
        let stop = stop.clone();
        let duration = config.duration;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(duration) => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        })
    };
    let result = drive(
        config.plan.clone(),
        config.client.clone(),
        things,
        None,
        Arc::clone(&stats),
        latency,
        stop.clone(),
    )
    .await;
    stop.cancel();
    let _ = timer.await;
    progress.stop().await;
    let outcome = result?;
    let window = started.elapsed();
    // What the changes went to: the HTTP API in HTTP mode, else the broker.
    let target = config
        .plan
        .http
        .clone()
        .unwrap_or_else(|| config.client.broker.to_string());
    let mut summary = Summary::from_stats("operator", &target, &stats, window);
    summary
        .counts
        .insert("changes_sent".to_owned(), outcome.sent);
    summary
        .counts
        .insert("changes_confirmed".to_owned(), outcome.confirmed);
    summary.notes.push(
        "desired -> delta latency needs the devices: run `fleet --operator-rate` for it".to_owned(),
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn setpoints_change_and_stay_in_range() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut previous = None;
        for _ in 0..1000 {
            let next = next_setpoint(&mut rng, previous);
            assert!((16.0..=28.0).contains(&next));
            assert_ne!(Some(next), previous);
            assert_eq!((next * 2.0).fract(), 0.0);
            previous = Some(next);
        }
    }

    #[test]
    fn body_is_an_aws_update() {
        let body: serde_json::Value =
            serde_json::from_str(&desired_body(21.5, "op-1")).unwrap_or_default();
        assert_eq!(body["state"]["desired"]["setpoint"], 21.5);
        assert_eq!(body["clientToken"], "op-1");
        assert_eq!(thing_name("sim-", 42), "sim-00042");
    }

    #[test]
    fn http_targets() {
        let target = HttpTarget::parse("http://127.0.0.1:8080/api/").ok();
        assert_eq!(
            target,
            Some(HttpTarget {
                base: "http://127.0.0.1:8080/api".into()
            })
        );
        assert!(HttpTarget::parse("https://x").is_err());
        assert!(HttpTarget::parse("http:///path").is_err());
    }
}
