//! Listeners and transports: binding with a deep backlog, the accept loop,
//! and the TLS and WebSocket handshakes, which run in each connection's own
//! task under its connect timeout (never in the accept loop, so one client
//! that never finishes its handshake delays nobody else).

use std::fs::File;
use std::io::{self, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use ws_stream_tungstenite::WsStream;

use crate::connection::{self, Broker};
use crate::embedded::TlsFiles;
use crate::metrics::bump;

/// A byte stream of a transport other than plain TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection's byte stream. Plain TCP stays itself, so that an idle
/// connection waits for readability without holding a read buffer; other
/// transports are boxed.
pub enum Io {
    Tcp(TcpStream),
    Other(Box<dyn Stream>),
}

/// Room reserved for a read once a plain TCP stream is readable.
const READ_CHUNK: usize = 4096;

impl Io {
    /// Reads what is available into `buf`. On plain TCP it waits for
    /// readability first and only then makes room, so a connection waiting
    /// for its next packet holds no buffer.
    pub async fn read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Io::Tcp(tcp) => loop {
                tcp.readable().await?;
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
                match tcp.try_read_buf(buf) {
                    // Readiness was stale: wait again, holding nothing.
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                    }
                    read => return read,
                }
            },
            Io::Other(stream) => stream.read_buf(buf).await,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Other(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Other(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Other(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Other(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// What a listener speaks on top of TCP.
#[derive(Clone)]
pub enum Transport {
    Tcp,
    Tls(TlsAcceptor),
    WebSocket(Option<TlsAcceptor>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
            Transport::WebSocket(None) => "websocket",
            Transport::WebSocket(Some(_)) => "websocket+tls",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("no certificate in {0}")]
    NoCertificate(String),
    #[error("no private key in {0}")]
    NoKey(String),
    #[error("certificate and key do not make a TLS config: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
    #[error("client CA: {0}")]
    ClientCa(String),
}

/// A TLS acceptor from PEM files, read once at start; with a client CA it
/// verifies client certificates (required, or optional).
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let (cert, key) = (files.cert.as_path(), files.key.as_path());
    let open = |path: &Path| {
        File::open(path)
            .map(BufReader::new)
            .map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })
    };
    let certs = rustls_pemfile::certs(&mut open(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: cert.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.display().to_string()));
    }
    let key = rustls_pemfile::private_key(&mut open(key)?)
        .map_err(|source| TlsError::Read {
            path: key.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(key.display().to_string()))?;
    let builder = ServerConfig::builder();
    let config = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut open(ca)?) {
                let cert = cert.map_err(|source| TlsError::Read {
                    path: ca.display().to_string(),
                    source,
                })?;
                roots.add(cert)?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoCertificate(ca.display().to_string()));
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier = match files.require_client_cert {
                true => verifier.build(),
                false => verifier.allow_unauthenticated().build(),
            }
            .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    }
    .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What a verified client certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The subject's common name (the device's identity by default).
    pub common_name: Option<String>,
    /// The first DNS name of its subject alternative names.
    pub dns_name: Option<String>,
    /// The subject's organizational units (a role may be assigned by one).
    pub units: Vec<String>,
    /// The serial number in lower-case hex without leading zeros (what a
    /// revocation list names).
    pub serial: String,
}

impl PeerCert {
    fn of(connection: &tokio_rustls::rustls::ServerConnection) -> Option<PeerCert> {
        PeerCert::from_der(connection.peer_certificates()?.first()?.as_ref())
    }

    /// What a certificate (DER) says; `None` if it does not parse.
    pub fn from_der(der: &[u8]) -> Option<PeerCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let dns_name = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
            });
        let units = cert
            .subject()
            .iter_organizational_unit()
            .filter_map(|ou| ou.as_str().ok().map(str::to_owned))
            .collect();
        Some(PeerCert {
            common_name,
            dns_name,
            units,
            serial: format!("{:x}", cert.serial),
        })
    }
}

/// Binds `addr` with room for `backlog` connections waiting to be accepted.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Accepts connections until `stop`; each connection takes a permit of
/// `limit` before it is accepted and holds it until it ends.
pub async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    broker: Arc<Broker>,
    limit: Arc<Semaphore>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors or a connection reset before it
                // was accepted: say so, give the system a moment, go on.
                warn!(cause = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(slot) = broker.addresses.admit(peer.ip()) else {
            bump(&broker.metrics.address_limited);
            debug!(%peer, "the address holds its most connections; closed");
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(cause = %err, %peer, "cannot set TCP_NODELAY");
        }
        let transport = transport.clone();
        let broker = Arc::clone(&broker);
        // Tracked so that shutdown can wait for every connection. A panic in
        // one ends only that connection, as a request task's does
        // (`umbra_shadow::tasks`): the listener and the broker go on.
        let admission = connection::Admission { permit, slot };
        connections.spawn(connection::run(stream, peer, transport, broker, admission));
    }
}

/// Runs the transport's handshake on an accepted TCP stream; with TLS, also
/// returns the client's verified certificate, if it presented one.
pub async fn handshake(
    stream: TcpStream,
    transport: &Transport,
) -> io::Result<(Io, Option<PeerCert>)> {
    match transport {
        Transport::Tcp => Ok((Io::Tcp(stream), None)),
        Transport::Tls(acceptor) => {
            let tls = acceptor.accept(stream).await?;
            let cert = PeerCert::of(tls.get_ref().1);
            Ok((Io::Other(Box::new(tls)), cert))
        }
        Transport::WebSocket(None) => Ok((websocket(stream).await?, None)),
        Transport::WebSocket(Some(acceptor)) => {
            let tls = acceptor.accept(stream).await?;
            let cert = PeerCert::of(tls.get_ref().1);
            Ok((websocket(tls).await?, cert))
        }
    }
}

/// Subprotocols of MQTT over WebSocket, in order of preference.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

async fn websocket<S>(stream: S) -> io::Result<Io>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = async_tungstenite::tokio::accept_hdr_async(stream, choose_subprotocol)
        .await
        .map_err(io::Error::other)?;
    Ok(Io::Other(Box::new(WsStream::new(ws))))
}

/// Answers with the first subprotocol the client offered that Umbra speaks;
/// refuses the upgrade when it offered none of them.
#[allow(clippy::result_large_err)] // the signature tungstenite's callback requires
fn choose_subprotocol(
    request: &Request,
    mut response: Response,
) -> Result<Response, ErrorResponse> {
    let offered = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| SUBPROTOCOLS.contains(p));
    match offered {
        Some(protocol) => {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(if protocol == "mqtt" {
                    "mqtt"
                } else {
                    "mqttv3.1"
                }),
            );
            Ok(response)
        }
        None => {
            let mut refusal = ErrorResponse::new(Some(
                "MQTT over WebSocket needs the subprotocol \"mqtt\"".to_owned(),
            ));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            Err(refusal)
        }
    }
}
