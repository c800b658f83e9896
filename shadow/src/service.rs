//! The shadow service: one request path for MQTT and HTTP alike.
//!
//! names -> throttle -> parse and validate -> store (serialized per shadow,
//! group commit) -> answers. Every message leaves through the outbox in commit
//! order, and only after its transaction committed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

use crate::answer::{Answer, Message, UserProperties};
use crate::document::Timestamp;
use crate::engine::Command;
use crate::error::Rejection;
use crate::fleet::{FleetIndex, IndexError};
use crate::limits::Limits;
use crate::metrics::ShadowMetrics;
use crate::request::{parse_plain, parse_update, PlainRequest, Refused};
use crate::store::{Change, Committed, CommittedBatch, Job, ShadowStore, StoreError, Ticket};
use crate::tasks;
use crate::throttle::{Permit, Spent, Throttle};
use crate::topic::{Operation, ShadowKey};

/// A shadow request, whatever transport it came on.
#[derive(Debug, Clone)]
pub struct Request {
    pub key: ShadowKey,
    pub op: Operation,
    pub payload: Bytes,
    /// Who sent it (an MQTT client id or an API token's name), for logs.
    pub client: String,
    /// Repeated on the reply (MQTT 5 user properties).
    pub user_properties: Option<UserProperties>,
}

/// Where the service's messages go when they are not read from a channel:
/// a transport that delivers them itself (the broker's `$aws` table).
/// Called in commit order from one task; must not block.
pub trait MessageSink: Send + Sync + 'static {
    fn publish(&self, message: Message);

    /// Whether a message on `topic` would reach anyone; the service skips
    /// building the optional answer messages (`/documents`, `/delta`) that
    /// would not.
    fn wants(&self, _topic: &str) -> bool {
        true
    }
}

/// Where every message the service produces leaves, in order.
#[derive(Clone)]
enum Outbox {
    /// A bounded channel the caller drains (the service waits when it is full).
    Channel(mpsc::Sender<Message>),
    /// Handed to the transport directly.
    Sink(Arc<dyn MessageSink>),
}

impl Outbox {
    fn wants(&self, topic: &str) -> bool {
        match self {
            Outbox::Channel(_) => true,
            Outbox::Sink(sink) => sink.wants(topic),
        }
    }

    /// False once the channel's receiver is gone.
    async fn send(&self, message: Message) -> bool {
        match self {
            Outbox::Channel(tx) => tx.send(message).await.is_ok(),
            Outbox::Sink(sink) => {
                sink.publish(message);
                true
            }
        }
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outbox::Channel(_) => "Outbox::Channel",
            Outbox::Sink(_) => "Outbox::Sink",
        })
    }
}

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub limits: Limits,
    /// Messages that may wait to be published before the service waits.
    pub outbox_capacity: usize,
    /// Changes a slow change-stream subscriber may fall behind by.
    pub change_buffer: usize,
}

impl Default for ServiceConfig {
    fn default() -> ServiceConfig {
        ServiceConfig {
            limits: Limits::default(),
            outbox_capacity: 65_536,
            change_buffer: 4096,
        }
    }
}

/// How long a fleet read on a node of a shared store waits for the node's
/// index to take the changes committed before it (see
/// [`ShadowService::fleet_caught_up`]). The follower reads at a
/// notification, or every second without one.
pub const FLEET_CATCH_UP: Duration = Duration::from_secs(5);

/// The shadow service.
pub struct ShadowService {
    limits: Limits,
    store: Arc<dyn ShadowStore>,
    throttle: Arc<Throttle>,
    outbox: Outbox,
    changes: broadcast::Sender<Change>,
    publisher: Mutex<Option<JoinHandle<()>>>,
    /// Feeds a shared store's changes (see [`ShadowStore::follow`]).
    follower: Mutex<Option<JoinHandle<()>>>,
    /// With a shared store, the last sequence the follower fed to the
    /// fleet index.
    followed_through: Option<watch::Receiver<u64>>,
    /// The fleet index's load, joined at close (see [`crate::tasks`]).
    loader: Mutex<Option<JoinHandle<()>>>,
    fleet: Arc<FleetIndex>,
    metrics: Option<ShadowMetrics>,
}

impl std::fmt::Debug for ShadowService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowService").finish_non_exhaustive()
    }
}

impl ShadowService {
    /// Starts the service over `store`, taking the store's committed batches.
    /// The returned receiver yields every message to publish, in order; the
    /// caller must drain it (or drop it to discard messages).
    pub fn start(
        config: ServiceConfig,
        store: Arc<dyn ShadowStore>,
        committed: mpsc::Receiver<CommittedBatch>,
    ) -> (Arc<ShadowService>, mpsc::Receiver<Message>) {
        ShadowService::start_with_metrics(config, store, committed, None)
    }

    /// [`ShadowService::start`], recording requests, latencies and deltas on
    /// `metrics`. Also starts loading the fleet index from the store (in the
    /// background: see [`ShadowService::fleet`]).
    pub fn start_with_metrics(
        config: ServiceConfig,
        store: Arc<dyn ShadowStore>,
        committed: mpsc::Receiver<CommittedBatch>,
        metrics: Option<ShadowMetrics>,
    ) -> (Arc<ShadowService>, mpsc::Receiver<Message>) {
        let (outbox, outbox_rx) = mpsc::channel(config.outbox_capacity.max(1));
        let service =
            ShadowService::launch(config, store, committed, metrics, Outbox::Channel(outbox));
        (service, outbox_rx)
    }

    /// [`ShadowService::start_with_metrics`], handing every message to
    /// `sink` (in commit order) instead of a channel.
    pub fn start_with_sink(
        config: ServiceConfig,
        store: Arc<dyn ShadowStore>,
        committed: mpsc::Receiver<CommittedBatch>,
        metrics: Option<ShadowMetrics>,
        sink: Arc<dyn MessageSink>,
    ) -> Arc<ShadowService> {
        ShadowService::launch(config, store, committed, metrics, Outbox::Sink(sink))
    }

    fn launch(
        config: ServiceConfig,
        store: Arc<dyn ShadowStore>,
        committed: mpsc::Receiver<CommittedBatch>,
        metrics: Option<ShadowMetrics>,
        outbox: Outbox,
    ) -> Arc<ShadowService> {
        let (changes, _) = broadcast::channel(config.change_buffer.max(1));
        let fleet = Arc::new(FleetIndex::new());
        // A store that other nodes write too hands over every node's
        // changes in order; otherwise this node's own commits are all.
        let followed = store.follow();
        let publisher = tokio::spawn(publish_committed(
            committed,
            outbox.clone(),
            followed
                .is_none()
                .then(|| (changes.clone(), Arc::clone(&fleet))),
            metrics.clone(),
        ));
        let (follower, followed_through) = match followed {
            Some(log) => {
                let (through, through_rx) = watch::channel(log.after);
                let feed = feed_changes(log.changes, changes.clone(), Arc::clone(&fleet), through);
                (Some(tokio::spawn(feed)), Some(through_rx))
            }
            None => (None, None),
        };
        let loader = {
            let store = Arc::clone(&store);
            let fleet = Arc::clone(&fleet);
            // The publisher already feeds the index; the store's fleet is
            // merged under it. A panic marks the index failed before it goes on.
            tokio::task::spawn_blocking(move || {
                let load = || fleet.load(|each| store.fleet_snapshot(each));
                if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)) {
                    fleet.fail();
                    std::panic::resume_unwind(panic);
                }
            })
        };
        let service = ShadowService {
            throttle: Throttle::new(
                config.limits.requests_per_second,
                config.limits.max_in_flight,
            ),
            limits: config.limits,
            store,
            outbox,
            changes,
            publisher: Mutex::new(Some(publisher)),
            follower: Mutex::new(follower),
            followed_through,
            loader: Mutex::new(Some(loader)),
            fleet,
            metrics,
        };
        Arc::new(service)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn store(&self) -> &Arc<dyn ShadowStore> {
        &self.store
    }

    /// The in-memory fleet index (every live shadow and connectivity),
    /// current up to the last published change.
    pub fn fleet(&self) -> &Arc<FleetIndex> {
        &self.fleet
    }

    /// Waits until the fleet index holds every change committed before the
    /// call, on any node, so that a search finds what was answered before
    /// it. At once when only this process writes the store: each commit is
    /// indexed before it is answered. With a shared store, until the
    /// follower has fed the log's last sequence, for up to
    /// [`FLEET_CATCH_UP`]; `Behind` after that, or if the store cannot say.
    pub async fn fleet_caught_up(&self) -> Result<(), IndexError> {
        let Some(through) = &self.followed_through else {
            return Ok(());
        };
        let store = Arc::clone(&self.store);
        let last = match tokio::task::spawn_blocking(move || store.change_log_bounds()).await {
            Ok(Ok(bounds)) => bounds.last,
            Ok(Err(err)) => {
                warn!(cause = %err, "fleet read could not learn the change log's last sequence");
                return Err(IndexError::Behind);
            }
            Err(_) => return Err(IndexError::Behind),
        };
        let mut through = through.clone();
        let fed = tokio::time::timeout(FLEET_CATCH_UP, through.wait_for(|&seq| seq >= last))
            .await
            .is_ok_and(|fed| fed.is_ok());
        match fed {
            true => Ok(()),
            false => Err(IndexError::Behind),
        }
    }

    /// Every committed change from now on, in commit order.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Handles one request and returns its answer once it is durable. Every
    /// message of the answer has also been queued on the outbox.
    pub async fn handle(&self, request: Request) -> Answer {
        self.submit(request).answer().await
    }

    /// Validates and queues one request without waiting. Requests submitted
    /// one after another are applied in that order, so a transport that must
    /// keep a device's order calls this in arrival order and awaits later.
    pub fn submit(&self, request: Request) -> Pending {
        let key = request.key;
        let op = request.op;
        // Refused before parsing: still echo the clientToken if there is one,
        // so that the device can tell which request was refused.
        let early = |rejection: Rejection| Command::Refused {
            op,
            refused: Refused {
                rejection,
                client_token: self.client_token_of(&request.payload),
            },
        };
        let mut retry_after = None;
        let (command, permit) = if let Err(rejection) = self.check_names(&key) {
            (early(rejection), None)
        } else {
            match self.throttle.acquire(&key.thing) {
                Ok(permit) => match self.parse(op, &request.payload) {
                    Ok(command) => (command, Some(permit)),
                    Err(refused) => (Command::Refused { op, refused }, Some(permit)),
                },
                Err(spent) => {
                    debug!(thing = %key.thing, ?spent, "throttled");
                    if let Spent::Rate { next } = spent {
                        retry_after = Some(next);
                    }
                    (early(Rejection::Throttled), None)
                }
            }
        };
        let mut pending = self.queue(key, op, command, permit, request.user_properties);
        pending.retry_after = retry_after;
        pending
    }

    /// Queues a command, refusals included: they are answered in their place
    /// in line, after the answers of earlier requests of the same shadow.
    fn queue(
        &self,
        key: ShadowKey,
        op: Operation,
        command: Command,
        permit: Option<Permit>,
        user_properties: Option<UserProperties>,
    ) -> Pending {
        let client_token = command.client_token().map(str::to_string);
        let own_refusal = match &command {
            Command::Refused { refused, .. } => Some(refused.clone()),
            _ => None,
        };
        let (reply, answer) = oneshot::channel();
        let job = Job::Shadow {
            key: key.clone(),
            command,
            ticket: Some(Ticket {
                reply,
                slot: permit,
                user_properties: user_properties.clone(),
            }),
        };
        let state = match self.store.submit(job) {
            Ok(()) => PendingState::Queued {
                answer,
                client_token,
            },
            Err(err) => {
                let rejection = match err {
                    StoreError::Busy => {
                        warn!(thing = %key.thing, "store queue full");
                        Rejection::Throttled
                    }
                    err => {
                        error!(cause = %err, thing = %key.thing, "could not queue a shadow request");
                        Rejection::Internal
                    }
                };
                // Answered directly, out of line: a refusal keeps its own reason.
                PendingState::Refused(own_refusal.unwrap_or(Refused {
                    rejection,
                    client_token,
                }))
            }
        };
        Pending {
            key,
            op,
            outbox: self.outbox.clone(),
            measure: self.measure(),
            state,
            retry_after: None,
            user_properties,
        }
    }

    /// Refuses a request without handling it (e.g. when the transport is
    /// overloaded), publishing the rejection like any other answer.
    pub async fn refuse(&self, request: Request, rejection: Rejection) -> Answer {
        let client_token = self.client_token_of(&request.payload);
        Pending {
            key: request.key,
            op: request.op,
            outbox: self.outbox.clone(),
            state: PendingState::Refused(Refused {
                rejection,
                client_token,
            }),
            measure: self.measure(),
            retry_after: None,
            user_properties: request.user_properties,
        }
        .answer()
        .await
    }

    /// Records that a thing connected or disconnected (in the change log and
    /// the things table). Returns `false` when the store could not take it.
    pub fn record_presence(
        &self,
        thing: &str,
        connected: bool,
        at_ms: i64,
        reason: Option<String>,
    ) -> bool {
        let job = Job::Presence {
            thing: thing.to_string(),
            connected,
            at_ms,
            reason,
        };
        match self.store.submit(job) {
            Ok(()) => true,
            Err(err) => {
                warn!(cause = %err, thing, "presence not recorded");
                false
            }
        }
    }

    /// Deletes a thing: each of its shadows as a delete request would (their
    /// `/delete/accepted` answers and change log entries included), then its
    /// connectivity. Says what it deleted once committed; a shadow created
    /// meanwhile (its device is still connected) is not deleted.
    pub async fn delete_thing(&self, thing: &str, client: &str) -> Result<DeletedThing, Rejection> {
        let store = Arc::clone(&self.store);
        let owner = thing.to_owned();
        let keys = tokio::task::spawn_blocking(move || shadows_of(&*store, &owner))
            .await
            .map_err(|_| Rejection::Internal)?
            .map_err(|err| {
                error!(cause = %err, thing = %thing, "could not read the thing's shadows");
                Rejection::Internal
            })?;
        debug!(thing, client, shadows = keys.len(), "deleting a thing");
        let mut deleted = DeletedThing::default();
        for key in keys {
            let name = key.name.clone();
            // Not throttled: an operator's delete of a thing with more
            // shadows than its per-second rate must not stop half-way.
            let command = Command::Delete(PlainRequest::default());
            let pending = self.queue(key, Operation::Delete, command, None, None);
            match pending.answer().await.result {
                Ok(_) => deleted.shadows.push(name),
                Err(Rejection::NotFound { .. }) => {}
                Err(rejection) => return Err(rejection),
            }
        }
        let (reply, forgotten) = oneshot::channel();
        let job = Job::Forget {
            thing: thing.to_owned(),
            reply,
        };
        if let Err(err) = self.store.submit(job) {
            warn!(cause = %err, thing, "connectivity not forgotten");
            return Err(Rejection::Throttled);
        }
        deleted.connectivity = forgotten.await.map_err(|_| Rejection::Internal)??;
        Ok(deleted)
    }

    /// Finishes what is queued, publishes its answers, and stops.
    pub async fn close(&self) {
        let store = Arc::clone(&self.store);
        let closed = tokio::task::spawn_blocking(move || store.close()).await;
        if let Some(Err(err)) = tasks::joined("store close", closed) {
            error!(cause = %err, "store did not close cleanly");
        }
        let publisher = self.publisher.lock().ok().and_then(|mut p| p.take());
        if let Some(publisher) = publisher {
            tasks::joined("answer publisher", publisher.await);
        }
        let follower = self.follower.lock().ok().and_then(|mut f| f.take());
        if let Some(follower) = follower {
            tasks::joined("change log follower", follower.await);
        }
        let loader = self.loader.lock().ok().and_then(|mut l| l.take());
        if let Some(loader) = loader {
            tasks::joined("fleet index load", loader.await);
        }
    }

    /// The clientToken of a payload not otherwise parsed, if it has a valid one.
    fn client_token_of(&self, payload: &[u8]) -> Option<String> {
        parse_plain(payload, &self.limits)
            .ok()
            .and_then(|p| p.client_token)
    }

    fn check_names(&self, key: &ShadowKey) -> Result<(), Rejection> {
        self.limits.check_thing_name(&key.thing)?;
        match &key.name {
            Some(name) => self.limits.check_shadow_name(name),
            None => Ok(()),
        }
    }

    fn measure(&self) -> Option<(ShadowMetrics, Instant)> {
        self.metrics.clone().map(|m| (m, Instant::now()))
    }

    fn parse(&self, op: Operation, payload: &[u8]) -> Result<Command, Refused> {
        Ok(match op {
            Operation::Update => Command::Update(parse_update(payload, &self.limits)?),
            Operation::Get => Command::Get(parse_plain(payload, &self.limits)?),
            Operation::Delete => Command::Delete(parse_plain(payload, &self.limits)?),
        })
    }
}

/// A submitted request; [`Pending::answer`] waits for its answer. While it
/// lives it holds one of its thing's in-flight slots.
#[derive(Debug)]
pub struct Pending {
    key: ShadowKey,
    op: Operation,
    outbox: Outbox,
    state: PendingState,
    /// Where and since when to measure the request, when metrics are on.
    measure: Option<(ShadowMetrics, Instant)>,
    /// Set when the thing's request rate was used up: how long until it
    /// may send another request.
    retry_after: Option<Duration>,
    /// Repeated on a refusal's reply (a queued request's travel with it).
    user_properties: Option<UserProperties>,
}

#[derive(Debug)]
enum PendingState {
    Queued {
        answer: oneshot::Receiver<Answer>,
        client_token: Option<String>,
    },
    Refused(Refused),
}

impl Pending {
    /// When the request was refused because its thing's request rate was
    /// used up: how long until the thing may send another one. A transport
    /// can stop taking the sender's requests for that long.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The answer, once durable (or the rejection, once published).
    pub async fn answer(mut self) -> Answer {
        let measure = self.measure.take();
        let op = self.op;
        let answer = self.resolve().await;
        if let Some((metrics, started)) = measure {
            let code = match &answer.result {
                Ok(_) => 200,
                Err(rejection) => rejection.code(),
            };
            metrics
                .requests
                .with_label_values(&[op.as_str(), code_label(code)])
                .inc();
            metrics
                .request_seconds
                .with_label_values(&[op.as_str()])
                .observe(started.elapsed().as_secs_f64());
        }
        answer
    }

    async fn resolve(self) -> Answer {
        let refused = match self.state {
            PendingState::Refused(refused) => refused,
            PendingState::Queued {
                answer,
                client_token,
            } => match answer.await {
                Ok(answer) => return answer,
                Err(_) => {
                    error!(thing = %self.key.thing, "store dropped a request");
                    Refused {
                        rejection: Rejection::Internal,
                        client_token,
                    }
                }
            },
        };
        let answer = Answer::rejected(
            &self.key,
            self.op,
            refused.rejection,
            refused.client_token.as_deref(),
            now_secs(),
        )
        .with_user_properties(self.user_properties);
        for message in &answer.messages {
            if !self.outbox.send(message.clone()).await {
                debug!("outbox closed; rejection not published");
            }
        }
        answer
    }
}

/// What [`ShadowService::delete_thing`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeletedThing {
    /// Names of the shadows deleted (`None`: the classic shadow).
    pub shadows: Vec<Option<String>>,
    /// Whether its connectivity was known (and is now forgotten).
    pub connectivity: bool,
}

impl DeletedThing {
    pub fn is_empty(&self) -> bool {
        self.shadows.is_empty() && !self.connectivity
    }
}

/// A thing's live shadows: the classic one first, then the named ones.
fn shadows_of(store: &dyn ShadowStore, thing: &str) -> Result<Vec<ShadowKey>, StoreError> {
    let mut keys = Vec::new();
    let classic = ShadowKey::classic(thing.to_owned());
    if store.load(&classic)?.is_some_and(|s| !s.deleted) {
        keys.push(classic);
    }
    let mut after: Option<String> = None;
    loop {
        let page = store.named_shadows(thing, after.as_deref(), 100)?;
        let Some(last) = page.last().cloned() else {
            return Ok(keys);
        };
        keys.extend(page.into_iter().map(|name| ShadowKey::named(thing, name)));
        after = Some(last);
    }
}

/// Turns committed results into answers, in commit order: queues their
/// messages on the outbox and wakes their callers; with `feed`, also
/// indexes and broadcasts their changes.
async fn publish_committed(
    mut committed: mpsc::Receiver<CommittedBatch>,
    outbox: Outbox,
    feed: Option<(broadcast::Sender<Change>, Arc<FleetIndex>)>,
    metrics: Option<ShadowMetrics>,
) {
    let mut outbox = Some(outbox);
    while let Some(batch) = committed.recv().await {
        for done in batch {
            let (change, answer_to) = match done {
                Committed::Presence { change } => (change, None),
                Committed::Forget {
                    change,
                    reply,
                    failed,
                } => {
                    let result = match failed {
                        true => Err(Rejection::Internal),
                        false => Ok(change.is_some()),
                    };
                    // The caller may have gone away.
                    let _ = reply.send(result);
                    (change, None)
                }
                Committed::Shadow {
                    key,
                    command,
                    result,
                    change,
                    ticket,
                } => {
                    let op = command.operation();
                    let token = command.client_token();
                    let answer = match &result {
                        Ok(outcome) => Answer::accepted_for(&key, &command, outcome, |topic| {
                            outbox.as_ref().is_none_or(|o| o.wants(topic))
                        }),
                        Err(rejection) => {
                            Answer::rejected(&key, op, rejection.clone(), token, now_secs())
                        }
                    };
                    (change, Some((answer, ticket)))
                }
            };
            // Indexed before the caller hears back: a client that got its
            // answer finds its change in a search.
            if let (Some(change), Some((_, fleet))) = (&change, &feed) {
                fleet.apply(change.clone());
            }
            if let Some((answer, ticket)) = answer_to {
                if let Some(metrics) = &metrics {
                    let deltas = answer
                        .messages
                        .iter()
                        .filter(|m| m.topic.ends_with("/update/delta"))
                        .count();
                    metrics.deltas_published.inc_by(deltas as u64);
                }
                // The caller first: that frees the thing's in-flight slot
                // before the device can see the answer and send its next request.
                let messages = match ticket {
                    Some(Ticket {
                        reply,
                        slot,
                        user_properties,
                    }) => {
                        drop(slot);
                        let answer = answer.with_user_properties(user_properties);
                        let messages = answer.messages.clone();
                        // The caller may have gone away; the answer is published anyway.
                        let _ = reply.send(answer);
                        messages
                    }
                    None => answer.messages,
                };
                for message in messages {
                    let sent = match &outbox {
                        Some(outbox) => outbox.send(message).await,
                        None => false,
                    };
                    if !sent && outbox.take().is_some() {
                        debug!("outbox closed; answers are no longer published");
                    }
                }
            }
            if let (Some(change), Some((changes, _))) = (change, &feed) {
                // No subscribers is fine: the change log keeps it for catch-up.
                let _ = changes.send(change);
            }
        }
    }
}

/// Indexes and broadcasts the changes a shared store's log hands over
/// (every node's, in sequence order).
async fn feed_changes(
    mut log: mpsc::Receiver<Change>,
    changes: broadcast::Sender<Change>,
    fleet: Arc<FleetIndex>,
    through: watch::Sender<u64>,
) {
    while let Some(change) = log.recv().await {
        let seq = change.seq;
        fleet.apply(change.clone());
        let _ = changes.send(change);
        through.send_replace(seq);
    }
}

/// The answer code as a metric label, without allocating.
fn code_label(code: u16) -> &'static str {
    match code {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        413 => "413",
        429 => "429",
        _ => "500",
    }
}

/// Epoch seconds now.
pub fn now_secs() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
