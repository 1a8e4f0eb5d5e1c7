//! Thin wrappers over the Linux calls linkem needs: network namespaces,
//! ethtool feature switches and AF_PACKET sockets.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Path of a named network namespace (as made by `ip netns add`).
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// Move the *calling thread* into the named network namespace. Sockets it
/// opens afterwards belong to that namespace (and stay there).
pub fn enter_netns(name: &str) -> Result<()> {
    let f = File::open(netns_path(name)).with_context(|| format!("open netns {name}"))?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        bail!("setns({name}): {}", io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` on a new thread inside network namespace `ns` and wait for it.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            enter_netns(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))?
    })
}

/// Spawn a thread inside network namespace `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        Ok(f())
    })
}

/// Interface index in the calling thread's namespace.
pub fn ifindex(name: &str) -> Result<i32> {
    let c = CString::new(name)?;
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name:?}: {}", io::Error::last_os_error());
    }
    Ok(i as i32)
}

// Legacy ethtool "set one feature" commands (still served by every kernel).
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SSG: u32 = 0x19;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SGSO: u32 = 0x24;
const ETHTOOL_SGRO: u32 = 0x2c;

/// Offload switches [`set_offload`] can flip.
#[derive(Debug, Clone, Copy)]
pub enum Offload {
    /// TX checksum offload (turning it off also turns TSO off).
    TxCsum,
    /// Scatter-gather.
    Sg,
    /// TCP segmentation offload.
    Tso,
    /// Generic segmentation offload.
    Gso,
    /// Generic receive offload.
    Gro,
}

/// Turn an offload on/off for `iface` in the calling thread's namespace
/// (like `ethtool -K iface ...`, but without needing the ethtool binary).
pub fn set_offload(iface: &str, what: Offload, on: bool) -> Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let cmd = match what {
        Offload::TxCsum => ETHTOOL_STXCSUM,
        Offload::Sg => ETHTOOL_SSG,
        Offload::Tso => ETHTOOL_STSO,
        Offload::Gso => ETHTOOL_SGSO,
        Offload::Gro => ETHTOOL_SGRO,
    };
    let mut val = EthtoolValue {
        cmd,
        data: on as u32,
    };
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if iface.len() >= ifr.ifr_name.len() {
        bail!("interface name too long: {iface}");
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut val as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL with a valid ifreq whose data points to a live
    // ethtool_value for the duration of the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    if r != 0 {
        bail!(
            "ethtool {what:?}={on} on {iface}: {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Turn off every offload that makes frames on a veth differ from what a
/// real wire carries (super-frames, partial checksums).
pub fn wire_like_offloads(iface: &str) -> Result<()> {
    set_offload(iface, Offload::TxCsum, false)?;
    set_offload(iface, Offload::Tso, false)?;
    set_offload(iface, Offload::Gso, false)?;
    // GRO on veth only exists with NAPI; ignore "not supported".
    let _ = set_offload(iface, Offload::Gro, false);
    Ok(())
}

/// `socket(2)` returning an owned fd.
pub fn socket(domain: i32, ty: i32, proto: i32) -> Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        bail!("socket: {}", io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt_int(fd: &OwnedFd, level: i32, opt: i32, val: i32, what: &str) -> Result<()> {
    // SAFETY: pointer to a live c_int of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&val as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        bail!("setsockopt {what}: {}", io::Error::last_os_error());
    }
    Ok(())
}

fn bind_packet(fd: &OwnedFd, ifindex: i32, proto: u16) -> Result<()> {
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: valid sockaddr_ll pointer and length.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        bail!("bind AF_PACKET: {}", io::Error::last_os_error());
    }
    Ok(())
}

const PACKET_IGNORE_OUTGOING: i32 = 23;

/// Receiving AF_PACKET socket on `iface`: all protocols, promiscuous, own
/// outgoing frames ignored, large receive buffer.
pub fn packet_rx_socket(iface: &str, rcvbuf: i32) -> Result<OwnedFd> {
    let idx = ifindex(iface)?;
    // Protocol 0 first, so nothing is queued before the bind to `iface`.
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
    setsockopt_int(
        &fd,
        libc::SOL_PACKET,
        PACKET_IGNORE_OUTGOING,
        1,
        "PACKET_IGNORE_OUTGOING",
    )?;
    if setsockopt_int(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        rcvbuf,
        "SO_RCVBUFFORCE",
    )
    .is_err()
    {
        setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, rcvbuf, "SO_RCVBUF")?;
    }
    enable_rx_timestamps(&fd)?;
    bind_packet(&fd, idx, libc::ETH_P_ALL as u16)?;
    // SAFETY: packet_mreq is plain old data.
    let mut mr: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mr.mr_ifindex = idx;
    mr.mr_type = libc::PACKET_MR_PROMISC as u16;
    // SAFETY: valid packet_mreq pointer and length.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mr as *const libc::packet_mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if r != 0 {
        bail!("PACKET_ADD_MEMBERSHIP: {}", io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sending-only AF_PACKET socket on `iface` (protocol 0: receives nothing),
/// bypassing the qdisc layer.
pub fn packet_tx_socket(iface: &str, sndbuf: i32) -> Result<OwnedFd> {
    let idx = ifindex(iface)?;
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
    let _ = setsockopt_int(
        &fd,
        libc::SOL_PACKET,
        libc::PACKET_QDISC_BYPASS,
        1,
        "PACKET_QDISC_BYPASS",
    );
    if setsockopt_int(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        sndbuf,
        "SO_SNDBUFFORCE",
    )
    .is_err()
    {
        setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF, sndbuf, "SO_SNDBUF")?;
    }
    bind_packet(&fd, idx, 0)?;
    Ok(fd)
}

/// Kernel drop counter of a packet socket since the last call
/// (`PACKET_STATISTICS.tp_drops`, reset on read).
pub fn packet_drops(fd: &OwnedFd) -> u64 {
    // SAFETY: tpacket_stats is plain old data.
    let mut st: libc::tpacket_stats = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: valid out-pointer and length.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if r != 0 {
        0
    } else {
        st.tp_drops as u64
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time of the calling thread in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Make this thread's timer wake-ups precise (default slack is 50 us).
pub fn precise_timers() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Make the calling thread SCHED_FIFO at `prio` (best effort).
pub fn make_realtime(prio: i32) -> bool {
    let p = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: valid sched_param; pid 0 = calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0 }
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC in ns (to convert kernel packet
/// timestamps, which are wall-clock, to the monotonic clock).
pub fn realtime_offset_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME) as i64 - clock_ns(libc::CLOCK_MONOTONIC) as i64
}

/// Ask for kernel receive timestamps (SCM_TIMESTAMPNS) on a socket.
pub fn enable_rx_timestamps(fd: &OwnedFd) -> Result<()> {
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_TIMESTAMPNS,
        1,
        "SO_TIMESTAMPNS",
    )
}

/// CPU time of the whole process in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}
