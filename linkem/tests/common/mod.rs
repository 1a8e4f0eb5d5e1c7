//! Helpers for linkem's namespace tests: unique names, serialized tests,
//! TCP/UDP traffic generators running inside namespaces.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use linkem::{Middle, Topology};

static SERIAL: Mutex<()> = Mutex::new(());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Accuracy tests must not run concurrently on a 2-core machine.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A topology with a unique name prefix `lk-<pid>-<n>` and subnet.
pub fn topology(middle: Middle) -> Topology {
    let n = NEXT.fetch_add(1, Relaxed);
    let prefix = format!("lk-{}-{n}", std::process::id());
    let subnet = 100 + (std::process::id() as u64 * 7 + n) % 100;
    Topology::create(&prefix, subnet as u8, middle).expect("create topology")
}

/// Run ping from src to dst; returns (rtt ms, mdev ms, received, sent).
/// The RTT is the mean of the replies after dropping the slowest tenth: on
/// two busy cores a preempted `ping` (not the link) can add tens of ms to a
/// few replies, which would swing the plain mean; the emulator's delay and
/// jitter shape the rest.
pub fn ping(t: &Topology, count: u32, interval: &str) -> (f64, f64, u32, u32) {
    let out = t
        .exec(&t.src_ns, "ping")
        .args(["-n", "-c", &count.to_string(), "-i", interval, "-W", "2"])
        .arg(t.dst_ip.to_string())
        .output()
        .expect("run ping");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut sent = 0;
    let mut recv = 0;
    let mut avg = f64::NAN;
    let mut mdev = f64::NAN;
    let mut times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    for line in text.lines() {
        if line.contains("packets transmitted") {
            let nums: Vec<u32> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .take(2)
                .map(|s| s.parse().unwrap())
                .collect();
            sent = nums[0];
            recv = nums[1];
        }
        if let Some(rest) = line.split(" = ").nth(1) {
            let v: Vec<f64> = rest
                .split(['/', ' '])
                .filter_map(|s| s.parse().ok())
                .collect();
            if v.len() >= 4 {
                avg = v[1];
                mdev = v[3];
            }
        }
    }
    assert!(
        sent > 0,
        "ping output: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !times.is_empty() {
        times.sort_by(f64::total_cmp);
        let keep = times.len() - times.len() / 10;
        avg = times[..keep].iter().sum::<f64>() / keep as f64;
    }
    (avg, mdev, recv, sent)
}

/// A TCP bulk transfer src -> dst. `received` counts bytes at the receiver.
pub struct Bulk {
    pub received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Bulk {
    pub fn start(t: &Topology, port: u16) -> Bulk {
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let dst = SocketAddr::from((t.dst_ip, port));
        let (ltx, lrx) = std::sync::mpsc::channel();
        let r = received.clone();
        let rx = t.spawn_in(&t.dst_ns, move || -> anyhow::Result<()> {
            let l = TcpListener::bind(dst)?;
            ltx.send(()).ok();
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; 1 << 18];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                r.fetch_add(n as u64, Relaxed);
            }
        });
        lrx.recv_timeout(Duration::from_secs(5))
            .expect("listener up");
        let st = stop.clone();
        let tx = t.spawn_in(&t.src_ns, move || -> anyhow::Result<()> {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_write_timeout(Some(Duration::from_millis(200)))?;
            let buf = vec![0x5au8; 1 << 18];
            while !st.load(Relaxed) {
                match s.write(&buf) {
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => return Err(e.into()),
                }
            }
            s.shutdown(std::net::Shutdown::Both)?;
            Ok(())
        });
        Bulk {
            received,
            stop,
            threads: vec![tx.into_inner(), rx.into_inner()],
        }
    }

    pub fn finish(self) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Small extension: flatten `JoinHandle<Result<Result<T>>>`.
pub trait Flatten {
    fn into_inner(self) -> std::thread::JoinHandle<anyhow::Result<()>>;
}

impl Flatten for std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>> {
    fn into_inner(self) -> std::thread::JoinHandle<anyhow::Result<()>> {
        std::thread::spawn(move || match self.join() {
            Ok(r) => r.and_then(|x| x),
            Err(_) => Err(anyhow::anyhow!("panicked")),
        })
    }
}

/// Bind a UDP receiver in `ns` counting datagrams until told to stop.
pub struct UdpSink {
    pub packets: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    h: std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>,
}

impl UdpSink {
    pub fn start(t: &Topology, ip: Ipv4Addr, port: u16) -> UdpSink {
        let packets = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, b, st) = (packets.clone(), bytes.clone(), stop.clone());
        let (ltx, lrx) = std::sync::mpsc::channel();
        let h = t.spawn_in(&t.dst_ns, move || -> anyhow::Result<()> {
            let s = UdpSocket::bind((ip, port))?;
            set_rcvbuf(&s, 32 << 20);
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            ltx.send(()).ok();
            let mut buf = [0u8; 2048];
            while !st.load(Relaxed) {
                if let Ok(n) = s.recv(&mut buf) {
                    p.fetch_add(1, Relaxed);
                    b.fetch_add(n as u64, Relaxed);
                }
            }
            Ok(())
        });
        lrx.recv_timeout(Duration::from_secs(5))
            .expect("udp sink up");
        UdpSink {
            packets,
            bytes,
            stop,
            h,
        }
    }

    pub fn finish(self) -> u64 {
        self.stop.store(true, Relaxed);
        self.h.join().unwrap().unwrap().unwrap();
        self.packets.load(Relaxed)
    }
}

fn set_rcvbuf(s: &UdpSocket, bytes: i32) {
    // SAFETY: pointer to a live c_int.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const i32).cast(),
            4,
        )
    };
}

/// Send `count` UDP datagrams of `size` payload bytes from src to dst:port
/// at `pps` (paced in 1 ms bursts) or until `until`. Returns the number sent.
pub fn udp_blast(
    t: &Topology,
    port: u16,
    size: usize,
    pps: u64,
    count: u64,
    until: Duration,
) -> u64 {
    udp_blast_to(t, t.dst_ip, port, size, pps, count, until)
}

/// [`udp_blast`] to any address.
pub fn udp_blast_to(
    t: &Topology,
    ip: Ipv4Addr,
    port: u16,
    size: usize,
    pps: u64,
    count: u64,
    until: Duration,
) -> u64 {
    let dst = SocketAddr::from((ip, port));
    let src = t.src_ip;
    t.in_ns(&t.src_ns, move || {
        let s = UdpSocket::bind((src, 0)).unwrap();
        s.connect(dst).unwrap();
        let mut buf = vec![0u8; size];
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < count && start.elapsed() < until {
            let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
            while sent < due.min(count) {
                buf[..8].copy_from_slice(&sent.to_le_bytes());
                // A full local socket buffer just means "try again".
                if s.send(&buf).is_ok() {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        sent
    })
    .unwrap()
}

/// `|measured - expected| / expected`.
pub fn rel_err(measured: f64, expected: f64) -> f64 {
    (measured - expected).abs() / expected
}
