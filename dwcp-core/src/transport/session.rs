//! Sessions: the threads, queues and state of one multi-stream migration.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::gate::{CutoverGate, TailHold, GATE_HOLD};
use super::tcp::{tcp_info, TcpInfo};
use super::TransportConfig;
use crate::codec::{CodecId, Compressor, Decompressor, Planner, Rebuilder, Tier};
use crate::wire::{self, FrameHeader, Hello, Kind, Reply, Status, WireError};

mod reader;
pub use reader::{ChannelReader, ReadError};

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Source host: QEMU connects to our UNIX socket, we open the streams.
    Initiator,
    /// Destination host: we accept the streams and connect to QEMU.
    Responder,
}

/// Why a session could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connecting stream {index} to {addr}: {source}")]
    Connect {
        index: usize,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake on stream {index} with {addr}: {source}")]
    Handshake {
        index: usize,
        addr: SocketAddr,
        source: WireError,
    },
    #[error("migration failed: {0}")]
    Failed(String),
    #[error("session already finished")]
    Finished,
    #[error("session has its maximum of {0} channels")]
    TooManyChannels(u16),
}

enum Incoming {
    Data {
        plan: Vec<u8>,
        raw_len: u32,
    },
    /// A [`Tier::Raw`] frame: the bytes themselves.
    Raw(Vec<u8>),
    Eof,
}

#[derive(Default)]
struct RecvState {
    next: u64,
    frames: BTreeMap<u64, Incoming>,
    /// Raw bytes buffered and not yet credited back.
    bytes: u64,
}

struct Channel {
    id: u16,
    /// Our side of the QEMU connection (a clone kept for shutdown).
    local: UnixStream,
    credit: Mutex<u64>,
    credit_cv: Condvar,
    /// Credit earned by delivering, waiting for a writer to send it.
    pending_credit: AtomicU64,
    recv: Mutex<RecvState>,
    recv_cv: Condvar,
    sent_eof: AtomicBool,
    delivered_eof: AtomicBool,
    raw_out: AtomicU64,
    raw_in: AtomicU64,
    /// Wire sizes of the Data frames sent and not yet credited back.
    sent: Mutex<SentLog>,
    /// Raw bytes read from QEMU and not yet encoded (counted at their raw
    /// size against the wire budget until their wire size is known).
    unencoded: AtomicU64,
    /// A channel read by the embedder ([`ChannelReader`]) instead of a
    /// deliverer thread: its readiness signal.
    direct: Option<Arc<reader::Readiness>>,
}

/// What a channel has on the wire: frames in the order they were encoded,
/// retired by the peer's credit (raw bytes, in delivery order). Encode
/// workers may finish frames out of order, so the wire attributed to a
/// credit can be off by a frame for a moment; the totals always agree.
#[derive(Default)]
struct SentLog {
    frames: std::collections::VecDeque<(u64, u64)>,
    /// Credit not yet matched to whole frames.
    carry: u64,
    /// Sum of the wire sizes in `frames`.
    wire: u64,
}

impl Channel {
    fn done(&self) -> bool {
        self.sent_eof.load(Ordering::Acquire) && self.delivered_eof.load(Ordering::Acquire)
    }

    /// Records a Data frame put on the wire (frame header included).
    fn note_sent(&self, inner: &Inner, raw: u64, wire: u64) {
        let mut log = self.sent.lock();
        log.frames.push_back((raw, wire));
        log.wire += wire;
        inner.wire_inflight.fetch_add(wire, Ordering::Relaxed);
    }

    /// Retires frames covered by `credit` raw bytes; returns their wire size.
    fn note_credit(&self, inner: &Inner, credit: u64) -> u64 {
        let mut log = self.sent.lock();
        let mut left = log.carry + credit;
        let mut wire = 0;
        while let Some(&(raw, w)) = log.frames.front() {
            if raw > left {
                break;
            }
            left -= raw;
            wire += w;
            log.frames.pop_front();
        }
        log.carry = left;
        log.wire -= wire;
        inner.wire_inflight.fetch_sub(wire, Ordering::Relaxed);
        wire
    }

    /// Wire bytes this channel has in flight, unencoded reads included.
    fn wire_inflight(&self) -> u64 {
        self.sent.lock().wire + self.unencoded.load(Ordering::Relaxed)
    }
}

enum Outgoing {
    Frame(FrameHeader, Vec<u8>),
    Close,
}

enum Ctrl {
    Credit(Arc<Channel>),
    Abort(String),
}

struct Job {
    ch: Arc<Channel>,
    channel: u16,
    seq: u64,
    raw_len: u32,
    plan: Vec<u8>,
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
    /// Data frames received per codec (none, lz4, zstd, raw).
    codec_in: [AtomicU64; 4],
    /// Raw data frames received without a payload checksum.
    unchecked_in: AtomicU64,
}

struct Inner {
    id: [u8; 16],
    name: String,
    role: Role,
    /// Protocol version of the session (the lower of both ends' newest).
    version: u16,
    cfg: TransportConfig,
    window: u64,
    ring_bytes: usize,
    tier: Mutex<Tier>,
    streams: Vec<TcpStream>,
    /// The streams' sending halves: a writer thread, or a direct channel's
    /// writer ([`ChannelWriter`]), holds the lock for each whole frame.
    tx: Vec<Mutex<TcpStream>>,
    /// Where a direct writer starts looking for a free stream.
    next_tx: AtomicUsize,
    channels: Mutex<HashMap<u16, Arc<Channel>>>,
    opening: Mutex<()>,
    next_channel: AtomicUsize,
    job_tx: Sender<Job>,
    job_rx: Receiver<Job>,
    frame_tx: Sender<Outgoing>,
    frame_rx: Receiver<Outgoing>,
    ctrl_tx: Sender<Ctrl>,
    ctrl_rx: Receiver<Ctrl>,
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
    complete: AtomicBool,
    /// Responder: channel count announced by the initiator's Close frame.
    close_expected: Mutex<Option<u32>>,
    /// Raw bytes the peer has credited back (delivered to its QEMU).
    credited: AtomicU64,
    /// Wire bytes of the frames those credits retired.
    credited_wire: AtomicU64,
    /// Wire bytes of Data frames sent and not yet credited (all channels).
    wire_inflight: AtomicU64,
    /// Raw bytes per second delivered, average of the last second.
    raw_rate: AtomicU64,
    /// Wire bytes all channels together may have in flight now (adaptive).
    target_inflight: AtomicU64,
    /// Bottleneck rate estimate, wire bytes/s (see [`SessionStats`]).
    delivery_rate: AtomicU64,
    /// Local readers currently waiting for credit (the link is the limit).
    credit_waiters: AtomicUsize,
    /// Frames queued (job or frame queue) and not yet written.
    inflight: AtomicU64,
    readers_done: AtomicUsize,
    first_eof: Mutex<Option<Instant>>,
    last_rx: Mutex<Instant>,
    started: Instant,
    ended: Mutex<Option<Instant>>,
    target: Option<Target>,
    /// The cutover gate on the main channel (a gated destination session).
    gate: Option<Arc<dyn CutoverGate>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    counters: Counters,
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

/// Per-stream figures, from the kernel's TCP_INFO.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStats {
    pub index: usize,
    pub tcp: Option<TcpInfo>,
}

/// Per-channel byte counts.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelStats {
    pub id: u16,
    pub raw_out: u64,
    pub raw_in: u64,
    pub done: bool,
}

/// A snapshot of a session's figures (what `dwcp stats` shows).
#[derive(Debug, Clone, Serialize)]
pub struct SessionStats {
    pub name: String,
    pub session: String,
    pub role: Role,
    /// `running`, `completed` or `failed`.
    pub state: String,
    pub error: Option<String>,
    pub elapsed_s: f64,
    pub tier: String,
    pub streams: usize,
    pub channels: Vec<ChannelStats>,
    /// QEMU bytes read from local sockets and sent.
    pub raw_out: u64,
    /// QEMU bytes received and written to local sockets.
    pub raw_in: u64,
    /// Bytes put on the TCP streams (headers included).
    pub wire_out: u64,
    pub wire_in: u64,
    pub frames_out: u64,
    pub frames_in: u64,
    /// raw_out / wire_out.
    pub ratio_out: f64,
    pub zero_bytes: u64,
    pub pages_seen: u64,
    pub pages_deduped: u64,
    /// Wire bytes sent whose data the peer has not yet delivered to its QEMU
    /// (plus reads not yet encoded): what must still cross the link.
    pub inflight_bytes: u64,
    /// Wire bytes per second delivered, highest of the last second's 100 ms
    /// samples: the bottleneck rate the in-flight budget is sized from; 0
    /// before the first sample.
    pub delivery_rate: u64,
    /// Raw (QEMU) bytes per second delivered, average over the last second.
    pub raw_rate: u64,
    /// Lowest RTT the streams measured, microseconds.
    pub min_rtt_us: Option<u32>,
    /// Data frames received per codec: what the peer actually sent (the
    /// wire names the codec of each frame, not the zstd level).
    pub codecs_in: CodecCounts,
    pub per_stream: Vec<StreamStats>,
}

/// Frames per codec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CodecCounts {
    pub none: u64,
    pub lz4: u64,
    pub zstd: u64,
    pub raw: u64,
    /// Of the raw frames, those sent without a payload checksum (see
    /// [`TransportConfig::checksum_raw`]).
    pub raw_unchecked: u64,
}

impl CodecCounts {
    /// The codec of most frames (`raw`, `none`, `lz4`, `zstd`), or None
    /// without frames.
    pub fn dominant(&self) -> Option<&'static str> {
        [
            ("zstd", self.zstd),
            ("lz4", self.lz4),
            ("none", self.none),
            ("raw", self.raw),
        ]
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .max_by_key(|&(_, n)| n)
        .map(|(c, _)| c)
    }
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Session {
    /// Opens `cfg.streams` TCP streams to a destination agent and performs the
    /// handshake on each (in parallel, so a long RTT is paid once).
    pub fn connect(
        cfg: &TransportConfig,
        name: &str,
        addr: SocketAddr,
    ) -> Result<Session, SessionError> {
        cfg.validate()
            .map_err(|e| SessionError::Failed(e.to_string()))?;
        wire::check_name(name).map_err(|e| SessionError::Failed(e.to_string()))?;
        let id: [u8; 16] = rand::random();
        let n = cfg.streams as usize;
        let results: Vec<Result<(TcpStream, Reply), SessionError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|index| {
                    s.spawn(move || {
                        let mut st = TcpStream::connect_timeout(&addr, cfg.connect_timeout)
                            .map_err(|source| SessionError::Connect {
                                index,
                                addr,
                                source,
                            })?;
                        cfg.tuning
                            .apply(&st)
                            .map_err(|source| SessionError::Connect {
                                index,
                                addr,
                                source,
                            })?;
                        st.set_read_timeout(Some(cfg.connect_timeout))
                            .map_err(|source| SessionError::Connect {
                                index,
                                addr,
                                source,
                            })?;
                        let hello = Hello {
                            version_min: wire::VERSION_MIN,
                            version_max: wire::VERSION_MAX,
                            session: id,
                            stream_index: index as u16,
                            stream_count: n as u16,
                            role: wire::Role::Data,
                            window: cfg.window,
                            ring_pages: cfg.ring_pages(),
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
        let mut window = cfg.window;
        let mut ring = cfg.ring_pages();
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
            version = version.min(reply.version);
            streams.push(st);
        }
        Ok(Session::start(
            Role::Initiator,
            id,
            name,
            cfg.clone(),
            (window, ring, version),
            streams,
            None,
            None,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        role: Role,
        id: [u8; 16],
        name: &str,
        cfg: TransportConfig,
        (window, ring_pages, version): (u32, u32, u16),
        streams: Vec<TcpStream>,
        target: Option<Target>,
        gate: Option<Arc<dyn CutoverGate>>,
    ) -> Session {
        let n = streams.len();
        let (job_tx, job_rx) = bounded(cfg.workers * 2);
        let (frame_tx, frame_rx) = bounded(n * 2 + 4);
        let (ctrl_tx, ctrl_rx) = bounded(cfg.max_channels as usize * 2 + n * 2 + 16);
        let mut shutdown_clones = Vec::with_capacity(n);
        let mut tx = Vec::with_capacity(n);
        for s in &streams {
            // A read timeout turns a silent peer into an error the watchdog sees.
            let _ = s.set_read_timeout(Some(cfg.idle_timeout));
            let _ = s.set_write_timeout(Some(cfg.idle_timeout));
            shutdown_clones.push(s.try_clone().expect("dup of a connected socket"));
            tx.push(Mutex::new(
                s.try_clone().expect("dup of a connected socket"),
            ));
        }
        let inner = Arc::new(Inner {
            id,
            name: name.to_string(),
            role,
            version,
            tier: Mutex::new(if cfg.auto_tier {
                TierTuner::initial_tier(name, &streams)
            } else {
                cfg.tier
            }),
            window: window as u64,
            ring_bytes: ring_pages as usize * crate::codec::PAGE_SIZE,
            cfg,
            streams: shutdown_clones,
            tx,
            next_tx: AtomicUsize::new(0),
            channels: Mutex::new(HashMap::new()),
            opening: Mutex::new(()),
            next_channel: AtomicUsize::new(0),
            job_tx,
            job_rx,
            frame_tx,
            frame_rx,
            ctrl_tx,
            ctrl_rx,
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            complete: AtomicBool::new(false),
            close_expected: Mutex::new(None),
            credited: AtomicU64::new(0),
            credited_wire: AtomicU64::new(0),
            wire_inflight: AtomicU64::new(0),
            raw_rate: AtomicU64::new(0),
            target_inflight: AtomicU64::new(INITIAL_INFLIGHT.min(window as u64)),
            delivery_rate: AtomicU64::new(0),
            credit_waiters: AtomicUsize::new(0),
            inflight: AtomicU64::new(0),
            readers_done: AtomicUsize::new(0),
            first_eof: Mutex::new(None),
            last_rx: Mutex::new(Instant::now()),
            started: Instant::now(),
            ended: Mutex::new(None),
            target,
            gate,
            threads: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        info!(name, session = %hex(&id), ?role, streams = n, window, ring_pages, "session started");
        let sess = Session { inner };
        for (i, s) in streams.into_iter().enumerate() {
            let inner = sess.inner.clone();
            sess.spawn(format!("dwcp-tx{i}"), move || writer(inner, i));
            let inner = sess.inner.clone();
            sess.spawn(format!("dwcp-rx{i}"), move || reader(inner, i, s));
        }
        for i in 0..sess.inner.cfg.workers {
            let inner = sess.inner.clone();
            sess.spawn(format!("dwcp-enc{i}"), move || encoder(inner));
        }
        let inner = sess.inner.clone();
        sess.spawn("dwcp-watch".into(), move || watchdog(inner));
        sess
    }

    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) {
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(f)
            .expect("spawn thread");
        self.inner.threads.lock().push(h);
    }

    /// Whether `other` is a handle of this same session.
    pub fn same(&self, other: &Session) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Adds a QEMU connection accepted on the source host as a new channel.
    pub fn add_local_channel(&self, conn: UnixStream) -> Result<u16, SessionError> {
        let id = self.next_channel_id()?;
        open_channel(&self.inner, id, conn, true);
        Ok(id)
    }

    /// Adds a channel whose bytes the caller sends with the returned
    /// [`ChannelWriter`]; what the peer sends back on it is written to
    /// `conn` (the return path), and `conn` is shut down once the session
    /// completes. Nothing is read from `conn`.
    pub fn add_direct_channel(&self, conn: UnixStream) -> Result<ChannelWriter, SessionError> {
        let id = self.next_channel_id()?;
        let ch = open_channel(&self.inner, id, conn, false);
        Ok(ChannelWriter {
            tx: Mutex::new(FrameSender::new(&self.inner)),
            inner: self.inner.clone(),
            ch,
            stop: AtomicBool::new(false),
        })
    }

    fn next_channel_id(&self) -> Result<u16, SessionError> {
        if self.inner.complete.load(Ordering::Acquire) {
            return Err(SessionError::Finished);
        }
        if let Some(e) = self.failure() {
            return Err(SessionError::Failed(e));
        }
        let id = self.inner.next_channel.fetch_add(1, Ordering::AcqRel);
        if id >= self.inner.cfg.max_channels as usize {
            return Err(SessionError::TooManyChannels(self.inner.cfg.max_channels));
        }
        Ok(id as u16)
    }

    /// Changes the compression tier of frames encoded from now on.
    pub fn set_tier(&self, tier: Tier) {
        *self.inner.tier.lock() = tier;
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The failure reason, once the session has failed.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure.lock().clone()
    }

    pub fn is_finished(&self) -> bool {
        self.inner.complete.load(Ordering::Acquire) || self.inner.failed.load(Ordering::Acquire)
    }

    /// Fails the session from outside (cancel).
    pub fn abort(&self, reason: &str) {
        fail(&self.inner, reason.to_string());
    }

    /// Waits for every thread of the session to end; returns the final stats,
    /// or the failure.
    pub fn wait(&self) -> Result<SessionStats, SessionError> {
        loop {
            let next = self.inner.threads.lock().pop();
            match next {
                Some(h) => {
                    let _ = h.join();
                }
                None => break,
            }
        }
        match self.failure() {
            Some(e) => Err(SessionError::Failed(e)),
            None => Ok(self.stats()),
        }
    }

    pub fn stats(&self) -> SessionStats {
        let i = &self.inner;
        let c = &i.counters;
        let state = if i.failed.load(Ordering::Acquire) {
            "failed"
        } else if i.complete.load(Ordering::Acquire) {
            "completed"
        } else {
            "running"
        };
        let end = i.ended.lock().unwrap_or_else(Instant::now);
        let raw_out = c.raw_out.load(Ordering::Relaxed);
        let wire_out = c.wire_out.load(Ordering::Relaxed);
        let mut channels: Vec<ChannelStats> = i
            .channels
            .lock()
            .values()
            .map(|ch| ChannelStats {
                id: ch.id,
                raw_out: ch.raw_out.load(Ordering::Relaxed),
                raw_in: ch.raw_in.load(Ordering::Relaxed),
                done: ch.done(),
            })
            .collect();
        channels.sort_by_key(|c| c.id);
        SessionStats {
            name: i.name.clone(),
            session: hex(&i.id),
            role: i.role,
            state: state.into(),
            error: i.failure.lock().clone(),
            elapsed_s: end.duration_since(i.started).as_secs_f64(),
            tier: i.tier.lock().to_string(),
            streams: i.streams.len(),
            channels,
            raw_out,
            raw_in: c.raw_in.load(Ordering::Relaxed),
            wire_out,
            wire_in: c.wire_in.load(Ordering::Relaxed),
            frames_out: c.frames_out.load(Ordering::Relaxed),
            frames_in: c.frames_in.load(Ordering::Relaxed),
            ratio_out: if wire_out > 0 {
                raw_out as f64 / wire_out as f64
            } else {
                0.0
            },
            zero_bytes: c.zero_bytes.load(Ordering::Relaxed),
            pages_seen: c.pages_seen.load(Ordering::Relaxed),
            pages_deduped: c.pages_deduped.load(Ordering::Relaxed),
            inflight_bytes: i.wire_inflight.load(Ordering::Relaxed)
                + i.channels
                    .lock()
                    .values()
                    .map(|c| c.unencoded.load(Ordering::Relaxed))
                    .sum::<u64>(),
            delivery_rate: i.delivery_rate.load(Ordering::Relaxed),
            raw_rate: i.raw_rate.load(Ordering::Relaxed),
            min_rtt_us: path_min_rtt_us(&i.streams),
            codecs_in: CodecCounts {
                none: c.codec_in[0].load(Ordering::Relaxed),
                lz4: c.codec_in[1].load(Ordering::Relaxed),
                zstd: c.codec_in[2].load(Ordering::Relaxed),
                raw: c.codec_in[3].load(Ordering::Relaxed),
                raw_unchecked: c.unchecked_in.load(Ordering::Relaxed),
            },
            per_stream: i
                .streams
                .iter()
                .enumerate()
                .map(|(index, s)| StreamStats {
                    index,
                    tcp: tcp_info(s).ok(),
                })
                .collect(),
        }
    }
}

fn fail(inner: &Inner, reason: String) {
    if inner.complete.load(Ordering::Acquire) {
        return;
    }
    if inner.failed.swap(true, Ordering::AcqRel) {
        return;
    }
    warn!(name = %inner.name, session = %hex(&inner.id), "session failed: {reason}");
    *inner.failure.lock() = Some(reason.clone());
    *inner.ended.lock() = Some(Instant::now());
    for _ in 0..inner.streams.len() {
        let _ = inner.ctrl_tx.try_send(Ctrl::Abort(reason.clone()));
    }
    wake_all(inner);
}

fn wake_all(inner: &Inner) {
    for ch in inner.channels.lock().values() {
        ch.credit_cv.notify_all();
        ch.recv_cv.notify_all();
        if let Some(r) = &ch.direct {
            // stays readable: the reader sees the failure and never clears it
            r.signal();
        }
    }
}

fn is_down(inner: &Inner) -> bool {
    inner.failed.load(Ordering::Acquire)
}

fn open_channel(inner: &Arc<Inner>, id: u16, conn: UnixStream, read_local: bool) -> Arc<Channel> {
    open_channel_with(inner, id, conn, read_local, None)
}

/// [`open_channel`]; with `direct` the embedder reads the channel (no
/// deliverer thread).
fn open_channel_with(
    inner: &Arc<Inner>,
    id: u16,
    conn: UnixStream,
    read_local: bool,
    direct: Option<Arc<reader::Readiness>>,
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
        raw_in: AtomicU64::new(0),
        sent: Mutex::new(SentLog::default()),
        unencoded: AtomicU64::new(0),
        direct,
    });
    inner.channels.lock().insert(id, ch.clone());
    debug!(name = %inner.name, channel = id, "channel opened");
    let reader_conn = conn.try_clone().expect("dup of a connected socket");
    let (i1, c1) = (inner.clone(), ch.clone());
    let (i2, c2) = (inner.clone(), ch.clone());
    let mut threads = inner.threads.lock();
    if read_local {
        threads.push(
            std::thread::Builder::new()
                .name(format!("dwcp-in{id}"))
                .spawn(move || local_reader(i1, c1, reader_conn))
                .expect("spawn thread"),
        );
    }
    if deliver {
        threads.push(
            std::thread::Builder::new()
                .name(format!("dwcp-out{id}"))
                .spawn(move || deliverer(i2, c2, conn))
                .expect("spawn thread"),
        );
    }
    ch
}

/// The sending half of one channel: waits for credit, turns bytes into
/// frames (raw, or planned and queued for the encoders) and ends the stream.
/// Fed by [`local_reader`] (bytes read from a local socket) or by a
/// [`ChannelWriter`] (bytes handed over by the embedder).
struct FrameSender {
    planner: Planner,
    buf: Vec<u8>,
    seq: u64,
    last: crate::codec::PlanStats,
}

impl FrameSender {
    fn new(inner: &Inner) -> FrameSender {
        let planner = Planner::new(inner.ring_bytes);
        let last = planner.stats();
        FrameSender {
            planner,
            buf: Vec::with_capacity(inner.cfg.chunk),
            seq: 0,
            last,
        }
    }

    /// Waits until the channel may send, and returns how many bytes (at
    /// most one chunk); None once the session is down or `stop` is set.
    fn wait_allowed(inner: &Inner, ch: &Channel, stop: Option<&AtomicBool>) -> Option<usize> {
        // Wait for credit before reading, so we never hold more than the
        // peer agreed to buffer.
        let mut credit = ch.credit.lock();
        loop {
            if is_down(inner) || stop.is_some_and(|s| s.load(Ordering::Acquire)) {
                return None;
            }
            let allowed = allowed_bytes(inner, ch, *credit);
            if allowed > 0 {
                return Some(allowed.min(inner.cfg.chunk));
            }
            inner.credit_waiters.fetch_add(1, Ordering::Relaxed);
            ch.credit_cv
                .wait_for(&mut credit, Duration::from_millis(20));
            inner.credit_waiters.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether frames go out raw (no planning, no encoder).
    fn raw(inner: &Inner) -> bool {
        inner.version >= wire::VERSION_RAW && *inner.tier.lock() == Tier::Raw
    }

    /// Whether raw frames go without a payload checksum (see
    /// [`TransportConfig::checksum_raw`]).
    fn unchecked(inner: &Inner) -> bool {
        inner.version >= wire::VERSION_UNCHECKED && !inner.cfg.checksum_raw
    }

    /// Takes `n` bytes of credit and returns the channel's next raw frame
    /// header; `crc` None makes it an unchecked frame.
    fn raw_header(
        &mut self,
        inner: &Inner,
        ch: &Channel,
        n: usize,
        crc: Option<u32>,
    ) -> FrameHeader {
        let seq = self.account(inner, ch, n);
        ch.note_sent(inner, n as u64, (wire::FRAME_HEADER_LEN + n) as u64);
        FrameHeader {
            kind: Kind::Data,
            codec: CodecId::Raw as u8 | if crc.is_some() { 0 } else { wire::UNCHECKED },
            channel: ch.id,
            len: n as u32,
            seq,
            plan_len: n as u32,
            wire_len: n as u32,
            payload_crc: crc.unwrap_or(0),
        }
    }

    /// Takes `n` bytes of credit, counts them as sent and numbers the frame.
    fn account(&mut self, inner: &Inner, ch: &Channel, n: usize) -> u64 {
        *ch.credit.lock() -= n as u64;
        inner
            .counters
            .raw_out
            .fetch_add(n as u64, Ordering::Relaxed);
        ch.raw_out.fetch_add(n as u64, Ordering::Relaxed);
        let seq = self.seq;
        self.seq += 1;
        seq
    }

    /// A buffer to fill with the next `allowed` bytes: raw frames own their
    /// buffer (it travels to the socket writer); planned frames reuse one.
    fn take_buf(&mut self, raw: bool, allowed: usize) -> Vec<u8> {
        let mut data = if raw {
            Vec::with_capacity(allowed)
        } else {
            std::mem::take(&mut self.buf)
        };
        data.clear();
        data
    }

    /// Queues `data` (non-empty, within the credit just granted) as the
    /// channel's next frame; a raw frame of a direct channel (`inline`) is
    /// written to a stream by the calling thread instead. False when the
    /// session is shutting down.
    fn send(
        &mut self,
        inner: &Arc<Inner>,
        ch: &Arc<Channel>,
        raw: bool,
        inline: bool,
        data: Vec<u8>,
    ) -> bool {
        let n = data.len();
        if raw {
            let crc = (!Self::unchecked(inner)).then(|| crc32c::crc32c(&data));
            let h = self.raw_header(inner, ch, n, crc);
            if inline {
                return write_inline(inner, &h, &[std::io::IoSlice::new(&data)]);
            }
            inner.inflight.fetch_add(1, Ordering::AcqRel);
            return inner.frame_tx.send(Outgoing::Frame(h, data)).is_ok();
        }
        let seq = self.account(inner, ch, n);
        ch.unencoded.fetch_add(n as u64, Ordering::Relaxed);
        let mut plan = Vec::with_capacity(n + 64);
        self.planner.plan(&data, &mut plan);
        self.buf = data;
        let st = self.planner.stats();
        let c = &inner.counters;
        c.zero_bytes
            .fetch_add(st.zero_bytes - self.last.zero_bytes, Ordering::Relaxed);
        c.pages_seen
            .fetch_add(st.pages_seen - self.last.pages_seen, Ordering::Relaxed);
        c.pages_deduped.fetch_add(
            st.pages_deduped - self.last.pages_deduped,
            Ordering::Relaxed,
        );
        self.last = st;
        inner.inflight.fetch_add(1, Ordering::AcqRel);
        let job = Job {
            ch: ch.clone(),
            channel: ch.id,
            seq,
            raw_len: n as u32,
            plan,
        };
        inner.job_tx.send(job).is_ok()
    }

    /// Queues the channel's end of stream (once), waiting for room in the
    /// send queue.
    fn eof(&mut self, inner: &Inner, ch: &Channel) {
        self.eof_with(inner, ch, |f| inner.frame_tx.send(f).is_ok());
    }

    /// [`FrameSender::eof`] for callers that must not block (QEMU's close
    /// and shutdown, on its main loop): when the send queue is full (the
    /// streams stalled), a short-lived thread waits for room instead.
    fn eof_nonblocking(&mut self, inner: &Inner, ch: &Channel) {
        self.eof_with(inner, ch, |f| match inner.frame_tx.try_send(f) {
            Ok(()) => true,
            Err(crossbeam_channel::TrySendError::Full(f)) => {
                let tx = inner.frame_tx.clone();
                std::thread::Builder::new()
                    .name("dwcp-eof".into())
                    .spawn(move || {
                        let _ = tx.send(f);
                    })
                    .is_ok()
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
        });
    }

    fn eof_with(&mut self, inner: &Inner, ch: &Channel, send: impl FnOnce(Outgoing) -> bool) {
        if ch.sent_eof.load(Ordering::Acquire) {
            return;
        }
        let h = FrameHeader {
            kind: Kind::Eof,
            codec: 0,
            channel: ch.id,
            len: 0,
            seq: self.seq,
            plan_len: 0,
            wire_len: 0,
            payload_crc: crc32c::crc32c(&[]),
        };
        inner.inflight.fetch_add(1, Ordering::AcqRel);
        if !send(Outgoing::Frame(h, Vec::new())) {
            return;
        }
        ch.sent_eof.store(true, Ordering::Release);
        debug!(channel = ch.id, seq = self.seq, "local end of stream");
        check_complete(inner);
    }
}

/// Writes a frame to a stream from the calling thread (a direct channel's
/// writer), saving the hand-off to a writer thread: the first stream whose
/// lock is free, or else the next one in turn (waiting for it). A checked
/// frame's payload is a copy taken from QEMU, so the checksum matches what
/// is sent even while the guest keeps writing to the pages; an unchecked
/// one is QEMU's own buffers, which the kernel copies during the call.
fn write_inline(inner: &Inner, h: &FrameHeader, payload: &[std::io::IoSlice<'_>]) -> bool {
    let n = inner.tx.len();
    let start = inner.next_tx.fetch_add(1, Ordering::Relaxed);
    let mut guard = (0..n)
        .find_map(|k| inner.tx[(start + k) % n].try_lock())
        .unwrap_or_else(|| inner.tx[start % n].lock());
    if is_down(inner) {
        return false;
    }
    if let Err(e) = wire::write_frame_vectored(&mut *guard, h, payload) {
        drop(guard);
        fail(inner, format!("sending to the peer failed: {e}"));
        return false;
    }
    drop(guard);
    inner.counters.wire_out.fetch_add(
        (wire::FRAME_HEADER_LEN + h.wire_len as usize) as u64,
        Ordering::Relaxed,
    );
    inner.counters.frames_out.fetch_add(1, Ordering::Relaxed);
    true
}

/// Reads what QEMU writes to its connection and queues it for encoding.
fn local_reader(inner: Arc<Inner>, ch: Arc<Channel>, mut conn: UnixStream) {
    let mut tx = FrameSender::new(&inner);
    loop {
        let Some(allowed) = FrameSender::wait_allowed(&inner, &ch, None) else {
            return;
        };
        let raw = FrameSender::raw(&inner);
        let mut data = tx.take_buf(raw, allowed);
        let n = match read_some(&mut conn, &mut data, allowed) {
            Ok(n) => n,
            Err(e) => {
                if !is_down(&inner) {
                    debug!(
                        channel = ch.id,
                        "local read error treated as end of stream: {e}"
                    );
                }
                0
            }
        };
        if is_down(&inner) {
            return;
        }
        if n == 0 {
            tx.eof(&inner, &ch);
            return;
        }
        if !tx.send(&inner, &ch, raw, false, data) {
            return;
        }
    }
}

/// Why [`ChannelWriter::write_vectored`] did not take the bytes.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("migration failed: {0}")]
    Failed(String),
    #[error("the channel was shut down")]
    Shutdown,
    #[error("the channel's stream was already ended")]
    Ended,
}

/// The sending half of a channel whose bytes the embedder hands over with
/// [`ChannelWriter::write_vectored`] instead of writing them to a local
/// socket (one copy less, no relay thread); the channel's other direction
/// still goes to the local socket given to [`Session::add_direct_channel`].
/// Dropping it ends the stream like [`ChannelWriter::finish`].
pub struct ChannelWriter {
    inner: Arc<Inner>,
    ch: Arc<Channel>,
    tx: Mutex<FrameSender>,
    stop: AtomicBool,
}

impl std::fmt::Debug for ChannelWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelWriter")
            .field("channel", &self.ch.id)
            .finish()
    }
}

impl ChannelWriter {
    /// The channel's number in the session.
    pub fn id(&self) -> u16 {
        self.ch.id
    }

    /// Sends all of `bufs` as the channel's next bytes, in order. Blocks
    /// while the peer's credit or the in-flight budget is used up; returns
    /// the number of bytes taken (their sum) once all are queued.
    pub fn write_vectored(&self, bufs: &[std::io::IoSlice<'_>]) -> Result<usize, WriteError> {
        let inner = &self.inner;
        let ch = &self.ch;
        let mut tx = self.tx.lock();
        if self.stop.load(Ordering::Acquire) {
            return Err(WriteError::Shutdown);
        }
        if ch.sent_eof.load(Ordering::Acquire) {
            return Err(WriteError::Ended);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut pieces = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = pieces.next().unwrap_or(&[]);
        let mut left = total;
        while left > 0 {
            let Some(allowed) = FrameSender::wait_allowed(inner, ch, Some(&self.stop)) else {
                if self.stop.load(Ordering::Acquire) && !is_down(inner) {
                    // shut down while we held the sender: end the stream now
                    tx.eof(inner, ch);
                }
                return Err(self.why());
            };
            let raw = FrameSender::raw(inner);
            let want = allowed.min(left);
            if raw && FrameSender::unchecked(inner) {
                // Straight from the caller's buffers: no copy, no checksum.
                let mut slices = Vec::with_capacity(bufs.len());
                let mut need = want;
                while need > 0 {
                    if cur.is_empty() {
                        cur = pieces.next().unwrap_or(&[]);
                    }
                    let k = cur.len().min(need);
                    slices.push(std::io::IoSlice::new(&cur[..k]));
                    cur = &cur[k..];
                    need -= k;
                }
                left -= want;
                let h = tx.raw_header(inner, ch, want, None);
                if !write_inline(inner, &h, &slices) {
                    return Err(self.why());
                }
                continue;
            }
            let mut data = tx.take_buf(raw, want);
            while data.len() < want {
                if cur.is_empty() {
                    cur = pieces.next().unwrap_or(&[]);
                }
                let k = cur.len().min(want - data.len());
                data.extend_from_slice(&cur[..k]);
                cur = &cur[k..];
            }
            left -= want;
            if !tx.send(inner, ch, raw, true, data) {
                return Err(self.why());
            }
        }
        Ok(total)
    }

    fn why(&self) -> WriteError {
        match self.inner.failure.lock().clone() {
            Some(e) => WriteError::Failed(e),
            None if self.stop.load(Ordering::Acquire) => WriteError::Shutdown,
            None => WriteError::Failed("session is shutting down".into()),
        }
    }

    /// Ends the channel's stream after everything written so far (the
    /// peer's QEMU reads end of file). Later writes fail; twice is harmless.
    /// Does not block (beyond a write still running on the channel).
    pub fn finish(&self) {
        let mut tx = self.tx.lock();
        if is_down(&self.inner) {
            return;
        }
        tx.eof_nonblocking(&self.inner, &self.ch);
    }

    /// Like shutdown(2) on the socket it replaces (QEMU shuts channels down
    /// on migrate_cancel and yank, and multifd's at the end of every
    /// migration): a write blocked for credit, and every later one, fail at
    /// once, and the stream ends after what was already sent (by the
    /// blocked writer as it gives up, else here). Does not block.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        {
            let _g = self.ch.credit.lock();
            self.ch.credit_cv.notify_all();
        }
        if let Some(mut tx) = self.tx.try_lock() {
            if !is_down(&self.inner) {
                tx.eof_nonblocking(&self.inner, &self.ch);
            }
        }
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Appends to `buf` one blocking read, then whatever more is already queued
/// (without blocking), `max` bytes at most: frames are large when QEMU is
/// fast and prompt when it is not. Reads into the spare capacity, so the
/// buffer is never zero-filled first.
fn read_some(conn: &mut UnixStream, buf: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    buf.reserve(max);
    let start = buf.len();
    let mut flags = 0;
    while buf.len() - start < max {
        let want = max - (buf.len() - start);
        let spare = buf.spare_capacity_mut();
        // SAFETY: the fd is a live socket owned by `conn`; `spare` is
        // writable memory of at least `want` bytes (reserved above) that recv
        // fills at most, and it reports how many bytes it initialised.
        let r = unsafe { libc::recv(conn.as_raw_fd(), spare.as_mut_ptr().cast(), want, flags) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                _ if flags != 0 => break,
                _ => return Err(e),
            }
        }
        if r == 0 {
            break;
        }
        // SAFETY: recv initialised the first `r` (<= want) bytes of the
        // spare capacity.
        unsafe { buf.set_len(buf.len() + r as usize) };
        flags = libc::MSG_DONTWAIT;
    }
    Ok(buf.len() - start)
}

fn encoder(inner: Arc<Inner>) {
    let mut comp = Compressor::new();
    loop {
        let job = match inner.job_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(j) => j,
            Err(_) => {
                if is_down(&inner) || inner.complete.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
        };
        let tier = *inner.tier.lock();
        let mut out = Vec::with_capacity(job.plan.len() / 2 + 64);
        let codec = comp.compress(tier, &job.plan, &mut out);
        let plan_len = job.plan.len() as u32;
        let payload = if codec == CodecId::None {
            job.plan
        } else {
            out
        };
        let h = FrameHeader {
            kind: Kind::Data,
            codec: codec as u8,
            channel: job.channel,
            len: job.raw_len,
            seq: job.seq,
            plan_len,
            wire_len: payload.len() as u32,
            payload_crc: crc32c::crc32c(&payload),
        };
        job.ch.note_sent(
            &inner,
            job.raw_len as u64,
            (wire::FRAME_HEADER_LEN + payload.len()) as u64,
        );
        job.ch
            .unencoded
            .fetch_sub(job.raw_len as u64, Ordering::Relaxed);
        if inner.frame_tx.send(Outgoing::Frame(h, payload)).is_err() {
            return;
        }
    }
}

fn writer(inner: Arc<Inner>, index: usize) {
    let ping = Duration::from_millis(1000);
    let stream = &inner.tx[index];
    let write = |h: FrameHeader, payload: &[u8]| -> bool {
        if let Err(e) = wire::write_frame(&mut *stream.lock(), &h, payload) {
            fail(
                &inner,
                format!("stream {index}: sending to the peer failed: {e}"),
            );
            return false;
        }
        inner.counters.wire_out.fetch_add(
            (wire::FRAME_HEADER_LEN + payload.len()) as u64,
            Ordering::Relaxed,
        );
        inner.counters.frames_out.fetch_add(1, Ordering::Relaxed);
        true
    };
    let control = |kind, channel, len| FrameHeader {
        kind,
        codec: 0,
        channel,
        len,
        seq: 0,
        plan_len: 0,
        wire_len: 0,
        payload_crc: crc32c::crc32c(&[]),
    };
    loop {
        enum Item {
            Ctrl(Ctrl),
            Out(Outgoing),
            Ping,
            Gone,
        }
        let item = match inner.ctrl_rx.try_recv() {
            Ok(c) => Item::Ctrl(c),
            Err(_) => select! {
                recv(inner.ctrl_rx) -> c => c.map(Item::Ctrl).unwrap_or(Item::Gone),
                recv(inner.frame_rx) -> f => f.map(Item::Out).unwrap_or(Item::Gone),
                default(ping) => Item::Ping,
            },
        };
        match item {
            Item::Ctrl(Ctrl::Credit(ch)) => {
                let n = ch.pending_credit.swap(0, Ordering::AcqRel);
                if n > 0 && !is_down(&inner) && !write(control(Kind::Window, ch.id, n as u32), &[])
                {
                    return;
                }
            }
            Item::Ctrl(Ctrl::Abort(reason)) => {
                let mut msg = reason.into_bytes();
                msg.truncate(wire::MAX_ABORT_LEN);
                let h = FrameHeader {
                    wire_len: msg.len() as u32,
                    payload_crc: crc32c::crc32c(&msg),
                    ..control(Kind::Abort, 0, 0)
                };
                let mut w = stream.lock();
                let _ = w.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = wire::write_frame(&mut *w, &h, &msg);
                return;
            }
            Item::Out(Outgoing::Frame(h, payload)) => {
                if is_down(&inner) {
                    return;
                }
                let ok = write(h, &payload);
                inner.inflight.fetch_sub(1, Ordering::AcqRel);
                if !ok {
                    return;
                }
            }
            Item::Out(Outgoing::Close) => {
                let mut w = stream.lock();
                let _ = w.flush();
                let _ = w.shutdown(Shutdown::Write);
                return;
            }
            Item::Ping => {
                if is_down(&inner) {
                    return;
                }
                if !write(control(Kind::Ping, 0, 0), &[]) {
                    return;
                }
            }
            Item::Gone => return,
        }
    }
}

/// Read buffer of each stream's receiving thread, bytes.
const RX_BUFFER: usize = 16 << 10;

fn reader(inner: Arc<Inner>, index: usize, stream: TcpStream) {
    let max_channels = inner.cfg.max_channels;
    // Small on purpose: frame headers come through the buffer, but a
    // payload read at least this large bypasses it and lands straight in
    // the frame's Vec (with 256 KiB, most of every payload was copied
    // twice: socket -> buffer -> Vec).
    let mut r = BufReader::with_capacity(RX_BUFFER, stream);
    let mut dec = Decompressor::new();
    let mut payload = Vec::new();
    loop {
        let h = match FrameHeader::read(&mut r, max_channels) {
            Ok(Some(h)) => h,
            Ok(None) => {
                debug!(stream = index, "peer closed stream");
                let mut first = inner.first_eof.lock();
                first.get_or_insert_with(Instant::now);
                inner.readers_done.fetch_add(1, Ordering::AcqRel);
                return;
            }
            Err(e) => {
                inner.readers_done.fetch_add(1, Ordering::AcqRel);
                if is_down(&inner) || inner.complete.load(Ordering::Acquire) {
                    return;
                }
                let msg = match &e {
                    WireError::Io { source, .. }
                        if matches!(
                            source.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        format!(
                            "stream {index}: nothing from the peer for {:?}",
                            inner.cfg.idle_timeout
                        )
                    }
                    _ => format!("stream {index}: {e}"),
                };
                fail(&inner, msg);
                return;
            }
        };
        *inner.last_rx.lock() = Instant::now();
        inner.counters.frames_in.fetch_add(1, Ordering::Relaxed);
        inner.counters.wire_in.fetch_add(
            (wire::FRAME_HEADER_LEN + h.wire_len as usize) as u64,
            Ordering::Relaxed,
        );
        if let Err(e) = handle_frame(&inner, &mut r, &h, &mut dec, &mut payload) {
            inner.readers_done.fetch_add(1, Ordering::AcqRel);
            fail(&inner, format!("stream {index}: {e}"));
            return;
        }
    }
}

fn handle_frame(
    inner: &Arc<Inner>,
    r: &mut impl Read,
    h: &FrameHeader,
    dec: &mut Decompressor,
    payload: &mut Vec<u8>,
) -> Result<(), String> {
    match h.kind {
        Kind::Ping => Ok(()),
        Kind::Close => {
            if inner.role != Role::Responder {
                return Err("Close frame from the responder".into());
            }
            *inner.close_expected.lock() = Some(h.len);
            check_complete(inner);
            Ok(())
        }
        Kind::Abort => {
            wire::read_payload(r, h, payload).map_err(|e| e.to_string())?;
            Err(format!(
                "peer aborted: {}",
                String::from_utf8_lossy(payload)
            ))
        }
        Kind::Window => {
            let ch = inner
                .channels
                .lock()
                .get(&h.channel)
                .cloned()
                .ok_or_else(|| format!("credit for channel {} which is not open", h.channel))?;
            inner.credited.fetch_add(h.len as u64, Ordering::Relaxed);
            let wire = ch.note_credit(inner, h.len as u64);
            inner.credited_wire.fetch_add(wire, Ordering::Relaxed);
            let mut credit = ch.credit.lock();
            *credit += h.len as u64;
            if *credit > inner.window {
                return Err(format!(
                    "peer granted credit beyond the window on channel {}",
                    h.channel
                ));
            }
            ch.credit_cv.notify_all();
            Ok(())
        }
        Kind::Data | Kind::Eof => {
            let item = if h.kind == Kind::Data {
                wire::read_payload(r, h, payload)
                    .map_err(|e| format!("channel {} frame {}: {e}", h.channel, h.seq))?;
                let codec = h.codec_id().expect("validated by decode");
                inner.counters.codec_in[codec as usize - 1].fetch_add(1, Ordering::Relaxed);
                if !h.checked() {
                    inner.counters.unchecked_in.fetch_add(1, Ordering::Relaxed);
                }
                if codec == CodecId::Raw {
                    // Lengths checked equal by the header's validation.
                    Incoming::Raw(std::mem::take(payload))
                } else {
                    let mut plan = Vec::new();
                    dec.decompress(codec, payload, h.plan_len as usize, &mut plan)
                        .map_err(|e| format!("channel {} frame {}: {e}", h.channel, h.seq))?;
                    Incoming::Data {
                        plan,
                        raw_len: h.len,
                    }
                }
            } else {
                Incoming::Eof
            };
            let ch = channel_for(inner, h.channel)?;
            let mut st = ch.recv.lock();
            if h.seq < st.next || st.frames.contains_key(&h.seq) {
                return Err(format!("channel {} frame {} repeated", h.channel, h.seq));
            }
            if h.seq > st.next + 1_000_000 {
                return Err(format!(
                    "channel {} frame {} far out of range (next is {})",
                    h.channel, h.seq, st.next
                ));
            }
            let raw_len = match &item {
                Incoming::Data { raw_len, .. } => Some(*raw_len as u64),
                Incoming::Raw(data) => Some(data.len() as u64),
                Incoming::Eof => None,
            };
            if let Some(raw_len) = raw_len {
                st.bytes += raw_len;
                if st.bytes > inner.window {
                    return Err(format!(
                        "channel {}: peer sent beyond its credit window",
                        h.channel
                    ));
                }
            }
            st.frames.insert(h.seq, item);
            if st.frames.len() > 4 * (inner.window as usize / 4096 + 16) {
                return Err(format!(
                    "channel {}: too many small frames buffered",
                    h.channel
                ));
            }
            ch.recv_cv.notify_all();
            if let Some(r) = &ch.direct {
                if r.is_detached() {
                    drop(st);
                    return reader::drain_detached(inner, &ch);
                }
                r.frame_arrived();
            }
            Ok(())
        }
    }
}

/// The channel a frame belongs to; on the responder, the first frame of a new
/// channel opens a connection to QEMU's incoming socket.
fn channel_for(inner: &Arc<Inner>, id: u16) -> Result<Arc<Channel>, String> {
    if let Some(ch) = inner.channels.lock().get(&id) {
        return Ok(ch.clone());
    }
    let Some(target) = &inner.target else {
        return Err(format!("frame for channel {id}, which was never opened"));
    };
    // One opener at a time, so two streams racing on a new channel's first
    // frames open one QEMU connection, not two.
    let _opening = inner.opening.lock();
    if let Some(ch) = inner.channels.lock().get(&id) {
        return Ok(ch.clone());
    }
    if let Target::Direct(hand_over) = target {
        return reader::open_direct(inner, id, hand_over.as_ref())
            .map_err(|e| format!("opening channel {id}: {e}"));
    }
    let conn = target
        .connect(id)
        .map_err(|e| format!("opening channel {id}: {e}"))?;
    Ok(open_channel(inner, id, conn, true))
}

/// Where a responder's channels go.
#[derive(Clone)]
pub enum Target {
    /// Connect to QEMU's incoming UNIX socket (the agent's way).
    Socket(PathBuf),
    /// Ask the embedder for one connection per channel (libdwcp inside QEMU
    /// hands QEMU the other end of a socketpair).
    Connector(Arc<dyn Fn(u16) -> std::io::Result<UnixStream> + Send + Sync>),
    /// Hand each channel to the embedder to read with a [`ChannelReader`]
    /// (no relay thread, no socketpair copy), with QEMU's end of a
    /// socketpair that carries only the channel's other direction (the
    /// return path). Not for gated sessions.
    Direct(DirectHandOver),
}

/// Takes a new direct channel: (QEMU's end of the return-path socketpair,
/// the reading half).
pub type DirectHandOver =
    Arc<dyn Fn(UnixStream, ChannelReader) -> std::io::Result<()> + Send + Sync>;

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Socket(p) => write!(f, "Socket({})", p.display()),
            Target::Connector(_) => f.write_str("Connector"),
            Target::Direct(_) => f.write_str("Direct"),
        }
    }
}

impl Target {
    fn connect(&self, channel: u16) -> std::io::Result<UnixStream> {
        match self {
            Target::Socket(path) => UnixStream::connect(path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("connecting to QEMU at {}: {e}", path.display()),
                )
            }),
            Target::Connector(f) => f(channel),
            Target::Direct(_) => Err(std::io::Error::other(
                "a direct target hands over readers, not sockets",
            )),
        }
    }
}

/// How long the gated main channel must be quiet, with QEMU's end of stream
/// held, before the gate runs (the source QEMU, waiting on its return path
/// for the destination, sends nothing more and does not close). A pause in
/// the middle of the stream that happens to end like QEMU's end only commits
/// early: the channel stays held, so QEMU still cannot finish before the real
/// end, and a session that then fails with bytes held reverts the transfer.
const GATE_QUIET: Duration = Duration::from_millis(10);

/// The main channel's cutover gate on the destination (see [`super::gate`]).
struct Held {
    gate: Arc<dyn CutoverGate>,
    hold: TailHold,
    committed: bool,
    last_rx: Instant,
}

impl Held {
    /// Commits (once) and writes the held tail to QEMU; Err fails the session.
    fn open(&mut self, conn: &mut UnixStream) -> Result<(), String> {
        if !self.committed {
            let t0 = Instant::now();
            self.gate.commit().map_err(|e| {
                format!("cutover gate closed: {e}; QEMU never gets the end of the stream")
            })?;
            self.committed = true;
            info!(
                held = self.hold.held(),
                ms = t0.elapsed().as_millis() as u64,
                "cutover gate: ownership committed, releasing the stream's tail"
            );
        }
        for f in self.hold.take() {
            conn.write_all(&f)
                .map_err(|e| format!("channel 0: writing the released tail to QEMU failed: {e}"))?;
        }
        self.gate.released();
        Ok(())
    }
}

/// Writes bytes to QEMU in order, then returns credit to the peer.
fn deliverer(inner: Arc<Inner>, ch: Arc<Channel>, mut conn: UnixStream) {
    let mut rebuilder = Rebuilder::new(inner.ring_bytes);
    let mut raw = Vec::new();
    let mut discard = false;
    let mut held = match (&inner.gate, ch.id) {
        (Some(g), 0) => Some(Held {
            gate: g.clone(),
            hold: TailHold::new(GATE_HOLD),
            committed: false,
            last_rx: Instant::now(),
        }),
        _ => None,
    };
    let poll = if held.is_some() {
        Duration::from_millis(10)
    } else {
        Duration::from_millis(100)
    };
    loop {
        let item = {
            let mut st = ch.recv.lock();
            loop {
                if is_down(&inner) {
                    return;
                }
                let next = st.next;
                if let Some(item) = st.frames.remove(&next) {
                    st.next += 1;
                    break Some(item);
                }
                if let Some(h) = &held {
                    if h.hold.held() > 0 && !h.hold.checked() && h.last_rx.elapsed() >= GATE_QUIET {
                        break None;
                    }
                }
                ch.recv_cv.wait_for(&mut st, poll);
            }
        };
        let Some(item) = item else {
            // The gated main channel went quiet: is what it holds QEMU's end?
            let h = held.as_mut().expect("only gated channels go quiet");
            if h.hold.at_stream_end() {
                debug!("cutover gate: QEMU's end of stream held, channel quiet");
                if let Err(e) = h.open(&mut conn) {
                    fail(&inner, e);
                    return;
                }
            }
            continue;
        };
        if let Some(h) = held.as_mut() {
            h.last_rx = Instant::now();
        }
        let bytes: &[u8] = match &item {
            Incoming::Data { plan, raw_len } => {
                if let Err(e) = rebuilder.rebuild(plan, *raw_len as usize, &mut raw) {
                    fail(&inner, format!("channel {}: {e}", ch.id));
                    return;
                }
                &raw
            }
            Incoming::Raw(data) => data,
            Incoming::Eof => {
                if let Some(h) = held.as_mut().filter(|h| h.hold.held() > 0) {
                    // The source closed the main channel (no return path).
                    if !h.hold.ends_stream() {
                        fail(
                            &inner,
                            format!(
                                "cutover gate closed: the main channel ended without QEMU's end of stream (QEMU_VM_EOF and the VM description) in its last {} bytes; QEMU never gets them",
                                h.hold.held()
                            ),
                        );
                        return;
                    }
                    if let Err(e) = h.open(&mut conn) {
                        fail(&inner, e);
                        return;
                    }
                }
                let _ = conn.shutdown(Shutdown::Write);
                ch.delivered_eof.store(true, Ordering::Release);
                debug!(channel = ch.id, "peer end of stream delivered");
                check_complete(&inner);
                return;
            }
        };
        let raw_len = bytes.len() as u64;
        if !discard {
            let written = match held.as_mut() {
                Some(h) => {
                    let owned = match item {
                        Incoming::Raw(data) => data,
                        _ => raw.clone(),
                    };
                    h.hold
                        .push(owned)
                        .iter()
                        .try_for_each(|f| conn.write_all(f))
                }
                None => conn.write_all(bytes),
            };
            if let Err(e) = written {
                if inner.role == Role::Initiator && ch.sent_eof.load(Ordering::Acquire) {
                    // The source QEMU finished and closed its side; what is
                    // left is return-path chatter nobody will read. On the
                    // destination a failed write is always fatal: QEMU died
                    // or gave up mid-stream.
                    discard = true;
                } else {
                    fail(
                        &inner,
                        format!("channel {}: writing to QEMU failed: {e}", ch.id),
                    );
                    return;
                }
            }
        }
        if let Err(e) = delivered(&inner, &ch, raw_len) {
            fail(&inner, e);
            return;
        }
    }
}

/// Counts `n` raw bytes as taken by QEMU and adds them to the credit owed
/// to the peer; returns the credit that was already owed.
fn count_delivered(inner: &Inner, ch: &Channel, n: u64) -> u64 {
    ch.raw_in.fetch_add(n, Ordering::Relaxed);
    inner.counters.raw_in.fetch_add(n, Ordering::Relaxed);
    ch.recv.lock().bytes -= n;
    ch.pending_credit.fetch_add(n, Ordering::AcqRel)
}

/// [`delivered`] from the embedder's reading thread: the credit goes out
/// from this thread when a stream is free and its socket takes the frame at
/// once (a tiny non-blocking send), saving a writer thread's wake-up per
/// credit; otherwise it is queued as usual, so QEMU's thread never waits
/// for the peer.
fn delivered_inline(inner: &Inner, ch: &Arc<Channel>, n: u64) -> Result<(), String> {
    let was = count_delivered(inner, ch, n);
    if let Some(w) = inner.tx.iter().find_map(|t| t.try_lock()) {
        let credit = ch.pending_credit.swap(0, Ordering::AcqRel);
        if credit == 0 || is_down(inner) {
            return Ok(());
        }
        let head = FrameHeader {
            kind: Kind::Window,
            codec: 0,
            channel: ch.id,
            len: credit as u32,
            seq: 0,
            plan_len: 0,
            wire_len: 0,
            payload_crc: crc32c::crc32c(&[]),
        }
        .encode();
        let sent = match socket2::SockRef::from(&*w).send_with_flags(&head, libc::MSG_DONTWAIT) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(format!("sending credit to the peer failed: {e}")),
        };
        if sent > 0 {
            if sent < head.len() {
                // Never leave half a frame: finish it (a few bytes).
                (&*w)
                    .write_all(&head[sent..])
                    .map_err(|e| format!("sending credit to the peer failed: {e}"))?;
            }
            drop(w);
            inner
                .counters
                .wire_out
                .fetch_add(head.len() as u64, Ordering::Relaxed);
            inner.counters.frames_out.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // The socket is full: hand the credit back to the writer threads.
        drop(w);
        if ch.pending_credit.fetch_add(credit, Ordering::AcqRel) == 0 {
            return queue_credit(inner, ch);
        }
        return Ok(());
    }
    if was == 0 {
        return queue_credit(inner, ch);
    }
    Ok(())
}

/// Has a writer thread send the channel's owed credit.
fn queue_credit(inner: &Inner, ch: &Arc<Channel>) -> Result<(), String> {
    inner
        .ctrl_tx
        .send_timeout(Ctrl::Credit(ch.clone()), inner.cfg.idle_timeout)
        .map_err(|_| "control queue stuck".to_string())
}

/// Counts `n` raw bytes as taken by QEMU and returns them to the peer as
/// credit (one queued credit message per channel at a time).
fn delivered(inner: &Inner, ch: &Arc<Channel>, n: u64) -> Result<(), String> {
    if count_delivered(inner, ch, n) == 0 {
        return queue_credit(inner, ch);
    }
    Ok(())
}

/// The initiator completes when every channel it opened is finished both
/// ways; it then tells the responder (Close) how many channels there were.
/// The responder completes when it got that Close and has finished as many.
fn check_complete(inner: &Inner) {
    let chans = inner.channels.lock();
    let all_done = !chans.is_empty() && chans.values().all(|c| c.done());
    let announced = match inner.role {
        Role::Initiator => true,
        Role::Responder => *inner.close_expected.lock() == Some(chans.len() as u32),
    };
    if all_done && announced && !inner.failed.load(Ordering::Acquire) {
        if !inner.complete.swap(true, Ordering::AcqRel) {
            *inner.ended.lock() = Some(Instant::now());
            info!(name = %inner.name, session = %hex(&inner.id), "session completed");
        }
        // Both ends are done with every channel; close our QEMU sockets fully.
        for c in chans.values() {
            let _ = c.local.shutdown(Shutdown::Both);
        }
    }
}

/// How much a channel may read from QEMU now: its credit (the receiver's
/// memory bound, raw bytes), and nothing while its share of the wire budget
/// (`target_inflight`, wire bytes, split over the open channels) is used up.
/// Budgeting wire bytes, not raw ones, keeps the drain time after QEMU stops
/// the guest at what the link needs, however compressible the data is.
fn allowed_bytes(inner: &Inner, ch: &Channel, credit: u64) -> usize {
    let open = inner
        .channels
        .lock()
        .values()
        .filter(|c| !c.sent_eof.load(Ordering::Relaxed))
        .count()
        .max(1) as u64;
    let per_channel =
        (inner.target_inflight.load(Ordering::Relaxed) / open).max(inner.cfg.chunk as u64);
    if ch.wire_inflight() >= per_channel {
        return 0;
    }
    credit.min(inner.cfg.chunk as u64) as usize
}

/// The slack the in-flight budget adds to two RTTs, seconds: ten RTTs,
/// within 10..=50 ms. It covers the relay threads' scheduling delays
/// (credit comes back only after the peer's QEMU took the bytes). On a
/// datacenter path (RTT ~0.1 ms) a flat 50 ms held ~50 ms of the link's
/// output in flight, all of which had to drain after QEMU stopped the guest:
/// tens of ms of extra downtime for no extra throughput.
fn inflight_margin_s(min_rtt_s: f64) -> f64 {
    (10.0 * min_rtt_s).clamp(0.010, 0.050)
}

/// Starting in-flight budget before the delivery rate is known.
const INITIAL_INFLIGHT: u64 = 4 << 20;

/// Adapts the in-flight budget (wire bytes) to the path, BBR-style: the
/// highest recent wire delivery rate (bottleneck bandwidth) times twice the
/// lowest RTT plus a scheduling margin of ten RTTs, at least 10 ms and at
/// most 50 ms ([`inflight_margin_s`]).
/// That keeps the link busy (and grows the budget while the window is the
/// limit), but no more: whatever is in flight when QEMU stops the guest must
/// drain through the link before the destination can start, so an oversized
/// buffer turns straight into downtime.
struct InflightTuner {
    last: Instant,
    last_credited: u64,
    last_raw: u64,
    /// (wire, raw) bytes/s of the last 10 samples.
    rates: std::collections::VecDeque<(f64, f64)>,
}

impl InflightTuner {
    fn new() -> Self {
        InflightTuner {
            last: Instant::now(),
            last_credited: 0,
            last_raw: 0,
            rates: std::collections::VecDeque::new(),
        }
    }

    fn tick(&mut self, inner: &Inner) {
        let dt = self.last.elapsed().as_secs_f64();
        if dt < 0.1 {
            return;
        }
        let credited = inner.credited_wire.load(Ordering::Relaxed);
        let raw = inner.credited.load(Ordering::Relaxed);
        let r = (credited - self.last_credited) as f64 / dt;
        let rr = (raw - self.last_raw) as f64 / dt;
        self.last = Instant::now();
        self.last_credited = credited;
        self.last_raw = raw;
        if r <= 0.0 {
            return;
        }
        if self.rates.len() == 10 {
            self.rates.pop_front();
        }
        self.rates.push_back((r, rr));
        let btl_bw = self.rates.iter().map(|x| x.0).fold(0.0, f64::max);
        let raw_avg = self.rates.iter().map(|x| x.1).sum::<f64>() / self.rates.len() as f64;
        inner.delivery_rate.store(btl_bw as u64, Ordering::Relaxed);
        inner.raw_rate.store(raw_avg as u64, Ordering::Relaxed);
        let n = inner.streams.len().min(4);
        let min_rtt = path_min_rtt_us(&inner.streams[..n]).unwrap_or(1000) as f64 / 1e6;
        let want = (btl_bw * (2.0 * min_rtt + inflight_margin_s(min_rtt))) as u64;
        let floor = 2 * inner.cfg.chunk as u64;
        inner.target_inflight.store(
            want.clamp(floor, inner.window * inner.cfg.max_channels as u64),
            Ordering::Relaxed,
        );
    }
}

/// `--codec auto`: picks the starting tier from the path (datacenter mode,
/// min RTT under [`DC_RTT_US`]: raw; internet mode: lz4), then once a second
/// moves one step along raw -> lz4 -> zstd:1 -> zstd:3 when most samples
/// found the link to be the bottleneck (readers waiting for credit, or
/// encoded frames piling up for the sockets), and one step back when most
/// found compression to be (the encode queue full). Leaving raw also needs
/// the link to be slower than [`RAW_UPGRADE_BELOW`]: on a fast link a full
/// credit window means the receiving CPU is the limit, which compression
/// would only make worse. The wire format names each frame's codec, so the
/// receiver needs no notice.
#[derive(Debug, Default)]
struct TierTuner {
    samples: u32,
    link_bound: u32,
    cpu_bound: u32,
    level: usize,
    credited: u64,
    since: Option<Instant>,
}

const AUTO_TIERS: [Tier; 4] = [Tier::Raw, Tier::Lz4, Tier::Zstd(1), Tier::Zstd(3)];

/// Paths whose lowest RTT is below this are "datacenter": start raw.
pub const DC_RTT_US: u32 = 1000;

/// Leave raw for lz4 only on links slower than this (bytes/s): lz4 encodes
/// ~410 MB/s per core on realistic guest memory here (`dwcp benchmark hde`,
/// docs/benchmarks.md), so below ~200 MB/s one encode core keeps up with the
/// link and saves bytes.
const RAW_UPGRADE_BELOW: f64 = 200e6;

/// Lowest RTT the streams have measured so far, microseconds.
fn path_min_rtt_us(streams: &[TcpStream]) -> Option<u32> {
    streams
        .iter()
        .filter_map(|s| tcp_info(s).ok())
        .map(|i| {
            if i.min_rtt_us > 0 {
                i.min_rtt_us
            } else {
                i.rtt_us
            }
        })
        .filter(|r| *r > 0)
        .min()
}

impl TierTuner {
    /// The auto starting tier for this session's path.
    /// The tier `--codec auto` starts a session with, from its streams' path
    /// (set before any thread reads from QEMU, so the first frames have it).
    fn initial_tier(name: &str, streams: &[TcpStream]) -> Tier {
        let rtt = path_min_rtt_us(streams);
        let level = if rtt.is_some_and(|r| r < DC_RTT_US) {
            0
        } else {
            1
        };
        info!(name, tier = %AUTO_TIERS[level], min_rtt_us = rtt, "auto tier: start");
        AUTO_TIERS[level]
    }

    /// A tuner starting from the session's current tier.
    fn start(inner: &Inner) -> TierTuner {
        let tier = *inner.tier.lock();
        TierTuner {
            level: AUTO_TIERS.iter().position(|t| *t == tier).unwrap_or(1),
            ..TierTuner::default()
        }
    }

    fn sample(&mut self, inner: &Inner) {
        if !inner.cfg.auto_tier {
            return;
        }
        let full = |len: usize, cap: Option<usize>| cap.is_some_and(|c| len >= c);
        if full(inner.job_rx.len(), inner.job_rx.capacity()) {
            self.cpu_bound += 1;
        } else if (inner.credit_waiters.load(Ordering::Relaxed) > 0
            || full(inner.frame_rx.len(), inner.frame_rx.capacity()))
            && link_backlogged(inner)
        {
            self.link_bound += 1;
        }
        let since = *self.since.get_or_insert_with(|| {
            self.credited = inner.credited_wire.load(Ordering::Relaxed);
            Instant::now()
        });
        self.samples += 1;
        if self.samples < 20 {
            return;
        }
        let credited = inner.credited_wire.load(Ordering::Relaxed);
        let rate = (credited - self.credited) as f64 / since.elapsed().as_secs_f64().max(1e-3);
        let before = self.level;
        if self.cpu_bound * 5 >= self.samples * 3 && self.level > 0 {
            self.level -= 1;
        } else if self.link_bound * 5 >= self.samples * 3
            && self.level + 1 < AUTO_TIERS.len()
            && (self.level > 0 || rate < RAW_UPGRADE_BELOW)
        {
            self.level += 1;
        }
        if self.level != before {
            *inner.tier.lock() = AUTO_TIERS[self.level];
            info!(name = %inner.name, tier = %AUTO_TIERS[self.level], link_bound = self.link_bound, cpu_bound = self.cpu_bound, rate_mb_s = rate / 1e6, "auto tier");
        }
        *self = TierTuner {
            level: self.level,
            ..TierTuner::default()
        };
    }
}

/// Whether the data in flight waits for the link: the kernel holds at least
/// half of it in the streams' send queues (unacknowledged or not yet sent).
/// When the peer's QEMU (or its CPU) is what is slow, readers wait for
/// credit too, but the streams are nearly empty (the peer drains them into
/// its reorder buffers), and compressing would only load that CPU more.
fn link_backlogged(inner: &Inner) -> bool {
    let inflight = inner.wire_inflight.load(Ordering::Relaxed);
    let backlog: u64 = inner
        .streams
        .iter()
        .filter_map(|s| tcp_info(s).ok())
        .map(|i| i.backlog_bytes())
        .sum();
    backlog > 0 && backlog * 2 >= inflight
}

fn watchdog(inner: Arc<Inner>) {
    let n = inner.streams.len();
    let mut close_sent: Option<Instant> = None;
    let mut tuner = InflightTuner::new();
    let mut tiers = TierTuner::start(&inner);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        tuner.tick(&inner);
        tiers.sample(&inner);
        if inner.failed.load(Ordering::Acquire) {
            // Give the writers a moment to put the Abort on the wire.
            std::thread::sleep(Duration::from_millis(200));
            for s in &inner.streams {
                let _ = s.shutdown(Shutdown::Both);
            }
            for ch in inner.channels.lock().values() {
                let _ = ch.local.shutdown(Shutdown::Both);
            }
            wake_all(&inner);
            return;
        }
        if inner.complete.load(Ordering::Acquire) {
            if close_sent.is_none() && inner.inflight.load(Ordering::Acquire) == 0 {
                if inner.role == Role::Initiator {
                    let h = FrameHeader {
                        kind: Kind::Close,
                        codec: 0,
                        channel: 0,
                        len: inner.channels.lock().len() as u32,
                        seq: 0,
                        plan_len: 0,
                        wire_len: 0,
                        payload_crc: crc32c::crc32c(&[]),
                    };
                    inner.inflight.fetch_add(1, Ordering::AcqRel);
                    let _ = inner
                        .frame_tx
                        .send_timeout(Outgoing::Frame(h, Vec::new()), Duration::from_secs(5));
                }
                for _ in 0..n {
                    if inner
                        .frame_tx
                        .send_timeout(Outgoing::Close, Duration::from_secs(5))
                        .is_err()
                    {
                        break;
                    }
                }
                close_sent = Some(Instant::now());
            }
            let readers_gone = inner.readers_done.load(Ordering::Acquire) >= n;
            let stuck = close_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(5));
            if readers_gone || stuck {
                for s in &inner.streams {
                    let _ = s.shutdown(Shutdown::Both);
                }
                return;
            }
            continue;
        }
        let first_eof = *inner.first_eof.lock();
        if let Some(t) = first_eof {
            if t.elapsed() > Duration::from_secs(3) {
                fail(
                    &inner,
                    "the peer closed its streams before the migration ended".into(),
                );
                continue;
            }
        }
        if inner.last_rx.lock().elapsed() > inner.cfg.idle_timeout {
            fail(
                &inner,
                format!("nothing from the peer for {:?}", inner.cfg.idle_timeout),
            );
        }
    }
}

/// Limits a destination agent puts on what initiators may ask for.
#[derive(Debug, Clone)]
pub struct AcceptorLimits {
    pub max_window: u32,
    pub max_ring_pages: u32,
    pub max_sessions: usize,
    pub handshake_timeout: Duration,
}

impl Default for AcceptorLimits {
    fn default() -> Self {
        AcceptorLimits {
            max_window: 64 << 20,
            max_ring_pages: (1024 << 20) / 4096,
            max_sessions: 64,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

struct Pending {
    hello: Hello,
    streams: Vec<Option<TcpStream>>,
    since: Instant,
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
    pending: Mutex<HashMap<[u8; 16], PendingBox>>,
}

#[derive(Clone)]
struct Gates(GateProvider);
impl std::fmt::Debug for Gates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GateProvider")
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
            pending: Mutex::new(HashMap::new()),
        }
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
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Handles one accepted TCP connection: reads and checks the hello,
    /// replies, and returns a started session when this was its last stream.
    /// Errors name what was wrong; the connection is closed on error.
    pub fn handle(&self, mut stream: TcpStream) -> Result<Option<Session>, WireError> {
        let io = |what, source| WireError::Io { what, source };
        stream
            .set_read_timeout(Some(self.limits.handshake_timeout))
            .map_err(|e| io("socket", e))?;
        let hello = match Hello::read(&mut stream) {
            Ok(h) => h,
            Err(e) => {
                if matches!(e, WireError::Version { .. }) {
                    let reply = self.reply(Status::BadVersion, 0, 0, wire::VERSION_MAX);
                    let _ = stream.write_all(&reply.encode());
                }
                return Err(e);
            }
        };
        let refuse = |stream: &mut TcpStream, status| {
            let _ = stream.write_all(&self.reply(status, 0, 0, wire::VERSION_MAX).encode());
            Err(WireError::Refused(status))
        };
        let target = match &self.connector {
            Some(c) => c.clone(),
            None => {
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
        self.cfg
            .tuning
            .apply(&stream)
            .map_err(|e| io("socket tuning", e))?;
        let mut pending = self.pending.lock();
        pending.retain(|_, p| p.0.since.elapsed() < self.limits.handshake_timeout * 2);
        if !pending.contains_key(&hello.session) && pending.len() >= self.limits.max_sessions {
            drop(pending);
            return refuse(&mut stream, Status::Busy);
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
            && p.hello.ring_pages == hello.ring_pages;
        if !same || p.streams[hello.stream_index as usize].is_some() {
            drop(pending);
            return refuse(&mut stream, Status::SessionMismatch);
        }
        // Hello::read checked the ranges overlap.
        let version = hello.version_max.min(wire::VERSION_MAX);
        stream
            .write_all(&self.reply(Status::Ok, window, ring, version).encode())
            .map_err(|e| io("reply", e))?;
        p.streams[hello.stream_index as usize] = Some(stream);
        if p.streams.iter().all(Option::is_some) {
            let p = pending.remove(&hello.session).expect("present").0;
            drop(pending);
            let streams: Vec<TcpStream> = p
                .streams
                .into_iter()
                .map(|s| s.expect("all present"))
                .collect();
            let cfg = TransportConfig {
                streams: streams.len() as u16,
                ..self.cfg.clone()
            };
            let peer = streams[0].peer_addr().map_err(|e| io("socket", e))?;
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
                (window, ring, version),
                streams,
                Some(target),
                gate,
            );
            if let Some(reason) = refusal {
                // Started only to tell the source why (an Abort frame):
                // nothing reaches QEMU.
                warn!(name = %hello.name, "cutover gate refused the session: {reason}");
                session.abort(&format!("cutover gate: {reason}"));
            }
            return Ok(Some(session));
        }
        Ok(None)
    }

    fn reply(&self, status: Status, window: u32, ring_pages: u32, version: u16) -> Reply {
        Reply {
            version,
            status,
            window,
            ring_pages,
        }
    }
}
