//! The ETA of a migration: the time until QEMU has sent what is left, when
//! the path delivers `wire_rate` wire bytes/s at `ratio` raw bytes per wire
//! byte and the guest dirties `dirty_rate` raw bytes/s meanwhile:
//!
//! ```text
//! eta = (remaining / ram_per_byte + backlog) / (wire_rate * ratio - dirty_rate)
//! ```
//!
//! `backlog` is content the guest has dirtied behind the first pass, which
//! `remaining` does not count until QEMU syncs its dirty bitmap at the end
//! of that pass (the driver estimates it from the dirty rate QEMU measures
//! by page sampling while the pass runs; 0 after it).
//!
//! (each pass resends what the guest dirtied during the previous one: the
//! sum of that geometric series; what is dirtied is content, resent at one
//! RAM byte per byte). `ram_per_byte` is the guest RAM QEMU will get
//! through per byte it writes for what is left: a zero page costs it a few
//! header bytes, so while a pass crosses untouched memory `remaining` falls
//! much faster than QEMU's byte count grows (the driver estimates it from a
//! sample of the guest's RAM ahead of the first pass and from QEMU's
//! `normal`, `duplicate` and `transferred` counters; 1 when unknown). None when the rate is unknown or does not
//! outrun the dirty rate: the migration does not converge at this pace, and
//! no figure is better than a wrong one.
//!
//! The rate is a [`RateEstimate`]: today the session's measured delivery
//! rate ([`MeasuredRate`]); a predictor of the path's rate can hand its own
//! estimate to [`eta_s`] instead, nothing else changes.

use serde::Serialize;

use super::sample::LinkSample;

/// Time constant of the measured rate's moving average, seconds.
pub const RATE_TAU_S: f64 = 2.0;

/// The rate an ETA is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RateEstimate {
    /// Wire bytes/s the migration is expected to get.
    pub wire_rate_bytes_s: f64,
    /// Raw (QEMU) bytes per wire byte.
    pub ratio: f64,
    /// Where the rate comes from (`measured`: the delivered rate's moving
    /// average over ~2 s).
    pub source: &'static str,
}

impl RateEstimate {
    /// Raw bytes/s the migration moves at this estimate.
    pub fn raw_rate(&self) -> f64 {
        self.wire_rate_bytes_s * self.ratio
    }
}

/// What an ETA is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EtaInput {
    /// Guest RAM QEMU has still to send, bytes.
    pub remaining_bytes: u64,
    /// Guest RAM dirtied per second, bytes (QEMU's dirty-pages-rate times
    /// the page size); 0 when unknown.
    pub dirty_rate_bytes_s: f64,
    /// Guest RAM bytes processed per byte QEMU writes (>= 1; 1 when
    /// unknown).
    pub ram_per_byte: f64,
    /// Guest RAM dirtied behind the first pass that `remaining_bytes` does
    /// not count yet, bytes (0 when unknown or after the first pass).
    pub backlog_bytes: u64,
    /// During the first pass: the part of the dirty rate that lands behind
    /// the pass, bytes/s. What the guest rewrites ahead of the pass is sent
    /// once, at its new content, so only this part adds to the pass's work
    /// (None: all of it, as in every later pass).
    pub dirty_behind_bytes_s: Option<f64>,
    pub estimate: RateEstimate,
}

impl EtaInput {
    /// What is left, in content bytes: `remaining / ram_per_byte +
    /// backlog` (`ram_per_byte` counts as 1 when not a number >= 1), the
    /// first term less what the guest dirties ahead of the first pass.
    ///
    /// The series behind [`eta_s`] charges the whole dirty rate `d` over
    /// the rest of the first pass (`T1 = left / r` at raw rate `r`). Only
    /// the part behind the pass (`db`) is sent again, so the exact time is
    /// `T1 + (backlog + db * T1) / (r - d)`, which is the formula's with
    /// `left` scaled by `1 - (d - db) / r`.
    fn need_bytes(&self) -> f64 {
        let expand = if self.ram_per_byte.is_finite() && self.ram_per_byte >= 1.0 {
            self.ram_per_byte
        } else {
            1.0
        };
        let r = self.estimate.raw_rate();
        let ahead = match self.dirty_behind_bytes_s {
            Some(db) if r > 0.0 && db.is_finite() => {
                ((self.dirty_rate_bytes_s.max(0.0) - db.max(0.0)).max(0.0) / r).min(1.0)
            }
            _ => 0.0,
        };
        self.remaining_bytes as f64 / expand * (1.0 - ahead) + self.backlog_bytes as f64
    }
}

/// Seconds until the migration has sent what is left (module doc).
pub fn eta_s(i: &EtaInput) -> Option<f64> {
    let net = i.estimate.raw_rate() - i.dirty_rate_bytes_s.max(0.0);
    let eta = i.need_bytes() / net;
    (net > 0.0 && eta.is_finite()).then_some(eta)
}

/// How far ahead the rate estimate of an ETA is trusted, seconds: the
/// predictor's horizon (its 5-s mean).
pub const ESTIMATE_HORIZON_S: f64 = 5.0;

/// [`eta_s`] when the migration has longer to go than the estimate's
/// horizon ([`ESTIMATE_HORIZON_S`]): the estimated rate for the horizon,
/// the session's mean wire rate since its start (`mean_wire`) beyond it.
/// A rate predicted for the next seconds says nothing about the minute
/// after: an FCC trace that fell to a third of its mean for five seconds
/// made the ETA read hundreds of seconds for a migration that had 15 left
/// (+938 % at 50 %; docs/adaptivity.md). Solving
/// `need = H * (p * ratio - d) + (T - H) * (m * ratio - d)` for `T`:
///
/// ```text
/// T = (need - H * ratio * (p - m)) / (m * ratio - d)
/// ```
///
/// with `need = remaining / ram_per_byte + backlog`. Without a mean, or
/// when the migration would not converge at it, [`eta_s`].
pub fn eta_over_horizon(i: &EtaInput, mean_wire: Option<f64>) -> Option<f64> {
    let short = eta_s(i)?;
    let Some(m) = mean_wire.filter(|m| m.is_finite() && *m > 0.0) else {
        return Some(short);
    };
    if short <= ESTIMATE_HORIZON_S {
        return Some(short);
    }
    let need = i.need_bytes();
    let (p, ratio, d) = (
        i.estimate.wire_rate_bytes_s,
        i.estimate.ratio,
        i.dirty_rate_bytes_s.max(0.0),
    );
    let net = m * ratio - d;
    let t = (need - ESTIMATE_HORIZON_S * ratio * (p - m)) / net;
    Some(if net > 0.0 && t.is_finite() && t >= ESTIMATE_HORIZON_S {
        t
    } else {
        short
    })
}

/// The measured rate: moving averages (time constant [`RATE_TAU_S`]) of the
/// wire rate the peer delivered and of the compression ratio, from the
/// link samples; idle samples before the first byte do not count.
///
/// The ratio is that of the averaged raw and wire rates, not an average of
/// each sample's ratio: a second that crosses zero pages carries a few
/// bytes of QEMU headers that compress fifty-fold, and averaging ratios
/// let it count as much as a second of content (the ETA then expected the
/// dirtied pages after the first pass to cross at that ratio: -80 % at
/// 75 % of an FCC replay; docs/adaptivity.md).
#[derive(Debug, Clone, Default)]
pub struct MeasuredRate {
    rate: Option<f64>,
    raw: Option<f64>,
    wire: Option<f64>,
}

impl MeasuredRate {
    /// Takes one sample.
    pub fn push(&mut self, s: &LinkSample) {
        let r = s.delivered_rate_bytes_s.max(0.0);
        if self.rate.is_none() && r == 0.0 {
            return;
        }
        let a = 1.0 - (-s.interval_s / RATE_TAU_S).exp();
        let avg = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + a * (new - o)));
        self.rate = avg(self.rate, r);
        if s.ratio.is_some_and(|q| q.is_finite() && q > 0.0)
            && s.wire_rate_bytes_s > 0.0
            && s.raw_rate_bytes_s.is_finite()
        {
            self.raw = avg(self.raw, s.raw_rate_bytes_s);
            self.wire = avg(self.wire, s.wire_rate_bytes_s);
        }
    }

    /// The estimate, once a byte was delivered.
    pub fn estimate(&self) -> Option<RateEstimate> {
        Some(RateEstimate {
            wire_rate_bytes_s: self.rate?,
            ratio: match (self.raw, self.wire) {
                (Some(r), Some(w)) if w > 0.0 && r > 0.0 => r / w,
                _ => 1.0,
            },
            source: "measured",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(rate: f64, ratio: f64) -> RateEstimate {
        RateEstimate {
            wire_rate_bytes_s: rate,
            ratio,
            source: "test",
        }
    }

    #[test]
    fn eta_is_what_is_left_over_the_net_raw_rate() {
        let i = |remaining, dirty, e| EtaInput {
            remaining_bytes: remaining,
            dirty_rate_bytes_s: dirty,
            ram_per_byte: 1.0,
            backlog_bytes: 0,
            dirty_behind_bytes_s: None,
            estimate: e,
        };
        // 100 MB at 10 MB/s wire x 2 = 20 MB/s raw, 4 MB/s dirtied: 6.25 s
        assert_eq!(eta_s(&i(100_000_000, 4e6, est(10e6, 2.0))), Some(6.25));
        assert_eq!(eta_s(&i(100, 0.0, est(10.0, 1.0))), Some(10.0));
        // not converging, or no rate: no ETA
        assert_eq!(eta_s(&i(100, 20.0, est(10.0, 2.0))), None);
        assert_eq!(eta_s(&i(100, 0.0, est(0.0, 2.0))), None);
        assert_eq!(eta_s(&i(100, 0.0, est(f64::NAN, 2.0))), None);
        // a negative dirty rate counts as none
        assert_eq!(eta_s(&i(100, -5.0, est(10.0, 1.0))), Some(10.0));
        assert_eq!(eta_s(&i(0, 0.0, est(10.0, 1.0))), Some(0.0));
        // zero pages: 3 RAM bytes per byte QEMU writes
        let mut x = i(120, 0.0, est(10.0, 2.0));
        x.ram_per_byte = 3.0;
        assert_eq!(eta_s(&x), Some(2.0));
        x.ram_per_byte = f64::NAN;
        assert_eq!(eta_s(&x), Some(6.0), "unknown: 1");
        // the dirtied pages are content: 120 / (3 x (20 - 5)) = 2.67 s
        x.ram_per_byte = 3.0;
        x.dirty_rate_bytes_s = 5.0;
        assert!((eta_s(&x).unwrap() - 120.0 / 45.0).abs() < 1e-9);
        // 15 bytes dirtied behind the first pass: (40 + 15) / 15
        x.backlog_bytes = 15;
        assert!((eta_s(&x).unwrap() - 55.0 / 15.0).abs() < 1e-9);
        // Of the 5 B/s dirtied, 2 land behind the pass: the 40 left take
        // 40 / 20 = 2 s, and then the backlog plus what those 2 s left
        // behind, (15 + 4) at 15 B/s: 2 + 19 / 15.
        x.dirty_behind_bytes_s = Some(2.0);
        let exact = 2.0 + 19.0 / 15.0;
        assert!((eta_s(&x).unwrap() - exact).abs() < 1e-9, "{:?}", eta_s(&x));
        // all of it behind: the formula as before
        x.dirty_behind_bytes_s = Some(5.0);
        assert!((eta_s(&x).unwrap() - 55.0 / 15.0).abs() < 1e-9);
    }

    #[test]
    fn beyond_the_horizon_the_session_mean_rate_counts() {
        let i = EtaInput {
            remaining_bytes: 150_000_000,
            dirty_rate_bytes_s: 0.0,
            ram_per_byte: 1.0,
            backlog_bytes: 0,
            dirty_behind_bytes_s: None,
            // a dip: 4 MB/s predicted for the next 5 s, at ratio 1
            estimate: est(4e6, 1.0),
        };
        assert_eq!(eta_s(&i), Some(37.5));
        // the session averaged 12 MB/s: 20 MB in the dip's 5 s, the other
        // 130 MB at 12 MB/s: 5 + 10.83 s
        let t = eta_over_horizon(&i, Some(12e6)).unwrap();
        assert!((t - (5.0 + 130.0 / 12.0)).abs() < 1e-9, "{t}");
        // no mean, or a short ETA: the estimate alone
        assert_eq!(eta_over_horizon(&i, None), Some(37.5));
        let short = EtaInput {
            remaining_bytes: 12_000_000,
            ..i
        };
        assert_eq!(eta_over_horizon(&short, Some(12e6)), Some(3.0));
        // a mean the dirty rate outruns: the estimate alone
        let dirty = EtaInput {
            dirty_rate_bytes_s: 1e6,
            estimate: est(20e6, 1.0),
            ..i
        };
        assert_eq!(eta_over_horizon(&dirty, Some(0.5e6)), eta_s(&dirty));
        // unknown short-term rate: none
        let none = EtaInput {
            estimate: est(0.0, 1.0),
            ..i
        };
        assert_eq!(eta_over_horizon(&none, Some(12e6)), None);
    }

    #[test]
    fn the_measured_rate_follows_the_delivered_rate() {
        let sample = |rate: f64, ratio: Option<f64>| LinkSample {
            at_s: 0.0,
            interval_s: 0.5,
            rtt_us: None,
            min_rtt_us: None,
            capacity_bytes_s: None,
            rate_floor_bytes_s: rate,
            link_bound: 0.0,
            wire_rate_bytes_s: rate,
            raw_rate_bytes_s: rate * ratio.unwrap_or(0.0),
            delivered_rate_bytes_s: rate,
            ratio,
            loss: None,
            retrans_segments: 0,
            dsack_segments: 0,
            segments_out: 0,
            sent_bytes: 0,
            cwnd_segments: 0,
            inflight_bytes: 0,
            codec_cpu: 0.0,
            window_rate_bytes_s: None,
            rwnd_limited: 0.0,
        };
        let mut m = MeasuredRate::default();
        m.push(&sample(0.0, None));
        assert_eq!(m.estimate(), None, "idle before the first byte");
        m.push(&sample(10e6, Some(2.0)));
        assert_eq!(m.estimate().unwrap().wire_rate_bytes_s, 10e6);
        for _ in 0..20 {
            m.push(&sample(20e6, Some(3.0)));
        }
        let e = m.estimate().unwrap();
        assert!((e.wire_rate_bytes_s - 20e6).abs() < 0.01 * 20e6, "{e:?}");
        assert!((e.ratio - 3.0).abs() < 0.03, "{e:?}");
        // after two time constants of a new rate, most of the way there
        for _ in 0..8 {
            m.push(&sample(10e6, None));
        }
        let e = m.estimate().unwrap();
        assert!(
            e.wire_rate_bytes_s < 12e6 && e.wire_rate_bytes_s > 10e6,
            "{e:?}"
        );
        assert!(
            (e.ratio - 3.0).abs() < 0.03,
            "ratio kept without traffic data"
        );
        // A second of zero-page headers (a few bytes, compressing 50-fold)
        // barely moves it: the ratio is of the bytes, not of the samples.
        let mut zeros = sample(20e3, Some(50.0));
        zeros.interval_s = 1.0;
        m.push(&zeros);
        let e = m.estimate().unwrap();
        assert!((e.ratio - 3.0).abs() < 0.1, "{e:?}");
    }
}
