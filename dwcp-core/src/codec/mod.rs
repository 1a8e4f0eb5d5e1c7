//! Frame codec: page-aware deduplication ("plan") plus block compression.
//!
//! Sender, per frame of up to [`MAX_RAW_LEN`] raw bytes of QEMU's migration
//! stream:
//! 1. [`Planner::plan`] (sequential, stream order, one per channel direction)
//!    turns raw bytes into a *plan*: ops (tag byte + LEB128 varints)
//!    interleaved with literal bytes (op list below).
//! 2. [`Compressor::compress`] compresses the plan with the chosen [`Tier`]
//!    and returns the [`CodecId`] actually used (falls back to
//!    [`CodecId::None`] when compression does not shrink the plan).
//!
//! Receiver: [`Decompressor::decompress`] then [`Rebuilder::rebuild`]
//! (sequential, stream order, one per channel direction).
//!
//! [`Tier::Raw`] skips both steps: the frame ([`CodecId::Raw`]) carries the
//! raw bytes themselves, and neither side's dedup ring sees them (so the
//! rings stay in step, whichever frames go raw). It is for links faster than
//! the CPU can plan and copy, where every pass over the data costs time.
//!
//! Plan ops:
//! - `0x01 LIT len` + `len` literal bytes
//! - `0x02 ZERO len`: `len` zero bytes
//! - `0x03 PAGE` + 4096 literal bytes, also inserted into the dedup ring (the
//!   k-th PAGE op of the channel goes to ring index k)
//! - `0x04 REF idx`: copy of the 4096 bytes at ring index `idx` (absolute
//!   insert counter; valid iff `counter - capacity <= idx < counter`)
//! - `0x05 MARK`: insert the last 4096 bytes of this frame's output into the
//!   ring, like PAGE (used for pages with long zero runs, which are sent as
//!   LIT/ZERO ops followed by MARK)
//! - `0x06 DELTA base hash len` + `len` bytes of runs (`skip len` + bytes):
//!   the ring page at index `base` with the runs' bytes XORed in, checked
//!   against `hash` (xxh3-64, 8 bytes LE) and inserted into the ring like
//!   PAGE. Only sent to a receiver that agreed to deltas in the hello; the
//!   sender uses it for a page it sent before whose content changed, when
//!   the delta against the version the receiver holds is smaller.
//!
//! All output buffers passed as `out` are cleared first.

use std::fmt;
use std::str::FromStr;

pub mod context;
pub mod keep;
mod multifd;
mod plan;
pub mod xref;

pub use plan::{DeltaStats, PlanStats, Planner, Rebuilder};

#[cfg(test)]
mod tests;

/// Size of a guest page (and of a dedup ring entry).
pub const PAGE_SIZE: usize = 4096;
/// Maximum raw bytes per frame.
pub const MAX_RAW_LEN: usize = 1 << 20;
/// Maximum plan size. A plan of a raw chunk of at most [`MAX_RAW_LEN`] bytes
/// never exceeds it (plans are at most `raw + raw / 400 + 8` bytes, far below).
pub const MAX_PLAN_LEN: usize = MAX_RAW_LEN + 64 * 1024;

/// Largest input LZ4 accepts (LZ4_MAX_INPUT_SIZE).
const LZ4_MAX_INPUT: usize = 0x7E00_0000;

/// Codec of a frame on the wire. 0 is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CodecId {
    /// Plan sent as is.
    None = 1,
    /// LZ4 block (no frame header) of the plan.
    Lz4 = 2,
    /// One zstd frame of the plan.
    Zstd = 3,
    /// The raw bytes, no plan (see [`Tier::Raw`]).
    Raw = 4,
    /// The next piece of the channel's zstd stream, flushed: decoded in
    /// order with the channel's earlier such frames as context
    /// ([`context`]).
    ZstdCtx = 5,
}

impl CodecId {
    /// Parses the wire byte; `None` for unknown values (including 0).
    pub fn from_wire(b: u8) -> Option<CodecId> {
        match b {
            1 => Some(CodecId::None),
            2 => Some(CodecId::Lz4),
            3 => Some(CodecId::Zstd),
            4 => Some(CodecId::Raw),
            5 => Some(CodecId::ZstdCtx),
            _ => None,
        }
    }

    /// Name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            CodecId::None => "none",
            CodecId::Lz4 => "lz4",
            CodecId::Zstd => "zstd",
            CodecId::Raw => "raw",
            CodecId::ZstdCtx => "zstd-ctx",
        }
    }
}

/// Compression tier chosen by the operator / adaptive logic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Pass-through: no zero-run elimination, dedup or compression; the
    /// fewest passes over the data (datacenter links).
    Raw,
    /// No compression (zero runs and duplicate pages still eliminated).
    None,
    /// LZ4 block, default acceleration.
    Lz4,
    /// zstd at the given level (-7..=19 accepted by the parser).
    Zstd(i32),
}

/// Lowest zstd level accepted by [`Tier::from_str`].
pub const ZSTD_MIN_LEVEL: i32 = -7;
/// Highest zstd level accepted by [`Tier::from_str`].
pub const ZSTD_MAX_LEVEL: i32 = 19;
/// Level used for plain "zstd".
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;

/// Error of [`Tier::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid compression tier {0:?}: expected \"raw\", \"none\", \"lz4\", \"zstd\" (level 3) or \"zstd:N\" with N in -7..=19"
)]
pub struct ParseTierError(pub String);

impl FromStr for Tier {
    type Err = ParseTierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "raw" => return Ok(Tier::Raw),
            "none" => return Ok(Tier::None),
            "lz4" => return Ok(Tier::Lz4),
            "zstd" => return Ok(Tier::Zstd(ZSTD_DEFAULT_LEVEL)),
            _ => {}
        }
        if let Some(n) = t.strip_prefix("zstd:") {
            if let Ok(level) = n.trim().parse::<i32>() {
                if (ZSTD_MIN_LEVEL..=ZSTD_MAX_LEVEL).contains(&level) {
                    return Ok(Tier::Zstd(level));
                }
            }
        }
        Err(ParseTierError(s.to_string()))
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tier::Raw => f.write_str("raw"),
            Tier::None => f.write_str("none"),
            Tier::Lz4 => f.write_str("lz4"),
            Tier::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// Errors of the receive path. After an error the channel's [`Rebuilder`]
/// state is unspecified: the channel must be torn down.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Plan length from the frame header is above [`MAX_PLAN_LEN`].
    #[error("plan length {plan_len} exceeds the maximum {max}")]
    PlanTooLong {
        /// Length claimed.
        plan_len: usize,
        /// [`MAX_PLAN_LEN`].
        max: usize,
    },
    /// Raw length from the frame header is above [`MAX_RAW_LEN`].
    #[error("raw length {raw_len} exceeds the maximum {max}")]
    RawTooLong {
        /// Length claimed.
        raw_len: usize,
        /// [`MAX_RAW_LEN`].
        max: usize,
    },
    /// Decoded length differs from the header's plan length.
    #[error("{codec} frame decoded to {got} bytes, header says {expected}")]
    LengthMismatch {
        /// Codec name.
        codec: &'static str,
        /// Bytes decoded (or announced by the frame).
        got: u64,
        /// Plan length from the frame header.
        expected: usize,
    },
    /// LZ4 rejected the block.
    #[error(
        "lz4 frame of {wire_len} bytes is corrupt or decodes to more than the header's {plan_len} bytes"
    )]
    Lz4Corrupt {
        /// Compressed length.
        wire_len: usize,
        /// Plan length from the frame header.
        plan_len: usize,
    },
    /// zstd rejected the frame.
    #[error("zstd frame of {wire_len} bytes is corrupt: {msg}")]
    ZstdCorrupt {
        /// Compressed length.
        wire_len: usize,
        /// zstd's message.
        msg: String,
    },
    /// Unknown op tag in a plan.
    #[error("unknown plan op tag 0x{tag:02x} at plan offset {offset}")]
    BadTag {
        /// The tag byte.
        tag: u8,
        /// Offset in the plan.
        offset: usize,
    },
    /// A cross-channel reference that cannot be resolved.
    #[error("cross-channel reference to page {idx} of channel {channel}: {why}")]
    Xref {
        /// The channel named.
        channel: u64,
        /// Its page index named.
        idx: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A RING op anywhere but first in a channel's first frame, or asking
    /// for no ring or more than the session agreed.
    #[error(
        "dedup RING op for {pages} pages at plan offset {offset}: allowed only first in a channel's first frame, for 1..={cap} pages"
    )]
    BadRing {
        /// Pages asked for.
        pages: u64,
        /// Offset in the plan.
        offset: usize,
        /// The ring the session agreed, pages.
        cap: u64,
    },
    /// Varint runs past the end of the plan.
    #[error("truncated varint at plan offset {offset}")]
    TruncatedVarint {
        /// Offset in the plan.
        offset: usize,
    },
    /// Varint longer than 64 bits.
    #[error("varint at plan offset {offset} overflows 64 bits")]
    VarintOverflow {
        /// Offset in the plan.
        offset: usize,
    },
    /// Literal/page bytes run past the end of the plan.
    #[error("truncated literal at plan offset {offset}: needs {need} bytes, plan has {have}")]
    TruncatedLiteral {
        /// Offset in the plan.
        offset: usize,
        /// Bytes needed.
        need: u64,
        /// Bytes left in the plan.
        have: usize,
    },
    /// REF to an index outside the ring's valid window.
    #[error("dedup REF to page {idx} outside the valid window {lo}..{hi}")]
    RefOutOfWindow {
        /// Index referenced.
        idx: u64,
        /// Lowest valid index.
        lo: u64,
        /// One past the highest valid index.
        hi: u64,
    },
    /// The dedup spill file (pages that left the in-memory ring) could not
    /// be written or read.
    #[error("dedup spill file: {op} of page {idx}: {source}")]
    Spill {
        /// `write` or `read`.
        op: &'static str,
        /// Index of the page.
        idx: u64,
        source: std::io::Error,
    },
    /// DELTA against a ring index the receiver does not hold (never
    /// received, or already evicted).
    #[error("delta against page {base}, which this end does not hold (valid window {lo}..{hi})")]
    DeltaBase {
        /// Base index referenced.
        base: u64,
        /// Lowest valid index.
        lo: u64,
        /// One past the highest valid index.
        hi: u64,
    },
    /// A DELTA's run reaches beyond its page.
    #[error(
        "delta run at plan offset {offset} writes {len} bytes at page offset {at}, beyond the page"
    )]
    DeltaRun {
        /// Offset of the run in the plan.
        offset: usize,
        /// Page offset the run starts at.
        at: u64,
        /// Bytes the run claims.
        len: u64,
    },
    /// The page a DELTA rebuilt is not the one the sender encoded (its
    /// xxh3-64 differs): a corrupt delta or a base that differs from the
    /// sender's. The page is not delivered.
    #[error("delta at plan offset {offset} against page {base} rebuilt a page whose hash differs from the sender's (corrupt delta or stale base)")]
    DeltaMismatch {
        /// Offset of the op in the plan.
        offset: usize,
        /// Base index used.
        base: u64,
    },
    /// A HAVE op where this end announced no kept copy.
    #[error("reference to kept page {idx}, but this end announced no kept copy")]
    NoKeptCopy {
        /// Index referenced.
        idx: u64,
    },
    /// A HAVE op past the kept copy this end announced.
    #[error("reference to kept page {idx}, which this end does not hold (it announced {len})")]
    KeptOutOfRange {
        /// Index referenced.
        idx: u64,
        /// Pages announced.
        len: u64,
    },
    /// The kept copy could not be read.
    #[error("kept copy: read of page {idx}: {source}")]
    KeptRead {
        /// Index of the page.
        idx: u64,
        source: std::io::Error,
    },
    /// A kept page no longer hashes to what was announced (the file
    /// changed): the page is not delivered.
    #[error("kept page {idx} differs from the SHA-256 this end announced (the kept copy changed on disk)")]
    KeptCorrupt {
        /// Index of the page.
        idx: u64,
    },
    /// Plan produces more than raw_len bytes.
    #[error(
        "plan op at offset {offset} writes {len} bytes at output offset {at}, beyond the header's raw length {raw_len}"
    )]
    OutputOverflow {
        /// Offset of the op in the plan.
        offset: usize,
        /// Bytes the op writes.
        len: u64,
        /// Output length before the op.
        at: usize,
        /// Raw length from the frame header.
        raw_len: usize,
    },
    /// MARK op before a whole page of output exists in the frame.
    #[error("dedup MARK at plan offset {offset} with only {have} output bytes (needs 4096)")]
    MarkUnderflow {
        /// Offset in the plan.
        offset: usize,
        /// Output bytes so far in this frame.
        have: usize,
    },
    /// Plan produces fewer than raw_len bytes.
    #[error("plan rebuilt {got} bytes, header says {raw_len}")]
    OutputShort {
        /// Bytes produced.
        got: usize,
        /// Raw length from the frame header.
        raw_len: usize,
    },
}

/// Caller-owned compression context (keep one per worker thread; it reuses
/// the zstd context across calls).
pub struct Compressor {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zstd_level: i32,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("zstd_ready", &self.zstd.is_some())
            .field("zstd_level", &self.zstd_level)
            .finish()
    }
}

impl Default for Compressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Compressor {
    /// New context; the zstd context is allocated on first use.
    pub fn new() -> Self {
        Compressor {
            zstd: None,
            zstd_level: i32::MIN,
        }
    }

    /// Compresses `plan` into `out` (cleared first) and returns the codec
    /// used. If compression does not make the plan strictly smaller (or
    /// fails), `out` holds a copy of `plan` and [`CodecId::None`] is returned.
    pub fn compress(&mut self, tier: Tier, plan: &[u8], out: &mut Vec<u8>) -> CodecId {
        out.clear();
        let id = if plan.is_empty() {
            None
        } else {
            match tier {
                Tier::Raw | Tier::None => None,
                Tier::Lz4 => lz4_compress(plan, out, plan.len() - 1).map(|_| CodecId::Lz4),
                Tier::Zstd(level) => self.zstd_compress(level, plan, out),
            }
        };
        match id {
            Some(id) => id,
            None => {
                out.clear();
                out.extend_from_slice(plan);
                CodecId::None
            }
        }
    }

    fn zstd_ctx(&mut self, level: i32) -> Option<&mut zstd::bulk::Compressor<'static>> {
        if self.zstd.is_none() {
            self.zstd = Some(zstd::bulk::Compressor::new(level).ok()?);
            self.zstd_level = level;
        }
        let ctx = self.zstd.as_mut()?;
        if self.zstd_level != level {
            ctx.set_compression_level(level).ok()?;
            self.zstd_level = level;
        }
        Some(ctx)
    }

    fn zstd_compress(&mut self, level: i32, plan: &[u8], out: &mut Vec<u8>) -> Option<CodecId> {
        let ctx = self.zstd_ctx(level)?;
        out.clear();
        out.reserve(plan.len());
        // Fails with "destination too small" when the output would not fit,
        // which means no gain anyway.
        let n = ctx.compress_to_buffer(plan, out).ok()?;
        if n >= plan.len() {
            return None;
        }
        Some(CodecId::Zstd)
    }
}

/// LZ4-compresses `src` into `out` (cleared) writing at most `max_dst`
/// bytes. `None` if it does not fit or the input is too large.
pub fn lz4_compress(src: &[u8], out: &mut Vec<u8>, max_dst: usize) -> Option<usize> {
    out.clear();
    if src.len() > LZ4_MAX_INPUT || max_dst == 0 {
        return None;
    }
    let max_dst = max_dst.min(i32::MAX as usize);
    out.reserve(max_dst);
    // SAFETY: `src` is valid for reads of `src.len()` bytes (<= LZ4_MAX_INPUT
    // fits c_int); `out` has capacity >= `max_dst` bytes, and LZ4 in
    // limited-output mode writes at most `max_dst` bytes to `dst`.
    let n = unsafe {
        lz4_sys::LZ4_compress_default(
            src.as_ptr().cast(),
            out.as_mut_ptr().cast(),
            src.len() as libc::c_int,
            max_dst as libc::c_int,
        )
    };
    if n <= 0 {
        return None;
    }
    let n = n as usize;
    debug_assert!(n <= max_dst);
    // SAFETY: LZ4 returned n > 0, so it initialised exactly the first n
    // bytes of the buffer, and n <= max_dst <= capacity.
    unsafe { out.set_len(n) };
    Some(n)
}

fn lz4_bound(len: usize) -> usize {
    len + len / 255 + 16
}

/// Caller-owned decompression context (one per worker thread).
pub struct Decompressor {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decompressor")
            .field("zstd_ready", &self.zstd.is_some())
            .finish()
    }
}

impl Default for Decompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Decompressor {
    /// New context; the zstd context is allocated on first use.
    pub fn new() -> Self {
        Decompressor { zstd: None }
    }

    /// Decodes `wire` into `out` (cleared first), which must come out exactly
    /// `plan_len` bytes long. Refuses `plan_len > MAX_PLAN_LEN`; reserves at
    /// most `plan_len` bytes in `out`.
    pub fn decompress(
        &mut self,
        codec: CodecId,
        wire: &[u8],
        plan_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        out.clear();
        if plan_len > MAX_PLAN_LEN {
            return Err(CodecError::PlanTooLong {
                plan_len,
                max: MAX_PLAN_LEN,
            });
        }
        match codec {
            // Raw frames carry the bytes themselves: the caller skips the
            // Rebuilder for them.
            CodecId::None | CodecId::Raw => {
                if wire.len() != plan_len {
                    return Err(CodecError::LengthMismatch {
                        codec: codec.name(),
                        got: wire.len() as u64,
                        expected: plan_len,
                    });
                }
                out.extend_from_slice(wire);
                Ok(())
            }
            CodecId::Lz4 => lz4_decompress(wire, plan_len, out),
            // Decoded in order by the channel's Rebuilder, not here.
            CodecId::ZstdCtx => Err(CodecError::ZstdCorrupt {
                wire_len: wire.len(),
                msg: "a context frame decodes only in its channel's order".into(),
            }),
            CodecId::Zstd => {
                let corrupt = |msg: String| CodecError::ZstdCorrupt {
                    wire_len: wire.len(),
                    msg,
                };
                match zstd::zstd_safe::get_frame_content_size(wire) {
                    Ok(Some(n)) if n != plan_len as u64 => {
                        return Err(CodecError::LengthMismatch {
                            codec: "zstd",
                            got: n,
                            expected: plan_len,
                        })
                    }
                    Ok(_) => {}
                    Err(_) => return Err(corrupt("bad frame header".into())),
                }
                if self.zstd.is_none() {
                    self.zstd =
                        Some(zstd::bulk::Decompressor::new().map_err(|e| corrupt(e.to_string()))?);
                }
                let Some(ctx) = self.zstd.as_mut() else {
                    return Err(corrupt("no context".into()));
                };
                out.reserve_exact(plan_len);
                let n = ctx
                    .decompress_to_buffer(wire, out)
                    .map_err(|e| corrupt(e.to_string()))?;
                if n != plan_len || out.len() != plan_len {
                    return Err(CodecError::LengthMismatch {
                        codec: "zstd",
                        got: n as u64,
                        expected: plan_len,
                    });
                }
                Ok(())
            }
        }
    }
}

fn lz4_decompress(wire: &[u8], plan_len: usize, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let corrupt = CodecError::Lz4Corrupt {
        wire_len: wire.len(),
        plan_len,
    };
    if wire.len() > lz4_bound(MAX_PLAN_LEN) {
        return Err(corrupt);
    }
    out.clear();
    out.reserve_exact(plan_len.max(1));
    // SAFETY: `wire` is valid for `wire.len()` bytes (fits c_int, checked
    // above); `out` has capacity >= plan_len (<= MAX_PLAN_LEN, fits c_int)
    // and LZ4_decompress_safe never writes more than that capacity
    // argument, whatever the input.
    let n = unsafe {
        lz4_sys::LZ4_decompress_safe(
            wire.as_ptr().cast(),
            out.as_mut_ptr().cast(),
            wire.len() as libc::c_int,
            plan_len as libc::c_int,
        )
    };
    if n < 0 {
        return Err(corrupt);
    }
    let n = n as usize;
    if n > plan_len {
        return Err(corrupt);
    }
    // SAFETY: LZ4 returned n >= 0: it initialised the first n bytes of the
    // buffer, and n <= plan_len <= capacity.
    unsafe { out.set_len(n) };
    if n != plan_len {
        out.clear();
        return Err(CodecError::LengthMismatch {
            codec: "lz4",
            got: n as u64,
            expected: plan_len,
        });
    }
    Ok(())
}
