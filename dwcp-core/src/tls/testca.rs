//! A throwaway CA for `make demo` and the tests (feature `testca`): writes
//! libvirt's layout with certificates generated at run time, so no private
//! key is ever committed. Keys are ECDSA P-256 (rcgen with ring), written
//! mode 0600.
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};

use super::TlsPaths;

/// rcgen's date (its `time` type, not re-exported) for `now + secs`, to the day.
macro_rules! at {
    ($secs:expr) => {{
        let (y, m, d) = civil($secs);
        rcgen::date_time_ymd(y, m, d)
    }};
}

/// What a leaf certificate is for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS WWW server (`server-cert.pem`).
    Server,
    /// TLS WWW client (`client-cert.pem`).
    Client,
}

/// A leaf certificate to issue.
#[derive(Debug, Clone)]
pub struct LeafSpec<'a> {
    /// Subject commonName.
    pub common_name: &'a str,
    /// SANs: each entry that parses as an IP address becomes an IP SAN, the
    /// others DNS SANs.
    pub hosts: &'a [&'a str],
    pub usage: Usage,
    /// Validity window relative to now, in seconds: `(-86400, 365 * 86400)`
    /// is "from yesterday for a year". A window wholly in the past gives an
    /// expired certificate.
    pub valid_from_secs: i64,
    pub valid_until_secs: i64,
}

impl<'a> LeafSpec<'a> {
    /// Valid from yesterday for a year.
    pub fn new(common_name: &'a str, hosts: &'a [&'a str], usage: Usage) -> Self {
        Self {
            common_name,
            hosts,
            usage,
            valid_from_secs: -86_400,
            valid_until_secs: 365 * 86_400,
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number (big-endian), for a revocation list.
    pub serial: Vec<u8>,
}

/// A throwaway certificate authority.
#[derive(Debug)]
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new self-signed CA named `name` (subject `CN=<name>,O=DWCP test`).
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = at!(-86_400);
        params.not_after = at!(10 * 365 * 86_400);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// The CA certificate (`ca-cert.pem`).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issue a leaf certificate with a fresh key.
    pub fn issue(&self, spec: &LeafSpec<'_>) -> Result<Issued, rcgen::Error> {
        let hosts: Vec<String> = spec.hosts.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(hosts)?;
        params.distinguished_name = dn(spec.common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match spec.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        // A random positive 127-bit serial (RFC 5280: at most 20 octets), kept
        // so that a test can revoke this certificate.
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = at!(spec.valid_from_secs);
        params.not_after = at!(spec.valid_until_secs);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial.to_vec(),
        })
    }

    /// A revocation list of this CA (`ca-crl.pem`, PEM) naming `revoked`,
    /// valid from yesterday for a week.
    pub fn crl_pem(&self, revoked: &[&Issued]) -> Result<String, rcgen::Error> {
        let params = CertificateRevocationListParams {
            this_update: at!(-86_400),
            next_update: at!(7 * 86_400),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|c| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&c.serial),
                    revocation_time: at!(-3_600),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }

    /// Write libvirt's layout under `dir`: this CA, a server and a client
    /// certificate (each with its key, mode 0600).
    pub fn write_layout(&self, dir: &Path, server: &Issued, client: &Issued) -> io::Result<()> {
        let p = TlsPaths::new(dir);
        fs::create_dir_all(dir)?;
        write_file(&p.ca_cert, &self.cert_pem(), 0o644)?;
        write_file(&p.server_cert, &server.cert_pem, 0o644)?;
        write_file(&p.server_key, &server.key_pem, 0o600)?;
        write_file(&p.client_cert, &client.cert_pem, 0o644)?;
        write_file(&p.client_key, &client.key_pem, 0o600)
    }
}

/// Write a throwaway CA and server/client certificates in libvirt's layout
/// under `dir` (created if needed), both leaves with SANs for `hosts` (DNS
/// names or IP addresses) and CN `hosts[0]` (`localhost` if empty). For
/// `make demo` and the tests only: a real deployment reuses the PKI of
/// `virsh migrate --tls` (docs/security.md).
pub fn write_test_pki(dir: &Path, hosts: &[&str]) -> io::Result<()> {
    let cn = hosts.first().copied().unwrap_or("localhost");
    let hosts: &[&str] = if hosts.is_empty() {
        &["localhost"]
    } else {
        hosts
    };
    let ca = TestCa::new("DWCP throwaway test CA").map_err(io::Error::other)?;
    let server = ca
        .issue(&LeafSpec::new(cn, hosts, Usage::Server))
        .map_err(io::Error::other)?;
    let client = ca
        .issue(&LeafSpec::new(cn, hosts, Usage::Client))
        .map_err(io::Error::other)?;
    ca.write_layout(dir, &server, &client)
}

/// Write `contents` to `path` with `mode`, also when the file existed.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(contents.as_bytes())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "DWCP test");
    dn
}

/// The civil date (UTC) of `now + offset_secs`.
fn civil(offset_secs: i64) -> (i32, u8, u8) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    // Howard Hinnant's days-to-civil.
    let z = (now + offset_secs).div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}
