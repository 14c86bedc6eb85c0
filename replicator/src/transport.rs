//! QUIC transport between the two daemons (quinn, mutual TLS, ALPN
//! `replicator/1`).
//!
//! A dialer opens one connection per peer. Its first bidirectional stream is
//! the session stream: `Hello` -> `HelloReply`, which negotiates the wire
//! version (a mismatch is a clear error on both sides). Each replicated group
//! then runs on its own bidirectional stream, opened by the group's primary
//! with `OpenGroup`. Frames are length-delimited protobuf `Envelope`s
//! (`replicator_protocol::wire`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use replicator_protocol::pb::{self, envelope::Body};
use replicator_protocol::wire::{encode_frame_parts, negotiate_version, FrameDecoder, WireError, SUPPORTED_VERSIONS};
use tokio::sync::Mutex;

use crate::config::{Config, PeerAddress};
use crate::io::AlignedBuf;
use crate::tls::{peer_name, TlsError, TlsIdentity};

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS set-up or peer identity.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Could not bind the UDP socket.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Error.
        source: std::io::Error,
    },
    /// Dialing failed.
    #[error("cannot connect to {peer} at {addr}: {message}")]
    Connect {
        /// Peer name.
        peer: String,
        /// Its address as configured (and, for a DNS name, what it resolved
        /// to).
        addr: String,
        /// Why.
        message: String,
    },
    /// The connection or stream failed.
    #[error("connection: {0}")]
    Connection(String),
    /// A malformed or hostile frame.
    #[error("bad frame from peer: {0}")]
    Wire(#[from] WireError),
    /// The peer broke the protocol or refused.
    #[error("{0}")]
    Protocol(String),
    /// No such peer in the configuration.
    #[error("peer {0:?} is not configured")]
    UnknownPeer(String),
    /// Timed out.
    #[error("timed out {0}")]
    Timeout(&'static str),
}

/// Receiving half of a framed stream.
#[derive(Debug)]
pub struct FramedRecv {
    inner: quinn::RecvStream,
    decoder: FrameDecoder<AlignedBuf>,
}

impl FramedRecv {
    /// Wraps a QUIC receive stream.
    pub fn new(inner: quinn::RecvStream) -> Self {
        Self { inner, decoder: FrameDecoder::with_memory() }
    }

    /// Next envelope; `Ok(None)` when the peer finished the stream cleanly.
    ///
    /// Each call takes a unit of tokio's cooperative budget: quinn's streams
    /// are outside it, and a stream that always has a frame ready would
    /// otherwise never let its reader's task yield, starving the other
    /// tasks of the thread (a secondary's applier starved the io_uring
    /// reaper beside it, so its volume writes stopped completing while
    /// records kept arriving).
    pub async fn recv(&mut self) -> Result<Option<pb::Envelope>, TransportError> {
        tokio::task::consume_budget().await;
        loop {
            if let Some(env) = self.decoder.decode()? {
                return Ok(Some(env));
            }
            match self.inner.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.decoder.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    if self.decoder.buffered_len() > 0 {
                        return Err(TransportError::Protocol("stream ended inside a frame".into()));
                    }
                    return Ok(None);
                }
                Err(e) => return Err(TransportError::Connection(e.to_string())),
            }
        }
    }

    /// An envelope already buffered, without waiting for the network.
    pub fn try_next(&mut self) -> Result<Option<pb::Envelope>, TransportError> {
        Ok(self.decoder.decode()?)
    }

    /// Next envelope, or an error if the stream ends.
    pub async fn expect(&mut self, what: &'static str) -> Result<Body, TransportError> {
        match self.recv().await? {
            Some(pb::Envelope { body: Some(Body::Error(e)) }) => {
                Err(TransportError::Protocol(format!("peer: {}", replicator_protocol::wire::peer_text(&e.message))))
            }
            Some(pb::Envelope { body: Some(b) }) => Ok(b),
            Some(pb::Envelope { body: None }) => Err(TransportError::Protocol("empty envelope".into())),
            None => Err(TransportError::Protocol(format!("stream closed while waiting for {what}"))),
        }
    }
}

/// Sending half of a framed stream, with a batch buffer. Large record
/// payloads are queued as they are, not copied ([`encode_frame_parts`]).
#[derive(Debug)]
pub struct FramedSend {
    inner: quinn::SendStream,
    /// Frame bytes not yet part of `chunks`.
    buf: BytesMut,
    /// The batch so far, in order (without `buf`).
    chunks: Vec<Bytes>,
    chunks_len: usize,
}

impl FramedSend {
    /// Wraps a QUIC send stream.
    pub fn new(inner: quinn::SendStream) -> Self {
        Self { inner, buf: BytesMut::new(), chunks: Vec::new(), chunks_len: 0 }
    }

    /// Adds an envelope to the batch.
    pub fn queue(&mut self, body: Body) {
        if let Some(payload) = encode_frame_parts(body, &mut self.buf) {
            let head = self.buf.split().freeze();
            self.chunks_len += head.len() + payload.len();
            self.chunks.push(head);
            self.chunks.push(payload);
        }
    }

    /// Bytes queued and not yet sent.
    pub fn queued(&self) -> usize {
        self.chunks_len + self.buf.len()
    }

    /// Sends the batch.
    pub async fn flush(&mut self) -> Result<(), TransportError> {
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        if self.chunks.is_empty() {
            return Ok(());
        }
        let result = self.inner.write_all_chunks(&mut self.chunks).await;
        self.chunks.clear();
        self.chunks_len = 0;
        result.map_err(|e| TransportError::Connection(e.to_string()))
    }

    /// Sends the batch like [`FramedSend::flush`], but the connection's
    /// driver, woken by it, runs at once instead of after the tasks woken
    /// meanwhile (see [`DriverLast`]): for what a client's write waits for
    /// while no other write's record or receipt is on its way to join it
    /// (a lone sync write's record, a sync-mode receipt).
    pub async fn flush_now(&mut self) -> Result<(), TransportError> {
        let mut flush = std::pin::pin!(self.flush());
        std::future::poll_fn(|cx| as_driver(|| std::future::Future::poll(flush.as_mut(), cx))).await
    }

    /// Queues and sends one envelope.
    pub async fn send(&mut self, body: Body) -> Result<(), TransportError> {
        self.queue(body);
        self.flush().await
    }

    /// Finishes the stream (the peer sees a clean end).
    pub fn finish(&mut self) {
        let _ = self.inner.finish();
    }
}

/// How long resolving a peer's DNS name may take before a dial gives up.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole dial: resolving, the QUIC handshake (10 s at most), opening the
/// Hello stream and the HelloReply (10 s at most).
const DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// The first of `addrs` of the same family as the local socket (an IPv4
/// socket cannot reach an IPv6 address), or the first one.
fn pick_address(addrs: &[SocketAddr], local: Option<SocketAddr>) -> Option<SocketAddr> {
    let same = |a: &&SocketAddr| local.is_none_or(|l| l.is_ipv4() == a.is_ipv4());
    addrs.iter().find(same).or(addrs.first()).copied()
}

/// QUIC handshakes (with the Hello exchange) in progress at once.
const MAX_HANDSHAKES: usize = 16;
/// An incoming connection must finish its handshake and Hello within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections a peer may have dialed to this node at once. A peer
/// dials one and shares it between its groups; a new one replaces it after
/// a link failure while the old one may not have timed out yet. Each holds
/// a receive window and streams: a peer (or a stolen peer key) opening more
/// is refused.
const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// Handshakes in progress at once from one validated source (see
/// [`source_of`]): a client that proved its address cannot take every slot
/// of the validated pool and lock the configured peers out.
const MAX_HANDSHAKES_PER_SOURCE: usize = 4;

/// What one client controls of its address: an IPv4 address, or an IPv6
/// /64 (a host usually holds a whole one).
fn source_of(addr: SocketAddr) -> std::net::IpAddr {
    match addr.ip().to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// Handshakes in progress per source, each at most
/// [`MAX_HANDSHAKES_PER_SOURCE`].
#[derive(Debug, Default, Clone)]
struct SourceSlots(Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>);

/// One handshake's place in [`SourceSlots`], given back when dropped.
#[derive(Debug)]
struct SourceSlot {
    slots: SourceSlots,
    source: std::net::IpAddr,
}

impl SourceSlots {
    fn try_take(&self, remote: SocketAddr) -> Option<SourceSlot> {
        let source = source_of(remote);
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(source).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot { slots: self.clone(), source })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.slots.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

/// Closes `conn` once nothing has arrived on it for [`crate::tls::IDLE_TIMEOUT`]
/// (QUIC's idle timeout as configured).
/// quinn's own idle timeout is max(idle, 3 x PTO), and the PTO grows with
/// one late RTT sample: a process stopped (SIGSTOP, a paused VM) while an
/// ACK of its packets was on its way takes the whole pause as a round trip
/// once it resumes (20 s frozen: about 60 s of "idle timeout"), and a
/// connection whose peer is gone stays open that long -- a secondary kept
/// showing PAIR over the session of a primary process that no longer
/// existed.
fn watch_liveness(conn: quinn::Connection) {
    tokio::spawn(async move {
        let mut seen = conn.stats().udp_rx.datagrams;
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                () = tokio::time::sleep(crate::tls::IDLE_TIMEOUT / 10) => {}
            }
            let now = conn.stats().udp_rx.datagrams;
            if now != seen {
                seen = now;
                since = tokio::time::Instant::now();
            } else if since.elapsed() >= crate::tls::IDLE_TIMEOUT {
                tracing::info!(remote = %conn.remote_address(), "closing a connection that received nothing for {:?}", crate::tls::IDLE_TIMEOUT);
                conn.close(quinn::VarInt::from_u32(4), b"nothing received within the idle timeout");
                return;
            }
        }
    });
}

/// The QUIC endpoint and the peer connections it dialed.
#[derive(Debug)]
pub struct Transport {
    endpoint: quinn::Endpoint,
    /// For new dials; replaced by [`Transport::reload_tls`].
    client: std::sync::RwLock<quinn::ClientConfig>,
    /// The configured groups, which size the QUIC streams and windows
    /// (kept for reloads).
    groups: usize,
    node: String,
    peers: HashMap<String, PeerAddress>,
    /// The connection this node dialed to each peer (held only briefly).
    conns: std::sync::Mutex<HashMap<String, quinn::Connection>>,
    /// One dial at a time per peer (a peer that does not answer holds up
    /// only the groups that replicate to it).
    dials: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Wire versions offered in `Hello` and accepted from peers.
    versions: Vec<u32>,
    /// Authenticated peer connections from the handshake tasks (started by
    /// the first [`Transport::accept`]).
    accepted: Mutex<Option<tokio::sync::mpsc::Receiver<PeerConnection>>>,
    /// The newest authenticated incoming connection of each peer, for
    /// [`Transport::rtt`] (dropped when a newer one arrives).
    incoming: std::sync::Mutex<HashMap<String, Vec<quinn::Connection>>>,
    /// notAfter (seconds since the epoch) of the certificates in use:
    /// ("node" | "ca", t); set at bind and by [`Transport::note_certificates`]
    /// after a reload, read by the metrics.
    certificate_expiry: std::sync::RwLock<Vec<(&'static str, i64)>>,
}

/// An incoming connection that was refused, and why.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    /// The remote UDP address.
    pub remote: SocketAddr,
    /// The peer's node name, once its certificate was verified.
    pub peer: Option<String>,
    /// Why it was refused.
    pub reason: TransportError,
}

/// An accepted, authenticated connection from a peer.
#[derive(Debug)]
pub struct PeerConnection {
    /// The peer's node name, from its certificate.
    pub peer: String,
    /// The connection.
    pub conn: quinn::Connection,
}

/// notAfter of `tls.cert` and `tls.ca`; one that cannot be read keeps its
/// value in `previous` (or is left out) and is logged.
fn certificate_expiry(tls: &crate::config::TlsPaths, previous: &[(&'static str, i64)]) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for (which, path) in [("node", &tls.cert), ("ca", &tls.ca)] {
        match crate::tls::not_after_unix(path) {
            Ok(t) => out.push((which, t)),
            Err(e) => {
                tracing::warn!("metrics: cannot read the expiry of {}: {e}", path.display());
                out.extend(previous.iter().filter(|(w, _)| *w == which).copied());
            }
        }
    }
    out
}

impl Transport {
    /// Binds the QUIC endpoint on `node.listen`, speaking the wire versions
    /// of this build ([`SUPPORTED_VERSIONS`]). This is what the daemon uses.
    pub fn bind(config: &Config) -> Result<Transport, TransportError> {
        Self::bind_with_versions(config, SUPPORTED_VERSIONS)
    }

    /// [`Transport::bind`], claiming to speak `versions` instead of
    /// [`SUPPORTED_VERSIONS`]. Only for tests of version negotiation, which
    /// play a peer of another version in-process; the daemon never calls it,
    /// and nothing in its configuration or environment leads here.
    pub fn bind_with_versions(config: &Config, versions: &[u32]) -> Result<Transport, TransportError> {
        let identity = TlsIdentity::load(&config.tls, &config.node.name)?;
        if let Err(e) = identity.verify_own_chain(&config.tls, &config.node.name) {
            // Not fatal: the volumes are still served locally; the peer's
            // refusal is logged at each dial (`config check` fails on it).
            tracing::warn!("{e}");
        }
        let server = identity.server_config(config.groups.len())?;
        let client = identity.client_config(config.groups.len())?;
        let socket = std::net::UdpSocket::bind(config.node.listen)
            .map_err(|source| TransportError::Bind { addr: config.node.listen, source })?;
        size_socket_buffers(&socket);
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(DriverLast {
            inner: quinn::default_runtime()
                .ok_or_else(|| TransportError::Connection("no async runtime for QUIC".into()))?,
        });
        let inner = runtime
            .wrap_udp_socket(socket)
            .map_err(|source| TransportError::Bind { addr: config.node.listen, source })?;
        let socket = Arc::new(InspectingSocket { inner, last_log: std::sync::Mutex::new(None) });
        // Peers then keep the fixed bit of every packet set, which lets the
        // socket wrapper tell a stray plaintext datagram from a peer's packet.
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config.grease_quic_bit(false);
        // Advertise that we take jumbo datagrams: the peer's path MTU
        // discovery goes no higher than this (quinn's default, 1472, holds
        // every link to 1500-byte packets and a 4 KiB record to three).
        endpoint_config
            .max_udp_payload_size(crate::tls::JUMBO_UDP_PAYLOAD)
            .map_err(|e| TransportError::Connection(format!("QUIC endpoint configuration: {e}")))?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(endpoint_config, Some(server), socket, runtime)
            .map_err(|source| TransportError::Bind { addr: config.node.listen, source })?;
        Ok(Transport {
            endpoint,
            client: std::sync::RwLock::new(client),
            groups: config.groups.len(),
            node: config.node.name.clone(),
            peers: config.peers.iter().map(|p| (p.name.clone(), p.address.clone())).collect(),
            conns: std::sync::Mutex::new(HashMap::new()),
            dials: std::sync::Mutex::new(HashMap::new()),
            accepted: Mutex::new(None),
            incoming: std::sync::Mutex::new(HashMap::new()),
            versions: versions.to_vec(),
            certificate_expiry: std::sync::RwLock::new(certificate_expiry(&config.tls, &[])),
        })
    }

    /// Records the expiry of the certificate and CA in `tls` as the ones in
    /// use (after [`Transport::reload_tls`] applied them); one that cannot
    /// be read keeps its previous value.
    pub fn note_certificates(&self, tls: &crate::config::TlsPaths) {
        let mut expiry = self.certificate_expiry.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *expiry = certificate_expiry(tls, &expiry);
    }

    /// ("node" | "ca", notAfter in seconds since the epoch) of the
    /// certificates in use.
    pub fn certificate_expiry(&self) -> Vec<(&'static str, i64)> {
        self.certificate_expiry.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Uses `identity` (certificate, key and CA) for every QUIC handshake
    /// from now on, incoming and outgoing; connections already up keep
    /// theirs. Nothing changes on an error.
    pub fn reload_tls(&self, identity: &TlsIdentity) -> Result<(), TransportError> {
        let server = identity.server_config(self.groups)?;
        let client = identity.client_config(self.groups)?;
        self.endpoint.set_server_config(Some(server));
        *self.client.write().unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        Ok(())
    }

    /// QUIC's round-trip time estimate on an open connection with `peer`
    /// (the one this node dialed, else the newest the peer dialed); `None`
    /// when none is open. Never waits: a dial in progress reads as `None`.
    pub fn rtt(&self, peer: &str) -> Option<Duration> {
        let open = |c: &quinn::Connection| c.close_reason().is_none().then(|| c.rtt());
        let dialed = self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(peer).and_then(open);
        dialed.or_else(|| {
            let incoming = self.incoming.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            incoming.get(peer).and_then(|conns| conns.iter().rev().find_map(open))
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    fn peer_names(&self) -> Vec<String> {
        self.peers.keys().cloned().collect()
    }

    /// Accepts the next authenticated peer connection. Failed handshakes are
    /// logged with the reason and skipped. `None` when the endpoint closes.
    pub async fn accept(self: &Arc<Self>) -> Option<PeerConnection> {
        let mut peers = self.accepted.lock().await;
        if peers.is_none() {
            let (tx, rx) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
            tokio::spawn(self.clone().handshakes(tx));
            *peers = Some(rx);
        }
        peers.as_mut()?.recv().await
    }

    /// Accepts incoming connections and runs each handshake (QUIC, TLS,
    /// Hello) in its own task, each within [`HANDSHAKE_TIMEOUT`]: a client
    /// that starts handshakes and never finishes them (replayed Initial
    /// packets need no credentials) cannot hold up the configured peer.
    /// At most [`MAX_HANDSHAKES`] run for clients whose address is not
    /// validated; beyond that a new client gets a QUIC Retry (stateless: a
    /// spoofed or vanished sender never answers it), and a client that
    /// answered it — proving its address — draws on a pool of its own, of
    /// which one source takes at most [`MAX_HANDSHAKES_PER_SOURCE`] slots.
    async fn handshakes(self: Arc<Self>, peers: tokio::sync::mpsc::Sender<PeerConnection>) {
        let unvalidated = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let validated = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let per_source = SourceSlots::default();
        let mut last_busy_log: Option<std::time::Instant> = None;
        let mut last_source_log: Option<std::time::Instant> = None;
        while let Some(incoming) = self.endpoint.accept().await {
            let remote = incoming.remote_address();
            let source_slot = if incoming.remote_address_validated() {
                let Some(slot) = per_source.try_take(remote) else {
                    if last_source_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(%remote, "{MAX_HANDSHAKES_PER_SOURCE} QUIC handshakes in progress from this source: refusing more");
                        last_source_log = Some(std::time::Instant::now());
                    }
                    incoming.refuse();
                    continue;
                };
                Some(slot)
            } else {
                None
            };
            let pool = if incoming.remote_address_validated() { &validated } else { &unvalidated };
            let Ok(slot) = pool.clone().try_acquire_owned() else {
                if last_busy_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(%remote, "{MAX_HANDSHAKES} QUIC handshakes in progress: new clients must validate their address (Retry)");
                    last_busy_log = Some(std::time::Instant::now());
                }
                if incoming.remote_address_validated() {
                    incoming.refuse();
                } else if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            };
            let (me, peers) = (self.clone(), peers.clone());
            tokio::spawn(async move {
                let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, me.handshake(incoming)).await {
                    Ok(result) => result,
                    Err(_) => Err(Refused {
                        remote,
                        peer: None,
                        reason: TransportError::Timeout("for the QUIC/TLS handshake and Hello"),
                    }),
                };
                drop((slot, source_slot));
                match result {
                    Ok(pc) => {
                        let admitted = {
                            let mut incoming = me.incoming.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            let live = incoming.entry(pc.peer.clone()).or_default();
                            live.retain(|c| c.close_reason().is_none());
                            let admitted = live.len() < MAX_CONNECTIONS_PER_PEER;
                            if admitted {
                                live.push(pc.conn.clone());
                            }
                            admitted
                        };
                        if admitted {
                            watch_liveness(pc.conn.clone());
                            let _ = peers.send(pc).await;
                        } else {
                            tracing::warn!(%remote, peer = %pc.peer, "refused connection: {MAX_CONNECTIONS_PER_PEER} connections from this peer are open already");
                            pc.conn.close(quinn::VarInt::from_u32(3), b"too many connections from this peer");
                        }
                    }
                    Err(Refused { remote, peer: Some(peer), reason }) => {
                        tracing::warn!(%remote, %peer, "refused connection: {reason}");
                    }
                    Err(Refused { remote, peer: None, reason }) => {
                        tracing::warn!(%remote, "refused connection: {reason}");
                    }
                }
            });
        }
    }

    /// The next incoming connection: authenticated and past `Hello`, or
    /// refused (and closed) with the reason. `None` when the endpoint
    /// closes. [`Transport::accept`] is this, logging and skipping refusals.
    pub async fn accept_next(&self) -> Option<Result<PeerConnection, Refused>> {
        let incoming = self.endpoint.accept().await?;
        Some(self.handshake(incoming).await)
    }

    /// One incoming connection's handshake: QUIC and TLS, the certificate's
    /// peer name, Hello.
    async fn handshake(&self, incoming: quinn::Incoming) -> Result<PeerConnection, Refused> {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                let reason = TransportError::Protocol(format!("TLS/QUIC handshake failed: {}", explain_handshake(&e)));
                return Err(Refused { remote, peer: None, reason });
            }
        };
        match peer_name(&conn, &self.peer_names()) {
            Ok(peer) => match self.answer_hello(&conn, &peer).await {
                Ok(()) => Ok(PeerConnection { peer, conn }),
                Err(reason) => {
                    conn.close(quinn::VarInt::from_u32(2), reason.to_string().as_bytes());
                    Err(Refused { remote, peer: Some(peer), reason })
                }
            },
            Err(e) => {
                conn.close(quinn::VarInt::from_u32(1), b"certificate does not name a configured peer");
                Err(Refused { remote, peer: None, reason: TransportError::Tls(e) })
            }
        }
    }

    async fn answer_hello(&self, conn: &quinn::Connection, peer: &str) -> Result<(), TransportError> {
        let (send, recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
            .await
            .map_err(|_| TransportError::Timeout("waiting for Hello"))?
            .map_err(|e| TransportError::Connection(e.to_string()))?;
        let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
        let hello = match tokio::time::timeout(Duration::from_secs(10), recv.expect("Hello")).await {
            Ok(Ok(Body::Hello(h))) => h,
            Ok(Ok(_)) => return Err(TransportError::Protocol("first message was not Hello".into())),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(TransportError::Timeout("waiting for Hello")),
        };
        if hello.node != peer {
            let msg = format!(
                "Hello names node {:?} but the certificate names {peer:?}",
                replicator_protocol::wire::peer_text(&hello.node)
            );
            let _ = send
                .send(Body::HelloReply(pb::HelloReply { version: 0, node: self.node.clone(), error: msg.clone() }))
                .await;
            return Err(TransportError::Protocol(msg));
        }
        match negotiate_version(&self.versions, &hello.versions) {
            Ok(version) => {
                send.send(Body::HelloReply(pb::HelloReply { version, node: self.node.clone(), error: String::new() }))
                    .await?;
                send.finish();
                tracing::info!(
                    %peer,
                    version,
                    software = %replicator_protocol::wire::peer_text(&hello.software),
                    certificate = %crate::tls::peer_certificate_summary(conn),
                    "peer connected"
                );
                Ok(())
            }
            Err(e) => {
                let _ = send
                    .send(Body::HelloReply(pb::HelloReply {
                        version: 0,
                        node: self.node.clone(),
                        error: e.to_string(),
                    }))
                    .await;
                send.finish();
                // Give the reply a moment to leave before the caller closes.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(TransportError::Protocol(e.to_string()))
            }
        }
    }

    /// The connection to `peer`, dialing (and saying Hello) if needed: one
    /// dial per peer at a time, each within [`DIAL_TIMEOUT`] in all.
    pub async fn connect(&self, peer: &str) -> Result<quinn::Connection, TransportError> {
        let dial = {
            let mut dials = self.dials.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(dials.entry(peer.to_string()).or_default())
        };
        let _one = dial.lock().await;
        {
            let mut conns = self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(c) = conns.get(peer) {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
                conns.remove(peer);
            }
        }
        let conn = match tokio::time::timeout(DIAL_TIMEOUT, self.dial(peer)).await {
            Ok(dialed) => dialed?,
            Err(_) => {
                return Err(TransportError::Connect {
                    peer: peer.to_string(),
                    addr: self.peers.get(peer).map_or_else(String::new, ToString::to_string),
                    message: format!("no connection within {DIAL_TIMEOUT:?} (resolve, handshake, Hello)"),
                })
            }
        };
        watch_liveness(conn.clone());
        self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(peer.to_string(), conn.clone());
        Ok(conn)
    }

    /// Dials `peer` and says Hello.
    async fn dial(&self, peer: &str) -> Result<quinn::Connection, TransportError> {
        let address = self.peers.get(peer).ok_or_else(|| TransportError::UnknownPeer(peer.to_string()))?;
        // A DNS name is resolved at each dial, so a changed record is
        // followed without a restart.
        let resolved = match tokio::time::timeout(RESOLVE_TIMEOUT, address.resolve()).await {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) => {
                return Err(TransportError::Connect {
                    peer: peer.to_string(),
                    addr: address.to_string(),
                    message: format!("cannot resolve {:?}: {e}", address.host),
                })
            }
            Err(_) => {
                return Err(TransportError::Connect {
                    peer: peer.to_string(),
                    addr: address.to_string(),
                    message: format!("resolving {:?} took more than {RESOLVE_TIMEOUT:?}", address.host),
                })
            }
        };
        let Some(addr) = pick_address(&resolved, self.endpoint.local_addr().ok()) else {
            return Err(TransportError::Connect {
                peer: peer.to_string(),
                addr: address.to_string(),
                message: format!("{:?} resolves to no address", address.host),
            });
        };
        let shown = if address.host.parse::<std::net::IpAddr>().is_ok() {
            address.to_string()
        } else {
            format!("{address} ({addr})")
        };
        let err = |message: String| TransportError::Connect { peer: peer.to_string(), addr: shown.clone(), message };
        let client = self.client.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let connecting = self.endpoint.connect_with(client, addr, peer).map_err(|e| err(e.to_string()))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| err("handshake timed out".into()))?
            .map_err(|e| err(explain_handshake(&e)))?;
        // rustls checked that the certificate is valid for `peer` (a
        // wildcard would do); the peer must be named exactly, as incoming
        // connections are.
        match peer_name(&conn, &self.peer_names()) {
            Ok(named) if named == peer => {}
            Ok(named) => {
                conn.close(quinn::VarInt::from_u32(1), b"certificate names another peer");
                return Err(err(format!("its certificate names {named:?}, not {peer:?}")));
            }
            Err(e) => {
                conn.close(quinn::VarInt::from_u32(1), b"certificate does not name the peer");
                return Err(err(e.to_string()));
            }
        }
        let (send, recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
        send.send(Body::Hello(pb::Hello {
            versions: self.versions.clone(),
            node: self.node.clone(),
            software: format!("replicator {}", env!("CARGO_PKG_VERSION")),
        }))
        .await?;
        let reply = match tokio::time::timeout(Duration::from_secs(10), recv.expect("HelloReply")).await {
            Ok(Ok(Body::HelloReply(r))) => r,
            Ok(Ok(_)) => return Err(err("peer answered Hello with something else".into())),
            Ok(Err(e)) => return Err(err(e.to_string())),
            Err(_) => return Err(err("no HelloReply within 10s".into())),
        };
        if !reply.error.is_empty() || reply.version == 0 {
            return Err(err(format!("peer refused: {}", replicator_protocol::wire::peer_text(&reply.error))));
        }
        tracing::info!(
            %peer,
            %addr,
            version = reply.version,
            certificate = %crate::tls::peer_certificate_summary(&conn),
            "connected to peer"
        );
        Ok(conn)
    }

    /// Opens a framed bidirectional stream on a connection.
    pub async fn open_stream(conn: &quinn::Connection) -> Result<(FramedSend, FramedRecv), TransportError> {
        let (send, recv) = conn.open_bi().await.map_err(|e| TransportError::Connection(e.to_string()))?;
        Ok((FramedSend::new(send), FramedRecv::new(recv)))
    }

    /// Closes every connection and the endpoint.
    pub async fn close(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Shares the endpoint Arc-style for the accept loop.
    pub fn into_arc(self) -> Arc<Transport> {
        Arc::new(self)
    }
}

/// Socket buffers for replication traffic. The kernel default (about 208
/// KiB) overflows under bursts of records even on loopback, and QUIC reads
/// every drop as congestion. As root the limit `net.core.rmem_max` is
/// bypassed (SO_RCVBUFFORCE); otherwise the kernel caps the request.
const SOCKET_BUFFER: usize = 16 << 20;

fn size_socket_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
}

/// Most packets quinn may hand the kernel in one segmented (GSO) send. The
/// kernel refuses a send of more than 64 KiB in all (`EMSGSIZE`), and quinn
/// drops such a send silently, taking it for an oversized MTU probe: with
/// jumbo packets and quinn's own limit of 10 segments, every burst of 8 or
/// more packets was lost whole, and the congestion controller read that as
/// congestion (the async lag through a 200 Mbit/s link rose from 40 ms to
/// 270-500 ms). Seven jumbo payloads fit in 64 KiB.
const MAX_SEGMENTS_PER_SEND: usize = (u16::MAX as usize - 48) / crate::tls::JUMBO_UDP_PAYLOAD as usize;

/// quinn's runtime, with its drivers (the endpoint's and each
/// connection's: they send and receive the datagrams) run after the tasks
/// that woke them. A group's shipper writing a record to its stream wakes the
/// connection's driver, and tokio runs a task woken by another task next on
/// the same thread (its LIFO slot): the driver sent that one record before
/// the next group's shipper had written anything, one datagram per record
/// however many groups had records ready, and one wake-up of the peer for
/// each. A driver woken by a task other than a driver now yields first
/// (`tokio::task::yield_now`: it runs once its thread has no other task
/// ready, and wakes no other thread), so the records of every task ready at
/// that moment leave together. Wake-ups by the socket, a timer or a driver
/// (quinn's own hand-offs and yields) poll it at once, as before, and so do
/// those of [`FramedSend::flush_now`]: a lone sync write waits for its
/// record's round trip, which this would lengthen by the other tasks' turn
/// (with several sync groups at QD1 on one connection, their records then
/// leave one datagram each).
#[derive(Debug)]
struct DriverLast {
    inner: Arc<dyn quinn::Runtime>,
}

impl quinn::Runtime for DriverLast {
    fn new_timer(&self, i: std::time::Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        self.inner.new_timer(i)
    }

    fn spawn(&self, future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        let wakes = Arc::new(DriverWakes::default());
        self.inner.spawn(Box::pin(YieldToWakers {
            inner: future,
            waker: std::task::Waker::from(wakes.clone()),
            wakes,
            yielding: None,
        }));
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        self.inner.wrap_udp_socket(t)
    }

    fn now(&self) -> std::time::Instant {
        self.inner.now()
    }
}

thread_local! {
    /// Whether this thread is polling a QUIC driver or flushing a stream
    /// with [`FramedSend::flush_now`]: the wakes of a driver it makes are
    /// not deferred.
    static POLLING_DRIVER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `poll` with this thread marked as [`POLLING_DRIVER`]; the mark it
/// had is restored when `poll` returns (or panics).
fn as_driver<R>(poll: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            POLLING_DRIVER.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(POLLING_DRIVER.with(|p| p.replace(true)));
    poll()
}

/// The waker a driver sees: it notes whether a task (not a driver) woke the
/// driver, and wakes the driver's own task.
#[derive(Default)]
struct DriverWakes {
    task: futures_util::task::AtomicWaker,
    by_task: std::sync::atomic::AtomicBool,
}

impl std::task::Wake for DriverWakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if tokio::task::try_id().is_some() && !POLLING_DRIVER.with(std::cell::Cell::get) {
            self.by_task.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.task.wake();
    }
}

/// A driver's future: woken by a task, it first yields to the tasks ready on
/// its thread, then polls the driver.
struct YieldToWakers {
    inner: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    waker: std::task::Waker,
    wakes: Arc<DriverWakes>,
    /// The `yield_now` under way.
    yielding: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl std::future::Future for YieldToWakers {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = &mut *self;
        this.wakes.task.register(cx.waker());
        if this.yielding.is_none() && this.wakes.by_task.swap(false, std::sync::atomic::Ordering::Relaxed) {
            this.yielding = Some(Box::pin(tokio::task::yield_now()));
        }
        if let Some(yielding) = this.yielding.as_mut() {
            if yielding.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            this.yielding = None;
        }
        as_driver(|| this.inner.as_mut().poll(&mut std::task::Context::from_waker(&this.waker)))
    }
}

/// Wraps the endpoint's UDP socket to log datagrams that cannot be QUIC
/// (plaintext clients, port scanners, a misconfigured peer): quinn drops them
/// silently, and an admin deserves a line saying why nothing connects
/// (limited to one line per second). It also bounds segmented sends to
/// [`MAX_SEGMENTS_PER_SEND`] packets.
#[derive(Debug)]
struct InspectingSocket {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    last_log: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Why a datagram cannot be a QUIC v1 packet for this endpoint, if so.
fn not_quic(datagram: &[u8]) -> Option<&'static str> {
    let first = *datagram.first()?;
    if first & 0x80 != 0 {
        if datagram.len() < 5 {
            return Some("truncated long header");
        }
        let version = u32::from_be_bytes([datagram[1], datagram[2], datagram[3], datagram[4]]);
        if version == 0 {
            return None; // version negotiation
        }
        if first & 0x40 == 0 {
            return Some("fixed bit clear");
        }
        if version != 1 {
            return Some("unsupported QUIC version");
        }
        if (first & 0x30) >> 4 == 0 && datagram.len() < 1200 {
            return Some("Initial packet shorter than 1200 bytes");
        }
        None
    } else if first & 0x40 == 0 {
        Some("fixed bit clear")
    } else if datagram.len() < 26 {
        Some("too short for a short-header packet")
    } else {
        None
    }
}

impl quinn::AsyncUdpSocket for InspectingSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            for (buf, m) in bufs.iter().zip(meta.iter()).take(*n) {
                let len = m.len.min(m.stride.max(1)).min(buf.len());
                if let Some(why) = not_quic(&buf[..len]) {
                    let mut last = self.last_log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        *last = Some(std::time::Instant::now());
                        tracing::warn!(
                            remote = %m.addr,
                            bytes = m.len,
                            "dropped a datagram that is not a QUIC packet ({why}): replicator speaks only QUIC with mutual TLS, there is no plaintext mode"
                        );
                    }
                }
            }
        }
        polled
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().clamp(1, MAX_SEGMENTS_PER_SEND)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A failed QUIC/TLS handshake, with what to check where the error names a
/// certificate the other side does not trust (rustls' words alone, e.g.
/// "invalid peer certificate: BadSignature", do not say which file).
fn explain_handshake(e: &quinn::ConnectionError) -> String {
    let text = e.to_string();
    let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "the peer's certificate is not issued by the CA in this node's tls.ca: both sites need certificates from \
         one CA (`replicator cert issue` with the same --ca-dir)"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "the peer's certificate names another node than its [[peer]] name here"
    } else if text.contains("Expired") || text.contains("NotValidYet") {
        "a certificate is outside its validity period (check both sites' clocks and notAfter)"
    } else {
        return text;
    };
    format!("{text} ({hint})")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::{
        not_quic, FramedRecv, FramedSend, InspectingSocket, SourceSlots, MAX_HANDSHAKES_PER_SOURCE,
        MAX_SEGMENTS_PER_SEND,
    };
    use crate::certs::{init_ca, issue, Validity};
    use crate::config::TlsPaths;
    use crate::tls::{TlsIdentity, JUMBO_UDP_PAYLOAD};
    use quinn::AsyncUdpSocket;
    use replicator_protocol::pb::{self, envelope::Body};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Two QUIC connections' ends on loopback (site-a dialed site-b), with
    /// mutual TLS from a CA made for the test (`dir` holds the
    /// certificates).
    pub(crate) async fn connection_pair(dir: &std::path::Path) -> (quinn::Connection, quinn::Connection) {
        init_ca(&dir.join("ca")).unwrap();
        let identity = |name: &str| {
            issue(&dir.join("ca"), name, dir, Validity::days(1)).unwrap();
            let paths = TlsPaths {
                ca: dir.join("ca/ca.pem"),
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}.key")),
            };
            TlsIdentity::load(&paths, name).unwrap()
        };
        let (a, b) = (identity("site-a"), identity("site-b"));
        let server = quinn::Endpoint::server(b.server_config(4).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(a.client_config(4).unwrap());
        let addr = server.local_addr().unwrap();
        tokio::join!(async { client.connect(addr, "site-b").unwrap().await.unwrap() }, async {
            server.accept().await.unwrap().await.unwrap()
        })
    }

    /// A framed stream between two QUIC endpoints on loopback.
    async fn stream_pair(dir: &std::path::Path) -> ((FramedSend, FramedRecv), (FramedSend, FramedRecv)) {
        let (dialed, accepted) = connection_pair(dir).await;
        let (send, recv) = dialed.open_bi().await.unwrap();
        let mut opener = (FramedSend::new(send), FramedRecv::new(recv));
        // A stream is announced to the peer by its first bytes.
        opener.0.send(Body::Command(pb::GroupCommand::default())).await.unwrap();
        opener.0.flush().await.unwrap();
        let (send, recv) = accepted.accept_bi().await.unwrap();
        let mut acceptor = (FramedSend::new(send), FramedRecv::new(recv));
        acceptor.1.recv().await.unwrap().unwrap();
        (opener, acceptor)
    }

    /// Reading a stream whose frames have all arrived never waits, and quinn
    /// is outside tokio's cooperative budget: the reader yields anyway, so
    /// that the other tasks of its thread run (a secondary's applier that
    /// did not starved the io_uring reaper beside it: its volume writes
    /// stopped completing under a steady stream of records).
    #[tokio::test]
    async fn a_reader_of_a_stream_that_is_never_empty_lets_other_tasks_run() {
        let dir = tempfile::tempdir().unwrap();
        let ((mut send, _), (_, mut recv)) = stream_pair(dir.path()).await;
        const FRAMES: usize = 2000;
        for _ in 0..FRAMES {
            send.send(Body::Command(pb::GroupCommand::default())).await.unwrap();
        }
        send.flush().await.unwrap();
        // Every frame arrives in the receiver's stream buffer meanwhile.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let ran = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
        let mut ran_after = None;
        for i in 0..FRAMES {
            recv.recv().await.unwrap().unwrap();
            if ran_after.is_none() && ran.load(Ordering::SeqCst) {
                ran_after = Some(i);
            }
        }
        let ran_after = ran_after.expect("the other task never ran while the stream was read");
        assert!(ran_after < FRAMES / 2, "the other task ran only after {ran_after} frames");
    }

    /// The largest segmented send quinn may build with jumbo packets reaches
    /// the peer whole: every packet arrives, at its full size.
    #[tokio::test]
    async fn a_full_segmented_send_of_jumbo_packets_arrives() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let runtime = quinn::default_runtime().unwrap();
        let inner = runtime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let socket = Arc::new(InspectingSocket { inner, last_log: std::sync::Mutex::new(None) });
        let segments = socket.max_transmit_segments();
        assert!((1..=MAX_SEGMENTS_PER_SEND).contains(&segments), "{segments} segments");
        let size = usize::from(JUMBO_UDP_PAYLOAD);
        let contents: Vec<u8> = (0..segments * size).map(|i| (i / size) as u8).collect();
        let transmit = quinn::udp::Transmit {
            destination: receiver.local_addr().unwrap(),
            ecn: None,
            contents: &contents,
            segment_size: (segments > 1).then_some(size),
            src_ip: None,
        };
        let mut poller = socket.clone().create_io_poller();
        loop {
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await.unwrap();
            match socket.try_send(&transmit) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                sent => break sent.unwrap(),
            }
        }
        let mut buf = vec![0u8; 65536];
        for i in 0..segments {
            let n = receiver.recv(&mut buf).unwrap();
            assert_eq!(n, size, "packet {i}");
            assert!(buf[..n].iter().all(|&b| b == i as u8), "packet {i}");
        }
    }

    #[test]
    fn recognises_non_quic_datagrams() {
        assert!(not_quic(b"hello, plaintext").is_some());
        assert!(not_quic(&[0x00; 40]).is_some());
        let mut initial = vec![0xc0, 0, 0, 0, 1];
        initial.resize(1200, 0);
        assert_eq!(not_quic(&initial), None);
        initial.truncate(300);
        assert!(not_quic(&initial).is_some());
        assert_eq!(not_quic(&[0x40; 40]), None);
    }

    #[test]
    fn one_source_takes_at_most_its_share_of_the_handshake_slots() {
        let slots = SourceSlots::default();
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let held: Vec<_> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|i| slots.try_take(addr(&format!("192.0.2.1:{}", 1000 + i))).unwrap())
            .collect();
        // Another port of the same address, the same address mapped into
        // IPv6: the same source.
        assert!(slots.try_take(addr("192.0.2.1:9")).is_none());
        assert!(slots.try_take(addr("[::ffff:192.0.2.1]:9")).is_none());
        // Another client still gets one.
        let other = slots.try_take(addr("192.0.2.2:9")).unwrap();
        // An IPv6 /64 is one source.
        let v6: Vec<_> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|i| slots.try_take(addr(&format!("[2001:db8:0:1::{:x}]:7800", i + 1))).unwrap())
            .collect();
        assert!(slots.try_take(addr("[2001:db8:0:1:ffff::9]:7800")).is_none());
        assert!(slots.try_take(addr("[2001:db8:0:2::1]:7800")).is_some());
        // Finished handshakes give their slots back.
        drop(held);
        assert!(slots.try_take(addr("192.0.2.1:9")).is_some());
        drop((other, v6));
        assert!(slots.0.lock().unwrap().is_empty(), "no count is left once every slot is back");
    }
}
