//! The receiving half of a channel read by the embedder ([`ChannelReader`]):
//! libdwcp inside the destination QEMU hands QEMU the reassembled bytes
//! straight from the reorder buffer, instead of a deliverer thread writing
//! them into a socketpair that QEMU then reads (two copies, two syscalls and
//! a thread wake-up less per chunk).
//!
//! QEMU reads from a coroutine that yields until its channel is readable, so
//! the reader comes with a readiness descriptor ([`ChannelReader::ready_fd`]):
//! readable whenever a read may make progress (data, end of stream, failure
//! or shutdown), possibly spuriously, never missing a wake-up. It is one
//! end of a socketpair: the receive path writes a byte into it when a frame
//! arrives for a reader that last found nothing ("armed"), and the reader
//! drains it before saying "would block". Both happen under the channel's
//! receive lock, so no wake-up falls between them.

use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::debug;

use super::super::channel::{Channel, Incoming};
use super::super::credit::{count_delivered, delivered_inline};
use super::super::{check_complete, fail, is_down, open_channel_with, Ctrl, FailReason, Inner};
use super::ready::Readiness;
use crate::codec::Rebuilder;
use crate::transport::budget::RingCharge;

/// Why [`ChannelReader::read_vectored`] returned no bytes.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Non-blocking read and nothing to read yet: wait for
    /// [`ChannelReader::ready_fd`].
    #[error("nothing to read yet")]
    WouldBlock,
    #[error("migration failed: {0}")]
    Failed(FailReason),
}

/// Opens responder channel `id` as a direct channel and hands it over.
pub(in crate::transport::session) fn open_direct(
    inner: &Arc<Inner>,
    id: u16,
    hand_over: &(dyn Fn(UnixStream, ChannelReader) -> std::io::Result<()> + Send + Sync),
) -> std::io::Result<Arc<Channel>> {
    if inner.gate.is_some() {
        return Err(std::io::Error::other(
            "a gated session cannot hand its channels to the embedder",
        ));
    }
    let ready = Arc::new(Readiness::new()?);
    let (ours, theirs) = UnixStream::pair()?;
    // The channel's other direction (QEMU's return path) is still read
    // from the socketpair; this side only drops the deliverer.
    let ch = open_channel_with(inner, id, ours.into(), true, Some(ready.clone()));
    let reader = ChannelReader {
        inner: inner.clone(),
        ch: ch.clone(),
        ready,
        state: Mutex::new(ReadState {
            rebuilder: inner.rebuilder(id)?,
            ring_charge: RingCharge::default(),
            cur: Vec::new(),
            pos: 0,
            scratch: Vec::new(),
            uncredited: 0,
            eof: false,
        }),
        stop: AtomicBool::new(false),
    };
    hand_over(theirs, reader)?;
    Ok(ch)
}

struct ReadState {
    rebuilder: Rebuilder,
    ring_charge: RingCharge,
    /// The frame being read (several, after a peek that crossed frames).
    cur: Vec<u8>,
    pos: usize,
    scratch: Vec<u8>,
    /// Bytes read and not yet credited back to the peer.
    uncredited: u64,
    /// The peer's end of stream was taken.
    eof: bool,
}

/// The receiving half of a responder channel opened by a
/// [`super::Target::Direct`] target: the channel's bytes, in order, read
/// straight from the session's reorder buffer. Reads may come from any
/// thread, one at a time (they serialise on an internal lock).
///
/// Dropping it before the end of the stream detaches it: the end of stream
/// still completes the channel, but data that was never read fails the
/// session (as a write to a closed socket would).
pub struct ChannelReader {
    inner: Arc<Inner>,
    ch: Arc<Channel>,
    ready: Arc<Readiness>,
    state: Mutex<ReadState>,
    stop: AtomicBool,
}

impl std::fmt::Debug for ChannelReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelReader")
            .field("channel", &self.ch.id)
            .finish()
    }
}

/// Send buffer of a relayed channel's socket, bytes.
const RELAY_SEND_BUFFER: usize = 4 << 20;

/// Credit goes back once this many chunks were read (or when QEMU has read
/// everything that arrived).
const CREDIT_BATCH_CHUNKS: u64 = 2;

/// How often a blocked read looks at the session's state.
const BLOCK_POLL: Duration = Duration::from_millis(100);

impl ChannelReader {
    /// The channel's number in the session.
    pub fn id(&self) -> u16 {
        self.ch.id
    }

    /// A descriptor that is readable while a read may make progress (see
    /// the module docs). Owned by the reader: do not read or close it.
    pub fn ready_fd(&self) -> RawFd {
        self.ready.rx.as_raw_fd()
    }

    /// Fills `bufs` with the channel's next bytes and returns how many;
    /// `Ok(0)` (with non-empty `bufs`) is the end of the stream, or a
    /// [`ChannelReader::shutdown`]. With `peek` the bytes stay to be read
    /// again (like `MSG_PEEK`). With `block` the call waits for at least one
    /// byte; without, it returns [`ReadError::WouldBlock`] when there is
    /// none yet.
    pub fn read_vectored(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        peek: bool,
        block: bool,
    ) -> Result<usize, ReadError> {
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        if want == 0 {
            return Ok(0);
        }
        let mut rs = self.state.lock();
        loop {
            let have = rs.cur.len() - rs.pos;
            // A peek tops up what it has from frames already here, so a
            // short header split over two frames is seen whole.
            if have > 0 && !(peek && have < want && self.next_frame_ready()) {
                return self.copy_out(&mut rs, bufs, peek);
            }
            if rs.eof || self.stop.load(Ordering::Acquire) {
                // What was read counts as delivered (statistics, and the
                // peer's credit) before the end is reported.
                self.flush_credit(&mut rs)?;
                return Ok(0);
            }
            if let Some(e) = self.failure() {
                return Err(ReadError::Failed(e));
            }
            let item = {
                let mut st = self.ch.recv.lock();
                let next = st.next;
                match st.frames.remove(&next) {
                    Some(item) => {
                        st.next += 1;
                        Some(item)
                    }
                    None if have > 0 => None,
                    None if rs.uncredited > 0 => {
                        // Everything here was read: give the peer room
                        // before waiting for more.
                        drop(st);
                        self.flush_credit(&mut rs)?;
                        continue;
                    }
                    None if block => {
                        self.ch.recv_cv.wait_for(&mut st, BLOCK_POLL);
                        continue;
                    }
                    None => {
                        // Arm, then drain: a frame queued after this
                        // (under the same lock) signals again.
                        self.ready.armed.store(true, Ordering::Release);
                        self.ready.clear();
                        return Err(ReadError::WouldBlock);
                    }
                }
            };
            match item {
                // Only a peek that found part of what it wants gets here.
                None => return self.copy_out(&mut rs, bufs, peek),
                Some(item) => {
                    if let Err(e) = self.take(&mut rs, item) {
                        fail(&self.inner, e.clone());
                        return Err(ReadError::Failed(e));
                    }
                }
            }
        }
    }

    fn next_frame_ready(&self) -> bool {
        let st = self.ch.recv.lock();
        st.frames.contains_key(&st.next)
    }

    fn failure(&self) -> Option<FailReason> {
        if !is_down(&self.inner) {
            return None;
        }
        Some(
            self.inner
                .life
                .failure
                .lock()
                .clone()
                .unwrap_or(FailReason::ShuttingDown),
        )
    }

    /// Appends one frame's bytes to what is left unread.
    fn take(&self, rs: &mut ReadState, item: Incoming) -> Result<(), FailReason> {
        if rs.pos == rs.cur.len() {
            rs.cur.clear();
            rs.pos = 0;
        }
        match item {
            Incoming::Eof => {
                rs.eof = true;
                self.ch.delivered_eof.store(true, Ordering::Release);
                debug!(channel = self.ch.id, "peer end of stream read by QEMU");
                check_complete(&self.inner);
            }
            Incoming::Raw(data) if rs.cur.is_empty() => rs.cur = data,
            Incoming::Raw(data) => rs.cur.extend_from_slice(&data),
            Incoming::Data {
                plan,
                raw_len,
                context,
            } => {
                let ReadState {
                    rebuilder,
                    cur,
                    scratch,
                    ..
                } = rs;
                let out = if cur.is_empty() { cur } else { scratch };
                super::super::channel::rebuild(rebuilder, &plan, raw_len, context, out).map_err(
                    |e| FailReason::Codec {
                        channel: self.ch.id,
                        seq: None,
                        error: e.to_string(),
                    },
                )?;
                rs.ring_charge
                    .update(
                        &self.inner.budget,
                        rs.rebuilder.ring_pages_used(),
                        rs.rebuilder.ring_capacity(),
                        self.ch.id,
                    )
                    .map_err(FailReason::MemoryBudget)?;
                if !rs.scratch.is_empty() {
                    rs.cur.extend_from_slice(&rs.scratch);
                    rs.scratch.clear();
                }
            }
        }
        Ok(())
    }

    fn copy_out(
        &self,
        rs: &mut ReadState,
        bufs: &mut [IoSliceMut<'_>],
        peek: bool,
    ) -> Result<usize, ReadError> {
        let mut src = &rs.cur[rs.pos..];
        let mut n = 0;
        for b in bufs.iter_mut() {
            if src.is_empty() {
                break;
            }
            let k = b.len().min(src.len());
            b[..k].copy_from_slice(&src[..k]);
            src = &src[k..];
            n += k;
        }
        if !peek {
            rs.pos += n;
            rs.uncredited += n as u64;
            // Credit in batches of two chunks: QEMU reads in pieces of a few
            // KiB, and each credit message costs both ends a wake-up (the
            // peer's receiving thread, then its writer). What is owed goes
            // back at once when QEMU has read everything here (see
            // `flush_credit`), so a sender waiting for it never stalls.
            if rs.uncredited >= CREDIT_BATCH_CHUNKS * self.inner.cfg.chunk as u64 {
                self.flush_credit(rs)?;
            }
        }
        Ok(n)
    }

    /// Returns the credit owed for bytes QEMU has read.
    fn flush_credit(&self, rs: &mut ReadState) -> Result<(), ReadError> {
        let credit = std::mem::take(&mut rs.uncredited);
        if credit == 0 {
            return Ok(());
        }
        delivered_inline(&self.inner, &self.ch, credit).map_err(|e| {
            fail(&self.inner, e.clone());
            ReadError::Failed(e)
        })
    }

    /// Relays the channel into its socketpair from a thread of its own, for
    /// an embedder that wants an ordinary descriptor after all: QEMU then
    /// reads the stream from the socket handed over with this reader, which
    /// keeps carrying the return path the other way.
    pub fn relay(self) -> std::io::Result<()> {
        let mut sock = self.ch.local.try_clone()?;
        // As much buffer as a TCP socket on the same host autotunes to, so
        // QEMU's reads are not paced by this thread's wake-ups (best effort:
        // capped by net.core.wmem_max).
        let _ = socket2::SockRef::from(&sock).set_send_buffer_size(RELAY_SEND_BUFFER);
        let inner = self.inner.clone();
        let t = std::thread::Builder::new()
            .name(format!("dwcp-qemu-tx{}", self.ch.id))
            .spawn(move || {
                let mut buf = vec![0u8; self.inner.cfg.chunk];
                loop {
                    match self.read_vectored(&mut [IoSliceMut::new(&mut buf)], false, true) {
                        Ok(0) => {
                            let _ = sock.shutdown(std::net::Shutdown::Write);
                            return;
                        }
                        Ok(n) => {
                            if let Err(e) = sock.write_all(&buf[..n]) {
                                fail(
                                    &self.inner,
                                    FailReason::QemuIo {
                                        channel: Some(self.ch.id),
                                        error: format!("writing to QEMU failed: {e}"),
                                    },
                                );
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            })?;
        inner.life.threads.lock().push(t);
        Ok(())
    }

    /// Like shutdown(2) of a socket's reading side (QEMU shuts channels
    /// down on yank and cancel): a read blocked in another thread, and
    /// every later one, return end of stream. Does not block.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let _st = self.ch.recv.lock();
        self.ch.recv_cv.notify_all();
        self.ready.signal();
    }
}

impl Drop for ChannelReader {
    fn drop(&mut self) {
        let unread = {
            let rs = self.state.get_mut();
            let credit = std::mem::take(&mut rs.uncredited);
            // Bytes QEMU read count as delivered; their credit goes out
            // through a writer thread if the control queue has room (never
            // blocking here: the channel is closing anyway).
            if credit > 0 && count_delivered(&self.inner, &self.ch, credit) == 0 {
                let _ = self
                    .inner
                    .queues
                    .ctrl_tx
                    .try_send(Ctrl::Credit(self.ch.clone()));
            }
            rs.cur.len() - rs.pos
        };
        {
            let _st = self.ch.recv.lock();
            self.ready.detached.store(true, Ordering::Release);
        }
        if unread > 0 {
            fail(
                &self.inner,
                FailReason::QemuIo {
                    channel: Some(self.ch.id),
                    error: format!("QEMU closed it with {unread} bytes unread"),
                },
            );
            return;
        }
        if let Err(e) = drain_detached(&self.inner, &self.ch) {
            fail(&self.inner, e);
        }
    }
}

/// Takes what arrived for a channel whose reader is gone: its end of stream
/// completes it; data (QEMU closed the channel mid-stream) fails the session.
pub(in crate::transport::session) fn drain_detached(
    inner: &Inner,
    ch: &Channel,
) -> Result<(), FailReason> {
    let mut st = ch.recv.lock();
    let next = st.next;
    match st.frames.remove(&next) {
        None => Ok(()),
        Some(Incoming::Eof) => {
            st.next += 1;
            drop(st);
            ch.delivered_eof.store(true, Ordering::Release);
            check_complete(inner);
            Ok(())
        }
        Some(_) => {
            if ch.delivered_eof.load(Ordering::Acquire)
                || inner.life.complete.load(Ordering::Acquire)
            {
                return Ok(());
            }
            Err(FailReason::QemuIo {
                channel: Some(ch.id),
                error: "data arrived after QEMU closed the channel".into(),
            })
        }
    }
}
