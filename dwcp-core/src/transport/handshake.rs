//! The handshake: the source's [`Session::connect`] (N streams, hello and
//! reply on each in parallel) and the destination's [`Acceptor`], which
//! collects each session's streams and starts it.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::warn;

use super::gate::CutoverGate;
use super::link::Link;
use super::session::{FailReason, Role, Session, SessionError, Target};
use super::TransportConfig;
use crate::tls::{client_handshake, server_handshake, PeerIdentity};
use crate::wire::{self, Hello, Reply, Status, WireError};

impl Session {
    /// Opens `cfg.streams` TCP streams to a destination agent and performs the
    /// handshake on each (in parallel, so a long RTT is paid once).
    pub fn connect(
        cfg: &TransportConfig,
        name: &str,
        addr: SocketAddr,
    ) -> Result<Session, SessionError> {
        let invalid =
            |e: &dyn std::fmt::Display| SessionError::Failed(FailReason::Local(e.to_string()));
        cfg.validate().map_err(|e| invalid(&e))?;
        wire::check_name(name).map_err(|e| invalid(&e))?;
        let id: [u8; 16] = rand::random();
        let n = cfg.streams as usize;
        // Ask for no more than this end's own budget holds: the initiator
        // keeps the same windows and rings as the responder.
        let own = cfg
            .grant(cfg.streams, cfg.window, cfg.ring_pages())
            .map_err(|e| invalid(&e))?;
        let own_spill = if own.ring_pages > 0 {
            cfg.spill_pages()
        } else {
            0
        };
        let own_flags = wire::FLAG_MULTIFD
            | wire::FLAG_XREF
            | if cfg.delta { wire::FLAG_DELTA } else { 0 }
            | if cfg.context != super::ContextUse::Off {
                wire::FLAG_CONTEXT
            } else {
                0
            }
            | if cfg.keep.is_some() && cfg.keep_copy {
                wire::FLAG_KEEP
            } else {
                0
            };
        // One snapshot of the credentials for every stream of the session.
        let creds = cfg.tls.credentials().map_err(|source| SessionError::Tls {
            index: 0,
            addr,
            source: Box::new(source),
        })?;
        let server_name = cfg
            .tls
            .hostname
            .clone()
            .unwrap_or_else(|| addr.ip().to_string());
        let (creds, server_name) = (&creds, &server_name);
        let results: Vec<Result<(Link, Reply), SessionError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|index| {
                    s.spawn(move || {
                        let st = TcpStream::connect_timeout(&addr, cfg.connect_timeout).map_err(
                            |source| SessionError::Connect {
                                index,
                                addr,
                                source,
                            },
                        )?;
                        cfg.tuning
                            .apply(&st)
                            .map_err(|source| SessionError::Connect {
                                index,
                                addr,
                                source,
                            })?;
                        st.set_read_timeout(Some(cfg.connect_timeout))
                            .and_then(|()| st.set_write_timeout(Some(cfg.connect_timeout)))
                            .map_err(|source| SessionError::Connect {
                                index,
                                addr,
                                source,
                            })?;
                        let mut st = match creds {
                            None => Link::Plain(st),
                            Some(c) => Link::tls(
                                client_handshake(st, c.client_config(), server_name).map_err(
                                    |source| SessionError::Tls {
                                        index,
                                        addr,
                                        source: Box::new(source),
                                    },
                                )?,
                            ),
                        };
                        let hello = Hello {
                            version_min: wire::VERSION_MIN,
                            version_max: wire::VERSION_MAX,
                            session: id,
                            stream_index: index as u16,
                            stream_count: n as u16,
                            role: wire::Role::Data,
                            window: own.window,
                            ring_pages: own.ring_pages,
                            spill_pages: own_spill,
                            flags: own_flags,
                            name: name.to_string(),
                        };
                        st.write_all(&hello.encode()).map_err(|source| {
                            SessionError::Handshake {
                                index,
                                addr,
                                source: WireError::Io {
                                    what: "hello",
                                    source,
                                },
                            }
                        })?;
                        let reply =
                            Reply::read(&mut st).map_err(|source| SessionError::Handshake {
                                index,
                                addr,
                                source,
                            })?;
                        if reply.status != Status::Ok {
                            return Err(SessionError::Handshake {
                                index,
                                addr,
                                source: WireError::Refused(reply.status),
                            });
                        }
                        Ok((st, reply))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("connect thread panicked"))
                .collect()
        });
        let mut streams = Vec::with_capacity(n);
        let mut window = own.window;
        let mut ring = own.ring_pages;
        let mut spill = own_spill;
        let mut flags = own_flags;
        let mut version = wire::VERSION_MAX;
        for (index, r) in results.into_iter().enumerate() {
            let (st, reply) = r?;
            if !(wire::VERSION_MIN..=wire::VERSION_MAX).contains(&reply.version) {
                return Err(SessionError::Handshake {
                    index,
                    addr,
                    source: WireError::Field {
                        field: "reply version",
                        value: reply.version as u64,
                        allowed: "a version we offered",
                    },
                });
            }
            window = window.min(reply.window);
            ring = ring.min(reply.ring_pages);
            spill = spill.min(reply.spill_pages);
            flags &= reply.flags;
            version = version.min(reply.version);
            streams.push(st);
        }
        Ok(Session::start(
            Role::Initiator,
            id,
            name,
            cfg.clone(),
            (window, ring, if ring > 0 { spill } else { 0 }, version),
            (flags, own_flags),
            streams,
            None,
            None,
        ))
    }
}

/// Limits a destination agent puts on what initiators may ask for. What
/// one session may take in memory is the transport's
/// [`TransportConfig::session_memory`] ([`super::budget`]).
#[derive(Debug, Clone)]
pub struct AcceptorLimits {
    pub max_window: u32,
    pub max_ring_pages: u32,
    /// Most sessions running or being set up at once (`--max-sessions`); a
    /// new one past it is refused with [`Status::MaxSessions`], those
    /// running are not touched.
    pub max_sessions: usize,
    /// Most sessions being set up (streams still arriving) at once; past it
    /// a new one is refused with [`Status::Busy`].
    pub max_pending: usize,
    /// Most connections in their TLS handshake and hello at once (past it
    /// the agent's data port stops accepting: new connections wait in the
    /// kernel's accept queue until one of these ends).
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
}

/// Default of [`AcceptorLimits::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: usize = 16;

impl Default for AcceptorLimits {
    fn default() -> Self {
        AcceptorLimits {
            max_window: 64 << 20,
            max_ring_pages: (1024 << 20) / 4096,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_pending: 64,
            max_handshakes: 256,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

struct Pending {
    hello: Hello,
    streams: Vec<Option<Link>>,
    since: Instant,
}

/// Why a destination refuses a session: the status the source is told and
/// the reason the destination logs.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: Status,
    pub reason: String,
}

/// Decides whether a session for a migration name (first argument) from a
/// peer (its certificate identity with TLS, and its address) may start:
/// `Ok(rule)` names what allowed it (for the log), `Err` refuses it before
/// anything reaches QEMU.
pub type Authorizer =
    Arc<dyn Fn(&str, Option<&PeerIdentity>, SocketAddr) -> Result<String, Refusal> + Send + Sync>;

#[derive(Clone)]
struct Auth(Authorizer);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorizer")
    }
}

/// The destination agent's side of the handshake: collects the N streams of
/// each session and starts the session when all are in.
#[derive(Debug)]
pub struct Acceptor {
    cfg: TransportConfig,
    limits: AcceptorLimits,
    incoming_dir: PathBuf,
    connector: Option<Target>,
    gates: Option<Gates>,
    authorizer: Option<Auth>,
    tcp_delivery: Option<TcpDel>,
    pending: Mutex<HashMap<[u8; 16], PendingBox>>,
    /// Sessions this acceptor started that have not ended.
    running: Mutex<Vec<Session>>,
}

#[derive(Clone)]
struct Gates(GateProvider);

impl std::fmt::Debug for Gates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GateProvider")
    }
}

/// Decides, for a migration name, whether the destination delivers its
/// channels to QEMU over TCP instead of QEMU's incoming UNIX socket:
/// `None` no (the socket), `Some(Ok(addr))` to QEMU listening at `addr` on
/// this host, `Some(Err(reason))` refused before anything reaches QEMU (the
/// name asks for a delivery this host does not allow; the source is told
/// [`Status::UnknownTarget`], the destination logs the reason).
pub type TcpDelivery = Arc<dyn Fn(&str) -> Option<Result<SocketAddr, String>> + Send + Sync>;

#[derive(Clone)]
struct TcpDel(TcpDelivery);

impl std::fmt::Debug for TcpDel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TcpDelivery")
    }
}

/// Decides, for a session about to start (migration name, the source's
/// address), whether its main channel is gated: `Ok(Some(gate))` gates it,
/// `Ok(None)` leaves it ungated, `Err(reason)` refuses it (the source is told
/// the reason, QEMU gets nothing).
pub type GateProvider =
    Arc<dyn Fn(&str, SocketAddr) -> Result<Option<Arc<dyn CutoverGate>>, String> + Send + Sync>;

struct PendingBox(Pending);

impl std::fmt::Debug for PendingBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("name", &self.0.hello.name)
            .finish()
    }
}

impl Acceptor {
    /// `incoming_dir` holds QEMU's incoming sockets, `<name>.sock`.
    pub fn new(cfg: TransportConfig, limits: AcceptorLimits, incoming_dir: PathBuf) -> Acceptor {
        Acceptor {
            cfg,
            limits,
            incoming_dir,
            connector: None,
            gates: None,
            authorizer: None,
            tcp_delivery: None,
            pending: Mutex::new(HashMap::new()),
            running: Mutex::new(Vec::new()),
        }
    }

    /// Asks `auth` before accepting each stream's hello (see [`Authorizer`]).
    pub fn with_authorizer(mut self, auth: Authorizer) -> Acceptor {
        self.authorizer = Some(Auth(auth));
        self
    }

    /// Delivers the channels of the names `f` says to over TCP (see
    /// [`TcpDelivery`]).
    pub fn with_tcp_delivery(mut self, f: TcpDelivery) -> Acceptor {
        self.tcp_delivery = Some(TcpDel(f));
        self
    }

    /// Gates the sessions `gates` says to (see [`GateProvider`]).
    pub fn with_gates(mut self, gates: GateProvider) -> Acceptor {
        self.gates = Some(Gates(gates));
        self
    }

    /// An acceptor whose sessions get their channels from `connector`
    /// instead of QEMU's incoming sockets (any migration name is accepted).
    pub fn with_connector(
        cfg: TransportConfig,
        limits: AcceptorLimits,
        connector: Target,
    ) -> Acceptor {
        Acceptor {
            cfg,
            limits,
            incoming_dir: PathBuf::new(),
            connector: Some(connector),
            gates: None,
            authorizer: None,
            tcp_delivery: None,
            pending: Mutex::new(HashMap::new()),
            running: Mutex::new(Vec::new()),
        }
    }

    /// Handles one accepted TCP connection: reads and checks the hello,
    /// replies, and returns a started session when this was its last stream.
    /// Errors name what was wrong; the connection is closed on error.
    pub fn handle(&self, stream: TcpStream) -> Result<Option<Session>, WireError> {
        let io = |what, source| WireError::Io { what, source };
        // Bounds every wait of the TLS handshake and the hello: a peer that
        // stalls costs this thread that long, and no more memory than one
        // TLS record.
        stream
            .set_read_timeout(Some(self.limits.handshake_timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.limits.handshake_timeout)))
            .map_err(|e| io("socket", e))?;
        let peer_addr = stream.peer_addr().map_err(|e| io("socket", e))?;
        let creds = self
            .cfg
            .tls
            .credentials()
            .map_err(|e| WireError::Tls(e.to_string()))?;
        let mut stream = match creds {
            None => Link::Plain(stream),
            Some(c) => Link::tls(
                server_handshake(stream, c.server_config())
                    .map_err(|e| WireError::Tls(e.to_string()))?,
            ),
        };
        let identity = stream.peer_identity();
        let hello = match Hello::read(&mut stream) {
            Ok(h) => h,
            Err(e) => {
                if matches!(e, WireError::Version { .. }) {
                    let reply = self.reply(Status::BadVersion, 0, 0, 0, wire::VERSION_MAX);
                    let _ = stream.write_all(&reply.encode());
                }
                return Err(e);
            }
        };
        let refuse = |stream: &mut Link, status| {
            let _ = stream.write_all(&self.reply(status, 0, 0, 0, wire::VERSION_MAX).encode());
            Err(WireError::Refused(status))
        };
        let who = identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_else(|| "no certificate (clear text)".into());
        if let Some(id) = &identity {
            if !self.cfg.tls.allowed_peers.allows(id) {
                warn!(
                    name = %hello.name, peer = %peer_addr, identity = %who,
                    "refused: peer identity not in --allow-peer ({})",
                    self.cfg.tls.allowed_peers.entries().join(", ")
                );
                return refuse(&mut stream, Status::PeerNotAllowed);
            }
        }
        if let Some(Auth(auth)) = &self.authorizer {
            match auth(&hello.name, identity.as_ref(), peer_addr) {
                Ok(rule) => {
                    if hello.stream_index == 0 {
                        tracing::info!(
                            name = %hello.name, peer = %peer_addr, identity = %who,
                            "session authorized by {rule}"
                        );
                    }
                }
                Err(r) => {
                    warn!(
                        name = %hello.name, peer = %peer_addr, identity = %who,
                        status = ?r.status, "refused: {}", r.reason
                    );
                    return refuse(&mut stream, r.status);
                }
            }
        }
        let tcp = self
            .tcp_delivery
            .as_ref()
            .and_then(|TcpDel(f)| f(&hello.name));
        let target = match (&self.connector, tcp) {
            (Some(c), _) => c.clone(),
            (None, Some(Ok(addr))) => Target::Tcp(addr, self.cfg.connect_timeout),
            (None, Some(Err(reason))) => {
                if hello.stream_index == 0 {
                    warn!(name = %hello.name, peer = %peer_addr, "refused: {reason}");
                }
                return refuse(&mut stream, Status::UnknownTarget);
            }
            (None, None) => {
                let path = self.incoming_dir.join(format!("{}.sock", hello.name));
                if !path.exists() {
                    warn!(name = %hello.name, "no incoming QEMU socket at {}", path.display());
                    return refuse(&mut stream, Status::UnknownTarget);
                }
                Target::Socket(path)
            }
        };
        let window = hello.window.min(self.limits.max_window);
        let ring = hello.ring_pages.min(self.limits.max_ring_pages);
        if (window as usize) < 2 * crate::codec::MAX_RAW_LEN.min(self.cfg.chunk) {
            return refuse(&mut stream, Status::TooLarge);
        }
        // Within the per-session memory budget: less than asked when the
        // ask does not fit, refused when the streams alone do not.
        let (window, ring, spill) = match self.cfg.grant(hello.stream_count, window, ring) {
            // The spill file is on disk, outside the memory budget; at most
            // this end's own, and none if it cannot create one.
            Ok(g) => (
                g.window,
                g.ring_pages,
                match hello.spill_pages {
                    0 => 0,
                    asked => asked.min(self.cfg.spill_pages()),
                },
            ),
            Err(e) => {
                if hello.stream_index == 0 {
                    warn!(name = %hello.name, peer = %peer_addr, "refused: {e}");
                }
                return refuse(&mut stream, Status::MemoryBudget);
            }
        };
        self.cfg
            .tuning
            .apply(stream.tcp())
            .map_err(|e| io("socket tuning", e))?;
        let mut pending = self.pending.lock();
        pending.retain(|_, p| p.0.since.elapsed() < self.limits.handshake_timeout * 2);
        if !pending.contains_key(&hello.session) {
            if pending.len() >= self.limits.max_pending {
                drop(pending);
                warn!(name = %hello.name, peer = %peer_addr,
                    "refused: {} sessions are being set up already", self.limits.max_pending);
                return refuse(&mut stream, Status::Busy);
            }
            let running = self.running_sessions();
            let setting_up = pending.len();
            if running + setting_up >= self.limits.max_sessions {
                drop(pending);
                if hello.stream_index == 0 {
                    warn!(
                        name = %hello.name, peer = %peer_addr,
                        "refused: {running} sessions running and {setting_up} being set up: the \
                         agent's limit is {} (--max-sessions)",
                        self.limits.max_sessions
                    );
                }
                return refuse(&mut stream, Status::MaxSessions);
            }
        }
        let entry = pending.entry(hello.session).or_insert_with(|| {
            PendingBox(Pending {
                hello: hello.clone(),
                streams: (0..hello.stream_count).map(|_| None).collect(),
                since: Instant::now(),
            })
        });
        let p = &mut entry.0;
        let same = p.hello.name == hello.name
            && p.hello.stream_count == hello.stream_count
            && p.hello.window == hello.window
            && p.hello.ring_pages == hello.ring_pages
            && p.hello.spill_pages == hello.spill_pages
            && p.hello.flags == hello.flags;
        if !same || p.streams[hello.stream_index as usize].is_some() {
            drop(pending);
            return refuse(&mut stream, Status::SessionMismatch);
        }
        // Hello::read checked the ranges overlap.
        let version = hello.version_max.min(wire::VERSION_MAX);
        // Deltas when both ends allow them (this end's rebuilder reads them).
        let flags = (hello.flags & (wire::FLAG_MULTIFD | wire::FLAG_XREF))
            | if self.cfg.delta {
                hello.flags & wire::FLAG_DELTA
            } else {
                0
            }
            | if self.cfg.context != super::ContextUse::Off {
                hello.flags & wire::FLAG_CONTEXT
            } else {
                0
            }
            | match &self.cfg.keep {
                // Granted only with a copy to announce: the initiator then waits
                // for the announcement before its first page.
                Some(k) if k.get(&hello.name).is_some() => hello.flags & wire::FLAG_KEEP,
                _ => 0,
            };
        stream
            .write_all(
                &Reply {
                    flags,
                    ..self.reply(Status::Ok, window, ring, spill, version)
                }
                .encode(),
            )
            .map_err(|e| io("reply", e))?;
        p.streams[hello.stream_index as usize] = Some(stream);
        if p.streams.iter().all(Option::is_some) {
            let p = pending.remove(&hello.session).expect("present").0;
            drop(pending);
            let streams: Vec<Link> = p
                .streams
                .into_iter()
                .map(|s| s.expect("all present"))
                .collect();
            let cfg = TransportConfig {
                streams: streams.len() as u16,
                ..self.cfg.clone()
            };
            let peer = streams[0].tcp().peer_addr().map_err(|e| io("socket", e))?;
            let (gate, refusal) = match &self.gates {
                Some(Gates(f)) => match f(&hello.name, peer) {
                    Ok(g) => (g, None),
                    Err(reason) => (None, Some(reason)),
                },
                None => (None, None),
            };
            let session = Session::start(
                Role::Responder,
                hello.session,
                &hello.name,
                cfg,
                (window, ring, spill, version),
                (flags, hello.flags),
                streams,
                Some(target),
                gate,
            );
            self.running.lock().push(session.clone());
            if let Some(reason) = refusal {
                // Started only to tell the source why (an Abort frame):
                // nothing reaches QEMU.
                warn!(name = %hello.name, "cutover gate refused the session: {reason}");
                session.fail(FailReason::GateRefused(reason));
            }
            return Ok(Some(session));
        }
        Ok(None)
    }

    /// Sessions started here that have not ended yet.
    pub fn running_sessions(&self) -> usize {
        let mut r = self.running.lock();
        r.retain(|s| !s.is_finished());
        r.len()
    }

    /// The limits this acceptor enforces.
    pub fn limits(&self) -> &AcceptorLimits {
        &self.limits
    }

    fn reply(
        &self,
        status: Status,
        window: u32,
        ring_pages: u32,
        spill_pages: u32,
        version: u16,
    ) -> Reply {
        Reply {
            version,
            status,
            window,
            ring_pages,
            spill_pages,
            flags: 0,
        }
    }
}
