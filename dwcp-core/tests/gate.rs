//! The cutover gate in the transport, over real TCP on loopback with UNIX
//! socketpairs standing in for QEMU: the destination holds back the end of
//! the main channel until the gate commits, never delivers it when the gate
//! refuses, and finds the end both when the source closes the channel (no
//! return path) and when it goes quiet waiting for the destination (return
//! path).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod common;

use dwcp_core::codec::Tier;
use dwcp_core::transport::gate::GATE_HOLD;
use dwcp_core::transport::{
    Acceptor, AcceptorLimits, CutoverGate, GateProvider, Session, TransportConfig,
};

#[derive(Debug)]
struct TestGate {
    delay: Duration,
    verdict: Result<(), String>,
    commits: AtomicUsize,
    released: AtomicUsize,
}

impl CutoverGate for TestGate {
    fn commit(&self) -> Result<(), String> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        thread::sleep(self.delay);
        self.verdict.clone()
    }
    fn released(&self) {
        self.released.fetch_add(1, Ordering::SeqCst);
    }
}

struct Dst {
    addr: SocketAddr,
    ends: mpsc::Receiver<(u16, UnixStream)>,
    sessions: Arc<Mutex<Vec<Session>>>,
}

fn destination(gate: Arc<TestGate>) -> Dst {
    let (connector, ends) = common::socketpair_target();
    let gates: GateProvider = Arc::new(move |name, _peer| {
        assert_eq!(name, "vm");
        Ok(Some(gate.clone() as Arc<dyn CutoverGate>))
    });
    let served = common::serve(
        Acceptor::with_connector(cfg(), AcceptorLimits::default(), connector).with_gates(gates),
    );
    Dst {
        addr: served.addr,
        ends,
        sessions: served.sessions,
    }
}

fn cfg() -> TransportConfig {
    common::loopback_cfg(2, Tier::Raw)
}

/// A main channel as QEMU ends it: RAM-ish bytes, then `QEMU_VM_EOF`,
/// `QEMU_VM_VMDESCRIPTION`, a be32 length and the JSON description.
fn qemu_stream(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let json = br#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0}]}"#;
    v.extend_from_slice(&[0x00, 0x06]);
    v.extend_from_slice(&(json.len() as u32).to_be_bytes());
    v.extend_from_slice(json);
    v
}

/// Reads what arrives until `quiet` passes with nothing new (or EOF).
fn read_until_quiet(s: &mut UnixStream, quiet: Duration, into: &mut Vec<u8>) -> bool {
    s.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(_) => return false,
        }
    }
}

fn gate(delay_ms: u64, verdict: Result<(), String>) -> Arc<TestGate> {
    Arc::new(TestGate {
        delay: Duration::from_millis(delay_ms),
        verdict,
        commits: AtomicUsize::new(0),
        released: AtomicUsize::new(0),
    })
}

/// A destination gated by `g` and a source session with its main channel:
/// (destination, source session, the source QEMU's end).
/// Writes `data` as the source QEMU, on a thread of its own: the destination
/// side is read only afterwards, and with the in-flight budget at its floor (a
/// loaded machine) a blocking write here would wait for reads that never come.
/// Write errors are expected where the session fails.
fn feed(src: &UnixStream, data: &[u8], close: bool) -> std::thread::JoinHandle<()> {
    let mut w = src.try_clone().expect("clone the source QEMU's socket");
    let data = data.to_vec();
    std::thread::spawn(move || {
        let _ = w.write_all(&data);
        if close {
            let _ = w.shutdown(Shutdown::Write);
        }
    })
}

fn gated(g: &Arc<TestGate>) -> (Dst, Session, UnixStream) {
    let dst = destination(g.clone());
    let src = Session::connect(&cfg(), "vm", dst.addr).unwrap();
    let (ours, qemu_src) = UnixStream::pair().unwrap();
    src.add_local_channel(ours).unwrap();
    (dst, src, qemu_src)
}

#[test]
fn tail_is_held_until_the_commit_when_the_source_closes() {
    let g = gate(400, Ok(()));
    let (dst, src, mut qemu_src) = gated(&g);
    let data = qemu_stream(12 << 20);
    let d = data.clone();
    let mut w = qemu_src.try_clone().unwrap();
    let writer = thread::spawn(move || {
        w.write_all(&d).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let (id, mut qemu_dst) = dst.ends.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(id, 0);
    let mut got = Vec::new();
    // While the gate commits (400 ms), QEMU has everything but the tail.
    let eof = read_until_quiet(&mut qemu_dst, Duration::from_millis(250), &mut got);
    assert!(!eof, "end of stream delivered before the commit");
    assert!(
        got.len() < data.len(),
        "the whole stream went through ungated"
    );
    assert!(
        data.len() - got.len() >= GATE_HOLD.min(data.len()) - (256 << 10),
        "held back {} bytes, expected about {GATE_HOLD}",
        data.len() - got.len()
    );
    assert_eq!(got[..], data[..got.len()]);
    // After the commit the rest arrives, then the end of stream.
    assert!(read_until_quiet(
        &mut qemu_dst,
        Duration::from_secs(5),
        &mut got
    ));
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    assert_eq!(g.commits.load(Ordering::SeqCst), 1);
    assert_eq!(g.released.load(Ordering::SeqCst), 1);
    writer.join().unwrap();
    qemu_dst.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    qemu_src.read_to_end(&mut rest).unwrap();
    src.wait().expect("source session completes");
}

#[test]
fn quiet_channel_with_the_end_held_opens_the_gate_for_a_return_path() {
    let g = gate(0, Ok(()));
    let (dst, src, mut qemu_src) = gated(&g);
    // Like QEMU with a return path: send everything, do not close, wait for
    // the destination's answer.
    let data = qemu_stream(3 << 20);
    let writer = feed(&qemu_src, &data, false);
    let (_, mut qemu_dst) = dst.ends.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < data.len() && t0.elapsed() < Duration::from_secs(5) {
        read_until_quiet(&mut qemu_dst, Duration::from_millis(100), &mut got);
    }
    assert!(got == data, "got {} of {} bytes", got.len(), data.len());
    assert_eq!(g.commits.load(Ordering::SeqCst), 1);
    // The destination answers on the return path; then both close.
    qemu_dst.write_all(b"SHUT").unwrap();
    writer.join().unwrap();
    let mut answer = [0u8; 4];
    qemu_src.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"SHUT");
    qemu_src.shutdown(Shutdown::Write).unwrap();
    qemu_dst.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = qemu_dst.read_to_end(&mut rest);
    assert!(rest.is_empty());
    src.wait().expect("source session completes");
}

#[test]
fn refused_gate_never_delivers_the_tail_and_fails_both_ends() {
    let g = gate(100, Err("no quorum".into()));
    let (dst, src, qemu_src) = gated(&g);
    let data = qemu_stream(6 << 20);
    let _writer = feed(&qemu_src, &data, true);
    let (_, mut qemu_dst) = dst.ends.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut got = Vec::new();
    read_until_quiet(&mut qemu_dst, Duration::from_secs(3), &mut got);
    assert!(
        got.len() + (1 << 20) <= data.len(),
        "QEMU got {} of {} bytes: the tail leaked",
        got.len(),
        data.len()
    );
    let e = src.wait().expect_err("the source must see the failure");
    assert!(
        e.to_string().contains("cutover gate closed: no quorum"),
        "{e}"
    );
    let d = dst.sessions.lock().unwrap()[0]
        .wait()
        .expect_err("destination fails");
    assert!(d.to_string().contains("cutover gate closed"), "{d}");
    assert_eq!(g.released.load(Ordering::SeqCst), 0);
}

#[test]
fn stream_closed_without_qemus_end_is_never_released() {
    let g = gate(0, Ok(()));
    let (dst, src, qemu_src) = gated(&g);
    // A source QEMU that gave up mid-stream: no end marker.
    let data: Vec<u8> = (0..(2 << 20)).map(|i| (i % 13) as u8).collect();
    let _writer = feed(&qemu_src, &data, true);
    let (_, mut qemu_dst) = dst.ends.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut got = Vec::new();
    read_until_quiet(&mut qemu_dst, Duration::from_secs(3), &mut got);
    assert!(got.len() < data.len());
    let e = src.wait().expect_err("source fails");
    assert!(
        e.to_string().contains("without QEMU's end of stream"),
        "{e}"
    );
    assert_eq!(g.commits.load(Ordering::SeqCst), 0);
}
