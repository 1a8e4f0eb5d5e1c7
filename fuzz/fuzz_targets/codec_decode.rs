//! The receive side of every codec tier: `Decompressor::decompress` (none,
//! lz4, zstd, raw), the dedup plan interpreter `Rebuilder::rebuild` and the
//! context stream (`Rebuilder::rebuild_context`, codec 5), fed a sequence of
//! frames through one channel (the dedup ring and the context stream carry
//! over).
//!
//! Input: ring byte (ring of `b & 15` pages, extended by a spill file of
//! `b >> 4` pages in the temp directory), then frames of
//! `[codec u8][plan_len u24][raw_len u24][wire_len u16][wire...]`.
//! Codec byte bit 7 set: the wire bytes are raw data, planned by a
//! `Planner` and compressed by a `Compressor` (tier from bits 0-1: none,
//! lz4, zstd:1; 3 = the channel's `ContextEncoder` at zstd:1) before
//! they are decoded, and the rebuilt bytes must equal them (a round trip
//! through the sender, as long as the channel has not seen an error).
//! Otherwise the bytes go to the decoders as they are (codec `b & 0x7f`).
//! The planner sends deltas of re-sent pages (`set_delta`) unless the ring
//! byte is odd, so hand-made frames also meet a rebuilder whose ring holds
//! pages a DELTA op names (codec 1 plans with `0x06` ops). Unless bit 1 of
//! the ring byte is set, a channel whose first raw bytes are QEMU's
//! multifd magic is followed packet by packet (`set_multifd`), its first
//! plan starting with a RING op.
#![no_main]

use dwcp_core::codec::context::ContextEncoder;
use dwcp_core::codec::{
    CodecId, Compressor, Decompressor, Planner, Rebuilder, Tier, MAX_PLAN_LEN, MAX_RAW_LEN,
    PAGE_SIZE,
};
use libfuzzer_sys::fuzz_target;

fn u24(b: &[u8]) -> usize {
    b[0] as usize | (b[1] as usize) << 8 | (b[2] as usize) << 16
}

fuzz_target!(|data: &[u8]| {
    let Some((&ring, mut rest)) = data.split_first() else {
        return;
    };
    let ring_bytes = (ring & 15) as usize * PAGE_SIZE;
    let spill = u64::from(ring >> 4);
    let dir = std::env::temp_dir();
    let new_planner = || {
        let mut p = Planner::with_spill(ring_bytes, spill, &dir).expect("spill file");
        p.set_delta(ring & 1 == 0);
        // Multifd channels' pages (and the RING op) unless bit 1 is set.
        p.set_multifd((ring & 2 == 0).then_some(u64::from(ring & 15)));
        p
    };
    // A new channel: both ends' rings, the sender's context stream, and
    // whether the rings and the context streams are in step (true).
    let fresh = || {
        (
            new_planner(),
            Rebuilder::with_spill(ring_bytes, spill, &dir).expect("spill file"),
            ContextEncoder::new().expect("zstd context"),
            true,
            true,
        )
    };
    let (mut planner, mut rebuilder, mut ctx, mut in_step, mut ctx_in_step) = fresh();
    let mut dec = Decompressor::new();
    let mut comp = Compressor::new();
    while rest.len() >= 9 {
        let codec_b = rest[0];
        let plan_len = u24(&rest[1..4]);
        let raw_len = u24(&rest[4..7]);
        let wire_len = u16::from_le_bytes([rest[7], rest[8]]) as usize;
        rest = &rest[9..];
        let (bytes, tail) = rest.split_at(wire_len.min(rest.len()));
        rest = tail;

        let (codec, wire, plan_len, raw_len, expect) = if codec_b & 0x80 != 0 {
            if bytes.is_empty() {
                continue;
            }
            let tier = match codec_b & 3 {
                0 => Tier::None,
                1 => Tier::Lz4,
                _ => Tier::Zstd(1),
            };
            let mut plan = Vec::new();
            planner.plan(bytes, &mut plan);
            let mut wire = Vec::new();
            let id = if codec_b & 3 == 3 {
                ctx.compress(1, &plan, &mut wire)
                    .expect("context compression");
                CodecId::ZstdCtx
            } else {
                comp.compress(tier, &plan, &mut wire)
            };
            (id, wire, plan.len(), bytes.len(), Some(bytes))
        } else {
            let Some(id) = CodecId::from_wire(codec_b & 0x7f) else {
                continue;
            };
            (id, bytes.to_vec(), plan_len, raw_len, None)
        };

        if codec == CodecId::ZstdCtx {
            let mut raw = Vec::new();
            let res = rebuilder.rebuild_context(&wire, plan_len, raw_len, &mut raw);
            assert!(raw.capacity() <= MAX_RAW_LEN);
            match res {
                Ok(()) => {
                    assert_eq!(raw.len(), raw_len);
                    if let (Some(want), true) = (expect, in_step && ctx_in_step) {
                        assert!(raw == want, "round trip through the context stream differs");
                    }
                    if expect.is_none() {
                        in_step = false;
                        ctx_in_step = false;
                    }
                }
                Err(e) => {
                    assert!(
                        expect.is_none() || !in_step || !ctx_in_step,
                        "decoding the context stream's own piece failed: {e}"
                    );
                    (planner, rebuilder, ctx, in_step, ctx_in_step) = fresh();
                }
            }
            continue;
        }
        let mut plan = Vec::new();
        let res = dec.decompress(codec, &wire, plan_len, &mut plan);
        // Allocation is bounded by the header's plan length, itself capped.
        assert!(plan.capacity() <= MAX_PLAN_LEN.max(wire.len()));
        if res.is_err() {
            assert!(
                expect.is_none(),
                "decompressing what the compressor made failed: {res:?}"
            );
            continue;
        }
        assert_eq!(plan.len(), plan_len);
        if codec == CodecId::Raw {
            // Raw frames carry the bytes themselves and skip the rebuilder.
            continue;
        }
        let mut raw = Vec::new();
        let res = rebuilder.rebuild(&plan, raw_len, &mut raw);
        assert!(raw.capacity() <= MAX_RAW_LEN);
        match res {
            Ok(()) => {
                assert_eq!(raw.len(), raw_len);
                if let (Some(want), true) = (expect, in_step) {
                    assert!(
                        raw == want,
                        "round trip through planner and rebuilder differs"
                    );
                }
            }
            Err(e) => {
                assert!(
                    expect.is_none() || !in_step,
                    "rebuilding the planner's plan failed: {e}"
                );
                // After an error the channel is torn down: start afresh.
                (planner, rebuilder, ctx, in_step, ctx_in_step) = fresh();
                continue;
            }
        }
        if expect.is_none() {
            // A hand-made frame the rebuilder accepted: the planner's ring
            // no longer matches the rebuilder's.
            in_step = false;
        }
    }
});
