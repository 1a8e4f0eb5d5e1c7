//! The agent through its control socket: prepared migrations, bad input,
//! and a route relaying a session between two real agents.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::expect::check_intended_source;
use super::{
    control_call, control_request, Agent, AgentConfig, ClusterError, ClusterErrorKind, ClusterOps,
    SocketAccess, KEEP_PREPARED,
};
use crate::tls::PeerIdentity;
use crate::transport::{AcceptorLimits, Session, TransportConfig};
use crate::wire::Status;

/// A real agent on a fresh temp run dir (and a data port when `listen`).
fn agent(tag: &str, listen: bool) -> (Agent, PathBuf, Option<SocketAddr>) {
    agent_in(tag, listen, None)
}

/// [`agent`], a member of `cluster` when given.
fn agent_in(
    tag: &str,
    listen: bool,
    cluster: Option<Arc<dyn ClusterOps>>,
) -> (Agent, PathBuf, Option<SocketAddr>) {
    agent_with(tag, listen, cluster, SocketAccess::default())
}

/// [`agent_in`] with this socket ownership.
fn agent_with(
    tag: &str,
    listen: bool,
    cluster: Option<Arc<dyn ClusterOps>>,
    sockets: SocketAccess,
) -> (Agent, PathBuf, Option<SocketAddr>) {
    agent_limited(tag, listen, cluster, sockets, AcceptorLimits::default())
}

/// [`agent_with`] with these data-port limits.
fn agent_limited(
    tag: &str,
    listen: bool,
    cluster: Option<Arc<dyn ClusterOps>>,
    sockets: SocketAccess,
    limits: AcceptorLimits,
) -> (Agent, PathBuf, Option<SocketAddr>) {
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
        limits,
        cluster,
        gate_timeout: Duration::from_secs(5),
        allow: vec!["*".parse().unwrap()],
        sockets,
        nova: Default::default(),
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
        "transfer_leader",
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

/// A cluster as node 2 sees it: members 1 and 3 at the hosts in `hosts`,
/// `begin` records an open intent (epoch 1) that `open_intents` shows.
#[derive(Debug, Default)]
struct Members {
    hosts: Mutex<Vec<(u64, String)>>,
    intents: Mutex<Vec<(String, u64, u64, u64)>>,
}

impl Members {
    fn new(hosts: &[(u64, &str)]) -> Arc<Members> {
        Arc::new(Members {
            hosts: Mutex::new(hosts.iter().map(|(n, h)| (*n, h.to_string())).collect()),
            ..Default::default()
        })
    }
}

impl ClusterOps for Members {
    fn node_id(&self) -> u64 {
        2
    }
    fn status(&self) -> Value {
        Value::Null
    }
    fn guests(&self) -> Value {
        Value::Null
    }
    fn begin(&self, guest: &str, src: u64, dst: u64) -> Result<u64, ClusterError> {
        self.intents.lock().push((guest.to_string(), 1, src, dst));
        Ok(1)
    }
    fn commit(&self, _: &str, _: u64) -> Result<(), ClusterError> {
        Ok(())
    }
    fn abort(&self, guest: &str, _: u64) -> Result<(), ClusterError> {
        self.intents.lock().retain(|i| i.0 != guest);
        Ok(())
    }
    fn revert(&self, _: &str, _: u64) -> Result<(), ClusterError> {
        Ok(())
    }
    fn owner(&self, _: &str) -> Option<u64> {
        None
    }
    fn member_at(&self, ip: std::net::IpAddr) -> Option<u64> {
        let ip = ip.to_string();
        let h = self.hosts.lock();
        let at: Vec<u64> = h.iter().filter(|(_, a)| *a == ip).map(|m| m.0).collect();
        (at.len() == 1).then(|| at[0])
    }
    fn member_identity(&self, node: u64) -> Option<String> {
        self.hosts
            .lock()
            .iter()
            .find(|(n, _)| *n == node)
            .map(|m| m.1.clone())
    }
    fn open_intents(&self) -> Vec<(String, u64, u64, u64)> {
        self.intents.lock().clone()
    }
}

const GUEST: &str = "7e570000-0000-4000-8000-00000000000a";

/// A certificate identity naming `ips` (IP SANs) and CN `cn`.
fn cert(cn: &str, ips: &[&str]) -> PeerIdentity {
    PeerIdentity {
        subject: format!("CN={cn},O=test"),
        common_name: Some(cn.into()),
        dns_names: Vec::new(),
        ip_addresses: ips.iter().map(|i| i.parse().unwrap()).collect(),
    }
}

fn at(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 40000)
}

/// The intended-source check on its own: the registry's intent names member
/// 1 (10.0.0.1); member 3 (10.0.0.3), a host an `--allow` rule would
/// accept, is refused with `NotIntendedSource` naming the guest, the
/// expected member and the peer; TLS by the certificate, clear text by the
/// address; before the intent exists, the member at the peer's address.
#[test]
fn only_the_source_the_registry_intent_names_may_feed_a_gated_migration() {
    let c = Members::new(&[(1, "10.0.0.1"), (3, "10.0.0.3"), (4, "host-d.example")]);
    let ops: Arc<dyn ClusterOps> = c.clone();
    let gate = super::cutover::AgentGate::new(ops.clone(), GUEST, Some(1), Duration::from_secs(1))
        .unwrap();
    let check = |id: Option<&PeerIdentity>, from: &str| {
        check_intended_source(ops.as_ref(), &gate, "g1", id, at(from))
    };
    // TLS: the certificate must name member 1's host.
    let one = cert("src1", &["10.0.0.1"]);
    let three = cert("member3", &["10.0.0.3"]);
    assert_eq!(check(Some(&one), "10.0.0.1").unwrap(), 1);
    // The certificate decides, not the address it comes from.
    assert!(check(Some(&one), "10.0.0.3").is_ok());
    let r = check(Some(&three), "10.0.0.3").unwrap_err();
    assert_eq!(r.status, Status::NotIntendedSource);
    for want in [
        GUEST,
        "\"g1\"",
        "member 1",
        "10.0.0.1",
        "CN=member3",
        "IP:10.0.0.3",
    ] {
        assert!(r.reason.contains(want), "{:?} lacks {want:?}", r.reason);
    }
    // A certificate naming both hosts names member 1's too.
    assert!(check(Some(&cert("both", &["10.0.0.3", "10.0.0.1"])), "10.0.0.3").is_ok());
    // Clear text: the peer's address must be member 1's.
    assert!(check(None, "10.0.0.1").is_ok());
    assert!(check(None, "::ffff:10.0.0.1").is_ok());
    let r = check(None, "10.0.0.3").unwrap_err();
    assert_eq!(r.status, Status::NotIntendedSource);
    assert!(r.reason.contains("10.0.0.3 (clear text)"), "{}", r.reason);
    // The registry's intent is what counts: it now names member 4, a DNS name.
    c.intents.lock()[0].2 = 4;
    let four = PeerIdentity {
        dns_names: vec!["HOST-D.example".into()],
        ..cert("d", &[])
    };
    assert_eq!(check(Some(&four), "10.0.0.4").unwrap(), 4);
    assert!(check(Some(&one), "10.0.0.1").is_err());
    // A member with no known address: refused, saying so.
    c.intents.lock()[0].2 = 9;
    let r = check(Some(&one), "10.0.0.1").unwrap_err();
    assert!(r.reason.contains("member 9"), "{}", r.reason);
    assert!(r.reason.contains("does not know"), "{}", r.reason);

    // No intent yet (gate pending): the member at the peer's address.
    c.intents.lock().clear();
    let pending =
        super::cutover::AgentGate::new(ops.clone(), GUEST, None, Duration::from_secs(1)).unwrap();
    let check = |id: Option<&PeerIdentity>, from: &str| {
        check_intended_source(ops.as_ref(), &pending, "g1", id, at(from))
    };
    assert_eq!(check(Some(&three), "10.0.0.3").unwrap(), 3);
    assert!(check(None, "10.0.0.3").is_ok());
    let r = check(Some(&one), "10.0.0.3").unwrap_err();
    assert!(r.reason.contains("member 3"), "{}", r.reason);
    let r = check(Some(&one), "10.0.0.77").unwrap_err();
    assert!(r.reason.contains("cannot be identified"), "{}", r.reason);
}

/// Over the data port: a gated migration whose intent names member 1
/// (127.0.0.2) is refused to a session from 127.0.0.1 (member 3) with
/// status 11, even under `--allow '*'`; nothing reaches the incoming socket
/// and the gate stays open; once member 1 is at 127.0.0.1 the same session
/// is accepted.
#[test]
fn data_port_refuses_a_gated_session_from_another_member_before_qemu() {
    let c = Members::new(&[(1, "127.0.0.2"), (3, "127.0.0.1")]);
    let (_dst, ddir, daddr) = agent_in("notsrc", true, Some(c.clone()));
    let daddr = daddr.unwrap();
    let r = ctl(
        &ddir,
        json!({"op": "prepare", "name": "g1", "uuid": GUEST, "gate": true, "src_node": 1}),
    )
    .unwrap();
    assert_eq!(r["prepared"]["gate"]["state"], "intent", "{r}");
    let incoming = UnixListener::bind(ddir.join("incoming/g1.sock")).unwrap();
    incoming.set_nonblocking(true).unwrap();
    let cfg = TransportConfig {
        streams: 2,
        workers: 1,
        tls: crate::transport::TlsSettings::insecure(),
        ..TransportConfig::default()
    };
    let e = Session::connect(&cfg, "g1", daddr).unwrap_err();
    assert_eq!(
        e.peer_refusal(),
        Some(crate::transport::PeerRefusal::NotIntendedSource)
    );
    let e = e.to_string();
    assert!(
        e.contains("registry names another host as the source"),
        "{e}"
    );
    assert!(incoming.accept().is_err(), "a refused session reached QEMU");
    let p = &prepared(&ddir)[0];
    assert_eq!(p["state"], "prepared", "{p}");
    assert_eq!(p["gate"]["state"], "intent", "{p}");

    c.hosts.lock()[0].1 = "127.0.0.1".into();
    c.hosts.lock()[1].1 = "127.0.0.3".into();
    let s = Session::connect(&cfg, "g1", daddr).expect("the intended source is accepted");
    s.abort("probe only");
    let _ = s.wait();
    let _ = std::fs::remove_dir_all(&ddir);
}

/// A guest migrated to the same destination twice, back to back: the first
/// session's end must not use up the `expect` made for the second (found by
/// `dwcp load-test`, whose guests migrate back to back: every other
/// migration was refused as not expected).
#[test]
fn a_session_ending_uses_up_only_the_expectations_made_before_it_started() {
    let (a, dir, _) = agent("expect-next", false);
    let expected = || a.state.expected.lock().len();
    ctl(&dir, json!({"op": "expect", "name": "vm"})).unwrap();
    ctl(&dir, json!({"op": "expect", "name": "other"})).unwrap();
    a.state.expectation_used("vm", std::time::Instant::now());
    assert_eq!(expected(), 1, "the used expectation goes, the other stays");
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(2));
    ctl(&dir, json!({"op": "expect", "name": "vm"})).unwrap();
    a.state.expectation_used("vm", started);
    assert_eq!(expected(), 2, "the next migration's expectation stays");
}

#[test]
fn socket_group_and_mode_reach_dirs_and_route_sockets_not_the_control_socket() {
    use std::os::unix::fs::MetadataExt;
    let gid = super::sockets::test_gid();
    let (_a, dir, _) = agent_with(
        "sockmode",
        false,
        None,
        SocketAccess {
            group: Some(gid),
            mode: 0o660,
        },
    );
    let mode = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(mode(&dir), (gid, 0o750));
    assert_eq!(mode(&dir.join("incoming")), (gid, 0o1770));
    assert_eq!(mode(&dir.join("agent.sock")).1, 0o600);
    assert_ne!(mode(&dir.join("agent.sock")).0, gid);
    let r = ctl(
        &dir,
        json!({"op": "route", "name": "g1", "to": "127.0.0.1:9"}),
    )
    .unwrap();
    assert_eq!(r["socket"], json!(dir.join("g1.sock")));
    assert_eq!(mode(&dir.join("g1.sock")), (gid, 0o660));
    // Replacing the route keeps group and mode.
    ctl(
        &dir,
        json!({"op": "route", "name": "g1", "to": "127.0.0.1:10"}),
    )
    .unwrap();
    assert_eq!(mode(&dir.join("g1.sock")), (gid, 0o660));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stale_route_socket_is_reused_a_live_one_refused() {
    let (_a, dir, _) = agent("stale", false);
    // A crashed agent's socket: the file is there, nobody listens.
    drop(UnixListener::bind(dir.join("g1.sock")).unwrap());
    ctl(
        &dir,
        json!({"op": "route", "name": "g1", "to": "127.0.0.1:9"}),
    )
    .unwrap();
    UnixStream::connect(dir.join("g1.sock")).expect("the new route listens");
    // Something else listens on g2.sock: refused, and it keeps its socket.
    let other = UnixListener::bind(dir.join("g2.sock")).unwrap();
    let e = ctl(
        &dir,
        json!({"op": "route", "name": "g2", "to": "127.0.0.1:9"}),
    )
    .unwrap_err();
    assert!(
        e.contains("g2.sock") && e.contains("another process is listening"),
        "{e}"
    );
    other.set_nonblocking(true).unwrap();
    let _probe = other.accept(); // the check's own connection, if any
    UnixStream::connect(dir.join("g2.sock")).expect("still the other listener's");
    // A second agent on the same run dir: its control socket is live, refused.
    let e = Agent::start(AgentConfig {
        listen: None,
        run_dir: dir.clone(),
        incoming_dir: dir.join("incoming"),
        transport: TransportConfig {
            workers: 1,
            tls: crate::transport::TlsSettings::insecure(),
            ..TransportConfig::default()
        },
        limits: AcceptorLimits::default(),
        cluster: None,
        gate_timeout: Duration::from_secs(5),
        allow: vec![],
        sockets: SocketAccess::default(),
        nova: Default::default(),
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("another process is listening"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// At `max_handshakes` the data port stops accepting instead of refusing:
/// a migration set up while a silent peer holds the only handshake slot
/// waits in the accept queue and goes through once that peer times out.
#[test]
fn a_full_handshake_table_queues_new_connections_instead_of_refusing_them() {
    let limits = AcceptorLimits {
        max_handshakes: 1,
        handshake_timeout: Duration::from_secs(1),
        ..AcceptorLimits::default()
    };
    let (_src, sdir, _) = agent("q-src", false);
    let (_dst, ddir, daddr) = agent_limited("q-dst", true, None, SocketAccess::default(), limits);
    let daddr = daddr.unwrap();
    // The silent peer: connects and sends nothing.
    let silent = std::net::TcpStream::connect(daddr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    ctl(&ddir, json!({"op": "expect", "name": "q1", "ttl_s": 60})).unwrap();
    let r = ctl(
        &sdir,
        json!({"op": "route", "name": "q1", "to": daddr.to_string(), "streams": 1}),
    )
    .unwrap();
    let incoming = UnixListener::bind(ddir.join("incoming/q1.sock")).unwrap();
    let qemu = std::thread::spawn(move || {
        let (mut c, _) = incoming.accept().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        got
    });
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let t0 = std::time::Instant::now();
    let mut q = UnixStream::connect(r["socket"].as_str().unwrap()).unwrap();
    q.write_all(&payload).unwrap();
    q.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    q.read_to_end(&mut rest).unwrap();
    assert_eq!(
        qemu.join().unwrap(),
        payload,
        "the queued migration's bytes"
    );
    // It waited for the silent peer's slot (about the 1-s handshake
    // timeout), and was not refused.
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let stats = ctl(&sdir, json!({"op": "stats"})).unwrap();
    assert_eq!(stats["routes"][0]["last_error"], Value::Null, "{stats}");
    drop(silent);
    let _ = std::fs::remove_dir_all(&sdir);
    let _ = std::fs::remove_dir_all(&ddir);
}

/// Routing a name again with the same settings keeps the route (its socket
/// is not re-bound, no thread is started); other settings replace it.
#[test]
fn the_same_route_again_is_kept_other_settings_replace_it() {
    use std::os::unix::fs::PermissionsExt;
    let (_src, sdir, _) = agent("keep-src", false);
    // A mark on the socket file: a route that is kept keeps it, a new
    // route binds a new file (with the agent's mode).
    const MARK: u32 = 0o604;
    let route = |streams: u16| {
        let r = ctl(
            &sdir,
            json!({"op": "route", "name": "k1", "to": "127.0.0.1:9", "streams": streams}),
        )
        .unwrap();
        let socket = PathBuf::from(r["socket"].as_str().unwrap());
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        (socket, mode)
    };
    let (socket, mode) = route(2);
    assert_ne!(mode, MARK);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(MARK)).unwrap();
    assert_eq!(route(2).1, MARK, "the same route again: kept");
    assert_eq!(route(1).1, mode, "other settings: a new route");
    let routes = ctl(&sdir, json!({"op": "stats"})).unwrap()["routes"].clone();
    assert_eq!(routes.as_array().map(Vec::len), Some(1), "{routes}");
    assert_eq!(routes[0]["streams"], 1);
    let _ = std::fs::remove_dir_all(&sdir);
}
