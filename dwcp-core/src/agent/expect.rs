//! Which migrations the destination accepts, and from whom.
//!
//! A session for migration NAME is accepted on the data port only if the
//! agent was told to expect NAME:
//!
//! - an `expect` control request (`dwcp expect NAME [--from PEER]`,
//!   `{"op":"expect","name":N,"from":PEER?,"ttl_s":S?}`), valid for `ttl_s`
//!   (default [`DEFAULT_TTL_S`]) or until a session of that name completes;
//! - an active `prepare` of the libvirt hook for NAME;
//! - an `--allow NAME_GLOB[=PEER]` rule of the agent (permanent).
//!
//! PEER matches the source's certificate (CN, a DNS or IP SAN, or the whole
//! subject; `*.example.org` one label under it), or with `--insecure` (no
//! certificate) the source's IP address. Anything else is refused with
//! [`Status::NotExpected`] before a byte reaches QEMU, and logged with the
//! name, the peer's identity and the reason.
//!
//! The peer-identity list `--allow-peer` is checked before these
//! ([`Status::PeerNotAllowed`], in the acceptor).
//!
//! # The intended source of a gated migration
//!
//! On a cluster member, a migration NAME prepared with a gate for guest G
//! (`prepare` with `"gate": true`) is checked first, before any rule: the
//! session must come from the member the registry's intent for G names as
//! the source (the open intent G → this node; before the intent is
//! recorded, the member at the peer's address, which the gate will record).
//! The peer's certificate must name that member's host, the host part of
//! its raft address (an IP SAN for an address, the CN or a DNS SAN for a
//! name: [`PeerIdentity::names_host`]); in clear text (`--insecure`) the
//! peer's IP address must be that host's. Anything else, even a valid
//! cluster member or a peer an `--allow` rule names, is refused with
//! [`Status::NotIntendedSource`] and logged with the guest, the expected
//! member and the peer's identity.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use super::cluster::ClusterOps;
use super::cutover::AgentGate;
use super::{lenient_string, lenient_u64, State};
use crate::tls::{AllowedPeers, PeerIdentity};
use crate::transport::Refusal;
use crate::wire::{self, Status};

/// How long an `expect` lasts without its own `ttl_s`, seconds.
pub const DEFAULT_TTL_S: u64 = 3600;
/// Longest `ttl_s`, seconds (a week).
pub const MAX_TTL_S: u64 = 7 * 86_400;
/// Most expectations kept (the oldest goes first).
const MAX_EXPECTED: usize = 4096;

/// An `--allow NAME_GLOB[=PEER]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// Glob over migration names (`*` any run, `?` one character).
    pub name: String,
    /// Peer pattern; `None`: any peer the CA signed (or any address).
    pub from: Option<String>,
}

impl std::str::FromStr for AllowRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, from) = match s.split_once('=') {
            Some((n, f)) => (n.trim(), Some(f.trim())),
            None => (s.trim(), None),
        };
        if name.is_empty() || from.is_some_and(str::is_empty) {
            return Err(format!("{s:?}: expected NAME_GLOB or NAME_GLOB=PEER"));
        }
        Ok(AllowRule {
            name: name.to_string(),
            from: from.map(str::to_string),
        })
    }
}

impl std::fmt::Display for AllowRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.from {
            Some(p) => write!(f, "{}={}", self.name, p),
            None => f.write_str(&self.name),
        }
    }
}

/// One `expect`.
#[derive(Debug, Clone)]
pub(crate) struct Expectation {
    name: String,
    from: Option<String>,
    until: Instant,
    /// When it was made: a session ending uses up only those made before
    /// it started, not the next migration's of the same name.
    since: Instant,
}

/// `{"op":"expect","name":N,"from":PEER?,"ttl_s":S?}`.
#[derive(Debug, Deserialize)]
pub(crate) struct ExpectRequest {
    #[serde(default, deserialize_with = "lenient_string")]
    name: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    from: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    ttl_s: Option<u64>,
}

/// `*` and `?` glob.
pub fn glob(pat: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether `pattern` names this peer: its certificate identity, or without
/// TLS its IP address.
pub fn peer_matches(pattern: &str, id: Option<&PeerIdentity>, addr: SocketAddr) -> bool {
    match id {
        Some(id) => AllowedPeers::new([pattern]).allows(id),
        None => pattern == addr.ip().to_string(),
    }
}

pub(super) fn expect(st: &State, r: ExpectRequest) -> Result<Value, String> {
    let name = r.name.ok_or("missing \"name\"")?;
    wire::check_name(&name).map_err(|e| e.to_string())?;
    let ttl = r.ttl_s.unwrap_or(DEFAULT_TTL_S);
    if ttl == 0 || ttl > MAX_TTL_S {
        return Err(format!("ttl_s = {ttl} is out of range: 1..={MAX_TTL_S}"));
    }
    if let Some(f) = &r.from {
        if f.is_empty() || f.len() > 255 {
            return Err("\"from\": expected a peer name (CN, SAN or IP)".into());
        }
    }
    let mut v = st.expected.lock();
    let now = Instant::now();
    v.retain(|e| e.until > now && !(e.name == name && e.from == r.from));
    if v.len() >= MAX_EXPECTED {
        v.remove(0);
    }
    v.push(Expectation {
        name: name.clone(),
        from: r.from.clone(),
        until: now + Duration::from_secs(ttl),
        since: now,
    });
    info!(
        name,
        from = r.from.as_deref().unwrap_or("any peer"),
        ttl_s = ttl,
        "expecting migration"
    );
    Ok(json!({"ok": true, "name": name, "from": r.from, "ttl_s": ttl}))
}

impl State {
    /// The data port's check for a session of `name` (see the module docs):
    /// `Ok(what allowed it)` or the refusal.
    pub(super) fn authorize(
        &self,
        name: &str,
        id: Option<&PeerIdentity>,
        addr: SocketAddr,
    ) -> Result<String, Refusal> {
        let source = match (&self.cfg.cluster, self.gate_of(name)) {
            (Some(c), Some(gate)) => {
                let m = check_intended_source(c.as_ref(), &gate, name, id, addr)?;
                format!(" (the intended source of guest {}: member {m})", gate.guest)
            }
            _ => String::new(),
        };
        self.authorize_name(name, id, addr)
            .map(|rule| format!("{rule}{source}"))
    }

    /// [`State::authorize`] after the intended-source check: `expect`,
    /// `prepare` and `--allow`.
    fn authorize_name(
        &self,
        name: &str,
        id: Option<&PeerIdentity>,
        addr: SocketAddr,
    ) -> Result<String, Refusal> {
        let from_ok = |p: &Option<String>| p.as_deref().is_none_or(|p| peer_matches(p, id, addr));
        for r in &self.cfg.allow {
            if glob(&r.name, name) && from_ok(&r.from) {
                return Ok(format!("--allow {r}"));
            }
        }
        let now = Instant::now();
        let mut others = Vec::new();
        {
            let mut v = self.expected.lock();
            v.retain(|e| e.until > now);
            for e in v.iter().filter(|e| e.name == name) {
                if from_ok(&e.from) {
                    return Ok(format!(
                        "expect {name} from {}",
                        e.from.as_deref().unwrap_or("any peer")
                    ));
                }
                others.extend(e.from.clone());
            }
        }
        if self.prepared_active(name) {
            return Ok(format!("prepare {name} (libvirt hook)"));
        }
        let reason = if others.is_empty() {
            format!(
                "migration {name:?} was not expected: no `dwcp expect`, active prepare or \
                 --allow rule names it"
            )
        } else {
            format!(
                "migration {name:?} is expected only from {}",
                others.join(", ")
            )
        };
        Err(Refusal {
            status: Status::NotExpected,
            reason,
        })
    }

    /// A session of `name` that started at `started` completed: the
    /// expectations of its name made before then are used up. One made
    /// since is for the next migration of that name (a guest migrated
    /// again, back to back) and stays.
    pub(super) fn expectation_used(&self, name: &str, started: Instant) {
        self.expected
            .lock()
            .retain(|e| e.name != name || e.since > started);
    }
}

/// `ip` without its IPv4-mapped IPv6 form (a dual-stack listener's view).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a clear-text peer at `ip` is on `host` (an IP address, or a name
/// resolved here).
fn address_is_host(ip: IpAddr, host: &str) -> bool {
    let ip = canonical(ip);
    if let Ok(h) = host.parse::<IpAddr>() {
        return canonical(h) == ip;
    }
    (host, 0)
        .to_socket_addrs()
        .is_ok_and(|mut a| a.any(|a| canonical(a.ip()) == ip))
}

/// The check of a gated migration's source (see the module docs): Ok with
/// the member when the peer is the one the registry's intent for the gate's
/// guest names.
pub(super) fn check_intended_source(
    c: &dyn ClusterOps,
    gate: &Arc<AgentGate>,
    name: &str,
    id: Option<&PeerIdentity>,
    addr: SocketAddr,
) -> Result<u64, Refusal> {
    let guest = gate.guest.as_str();
    let refuse = |reason: String| Refusal {
        status: Status::NotIntendedSource,
        reason,
    };
    let peer = match id {
        Some(id) => format!("certificate {id}"),
        None => format!("{} (clear text)", addr.ip()),
    };
    let me = c.node_id();
    // The registry's open intent for the guest into this node, else the one
    // the gate recorded (this node may not have applied it yet).
    let intent = c
        .open_intents()
        .into_iter()
        .find(|(g, _, _, dst)| g == guest && *dst == me)
        .map(|(_, _, src, _)| src)
        .or_else(|| gate.src());
    let (expected, why) = match intent {
        Some(src) => (src, "the source the registry's intent names"),
        None => match c.member_at(canonical(addr.ip())) {
            Some(m) => (
                m,
                "the member at the peer's address, which the gate records as the source",
            ),
            None => {
                return Err(refuse(format!(
                    "guest {guest} (migration {name:?}): no intent is recorded yet and {} is not \
                     the address of exactly one cluster member, so the source cannot be \
                     identified (prepare with \"src_node\"); the peer is {peer}",
                    addr.ip()
                )))
            }
        },
    };
    let Some(host) = c.member_identity(expected) else {
        return Err(refuse(format!(
            "guest {guest} (migration {name:?}) may only come from member {expected} ({why}), \
             whose raft address this node does not know; the peer is {peer}"
        )));
    };
    let ok = match id {
        Some(id) => id.names_host(&host),
        None => address_is_host(addr.ip(), &host),
    };
    if ok {
        return Ok(expected);
    }
    Err(refuse(format!(
        "guest {guest} (migration {name:?}) may only come from member {expected} (host {host}, \
         {why}); the peer is {peer}, which {}",
        if id.is_some() {
            format!("does not name {host}")
        } else {
            format!("is not {host}'s address")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", "vm-1"));
        assert!(glob("vm-*", "vm-1"));
        assert!(glob("vm-?", "vm-1"));
        assert!(!glob("vm-?", "vm-12"));
        assert!(!glob("db-*", "vm-1"));
        assert!(glob("*-1", "vm-1"));
        assert!(glob("vm-1", "vm-1"));
    }

    #[test]
    fn allow_rules_parse() {
        let r: AllowRule = "vm-*=src.example".parse().unwrap();
        assert_eq!(r.from.as_deref(), Some("src.example"));
        assert_eq!(r.to_string(), "vm-*=src.example");
        assert!("=x".parse::<AllowRule>().is_err());
        assert!("vm=".parse::<AllowRule>().is_err());
    }
}
