//! The two-host harness: network namespaces joined by a (possibly emulated)
//! link, a `dwcp agent` on each host, the test guest running under QEMU on
//! the source and waiting with `-incoming` on the destination, and the checks
//! that prove a migration moved the guest intact.
//!
//! Used by the end-to-end tests in `tests/tests/`, by `dwcp demo` and by the
//! benchmarks. Everything is real: namespaces, sockets, QEMU, agents.

pub mod cluster;
pub mod demo;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dwcp_core::qemu::{MigrationSetup, Qmp};
use serde_json::Value;

pub use linkem::topo::{Middle, Topology};
pub use linkem::Profile;

/// The data port agents listen on inside their namespace.
pub const AGENT_PORT: u16 = 7070;

/// Workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `dwcp` binary: `$DWCP_BIN`, else the newest of target/{release,debug}/dwcp.
pub fn dwcp_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("DWCP_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        // Running as the dwcp binary itself (demo, benchmark).
        if exe.file_name().is_some_and(|n| n == "dwcp") {
            return Ok(exe);
        }
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("dwcp"))
        .filter_map(|p| p.metadata().and_then(|m| m.modified()).ok().map(|t| (t, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        anyhow!(
            "no dwcp binary in {}: run `cargo build --release -p dwcp` (or set DWCP_BIN)",
            target.display()
        )
    })
}

/// Kernel and initramfs of the test guest (built by tests/guest/build.sh).
pub fn guest_files() -> Result<(PathBuf, PathBuf)> {
    let out = std::env::var("DWCP_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("tests/guest/out"));
    let (k, i) = (out.join("vmlinuz"), out.join("initrd.img"));
    if !k.exists() || !i.exists() {
        let st = Command::new("bash")
            .arg(workspace_root().join("tests/guest/build.sh"))
            .arg(&out)
            .status()?;
        if !st.success() || !k.exists() {
            bail!(
                "test guest missing in {} and tests/guest/build.sh failed (run `make setup`)",
                out.display()
            );
        }
    }
    Ok((k, i))
}

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// Two hosts and their agents. Dropping it stops everything it started.
pub struct Lab {
    pub topo: Topology,
    pub dir: PathBuf,
    pub src_agent: Option<AgentProc>,
    pub dst_agent: Option<AgentProc>,
    pub agent_args: Vec<String>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("dir", &self.dir).finish()
    }
}

/// A `dwcp agent` process in one namespace.
#[derive(Debug)]
pub struct AgentProc {
    pub child: Child,
    pub run_dir: PathBuf,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn control(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
    pub fn incoming(&self, name: &str) -> PathBuf {
        self.run_dir.join("incoming").join(format!("{name}.sock"))
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Lab {
    /// Creates the hosts (`tag` names them) joined by `middle`, and starts an
    /// agent on each with `agent_args` (e.g. `--streams 8`).
    pub fn new(tag: &str, middle: Middle, agent_args: &[&str]) -> Result<Lab> {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let prefix = format!("dw{}{}{tag}", pid % 100000, seq);
        let prefix: String = prefix.chars().take(24).collect();
        let dir = PathBuf::from(format!("/tmp/dwcp-lab/{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let subnet = 100 + ((pid + seq) % 150) as u8;
        let topo = Topology::create(&prefix, subnet, middle).context("creating the two hosts")?;
        let mut lab = Lab {
            topo,
            dir,
            src_agent: None,
            dst_agent: None,
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        };
        lab.start_agent(true)?;
        lab.start_agent(false)?;
        Ok(lab)
    }

    pub fn src_ns(&self) -> &str {
        &self.topo.src_ns
    }
    pub fn dst_ns(&self) -> &str {
        &self.topo.dst_ns
    }
    /// The destination agent's data address.
    pub fn dst_addr(&self) -> String {
        format!("{}:{AGENT_PORT}", self.topo.dst_ip)
    }

    /// (Re)starts the source (`src = true`) or destination agent.
    pub fn start_agent(&mut self, src: bool) -> Result<()> {
        let (ns, name, ip) = if src {
            (self.topo.src_ns.clone(), "src", self.topo.src_ip)
        } else {
            (self.topo.dst_ns.clone(), "dst", self.topo.dst_ip)
        };
        let run_dir = self.dir.join(format!("{name}-run"));
        std::fs::create_dir_all(&run_dir)?;
        let log = self.dir.join(format!("{name}-agent.log"));
        let logf = File::options().create(true).append(true).open(&log)?;
        let mut cmd = self.topo.exec(&ns, dwcp_bin()?);
        cmd.args([
            "--log",
            "info",
            "agent",
            "--listen",
            &format!("{ip}:{AGENT_PORT}"),
            "--run-dir",
        ])
        .arg(&run_dir)
        .args(&self.agent_args)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
        let child = cmd.spawn().context("starting dwcp agent")?;
        let mut a = AgentProc {
            child,
            run_dir,
            log,
        };
        let t0 = Instant::now();
        loop {
            if dwcp_core::agent::control_request(&a.control(), &serde_json::json!({"op": "ping"}))
                .is_ok()
            {
                break;
            }
            if let Some(st) = a.child.try_wait()? {
                bail!("agent on {name} exited ({st}) at start:\n{}", a.log_text());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!(
                    "agent on {name} did not answer within 10 s:\n{}",
                    a.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if src {
            self.src_agent = Some(a);
        } else {
            self.dst_agent = Some(a);
        }
        Ok(())
    }

    pub fn src_agent(&self) -> &AgentProc {
        self.src_agent.as_ref().expect("source agent running")
    }
    pub fn dst_agent(&self) -> &AgentProc {
        self.dst_agent.as_ref().expect("destination agent running")
    }
}

/// What the test guest does (kernel command-line knobs of tests/guest).
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub mem_mb: u64,
    pub fill_mb: u64,
    pub dirty_mbps: u64,
    pub seed: u64,
    pub mix: String,
    /// QEMU accelerator (`tcg` here; `kvm` where it boots Linux).
    pub accel: String,
    /// A guest of the user's own instead of the test guest: QEMU arguments
    /// (machine, `-m`, kernel or disks, ...). The harness adds `-name`,
    /// `-qmp` and, on the destination, `-incoming defer -S`. Such a guest has
    /// no workload heartbeat: readiness is `warmup_s` of running, and a
    /// migration is checked by comparing RAM and seeing the guest run on.
    pub qemu_args: Vec<String>,
    /// Seconds a user guest runs before it is migrated.
    pub warmup_s: u64,
    /// QEMU binary (`$DWCP_QEMU`, default `qemu-system-x86_64` from PATH;
    /// the patched build with `dwcp:` for libdwcp runs).
    pub qemu_bin: String,
}

impl GuestSpec {
    /// Whether this is a user guest (no workload, no heartbeats).
    pub fn is_custom(&self) -> bool {
        !self.qemu_args.is_empty()
    }

    /// A user guest's RAM size from its `-m` argument (`2048`, `2G`,
    /// `size=2G,...`), MiB.
    pub fn custom_mem_mb(args: &[String]) -> Option<u64> {
        let i = args.iter().position(|a| a == "-m")?;
        let v = args.get(i + 1)?;
        let v = v
            .split(',')
            .map(|kv| kv.strip_prefix("size=").unwrap_or(kv))
            .find(|kv| !kv.contains('='))?;
        let (num, mult) = match v.chars().last()? {
            'G' | 'g' => (&v[..v.len() - 1], 1024),
            'M' | 'm' => (&v[..v.len() - 1], 1),
            _ => (v, 1),
        };
        num.parse::<u64>().ok().map(|n| n * mult)
    }
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            mem_mb: 256,
            fill_mb: 96,
            dirty_mbps: 0,
            seed: 1,
            mix: "realistic".into(),
            accel: std::env::var("DWCP_ACCEL").unwrap_or_else(|_| "tcg".into()),
            qemu_args: Vec::new(),
            warmup_s: 20,
            qemu_bin: std::env::var("DWCP_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
        }
    }
}

/// A QEMU process running (or waiting for) the test guest.
#[derive(Debug)]
pub struct Guest {
    pub child: Child,
    pub qmp_path: PathBuf,
    pub serial: PathBuf,
    pub mem_mb: u64,
    pub dir: PathBuf,
    /// A user guest (see [`GuestSpec::qemu_args`]).
    pub custom: bool,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    /// Starts QEMU in namespace `ns`. With `incoming`, it starts paused
    /// (`-S`) with `-incoming defer`, so the caller sets capabilities first
    /// and memory can be compared before the guest resumes.
    pub fn start(
        lab: &Lab,
        ns: &str,
        role: &str,
        spec: &GuestSpec,
        incoming: bool,
    ) -> Result<Guest> {
        let dir = lab.dir.join(role);
        std::fs::create_dir_all(&dir)?;
        let qmp_path = dir.join("qmp.sock");
        let serial = dir.join("serial.log");
        let _ = std::fs::remove_file(&serial);
        let _ = std::fs::remove_file(&qmp_path);
        let append = format!(
            "console=ttyS0 panic=-1 quiet dwcp.fill={} dwcp.dirty={} dwcp.seed={} dwcp.mix={}",
            spec.fill_mb, spec.dirty_mbps, spec.seed, spec.mix
        );
        let mut cmd = lab.topo.exec(ns, &spec.qemu_bin);
        if spec.qemu_bin != "qemu-system-x86_64" {
            // A build of our own (make qemu) carries no firmware: use the
            // system's, as tests/qemu does.
            for dir in ["/usr/share/seabios", "/usr/share/qemu"] {
                if Path::new(dir).is_dir() {
                    cmd.args(["-L", dir]);
                }
            }
        }
        let mut mem_mb = spec.mem_mb;
        if spec.is_custom() {
            cmd.args(["-name", role]).args(&spec.qemu_args);
            if let Some(m) = GuestSpec::custom_mem_mb(&spec.qemu_args) {
                mem_mb = m;
            }
        } else {
            let (kernel, initrd) = guest_files()?;
            cmd.args([
                "-name",
                role,
                "-accel",
                &spec.accel,
                "-machine",
                "pc",
                "-smp",
                "1",
                "-m",
                &spec.mem_mb.to_string(),
            ])
            .args(["-nodefaults", "-no-user-config", "-display", "none"]);
            if spec.accel == "tcg" {
                cmd.args(["-cpu", "qemu64"]);
            }
            cmd.arg("-serial")
                .arg(format!("file:{}", serial.display()))
                .arg("-kernel")
                .arg(&kernel)
                .arg("-initrd")
                .arg(&initrd)
                .args(["-append", &append]);
        }
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if incoming {
            cmd.args(["-incoming", "defer", "-S"]);
        }
        let log = File::create(dir.join("qemu.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", spec.qemu_bin))?;
        let mut g = Guest {
            child,
            qmp_path,
            serial,
            mem_mb,
            dir,
            custom: spec.is_custom(),
        };
        g.wait_qmp()?;
        Ok(g)
    }

    fn wait_qmp(&mut self) -> Result<()> {
        let t0 = Instant::now();
        while !self.qmp_path.exists() {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "QEMU exited ({st}): {}",
                    std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
                );
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("QEMU did not create its QMP socket within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn qmp(&self) -> Result<Qmp> {
        Qmp::connect_retry(&self.qmp_path, Duration::from_secs(10)).context("QMP")
    }

    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the source guest is ready to migrate; returns the last
    /// heartbeat's sequence number (0 for a user guest, which has none).
    pub fn wait_ready(&mut self, spec: &GuestSpec) -> Result<u64> {
        if self.custom {
            std::thread::sleep(Duration::from_secs(spec.warmup_s));
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "the guest's QEMU exited ({st}) during its warm-up: {}",
                    tail(
                        &std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default(),
                        10
                    )
                );
            }
            return Ok(0);
        }
        self.wait_line("DWCP-READY", Duration::from_secs(60 + spec.fill_mb / 2))?;
        Ok(self.expect_heartbeats(0, 2, Duration::from_secs(20))?.seq)
    }

    /// Waits until the serial console shows `pat`; returns the line. Fails
    /// at once if QEMU has exited.
    pub fn wait_line(&self, pat: &str, timeout: Duration) -> Result<String> {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.serial_text().lines().find(|l| l.contains(pat)) {
                return Ok(l.to_string());
            }
            if !self.alive() {
                bail!(
                    "QEMU exited before {pat:?} appeared: {}",
                    tail(
                        &std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default(),
                        10
                    )
                );
            }
            if t0.elapsed() > timeout {
                bail!(
                    "no {pat:?} on the serial console after {timeout:?}; it shows:\n{}",
                    tail(&self.serial_text(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the QEMU process still runs (not gone, not a zombie).
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().to_string()))
            .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
    }

    /// Heartbeats seen so far.
    pub fn heartbeats(&self) -> Vec<Heartbeat> {
        self.serial_text()
            .lines()
            .filter_map(Heartbeat::parse)
            .collect()
    }

    /// Lines where the guest's self-check reported corrupted memory.
    pub fn errors(&self) -> Vec<String> {
        self.serial_text()
            .lines()
            .filter(|l| {
                l.contains("DWCP-ERROR")
                    || l.contains("DWCP-FATAL")
                    || l.contains("Kernel panic")
                    || l.contains("Oops")
            })
            .map(str::to_string)
            .collect()
    }

    /// Waits for `n` new heartbeats after `after_seq`, all with errors=0.
    pub fn expect_heartbeats(
        &self,
        after_seq: u64,
        n: u64,
        timeout: Duration,
    ) -> Result<Heartbeat> {
        let t0 = Instant::now();
        loop {
            let hbs = self.heartbeats();
            if let Some(bad) = hbs.iter().find(|h| h.errors > 0) {
                bail!(
                    "guest reports {} memory errors: {:?}",
                    bad.errors,
                    self.errors()
                );
            }
            let errs = self.errors();
            if !errs.is_empty() {
                bail!("guest reports corruption: {errs:?}");
            }
            if let Some(last) = hbs.last() {
                if last.seq >= after_seq + n {
                    return Ok(last.clone());
                }
            }
            if t0.elapsed() > timeout {
                bail!(
                    "guest printed no heartbeat past {after_seq} + {n} within {timeout:?}:\n{}",
                    tail(&self.serial_text(), 10)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// One `DWCP-HB` line of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    pub t_ms: u64,
    pub errors: u64,
}

impl Heartbeat {
    pub fn parse(line: &str) -> Option<Heartbeat> {
        let rest = &line[line.find("DWCP-HB ")? + 8..];
        let mut hb = Heartbeat {
            seq: 0,
            t_ms: 0,
            errors: 0,
        };
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.trim().parse().ok()?;
            match k {
                "seq" => hb.seq = v,
                "t_ms" => hb.t_ms = v,
                "errors" => hb.errors = v,
                _ => {}
            }
        }
        Some(hb)
    }
}

/// Longest gap between consecutive heartbeats in guest time (ms): the pause
/// the guest itself saw around switchover.
pub fn longest_heartbeat_gap(hbs: &[Heartbeat]) -> u64 {
    hbs.windows(2)
        .map(|w| w[1].t_ms.saturating_sub(w[0].t_ms))
        .max()
        .unwrap_or(0)
}

/// Result of comparing the two guests' RAM.
#[derive(Debug, Clone)]
pub struct MemoryCheck {
    pub bytes: u64,
    pub differing_pages: u64,
    pub first_difference: Option<u64>,
}

/// Dumps guest-physical RAM of both (stopped) guests with `pmemsave` and
/// compares them page by page. Both must be paused: the source after
/// completion (`postmigrate`), the destination started with `-S`.
pub fn compare_memory(src: &Guest, dst: &Guest, scratch: &Path) -> Result<MemoryCheck> {
    let bytes = src.mem_mb << 20;
    let dumps = [scratch.join("src.ram"), scratch.join("dst.ram")];
    for (g, path) in [src, dst].iter().zip(&dumps) {
        let mut q = g.qmp()?;
        let st = q.status()?;
        if st == "running" {
            bail!(
                "{} is running; memory can only be compared on stopped guests",
                g.dir.display()
            );
        }
        let _ = std::fs::remove_file(path);
        let out = q.hmp(&format!("pmemsave 0 {bytes} \"{}\"", path.display()))?;
        if !out.trim().is_empty() {
            bail!("pmemsave: {out}");
        }
    }
    let mut a = BufReader::with_capacity(1 << 20, File::open(&dumps[0])?);
    let mut b = BufReader::with_capacity(1 << 20, File::open(&dumps[1])?);
    let (mut pa, mut pb) = (vec![0u8; 4096], vec![0u8; 4096]);
    let mut check = MemoryCheck {
        bytes,
        differing_pages: 0,
        first_difference: None,
    };
    let mut off = 0u64;
    while off < bytes {
        a.read_exact(&mut pa).context("reading source dump")?;
        b.read_exact(&mut pb).context("reading destination dump")?;
        if pa != pb {
            check.differing_pages += 1;
            check.first_difference.get_or_insert(off);
        }
        off += 4096;
    }
    for d in &dumps {
        let _ = std::fs::remove_file(d);
    }
    Ok(check)
}

/// How to migrate in [`run_migration`].
#[derive(Debug, Clone)]
pub struct MigrationSpec {
    pub name: String,
    pub streams: u16,
    pub codec: String,
    pub multifd: Option<u32>,
    pub return_path: bool,
    pub extra: Vec<String>,
    pub timeout_s: u64,
}

impl Default for MigrationSpec {
    fn default() -> Self {
        MigrationSpec {
            name: "vm".into(),
            streams: 4,
            codec: "lz4".into(),
            multifd: None,
            return_path: true,
            extra: Vec::new(),
            timeout_s: 300,
        }
    }
}

/// A source guest booted and ready, and a destination waiting for it.
#[derive(Debug)]
pub struct GuestPair {
    pub src: Guest,
    pub dst: Guest,
    pub ready_seq: u64,
}

/// Boots the source guest (waits for its workload to be ready) and starts the
/// destination QEMU listening on the destination agent's incoming socket.
pub fn boot_pair(lab: &Lab, spec: &GuestSpec, mig: &MigrationSpec) -> Result<GuestPair> {
    let mut src = Guest::start(lab, lab.src_ns(), "src", spec, false)?;
    let dst = Guest::start(lab, lab.dst_ns(), "dst", spec, true)?;
    let ready_seq = src.wait_ready(spec)?;
    let setup = MigrationSetup {
        multifd_channels: mig.multifd,
        return_path: mig.return_path,
        ..Default::default()
    };
    let mut dq = dst.qmp()?;
    setup.apply(&mut dq, true)?;
    let incoming = lab.dst_agent().incoming(&mig.name);
    std::fs::create_dir_all(incoming.parent().expect("parent"))?;
    dq.execute(
        "migrate-incoming",
        Some(serde_json::json!({"uri": format!("unix:{}", incoming.display())})),
    )?;
    drop(dq);
    let t0 = Instant::now();
    while !incoming.exists() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("destination QEMU did not listen on {}", incoming.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(GuestPair {
        src,
        dst,
        ready_seq,
    })
}

/// Runs `dwcp migrate` on the source host; returns its JSON result, or the
/// command's error output.
pub fn dwcp_migrate(lab: &Lab, pair: &GuestPair, mig: &MigrationSpec) -> Result<Value> {
    let mut cmd = Command::new(dwcp_bin()?);
    cmd.args(["--log", "warn", "migrate", "--json", "--qmp"])
        .arg(&pair.src.qmp_path)
        .args(["--to", &lab.dst_addr(), "--name", &mig.name, "--agent"])
        .arg(lab.src_agent().control())
        .args([
            "--streams",
            &mig.streams.to_string(),
            "--codec",
            &mig.codec,
            "--timeout",
            &mig.timeout_s.to_string(),
        ]);
    if let Some(n) = mig.multifd {
        cmd.args(["--multifd", &n.to_string()]);
    }
    if mig.return_path {
        cmd.arg("--return-path");
    }
    cmd.args(&mig.extra);
    let out = cmd.output().context("running dwcp migrate")?;
    if !out.status.success() {
        bail!(
            "dwcp migrate failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("dwcp migrate --json output")
}

/// What a verified migration showed.
#[derive(Debug)]
pub struct Verified {
    pub result: Value,
    pub memory: MemoryCheck,
    pub pause_ms: u64,
}

/// After a completed migration: the source is stopped, the destination's RAM
/// equals the source's, and the guest runs on the destination (new heartbeats,
/// no self-check errors).
pub fn verify(pair: &GuestPair, result: Value, scratch: &Path) -> Result<Verified> {
    let src_state = pair.src.qmp()?.status()?;
    if src_state != "postmigrate" {
        bail!("source guest is {src_state:?} after migration, expected postmigrate");
    }
    // QEMU serves one QMP client at a time: keep each connection short.
    let st = pair.dst.qmp()?.status()?;
    if st != "paused" {
        bail!("destination is {st:?} after migration, expected paused (-S)");
    }
    let memory = compare_memory(&pair.src, &pair.dst, scratch)?;
    if memory.differing_pages > 0 {
        bail!(
            "destination RAM differs from the source in {} pages (first at {:#x})",
            memory.differing_pages,
            memory.first_difference.unwrap_or(0)
        );
    }
    if pair.src.custom {
        // No heartbeat to watch: the destination must run on and the source
        // stay stopped.
        pair.dst.qmp()?.execute("cont", None)?;
        std::thread::sleep(Duration::from_secs(2));
        let st = pair.dst.qmp()?.status()?;
        if st != "running" {
            bail!("destination is {st:?} 2 s after cont, expected running");
        }
        if pair.src.qmp()?.status()? == "running" {
            bail!("source guest is running again: the guest would run twice");
        }
        return Ok(Verified {
            result,
            memory,
            pause_ms: 0,
        });
    }
    let last_src = pair.src.heartbeats().last().map(|h| h.seq).unwrap_or(0);
    pair.dst.qmp()?.execute("cont", None)?;
    pair.dst
        .expect_heartbeats(last_src, 3, Duration::from_secs(30))?;
    if pair.src.qmp()?.status()? == "running" {
        bail!("source guest is running again: the guest would run twice");
    }
    let mut all = pair.src.heartbeats();
    all.extend(
        pair.dst
            .heartbeats()
            .into_iter()
            .filter(|h| h.seq > last_src),
    );
    Ok(Verified {
        result,
        memory,
        pause_ms: longest_heartbeat_gap(&all),
    })
}

/// Scratch directory for RAM dumps (tmpfs when available).
pub fn scratch_dir(lab: &Lab) -> Result<PathBuf> {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        lab.dir.clone()
    };
    let d = base.join(format!("dwcp-{}", lab.topo.prefix));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Reads the lines of a file that contain `pat` (agent logs).
pub fn grep(path: &Path, pat: &str) -> Vec<String> {
    match File::open(path) {
        Ok(f) => BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains(pat))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Replaces the destination QEMU with a fresh one waiting on the agent's
/// incoming socket (after a failed attempt, QEMU's incoming side is spent).
pub fn restart_destination(
    lab: &Lab,
    pair: &mut GuestPair,
    spec: &GuestSpec,
    mig: &MigrationSpec,
) -> Result<()> {
    let _ = pair.dst.child.kill();
    let _ = pair.dst.child.wait();
    let incoming = lab.dst_agent().incoming(&mig.name);
    let _ = std::fs::remove_file(&incoming);
    pair.dst = Guest::start(lab, lab.dst_ns(), "dst", spec, true)?;
    let setup = MigrationSetup {
        multifd_channels: mig.multifd,
        return_path: mig.return_path,
        ..Default::default()
    };
    let mut dq = pair.dst.qmp()?;
    setup.apply(&mut dq, true)?;
    dq.execute(
        "migrate-incoming",
        Some(serde_json::json!({"uri": format!("unix:{}", incoming.display())})),
    )?;
    let t0 = Instant::now();
    while !incoming.exists() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("destination QEMU did not listen on {}", incoming.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A TCP proxy inside the destination namespace, listening on
/// `dst_ip:listen_port` and forwarding to the destination agent. On the
/// first connection it flips one bit at byte `flip_at` (counted from the
/// start of the connection, so past the handshake when large) when given.
pub fn spawn_proxy(lab: &Lab, listen_port: u16, flip_at: Option<u64>) -> Result<()> {
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listen = format!("{}:{listen_port}", lab.topo.dst_ip);
    let to = lab.dst_addr();
    let (tx, rx) = std::sync::mpsc::channel();
    // The listener is created inside the namespace; the thread keeps serving
    // until the namespace is torn down with the lab.
    let _h = lab.topo.spawn_in(lab.dst_ns(), move || {
        let l = match TcpListener::bind(&listen) {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        for (i, c) in l.incoming().flatten().enumerate() {
            let Ok(up) = TcpStream::connect(&to) else {
                return;
            };
            let (mut c2, mut up2) = (c.try_clone().expect("dup"), up.try_clone().expect("dup"));
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut c2);
                let _ = c2.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut c, mut up) = (c, up);
                let mut buf = vec![0u8; 64 << 10];
                let mut off = 0u64;
                loop {
                    let n = match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let (0, Some(at)) = (i, flip_at) {
                        if off <= at && at < off + n as u64 {
                            buf[(at - off) as usize] ^= 0x04;
                        }
                    }
                    off += n as u64;
                    if up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = up.shutdown(Shutdown::Write);
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))?
        .map_err(|e| anyhow!("proxy bind: {e}"))
}

#[cfg(test)]
mod tests {
    use super::GuestSpec;

    #[test]
    fn custom_guest_memory_from_its_m_argument() {
        let m = |a: &[&str]| {
            GuestSpec::custom_mem_mb(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(m(&["-machine", "q35", "-m", "2048"]), Some(2048));
        assert_eq!(m(&["-m", "2G"]), Some(2048));
        assert_eq!(m(&["-m", "size=512M,slots=2,maxmem=4G"]), Some(512));
        assert_eq!(m(&["-smp", "2"]), None);
        assert_eq!(m(&["-m"]), None);
        assert_eq!(m(&["-m", "lots"]), None);
    }
}
