//! `dwcp benchmark hde`'s measurement: each codec tier on a memory image,
//! DWCP's full path (planner + compressor, decompressor + rebuilder) against
//! the raw lz4/zstd crates on the same chunks. Benchmark code only: it uses
//! the codec's public API and lives here, not in dwcp-core.

use std::time::Instant;

use dwcp_core::codec::context::ContextEncoder;
use dwcp_core::codec::{
    CodecId, Compressor, Decompressor, Planner, Rebuilder, Tier, MAX_PLAN_LEN, MAX_RAW_LEN,
    PAGE_SIZE,
};
use serde::Serialize;

/// Result of [`measure_tiers`] for one tier. MB/s are 10^6 bytes of raw
/// (uncompressed) data per second, single-threaded.
#[derive(Clone, Debug, Serialize)]
pub struct TierMeasurement {
    /// Tier, as [`Tier`]'s Display.
    pub tier: String,
    /// Chunk (frame) size used.
    pub chunk: usize,
    /// Dedup cache size used.
    pub dedup_cache_bytes: usize,
    /// Raw bytes measured.
    pub raw_bytes: u64,
    /// Total plan bytes (after dedup/zero elimination).
    pub plan_bytes: u64,
    /// Total wire bytes (compressed plans, no frame headers).
    pub wire_bytes: u64,
    /// raw_bytes / wire_bytes.
    pub ratio: f64,
    /// Planner + compressor throughput.
    pub encode_mb_s: f64,
    /// Decompressor + rebuilder throughput.
    pub decode_mb_s: f64,
    /// Page records recognised.
    pub pages_seen: u64,
    /// Pages sent as REF.
    pub pages_deduped: u64,
    /// Bytes sent as ZERO ops.
    pub zero_bytes: u64,
    /// Decoded data matched the input.
    pub roundtrip_ok: bool,
    /// Wire bytes of the raw crate alone on the same chunks.
    pub raw_crate_wire_bytes: u64,
    /// raw_bytes / raw_crate_wire_bytes.
    pub raw_crate_ratio: f64,
    /// Raw crate compression throughput.
    pub raw_crate_encode_mb_s: f64,
    /// Raw crate decompression throughput.
    pub raw_crate_decode_mb_s: f64,
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 / 1e6 / secs
    }
}

fn ratio(raw: u64, wire: u64) -> f64 {
    if wire == 0 {
        0.0
    } else {
        raw as f64 / wire as f64
    }
}

/// Measures each tier on `data` split into `chunk`-byte frames (clamped to
/// 1..=[`MAX_RAW_LEN`]), single-threaded on the calling thread: our full
/// path (plan + compress, decompress + rebuild, with a fresh dedup state of
/// `dedup_cache_bytes` per tier, its ring memory faulted in before timing)
/// and the raw crate alone (zstd::bulk / lz4
/// block / memcpy for none) on the same chunks.
pub fn measure_tiers(
    data: &[u8],
    tiers: &[Tier],
    chunk: usize,
    dedup_cache_bytes: usize,
) -> Vec<TierMeasurement> {
    let chunk = chunk.clamp(1, MAX_RAW_LEN);
    tiers
        .iter()
        .map(|&tier| measure_one(data, tier, false, chunk, dedup_cache_bytes))
        .collect()
}

/// [`measure_tiers`] for zstd at `level` with context across frames
/// (`zstd:N+ctx`, [`dwcp_core::codec::context`]): one stream for all the
/// frames, compressed and decoded in order; the raw crate's columns are
/// zstd on each frame alone, as for `zstd:N`.
pub fn measure_context(
    data: &[u8],
    level: i32,
    chunk: usize,
    dedup_cache_bytes: usize,
) -> TierMeasurement {
    let chunk = chunk.clamp(1, MAX_RAW_LEN);
    measure_one(data, Tier::Zstd(level), true, chunk, dedup_cache_bytes)
}

fn measure_one(
    data: &[u8],
    tier: Tier,
    context: bool,
    chunk: usize,
    cache: usize,
) -> TierMeasurement {
    let mut ctx = context.then(|| ContextEncoder::new().expect("a zstd context"));
    let raw_bytes = data.len() as u64;

    // Our path: encode.
    // Fault in the dedup rings outside the timed regions: steady state, as
    // a long-lived channel sees it.
    let max_pages = data.len() / PAGE_SIZE + 1;
    let mut planner = Planner::new(cache);
    planner.prefault(max_pages);
    let mut comp = Compressor::new();
    let mut plan_buf = Vec::with_capacity(MAX_PLAN_LEN);
    let mut wire_buf = Vec::with_capacity(MAX_PLAN_LEN);
    // All frames back to back in one buffer: (codec, start, end, plan_len, raw_len).
    let mut wire_all: Vec<u8> = Vec::with_capacity(data.len() + data.len() / 64 + 64);
    let mut frames: Vec<(CodecId, usize, usize, usize, usize)> = Vec::new();
    let mut plan_bytes = 0u64;
    let mut enc = 0.0;
    for c in data.chunks(chunk) {
        let t = Instant::now();
        let id = if tier == Tier::Raw {
            plan_buf.clear();
            plan_buf.extend_from_slice(c);
            wire_buf.clear();
            wire_buf.extend_from_slice(c);
            CodecId::Raw
        } else {
            planner.plan(c, &mut plan_buf);
            match (&mut ctx, tier) {
                (Some(e), Tier::Zstd(level)) => {
                    e.compress(level, &plan_buf, &mut wire_buf)
                        .expect("context compression");
                    CodecId::ZstdCtx
                }
                _ => comp.compress(tier, &plan_buf, &mut wire_buf),
            }
        };
        enc += t.elapsed().as_secs_f64();
        plan_bytes += plan_buf.len() as u64;
        let start = wire_all.len();
        wire_all.extend_from_slice(&wire_buf);
        frames.push((id, start, wire_all.len(), plan_buf.len(), c.len()));
    }
    let wire_bytes = wire_all.len() as u64;
    let stats = planner.stats();

    // Our path: decode (verification outside the timed region).
    let mut dec = Decompressor::new();
    let mut rb = Rebuilder::new(cache);
    rb.prefault(max_pages);
    let mut raw_out = Vec::with_capacity(MAX_RAW_LEN);
    let mut ok = true;
    let mut dec_secs = 0.0;
    let mut pos = 0usize;
    for &(id, start, end, plan_len, raw_len) in &frames {
        let t = Instant::now();
        let r = if id == CodecId::Raw {
            dec.decompress(id, &wire_all[start..end], plan_len, &mut raw_out)
        } else if id == CodecId::ZstdCtx {
            rb.rebuild_context(&wire_all[start..end], plan_len, raw_len, &mut raw_out)
        } else {
            dec.decompress(id, &wire_all[start..end], plan_len, &mut plan_buf)
                .and_then(|()| rb.rebuild(&plan_buf, raw_len, &mut raw_out))
        };
        dec_secs += t.elapsed().as_secs_f64();
        if r.is_err() || raw_out[..] != data[pos..pos + raw_len] {
            ok = false;
            break;
        }
        pos += raw_len;
    }

    // Raw crate alone.
    let mut raw_frames: Vec<(usize, usize)> = Vec::new();
    wire_all.clear();
    let mut zc = match tier {
        Tier::Zstd(l) => zstd::bulk::Compressor::new(l).ok(),
        _ => None,
    };
    let mut w = Vec::with_capacity(lz4_bound(chunk).max(zstd::zstd_safe::compress_bound(chunk)));
    let mut raw_enc = 0.0;
    for c in data.chunks(chunk) {
        let t = Instant::now();
        w.clear();
        match tier {
            Tier::Raw | Tier::None => w.extend_from_slice(c),
            Tier::Lz4 => {
                if lz4_block(c, &mut w).is_none() {
                    w.clear();
                }
            }
            Tier::Zstd(_) => {
                if let Some(z) = zc.as_mut() {
                    if z.compress_to_buffer(c, &mut w).is_err() {
                        w.clear();
                    }
                }
            }
        }
        raw_enc += t.elapsed().as_secs_f64();
        let start = wire_all.len();
        wire_all.extend_from_slice(&w);
        raw_frames.push((start, wire_all.len()));
    }
    let raw_wire = wire_all.len() as u64;
    let mut zd = zstd::bulk::Decompressor::new().ok();
    let mut lz4 = Decompressor::new();
    let mut out = Vec::with_capacity(chunk);
    let t = Instant::now();
    for (&(start, end), c) in raw_frames.iter().zip(data.chunks(chunk)) {
        let w = &wire_all[start..end];
        match tier {
            Tier::Raw | Tier::None => {
                out.clear();
                out.extend_from_slice(w);
            }
            Tier::Lz4 => {
                let _ = lz4.decompress(CodecId::Lz4, w, c.len(), &mut out);
            }
            Tier::Zstd(_) => {
                if let Some(z) = zd.as_mut() {
                    out.clear();
                    let _ = z.decompress_to_buffer(w, &mut out);
                }
            }
        }
    }
    let raw_dec = t.elapsed().as_secs_f64();

    TierMeasurement {
        tier: if context {
            format!("{tier}+ctx")
        } else {
            tier.to_string()
        },
        chunk,
        dedup_cache_bytes: cache,
        raw_bytes,
        plan_bytes,
        wire_bytes,
        ratio: ratio(raw_bytes, wire_bytes),
        encode_mb_s: mb_s(raw_bytes, enc),
        decode_mb_s: mb_s(raw_bytes, dec_secs),
        pages_seen: stats.pages_seen,
        pages_deduped: stats.pages_deduped,
        zero_bytes: stats.zero_bytes,
        roundtrip_ok: ok,
        raw_crate_wire_bytes: raw_wire,
        raw_crate_ratio: ratio(raw_bytes, raw_wire),
        raw_crate_encode_mb_s: mb_s(raw_bytes, raw_enc),
        raw_crate_decode_mb_s: mb_s(raw_bytes, raw_dec),
    }
}

fn lz4_bound(len: usize) -> usize {
    len + len / 255 + 16
}

/// The lz4 crate alone: one block of `src` into `out` (cleared), at most
/// [`lz4_bound`] bytes, through the codec's own LZ4 call (no dedup, no
/// framing). `None` if LZ4 fails or `src` is larger than LZ4 takes.
fn lz4_block(src: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    dwcp_core::codec::lz4_compress(src, out, lz4_bound(src.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QEMU precopy stream over `pages` pages: zero pages, pages repeated
    /// from earlier (`dup` of them), text-like and noisy pages.
    fn stream(pages: usize, dup: f64) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let words: [&[u8]; 6] = [
            b"migration ",
            b"guest ",
            b"page ",
            b"kernel ",
            b"0x00ff ",
            b"\n",
        ];
        let mut image: Vec<u8> = Vec::with_capacity(pages * PAGE_SIZE);
        for i in 0..pages {
            let r = (next() % 1000) as f64 / 1000.0;
            if r < 0.1 {
                image.resize(image.len() + PAGE_SIZE, 0);
            } else if r < 0.1 + dup && i > 0 {
                let j = (next() as usize) % i;
                let from = image[j * PAGE_SIZE..(j + 1) * PAGE_SIZE].to_vec();
                image.extend_from_slice(&from);
            } else if r < 0.8 {
                let start = image.len();
                while image.len() < start + PAGE_SIZE {
                    image.extend_from_slice(words[(next() % 6) as usize]);
                }
                image.truncate(start + PAGE_SIZE);
            } else {
                for _ in 0..PAGE_SIZE / 8 {
                    image.extend_from_slice(&next().to_le_bytes());
                }
            }
        }
        super::super::micro::precopy_stream(&image)
    }

    const TIERS: [Tier; 5] = [
        Tier::None,
        Tier::Lz4,
        Tier::Zstd(-7),
        Tier::Zstd(1),
        Tier::Zstd(3),
    ];

    #[test]
    fn measure_tiers_smoke() {
        let s = stream(500, 0.3);
        let m = measure_tiers(&s, &TIERS, 256 << 10, 1 << 20);
        assert_eq!(m.len(), TIERS.len());
        for t in &m {
            assert!(t.roundtrip_ok, "{t:?}");
            assert!(t.ratio > 1.0);
            assert!(t.pages_deduped > 0);
        }
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"tier\":\"zstd:3\""));
    }

    /// Prints measurements on a 256 MiB synthetic stream:
    /// `cargo test -p dwcp --release measure_tiers_report -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: run by hand"]
    fn measure_tiers_report() {
        let s = stream(64 * 1024, 0.2);
        let tiers = [
            Tier::None,
            Tier::Lz4,
            Tier::Zstd(-3),
            Tier::Zstd(1),
            Tier::Zstd(3),
            Tier::Zstd(9),
        ];
        println!("stream {} MiB", s.len() >> 20);
        for cache in [0, 256 << 20] {
            for m in measure_tiers(&s, &tiers, MAX_RAW_LEN, cache) {
                println!(
                    "cache {:>4} MiB {:>8}: ratio {:5.2} enc {:7.0} MB/s dec {:7.0} MB/s | raw crate: ratio {:5.2} enc {:7.0} dec {:7.0} | dedup {}/{} zero {} MiB ok {}",
                    cache >> 20,
                    m.tier,
                    m.ratio,
                    m.encode_mb_s,
                    m.decode_mb_s,
                    m.raw_crate_ratio,
                    m.raw_crate_encode_mb_s,
                    m.raw_crate_decode_mb_s,
                    m.pages_deduped,
                    m.pages_seen,
                    m.zero_bytes >> 20,
                    m.roundtrip_ok
                );
            }
        }
    }
}
