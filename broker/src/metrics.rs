//! Plain atomic counters kept by the connection edge and the answer
//! publisher; Umbra's Prometheus registry reads them (no labels by device).

use std::sync::atomic::{AtomicU64, Ordering};

use rumqttd::protocol::Packet;

/// MQTT control packet types, for per-type packet counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketKind {
    Connect,
    ConnAck,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    PingReq,
    PingResp,
    Disconnect,
}

impl PacketKind {
    pub const ALL: [PacketKind; 14] = [
        PacketKind::Connect,
        PacketKind::ConnAck,
        PacketKind::Publish,
        PacketKind::PubAck,
        PacketKind::PubRec,
        PacketKind::PubRel,
        PacketKind::PubComp,
        PacketKind::Subscribe,
        PacketKind::SubAck,
        PacketKind::Unsubscribe,
        PacketKind::UnsubAck,
        PacketKind::PingReq,
        PacketKind::PingResp,
        PacketKind::Disconnect,
    ];

    pub fn of(packet: &Packet) -> PacketKind {
        match packet {
            Packet::Connect(..) => PacketKind::Connect,
            Packet::ConnAck(..) => PacketKind::ConnAck,
            Packet::Publish(..) => PacketKind::Publish,
            Packet::PubAck(..) => PacketKind::PubAck,
            Packet::PubRec(..) => PacketKind::PubRec,
            Packet::PubRel(..) => PacketKind::PubRel,
            Packet::PubComp(..) => PacketKind::PubComp,
            Packet::Subscribe(..) => PacketKind::Subscribe,
            Packet::SubAck(..) => PacketKind::SubAck,
            Packet::Unsubscribe(..) => PacketKind::Unsubscribe,
            Packet::UnsubAck(..) => PacketKind::UnsubAck,
            Packet::PingReq(..) => PacketKind::PingReq,
            Packet::PingResp(..) => PacketKind::PingResp,
            Packet::Disconnect(..) => PacketKind::Disconnect,
        }
    }

    /// Lowercase name, usable as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PacketKind::Connect => "connect",
            PacketKind::ConnAck => "connack",
            PacketKind::Publish => "publish",
            PacketKind::PubAck => "puback",
            PacketKind::PubRec => "pubrec",
            PacketKind::PubRel => "pubrel",
            PacketKind::PubComp => "pubcomp",
            PacketKind::Subscribe => "subscribe",
            PacketKind::SubAck => "suback",
            PacketKind::Unsubscribe => "unsubscribe",
            PacketKind::UnsubAck => "unsuback",
            PacketKind::PingReq => "pingreq",
            PacketKind::PingResp => "pingresp",
            PacketKind::Disconnect => "disconnect",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one embedded broker. All fields only ever increase except
/// `connections_current`.
#[derive(Debug, Default)]
pub struct EdgeMetrics {
    packets_in: [AtomicU64; 14],
    packets_out: [AtomicU64; 14],
    /// Connections that received a successful CONNACK.
    pub connections_accepted: AtomicU64,
    /// Connections currently past a successful CONNACK.
    pub connections_current: AtomicU64,
    /// Keep-alive 0 CONNECTs rewritten so that rumqttd accepts them.
    pub keep_alive_zero_rewrites: AtomicU64,
    /// Connections closed for a forbidden publish, subscribe or connect.
    pub forbidden: AtomicU64,
    /// Subscriptions answered with a failure SUBACK.
    pub refused_subscriptions: AtomicU64,
    /// Shadow requests handed to the shadow sink (including overload records).
    pub shadow_requests: AtomicU64,
    /// Shadow requests the sink could neither take nor record as overloaded.
    pub shadow_requests_lost: AtomicU64,
    /// Presence events dropped because the presence channel was full or closed.
    pub presence_dropped: AtomicU64,
    /// Internal-prefix publishes not written because the connection holds no
    /// matching `$aws` subscription (e.g. they matched `#`).
    pub suppressed_publishes: AtomicU64,
    /// Acknowledgements synthesized for suppressed QoS 1/2 publishes.
    pub synthetic_acks: AtomicU64,
    /// Answers the publisher handed to the router.
    pub answers_published: AtomicU64,
    /// Answers the publisher could not hand to the router (router gone).
    pub answers_lost: AtomicU64,
    /// `CursorJump` alerts seen (a subscriber fell behind and lost messages).
    pub cursor_jumps: AtomicU64,
}

impl EdgeMetrics {
    pub(crate) fn count_in(&self, packet: &Packet) {
        self.packets_in[PacketKind::of(packet).index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_out(&self, kind: PacketKind) {
        self.packets_out[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Packets of `kind` read from clients.
    pub fn packets_in(&self, kind: PacketKind) -> u64 {
        self.packets_in[kind.index()].load(Ordering::Relaxed)
    }

    /// Packets of `kind` written to clients.
    pub fn packets_out(&self, kind: PacketKind) -> u64 {
        self.packets_out[kind.index()].load(Ordering::Relaxed)
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counts rumqttd's cursor jumps from its logs: the router logs every jump
/// (a subscriber fell behind its filter's commit log and lost messages) as a
/// warn event with a `start_cursor` field. This is the only reliable signal in
/// embedded mode, because rumqttd 0.20 flushes `CursorJump` alerts to alert
/// links only on a timer event that `Broker::start` schedules and that cannot
/// be sent from outside. Add it to the process's tracing subscriber (and let
/// warn events of target `rumqttd::router::routing` through its filter).
#[derive(Debug, Clone, Default)]
pub struct CursorJumpLayer {
    jumps: std::sync::Arc<AtomicU64>,
}

impl CursorJumpLayer {
    /// The counter this layer increments; hand it to the metrics registry.
    pub fn counter(&self) -> std::sync::Arc<AtomicU64> {
        self.jumps.clone()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CursorJumpLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::WARN
            && meta.target() == "rumqttd::router::routing"
            && meta.fields().field("start_cursor").is_some()
        {
            self.jumps.fetch_add(1, Ordering::Relaxed);
            tracing::error!("a subscriber lost messages (rumqttd cursor jump)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn cursor_jump_layer_counts_router_jump_warnings() {
        let layer = CursorJumpLayer::default();
        let jumps = layer.counter();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rumqttd::router::routing", start_cursor = 3, "jumped");
            tracing::warn!(target: "rumqttd::router::routing", other = 1, "unrelated");
            tracing::info!(target: "rumqttd::router::routing", start_cursor = 3, "not a warning");
        });
        assert_eq!(jumps.load(Ordering::Relaxed), 1);
    }
}
