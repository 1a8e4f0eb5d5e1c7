//! Per-socket TCP tuning and TCP_INFO statistics.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

use serde::Serialize;
use socket2::{SockRef, TcpKeepalive};

/// Socket options applied to every data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketTuning {
    /// Congestion control by name (`bbr`, `cubic`, `reno`); `None` keeps the
    /// system default.
    pub congestion: Option<String>,
    /// SO_SNDBUF / SO_RCVBUF in bytes; `None` leaves the kernel autotuning.
    pub send_buffer: Option<usize>,
    pub recv_buffer: Option<usize>,
    pub nodelay: bool,
    /// TCP keepalive idle time (probes every idle/3, 3 probes).
    pub keepalive: Option<Duration>,
    /// TCP_USER_TIMEOUT: unacknowledged data older than this fails the stream.
    pub user_timeout: Option<Duration>,
}

impl Default for SocketTuning {
    fn default() -> Self {
        SocketTuning {
            congestion: None,
            send_buffer: None,
            recv_buffer: None,
            nodelay: true,
            keepalive: Some(Duration::from_secs(10)),
            user_timeout: Some(Duration::from_secs(20)),
        }
    }
}

impl SocketTuning {
    /// Applies the options. A congestion-control name the kernel does not
    /// offer is an error naming the available ones.
    pub fn apply(&self, s: &TcpStream) -> std::io::Result<()> {
        let sock = SockRef::from(s);
        if let Some(cc) = &self.congestion {
            sock.set_tcp_congestion(cc.as_bytes()).map_err(|e| {
                let avail =
                    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                        .unwrap_or_default();
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "congestion control {cc:?} not available ({e}); the kernel offers: {}",
                        avail.trim()
                    ),
                )
            })?;
        }
        if let Some(n) = self.send_buffer {
            sock.set_send_buffer_size(n)?;
        }
        if let Some(n) = self.recv_buffer {
            sock.set_recv_buffer_size(n)?;
        }
        sock.set_tcp_nodelay(self.nodelay)?;
        if let Some(idle) = self.keepalive {
            let ka = TcpKeepalive::new()
                .with_time(idle)
                .with_interval((idle / 3).max(Duration::from_secs(1)))
                .with_retries(3);
            sock.set_tcp_keepalive(&ka)?;
        }
        if let Some(t) = self.user_timeout {
            sock.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    }
}

/// The parts of the kernel's `struct tcp_info` DWCP reports.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct TcpInfo {
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u32,
    pub rttvar_us: u32,
    /// Lowest RTT the kernel has seen on the connection, microseconds.
    pub min_rtt_us: u32,
    /// Congestion window, segments.
    pub cwnd: u32,
    /// Sender's maximum segment size, bytes.
    pub snd_mss: u32,
    /// Segments retransmitted over the connection's life.
    pub total_retrans: u32,
    /// Kernel's estimate of the delivery rate, bytes/s.
    pub delivery_rate: u64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Pacing rate chosen by the congestion control, bytes/s.
    pub pacing_rate: u64,
    pub bytes_sent: u64,
    pub bytes_retrans: u64,
    /// Bytes written to the socket and not yet sent, i.e. queued behind
    /// the congestion or receive window.
    pub notsent_bytes: u32,
    /// Segments the kernel counts as lost now (in flight, not yet
    /// retransmitted or acknowledged).
    pub lost: u32,
    /// The last delivery-rate sample was taken while the application, not
    /// the congestion window, limited the sending: `delivery_rate` is then
    /// only a lower bound of what the path can carry.
    pub app_limited: bool,
    /// Time the stream had data in flight, microseconds (over its life).
    pub busy_us: u64,
    /// Of that, time stalled by the peer's receive window, microseconds.
    pub rwnd_limited_us: u64,
    /// Of that, time stalled by a full send buffer, microseconds.
    pub sndbuf_limited_us: u64,
    /// Data segments sent, retransmissions included.
    pub data_segs_out: u32,
    /// Duplicate-SACK blocks received: segments the peer got twice, i.e.
    /// spurious retransmissions (or duplicates the path made).
    pub dsack_dups: u32,
}

impl TcpInfo {
    /// Bytes the kernel still holds for this connection: sent and not yet
    /// acknowledged, plus not yet sent.
    pub fn backlog_bytes(&self) -> u64 {
        self.bytes_sent
            .saturating_sub(self.bytes_retrans)
            .saturating_sub(self.bytes_acked)
            + self.notsent_bytes as u64
    }
}

/// The kernel's `struct tcp_info` (include/uapi/linux/tcp.h) up to
/// `tcpi_dsack_dups`; libc's copy stops earlier. The kernel fills as much
/// as it has and reports the length, so an older kernel leaves zeros.
#[repr(C)]
#[derive(Default)]
struct KernelTcpInfo {
    state: [u8; 8],
    /// rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets,
    /// last_data_sent, last_ack_sent, last_data_recv, last_ack_recv, pmtu,
    /// rcv_ssthresh, rtt, rttvar, snd_ssthresh, snd_cwnd, advmss, reordering,
    /// rcv_rtt, rcv_space, total_retrans.
    u32s: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    /// segs_out, segs_in, notsent_bytes, min_rtt, data_segs_in, data_segs_out.
    u32s2: [u32; 6],
    delivery_rate: u64,
    busy_time: u64,
    rwnd_limited: u64,
    sndbuf_limited: u64,
    delivered: u32,
    delivered_ce: u32,
    bytes_sent: u64,
    bytes_retrans: u64,
    dsack_dups: u32,
}

/// Reads TCP_INFO from a connected socket.
pub fn tcp_info(s: &TcpStream) -> std::io::Result<TcpInfo> {
    let mut info = KernelTcpInfo::default();
    let mut len = std::mem::size_of::<KernelTcpInfo>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `s`; `info` is a plain repr(C)
    // struct of integers and `len` is its size, so the kernel writes at most
    // that many bytes into memory we own.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut KernelTcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpInfo {
        rtt_us: info.u32s[15],
        rttvar_us: info.u32s[16],
        min_rtt_us: info.u32s2[3],
        cwnd: info.u32s[18],
        snd_mss: info.u32s[2],
        total_retrans: info.u32s[23],
        delivery_rate: info.delivery_rate,
        bytes_acked: info.bytes_acked,
        bytes_received: info.bytes_received,
        pacing_rate: info.pacing_rate,
        bytes_sent: info.bytes_sent,
        bytes_retrans: info.bytes_retrans,
        notsent_bytes: info.u32s2[2],
        lost: info.u32s[6],
        // tcpi_delivery_rate_app_limited: bit 0 of the byte after the
        // window scales.
        app_limited: info.state[7] & 1 != 0,
        busy_us: info.busy_time,
        rwnd_limited_us: info.rwnd_limited,
        sndbuf_limited_us: info.sndbuf_limited,
        data_segs_out: info.u32s2[5],
        dsack_dups: info.dsack_dups,
    })
}

/// Lowest RTT the streams have measured so far, microseconds.
pub(crate) fn path_min_rtt_us(streams: &[TcpStream]) -> Option<u32> {
    streams
        .iter()
        .filter_map(|s| tcp_info(s).ok())
        .map(|i| {
            if i.min_rtt_us > 0 {
                i.min_rtt_us
            } else {
                i.rtt_us
            }
        })
        .filter(|r| *r > 0)
        .min()
}

/// Bytes the kernel holds in the streams' send queues (unacknowledged or
/// not yet sent).
pub(crate) fn stream_backlog(streams: &[TcpStream]) -> u64 {
    streams
        .iter()
        .filter_map(|s| tcp_info(s).ok())
        .map(|i| i.backlog_bytes())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn tuning_applies_and_tcp_info_counts_bytes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0; 1 << 20];
            s.read_exact(&mut buf).unwrap();
            s.write_all(b"k").unwrap();
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let tuning = SocketTuning {
            congestion: Some("cubic".into()),
            send_buffer: Some(1 << 20),
            ..Default::default()
        };
        tuning.apply(&c).unwrap();
        let cc = SockRef::from(&c).tcp_congestion().unwrap();
        assert_eq!(cc.split(|b| *b == 0).next().unwrap(), b"cubic");
        c.write_all(&vec![1u8; 1 << 20]).unwrap();
        let mut k = [0u8; 1];
        c.read_exact(&mut k).unwrap();
        t.join().unwrap();
        let info = tcp_info(&c).unwrap();
        assert!(info.bytes_acked >= 1 << 20, "{info:?}");
        assert!(info.rtt_us > 0, "{info:?}");
        let bad = SocketTuning {
            congestion: Some("warp9".into()),
            ..Default::default()
        };
        let err = bad.apply(&c).unwrap_err().to_string();
        assert!(err.contains("warp9") && err.contains("offers"), "{err}");
    }
}
