//! The driver's side of a migration's progress: the ETA from QEMU's (or
//! libvirt's) figures, and the once-a-second `progress` report to the local
//! agent (dwcp_core::agent::progress), which the metrics endpoint, the
//! dashboard and `dwcp stats --watch` show.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ramsample::RamSampler;

/// How far back the transfer rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// The recent transfer rate, from successive (time, bytes transferred so
/// far) samples over the last [`RATE_WINDOW`].
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    pub fn observe(&mut self, at: Instant, transferred: u64) {
        if self.samples.back().is_some_and(|(_, b)| transferred < *b) {
            // A new count (QEMU restarted its figures): start over.
            self.samples.clear();
        }
        self.samples.push_back((at, transferred));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| at.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second over the window; None before half a second of
    /// samples.
    pub fn rate(&self) -> Option<f64> {
        let (t0, b0) = self.samples.front()?;
        let (t1, b1) = self.samples.back()?;
        let dt = t1.duration_since(*t0).as_secs_f64();
        (dt >= 0.5).then(|| (b1 - b0) as f64 / dt)
    }
}

/// Seconds until `remaining` bytes of guest RAM are sent at `rate` bytes/s
/// written by QEMU, `ram_per_byte` RAM bytes per byte written (zero pages
/// cost QEMU a header), while the guest dirties `dirty_rate` bytes/s:
/// `remaining / (ram_per_byte * (rate - dirty_rate))` (what is dirtied
/// meanwhile is content, resent at one RAM byte per byte; the sum of the
/// passes). None when the rate is unknown or not above the dirty rate (the
/// migration does not converge at this pace: no ETA rather than a wrong one).
/// `backlog` bytes dirtied behind the first pass are added to what is left.
/// The agent's formula (`dwcp_core::adapt::eta_s`) with QEMU's own write
/// rate (raw bytes, ratio 1) as the rate.
fn eta_s(
    remaining: u64,
    backlog: u64,
    rate: Option<f64>,
    (dirty_rate, dirty_behind): (Option<f64>, Option<f64>),
    ram_per_byte: f64,
) -> Option<f64> {
    dwcp_core::adapt::eta_s(&dwcp_core::adapt::EtaInput {
        remaining_bytes: remaining,
        dirty_rate_bytes_s: dirty_rate.unwrap_or(0.0),
        ram_per_byte,
        backlog_bytes: backlog,
        dirty_behind_bytes_s: dirty_behind,
        estimate: dwcp_core::adapt::RateEstimate {
            wire_rate_bytes_s: rate?,
            ratio: 1.0,
            source: "driver",
        },
    })
}

/// One report for the agent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub remaining_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub eta_s: Option<f64>,
    pub expected_downtime_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// Guest RAM dirtied per second, bytes: with it the agent computes the
    /// ETA from its measured rate (dwcp_core::adapt::eta).
    pub dirty_rate_bytes_s: Option<f64>,
    /// Guest RAM bytes QEMU got through per byte it wrote, recently (zero
    /// pages cost it only a header).
    pub ram_per_byte: Option<f64>,
    /// Guest RAM dirtied behind QEMU's first pass, which `remaining_bytes`
    /// does not count until the pass ends.
    pub backlog_bytes: Option<u64>,
    /// During the first pass, the part of the dirty rate behind it.
    pub dirty_behind_bytes_s: Option<f64>,
}

impl Progress {
    fn request(&self, name: &str) -> Value {
        json!({"op": "progress", "name": name, "remaining_bytes": self.remaining_bytes,
               "total_bytes": self.total_bytes, "eta_s": self.eta_s,
               "expected_downtime_ms": self.expected_downtime_ms,
               "downtime_ms": self.downtime_ms,
               "dirty_rate_bytes_s": self.dirty_rate_bytes_s,
               "ram_per_byte": self.ram_per_byte,
               "backlog_bytes": self.backlog_bytes,
               "dirty_behind_bytes_s": self.dirty_behind_bytes_s})
    }
}

/// The agent's answer to the latest report: its ETA (`eta_s`,
/// `eta_source`), the link mode (`mode`) and the rate estimate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentView {
    pub eta_s: Option<f64>,
    pub eta_source: Option<String>,
    pub mode: Option<String>,
    /// The agent's predicted wire rate (5-s mean), bytes/s, and predictor.
    pub predicted_wire: Option<(f64, String)>,
    /// The measured compression ratio (raw bytes per wire byte).
    pub ratio: Option<f64>,
}

impl AgentView {
    fn of(v: &Value) -> AgentView {
        AgentView {
            eta_s: v["eta_s"].as_f64().filter(|e| e.is_finite() && *e >= 0.0),
            eta_source: v["eta_source"].as_str().map(str::to_string),
            mode: v["mode"].as_str().map(str::to_string),
            predicted_wire: v["prediction"]["mean_5s_mbit"]
                .as_f64()
                .filter(|r| r.is_finite() && *r >= 0.0)
                .map(|r| {
                    let name = v["prediction"]["predictor"].as_str().unwrap_or("?");
                    (r * 1e6 / 8.0, name.to_string())
                }),
            ratio: v["measured"]["ratio"]
                .as_f64()
                .filter(|r| r.is_finite() && *r > 0.0),
        }
    }
}

/// How long an answer of the agent stands.
const VIEW_FRESH: Duration = Duration::from_secs(3);

/// The ETAs a migration showed, and their error once its real duration is
/// known: the ETA current at 25, 50 and 75 % of the migration's time
/// against the time it really still took.
#[derive(Debug, Default)]
pub struct EtaLog {
    /// (seconds since the start, ETA seconds, who computed it).
    points: Vec<(f64, f64, String)>,
}

impl EtaLog {
    /// Notes the ETA shown at `at_s` (at most one point per half second;
    /// an unknown ETA ends the previous one's validity).
    pub fn record(&mut self, at_s: f64, eta: Option<f64>, source: &str) {
        if self.points.last().is_some_and(|p| at_s - p.0 < 0.5) {
            return;
        }
        match eta {
            Some(e) => self.points.push((at_s, e, source.to_string())),
            None => self.points.push((at_s, f64::NAN, source.to_string())),
        }
    }

    /// The checks at 25/50/75 % of `actual_s` (the migration's real
    /// duration): the ETA current then, what was really left, the error.
    pub fn checks(&self, actual_s: f64) -> Value {
        let checks: Vec<Value> = [25u32, 50, 75]
            .into_iter()
            .map(|pct| {
                let at = actual_s * pct as f64 / 100.0;
                let left = actual_s - at;
                let point = self.points.iter().rev().find(|p| p.0 <= at);
                match point.filter(|p| p.1.is_finite()) {
                    Some((made_at, eta, source)) => {
                        let truly_left = actual_s - made_at;
                        let error_pct =
                            (truly_left > 0.0).then(|| (eta - truly_left) / truly_left * 100.0);
                        json!({"at_pct": pct, "made_at_s": made_at, "eta_s": eta,
                               "actual_remaining_s": truly_left, "source": source,
                               "error_pct": error_pct})
                    }
                    None => json!({"at_pct": pct, "made_at_s": null, "eta_s": null,
                                   "actual_remaining_s": left, "error_pct": null}),
                }
            })
            .collect();
        json!({"actual_s": actual_s, "checks": checks, "points": self.points.len()})
    }
}

/// QEMU bytes a zero page costs in its stream (8-byte header and the fill
/// byte), per byte of the page.
const ZERO_PAGE_COST: f64 = 9.0 / 4096.0;

/// Bytes QEMU must have written before a measured RAM-per-byte figure
/// counts.
const MEASURED_AFTER: u64 = 4 << 20;

/// A migration's rates from QEMU's counters: bytes QEMU wrote
/// (`transferred`) and guest RAM it got through (`normal` + `duplicate`
/// pages: a zero page costs it a few bytes), and the RAM-per-byte of what
/// is left ([`Self::ram_per_byte`]).
#[derive(Debug, Default)]
pub struct QemuRates {
    pub sent: RateWindow,
    pub ram: RateWindow,
    /// Where the zero pages lie ahead of the first pass (sampled by the
    /// driver while it runs; see [`crate::ramsample`]).
    pub layout: Option<RamSampler>,
    /// The counters (transferred, RAM bytes) as the second pass began.
    pass2: Option<(u64, u64)>,
    /// The counters now.
    now: (u64, u64),
    pass: u64,
    last_sample: Option<Instant>,
    /// When the first pass was first seen running.
    active_since: Option<Instant>,
}

impl QemuRates {
    /// Guest RAM bytes QEMU will get through per byte it writes for what
    /// is left: in the first pass, from the share of zero pages the layout
    /// sample finds ahead of the pass's position (else the pass's average
    /// so far); from the second pass on, what those passes averaged
    /// (dirtied pages: content, so 1 until measured). None until known.
    pub fn ram_per_byte(&self) -> Option<f64> {
        let (sent, ram) = self.now;
        if self.pass >= 2 {
            let (s0, r0) = self.pass2.unwrap_or(self.now);
            let (s, r) = (sent.saturating_sub(s0), ram.saturating_sub(r0));
            return Some(if s >= MEASURED_AFTER {
                (r as f64 / s as f64).max(1.0)
            } else {
                1.0
            });
        }
        if let Some(l) = &self.layout {
            let at = ram as f64 / l.region_bytes().max(1) as f64;
            if let Some(z) = l.zero_share_ahead(at) {
                return Some(1.0 / ((1.0 - z) + z * ZERO_PAGE_COST));
            }
        }
        (sent >= MEASURED_AFTER).then(|| (ram as f64 / sent as f64).max(1.0))
    }

    /// Whether to read more layout samples now: during the first pass, at
    /// most every 100 ms (the cutover gate polls every 5 ms).
    pub fn wants_samples(&mut self, v: &Value) -> bool {
        let due = self
            .last_sample
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        let first_pass = v
            .pointer("/ram/dirty-sync-count")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            <= 1;
        if due && first_pass && v["status"] == "active" {
            self.last_sample = Some(Instant::now());
            return true;
        }
        false
    }
}

/// QEMU's `query-migrate` answer as a report; `rate` keeps the recent
/// rates across calls.
pub fn from_query_migrate(v: &Value, rates: &mut QemuRates, at: Instant) -> Progress {
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64);
    let remaining = n("/ram/remaining");
    let page = n("/ram/page-size").unwrap_or(4096);
    if let Some(t) = n("/ram/transferred") {
        rates.sent.observe(at, t);
        rates.now.0 = t;
    }
    if let (Some(normal), Some(zero)) = (n("/ram/normal"), n("/ram/duplicate")) {
        rates.ram.observe(at, (normal + zero) * page);
        rates.now.1 = (normal + zero) * page;
    }
    rates.pass = n("/ram/dirty-sync-count").unwrap_or(1);
    if rates.pass >= 2 && rates.pass2.is_none() {
        rates.pass2 = Some(rates.now);
    }
    let status = v["status"].as_str().unwrap_or("");
    if status == "active" && rates.active_since.is_none() {
        rates.active_since = Some(at);
    }
    // Dirty pages per second times the page size. QEMU measures it at the
    // end of each pass (0 during the first): until then, what the RAM
    // sample saw rewritten since the pass began, and that over the time.
    let mut dirty = v
        .pointer("/ram/dirty-pages-rate")
        .and_then(Value::as_f64)
        .map(|p| p * page as f64);
    let mut backlog = None;
    let mut dirty_behind = None;
    if rates.pass <= 1 {
        let over = rates
            .active_since
            .map_or(0.0, |t| at.saturating_duration_since(t).as_secs_f64());
        if let Some(l) = &rates.layout {
            // What the guest rewrites anywhere is the dirty rate of the
            // later passes; what it rewrote behind the pass is the backlog,
            // and only that part of the rate adds to this pass.
            if let Some(b) = l.rewritten_bytes(over) {
                dirty = Some(b as f64 / over.max(1.0));
                let at = rates.now.1 as f64 / l.region_bytes().max(1) as f64;
                if let Some(behind) = l.rewritten_behind(at, over) {
                    backlog = Some(behind);
                    dirty_behind = Some(behind as f64 / over.max(1.0));
                }
            }
        }
    }
    let rate = &rates.sent;
    let rpb = rates.ram_per_byte();
    Progress {
        dirty_rate_bytes_s: dirty.filter(|_| status == "active"),
        ram_per_byte: rpb,
        backlog_bytes: backlog,
        dirty_behind_bytes_s: dirty_behind.filter(|_| status == "active"),
        remaining_bytes: remaining,
        total_bytes: n("/ram/total"),
        eta_s: remaining.filter(|_| status == "active").and_then(|r| {
            eta_s(
                r,
                backlog.unwrap_or(0),
                rate.rate(),
                (dirty, dirty_behind),
                rpb.unwrap_or(1.0),
            )
        }),
        expected_downtime_ms: n("/expected-downtime"),
        downtime_ms: (status == "completed").then(|| n("/downtime")).flatten(),
    }
}

/// Sends reports to the agent at most once a second, from a thread of its
/// own, so a slow agent never holds up the migration's polling loop (the
/// cutover gate polls every 5 ms). Errors are ignored: the agent's view is
/// a display, the migration does not depend on it.
#[derive(Debug)]
pub struct Reporter {
    tx: Option<SyncSender<Value>>,
    name: String,
    last: Option<Instant>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The agent's latest answer and when it came.
    view: Arc<Mutex<Option<(Instant, AgentView)>>>,
}

impl Reporter {
    pub fn new(agent: PathBuf, name: &str) -> Reporter {
        let (tx, rx) = sync_channel::<Value>(1);
        let view = Arc::new(Mutex::new(None));
        let seen = view.clone();
        let worker = std::thread::Builder::new()
            .name("dwcp-progress".into())
            .spawn(move || {
                for req in rx {
                    if let Ok(v) = dwcp_core::agent::control_call(&agent, &req) {
                        if let Ok(mut s) = seen.lock() {
                            *s = Some((Instant::now(), AgentView::of(&v)));
                        }
                    }
                }
            })
            .ok();
        Reporter {
            tx: Some(tx),
            name: name.to_string(),
            last: None,
            worker,
            view,
        }
    }

    /// The agent's latest answer, while fresh (3 s).
    pub fn agent_view(&self) -> Option<AgentView> {
        let v = self.view.lock().ok()?.clone()?;
        (v.0.elapsed() < VIEW_FRESH).then_some(v.1)
    }

    /// The ETA to show: the agent's (model) when it has one, else `own`.
    pub fn eta(&self, own: Option<f64>) -> (Option<f64>, String) {
        match self.agent_view() {
            Some(AgentView {
                eta_s: Some(e),
                eta_source,
                ..
            }) => (Some(e), eta_source.unwrap_or_else(|| "agent".into())),
            _ => (own, "driver".into()),
        }
    }

    /// Sends `p` if a second has passed since the last report.
    pub fn maybe_send(&mut self, p: &Progress) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        if let Some(tx) = &self.tx {
            match tx.try_send(p.request(&self.name)) {
                Ok(()) => self.last = Some(Instant::now()),
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    /// Sends the last report (the downtime) and waits up to 2 s for it.
    pub fn finish(mut self, p: &Progress) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(p.request(&self.name));
        }
        if let Some(w) = self.worker.take() {
            let end = Instant::now() + Duration::from_secs(2);
            while !w.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_accounts_for_the_dirty_rate_and_refuses_to_guess() {
        assert_eq!(eta_s(100, 0, Some(10.0), (None, None), 1.0), Some(10.0));
        assert_eq!(
            eta_s(100, 0, Some(30.0), (Some(10.0), None), 1.0),
            Some(5.0)
        );
        // Dirtying as fast as (or faster than) it sends: no ETA.
        assert_eq!(eta_s(100, 0, Some(10.0), (Some(10.0), None), 1.0), None);
        assert_eq!(eta_s(100, 0, Some(10.0), (Some(20.0), None), 1.0), None);
        assert_eq!(eta_s(100, 0, None, (Some(1.0), None), 1.0), None);
        assert_eq!(eta_s(100, 0, Some(0.0), (None, None), 1.0), None);
        // Half of what is left is zero pages (2 RAM bytes per byte): the
        // first pass crosses it twice as fast, and what the guest dirties
        // meanwhile (content) is resent at 1.
        assert_eq!(
            eta_s(100, 0, Some(30.0), (Some(10.0), None), 2.0),
            Some(2.5)
        );
        assert_eq!(
            eta_s(100, 0, Some(30.0), (Some(10.0), None), f64::NAN),
            Some(5.0)
        );
    }

    fn query(transferred: u64, normal: u64, zero: u64, pass: u64) -> Value {
        json!({"status": "active", "ram": {"transferred": transferred, "normal": normal,
               "duplicate": zero, "page-size": 4096, "remaining": 1u64 << 30,
               "dirty-sync-count": pass}})
    }

    #[test]
    fn zero_pages_make_more_ram_per_byte() {
        let t0 = Instant::now();
        let mut r = QemuRates::default();
        let p = from_query_migrate(&query(0, 0, 0, 1), &mut r, t0);
        assert_eq!(p.ram_per_byte, None);
        // 1 s: 2,000 pages written (8.2 MB), 6,000 zero pages passed;
        // no layout sample: the pass's average so far.
        let p = from_query_migrate(
            &query(8_192_000, 2000, 6000, 1),
            &mut r,
            t0 + Duration::from_secs(1),
        );
        assert!((p.ram_per_byte.unwrap() - 4.0).abs() < 1e-9, "{p:?}");
    }

    /// A sampler over a 1 GiB RAM region, without samples.
    fn sampler_1gib() -> RamSampler {
        RamSampler::new(
            "FlatView #0\n AS \"memory\", root: system\n  0000000000000000-000000003fffffff (prio 0, ram): pc.ram\n",
        )
    }

    #[test]
    fn the_first_pass_prices_what_lies_ahead_and_later_passes_as_content() {
        let t0 = Instant::now();
        let mut r = QemuRates::default();
        // A 1 GiB region: content in the lower half, zero pages above.
        let mut l = sampler_1gib();
        for i in 0..64u64 {
            l.record(i << 24, i >= 32);
        }
        r.layout = Some(l);
        // A quarter through (content so far: 1 RAM byte per byte), a
        // quarter of content and half of zeros ahead: 3 RAM bytes per byte
        // (zero pages cost a few bytes).
        let p = from_query_migrate(&query(1 << 28, 1 << 16, 0, 1), &mut r, t0);
        let rpb = p.ram_per_byte.unwrap();
        assert!((rpb - 3.0).abs() < 0.02, "{rpb}");
        // Half through: only zeros ahead.
        let p = from_query_migrate(
            &query(1 << 29, 1 << 17, 0, 1),
            &mut r,
            t0 + Duration::from_secs(1),
        );
        assert!(p.ram_per_byte.unwrap() > 400.0, "{p:?}");
        // The second pass resends dirtied pages: content, 1 until measured.
        let p = from_query_migrate(
            &query(1 << 29, 1 << 18, 1 << 17, 2),
            &mut r,
            t0 + Duration::from_secs(2),
        );
        assert_eq!(p.ram_per_byte, Some(1.0));
        let p = from_query_migrate(
            &query((1 << 29) + (8 << 20), (1 << 18) + 2048, (1 << 17) + 2048, 3),
            &mut r,
            t0 + Duration::from_secs(3),
        );
        assert!((p.ram_per_byte.unwrap() - 2.0).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn the_first_pass_reports_what_the_guest_rewrote_behind_it() {
        let t0 = Instant::now();
        let mut r = QemuRates::default();
        let mut l = sampler_1gib();
        // 256 content pages, 4 MiB apart, watched for 10 s, one in eight
        // rewritten: an eighth of the 1 GiB region over the 10 s the pass
        // has run.
        for i in 0..256u64 {
            l.record_watched(i << 22, false, 10.0, i % 8 == 0);
        }
        r.layout = Some(l);
        from_query_migrate(&query(0, 0, 0, 1), &mut r, t0);
        let p = from_query_migrate(
            &query(400 << 20, 100 << 8, 0, 1),
            &mut r,
            t0 + Duration::from_secs(10),
        );
        // The dirty rate is the whole region's: an eighth of 1 GiB in 10 s.
        let d = p.dirty_rate_bytes_s.unwrap();
        assert!((d - (128u64 << 20) as f64 / 10.0).abs() < 1.0, "{d}");
        // The backlog only what lies behind the pass (100 MiB of RAM
        // processed): 4 of the 25 samples there changed, 16 MiB.
        assert_eq!(p.backlog_bytes, Some(16 << 20));
        let db = p.dirty_behind_bytes_s.unwrap();
        assert!((db - (16u64 << 20) as f64 / 10.0).abs() < 1.0, "{db}");
        // the driver's own ETA has a rate to go by (40 MiB/s written)
        assert!(p.eta_s.is_some());
        // after the first pass: QEMU's own figures, no backlog
        let p = from_query_migrate(
            &query(500 << 20, 110 << 8, 0, 2),
            &mut r,
            t0 + Duration::from_secs(11),
        );
        assert_eq!(p.backlog_bytes, None);
    }

    #[test]
    fn eta_checks_compare_with_the_real_duration() {
        let mut log = EtaLog::default();
        // A 10 s migration: at 2 s the ETA said 9 s (really 8), at 5 s 4 s
        // (really 5), at 7.6 s nothing known.
        log.record(0.0, None, "model");
        log.record(2.0, Some(9.0), "model");
        log.record(2.2, Some(1.0), "model"); // within 0.5 s: ignored
        log.record(5.0, Some(4.0), "model");
        log.record(7.4, None, "model");
        let v = log.checks(10.0);
        let c = v["checks"].as_array().unwrap();
        assert_eq!(c[0]["at_pct"], 25);
        assert_eq!(c[0]["made_at_s"], 2.0);
        assert!((c[0]["error_pct"].as_f64().unwrap() - 12.5).abs() < 1e-9);
        assert_eq!(c[1]["made_at_s"], 5.0);
        assert!((c[1]["error_pct"].as_f64().unwrap() + 20.0).abs() < 1e-9);
        assert_eq!(c[2]["eta_s"], Value::Null, "unknown at 75 %");
        assert_eq!(v["actual_s"], 10.0);
    }

    #[test]
    fn the_rate_is_that_of_the_last_seconds() {
        let t0 = Instant::now();
        let mut w = RateWindow::default();
        w.observe(t0, 0);
        assert_eq!(w.rate(), None);
        // 1 MB/s for 10 s, then 4 MB/s.
        for i in 1..=10u64 {
            w.observe(t0 + Duration::from_secs(i), i * 1_000_000);
        }
        assert_eq!(w.rate(), Some(1e6));
        for i in 11..=14u64 {
            w.observe(
                t0 + Duration::from_secs(i),
                10_000_000 + (i - 10) * 4_000_000,
            );
        }
        assert_eq!(w.rate(), Some(4e6));
    }

    #[test]
    fn query_migrate_figures_become_a_report() {
        let t0 = Instant::now();
        let mut w = QemuRates::default();
        let q = |transferred: u64, status: &str| {
            json!({"status": status, "expected-downtime": 120, "downtime": 45,
                   "ram": {"transferred": transferred, "remaining": 90_000_000u64,
                           "total": 512u64 << 20, "dirty-pages-rate": 1000.0, "page-size": 4096}})
        };
        let p = from_query_migrate(&q(0, "active"), &mut w, t0);
        assert_eq!(p.eta_s, None, "no rate yet");
        assert_eq!(p.remaining_bytes, Some(90_000_000));
        assert_eq!(p.expected_downtime_ms, Some(120));
        assert_eq!(p.downtime_ms, None);
        let p = from_query_migrate(
            &q(20_096_000, "active"),
            &mut w,
            t0 + Duration::from_secs(2),
        );
        // 10.048 MB/s sent, 4.096 MB/s dirtied: 90 MB / 5.952 MB/s.
        let eta = p.eta_s.unwrap();
        assert!((eta - 90_000_000.0 / 5_952_000.0).abs() < 1e-6, "{eta}");
        let p = from_query_migrate(
            &q(30_000_000, "completed"),
            &mut w,
            t0 + Duration::from_secs(3),
        );
        assert_eq!((p.eta_s, p.downtime_ms), (None, Some(45)));
    }
}
