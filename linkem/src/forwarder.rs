//! The forwarder: two threads (one per direction), each moving L2 frames
//! from one AF_PACKET port to the other through a delay line.
//!
//! Per direction everything (rate queue and delay line) is a single FIFO
//! ring of fixed-size slots, because the model never reorders: frames are
//! received by `recvmmsg` straight into the ring's free slots and sent by
//! `sendmmsg` straight from its head; nothing is allocated per packet.
//!
//! ```text
//!  head ........ ser ........ tail ........ (free) ........ head+n
//!   | delay line  | rate queue  |
//!   (departure     (waiting for the serializer; bytes here = queue backlog)
//!    time known)
//! ```
//!
//! Model, per frame: loss (seeded Bernoulli) on arrival -> drop-tail queue
//! limit check -> serializer at the current rate (a token bucket of one
//! frame: a frame starts when the previous one finished) -> propagation delay
//! plus bounded jitter, departure clamped to be no earlier than the previous
//! frame's (order kept). Arrival times are the kernel's receive timestamps.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::config::{DirConfig, LinkConfig};
use crate::sys;

/// Counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirCounters {
    /// Frames read from the ingress port.
    pub rx_packets: u64,
    /// Bytes (L2 frame lengths) read from the ingress port.
    pub rx_bytes: u64,
    /// Frames sent on the egress port.
    pub fwd_packets: u64,
    /// Bytes (L2 frame lengths) sent on the egress port.
    pub fwd_bytes: u64,
    /// Frames dropped by the random loss model.
    pub dropped_loss: u64,
    /// Frames dropped because the drop-tail queue was full.
    pub dropped_queue: u64,
    /// Frames larger than `slot_size` (dropped).
    pub dropped_oversize: u64,
    /// Frames the kernel dropped before we read them (socket buffer full,
    /// or the slot ring full: raise `ring_slots`).
    pub dropped_kernel: u64,
    /// Failed sends (frame discarded).
    pub tx_errors: u64,
    /// CPU time used by this direction's thread, in ns (updated every ~10 ms).
    pub cpu_ns: u64,
}

/// Counters of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Port a -> port b.
    pub a_to_b: DirCounters,
    /// Port b -> port a.
    pub b_to_a: DirCounters,
}

impl Stats {
    /// JSON text (the format of the stats file).
    pub fn to_json(&self) -> String {
        fn dir(c: &DirCounters) -> String {
            format!(
                "{{\"rx_packets\":{},\"rx_bytes\":{},\"fwd_packets\":{},\"fwd_bytes\":{},\
                 \"dropped_loss\":{},\"dropped_queue\":{},\
                 \"dropped_oversize\":{},\"dropped_kernel\":{},\"tx_errors\":{},\"cpu_ns\":{}}}",
                c.rx_packets,
                c.rx_bytes,
                c.fwd_packets,
                c.fwd_bytes,
                c.dropped_loss,
                c.dropped_queue,
                c.dropped_oversize,
                c.dropped_kernel,
                c.tx_errors,
                c.cpu_ns
            )
        }
        format!(
            "{{\"a_to_b\":{},\"b_to_a\":{}}}\n",
            dir(&self.a_to_b),
            dir(&self.b_to_a)
        )
    }
}

#[derive(Debug, Default)]
struct AtomicCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    fwd_packets: AtomicU64,
    fwd_bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_oversize: AtomicU64,
    dropped_kernel: AtomicU64,
    tx_errors: AtomicU64,
    cpu_ns: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> DirCounters {
        DirCounters {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            fwd_packets: self.fwd_packets.load(Relaxed),
            fwd_bytes: self.fwd_bytes.load(Relaxed),
            dropped_loss: self.dropped_loss.load(Relaxed),
            dropped_queue: self.dropped_queue.load(Relaxed),
            dropped_oversize: self.dropped_oversize.load(Relaxed),
            dropped_kernel: self.dropped_kernel.load(Relaxed),
            tx_errors: self.tx_errors.load(Relaxed),
            cpu_ns: self.cpu_ns.load(Relaxed),
        }
    }

    fn add(&self, d: &DirCounters) {
        let pairs = [
            (&self.rx_packets, d.rx_packets),
            (&self.rx_bytes, d.rx_bytes),
            (&self.fwd_packets, d.fwd_packets),
            (&self.fwd_bytes, d.fwd_bytes),
            (&self.dropped_loss, d.dropped_loss),
            (&self.dropped_queue, d.dropped_queue),
            (&self.dropped_oversize, d.dropped_oversize),
            (&self.dropped_kernel, d.dropped_kernel),
            (&self.tx_errors, d.tx_errors),
        ];
        for (a, v) in pairs {
            if v != 0 {
                a.fetch_add(v, Relaxed);
            }
        }
    }
}

/// Parse one SCM_TIMESTAMPNS control message (wall-clock ns).
fn timestamp(ctrl: &[u64], len: usize) -> Option<i64> {
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    if len < hdr + 16 {
        return None;
    }
    // SAFETY: ctrl is 8-byte aligned, at least `hdr + 16` bytes long (len <=
    // its size, set by us), and the kernel wrote a cmsghdr at its start.
    let c = unsafe { &*(ctrl.as_ptr() as *const libc::cmsghdr) };
    if c.cmsg_level != libc::SOL_SOCKET || c.cmsg_type != libc::SCM_TIMESTAMPNS {
        return None;
    }
    let w = hdr / 8;
    Some(ctrl[w] as i64 * 1_000_000_000 + ctrl[w + 1] as i64)
}

/// A running forwarder (two threads). Dropping it stops it.
#[derive(Debug)]
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
    counters: [Arc<AtomicCounters>; 2],
    started: Instant,
}

impl Forwarder {
    /// Open both ports and start forwarding. With `netns`, the threads move
    /// into that named network namespace first (the sockets live there).
    /// Returns once both directions' sockets are open.
    pub fn start(
        config: &LinkConfig,
        iface_a: &str,
        iface_b: &str,
        netns: Option<&str>,
    ) -> Result<Forwarder> {
        if config.ring_slots < 2 || config.batch == 0 || config.slot_size < 64 {
            bail!("bad ring configuration");
        }
        for d in [&config.a_to_b, &config.b_to_a] {
            if !(0.0..=1.0).contains(&d.loss) {
                bail!("loss must be in [0, 1]");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counters = [
            Arc::new(AtomicCounters::default()),
            Arc::new(AtomicCounters::default()),
        ];
        let started = Instant::now();
        let t0 = sys::now_ns();
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let dirs = [
            (
                config.a_to_b.clone(),
                iface_a.to_string(),
                iface_b.to_string(),
                0u64,
            ),
            (
                config.b_to_a.clone(),
                iface_b.to_string(),
                iface_a.to_string(),
                1u64,
            ),
        ];
        for (i, (dir, rx_if, tx_if, salt)) in dirs.into_iter().enumerate() {
            let lc = config.clone();
            let stop = stop.clone();
            let ctr = counters[i].clone();
            let ready = ready_tx.clone();
            let netns = netns.map(str::to_string);
            let name = format!("linkem-{}", if i == 0 { "ab" } else { "ba" });
            let h = std::thread::Builder::new().name(name).spawn(move || {
                let setup = || -> Result<(OwnedFd, OwnedFd)> {
                    if let Some(ns) = &netns {
                        sys::enter_netns(ns)?;
                    }
                    // GRO on the ingress port would hand us super-frames.
                    let _ = sys::set_offload(&rx_if, sys::Offload::Gro, false);
                    let rx = sys::packet_rx_socket(&rx_if, 32 << 20)
                        .with_context(|| format!("rx socket on {rx_if}"))?;
                    let tx = sys::packet_tx_socket(&tx_if, 4 << 20)
                        .with_context(|| format!("tx socket on {tx_if}"))?;
                    Ok((rx, tx))
                };
                let (rx, tx) = match setup() {
                    Ok(s) => {
                        let _ = ready.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready.send(Err(anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                drop(ready);
                sys::precise_timers();
                if lc.realtime {
                    sys::make_realtime(10);
                }
                let seed = lc.seed ^ salt.wrapping_mul(0xA076_1D64_78BD_642F);
                let mut d = Direction::new(&lc, dir, seed, t0);
                d.run(&rx, &tx, &stop, &ctr)
            })?;
            threads.push(h);
        }
        drop(ready_tx);
        let mut fw = Forwarder {
            stop,
            threads,
            counters,
            started,
        };
        for _ in 0..2 {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = fw.shutdown();
                    return Err(e);
                }
                Err(_) => {
                    let _ = fw.shutdown();
                    bail!("forwarder thread died during setup");
                }
            }
        }
        Ok(fw)
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        Stats {
            a_to_b: self.counters[0].snapshot(),
            b_to_a: self.counters[1].snapshot(),
        }
    }

    /// When forwarding started (time 0 of a bandwidth trace).
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// Has a direction thread exited (error)?
    pub fn is_finished(&self) -> bool {
        self.threads.iter().any(|t| t.is_finished())
    }

    /// Stop both threads, return the final counters (or a thread's error).
    pub fn stop(mut self) -> Result<Stats> {
        let r = self.shutdown();
        r.map(|()| self.stats())
    }

    fn shutdown(&mut self) -> Result<()> {
        self.stop.store(true, Relaxed);
        let mut res = Ok(());
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => res = Err(e),
                Err(_) => res = Err(anyhow!("forwarder thread panicked")),
            }
        }
        res
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// SplitMix64: tiny, fast, seedable.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    len: u32,
    wire: u32,
    arr: u64,
    out: u64,
}

/// Control buffer per slot, in u64 words (room for one SCM_TIMESTAMPNS).
const CTRL_WORDS: usize = 8;

/// Per-direction state: the ring and the model.
struct Direction {
    cfg: DirConfig,
    n: usize,
    slot: usize,
    batch: usize,
    window: u64,
    // Pointers into these Vecs live in the mmsghdr arrays: never resize.
    buf: Vec<u8>,
    meta: Vec<Meta>,
    rx_iov: Vec<libc::iovec>,
    tx_iov: Vec<libc::iovec>,
    rx_hdr: Vec<libc::mmsghdr>,
    tx_hdr: Vec<libc::mmsghdr>,
    rx_ctrl: Vec<u64>,
    moderation: u64,
    wake_late: u64,
    last_arr: u64,
    head: u64,
    ser: u64,
    tail: u64,
    backlog: u64,
    ser_free: u64,
    last_out: u64,
    t0: u64,
    rng: Rng,
    delay_ns: u64,
    jitter_ns: u64,
    shaped: bool,
    c: DirCounters,
}

impl Direction {
    fn new(lc: &LinkConfig, cfg: DirConfig, seed: u64, t0: u64) -> Box<Direction> {
        let n = lc.ring_slots;
        let slot = lc.slot_size;
        let mut d = Box::new(Direction {
            shaped: cfg.shaped(),
            delay_ns: cfg.delay.as_nanos() as u64,
            jitter_ns: cfg.jitter.as_nanos() as u64,
            cfg,
            n,
            slot,
            batch: lc.batch.min(1024),
            window: lc.send_window.as_nanos() as u64,
            buf: vec![0u8; n * slot],
            meta: vec![Meta::default(); n],
            rx_iov: Vec::with_capacity(n),
            tx_iov: Vec::with_capacity(n),
            rx_hdr: Vec::with_capacity(n),
            tx_hdr: Vec::with_capacity(n),
            rx_ctrl: vec![0u64; n * CTRL_WORDS],
            moderation: 0,
            wake_late: 0,
            last_arr: 0,
            head: 0,
            ser: 0,
            tail: 0,
            backlog: 0,
            ser_free: 0,
            last_out: 0,
            t0,
            rng: Rng(seed),
            c: DirCounters::default(),
        });
        d.moderation = (lc.rx_moderation.as_nanos() as u64).min(d.delay_ns / 2);
        let base = d.buf.as_mut_ptr();
        for i in 0..n {
            // SAFETY: i * slot < n * slot = buf.len().
            let p = unsafe { base.add(i * slot) };
            d.rx_iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: slot,
            });
            d.tx_iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: 0,
            });
        }
        for i in 0..n {
            // SAFETY: mmsghdr is plain old data; all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = &mut d.rx_iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = d.rx_ctrl[i * CTRL_WORDS..].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CTRL_WORDS * 8;
            d.rx_hdr.push(h);
            // SAFETY: as above.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = &mut d.tx_iov[i];
            h.msg_hdr.msg_iovlen = 1;
            d.tx_hdr.push(h);
        }
        d
    }

    fn secs(&self, t: u64) -> f64 {
        t.saturating_sub(self.t0) as f64 * 1e-9
    }

    fn run(
        &mut self,
        rx: &OwnedFd,
        tx: &OwnedFd,
        stop: &AtomicBool,
        ctr: &AtomicCounters,
    ) -> Result<()> {
        let mut last_house = 0u64;
        loop {
            if stop.load(Relaxed) {
                ctr.add(&std::mem::take(&mut self.c));
                return Ok(());
            }
            let got = self.receive(rx)?;
            let now = sys::now_ns();
            self.serialize(now + self.window);
            let tx_blocked = self.send(tx, now)?;
            if now.wrapping_sub(last_house) > 10_000_000 {
                last_house = now;
                self.c.dropped_kernel += sys::packet_drops(rx);
                ctr.cpu_ns.store(sys::thread_cpu_ns(), Relaxed);
            }
            ctr.add(&std::mem::take(&mut self.c));
            if got == self.batch {
                continue; // more frames are probably waiting
            }
            // Sleep until the next departure / serializer event or a frame.
            let mut deadline = now + 50_000_000;
            if self.head < self.ser {
                deadline = deadline.min(self.meta[(self.head % self.n as u64) as usize].out);
            }
            if self.shaped && self.ser < self.tail {
                let m = self.meta[(self.ser % self.n as u64) as usize];
                deadline = deadline.min(self.ser_free.max(m.arr));
            }
            if tx_blocked {
                deadline = deadline.min(now + 100_000);
            }
            // Wake up early by the typical wake-up latency.
            let timer = deadline.saturating_sub(self.wake_late);
            // Receive moderation: having just read frames, don't wake up for
            // each new one; the kernel timestamps them on arrival anyway.
            let ring_full = self.tail - self.head >= self.n as u64;
            let (wait_rx, timer) = if got > 0 && self.moderation > 0 {
                (false, timer.min(now + self.moderation))
            } else {
                (!ring_full, timer)
            };
            let now = sys::now_ns();
            if timer <= now {
                continue;
            }
            let wait = timer - now;
            let ts = libc::timespec {
                tv_sec: (wait / 1_000_000_000) as libc::time_t,
                tv_nsec: (wait % 1_000_000_000) as libc::c_long,
            };
            let mut pfd = libc::pollfd {
                fd: rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd (or none), valid timespec.
            let r =
                unsafe { libc::ppoll(&mut pfd, wait_rx as libc::nfds_t, &ts, std::ptr::null()) };
            if r == 0
                && timer == deadline.saturating_sub(self.wake_late)
                && deadline < now + 50_000_000
            {
                // Timer wake-up for a departure: learn the wake-up latency.
                let late = sys::now_ns() as i64 - timer as i64;
                let late = late.clamp(0, 300_000) as u64;
                self.wake_late = (self.wake_late * 7 + late) / 8;
            }
        }
    }

    /// Read one batch into the ring's free slots and run arrival processing
    /// (loss, drop-tail). Returns the number of frames read.
    fn receive(&mut self, rx: &OwnedFd) -> Result<usize> {
        let n = self.n as u64;
        let free = n - (self.tail - self.head);
        let ti = (self.tail % n) as usize;
        let k = (self.batch as u64).min(free).min(n - ti as u64) as usize;
        if k == 0 {
            return Ok(0);
        }
        // SAFETY: rx_hdr[ti..ti + k] are valid mmsghdrs whose iovecs point to
        // free ring slots of `slot` bytes each.
        let r = unsafe {
            libc::recvmmsg(
                rx.as_raw_fd(),
                self.rx_hdr.as_mut_ptr().add(ti),
                k as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(anyhow!("recvmmsg: {e}")),
            };
        }
        let got = r as usize;
        let now = sys::now_ns();
        let rt_off = sys::realtime_offset_ns();
        let rate = self.cfg.rate_at(self.secs(now));
        let qlimit = if self.shaped {
            self.cfg.queue_bytes(rate)
        } else {
            u64::MAX
        };
        let mut kept = 0usize;
        for i in 0..got {
            let h = &mut self.rx_hdr[ti + i];
            let len = h.msg_len as usize;
            let trunc = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let ctrl_len = h.msg_hdr.msg_controllen;
            h.msg_hdr.msg_controllen = CTRL_WORDS * 8;
            // Arrival time: the kernel's receive timestamp (wall clock)
            // converted to the monotonic clock; kept in order and <= now.
            let arr = timestamp(
                &self.rx_ctrl[(ti + i) * CTRL_WORDS..(ti + i + 1) * CTRL_WORDS],
                ctrl_len,
            )
            .map(|rt| (rt - rt_off).clamp(0, now as i64) as u64)
            .unwrap_or(now)
            .max(self.last_arr);
            self.last_arr = arr;
            self.c.rx_packets += 1;
            self.c.rx_bytes += len as u64;
            if trunc || len > self.slot {
                self.c.dropped_oversize += 1;
                continue;
            }
            if self.cfg.loss > 0.0 && self.rng.unit() < self.cfg.loss {
                self.c.dropped_loss += 1;
                continue;
            }
            let wire = len as u64 + self.cfg.overhead as u64;
            if self.shaped {
                // Queue state as of this frame's arrival.
                self.serialize(arr);
                if self.backlog + wire > qlimit {
                    self.c.dropped_queue += 1;
                    continue;
                }
            }
            if kept != i {
                let (s, d) = ((ti + i) * self.slot, (ti + kept) * self.slot);
                self.buf.copy_within(s..s + len, d);
            }
            self.meta[ti + kept] = Meta {
                len: len as u32,
                wire: wire as u32,
                arr,
                out: 0,
            };
            if self.shaped {
                self.backlog += wire;
            }
            // serialize() may only look at slots below tail: publish now.
            self.tail += 1;
            kept += 1;
        }
        Ok(got)
    }

    /// Move frames whose serialization starts by `horizon` from the rate
    /// queue into the delay line, giving them a departure time.
    fn serialize(&mut self, horizon: u64) {
        let n = self.n as u64;
        while self.ser < self.tail {
            let i = (self.ser % n) as usize;
            let m = self.meta[i];
            let done = if self.shaped {
                let start = self.ser_free.max(m.arr);
                if start > horizon {
                    break;
                }
                let rate = self.cfg.rate_at(self.secs(start));
                if rate < 1000.0 {
                    // Stalled link (trace at ~0): look again in 1 ms.
                    self.ser_free = start + 1_000_000;
                    if self.ser_free > horizon {
                        break;
                    }
                    continue;
                }
                let done = start + (m.wire as f64 * 8e9 / rate).round() as u64;
                self.ser_free = done;
                self.backlog -= m.wire as u64;
                done
            } else {
                m.arr
            };
            let mut out = done + self.delay_ns;
            if self.jitter_ns > 0 {
                let j = (self.rng.unit() * 2.0 - 1.0) * self.jitter_ns as f64;
                out = (out as i64 + j as i64).max(done as i64) as u64;
            }
            out = out.max(self.last_out);
            self.last_out = out;
            self.meta[i].out = out;
            self.ser += 1;
        }
    }

    /// Send every frame due by `now` + window. Returns true if the socket
    /// pushed back (retry soon).
    fn send(&mut self, tx: &OwnedFd, now: u64) -> Result<bool> {
        let n = self.n as u64;
        let limit = now + self.window;
        while self.head < self.ser {
            let hi = (self.head % n) as usize;
            let avail = ((self.ser - self.head).min(n - hi as u64) as usize).min(self.batch);
            let mut k = 0;
            while k < avail && self.meta[hi + k].out <= limit {
                self.tx_iov[hi + k].iov_len = self.meta[hi + k].len as usize;
                k += 1;
            }
            if k == 0 {
                break;
            }
            // SAFETY: tx_hdr[hi..hi + k] are valid mmsghdrs pointing at ring
            // slots holding frames of the lengths just set.
            let r = unsafe {
                libc::sendmmsg(
                    tx.as_raw_fd(),
                    self.tx_hdr.as_mut_ptr().add(hi),
                    k as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR) => {
                        return Ok(true)
                    }
                    Some(libc::ENETDOWN) | Some(libc::ENXIO) | Some(libc::EMSGSIZE) => {
                        self.c.tx_errors += 1;
                        self.head += 1;
                        continue;
                    }
                    _ => return Err(anyhow!("sendmmsg: {e}")),
                }
            }
            let r = r as usize;
            for j in 0..r {
                self.c.fwd_bytes += self.meta[hi + j].len as u64;
            }
            self.c.fwd_packets += r as u64;
            self.head += r as u64;
            if r < k {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Run until `stop` becomes true (polled every 100 ms), writing the stats
/// file (if configured) every second and at the end.
pub(crate) fn run_until(
    fw: Forwarder,
    config: &LinkConfig,
    stop: &AtomicBool,
    duration: Option<Duration>,
) -> Result<Stats> {
    let end = duration.map(|d| Instant::now() + d);
    let mut last_write = Instant::now();
    let write = |s: &Stats| -> Result<()> {
        if let Some(p) = &config.stats_file {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, s.to_json())?;
            std::fs::rename(&tmp, p)?;
        }
        Ok(())
    };
    let timed_out = || match end {
        Some(e) => Instant::now() >= e,
        None => false,
    };
    let mut warned = false;
    while !stop.load(Relaxed) && !fw.is_finished() && !timed_out() {
        std::thread::sleep(Duration::from_millis(100));
        if last_write.elapsed() >= Duration::from_secs(1) {
            last_write = Instant::now();
            let s = fw.stats();
            write(&s)?;
            if !warned && s.a_to_b.dropped_oversize + s.b_to_a.dropped_oversize > 0 {
                warned = true;
                eprintln!(
                    "linkem: dropping frames larger than {} bytes: turn TSO/GSO/GRO and tx \
                     checksum offload off on the hosts' interfaces (ethtool -K IF tx off tso off gso off gro off)",
                    config.slot_size
                );
            }
        }
    }
    let s = fw.stop()?;
    write(&s)?;
    Ok(s)
}

#[cfg(test)]
mod tests;
