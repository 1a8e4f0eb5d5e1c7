//! The mode detector: datacenter, hybrid or internet, from the link samples.
//!
//! Each sample gets a verdict per metric, with the seed's thresholds:
//!
//! | metric | datacenter | hybrid | internet |
//! | --- | --- | --- | --- |
//! | latency (lowest smoothed RTT) | < 10 ms | 10 ..< 50 ms | >= 50 ms |
//! | capacity | >= 1 Gbit/s | | < 1 Gbit/s |
//! | loss (lost / sent segments) | <= 0.01 % | 0.01 ..< 1 % | >= 1 % |
//!
//! and the sample's verdict is the worst of the metrics that voted. A metric
//! without data does not vote: capacity votes "internet" only from a
//! measured capacity (a stream limited by its congestion window, see
//! [`super::sample`]), never from the application's own send rate, and votes
//! "datacenter" when even the rate floor reaches the threshold. Loss votes
//! from the samples of the last [`LOSS_WINDOW_S`] taken on the same path
//! (RTT within a factor of two), once they sent enough segments for the
//! datacenter threshold to mean three lost segments (30,000 at 0.01 %): one
//! spurious retransmission in a 500 ms sample is noise, not a lossy path.
//! A capacity measurement stands for
//! [`CAPACITY_HOLD_S`] while the RTT stays within a factor of two (or
//! [`SAME_PATH_SLACK_US`]) of the RTT it was measured at, and the path does
//! not carry half as much again (a link that goes idle keeps its last known
//! capacity; a path that changed does not).
//!
//! Three filters keep the mode from flapping:
//! - **hysteresis**: a threshold next to the current mode moves 20 % in its
//!   favour (in datacenter mode, latency must reach 12 ms to leave it; in
//!   hybrid, fall under 8 ms to come back);
//! - **confidence**: a switch needs the new mode in at least 60 % of the
//!   samples of the last [`WINDOW_S`] (at least three samples);
//! - **dwell**: no switch within 2 s of the previous one.
//!
//! Everything is configurable ([`ModeConfig`]).

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use super::sample::LinkSample;

/// How far back the confidence looks, seconds.
pub const WINDOW_S: f64 = 1.5;
/// How long a measured capacity stands without a new measurement, seconds.
/// Long: a path measured slow stays slow while it looks the same (RTT) and
/// carries no more than was measured (module doc); a 100 Mbit/s LAN is the
/// bottleneck only now and then, and with a short hold its mode flapped
/// between datacenter (latency) and internet (capacity) every few seconds.
pub const CAPACITY_HOLD_S: f64 = 30.0;

/// Two RTTs this close are the same path whatever their ratio (queueing on
/// a fast path moves a 0.1 ms RTT to several ms), microseconds.
pub const SAME_PATH_SLACK_US: u32 = 5000;
/// How far back the loss figure adds samples up, seconds.
pub const LOSS_WINDOW_S: f64 = 5.0;
/// Most recent switches a report keeps.
pub const HISTORY: usize = 16;

/// What kind of path a session runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkMode {
    Datacenter,
    Hybrid,
    Internet,
}

impl LinkMode {
    /// The mode's name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkMode::Datacenter => "datacenter",
            LinkMode::Hybrid => "hybrid",
            LinkMode::Internet => "internet",
        }
    }

    /// Every mode, best path first.
    pub const ALL: [LinkMode; 3] = [LinkMode::Datacenter, LinkMode::Hybrid, LinkMode::Internet];
}

impl std::fmt::Display for LinkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LinkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "datacenter" | "dc" => Ok(LinkMode::Datacenter),
            "hybrid" => Ok(LinkMode::Hybrid),
            "internet" => Ok(LinkMode::Internet),
            _ => Err(format!("{s:?}: expected datacenter, hybrid or internet")),
        }
    }
}

/// The detector's thresholds and filters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeConfig {
    /// A fixed mode (`mode = datacenter|hybrid|internet`): no detection.
    pub fixed: Option<LinkMode>,
    /// Latency under which a path is datacenter, ms.
    pub dc_rtt_ms: f64,
    /// Latency from which a path is internet, ms.
    pub internet_rtt_ms: f64,
    /// Capacity from which a path is datacenter (below: internet), Mbit/s.
    pub dc_mbit: f64,
    /// Loss up to which a path is datacenter, fraction (0.0001 = 0.01 %).
    pub dc_loss: f64,
    /// Loss from which a path is internet, fraction.
    pub internet_loss: f64,
    /// How far a threshold next to the current mode moves in its favour,
    /// fraction (0.2 = 20 %).
    pub hysteresis: f64,
    /// Shortest time between two switches.
    pub dwell: Duration,
    /// Share of the recent samples that must agree on a new mode, fraction.
    pub confidence: f64,
}

impl Default for ModeConfig {
    fn default() -> Self {
        ModeConfig {
            fixed: None,
            dc_rtt_ms: 10.0,
            internet_rtt_ms: 50.0,
            dc_mbit: 1000.0,
            dc_loss: 0.0001,
            internet_loss: 0.01,
            hysteresis: 0.2,
            dwell: Duration::from_secs(2),
            confidence: 0.6,
        }
    }
}

impl ModeConfig {
    /// Checks that the thresholds are ordered; the error names the options.
    pub fn check(&self) -> Result<(), String> {
        if self.dc_rtt_ms >= self.internet_rtt_ms {
            return Err(format!(
                "mode-dc-rtt-ms ({}) must be below mode-internet-rtt-ms ({})",
                self.dc_rtt_ms, self.internet_rtt_ms
            ));
        }
        if self.dc_loss >= self.internet_loss {
            return Err(format!(
                "mode-dc-loss-pct ({}) must be below mode-internet-loss-pct ({})",
                self.dc_loss * 100.0,
                self.internet_loss * 100.0
            ));
        }
        Ok(())
    }
}

/// One metric's verdicts on a sample (None: no vote).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Votes {
    pub latency: Option<LinkMode>,
    pub capacity: Option<LinkMode>,
    pub loss: Option<LinkMode>,
}

impl Votes {
    /// The worst mode any metric voted for.
    pub fn overall(&self) -> Option<LinkMode> {
        [self.latency, self.capacity, self.loss]
            .into_iter()
            .flatten()
            .max()
    }
}

/// One mode switch, with the figures that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModeSwitch {
    /// Seconds since the session started.
    pub at_s: f64,
    /// None: the first mode of the session.
    pub from: Option<LinkMode>,
    pub to: LinkMode,
    /// The triggering sample's lowest smoothed RTT, ms.
    pub rtt_ms: Option<f64>,
    /// The capacity the detector used, Mbit/s (measured or held).
    pub capacity_mbit: Option<f64>,
    /// The loss the detector used (recent samples of the same path), percent.
    pub loss_pct: Option<f64>,
    /// Share of the recent samples for `to`.
    pub confidence: f64,
}

impl std::fmt::Display for ModeSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<f64>, d: usize| match v {
            Some(v) => format!("{v:.d$}"),
            None => "?".into(),
        };
        write!(
            f,
            "{} -> {} at {:.1} s (rtt {} ms, capacity {} Mbit/s, loss {} %, confidence {:.0} %)",
            self.from.map(LinkMode::as_str).unwrap_or("none"),
            self.to,
            self.at_s,
            opt(self.rtt_ms, 2),
            opt(self.capacity_mbit, 0),
            opt(self.loss_pct, 3),
            self.confidence * 100.0
        )
    }
}

/// What `stats` shows of the detector.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModeReport {
    /// The current mode; None before the first sample with a vote.
    pub mode: Option<LinkMode>,
    /// Set by configuration (`mode = ...`), not detected.
    pub fixed: bool,
    /// Since when (seconds since the session started).
    pub since_s: f64,
    /// Switches after the first mode.
    pub switches: u32,
    /// Share of the recent samples that agree with the current mode.
    pub confidence: f64,
    /// The newest sample's votes.
    pub votes: Votes,
    /// The latest switches (at most [`HISTORY`]), oldest first.
    pub history: Vec<ModeSwitch>,
}

/// Datacenter / hybrid / internet from successive samples (module doc).
#[derive(Debug)]
pub struct ModeDetector {
    cfg: ModeConfig,
    current: Option<LinkMode>,
    since_s: f64,
    /// The verdicts of the last samples (None: no metric voted).
    window: VecDeque<Option<LinkMode>>,
    window_len: usize,
    /// Last measured capacity: (at_s, bytes/s, RTT µs then).
    held: Option<(f64, f64, Option<u32>)>,
    /// Recent samples' (at_s, retransmitted, DSACKed, segments sent, RTT µs).
    losses: VecDeque<(f64, u32, u32, u32, Option<u32>)>,
    report: ModeReport,
}

/// Whether two RTTs look like the same path (within a factor of two, or
/// of [`SAME_PATH_SLACK_US`]).
fn same_path(a: Option<u32>, b: Option<u32>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            let (x, y) = (a as f64, b as f64);
            (y <= 2.0 * x && x <= 2.0 * y) || a.abs_diff(b) <= SAME_PATH_SLACK_US
        }
        _ => true,
    }
}

impl ModeDetector {
    /// A detector for samples every `interval`.
    pub fn new(cfg: ModeConfig, interval: Duration) -> Self {
        let window_len = ((WINDOW_S / interval.as_secs_f64().max(1e-3)).round() as usize).max(3);
        let report = ModeReport {
            mode: cfg.fixed,
            fixed: cfg.fixed.is_some(),
            confidence: if cfg.fixed.is_some() { 1.0 } else { 0.0 },
            ..Default::default()
        };
        ModeDetector {
            current: cfg.fixed,
            cfg,
            since_s: 0.0,
            window: VecDeque::new(),
            window_len,
            held: None,
            losses: VecDeque::new(),
            report,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Option<LinkMode> {
        self.current
    }

    /// What `stats` shows.
    pub fn report(&self) -> &ModeReport {
        &self.report
    }

    /// A threshold between `better` and the next mode, moved by the
    /// hysteresis in favour of the current mode: up when the current mode
    /// is `better` or better (`higher_is_worse`: latency, loss), down
    /// otherwise; the other way round for capacity.
    fn edge(&self, t: f64, better: LinkMode, higher_is_worse: bool) -> f64 {
        let h = self.cfg.hysteresis;
        match self.current {
            None => t,
            Some(c) if (c <= better) == higher_is_worse => t * (1.0 + h),
            Some(_) => t * (1.0 - h),
        }
    }

    /// The loss over the recent samples of the same path, once they sent
    /// enough segments (module doc). Retransmissions and the peer's DSACKs
    /// are added up separately before one is taken from the other: the
    /// DSACK that shows a retransmission was spurious comes back a round
    /// trip later, often in the next sample (seen on the bridge: 914
    /// retransmitted and 110 DSACKed in one sample, 21 and 3,004 in the
    /// next), so subtracting per sample counted spurious retransmissions
    /// as losses.
    fn loss(&mut self, s: &LinkSample) -> Option<f64> {
        if s.segments_out > 0 || s.dsack_segments > 0 {
            self.losses.push_back((
                s.at_s,
                s.retrans_segments,
                s.dsack_segments,
                s.segments_out,
                s.rtt_us,
            ));
        }
        while self
            .losses
            .front()
            .is_some_and(|l| s.at_s - l.0 > LOSS_WINDOW_S)
        {
            self.losses.pop_front();
        }
        let (retrans, dsack, segs) = self
            .losses
            .iter()
            .filter(|l| same_path(l.4, s.rtt_us))
            .fold((0u64, 0u64, 0u64), |(r, d, n), l| {
                (r + l.1 as u64, d + l.2 as u64, n + l.3 as u64)
            });
        let lost = retrans.saturating_sub(dsack);
        let need = (3.0 / self.cfg.dc_loss.max(1e-9)).clamp(1000.0, 100_000.0);
        (segs as f64 >= need).then(|| lost as f64 / segs as f64)
    }

    /// The verdict of each metric on `s`, and the capacity (bytes/s) and
    /// loss (fraction) it used.
    pub fn votes(&mut self, s: &LinkSample) -> (Votes, Option<f64>, Option<f64>) {
        use LinkMode::*;
        let three = |v: f64, e1: f64, e2: f64, dc_inclusive: bool| {
            if v < e1 || (dc_inclusive && v <= e1) {
                Datacenter
            } else if v < e2 {
                Hybrid
            } else {
                Internet
            }
        };
        let latency = s.rtt_us.map(|r| {
            three(
                r as f64 / 1000.0,
                self.edge(self.cfg.dc_rtt_ms, Datacenter, true),
                self.edge(self.cfg.internet_rtt_ms, Hybrid, true),
                false,
            )
        });
        let loss_used = self.loss(s);
        let loss = loss_used.map(|l| {
            three(
                l,
                self.edge(self.cfg.dc_loss, Datacenter, true),
                self.edge(self.cfg.internet_loss, Hybrid, true),
                true,
            )
        });
        if let Some(c) = s.capacity_bytes_s {
            self.held = Some((s.at_s, c, s.rtt_us));
        } else if self
            .held
            .is_some_and(|(_, c, _)| s.rate_floor_bytes_s > 1.5 * c)
        {
            // The path carries more than was measured: it changed.
            self.held = None;
        }
        let held = self
            .held
            .filter(|(at, _, rtt)| s.at_s - at <= CAPACITY_HOLD_S && same_path(*rtt, s.rtt_us));
        let edge = self.edge(self.cfg.dc_mbit * 1e6 / 8.0, Datacenter, false);
        let (capacity, used) = if s.rate_floor_bytes_s >= edge {
            (Some(Datacenter), Some(s.rate_floor_bytes_s))
        } else if let Some((_, c, _)) = held {
            (Some(if c >= edge { Datacenter } else { Internet }), Some(c))
        } else {
            (None, None)
        };
        (
            Votes {
                latency,
                capacity,
                loss,
            },
            used,
            loss_used,
        )
    }

    /// Takes one sample; returns the switch it caused, if any.
    pub fn push(&mut self, s: &LinkSample) -> Option<ModeSwitch> {
        let (votes, capacity, loss) = self.votes(s);
        self.report.votes = votes;
        if self.cfg.fixed.is_some() {
            return None;
        }
        let verdict = votes.overall();
        if self.window.len() == self.window_len {
            self.window.pop_front();
        }
        self.window.push_back(verdict);
        let count = |m: LinkMode| self.window.iter().filter(|v| **v == Some(m)).count();
        let share = |n: usize| n as f64 / self.window.len().max(1) as f64;
        self.report.confidence = self.current.map(|m| share(count(m))).unwrap_or(0.0);
        // The most supported mode; a tie goes to the worse path.
        let best = LinkMode::ALL
            .into_iter()
            .map(|m| (count(m), m))
            .max()
            .filter(|(n, _)| *n > 0)?;
        let (n, candidate) = best;
        let switch = match self.current {
            // The first mode: from the first sample with a vote.
            None => verdict.map(|to| (to, 1.0)),
            Some(cur) if cur == candidate => None,
            Some(_) => {
                let confident =
                    self.window.len() >= self.window_len.min(3) && share(n) >= self.cfg.confidence;
                let dwelt = s.at_s - self.since_s >= self.cfg.dwell.as_secs_f64();
                (confident && dwelt).then_some((candidate, share(n)))
            }
        };
        let (to, confidence) = switch?;
        let sw = ModeSwitch {
            at_s: s.at_s,
            from: self.current,
            to,
            rtt_ms: s.rtt_us.map(|r| r as f64 / 1000.0),
            capacity_mbit: capacity.map(|c| c * 8.0 / 1e6),
            loss_pct: loss.map(|l| l * 100.0),
            confidence,
        };
        if self.current.is_some() {
            self.report.switches += 1;
            // What was measured before the switch describes the old path:
            // the samples between the real change and the switch (RTT
            // already low, retransmissions of what the old path dropped
            // still counted) must not vote on the new one. A capacity
            // measured on the path the switch was made on stays (it may be
            // what made it).
            self.losses.clear();
            self.held = self.held.filter(|h| same_path(h.2, s.rtt_us));
        }
        self.current = Some(to);
        self.since_s = s.at_s;
        self.report.mode = Some(to);
        self.report.since_s = s.at_s;
        self.report.confidence = confidence;
        if self.report.history.len() == HISTORY {
            self.report.history.remove(0);
        }
        self.report.history.push(sw);
        Some(sw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LinkMode::*;

    /// A sample at `at_s` of a path with this RTT (ms), capacity (Mbit/s,
    /// measured when Some) and loss (fraction).
    fn s(at_s: f64, rtt_ms: f64, capacity_mbit: Option<f64>, loss: Option<f64>) -> LinkSample {
        // 40,000 segments a sample: enough on its own for a loss figure
        let segs = if loss.is_some() { 40_000 } else { 0 };
        LinkSample {
            at_s,
            interval_s: 0.5,
            rtt_us: Some((rtt_ms * 1000.0) as u32),
            min_rtt_us: None,
            capacity_bytes_s: capacity_mbit.map(|c| c * 1e6 / 8.0),
            rate_floor_bytes_s: capacity_mbit.unwrap_or(10.0) * 1e6 / 8.0 * 0.9,
            link_bound: if capacity_mbit.is_some() { 1.0 } else { 0.0 },
            wire_rate_bytes_s: 0.0,
            raw_rate_bytes_s: 0.0,
            delivered_rate_bytes_s: 0.0,
            ratio: None,
            loss,
            retrans_segments: (loss.unwrap_or(0.0) * segs as f64).round() as u32,
            dsack_segments: 0,
            segments_out: segs,
            sent_bytes: 0,
            cwnd_segments: 0,
            inflight_bytes: 0,
            codec_cpu: 0.0,
            window_rate_bytes_s: None,
            rwnd_limited: 0.0,
        }
    }

    fn detector() -> ModeDetector {
        ModeDetector::new(ModeConfig::default(), Duration::from_millis(500))
    }

    /// Feeds `f(t)` every 0.5 s from `from` to `to` seconds; the switches.
    fn run(
        d: &mut ModeDetector,
        from: f64,
        to: f64,
        mut f: impl FnMut(f64) -> LinkSample,
    ) -> Vec<ModeSwitch> {
        let mut out = Vec::new();
        let mut t = from;
        while t < to + 1e-9 {
            out.extend(d.push(&f(t)));
            t += 0.5;
        }
        out
    }

    #[test]
    fn the_seed_thresholds_classify_each_metric() {
        // a fresh detector each: no mode yet, plain thresholds
        let v = |x: LinkSample| detector().votes(&x).0;
        assert_eq!(v(s(0.5, 0.2, None, None)).latency, Some(Datacenter));
        assert_eq!(v(s(0.5, 10.0, None, None)).latency, Some(Hybrid));
        assert_eq!(v(s(0.5, 49.0, None, None)).latency, Some(Hybrid));
        assert_eq!(v(s(0.5, 50.0, None, None)).latency, Some(Internet));
        assert_eq!(v(s(0.5, 1.0, None, Some(0.0001))).loss, Some(Datacenter));
        assert_eq!(v(s(0.5, 1.0, None, Some(0.001))).loss, Some(Hybrid));
        assert_eq!(v(s(0.5, 1.0, None, Some(0.01))).loss, Some(Internet));
        let x = v(s(0.5, 1.0, Some(999.0), None));
        assert_eq!(x.capacity, Some(Internet));
        assert_eq!(x.overall(), Some(Internet), "the worst metric wins");
        let x = v(s(0.5, 1.0, Some(2500.0), None));
        assert_eq!(x.capacity, Some(Datacenter));
    }

    #[test]
    fn loss_needs_enough_segments_and_the_same_path() {
        let mut d = detector();
        // 1 lost of 7,000: alone too few segments to say anything
        let mut x = s(0.5, 0.2, None, None);
        (x.retrans_segments, x.segments_out) = (1, 7000);
        assert_eq!(d.votes(&x).0.loss, None);
        // five such samples: 5 of 35,000 = 0.014 %: hybrid
        for k in 2..=5 {
            x.at_s = k as f64 * 0.5;
            d.votes(&x);
        }
        let (v, _, loss) = d.votes(&x);
        assert_eq!(v.loss, Some(Hybrid));
        assert!((loss.unwrap() - 6.0 / 42_000.0).abs() < 1e-12);
        // duplicates the peer reported (DSACK) are not losses
        let mut d = detector();
        (x.retrans_segments, x.dsack_segments, x.segments_out) = (40, 40, 40_000);
        assert_eq!(d.votes(&x).0.loss, Some(Datacenter));
        // another path (RTT 80 ms vs 0.2 ms): the old samples do not count
        let mut d = detector();
        let mut y = s(1.0, 80.0, None, Some(0.01));
        d.votes(&y);
        y = s(1.5, 0.2, None, None);
        (y.retrans_segments, y.segments_out) = (0, 5000);
        assert_eq!(d.votes(&y).0.loss, None);
    }

    #[test]
    fn dsacks_in_a_later_sample_excuse_earlier_retransmissions() {
        // The bridge under load: 20 spurious retransmissions in one sample,
        // their DSACKs a sample later. Per sample, 20 of 40,000 would read
        // 0.05 % (hybrid); over the window nothing was lost.
        let mut d = detector();
        let mut x = s(0.5, 0.2, None, None);
        (x.retrans_segments, x.dsack_segments, x.segments_out) = (20, 0, 40_000);
        assert_eq!(d.votes(&x).0.loss, Some(Hybrid));
        x.at_s = 1.0;
        (x.retrans_segments, x.dsack_segments, x.segments_out) = (0, 20, 40_000);
        let (v, _, loss) = d.votes(&x);
        assert_eq!(v.loss, Some(Datacenter));
        assert_eq!(loss, Some(0.0));
        // more DSACKs than retransmissions (duplicates the path itself
        // made, as while two routes overlap) never make loss negative
        x.at_s = 1.5;
        (x.retrans_segments, x.dsack_segments) = (0, 500);
        assert_eq!(d.votes(&x).2, Some(0.0));
    }

    #[test]
    fn an_idle_fast_link_is_not_internet() {
        // App-limited at 5 Mbit/s: no capacity measured, the floor proves
        // nothing, so only latency and loss vote.
        let mut d = detector();
        let sw = run(&mut d, 0.5, 10.0, |t| s(t, 0.1, None, None));
        assert_eq!(sw.len(), 1);
        assert_eq!((sw[0].from, sw[0].to), (None, Datacenter));
        assert_eq!(d.report().votes.capacity, None);
        // A fast floor is proof enough.
        let mut x = s(10.5, 0.1, None, None);
        x.rate_floor_bytes_s = 2e9 / 8.0;
        assert_eq!(d.votes(&x).0.capacity, Some(Datacenter));
    }

    #[test]
    fn a_change_switches_within_two_seconds_once() {
        let mut d = detector();
        let dc = |t: f64| s(t, 0.2, Some(5000.0), Some(0.0));
        let inet = |t: f64| s(t, 80.0, Some(95.0), Some(0.001));
        assert_eq!(run(&mut d, 0.5, 10.0, dc).len(), 1);
        let sw = run(&mut d, 10.5, 20.0, inet);
        assert_eq!(sw.len(), 1, "{sw:?}");
        assert_eq!(sw[0].to, Internet);
        assert!(sw[0].at_s - 10.0 <= 2.0, "{sw:?}");
        assert_eq!(d.report().switches, 1);
        let sw = run(&mut d, 20.5, 30.0, dc);
        assert_eq!(sw.len(), 1, "{sw:?}");
        assert_eq!(sw[0].to, Datacenter);
        assert!(sw[0].at_s - 20.0 <= 2.0, "{sw:?}");
        assert_eq!(d.report().switches, 2);
        assert_eq!(d.report().history.len(), 3);
    }

    #[test]
    fn noise_around_a_threshold_does_not_flap() {
        // RTT alternating 9 / 11 ms, every other sample a little over: the
        // hysteresis (12 ms to leave datacenter) holds the mode.
        let mut d = detector();
        let sw = run(&mut d, 0.5, 60.0, |t| {
            let odd = ((t * 2.0) as u64) % 2 == 1;
            s(t, if odd { 9.0 } else { 11.5 }, None, Some(0.0))
        });
        assert_eq!(sw.len(), 1, "{sw:?}");
        // Pseudo-random RTT in 40..60 ms around the internet threshold:
        // at most one switch, then the hysteresis (40 ms to come back).
        let mut d = detector();
        let mut x = 12345u64;
        let sw = run(&mut d, 0.5, 120.0, |t| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = 40.0 + ((x >> 33) % 2000) as f64 / 100.0;
            s(t, r, None, None)
        });
        assert!(sw.len() <= 2, "first mode plus at most one switch: {sw:?}");
        // Occasional spurious retransmissions (3 segments every third
        // sample, 0.0025 % over the window) never leave datacenter.
        let mut d = detector();
        let sw = run(&mut d, 0.5, 60.0, |t| {
            let bad = ((t * 2.0) as u64).is_multiple_of(3);
            let mut x = s(t, 0.2, None, Some(0.0));
            x.retrans_segments = if bad { 3 } else { 0 };
            x
        });
        assert_eq!(sw.len(), 1, "{sw:?}");
        // A latency spike in one sample of three (a preempted host) does
        // not switch either: under the 60 % confidence.
        let mut d = detector();
        let sw = run(&mut d, 0.5, 60.0, |t| {
            let bad = ((t * 2.0) as u64).is_multiple_of(3);
            s(t, if bad { 70.0 } else { 0.2 }, None, None)
        });
        assert_eq!(sw.len(), 1, "{sw:?}");
    }

    #[test]
    fn dwell_holds_a_new_mode() {
        let mut d = ModeDetector::new(
            ModeConfig {
                dwell: Duration::from_secs(5),
                ..Default::default()
            },
            Duration::from_millis(500),
        );
        run(&mut d, 0.5, 5.0, |t| s(t, 0.2, None, None));
        let sw = run(&mut d, 5.5, 7.0, |t| s(t, 80.0, None, None));
        assert_eq!(sw.len(), 1);
        // back at once: held until 5 s after the switch
        let sw = run(&mut d, 7.5, 20.0, |t| s(t, 0.2, None, None));
        assert_eq!(sw.len(), 1);
        assert!(sw[0].at_s >= d.report().history[1].at_s + 5.0, "{sw:?}");
    }

    #[test]
    fn capacity_is_held_while_the_path_looks_the_same() {
        let mut d = detector();
        // 1 ms, measured 100 Mbit/s: internet.
        run(&mut d, 0.5, 3.0, |t| s(t, 1.0, Some(100.0), None));
        assert_eq!(d.mode(), Some(Internet));
        // Idle for 3 s at the same RTT: still internet (capacity held).
        assert!(run(&mut d, 3.5, 6.0, |t| s(t, 1.0, None, None)).is_empty());
        // Past the hold: latency alone says datacenter.
        let sw = run(&mut d, 6.5, 40.0, |t| s(t, 1.0, None, None));
        assert_eq!(sw.len(), 1);
        assert_eq!(sw[0].to, Datacenter);
        assert!(sw[0].at_s > 30.0, "{sw:?}");
        // Carrying half as much again as measured drops it at once.
        let mut d = detector();
        run(&mut d, 0.5, 3.0, |t| s(t, 1.0, Some(100.0), None));
        let sw = run(&mut d, 3.5, 8.0, |t| {
            let mut x = s(t, 1.0, None, None);
            x.rate_floor_bytes_s = 160e6 / 8.0;
            x
        });
        assert_eq!(sw.len(), 1);
        assert_eq!(sw[0].to, Datacenter);
        // A measured capacity is dropped when the RTT changes 2x.
        let mut d = detector();
        run(&mut d, 0.5, 3.0, |t| s(t, 80.0, Some(100.0), None));
        let sw = run(&mut d, 3.5, 6.0, |t| s(t, 0.2, None, None));
        assert_eq!(sw.len(), 1);
        assert!(sw[0].at_s <= 5.0, "{sw:?}");
    }

    #[test]
    fn a_fast_lan_measured_slow_now_and_then_does_not_flap() {
        // 100 Mbit/s without delay: RTT 1-5 ms with queueing, capacity
        // measured only every 4-7 s (the link the bottleneck now and then).
        let mut d = detector();
        let sw = run(&mut d, 0.5, 60.0, |t| {
            let rtt = [1.2, 4.4, 2.2, 4.8][(t * 2.0) as usize % 4];
            let measured = [9.0, 13.0, 20.0, 24.5, 31.0, 38.0, 42.0, 49.5, 55.0]
                .iter()
                .any(|m| (t - m).abs() < 0.01);
            s(t, rtt, measured.then_some(95.0), None)
        });
        // datacenter by latency first, then internet by capacity, once
        assert_eq!(sw.len(), 2, "{sw:?}");
        assert_eq!((sw[0].to, sw[1].to), (Datacenter, Internet));
    }

    #[test]
    fn a_switch_forgets_the_old_paths_loss_and_capacity() {
        let mut d = detector();
        // A 100 Mbit/s path at 30 ms with 0.15 % loss: internet by capacity.
        let slow = |t: f64| s(t, 30.0, Some(95.0), Some(0.0015));
        assert_eq!(run(&mut d, 0.5, 10.0, slow).len(), 1);
        assert!(d.held.is_some() && !d.losses.is_empty());
        // It becomes a 35 ms path (the same path by RTT) with 5 Gbit/s: the
        // capacity vote turns datacenter, latency hybrid.
        let fast = |t: f64| s(t, 35.0, Some(5000.0), None);
        let sw = run(&mut d, 10.5, 14.0, fast);
        assert_eq!(sw.len(), 1, "{sw:?}");
        assert_eq!(sw[0].to, Hybrid);
        // The switch dropped the old path's loss samples (the switching
        // sample itself carried none) and its capacity: the 5 Gbit/s
        // measurements since are the only ones.
        let switched_at = sw[0].at_s;
        assert!(d.losses.iter().all(|l| l.0 > switched_at), "{:?}", d.losses);
        assert!(d.held.is_none_or(|h| h.0 > switched_at));
    }

    #[test]
    fn a_fixed_mode_never_switches() {
        let mut d = ModeDetector::new(
            ModeConfig {
                fixed: Some(Hybrid),
                ..Default::default()
            },
            Duration::from_millis(500),
        );
        assert_eq!(d.mode(), Some(Hybrid));
        assert!(run(&mut d, 0.5, 10.0, |t| s(t, 80.0, Some(10.0), None)).is_empty());
        assert!(d.report().fixed);
        assert_eq!(d.report().votes.latency, Some(Internet));
    }

    #[test]
    fn thresholds_must_be_ordered() {
        let c = ModeConfig {
            dc_rtt_ms: 60.0,
            ..Default::default()
        };
        assert!(c.check().unwrap_err().contains("mode-dc-rtt-ms"));
        assert!(ModeConfig::default().check().is_ok());
    }
}
