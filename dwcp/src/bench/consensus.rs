//! `dwcp benchmark consensus`: commit latency, throughput, election and
//! failover of a raft cluster of `dwcp_consensus` members. Benchmark code
//! only, on the library's public API (moved out of dwcp-consensus).

use std::net::TcpListener;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use dwcp_consensus::{Cluster, ClusterConfig, ClusterError, Command, PeerAddr, ProposeError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Result of [`bench_commits`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    /// Cluster size.
    pub nodes: usize,
    /// Commands committed.
    pub ops: usize,
    /// Proposals in flight at once (they share log entries).
    pub batch: usize,
    /// Median propose → applied-on-leader latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Worst latency, ms.
    pub max_ms: f64,
    /// Commands per second over the whole run.
    pub ops_per_sec: f64,
    /// Commands that failed (timeouts, leader changes).
    pub failed: usize,
    /// Time to elect the first leader, ms.
    pub election_ms: f64,
    /// Leader failover: from stopping the leader (node 1) until another
    /// member leads, ms.
    #[serde(default)]
    pub failover_ms: f64,
    /// Where the members ran: `loopback`, or a link profile.
    #[serde(default)]
    pub link: String,
}

/// Commits `ops` registry commands through a `nodes`-member cluster on loopback TCP
/// (real on-disk logs with fsync in a temporary directory), `batch` proposals in flight
/// at a time, and measures commit latency at the leader.
pub fn bench_commits(nodes: usize, ops: usize, batch: usize) -> Result<BenchResult, ClusterError> {
    let nodes = nodes.max(1);
    let batch = batch.max(1);
    let base = std::env::temp_dir().join(format!(
        "dwcp-consensus-bench-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = bench_in(&base, nodes, ops, batch);
    let _ = std::fs::remove_dir_all(&base);
    result
}

fn bench_in(
    base: &std::path::Path,
    nodes: usize,
    ops: usize,
    batch: usize,
) -> Result<BenchResult, ClusterError> {
    let mut listeners = std::collections::HashMap::new();
    let mut peers = Vec::new();
    for i in 1..=nodes as u64 {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|source| ClusterError::Listen {
            addr: "127.0.0.1:0".into(),
            source,
        })?;
        peers.push(PeerAddr {
            id: i,
            addr: l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        });
        listeners.insert(i, l);
    }
    let listeners = Mutex::new(listeners);
    bench_placed(base, peers, ops, batch, "loopback", &|cfg| {
        let l = listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&cfg.node_id)
            .expect("one listener per member");
        Cluster::start_with_listener(cfg, l)
    })
}

/// [`bench_commits`] on members placed by the caller: `start` starts the
/// member of each config (e.g. from a thread inside that host's network
/// namespace, so its sockets live there); `peers` are their addresses.
/// Node 1 is made leader and proposes; afterwards it is stopped and the time
/// until another member leads is the failover time.
pub fn bench_placed(
    base: &std::path::Path,
    peers: Vec<PeerAddr>,
    ops: usize,
    batch: usize,
    link: &str,
    start: &dyn Fn(ClusterConfig) -> Result<Cluster, ClusterError>,
) -> Result<BenchResult, ClusterError> {
    let nodes = peers.len();
    let batch = batch.max(1);
    let cluster_id = rand::random::<u64>();
    let t0 = Instant::now();
    let mut members = Vec::new();
    for p in &peers {
        let mut cfg = ClusterConfig::new(
            p.id,
            peers.clone(),
            base.join(format!("n{}", p.id)),
            cluster_id,
            &p.addr,
        );
        cfg.node.snapshot_interval = 5_000;
        members.push(start(cfg)?);
    }
    // Make node 1 the leader so latency is measured where proposals are
    // made: it campaigns first; if another member won, that one hands over.
    members[0].node().campaign();
    let mut leader = None;
    while t0.elapsed() < Duration::from_secs(20) {
        let st = members[0].node().status();
        if st.role == "leader" {
            leader = Some(0);
            break;
        }
        if let Some(l) = st.leader.filter(|&l| l != 1) {
            if let Some(m) = members.iter().find(|m| m.id() == l) {
                m.node().transfer_leader(1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let election_ms = t0.elapsed().as_secs_f64() * 1e3;
    let Some(li) = leader else {
        return Err(ClusterError::Propose(ProposeError::NotLeader {
            leader: None,
        }));
    };
    let node = members[li].node();
    let mut lat = Vec::with_capacity(ops);
    let mut failed = 0;
    let start = Instant::now();
    let mut done = 0;
    while done < ops {
        let n = batch.min(ops - done);
        let t = Instant::now();
        let rxs: Vec<_> = (0..n)
            .map(|_| {
                node.propose_async(Command::RegisterGuest {
                    guest: Uuid::from_u128(rand::random()),
                    owner: 1,
                })
            })
            .collect();
        for rx in rxs {
            match node.wait(rx) {
                Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                Err(_) => failed += 1,
            }
        }
        done += n;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    // Failover: stop the leader, wait until another member leads.
    let mut failover_ms = 0.0;
    if members.len() > 2 {
        let old = members.remove(0);
        let tf = Instant::now();
        old.shutdown();
        while tf.elapsed() < Duration::from_secs(20) {
            let led = members.iter().any(|m| m.node().status().role == "leader");
            if led {
                failover_ms = tf.elapsed().as_secs_f64() * 1e3;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let res = BenchResult {
        nodes,
        ops,
        batch,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        ops_per_sec: (ops - failed) as f64 / secs,
        failed,
        election_ms,
        failover_ms,
        link: link.to_string(),
    };
    drop(members);
    Ok(res)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_runs() {
        let r = super::bench_commits(3, 200, 20).unwrap();
        assert_eq!(r.failed, 0, "{r:?}");
        assert!(
            r.ops_per_sec > 0.0 && r.p50_ms > 0.0 && r.p99_ms >= r.p50_ms,
            "{r:?}"
        );
    }

    /// `cargo test --release -p dwcp bench_report -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: run by hand"]
    fn bench_report() {
        for nodes in [3, 5] {
            for (ops, batch) in [(2_000, 1), (50_000, 256)] {
                let r = super::bench_commits(nodes, ops, batch).unwrap();
                println!("{}", serde_json::to_string(&r).unwrap());
            }
        }
    }
}
