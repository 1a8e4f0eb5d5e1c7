//! Flow control: credit returned to the peer for bytes delivered to QEMU
//! (queued for a `tcp_tx` thread, or sent inline by a direct reader), and
//! how much a channel may send now (its credit and its share of the
//! in-flight budget).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::channel::Channel;
use super::{is_down, Ctrl, FailReason, Inner};
use crate::wire::FrameHeader;

/// Counts `n` raw bytes as taken by QEMU and adds them to the credit owed
/// to the peer; returns the credit that was already owed.
pub(super) fn count_delivered(inner: &Inner, ch: &Channel, n: u64) -> u64 {
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
pub(super) fn delivered_inline(inner: &Inner, ch: &Arc<Channel>, n: u64) -> Result<(), FailReason> {
    let was = count_delivered(inner, ch, n);
    // Clear text only: a TLS record cannot go out partly without blocking.
    if let Some(w) = inner
        .links
        .tx
        .iter()
        .find_map(|t| t.try_lock().filter(|w| w.plain().is_some()))
    {
        let credit = ch.pending_credit.swap(0, Ordering::AcqRel);
        if credit == 0 || is_down(inner) {
            return Ok(());
        }
        let head = FrameHeader::window(ch.id, credit as u32).encode();
        let sock = w.plain().expect("filtered on plain");
        let sent = match socket2::SockRef::from(sock).send_with_flags(&head, libc::MSG_DONTWAIT) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(send_failed(e)),
        };
        if sent > 0 {
            if sent < head.len() {
                // Never leave half a frame: finish it (a few bytes).
                (&*sock).write_all(&head[sent..]).map_err(send_failed)?;
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
pub(super) fn queue_credit(inner: &Inner, ch: &Arc<Channel>) -> Result<(), FailReason> {
    inner
        .queues
        .ctrl_tx
        .send_timeout(Ctrl::Credit(ch.clone()), inner.cfg.idle_timeout)
        .map_err(|_| FailReason::Local("control queue stuck".into()))
}

/// Counts `n` raw bytes as taken by QEMU and returns them to the peer as
/// credit (one queued credit message per channel at a time).
pub(super) fn delivered(inner: &Inner, ch: &Arc<Channel>, n: u64) -> Result<(), FailReason> {
    if count_delivered(inner, ch, n) == 0 {
        return queue_credit(inner, ch);
    }
    Ok(())
}

/// How much a channel may read from QEMU now: its credit (the receiver's
/// memory bound, raw bytes), and nothing while its share of the wire budget
/// (`target_inflight`, wire bytes, split over the open channels) is used up.
/// Budgeting wire bytes, not raw ones, keeps the drain time after QEMU stops
/// the guest at what the link needs, however compressible the data is.
pub(super) fn allowed_bytes(inner: &Inner, ch: &Channel, credit: u64) -> usize {
    let open = inner
        .channels
        .map
        .lock()
        .values()
        .filter(|c| !c.sent_eof.load(Ordering::Relaxed))
        .count()
        .max(1) as u64;
    let per_channel =
        (inner.tuning.target_inflight.load(Ordering::Relaxed) / open).max(inner.cfg.chunk as u64);
    if ch.wire_inflight() >= per_channel {
        return 0;
    }
    credit.min(inner.cfg.chunk as u64) as usize
}

fn send_failed(e: std::io::Error) -> FailReason {
    FailReason::Send {
        what: "sending credit",
        error: e.to_string(),
    }
}
