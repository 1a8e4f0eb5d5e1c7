//! Planner (sender) and Rebuilder (receiver): zero-run elimination and
//! page-aware deduplication of QEMU's precopy RAM stream.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use std::sync::{Arc, OnceLock};

use xxhash_rust::xxh3::xxh3_64;

use super::keep::{self, KeptCopy, PeerHas, Recorder};
use super::multifd;
use super::xref::{ChannelShare, Shared};
use super::{CodecError, MAX_PLAN_LEN, MAX_RAW_LEN, PAGE_SIZE};

pub(crate) const OP_LIT: u8 = 0x01;
pub(crate) const OP_ZERO: u8 = 0x02;
pub(crate) const OP_PAGE: u8 = 0x03;
pub(crate) const OP_REF: u8 = 0x04;
/// Insert the last 4096 bytes of this frame's output into the ring (a page
/// that was sent as LIT/ZERO ops because it contains long zero runs).
pub(crate) const OP_MARK: u8 = 0x05;
/// A page sent as the difference from an earlier page the receiver holds
/// in its ring (the previous version of the same guest page):
/// `0x06 DELTA base hash(8 bytes, LE) len` + `len` bytes of runs, each
/// `skip len bytes`: the page is the base with `bytes` XORed in at the
/// offsets the runs name; `hash` (xxh3-64 of the page) is checked before
/// the page is used, and the page is inserted into the ring like PAGE.
pub(crate) const OP_DELTA: u8 = 0x06;
/// A page another channel of the session holds in its spill file
/// ([`super::xref`]): `0x09 XREF channel idx hash(8 bytes, LE)`; the
/// receiver reads it from that channel's file, checks its xxh3-64 and
/// inserts it into this channel's ring like PAGE.
pub(crate) const OP_XREF: u8 = 0x09;
/// A page the receiver holds in the kept copy it announced (re-migration,
/// [`super::keep`]): `0x07 HAVE index`; the receiver reads the page from
/// its copy, checks its SHA-256, and inserts it into the ring like PAGE.
pub(crate) const OP_HAVE: u8 = 0x07;
/// The channel's dedup ring holds `pages` pages (at most the size the
/// session agreed): `0x08 RING pages`, only as the first op of a channel's
/// first frame, before anything enters the ring. A multifd channel's
/// planner sends it ([`Planner::set_multifd`]): a session has one ring's
/// worth of memory for its rings, and several multifd channels share it.
pub(crate) const OP_RING: u8 = 0x08;

/// Zero bytes in an XOR of two pages shorter than this stay inside a run.
const DELTA_MIN_GAP: usize = 8;

/// Zero runs at least this long become ZERO ops.
pub(crate) const MIN_ZERO_RUN: usize = 512;
/// Grid of the zero-run scan: any run >= 2*ZBLK-1 bytes contains a whole
/// grid block, so only one word per block is read on non-zero data.
const ZBLK: usize = 256;

/// QEMU RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE.
const FLAG_PAGE_CONT: u8 = 0x28;
/// QEMU RAM_SAVE_FLAG_PAGE (followed by length byte + RAMBlock idstr).
const FLAG_PAGE: u8 = 0x08;
/// Flags a following record header may carry (ZERO, PAGE, EOS, CONTINUE).
const FLAGS_PLAUSIBLE: u8 = 0x02 | 0x08 | 0x10 | 0x20;

/// Counters of a [`Planner`] since its creation.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanStats {
    /// Raw bytes planned.
    pub raw_bytes: u64,
    /// Raw bytes sent as ZERO ops (zero runs and zero pages).
    pub zero_bytes: u64,
    /// QEMU page records recognised (including zero pages).
    pub pages_seen: u64,
    /// Pages sent as REF to the dedup ring.
    pub pages_deduped: u64,
    /// Pages sent in full although this channel had sent the same content
    /// before (it had left the ring): what a larger content store would
    /// have saved. Counted for the first [`SENT_TRACK_PAGES`] distinct
    /// contents only.
    pub pages_missed_dups: u64,
    /// Pages sent as a HAVE reference to the receiver's kept copy
    /// (re-migration).
    pub pages_kept: u64,
    /// Pages sent as a reference to another channel's copy (XREF).
    pub pages_xref: u64,
}

/// Delta counters of a [`Planner`] ([`Planner::delta_stats`]); kept apart
/// from [`PlanStats`] so that the structs every channel sender holds stay
/// small.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Pages whose guest address had been sent before (as a page the
    /// ring still holds) and whose content changed since: candidates
    /// for a delta.
    pub pages_resent: u64,
    /// Re-sent pages sent as a DELTA.
    pub pages_delta: u64,
    /// Of the re-sent pages: their LZ4 size when compressed alone (the
    /// planner's estimate of what each costs in full) ...
    pub resent_lz4_full: u64,
    /// ... and the LZ4 size of what was chosen for them (the delta when
    /// taken).
    pub resent_lz4_delta: u64,
}

/// Distinct page contents a [`Planner`] remembers (8-byte hashes, about
/// 10 MiB) to count [`PlanStats::pages_missed_dups`]: 2 GiB of content.
pub const SENT_TRACK_PAGES: usize = 1 << 19;

#[inline]
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn get_varint(plan: &[u8], pos: &mut usize) -> Result<u64, CodecError> {
    let start = *pos;
    let mut v = 0u64;
    let mut shift = 0u32;
    loop {
        let Some(&b) = plan.get(*pos) else {
            return Err(CodecError::TruncatedVarint { offset: start });
        };
        *pos += 1;
        if shift == 63 && b > 1 {
            return Err(CodecError::VarintOverflow { offset: start });
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
    }
}

#[inline]
fn word(raw: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&raw[i..i + 8]);
    u64::from_ne_bytes(b)
}

/// True if every byte of `d` is zero (early exit per 64 bytes).
#[inline]
pub(crate) fn is_zero(d: &[u8]) -> bool {
    let mut chunks = d.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc |= u64::from_ne_bytes(b);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Fixed-capacity FIFO ring of pages indexed by an absolute insert counter,
/// optionally extended by a spill file: a page leaving the in-memory ring
/// is written to the file (itself a ring of `spill.cap` pages), so the
/// valid window is the last `cap + spill.cap` pages inserted.
struct Ring {
    cap: u64,
    data: Vec<u8>,
    count: u64,
    spill: Option<Spill>,
    /// Every page inserted is also recorded here (the session's copy for
    /// a later re-migration).
    rec: Option<Arc<Recorder>>,
    /// The session's channels' shared state, and this channel's id
    /// (cross-channel references, [`super::xref`]).
    share: Option<(Arc<Shared>, u16, Arc<ChannelShare>)>,
}

/// Pages written to a spill file at once (when the ring and the file are
/// multiples of it).
const SPILL_BATCH: u64 = 64;

/// The on-disk part of a [`Ring`]: an unlinked file (nothing is left behind
/// if the process dies) holding `cap` pages, and a page buffer for reads.
struct Spill {
    file: Arc<std::fs::File>,
    cap: u64,
    buf: Vec<u8>,
}

impl Spill {
    /// Creates an unlinked file in `dir` for `pages` pages.
    fn create(dir: &std::path::Path, pages: u64) -> std::io::Result<Spill> {
        let file = super::keep::unlinked_file(dir, "spill")?;
        Ok(Spill {
            file: Arc::new(file),
            cap: pages,
            buf: vec![0u8; PAGE_SIZE],
        })
    }

    fn offset(&self, idx: u64) -> u64 {
        (idx % self.cap) * PAGE_SIZE as u64
    }
}

impl Ring {
    fn new(cache_bytes: usize) -> Self {
        Ring {
            cap: (cache_bytes / PAGE_SIZE) as u64,
            data: Vec::new(),
            count: 0,
            spill: None,
            rec: None,
            share: None,
        }
    }

    /// Gives the ring `pages` pages, before anything was inserted.
    fn resize(&mut self, pages: u64) {
        debug_assert!(self.count == 0 && self.data.is_empty());
        self.cap = pages;
        if let Some((_, _, c)) = &self.share {
            c.set_ring(pages);
        }
    }

    /// Takes part in the session's cross-channel references as `channel`
    /// (only with a spill file: references point into it).
    fn share(&mut self, shared: Arc<Shared>, channel: u16) -> bool {
        let Some(sp) = &self.spill else {
            return false;
        };
        let c = shared.register(channel, sp.file.clone(), self.cap, sp.cap);
        self.share = Some((shared, channel, c));
        true
    }

    /// Allocates the whole ring at once on first use: zeroed allocations
    /// are backed lazily by the OS, and this avoids reallocation copies.
    #[inline]
    fn ensure_alloc(&mut self) {
        if self.data.is_empty() && self.cap > 0 {
            self.data = vec![0u8; self.cap as usize * PAGE_SIZE];
        }
    }

    /// Touches the slots the next `pages` inserts will use, so that
    /// first-touch page faults happen now (benchmarks only).
    fn prefault(&mut self, pages: usize) {
        if self.cap == 0 {
            return;
        }
        self.ensure_alloc();
        let n = pages.min(self.cap as usize);
        for k in 0..n {
            let slot = ((self.count + k as u64) % self.cap) as usize * PAGE_SIZE;
            // Ring bytes are only read after being written by insert, so
            // any value will do; black_box forces a real store.
            self.data[slot] = std::hint::black_box(0u8);
        }
    }

    /// Pages in the spill file's window (0 without one).
    fn spill_cap(&self) -> u64 {
        self.spill.as_ref().map_or(0, |s| s.cap)
    }

    /// Lowest valid index.
    fn lo(&self) -> u64 {
        self.count.saturating_sub(self.cap + self.spill_cap())
    }

    /// Lowest index still in memory.
    fn mem_lo(&self) -> u64 {
        self.count.saturating_sub(self.cap)
    }

    /// The page at `idx`: from memory, or read from the spill file.
    /// `Ok(None)`: outside the valid window.
    fn get(&mut self, idx: u64) -> Result<Option<&[u8]>, CodecError> {
        if idx >= self.count || idx < self.lo() {
            return Ok(None);
        }
        if idx >= self.mem_lo() {
            let slot = (idx % self.cap) as usize * PAGE_SIZE;
            return Ok(self.data.get(slot..slot + PAGE_SIZE));
        }
        let Some(sp) = self.spill.as_mut() else {
            return Ok(None);
        };
        let off = sp.offset(idx);
        std::os::unix::fs::FileExt::read_exact_at(&*sp.file, &mut sp.buf, off).map_err(
            |source| CodecError::Spill {
                op: "read",
                idx,
                source,
            },
        )?;
        Ok(Some(&sp.buf))
    }

    /// Inserts a page; returns its index. No-op (but counted) if cap is 0.
    /// With a spill file, the page it evicts from memory is written there.
    fn insert(&mut self, page: &[u8]) -> Result<u64, CodecError> {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        if let Some(r) = &self.rec {
            r.add(page);
        }
        let idx = self.count;
        if self.cap == 0 {
            self.count += 1;
            return Ok(idx);
        }
        self.ensure_alloc();
        let slot = (idx % self.cap) as usize * PAGE_SIZE;
        if idx >= self.cap {
            if let Some(sp) = &self.spill {
                // The page at `old` leaves memory now. Pages go to the file
                // SPILL_BATCH at a time, when the first of them leaves (one
                // write instead of many): the file then holds the batch a
                // little before the pages leave memory, and the pages it
                // replaces leave the file a little early. Both ends write
                // at the same points of the stream, the sender compares
                // what it reads back before every reference, so the window
                // only narrows by a batch.
                let old = idx - self.cap;
                let batch =
                    if self.cap.is_multiple_of(SPILL_BATCH) && sp.cap.is_multiple_of(SPILL_BATCH) {
                        SPILL_BATCH
                    } else {
                        1
                    };
                if old.is_multiple_of(batch) {
                    let len = batch as usize * PAGE_SIZE;
                    std::os::unix::fs::FileExt::write_all_at(
                        &*sp.file,
                        &self.data[slot..slot + len],
                        sp.offset(old),
                    )
                    .map_err(|source| CodecError::Spill {
                        op: "write",
                        idx: old,
                        source,
                    })?;
                }
            }
        }
        self.count += 1;
        self.data[slot..slot + PAGE_SIZE].copy_from_slice(page);
        if let Some((_, _, c)) = &self.share {
            c.inserted(self.count);
        }
        Ok(idx)
    }
}

/// Hasher for keys that already are xxh3 hashes.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type IdMap = HashMap<u64, u64, BuildHasherDefault<IdHasher>>;

/// Sender side: raw bytes -> plan. One per channel direction, called in
/// stream order.
pub struct Planner {
    ring: Ring,
    /// Hash of the page in each ring slot.
    slot_hash: Vec<u64>,
    /// Hash of the page in each slot of the spill file.
    spill_hash: Vec<u64>,
    /// Page hash -> ring index (only indices still in the ring).
    index: IdMap,
    stats: PlanStats,
    /// Hashes of every page content sent in full (up to
    /// [`SENT_TRACK_PAGES`]): a measurement, never used to encode.
    sent: std::collections::HashSet<u64, BuildHasherDefault<IdHasher>>,
    /// Page hash function (xxh3_64; tests force collisions with it).
    pub(crate) hash: fn(&[u8]) -> u64,
    /// What deltas need (boxed: a planner lives inside every channel's
    /// sender, and most of this is empty until deltas are on).
    d: Box<DeltaState>,
    /// What the receiver announced it holds from an earlier migration of
    /// this guest (set once its HAVE frames arrived).
    have: Option<Arc<OnceLock<PeerHas>>>,
    /// How the channel carries pages (decided by its first bytes).
    framing: Framing,
    /// The ring a multifd channel's planner uses (pages), when the
    /// receiver agreed to multifd channels' pages ([`Planner::set_multifd`]).
    multifd_ring: Option<u64>,
    /// The first planned frame has gone (a RING op only in that one).
    ring_sent: bool,
    /// Cross-channel references: where this planner's pages go in the
    /// session's index, and a page read from another channel's file.
    xref: Option<(Arc<Shared>, u16)>,
}

/// How a channel carries guest pages.
enum Framing {
    /// Its first frame has not been planned yet.
    Unknown,
    /// QEMU's main channel: page records, found by [`find_record`].
    Precopy,
    /// A multifd channel: packets of pages ([`super::multifd`]).
    Multifd(Box<multifd::Parser>),
}

/// The [`Planner`]'s state for deltas of re-sent pages.
#[derive(Default)]
struct DeltaState {
    /// Whether re-sent pages may go as DELTA ops (the receiver agreed).
    on: bool,
    /// Counters since creation, and what [`Planner::new_delta_stats`]
    /// reported so far.
    st: DeltaStats,
    reported: DeltaStats,
    /// Guest page (RAM block, address; mixed by [`page_key`]) -> ring
    /// index of the version the receiver holds (sent in full, as a delta
    /// or as a reference). At most [`Planner::last_cap`] entries.
    last: IdMap,
    /// RAM block names seen -> small numbers (at most [`MAX_BLOCKS`]).
    blocks: HashMap<Vec<u8>, u64>,
    /// Block of the last record that named one (CONTINUE records are in it).
    cur_block: u64,
    /// Scratch: XOR of a page and its previous version, the delta's runs,
    /// and LZ4 output for the size estimates.
    xor: Vec<u8>,
    runs: Vec<u8>,
    lz: Vec<u8>,
    /// Scratch (kept here, boxed, so that a planner stays small): the
    /// pages a multifd parser found in a frame, and a page read from
    /// another channel's spill file.
    found: Vec<(usize, u64)>,
    xref_buf: Vec<u8>,
}

/// RAM blocks a [`Planner`] tells apart (QEMU has a handful; more share the
/// last number, which only makes their deltas less likely to pay).
const MAX_BLOCKS: u64 = 256;

/// Key of a guest page in [`Planner::last`]: block number and page frame,
/// multiplied by an odd constant (a bijection, so keys stay distinct) so
/// that the map's buckets spread.
#[inline]
fn page_key(block: u64, addr: u64) -> u64 {
    ((addr >> 12) | (block << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl fmt::Debug for Planner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Planner")
            .field("ring_pages", &self.ring.cap)
            .field("inserted", &self.ring.count)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Plan writer: LIT/ZERO emission with zero-run detection.
struct Emitter<'a> {
    out: &'a mut Vec<u8>,
    zero_bytes: u64,
}

impl Emitter<'_> {
    #[inline]
    fn lit(&mut self, d: &[u8]) {
        if !d.is_empty() {
            self.out.push(OP_LIT);
            put_varint(self.out, d.len() as u64);
            self.out.extend_from_slice(d);
        }
    }

    #[inline]
    fn zero(&mut self, len: usize) {
        self.out.push(OP_ZERO);
        put_varint(self.out, len as u64);
        self.zero_bytes += len as u64;
    }

    /// Emits `raw[a..b]` as LIT/ZERO ops (ZERO for zero runs >= MIN_ZERO_RUN).
    fn region(&mut self, raw: &[u8], a: usize, b: usize) {
        let mut lit = a;
        let mut i = a;
        while i + ZBLK <= b {
            if !is_zero(&raw[i..i + ZBLK]) {
                i += ZBLK;
                continue;
            }
            let mut s = i;
            while s > lit && raw[s - 1] == 0 {
                s -= 1;
            }
            let mut e = i + ZBLK;
            while e + 8 <= b && word(raw, e) == 0 {
                e += 8;
            }
            while e < b && raw[e] == 0 {
                e += 1;
            }
            if e - s >= MIN_ZERO_RUN {
                self.lit(&raw[lit..s]);
                self.zero(e - s);
                lit = e;
            }
            i = e;
        }
        self.lit(&raw[lit..b]);
    }
}

/// First index `p >= from` with `raw[p]` equal to 0x08 or 0x28.
#[inline]
fn find_flag(raw: &[u8], from: usize) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while i + 8 <= raw.len() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[i..i + 8]);
        // 0x08 and 0x28 differ only in bit 5.
        let x = (u64::from_le_bytes(b) & 0xDFDF_DFDF_DFDF_DFDF) ^ (0x08 * LO);
        let z = x.wrapping_sub(LO) & !x & HI;
        if z != 0 {
            // The lowest flagged byte is always a true match.
            return Some(i + (z.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    (i..raw.len()).find(|&p| raw[p] & 0xDF == 0x08)
}

/// If a QEMU page record header starts at `h` and its whole page lies in
/// `raw`, returns the offset of the page data and, for a record that names
/// its RAM block (no CONTINUE flag), the block's name.
#[inline]
fn parse_header(raw: &[u8], h: usize) -> Option<(usize, Option<&[u8]>)> {
    let b = raw.get(h..h + 8)?;
    if b[0] != 0 || b[1] != 0 || b[6] & 0x0F != 0 {
        return None;
    }
    let (ds, block) = match b[7] {
        FLAG_PAGE_CONT => (h + 8, None),
        FLAG_PAGE => {
            let l = *raw.get(h + 8)? as usize;
            if l == 0 {
                return None;
            }
            let id = raw.get(h + 9..h + 9 + l)?;
            if !id.iter().all(|c| (0x21..0x7f).contains(c)) {
                return None;
            }
            (h + 9 + l, Some(id))
        }
        _ => return None,
    };
    if ds + PAGE_SIZE > raw.len() {
        return None;
    }
    Some((ds, block))
}

/// A page record found in a chunk.
struct Record<'a> {
    /// Offset of the page data.
    ds: usize,
    /// The page's offset in its RAM block (QEMU's record header).
    addr: u64,
    /// The block's name when the record carries it.
    block: Option<&'a [u8]>,
}

/// Does a plausible record header follow at `next` (or does the chunk end
/// before one could)?
#[inline]
fn confirmed(raw: &[u8], next: usize) -> bool {
    match raw.get(next..next + 8) {
        None => true,
        Some(b) => b[0] == 0 && b[1] == 0 && b[7] != 0 && b[7] & !FLAGS_PLAUSIBLE == 0,
    }
}

/// The next confirmed page record whose header starts at or after `pos`.
fn find_record(raw: &[u8], pos: usize) -> Option<Record<'_>> {
    let mut p = pos + 7;
    loop {
        // A record needs 8 header bytes + a page after its start.
        if p - 7 + 8 + PAGE_SIZE > raw.len() {
            return None;
        }
        p = find_flag(raw, p)?;
        let h = p - 7;
        if let Some((ds, block)) = parse_header(raw, h) {
            if confirmed(raw, ds + PAGE_SIZE) {
                let addr = u64::from_be_bytes(raw[h..h + 8].try_into().ok()?) & !0xFFF;
                return Some(Record { ds, addr, block });
            }
        }
        p += 1;
    }
}

impl Planner {
    /// New planner with a dedup ring of `dedup_cache_bytes / 4096` pages
    /// (0 = no dedup; zero runs are still eliminated). The ring memory is
    /// allocated as pages are inserted, up to that size.
    pub fn new(dedup_cache_bytes: usize) -> Self {
        Planner {
            ring: Ring::new(dedup_cache_bytes),
            slot_hash: Vec::new(),
            spill_hash: Vec::new(),
            index: IdMap::default(),
            stats: PlanStats::default(),
            sent: Default::default(),
            hash: xxh3_64,
            d: Box::default(),
            have: None,
            framing: Framing::Unknown,
            multifd_ring: None,
            ring_sent: false,
            xref: None,
        }
    }

    /// Lets this planner refer to pages other channels of the session sent
    /// (`shared`, this channel being `channel`), and theirs to its own:
    /// only where the receiver agreed, and with a spill file (references
    /// point into the channels' files). Call before the first frame.
    pub fn set_xref(&mut self, shared: Arc<Shared>, channel: u16) {
        if self.ring.share(shared.clone(), channel) {
            self.xref = Some((shared, channel));
        }
    }

    /// Pages inserted into the ring so far.
    pub fn ring_count(&self) -> u64 {
        self.ring.count
    }

    /// Lets this planner find the pages of a multifd channel (when its
    /// first bytes are one) and deduplicate them with a ring of
    /// `ring_pages` pages (rounded down to a multiple of 64, at least 64,
    /// at most its own ring), announced to the receiver by an [`OP_RING`]. Only
    /// where the receiver agreed: without it, a multifd channel's bytes go
    /// as literal and zero runs. Call before the first frame.
    pub fn set_multifd(&mut self, ring_pages: Option<u64>) {
        self.multifd_ring = ring_pages.filter(|_| self.ring.cap > 0).map(|p| {
            (p / SPILL_BATCH * SPILL_BATCH)
                .max(SPILL_BATCH)
                .min(self.ring.cap)
        });
    }

    /// Decides the channel's framing from its first bytes.
    fn frame_framing(&mut self, raw: &[u8]) {
        if matches!(self.framing, Framing::Unknown) && !raw.is_empty() {
            self.framing = match self.multifd_ring {
                Some(_) if multifd::Parser::starts(raw) && self.ring.count == 0 => {
                    Framing::Multifd(Box::new(multifd::Parser::new(page_key)))
                }
                _ => Framing::Precopy,
            };
        }
    }

    /// The channel's next `raw` bytes go out as they are (a raw frame, not
    /// planned): a multifd channel's parser follows them, so that it keeps
    /// its place in QEMU's packets. Nothing enters the ring.
    pub fn skip(&mut self, raw: &[u8]) {
        if self.ring.cap == 0 || self.multifd_ring.is_none() {
            return;
        }
        self.frame_framing(raw);
        if let Framing::Multifd(parser) = &mut self.framing {
            let mut found = std::mem::take(&mut self.d.found);
            parser.pages(raw, &mut found);
            found.clear();
            self.d.found = found;
        }
    }

    /// Whether this planner found its channel to be a multifd channel
    /// whose packets it follows (false once it lost track of them).
    pub fn multifd(&self) -> bool {
        matches!(&self.framing, Framing::Multifd(p) if p.lost.is_none())
    }

    /// Re-migration ([`super::keep`]): `rec` records every page this
    /// planner inserts into its ring (the copy this host keeps), and a page
    /// whose SHA-256 is in what the receiver announced (`have`, once set)
    /// goes as a HAVE reference to it. Needs a ring (no effect without).
    pub fn set_keep(&mut self, rec: Option<Arc<Recorder>>, have: Option<Arc<OnceLock<PeerHas>>>) {
        if self.ring.cap > 0 {
            self.ring.rec = rec;
            self.have = have;
        }
    }

    /// Lets re-sent pages go as DELTA ops against their previous version
    /// (only when the receiver's [`Rebuilder`] understands them: the peer
    /// agreed in the hello). Off by default.
    pub fn set_delta(&mut self, on: bool) {
        self.d.on = on && self.ring.cap > 0;
        if !self.d.on {
            self.d.last = IdMap::default();
        }
    }

    /// Most entries of the page -> previous version map: twice the pages
    /// the ring and its spill file hold (entries beyond the window are
    /// dropped when it fills).
    fn last_cap(&self) -> usize {
        2 * (self.ring.cap + self.ring.spill_cap()) as usize + 4096
    }

    /// Records that the receiver holds the current version of page `key`
    /// at ring index `idx`.
    fn note_last(&mut self, key: u64, idx: u64) {
        self.d.last.insert(key, idx);
        if self.d.last.len() > self.last_cap() {
            let lo = self.ring.lo();
            self.d.last.retain(|_, v| *v >= lo);
            // Many pages referring to few ring entries: start over rather
            // than scan again on every insert (costs deltas, never pages).
            if self.d.last.len() > self.last_cap() / 2 {
                self.d.last.clear();
            }
        }
    }

    fn block_tag(&mut self, name: &[u8]) -> u64 {
        let blocks = &mut self.d.blocks;
        if let Some(&t) = blocks.get(name) {
            return t;
        }
        let t = (blocks.len() as u64).min(MAX_BLOCKS - 1);
        if (blocks.len() as u64) < MAX_BLOCKS {
            blocks.insert(name.to_vec(), t);
        }
        t
    }

    /// A planner whose ring is extended by `spill_pages` pages in an
    /// unlinked file in `dir` (pages leaving the in-memory ring go there, so
    /// the peer's [`Rebuilder::with_spill`] of the same sizes can resolve
    /// references to them). The index of spilled pages costs about 40 bytes
    /// of memory per page. `spill_pages` 0 (or no ring) is [`Planner::new`].
    pub fn with_spill(
        dedup_cache_bytes: usize,
        spill_pages: u64,
        dir: &std::path::Path,
    ) -> std::io::Result<Self> {
        let mut p = Planner::new(dedup_cache_bytes);
        if spill_pages > 0 && p.ring.cap > 0 {
            p.ring.spill = Some(Spill::create(dir, spill_pages)?);
        }
        Ok(p)
    }

    /// Faults in the ring memory the next `pages` inserts will use, so that
    /// a measurement sees the steady state of a long-lived channel
    /// (`dwcp benchmark hde`).
    pub fn prefault(&mut self, pages: usize) {
        self.ring.prefault(pages);
        self.index.reserve(pages.min(self.ring.cap as usize));
        self.slot_hash.reserve(pages.min(self.ring.cap as usize));
    }

    /// Counters since creation.
    pub fn stats(&self) -> PlanStats {
        self.stats
    }

    /// Delta counters since creation.
    pub fn delta_stats(&self) -> DeltaStats {
        self.d.st
    }

    /// Delta counters since the last call (the session adds them up).
    pub fn new_delta_stats(&mut self) -> DeltaStats {
        let (st, r) = (self.d.st, self.d.reported);
        self.d.reported = st;
        DeltaStats {
            pages_resent: st.pages_resent - r.pages_resent,
            pages_delta: st.pages_delta - r.pages_delta,
            resent_lz4_full: st.resent_lz4_full - r.resent_lz4_full,
            resent_lz4_delta: st.resent_lz4_delta - r.resent_lz4_delta,
        }
    }

    /// Plans `raw` (any length; frames are at most [`MAX_RAW_LEN`]) into
    /// `out` (cleared first). For `raw.len() <= MAX_RAW_LEN` the plan is at
    /// most [`MAX_PLAN_LEN`] bytes.
    pub fn plan(&mut self, raw: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(raw.len() + raw.len() / 256 + 16);
        self.stats.raw_bytes += raw.len() as u64;
        let mut em = Emitter { out, zero_bytes: 0 };
        self.frame_framing(raw);
        if !self.ring_sent {
            // The channel's first planned frame: a multifd channel's ring
            // is announced before anything enters it.
            self.ring_sent = true;
            if let (Framing::Multifd(_), Some(pages)) = (&self.framing, self.multifd_ring) {
                self.ring.resize(pages);
                em.out.push(OP_RING);
                put_varint(em.out, pages);
            }
        }
        if self.ring.cap == 0 {
            em.region(raw, 0, raw.len());
        } else if let Framing::Multifd(parser) = &mut self.framing {
            let mut found = std::mem::take(&mut self.d.found);
            found.clear();
            parser.pages(raw, &mut found);
            let mut region_start = 0;
            for &(at, key) in &found {
                em.region(raw, region_start, at);
                self.page(&raw[at..at + PAGE_SIZE], key, &mut em);
                region_start = at + PAGE_SIZE;
            }
            em.region(raw, region_start, raw.len());
            self.d.found = found;
        } else {
            let mut region_start = 0;
            while let Some(rec) = find_record(raw, region_start) {
                let ds = rec.ds;
                em.region(raw, region_start, ds);
                if let Some(b) = rec.block {
                    self.d.cur_block = self.block_tag(b);
                }
                let key = page_key(self.d.cur_block, rec.addr);
                self.page(&raw[ds..ds + PAGE_SIZE], key, &mut em);
                region_start = ds + PAGE_SIZE;
            }
            em.region(raw, region_start, raw.len());
        }
        self.stats.zero_bytes += em.zero_bytes;
        debug_assert!(raw.len() > MAX_RAW_LEN || out.len() <= MAX_PLAN_LEN);
    }

    fn page(&mut self, data: &[u8], key: u64, em: &mut Emitter<'_>) {
        self.stats.pages_seen += 1;
        if is_zero(data) {
            em.zero(PAGE_SIZE);
            if self.d.on {
                self.d.last.remove(&key);
            }
            return;
        }
        let h = (self.hash)(data);
        if let Some(&idx) = self.index.get(&h) {
            // Never trust the hash alone (and a page the spill file cannot
            // give back is no match).
            if matches!(self.ring.get(idx), Ok(Some(p)) if p == data) {
                em.out.push(OP_REF);
                put_varint(em.out, idx);
                self.stats.pages_deduped += 1;
                if self.d.on {
                    self.note_last(key, idx);
                }
                return;
            }
        }
        if let Some((sh, own)) = self.xref.clone() {
            if let Some(c) = sh.candidate(own, h) {
                self.d.xref_buf.resize(PAGE_SIZE, 0);
                // Never trust the hash alone: compare with this end's copy.
                if matches!(sh.read(c.channel, c.idx, &mut self.d.xref_buf), Ok(true))
                    && self.d.xref_buf == data
                {
                    em.out.push(OP_XREF);
                    put_varint(em.out, u64::from(c.channel));
                    put_varint(em.out, c.idx);
                    em.out.extend_from_slice(&xxh3_64(data).to_le_bytes());
                    self.stats.pages_deduped += 1;
                    self.stats.pages_xref += 1;
                    let idx = self.insert(h, data);
                    if self.d.on {
                        self.note_last(key, idx);
                    }
                    return;
                }
            }
        }
        if let Some(has) = self.have.as_ref().and_then(|h| h.get()) {
            if let Some(i) = has.get(&keep::page_hash(data)) {
                em.out.push(OP_HAVE);
                put_varint(em.out, i as u64);
                self.stats.pages_kept += 1;
                let idx = self.insert(h, data);
                if self.d.on {
                    self.note_last(key, idx);
                }
                return;
            }
        }
        if let Some(&base) = self.d.last.get(&key) {
            if self.try_delta(base, data, em) {
                if self.sent.len() < SENT_TRACK_PAGES {
                    self.sent.insert(h);
                }
                let idx = self.insert(h, data);
                self.note_last(key, idx);
                return;
            }
        }
        // A run of >= MIN_ZERO_RUN zeros always covers a whole ZBLK block
        // of the grid starting at the page start.
        if data.chunks_exact(ZBLK).any(is_zero) {
            em.region(data, 0, PAGE_SIZE);
            em.out.push(OP_MARK);
        } else {
            em.out.push(OP_PAGE);
            em.out.extend_from_slice(data);
        }
        if self.sent.contains(&h) {
            self.stats.pages_missed_dups += 1;
        } else if self.sent.len() < SENT_TRACK_PAGES {
            self.sent.insert(h);
        }
        let idx = self.insert(h, data);
        if self.d.on {
            self.note_last(key, idx);
        }
    }

    /// Emits `data` as a DELTA against ring index `base` (the previous
    /// version of the same guest page) if that is at most half the page
    /// alone, by the LZ4 size of each; false (nothing emitted) otherwise,
    /// or when the ring no longer holds `base`.
    fn try_delta(&mut self, base: u64, data: &[u8], em: &mut Emitter<'_>) -> bool {
        // The hash the page had when it went into the ring: a spill slot
        // whose write failed on this end (the receiver's holds the page)
        // reads back as something else, and is no base.
        let want = if base >= self.ring.mem_lo() {
            self.slot_hash.get((base % self.ring.cap) as usize)
        } else {
            let scap = self.ring.spill_cap().max(1);
            self.spill_hash.get((base % scap) as usize)
        }
        .copied();
        let hash = self.hash;
        let Ok(Some(b)) = self.ring.get(base) else {
            return false;
        };
        if want != Some(hash(b)) {
            return false;
        }
        let d = &mut *self.d;
        d.xor.clear();
        d.xor.extend(b.iter().zip(data).map(|(x, y)| x ^ y));
        d.st.pages_resent += 1;
        delta_runs(&d.xor, &mut d.runs);
        let full = lz4_size(data, &mut d.lz);
        let delta = lz4_size(&d.runs, &mut d.lz) + 12;
        // At most half the page's own LZ4 size: the frame's compressor sees
        // a full page beside its neighbours (text, code), a delta alone, so
        // a per-page estimate that only just favours the delta does not pay
        // (measured: docs/hde.md, layer 2). And the op stays no larger than
        // a PAGE op (the plan's size bound).
        let take = delta * 2 <= full && d.runs.len() <= PAGE_SIZE - 16;
        d.st.resent_lz4_full += full as u64;
        d.st.resent_lz4_delta += if take { delta } else { full } as u64;
        if !take {
            return false;
        }
        d.st.pages_delta += 1;
        em.out.push(OP_DELTA);
        put_varint(em.out, base);
        em.out.extend_from_slice(&xxh3_64(data).to_le_bytes());
        put_varint(em.out, d.runs.len() as u64);
        em.out.extend_from_slice(&d.runs);
        true
    }

    fn insert(&mut self, h: u64, data: &[u8]) -> u64 {
        let cap = self.ring.cap;
        let idx = self.ring.count;
        let slot = (idx % cap) as usize;
        if idx >= cap {
            // The slot is overwritten: its page leaves memory.
            let old = idx - cap;
            let oh = self.slot_hash[slot];
            let scap = self.ring.spill_cap();
            if scap > 0 {
                // It moves to the spill file, whose slot's page leaves the
                // window: forget that one instead.
                let d = (old % scap) as usize;
                if old >= scap {
                    let gone = old - scap;
                    let gh = self.spill_hash[d];
                    if self.index.get(&gh) == Some(&gone) {
                        self.index.remove(&gh);
                    }
                    self.spill_hash[d] = oh;
                } else {
                    debug_assert_eq!(d, self.spill_hash.len());
                    self.spill_hash.push(oh);
                }
            } else if self.index.get(&oh) == Some(&old) {
                self.index.remove(&oh);
            }
            self.slot_hash[slot] = h;
        } else {
            self.slot_hash.push(h);
        }
        // A spill write that fails leaves a slot that no longer matches
        // what it claims: every later match is verified byte for byte, so
        // it only costs the reference.
        let _ = self.ring.insert(data);
        self.index.insert(h, idx);
        if let Some((sh, ch)) = &self.xref {
            sh.indexed(*ch, idx, h);
        }
        idx
    }
}

/// Encodes the XOR of two pages as runs `skip len bytes` (gaps of zeros
/// shorter than [`DELTA_MIN_GAP`] stay inside a run) into `out` (cleared).
fn delta_runs(xor: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut prev = 0;
    let mut i = 0;
    while i < xor.len() {
        if xor[i] == 0 {
            i += 1;
            continue;
        }
        let start = i;
        let mut end = i + 1;
        let mut j = end;
        while j < xor.len() && j - end < DELTA_MIN_GAP {
            if xor[j] != 0 {
                end = j + 1;
            }
            j += 1;
        }
        put_varint(out, (start - prev) as u64);
        put_varint(out, (end - start) as u64);
        out.extend_from_slice(&xor[start..end]);
        prev = end;
        i = end;
    }
}

/// Bytes LZ4 makes of `d` (its length when it does not shrink).
fn lz4_size(d: &[u8], scratch: &mut Vec<u8>) -> usize {
    if d.is_empty() {
        return 0;
    }
    super::lz4_compress(d, scratch, d.len() - 1).unwrap_or(d.len())
}

/// Receiver side: plan -> raw bytes. One per channel direction, called in
/// stream order.
pub struct Rebuilder {
    ring: Ring,
    /// The kept copy this end announced (HAVE ops read from it).
    kept: Option<Arc<KeptCopy>>,
    /// A page read from the kept copy.
    kept_buf: Vec<u8>,
    /// The channel's context stream ([`super::context`]), from its first
    /// such frame on, and the plan it decodes into.
    context: Option<Box<(super::context::ContextDecoder, Vec<u8>)>>,
    /// No frame rebuilt yet (an [`OP_RING`] may come).
    first: bool,
    /// A page read from another channel's spill file (XREF).
    xref_buf: Vec<u8>,
}

impl fmt::Debug for Rebuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rebuilder")
            .field("ring_pages", &self.ring.cap)
            .field("inserted", &self.ring.count)
            .finish()
    }
}

impl Rebuilder {
    /// New rebuilder; `dedup_cache_bytes` must equal the sender's.
    pub fn new(dedup_cache_bytes: usize) -> Self {
        Rebuilder {
            ring: Ring::new(dedup_cache_bytes),
            kept: None,
            kept_buf: Vec::new(),
            context: None,
            first: true,
            xref_buf: Vec::new(),
        }
    }

    /// Resolves other channels' XREF ops to this channel's pages, and this
    /// channel's to theirs, through `shared` (this channel being
    /// `channel`); needs a spill file. Call before the first frame.
    pub fn set_xref(&mut self, shared: Arc<Shared>, channel: u16) {
        self.ring.share(shared, channel);
    }

    /// Decodes the channel's next context frame (`wire`, a plan of
    /// `plan_len` bytes; frames in the channel's order) and executes its
    /// plan into `out`, as [`Rebuilder::rebuild`].
    pub fn rebuild_context(
        &mut self,
        wire: &[u8],
        plan_len: usize,
        raw_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        let mut ctx = match self.context.take() {
            Some(c) => c,
            None => Box::new((super::context::ContextDecoder::new()?, Vec::new())),
        };
        let (dec, plan) = &mut *ctx;
        let r = dec
            .decompress(wire, plan_len, plan)
            .and_then(|()| self.rebuild(plan, raw_len, out));
        self.context = Some(ctx);
        r
    }

    /// Re-migration ([`super::keep`]): `rec` records every page this end
    /// inserts into its ring, and HAVE ops read from `kept`, the copy this
    /// end announced. Needs a ring (no effect without).
    pub fn set_keep(&mut self, rec: Option<Arc<Recorder>>, kept: Option<Arc<KeptCopy>>) {
        if self.ring.cap > 0 {
            self.ring.rec = rec;
            self.kept = kept;
        }
    }

    /// A rebuilder whose ring is extended by `spill_pages` pages in an
    /// unlinked file in `dir`; sizes must equal the sender's
    /// ([`Planner::with_spill`]).
    pub fn with_spill(
        dedup_cache_bytes: usize,
        spill_pages: u64,
        dir: &std::path::Path,
    ) -> std::io::Result<Self> {
        let mut r = Rebuilder::new(dedup_cache_bytes);
        if spill_pages > 0 && r.ring.cap > 0 {
            r.ring.spill = Some(Spill::create(dir, spill_pages)?);
        }
        Ok(r)
    }

    /// Faults in the ring memory the next `pages` inserts will use, so that
    /// a measurement sees the steady state of a long-lived channel
    /// (`dwcp benchmark hde`).
    pub fn prefault(&mut self, pages: usize) {
        self.ring.prefault(pages);
    }

    /// Ring pages holding data (the ring's memory is touched page by page
    /// as it fills, up to its capacity).
    pub fn ring_pages_used(&self) -> u64 {
        self.ring.count.min(self.ring.cap)
    }

    /// The ring's capacity, pages.
    pub fn ring_capacity(&self) -> u64 {
        self.ring.cap
    }

    /// Executes `plan` into `out` (cleared first), which must come out
    /// exactly `raw_len` bytes long. Errors (never panics) on malformed
    /// plans; after an error the ring state is unspecified.
    pub fn rebuild(
        &mut self,
        plan: &[u8],
        raw_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        out.clear();
        if raw_len > MAX_RAW_LEN {
            return Err(CodecError::RawTooLong {
                raw_len,
                max: MAX_RAW_LEN,
            });
        }
        if plan.len() > MAX_PLAN_LEN {
            return Err(CodecError::PlanTooLong {
                plan_len: plan.len(),
                max: MAX_PLAN_LEN,
            });
        }
        out.reserve_exact(raw_len);
        let first = std::mem::replace(&mut self.first, false);
        let mut p = 0usize;
        while p < plan.len() {
            let offset = p;
            let tag = plan[p];
            p += 1;
            let room = |out: &Vec<u8>, len: u64| -> Result<usize, CodecError> {
                if len > (raw_len - out.len()) as u64 {
                    Err(CodecError::OutputOverflow {
                        offset,
                        len,
                        at: out.len(),
                        raw_len,
                    })
                } else {
                    Ok(len as usize)
                }
            };
            let literal = |p: usize, len: u64| -> Result<(), CodecError> {
                let have = plan.len() - p;
                if len > have as u64 {
                    Err(CodecError::TruncatedLiteral {
                        offset,
                        need: len,
                        have,
                    })
                } else {
                    Ok(())
                }
            };
            match tag {
                OP_LIT => {
                    let len = get_varint(plan, &mut p)?;
                    literal(p, len)?;
                    let len = room(out, len)?;
                    out.extend_from_slice(&plan[p..p + len]);
                    p += len;
                }
                OP_ZERO => {
                    let len = get_varint(plan, &mut p)?;
                    let len = room(out, len)?;
                    out.resize(out.len() + len, 0);
                }
                OP_PAGE => {
                    literal(p, PAGE_SIZE as u64)?;
                    room(out, PAGE_SIZE as u64)?;
                    let page = &plan[p..p + PAGE_SIZE];
                    out.extend_from_slice(page);
                    self.ring.insert(page)?;
                    p += PAGE_SIZE;
                }
                OP_REF => {
                    let idx = get_varint(plan, &mut p)?;
                    let (lo, hi) = (self.ring.lo(), self.ring.count);
                    let Some(page) = self.ring.get(idx)? else {
                        return Err(CodecError::RefOutOfWindow { idx, lo, hi });
                    };
                    room(out, PAGE_SIZE as u64)?;
                    out.extend_from_slice(page);
                }
                OP_MARK => {
                    let Some(start) = out.len().checked_sub(PAGE_SIZE) else {
                        return Err(CodecError::MarkUnderflow {
                            offset,
                            have: out.len(),
                        });
                    };
                    self.ring.insert(&out[start..])?;
                }
                OP_DELTA => {
                    let base = get_varint(plan, &mut p)?;
                    literal(p, 8)?;
                    let want = u64::from_le_bytes(plan[p..p + 8].try_into().expect("8 bytes"));
                    p += 8;
                    let len = get_varint(plan, &mut p)?;
                    literal(p, len)?;
                    let end = p + len as usize;
                    room(out, PAGE_SIZE as u64)?;
                    let (lo, hi) = (self.ring.lo(), self.ring.count);
                    let Some(b) = self.ring.get(base)? else {
                        return Err(CodecError::DeltaBase { base, lo, hi });
                    };
                    let start = out.len();
                    out.extend_from_slice(b);
                    apply_runs(&plan[..end], p, &mut out[start..])?;
                    p = end;
                    if xxh3_64(&out[start..]) != want {
                        return Err(CodecError::DeltaMismatch { offset, base });
                    }
                    self.ring.insert(&out[start..])?;
                }
                OP_HAVE => {
                    let idx = get_varint(plan, &mut p)?;
                    room(out, PAGE_SIZE as u64)?;
                    let Some(k) = &self.kept else {
                        return Err(CodecError::NoKeptCopy { idx });
                    };
                    self.kept_buf.resize(PAGE_SIZE, 0);
                    k.read(idx, &mut self.kept_buf)?;
                    out.extend_from_slice(&self.kept_buf);
                    self.ring.insert(&self.kept_buf)?;
                }
                OP_XREF => {
                    let ch = get_varint(plan, &mut p)?;
                    let idx = get_varint(plan, &mut p)?;
                    literal(p, 8)?;
                    let want = u64::from_le_bytes(plan[p..p + 8].try_into().expect("8 bytes"));
                    p += 8;
                    room(out, PAGE_SIZE as u64)?;
                    let xerr = |why: &'static str| CodecError::Xref {
                        channel: ch,
                        idx,
                        why,
                    };
                    let Some((sh, own, _)) = &self.ring.share else {
                        return Err(xerr("this channel takes no cross-channel references (not agreed, or no spill file)"));
                    };
                    let Ok(c) = u16::try_from(ch) else {
                        return Err(xerr("no such channel"));
                    };
                    if c == *own {
                        return Err(xerr("a channel's own pages go as REF"));
                    }
                    self.xref_buf.resize(PAGE_SIZE, 0);
                    match sh.read(c, idx, &mut self.xref_buf) {
                        Ok(true) => {}
                        Ok(false) => {
                            return Err(xerr(
                                "that channel (or its spill file) does not hold that page",
                            ))
                        }
                        Err(source) => {
                            return Err(CodecError::Spill {
                                op: "read",
                                idx,
                                source,
                            })
                        }
                    }
                    if xxh3_64(&self.xref_buf) != want {
                        return Err(xerr(
                            "the page there is not the one referred to (overwritten since)",
                        ));
                    }
                    out.extend_from_slice(&self.xref_buf);
                    self.ring.insert(&self.xref_buf)?;
                }
                OP_RING => {
                    let pages = get_varint(plan, &mut p)?;
                    if !first || offset != 0 || pages == 0 || pages > self.ring.cap {
                        return Err(CodecError::BadRing {
                            pages,
                            offset,
                            cap: self.ring.cap,
                        });
                    }
                    self.ring.resize(pages);
                }
                _ => return Err(CodecError::BadTag { tag, offset }),
            }
        }
        if out.len() != raw_len {
            return Err(CodecError::OutputShort {
                got: out.len(),
                raw_len,
            });
        }
        Ok(())
    }
}

/// XORs the runs `plan[p..]` (see [`OP_DELTA`]) into `page`.
fn apply_runs(plan: &[u8], mut p: usize, page: &mut [u8]) -> Result<(), CodecError> {
    let mut pos = 0usize;
    while p < plan.len() {
        let offset = p;
        let skip = get_varint(plan, &mut p)?;
        let len = get_varint(plan, &mut p)?;
        let left = (page.len() - pos) as u64;
        if skip > left || len > left - skip {
            return Err(CodecError::DeltaRun {
                offset,
                at: pos as u64 + skip.min(left),
                len,
            });
        }
        let have = plan.len() - p;
        if len > have as u64 {
            return Err(CodecError::TruncatedLiteral {
                offset,
                need: len,
                have,
            });
        }
        let (a, len) = (pos + skip as usize, len as usize);
        for (d, s) in page[a..a + len].iter_mut().zip(&plan[p..p + len]) {
            *d ^= s;
        }
        p += len;
        pos = a + len;
    }
    Ok(())
}
