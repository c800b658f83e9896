//! Plain atomic counters kept by the connection layer and the `$aws` table;
//! Umbra's Prometheus registry reads them (no labels by device).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

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
    /// CONNECTs refused (bad credentials, client id, will).
    pub connects_refused: AtomicU64,
    /// Connections that sent no CONNECT within the connect timeout.
    pub connect_timeouts: AtomicU64,
    /// CONNECTs with keep-alive 0 (no keep-alive) accepted.
    pub keep_alive_zero: AtomicU64,
    /// Connections closed for a forbidden publish or subscribe.
    pub forbidden: AtomicU64,
    /// Connections closed for breaking the protocol (malformed packets,
    /// a second CONNECT, a wildcard in a PUBLISH topic).
    pub protocol_errors: AtomicU64,
    /// Subscriptions answered with a failure code.
    pub refused_subscriptions: AtomicU64,
    /// Messages a subscription let in that the client's role may not
    /// receive, withheld.
    pub withheld: AtomicU64,
    /// Messages larger than an MQTT 5 subscriber's maximum packet size,
    /// not sent to it.
    pub oversize_dropped: AtomicU64,
    /// Shadow requests handed to the shadow service.
    pub shadow_requests: AtomicU64,
    /// Times a connection stopped reading because too many of its shadow
    /// requests were being handled.
    pub request_stalls: AtomicU64,
    /// Times a connection stopped reading because `receive_maximum` of its
    /// messages were waiting for the router.
    pub receive_stalls: AtomicU64,
    /// Times a device's connection stopped reading because its thing's
    /// request rate was used up (until the rate allows its next request).
    pub rate_pauses: AtomicU64,
    /// Presence events dropped because the presence channel was full or closed.
    pub presence_dropped: AtomicU64,
    /// `$aws` messages queued for a subscriber.
    pub answers_published: AtomicU64,
    /// `$aws` messages not queued for a subscriber (its queue was full, or it
    /// was offline and the message QoS 0).
    pub answers_dropped: AtomicU64,
    /// `$aws` messages no one was subscribed to.
    pub answers_unrouted: AtomicU64,
    /// Router links created (connections that used non-`$aws` topics).
    pub router_links: AtomicU64,
    /// Connections closed at once because their address held its most.
    pub address_limited: AtomicU64,
    /// Filters the router keeps a message log for (set when the broker
    /// starts; a filter's log is freed when no session subscribes to it).
    pub router_filters: OnceLock<Arc<AtomicUsize>>,
}

impl EdgeMetrics {
    pub(crate) fn count_in(&self, packet: &Packet) {
        self.packets_in[PacketKind::of(packet).index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_out(&self, packet: &Packet) {
        self.packets_out[PacketKind::of(packet).index()].fetch_add(1, Ordering::Relaxed);
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

/// Exposes [`EdgeMetrics`] to Prometheus, read at scrape time.
pub struct EdgeCollector {
    metrics: std::sync::Arc<EdgeMetrics>,
    descs: Vec<Desc>,
}

/// (name, help, kind) of every metric the collector exports.
const EDGE_FAMILIES: [(&str, &str, MetricType); 24] = [
    (
        "umbra_mqtt_connections",
        "MQTT connections currently open (past CONNACK).",
        MetricType::GAUGE,
    ),
    (
        "umbra_mqtt_connections_accepted_total",
        "MQTT connections accepted.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_connects_refused_total",
        "CONNECTs refused (credentials, client id, will).",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_connect_timeouts_total",
        "Connections without a CONNECT within the connect timeout.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_packets_received_total",
        "MQTT packets read from clients, by type.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_packets_sent_total",
        "MQTT packets written to clients, by type.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_keep_alive_zero_total",
        "CONNECTs with keep-alive 0 accepted.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_forbidden_total",
        "Connections closed for a forbidden operation.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_protocol_errors_total",
        "Connections closed for breaking the MQTT protocol.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_refused_subscriptions_total",
        "Subscriptions answered with a failure code.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_withheld_total",
        "Messages withheld from a subscriber whose role may not receive them.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_oversize_dropped_total",
        "Messages not sent to a subscriber because they exceed its maximum packet size.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_shadow_requests_total",
        "Shadow requests handed from connections to the shadow service.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_request_stalls_total",
        "Times a connection stopped reading while its shadow requests were handled.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_receive_stalls_total",
        "Times a connection stopped reading while receive_maximum of its messages waited for the router.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_rate_pauses_total",
        "Times a device's connection stopped reading because its thing's request rate was used up.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_presence_dropped_total",
        "Presence events dropped (queue full).",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_answers_published_total",
        "$aws messages queued for subscribers.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_answers_dropped_total",
        "$aws messages dropped: subscriber queue full, or offline at QoS 0.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_answers_unrouted_total",
        "$aws messages without a subscriber.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_router_links_total",
        "Router links created (connections using non-$aws topics).",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_address_limited_total",
        "Connections closed on accept because their source address held max_connections already.",
        MetricType::COUNTER,
    ),
    (
        "umbra_mqtt_router_filters",
        "Filters rumqttd's router keeps a message log for (freed when no session subscribes to them).",
        MetricType::GAUGE,
    ),
    (
        "umbra_mqtt_cursor_jumps_total",
        "Times a router subscriber fell behind and lost messages (rumqttd cursor jump).",
        MetricType::COUNTER,
    ),
];

impl EdgeCollector {
    pub fn new(metrics: std::sync::Arc<EdgeMetrics>) -> Result<EdgeCollector, prometheus::Error> {
        let descs = EDGE_FAMILIES
            .iter()
            .map(|(name, help, _)| {
                let labels = if name.contains("_packets_") {
                    vec!["type".to_string()]
                } else {
                    vec![]
                };
                Desc::new(name.to_string(), help.to_string(), labels, HashMap::new())
            })
            .collect::<Result<_, _>>()?;
        Ok(EdgeCollector { metrics, descs })
    }

    fn values(&self, name: &str) -> Vec<(Option<&'static str>, f64)> {
        let m = &self.metrics;
        let one = |c: &AtomicU64| vec![(None, c.load(Ordering::Relaxed) as f64)];
        match name {
            "umbra_mqtt_connections" => one(&m.connections_current),
            "umbra_mqtt_connections_accepted_total" => one(&m.connections_accepted),
            "umbra_mqtt_connects_refused_total" => one(&m.connects_refused),
            "umbra_mqtt_connect_timeouts_total" => one(&m.connect_timeouts),
            "umbra_mqtt_packets_received_total" => PacketKind::ALL
                .iter()
                .map(|k| (Some(k.as_str()), m.packets_in(*k) as f64))
                .collect(),
            "umbra_mqtt_packets_sent_total" => PacketKind::ALL
                .iter()
                .map(|k| (Some(k.as_str()), m.packets_out(*k) as f64))
                .collect(),
            "umbra_mqtt_keep_alive_zero_total" => one(&m.keep_alive_zero),
            "umbra_mqtt_forbidden_total" => one(&m.forbidden),
            "umbra_mqtt_protocol_errors_total" => one(&m.protocol_errors),
            "umbra_mqtt_refused_subscriptions_total" => one(&m.refused_subscriptions),
            "umbra_mqtt_withheld_total" => one(&m.withheld),
            "umbra_mqtt_oversize_dropped_total" => one(&m.oversize_dropped),
            "umbra_mqtt_shadow_requests_total" => one(&m.shadow_requests),
            "umbra_mqtt_request_stalls_total" => one(&m.request_stalls),
            "umbra_mqtt_rate_pauses_total" => one(&m.rate_pauses),
            "umbra_mqtt_receive_stalls_total" => one(&m.receive_stalls),
            "umbra_mqtt_presence_dropped_total" => one(&m.presence_dropped),
            "umbra_mqtt_answers_published_total" => one(&m.answers_published),
            "umbra_mqtt_answers_dropped_total" => one(&m.answers_dropped),
            "umbra_mqtt_answers_unrouted_total" => one(&m.answers_unrouted),
            "umbra_mqtt_router_links_total" => one(&m.router_links),
            "umbra_mqtt_address_limited_total" => one(&m.address_limited),
            "umbra_mqtt_router_filters" => vec![(
                None,
                m.router_filters
                    .get()
                    .map_or(0, |g| g.load(Ordering::Relaxed)) as f64,
            )],
            "umbra_mqtt_cursor_jumps_total" => vec![(None, logged_cursor_jumps() as f64)],
            _ => Vec::new(),
        }
    }
}

impl Collector for EdgeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        EDGE_FAMILIES
            .iter()
            .map(|(name, help, kind)| {
                let mut family = MetricFamily::default();
                family.set_name(name.to_string());
                family.set_help(help.to_string());
                family.set_field_type(*kind);
                for (label, value) in self.values(name) {
                    let mut metric = Metric::default();
                    if let Some(label) = label {
                        let mut pair = LabelPair::default();
                        pair.set_name("type".into());
                        pair.set_value(label.into());
                        metric.set_label(vec![pair].into());
                    }
                    if *kind == MetricType::GAUGE {
                        let mut gauge = Gauge::default();
                        gauge.set_value(value);
                        metric.set_gauge(gauge);
                    } else {
                        let mut counter = Counter::default();
                        counter.set_value(value);
                        metric.set_counter(counter);
                    }
                    family.mut_metric().push(metric);
                }
                family
            })
            .collect()
    }
}

/// Counts rumqttd's cursor jumps from its logs: the router logs every jump
/// (a subscriber fell behind its filter's commit log and lost messages) as a
/// warn event with a `start_cursor` field. This is the only reliable signal in
/// embedded mode, because rumqttd 0.20 flushes `CursorJump` alerts to alert
/// links only on a timer event that `Broker::start` schedules and that cannot
/// be sent from outside. Add it to the process's tracing subscriber (and let
/// warn events of target `rumqttd::router::routing` through its filter).
#[derive(Debug, Clone, Copy, Default)]
pub struct CursorJumpLayer;

/// Cursor jumps seen in the logs. Process-wide, like the tracing subscriber
/// that counts them.
static LOGGED_CURSOR_JUMPS: AtomicU64 = AtomicU64::new(0);

/// Cursor jumps counted by [`CursorJumpLayer`] in this process.
pub fn logged_cursor_jumps() -> u64 {
    LOGGED_CURSOR_JUMPS.load(Ordering::Relaxed)
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
            LOGGED_CURSOR_JUMPS.fetch_add(1, Ordering::Relaxed);
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
        let before = logged_cursor_jumps();
        let subscriber = tracing_subscriber::registry().with(CursorJumpLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rumqttd::router::routing", start_cursor = 3, "jumped");
            tracing::warn!(target: "rumqttd::router::routing", other = 1, "unrelated");
            tracing::info!(target: "rumqttd::router::routing", start_cursor = 3, "not a warning");
        });
        assert_eq!(logged_cursor_jumps() - before, 1);
    }
}
