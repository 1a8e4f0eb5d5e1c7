//! The adaptive layer on a real migration (docs/adaptivity.md): the test
//! guest, dirtying 8 MiB/s, migrates through a pair of `dwcp agent`s over
//! the linkem forwarder with the `internet` profile's delay and loss (80 ms
//! RTT, 0.1 %) whose rate follows a trace: 100 Mbit/s, then 20 Mbit/s from
//! 2 s into the migration (about halfway at 100 Mbit/s) to the end. At
//! 20 Mbit/s the link carries less guest RAM than the guest dirties, so the
//! tuning loop must say so early, with its numbers, and QEMU's
//! auto-converge (set before the migration: QEMU refuses it mid-way) must
//! get it through. The destination's RAM must equal the source's and the
//! guest must keep running there.
//!
//! `FCC_TRACES=N` with `--ignored` (`make bench-adaptive`): the same
//! migration over N replayed FCC test traces (scaled to a 100 Mbit/s-class
//! path), printing the ETA's error at 25/50/75 % of each; `FCC_CONSTANT=1`
//! runs them on a constant 100 Mbit/s link instead (the model's own error).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dwcp_lab::{boot_pair, dwcp_migrate, scratch_dir, verify, GuestSpec, Lab, MigrationSpec};
use linkem::{Forwarder, LinkConfig, Middle, Profile, Trace};
use serde_json::Value;

/// The `internet` profile with its rate following `trace`.
fn link(trace: Trace) -> LinkConfig {
    let t = Arc::new(trace);
    Profile::Internet
        .config()
        .both(|d| d.trace = Some(t.clone()))
}

/// Migrates the dirtying guest over `cfg` (the forwarder starts with the
/// migration: the trace's time 0); checks RAM and the guest; the result.
fn migrate_over(tag: &str, cfg: &LinkConfig) -> Value {
    migrate_guest_over(tag, cfg, GuestSpec::default())
}

/// [`migrate_over`] with this guest (its dirty rate set to 8 MiB/s).
fn migrate_guest_over(tag: &str, cfg: &LinkConfig, guest: GuestSpec) -> Value {
    let lab = Lab::new(tag, Middle::External, &[]).expect("lab");
    let spec = GuestSpec {
        dirty_mbps: 8,
        ..guest
    };
    let mig = MigrationSpec {
        streams: 4,
        codec: "auto".into(),
        extra: vec!["--auto-converge".into()],
        timeout_s: 300,
        ..Default::default()
    };
    let pair = boot_pair(&lab, &spec, &mig).expect("boot guests");
    let fw = Forwarder::start(cfg, "a", "b", Some(&lab.topo.link_ns)).expect("start the forwarder");
    let r = match dwcp_migrate(&lab, &pair, &mig) {
        Ok(r) => r,
        Err(e) => panic!(
            "{e:#}\nsource agent log:\n{}\ndestination agent log:\n{}",
            lab.src_agent().log_text(),
            lab.dst_agent().log_text()
        ),
    };
    assert_eq!(r["status"], "completed", "{r}");
    let v = verify(&pair, r, &scratch_dir(&lab).unwrap()).expect("verification");
    let _ = fw.stop();
    assert_eq!(v.memory.differing_pages, 0);
    let r = v.result;
    let checks = r["eta"]["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| match c["error_pct"].as_f64() {
            Some(e) => format!("{e:+.0} % ({})", c["source"].as_str().unwrap_or("?")),
            None => "?".into(),
        })
        .collect::<Vec<_>>()
        .join(" / ");
    eprintln!(
        "{tag}: total {} ms, downtime {} ms, wire {:.1} MiB, ratio {:.2}, codec {}, mode {}, \
         {} dirty syncs, guest pause {} ms; ETA error at 25/50/75 %: {checks}; tuning {}",
        r["total_time_ms"],
        r["downtime_ms"],
        r["wire_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        r["ratio"].as_f64().unwrap_or(0.0),
        r["codec"],
        r["mode"],
        r["dirty_sync_count"],
        v.pause_ms,
        r["tuning"]
    );
    // What each second's ETA was made of (the driver's view).
    for p in r["eta"]["trace"].as_array().into_iter().flatten() {
        eprintln!("  {tag} eta {p}");
    }
    r
}

#[test]
fn a_link_dropping_from_100_to_20_mbit_mid_migration_still_converges() {
    let trace = Trace::from_steps(&[(0.0, 100.0), (2.0, 20.0), (602.0, 20.0)]).unwrap();
    let r = migrate_over("drop", &link(trace));
    let tuning = &r["tuning"];
    assert!(
        tuning["decisions"].as_u64().unwrap_or(0) >= 2,
        "the loop decided once a second: {tuning}"
    );
    assert_eq!(r["mode"], "internet", "80 ms RTT: {r}");
    assert_eq!(r["eta"]["checks"].as_array().map(Vec::len), Some(3));
}

/// The first `n` FCC test traces (`time_s<TAB>Mbit/s`), each scaled so that
/// its mean is 100 Mbit/s. `$DWCP_TRACES` (the Makefile sets it), else
/// `../shared/traces` beside the checkout.
fn fcc_traces(n: usize) -> Vec<(String, Trace)> {
    let dir = std::env::var_os("DWCP_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"))
        .join("fcc/test");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (set DWCP_TRACES)", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
        .into_iter()
        .take(n)
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("read trace");
            let steps: Vec<(f64, f64)> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let mut it = l
                        .split_whitespace()
                        .map(|x| x.parse::<f64>().expect("number"));
                    (it.next().expect("time"), it.next().expect("rate"))
                })
                .collect();
            let mean = steps.iter().map(|s| s.1).sum::<f64>() / steps.len().max(1) as f64;
            let k = 100.0 / mean.max(1e-3);
            let t0 = steps[0].0;
            let steps: Vec<(f64, f64)> = steps.iter().map(|s| (s.0 - t0, s.1 * k)).collect();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            (name, Trace::from_steps(&steps).expect("steps"))
        })
        .collect()
}

#[test]
#[ignore = "long: make bench-adaptive"]
fn fcc_trace_replays_eta_error() {
    let n: usize = std::env::var("FCC_TRACES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // FCC_GUEST_MB / FCC_FILL_MB: a larger guest for longer migrations
    // (default: the test guest, 256 MiB with 96 MiB of content).
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut guest = GuestSpec::default();
    if let Some(m) = env("FCC_GUEST_MB") {
        guest.mem_mb = m;
    }
    if let Some(f) = env("FCC_FILL_MB") {
        guest.fill_mb = f;
    }
    // FCC_CONSTANT=1: the same migrations on a constant 100 Mbit/s link
    // (the traces' mean, same delay and loss), as many as FCC_TRACES: the
    // ETA's error when the link's future equals its past.
    let traces = if env("FCC_CONSTANT") == Some(1) {
        (0..n)
            .map(|k| {
                let t = Trace::from_steps(&[(0.0, 100.0)]).expect("constant");
                (format!("constant-100-{k}"), t)
            })
            .collect()
    } else {
        fcc_traces(n)
    };
    let mut rows = Vec::new();
    for (k, (name, trace)) in traces.into_iter().enumerate() {
        let r = migrate_guest_over(&format!("fcc{k}"), &link(trace), guest.clone());
        let err = |i: usize| r["eta"]["checks"][i]["error_pct"].as_f64();
        rows.push((name, r["total_time_ms"].as_u64(), err(0), err(1), err(2)));
        std::thread::sleep(Duration::from_secs(1));
    }
    let f = |e: Option<f64>| e.map_or("?".into(), |e| format!("{e:+.0}"));
    println!("| trace | total ms | ETA error 25 % | 50 % | 75 % |\n|---|---:|---:|---:|---:|");
    for (name, total, a, b, c) in &rows {
        println!(
            "| {name} | {} | {} | {} | {} |",
            total.unwrap_or(0),
            f(*a),
            f(*b),
            f(*c)
        );
    }
    let mut s: Vec<f64> = rows.iter().filter_map(|r| r.3).map(f64::abs).collect();
    if !s.is_empty() {
        s.sort_by(f64::total_cmp);
        println!(
            "ETA |error| at 50 %: median {:.0} %, max {:.0} % over {} migrations",
            s[s.len() / 2],
            s[s.len() - 1],
            s.len()
        );
    }
}
