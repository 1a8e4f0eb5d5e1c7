//! Link measurement: one [`LinkSample`] per interval from what the streams
//! report (TCP_INFO) and the session's own counters, aggregated over the
//! session's streams.
//!
//! No active probe: before the first data byte each stream's TCP_INFO
//! already holds the RTT of its handshake (SYN / SYN-ACK, then the DWCP
//! hello's round trip), which is all the latency vote needs; capacity and
//! loss have no vote until data flows.
//!
//! **Capacity** is the question the mode detector's "< 1 Gbit/s" asks, and
//! the application's send rate does not answer it: an idle datacenter link
//! carries a few Mbit/s. So a sample has two figures:
//!
//! - `capacity_bytes_s`: measured only when the link was the bottleneck for
//!   at least half of the interval's 50 ms clock ticks (readers waiting for
//!   credit or encoded frames piling up, *and* the kernel holding at least
//!   half of the bytes in flight in the streams' send queues: the signal
//!   `--codec auto` already steps on), or when the path dropped at least
//!   [`CONGESTION_LOSS`] of the interval's segments (a queue that
//!   overflows: the path carries no more than it delivered). Then the wire
//!   rate the peer delivered over the interval is what the path carries.
//!   The loss rule is what finds a 100 Mbit/s LAN at once: its RTT looks
//!   like a datacenter's, raw frames overflow its shallow queue (13-20 %
//!   of the segments retransmitted, `lan100` profile), and the kernel's
//!   send queues stay small at that RTT, so the backlog signal never fired
//!   and the first capacity came 4-8 s late.
//! - `rate_floor_bytes_s`: always, the higher of the wire rate sent and the
//!   rate delivered: the path carries at least this much, so it can prove a
//!   fast link, never a slow one.
//!
//! The kernel's own per-stream `tcpi_delivery_rate` is not used for either:
//! it is the rate of the last ACKed flight, and bursts (ACK compression,
//! slow start after idle) made it read 3.6 Gbit/s on a 100 Mbit/s link and
//! 16 Gbit/s on a bridge carrying 160 Mbit/s in the replay test
//! (tests/tests/adapt.rs).
//!
//! **Loss** counts segments: retransmitted minus those the peer reported as
//! duplicates (DSACK: spurious retransmissions), over data segments sent.

use std::time::Instant;

use serde::Serialize;

use crate::transport::TcpInfo;

/// Segments a sample needs for its own loss figure (the detector adds
/// samples up until it has enough for its thresholds).
pub const MIN_LOSS_SEGMENTS: u32 = 1000;

/// The session's counters at one instant, as the sampler reads them.
#[derive(Debug, Clone, Copy)]
pub struct SessionTotals {
    pub at: Instant,
    /// Wire bytes put on the streams (source) or taken off them
    /// (destination), frame headers included.
    pub wire: u64,
    /// QEMU bytes read and sent (source) or delivered (destination).
    pub raw: u64,
    /// Wire bytes the peer credited back (delivered to its QEMU); on the
    /// destination, what it delivered itself.
    pub delivered_wire: u64,
    /// Wire bytes in flight (sent, not yet credited) plus reads not yet
    /// encoded.
    pub inflight: u64,
    /// Nanoseconds the codec workers spent encoding, in all.
    pub encode_ns: u64,
    /// Clock ticks so far, and those that found the link to be the
    /// bottleneck (module doc).
    pub ticks: u64,
    pub link_bound_ticks: u64,
}

/// One measurement of the path and the session over an interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkSample {
    /// End of the interval, seconds since the session started.
    pub at_s: f64,
    /// Length of the interval, seconds.
    pub interval_s: f64,
    /// Lowest smoothed RTT among the streams, microseconds (the
    /// handshake's until data flows); None when no stream has one.
    pub rtt_us: Option<u32>,
    /// Lowest RTT any stream has seen (the kernel's windowed minimum).
    pub min_rtt_us: Option<u32>,
    /// What the path delivers, wire bytes/s, when the link was the
    /// bottleneck for most of the interval; None otherwise (module doc).
    pub capacity_bytes_s: Option<f64>,
    /// What the path carried at least, wire bytes/s (module doc).
    pub rate_floor_bytes_s: f64,
    /// Share of the interval's clock ticks the link was the bottleneck.
    pub link_bound: f64,
    /// Wire bytes/s put on (source) or taken off (destination) the streams.
    pub wire_rate_bytes_s: f64,
    /// QEMU bytes/s read (source) or delivered (destination).
    pub raw_rate_bytes_s: f64,
    /// Wire bytes/s the peer delivered to its QEMU (credit returned).
    pub delivered_rate_bytes_s: f64,
    /// Raw bytes per wire byte over the interval; None without traffic.
    pub ratio: Option<f64>,
    /// Segments lost per segment sent over the interval (all streams):
    /// retransmitted minus spurious (DSACK), over data segments sent; None
    /// below [`MIN_LOSS_SEGMENTS`] sent.
    pub loss: Option<f64>,
    /// Segments retransmitted in the interval.
    pub retrans_segments: u32,
    /// Of those, reported by the peer as duplicates (DSACK).
    pub dsack_segments: u32,
    /// Data segments sent in the interval, retransmissions included.
    pub segments_out: u32,
    /// Bytes the streams sent in the interval (retransmissions included).
    pub sent_bytes: u64,
    /// Congestion windows of all streams, segments.
    pub cwnd_segments: u32,
    /// Wire bytes in flight at the end of the interval.
    pub inflight_bytes: u64,
    /// Codec workers' CPU use, cores (1.0 = one core encoding all the time).
    pub codec_cpu: f64,
    /// What the streams' congestion windows allow at their smoothed RTTs,
    /// wire bytes/s (sum over the streams of cwnd x MSS / RTT); None
    /// without an RTT.
    pub window_rate_bytes_s: Option<f64>,
    /// Share of the interval the streams were stalled by the peer's receive
    /// window (mean over the streams, 0..=1).
    pub rwnd_limited: f64,
}

/// A delivered rate this many times below what the congestion windows
/// allow is not the path's capacity: the windows were not the limit, so
/// neither was the link (module doc).
pub const WINDOW_SLACK: f64 = 4.0;

/// Share of an interval stalled by the peer's receive window above which
/// the peer, not the path, set the pace.
pub const RWND_LIMITED_MAX: f64 = 0.25;

/// Loss from which a sample reads the path as the bottleneck whatever the
/// queues say (module doc). Random loss of a WAN is well below it
/// (`internet`: 0.1 %); where a path loses this much at random, TCP's
/// rate under that loss is what the streams can carry anyway.
pub const CONGESTION_LOSS: f64 = 0.01;

/// MSS assumed when the kernel reports none.
const DEFAULT_MSS: u32 = 1448;

/// Per-stream totals of the previous sample.
#[derive(Debug, Clone, Copy, Default)]
struct StreamPrev {
    bytes_sent: u64,
    total_retrans: u32,
    dsack_dups: u32,
    segs_out: u32,
    rwnd_limited_us: u64,
}

impl StreamPrev {
    fn of(i: &TcpInfo) -> Self {
        StreamPrev {
            bytes_sent: i.bytes_sent,
            total_retrans: i.total_retrans,
            dsack_dups: i.dsack_dups,
            segs_out: i.data_segs_out,
            rwnd_limited_us: i.rwnd_limited_us,
        }
    }
}

/// Turns successive [`SessionTotals`] and TCP_INFO readings into samples.
#[derive(Debug)]
pub struct LinkSampler {
    started: Instant,
    prev: SessionTotals,
    streams: Vec<Option<StreamPrev>>,
}

impl LinkSampler {
    /// A sampler for a session that started at `started` (counters at 0).
    pub fn new(started: Instant) -> Self {
        LinkSampler {
            started,
            prev: SessionTotals {
                at: started,
                wire: 0,
                raw: 0,
                delivered_wire: 0,
                inflight: 0,
                encode_ns: 0,
                ticks: 0,
                link_bound_ticks: 0,
            },
            streams: Vec::new(),
        }
    }

    /// The sample of the interval since the previous call (or the start);
    /// `streams` is each stream's TCP_INFO, None where it could not be read.
    pub fn sample(&mut self, now: &SessionTotals, streams: &[Option<TcpInfo>]) -> LinkSample {
        let dt = now
            .at
            .saturating_duration_since(self.prev.at)
            .as_secs_f64()
            .max(1e-3);
        let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        if self.streams.len() != streams.len() {
            self.streams = vec![None; streams.len()];
        }
        let (mut sent, mut retrans, mut dsack, mut segs) = (0u64, 0u32, 0u32, 0u32);
        let mut cwnd = 0u32;
        let (mut window_rate, mut rwnd_us, mut n_info) = (0f64, 0u64, 0u32);
        let (mut rtt, mut min_rtt): (Option<u32>, Option<u32>) = (None, None);
        for (info, prev) in streams.iter().zip(self.streams.iter_mut()) {
            let Some(i) = info else { continue };
            let p = prev.unwrap_or_default();
            sent += i.bytes_sent.saturating_sub(p.bytes_sent);
            retrans = retrans.saturating_add(i.total_retrans.saturating_sub(p.total_retrans));
            dsack = dsack.saturating_add(i.dsack_dups.saturating_sub(p.dsack_dups));
            segs = segs.saturating_add(i.data_segs_out.saturating_sub(p.segs_out));
            cwnd = cwnd.saturating_add(i.cwnd);
            n_info += 1;
            // The first reading of a stream has no previous one: its
            // cumulative stall time is not this interval's.
            if prev.is_some() {
                rwnd_us += i.rwnd_limited_us.saturating_sub(p.rwnd_limited_us);
            }
            if i.rtt_us > 0 {
                let mss = if i.snd_mss > 0 {
                    i.snd_mss
                } else {
                    DEFAULT_MSS
                };
                window_rate += i.cwnd as f64 * mss as f64 / (i.rtt_us as f64 / 1e6);
            }
            if i.rtt_us > 0 {
                rtt = Some(rtt.map_or(i.rtt_us, |r| r.min(i.rtt_us)));
            }
            if i.min_rtt_us > 0 {
                min_rtt = Some(min_rtt.map_or(i.min_rtt_us, |r| r.min(i.min_rtt_us)));
            }
            *prev = Some(StreamPrev::of(i));
        }
        let wire_rate = per_s(now.wire, self.prev.wire);
        let raw_rate = per_s(now.raw, self.prev.raw);
        let delivered = per_s(now.delivered_wire, self.prev.delivered_wire);
        let d_wire = now.wire.saturating_sub(self.prev.wire);
        let d_raw = now.raw.saturating_sub(self.prev.raw);
        let ticks = now.ticks.saturating_sub(self.prev.ticks);
        let bound = now
            .link_bound_ticks
            .saturating_sub(self.prev.link_bound_ticks);
        let link_bound = if ticks > 0 {
            bound as f64 / ticks as f64
        } else {
            0.0
        };
        let window_rate = (window_rate > 0.0).then_some(window_rate);
        let rwnd_limited = if n_info > 0 {
            (rwnd_us as f64 / 1e6 / dt / n_info as f64).min(1.0)
        } else {
            0.0
        };
        // The link is the bottleneck when the session found it backlogged
        // for most of the interval, the peer's receive window did not hold
        // the streams back, and the congestion windows were (near) the
        // limit: a path that delivers far less than the windows allow was
        // not what stopped the sender (a starved CPU at either end, a
        // stream restarting after idle), and reading that as the path's
        // capacity made a bridge look like a 59 Mbit/s link.
        let window_bound = window_rate.is_none_or(|w| delivered * WINDOW_SLACK >= w);
        let loss =
            (segs >= MIN_LOSS_SEGMENTS).then(|| retrans.saturating_sub(dsack) as f64 / segs as f64);
        let congested = loss.is_some_and(|l| l >= CONGESTION_LOSS);
        let bottleneck = (link_bound >= 0.5 || congested)
            && delivered > 0.0
            && rwnd_limited < RWND_LIMITED_MAX
            && window_bound;
        let sample = LinkSample {
            at_s: now.at.saturating_duration_since(self.started).as_secs_f64(),
            interval_s: dt,
            rtt_us: rtt,
            min_rtt_us: min_rtt,
            capacity_bytes_s: bottleneck.then_some(delivered),
            rate_floor_bytes_s: wire_rate.max(delivered),
            link_bound,
            wire_rate_bytes_s: wire_rate,
            raw_rate_bytes_s: raw_rate,
            delivered_rate_bytes_s: delivered,
            ratio: (d_wire > 0 && d_raw > 0).then(|| d_raw as f64 / d_wire as f64),
            loss,
            retrans_segments: retrans,
            dsack_segments: dsack,
            segments_out: segs,
            sent_bytes: sent,
            cwnd_segments: cwnd,
            inflight_bytes: now.inflight,
            codec_cpu: now.encode_ns.saturating_sub(self.prev.encode_ns) as f64 / 1e9 / dt,
            window_rate_bytes_s: window_rate,
            rwnd_limited,
        };
        self.prev = *now;
        sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info(sent: u64, segs: u32, retrans: u32, dsack: u32, rtt: u32) -> TcpInfo {
        TcpInfo {
            rtt_us: rtt,
            min_rtt_us: rtt / 2,
            cwnd: 10,
            bytes_sent: sent,
            data_segs_out: segs,
            total_retrans: retrans,
            dsack_dups: dsack,
            // the kernel's own rate: not used
            delivery_rate: 99_000_000_000,
            ..Default::default()
        }
    }

    fn totals(t0: Instant, ms: u64, wire: u64, bound: u64) -> SessionTotals {
        SessionTotals {
            at: t0 + Duration::from_millis(ms),
            wire,
            raw: wire * 2,
            delivered_wire: wire,
            inflight: 1 << 20,
            encode_ns: ms * 500_000,
            ticks: ms / 50,
            link_bound_ticks: bound,
        }
    }

    #[test]
    fn capacity_is_the_delivered_rate_while_the_link_is_the_bottleneck() {
        let t0 = Instant::now();
        let mut s = LinkSampler::new(t0);
        let streams = [
            Some(info(10_000_000, 7000, 0, 0, 80_000)),
            Some(info(10_000_000, 7000, 0, 0, 90_000)),
        ];
        // 20 MB in 0.5 s, 8 of 10 ticks link-bound
        let a = s.sample(&totals(t0, 500, 20_000_000, 8), &streams);
        assert_eq!(a.capacity_bytes_s, Some(40e6));
        assert!((a.link_bound - 0.8).abs() < 1e-9);
        assert_eq!(a.ratio, Some(2.0));
        assert_eq!(a.rtt_us, Some(80_000));
        assert_eq!(a.min_rtt_us, Some(40_000));
        assert_eq!(a.loss, Some(0.0));
        assert!((a.codec_cpu - 0.5).abs() < 1e-9);
        // Then application-limited (2 of 10 ticks): a floor, no capacity.
        let b = s.sample(&totals(t0, 1000, 21_000_000, 10), &streams);
        assert_eq!(b.capacity_bytes_s, None);
        assert!((b.rate_floor_bytes_s - 2e6).abs() < 1.0, "{b:?}");
        assert_eq!(b.loss, None, "no segment sent");
    }

    #[test]
    fn capacity_needs_the_windows_to_be_the_limit() {
        // The flap of the replay test: 59 Mbit/s (7.4 MB/s) delivered on a
        // bridge (0.23 ms RTT) with the session backlogged. Four streams of
        // 10 segments at 0.23 ms allow 4 x 10 x 1448 / 0.00023 = 252 MB/s:
        // the windows were not the limit, so this is no capacity.
        let t0 = Instant::now();
        let bridge = |sent: u64, rwnd_us: u64| TcpInfo {
            rtt_us: 230,
            min_rtt_us: 200,
            cwnd: 10,
            snd_mss: 1448,
            bytes_sent: sent,
            data_segs_out: (sent / 1448) as u32,
            rwnd_limited_us: rwnd_us,
            ..Default::default()
        };
        let mut s = LinkSampler::new(t0);
        let streams = vec![Some(bridge(925_000, 0)); 4];
        let a = s.sample(&totals(t0, 500, 3_700_000, 10), &streams);
        assert_eq!(a.capacity_bytes_s, None, "{a:?}");
        assert!((a.window_rate_bytes_s.unwrap() - 4.0 * 10.0 * 1448.0 / 230e-6).abs() < 1.0);
        // The same windows at 80 ms allow 724 KB/s: 7.4 MB/s is above that,
        // the windows were the limit: a capacity.
        let mut s = LinkSampler::new(t0);
        let wan = |sent| TcpInfo {
            rtt_us: 80_000,
            ..bridge(sent, 0)
        };
        let streams = vec![Some(wan(925_000)); 4];
        let a = s.sample(&totals(t0, 500, 3_700_000, 10), &streams);
        assert_eq!(a.capacity_bytes_s, Some(7.4e6));
        // Stalled by the peer's receive window for half of the interval
        // (from the second reading on): the peer set the pace.
        let streams = vec![
            Some(TcpInfo {
                rwnd_limited_us: 250_000,
                ..wan(1_850_000)
            });
            4
        ];
        let b = s.sample(&totals(t0, 1000, 7_400_000, 20), &streams);
        assert!((b.rwnd_limited - 0.5).abs() < 1e-9, "{b:?}");
        assert_eq!(b.capacity_bytes_s, None);
    }

    #[test]
    fn heavy_loss_makes_the_delivered_rate_a_capacity() {
        // One sample of the `lan100` profile with raw frames (agent log):
        // 4.7 ms RTT with queueing, 55 segments of window in all, 5,257
        // segments sent and 1,070 retransmitted in 0.5 s, 9.8 MB/s
        // delivered, and the backlog signal on 1 tick of 10.
        let t0 = Instant::now();
        let lan = |sent: u64, segs: u32, retrans: u32| TcpInfo {
            rtt_us: 4751,
            min_rtt_us: 42,
            cwnd: 14,
            snd_mss: 1448,
            bytes_sent: sent,
            data_segs_out: segs,
            total_retrans: retrans,
            ..Default::default()
        };
        let mut s = LinkSampler::new(t0);
        let streams = vec![Some(lan(1_900_000, 1314, 267)); 4];
        let a = s.sample(&totals(t0, 500, 4_910_000, 1), &streams);
        assert!(a.loss.unwrap() > 0.2, "{a:?}");
        assert_eq!(a.capacity_bytes_s, Some(9.82e6));
        // The same with the internet's 0.1 % random loss: no capacity.
        let mut s = LinkSampler::new(t0);
        let streams = vec![Some(lan(1_900_000, 1314, 1)); 4];
        let a = s.sample(&totals(t0, 500, 4_910_000, 1), &streams);
        assert_eq!(a.capacity_bytes_s, None, "{a:?}");
    }

    #[test]
    fn loss_counts_retransmissions_the_peer_did_not_report_as_duplicates() {
        let t0 = Instant::now();
        let mut s = LinkSampler::new(t0);
        let streams = [
            Some(info(8_000_000, 5000, 6, 1, 1000)),
            Some(info(0, 0, 0, 0, 1000)),
            None,
        ];
        let a = s.sample(&totals(t0, 500, 8_000_000, 0), &streams);
        assert_eq!(a.loss, Some(0.001));
        assert_eq!((a.retrans_segments, a.dsack_segments), (6, 1));
        assert_eq!(a.segments_out, 5000);
        assert_eq!(a.capacity_bytes_s, None);
        // below MIN_LOSS_SEGMENTS: no figure
        let streams = [
            Some(info(8_100_000, 5500, 6, 1, 1000)),
            Some(info(0, 0, 0, 0, 1000)),
            None,
        ];
        assert_eq!(
            s.sample(&totals(t0, 1000, 8_100_000, 0), &streams).loss,
            None
        );
    }
}
