//! End-to-end: the cutover gate of `dwcp migrate --gate` over a 3-member raft
//! cluster of real `dwcp agent`s (real raft logs on disk): node 1 is the source
//! agent, node 2 the destination agent, node 3 a third agent in the source
//! namespace (cluster member only). Needs root (namespaces) and QEMU 10.0.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dwcp_core::agent::control_request;
use dwcp_lab::cluster::{
    partition_dst, prepared, raft_log_bytes, record, spawn_migrate, wait_record, wait_record_for,
    ClusterLab,
};
use dwcp_lab::{boot_pair, dwcp_bin, dwcp_migrate, scratch_dir, verify, GuestSpec, MigrationSpec};
use serde_json::{json, Value};

/// The guest UUID the tests give `--guest-uuid`.
const GUEST: &str = "d3c0a1e2-0000-4000-8000-000000000001";

fn gate_args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["--gate", "--guest-uuid", GUEST, "--dst-node", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn gated_migration_commits_ownership() {
    let t0 = Instant::now();
    let c = ClusterLab::new("cgate", false);
    let lab = &c.lab;
    let spec = GuestSpec::default();
    let mig = MigrationSpec {
        extra: gate_args(&[]),
        ..Default::default()
    };
    let pair = boot_pair(lab, &spec, &mig).expect("boot guests");
    let r = dwcp_migrate(lab, &pair, &mig).unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    assert_eq!(r["status"], "completed", "{r}");
    let gate_ms = r["gate_ms"].as_u64().expect("gate_ms in the result");
    assert_eq!(r["gate"]["epoch"], 1, "{r}");
    assert_eq!(r["gate"]["src"], 1, "{r}");
    let v = verify(&pair, r, &scratch_dir(lab).unwrap()).expect("verification");
    assert_eq!(v.memory.differing_pages, 0);
    // Every member applied the transfer: owner = destination (2), epoch 1.
    for agent in [
        lab.src_agent().control(),
        lab.dst_agent().control(),
        c.third.as_ref().unwrap().control(),
    ] {
        let rec = wait_record(&agent, GUEST, |r| r["owner"] == 2);
        assert_eq!(rec["epoch"], 1, "{rec}");
        assert_eq!(rec["migration"]["state"], "committed", "{rec}");
    }
    for id in 1..=3 {
        assert!(raft_log_bytes(&lab.dir, id) > 0, "raft log of node {id}");
    }
    eprintln!(
        "gated migration: total {} ms, downtime {} ms, gate added {gate_ms} ms, guest pause {} ms; test {:.1} s",
        v.result["total_time_ms"],
        v.result["downtime_ms"],
        v.pause_ms,
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn gate_without_quorum_cancels_and_guest_stays() {
    let t0 = Instant::now();
    // Node 2 (destination) is unreachable for raft from the start; node 3 dies
    // after the intent is recorded, so the commit at pre-switchover has no quorum.
    let mut c = ClusterLab::new("cnoq", true);
    let spec = GuestSpec::default();
    let mig = MigrationSpec {
        // Slow enough that node 3 is gone well before pre-switchover.
        extra: gate_args(&["--max-bandwidth-mb", "30", "--gate-timeout-ms", "3000"]),
        ..Default::default()
    };
    let pair = boot_pair(&c.lab, &spec, &mig).expect("boot guests");
    let src_ctl = c.lab.src_agent().control();
    let child = spawn_migrate(&c.lab, &pair, &mig);
    wait_record(&src_ctl, GUEST, |r| r["migration"]["state"] == "intent");
    drop(c.third.take()); // kills node 3
    let Output { status, stderr, .. } = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(!status.success(), "migration succeeded without quorum");
    assert!(
        stderr.contains("cutover gate closed") && stderr.contains("stays on the source"),
        "{stderr}"
    );
    // No quorum is no refusal: the migration failed (exit 4).
    assert_eq!(status.code(), Some(4), "{stderr}");
    // The guest keeps running on the source, intact.
    assert_eq!(pair.src.qmp().unwrap().status().unwrap(), "running");
    let last = pair.src.heartbeats().last().map(|h| h.seq).unwrap_or(0);
    pair.src
        .expect_heartbeats(last, 2, Duration::from_secs(20))
        .expect("source guest alive after the cancel");
    if let Ok(mut q) = pair.dst.qmp() {
        assert_ne!(q.status().unwrap_or_default(), "running");
    }
    // Recovery: node 3 back, quorum of 1 and 3; the destination never owned it.
    c.start_third();
    c.wait_leader(&src_ctl, Duration::from_secs(15));
    let rec = record(&src_ctl, GUEST);
    assert_eq!(rec["owner"], 1, "{rec}");
    assert_ne!(rec["migration"]["state"], "committed", "{rec}");
    // Closing the intent (the best-effort abort had no quorum) goes through now.
    let t = Instant::now();
    while let Err(e) = control_request(
        &src_ctl,
        &json!({"op": "abort", "guest": GUEST, "epoch": 1}),
    ) {
        assert!(t.elapsed() < Duration::from_secs(10), "abort: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rec = wait_record(&src_ctl, GUEST, |r| r["migration"]["state"] == "aborted");
    assert_eq!(rec["owner"], 1, "{rec}");
    eprintln!(
        "no-quorum gate: migrate said {:?}; test {:.1} s",
        stderr.lines().find(|l| l.contains("gate")).unwrap_or(""),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn second_begin_for_a_migrating_guest_is_refused() {
    let t0 = Instant::now();
    let c = ClusterLab::new("cdup", false);
    let src = c.lab.src_agent().control();
    let v = control_request(
        &src,
        &json!({"op": "begin", "guest": GUEST, "src": 1, "dst": 2}),
    )
    .expect("first begin");
    assert_eq!(v["epoch"], 1);
    // Straight through the control socket, to another destination.
    let e = control_request(
        &src,
        &json!({"op": "begin", "guest": GUEST, "src": 1, "dst": 3}),
    )
    .expect_err("second begin accepted");
    assert!(e.contains("already migrating (1 -> 2, epoch 1)"), "{e}");
    // Through `dwcp migrate --gate`: refused before any route or QMP is touched.
    let out = Command::new(dwcp_bin().unwrap())
        .args([
            "--json",
            "migrate",
            "--qmp",
            "/nonexistent/qmp.sock",
            "--to",
        ])
        .arg(c.lab.dst_addr())
        .arg("--agent")
        .arg(&src)
        .args(gate_args(&[]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refused to begin") && stderr.contains("already migrating"),
        "{stderr}"
    );
    // Refused by the cluster: exit 5, and the JSON error says so.
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON error on stdout");
    assert_eq!(j["kind"], "cluster_refused", "{j}");
    assert!(
        j["error"]
            .as_str()
            .unwrap_or("")
            .contains("already migrating"),
        "{j}"
    );
    let stats = control_request(&src, &json!({"op": "stats"})).unwrap();
    assert_eq!(stats["routes"].as_array().map(Vec::len), Some(0), "{stats}");
    // The open intent still commits; afterwards the new owner may begin again.
    control_request(
        &c.lab.dst_agent().control(),
        &json!({"op": "commit", "guest": GUEST, "epoch": 1}),
    )
    .expect("commit");
    let e = control_request(
        &src,
        &json!({"op": "begin", "guest": GUEST, "src": 1, "dst": 3}),
    )
    .expect_err("begin by a former owner");
    assert!(e.contains("owned by host 2"), "{e}");
    let v = control_request(
        &src,
        &json!({"op": "begin", "guest": GUEST, "src": 2, "dst": 3}),
    )
    .expect("begin by the owner");
    assert_eq!(v["epoch"], 2);
    // The CLI views.
    let out = Command::new(dwcp_bin().unwrap())
        .args(["guests", "--agent"])
        .arg(&src)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(GUEST) && text.contains("owner 2"), "{text}");
    let out = Command::new(dwcp_bin().unwrap())
        .args(["cluster", "status", "--json", "--agent"])
        .arg(&src)
        .output()
        .unwrap();
    let st: Value = serde_json::from_slice(&out.stdout).expect("cluster status --json");
    assert_eq!(st["members"].as_array().map(Vec::len), Some(3), "{st}");
    eprintln!(
        "second begin refused; test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Runs the libvirt hook (libvirt-hooks/qemu.d/dwcp) as libvirtd would on
/// `migrate begin`: `dwcp DOM migrate begin -` with the domain XML on stdin,
/// against the agent at `agent`. Returns (exit ok, stderr).
fn hook_migrate_begin(agent: &Path, dir: &Path, dom: &str) -> (bool, String) {
    let conf = dir.join(format!("hook-{dom}.conf"));
    std::fs::write(
        &conf,
        format!(
            "agent_socket={}\nlog={}\nstate_dir={}\n",
            agent.display(),
            dir.join("hook.log").display(),
            dir.join("hook-state").display()
        ),
    )
    .unwrap();
    let xml = format!("<domain type='qemu'><name>{dom}</name><uuid>{GUEST}</uuid></domain>");
    let mut child = Command::new("python3")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../libvirt-hooks/qemu.d/dwcp"))
        .args([dom, "migrate", "begin", "-"])
        .env("DWCP_HOOK_CONF", &conf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 and the hook");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The libvirt hook's `migrate begin` asks the cluster: a guest the registry
/// shows migrating, or already owned by the destination host, is refused
/// before libvirt starts anything; otherwise it is allowed.
#[test]
fn libvirt_hook_asks_the_cluster_before_accepting_a_migration() {
    let c = ClusterLab::new("chook", false);
    let (src, dst) = (c.lab.src_agent().control(), c.lab.dst_agent().control());
    let dir = c.lab.dir.clone();
    // Unknown to the registry: allowed.
    let (ok, err) = hook_migrate_begin(&dst, &dir, "g-free");
    assert!(ok, "unknown guest refused: {err}");
    // On a cluster member the hook prepares a gated migration; the registry
    // does not know the guest, so the intent waits for the source to connect.
    let p = prepared(&dst, "g-free");
    assert_eq!(p["gate"]["state"], "pending", "{p}");
    control_request(
        &dst,
        &json!({"op": "release", "name": "g-free", "outcome": "failed"}),
    )
    .expect("release");
    // An open intent 1 -> 2: refused on the destination.
    let v = control_request(
        &src,
        &json!({"op": "begin", "guest": GUEST, "src": 1, "dst": 2}),
    )
    .expect("begin");
    let epoch = v["epoch"].as_u64().unwrap();
    wait_record(&dst, GUEST, |r| r["migration"]["state"] == "intent");
    let (ok, err) = hook_migrate_begin(&dst, &dir, "g-migrating");
    assert!(!ok, "a migrating guest was accepted");
    assert!(
        err.contains("cluster gate") && err.contains("already migrating (host 1 -> host 2"),
        "{err}"
    );
    // Committed to host 2: host 2 refuses it (it would run twice), host 1 may
    // take it back.
    control_request(
        &dst,
        &json!({"op": "commit", "guest": GUEST, "epoch": epoch}),
    )
    .expect("commit");
    wait_record(&dst, GUEST, |r| r["owner"] == 2);
    let (ok, err) = hook_migrate_begin(&dst, &dir, "g-owned");
    assert!(!ok, "a guest owned by the destination was accepted");
    assert!(err.contains("already owned by this host (node 2)"), "{err}");
    wait_record(&src, GUEST, |r| r["owner"] == 2);
    let (ok, err) = hook_migrate_begin(&src, &dir, "g-back");
    assert!(ok, "migration back to host 1 refused: {err}");
    // ... and the hook recorded the intent 2 -> 1 through the gated prepare.
    let p = prepared(&src, "g-back");
    assert_eq!(p["gate"]["state"], "intent", "{p}");
    assert_eq!(p["gate"]["epoch"], 2, "{p}");
    let rec = wait_record(&dst, GUEST, |r| r["migration"]["state"] == "intent");
    assert_eq!(
        (
            rec["migration"]["source"].as_u64(),
            rec["migration"]["destination"].as_u64()
        ),
        (Some(2), Some(1)),
        "{rec}"
    );
}

/// The transport gate, as libvirt-driven migrations use it: the destination
/// agent is told (as the libvirt hook does at `migrate begin`) that the
/// incoming migration is gated, records the intent, and holds the end of the
/// main channel until the ownership transfer commits. The source QEMU is
/// driven without any gate of its own, with a return path (libvirt's
/// default), so the source never closes first and the gate opens when the
/// held tail is QEMU's end of stream and the channel goes quiet.
#[test]
fn transport_gate_commits_before_the_destination_can_finish() {
    let t0 = Instant::now();
    let c = ClusterLab::new("ctgate", false);
    let lab = &c.lab;
    let dst = lab.dst_agent().control();
    let mig = MigrationSpec::default();
    assert!(mig.return_path);
    let pair = boot_pair(lab, &GuestSpec::default(), &mig).expect("boot guests");
    let v = control_request(
        &dst,
        &json!({"op": "prepare", "name": mig.name, "uuid": GUEST, "gate": true, "src_node": 1}),
    )
    .expect("gated prepare");
    assert_eq!(v["prepared"]["gate"]["state"], "intent", "{v}");
    assert_eq!(v["prepared"]["gate"]["epoch"], 1, "{v}");
    wait_record(&lab.src_agent().control(), GUEST, |r| {
        r["migration"]["state"] == "intent"
    });
    let r = dwcp_migrate(lab, &pair, &mig).unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    assert_eq!(r["status"], "completed", "{r}");
    let p = prepared(&dst, &mig.name);
    assert_eq!(p["gate"]["state"], "released", "{p}");
    let commit_ms = p["gate"]["commit_ms"].as_u64().expect("commit_ms");
    let v = verify(&pair, r, &scratch_dir(lab).unwrap()).expect("verification");
    assert_eq!(v.memory.differing_pages, 0);
    for agent in [
        lab.src_agent().control(),
        dst.clone(),
        c.third.as_ref().unwrap().control(),
    ] {
        let rec = wait_record(&agent, GUEST, |r| r["owner"] == 2);
        assert_eq!(rec["migration"]["state"], "committed", "{rec}");
    }
    eprintln!(
        "transport gate: total {} ms, downtime {} ms, commit {commit_ms} ms; test {:.1} s",
        v.result["total_time_ms"],
        v.result["downtime_ms"],
        t0.elapsed().as_secs_f64()
    );
}

/// The destination loses the raft majority after the intent is recorded:
/// the gate cannot commit, so QEMU on the destination never gets the end of
/// the stream, the migration fails, the guest keeps running on the source,
/// and once the partition heals the destination agent's background settle
/// aborts the intent (the registry agrees with reality).
#[test]
fn transport_gate_without_quorum_fails_the_migration_and_guest_stays() {
    let t0 = Instant::now();
    let c = ClusterLab::new("ctnoq", false);
    let lab = &c.lab;
    let (src, dst) = (lab.src_agent().control(), lab.dst_agent().control());
    let mig = MigrationSpec::default();
    let pair = boot_pair(lab, &GuestSpec::default(), &mig).expect("boot guests");
    control_request(
        &dst,
        &json!({"op": "prepare", "name": mig.name, "uuid": GUEST, "gate": true, "src_node": 1}),
    )
    .expect("gated prepare");
    partition_dst(lab, true);
    let e = dwcp_migrate(lab, &pair, &mig).expect_err("migration completed without quorum");
    let e = format!("{e:#}");
    assert!(e.contains("failed"), "{e}");
    // The guest runs on the source, intact; the destination never ran it.
    assert_eq!(pair.src.qmp().unwrap().status().unwrap(), "running");
    let last = pair.src.heartbeats().last().map(|h| h.seq).unwrap_or(0);
    pair.src
        .expect_heartbeats(last, 2, Duration::from_secs(20))
        .expect("source guest alive");
    assert!(pair.src.errors().is_empty(), "{:?}", pair.src.errors());
    if let Ok(mut q) = pair.dst.qmp() {
        assert_ne!(q.status().unwrap_or_default(), "running");
    }
    let p = prepared(&dst, &mig.name);
    assert_eq!(p["state"], "failed", "{p}");
    assert!(
        matches!(p["gate"]["state"].as_str(), Some("closed" | "aborted")),
        "{p}"
    );
    // Heal: the destination's settle thread records the abort.
    partition_dst(lab, false);
    let rec = wait_record_for(&src, GUEST, Duration::from_secs(30), |r| {
        r["migration"]["state"] == "aborted"
    });
    assert_eq!(rec["owner"], 1, "{rec}");
    eprintln!(
        "transport gate without quorum: migrate said {e:?}; test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// What the cutover gate costs (run by `make bench-gate`, not by `make
/// test`): over the link profile `$DWCP_GATE_LINK` (default dc), the same
/// guest migrated ungated, through the QMP gate and through the transport
/// gate, `$DWCP_GATE_REPEAT` (3) rounds interleaved; QEMU's downtime and
/// total time, the gate's own time, memory verified each time. Writes
/// `$DWCP_GATE_REPORT` (JSON) when set.
#[test]
#[ignore]
fn gate_cost_over_link() {
    let link = std::env::var("DWCP_GATE_LINK").unwrap_or_else(|_| "dc".into());
    let repeat: usize = std::env::var("DWCP_GATE_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let prof: dwcp_lab::Profile = link.parse().expect("DWCP_GATE_LINK: a link profile");
    let c = ClusterLab::over("gcost", prof.middle(), &[]);
    let lab = &c.lab;
    let mut rows: Vec<Value> = Vec::new();
    for round in 0..repeat {
        for mode in ["ungated", "qmp", "transport"] {
            let guest = format!("6a0a0000-0000-4000-8000-{:012x}", round * 10 + rows.len());
            let spec = GuestSpec {
                fill_mb: 64,
                seed: round as u64 + 1,
                ..GuestSpec::default()
            };
            let mut mig = MigrationSpec {
                codec: "auto".into(),
                timeout_s: 600,
                ..Default::default()
            };
            if mode == "qmp" {
                mig.extra = vec![
                    "--gate".into(),
                    "--guest-uuid".into(),
                    guest.clone(),
                    "--dst-node".into(),
                    "2".into(),
                ];
            }
            let pair = boot_pair(lab, &spec, &mig).expect("boot guests");
            if mode == "transport" {
                control_request(
                    &lab.dst_agent().control(),
                    &json!({"op": "prepare", "name": mig.name, "uuid": guest, "gate": true, "src_node": 1}),
                )
                .expect("gated prepare");
            }
            let r = dwcp_migrate(lab, &pair, &mig).unwrap_or_else(|e| panic!("{mode}: {e:#}"));
            let gate_ms = match mode {
                "qmp" => r["gate_ms"].as_u64(),
                "transport" => {
                    prepared(&lab.dst_agent().control(), &mig.name)["gate"]["commit_ms"].as_u64()
                }
                _ => None,
            };
            let v = verify(&pair, r, &scratch_dir(lab).unwrap()).expect("verification");
            assert_eq!(v.memory.differing_pages, 0);
            let row = json!({"link": link, "round": round, "mode": mode,
                "downtime_ms": v.result["downtime_ms"], "total_ms": v.result["total_time_ms"],
                "gate_ms": gate_ms});
            eprintln!("{row}");
            rows.push(row);
        }
    }
    let med = |mode: &str, k: &str| -> f64 {
        let mut v: Vec<f64> = rows
            .iter()
            .filter(|r| r["mode"] == mode)
            .filter_map(|r| r[k].as_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!("gate cost over {link} ({repeat} rounds, medians):");
    println!(
        "{:>10} {:>12} {:>10} {:>9}",
        "mode", "downtime ms", "total ms", "gate ms"
    );
    for mode in ["ungated", "qmp", "transport"] {
        println!(
            "{mode:>10} {:>12.0} {:>10.0} {:>9.0}",
            med(mode, "downtime_ms"),
            med(mode, "total_ms"),
            med(mode, "gate_ms")
        );
    }
    if let Ok(p) = std::env::var("DWCP_GATE_REPORT") {
        std::fs::write(p, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
}
