//! A TLS connection over a `TcpStream`, split into a reader half and a
//! writer half for the session's reader and writer threads.
//!
//! Locking: the two halves share one `rustls::Connection` behind a mutex and
//! the socket. The reader reads ciphertext from the socket WITHOUT the lock,
//! then takes it to feed the records and copy plaintext out. The writer takes
//! it to encrypt at most [`WRITE_CHUNK`] bytes of plaintext and drain the
//! records into its own buffer, drops it, then writes that ciphertext to
//! the socket. Neither half blocks on the socket while holding the
//! connection lock, so a writer stuck on a full send buffer never stops the
//! reader (and the reverse). A second lock, `wire`, is held by whoever moves
//! records from rustls to the socket, from draining until the socket write
//! is done, so records reach the wire in sequence order; the reader only
//! ever *tries* it (to send a KeyUpdate reply or an alert), so it never
//! waits for the writer.
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;

use super::{PeerIdentity, TlsError};

/// Plaintext encrypted per lock hold by the writer (rustls' own default
/// buffer limit is 64 KiB of pending records; this stays under it).
pub const WRITE_CHUNK: usize = 64 * 1024;
/// Ciphertext read from the socket per `read` call of the reader.
const READ_BUF: usize = 64 * 1024;

#[derive(Debug)]
struct Shared {
    tcp: TcpStream,
    conn: Mutex<Connection>,
    wire: Mutex<()>,
    peer: String,
}

/// An established TLS connection (handshake done). Split it with
/// [`TlsLink::split`], or use it whole through [`TlsLink::reader`] and
/// [`TlsLink::writer`] (each may be called once per thread that needs a half).
#[derive(Debug, Clone)]
pub struct TlsLink {
    shared: Arc<Shared>,
}

/// The reading half: `Read` yields plaintext; `Ok(0)` only after the peer's
/// close_notify, `UnexpectedEof` when the TCP stream ended without one.
#[derive(Debug)]
pub struct TlsReader {
    shared: Arc<Shared>,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
}

/// The writing half: `Write` encrypts and sends; every call has sent all of
/// its data to the socket when it returns (no buffering here).
#[derive(Debug)]
pub struct TlsWriter {
    shared: Arc<Shared>,
    out: Vec<u8>,
}

impl TlsLink {
    fn new(tcp: TcpStream, conn: Connection) -> Self {
        let peer = peer_name(&tcp);
        Self {
            shared: Arc::new(Shared {
                tcp,
                conn: Mutex::new(conn),
                wire: Mutex::new(()),
                peer,
            }),
        }
    }

    /// The underlying socket, for `TCP_INFO`, socket options and timeouts.
    /// Never read or write it directly: that would corrupt the TLS stream.
    pub fn tcp(&self) -> &TcpStream {
        &self.shared.tcp
    }

    /// The peer's address as used in error messages.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// A reader half; the session's reader thread owns it.
    pub fn reader(&self) -> TlsReader {
        TlsReader {
            shared: self.shared.clone(),
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            pos: 0,
            len: 0,
        }
    }

    /// A writer half; the session's writer thread owns it. Writes must be
    /// serialized by the caller (one writer per stream).
    pub fn writer(&self) -> TlsWriter {
        TlsWriter {
            shared: self.shared.clone(),
            out: Vec::with_capacity(WRITE_CHUNK + 4096),
        }
    }

    /// Both halves.
    pub fn split(self) -> (TlsReader, TlsWriter) {
        (self.reader(), self.writer())
    }

    /// The peer's identity from its verified certificate.
    pub fn peer_identity(&self) -> Option<PeerIdentity> {
        peer_identity(self)
    }

    /// Negotiated cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub fn cipher_suite(&self) -> Option<String> {
        let c = self.shared.conn.lock();
        c.negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
    }

    /// Send close_notify and shut the socket's write side down; the peer's
    /// reader then sees a clean EOF (`Ok(0)`).
    pub fn close(&self) -> io::Result<()> {
        self.writer().close()
    }
}

/// The identity (subject, CN, SANs) of the peer's end-entity certificate;
/// `None` only if the peer presented none (impossible with these configs).
pub fn peer_identity(link: &TlsLink) -> Option<PeerIdentity> {
    let c = link.shared.conn.lock();
    c.peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| PeerIdentity::from_der(cert))
}

/// Connect-side handshake on an already connected socket. `server_name` is
/// the name the server's certificate must carry (a DNS name or an IP
/// address: QEMU's `tls-hostname`, else the host part of the address). The
/// socket's read timeout bounds each wait for the peer.
pub fn client_handshake(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> Result<TlsLink, TlsError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    let conn = ClientConnection::new(config, name).map_err(|source| TlsError::Handshake {
        peer: peer_name(&tcp),
        source,
    })?;
    handshake(tcp, conn.into())
}

/// Accept-side handshake: requires and verifies the client's certificate.
/// The socket's read timeout bounds each wait for the peer, so a clear-text
/// or silent client fails instead of hanging.
pub fn server_handshake(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<TlsLink, TlsError> {
    let conn = ServerConnection::new(config).map_err(|source| TlsError::Handshake {
        peer: peer_name(&tcp),
        source,
    })?;
    handshake(tcp, conn.into())
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into())
}

fn handshake(mut tcp: TcpStream, mut conn: Connection) -> Result<TlsLink, TlsError> {
    let peer = peer_name(&tcp);
    let io_err = |what: &'static str, source: io::Error| TlsError::HandshakeIo {
        peer: peer.clone(),
        what,
        source,
    };
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut tcp).map_err(|e| io_err("sending", e))?;
        }
        if !conn.is_handshaking() {
            break;
        }
        let n = match conn.read_tls(&mut tcp) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io_err(
                    "timed out waiting for the peer (is it speaking TLS?)",
                    e,
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("receiving", e)),
        };
        if n == 0 {
            return Err(io_err(
                "connection closed during the handshake",
                io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        if let Err(source) = conn.process_new_packets() {
            // Tell the peer why (best effort), then report.
            while conn.wants_write() {
                if conn.write_tls(&mut tcp).is_err() {
                    break;
                }
            }
            return Err(TlsError::Handshake { peer, source });
        }
    }
    Ok(TlsLink::new(tcp, conn))
}

impl Shared {
    /// Move queued records (KeyUpdate reply, alert) to the socket if nobody
    /// else is doing so; never waits.
    fn try_flush(&self) {
        let Some(_wire) = self.wire.try_lock() else {
            return;
        };
        let mut out = Vec::new();
        {
            let mut c = self.conn.lock();
            while c.wants_write() {
                if c.write_tls(&mut out).is_err() {
                    break;
                }
            }
        }
        if !out.is_empty() {
            let _ = (&self.tcp).write_all(&out);
        }
    }
}

fn protocol_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsError::Protocol(e))
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut c = self.shared.conn.lock();
                match c.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.pos < self.len {
                    let mut slice = &self.buf[self.pos..self.len];
                    let n = c.read_tls(&mut slice)?;
                    if n == 0 {
                        // Only after close_notify, which reader() reports as
                        // Ok(0) above; never loop here.
                        return Ok(0);
                    }
                    self.pos += n;
                    let res = c.process_new_packets();
                    let wants_write = c.wants_write();
                    drop(c);
                    if wants_write {
                        self.shared.try_flush();
                    }
                    res.map_err(protocol_error)?;
                    continue;
                }
            }
            // Ciphertext from the socket, without the connection lock.
            let n = match (&self.shared.tcp).read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                let mut c = self.shared.conn.lock();
                // Records rustls has not consumed stay; mark EOF so reader()
                // says Ok(0) (close_notify seen) or UnexpectedEof.
                c.read_tls(&mut io::empty())?;
                c.process_new_packets().map_err(protocol_error)?;
                return match c.reader().read(out) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: peer closed the connection without close_notify",
                    )),
                    Err(e) => Err(e),
                };
            }
            self.pos = 0;
            self.len = n;
        }
    }
}

impl TlsWriter {
    /// Encrypt and send all of `bufs` as one record stream (a frame header
    /// and its payload become the same records, no extra plaintext copy).
    pub fn write_all_slices(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut idx = 0;
        let mut off = 0;
        let _wire = self.shared.wire.lock();
        while idx < bufs.len() {
            self.out.clear();
            {
                let mut c = self.shared.conn.lock();
                let mut budget = WRITE_CHUNK;
                // One vectored call per chunk: rustls fragments the joined
                // slices into full records.
                let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len() - idx);
                let (mut i, mut o) = (idx, off);
                while i < bufs.len() && budget > 0 {
                    let take = (bufs[i].len() - o).min(budget);
                    if take > 0 {
                        slices.push(IoSlice::new(&bufs[i][o..o + take]));
                    }
                    budget -= take;
                    o += take;
                    if o == bufs[i].len() {
                        i += 1;
                        o = 0;
                    }
                }
                let offered = !slices.is_empty();
                let mut sent = c.writer().write_vectored(&slices)?;
                drop(slices);
                if offered && sent == 0 && !c.wants_write() {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "TLS: the connection accepts no more data",
                    ));
                }
                // Advance by what rustls accepted (it may refuse some when a
                // key update is due; the next round sends the rest).
                while sent > 0 {
                    let left = bufs[idx].len() - off;
                    if sent >= left {
                        sent -= left;
                        idx += 1;
                        off = 0;
                    } else {
                        off += sent;
                        sent = 0;
                    }
                }
                while idx < bufs.len() && bufs[idx].len() == off {
                    idx += 1;
                    off = 0;
                }
                while c.wants_write() {
                    c.write_tls(&mut self.out)?;
                }
            }
            (&self.shared.tcp).write_all(&self.out)?;
        }
        Ok(())
    }

    /// Send close_notify and shut the socket's write side down.
    pub fn close(&mut self) -> io::Result<()> {
        let _wire = self.shared.wire.lock();
        self.out.clear();
        {
            let mut c = self.shared.conn.lock();
            c.send_close_notify();
            while c.wants_write() {
                c.write_tls(&mut self.out)?;
            }
        }
        (&self.shared.tcp).write_all(&self.out)?;
        self.shared.tcp.shutdown(Shutdown::Write)
    }

    /// The underlying socket (options, `TCP_INFO`).
    pub fn tcp(&self) -> &TcpStream {
        &self.shared.tcp
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all_slices(&[buf])?;
        Ok(buf.len())
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let slices: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
        self.write_all_slices(&slices)?;
        Ok(slices.iter().map(|s| s.len()).sum())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsReader {
    /// The underlying socket (options, timeouts, `TCP_INFO`).
    pub fn tcp(&self) -> &TcpStream {
        &self.shared.tcp
    }
}
