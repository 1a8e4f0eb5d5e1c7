//! The Nova path between two real agents in two network namespaces the
//! test creates (a veth pair, an iptables REDIRECT rule on the source, as
//! docs/nova.md sets up a host): real TCP connections to `DEST:PORT` are
//! redirected into the source agent's ingress, carried by one DWCP session
//! and delivered by TCP to a listener at `DEST:PORT` on the destination;
//! and each way a redirected connection is refused. Needs root, `ip` and
//! `iptables`; skipped with a message otherwise.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Sender};
use serde_json::{json, Value};

use super::*;
use crate::agent::{control_request, Agent, AgentConfig};
use crate::transport::{AcceptorLimits, TransportConfig};

#[test]
fn names_and_ports() {
    let a: SocketAddr = "10.0.0.2:49153".parse().unwrap();
    assert_eq!(migration_name(a), "nova-10.0.0.2-49153");
    assert_eq!(name_address("nova-10.0.0.2-49153"), Some(a));
    let b: SocketAddr = "[fd00::2]:49152".parse().unwrap();
    assert_eq!(migration_name(b), "nova-fd00__2-49152");
    assert_eq!(name_address(&migration_name(b)), Some(b));
    crate::wire::check_name(&migration_name(b)).unwrap();
    assert_eq!(name_address("vm-1"), None);
    assert_eq!(name_address("nova-10.0.0.300-1"), None);
    assert_eq!(parse_ports("49152-49215"), Ok(49152..=49215));
    assert_eq!(parse_ports("7000"), Ok(7000..=7000));
    assert!(
        parse_ports("9-1").is_err() && parse_ports("0-5").is_err() && parse_ports("x").is_err()
    );
    // Delivery: only this host's own addresses, only the ports allowed.
    let ports = 49152..=49215;
    assert!(check_delivery("nova-127.0.0.1-49152", "nova-*", &ports).is_ok());
    let e = check_delivery("nova-192.0.2.9-49152", "nova-*", &ports).unwrap_err();
    assert!(e.contains("not an address of this host"), "{e}");
    let e = check_delivery("nova-127.0.0.1-22", "nova-*", &ports).unwrap_err();
    assert!(e.contains("outside --nova-ports"), "{e}");
    let e = check_delivery("nova-x", "nova-*", &ports).unwrap_err();
    assert!(e.contains("does not end in -IP-PORT"), "{e}");
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread in a network namespace of its own: closures sent to it run
/// there, and so do the threads, processes and sockets they create.
struct Netns {
    jobs: Sender<Job>,
    tid: i32,
}

impl Netns {
    fn new() -> Result<Netns, String> {
        let (jobs, rx) = unbounded::<Job>();
        let (ready_tx, ready) = bounded(1);
        std::thread::spawn(move || {
            // SAFETY: unshare and gettid take no pointers; CLONE_NEWNET
            // moves only this thread into a new network namespace.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            let res = if r == 0 {
                // SAFETY: as above.
                Ok(unsafe { libc::gettid() })
            } else {
                Err(std::io::Error::last_os_error().to_string())
            };
            let ok = res.is_ok();
            let _ = ready_tx.send(res);
            if ok {
                for job in rx {
                    job();
                }
            }
        });
        let tid = ready.recv().map_err(|e| e.to_string())??;
        Ok(Netns { jobs, tid })
    }

    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = bounded(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .unwrap();
        rx.recv().unwrap()
    }

    fn sh(&self, cmd: &str) {
        let c = cmd.to_string();
        let out = self.run(move || Command::new("sh").arg("-ec").arg(&c).output().unwrap());
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces and iptables need it)".into());
    }
    for tool in ["ip", "iptables"] {
        let ok = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!("no `{tool}` command"));
        }
    }
    None
}

fn start_agent(tag: &str, listen: Option<SocketAddr>, nova: NovaConfig) -> (Agent, PathBuf) {
    let dir = std::env::temp_dir().join(format!("dwcp-nova-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let a = Agent::start(AgentConfig {
        listen,
        run_dir: dir.clone(),
        incoming_dir: dir.join("incoming"),
        transport: TransportConfig {
            workers: 1,
            streams: 2,
            tls: crate::transport::TlsSettings::insecure(),
            ..TransportConfig::default()
        },
        limits: AcceptorLimits::default(),
        cluster: None,
        gate_timeout: Duration::from_secs(5),
        allow: vec!["nova-*".parse().unwrap()],
        sockets: Default::default(),
        nova,
    })
    .unwrap();
    (a, dir)
}

fn stats(dir: &Path) -> Value {
    control_request(&dir.join("agent.sock"), &json!({"op": "stats"})).unwrap()
}

/// The newest session named `name` in an agent's stats, once it ended.
fn ended_session(dir: &Path, name: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let s = stats(dir)["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .rfind(|s| s["name"] == name)
            .cloned();
        if let Some(s) = s.filter(|s| s["state"] != "running") {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{name} did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a connection the ingress should close is closed (EOF or a
/// reset), after writing a little; panics if it stays open.
fn assert_closed(mut c: TcpStream) {
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = c.write_all(&[7u8; 4096]);
    let mut b = [0u8; 64];
    match c.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("read {n} bytes from a connection that should be closed"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "still open after 15 s"
        ),
    }
}

fn last_refusal(dir: &Path) -> String {
    let v = stats(dir);
    v["nova"]["ingress"]["last_refusals"]
        .as_array()
        .and_then(|a| a.last())
        .map(|r| r["reason"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn redirected_connections_become_one_session_delivered_by_tcp() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED redirected_connections_become_one_session_delivered_by_tcp: {why}");
        return;
    }
    let (src, dst) = match (Netns::new(), Netns::new()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("SKIPPED: cannot create a network namespace: {e}");
            return;
        }
    };
    // The two hosts: 10.99.0.1 (source), 10.99.0.2 (destination).
    src.sh(&format!(
        "ip link set lo up
         ip link add nv-src type veth peer name nv-dst
         ip link set nv-dst netns {}
         ip addr add 10.99.0.1/24 dev nv-src
         ip link set nv-src up",
        dst.tid
    ));
    dst.sh("ip link set lo up
         ip addr add 10.99.0.2/24 dev nv-dst
         ip link set nv-dst up");
    // docs/nova.md's rule on the source; 49161 goes to a second ingress
    // whose destination agent port has no agent (the peer is down).
    src.sh(
        "iptables -t nat -A OUTPUT -p tcp -d 10.99.0.2 --dport 49161 -j REDIRECT --to-ports 7072
         iptables -t nat -A OUTPUT -p tcp -d 10.99.0.0/24 --dport 49152:49215 \
             -m addrtype ! --dst-type LOCAL -j REDIRECT --to-ports 7071",
    );
    let ports = 49152..=49160;
    let (_d, ddir) = dst.run({
        let ports = ports.clone();
        move || {
            start_agent(
                "dst",
                Some("10.99.0.2:7070".parse().unwrap()),
                NovaConfig {
                    deliver_tcp: vec!["nova-*".into()],
                    ports,
                    ..NovaConfig::default()
                },
            )
        }
    });
    let (_s, sdir) = src.run({
        let ports = ports.clone();
        move || {
            start_agent(
                "src",
                None,
                NovaConfig {
                    ingress: Some("127.0.0.1:7071".parse().unwrap()),
                    ports,
                    peer_port: 7070,
                    ..NovaConfig::default()
                },
            )
        }
    });
    let (_s2, s2dir) = src.run(|| {
        start_agent(
            "src-peer-down",
            None,
            NovaConfig {
                ingress: Some("127.0.0.1:7072".parse().unwrap()),
                ports: 49161..=49161,
                peer_port: 7999,
                ..NovaConfig::default()
            },
        )
    });

    // "QEMU" on the destination: -incoming tcp:10.99.0.2:49152, echoing
    // every connection back (the return path carries as much as the
    // stream).
    let qemu = dst.run(|| TcpListener::bind("10.99.0.2:49152").unwrap());
    let (peers_tx, peers) = unbounded();
    std::thread::spawn(move || {
        for c in qemu.incoming() {
            let c = c.unwrap();
            peers_tx.send(c.peer_addr().unwrap()).unwrap();
            std::thread::spawn(move || {
                let (mut r, mut w) = (c.try_clone().unwrap(), c);
                std::io::copy(&mut r, &mut w).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            });
        }
    });

    // "QEMU" on the source: the main channel and one multifd channel to
    // 10.99.0.2:49152, as Nova's tcp:// migrate URI makes it connect.
    let payloads: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            (0..(4 << 20))
                .map(|j: u32| (j.wrapping_mul(2654435761) >> (8 + i)) as u8)
                .collect()
        })
        .collect();
    let conns: Vec<TcpStream> = (0..2)
        .map(|_| src.run(|| TcpStream::connect("10.99.0.2:49152").unwrap()))
        .collect();
    let handles: Vec<_> = conns
        .into_iter()
        .zip(payloads.clone())
        .map(|(c, data)| {
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    w.write_all(&data).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                let mut r = c;
                r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                r.read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                back
            })
        })
        .collect();
    for (h, sent) in handles.into_iter().zip(&payloads) {
        let back = h.join().unwrap();
        assert!(
            back == *sent,
            "channel bytes differ ({} back of {})",
            back.len(),
            sent.len()
        );
    }
    // Both reached QEMU from the destination agent (on its own host).
    for _ in 0..2 {
        let p = peers.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(p.ip().to_string(), "10.99.0.2");
    }
    let name = "nova-10.99.0.2-49152";
    for (dir, role) in [(&sdir, "initiator"), (&ddir, "responder")] {
        let s = ended_session(dir, name);
        assert_eq!(s["state"], "completed", "{role}: {s}");
        assert_eq!(s["role"], role);
        assert_eq!(
            s["channels"].as_array().map(Vec::len),
            Some(2),
            "{role}: {s}"
        );
    }
    let ingress = &stats(&sdir)["nova"]["ingress"];
    assert_eq!(ingress["accepted"], 2, "{ingress}");
    assert_eq!(ingress["refused"], 0, "{ingress}");

    // Refused: a port redirected but outside --nova-ports.
    assert_closed(src.run(|| TcpStream::connect("10.99.0.2:49200").unwrap()));
    let r = last_refusal(&sdir);
    assert!(
        r.contains("10.99.0.2:49200") && r.contains("outside --nova-ports 49152-49160"),
        "{r}"
    );
    // Refused: made to the ingress itself, no original destination.
    assert_closed(src.run(|| TcpStream::connect("127.0.0.1:7071").unwrap()));
    let r = last_refusal(&sdir);
    assert!(r.contains("not a redirected connection"), "{r}");
    // Refused: the destination agent is not there (nothing on its port).
    assert_closed(src.run(|| TcpStream::connect("10.99.0.2:49161").unwrap()));
    let r = last_refusal(&s2dir);
    assert!(
        r.contains("nova-10.99.0.2-49161") && r.contains("10.99.0.2:7999") && r.contains("refused"),
        "{r}"
    );
    // Failed: nothing listens at 10.99.0.2:49153 on the destination; the
    // destination agent names it, the source connection is closed.
    assert_closed(src.run(|| TcpStream::connect("10.99.0.2:49153").unwrap()));
    let s = ended_session(&sdir, "nova-10.99.0.2-49153");
    assert_eq!(s["state"], "failed", "{s}");
    let err = s["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("connecting to QEMU at tcp:10.99.0.2:49153"),
        "{err}"
    );
    // The destination refuses a name for an address that is not its own,
    // before anything reaches a QEMU.
    let e = src
        .run(|| {
            let cfg = TransportConfig {
                workers: 1,
                tls: crate::transport::TlsSettings::insecure(),
                ..TransportConfig::default()
            };
            crate::transport::Session::connect(
                &cfg,
                "nova-10.99.0.1-49152",
                "10.99.0.2:7070".parse().unwrap(),
            )
            .map(|_| ())
        })
        .unwrap_err();
    assert!(e.to_string().contains("no incoming QEMU"), "{e}");
}
