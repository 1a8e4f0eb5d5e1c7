//! The sending half of a direct channel ([`ChannelWriter`]): the embedder
//! (libdwcp in the source QEMU) hands its bytes over, and an unchecked raw
//! frame goes out as a header plus QEMU's own iovecs in one writev.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::super::channel::Channel;
use super::super::send::{write_inline, FrameSender};
use super::super::{is_down, FailReason, Inner};

/// Why [`ChannelWriter::write_vectored`] did not take the bytes.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("migration failed: {0}")]
    Failed(FailReason),
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
    pub(in crate::transport::session) fn new(inner: Arc<Inner>, ch: Arc<Channel>) -> ChannelWriter {
        ChannelWriter {
            tx: Mutex::new(FrameSender::new(&inner, ch.id)),
            inner,
            ch,
            stop: AtomicBool::new(false),
        }
    }

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
                for sl in &slices {
                    tx.planner.skip(sl);
                }
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
        match self.inner.life.failure.lock().clone() {
            Some(e) => WriteError::Failed(e),
            None if self.stop.load(Ordering::Acquire) => WriteError::Shutdown,
            None => WriteError::Failed(FailReason::ShuttingDown),
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
