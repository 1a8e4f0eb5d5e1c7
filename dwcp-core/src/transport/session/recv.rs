//! The receiving path: each stream's `tcp_rx` thread reads frames and
//! handles them by kind (control, credit, data); each channel's `qemu_tx`
//! thread writes its bytes to QEMU in order and returns credit. A gated main
//! channel holds its tail until the cutover gate commits ([`Held`]).

use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::channel::{Channel, Incoming};
use super::credit::delivered;
use super::direct::reader;
use super::local::LocalConn;
use super::target::Target;
use super::{check_complete, fail, is_down, open_channel, FailReason, Inner, Role};
use crate::codec::{CodecId, Decompressor};
use crate::transport::budget::RingCharge;
use crate::transport::gate::{CutoverGate, TailHold, GATE_HOLD};
use crate::transport::link::RxStream;
use crate::wire::{self, FrameHeader, Kind, WireError};

/// Read buffer of each stream's receiving thread, bytes.
pub(in crate::transport) const RX_BUFFER: usize = 16 << 10;

pub(super) fn tcp_rx(inner: Arc<Inner>, index: usize, stream: RxStream) {
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
                let mut first = inner.life.first_eof.lock();
                first.get_or_insert_with(Instant::now);
                inner.life.readers_done.fetch_add(1, Ordering::AcqRel);
                return;
            }
            Err(e) => {
                inner.life.readers_done.fetch_add(1, Ordering::AcqRel);
                if is_down(&inner) || inner.life.complete.load(Ordering::Acquire) {
                    return;
                }
                let error = match &e {
                    WireError::Io { source, .. }
                        if matches!(
                            source.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        FailReason::PeerSilent(inner.cfg.idle_timeout)
                    }
                    _ => FailReason::Protocol(e.to_string()),
                };
                fail(
                    &inner,
                    FailReason::Stream {
                        index,
                        error: Box::new(error),
                    },
                );
                return;
            }
        };
        *inner.life.last_rx.lock() = Instant::now();
        inner.counters.frames_in.fetch_add(1, Ordering::Relaxed);
        inner.counters.wire_in.fetch_add(
            (wire::FRAME_HEADER_LEN + h.wire_len as usize) as u64,
            Ordering::Relaxed,
        );
        if let Err(e) = handle_frame(&inner, &mut r, &h, &mut dec, &mut payload) {
            inner.life.readers_done.fetch_add(1, Ordering::AcqRel);
            fail(
                &inner,
                FailReason::Stream {
                    index,
                    error: Box::new(e),
                },
            );
            return;
        }
    }
}

/// Handles one frame read from a stream (its payload still to be read from
/// `r`), by kind.
fn handle_frame(
    inner: &Arc<Inner>,
    r: &mut impl Read,
    h: &FrameHeader,
    dec: &mut Decompressor,
    payload: &mut Vec<u8>,
) -> Result<(), FailReason> {
    match h.kind {
        Kind::Ping => Ok(()),
        Kind::Close => on_close(inner, h),
        Kind::Abort => on_abort(r, h, payload),
        Kind::Window => on_window(inner, h),
        Kind::Have => on_have(inner, r, h, payload),
        Kind::Data => {
            // The frame's raw bytes count against the window before its
            // payload is read and decoded: what a reader holds is always
            // within the window (the header's checks keep plans and
            // payloads proportional to the raw bytes).
            let ch = reserve(inner, h)?;
            let item = read_data(inner, r, h, dec, payload)?;
            if payload.capacity() > RX_PAYLOAD_KEEP {
                // Large compressed payloads are not kept between frames.
                *payload = Vec::new();
            }
            queue_incoming(inner, &ch, h, item)
        }
        Kind::Eof => {
            let ch = channel_for(inner, h.channel)?;
            queue_incoming(inner, &ch, h, Incoming::Eof)
        }
    }
}

fn protocol(msg: String) -> FailReason {
    FailReason::Protocol(msg)
}

/// The initiator's Close: how many channels the session had.
fn on_close(inner: &Inner, h: &FrameHeader) -> Result<(), FailReason> {
    if inner.role != Role::Responder {
        return Err(protocol("Close frame from the responder".into()));
    }
    *inner.life.close_expected.lock() = Some(h.len);
    check_complete(inner);
    Ok(())
}

/// The peer gave up: its reason fails this session too.
fn on_abort(r: &mut impl Read, h: &FrameHeader, payload: &mut Vec<u8>) -> Result<(), FailReason> {
    wire::read_payload(r, h, payload).map_err(|e| protocol(e.to_string()))?;
    Err(FailReason::PeerAborted(
        String::from_utf8_lossy(payload).into_owned(),
    ))
}

/// Part of the destination's list of kept pages (re-migration): once all
/// of it arrived, the planners refer to those pages.
fn on_have(
    inner: &Inner,
    r: &mut impl Read,
    h: &FrameHeader,
    payload: &mut Vec<u8>,
) -> Result<(), FailReason> {
    let Some(has) = &inner.keep.peer_has else {
        return Err(protocol(
            "HAVE frame, but no kept pages were agreed for this session".into(),
        ));
    };
    wire::read_payload(r, h, payload).map_err(|e| protocol(e.to_string()))?;
    let done = inner
        .keep
        .collector
        .lock()
        .add(h.len as u64, h.seq, payload)
        .map_err(protocol)?;
    if let Some(list) = done {
        let pages = list.len();
        if has.set(list).is_err() {
            return Err(protocol("a second HAVE announcement".into()));
        }
        info!(name = %inner.name, pages, "re-migration: the destination holds pages of this guest from an earlier migration; they go as references");
    }
    Ok(())
}

/// Credit from the peer: retires sent frames and wakes the channel's sender.
fn on_window(inner: &Inner, h: &FrameHeader) -> Result<(), FailReason> {
    let ch = inner
        .channels
        .map
        .lock()
        .get(&h.channel)
        .cloned()
        .ok_or_else(|| {
            protocol(format!(
                "credit for channel {} which is not open",
                h.channel
            ))
        })?;
    inner
        .flow
        .credited
        .fetch_add(h.len as u64, Ordering::Relaxed);
    let (wire, credit_loop) = ch.note_credit(inner, h.len as u64);
    inner.flow.credited_wire.fetch_add(wire, Ordering::Relaxed);
    if let Some(d) = credit_loop {
        inner
            .flow
            .credit_loop_min_us
            .fetch_min(d.as_micros() as u64, Ordering::Relaxed);
    }
    let credited = ch.credited_raw.fetch_add(h.len as u64, Ordering::AcqRel) + h.len as u64;
    if let Some(sh) = &inner.xref {
        sh.confirm(ch.id, credited);
    }
    let mut credit = ch.credit.lock();
    *credit += h.len as u64;
    if *credit > inner.window {
        return Err(protocol(format!(
            "peer granted credit beyond the window on channel {}",
            h.channel
        )));
    }
    ch.credit_cv.notify_all();
    Ok(())
}

/// Reads and checks a Data frame's payload, and decompresses it unless raw.
fn read_data(
    inner: &Inner,
    r: &mut impl Read,
    h: &FrameHeader,
    dec: &mut Decompressor,
    payload: &mut Vec<u8>,
) -> Result<Incoming, FailReason> {
    let frame_error = |e: String| FailReason::Codec {
        channel: h.channel,
        seq: Some(h.seq),
        error: e,
    };
    wire::read_payload(r, h, payload).map_err(|e| frame_error(e.to_string()))?;
    let codec = h.codec_id().expect("validated by decode");
    inner.counters.codec_in[codec as usize - 1].fetch_add(1, Ordering::Relaxed);
    if !h.checked() {
        inner.counters.unchecked_in.fetch_add(1, Ordering::Relaxed);
    }
    if codec == CodecId::Raw {
        // Lengths checked equal by the header's validation.
        return Ok(Incoming::Raw(std::mem::take(payload)));
    }
    if codec == CodecId::ZstdCtx {
        // Decoded in the channel's order, by its deliverer.
        if !inner.context {
            return Err(frame_error(
                "a context frame (zstd-ctx), which this session did not agree to".into(),
            ));
        }
        return Ok(Incoming::Data {
            plan: std::mem::take(payload),
            raw_len: h.len,
            context: Some(h.plan_len),
        });
    }
    let mut plan = Vec::new();
    dec.decompress(codec, payload, h.plan_len as usize, &mut plan)
        .map_err(|e| frame_error(e.to_string()))?;
    Ok(Incoming::Data {
        plan,
        raw_len: h.len,
        context: None,
    })
}

/// Payload buffers of a stream's reader larger than this are dropped after
/// each frame instead of kept for the next.
const RX_PAYLOAD_KEEP: usize = 64 << 10;

/// Opens (if new) the channel of Data frame `h` and counts its raw bytes
/// against the channel's window, before its payload is read.
fn reserve(inner: &Arc<Inner>, h: &FrameHeader) -> Result<Arc<Channel>, FailReason> {
    let ch = channel_for(inner, h.channel)?;
    let mut st = ch.recv.lock();
    check_place(&st, h)?;
    st.bytes += h.len as u64;
    if st.bytes > inner.window {
        return Err(protocol(format!(
            "channel {}: peer sent beyond its credit window",
            h.channel
        )));
    }
    drop(st);
    Ok(ch)
}

/// Checks a frame's sequence number against what the channel has.
fn check_place(st: &super::channel::RecvState, h: &FrameHeader) -> Result<(), FailReason> {
    if h.seq < st.next || st.frames.contains_key(&h.seq) {
        return Err(protocol(format!(
            "channel {} frame {} repeated",
            h.channel, h.seq
        )));
    }
    if h.seq > st.next + 1_000_000 {
        return Err(protocol(format!(
            "channel {} frame {} far out of range (next is {})",
            h.channel, h.seq, st.next
        )));
    }
    Ok(())
}

/// Puts a Data frame (its bytes already counted by [`reserve`]) or an Eof
/// into its channel's reorder buffer and wakes the channel's reader.
fn queue_incoming(
    inner: &Arc<Inner>,
    ch: &Arc<Channel>,
    h: &FrameHeader,
    item: Incoming,
) -> Result<(), FailReason> {
    let mut st = ch.recv.lock();
    // Checked again: another stream may have brought the same seq meanwhile.
    check_place(&st, h)?;
    st.frames.insert(h.seq, item);
    if st.frames.len() > 4 * (inner.window as usize / 4096 + 16) {
        return Err(protocol(format!(
            "channel {}: too many small frames buffered",
            h.channel
        )));
    }
    ch.recv_cv.notify_all();
    if let Some(r) = &ch.direct {
        if r.is_detached() {
            drop(st);
            return reader::drain_detached(inner, ch);
        }
        r.frame_arrived();
    }
    Ok(())
}

/// The channel a frame belongs to; on the responder, the first frame of a new
/// channel opens a connection to QEMU's incoming socket.
fn channel_for(inner: &Arc<Inner>, id: u16) -> Result<Arc<Channel>, FailReason> {
    if let Some(ch) = inner.channels.map.lock().get(&id) {
        return Ok(ch.clone());
    }
    let Some(target) = &inner.target else {
        return Err(protocol(format!(
            "frame for channel {id}, which was never opened"
        )));
    };
    let open_failed = |e: std::io::Error| FailReason::QemuIo {
        channel: None,
        error: format!("opening channel {id}: {e}"),
    };
    // One opener at a time, so two streams racing on a new channel's first
    // frames open one QEMU connection, not two.
    let _opening = inner.channels.opening.lock();
    if let Some(ch) = inner.channels.map.lock().get(&id) {
        return Ok(ch.clone());
    }
    super::charge_channel(inner, id).map_err(FailReason::MemoryBudget)?;
    if let Target::Direct(hand_over) = target {
        return reader::open_direct(inner, id, hand_over.as_ref()).map_err(open_failed);
    }
    let conn = target.connect(id).map_err(open_failed)?;
    Ok(open_channel(inner, id, conn, true))
}

/// How long the gated main channel must be quiet, with QEMU's end of stream
/// held, before the gate runs (the source QEMU, waiting on its return path
/// for the destination, sends nothing more and does not close). A pause in
/// the middle of the stream that happens to end like QEMU's end only commits
/// early: the channel stays held, so QEMU still cannot finish before the real
/// end, and a session that then fails with bytes held reverts the transfer.
pub(super) const GATE_QUIET: Duration = Duration::from_millis(10);

/// The main channel's cutover gate on the destination (see [`super::gate`]).
pub(super) struct Held {
    pub(super) gate: Arc<dyn CutoverGate>,
    pub(super) hold: TailHold,
    pub(super) committed: bool,
    pub(super) last_rx: Instant,
}

impl Held {
    /// Commits (once) and writes the held tail to QEMU; Err fails the session.
    fn open(&mut self, conn: &mut LocalConn) -> Result<(), FailReason> {
        if !self.committed {
            let t0 = Instant::now();
            self.gate.commit().map_err(|e| {
                FailReason::GateClosed(format!("{e}; QEMU never gets the end of the stream"))
            })?;
            self.committed = true;
            info!(
                held = self.hold.held(),
                ms = t0.elapsed().as_millis() as u64,
                "cutover gate: ownership committed, releasing the stream's tail"
            );
        }
        for f in self.hold.take() {
            conn.write_all(&f).map_err(|e| FailReason::QemuIo {
                channel: Some(0),
                error: format!("writing the released tail to QEMU failed: {e}"),
            })?;
        }
        self.gate.released();
        Ok(())
    }
}

/// Writes bytes to QEMU in order, then returns credit to the peer.
pub(super) fn qemu_tx(inner: Arc<Inner>, ch: Arc<Channel>, mut conn: LocalConn) {
    // The channel's bytes cannot be rebuilt: the session fails, naming why.
    let codec_fail = |e: &dyn std::fmt::Display| {
        fail(
            &inner,
            FailReason::Codec {
                channel: ch.id,
                seq: None,
                error: e.to_string(),
            },
        )
    };
    let mut rebuilder = match inner.rebuilder(ch.id) {
        Ok(r) => r,
        Err(e) => return codec_fail(&e),
    };
    let mut ring_charge = RingCharge::default();
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
            Incoming::Data {
                plan,
                raw_len,
                context,
            } => {
                if let Err(e) =
                    super::channel::rebuild(&mut rebuilder, plan, *raw_len, *context, &mut raw)
                {
                    return codec_fail(&e);
                }
                if let Err(e) = ring_charge.update(
                    &inner.budget,
                    rebuilder.ring_pages_used(),
                    rebuilder.ring_capacity(),
                    ch.id,
                ) {
                    fail(&inner, FailReason::MemoryBudget(e));
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
                            FailReason::GateClosed(format!(
                                "the main channel ended without QEMU's end of stream (QEMU_VM_EOF and the VM description) in its last {} bytes; QEMU never gets them",
                                h.hold.held()
                            )),
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
                        FailReason::QemuIo {
                            channel: Some(ch.id),
                            error: format!("writing to QEMU failed: {e}"),
                        },
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
