//! `dwcp benchmark compare`: the same guest over the same emulated link,
//! migrated by QEMU's own channels and by DWCP, runs interleaved.
//!
//! Over 800 lines on purpose: one file holds the whole run of one contender
//! (set-up, QEMU capabilities per contender, the migration, verification,
//! the sample of figures), so a reader can follow a run top to bottom.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use dwcp_core::agent::control_request;
use dwcp_core::qemu::{self, MigrationSetup};
use dwcp_lab::{
    boot_pair, scratch_dir, verify_keeping, Guest, GuestPair, GuestSpec, Lab, MigrationSpec,
};
use serde_json::{json, Value};

use super::schema::{
    CompareSuite, ContenderSummary, ConvergeLimit, ConvergeRun, ConvergeSuite, Cpu, GuestInfo,
    Outcome, PageCounts, RunResult, Sample, Stat,
};
use super::{OutputArgs, Progress};

pub const DEFAULT_CONTENDERS: &str =
    "qemu-tcp,qemu-multifd-zstd,qemu-xbzrle,dwcp,dwcp-none,dwcp-lz4,dwcp-zstd";

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Compare two earlier results instead of running: the baseline
    /// results.json (with --current).
    #[arg(long, value_name = "A.json")]
    pub baseline: Option<PathBuf>,
    /// The current results.json, compared with --baseline.
    #[arg(long, value_name = "B.json")]
    pub current: Option<PathBuf>,
    /// Link profile: dc (unshaped), wan, internet, lossy, lan100 (100 Mbit/s, no delay).
    #[arg(long, default_value = "dc")]
    pub profile: String,
    /// Replay a bandwidth trace (`time_s<TAB>Mbit/s` per line, e.g. an FCC
    /// trace of ../shared/traces) as the link's rate, on the profile's
    /// delay and loss (give `--profile internet` or `wan`). Each migration
    /// starts the trace from its beginning, so every contender meets the
    /// same link.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Scale the trace so that its mean is this many Mbit/s (0: as is).
    #[arg(long, default_value_t = 100.0, requires = "trace")]
    pub trace_mean_mbit: f64,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 512)]
    pub guest_mem: u64,
    /// Realistic content the guest workload fills, MiB.
    #[arg(long, default_value_t = 256)]
    pub fill: u64,
    /// Rate at which the guest rewrites its memory, MiB/s.
    #[arg(long, default_value_t = 8)]
    pub dirty_rate: u64,
    /// Runs per contender (interleaved: A B C A B C ...).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Contenders: qemu-tcp, qemu-multifd (4 channels), qemu-multifd-zstd,
    /// qemu-xbzrle, dwcp (agent defaults), dwcp-raw, dwcp-none, dwcp-lz4,
    /// dwcp-zstd, dwcp-zstd:N, dwcp-auto; a dwcp contender with `+multifd`
    /// has QEMU use 4 multifd channels, each relayed as a DWCP channel;
    /// qemu-dwcp[+multifd][?PARAMS]: the patched QEMU's own `dwcp:` URI
    /// (libdwcp in QEMU; PARAMS are the URI's, e.g.
    /// `qemu-dwcp?streams=1&codec=raw`; needs `--qemu` pointing at that
    /// build). DWCP contenders are TLS-encrypted (the lab's throwaway PKI);
    /// `+insecure` at the end runs one in clear text (a second agent pair
    /// started with `--insecure`, or `insecure=1` in the URI). QEMU's own
    /// contenders are clear text; `+tls` at the end gives them QEMU's
    /// `tls-creds-x509` with the same PKI (e.g. `qemu-multifd+tls`).
    /// `+nospill` on an agent contender asks for no dedup spill file
    /// (docs/hde.md), e.g. `dwcp,dwcp+nospill` to see what it saves;
    /// `+nodelta` for no deltas of re-sent pages (`dwcp,dwcp+nodelta`),
    /// `+nokeep` for no kept copies for re-migration, `+noctx` for no
    /// compression with context across frames.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_CONTENDERS)]
    pub contenders: Vec<String>,
    /// Seconds before a migration counts as not converged and is cancelled.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Guest content seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// TCP congestion control of the DWCP agents' streams (e.g. bbr; default:
    /// the kernel's, as for QEMU's own connections).
    #[arg(long)]
    pub congestion: Option<String>,
    /// QEMU binary for every contender (the same for all, so they compare
    /// alike); qemu-dwcp contenders need the patched build (`make qemu`).
    #[arg(long, env = "DWCP_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Benchmark your own guest instead of the test guest: a file of QEMU
    /// arguments, one per line (`#` comments), e.g. `-machine`, `q35`, `-m`,
    /// `2G`, `-drive`, `file=disk.qcow2,if=virtio,snapshot=on`. The harness
    /// adds -name, -qmp and -incoming. Both hosts see the same files
    /// (shared-storage migration). `--guest-mem`, `--fill` and
    /// `--dirty-rate` are then ignored and there is no guest-side pause
    /// figure (no heartbeat); RAM is still compared page by page.
    #[arg(long, value_name = "FILE")]
    pub qemu_args_file: Option<PathBuf>,
    /// Seconds a guest of your own runs before each migration.
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// QEMU max-bandwidth for every contender, MiB/s; 0 lifts QEMU's
    /// default cap of 128 MiB/s (which would otherwise throttle every
    /// contender alike on fast links).
    #[arg(long, default_value_t = 0)]
    pub max_bandwidth: u64,
    /// zstd levels of the compression floor (`dwcp benchmark floor`),
    /// measured once on the source's RAM after the first verified run;
    /// each run's wire bytes are then reported as a multiple of it.
    #[arg(long, value_delimiter = ',', default_value = "3,19")]
    pub floor_levels: Vec<i32>,
    /// Do not measure the compression floor.
    #[arg(long)]
    pub no_floor: bool,
    /// Boot the test guest with this initramfs instead of its own, e.g.
    /// one with real files in it (scripts/real-files-initrd.sh).
    #[arg(long, env = "DWCP_GUEST_INITRD", value_name = "FILE")]
    pub guest_initrd: Option<PathBuf>,
}

impl CompareArgs {
    pub fn runs(&self) -> usize {
        self.repeat * self.contenders.len()
    }
}

#[derive(Debug, Clone)]
pub(super) enum Kind {
    Native(MigrationSetup),
    Dwcp {
        codec: Option<String>,
        bandwidth: Option<u64>,
        /// QEMU multifd channels (each relayed as a DWCP channel).
        multifd: Option<u32>,
        /// Through a second agent pair in clear text (`+insecure`).
        plain: bool,
        /// Features turned off for this contender's route ([`OFF_SUFFIXES`]).
        off: Vec<&'static str>,
    },
    /// QEMU built with qemu-patches/: `migrate dwcp:HOST:PORT`, libdwcp in
    /// QEMU, no agent in the data path.
    /// The URI's parameters (`qemu-dwcp?streams=1&codec=raw`), if any.
    QemuDwcp(MigrationSetup, Option<String>),
}

impl Kind {
    /// Whether this contender needs the lab's clear-text agent pair.
    fn plain_agents(&self) -> bool {
        matches!(self, Kind::Dwcp { plain: true, .. })
    }
}

/// Contender suffixes that turn a DWCP feature off for the route, and the
/// route request field that does it: `+nospill` (no dedup spill files),
/// `+nodelta` (no deltas of re-sent pages), `+nokeep` (neither agent keeps
/// the guest's pages for re-migration), `+noctx` (no compression with
/// context across frames).
const OFF_SUFFIXES: [(&str, &str, u32); 4] = [
    ("+nospill", "spill_mb", 0),
    ("+nodelta", "delta", 0),
    ("+nokeep", "keep", 0),
    ("+noctx", "context", 0),
];

/// What `dwcp migrate` aims at by default (`--downtime-goal-ms`).
const DOWNTIME_GOAL_MS: u64 = 300;

fn multifd_of(name: &str) -> Option<u32> {
    name.ends_with("+multifd").then_some(4)
}

/// A contender by name. Suffixes: `+tls` on QEMU's own transports (QEMU's
/// `tls-creds-x509` with the lab's PKI); `+insecure` on DWCP's (clear text:
/// a second agent pair started with `--insecure`, or `insecure=1` in the
/// `dwcp:` URI). DWCP is TLS-encrypted otherwise, QEMU's transports clear.
pub(super) fn contender(full: &str) -> Result<Kind> {
    if let Some(base) = full.strip_suffix("+tls") {
        return match contender(base)? {
            Kind::Native(mut s) => {
                s.tls_dir = Some(PathBuf::new());
                Ok(Kind::Native(s))
            }
            _ => bail!("contender {full:?}: +tls is for QEMU's own transports (DWCP is encrypted unless +insecure)"),
        };
    }
    for (suffix, _, _) in OFF_SUFFIXES {
        if let Some(base) = full.strip_suffix(suffix) {
            return match contender(base)? {
                Kind::Dwcp {
                    codec,
                    bandwidth,
                    multifd,
                    plain,
                    mut off,
                } => {
                    if !off.contains(&suffix) {
                        off.push(suffix);
                    }
                    Ok(Kind::Dwcp {
                        codec,
                        bandwidth,
                        multifd,
                        plain,
                        off,
                    })
                }
                _ => {
                    bail!("contender {full:?}: {suffix} is for contenders through the DWCP agents")
                }
            };
        }
    }
    if let Some(base) = full.strip_suffix("+insecure") {
        return match contender(base)? {
            Kind::Dwcp {
                codec,
                bandwidth,
                multifd,
                off,
                ..
            } => Ok(Kind::Dwcp {
                codec,
                bandwidth,
                multifd,
                plain: true,
                off,
            }),
            Kind::QemuDwcp(s, p) => {
                let p = match p {
                    Some(p) => format!("{p}&insecure=1"),
                    None => "insecure=1".to_string(),
                };
                Ok(Kind::QemuDwcp(s, Some(p)))
            }
            Kind::Native(_) => bail!("contender {full:?}: QEMU's own transports are clear text already (+tls encrypts them)"),
        };
    }
    if let Some((base, params)) = full.split_once('?') {
        if !base.starts_with("qemu-dwcp") {
            bail!("contender {full:?}: only qemu-dwcp contenders take ?PARAMS");
        }
        // QEMU (libdwcp) validates them and names what is wrong.
        return Ok(match contender(base)? {
            Kind::QemuDwcp(s, _) => Kind::QemuDwcp(s, Some(params.to_string())),
            k => k,
        });
    }
    let (name, multifd) = match full.strip_suffix("+multifd") {
        Some(n) if n.starts_with("dwcp") => (n, multifd_of(full)),
        _ => (full, None),
    };
    let native = |multifd: Option<u32>, comp: Option<&str>, xbzrle: bool| {
        Kind::Native(MigrationSetup {
            multifd_channels: multifd,
            multifd_compression: comp.map(str::to_string),
            xbzrle,
            return_path: true,
            auto_converge: false,
            ..Default::default()
        })
    };
    Ok(match name {
        "qemu-tcp" => native(None, None, false),
        "qemu-multifd" => native(Some(4), None, false),
        "qemu-multifd-zstd" => native(Some(4), Some("zstd"), false),
        "qemu-xbzrle" => native(None, None, true),
        "qemu-dwcp" | "qemu-dwcp+multifd" => match native(multifd_of(name), None, false) {
            Kind::Native(s) => Kind::QemuDwcp(s, None),
            k => k,
        },
        "dwcp" => Kind::Dwcp {
            codec: None,
            bandwidth: None,
            multifd,
            plain: false,
            off: Vec::new(),
        },
        other => match other.strip_prefix("dwcp-") {
            Some(tier) => {
                dwcp_core::transport::TransportConfig::default()
                    .set_codec(tier)
                    .map_err(|e| anyhow!("contender {other:?}: {e}"))?;
                Kind::Dwcp {
                    codec: Some(tier.to_string()),
                    bandwidth: None,
                    multifd,
                    plain: false,
                    off: Vec::new(),
                }
            }
            None => bail!(
                "unknown contender {other:?} (qemu-tcp, qemu-multifd, qemu-multifd-zstd, qemu-xbzrle, dwcp, dwcp-none, dwcp-lz4, dwcp-zstd, dwcp-zstd:N, dwcp-auto, dwcp-raw; any dwcp contender with +multifd: QEMU multifd, 4 channels, through DWCP; +insecure: DWCP in clear text; +nospill: DWCP without dedup spill files; +nodelta: DWCP without deltas of re-sent pages; +nokeep: DWCP keeping no copy for re-migration; +noctx: DWCP without compression with context; +tls on a qemu- contender: QEMU's own TLS)"
            ),
        },
    })
}

/// The contenders by name, each parsed (an unknown name is an error).
fn contenders(names: &[String]) -> Result<Vec<(String, Kind)>> {
    names
        .iter()
        .map(|c| contender(c).map(|k| (c.clone(), k)))
        .collect()
}

/// The test guest's content must leave its kernel some room.
fn check_fill(fill: u64, mem: u64) -> Result<()> {
    if fill + 48 > mem {
        bail!("--fill {fill} leaves less than 48 MiB of the {mem} MiB guest free");
    }
    Ok(())
}

/// The two hosts with the link of `profile` between them, for the `what`
/// command (`tag`: the short namespace prefix).
pub(super) fn open_lab(
    what: &str,
    tag: &str,
    profile: &str,
    agent_args: &[&str],
    p: &Progress,
) -> Result<Lab> {
    let prof: dwcp_lab::Profile = profile
        .parse()
        .map_err(|e| anyhow!("--profile {profile:?}: {e}"))?;
    p.set_message(format!("{what} {profile}: creating the two hosts"));
    Lab::new(tag, prof.middle(), agent_args).context("setting up the two hosts")
}

impl Kind {
    /// The same contender with QEMU's max-bandwidth at `bw` bytes/s.
    fn with_bandwidth(&self, bw: u64) -> Kind {
        let mut k = self.clone();
        match &mut k {
            Kind::Native(s) | Kind::QemuDwcp(s, _) => s.max_bandwidth = Some(bw),
            Kind::Dwcp { bandwidth, .. } => *bandwidth = Some(bw),
        }
        k
    }
}

/// The profile's link (delay, loss) with its rate following the trace in
/// `file`, scaled to a mean of `mean_mbit` (0: unscaled).
fn traced_link(profile: &str, file: &Path, mean_mbit: f64) -> Result<linkem::LinkConfig> {
    let prof: dwcp_lab::Profile = profile
        .parse()
        .map_err(|e| anyhow!("--profile {profile:?}: {e}"))?;
    if matches!(prof, dwcp_lab::Profile::Dc) {
        anyhow::bail!("--trace needs an emulated profile (wan, internet, lossy), not dc");
    }
    let trace = linkem::Trace::load(file).with_context(|| format!("--trace {}", file.display()))?;
    let trace = if mean_mbit > 0.0 {
        trace.scaled_to_mean(mean_mbit * 1e6)
    } else {
        trace
    };
    let t = std::sync::Arc::new(trace);
    Ok(prof.config().both(|d| d.trace = Some(t.clone())))
}

/// QEMU max-bandwidth that lifts its default cap of 128 MiB/s.
const UNCAPPED: u64 = 1 << 40;

pub fn run(a: &CompareArgs, p: &Progress) -> Result<CompareSuite> {
    let kinds = contenders(&a.contenders)?;
    let qemu_args = match &a.qemu_args_file {
        Some(f) => read_qemu_args(f)?,
        None => Vec::new(),
    };
    if qemu_args.is_empty() {
        check_fill(a.fill, a.guest_mem)?;
    }
    let agent_args: Vec<&str> = match &a.congestion {
        Some(cc) => vec!["--congestion", cc.as_str()],
        None => Vec::new(),
    };
    let traced = match &a.trace {
        Some(f) => Some(traced_link(&a.profile, f, a.trace_mean_mbit)?),
        None => None,
    };
    let mut lab = match &traced {
        // The hosts are joined only while a migration runs (its forwarder).
        Some(_) => {
            p.set_message(format!("compare {}: creating the two hosts", a.profile));
            Lab::new("bench", linkem::Middle::External, &agent_args)
                .context("setting up the two hosts")?
        }
        None => open_lab("compare", "bench", &a.profile, &agent_args, p)?,
    };
    if kinds.iter().any(|(_, k)| k.plain_agents()) {
        lab.start_plain_agents()
            .context("starting the clear-text agent pair")?;
    }
    let spec = GuestSpec {
        mem_mb: a.guest_mem,
        fill_mb: a.fill,
        dirty_mbps: a.dirty_rate,
        seed: a.seed,
        qemu_args,
        warmup_s: a.warmup,
        qemu_bin: a.qemu.clone(),
        initrd: a.guest_initrd.clone(),
        ..Default::default()
    };
    let scratch = scratch_dir(&lab)?;
    let mut runs = Vec::new();
    let mut floor: Option<super::floor::Floor> = None;
    for r in 0..a.repeat {
        for (name, kind) in &kinds {
            p.set_message(format!(
                "compare {}: {name} (run {}/{})",
                a.profile,
                r + 1,
                a.repeat
            ));
            let kind = kind.with_bandwidth(if a.max_bandwidth == 0 {
                UNCAPPED
            } else {
                a.max_bandwidth << 20
            });
            let keep = (floor.is_none() && !a.no_floor).then(|| scratch.join("floor-src.ram"));
            let mut rr = one_run(
                &lab,
                &spec,
                name,
                &kind,
                r,
                a.timeout,
                &scratch,
                keep.as_deref(),
                traced.as_ref(),
            );
            if let Some(k) = keep.filter(|k| k.exists()) {
                p.set_message(format!(
                    "compare {}: compression floor of the guest's RAM",
                    a.profile
                ));
                match super::floor::measure(
                    std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&k)?),
                    "the source's RAM after its first verified run",
                    &a.floor_levels,
                ) {
                    Ok(f) => {
                        // Runs before this one had no floor yet.
                        for done in runs.iter_mut() {
                            set_floor_multiple(done, &f);
                        }
                        floor = Some(f);
                    }
                    Err(e) => p.println(format!("    compression floor: {e:#}")),
                }
                let _ = std::fs::remove_file(&k);
            }
            if let Some(f) = &floor {
                set_floor_multiple(&mut rr, f);
            }
            if rr.outcome == Outcome::Corrupted {
                p.println(format!(
                    "!!! CORRUPTION: {name} run {} on {}: {}",
                    r + 1,
                    a.profile,
                    rr.error.as_deref().unwrap_or("")
                ));
            } else if rr.outcome != Outcome::Completed {
                p.println(format!(
                    "    {name} run {} on {}: {:?}: {}",
                    r + 1,
                    a.profile,
                    rr.outcome,
                    rr.error.as_deref().unwrap_or("")
                ));
            }
            runs.push(rr);
            p.inc();
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let summary = a.contenders.iter().map(|c| summarize(c, &runs)).collect();
    Ok(CompareSuite {
        profile: match &a.trace {
            Some(f) => format!(
                "{} with the rate of trace {} (mean scaled to {} Mbit/s)",
                a.profile,
                f.file_name().unwrap_or_default().to_string_lossy(),
                a.trace_mean_mbit
            ),
            None => a.profile.clone(),
        },
        guest: match &a.qemu_args_file {
            Some(f) if spec.is_custom() => GuestInfo::own(f, &spec.qemu_args),
            _ => GuestInfo::test_guest(
                spec.mem_mb,
                spec.fill_mb,
                spec.dirty_mbps,
                spec.seed,
                &spec.mix,
                &spec.accel,
            )
            .with_initrd(spec.initrd.as_deref()),
        },
        dwcp_congestion: a.congestion.clone(),
        repeat: a.repeat,
        timeout_s: a.timeout,
        qemu_max_bandwidth: if a.max_bandwidth == 0 {
            1u64 << 40
        } else {
            a.max_bandwidth << 20
        },
        contenders: a.contenders.clone(),
        runs,
        summary,
        floor,
    })
}

fn summarize(c: &str, runs: &[RunResult]) -> ContenderSummary {
    let mine: Vec<&RunResult> = runs.iter().filter(|r| r.contender == c).collect();
    let ok: Vec<&RunResult> = mine
        .iter()
        .copied()
        .filter(|r| r.outcome == Outcome::Completed)
        .collect();
    let st =
        |f: &dyn Fn(&RunResult) -> Option<f64>| Stat::of(ok.iter().filter_map(|r| f(r)).collect());
    ContenderSummary {
        contender: c.to_string(),
        runs: mine.len(),
        converged: ok.len(),
        corrupted: mine
            .iter()
            .filter(|r| r.outcome == Outcome::Corrupted)
            .count(),
        total_time_ms: st(&|r| Some(r.total_time_ms as f64)),
        downtime_ms: st(&|r| r.downtime_ms.map(|d| d as f64)),
        guest_pause_ms: st(&|r| r.guest_pause_ms.map(|d| d as f64)),
        ram_bytes: st(&|r| Some(r.ram_bytes as f64)),
        wire_bytes: st(&|r| Some(r.wire_bytes as f64)),
        link_tx_bytes: st(&|r| Some(r.link_tx_bytes as f64)),
        wire_mbit_s: st(&|r| Some(r.wire_mbit_s)),
        ram_mbit_s: st(&|r| Some(r.ram_mbit_s)),
        dirty_syncs: st(&|r| Some(r.dirty_syncs as f64)),
        cpu_src_s: st(&|r| Some(r.cpu.src())),
        cpu_dst_s: st(&|r| Some(r.cpu.dst())),
        wire_floor_multiple: st(&|r| r.wire_floor_multiple),
        cpu_s_per_gib: st(&|r| {
            (r.ram_bytes > 0)
                .then(|| (r.cpu.src() + r.cpu.dst()) / (r.ram_bytes as f64 / (1u64 << 30) as f64))
        }),
    }
}

/// utime + stime of a process (all its threads), seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm field: state is index 0, utime 11, stime 12 (fields 14, 15).
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (t(11) + t(12)) as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    100.0 // USER_HZ on every Linux ABI we run on.
}

/// Bytes the host's eth0 has sent.
fn link_tx(lab: &Lab, ns: &str) -> u64 {
    lab.topo
        .exec(ns, "cat")
        .arg("/sys/class/net/eth0/statistics/tx_bytes")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

static RUN_SEQ: AtomicU32 = AtomicU32::new(0);

fn empty_run(name: &str, repeat: usize) -> RunResult {
    RunResult {
        contender: name.to_string(),
        repeat,
        outcome: Outcome::Failed,
        error: None,
        total_time_ms: 0,
        downtime_ms: None,
        guest_pause_ms: None,
        ram_bytes: 0,
        wire_bytes: 0,
        link_tx_bytes: 0,
        wire_mbit_s: 0.0,
        ram_mbit_s: 0.0,
        dirty_syncs: 0,
        cpu: Cpu::default(),
        memory_verified: false,
        wire_floor_multiple: None,
        pages: None,
        timeline: Vec::new(),
    }
}

/// A run's wire bytes as a multiple of the compression floor (the smallest
/// level measured).
fn set_floor_multiple(rr: &mut RunResult, f: &super::floor::Floor) {
    if rr.outcome == Outcome::Completed && rr.wire_bytes > 0 {
        rr.wire_floor_multiple = f
            .best_bytes()
            .map(|b| rr.wire_bytes as f64 / b.max(1) as f64);
    }
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    lab: &Lab,
    spec: &GuestSpec,
    name: &str,
    kind: &Kind,
    repeat: usize,
    timeout: u64,
    scratch: &Path,
    keep_dump: Option<&Path>,
    traced: Option<&linkem::LinkConfig>,
) -> RunResult {
    let mut rr = empty_run(name, repeat);
    let r = run_inner(
        lab, spec, kind, timeout, scratch, keep_dump, traced, &mut rr,
    );
    if let Err(e) = r {
        let msg = format!("{e:#}");
        if rr.outcome == Outcome::Failed
            && (msg.contains("differs from the source")
                || msg.contains("memory errors")
                || msg.contains("corruption"))
        {
            rr.outcome = Outcome::Corrupted;
        }
        rr.error = Some(msg);
    }
    rr
}

#[allow(clippy::too_many_arguments)]
fn run_inner(
    lab: &Lab,
    spec: &GuestSpec,
    kind: &Kind,
    timeout: u64,
    scratch: &Path,
    keep_dump: Option<&Path>,
    traced: Option<&linkem::LinkConfig>,
    rr: &mut RunResult,
) -> Result<()> {
    let seq = RUN_SEQ.fetch_add(1, Ordering::Relaxed);
    let tag = format!("b{seq}");
    let plain = kind.plain_agents();
    let (src_agent, dst_agent) = lab.agents(plain);
    let src_ctl = src_agent.control();
    let (pair, uri, setup, dwcp_name) = match kind {
        Kind::Native(setup) | Kind::QemuDwcp(setup, _) => {
            // Each QEMU with its own host's credentials, as on real hosts.
            let setup_of = |source: bool| {
                let mut s = setup.clone();
                if s.tls_dir.is_some() {
                    s.tls_dir = Some(lab.tls_dir(source).to_path_buf());
                }
                s
            };
            let libdwcp = matches!(kind, Kind::QemuDwcp(..));
            let mut src = Guest::start(lab, lab.src_ns(), "src", spec, false)?;
            let dst = Guest::start(lab, lab.dst_ns(), "dst", spec, true)?;
            let ready_seq = src.wait_ready(spec)?;
            let mut uri = format!(
                "{}:{}:{}",
                if libdwcp { "dwcp" } else { "tcp" },
                lab.topo.dst_ip,
                7200 + (seq % 500)
            );
            if let Kind::QemuDwcp(_, Some(params)) = kind {
                uri = format!("{uri}?{params}");
            }
            // libdwcp: TLS, as by default, with the host's throwaway PKI.
            let tls = libdwcp && !uri.contains("insecure=1");
            let uri_of = |source: bool| {
                if tls {
                    let sep = if uri.contains('?') { '&' } else { '?' };
                    format!("{uri}{sep}tls-dir={}", lab.tls_dir(source).display())
                } else {
                    uri.clone()
                }
            };
            let mut dq = dst.qmp()?;
            setup_of(false)
                .apply(&mut dq, true)
                .context("destination capabilities")?;
            dq.execute("migrate-incoming", Some(json!({ "uri": uri_of(false) })))?;
            drop(dq);
            std::thread::sleep(Duration::from_millis(200));
            let pair = GuestPair {
                src,
                dst,
                ready_seq,
            };
            (pair, uri_of(true), setup_of(true), None)
        }
        Kind::Dwcp {
            codec,
            bandwidth,
            multifd,
            plain,
            off,
        } => {
            let mig = MigrationSpec {
                name: tag.clone(),
                return_path: true,
                multifd: *multifd,
                plain: *plain,
                ..Default::default()
            };
            let pair = boot_pair(lab, spec, &mig)?;
            let mut req = json!({"op": "route", "name": tag, "to": lab.dst_addr_of(*plain)});
            if let Some(c) = codec {
                req["codec"] = json!(c);
            }
            for (suffix, field, value) in OFF_SUFFIXES {
                if off.contains(&suffix) {
                    req[field] = if field == "spill_mb" {
                        json!(value)
                    } else {
                        json!(value.to_string())
                    };
                }
            }
            let route = control_request(&src_ctl, &req).map_err(|e| anyhow!("route: {e}"))?;
            let socket = route["socket"].as_str().unwrap_or_default().to_string();
            let setup = MigrationSetup {
                return_path: true,
                auto_converge: false,
                multifd_channels: *multifd,
                max_bandwidth: *bandwidth,
                ..Default::default()
            };
            (pair, format!("unix:{socket}"), setup, Some(tag.clone()))
        }
    };
    let pids = [
        pair.src.child.id(),
        src_agent.child.id(),
        pair.dst.child.id(),
        dst_agent.child.id(),
    ];
    // A traced link starts now: the trace's time 0 is the migration's.
    let _forwarder = match traced {
        Some(cfg) => Some(
            linkem::Forwarder::start(cfg, "a", "b", Some(&lab.topo.link_ns))
                .context("starting the traced link")?,
        ),
        None => None,
    };
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let link0 = link_tx(lab, lab.src_ns());

    let mut sq = pair.src.qmp()?;
    setup.apply(&mut sq, false).context("source capabilities")?;
    let t0 = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut last = Value::Null;
    let mut polls = 0u32;
    let mut wire_now = 0u64;
    let mut tuner = dwcp_name
        .as_ref()
        .map(|_| qemu::SwitchoverTuner::new(DOWNTIME_GOAL_MS));
    let result = qemu::migrate(&mut sq, &uri, Duration::from_secs(timeout), |v, _| {
        let ram = v
            .pointer("/ram/transferred")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let mut params = None;
        if let Some(n) = &dwcp_name {
            if polls.is_multiple_of(2) {
                if let Some(s) = dwcp_core::agent::newest_session(&src_ctl, n) {
                    wire_now = s["wire_out"].as_u64().unwrap_or(wire_now);
                    params = tuner.as_mut().and_then(|t| t.params(&s));
                }
            }
        } else {
            wire_now = ram;
        }
        polls += 1;
        samples.push(Sample {
            t_ms: t0.elapsed().as_millis() as u64,
            ram_bytes: ram,
            wire_bytes: wire_now,
            qemu_mbps: v
                .pointer("/ram/mbps")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
        });
        last = v.clone();
        params
    });
    drop(sq);
    let elapsed = t0.elapsed();
    let finish_counters = |rr: &mut RunResult| {
        let cpu1: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
        let d = |i: usize| (cpu1[i] - cpu0[i]).max(0.0);
        rr.cpu = Cpu {
            src_qemu_s: d(0),
            src_agent_s: d(1),
            dst_qemu_s: d(2),
            dst_agent_s: d(3),
        };
        rr.link_tx_bytes = link_tx(lab, lab.src_ns()).saturating_sub(link0);
    };
    rr.timeline = downsample(samples, 400);
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            let msg = e.to_string();
            finish_counters(rr);
            rr.total_time_ms = elapsed.as_millis() as u64;
            rr.ram_bytes = last
                .pointer("/ram/transferred")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            rr.dirty_syncs = last
                .pointer("/ram/dirty-sync-count")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            rr.wire_bytes = if dwcp_name.is_some() {
                wire_now
            } else {
                rr.ram_bytes
            };
            if msg.contains("did not complete within") {
                rr.outcome = Outcome::NotConverged;
            }
            if let Some(n) = &dwcp_name {
                let _ = control_request(&src_ctl, &json!({"op": "unroute", "name": n}));
            }
            bail!("{msg}");
        }
    };
    rr.total_time_ms = r.total_time_ms;
    rr.downtime_ms = Some(r.downtime_ms);
    rr.ram_bytes = r.ram_transferred;
    rr.dirty_syncs = r.dirty_sync_count;
    let session = dwcp_name
        .as_ref()
        .and_then(|n| dwcp_core::agent::settled_session(&src_ctl, n, Duration::from_secs(5)));
    rr.wire_bytes = match &dwcp_name {
        Some(_) => session
            .as_ref()
            .and_then(|s| s["wire_out"].as_u64())
            .unwrap_or(0),
        None => r.ram_transferred,
    };
    if let Some(s) = &session {
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        rr.pages = Some(PageCounts {
            seen: n("pages_seen"),
            deduped: n("pages_deduped"),
            xref: n("pages_xref"),
            missed_dups: n("pages_missed_dups"),
            resent: n("pages_resent"),
            delta: n("pages_delta"),
            resent_lz4_full: n("resent_lz4_full"),
            resent_lz4_delta: n("resent_lz4_delta"),
        });
    }
    finish_counters(rr);
    if matches!(kind, Kind::QemuDwcp(..)) {
        // libdwcp inside QEMU: what left the source host's link.
        rr.wire_bytes = rr.link_tx_bytes;
    }
    if let Some(n) = &dwcp_name {
        let _ = control_request(&src_ctl, &json!({"op": "unroute", "name": n}));
    }
    let secs = (r.total_time_ms as f64 / 1000.0).max(1e-3);
    rr.wire_mbit_s = rr.wire_bytes as f64 * 8.0 / secs / 1e6;
    rr.ram_mbit_s = rr.ram_bytes as f64 * 8.0 / secs / 1e6;
    let v = verify_keeping(&pair, serde_json::to_value(&r)?, scratch, keep_dump)
        .context("verifying the migrated guest")?;
    rr.memory_verified = true;
    rr.guest_pause_ms = (!spec.is_custom()).then_some(v.pause_ms);
    rr.outcome = Outcome::Completed;
    Ok(())
}

/// QEMU arguments from a file: one per line, blank lines and `#` comments
/// skipped. Options the harness sets itself are refused.
pub fn read_qemu_args(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--qemu-args-file {}", path.display()))?;
    let args: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    for own in ["-qmp", "-incoming", "-name", "-daemonize"] {
        if args.iter().any(|a| a == own) {
            bail!(
                "--qemu-args-file {}: remove {own}; the benchmark sets it itself",
                path.display()
            );
        }
    }
    if args.is_empty() {
        bail!("--qemu-args-file {}: no arguments in it", path.display());
    }
    Ok(args)
}

fn downsample(v: Vec<Sample>, max: usize) -> Vec<Sample> {
    if v.len() <= max {
        return v;
    }
    let step = v.len().div_ceil(max);
    let last = v.len() - 1;
    v.into_iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i == last)
        .map(|(_, s)| s)
        .collect()
}

fn fmt_stat(s: &Option<Stat>, scale: f64, prec: usize) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n == 1 => format!("{:.*}", prec, s.median / scale),
        Some(s) => format!(
            "{:.*} [{:.*}-{:.*}]",
            prec,
            s.median / scale,
            prec,
            s.min / scale,
            prec,
            s.max / scale
        ),
    }
}

pub fn summary_text(s: &CompareSuite) -> String {
    let mut t = format!(
        "compare --profile {}: {}, {} repeat(s); median [min-max]\n",
        s.profile,
        s.guest.describe(),
        s.repeat
    );
    t.push_str(&format!(
        "{:<18} {:>5} {:>18} {:>16} {:>16} {:>18} {:>18} {:>16} {:>8} {:>14} {:>16}\n",
        "contender",
        "conv",
        "total s",
        "downtime ms",
        "guest pause ms",
        "RAM MiB",
        "wire MiB",
        "wire Mbit/s",
        "syncs",
        "CPU s/GiB",
        "wire/floor"
    ));
    for c in &s.summary {
        t.push_str(&format!(
            "{:<18} {:>5} {:>18} {:>16} {:>16} {:>18} {:>18} {:>16} {:>8} {:>14} {:>16}\n",
            c.contender,
            format!("{}/{}", c.converged, c.runs),
            fmt_stat(&c.total_time_ms, 1000.0, 2),
            fmt_stat(&c.downtime_ms, 1.0, 0),
            fmt_stat(&c.guest_pause_ms, 1.0, 0),
            fmt_stat(&c.ram_bytes, 1048576.0, 1),
            fmt_stat(&c.wire_bytes, 1048576.0, 1),
            fmt_stat(&c.wire_mbit_s, 1.0, 0),
            fmt_stat(&c.dirty_syncs, 1.0, 0),
            fmt_stat(&c.cpu_s_per_gib, 1.0, 2),
            fmt_stat(&c.wire_floor_multiple, 1.0, 2),
        ));
        if c.corrupted > 0 {
            t.push_str(&format!(
                "  !!! {} run(s) of {} CORRUPTED the guest\n",
                c.corrupted, c.contender
            ));
        }
    }
    t
}

pub fn print_summary(s: &CompareSuite) {
    println!("{}", summary_text(s));
}

#[derive(Args, Debug, Clone)]
pub struct ConvergeArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Link profile: dc (unshaped), wan, internet, lossy, lan100 (100 Mbit/s, no delay).
    #[arg(long, default_value = "internet")]
    pub profile: String,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 512)]
    pub guest_mem: u64,
    /// Realistic content the guest workload fills (and rewrites), MiB.
    #[arg(long, default_value_t = 256)]
    pub fill: u64,
    /// Dirty rates to try, MiB/s, ascending. A contender that does not
    /// converge at one rate is not tried at the higher ones.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64,128")]
    pub rates: Vec<u64>,
    /// Contenders (see `compare --help`).
    #[arg(long, value_delimiter = ',', default_value = "qemu-multifd-zstd,dwcp")]
    pub contenders: Vec<String>,
    /// Seconds before a migration counts as not converged and is cancelled.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// QEMU binary for every contender.
    #[arg(long, env = "DWCP_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: String,
}

impl ConvergeArgs {
    /// Most runs it can take.
    pub fn max_runs(&self) -> usize {
        self.rates.len() * self.contenders.len()
    }
}

/// The highest guest dirty rate at which each contender still converges on
/// one link: rates ascending, contenders interleaved at each rate.
pub fn converge(a: &ConvergeArgs, p: &Progress) -> Result<ConvergeSuite> {
    let kinds = contenders(&a.contenders)?;
    check_fill(a.fill, a.guest_mem)?;
    let mut rates = a.rates.clone();
    rates.sort_unstable();
    rates.dedup();
    let lab = open_lab("converge", "conv", &a.profile, &[], p)?;
    let scratch = scratch_dir(&lab)?;
    let base = GuestSpec {
        mem_mb: a.guest_mem,
        fill_mb: a.fill,
        qemu_bin: a.qemu.clone(),
        ..Default::default()
    };
    let mut alive: Vec<bool> = vec![true; kinds.len()];
    let mut limits: Vec<ConvergeLimit> = a
        .contenders
        .iter()
        .map(|c| ConvergeLimit {
            contender: c.clone(),
            highest_converged_mbps: None,
            first_failed_mbps: None,
        })
        .collect();
    let mut runs = Vec::new();
    for &rate in &rates {
        let spec = GuestSpec {
            dirty_mbps: rate,
            ..base.clone()
        };
        for (i, (name, kind)) in kinds.iter().enumerate() {
            if !alive[i] {
                p.inc();
                continue;
            }
            p.set_message(format!("converge {}: {name} at {rate} MiB/s", a.profile));
            let kind = kind.with_bandwidth(UNCAPPED);
            let mut rr = one_run(&lab, &spec, name, &kind, 0, a.timeout, &scratch, None, None);
            let line = format!(
                "    {name} at {rate} MiB/s: {:?} in {:.1} s{}",
                rr.outcome,
                rr.total_time_ms as f64 / 1000.0,
                rr.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
            p.println(line);
            match rr.outcome {
                Outcome::Completed => limits[i].highest_converged_mbps = Some(rate),
                Outcome::Corrupted => bail!("{name} CORRUPTED the guest at {rate} MiB/s"),
                _ => {
                    limits[i].first_failed_mbps = Some(rate);
                    alive[i] = false;
                }
            }
            rr.timeline.clear();
            runs.push(ConvergeRun {
                dirty_mbps: rate,
                run: rr,
            });
            p.inc();
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(ConvergeSuite {
        profile: a.profile.clone(),
        guest: GuestInfo::test_guest(
            base.mem_mb,
            base.fill_mb,
            0,
            base.seed,
            &base.mix,
            &base.accel,
        ),
        timeout_s: a.timeout,
        rates_mbps: rates,
        runs,
        limits,
    })
}

pub fn converge_summary(s: &ConvergeSuite) -> String {
    let mut t = format!(
        "converge --profile {}: {} MiB guest, {} MiB filled, rates {:?} MiB/s, timeout {} s\n",
        s.profile,
        s.guest.mem_mb,
        s.guest.fill_mb.unwrap_or(0),
        s.rates_mbps,
        s.timeout_s
    );
    for l in &s.limits {
        t.push_str(&format!(
            "{:<20} highest converged: {:>10}   first not converged: {}\n",
            l.contender,
            l.highest_converged_mbps
                .map(|r| format!("{r} MiB/s"))
                .unwrap_or_else(|| "none".into()),
            l.first_failed_mbps
                .map(|r| format!("{r} MiB/s"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(name: &str) -> (Option<String>, Option<u32>, bool, bool, bool) {
        match contender(name).unwrap() {
            Kind::Dwcp {
                codec,
                multifd,
                plain,
                off,
                ..
            } => (
                codec,
                multifd,
                plain,
                off.contains(&"+nospill"),
                off.contains(&"+nodelta"),
            ),
            _ => panic!("{name}: not an agent contender"),
        }
    }

    #[test]
    fn contender_suffixes_combine_in_any_order_and_are_refused_where_they_do_not_apply() {
        assert_eq!(flags("dwcp"), (None, None, false, false, false));
        assert_eq!(
            flags("dwcp+multifd+nospill+insecure"),
            (None, Some(4), true, true, false)
        );
        assert_eq!(
            flags("dwcp-zstd:3+nodelta+nospill"),
            (Some("zstd:3".into()), None, false, true, true)
        );
        for bad in [
            "qemu-tcp+nospill",
            "qemu-multifd+nodelta",
            "dwcp+tls",
            "qemu-tcp+insecure",
        ] {
            let e = contender(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
