//! The sending path: QEMU's bytes become frames. A channel's
//! [`FrameSender`] waits for credit and numbers frames; raw frames go
//! straight to a stream, planned ones through the encode pool. Threads:
//! `qemu_rx` (reads a local QEMU socket), `encode` (compresses), `tcp_tx`
//! (one per stream: writes frames, credit, pings and the abort). Frames
//! compressed with context ([`crate::codec::context`]) skip the pool: the
//! channel's own thread compresses them, in order.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::select;
use tracing::debug;

use super::channel::Channel;
use super::credit::allowed_bytes;
use super::local::LocalConn;
use super::{check_complete, fail, is_down, Ctrl, FailReason, Inner};
use crate::codec::context::ContextEncoder;
use crate::codec::{CodecId, Compressor, Planner, Tier};
use crate::wire::{self, FrameHeader};

pub(super) enum Outgoing {
    Frame(FrameHeader, Vec<u8>),
    Close,
}

pub(super) struct Job {
    pub(super) ch: Arc<Channel>,
    pub(super) channel: u16,
    pub(super) seq: u64,
    pub(super) raw_len: u32,
    pub(super) plan: Vec<u8>,
}

/// The sending half of one channel: waits for credit, turns bytes into
/// frames (raw, or planned and queued for the encoders) and ends the stream.
/// Fed by [`qemu_rx`] (bytes read from a local socket) or by a
/// [`ChannelWriter`] (bytes handed over by the embedder).
pub(super) struct FrameSender {
    pub(super) planner: Planner,
    pub(super) buf: Vec<u8>,
    pub(super) seq: u64,
    pub(super) last: crate::codec::PlanStats,
    /// The channel's context stream, from its first context frame on,
    /// with the tier probe of its frames ([`probe_context`]) and their count.
    ctx: Option<Box<(ContextEncoder, Option<ContextProbe>, u32)>>,
}

impl FrameSender {
    pub(super) fn new(inner: &Inner, channel: u16) -> FrameSender {
        // A responder sends QEMU's return path, which holds no guest pages:
        // it dedups nothing, so it keeps no ring (a sender may use a smaller
        // ring than agreed: its REFs stay within the receiver's).
        let ring = match inner.role {
            super::Role::Initiator => inner.ring_bytes,
            super::Role::Responder => 0,
        };
        // Without its spill file a sender only refers to pages in memory,
        // which the receiver holds whatever it spills.
        let planner = match inner.spill_pages {
            0 => Planner::new(ring),
            pages => Planner::with_spill(ring, pages, &inner.cfg.spill_dir).unwrap_or_else(|e| {
                tracing::warn!(
                    name = %inner.name,
                    "no dedup spill file in {} ({e}): pages that leave the ring are sent again",
                    inner.cfg.spill_dir.display()
                );
                Planner::new(ring)
            }),
        };
        let mut planner = planner;
        planner.set_delta(inner.delta && inner.role == super::Role::Initiator);
        if inner.role == super::Role::Initiator {
            planner.set_keep(inner.keep.recorder.clone(), inner.keep.peer_has.clone());
            planner.set_multifd(inner.multifd_ring_pages);
            if let Some(sh) = &inner.xref {
                planner.set_xref(sh.clone(), channel);
            }
        }
        let last = planner.stats();
        FrameSender {
            planner,
            buf: Vec::with_capacity(inner.cfg.chunk),
            seq: 0,
            last,
            ctx: None,
        }
    }

    /// Waits until the channel may send, and returns how many bytes (at
    /// most one chunk); None once the session is down or `stop` is set.
    pub(super) fn wait_allowed(
        inner: &Inner,
        ch: &Channel,
        stop: Option<&AtomicBool>,
    ) -> Option<usize> {
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
            inner.flow.credit_waiters.fetch_add(1, Ordering::Relaxed);
            ch.credit_cv
                .wait_for(&mut credit, Duration::from_millis(20));
            inner.flow.credit_waiters.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether frames go out raw (no planning, no encoder).
    pub(super) fn raw(inner: &Inner) -> bool {
        inner.version >= wire::VERSION_RAW && *inner.tuning.tier.lock() == Tier::Raw
    }

    /// Whether raw frames go without a payload checksum (see
    /// [`TransportConfig::checksum_raw`]).
    pub(super) fn unchecked(inner: &Inner) -> bool {
        inner.version >= wire::VERSION_UNCHECKED && !inner.cfg.checksum_raw
    }

    /// Takes `n` bytes of credit and returns the channel's next raw frame
    /// header; `crc` None makes it an unchecked frame.
    pub(super) fn raw_header(
        &mut self,
        inner: &Inner,
        ch: &Channel,
        n: usize,
        crc: Option<u32>,
    ) -> FrameHeader {
        let seq = self.account(inner, ch, n);
        ch.note_sent(inner, n as u64, (wire::FRAME_HEADER_LEN + n) as u64);
        FrameHeader::raw(ch.id, seq, n as u32, crc)
    }

    /// Takes `n` bytes of credit, counts them as sent and numbers the frame.
    pub(super) fn account(&mut self, inner: &Inner, ch: &Channel, n: usize) -> u64 {
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
    pub(super) fn take_buf(&mut self, raw: bool, allowed: usize) -> Vec<u8> {
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
    pub(super) fn send(
        &mut self,
        inner: &Arc<Inner>,
        ch: &Arc<Channel>,
        raw: bool,
        inline: bool,
        data: Vec<u8>,
    ) -> bool {
        let n = data.len();
        if raw {
            self.planner.skip(&data);
            let crc = (!Self::unchecked(inner)).then(|| crc32c::crc32c(&data));
            let h = self.raw_header(inner, ch, n, crc);
            if inline {
                return write_inline(inner, &h, &[std::io::IoSlice::new(&data)]);
            }
            inner.queues.inflight.fetch_add(1, Ordering::AcqRel);
            return inner.queues.frame_tx.send(Outgoing::Frame(h, data)).is_ok();
        }
        let seq = self.account(inner, ch, n);
        ch.unencoded.fetch_add(n as u64, Ordering::Relaxed);
        let mut plan = Vec::with_capacity(n + 64);
        inner.keep.wait_announcement(inner);
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
        c.pages_missed_dups.fetch_add(
            st.pages_missed_dups - self.last.pages_missed_dups,
            Ordering::Relaxed,
        );
        c.pages_kept
            .fetch_add(st.pages_kept - self.last.pages_kept, Ordering::Relaxed);
        c.pages_xref
            .fetch_add(st.pages_xref - self.last.pages_xref, Ordering::Relaxed);
        if let Some(sh) = &inner.xref {
            sh.planned(
                ch.id,
                ch.raw_out.load(Ordering::Relaxed),
                self.planner.ring_count(),
            );
        }
        let ds = self.planner.new_delta_stats();
        c.pages_resent.fetch_add(ds.pages_resent, Ordering::Relaxed);
        c.pages_delta.fetch_add(ds.pages_delta, Ordering::Relaxed);
        c.resent_lz4_full
            .fetch_add(ds.resent_lz4_full, Ordering::Relaxed);
        c.resent_lz4_delta
            .fetch_add(ds.resent_lz4_delta, Ordering::Relaxed);
        self.last = st;
        if let Some(level) = context_level(inner) {
            return self.send_context(inner, ch, seq, n as u32, level, plan);
        }
        inner.queues.inflight.fetch_add(1, Ordering::AcqRel);
        let job = Job {
            ch: ch.clone(),
            channel: ch.id,
            seq,
            raw_len: n as u32,
            plan,
        };
        inner.queues.job_tx.send(job).is_ok()
    }

    /// Compresses `plan` as the next piece of the channel's context stream
    /// and queues the frame (the work an encoder does for a pooled frame).
    fn send_context(
        &mut self,
        inner: &Arc<Inner>,
        ch: &Arc<Channel>,
        seq: u64,
        raw_len: u32,
        level: i32,
        plan: Vec<u8>,
    ) -> bool {
        let started = std::time::Instant::now();
        let ctx = match &mut self.ctx {
            Some(c) => c,
            None => match ContextEncoder::new() {
                Ok(e) => self.ctx.insert(Box::new((e, None, 0))),
                Err(e) => {
                    fail(
                        inner,
                        FailReason::Local(format!("context compression: {e}")),
                    );
                    return false;
                }
            },
        };
        let (enc, probe, frames) = &mut **ctx;
        let mut out = Vec::new();
        if let Err(e) = enc.compress(level, &plan, &mut out) {
            // The stream is lost with it: the channel cannot go on.
            fail(
                inner,
                FailReason::Local(format!(
                    "context compression of channel {} frame {seq}: {e}",
                    ch.id
                )),
            );
            return false;
        }
        probe_context(inner, probe, frames, level, &plan);
        let c = &inner.counters;
        c.encode_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        c.context_out.fetch_add(1, Ordering::Relaxed);
        let h = FrameHeader::data(
            ch.id,
            seq,
            CodecId::ZstdCtx,
            raw_len,
            plan.len() as u32,
            &out,
        );
        ch.note_sent(
            inner,
            raw_len as u64,
            (wire::FRAME_HEADER_LEN + out.len()) as u64,
        );
        ch.unencoded.fetch_sub(raw_len as u64, Ordering::Relaxed);
        inner.queues.inflight.fetch_add(1, Ordering::AcqRel);
        inner.queues.frame_tx.send(Outgoing::Frame(h, out)).is_ok()
    }

    /// Queues the channel's end of stream (once), waiting for room in the
    /// send queue.
    pub(super) fn eof(&mut self, inner: &Inner, ch: &Channel) {
        self.eof_with(inner, ch, |f| inner.queues.frame_tx.send(f).is_ok());
    }

    /// [`FrameSender::eof`] for callers that must not block (QEMU's close
    /// and shutdown, on its main loop): when the send queue is full (the
    /// streams stalled), a short-lived thread waits for room instead.
    pub(super) fn eof_nonblocking(&mut self, inner: &Inner, ch: &Channel) {
        self.eof_with(inner, ch, |f| match inner.queues.frame_tx.try_send(f) {
            Ok(()) => true,
            Err(crossbeam_channel::TrySendError::Full(f)) => {
                let tx = inner.queues.frame_tx.clone();
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

    pub(super) fn eof_with(
        &mut self,
        inner: &Inner,
        ch: &Channel,
        send: impl FnOnce(Outgoing) -> bool,
    ) {
        if ch.sent_eof.load(Ordering::Acquire) {
            return;
        }
        let h = FrameHeader::eof(ch.id, self.seq);
        inner.queues.inflight.fetch_add(1, Ordering::AcqRel);
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
pub(super) fn write_inline(
    inner: &Inner,
    h: &FrameHeader,
    payload: &[std::io::IoSlice<'_>],
) -> bool {
    let n = inner.links.tx.len();
    let start = inner.links.next_tx.fetch_add(1, Ordering::Relaxed);
    let mut guard = (0..n)
        .find_map(|k| inner.links.tx[(start + k) % n].try_lock())
        .unwrap_or_else(|| inner.links.tx[start % n].lock());
    if is_down(inner) {
        return false;
    }
    if let Err(e) = wire::write_frame_vectored(&mut *guard, h, payload) {
        drop(guard);
        fail(
            inner,
            FailReason::Send {
                what: "sending",
                error: e.to_string(),
            },
        );
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
pub(super) fn qemu_rx(inner: Arc<Inner>, ch: Arc<Channel>, mut conn: LocalConn) {
    let mut tx = FrameSender::new(&inner, ch.id);
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

/// Appends to `buf` one blocking read, then whatever more is already queued
/// (without blocking), `max` bytes at most: frames are large when QEMU is
/// fast and prompt when it is not. Reads into the spare capacity, so the
/// buffer is never zero-filled first.
pub(super) fn read_some(
    conn: &mut LocalConn,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
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

pub(super) fn encode(inner: Arc<Inner>) {
    let mut comp = Compressor::new();
    let mut frames = 0u32;
    loop {
        let job = match inner.queues.job_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(j) => j,
            Err(_) => {
                if is_down(&inner) || inner.life.complete.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
        };
        let tier = *inner.tuning.tier.lock();
        let mut out = Vec::with_capacity(job.plan.len() / 2 + 64);
        let started = std::time::Instant::now();
        let codec = comp.compress(tier, &job.plan, &mut out);
        let size = if codec == CodecId::None {
            job.plan.len()
        } else {
            out.len()
        };
        probe_high_level(&inner, &mut comp, &mut frames, tier, &job.plan, Some(size));
        inner
            .counters
            .encode_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let plan_len = job.plan.len() as u32;
        let payload = if codec == CodecId::None {
            job.plan
        } else {
            out
        };
        let h = FrameHeader::data(job.channel, job.seq, codec, job.raw_len, plan_len, &payload);
        job.ch.note_sent(
            &inner,
            job.raw_len as u64,
            (wire::FRAME_HEADER_LEN + payload.len()) as u64,
        );
        job.ch
            .unencoded
            .fetch_sub(job.raw_len as u64, Ordering::Relaxed);
        if inner
            .queues
            .frame_tx
            .send(Outgoing::Frame(h, payload))
            .is_err()
        {
            return;
        }
    }
}

pub(super) fn tcp_tx(inner: Arc<Inner>, index: usize) {
    let ping = Duration::from_millis(1000);
    let stream = &inner.links.tx[index];
    let write = |h: FrameHeader, payload: &[u8]| -> bool {
        if let Err(e) = wire::write_frame(&mut *stream.lock(), &h, payload) {
            fail(
                &inner,
                FailReason::Stream {
                    index,
                    error: Box::new(FailReason::Send {
                        what: "sending",
                        error: e.to_string(),
                    }),
                },
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
    loop {
        enum Item {
            Ctrl(Ctrl),
            Out(Outgoing),
            Ping,
            Gone,
        }
        let item = match inner.queues.ctrl_rx.try_recv() {
            Ok(c) => Item::Ctrl(c),
            Err(_) => select! {
                recv(inner.queues.ctrl_rx) -> c => c.map(Item::Ctrl).unwrap_or(Item::Gone),
                recv(inner.queues.frame_rx) -> f => f.map(Item::Out).unwrap_or(Item::Gone),
                default(ping) => Item::Ping,
            },
        };
        match item {
            Item::Ctrl(Ctrl::Credit(ch)) => {
                let n = ch.pending_credit.swap(0, Ordering::AcqRel);
                if n > 0 && !is_down(&inner) && !write(FrameHeader::window(ch.id, n as u32), &[]) {
                    return;
                }
            }
            Item::Ctrl(Ctrl::Abort(reason)) => {
                let mut msg = reason.into_bytes();
                msg.truncate(wire::MAX_ABORT_LEN);
                let h = FrameHeader::abort(&msg);
                let mut w = stream.lock();
                let _ = w.tcp().set_write_timeout(Some(Duration::from_millis(200)));
                let _ = wire::write_frame(&mut *w, &h, &msg);
                return;
            }
            Item::Out(Outgoing::Frame(h, payload)) => {
                if is_down(&inner) {
                    return;
                }
                let ok = write(h, &payload);
                inner.queues.inflight.fetch_sub(1, Ordering::AcqRel);
                if !ok {
                    return;
                }
            }
            Item::Out(Outgoing::Close) => {
                let mut w = stream.lock();
                let _ = w.flush();
                let _ = w.close();
                return;
            }
            Item::Ping => {
                if is_down(&inner) {
                    return;
                }
                if !write(FrameHeader::ping(), &[]) {
                    return;
                }
            }
            Item::Gone => return,
        }
    }
}

/// The zstd level to compress the next frame at with context, or None for
/// a pooled frame: context when the session agreed to it, the tuner turned
/// it on (a slow link, idle encoders: [`super::tune::ContextGate`]) and the
/// tier is zstd. Only the initiator sends guest pages (and context frames).
fn context_level(inner: &Inner) -> Option<i32> {
    if !inner.context
        || inner.role != super::Role::Initiator
        || !inner.tuning.context.load(Ordering::Relaxed)
    {
        return None;
    }
    match *inner.tuning.tier.lock() {
        Tier::Zstd(level) => Some(level),
        _ => None,
    }
}

/// `--codec auto` at zstd:3: one frame in [`super::tune::PROBE_EVERY`] is
/// also compressed (alone) at the level above, so the tuner knows what that
/// level would save on this content. `base`: the frame's size at zstd:3
/// alone, when the caller has it.
fn probe_high_level(
    inner: &Inner,
    comp: &mut Compressor,
    frames: &mut u32,
    tier: Tier,
    plan: &[u8],
    base: Option<usize>,
) {
    if !inner.cfg.auto_tier || tier != super::tune::PROBE_BASE {
        return;
    }
    *frames = frames.wrapping_add(1);
    if !frames.is_multiple_of(super::tune::PROBE_EVERY) {
        return;
    }
    let mut out = Vec::new();
    let mut size = |tier: Tier, comp: &mut Compressor| match comp.compress(tier, plan, &mut out) {
        CodecId::None => plan.len(),
        _ => out.len(),
    };
    let base = base.unwrap_or_else(|| size(super::tune::PROBE_BASE, comp));
    let high = size(super::tune::PROBE_HIGH, comp);
    let c = &inner.counters;
    c.probe_base.fetch_add(base as u64, Ordering::Relaxed);
    c.probe_high.fetch_add(high as u64, Ordering::Relaxed);
}

/// A tier probe of context frames: two context streams of their own, at
/// zstd:3 and at the level above, fed the same [`CTX_PROBE_FRAMES`] frames.
/// With context a higher level finds more (it searches the window better):
/// on `dwcp benchmark hde`'s realistic image zstd:6 saves 2 % over zstd:3
/// frame by frame but 4.8 % with context, so the probe of frames alone
/// ([`probe_high_level`]) would under-rate it.
pub(super) struct ContextProbe {
    base: ContextEncoder,
    high: ContextEncoder,
    left: u32,
    bytes: (u64, u64),
}

/// Frames one context probe compresses at both levels (16 MiB of raw
/// bytes: four windows), and how often one starts (every this many of the
/// channel's context frames, from the first): about +10 % encoder CPU at
/// zstd:3, on links slow enough for context.
const CTX_PROBE_FRAMES: u32 = 32;
const CTX_PROBE_EVERY: u32 = 512;

/// `--codec auto` at zstd:3 with context: runs the channel's
/// [`ContextProbe`] on this frame's `plan` and, when it is done, adds what
/// both levels came to to the counters the tier tuner reads.
fn probe_context(
    inner: &Inner,
    probe: &mut Option<ContextProbe>,
    frames: &mut u32,
    level: i32,
    plan: &[u8],
) {
    let (Tier::Zstd(base), Tier::Zstd(high)) = (super::tune::PROBE_BASE, super::tune::PROBE_HIGH)
    else {
        return;
    };
    if !inner.cfg.auto_tier || level != base {
        *probe = None;
        return;
    }
    *frames = frames.wrapping_add(1);
    if probe.is_none() && *frames % CTX_PROBE_EVERY == 1 {
        if let (Ok(b), Ok(h)) = (ContextEncoder::new(), ContextEncoder::new()) {
            *probe = Some(ContextProbe {
                base: b,
                high: h,
                left: CTX_PROBE_FRAMES,
                bytes: (0, 0),
            });
        }
    }
    let Some(p) = probe else { return };
    let mut out = Vec::new();
    let mut size = |enc: &mut ContextEncoder, level: i32| {
        enc.compress(level, plan, &mut out)
            .ok()
            .map(|()| out.len() as u64)
    };
    let (Some(b), Some(h)) = (size(&mut p.base, base), size(&mut p.high, high)) else {
        *probe = None;
        return;
    };
    p.bytes.0 += b;
    p.bytes.1 += h;
    p.left -= 1;
    if p.left == 0 {
        let c = &inner.counters;
        c.probe_base.fetch_add(p.bytes.0, Ordering::Relaxed);
        c.probe_high.fetch_add(p.bytes.1, Ordering::Relaxed);
        *probe = None;
    }
}
