//! Bounded, flat memory over many migrations (docs/scale.md, "Memory over
//! many migrations"): one agent pair carries K back-to-back migrations of
//! one real QEMU guest, there and back (each agent the source and the
//! destination in turn), each under its own name as hosts moving a fleet
//! would, each verified (RAM identical, guest alive on the destination).
//! After each, both agents' resident memory (VmRSS), open descriptors and
//! threads are sampled from /proc. A least-squares slope over the second
//! half (past warm-up: allocator arenas, the agents' bounded history of
//! recent sessions and prepared migrations filling) must be flat:
//!
//! * RSS: at most 1 MiB per migration. A leak of what a migration holds
//!   (its windows, dedup rings, TLS and thread stacks: MiBs to tens of MiB)
//!   is well above it; what an agent keeps per finished migration on
//!   purpose (the figures of its newest 32 sessions: KiBs each) is well
//!   below; so is glibc's reuse of freed session buffers, which shows as
//!   steps up and down, not a trend.
//! * Descriptors and threads: a slope of at most 0.1 per migration (one
//!   leaked socket or thread per migration is a slope of 1) and no more than
//!   2 over the second half's first sample (a connection or thread of the
//!   agent's own that comes and goes).
//!
//! `make test` runs K = 20; `make load-test` runs the `#[ignore]`d K = 100.

use std::time::{Duration, Instant};

use dwcp_core::agent::control_request;
use dwcp_lab::*;
use serde_json::json;

const MIB: f64 = 1048576.0;
/// Most RSS growth per migration allowed over the second half, MiB.
const RSS_SLOPE_MIB: f64 = 1.0;
/// Most descriptor or thread growth per migration allowed (slope).
const COUNT_SLOPE: f64 = 0.1;
/// Most descriptors or threads past the second half's first sample.
const COUNT_SLACK: u64 = 2;

/// Waits until neither agent has a running session.
fn settle(lab: &Lab) {
    let t0 = Instant::now();
    for a in [lab.src_agent(), lab.dst_agent()] {
        loop {
            let v = control_request(&a.control(), &json!({"op": "stats"})).unwrap();
            let busy = v["sessions"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["state"] == "running"));
            if !busy {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "a session still runs 30 s after its migration: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An agent's figures once the migration just ended has let go of its
/// sockets and threads: descriptors and threads are the lowest of four
/// samples 100 ms apart (a session's teardown closes its last descriptors
/// just after it stops running, so one sample counted them or not by
/// chance, and made a slope of +0.2 out of values that alternate between 18
/// and 20); a leak raises every sample. RSS is the last sample's.
fn quiet_sample(pid: u32) -> Result<ProcSample, String> {
    let mut q = proc_sample(pid).map_err(|e| format!("{e:#}"))?;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(100));
        let s = proc_sample(pid).map_err(|e| format!("{e:#}"))?;
        q.fds = q.fds.min(s.fds);
        q.threads = q.threads.min(s.threads);
        q.rss = s.rss;
        q.hwm = s.hwm;
    }
    Ok(q)
}

struct Series {
    what: &'static str,
    values: Vec<f64>,
}

fn back_to_back(k: usize) {
    let lab = Lab::new(&format!("flat{k}"), Middle::Bridge, &[]).expect("lab");
    let pids = [lab.src_agent().child.id(), lab.dst_agent().child.id()];
    let spec = GuestSpec::small(1);
    let scratch = scratch_dir(&lab).unwrap();
    let idle = pids.map(|p| proc_sample(p).unwrap());
    eprintln!(
        "| migration | took (s) | src RSS MiB | src fds | src threads | dst RSS MiB | dst fds | dst threads |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|");
    let row = |i: &str, took: f64, s: &[ProcSample; 2]| {
        eprintln!(
            "| {i} | {took:.1} | {:.1} | {} | {} | {:.1} | {} | {} |",
            s[0].rss as f64 / MIB,
            s[0].fds,
            s[0].threads,
            s[1].rss as f64 / MIB,
            s[1].fds,
            s[1].threads
        )
    };
    row("idle", 0.0, &idle);
    let mut samples = Vec::new();
    let t_all = Instant::now();
    // One guest, migrated there and back: each agent is the source and the
    // destination in turn, and no guest boots between two migrations.
    let mut mig = MigrationSpec {
        name: "vm0".into(),
        ..Default::default()
    };
    let mut pair = boot_pair(&lab, &spec, &mig).expect("boot the guest");
    for i in 0..k {
        let t0 = Instant::now();
        if i > 0 {
            let next = MigrationSpec {
                name: format!("vm{i}"),
                reverse: !mig.reverse,
                ..Default::default()
            };
            let dst = start_incoming(&lab, &format!("g{i}"), &spec, &next)
                .unwrap_or_else(|e| panic!("{}: destination QEMU: {e:#}", next.name));
            // The guest runs where the last migration took it; the QEMU it
            // left is done.
            pair = pair.turned_around(dst);
            mig = next;
        }
        let r = dwcp_migrate(&lab, &pair, &mig).unwrap_or_else(|e| {
            panic!(
                "{}: {e:#}\nsource agent log:\n{}\ndestination agent log:\n{}",
                mig.name,
                lab.src_agent().log_text(),
                lab.dst_agent().log_text()
            )
        });
        assert_eq!(r["status"], "completed", "{r}");
        let v = verify(&pair, r, &scratch)
            .unwrap_or_else(|e| panic!("{}: verification: {e:#}", mig.name));
        assert_eq!(v.memory.differing_pages, 0);
        settle(&lab);
        let s = pids.map(|p| {
            quiet_sample(p).unwrap_or_else(|e| panic!("an agent died at {}: {e:#}", mig.name))
        });
        row(&mig.name, t0.elapsed().as_secs_f64(), &s);
        samples.push(s);
    }
    eprintln!("{k} migrations in {:.0?}", t_all.elapsed());

    // Second half: past the warm-up.
    let half = &samples[k / 2..];
    let mut failures = Vec::new();
    for (side, who) in ["source", "destination"].iter().enumerate() {
        let series = [
            Series {
                what: "RSS (MiB)",
                values: half.iter().map(|s| s[side].rss as f64 / MIB).collect(),
            },
            Series {
                what: "open fds",
                values: half.iter().map(|s| s[side].fds as f64).collect(),
            },
            Series {
                what: "threads",
                values: half.iter().map(|s| s[side].threads as f64).collect(),
            },
        ];
        for s in &series {
            let m = slope(&s.values);
            let (first, last) = (s.values[0], *s.values.last().unwrap());
            let hi = s.values.iter().cloned().fold(f64::MIN, f64::max);
            eprintln!(
                "{who} agent {}: slope {m:+.3} per migration over migrations {}..{} (first {first:.1}, last {last:.1}, highest {hi:.1})",
                s.what,
                k / 2,
                k - 1
            );
            let bad = if s.what.starts_with("RSS") {
                m > RSS_SLOPE_MIB
            } else {
                m > COUNT_SLOPE || hi > first + COUNT_SLACK as f64
            };
            if bad {
                failures.push(format!(
                    "{who} agent {}: slope {m:+.3}, {first} -> {hi}",
                    s.what
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "growth over {k} migrations: {failures:?}"
    );
}

#[test]
fn flat_memory_over_20_migrations() {
    back_to_back(20);
}

#[test]
#[ignore = "long: make load-test"]
fn flat_memory_over_100_migrations() {
    back_to_back(100);
}
