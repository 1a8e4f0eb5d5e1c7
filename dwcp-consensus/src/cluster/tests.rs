use super::*;
use crate::net::encode_frame;
use dwcp_core::tls::testca::{write_test_pki, LeafSpec, TestCa, Usage};
use raft::prelude::{Message, MessageType};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;

/// A fresh CA and certificates for 127.0.0.1 under `dir/name`.
fn pki(dir: &Path, name: &str) -> Arc<CredentialStore> {
    let d = dir.join(name);
    write_test_pki(&d, &["127.0.0.1", "localhost"]).unwrap();
    Arc::new(CredentialStore::load(&d).unwrap())
}

fn three(dir: &Path, cluster_id: u64, tls: Option<Arc<CredentialStore>>) -> Vec<Cluster> {
    three_on(
        dir,
        cluster_id,
        &["127.0.0.1"; 3],
        &[tls.clone(), tls.clone(), tls],
    )
}

/// Three members, member i listening on `hosts[i]` with the credentials `tls[i]`.
fn three_on(
    dir: &Path,
    cluster_id: u64,
    hosts: &[&str; 3],
    tls: &[Option<Arc<CredentialStore>>; 3],
) -> Vec<Cluster> {
    let ls: Vec<TcpListener> = hosts
        .iter()
        .map(|h| TcpListener::bind(format!("{h}:0")).unwrap())
        .collect();
    let peers: Vec<PeerAddr> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| PeerAddr {
            id: i as u64 + 1,
            addr: l.local_addr().unwrap().to_string(),
        })
        .collect();
    ls.into_iter()
        .enumerate()
        .map(|(i, l)| {
            let id = i as u64 + 1;
            let cfg =
                ClusterConfig::new(id, peers.clone(), dir.join(id.to_string()), cluster_id, "")
                    .with_tls(tls[i].clone());
            Cluster::start_with_listener(cfg, l).unwrap()
        })
        .collect()
}

fn leader(cs: &[Cluster]) -> &Cluster {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = cs.iter().find(|c| c.status().role == "leader") {
            return c;
        }
        assert!(Instant::now() < end, "no leader over TCP");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A vote request with a huge term: stepping it would bump the target's term.
fn hostile_vote(target: &Cluster) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgRequestVote);
    m.to = target.id();
    m.from = 3;
    m.term = target.status().term + 1000;
    m.log_term = 1000;
    m.index = 1000;
    m
}

#[test]
fn peer_list_parsing() {
    let p = PeerAddr::parse_list("1=host-a:7000, 2=host-b:7000,").unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(
        p[1],
        PeerAddr {
            id: 2,
            addr: "host-b:7000".into()
        }
    );
    for bad in ["x=1.2.3.4:5", "0=h:1", "1=h", "1=:5", "1=h:99999", "1"] {
        assert!(PeerAddr::parse(bad).is_err(), "{bad}");
    }
}

fn migrate_a_guest(tls: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = tls.then(|| pki(dir.path(), "pki"));
    let cs = three(dir.path(), 0xD3C9, store);
    let l = leader(&cs);
    let g = Uuid::from_u128(0xfeed);
    let epoch = l.begin_migration(g, 1, 2).unwrap();
    assert!(matches!(
        l.begin_migration(g, 1, 3),
        Err(ClusterError::Propose(ProposeError::Rejected(_)))
    ));
    // From a follower: raft forwards the proposal to the leader (once
    // the follower has heard from it).
    let f = cs.iter().find(|c| c.id() != l.id()).unwrap();
    wait_until("follower learns the leader", 5, || {
        f.node().status().leader == Some(l.id())
    });
    f.commit_migration(g, epoch).unwrap();
    wait_until("ownership replicated", 5, || {
        cs.iter().all(|c| c.owner(g).map(|r| r.owner) == Some(2))
    });
    let st = f.status();
    assert_eq!(st.members.len(), 3);
    assert_eq!(st.guests, 1);
    assert_eq!(st.peer_tls, tls);
    assert_eq!(st.refused_connections, 0);
    let json = serde_json::to_string(&st).unwrap();
    assert!(json.contains("\"leader\""));
    let guests = serde_json::to_value(f.guests()).unwrap();
    assert_eq!(guests["guests"][0]["owner"], 2);
    assert_eq!(guests["history"][0]["state"], "committed");
}

#[test]
fn three_nodes_over_tls_migrate_a_guest() {
    migrate_a_guest(true);
}

#[test]
fn three_nodes_insecure_migrate_a_guest() {
    migrate_a_guest(false);
}

/// Clear text (`--insecure`): the frame checks are the only gate.
#[test]
fn bad_peer_input_is_rejected_and_never_stepped() {
    let dir = tempfile::tempdir().unwrap();
    let cs = three(dir.path(), 77, None);
    let l = leader(&cs);
    let target = cs.iter().find(|c| c.id() != l.id()).unwrap();
    let m = hostile_vote(target);
    let term = target.status().term;
    let addr = target.local_addr();
    let send = |bytes: &[u8]| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.flush();
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut wrong_cluster = Vec::new();
    encode_frame(78, &m, &mut wrong_cluster);
    send(&wrong_cluster);
    let mut bad_crc = Vec::new();
    encode_frame(77, &m, &mut bad_crc);
    let n = bad_crc.len();
    bad_crc[n - 1] ^= 1;
    send(&bad_crc);
    send(b"\x00\x01garbage that is not a frame at all....");
    let mut oversized = Vec::new();
    encode_frame(77, &m, &mut oversized);
    oversized[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    send(&oversized);
    wait_until("frames rejected", 3, || {
        target.transport().stats().rejected.load(Ordering::Relaxed) >= 4
    });
    let st = target.status();
    assert!(
        st.term < term + 1000,
        "a rejected frame reached raft: {st:?}"
    );
    assert_eq!(st.rejected_frames, 4);
    assert!(!st.peer_tls);
    // The cluster still works.
    leader(&cs).register_guest(Uuid::from_u128(1), 1).unwrap();
}

/// With TLS, clear-text bytes (even a well-formed frame of this cluster)
/// never reach the frame parser.
#[test]
fn clear_text_peer_is_refused_by_a_tls_member() {
    let dir = tempfile::tempdir().unwrap();
    let cs = three(dir.path(), 77, Some(pki(dir.path(), "pki")));
    let l = leader(&cs);
    let target = cs.iter().find(|c| c.id() != l.id()).unwrap();
    let term = target.status().term;
    let mut frame = Vec::new();
    encode_frame(77, &hostile_vote(target), &mut frame);
    for bytes in [&frame[..], b"\x16\x03\x01garbage, not a client hello"] {
        let mut s = std::net::TcpStream::connect(target.local_addr()).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.flush();
    }
    wait_until("clear-text connections refused", 5, || {
        target.status().refused_connections >= 2
    });
    let st = target.status();
    assert!(st.term < term + 1000, "clear text reached raft: {st:?}");
    assert_eq!(st.rejected_frames, 0, "clear text reached the frame parser");
    leader(&cs).register_guest(Uuid::from_u128(1), 1).unwrap();
}

/// Accepts any server certificate: the hostile peer does not care who we are.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client presenting `dir`'s client certificate (another CA's) and
/// trusting any server.
fn hostile_client(dir: &Path) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("client-cert.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        .with_client_auth_cert(certs, key)
        .unwrap();
    Arc::new(cfg)
}

/// The security issue's case: a raft peer with a certificate from another
/// CA is refused (logged with its address and the reason), injects
/// nothing, and the cluster keeps committing; a new member with the
/// right CA joins.
#[test]
fn peer_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "pki");
    let evil = pki(dir.path(), "evil-pki");
    let cs = three(dir.path(), 0xC1A5, Some(good.clone()));
    let l = leader(&cs);
    l.register_guest(Uuid::from_u128(1), 1).unwrap();
    let target = cs.iter().find(|c| c.id() != l.id()).unwrap();
    let term = target.status().term;
    let delivered = || {
        cs.iter()
            .map(|c| c.transport().stats().delivered.load(Ordering::Relaxed))
            .sum::<u64>()
    };

    // 1. A hostile client that skips server verification and presents the
    // other CA's client certificate, then writes a well-formed frame of
    // this cluster with the right cluster id.
    let tcp = std::net::TcpStream::connect(target.local_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = tcp.local_addr().unwrap().to_string();
    let mut frame = Vec::new();
    encode_frame(0xC1A5, &hostile_vote(target), &mut frame);
    // TLS 1.3: the client's handshake ends before the server has checked
    // its certificate, so it may get as far as sending records.
    if let Ok(link) = dwcp_core::tls::client_handshake(tcp, hostile_client(evil.dir()), "127.0.0.1")
    {
        let mut w = link.writer();
        let _ = w.write_all(&frame);
    }
    wait_until("another CA's client refused", 5, || {
        target.status().refused_connections >= 1
    });
    let why = target
        .transport()
        .stats()
        .last_rejection
        .lock()
        .clone()
        .unwrap_or_default();
    assert!(why.contains(&me), "refusal does not name the peer: {why}");
    // Both test CAs carry the same name, so webpki finds "our" CA as the
    // issuer and the signature check fails; a CA of another name gives
    // "certificate signed by an unknown CA".
    assert!(
        why.contains("signature invalid") || why.contains("unknown CA"),
        "refusal does not say why: {why}"
    );

    // 2. A whole member (node 4) of another CA that lists our members as
    // its peers and campaigns: its connections fail both ways (it does
    // not trust our servers; our servers refuse it).
    let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut peers: Vec<PeerAddr> = cs
        .iter()
        .map(|c| PeerAddr {
            id: c.id(),
            addr: c.local_addr().to_string(),
        })
        .collect();
    peers.push(PeerAddr {
        id: 4,
        addr: l4.local_addr().unwrap().to_string(),
    });
    let cfg =
        ClusterConfig::new(4, peers.clone(), dir.path().join("4"), 0xC1A5, "").with_tls(Some(evil));
    let refused = || {
        cs.iter()
            .map(|c| c.status().refused_connections)
            .sum::<u64>()
    };
    let refused_before = refused();
    let intruder = Cluster::start_with_listener(cfg, l4).unwrap();
    intruder.node().campaign();
    // Its (pre-)vote requests never arrive: every member it dials ends
    // the handshake (it rejects our server certificate with an alert).
    wait_until("the intruder's connections refused", 5, || {
        refused() >= refused_before + 3
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(intruder.status().leader, None);
    assert_ne!(intruder.status().role, "leader");
    let before = delivered();

    // 3. The cluster keeps working and no hostile message was stepped.
    let l = leader(&cs);
    l.register_guest(Uuid::from_u128(2), 2).unwrap();
    let st = target.status();
    assert!(
        st.term < term + 1000,
        "a hostile frame reached raft: {st:?}"
    );
    assert_eq!(st.rejected_frames, 0, "a hostile frame reached the parser");
    assert!(cs.iter().all(|c| c.status().members.len() == 3));
    assert!(delivered() > before, "the members stopped talking");
    intruder.shutdown();

    // 4. A new member with the right CA joins and catches up.
    let l5 = TcpListener::bind("127.0.0.1:0").unwrap();
    let a5 = l5.local_addr().unwrap().to_string();
    let mut cfg = ClusterConfig::new(5, peers[..3].to_vec(), dir.path().join("5"), 0xC1A5, "")
        .with_tls(Some(good));
    cfg.join = true;
    let joiner = Cluster::start_with_listener(cfg, l5).unwrap();
    l.add_node(5, &a5).unwrap();
    l.register_guest(Uuid::from_u128(3), 3).unwrap();
    wait_until("the new member catches up", 10, || {
        joiner.guests().guests.len() == 3
    });
    assert_eq!(joiner.status().refused_connections, 0);
}

#[test]
fn restart_over_tls_keeps_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let store = pki(dir.path(), "pki");
    {
        let cs = three(dir.path(), 5, Some(store.clone()));
        leader(&cs).register_guest(Uuid::from_u128(9), 3).unwrap();
    }
    let cs = three(dir.path(), 5, Some(store));
    let l = leader(&cs);
    wait_until("registry back after restart", 5, || {
        l.owner(Uuid::from_u128(9)).is_some()
    });
    assert_eq!(l.owner(Uuid::from_u128(9)).unwrap().owner, 3);
}

/// Member credentials from `ca` naming only `host` (server and client).
fn host_pki(ca: &TestCa, dir: &Path, host: &str) -> Arc<CredentialStore> {
    let d = dir.join(format!("pki-{host}"));
    let server = ca
        .issue(&LeafSpec::new(host, &[host], Usage::Server))
        .unwrap();
    let client = ca
        .issue(&LeafSpec::new(host, &[host], Usage::Client))
        .unwrap();
    ca.write_layout(&d, &server, &client).unwrap();
    Arc::new(CredentialStore::load(&d).unwrap())
}

/// Each member on its own loopback address with a certificate naming only
/// that address: the cluster forms and commits. A hostile client holding
/// member 3's valid certificate cannot speak for member 1 or 2 (nor can a
/// certificate of the same CA for an outside host): refused, logged with
/// the member and its host, never stepped.
#[test]
fn a_valid_certificate_for_another_host_cannot_speak_for_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster CA").unwrap();
    let hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let stores = hosts.map(|h| Some(host_pki(&ca, dir.path(), h)));
    let cs = three_on(dir.path(), 0x1D, &hosts, &stores);
    let l = leader(&cs);
    l.register_guest(Uuid::from_u128(1), 1).unwrap();
    let g = Uuid::from_u128(2);
    let epoch = l.begin_migration(g, 1, 2).unwrap();
    l.commit_migration(g, epoch).unwrap();
    wait_until("ownership replicated", 5, || {
        cs.iter().all(|c| c.owner(g).map(|r| r.owner) == Some(2))
    });
    assert!(cs.iter().all(|c| c.status().refused_connections == 0));
    assert_eq!(l.member_host(3).as_deref(), Some("127.0.0.3"));

    // Member 3's key and certificate (valid, same CA) as member 1 or 2, and an
    // outside host's certificate as member 2.
    let outsider = host_pki(&ca, dir.path(), "10.99.0.1");
    for (store, as_member) in [
        (stores[2].as_ref().unwrap(), 1u64),
        (stores[2].as_ref().unwrap(), 2),
        (&outsider, 2),
    ] {
        let target = cs
            .iter()
            .find(|c| c.id() != as_member && c.id() != 3)
            .unwrap();
        let refused_before = target.status().refused_connections;
        let term = target.status().term;
        let mut vote = hostile_vote(target);
        vote.from = as_member;
        let mut frame = Vec::new();
        encode_frame(0x1D, &vote, &mut frame);
        let tcp = std::net::TcpStream::connect(target.local_addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let link = dwcp_core::tls::client_handshake(
            tcp,
            store.client_config(),
            &target.local_addr().ip().to_string(),
        )
        .unwrap();
        let _ = link.writer().write_all(&frame);
        wait_until("the impersonation refused", 5, || {
            target.status().refused_connections > refused_before
        });
        let why = target
            .transport()
            .stats()
            .last_rejection
            .lock()
            .clone()
            .unwrap_or_default();
        let host = hosts[as_member as usize - 1];
        assert!(
            why.contains(&format!("does not name member {as_member}'s host {host}")),
            "{why}"
        );
        let st = target.status();
        assert!(
            st.term < term + 1000,
            "an impersonated vote reached raft: {st:?}"
        );
        assert_eq!(st.rejected_frames, 0);
    }
    // The cluster keeps committing.
    leader(&cs).register_guest(Uuid::from_u128(3), 3).unwrap();
}

/// Member 3 started with member 2's credentials (certificates naming
/// 127.0.0.2, while it is at 127.0.0.3): members 1 and 2 refuse to dial it
/// (name mismatch) and refuse its connections (its certificate does not
/// name 127.0.0.3); they commit without it, and it never learns a leader.
#[test]
fn a_member_with_another_members_certificate_is_shut_out() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster CA").unwrap();
    let hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let one = host_pki(&ca, dir.path(), hosts[0]);
    let two = host_pki(&ca, dir.path(), hosts[1]);
    let cs = three_on(
        dir.path(),
        0x2D,
        &hosts,
        &[Some(one), Some(two.clone()), Some(two)],
    );
    let ok = &cs[..2];
    let l = leader(ok);
    assert_ne!(l.id(), 3);
    l.register_guest(Uuid::from_u128(1), 1).unwrap();
    wait_until("member 3's connections refused", 5, || {
        ok.iter().any(|c| {
            c.transport()
                .stats()
                .last_rejection
                .lock()
                .as_deref()
                .is_some_and(|w| w.contains("does not name member 3's host 127.0.0.3"))
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    let st3 = cs[2].status();
    assert_eq!(st3.leader, None, "member 3 reached the cluster: {st3:?}");
    assert!(cs[2].guests().guests.is_empty());
    assert_eq!(
        cs[2].transport().stats().delivered.load(Ordering::Relaxed),
        0
    );
}
