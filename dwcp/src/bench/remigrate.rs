//! `dwcp benchmark remigrate`: a guest migrated to the other host and, after
//! a while running there, back (docs/hde.md, layer 3). DWCP's way back
//! sends only the pages whose content the first host did not keep; QEMU's
//! own channels send the guest again. Both trips of every run are verified
//! (RAM page by page, the guest running on).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use dwcp_core::qemu::{self, MigrationSetup};
use dwcp_lab::*;

use super::compare::{contender, open_lab, Kind};
use super::{OutputArgs, Progress};

#[derive(Args, Debug)]
pub struct RemigrateArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Link profile: dc (unshaped), wan, internet, lossy, lan100 (100 Mbit/s, no delay).
    #[arg(long, default_value = "internet")]
    pub profile: String,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 2048)]
    pub guest_mem: u64,
    /// Realistic content the guest workload fills (and rewrites), MiB.
    #[arg(long, default_value_t = 512)]
    pub fill: u64,
    /// Guest dirty rate, MiB/s.
    #[arg(long, default_value_t = 16)]
    pub dirty_rate: u64,
    /// The guest rewrites only the first MiB of its content (a hot set, as
    /// most guests have); 0: all of it in turn (the test guest's default).
    #[arg(long, default_value_t = 0)]
    pub hot: u64,
    /// Seconds the guest runs on the other host before it comes back.
    #[arg(long, default_value_t = 60)]
    pub back_after: u64,
    /// Contenders: dwcp (or dwcp-TIER) through the agents, with `dwcp
    /// migrate`; qemu-tcp, qemu-multifd, qemu-multifd-zstd.
    #[arg(long, value_delimiter = ',', default_value = "dwcp,qemu-multifd-zstd")]
    pub contenders: Vec<String>,
    /// Runs per contender (interleaved).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Per-migration timeout, seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Another initramfs for the test guest (e.g. one with real files,
    /// scripts/real-files-initrd.sh).
    #[arg(long, env = "DWCP_GUEST_INITRD")]
    pub guest_initrd: Option<std::path::PathBuf>,
    /// QEMU binary for every contender.
    #[arg(long, env = "DWCP_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: String,
}

/// One migration of a run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Trip {
    pub total_time_ms: u64,
    pub downtime_ms: Option<u64>,
    /// Bytes on the link: DWCP's session wire bytes, QEMU's RAM bytes
    /// transferred.
    pub wire_bytes: u64,
    /// DWCP: pages sent as references to the destination's kept copy.
    pub pages_kept: Option<u64>,
    pub pages_seen: Option<u64>,
    pub memory_verified: bool,
    /// DWCP: `dwcp migrate --json`'s per-second progress (`eta.trace`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RemigrateRun {
    pub contender: String,
    pub repeat: usize,
    pub there: Option<Trip>,
    pub back: Option<Trip>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RemigrateSuite {
    pub command: String,
    pub profile: String,
    pub guest_mem_mb: u64,
    pub fill_mb: u64,
    pub dirty_mbps: u64,
    /// MiB of the content the guest rewrites (0: all of it).
    pub hot_mb: u64,
    pub back_after_s: u64,
    pub runs: Vec<RemigrateRun>,
}

/// How a contender migrates.
enum How {
    Dwcp(Option<String>),
    Native(MigrationSetup),
}

pub fn run(a: &RemigrateArgs, command: String, p: &Progress) -> Result<RemigrateSuite> {
    let hows: Vec<(String, How)> = a
        .contenders
        .iter()
        .map(|c| {
            let how = match contender(c)? {
                Kind::Dwcp {
                    codec,
                    multifd: None,
                    plain: false,
                    off,
                    ..
                } if off.iter().all(|o| *o == "+nokeep") => How::Dwcp(codec),
                Kind::Native(s) if s.tls_dir.is_none() && !s.xbzrle => How::Native(s),
                _ => bail!("contender {c:?}: remigrate takes dwcp, dwcp-TIER, qemu-tcp, qemu-multifd or qemu-multifd-zstd"),
            };
            Ok((c.clone(), how))
        })
        .collect::<Result<_>>()?;
    if a.fill > a.guest_mem / 2 {
        bail!(
            "--fill {} MiB: at most half of --guest-mem ({} MiB)",
            a.fill,
            a.guest_mem
        );
    }
    let lab = open_lab("remigrate", "remig", &a.profile, &[], p)?;
    let scratch = scratch_dir(&lab)?;
    let spec = GuestSpec {
        mem_mb: a.guest_mem,
        fill_mb: a.fill,
        dirty_mbps: a.dirty_rate,
        qemu_bin: a.qemu.clone(),
        initrd: a.guest_initrd.clone(),
        hot_mb: a.hot,
        ..Default::default()
    };
    let mut runs = Vec::new();
    let mut seq = 0;
    for k in 0..a.repeat {
        for (name, how) in &hows {
            seq += 1;
            p.set_message(format!(
                "remigrate {}: {name} ({}/{})",
                a.profile,
                k + 1,
                a.repeat
            ));
            let mut run = RemigrateRun {
                contender: name.clone(),
                repeat: k,
                there: None,
                back: None,
                error: None,
            };
            let r = match how {
                How::Dwcp(codec) => {
                    dwcp_run(&lab, &spec, a, codec.as_deref(), seq, &scratch, &mut run, p)
                }
                How::Native(setup) => native_run(&lab, &spec, a, setup, seq, &scratch, &mut run, p),
            };
            if let Err(e) = r {
                let msg = format!("{e:#}");
                if msg.contains("differ") {
                    bail!("{name} CORRUPTED the guest: {msg}");
                }
                p.println(format!("    {name}: failed: {msg}"));
                run.error = Some(msg);
            }
            p.println(line(&run));
            runs.push(run);
            p.inc();
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(RemigrateSuite {
        command,
        profile: a.profile.clone(),
        guest_mem_mb: a.guest_mem,
        fill_mb: a.fill,
        dirty_mbps: a.dirty_rate,
        hot_mb: a.hot,
        back_after_s: a.back_after,
        runs,
    })
}

fn line(r: &RemigrateRun) -> String {
    match (&r.there, &r.back) {
        (Some(t), Some(b)) => format!(
            "    {}: there {:.2} s, {:.1} MB; back {:.2} s, {:.1} MB ({:.1} % of there){}",
            r.contender,
            t.total_time_ms as f64 / 1e3,
            t.wire_bytes as f64 / 1e6,
            b.total_time_ms as f64 / 1e3,
            b.wire_bytes as f64 / 1e6,
            100.0 * b.wire_bytes as f64 / t.wire_bytes.max(1) as f64,
            b.pages_kept
                .map(|k| format!(", {k} pages as references"))
                .unwrap_or_default()
        ),
        _ => format!("    {}: incomplete", r.contender),
    }
}

fn verified(pair: &GuestPair, result: Value, scratch: &Path) -> Result<()> {
    let v = verify(pair, result, scratch)?;
    if v.memory.differing_pages != 0 {
        bail!("{} pages differ", v.memory.differing_pages);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn dwcp_run(
    lab: &Lab,
    spec: &GuestSpec,
    a: &RemigrateArgs,
    codec: Option<&str>,
    seq: usize,
    scratch: &Path,
    run: &mut RemigrateRun,
    p: &Progress,
) -> Result<()> {
    let there = MigrationSpec {
        name: format!("rm{seq}"),
        codec: codec.unwrap_or("auto").to_string(),
        timeout_s: a.timeout,
        ..Default::default()
    };
    let trip = |r: &Value| Trip {
        total_time_ms: r["total_time_ms"].as_u64().unwrap_or(0),
        downtime_ms: r["downtime_ms"].as_u64(),
        wire_bytes: r["wire_bytes"].as_u64().unwrap_or(0),
        pages_kept: r["session"]["pages_kept"].as_u64(),
        pages_seen: r["session"]["pages_seen"].as_u64(),
        memory_verified: true,
        progress: r.pointer("/eta/trace").cloned(),
    };
    let pair = boot_pair(lab, spec, &there).context("booting the guest")?;
    let r = dwcp_migrate(lab, &pair, &there).context("there")?;
    if r["status"] != "completed" {
        bail!("there: {r}");
    }
    verified(&pair, r.clone(), scratch).context("verifying there")?;
    run.there = Some(trip(&r));
    p.set_message(format!(
        "remigrate {}: {} waits {} s",
        a.profile, run.contender, a.back_after
    ));
    std::thread::sleep(Duration::from_secs(a.back_after));
    let back = MigrationSpec {
        reverse: true,
        ..there.clone()
    };
    let dst = start_incoming(lab, "back", spec, &back).context("incoming QEMU for the way back")?;
    let pair = pair.turned_around(dst);
    let r = dwcp_migrate(lab, &pair, &back).context("back")?;
    if r["status"] != "completed" {
        bail!("back: {r}");
    }
    verified(&pair, r.clone(), scratch).context("verifying back")?;
    run.back = Some(trip(&r));
    Ok(())
}

/// One trip with QEMU's own channel: `to` listens on `port` at `ip`.
fn native_trip(
    from: &Guest,
    to: &Guest,
    setup: &MigrationSetup,
    ip: std::net::Ipv4Addr,
    port: u16,
    timeout: u64,
) -> Result<qemu::MigrationResult> {
    let uri = format!("tcp:{ip}:{port}");
    let mut dq = to.qmp()?;
    setup
        .apply(&mut dq, true)
        .context("destination capabilities")?;
    dq.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    drop(dq);
    std::thread::sleep(Duration::from_millis(200));
    let mut sq = from.qmp()?;
    setup.apply(&mut sq, false).context("source capabilities")?;
    let t0 = Instant::now();
    let r = qemu::migrate(&mut sq, &uri, Duration::from_secs(timeout), |_, _| None)
        .map_err(|e| anyhow!("{e} after {:.1} s", t0.elapsed().as_secs_f64()))?;
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
fn native_run(
    lab: &Lab,
    spec: &GuestSpec,
    a: &RemigrateArgs,
    setup: &MigrationSetup,
    seq: usize,
    scratch: &Path,
    run: &mut RemigrateRun,
    p: &Progress,
) -> Result<()> {
    let port = 7600 + (seq % 300) as u16;
    let trip = |r: &qemu::MigrationResult| Trip {
        total_time_ms: r.total_time_ms,
        downtime_ms: Some(r.downtime_ms),
        wire_bytes: r.ram_transferred,
        pages_kept: None,
        pages_seen: None,
        memory_verified: true,
        progress: None,
    };
    let mut src = Guest::start(lab, lab.src_ns(), "src", spec, false)?;
    let dst = Guest::start(lab, lab.dst_ns(), "dst", spec, true)?;
    let ready_seq = src.wait_ready(spec)?;
    let r = native_trip(&src, &dst, setup, lab.topo.dst_ip, port, a.timeout).context("there")?;
    let pair = GuestPair {
        src,
        dst,
        ready_seq,
    };
    verified(&pair, serde_json::to_value(&r)?, scratch).context("verifying there")?;
    run.there = Some(trip(&r));
    p.set_message(format!(
        "remigrate {}: {} waits {} s",
        a.profile, run.contender, a.back_after
    ));
    std::thread::sleep(Duration::from_secs(a.back_after));
    let home = Guest::start(lab, lab.src_ns(), "back", spec, true)?;
    let pair = pair.turned_around(home);
    let r = native_trip(
        &pair.src,
        &pair.dst,
        setup,
        lab.topo.src_ip,
        port + 300,
        a.timeout,
    )
    .context("back")?;
    verified(&pair, serde_json::to_value(&r)?, scratch).context("verifying back")?;
    run.back = Some(trip(&r));
    Ok(())
}

/// The summary table: medians per contender.
pub fn summary(s: &RemigrateSuite) -> String {
    let mut out = format!(
        "remigrate --profile {}: {} MiB guest, {} MiB content, {} MiB/s rewritten in {}, back after {} s\n\n\
         | contender | runs | there s | there MB | back s | back MB | back / there bytes | pages as references |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        s.profile,
        s.guest_mem_mb,
        s.fill_mb,
        s.dirty_mbps,
        if s.hot_mb > 0 {
            format!("its first {} MiB", s.hot_mb)
        } else {
            "all of it".to_string()
        },
        s.back_after_s
    );
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        }
    };
    let mut names: Vec<&str> = Vec::new();
    for r in &s.runs {
        if !names.contains(&r.contender.as_str()) {
            names.push(&r.contender);
        }
    }
    for n in names {
        let ok: Vec<(&Trip, &Trip)> = s
            .runs
            .iter()
            .filter(|r| r.contender == n)
            .filter_map(|r| Some((r.there.as_ref()?, r.back.as_ref()?)))
            .collect();
        let m = |f: &dyn Fn(&(&Trip, &Trip)) -> f64| median(ok.iter().map(f).collect());
        out.push_str(&format!(
            "| {n} | {} | {:.2} | {:.1} | {:.2} | {:.1} | {:.1} % | {} |\n",
            ok.len(),
            m(&|t| t.0.total_time_ms as f64 / 1e3),
            m(&|t| t.0.wire_bytes as f64 / 1e6),
            m(&|t| t.1.total_time_ms as f64 / 1e3),
            m(&|t| t.1.wire_bytes as f64 / 1e6),
            m(&|t| 100.0 * t.1.wire_bytes as f64 / t.0.wire_bytes.max(1) as f64),
            if ok.iter().any(|t| t.1.pages_kept.is_some()) {
                format!("{:.0}", m(&|t| t.1.pages_kept.unwrap_or(0) as f64))
            } else {
                "-".into()
            }
        ));
    }
    out
}
