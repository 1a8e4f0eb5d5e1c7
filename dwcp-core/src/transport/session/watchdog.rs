//! The session's clock (`watch` thread): feeds the tuners a load sample
//! every 50 ms and applies their decisions; fails a session whose peer went
//! silent or closed early; after completion, sends Close and shuts down.

use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::send::Outgoing;
use tracing::info;

use super::tune::{
    inflight_budget, link_backlogged, ContextGate, InflightTuner, TierSample, TierTuner,
};
use super::{fail, wake_all, FailReason, Inner, Role};
use crate::transport::tcp;
use crate::wire::FrameHeader;

/// Measures the session for the in-flight tuner and applies its decision.
fn tune_inflight(inner: &Inner, tuner: &mut InflightTuner) {
    let credited_wire = inner.flow.credited_wire.load(Ordering::Relaxed);
    let credited_raw = inner.flow.credited.load(Ordering::Relaxed);
    let credit_loop = match inner
        .flow
        .credit_loop_min_us
        .swap(u64::MAX, Ordering::Relaxed)
    {
        u64::MAX => None,
        us => Some(us as f64 / 1e6),
    };
    let Some(rates) = tuner.tick(Instant::now(), credited_wire, credited_raw, credit_loop) else {
        return;
    };
    inner.tuning.credit_loop_us.store(
        rates.credit_loop.map_or(0, |s| (s * 1e6).max(1.0) as u64),
        Ordering::Relaxed,
    );
    inner
        .tuning
        .delivery_rate
        .store(rates.delivery as u64, Ordering::Relaxed);
    inner
        .tuning
        .raw_rate
        .store(rates.raw as u64, Ordering::Relaxed);
    let n = inner.links.streams.len().min(4);
    let min_rtt = tcp::path_min_rtt_us(&inner.links.streams[..n]).unwrap_or(1000) as f64 / 1e6;
    let floor = 2 * inner.cfg.chunk as u64;
    let ceiling = inner.window * inner.cfg.max_channels as u64;
    inner.tuning.target_inflight.store(
        inflight_budget(rates.delivery, min_rtt, rates.credit_loop, floor, ceiling),
        Ordering::Relaxed,
    );
}

/// What one clock tick finds the bottleneck to be.
#[derive(Debug, Clone, Copy)]
pub(super) struct Load {
    /// The encode queue is full: compression is the bottleneck.
    pub(super) encode_queue_full: bool,
    /// Readers wait for credit or encoded frames pile up for the sockets,
    /// and the kernel holds at least half of what is in flight
    /// ([`link_backlogged`]): the link is the bottleneck.
    pub(super) link_bound: bool,
}

/// Looks at the queues now (TCP_INFO only when the cheap signs say the
/// link may be the limit).
fn load_now(inner: &Inner) -> Load {
    let full = |len: usize, cap: Option<usize>| cap.is_some_and(|c| len >= c);
    let encode_queue_full = full(inner.queues.job_rx.len(), inner.queues.job_rx.capacity());
    let link_bound = !encode_queue_full
        && (inner.flow.credit_waiters.load(Ordering::Relaxed) > 0
            || full(
                inner.queues.frame_rx.len(),
                inner.queues.frame_rx.capacity(),
            ))
        && link_backlogged(
            tcp::stream_backlog(&inner.links.streams),
            inner.flow.wire_inflight.load(Ordering::Relaxed),
        );
    Load {
        encode_queue_full,
        link_bound,
    }
}

/// Feeds the tier tuner (`--codec auto`) this tick's load and applies its
/// decision.
fn tune_tier(inner: &Inner, tiers: &mut TierTuner, load: Load) {
    if !inner.cfg.auto_tier {
        return;
    }
    if let Some(c) = tiers.allow_raw(inner.tuning.raw_allowed.load(Ordering::Relaxed)) {
        *inner.tuning.tier.lock() = c;
        info!(name = %inner.name, tier = %c, "auto tier: raw frames only on a datacenter path");
    }
    let capacity = inner.tuning.measured_capacity.load(Ordering::Relaxed);
    if let Some(c) = tiers.measured_capacity(capacity as f64) {
        *inner.tuning.tier.lock() = c;
        info!(name = %inner.name, tier = %c, capacity_mbit = capacity as f64 * 8.0 / 1e6, "auto tier: a measured capacity under 200 Mbit/s");
    }
    let sample = TierSample {
        now: Instant::now(),
        encode_queue_full: load.encode_queue_full,
        link_bound: load.link_bound,
        credited_wire: inner.flow.credited_wire.load(Ordering::Relaxed),
        encode_ns: inner.counters.encode_ns.load(Ordering::Relaxed),
        probe: (
            inner.counters.probe_base.load(Ordering::Relaxed),
            inner.counters.probe_high.load(Ordering::Relaxed),
        ),
    };
    if let Some(c) = tiers.sample(&sample) {
        *inner.tuning.tier.lock() = c.tier;
        info!(name = %inner.name, tier = %c.tier, link_bound = c.link_bound, cpu_bound = c.cpu_bound, rate_mb_s = c.rate / 1e6, codec_cpu = c.codec_cpu, high_level_gain = ?c.high_gain, "auto tier");
    }
}

/// Turns compression with context on or off ([`ContextGate`]), where the
/// session agreed to it and this end sends the guest's pages.
fn tune_context(inner: &Inner, gate: &mut ContextGate) {
    if !inner.context
        || inner.role != super::Role::Initiator
        || inner.cfg.context != crate::transport::ContextUse::Auto
    {
        return;
    }
    let credited = inner.flow.credited_wire.load(Ordering::Relaxed);
    let encode_ns = inner.counters.encode_ns.load(Ordering::Relaxed);
    if let Some((on, rate, cpu)) = gate.sample(Instant::now(), credited, encode_ns) {
        inner.tuning.context.store(on, Ordering::Relaxed);
        info!(name = %inner.name, on, rate_mb_s = rate / 1e6, codec_cpu = cpu, "compression with context");
    }
}

pub(super) fn watchdog(inner: Arc<Inner>) {
    let n = inner.links.streams.len();
    let mut close_sent: Option<Instant> = None;
    let mut tuner = InflightTuner::new(Instant::now());
    let mut tiers = TierTuner::start(*inner.tuning.tier.lock());
    let mut context = ContextGate::default();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        tune_inflight(&inner, &mut tuner);
        let load = load_now(&inner);
        super::adapt::tick(&inner, Instant::now(), load.link_bound);
        tune_tier(&inner, &mut tiers, load);
        tune_context(&inner, &mut context);
        if inner.life.failed.load(Ordering::Acquire) {
            // Give the writers a moment to put the Abort on the wire.
            std::thread::sleep(Duration::from_millis(200));
            for s in &inner.links.streams {
                let _ = s.shutdown(Shutdown::Both);
            }
            for ch in inner.channels.map.lock().values() {
                let _ = ch.local.shutdown(Shutdown::Both);
            }
            wake_all(&inner);
            return;
        }
        if inner.life.complete.load(Ordering::Acquire) {
            if close_sent.is_none() && inner.queues.inflight.load(Ordering::Acquire) == 0 {
                if inner.role == Role::Initiator {
                    let h = FrameHeader::close(inner.channels.map.lock().len() as u32);
                    inner.queues.inflight.fetch_add(1, Ordering::AcqRel);
                    let _ = inner
                        .queues
                        .frame_tx
                        .send_timeout(Outgoing::Frame(h, Vec::new()), Duration::from_secs(5));
                }
                for _ in 0..n {
                    if inner
                        .queues
                        .frame_tx
                        .send_timeout(Outgoing::Close, Duration::from_secs(5))
                        .is_err()
                    {
                        break;
                    }
                }
                close_sent = Some(Instant::now());
            }
            let readers_gone = inner.life.readers_done.load(Ordering::Acquire) >= n;
            let stuck = close_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(5));
            if readers_gone || stuck {
                for s in &inner.links.streams {
                    let _ = s.shutdown(Shutdown::Both);
                }
                return;
            }
            continue;
        }
        let first_eof = *inner.life.first_eof.lock();
        if let Some(t) = first_eof {
            if t.elapsed() > Duration::from_secs(3) {
                fail(&inner, FailReason::PeerClosed);
                continue;
            }
        }
        if inner.life.last_rx.lock().elapsed() > inner.cfg.idle_timeout {
            fail(&inner, FailReason::PeerSilent(inner.cfg.idle_timeout));
        }
    }
}
