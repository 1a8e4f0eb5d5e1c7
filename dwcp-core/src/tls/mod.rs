//! TLS 1.3 with mutual authentication for DWCP connections (userspace
//! rustls with the ring provider; the kernel has no kTLS here and OpenSSL is
//! not used anywhere).
//!
//! - [`creds`]: credentials in libvirt's layout (`ca-cert.pem`,
//!   `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//!   `client-key.pem`, default directory [`DEFAULT_TLS_DIR`]), the rustls
//!   configurations built from them and [`CredentialStore`], the reloadable
//!   holder (SIGHUP / control request) that keeps the old credentials when
//!   the new ones do not load.
//! - [`stream`]: [`TlsLink`], a TLS connection over a `TcpStream` that splits
//!   into a [`TlsReader`] and a [`TlsWriter`] used from two threads at once,
//!   and the blocking handshakes [`client_handshake`] / [`server_handshake`].
//! - [`identity`]: [`PeerIdentity`] (subject, CN, DNS and IP SANs of the
//!   peer's certificate) and [`AllowedPeers`], the destination's
//!   authorization list.
//! - `testca` (feature `testca`): a throwaway CA writing libvirt's layout for
//!   `make demo` and the tests.
//!
//! Used by the session streams (`transport::link`: TLS by default, clear
//! text only with `--insecure`), the agent (reload, authorization) and
//! libdwcp; the raft transport adopts it separately (docs/security.md).
pub mod creds;
pub mod identity;
pub mod stream;
#[cfg(feature = "testca")]
pub mod testca;

pub use creds::{CredentialStore, TlsCredentials, TlsPaths, DEFAULT_TLS_DIR};
pub use identity::{AllowedPeers, PeerIdentity};
pub use stream::{
    client_handshake, peer_identity, server_handshake, TlsLink, TlsReader, TlsWriter,
};

use std::io;
use std::path::PathBuf;

use rustls::{AlertDescription, CertificateError};

/// Everything the TLS layer can fail with; each variant names what failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `ca-cert.pem` is missing, unreadable or holds no usable CA.
    #[error("TLS CA certificate {}: {reason}", path.display())]
    LoadCa { path: PathBuf, reason: String },
    /// `ca-crl.pem` exists but is unreadable or holds no usable list.
    #[error("TLS certificate revocation list {}: {reason}", path.display())]
    LoadCrl { path: PathBuf, reason: String },
    /// A certificate file (`server-cert.pem`, `client-cert.pem`).
    #[error("TLS certificate {}: {reason}", path.display())]
    LoadCert { path: PathBuf, reason: String },
    /// A private key file (`server-key.pem`, `client-key.pem`).
    #[error("TLS private key {}: {reason}", path.display())]
    LoadKey { path: PathBuf, reason: String },
    /// The key's public half is not the certificate's.
    #[error("TLS private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// rustls refused the configuration built from `dir`.
    #[error("TLS configuration from {}: {}", dir.display(), describe(source))]
    Config { dir: PathBuf, source: rustls::Error },
    /// `tls-hostname` / the name to verify the server against is not a
    /// valid DNS name or IP address.
    #[error("TLS server name {0:?} is neither a DNS name nor an IP address")]
    ServerName(String),
    /// The TLS handshake failed at the protocol level.
    #[error("TLS handshake with {peer}: {}", describe(source))]
    Handshake { peer: String, source: rustls::Error },
    /// The TLS handshake failed on the socket (timeout, reset, EOF).
    #[error("TLS handshake with {peer}: {what}: {source}")]
    HandshakeIo {
        peer: String,
        what: &'static str,
        source: io::Error,
    },
    /// The peer authenticated but is not in the allowed list.
    #[error("TLS peer {peer} ({identity}) is not an allowed peer identity")]
    NotAllowed { peer: String, identity: String },
    /// A protocol error after the handshake (bad record, alert from peer).
    #[error("TLS: {}", describe(.0))]
    Protocol(rustls::Error),
    /// Plain I/O.
    #[error("TLS I/O: {0}")]
    Io(#[from] io::Error),
}

impl From<TlsError> for io::Error {
    fn from(e: TlsError) -> Self {
        match e {
            TlsError::Io(e) => e,
            TlsError::HandshakeIo { ref source, .. } => io::Error::new(source.kind(), e),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// A rustls error in words an operator can act on.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => describe_cert(c),
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        E::AlertReceived(a) => match a {
            AlertDescription::CertificateRequired => {
                "the peer requires a client certificate and we sent none".into()
            }
            AlertDescription::UnknownCA => {
                "the peer rejected our certificate: signed by a CA it does not trust".into()
            }
            AlertDescription::CertificateExpired => {
                "the peer rejected our certificate: certificate expired".into()
            }
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateUnknown => {
                format!("the peer rejected our certificate ({a:?})")
            }
            AlertDescription::AccessDenied => "the peer denied access to our identity".into(),
            AlertDescription::ProtocolVersion => {
                "the peer does not speak TLS 1.3 (DWCP requires it)".into()
            }
            other => format!("the peer sent a fatal alert: {other:?}"),
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => format!(
            "the peer is not speaking TLS ({e}); is it running with --insecure \
             (clear text) while this side uses TLS?"
        ),
        E::PeerIncompatible(p) => format!("incompatible peer: {p:?}"),
        E::DecryptError => "record decryption failed (corrupted or tampered stream)".into(),
        other => other.to_string(),
    }
}

fn describe_cert(c: &CertificateError) -> String {
    use CertificateError as C;
    match c {
        C::UnknownIssuer => "certificate signed by an unknown CA".into(),
        C::Expired => "certificate expired".into(),
        C::ExpiredContext { time, not_after } => format!(
            "certificate expired ({} s ago)",
            time.as_secs().saturating_sub(not_after.as_secs())
        ),
        C::NotValidYet | C::NotValidYetContext { .. } => {
            "certificate not valid yet (check the clocks)".into()
        }
        C::NotValidForName => "name mismatch".into(),
        C::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "name mismatch: expected {} but the certificate names {}",
            expected.to_str(),
            if presented.is_empty() {
                "nothing".to_string()
            } else {
                presented.join(", ")
            }
        ),
        C::BadSignature => "certificate signature invalid".into(),
        C::Revoked => "certificate revoked".into(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "certificate not valid for this use (extended key usage: a server needs \
             TLS WWW server, a client TLS WWW client)"
                .into()
        }
        C::BadEncoding => "certificate is not valid DER".into(),
        other => format!("certificate rejected: {other:?}"),
    }
}
