//! Loopback tests of the TLS layer (dwcp_core::tls) with certificates
//! generated at test time by tls::testca; nothing secret is committed.
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dwcp_core::tls::testca::{write_file, write_test_pki, Issued, LeafSpec, TestCa, Usage};
use dwcp_core::tls::{
    client_handshake, server_handshake, AllowedPeers, CredentialStore, TlsCredentials, TlsError,
    TlsLink,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "dwcp-tls-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pki(tag: &str) -> (TempDir, TlsCredentials) {
    let d = TempDir::new(tag);
    write_test_pki(d.path(), &["localhost", "127.0.0.1"]).unwrap();
    let c = TlsCredentials::load(d.path()).unwrap();
    (d, c)
}

fn leaf(ca: &TestCa, cn: &str, usage: Usage) -> Issued {
    ca.issue(&LeafSpec::new(cn, &["localhost", "127.0.0.1"], usage))
        .unwrap()
}

/// Run a server handshake in a thread and a client handshake here.
fn pair(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> (Result<TlsLink, TlsError>, Result<TlsLink, TlsError>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        server_handshake(s, server)
    });
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    let cr = client_handshake(c, client, name);
    // A client whose certificate the server refuses completes its side of a
    // TLS 1.3 handshake first; drop it so the server never waits on it.
    let sr = h.join().unwrap();
    (sr, cr)
}

/// The client's view of a refusal: its handshake fails, or (TLS 1.3: the
/// server verifies the client after the client has finished) its first read.
fn client_refused(cr: Result<TlsLink, TlsError>) -> String {
    match cr {
        Err(e) => e.to_string(),
        Ok(link) => {
            let mut r = link.reader();
            let mut b = [0u8; 1];
            match r.read(&mut b) {
                Err(e) => e.to_string(),
                Ok(n) => panic!("client read {n} bytes from a server that refused it"),
            }
        }
    }
}

/// Deterministic test data: xorshift64* bytes.
struct Gen(u64);
impl Gen {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Send `total` bytes as frames (8-byte header + payload of varying size)
/// through write_all_slices.
fn send_frames(mut w: dwcp_core::tls::TlsWriter, total: usize, seed: u64) {
    let mut g = Gen(seed);
    let mut payload = vec![0u8; 1 << 20];
    let mut sent = 0;
    let mut i = 0usize;
    while sent < total {
        let len = ((i * 7919) % (1 << 20)).max(1).min(total - sent);
        g.fill(&mut payload[..len]);
        let hdr = (len as u64).to_le_bytes();
        w.write_all_slices(&[&hdr, &payload[..len]]).unwrap();
        sent += len;
        i += 1;
    }
    w.close().unwrap();
}

/// Receive and verify what send_frames sent; then a clean EOF.
fn recv_frames(mut r: dwcp_core::tls::TlsReader, total: usize, seed: u64) {
    let mut g = Gen(seed);
    let mut got = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut n = 0;
    while n < total {
        let mut hdr = [0u8; 8];
        r.read_exact(&mut hdr).unwrap();
        let len = u64::from_le_bytes(hdr) as usize;
        r.read_exact(&mut got[..len]).unwrap();
        g.fill(&mut want[..len]);
        assert!(got[..len] == want[..len], "data differs at offset {n}");
        n += len;
    }
    assert_eq!(n, total);
    let mut b = [0u8; 1];
    assert_eq!(r.read(&mut b).unwrap(), 0, "close_notify gives a clean EOF");
}

#[test]
fn round_trip_64mib_both_directions_at_once() {
    let (_d, creds) = pki("rt");
    let (s, c) = pair(creds.server_config(), creds.client_config(), "localhost");
    let (s, c) = (s.unwrap(), c.unwrap());
    const N: usize = 64 << 20;
    let (sr, sw) = s.split();
    let (cr, cw) = c.split();
    let t = [
        thread::spawn(move || send_frames(cw, N, 1)),
        thread::spawn(move || recv_frames(sr, N, 1)),
        thread::spawn(move || send_frames(sw, N, 2)),
        thread::spawn(move || recv_frames(cr, N, 2)),
    ];
    for h in t {
        h.join().unwrap();
    }
}

#[test]
fn client_without_certificate_is_refused() {
    let (d, creds) = pki("nocert");
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(d.path().join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let anon =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let (s, c) = pair(creds.server_config(), Arc::new(anon), "localhost");
    let se = s.unwrap_err().to_string();
    assert!(se.contains("presented no certificate"), "{se}");
    let ce = client_refused(c);
    assert!(ce.contains("requires a client certificate"), "{ce}");
}

#[test]
fn certificate_from_another_ca_is_refused_both_directions() {
    let ca = TestCa::new("good CA").unwrap();
    let rogue = TestCa::new("rogue CA").unwrap();

    let good_dir = TempDir::new("good");
    ca.write_layout(
        good_dir.path(),
        &leaf(&ca, "server", Usage::Server),
        &leaf(&ca, "client", Usage::Client),
    )
    .unwrap();
    let good = TlsCredentials::load(good_dir.path()).unwrap();

    // A client certificate signed by the rogue CA (the client trusts the
    // good CA, so it accepts the server): the server refuses.
    let d1 = TempDir::new("rogue-client");
    ca.write_layout(
        d1.path(),
        &leaf(&ca, "server", Usage::Server),
        &leaf(&rogue, "intruder", Usage::Client),
    )
    .unwrap();
    let bad_client = TlsCredentials::load(d1.path()).unwrap();
    let (s, c) = pair(
        good.server_config(),
        bad_client.client_config(),
        "localhost",
    );
    let se = s.unwrap_err().to_string();
    assert!(se.contains("certificate signed by an unknown CA"), "{se}");
    let ce = client_refused(c);
    assert!(ce.contains("CA it does not trust"), "{ce}");

    // A server certificate signed by the rogue CA: the client refuses.
    let d2 = TempDir::new("rogue-server");
    ca.write_layout(
        d2.path(),
        &leaf(&rogue, "impostor", Usage::Server),
        &leaf(&ca, "client", Usage::Client),
    )
    .unwrap();
    let bad_server = TlsCredentials::load(d2.path()).unwrap();
    let good_client = good;
    let (s, c) = pair(
        bad_server.server_config(),
        good_client.client_config(),
        "localhost",
    );
    let ce = c.unwrap_err().to_string();
    assert!(ce.contains("certificate signed by an unknown CA"), "{ce}");
    let se = s.unwrap_err().to_string();
    assert!(se.contains("CA it does not trust"), "{se}");
}

#[test]
fn expired_certificate_is_refused() {
    let ca = TestCa::new("CA").unwrap();
    let hosts = ["localhost"];
    let expired = |usage| {
        let mut spec = LeafSpec::new("old", &hosts, usage);
        spec.valid_from_secs = -400 * 86_400;
        spec.valid_until_secs = -35 * 86_400;
        ca.issue(&spec).unwrap()
    };
    // Expired server certificate: the client refuses.
    let d = TempDir::new("exp-server");
    ca.write_layout(
        d.path(),
        &expired(Usage::Server),
        &leaf(&ca, "c", Usage::Client),
    )
    .unwrap();
    let creds = TlsCredentials::load(d.path()).unwrap();
    let (s, c) = pair(creds.server_config(), creds.client_config(), "localhost");
    let ce = c.unwrap_err().to_string();
    assert!(ce.contains("certificate expired"), "{ce}");
    assert!(s.is_err());
    // Expired client certificate: the server refuses.
    let d = TempDir::new("exp-client");
    ca.write_layout(
        d.path(),
        &leaf(&ca, "s", Usage::Server),
        &expired(Usage::Client),
    )
    .unwrap();
    let creds = TlsCredentials::load(d.path()).unwrap();
    let (s, _c) = pair(creds.server_config(), creds.client_config(), "localhost");
    let se = s.unwrap_err().to_string();
    assert!(se.contains("certificate expired"), "{se}");
}

#[test]
fn revoked_certificate_in_ca_crl_is_refused_both_directions() {
    let ca = TestCa::new("CA").unwrap();
    let (server, client) = (leaf(&ca, "s", Usage::Server), leaf(&ca, "c", Usage::Client));
    let other = leaf(&ca, "other", Usage::Client);
    let d = TempDir::new("crl");
    ca.write_layout(d.path(), &server, &client).unwrap();
    let crl = d.path().join("ca-crl.pem");

    // A list that names another certificate changes nothing.
    std::fs::write(&crl, ca.crl_pem(&[&other]).unwrap()).unwrap();
    let creds = TlsCredentials::load(d.path()).unwrap();
    let (s, c) = pair(creds.server_config(), creds.client_config(), "localhost");
    assert!(s.is_ok() && c.is_ok(), "unrevoked pair refused");

    // The client's certificate revoked: the server refuses it.
    std::fs::write(&crl, ca.crl_pem(&[&client]).unwrap()).unwrap();
    let creds = TlsCredentials::load(d.path()).unwrap();
    let (s, _c) = pair(creds.server_config(), creds.client_config(), "localhost");
    let se = s.unwrap_err().to_string();
    assert!(se.contains("revoked"), "{se}");

    // The server's certificate revoked: the client refuses it.
    std::fs::write(&crl, ca.crl_pem(&[&server]).unwrap()).unwrap();
    let creds = TlsCredentials::load(d.path()).unwrap();
    let (_s, c) = pair(creds.server_config(), creds.client_config(), "localhost");
    let ce = c.unwrap_err().to_string();
    assert!(ce.contains("revoked"), "{ce}");

    // A ca-crl.pem that is not a list is an error naming the file, not
    // silently no revocation at all.
    std::fs::write(&crl, ca.cert_pem()).unwrap();
    let e = TlsCredentials::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("ca-crl.pem") && e.contains("no X509 CRL"), "{e}");
}

#[test]
fn wrong_server_name_is_refused() {
    let (_d, creds) = pki("name");
    let (s, c) = pair(
        creds.server_config(),
        creds.client_config(),
        "dst.example.org",
    );
    let ce = c.unwrap_err().to_string();
    assert!(
        ce.contains("name mismatch: expected dst.example.org"),
        "{ce}"
    );
    assert!(ce.contains("localhost"), "{ce}");
    assert!(s.is_err());
    // An IP address is a valid tls-hostname when the certificate has it.
    let (s, c) = pair(creds.server_config(), creds.client_config(), "127.0.0.1");
    assert!(s.is_ok() && c.is_ok());
    // An unparsable one is reported as such.
    let t = TcpStream::connect(
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap(),
    )
    .unwrap();
    let e = client_handshake(t, creds.client_config(), "bad name!").unwrap_err();
    assert!(matches!(e, TlsError::ServerName(_)), "{e}");
}

#[test]
fn plaintext_client_gets_a_clean_error_not_a_hang() {
    let (_d, creds) = pki("plain");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = creds.server_config();
    let h = thread::spawn(move || {
        let mut out = Vec::new();
        for _ in 0..2 {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let t = Instant::now();
            out.push((server_handshake(s, cfg.clone()), t.elapsed()));
        }
        out
    });
    // A clear-text DWCP peer that speaks first.
    let mut talker = TcpStream::connect(addr).unwrap();
    talker
        .write_all(b"DWCP\x01\x00hello in clear text\n")
        .unwrap();
    // One that waits for the server to speak first.
    let silent = TcpStream::connect(addr).unwrap();
    let out = h.join().unwrap();
    drop((talker, silent));
    let (r, t) = &out[0];
    let e = r.as_ref().unwrap_err().to_string();
    assert!(e.contains("not speaking TLS"), "{e}");
    assert!(*t < Duration::from_secs(2), "{t:?}");
    let (r, t) = &out[1];
    let e = r.as_ref().unwrap_err().to_string();
    assert!(e.contains("timed out"), "{e}");
    assert!(*t < Duration::from_secs(3), "{t:?}");
}

#[test]
fn reload_with_a_broken_file_keeps_the_old_credentials() {
    let d = TempDir::new("reload");
    write_test_pki(d.path(), &["localhost"]).unwrap();
    let store = CredentialStore::load(d.path()).unwrap();
    let before = store.current();
    assert_eq!(store.generation(), 1);
    // A link established before any reload.
    let (s, c) = pair(store.server_config(), store.client_config(), "localhost");
    let (s, c) = (s.unwrap(), c.unwrap());

    write_file(&d.path().join("server-key.pem"), "garbage\n", 0o600).unwrap();
    let e = store.reload().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("server-key.pem") && msg.contains("not PEM"),
        "{msg}"
    );
    assert!(Arc::ptr_eq(&before, &store.current()));
    assert_eq!(store.generation(), 1);
    // The old credentials still serve new connections.
    let (s2, c2) = pair(store.server_config(), store.client_config(), "localhost");
    assert!(s2.is_ok() && c2.is_ok());

    // A whole new PKI (new CA): the reload succeeds, new connections use it,
    // the link made before carries on.
    write_test_pki(d.path(), &["localhost"]).unwrap();
    store.reload().unwrap();
    assert_eq!(store.generation(), 2);
    assert!(!Arc::ptr_eq(&before, &store.current()));
    let (s3, c3) = pair(store.server_config(), store.client_config(), "localhost");
    assert!(s3.is_ok() && c3.is_ok());
    // Old server config against new client config: different CAs now.
    let (_s4, c4) = pair(before.server_config(), store.client_config(), "localhost");
    assert!(c4.is_err());
    let mut w = c.writer();
    w.write_all(b"still here").unwrap();
    let mut buf = [0u8; 10];
    s.reader().read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let d = TempDir::new("errs");
    let e = TlsCredentials::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("ca-cert.pem") && e.contains("missing"), "{e}");

    write_test_pki(d.path(), &["localhost"]).unwrap();
    let p = |f: &str| d.path().join(f);
    let key = std::fs::read_to_string(p("client-key.pem")).unwrap();
    let cert = std::fs::read_to_string(p("client-cert.pem")).unwrap();
    // A key that is not the certificate's.
    let server_key = std::fs::read_to_string(p("server-key.pem")).unwrap();
    write_file(&p("client-key.pem"), &server_key, 0o600).unwrap();
    let e = TlsCredentials::load(d.path()).unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("client-key.pem does not match"),
        "{e}"
    );
    // A certificate where the key should be and the reverse.
    write_file(&p("client-key.pem"), &cert, 0o600).unwrap();
    let e = TlsCredentials::load(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("client-key.pem") && e.contains("holds a certificate"),
        "{e}"
    );
    write_file(&p("client-key.pem"), &key, 0o600).unwrap();
    write_file(&p("client-cert.pem"), &key, 0o644).unwrap();
    let e = TlsCredentials::load(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("client-cert.pem") && e.contains("holds a private key"),
        "{e}"
    );
    write_file(&p("client-cert.pem"), &cert, 0o644).unwrap();
    // A CA file that is not PEM.
    write_file(&p("ca-cert.pem"), "not a certificate", 0o644).unwrap();
    let e = TlsCredentials::load(d.path()).unwrap_err();
    assert!(matches!(e, TlsError::LoadCa { .. }), "{e}");
    assert!(e.to_string().contains("not PEM"), "{e}");
    // Keys are written 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p("server-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn peer_identity_shows_cn_and_sans_and_authorizes() {
    let ca = TestCa::new("CA").unwrap();
    let d = TempDir::new("ident");
    let server = ca
        .issue(&LeafSpec::new(
            "dst-host",
            &["dst.dc1.example", "localhost"],
            Usage::Server,
        ))
        .unwrap();
    let client = ca
        .issue(&LeafSpec::new(
            "src-host",
            &["src.dc1.example", "127.0.0.1"],
            Usage::Client,
        ))
        .unwrap();
    ca.write_layout(d.path(), &server, &client).unwrap();
    let creds = TlsCredentials::load(d.path()).unwrap();
    assert_eq!(
        creds.client_identity().common_name.as_deref(),
        Some("src-host")
    );
    let (s, c) = pair(creds.server_config(), creds.client_config(), "localhost");
    let (s, c) = (s.unwrap(), c.unwrap());
    let id = s.peer_identity().unwrap();
    assert_eq!(id.common_name.as_deref(), Some("src-host"));
    assert_eq!(id.subject, "CN=src-host,O=DWCP test");
    assert_eq!(id.dns_names, vec!["src.dc1.example".to_string()]);
    assert_eq!(
        id.ip_addresses,
        vec!["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        id.to_string(),
        "CN=src-host,O=DWCP test [DNS:src.dc1.example, IP:127.0.0.1]"
    );
    let sid = dwcp_core::tls::peer_identity(&c).unwrap();
    assert_eq!(sid.common_name.as_deref(), Some("dst-host"));
    assert!(AllowedPeers::new(["src.dc1.example"]).allows(&id));
    assert!(AllowedPeers::new(["*.dc1.example"]).allows(&id));
    assert!(!AllowedPeers::new(["dst-host", "10.1.1.1"]).allows(&id));
    assert_eq!(AllowedPeers::new(["src-host"]).authorize(&s).unwrap(), id);
    let e = AllowedPeers::new(["dst-host"]).authorize(&s).unwrap_err();
    assert!(matches!(e, TlsError::NotAllowed { .. }), "{e}");
    assert!(e.to_string().contains("CN=src-host"), "{e}");
    assert!(c.cipher_suite().unwrap().starts_with("TLS13_"));
}

#[test]
fn eof_without_close_notify_is_unexpected_eof() {
    let (_d, creds) = pki("eof");
    let (s, c) = pair(creds.server_config(), creds.client_config(), "localhost");
    let (s, c) = (s.unwrap(), c.unwrap());
    c.writer().write_all(b"abc").unwrap();
    c.tcp().shutdown(std::net::Shutdown::Both).unwrap();
    let mut r = s.reader();
    let mut b = [0u8; 3];
    r.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"abc");
    let e = r.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
}

/// TLS vs plain TCP over loopback, one way, 256 MiB; and handshake time.
/// `cargo test --release -p dwcp-core --test tls -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_tls_vs_plain_throughput() {
    const N: usize = 256 << 20;
    const CHUNK: usize = 256 << 10;
    let (_d, creds) = pki("bench");
    let payload = vec![0x5au8; CHUNK];

    // Plain TCP.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        while n < N {
            n += s.read(&mut buf).unwrap();
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    let mut sent = 0;
    while sent < N {
        c.write_all(&payload).unwrap();
        sent += CHUNK;
    }
    h.join().unwrap();
    let plain = N as f64 / t.elapsed().as_secs_f64() / 1e6;

    // TLS.
    let (s, c) = pair(creds.server_config(), creds.client_config(), "localhost");
    let (s, c) = (s.unwrap(), c.unwrap());
    let mut r = s.reader();
    let h = thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        while n < N {
            n += r.read(&mut buf).unwrap();
        }
    });
    let mut w = c.writer();
    let t = Instant::now();
    let mut sent = 0;
    let hdr = [0u8; 16];
    while sent < N {
        w.write_all_slices(&[&hdr[..0], &payload]).unwrap();
        sent += CHUNK;
    }
    h.join().unwrap();
    let tls = N as f64 / t.elapsed().as_secs_f64() / 1e6;

    // Handshakes.
    const H: u32 = 20;
    let t = Instant::now();
    for _ in 0..H {
        let (s, c) = pair(creds.server_config(), creds.client_config(), "localhost");
        assert!(s.is_ok() && c.is_ok());
    }
    let hs_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(H);
    println!(
        "256 MiB one way over loopback: plain {plain:.0} MB/s, TLS {tls:.0} MB/s ({}), \
         handshake {hs_ms:.2} ms (mutual, ECDSA P-256, mean of {H})",
        c.cipher_suite().unwrap_or_default()
    );
}

/// An operator's PKI (e.g. made with docs/security.md's certtool or openssl
/// recipe) in `DWCP_TEST_TLS_DIR` loads and completes a mutual handshake
/// with itself; `DWCP_TEST_TLS_NAME` is the name to verify (default
/// localhost). `DWCP_TEST_TLS_DIR=... cargo test -p dwcp-core --test tls
/// operator_pki -- --ignored`
#[test]
#[ignore]
fn operator_pki_from_env_loads_and_handshakes() {
    let Ok(dir) = std::env::var("DWCP_TEST_TLS_DIR") else {
        eprintln!("DWCP_TEST_TLS_DIR not set: nothing to check");
        return;
    };
    let name = std::env::var("DWCP_TEST_TLS_NAME").unwrap_or_else(|_| "localhost".into());
    let creds = TlsCredentials::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let (s, c) = pair(creds.server_config(), creds.client_config(), &name);
    let (s, c) = (s.unwrap(), c.unwrap());
    c.writer().write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.reader().read_exact(&mut b).unwrap();
    println!(
        "{dir}: client {} -> server {} ({})",
        s.peer_identity().unwrap(),
        c.peer_identity().unwrap(),
        c.cipher_suite().unwrap()
    );
}
