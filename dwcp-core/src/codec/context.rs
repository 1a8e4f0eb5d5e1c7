//! Compression with context across frames (docs/hde.md, "Layer 4").
//!
//! A [`CodecId::ZstdCtx`](super::CodecId::ZstdCtx) frame is not a zstd
//! frame of its own: it is the next piece of one zstd stream per channel,
//! flushed at the end of the frame, so each frame decodes as soon as it and
//! the channel's context frames before it have arrived, and it can refer to
//! what they held (the last [`WINDOW_LOG`] bits' worth of plan bytes). The
//! sender compresses a channel's context frames in order, on the channel's
//! own thread; the receiver decodes them in order, on the thread that
//! delivers the channel to QEMU. Other frames of the channel (any codec)
//! may come between them: they do not touch the stream.
//!
//! A change of level ends the zstd frame and starts the next one (the new
//! level) in the same DWCP frame; the decoder reads consecutive zstd frames.
//!
//! **Bounded.** The encoder writes frames with a window of
//! 2^[`WINDOW_LOG`] bytes; the decoder refuses any frame that asks for more
//! (a peer cannot make it hold more than that per channel), and refuses to
//! produce more than the frame header's plan length.

use zstd::zstd_safe::{self, CCtx, DCtx, InBuffer, OutBuffer};
use zstd_safe::zstd_sys::ZSTD_EndDirective;

use super::CodecError;

/// The stream's window: 4 MiB of earlier plan bytes, on both ends.
pub const WINDOW_LOG: u32 = 22;

fn zstd_err(code: usize) -> String {
    zstd_safe::get_error_name(code).to_string()
}

/// The sending end of a channel's context stream.
pub struct ContextEncoder {
    cctx: CCtx<'static>,
    /// Level of the zstd frame in progress (None: no frame started).
    level: Option<i32>,
}

impl std::fmt::Debug for ContextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextEncoder")
            .field("level", &self.level)
            .finish()
    }
}

impl ContextEncoder {
    /// A new stream (its first frame starts with the first call).
    pub fn new() -> Result<Self, String> {
        let mut cctx = CCtx::try_create().ok_or("cannot allocate a zstd context")?;
        cctx.set_parameter(zstd_safe::CParameter::WindowLog(WINDOW_LOG))
            .map_err(zstd_err)?;
        // The frame header's checksum guards each zstd frame as a whole;
        // the DWCP frame's own CRC covers every piece on the wire.
        cctx.set_parameter(zstd_safe::CParameter::ChecksumFlag(false))
            .map_err(zstd_err)?;
        Ok(ContextEncoder { cctx, level: None })
    }

    /// Compresses `plan` at `level` as the stream's next piece into `out`
    /// (cleared first), flushed so that the receiver can decode all of it.
    pub fn compress(&mut self, level: i32, plan: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        out.clear();
        out.reserve(plan.len() + plan.len() / 128 + 512);
        if self.level.is_some_and(|l| l != level) {
            // End the frame at the old level; the next starts at the new one.
            self.run(&[], ZSTD_EndDirective::ZSTD_e_end, out)?;
            self.level = None;
        }
        if self.level.is_none() {
            self.cctx
                .set_parameter(zstd_safe::CParameter::CompressionLevel(level))
                .map_err(zstd_err)?;
            self.level = Some(level);
        }
        self.run(plan, ZSTD_EndDirective::ZSTD_e_flush, out)
    }

    fn run(&mut self, src: &[u8], op: ZSTD_EndDirective, out: &mut Vec<u8>) -> Result<(), String> {
        let mut input = InBuffer::around(src);
        loop {
            if out.capacity() - out.len() < 4096 {
                out.reserve(64 << 10);
            }
            let pos = out.len();
            let mut output = OutBuffer::around_pos(out, pos);
            let left = self
                .cctx
                .compress_stream2(&mut output, &mut input, op)
                .map_err(zstd_err)?;
            if left == 0 && input.pos() == src.len() {
                return Ok(());
            }
        }
    }
}

/// The receiving end of a channel's context stream.
pub struct ContextDecoder {
    dctx: DCtx<'static>,
    /// Pieces decoded (for messages).
    frames: u64,
}

impl std::fmt::Debug for ContextDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextDecoder")
            .field("frames", &self.frames)
            .finish()
    }
}

impl ContextDecoder {
    /// A decoder for a new stream.
    pub fn new() -> Result<Self, CodecError> {
        let corrupt = |msg: String| CodecError::ZstdCorrupt { wire_len: 0, msg };
        let mut dctx = DCtx::try_create().ok_or_else(|| corrupt("no zstd context".into()))?;
        dctx.set_parameter(zstd_safe::DParameter::WindowLogMax(WINDOW_LOG))
            .map_err(|c| corrupt(zstd_err(c)))?;
        Ok(ContextDecoder { dctx, frames: 0 })
    }

    /// Decodes the stream's next piece `wire` into `out` (cleared first),
    /// which must come out exactly `plan_len` bytes long. After an error
    /// the stream is lost: the channel must fail.
    pub fn decompress(
        &mut self,
        wire: &[u8],
        plan_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        let frame = self.frames;
        self.frames += 1;
        let corrupt = |msg: String| CodecError::ZstdCorrupt {
            wire_len: wire.len(),
            msg: format!(
                "context stream, piece {frame}: {msg} (this end accepts windows up to {} MiB)",
                1u32 << (WINDOW_LOG - 20)
            ),
        };
        if plan_len > super::MAX_PLAN_LEN {
            return Err(CodecError::PlanTooLong {
                plan_len,
                max: super::MAX_PLAN_LEN,
            });
        }
        out.clear();
        // One byte of room beyond the plan: producing it means the piece
        // holds more than the header says.
        out.reserve_exact(plan_len + 1);
        let mut input = InBuffer::around(wire);
        while input.pos() < wire.len() {
            let before = (input.pos(), out.len());
            let mut output = OutBuffer::around_pos(out, before.1);
            let r = self.dctx.decompress_stream(&mut output, &mut input);
            r.map_err(|c| corrupt(zstd_err(c)))?;
            if out.len() > plan_len {
                return Err(CodecError::LengthMismatch {
                    codec: "zstd-ctx",
                    got: out.len() as u64,
                    expected: plan_len,
                });
            }
            if (input.pos(), out.len()) == before {
                return Err(corrupt("no progress".into()));
            }
        }
        // Whatever a flushed piece holds is out once its input is read;
        // ask once more, to be sure nothing waits beyond the plan.
        if out.len() == plan_len {
            let mut probe = [0u8; 1];
            let mut output = OutBuffer::around(&mut probe[..]);
            let mut empty = InBuffer::around(&[]);
            self.dctx
                .decompress_stream(&mut output, &mut empty)
                .map_err(|c| corrupt(zstd_err(c)))?;
            if output.pos() > 0 {
                return Err(CodecError::LengthMismatch {
                    codec: "zstd-ctx",
                    got: plan_len as u64 + 1,
                    expected: plan_len,
                });
            }
        }
        if out.len() != plan_len {
            return Err(CodecError::LengthMismatch {
                codec: "zstd-ctx",
                got: out.len() as u64,
                expected: plan_len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plan-like bytes: text-ish content with repeats far apart.
    fn frames() -> Vec<Vec<u8>> {
        let words = [
            "page", "guest", "kernel", "memory", "dirty", "stream", "frame", "qemu", "agent",
        ];
        let mut x = 7u64;
        let mut base = Vec::new();
        while base.len() < 96 << 10 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            base.extend_from_slice(words[(x % 9) as usize].as_bytes());
            base.extend_from_slice(format!(" {} ", x % 1000).as_bytes());
        }
        // Frame k holds the base text and then fresh text: frames 1.. find
        // the base in the frames before them, not in themselves.
        (0..6)
            .map(|k| {
                let mut f = Vec::new();
                if k > 0 {
                    f.extend_from_slice(&base);
                }
                f.extend_from_slice(format!("frame {k} ").repeat(50).as_bytes());
                if k == 0 {
                    f.extend_from_slice(&base);
                }
                f
            })
            .collect()
    }

    #[test]
    fn pieces_decode_in_order_and_use_the_frames_before() {
        let fs = frames();
        let mut enc = ContextEncoder::new().unwrap();
        let mut dec = ContextDecoder::new().unwrap();
        let (mut wire, mut out) = (Vec::new(), Vec::new());
        let mut ctx_bytes = 0;
        let mut alone_bytes = 0;
        for (k, f) in fs.iter().enumerate() {
            // level 3, then 1 from frame 3 on: a level change mid-stream
            let level = if k < 3 { 3 } else { 1 };
            enc.compress(level, f, &mut wire).unwrap();
            ctx_bytes += wire.len();
            alone_bytes += zstd::bulk::compress(f, level).unwrap().len();
            dec.decompress(&wire, f.len(), &mut out).unwrap();
            assert_eq!(&out, f, "frame {k}");
        }
        // the repeated base costs a reference, not its bytes
        assert!(
            ctx_bytes * 2 < alone_bytes,
            "with context {ctx_bytes} B, alone {alone_bytes} B"
        );
    }

    #[test]
    fn a_piece_out_of_order_or_damaged_is_an_error() {
        let fs = frames();
        let mut enc = ContextEncoder::new().unwrap();
        let mut pieces = Vec::new();
        for f in &fs[..3] {
            let mut w = Vec::new();
            enc.compress(3, f, &mut w).unwrap();
            pieces.push(w);
        }
        let mut out = Vec::new();
        // the second piece without the first: refers to what it never saw
        let mut dec = ContextDecoder::new().unwrap();
        assert!(dec.decompress(&pieces[1], fs[1].len(), &mut out).is_err());
        // a wrong plan length, either way
        let mut dec = ContextDecoder::new().unwrap();
        let e = dec
            .decompress(&pieces[0], fs[0].len() - 1, &mut out)
            .unwrap_err();
        assert!(e.to_string().contains("zstd-ctx"), "{e}");
        let mut dec = ContextDecoder::new().unwrap();
        assert!(dec
            .decompress(&pieces[0], fs[0].len() + 1, &mut out)
            .is_err());
        // flipped bytes
        let mut dec = ContextDecoder::new().unwrap();
        let mut bad = pieces[0].clone();
        let n = bad.len();
        for b in &mut bad[n / 2..n / 2 + 16] {
            *b ^= 0x5a;
        }
        let r = dec.decompress(&bad, fs[0].len(), &mut out);
        assert!(r.is_err() || out != fs[0]);
        // garbage
        let mut dec = ContextDecoder::new().unwrap();
        assert!(dec.decompress(&[0xff; 64], 4096, &mut out).is_err());
    }

    #[test]
    fn a_window_larger_than_agreed_is_refused() {
        // A peer's stream asking for a 64 MiB window: refused, not held.
        let mut cctx = CCtx::create();
        cctx.set_parameter(zstd_safe::CParameter::WindowLog(26))
            .unwrap();
        cctx.set_parameter(zstd_safe::CParameter::CompressionLevel(3))
            .unwrap();
        let data = vec![7u8; 1 << 16];
        let mut w = Vec::with_capacity(1 << 17);
        let mut input = InBuffer::around(&data[..]);
        let mut output = OutBuffer::around(&mut w);
        cctx.compress_stream2(&mut output, &mut input, ZSTD_EndDirective::ZSTD_e_flush)
            .unwrap();
        let mut dec = ContextDecoder::new().unwrap();
        let e = dec.decompress(&w, data.len(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("windows up to 4 MiB"), "{e}");
    }
}
