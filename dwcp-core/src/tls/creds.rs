//! Credentials in libvirt's layout and the rustls configurations built from
//! them.
//!
//! One directory (default [`DEFAULT_TLS_DIR`], option `--tls-dir`) holds the
//! files `virsh migrate --tls` already uses:
//!
//! | file | use |
//! | --- | --- |
//! | `ca-cert.pem` | trust anchor(s) for both directions |
//! | `server-cert.pem`, `server-key.pem` | presented when accepting |
//! | `client-cert.pem`, `client-key.pem` | presented when connecting |
//! | `ca-crl.pem` (optional) | revoked certificates, refused both ways |
//!
//! As with QEMU's `tls-creds-x509`, `ca-crl.pem` is optional; when present,
//! a peer whose certificate (or any CA of its chain) it lists is refused in
//! either direction. Certificates of a CA that the file has no list for are
//! accepted (their revocation status is unknown, as GnuTLS treats them).
//!
//! Both configurations are TLS 1.3 only, use the ring provider, require
//! and verify the peer's certificate, and neither resumes sessions (every
//! connection is fully authenticated against the credentials loaded now).
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::client::Resumption;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use super::{describe, PeerIdentity, TlsError};

/// libvirt's (and QEMU's `tls-creds-x509`) default directory for migration
/// credentials.
pub const DEFAULT_TLS_DIR: &str = "/etc/pki/qemu";

/// The five files of libvirt's layout under one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Optional: certificate revocation list(s) of the CA.
    pub ca_crl: PathBuf,
}

impl TlsPaths {
    /// The layout under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            ca_cert: dir.join("ca-cert.pem"),
            server_cert: dir.join("server-cert.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client-cert.pem"),
            client_key: dir.join("client-key.pem"),
            ca_crl: dir.join("ca-crl.pem"),
            dir,
        }
    }
}

/// One loaded, consistent set of credentials: the rustls configurations for
/// both directions and the identities this host presents.
#[derive(Debug)]
pub struct TlsCredentials {
    paths: TlsPaths,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_identity: PeerIdentity,
    client_identity: PeerIdentity,
}

impl TlsCredentials {
    /// Read libvirt's layout under `dir`; every error names the file and
    /// what is wrong with it.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, TlsError> {
        let paths = TlsPaths::new(dir.as_ref());
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let roots = Arc::new(load_roots(&paths.ca_cert)?);
        let server_chain = load_certs(&paths.server_cert)?;
        let server_key = load_key(&paths.server_key)?;
        let server_ck = certified_key(
            &provider,
            server_chain,
            server_key,
            &paths.server_cert,
            &paths.server_key,
        )?;
        let client_chain = load_certs(&paths.client_cert)?;
        let client_key = load_key(&paths.client_key)?;
        let client_ck = certified_key(
            &provider,
            client_chain,
            client_key,
            &paths.client_cert,
            &paths.client_key,
        )?;
        let server_identity = identity_of(&server_ck, &paths.server_cert)?;
        let client_identity = identity_of(&client_ck, &paths.client_cert)?;

        let config_err = |source| TlsError::Config {
            dir: paths.dir.clone(),
            source,
        };
        let crls = load_crls(&paths.ca_crl)?;
        let crl_err = |e: rustls::server::VerifierBuilderError, what: &str| {
            if crls.is_empty() {
                TlsError::LoadCa {
                    path: paths.ca_cert.clone(),
                    reason: format!("cannot verify {what} with it: {e}"),
                }
            } else {
                TlsError::LoadCrl {
                    path: paths.ca_crl.clone(),
                    reason: format!("cannot verify {what} with it: {e}"),
                }
            }
        };
        let mut client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
        let mut server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone());
        if !crls.is_empty() {
            client_verifier = client_verifier
                .with_crls(crls.clone())
                .allow_unknown_revocation_status();
            server_verifier = server_verifier
                .with_crls(crls.clone())
                .allow_unknown_revocation_status();
        }
        let verifier = client_verifier.build().map_err(|e| crl_err(e, "clients"))?;
        let server_verifier = server_verifier.build().map_err(|e| crl_err(e, "servers"))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(server_ck)));
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.ignore_client_order = true;

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_webpki_verifier(server_verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(client_ck)));
        client.resumption = Resumption::disabled();

        Ok(Self {
            paths,
            server: Arc::new(server),
            client: Arc::new(client),
            server_identity,
            client_identity,
        })
    }

    /// The files these credentials came from.
    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// For accepting: TLS 1.3, client certificate required and verified
    /// against `ca-cert.pem`, no session tickets.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// For connecting: TLS 1.3, server verified against `ca-cert.pem`,
    /// `client-cert.pem` presented, no resumption.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The identity of `server-cert.pem`.
    pub fn server_identity(&self) -> &PeerIdentity {
        &self.server_identity
    }

    /// The identity of `client-cert.pem`.
    pub fn client_identity(&self) -> &PeerIdentity {
        &self.client_identity
    }
}

/// The reloadable holder: connections take a snapshot
/// ([`CredentialStore::current`], or the configs directly) when they start,
/// so [`CredentialStore::reload`] (SIGHUP, control request) never disturbs a
/// migration in flight; a reload that fails keeps the old credentials.
#[derive(Debug)]
pub struct CredentialStore {
    dir: PathBuf,
    current: RwLock<Arc<TlsCredentials>>,
    generation: AtomicU64,
}

impl CredentialStore {
    /// Load `dir` for the first time.
    pub fn load(dir: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let dir = dir.into();
        let creds = TlsCredentials::load(&dir)?;
        Ok(Self {
            dir,
            current: RwLock::new(Arc::new(creds)),
            generation: AtomicU64::new(1),
        })
    }

    /// The directory this store reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The credentials in force.
    pub fn current(&self) -> Arc<TlsCredentials> {
        self.current.read().clone()
    }

    /// The server configuration in force.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.read().server_config()
    }

    /// The client configuration in force.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current.read().client_config()
    }

    /// How many successful loads so far (1 after [`CredentialStore::load`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-read the directory. On success the new credentials serve every
    /// connection started from now on and are returned; on failure the old
    /// ones stay in force and the error (naming the file) is returned for
    /// the caller to log.
    pub fn reload(&self) -> Result<Arc<TlsCredentials>, TlsError> {
        let fresh = Arc::new(TlsCredentials::load(&self.dir)?);
        *self.current.write() = fresh.clone();
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(fresh)
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            "missing (libvirt's layout: ca-cert.pem, server-cert.pem, server-key.pem, \
             client-cert.pem, client-key.pem in the --tls-dir directory)"
                .to_string()
        }
        io::ErrorKind::PermissionDenied => "not readable: permission denied".to_string(),
        _ => format!("not readable: {e}"),
    })
}

fn pem_reason(e: &pem::Error) -> String {
    format!("not valid PEM: {e}")
}

fn parse_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_reason(&e))?;
    if certs.is_empty() {
        return Err(if contains(&bytes, b"PRIVATE KEY-----") {
            "holds a private key, not a certificate".into()
        } else if contains(&bytes, b"-----BEGIN") {
            "no CERTIFICATE block in it".into()
        } else {
            "not PEM (no -----BEGIN CERTIFICATE----- block)".into()
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let err = |reason: String| TlsError::LoadCa {
        path: path.to_path_buf(),
        reason,
    };
    let certs = parse_certs(path).map_err(err)?;
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        roots.add(c).map_err(|e| {
            err(format!(
                "certificate #{} unusable as a CA: {}",
                i + 1,
                describe(&e)
            ))
        })?;
    }
    Ok(roots)
}

/// `ca-crl.pem`: none when the file does not exist (it is optional, as for
/// QEMU); an error naming the file when it exists but holds no usable list.
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::LoadCrl {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(err("not readable: permission denied".into()))
        }
        Err(e) => return Err(err(format!("not readable: {e}"))),
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(pem_reason(&e)))?;
    if crls.is_empty() {
        return Err(err(
            "no X509 CRL block in it (delete the file if there is no revocation list)".into(),
        ));
    }
    Ok(crls)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(path).map_err(|reason| TlsError::LoadCert {
        path: path.to_path_buf(),
        reason,
    })
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let err = |reason: String| TlsError::LoadKey {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = read_file(path).map_err(err)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => Ok(k),
        Err(pem::Error::NoItemsFound) => Err(err(if contains(&bytes, b"ENCRYPTED PRIVATE KEY") {
            "the key is encrypted; DWCP (like libvirt and QEMU) needs an unencrypted key \
             readable only by its user"
                .into()
        } else if contains(&bytes, b"CERTIFICATE-----") {
            "holds a certificate, not a private key".into()
        } else if contains(&bytes, b"-----BEGIN") {
            "no private key block (PKCS#8, PKCS#1 RSA or SEC1 EC) in it".into()
        } else {
            "not PEM (no -----BEGIN PRIVATE KEY----- block)".into()
        })),
        Err(e) => Err(err(pem_reason(&e))),
    }
}

fn certified_key(
    provider: &CryptoProvider,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::LoadKey {
            path: key_path.to_path_buf(),
            reason: format!("unusable key: {e}"),
        })?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            })
        }
        Err(e) => Err(TlsError::LoadCert {
            path: cert_path.to_path_buf(),
            reason: describe(&e),
        }),
    }
}

fn identity_of(ck: &CertifiedKey, path: &Path) -> Result<PeerIdentity, TlsError> {
    ck.cert
        .first()
        .and_then(|c| PeerIdentity::from_der(c))
        .ok_or_else(|| TlsError::LoadCert {
            path: path.to_path_buf(),
            reason: "not a well-formed X.509 certificate".into(),
        })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
