//! Tuning decisions, as pure functions of a load sample: the in-flight
//! budget ([`InflightTuner`], [`inflight_budget`]) and the codec tier of
//! `--codec auto` ([`TierTuner`], [`initial_tier`]). The watchdog measures
//! (counters, queue depths, TCP_INFO) and applies the decisions; nothing
//! here reads the session, so every decision is unit-tested below.

use std::collections::VecDeque;
use std::time::Instant;

use crate::adapt::LinkMode;
use crate::codec::Tier;

/// The slack the in-flight budget adds to two RTTs, seconds: ten RTTs,
/// within 10..=50 ms. It covers the relay threads' scheduling delays
/// (credit comes back only after the peer's QEMU took the bytes). On a
/// datacenter path (RTT ~0.1 ms) a flat 50 ms held ~50 ms of the link's
/// output in flight, all of which had to drain after QEMU stopped the guest:
/// tens of ms of extra downtime for no extra throughput.
pub(super) fn inflight_margin_s(min_rtt_s: f64) -> f64 {
    (10.0 * min_rtt_s).clamp(0.010, 0.050)
}

/// Starting in-flight budget before the delivery rate is known.
pub(super) const INITIAL_INFLIGHT: u64 = 4 << 20;

/// Longest credit loop the in-flight budget is sized from, seconds: a
/// receiver stalled longer than this is not a reason to queue more.
pub(super) const MAX_CREDIT_LOOP_S: f64 = 0.050;

/// The in-flight budget (wire bytes) for a bottleneck rate `btl_bw`
/// (wire bytes/s), a path's lowest RTT `min_rtt_s` and the shortest recent
/// credit loop `loop_s` (a frame put on the wire until the peer's credit
/// for it, at most [`MAX_CREDIT_LOOP_S`]): the rate times twice the longer
/// of the two, plus the scheduling margin ([`inflight_margin_s`]), within
/// `floor..=ceiling`.
///
/// The credit loop is what a channel waits for before it may send again
/// once its share is out: the network RTT plus both ends' relay threads and
/// the peer QEMU's reads. Sizing from the RTT alone starves a loop longer
/// than the margin (a busy host, where threads wait for a core): the rate
/// falls to budget / loop, the budget follows the rate, and the session
/// settles at its floor, a chunk or two in flight per channel (measured:
/// ~280 MB/s on the dc profile of a loaded 2-core host, where QEMU's own
/// multifd ran at ~800 MB/s). With the loop in it, a budget-bound session
/// grows the budget at least 2x per sample until the link or a CPU is the
/// limit; the loop's minimum excludes the queueing that follows.
pub(super) fn inflight_budget(
    btl_bw: f64,
    min_rtt_s: f64,
    loop_s: Option<f64>,
    floor: u64,
    ceiling: u64,
) -> u64 {
    let rtt = loop_s.map_or(min_rtt_s, |l| l.min(MAX_CREDIT_LOOP_S).max(min_rtt_s));
    let want = (btl_bw * (2.0 * rtt + inflight_margin_s(min_rtt_s))) as u64;
    want.clamp(floor, ceiling)
}

/// Delivery rates measured by [`InflightTuner::tick`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Rates {
    /// Bottleneck rate: the highest of the last ten samples, wire bytes/s.
    pub(super) delivery: f64,
    /// Raw (QEMU) bytes/s, average of the last ten samples.
    pub(super) raw: f64,
    /// Shortest credit loop of the last ten samples, seconds (None: no
    /// frame was credited in them).
    pub(super) credit_loop: Option<f64>,
}

/// Adapts the in-flight budget (wire bytes) to the path, BBR-style: the
/// highest recent wire delivery rate (bottleneck bandwidth) times twice the
/// lowest RTT plus a scheduling margin of ten RTTs, at least 10 ms and at
/// most 50 ms ([`inflight_budget`]).
/// That keeps the link busy (and grows the budget while the window is the
/// limit), but no more: whatever is in flight when QEMU stops the guest must
/// drain through the link before the destination can start, so an oversized
/// buffer turns straight into downtime.
pub(super) struct InflightTuner {
    last: Instant,
    last_credited: u64,
    last_raw: u64,
    /// Shortest credit loop seen since the last sample, seconds.
    loop_now: Option<f64>,
    /// (wire, raw) bytes/s and the shortest credit loop of the last 10
    /// samples.
    rates: VecDeque<(f64, f64, Option<f64>)>,
}

impl InflightTuner {
    pub(super) fn new(now: Instant) -> Self {
        InflightTuner {
            last: now,
            last_credited: 0,
            last_raw: 0,
            loop_now: None,
            rates: VecDeque::new(),
        }
    }

    /// Takes the totals the peer has credited back by `now` (wire bytes of
    /// the frames retired, raw bytes) and the shortest credit loop seen
    /// since the last call (seconds); every 100 ms or more returns the
    /// rates to size the budget from, None in between or while nothing was
    /// delivered.
    pub(super) fn tick(
        &mut self,
        now: Instant,
        credited_wire: u64,
        credited_raw: u64,
        credit_loop: Option<f64>,
    ) -> Option<Rates> {
        if let Some(l) = credit_loop {
            self.loop_now = Some(self.loop_now.map_or(l, |m| m.min(l)));
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        if dt < 0.1 {
            return None;
        }
        let r = (credited_wire - self.last_credited) as f64 / dt;
        let rr = (credited_raw - self.last_raw) as f64 / dt;
        self.last = now;
        self.last_credited = credited_wire;
        self.last_raw = credited_raw;
        if r <= 0.0 {
            return None;
        }
        if self.rates.len() == 10 {
            self.rates.pop_front();
        }
        self.rates.push_back((r, rr, self.loop_now.take()));
        Some(Rates {
            delivery: self.rates.iter().map(|x| x.0).fold(0.0, f64::max),
            raw: self.rates.iter().map(|x| x.1).sum::<f64>() / self.rates.len() as f64,
            credit_loop: self.rates.iter().filter_map(|x| x.2).reduce(f64::min),
        })
    }
}

/// The tiers `--codec auto` moves along, cheapest first. The last one
/// (above zstd:3) only on a slow link with the encoders mostly idle
/// ([`HIGH_LEVEL_BELOW`], [`HIGH_LEVEL_MAX_CPU`]).
pub(super) const AUTO_TIERS: [Tier; 5] = [
    Tier::Raw,
    Tier::Lz4,
    Tier::Zstd(1),
    Tier::Zstd(3),
    Tier::Zstd(6),
];

/// Index in [`AUTO_TIERS`] of zstd:3, the top of the ordinary climb.
const ZSTD3: usize = 3;

/// Step above zstd:3 only on links slower than this (wire bytes/s): the
/// seed recommends higher zstd levels below 1 Gbit/s; zstd:6 costs about
/// twice zstd:3's CPU per byte, so keep it to links well under that where
/// one core has room to spare (200 Mbit/s).
pub(super) const HIGH_LEVEL_BELOW: f64 = 25e6;

/// ...and only while the encoders used less than this many cores over the
/// last second (about twice that at the higher level).
pub(super) const HIGH_LEVEL_MAX_CPU: f64 = 0.4;

/// The tier the encoders probe from (one frame in [`PROBE_EVERY`] is also
/// compressed at [`PROBE_HIGH`]) and the level probed.
pub(super) const PROBE_BASE: Tier = Tier::Zstd(3);
pub(super) const PROBE_HIGH: Tier = Tier::Zstd(6);

/// Frames per probe of frames compressed alone (with context, a probe of
/// its own: `ContextProbe` in send.rs): ~1/16 of zstd:3's frames compressed again at about
/// twice its CPU per byte (+12 % encode CPU at zstd:3, on links slow enough
/// for zstd:3 to be the tier).
pub(super) const PROBE_EVERY: u32 = 16;

/// zstd:3 output the probe needs before it judges, bytes (a few frames).
const PROBE_MIN_BYTES: u64 = 1 << 20;

/// Step above zstd:3 only when the probe found the higher level saving at
/// least this share of the bytes. On the test guests it saved under 1 %
/// (FCC trace 004: 132.2 MB on the wire for `auto`, which spent seconds at
/// zstd:6, against 133.1 MB at fixed zstd:3) and cost the encoders twice
/// the CPU: when the trace's rate rose they became the bottleneck.
pub(super) const HIGH_LEVEL_MIN_GAIN: f64 = 0.03;

/// Compress with context ([`crate::codec::context`]) only on links slower
/// than this (wire bytes/s): a channel's context frames are compressed in
/// order on one thread (zstd:3 ~160 MB/s of plan per core here, about a
/// third of that on the wire), so keep them to links well within one core.
pub(super) const CONTEXT_BELOW: f64 = 25e6;

/// ...and only while the encoders used less than this many cores over the
/// last second; context stops when they reach [`CONTEXT_OFF_CPU`] (one
/// thread doing a channel's compression is close to its limit).
pub(super) const CONTEXT_MAX_CPU: f64 = 0.5;
pub(super) const CONTEXT_OFF_CPU: f64 = 0.8;

/// Once a second: whether zstd frames go out compressed with context.
/// On while the link delivers under [`CONTEXT_BELOW`] and the encoders use
/// under [`CONTEXT_MAX_CPU`] cores; off again above 1.25x that rate or
/// from [`CONTEXT_OFF_CPU`] cores. Starts off: the first second measures.
#[derive(Debug, Default)]
pub(super) struct ContextGate {
    on: bool,
    since: Option<(Instant, u64, u64)>,
}

impl ContextGate {
    /// Takes the session's counters now (credited wire bytes, encoder
    /// nanoseconds); returns `Some((on, rate, cpu))` when a second has
    /// passed and the decision changed.
    pub(super) fn sample(
        &mut self,
        now: Instant,
        credited_wire: u64,
        encode_ns: u64,
    ) -> Option<(bool, f64, f64)> {
        let (t0, w0, e0) = *self.since.get_or_insert((now, credited_wire, encode_ns));
        let elapsed = now.saturating_duration_since(t0).as_secs_f64();
        if elapsed < 1.0 {
            return None;
        }
        self.since = Some((now, credited_wire, encode_ns));
        let rate = credited_wire.saturating_sub(w0) as f64 / elapsed;
        let cpu = encode_ns.saturating_sub(e0) as f64 / 1e9 / elapsed;
        let on = if self.on {
            rate < CONTEXT_BELOW * 1.25 && cpu < CONTEXT_OFF_CPU
        } else {
            rate < CONTEXT_BELOW && cpu < CONTEXT_MAX_CPU
        };
        (on != self.on).then(|| {
            self.on = on;
            (on, rate, cpu)
        })
    }
}

/// Paths whose lowest RTT is below this are "datacenter": start raw.
pub const DC_RTT_US: u32 = 1000;

/// Leave raw for lz4 only on links slower than this (bytes/s): lz4 encodes
/// ~410 MB/s per core on realistic guest memory here (`dwcp benchmark hde`,
/// docs/benchmarks.md), so below ~200 MB/s one encode core keeps up with the
/// link and saves bytes.
pub(super) const RAW_UPGRADE_BELOW: f64 = 200e6;

/// The tier `--codec auto` starts a session with, from what is known
/// before the first byte (set before any thread reads from QEMU, so the
/// first frames have it): the path's lowest RTT (the handshake's) and the
/// mode detector's internet threshold (`internet_rtt_us`), or a fixed mode.
/// Raw on a datacenter path (or a fixed datacenter mode); zstd:3 on an
/// internet path (RTT at or above the threshold, or a fixed internet mode):
/// such a path is slow next to what zstd:3 encodes per core (~160 MB/s,
/// docs/benchmarks.md), and climbing there from lz4 one link-bound second
/// at a time sent the first seconds' burst at lz4 (~15 % more wire bytes in
/// an `internet` benchmark); lz4 in between (or when unknown).
pub(super) fn initial_tier(
    min_rtt_us: Option<u32>,
    internet_rtt_us: u32,
    fixed: Option<LinkMode>,
) -> Tier {
    match fixed {
        Some(LinkMode::Datacenter) => return AUTO_TIERS[0],
        Some(LinkMode::Internet) => return AUTO_TIERS[ZSTD3],
        _ => {}
    }
    match min_rtt_us {
        Some(r) if r < DC_RTT_US => AUTO_TIERS[0],
        Some(r) if r >= internet_rtt_us => AUTO_TIERS[ZSTD3],
        _ => AUTO_TIERS[1],
    }
}

/// Whether the data in flight waits for the link: the kernel holds at least
/// half of it (`inflight`, wire bytes) in the streams' send queues
/// (`backlog`: unacknowledged or not yet sent). When the peer's QEMU (or its
/// CPU) is what is slow, readers wait for credit too, but the streams are
/// nearly empty (the peer drains them into its reorder buffers), and
/// compressing would only load that CPU more.
pub(super) fn link_backlogged(backlog: u64, inflight: u64) -> bool {
    backlog > 0 && backlog * 2 >= inflight
}

/// One 50 ms load sample for the [`TierTuner`].
#[derive(Debug, Clone, Copy)]
pub(super) struct TierSample {
    pub(super) now: Instant,
    /// The encode queue was full: compression is the bottleneck.
    pub(super) encode_queue_full: bool,
    /// Otherwise: readers waited for credit or encoded frames piled up for
    /// the sockets, and the link was backlogged ([`link_backlogged`]).
    pub(super) link_bound: bool,
    /// Wire bytes the peer has credited back so far.
    pub(super) credited_wire: u64,
    /// Nanoseconds the encoders have spent so far.
    pub(super) encode_ns: u64,
    /// Probed frames so far: wire bytes at zstd:3 and at the level above.
    pub(super) probe: (u64, u64),
}

/// A tier change decided by [`TierTuner::sample`], with what it saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct TierChange {
    pub(super) tier: Tier,
    pub(super) link_bound: u32,
    pub(super) cpu_bound: u32,
    /// Wire delivery rate over the samples, bytes/s.
    pub(super) rate: f64,
    /// Encoders' CPU over the samples, cores.
    pub(super) codec_cpu: f64,
    /// Share of the bytes the level above zstd:3 saved on the probed
    /// frames (None: not measured yet).
    pub(super) high_gain: Option<f64>,
}

/// `--codec auto`: starts from [`initial_tier`] (raw on a datacenter path,
/// zstd:3 on an internet one, lz4 between), then once a second
/// moves one step along raw -> lz4 -> zstd:1 -> zstd:3 (-> zstd:6 on a slow
/// link with idle encoders, [`HIGH_LEVEL_BELOW`]) when most samples
/// found the link to be the bottleneck (readers waiting for credit, or
/// encoded frames piling up for the sockets), and one step back when most
/// found compression to be (the encode queue full). Leaving raw also needs
/// the link to be slower than [`RAW_UPGRADE_BELOW`]: on a fast link a full
/// credit window means the receiving CPU is the limit, which compression
/// would only make worse. Above zstd:3 also needs the level to pay: at
/// zstd:3 the encoders compress one frame in [`PROBE_EVERY`] at the level
/// above as well, and the tuner steps up only when that saved at least
/// [`HIGH_LEVEL_MIN_GAIN`] of the bytes. The wire format names each
/// frame's codec, so the receiver needs no notice.
#[derive(Debug, Default)]
pub(super) struct TierTuner {
    samples: u32,
    link_bound: u32,
    cpu_bound: u32,
    level: usize,
    credited: u64,
    encode_ns: u64,
    since: Option<Instant>,
    /// Raw frames are not allowed (not a datacenter path): lz4 is the floor.
    no_raw: bool,
    /// The probe's counters when it last judged, and its verdict (kept
    /// across decisions).
    probe_mark: (u64, u64),
    high_gain: Option<f64>,
    /// A measured capacity under [`HIGH_LEVEL_BELOW`] moved the tier to
    /// zstd:3 (once per session).
    jumped: bool,
}

impl TierTuner {
    /// Allows raw frames or not (the link mode's default); returns the
    /// tier to switch to when the current one is raw and no longer allowed.
    pub(super) fn allow_raw(&mut self, allowed: bool) -> Option<Tier> {
        self.no_raw = !allowed;
        if !allowed && self.level == 0 {
            self.level = 1;
            return Some(AUTO_TIERS[1]);
        }
        None
    }

    /// The link's measured capacity (wire bytes/s, from the link samples):
    /// under [`HIGH_LEVEL_BELOW`], a tier below zstd:3 goes to zstd:3 at
    /// once, as an internet RTT makes it at the start (one core's zstd:3
    /// is far ahead of such a link); once per session, after which the
    /// tuner's steps decide. Returns the new tier.
    pub(super) fn measured_capacity(&mut self, bytes_s: f64) -> Option<Tier> {
        if self.jumped || bytes_s <= 0.0 || bytes_s >= HIGH_LEVEL_BELOW || self.level >= ZSTD3 {
            return None;
        }
        self.jumped = true;
        self.level = ZSTD3;
        Some(AUTO_TIERS[ZSTD3])
    }

    /// The lowest level the tuner may step down to.
    fn floor(&self) -> usize {
        usize::from(self.no_raw)
    }

    /// A tuner starting from the session's current tier.
    pub(super) fn start(tier: Tier) -> TierTuner {
        TierTuner {
            level: AUTO_TIERS.iter().position(|t| *t == tier).unwrap_or(1),
            ..TierTuner::default()
        }
    }

    /// Takes one sample; every 20 samples decides, and returns the new tier
    /// when it changes.
    pub(super) fn sample(&mut self, s: &TierSample) -> Option<TierChange> {
        if s.encode_queue_full {
            self.cpu_bound += 1;
        } else if s.link_bound {
            self.link_bound += 1;
        }
        let (base, high) = (
            s.probe.0.saturating_sub(self.probe_mark.0),
            s.probe.1.saturating_sub(self.probe_mark.1),
        );
        if base >= PROBE_MIN_BYTES {
            self.high_gain = Some(1.0 - high as f64 / base as f64);
            self.probe_mark = s.probe;
        }
        let since = *self.since.get_or_insert_with(|| {
            self.credited = s.credited_wire;
            self.encode_ns = s.encode_ns;
            s.now
        });
        self.samples += 1;
        if self.samples < 20 {
            return None;
        }
        let elapsed = s.now.saturating_duration_since(since).as_secs_f64();
        let rate = (s.credited_wire - self.credited) as f64 / elapsed.max(1e-3);
        let codec_cpu = s.encode_ns.saturating_sub(self.encode_ns) as f64 / 1e9 / elapsed.max(1e-3);
        let before = self.level;
        let pays = self.high_gain.is_some_and(|g| g >= HIGH_LEVEL_MIN_GAIN);
        let idle_slow = rate < HIGH_LEVEL_BELOW
            && codec_cpu < HIGH_LEVEL_MAX_CPU
            && self.cpu_bound == 0
            && pays;
        if self.cpu_bound * 5 >= self.samples * 3 && self.level > self.floor() {
            self.level -= 1;
        } else if self.link_bound * 5 >= self.samples * 3
            && self.level + 1 < AUTO_TIERS.len()
            && (self.level > 0 || rate < RAW_UPGRADE_BELOW)
            && (self.level < ZSTD3 || idle_slow)
        {
            self.level += 1;
        } else if self.level > ZSTD3 && !idle_slow && self.cpu_bound > 0 {
            // Above zstd:3 only while the encoders have room to spare.
            self.level = ZSTD3;
        }
        let change = (self.level != before).then(|| TierChange {
            tier: AUTO_TIERS[self.level],
            link_bound: self.link_bound,
            cpu_bound: self.cpu_bound,
            rate,
            codec_cpu,
            high_gain: self.high_gain,
        });
        *self = TierTuner {
            level: self.level,
            no_raw: self.no_raw,
            jumped: self.jumped,
            probe_mark: self.probe_mark,
            high_gain: self.high_gain,
            ..TierTuner::default()
        };
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Feeds 20 samples over one second, `link`/`cpu` of them bound that
    /// way, with the link delivering `rate` wire bytes/s; returns the
    /// decision of the 20th.
    fn second(
        t: &mut TierTuner,
        start: Instant,
        link: u32,
        cpu: u32,
        rate: f64,
    ) -> Option<TierChange> {
        let mut out = None;
        for k in 0..20u32 {
            let now = start + Duration::from_millis(50 * k as u64 + 50);
            let s = TierSample {
                now,
                encode_queue_full: k < cpu,
                link_bound: k >= cpu && k < cpu + link,
                credited_wire: (rate * 0.05 * k as f64) as u64,
                encode_ns: 0,
                // the probe: zstd:6 saves 10 % of zstd:3's bytes
                probe: (100_000 * k as u64, 90_000 * k as u64),
            };
            out = t.sample(&s);
            if k < 19 {
                assert_eq!(out, None, "decides only every 20 samples");
            }
        }
        out
    }

    #[test]
    fn starts_raw_on_a_datacenter_rtt_zstd3_on_an_internet_one_and_lz4_between() {
        let t = |r| initial_tier(r, 50_000, None);
        assert_eq!(t(Some(80)), Tier::Raw);
        assert_eq!(t(Some(DC_RTT_US - 1)), Tier::Raw);
        assert_eq!(t(Some(DC_RTT_US)), Tier::Lz4);
        assert_eq!(t(Some(25_000)), Tier::Lz4);
        assert_eq!(t(Some(49_999)), Tier::Lz4);
        assert_eq!(t(Some(50_000)), Tier::Zstd(3));
        assert_eq!(t(Some(80_000)), Tier::Zstd(3));
        assert_eq!(t(None), Tier::Lz4);
        // a fixed mode decides
        assert_eq!(
            initial_tier(Some(80_000), 50_000, Some(LinkMode::Datacenter)),
            Tier::Raw
        );
        assert_eq!(
            initial_tier(None, 50_000, Some(LinkMode::Internet)),
            Tier::Zstd(3)
        );
        assert_eq!(
            initial_tier(Some(80_000), 50_000, Some(LinkMode::Hybrid)),
            Tier::Zstd(3)
        );
    }

    #[test]
    fn above_zstd3_only_on_a_slow_link_with_idle_encoders() {
        // 12.5 MB/s (100 Mbit/s), link-bound, encoders idle: zstd:6.
        let mut t = TierTuner::start(Tier::Zstd(3));
        let c = second(&mut t, Instant::now(), 20, 0, 12.5e6).expect("a change");
        assert_eq!(c.tier, Tier::Zstd(6));
        // a fast link: stays at zstd:3
        let mut t = TierTuner::start(Tier::Zstd(3));
        assert_eq!(second(&mut t, Instant::now(), 20, 0, 100e6), None);
        // busy encoders (0.5 cores): stays at zstd:3
        let mut t = TierTuner::start(Tier::Zstd(3));
        let start = Instant::now();
        let mut out = None;
        for k in 0..20u64 {
            out = t.sample(&TierSample {
                now: start + Duration::from_millis(50 * k + 50),
                encode_queue_full: false,
                link_bound: true,
                credited_wire: (12.5e6 * 0.05 * k as f64) as u64,
                encode_ns: 25_000_000 * k,
                probe: (100_000 * k, 90_000 * k),
            });
        }
        assert_eq!(out, None);
        // at zstd:6, compression-bound: back to zstd:3
        let mut t = TierTuner::start(Tier::Zstd(6));
        let c = second(&mut t, Instant::now(), 0, 15, 12.5e6).expect("a change");
        assert_eq!(c.tier, Tier::Zstd(3));
    }

    #[test]
    fn above_zstd3_only_when_the_probe_finds_it_pays() {
        let second_with = |t: &mut TierTuner, base: u64, high: u64| {
            let start = Instant::now();
            let mut out = None;
            for k in 1..=20u64 {
                out = t.sample(&TierSample {
                    now: start + Duration::from_millis(50 * k),
                    encode_queue_full: false,
                    link_bound: true,
                    credited_wire: 625_000 * k,
                    encode_ns: 0,
                    probe: (base * k, high * k),
                });
            }
            out
        };
        // zstd:6 saves 1 % on the probed frames: stays at zstd:3.
        let mut t = TierTuner::start(Tier::Zstd(3));
        assert_eq!(second_with(&mut t, 100_000, 99_000), None);
        // not measured yet (no probed bytes): stays too.
        let mut t = TierTuner::start(Tier::Zstd(3));
        assert_eq!(second_with(&mut t, 0, 0), None);
        // 5 % saved: up, and the verdict is in the change.
        let mut t = TierTuner::start(Tier::Zstd(3));
        let c = second_with(&mut t, 100_000, 95_000).expect("a change");
        assert_eq!(c.tier, Tier::Zstd(6));
        assert!((c.high_gain.unwrap() - 0.05).abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn context_on_a_slow_link_with_idle_encoders_only() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut g = ContextGate::default();
        // the first call starts the clock; nothing before a second
        assert_eq!(g.sample(at(0.0), 0, 0), None);
        assert_eq!(g.sample(at(0.5), 6_000_000, 100_000_000), None);
        // 100 Mbit/s, 0.2 cores: on
        let (on, rate, cpu) = g.sample(at(1.0), 12_500_000, 200_000_000).unwrap();
        assert!(on);
        assert!((rate - 12.5e6).abs() < 1.0 && (cpu - 0.2).abs() < 1e-9);
        // 0.7 cores: stays on (hysteresis); 0.85: off
        assert_eq!(g.sample(at(2.0), 25_000_000, 900_000_000), None);
        assert!(!g.sample(at(3.0), 37_500_000, 1_750_000_000).unwrap().0);
        // idle encoders again, but 1 Gbit/s: stays off
        assert_eq!(g.sample(at(4.0), 162_500_000, 1_850_000_000), None);
        // 200 Mbit/s exactly is not under the bound; 150 Mbit/s is
        assert_eq!(g.sample(at(5.0), 187_500_000, 1_900_000_000), None);
        assert!(g.sample(at(6.0), 206_250_000, 1_950_000_000).unwrap().0);
        // while on, up to 1.25x the rate keeps it
        assert_eq!(g.sample(at(7.0), 236_250_000, 2_000_000_000), None);
        assert!(!g.sample(at(8.0), 271_250_000, 2_050_000_000).unwrap().0);
    }

    #[test]
    fn a_slow_measured_capacity_moves_to_zstd3_once() {
        let mut t = TierTuner::start(Tier::Lz4);
        // 1 Gbit/s: nothing to do
        assert_eq!(t.measured_capacity(125e6), None);
        // 100 Mbit/s: zstd:3 at once
        assert_eq!(t.measured_capacity(12.5e6), Some(Tier::Zstd(3)));
        // the encoders turn out to be the bottleneck: down a step...
        let c = second(&mut t, Instant::now(), 0, 20, 12.5e6).unwrap();
        assert_eq!(c.tier, Tier::Zstd(1));
        // ...and another measurement does not undo that
        assert_eq!(t.measured_capacity(12.5e6), None);
        // never downwards
        let mut t = TierTuner::start(Tier::Zstd(6));
        assert_eq!(t.measured_capacity(12.5e6), None);
    }

    #[test]
    fn tier_goes_up_while_the_link_is_the_bottleneck() {
        let mut t = TierTuner::start(Tier::Lz4);
        let c = second(&mut t, Instant::now(), 15, 0, 50e6).expect("a change");
        assert_eq!(c.tier, Tier::Zstd(1));
        assert_eq!((c.link_bound, c.cpu_bound), (15, 0));
        let c = second(&mut t, Instant::now(), 20, 0, 50e6).expect("a change");
        assert_eq!(c.tier, Tier::Zstd(3));
        // the top of the climb on a 50 MB/s link
        assert_eq!(second(&mut t, Instant::now(), 20, 0, 50e6), None);
    }

    #[test]
    fn tier_goes_down_while_compression_is_the_bottleneck() {
        let mut t = TierTuner::start(Tier::Zstd(3));
        let c = second(&mut t, Instant::now(), 0, 12, 50e6).expect("a change");
        assert_eq!(c.tier, Tier::Zstd(1));
        // a minority of either changes nothing
        assert_eq!(second(&mut t, Instant::now(), 11, 0, 50e6), None);
        assert_eq!(second(&mut t, Instant::now(), 0, 11, 50e6), None);
        let mut t = TierTuner::start(Tier::Raw);
        assert_eq!(
            second(&mut t, Instant::now(), 0, 20, 50e6),
            None,
            "raw is the floor"
        );
    }

    #[test]
    fn raw_stays_raw_on_a_fast_link() {
        let mut t = TierTuner::start(Tier::Raw);
        assert_eq!(second(&mut t, Instant::now(), 20, 0, 1e9), None);
        let c = second(&mut t, Instant::now(), 20, 0, 100e6).expect("slow link");
        assert_eq!(c.tier, Tier::Lz4);
        assert!(c.rate < RAW_UPGRADE_BELOW);
    }

    #[test]
    fn an_unknown_tier_starts_at_lz4() {
        let mut t = TierTuner::start(Tier::Zstd(9));
        let c = second(&mut t, Instant::now(), 0, 20, 1e6).expect("a change");
        assert_eq!(c.tier, Tier::Raw);
    }

    #[test]
    fn raw_only_while_allowed() {
        let mut t = TierTuner::start(Tier::Raw);
        assert_eq!(t.allow_raw(true), None);
        assert_eq!(t.allow_raw(false), Some(Tier::Lz4), "leaves raw at once");
        assert_eq!(t.allow_raw(false), None);
        // compression-bound: lz4 is the floor now
        assert_eq!(second(&mut t, Instant::now(), 0, 20, 50e6), None);
        t.allow_raw(true);
        let c = second(&mut t, Instant::now(), 0, 20, 50e6).expect("a change");
        assert_eq!(c.tier, Tier::Raw);
    }

    #[test]
    fn link_backlog_needs_half_the_inflight_in_the_kernel() {
        assert!(!link_backlogged(0, 0));
        assert!(link_backlogged(500, 1000));
        assert!(!link_backlogged(499, 1000));
        assert!(link_backlogged(1, 0));
    }

    #[test]
    fn budget_is_rate_times_two_rtts_plus_margin_within_bounds() {
        let (floor, ceiling) = (1 << 20, 512 << 20);
        let near = |got: u64, want: u64| got.abs_diff(want) <= 1;
        // 1 GB/s, 10 ms RTT: 1e9 * (0.02 + 0.05 capped margin) = 70 MB
        assert!(near(
            inflight_budget(1e9, 0.010, None, floor, ceiling),
            70_000_000
        ));
        // datacenter: 0.1 ms RTT, margin floor 10 ms: 1e9 * 0.0102
        assert!(near(
            inflight_budget(1e9, 0.0001, None, floor, ceiling),
            10_200_000
        ));
        // slow link: the floor
        assert_eq!(inflight_budget(1e6, 0.0001, None, floor, ceiling), floor);
        // huge BDP: the ceiling
        assert_eq!(inflight_budget(10e9, 0.2, None, floor, ceiling), ceiling);
    }

    #[test]
    fn budget_grows_and_shrinks_with_the_delivery_rate() {
        let t0 = Instant::now();
        let mut t = InflightTuner::new(t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(
            t.tick(at(50), 10, 10, None),
            None,
            "under 100 ms: no sample"
        );
        // 100 MB/s, then 400 MB/s: the bottleneck rate is the highest
        let r = t.tick(at(100), 10_000_000, 20_000_000, None).unwrap();
        assert!((r.delivery - 100e6).abs() < 1.0);
        assert!((r.raw - 200e6).abs() < 1.0);
        let r = t.tick(at(200), 50_000_000, 60_000_000, None).unwrap();
        assert!((r.delivery - 400e6).abs() < 1.0);
        let budget = |r: Rates| inflight_budget(r.delivery, 0.001, None, 1 << 20, 1 << 30);
        let grown = budget(r);
        assert!(
            grown
                > budget(Rates {
                    delivery: 100e6,
                    raw: 0.0,
                    credit_loop: None,
                })
        );
        // nothing delivered: no sample, the budget stays
        assert_eq!(t.tick(at(300), 50_000_000, 60_000_000, None), None);
        // the fast samples age out after ten slow ones: the budget shrinks
        let mut last = None;
        for k in 0..10u64 {
            let more = (k + 1) * 1_000_000;
            last = t.tick(
                at(400 + 100 * k),
                50_000_000 + more,
                60_000_000 + more,
                None,
            );
        }
        let r = last.unwrap();
        assert!((r.delivery - 10e6).abs() < 1.0, "{r:?}");
        assert!(budget(r) < grown);
    }

    #[test]
    fn budget_covers_twice_the_credit_loop_when_longer_than_the_rtt() {
        let (floor, ceiling) = (1 << 20, 512 << 20);
        let near = |got: u64, want: u64| got.abs_diff(want) <= 1;
        // datacenter RTT, 8 ms credit loop (busy relay threads): 1e9 * (0.016 + 0.010)
        assert!(near(
            inflight_budget(1e9, 0.0001, Some(0.008), floor, ceiling),
            26_000_000
        ));
        // a loop shorter than the RTT changes nothing
        assert_eq!(
            inflight_budget(1e9, 0.010, Some(0.001), floor, ceiling),
            inflight_budget(1e9, 0.010, None, floor, ceiling)
        );
        // a stalled peer counts for MAX_CREDIT_LOOP_S at most
        assert_eq!(
            inflight_budget(1e9, 0.0001, Some(5.0), floor, ceiling),
            inflight_budget(1e9, 0.0001, Some(MAX_CREDIT_LOOP_S), floor, ceiling)
        );
    }

    /// A session whose budget is the limit: each channel's share goes out,
    /// then waits one credit loop. The rate is budget / loop; the budget
    /// must grow from it while the loop exceeds the margin (with the RTT
    /// alone it shrank to the floor), and stop at the link's rate.
    #[test]
    fn a_budget_bound_session_grows_to_the_link_rate() {
        let (rtt, credit_loop, link) = (0.0001, 0.015, 1e9);
        let (floor, ceiling) = (1 << 20, 256 << 20);
        let run = |with_loop: bool| {
            let t0 = Instant::now();
            let mut t = InflightTuner::new(t0);
            let (mut budget, mut credited) = (4u64 << 20, 0u64);
            for k in 1..=60u64 {
                let rate = (budget as f64 / credit_loop).min(link);
                credited += (rate * 0.1) as u64;
                let l = with_loop.then_some(credit_loop);
                let r = t
                    .tick(t0 + Duration::from_millis(100 * k), credited, credited, l)
                    .unwrap();
                budget = inflight_budget(r.delivery, rtt, r.credit_loop, floor, ceiling);
            }
            budget
        };
        assert_eq!(run(false), floor, "RTT alone: starved to the floor");
        let grown = run(true);
        let want = (link * (2.0 * credit_loop + 0.010)) as u64;
        assert!(grown.abs_diff(want) <= 1, "{grown} vs {want}");
    }

    #[test]
    fn credit_loop_is_the_shortest_of_the_last_ten_samples() {
        let t0 = Instant::now();
        let mut t = InflightTuner::new(t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // loops seen between samples count towards the next one
        assert_eq!(t.tick(at(50), 0, 0, Some(0.004)), None);
        let r = t.tick(at(100), 1000, 1000, Some(0.006)).unwrap();
        assert_eq!(r.credit_loop, Some(0.004));
        let r = t.tick(at(200), 2000, 2000, Some(0.009)).unwrap();
        assert_eq!(r.credit_loop, Some(0.004));
        let mut last = None;
        for k in 0..10u64 {
            last = t.tick(
                at(300 + 100 * k),
                3000 + k * 1000,
                3000 + k * 1000,
                Some(0.007),
            );
        }
        assert_eq!(
            last.unwrap().credit_loop,
            Some(0.007),
            "old minimum aged out"
        );
    }
}
