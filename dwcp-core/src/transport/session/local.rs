//! QEMU's end of a channel on this host ([`LocalConn`]): a connected UNIX
//! stream (a route socket, an incoming socket, a socketpair) or a TCP
//! connection (Nova's redirected `tcp://` connection on the source, QEMU's
//! `-incoming tcp:IP:PORT` on the destination). The session only reads,
//! writes, duplicates and shuts it down, which both kinds do alike.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

/// A connected stream socket to QEMU on this host.
#[derive(Debug)]
pub enum LocalConn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl LocalConn {
    /// Another handle of the same connection (dup).
    pub fn try_clone(&self) -> std::io::Result<LocalConn> {
        Ok(match self {
            LocalConn::Unix(s) => LocalConn::Unix(s.try_clone()?),
            LocalConn::Tcp(s) => LocalConn::Tcp(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            LocalConn::Unix(s) => s.shutdown(how),
            LocalConn::Tcp(s) => s.shutdown(how),
        }
    }
}

impl From<UnixStream> for LocalConn {
    fn from(s: UnixStream) -> LocalConn {
        LocalConn::Unix(s)
    }
}

impl From<TcpStream> for LocalConn {
    /// Without Nagle's delay: the return path carries small messages QEMU
    /// waits for.
    fn from(s: TcpStream) -> LocalConn {
        let _ = s.set_nodelay(true);
        LocalConn::Tcp(s)
    }
}

impl AsRawFd for LocalConn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            LocalConn::Unix(s) => s.as_raw_fd(),
            LocalConn::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl AsFd for LocalConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            LocalConn::Unix(s) => s.as_fd(),
            LocalConn::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for LocalConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            LocalConn::Unix(s) => s.read(buf),
            LocalConn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for LocalConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LocalConn::Unix(s) => s.write(buf),
            LocalConn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
