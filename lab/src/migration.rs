//! One migration in the lab: a booted source and a waiting destination,
//! `dwcp migrate` between them, and the checks that prove the guest moved
//! intact (identical RAM, heartbeats going on at the destination).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dwcp_core::qemu::MigrationSetup;
use serde_json::Value;

use crate::guest::{longest_heartbeat_gap, Guest, GuestSpec};
use crate::hosts::{AgentProc, Lab, AGENT_PORT, PLAIN_AGENT_PORT};
use crate::locate::dwcp_bin;

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
    compare_memory_keeping(src, dst, scratch, None)
}

/// [`compare_memory`], keeping the source's dump at `keep` (e.g. for
/// `dwcp benchmark compare`'s compression floor) instead of deleting it.
pub fn compare_memory_keeping(
    src: &Guest,
    dst: &Guest,
    scratch: &Path,
    keep: Option<&Path>,
) -> Result<MemoryCheck> {
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
    drop((a, b));
    if let Some(k) = keep {
        std::fs::rename(&dumps[0], k)
            .with_context(|| format!("keeping the source's RAM dump at {}", k.display()))?;
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
    /// The peer the destination agent expects the migration from (`dwcp
    /// expect NAME --from PEER`); `None`: any peer the CA signed.
    pub expect_from: Option<String>,
    /// Through the clear-text agent pair ([`Lab::start_plain_agents`]).
    pub plain: bool,
    /// From the lab's destination host back to its source host: the
    /// destination's agent carries the migration out, the source's takes it
    /// in (a guest migrated there and back, [`start_incoming`]).
    pub reverse: bool,
}

impl MigrationSpec {
    /// The agents of this migration: (the one on the guest's host, the
    /// one it goes to) and the data address of the latter.
    fn ends<'a>(&self, lab: &'a Lab) -> (&'a AgentProc, &'a AgentProc, String) {
        let (s, d) = lab.agents(self.plain);
        if self.reverse {
            let port = if self.plain {
                PLAIN_AGENT_PORT
            } else {
                AGENT_PORT
            };
            (d, s, format!("{}:{port}", lab.topo.src_ip))
        } else {
            (s, d, lab.dst_addr_of(self.plain))
        }
    }
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
            expect_from: None,
            plain: false,
            reverse: false,
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

impl GuestPair {
    /// The pair for the next migration of the guest: it runs where the
    /// last one took it (`dst`), and goes to `next` (a QEMU waiting for
    /// it, [`start_incoming`]); the QEMU it left is done and stopped.
    pub fn turned_around(self, next: Guest) -> GuestPair {
        let GuestPair {
            src, dst: running, ..
        } = self;
        drop(src);
        GuestPair {
            src: running,
            dst: next,
            ready_seq: 0,
        }
    }
}

/// Boots the source guest (waits for its workload to be ready) and starts the
/// destination QEMU listening on the destination agent's incoming socket.
pub fn boot_pair(lab: &Lab, spec: &GuestSpec, mig: &MigrationSpec) -> Result<GuestPair> {
    boot_pair_as(lab, spec, mig, "")
}

/// [`boot_pair`] for one of several pairs in the same lab at once: the
/// guests' directories (and QEMU `-name`s) are `src{tag}` and `dst{tag}`,
/// so pairs with different tags (and different [`MigrationSpec::name`]s)
/// run side by side.
pub fn boot_pair_as(
    lab: &Lab,
    spec: &GuestSpec,
    mig: &MigrationSpec,
    tag: &str,
) -> Result<GuestPair> {
    let mut src = Guest::start(lab, lab.src_ns(), &format!("src{tag}"), spec, false)?;
    let dst = start_incoming(lab, &format!("dst{tag}"), spec, mig)?;
    let ready_seq = src.wait_ready(spec)?;
    Ok(GuestPair {
        src,
        dst,
        ready_seq,
    })
}

/// Starts a QEMU (directory `role`) waiting for migration `mig` on the
/// host it goes to (the lab's destination, or its source when
/// [`MigrationSpec::reverse`]): its capabilities set, the agent there told
/// to expect it, listening on that agent's incoming socket.
pub fn start_incoming(
    lab: &Lab,
    role: &str,
    spec: &GuestSpec,
    mig: &MigrationSpec,
) -> Result<Guest> {
    let (_, to_agent, _) = mig.ends(lab);
    let ns = if mig.reverse {
        lab.src_ns()
    } else {
        lab.dst_ns()
    };
    let dst = Guest::start(lab, ns, role, spec, true)?;
    let setup = MigrationSetup {
        multifd_channels: mig.multifd,
        return_path: mig.return_path,
        auto_converge: false,
        ..Default::default()
    };
    let mut dq = dst.qmp()?;
    setup.apply(&mut dq, true)?;
    let incoming = to_agent.incoming(&mig.name);
    std::fs::create_dir_all(incoming.parent().expect("parent"))?;
    let _ = std::fs::remove_file(&incoming);
    let mut req = serde_json::json!({"op": "expect", "name": mig.name});
    if let Some(f) = &mig.expect_from {
        req["from"] = serde_json::json!(f);
    }
    dwcp_core::agent::control_request(&to_agent.control(), &req)
        .map_err(|e| anyhow::anyhow!("expect {} on {}: {e}", mig.name, to_agent.log.display()))?;
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
    Ok(dst)
}

/// Runs `dwcp migrate` on the source host; returns its JSON result, or the
/// command's error output.
pub fn dwcp_migrate(lab: &Lab, pair: &GuestPair, mig: &MigrationSpec) -> Result<Value> {
    let (from_agent, _, to) = mig.ends(lab);
    let mut cmd = Command::new(dwcp_bin()?);
    cmd.args(["--log", "warn", "migrate", "--json", "--qmp"])
        .arg(&pair.src.qmp_path)
        .args(["--to", &to, "--name", &mig.name, "--agent"])
        .arg(from_agent.control())
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
    verify_keeping(pair, result, scratch, None)
}

/// [`verify`], keeping the source's RAM dump at `keep` when RAM compares
/// equal ([`compare_memory_keeping`]).
pub fn verify_keeping(
    pair: &GuestPair,
    result: Value,
    scratch: &Path,
    keep: Option<&Path>,
) -> Result<Verified> {
    let src_state = pair.src.qmp()?.status()?;
    if src_state != "postmigrate" {
        bail!("source guest is {src_state:?} after migration, expected postmigrate");
    }
    // QEMU serves one QMP client at a time: keep each connection short.
    let st = pair.dst.qmp()?.status()?;
    if st != "paused" {
        bail!("destination is {st:?} after migration, expected paused (-S)");
    }
    let memory = compare_memory_keeping(&pair.src, &pair.dst, scratch, keep)?;
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
    pair.dst = start_incoming(lab, "dst", spec, mig)?;
    Ok(())
}
