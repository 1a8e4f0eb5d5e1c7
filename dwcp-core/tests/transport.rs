//! Transport sessions over real TCP on loopback, with UNIX socketpairs standing
//! in for QEMU's connections: ordering across streams, both directions, many
//! channels, every tier, and the failure paths (corruption, a dead stream,
//! garbage on the data port).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod common;

use dwcp_core::codec::Tier;
use dwcp_core::transport::{
    Acceptor, AcceptorLimits, ContextUse, Session, SessionStats, TransportConfig,
};
use dwcp_core::wire::WireError;

/// A responder on loopback: each new channel's "QEMU end" goes to `ends`.
struct Responder {
    addr: SocketAddr,
    ends: mpsc::Receiver<(u16, UnixStream)>,
    sessions: Arc<Mutex<Vec<Session>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

fn responder(cfg: TransportConfig) -> Responder {
    let (connector, ends) = common::socketpair_target();
    let served = common::serve(Acceptor::with_connector(
        cfg,
        AcceptorLimits::default(),
        connector,
    ));
    Responder {
        addr: served.addr,
        ends,
        sessions: served.sessions,
        errors: served.errors,
    }
}

/// Migration-like bytes: QEMU page records (some repeated), zeros, text, noise.
fn stream_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len + 8192);
    let mut pages: Vec<Vec<u8>> = Vec::new();
    while out.len() < len {
        let addr = (next() % (1 << 20)) << 12;
        out.extend_from_slice(&(addr | 0x28).to_be_bytes());
        let page = match next() % 5 {
            0 if !pages.is_empty() => pages[(next() as usize) % pages.len()].clone(),
            1 => vec![0u8; 4096],
            2 => b"the quick brown fox jumps over the lazy dog "
                .iter()
                .cycle()
                .take(4096)
                .copied()
                .collect(),
            _ => (0..4096).map(|_| next() as u8).collect(),
        };
        out.extend_from_slice(&page);
        if pages.len() < 64 {
            pages.push(page);
        }
    }
    out.truncate(len);
    out
}

/// The shared loopback configuration, with a small dedup ring and a short
/// idle timeout (the failure tests wait for it).
fn cfg(streams: u16, tier: Tier) -> TransportConfig {
    TransportConfig {
        dedup_cache_mb: 16,
        idle_timeout: Duration::from_secs(3),
        ..common::loopback_cfg(streams, tier)
    }
}

/// Sends `fwd` bytes per channel source -> destination and `back` bytes the
/// other way, over `channels` channels, and checks everything arrived intact.
fn relay(streams: u16, tier: Tier, channels: u16, fwd: usize, back: usize) {
    relay_with(cfg(streams, tier), channels, fwd, back, |_| {});
}

/// [`relay`] with a given config; `during` runs beside the transfer.
fn relay_with(
    c: TransportConfig,
    channels: u16,
    fwd: usize,
    back: usize,
    during: impl FnOnce(&Session),
) -> dwcp_core::transport::SessionStats {
    let tier = if c.auto_tier { Tier::Raw } else { c.tier };
    let r = responder(c.clone());
    let sess = Session::connect(&c, "test-vm", r.addr).unwrap();
    let mut workers = Vec::new();
    for c in 0..channels {
        let (ours, mut qemu_src) = UnixStream::pair().unwrap();
        let id = sess.add_local_channel(ours).unwrap();
        assert_eq!(id, c);
        let data = stream_bytes(c as u64 + 1, fwd);
        let reply = stream_bytes(c as u64 + 100, back);
        // The destination opens a channel when its first frame arrives, so
        // start writing before waiting for it.
        let mut w = qemu_src.try_clone().unwrap();
        let d = data.clone();
        let writer = thread::spawn(move || {
            w.write_all(&d).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let (rid, mut qemu_dst) = r.ends.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(rid, c);
        workers.push(thread::spawn(move || {
            let mut dst_w = qemu_dst.try_clone().unwrap();
            let rep = reply.clone();
            let back_writer = thread::spawn(move || {
                dst_w.write_all(&rep).unwrap();
                dst_w.shutdown(Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            qemu_dst.read_to_end(&mut got).unwrap();
            let mut got_back = Vec::new();
            qemu_src.read_to_end(&mut got_back).unwrap();
            writer.join().unwrap();
            back_writer.join().unwrap();
            assert!(
                got == data,
                "channel {c}: forward bytes differ ({} vs {})",
                got.len(),
                data.len()
            );
            assert!(got_back == reply, "channel {c}: return bytes differ");
        }));
    }
    during(&sess);
    for w in workers {
        w.join().unwrap();
    }
    let stats = sess.wait().unwrap();
    assert_eq!(stats.state, "completed");
    assert_eq!(stats.raw_out, fwd as u64 * channels as u64);
    assert_eq!(stats.raw_in, back as u64 * channels as u64);
    let t0 = Instant::now();
    while r.sessions.lock().unwrap().is_empty() && t0.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(10));
    }
    let dst = r.sessions.lock().unwrap()[0].clone();
    let ds = dst.wait().unwrap();
    assert_eq!(ds.raw_in, fwd as u64 * channels as u64);
    if !matches!(tier, Tier::None | Tier::Raw) && fwd > 0 {
        assert!(
            stats.ratio_out > 1.2,
            "compression/dedup did nothing: {}",
            stats.ratio_out
        );
        assert!(stats.pages_deduped > 0, "no page was deduplicated");
    }
    stats
}

#[test]
fn one_stream_raw() {
    let st = relay_with(cfg(1, Tier::Raw), 1, 8 << 20, 4096, |_| {});
    // Raw frames: the wire carries the bytes plus a 32-byte header each.
    assert!(st.wire_out >= st.raw_out, "{st:?}");
    assert_eq!(st.pages_seen, 0, "raw frames are never planned");
}

/// `--codec auto` on loopback (min RTT far below 1 ms) starts raw.
#[test]
fn auto_starts_raw_on_a_datacenter_path() {
    let c = TransportConfig {
        auto_tier: true,
        ..cfg(2, Tier::Lz4)
    };
    let st = relay_with(c, 2, 8 << 20, 4096, |_| {});
    assert_eq!(st.tier, Tier::Raw, "{st:?}");
    assert_eq!(st.pages_seen, 0, "{st:?}");
}

/// Switching between raw and planned tiers mid-stream keeps both dedup rings
/// in step: every byte arrives intact and dedup still finds duplicates.
#[test]
fn switching_between_raw_and_planned_tiers_mid_stream() {
    let st = relay_with(cfg(2, Tier::Lz4), 3, 48 << 20, 1 << 20, |s| {
        for i in 0..200 {
            let t = [Tier::Raw, Tier::Lz4, Tier::None, Tier::Zstd(1)][i % 4];
            s.set_tier(t);
            thread::sleep(Duration::from_millis(2));
            if s.is_finished() {
                break;
            }
        }
    });
    assert!(st.pages_seen > 0, "no frame was planned: {st:?}");
}

#[test]
fn one_stream_no_compression() {
    relay(1, Tier::None, 1, 8 << 20, 4096);
}

#[test]
fn eight_streams_lz4_both_directions() {
    relay(8, Tier::Lz4, 1, 24 << 20, 1 << 20);
}

#[test]
fn four_streams_zstd_four_channels() {
    relay(4, Tier::Zstd(3), 4, 6 << 20, 64 << 10);
}

#[test]
fn many_streams_few_bytes() {
    relay(64, Tier::Lz4, 2, 100_000, 10);
}

#[test]
fn empty_channel_completes() {
    relay(2, Tier::Lz4, 1, 0, 0);
}

/// A TCP proxy that forwards each connection and applies `mangle` to the
/// initiator -> responder bytes of connection `target` (by accept order).
fn proxy(
    to: SocketAddr,
    target: usize,
    mangle: impl Fn(u64, &mut [u8]) -> bool + Send + Sync + 'static,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mangle = Arc::new(mangle);
    thread::spawn(move || {
        for (i, c) in l.incoming().flatten().enumerate() {
            let up = TcpStream::connect(to).unwrap();
            let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut c2);
                let _ = c2.shutdown(Shutdown::Write);
            });
            let m = mangle.clone();
            thread::spawn(move || {
                let (mut c, mut up) = (c, up);
                let mut buf = vec![0u8; 64 << 10];
                let mut off = 0u64;
                loop {
                    let n = match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if i == target && !m(off, &mut buf[..n]) {
                        // Kill the connection both ways.
                        let _ = c.shutdown(Shutdown::Both);
                        let _ = up.shutdown(Shutdown::Both);
                        return;
                    }
                    off += n as u64;
                    if up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = up.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Pushes data into one channel until the session fails; returns what the
/// destination's QEMU end received, what was sent, and the two errors.
fn run_until_failure(
    c: TransportConfig,
    via: impl Fn(SocketAddr) -> SocketAddr,
) -> (Vec<u8>, Vec<u8>, String, String) {
    let r = responder(c.clone());
    let addr = via(r.addr);
    let sess = Session::connect(&c, "test-vm", addr).unwrap();
    let (ours, mut qemu_src) = UnixStream::pair().unwrap();
    sess.add_local_channel(ours).unwrap();
    let data = stream_bytes(7, 32 << 20);
    let d = data.clone();
    let writer = thread::spawn(move || {
        let _ = qemu_src.write_all(&d);
        qemu_src
    });
    let (_, mut qemu_dst) = r.ends.recv_timeout(Duration::from_secs(10)).unwrap();
    qemu_dst
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    let _ = qemu_dst.read_to_end(&mut got);
    let t0 = Instant::now();
    let src_err = sess.wait().unwrap_err().to_string();
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "source side took {:?} to fail",
        t0.elapsed()
    );
    drop(writer.join());
    let dst = r.sessions.lock().unwrap().first().cloned();
    let dst_err = dst
        .map(|d| d.wait().err().map(|e| e.to_string()).unwrap_or_default())
        .unwrap_or_default();
    (got, data, src_err, dst_err)
}

fn corrupted_frame_is_never_delivered_and_fails_both_sides(c: TransportConfig) {
    // Flip one bit 3 MB into the first stream (past the handshake).
    let (got, sent, src_err, dst_err) = run_until_failure(c, |to| {
        proxy(to, 0, |off, buf| {
            let at = 3_000_000u64;
            if off <= at && at < off + buf.len() as u64 {
                buf[(at - off) as usize] ^= 0x10;
            }
            true
        })
    });
    assert!(
        got.len() < sent.len(),
        "everything arrived despite corruption"
    );
    assert_eq!(
        &got[..],
        &sent[..got.len()],
        "destination received bytes that were never sent"
    );
    assert!(
        dst_err.contains("checksum") || dst_err.contains("invalid"),
        "destination error: {dst_err}"
    );
    assert!(
        src_err.contains("migration failed"),
        "source error: {src_err}"
    );
}

#[test]
fn corrupted_lz4_frame_is_never_delivered_and_fails_both_sides() {
    corrupted_frame_is_never_delivered_and_fails_both_sides(cfg(2, Tier::Lz4));
}

/// Raw frames carry a payload checksum only with `checksum_raw`
/// (`checksum=all`); with it, a flipped bit in one is caught like any other.
#[test]
fn corrupted_raw_frame_is_caught_with_checksum_all() {
    corrupted_frame_is_never_delivered_and_fails_both_sides(TransportConfig {
        checksum_raw: true,
        ..cfg(2, Tier::Raw)
    });
}

#[test]
fn killed_stream_fails_the_session_in_bounded_time() {
    let (got, sent, src_err, _) = run_until_failure(cfg(2, Tier::Lz4), |to| {
        proxy(to, 1, |off, _| off < 2_000_000)
    });
    assert!(got.len() < sent.len());
    assert_eq!(&got[..], &sent[..got.len()]);
    assert!(!src_err.is_empty());
}

#[test]
fn garbage_on_the_data_port_is_refused_and_the_port_keeps_serving() {
    let c = cfg(1, Tier::Lz4);
    let r = responder(c.clone());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("zeros", vec![0u8; 64]),
        ("truncated", b"DWCP\x01\x00".to_vec()),
        ("wrong version", {
            let h = dwcp_core::wire::Hello {
                version_min: 9,
                version_max: 12,
                session: [1; 16],
                stream_index: 0,
                stream_count: 1,
                role: dwcp_core::wire::Role::Data,
                window: 1 << 22,
                ring_pages: 16,
                spill_pages: 0,
                flags: 0,
                name: "x".into(),
            };
            h.encode()
        }),
    ];
    for (what, bytes) in &cases {
        let mut s = TcpStream::connect(r.addr).unwrap();
        s.write_all(bytes).unwrap();
        if *what == "truncated" {
            s.shutdown(Shutdown::Write).unwrap();
        }
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // the responder closes the connection
        assert!(
            rest.len() <= dwcp_core::wire::REPLY_LEN,
            "{what}: unexpected reply {rest:?}"
        );
    }
    let t0 = Instant::now();
    while r.errors.lock().unwrap().len() < cases.len() && t0.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(20));
    }
    let errs = r.errors.lock().unwrap().clone();
    assert!(errs.iter().any(|e| e.contains("bad magic")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("truncated")), "{errs:?}");
    assert!(
        errs.iter().any(|e| e.contains("protocol version")),
        "{errs:?}"
    );
    // Still serving: a real session works afterwards.
    let sess = Session::connect(&c, "after-garbage", r.addr).unwrap();
    let (ours, mut q) = UnixStream::pair().unwrap();
    sess.add_local_channel(ours).unwrap();
    q.write_all(b"hello").unwrap();
    q.shutdown(Shutdown::Write).unwrap();
    let (_, mut qd) = r.ends.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut got = Vec::new();
    qd.shutdown(Shutdown::Write).unwrap();
    qd.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello");
    sess.wait().unwrap();
}

#[test]
fn unknown_target_is_refused_with_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("dwcp-t-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = Acceptor::new(cfg(1, Tier::Lz4), AcceptorLimits::default(), dir);
    let t = thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        acceptor.handle(c).map(|_| ())
    });
    let err = Session::connect(&cfg(1, Tier::Lz4), "nobody-home", addr)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no incoming QEMU socket"), "{err}");
    assert!(matches!(t.join().unwrap(), Err(WireError::Refused(_))));
}

/// A peer that only speaks protocol version 1 gets version 1 in the reply
/// (and so is never sent raw frames, which version 2 added).
#[test]
fn version_is_negotiated_down_to_the_peers_newest() {
    let r = responder(cfg(1, Tier::Raw));
    for (max, want) in [
        (1u16, 1u16),
        (dwcp_core::wire::VERSION_MAX, dwcp_core::wire::VERSION_MAX),
    ] {
        let h = dwcp_core::wire::Hello {
            version_min: 1,
            version_max: max,
            session: [max as u8; 16],
            stream_index: 0,
            stream_count: 1,
            role: dwcp_core::wire::Role::Data,
            window: 4 << 20,
            ring_pages: 16,
            spill_pages: 0,
            flags: 0,
            name: "v".into(),
        };
        let mut s = TcpStream::connect(r.addr).unwrap();
        s.write_all(&h.encode()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let reply = dwcp_core::wire::Reply::read(&mut s).unwrap();
        assert_eq!(reply.status, dwcp_core::wire::Status::Ok);
        assert_eq!(reply.version, want, "peer offering 1..={max}");
    }
}

/// Direct channels (what QEMU's `dwcp:` source uses): bytes handed over
/// with `ChannelWriter::write_vectored` in uneven pieces, the return path
/// on the local socket, `finish` (or `shutdown`, like shutdown(2)) ends the
/// stream, and both sessions complete.
fn direct(tier: Tier, shutdown_second: bool, checksum_raw: bool) {
    direct_with(
        TransportConfig {
            checksum_raw,
            ..cfg(3, tier)
        },
        shutdown_second,
    );
}

fn direct_with(c: TransportConfig, shutdown_second: bool) -> SessionStats {
    let (tier, checksum_raw) = (c.tier, c.checksum_raw);
    let r = responder(c.clone());
    let sess = Session::connect(&c, "test-vm", r.addr).unwrap();
    let data = stream_bytes(7, 5 << 20);
    let reply = stream_bytes(8, 70_000);
    let mut ends = Vec::new();
    for k in 0..2u16 {
        let (ours, mut qemu_src) = UnixStream::pair().unwrap();
        let w = sess.add_direct_channel(ours).unwrap();
        assert_eq!(w.id(), k);
        let d = data.clone();
        let writer = thread::spawn(move || {
            let mut off = 0;
            let mut i = 0;
            while off < d.len() {
                let a = (off + 1 + i * 4099 % 200_000).min(d.len());
                let b = (a + 3 + i * 7919 % 300_000).min(d.len());
                let bufs = [
                    std::io::IoSlice::new(&d[off..a]),
                    std::io::IoSlice::new(&[]),
                    std::io::IoSlice::new(&d[a..b]),
                ];
                assert_eq!(w.write_vectored(&bufs).unwrap(), b - off);
                off = b;
                i += 1;
            }
            if shutdown_second && k == 1 {
                w.shutdown();
                assert!(w.write_vectored(&[std::io::IoSlice::new(b"x")]).is_err());
            } else {
                w.finish();
            }
            // the return path arrives on the local socket, then EOF
            let mut back = Vec::new();
            qemu_src.read_to_end(&mut back).unwrap();
            back
        });
        let (rid, mut qemu_dst) = r.ends.recv_timeout(Duration::from_secs(10)).unwrap();
        let rep = reply.clone();
        let reader = thread::spawn(move || {
            let mut dst_w = qemu_dst.try_clone().unwrap();
            dst_w.write_all(&rep).unwrap();
            dst_w.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            qemu_dst.read_to_end(&mut got).unwrap();
            got
        });
        ends.push((rid, writer, reader));
    }
    for (rid, writer, reader) in ends {
        assert!(
            reader.join().unwrap() == data,
            "channel {rid}: forward bytes differ"
        );
        assert!(
            writer.join().unwrap() == reply,
            "channel {rid}: return bytes differ"
        );
    }
    let stats = sess.wait().unwrap();
    assert_eq!(stats.state, "completed");
    assert_eq!(stats.raw_out, 2 * data.len() as u64);
    assert_eq!(stats.raw_in, 2 * reply.len() as u64);
    // Raw frames (here the return path's) go without a payload checksum
    // unless `checksum_raw` asks for one.
    let codecs = stats.codecs_in;
    if tier == Tier::Raw {
        assert!(codecs.raw > 0, "{codecs:?}");
        let want = if checksum_raw { 0 } else { codecs.raw };
        assert_eq!(codecs.raw_unchecked, want, "{codecs:?}");
    } else {
        assert_eq!(codecs.raw_unchecked, 0, "{codecs:?}");
    }
    stats
}

/// Raw frames, written straight from the caller's buffers without a
/// payload checksum (the default).
#[test]
fn direct_channels_raw() {
    direct(Tier::Raw, false, false);
}

/// Raw frames with a payload checksum (`checksum=all`): copied first.
#[test]
fn direct_channels_raw_checked() {
    direct(Tier::Raw, false, true);
}

#[test]
fn direct_channels_lz4_and_shutdown_ends_the_stream() {
    direct(Tier::Lz4, true, false);
}

/// `n` random pages, then the first `again` of them once more: the repeats
/// lie `n - again` pages and more behind, beyond a small dedup ring.
fn far_repeats(n: u64, again: u64) -> Vec<u8> {
    let x: u64 = 0x2545_F491_4F6C_DD1D;
    let page = |i: u64| -> Vec<u8> {
        let mut p = Vec::with_capacity(4096 + 8);
        p.extend_from_slice(&((i << 12) | 0x28).to_be_bytes());
        let mut y = x ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for _ in 0..512 {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            p.extend_from_slice(&y.to_le_bytes());
        }
        p
    };
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(page(i));
    }
    for i in 0..again {
        out.extend(page(i));
    }
    out
}

/// One channel of `data` from a source with `src` to a destination with
/// `dst`; checks the bytes and returns the source's stats.
fn one_channel(src: TransportConfig, dst: TransportConfig, data: Vec<u8>) -> SessionStats {
    let r = responder(dst);
    let sess = Session::connect(&src, "spill-vm", r.addr).unwrap();
    let (ours, qemu_src) = UnixStream::pair().unwrap();
    sess.add_local_channel(ours).unwrap();
    let mut w = qemu_src.try_clone().unwrap();
    let d = data.clone();
    let writer = thread::spawn(move || {
        w.write_all(&d).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let (_, mut qemu_dst) = r.ends.recv_timeout(Duration::from_secs(10)).unwrap();
    qemu_dst.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    qemu_dst.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert!(
        got == data,
        "bytes differ ({} vs {})",
        got.len(),
        data.len()
    );
    let st = sess.wait().unwrap();
    assert_eq!(st.state, "completed");
    st
}

/// Content sent once is referred to, not sent again, although it left the
/// 1 MiB in-memory ring long ago: both ends keep it in their spill files.
#[test]
fn the_spill_file_dedups_content_the_ring_forgot() {
    let c = TransportConfig {
        dedup_cache_mb: 1,
        spill_mb: 16,
        ..cfg(2, Tier::Lz4)
    };
    let st = one_channel(c.clone(), c, far_repeats(2000, 1000));
    // A record cut by a read boundary is not seen as a page (a few %).
    assert!(st.pages_deduped >= 900, "{st:?}");
    assert_eq!(st.pages_missed_dups, 0, "{st:?}");
}

/// A destination without spill files grants none: the source sends the
/// forgotten pages again, and everything still arrives intact.
#[test]
fn a_destination_without_spill_files_gets_full_pages() {
    let src = TransportConfig {
        dedup_cache_mb: 1,
        spill_mb: 16,
        ..cfg(2, Tier::Lz4)
    };
    let dst = TransportConfig {
        spill_mb: 0,
        ..src.clone()
    };
    let st = one_channel(src, dst, far_repeats(2000, 1000));
    assert_eq!(st.pages_deduped, 0, "{st:?}");
    assert!(st.pages_missed_dups >= 900, "{st:?}");
}

/// A spill directory the destination cannot write to: no spill granted,
/// the migration goes on without it.
#[test]
fn an_unusable_spill_dir_means_no_spill() {
    let src = TransportConfig {
        dedup_cache_mb: 1,
        spill_mb: 16,
        ..cfg(1, Tier::Lz4)
    };
    let dst = TransportConfig {
        spill_dir: std::path::PathBuf::from("/nonexistent/dwcp-spill"),
        ..src.clone()
    };
    assert_eq!(dst.spill_pages(), 0);
    let st = one_channel(src, dst, far_repeats(600, 300));
    assert_eq!(st.pages_deduped, 0, "{st:?}");
}

/// `n` pages, then the same `n` pages again with one 8-byte word changed in
/// each (a guest that edits its pages a little between two passes).
fn edited_pages(n: u64) -> Vec<u8> {
    let page = |i: u64, edit: bool| -> Vec<u8> {
        let mut p = Vec::with_capacity(4096 + 8);
        p.extend_from_slice(&((i << 12) | 0x28).to_be_bytes());
        let mut y = 0x2545_F491_4F6C_DD1D ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for k in 0..512u64 {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            let w = if edit && k == i % 512 { !y } else { y };
            p.extend_from_slice(&w.to_le_bytes());
        }
        p
    };
    let mut out = Vec::new();
    for edit in [false, true] {
        for i in 0..n {
            out.extend(page(i, edit));
        }
    }
    out
}

/// Deltas are negotiated: with both ends allowing them the edited pages go
/// as deltas (and arrive byte for byte); a destination that does not (like
/// an agent from before deltas, which grants no flag) gets every page in
/// full.
#[test]
fn deltas_only_when_both_ends_agree() {
    let c = TransportConfig {
        dedup_cache_mb: 4,
        ..cfg(1, Tier::Lz4)
    };
    let st = one_channel(c.clone(), c.clone(), edited_pages(600));
    eprintln!(
        "deltas: {} of {} re-sent pages, LZ4 alone {} B, as sent {} B, wire {} B",
        st.pages_delta, st.pages_resent, st.resent_lz4_full, st.resent_lz4_delta, st.wire_out
    );
    // Pages that straddle two frames are not recognised as records.
    assert!(st.pages_delta >= 550, "{st:?}");
    assert!(st.resent_lz4_delta * 10 < st.resent_lz4_full, "{st:?}");
    let with = st.wire_out;
    let off = TransportConfig {
        delta: false,
        ..c.clone()
    };
    let st = one_channel(c.clone(), off, edited_pages(600));
    eprintln!("no deltas granted: wire {} B", st.wire_out);
    assert_eq!((st.pages_delta, st.pages_resent), (0, 0), "{st:?}");
    assert!(with * 3 / 2 < st.wire_out, "{with} vs {}", st.wire_out);
}

/// `n` pages of pseudo-random content in QEMU's record format; page `i`
/// has generation `gen[i]` of its content.
fn pages_of(gens: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &g) in gens.iter().enumerate() {
        let i = i as u64;
        out.extend_from_slice(&((i << 12) | 0x28).to_be_bytes());
        let mut y = 0x2545_F491_4F6C_DD1D ^ (i + (g << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for _ in 0..512u64 {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            out.extend_from_slice(&y.to_le_bytes());
        }
    }
    out
}

/// Re-migration: a guest that moved A -> B and comes back to A sends as
/// references the pages whose content A kept from the first trip; every
/// byte still arrives as sent. A destination without a kept copy (or that
/// keeps none) gets every page in full.
#[test]
fn a_guest_migrating_back_sends_only_what_changed() {
    use dwcp_core::codec::keep::KeepStore;
    let dir = std::env::temp_dir();
    let store_a = KeepStore::new(&dir, Duration::from_secs(60), 100_000);
    let store_b = KeepStore::new(&dir, Duration::from_secs(60), 100_000);
    let on = |k: &std::sync::Arc<KeepStore>| TransportConfig {
        dedup_cache_mb: 4,
        keep: Some(k.clone()),
        ..cfg(2, Tier::Lz4)
    };
    let n = 2000;
    let first = one_channel(on(&store_a), on(&store_b), pages_of(&vec![0; n]));
    assert_eq!(first.pages_kept, 0, "nothing kept yet: {first:?}");
    assert!(store_a.wait_sealed(Duration::from_secs(10)));
    assert!(store_b.wait_sealed(Duration::from_secs(10)));
    let kept = store_a.get("spill-vm").expect("A kept the guest it sent");
    assert!(kept.len() >= n * 9 / 10, "{} pages kept", kept.len());
    assert_eq!(
        store_b.get("spill-vm").expect("B kept it").hashes(),
        kept.hashes()
    );
    // One page in ten rewritten on B since.
    let gens: Vec<u64> = (0..n).map(|i| u64::from(i % 10 == 0)).collect();
    let back = one_channel(on(&store_b), on(&store_a), pages_of(&gens));
    eprintln!(
        "first trip: wire {} B; back: wire {} B, {} of {} pages as references to A's copy",
        first.wire_out, back.wire_out, back.pages_kept, back.pages_seen
    );
    // Pages that straddle two frames are not recognised as records.
    assert!(back.pages_kept as usize >= n * 8 / 10, "{back:?}");
    assert!(back.wire_out * 4 < first.wire_out, "{back:?}");
    // A destination that keeps nothing: every page in full, intact.
    let cold = one_channel(on(&store_b), cfg(2, Tier::Lz4), pages_of(&gens));
    assert_eq!(cold.pages_kept, 0, "{cold:?}");
    assert!(cold.wire_out > back.wire_out * 4, "{cold:?}");
    // keep=0 on the source: neither end keeps anything of this migration.
    let store_c = KeepStore::new(&dir, Duration::from_secs(60), 100_000);
    let store_d = KeepStore::new(&dir, Duration::from_secs(60), 100_000);
    let off = TransportConfig {
        keep_copy: false,
        ..on(&store_c)
    };
    one_channel(off, on(&store_d), pages_of(&gens));
    assert!(
        store_c.wait_sealed(Duration::from_secs(10))
            && store_d.wait_sealed(Duration::from_secs(10))
    );
    assert_eq!((store_c.usage(), store_d.usage()), ((0, 0), (0, 0)));
}

/// A kept copy that changed on disk after the destination announced it:
/// the session fails naming the page, and nothing of the frame that
/// referred to it reaches the destination's QEMU socket.
#[test]
fn a_kept_copy_changed_on_disk_fails_the_session_named() {
    use dwcp_core::codec::keep::{KeepStore, KeptCopy};
    let dir = std::env::temp_dir();
    let n = 64;
    let data = pages_of(&vec![0; n]);
    let pages: Vec<u8> = data
        .chunks_exact(4096 + 8)
        .flat_map(|r| r[8..].to_vec())
        .collect();
    let store_a = KeepStore::new(&dir, Duration::from_secs(60), 1000);
    store_a.insert("spill-vm", KeptCopy::from_pages(&dir, &pages).unwrap());
    store_a.get("spill-vm").unwrap().corrupt_page(5).unwrap();
    let store_b = KeepStore::new(&dir, Duration::from_secs(60), 1000);
    let on = |k: &std::sync::Arc<KeepStore>| TransportConfig {
        dedup_cache_mb: 4,
        keep: Some(k.clone()),
        ..cfg(1, Tier::Lz4)
    };
    let r = responder(on(&store_a));
    let sess = Session::connect(&on(&store_b), "spill-vm", r.addr).unwrap();
    let (ours, qemu_src) = UnixStream::pair().unwrap();
    sess.add_local_channel(ours).unwrap();
    let mut w = qemu_src.try_clone().unwrap();
    let d = data.clone();
    let writer = thread::spawn(move || {
        let _ = w.write_all(&d);
        let _ = w.shutdown(Shutdown::Write);
    });
    let e = sess.wait().unwrap_err().to_string();
    assert!(e.contains("kept page 5 differs"), "{e}");
    writer.join().unwrap();
    // What the destination's QEMU got, if anything: a prefix, never page 5.
    if let Ok((_, mut qemu_dst)) = r.ends.recv_timeout(Duration::from_secs(2)) {
        let mut got = Vec::new();
        let _ = qemu_dst.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = qemu_dst.read_to_end(&mut got);
        assert!(got.len() <= 5 * (4096 + 8), "{} bytes delivered", got.len());
        assert!(got == data[..got.len()]);
    }
}

/// zstd:3 with context across frames, always on.
fn with_context(streams: u16, context: ContextUse) -> TransportConfig {
    TransportConfig {
        context,
        ..cfg(streams, Tier::Zstd(3))
    }
}

/// A channel whose frames repeat each other but never a whole page: 384 KiB
/// of noise, again and again, each time one byte further on. Dedup finds
/// nothing; a frame compressed alone finds the repeat only within itself.
fn shifted_repeats(copies: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let corpus: Vec<u8> = (0..384 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut out = Vec::new();
    for k in 0..copies {
        out.push(k as u8);
        out.extend_from_slice(&corpus);
    }
    out
}

/// Context frames on several channels and streams arrive intact, and a
/// frame refers to the frames before it: the same bytes cost a fraction of
/// what frames compressed alone cost.
#[test]
fn context_frames_refer_to_the_frames_before_them() {
    let data = shifted_repeats(24);
    let ctx = one_channel(
        with_context(3, ContextUse::Always),
        with_context(3, ContextUse::Auto),
        data.clone(),
    );
    let alone = one_channel(
        with_context(3, ContextUse::Off),
        with_context(3, ContextUse::Auto),
        data.clone(),
    );
    assert!(ctx.frames_context_out > 10, "{}", ctx.frames_context_out);
    assert_eq!(alone.frames_context_out, 0);
    assert!(
        ctx.wire_out * 3 < alone.wire_out,
        "with context {} B on the wire, frames alone {} B",
        ctx.wire_out,
        alone.wire_out
    );
    // several channels at once, both directions, 4 streams
    let st = relay_with(
        with_context(4, ContextUse::Always),
        4,
        6 << 20,
        100_000,
        |_| {},
    );
    assert!(st.frames_context_out > 0);
}

/// A destination that does not allow context frames never gets one.
#[test]
fn context_needs_both_ends() {
    let st = one_channel(
        with_context(2, ContextUse::Always),
        with_context(2, ContextUse::Off),
        shifted_repeats(8),
    );
    assert_eq!(st.frames_context_out, 0);
    assert!(st.codecs_in.zstd_ctx == 0);
}

/// QEMU's `dwcp:` channels (read by the embedder, not a deliverer thread)
/// decode context frames in order too.
#[test]
fn direct_channels_with_context() {
    let st = direct_with(with_context(3, ContextUse::Always), false);
    assert!(st.frames_context_out > 0, "{}", st.frames_context_out);
}

#[test]
fn corrupted_context_frame_is_never_delivered_and_fails_both_sides() {
    corrupted_frame_is_never_delivered_and_fails_both_sides(with_context(1, ContextUse::Always));
}
