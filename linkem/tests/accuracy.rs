//! Accuracy of the emulated link, measured with real traffic between real
//! network namespaces. Needs root (ip netns, AF_PACKET). Tests are
//! serialized (2-core machine); each takes < 20 s.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use linkem::{DirConfig, LinkConfig, Middle, Profile, QueueLimit, Topology, Trace};

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// Counters and the time they were read (retried until the two reads are
/// less than 1 ms apart, so a preempted test thread can't skew a window).
fn stamped(t: &Topology) -> (linkem::Stats, Instant) {
    loop {
        let a = Instant::now();
        let s = t.stats().unwrap();
        let b = Instant::now();
        if b - a < Duration::from_millis(1) {
            return (s, a + (b - a) / 2);
        }
    }
}

fn check_rtt(profile: Profile) {
    let t = topology(profile.middle());
    let want = profile.config().a_to_b.delay.as_secs_f64() * 2e3;
    ping(&t, 2, "0.2"); // ARP warm-up
    let (avg, mdev, recv, sent) = ping(&t, 40, "0.05");
    let tol = 1.0 + 0.02 * want;
    eprintln!("{profile}: ping rtt avg {avg:.3} ms mdev {mdev:.3} (configured {want} ms, tolerance {tol:.2}), {recv}/{sent}");
    assert!(recv >= sent - 3, "too many pings lost: {recv}/{sent}");
    assert!(
        (avg - want).abs() <= tol,
        "{profile}: rtt {avg} ms vs {want} ms"
    );
    let s = t.stats().unwrap();
    assert_eq!(s.a_to_b.dropped_kernel + s.b_to_a.dropped_kernel, 0);
}

#[test]
fn ping_rtt_wan() {
    let _g = serial();
    check_rtt(Profile::Wan);
}

#[test]
fn ping_rtt_internet() {
    let _g = serial();
    check_rtt(Profile::Internet);
}

#[test]
fn ping_rtt_custom_asymmetric_with_jitter() {
    let _g = serial();
    // 30 ms out, 10 ms back, +-2 ms jitter each way: mean RTT stays 40 ms.
    let mut cfg = LinkConfig::default();
    cfg.a_to_b.delay = Duration::from_millis(30);
    cfg.b_to_a.delay = Duration::from_millis(10);
    cfg.a_to_b.jitter = Duration::from_millis(2);
    cfg.b_to_a.jitter = Duration::from_millis(2);
    let t = topology(Middle::Emulator(cfg));
    ping(&t, 2, "0.2");
    let (avg, mdev, recv, sent) = ping(&t, 100, "0.02");
    eprintln!(
        "asym+jitter: rtt avg {avg:.3} ms mdev {mdev:.3} (configured 40 +- 4), {recv}/{sent}"
    );
    assert_eq!(recv, sent);
    assert!((avg - 40.0).abs() <= 1.0 + 0.02 * 40.0, "rtt {avg}");
    assert!(mdev > 0.3 && mdev < 2.5, "jitter mdev {mdev}");
}

#[test]
fn bridge_dc_is_fast() {
    let _g = serial();
    let t = topology(Middle::Bridge);
    ping(&t, 2, "0.2");
    let (avg, _, recv, sent) = ping(&t, 10, "0.05");
    eprintln!("dc bridge: rtt avg {avg:.3} ms");
    assert_eq!(recv, sent);
    assert!(avg < 1.0);
    assert!(t.stats().is_none());
}

#[test]
fn tcp_rate_50mbit() {
    let _g = serial();
    let rate = 50e6;
    let cfg = LinkConfig::symmetric(DirConfig {
        delay: Duration::from_millis(10),
        rate_bps: Some(rate as u64),
        queue: QueueLimit::Bdp,
        ..Default::default()
    });
    let t = topology(Middle::Emulator(cfg));
    ping(&t, 1, "0.2");
    let bulk = Bulk::start(&t, 5001);
    let t0 = Instant::now();
    // Steady state: skip slow start (3 s), measure 6 s.
    sleep_until(t0 + Duration::from_secs(3));
    let b0 = bulk.received.load(Relaxed);
    let (s0, i0) = stamped(&t);
    sleep_until(t0 + Duration::from_secs(9));
    let b1 = bulk.received.load(Relaxed);
    let (s1, i1) = stamped(&t);
    bulk.finish();
    let secs = (i1 - i0).as_secs_f64();
    let goodput = (b1 - b0) as f64 * 8.0 / secs;
    // Full-sized segment: 1448 payload + 32 TCP (timestamps) + 20 IP + 14 Ethernet.
    let wire_from_goodput = goodput * 1514.0 / 1448.0;
    let wire_counted = (s1.a_to_b.fwd_bytes - s0.a_to_b.fwd_bytes) as f64 * 8.0 / secs;
    eprintln!(
        "tcp 50 Mbit/s: goodput {:.2} Mbit/s -> wire {:.2} Mbit/s; forwarder counted {:.2} Mbit/s; queue drops {}",
        goodput / 1e6,
        wire_from_goodput / 1e6,
        wire_counted / 1e6,
        s1.a_to_b.dropped_queue
    );
    assert!(
        rel_err(wire_from_goodput, rate) <= 0.03,
        "tcp wire rate {wire_from_goodput}"
    );
    assert!(
        rel_err(wire_counted, rate) <= 0.03,
        "counted rate {wire_counted}"
    );
}

#[test]
fn udp_loss_rate() {
    let _g = serial();
    let loss = 0.01;
    let cfg = LinkConfig {
        seed: 0x1234,
        ..LinkConfig::default()
    }
    .both(|d| {
        d.delay = Duration::from_millis(2);
        d.loss = loss;
    });
    let t = topology(Middle::Emulator(cfg));
    ping(&t, 1, "0.2");
    let sink = UdpSink::start(&t, t.dst_ip, 6001);
    let s0 = t.stats().unwrap();
    // 100k datagrams: expected 1000 losses, sigma ~3.2 %.
    let sent = udp_blast(&t, 6001, 64, 50_000, 100_000, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let got = sink.finish();
    let s1 = t.stats().unwrap();
    let lost = sent - got;
    let measured = lost as f64 / sent as f64;
    let ctr_rx = s1.a_to_b.rx_packets - s0.a_to_b.rx_packets;
    let ctr_loss = s1.a_to_b.dropped_loss - s0.a_to_b.dropped_loss;
    eprintln!(
        "udp loss: sent {sent} received {got} lost {lost} ({:.4} %, configured {:.2} %); forwarder rx {ctr_rx} loss-dropped {ctr_loss} ({:.4} %), kernel drops {}",
        measured * 100.0,
        loss * 100.0,
        ctr_loss as f64 / ctr_rx as f64 * 100.0,
        s1.a_to_b.dropped_kernel
    );
    if std::env::var("LINKEM_DEBUG").is_ok() {
        for (ns, dev) in [
            (&t.src_ns, "eth0"),
            (&t.link_ns, "a"),
            (&t.link_ns, "b"),
            (&t.dst_ns, "eth0"),
        ] {
            let o = t
                .exec(ns, "ip")
                .args(["-s", "link", "show", "dev", dev])
                .output()
                .unwrap();
            eprintln!("{}", String::from_utf8_lossy(&o.stdout));
        }
    }
    assert_eq!(sent, 100_000);
    assert!(rel_err(measured, loss) <= 0.10, "measured loss {measured}");
    assert!(rel_err(ctr_loss as f64 / ctr_rx as f64, loss) <= 0.10);
    // Every missing datagram is one the loss model dropped.
    assert_eq!(lost, ctr_loss, "losses other than the configured ones");
}

#[test]
fn trace_replay_changes_rate() {
    let _g = serial();
    // 20 Mbit/s for 2 s, then 60 Mbit/s for 2 s, looping (period 4 s).
    let trace = Arc::new(Trace::parse("0\t20\n2\t60\n").unwrap());
    let cfg = LinkConfig::default().both(|d| {
        d.delay = Duration::from_millis(5);
        d.trace = Some(trace.clone());
        d.queue = QueueLimit::Time(Duration::from_millis(20));
    });
    let t = topology(Middle::Emulator(cfg));
    let start = t.forwarder().unwrap().started_at();
    let sink = UdpSink::start(&t, t.dst_ip, 7001);
    // Offer ~85 Mbit/s (1442-byte frames) for the whole run.
    let tt = &t;
    let samples = std::thread::scope(|s| {
        let blast =
            s.spawn(move || udp_blast(tt, 7001, 1400, 7400, u64::MAX, Duration::from_millis(8000)));
        let mut samples = Vec::new();
        // Windows inside each step, away from the switch points.
        for (a, b, want) in [
            (0.4, 1.8, 20e6),
            (2.4, 3.8, 60e6),
            (4.4, 5.8, 20e6),
            (6.4, 7.8, 60e6),
        ] {
            let a = start + Duration::from_secs_f64(a);
            let b = start + Duration::from_secs_f64(b);
            sleep_until(a);
            let (s0, i0) = stamped(&t);
            sleep_until(b);
            let (s1, i1) = stamped(&t);
            let (s0, s1) = (s0.a_to_b, s1.a_to_b);
            let secs = (i1 - i0).as_secs_f64();
            let offered = (s1.rx_bytes - s0.rx_bytes) as f64 * 8.0 / secs;
            eprintln!(
                "trace window: offered {:.2} Mbit/s, queue drops {}",
                offered / 1e6,
                s1.dropped_queue - s0.dropped_queue
            );
            samples.push(((s1.fwd_bytes - s0.fwd_bytes) as f64 * 8.0 / secs, want));
        }
        blast.join().unwrap();
        samples
    });
    sink.finish();
    for (got, want) in &samples {
        eprintln!(
            "trace: measured {:.2} Mbit/s, trace says {:.0}",
            got / 1e6,
            want / 1e6
        );
    }
    for (got, want) in samples {
        assert!(rel_err(got, want) <= 0.03, "trace rate {got} vs {want}");
    }
}

/// The `wan` profile at full rate (loss off, so one TCP flow can fill
/// 1 Gbit/s x 50 ms): throughput and the forwarder's CPU cost. A benchmark:
/// on two cores shared with a build it cannot reach 1 Gbit/s (it failed so
/// in `make fresh-check`); `cargo test -p dwcp-linkem --test accuracy -- --ignored`.
#[test]
#[ignore = "benchmark: needs idle cores to carry 1 Gbit/s"]
fn wan_1gbit_throughput_and_cpu() {
    let _g = serial();
    let cfg = Profile::Wan.config().both(|d| d.loss = 0.0);
    let t = topology(Middle::Emulator(cfg));
    ping(&t, 1, "0.2");
    let bulk = Bulk::start(&t, 5002);
    let t0 = Instant::now();
    sleep_until(t0 + Duration::from_secs(5));
    let (s0, i0) = stamped(&t);
    let cpu0 = linkem::sys::process_cpu_ns();
    sleep_until(t0 + Duration::from_secs(12));
    let (s1, i1) = stamped(&t);
    let cpu1 = linkem::sys::process_cpu_ns();
    bulk.finish();
    let secs = (i1 - i0).as_secs_f64();
    let wire = (s1.a_to_b.fwd_bytes - s0.a_to_b.fwd_bytes) as f64 * 8.0 / secs;
    let pps = ((s1.a_to_b.fwd_packets - s0.a_to_b.fwd_packets)
        + (s1.b_to_a.fwd_packets - s0.b_to_a.fwd_packets)) as f64
        / secs;
    let fw_cpu = ((s1.a_to_b.cpu_ns - s0.a_to_b.cpu_ns) + (s1.b_to_a.cpu_ns - s0.b_to_a.cpu_ns))
        as f64
        / 1e9
        / secs;
    let all_cpu = (cpu1 - cpu0) as f64 / 1e9 / secs;
    eprintln!(
        "wan: {:.1} Mbit/s on the wire, {:.0} frames/s both ways; forwarder threads {:.1} % of a core \
         (includes the receiving stacks' softirq work run inside its sends); whole test process \
         (sender+receiver+forwarder) {:.1} % of a core; queue drops {}, kernel drops {}",
        wire / 1e6,
        pps,
        fw_cpu * 100.0,
        all_cpu * 100.0,
        s1.a_to_b.dropped_queue,
        s1.a_to_b.dropped_kernel + s1.b_to_a.dropped_kernel
    );
    assert!(wire > 0.9e9, "wan profile not sustained: {wire}");
    assert!(wire < 1.0e9 * 1.01, "rate limit exceeded: {wire}");
}

/// Forwarder CPU cost at ~1 Gbit/s of UDP through the `wan` profile. The
/// datagrams go to a made-up neighbour (static ARP entry), so the
/// destination drops them at once (frame not for its MAC) and the forwarder
/// threads' CPU time is their own work only. A benchmark (it needs a core
/// free to offer 1 Gbit/s): `cargo test -p linkem --test accuracy -- --ignored`.
#[test]
#[ignore = "benchmark: needs an idle core to offer 1 Gbit/s"]
fn wan_1gbit_udp_forwarder_cpu() {
    let _g = serial();
    let cfg = Profile::Wan.config().both(|d| d.loss = 0.0);
    let t = topology(Middle::Emulator(cfg));
    let ghost = std::net::Ipv4Addr::from(u32::from(t.dst_ip) + 1);
    let st = t
        .exec(&t.src_ns, "ip")
        .args([
            "neigh",
            "replace",
            &ghost.to_string(),
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let tt = &t;
    let (wire, pps, cpu) = std::thread::scope(|s| {
        // 1400-byte payload = 1442-byte frames; 82k/s = 946 Mbit/s.
        let blast = s.spawn(move || {
            udp_blast_to(tt, ghost, 9, 1400, 82_000, u64::MAX, Duration::from_secs(8))
        });
        sleep_until(Instant::now() + Duration::from_secs(2));
        let (s0, i0) = stamped(tt);
        sleep_until(i0 + Duration::from_secs(5));
        let (s1, i1) = stamped(tt);
        blast.join().unwrap();
        let secs = (i1 - i0).as_secs_f64();
        let d = |f: fn(&linkem::DirCounters) -> u64| {
            (f(&s1.a_to_b) - f(&s0.a_to_b) + f(&s1.b_to_a) - f(&s0.b_to_a)) as f64 / secs
        };
        (
            d(|c| c.fwd_bytes) * 8.0,
            d(|c| c.fwd_packets),
            d(|c| c.cpu_ns) / 1e9,
        )
    });
    eprintln!(
        "wan udp: {:.1} Mbit/s, {:.0} frames/s; forwarder threads {:.1} % of a core ({:.2} us/frame)",
        wire / 1e6,
        pps,
        cpu * 100.0,
        cpu / pps * 1e6
    );
    assert!(wire > 0.85e9, "offered load not forwarded: {wire}");
}

/// The command-line entry point (`dwcp linkem run ...`), here on a thread of
/// the test process, forwarding inside the link namespace of a topology
/// with an external middle; checks RTT and the stats file.
#[test]
fn cli_run_with_stats_file() {
    let _g = serial();
    let t = topology(Middle::External);
    let stats = std::env::temp_dir().join(format!("{}-stats.json", t.prefix));
    let args: Vec<String> = [
        "run",
        "--netns",
        &t.link_ns,
        "--iface-a",
        "a",
        "--iface-b",
        "b",
        "--delay",
        "10ms",
        "--delay-ba",
        "5ms",
        "--rate",
        "100mbit",
        "--loss",
        "0",
        "--duration",
        "4s",
        "--stats-file",
        stats.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let h = std::thread::spawn(move || linkem::cli_main(args));
    std::thread::sleep(Duration::from_millis(300));
    ping(&t, 2, "0.2");
    let (avg, _, recv, sent) = ping(&t, 20, "0.05");
    eprintln!("cli: rtt avg {avg:.3} ms (configured 15)");
    h.join().unwrap().unwrap();
    let json = std::fs::read_to_string(&stats).unwrap();
    let _ = std::fs::remove_file(&stats);
    assert_eq!(recv, sent);
    assert!((avg - 15.0).abs() <= 1.0 + 0.02 * 15.0, "rtt {avg}");
    assert!(json.contains("\"a_to_b\":{\"rx_packets\":"), "{json}");
    assert!(!json.contains("\"fwd_packets\":0,"), "{json}");
}
