//! Link configuration: per-direction shaping parameters, named profiles,
//! bandwidth traces and the small parsers the CLI uses.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// How long the drop-tail queue in front of the rate limiter may get.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QueueLimit {
    /// Fixed number of (wire) bytes.
    Bytes(u64),
    /// This much time at the *current* rate (follows a trace).
    Time(Duration),
    /// One bandwidth-delay product: current rate x (2 x one-way delay), at
    /// least [`MIN_QUEUE_BYTES`].
    Bdp,
}

/// Lower bound of an automatic (BDP / time based) queue.
pub const MIN_QUEUE_BYTES: u64 = 32 * 1514;

/// Shaping for one direction of the link.
#[derive(Debug, Clone)]
pub struct DirConfig {
    /// One-way propagation delay added after serialization.
    pub delay: Duration,
    /// Uniform jitter in `[-jitter, +jitter]` added to the delay (bounded:
    /// the delay never gets negative). Packet order is always preserved: a
    /// packet never leaves before the one received before it.
    pub jitter: Duration,
    /// Constant rate in bit/s; `None` = unlimited (unless `trace` is set).
    pub rate_bps: Option<u64>,
    /// Bandwidth trace; overrides `rate_bps` when set.
    pub trace: Option<Arc<Trace>>,
    /// Drop-tail queue in front of the rate limiter (ignored when unlimited).
    pub queue: QueueLimit,
    /// Random loss probability in `[0, 1]`, applied on arrival.
    pub loss: f64,
    /// Extra bytes per frame for rate accounting (the frame length as
    /// AF_PACKET sees it, i.e. Ethernet header + payload, is always counted;
    /// 24 would add preamble, SFD, FCS and inter-frame gap).
    pub overhead: u32,
}

impl Default for DirConfig {
    fn default() -> Self {
        DirConfig {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bps: None,
            trace: None,
            queue: QueueLimit::Bdp,
            loss: 0.0,
            overhead: 0,
        }
    }
}

impl DirConfig {
    /// Is there any rate limit (constant or trace)?
    pub fn shaped(&self) -> bool {
        self.rate_bps.is_some() || self.trace.is_some()
    }

    /// Rate in bit/s at `t` seconds since the start of the forwarder
    /// (`f64::INFINITY` when unlimited).
    pub fn rate_at(&self, t: f64) -> f64 {
        match (&self.trace, self.rate_bps) {
            (Some(tr), _) => tr.rate_at(t),
            (None, Some(r)) => r as f64,
            (None, None) => f64::INFINITY,
        }
    }

    /// Queue limit in bytes at the given rate.
    pub fn queue_bytes(&self, rate_bps: f64) -> u64 {
        let at = |d: Duration| -> u64 {
            if !rate_bps.is_finite() {
                return u64::MAX;
            }
            ((rate_bps * d.as_secs_f64() / 8.0) as u64).max(MIN_QUEUE_BYTES)
        };
        match self.queue {
            QueueLimit::Bytes(b) => b,
            QueueLimit::Time(d) => at(d),
            QueueLimit::Bdp => at(self.delay * 2),
        }
    }
}

/// Configuration of the whole link (both directions) and the forwarder.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Frames received on port a, sent on port b (src -> dst in a topology).
    pub a_to_b: DirConfig,
    /// Frames received on port b, sent on port a (dst -> src).
    pub b_to_a: DirConfig,
    /// Seed for loss and jitter (each direction derives its own stream).
    pub seed: u64,
    /// Packet slots per direction (ring of `slot_size` byte buffers holding
    /// everything queued or in flight). Full ring = drop (`dropped_full`).
    pub ring_slots: usize,
    /// Largest frame accepted (bytes); bigger ones are dropped and counted.
    pub slot_size: usize,
    /// Max frames per recvmmsg/sendmmsg call.
    pub batch: usize,
    /// Frames due within this window are sent together (fewer wake-ups);
    /// this is the worst-case "early" error of a departure time.
    pub send_window: Duration,
    /// Receive moderation: after reading frames, wait this long before the
    /// next read (frames are timestamped by the kernel on arrival, so this
    /// only saves wake-ups; capped at half the direction's delay).
    pub rx_moderation: Duration,
    /// Run the forwarder threads SCHED_FIFO (if permitted), so a busy
    /// machine does not add scheduling delay to the emulated link.
    pub realtime: bool,
    /// If set, `run` writes the counters as JSON here every second and on
    /// exit.
    pub stats_file: Option<PathBuf>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            a_to_b: DirConfig::default(),
            b_to_a: DirConfig::default(),
            seed: 1,
            ring_slots: 16384,
            slot_size: 2048,
            batch: 64,
            send_window: Duration::from_micros(50),
            rx_moderation: Duration::from_micros(100),
            realtime: true,
            stats_file: None,
        }
    }
}

impl LinkConfig {
    /// Same shaping in both directions.
    pub fn symmetric(dir: DirConfig) -> Self {
        LinkConfig {
            a_to_b: dir.clone(),
            b_to_a: dir,
            ..Default::default()
        }
    }

    /// Apply `f` to both directions (builder style).
    pub fn both(mut self, f: impl Fn(&mut DirConfig)) -> Self {
        f(&mut self.a_to_b);
        f(&mut self.b_to_a);
        self
    }
}

/// Named link profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Unshaped (a kernel bridge in a topology; see `Profile::middle`).
    Dc,
    /// 1 Gbit/s, 50 ms RTT, 0.01 % loss per direction.
    Wan,
    /// 100 Mbit/s, 80 ms RTT, 0.1 % loss per direction.
    Internet,
    /// 50 Mbit/s, 150 ms RTT, 1 % loss per direction.
    Lossy,
    /// 100 Mbit/s, no added delay, no loss (a fast-ethernet LAN; a queue of
    /// 5 ms). Issue 16's "100 Mbit/s link without delay".
    Lan100,
}

impl Profile {
    /// All profiles.
    pub const ALL: [Profile; 5] = [
        Profile::Dc,
        Profile::Wan,
        Profile::Internet,
        Profile::Lossy,
        Profile::Lan100,
    ];

    /// The profile's name.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Dc => "dc",
            Profile::Wan => "wan",
            Profile::Internet => "internet",
            Profile::Lossy => "lossy",
            Profile::Lan100 => "lan100",
        }
    }

    /// Forwarder configuration (for `dc`: an unshaped pass-through).
    pub fn config(self) -> LinkConfig {
        let (rate, rtt_ms, loss) = match self {
            Profile::Dc => return LinkConfig::default(),
            Profile::Wan => (1_000_000_000, 50, 0.0001),
            Profile::Internet => (100_000_000, 80, 0.001),
            Profile::Lossy => (50_000_000, 150, 0.01),
            Profile::Lan100 => {
                return LinkConfig::symmetric(DirConfig {
                    rate_bps: Some(100_000_000),
                    queue: QueueLimit::Time(Duration::from_millis(5)),
                    ..Default::default()
                })
            }
        };
        LinkConfig::symmetric(DirConfig {
            delay: Duration::from_millis(rtt_ms) / 2,
            rate_bps: Some(rate),
            loss,
            queue: QueueLimit::Bdp,
            ..Default::default()
        })
    }
}

impl FromStr for Profile {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| anyhow!("unknown profile {s:?} (dc, wan, internet, lossy, lan100)"))
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A bandwidth trace: steps of `(start time s, rate bit/s)`, repeated.
///
/// File format: one `time_s<TAB or spaces>Mbit/s` per line, `#` comments
/// and blank lines ignored, times strictly increasing and the first one 0.
/// Each line's rate holds until the next line's time; the last step lasts as
/// long as the step before it (exact for evenly sampled traces), then the
/// trace loops. A one-line trace is a constant rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    steps: Vec<(f64, f64)>,
    period: f64,
}

impl Trace {
    /// Build from `(time_s, Mbit/s)` steps.
    pub fn from_steps(steps_mbit: &[(f64, f64)]) -> Result<Trace> {
        if steps_mbit.is_empty() {
            bail!("empty trace");
        }
        if let Some(s) = steps_mbit.iter().find(|s| !s.0.is_finite()) {
            bail!("bad trace time {}", s.0);
        }
        if steps_mbit[0].0 != 0.0 {
            bail!("trace must start at time 0");
        }
        for w in steps_mbit.windows(2) {
            if w[1].0 <= w[0].0 {
                bail!("trace times must increase ({} after {})", w[1].0, w[0].0);
            }
        }
        if let Some(s) = steps_mbit.iter().find(|s| !(s.1.is_finite() && s.1 >= 0.0)) {
            bail!("bad trace rate {}", s.1);
        }
        let n = steps_mbit.len();
        let period = if n == 1 {
            f64::INFINITY
        } else {
            steps_mbit[n - 1].0 + (steps_mbit[n - 1].0 - steps_mbit[n - 2].0)
        };
        Ok(Trace {
            steps: steps_mbit.iter().map(|&(t, m)| (t, m * 1e6)).collect(),
            period,
        })
    }

    /// Parse the text of a trace file.
    pub fn parse(text: &str) -> Result<Trace> {
        let mut steps = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut it = line.split_whitespace();
            let (Some(t), Some(r), None) = (it.next(), it.next(), it.next()) else {
                bail!("trace line {}: expected `time_s<TAB>Mbit/s`", i + 1);
            };
            let t: f64 = t.parse().with_context(|| format!("trace line {}", i + 1))?;
            let r: f64 = r.parse().with_context(|| format!("trace line {}", i + 1))?;
            steps.push((t, r));
        }
        Trace::from_steps(&steps)
    }

    /// Read and parse a trace file.
    pub fn load(path: &Path) -> Result<Trace> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading trace {}", path.display()))?;
        Trace::parse(&text)
    }

    /// Loop length in seconds (infinite for a one-line trace).
    pub fn period(&self) -> f64 {
        self.period
    }

    /// Mean rate over one loop, bit/s (time-weighted).
    pub fn mean(&self) -> f64 {
        if !self.period.is_finite() {
            return self.steps[0].1;
        }
        let mut sum = 0.0;
        for (i, s) in self.steps.iter().enumerate() {
            let end = self.steps.get(i + 1).map_or(self.period, |n| n.0);
            sum += s.1 * (end - s.0);
        }
        sum / self.period
    }

    /// The same trace with every rate scaled so that its mean is `bit_s`
    /// (a trace whose mean is 0 stays as it is).
    pub fn scaled_to_mean(&self, bit_s: f64) -> Trace {
        let m = self.mean();
        let k = if m > 0.0 { bit_s / m } else { 1.0 };
        Trace {
            steps: self.steps.iter().map(|&(t, r)| (t, r * k)).collect(),
            period: self.period,
        }
    }

    /// Rate in bit/s at `t` seconds.
    pub fn rate_at(&self, t: f64) -> f64 {
        let t = if self.period.is_finite() {
            t.rem_euclid(self.period)
        } else {
            t
        };
        let i = self.steps.partition_point(|s| s.0 <= t);
        self.steps[i.saturating_sub(1)].1
    }
}

/// Parse a duration: `25ms`, `1.5s`, `300us`, `100ns`, bare number = ms.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, mult) = split_unit(s);
    let scale = match mult.to_ascii_lowercase().as_str() {
        "" | "ms" => 1e-3,
        "s" => 1.0,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        u => bail!("bad duration unit {u:?} in {s:?}"),
    };
    let v: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    if !(v.is_finite() && v >= 0.0) {
        bail!("bad duration {s:?}");
    }
    Duration::try_from_secs_f64(v * scale).map_err(|_| anyhow!("duration {s:?} is too long"))
}

/// Parse a rate into bit/s: `100mbit`, `1gbit`, `500kbit`, `1G`, bare = bit/s.
pub fn parse_rate(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = split_unit(s);
    let u = unit.to_ascii_lowercase();
    let u = ["bit/s", "bits", "bit", "bps"]
        .iter()
        .find_map(|suf| u.strip_suffix(suf))
        .unwrap_or(&u);
    let scale = match u {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        _ => bail!("bad rate unit {unit:?} in {s:?}"),
    };
    let v: f64 = num.parse().with_context(|| format!("bad rate {s:?}"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("bad rate {s:?}");
    }
    // A rate that rounds to 0 bit/s would stall the link for good.
    let bps = (v * scale).round();
    if bps < 1.0 {
        bail!("rate {s:?} is below 1 bit/s");
    }
    Ok(bps as u64)
}

/// Parse a loss probability: `0.1%` or a fraction `0.001`.
pub fn parse_loss(s: &str) -> Result<f64> {
    let s = s.trim();
    let v = if let Some(p) = s.strip_suffix('%') {
        p.trim().parse::<f64>()? / 100.0
    } else {
        s.parse::<f64>()?
    };
    if !(0.0..=1.0).contains(&v) {
        bail!("loss {s:?} out of range");
    }
    Ok(v)
}

/// Parse a queue limit: `bdp`, a time (`20ms`) or bytes (`64kb`, `1mb`, `30000`).
pub fn parse_queue(s: &str) -> Result<QueueLimit> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("bdp") {
        return Ok(QueueLimit::Bdp);
    }
    let (num, unit) = split_unit(s);
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "kib" => 1024.0,
        "mb" | "m" => 1e6,
        "mib" => 1048576.0,
        "s" | "ms" | "us" => return Ok(QueueLimit::Time(parse_duration(s)?)),
        u => bail!("bad queue unit {u:?} in {s:?}"),
    };
    let v: f64 = num.parse().with_context(|| format!("bad queue {s:?}"))?;
    Ok(QueueLimit::Bytes((v * scale) as u64))
}

fn split_unit(s: &str) -> (&str, &str) {
    let i = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e'))
        .unwrap_or(s.len());
    (&s[..i], s[i..].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles() {
        let f = Profile::from_str("lan100").unwrap().config();
        assert_eq!(f.a_to_b.rate_bps, Some(100_000_000));
        assert_eq!((f.a_to_b.delay, f.b_to_a.loss), (Duration::ZERO, 0.0));
        // a 5 ms queue at 100 Mbit/s: 62,500 bytes (above the floor)
        assert_eq!(f.a_to_b.queue_bytes(100e6), 62_500);
        let w = Profile::from_str("wan").unwrap().config();
        assert_eq!(w.a_to_b.rate_bps, Some(1_000_000_000));
        assert_eq!(w.a_to_b.delay, Duration::from_millis(25));
        assert!((w.b_to_a.loss - 0.0001).abs() < 1e-12);
        let l = Profile::from_str("LOSSY").unwrap().config();
        assert_eq!(l.a_to_b.delay, Duration::from_millis(75));
        assert_eq!(
            Profile::from_str("internet")
                .unwrap()
                .config()
                .a_to_b
                .rate_bps,
            Some(100_000_000)
        );
        assert!(!Profile::Dc.config().a_to_b.shaped());
        assert!(Profile::from_str("moon").is_err());
        // BDP queue of wan: 1 Gbit/s * 50 ms = 6.25 MB
        assert_eq!(w.a_to_b.queue_bytes(1e9), 6_250_000);
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_duration("25ms").unwrap(), Duration::from_millis(25));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("300us").unwrap(), Duration::from_micros(300));
        assert_eq!(parse_rate("100mbit").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("2.5M").unwrap(), 2_500_000);
        assert_eq!(parse_rate("50mbps").unwrap(), 50_000_000);
        assert!((parse_loss("0.1%").unwrap() - 0.001).abs() < 1e-12);
        assert!((parse_loss("0.02").unwrap() - 0.02).abs() < 1e-12);
        assert!(parse_loss("120%").is_err());
        assert_eq!(parse_queue("64kb").unwrap(), QueueLimit::Bytes(64_000));
        assert_eq!(
            parse_queue("20ms").unwrap(),
            QueueLimit::Time(Duration::from_millis(20))
        );
        assert_eq!(parse_queue("bdp").unwrap(), QueueLimit::Bdp);
    }

    /// fuzz/artifacts linkem_config crash-b7d16fd2: a duration too long for
    /// `Duration` (2.2e24 ms) panicked in `Duration::from_secs_f64`.
    #[test]
    fn fuzz_duration_too_long_is_an_error() {
        let text = std::str::from_utf8(b"2222222222222222222222222").unwrap();
        let e = parse_duration(text).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
        assert!(parse_duration("1e300s").is_err());
        assert!(parse_queue("1e30s").is_err());
        assert_eq!(parse_duration("1e3s").unwrap(), Duration::from_secs(1000));
    }

    /// linkem_config's invariant (period > 0): a NaN time after the first
    /// passed the "times must increase" check and made the period NaN.
    #[test]
    fn fuzz_trace_times_must_be_finite() {
        for text in [&b"0 1\nnan 2\n"[..], b"0 1\ninf 2\n", b"0 1\n2 3\nNaN 4\n"] {
            let e = Trace::parse(std::str::from_utf8(text).unwrap()).unwrap_err();
            assert!(e.to_string().contains("bad trace time"), "{e}");
        }
    }

    /// fuzz/artifacts linkem_config crash-511dd7bb: "0.01" parsed to a rate
    /// of 0 bit/s (a link that never delivers) instead of an error.
    #[test]
    fn fuzz_rate_below_one_bit_is_refused() {
        let e = parse_rate(std::str::from_utf8(b"0.01").unwrap()).unwrap_err();
        assert!(e.to_string().contains("below 1 bit/s"), "{e}");
        assert!(parse_rate("0.4bit").is_err());
        assert_eq!(parse_rate("0.5").unwrap(), 1);
    }

    #[test]
    fn trace_loops() {
        let t = Trace::parse("# t\tmbit\n0\t10\n2\t20\n\n4\t5\n").unwrap();
        assert_eq!(t.period(), 6.0);
        assert_eq!(t.rate_at(0.0), 10e6);
        assert_eq!(t.rate_at(1.99), 10e6);
        assert_eq!(t.rate_at(2.0), 20e6);
        assert_eq!(t.rate_at(5.5), 5e6);
        assert_eq!(t.rate_at(6.5), 10e6);
        assert_eq!(t.rate_at(8.5), 20e6);
        assert!(Trace::parse("1\t10\n").is_err());
        assert!(Trace::parse("0\t10\n0\t5\n").is_err());
        let c = Trace::parse("0 7").unwrap();
        assert_eq!(c.rate_at(1e6), 7e6);
    }

    #[test]
    fn scaling_a_trace_keeps_its_shape_and_sets_its_time_weighted_mean() {
        // 10 Mbit/s for 1 s, 30 for 1 s (the last step lasts as long as
        // the one before it): mean 20.
        let t = Trace::from_steps(&[(0.0, 10.0), (1.0, 30.0)]).unwrap();
        assert!((t.mean() - 20e6).abs() < 1.0);
        let s = t.scaled_to_mean(100e6);
        assert!((s.mean() - 100e6).abs() < 1.0);
        assert!((s.rate_at(0.5) - 50e6).abs() < 1.0);
        assert!((s.rate_at(1.5) - 150e6).abs() < 1.0);
        let flat = Trace::from_steps(&[(0.0, 5.0)]).unwrap();
        assert!((flat.scaled_to_mean(8e6).rate_at(99.0) - 8e6).abs() < 1.0);
    }
}
