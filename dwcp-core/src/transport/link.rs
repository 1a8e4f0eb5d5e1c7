//! What a session's stream runs over: clear TCP (`--insecure`) or TLS 1.3
//! with mutual authentication ([`crate::tls`]), and the settings choosing
//! between them ([`TlsSettings`], part of [`super::TransportConfig`]).
//!
//! The clear path is the `TcpStream` itself, untouched: `writev` straight
//! from QEMU's buffers, as before TLS existed. The TLS path encrypts each
//! byte once ([`TlsWriter::write_all_slices`]) and decrypts it once.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;

use crate::tls::{
    AllowedPeers, CredentialStore, PeerIdentity, TlsCredentials, TlsError, TlsLink, TlsReader,
    TlsWriter, DEFAULT_TLS_DIR,
};

/// How the streams of a session are protected.
///
/// The default is TLS with the credentials of [`DEFAULT_TLS_DIR`]; clear
/// text only with `insecure` (`--insecure`, `insecure=1`), which the
/// surfaces that set it warn about.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Clear text: no TLS, no peer identity (`--insecure`).
    pub insecure: bool,
    /// Credentials in libvirt's layout (`--tls-dir`).
    pub dir: PathBuf,
    /// The name the destination's certificate must carry (`--tls-hostname`);
    /// default: the destination's IP address (an IP SAN).
    pub hostname: Option<String>,
    /// Destination: the certificate identities sessions are accepted from
    /// (`--allow-peer`); empty: any certificate the CA signed.
    pub allowed_peers: AllowedPeers,
    /// The loaded credentials, shared with whoever reloads them (the
    /// agent); `None`: read `dir` when a connection needs them.
    pub store: Option<Arc<CredentialStore>>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            insecure: false,
            dir: PathBuf::from(DEFAULT_TLS_DIR),
            hostname: None,
            allowed_peers: AllowedPeers::any(),
            store: None,
        }
    }
}

impl TlsSettings {
    /// Clear text (tests, benchmarks, `--insecure`).
    pub fn insecure() -> Self {
        TlsSettings {
            insecure: true,
            ..Default::default()
        }
    }

    /// TLS with the credentials already loaded in `store`.
    pub fn with_store(store: Arc<CredentialStore>) -> Self {
        TlsSettings {
            dir: store.dir().to_path_buf(),
            store: Some(store),
            ..Default::default()
        }
    }

    /// Loads the credentials of `dir` once, to share (and reload) from now
    /// on; does nothing with `insecure` or when they are loaded already.
    pub fn load(&mut self) -> Result<Option<Arc<CredentialStore>>, TlsError> {
        if self.insecure {
            return Ok(None);
        }
        match &self.store {
            Some(s) if s.dir() == self.dir => {}
            _ => self.store = Some(Arc::new(CredentialStore::load(&self.dir)?)),
        }
        Ok(self.store.clone())
    }

    /// The credentials for a connection starting now: `None` with
    /// `insecure`, else the loaded ones, else read from `dir`.
    pub fn credentials(&self) -> Result<Option<Arc<TlsCredentials>>, TlsError> {
        if self.insecure {
            return Ok(None);
        }
        match &self.store {
            Some(s) if s.dir() == self.dir => Ok(Some(s.current())),
            _ => Ok(Some(Arc::new(TlsCredentials::load(&self.dir)?))),
        }
    }

    /// "TLS (dir)" or "clear text", for logs.
    pub fn describe(&self) -> String {
        if self.insecure {
            "clear text (--insecure)".into()
        } else {
            format!("TLS 1.3, credentials {}", self.dir.display())
        }
    }
}

/// One established stream: after the TLS handshake (if any), before or
/// after the DWCP hello.
#[derive(Debug)]
pub(crate) enum Link {
    Plain(TcpStream),
    Tls {
        link: TlsLink,
        rx: TlsReader,
        tx: TlsWriter,
    },
}

impl Link {
    pub(crate) fn tls(link: TlsLink) -> Link {
        let (rx, tx) = (link.reader(), link.writer());
        Link::Tls { link, rx, tx }
    }

    /// The socket, for options, timeouts, `TCP_INFO` and shutdown.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Tls { link, .. } => link.tcp(),
        }
    }

    /// The peer's certificate identity (TLS only).
    pub(crate) fn peer_identity(&self) -> Option<PeerIdentity> {
        match self {
            Link::Plain(_) => None,
            Link::Tls { link, .. } => link.peer_identity(),
        }
    }

    /// A clone of the socket (shutdown, `TCP_INFO`), the sending half and the
    /// receiving half.
    pub(crate) fn into_parts(self) -> io::Result<(TcpStream, TxStream, RxStream)> {
        match self {
            Link::Plain(s) => Ok((
                s.try_clone()?,
                TxStream::Plain(s.try_clone()?),
                RxStream::Plain(s),
            )),
            Link::Tls { link, rx, tx } => Ok((
                link.tcp().try_clone()?,
                TxStream::Tls(tx),
                RxStream::Tls(rx),
            )),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Tls { rx, .. } => rx.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Tls { tx, .. } => tx.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A stream's sending half (held under the stream's lock for each frame).
#[derive(Debug)]
pub(crate) enum TxStream {
    /// `write_vectored` is the socket's own `writev`: zero-copy.
    Plain(TcpStream),
    /// Encrypts then writes; one copy (the encryption) per byte.
    Tls(TlsWriter),
}

impl TxStream {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            TxStream::Plain(s) => s,
            TxStream::Tls(w) => w.tcp(),
        }
    }

    /// Orderly end of our sending direction: TLS close_notify then FIN, or
    /// just FIN.
    pub(crate) fn close(&mut self) -> io::Result<()> {
        match self {
            TxStream::Plain(s) => s.shutdown(Shutdown::Write),
            TxStream::Tls(w) => w.close(),
        }
    }

    /// Clear text only: the socket to try a non-blocking send on (a TLS
    /// record cannot be sent partly, so TLS has no such path).
    pub(crate) fn plain(&self) -> Option<&TcpStream> {
        match self {
            TxStream::Plain(s) => Some(s),
            TxStream::Tls(_) => None,
        }
    }
}

impl Write for TxStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            TxStream::Plain(s) => s.write(buf),
            TxStream::Tls(w) => w.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            TxStream::Plain(s) => s.write_vectored(bufs),
            TxStream::Tls(w) => w.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            TxStream::Plain(s) => s.flush(),
            TxStream::Tls(w) => w.flush(),
        }
    }
}

/// A stream's receiving half (its `tcp_rx` thread).
#[derive(Debug)]
pub(crate) enum RxStream {
    Plain(TcpStream),
    Tls(TlsReader),
}

impl Read for RxStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            RxStream::Plain(s) => s.read(buf),
            RxStream::Tls(r) => r.read(buf),
        }
    }
}
