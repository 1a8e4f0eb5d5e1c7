//! Where the guest's zero pages lie, from a sample of its RAM, so the ETA
//! knows what QEMU's first pass has still to cross.
//!
//! QEMU's first pass walks guest RAM in order and sends a zero page as a
//! header of a few bytes, a page with content as 4 KiB. A guest's content
//! is seldom spread evenly: the test guest with 512 MiB of content in
//! 1 GiB holds it in the lower half, zero pages above
//! (`dwcp benchmark floor --guest-mem 1024 --fill 512`: 15 % zero pages in
//! each of the first eight 64 MiB regions, 36-100 % in the others). An ETA
//! that prices what remains by the recent pace, or by the average so far,
//! prices the empty upper half as content (far too long) until the pass
//! reaches it. What is ahead is known only by looking: while the first
//! pass runs, the driver reads a few pages at a time through QMP (HMP
//! `xp`, 4 KiB each, ~0.6 ms a page), spread over the main RAM region in an
//! order that covers it evenly early (bit-reversed strata), and the share
//! of zero pages among the samples ahead of the pass's position is the
//! share it has still to cross.
//!
//! The main RAM region is the one `info mtree -f` (the flat view of the
//! address space `memory`) shows the most of as `ram`; its segments give
//! the guest-physical address of each offset in it (the hole below 4 GiB
//! moves the rest of a large guest above 4 GiB).

use dwcp_core::qemu::Qmp;

/// Pages sampled in all.
pub const SAMPLES: usize = 256;

/// Pages read per call of [`RamSampler::step`].
pub const PER_STEP: usize = 8;

/// Fewest samples ahead of the pass for a share (else None).
pub const MIN_AHEAD: usize = 8;

/// One stretch of the main RAM region in guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address of its first byte.
    pub gpa: u64,
    /// Offset of its first byte in the RAM region.
    pub offset: u64,
    pub len: u64,
}

/// The main RAM region's segments from `info mtree -f`: the region shown
/// most as `ram` in the flat view of address space `memory`. Empty when
/// there is none.
pub fn main_ram(mtree: &str) -> Vec<Segment> {
    let mut segs: Vec<(String, Segment)> = Vec::new();
    // The flat views come in no fixed order: the one of address space
    // "memory" (each view lists its address spaces before its ranges).
    let mut in_memory = false;
    for line in mtree.lines() {
        if line.starts_with("FlatView") {
            if !segs.is_empty() {
                break;
            }
            in_memory = false;
            continue;
        }
        if line.trim_start().starts_with("AS \"memory\"") {
            in_memory = true;
            continue;
        }
        if !in_memory {
            continue;
        }
        // "  0000000000100000-000000003fffffff (prio 0, ram): pc.ram @0000000000100000 KVM"
        let Some((range, rest)) = line.trim().split_once(' ') else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let Some((kind, what)) = rest.split_once("): ") else {
            continue;
        };
        if !kind.ends_with(", ram") || b < a {
            continue;
        }
        let mut words = what.split_whitespace();
        let Some(name) = words.next() else { continue };
        let offset = words
            .next()
            .and_then(|w| w.strip_prefix('@'))
            .and_then(|o| u64::from_str_radix(o, 16).ok())
            .unwrap_or(0);
        segs.push((
            name.to_string(),
            Segment {
                gpa: a,
                offset,
                len: b - a + 1,
            },
        ));
    }
    let mut sizes: Vec<(&str, u64)> = Vec::new();
    for (n, s) in &segs {
        match sizes.iter_mut().find(|(m, _)| m == n) {
            Some(e) => e.1 += s.len,
            None => sizes.push((n, s.len)),
        }
    }
    let Some(main) = sizes.iter().max_by_key(|e| e.1).map(|e| e.0.to_string()) else {
        return Vec::new();
    };
    let mut out: Vec<Segment> = segs
        .into_iter()
        .filter(|(n, _)| *n == main)
        .map(|(_, s)| s)
        .collect();
    out.sort_by_key(|s| s.offset);
    out
}

/// The guest-physical address of `offset` in the region, if mapped.
fn gpa_of(segs: &[Segment], offset: u64) -> Option<u64> {
    segs.iter()
        .find(|s| offset >= s.offset && offset - s.offset < s.len)
        .map(|s| s.gpa + (offset - s.offset))
}

/// `i` with its lowest `bits` bits reversed.
fn reverse_bits(i: usize, bits: u32) -> usize {
    if bits == 0 {
        return 0;
    }
    i.reverse_bits() >> (usize::BITS - bits)
}

/// Whether an HMP `xp /512gx` answer shows a page of zeros; None when QEMU
/// could not read it (or the answer is not what `xp` prints).
pub fn page_is_zero(xp: &str) -> Option<bool> {
    let mut words = 0;
    for line in xp.lines() {
        let (_, vals) = line.split_once(": ")?;
        for v in vals.split_whitespace() {
            let h = v.strip_prefix("0x")?;
            let x = u64::from_str_radix(h, 16).ok()?;
            if x != 0 {
                return Some(false);
            }
            words += 1;
        }
    }
    (words == 512).then_some(true)
}

/// One sampled page.
#[derive(Debug, Clone, Copy)]
struct Sample {
    offset: u64,
    gpa: u64,
    zero: bool,
    /// Hash of what `xp` showed when first read.
    hash: u64,
    /// When first read and when last read again (seconds since the
    /// sampler began).
    first_s: f64,
    last_s: f64,
    /// Read again with different content.
    changed: bool,
}

/// Samples of the main RAM region, read while the first pass runs: where
/// its zero pages lie, and (reading them again once all are read) how much
/// of it the guest has rewritten since.
#[derive(Debug)]
pub struct RamSampler {
    segs: Vec<Segment>,
    /// Bytes of the region (end of its last segment's offsets).
    size: u64,
    next: usize,
    /// Next sample to read again.
    again: usize,
    samples: Vec<Sample>,
    /// Stopped for good (no region found, or QEMU refused a read).
    done: bool,
    t0: std::time::Instant,
}

impl RamSampler {
    /// A sampler over the region `info mtree -f` shows; done at once when
    /// there is none.
    pub fn new(mtree: &str) -> RamSampler {
        let segs = main_ram(mtree);
        let size = segs.iter().map(|s| s.offset + s.len).max().unwrap_or(0);
        RamSampler {
            done: segs.is_empty() || size < (SAMPLES as u64) << 12,
            segs,
            size,
            next: 0,
            again: 0,
            samples: Vec::new(),
            t0: std::time::Instant::now(),
        }
    }

    /// Asks QEMU for the region's layout.
    pub fn start(q: &mut Qmp) -> RamSampler {
        match q.hmp("info mtree -f") {
            Ok(t) => RamSampler::new(&t),
            Err(e) => {
                tracing::debug!("no RAM layout for the ETA: {e}");
                RamSampler::new("")
            }
        }
    }

    /// Offset of the `i`-th sample: stratum `reverse(i)` of [`SAMPLES`],
    /// at a page within it that varies with the stratum.
    fn offset(&self, i: usize) -> u64 {
        let bits = SAMPLES.trailing_zeros();
        let stratum = reverse_bits(i, bits) as u64;
        let width = self.size / SAMPLES as u64;
        let pages = (width >> 12).max(1);
        // A fixed odd multiplier spreads the page within the stratum.
        let page = (stratum.wrapping_mul(0x9E37_79B9) >> 7) % pages;
        stratum * width + (page << 12)
    }

    /// Reads one page: (zero, hash of the answer); None when QEMU could
    /// not read it, Err when it refused (sampling stops).
    fn read(q: &mut Qmp, gpa: u64) -> Result<Option<(bool, u64)>, ()> {
        match q.hmp(&format!("xp /512gx {gpa:#x}")) {
            Ok(t) => Ok(page_is_zero(&t).map(|z| (z, xxhash_rust::xxh3::xxh3_64(t.as_bytes())))),
            Err(e) => {
                tracing::debug!("RAM sampling stopped: {e}");
                Err(())
            }
        }
    }

    /// Reads the next few pages (at most [`PER_STEP`]): new samples until
    /// all are taken, then the unchanged ones again, in turn.
    pub fn step(&mut self, q: &mut Qmp) {
        let mut read = 0;
        while !self.done && read < PER_STEP {
            let now = self.t0.elapsed().as_secs_f64();
            if self.next < SAMPLES {
                let off = self.offset(self.next);
                self.next += 1;
                let Some(gpa) = gpa_of(&self.segs, off) else {
                    continue;
                };
                read += 1;
                match Self::read(q, gpa) {
                    Ok(Some((zero, hash))) => self.samples.push(Sample {
                        offset: off,
                        gpa,
                        zero,
                        hash,
                        first_s: now,
                        last_s: now,
                        changed: false,
                    }),
                    Ok(None) => {}
                    Err(()) => self.done = true,
                }
                continue;
            }
            // All taken: read again those not seen changed yet.
            let n = self.samples.len();
            let Some(i) = (0..n)
                .map(|k| (self.again + k) % n)
                .find(|&i| !self.samples[i].changed)
            else {
                return;
            };
            self.again = i + 1;
            read += 1;
            match Self::read(q, self.samples[i].gpa) {
                Ok(Some((_, hash))) => {
                    let s = &mut self.samples[i];
                    s.last_s = now;
                    s.changed = hash != s.hash;
                }
                Ok(None) => {}
                Err(()) => self.done = true,
            }
        }
    }

    /// Records a sample (tests; [`Self::step`] reads them from QEMU).
    #[cfg(test)]
    pub fn record(&mut self, offset: u64, zero: bool) {
        self.record_watched(offset, zero, 0.0, false);
    }

    /// Records a sample read again after `span_s`, changed or not (tests).
    #[cfg(test)]
    pub fn record_watched(&mut self, offset: u64, zero: bool, span_s: f64, changed: bool) {
        self.samples.push(Sample {
            offset,
            gpa: offset,
            zero,
            hash: 0,
            first_s: 0.0,
            last_s: span_s,
            changed,
        });
    }

    /// Pages sampled so far.
    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// Bytes of the main RAM region.
    pub fn region_bytes(&self) -> u64 {
        self.size
    }

    /// Share of zero pages among the samples at or beyond `fraction` of
    /// the region (0..=1); None with fewer than [`MIN_AHEAD`] of them.
    pub fn zero_share_ahead(&self, fraction: f64) -> Option<f64> {
        let from = (fraction.clamp(0.0, 1.0) * self.size as f64) as u64;
        let ahead: Vec<bool> = self
            .samples
            .iter()
            .filter(|s| s.offset >= from)
            .map(|s| s.zero)
            .collect();
        (ahead.len() >= MIN_AHEAD)
            .then(|| ahead.iter().filter(|z| **z).count() as f64 / ahead.len() as f64)
    }

    /// Bytes of the region the guest rewrote over `over_s` seconds,
    /// estimated from the samples read again: the share seen changed,
    /// scaled from the span they were watched over (on average) to
    /// `over_s`, at most the region. None until every sample was read
    /// again at least once after a second or more.
    pub fn rewritten_bytes(&self, over_s: f64) -> Option<u64> {
        self.rewritten_below(u64::MAX, over_s)
    }

    /// [`Self::rewritten_bytes`] for the part of the region below
    /// `fraction` of it (0..=1): what the guest rewrote behind a pass that
    /// has got that far, which the pass has to send again. Pages rewritten
    /// ahead of the pass are sent once, at their new content. None with
    /// fewer than [`MIN_AHEAD`] samples there.
    pub fn rewritten_behind(&self, fraction: f64, over_s: f64) -> Option<u64> {
        let below = (fraction.clamp(0.0, 1.0) * self.size as f64) as u64;
        self.rewritten_below(below, over_s)
    }

    fn rewritten_below(&self, below: u64, over_s: f64) -> Option<u64> {
        if self.samples.len() < SAMPLES / 2 {
            return None;
        }
        let part: Vec<&Sample> = self.samples.iter().filter(|s| s.offset < below).collect();
        if part.len() < MIN_AHEAD {
            return None;
        }
        let size = below.min(self.size);
        let watched: Vec<&&Sample> = part
            .iter()
            .filter(|s| s.changed || s.last_s - s.first_s >= 1.0)
            .collect();
        if watched.len() < part.len() {
            return None;
        }
        let changed = watched.iter().filter(|s| s.changed).count() as f64;
        let span = watched.iter().map(|s| s.last_s - s.first_s).sum::<f64>() / watched.len() as f64;
        let share = changed / watched.len() as f64 * (over_s / span.max(1.0)).max(1.0);
        Some((share.min(1.0) * size as f64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTREE: &str = "FlatView #0
 AS \"I/O\", root: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 AS \"memory\", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000 KVM
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000 KVM

FlatView #2
 AS \"cpu-smm-0\", root: memory
  0000000000000000-00000000ffffffff (prio 0, ram): other.ram
";

    #[test]
    fn the_main_ram_region_and_its_addresses_come_from_the_flat_view() {
        let s = main_ram(MTREE);
        assert_eq!(
            s,
            vec![
                Segment {
                    gpa: 0,
                    offset: 0,
                    len: 0xa0000
                },
                Segment {
                    gpa: 0x100000,
                    offset: 0x100000,
                    len: 0xbff0_0000
                },
                Segment {
                    gpa: 0x1_0000_0000,
                    offset: 0xc000_0000,
                    len: 0x4000_0000
                },
            ]
        );
        // A 4 GiB guest: the last GiB lies above the hole below 4 GiB.
        assert_eq!(gpa_of(&s, 0x1000), Some(0x1000));
        assert_eq!(gpa_of(&s, 0xc000_1000), Some(0x1_0000_1000));
        // Under the VGA window / ROMs: not mapped as RAM, not sampled.
        assert_eq!(gpa_of(&s, 0xb0000), None);
        assert_eq!(gpa_of(&s, 0x1_0000_0000), None);
        assert!(main_ram("no flat view here").is_empty());
        assert!(RamSampler::new("").done);
    }

    #[test]
    fn xp_answers_read_as_zero_or_content() {
        let zero: String = (0..256)
            .map(|i| format!("{:016x}: 0x0000000000000000 0x0000000000000000\n", i * 16))
            .collect();
        assert_eq!(page_is_zero(&zero), Some(true));
        let content = zero.replacen("0x0000000000000000\n", "0x0000000000000100\n", 1);
        assert_eq!(page_is_zero(&content), Some(false));
        assert_eq!(
            page_is_zero("000000007d000000: Cannot access memory\n"),
            None
        );
        // Short of a page: not a sample.
        assert_eq!(page_is_zero(&zero[..zero.len() / 2]), None);
    }

    #[test]
    fn samples_cover_the_region_evenly_early_and_every_stratum_once() {
        let r = RamSampler::new(MTREE);
        assert_eq!(r.region_bytes(), 0x1_0000_0000);
        let first: Vec<u64> = (0..4).map(|i| r.offset(i) * 4 / r.region_bytes()).collect();
        assert_eq!(first, vec![0, 2, 1, 3], "quarters first");
        let mut strata: Vec<u64> = (0..SAMPLES)
            .map(|i| r.offset(i) / (r.region_bytes() / SAMPLES as u64))
            .collect();
        strata.sort();
        strata.dedup();
        assert_eq!(strata.len(), SAMPLES);
        assert!((0..SAMPLES).all(|i| r.offset(i).is_multiple_of(4096)));
    }

    #[test]
    fn the_zero_share_ahead_is_what_the_pass_has_still_to_cross() {
        let mut r = RamSampler::new(MTREE);
        let gib = 1u64 << 30;
        // Content in the lower half, zeros above (the test guest's layout).
        for i in 0..64u64 {
            r.record(i * gib / 16, i >= 32);
        }
        assert_eq!(r.zero_share_ahead(0.0), Some(0.5));
        assert_eq!(r.zero_share_ahead(0.5), Some(1.0));
        assert_eq!(r.zero_share_ahead(0.25), Some(32.0 / 48.0));
        // Too few samples ahead: no figure.
        assert_eq!(r.zero_share_ahead(0.99), None);
    }

    #[test]
    fn rewritten_bytes_scale_the_share_seen_changed_to_the_pass() {
        let mut r = RamSampler::new(MTREE);
        for i in 0..SAMPLES as u64 {
            r.record(i << 24, false);
        }
        // Not read again yet: unknown.
        assert_eq!(r.rewritten_bytes(10.0), None);
        // Each watched for 5 s, one in eight changed: over the 10 s of the
        // pass, a quarter of the 4 GiB region.
        for (i, s) in r.samples.iter_mut().enumerate() {
            s.last_s = 5.0;
            s.changed = i % 8 == 0;
        }
        assert_eq!(r.rewritten_bytes(10.0), Some(1 << 30));
        // Never more than the region, never less than what was seen.
        assert_eq!(r.rewritten_bytes(100.0), Some(1 << 32));
        assert_eq!(r.rewritten_bytes(1.0), Some(1 << 29));
        // Behind a pass a quarter of the way through the region: the
        // changed share there (8 of 64) over that quarter, scaled the same.
        assert_eq!(r.rewritten_behind(0.25, 10.0), Some(1 << 28));
        // Too few samples behind the pass yet: unknown.
        assert_eq!(r.rewritten_behind(0.01, 10.0), None);
        // One sample watched for less than a second: not yet.
        r.samples[1].last_s = 0.5;
        assert_eq!(r.rewritten_bytes(10.0), None);
        assert_eq!(r.rewritten_behind(0.25, 10.0), None);
    }

    /// A real QEMU (stopped before its first instruction, so its RAM is
    /// all zeros): the layout comes from its flat view, every sample reads
    /// as a zero page, and none changes when read again.
    #[test]
    fn a_real_qemu_is_sampled_through_its_monitor() {
        let qemu = std::env::var("DWCP_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
        let dir = std::env::temp_dir().join(format!("dwcp-ramsample-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let child = std::process::Command::new(&qemu)
            .args([
                "-machine",
                "pc,accel=tcg",
                "-m",
                "256",
                "-display",
                "none",
                "-S",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("skipped: no {qemu}");
            return;
        };
        let result = std::panic::catch_unwind(|| {
            let mut q = Qmp::connect_retry(&sock, std::time::Duration::from_secs(10)).unwrap();
            let mut r = RamSampler::start(&mut q);
            assert_eq!(r.region_bytes(), 256 << 20, "{:?}", r.segs);
            for _ in 0..SAMPLES / PER_STEP {
                r.step(&mut q);
            }
            assert!(!r.done);
            // The strata under the VGA window and the ROMs are skipped.
            assert!(r.samples() >= SAMPLES - 2, "{}", r.samples());
            assert_eq!(r.zero_share_ahead(0.0), Some(1.0));
            std::thread::sleep(std::time::Duration::from_millis(1100));
            for _ in 0..SAMPLES / PER_STEP + 1 {
                r.step(&mut q);
            }
            assert_eq!(r.rewritten_bytes(2.0), Some(0));
        });
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}
