//! Commit throughput and latency with many proposals in flight: three members on loopback
//! TCP with real fsync'd logs, `DWCP_TP_IN_FLIGHT` client threads (default 1,000) each
//! running migrations (intent, then commit) back to back, as `dwcp benchmark consensus
//! --guests` does at fleet size. A probe to profile the raft path without building the
//! `dwcp` binary:
//!
//! ```sh
//! cargo test --release -p dwcp-consensus --test throughput -- --ignored --nocapture
//! ```

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dwcp_consensus::{Applied, Cluster, ClusterConfig, Command, PeerAddr};
use uuid::Uuid;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn guest(i: usize) -> Uuid {
    Uuid::from_u128(0x7e57 << 64 | i as u128)
}

/// Runs `f(i)` for i in 0..total on `threads` threads; the latencies it returned (ms).
fn drive(threads: usize, total: usize, f: &(dyn Fn(usize) -> Vec<f64> + Sync)) -> (Vec<f64>, f64) {
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    let mut lat: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(s, || {
                        let mut lat = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= total {
                                break lat;
                            }
                            lat.extend(f(i));
                        }
                    })
                    .unwrap()
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let secs = t.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat, secs)
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
#[ignore = "benchmark probe: run by hand"]
fn many_in_flight() {
    let in_flight = env("DWCP_TP_IN_FLIGHT", 1000);
    let guests = env("DWCP_TP_GUESTS", 20_000);
    let migrations = env("DWCP_TP_MIGRATIONS", 10 * in_flight);
    let hosts = 1000u64;
    let dir = tempfile::tempdir().unwrap();
    let ls: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<PeerAddr> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| PeerAddr {
            id: i as u64 + 1,
            addr: l.local_addr().unwrap().to_string(),
        })
        .collect();
    let cluster_id = rand::random();
    let members: Vec<Cluster> = peers
        .iter()
        .zip(ls)
        .map(|(p, l)| {
            let cfg = ClusterConfig::new(
                p.id,
                peers.clone(),
                dir.path().join(p.id.to_string()),
                cluster_id,
                &p.addr,
            );
            Cluster::start_with_listener(cfg, l).unwrap()
        })
        .collect();
    members[0].node().campaign();
    let end = Instant::now() + Duration::from_secs(20);
    while members[0].node().status().role != "leader" {
        assert!(Instant::now() < end, "node 1 never led");
        std::thread::sleep(Duration::from_millis(5));
    }
    let leader = &members[0];
    let (_, reg_s) = drive(in_flight, guests, &|i| {
        leader
            .node()
            .propose(Command::RegisterGuest {
                guest: guest(i),
                owner: i as u64 % hosts + 1,
            })
            .unwrap();
        vec![]
    });
    let (lat, secs) = drive(in_flight, migrations, &|k| {
        let i = k % guests;
        let round = (k / guests) as u64;
        let source = (i as u64 + round) % hosts + 1;
        let t = Instant::now();
        let epoch = match leader.node().propose(Command::BeginMigration {
            guest: guest(i),
            source,
            destination: source % hosts + 1,
        }) {
            Ok(Applied::MigrationBegun { epoch }) => epoch,
            other => panic!("begin: {other:?}"),
        };
        let a = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        leader
            .node()
            .propose(Command::CommitMigration {
                guest: guest(i),
                epoch,
            })
            .unwrap();
        vec![a, t.elapsed().as_secs_f64() * 1e3]
    });
    let st = leader.node().status();
    println!(
        "in_flight {in_flight} register {:.0}/s migrations {migrations}: p50 {:.1} ms p99 {:.1} ms max {:.1} ms {:.0} ops/s (log entries {})",
        guests as f64 / reg_s,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        lat.len() as f64 / secs,
        st.last_index,
    );
}
