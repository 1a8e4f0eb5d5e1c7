//! `dwcp demo` (and `make demo`): boots the test guest on an emulated source
//! host, migrates it through DWCP to the destination host, proves the RAM
//! arrived identical and the guest runs there, then does the same with QEMU's
//! own `tcp:` channel on the same link for comparison, and prints both.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use dwcp_core::qemu::{self, MigrationSetup};
use linkem::Profile;

use crate::guest::{Guest, GuestSpec};
use crate::hosts::{scratch_dir, Lab};
use crate::locate::DataDirArgs;
use crate::migration::{boot_pair, dwcp_migrate, verify, GuestPair, MigrationSpec, Verified};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Link profile between the hosts: dc, wan, internet, lossy, lan100 (100 Mbit/s, no delay).
    #[arg(long, default_value = "dc")]
    pub profile: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem: u64,
    /// RAM the guest workload fills with realistic content, MiB.
    #[arg(long, default_value_t = 256)]
    pub fill: u64,
    /// Rate at which the guest rewrites memory during migration, MiB/s.
    #[arg(long, default_value_t = 8)]
    pub dirty: u64,
    /// DWCP streams.
    #[arg(long, default_value_t = 4)]
    pub streams: u16,
    /// DWCP codec: auto (the default: raw on datacenter paths, lz4 and up
    /// otherwise) or a fixed tier (raw, none, lz4, zstd, zstd:N).
    #[arg(long, default_value = "auto")]
    pub codec: String,
    /// Skip the QEMU-native comparison run.
    #[arg(long)]
    pub no_compare: bool,
    #[command(flatten)]
    pub data: DataDirArgs,
}

fn profile(name: &str) -> Result<Profile> {
    name.parse::<Profile>()
        .map_err(|e| anyhow::anyhow!("--profile {name:?}: {e}"))
}

/// Migrates with QEMU's own `tcp:` channel between the hosts.
pub fn native_run(
    lab: &Lab,
    spec: &GuestSpec,
    setup: &MigrationSetup,
    port: u16,
) -> Result<(qemu::MigrationResult, Verified)> {
    let mig = MigrationSpec {
        return_path: setup.return_path,
        multifd: setup.multifd_channels,
        ..Default::default()
    };
    let src = Guest::start(lab, lab.src_ns(), "native-src", spec, false)?;
    let dst = Guest::start(lab, lab.dst_ns(), "native-dst", spec, true)?;
    src.wait_line("DWCP-READY", Duration::from_secs(60 + spec.fill_mb / 2))?;
    let hb = src.expect_heartbeats(0, 2, Duration::from_secs(20))?;
    let uri = format!("tcp:{}:{port}", lab.topo.dst_ip);
    let mut dq = dst.qmp()?;
    setup.apply(&mut dq, true)?;
    dq.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    drop(dq);
    std::thread::sleep(Duration::from_millis(200));
    let mut sq = src.qmp()?;
    setup.apply(&mut sq, false)?;
    let r = qemu::migrate(&mut sq, &uri, Duration::from_secs(mig.timeout_s), |_, _| {
        None
    })?;
    drop(sq);
    let pair = GuestPair {
        src,
        dst,
        ready_seq: hb.seq,
    };
    let v = verify(&pair, serde_json::to_value(&r)?, &scratch_dir(lab)?)?;
    Ok((r, v))
}

pub fn run(a: DemoArgs) -> Result<()> {
    a.data.apply();
    let prof = profile(&a.profile)?;
    if a.fill + 48 > a.mem {
        bail!(
            "--fill {} leaves less than 48 MiB of the {} MiB guest free",
            a.fill,
            a.mem
        );
    }
    println!(
        "== DWCP demo: {} MiB guest ({} MiB realistic content, dirtying {} MiB/s), link profile {}",
        a.mem,
        a.fill,
        a.dirty,
        prof.name()
    );
    println!("   creating two hosts (network namespaces) and starting an agent on each ...");
    let lab = Lab::new("demo", prof.middle(), &[]).context("setting up the two hosts")?;
    let spec = GuestSpec {
        mem_mb: a.mem,
        fill_mb: a.fill,
        dirty_mbps: a.dirty,
        ..Default::default()
    };
    let mig = MigrationSpec {
        streams: a.streams,
        codec: a.codec.clone(),
        ..Default::default()
    };
    println!(
        "   booting the guest on {} and a paused destination on {} ...",
        lab.src_ns(),
        lab.dst_ns()
    );
    let pair = boot_pair(&lab, &spec, &mig)?;
    println!(
        "   guest ready; migrating through DWCP ({} streams, {}) ...",
        a.streams, a.codec
    );
    let r = dwcp_migrate(&lab, &pair, &mig)?;
    let v = verify(&pair, r, &scratch_dir(&lab)?)?;
    let d = &v.result;
    println!("   destination RAM identical to the source ({} MiB compared), guest running on the destination, self-check clean", v.memory.bytes >> 20);
    drop(pair);
    let native = if a.no_compare {
        None
    } else {
        println!("   same guest, same link, QEMU's own tcp: channel ...");
        let setup = MigrationSetup {
            return_path: true,
            auto_converge: false,
            ..Default::default()
        };
        Some(native_run(&lab, &spec, &setup, 7171)?)
    };
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>14} {:>14} {:>8}",
        "contender", "total s", "downtime", "QEMU sent MiB", "wire MiB", "syncs"
    );
    println!(
        "{:<28} {:>10.2} {:>7} ms {:>14.1} {:>14.1} {:>8}",
        format!("DWCP {}x{}", a.streams, a.codec),
        f(d, "total_time_ms") / 1000.0,
        d["downtime_ms"],
        f(d, "qemu_bytes") / 1048576.0,
        f(d, "wire_bytes") / 1048576.0,
        d["dirty_sync_count"]
    );
    if let Some((n, nv)) = &native {
        println!(
            "{:<28} {:>10.2} {:>7} ms {:>14.1} {:>14.1} {:>8}",
            "QEMU tcp: (1 stream)",
            n.total_time_ms as f64 / 1000.0,
            n.downtime_ms,
            n.ram_transferred as f64 / 1048576.0,
            n.ram_transferred as f64 / 1048576.0,
            n.dirty_sync_count
        );
        let _ = nv;
    }
    println!();
    println!("DWCP compression ratio {:.2} (QEMU bytes / wire bytes); guest-side pause {} ms (heartbeat gap)", f(d, "ratio"), v.pause_ms);
    Ok(())
}
