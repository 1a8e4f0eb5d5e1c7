//! `dwcp benchmark floor`: the fewest bytes a migration of a guest's RAM
//! can put on the wire without knowing anything the destination does not
//! already have: zero pages cost nothing, a page whose content appeared
//! before costs nothing, and the unique pages are compressed as one stream
//! (the whole content in order, as a compressor with unbounded context would
//! see it). Measured from a raw RAM image (QEMU `pmemsave`), or from the
//! test guest booted for the purpose.
//!
//! The floor is of the content at one instant: a live migration also sends
//! what the guest rewrites while it runs, so a result above 1.0× the floor
//! is partly the dirty rate, and a result is compared with the floor of the
//! same guest (docs/benchmarks.md, "The compression floor").
//!
//! Unique pages are found with a 128-bit hash (xxh3-128) of their content.
//! A collision would count two different pages as one and make the floor
//! lower than the truth by one page; at 2^-128 per pair it does not change
//! a figure (for 2^20 pages the chance of any collision is about 2^-89).
//! Nothing here writes guest memory.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use super::OutputArgs;

const PAGE: usize = 4096;
/// Unique pages go to the compressors in chunks of this many bytes.
const CHUNK: usize = 8 << 20;

#[derive(Args, Debug)]
pub struct FloorArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// A raw RAM image (QEMU `pmemsave 0 SIZE "FILE"`, or `dwcp`'s own
    /// dumps). Without it, the test guest is booted with --guest-mem,
    /// --fill and --seed and its RAM is saved once it is ready.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// zstd levels to compress the unique pages with (one thread each).
    #[arg(long, value_delimiter = ',', default_value = "3,19")]
    pub levels: Vec<i32>,
    /// Also compress the unique pages frame by frame (512 KiB frames, the
    /// first level): each alone, as DWCP's codec does, and as one stream
    /// flushed per frame (context across frames).
    #[arg(long)]
    pub frames: bool,
    /// Link rates to express the floor in seconds at, Mbit/s.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub link_mbit: Vec<f64>,
    /// Test guest RAM, MiB (without --input).
    #[arg(long, default_value_t = 512)]
    pub guest_mem: u64,
    /// Realistic content the test guest fills, MiB (without --input).
    #[arg(long, default_value_t = 256)]
    pub fill: u64,
    /// Content seed of the test guest (without --input).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Boot the test guest with this initramfs (without --input), e.g. one
    /// with real files in it (scripts/real-files-initrd.sh).
    #[arg(long, env = "DWCP_GUEST_INITRD", value_name = "FILE")]
    pub guest_initrd: Option<PathBuf>,
}

/// What one zstd level makes of the unique pages.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub level: i32,
    pub bytes: u64,
    /// Seconds spent compressing (one thread, time waiting for input not
    /// counted; wall-clock, so a loaded machine makes it longer).
    pub secs: f64,
}

/// The floor of one image.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub source: String,
    pub ram_bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    /// Non-zero pages whose content appeared earlier in the image.
    pub duplicate_pages: u64,
    pub unique_pages: u64,
    pub unique_bytes: u64,
    /// Share of zero pages in each [`REGION`] of the image, in order: where
    /// the content lies in guest-physical RAM (QEMU's first pass walks it
    /// in this order, so it shapes that pass's pace).
    pub zero_share_by_region: Vec<f64>,
    pub levels: Vec<Level>,
    /// The unique pages compressed frame by frame (`--frames`), as DWCP's
    /// codec compresses a channel's frames today, and with each frame given
    /// the frames before it as context (one stream, flushed per frame).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub framed: Option<Framed>,
}

/// Frame-by-frame compression of the unique pages at one zstd level.
#[derive(Debug, Clone, Serialize)]
pub struct Framed {
    pub level: i32,
    pub frame_bytes: usize,
    /// Each frame on its own (one zstd frame per DWCP frame).
    pub independent_bytes: u64,
    /// One zstd stream, flushed at the end of every frame: each frame
    /// decodable on arrival, with the frames before it as context.
    pub streamed_bytes: u64,
}

/// Bytes per region of [`Floor::zero_share_by_region`].
pub const REGION: u64 = 64 << 20;

/// Raw bytes per frame in [`Framed`]: DWCP's default chunk.
const FRAME: usize = 512 << 10;

/// Compresses the chunks in frames of [`FRAME`]: each alone, and as one
/// zstd stream flushed at the end of every frame (so each frame can be
/// decoded as it arrives, with the frames before it as context).
fn framed(rx: Receiver<Arc<Vec<u8>>>, level: i32) -> Result<Framed> {
    let mut independent = 0u64;
    let mut stream = zstd::stream::write::Encoder::new(Counter(0), level)?;
    let mut cur: Vec<u8> = Vec::with_capacity(FRAME);
    let mut one = |frame: &[u8], independent: &mut u64| -> Result<()> {
        *independent += zstd::bulk::compress(frame, level)?.len() as u64;
        stream.write_all(frame)?;
        stream.flush()?;
        Ok(())
    };
    for c in rx {
        let mut rest: &[u8] = &c;
        while !rest.is_empty() {
            let take = (FRAME - cur.len()).min(rest.len());
            cur.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if cur.len() == FRAME {
                one(&cur, &mut independent)?;
                cur.clear();
            }
        }
    }
    if !cur.is_empty() {
        one(&cur, &mut independent)?;
    }
    let streamed = stream.finish()?.0;
    Ok(Framed {
        level,
        frame_bytes: FRAME,
        independent_bytes: independent,
        streamed_bytes: streamed,
    })
}

impl Floor {
    /// Bytes of the smallest level measured (the floor).
    pub fn best_bytes(&self) -> Option<u64> {
        self.levels.iter().map(|l| l.bytes).min()
    }
}

/// Measures the floor of everything `r` yields (a multiple of 4 KiB; a
/// short last page is padded with zeros, as QEMU sends whole pages).
pub fn measure(r: impl Read, source: &str, levels: &[i32]) -> Result<Floor> {
    measure_with(r, source, levels, false)
}

/// [`measure`], with the frame-by-frame figures at the first level when
/// `frames` is set.
pub fn measure_with(mut r: impl Read, source: &str, levels: &[i32], frames: bool) -> Result<Floor> {
    if levels.is_empty() {
        bail!("no zstd level to measure (--levels)");
    }
    for &l in levels {
        if !(1..=22).contains(&l) {
            bail!("zstd level {l} is out of range (1..=22)");
        }
    }
    // One compressor thread per level, each fed the same chunks in order.
    let mut feeds = Vec::new();
    let mut workers = Vec::new();
    for &level in levels {
        let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(2);
        feeds.push(tx);
        workers.push(
            std::thread::Builder::new()
                .name(format!("floor-zstd{level}"))
                .spawn(move || compress(rx, level))
                .context("starting a compressor thread")?,
        );
    }
    let frame_worker = if frames {
        let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(2);
        feeds.push(tx);
        let level = levels[0];
        Some(
            std::thread::Builder::new()
                .name("floor-frames".into())
                .spawn(move || framed(rx, level))
                .context("starting a compressor thread")?,
        )
    } else {
        None
    };
    let mut seen: HashSet<u128> = HashSet::new();
    let mut f = Floor {
        source: source.to_string(),
        ram_bytes: 0,
        pages: 0,
        zero_pages: 0,
        duplicate_pages: 0,
        unique_pages: 0,
        unique_bytes: 0,
        zero_share_by_region: Vec::new(),
        levels: Vec::new(),
        framed: None,
    };
    // (pages, zero pages) per region
    let mut regions: Vec<(u64, u64)> = Vec::new();
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut page = vec![0u8; PAGE];
    loop {
        let n = read_full(&mut r, &mut page).context("reading the RAM image")?;
        if n == 0 {
            break;
        }
        page[n..].fill(0);
        let region = (f.ram_bytes / REGION) as usize;
        if regions.len() <= region {
            regions.push((0, 0));
        }
        regions[region].0 += 1;
        f.ram_bytes += n as u64;
        f.pages += 1;
        if page.iter().all(|&b| b == 0) {
            f.zero_pages += 1;
            regions[region].1 += 1;
            continue;
        }
        if !seen.insert(xxhash_rust::xxh3::xxh3_128(&page)) {
            f.duplicate_pages += 1;
            continue;
        }
        f.unique_pages += 1;
        chunk.extend_from_slice(&page);
        if chunk.len() >= CHUNK {
            let c = Arc::new(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)));
            for tx in &feeds {
                tx.send(c.clone())
                    .map_err(|_| anyhow::anyhow!("a compressor thread stopped"))?;
            }
        }
        if n < PAGE {
            break;
        }
    }
    f.unique_bytes = f.unique_pages * PAGE as u64;
    f.zero_share_by_region = regions
        .iter()
        .map(|&(n, z)| z as f64 / n.max(1) as f64)
        .collect();
    let c = Arc::new(chunk);
    for tx in feeds {
        let _ = tx.send(c.clone());
    }
    for (w, &level) in workers.into_iter().zip(levels) {
        let (bytes, secs) = w
            .join()
            .map_err(|_| anyhow::anyhow!("the zstd {level} thread panicked"))??;
        f.levels.push(Level { level, bytes, secs });
    }
    if let Some(w) = frame_worker {
        f.framed = Some(
            w.join()
                .map_err(|_| anyhow::anyhow!("the frame compressor thread panicked"))??,
        );
    }
    Ok(f)
}

/// Reads until `buf` is full or the input ends; the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Counts what one zstd stream at `level` makes of the chunks.
fn compress(rx: Receiver<Arc<Vec<u8>>>, level: i32) -> Result<(u64, f64)> {
    // Time spent compressing, not waiting for the next chunk (the reader
    // and the slowest level set the pace of the channel).
    let mut busy = std::time::Duration::ZERO;
    let mut enc = zstd::stream::write::Encoder::new(Counter(0), level)?;
    enc.include_checksum(false)?;
    for c in rx {
        let t = Instant::now();
        enc.write_all(&c)?;
        busy += t.elapsed();
    }
    let t = Instant::now();
    let out = enc.finish()?;
    busy += t.elapsed();
    Ok((out.0, busy.as_secs_f64()))
}

/// A writer that only counts.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The floor as a Markdown table, with seconds at each link rate.
pub fn table(f: &Floor, link_mbit: &[f64]) -> String {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mb = |b: u64| b as f64 / 1e6;
    let pct = |n: u64| 100.0 * n as f64 / f.pages.max(1) as f64;
    let mut s = format!(
        "Compression floor of {} ({:.0} MiB, {} pages)\n\n\
         | pages | count | share |\n|---|---:|---:|\n\
         | zero | {} | {:.1} % |\n| duplicate content | {} | {:.1} % |\n\
         | unique content | {} | {:.1} % |\n\n",
        f.source,
        mib(f.ram_bytes),
        f.pages,
        f.zero_pages,
        pct(f.zero_pages),
        f.duplicate_pages,
        pct(f.duplicate_pages),
        f.unique_pages,
        pct(f.unique_pages),
    );
    if f.zero_share_by_region.len() > 1 {
        let shares: Vec<String> = f
            .zero_share_by_region
            .iter()
            .map(|z| format!("{:.0}", z * 100.0))
            .collect();
        s.push_str(&format!(
            "zero pages per {} MiB of guest-physical RAM, in order (%): {}\n\n",
            REGION >> 20,
            shares.join(" ")
        ));
    }
    s.push_str("| unique pages | MB |");
    for r in link_mbit {
        s.push_str(&format!(" s at {r} Mbit/s |"));
    }
    s.push_str(" compress s |\n|---|---:|");
    for _ in link_mbit {
        s.push_str("---:|");
    }
    s.push_str("---:|\n");
    let secs = |b: u64, r: f64| b as f64 * 8.0 / (r * 1e6);
    s.push_str(&format!("| raw | {:.1} |", mb(f.unique_bytes)));
    for &r in link_mbit {
        s.push_str(&format!(" {:.1} |", secs(f.unique_bytes, r)));
    }
    s.push_str(" - |\n");
    for l in &f.levels {
        s.push_str(&format!("| zstd -{} | {:.1} |", l.level, mb(l.bytes)));
        for &r in link_mbit {
            s.push_str(&format!(" {:.1} |", secs(l.bytes, r)));
        }
        s.push_str(&format!(" {:.1} |\n", l.secs));
    }
    if let Some(fr) = &f.framed {
        s.push_str(&format!(
            "\nframe by frame ({} KiB frames, zstd -{}): {:.1} MB each frame alone (as DWCP's codec does), \
             {:.1} MB as one stream flushed per frame ({:+.1} %)\n",
            fr.frame_bytes >> 10,
            fr.level,
            mb(fr.independent_bytes),
            mb(fr.streamed_bytes),
            100.0 * (fr.streamed_bytes as f64 / fr.independent_bytes.max(1) as f64 - 1.0)
        ));
    }
    if let Some(b) = f.best_bytes() {
        s.push_str(&format!(
            "\nfloor: {:.1} MB ({:.3} of the RAM size); a migration's wire bytes / floor is its multiple of it\n",
            mb(b),
            b as f64 / f.ram_bytes.max(1) as f64
        ));
    }
    s
}

/// `dwcp benchmark floor`.
pub fn run(a: &FloorArgs) -> Result<Floor> {
    let f = match &a.input {
        Some(p) => from_file(p, &a.levels, a.frames)?,
        None => from_test_guest(a)?,
    };
    let t = table(&f, &a.link_mbit);
    print!("{t}");
    std::fs::create_dir_all(&a.out.output)
        .with_context(|| format!("creating {}", a.out.output.display()))?;
    std::fs::write(a.out.output.join("floor.md"), &t)?;
    std::fs::write(
        a.out.output.join("floor.json"),
        serde_json::to_string_pretty(&f)?,
    )?;
    println!("results: {}", a.out.output.join("floor.json").display());
    Ok(f)
}

fn from_file(p: &Path, levels: &[i32], frames: bool) -> Result<Floor> {
    let file = File::open(p).with_context(|| format!("opening the RAM image {}", p.display()))?;
    let len = file.metadata()?.len();
    if len == 0 {
        bail!("{} is empty: not a RAM image", p.display());
    }
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    measure_with(
        BufReader::with_capacity(1 << 20, file),
        &name,
        levels,
        frames,
    )
}

/// Boots the test guest in a lab namespace, waits until its content is
/// filled, stops it and saves its RAM to the scratch directory.
fn from_test_guest(a: &FloorArgs) -> Result<Floor> {
    use dwcp_lab::{Guest, GuestSpec, Lab};
    let spec = GuestSpec {
        mem_mb: a.guest_mem,
        fill_mb: a.fill,
        seed: a.seed,
        initrd: a.guest_initrd.clone(),
        ..GuestSpec::default()
    };
    let lab = Lab::new("floor", dwcp_lab::Middle::Bridge, &[])?;
    let scratch = lab.dir.join("floor");
    std::fs::create_dir_all(&scratch)?;
    eprintln!(
        "booting the test guest ({} MiB, {} MiB of realistic content, seed {})",
        spec.mem_mb, spec.fill_mb, spec.seed
    );
    let mut g = Guest::start(&lab, lab.src_ns(), "floor", &spec, false)?;
    g.wait_ready(&spec)?;
    let mut q = g.qmp()?;
    q.execute("stop", None)?;
    let img = scratch.join("ram.img");
    let out = q.hmp(&format!(
        "pmemsave 0 {} \"{}\"",
        spec.mem_mb << 20,
        img.display()
    ))?;
    if !out.trim().is_empty() {
        bail!("pmemsave: {out}");
    }
    let source = format!(
        "test guest ({} MiB, {} MiB realistic fill, seed {}{})",
        spec.mem_mb,
        spec.fill_mb,
        spec.seed,
        spec.initrd
            .as_deref()
            .and_then(|p| p.file_name())
            .map(|n| format!(", initramfs {}", n.to_string_lossy()))
            .unwrap_or_default()
    );
    let file = File::open(&img)?;
    let f = measure_with(
        BufReader::with_capacity(1 << 20, file),
        &source,
        &a.levels,
        a.frames,
    );
    let _ = std::fs::remove_file(&img);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8, salt: u32) -> Vec<u8> {
        let mut p = vec![fill; PAGE];
        p[..4].copy_from_slice(&salt.to_le_bytes());
        p
    }

    #[test]
    fn counts_zero_duplicate_and_unique_pages() {
        let mut img = Vec::new();
        img.extend(vec![0u8; PAGE]); // zero
        img.extend(page(7, 1)); // unique
        img.extend(page(7, 2)); // unique
        img.extend(page(7, 1)); // duplicate of the second page
        img.extend(vec![0u8; PAGE]); // zero
        let f = measure(&img[..], "t", &[1, 3]).unwrap();
        assert_eq!(f.ram_bytes, 5 * PAGE as u64);
        assert_eq!(
            (f.pages, f.zero_pages, f.duplicate_pages, f.unique_pages),
            (5, 2, 1, 2)
        );
        assert_eq!(f.unique_bytes, 2 * PAGE as u64);
        assert_eq!(f.levels.len(), 2);
        // Two nearly constant pages compress far below their size.
        assert!(f.best_bytes().unwrap() < 200, "{:?}", f.levels);
    }

    #[test]
    fn the_floor_is_what_zstd_makes_of_the_unique_pages_in_order() {
        // Incompressible unique pages: the floor is their size (plus a
        // frame header), whatever the duplicates and zero pages around them.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut uniq = Vec::new();
        for _ in 0..(64 * PAGE / 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            uniq.extend_from_slice(&x.to_le_bytes());
        }
        let mut img = uniq.clone();
        img.extend_from_slice(&uniq[..16 * PAGE]);
        img.extend(vec![0u8; 32 * PAGE]);
        let f = measure(&img[..], "t", &[3]).unwrap();
        assert_eq!(f.unique_pages, 64);
        assert_eq!(f.duplicate_pages, 16);
        let direct = zstd::encode_all(&uniq[..], 3).unwrap().len() as u64;
        assert_eq!(f.levels[0].bytes, direct);
    }

    #[test]
    fn frames_alone_and_with_context_cover_every_unique_page() {
        // Text pages of words drawn at random from a small vocabulary:
        // every frame can use the words the frames before it taught.
        const WORDS: [&str; 12] = [
            "page",
            "guest",
            "memory",
            "stream",
            "channel",
            "dirty",
            "frame",
            "window",
            "migration",
            "kernel",
            "buffer",
            "socket",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut img = Vec::new();
        for _ in 0..600 {
            let mut p = Vec::with_capacity(PAGE);
            while p.len() < PAGE {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                p.extend_from_slice(WORDS[(x % 12) as usize].as_bytes());
                p.push(if x.is_multiple_of(7) { b'\n' } else { b' ' });
            }
            p.truncate(PAGE);
            img.extend(p);
        }
        let f = measure_with(&img[..], "t", &[3], true).unwrap();
        let fr = f.framed.expect("framed");
        // Frame by frame is exactly the sum of one zstd frame per 512 KiB.
        let alone: u64 = img
            .chunks(FRAME)
            .map(|c| zstd::bulk::compress(c, 3).unwrap().len() as u64)
            .sum();
        assert_eq!(fr.independent_bytes, alone);
        // The stream decodes back to the pages (and so counts them all).
        assert!(fr.streamed_bytes > 0, "{fr:?}");
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        for c in img.chunks(FRAME) {
            enc.write_all(c).unwrap();
            enc.flush().unwrap();
        }
        let out = enc.finish().unwrap();
        assert_eq!(out.len() as u64, fr.streamed_bytes);
        assert_eq!(zstd::decode_all(&out[..]).unwrap(), img);
        assert!(measure(&img[..], "t", &[3]).unwrap().framed.is_none());
    }

    #[test]
    fn a_short_last_page_is_padded() {
        let img = vec![1u8; PAGE + 100];
        let f = measure(&img[..], "t", &[1]).unwrap();
        assert_eq!(
            (f.pages, f.unique_pages, f.ram_bytes),
            (2, 2, PAGE as u64 + 100)
        );
    }

    #[test]
    fn bad_levels_and_empty_files_are_named() {
        let e = measure(&[0u8; 10][..], "t", &[0]).unwrap_err();
        assert!(e.to_string().contains("zstd level 0"), "{e}");
        let e = measure(&[0u8; 10][..], "t", &[]).unwrap_err();
        assert!(e.to_string().contains("--levels"), "{e}");
        let d = std::env::temp_dir().join(format!("dwcp-floor-{}", std::process::id()));
        std::fs::write(&d, b"").unwrap();
        let e = from_file(&d, &[3], false).unwrap_err();
        let _ = std::fs::remove_file(&d);
        assert!(e.to_string().contains("not a RAM image"), "{e}");
        let e = from_file(Path::new("/nonexistent/ram.img"), &[3], false).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/ram.img"), "{e:#}");
    }

    #[test]
    fn the_table_gives_seconds_at_each_rate() {
        let f = Floor {
            source: "x".into(),
            ram_bytes: 1 << 30,
            pages: 262_144,
            zero_pages: 131_072,
            duplicate_pages: 0,
            unique_pages: 131_072,
            unique_bytes: 1 << 29,
            zero_share_by_region: vec![0.0, 1.0],
            levels: vec![Level {
                level: 3,
                bytes: 100_000_000,
                secs: 1.0,
            }],
            framed: None,
        };
        let t = table(&f, &[100.0]);
        // 100 MB at 100 Mbit/s: 8 s.
        assert!(t.contains("| zstd -3 | 100.0 | 8.0 | 1.0 |"), "{t}");
        assert!(t.contains("| zero | 131072 | 50.0 % |"), "{t}");
    }
}
