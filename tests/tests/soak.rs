//! Randomized fault injection on real migrations through a three-agent raft
//! cluster (real agents, raft logs on disk, real QEMU guests).
//!
//! Each run migrates a fresh guest from host 1 to host 2 with the cutover
//! gated on the cluster, in one of the two gate modes:
//! - `qmp`: `dwcp migrate --gate` (the source commits at QEMU's
//!   pre-switchover);
//! - `transport`: the destination agent holds the end of the stream
//!   (`prepare` with `"gate": true`, as the libvirt hook does), the source is
//!   driven like libvirt drives it (return path, no gate of its own).
//!
//! and injects one fault — kill the source agent, the destination agent, the
//! raft leader or a follower; partition the destination from the raft
//! majority; cut the data link; or none — at one point: before any byte moves (intent
//! recorded), during the stream, at the gate (commit under way) or after the
//! commit. Killed agents come back 1.5 s later (a supervisor's restart);
//! partitions and cuts heal when the migration has ended.
//!
//! "Kill the leader" and "kill a follower" are raft faults only: the member
//! killed is node 3, which relays no data (killing node 1 or 2 is the
//! source or destination agent fault, whatever its raft role). Before such a
//! run the soak moves the leadership (`transfer_leader`) onto node 3, or off
//! it, so node 3 is the leader, or a follower, when it is killed.
//!
//! Then it acts as the management layer does (libvirt's Finish/Confirm):
//! a completed migration has its RAM compared and the destination resumed;
//! a failed one leaves the guest on the source, the destination QEMU is
//! killed, and the source host's agent is asked to `reconcile`. After each
//! run it checks: the guest runs on exactly one host; it is alive and its
//! workload's self-check is clean (heartbeats, no errors); every member's
//! registry names that host as the owner with no open intent.
//!
//! `DWCP_SOAK_RUNS` (default 4, CI), `DWCP_SOAK_SEED` (default 1),
//! `DWCP_SOAK_FIRST` (the first run's number, default 0: a run's draw depends
//! only on the seed and its number, so a stopped soak can be resumed),
//! `DWCP_SOAK_REPORT` (a JSON file for the counts), `DWCP_SOAK_FAULTS` and
//! `DWCP_SOAK_POINTS` (comma-separated names, e.g. `kill-leader,kill-follower`
//! and `at-gate`: draw only from these; default all). `make soak` runs 200.

use std::process::Child;
use std::time::{Duration, Instant};

use dwcp_core::agent::control_request;
use dwcp_lab::cluster::{partition_dst, prepared, record, ClusterLab};
use dwcp_lab::{
    boot_pair, compare_memory, dwcp_bin, scratch_dir, GuestPair, GuestSpec, MigrationSpec,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Qmp,
    Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    KillSrcAgent,
    KillDstAgent,
    KillLeader,
    KillFollower,
    PartitionDst,
    CutDataLink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    Before,
    During,
    AtGate,
    AfterCommit,
}

const FAULTS: [(Fault, &str); 7] = [
    (Fault::None, "none"),
    (Fault::KillSrcAgent, "kill-src-agent"),
    (Fault::KillDstAgent, "kill-dst-agent"),
    (Fault::KillLeader, "kill-leader"),
    (Fault::KillFollower, "kill-follower"),
    (Fault::PartitionDst, "partition-dst"),
    (Fault::CutDataLink, "cut-data-link"),
];
const POINTS: [(Point, &str); 4] = [
    (Point::Before, "before"),
    (Point::During, "during"),
    (Point::AtGate, "at-gate"),
    (Point::AfterCommit, "after-commit"),
];

/// The raft member the raft faults kill: it relays no migration data.
const RAFT_ONLY: u64 = 3;

/// The entries of `all` named in `$var` (comma-separated), all when unset or empty.
fn selected<T: Copy>(var: &str, all: &[(T, &'static str)]) -> Vec<(T, &'static str)> {
    let list = std::env::var(var).unwrap_or_default();
    if list.trim().is_empty() {
        return all.to_vec();
    }
    let names: Vec<&str> = all.iter().map(|(_, n)| *n).collect();
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            *all.iter().find(|(_, name)| *name == n).unwrap_or_else(|| {
                panic!("{var}: unknown name {n:?}; use some of {}", names.join(","))
            })
        })
        .collect()
}

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Drops (or restores) the destination's data port in both directions.
fn cut_data(c: &ClusterLab, cut: bool) {
    let flag = if cut { "-I" } else { "-D" };
    let port = c.lab.dst_addr().rsplit(':').next().unwrap().to_string();
    for rule in [
        vec!["INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"],
        vec!["OUTPUT", "-p", "tcp", "--sport", &port, "-j", "DROP"],
    ] {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", c.lab.dst_ns(), "iptables", flag])
            .args(&rule)
            .status()
            .expect("iptables")
            .success();
        assert!(ok, "iptables {flag} {rule:?}");
    }
}

struct Run {
    mode: Mode,
    fault: Fault,
    point: Point,
    guest: String,
}

/// What one run did and found.
#[derive(Debug, Default)]
struct Outcome {
    migrated: bool,
    fault_fired: bool,
    killed: Option<u64>,
    /// The killed member's raft role when it was killed.
    killed_role: String,
    violations: Vec<String>,
    registry_ms: u64,
    reconciled: String,
    /// dwcp migrate's error, when it failed.
    error: String,
}

fn spawn_migrate(c: &ClusterLab, pair: &GuestPair, mig: &MigrationSpec, run: &Run) -> Child {
    let mut cmd = std::process::Command::new(dwcp_bin().unwrap());
    cmd.args(["--log", "warn", "migrate", "--json", "--qmp"])
        .arg(&pair.src.qmp_path)
        .args(["--to", &c.lab.dst_addr(), "--name", &mig.name, "--agent"])
        .arg(c.control(1))
        .args(["--streams", "2", "--timeout", "60", "--idle-timeout", "3"])
        .args(["--max-bandwidth-mb", "60", "--return-path"]);
    if run.mode == Mode::Qmp {
        cmd.args(["--gate", "--guest-uuid", &run.guest, "--dst-node", "2"])
            .args(["--gate-timeout-ms", "2000"]);
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dwcp migrate")
}

/// Whether the run reached `point` (polled while the migration runs).
fn reached(c: &ClusterLab, run: &Run, point: Point, since: Instant, during_at: Duration) -> bool {
    match point {
        Point::Before => true,
        Point::During => since.elapsed() >= during_at,
        Point::AtGate => match run.mode {
            Mode::Transport => {
                c.alive(2) && prepared(&c.control(2), "vm")["gate"]["state"] == "committing"
            }
            Mode::Qmp => {
                c.alive(1)
                    && control_request(&c.control(1), &json!({"op": "stats"}))
                        .map(|v| v["commits_in_flight"].as_u64().unwrap_or(0) > 0)
                        .unwrap_or(false)
            }
        },
        Point::AfterCommit => (1..=3)
            .filter(|&i| c.alive(i))
            .any(|i| record(&c.control(i), &run.guest)["migration"]["state"] == "committed"),
    }
}

fn inject(c: &mut ClusterLab, fault: Fault, o: &mut Outcome) {
    o.fault_fired = true;
    match fault {
        Fault::None => {}
        Fault::KillSrcAgent => o.killed = Some(1),
        Fault::KillDstAgent => o.killed = Some(2),
        // Leadership can move on its own (a loaded machine delays heartbeats):
        // place it again, so the raft faults still kill node 3 only.
        Fault::KillLeader => {
            if c.leader() != Some(RAFT_ONLY) {
                let _ = c.move_leader(RAFT_ONLY, Duration::from_secs(3));
            }
            o.killed = c.leader();
        }
        Fault::KillFollower => {
            if c.leader() == Some(RAFT_ONLY) {
                let _ = c.move_leader(1, Duration::from_secs(3));
            }
            o.killed = Some(RAFT_ONLY);
        }
        Fault::PartitionDst => partition_dst(&c.lab, true),
        Fault::CutDataLink => cut_data(c, true),
    }
    if let Some(id) = o.killed {
        o.killed_role = control_request(&c.control(id), &json!({"op": "cluster_status"}))
            .ok()
            .and_then(|v| v["status"]["role"].as_str().map(str::to_string))
            .unwrap_or_default();
        c.kill(id);
    }
}

fn heal(c: &mut ClusterLab, fault: Fault) {
    match fault {
        Fault::PartitionDst => partition_dst(&c.lab, false),
        Fault::CutDataLink => cut_data(c, false),
        _ => {}
    }
    for id in 1..=3 {
        c.restart(id);
    }
}

fn status_of(g: &dwcp_lab::Guest) -> String {
    if !g.alive() {
        return "exited".into();
    }
    g.qmp()
        .ok()
        .and_then(|mut q| q.status().ok())
        .unwrap_or_else(|| "unreachable".into())
}

/// One run; None when its guests did not boot (no migration was tried).
fn one_run(c: &mut ClusterLab, i: u64, run: &Run, rng: &mut StdRng) -> Option<Outcome> {
    let mut o = Outcome::default();
    let spec = GuestSpec {
        mem_mb: 256,
        fill_mb: 64,
        dirty_mbps: 4,
        seed: i,
        ..GuestSpec::default()
    };
    let mig = MigrationSpec::default();
    // Raft faults hit node 3 only: make it the leader, or a follower.
    let place = match run.fault {
        Fault::KillLeader => Some(RAFT_ONLY),
        Fault::KillFollower if c.leader() == Some(RAFT_ONLY) => Some(1 + i % 2),
        _ => None,
    };
    if let Some(to) = place {
        if let Err(e) = c.move_leader(to, Duration::from_secs(15)) {
            o.violations.push(format!("leader placement: {e}"));
        }
    }
    // A TCG guest can fail to boot on a loaded machine (its timer check,
    // or a slow boot); that is no migration result: boot it again, or skip.
    let mut tries = 0;
    let pair = loop {
        tries += 1;
        match boot_pair(&c.lab, &spec, &mig) {
            Ok(p) => break p,
            Err(e) if tries < 3 => eprintln!("soak run {i}: booting the guests again: {e:#}"),
            Err(e) => {
                eprintln!("soak run {i}: skipped, the guests did not boot in {tries} tries: {e:#}");
                return None;
            }
        }
    };
    // The intent, before any byte moves.
    match run.mode {
        Mode::Transport => {
            control_request(
                &c.control(2),
                &json!({"op": "prepare", "name": mig.name, "uuid": run.guest, "gate": true, "src_node": 1}),
            )
            .expect("gated prepare");
        }
        Mode::Qmp => {} // dwcp migrate --gate records it itself
    }
    let during_at = Duration::from_millis(rng.gen_range(200..2500));
    let t0 = Instant::now();
    if run.point == Point::Before {
        inject(c, run.fault, &mut o);
    }
    let mut child = spawn_migrate(c, &pair, &mig, run);
    let mut fired_at = if o.fault_fired {
        Some(Instant::now())
    } else {
        None
    };
    let exit = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if !o.fault_fired && reached(c, run, run.point, t0, during_at) {
            inject(c, run.fault, &mut o);
            fired_at = Some(Instant::now());
        }
        // A supervisor restarts a killed agent.
        if let (Some(id), Some(at)) = (o.killed, fired_at) {
            if at.elapsed() > Duration::from_millis(1500) && !c.alive(id) {
                c.restart(id);
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            o.violations
                .push("dwcp migrate did not end within 120 s".into());
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    heal(c, run.fault);
    // Management: finish or roll back, as libvirt does.
    let result: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    o.migrated = exit.success() && result["status"] == "completed";
    if !o.migrated {
        o.error = stderr.trim().chars().take(300).collect();
    }
    let (runs_on, other) = if o.migrated {
        let st = status_of(&pair.src);
        if st != "postmigrate" {
            o.violations
                .push(format!("source is {st} after a completed migration"));
        }
        match compare_memory(&pair.src, &pair.dst, &scratch_dir(&c.lab).unwrap()) {
            Ok(m) if m.differing_pages == 0 => {}
            Ok(m) => o
                .violations
                .push(format!("{} pages differ", m.differing_pages)),
            Err(e) => o.violations.push(format!("memory compare: {e:#}")),
        }
        let _ = pair
            .dst
            .qmp()
            .and_then(|mut q| Ok(q.execute("cont", None)?));
        let _ = pair
            .src
            .qmp()
            .and_then(|mut q| Ok(q.execute("quit", None)?));
        (&pair.dst, 2)
    } else {
        let _ = pair
            .dst
            .qmp()
            .and_then(|mut q| Ok(q.execute("quit", None)?));
        if run.mode == Mode::Transport {
            // The destination domain is gone: the libvirt hook's `release
            // end` tells the agent (else its gated entry would gate the
            // next migration of the same name).
            let _ = control_request(
                &c.control(2),
                &json!({"op": "release", "name": mig.name, "outcome": "failed",
                        "reason": "destination domain stopped"}),
            );
        }
        // The source host's management closes what the registry still
        // shows (libvirt's Confirm; `dwcp virsh-migrate` does this).
        let t = Instant::now();
        loop {
            let out = std::process::Command::new(dwcp_bin().unwrap())
                .args(["cluster", "reconcile", "--guest", &run.guest, "--agent"])
                .arg(c.control(1))
                .output()
                .expect("dwcp cluster reconcile");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() {
                o.reconciled = if text.contains(": abort of epoch") {
                    "abort".into()
                } else if text.contains(": revert of epoch") {
                    "revert".into()
                } else {
                    "none".into()
                };
                break;
            }
            if t.elapsed() > Duration::from_secs(20) {
                o.violations.push(format!(
                    "dwcp cluster reconcile: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        (&pair.src, 1)
    };
    let _ = other;
    // Exactly one host runs the guest.
    std::thread::sleep(Duration::from_millis(300));
    let (s, d) = (status_of(&pair.src), status_of(&pair.dst));
    let running = [&s, &d].iter().filter(|x| x.as_str() == "running").count();
    if running != 1 {
        o.violations.push(format!(
            "guest runs on {running} hosts (source {s}, destination {d}); migrate said: {}",
            stderr.trim()
        ));
    }
    let host = if o.migrated { 2 } else { 1 };
    // Alive and intact where it runs.
    let last = runs_on.heartbeats().last().map(|h| h.seq).unwrap_or(0);
    if let Err(e) = runs_on.expect_heartbeats(last, 2, Duration::from_secs(20)) {
        o.violations
            .push(format!("guest on host {host} not alive: {e:#}"));
    }
    if !runs_on.errors().is_empty() {
        o.violations
            .push(format!("self-check errors: {:?}", runs_on.errors()));
    }
    // Every member's registry agrees with reality.
    let t = Instant::now();
    loop {
        let views: Vec<Value> = (1..=3)
            .map(|id| record(&c.control(id), &run.guest))
            .collect();
        // A guest the registry never learned of (its first intent was never
        // committed) can only still be on the source.
        let agree = views.iter().all(|r| {
            (r.is_null() && host == 1)
                || (r["owner"].as_u64() == Some(host) && r["migration"]["state"] != "intent")
        });
        if agree {
            o.registry_ms = t.elapsed().as_millis() as u64;
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            o.violations.push(format!(
                "registry disagrees with reality (guest on host {host}): {}",
                views
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(pair);
    Some(o)
}

#[test]
fn randomized_faults_never_lose_or_duplicate_the_guest() {
    let runs = env_u64("DWCP_SOAK_RUNS", 4);
    let first = env_u64("DWCP_SOAK_FIRST", 0);
    let seed = env_u64("DWCP_SOAK_SEED", 1);
    let faults = selected("DWCP_SOAK_FAULTS", &FAULTS);
    let points = selected("DWCP_SOAK_POINTS", &POINTS);
    assert!(
        !faults.is_empty() && !points.is_empty(),
        "DWCP_SOAK_FAULTS and DWCP_SOAK_POINTS must name at least one each"
    );
    // Commits wait 300 ms so faults can land while the tail is held.
    std::env::set_var("DWCP_FAILPOINT_GATE_DELAY_MS", "300");
    let mut c = ClusterLab::with_args("soak", false, &["--idle-timeout", "3"]);
    let t_all = Instant::now();
    let mut rows = Vec::new();
    let mut skipped = 0;
    let mut bad = Vec::new();
    for i in first..first + runs {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(i));
        let run = Run {
            mode: if rng.gen_bool(0.5) {
                Mode::Qmp
            } else {
                Mode::Transport
            },
            fault: faults[rng.gen_range(0..faults.len())].0,
            point: points[rng.gen_range(0..points.len())].0,
            guest: format!("5a0a0000-0000-4000-8000-{:012x}", seed * 100_000 + i),
        };
        let t = Instant::now();
        let Some(o) = one_run(&mut c, i, &run, &mut rng) else {
            skipped += 1;
            continue;
        };
        let row = json!({
            "run": i, "mode": format!("{:?}", run.mode), "fault": format!("{:?}", run.fault),
            "point": format!("{:?}", run.point), "fired": o.fault_fired, "killed": o.killed, "killed_role": o.killed_role,
            "migrated": o.migrated, "error": o.error, "reconciled": o.reconciled, "registry_ms": o.registry_ms,
            "violations": o.violations, "seconds": t.elapsed().as_secs_f64(),
        });
        eprintln!(
            "soak run {i}/{}: {:?} {:?} at {:?}: {} in {:.1} s{}",
            first + runs,
            run.mode,
            run.fault,
            run.point,
            if o.migrated {
                "migrated".to_string()
            } else {
                format!("stayed on the source ({})", o.error)
            },
            t.elapsed().as_secs_f64(),
            if o.violations.is_empty() {
                String::new()
            } else {
                format!(" VIOLATIONS: {:?}", o.violations)
            }
        );
        if !o.violations.is_empty() {
            bad.push(row.clone());
        }
        rows.push(row);
    }
    let migrated = rows.iter().filter(|r| r["migrated"] == true).count();
    // Per fault and point: migrated / stayed on the source / with violations.
    let mut table: std::collections::BTreeMap<String, [u64; 3]> = Default::default();
    for r in &rows {
        let key = format!(
            "{} {}",
            r["fault"].as_str().unwrap_or("?"),
            r["point"].as_str().unwrap_or("?")
        );
        let e = table.entry(key).or_default();
        e[if r["migrated"] == true { 0 } else { 1 }] += 1;
        e[2] += u64::from(!r["violations"].as_array().is_none_or(Vec::is_empty));
    }
    for (k, [m, s, v]) in &table {
        eprintln!("soak table: {k}: {m} migrated, {s} stayed on the source, {v} with violations");
    }
    let summary = json!({
        "runs": runs, "first": first, "skipped": skipped, "seed": seed, "migrated": migrated,
        "stayed": rows.len() - migrated,
        "violations": bad.len(), "seconds": t_all.elapsed().as_secs_f64(),
        "table": table, "rows": rows,
    });
    if let Ok(path) = std::env::var("DWCP_SOAK_REPORT") {
        std::fs::write(&path, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    }
    eprintln!(
        "soak: {runs} runs (seed {seed}, from run {first}; {skipped} skipped, their guests did not boot): {migrated} migrated, {} stayed on the source, {} with violations, {:.0} s",
        rows.len() - migrated,
        bad.len(),
        t_all.elapsed().as_secs_f64()
    );
    assert!(
        bad.is_empty(),
        "runs with violations: {bad:#?}\n{}",
        c.logs()
    );
}
