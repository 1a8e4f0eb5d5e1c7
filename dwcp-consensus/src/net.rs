//! Peer transport over TCP: one outgoing connection per peer (a thread with a bounded
//! queue; a full queue drops, raft retries), one reader thread per incoming connection.
//!
//! # Mutual TLS
//!
//! With credentials ([`TcpTransport::start`]'s `tls`, libvirt's layout loaded by
//! [`dwcp_core::tls::CredentialStore`]), every connection is TLS 1.3 with mutual
//! authentication before the first frame: the connecting side verifies the listener's
//! `server-cert.pem` against `ca-cert.pem` and the host part of the peer's address (a
//! DNS or IP SAN), and presents `client-cert.pem`; the listening side requires a client
//! certificate issued by `ca-cert.pem`. The handshake is bounded by
//! [`HANDSHAKE_TIMEOUT`] and the number of incoming connections by [`MAX_INCOMING`]; a
//! refused peer is logged with its address and the reason, counted in
//! [`NetStats::tls_refused`], and no byte of it reaches the frame parser. The frames then
//! run inside TLS, unchanged, cluster-id check included. Without credentials (the
//! agent's `--insecure`) the frames are sent in clear text.
//!
//! # Per-member identity
//!
//! A member's identity is the host part of its raft address ([`peer_host`] of the
//! `HOST:PORT` in `--peers` or given to `add_node`). Both directions check it:
//!
//! - dialling member N, the listener's server certificate must name N's host (it is the
//!   TLS server name, so rustls checks it against the certificate's DNS/IP SANs);
//! - an incoming connection belongs to the member its first frame comes from (raft's
//!   `from`): that member's host must be named by the client certificate (an IP SAN for
//!   an IP address; the CN or a DNS SAN for a name: [`PeerIdentity::names_host`]), and
//!   every later frame on the connection must come from the same member. A frame from a
//!   member whose address this node does not know, or whose host the certificate does
//!   not name, closes the connection before raft sees it; the refusal is logged
//!   (`refused raft peer connection`, with the member, its host and the certificate's
//!   names) and counted in [`NetStats::tls_refused`].
//!
//! So a certificate of the cluster's CA only lets its holder speak as the members on the
//! hosts it names. Clear text (`--insecure`) checks only the cluster id.
//!
//! Frame (little-endian):
//!
//! ```text
//! magic "DWRF" | version u16 = 1 | kind u16 = 1 (raft message) | cluster id u64 |
//! len u32 | payload[len] (protobuf eraftpb.Message) | crc32c u32 (header + payload)
//! ```
//!
//! A frame with a bad magic, unknown version or kind, another cluster's id, a length above
//! the cap, a bad CRC or an unparsable payload is rejected with a logged reason, counted in
//! [`NetStats`], and never stepped into raft. Framing errors close the connection; a
//! well-framed message addressed to another node is dropped and the connection kept.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};
use dwcp_core::tls::{
    client_handshake, server_handshake, CredentialStore, PeerIdentity, TlsReader,
};
use parking_lot::Mutex;
use prost::Message as _;
use raft::prelude::Message;

use crate::node::{Mailbox, Transport};
use crate::registry::HostId;

/// First bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"DWRF";
/// Frame format version.
pub const FRAME_VERSION: u16 = 1;
/// Frame kind: one raft message.
pub const KIND_RAFT: u16 = 1;
/// Bytes before the payload.
pub const FRAME_HEADER: usize = 20;
/// Default cap on a frame's payload.
pub const DEFAULT_MAX_FRAME: u32 = 64 << 20;
const QUEUE: usize = 8192;
/// Longest a TLS handshake may wait for the peer (each direction).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const TLS_RETRY_MIN: Duration = Duration::from_millis(50);
const TLS_RETRY_MAX: Duration = Duration::from_secs(1);
/// Incoming connections served at once (handshaking or reading); more are closed.
pub const MAX_INCOMING: usize = 64;

/// Why an incoming frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// Reading failed (including a connection cut inside a frame).
    #[error("reading frame: {0}")]
    Io(#[from] io::Error),
    /// Not our magic.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// Unsupported version.
    #[error("unsupported frame version {0}")]
    Version(u16),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u16),
    /// Sent by a member of another cluster.
    #[error("wrong cluster id {got:#x} (this cluster is {expected:#x})")]
    WrongCluster {
        /// Ours.
        expected: u64,
        /// Theirs.
        got: u64,
    },
    /// Declared payload above the cap.
    #[error("frame of {len} bytes exceeds the {max} byte cap")]
    Oversized {
        /// Declared.
        len: u32,
        /// Cap.
        max: u32,
    },
    /// Checksum mismatch.
    #[error("frame checksum mismatch")]
    BadCrc,
    /// Payload is not a raft message.
    #[error("payload is not a raft message: {0}")]
    Decode(String),
    /// A message for another node.
    #[error("message for node {to} arrived at node {me}")]
    WrongNode {
        /// Addressee.
        to: u64,
        /// This node.
        me: u64,
    },
}

impl FrameError {
    /// Whether the stream can no longer be trusted to be at a frame boundary.
    fn closes_connection(&self) -> bool {
        !matches!(self, FrameError::Decode(_) | FrameError::WrongNode { .. })
    }
}

/// Encodes one raft message as a frame, appended to `out`.
pub fn encode_frame(cluster_id: u64, msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    let payload = msg.encode_to_vec();
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&FRAME_VERSION.to_le_bytes());
    out.extend_from_slice(&KIND_RAFT.to_le_bytes());
    out.extend_from_slice(&cluster_id.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Reads and checks one frame. Nothing is allocated for the payload before its length
/// has been checked against `max`.
pub fn read_frame(r: &mut impl Read, cluster_id: u64, max: u32) -> Result<Message, FrameError> {
    let mut head = [0u8; FRAME_HEADER];
    // Distinguish a clean close between frames from a cut inside one.
    let n = loop {
        match r.read(&mut head[..1]) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A TLS peer that went away between frames without close_notify.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break 0,
            Err(e) => return Err(e.into()),
        }
    };
    if n == 0 {
        return Err(FrameError::Closed);
    }
    r.read_exact(&mut head[1..])?;
    let magic: [u8; 4] = head[0..4].try_into().unwrap_or_default();
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([head[4], head[5]]);
    if version != FRAME_VERSION {
        return Err(FrameError::Version(version));
    }
    let kind = u16::from_le_bytes([head[6], head[7]]);
    if kind != KIND_RAFT {
        return Err(FrameError::Kind(kind));
    }
    let got = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    if got != cluster_id {
        return Err(FrameError::WrongCluster {
            expected: cluster_id,
            got,
        });
    }
    let len = u32::from_le_bytes(head[16..20].try_into().unwrap_or_default());
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    let mut payload = vec![0u8; len as usize + 4];
    r.read_exact(&mut payload)?;
    let (payload, crc) = payload.split_at(len as usize);
    let want = u32::from_le_bytes(crc.try_into().unwrap_or_default());
    if crc32c::crc32c_append(crc32c::crc32c(&head), payload) != want {
        return Err(FrameError::BadCrc);
    }
    Message::decode(payload).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Counters of a transport.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames accepted and handed to raft.
    pub delivered: AtomicU64,
    /// Frames refused.
    pub rejected: AtomicU64,
    /// Messages dropped on send (queue full, peer unreachable).
    pub send_dropped: AtomicU64,
    /// Incoming connections refused before any frame reached raft: TLS handshake
    /// failed (no certificate, another CA, not TLS, timeout), too many connections, or
    /// the certificate does not name the host of the member the frames come from.
    pub tls_refused: AtomicU64,
    /// The latest refusal's reason (a frame's, or a connection's with its peer).
    pub last_rejection: Mutex<Option<String>>,
}

struct PeerLink {
    addr: String,
    tx: Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

struct Inner {
    id: HostId,
    cluster_id: u64,
    max_frame: u32,
    local: SocketAddr,
    stop: AtomicBool,
    peers: Mutex<HashMap<HostId, PeerLink>>,
    conns: Mutex<Vec<TcpStream>>,
    accept: Mutex<Option<JoinHandle<()>>>,
    stats: NetStats,
    /// None: clear text (`--insecure`).
    tls: Option<Arc<CredentialStore>>,
    incoming: AtomicUsize,
}

/// TCP peer transport of one node. Cloning shares it; [`TcpTransport::shutdown`] stops it.
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("id", &self.inner.id)
            .field("local", &self.inner.local)
            .finish()
    }
}

impl TcpTransport {
    /// Serves `listener`, delivering accepted messages for node `id` of cluster
    /// `cluster_id` to `mailbox`. With `tls`, every connection in both directions is
    /// mutual TLS 1.3 against the store's credentials (taken per connection, so a
    /// reload applies to the next one); `None` is clear text.
    pub fn start(
        id: HostId,
        cluster_id: u64,
        listener: TcpListener,
        mailbox: Mailbox,
        max_frame: u32,
        tls: Option<Arc<CredentialStore>>,
    ) -> io::Result<TcpTransport> {
        let local = listener.local_addr()?;
        let inner = Arc::new(Inner {
            id,
            cluster_id,
            max_frame,
            local,
            stop: AtomicBool::new(false),
            peers: Mutex::new(HashMap::new()),
            conns: Mutex::new(Vec::new()),
            accept: Mutex::new(None),
            stats: NetStats::default(),
            tls,
            incoming: AtomicUsize::new(0),
        });
        let acc = inner.clone();
        let handle = std::thread::Builder::new()
            .name(format!("raft-accept-{id}"))
            .spawn(move || accept_loop(acc, listener, mailbox))?;
        *inner.accept.lock() = Some(handle);
        Ok(TcpTransport { inner })
    }

    /// The address this transport listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local
    }

    /// Counters.
    pub fn stats(&self) -> &NetStats {
        &self.inner.stats
    }

    /// Whether peer connections use mutual TLS.
    pub fn is_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    /// Known peers and their addresses.
    pub fn peers(&self) -> Vec<(HostId, String)> {
        let mut v: Vec<_> = self
            .inner
            .peers
            .lock()
            .iter()
            .map(|(id, l)| (*id, l.addr.clone()))
            .collect();
        v.sort();
        v
    }

    /// Stops accepting, closes connections, joins the threads.
    pub fn shutdown(&self) {
        if self.inner.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // The accept loop polls `stop` (a wake-up connection would have to
        // come from the listener's network namespace, which may not be ours).
        if let Some(h) = self.inner.accept.lock().take() {
            let _ = h.join();
        }
        for c in self.inner.conns.lock().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        let links: Vec<PeerLink> = self.inner.peers.lock().drain().map(|(_, l)| l).collect();
        for mut l in links {
            drop(l.tx);
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn accept_loop(inner: Arc<Inner>, listener: TcpListener, mailbox: Mailbox) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(node = inner.id, "raft listener: {e}");
        return;
    }
    loop {
        if inner.stop.load(Ordering::SeqCst) {
            break;
        }
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if conn.set_nonblocking(false).is_err() {
            continue;
        }
        let _ = conn.set_nodelay(true);
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        if inner.incoming.fetch_add(1, Ordering::SeqCst) >= MAX_INCOMING {
            inner.incoming.fetch_sub(1, Ordering::SeqCst);
            inner.refuse(&peer, &format!("more than {MAX_INCOMING} peer connections"));
            let _ = conn.shutdown(Shutdown::Both);
            continue;
        }
        if let Ok(c) = conn.try_clone() {
            let mut conns = inner.conns.lock();
            conns.retain(|c| c.peer_addr().is_ok());
            conns.push(c);
        }
        let inner = inner.clone();
        let mailbox = mailbox.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("raft-read-{}", inner.id))
            .spawn(move || {
                serve_incoming(&inner, conn, &peer, &mailbox);
                inner.incoming.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::error!("raft: cannot spawn a reader thread");
        }
    }
}

impl Inner {
    /// A connection refused before any frame: logged with the peer and the reason.
    fn refuse(&self, peer: &str, reason: &str) {
        tracing::warn!(node = self.id, peer, reason, "refused raft peer connection");
        self.stats.tls_refused.fetch_add(1, Ordering::Relaxed);
        *self.stats.last_rejection.lock() = Some(format!("peer {peer}: {reason}"));
    }

    /// Whether a frame from member `from` may arrive on a connection whose client
    /// certificate is `id`: that member's raft address must be known and its host named
    /// by the certificate. The error is the reason, for [`Inner::refuse`].
    fn check_member(&self, from: HostId, id: &PeerIdentity) -> Result<(), String> {
        let addr = self.peers.lock().get(&from).map(|l| l.addr.clone());
        let Some(addr) = addr else {
            return Err(if from == self.id {
                format!("frames claim to come from this node ({from}); certificate {id}")
            } else {
                format!(
                    "frames claim to come from member {from}, whose raft address this node \
                     does not know (not in --peers, not added), so certificate {id} cannot be \
                     checked against it"
                )
            });
        };
        let host = peer_host(&addr);
        if id.names_host(host) {
            Ok(())
        } else {
            Err(format!(
                "certificate {id} does not name member {from}'s host {host} (its raft address \
                 {addr}): a certificate of this CA for another host cannot speak for member \
                 {from}"
            ))
        }
    }
}

/// The TLS handshake (when configured), then the frames.
fn serve_incoming(inner: &Inner, conn: TcpStream, peer: &str, mailbox: &Mailbox) {
    let Some(store) = inner.tls.as_ref() else {
        read_loop(inner, conn, peer, mailbox, None);
        return;
    };
    if let Err(e) = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT)) {
        inner.refuse(peer, &e.to_string());
        return;
    }
    let _ = conn.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let link = match server_handshake(conn, store.server_config()) {
        Ok(l) => l,
        Err(e) => {
            if !inner.stop.load(Ordering::SeqCst) {
                inner.refuse(peer, &e.to_string());
            }
            return;
        }
    };
    // Frames may be far apart (an idle follower): no read timeout from here on.
    let _ = link.tcp().set_read_timeout(None);
    let _ = link.tcp().set_write_timeout(None);
    let Some(identity) = link.peer_identity() else {
        inner.refuse(peer, "no readable client certificate");
        let _ = link.tcp().shutdown(Shutdown::Both);
        return;
    };
    tracing::debug!(
        node = inner.id,
        peer,
        identity = %identity,
        "raft peer authenticated"
    );
    let (reader, _writer) = link.split();
    read_loop(inner, reader, peer, mailbox, Some(&identity));
}

/// Reads frames until the connection ends. With `identity` (TLS), the first frame's
/// sender must be a member whose host the certificate names, and every later frame must
/// come from that member; otherwise the connection is refused and closed before the
/// frame reaches raft.
fn read_loop(
    inner: &Inner,
    conn: impl ReadConn,
    peer: &str,
    mailbox: &Mailbox,
    identity: Option<&PeerIdentity>,
) {
    let mut r = BufReader::with_capacity(256 << 10, conn);
    // The member this connection speaks for, once its first frame is checked.
    let mut member: Option<HostId> = None;
    loop {
        let res = read_frame(&mut r, inner.cluster_id, inner.max_frame).and_then(|m| {
            if m.to != inner.id {
                Err(FrameError::WrongNode {
                    to: m.to,
                    me: inner.id,
                })
            } else {
                Ok(m)
            }
        });
        match res {
            Ok(msg) => {
                if let Some(id) = identity {
                    let checked = match member {
                        Some(m) if m == msg.from => Ok(()),
                        Some(m) => Err(format!(
                            "a frame from member {} on the connection of member {m} \
                             (certificate {id})",
                            msg.from
                        )),
                        None => inner.check_member(msg.from, id),
                    };
                    if let Err(reason) = checked {
                        inner.refuse(peer, &reason);
                        r.get_ref().close();
                        return;
                    }
                    member = Some(msg.from);
                }
                inner.stats.delivered.fetch_add(1, Ordering::Relaxed);
                if !mailbox.deliver(msg) {
                    return;
                }
            }
            Err(FrameError::Closed) => return,
            Err(FrameError::Io(_)) if inner.stop.load(Ordering::SeqCst) => return,
            Err(e) => {
                tracing::warn!(node = inner.id, peer, reason = %e, "rejected peer frame");
                inner.stats.rejected.fetch_add(1, Ordering::Relaxed);
                *inner.stats.last_rejection.lock() = Some(e.to_string());
                if e.closes_connection() {
                    r.get_ref().close();
                    return;
                }
            }
        }
    }
}

/// What [`read_loop`] reads frames from: a plain socket or the TLS reader half.
trait ReadConn: Read {
    /// Drops the connection (a framing error).
    fn close(&self);
}

impl ReadConn for TcpStream {
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl ReadConn for TlsReader {
    fn close(&self) {
        let _ = self.tcp().shutdown(Shutdown::Both);
    }
}

fn send_loop(
    inner: Arc<Inner>,
    to: HostId,
    addr: String,
    rx: crossbeam_channel::Receiver<Message>,
) {
    let mut conn: Option<Box<dyn Write + Send>> = None;
    // The last connection failure logged, so a peer that stays down (or keeps
    // refusing us) is logged once per new reason, not per heartbeat.
    let mut last_failure: Option<String> = None;
    // TLS only: after a refused handshake, or a connection the peer dropped soon
    // after it (TLS 1.3: it checks our certificate after our side is done), wait
    // before dialing again, doubling up to TLS_RETRY_MAX, so a member that
    // refuses us is not asked (and does not log) at every heartbeat.
    let mut retry_at = Instant::now();
    let mut backoff = TLS_RETRY_MIN;
    let mut connected_at = Instant::now();
    let mut buf = Vec::with_capacity(64 << 10);
    while let Ok(first) = rx.recv() {
        buf.clear();
        encode_frame(inner.cluster_id, &first, &mut buf);
        let mut n = 1u64;
        while let Ok(m) = rx.try_recv() {
            encode_frame(inner.cluster_id, &m, &mut buf);
            n += 1;
            if buf.len() > (4 << 20) {
                break;
            }
        }
        if conn.is_none() && Instant::now() >= retry_at {
            match connect(&addr, inner.tls.as_deref()) {
                Ok(c) => {
                    connected_at = Instant::now();
                    if last_failure.take().is_some() {
                        tracing::info!(node = inner.id, to, addr, "raft peer reachable again");
                    }
                    conn = Some(c);
                }
                Err(reason) => {
                    if reason.starts_with("TLS") {
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(TLS_RETRY_MAX);
                    }
                    if last_failure.as_deref() != Some(reason.as_str()) {
                        if reason.starts_with("TLS") {
                            tracing::warn!(
                                node = inner.id,
                                to,
                                addr,
                                reason,
                                "cannot connect to raft peer"
                            );
                        } else {
                            tracing::debug!(
                                node = inner.id,
                                to,
                                addr,
                                reason,
                                "cannot connect to raft peer"
                            );
                        }
                        last_failure = Some(reason);
                    }
                }
            }
        }
        let Some(c) = conn.as_mut() else {
            inner.stats.send_dropped.fetch_add(n, Ordering::Relaxed);
            tracing::trace!(
                node = inner.id,
                to,
                addr,
                "peer unreachable, messages dropped"
            );
            continue;
        };
        if let Err(e) = c.write_all(&buf) {
            tracing::debug!(node = inner.id, to, error = %e, "peer write failed, reconnecting");
            inner.stats.send_dropped.fetch_add(n, Ordering::Relaxed);
            conn = None;
            if inner.tls.is_some() {
                if connected_at.elapsed() < TLS_RETRY_MAX {
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(TLS_RETRY_MAX);
                } else {
                    backoff = TLS_RETRY_MIN;
                }
            }
        }
    }
}

/// Connects to `addr` (`HOST:PORT`), with the TLS handshake when `tls` is set; the
/// error says why, TLS failures starting with "TLS".
fn connect(addr: &str, tls: Option<&CredentialStore>) -> Result<Box<dyn Write + Send>, String> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving: {e}"))?
        .next()
        .ok_or_else(|| "resolves to no address".to_string())?;
    let c = TcpStream::connect_timeout(&sa, Duration::from_millis(300))
        .map_err(|e| format!("connecting: {e}"))?;
    let _ = c.set_nodelay(true);
    let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
    let Some(store) = tls else {
        return Ok(Box::new(c));
    };
    let _ = c.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    // The member's identity is its address's host: the certificate must name it.
    let link =
        client_handshake(c, store.client_config(), peer_host(addr)).map_err(|e| e.to_string())?;
    // Nothing is read on this side after the handshake (the peer never writes).
    let _ = link.tcp().set_read_timeout(None);
    Ok(Box::new(link.writer()))
}

/// A member's identity: the host part of its raft address `HOST:PORT` (brackets of an
/// IPv6 literal removed), the name its certificates must carry (the server name when it
/// is dialled; a name of its client certificate when it connects).
pub fn peer_host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

impl Transport for TcpTransport {
    fn send(&self, msgs: Vec<Message>) {
        let peers = self.inner.peers.lock();
        for m in msgs {
            match peers.get(&m.to) {
                Some(l) => match l.tx.try_send(m) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                        self.inner
                            .stats
                            .send_dropped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                },
                None => {
                    tracing::debug!(
                        node = self.inner.id,
                        to = m.to,
                        "no address for peer, message dropped"
                    );
                    self.inner
                        .stats
                        .send_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn add_peer(&self, id: HostId, addr: &str) {
        if id == self.inner.id || self.inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut peers = self.inner.peers.lock();
        if peers.get(&id).is_some_and(|l| l.addr == addr) {
            return;
        }
        let (tx, rx) = bounded(QUEUE);
        let inner = self.inner.clone();
        let a = addr.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("raft-send-{}-{id}", self.inner.id))
            .spawn(move || send_loop(inner, id, a, rx))
            .ok();
        // Replacing a link drops its sender, which ends its thread.
        peers.insert(
            id,
            PeerLink {
                addr: addr.to_owned(),
                tx,
                thread,
            },
        );
    }

    fn remove_peer(&self, id: HostId) {
        let link = self.inner.peers.lock().remove(&id);
        drop(link);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_core::tls::testca::{LeafSpec, TestCa, Usage};
    use raft::prelude::MessageType;
    use std::path::Path;

    fn msg(to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.to = to;
        m.from = 2;
        m.term = 5;
        m
    }

    #[test]
    fn frame_round_trip() {
        let mut buf = Vec::new();
        encode_frame(7, &msg(1), &mut buf);
        encode_frame(7, &msg(3), &mut buf);
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 7, 1024).unwrap().to, 1);
        assert_eq!(read_frame(&mut r, 7, 1024).unwrap().to, 3);
        assert!(matches!(
            read_frame(&mut r, 7, 1024),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn bad_frames_rejected() {
        let mut good = Vec::new();
        encode_frame(7, &msg(1), &mut good);

        let wrong_cluster = read_frame(&mut &good[..], 8, 1024);
        assert!(matches!(
            wrong_cluster,
            Err(FrameError::WrongCluster {
                expected: 8,
                got: 7
            })
        ));

        let mut bad_crc = good.clone();
        let last = bad_crc.len() - 6;
        bad_crc[last] ^= 0xff;
        assert!(matches!(
            read_frame(&mut &bad_crc[..], 7, 1024),
            Err(FrameError::BadCrc)
        ));

        let mut huge = good.clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &huge[..], 7, 1024),
            Err(FrameError::Oversized { len: u32::MAX, .. })
        ));

        let garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(
            read_frame(&mut &garbage[..], 7, 1024),
            Err(FrameError::BadMagic(_))
        ));

        let mut version = good.clone();
        version[4] = 9;
        assert!(matches!(
            read_frame(&mut &version[..], 7, 1024),
            Err(FrameError::Version(9))
        ));

        // Valid frame, CRC right, payload not protobuf.
        let mut junk = Vec::new();
        junk.extend_from_slice(&FRAME_MAGIC);
        junk.extend_from_slice(&FRAME_VERSION.to_le_bytes());
        junk.extend_from_slice(&KIND_RAFT.to_le_bytes());
        junk.extend_from_slice(&7u64.to_le_bytes());
        let payload = [0xffu8; 16];
        junk.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        junk.extend_from_slice(&payload);
        let crc = crc32c::crc32c(&junk);
        junk.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &junk[..], 7, 1024),
            Err(FrameError::Decode(_))
        ));

        let cut = &good[..good.len() - 3];
        assert!(matches!(
            read_frame(&mut &cut[..], 7, 1024),
            Err(FrameError::Io(_))
        ));
    }

    /// A member's credentials from `ca`: server and client certificates naming
    /// only `hosts` (CN `hosts[0]`).
    fn member_pki(ca: &TestCa, dir: &Path, hosts: &[&str]) -> Arc<CredentialStore> {
        let server = ca
            .issue(&LeafSpec::new(hosts[0], hosts, Usage::Server))
            .unwrap();
        let client = ca
            .issue(&LeafSpec::new(hosts[0], hosts, Usage::Client))
            .unwrap();
        ca.write_layout(dir, &server, &client).unwrap();
        Arc::new(CredentialStore::load(dir).unwrap())
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < end, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn heartbeat(from: u64, to: u64) -> Message {
        let mut m = msg(to);
        m.from = from;
        m
    }

    /// Node 1 at 127.0.0.1 knows member 2 at 127.0.0.2 and member 3 at
    /// 127.0.0.3. A connection presenting a certificate of the cluster's CA
    /// speaks only for the members on the hosts it names, and only for the
    /// first one it speaks for: every other frame closes it before raft.
    #[test]
    fn incoming_frames_must_come_from_the_member_the_certificate_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("raft identity CA").unwrap();
        let one = member_pki(&ca, &dir.path().join("1"), &["127.0.0.1"]);
        let two = member_pki(&ca, &dir.path().join("2"), &["127.0.0.2"]);
        let other = member_pki(&ca, &dir.path().join("x"), &["intruder.example"]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mb, _inbox) = crate::node::mailbox();
        let t = TcpTransport::start(1, 7, l, mb, 1 << 20, Some(one)).unwrap();
        // Nothing listens there: the send side never connects, which is fine.
        t.add_peer(2, "127.0.0.2:9");
        t.add_peer(3, "127.0.0.3:9");
        let stats = t.stats();
        // Sends `frames` on one connection with `store`'s client certificate.
        let send = |store: &CredentialStore, frames: &[Message]| {
            let tcp = TcpStream::connect(t.local_addr()).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let link = client_handshake(tcp, store.client_config(), "127.0.0.1").unwrap();
            let mut w = link.writer();
            for f in frames {
                let mut buf = Vec::new();
                encode_frame(7, f, &mut buf);
                if w.write_all(&buf).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let why = || stats.last_rejection.lock().clone().unwrap_or_default();
        let refused = || stats.tls_refused.load(Ordering::Relaxed);
        let delivered = || stats.delivered.load(Ordering::Relaxed);

        // Member 2's certificate speaking as member 2: delivered.
        send(&two, &[heartbeat(2, 1), heartbeat(2, 1)]);
        wait_until("member 2's frames delivered", || delivered() == 2);
        assert_eq!(refused(), 0, "{}", why());

        // Member 2's certificate speaking as member 3: refused, nothing delivered.
        send(&two, &[heartbeat(3, 1)]);
        wait_until("member 3 impersonated", || refused() == 1);
        let w = why();
        assert!(
            w.contains("does not name member 3's host 127.0.0.3") && w.contains("IP:127.0.0.2"),
            "{w}"
        );
        assert_eq!(delivered(), 2);

        // A certificate of the same CA for another host, as member 2.
        send(&other, &[heartbeat(2, 1)]);
        wait_until("another host's certificate refused", || refused() == 2);
        assert!(why().contains("DNS:intruder.example"), "{}", why());

        // Member 2, then member 3 on the same connection: the second is refused.
        send(&two, &[heartbeat(2, 1), heartbeat(3, 1), heartbeat(2, 1)]);
        wait_until("a second member on one connection refused", || {
            refused() == 3
        });
        assert!(
            why().contains("a frame from member 3 on the connection of member 2"),
            "{}",
            why()
        );
        assert_eq!(delivered(), 3);

        // A member this node has no address for, and this node itself.
        send(&two, &[heartbeat(7, 1)]);
        wait_until("an unknown member refused", || refused() == 4);
        assert!(why().contains("member 7, whose raft address"), "{}", why());
        send(&two, &[heartbeat(1, 1)]);
        wait_until("a frame as this node refused", || refused() == 5);
        assert!(why().contains("come from this node (1)"), "{}", why());
        assert_eq!(delivered(), 3);
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);
        t.shutdown();
    }

    /// Dialling member 2 at 127.0.0.2: its server certificate must name
    /// 127.0.0.2; one of the same CA naming another host is refused.
    #[test]
    fn dialling_a_member_checks_its_certificate_names_the_members_host() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("raft identity CA").unwrap();
        let me = member_pki(&ca, &dir.path().join("1"), &["127.0.0.1"]);
        for (certified, ok) in [("127.0.0.2", true), ("127.0.0.3", false)] {
            let peer = member_pki(&ca, &dir.path().join(certified), &[certified]);
            let l = TcpListener::bind("127.0.0.2:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let server = std::thread::spawn(move || {
                let (c, _) = l.accept().unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = server_handshake(c, peer.server_config());
            });
            let r = connect(&addr, Some(&me));
            server.join().unwrap();
            if ok {
                assert!(r.is_ok(), "{:?}", r.err());
            } else {
                let e = r
                    .err()
                    .expect("a certificate for another host was accepted");
                assert!(e.starts_with("TLS") && e.contains("name mismatch"), "{e}");
            }
        }
    }
}
