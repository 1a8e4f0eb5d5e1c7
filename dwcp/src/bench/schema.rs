//! The `results.json` schema (version [`SCHEMA_VERSION`]). Fields are only
//! ever added; a rename or a change of meaning bumps the version. Times are
//! milliseconds, sizes bytes, CPU seconds, rates Mbit/s (10^6 bit/s) unless
//! the name says otherwise.

use serde::Serialize;

/// 2: `guest` describes the guest that was migrated (`kind`; the test
/// guest's workload fields only for the test guest; `qemu_args_file`).
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub schema_version: u32,
    pub dwcp_version: String,
    /// Unix time the run started, seconds.
    pub started_unix_s: u64,
    /// The command line that produced the file.
    pub command: String,
    pub machine: Machine,
    /// One entry per `compare` suite (profile).
    pub compare: Vec<CompareSuite>,
    pub hde: Option<HdeResult>,
    pub amst: Vec<AmstSuite>,
    pub consensus: Vec<super::consensus::BenchResult>,
    /// `dwcp benchmark consensus --guests N`: the registry at fleet size.
    pub consensus_fleet: Vec<super::consensus::FleetResult>,
    /// One entry per `converge` suite (profile): the highest dirty rate at
    /// which each contender still converges.
    pub converge: Vec<ConvergeSuite>,
    /// Parts of the suite that could not run at all, with the reason.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_mib: u64,
    pub kernel: String,
    pub qemu: String,
}

/// Which guest was migrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestKind {
    /// The self-checking test guest (tests/guest): its workload fills
    /// `fill_mb` of realistic content and rewrites `dirty_mbps`.
    TestGuest,
    /// A guest of the user's own (`--qemu-args-file`), running its own
    /// workload.
    Own,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestInfo {
    pub kind: GuestKind,
    /// Guest RAM, MiB (an own guest: its `-m`, else QEMU's default of 128).
    pub mem_mb: u64,
    /// The test guest's workload (absent for an own guest, whose workload
    /// is its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fill_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_mbps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mix: Option<String>,
    /// QEMU's accelerator (an own guest: its `-accel`, if the file has one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// An own guest: the arguments file's name as given, and its arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_args_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_args: Option<Vec<String>>,
    /// The test guest booted with another initramfs (`--guest-initrd`,
    /// e.g. scripts/real-files-initrd.sh): its file name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
}

/// QEMU's default guest RAM when no `-m` is given, MiB.
const QEMU_DEFAULT_MEM_MB: u64 = 128;

impl GuestInfo {
    /// The test guest with this workload.
    pub fn test_guest(
        mem_mb: u64,
        fill_mb: u64,
        dirty_mbps: u64,
        seed: u64,
        mix: &str,
        accel: &str,
    ) -> GuestInfo {
        GuestInfo {
            kind: GuestKind::TestGuest,
            mem_mb,
            fill_mb: Some(fill_mb),
            dirty_mbps: Some(dirty_mbps),
            seed: Some(seed),
            mix: Some(mix.to_string()),
            accel: Some(accel.to_string()),
            qemu_args_file: None,
            qemu_args: None,
            initrd: None,
        }
    }

    /// The same guest, booted with the initramfs `initrd` (its file name
    /// is recorded, not the path).
    pub fn with_initrd(mut self, initrd: Option<&std::path::Path>) -> GuestInfo {
        self.initrd = initrd
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string());
        self
    }

    /// A guest of the user's own, from its arguments file.
    pub fn own(file: &std::path::Path, args: &[String]) -> GuestInfo {
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        GuestInfo {
            kind: GuestKind::Own,
            mem_mb: dwcp_lab::GuestSpec::custom_mem_mb(args).unwrap_or(QEMU_DEFAULT_MEM_MB),
            fill_mb: None,
            dirty_mbps: None,
            seed: None,
            mix: None,
            accel: after("-accel"),
            qemu_args_file: Some(file.display().to_string()),
            qemu_args: Some(args.to_vec()),
            initrd: None,
        }
    }

    /// A few words: `512 MiB test guest`, `2048 MiB guest from web.args`.
    pub fn short(&self) -> String {
        match self.kind {
            GuestKind::TestGuest => format!("{} MiB test guest", self.mem_mb),
            GuestKind::Own => format!("{} MiB guest from {}", self.mem_mb, self.args_file_name()),
        }
    }

    fn args_file_name(&self) -> String {
        self.qemu_args_file
            .as_deref()
            .map(|f| {
                std::path::Path::new(f)
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| f.to_string())
            })
            .unwrap_or_else(|| "--qemu-args-file".into())
    }

    /// One line for the report and the terminal: what was migrated.
    pub fn describe(&self) -> String {
        match self.kind {
            GuestKind::TestGuest => format!(
                "the test guest (tests/guest{}): {} MiB RAM, {} MiB realistic content, rewriting {} MiB/s",
                self.initrd
                    .as_deref()
                    .map(|i| format!(", initramfs {i}"))
                    .unwrap_or_default(),
                self.mem_mb,
                self.fill_mb.unwrap_or(0),
                self.dirty_mbps.unwrap_or(0)
            ),
            GuestKind::Own => format!(
                "your guest from {}: {} MiB RAM, running its own workload",
                self.args_file_name(),
                self.mem_mb
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareSuite {
    pub profile: String,
    pub guest: GuestInfo,
    /// TCP congestion control of the DWCP agents (None: the kernel's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dwcp_congestion: Option<String>,
    pub repeat: usize,
    pub timeout_s: u64,
    /// QEMU max-bandwidth set for every contender, bytes/s (2^40 = uncapped).
    pub qemu_max_bandwidth: u64,
    pub contenders: Vec<String>,
    /// Every run in the order it ran (interleaved).
    pub runs: Vec<RunResult>,
    pub summary: Vec<ContenderSummary>,
    /// The compression floor of the guest's RAM (`dwcp benchmark floor`),
    /// measured on the source after the first verified run.
    pub floor: Option<super::floor::Floor>,
}

/// `completed` (converged and verified), `not_converged` (timeout,
/// cancelled), `failed` (error), `corrupted` (destination RAM or the guest's
/// self-check differed: a bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    NotConverged,
    Failed,
    Corrupted,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    pub src_qemu_s: f64,
    pub src_agent_s: f64,
    pub dst_qemu_s: f64,
    pub dst_agent_s: f64,
}

impl Cpu {
    pub fn src(&self) -> f64 {
        self.src_qemu_s + self.src_agent_s
    }
    pub fn dst(&self) -> f64 {
        self.dst_qemu_s + self.dst_agent_s
    }
}

/// One point of a migration's progress (sampled every ~100 ms).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    /// QEMU's ram.transferred so far.
    pub ram_bytes: u64,
    /// Bytes on the link so far: DWCP session wire_out, or QEMU's
    /// ram.transferred for native runs.
    pub wire_bytes: u64,
    /// QEMU's current ram.mbps.
    pub qemu_mbps: f64,
}

/// `dwcp benchmark converge`: dirty rates tried in ascending order; a
/// contender that fails to converge at one rate is not tried at higher ones.
#[derive(Debug, Clone, Serialize)]
pub struct ConvergeSuite {
    pub profile: String,
    /// The guest (its `dirty_mbps` is 0: the rate varies per run).
    pub guest: GuestInfo,
    pub timeout_s: u64,
    pub rates_mbps: Vec<u64>,
    /// Every run, in the order it ran (timelines left out).
    pub runs: Vec<ConvergeRun>,
    pub limits: Vec<ConvergeLimit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConvergeRun {
    pub dirty_mbps: u64,
    pub run: RunResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConvergeLimit {
    pub contender: String,
    /// Highest rate tried at which the migration converged (None: none did).
    pub highest_converged_mbps: Option<u64>,
    /// The rate at which it first did not (None: converged at every rate).
    pub first_failed_mbps: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub contender: String,
    /// 0-based repeat index.
    pub repeat: usize,
    pub outcome: Outcome,
    pub error: Option<String>,
    /// QEMU total-time (for not-converged runs: time until cancelled).
    pub total_time_ms: u64,
    /// QEMU's downtime figure.
    pub downtime_ms: Option<u64>,
    /// Longest gap between guest heartbeats across the switch (guest view).
    pub guest_pause_ms: Option<u64>,
    /// QEMU ram.transferred: guest RAM bytes QEMU wrote to its channel(s).
    pub ram_bytes: u64,
    /// Bytes on the wire: DWCP session wire_out (frames incl. headers);
    /// QEMU's transferred bytes for native runs.
    pub wire_bytes: u64,
    /// IP bytes the source host's interface sent during the run (TCP/IP
    /// headers and retransmissions included), for every contender alike.
    pub link_tx_bytes: u64,
    /// wire_bytes / total time.
    pub wire_mbit_s: f64,
    /// ram_bytes / total time (the guest-RAM rate the migration achieved).
    pub ram_mbit_s: f64,
    pub dirty_syncs: u64,
    pub cpu: Cpu,
    /// RAM of source and destination compared page by page after the run.
    pub memory_verified: bool,
    /// Wire bytes / the compression floor of the guest's RAM (`None`: no
    /// floor measured, or the run did not complete).
    pub wire_floor_multiple: Option<f64>,
    /// A DWCP agent run: the source session's page counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages: Option<PageCounts>,
    pub timeline: Vec<Sample>,
}

/// Page records the source agent saw, sent as references to its dedup
/// ring, and sent in full although their content had been sent before
/// (out of the ring by then).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PageCounts {
    pub seen: u64,
    pub deduped: u64,
    /// Of the references, those to another channel's copy (multifd,
    /// docs/hde.md).
    #[serde(default)]
    pub xref: u64,
    pub missed_dups: u64,
    /// Pages sent again after their content changed, whose previous
    /// version the destination still held (0 without deltas).
    #[serde(default)]
    pub resent: u64,
    /// Of those, sent as a delta (docs/hde.md, layer 2).
    #[serde(default)]
    pub delta: u64,
    /// LZ4 bytes of the re-sent pages each compressed alone ...
    #[serde(default)]
    pub resent_lz4_full: u64,
    /// ... and of what was sent for them (the delta where smaller).
    #[serde(default)]
    pub resent_lz4_delta: u64,
}

/// Median, minimum and maximum over the completed runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(mut v: Vec<f64>) -> Option<Stat> {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ContenderSummary {
    pub contender: String,
    pub runs: usize,
    pub converged: usize,
    pub corrupted: usize,
    pub total_time_ms: Option<Stat>,
    pub downtime_ms: Option<Stat>,
    pub guest_pause_ms: Option<Stat>,
    pub ram_bytes: Option<Stat>,
    pub wire_bytes: Option<Stat>,
    pub link_tx_bytes: Option<Stat>,
    pub wire_mbit_s: Option<Stat>,
    pub ram_mbit_s: Option<Stat>,
    pub dirty_syncs: Option<Stat>,
    pub cpu_src_s: Option<Stat>,
    pub cpu_dst_s: Option<Stat>,
    /// (CPU seconds of both hosts) / (GiB of guest RAM moved).
    pub cpu_s_per_gib: Option<Stat>,
    /// Wire bytes / the compression floor of the guest's RAM.
    pub wire_floor_multiple: Option<Stat>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HdeResult {
    /// Where the image came from.
    pub source: String,
    pub chunk: usize,
    pub dedup_cache_bytes: usize,
    /// One entry per data set (content mix).
    pub datasets: Vec<HdeDataset>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HdeDataset {
    pub name: String,
    /// Guest memory bytes in the image.
    pub image_bytes: u64,
    /// Bytes of the QEMU precopy stream built from the image.
    pub stream_bytes: u64,
    pub tiers: Vec<super::tiers::TierMeasurement>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AmstSuite {
    pub profile: String,
    pub data_bytes: u64,
    pub codec: String,
    pub points: Vec<AmstPoint>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AmstPoint {
    pub streams: u16,
    pub ok: bool,
    pub error: Option<String>,
    pub secs: f64,
    pub mbit_s: f64,
    /// mbit_s / (mbit_s at 1 stream).
    pub efficiency: f64,
    /// Source + destination agent CPU seconds.
    pub agent_cpu_s: f64,
}

impl Results {
    pub fn new(command: String) -> Results {
        Results {
            schema_version: SCHEMA_VERSION,
            dwcp_version: env!("CARGO_PKG_VERSION").to_string(),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            command,
            machine: Machine::probe(),
            compare: Vec::new(),
            hde: None,
            amst: Vec::new(),
            consensus: Vec::new(),
            consensus_fleet: Vec::new(),
            converge: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub fn corrupted_runs(&self) -> usize {
        self.compare
            .iter()
            .flat_map(|s| &s.runs)
            .filter(|r| r.outcome == Outcome::Corrupted)
            .count()
    }
}

impl Machine {
    pub fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let mem_mib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<u64>().ok())
            .map(|k| k / 1024)
            .unwrap_or(0);
        let qemu = std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "not found".into());
        Machine {
            hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
            cpu_model,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_mib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            qemu,
        }
    }
}
