//! Sessions: one multi-stream migration. This module owns the [`Session`]
//! handle, its [`Role`] and errors ([`SessionError`], [`FailReason`]), the
//! state its threads share ([`Inner`], grouped by concern), and the
//! session's life: start, channel opening, failure and completion.
//!
//! The threads and their concerns live in the child modules (thread names
//! say which way bytes flow: `dwcp-qemu-rx<ch>` reads QEMU, `dwcp-tcp-tx<i>`
//! writes stream i, `dwcp-tcp-rx<i>` reads it, `dwcp-qemu-tx<ch>` writes
//! QEMU; `dwcp-enc<i>` encodes, `dwcp-watch` is the clock):
//!
//! - [`error`]: why a session failed ([`FailReason`]) or could not start;
//! - [`channel`]: a channel's state (reorder buffer, credit, sent log);
//! - [`target`]: where a responder's channels go ([`Target`]);
//! - [`send`]: QEMU's bytes to frames (`qemu_rx` threads), the encoders
//!   (`encode`), the stream writers (`tcp_tx`);
//! - [`recv`]: the stream readers (`tcp_rx`), the frame handler by kind,
//!   the in-order delivery to QEMU (`qemu_tx`) and the cutover gate's hold;
//! - [`credit`]: flow control (credit returned, the in-flight budget share);
//! - [`tune`]: the in-flight budget and codec tier decisions (pure);
//! - [`watchdog`]: the session's clock (`watch`): tuners, idle and close;
//! - [`stats`]: the stats snapshot;
//! - [`direct`]: channels written or read by the embedder (libdwcp).
//!
//! The handshake (connect, acceptor) is [`super::handshake`].

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::budget::{self, SessionBudget};
use super::gate::CutoverGate;
use super::link::{Link, TxStream};
use super::TransportConfig;
use crate::codec::keep::{HaveCollector, KeptCopy, PeerHas, Recorder, HAVE_CHUNK};
use crate::codec::Tier;

mod adapt;
mod channel;
mod credit;
pub(super) mod direct;
mod error;
pub use error::PeerRefusal;
mod local;
pub use local::LocalConn;
mod recv;
mod send;
mod stats;
mod target;
mod tune;
mod watchdog;

use channel::{Channel, RecvState, SentLog};
pub use direct::reader::{ChannelReader, ReadError};
pub use direct::writer::{ChannelWriter, WriteError};
pub use error::{FailReason, SessionError};
pub(super) use recv::RX_BUFFER;
use send::{Job, Outgoing};
pub use stats::{ChannelStats, CodecCounts, SessionState, SessionStats, StreamStats};
pub use target::{DirectHandOver, Target};

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Source host: QEMU connects to our UNIX socket, we open the streams.
    Initiator,
    /// Destination host: we accept the streams and connect to QEMU.
    Responder,
}

enum Ctrl {
    Credit(Arc<Channel>),
    Abort(String),
}

#[derive(Default)]
struct Counters {
    raw_out: AtomicU64,
    raw_in: AtomicU64,
    wire_out: AtomicU64,
    wire_in: AtomicU64,
    frames_out: AtomicU64,
    frames_in: AtomicU64,
    zero_bytes: AtomicU64,
    pages_seen: AtomicU64,
    pages_deduped: AtomicU64,
    pages_missed_dups: AtomicU64,
    pages_kept: AtomicU64,
    pages_xref: AtomicU64,
    pages_resent: AtomicU64,
    pages_delta: AtomicU64,
    resent_lz4_full: AtomicU64,
    resent_lz4_delta: AtomicU64,
    /// Data frames received per codec (none, lz4, zstd, raw, zstd-ctx).
    codec_in: [AtomicU64; 5],
    /// Data frames sent compressed with context ([`crate::codec::context`]).
    context_out: AtomicU64,
    /// Raw data frames received without a payload checksum.
    unchecked_in: AtomicU64,
    /// Nanoseconds the codec workers spent compressing.
    encode_ns: AtomicU64,
    /// `--codec auto` at zstd:3: what one frame in [`tune::PROBE_EVERY`]
    /// came to at zstd:3 and at the level above (wire bytes), for the tier
    /// tuner to see whether the higher level pays on this content.
    probe_base: AtomicU64,
    probe_high: AtomicU64,
}

/// The state a session's threads share, grouped by concern.
struct Inner {
    id: [u8; 16],
    name: String,
    role: Role,
    /// Protocol version of the session (the lower of both ends' newest).
    version: u16,
    cfg: TransportConfig,
    /// Flow-control window per channel, raw bytes (as agreed).
    window: u64,
    ring_bytes: usize,
    /// Dedup spill file per channel, pages (as agreed; 0: none).
    spill_pages: u64,
    /// Deltas of re-sent pages (as agreed in the hello).
    delta: bool,
    /// Compression with context may be used (as agreed in the hello).
    context: bool,
    /// The dedup ring of a multifd channel, pages, when the peer agreed to
    /// multifd channels' pages (the hello's [`crate::wire::FLAG_MULTIFD`]):
    /// the agreed ring shared by the most multifd channels a session may
    /// open, so that all their rings fill no more than one.
    multifd_ring_pages: Option<u64>,
    /// Cross-channel references (the hello's [`crate::wire::FLAG_XREF`],
    /// with spill files): what the session's channels share.
    xref: Option<Arc<crate::codec::xref::Shared>>,
    /// Re-migration: the copy being recorded, what the peer announced.
    keep: KeepState,
    /// What the session's channels and the rings the peer fills may take
    /// ([`budget`]).
    budget: SessionBudget,
    /// Responder: where its channels go.
    target: Option<Target>,
    /// The cutover gate on the main channel (a gated destination session).
    gate: Option<Arc<dyn CutoverGate>>,
    links: Links,
    channels: Channels,
    queues: Queues,
    life: Life,
    flow: Flow,
    tuning: Tuning,
    counters: Counters,
    /// Link samples, the mode detector and the rate estimate ([`adapt`]).
    adapt: Mutex<adapt::AdaptState>,
    /// A retired handle ([`Session::retired`]): the ended session's final
    /// figures, which [`Session::stats`] returns; it holds no socket.
    retired: Option<SessionStats>,
}

/// The session's TCP streams.
struct Links {
    /// Clones kept for TCP_INFO and shutdown.
    streams: Vec<TcpStream>,
    /// The streams' sending halves (the socket itself, or its TLS writer):
    /// a writer thread, or a direct channel's writer ([`ChannelWriter`]),
    /// holds the lock for each whole frame.
    tx: Vec<Mutex<TxStream>>,
    /// Where a direct writer starts looking for a free stream.
    next_tx: AtomicUsize,
}

/// The open channels.
struct Channels {
    map: Mutex<HashMap<u16, Arc<Channel>>>,
    /// Held while a responder opens a channel.
    opening: Mutex<()>,
    /// Initiator: the next channel's number.
    next_id: AtomicUsize,
}

/// The queues between the session's threads.
struct Queues {
    job_tx: Sender<Job>,
    job_rx: Receiver<Job>,
    frame_tx: Sender<Outgoing>,
    frame_rx: Receiver<Outgoing>,
    ctrl_tx: Sender<Ctrl>,
    ctrl_rx: Receiver<Ctrl>,
    /// Frames queued (job or frame queue) and not yet written.
    inflight: AtomicU64,
}

impl Queues {
    /// The three queues with these capacities, nothing in flight.
    fn new(jobs: usize, frames: usize, ctrl: usize) -> Self {
        let (job_tx, job_rx) = bounded(jobs);
        let (frame_tx, frame_rx) = bounded(frames);
        let (ctrl_tx, ctrl_rx) = bounded(ctrl);
        Self {
            job_tx,
            job_rx,
            frame_tx,
            frame_rx,
            ctrl_tx,
            ctrl_rx,
            inflight: AtomicU64::new(0),
        }
    }
}

/// Where the session is in its life, and its threads.
struct Life {
    failure: Mutex<Option<FailReason>>,
    failed: AtomicBool,
    complete: AtomicBool,
    /// Responder: channel count announced by the initiator's Close frame.
    close_expected: Mutex<Option<u32>>,
    /// Stream readers that have ended.
    readers_done: AtomicUsize,
    /// When the peer first closed a stream.
    first_eof: Mutex<Option<Instant>>,
    /// When the last frame arrived.
    last_rx: Mutex<Instant>,
    started: Instant,
    ended: Mutex<Option<Instant>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Flow control: what the peer has credited back, what is in flight.
struct Flow {
    /// Raw bytes the peer has credited back (delivered to its QEMU).
    credited: AtomicU64,
    /// Wire bytes of the frames those credits retired.
    credited_wire: AtomicU64,
    /// Wire bytes of Data frames sent and not yet credited (all channels).
    wire_inflight: AtomicU64,
    /// Local readers currently waiting for credit (the link is the limit).
    credit_waiters: AtomicUsize,
    /// Shortest credit loop seen since the in-flight tuner last looked,
    /// microseconds (u64::MAX: none): from a Data frame put on the wire to
    /// the peer's credit for it ([`tune::InflightTuner`]).
    credit_loop_min_us: AtomicU64,
}

/// What the tuners decided ([`tune`]) and the rates they measured.
struct Tuning {
    /// The tier of frames encoded from now on.
    tier: Mutex<Tier>,
    /// Wire bytes all channels together may have in flight now (adaptive).
    target_inflight: AtomicU64,
    /// Bottleneck rate estimate, wire bytes/s (see [`SessionStats`]).
    delivery_rate: AtomicU64,
    /// Raw bytes per second delivered, average of the last second.
    raw_rate: AtomicU64,
    /// Shortest credit loop of the last second, microseconds (0: none yet).
    credit_loop_us: AtomicU64,
    /// Whether `--codec auto` may use raw frames: not off a datacenter
    /// path ([`adapt`]).
    raw_allowed: AtomicBool,
    /// zstd frames go out compressed with context now ([`tune::ContextGate`]).
    context: AtomicBool,
    /// The newest capacity a link sample measured, wire bytes/s (0: none).
    measured_capacity: AtomicU64,
}

/// One migration's multi-stream session. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.inner.name)
            .field("role", &self.inner.role)
            .finish()
    }
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A session's part in re-migration ([`crate::codec::keep`]).
struct KeepState {
    /// The copy of what this session moves (both roles, when the host
    /// keeps copies and pages are planned).
    recorder: Option<Arc<Recorder>>,
    /// Initiator, when agreed: what the destination announced (set once
    /// every HAVE frame arrived), and the frames so far.
    peer_has: Option<Arc<OnceLock<PeerHas>>>,
    collector: Mutex<HaveCollector>,
    /// Responder, when agreed: the kept copy of this guest it announces.
    announced: Option<Arc<KeptCopy>>,
    /// Initiator: stopped waiting for the announcement.
    gave_up: AtomicBool,
}

/// Longest an initiator holds its first pages back for the destination's
/// announcement (4 MiB per 128 Ki pages kept: a third of a second at
/// 100 Mbit/s).
const ANNOUNCE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl KeepState {
    /// `asked`: the initiator's hello asked to keep copies (both ends then
    /// record); `agreed`: the responder also announces the copy it holds.
    fn new(cfg: &TransportConfig, role: Role, name: &str, asked: bool, agreed: bool) -> KeepState {
        let store = cfg
            .keep
            .as_ref()
            .filter(|_| cfg.dedup_cache_mb > 0 && asked);
        let announced = match (role, agreed, store) {
            (Role::Responder, true, Some(s)) => s.get(name),
            _ => None,
        };
        KeepState {
            recorder: store.and_then(|s| s.recorder(name)),
            peer_has: (role == Role::Initiator && agreed).then(|| Arc::new(OnceLock::new())),
            collector: Mutex::new(HaveCollector::default()),
            announced,
            gave_up: AtomicBool::new(false),
        }
    }

    /// Initiator: when the destination agreed to announce kept pages, waits
    /// (once, at most [`ANNOUNCE_WAIT`] from the session's start) until the
    /// announcement is complete, so that the first pages can refer to it.
    fn wait_announcement(&self, inner: &Inner) {
        let Some(h) = &self.peer_has else {
            return;
        };
        if h.get().is_some() || self.gave_up.load(Ordering::Relaxed) {
            return;
        }
        let deadline = inner.life.started + ANNOUNCE_WAIT;
        while h.get().is_none() && Instant::now() < deadline && !is_down(inner) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if h.get().is_none() && !self.gave_up.swap(true, Ordering::Relaxed) {
            warn!(name = %inner.name, "re-migration: the destination's list of kept pages did not arrive within {} s; pages go in full", ANNOUNCE_WAIT.as_secs());
        }
    }
}

/// Responder: sends the list of the pages it kept of this guest (HAVE
/// frames, [`HAVE_CHUNK`] hashes each) ahead of anything else it sends.
fn announce(inner: &Inner, copy: &KeptCopy) {
    let hashes = copy.hashes();
    info!(name = %inner.name, pages = hashes.len(), "re-migration: announcing the pages kept from an earlier migration of this guest");
    for (k, chunk) in hashes.chunks(HAVE_CHUNK as usize).enumerate() {
        let payload = chunk.concat();
        let h =
            crate::wire::FrameHeader::have(hashes.len() as u32, k as u64 * HAVE_CHUNK, &payload);
        inner.queues.inflight.fetch_add(1, Ordering::AcqRel);
        if inner
            .queues
            .frame_tx
            .send(Outgoing::Frame(h, payload))
            .is_err()
        {
            inner.queues.inflight.fetch_sub(1, Ordering::AcqRel);
            return;
        }
    }
}

impl Inner {
    /// The receiving end of a channel's dedup ring (and spill file, as
    /// agreed): an error when the spill file cannot be created, since the
    /// peer may refer to pages in it.
    fn rebuilder(&self, channel: u16) -> std::io::Result<crate::codec::Rebuilder> {
        let mut r = self.rebuilder_ring()?;
        if self.role == Role::Responder {
            r.set_keep(self.keep.recorder.clone(), self.keep.announced.clone());
            if let Some(sh) = &self.xref {
                r.set_xref(sh.clone(), channel);
            }
        }
        Ok(r)
    }

    fn rebuilder_ring(&self) -> std::io::Result<crate::codec::Rebuilder> {
        crate::codec::Rebuilder::with_spill(self.ring_bytes, self.spill_pages, &self.cfg.spill_dir)
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create the dedup spill file in {} (spill-dir): {e}",
                        self.cfg.spill_dir.display()
                    ),
                )
            })
    }
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        role: Role,
        id: [u8; 16],
        name: &str,
        cfg: TransportConfig,
        (window, ring_pages, spill_pages, version): (u32, u32, u32, u16),
        (flags, asked): (u8, u8),
        links: Vec<Link>,
        target: Option<Target>,
        gate: Option<Arc<dyn CutoverGate>>,
    ) -> Session {
        let n = links.len();
        let queues = Queues::new(
            cfg.workers * 2,
            n * 2 + 4,
            cfg.max_channels as usize * 2 + n * 2 + 16,
        );
        let mut shutdown_clones = Vec::with_capacity(n);
        let mut tx = Vec::with_capacity(n);
        let mut streams = Vec::with_capacity(n);
        for l in links {
            // A read timeout turns a silent peer into an error the watchdog sees.
            let _ = l.tcp().set_read_timeout(Some(cfg.idle_timeout));
            let _ = l.tcp().set_write_timeout(Some(cfg.idle_timeout));
            let (sock, w, r) = l.into_parts().expect("dup of a connected socket");
            shutdown_clones.push(sock);
            tx.push(Mutex::new(w));
            streams.push(r);
        }
        let tier = if cfg.auto_tier {
            let rtt = super::tcp::path_min_rtt_us(&shutdown_clones);
            let mode = &cfg.adapt.mode;
            let tier = tune::initial_tier(rtt, (mode.internet_rtt_ms * 1000.0) as u32, mode.fixed);
            info!(name, %tier, min_rtt_us = rtt, "auto tier: start");
            tier
        } else {
            cfg.tier
        };
        let started = Instant::now();
        let adapt_cfg = cfg.adapt.clone();
        let delta = flags & crate::wire::FLAG_DELTA != 0 && ring_pages > 0;
        let context = flags & crate::wire::FLAG_CONTEXT != 0;
        let cfg_context = cfg.context;
        let multifd_ring_pages = (flags & crate::wire::FLAG_MULTIFD != 0 && ring_pages > 0)
            .then(|| u64::from(ring_pages) / u64::from(cfg.max_channels.max(2) - 1));
        let xref = (flags & crate::wire::FLAG_XREF != 0 && ring_pages > 0 && spill_pages > 0)
            .then(|| Arc::new(crate::codec::xref::Shared::default()));
        let xref_on = xref.is_some();
        let keep = KeepState::new(
            &cfg,
            role,
            name,
            asked & crate::wire::FLAG_KEEP != 0,
            flags & crate::wire::FLAG_KEEP != 0 && ring_pages > 0,
        );
        let inner = Arc::new(Inner {
            id,
            name: name.to_string(),
            role,
            version,
            window: window as u64,
            ring_bytes: ring_pages as usize * crate::codec::PAGE_SIZE,
            spill_pages: spill_pages as u64,
            delta,
            context,
            multifd_ring_pages,
            xref,
            keep,
            budget: SessionBudget::new(
                cfg.session_memory.saturating_sub(budget::fixed_bytes(
                    n as u64,
                    cfg.workers as u64,
                    cfg.chunk as u64,
                )),
                cfg.session_memory,
            ),
            cfg,
            target,
            gate,
            links: Links {
                streams: shutdown_clones,
                tx,
                next_tx: AtomicUsize::new(0),
            },
            channels: Channels {
                map: Mutex::new(HashMap::new()),
                opening: Mutex::new(()),
                next_id: AtomicUsize::new(0),
            },
            queues,
            life: Life {
                failure: Mutex::new(None),
                failed: AtomicBool::new(false),
                complete: AtomicBool::new(false),
                close_expected: Mutex::new(None),
                readers_done: AtomicUsize::new(0),
                first_eof: Mutex::new(None),
                last_rx: Mutex::new(Instant::now()),
                started,
                ended: Mutex::new(None),
                threads: Mutex::new(Vec::new()),
            },
            flow: Flow {
                credited: AtomicU64::new(0),
                credited_wire: AtomicU64::new(0),
                wire_inflight: AtomicU64::new(0),
                credit_waiters: AtomicUsize::new(0),
                credit_loop_min_us: AtomicU64::new(u64::MAX),
            },
            tuning: Tuning {
                tier: Mutex::new(tier),
                target_inflight: AtomicU64::new(tune::INITIAL_INFLIGHT.min(window as u64)),
                delivery_rate: AtomicU64::new(0),
                raw_rate: AtomicU64::new(0),
                credit_loop_us: AtomicU64::new(0),
                raw_allowed: AtomicBool::new(true),
                context: AtomicBool::new(cfg_context == crate::transport::ContextUse::Always),
                measured_capacity: AtomicU64::new(0),
            },
            counters: Counters::default(),
            adapt: Mutex::new(adapt::AdaptState::new(&adapt_cfg, started)),
            retired: None,
        });
        info!(name, session = %hex(&id), ?role, streams = n, window, ring_pages, spill_pages, delta, context, multifd_ring_pages, xref = xref_on, "session started");
        let sess = Session { inner };
        for (i, s) in streams.into_iter().enumerate() {
            let inner = sess.inner.clone();
            sess.spawn(format!("dwcp-tcp-tx{i}"), move || send::tcp_tx(inner, i));
            let inner = sess.inner.clone();
            sess.spawn(format!("dwcp-tcp-rx{i}"), move || recv::tcp_rx(inner, i, s));
        }
        for i in 0..sess.inner.cfg.workers {
            let inner = sess.inner.clone();
            sess.spawn(format!("dwcp-enc{i}"), move || send::encode(inner));
        }
        let inner = sess.inner.clone();
        sess.spawn("dwcp-watch".into(), move || watchdog::watchdog(inner));
        if let Some(copy) = sess.inner.keep.announced.clone() {
            let inner = sess.inner.clone();
            sess.spawn("dwcp-have".into(), move || announce(&inner, &copy));
        }
        sess
    }

    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) {
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(f)
            .expect("spawn thread");
        self.inner.life.threads.lock().push(h);
    }

    /// Whether `other` is a handle of this same session.
    pub fn same(&self, other: &Session) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Adds a QEMU connection accepted on the source host (a UNIX or a TCP
    /// stream) as a new channel.
    pub fn add_local_channel(&self, conn: impl Into<LocalConn>) -> Result<u16, SessionError> {
        let id = self.next_channel_id()?;
        open_channel(&self.inner, id, conn.into(), true);
        Ok(id)
    }

    /// Adds a channel whose bytes the caller sends with the returned
    /// [`ChannelWriter`]; what the peer sends back on it is written to
    /// `conn` (the return path), and `conn` is shut down once the session
    /// completes. Nothing is read from `conn`.
    pub fn add_direct_channel(&self, conn: UnixStream) -> Result<ChannelWriter, SessionError> {
        let id = self.next_channel_id()?;
        let ch = open_channel(&self.inner, id, conn.into(), false);
        Ok(ChannelWriter::new(self.inner.clone(), ch))
    }

    fn next_channel_id(&self) -> Result<u16, SessionError> {
        if self.inner.life.complete.load(Ordering::Acquire) {
            return Err(SessionError::Finished);
        }
        if let Some(e) = self.failure() {
            return Err(SessionError::Failed(e));
        }
        let id = self.inner.channels.next_id.fetch_add(1, Ordering::AcqRel);
        if id >= self.inner.cfg.max_channels as usize {
            return Err(SessionError::TooManyChannels(self.inner.cfg.max_channels));
        }
        charge_channel(&self.inner, id as u16).map_err(SessionError::MemoryBudget)?;
        Ok(id as u16)
    }

    /// Changes the compression tier of frames encoded from now on.
    pub fn set_tier(&self, tier: Tier) {
        *self.inner.tuning.tier.lock() = tier;
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// When the session started (its handshake done).
    pub fn started(&self) -> Instant {
        self.inner.life.started
    }

    /// The failure reason, once the session has failed.
    pub fn failure(&self) -> Option<FailReason> {
        self.inner.life.failure.lock().clone()
    }

    pub fn is_finished(&self) -> bool {
        self.inner.life.complete.load(Ordering::Acquire)
            || self.inner.life.failed.load(Ordering::Acquire)
    }

    /// Fails the session from outside, for a reason of the caller's own
    /// ([`FailReason::Local`]).
    pub fn abort(&self, reason: &str) {
        fail(&self.inner, FailReason::Local(reason.to_string()));
    }

    /// Fails the session with `reason` (the handshake's gate refusal).
    pub(super) fn fail(&self, reason: FailReason) {
        fail(&self.inner, reason);
    }

    /// Cancels the session ([`FailReason::Cancelled`]).
    pub fn cancel(&self, reason: &str) {
        fail(&self.inner, FailReason::Cancelled(reason.to_string()));
    }

    /// Waits for every thread of the session to end; returns the final stats,
    /// or the failure.
    pub fn wait(&self) -> Result<SessionStats, SessionError> {
        loop {
            let next = self.inner.life.threads.lock().pop();
            match next {
                Some(h) => {
                    let _ = h.join();
                }
                None => break,
            }
        }
        release_buffers(&self.inner);
        match self.failure() {
            Some(e) => Err(SessionError::Failed(e)),
            None => Ok(self.stats()),
        }
    }

    /// A handle on this session's figures alone, for a history of ended
    /// sessions (the agent's `stats`): same id, name, role and outcome,
    /// [`Session::stats`] its final figures, but none of its sockets, queues
    /// or buffers. A handle kept for as long as a session is remembered
    /// holds its streams' and QEMU's file descriptors open; a retired one
    /// holds a few hundred bytes. Call it once the session has ended
    /// ([`Session::wait`] returned); on a running session it returns a
    /// handle of the figures so far, in state `running`, and never ends.
    pub fn retired(&self) -> Session {
        let i = &self.inner;
        let figures = self.stats();
        let flag = |a: &AtomicBool| AtomicBool::new(a.load(Ordering::Acquire));
        Session {
            inner: Arc::new(Inner {
                id: i.id,
                name: i.name.clone(),
                role: i.role,
                version: i.version,
                cfg: i.cfg.clone(),
                window: i.window,
                ring_bytes: i.ring_bytes,
                spill_pages: i.spill_pages,
                delta: i.delta,
                context: i.context,
                multifd_ring_pages: i.multifd_ring_pages,
                xref: None,
                keep: KeepState {
                    recorder: None,
                    peer_has: None,
                    collector: Mutex::new(HaveCollector::default()),
                    announced: None,
                    gave_up: AtomicBool::new(false),
                },
                budget: SessionBudget::new(0, 0),
                target: None,
                gate: None,
                links: Links {
                    streams: Vec::new(),
                    tx: Vec::new(),
                    next_tx: AtomicUsize::new(0),
                },
                channels: Channels {
                    map: Mutex::new(HashMap::new()),
                    opening: Mutex::new(()),
                    // No channel can be added to a retired handle.
                    next_id: AtomicUsize::new(usize::MAX / 2),
                },
                queues: Queues::new(0, 0, 0),
                life: Life {
                    failure: Mutex::new(i.life.failure.lock().clone()),
                    failed: flag(&i.life.failed),
                    complete: flag(&i.life.complete),
                    close_expected: Mutex::new(None),
                    readers_done: AtomicUsize::new(0),
                    first_eof: Mutex::new(None),
                    last_rx: Mutex::new(*i.life.last_rx.lock()),
                    started: i.life.started,
                    ended: Mutex::new(*i.life.ended.lock()),
                    threads: Mutex::new(Vec::new()),
                },
                flow: Flow {
                    credited: AtomicU64::new(0),
                    credited_wire: AtomicU64::new(0),
                    wire_inflight: AtomicU64::new(0),
                    credit_waiters: AtomicUsize::new(0),
                    credit_loop_min_us: AtomicU64::new(u64::MAX),
                },
                tuning: Tuning {
                    tier: Mutex::new(figures.tier),
                    target_inflight: AtomicU64::new(0),
                    delivery_rate: AtomicU64::new(figures.delivery_rate),
                    raw_rate: AtomicU64::new(figures.raw_rate),
                    credit_loop_us: AtomicU64::new(figures.credit_loop_us.unwrap_or(0) as u64),
                    raw_allowed: AtomicBool::new(true),
                    context: AtomicBool::new(false),
                    measured_capacity: AtomicU64::new(0),
                },
                counters: Counters::default(),
                adapt: Mutex::new(adapt::AdaptState::new(&i.cfg.adapt, i.life.started)),
                retired: Some(figures),
            }),
        }
    }

    /// Bytes of the session's budget its channels and dedup rings have
    /// taken so far, and what they may take ([`budget::SessionBudget`]).
    pub fn memory_charged(&self) -> (u64, u64) {
        (self.inner.budget.used(), self.inner.budget.limit())
    }
}

/// Charges a new channel's memory to the session's budget.
fn charge_channel(inner: &Inner, id: u16) -> Result<(), String> {
    inner.budget.charge(
        budget::channel_bytes(inner.window, inner.cfg.chunk as u64),
        || format!("opening channel {id}"),
    )
}

/// Frees what an ended session still holds (buffered frames, queued
/// frames), so a session kept for its figures keeps no data.
fn release_buffers(inner: &Inner) {
    for ch in inner.channels.map.lock().values() {
        let mut st = ch.recv.lock();
        st.frames = Default::default();
    }
    while inner.queues.job_rx.try_recv().is_ok() {}
    while inner.queues.frame_rx.try_recv().is_ok() {}
}

/// Fails the session (once; the first reason sticks): tells the peer
/// (an Abort frame from each writer) and wakes every waiting thread.
fn fail(inner: &Inner, reason: FailReason) {
    if inner.life.complete.load(Ordering::Acquire) {
        return;
    }
    if inner.life.failed.swap(true, Ordering::AcqRel) {
        return;
    }
    warn!(name = %inner.name, session = %hex(&inner.id), "session failed: {reason}");
    let text = reason.to_string();
    *inner.life.failure.lock() = Some(reason);
    *inner.life.ended.lock() = Some(Instant::now());
    for _ in 0..inner.links.streams.len() {
        let _ = inner.queues.ctrl_tx.try_send(Ctrl::Abort(text.clone()));
    }
    wake_all(inner);
}

fn wake_all(inner: &Inner) {
    for ch in inner.channels.map.lock().values() {
        ch.credit_cv.notify_all();
        ch.recv_cv.notify_all();
        if let Some(r) = &ch.direct {
            // stays readable: the reader sees the failure and never clears it
            r.signal();
        }
    }
}

fn is_down(inner: &Inner) -> bool {
    inner.life.failed.load(Ordering::Acquire)
}

fn open_channel(inner: &Arc<Inner>, id: u16, conn: LocalConn, read_local: bool) -> Arc<Channel> {
    open_channel_with(inner, id, conn, read_local, None)
}

/// [`open_channel`]; with `direct` the embedder reads the channel (no
/// deliverer thread).
fn open_channel_with(
    inner: &Arc<Inner>,
    id: u16,
    conn: LocalConn,
    read_local: bool,
    direct: Option<Arc<direct::ready::Readiness>>,
) -> Arc<Channel> {
    let deliver = direct.is_none();
    let ch = Arc::new(Channel {
        id,
        local: conn.try_clone().expect("dup of a connected socket"),
        credit: Mutex::new(inner.window),
        credit_cv: Condvar::new(),
        pending_credit: AtomicU64::new(0),
        recv: Mutex::new(RecvState::default()),
        recv_cv: Condvar::new(),
        sent_eof: AtomicBool::new(false),
        delivered_eof: AtomicBool::new(false),
        raw_out: AtomicU64::new(0),
        credited_raw: AtomicU64::new(0),
        raw_in: AtomicU64::new(0),
        sent: Mutex::new(SentLog::default()),
        unencoded: AtomicU64::new(0),
        direct,
    });
    inner.channels.map.lock().insert(id, ch.clone());
    debug!(name = %inner.name, channel = id, "channel opened");
    let reader_conn = conn.try_clone().expect("dup of a connected socket");
    let (i1, c1) = (inner.clone(), ch.clone());
    let (i2, c2) = (inner.clone(), ch.clone());
    let mut threads = inner.life.threads.lock();
    if read_local {
        threads.push(
            std::thread::Builder::new()
                .name(format!("dwcp-qemu-rx{id}"))
                .spawn(move || send::qemu_rx(i1, c1, reader_conn))
                .expect("spawn thread"),
        );
    }
    if deliver {
        threads.push(
            std::thread::Builder::new()
                .name(format!("dwcp-qemu-tx{id}"))
                .spawn(move || recv::qemu_tx(i2, c2, conn))
                .expect("spawn thread"),
        );
    }
    ch
}

/// The initiator completes when every channel it opened is finished both
/// ways; it then tells the responder (Close) how many channels there were.
/// The responder completes when it got that Close and has finished as many.
fn check_complete(inner: &Inner) {
    let chans = inner.channels.map.lock();
    let all_done = !chans.is_empty() && chans.values().all(|c| c.done());
    let announced = match inner.role {
        Role::Initiator => true,
        Role::Responder => *inner.life.close_expected.lock() == Some(chans.len() as u32),
    };
    if all_done && announced && !inner.life.failed.load(Ordering::Acquire) {
        if !inner.life.complete.swap(true, Ordering::AcqRel) {
            *inner.life.ended.lock() = Some(Instant::now());
            info!(name = %inner.name, session = %hex(&inner.id), "session completed");
            if let Some(r) = &inner.keep.recorder {
                r.finish();
            }
        }
        // Both ends are done with every channel; close our QEMU sockets fully.
        for c in chans.values() {
            let _ = c.local.shutdown(Shutdown::Both);
        }
    }
}
