//! The built `dwcp` binary's failures: one exit code per class, and with
//! `--json` one object `{"error", "kind", "exit_code"}` on stdout (the text
//! error stays on stderr). Needs no root, no QEMU: a missing control
//! socket, bad usage, a bad configuration file, and a migration refused by
//! a destination agent started here on loopback (the source QEMU is a fake
//! QMP server that connects to the route's socket as QEMU would).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const DWCP: &str = env!("CARGO_BIN_EXE_dwcp");

fn dwcp(args: &[&str]) -> Output {
    Command::new(DWCP)
        .args(["--log", "warn"])
        .args(args)
        .env_remove("DWCP_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("running dwcp")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dwcp-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The one JSON object on stdout, checked against the exit status.
fn json_error(o: &Output, kind: &str, code: i32) -> Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stdout {out}\nstderr {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one line of JSON on stdout: {out:?}");
    let v: Value = serde_json::from_str(lines[0]).expect("stdout is JSON");
    assert_eq!(v["kind"], kind, "{v}");
    assert_eq!(v["exit_code"], code, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    v
}

#[test]
fn a_missing_control_socket_exits_3() {
    let dir = scratch("missing");
    let sock = dir.join("agent.sock");
    let sock = sock.to_str().unwrap();
    for args in [
        vec!["--json", "stats", "--agent", sock],
        vec!["stats", "--json", "--agent", sock],
        vec!["--json", "guests", "--agent", sock],
        vec!["--json", "cluster", "status", "--agent", sock],
        vec!["--json", "expect", "vm1", "--agent", sock],
        vec!["--json", "reload-tls", "--agent", sock],
        vec![
            "--json",
            "migrate",
            "--qmp",
            "/nonexistent/qmp.sock",
            "--to",
            "127.0.0.1:9",
            "--insecure",
            "--agent",
            sock,
        ],
    ] {
        let o = dwcp(&args);
        let v = json_error(&o, "agent_unreachable", 3);
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("cannot reach the agent"),
            "{args:?}: {v}"
        );
        // The text error is on stderr as without --json.
        assert!(String::from_utf8_lossy(&o.stderr).contains("dwcp: error: "));
    }
    // Without --json: the same code, nothing on stdout.
    let o = dwcp(&["stats", "--agent", sock]);
    assert_eq!(o.status.code(), Some(3));
    assert!(o.stdout.is_empty());
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("dwcp: error: cannot reach the agent"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_usage_exits_2() {
    let o = dwcp(&["--json", "stats", "--bogus"]);
    let v = json_error(&o, "usage", 2);
    assert!(v["error"].as_str().unwrap().contains("--bogus"), "{v}");
    // A missing required flag, and a conflict found after parsing.
    json_error(
        &dwcp(&["migrate", "--json", "--to", "127.0.0.1:9"]),
        "usage",
        2,
    );
    json_error(&dwcp(&["stats", "--watch", "--json"]), "usage", 2);
    // Without --json: clap's text on stderr, exit 2.
    let o = dwcp(&["stats", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());
    // Help is no error, and it lists the exit codes.
    let o = dwcp(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for want in [
        "3  agent_unreachable",
        "4  migration_failed",
        "6  peer_refused",
    ] {
        assert!(help.contains(want), "{want} not in --help:\n{help}");
    }
}

#[test]
fn config_check_of_a_bad_file_is_a_json_error() {
    let dir = scratch("config");
    let bad = dir.join("dwcp.toml");
    std::fs::write(
        &bad,
        "[transport]\nstreams = 0\ncodec = \"gzip\"\n[agnet]\n",
    )
    .unwrap();
    let o = dwcp(&["--json", "config", "check", bad.to_str().unwrap()]);
    let v = json_error(&o, "config", 1);
    let problems = v["problems"].as_array().expect("problems");
    assert!(!problems.is_empty(), "{v}");
    assert_eq!(v["file"], bad.to_str().unwrap());
    let good = dir.join("good.toml");
    std::fs::write(&good, "[transport]\nstreams = 4\n").unwrap();
    let o = dwcp(&["--json", "config", "check", good.to_str().unwrap()]);
    assert!(o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    // A file that is not there: an error of no particular class.
    let o = dwcp(&[
        "--json",
        "config",
        "check",
        dir.join("none.toml").to_str().unwrap(),
    ]);
    json_error(&o, "error", 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `dwcp agent` on loopback, killed when dropped.
struct AgentProc {
    child: Child,
    dir: PathBuf,
}

impl AgentProc {
    fn start(dir: &Path, listen: Option<u16>) -> AgentProc {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("empty.toml");
        std::fs::write(&config, "").unwrap();
        let mut cmd = Command::new(DWCP);
        cmd.args(["--log", "warn", "--config"])
            .arg(&config)
            .args(["agent", "--insecure", "--run-dir"])
            .arg(dir);
        if let Some(p) = listen {
            cmd.args(["--listen", &format!("127.0.0.1:{p}")]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dwcp agent");
        let a = AgentProc {
            child,
            dir: dir.to_path_buf(),
        };
        let t0 = Instant::now();
        while dwcp_core::agent::control_call(&a.control(), &json!({"op": "ping"})).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "agent did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn control(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fake source QEMU's QMP: answers every command; on `migrate` it
/// connects to the URI's UNIX socket and writes as QEMU would, and the
/// migration fails once the agent drops that connection.
fn fake_qmp(path: &Path) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || serve_qmp(conn));
        }
    });
}

fn serve_qmp(conn: UnixStream) {
    let mut w = conn.try_clone().unwrap();
    let state = Arc::new(Mutex::new(("setup".to_string(), None::<String>)));
    let send = |w: &mut UnixStream, v: Value| {
        let _ = w.write_all(format!("{v}\n").as_bytes());
    };
    send(&mut w, json!({"QMP": {"version": {}, "capabilities": []}}));
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let Ok(req) = serde_json::from_str::<Value>(&line) else {
            return;
        };
        let reply = match req["execute"].as_str().unwrap_or("") {
            "migrate" => {
                let uri = req["arguments"]["uri"].as_str().unwrap_or("").to_string();
                let state = state.clone();
                *state.lock().unwrap() = ("active".into(), None);
                std::thread::spawn(move || {
                    let why = match UnixStream::connect(uri.trim_start_matches("unix:")) {
                        Ok(mut s) => {
                            let _ = s.write_all(&[0u8; 4096]);
                            let mut b = [0u8; 64];
                            // The agent drops the connection it cannot relay.
                            let _ = s.read(&mut b);
                            "Unable to write to socket: Broken pipe".to_string()
                        }
                        Err(e) => format!("Failed to connect to {uri}: {e}"),
                    };
                    *state.lock().unwrap() = ("failed".into(), Some(why));
                });
                json!({})
            }
            "query-migrate" => {
                let (status, why) = state.lock().unwrap().clone();
                json!({"status": status, "error-desc": why,
                       "ram": {"total": 1u64 << 30, "remaining": 1u64 << 30, "transferred": 0}})
            }
            "query-status" => json!({"status": "running"}),
            _ => json!({}),
        };
        send(&mut w, json!({"return": reply}));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_migration_the_destination_does_not_expect_exits_6() {
    let dir = scratch("refused");
    let port = free_port();
    let dst = AgentProc::start(&dir.join("dst"), Some(port));
    let src = AgentProc::start(&dir.join("src"), None);
    let qmp = dir.join("qmp.sock");
    fake_qmp(&qmp);
    let to = format!("127.0.0.1:{port}");
    let migrate = || {
        dwcp(&[
            "--json",
            "migrate",
            "--qmp",
            qmp.to_str().unwrap(),
            "--to",
            &to,
            "--name",
            "vm-refused",
            "--insecure",
            "--timeout",
            "30",
            "--agent",
            src.control().to_str().unwrap(),
        ])
    };
    let o = migrate();
    let v = json_error(&o, "peer_refused", 6);
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("destination refused") && e.contains("expect"),
        "{v}"
    );
    // The agent's stats say why, typed.
    let stats = dwcp_core::agent::control_call(&src.control(), &json!({"op": "stats"})).unwrap();
    let route = &stats["routes"][0];
    assert_eq!(route["last_error"]["refused_by_peer"], true, "{stats}");
    assert_eq!(route["last_error"]["refusal"], "not_expected", "{stats}");

    // Once the destination expects it, the refusal is gone: what fails now
    // is the migration itself (no QEMU listens on the destination), exit 4.
    dwcp_core::agent::control_call(
        &dst.control(),
        &json!({"op": "expect", "name": "vm-refused"}),
    )
    .unwrap();
    let o = migrate();
    json_error(&o, "migration_failed", 4);
    drop((src, dst));
    let _ = std::fs::remove_dir_all(&dir);
}
