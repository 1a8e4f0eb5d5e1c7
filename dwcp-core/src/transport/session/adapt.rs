//! The session's side of the adaptive layer ([`crate::adapt`]): every
//! `link-sample-ms` the clock (`watch`) reads the counters and each
//! stream's TCP_INFO into a [`LinkSample`], feeds the mode detector and the
//! measured rate, logs each mode switch with its figures, and applies the
//! mode's defaults:
//!
//! - `--codec auto` may use raw frames only on a datacenter path (the tier
//!   tuner reads [`super::Tuning::raw_allowed`]);
//! - on an internet path the source's streams use BBR, unless
//!   `--congestion` chose a congestion control; leaving it restores the
//!   kernel's default the streams started with.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tracing::{debug, info, warn};

use super::{hex, Inner, Role};
use crate::adapt::{
    AdaptConfig, AdaptStats, LinkMode, LinkSample, LinkSampler, MeasuredRate, ModeDetector,
    SessionTotals,
};
use crate::transport::tcp::tcp_info;

/// Congestion control of the source's streams on internet paths.
pub const INTERNET_CONGESTION: &str = "bbr";

/// What the session's clock keeps between link samples.
#[derive(Debug)]
pub(super) struct AdaptState {
    every: Duration,
    next: Instant,
    sampler: LinkSampler,
    detector: ModeDetector,
    rate: MeasuredRate,
    last: Option<LinkSample>,
    /// The mode whose defaults are in force.
    applied: Option<LinkMode>,
    /// The streams' congestion control before the mode changed it.
    cc_default: Option<String>,
    /// Setting the congestion control failed once: not tried again.
    cc_failed: bool,
    /// Clock ticks so far, and those that found the link the bottleneck.
    ticks: u64,
    link_bound_ticks: u64,
}

impl AdaptState {
    pub(super) fn new(cfg: &AdaptConfig, started: Instant) -> Self {
        AdaptState {
            every: cfg.sample_interval,
            next: started + cfg.sample_interval,
            sampler: LinkSampler::new(started),
            detector: ModeDetector::new(cfg.mode.clone(), cfg.sample_interval),
            rate: MeasuredRate::default(),
            last: None,
            applied: None,
            cc_default: None,
            cc_failed: false,
            ticks: 0,
            link_bound_ticks: 0,
        }
    }

    /// What `stats` shows.
    pub(super) fn stats(&self) -> AdaptStats {
        AdaptStats {
            link: self.last,
            mode: self.detector.report().clone(),
            estimate: self.rate.estimate(),
        }
    }
}

/// Notes whether this clock tick found the link to be the bottleneck, and
/// takes a link sample when one is due.
pub(super) fn tick(inner: &Inner, now: Instant, link_bound: bool) {
    let mut st = inner.adapt.lock();
    st.ticks += 1;
    st.link_bound_ticks += u64::from(link_bound);
    if now < st.next {
        return;
    }
    st.next = now + st.every;
    let c = &inner.counters;
    let encode_ns = c.encode_ns.load(Ordering::Relaxed);
    let totals = match inner.role {
        Role::Initiator => SessionTotals {
            at: now,
            wire: c.wire_out.load(Ordering::Relaxed),
            raw: c.raw_out.load(Ordering::Relaxed),
            delivered_wire: inner.flow.credited_wire.load(Ordering::Relaxed),
            inflight: inner.flow.wire_inflight.load(Ordering::Relaxed),
            encode_ns,
            ticks: st.ticks,
            link_bound_ticks: st.link_bound_ticks,
        },
        Role::Responder => {
            let wire = c.wire_in.load(Ordering::Relaxed);
            SessionTotals {
                at: now,
                wire,
                raw: c.raw_in.load(Ordering::Relaxed),
                delivered_wire: wire,
                inflight: 0,
                encode_ns,
                ticks: st.ticks,
                link_bound_ticks: st.link_bound_ticks,
            }
        }
    };
    let infos: Vec<_> = inner
        .links
        .streams
        .iter()
        .map(|s| tcp_info(s).ok())
        .collect();
    let sample = st.sampler.sample(&totals, &infos);
    debug!(name = %inner.name, role = ?inner.role, ?sample, "link sample");
    st.rate.push(&sample);
    st.last = Some(sample);
    if let Some(c) = sample.capacity_bytes_s {
        inner
            .tuning
            .measured_capacity
            .store(c as u64, Ordering::Relaxed);
    }
    if let Some(sw) = st.detector.push(&sample) {
        info!(
            name = %inner.name,
            session = %hex(&inner.id),
            role = ?inner.role,
            from = sw.from.map(LinkMode::as_str).unwrap_or("none"),
            to = sw.to.as_str(),
            rtt_ms = sw.rtt_ms,
            capacity_mbit = sw.capacity_mbit,
            loss_pct = sw.loss_pct,
            confidence = sw.confidence,
            "link mode: {sw}"
        );
    }
    let mode = st.detector.mode();
    if mode != st.applied {
        st.applied = mode;
        apply(inner, &mut st, mode);
    }
}

/// Puts the defaults of `mode` in force.
fn apply(inner: &Inner, st: &mut AdaptState, mode: Option<LinkMode>) {
    let raw_ok = matches!(mode, None | Some(LinkMode::Datacenter));
    inner.tuning.raw_allowed.store(raw_ok, Ordering::Relaxed);
    if inner.role != Role::Initiator || inner.cfg.tuning.congestion.is_some() || st.cc_failed {
        return;
    }
    let Some(first) = inner.links.streams.first() else {
        return;
    };
    if st.cc_default.is_none() {
        let name = SockRef::from(first).tcp_congestion().ok().map(|b| {
            String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
        });
        st.cc_default = name;
    }
    let Some(default) = st.cc_default.clone() else {
        return;
    };
    let want = if mode == Some(LinkMode::Internet) {
        INTERNET_CONGESTION.to_string()
    } else {
        default
    };
    let current = SockRef::from(first).tcp_congestion().ok().map(|b| {
        String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
    });
    if current.as_deref() == Some(want.as_str()) {
        return;
    }
    for s in &inner.links.streams {
        if let Err(e) = SockRef::from(s).set_tcp_congestion(want.as_bytes()) {
            warn!(name = %inner.name, congestion = %want, "link mode: cannot set congestion control: {e}; keeping the kernel's");
            st.cc_failed = true;
            return;
        }
    }
    info!(name = %inner.name, congestion = %want, mode = mode.map(LinkMode::as_str).unwrap_or("none"), "link mode: streams' congestion control");
}
