//! The `$aws/...` topic space as Umbra serves it: a subscription table and a
//! mailbox per session. Shadow answers, deltas and presence events are
//! written straight into each subscriber's mailbox, and its connection task
//! sends them; rumqttd's router never sees `$aws` traffic.
//!
//! The table keeps exact filters (a device's own answer topics) in a hash map
//! keyed by topic, wildcard filters under one thing (`$aws/things/dev1/shadow/#`)
//! in a map keyed by thing, and the few wildcard filters that span things
//! (privileged clients' `$aws/things/+/shadow/#`) in a list that is scanned.
//! A subscriber gets each message once, at min(message QoS, the highest QoS
//! of its matching filters).

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use rumqttd::protocol::{PublishProperties, QoS};
use tokio::sync::Notify;
use tracing::warn;

use crate::metrics::{bump, EdgeMetrics};
use crate::topics::topic_matches;

/// A message Umbra sends to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    /// MQTT 5 properties (a reply to a response topic carries the request's
    /// correlation data and user properties).
    pub properties: Option<Arc<PublishProperties>>,
}

/// Messages waiting for one session's connection. Shared between the table
/// (which fills it) and the connection task (which drains it); it outlives a
/// connection when the session is persistent.
#[derive(Debug)]
pub struct Mailbox {
    state: Mutex<MailboxState>,
    ready: Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct MailboxState {
    queue: VecDeque<Delivery>,
    /// A connection is attached: QoS 0 messages are only kept while one is.
    online: bool,
}

impl Mailbox {
    pub fn new(capacity: usize) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            state: Mutex::new(MailboxState::default()),
            ready: Notify::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, MailboxState> {
        // Pushing and popping cannot leave the queue inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `delivery`; false if it was dropped (mailbox full, or QoS 0
    /// while no connection is attached).
    fn push(&self, delivery: Delivery) -> bool {
        {
            let mut state = self.lock();
            if delivery.qos == QoS::AtMostOnce && !state.online {
                return false;
            }
            if state.queue.len() >= self.capacity {
                return false;
            }
            state.queue.push_back(delivery);
        }
        self.ready.notify_one();
        true
    }

    /// The next queued message.
    pub fn pop(&self) -> Option<Delivery> {
        let mut state = self.lock();
        let next = state.queue.pop_front();
        if state.queue.is_empty() && state.queue.capacity() > 0 {
            // An idle session keeps no queue.
            state.queue = VecDeque::new();
        }
        next
    }

    /// Resolves when something was queued since the last call.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Marks a connection attached or detached. Detaching drops queued QoS 0
    /// messages (MQTT keeps only QoS 1 and 2 for an offline session).
    pub fn set_online(&self, online: bool) {
        let mut state = self.lock();
        state.online = online;
        if !online {
            state.queue.retain(|d| d.qos != QoS::AtMostOnce);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().queue.len()
    }
}

#[derive(Debug, Clone)]
struct Route {
    mailbox: Arc<Mailbox>,
    qos: QoS,
    /// The subscription's MQTT 5 subscription identifier, if it has one.
    id: Option<NonZeroU32>,
}

/// The subscribers of one exact topic: almost always one (a device's own
/// answer topic), kept without an allocation of its own.
#[derive(Debug)]
enum Routes {
    One(Route),
    Many(Vec<Route>),
}

impl Routes {
    fn as_slice(&self) -> &[Route] {
        match self {
            Routes::One(route) => std::slice::from_ref(route),
            Routes::Many(routes) => routes,
        }
    }

    /// Adds `route`, replacing the one of the same mailbox.
    fn upsert(&mut self, route: Route) {
        let mut routes = match std::mem::replace(self, Routes::Many(Vec::new())) {
            Routes::One(one) if Arc::ptr_eq(&one.mailbox, &route.mailbox) => {
                *self = Routes::One(route);
                return;
            }
            Routes::One(one) => vec![one],
            Routes::Many(routes) => routes,
        };
        remove_route(&mut routes, &route.mailbox, |r| r);
        routes.push(route);
        *self = Routes::Many(routes);
    }

    /// Removes the route to `mailbox`; true when none is left.
    fn remove(&mut self, mailbox: &Arc<Mailbox>) -> bool {
        match self {
            Routes::One(one) => Arc::ptr_eq(&one.mailbox, mailbox),
            Routes::Many(routes) => {
                remove_route(routes, mailbox, |r| r);
                routes.is_empty()
            }
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    /// Filters without wildcards, by topic. The key is shared with the
    /// subscribing sessions' lists of what they hold.
    exact: HashMap<Arc<str>, Routes>,
    /// Wildcard filters below `$aws/things/{thing}/`, by thing.
    by_thing: HashMap<Box<str>, Vec<(Arc<str>, Route)>>,
    /// Wildcard filters that span things (scanned for every message).
    spanning: Vec<(Arc<str>, Route)>,
}

fn has_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// `$aws/things/{thing}/...` with a literal thing: that thing.
fn literal_thing(filter: &str) -> Option<&str> {
    let rest = filter.strip_prefix("$aws/things/")?;
    let (thing, _) = rest.split_once('/')?;
    (!thing.is_empty() && !has_wildcard(thing)).then_some(thing)
}

fn remove_route<T>(routes: &mut Vec<T>, mailbox: &Arc<Mailbox>, route: impl Fn(&T) -> &Route) {
    routes.retain(|r| !Arc::ptr_eq(&route(r).mailbox, mailbox));
}

/// A subscriber of a message: its mailbox, at the highest QoS of its
/// matching filters, with their subscription identifiers.
struct Target {
    mailbox: Arc<Mailbox>,
    qos: QoS,
    ids: Vec<usize>,
}

/// The `$aws` subscription table, shared by every connection; cheap to clone.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    table: Mutex<Table>,
    metrics: Arc<EdgeMetrics>,
}

/// Why a message could not be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("topic {0} is not under $aws/")]
    NotAws(String),
}

impl Publisher {
    pub fn new(metrics: Arc<EdgeMetrics>) -> Publisher {
        Publisher {
            inner: Arc::new(Shared {
                table: Mutex::new(Table::default()),
                metrics,
            }),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Every update of the table is a single insert or retain.
        self.inner
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds (or, for a filter the mailbox already holds, updates) a route.
    /// Returns the filter as the table keeps it, for the session to share.
    pub fn subscribe(&self, filter: &str, qos: QoS, mailbox: &Arc<Mailbox>) -> Arc<str> {
        self.subscribe_with_id(filter, qos, None, mailbox)
    }

    /// [`subscribe`](Self::subscribe) with an MQTT 5 subscription
    /// identifier, which the messages the route delivers carry.
    pub fn subscribe_with_id(
        &self,
        filter: &str,
        qos: QoS,
        id: Option<NonZeroU32>,
        mailbox: &Arc<Mailbox>,
    ) -> Arc<str> {
        let route = Route {
            mailbox: Arc::clone(mailbox),
            qos,
            id,
        };
        let mut table = self.table();
        if !has_wildcard(filter) {
            if let Some(key) = table
                .exact
                .get_key_value(filter)
                .map(|(k, _)| Arc::clone(k))
            {
                if let Some(routes) = table.exact.get_mut(filter) {
                    routes.upsert(route);
                }
                return key;
            }
            let key: Arc<str> = filter.into();
            table.exact.insert(Arc::clone(&key), Routes::One(route));
            return key;
        }
        let key: Arc<str> = filter.into();
        let routes = match literal_thing(filter) {
            Some(thing) => table.by_thing.entry(thing.into()).or_default(),
            None => &mut table.spanning,
        };
        routes.retain(|(f, r)| !(&**f == filter && Arc::ptr_eq(&r.mailbox, mailbox)));
        routes.push((Arc::clone(&key), route));
        key
    }

    /// Removes the route of `filter` to `mailbox`; entries nobody uses any
    /// more are freed.
    pub fn unsubscribe(&self, filter: &str, mailbox: &Arc<Mailbox>) {
        let mut table = self.table();
        if !has_wildcard(filter) {
            if table
                .exact
                .get_mut(filter)
                .is_some_and(|routes| routes.remove(mailbox))
            {
                table.exact.remove(filter);
            }
            return;
        }
        let keep =
            |(f, r): &(Arc<str>, Route)| !(&**f == filter && Arc::ptr_eq(&r.mailbox, mailbox));
        match literal_thing(filter) {
            Some(thing) => {
                if let Some(routes) = table.by_thing.get_mut(thing) {
                    routes.retain(keep);
                    if routes.is_empty() {
                        table.by_thing.remove(thing);
                    }
                }
            }
            None => table.spanning.retain(keep),
        }
    }

    /// Delivers a message Umbra publishes (an answer, a delta, a presence
    /// event) to every subscriber of `topic`, at QoS 1 or lower. Never waits:
    /// a full mailbox drops the message and counts it.
    pub fn publish(&self, topic: &str, payload: Bytes) -> Result<usize, PublishError> {
        self.publish_at(topic, payload, QoS::AtLeastOnce)
    }

    /// [`publish`](Self::publish) at `qos` (a device's own publish to a
    /// `$aws` topic keeps its QoS).
    pub fn publish_at(&self, topic: &str, payload: Bytes, qos: QoS) -> Result<usize, PublishError> {
        self.publish_with(topic, payload, qos, None)
    }

    /// [`publish_at`](Self::publish_at) with MQTT 5 properties, which MQTT
    /// 3.1.1 subscribers do not get.
    pub fn publish_with(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        properties: Option<Arc<PublishProperties>>,
    ) -> Result<usize, PublishError> {
        if !topic.starts_with("$aws/") {
            return Err(PublishError::NotAws(topic.to_owned()));
        }
        let targets = self.matching(topic);
        let metrics = &self.inner.metrics;
        if targets.is_empty() {
            bump(&metrics.answers_unrouted);
            return Ok(0);
        }
        let topic = Bytes::copy_from_slice(topic.as_bytes());
        let mut delivered = 0;
        for Target {
            mailbox,
            qos: sub_qos,
            ids,
        } in targets
        {
            let properties = match ids.is_empty() {
                true => properties.clone(),
                // Only this subscriber's copy carries its identifiers.
                false => Some(Arc::new(PublishProperties {
                    subscription_identifiers: ids,
                    ..properties.as_deref().cloned().unwrap_or_default()
                })),
            };
            let delivery = Delivery {
                topic: topic.clone(),
                payload: payload.clone(),
                qos: min_qos(qos, sub_qos),
                properties,
            };
            if mailbox.push(delivery) {
                delivered += 1;
            } else {
                bump(&metrics.answers_dropped);
                warn!(
                    topic = %String::from_utf8_lossy(&topic),
                    "message dropped: subscriber's queue is full or it is offline (QoS 0)"
                );
            }
        }
        metrics
            .answers_published
            .fetch_add(delivered as u64, Ordering::Relaxed);
        Ok(delivered)
    }

    /// Whether any filter matches `topic`.
    pub fn has_subscriber(&self, topic: &str) -> bool {
        let table = self.table();
        table.exact.contains_key(topic)
            || literal_thing(topic)
                .and_then(|t| table.by_thing.get(t))
                .is_some_and(|routes| routes.iter().any(|(f, _)| topic_matches(topic, f)))
            || table.spanning.iter().any(|(f, _)| topic_matches(topic, f))
    }

    /// Every mailbox with a filter matching `topic`, once, at the highest
    /// QoS of its matching filters and with their subscription identifiers.
    fn matching(&self, topic: &str) -> Vec<Target> {
        let table = self.table();
        let mut found: Vec<Target> = Vec::new();
        let mut add = |route: &Route| {
            let target = match found
                .iter_mut()
                .position(|t| Arc::ptr_eq(&t.mailbox, &route.mailbox))
            {
                Some(at) => &mut found[at],
                None => {
                    found.push(Target {
                        mailbox: Arc::clone(&route.mailbox),
                        qos: route.qos,
                        ids: Vec::new(),
                    });
                    found.last_mut().expect("just pushed")
                }
            };
            target.qos = max_qos(target.qos, route.qos);
            target.ids.extend(route.id.map(|id| id.get() as usize));
        };
        if let Some(routes) = table.exact.get(topic) {
            routes.as_slice().iter().for_each(&mut add);
        }
        if let Some(routes) = literal_thing(topic).and_then(|t| table.by_thing.get(t)) {
            for (filter, route) in routes {
                if topic_matches(topic, filter) {
                    add(route);
                }
            }
        }
        for (filter, route) in &table.spanning {
            if topic_matches(topic, filter) {
                add(route);
            }
        }
        found
    }

    pub fn metrics(&self) -> Arc<EdgeMetrics> {
        Arc::clone(&self.inner.metrics)
    }

    /// Filters in the table (exact, per-thing wildcard, spanning).
    #[cfg(test)]
    pub(crate) fn filter_count(&self) -> usize {
        let table = self.table();
        table
            .exact
            .values()
            .map(|r| r.as_slice().len())
            .sum::<usize>()
            + table.by_thing.values().map(Vec::len).sum::<usize>()
            + table.spanning.len()
    }
}

/// The shadow service hands its answers here, in commit order.
impl umbra_shadow::MessageSink for Publisher {
    fn publish(&self, message: umbra_shadow::Message) {
        let properties = message.user_properties.map(|pairs| {
            Arc::new(PublishProperties {
                user_properties: pairs.to_vec(),
                ..PublishProperties::default()
            })
        });
        let published = self.publish_with(
            &message.topic,
            message.payload,
            QoS::AtLeastOnce,
            properties,
        );
        if let Err(err) = published {
            warn!(cause = %err, "answer not published");
        }
    }

    fn wants(&self, topic: &str) -> bool {
        self.has_subscriber(topic)
    }
}

pub fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

fn max_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher() -> Publisher {
        Publisher::new(Arc::new(EdgeMetrics::default()))
    }

    fn online(capacity: usize) -> Arc<Mailbox> {
        let mailbox = Mailbox::new(capacity);
        mailbox.set_online(true);
        mailbox
    }

    #[test]
    fn exact_thing_and_spanning_filters_each_deliver_once() {
        let p = publisher();
        let dev = online(10);
        let console = online(10);
        p.subscribe("$aws/things/d1/shadow/get/accepted", QoS::AtMostOnce, &dev);
        p.subscribe("$aws/things/d1/shadow/#", QoS::AtLeastOnce, &dev);
        p.subscribe("$aws/things/+/shadow/#", QoS::AtMostOnce, &console);
        let n = p
            .publish(
                "$aws/things/d1/shadow/get/accepted",
                Bytes::from_static(b"x"),
            )
            .expect("aws topic");
        assert_eq!(n, 2);
        let got = dev.pop().expect("delivered");
        assert_eq!(got.qos, QoS::AtLeastOnce, "highest matching QoS");
        assert!(dev.pop().is_none(), "once per subscriber");
        assert_eq!(console.pop().map(|d| d.qos), Some(QoS::AtMostOnce));
        assert_eq!(
            p.publish("$aws/things/d2/shadow/get/accepted", Bytes::new()),
            Ok(1)
        );
        assert!(p.publish("things/d1", Bytes::new()).is_err());
    }

    #[test]
    fn has_subscriber_sees_every_kind_of_filter() {
        let p = publisher();
        let dev = online(10);
        let topic = "$aws/things/d1/shadow/update/documents";
        assert!(!p.has_subscriber(topic));
        p.subscribe(topic, QoS::AtLeastOnce, &dev);
        assert!(p.has_subscriber(topic));
        p.unsubscribe(topic, &dev);
        p.subscribe("$aws/things/d1/shadow/update/+", QoS::AtLeastOnce, &dev);
        assert!(p.has_subscriber(topic));
        assert!(!p.has_subscriber("$aws/things/d2/shadow/update/documents"));
        p.subscribe("$aws/things/+/shadow/#", QoS::AtLeastOnce, &dev);
        assert!(p.has_subscriber("$aws/things/d2/shadow/update/documents"));
    }

    #[test]
    fn unsubscribe_frees_entries() {
        let p = publisher();
        let dev = online(10);
        p.subscribe("$aws/things/d1/shadow/update/delta", QoS::AtLeastOnce, &dev);
        p.subscribe("$aws/things/d1/shadow/+/accepted", QoS::AtLeastOnce, &dev);
        p.subscribe("$aws/things/d1/shadow/update/delta", QoS::AtLeastOnce, &dev);
        assert_eq!(p.filter_count(), 2);
        p.unsubscribe("$aws/things/d1/shadow/update/delta", &dev);
        p.unsubscribe("$aws/things/d1/shadow/+/accepted", &dev);
        assert_eq!(p.filter_count(), 0);
        let table = p.table();
        assert!(table.exact.is_empty() && table.by_thing.is_empty());
    }

    #[test]
    fn full_or_offline_mailboxes_drop_and_count() {
        let metrics = Arc::new(EdgeMetrics::default());
        let p = Publisher::new(Arc::clone(&metrics));
        let dev = online(1);
        p.subscribe("$aws/things/d1/shadow/get/accepted", QoS::AtLeastOnce, &dev);
        let topic = "$aws/things/d1/shadow/get/accepted";
        assert_eq!(p.publish(topic, Bytes::new()), Ok(1));
        assert_eq!(p.publish(topic, Bytes::new()), Ok(0));
        assert_eq!(metrics.answers_dropped.load(Ordering::Relaxed), 1);
        // Offline: QoS 1 is kept, QoS 0 is not.
        dev.pop();
        dev.set_online(false);
        assert_eq!(p.publish_at(topic, Bytes::new(), QoS::AtMostOnce), Ok(0));
        assert_eq!(p.publish(topic, Bytes::new()), Ok(1));
        assert_eq!(dev.len(), 1);
    }
}
