//! Concurrent migrations through one agent pair (docs/scale.md, "Concurrent
//! migrations"): N real QEMU guests (small TCG guests running the test
//! workload) migrate at once between the lab's two hosts, each through its
//! own `dwcp migrate`. Every one is verified as a lone migration is (the
//! destination's RAM equal to the source's page by page, the guest's
//! heartbeats going on at the destination with a clean self-check), and each
//! one's rate is printed beside the others' to show how they shared the link.
//!
//! Also: one migration whose source QEMU dies mid-stream fails alone (its
//! `dwcp migrate` fails, its destination never runs; the others complete,
//! intact), and a migration past the destination agent's
//! `--max-sessions` is refused at once naming the limit while the running
//! ones complete; once a slot is free it goes through.
//!
//! `make test` runs N = 1 and 3; `make load-test` runs the `#[ignore]`d
//! N = 5 and 10.

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use dwcp_core::agent::control_request;
use dwcp_lab::cluster::spawn_migrate;
use dwcp_lab::*;
use serde_json::{json, Value};

const MIB: f64 = 1048576.0;

fn mig_named(name: &str, extra: &[&str]) -> MigrationSpec {
    MigrationSpec {
        name: name.to_string(),
        streams: 4,
        codec: "lz4".into(),
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// One migration of a concurrent batch.
struct Flight {
    mig: MigrationSpec,
    pair: GuestPair,
}

/// Boots `n` guest pairs named `vm0..`, two at a time (a guest's boot is
/// CPU-bound under TCG; two cores here).
fn boot_flights(lab: &Lab, n: usize, extra: &[&str]) -> Vec<Flight> {
    let mut flights = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(2) {
        let booted: Vec<Flight> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    s.spawn(move || {
                        let name = format!("vm{i}");
                        let mig = mig_named(&name, extra);
                        let pair = boot_pair_as(lab, &GuestSpec::small(i as u64 + 1), &mig, &name)
                            .unwrap_or_else(|e| panic!("booting {name}: {e:#}"));
                        Flight { mig, pair }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        flights.extend(booted);
    }
    flights
}

/// The destination agent's sessions (`stats`).
fn dst_sessions(lab: &Lab) -> Vec<Value> {
    control_request(&lab.dst_agent().control(), &json!({"op": "stats"}))
        .ok()
        .and_then(|v| v["sessions"].as_array().cloned())
        .unwrap_or_default()
}

fn running(sessions: &[Value]) -> Vec<String> {
    sessions
        .iter()
        .filter(|s| s["state"] == "running")
        .map(|s| s["name"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Waits for every child, sampling the destination agent's running
/// sessions meanwhile; returns the outputs (in order) and the most sessions
/// seen running at once.
fn wait_all(lab: &Lab, children: Vec<Child>) -> (Vec<Output>, usize) {
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<Output>> = children.iter().map(|_| None).collect();
    let mut peak = 0;
    let t0 = Instant::now();
    while outputs.iter().any(Option::is_none) {
        peak = peak.max(running(&dst_sessions(lab)).len());
        for (c, o) in children.iter_mut().zip(outputs.iter_mut()) {
            let done = c.as_mut().is_some_and(|c| c.try_wait().unwrap().is_some());
            if done {
                *o = Some(c.take().unwrap().wait_with_output().unwrap());
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "migrations still running after 10 min"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (outputs.into_iter().map(Option::unwrap).collect(), peak)
}

fn result_of(lab: &Lab, name: &str, out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{name}: dwcp migrate failed: {}\nsource agent log:\n{}\ndestination agent log:\n{}",
        String::from_utf8_lossy(&out.stderr).trim(),
        lab.src_agent().log_text(),
        lab.dst_agent().log_text()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{name}: JSON output: {e}"))
}

/// Verifies a completed migration (RAM identical, guest alive on the
/// destination) and returns its row of the rate table.
fn verify_flight(lab: &Lab, f: &Flight, r: Value, started: f64) -> Row {
    assert_eq!(r["status"], "completed", "{}: {r}", f.mig.name);
    let scratch = scratch_dir(lab).unwrap().join(&f.mig.name);
    std::fs::create_dir_all(&scratch).unwrap();
    let v = verify(&f.pair, r, &scratch)
        .unwrap_or_else(|e| panic!("{}: verification: {e:#}", f.mig.name));
    assert_eq!(v.memory.differing_pages, 0);
    let _ = std::fs::remove_dir_all(&scratch);
    let ms = v.result["total_time_ms"].as_u64().unwrap_or(0);
    let bytes = v.result["qemu_bytes"].as_u64().unwrap_or(0);
    Row {
        name: f.mig.name.clone(),
        started,
        ms,
        qemu_mib: bytes as f64 / MIB,
        wire_mib: v.result["wire_bytes"].as_u64().unwrap_or(0) as f64 / MIB,
        rate: if ms > 0 {
            bytes as f64 / MIB / (ms as f64 / 1000.0)
        } else {
            0.0
        },
        pause_ms: v.pause_ms,
    }
}

struct Row {
    name: String,
    started: f64,
    ms: u64,
    qemu_mib: f64,
    wire_mib: f64,
    rate: f64,
    pause_ms: u64,
}

fn print_rows(title: &str, rows: &[Row], peak: usize) {
    eprintln!("{title}: at most {peak} sessions running at once on the destination agent");
    eprintln!(
        "| migration | started (s) | total (ms) | QEMU MiB | wire MiB | MiB/s | guest pause (ms) |"
    );
    eprintln!("|---|---|---|---|---|---|---|");
    for r in rows {
        eprintln!(
            "| {} | {:.2} | {} | {:.1} | {:.1} | {:.1} | {} |",
            r.name, r.started, r.ms, r.qemu_mib, r.wire_mib, r.rate, r.pause_ms
        );
    }
    let rates: Vec<f64> = rows.iter().map(|r| r.rate).collect();
    let (lo, hi) = rates
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    let sum: f64 = rates.iter().sum();
    eprintln!(
        "{title}: rates {lo:.1}..{hi:.1} MiB/s (lowest/highest {:.2}), sum {sum:.1} MiB/s",
        if hi > 0.0 { lo / hi } else { 0.0 }
    );
}

/// Migrates `n` guests at once through one agent pair and verifies each.
fn concurrent(n: usize) {
    let lab = Lab::new(&format!("conc{n}"), Middle::Bridge, &[]).expect("lab");
    let flights = boot_flights(&lab, n, &[]);
    let t0 = Instant::now();
    let mut started = Vec::new();
    let children: Vec<Child> = flights
        .iter()
        .map(|f| {
            started.push(t0.elapsed().as_secs_f64());
            spawn_migrate(&lab, &f.pair, &f.mig)
        })
        .collect();
    let (outs, peak) = wait_all(&lab, children);
    let wall = t0.elapsed();
    let results: Vec<Value> = flights
        .iter()
        .zip(&outs)
        .map(|(f, o)| result_of(&lab, &f.mig.name, o))
        .collect();
    let rows: Vec<Row> = flights
        .iter()
        .zip(results)
        .zip(&started)
        .map(|((f, r), &s)| verify_flight(&lab, f, r, s))
        .collect();
    print_rows(&format!("{n} concurrent migrations"), &rows, peak);
    eprintln!("{n} concurrent migrations: all done in {wall:.2?}");
    // Every session of the batch completed on both agents.
    let ended = dst_sessions(&lab);
    for f in &flights {
        let s = ended
            .iter()
            .rev()
            .find(|s| s["name"] == f.mig.name.as_str())
            .unwrap_or_else(|| panic!("{}: no session on the destination", f.mig.name));
        assert_eq!(s["state"], "completed", "{s}");
    }
}

#[test]
fn one_migration_alone() {
    concurrent(1);
}

#[test]
fn three_migrations_at_once() {
    concurrent(3);
}

#[test]
#[ignore = "long: make load-test"]
fn five_migrations_at_once() {
    concurrent(5);
}

#[test]
#[ignore = "long: make load-test"]
fn ten_migrations_at_once() {
    concurrent(10);
}

fn assert_source_running(name: &str, pair: &GuestPair) {
    let st = pair.src.qmp().unwrap().status().unwrap();
    assert_eq!(
        st, "running",
        "{name}: the source guest must keep running after a refused migration"
    );
    let last = pair.src.heartbeats().last().map(|h| h.seq).unwrap_or(0);
    pair.src
        .expect_heartbeats(last, 2, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{name}: source heartbeats after the refusal: {e:#}"));
}

/// Waits until `pred` holds for the destination agent's sessions; panics
/// naming `what` after 60 s.
fn wait_sessions(lab: &Lab, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let t0 = Instant::now();
    loop {
        let s = dst_sessions(lab);
        if pred(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} did not happen within 60 s; sessions: {s:?}\n{}",
            lab.dst_agent().log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three migrations at once; the source QEMU of one is killed while its
/// stream flows. That one fails; the other two complete with identical RAM
/// and their guests run on at the destination.
#[test]
fn a_source_killed_mid_stream_fails_no_other_migration() {
    let lab = Lab::new("concfail", Middle::Bridge, &[]).expect("lab");
    // QEMU's own bandwidth cap keeps all three streaming for a few seconds,
    // so the kill lands while the others run.
    let mut flights = boot_flights(&lab, 3, &["--max-bandwidth-mb", "12"]);
    let children: Vec<Child> = flights
        .iter()
        .map(|f| spawn_migrate(&lab, &f.pair, &f.mig))
        .collect();
    let victim = 1;
    let vname = flights[victim].mig.name.clone();
    let seen = wait_sessions(&lab, "the victim's stream flowing", |s| {
        s.iter().any(|s| {
            s["name"] == vname.as_str()
                && s["state"] == "running"
                && s["raw_in"].as_u64().unwrap_or(0) > 2 << 20
        })
    });
    let v = &mut flights[victim].pair.src;
    let _ = v.child.kill();
    let _ = v.child.wait();
    let others_running: Vec<String> = running(&seen).into_iter().filter(|n| *n != vname).collect();
    eprintln!("killed {vname}'s source QEMU; running then: {others_running:?}");
    assert_eq!(
        others_running.len(),
        2,
        "the kill must land while the other two migrations run: {seen:?}"
    );
    let (outs, _) = wait_all(&lab, children);
    // The victim failed, with a reason.
    let vout = &outs[victim];
    assert!(
        !vout.status.success(),
        "{vname} succeeded without its source"
    );
    eprintln!(
        "{vname} failed: {}",
        String::from_utf8_lossy(&vout.stderr).trim()
    );
    let dst_state = flights[victim]
        .pair
        .dst
        .qmp()
        .and_then(|mut q| Ok(q.status()?))
        .unwrap_or_else(|e| format!("gone ({e})"));
    assert_ne!(
        dst_state, "running",
        "{vname}'s destination must not run a half-received guest"
    );
    let s = wait_sessions(&lab, "the victim's session ending", |s| {
        s.iter()
            .any(|s| s["name"] == vname.as_str() && s["state"] != "running")
    });
    // To the agents QEMU's socket closing is the stream's end: the
    // session relays what QEMU sent and ends (completed, or failed when
    // the close lands mid-frame); the destination QEMU rejects the cut
    // stream and never runs (checked above).
    let vs = s.iter().find(|s| s["name"] == vname.as_str()).unwrap();
    eprintln!(
        "{vname}'s session on the destination agent ended {}",
        vs["state"]
    );
    // The others completed, intact.
    let mut rows = Vec::new();
    for (i, (f, o)) in flights.iter().zip(&outs).enumerate() {
        if i != victim {
            let r = result_of(&lab, &f.mig.name, o);
            rows.push(verify_flight(&lab, f, r, 0.0));
        }
    }
    print_rows("the two survivors", &rows, 3);
}

/// The destination agent runs `--max-sessions 2`: with two migrations
/// streaming, a third is refused at its handshake, at once, with the limit
/// named; the two complete intact; the third's guest keeps running on the
/// source, and once a slot is free its retry goes through.
#[test]
fn a_migration_past_max_sessions_is_refused_and_the_others_complete() {
    let lab = Lab::new("concmax", Middle::Bridge, &["--max-sessions", "2"]).expect("lab");
    let flights = boot_flights(&lab, 3, &["--max-bandwidth-mb", "12"]);
    let children: Vec<Child> = flights[..2]
        .iter()
        .map(|f| spawn_migrate(&lab, &f.pair, &f.mig))
        .collect();
    wait_sessions(&lab, "two sessions running", |s| running(s).len() == 2);
    let third = &flights[2];
    let t0 = Instant::now();
    let refused = dwcp_migrate(&lab, &third.pair, &third.mig);
    let took = t0.elapsed();
    let e = format!(
        "{:#}",
        refused.expect_err("the third migration must be refused")
    );
    eprintln!("{} refused after {took:.2?}: {e}", third.mig.name);
    assert!(
        e.contains("--max-sessions") && e.contains("destination refused"),
        "the error must name the limit: {e}"
    );
    // Refused at its handshake, not queued: well within the handshake's
    // own timeouts (5 s) plus QEMU's start of the migration.
    assert!(took < Duration::from_secs(10), "refusal took {took:?}");
    let log = wait_log(&lab.dst_agent().log, "(--max-sessions)");
    assert!(
        log.iter().any(|l| l.contains("limit is 2")),
        "the destination logs the limit's value: {log:?}"
    );
    // The two kept going.
    let s = dst_sessions(&lab);
    let names = running(&s);
    assert!(
        flights[..2].iter().all(|f| names.contains(&f.mig.name)
            || s.iter()
                .any(|x| x["name"] == f.mig.name.as_str() && x["state"] == "completed")),
        "the refusal must not touch the two sessions: {s:?}"
    );
    assert_source_running(&third.mig.name, &third.pair);
    let (outs, peak) = wait_all(&lab, children);
    let rows: Vec<Row> = flights[..2]
        .iter()
        .zip(&outs)
        .map(|(f, o)| verify_flight(&lab, f, result_of(&lab, &f.mig.name, o), 0.0))
        .collect();
    print_rows("the two within --max-sessions 2", &rows, peak);
    assert!(peak <= 2, "more sessions than --max-sessions ran: {peak}");
    // A slot is free: the refused migration goes through, intact (its
    // destination QEMU never saw a byte, so it still waits).
    let r = dwcp_migrate(&lab, &third.pair, &third.mig)
        .unwrap_or_else(|e| panic!("{}: retry: {e:#}", third.mig.name));
    let row = verify_flight(&lab, third, r, 0.0);
    print_rows("the refused one, retried", &[row], 1);
}
