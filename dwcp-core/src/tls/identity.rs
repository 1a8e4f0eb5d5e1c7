//! The peer identity read from its end-entity certificate, and the
//! destination's list of allowed identities.
//!
//! The certificate has already been verified by rustls/webpki when these are
//! read; this module only extracts names. It walks the DER itself (subject
//! name and the subjectAltName extension, about a hundred lines) rather than
//! pulling in an X.509 parser crate.
use std::fmt;
use std::net::IpAddr;

use super::{TlsError, TlsLink};

/// Who the peer is, from its verified certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject as `CN=..,O=..`, attributes in certificate order, for
    /// logs and DN rules.
    pub subject: String,
    /// The subject's commonName, if any.
    pub common_name: Option<String>,
    /// DNS names of the subjectAltName extension.
    pub dns_names: Vec<String>,
    /// IP addresses of the subjectAltName extension.
    pub ip_addresses: Vec<IpAddr>,
}

impl PeerIdentity {
    /// Parse the names out of a DER certificate; `None` if it is not a
    /// well-formed X.509 certificate.
    pub fn from_der(cert: &[u8]) -> Option<Self> {
        parse_cert(cert)
    }

    /// Whether the certificate names `host`, the host part of an address
    /// such as a raft member's `HOST:PORT` (IPv6 brackets allowed): an IP
    /// address must be one of its IP SANs; a DNS name its CN or one of its
    /// DNS SANs (ASCII case-insensitive). The same matcher as
    /// [`AllowedPeers`], without patterns: a `*` in `host` never matches.
    pub fn names_host(&self, host: &str) -> bool {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        !host.is_empty() && !host.contains('*') && name_matches(host, self)
    }

    /// Every name the certificate carries: CN, DNS SANs and IP SANs.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.common_name.iter().cloned().collect();
        v.extend(self.dns_names.iter().cloned());
        v.extend(self.ip_addresses.iter().map(|ip| ip.to_string()));
        v
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.subject)?;
        if !self.dns_names.is_empty() || !self.ip_addresses.is_empty() {
            let sans: Vec<String> = self
                .dns_names
                .iter()
                .map(|d| format!("DNS:{d}"))
                .chain(self.ip_addresses.iter().map(|i| format!("IP:{i}")))
                .collect();
            write!(f, " [{}]", sans.join(", "))?;
        }
        Ok(())
    }
}

/// The identities a destination accepts sessions from.
///
/// Each entry matches a certificate whose CN or a DNS SAN equals it (ASCII
/// case-insensitive), whose IP SAN equals it (when it parses as an
/// address), or whose whole subject string equals it (`CN=..,O=..`). An
/// entry `*.example.org` matches one label under `example.org`. The empty
/// list ([`AllowedPeers::any`]) accepts every certificate the CA signed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedPeers {
    entries: Vec<String>,
}

impl AllowedPeers {
    /// Accept any peer whose certificate the CA signed.
    pub fn any() -> Self {
        Self::default()
    }

    /// Accept only the listed identities (see the type's documentation).
    pub fn new<I, S>(entries: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            entries: entries.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether the list accepts everyone the CA signed.
    pub fn is_any(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `id` is allowed.
    pub fn allows(&self, id: &PeerIdentity) -> bool {
        self.is_any() || self.entries.iter().any(|e| entry_matches(e, id))
    }

    /// The destination's check after [`server_handshake`]: the peer's
    /// identity if it is allowed, else [`TlsError::NotAllowed`] (log it and
    /// drop the connection before reading any DWCP frame).
    ///
    /// [`server_handshake`]: super::server_handshake
    pub fn authorize(&self, link: &TlsLink) -> Result<PeerIdentity, TlsError> {
        let denied = |identity: String| TlsError::NotAllowed {
            peer: link.peer().to_string(),
            identity,
        };
        let id = link
            .peer_identity()
            .ok_or_else(|| denied("no readable certificate".into()))?;
        if self.allows(&id) {
            Ok(id)
        } else {
            Err(denied(id.to_string()))
        }
    }

    /// The entries, as given.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }
}

fn entry_matches(entry: &str, id: &PeerIdentity) -> bool {
    entry == id.subject || name_matches(entry, id)
}

/// `entry` (an IP address, a DNS name or `*.suffix`) against the
/// certificate's IP SANs, or its CN and DNS SANs.
fn name_matches(entry: &str, id: &PeerIdentity) -> bool {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return id.ip_addresses.contains(&ip);
    }
    let names = id.common_name.iter().chain(id.dns_names.iter());
    if let Some(suffix) = entry.strip_prefix("*.") {
        return names.into_iter().any(|n| {
            n.len() > suffix.len() + 1
                && n[n.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && n.as_bytes()[n.len() - suffix.len() - 1] == b'.'
                && !n[..n.len() - suffix.len() - 1].contains('.')
        });
    }
    names.into_iter().any(|n| n.eq_ignore_ascii_case(entry))
}

// --- a minimal DER walk -----------------------------------------------------

/// One TLV: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

fn parse_cert(der: &[u8]) -> Option<PeerIdentity> {
    let (tag, cert, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // [0] EXPLICIT version, optional.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    // serialNumber, signature, issuer, validity.
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, subject, after) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut id = PeerIdentity::default();
    parse_name(subject, &mut id)?;
    // subjectPublicKeyInfo, then optional [1] [2] unique ids, [3] extensions.
    let mut rest = tlv(after)?.2;
    while let Some((tag, body, next)) = tlv(rest) {
        if tag == 0xa3 {
            parse_extensions(body, &mut id)?;
        }
        rest = next;
    }
    Some(id)
}

fn attr_name(oid: &[u8]) -> Option<&'static str> {
    match oid {
        [0x55, 0x04, 0x03] => Some("CN"),
        [0x55, 0x04, 0x06] => Some("C"),
        [0x55, 0x04, 0x07] => Some("L"),
        [0x55, 0x04, 0x08] => Some("ST"),
        [0x55, 0x04, 0x0a] => Some("O"),
        [0x55, 0x04, 0x0b] => Some("OU"),
        _ => None,
    }
}

fn string_value(tag: u8, body: &[u8]) -> String {
    match tag {
        // BMPString: UTF-16BE.
        0x1e => {
            let units: Vec<u16> = body
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        _ => String::from_utf8_lossy(body).into_owned(),
    }
}

fn parse_name(mut name: &[u8], id: &mut PeerIdentity) -> Option<()> {
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (tag, rdn, next) = tlv(name)?;
        if tag != SET {
            return None;
        }
        let mut rdn = rdn;
        while !rdn.is_empty() {
            let (tag, atv, n2) = tlv(rdn)?;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = tlv(atv)?;
            if tag != OID {
                return None;
            }
            let (vtag, vbody, _) = tlv(value)?;
            let text = string_value(vtag, vbody);
            if oid == OID_CN && id.common_name.is_none() {
                id.common_name = Some(text.clone());
            }
            match attr_name(oid) {
                Some(short) => parts.push(format!("{short}={text}")),
                None => parts.push(format!("{}={text}", oid_dotted(oid))),
            }
            rdn = n2;
        }
        name = next;
    }
    id.subject = parts.join(",");
    Some(())
}

fn oid_dotted(oid: &[u8]) -> String {
    let mut out = Vec::new();
    let mut acc: u64 = 0;
    for &b in oid {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if out.is_empty() {
                let first = (acc / 40).min(2);
                out.push(first);
                out.push(acc - 40 * first);
            } else {
                out.push(acc);
            }
            acc = 0;
        }
    }
    out.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// `[critical BOOLEAN,] extnValue OCTET STRING { GeneralNames }`.
fn parse_san(rest: &[u8], id: &mut PeerIdentity) -> Option<()> {
    let (mut t, mut v, r) = tlv(rest)?;
    if t == 0x01 {
        (t, v, _) = tlv(r)?;
    }
    if t != OCTET_STRING {
        return None;
    }
    let (t, mut names, _) = tlv(v)?;
    if t != SEQUENCE {
        return None;
    }
    while !names.is_empty() {
        let (t, n, next) = tlv(names)?;
        match (t, n.len()) {
            // dNSName [2] IA5String
            (0x82, _) => id.dns_names.push(String::from_utf8_lossy(n).into_owned()),
            // iPAddress [7] OCTET STRING
            (0x87, 4) => id
                .ip_addresses
                .push(IpAddr::from(<[u8; 4]>::try_from(n).ok()?)),
            (0x87, 16) => id
                .ip_addresses
                .push(IpAddr::from(<[u8; 16]>::try_from(n).ok()?)),
            _ => {}
        }
        names = next;
    }
    Some(())
}

fn parse_extensions(body: &[u8], id: &mut PeerIdentity) -> Option<()> {
    let (tag, mut exts, _) = tlv(body)?;
    if tag != SEQUENCE {
        return None;
    }
    while !exts.is_empty() {
        let (tag, ext, next) = tlv(exts)?;
        if tag != SEQUENCE {
            return None;
        }
        let (tag, oid, rest) = tlv(ext)?;
        if tag == OID && oid == OID_SAN {
            parse_san(rest, id)?;
        }
        exts = next;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cn: &str, dns: &[&str], ips: &[&str]) -> PeerIdentity {
        PeerIdentity {
            subject: format!("CN={cn},O=DWCP"),
            common_name: Some(cn.into()),
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ip_addresses: ips.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn allowed_peers_match_cn_san_ip_subject_and_wildcard() {
        let p = id("hostA", &["a.dc1.example"], &["10.0.0.1"]);
        assert!(AllowedPeers::any().allows(&p));
        assert!(AllowedPeers::new(["HOSTA"]).allows(&p));
        assert!(AllowedPeers::new(["a.dc1.example"]).allows(&p));
        assert!(AllowedPeers::new(["10.0.0.1"]).allows(&p));
        assert!(AllowedPeers::new(["CN=hostA,O=DWCP"]).allows(&p));
        assert!(AllowedPeers::new(["*.dc1.example"]).allows(&p));
        assert!(!AllowedPeers::new(["*.example"]).allows(&p));
        assert!(!AllowedPeers::new(["10.0.0.2", "hostB"]).allows(&p));
    }

    #[test]
    fn names_host_matches_ip_sans_and_dns_names_only() {
        let p = id("hostA", &["a.dc1.example"], &["10.0.0.1", "fd00::1"]);
        assert!(p.names_host("10.0.0.1"));
        assert!(p.names_host("fd00::1"));
        assert!(p.names_host("[fd00::1]"));
        assert!(p.names_host("A.DC1.example"));
        assert!(p.names_host("hosta"));
        // Another host, of any kind.
        assert!(!p.names_host("10.0.0.2"));
        assert!(!p.names_host("b.dc1.example"));
        assert!(!p.names_host("fd00::2"));
        // An IP address is never matched against the CN or a DNS SAN, nor a
        // name against an IP SAN.
        let by_name = id("10.0.0.9", &["10.0.0.8"], &[]);
        assert!(!by_name.names_host("10.0.0.9") && !by_name.names_host("10.0.0.8"));
        // No patterns, no subjects, nothing empty.
        assert!(!p.names_host("*.dc1.example"));
        assert!(!p.names_host("CN=hostA,O=DWCP"));
        assert!(!p.names_host(""));
        assert!(!PeerIdentity::default().names_host("10.0.0.1"));
    }

    #[test]
    fn der_walk_rejects_garbage() {
        assert!(PeerIdentity::from_der(&[]).is_none());
        assert!(PeerIdentity::from_der(&[0x30, 0x82, 0xff]).is_none());
        assert!(PeerIdentity::from_der(b"not a certificate").is_none());
    }

    #[test]
    fn oid_dotted_form() {
        assert_eq!(oid_dotted(&[0x55, 0x04, 0x2a]), "2.5.4.42");
        assert_eq!(
            oid_dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            "1.2.840.113549"
        );
    }
}
