//! `dwcp migrate`: drives a plain QEMU migration through the local agent.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use dwcp_core::agent::control_call;
use dwcp_core::qemu::{self, MigrationSetup, Qmp};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::failure::{classified, classify, FailKind};
use crate::progress::{self, EtaLog, QemuRates, Reporter};
use crate::TransportArgs;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// QMP socket of the source QEMU.
    #[arg(long)]
    qmp: PathBuf,
    /// Destination agent's data port, HOST:PORT.
    #[arg(long)]
    to: String,
    /// Migration name: the destination QEMU must listen on <incoming-dir>/NAME.sock.
    #[arg(long, default_value = "vm")]
    name: String,
    /// Control socket of the local (source) agent.
    #[arg(long, default_value = "/run/dwcp/agent.sock")]
    agent: PathBuf,
    /// QMP socket of the destination QEMU, if reachable: capabilities are set
    /// there too (multifd and return-path need both sides).
    #[arg(long)]
    dst_qmp: Option<PathBuf>,
    /// Use QEMU multifd with this many channels (each relayed as its own channel).
    #[arg(long)]
    multifd: Option<u32>,
    /// Enable QEMU's return path (carried back through the same streams).
    #[arg(long)]
    return_path: bool,
    /// Enable QEMU's auto-converge: QEMU throttles a guest that dirties
    /// memory faster than the migration sends it (the tuning loop warns
    /// early when that is the case; QEMU cannot switch it on mid-way).
    #[arg(long)]
    auto_converge: bool,
    /// QEMU max-bandwidth in MiB/s (default: QEMU's; the tuning loop lifts
    /// QEMU's default cap when the link can carry more).
    #[arg(long)]
    max_bandwidth_mb: Option<u64>,
    /// Downtime to aim at, ms, as the destination sees it: once a second
    /// QEMU's downtime-limit is set to this minus what the relay still holds
    /// and the path's RTT, and its switchover bandwidth to the rate DWCP
    /// delivers (see docs/protocol.md, "Switchover").
    #[arg(long, default_value_t = 300)]
    downtime_goal_ms: u64,
    /// Fixed QEMU downtime-limit in ms instead (turns the tuning above off).
    #[arg(long)]
    downtime_limit_ms: Option<u64>,
    /// Give up (and cancel) after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Print the result as JSON on stdout (the global --json).
    #[arg(skip)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Cutover gate: record the migration in the agents' raft cluster before any
    /// byte moves, and switch over (QEMU `pause-before-switchover`) only once the
    /// ownership transfer is committed; otherwise cancel, the guest stays here.
    #[arg(long, requires = "dst_node")]
    gate: bool,
    /// The guest's UUID in the cluster registry (default: derived from --name,
    /// see docs/consensus.md).
    #[arg(long)]
    guest_uuid: Option<String>,
    /// Source host's node id (default: the local agent's).
    #[arg(long)]
    src_node: Option<u64>,
    /// Destination host's node id (with --gate).
    #[arg(long)]
    dst_node: Option<u64>,
    /// Longest the gate waits for the commit, ms.
    #[arg(long, default_value_t = 5000)]
    gate_timeout_ms: u64,
    #[command(flatten)]
    transport: TransportArgs,
}

pub fn run(a: MigrateArgs) -> Result<()> {
    let cfg = a.transport.config()?;
    let gate = if a.gate {
        let guest = a
            .guest_uuid
            .clone()
            .unwrap_or_else(|| crate::cluster::uuid_from_name(&a.name).to_string());
        let mut g = crate::cluster::Gate::begin(
            &a.agent,
            &guest,
            a.src_node,
            a.dst_node.unwrap_or_default(),
        )?;
        g.commit_timeout = Duration::from_millis(a.gate_timeout_ms);
        Some(g)
    } else {
        None
    };
    let r = run_inner(&a, &cfg, gate.as_ref());
    if let (Err(_), Some(g)) = (&r, &gate) {
        // QEMU failed or was cancelled, so the guest runs on the source
        // again: abort the intent, or revert the transfer if the commit
        // had gone through. The agent retries until the cluster can.
        if let Some(e) = g.settle() {
            eprintln!(
                "dwcp: warning: could not hand the abort of guest {} epoch {} to the agent: {e}",
                g.guest, g.epoch
            );
        }
    }
    r
}

fn run_inner(
    a: &MigrateArgs,
    cfg: &dwcp_core::transport::TransportConfig,
    gate: Option<&crate::cluster::Gate>,
) -> Result<()> {
    // Every transport option the route request carries, from the same table
    // the flags came from.
    let mut req = json!({"op": "route", "name": a.name, "to": a.to});
    for o in dwcp_core::transport::options::OPTIONS {
        let v = o.show(cfg);
        if let (Some(key), false) = (o.control, v.is_empty()) {
            req[key] = Value::String(v);
        }
    }
    let route = control_call(&a.agent, &req).context("setting up the route on the local agent")?;
    let socket = route["socket"].as_str().unwrap_or_default().to_string();
    let setup = MigrationSetup {
        multifd_channels: a.multifd,
        multifd_compression: None,
        xbzrle: false,
        return_path: a.return_path,
        auto_converge: a.auto_converge,
        max_bandwidth: a.max_bandwidth_mb.map(|m| m << 20),
        downtime_limit_ms: a.downtime_limit_ms,
        tls_dir: None,
    };
    if let Some(d) = &a.dst_qmp {
        let mut dq = Qmp::connect(d).context("destination QMP")?;
        setup
            .apply(&mut dq, true)
            .context("setting migration capabilities on the destination")?;
    }
    let mut q = Qmp::connect(&a.qmp).context("source QMP")?;
    setup
        .apply(&mut q, false)
        .context("setting migration capabilities on the source")?;

    let bar = if a.quiet || a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("valid template"),
    );
    let t0 = Instant::now();
    let mut tuner = a.downtime_limit_ms.is_none().then(|| {
        qemu::SwitchoverTuner::new(a.downtime_goal_ms).with_max_bandwidth(
            a.max_bandwidth_mb
                .is_none()
                .then_some(qemu::QEMU_DEFAULT_MAX_BANDWIDTH),
        )
    });
    let agent = a.agent.clone();
    let name = a.name.clone();
    let mut reporter = Reporter::new(a.agent.clone(), &a.name);
    let mut rate = QemuRates::default();
    let mut etas = EtaLog::default();
    // Once a second: what the ETA was made of (in the JSON result).
    let mut eta_trace: Vec<Value> = Vec::new();
    let mut progress = |v: &Value, q: &mut Qmp| {
        // While the first pass runs, a few pages of guest RAM at a time:
        // where its zero pages lie ahead of the pass (crate::ramsample).
        if rate.wants_samples(v) {
            rate.layout
                .get_or_insert_with(|| crate::ramsample::RamSampler::start(q))
                .step(q);
        }
        let report = progress::from_query_migrate(v, &mut rate, Instant::now());
        reporter.maybe_send(&report);
        // The agent's ETA (measured rate, ratio, dirty rate) when it has
        // one, else the extrapolated one; noted for the error afterwards.
        let (eta_s, source) = reporter.eta(report.eta_s);
        if v["status"] == "active" {
            let at = t0.elapsed().as_secs_f64();
            etas.record(at, eta_s, &source);
            if eta_trace
                .last()
                .and_then(|p| p["t"].as_f64())
                .is_none_or(|t| at - t >= 1.0)
            {
                eta_trace.push(json!({
                    "t": (at * 10.0).round() / 10.0,
                    "remaining_mib": report.remaining_bytes.map(|r| r >> 20),
                    "ram_per_byte": report.ram_per_byte.map(|r| (r * 100.0).round() / 100.0),
                    "dirty_mb_s": report.dirty_rate_bytes_s.map(|d| (d / 1e5).round() / 10.0),
                    "layout_samples": rate.layout.as_ref().map(|l| l.samples()),
                    "backlog_mib": report.backlog_bytes.map(|b| b >> 20),
                    "eta_s": eta_s.map(|e| (e * 10.0).round() / 10.0),
                    "source": source,
                }));
            }
        }
        let mode = reporter
            .agent_view()
            .and_then(|a| a.mode)
            .map(|m| format!(" mode {m}"))
            .unwrap_or_default();
        let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        let (total, remaining, mbps) = (
            n("/ram/total"),
            n("/ram/remaining"),
            v.pointer("/ram/mbps")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
        );
        if total > 0 {
            bar.set_length(total);
            bar.set_position(total.saturating_sub(remaining));
        }
        let eta = match eta_s {
            Some(s) => format!("{s:.1} s ({source})"),
            None => "?".into(),
        };
        bar.set_message(format!(
            "{} pass {} remaining {:.1} MiB at {:.0} Mbit/s ETA {}{mode}",
            v["status"].as_str().unwrap_or("?"),
            n("/ram/dirty-sync-count"),
            remaining as f64 / 1048576.0,
            mbps,
            eta
        ));
        bar.tick();
        let t = tuner.as_mut()?;
        let view = reporter.agent_view().unwrap_or_default();
        let inputs = qemu::TuneInputs {
            predicted_wire: view.predicted_wire,
            ratio: view.ratio,
            dirty_rate: report.dirty_rate_bytes_s,
            ram_per_byte: report.ram_per_byte,
            remaining: report.remaining_bytes,
        };
        t.due()
            .then(|| dwcp_core::agent::newest_session(&agent, &name))
            .flatten()
            .and_then(|s| t.decide(&s, &inputs))
    };
    let uri = format!("unix:{socket}");
    let timeout = Duration::from_secs(a.timeout);
    let (result, gate_ms) = match gate {
        None => (
            qemu::migrate(&mut q, &uri, timeout, &mut progress)
                .map_err(|e| anyhow::Error::from(e).context("QEMU migration")),
            None,
        ),
        Some(g) => {
            match crate::cluster::gated_migrate(&mut q, &uri, timeout, &mut progress, || g.commit())
            {
                Ok((r, ms)) => (Ok(r), Some(ms)),
                Err(e) => (Err(e.context("QEMU migration")), None),
            }
        }
    };
    let migrated_s = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let tuning = tuner
        .as_ref()
        .map(|t| json!({"decisions": t.decisions, "not_converging": t.not_converging}));
    if let Ok(r) = &result {
        // The downtime, for the agent's metrics and dashboard.
        reporter.finish(&progress::Progress {
            remaining_bytes: Some(0),
            total_bytes: Some(r.ram_total),
            downtime_ms: Some(r.downtime_ms),
            ..Default::default()
        });
    }
    let session = dwcp_core::agent::settled_session(&a.agent, &a.name, Duration::from_secs(5));
    let r = result.map_err(|e| migration_error(e, &a.agent, &a.name))?;
    // The route was this migration's: it goes with it (each route holds a
    // listening socket and a thread in the agent; a host that migrates
    // guest after guest would otherwise pile them up). A failed
    // migration's route stays, with its last error in `dwcp stats`, until
    // a retry replaces it.
    let _ = control_call(&a.agent, &json!({"op": "unroute", "name": a.name}));
    let wall = t0.elapsed();
    let wire = session
        .as_ref()
        .and_then(|s| s["wire_out"].as_u64())
        .unwrap_or(0);
    let raw = session
        .as_ref()
        .and_then(|s| s["raw_out"].as_u64())
        .unwrap_or(0);
    let mut eta = etas.checks(migrated_s);
    eta["trace"] = json!(eta_trace);
    let out = json!({
        "name": a.name, "status": r.status, "total_time_ms": r.total_time_ms, "downtime_ms": r.downtime_ms,
        "setup_time_ms": r.setup_time_ms, "ram_transferred": r.ram_transferred, "ram_total": r.ram_total,
        "dirty_sync_count": r.dirty_sync_count, "wall_ms": wall.as_millis() as u64,
        "qemu_bytes": raw, "wire_bytes": wire,
        "ratio": if wire > 0 { raw as f64 / wire as f64 } else { 0.0 },
        "streams": cfg.streams, "codec": cfg.codec_name(), "multifd": a.multifd,
        "session": session,
        "gate_ms": gate_ms,
        // The link mode the source's session ended in, and its switches
        // (each with its figures: session.adapt.mode.history).
        "mode": session.as_ref().map(|s| s["adapt"]["mode"]["mode"].clone()),
        "mode_switches": session.as_ref().map(|s| s["adapt"]["mode"]["switches"].clone()),
        // The ETA shown at 25/50/75 % of the migration against the time
        // it really took from then (QEMU's migrate to completion).
        "eta": eta,
        // The closed-loop tuning: decisions taken, and the first verdict
        // that the migration could not converge (with its numbers).
        "tuning": tuning,
        "gate": gate.map(|g| json!({"guest": g.guest, "epoch": g.epoch, "src": g.src, "dst": g.dst})),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "migration {}: total {:.2} s, downtime {} ms, QEMU sent {:.1} MiB, on the wire {:.1} MiB (ratio {:.2}), {} dirty syncs, {} streams, codec {}, link mode {}",
            r.status,
            r.total_time_ms as f64 / 1000.0,
            r.downtime_ms,
            raw as f64 / 1048576.0,
            wire as f64 / 1048576.0,
            if wire > 0 { raw as f64 / wire as f64 } else { 0.0 },
            r.dirty_sync_count,
            cfg.streams,
            cfg.codec_name(),
            out["mode"].as_str().unwrap_or("?")
        );
        if let (Some(ms), Some(g)) = (gate_ms, gate) {
            println!(
                "cutover gate: guest {} now owned by host {} (epoch {}), the gate added {ms} ms",
                g.guest, g.dst, g.epoch
            );
        }
    }
    Ok(())
}

/// The class of a failed migration: refused by the cluster (the cutover
/// gate's commit), refused by the destination (the route's record of why
/// QEMU's connection could not be relayed), else a failed migration.
pub fn migration_error(e: anyhow::Error, agent: &std::path::Path, name: &str) -> anyhow::Error {
    if classify(&e) == FailKind::ClusterRefused {
        return e;
    }
    failed_migration(e, peer_refusal(agent, name))
}

/// [`migration_error`] with the destination's refusal already looked up.
pub fn failed_migration(e: anyhow::Error, refusal: Option<String>) -> anyhow::Error {
    if classify(&e) == FailKind::ClusterRefused {
        return e;
    }
    match refusal {
        Some(why) => classified(
            FailKind::PeerRefused,
            e.context(format!("the destination refused the migration: {why}")),
        ),
        None => classified(FailKind::MigrationFailed, e),
    }
}

/// Why the local agent could not relay the route's last connection, when
/// the destination refused it (`stats`: the route's `last_error`).
pub fn peer_refusal(agent: &std::path::Path, name: &str) -> Option<String> {
    let v = control_call(agent, &serde_json::json!({"op": "stats"})).ok()?;
    let route = v["routes"].as_array()?.iter().find(|r| r["name"] == name)?;
    let last = &route["last_error"];
    (last["refused_by_peer"] == true).then(|| last["error"].as_str().unwrap_or("?").to_string())
}
