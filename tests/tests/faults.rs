//! Bad input and faults on real migrations: garbage on the data port, a
//! corrupted frame, an agent killed mid-migration, bad CLI values. After each
//! failure the source guest must still be running, and a retry must succeed
//! with the destination's RAM identical to the source's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use dwcp_lab::*;

fn assert_source_running(pair: &GuestPair) {
    let st = pair.src.qmp().unwrap().status().unwrap();
    assert_eq!(
        st, "running",
        "source guest must keep running after a failed migration"
    );
    let last = pair.src.heartbeats().last().map(|h| h.seq).unwrap_or(0);
    pair.src
        .expect_heartbeats(last, 2, Duration::from_secs(20))
        .expect("source heartbeats after failure");
}

#[test]
fn hostile_bytes_and_corrupted_frame_then_retry_succeeds() {
    // Clear text: this test feeds the DWCP parsers themselves (with TLS a
    // flipped bit fails record decryption first; tests/tests/security.rs
    // covers the TLS port).
    let mut lab = Lab::new("hostile", Middle::Bridge, &["--insecure"]).unwrap();
    // Garbage, a wrong magic, a future version, a truncated hello.
    let dst = lab.dst_addr();
    let hostile: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        b"DWCQ\x01\x00\x01\x00".to_vec(),
        {
            let mut h = dwcp_core::wire::Hello {
                version_min: 7,
                version_max: 9,
                session: [3; 16],
                stream_index: 0,
                stream_count: 1,
                role: dwcp_core::wire::Role::Data,
                window: 1 << 24,
                ring_pages: 16,
                spill_pages: 0,
                flags: 0,
                name: "vm".into(),
            }
            .encode();
            h.truncate(h.len());
            h
        },
        b"DWCP\x01\x00\x01\x00\x00".to_vec(),
    ];
    lab.topo
        .in_ns(lab.src_ns(), move || {
            for bytes in hostile {
                let mut s = TcpStream::connect(&dst).unwrap();
                s.write_all(&bytes).unwrap();
                let _ = s.shutdown(std::net::Shutdown::Write);
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            }
        })
        .unwrap();
    let log = lab.dst_agent().log.clone();
    assert!(
        !wait_log(&log, "bad magic").is_empty(),
        "no 'bad magic' in the agent log"
    );
    assert!(!wait_log(&log, "no common protocol version").is_empty());
    assert!(!wait_log(&log, "truncated hello").is_empty());

    // A corrupted frame: one bit flipped 6 MB into the first stream.
    let spec = GuestSpec::default();
    let mig = MigrationSpec {
        streams: 2,
        codec: "lz4".into(),
        ..Default::default()
    };
    let mut pair = boot_pair(&lab, &spec, &mig).unwrap();
    spawn_proxy(&lab, 7071, Some(6_000_000)).unwrap();
    let via_proxy = format!("{}:7071", lab.topo.dst_ip);
    let saved = lab.dst_addr();
    let mut cmd = Command::new(dwcp_bin().unwrap());
    cmd.args(["--log", "warn", "migrate", "--json", "--qmp"])
        .arg(&pair.src.qmp_path)
        .args(["--to", &via_proxy, "--name", "vm", "--agent"])
        .arg(lab.src_agent().control())
        .args([
            "--streams",
            "2",
            "--codec",
            "lz4",
            "--return-path",
            "--timeout",
            "120",
        ]);
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "migration through a corrupting link succeeded?"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed") || err.contains("error"), "{err}");
    let hits = wait_log(&log, "checksum mismatch");
    assert!(
        !hits.is_empty(),
        "destination agent did not report the checksum failure:\n{}",
        lab.dst_agent().log_text()
    );
    assert_source_running(&pair);
    assert_ne!(
        pair.dst
            .qmp()
            .map(|mut q| q.status().unwrap_or_default())
            .unwrap_or_default(),
        "paused"
    );

    // Retry on the clean path succeeds and the guest arrives intact.
    assert_eq!(saved, lab.dst_addr());
    restart_destination(&lab, &mut pair, &spec, &mig).unwrap();
    let r = dwcp_migrate(&lab, &pair, &mig).unwrap();
    verify(&pair, r, &scratch_dir(&lab).unwrap()).unwrap();
    lab.src_agent = None;
}

/// Starts `dwcp migrate` of `pair` at 20 MB/s (slow enough for a fault to
/// land mid-migration) and returns once more than 5 MiB reached the
/// destination agent.
// The child is returned; the caller waits on it (and it is reaped before a panic here).
#[allow(clippy::zombie_processes)]
fn start_slow_migration(lab: &Lab, pair: &GuestPair) -> std::process::Child {
    let mut cmd = Command::new(dwcp_bin().unwrap());
    cmd.args(["--log", "warn", "migrate", "--json", "--qmp"])
        .arg(&pair.src.qmp_path)
        .args(["--to", &lab.dst_addr(), "--name", "vm", "--agent"])
        .arg(lab.src_agent().control())
        .args([
            "--streams",
            "4",
            "--return-path",
            "--max-bandwidth-mb",
            "20",
            "--timeout",
            "120",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    loop {
        let v = dwcp_core::agent::control_request(
            &lab.dst_agent().control(),
            &serde_json::json!({"op": "stats"}),
        );
        let flowing = v
            .ok()
            .and_then(|v| v["sessions"][0]["raw_in"].as_u64())
            .unwrap_or(0)
            > 5 << 20;
        if flowing {
            return child;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            panic!("migration never started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agent_killed_mid_migration_then_retry_succeeds() {
    let mut lab = Lab::new("kill", Middle::Bridge, &[]).unwrap();
    let spec = GuestSpec {
        dirty_mbps: 16,
        ..GuestSpec::default()
    };
    // Slow QEMU down so the kill lands mid-migration.
    let slow = MigrationSpec {
        streams: 4,
        extra: vec!["--max-bandwidth-mb".into(), "20".into()],
        ..Default::default()
    };
    let mut pair = boot_pair(&lab, &spec, &slow).unwrap();
    // Wait until bytes flow, then kill the destination agent.
    let child = start_slow_migration(&lab, &pair);
    lab.dst_agent.as_mut().unwrap().kill();
    let killed = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = killed.elapsed();
    assert!(
        !out.status.success(),
        "migration succeeded without its destination agent"
    );
    assert!(took < Duration::from_secs(30), "failure took {took:?}");
    eprintln!(
        "migration failed {took:?} after the kill: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert_source_running(&pair);

    lab.start_agent(false).unwrap();
    let mig = MigrationSpec {
        streams: 4,
        ..Default::default()
    };
    restart_destination(&lab, &mut pair, &spec, &mig).unwrap();
    let r = dwcp_migrate(&lab, &pair, &mig).unwrap();
    verify(&pair, r, &scratch_dir(&lab).unwrap()).unwrap();
}

/// SIGTERM drains the destination agent: the migration in flight gets the
/// grace period (1 s here, too short for it), then fails with the reason; the
/// agent exits 0, the source keeps running, and a new agent takes the retry.
#[test]
fn sigterm_drains_the_agent_and_the_retry_succeeds() {
    let mut lab = Lab::new("term", Middle::Bridge, &["--shutdown-grace-s", "1"]).unwrap();
    let spec = GuestSpec::default();
    let slow = MigrationSpec {
        streams: 4,
        extra: vec!["--max-bandwidth-mb".into(), "20".into()],
        ..Default::default()
    };
    let mut pair = boot_pair(&lab, &spec, &slow).unwrap();
    let child = start_slow_migration(&lab, &pair);
    let agent = lab.dst_agent.as_mut().unwrap();
    let st = Command::new("kill")
        .args(["-TERM", &agent.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let exit = agent.child.wait().unwrap();
    assert!(exit.success(), "the draining agent exited with {exit:?}");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        log.contains("0 migration(s) finished in the grace period, 1 failed by the shutdown"),
        "{log}"
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "migration succeeded through a drained agent"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("migration failed: {}", err.trim());
    assert_source_running(&pair);

    lab.start_agent(false).unwrap();
    let mig = MigrationSpec {
        streams: 4,
        ..Default::default()
    };
    restart_destination(&lab, &mut pair, &spec, &mig).unwrap();
    let r = dwcp_migrate(&lab, &pair, &mig).unwrap();
    verify(&pair, r, &scratch_dir(&lab).unwrap()).unwrap();
}

#[test]
fn bad_cli_values_name_the_option_and_range() {
    let bin = dwcp_bin().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["agent", "--streams", "0", "--run-dir", "/tmp/dwcp-badcli"],
            "streams = 0 is out of range: 1..=256",
        ),
        (
            &["agent", "--streams", "300", "--run-dir", "/tmp/dwcp-badcli"],
            "streams = 300 is out of range",
        ),
        (
            &[
                "agent",
                "--codec",
                "zstd:99",
                "--run-dir",
                "/tmp/dwcp-badcli",
            ],
            "--codec",
        ),
        (
            &["agent", "--window-mb", "0", "--run-dir", "/tmp/dwcp-badcli"],
            "window",
        ),
        (
            &["agent", "--route", "vm", "--run-dir", "/tmp/dwcp-badcli"],
            "expected NAME=HOST:PORT",
        ),
        (
            &[
                "migrate",
                "--qmp",
                "/nonexistent.sock",
                "--to",
                "127.0.0.1:1",
                "--agent",
                "/nonexistent/agent.sock",
            ],
            "is `dwcp agent` running?",
        ),
        (
            &["stats", "--agent", "/nonexistent/agent.sock"],
            "cannot reach the agent",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(&bin).args(*args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: expected {want:?} in:\n{err}");
    }
}
