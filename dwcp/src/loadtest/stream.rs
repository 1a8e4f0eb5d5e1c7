//! A synthetic guest and the precopy stream QEMU would write for it to its
//! migration socket (migration/savevm.c, migration/ram.c): the file magic,
//! the configuration section, the `ram` section's setup (RAMBlock sizes),
//! passes of page records (ZERO and PAGE records, the first of each part
//! naming the block) in SECTION_PART sections with footers, the final pass
//! in SECTION_END, a few device sections, QEMU_VM_EOF and the VM
//! description. The agent's page-aware codec parses the records as it does
//! QEMU's, so zero pages, duplicate pages and compressible text exercise it
//! as real RAM would.
//!
//! Page contents are a pure function of (guest seed, page, version), so a
//! guest of any size costs a bit per page and a version counter, not its RAM.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use xxhash_rust::xxh3::Xxh3;

pub const PAGE: usize = 4096;

const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
const QEMU_VM_FILE_VERSION: u32 = 3;
const QEMU_VM_EOF: u8 = 0x00;
const QEMU_VM_SECTION_START: u8 = 0x01;
const QEMU_VM_SECTION_PART: u8 = 0x02;
const QEMU_VM_SECTION_END: u8 = 0x03;
const QEMU_VM_SECTION_FULL: u8 = 0x04;
const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
const QEMU_VM_CONFIGURATION: u8 = 0x07;
const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;
const RAM_SAVE_FLAG_ZERO: u64 = 0x02;
const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
const RAM_SAVE_FLAG_EOS: u64 = 0x10;
const RAM_SAVE_FLAG_CONTINUE: u64 = 0x20;
const RAM_SECTION_ID: u32 = 2;
const BLOCK: &[u8] = b"pc.ram";
/// Pages per SECTION_PART (QEMU cuts its iterations into rate-limited parts).
const PAGES_PER_PART: usize = 256;
/// Distinct pages the `dup` kind draws from (the same in every guest, as
/// identical kernel and library pages are across a fleet).
const DUP_PAGES: u64 = 32;
/// Text pages the `text` kind draws from (each then made unique).
const TEXT_POOL_PAGES: usize = 2048;

/// Shares of the four kinds of page, in percent (they add up to 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PageMix {
    pub zero: u32,
    pub dup: u32,
    pub text: u32,
    pub random: u32,
}

impl Default for PageMix {
    fn default() -> Self {
        PageMix {
            zero: 30,
            dup: 10,
            text: 40,
            random: 20,
        }
    }
}

impl std::str::FromStr for PageMix {
    type Err = String;
    /// `zero=30,dup=10,text=40,random=20` (percent; kinds left out are 0).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = PageMix {
            zero: 0,
            dup: 0,
            text: 0,
            random: 0,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KIND=PERCENT"))?;
            let v: u32 = v
                .trim()
                .trim_end_matches('%')
                .parse()
                .map_err(|_| format!("{part:?}: the share must be a whole percent"))?;
            let slot = match k.trim() {
                "zero" => &mut m.zero,
                "dup" => &mut m.dup,
                "text" => &mut m.text,
                "random" => &mut m.random,
                other => {
                    return Err(format!(
                        "{other:?}: unknown page kind (zero, dup, text, random)"
                    ))
                }
            };
            *slot = v;
        }
        let sum = m.zero + m.dup + m.text + m.random;
        if sum != 100 {
            return Err(format!("{s:?}: the shares add up to {sum}%, not 100%"));
        }
        Ok(m)
    }
}

impl std::fmt::Display for PageMix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "zero={},dup={},text={},random={}",
            self.zero, self.dup, self.text, self.random
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zero,
    Dup,
    Text,
    Random,
}

/// How a synthetic guest behaves while it migrates.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub pages: u64,
    pub mix: PageMix,
    /// Bytes per second the guest rewrites while it migrates.
    pub dirty_rate: u64,
    /// The final pass starts once what is dirty would go in this long at
    /// the rate the last pass achieved (QEMU's downtime-limit) ...
    pub downtime_limit: Duration,
    /// ... or after this many passes (as auto-converge would force it).
    pub max_passes: u32,
}

/// What one migration's stream was.
#[derive(Debug, Clone, Default)]
pub struct StreamSummary {
    pub bytes: u64,
    pub hash: u64,
    pub passes: u32,
    pub pages_sent: u64,
    /// Bytes of the final (stop-and-copy) pass and device state.
    pub final_bytes: u64,
    /// From the start of the final pass to the last byte written.
    pub final_ms: u64,
}

fn mix64(mut x: u64) -> u64 {
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fill_random(out: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for w in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// Text pages: words of a small vocabulary, lines of log-like text (lz4
/// takes them to about half, as it does a guest's page cache of text).
fn text_pool() -> &'static [u8] {
    static POOL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        const WORDS: &[&str] = &[
            "the",
            "migration",
            "of",
            "guest",
            "memory",
            "page",
            "kernel",
            "INFO",
            "WARN",
            "request",
            "handled",
            "in",
            "ms",
            "user",
            "session",
            "started",
            "stopped",
            "cache",
            "miss",
            "hit",
            "connection",
            "from",
            "to",
            "port",
            "error",
            "retry",
            "value",
            "config",
            "load",
            "balancer",
            "worker",
            "thread",
            "queue",
            "depth",
            "latency",
            "GET",
            "POST",
            "/api/v1/items",
            "200",
            "404",
            "500",
            "OK",
            "done",
            "for",
            "id",
            "timestamp",
            "2026-12-03T16:00:00Z",
            "host",
            "node",
            "disk",
            "write",
            "read",
        ];
        let mut v = Vec::with_capacity(TEXT_POOL_PAGES * PAGE);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut line = 0u64;
        while v.len() < TEXT_POOL_PAGES * PAGE {
            line += 1;
            v.extend_from_slice(format!("{line:08} ").as_bytes());
            for _ in 0..(6 + x % 10) {
                x = mix64(x);
                v.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
                v.push(b' ');
            }
            v.push(b'\n');
        }
        v.truncate(TEXT_POOL_PAGES * PAGE);
        v
    })
}

/// One synthetic guest: the kind of each page is fixed by its index, its
/// content by its version (bumped when the guest dirties it).
#[derive(Debug)]
pub struct Guest {
    seed: u64,
    spec: GuestSpec,
    version: Vec<u16>,
    dirty: Vec<u64>,
    dirty_count: u64,
    /// Dirtying owed but not yet applied, in pages (fractional).
    owed: f64,
}

impl Guest {
    pub fn new(seed: u64, spec: GuestSpec) -> Guest {
        let n = spec.pages as usize;
        Guest {
            seed,
            spec,
            version: vec![0; n],
            dirty: vec![0; n.div_ceil(64)],
            dirty_count: 0,
            owed: 0.0,
        }
    }

    fn kind(&self, page: u64) -> Kind {
        let m = &self.spec.mix;
        let r = (mix64(self.seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % 100) as u32;
        if r < m.zero {
            Kind::Zero
        } else if r < m.zero + m.dup {
            Kind::Dup
        } else if r < m.zero + m.dup + m.text {
            Kind::Text
        } else {
            Kind::Random
        }
    }

    /// The page's content now; None for a zero page (sent as a ZERO record).
    fn content(&self, page: u64, out: &mut [u8; PAGE]) -> bool {
        let ver = self.version[page as usize] as u64;
        let key = mix64(self.seed ^ mix64(page ^ (ver << 40)));
        match self.kind(page) {
            // A zero page the guest wrote is a text page from then on.
            Kind::Zero if ver == 0 => return false,
            Kind::Dup => fill_random(out, mix64(0xd0_0d ^ (key % DUP_PAGES))),
            Kind::Random => fill_random(out, key),
            Kind::Zero | Kind::Text => {
                let pool = text_pool();
                let i = (key % TEXT_POOL_PAGES as u64) as usize * PAGE;
                out.copy_from_slice(&pool[i..i + PAGE]);
                // Unique per (guest, page, version), so it is no duplicate.
                let at = (key >> 32) as usize % (PAGE - 24);
                out[at..at + 8].copy_from_slice(&self.seed.to_le_bytes());
                out[at + 8..at + 16].copy_from_slice(&page.to_le_bytes());
                out[at + 16..at + 24].copy_from_slice(&ver.to_le_bytes());
            }
        }
        true
    }

    fn mark(&mut self, page: u64) {
        let (w, b) = ((page / 64) as usize, page % 64);
        if self.dirty[w] & (1 << b) == 0 {
            self.dirty[w] |= 1 << b;
            self.dirty_count += 1;
        }
    }

    /// The guest runs for `dt`: it rewrites `dirty_rate × dt` bytes of
    /// random pages.
    fn run(&mut self, dt: Duration) {
        self.owed += self.spec.dirty_rate as f64 * dt.as_secs_f64() / PAGE as f64;
        let n = self.owed.floor() as u64;
        self.owed -= n as f64;
        for k in 0..n {
            let page = mix64(self.seed ^ mix64(k ^ self.dirty_count ^ self.owed.to_bits()))
                % self.spec.pages;
            self.version[page as usize] = self.version[page as usize].wrapping_add(1);
            self.mark(page);
        }
    }

    /// The dirty pages, in order, clearing the bitmap (QEMU's bitmap sync).
    fn take_dirty(&mut self) -> Vec<u64> {
        let mut v = Vec::with_capacity(self.dirty_count as usize);
        for (w, bits) in self.dirty.iter_mut().enumerate() {
            let mut b = *bits;
            while b != 0 {
                let i = b.trailing_zeros() as u64;
                v.push(w as u64 * 64 + i);
                b &= b - 1;
            }
            *bits = 0;
        }
        self.dirty_count = 0;
        v
    }

    /// Writes the whole migration stream to `out`: setup, passes until the
    /// dirty set is small enough (or `max_passes`), the final pass and the
    /// device state. The guest keeps dirtying pages at its rate meanwhile.
    pub fn migrate(&mut self, out: &mut impl Write) -> Result<StreamSummary> {
        let mut w = Hashed::new(out);
        let mut sum = StreamSummary::default();
        w.put_u32(QEMU_VM_FILE_MAGIC);
        w.put_u32(QEMU_VM_FILE_VERSION);
        let machine = b"pc-q35-10.0";
        w.put_u8(QEMU_VM_CONFIGURATION);
        w.put_u32(machine.len() as u32);
        w.put(machine);
        // The ram section's setup: total size, then each RAMBlock.
        w.put_u8(QEMU_VM_SECTION_START);
        w.put_u32(RAM_SECTION_ID);
        w.put_str(b"ram");
        w.put_u32(0); // instance
        w.put_u32(4); // version
        let bytes = self.spec.pages * PAGE as u64;
        w.put_u64(bytes | RAM_SAVE_FLAG_MEM_SIZE);
        w.put_str(BLOCK);
        w.put_u64(bytes);
        w.put_u64(RAM_SAVE_FLAG_EOS);
        footer(&mut w);
        // First pass: every page (the whole bitmap is dirty at the start).
        for p in 0..self.spec.pages {
            self.mark(p);
        }
        let mut last = Instant::now();
        loop {
            let pages = self.take_dirty();
            let t0 = Instant::now();
            let b0 = w.bytes;
            sum.passes += 1;
            for part in pages.chunks(PAGES_PER_PART) {
                w.put_u8(QEMU_VM_SECTION_PART);
                w.put_u32(RAM_SECTION_ID);
                self.put_pages(&mut w, part);
                w.put_u64(RAM_SAVE_FLAG_EOS);
                footer(&mut w);
                w.flush_if_full()?;
                let now = Instant::now();
                self.run(now - last);
                last = now;
            }
            sum.pages_sent += pages.len() as u64;
            w.flush()?;
            let secs = t0.elapsed().as_secs_f64().max(1e-3);
            let rate = (w.bytes - b0) as f64 / secs;
            let left = self.dirty_count as f64 * PAGE as f64;
            if left <= rate * self.spec.downtime_limit.as_secs_f64()
                || sum.passes >= self.spec.max_passes
            {
                break;
            }
        }
        // Stop and copy: the guest is paused, the rest goes in SECTION_END.
        let t0 = Instant::now();
        let b0 = w.bytes;
        let pages = self.take_dirty();
        sum.pages_sent += pages.len() as u64;
        w.put_u8(QEMU_VM_SECTION_END);
        w.put_u32(RAM_SECTION_ID);
        for part in pages.chunks(PAGES_PER_PART) {
            self.put_pages(&mut w, part);
            w.flush_if_full()?;
        }
        w.put_u64(RAM_SAVE_FLAG_EOS);
        footer(&mut w);
        let mut state = [0u8; PAGE];
        for (i, (dev, len)) in [
            ("timer", 40),
            ("cpu", 2400),
            ("apic", 320),
            ("virtio-net", 900),
        ]
        .iter()
        .enumerate()
        {
            w.put_u8(QEMU_VM_SECTION_FULL);
            w.put_u32(RAM_SECTION_ID + 1 + i as u32);
            w.put_str(dev.as_bytes());
            w.put_u32(0);
            w.put_u32(1);
            fill_random(&mut state[..*len], self.seed ^ i as u64);
            w.put(&state[..*len]);
            w.put_u8(QEMU_VM_SECTION_FOOTER);
            w.put_u32(RAM_SECTION_ID + 1 + i as u32);
        }
        w.put_u8(QEMU_VM_EOF);
        let desc = format!(
            r#"{{"page_size": {PAGE}, "devices": [{{"name": "ram", "instance_id": 0}}], "guest": {}}}"#,
            self.seed
        );
        w.put_u8(QEMU_VM_VMDESCRIPTION);
        w.put_u32(desc.len() as u32);
        w.put(desc.as_bytes());
        w.flush()?;
        sum.final_bytes = w.bytes - b0;
        sum.final_ms = t0.elapsed().as_millis() as u64;
        sum.bytes = w.bytes;
        sum.hash = w.hash.digest();
        Ok(sum)
    }

    fn put_pages(&self, w: &mut Hashed<'_, impl Write>, pages: &[u64]) {
        let mut buf = [0u8; PAGE];
        for (i, &p) in pages.iter().enumerate() {
            let cont = if i == 0 { 0 } else { RAM_SAVE_FLAG_CONTINUE };
            let off = p * PAGE as u64;
            let full = self.content(p, &mut buf);
            let flags = if full {
                RAM_SAVE_FLAG_PAGE
            } else {
                RAM_SAVE_FLAG_ZERO
            };
            w.put_u64(off | flags | cont);
            if cont == 0 {
                w.put_str(BLOCK);
            }
            if full {
                w.put(&buf);
            } else {
                w.put_u8(0);
            }
        }
    }
}

fn footer(w: &mut Hashed<'_, impl Write>) {
    w.put_u8(QEMU_VM_SECTION_FOOTER);
    w.put_u32(RAM_SECTION_ID);
}

/// A buffered writer that hashes (xxh3-64) and counts what it writes.
struct Hashed<'a, W: Write> {
    out: &'a mut W,
    buf: Vec<u8>,
    hash: Xxh3,
    bytes: u64,
}

const FLUSH_AT: usize = 256 << 10;

impl<'a, W: Write> Hashed<'a, W> {
    fn new(out: &'a mut W) -> Self {
        Hashed {
            out,
            buf: Vec::with_capacity(FLUSH_AT + 2 * PAGE),
            hash: Xxh3::new(),
            bytes: 0,
        }
    }
    fn put(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
        self.bytes += b.len() as u64;
    }
    fn put_u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn put_u32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.put(&v.to_be_bytes());
    }
    fn put_str(&mut self, s: &[u8]) {
        self.put_u8(s.len() as u8);
        self.put(s);
    }
    fn flush_if_full(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.hash.update(&self.buf);
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

/// Reads a stream to its end, hashing and counting it as [`Guest::migrate`]
/// does; `progress` gets each read's length.
pub fn read_hashed(
    r: &mut impl std::io::Read,
    mut progress: impl FnMut(u64),
) -> std::io::Result<(u64, u64)> {
    let mut buf = vec![0u8; 256 << 10];
    let mut h = Xxh3::new();
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => return Ok((n, h.digest())),
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..k]);
        n += k as u64;
        progress(k as u64);
    }
}

/// `16MiB`, `64M`, `1GiB` or a number of MiB, as whole pages.
pub fn parse_guest_size(s: &str) -> Result<u64, String> {
    let mib = dwcp_core::transport::options::parse_size(s, 1 << 20, 1, 1 << 20)
        .ok_or_else(|| format!("{s:?}: use a size such as 16MiB, 64M or 1GiB (1 MiB..1 TiB)"))?;
    Ok(mib << 20)
}

/// `1MiB/s`, `512K/s`, `0`: bytes per second.
pub fn parse_byte_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    dwcp_core::transport::options::parse_size(t, 1024, 0, 64 << 20)
        .map(|k| k << 10)
        .ok_or_else(|| format!("{s:?}: use a rate such as 1MiB/s, 512K/s or 0 (KiB/s when bare)"))
}

/// Checks a stream's summary against what the far end read.
pub fn verify(sent: &StreamSummary, got: (u64, u64)) -> Result<()> {
    if got.0 != sent.bytes {
        bail!(
            "the destination received {} bytes of {} (the stream was cut or padded)",
            got.0,
            sent.bytes
        );
    }
    if got.1 != sent.hash {
        bail!(
            "the destination received {} bytes that DIFFER from the stream sent (xxh3 {:016x} != {:016x})",
            got.0,
            got.1,
            sent.hash
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_core::codec::Planner;

    fn spec(pages: u64, mix: &str, dirty: u64) -> GuestSpec {
        GuestSpec {
            pages,
            mix: mix.parse().unwrap(),
            dirty_rate: dirty,
            downtime_limit: Duration::from_millis(300),
            max_passes: 4,
        }
    }

    #[test]
    fn page_mix_parses_and_names_what_is_wrong() {
        let m: PageMix = "zero=30,dup=10,text=40,random=20".parse().unwrap();
        assert_eq!(m, PageMix::default());
        assert_eq!(m.to_string().parse::<PageMix>().unwrap(), m);
        assert_eq!(
            "random=100".parse::<PageMix>().unwrap().random,
            100,
            "kinds left out are 0"
        );
        assert!("zero=50".parse::<PageMix>().unwrap_err().contains("50%"));
        assert!("ones=100"
            .parse::<PageMix>()
            .unwrap_err()
            .contains("unknown page kind"));
        assert!("zero".parse::<PageMix>().unwrap_err().contains("KIND="));
    }

    #[test]
    fn the_codec_sees_every_page_record_and_the_stream_ends_as_qemus() {
        let mut g = Guest::new(7, spec(1024, "zero=25,dup=25,text=25,random=25", 0));
        let mut out = Vec::new();
        let s = g.migrate(&mut out).unwrap();
        assert_eq!(s.bytes, out.len() as u64);
        assert_eq!(s.passes, 1, "nothing dirtied: one pass");
        assert_eq!(s.pages_sent, 1024);
        assert_eq!(&out[..8], b"QEVM\x00\x00\x00\x03");
        assert!(dwcp_core::transport::gate::qemu_stream_end(&out).is_some());
        let mut p = Planner::new(64 << 20);
        let mut plan = Vec::new();
        for c in out.chunks(512 << 10) {
            p.plan(c, &mut plan);
        }
        let st = p.stats();
        // ZERO records are a header and a byte: the planner sees the PAGE
        // records, all but those cut by a frame boundary (one per frame).
        let zero = (0..1024).filter(|&p| g.kind(p) == Kind::Zero).count() as u64;
        assert!((150..350).contains(&zero), "{zero} zero pages of 1024");
        let frames = out.len().div_ceil(512 << 10) as u64;
        assert!(st.pages_seen <= 1024 - zero, "{st:?}");
        assert!(st.pages_seen + frames >= 1024 - zero, "{st:?}");
        // Duplicates of the 32 shared pages are found in the ring.
        assert!(st.pages_deduped > 256 - DUP_PAGES - 32, "{st:?}");
        // Zero pages are ZERO records: about a quarter of the guest is not sent.
        assert!(out.len() < 1024 * PAGE * 8 / 10, "{}", out.len());
    }

    #[test]
    fn a_dirtying_guest_takes_more_passes_and_the_hash_checks_the_bytes() {
        // 8 MiB guest rewriting 1 GiB/s into a Vec that is slowed down a
        // bit, no downtime allowed: it cannot converge and stops at max_passes.
        struct Slow(Vec<u8>);
        impl Write for Slow {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_micros(200));
                self.0.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut sp = spec(2048, "text=50,random=50", 1 << 30);
        sp.downtime_limit = Duration::ZERO;
        let mut g = Guest::new(9, sp);
        let mut out = Slow(Vec::new());
        let s = g.migrate(&mut out).unwrap();
        assert_eq!(s.passes, 4);
        assert!(s.pages_sent > 2048, "{s:?}");
        let got = read_hashed(&mut &out.0[..], |_| {}).unwrap();
        verify(&s, got).unwrap();
        let mut bad = out.0.clone();
        bad[100_000] ^= 1;
        let e = verify(&s, read_hashed(&mut &bad[..], |_| {}).unwrap()).unwrap_err();
        assert!(e.to_string().contains("DIFFER"), "{e}");
        let e = verify(&s, read_hashed(&mut &out.0[..10], |_| {}).unwrap()).unwrap_err();
        assert!(e.to_string().contains("received 10 bytes"), "{e}");
    }

    #[test]
    fn units() {
        assert_eq!(parse_guest_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_guest_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_guest_size("32").unwrap(), 32 << 20);
        assert!(parse_guest_size("0").is_err());
        assert_eq!(parse_byte_rate("1MiB/s").unwrap(), 1 << 20);
        assert_eq!(parse_byte_rate("512K/s").unwrap(), 512 << 10);
        assert_eq!(parse_byte_rate("0").unwrap(), 0);
        assert!(parse_byte_rate("fast").is_err());
    }
}
