//! The connection edge: a rumqttd [`Protocol`] wrapper that sees every packet
//! of one client connection and applies Umbra's rules to it.
//!
//! rumqttd clones the protocol object once per accepted connection, so each
//! [`EdgeProtocol`] clone starts with fresh per-connection state. It:
//! - accepts keep-alive 0 (rumqttd refuses it) by rewriting it to the largest
//!   value, about 27 hours before rumqttd's 1.5 x keep-alive read timeout;
//! - disables broker-to-client topic aliases (so every outgoing topic can be
//!   inspected) and resolves client-to-broker aliases before routing;
//! - maps `$aws/...` filters and topics to the internal prefix and back (see
//!   [`crate::topics`]) and enforces per-client authorization: a forbidden
//!   operation closes the connection, like AWS IoT does;
//! - hands shadow requests to a [`ShadowRequestSink`] without blocking;
//! - emits [`PresenceEvent`]s: `Connected` when a successful CONNACK is
//!   written, `Disconnected` when the connection's state is dropped;
//! - drops internal-prefix publishes that reached the connection through a
//!   plain wildcard (MQTT: `#` never delivers `$` topics) and, for QoS 1/2,
//!   answers the router with synthetic acknowledgements. rumqttd requires
//!   acks in the order it sent the publishes, so the edge keeps the order of
//!   outgoing QoS 1/2 publishes and releases real and synthetic acks to the
//!   router strictly in that order.
//!
//! Synthetic acks are returned by the next `read_mut` call. rumqttd's link
//! loop calls `read_mut` (through `Network::read`) at the top of every
//! iteration, right after it wrote a batch, before it waits for the socket.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::BytesMut;
use rumqttd::protocol::{
    self, ConnectReturnCode, Packet, Protocol, PubAck, PubAckReason, PubComp, PubCompReason,
    PubRec, PubRecReason, SubscribeReasonCode,
};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::metrics::{bump, EdgeMetrics, PacketKind};
use crate::requests::{ShadowPublish, ShadowRequestSink};
use crate::topics::{self, Forbidden, PublishRoute, SubscribeRoute};

/// Keep-alive substituted for 0 ("no keep-alive"), in seconds.
pub const KEEP_ALIVE_ZERO_REPLACEMENT: u16 = u16::MAX;

/// Rules of the connection edge.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeSettings {
    /// Client ids allowed to publish and subscribe anywhere under `$aws/`
    /// (services, operators' tools). Everyone else is a device limited to
    /// `$aws/things/{its client id}/...`.
    pub privileged_clients: HashSet<String>,
}

/// A device connected or disconnected. `session` increases with every
/// accepted connection of this broker, so a consumer can tell a stale
/// `Disconnected` (an old connection taken over by a new one with the same
/// client id) from a current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    Connected { client_id: String, session: u64 },
    Disconnected { client_id: String, session: u64 },
}

/// Where the edge sends what it extracts from connections.
#[derive(Clone)]
pub struct EdgeHooks {
    pub shadow_sink: Arc<dyn ShadowRequestSink>,
    /// Presence events, sent with `try_send` (dropped and counted when full).
    pub presence: Option<mpsc::Sender<PresenceEvent>>,
}

/// State shared by all connections of one listener set.
#[derive(Clone)]
pub struct EdgeContext {
    shared: Arc<Shared>,
}

struct Shared {
    settings: EdgeSettings,
    hooks: EdgeHooks,
    metrics: Arc<EdgeMetrics>,
    next_session: AtomicU64,
}

impl EdgeContext {
    pub fn new(settings: EdgeSettings, hooks: EdgeHooks, metrics: Arc<EdgeMetrics>) -> Self {
        EdgeContext {
            shared: Arc::new(Shared {
                settings,
                hooks,
                metrics,
                next_session: AtomicU64::new(1),
            }),
        }
    }
}

impl Shared {
    fn emit(&self, event: PresenceEvent) {
        if let Some(presence) = &self.hooks.presence {
            if presence.try_send(event).is_err() {
                bump(&self.metrics.presence_dropped);
            }
        }
    }
}

/// The protocol wrapper given to `rumqttd::Server`; `P` is
/// `rumqttd::protocol::v4::V4` or `v5::V5`.
pub struct EdgeProtocol<P> {
    inner: P,
    ctx: EdgeContext,
    conn: Mutex<ConnectionState>,
}

impl<P> EdgeProtocol<P> {
    pub fn new(inner: P, ctx: EdgeContext) -> Self {
        EdgeProtocol {
            inner,
            ctx,
            conn: Mutex::new(ConnectionState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ConnectionState> {
        // A panic while holding the lock ends the connection task anyway; the
        // state is still consistent enough to emit presence on drop.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Each clone is a new connection: fresh state, shared context.
impl<P: Clone> Clone for EdgeProtocol<P> {
    fn clone(&self) -> Self {
        EdgeProtocol::new(self.inner.clone(), self.ctx.clone())
    }
}

impl<P> Drop for EdgeProtocol<P> {
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let (Some(session), Some(client_id)) = (conn.session, conn.client_id.take()) {
            let shared = &self.ctx.shared;
            shared
                .metrics
                .connections_current
                .fetch_sub(1, Ordering::Relaxed);
            debug!(client_id, session, "connection closed");
            shared.emit(PresenceEvent::Disconnected { client_id, session });
        }
    }
}

#[derive(Default)]
struct ConnectionState {
    client_id: Option<String>,
    privileged: bool,
    /// Set once a successful CONNACK was written.
    session: Option<u64>,
    /// Internal-prefix forms of the `$aws` filters this connection holds.
    aws_filters: Vec<String>,
    /// SUBSCRIBE pkid -> indices of filters to answer with a failure code.
    refused: HashMap<u16, Vec<usize>>,
    /// Client-to-broker topic aliases (MQTT 5).
    aliases: HashMap<u16, bytes::Bytes>,
    acks: AckSequencer,
    /// Packets `read_mut` returns before parsing the socket buffer.
    ready: VecDeque<Packet>,
    scratch: BytesMut,
}

impl ConnectionState {
    fn client_id(&self) -> &str {
        self.client_id.as_deref().unwrap_or("")
    }
}

/// An outgoing QoS 1/2 publish (or PUBREL) awaiting its acknowledgement.
struct Pending {
    pkid: u16,
    synthetic: bool,
    /// The acknowledgement to hand to the router, once known.
    answer: Option<Packet>,
}

/// Keeps acknowledgements to the router in the order rumqttd expects: it
/// pops its inflight queue on every PUBACK/PUBREC and its PUBREL queue on
/// every PUBCOMP, and disconnects on a mismatch.
#[derive(Default)]
struct AckSequencer {
    /// Outgoing QoS 1/2 publishes, in write order (answered by PUBACK/PUBREC).
    publishes: VecDeque<Pending>,
    /// Outgoing PUBRELs, in write order (answered by PUBCOMP).
    releases: VecDeque<Pending>,
    /// Suppressed QoS 2 publishes whose PUBREL must be suppressed too.
    synthetic_pubrels: HashSet<u16>,
}

impl AckSequencer {
    fn publish_written(
        &mut self,
        qos: u8,
        pkid: u16,
        synthetic: bool,
        ready: &mut VecDeque<Packet>,
    ) {
        let answer = match (qos, synthetic) {
            (0, _) => return,
            (_, false) => None,
            (1, true) => Some(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )),
            (_, true) => {
                self.synthetic_pubrels.insert(pkid);
                Some(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                ))
            }
        };
        self.publishes.push_back(Pending {
            pkid,
            synthetic,
            answer,
        });
        Self::release(&mut self.publishes, ready);
    }

    /// Returns true if the PUBREL must not be written (its publish was
    /// suppressed); a synthetic PUBCOMP is then queued in order.
    fn pubrel_written(&mut self, pkid: u16, ready: &mut VecDeque<Packet>) -> bool {
        let synthetic = self.synthetic_pubrels.remove(&pkid);
        let answer = synthetic.then(|| {
            Packet::PubComp(
                PubComp {
                    pkid,
                    reason: PubCompReason::Success,
                },
                None,
            )
        });
        self.releases.push_back(Pending {
            pkid,
            synthetic,
            answer,
        });
        Self::release(&mut self.releases, ready);
        synthetic
    }

    /// A PUBACK/PUBREC from the client. Returns it back if it answers no
    /// tracked publish (rumqttd then judges it).
    fn client_ack(
        &mut self,
        pkid: u16,
        ack: Packet,
        ready: &mut VecDeque<Packet>,
    ) -> Option<Packet> {
        Self::answer(&mut self.publishes, pkid, ack, ready)
    }

    /// A PUBCOMP from the client; same contract as `client_ack`.
    fn client_pubcomp(
        &mut self,
        pkid: u16,
        comp: Packet,
        ready: &mut VecDeque<Packet>,
    ) -> Option<Packet> {
        Self::answer(&mut self.releases, pkid, comp, ready)
    }

    fn answer(
        queue: &mut VecDeque<Pending>,
        pkid: u16,
        answer: Packet,
        ready: &mut VecDeque<Packet>,
    ) -> Option<Packet> {
        let Some(pending) = queue
            .iter_mut()
            .find(|p| p.pkid == pkid && !p.synthetic && p.answer.is_none())
        else {
            return Some(answer);
        };
        pending.answer = Some(answer);
        Self::release(queue, ready);
        None
    }

    fn release(queue: &mut VecDeque<Pending>, ready: &mut VecDeque<Packet>) {
        while queue.front().is_some_and(|p| p.answer.is_some()) {
            if let Some(answer) = queue.pop_front().and_then(|p| p.answer) {
                ready.push_back(answer);
            }
        }
    }
}

/// QoS and packet id of an encoded PUBLISH (same layout in MQTT 3.1.1 and 5).
fn publish_qos_pkid(encoded: &[u8]) -> Option<(u8, u16)> {
    let (&header, rest) = encoded.split_first()?;
    let qos = (header >> 1) & 0b11;
    if qos == 0 {
        return Some((0, 0));
    }
    // Remaining length: 1 to 4 bytes, 7 bits each, high bit = continuation.
    let len_bytes = rest.iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let rest = rest.get(len_bytes..)?;
    let topic_len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let pkid = rest.get(2 + topic_len..4 + topic_len)?;
    Some((qos, u16::from_be_bytes([pkid[0], pkid[1]])))
}

fn forbidden(
    shared: &Shared,
    client_id: &str,
    what: &'static str,
    target: &str,
    why: Forbidden,
) -> protocol::Error {
    bump(&shared.metrics.forbidden);
    info!(
        client_id,
        what,
        target,
        reason = why.as_str(),
        "forbidden, closing connection"
    );
    // rumqttd has no "not authorized" protocol error; any error closes the
    // connection, this one reads least misleading in its logs.
    protocol::Error::InvalidProtocol
}

impl<P: Protocol> Protocol for EdgeProtocol<P> {
    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, protocol::Error> {
        let shared = &*self.ctx.shared;
        let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(packet) = conn.ready.pop_front() {
                return Ok(packet);
            }
            let packet = self.inner.read_mut(stream, max_size)?;
            shared.metrics.count_in(&packet);
            if let Some(packet) = incoming(conn, shared, packet)? {
                return Ok(packet);
            }
            // The packet was an acknowledgement held back for ordering.
        }
    }

    fn write(&self, packet: Packet, buffer: &mut BytesMut) -> Result<usize, protocol::Error> {
        let shared = &*self.ctx.shared;
        let mut guard = self.lock();
        let conn = &mut *guard;
        let kind = PacketKind::of(&packet);
        let packet = match packet {
            Packet::ConnAck(ack, props) => {
                if ack.code == ConnectReturnCode::Success && conn.session.is_none() {
                    if let Some(assigned) = props
                        .as_ref()
                        .and_then(|p| p.assigned_client_identifier.clone())
                    {
                        conn.client_id = Some(assigned);
                    }
                    let session = shared.next_session.fetch_add(1, Ordering::Relaxed);
                    conn.session = Some(session);
                    bump(&shared.metrics.connections_accepted);
                    bump(&shared.metrics.connections_current);
                    let client_id = conn.client_id().to_owned();
                    debug!(client_id, session, "connection accepted");
                    shared.emit(PresenceEvent::Connected { client_id, session });
                }
                Packet::ConnAck(ack, props)
            }
            Packet::Publish(mut publish, props) if topics::is_internal(as_str(&publish.topic)) => {
                let internal = as_str(&publish.topic);
                if topics::matches_any(internal, &conn.aws_filters) {
                    if let Some(aws) = topics::to_aws(internal) {
                        publish.topic = aws.into();
                    }
                    Packet::Publish(publish, props)
                } else {
                    // Reached us through a wildcard that must not see `$`
                    // topics: do not write it, but acknowledge it to the router.
                    conn.scratch.clear();
                    self.inner
                        .write(Packet::Publish(publish, props), &mut conn.scratch)?;
                    bump(&shared.metrics.suppressed_publishes);
                    if let Some((qos, pkid)) = publish_qos_pkid(&conn.scratch) {
                        if qos > 0 {
                            bump(&shared.metrics.synthetic_acks);
                        }
                        conn.acks.publish_written(qos, pkid, true, &mut conn.ready);
                    }
                    return Ok(0);
                }
            }
            Packet::PubRel(pubrel, props) => {
                if conn.acks.pubrel_written(pubrel.pkid, &mut conn.ready) {
                    bump(&shared.metrics.synthetic_acks);
                    return Ok(0);
                }
                Packet::PubRel(pubrel, props)
            }
            Packet::SubAck(mut suback, props) => {
                if let Some(indices) = conn.refused.remove(&suback.pkid) {
                    for index in indices {
                        if let Some(code) = suback.return_codes.get_mut(index) {
                            *code = SubscribeReasonCode::Failure;
                        }
                    }
                }
                Packet::SubAck(suback, props)
            }
            other => other,
        };
        let start = buffer.len();
        let written = self.inner.write(packet, buffer)?;
        if kind == PacketKind::Publish {
            if let Some((qos, pkid)) = buffer.get(start..).and_then(publish_qos_pkid) {
                conn.acks.publish_written(qos, pkid, false, &mut conn.ready);
            }
        }
        shared.metrics.count_out(kind);
        Ok(written)
    }
}

fn as_str(topic: &[u8]) -> &str {
    std::str::from_utf8(topic).unwrap_or("")
}

/// Applies the edge rules to one packet from the client. `Ok(None)` holds the
/// packet back (an acknowledgement waiting for its turn).
fn incoming(
    conn: &mut ConnectionState,
    shared: &Shared,
    packet: Packet,
) -> Result<Option<Packet>, protocol::Error> {
    let packet = match packet {
        Packet::Connect(mut connect, mut props, will, will_props, login) => {
            if connect
                .client_id
                .starts_with(topics::RESERVED_CLIENT_PREFIX)
            {
                return Err(forbidden(
                    shared,
                    &connect.client_id,
                    "connect",
                    &connect.client_id,
                    Forbidden::ReservedTopic,
                ));
            }
            if let Some(will) = &will {
                let topic = as_str(&will.topic);
                if topics::is_internal(topic) {
                    return Err(forbidden(
                        shared,
                        &connect.client_id,
                        "last will",
                        topic,
                        Forbidden::ReservedTopic,
                    ));
                }
            }
            if connect.keep_alive == 0 {
                connect.keep_alive = KEEP_ALIVE_ZERO_REPLACEMENT;
                bump(&shared.metrics.keep_alive_zero_rewrites);
            }
            if let Some(props) = props.as_mut() {
                props.topic_alias_max = None;
            }
            conn.privileged = shared
                .settings
                .privileged_clients
                .contains(&connect.client_id);
            conn.client_id = Some(connect.client_id.clone());
            Packet::Connect(connect, props, will, will_props, login)
        }
        Packet::Publish(mut publish, props) => {
            resolve_alias(conn, &mut publish, props.as_ref());
            let topic = as_str(&publish.topic);
            match topics::route_publish(topic, conn.client_id(), conn.privileged) {
                PublishRoute::PassThrough => {}
                PublishRoute::MapToInternal(internal) => publish.topic = internal.into(),
                PublishRoute::ShadowRequest(request) => {
                    offer(conn, shared, topic.to_owned(), request, &publish.payload)
                }
                PublishRoute::Forbidden(why) => {
                    return Err(forbidden(shared, conn.client_id(), "publish", topic, why));
                }
            }
            Packet::Publish(publish, props)
        }
        Packet::Subscribe(mut subscribe, props) => {
            let mut refused = Vec::new();
            for (index, filter) in subscribe.filters.iter_mut().enumerate() {
                match topics::route_subscribe(&filter.path, conn.client_id(), conn.privileged) {
                    SubscribeRoute::PassThrough => {}
                    SubscribeRoute::MapToInternal(internal) => {
                        if !conn.aws_filters.contains(&internal) {
                            conn.aws_filters.push(internal.clone());
                        }
                        filter.path = internal;
                    }
                    SubscribeRoute::Refuse => {
                        debug!(
                            client_id = conn.client_id(),
                            filter = filter.path,
                            "refusing subscription"
                        );
                        bump(&shared.metrics.refused_subscriptions);
                        filter.path = topics::REFUSED_FILTER.to_owned();
                        refused.push(index);
                    }
                    SubscribeRoute::Forbidden(why) => {
                        return Err(forbidden(
                            shared,
                            conn.client_id(),
                            "subscribe",
                            &filter.path,
                            why,
                        ));
                    }
                }
            }
            if !refused.is_empty() {
                conn.refused.insert(subscribe.pkid, refused);
            }
            Packet::Subscribe(subscribe, props)
        }
        Packet::Unsubscribe(mut unsubscribe, props) => {
            for filter in &mut unsubscribe.filters {
                if topics::is_internal(filter) {
                    return Err(forbidden(
                        shared,
                        conn.client_id(),
                        "unsubscribe",
                        filter,
                        Forbidden::ReservedTopic,
                    ));
                }
                if let Some(internal) = topics::to_internal(filter) {
                    conn.aws_filters.retain(|f| f != &internal);
                    *filter = internal;
                }
            }
            Packet::Unsubscribe(unsubscribe, props)
        }
        Packet::PubAck(ack, props) => {
            let pkid = ack.pkid;
            return Ok(conn
                .acks
                .client_ack(pkid, Packet::PubAck(ack, props), &mut conn.ready));
        }
        Packet::PubRec(rec, props) => {
            let pkid = rec.pkid;
            return Ok(conn
                .acks
                .client_ack(pkid, Packet::PubRec(rec, props), &mut conn.ready));
        }
        Packet::PubComp(comp, props) => {
            let pkid = comp.pkid;
            return Ok(conn.acks.client_pubcomp(
                pkid,
                Packet::PubComp(comp, props),
                &mut conn.ready,
            ));
        }
        other => other,
    };
    Ok(Some(packet))
}

/// MQTT 5 topic aliases: record alias -> topic, and restore the topic of an
/// alias-only publish so that routing and authorization see the real topic.
fn resolve_alias(
    conn: &mut ConnectionState,
    publish: &mut protocol::Publish,
    props: Option<&protocol::PublishProperties>,
) {
    let Some(alias) = props.and_then(|p| p.topic_alias) else {
        return;
    };
    if publish.topic.is_empty() {
        if let Some(topic) = conn.aliases.get(&alias) {
            publish.topic = topic.clone();
        }
    } else {
        conn.aliases.insert(alias, publish.topic.clone());
    }
}

fn offer(
    conn: &ConnectionState,
    shared: &Shared,
    topic: String,
    request: umbra_shadow::topic::RequestTopic,
    payload: &bytes::Bytes,
) {
    bump(&shared.metrics.shadow_requests);
    let request = ShadowPublish {
        client_id: conn.client_id().to_owned(),
        topic,
        request,
        payload: payload.clone(),
    };
    if let Err(lost) = shared.hooks.shadow_sink.offer(request) {
        bump(&shared.metrics.shadow_requests_lost);
        warn!(
            client_id = lost.0.client_id,
            topic = lost.0.topic,
            "shadow request lost: sink and overload path are full"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{v4::V4, Publish};

    fn ack(pkid: u16) -> Packet {
        Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        )
    }

    fn pkids(ready: &VecDeque<Packet>) -> Vec<u16> {
        ready
            .iter()
            .map(|p| match p {
                Packet::PubAck(a, _) => a.pkid,
                Packet::PubRec(r, _) => r.pkid,
                Packet::PubComp(c, _) => c.pkid,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn synthetic_acks_wait_for_earlier_real_acks() {
        let mut acks = AckSequencer::default();
        let mut ready = VecDeque::new();
        acks.publish_written(1, 1, false, &mut ready);
        acks.publish_written(1, 2, true, &mut ready);
        acks.publish_written(1, 3, false, &mut ready);
        acks.publish_written(1, 4, true, &mut ready);
        assert!(ready.is_empty());
        // Client acks out of order: 3 is held until 1 arrives.
        assert!(acks.client_ack(3, ack(3), &mut ready).is_none());
        assert!(ready.is_empty());
        assert!(acks.client_ack(1, ack(1), &mut ready).is_none());
        assert_eq!(pkids(&ready), vec![1, 2, 3, 4]);
        // Unknown acks pass through.
        assert!(acks.client_ack(9, ack(9), &mut ready).is_some());
    }

    #[test]
    fn suppressed_qos2_gets_pubrec_then_pubcomp() {
        let mut acks = AckSequencer::default();
        let mut ready = VecDeque::new();
        acks.publish_written(2, 7, true, &mut ready);
        assert_eq!(pkids(&ready), vec![7]);
        ready.clear();
        assert!(acks.pubrel_written(7, &mut ready));
        assert_eq!(pkids(&ready), vec![7]);
        assert!(matches!(ready[0], Packet::PubComp(..)));
        ready.clear();
        assert!(!acks.pubrel_written(8, &mut ready));
        assert!(ready.is_empty());
    }

    #[test]
    fn reads_qos_and_pkid_of_encoded_publishes() {
        let mut publish = Publish::new("a/b", "payload", false);
        let mut buffer = BytesMut::new();
        V4.write(Packet::Publish(publish.clone(), None), &mut buffer)
            .expect("encodes");
        assert_eq!(publish_qos_pkid(&buffer), Some((0, 0)));
        // QoS and pkid are crate-private in rumqttd: build the bytes by hand.
        let mut bytes = vec![0x32, 0x00, 0x00, 0x03];
        bytes.extend_from_slice(b"a/b");
        bytes.extend_from_slice(&[0x01, 0x2c]);
        bytes.extend_from_slice(b"x");
        bytes[1] = (bytes.len() - 2) as u8;
        assert_eq!(publish_qos_pkid(&bytes), Some((1, 300)));
        publish.topic = "t".into();
        assert_eq!(publish_qos_pkid(&[0x34, 0x80]), None);
    }
}
