//! `dwcp:` URIs: `dwcp:HOST:PORT[?KEY=VALUE&...]`.
//!
//! HOST is a name, an IPv4 address or a bracketed IPv6 address. The keys set
//! the [`TransportConfig`] of the session (see docs/qemu.md for the table).
//! Parsing is strict: an unknown or repeated key is an error, so a typo never
//! silently falls back to a default.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use dwcp_core::transport::options::{self, Surface};
use dwcp_core::transport::TransportConfig;

/// Keys a dwcp URI may carry besides the transport options: `name`.
const NAME_KEY: &str = "name";

/// Every key a dwcp URI may carry, in the order error messages list them:
/// the transport options of [`options::OPTIONS`] that have a URI key, then `name`.
pub fn keys() -> Vec<&'static str> {
    let mut k = options::names(Surface::Uri);
    k.push(NAME_KEY);
    k
}

/// A parsed, validated dwcp URI.
#[derive(Debug, Clone)]
pub struct DwcpUri {
    pub host: String,
    /// 0 only for an incoming URI (listen on a free port).
    pub port: u16,
    /// Migration name sent in the handshake (`name=`, default `qemu`).
    pub name: String,
    pub cfg: TransportConfig,
}

impl DwcpUri {
    /// Parses and validates `s`. The error names the part that is wrong.
    pub fn parse(s: &str) -> Result<DwcpUri, String> {
        let rest = s.strip_prefix("dwcp:").ok_or_else(|| {
            format!("'{s}' does not start with 'dwcp:' (expected dwcp:HOST:PORT[?KEY=VALUE&...])")
        })?;
        if rest.starts_with("//") {
            return Err("expected dwcp:HOST:PORT, without '//'".into());
        }
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (host, port) = split_host_port(authority)?;
        let mut uri = DwcpUri {
            host,
            port,
            name: "qemu".into(),
            cfg: TransportConfig::default(),
        };
        if let Some(q) = query {
            uri.apply_query(q)?;
        }
        uri.cfg.validate().map_err(|e| e.to_string())?;
        dwcp_core::wire::check_name(&uri.name).map_err(|e| format!("name: {e}"))?;
        Ok(uri)
    }

    fn apply_query(&mut self, q: &str) -> Result<(), String> {
        let mut seen: Vec<&str> = Vec::new();
        for pair in q.split('&') {
            if pair.is_empty() {
                return Err("empty parameter (two '&' in a row or a trailing '&')".into());
            }
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("parameter '{pair}' has no value (expected KEY=VALUE)"))?;
            let option = options::find(key, Surface::Uri);
            if option.is_none() && key != NAME_KEY {
                return Err(format!(
                    "unknown parameter '{key}' (known: {})",
                    keys().join(", ")
                ));
            }
            if seen.contains(&key) {
                return Err(format!("parameter '{key}' given twice"));
            }
            seen.push(key);
            if value.is_empty() {
                return Err(format!("parameter '{key}' has an empty value"));
            }
            match option {
                Some(o) => o
                    .apply(&mut self.cfg, value, Surface::Uri)
                    .map_err(|e| e.to_string())?,
                None => self.name = value.to_string(),
            }
        }
        Ok(())
    }

    /// The first address HOST:PORT resolves to.
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        let mut addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("resolving '{}': {e}", self.host))?;
        addrs
            .next()
            .ok_or_else(|| format!("'{}' resolved to no address", self.host))
    }
}

/// `insecure=1`: say once on stderr (QEMU's log) that the migration is
/// neither encrypted nor authenticated.
pub fn warn_insecure(cfg: &TransportConfig) {
    if cfg.tls.insecure {
        eprintln!(
            "libdwcp: warning: insecure=1: this migration travels in clear text and the \
             peer is not authenticated"
        );
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or("'[' without a closing ']' in the host")?;
        h.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("'[{h}]' is not an IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or("expected ':PORT' after the ']' of the IPv6 address")?;
        (h, port)
    } else {
        let (h, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("'{authority}' has no ':PORT'"))?;
        if h.contains(':') {
            return Err(format!(
                "'{h}': write IPv6 addresses in brackets, e.g. dwcp:[::1]:4444"
            ));
        }
        (h, port)
    };
    if host.is_empty() {
        return Err("the host is empty (use 0.0.0.0 to listen on every address)".into());
    }
    if host.parse::<IpAddr>().is_err()
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return Err(format!("'{host}' is not a valid host name"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port '{port}' is not a number in 0..=65535"))?;
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_and_params() {
        let u = DwcpUri::parse("dwcp:10.0.0.2:4444?streams=8&codec=zstd:3&name=vm1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.cfg.streams),
            ("10.0.0.2", 4444, 8)
        );
        assert_eq!(u.cfg.tier, dwcp_core::codec::Tier::Zstd(3));
        assert!(!u.cfg.auto_tier);
        assert_eq!(u.name, "vm1");
        assert!(!u.cfg.checksum_raw);
        let u = DwcpUri::parse("dwcp:h:5?checksum=all").unwrap();
        assert!(u.cfg.checksum_raw);
        let u = DwcpUri::parse("dwcp:[::1]:5").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 5));
        assert!(DwcpUri::parse("dwcp:host-a.example:0").is_ok());
    }

    #[test]
    fn errors_name_the_problem() {
        let e = |s: &str| DwcpUri::parse(s).unwrap_err();
        assert!(e("tcp:1.2.3.4:5").contains("does not start with 'dwcp:'"));
        assert!(e("dwcp:1.2.3.4").contains("no ':PORT'"));
        assert!(e("dwcp::5").contains("host is empty"));
        assert!(e("dwcp:h:99999").contains("port '99999'"));
        assert!(e("dwcp:::1:5").contains("brackets"));
        assert!(e("dwcp:h:5?streams=0").contains("streams = 0"));
        assert!(e("dwcp:h:5?streams=300").contains("streams"));
        assert!(e("dwcp:h:5?codec=brotli").contains("codec = brotli is out of range"));
        assert_eq!(
            e("dwcp:h:5?checksum=crc"),
            "checksum = crc is out of range: all, compressed"
        );
        assert_eq!(
            e("dwcp:h:5?window=0"),
            "window = 0 is out of range: 1..=256 MiB"
        );
        assert!(e("dwcp:h:5?bogus=1").contains("known: streams, codec,"));
        assert!(e("dwcp:h:5?bogus=1").contains("unknown parameter 'bogus'"));
        assert!(e("dwcp:h:5?streams=2&streams=3").contains("twice"));
        assert!(e("dwcp:h:5?streams").contains("no value"));
        assert!(e("dwcp:h:5?streams=").contains("empty value"));
        assert!(e("dwcp:h:5?name=../x").contains("name"));
        assert!(e("dwcp:h h:5").contains("not a valid host name"));
        assert!(e("dwcp:[zz]:5").contains("not an IPv6"));
    }
}
