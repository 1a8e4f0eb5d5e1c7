use super::plan::{OP_LIT, OP_MARK, OP_PAGE, OP_REF, OP_ZERO};
use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TIERS: [Tier; 5] = [
    Tier::None,
    Tier::Lz4,
    Tier::Zstd(-7),
    Tier::Zstd(1),
    Tier::Zstd(3),
];

struct Totals {
    plan: usize,
    wire: usize,
    stats: PlanStats,
}

/// Full sender + receiver round trip over `data` cut into chunks of
/// `chunks` sizes (cycled).
fn roundtrip(data: &[u8], tier: Tier, chunks: &[usize], cache: usize) -> Totals {
    let mut planner = Planner::new(cache);
    let mut comp = Compressor::new();
    let mut dec = Decompressor::new();
    let mut rb = Rebuilder::new(cache);
    let (mut plan, mut wire, mut plan2, mut raw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut t = Totals {
        plan: 0,
        wire: 0,
        stats: PlanStats::default(),
    };
    let mut pos = 0;
    let mut k = 0;
    while pos < data.len() {
        let n = chunks[k % chunks.len()].min(data.len() - pos);
        k += 1;
        let c = &data[pos..pos + n];
        planner.plan(c, &mut plan);
        assert!(plan.len() <= MAX_PLAN_LEN);
        assert!(
            plan.len() <= c.len() + c.len() / 400 + 8,
            "plan {} raw {}",
            plan.len(),
            c.len()
        );
        let id = comp.compress(tier, &plan, &mut wire);
        if tier == Tier::None {
            assert_eq!(id, CodecId::None);
        }
        if id != CodecId::None {
            assert!(wire.len() < plan.len());
        }
        dec.decompress(id, &wire, plan.len(), &mut plan2).unwrap();
        assert_eq!(plan, plan2);
        rb.rebuild(&plan2, c.len(), &mut raw).unwrap();
        assert!(raw == c, "mismatch at chunk {k} pos {pos} tier {tier}");
        t.plan += plan.len();
        t.wire += wire.len();
        pos += n;
    }
    t.stats = planner.stats();
    assert_eq!(t.stats.raw_bytes, data.len() as u64);
    t
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

fn text(rng: &mut StdRng, n: usize) -> Vec<u8> {
    const W: [&str; 12] = [
        "migration ",
        "page ",
        "qemu ",
        "the ",
        "ram ",
        "kernel ",
        "dirty ",
        "bitmap\n",
        "block ",
        "vcpu ",
        "0x7fff ",
        "{\"execute\": ",
    ];
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(W[rng.gen_range(0..W.len())].as_bytes());
    }
    v.truncate(n);
    v
}

fn page_content(rng: &mut StdRng, kind: u32) -> Vec<u8> {
    match kind % 4 {
        0 => random_bytes(rng, PAGE_SIZE),
        1 => text(rng, PAGE_SIZE),
        2 => {
            // Sparse: mostly zero with a few words.
            let mut p = vec![0u8; PAGE_SIZE];
            for _ in 0..rng.gen_range(1..20) {
                let i = rng.gen_range(0..PAGE_SIZE);
                p[i] = rng.gen_range(1..=255);
            }
            p
        }
        _ => {
            let mut p = text(rng, PAGE_SIZE / 2);
            p.resize(PAGE_SIZE, 0);
            p
        }
    }
}

fn header(offset: u64, flags: u8) -> [u8; 8] {
    (offset | u64::from(flags)).to_be_bytes()
}

/// Synthetic QEMU precopy RAM stream: `n` page records; `dup` fraction
/// duplicates of earlier pages, ~10% zero pages, ZERO-flag records, block
/// switches with idstr, EOS + section bytes and garbage in between.
fn qemu_stream(rng: &mut StdRng, n: usize, dup: f64) -> Vec<u8> {
    let mut s = Vec::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut offset = 0u64;
    let mut first = true;
    for i in 0..n {
        if rng.gen_bool(0.02) {
            // End of section + next section part header + garbage.
            s.extend_from_slice(&header(0, 0x10));
            s.push(0x02);
            let g = rng.gen_range(0..40);
            s.extend(random_bytes(rng, g));
            first = true;
        }
        if rng.gen_bool(0.05) {
            // QEMU zero-page record (flag 0x22) + fill byte.
            s.extend_from_slice(&header(offset, 0x22));
            s.push(0);
            offset += PAGE_SIZE as u64;
        }
        if first {
            s.extend_from_slice(&header(offset, FLAG_PAGE_TEST));
            let id: &[u8] = if i % 2 == 0 {
                b"pc.ram"
            } else {
                b"0000:00:02.0/vga.vram"
            };
            s.push(id.len() as u8);
            s.extend_from_slice(id);
            first = false;
        } else {
            s.extend_from_slice(&header(offset, 0x28));
        }
        let r: f64 = rng.gen();
        let page = if r < 0.1 {
            vec![0u8; PAGE_SIZE]
        } else if r < 0.1 + dup && !pool.is_empty() {
            pool[rng.gen_range(0..pool.len())].clone()
        } else {
            let kind = rng.gen();
            let p = page_content(rng, kind);
            pool.push(p.clone());
            p
        };
        s.extend_from_slice(&page);
        offset += PAGE_SIZE as u64 * rng.gen_range(1..4);
    }
    s.extend_from_slice(&header(0, 0x10));
    s
}

const FLAG_PAGE_TEST: u8 = 0x08;

/// Bytes that look like record headers almost everywhere.
fn adversarial(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut s: Vec<u8> = Vec::with_capacity(n + 8192);
    while s.len() < n {
        match rng.gen_range(0..9) {
            0 => s.extend_from_slice(&header(rng.gen_range(0..1 << 20) << 12, 0x28)),
            1 => {
                s.extend_from_slice(&header(rng.gen_range(0..1 << 20) << 12, 0x08));
                let l = rng.gen_range(0..6u8);
                s.push(l);
                for _ in 0..l {
                    s.push(rng.gen_range(0x1f..0x81));
                }
            }
            2 => {
                let l = rng.gen_range(0..PAGE_SIZE + 16);
                s.extend(random_bytes(rng, l));
            }
            3 => {
                let l = rng.gen_range(500..530);
                s.resize(s.len() + l, 0);
            }
            4 if s.len() > 10 => {
                // Copy of an earlier segment (possibly page-sized).
                let l = if rng.gen_bool(0.5) {
                    PAGE_SIZE
                } else {
                    rng.gen_range(1..5000)
                };
                let a = rng.gen_range(0..s.len());
                let e = (a + l).min(s.len());
                let seg = s[a..e].to_vec();
                s.extend_from_slice(&seg);
            }
            5 => {
                let b = [0x08u8, 0x28, 0x00][rng.gen_range(0..3)];
                let l = rng.gen_range(1..64);
                s.resize(s.len() + l, b);
            }
            6 => {
                let l = rng.gen_range(1..300);
                s.resize(s.len() + l, 0);
            }
            7 => {
                s.extend_from_slice(&header(0, 0x28));
                s.resize(s.len() + PAGE_SIZE, rng.gen_range(0..3));
            }
            _ => s.extend_from_slice(&header(0, rng.gen())),
        }
    }
    s.truncate(n);
    s
}

const CHUNKS: [usize; 4] = [MAX_RAW_LEN, 65_537, 300_001, 4_099];
const CACHE: usize = 64 << 20;

#[test]
fn codec_id_and_tier_parse() {
    for b in 0..=255u8 {
        let id = CodecId::from_wire(b);
        match b {
            1..=5 => assert_eq!(id.unwrap() as u8, b),
            _ => assert!(id.is_none()),
        }
    }
    assert_eq!("raw".parse::<Tier>().unwrap(), Tier::Raw);
    assert_eq!("none".parse::<Tier>().unwrap(), Tier::None);
    assert_eq!("lz4".parse::<Tier>().unwrap(), Tier::Lz4);
    assert_eq!("zstd".parse::<Tier>().unwrap(), Tier::Zstd(3));
    assert_eq!("zstd:-7".parse::<Tier>().unwrap(), Tier::Zstd(-7));
    assert_eq!("zstd:19".parse::<Tier>().unwrap(), Tier::Zstd(19));
    for bad in ["zstd:20", "zstd:-8", "zstd:", "zstd:x", "gzip", "", "lz4:1"] {
        let e = bad.parse::<Tier>().unwrap_err().to_string();
        assert!(e.contains("-7..=19") && e.contains("lz4"), "{e}");
    }
    for l in -7..=19 {
        let t = Tier::Zstd(l);
        assert_eq!(t.to_string().parse::<Tier>().unwrap(), t);
    }
    for t in [Tier::Raw, Tier::None, Tier::Lz4] {
        assert_eq!(t.to_string().parse::<Tier>().unwrap(), t);
    }
}

#[test]
fn codec_roundtrip_basic_inputs() {
    let mut rng = StdRng::seed_from_u64(1);
    let inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![7],
        random_bytes(&mut rng, 3 << 20),
        vec![0u8; 3 << 20],
        text(&mut rng, 3 << 20),
        {
            let mut v = vec![0u8; 1000];
            v.extend(random_bytes(&mut rng, 1000));
            v.extend(vec![0u8; 511]);
            v.push(1);
            v.extend(vec![0u8; 512]);
            v.push(1);
            v.extend(vec![0u8; 513]);
            v
        },
    ];
    for d in &inputs {
        for tier in TIERS {
            for cache in [0, CACHE] {
                roundtrip(d, tier, &CHUNKS, cache);
            }
        }
    }
    // Zeros collapse.
    let t = roundtrip(&inputs[3], Tier::None, &[MAX_RAW_LEN], CACHE);
    assert!(t.plan < 64, "plan {}", t.plan);
    assert_eq!(t.stats.zero_bytes, 3 << 20);
    // Random data: plan overhead is tiny, compression falls back to none.
    let t = roundtrip(&inputs[2], Tier::Zstd(3), &[MAX_RAW_LEN], CACHE);
    assert!(t.wire <= (3 << 20) + 64);
}

#[test]
fn codec_qemu_stream_dedup() {
    let mut rng = StdRng::seed_from_u64(2);
    let s = qemu_stream(&mut rng, 2000, 0.3);
    for tier in TIERS {
        for chunks in [&CHUNKS[..], &[MAX_RAW_LEN], &[12_345, 777_777]] {
            let t = roundtrip(&s, tier, chunks, CACHE);
            assert!(t.stats.pages_seen > 1800, "{:?}", t.stats);
            assert!(t.stats.pages_deduped > 300, "{:?}", t.stats);
        }
    }
    // Dedup disabled: still lossless, nothing deduped.
    let t = roundtrip(&s, Tier::Lz4, &CHUNKS, 0);
    assert_eq!(t.stats.pages_deduped, 0);
    let with = roundtrip(&s, Tier::None, &[MAX_RAW_LEN], CACHE);
    assert!(with.plan < t.plan);
}

#[test]
fn codec_duplicate_pages_shrink_plan() {
    let mut rng = StdRng::seed_from_u64(3);
    let page = random_bytes(&mut rng, PAGE_SIZE);
    let mut s = Vec::new();
    for i in 0..200u64 {
        s.extend_from_slice(&header(i << 12, 0x28));
        s.extend_from_slice(&page);
    }
    let mut p = Planner::new(CACHE);
    let mut plan = Vec::new();
    p.plan(&s, &mut plan);
    let st = p.stats();
    assert_eq!(st.pages_seen, 200);
    assert_eq!(st.pages_deduped, 199);
    assert!(plan.len() < PAGE_SIZE + 200 * 16, "plan {}", plan.len());
    let mut rb = Rebuilder::new(CACHE);
    let mut out = Vec::new();
    rb.rebuild(&plan, s.len(), &mut out).unwrap();
    assert_eq!(out, s);
    // Across frames too.
    p.plan(&s, &mut plan);
    assert_eq!(p.stats().pages_deduped, 399);
    rb.rebuild(&plan, s.len(), &mut out).unwrap();
    assert_eq!(out, s);
}

#[test]
fn codec_sparse_pages_dedup_and_zero() {
    let mut rng = StdRng::seed_from_u64(12);
    let mut pages = Vec::new();
    for _ in 0..20 {
        pages.push(page_content(&mut rng, 2));
        pages.push(page_content(&mut rng, 3));
    }
    let mut s = Vec::new();
    for i in 0..400u64 {
        s.extend_from_slice(&header(i << 12, 0x28));
        s.extend_from_slice(&pages[rng.gen_range(0..pages.len())]);
    }
    let t = roundtrip(&s, Tier::None, &[MAX_RAW_LEN, 50_000], CACHE);
    assert!(t.stats.pages_deduped >= 300, "{:?}", t.stats);
    assert!(t.stats.zero_bytes > 40 * 2048, "{:?}", t.stats);
    for tier in TIERS {
        roundtrip(&s, tier, &[MAX_RAW_LEN, 7_777], 8 * PAGE_SIZE);
    }
}

#[test]
fn codec_hash_collisions_stay_lossless() {
    let mut rng = StdRng::seed_from_u64(13);
    let s = qemu_stream(&mut rng, 600, 0.4);
    for hash in [|_: &[u8]| 0u64, |d: &[u8]| u64::from(d[0] & 1)] {
        for cache in [3 * PAGE_SIZE, CACHE] {
            let mut p = Planner::new(cache);
            p.hash = hash;
            let mut rb = Rebuilder::new(cache);
            let (mut plan, mut out) = (Vec::new(), Vec::new());
            for c in s.chunks(100_000) {
                p.plan(c, &mut plan);
                rb.rebuild(&plan, c.len(), &mut out).unwrap();
                assert!(out == c);
            }
            assert!(p.stats().pages_deduped > 0);
        }
    }
}

#[test]
fn codec_small_ring_eviction() {
    let mut rng = StdRng::seed_from_u64(4);
    for seed in 0..10 {
        let mut rng2 = StdRng::seed_from_u64(seed);
        // 64 distinct pages cycled through a ring of 8 pages, and random
        // re-use at short distances.
        let pages: Vec<Vec<u8>> = (0..64).map(|_| random_bytes(&mut rng, PAGE_SIZE)).collect();
        let mut s = Vec::new();
        for i in 0..1000u64 {
            s.extend_from_slice(&header(i << 12, 0x28));
            let k = if rng2.gen_bool(0.5) {
                (i % 64) as usize
            } else {
                rng2.gen_range(0..64)
            };
            s.extend_from_slice(&pages[k]);
        }
        for cache in [
            PAGE_SIZE,
            8 * PAGE_SIZE,
            8 * PAGE_SIZE + 100,
            63 * PAGE_SIZE,
        ] {
            let t = roundtrip(&s, Tier::Lz4, &[100_000, 33_333], cache);
            assert!(t.stats.pages_seen > 900);
            if cache >= 8 * PAGE_SIZE {
                assert!(t.stats.pages_deduped > 0);
            }
        }
    }
}

#[test]
fn codec_property_random_mixtures() {
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.gen_range(0..600_000);
        let data = match seed % 3 {
            0 => adversarial(&mut rng, n),
            1 => {
                let dup = rng.gen();
                qemu_stream(&mut rng, n / 4200, dup)
            }
            _ => {
                let mut d = qemu_stream(&mut rng, n / 8400, 0.5);
                let a = adversarial(&mut rng, n / 2);
                let at = rng.gen_range(0..=d.len());
                d.splice(at..at, a);
                d
            }
        };
        let chunks: Vec<usize> = (0..3).map(|_| rng.gen_range(1..MAX_RAW_LEN)).collect();
        let cache = [0, PAGE_SIZE, 5 * PAGE_SIZE, CACHE][rng.gen_range(0..4)];
        let tier = TIERS[rng.gen_range(0..TIERS.len())];
        roundtrip(&data, tier, &chunks, cache);
        roundtrip(&data, tier, &[MAX_RAW_LEN], cache);
    }
}

#[test]
fn codec_adversarial_all_tiers() {
    let mut rng = StdRng::seed_from_u64(5);
    let d = adversarial(&mut rng, 4 << 20);
    for tier in TIERS {
        for cache in [0, 3 * PAGE_SIZE, CACHE] {
            roundtrip(&d, tier, &CHUNKS, cache);
        }
    }
    // Worst case plan size over a full frame of header look-alikes.
    let mut s = Vec::new();
    while s.len() < MAX_RAW_LEN {
        s.extend_from_slice(&header(0, 0x28));
        s.extend(random_bytes(&mut rng, PAGE_SIZE));
    }
    s.truncate(MAX_RAW_LEN);
    let mut p = Planner::new(CACHE);
    let mut plan = Vec::new();
    p.plan(&s, &mut plan);
    assert!(plan.len() <= MAX_RAW_LEN + 4096);
}

fn valid_plan(rng: &mut StdRng) -> (Vec<u8>, Vec<u8>) {
    let s = qemu_stream(rng, 100, 0.5);
    let mut p = Planner::new(CACHE);
    let mut plan = Vec::new();
    p.plan(&s, &mut plan);
    (s, plan)
}

#[test]
fn codec_corrupt_plans_error() {
    let mut rng = StdRng::seed_from_u64(6);
    let (s, plan) = valid_plan(&mut rng);
    let mut out = Vec::new();
    // Truncations.
    for cut in (0..plan.len()).step_by(97).chain([plan.len() - 1]) {
        let mut rb = Rebuilder::new(CACHE);
        assert!(rb.rebuild(&plan[..cut], s.len(), &mut out).is_err());
    }
    // Wrong raw_len.
    for raw_len in [0, s.len() - 1, s.len() + 1, MAX_RAW_LEN + 1, usize::MAX] {
        let mut rb = Rebuilder::new(CACHE);
        assert!(rb.rebuild(&plan, raw_len, &mut out).is_err());
        assert!(out.capacity() <= MAX_RAW_LEN.max(s.len() + 1));
    }
    let mut rb = Rebuilder::new(CACHE);
    let e = rb.rebuild(&[0x0a, 1], 1, &mut out).unwrap_err();
    assert!(
        matches!(e, CodecError::BadTag { tag: 10, offset: 0 }),
        "{e}"
    );
    assert!(rb.rebuild(&[0x00], 1, &mut out).is_err());
    assert!(matches!(
        rb.rebuild(&[OP_LIT, 0x80], 1, &mut out),
        Err(CodecError::TruncatedVarint { .. })
    ));
    assert!(matches!(
        rb.rebuild(
            &[OP_ZERO, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            1,
            &mut out
        ),
        Err(CodecError::VarintOverflow { .. })
    ));
    assert!(matches!(
        rb.rebuild(
            &[OP_ZERO, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            1,
            &mut out
        ),
        Err(CodecError::OutputOverflow { .. })
    ));
    assert!(matches!(
        rb.rebuild(&[OP_LIT, 5, 1, 2], 5, &mut out),
        Err(CodecError::TruncatedLiteral { .. })
    ));
    assert!(matches!(
        rb.rebuild(&[OP_PAGE, 1, 2], PAGE_SIZE, &mut out),
        Err(CodecError::TruncatedLiteral { .. })
    ));
    // REF window: ring of one page.
    let mut rb = Rebuilder::new(PAGE_SIZE);
    let mut pl = vec![OP_PAGE];
    pl.extend(vec![9u8; PAGE_SIZE]);
    assert!(matches!(
        rb.rebuild(&[OP_REF, 0], PAGE_SIZE, &mut out),
        Err(CodecError::RefOutOfWindow {
            idx: 0,
            lo: 0,
            hi: 0
        })
    ));
    rb.rebuild(&pl, PAGE_SIZE, &mut out).unwrap(); // idx 0
    rb.rebuild(&[OP_REF, 0], PAGE_SIZE, &mut out).unwrap();
    assert_eq!(out, vec![9u8; PAGE_SIZE]);
    assert!(rb.rebuild(&[OP_REF, 1], PAGE_SIZE, &mut out).is_err());
    rb.rebuild(&pl, PAGE_SIZE, &mut out).unwrap(); // idx 1 evicts 0
    assert!(matches!(
        rb.rebuild(&[OP_REF, 0], PAGE_SIZE, &mut out),
        Err(CodecError::RefOutOfWindow {
            idx: 0,
            lo: 1,
            hi: 2
        })
    ));
    rb.rebuild(&[OP_REF, 1], PAGE_SIZE, &mut out).unwrap();
    // No dedup: REF always out of window, PAGE still fine.
    let mut rb = Rebuilder::new(0);
    rb.rebuild(&pl, PAGE_SIZE, &mut out).unwrap();
    assert!(rb.rebuild(&[OP_REF, 0], PAGE_SIZE, &mut out).is_err());
    // Output longer than raw_len.
    let mut rb = Rebuilder::new(CACHE);
    assert!(matches!(
        rb.rebuild(&pl, PAGE_SIZE - 1, &mut out),
        Err(CodecError::OutputOverflow { .. })
    ));
    // MARK needs a whole page of output in this frame.
    let mut rb = Rebuilder::new(CACHE);
    assert!(matches!(
        rb.rebuild(&[OP_LIT, 1, 5, OP_MARK], 1, &mut out),
        Err(CodecError::MarkUnderflow { offset: 3, have: 1 })
    ));
    let mut rb = Rebuilder::new(CACHE);
    let mut pl = vec![OP_LIT, 3, 1, 2, 3, OP_ZERO];
    pl.extend([0x80, 0x20]); // 4096
    pl.extend([OP_MARK, OP_REF, 0]);
    rb.rebuild(&pl, 3 + 2 * PAGE_SIZE, &mut out).unwrap();
    assert_eq!(out[..3], [1, 2, 3]);
    assert_eq!(out[3..PAGE_SIZE + 3], out[PAGE_SIZE + 3..]);
    assert_eq!(out[3..6], [0, 0, 0]);
    let e = Rebuilder::new(0)
        .rebuild(&[OP_LIT, 1, 5], 2, &mut out)
        .unwrap_err();
    assert_eq!(e.to_string(), "plan rebuilt 1 bytes, header says 2");
}

#[test]
fn codec_fuzz_plans_no_panic() {
    let mut rng = StdRng::seed_from_u64(7);
    let (s, plan) = valid_plan(&mut rng);
    let mut out = Vec::new();
    for i in 0..3000 {
        let mut p = plan.clone();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..p.len());
            p[at] = rng.gen();
        }
        if i % 3 == 0 {
            p.truncate(rng.gen_range(0..p.len()));
        }
        let mut rb = Rebuilder::new([0, PAGE_SIZE, CACHE][i % 3]);
        if rb.rebuild(&p, s.len(), &mut out).is_ok() {
            assert_eq!(out.len(), s.len());
        }
        assert!(out.capacity() <= MAX_RAW_LEN);
        // Pure garbage.
        let gl = rng.gen_range(0..200);
        let g = random_bytes(&mut rng, gl);
        let _ = rb.rebuild(&g, rng.gen_range(0..10_000), &mut out);
    }
}

#[test]
fn codec_decompress_errors() {
    let mut rng = StdRng::seed_from_u64(8);
    let (_, plan) = valid_plan(&mut rng);
    let mut comp = Compressor::new();
    let mut dec = Decompressor::new();
    let mut out = Vec::new();
    for tier in [Tier::Lz4, Tier::Zstd(3), Tier::Zstd(-3)] {
        let mut wire = Vec::new();
        let id = comp.compress(tier, &plan, &mut wire);
        assert_ne!(id, CodecId::None);
        dec.decompress(id, &wire, plan.len(), &mut out).unwrap();
        assert_eq!(out, plan);
        // Wrong plan_len.
        for pl in [0, plan.len() - 1, plan.len() + 1, MAX_PLAN_LEN] {
            let e = dec.decompress(id, &wire, pl, &mut out).unwrap_err();
            assert!(out.capacity() <= MAX_PLAN_LEN, "{e}");
        }
        assert!(matches!(
            dec.decompress(id, &wire, MAX_PLAN_LEN + 1, &mut out),
            Err(CodecError::PlanTooLong { .. })
        ));
        // Wrong codec.
        let other = if id == CodecId::Lz4 {
            CodecId::Zstd
        } else {
            CodecId::Lz4
        };
        let _ = dec.decompress(other, &wire, plan.len(), &mut out);
        // Truncated and bit-flipped frames.
        for cut in (0..wire.len()).step_by(211) {
            assert!(dec
                .decompress(id, &wire[..cut], plan.len(), &mut out)
                .is_err());
        }
        for _ in 0..500 {
            let mut w = wire.clone();
            let at = rng.gen_range(0..w.len());
            w[at] ^= 1 << rng.gen_range(0..8);
            if dec.decompress(id, &w, plan.len(), &mut out).is_ok() {
                assert_eq!(out.len(), plan.len());
            }
        }
    }
    // None: length must match.
    assert!(dec
        .decompress(CodecId::None, &plan, plan.len() + 1, &mut out)
        .is_err());
    // Garbage.
    for _ in 0..500 {
        let gl = rng.gen_range(0..3000);
        let g = random_bytes(&mut rng, gl);
        let pl = rng.gen_range(0..100_000);
        for id in [CodecId::Lz4, CodecId::Zstd] {
            let mut fresh = Vec::new();
            if dec.decompress(id, &g, pl, &mut fresh).is_ok() {
                assert_eq!(fresh.len(), pl);
            }
            assert!(fresh.capacity() <= pl.max(1));
        }
    }
    // A zstd frame announcing a huge content size is refused up front.
    let big = zstd::bulk::compress(&vec![0u8; 4 << 20], 1).unwrap();
    let mut fresh = Vec::new();
    let e = dec
        .decompress(CodecId::Zstd, &big, 1000, &mut fresh)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "zstd frame decoded to 4194304 bytes, header says 1000"
    );
    assert!(fresh.capacity() == 0);
    let lz = {
        let mut w = Vec::new();
        lz4_compress(&vec![1u8; 4096], &mut w, 4000).unwrap();
        w
    };
    let e = dec
        .decompress(CodecId::Lz4, &lz, 5000, &mut fresh)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "lz4 frame decoded to 4096 bytes, header says 5000"
    );
}

#[test]
fn codec_compress_falls_back_to_none() {
    let mut rng = StdRng::seed_from_u64(9);
    let r = random_bytes(&mut rng, 100_000);
    let mut c = Compressor::new();
    let mut w = Vec::new();
    for tier in TIERS {
        assert_eq!(c.compress(tier, &r, &mut w), CodecId::None);
        assert_eq!(w, r);
        assert_eq!(c.compress(tier, &[], &mut w), CodecId::None);
        assert!(w.is_empty());
        assert_eq!(c.compress(tier, &[5], &mut w), CodecId::None);
    }
    // Level switching on one context.
    let t = text(&mut rng, 100_000);
    for l in [1, 19, -7, 3] {
        assert_eq!(c.compress(Tier::Zstd(l), &t, &mut w), CodecId::Zstd);
        assert_eq!(zstd::bulk::decompress(&w, t.len()).unwrap(), t);
    }
}

/// Planner / rebuilder alone (no compression), steady state.
#[test]
#[ignore]
fn codec_bench_planner() {
    let mut rng = StdRng::seed_from_u64(11);
    let s = qemu_stream(&mut rng, 16 * 1024, 0.2);
    for cache in [0usize, 256 << 20] {
        let mut p = Planner::new(cache);
        let mut rb = Rebuilder::new(cache);
        let mut plan = Vec::new();
        let mut out = Vec::new();
        for pass in 0..3 {
            let (mut te, mut td) = (0.0, 0.0);
            for c in s.chunks(MAX_RAW_LEN) {
                let t = std::time::Instant::now();
                p.plan(c, &mut plan);
                te += t.elapsed().as_secs_f64();
                let t = std::time::Instant::now();
                rb.rebuild(&plan, c.len(), &mut out).unwrap();
                td += t.elapsed().as_secs_f64();
            }
            println!(
                "cache {} pass {pass}: plan {:.0} MB/s rebuild {:.0} MB/s {:?}",
                cache >> 20,
                s.len() as f64 / 1e6 / te,
                s.len() as f64 / 1e6 / td,
                p.stats()
            );
        }
    }
}

#[test]
fn codec_types_are_send() {
    fn send<T: Send + 'static>() {}
    send::<Compressor>();
    send::<Decompressor>();
    send::<Planner>();
    send::<Rebuilder>();
    send::<CodecError>();
    fn sync<T: Sync>() {}
    sync::<CodecError>();
}

/// A page whose content left the ring is sent in full and counted as a
/// missed duplicate (what a larger content store would have saved); one
/// still in the ring is a REF, not a miss.
#[test]
fn a_duplicate_out_of_the_ring_counts_as_missed() {
    let mut rng = StdRng::seed_from_u64(7);
    let ring_pages = 8;
    let mut p = Planner::new(ring_pages * PAGE_SIZE);
    let a = random_bytes(&mut rng, PAGE_SIZE);
    let mut s = Vec::new();
    s.extend_from_slice(&header(0, 0x28));
    s.extend_from_slice(&a);
    // A again at once: in the ring.
    s.extend_from_slice(&header(1 << 12, 0x28));
    s.extend_from_slice(&a);
    // Enough other pages to push A out of the ring.
    for i in 0..ring_pages as u64 + 2 {
        s.extend_from_slice(&header((i + 2) << 12, 0x28));
        s.extend_from_slice(&random_bytes(&mut rng, PAGE_SIZE));
    }
    s.extend_from_slice(&header(100 << 12, 0x28));
    s.extend_from_slice(&a);
    let mut plan = Vec::new();
    p.plan(&s, &mut plan);
    let st = p.stats();
    assert_eq!(st.pages_deduped, 1, "{st:?}");
    assert_eq!(st.pages_missed_dups, 1, "{st:?}");
    let mut rb = Rebuilder::new(ring_pages * PAGE_SIZE);
    let mut out = Vec::new();
    rb.rebuild(&plan, s.len(), &mut out).unwrap();
    assert_eq!(out, s);
}

/// A stream of `n` random pages where page `i` repeats page `i - back`
/// when `i % every == 0` (a duplicate `back` pages later).
fn stream_with_far_dups(seed: u64, n: u64, back: u64, every: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pages: Vec<Vec<u8>> = Vec::new();
    let mut s = Vec::new();
    for i in 0..n {
        let p = if i >= back && i % every == 0 {
            pages[(i - back) as usize].clone()
        } else {
            random_bytes(&mut rng, PAGE_SIZE)
        };
        s.extend_from_slice(&header(i << 12, 0x28));
        s.extend_from_slice(&p);
        pages.push(p);
    }
    s
}

/// With a spill file, a duplicate further back than the in-memory ring is
/// a reference the receiver resolves from its own spill file; the result
/// is byte for byte the input, across frames.
#[test]
fn spill_extends_the_dedup_window_beyond_memory() {
    let dir = std::env::temp_dir();
    let (ring, spill) = (8 * PAGE_SIZE, 64u64);
    // Page i (i % 5 == 0) repeats page i - 42, which is never a repeat
    // itself (42 % 5 != 0): every duplicate is 42 pages back, beyond the
    // 8-page ring, within ring + spill.
    let s = stream_with_far_dups(3, 300, 42, 5);
    let mut p = Planner::with_spill(ring, spill, &dir).unwrap();
    let mut r = Rebuilder::with_spill(ring, spill, &dir).unwrap();
    let (mut plan, mut out) = (Vec::new(), Vec::new());
    // Frames of 10 records.
    let rec = 8 + PAGE_SIZE;
    for f in s.chunks(10 * rec) {
        p.plan(f, &mut plan);
        r.rebuild(&plan, f.len(), &mut out).unwrap();
        assert_eq!(out, f);
    }
    let st = p.stats();
    assert_eq!(
        st.pages_deduped,
        (42..300).filter(|i| i % 5 == 0).count() as u64,
        "{st:?}"
    );
    assert_eq!(st.pages_missed_dups, 0, "{st:?}");
    // Without the spill file the same stream dedups none of them.
    let mut p0 = Planner::new(ring);
    p0.plan(&s, &mut plan);
    assert_eq!(p0.stats().pages_deduped, 0);
    assert!(p0.stats().pages_missed_dups > 40);
}

/// A reference into a spill window the receiver does not have is refused
/// with the window named, never resolved to other bytes.
#[test]
fn a_receiver_without_the_spill_refuses_a_reference_into_it() {
    let dir = std::env::temp_dir();
    let (ring, spill) = (8 * PAGE_SIZE, 64u64);
    let s = stream_with_far_dups(4, 60, 42, 5);
    let mut p = Planner::with_spill(ring, spill, &dir).unwrap();
    let mut plan = Vec::new();
    p.plan(&s, &mut plan);
    assert!(p.stats().pages_deduped > 0);
    let mut r = Rebuilder::new(ring);
    let mut out = Vec::new();
    let e = r.rebuild(&plan, s.len(), &mut out).unwrap_err();
    assert!(matches!(e, CodecError::RefOutOfWindow { .. }), "{e}");
    assert!(e.to_string().contains("outside the valid window"), "{e}");
}

/// Pages that left the spill file too are out of the window: the sender
/// sends them in full again (and counts them as missed), the receiver
/// would refuse a reference to them.
#[test]
fn pages_older_than_the_spill_window_are_sent_again() {
    let dir = std::env::temp_dir();
    let (ring, spill) = (8 * PAGE_SIZE, 16u64);
    let s = stream_with_far_dups(5, 200, 42, 5);
    let mut p = Planner::with_spill(ring, spill, &dir).unwrap();
    let mut r = Rebuilder::with_spill(ring, spill, &dir).unwrap();
    let (mut plan, mut out) = (Vec::new(), Vec::new());
    p.plan(&s, &mut plan);
    r.rebuild(&plan, s.len(), &mut out).unwrap();
    assert_eq!(out, s);
    let st = p.stats();
    assert_eq!(st.pages_deduped, 0, "{st:?}");
    assert!(st.pages_missed_dups > 0, "{st:?}");
}

/// The spill file is unlinked at once: nothing is left in the directory.
#[test]
fn the_spill_file_leaves_nothing_behind() {
    let dir = std::env::temp_dir().join(format!("dwcp-spill-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = Planner::with_spill(8 * PAGE_SIZE, 16, &dir).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    drop(p);
    std::fs::remove_dir(&dir).unwrap();
    let e = Planner::with_spill(8 * PAGE_SIZE, 16, &dir).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
}

/// Spill writes in batches (ring and file multiples of 64 pages): the
/// references still rebuild byte for byte, including ones near the edge of
/// the window, where a batch replaces file pages a little early.
#[test]
fn batched_spill_writes_keep_both_ends_in_step() {
    let dir = std::env::temp_dir();
    let (ring, spill) = (64 * PAGE_SIZE, 128u64);
    for back in [70u64, 150, 185, 191, 192, 193, 250] {
        let s = stream_with_far_dups(back, 1200, back, 3);
        let mut p = Planner::with_spill(ring, spill, &dir).unwrap();
        let mut r = Rebuilder::with_spill(ring, spill, &dir).unwrap();
        let (mut plan, mut out) = (Vec::new(), Vec::new());
        for f in s.chunks(37 * (8 + PAGE_SIZE)) {
            p.plan(f, &mut plan);
            r.rebuild(&plan, f.len(), &mut out).unwrap();
            assert_eq!(out, f, "back {back}");
        }
        if back < 150 {
            assert!(p.stats().pages_deduped > 0, "back {back}: {:?}", p.stats());
        }
    }
}

/// One precopy pass over pages `0..n` (CONTINUE records in one block).
fn pass(pages: &[Vec<u8>]) -> Vec<u8> {
    let mut s = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        if i == 0 {
            s.extend_from_slice(&header(0, FLAG_PAGE_TEST));
            s.push(6);
            s.extend_from_slice(b"pc.ram");
        } else {
            s.extend_from_slice(&header((i as u64) << 12, 0x28));
        }
        s.extend_from_slice(p);
    }
    s
}

/// Plans `s` in frames of `frame` bytes and rebuilds each, asserting the
/// result; returns the plan bytes.
fn plan_and_rebuild(p: &mut Planner, r: &mut Rebuilder, s: &[u8], frame: usize) -> usize {
    let (mut plan, mut out) = (Vec::new(), Vec::new());
    let mut total = 0;
    for f in s.chunks(frame) {
        p.plan(f, &mut plan);
        assert!(plan.len() <= f.len() + f.len() / 400 + 8);
        total += plan.len();
        r.rebuild(&plan, f.len(), &mut out).unwrap();
        assert!(out == f, "rebuilt frame differs");
    }
    total
}

/// Iterations of a guest that edits some pages a little, rewrites others
/// whole and zeroes a few: each iteration is every page's content then.
fn iterations(seed: u64, n: usize, iters: usize) -> Vec<Vec<Vec<u8>>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pages: Vec<Vec<u8>> = (0..n).map(|k| page_content(&mut rng, k as u32)).collect();
    let mut out = vec![pages.clone()];
    for _ in 1..iters {
        for (i, p) in pages.iter_mut().enumerate() {
            match rng.gen_range(0..10) {
                // A few words changed.
                0..=3 => {
                    for _ in 0..rng.gen_range(1..8) {
                        let at = rng.gen_range(0..PAGE_SIZE - 8);
                        p[at..at + 8].copy_from_slice(&rng.gen::<u64>().to_le_bytes());
                    }
                }
                // Rewritten whole.
                4 => *p = random_bytes(&mut rng, PAGE_SIZE),
                5 if i % 7 == 0 => *p = vec![0u8; PAGE_SIZE],
                _ => {}
            }
        }
        out.push(pages.clone());
    }
    out
}

/// Re-sent pages go as deltas against the version the receiver holds when
/// smaller, and every frame rebuilds byte for byte (in memory, through the
/// spill file, at several frame sizes).
#[test]
fn deltas_of_re_sent_pages_rebuild_byte_for_byte() {
    let dir = std::env::temp_dir();
    let iters = iterations(11, 200, 4);
    for (ring, spill, frame) in [
        (256 * PAGE_SIZE, 0u64, 64 << 10),
        (32 * PAGE_SIZE, 512, 512 << 10),
        (64 * PAGE_SIZE, 256, 37 * (8 + PAGE_SIZE) + 5),
    ] {
        let mut plan_bytes = [0usize; 2];
        for (k, delta) in [false, true].into_iter().enumerate() {
            let mut p = Planner::with_spill(ring, spill, &dir).unwrap();
            p.set_delta(delta);
            let mut r = Rebuilder::with_spill(ring, spill, &dir).unwrap();
            for it in &iters {
                plan_bytes[k] += plan_and_rebuild(&mut p, &mut r, &pass(it), frame);
            }
            let st = p.delta_stats();
            if delta {
                assert!(st.pages_delta > 100, "{st:?}");
                assert!(st.pages_resent >= st.pages_delta, "{st:?}");
                assert!(st.resent_lz4_delta < st.resent_lz4_full, "{st:?}");
            } else {
                assert_eq!((st.pages_delta, st.pages_resent), (0, 0), "{st:?}");
            }
        }
        assert!(
            plan_bytes[1] * 10 < plan_bytes[0] * 8,
            "deltas save less than 20 %: {plan_bytes:?}"
        );
    }
}

/// The frame after `v1`'s: page 0 changed a little (one DELTA op).
fn delta_pair() -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(21);
    let v1 = text(&mut rng, PAGE_SIZE);
    let mut v2 = v1.clone();
    v2[100..108].copy_from_slice(b"CHANGED!");
    let (s1, s2) = (pass(&[v1]), pass(&[v2]));
    let mut p = Planner::new(16 * PAGE_SIZE);
    p.set_delta(true);
    let (mut plan1, mut plan2) = (Vec::new(), Vec::new());
    p.plan(&s1, &mut plan1);
    p.plan(&s2, &mut plan2);
    assert_eq!(p.delta_stats().pages_delta, 1);
    (s1, plan1, s2, plan2)
}

/// A delta against a page the receiver never received is refused, named.
#[test]
fn a_delta_against_a_page_never_received_is_refused() {
    let (_, _, s2, plan2) = delta_pair();
    let mut r = Rebuilder::new(16 * PAGE_SIZE);
    let e = r.rebuild(&plan2, s2.len(), &mut Vec::new()).unwrap_err();
    assert!(matches!(e, CodecError::DeltaBase { base: 0, .. }), "{e}");
    assert!(e.to_string().contains("does not hold"), "{e}");
}

/// A corrupt delta (a flipped byte of its runs, or a run beyond the page)
/// is refused: the page is never delivered.
#[test]
fn a_corrupt_delta_is_refused() {
    let (s1, plan1, s2, plan2) = delta_pair();
    let fresh = || {
        let mut r = Rebuilder::new(16 * PAGE_SIZE);
        r.rebuild(&plan1, s1.len(), &mut Vec::new()).unwrap();
        r
    };
    let mut out = Vec::new();
    fresh().rebuild(&plan2, s2.len(), &mut out).unwrap();
    assert_eq!(out, s2);
    let mut bad = plan2.clone();
    *bad.last_mut().unwrap() ^= 0x40;
    let e = fresh().rebuild(&bad, s2.len(), &mut out).unwrap_err();
    assert!(matches!(e, CodecError::DeltaMismatch { .. }), "{e}");
    assert!(e.to_string().contains("corrupt delta or stale base"), "{e}");
    // The DELTA op after the header's LIT: rewrite its runs as one run
    // that starts beyond the page.
    // LIT of the 15 header bytes (tag, length, bytes), then the DELTA.
    let at = 2 + 15;
    assert_eq!(plan2[at], super::plan::OP_DELTA);
    let mut bad = plan2[..at + 1 + 1 + 8].to_vec();
    bad.extend_from_slice(&[3, 0x90, 0x20, 1, 0xff]); // len 3: skip 4112, len 1
    let e = fresh().rebuild(&bad, s2.len(), &mut out).unwrap_err();
    assert!(matches!(e, CodecError::DeltaRun { .. }), "{e}");
}

/// A receiver whose ring holds other content at the base index (a stale
/// base) refuses the delta rather than deliver a wrong page.
#[test]
fn a_delta_against_a_stale_base_is_refused() {
    let (s1, _, s2, plan2) = delta_pair();
    let mut other = s1.clone();
    let n = other.len();
    other[n - 1] ^= 1;
    let mut po = Planner::new(16 * PAGE_SIZE);
    let mut plan_other = Vec::new();
    po.plan(&other, &mut plan_other);
    let mut r = Rebuilder::new(16 * PAGE_SIZE);
    r.rebuild(&plan_other, other.len(), &mut Vec::new())
        .unwrap();
    let e = r.rebuild(&plan2, s2.len(), &mut Vec::new()).unwrap_err();
    assert!(
        matches!(e, CodecError::DeltaMismatch { base: 0, .. }),
        "{e}"
    );
}

/// Without `set_delta` (a peer that did not agree) the planner never sends
/// a DELTA op, and a page whose previous version left the window goes in
/// full.
#[test]
fn no_delta_unless_agreed_and_in_the_window() {
    let iters = iterations(12, 40, 3);
    let mut p = Planner::new(64 * PAGE_SIZE);
    let mut r = Rebuilder::new(64 * PAGE_SIZE);
    for it in &iters {
        plan_and_rebuild(&mut p, &mut r, &pass(it), 1 << 20);
    }
    assert_eq!(p.delta_stats().pages_delta, 0);
    // A ring of 8 pages: the previous version of page i is 40 pages back.
    let mut p = Planner::new(8 * PAGE_SIZE);
    p.set_delta(true);
    let mut r = Rebuilder::new(8 * PAGE_SIZE);
    for it in &iters {
        plan_and_rebuild(&mut p, &mut r, &pass(it), 1 << 20);
    }
    assert_eq!(p.delta_stats().pages_delta, 0, "{:?}", p.delta_stats());
}

/// Re-migration: both ends of a first migration record what they moved;
/// on the way back the destination (the first source) announces its kept
/// copy and every page whose content it holds goes as a HAVE reference,
/// rebuilt byte for byte from the copy.
#[test]
fn a_return_migration_sends_kept_pages_as_references() {
    use keep::{KeepStore, PeerHas};
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;
    let dir = std::env::temp_dir();
    let ring = 64 * PAGE_SIZE;
    let iters = iterations(21, 300, 3);
    let (store_a, store_b) = (
        KeepStore::new(&dir, Duration::from_secs(60), 10_000),
        KeepStore::new(&dir, Duration::from_secs(60), 10_000),
    );
    // A -> B: both record.
    let (rec_a, rec_b) = (
        store_a.recorder("vm").unwrap(),
        store_b.recorder("vm").unwrap(),
    );
    let mut p = Planner::new(ring);
    p.set_keep(Some(rec_a.clone()), None);
    let mut r = Rebuilder::new(ring);
    r.set_keep(Some(rec_b.clone()), None);
    let mut first = 0;
    for it in &iters[..2] {
        first += plan_and_rebuild(&mut p, &mut r, &pass(it), 64 << 10);
    }
    rec_a.finish();
    rec_b.finish();
    assert!(store_a.wait_sealed(Duration::from_secs(10)));
    assert!(store_b.wait_sealed(Duration::from_secs(10)));
    let (copy_a, copy_b) = (store_a.get("vm").unwrap(), store_b.get("vm").unwrap());
    assert_eq!(
        copy_a.hashes(),
        copy_b.hashes(),
        "both ends kept the same pages"
    );
    // B -> A, the guest having rewritten one page in ten since.
    let mut rng = StdRng::seed_from_u64(22);
    let mut now = iters[1].clone();
    for p in now.iter_mut().step_by(10) {
        *p = random_bytes(&mut rng, PAGE_SIZE);
    }
    let back = pass(&now);
    let has = Arc::new(OnceLock::new());
    has.set(PeerHas::from_hashes(copy_a.hashes())).unwrap();
    let mut p2 = Planner::new(ring);
    p2.set_keep(None, Some(has));
    let mut r2 = Rebuilder::new(ring);
    r2.set_keep(None, Some(copy_a.clone()));
    let second = plan_and_rebuild(&mut p2, &mut r2, &back, 64 << 10);
    let st = p2.stats();
    let unchanged = now
        .iter()
        .zip(&iters[1])
        .filter(|(a, b)| a == b && a.iter().any(|&x| x != 0))
        .count() as u64;
    // Pages that straddle two frames are not seen as pages.
    let straddling = now.len() as u64 - st.pages_seen;
    assert!(
        st.pages_kept + straddling >= unchanged,
        "{st:?}, {unchanged} unchanged"
    );
    // The same pass without the copy, for scale.
    let mut p3 = Planner::new(ring);
    let mut r3 = Rebuilder::new(ring);
    let cold = plan_and_rebuild(&mut p3, &mut r3, &back, 64 << 10);
    assert!(
        second * 4 < cold,
        "return {second} B, cold {cold} B, first {first} B"
    );
}

/// A HAVE reference this end cannot honour fails with its reason, and a
/// kept page changed on disk is never delivered.
#[test]
fn bad_have_references_are_refused() {
    use keep::{KeptCopy, PeerHas};
    use std::sync::{Arc, OnceLock};
    let dir = std::env::temp_dir();
    let mut rng = StdRng::seed_from_u64(5);
    let pages: Vec<Vec<u8>> = (0..8).map(|_| random_bytes(&mut rng, PAGE_SIZE)).collect();
    let copy = Arc::new(KeptCopy::from_pages(&dir, &pages.concat()).unwrap());
    let s = pass(&pages);
    let has = Arc::new(OnceLock::new());
    has.set(PeerHas::from_hashes(copy.hashes())).unwrap();
    let mut p = Planner::new(64 * PAGE_SIZE);
    p.set_keep(None, Some(has));
    let mut plan = Vec::new();
    p.plan(&s, &mut plan);
    assert_eq!(p.stats().pages_kept, 8);
    let mut out = Vec::new();
    // A receiver that announced nothing.
    let mut r = Rebuilder::new(64 * PAGE_SIZE);
    let e = r.rebuild(&plan, s.len(), &mut out).unwrap_err();
    assert!(matches!(e, CodecError::NoKeptCopy { idx: 0 }), "{e}");
    // A receiver that announced fewer pages than referenced.
    let short = Arc::new(KeptCopy::from_pages(&dir, &pages[..3].concat()).unwrap());
    let mut r = Rebuilder::new(64 * PAGE_SIZE);
    r.set_keep(None, Some(short));
    let e = r.rebuild(&plan, s.len(), &mut out).unwrap_err();
    assert!(
        matches!(e, CodecError::KeptOutOfRange { idx: 3, len: 3 }),
        "{e}"
    );
    // A copy changed on disk after it was announced.
    copy.corrupt_page(6).unwrap();
    let mut r = Rebuilder::new(64 * PAGE_SIZE);
    r.set_keep(None, Some(copy));
    let e = r.rebuild(&plan, s.len(), &mut out).unwrap_err();
    assert!(matches!(e, CodecError::KeptCorrupt { idx: 6 }), "{e}");
    assert!(
        out.len() <= 6 * (PAGE_SIZE + 8) + 16,
        "page 6 not delivered"
    );
}

/// A multifd channel as QEMU 10.0 writes it (migration/multifd.h): the
/// 64-byte init packet, then per iteration RAM packets of up to 128 pages
/// (`normal` pages of `pages`, their offsets; zero pages listed after
/// them) with a SYNC packet after each iteration, a zstd-flagged packet
/// whose payload is opaque, a device state packet, and a last RAM packet
/// of 10 pages, which starts at the offset returned beside the stream.
fn multifd_stream(iters: &[Vec<Vec<u8>>]) -> (Vec<u8>, usize) {
    fn packet(s: &mut Vec<u8>, flags: u32, block: &[u8], pages: &[(u64, &[u8])], zeros: u32) {
        let normal: Vec<_> = pages.iter().filter(|(_, p)| !p.is_empty()).collect();
        s.extend_from_slice(&0x1122_3344u32.to_be_bytes());
        s.extend_from_slice(&1u32.to_be_bytes());
        s.extend_from_slice(&flags.to_be_bytes());
        // QEMU's SYNC packets say 0 pages allocated (and are as long).
        let alloc: u32 = if flags == 1 { 0 } else { 128 };
        s.extend_from_slice(&alloc.to_be_bytes());
        s.extend_from_slice(&(normal.len() as u32).to_be_bytes());
        s.extend_from_slice(&((normal.len() * PAGE_SIZE) as u32).to_be_bytes());
        s.extend_from_slice(&7u64.to_be_bytes());
        s.extend_from_slice(&zeros.to_be_bytes());
        s.extend_from_slice(&[0u8; 4 + 24]);
        let mut name = [0u8; 256];
        name[..block.len()].copy_from_slice(block);
        s.extend_from_slice(&name);
        for i in 0..128 {
            let off = normal.get(i).map_or(i as u64 * 4096, |(o, _)| *o);
            s.extend_from_slice(&off.to_be_bytes());
        }
        for (_, p) in &normal {
            s.extend_from_slice(p);
        }
    }
    let mut s = Vec::new();
    s.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    s.extend_from_slice(&1u32.to_be_bytes());
    s.extend_from_slice(&[0xAB; 56]);
    for it in iters {
        for (b, batch) in it.chunks(100).enumerate() {
            let pages: Vec<(u64, &[u8])> = batch
                .iter()
                .enumerate()
                .map(|(i, p)| (((b * 100 + i) as u64) << 12, p.as_slice()))
                .collect();
            packet(&mut s, 0, b"pc.ram", &pages, 3);
        }
        packet(&mut s, 1, b"", &[], 0);
    }
    // A zstd packet: header, then 5000 bytes the parser must not look into
    // (a copy of a page among them).
    let mut z = Vec::new();
    packet(&mut z, 2 << 1, b"pc.ram", &[], 0);
    z[20..24].copy_from_slice(&5000u32.to_be_bytes());
    s.extend_from_slice(&z);
    s.extend_from_slice(&iters[0][1][..4096]);
    s.extend_from_slice(&[7u8; 904]);
    // Device state: 276-byte header, 100 bytes of state.
    s.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    s.extend_from_slice(&1u32.to_be_bytes());
    s.extend_from_slice(&(32u32 << 1).to_be_bytes());
    s.extend_from_slice(&[b'v'; 256]);
    s.extend_from_slice(&0u32.to_be_bytes());
    s.extend_from_slice(&100u32.to_be_bytes());
    s.extend_from_slice(&[9u8; 100]);
    // And one more RAM packet after them, repeating the first iteration's
    // first pages: found only if the parser kept its place.
    let again: Vec<(u64, &[u8])> = iters[0][..10]
        .iter()
        .enumerate()
        .map(|(i, p)| ((i as u64) << 12, p.as_slice()))
        .collect();
    let tail = s.len();
    packet(&mut s, 0, b"pc.ram", &again, 0);
    (s, tail)
}

/// The pages of a multifd channel are found, deduplicated and sent as
/// deltas like those of the main channel, at any frame size (pages that
/// straddle frames included), and every frame rebuilds byte for byte.
#[test]
fn multifd_pages_are_found_deduplicated_and_delta_encoded() {
    let mut iters = iterations(5, 300, 3);
    // Duplicates inside the first iteration.
    for i in 0..40 {
        iters[0][200 + i] = iters[0][i].clone();
    }
    let (s, tail) = multifd_stream(&iters);
    for frame in [256 << 10, 64 << 10, 4096 * 3 + 17, 1000] {
        let mut p = Planner::new(1024 * PAGE_SIZE);
        p.set_delta(true);
        p.set_multifd(Some(512));
        let mut r = Rebuilder::new(1024 * PAGE_SIZE);
        let mut planned = plan_and_rebuild(&mut p, &mut r, &s[..tail], frame);
        // The last packet, in one frame, after the zstd and device state
        // packets: its 10 pages are found only if the parser kept its place.
        let seen = p.stats().pages_seen;
        planned += plan_and_rebuild(&mut p, &mut r, &s[tail..], s.len());
        assert_eq!(p.stats().pages_seen, seen + 10, "frame {frame}");
        assert!(p.multifd(), "frame {frame}: parser lost track");
        let st = p.stats();
        let d = p.delta_stats();
        eprintln!("frame {frame}: {st:?} {d:?}, plan {planned} of {}", s.len());
        // Without the receiver's agreement: no page found, every byte sent.
        let mut q = Planner::new(1024 * PAGE_SIZE);
        q.set_delta(true);
        let mut r = Rebuilder::new(1024 * PAGE_SIZE);
        let bytes = plan_and_rebuild(&mut q, &mut r, &s, frame);
        assert_eq!(q.stats().pages_seen, 0);
        assert!(!q.multifd());
        assert!(bytes > planned || frame == 1000, "{bytes} vs {planned}");
        if frame >= 64 << 10 {
            // At most one page per frame straddles.
            let frames = s.len().div_ceil(frame) as u64;
            assert!(st.pages_seen + frames >= 3 * 300 + 10, "{frame}: {st:?}");
            assert!(st.pages_deduped > 200, "{frame}: {st:?}");
            assert!(d.pages_delta > 100, "{frame}: {d:?}");
            assert!(
                planned * 10 < s.len() * 8,
                "{frame}: {planned} of {}",
                s.len()
            );
        } else if frame == 1000 {
            // No whole page in any frame but the last: nothing found,
            // nothing lost.
            assert_eq!(st.pages_seen, 10);
        }
    }
}

/// A stream that starts like multifd and then stops making sense is still
/// rebuilt byte for byte; the parser gives up and the pages go as bytes.
#[test]
fn a_multifd_stream_that_stops_making_sense_still_rebuilds() {
    let iters = iterations(6, 120, 1);
    let (mut s, _) = multifd_stream(&iters);
    // Break the second packet's magic.
    let second = 64 + 320 + 8 * 128 + 100 * PAGE_SIZE;
    s[second] ^= 0xFF;
    let mut p = Planner::new(256 * PAGE_SIZE);
    p.set_multifd(Some(256));
    let mut r = Rebuilder::new(256 * PAGE_SIZE);
    plan_and_rebuild(&mut p, &mut r, &s, s.len());
    assert!(!p.multifd());
    assert_eq!(p.stats().pages_seen, 100);
    // Random bytes after a multifd magic: the same.
    let mut rng = StdRng::seed_from_u64(3);
    let mut s = multifd_stream(&iters).0[..72].to_vec();
    s.extend(random_bytes(&mut rng, 1 << 20));
    let mut p = Planner::new(256 * PAGE_SIZE);
    p.set_multifd(Some(256));
    let mut r = Rebuilder::new(256 * PAGE_SIZE);
    plan_and_rebuild(&mut p, &mut r, &s, 100_000);
    // And a precopy stream is never read as multifd.
    let mut p = Planner::new(256 * PAGE_SIZE);
    p.set_multifd(Some(256));
    let mut r = Rebuilder::new(256 * PAGE_SIZE);
    let s = pass(&iters[0]);
    plan_and_rebuild(&mut p, &mut r, &s, s.len());
    assert!(!p.multifd());
    assert_eq!(p.stats().pages_seen, 120);
}

/// A RING op is obeyed only first in a channel's first frame, and only to
/// shrink the ring the session agreed.
#[test]
fn a_ring_op_out_of_place_or_too_large_is_refused() {
    use super::plan::OP_RING;
    let mut out = Vec::new();
    let lit = [OP_LIT, 1, 7];
    for (frames, why) in [
        (
            vec![vec![OP_RING, 0x80, 0x01]],
            "more than agreed (128 > 64)",
        ),
        (vec![vec![OP_RING, 0]], "no ring"),
        (vec![[&lit[..], &[OP_RING, 8]].concat()], "not the first op"),
        (
            vec![lit.to_vec(), vec![OP_RING, 8]],
            "not in the first frame",
        ),
    ] {
        let mut rb = Rebuilder::new(64 * PAGE_SIZE);
        let mut res = Ok(());
        for f in &frames {
            res = rb.rebuild(f, 1, &mut out);
            if res.is_err() {
                break;
            }
        }
        let e = res.expect_err(why);
        assert!(matches!(e, CodecError::BadRing { .. }), "{why}: {e}");
        assert!(e.to_string().contains("RING"), "{e}");
    }
    // In place: the ring shrinks, and a reference past it is refused.
    let mut rb = Rebuilder::new(64 * PAGE_SIZE);
    let mut page = vec![0u8; PAGE_SIZE];
    page[0] = 1;
    let mut plan = vec![OP_RING, 1, OP_PAGE];
    plan.extend_from_slice(&page);
    rb.rebuild(&plan, PAGE_SIZE, &mut out).unwrap();
    assert_eq!(rb.ring_capacity(), 1);
    let mut plan = vec![OP_PAGE];
    plan.extend_from_slice(&page);
    rb.rebuild(&plan, PAGE_SIZE, &mut out).unwrap();
    let e = rb.rebuild(&[OP_REF, 0], PAGE_SIZE, &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::RefOutOfWindow {
                idx: 0,
                lo: 1,
                hi: 2
            }
        ),
        "{e}"
    );
}

/// Frames sent raw (the datacenter tier) between planned ones: the parser
/// follows them, so the planned frames after them still find their pages,
/// and the RING op goes in the first planned frame, whichever that is.
#[test]
fn a_multifd_parser_follows_frames_sent_raw() {
    let iters = iterations(7, 300, 2);
    let (s, _) = multifd_stream(&iters);
    let mut p = Planner::new(1024 * PAGE_SIZE);
    p.set_multifd(Some(512));
    let mut r = Rebuilder::new(1024 * PAGE_SIZE);
    let (mut plan, mut out) = (Vec::new(), Vec::new());
    for (k, f) in s.chunks(200_000).enumerate() {
        if k % 3 != 2 {
            p.skip(f);
            continue;
        }
        p.plan(f, &mut plan);
        r.rebuild(&plan, f.len(), &mut out).unwrap();
        assert!(out == f, "frame {k}");
    }
    assert!(p.multifd());
    assert_eq!(r.ring_capacity(), 512);
    assert!(p.stats().pages_seen > 150, "{:?}", p.stats());
}

/// Two channels of a session: pages channel 1 sends whose content channel
/// 2 sent earlier (and the destination confirmed) go as XREF ops into
/// channel 2's spill file, and rebuild byte for byte; bad references are
/// refused with the reason named.
#[test]
fn pages_another_channel_sent_go_as_cross_channel_references() {
    use super::plan::OP_XREF;
    use super::xref::Shared;
    use std::sync::Arc;
    let dir = std::env::temp_dir();
    let (ring, spill) = (64 * PAGE_SIZE, 1024);
    let (src, dst) = (Arc::new(Shared::default()), Arc::new(Shared::default()));
    let mut pa = Planner::with_spill(ring, spill, &dir).unwrap();
    let mut pb = Planner::with_spill(ring, spill, &dir).unwrap();
    let mut ra = Rebuilder::with_spill(ring, spill, &dir).unwrap();
    let mut rb = Rebuilder::with_spill(ring, spill, &dir).unwrap();
    pa.set_xref(src.clone(), 1);
    pb.set_xref(src.clone(), 2);
    ra.set_xref(dst.clone(), 1);
    rb.set_xref(dst.clone(), 2);
    let mut rng = StdRng::seed_from_u64(21);
    let pages: Vec<Vec<u8>> = (0..300)
        .map(|k| page_content(&mut rng, k * 4 + 1))
        .collect();
    // Channel 2 sends all 300 (236 of them leave its memory ring), frame
    // by frame, each credited after it was rebuilt.
    let sb = pass(&pages);
    let (mut plan, mut out) = (Vec::new(), Vec::new());
    let mut end = 0u64;
    for f in sb.chunks(16 * (8 + PAGE_SIZE)) {
        pb.plan(f, &mut plan);
        end += f.len() as u64;
        src.planned(2, end, pb.ring_count());
        rb.rebuild(&plan, f.len(), &mut out).unwrap();
        assert!(out == f);
        src.confirm(2, end);
    }
    // Channel 1 sends the first 200 again: those in channel 2's file go as
    // XREF; the rest (still in its memory ring) go in full.
    let sa = pass(&pages[..200]);
    let mut bytes = 0;
    for f in sa.chunks(16 * (8 + PAGE_SIZE)) {
        pa.plan(f, &mut plan);
        bytes += plan.len();
        ra.rebuild(&plan, f.len(), &mut out).unwrap();
        assert!(out == f, "rebuilt page differs");
    }
    let st = pa.stats();
    assert!(st.pages_xref >= 150, "{st:?}");
    assert!(bytes < sa.len() / 5, "{bytes} of {}", sa.len());
    // Not confirmed by the destination: no reference.
    let src2 = Arc::new(Shared::default());
    let mut pc = Planner::with_spill(ring, spill, &dir).unwrap();
    let mut pd = Planner::with_spill(ring, spill, &dir).unwrap();
    pc.set_xref(src2.clone(), 1);
    pd.set_xref(src2.clone(), 2);
    for f in sb.chunks(16 * (8 + PAGE_SIZE)) {
        pd.plan(f, &mut plan);
    }
    for f in sa.chunks(16 * (8 + PAGE_SIZE)) {
        pc.plan(f, &mut plan);
    }
    assert_eq!(pc.stats().pages_xref, 0);
    // Refused: a wrong hash, an index not in the file yet, an unknown
    // channel, the channel's own pages, and no shared state at all.
    let xref = |ch: u8, idx: u8, hash: u64| {
        // idx as a varint: 0..=127 in one byte, 250 in two.
        let mut v = vec![OP_XREF, ch];
        if idx < 0x80 {
            v.push(idx);
        } else {
            v.extend_from_slice(&[idx | 0x80, 1]);
        }
        v.extend_from_slice(&hash.to_le_bytes());
        v
    };
    let good = xxhash_rust::xxh3::xxh3_64(&pages[0]);
    for (plan, what) in [
        (xref(2, 0, good ^ 1), "not the one referred to"),
        (xref(2, 250, 0), "does not hold that page"),
        (xref(9, 0, good), "does not hold that page"),
        (xref(1, 0, good), "own pages"),
    ] {
        let e = ra.rebuild(&plan, PAGE_SIZE, &mut out).unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
    let mut lone = Rebuilder::with_spill(ring, spill, &dir).unwrap();
    let e = lone
        .rebuild(&xref(2, 0, good), PAGE_SIZE, &mut out)
        .unwrap_err();
    assert!(e.to_string().contains("takes no cross-channel"), "{e}");
}

/// A ring smaller than a spill batch still takes a multifd channel (the
/// RING op asks for the whole ring).
#[test]
fn a_tiny_ring_takes_a_multifd_channel() {
    let iters = iterations(8, 20, 1);
    let (s, _) = multifd_stream(&iters);
    let mut p = Planner::new(5 * PAGE_SIZE);
    p.set_multifd(Some(1000));
    let mut r = Rebuilder::new(5 * PAGE_SIZE);
    plan_and_rebuild(&mut p, &mut r, &s, s.len());
    assert!(p.multifd());
    assert_eq!(r.ring_capacity(), 5);
}
