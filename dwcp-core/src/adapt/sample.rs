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
//! - `capacity_bytes_s`: measured only when at least one stream that sent in
//!   the interval was limited by its congestion window (the kernel's last
//!   delivery-rate sample not app-limited, busy sending for at least half
//!   the interval, and less than half of that stalled by the receive window
//!   or the send buffer): then the sum of the
//!   sending streams' kernel delivery rates is what the path delivers;
//! - `rate_floor_bytes_s`: always, the highest of that sum, the wire rate
//!   sent and the rate the peer credited back: the path carries at least
//!   this much, so it can prove a fast link, never a slow one.

use std::time::Instant;

use serde::Serialize;

use crate::transport::TcpInfo;

/// Sent bytes a sample needs for a loss figure: 4 MiB, ~2,900 full
/// segments, so one retransmitted segment reads as ~0.035 %.
pub const MIN_LOSS_BYTES: u64 = 4 << 20;

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
    /// What the path delivers, wire bytes/s, when a stream was limited by
    /// its congestion window in the interval; None otherwise (module doc).
    pub capacity_bytes_s: Option<f64>,
    /// What the path carried at least, wire bytes/s (module doc).
    pub rate_floor_bytes_s: f64,
    /// Streams limited by their congestion window in the interval.
    pub cwnd_limited_streams: u32,
    /// Wire bytes/s put on (source) or taken off (destination) the streams.
    pub wire_rate_bytes_s: f64,
    /// QEMU bytes/s read (source) or delivered (destination).
    pub raw_rate_bytes_s: f64,
    /// Wire bytes/s the peer delivered to its QEMU (credit returned).
    pub delivered_rate_bytes_s: f64,
    /// Raw bytes per wire byte over the interval; None without traffic.
    pub ratio: Option<f64>,
    /// Bytes retransmitted per byte sent over the interval (all streams);
    /// None below [`MIN_LOSS_BYTES`] sent.
    pub loss: Option<f64>,
    /// Segments retransmitted in the interval.
    pub retrans_segments: u32,
    /// Bytes the streams sent in the interval (retransmissions included).
    pub sent_bytes: u64,
    /// Congestion windows of all streams, segments.
    pub cwnd_segments: u32,
    /// Wire bytes in flight at the end of the interval.
    pub inflight_bytes: u64,
    /// Codec workers' CPU use, cores (1.0 = one core encoding all the time).
    pub codec_cpu: f64,
}

/// Per-stream totals of the previous sample.
#[derive(Debug, Clone, Copy, Default)]
struct StreamPrev {
    bytes_sent: u64,
    bytes_retrans: u64,
    total_retrans: u32,
    busy_us: u64,
    stalled_us: u64,
}

impl StreamPrev {
    fn of(i: &TcpInfo) -> Self {
        StreamPrev {
            bytes_sent: i.bytes_sent,
            bytes_retrans: i.bytes_retrans,
            total_retrans: i.total_retrans,
            busy_us: i.busy_us,
            stalled_us: i.rwnd_limited_us + i.sndbuf_limited_us,
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
        let (mut sent, mut retrans_bytes, mut retrans_segs) = (0u64, 0u64, 0u32);
        let (mut sending_rate, mut limited, mut cwnd) = (0f64, 0u32, 0u32);
        let (mut rtt, mut min_rtt): (Option<u32>, Option<u32>) = (None, None);
        for (info, prev) in streams.iter().zip(self.streams.iter_mut()) {
            let Some(i) = info else { continue };
            let p = prev.unwrap_or_default();
            let d_sent = i.bytes_sent.saturating_sub(p.bytes_sent);
            sent += d_sent;
            retrans_bytes += i.bytes_retrans.saturating_sub(p.bytes_retrans);
            retrans_segs += i.total_retrans.saturating_sub(p.total_retrans);
            cwnd = cwnd.saturating_add(i.cwnd);
            if i.rtt_us > 0 {
                rtt = Some(rtt.map_or(i.rtt_us, |r| r.min(i.rtt_us)));
            }
            if i.min_rtt_us > 0 {
                min_rtt = Some(min_rtt.map_or(i.min_rtt_us, |r| r.min(i.min_rtt_us)));
            }
            if d_sent > 0 {
                // An idle stream's delivery rate is stale: only streams that
                // sent in the interval count.
                sending_rate += i.delivery_rate as f64;
                let busy = i.busy_us.saturating_sub(p.busy_us);
                let stalled =
                    (i.rwnd_limited_us + i.sndbuf_limited_us).saturating_sub(p.stalled_us);
                // Sending for at least half the interval: a short burst
                // after an idle spell runs in slow start, and its delivery
                // rate says little about the path.
                let busy_enough = busy as f64 >= dt * 0.5e6;
                if !i.app_limited && busy_enough && stalled * 2 < busy {
                    limited += 1;
                }
            }
            *prev = Some(StreamPrev::of(i));
        }
        let wire_rate = per_s(now.wire, self.prev.wire);
        let raw_rate = per_s(now.raw, self.prev.raw);
        let delivered = per_s(now.delivered_wire, self.prev.delivered_wire);
        let d_wire = now.wire.saturating_sub(self.prev.wire);
        let d_raw = now.raw.saturating_sub(self.prev.raw);
        let sample = LinkSample {
            at_s: now.at.saturating_duration_since(self.started).as_secs_f64(),
            interval_s: dt,
            rtt_us: rtt,
            min_rtt_us: min_rtt,
            capacity_bytes_s: (limited > 0).then_some(sending_rate.max(delivered)),
            rate_floor_bytes_s: sending_rate.max(wire_rate).max(delivered),
            cwnd_limited_streams: limited,
            wire_rate_bytes_s: wire_rate,
            raw_rate_bytes_s: raw_rate,
            delivered_rate_bytes_s: delivered,
            ratio: (d_wire > 0 && d_raw > 0).then(|| d_raw as f64 / d_wire as f64),
            loss: (sent >= MIN_LOSS_BYTES).then(|| retrans_bytes as f64 / sent as f64),
            retrans_segments: retrans_segs,
            sent_bytes: sent,
            cwnd_segments: cwnd,
            inflight_bytes: now.inflight,
            codec_cpu: now.encode_ns.saturating_sub(self.prev.encode_ns) as f64 / 1e9 / dt,
        };
        self.prev = *now;
        sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info(sent: u64, retrans: u64, rate: u64, app_limited: bool, rtt: u32) -> TcpInfo {
        TcpInfo {
            rtt_us: rtt,
            min_rtt_us: rtt / 2,
            cwnd: 10,
            bytes_sent: sent,
            bytes_retrans: retrans,
            total_retrans: (retrans / 1448) as u32,
            delivery_rate: rate,
            app_limited,
            busy_us: sent / 10,
            ..Default::default()
        }
    }

    fn totals(t0: Instant, ms: u64, wire: u64, raw: u64) -> SessionTotals {
        SessionTotals {
            at: t0 + Duration::from_millis(ms),
            wire,
            raw,
            delivered_wire: wire,
            inflight: 1 << 20,
            encode_ns: ms * 500_000,
        }
    }

    #[test]
    fn a_cwnd_limited_stream_measures_capacity_an_app_limited_one_only_a_floor() {
        let t0 = Instant::now();
        let mut s = LinkSampler::new(t0);
        // Two streams, 10 MB each in 0.5 s, both cwnd-limited at 20 MB/s.
        let a = s.sample(
            &totals(t0, 500, 20_000_000, 40_000_000),
            &[
                Some(info(10_000_000, 0, 20_000_000, false, 80_000)),
                Some(info(10_000_000, 0, 20_000_000, false, 90_000)),
            ],
        );
        assert_eq!(a.capacity_bytes_s, Some(40e6));
        assert_eq!(a.cwnd_limited_streams, 2);
        assert!((a.wire_rate_bytes_s - 40e6).abs() < 1.0);
        assert_eq!(a.ratio, Some(2.0));
        assert_eq!(a.rtt_us, Some(80_000));
        assert_eq!(a.min_rtt_us, Some(40_000));
        assert_eq!(a.loss, Some(0.0));
        assert!((a.codec_cpu - 0.5).abs() < 1e-9);
        // Then app-limited: a floor, no capacity.
        let b = s.sample(
            &totals(t0, 1000, 21_000_000, 42_000_000),
            &[
                Some(info(10_500_000, 0, 1_000_000, true, 80_000)),
                Some(info(10_500_000, 0, 1_000_000, true, 90_000)),
            ],
        );
        assert_eq!(b.capacity_bytes_s, None);
        assert!((b.rate_floor_bytes_s - 2e6).abs() < 1.0, "{b:?}");
        assert_eq!(b.loss, None, "1 MB sent: too little for a loss figure");
    }

    #[test]
    fn loss_is_retransmitted_over_sent_bytes_and_idle_streams_do_not_count() {
        let t0 = Instant::now();
        let mut s = LinkSampler::new(t0);
        let streams = [
            Some(info(8_000_000, 8_000, 30_000_000, false, 1000)),
            // idle from the start: its (stale) rate must not count
            Some(info(0, 0, 500_000_000, false, 1000)),
            None,
        ];
        let a = s.sample(&totals(t0, 500, 8_000_000, 8_000_000), &streams);
        assert_eq!(a.loss, Some(0.001));
        assert_eq!(a.retrans_segments, 5);
        assert_eq!(a.capacity_bytes_s, Some(30e6));
        assert_eq!(a.cwnd_limited_streams, 1);
    }

    #[test]
    fn a_short_burst_measures_no_capacity() {
        let t0 = Instant::now();
        let mut s = LinkSampler::new(t0);
        let mut i = info(8_000_000, 0, 30_000_000, false, 1000);
        i.busy_us = 100_000; // 0.1 s of a 0.5 s interval
        let a = s.sample(&totals(t0, 500, 8_000_000, 8_000_000), &[Some(i)]);
        assert_eq!(a.capacity_bytes_s, None);
    }

    #[test]
    fn a_stream_stalled_by_the_receive_window_measures_no_capacity() {
        let t0 = Instant::now();
        let mut s = LinkSampler::new(t0);
        let mut i = info(8_000_000, 0, 30_000_000, false, 1000);
        i.rwnd_limited_us = i.busy_us * 3 / 4;
        let a = s.sample(&totals(t0, 500, 8_000_000, 8_000_000), &[Some(i)]);
        assert_eq!(a.capacity_bytes_s, None);
        assert!((a.rate_floor_bytes_s - 30e6).abs() < 1.0);
    }
}
