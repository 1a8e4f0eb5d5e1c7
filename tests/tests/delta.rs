//! Deltas of re-sent pages (docs/hde.md, layer 2) on real parts.
//!
//! - A real migration of the test guest, rewriting memory while it moves,
//!   through the agents with deltas on (the default): the destination's RAM
//!   equals the source's page by page and some pages went as deltas.
//! - Bad deltas from an authenticated peer speaking the wire protocol
//!   itself to a real destination agent: a delta against a page the
//!   destination never received, a corrupt delta, a delta against a stale
//!   base. Each fails the session with a named reason, and the page is never
//!   delivered to the destination's QEMU socket.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dwcp_core::codec::{CodecId, Planner};
use dwcp_core::tls::{client_handshake, CredentialStore, TlsWriter};
use dwcp_core::wire::{self, FrameHeader, Hello, Kind, Reply, Status};
use dwcp_lab::*;

#[test]
fn a_dirtying_guest_migrates_with_deltas_and_ram_verified() {
    let lab = Lab::new("delta", Middle::Bridge, &[]).expect("lab");
    let spec = GuestSpec {
        dirty_mbps: 32,
        ..GuestSpec::default()
    };
    let mig = MigrationSpec {
        streams: 2,
        codec: "lz4".into(),
        ..Default::default()
    };
    let pair = boot_pair(&lab, &spec, &mig).expect("boot guests");
    let r = dwcp_migrate(&lab, &pair, &mig).unwrap_or_else(|e| {
        panic!(
            "{e:#}\nsource agent log:\n{}\ndestination agent log:\n{}",
            lab.src_agent().log_text(),
            lab.dst_agent().log_text()
        )
    });
    assert_eq!(r["status"], "completed", "{r}");
    let v = verify(&pair, r, &scratch_dir(&lab).unwrap()).expect("verification");
    assert_eq!(v.memory.differing_pages, 0);
    let s = &v.result["session"];
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    eprintln!(
        "pages seen {}, re-sent with the previous version held {}, as deltas {}; \
         LZ4 of the re-sent pages alone {} B, as sent {} B; wire {} B",
        n("pages_seen"),
        n("pages_resent"),
        n("pages_delta"),
        n("resent_lz4_full"),
        n("resent_lz4_delta"),
        v.result["wire_bytes"]
    );
    assert!(n("pages_resent") > 0, "no page was sent twice: {s}");
    assert!(n("pages_delta") > 0, "no delta: {s}");
    assert!(n("resent_lz4_delta") < n("resent_lz4_full"), "{s}");
}

/// A fake destination QEMU: reads (and counts) what the agent delivers.
fn sink(path: &Path) -> Arc<AtomicU64> {
    let _ = std::fs::remove_file(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let l = UnixListener::bind(path).unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let g = g.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    g.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    got
}

/// One QEMU page record of block `pc.ram` at page 0.
fn record(page: &[u8]) -> Vec<u8> {
    let mut s = 0x08u64.to_be_bytes().to_vec();
    s.push(6);
    s.extend_from_slice(b"pc.ram");
    s.extend_from_slice(page);
    s
}

fn page(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

/// A peer with one stream and deltas agreed; sends plans on channel 0 and
/// returns the abort reason the agent sends back, if any.
struct Peer {
    w: TlsWriter,
    seq: u64,
    aborted: Arc<Mutex<Option<String>>>,
}

fn peer(lab: &Lab, name: &str) -> Peer {
    let addr: SocketAddr = lab.dst_addr().parse().unwrap();
    let s = lab
        .topo
        .in_ns(lab.src_ns(), move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()
        })
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let store = CredentialStore::load(&lab.src_tls_dir).unwrap();
    let link = client_handshake(s, store.client_config(), &addr.ip().to_string()).unwrap();
    let (mut r, mut w) = link.split();
    let hello = Hello {
        version_min: wire::VERSION_MIN,
        version_max: wire::VERSION_MAX,
        session: rand::random(),
        stream_index: 0,
        stream_count: 1,
        role: wire::Role::Data,
        window: 8 << 20,
        ring_pages: 64,
        spill_pages: 0,
        flags: wire::FLAG_DELTA,
        name: name.to_string(),
    };
    w.write_all(&hello.encode()).unwrap();
    w.flush().unwrap();
    let reply = Reply::read(&mut r).unwrap();
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(
        reply.flags & wire::FLAG_DELTA,
        wire::FLAG_DELTA,
        "delta granted"
    );
    assert_eq!(reply.ring_pages, 64);
    let aborted = Arc::new(Mutex::new(None));
    let a = aborted.clone();
    std::thread::spawn(move || {
        let mut payload = Vec::new();
        while let Ok(Some(h)) = FrameHeader::read(&mut r, 64) {
            payload.resize(h.wire_len as usize, 0);
            if r.read_exact(&mut payload).is_err() {
                return;
            }
            if h.kind == Kind::Abort {
                *a.lock().unwrap() = Some(String::from_utf8_lossy(&payload).into_owned());
            }
        }
    });
    Peer { w, seq: 0, aborted }
}

impl Peer {
    fn send(&mut self, plan: &[u8], raw_len: usize) {
        let h = FrameHeader::data(
            0,
            self.seq,
            CodecId::None,
            raw_len as u32,
            plan.len() as u32,
            plan,
        );
        self.seq += 1;
        let _ = self
            .w
            .write_all(&h.encode())
            .and_then(|()| self.w.write_all(plan))
            .and_then(|()| self.w.flush());
    }

    fn abort_reason(&self) -> String {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if let Some(a) = self.aborted.lock().unwrap().clone() {
                return a;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        String::new()
    }
}

/// Plans of `v1` then `v2` (the same guest page, changed a little) by a
/// planner with deltas: the second is a DELTA against the first.
fn plans(v1: &[u8], v2: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut p = Planner::new(64 * 4096);
    p.set_delta(true);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    p.plan(&record(v1), &mut a);
    p.plan(&record(v2), &mut b);
    assert_eq!(p.delta_stats().pages_delta, 1);
    (a, b)
}

#[test]
fn bad_deltas_fail_the_session_with_a_named_reason() {
    let lab = Lab::new("baddelta", Middle::Bridge, &["--allow", "*"]).expect("lab");
    let log = lab.dst_agent().log.clone();
    let v1 = page(1);
    let mut v2 = v1.clone();
    v2[1000..1016].copy_from_slice(b"a small change..");
    let (plan1, plan2) = plans(&v1, &v2);
    let raw = record(&v1).len();
    let mut delivered: HashMap<&str, u64> = HashMap::new();

    // A delta against a page the destination never received.
    let got = sink(&lab.dst_agent().incoming("never"));
    let mut p = peer(&lab, "never");
    p.send(&plan2, raw);
    let why = p.abort_reason();
    assert!(why.contains("does not hold"), "{why:?}");
    delivered.insert("never", got.load(Ordering::Relaxed));

    // A corrupt delta: the base arrived, one byte of the delta flipped.
    let got = sink(&lab.dst_agent().incoming("corrupt"));
    let mut p = peer(&lab, "corrupt");
    p.send(&plan1, raw);
    let mut bad = plan2.clone();
    *bad.last_mut().unwrap() ^= 0x10;
    p.send(&bad, raw);
    let why = p.abort_reason();
    assert!(why.contains("corrupt delta or stale base"), "{why:?}");
    delivered.insert("corrupt", got.load(Ordering::Relaxed));

    // A stale base: the destination holds another version of the page than
    // the one the delta was made against.
    let got = sink(&lab.dst_agent().incoming("stale"));
    let mut p = peer(&lab, "stale");
    let mut v1b = v1.clone();
    v1b[3000..3008].copy_from_slice(b"elsewise");
    let (other, _) = plans(&v1b, &v2);
    p.send(&other, raw);
    p.send(&plan2, raw);
    let why = p.abort_reason();
    assert!(why.contains("corrupt delta or stale base"), "{why:?}");
    delivered.insert("stale", got.load(Ordering::Relaxed));

    // The bad page never reached the destination's QEMU: only the frames
    // before it did.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(delivered["never"], 0, "{delivered:?}");
    assert_eq!(delivered["corrupt"], raw as u64, "{delivered:?}");
    assert_eq!(delivered["stale"], raw as u64, "{delivered:?}");
    assert!(
        !wait_log(&log, "does not hold").is_empty(),
        "{}",
        lab.dst_agent().log_text()
    );
}
