//! The stats snapshot of a session (what `dwcp stats`, the hooks and the
//! C API's `dwcp_stats` show).

use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Serialize;

use super::{hex, Role, Session};
use crate::adapt::AdaptStats;
use crate::codec::Tier;
use crate::transport::tcp::{path_min_rtt_us, tcp_info, TcpInfo};

/// Where a session is in its life (serialised as `running`, `completed`,
/// `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Running,
    Completed,
    Failed,
}

impl SessionState {
    /// The state's name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Running => "running",
            SessionState::Completed => "completed",
            SessionState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for SessionState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Serialises a tier by its name (`raw`, `lz4`, `zstd:3`, ...).
fn tier_name<S: serde::Serializer>(tier: &Tier, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(tier)
}

/// Per-stream figures, from the kernel's TCP_INFO.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStats {
    pub index: usize,
    pub tcp: Option<TcpInfo>,
}

/// Per-channel byte counts.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelStats {
    pub id: u16,
    pub raw_out: u64,
    pub raw_in: u64,
    pub done: bool,
}

/// A snapshot of a session's figures (what `dwcp stats` shows).
#[derive(Debug, Clone, Serialize)]
pub struct SessionStats {
    pub name: String,
    pub session: String,
    pub role: Role,
    pub state: SessionState,
    /// The failure reason's text ([`super::FailReason`]).
    pub error: Option<String>,
    pub elapsed_s: f64,
    /// The tier of the frames encoded now.
    #[serde(serialize_with = "tier_name")]
    pub tier: Tier,
    pub streams: usize,
    pub channels: Vec<ChannelStats>,
    /// QEMU bytes read from local sockets and sent.
    pub raw_out: u64,
    /// QEMU bytes received and written to local sockets.
    pub raw_in: u64,
    /// Bytes put on the TCP streams (headers included).
    pub wire_out: u64,
    pub wire_in: u64,
    pub frames_out: u64,
    pub frames_in: u64,
    /// Of the Data frames sent, those compressed with context across
    /// frames ([`crate::codec::context`]).
    pub frames_context_out: u64,
    /// Whether zstd frames go out with context now.
    pub context_on: bool,
    /// raw_out / wire_out.
    pub ratio_out: f64,
    pub zero_bytes: u64,
    pub pages_seen: u64,
    pub pages_deduped: u64,
    /// Pages sent in full whose content the channel had sent before, out of
    /// the dedup ring by then (a measurement: what a content store holding
    /// everything sent would have saved).
    pub pages_missed_dups: u64,
    /// Pages sent as references to the destination's kept copy of the
    /// guest (re-migration, docs/hde.md).
    pub pages_kept: u64,
    /// Pages sent as references to another channel's copy of their
    /// content (cross-channel, docs/hde.md); counted in `pages_deduped`
    /// too.
    pub pages_xref: u64,
    /// Pages sent again after their content changed, whose previous
    /// version the peer still held (delta candidates; 0 without deltas).
    pub pages_resent: u64,
    /// Of those, pages sent as a delta.
    pub pages_delta: u64,
    /// LZ4 size of the re-sent pages each compressed alone, bytes (the
    /// planner's estimate) ...
    pub resent_lz4_full: u64,
    /// ... and of what was chosen for them (the delta when smaller).
    pub resent_lz4_delta: u64,
    /// Wire bytes sent whose data the peer has not yet delivered to its QEMU
    /// (plus reads not yet encoded): what must still cross the link.
    pub inflight_bytes: u64,
    /// Wire bytes per second delivered, highest of the last second's 100 ms
    /// samples: the bottleneck rate the in-flight budget is sized from; 0
    /// before the first sample.
    pub delivery_rate: u64,
    /// Raw (QEMU) bytes per second delivered, average over the last second.
    pub raw_rate: u64,
    /// Lowest RTT the streams measured, microseconds.
    pub min_rtt_us: Option<u32>,
    /// Shortest credit loop of the last second, microseconds: a Data frame
    /// put on the wire until the peer's credit for it came back (the RTT
    /// plus both ends' relay and the peer QEMU's read); the in-flight budget
    /// covers twice this. None before the first credit.
    pub credit_loop_us: Option<u32>,
    /// Data frames received per codec: what the peer actually sent (the
    /// wire names the codec of each frame, not the zstd level).
    pub codecs_in: CodecCounts,
    pub per_stream: Vec<StreamStats>,
    /// The newest link sample, the link mode and the rate estimate
    /// ([`crate::adapt`], docs/adaptivity.md).
    pub adapt: AdaptStats,
}

/// Frames per codec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CodecCounts {
    pub none: u64,
    pub lz4: u64,
    pub zstd: u64,
    pub raw: u64,
    /// Compressed with context across frames ([`crate::codec::context`]).
    pub zstd_ctx: u64,
    /// Of the raw frames, those sent without a payload checksum (see
    /// [`TransportConfig::checksum_raw`]).
    pub raw_unchecked: u64,
}

impl CodecCounts {
    /// The codec of most frames (`raw`, `none`, `lz4`, `zstd`,
    /// `zstd-ctx`), or None without frames.
    pub fn dominant(&self) -> Option<&'static str> {
        [
            ("zstd-ctx", self.zstd_ctx),
            ("zstd", self.zstd),
            ("lz4", self.lz4),
            ("none", self.none),
            ("raw", self.raw),
        ]
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .max_by_key(|&(_, n)| n)
        .map(|(c, _)| c)
    }
}

impl Session {
    /// The session's id, as [`SessionStats::session`] shows it (hex).
    pub fn id(&self) -> String {
        hex(&self.inner.id)
    }

    /// Which end of the session this is.
    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// The adaptive layer's figures alone (what [`SessionStats::adapt`]
    /// holds), without reading every stream's TCP_INFO.
    pub fn adapt(&self) -> AdaptStats {
        match &self.inner.retired {
            Some(figures) => figures.adapt.clone(),
            None => self.inner.adapt.lock().stats(),
        }
    }

    /// A snapshot of the session's figures.
    pub fn stats(&self) -> SessionStats {
        let i = &self.inner;
        if let Some(figures) = &i.retired {
            return figures.clone();
        }
        let c = &i.counters;
        let state = if i.life.failed.load(Ordering::Acquire) {
            SessionState::Failed
        } else if i.life.complete.load(Ordering::Acquire) {
            SessionState::Completed
        } else {
            SessionState::Running
        };
        let end = i.life.ended.lock().unwrap_or_else(Instant::now);
        let raw_out = c.raw_out.load(Ordering::Relaxed);
        let wire_out = c.wire_out.load(Ordering::Relaxed);
        let mut channels: Vec<ChannelStats> = i
            .channels
            .map
            .lock()
            .values()
            .map(|ch| ChannelStats {
                id: ch.id,
                raw_out: ch.raw_out.load(Ordering::Relaxed),
                raw_in: ch.raw_in.load(Ordering::Relaxed),
                done: ch.done(),
            })
            .collect();
        channels.sort_by_key(|c| c.id);
        SessionStats {
            name: i.name.clone(),
            session: hex(&i.id),
            role: i.role,
            state,
            error: i.life.failure.lock().as_ref().map(|e| e.to_string()),
            elapsed_s: end.duration_since(i.life.started).as_secs_f64(),
            tier: *i.tuning.tier.lock(),
            streams: i.links.streams.len(),
            channels,
            raw_out,
            raw_in: c.raw_in.load(Ordering::Relaxed),
            wire_out,
            wire_in: c.wire_in.load(Ordering::Relaxed),
            frames_out: c.frames_out.load(Ordering::Relaxed),
            frames_in: c.frames_in.load(Ordering::Relaxed),
            frames_context_out: c.context_out.load(Ordering::Relaxed),
            context_on: i.tuning.context.load(Ordering::Relaxed),
            ratio_out: if wire_out > 0 {
                raw_out as f64 / wire_out as f64
            } else {
                0.0
            },
            zero_bytes: c.zero_bytes.load(Ordering::Relaxed),
            pages_seen: c.pages_seen.load(Ordering::Relaxed),
            pages_deduped: c.pages_deduped.load(Ordering::Relaxed),
            pages_missed_dups: c.pages_missed_dups.load(Ordering::Relaxed),
            pages_kept: c.pages_kept.load(Ordering::Relaxed),
            pages_xref: c.pages_xref.load(Ordering::Relaxed),
            pages_resent: c.pages_resent.load(Ordering::Relaxed),
            pages_delta: c.pages_delta.load(Ordering::Relaxed),
            resent_lz4_full: c.resent_lz4_full.load(Ordering::Relaxed),
            resent_lz4_delta: c.resent_lz4_delta.load(Ordering::Relaxed),
            inflight_bytes: i.flow.wire_inflight.load(Ordering::Relaxed)
                + i.channels
                    .map
                    .lock()
                    .values()
                    .map(|c| c.unencoded.load(Ordering::Relaxed))
                    .sum::<u64>(),
            delivery_rate: i.tuning.delivery_rate.load(Ordering::Relaxed),
            raw_rate: i.tuning.raw_rate.load(Ordering::Relaxed),
            min_rtt_us: path_min_rtt_us(&i.links.streams),
            credit_loop_us: match i.tuning.credit_loop_us.load(Ordering::Relaxed) {
                0 => None,
                us => Some(us.min(u32::MAX as u64) as u32),
            },
            codecs_in: CodecCounts {
                none: c.codec_in[0].load(Ordering::Relaxed),
                lz4: c.codec_in[1].load(Ordering::Relaxed),
                zstd: c.codec_in[2].load(Ordering::Relaxed),
                raw: c.codec_in[3].load(Ordering::Relaxed),
                zstd_ctx: c.codec_in[4].load(Ordering::Relaxed),
                raw_unchecked: c.unchecked_in.load(Ordering::Relaxed),
            },
            per_stream: i
                .links
                .streams
                .iter()
                .enumerate()
                .map(|(index, s)| StreamStats {
                    index,
                    tcp: tcp_info(s).ok(),
                })
                .collect(),
            adapt: i.adapt.lock().stats(),
        }
    }
}
