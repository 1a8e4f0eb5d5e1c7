//! Helpers shared by the loopback transport tests.

use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};

use dwcp_core::transport::Target;

/// A responder target whose channels are socketpairs: the transport gets one
/// end, the other ("QEMU's end", with its channel id) comes out of the
/// returned receiver.
pub fn socketpair_target() -> (Target, mpsc::Receiver<(u16, UnixStream)>) {
    let (tx, ends) = mpsc::channel();
    let tx = Mutex::new(tx);
    let target = Target::Connector(Arc::new(move |id| {
        let (ours, qemu) = UnixStream::pair()?;
        tx.lock().unwrap().send((id, qemu)).unwrap();
        Ok(ours)
    }));
    (target, ends)
}
