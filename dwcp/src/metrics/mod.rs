//! The agent's metrics endpoint and live dashboard (`dwcp agent
//! --metrics-listen ADDR`, `[metrics] listen`): `/metrics` (Prometheus),
//! `/dashboard` (a page polling `/api/migrations` every second) and
//! `/api/migrations` (JSON).
//!
//! It lives in the `dwcp` binary, not in `dwcp-core`: it needs only the
//! agent's public API ([`Agent::sessions`], [`Agent::on_session_end`]) and the
//! [`ClusterOps`] trait, and the engine stays free of HTTP and of the
//! prometheus-client crate.
//!
//! Nothing here touches the data path. Everything a session counts is read at
//! scrape time through [`dwcp_core::transport::Session::stats`] (the same
//! snapshot `dwcp stats` reads); counters and histograms of ended migrations
//! are updated once per session, when it ends. The agent-wide byte counters
//! are the totals of ended sessions plus the current counts of the sessions
//! not yet ended, so they only grow.
//!
//! Names follow Prometheus conventions (base units, `_total` counters); see
//! docs/metrics.md for the list and the seed's names mapped to ours.

pub mod cluster;
pub mod exposition;
pub mod http;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dwcp_core::agent::{Agent, ClusterOps, MigrationProgress};
use dwcp_core::transport::{Role, SessionState, SessionStats};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use self::cluster::RaftMetrics;

/// Label sets are plain (name, value) lists.
pub type Labels = Vec<(String, String)>;

/// A float gauge.
pub type FGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// How many ended migrations `/api/migrations` lists.
const KEEP_HISTORY: usize = 20;

/// Buckets of the guest's downtime, seconds (10 ms .. 30 s).
fn downtime_buckets() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
    ])
}

/// Buckets of the migration total time, seconds (0.5 s .. ~68 min).
fn duration_buckets() -> Histogram {
    Histogram::new([
        0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0,
    ])
}

pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Initiator => "source",
        Role::Responder => "destination",
    }
}

/// What ended sessions left: the agent-wide totals and the recent history.
#[derive(Debug, Default)]
struct Ended {
    qemu_sent: u64,
    qemu_received: u64,
    wire_sent: u64,
    wire_received: u64,
    /// Ids of the sessions already in the totals above.
    accounted: HashSet<String>,
    /// Ended migrations, newest last.
    history: VecDeque<Value>,
}

/// The metrics of one agent.
pub struct Metrics {
    agent: Agent,
    started: SystemTime,
    ended: Mutex<Ended>,
    /// `dwcp_migrations_total{role,outcome}`.
    migrations: Family<Labels, Counter>,
    /// `dwcp_migration_duration_seconds{role,outcome}`.
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// `dwcp_migration_downtime_seconds`: QEMU's downtime of each completed
    /// migration whose driver reported it (source side).
    downtime: Histogram,
    raft: Option<Arc<RaftMetrics>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A session's outcome label: `completed` or `failed`.
fn outcome(s: &SessionStats) -> &'static str {
    match s.state {
        SessionState::Completed => "completed",
        _ => "failed",
    }
}

impl Metrics {
    /// Metrics of `agent`; `raft` when it is a cluster member (its
    /// [`ClusterOps`] wrapped by [`cluster::timed`]).
    pub fn attach(agent: &Agent, raft: Option<Arc<RaftMetrics>>) -> Arc<Metrics> {
        let m = Arc::new(Metrics {
            agent: agent.clone(),
            started: SystemTime::now(),
            ended: Mutex::new(Ended::default()),
            migrations: Family::default(),
            duration: Family::new_with_constructor(duration_buckets as fn() -> Histogram),
            downtime: downtime_buckets(),
            raft,
        });
        let weak = Arc::downgrade(&m);
        agent.on_session_end(Arc::new(move |s: &SessionStats| {
            if let Some(m) = weak.upgrade() {
                m.session_ended(s);
            }
        }));
        let weak = Arc::downgrade(&m);
        agent.on_downtime(Arc::new(move |p: &MigrationProgress| {
            if let Some(m) = weak.upgrade() {
                m.downtime_reported(p);
            }
        }));
        m
    }

    /// Once per session, when its driver first reports the downtime (that
    /// may be before or after the session ended).
    fn downtime_reported(&self, p: &MigrationProgress) {
        let Some(ms) = p.downtime_ms else { return };
        self.downtime.observe(ms as f64 / 1000.0);
        let mut e = self.ended.lock();
        if let Some(h) = e.history.iter_mut().find(|h| h["session"] == p.session) {
            h["downtime_ms"] = json!(ms);
        }
    }

    /// Once per session, with its final figures.
    fn session_ended(&self, s: &SessionStats) {
        let mut e = self.ended.lock();
        if !e.accounted.insert(s.session.clone()) {
            return;
        }
        e.qemu_sent += s.raw_out;
        e.qemu_received += s.raw_in;
        e.wire_sent += s.wire_out;
        e.wire_received += s.wire_in;
        let l = labels(&[("role", role_name(s.role)), ("outcome", outcome(s))]);
        self.migrations.get_or_create(&l).inc();
        self.duration.get_or_create(&l).observe(s.elapsed_s);
        if e.history.len() >= KEEP_HISTORY {
            e.history.pop_front();
        }
        let mut v = session_json(s, self.agent.progress(&s.session).as_ref());
        v["ended_at"] = json!(unix_now());
        e.history.push_back(v);
    }

    /// A registry holding every metric, filled now.
    pub fn registry(&self) -> Registry {
        let mut reg = Registry::default();
        let sessions: Vec<SessionStats> = self.agent.sessions().iter().map(|s| s.stats()).collect();

        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))]))
            .set(1);
        reg.register(
            "dwcp_build_info",
            "Always 1; the agent's version as a label",
            build,
        );
        let start = FGauge::default();
        start.set(
            self.started
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        reg.register(
            "dwcp_agent_start_time_seconds",
            "When the agent started, Unix time",
            start,
        );
        let routes = Gauge::<i64>::default();
        routes.set(self.agent.route_count() as i64);
        reg.register(
            "dwcp_routes",
            "Routes the agent serves (source side)",
            routes,
        );
        if let Some((copies, pages)) = self.agent.kept_usage() {
            let c = Gauge::<i64>::default();
            c.set(copies as i64);
            reg.register(
                "dwcp_kept_copies",
                "Guests whose pages the agent keeps for a re-migration to this host (--keep-mb, --keep-s)",
                c,
            );
            let b = Gauge::<i64>::default();
            b.set((pages * 4096) as i64);
            reg.register(
                "dwcp_kept_bytes",
                "Bytes of guest pages kept for re-migration (on disk, in --spill-dir)",
                b,
            );
        }

        // Ended migrations: kept since the start.
        for role in ["source", "destination"] {
            for o in ["completed", "failed"] {
                // Every series exists from the start (at 0), so that
                // increase() sees the first migration.
                let l = labels(&[("role", role), ("outcome", o)]);
                let _ = self.migrations.get_or_create(&l);
                let _ = self.duration.get_or_create(&l);
            }
        }
        reg.register(
            "dwcp_migrations",
            "Migrations (sessions) relayed that ended, by role and outcome",
            self.migrations.clone(),
        );
        reg.register(
            "dwcp_migration_duration_seconds",
            "Total time of each ended migration (session start to end)",
            self.duration.clone(),
        );
        reg.register(
            "dwcp_migration_downtime_seconds",
            "Guest downtime of each completed migration, QEMU's figure as its driver (dwcp migrate, dwcp virsh-migrate) reported it to the source agent",
            self.downtime.clone(),
        );

        // Byte counters: ended sessions' totals plus the running ones' counts.
        let (mut qs, mut qr, mut ws, mut wr);
        {
            let mut e = self.ended.lock();
            (qs, qr, ws, wr) = (e.qemu_sent, e.qemu_received, e.wire_sent, e.wire_received);
            for s in &sessions {
                if !e.accounted.contains(&s.session) {
                    qs += s.raw_out;
                    qr += s.raw_in;
                    ws += s.wire_out;
                    wr += s.wire_in;
                }
            }
            let present: HashSet<&str> = sessions.iter().map(|s| s.session.as_str()).collect();
            e.accounted.retain(|id| present.contains(id.as_str()));
        }
        let qemu = Family::<Labels, Counter>::default();
        qemu.get_or_create(&labels(&[("direction", "sent")]))
            .inc_by(qs);
        qemu.get_or_create(&labels(&[("direction", "received")]))
            .inc_by(qr);
        reg.register(
            "dwcp_qemu_bytes",
            "Migration stream bytes read from QEMU and sent (sent), or received and written to QEMU (received)",
            qemu,
        );
        let wire = Family::<Labels, Counter>::default();
        wire.get_or_create(&labels(&[("direction", "sent")]))
            .inc_by(ws);
        wire.get_or_create(&labels(&[("direction", "received")]))
            .inc_by(wr);
        reg.register(
            "dwcp_wire_bytes",
            "Bytes on the TCP streams, frame headers included",
            wire,
        );

        self.register_running(&mut reg, &sessions);
        if let Some(r) = &self.raft {
            r.register(&mut reg);
        }
        reg
    }

    /// Per-migration gauges of the sessions still running.
    fn register_running(&self, reg: &mut Registry, sessions: &[SessionStats]) {
        let in_progress = Family::<Labels, Gauge>::default();
        for role in ["source", "destination"] {
            let _ = in_progress.get_or_create(&labels(&[("role", role)]));
        }
        let elapsed = Family::<Labels, FGauge>::default();
        let ratio = Family::<Labels, FGauge>::default();
        let delivery = Family::<Labels, Gauge>::default();
        let qemu_rate = Family::<Labels, Gauge>::default();
        let inflight = Family::<Labels, Gauge>::default();
        let streams = Family::<Labels, Gauge>::default();
        let qemu_bytes = Family::<Labels, Gauge>::default();
        let tier = Family::<Labels, Gauge>::default();
        let context = Family::<Labels, Gauge>::default();
        let rtt = Family::<Labels, FGauge>::default();
        let retrans = Family::<Labels, Counter>::default();
        let eta = Family::<Labels, FGauge>::default();
        let remaining = Family::<Labels, Gauge>::default();
        let expected_downtime = Family::<Labels, FGauge>::default();
        let link_rtt = Family::<Labels, FGauge>::default();
        let link_capacity = Family::<Labels, FGauge>::default();
        let link_floor = Family::<Labels, FGauge>::default();
        let link_loss = Family::<Labels, FGauge>::default();
        let link_wire = Family::<Labels, FGauge>::default();
        let codec_cpu = Family::<Labels, FGauge>::default();
        let mode = Family::<Labels, Gauge>::default();
        let mode_switches = Family::<Labels, Gauge>::default();
        let rate_estimate = Family::<Labels, FGauge>::default();
        for s in sessions.iter().filter(|s| s.state == SessionState::Running) {
            let role = role_name(s.role);
            in_progress.get_or_create(&labels(&[("role", role)])).inc();
            let l = labels(&[("migration", &s.name), ("role", role)]);
            elapsed.get_or_create(&l).set(s.elapsed_s);
            ratio.get_or_create(&l).set(s.ratio_out);
            delivery.get_or_create(&l).set(s.delivery_rate as i64);
            qemu_rate.get_or_create(&l).set(s.raw_rate as i64);
            inflight.get_or_create(&l).set(s.inflight_bytes as i64);
            streams.get_or_create(&l).set(s.streams as i64);
            qemu_bytes.get_or_create(&l).set(match s.role {
                Role::Initiator => s.raw_out as i64,
                Role::Responder => s.raw_in as i64,
            });
            if s.role == Role::Initiator {
                let mut tl = l.clone();
                tl.push(("tier".into(), s.tier.to_string()));
                tier.get_or_create(&tl).set(1);
                context.get_or_create(&l).set(i64::from(s.context_on));
            }
            // What the driver reported, while it is current: no ETA rather
            // than a stale one.
            if let Some(p) = self
                .agent
                .progress(&s.session)
                .filter(MigrationProgress::is_fresh)
            {
                if let Some(v) = p.eta_s {
                    eta.get_or_create(&l).set(v);
                }
                if let Some(v) = p.remaining_bytes {
                    remaining.get_or_create(&l).set(v as i64);
                }
                if let Some(v) = p.expected_downtime_ms {
                    expected_downtime.get_or_create(&l).set(v as f64 / 1000.0);
                }
            }
            // The adaptive layer: the newest link sample, the mode.
            if let Some(k) = &s.adapt.link {
                if let Some(r) = k.rtt_us {
                    link_rtt.get_or_create(&l).set(r as f64 / 1e6);
                }
                if let Some(c) = k.capacity_bytes_s {
                    link_capacity.get_or_create(&l).set(c);
                }
                link_floor.get_or_create(&l).set(k.rate_floor_bytes_s);
                if let Some(x) = k.loss {
                    link_loss.get_or_create(&l).set(x);
                }
                link_wire.get_or_create(&l).set(k.wire_rate_bytes_s);
                codec_cpu.get_or_create(&l).set(k.codec_cpu);
            }
            if let Some(m) = s.adapt.mode.mode {
                let mut ml = l.clone();
                ml.push(("mode".into(), m.to_string()));
                mode.get_or_create(&ml).set(1);
            }
            mode_switches
                .get_or_create(&l)
                .set(s.adapt.mode.switches as i64);
            if let Some(e) = &s.adapt.estimate {
                rate_estimate.get_or_create(&l).set(e.wire_rate_bytes_s);
            }
            for p in &s.per_stream {
                let Some(t) = &p.tcp else { continue };
                let mut sl = l.clone();
                sl.push(("stream".into(), p.index.to_string()));
                rtt.get_or_create(&sl).set(t.rtt_us as f64 / 1e6);
                retrans.get_or_create(&sl).inc_by(t.total_retrans as u64);
            }
        }
        reg.register(
            "dwcp_migrations_in_progress",
            "Migrations (sessions) running now",
            in_progress,
        );
        reg.register(
            "dwcp_migration_elapsed_seconds",
            "Time since a running migration's session started",
            elapsed,
        );
        reg.register(
            "dwcp_migration_qemu_bytes",
            "Bytes of a running migration's QEMU stream moved so far (sent on the source, written on the destination)",
            qemu_bytes,
        );
        reg.register(
            "dwcp_migration_compression_ratio",
            "QEMU bytes sent per wire byte sent of a running migration (source side; 0 before the first frame)",
            ratio,
        );
        reg.register(
            "dwcp_migration_delivery_rate_bytes_per_second",
            "Wire bytes per second the peer delivered (highest 100 ms sample of the last second)",
            delivery,
        );
        reg.register(
            "dwcp_migration_qemu_rate_bytes_per_second",
            "QEMU bytes per second delivered, average of the last second",
            qemu_rate,
        );
        reg.register(
            "dwcp_migration_inflight_bytes",
            "Bytes sent that the peer has not yet delivered to its QEMU (plus reads not yet encoded)",
            inflight,
        );
        reg.register(
            "dwcp_migration_streams",
            "TCP streams of a running migration",
            streams,
        );
        reg.register(
            "dwcp_migration_eta_seconds",
            "Seconds until a running migration completes: RAM left over the measured wire rate times the compression ratio, net of the guest's dirty rate (source side; computed by the agent from the driver's report, or the driver's own extrapolation; absent when unknown or not converging)",
            eta,
        );
        reg.register(
            "dwcp_migration_remaining_bytes",
            "Guest RAM bytes QEMU has still to send (source side, reported by the driver)",
            remaining,
        );
        reg.register(
            "dwcp_migration_expected_downtime_seconds",
            "QEMU's expected downtime were it to switch over now (source side, reported by the driver)",
            expected_downtime,
        );
        reg.register(
            "dwcp_migration_codec_tier",
            "1 for the codec tier a running migration encodes with now (source side)",
            tier,
        );
        reg.register(
            "dwcp_migration_codec_context",
            "1 while a running migration compresses its zstd frames with context across frames (source side)",
            context,
        );
        reg.register(
            "dwcp_migration_link_rtt_seconds",
            "Lowest smoothed RTT among a running migration's streams, newest link sample",
            link_rtt,
        );
        reg.register(
            "dwcp_migration_link_capacity_bytes_per_second",
            "Wire bytes per second the path delivers, measured while a stream was limited by its congestion window (absent otherwise)",
            link_capacity,
        );
        reg.register(
            "dwcp_migration_link_rate_floor_bytes_per_second",
            "Wire bytes per second the path carried at least, newest link sample",
            link_floor,
        );
        reg.register(
            "dwcp_migration_link_loss_ratio",
            "Segments lost (retransmitted minus DSACK-reported duplicates) per segment sent, newest link sample (absent below 1,000 segments sent)",
            link_loss,
        );
        reg.register(
            "dwcp_migration_link_wire_rate_bytes_per_second",
            "Wire bytes per second sent (source) or received (destination), newest link sample",
            link_wire,
        );
        reg.register(
            "dwcp_migration_codec_cpu_cores",
            "Cores the codec workers spent compressing, newest link sample",
            codec_cpu,
        );
        reg.register(
            "dwcp_migration_link_mode",
            "1 for the link mode (datacenter, hybrid, internet) a running migration detected",
            mode,
        );
        reg.register(
            "dwcp_migration_link_mode_switches",
            "Link mode switches of a running migration after its first mode",
            mode_switches,
        );
        reg.register(
            "dwcp_migration_rate_estimate_bytes_per_second",
            "Wire rate the ETA is computed from (moving average of the delivered rate)",
            rate_estimate,
        );
        reg.register(
            "dwcp_stream_rtt_seconds",
            "Smoothed round-trip time of each TCP stream (kernel TCP_INFO)",
            rtt,
        );
        reg.register(
            "dwcp_stream_retransmits",
            "Segments each TCP stream retransmitted (kernel TCP_INFO)",
            retrans,
        );
    }

    /// The Prometheus text exposition (format 0.0.4), what promtool and
    /// scrapers without OpenMetrics read.
    pub fn text(&self) -> String {
        exposition::to_prometheus_text(&self.openmetrics())
    }

    /// The OpenMetrics exposition.
    pub fn openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry())
            .expect("writing to a String");
        out
    }

    /// `/api/migrations`: running migrations and the recent history.
    pub fn migrations_json(&self) -> Value {
        let running: Vec<Value> = self
            .agent
            .sessions()
            .iter()
            .map(|s| s.stats())
            .filter(|s| s.state == SessionState::Running)
            .map(|s| session_json(&s, self.agent.progress(&s.session).as_ref()))
            .collect();
        let e = self.ended.lock();
        let history: Vec<Value> = e.history.iter().rev().cloned().collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "now": unix_now(),
            "running": running,
            "history": history,
        })
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One migration as `/api/migrations` shows it, with what its driver
/// reported (`remaining_bytes`, `total_bytes`, `eta_s`,
/// `expected_downtime_ms` while current; `downtime_ms`).
pub fn session_json(s: &SessionStats, p: Option<&MigrationProgress>) -> Value {
    let moved = match s.role {
        Role::Initiator => s.raw_out,
        Role::Responder => s.raw_in,
    };
    let codec = match s.role {
        Role::Initiator => s.tier.to_string(),
        Role::Responder => s.codecs_in.dominant().unwrap_or("-").to_string(),
    };
    let rtt_ms: Vec<Value> = s
        .per_stream
        .iter()
        .map(|p| {
            p.tcp
                .as_ref()
                .map(|t| json!((t.rtt_us as f64 / 1000.0 * 100.0).round() / 100.0))
                .unwrap_or(Value::Null)
        })
        .collect();
    let retrans: u64 = s
        .per_stream
        .iter()
        .filter_map(|p| p.tcp.as_ref().map(|t| t.total_retrans as u64))
        .sum();
    let fresh = p.filter(|p| p.is_fresh());
    json!({
        "name": s.name,
        "session": s.session,
        "role": role_name(s.role),
        "state": s.state,
        "error": s.error,
        "elapsed_s": s.elapsed_s,
        "qemu_bytes": moved,
        "wire_bytes": s.wire_out.max(s.wire_in),
        "qemu_rate": s.raw_rate,
        "delivery_rate": s.delivery_rate,
        "ratio": s.ratio_out,
        "codec": codec,
        "streams": s.streams,
        "rtt_ms": rtt_ms,
        "retransmits": retrans,
        "inflight_bytes": s.inflight_bytes,
        "remaining_bytes": fresh.and_then(|p| p.remaining_bytes),
        "total_bytes": p.and_then(|p| p.total_bytes),
        "eta_s": fresh.and_then(|p| p.eta_s),
        "eta_source": fresh.and_then(|p| p.eta_s.and(p.eta_source)),
        "expected_downtime_ms": fresh.and_then(|p| p.expected_downtime_ms),
        "downtime_ms": p.and_then(|p| p.downtime_ms),
        "mode": s.adapt.mode.mode,
        "mode_switches": s.adapt.mode.switches,
    })
}

/// Starts the endpoint's thread on `addr`; returns the bound address.
pub fn serve(
    addr: std::net::SocketAddr,
    agent: &Agent,
    raft: Option<Arc<RaftMetrics>>,
) -> anyhow::Result<std::net::SocketAddr> {
    let m = Metrics::attach(agent, raft);
    http::serve(addr, m)
}

/// With the endpoint on (`enabled`), wraps the agent's cluster membership so
/// that raft proposals are timed; returns what the agent should use and the
/// raft metrics it feeds.
pub fn wrap_cluster(
    enabled: bool,
    c: Option<Arc<dyn ClusterOps>>,
) -> (Option<Arc<dyn ClusterOps>>, Option<Arc<RaftMetrics>>) {
    match c {
        Some(c) if enabled => {
            let (c, m) = cluster::timed(c);
            (Some(c), Some(m))
        }
        c => (c, None),
    }
}

#[cfg(test)]
mod tests;
