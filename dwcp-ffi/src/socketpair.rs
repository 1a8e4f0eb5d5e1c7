//! The socketpair behind every QEMU channel.

use std::io;
use std::os::unix::net::UnixStream;

/// Send buffer of each end, bytes. QEMU's default-sized AF_UNIX buffer
/// (~208 KiB) makes its final flush wait for the relay after the guest is
/// stopped; a TCP socket on the same host autotunes to a few MiB, so give
/// the pair as much (capped by net.core.wmem_max; best effort).
const SEND_BUFFER: usize = 4 << 20;

/// A connected pair: (libdwcp's end, QEMU's end).
pub fn channel_pair() -> io::Result<(UnixStream, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    tune(&ours);
    tune(&theirs);
    Ok((ours, theirs))
}

/// Gives one end the larger send buffer (best effort).
pub fn tune(s: &UnixStream) {
    let _ = socket2::SockRef::from(s).set_send_buffer_size(SEND_BUFFER);
}
