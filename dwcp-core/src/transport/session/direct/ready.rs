//! The readiness signal of a direct channel's reader: one end of a
//! socketpair that is readable whenever a read may make progress (see
//! [`super::reader`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

/// The readiness signal of one direct channel.
#[derive(Debug)]
pub(in crate::transport::session) struct Readiness {
    tx: UnixStream,
    pub(super) rx: UnixStream,
    /// The reader found nothing and waits for a signal.
    pub(super) armed: AtomicBool,
    /// The reader is gone: frames are checked and dropped as they come.
    pub(super) detached: AtomicBool,
}

impl Readiness {
    pub(super) fn new() -> std::io::Result<Readiness> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Readiness {
            tx,
            rx,
            armed: AtomicBool::new(false),
            detached: AtomicBool::new(false),
        })
    }

    /// Makes the descriptor readable (a full buffer is readable already).
    pub(in crate::transport::session) fn signal(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    pub(super) fn clear(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.rx).read(&mut b), Ok(n) if n > 0) {}
    }

    /// Called with the channel's receive lock held after a frame was queued.
    pub(in crate::transport::session) fn frame_arrived(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.signal();
        }
    }

    pub(in crate::transport::session) fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }
}
