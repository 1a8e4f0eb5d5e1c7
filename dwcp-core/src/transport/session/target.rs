//! Where a responder's channels go ([`Target`]): QEMU's incoming socket,
//! QEMU's incoming TCP address, an embedder's connector, or an embedder's
//! direct reader.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{ChannelReader, LocalConn};

/// Where a responder's channels go.
#[derive(Clone)]
pub enum Target {
    /// Connect to QEMU's incoming UNIX socket (the agent's way).
    Socket(PathBuf),
    /// Connect to QEMU's incoming TCP address, `-incoming tcp:IP:PORT` on
    /// this host (the agent's `--deliver-tcp`: Nova's migrations), within
    /// this timeout.
    Tcp(SocketAddr, Duration),
    /// Ask the embedder for one connection per channel (libdwcp inside QEMU
    /// hands QEMU the other end of a socketpair).
    Connector(Arc<dyn Fn(u16) -> std::io::Result<UnixStream> + Send + Sync>),
    /// Hand each channel to the embedder to read with a [`ChannelReader`]
    /// (no relay thread, no socketpair copy), with QEMU's end of a
    /// socketpair that carries only the channel's other direction (the
    /// return path). Not for gated sessions.
    Direct(DirectHandOver),
}

/// Takes a new direct channel: (QEMU's end of the return-path socketpair,
/// the reading half).
pub type DirectHandOver =
    Arc<dyn Fn(UnixStream, ChannelReader) -> std::io::Result<()> + Send + Sync>;

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Socket(p) => write!(f, "Socket({})", p.display()),
            Target::Tcp(a, _) => write!(f, "Tcp({a})"),
            Target::Connector(_) => f.write_str("Connector"),
            Target::Direct(_) => f.write_str("Direct"),
        }
    }
}

impl Target {
    pub(super) fn connect(&self, channel: u16) -> std::io::Result<LocalConn> {
        match self {
            Target::Socket(path) => UnixStream::connect(path).map(LocalConn::from).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("connecting to QEMU at {}: {e}", path.display()),
                )
            }),
            Target::Tcp(addr, timeout) => TcpStream::connect_timeout(addr, *timeout)
                .map(LocalConn::from)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("connecting to QEMU at tcp:{addr}: {e}"))
                }),
            Target::Connector(f) => f(channel).map(LocalConn::from),
            Target::Direct(_) => Err(std::io::Error::other(
                "a direct target hands over readers, not sockets",
            )),
        }
    }
}
