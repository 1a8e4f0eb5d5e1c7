//! The agent through its control socket: prepared migrations, bad input,
//! and a route relaying a session between two real agents.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::{control_call, control_request, Agent, AgentConfig, ClusterErrorKind, KEEP_PREPARED};
use crate::transport::{AcceptorLimits, TransportConfig};

/// A real agent on a fresh temp run dir (and a data port when `listen`).
fn agent(tag: &str, listen: bool) -> (Agent, PathBuf, Option<SocketAddr>) {
    let dir = std::env::temp_dir().join(format!("dwcp-agent-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let addr = listen.then(|| {
        // A free port: bind :0, read it, let it go for the agent.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    });
    let transport = TransportConfig {
        workers: 1,
        tls: crate::transport::TlsSettings::insecure(),
        ..TransportConfig::default()
    };
    let a = Agent::start(AgentConfig {
        listen: addr,
        run_dir: dir.clone(),
        incoming_dir: dir.join("incoming"),
        transport,
        limits: AcceptorLimits::default(),
        cluster: None,
        gate_timeout: Duration::from_secs(5),
        allow: vec!["*".parse().unwrap()],
    })
    .unwrap();
    (a, dir, addr)
}

fn ctl(dir: &Path, req: Value) -> Result<Value, String> {
    control_request(&dir.join("agent.sock"), &req)
}

fn prepared(dir: &Path) -> Vec<Value> {
    ctl(dir, json!({"op": "stats"})).unwrap()["prepared"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn prepare_started_release_shows_in_stats() {
    let (_a, dir, _) = agent("life", false);
    let uuid = "0b2c5e9e-5a4f-4c1e-9a57-3f1f2b8c9d10";
    let r = ctl(
        &dir,
        json!({"op": "prepare", "name": "g1", "uuid": uuid, "transport": "tcp",
               "streams": 2, "codec": "zstd", "source_host": "10.0.0.1",
               "chosen_by": "metadata"}),
    )
    .unwrap();
    assert_eq!(r["prepared"]["state"], "prepared");
    let p = prepared(&dir);
    assert_eq!(p.len(), 1);
    let e = &p[0];
    assert_eq!(
        (&e["name"], &e["uuid"], &e["streams"], &e["codec"]),
        (&json!("g1"), &json!(uuid), &json!(2), &json!("zstd"))
    );
    assert_eq!(e["source_host"], "10.0.0.1");
    assert_eq!(e["chosen_by"], "metadata");
    assert!(e["prepared_at"].as_f64().unwrap() > 1.6e9);
    assert!(e["started_at"].is_null() && e["used"].is_null());

    let r = ctl(&dir, json!({"op": "started", "name": "g1"})).unwrap();
    assert_eq!(r["prepared"]["state"], "started");
    assert!(prepared(&dir)[0]["started_at"].as_f64().is_some());

    let r = ctl(
        &dir,
        json!({"op": "release", "name": "g1", "outcome": "failed", "reason": "QEMU exited"}),
    )
    .unwrap();
    assert_eq!(r["changed"], true);
    let e = &prepared(&dir)[0];
    assert_eq!(e["state"], "failed");
    assert_eq!(e["reason"], "QEMU exited");
    assert!(e["ended_at"].as_f64().is_some());
    // Releasing a finished entry again changes nothing.
    let r = ctl(
        &dir,
        json!({"op": "release", "name": "g1", "outcome": "ok"}),
    )
    .unwrap();
    assert_eq!(r["changed"], false);
    assert_eq!(prepared(&dir)[0]["state"], "failed");

    // A second prepare of the same name supersedes an active one.
    ctl(&dir, json!({"op": "prepare", "name": "g2"})).unwrap();
    ctl(&dir, json!({"op": "prepare", "name": "g2", "streams": 3})).unwrap();
    let p = prepared(&dir);
    assert_eq!(p.len(), 3);
    assert_eq!(p[1]["state"], "failed");
    assert_eq!(p[1]["reason"], "superseded by a new prepare");
    // Unset fields take the agent's defaults.
    assert_eq!(
        (&p[1]["streams"], &p[1]["codec"]),
        (&json!(4), &json!("auto"))
    );
    assert_eq!(p[2]["streams"], 3);
    assert_eq!(p[2]["chosen_by"], "unspecified");
    ctl(
        &dir,
        json!({"op": "release", "name": "g2", "outcome": "ok"}),
    )
    .unwrap();
    assert_eq!(prepared(&dir)[2]["state"], "released");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_gets_clear_errors() {
    let (_a, dir, _) = agent("bad", false);
    let long = "x".repeat(65);
    let cases = [
        (
            json!({"op": "prepare", "name": "g1", "codec": "lz9"}),
            "prepare: codec \"lz9\"",
        ),
        (
            json!({"op": "prepare", "name": "g1", "codec": "zstd:99"}),
            "codec \"zstd:99\"",
        ),
        (
            json!({"op": "prepare", "name": "g1", "streams": 0}),
            "streams = 0 is out of range: 1..=256",
        ),
        (
            json!({"op": "prepare", "name": "g1", "streams": 999}),
            "streams = 999 is out of range: 1..=256",
        ),
        (
            json!({"op": "prepare", "name": long}),
            "name is 65 bytes long: at most 64",
        ),
        (
            json!({"op": "prepare", "name": "../etc"}),
            "invalid migration name",
        ),
        (json!({"op": "prepare"}), "missing field `name`"),
        (
            json!({"op": "prepare", "name": "g1", "transport": "rdma"}),
            "no RDMA streams",
        ),
        (
            json!({"op": "prepare", "name": "g1", "transport": "udp"}),
            "transport \"udp\" is not tcp or rdma",
        ),
        (
            json!({"op": "prepare", "name": "g1", "uuid": "nope"}),
            "uuid \"nope\" is not a UUID",
        ),
        (
            json!({"op": "prepare", "name": "g1", "strems": 2}),
            "unknown field `strems`",
        ),
        (
            json!({"op": "prepare", "name": "g1", "gate": true}),
            "gate: this agent is not a cluster member",
        ),
        (
            json!({"op": "prepare", "name": "g1", "src_node": 1}),
            "src_node is only meaningful with \"gate\": true",
        ),
        (
            json!({"op": "reconcile", "guest": "x"}),
            "reconcile: this agent is not a cluster member",
        ),
        (
            json!({"op": "prepare", "name": "g1", "chosen_by": "y".repeat(300)}),
            "chosen_by is 300 bytes long: at most 256",
        ),
        (
            json!({"op": "started", "name": "g9"}),
            "no prepared migration named \"g9\" is active",
        ),
        (
            json!({"op": "release", "name": "g9", "outcome": "ok"}),
            "no prepared migration named \"g9\"",
        ),
        (
            json!({"op": "release", "name": "g9", "outcome": "maybe"}),
            "outcome \"maybe\" is not ok or failed",
        ),
        (
            json!({"op": "release", "name": "g9"}),
            "missing field `outcome`",
        ),
    ];
    for (req, want) in cases {
        let err = ctl(&dir, req.clone()).unwrap_err();
        assert!(err.contains(want), "{req}: {err:?} does not say {want:?}");
    }
    assert!(prepared(&dir).is_empty(), "a refused prepare left an entry");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cluster op on an agent that is no member: refused with the op, the
/// reason and `"kind": "not_member"`, before its fields are looked at.
#[test]
fn cluster_ops_on_a_non_member_say_so_with_a_kind() {
    let (_a, dir, _) = agent("nomember", false);
    let sock = dir.join("agent.sock");
    for op in [
        "cluster_status",
        "guests",
        "begin",
        "commit",
        "abort",
        "revert",
        "settle",
        "reconcile",
    ] {
        let e = control_call(&sock, &json!({"op": op})).unwrap_err();
        assert!(
            e.message.starts_with(&format!(
                "{op}: this agent is not a cluster member (start it with"
            )),
            "{e}"
        );
        assert_eq!(e.kind, Some(ClusterErrorKind::NotMember), "{op}");
    }
    // Other refusals carry no kind.
    let e = control_call(&sock, &json!({"op": "unroute", "name": "x"})).unwrap_err();
    assert_eq!((e.message.as_str(), e.kind), ("no route named \"x\"", None));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn table_keeps_the_newest() {
    let (_a, dir, _) = agent("bound", false);
    for i in 0..KEEP_PREPARED + 6 {
        ctl(&dir, json!({"op": "prepare", "name": format!("vm{i}")})).unwrap();
    }
    let p = prepared(&dir);
    assert_eq!(p.len(), KEEP_PREPARED);
    assert_eq!(p[0]["name"], "vm6");
    assert_eq!(
        p[KEEP_PREPARED - 1]["name"],
        format!("vm{}", KEEP_PREPARED + 5)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The prepared choice drives a route that sets none of its own, the
/// relayed session is linked to the entries on both agents, reports what
/// it used, and its completion releases them.
#[test]
fn prepared_settings_drive_the_route_and_the_session_ends_the_entry() {
    let (_src, sdir, _) = agent("src", false);
    let (_dst, ddir, daddr) = agent("dst", true);
    let daddr = daddr.unwrap();
    for dir in [&sdir, &ddir] {
        ctl(
            dir,
            json!({"op": "prepare", "name": "g1", "streams": 3, "codec": "zstd:1",
                   "chosen_by": "metadata"}),
        )
        .unwrap();
    }
    let r = ctl(
        &sdir,
        json!({"op": "route", "name": "g1", "to": daddr.to_string()}),
    )
    .unwrap();
    let routes = ctl(&sdir, json!({"op": "stats"})).unwrap()["routes"].clone();
    assert_eq!(routes[0]["streams"], 3);
    assert_eq!(routes[0]["codec"], "zstd:1");
    assert_eq!(routes[0]["settings_from"], "prepared");

    // The destination "QEMU": listens where the agent delivers, echoes EOF.
    let incoming = UnixListener::bind(ddir.join("incoming/g1.sock")).unwrap();
    let qemu = std::thread::spawn(move || {
        let (mut c, _) = incoming.accept().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        got.len()
    });
    let payload: Vec<u8> = (0..4u32 << 20).map(|i| (i / 4096) as u8).collect();
    let mut q = UnixStream::connect(r["socket"].as_str().unwrap()).unwrap();
    q.write_all(&payload).unwrap();
    q.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    q.read_to_end(&mut rest).unwrap();
    assert_eq!(qemu.join().unwrap(), payload.len());

    for (dir, role) in [(&sdir, "initiator"), (&ddir, "responder")] {
        let mut e = Value::Null;
        for _ in 0..200 {
            e = prepared(dir)[0].clone();
            if e["state"] == "released" {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        assert_eq!(e["state"], "released", "{role}: {e}");
        assert_eq!(e["reason"], "session completed");
        let u = &e["used"];
        assert_eq!(u["role"], role);
        assert_eq!(u["state"], "completed");
        assert_eq!(u["streams"], 3, "{role}: {e}");
        assert!(
            u["codec"].as_str().unwrap().starts_with("zstd"),
            "{role}: {e}"
        );
        assert_eq!(e["used_matches"], true, "{role}: {e}");
    }
    // A release after the session ended it keeps the session's verdict.
    let r = ctl(
        &ddir,
        json!({"op": "release", "name": "g1", "outcome": "failed"}),
    )
    .unwrap();
    assert_eq!(r["changed"], false);
    assert_eq!(r["prepared"]["state"], "released");
    // A route with its own settings says so.
    ctl(
        &sdir,
        json!({"op": "route", "name": "g1", "to": daddr.to_string(), "streams": 1}),
    )
    .unwrap();
    let routes = ctl(&sdir, json!({"op": "stats"})).unwrap()["routes"].clone();
    assert_eq!(routes[0]["settings_from"], "request");
    let _ = std::fs::remove_dir_all(&sdir);
    let _ = std::fs::remove_dir_all(&ddir);
}
