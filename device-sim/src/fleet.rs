//! `fleet`: N simulated devices that keep their shadow in sync (get on connect, apply the delta
//! after an actuation delay, report), send telemetry, reconnect with backoff and back off on 429.

use crate::backoff::Backoff;
use crate::convergence::PendingChanges;
use crate::mqtt::{disconnect, error_kind, ClientSettings, ShadowAnswer, ShadowTopics};
use crate::operator::{drive, thing_name, OperatorOutcome, OperatorPlan};
use crate::report::{ProgressLine, Summary};
use crate::stats::{Counter, LatencySeries, RunStats};
use crate::telemetry::TelemetryModel;
use crate::Error;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS, SubscribeFilter};

/// A first `get`'s 404 in the summary: normal (the device reports its
/// initial state next), so counted apart from rejections.
const FIRST_GET_404: &str = "404 on a first get (new shadow, reported next)";
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// One entry per broker address; device i uses `clients[i % len]`.
    pub clients: Vec<ClientSettings>,
    pub devices: usize,
    pub first: usize,
    pub prefix: String,
    /// Connections started per second.
    pub ramp: f64,
    pub actuation_delay: Duration,
    pub telemetry_interval: Option<Duration>,
    pub duration: Duration,
    pub operator: Option<OperatorPlan>,
    /// End the run as soon as the operator has sent all its changes (`max_changes`) and every
    /// one of them has converged, instead of at the end of `duration` (then only a bound).
    pub until_converged: bool,
    pub quiet: bool,
}

/// Longest the in-process operator waits, after the last device started, for every device to
/// be in sync before it starts anyway.
const SYNC_GRACE: Duration = Duration::from_secs(10);

/// A count that tasks can wait on reaching a target (devices in sync).
#[derive(Debug, Default)]
struct Milestone {
    count: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Milestone {
    fn incr(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    async fn reached(&self, target: u64) {
        loop {
            // Registered before the check, so an increment between the two is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.get() >= target {
                return;
            }
            changed.await;
        }
    }
}

/// The fleet's own shadow traffic, reported in the summary so it can be checked against what
/// the broker and the shadow service counted.
#[derive(Debug, Default)]
struct ShadowCounts {
    /// `get` requests queued.
    gets: Counter,
    /// `update` requests (reports) queued.
    reports: Counter,
    /// `update/accepted` answers to this device's own reports.
    reports_accepted: Counter,
    /// `update/delta` messages received.
    deltas: Counter,
    /// Devices whose shadow was in sync once (get accepted, or first report accepted).
    synced: Milestone,
}

/// What a device still has to send once it may (after a 429 backoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Get,
    Report,
}

/// The parts of a shadow answer a device acts on.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    code: Option<u64>,
    client_token: Option<String>,
    /// `state` of a delta; `state.delta` of a get.
    delta: Option<Map<String, Value>>,
    /// `state.reported` of a get or of an update/accepted.
    reported: Option<Map<String, Value>>,
    /// `state.desired` of an update/accepted.
    desired: Option<Map<String, Value>>,
}

fn parse_answer(kind: ShadowAnswer, payload: &[u8]) -> Option<Answer> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let object = value.as_object()?;
    let state = object.get("state").and_then(Value::as_object);
    let section = |name: &str| {
        state
            .and_then(|s| s.get(name))
            .and_then(Value::as_object)
            .cloned()
    };
    Some(Answer {
        code: object.get("code").and_then(Value::as_u64),
        client_token: object
            .get("clientToken")
            .and_then(Value::as_str)
            .map(str::to_owned),
        delta: match kind {
            ShadowAnswer::UpdateDelta => state.cloned(),
            ShadowAnswer::GetAccepted => section("delta"),
            _ => None,
        },
        reported: section("reported"),
        desired: section("desired"),
    })
}

/// One simulated device's state between events.
struct Device {
    thing: String,
    topics: ShadowTopics,
    client: AsyncClient,
    rng: SmallRng,
    telemetry: TelemetryModel,
    telemetry_topic: String,
    /// What the device believes it has reported.
    reported: Map<String, Value>,
    /// Desired values waiting for the actuator, and when they are applied.
    actuation: Option<(TokioInstant, Map<String, Value>)>,
    /// Values applied but not yet confirmed by update/accepted.
    unconfirmed: Map<String, Value>,
    retry: Option<(TokioInstant, Retry)>,
    throttle: Backoff,
    token_seq: u64,
    stats: Arc<RunStats>,
    counts: Arc<ShadowCounts>,
    pending: Option<Arc<PendingChanges>>,
    actuation_delay: Duration,
    synced: bool,
    /// When the first connection attempt started, until the answer to the
    /// first `get` arrives (connect + subscribe + first `get` answer).
    connecting_since: Option<Instant>,
    /// Connect + SUBACK of the answer topics (what a broker without a shadow service can
    /// be compared on).
    subscribed: Option<Arc<LatencySeries>>,
    first_answer: Option<Arc<LatencySeries>>,
}

impl Device {
    fn token(&mut self) -> String {
        self.token_seq += 1;
        format!("{}:{}", self.thing, self.token_seq)
    }

    /// Queues a publish; `false` (and an error counted) when the client's channel is full.
    fn publish(&self, topic: &str, qos: QoS, body: String, what: &str) -> bool {
        if self.client.try_publish(topic, qos, false, body).is_err() {
            // The client's bounded channel is full: the device is backlogged; drop and count.
            self.stats.errors.add(what);
            return false;
        }
        true
    }

    /// Subscribes to the shadow answers; the get follows the SUBACK, so that its answer
    /// cannot overtake the subscription (AWS IoT's SDKs do the same).
    fn on_connected(&mut self) {
        let filters: Vec<_> = self
            .topics
            .answers()
            .iter()
            .map(|t| SubscribeFilter::new((*t).to_owned(), QoS::AtLeastOnce))
            .collect();
        if self.client.try_subscribe_many(filters).is_err() {
            self.stats.errors.add("subscribe not queued");
        }
    }

    fn mark_synced(&mut self) {
        if !self.synced {
            self.synced = true;
            self.counts.synced.incr();
        }
    }

    /// The first SUBACK: the answer topics are subscribed; the first `get` follows.
    fn on_subscribed(&mut self) {
        if let (Some(since), Some(series)) = (self.connecting_since, self.subscribed.take()) {
            series.record(since.elapsed());
        }
        self.send_get();
    }

    /// The first answer to the device's first `get` (its shadow, or 404 for a new one).
    fn first_get_answered(&mut self) {
        if let (Some(since), Some(series)) = (self.connecting_since.take(), &self.first_answer) {
            series.record(since.elapsed());
        }
    }

    fn send_get(&mut self) {
        let body = serde_json::json!({ "clientToken": self.token() }).to_string();
        if self.publish(
            &self.topics.get.clone(),
            QoS::AtLeastOnce,
            body,
            "get not queued",
        ) {
            self.counts.gets.incr();
        }
    }

    fn send_report(&mut self) {
        if self.unconfirmed.is_empty() {
            return;
        }
        let body = serde_json::json!({
            "state": { "reported": Value::Object(self.unconfirmed.clone()) },
            "clientToken": self.token(),
        })
        .to_string();
        if self.publish(
            &self.topics.update.clone(),
            QoS::AtLeastOnce,
            body,
            "report not queued",
        ) {
            self.counts.reports.incr();
        }
    }

    fn send_telemetry(&mut self) {
        let sample = self.telemetry.step(&mut self.rng);
        match serde_json::to_string(&sample) {
            Ok(body) => {
                self.publish(
                    &self.telemetry_topic.clone(),
                    QoS::AtMostOnce,
                    body,
                    "telemetry not queued",
                );
            }
            Err(_) => self.stats.errors.add("telemetry encoding"),
        }
    }

    /// Schedules the actuator for the desired values of a delta (or a get's delta).
    fn on_delta(&mut self, delta: Map<String, Value>) {
        if let (Some(pending), Some(setpoint)) =
            (&self.pending, delta.get("setpoint").and_then(Value::as_f64))
        {
            pending.delta_received(&self.thing, setpoint);
        }
        let due = TokioInstant::now() + self.actuation_delay;
        match &mut self.actuation {
            // A newer delta carries all outstanding differences: it replaces the older one.
            Some((_, waiting)) => *waiting = delta,
            None => self.actuation = Some((due, delta)),
        }
    }

    fn actuate(&mut self) {
        let Some((_, desired)) = self.actuation.take() else {
            return;
        };
        for (key, value) in desired {
            if key == "setpoint" {
                if let Some(setpoint) = value.as_f64() {
                    self.telemetry.set_setpoint(setpoint);
                }
            }
            self.unconfirmed.insert(key, value);
        }
        if self.retry.is_none() {
            self.send_report();
        }
    }

    fn on_answer(&mut self, kind: ShadowAnswer, payload: &[u8]) {
        let Some(answer) = parse_answer(kind, payload) else {
            self.stats.errors.add("malformed shadow answer");
            return;
        };
        if matches!(kind, ShadowAnswer::GetAccepted | ShadowAnswer::GetRejected) {
            self.first_get_answered();
        }
        match kind {
            ShadowAnswer::GetAccepted => {
                self.throttle.reset();
                self.mark_synced();
                if let Some(reported) = answer.reported {
                    self.reported = reported;
                }
                if let Some(delta) = answer.delta {
                    self.on_delta(delta);
                }
            }
            ShadowAnswer::UpdateDelta => {
                self.counts.deltas.incr();
                if let Some(delta) = answer.delta {
                    self.on_delta(delta);
                }
            }
            ShadowAnswer::UpdateAccepted => {
                // Every update of this shadow is announced here, the operator's included; only
                // the device's own reports (its client tokens) count as its answers.
                let own = answer.client_token.as_deref().is_some_and(|t| {
                    t.strip_prefix(self.thing.as_str())
                        .is_some_and(|rest| rest.starts_with(':'))
                });
                if own {
                    self.counts.reports_accepted.incr();
                    self.mark_synced();
                }
                // A desired value equal to what the device has reported produces no delta.
                if let (Some(pending), Some(setpoint)) = (
                    &self.pending,
                    answer
                        .desired
                        .as_ref()
                        .and_then(|d| d.get("setpoint"))
                        .and_then(Value::as_f64),
                ) {
                    let reported = self.reported.get("setpoint").and_then(Value::as_f64);
                    if reported == Some(setpoint) && !self.unconfirmed.contains_key("setpoint") {
                        pending.accepted_as_reported(&self.thing, setpoint);
                    }
                }
                self.throttle.reset();
                if let Some(reported) = answer.reported {
                    for (key, value) in reported {
                        if key == "setpoint" {
                            if let (Some(pending), Some(setpoint)) = (&self.pending, value.as_f64())
                            {
                                pending.reported(&self.thing, setpoint);
                            }
                        }
                        if self.unconfirmed.get(&key) == Some(&value) {
                            self.unconfirmed.remove(&key);
                        }
                        self.reported.insert(key, value);
                    }
                }
            }
            ShadowAnswer::GetRejected | ShadowAnswer::UpdateRejected => {
                let code = answer.code.unwrap_or(0);
                let what = if kind == ShadowAnswer::GetRejected {
                    Retry::Get
                } else {
                    Retry::Report
                };
                if code == 404 && what == Retry::Get {
                    self.stats.expected.add(FIRST_GET_404);
                } else {
                    self.stats.rejected.add(&code.to_string());
                }
                match code {
                    429 => {
                        let delay = self.throttle.next_delay(&mut self.rng);
                        self.retry = Some((TokioInstant::now() + delay, what));
                    }
                    404 if what == Retry::Get => {
                        // No shadow yet: the device reports its initial state.
                        self.unconfirmed.insert(
                            "setpoint".to_owned(),
                            Value::from(self.telemetry.setpoint()),
                        );
                        self.unconfirmed
                            .insert("firmware".to_owned(), Value::from("1.0.0"));
                        self.send_report();
                    }
                    _ => {}
                }
            }
            ShadowAnswer::Other => {}
        }
    }

    fn on_retry(&mut self) {
        match self.retry.take() {
            Some((_, Retry::Get)) => self.send_get(),
            Some((_, Retry::Report)) => self.send_report(),
            None => {}
        }
    }
}

async fn sleep_until_opt(at: Option<TokioInstant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn run_device(
    mut device: Device,
    mut eventloop: EventLoop,
    telemetry_interval: Option<Duration>,
    stop: CancellationToken,
) {
    let mut reconnect = Backoff::reconnect();
    let mut connected = false;
    // Devices start their telemetry at random phases so a fleet does not publish in lockstep.
    let mut telemetry = telemetry_interval.map(|period| {
        let phase = device.rng.gen_range(Duration::ZERO..period);
        let mut ticker = tokio::time::interval_at(TokioInstant::now() + phase, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    loop {
        let actuation_at = device.actuation.as_ref().map(|(at, _)| *at);
        let retry_at = device.retry.map(|(at, _)| at);
        tokio::select! {
            _ = stop.cancelled() => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    reconnect.reset();
                    device.stats.connects.incr();
                    device.stats.connected.up();
                    device.on_connected();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => device.on_subscribed(),
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    device.stats.messages_in.incr();
                    device.on_answer(ShadowAnswer::of(&publish.topic), &publish.payload);
                }
                Ok(Event::Outgoing(Outgoing::Publish(_))) => device.stats.messages_out.incr(),
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        connected = false;
                        device.stats.connected.down();
                    }
                    device.stats.errors.add(&error_kind(&e));
                    let delay = reconnect.next_delay(&mut device.rng);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            },
            _ = async { match telemetry.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending().await } }, if connected => {
                device.send_telemetry();
            }
            _ = sleep_until_opt(actuation_at), if connected && actuation_at.is_some() => device.actuate(),
            _ = sleep_until_opt(retry_at), if connected && retry_at.is_some() => device.on_retry(),
        }
    }
    if connected {
        disconnect(&device.client, &mut eventloop, Duration::from_secs(2)).await;
        device.stats.connected.down();
    }
}

/// Soft limit of open files, read from /proc (Linux); `None` elsewhere.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Size of the local ephemeral port range (ports per source/destination address pair).
fn ephemeral_ports() -> Option<u64> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = range.split_whitespace().map(|p| p.parse::<u64>().ok());
    let (low, high) = (parts.next()??, parts.next()??);
    Some(high.saturating_sub(low) + 1)
}

/// Runs the fleet (and the in-process operator, if configured) for `duration`.
pub async fn run(config: FleetConfig, shutdown: CancellationToken) -> Result<Summary, Error> {
    if config.clients.is_empty() {
        return Err(Error::Config("at least one --broker is needed"));
    }
    if config.devices == 0 {
        return Err(Error::Config("--devices must be at least 1"));
    }
    if !(config.ramp.is_finite() && config.ramp > 0.0) {
        return Err(Error::Config(
            "--ramp must be a positive number of connections per second",
        ));
    }
    let mut notes = Vec::new();
    if let Some(limit) = open_files_limit() {
        if (config.devices as u64) + 64 > limit {
            return Err(Error::Config(
                "open-files limit too low for this many devices (raise `ulimit -n`)",
            ));
        }
    }
    // rumqttc 0.24 cannot bind a local address (only a device), so every socket to one broker
    // address draws from the same ephemeral range; several --broker addresses multiply it.
    if let Some(ports) = ephemeral_ports() {
        let per_broker = (config.devices as u64).div_ceil(config.clients.len() as u64);
        if per_broker > ports {
            return Err(Error::Config(
                "more devices per broker address than local ephemeral ports; add --broker addresses",
            ));
        }
        notes.push(format!(
            "{per_broker} sockets per broker address, {ports} ephemeral ports available"
        ));
    }

    let names: &[&'static str] = if config.operator.is_some() {
        &[
            "connect->subscribed",
            "connect->first answer",
            "desired->delta",
            "desired->reported",
            "operator request",
        ]
    } else {
        &["connect->subscribed", "connect->first answer"]
    };
    let stats = RunStats::new(names);
    let pending = match (
        stats.latency("desired->delta"),
        stats.latency("desired->reported"),
    ) {
        (Some(delta), Some(converged)) => Some(Arc::new(PendingChanges::new(delta, converged))),
        _ => None,
    };
    let stop = shutdown.child_token();
    let started = Instant::now();
    let progress = ProgressLine::start(&stats, started, config.quiet);

    let counts = Arc::new(ShadowCounts::default());
    let deadline = TokioInstant::now() + config.duration;
    let spacing = Duration::from_secs_f64(1.0 / config.ramp);
    let ramp_start = TokioInstant::now();
    let ramp_end = ramp_start + spacing.mul_f64(config.devices as f64);
    // Set when the operator starts: the number of devices in sync at that moment.
    let synced_at_start = Arc::new(AtomicU64::new(0));
    let operator_task = match (&config.operator, &pending) {
        (Some(plan), Some(pending)) => {
            let things = (config.first..config.first + config.devices)
                .map(|i| thing_name(&config.prefix, i))
                .collect();
            let request_latency = stats
                .latency("operator request")
                .unwrap_or_else(|| Arc::new(LatencySeries::new("operator request")));
            let mut client = config.clients[0].clone();
            client.channel_capacity = 64;
            client.inflight = 100;
            let plan = plan.clone();
            let pending = Arc::clone(pending);
            let stats = Arc::clone(&stats);
            let counts = Arc::clone(&counts);
            let synced_at_start = Arc::clone(&synced_at_start);
            let devices = config.devices as u64;
            let stop = stop.clone();
            Some(tokio::spawn(async move {
                // Changes start once the whole fleet is connected and in sync, so that the
                // latencies measure the steady state, not the ramp.
                tokio::select! {
                    _ = counts.synced.reached(devices) => {}
                    _ = tokio::time::sleep_until(ramp_end + SYNC_GRACE) => {}
                    _ = stop.cancelled() => return Ok(OperatorOutcome::default()),
                }
                synced_at_start.store(counts.synced.get(), Ordering::Relaxed);
                drive(
                    plan,
                    client,
                    things,
                    Some(pending),
                    stats,
                    request_latency,
                    stop,
                )
                .await
            }))
        }
        _ => None,
    };

    let mut devices = JoinSet::new();
    for n in 0..config.devices {
        let start_at = ramp_start + spacing.mul_f64(n as f64);
        tokio::select! {
            _ = tokio::time::sleep_until(start_at) => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = stop.cancelled() => break,
        }
        let index = config.first + n;
        let thing = thing_name(&config.prefix, index);
        let settings = &config.clients[n % config.clients.len()];
        let (client, eventloop) = settings.client(&thing);
        let mut rng = SmallRng::from_entropy();
        let device = Device {
            topics: ShadowTopics::new(&thing),
            telemetry_topic: format!("devices/{thing}/telemetry"),
            telemetry: TelemetryModel::new(&mut rng),
            rng,
            thing,
            client,
            reported: Map::new(),
            actuation: None,
            unconfirmed: Map::new(),
            retry: None,
            throttle: Backoff::throttled(),
            token_seq: 0,
            stats: Arc::clone(&stats),
            counts: Arc::clone(&counts),
            pending: pending.clone(),
            actuation_delay: config.actuation_delay,
            synced: false,
            connecting_since: Some(Instant::now()),
            subscribed: stats.latency("connect->subscribed"),
            first_answer: stats.latency("connect->first answer"),
        };
        devices.spawn(run_device(
            device,
            eventloop,
            config.telemetry_interval,
            stop.clone(),
        ));
    }
    let mut operator_task = operator_task;
    let mut operator_outcome = None;
    let mut converged_early = false;
    match (&mut operator_task, &pending) {
        (Some(task), Some(pending)) if config.until_converged => {
            tokio::select! {
                joined = task => {
                    operator_outcome = Some(joined);
                    tokio::select! {
                        _ = pending.all_converged() => converged_early = true,
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = stop.cancelled() => {}
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
                _ = stop.cancelled() => {}
            }
        }
        _ => {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = stop.cancelled() => {}
            }
        }
    }
    stop.cancel();
    let window = started.elapsed();
    let joined = match (operator_outcome, operator_task) {
        (Some(joined), _) => Some(joined),
        (None, Some(task)) => Some(task.await),
        (None, None) => None,
    };
    let operator_outcome = match joined {
        Some(Ok(Ok(outcome))) => Some(outcome),
        Some(Ok(Err(e))) => return Err(e),
        Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Some(Err(_)) | None => None,
    };
    while let Some(joined) = devices.join_next().await {
        if let Err(e) = joined {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    progress.stop().await;

    let broker = config
        .clients
        .iter()
        .map(|c| c.broker.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut summary = Summary::from_stats("fleet", &broker, &stats, window);
    summary
        .counts
        .insert("devices".to_owned(), config.devices as u64);
    let shadow_counts = [
        ("gets_sent", counts.gets.get()),
        ("reports_sent", counts.reports.get()),
        ("reports_accepted", counts.reports_accepted.get()),
        ("deltas_received", counts.deltas.get()),
        ("devices_synced", counts.synced.get()),
    ];
    for (name, value) in shadow_counts {
        summary.counts.insert(name.to_owned(), value);
    }
    let mut shadow_requests = counts.gets.get() + counts.reports.get();
    if let Some(outcome) = operator_outcome {
        shadow_requests += outcome.sent;
        summary
            .counts
            .insert("operator_changes_sent".to_owned(), outcome.sent);
        summary
            .counts
            .insert("operator_changes_confirmed".to_owned(), outcome.confirmed);
        let operator_dropped = summary
            .errors
            .iter()
            .any(|(kind, n)| kind.starts_with("operator ") && *n > 0);
        if let Some(plan) = config.operator.as_ref().filter(|p| p.http.is_none()) {
            if outcome.sent > 0 && outcome.confirmed == 0 && operator_dropped {
                notes.push(format!(
                    "no operator change was confirmed and the operator's connection kept \
                     closing: a broker that keeps each client to its own thing's topics (Umbra \
                     by default) refuses it; allow it (Umbra: [mqtt.edge] privileged_clients = \
                     [\"{}\"]) or use --operator-http",
                    plan.client_id
                ));
            }
        }
        let synced = synced_at_start.load(Ordering::Relaxed);
        if synced < config.devices as u64 {
            notes.push(format!(
                "the operator started with {synced} of {} devices in sync",
                config.devices
            ));
        }
    }
    // Every shadow request this run queued (device gets and reports, operator changes).
    summary
        .counts
        .insert("shadow_requests_sent".to_owned(), shadow_requests);
    if converged_early {
        notes.push("ended when every operator change had converged".to_owned());
    }
    if let Some(pending) = &pending {
        summary.counts.insert(
            "changes_not_converged".to_owned(),
            pending.outstanding() as u64,
        );
        summary.counts.insert(
            "changes_converged_without_delta".to_owned(),
            pending.converged_without_delta(),
        );
    }
    summary.notes = notes;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed() {
        let delta = br#"{"state":{"setpoint":21.5},"metadata":{},"version":3}"#;
        let answer = parse_answer(ShadowAnswer::UpdateDelta, delta);
        assert_eq!(
            answer
                .and_then(|a| a.delta)
                .and_then(|d| d.get("setpoint").cloned()),
            Some(Value::from(21.5))
        );
        let get =
            br#"{"state":{"desired":{"a":1},"reported":{"a":0},"delta":{"a":1}},"version":2}"#;
        let answer = parse_answer(ShadowAnswer::GetAccepted, get).unwrap_or_default();
        assert_eq!(answer.delta.map(|d| d.len()), Some(1));
        assert_eq!(answer.reported.map(|r| r.len()), Some(1));
        let rejected = br#"{"code":429,"message":"Too Many Requests","clientToken":"t"}"#;
        let answer = parse_answer(ShadowAnswer::UpdateRejected, rejected).unwrap_or_default();
        assert_eq!(answer.code, Some(429));
        assert_eq!(answer.client_token.as_deref(), Some("t"));
        assert_eq!(parse_answer(ShadowAnswer::UpdateDelta, b"not json"), None);
    }
}
