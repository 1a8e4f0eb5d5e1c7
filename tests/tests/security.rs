//! Security on real namespaces: TLS 1.3 with mutual authentication on the
//! data port and the destination's authorization (expected names, allowed
//! peers). Each refusal must leave the source running, deliver nothing to
//! the destination QEMU, and leave the agent serving the next honest
//! migration.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_core::tls::testca::{write_file, Issued, LeafSpec, TestCa, Usage};
use dwcp_core::transport::{Session, TransportConfig};
use dwcp_lab::*;
use serde_json::json;

/// The lab's per-host PKI re-issued from a CA this test holds (to sign more
/// certificates from it): each host's certificates have CN `honest` and
/// name only that host's IP; both agents reload.
fn own_pki(lab: &Lab) -> TestCa {
    let ca = TestCa::new("security test CA").unwrap();
    for src in [true, false] {
        let ip = if src {
            lab.topo.src_ip
        } else {
            lab.topo.dst_ip
        }
        .to_string();
        let server = ca
            .issue(&LeafSpec::new("honest", &[ip.as_str()], Usage::Server))
            .unwrap();
        let client = ca
            .issue(&LeafSpec::new("honest", &[ip.as_str()], Usage::Client))
            .unwrap();
        ca.write_layout(lab.tls_dir(src), &server, &client).unwrap();
    }
    for a in [lab.src_agent(), lab.dst_agent()] {
        let r = dwcp_core::agent::control_request(&a.control(), &json!({"op": "reload_tls"}));
        assert!(r.is_ok(), "reload_tls: {r:?}");
    }
    ca
}

/// A PKI directory of `ca` whose client certificate is `client` (its server
/// certificate is never used: this side only connects).
fn pki_with_client(ca: &TestCa, dir: &Path, client: &Issued) {
    let server = ca
        .issue(&LeafSpec::new("unused", &["unused.example"], Usage::Server))
        .unwrap();
    ca.write_layout(dir, &server, client).unwrap();
}

fn tls_cfg(dir: &Path) -> TransportConfig {
    let mut c = TransportConfig {
        streams: 2,
        workers: 1,
        connect_timeout: Duration::from_secs(5),
        ..TransportConfig::default()
    };
    c.tls.dir = dir.to_path_buf();
    c
}

/// `Session::connect` from the source host; the error text, or "ok".
fn connect_from_src(lab: &Lab, cfg: TransportConfig, name: &str) -> String {
    let addr: SocketAddr = lab.dst_addr().parse().unwrap();
    let name = name.to_string();
    lab.topo
        .in_ns(lab.src_ns(), move || {
            match Session::connect(&cfg, &name, addr) {
                Ok(s) => {
                    s.abort("probe only");
                    let _ = s.wait();
                    "ok".to_string()
                }
                Err(e) => e.to_string(),
            }
        })
        .unwrap()
}

fn assert_source_running(pair: &GuestPair) {
    let st = pair.src.qmp().unwrap().status().unwrap();
    assert_eq!(st, "running", "source guest must keep running");
}

fn assert_dst_waiting(pair: &GuestPair) {
    let st = pair.dst.qmp().unwrap().status().unwrap();
    assert_eq!(
        st, "inmigrate",
        "the destination QEMU must still be waiting, untouched"
    );
}

/// The attack of the issue: a host with valid credentials from the same CA
/// runs its own agent with `--route victim=DST:7070` and feeds its own
/// "migration stream" to the destination QEMU waiting for `victim`. The
/// destination expects `victim` only from `honest`: refused, nothing
/// delivered, then the honest migration succeeds with RAM verified.
#[test]
fn attack_from_another_peer_is_refused_then_honest_migration_succeeds() {
    let lab = Lab::new("attack", Middle::Bridge, &[]).unwrap();
    let ca = own_pki(&lab);
    let spec = GuestSpec::default();
    let mig = MigrationSpec {
        name: "victim".into(),
        streams: 2,
        expect_from: Some("honest".into()),
        ..Default::default()
    };
    let pair = boot_pair(&lab, &spec, &mig).unwrap();

    // Mallory: same CA, her own identity, her own agent on the source host.
    let mdir = lab.dir.join("mallory-pki");
    let mallory = ca
        .issue(&LeafSpec::new(
            "mallory",
            &["mallory.example"],
            Usage::Client,
        ))
        .unwrap();
    pki_with_client(&ca, &mdir, &mallory);
    let mrun = lab.dir.join("mallory-run");
    std::fs::create_dir_all(&mrun).unwrap();
    let mlog = lab.dir.join("mallory-agent.log");
    let logf = std::fs::File::create(&mlog).unwrap();
    let mut agent = lab
        .topo
        .exec(lab.src_ns(), dwcp_bin().unwrap())
        .args(["--log", "info", "agent", "--run-dir"])
        .arg(&mrun)
        .arg("--tls-dir")
        .arg(&mdir)
        .args(["--route", &format!("victim={}", lab.dst_addr())])
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    let sock = mrun.join("victim.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "mallory's route");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Her "migration stream": QEMU's magic then bytes of her choosing.
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut forged = b"QEVM\x00\x00\x00\x03".to_vec();
    forged.extend(std::iter::repeat_n(0x41u8, 1 << 20));
    let _ = c.write_all(&forged);
    let _ = c.shutdown(std::net::Shutdown::Write);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.read_to_end(&mut Vec::new());
    drop(c);

    let dlog = lab.dst_agent().log.clone();
    let refused = wait_log(&dlog, "refused");
    assert!(
        refused
            .iter()
            .any(|l| l.contains("victim") && l.contains("mallory")),
        "destination log must name the migration and the peer:\n{}",
        lab.dst_agent().log_text()
    );
    assert!(
        !wait_log(&mlog, "not told to expect").is_empty(),
        "mallory's agent must be told why:\n{}",
        std::fs::read_to_string(&mlog).unwrap_or_default()
    );
    let _ = agent.kill();
    let _ = agent.wait();
    assert_source_running(&pair);
    assert_dst_waiting(&pair);

    // The honest source migrates the guest: accepted, RAM identical.
    let r = dwcp_migrate(&lab, &pair, &mig).unwrap_or_else(|e| {
        panic!(
            "{e:#}\ndestination agent log:\n{}",
            lab.dst_agent().log_text()
        )
    });
    let v = verify(&pair, r, &scratch_dir(&lab).unwrap()).unwrap();
    assert_eq!(v.memory.differing_pages, 0);
    assert!(
        !grep(&dlog, "authorized by expect victim from honest").is_empty(),
        "{}",
        lab.dst_agent().log_text()
    );
}

/// Issue 14: a gated migration's stream must come from the host the
/// cluster's registry names as the guest's source. Three agents in a raft
/// cluster: node 1 (source), node 2 (destination), node 3 on a host of its
/// own with a valid certificate of the cluster's CA. The destination agent
/// prepares the migration of guest G gated on the cluster (intent 1 -> 2),
/// is told to expect the name (as `boot_pair` does) and even has `--allow
/// '*'`. Node 3's agent routes the migration's name to the destination and
/// feeds it a forged stream: refused with NotIntendedSource, logged with
/// the guest, the expected member and node 3's identity; the destination
/// QEMU stays in `inmigrate`, the source guest runs, the gate stays open.
/// Then the honest migration from node 1 goes through the gate with RAM
/// identical.
#[test]
fn gated_migration_from_a_member_that_is_not_the_intended_source_is_refused() {
    use dwcp_core::agent::control_request;
    use dwcp_lab::cluster::{prepared, wait_record, ClusterLab};
    const GUEST: &str = "5ec00000-0000-4000-8000-000000000014";
    let c = ClusterLab::with_third_host("notsrc", &["--allow", "*"]);
    let lab = &c.lab;
    let dst = lab.dst_agent().control();
    let mig = MigrationSpec {
        name: "victim".into(),
        streams: 2,
        ..Default::default()
    };
    let pair = boot_pair(lab, &GuestSpec::default(), &mig).unwrap();
    let v = control_request(
        &dst,
        &json!({"op": "prepare", "name": mig.name, "uuid": GUEST, "gate": true, "src_node": 1}),
    )
    .expect("gated prepare");
    assert_eq!(v["prepared"]["gate"]["state"], "intent", "{v}");

    // Node 3 relays its own "migration stream" for the name.
    let third = c.control(3);
    let r = control_request(
        &third,
        &json!({"op": "route", "name": mig.name, "to": lab.dst_addr()}),
    )
    .expect("route on node 3");
    let sock = r["socket"].as_str().expect("route socket").to_string();
    let mut q = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut forged = b"QEVM\x00\x00\x00\x03".to_vec();
    forged.extend(std::iter::repeat_n(0x41u8, 1 << 20));
    let _ = q.write_all(&forged);
    let _ = q.shutdown(std::net::Shutdown::Write);
    q.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = q.read_to_end(&mut Vec::new());
    drop(q);

    let dlog = lab.dst_agent().log.clone();
    let t3 = c.third_ip.to_string();
    let refused = wait_log(&dlog, "may only come from member 1");
    assert!(
        refused.iter().any(|l| l.contains(GUEST)
            && l.contains(&format!("IP:{t3}"))
            && l.contains("NotIntendedSource")),
        "the destination must log the guest, the expected member and node 3's identity:\n{}",
        lab.dst_agent().log_text()
    );
    let tlog = c.third.as_ref().unwrap().log.clone();
    assert!(
        !wait_log(&tlog, "registry names another host").is_empty(),
        "node 3's agent must be told why:\n{}",
        c.third.as_ref().unwrap().log_text()
    );
    let stats = control_request(&third, &json!({"op": "stats"})).unwrap();
    let route = &stats["routes"][0];
    assert_eq!(
        route["last_error"]["refusal"], "not_intended_source",
        "{stats}"
    );
    assert_source_running(&pair);
    assert_dst_waiting(&pair);
    let p = prepared(&dst, &mig.name);
    assert_eq!(
        p["gate"]["state"], "intent",
        "the refusal must not close the gate: {p}"
    );
    assert_eq!(p["state"], "prepared", "{p}");

    // The intended source: accepted, through the gate, RAM identical.
    let r = dwcp_migrate(lab, &pair, &mig).unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let v = verify(&pair, r, &scratch_dir(lab).unwrap()).unwrap();
    assert_eq!(v.memory.differing_pages, 0);
    assert_eq!(prepared(&dst, &mig.name)["gate"]["state"], "released");
    let why = format!("(the intended source of guest {GUEST}: member 1)");
    assert!(
        !grep(&dlog, &why).is_empty(),
        "the honest session's authorization must name the intended source:\n{}",
        lab.dst_agent().log_text()
    );
    for id in 1..=3 {
        let rec = wait_record(&c.control(id), GUEST, |r| r["owner"] == 2);
        assert_eq!(rec["migration"]["state"], "committed", "{rec}");
    }
    // The raft peers accepted each other's per-host certificates.
    for id in 1..=3 {
        let st = dwcp_lab::cluster::status(&c.control(id));
        assert_eq!(st["refused_connections"], 0, "node {id}: {st}");
    }
}

/// Raft per-member identity with the lab's per-host certificates: the
/// source host's certificate (naming only the source's IP) cannot speak for
/// member 2, the destination host's agent, nor the destination's for
/// member 1. Each impostor connects from its own host's namespace to node 3
/// (a member on the source host that knows both), passes the TLS handshake
/// with its host's real client certificate and sends a vote request
/// claiming to be the other host's member: node 3 refuses the connection,
/// logging the member and the host the certificate does not name, counts
/// it, and raft never sees the vote (node 3's term does not jump); every
/// member still knows a leader.
#[test]
fn a_hosts_certificate_cannot_speak_for_the_other_hosts_raft_member() {
    use dwcp_consensus::net::encode_frame;
    use dwcp_core::tls::{client_handshake, CredentialStore};
    use dwcp_lab::cluster::{status, ClusterLab, CLUSTER_ID};
    use raft::prelude::{Message, MessageType};
    let c = ClusterLab::new("imperson", false);
    let lab = &c.lab;
    let node3 = c.control(3);
    let target: SocketAddr = format!("{}:7103", c.third_ip).parse().unwrap();
    let log3 = c.third.as_ref().unwrap().log.clone();
    for (from_src, as_member) in [(true, 2u64), (false, 1u64)] {
        let (ns, dir, claimed_host) = if from_src {
            (lab.src_ns(), lab.src_tls_dir.clone(), lab.topo.dst_ip)
        } else {
            (lab.dst_ns(), lab.dst_tls_dir.clone(), lab.topo.src_ip)
        };
        let before = status(&node3);
        let term = before["term"].as_u64().unwrap();
        let refused = before["refused_connections"].as_u64().unwrap();
        let mut vote = Message::default();
        vote.set_msg_type(MessageType::MsgRequestVote);
        vote.to = 3;
        vote.from = as_member;
        vote.term = term + 1000;
        vote.log_term = 1000;
        vote.index = 1000;
        let mut frame = Vec::new();
        encode_frame(CLUSTER_ID.parse().unwrap(), &vote, &mut frame);
        lab.topo
            .in_ns(ns, move || {
                let store = CredentialStore::load(&dir).unwrap();
                let tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let link = client_handshake(tcp, store.client_config(), &target.ip().to_string())
                    .expect("the impostor's own certificate passes the TLS handshake");
                let (mut r, mut w) = link.split();
                let _ = w.write_all(&frame);
                // Node 3 closes the connection.
                let _ = r.read_to_end(&mut Vec::new());
            })
            .unwrap();
        let why = format!("does not name member {as_member}'s host {claimed_host}");
        let hits = wait_log(&log3, &why);
        assert!(
            hits.iter()
                .any(|l| l.contains("refused raft peer connection")),
            "node 3 must refuse the host's certificate as member {as_member}:\n{}",
            c.logs()
        );
        let after = status(&node3);
        assert!(
            after["refused_connections"].as_u64().unwrap() > refused,
            "{after}"
        );
        assert!(
            after["term"].as_u64().unwrap() < term + 1000,
            "the impersonated vote reached raft: {after}"
        );
    }
    for id in 1..=3 {
        c.wait_leader(&c.control(id), Duration::from_secs(10));
    }
}

/// Refusals at the TLS layer and the authorization, each from the source
/// host; after every one the agent still accepts an honest session.
#[test]
fn handshake_refusals_then_honest_session_and_sighup_keeps_old_creds() {
    let lab = Lab::new("tlsbad", Middle::Bridge, &[]).unwrap();
    let ca = own_pki(&lab);
    let dlog = lab.dst_agent().log.clone();
    let dst = lab.dst_addr();
    // An incoming socket for `probe`, as a waiting QEMU has; it must never
    // get a connection from a refused session.
    let incoming = lab.dst_agent().incoming("probe");
    std::fs::create_dir_all(incoming.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(&incoming).unwrap();
    listener.set_nonblocking(true).unwrap();
    let delivered = |l: &UnixListener| l.accept().is_ok();
    lab.expect("probe", Some("honest")).unwrap();
    let honest = || {
        let r = connect_from_src(&lab, tls_cfg(&lab.src_tls_dir), "probe");
        assert_eq!(
            r,
            "ok",
            "honest session refused:\n{}",
            lab.dst_agent().log_text()
        );
        while listener.accept().is_ok() {}
    };
    honest();

    // 1. A clear-text client on the TLS port.
    let mut insecure = tls_cfg(&lab.src_tls_dir);
    insecure.tls.insecure = true;
    let e = connect_from_src(&lab, insecure, "probe");
    assert!(e.contains("TLS"), "{e}");
    assert!(!wait_log(&dlog, "not speaking TLS").is_empty());
    assert!(!delivered(&listener));
    honest();

    // 2. A TLS client without a certificate.
    let e = {
        let ca_pem = ca.cert_pem();
        let dst = dst.clone();
        lab.topo
            .in_ns(lab.src_ns(), move || no_cert_client(&dst, &ca_pem))
            .unwrap()
    };
    assert!(!e.is_empty(), "a client without a certificate got in");
    assert!(!wait_log(&dlog, "presented no certificate").is_empty());
    assert!(!delivered(&listener));
    honest();

    // 3. A certificate from another CA.
    let other = lab.dir.join("other-ca");
    let s = lab.topo.src_ip.to_string();
    dwcp_core::tls::testca::write_test_pki(&other, &[&s]).unwrap();
    let e = connect_from_src(&lab, tls_cfg(&other), "probe");
    assert!(e.contains("unknown CA") || e.contains("CA"), "{e}");
    assert!(!delivered(&listener));
    honest();

    // 4. An expired client certificate from the right CA.
    let expired_dir = lab.dir.join("expired");
    let src_host = [s.as_str()];
    let mut spec = LeafSpec::new("honest", &src_host, Usage::Client);
    spec.valid_from_secs = -30 * 86_400;
    spec.valid_until_secs = -2 * 86_400;
    let expired = ca.issue(&spec).unwrap();
    pki_with_client(&ca, &expired_dir, &expired);
    let e = connect_from_src(&lab, tls_cfg(&expired_dir), "probe");
    assert!(e.contains("expired") || e.contains("certificate"), "{e}");
    assert!(!wait_log(&dlog, "expired").is_empty());
    assert!(!delivered(&listener));
    honest();

    // 5. The wrong name for the destination (--tls-hostname).
    let mut wrong = tls_cfg(&lab.src_tls_dir);
    wrong.tls.hostname = Some("not-the-destination.example".into());
    let e = connect_from_src(&lab, wrong, "probe");
    assert!(e.contains("name mismatch"), "{e}");
    assert!(!delivered(&listener));
    honest();

    // 6. A name the destination was not told to expect.
    let e = connect_from_src(&lab, tls_cfg(&lab.src_tls_dir), "nobody");
    assert!(e.contains("not told to expect"), "{e}");
    assert!(!wait_log(&dlog, "\"nobody\" was not expected").is_empty());
    honest();

    // 7. SIGHUP with a broken certificate on the destination host: the old
    // credentials stay. (The source side reads its own host's files.)
    let dst_cert = lab.dst_tls_dir.join("server-cert.pem");
    let good = std::fs::read_to_string(&dst_cert).unwrap();
    write_file(&dst_cert, "garbage\n", 0o644).unwrap();
    let pid = lab.dst_agent.as_ref().unwrap().child.id();
    let st = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let hits = wait_log(&dlog, "TLS reload failed");
    assert!(
        hits.iter().any(|l| l.contains("server-cert.pem")),
        "the log must name the file:\n{}",
        lab.dst_agent().log_text()
    );
    let r = connect_from_src(&lab, tls_cfg(&lab.src_tls_dir), "probe");
    assert_eq!(
        r,
        "ok",
        "after a failed reload:\n{}",
        lab.dst_agent().log_text()
    );
    write_file(&dst_cert, &good, 0o644).unwrap();
    drop(listener);
    let _ = std::fs::remove_file(incoming);
}

/// A TLS client that presents no certificate: the error it ends with.
fn no_cert_client(dst: &str, ca_pem: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(dst).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let host = dst.rsplit_once(':').unwrap().0;
    let link = match dwcp_core::tls::client_handshake(tcp, Arc::new(cfg), host) {
        Ok(l) => l,
        Err(e) => return e.to_string(),
    };
    let (mut r, mut w) = link.split();
    let hello = dwcp_core::wire::Hello {
        version_min: dwcp_core::wire::VERSION_MIN,
        version_max: dwcp_core::wire::VERSION_MAX,
        session: [9; 16],
        stream_index: 0,
        stream_count: 1,
        role: dwcp_core::wire::Role::Data,
        window: 32 << 20,
        ring_pages: 16,
        spill_pages: 0,
        flags: 0,
        name: "probe".into(),
    };
    let _ = w.write_all(&hello.encode());
    match dwcp_core::wire::Reply::read(&mut r) {
        Ok(reply) => format!("{:?}", reply.status).replace("Ok", ""),
        Err(e) => e.to_string(),
    }
}
