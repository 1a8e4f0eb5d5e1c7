//! `dwcp load-test`: many synthetic guests migrating at once through two
//! real agents on the lab's two hosts (network namespaces, link emulator),
//! without QEMU. Each guest is a [`stream::Guest`] that writes QEMU's precopy
//! stream into its route socket on the source agent as QEMU would; a sink
//! listening on the destination agent's incoming socket reads what the
//! destination delivers and checks it is the stream sent, byte for byte
//! (length and xxh3). Every migration is set up as `dwcp migrate` and a
//! destination operator would: `expect` on the destination, `route` on the
//! source, the incoming socket listening before the first byte.
//!
//! `dwcp load-test --vms N --duration D --ramp-up R`: N guest slots, started
//! evenly over R, each migrating back to back until D is over (the fleet
//! evacuates continuously, N migrations in flight). `dwcp load-test stress
//! --target-throughput RATE`: doubles the guests migrating at once every
//! `--step` until the aggregate rate reaches RATE, stops growing, or
//! migrations fail. Both write an HTML report with figures and its JSON.

mod report;
pub mod stream;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use dwcp_core::agent::control_call_within;
use dwcp_lab::Lab;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;

use crate::bench::{cpu_seconds, Progress};
use stream::{Guest, GuestSpec, PageMix};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LoadTestArgs {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Synthetic guests migrating at once (each migrates back to back).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=4096))]
    vms: u32,
    /// How long migrations keep starting (30s, 5m, 1h); those running at
    /// the end finish and count.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Start the guests evenly over this time (0 = all at once).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ramp_up: Duration,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Double the guests migrating at once every --step until the aggregate
    /// rate reaches --target-throughput, stops growing, or migrations fail.
    Stress(StressArgs),
}

#[derive(Args, Debug)]
struct StressArgs {
    /// The aggregate rate to reach (guest bytes delivered): 50Gbps, 800mbit, 2G.
    #[arg(long, value_parser = parse_rate)]
    target_throughput: u64,
    /// Longest the whole ramp may take (30s, 10m).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Time at each level of concurrency.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    step: Duration,
    /// Most guests migrating at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_vms: u32,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Debug, Clone)]
struct CommonArgs {
    /// The HTML report; its JSON is written beside it (FILE.json).
    #[arg(long, default_value = "load-test.html")]
    report: PathBuf,
    /// RAM of each synthetic guest (16MiB, 64M, 1GiB; a bare number is MiB).
    #[arg(long, default_value = "32MiB", value_parser = stream::parse_guest_size)]
    vm_size: u64,
    /// Kinds of page in each guest, percent: zero (ZERO records), dup (the
    /// same few pages in every guest), text (compressible), random.
    #[arg(long, default_value_t = PageMix::default())]
    page_mix: PageMix,
    /// What each guest rewrites while it migrates (1MiB/s, 256K/s, 0).
    #[arg(long, default_value = "1MiB/s", value_parser = stream::parse_byte_rate)]
    dirty_rate: u64,
    /// Precopy passes before the final stop-and-copy is forced.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_passes: u32,
    /// The final pass starts once the dirty pages would go in this long.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    downtime_limit: Duration,
    /// Link between the hosts: dc (bridge), wan, internet, lossy (emulator).
    #[arg(long, default_value = "wan")]
    profile: String,
    /// TCP streams per migration (route request).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    streams: u16,
    /// A transport option for every route request, KEY=VALUE (repeatable;
    /// the fields of `dwcp agent`'s control `route`), e.g.
    /// connect_timeout=60s: hundreds of set-ups at once queue at the
    /// destination, so a fleet evacuation wants a longer wait than the
    /// default 10s.
    #[arg(long = "route-option", value_parser = parse_route_option)]
    route_options: Vec<(String, String)>,
    /// Codec per migration (route request): auto, raw, none, lz4, zstd:N.
    #[arg(long, default_value = "auto")]
    codec: String,
    /// Both agents' --max-sessions [default: the guests at once, 16 at
    /// least, 1024 at most]; give the agent's default (16) to see its
    /// refusals.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_sessions: Option<u16>,
    /// Both agents' --session-memory [default: the agent's, 256 MiB].
    #[arg(long)]
    session_memory: Option<String>,
    /// Another argument for both agents (repeatable), e.g. --agent-arg=--workers=1.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// A migration that has not finished after this long fails.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    dwcp_core::transport::options::parse_duration(s, Duration::ZERO, Duration::from_secs(7 * 86400))
        .ok_or_else(|| format!("{s:?}: use a duration such as 30s, 500ms, 5m or 1h"))
}

fn parse_route_option(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: not KEY=VALUE (e.g. connect_timeout=60s)"))?;
    let known = dwcp_core::transport::options::OPTIONS
        .iter()
        .filter_map(|o| o.control)
        .collect::<Vec<_>>();
    if !known.contains(&k) {
        return Err(format!(
            "{k:?} is not a route option; one of: {}",
            known.join(", ")
        ));
    }
    if ["streams", "codec"].contains(&k) {
        return Err(format!("{k}: use --{k}"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_rate(s: &str) -> Result<u64, String> {
    linkem::config::parse_rate(s).map_err(|e| format!("{e} (e.g. 50Gbps, 800mbit)"))
}

/// One migration of a synthetic guest.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationRecord {
    pub vm: u32,
    /// The guest's migrations so far (0 = its first).
    pub seq: u32,
    /// Seconds since the test started.
    pub start_s: f64,
    pub secs: f64,
    pub ok: bool,
    /// Stream bytes sent (QEMU's side).
    pub bytes: u64,
    /// Bytes the destination delivered and the sink verified.
    pub verified_bytes: u64,
    pub passes: u32,
    pub pages_sent: u64,
    pub final_bytes: u64,
    pub final_ms: u64,
    /// Set-up: the `expect` and `route` requests to the agents, answered.
    pub setup_ms: u64,
    pub error: Option<String>,
}

/// The state of the run, sampled once a second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub t_s: f64,
    /// Guests allowed to migrate (the ramp).
    pub active: usize,
    pub in_flight: usize,
    pub completed: u64,
    pub failed: u64,
    /// Guest bytes delivered by the destination in the last interval, MB/s.
    pub delivered_mb_s: f64,
    pub src: AgentSample,
    pub dst: AgentSample,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentSample {
    /// utime + stime over the interval, percent of one core.
    pub cpu_pct: f64,
    pub rss_mib: f64,
    pub threads: u64,
    pub fds: u64,
}

/// Agent process figures from /proc: CPU seconds, RSS and peak, threads, fds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcFigures {
    pub cpu_s: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub threads: u64,
    pub fds: u64,
}

impl ProcFigures {
    fn of(pid: u32) -> ProcFigures {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ProcFigures {
            cpu_s: cpu_seconds(pid),
            rss_mib: field("VmRSS:") as f64 / 1024.0,
            hwm_mib: field("VmHWM:") as f64 / 1024.0,
            threads: field("Threads:"),
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.count() as u64)
                .unwrap_or(0),
        }
    }
}

/// One level of the stress ramp.
#[derive(Debug, Clone, Serialize)]
pub struct StressStep {
    pub vms: usize,
    pub secs: f64,
    /// Guest bytes delivered per second over the step's last two thirds.
    pub delivered_mb_s: f64,
    pub delivered_gbit_s: f64,
    pub completed: u64,
    pub failed: u64,
    pub src_cpu_pct: f64,
    pub dst_cpu_pct: f64,
}

/// Everything a run measured: the JSON beside the report.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub command: String,
    pub dwcp_version: String,
    pub started_unix_s: u64,
    pub machine: crate::bench::Machine,
    pub mode: String,
    pub settings: serde_json::Value,
    pub agent_args: Vec<String>,
    pub summary: Summary,
    pub failures_by_reason: Vec<(String, u64)>,
    pub agents: AgentsSummary,
    pub stress: Vec<StressStep>,
    pub stress_verdict: Option<String>,
    pub timeline: Vec<Sample>,
    pub migrations: Vec<MigrationRecord>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub migrations: u64,
    pub completed: u64,
    pub failed: u64,
    pub verified_bytes: u64,
    pub wall_s: f64,
    pub mean_delivered_mb_s: f64,
    pub peak_delivered_mb_s: f64,
    pub most_in_flight: usize,
    pub secs_p50: f64,
    pub secs_p90: f64,
    pub secs_p99: f64,
    pub secs_max: f64,
    pub passes_mean: f64,
    pub final_ms_p50: f64,
    pub final_ms_p99: f64,
    /// Set-up of the completed migrations (expect + route answered), ms.
    pub setup_ms_p50: f64,
    pub setup_ms_p99: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentsSummary {
    pub src_idle: ProcFigures,
    pub dst_idle: ProcFigures,
    pub src_end: ProcFigures,
    pub dst_end: ProcFigures,
    pub src_peak_rss_mib: f64,
    pub dst_peak_rss_mib: f64,
    pub src_peak_threads: u64,
    pub dst_peak_threads: u64,
    pub src_cpu_s: f64,
    pub dst_cpu_s: f64,
    /// CPU of the load test process (the guests' streams, the sinks, and
    /// the link emulator's forwarder threads), which shares the machine
    /// with the agents.
    pub generator_cpu_s: f64,
    /// /proc/loadavg at the start and at the end: the machine's other load.
    pub loadavg_start: String,
    pub loadavg_end: String,
}

/// What the slots, the sampler and the controller share.
struct Shared {
    src_ctl: PathBuf,
    dst_ctl: PathBuf,
    dst_addr: String,
    incoming_dir: PathBuf,
    spec: GuestSpec,
    streams: u16,
    codec: String,
    route_options: Vec<(String, String)>,
    timeout: Duration,
    t0: Instant,
    /// Slots below this may migrate.
    active: AtomicUsize,
    stop: AtomicBool,
    delivered: AtomicU64,
    in_flight: AtomicUsize,
    completed: AtomicU64,
    failed: AtomicU64,
    records: Mutex<Vec<MigrationRecord>>,
    /// Failure reasons seen so far (numbers elided), each printed once.
    reasons: Mutex<std::collections::HashSet<String>>,
}

pub fn run(a: LoadTestArgs) -> Result<()> {
    let cmdline: Vec<String> = std::env::args()
        .enumerate()
        .map(|(i, a)| if i == 0 { "dwcp".into() } else { a })
        .collect();
    let (common, most) = match &a.mode {
        Some(Mode::Stress(s)) => (s.common.clone(), s.max_vms as usize),
        None => (a.common.clone(), a.vms as usize),
    };
    let c = &common;
    if !c.codec.eq_ignore_ascii_case("auto") {
        c.codec
            .parse::<dwcp_core::codec::Tier>()
            .map_err(|e| crate::usage(format!("--codec {:?}: {e}, or auto", c.codec)))?;
    }
    let profile: dwcp_lab::Profile = c
        .profile
        .parse()
        .map_err(|e| crate::usage(format!("--profile: {e}")))?;
    let max_sessions = c.max_sessions.unwrap_or(most.clamp(16, 1024) as u16);
    let mut agent_args: Vec<String> = vec!["--max-sessions".into(), max_sessions.to_string()];
    if let Some(m) = &c.session_memory {
        agent_args.extend(["--session-memory".into(), m.clone()]);
    }
    agent_args.extend(c.agent_args.iter().cloned());
    let refs: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    eprintln!(
        "load test: creating two hosts ({profile} link) with agents {}",
        agent_args.join(" ")
    );
    let lab = Lab::new("lt", profile.middle(), &refs)
        .context("setting up the two hosts and agents (the load test runs as root)")?;
    let pids = (lab.src_agent().child.id(), lab.dst_agent().child.id());
    let shared = Arc::new(Shared {
        src_ctl: lab.src_agent().control(),
        dst_ctl: lab.dst_agent().control(),
        dst_addr: lab.dst_addr(),
        incoming_dir: lab.dst_agent().run_dir.join("incoming"),
        spec: GuestSpec {
            pages: c.vm_size / stream::PAGE as u64,
            mix: c.page_mix,
            dirty_rate: c.dirty_rate,
            downtime_limit: c.downtime_limit,
            max_passes: c.max_passes,
        },
        streams: c.streams,
        codec: c.codec.clone(),
        route_options: c.route_options.clone(),
        timeout: c.timeout,
        t0: Instant::now(),
        active: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        delivered: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        records: Mutex::new(Vec::new()),
        reasons: Mutex::new(Default::default()),
    });
    std::fs::create_dir_all(&shared.incoming_dir)?;
    let idle = (ProcFigures::of(pids.0), ProcFigures::of(pids.1));
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let machine_start = (loadavg(), cpu_seconds(std::process::id()));
    let timeline = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampler = {
        let (sh, tl) = (shared.clone(), timeline.clone());
        std::thread::spawn(move || sample_loop(&sh, pids, &tl))
    };
    let slots: Vec<_> = (0..most)
        .map(|i| {
            let sh = shared.clone();
            std::thread::Builder::new()
                .name(format!("lt-vm{i}"))
                .stack_size(512 << 10)
                .spawn(move || slot(&sh, i))
                .expect("spawn")
        })
        .collect();
    let (mode, settings_extra, stress, verdict) = match &a.mode {
        None => {
            drive_ramp(&shared, most, a.ramp_up, a.duration, &timeline);
            (
                "load".to_string(),
                json!({"vms": a.vms, "duration_s": a.duration.as_secs_f64(),
                       "ramp_up_s": a.ramp_up.as_secs_f64()}),
                Vec::new(),
                None,
            )
        }
        Some(Mode::Stress(s)) => {
            let (steps, verdict) = drive_stress(&shared, s, pids, &timeline);
            (
                "stress".to_string(),
                json!({"target_throughput_bit_s": s.target_throughput, "max_vms": s.max_vms,
                       "duration_s": s.duration.as_secs_f64(), "step_s": s.step.as_secs_f64()}),
                steps,
                Some(verdict),
            )
        }
    };
    shared.stop.store(true, Ordering::Release);
    // Slots finish the migration in hand (bounded by --timeout).
    let p = Progress::new(most as u64, c.timeout.as_secs());
    let mut done = 0;
    loop {
        let left = shared.in_flight.load(Ordering::Acquire);
        let finished = slots.iter().filter(|h| h.is_finished()).count();
        while done < finished {
            p.inc();
            done += 1;
        }
        if finished == slots.len() {
            break;
        }
        p.set_message(format!("draining: {left} migration(s) finishing"));
        std::thread::sleep(Duration::from_secs(2));
    }
    p.finish();
    for h in slots {
        let _ = h.join();
    }
    // Let the agents end their sessions and free their memory.
    std::thread::sleep(Duration::from_secs(3));
    let end = (ProcFigures::of(pids.0), ProcFigures::of(pids.1));
    let machine_end = (loadavg(), cpu_seconds(std::process::id()));
    shared.active.store(0, Ordering::Release);
    let _ = sampler.join();
    let timeline = std::mem::take(&mut *timeline.lock());
    let migrations = std::mem::take(&mut *shared.records.lock());
    let mut settings = json!({
        "vm_size_mib": c.vm_size >> 20, "page_mix": c.page_mix.to_string(),
        "dirty_rate_bytes_s": c.dirty_rate, "max_passes": c.max_passes,
        "downtime_limit_ms": c.downtime_limit.as_millis() as u64,
        "profile": c.profile, "streams": c.streams, "codec": c.codec,
        "max_sessions": max_sessions,
        "session_memory": c.session_memory.clone().unwrap_or_else(|| "256MiB (agent default)".into()),
        "timeout_s": c.timeout.as_secs_f64(),
        "route_options": c.route_options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
    });
    if let (Some(o), Some(e)) = (settings.as_object_mut(), settings_extra.as_object()) {
        o.extend(e.clone());
    }
    let mut r = report::assemble(
        cmdline.join(" "),
        mode,
        settings,
        agent_args,
        idle,
        end,
        timeline,
        migrations,
        stress,
        verdict,
        shared.t0.elapsed().as_secs_f64(),
    );
    r.agents.generator_cpu_s = machine_end.1 - machine_start.1;
    r.agents.loadavg_start = machine_start.0;
    r.agents.loadavg_end = machine_end.0;
    let json_path = c.report.with_extension("json");
    if let Some(d) = c.report.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&r)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&c.report, report::html(&r))
        .with_context(|| format!("writing {}", c.report.display()))?;
    print!("{}", report::text(&r));
    println!(
        "report: {}  json: {}",
        c.report.display(),
        json_path.display()
    );
    drop(lab);
    if r.summary.failed > 0 {
        anyhow::bail!(
            "{} of {} migrations failed (reasons in the report)",
            r.summary.failed,
            r.summary.migrations
        );
    }
    if r.summary.completed == 0 {
        anyhow::bail!("no migration completed");
    }
    Ok(())
}

/// `--vms N --ramp-up R --duration D`: slots start evenly over R, then all
/// N migrate until D.
fn drive_ramp(sh: &Shared, n: usize, ramp: Duration, dur: Duration, tl: &Mutex<Vec<Sample>>) {
    let p = Progress::new(dur.as_secs().max(1), dur.as_secs());
    let mut last_msg = Instant::now() - Duration::from_secs(60);
    let mut shown = 0u64;
    loop {
        let t = sh.t0.elapsed();
        if t >= dur {
            break;
        }
        let want = if ramp.is_zero() || t >= ramp {
            n
        } else {
            ((n as f64 * t.as_secs_f64() / ramp.as_secs_f64()).ceil() as usize).clamp(1, n)
        };
        sh.active.store(want, Ordering::Release);
        let secs = t.as_secs();
        while shown < secs.min(dur.as_secs()) {
            p.inc();
            shown += 1;
        }
        if last_msg.elapsed() >= Duration::from_secs(5) {
            last_msg = Instant::now();
            p.set_message(status_line(sh, tl));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    p.finish();
}

fn status_line(sh: &Shared, tl: &Mutex<Vec<Sample>>) -> String {
    let last = tl.lock().last().cloned().unwrap_or_default();
    format!(
        "{} guests, {} migrating, {} done, {} failed, {:.0} MB/s; agents: src {:.0}% CPU {:.0} MiB, dst {:.0}% CPU {:.0} MiB",
        sh.active.load(Ordering::Relaxed),
        sh.in_flight.load(Ordering::Relaxed),
        sh.completed.load(Ordering::Relaxed),
        sh.failed.load(Ordering::Relaxed),
        last.delivered_mb_s,
        last.src.cpu_pct,
        last.src.rss_mib,
        last.dst.cpu_pct,
        last.dst.rss_mib
    )
}

/// The stress ramp: 1, 2, 4 ... guests at once, one `--step` each.
fn drive_stress(
    sh: &Shared,
    s: &StressArgs,
    pids: (u32, u32),
    tl: &Mutex<Vec<Sample>>,
) -> (Vec<StressStep>, String) {
    let target_mb_s = s.target_throughput as f64 / 8e6;
    let levels = {
        let mut v = vec![];
        let mut k = 1usize;
        while k < s.max_vms as usize {
            v.push(k);
            k *= 2;
        }
        v.push(s.max_vms as usize);
        v
    };
    let p = Progress::new(levels.len() as u64, levels.len() as u64 * s.step.as_secs());
    let mut steps: Vec<StressStep> = Vec::new();
    let mut flat = 0;
    let verdict = loop {
        let Some(&vms) = levels.get(steps.len()) else {
            break format!(
                "stopped at --max-vms {}: {:.0} MB/s of the {:.0} MB/s target",
                s.max_vms,
                steps.last().map(|x| x.delivered_mb_s).unwrap_or(0.0),
                target_mb_s
            );
        };
        if sh.t0.elapsed() + s.step > s.duration {
            break format!(
                "stopped by --duration before {vms} guests: best {:.0} MB/s of the {:.0} MB/s target",
                best(&steps),
                target_mb_s
            );
        }
        sh.active.store(vms, Ordering::Release);
        p.set_message(format!("{vms} guest(s) at once; {}", status_line(sh, tl)));
        let t0 = Instant::now();
        let (c0, f0) = (
            sh.completed.load(Ordering::Acquire),
            sh.failed.load(Ordering::Acquire),
        );
        std::thread::sleep(s.step / 3);
        let (b1, t1) = (sh.delivered.load(Ordering::Acquire), Instant::now());
        let cpu1 = (cpu_seconds(pids.0), cpu_seconds(pids.1));
        std::thread::sleep(s.step - s.step / 3);
        let secs = t1.elapsed().as_secs_f64();
        let mb_s = (sh.delivered.load(Ordering::Acquire) - b1) as f64 / secs / 1e6;
        let step = StressStep {
            vms,
            secs: t0.elapsed().as_secs_f64(),
            delivered_mb_s: mb_s,
            delivered_gbit_s: mb_s * 8.0 / 1000.0,
            completed: sh.completed.load(Ordering::Acquire) - c0,
            failed: sh.failed.load(Ordering::Acquire) - f0,
            src_cpu_pct: (cpu_seconds(pids.0) - cpu1.0) / secs * 100.0,
            dst_cpu_pct: (cpu_seconds(pids.1) - cpu1.1) / secs * 100.0,
        };
        p.inc();
        p.println(format!(
            "{:>5} guests: {:>8.1} MB/s ({:.2} Gbit/s), {} done, {} failed, agents {:.0}% / {:.0}% CPU",
            step.vms,
            step.delivered_mb_s,
            step.delivered_gbit_s,
            step.completed,
            step.failed,
            step.src_cpu_pct,
            step.dst_cpu_pct
        ));
        let prev_best = best(&steps);
        steps.push(step.clone());
        if step.failed > 0 {
            break format!(
                "{} migration(s) failed at {vms} guests at once (reasons below); best {:.0} MB/s",
                step.failed,
                best(&steps)
            );
        }
        if mb_s >= target_mb_s {
            break format!(
                "reached the target: {:.0} MB/s ({:.2} Gbit/s) with {vms} guests at once",
                mb_s,
                mb_s * 8.0 / 1000.0
            );
        }
        flat = if mb_s < prev_best * 1.05 { flat + 1 } else { 0 };
        if flat >= 2 {
            break format!(
                "saturated: {:.0} MB/s ({:.2} Gbit/s) at best, {:.0} % of the {:.0} MB/s target; \
                 two doublings of the guests at once added under 5 % each",
                best(&steps),
                best(&steps) * 8.0 / 1000.0,
                best(&steps) / target_mb_s * 100.0,
                target_mb_s
            );
        }
    };
    p.finish();
    (steps, verdict)
}

fn best(steps: &[StressStep]) -> f64 {
    steps.iter().map(|s| s.delivered_mb_s).fold(0.0, f64::max)
}

fn sample_loop(sh: &Shared, pids: (u32, u32), tl: &Mutex<Vec<Sample>>) {
    let mut prev = (
        Instant::now(),
        sh.delivered.load(Ordering::Acquire),
        cpu_seconds(pids.0),
        cpu_seconds(pids.1),
    );
    // Until the run has ended and the slots are gone (active reset to 0
    // after stop).
    while !(sh.stop.load(Ordering::Acquire) && sh.active.load(Ordering::Acquire) == 0) {
        std::thread::sleep(Duration::from_secs(1));
        let now = Instant::now();
        let dt = (now - prev.0).as_secs_f64();
        let bytes = sh.delivered.load(Ordering::Acquire);
        let (s, d) = (ProcFigures::of(pids.0), ProcFigures::of(pids.1));
        let agent = |f: &ProcFigures, cpu0: f64| AgentSample {
            cpu_pct: (f.cpu_s - cpu0) / dt * 100.0,
            rss_mib: f.rss_mib,
            threads: f.threads,
            fds: f.fds,
        };
        tl.lock().push(Sample {
            t_s: sh.t0.elapsed().as_secs_f64(),
            active: sh.active.load(Ordering::Acquire),
            in_flight: sh.in_flight.load(Ordering::Acquire),
            completed: sh.completed.load(Ordering::Acquire),
            failed: sh.failed.load(Ordering::Acquire),
            delivered_mb_s: (bytes - prev.1) as f64 / dt / 1e6,
            src: agent(&s, prev.2),
            dst: agent(&d, prev.3),
        });
        prev = (now, bytes, s.cpu_s, d.cpu_s);
    }
}

/// A guest slot: waits for the ramp to reach it, then migrates its guest
/// back to back until the run stops.
fn slot(sh: &Arc<Shared>, i: usize) {
    let mut guest = Guest::new(0x5eed_0000 + i as u64, sh.spec.clone());
    while sh.active.load(Ordering::Acquire) <= i {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        // Coarse: a thousand slots waiting for the ramp must not keep the
        // generator's CPU busy waking up.
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut seq = 0u32;
    while !sh.stop.load(Ordering::Acquire) {
        sh.in_flight.fetch_add(1, Ordering::AcqRel);
        let rec = migrate_one(sh, i as u32, seq, &mut guest);
        sh.in_flight.fetch_sub(1, Ordering::AcqRel);
        if rec.ok {
            sh.completed.fetch_add(1, Ordering::AcqRel);
        } else {
            sh.failed.fetch_add(1, Ordering::AcqRel);
            let why = rec.error.clone().unwrap_or_default();
            if sh.reasons.lock().insert(report::reason_class(&why)) {
                eprintln!(
                    "load test: migration lt{i} #{seq} failed after {:.1} s: {why}",
                    rec.secs
                );
            }
            // A refused or failed migration is retried after a pause, as
            // an orchestrator would, not in a tight loop.
            std::thread::sleep(Duration::from_secs(5));
        }
        sh.records.lock().push(rec);
        seq += 1;
    }
}

/// One migration: incoming socket, expect, route, stream, verify.
fn migrate_one(sh: &Arc<Shared>, vm: u32, seq: u32, guest: &mut Guest) -> MigrationRecord {
    let name = format!("lt{vm}");
    let t0 = Instant::now();
    let started_unix = unix_now();
    let mut rec = MigrationRecord {
        vm,
        seq,
        start_s: sh.t0.elapsed().as_secs_f64(),
        secs: 0.0,
        ok: false,
        bytes: 0,
        verified_bytes: 0,
        passes: 0,
        pages_sent: 0,
        final_bytes: 0,
        final_ms: 0,
        setup_ms: 0,
        error: None,
    };
    let r = (|| -> Result<()> {
        // The destination "QEMU": listening on the agent's incoming socket.
        let incoming = sh.incoming_dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&incoming);
        let listener = UnixListener::bind(&incoming)
            .with_context(|| format!("binding {}", incoming.display()))?;
        listener.set_nonblocking(true)?;
        let deadline = t0 + sh.timeout;
        let cancel = Arc::new(AtomicBool::new(false));
        let sink = {
            let (sh, cancel) = (sh.clone(), cancel.clone());
            std::thread::Builder::new()
                .stack_size(512 << 10)
                .spawn(move || sink(listener, deadline, &sh.delivered, &cancel))
                .context("starting the sink")?
        };
        let sink_guard = SinkGuard(Some(sink), cancel);
        // The agents' answers are waited for as long as the migration may
        // take (--timeout): set-up time is measured, not failed at 30 s.
        let ctl = |path: &std::path::Path, req: &serde_json::Value| {
            control_call_within(path, req, sh.timeout).map_err(|e| e.message)
        };
        ctl(
            &sh.dst_ctl,
            &json!({"op": "expect", "name": name, "ttl_s": sh.timeout.as_secs().max(1)}),
        )
        .map_err(|e| anyhow!("expect on the destination agent: {e}"))?;
        let mut req = json!({"op": "route", "name": name, "to": sh.dst_addr,
                             "streams": sh.streams, "codec": sh.codec});
        for (k, v) in &sh.route_options {
            req[k.as_str()] = json!(v);
        }
        let route =
            ctl(&sh.src_ctl, &req).map_err(|e| anyhow!("route on the source agent: {e}"))?;
        rec.setup_ms = t0.elapsed().as_millis() as u64;
        let socket = route["socket"]
            .as_str()
            .ok_or_else(|| anyhow!("route answer without a socket: {route}"))?
            .to_string();
        let mut conn = UnixStream::connect(&socket)
            .with_context(|| format!("connecting to the route socket {socket}"))?;
        conn.set_write_timeout(Some(sh.timeout))?;
        let sent = guest
            .migrate(&mut conn)
            .map_err(|e| anyhow!("writing the stream: {e:#}"));
        let sent = match sent {
            Ok(s) => s,
            Err(e) => return Err(why_failed(sh, &name, started_unix, e)),
        };
        rec.bytes = sent.bytes;
        rec.passes = sent.passes;
        rec.pages_sent = sent.pages_sent;
        rec.final_bytes = sent.final_bytes;
        rec.final_ms = sent.final_ms;
        let _ = conn.shutdown(std::net::Shutdown::Write);
        // The source's end of the channel closes once the session is done
        // (the destination read the stream and closed its side).
        conn.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1)),
        ))?;
        let mut back = Vec::new();
        let closed = std::io::Read::read_to_end(&mut conn, &mut back);
        let got = sink_guard
            .join()
            .map_err(|e| why_failed(sh, &name, started_unix, anyhow!("destination side: {e}")))?;
        rec.verified_bytes = got.0;
        stream::verify(&sent, got)?;
        if let Err(e) = closed {
            return Err(why_failed(
                sh,
                &name,
                started_unix,
                anyhow!("the source's channel did not close after the stream: {e}"),
            ));
        }
        Ok(())
    })();
    rec.secs = t0.elapsed().as_secs_f64();
    match r {
        Ok(()) => rec.ok = true,
        Err(e) => rec.error = Some(format!("{e:#}")),
    }
    rec
}

/// The sink thread's handle: joined for its result, or left to end by its
/// own deadline when the migration failed before.
struct SinkGuard(
    Option<std::thread::JoinHandle<Result<(u64, u64), String>>>,
    Arc<AtomicBool>,
);

impl SinkGuard {
    fn join(mut self) -> Result<(u64, u64), String> {
        self.0
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| "the sink panicked".to_string())?
    }
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        // Detached: it stops waiting for a connection now, and one it
        // has ends when the agent fails the session.
        self.1.store(true, Ordering::Release);
        self.0.take();
    }
}

/// The destination "QEMU": accepts the agent's connection, reads the stream
/// to its end (hashing it), then closes, as `qemu -incoming` does.
fn sink(
    l: UnixListener,
    deadline: Instant,
    delivered: &AtomicU64,
    cancel: &AtomicBool,
) -> Result<(u64, u64), String> {
    // Polled with a backoff (10 ms doubling to 200 ms): with a thousand
    // sinks waiting through a slow set-up, fixed 20-ms polls were 50,000
    // wake-ups a second of the generator's own CPU.
    let mut pause = Duration::from_millis(10);
    let mut c = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline || cancel.load(Ordering::Acquire) {
                    return Err("the destination agent never connected".into());
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    drop(l);
    c.set_nonblocking(false).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1)),
    ))
    .map_err(|e| e.to_string())?;
    let r = stream::read_hashed(&mut c, |k| {
        delivered.fetch_add(k, Ordering::AcqRel);
    });
    r.map_err(|e| format!("reading what the destination agent delivered: {e}"))
}

/// Adds the source agent's reason (the route's last error, else the
/// session's error) to a failure seen at the socket. The route records its
/// error just after it drops QEMU's connection, hence the short wait; one
/// `stats` per failure, so failures do not load the control socket.
fn why_failed(sh: &Shared, name: &str, started_unix: f64, e: anyhow::Error) -> anyhow::Error {
    std::thread::sleep(Duration::from_millis(300));
    let Ok(v) = dwcp_core::agent::control_request(&sh.src_ctl, &json!({"op": "stats"})) else {
        return e;
    };
    let route_err = v["routes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .filter(|r| r["last_error"]["at"].as_f64().unwrap_or(0.0) >= started_unix - 0.5)
        .and_then(|r| r["last_error"]["error"].as_str().map(str::to_string));
    let session_err = v["sessions"]
        .as_array()
        .and_then(|ss| ss.iter().rev().find(|s| s["name"] == name))
        .and_then(|s| s["error"].as_str().map(str::to_string));
    match route_err.or(session_err) {
        Some(why) => e.context(format!("source agent: {why}")),
        None => e,
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(super::percentile(&v, 0.5), 50.0);
        assert_eq!(super::percentile(&v, 0.99), 99.0);
        assert_eq!(super::percentile(&v, 1.0), 100.0);
        assert_eq!(super::percentile(&[], 0.5), 0.0);
    }
}
