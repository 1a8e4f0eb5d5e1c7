//! The test guest (tests/guest) or a user's own guest under QEMU in one of
//! the lab's namespaces: how it is started, its serial console, heartbeats
//! and self-check.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dwcp_core::qemu::Qmp;

use crate::hosts::Lab;
use crate::locate::guest_files;

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
    /// Another initramfs for the test guest (`$DWCP_GUEST_INITRD`; e.g.
    /// scripts/real-files-initrd.sh: the test guest plus real files).
    pub initrd: Option<PathBuf>,
    /// The workload rewrites only the first MiB of its fill (a hot set);
    /// 0: the whole fill, in turn.
    pub hot_mb: u64,
}

impl GuestSpec {
    /// A small test guest for tests that run many at once or one after
    /// the other (tests/tests/concurrent.rs, many_migrations.rs): 128 MiB
    /// of RAM, 24 MiB of realistic content (the most the workload fills
    /// while it leaves 48 MiB free), rewriting 2 MiB/s, checking it all
    /// the while; `seed` makes each one's content its own.
    pub fn small(seed: u64) -> GuestSpec {
        GuestSpec {
            mem_mb: 128,
            fill_mb: 24,
            dirty_mbps: 2,
            seed,
            ..GuestSpec::default()
        }
    }

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
            initrd: std::env::var_os("DWCP_GUEST_INITRD").map(PathBuf::from),
            hot_mb: 0,
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
        // no_timer_check: under TCG on a loaded host the kernel's IO-APIC
        // timer check can miss its ticks and panic at boot.
        let mut append = format!(
            "console=ttyS0 panic=-1 quiet no_timer_check dwcp.fill={} dwcp.dirty={} dwcp.seed={} dwcp.mix={}",
            spec.fill_mb, spec.dirty_mbps, spec.seed, spec.mix
        );
        if spec.hot_mb > 0 {
            append.push_str(&format!(" dwcp.hot={}", spec.hot_mb));
        }
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
            let (kernel, mut initrd) = guest_files()?;
            if let Some(i) = &spec.initrd {
                if !i.is_file() {
                    bail!("the guest initramfs {} does not exist", i.display());
                }
                initrd = i.clone();
            }
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
        // Minutes, not seconds: on a loaded 2-core host a TCG guest gets a
        // fraction of a core while it boots and fills its memory.
        self.wait_line("DWCP-READY", Duration::from_secs(180 + spec.fill_mb / 2))?;
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
