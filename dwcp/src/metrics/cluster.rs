//! Raft metrics: the agent's [`ClusterOps`] wrapped so that each proposal
//! (`begin`, `commit`, `abort`, `revert`) is timed, and the member's status
//! sampled for leader changes. Nothing in `dwcp-consensus` or
//! `dwcp/src/cluster.rs` changes: the wrapper sits between them and the agent.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_core::agent::{ClusterError, ClusterOps};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::Value;

use super::Labels;

/// Buckets of a raft proposal's latency, seconds (1 ms .. ~16 s).
fn latency_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

/// What the raft side of the agent counts.
pub struct RaftMetrics {
    inner: Arc<dyn ClusterOps>,
    /// `dwcp_raft_commit_latency_seconds{op,result}`.
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    /// `dwcp_raft_leader_changes_total`.
    leader_changes: Counter,
    last_leader: Mutex<Option<u64>>,
}

impl std::fmt::Debug for RaftMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftMetrics").finish_non_exhaustive()
    }
}

impl RaftMetrics {
    fn time<T>(
        &self,
        op: &str,
        f: impl FnOnce() -> Result<T, ClusterError>,
    ) -> Result<T, ClusterError> {
        let t0 = Instant::now();
        let r = f();
        let result = if r.is_ok() { "ok" } else { "error" };
        self.latency
            .get_or_create(&vec![
                ("op".to_string(), op.to_string()),
                ("result".to_string(), result.to_string()),
            ])
            .observe(t0.elapsed().as_secs_f64());
        r
    }

    /// Notes the leader the member knows now; counts a change.
    fn sample(&self) -> Value {
        let st = self.inner.status();
        let leader = st["leader"].as_u64();
        let mut last = self.last_leader.lock();
        if let Some(l) = leader {
            if last.is_some_and(|p| p != l) {
                self.leader_changes.inc();
            }
            *last = Some(l);
        }
        st
    }

    /// Adds the raft metrics, sampled now, to `reg`.
    pub fn register(&self, reg: &mut Registry) {
        let st = self.sample();
        let g = |k: &str| st[k].as_u64().unwrap_or(0) as i64;
        let term = Gauge::<i64>::default();
        term.set(g("term"));
        reg.register("dwcp_raft_term", "Current raft term of this member", term);
        let has_leader = Gauge::<i64>::default();
        has_leader.set(st["leader"].as_u64().is_some() as i64);
        reg.register(
            "dwcp_raft_has_leader",
            "1 when this member knows a leader",
            has_leader,
        );
        let is_leader = Gauge::<i64>::default();
        is_leader.set((st["role"] == "leader") as i64);
        reg.register(
            "dwcp_raft_is_leader",
            "1 when this member is the leader",
            is_leader,
        );
        let commit = Gauge::<i64>::default();
        commit.set(g("commit_index"));
        reg.register(
            "dwcp_raft_commit_index",
            "Highest raft log index this member knows committed",
            commit,
        );
        reg.register(
            "dwcp_raft_leader_changes",
            "Times this member saw the leader change (sampled every 250 ms)",
            self.leader_changes.clone(),
        );
        for op in ["begin", "commit"] {
            let _ = self.latency.get_or_create(&vec![
                ("op".to_string(), op.to_string()),
                ("result".to_string(), "ok".to_string()),
            ]);
        }
        reg.register(
            "dwcp_raft_commit_latency_seconds",
            "Time from proposing a registry command (begin, commit, abort, revert) to its commit being applied here",
            self.latency.clone(),
        );
    }
}

/// The timing wrapper around a [`ClusterOps`].
#[derive(Debug)]
struct Timed(Arc<RaftMetrics>);

/// Wraps `c`: returns what the agent should use and the metrics it feeds.
/// Starts a thread sampling the leader every 250 ms.
pub fn timed(c: Arc<dyn ClusterOps>) -> (Arc<dyn ClusterOps>, Arc<RaftMetrics>) {
    let m = Arc::new(RaftMetrics {
        inner: c,
        latency: Family::new_with_constructor(latency_buckets as fn() -> Histogram),
        leader_changes: Counter::default(),
        last_leader: Mutex::new(None),
    });
    let weak = Arc::downgrade(&m);
    std::thread::Builder::new()
        .name("dwcp-raft-metrics".into())
        .spawn(move || {
            while let Some(m) = weak.upgrade() {
                m.sample();
                drop(m);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
        .expect("spawn");
    (Arc::new(Timed(m.clone())), m)
}

impl ClusterOps for Timed {
    fn node_id(&self) -> u64 {
        self.0.inner.node_id()
    }
    fn status(&self) -> Value {
        self.0.inner.status()
    }
    fn guests(&self) -> Value {
        self.0.inner.guests()
    }
    fn begin(&self, guest: &str, src: u64, dst: u64) -> Result<u64, ClusterError> {
        self.0.time("begin", || self.0.inner.begin(guest, src, dst))
    }
    fn commit(&self, guest: &str, epoch: u64) -> Result<(), ClusterError> {
        self.0.time("commit", || self.0.inner.commit(guest, epoch))
    }
    fn abort(&self, guest: &str, epoch: u64) -> Result<(), ClusterError> {
        self.0.time("abort", || self.0.inner.abort(guest, epoch))
    }
    fn revert(&self, guest: &str, epoch: u64) -> Result<(), ClusterError> {
        self.0.time("revert", || self.0.inner.revert(guest, epoch))
    }
    fn owner(&self, guest: &str) -> Option<u64> {
        self.0.inner.owner(guest)
    }
    fn member_at(&self, ip: IpAddr) -> Option<u64> {
        self.0.inner.member_at(ip)
    }
    fn member_identity(&self, node: u64) -> Option<String> {
        self.0.inner.member_identity(node)
    }
    fn open_intents(&self) -> Vec<(String, u64, u64, u64)> {
        self.0.inner.open_intents()
    }
    fn transfer_leader(&self, to: u64) -> Result<(), ClusterError> {
        self.0.inner.transfer_leader(to)
    }
}
