//! The memory a session may take: its budget (`session-memory`, default
//! 256 MiB), the cost model behind it, and what a destination grants.
//!
//! Everything a peer can make a destination hold is bounded by the session's
//! shape: its streams (each reads one frame at a time), its channels (each
//! buffers at most the window, plus one frame being rebuilt and one being
//! read from QEMU) and its dedup rings (filled page by page as the peer
//! sends pages). The destination grants a window and a ring per channel such
//! that
//!
//! ```text
//! fixed(streams, workers, chunk) + max_channels × channel(window, chunk) + ring ≤ budget
//! ```
//!
//! with the windows taking at most two thirds of what the fixed part leaves. The
//! windows of every channel the session may open are counted up front, so an
//! honest session never fails for memory once started; the rings are counted
//! as they fill, for the whole session ([`SessionBudget`]): one ring may
//! fill completely, and a peer filling more than one runs out of budget and
//! fails its session. The arithmetic is in this module, pure, and tested;
//! `docs/protocol.md` states it with the default figures.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::codec::{MAX_RAW_LEN, PAGE_SIZE};
use crate::transport::gate::GATE_HOLD;
use crate::wire::{FRAME_HEADER_LEN, MAX_WIRE_LEN};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Default per-session budget.
pub const DEFAULT_SESSION_MEMORY: u64 = 256 * MIB;
/// Smallest budget `session-memory` accepts.
pub const MIN_SESSION_MEMORY: u64 = 64 * MIB;
/// Largest budget `session-memory` accepts.
pub const MAX_SESSION_MEMORY: u64 = 64 << 30;
/// Allowed values of `session-memory`, as errors and help show them.
pub const SESSION_MEMORY_RANGE: &str = "64 MiB..=64 GiB (a number of MiB, or 512MiB, 2GiB)";

/// Resident stack of one session thread (they run shallow loops; measured
/// well below this).
pub const THREAD_BYTES: u64 = 64 * KIB;
/// TLS state of one stream (rustls' record buffers both ways).
pub const TLS_BYTES: u64 = 96 * KIB;
/// A zstd decompression context; one-shot decoding into the plan buffer
/// allocates no window.
pub const DECODER_BYTES: u64 = 160 * KIB;
/// A compression worker's zstd context at the levels the agent uses
/// (auto goes up to zstd:3 on the 1 MiB frames).
pub const ENCODER_BYTES: u64 = 2 * MIB;
/// A channel's context stream on the receiving end (compression with
/// context across frames, [`crate::codec::context`]): the zstd history
/// window the decoder accepts at most (4 MiB), its decoding context and
/// block buffer. Counted for every channel: a peer may start one on each.
pub const CONTEXT_BYTES: u64 = (4 * MIB) + DECODER_BYTES + 128 * KIB;
/// Bookkeeping of one buffered frame: its map entry and allocation headers.
pub const FRAME_ENTRY_BYTES: u64 = 128;
pub use crate::wire::{max_compressed_len, max_plan_len, PLAN_SLACK};
/// Session state tied to neither a stream nor a channel: the queues'
/// bookkeeping, statistics, and the tail a gated session holds back.
pub const SESSION_BASE: u64 = GATE_HOLD as u64 + MIB;
/// Read buffer of a stream's reader (its frame headers pass through it).
pub const RX_BUFFER: u64 = super::session::RX_BUFFER as u64;

/// Largest frame (header and payload) a sender builds from one chunk.
fn out_frame(chunk: u64) -> u64 {
    FRAME_HEADER_LEN as u64 + max_compressed_len(max_plan_len(chunk))
}

/// Most frames a channel's reorder buffer may hold (the receiver's rule:
/// a peer that sends more small frames fails the session).
pub fn max_buffered_frames(window: u64) -> u64 {
    4 * (window / PAGE_SIZE as u64 + 16)
}

/// What one stream costs: the frame its reader is reading (payload, its
/// buffer and decoder), its TLS state, two threads, and the frames queued
/// for its writer (two in the send queue, one being written).
pub fn stream_bytes(chunk: u64) -> u64 {
    MAX_WIRE_LEN as u64
        + RX_BUFFER
        + DECODER_BYTES
        + TLS_BYTES
        + 2 * THREAD_BYTES
        + 3 * out_frame(chunk)
}

/// What a session costs before any channel: its streams, its compression
/// workers (context, thread, the plan and output in hand, two queued jobs)
/// and [`SESSION_BASE`].
pub fn fixed_bytes(streams: u64, workers: u64, chunk: u64) -> u64 {
    let worker = ENCODER_BYTES + THREAD_BYTES + 2 * out_frame(chunk) + 2 * max_plan_len(chunk);
    // The send queue holds 2 × streams + 4 frames: 4 beyond the streams' own.
    SESSION_BASE
        + streams * stream_bytes(chunk)
        + workers * worker
        + 4 * out_frame(chunk)
        + THREAD_BYTES
}

/// What one channel costs with `window` (its ring aside):
/// [`window_bytes`] and its context stream ([`context_bytes`]).
pub fn channel_bytes(window: u64, chunk: u64) -> u64 {
    window_bytes(window, chunk) + context_bytes(chunk)
}

/// The part of a channel that grows with its window: the reorder buffer
/// (at most `window` raw bytes, their plans' overhead and the frames'
/// bookkeeping), the frame being rebuilt for QEMU, the chunk read from
/// QEMU and its plan, and two threads.
pub fn window_bytes(window: u64, chunk: u64) -> u64 {
    let frames = max_buffered_frames(window);
    let buffered = window + window / 64 + frames * (PLAN_SLACK + FRAME_ENTRY_BYTES);
    buffered + MAX_RAW_LEN as u64 + chunk + max_plan_len(chunk) + 2 * THREAD_BYTES
}

/// A channel's context stream on the receiving end: [`CONTEXT_BYTES`] and
/// the plan it decodes into. Taken from the ring's share of the budget, not
/// the windows': a smaller window cost 7 % of `internet`'s time with a core
/// busy (docs/protocol.md), a smaller memory ring only moves pages to the
/// spill file sooner.
pub fn context_bytes(chunk: u64) -> u64 {
    CONTEXT_BYTES + max_plan_len(chunk)
}

/// What a destination is asked for, and its own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// The per-session budget, bytes.
    pub budget: u64,
    pub streams: u16,
    /// The destination's compression workers per session.
    pub workers: u16,
    /// Largest read from QEMU per frame, bytes.
    pub chunk: u32,
    /// Channels a session may open (each gets the window).
    pub max_channels: u16,
    /// Window asked, capped by the destination's own maximum.
    pub window: u32,
    /// Ring pages asked, capped by the destination's own maximum.
    pub ring_pages: u32,
}

/// What a destination grants a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub window: u32,
    pub ring_pages: u32,
    /// Bytes the session's channels and rings may take at run time
    /// (the budget less the fixed part).
    pub account: u64,
}

/// A session the budget cannot hold even at the smallest window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a session of {streams} streams and up to {channels} channels needs at least {need_mib} MiB, \
     more than the per-session memory budget of {budget_mib} MiB (session-memory)"
)]
pub struct OverBudget {
    pub streams: u16,
    pub channels: u16,
    pub need_mib: u64,
    pub budget_mib: u64,
}

/// Window sizes are granted in steps of this many bytes.
pub const WINDOW_STEP: u64 = 64 * KIB;

/// The smallest window a session may run with: two chunks.
pub fn min_window(chunk: u64) -> u64 {
    (2 * chunk).div_ceil(WINDOW_STEP) * WINDOW_STEP
}

/// The window and ring a destination grants for `ask`: the window as asked
/// if the windows of all channels fit in two thirds of what the budget leaves
/// after the fixed part, else the largest that does (never below two
/// chunks, never above the ask); the ring as asked if it fits in the rest,
/// else the rest.
pub fn grant(ask: &Ask) -> Result<Grant, OverBudget> {
    let chunk = ask.chunk as u64;
    let channels = ask.max_channels.max(1) as u64;
    let fixed = fixed_bytes(ask.streams as u64, ask.workers as u64, chunk);
    let min_w = min_window(chunk);
    let need = fixed + channels * channel_bytes(min_w, chunk);
    if need > ask.budget {
        return Err(OverBudget {
            streams: ask.streams,
            channels: ask.max_channels,
            need_mib: need.div_ceil(MIB),
            budget_mib: ask.budget / MIB,
        });
    }
    let account = ask.budget - fixed;
    // The windows take up to two thirds, and never what the channels'
    // context streams need.
    let for_windows = (account / 3 * 2)
        .min(account - channels * context_bytes(chunk))
        .max(channels * window_bytes(min_w, chunk));
    // A window below two chunks (the destination refuses those) fits as is.
    let mut window = ask.window as u64;
    if channels * window_bytes(window, chunk) > for_windows {
        // window_bytes grows with the window: search the largest step that fits.
        let (mut lo, mut hi) = (min_w / WINDOW_STEP, window / WINDOW_STEP);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if channels * window_bytes(mid * WINDOW_STEP, chunk) <= for_windows {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        window = lo * WINDOW_STEP;
    }
    let left = account - channels * channel_bytes(window, chunk);
    let ring_pages = (ask.ring_pages as u64).min(left / PAGE_SIZE as u64) as u32;
    Ok(Grant {
        window: window as u32,
        ring_pages,
        account,
    })
}

/// The budget of a running session: the channels it opened and the ring
/// pages they filled, against [`Grant::account`]. Charges never go back
/// (a channel's memory lives as long as the session).
#[derive(Debug)]
pub struct SessionBudget {
    /// Bytes the session's channels and rings may take; `u64::MAX`: not
    /// enforced (a session whose budget was not set by a grant).
    limit: u64,
    used: AtomicU64,
    /// Bytes the session's total budget (for messages), MiB.
    budget_mib: u64,
}

impl SessionBudget {
    pub fn new(limit: u64, budget: u64) -> SessionBudget {
        SessionBudget {
            limit,
            used: AtomicU64::new(0),
            budget_mib: budget / MIB,
        }
    }

    /// Bytes charged so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes the channels and rings may take.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Charges `bytes` for `what`; the error says what went past the budget.
    pub fn charge(&self, bytes: u64, what: impl FnOnce() -> String) -> Result<(), String> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur.saturating_add(bytes);
            if next > self.limit {
                return Err(format!(
                    "{} would take the session past its memory budget of {} MiB \
                     (session-memory; {} MiB of the {} MiB left after its streams are in use)",
                    what(),
                    self.budget_mib,
                    cur.div_ceil(MIB),
                    self.limit / MIB
                ));
            }
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(c) => cur = c,
            }
        }
    }
}

/// Charges a channel's dedup ring as it fills, in steps of [`RING_STEP`]
/// pages, so the shared account is touched once per 1 MiB of ring.
#[derive(Debug, Default)]
pub struct RingCharge {
    charged_pages: u64,
}

/// Ring pages charged at a time.
pub const RING_STEP: u64 = MIB / PAGE_SIZE as u64;

impl RingCharge {
    /// The ring now holds `pages` (at most its capacity `cap`): charges
    /// what is new.
    pub fn update(
        &mut self,
        budget: &SessionBudget,
        pages: u64,
        cap: u64,
        channel: u16,
    ) -> Result<(), String> {
        if pages <= self.charged_pages {
            return Ok(());
        }
        let to = (pages.div_ceil(RING_STEP) * RING_STEP).min(cap.max(pages));
        let bytes = (to - self.charged_pages) * PAGE_SIZE as u64;
        budget.charge(bytes, || {
            format!(
                "filling channel {channel}'s dedup ring to {} MiB",
                (to * PAGE_SIZE as u64).div_ceil(MIB)
            )
        })?;
        self.charged_pages = to;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask() -> Ask {
        Ask {
            budget: DEFAULT_SESSION_MEMORY,
            streams: 4,
            workers: 2,
            chunk: 512 << 10,
            max_channels: 8,
            window: 32 << 20,
            ring_pages: (256 << 20) / 4096,
        }
    }

    /// The whole session's worst case under a grant.
    fn worst(a: &Ask, g: &Grant) -> u64 {
        fixed_bytes(a.streams as u64, a.workers as u64, a.chunk as u64)
            + a.max_channels as u64 * channel_bytes(g.window as u64, a.chunk as u64)
            + g.ring_pages as u64 * PAGE_SIZE as u64
    }

    #[test]
    fn defaults_fit_the_default_budget() {
        let a = ask();
        let g = grant(&a).unwrap();
        eprintln!(
            "default grant: window {} KiB, ring {} MiB, fixed {} KiB, channel {} KiB, stream {} KiB",
            g.window >> 10,
            g.ring_pages / 256,
            fixed_bytes(4, 2, 512 << 10) >> 10,
            channel_bytes(g.window as u64, 512 << 10) >> 10,
            stream_bytes(512 << 10) >> 10
        );
        assert!(worst(&a, &g) <= a.budget, "{g:?}");
        assert_eq!(g.window as u64 % WINDOW_STEP, 0);
        assert!(g.window as u64 >= min_window(a.chunk as u64));
        // Windows take at most two thirds of what the fixed part leaves.
        assert!(8 * window_bytes(g.window as u64, a.chunk as u64) <= g.account / 3 * 2);
        // The next window step would not fit in those two thirds.
        assert!(
            8 * window_bytes(g.window as u64 + WINDOW_STEP, a.chunk as u64) > g.account / 3 * 2
        );
        assert!(g.ring_pages > 0);
    }

    /// The figures docs/protocol.md states.
    #[test]
    fn the_documented_figures() {
        let c = 512 << 10;
        assert_eq!(stream_bytes(c) >> 10, 3072);
        assert_eq!(fixed_bytes(0, 0, c) >> 10, 7284);
        assert_eq!((fixed_bytes(0, 1, c) - fixed_bytes(0, 0, c)) >> 10, 4202);
        assert_eq!(window_bytes(0, c) >> 10, 2193);
        assert_eq!(context_bytes(c) >> 10, 4904);
        let g = |budget: u64| {
            let g = grant(&Ask { budget, ..ask() }).unwrap();
            (g.window >> 10, g.ring_pages / 256)
        };
        assert_eq!(g(256 * MIB), (14976, 37));
        assert_eq!(g(512 * MIB), (32768, 133));
        assert_eq!(g(1024 * MIB), (32768, 256));
        let fits = |streams| grant(&Ask { streams, ..ask() }).is_ok();
        assert!(fits(58) && !fits(59));
    }

    #[test]
    fn a_small_ask_is_granted_as_asked() {
        let a = Ask {
            window: 2 << 20,
            ring_pages: 1024,
            max_channels: 2,
            ..ask()
        };
        let g = grant(&a).unwrap();
        assert_eq!((g.window, g.ring_pages), (2 << 20, 1024));
    }

    #[test]
    fn the_grant_never_exceeds_the_ask() {
        let a = Ask {
            window: 4096,
            ring_pages: 0,
            ..ask()
        };
        let g = grant(&a).unwrap();
        assert_eq!((g.window, g.ring_pages), (4096, 0));
    }

    #[test]
    fn the_most_of_everything_stays_within_the_budget() {
        for budget in [16 * MIB, 64 * MIB, 256 * MIB, 1 << 30, 8 << 30] {
            for streams in [1u16, 4, 16, 64, 256] {
                for channels in [1u16, 16, 64] {
                    for chunk in [4096u32, 512 << 10, 1 << 20] {
                        let a = Ask {
                            budget,
                            streams,
                            workers: 64,
                            chunk,
                            max_channels: channels,
                            window: u32::MAX,
                            ring_pages: u32::MAX,
                        };
                        match grant(&a) {
                            Ok(g) => {
                                assert!(worst(&a, &g) <= budget, "{a:?} {g:?}");
                                assert!(g.window as u64 >= min_window(chunk as u64));
                            }
                            Err(e) => {
                                assert!(e.need_mib * MIB > budget - MIB, "{a:?}: {e}");
                                assert!(e.to_string().contains("session-memory"), "{e}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn too_many_streams_are_refused_naming_the_budget() {
        let a = Ask {
            streams: 256,
            ..ask()
        };
        let e = grant(&a).unwrap_err();
        assert_eq!(e.streams, 256);
        assert!(e.need_mib > 256, "{e}");
        assert!(e.to_string().contains("256 MiB (session-memory)"), "{e}");
        // A bigger budget takes them.
        let g = grant(&Ask {
            budget: 2 << 30,
            ..a
        })
        .unwrap();
        assert!(worst(&a, &g) <= 2 << 30);
    }

    #[test]
    fn a_bigger_budget_grants_more() {
        let small = grant(&ask()).unwrap();
        let big = grant(&Ask {
            budget: 1 << 30,
            ..ask()
        })
        .unwrap();
        assert!(big.window > small.window);
        assert!(big.ring_pages >= small.ring_pages);
    }

    #[test]
    fn the_account_refuses_past_its_limit_and_names_it() {
        let b = SessionBudget::new(10 * MIB, 256 * MIB);
        b.charge(6 * MIB, || "opening channel 0".into()).unwrap();
        let e = b
            .charge(5 * MIB, || "opening channel 1".into())
            .unwrap_err();
        assert!(e.starts_with("opening channel 1 would take the session past its memory budget of 256 MiB (session-memory"), "{e}");
        assert_eq!(b.used(), 6 * MIB);
        b.charge(4 * MIB, || "x".into()).unwrap();
        assert_eq!(b.used(), 10 * MIB);
    }

    #[test]
    fn rings_are_charged_as_they_fill_up_to_their_capacity() {
        let b = SessionBudget::new(100 * MIB, 256 * MIB);
        let mut r = RingCharge::default();
        r.update(&b, 1, 1000, 0).unwrap();
        assert_eq!(b.used(), MIB); // one step ahead
        r.update(&b, 200, 1000, 0).unwrap();
        assert_eq!(b.used(), MIB);
        r.update(&b, 257, 1000, 0).unwrap();
        assert_eq!(b.used(), 2 * MIB);
        r.update(&b, 1000, 1000, 0).unwrap();
        assert_eq!(b.used(), 1000 * 4096); // capped by the ring's capacity
                                           // a second ring filling past the account fails, naming the channel
        let mut r2 = RingCharge::default();
        let e = r2
            .update(&b, 100 * RING_STEP, 100 * RING_STEP, 3)
            .unwrap_err();
        assert!(
            e.starts_with("filling channel 3's dedup ring to 100 MiB"),
            "{e}"
        );
    }
}
