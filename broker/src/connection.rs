//! One device connection, served by Umbra: the transport handshake and the
//! CONNECT under one timeout, authentication and the CONNECT rules, then a
//! single task that reads packets, hands shadow requests to the shadow
//! service, writes what Umbra's `$aws` table delivers into its mailbox, and
//! talks to rumqttd's router (for every other topic) through a router link
//! that it creates only when it first needs it.
//!
//! Packet ids on the wire belong to this task: messages from the router get
//! a wire id of their own (mapped back to the router's when acknowledged),
//! so that they never collide with Umbra's own QoS 1 deliveries.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, LastWill, LastWillProperties, Packet, PingResp, PubAck, PubAckReason,
    PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties,
    QoS, SubAck, Subscribe, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use rumqttd::{Notification, RouterTx};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::addresses::{Addresses, Slot};
use crate::auth::{Authenticator, Verdict};
use crate::codec::{sniff, Codec, Sniffed};
use crate::embedded::{ConnectionLimits, EdgeSettings};
use crate::fanout::{min_qos, Delivery, Publisher};
use crate::metrics::{bump, EdgeMetrics};
use crate::policy::{Policy, Role, Subject};
use crate::requests::{Answered, ShadowPublish, ShadowRequests};
use crate::sessions::{Attached, Sessions};
use crate::topics::{self, Forbidden, PublishRoute, SubscribeRoute};
use crate::transport::{self, Io, PeerCert, Transport};

/// A device connected or disconnected. `session` increases with every
/// accepted connection of this broker, so a consumer can tell a stale
/// `Disconnected` (an old connection taken over by a new one with the same
/// client id) from a current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    Connected { client_id: String, session: u64 },
    Disconnected { client_id: String, session: u64 },
}

/// What every connection shares.
pub struct Broker {
    pub limits: ConnectionLimits,
    pub edge: EdgeSettings,
    pub auth: Authenticator,
    /// Connections and failed logins per source address.
    pub addresses: Arc<Addresses>,
    /// Roles: who may publish and subscribe where outside `$aws/`.
    pub policy: Policy,
    pub publisher: Publisher,
    pub sessions: Sessions,
    pub shadow: Arc<dyn ShadowRequests>,
    /// Presence events, sent with `try_send` (dropped and counted when full).
    pub presence: Option<mpsc::Sender<PresenceEvent>>,
    pub metrics: Arc<EdgeMetrics>,
    pub router: RouterTx,
    pub next_session: AtomicU64,
    /// Ends every connection.
    pub stop: CancellationToken,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    fn emit(&self, event: PresenceEvent) {
        if let Some(presence) = &self.presence {
            if presence.try_send(event).is_err() {
                bump(&self.metrics.presence_dropped);
            }
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT.
    Graceful {
        will: bool,
    },
    /// The client closed the socket.
    Closed,
    Io(std::io::Error),
    KeepAlive,
    TakenOver,
    Shutdown,
    /// The client broke the protocol (the reason is logged).
    Protocol(&'static str, DisconnectReasonCode),
    Malformed(protocol::Error),
    /// A publish or subscribe outside what the client may touch.
    Forbidden(&'static str, Forbidden),
    /// The router link failed (boxed: rumqttd's error carries a whole event).
    Router(Box<LinkError>),
}

impl End {
    /// The DISCONNECT reason an MQTT 5 client is told, when the server ends it.
    fn reason(&self) -> Option<DisconnectReasonCode> {
        match self {
            End::KeepAlive => Some(DisconnectReasonCode::KeepAliveTimeout),
            End::TakenOver => Some(DisconnectReasonCode::SessionTakenOver),
            End::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            End::Protocol(_, code) => Some(*code),
            End::Malformed(protocol::Error::PayloadSizeLimitExceeded(_)) => {
                Some(DisconnectReasonCode::PacketTooLarge)
            }
            End::Malformed(_) => Some(DisconnectReasonCode::MalformedPacket),
            End::Forbidden(..) => Some(DisconnectReasonCode::NotAuthorized),
            End::Router(_) => Some(DisconnectReasonCode::UnspecifiedError),
            End::Graceful { .. } | End::Closed | End::Io(_) => None,
        }
    }

    /// What an MQTT 5 client is told with the reason code (its reason string).
    fn reason_string(&self) -> Option<String> {
        Some(match self {
            End::KeepAlive => "keep-alive expired".to_owned(),
            End::TakenOver => "another connection took the client id over".to_owned(),
            End::Shutdown => "the server is shutting down".to_owned(),
            End::Protocol(why, _) => (*why).to_owned(),
            End::Malformed(err) => format!("malformed packet: {err}"),
            End::Forbidden(what, why) => format!("{what} forbidden: {}", why.as_str()),
            End::Router(_) => "internal error".to_owned(),
            End::Graceful { .. } | End::Closed | End::Io(_) => return None,
        })
    }

    /// Whether the client's will is published (any end but a plain
    /// DISCONNECT, and not when the server shuts down).
    fn publishes_will(&self) -> bool {
        match self {
            End::Graceful { will } => *will,
            End::Shutdown => false,
            _ => true,
        }
    }
}

impl From<std::io::Error> for End {
    fn from(err: std::io::Error) -> End {
        End::Io(err)
    }
}

impl From<LinkError> for End {
    fn from(err: LinkError) -> End {
        End::Router(Box::new(err))
    }
}

/// A connection's places: one under the broker's connection limit and, for
/// a limited address, one of its address's; held until the connection ends.
#[derive(Debug)]
pub struct Admission {
    pub permit: OwnedSemaphorePermit,
    pub slot: Option<Slot>,
}

/// Serves one accepted TCP connection until it ends.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    broker: Arc<Broker>,
    admission: Admission,
) {
    // Each phase is its own heap future: a task's future is as large as its
    // largest state, and the TLS and WebSocket handshakes alone are over
    // 10 KiB that an idle connection must not keep.
    let Some(opened) = opening(stream, peer, transport, &broker).await else {
        return;
    };
    let Some(connection) = accepting(opened, &broker).await else {
        return;
    };
    serving(connection).await;
    drop(admission);
}

type Phase<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The handshake and the CONNECT, within the connect timeout.
fn opening(
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    broker: &Broker,
) -> Phase<'_, Option<Opened>> {
    Box::pin(async move {
        // Counted while the stream is still open: whoever sees it closed
        // also sees the count.
        let timed_out = async {
            tokio::time::sleep(broker.limits.connect_timeout()).await;
            bump(&broker.metrics.connect_timeouts);
        };
        let opened = tokio::select! {
            biased;
            () = broker.stop.cancelled() => return None,
            opened = open(stream, peer, &transport, broker) => opened,
            () = timed_out => {
                debug!(%peer, ?transport, "no CONNECT before the connect timeout");
                return None;
            }
        };
        match opened {
            Ok(opened) => Some(opened),
            Err(why) => {
                debug!(%peer, ?transport, why, "connection closed before CONNECT");
                None
            }
        }
    })
}

fn accepting<'a>(opened: Opened, broker: &'a Arc<Broker>) -> Phase<'a, Option<Connection>> {
    Box::pin(accept(opened, broker))
}

fn serving(connection: Connection) -> Phase<'static, ()> {
    // At debug level: a span is kept for as long as the connection lives,
    // so at the default level the few info/warn lines name the client
    // themselves.
    let span = tracing::debug_span!("mqtt", client_id = %connection.client_id);
    Box::pin(connection.serve().instrument(span))
}

/// A connection that has sent its CONNECT.
struct Opened {
    stream: Io,
    codec: Codec,
    connect: Packet,
    read: BytesMut,
    peer: SocketAddr,
    /// The client's verified TLS certificate, if it presented one.
    cert: Option<PeerCert>,
}

/// The transport handshake, then the CONNECT packet.
async fn open(
    stream: TcpStream,
    peer: SocketAddr,
    transport: &Transport,
    broker: &Broker,
) -> Result<Opened, String> {
    let (mut stream, cert) = transport::handshake(stream, transport)
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    let mut read = BytesMut::with_capacity(128);
    let codec = loop {
        match sniff(&read) {
            Sniffed::Codec(codec) => break codec,
            Sniffed::Incomplete => {}
            Sniffed::NotConnect => return Err("the first packet is not a CONNECT".into()),
            Sniffed::UnsupportedLevel(level) => {
                // MQTT 3.1.1 tells an unsupported level with CONNACK 1.
                let mut out = BytesMut::new();
                let refusal = ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::RefusedProtocolVersion,
                };
                if Codec::V4
                    .write(Packet::ConnAck(refusal, None), &mut out)
                    .is_ok()
                {
                    stream.write_all(&out).await.ok();
                }
                return Err(format!("unsupported protocol level {level}"));
            }
        }
        if stream
            .read_buf(&mut read)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("closed".into());
        }
    };
    let max = broker.limits.max_payload_size;
    let connect = loop {
        match codec.read(&mut read, max) {
            Ok(packet) => break packet,
            Err(protocol::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("malformed CONNECT: {e}")),
        }
        read.reserve(256);
        if stream
            .read_buf(&mut read)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("closed".into());
        }
    };
    broker.metrics.count_in(&connect);
    Ok(Opened {
        stream,
        codec,
        connect,
        read,
        peer,
        cert,
    })
}

/// Applies the CONNECT rules, attaches the session and answers CONNACK.
async fn accept(opened: Opened, broker: &Arc<Broker>) -> Option<Connection> {
    let Opened {
        mut stream,
        codec,
        connect,
        read,
        peer,
        cert,
    } = opened;
    let Packet::Connect(connect, props, will, will_props, login) = connect else {
        return None;
    };
    let limits = &broker.limits;
    let addresses = &broker.addresses;
    let blocked = broker.auth.required() && addresses.blocked(peer.ip());
    let verdict = match (blocked, &cert) {
        (true, _) => Verdict::NotAuthorized,
        // A verified certificate is the identity; no password is asked for.
        (false, Some(cert)) => broker.auth.check_certificate(cert, &connect.client_id),
        (false, None) => {
            let login = login
                .as_ref()
                .map(|l| (l.username.as_str(), l.password.as_str()));
            broker.auth.check(login, &connect.client_id).await
        }
    };
    if verdict == Verdict::BadCredentials {
        // Slower with each failure from the address (then refused).
        tokio::time::sleep(addresses.failed(peer.ip())).await;
    }
    let identity = match &verdict {
        Verdict::Allowed { identity } => identity.clone(),
        _ => None,
    };
    let units = cert.as_ref().map_or(&[][..], |cert| &cert.units[..]);
    let role = broker.policy.role_of(identity.as_deref(), units);
    let will_refused = will.as_ref().is_some_and(|will| {
        let subject = Subject {
            thing: identity.as_deref().unwrap_or(&connect.client_id),
            client_id: &connect.client_id,
        };
        !role.may_publish(&String::from_utf8_lossy(&will.topic), subject)
    });
    let refusal = if blocked {
        Some((
            ConnectReturnCode::NotAuthorized,
            "too many failed logins from this address",
        ))
    } else if connect.client_id.len() > limits.max_client_id_bytes {
        Some((
            ConnectReturnCode::ClientIdentifierNotValid,
            "client id too long",
        ))
    } else if connect.client_id.contains('\0') {
        Some((
            ConnectReturnCode::ClientIdentifierNotValid,
            "client id with a NUL character",
        ))
    } else if connect.client_id.is_empty() && !connect.clean_session && codec == Codec::V4 {
        Some((
            ConnectReturnCode::ClientIdentifierNotValid,
            "empty client id needs a clean session",
        ))
    } else if verdict == Verdict::BadCredentials {
        Some((
            ConnectReturnCode::BadUserNamePassword,
            "bad user name or password",
        ))
    } else if verdict == Verdict::NotAuthorized {
        Some((
            ConnectReturnCode::NotAuthorized,
            "client id is not the authenticated identity's",
        ))
    } else if verdict == Verdict::Revoked {
        Some((ConnectReturnCode::NotAuthorized, "certificate revoked"))
    } else if will.as_ref().is_some_and(|will| !will_allowed(will)) {
        Some((ConnectReturnCode::NotAuthorized, "will on a $ topic"))
    } else if will_refused {
        Some((
            ConnectReturnCode::NotAuthorized,
            "will outside the client's policy",
        ))
    } else {
        None
    };
    // Each of these codes exists in MQTT 3.1.1 and 5 alike.
    if let Some((code, why)) = refusal {
        bump(&broker.metrics.connects_refused);
        info!(
            client_id = %connect.client_id.chars().take(64).collect::<String>(),
            why, "connection refused"
        );
        let mut out = BytesMut::new();
        let ack = ConnAck {
            session_present: false,
            code,
        };
        // MQTT 5 (the 3.1.1 codec writes no properties): why, as text.
        let props = ConnAckProperties {
            reason_string: Some(why.to_owned()),
            ..ConnAckProperties::default()
        };
        if codec
            .write(Packet::ConnAck(ack, Some(props)), &mut out)
            .is_ok()
        {
            stream.write_all(&out).await.ok();
            stream.flush().await.ok();
        }
        return None;
    }

    let assigned = connect
        .client_id
        .is_empty()
        .then(|| format!("auto-{:016x}", rand::random::<u64>()));
    let client_id = assigned.clone().unwrap_or(connect.client_id);
    let conn = broker.next_session.fetch_add(1, Ordering::Relaxed);
    // MQTT 5: the session outlives the connection when the client asks for
    // an expiry (capped by the server's); MQTT 3.1.1: clean session 0.
    let max_expiry = limits.session_expiry_secs;
    // QoS 1 messages sent and not yet acknowledged, at most: Umbra's
    // window, and an MQTT 5 client's receive maximum if it is lower.
    let send_window = match codec {
        Codec::V4 => limits.max_inflight_count,
        Codec::V5 => props
            .as_ref()
            .and_then(|p| p.receive_maximum)
            .map_or(usize::MAX, usize::from)
            .min(limits.max_inflight_count),
    }
    .max(1);
    // MQTT 5: how many topic aliases Umbra may set for the client.
    let aliases_out_max = props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0);
    // MQTT 5: the largest packet the client takes; larger ones are not sent.
    let max_packet_out = props
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .and_then(|size| usize::try_from(size).ok());
    let keep = match codec {
        Codec::V4 => (!connect.clean_session).then_some(max_expiry),
        Codec::V5 => props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .filter(|secs| *secs > 0)
            .map(|secs| u64::from(secs).min(max_expiry)),
    }
    .map(Duration::from_secs);
    let attached = broker
        .sessions
        .attach(&client_id, conn, connect.clean_session)
        .await;
    // MQTT 5: a keep-alive of 0 or above the server's maximum becomes the
    // maximum, and the CONNACK says so (MQTT 3.1.1 has no way to tell).
    let max_keep_alive = limits.max_keep_alive_secs;
    let server_keep_alive = (codec == Codec::V5
        && max_keep_alive > 0
        && (connect.keep_alive == 0 || connect.keep_alive > max_keep_alive))
        .then_some(max_keep_alive);
    let keep_alive = match server_keep_alive.unwrap_or(connect.keep_alive) {
        0 => {
            bump(&broker.metrics.keep_alive_zero);
            None
        }
        secs => Some(Duration::from_secs(u64::from(secs)) * 3 / 2),
    };
    let mut connection = Connection {
        broker: Arc::clone(broker),
        stream,
        codec,
        privileged: role.all_things || broker.edge.privileged_clients.contains(&client_id),
        identity: identity
            .filter(|identity| *identity != client_id)
            .map(String::into_boxed_str),
        role,
        client_id,
        conn,
        read,
        write: BytesMut::new(),
        keep_alive,
        clean: connect.clean_session,
        problem_info: props
            .as_ref()
            .and_then(|p| p.request_problem_info)
            .is_none_or(|info| info != 0),
        keep,
        send_window,
        max_packet_out,
        aliases_out_max,
        aliases_out: None,
        will: will.map(|will| {
            Box::new(Will {
                delay: Duration::from_secs(
                    will_props
                        .as_ref()
                        .and_then(|p| p.delay_interval)
                        .map_or(0, u64::from),
                ),
                will,
                properties: will_props.map(will_properties),
            })
        }),
        router: None,
        next_pkid: 0,
        qos2_received: HashSet::new(),
        requests: None,
        stalled: false,
        paused: None,
        aliases: HashMap::new(),
        attached,
    };
    // MQTT 5 only (the 3.1.1 codec writes no properties).
    let props = Some(ConnAckProperties {
        assigned_client_identifier: assigned,
        receive_max: Some(u16::try_from(limits.receive_maximum).unwrap_or(u16::MAX)),
        topic_alias_max: Some(limits.topic_alias_maximum),
        server_keep_alive,
        max_packet_size: Some(u32::try_from(limits.max_payload_size).unwrap_or(u32::MAX)),
        ..ConnAckProperties::default()
    });
    let ack = ConnAck {
        session_present: connection.attached.present,
        code: ConnectReturnCode::Success,
    };
    if connection.send(Packet::ConnAck(ack, props)).is_err() {
        return None;
    }
    Some(connection)
}

/// How long a connection the server told DISCONNECT is read from (and
/// what comes discarded) before it is closed.
const DISCONNECT_LINGER: Duration = Duration::from_secs(1);

/// A DISCONNECT's bytes besides its reason string, at most: packet type
/// (1), remaining length (2 up to 16 KiB), reason code (1), property length
/// (2), property id (1) and string length (2).
const DISCONNECT_OVERHEAD: usize = 9;

/// A client's last will, and its MQTT 5 properties as the publish's.
struct Will {
    will: LastWill,
    properties: Option<PublishProperties>,
    /// MQTT 5 will delay interval (0 for MQTT 3.1.1).
    delay: Duration,
}

impl Will {
    /// The will as the publish the router takes (at QoS 1 at most, as
    /// Umbra's connections answer QoS 2 themselves).
    fn into_packet(self) -> Packet {
        let Will {
            will, properties, ..
        } = self;
        let mut publish = Publish::new(will.topic, will.message, will.retain);
        publish.qos = min_qos(will.qos, QoS::AtLeastOnce);
        publish.pkid = 1;
        Packet::Publish(publish, properties)
    }
}

/// Publishes a delayed will after `delay` unless `cancel` is cancelled
/// first (a new connection of the client, or the broker stopping), through
/// a router link of its own: the client's ended with its connection.
async fn publish_will_later(
    router: RouterTx,
    client_id: String,
    will: Packet,
    delay: Duration,
    cancel: CancellationToken,
) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = cancel.cancelled() => return,
    }
    // NUL keeps the link's id apart from every client's: MQTT strings
    // cannot carry it, and `accept` refuses a client id that does.
    let link_id = format!("{client_id}\u{0}will");
    let publish = async {
        let (tx, _rx, _connack) = LinkBuilder::new(&link_id, router)
            .clean_session(true)
            .build_async(vec![will])
            .await?;
        tx.disconnect().await
    };
    match Box::pin(publish).await {
        Ok(()) => debug!(client_id, "delayed will published"),
        Err(err) => warn!(client_id, cause = ?err, "will not published"),
    }
}

/// A will's MQTT 5 properties as its publish carries them (the will delay
/// is Umbra's to apply, not the message's).
fn will_properties(props: LastWillProperties) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: props.payload_format_indicator,
        message_expiry_interval: props.message_expiry_interval,
        content_type: props.content_type,
        response_topic: props.response_topic,
        correlation_data: props.correlation_data,
        user_properties: props.user_properties,
        ..PublishProperties::default()
    }
}

/// A will is published through the router: `$` topics (Umbra's `$aws`
/// included) cannot carry one.
fn will_allowed(will: &LastWill) -> bool {
    std::str::from_utf8(&will.topic)
        .is_ok_and(|topic| topics::valid_topic(topic) && !topic.starts_with('$'))
}

/// What keeps a connection from taking another packet.
enum Hold {
    /// Its thing's request rate is used up until the pause ends.
    Paused,
    /// `request_window` shadow requests are being handled.
    Requests,
    /// `receive_maximum` messages wait for the router.
    Router,
}

/// Where the reply to an MQTT 5 shadow request also goes.
struct ResponseTo {
    topic: String,
    properties: PublishProperties,
}

/// A reply, and the response topic it goes to.
struct Response {
    to: Box<ResponseTo>,
    reply: umbra_shadow::Message,
}

/// A shadow request being handled: resolves, once it is answered, to what
/// goes to its response topic, if it named one.
struct Handling {
    answered: Answered,
    respond: Option<Box<ResponseTo>>,
}

impl Future for Handling {
    type Output = Option<Response>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let reply = std::task::ready!(self.answered.as_mut().poll(cx));
        std::task::Poll::Ready(match (reply, self.respond.take()) {
            (Some(reply), Some(to)) => Some(Response { to, reply }),
            _ => None,
        })
    }
}

/// An acknowledgement waiting for the router's part of it.
enum PendingAck {
    SubAck(Vec<Option<SubscribeReasonCode>>),
    UnsubAck(Vec<Option<UnsubAckReason>>),
}

/// A connection's side of rumqttd's router.
#[derive(Default)]
struct RouterSide {
    link: Option<LinkTx>,
    rx: Option<LinkRx>,
    /// Router publishes in flight at QoS 1/2: wire packet id -> router's.
    inflight: HashMap<u16, u16>,
    /// SUBACKs and UNSUBACKs waiting for the router's part, by packet id.
    pending_acks: HashMap<u16, PendingAck>,
    /// Filters this connection holds in the router.
    filters: HashSet<String>,
    /// The client's QoS 1/2 publishes handed to the router and not yet
    /// taken by it (at most `receive_maximum`).
    unacked: usize,
    /// Packets for the router, handed over after each batch of reads.
    routed: Vec<Packet>,
    /// Router messages waiting for the client's window (its receive
    /// maximum) to open.
    deferred: VecDeque<(Publish, Option<PublishProperties>)>,
}

struct Connection {
    broker: Arc<Broker>,
    stream: Io,
    codec: Codec,
    client_id: String,
    privileged: bool,
    /// The identity the client proved, when it is not its client id.
    identity: Option<Box<str>>,
    /// What it may publish and subscribe to outside `$aws/`.
    role: Arc<Role>,
    /// This connection's number (also its presence session identifier).
    conn: u64,
    read: BytesMut,
    write: BytesMut,
    /// 1.5 × the client's keep-alive; `None` for keep-alive 0.
    keep_alive: Option<Duration>,
    clean: bool,
    /// MQTT 5 request problem information: reason strings on
    /// acknowledgements (on by default).
    problem_info: bool,
    /// How long the session is kept after this connection ends.
    keep: Option<Duration>,
    /// QoS 1 messages this connection may have sent and not had
    /// acknowledged (Umbra's and the router's together).
    send_window: usize,
    /// The largest packet the client takes (MQTT 5 maximum packet size).
    max_packet_out: Option<usize>,
    /// How many topic aliases the client lets Umbra set (MQTT 5).
    aliases_out_max: u16,
    /// The aliases Umbra set for topics it sends (boxed: 8 bytes on every
    /// connection instead of a map's 48; most clients allow none).
    #[allow(clippy::box_collection)]
    aliases_out: Option<Box<HashMap<Bytes, u16>>>,
    /// Published through the router when the connection ends other than
    /// by a plain DISCONNECT (boxed: most connections have none).
    will: Option<Box<Will>>,
    /// Router state, once the connection uses a topic outside `$aws/`
    /// (boxed: most devices never do).
    router: Option<Box<RouterSide>>,
    next_pkid: u16,
    /// QoS 2 publishes from the client answered with PUBREC, until PUBREL.
    qos2_received: HashSet<u16>,
    /// Shadow requests being handled (`None` while there are none, which
    /// keeps an idle connection from holding the set's allocation).
    requests: Option<FuturesUnordered<Handling>>,
    /// Parsing stopped early (see [`Connection::hold`]); [`Connection::unstall`]
    /// goes on once nothing holds it.
    stalled: bool,
    /// Parsing stopped until the device's thing may send its next request
    /// (boxed: only a device that outruns its request rate has one).
    paused: Option<Pin<Box<Sleep>>>,
    /// MQTT 5 client-to-server topic aliases.
    aliases: HashMap<u16, Bytes>,
    attached: Attached,
}

impl Connection {
    /// Serves the connection until it ends. An async block, not an
    /// `async fn`: an `async fn`'s future keeps its by-value argument twice
    /// (the argument and the local it is moved into), ~500 bytes a connection.
    fn serve(self) -> impl Future<Output = ()> + Send + 'static {
        let mut connection = self;
        async move {
            let broker = Arc::clone(&connection.broker);
            let metrics = &broker.metrics;
            bump(&metrics.connections_accepted);
            metrics.connections_current.fetch_add(1, Ordering::Relaxed);
            debug!(conn = connection.conn, codec = ?connection.codec, "connection accepted");
            broker.emit(PresenceEvent::Connected {
                client_id: connection.client_id.clone(),
                session: connection.conn,
            });
            let end = match connection.run().await {
                Ok(()) => End::Closed,
                Err(end) => end,
            };
            Box::pin(connection.close(end)).await;
            metrics.connections_current.fetch_sub(1, Ordering::Relaxed);
            let Connection {
                client_id,
                conn,
                keep,
                attached,
                ..
            } = connection;
            broker.sessions.detach(&client_id, conn, attached, keep);
            // Last: once a client is seen disconnected, its session is
            // parked or ended.
            broker.emit(PresenceEvent::Disconnected {
                client_id,
                session: conn,
            });
        }
    }

    async fn run(&mut self) -> Result<(), End> {
        if !self.clean && self.attached.session.router {
            Box::pin(self.link(Vec::new())).await?;
        }
        self.resume()?;
        self.parse()?;
        self.hand_to_router().await?;
        self.flush().await?;
        let mailbox = Arc::clone(&self.attached.session.mailbox);
        // Cancelled by a takeover and by shutdown alike.
        let kick = self.attached.kick.clone();
        let idle = tokio::time::sleep(self.keep_alive.unwrap_or(Duration::MAX / 4));
        tokio::pin!(idle);
        loop {
            let pending = self.requests.as_ref().map_or(0, FuturesUnordered::len);
            let can_read = !self.stalled && self.hold().is_none();
            let linked = self.router.as_ref().is_some_and(|r| r.rx.is_some());
            tokio::select! {
                biased;
                () = kick.cancelled() => {
                    return Err(match self.broker.stop.is_cancelled() {
                        true => End::Shutdown,
                        false => End::TakenOver,
                    })
                }
                Some(response) = next_answered(&mut self.requests), if pending > 0 => {
                    if self.requests.as_ref().is_some_and(FuturesUnordered::is_empty) {
                        self.requests = None;
                    }
                    if let Some(response) = response {
                        self.respond(response);
                        self.hand_to_router().await?;
                    }
                    self.unstall().await?;
                }
                () = resumed(&mut self.paused), if self.paused.is_some() => {
                    self.paused = None;
                    self.unstall().await?;
                }
                () = mailbox.ready() => self.deliver()?,
                notification = next_notification(&mut self.router), if linked => {
                    if self.on_router(notification?)? {
                        if let Some(rx) = self.router.as_ref().and_then(|r| r.rx.as_ref()) {
                            Box::pin(rx.wake()).await?;
                        }
                    }
                    self.unstall().await?;
                    self.hand_to_router().await?;
                }
                read = self.stream.read_some(&mut self.read), if can_read => {
                    if read? == 0 {
                        return Err(End::Closed);
                    }
                    if let Some(keep_alive) = self.keep_alive {
                        idle.as_mut().reset(Instant::now() + keep_alive);
                    }
                    self.parse()?;
                    self.hand_to_router().await?;
                }
                () = &mut idle, if self.keep_alive.is_some() => return Err(End::KeepAlive),
            }
            self.flush().await?;
        }
    }

    /// Parses what was held back, once nothing holds it any more.
    async fn unstall(&mut self) -> Result<(), End> {
        if self.stalled && self.hold().is_none() {
            self.stalled = false;
            self.parse()?;
            self.hand_to_router().await?;
        }
        Ok(())
    }

    /// What keeps this connection from taking another packet now, if anything.
    fn hold(&self) -> Option<Hold> {
        if self.paused.is_some() {
            Some(Hold::Paused)
        } else if self.requests.as_ref().map_or(0, FuturesUnordered::len) >= self.request_window() {
            Some(Hold::Requests)
        } else if self.router.as_ref().map_or(0, |r| r.unacked)
            >= self.broker.limits.receive_maximum
        {
            Some(Hold::Router)
        } else {
            None
        }
    }

    /// Shadow requests this connection may have outstanding.
    fn request_window(&self) -> usize {
        let limits = &self.broker.limits;
        match self.privileged {
            true => limits.max_pending_requests_privileged,
            false => limits.max_pending_requests,
        }
    }

    /// Frames and handles every complete packet in the read buffer, until
    /// something holds the connection back (then the rest waits).
    fn parse(&mut self) -> Result<(), End> {
        let max = self.broker.limits.max_payload_size;
        loop {
            if let Some(hold) = self.hold() {
                self.stalled = true;
                let metrics = &self.broker.metrics;
                match hold {
                    Hold::Paused => {}
                    Hold::Requests => bump(&metrics.request_stalls),
                    Hold::Router => bump(&metrics.receive_stalls),
                }
                return Ok(());
            }
            match self.codec.read(&mut self.read, max) {
                Ok(packet) => {
                    self.broker.metrics.count_in(&packet);
                    self.incoming(packet)?;
                }
                Err(protocol::Error::InsufficientBytes(n)) => {
                    if self.read.is_empty() {
                        // Idle between packets: keep nothing (see `Io::read_some`).
                        self.read = BytesMut::new();
                    } else {
                        self.read.reserve(n.min(max + 8));
                    }
                    return Ok(());
                }
                Err(err) => return Err(End::Malformed(err)),
            }
        }
    }

    /// Encodes a packet for the next flush.
    fn send(&mut self, mut packet: Packet) -> Result<(), End> {
        self.broker.metrics.count_out(&packet);
        if let Packet::Publish(publish, props) = &mut packet {
            self.alias_out(publish, props);
        }
        self.codec
            .write(packet, &mut self.write)
            .map(drop)
            .map_err(End::Malformed)
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.write.is_empty() {
            return Ok(());
        }
        let timeout = self.broker.limits.write_timeout();
        let written = tokio::time::timeout(timeout, async {
            self.stream.write_all(&self.write).await?;
            self.stream.flush().await
        })
        .await;
        match written {
            Ok(result) => result?,
            Err(_) => {
                return Err(End::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client does not read",
                )))
            }
        }
        // An idle connection keeps no write buffer (one allocation per
        // flush costs far less than the write itself).
        self.write = BytesMut::new();
        Ok(())
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            let pkid = self.next_pkid;
            let taken = self
                .router
                .as_ref()
                .is_some_and(|r| r.inflight.contains_key(&pkid))
                || self
                    .attached
                    .session
                    .inflight
                    .iter()
                    .any(|(p, _)| *p == pkid);
            if !taken {
                return pkid;
            }
        }
    }

    /// A resumed session: retransmit what was sent and not acknowledged,
    /// with DUP set and the same packet ids, then what queued meanwhile.
    fn resume(&mut self) -> Result<(), End> {
        let retransmit: Vec<(u16, Delivery)> =
            self.attached.session.inflight.iter().cloned().collect();
        for (pkid, delivery) in retransmit {
            self.next_pkid = self.next_pkid.max(pkid);
            let mut publish = Publish::new(delivery.topic, delivery.payload, false);
            publish.qos = delivery.qos;
            publish.pkid = pkid;
            publish.dup = true;
            self.send(Packet::Publish(
                publish,
                delivery.properties.as_deref().cloned(),
            ))?;
        }
        self.deliver()
    }

    /// Moves messages from the mailbox to the wire, within the window of
    /// unacknowledged QoS 1 messages.
    fn deliver(&mut self) -> Result<(), End> {
        while self.unacknowledged() < self.send_window {
            let Some(delivery) = self.attached.session.mailbox.pop() else {
                break;
            };
            let mut publish = Publish::new(delivery.topic.clone(), delivery.payload.clone(), false);
            publish.qos = delivery.qos;
            let properties = delivery.properties.as_deref().cloned();
            if !self.fits(&publish, &properties) {
                continue;
            }
            if delivery.qos != QoS::AtMostOnce {
                publish.pkid = self.alloc_pkid();
                self.attached
                    .session
                    .inflight
                    .push_back((publish.pkid, delivery));
            }
            self.send(Packet::Publish(publish, properties))?;
        }
        Ok(())
    }

    /// Where the reply to an MQTT 5 shadow request with a response topic
    /// also goes, with the request's correlation data and user properties.
    /// The client must be allowed to publish there: its own `$aws` topics
    /// (answer topics included, not request topics) or a topic its role
    /// allows.
    fn response_to(&self, props: &PublishProperties) -> Result<ResponseTo, End> {
        let topic = props.response_topic.as_deref().unwrap_or_default();
        if !topics::valid_topic(topic) {
            return Err(self.protocol_error(
                "wildcard or empty response topic",
                DisconnectReasonCode::TopicNameInvalid,
            ));
        }
        let refused = match topics::route_publish(topic, self.thing(), self.privileged) {
            PublishRoute::Aws | PublishRoute::Forbidden(Forbidden::AnswerTopic) => None,
            PublishRoute::Router if self.role.may_publish(topic, self.subject()) => None,
            PublishRoute::Router | PublishRoute::Drop => Some(Forbidden::Policy),
            PublishRoute::ShadowRequest(_) => Some(Forbidden::ReservedAws),
            PublishRoute::Forbidden(why) => Some(why),
        };
        if let Some(why) = refused {
            return Err(self.forbidden("respond", topic, why));
        }
        Ok(ResponseTo {
            topic: topic.to_owned(),
            properties: PublishProperties {
                correlation_data: props.correlation_data.clone(),
                user_properties: props.user_properties.clone(),
                ..PublishProperties::default()
            },
        })
    }

    /// Publishes a shadow request's reply to its response topic (unless the
    /// reply went there already): `$aws` topics through Umbra's table at
    /// QoS 1, others through the router at QoS 0 (as if the client had
    /// published it; its acknowledgement would be the client's).
    fn respond(&mut self, Response { to, reply }: Response) {
        if to.topic == reply.topic {
            return;
        }
        let properties = to.properties;
        if to.topic.starts_with(topics::AWS_PREFIX) {
            let publisher = &self.broker.publisher;
            let _routed = publisher.publish_with(
                &to.topic,
                reply.payload,
                QoS::AtLeastOnce,
                Some(Arc::new(properties)),
            );
        } else {
            let publish = Publish::new(Bytes::from(to.topic), reply.payload, false);
            self.forward(Packet::Publish(publish, Some(properties)));
        }
    }

    /// Server-to-client topic aliases (MQTT 5): the first topics the client
    /// is sent, up to the number it allows, are given an alias with their
    /// first message; later messages carry the alias and an empty topic.
    fn alias_out(&mut self, publish: &mut Publish, props: &mut Option<PublishProperties>) {
        if self.aliases_out_max == 0 {
            return;
        }
        let max = usize::from(self.aliases_out_max);
        let aliases = self.aliases_out.get_or_insert_with(Box::default);
        let alias = match aliases.get(&publish.topic) {
            Some(&alias) => {
                publish.topic = Bytes::new();
                alias
            }
            None if aliases.len() < max => {
                let alias = u16::try_from(aliases.len() + 1).unwrap_or(u16::MAX);
                aliases.insert(publish.topic.clone(), alias);
                alias
            }
            None => return,
        };
        props
            .get_or_insert_with(PublishProperties::default)
            .topic_alias = Some(alias);
    }

    /// Whether a publish fits within the client's maximum packet size; one
    /// that does not is dropped (MQTT 5 says so) and counted.
    fn fits(&self, publish: &Publish, properties: &Option<PublishProperties>) -> bool {
        let Some(max) = self.max_packet_out else {
            return true;
        };
        let mut scratch = BytesMut::new();
        let mut publish = publish.clone();
        // The packet id is not allocated yet; any takes the same 2 bytes.
        publish.pkid = 1;
        let packet = Packet::Publish(publish, properties.clone());
        let fits = self
            .codec
            .write(packet, &mut scratch)
            .is_ok_and(|_| scratch.len() <= max);
        if !fits {
            bump(&self.broker.metrics.oversize_dropped);
        }
        fits
    }

    /// QoS 1 messages sent to the client and not yet acknowledged.
    fn unacknowledged(&self) -> usize {
        self.attached.session.inflight.len() + self.router.as_ref().map_or(0, |r| r.inflight.len())
    }

    fn router_side(&mut self) -> &mut RouterSide {
        self.router.get_or_insert_with(Box::default)
    }

    /// Queues a packet for the router; [`hand_to_router`](Self::hand_to_router)
    /// hands the queue over.
    fn forward(&mut self, packet: Packet) {
        self.router_side().routed.push(packet);
    }

    /// Hands the router what [`forward`](Self::forward) queued, if anything.
    /// Boxed: a send on the router's channel holds a whole router event
    /// (about 1 KiB), which an idle connection's future must not carry.
    async fn hand_to_router(&mut self) -> Result<(), End> {
        let Some(router) = self.router.as_ref().filter(|r| !r.routed.is_empty()) else {
            return Ok(());
        };
        // Connections that became readable at the same moment run last
        // woken first (the runtime's LIFO slot). A publish yields once, so
        // that a subscription that came in before it on another connection
        // is normally in place first (MQTT promises no order across
        // connections; the README says what was measured).
        if router
            .routed
            .iter()
            .any(|packet| matches!(packet, Packet::Publish(..)))
        {
            tokio::task::yield_now().await;
        }
        Box::pin(self.send_routed()).await
    }

    /// Hands the router what [`forward`](Self::forward) queued, with one
    /// notification, or with the connect event of the router link if this
    /// is the first time.
    async fn send_routed(&mut self) -> Result<(), End> {
        let router = self.router_side();
        let packets = std::mem::take(&mut router.routed);
        match router.link.as_mut() {
            Some(link) => {
                link.buffer().extend(packets);
                link.notify().await?;
                Ok(())
            }
            None => self.link(packets).await,
        }
    }

    /// Creates the router link unless there is one; the router takes
    /// `first` with the link's connect event (a first SUBSCRIBE is then
    /// in place before any publish another link sends after it arrived).
    async fn link(&mut self, first: Vec<Packet>) -> Result<(), End> {
        if self.router.as_ref().is_some_and(|r| r.link.is_some()) {
            return Ok(());
        }
        // The router keeps a session unless it is clean: this one's, when
        // Umbra keeps it after the connection (MQTT 5: a session expiry)
        // or it resumes a saved one (clean start 0). Umbra ends saved
        // router sessions itself (`Sessions::end`), so an MQTT 5 session
        // with clean start 1 and an expiry starts fresh and is kept, and
        // one with clean start 0 and no expiry resumes and then ends.
        let clean = self.clean && self.keep.is_none();
        let builder =
            LinkBuilder::new(&self.client_id, self.broker.router.clone()).clean_session(clean);
        let (tx, rx, _connack) = Box::pin(builder.build_async(first)).await?;
        bump(&self.broker.metrics.router_links);
        self.attached.session.router = true;
        let router = self.router_side();
        router.link = Some(tx);
        router.rx = Some(rx);
        Ok(())
    }

    /// The thing this client is: its proven identity, else its client id.
    fn thing(&self) -> &str {
        self.identity.as_deref().unwrap_or(&self.client_id)
    }

    fn subject(&self) -> Subject<'_> {
        Subject {
            thing: self.thing(),
            client_id: &self.client_id,
        }
    }

    fn forbidden(&self, what: &'static str, target: &str, why: Forbidden) -> End {
        bump(&self.broker.metrics.forbidden);
        info!(
            client_id = self.client_id,
            what,
            target,
            reason = why.as_str(),
            "forbidden, closing the connection"
        );
        End::Forbidden(what, why)
    }

    fn protocol_error(&self, why: &'static str, code: DisconnectReasonCode) -> End {
        bump(&self.broker.metrics.protocol_errors);
        End::Protocol(why, code)
    }

    fn incoming(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(publish, props) => self.publish(publish, props),
            Packet::PubRel(rel, _) => {
                self.qos2_received.remove(&rel.pkid);
                self.send(Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason: PubCompReason::Success,
                    },
                    None,
                ))
            }
            Packet::PubAck(ack, props) => {
                let inflight = &mut self.attached.session.inflight;
                if let Some(at) = inflight.iter().position(|(p, _)| *p == ack.pkid) {
                    inflight.remove(at);
                    if inflight.is_empty() {
                        *inflight = VecDeque::new();
                    }
                    self.deliver()?;
                    return self.deliver_deferred();
                }
                let router = self
                    .router
                    .as_mut()
                    .and_then(|r| r.inflight.remove(&ack.pkid));
                if let Some(pkid) = router {
                    let ack = PubAck { pkid, ..ack };
                    self.forward(Packet::PubAck(ack, props));
                }
                self.deliver()?;
                self.deliver_deferred()
            }
            Packet::PubRec(rec, props) => {
                // Kept until PUBCOMP: the router answers with PUBREL.
                let router = self.router.as_ref().and_then(|r| r.inflight.get(&rec.pkid));
                if let Some(&pkid) = router {
                    let rec = PubRec { pkid, ..rec };
                    self.forward(Packet::PubRec(rec, props));
                }
                Ok(())
            }
            Packet::PubComp(comp, props) => {
                let router = self
                    .router
                    .as_mut()
                    .and_then(|r| r.inflight.remove(&comp.pkid));
                if let Some(pkid) = router {
                    let comp = PubComp { pkid, ..comp };
                    self.forward(Packet::PubComp(comp, props));
                }
                Ok(())
            }
            Packet::Subscribe(subscribe, props) => self.subscribe(subscribe, props),
            Packet::Unsubscribe(unsubscribe, props) => self.unsubscribe(unsubscribe, props),
            Packet::PingReq(_) => self.send(Packet::PingResp(PingResp)),
            Packet::Disconnect(disconnect, props) => {
                // MQTT 5: the DISCONNECT may change the session expiry,
                // but not from none (0) to some.
                if let Some(secs) = props.and_then(|p| p.session_expiry_interval) {
                    if self.keep.is_none() && secs > 0 {
                        return Err(self.protocol_error(
                            "session expiry set on DISCONNECT after 0 on CONNECT",
                            DisconnectReasonCode::ProtocolError,
                        ));
                    }
                    let max = self.broker.limits.session_expiry_secs;
                    self.keep = (secs > 0).then(|| Duration::from_secs(u64::from(secs).min(max)));
                }
                Err(End::Graceful {
                    will: disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                })
            }
            Packet::Connect(..) => {
                Err(self.protocol_error("second CONNECT", DisconnectReasonCode::ProtocolError))
            }
            _ => Err(self.protocol_error(
                "a packet only a server sends",
                DisconnectReasonCode::ProtocolError,
            )),
        }
    }

    fn publish(
        &mut self,
        mut publish: Publish,
        props: Option<protocol::PublishProperties>,
    ) -> Result<(), End> {
        if let Some(alias) = props.as_ref().and_then(|p| p.topic_alias) {
            if alias == 0 || alias > self.broker.limits.topic_alias_maximum {
                return Err(self.protocol_error(
                    "topic alias 0 or above the maximum",
                    DisconnectReasonCode::TopicAliasInvalid,
                ));
            }
            if publish.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => {
                        return Err(self.protocol_error(
                            "unknown topic alias",
                            DisconnectReasonCode::TopicAliasInvalid,
                        ))
                    }
                }
            } else {
                self.aliases.insert(alias, publish.topic.clone());
            }
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Err(
                self.protocol_error("topic is not UTF-8", DisconnectReasonCode::TopicNameInvalid)
            );
        };
        if !topics::valid_topic(topic) {
            return Err(self.protocol_error(
                "wildcard or empty topic in PUBLISH",
                DisconnectReasonCode::TopicNameInvalid,
            ));
        }
        let pkid = publish.pkid;
        let qos = publish.qos;
        if qos == QoS::ExactlyOnce && self.qos2_received.contains(&pkid) {
            // A retransmission of a QoS 2 message already taken.
            return self.send(pubrec(pkid));
        }
        // MQTT 5: the client was told the receive maximum, and a QoS 2
        // message counts until its PUBCOMP (a client that never releases
        // them is cut off here; Umbra stops reading meanwhile otherwise).
        let unfinished = self.qos2_received.len() + self.router.as_ref().map_or(0, |r| r.unacked);
        if qos != QoS::AtMostOnce
            && self.codec == Codec::V5
            && unfinished >= self.broker.limits.receive_maximum
        {
            return Err(self.protocol_error(
                "more unacknowledged publishes than the receive maximum",
                DisconnectReasonCode::ReceiveMaximumExceeded,
            ));
        }
        if qos == QoS::ExactlyOnce {
            self.qos2_received.insert(pkid);
        }
        match topics::route_publish(topic, self.thing(), self.privileged) {
            PublishRoute::ShadowRequest(request) => {
                let respond = match props.as_ref() {
                    Some(props) if props.response_topic.is_some() => {
                        Some(Box::new(self.response_to(props)?))
                    }
                    _ => None,
                };
                bump(&self.broker.metrics.shadow_requests);
                let user_properties = props
                    .as_ref()
                    .filter(|p| !p.user_properties.is_empty())
                    .map(|p| p.user_properties.as_slice().into());
                let submitted = self.broker.shadow.submit(ShadowPublish {
                    client_id: self.client_id.clone(),
                    request,
                    payload: publish.payload,
                    user_properties,
                });
                self.requests
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(Handling {
                        answered: submitted.answered,
                        respond,
                    });
                // A device's requests are all its own thing's; a privileged
                // client's are many things', and one thing's rate must not
                // hold up the others.
                if let (Some(wait), false) = (submitted.retry_after, self.privileged) {
                    bump(&self.broker.metrics.rate_pauses);
                    self.paused = Some(Box::pin(tokio::time::sleep(wait)));
                }
            }
            PublishRoute::Aws => {
                let topic = topic.to_owned();
                let qos = min_qos(qos, QoS::AtLeastOnce);
                // The route said `$aws/`, so this cannot fail.
                let payload = Bytes::copy_from_slice(&publish.payload);
                let _routed = self.broker.publisher.publish_at(&topic, payload, qos);
            }
            PublishRoute::Drop => {}
            PublishRoute::Router if !self.role.may_publish(topic, self.subject()) => {
                return Err(self.forbidden("publish", topic, Forbidden::Policy));
            }
            PublishRoute::Router => {
                // The router's PUBACK becomes the client's PUBACK, and its
                // PUBREC the client's PUBREC: a publisher goes no faster
                // than the router takes its messages. The connection runs
                // QoS 2's exchange with the client itself (duplicates are
                // dropped above) and releases a QoS 2 message to the router
                // at once, so that it keeps its QoS for subscribers.
                publish.dup = false;
                // The router keeps what it is given: copies of their own, so
                // that a kept message does not pin this connection's whole
                // read buffer.
                publish.topic = Bytes::copy_from_slice(&publish.topic);
                publish.payload = Bytes::copy_from_slice(&publish.payload);
                if publish.qos != QoS::AtMostOnce {
                    self.router_side().unacked += 1;
                }
                let props = props.map(|mut p| {
                    p.topic_alias = None;
                    p
                });
                self.forward(Packet::Publish(publish, props));
                if qos == QoS::ExactlyOnce {
                    let release = PubRel {
                        pkid,
                        reason: PubRelReason::Success,
                    };
                    self.forward(Packet::PubRel(release, None));
                }
                return Ok(());
            }
            PublishRoute::Forbidden(why) => {
                let topic = topic.to_owned();
                return Err(self.forbidden("publish", &topic, why));
            }
        }
        match qos {
            QoS::AtMostOnce => Ok(()),
            QoS::AtLeastOnce => self.send(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )),
            QoS::ExactlyOnce => self.send(pubrec(pkid)),
        }
    }

    fn held(&self) -> usize {
        self.attached.session.filters.len() + self.router.as_ref().map_or(0, |r| r.filters.len())
    }

    fn refusal(&self, v5: SubscribeReasonCode) -> SubscribeReasonCode {
        match self.codec {
            Codec::V4 => SubscribeReasonCode::Failure,
            Codec::V5 => v5,
        }
    }

    fn subscribe(
        &mut self,
        subscribe: Subscribe,
        props: Option<protocol::SubscribeProperties>,
    ) -> Result<(), End> {
        // MQTT 5: the identifier the messages of these subscriptions carry.
        let id = match props.as_ref().and_then(|p| p.id) {
            Some(0) => {
                return Err(self.protocol_error(
                    "subscription identifier 0",
                    DisconnectReasonCode::ProtocolError,
                ))
            }
            id => id
                .and_then(|id| u32::try_from(id).ok())
                .and_then(NonZeroU32::new),
        };
        let max = self.broker.limits.max_subscriptions;
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut routed = Vec::new();
        for filter in subscribe.filters {
            let already = self
                .router
                .as_ref()
                .is_some_and(|r| r.filters.contains(&filter.path))
                || self
                    .attached
                    .session
                    .filters
                    .iter()
                    .any(|(f, _)| **f == *filter.path);
            if !already && self.held() >= max {
                bump(&self.broker.metrics.refused_subscriptions);
                debug!(filter = filter.path, max, "subscription refused: too many");
                codes.push(Some(self.refusal(SubscribeReasonCode::QuotaExceeded)));
                continue;
            }
            match topics::route_subscribe(&filter.path, self.thing(), self.privileged) {
                SubscribeRoute::Aws => {
                    let qos = min_qos(filter.qos, QoS::AtLeastOnce);
                    let session = &mut self.attached.session;
                    let shared = self.broker.publisher.subscribe_with_id(
                        &filter.path,
                        qos,
                        id,
                        &session.mailbox,
                    );
                    match session
                        .filters
                        .iter_mut()
                        .find(|(f, _)| **f == *filter.path)
                    {
                        Some((_, held)) => *held = qos,
                        None => session.filters.push((shared, qos)),
                    }
                    codes.push(Some(SubscribeReasonCode::Success(qos)));
                }
                SubscribeRoute::Router
                    if !self.role.may_subscribe(&filter.path, self.subject()) =>
                {
                    bump(&self.broker.metrics.refused_subscriptions);
                    info!(
                        client_id = self.client_id,
                        filter = filter.path,
                        role = self.role.name,
                        "subscription refused: outside the client's policy"
                    );
                    codes.push(Some(self.refusal(SubscribeReasonCode::NotAuthorized)));
                }
                SubscribeRoute::Router => {
                    self.router_side().filters.insert(filter.path.clone());
                    routed.push(filter);
                    codes.push(None);
                }
                SubscribeRoute::Refuse => {
                    bump(&self.broker.metrics.refused_subscriptions);
                    debug!(filter = filter.path, "subscription refused");
                    codes.push(Some(self.refusal(SubscribeReasonCode::TopicFilterInvalid)));
                }
                SubscribeRoute::Forbidden(why) => {
                    return Err(self.forbidden("subscribe", &filter.path, why));
                }
            }
        }
        if routed.is_empty() {
            return self.send(suback(subscribe.pkid, codes, None, self.problem_info));
        }
        self.router_side()
            .pending_acks
            .insert(subscribe.pkid, PendingAck::SubAck(codes));
        let subscribe = Subscribe {
            pkid: subscribe.pkid,
            filters: routed,
        };
        self.forward(Packet::Subscribe(subscribe, props));
        Ok(())
    }

    fn unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        props: Option<protocol::UnsubscribeProperties>,
    ) -> Result<(), End> {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        let mut routed = Vec::new();
        for filter in unsubscribe.filters {
            if self
                .router
                .as_mut()
                .is_some_and(|r| r.filters.remove(&filter))
            {
                routed.push(filter);
                reasons.push(None);
                continue;
            }
            let session = &mut self.attached.session;
            match session.filters.iter().position(|(f, _)| **f == *filter) {
                Some(at) => {
                    session.filters.remove(at);
                    self.broker.publisher.unsubscribe(&filter, &session.mailbox);
                    reasons.push(Some(UnsubAckReason::Success));
                }
                None if self.attached.session.router && !filter.starts_with(topics::AWS_PREFIX) => {
                    // Perhaps held by the router from a resumed session.
                    routed.push(filter);
                    reasons.push(None);
                }
                None => reasons.push(Some(UnsubAckReason::NoSubscriptionExisted)),
            }
        }
        if routed.is_empty() {
            return self.send(unsuback(unsubscribe.pkid, reasons));
        }
        self.router_side()
            .pending_acks
            .insert(unsubscribe.pkid, PendingAck::UnsubAck(reasons));
        let unsubscribe = Unsubscribe {
            pkid: unsubscribe.pkid,
            filters: routed,
        };
        self.forward(Packet::Unsubscribe(unsubscribe, props));
        Ok(())
    }

    /// Handles one router notification and whatever else is already queued.
    /// Returns whether the router unscheduled this link (it then waits to
    /// be woken).
    fn on_router(&mut self, first: Option<Notification>) -> Result<bool, End> {
        let mut next = first;
        let mut unscheduled = false;
        // At most about 16 KiB per wake-up; what is left stays queued in the
        // link for the next one.
        while let Some(notification) = next {
            match notification {
                Notification::Forward(forward) => {
                    let message = (forward.publish, forward.properties.map(|p| *p));
                    let waiting = !self.router_side().deferred.is_empty();
                    if waiting || self.unacknowledged() >= self.send_window {
                        // The client's window is full: kept, in order,
                        // until it acknowledges (the router sends at most
                        // its own in-flight window ahead).
                        self.router_side().deferred.push_back(message);
                    } else {
                        self.deliver_routed(message)?;
                    }
                }
                Notification::DeviceAck(ack) => self.router_ack(ack.into())?,
                Notification::Unschedule => unscheduled = true,
                Notification::Disconnect(..) => {
                    return Err(LinkError::NotConnectionAck.into());
                }
                _ => {}
            }
            if self.write.len() >= 16 * 1024 {
                break;
            }
            next = self
                .router
                .as_mut()
                .and_then(|r| r.rx.as_mut())
                .and_then(LinkRx::try_next);
        }
        Ok(unscheduled)
    }

    /// Sends a router message to the client, unless its role may not
    /// receive it or it is larger than the client takes: then it is
    /// withheld and acknowledged to the router on the client's behalf.
    fn deliver_routed(
        &mut self,
        (mut publish, properties): (Publish, Option<PublishProperties>),
    ) -> Result<(), End> {
        let topic = String::from_utf8_lossy(&publish.topic);
        let receive = self.role.may_receive(&topic, self.subject());
        if !receive || !self.fits(&publish, &properties) {
            if !receive {
                bump(&self.broker.metrics.withheld);
            }
            match publish.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    let ack = PubAck {
                        pkid: publish.pkid,
                        reason: PubAckReason::Success,
                    };
                    self.forward(Packet::PubAck(ack, None));
                }
                // The router answers with PUBREL, completed in `router_ack`.
                QoS::ExactlyOnce => {
                    let received = PubRec {
                        pkid: publish.pkid,
                        reason: PubRecReason::Success,
                    };
                    self.forward(Packet::PubRec(received, None));
                }
            }
            return Ok(());
        }
        if publish.qos != QoS::AtMostOnce {
            let wire = self.alloc_pkid();
            self.router_side().inflight.insert(wire, publish.pkid);
            publish.pkid = wire;
        }
        self.send(Packet::Publish(publish, properties))
    }

    /// Sends what waited for the client's window, as far as it goes now.
    fn deliver_deferred(&mut self) -> Result<(), End> {
        while self.unacknowledged() < self.send_window {
            let Some(message) = self.router.as_mut().and_then(|r| r.deferred.pop_front()) else {
                break;
            };
            self.deliver_routed(message)?;
        }
        Ok(())
    }

    fn router_ack(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::SubAck(ack, props) => {
                let pending = self.router_side().pending_acks.remove(&ack.pkid);
                if let Some(PendingAck::SubAck(codes)) = pending {
                    let codes = with_routed(codes, ack.return_codes);
                    return self.send(suback(ack.pkid, codes, props, self.problem_info));
                }
                Ok(())
            }
            Packet::UnsubAck(ack, _) => {
                let pending = self.router_side().pending_acks.remove(&ack.pkid);
                if let Some(PendingAck::UnsubAck(reasons)) = pending {
                    let reasons = with_routed(reasons, ack.reasons);
                    return self.send(unsuback(ack.pkid, reasons));
                }
                Ok(())
            }
            Packet::PubRel(rel, props) => {
                let wire = self
                    .router_side()
                    .inflight
                    .iter()
                    .find(|(_, router)| **router == rel.pkid)
                    .map(|(wire, _)| *wire);
                match wire {
                    Some(pkid) => {
                        self.send(Packet::PubRel(protocol::PubRel { pkid, ..rel }, props))
                    }
                    // A QoS 2 message withheld from the client
                    // (`deliver_routed`): completed on its behalf.
                    None => {
                        let complete = PubComp {
                            pkid: rel.pkid,
                            reason: PubCompReason::Success,
                        };
                        self.forward(Packet::PubComp(complete, None));
                        Ok(())
                    }
                }
            }
            // The router took a publish of the client's: QoS 1, or QoS 2
            // (its PUBCOMP for the release that followed is not passed on:
            // the client's PUBREL is answered by the connection).
            Packet::PubAck(ack, _) => {
                if let Some(router) = self.router.as_mut() {
                    router.unacked = router.unacked.saturating_sub(1);
                }
                self.send(Packet::PubAck(ack, None))
            }
            Packet::PubRec(rec, _) => {
                if let Some(router) = self.router.as_mut() {
                    router.unacked = router.unacked.saturating_sub(1);
                }
                self.send(pubrec(rec.pkid))
            }
            // Acknowledgements of what this connection already acknowledged.
            _ => Ok(()),
        }
    }

    /// Says goodbye: a DISCONNECT with the reason to an MQTT 5 client, the
    /// will when it is due, and the router link's end.
    async fn close(&mut self, end: End) {
        match &end {
            End::Graceful { .. } | End::Closed => debug!("client disconnected"),
            End::Io(err) => debug!(cause = %err, "connection lost"),
            End::TakenOver => debug!("taken over by a new connection"),
            End::Shutdown => debug!("closed for shutdown"),
            End::KeepAlive => debug!("keep-alive expired"),
            End::Forbidden(..) => {}
            End::Protocol(why, _) => info!(
                client_id = self.client_id,
                why, "protocol violation, closing the connection"
            ),
            End::Malformed(err) => {
                bump(&self.broker.metrics.protocol_errors);
                info!(client_id = self.client_id, cause = %err, "malformed packet, closing the connection");
            }
            End::Router(err) => {
                warn!(client_id = self.client_id, cause = %err, "router link failed")
            }
        }
        if matches!(end, End::Shutdown) {
            // What the service answered before it stopped is still in the
            // mailbox: write it before saying goodbye.
            if self.deliver().is_ok() {
                let _best_effort = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
            }
        }
        if let (Codec::V5, Some(reason_code)) = (self.codec, end.reason()) {
            // With the reason as text, unless that makes the packet larger
            // than the client takes.
            let reason_string = end.reason_string().filter(|text| {
                self.max_packet_out
                    .is_none_or(|max| text.len() + DISCONNECT_OVERHEAD <= max)
            });
            let properties = reason_string.map(|text| DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(text),
                user_properties: Vec::new(),
                server_reference: None,
            });
            // After whatever is still unwritten (the CONNACK, when the first
            // packet after CONNECT is the one that ends the connection).
            if self
                .send(Packet::Disconnect(Disconnect { reason_code }, properties))
                .is_ok()
            {
                let _best_effort = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
            }
        }
        // What the client sent before the end still reaches the router (a
        // QoS 0 publish and a DISCONNECT read together, for one).
        if let Err(err) = self.hand_to_router().await {
            debug!(cause = ?err, "router gone before the connection's last packets");
        }
        if end.publishes_will() {
            if let Some(will) = self.will.take() {
                // MQTT 5: after the will delay, or when the session ends
                // if that is sooner.
                let delay = will.delay.min(self.keep.unwrap_or_default());
                if delay.is_zero() {
                    self.forward(will.into_packet());
                    if let Err(err) = self.hand_to_router().await {
                        warn!(client_id = self.client_id, cause = ?err, "will not published");
                    }
                } else {
                    let cancel = self.broker.stop.child_token();
                    self.attached.pending_will = Some(cancel.clone());
                    umbra_shadow::tasks::spawn_for_request(
                        "delayed will",
                        publish_will_later(
                            self.broker.router.clone(),
                            self.client_id.clone(),
                            will.into_packet(),
                            delay,
                            cancel,
                        ),
                    );
                }
            }
        }
        if let Some(link) = self.router.take().and_then(|r| r.link) {
            if let Err(err) = link.disconnect().await {
                debug!(cause = %err, "router gone before the link's end");
            }
        }
        // Closing with unread input resets the connection, and the client
        // may then lose a DISCONNECT it has not read yet: after one, read
        // what it still sends until it closes, for at most a second (not
        // when shutting down, nor when a new connection waits for the
        // session).
        let told = self.codec == Codec::V5 && end.reason().is_some();
        if told && !matches!(end, End::Shutdown | End::TakenOver) {
            let drain = async {
                loop {
                    self.read.clear();
                    if !matches!(self.stream.read_some(&mut self.read).await, Ok(n) if n > 0) {
                        break;
                    }
                }
            };
            let _closed_or_not = tokio::time::timeout(DISCONNECT_LINGER, drain).await;
        }
        self.stream.shutdown().await.ok();
    }
}

/// The router's next notification for this link (`End` keeps the error
/// small: the select in `run` stores this result in the task's future).
async fn next_notification(
    router: &mut Option<Box<RouterSide>>,
) -> Result<Option<Notification>, End> {
    match router.as_mut().and_then(|r| r.rx.as_mut()) {
        // Boxed: an idle connection's future keeps no room for a receive
        // it does not make.
        Some(rx) => Ok(Box::pin(rx.next()).await?),
        None => std::future::pending().await,
    }
}

/// The next shadow request answered, if any are being handled.
async fn next_answered(
    requests: &mut Option<FuturesUnordered<Handling>>,
) -> Option<Option<Response>> {
    match requests {
        Some(requests) => requests.next().await,
        None => std::future::pending().await,
    }
}

/// Resolves when a pause ends (never without one).
async fn resumed(paused: &mut Option<Pin<Box<Sleep>>>) {
    match paused {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

fn pubrec(pkid: u16) -> Packet {
    Packet::PubRec(
        PubRec {
            pkid,
            reason: PubRecReason::Success,
        },
        None,
    )
}

/// The connection's own answers with the router's filled into the gaps, in
/// filter order.
fn with_routed<T>(own: Vec<Option<T>>, routed: Vec<T>) -> Vec<Option<T>> {
    let mut routed = routed.into_iter();
    own.into_iter()
        .map(|a| a.or_else(|| routed.next()))
        .collect()
}

/// A SUBACK with `codes` (a code not filled in is a failure) and, when
/// the client takes them (`problem_info`), a reason string for refusals.
fn suback(
    pkid: u16,
    codes: Vec<Option<SubscribeReasonCode>>,
    props: Option<protocol::SubAckProperties>,
    problem_info: bool,
) -> Packet {
    let return_codes: Vec<SubscribeReasonCode> = codes
        .into_iter()
        .map(|c| c.unwrap_or(SubscribeReasonCode::Failure))
        .collect();
    let mut reasons: Vec<&str> = Vec::new();
    for code in &return_codes {
        let reason = match code {
            SubscribeReasonCode::QuotaExceeded => "too many subscriptions",
            SubscribeReasonCode::NotAuthorized => "topic filter outside the client's policy",
            SubscribeReasonCode::TopicFilterInvalid => "topic filter not supported",
            SubscribeReasonCode::Success(_) => continue,
            _ => "refused",
        };
        if !reasons.contains(&reason) {
            reasons.push(reason);
        }
    }
    let props = match (props, problem_info && !reasons.is_empty()) {
        (props, false) => props,
        (props, true) => Some(protocol::SubAckProperties {
            reason_string: Some(reasons.join("; ")),
            user_properties: props.map(|p| p.user_properties).unwrap_or_default(),
        }),
    };
    Packet::SubAck(SubAck { pkid, return_codes }, props)
}

fn unsuback(pkid: u16, reasons: Vec<Option<UnsubAckReason>>) -> Packet {
    let reasons = reasons
        .into_iter()
        .map(|r| r.unwrap_or(UnsubAckReason::UnspecifiedError))
        .collect();
    Packet::UnsubAck(UnsubAck { pkid, reasons }, None)
}
