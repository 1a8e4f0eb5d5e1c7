//! A channel's state: what it has sent and not yet had credited back, its
//! credit, its reorder buffer of received frames.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::direct::ready::Readiness;
use super::local::LocalConn;
use super::Inner;

pub(super) enum Incoming {
    Data {
        /// The plan; with `context`, the compressed piece of the channel's
        /// context stream that decodes to a plan of that many bytes.
        plan: Vec<u8>,
        raw_len: u32,
        context: Option<u32>,
    },
    /// A [`Tier::Raw`] frame: the bytes themselves.
    Raw(Vec<u8>),
    Eof,
}

#[derive(Default)]
pub(super) struct RecvState {
    pub(super) next: u64,
    pub(super) frames: BTreeMap<u64, Incoming>,
    /// Raw bytes buffered and not yet credited back.
    pub(super) bytes: u64,
}

pub(super) struct Channel {
    pub(super) id: u16,
    /// Our side of the QEMU connection (a clone kept for shutdown).
    pub(super) local: LocalConn,
    pub(super) credit: Mutex<u64>,
    pub(super) credit_cv: Condvar,
    /// Credit earned by delivering, waiting for a writer to send it.
    pub(super) pending_credit: AtomicU64,
    pub(super) recv: Mutex<RecvState>,
    pub(super) recv_cv: Condvar,
    pub(super) sent_eof: AtomicBool,
    pub(super) delivered_eof: AtomicBool,
    pub(super) raw_out: AtomicU64,
    /// Raw bytes the peer credited back in all (delivered to its QEMU).
    pub(super) credited_raw: AtomicU64,
    pub(super) raw_in: AtomicU64,
    /// Wire sizes of the Data frames sent and not yet credited back.
    pub(super) sent: Mutex<SentLog>,
    /// Raw bytes read from QEMU and not yet encoded (counted at their raw
    /// size against the wire budget until their wire size is known).
    pub(super) unencoded: AtomicU64,
    /// A channel read by the embedder ([`ChannelReader`]) instead of a
    /// deliverer thread: its readiness signal.
    pub(super) direct: Option<Arc<Readiness>>,
}

/// What a channel has on the wire: frames in the order they were encoded,
/// retired by the peer's credit (raw bytes, in delivery order). Encode
/// workers may finish frames out of order, so the wire attributed to a
/// credit can be off by a frame for a moment; the totals always agree.
#[derive(Default)]
pub(super) struct SentLog {
    /// (raw bytes, wire bytes, when it was put on the wire) per frame.
    pub(super) frames: std::collections::VecDeque<(u64, u64, Instant)>,
    /// Credit not yet matched to whole frames.
    pub(super) carry: u64,
    /// Sum of the wire sizes in `frames`.
    pub(super) wire: u64,
}

impl Channel {
    pub(super) fn done(&self) -> bool {
        self.sent_eof.load(Ordering::Acquire) && self.delivered_eof.load(Ordering::Acquire)
    }

    /// Records a Data frame put on the wire (frame header included).
    pub(super) fn note_sent(&self, inner: &Inner, raw: u64, wire: u64) {
        let mut log = self.sent.lock();
        log.frames.push_back((raw, wire, Instant::now()));
        log.wire += wire;
        inner.flow.wire_inflight.fetch_add(wire, Ordering::Relaxed);
    }

    /// Retires frames covered by `credit` raw bytes; returns their wire
    /// size and the credit loop of the newest of them: how long ago it was
    /// put on the wire (sent, carried, delivered to the peer's QEMU and
    /// credited back).
    pub(super) fn note_credit(&self, inner: &Inner, credit: u64) -> (u64, Option<Duration>) {
        let mut log = self.sent.lock();
        let mut left = log.carry + credit;
        let mut wire = 0;
        let mut newest = None;
        while let Some(&(raw, w, at)) = log.frames.front() {
            if raw > left {
                break;
            }
            left -= raw;
            wire += w;
            newest = Some(at);
            log.frames.pop_front();
        }
        log.carry = left;
        log.wire -= wire;
        inner.flow.wire_inflight.fetch_sub(wire, Ordering::Relaxed);
        (wire, newest.map(|at| at.elapsed()))
    }

    /// Wire bytes this channel has in flight, unencoded reads included.
    pub(super) fn wire_inflight(&self) -> u64 {
        self.sent.lock().wire + self.unencoded.load(Ordering::Relaxed)
    }
}

/// Rebuilds a Data frame's bytes into `out`: its plan, or (a context
/// frame) the plan its piece of the context stream decodes to.
pub(super) fn rebuild(
    rebuilder: &mut crate::codec::Rebuilder,
    plan: &[u8],
    raw_len: u32,
    context: Option<u32>,
    out: &mut Vec<u8>,
) -> Result<(), crate::codec::CodecError> {
    match context {
        None => rebuilder.rebuild(plan, raw_len as usize, out),
        Some(plan_len) => rebuilder.rebuild_context(plan, plan_len as usize, raw_len as usize, out),
    }
}
