//! Direct channels on the destination, over real TCP on loopback: the
//! embedder (libdwcp inside QEMU) reads each channel straight from the
//! session with a `ChannelReader` instead of through a socketpair. Bytes
//! arrive whole and in order for every tier, a peek sees a header split
//! over frames without taking it, the readiness descriptor never misses a
//! wake-up, the return path still works, and a reader closed with data
//! unread fails the migration on both ends.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod common;

use dwcp_core::codec::Tier;
use dwcp_core::transport::{
    Acceptor, AcceptorLimits, ChannelReader, ChannelWriter, ReadError, Session, Target,
    TransportConfig,
};

type Handed = (UnixStream, ChannelReader);

struct Dst {
    addr: SocketAddr,
    channels: mpsc::Receiver<Handed>,
    sessions: Arc<Mutex<Vec<Session>>>,
}

fn cfg(tier: Tier) -> TransportConfig {
    common::loopback_cfg(3, tier)
}

fn destination(tier: Tier) -> Dst {
    let (tx, channels) = mpsc::channel();
    let tx = Mutex::new(tx);
    let target = Target::Direct(Arc::new(move |sock, reader| {
        tx.lock().unwrap().send((sock, reader)).unwrap();
        Ok(())
    }));
    let served = common::serve(Acceptor::with_connector(
        cfg(tier),
        AcceptorLimits::default(),
        target,
    ));
    Dst {
        addr: served.addr,
        channels,
        sessions: served.sessions,
    }
}

/// Guest-memory-like data: zero pages, repeated pages and noise.
fn pages(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let page = out.len() / 4096;
        match page % 5 {
            0 => out.extend(std::iter::repeat_n(0u8, 4096)),
            1 => out.extend((0..4096).map(|i| (i % 251) as u8)),
            _ => out.extend((0..4096).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })),
        }
    }
    out.truncate(len);
    out
}

/// Waits up to `ms` for `fd` to be readable.
fn readable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, borrowed for the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n == 1
}

/// Reads the whole stream the way QEMU's coroutine does: non-blocking
/// reads in odd sizes, waiting on the readiness descriptor in between.
fn read_all_nonblocking(r: &ChannelReader) -> (Vec<u8>, usize) {
    let mut got = Vec::new();
    let mut waits = 0;
    let mut a = vec![0u8; 5000];
    let mut b = vec![0u8; 70000];
    loop {
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        match r.read_vectored(&mut bufs, false, false) {
            Ok(0) => return (got, waits),
            Ok(n) => {
                let k = n.min(a.len());
                got.extend_from_slice(&a[..k]);
                got.extend_from_slice(&b[..n - k]);
            }
            Err(ReadError::WouldBlock) => {
                waits += 1;
                assert!(
                    readable(r.ready_fd(), 10_000),
                    "no wake-up within 10 s with {} bytes read",
                    got.len()
                );
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

fn write_in_pieces(w: &ChannelWriter, data: &[u8]) {
    for piece in data.chunks(300_000) {
        let (x, y) = piece.split_at(piece.len() / 3);
        let n = w
            .write_vectored(&[IoSlice::new(x), IoSlice::new(y)])
            .unwrap();
        assert_eq!(n, piece.len());
    }
}

#[test]
fn reader_gets_every_byte_in_order_for_every_tier() {
    for tier in [Tier::Raw, Tier::Lz4, Tier::Zstd(3)] {
        let dst = destination(tier);
        let src = Session::connect(&cfg(tier), "vm", dst.addr).unwrap();
        let data = pages(24 << 20, 7);
        let (ours, mut src_rp) = UnixStream::pair().unwrap();
        let w = src.add_direct_channel(ours).unwrap();
        let d = data.clone();
        let writer = thread::spawn(move || {
            write_in_pieces(&w, &d);
            w.finish();
        });
        let (mut rp, r) = dst.channels.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(r.id(), 0);
        let (got, waits) = read_all_nonblocking(&r);
        assert_eq!(got.len(), data.len(), "{tier:?}: length");
        assert!(got == data, "{tier:?}: bytes differ");
        eprintln!("{tier:?}: {} MiB read, {waits} waits", got.len() >> 20);
        // The end of stream stays the end.
        let mut one = [0u8; 1];
        assert_eq!(
            r.read_vectored(&mut [IoSliceMut::new(&mut one)], false, true)
                .unwrap(),
            0
        );
        writer.join().unwrap();
        // The return path: the destination answers on its socket.
        rp.write_all(b"ok from the destination").unwrap();
        rp.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        src_rp.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"ok from the destination");
        src.wait().expect("source session completes");
        let d = dst.sessions.lock().unwrap()[0].clone();
        let stats = d.wait().expect("destination session completes");
        assert_eq!(stats.raw_in, data.len() as u64);
    }
}

/// One direct channel end to end, opened at the destination by `first`:
/// the source session and writer, the destination's reader, and both
/// return-path sockets (kept open for the test's duration).
struct Channel {
    dst: Dst,
    src: Session,
    w: ChannelWriter,
    r: ChannelReader,
    _src_rp: UnixStream,
    _dst_rp: UnixStream,
}

fn open_channel(first: &[u8]) -> Channel {
    let dst = destination(Tier::Raw);
    let src = Session::connect(&cfg(Tier::Raw), "vm", dst.addr).unwrap();
    let (ours, src_rp) = UnixStream::pair().unwrap();
    let w = src.add_direct_channel(ours).unwrap();
    w.write_vectored(&[IoSlice::new(first)]).unwrap();
    let (dst_rp, r) = dst.channels.recv_timeout(Duration::from_secs(10)).unwrap();
    Channel {
        dst,
        src,
        w,
        r,
        _src_rp: src_rp,
        _dst_rp: dst_rp,
    }
}

#[test]
fn peek_sees_a_header_split_over_frames_and_takes_nothing() {
    // Two writes, two frames: the magic arrives in halves.
    let c = open_channel(b"QE");
    let (w, r) = (&c.w, &c.r);
    let mut magic = [0u8; 4];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sent_rest = false;
    loop {
        match r.read_vectored(&mut [IoSliceMut::new(&mut magic)], true, false) {
            Ok(4) => break,
            Ok(n) => assert!(n < 4, "peek of 4 returned {n}"),
            Err(ReadError::WouldBlock) => {}
            Err(e) => panic!("{e}"),
        }
        if !sent_rest {
            w.write_vectored(&[IoSlice::new(b"VM"), IoSlice::new(b"rest")])
                .unwrap();
            sent_rest = true;
        }
        assert!(Instant::now() < deadline, "peek never saw 4 bytes");
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(&magic, b"QEVM");
    // Peeking again sees the same; reading takes it, then the rest follows.
    let mut again = [0u8; 4];
    r.read_vectored(&mut [IoSliceMut::new(&mut again)], true, true)
        .unwrap();
    assert_eq!(&again, b"QEVM");
    let mut all = [0u8; 8];
    let mut n = 0;
    while n < 8 {
        n += r
            .read_vectored(&mut [IoSliceMut::new(&mut all[n..])], false, true)
            .unwrap();
    }
    assert_eq!(&all, b"QEVMrest");
}

#[test]
fn shutdown_wakes_a_blocked_reader_with_end_of_stream() {
    let c = open_channel(b"x");
    let r = Arc::new(c.r);
    let mut one = [0u8; 1];
    r.read_vectored(&mut [IoSliceMut::new(&mut one)], false, true)
        .unwrap();
    let r2 = r.clone();
    let blocked = thread::spawn(move || {
        let mut b = [0u8; 16];
        r2.read_vectored(&mut [IoSliceMut::new(&mut b)], false, true)
    });
    thread::sleep(Duration::from_millis(200));
    assert!(!blocked.is_finished(), "read did not block");
    r.shutdown();
    assert_eq!(blocked.join().unwrap().unwrap(), 0);
    assert!(readable(r.ready_fd(), 0), "shutdown must signal readiness");
}

#[test]
fn closing_the_reader_with_data_unread_fails_both_ends() {
    let data = pages(2 << 20, 3);
    let c = open_channel(&data);
    let (dst, src, r) = (&c.dst, &c.src, c.r);
    let mut some = [0u8; 1000];
    r.read_vectored(&mut [IoSliceMut::new(&mut some)], false, true)
        .unwrap();
    assert_eq!(some[..], data[..1000]);
    drop(r);
    let e = src.wait().expect_err("the source must see the failure");
    eprintln!("source: {e}");
    let d = dst.sessions.lock().unwrap()[0].clone();
    let why = d.failure().expect("destination failed").to_string();
    assert!(why.contains("unread"), "{why}");
}
