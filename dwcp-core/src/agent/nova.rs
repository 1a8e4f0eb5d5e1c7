//! Nova's migrations carried natively (docs/nova.md): no relay process, no
//! extra local hop.
//!
//! Nova hands libvirt `migrate_uri = tcp://DEST`; the destination libvirtd
//! picks a port in qemu.conf's `migration_port_min..max` and the source QEMU
//! connects to `DEST:PORT` itself. On the source host an iptables rule
//! redirects those connections to the agent's *ingress* (`--nova-ingress`):
//!
//! ```text
//! iptables -t nat -A OUTPUT -p tcp -d MIGRATION_NET --dport 49152:49215 \
//!     -m addrtype ! --dst-type LOCAL -j REDIRECT --to-ports 7071
//! ```
//!
//! For each connection the ingress reads the original destination
//! (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST` for IPv6), checks its port is
//! in `--nova-ports`, and joins it to the session of the migration named
//! `nova-IP-PORT` (IPv6: `:` written `_`) to `IP:<--nova-peer-port>`, the
//! destination agent's data port: every connection to one `IP:PORT` (the
//! main channel, the multifd channels) is a channel of one session, as on a
//! route socket. Connections of one migration are joined in the order they
//! were accepted (one thread per destination); those of other migrations do
//! not wait for them. A connection without an original destination (not
//! redirected), to a port outside the range, to this host itself, or whose
//! session cannot be opened (destination agent down, refused) is closed
//! with a log line naming the cause, and counted in `stats`: QEMU's
//! migration fails, the source guest keeps running.
//!
//! On the destination, `--deliver-tcp NAME_GLOB` makes the agent deliver
//! the channels of matching names `...-IP-PORT` by TCP to `IP:PORT`, where
//! QEMU (`-incoming tcp:IP:PORT`) listens, instead of to
//! `<incoming-dir>/NAME.sock` — only when IP is an address of this host and
//! PORT is in `--nova-ports`; anything else is refused at the handshake with
//! the reason logged. Which peers may send such a migration at all is the
//! usual authorization (`--allow 'nova-*=PEER'`).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tracing::{error, info, warn};

use super::expect::glob;
use super::{route, State};

/// The prefix of the migrations the ingress names.
pub const NAME_PREFIX: &str = "nova-";
/// qemu.conf's default `migration_port_min..=migration_port_max`.
pub const DEFAULT_PORTS: RangeInclusive<u16> = 49152..=49215;
/// The destination agents' data port when neither `--nova-peer-port` nor
/// `--listen` gives one.
pub const DEFAULT_PEER_PORT: u16 = 7070;
/// Refusals kept for `stats`.
const KEEP_REFUSALS: usize = 16;
/// A destination's thread and route go once it had no connection and no
/// running session for this long.
const IDLE: Duration = Duration::from_secs(5);

/// The agent's Nova settings.
#[derive(Debug, Clone)]
pub struct NovaConfig {
    /// Source: where redirected connections are accepted (`--nova-ingress`).
    pub ingress: Option<SocketAddr>,
    /// Ports the ingress accepts and `--deliver-tcp` delivers to
    /// (`--nova-ports`).
    pub ports: RangeInclusive<u16>,
    /// Source: the destination agents' data port (`--nova-peer-port`).
    pub peer_port: u16,
    /// Destination: names whose channels go to QEMU by TCP (`--deliver-tcp`).
    pub deliver_tcp: Vec<String>,
}

impl Default for NovaConfig {
    fn default() -> Self {
        NovaConfig {
            ingress: None,
            ports: DEFAULT_PORTS,
            peer_port: DEFAULT_PEER_PORT,
            deliver_tcp: Vec::new(),
        }
    }
}

/// Parses `LO-HI` (or one port) into a port range.
pub fn parse_ports(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("{s:?}: expected LO-HI, ports 1..=65535, LO <= HI (e.g. 49152-49215)");
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok(lo..=hi)
}

/// The migration name of a redirected connection to `dst`: `nova-IP-PORT`
/// (an IPv6 address with `_` for `:`, since names become file names).
pub fn migration_name(dst: SocketAddr) -> String {
    let ip = match dst.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => ip.to_string().replace(':', "_"),
    };
    format!("{NAME_PREFIX}{ip}-{}", dst.port())
}

/// The `IP:PORT` a name ends in (`...-IP-PORT`, as [`migration_name`]
/// writes it), if it does.
pub fn name_address(name: &str) -> Option<SocketAddr> {
    let (rest, port) = name.rsplit_once('-')?;
    let (_, ip) = rest.rsplit_once('-')?;
    let port: u16 = port.parse().ok()?;
    let ip: IpAddr = if ip.contains('_') {
        IpAddr::V6(ip.replace('_', ":").parse::<Ipv6Addr>().ok()?)
    } else {
        IpAddr::V4(ip.parse::<Ipv4Addr>().ok()?)
    };
    Some(SocketAddr::new(ip, port))
}

/// Where a connection was going before an iptables REDIRECT (or DNAT)
/// brought it here: `SO_ORIGINAL_DST` (IPv4), `IP6T_SO_ORIGINAL_DST`
/// (IPv6). An error when conntrack knows no such connection.
pub fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let v4 = match s.local_addr()? {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let fd = s.as_raw_fd();
    if v4 {
        // SAFETY: sockaddr_in is plain data, all zeroes is a valid value.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `fd` is a live socket owned by `s`; `sa` is writable
        // memory of `len` bytes that getsockopt fills at most.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                libc::SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Ok(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sa.sin_port)))
    } else {
        // SAFETY: sockaddr_in6 is plain data, all zeroes is a valid value.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: as above, with a sockaddr_in6.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                libc::IP6T_SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        Ok(SocketAddr::new(IpAddr::V6(ip), u16::from_be(sa.sin6_port)))
    }
}

/// The IP addresses of this host's interfaces (its network namespace).
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocated to `head`, freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points to a sockaddr whose family
            // says which sockaddr it is.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once, after its last use.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// What the ingress did, for `stats`.
#[derive(Default)]
pub(super) struct IngressStats {
    accepted: AtomicU64,
    refused: AtomicU64,
    last_refusals: Mutex<VecDeque<Value>>,
}

impl State {
    /// `--deliver-tcp`: where the channels of migration `name` go by TCP,
    /// if its name asks for that (see [`crate::transport::TcpDelivery`]).
    pub(super) fn tcp_delivery(&self, name: &str) -> Option<Result<SocketAddr, String>> {
        let nova = &self.cfg.nova;
        let rule = nova.deliver_tcp.iter().find(|g| glob(g, name))?;
        Some(check_delivery(name, rule, &nova.ports))
    }

    /// The ingress's part of `stats` (null when it is off), and the
    /// destination's `--deliver-tcp` rules.
    pub(super) fn nova_json(&self) -> Value {
        let nova = &self.cfg.nova;
        let ports = format!("{}-{}", nova.ports.start(), nova.ports.end());
        let ingress = nova.ingress.map(|l| {
            let i = &self.ingress;
            json!({"listen": l.to_string(), "ports": ports, "peer_port": nova.peer_port,
                   "accepted": i.accepted.load(Ordering::Relaxed),
                   "refused": i.refused.load(Ordering::Relaxed),
                   "last_refusals": i.last_refusals.lock().iter().cloned().collect::<Vec<_>>()})
        });
        json!({"ingress": ingress, "deliver_tcp": nova.deliver_tcp, "ports": ports})
    }

    /// Logs and counts a connection the ingress closed.
    fn ingress_refused(&self, from: &str, dst: Option<SocketAddr>, reason: &str) {
        error!("nova ingress: closed the connection from {from}: {reason}");
        self.note_refusal(from, dst, reason);
    }

    /// Counts a connection the ingress closed (logged already).
    fn note_refusal(&self, from: &str, dst: Option<SocketAddr>, reason: &str) {
        let i = &self.ingress;
        i.refused.fetch_add(1, Ordering::Relaxed);
        let mut v = i.last_refusals.lock();
        if v.len() >= KEEP_REFUSALS {
            v.pop_front();
        }
        v.push_back(json!({"from": from, "to": dst.map(|d| d.to_string()),
                           "reason": reason, "at": super::now_s()}));
    }
}

fn check_delivery(
    name: &str,
    rule: &str,
    ports: &RangeInclusive<u16>,
) -> Result<SocketAddr, String> {
    let addr = name_address(name).ok_or_else(|| {
        format!("migration {name:?} matches --deliver-tcp {rule} but does not end in -IP-PORT")
    })?;
    if !ports.contains(&addr.port()) {
        return Err(format!(
            "migration {name:?}: port {} is outside --nova-ports {}-{}: not delivered by TCP",
            addr.port(),
            ports.start(),
            ports.end()
        ));
    }
    let local = local_addresses()
        .map_err(|e| format!("migration {name:?}: cannot list this host's addresses: {e}"))?;
    if addr.ip().is_unspecified() || !local.contains(&addr.ip()) {
        return Err(format!(
            "migration {name:?}: {} is not an address of this host: its QEMU does not listen \
             here (--deliver-tcp delivers only to this host's own addresses)",
            addr.ip()
        ));
    }
    Ok(addr)
}

/// A destination's queue of accepted connections, served in order.
type Workers = Arc<Mutex<HashMap<String, Sender<TcpStream>>>>;

/// Accepts redirected connections until the process ends.
pub(super) fn ingress_loop(st: Arc<State>, l: TcpListener) {
    let listen = l.local_addr().ok();
    let workers: Workers = Arc::default();
    for conn in l.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!("nova ingress: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let from = conn
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let dst = match original_dst(&conn) {
            Ok(d) if Some(d) != listen && conn.local_addr().ok() != Some(d) => d,
            Ok(_) => {
                st.ingress_refused(&from, None, "not a redirected connection (no original destination: it was made to the ingress itself; the iptables REDIRECT rule sends Nova's migration connections here)");
                continue;
            }
            Err(e) => {
                st.ingress_refused(
                    &from,
                    None,
                    &format!("no original destination (SO_ORIGINAL_DST: {e}): not a connection an iptables REDIRECT rule sent here"),
                );
                continue;
            }
        };
        let ports = &st.cfg.nova.ports;
        if !ports.contains(&dst.port()) {
            st.ingress_refused(
                &from,
                Some(dst),
                &format!(
                    "original destination {dst}: port outside --nova-ports {}-{} (the REDIRECT rule's ports and qemu.conf's migration_port_min..max should match it)",
                    ports.start(),
                    ports.end()
                ),
            );
            continue;
        }
        if local_addresses().is_ok_and(|v| v.contains(&dst.ip())) {
            st.ingress_refused(
                &from,
                Some(dst),
                &format!("original destination {dst} is this host: a migration to itself is not carried (the REDIRECT rule should have `-m addrtype ! --dst-type LOCAL`)"),
            );
            continue;
        }
        if let Err(why) = st.check_not_draining() {
            st.ingress_refused(&from, Some(dst), &why);
            continue;
        }
        st.ingress.accepted.fetch_add(1, Ordering::Relaxed);
        dispatch(&st, &workers, dst, conn);
    }
}

/// Hands `conn` to the thread of its destination (started if there is none).
fn dispatch(st: &Arc<State>, workers: &Workers, dst: SocketAddr, conn: TcpStream) {
    let name = migration_name(dst);
    let to = SocketAddr::new(dst.ip(), st.cfg.nova.peer_port);
    let mut w = workers.lock();
    let conn = match w.get(&name) {
        Some(tx) => match tx.send(conn) {
            Ok(()) => return,
            Err(e) => e.into_inner(),
        },
        None => conn,
    };
    let route = match route::ingress_route(st, &name, to) {
        Ok(r) => r,
        Err(e) => {
            drop(w);
            let from = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            st.ingress_refused(&from, Some(dst), &format!("migration {name}: {e}"));
            return;
        }
    };
    let (tx, rx) = unbounded();
    tx.send(conn).expect("receiver alive");
    w.insert(name.clone(), tx);
    drop(w);
    let (st2, workers2) = (st.clone(), workers.clone());
    let spawned = std::thread::Builder::new()
        .name("dwcp-nova".into())
        .spawn(move || serve(st2, workers2, name, route, rx));
    if let Err(e) = spawned {
        error!("nova ingress: cannot start a thread: {e}");
    }
}

/// Joins a destination's connections to its route's session, in order;
/// ends (with the route) once the destination is idle.
fn serve(
    st: Arc<State>,
    workers: Workers,
    name: String,
    route: Arc<route::Route>,
    rx: Receiver<TcpStream>,
) {
    info!(name, to = %route.to(), "nova ingress: carrying {name} to {}", route.to());
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(conn) => {
                let from = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                if let Err(e) = route::relay(&st, &route, conn.into()) {
                    // route::relay logged it, naming the route.
                    let dst = name_address(&name);
                    st.note_refusal(&from, dst, &format!("migration {name}: {e}"));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if route.idle_for(IDLE) {
                    let mut w = workers.lock();
                    if rx.is_empty() {
                        // Under the workers' lock: a new connection for
                        // this name makes a new route, never reuses this one.
                        w.remove(&name);
                        if !route.has_socket() {
                            route::remove_if_same(&st, &route);
                        }
                        return;
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests;
