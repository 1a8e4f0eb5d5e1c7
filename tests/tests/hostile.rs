//! Bounded memory against an authenticated but hostile peer (docs/protocol.md,
//! "Flow control and memory bounds"): a real `dwcp agent` on the lab's
//! destination host, with the default per-session budget (256 MiB) and
//! `--max-sessions 3`, is fed by a client holding a valid certificate that
//! speaks the wire protocol itself and asks for the most of everything:
//! the largest window and dedup ring, every channel, and streams past what
//! the budget holds. It fills every window with unique, incompressible data
//! the destination cannot deliver (a gap in each channel's sequence), fills a
//! dedup ring with unique pages, leaves a frame half-read on every stream,
//! and opens sessions up to and past the agent's limit. The agent's RSS
//! (VmRSS, VmHWM from /proc) must stay under the documented bound; the
//! session past the limit and the one past its budget are refused or failed
//! naming the limit; then an honest session still carries its bytes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dwcp_core::codec::CodecId;
use dwcp_core::tls::{client_handshake, CredentialStore, TlsWriter};
use dwcp_core::transport::{budget, Session, TransportConfig};
use dwcp_core::wire::{self, FrameHeader, Hello, Kind, Reply, Status};
use dwcp_lab::*;
use rand::RngCore;

const MIB: u64 = 1 << 20;
const BUDGET: u64 = budget::DEFAULT_SESSION_MEMORY;
const MAX_SESSIONS: u64 = 3;
/// The channels a session may open with the agent's defaults (`max-channels`).
const CHANNELS: u16 = 8;

#[test]
fn channels_constant_is_the_default() {
    assert_eq!(
        CHANNELS,
        dwcp_core::transport::TransportConfig::default().max_channels
    );
}

/// VmRSS and VmHWM of a process, bytes (0 once it is gone).
fn rss(pid: u32) -> (u64, u64) {
    proc_sample(pid).map(|s| (s.rss, s.hwm)).unwrap_or((0, 0))
}

/// A fake destination QEMU for `name`: accepts every channel's connection
/// and reads (and drops) everything, so in-order frames are delivered and
/// rebuilt (filling the dedup ring) and credited back.
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
                let mut buf = vec![0u8; 256 << 10];
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

/// One hostile session: its streams' writers, credit seen per channel,
/// the peer's abort reason if any.
struct Hog {
    writers: Vec<TlsWriter>,
    window: u64,
    ring_pages: u64,
    credited: Arc<Mutex<HashMap<u16, u64>>>,
    sent: HashMap<u16, u64>,
    next_seq: HashMap<u16, u64>,
    aborted: Arc<Mutex<Option<String>>>,
    next_writer: usize,
    /// Streams 0..clean have no half-read frame (all, until [`Hog::half_frames`]).
    clean: usize,
    rng: rand::rngs::StdRng,
}

/// Connects `streams` TLS streams from the source host and runs the
/// handshake asking for the most of everything; the replies' status, or
/// the session.
fn hog(lab: &Lab, name: &str, streams: u16) -> Result<Hog, Status> {
    let addr: SocketAddr = lab.dst_addr().parse().unwrap();
    let socks: Vec<TcpStream> = lab
        .topo
        .in_ns(lab.src_ns(), move || {
            (0..streams)
                .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap())
                .collect()
        })
        .unwrap();
    let store = CredentialStore::load(&lab.src_tls_dir).unwrap();
    let session: [u8; 16] = rand::random();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    let mut grant = None;
    for (i, s) in socks.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let link = client_handshake(s, store.client_config(), &addr.ip().to_string()).unwrap();
        let (mut r, mut w) = link.split();
        let hello = Hello {
            version_min: wire::VERSION_MIN,
            version_max: wire::VERSION_MAX,
            session,
            stream_index: i as u16,
            stream_count: streams,
            role: wire::Role::Data,
            window: u32::MAX,
            ring_pages: u32::MAX,
            spill_pages: 0,
            flags: 0,
            name: name.to_string(),
        };
        w.write_all(&hello.encode()).unwrap();
        w.flush().unwrap();
        let reply = Reply::read(&mut r).unwrap();
        if reply.status != Status::Ok {
            return Err(reply.status);
        }
        grant = Some((reply.window as u64, reply.ring_pages as u64));
        writers.push(w);
        readers.push(r);
    }
    let (window, ring_pages) = grant.unwrap();
    let credited = Arc::new(Mutex::new(HashMap::new()));
    let aborted = Arc::new(Mutex::new(None));
    // Read what the agent sends (credit, pings, an abort) so its writers
    // never block on us.
    for mut r in readers {
        let (credited, aborted) = (credited.clone(), aborted.clone());
        std::thread::spawn(move || {
            let mut payload = Vec::new();
            while let Ok(Some(h)) = FrameHeader::read(&mut r, 64) {
                if h.wire_len > 0 {
                    payload.resize(h.wire_len as usize, 0);
                    if r.read_exact(&mut payload).is_err() {
                        return;
                    }
                }
                match h.kind {
                    Kind::Window => {
                        *credited.lock().unwrap().entry(h.channel).or_insert(0) += h.len as u64
                    }
                    Kind::Abort => {
                        *aborted.lock().unwrap() =
                            Some(String::from_utf8_lossy(&payload).into_owned())
                    }
                    _ => {}
                }
            }
        });
    }
    Ok(Hog {
        writers,
        window,
        ring_pages,
        credited,
        sent: HashMap::new(),
        next_seq: HashMap::new(),
        aborted,
        next_writer: 0,
        clean: usize::MAX,
        rng: rand::SeedableRng::seed_from_u64(rand::random()),
    })
}

impl Hog {
    fn writer(&mut self) -> &mut TlsWriter {
        self.next_writer = (self.next_writer + 1) % self.writers.len().min(self.clean);
        &mut self.writers[self.next_writer]
    }

    /// Waits until `len` more bytes fit in channel `ch`'s window.
    fn wait_credit(&self, ch: u16, len: u64) -> bool {
        let t0 = Instant::now();
        loop {
            let credited = *self.credited.lock().unwrap().get(&ch).unwrap_or(&0);
            if self.sent.get(&ch).copied().unwrap_or(0) + len <= credited + self.window {
                return true;
            }
            if self.aborted.lock().unwrap().is_some() || t0.elapsed() > Duration::from_secs(60) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends `pages` unique pages on channel `ch`, in order, as PAGE ops
    /// (each goes into the destination's dedup ring); false once the
    /// session is down.
    fn fill_ring(&mut self, ch: u16, pages: u64) -> bool {
        let mut left = pages;
        while left > 0 {
            let n = left.min(256);
            let mut plan = Vec::with_capacity(n as usize * 4097);
            for _ in 0..n {
                plan.push(0x03); // PAGE
                let at = plan.len();
                plan.resize(at + 4096, 0);
                self.rng.fill_bytes(&mut plan[at..]);
            }
            let raw = n * 4096;
            if !self.wait_credit(ch, raw) {
                return false;
            }
            let seq = *self.next_seq.entry(ch).or_insert(0);
            let h = FrameHeader::data(ch, seq, CodecId::None, raw as u32, plan.len() as u32, &plan);
            let w = self.writer();
            if w.write_all(&h.encode())
                .and_then(|()| w.write_all(&plan))
                .is_err()
            {
                return false;
            }
            self.next_seq.insert(ch, seq + 1);
            *self.sent.entry(ch).or_insert(0) += raw;
            left -= n;
        }
        true
    }

    /// Fills channel `ch`'s window but `keep` bytes with raw frames of random
    /// bytes after a gap in its sequence: none can be delivered.
    fn fill_window(&mut self, ch: u16, keep: u64) -> bool {
        // What was sent in order is delivered and credited first.
        if !self.wait_credit(ch, self.window) {
            return false;
        }
        let credited = *self.credited.lock().unwrap().get(&ch).unwrap_or(&0);
        let mut room = (credited + self.window)
            .saturating_sub(self.sent.get(&ch).copied().unwrap_or(0))
            .saturating_sub(keep);
        // The gap: this channel's next frame never comes.
        let mut seq = self.next_seq.get(&ch).copied().unwrap_or(0) + 1;
        let mut data = vec![0u8; 1 << 20];
        while room > 0 {
            let n = room.min(1 << 20) as usize;
            self.rng.fill_bytes(&mut data[..n]);
            let h = FrameHeader::raw(ch, seq, n as u32, Some(crc32c(&data[..n])));
            let w = self.writer();
            if w.write_all(&h.encode())
                .and_then(|()| w.write_all(&data[..n]))
                .is_err()
            {
                return false;
            }
            seq += 1;
            room -= n as u64;
            *self.sent.entry(ch).or_insert(0) += n as u64;
        }
        self.next_seq.insert(ch, seq); // past the gap, for half_frames
        true
    }

    /// On each stream from `from` on, the header of a 1 MiB frame and all
    /// of its payload but the last byte: those streams' readers hold a frame
    /// in hand; later frames go on the streams before `from`.
    fn half_frames(&mut self, from: usize) {
        let mut data = vec![0u8; 1 << 20];
        self.rng.fill_bytes(&mut data);
        let crc = crc32c(&data);
        self.clean = from;
        for i in from..self.writers.len() {
            let ch = (i % CHANNELS as usize) as u16;
            let seq = self.next_seq.get(&ch).copied().unwrap_or(1) + 1000 + i as u64;
            let h = FrameHeader::raw(ch, seq, data.len() as u32, Some(crc));
            let w = &mut self.writers[i];
            let _ = w
                .write_all(&h.encode())
                .and_then(|()| w.write_all(&data[..data.len() - 1]))
                .and_then(|()| w.flush());
        }
    }
}

fn crc32c(b: &[u8]) -> u32 {
    // The wire's checksum (CRC-32C), computed the way FrameHeader::data does.
    FrameHeader::data(0, 0, CodecId::None, 1, b.len() as u32, b).payload_crc
}

#[test]
fn hostile_peer_cannot_push_the_agent_past_its_memory_bound() {
    let lab = Lab::new(
        "hostile",
        Middle::Bridge,
        &[
            "--max-sessions",
            "3",
            "--allow",
            "*",
            "--idle-timeout",
            "300",
        ],
    )
    .unwrap();
    let pid = lab.dst_agent().child.id();
    let (base, _) = rss(pid);
    // The documented bound: per session the budget, per agent max-sessions
    // of them over what the agent holds idle.
    let bound = base + MAX_SESSIONS * BUDGET;
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid).0, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let dst_log = lab.dst_agent().log.clone();

    // 256 streams do not fit in the budget: refused, naming it.
    let _s = sink(&lab.dst_agent().incoming("hog0"));
    let e = hog(&lab, "hog0", 256).err();
    assert_eq!(e, Some(Status::MemoryBudget));
    assert!(
        !grep(&dst_log, "session-memory").is_empty(),
        "{}",
        lab.dst_agent().log_text()
    );

    // Three sessions at the most of everything: 8 streams (what fits),
    // the largest window and ring asked, every channel; each fills channel
    // 0's dedup ring with unique pages (delivered, so rebuilt into the
    // ring), then every window with undeliverable bytes, then leaves a frame
    // half-read on every stream. The third keeps its last channel for a
    // second ring, below.
    let mut hogs = Vec::new();
    let mut sinks = Vec::new();
    for k in 1..=MAX_SESSIONS {
        let name = format!("hog{k}");
        sinks.push(sink(&lab.dst_agent().incoming(&name)));
        let mut h = hog(&lab, &name, 8)
            .unwrap_or_else(|s| panic!("{name}: refused: {s}\n{}", lab.dst_agent().log_text()));
        eprintln!(
            "{name}: granted window {} KiB, ring {} MiB",
            h.window >> 10,
            h.ring_pages * 4096 / MIB
        );
        assert!(h.window < 64 * MIB && h.ring_pages * 4096 < 1024 * MIB);
        let pages = h.ring_pages;
        assert!(
            h.fill_ring(0, pages),
            "{name}: ring: {:?}",
            h.aborted.lock().unwrap()
        );
        let last = if k == MAX_SESSIONS {
            CHANNELS - 1
        } else {
            CHANNELS
        };
        for ch in 0..last {
            // 1 MiB left on channels 0..7 for the streams' half-read frames.
            assert!(
                h.fill_window(ch, if ch < 8 { 1 << 20 } else { 0 }),
                "{name} ch{ch}"
            );
        }
        // The third keeps stream 0 whole for its second ring.
        h.half_frames(if k == MAX_SESSIONS { 1 } else { 0 });
        hogs.push(h);
    }
    std::thread::sleep(Duration::from_secs(3));
    let (now, hwm) = rss(pid);
    eprintln!(
        "agent RSS: idle {} MiB, now {} MiB, sampled peak {} MiB, VmHWM {} MiB; bound {} MiB",
        base / MIB,
        now / MIB,
        peak.load(Ordering::Relaxed) / MIB,
        hwm / MIB,
        bound / MIB
    );

    // A fourth session: refused at its handshake, naming the limit; the
    // three running are untouched.
    let _s4 = sink(&lab.dst_agent().incoming("hog4"));
    assert_eq!(hog(&lab, "hog4", 1).err(), Some(Status::MaxSessions));
    assert!(!grep(&dst_log, "--max-sessions").is_empty());
    for h in &hogs {
        assert!(h.aborted.lock().unwrap().is_none());
    }

    // A second full ring in one session runs out of its budget: that
    // session fails, naming it.
    let h = &mut hogs[2];
    let pages = h.ring_pages;
    assert!(!h.fill_ring(CHANNELS - 1, pages) || h.aborted.lock().unwrap().is_some());
    let t0 = Instant::now();
    while h.aborted.lock().unwrap().is_none() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let why = h.aborted.lock().unwrap().clone().unwrap_or_default();
    assert!(why.contains("memory budget"), "{why:?}");
    let (_, hwm) = rss(pid);
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed).max(hwm);
    eprintln!(
        "agent peak RSS {} MiB (VmHWM {} MiB), bound {} MiB",
        peak / MIB,
        hwm / MIB,
        bound / MIB
    );
    assert!(
        hwm <= bound,
        "VmHWM {} MiB over the bound {} MiB",
        hwm / MIB,
        bound / MIB
    );
    drop(hogs);

    // An honest session still carries its bytes.
    let got = sink(&lab.dst_agent().incoming("honest"));
    let mut cfg = TransportConfig {
        streams: 2,
        workers: 1,
        ..TransportConfig::default()
    };
    cfg.tls.dir = lab.src_tls_dir.clone();
    let addr: SocketAddr = lab.dst_addr().parse().unwrap();
    let t0 = Instant::now();
    let session = loop {
        let c = cfg.clone();
        match lab
            .topo
            .in_ns(lab.src_ns(), move || Session::connect(&c, "honest", addr))
            .unwrap()
        {
            Ok(s) => break s,
            // The hostile sessions may still be winding down.
            Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                eprintln!("honest: {e}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!(
                "honest session refused: {e}\n{}",
                lab.dst_agent().log_text()
            ),
        }
    };
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    session.add_local_channel(theirs).unwrap();
    let mut data = vec![0u8; 32 << 20];
    rand::thread_rng().fill_bytes(&mut data);
    ours.write_all(&data).unwrap();
    let t0 = Instant::now();
    while got.load(Ordering::Relaxed) < data.len() as u64 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "honest bytes: {} of {}\n{}",
            got.load(Ordering::Relaxed),
            data.len(),
            lab.dst_agent().log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    session.abort("test done");
    let _ = session.wait();
}
