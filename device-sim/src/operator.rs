//! The operator: changes the desired `setpoint` of random devices at a fixed rate, over MQTT
//! (privileged client id) or HTTP (`POST /things/{thing}/shadow`), and the shared table of
//! changes in flight that lets an in-process fleet measure desired -> delta -> reported.

use crate::backoff::Backoff;
use crate::mqtt::{disconnect, error_kind, ClientSettings, ShadowTopics};
use crate::report::{ProgressLine, Summary};
use crate::stats::{LatencySeries, RunStats};
use crate::units::{Pacer, Rate};
use crate::Error;
use rand::Rng;
use rumqttc::{Event, Outgoing, Packet, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
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

struct PendingChange {
    setpoint: f64,
    sent: Instant,
    delta_seen: bool,
}

/// Desired changes not yet reported back, keyed by thing. The operator fills it; devices of an
/// in-process fleet look their delta and their accepted report up in it.
pub struct PendingChanges {
    changes: Mutex<HashMap<String, PendingChange>>,
    delta_latency: Arc<LatencySeries>,
    converged_latency: Arc<LatencySeries>,
    /// Woken whenever a change converges, so a run can end as soon as none is outstanding.
    converged: tokio::sync::Notify,
    /// Changes whose value the device had already reported: no delta, converged at once.
    without_delta: AtomicU64,
}

impl std::fmt::Debug for PendingChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingChanges").finish_non_exhaustive()
    }
}

impl PendingChanges {
    pub fn new(delta_latency: Arc<LatencySeries>, converged_latency: Arc<LatencySeries>) -> Self {
        PendingChanges {
            changes: Mutex::new(HashMap::new()),
            delta_latency,
            converged_latency,
            converged: tokio::sync::Notify::new(),
            without_delta: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingChange>> {
        self.changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The operator sent `setpoint` to `thing` (a newer change replaces an older one).
    pub fn sent(&self, thing: &str, setpoint: f64) {
        self.lock().insert(
            thing.to_owned(),
            PendingChange {
                setpoint,
                sent: Instant::now(),
                delta_seen: false,
            },
        );
    }

    /// A device received a delta carrying `setpoint`.
    pub fn delta_received(&self, thing: &str, setpoint: f64) {
        if let Some(change) = self.lock().get_mut(thing) {
            if change.setpoint == setpoint && !change.delta_seen {
                change.delta_seen = true;
                self.delta_latency.record(change.sent.elapsed());
            }
        }
    }

    /// A device's report of `setpoint` was accepted: desired and reported have converged.
    pub fn reported(&self, thing: &str, setpoint: f64) {
        let mut changes = self.lock();
        if changes.get(thing).is_some_and(|c| c.setpoint == setpoint) {
            if let Some(change) = changes.remove(thing) {
                self.converged_latency.record(change.sent.elapsed());
            }
            drop(changes);
            self.converged.notify_waiters();
        }
    }

    /// The operator's change of `thing` to `setpoint` was accepted while the device's reported
    /// value already was `setpoint`: the shadow sends no delta, and the change has converged.
    pub fn accepted_as_reported(&self, thing: &str, setpoint: f64) {
        let mut changes = self.lock();
        if changes
            .get(thing)
            .is_some_and(|c| c.setpoint == setpoint && !c.delta_seen)
        {
            if let Some(change) = changes.remove(thing) {
                self.converged_latency.record(change.sent.elapsed());
                self.without_delta.fetch_add(1, Ordering::Relaxed);
            }
            drop(changes);
            self.converged.notify_waiters();
        }
    }

    /// Changes that converged without a delta (see [`Self::accepted_as_reported`]).
    pub fn converged_without_delta(&self) -> u64 {
        self.without_delta.load(Ordering::Relaxed)
    }

    /// Returns once no change is outstanding.
    pub async fn all_converged(&self) {
        loop {
            // Registered before the check, so a convergence between the two is not missed.
            let notified = self.converged.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outstanding() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Changes not (yet) converged.
    pub fn outstanding(&self) -> usize {
        self.lock().len()
    }
}

/// A failure of the minimal HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("only http://host:port URLs are supported")]
    Url,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed response")]
    Malformed,
    #[error("response too large")]
    TooLarge,
}

/// `http://host:port[/base]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    pub authority: String,
    pub base_path: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let rest = url.strip_prefix("http://").ok_or(HttpError::Url)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(HttpError::Url);
        }
        let authority = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(HttpTarget {
            authority,
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }
}

const MAX_RESPONSE: usize = 1 << 20;

/// One keep-alive HTTP/1.1 connection. Hand-written because the operator needs one request
/// shape only; a full client (reqwest/hyper) would be the heaviest dependency of device-sim.
struct HttpConnection {
    target: HttpTarget,
    stream: Option<BufStream<TcpStream>>,
}

impl HttpConnection {
    fn new(target: HttpTarget) -> Self {
        HttpConnection {
            target,
            stream: None,
        }
    }

    /// POSTs `body` (JSON) to `path` and returns the status code; reconnects as needed.
    async fn post(&mut self, path: &str, body: &str) -> Result<u16, HttpError> {
        let result = self.try_post(path, body).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn try_post(&mut self, path: &str, body: &str) -> Result<u16, HttpError> {
        if self.stream.is_none() {
            let socket = TcpStream::connect(&self.target.authority).await?;
            socket.set_nodelay(true)?;
            self.stream = Some(BufStream::new(socket));
        }
        let stream = self.stream.as_mut().ok_or(HttpError::Malformed)?;
        let request = format!(
            "POST {}{path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
            self.target.base_path,
            self.target.authority,
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        stream.flush().await?;
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(HttpError::Malformed)?;
        let mut content_length = 0usize;
        let mut chunked = false;
        let mut close = false;
        let mut header_bytes = 0usize;
        loop {
            line.clear();
            let n = stream.read_line(&mut line).await?;
            header_bytes += n;
            if n == 0 || header_bytes > 64 * 1024 {
                return Err(HttpError::Malformed);
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => {
                        content_length = value.parse().map_err(|_| HttpError::Malformed)?;
                    }
                    "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                    "connection" => close = value.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        if chunked {
            let mut total = 0usize;
            loop {
                line.clear();
                stream.read_line(&mut line).await?;
                let size =
                    usize::from_str_radix(line.trim(), 16).map_err(|_| HttpError::Malformed)?;
                total += size;
                if total > MAX_RESPONSE {
                    return Err(HttpError::TooLarge);
                }
                let mut chunk = vec![0u8; size + 2];
                stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
            }
        } else {
            if content_length > MAX_RESPONSE {
                return Err(HttpError::TooLarge);
            }
            let mut body = vec![0u8; content_length];
            stream.read_exact(&mut body).await?;
        }
        if close {
            self.stream = None;
        }
        Ok(status)
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

async fn http_sender(
    target: HttpTarget,
    jobs: mpsc::Receiver<(String, String)>,
    stats: Arc<RunStats>,
    latency: Arc<LatencySeries>,
) -> Result<u64, Error> {
    let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..HTTP_CONNECTIONS {
        let jobs = Arc::clone(&jobs);
        let stats = Arc::clone(&stats);
        let latency = Arc::clone(&latency);
        let mut connection = HttpConnection::new(target.clone());
        workers.spawn(async move {
            let mut accepted = 0u64;
            loop {
                let job = jobs.lock().await.recv().await;
                let Some((thing, body)) = job else { break };
                let started = Instant::now();
                stats.messages_out.incr();
                match connection
                    .post(&format!("/things/{thing}/shadow"), &body)
                    .await
                {
                    Ok(200) => {
                        accepted += 1;
                        latency.record(started.elapsed());
                    }
                    Ok(status) => stats.rejected.add(&format!("http {status}")),
                    Err(e) => stats.errors.add(&format!("http {}", http_error_kind(&e))),
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

fn http_error_kind(error: &HttpError) -> String {
    match error {
        HttpError::Io(e) => format!("io {:?}", e.kind()),
        other => other.to_string(),
    }
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
    fn pending_changes_record_delta_then_convergence() {
        let delta = Arc::new(LatencySeries::new("delta"));
        let converged = Arc::new(LatencySeries::new("converged"));
        let pending = PendingChanges::new(Arc::clone(&delta), Arc::clone(&converged));
        pending.sent("a", 20.0);
        pending.delta_received("a", 19.0); // stale delta: ignored
        pending.delta_received("a", 20.0);
        pending.delta_received("a", 20.0); // duplicate: counted once
        pending.reported("a", 20.0);
        pending.reported("a", 20.0);
        assert_eq!(delta.summary().count, 1);
        assert_eq!(converged.summary().count, 1);
        assert_eq!(pending.outstanding(), 0);
    }

    #[test]
    fn http_targets() {
        let target = HttpTarget::parse("http://127.0.0.1:8080/api/").ok();
        assert_eq!(
            target,
            Some(HttpTarget {
                authority: "127.0.0.1:8080".into(),
                base_path: "/api".into()
            })
        );
        assert!(HttpTarget::parse("https://x").is_err());
    }

    #[tokio::test]
    async fn http_post_reads_status_and_body() {
        use tokio::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").await.ok();
        let Some(listener) = listener else { return };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let server = tokio::spawn(async move {
            let Ok((socket, _)) = listener.accept().await else {
                return String::new();
            };
            let mut stream = BufStream::new(socket);
            let mut request = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                request.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            let _ = stream.read_exact(&mut body).await;
            request.push_str(&String::from_utf8_lossy(&body));
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .await;
            let _ = stream.flush().await;
            request
        });
        let target = HttpTarget::parse(&format!("http://{addr}")).ok();
        let Some(target) = target else {
            panic!("target")
        };
        let mut connection = HttpConnection::new(target);
        let status = connection.post("/things/t/shadow", "{\"a\":1}").await.ok();
        assert_eq!(status, Some(200));
        let request = server.await.unwrap_or_default();
        assert!(
            request.starts_with("POST /things/t/shadow HTTP/1.1"),
            "{request}"
        );
        assert!(request.ends_with("{\"a\":1}"), "{request}");
    }
}
