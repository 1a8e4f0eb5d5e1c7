//! The C view of a session's statistics. The core never sees this type: it
//! is built from [`SessionStats`] with `From`.

use std::ffi::c_char;

use dwcp_core::transport::SessionStats;

/// Where a session is.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum dwcp_state {
    /// Incoming handle: listening, no session yet.
    DWCP_STATE_LISTENING = 0,
    /// Streams are up; data may be flowing.
    DWCP_STATE_RUNNING = 1,
    /// Every channel finished in both directions.
    DWCP_STATE_COMPLETED = 2,
    /// The session failed or was cancelled.
    DWCP_STATE_FAILED = 3,
}

/// A snapshot of a session's figures (see `dwcp_outgoing_stats()`).
/// "out" is what this side sent, "in" what it received; "raw" counts QEMU's
/// bytes, "wire" the bytes on TCP after deduplication and compression.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_stats {
    pub state: dwcp_state,
    /// TCP streams of the session.
    pub streams: u32,
    /// Channels (QEMU connections) opened so far.
    pub channels: u32,
    /// Mean and largest smoothed RTT over the streams, microseconds (0 if unknown).
    pub rtt_us: u32,
    pub rtt_max_us: u32,
    /// Retransmitted segments over all streams.
    pub retransmits: u32,
    pub raw_out: u64,
    pub raw_in: u64,
    pub wire_out: u64,
    pub wire_in: u64,
    pub frames_out: u64,
    pub frames_in: u64,
    /// Raw bytes sent as zero runs.
    pub zero_bytes: u64,
    pub pages_seen: u64,
    pub pages_deduped: u64,
    /// Milliseconds since the session started (frozen when it ends).
    pub elapsed_ms: u64,
    /// Current codec as in a URI (`none`, `lz4`, `zstd:3`), NUL-terminated.
    pub codec: [c_char; 16],
}

impl dwcp_stats {
    /// Figures of a listener without a session yet.
    pub fn listening() -> dwcp_stats {
        dwcp_stats {
            state: dwcp_state::DWCP_STATE_LISTENING,
            streams: 0,
            channels: 0,
            rtt_us: 0,
            rtt_max_us: 0,
            retransmits: 0,
            raw_out: 0,
            raw_in: 0,
            wire_out: 0,
            wire_in: 0,
            frames_out: 0,
            frames_in: 0,
            zero_bytes: 0,
            pages_seen: 0,
            pages_deduped: 0,
            elapsed_ms: 0,
            codec: [0; 16],
        }
    }
}

impl From<&SessionStats> for dwcp_stats {
    fn from(s: &SessionStats) -> dwcp_stats {
        let rtts: Vec<u32> = s
            .per_stream
            .iter()
            .filter_map(|p| p.tcp.as_ref().map(|t| t.rtt_us))
            .collect();
        let retrans: u32 = s
            .per_stream
            .iter()
            .filter_map(|p| p.tcp.as_ref().map(|t| t.total_retrans))
            .sum();
        let mut codec = [0 as c_char; 16];
        for (d, b) in codec.iter_mut().zip(s.tier.to_string().bytes().take(15)) {
            *d = b as c_char;
        }
        dwcp_stats {
            state: match s.state.as_str() {
                "completed" => dwcp_state::DWCP_STATE_COMPLETED,
                "failed" => dwcp_state::DWCP_STATE_FAILED,
                _ => dwcp_state::DWCP_STATE_RUNNING,
            },
            streams: s.streams as u32,
            channels: s.channels.len() as u32,
            rtt_us: if rtts.is_empty() {
                0
            } else {
                (rtts.iter().map(|r| *r as u64).sum::<u64>() / rtts.len() as u64) as u32
            },
            rtt_max_us: rtts.iter().copied().max().unwrap_or(0),
            retransmits: retrans,
            raw_out: s.raw_out,
            raw_in: s.raw_in,
            wire_out: s.wire_out,
            wire_in: s.wire_in,
            frames_out: s.frames_out,
            frames_in: s.frames_in,
            zero_bytes: s.zero_bytes,
            pages_seen: s.pages_seen,
            pages_deduped: s.pages_deduped,
            elapsed_ms: (s.elapsed_s * 1000.0) as u64,
            codec,
        }
    }
}
