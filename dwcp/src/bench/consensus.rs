//! `dwcp benchmark consensus`: commit latency, throughput, election and
//! failover of a raft cluster of `dwcp_consensus` members, and the registry at
//! fleet size ([`fleet_placed`]: many guests, many concurrent migrations,
//! snapshots, restart and catch-up). Benchmark code only, on the library's
//! public API (moved out of dwcp-consensus).

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use dwcp_consensus::{
    Applied, Cluster, ClusterConfig, ClusterError, Command, PeerAddr, ProposeError,
};
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
    let (peers, listeners) = loopback_peers(nodes)?;
    let listeners = Mutex::new(listeners);
    bench_placed(
        base,
        peers,
        ops,
        batch,
        "loopback",
        &loopback_start(listeners),
    )
}

/// Loopback peers on listeners bound to port 0, one per member.
fn loopback_peers(
    nodes: usize,
) -> Result<(Vec<PeerAddr>, std::collections::HashMap<u64, TcpListener>), ClusterError> {
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
    Ok((peers, listeners))
}

/// Starts a member on its pre-bound listener, or (a restart) on a new one
/// bound to the same address.
fn loopback_start(
    listeners: Mutex<std::collections::HashMap<u64, TcpListener>>,
) -> impl Fn(ClusterConfig) -> Result<Cluster, ClusterError> {
    move |cfg| {
        let l = listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&cfg.node_id);
        match l {
            Some(l) => Cluster::start_with_listener(cfg, l),
            None => Cluster::start(cfg),
        }
    }
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
    let configs = member_configs(base, &peers, 5_000);
    let t0 = Instant::now();
    let mut members = Vec::new();
    for cfg in &configs {
        members.push(start(cfg.clone())?);
    }
    let election_ms = lead_with_node_1(&members.iter().collect::<Vec<_>>(), t0)?;
    let node = members[0].node();
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
    let pct = |p: f64| percentile(&lat, p);
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

/// One config per member, logs under `base/n<id>`.
fn member_configs(
    base: &std::path::Path,
    peers: &[PeerAddr],
    snapshot_interval: u64,
) -> Vec<ClusterConfig> {
    let cluster_id = rand::random::<u64>();
    peers
        .iter()
        .map(|p| {
            let mut cfg = ClusterConfig::new(
                p.id,
                peers.to_vec(),
                base.join(format!("n{}", p.id)),
                cluster_id,
                &p.addr,
            );
            cfg.node.snapshot_interval = snapshot_interval;
            cfg
        })
        .collect()
}

/// Makes node 1 (`members[0]`) the leader so latency is measured where
/// proposals are made: it campaigns first; if another member won, that one
/// hands over. Returns the time since `t0`, ms.
fn lead_with_node_1(members: &[&Cluster], t0: Instant) -> Result<f64, ClusterError> {
    members[0].node().campaign();
    while t0.elapsed() < Duration::from_secs(20) {
        let st = members[0].node().status();
        if st.role == "leader" {
            return Ok(t0.elapsed().as_secs_f64() * 1e3);
        }
        if let Some(l) = st.leader.filter(|&l| l != 1) {
            if let Some(m) = members.iter().find(|m| m.id() == l) {
                m.node().transfer_leader(1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(ClusterError::Propose(ProposeError::NotLeader {
        leader: None,
    }))
}

/// The `p` quantile of sorted `v` (0 when empty).
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
}

/// What [`fleet_placed`] loads the registry with.
#[derive(Debug, Clone, Copy)]
pub struct FleetSpec {
    /// Hosts the guests are spread over (ids 1..=hosts; the raft members
    /// are hosts 1..=nodes of them).
    pub hosts: u64,
    /// Guests registered before the migrations.
    pub guests: usize,
    /// Migrations in flight at once (one client thread each, as one gate per
    /// migration would be).
    pub concurrent: usize,
    /// Migrations measured (each an intent and a commit).
    pub migrations: usize,
    /// Client threads that keep the `concurrent` migrations in flight: 0, one
    /// per migration (a gate each, all on the leader's host); fewer, each
    /// thread keeps its share in flight with `propose_async` (the gates are
    /// elsewhere: what the leader's host pays is raft, not a thousand
    /// waiting threads).
    pub client_threads: usize,
}

/// Result of [`fleet_placed`]: the registry at fleet size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetResult {
    /// Where the members ran: `loopback`, or a link profile.
    pub link: String,
    /// Cluster size.
    pub nodes: usize,
    /// Hosts the guests are spread over.
    pub hosts: u64,
    /// Guests in the registry.
    pub guests: usize,
    /// Migrations in flight at once.
    pub concurrent: usize,
    /// Client threads keeping them in flight (0: one per migration).
    #[serde(default)]
    pub client_threads: usize,
    /// Migrations measured (2 commands each).
    pub migrations: usize,
    /// Registering every guest (`concurrent` in flight), s.
    pub populate_s: f64,
    /// Registrations per second.
    pub populate_ops_per_sec: f64,
    /// The leader's raft.log before the snapshot, bytes.
    pub log_bytes_before_snapshot: u64,
    /// The registry serialized into the leader's snapshot, bytes.
    pub snapshot_bytes: u64,
    /// How long taking it stalled the leader's raft thread (serialize,
    /// write + fsync, compact the log), ms.
    pub snapshot_ms: f64,
    /// A follower stopped and started again from its snapshot + log: until
    /// `Cluster::start` returned (open the log, decode the snapshot), ms.
    pub restart_open_ms: f64,
    /// ... until it had applied everything the leader had committed, ms.
    pub restart_caught_up_ms: f64,
    /// Median latency of one command (intent or commit), propose → applied
    /// on the leader, with `concurrent` migrations in flight, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
    /// Commands (intents + commits) per second.
    pub ops_per_sec: f64,
    /// Migrations (intent + commit) per second.
    pub migrations_per_sec: f64,
    /// Commands that failed.
    pub failed: usize,
    /// Snapshots the leader took by itself (every `snapshot_interval`
    /// entries) during the migrations.
    pub snapshots_during_migrations: u64,
    /// Log entries committed while a follower was down (its backlog).
    pub catchup_entries: u64,
    /// From restarting that follower until it had applied everything the
    /// leader had committed, ms.
    pub catchup_ms: f64,
    /// Whether it caught up by installing the leader's snapshot (its log had
    /// been compacted away on the leader) rather than from log entries.
    pub catchup_via_snapshot: bool,
    /// Every member's registry identical at the end.
    pub consistent: bool,
}

fn get(ms: &[Option<Cluster>], i: usize) -> Result<&Cluster, ClusterError> {
    ms[i].as_ref().ok_or_else(|| fail("member not running"))
}

fn fail(what: &str) -> ClusterError {
    ClusterError::Config(format!("fleet benchmark: {what}"))
}

/// Runs `f(i)` for i in 0..total on `threads` threads (each takes the next
/// i); returns the latencies f pushed, the failures it counted and the
/// wall time, s.
fn drive(
    threads: usize,
    total: usize,
    f: &(dyn Fn(usize, &mut Vec<f64>) -> usize + Sync),
) -> (Vec<f64>, usize, f64) {
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    let parts: Vec<(Vec<f64>, usize)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads.clamp(1, total.max(1)))
            .filter_map(|_| {
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(s, || {
                        let mut lat = Vec::new();
                        let mut failed = 0;
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= total {
                                break (lat, failed);
                            }
                            failed += f(i, &mut lat);
                        }
                    })
                    .ok()
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    merge_parts(parts, t.elapsed().as_secs_f64())
}

/// Migration `k`'s guest and its intent: guest k mod guests, from its
/// owner to the next host (each round over the guests moves them one host on).
fn begin_command(spec: &FleetSpec, k: usize) -> (Uuid, Command) {
    let i = k % spec.guests;
    let round = (k / spec.guests) as u64;
    let source = (i as u64 + round) % spec.hosts + 1;
    let destination = (i as u64 + round + 1) % spec.hosts + 1;
    let guest = guest_id(i);
    (
        guest,
        Command::BeginMigration {
            guest,
            source,
            destination,
        },
    )
}

/// Whether migrations are driven from fewer threads than are in flight.
fn pipelined(spec: &FleetSpec) -> bool {
    spec.client_threads > 0 && spec.client_threads < spec.concurrent
}

/// The client threads' latencies (sorted) and failures, with the run's seconds.
fn merge_parts(parts: Vec<(Vec<f64>, usize)>, secs: f64) -> (Vec<f64>, usize, f64) {
    let mut lat = Vec::new();
    let mut failed = 0;
    for (l, f) in parts {
        lat.extend(l);
        failed += f;
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat, failed, secs)
}

/// Migrations `first..first + total` (intent, then commit), `spec.concurrent`
/// in flight, kept there by `spec.client_threads` threads: each proposes its
/// share with `propose_async` and takes the answers in the order it proposed
/// (raft applies one proposer's commands in that order), proposing the commit
/// on the intent's answer and the next migration on the commit's. Latency is
/// proposal → answer taken. Returns what [`drive`] does.
fn drive_pipelined(
    spec: &FleetSpec,
    leader: &Cluster,
    first: usize,
    total: usize,
) -> (Vec<f64>, usize, f64) {
    use std::collections::VecDeque;
    enum Stage {
        Begin,
        Commit,
    }
    let threads = spec.client_threads.clamp(1, spec.concurrent);
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    let parts: Vec<(Vec<f64>, usize)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .filter_map(|n| {
                // This thread's share of the migrations in flight.
                let share = spec.concurrent / threads + usize::from(n < spec.concurrent % threads);
                let next = &next;
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(s, move || {
                        let node = leader.node();
                        let mut lat = Vec::new();
                        let mut failed = 0;
                        let mut slots = VecDeque::with_capacity(share);
                        let start_one = |slots: &mut VecDeque<_>| {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            if k < total {
                                let (guest, begin) = begin_command(spec, first + k);
                                slots.push_back((
                                    guest,
                                    Stage::Begin,
                                    Instant::now(),
                                    node.propose_async(begin),
                                ));
                            }
                        };
                        for _ in 0..share {
                            start_one(&mut slots);
                        }
                        while let Some((guest, stage, t0, answer)) = slots.pop_front() {
                            let r = node.wait(answer);
                            match (stage, r) {
                                (Stage::Begin, Ok(Applied::MigrationBegun { epoch })) => {
                                    lat.push(t0.elapsed().as_secs_f64() * 1e3);
                                    slots.push_back((
                                        guest,
                                        Stage::Commit,
                                        Instant::now(),
                                        node.propose_async(Command::CommitMigration {
                                            guest,
                                            epoch,
                                        }),
                                    ));
                                }
                                (Stage::Begin, _) => {
                                    failed += 2;
                                    start_one(&mut slots);
                                }
                                (Stage::Commit, r) => {
                                    if r.is_ok() {
                                        lat.push(t0.elapsed().as_secs_f64() * 1e3);
                                    } else {
                                        failed += 1;
                                    }
                                    start_one(&mut slots);
                                }
                            }
                        }
                        (lat, failed)
                    })
                    .ok()
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    merge_parts(parts, t.elapsed().as_secs_f64())
}

fn guest_id(i: usize) -> Uuid {
    Uuid::from_u128(0xf1ee7 << 64 | i as u128)
}

/// Waits until `m` has applied index `index`; the time it took, ms.
fn wait_applied(m: &Cluster, index: u64, what: &str) -> Result<f64, ClusterError> {
    let t = Instant::now();
    while m.node().status().applied_index < index {
        if t.elapsed() > Duration::from_secs(300) {
            return Err(fail(&format!(
                "{what}: member {} never applied index {index}",
                m.id()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Compacts `m`'s log now; waits for the snapshot.
fn compact(m: &Cluster) -> Result<(), ClusterError> {
    let applied = m.node().status().applied_index;
    m.node().compact();
    let t = Instant::now();
    while m.node().status().snapshot_index < applied {
        if t.elapsed() > Duration::from_secs(120) {
            return Err(fail(&format!("member {} took no snapshot", m.id())));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The registry at fleet size, on members placed by `start` (see
/// [`bench_placed`]): registers `spec.guests` guests over `spec.hosts`
/// hosts, snapshots every member, restarts the last member from its
/// snapshot, runs `spec.migrations` migrations (intent, then commit, as the
/// gate does) `spec.concurrent` at a time at node 1 (the leader), then
/// stops the last member, runs half as many migrations more, compacts the
/// leader's log past it and restarts it, so it catches up through the
/// leader's snapshot. Every member's log is on disk with fsync; snapshots
/// also come every `NodeConfig::new`'s default interval.
pub fn fleet_placed(
    base: &std::path::Path,
    peers: Vec<PeerAddr>,
    spec: FleetSpec,
    link: &str,
    start: &dyn Fn(ClusterConfig) -> Result<Cluster, ClusterError>,
) -> Result<FleetResult, ClusterError> {
    if spec.hosts < 2 || spec.guests == 0 || peers.len() < 3 {
        return Err(fail("needs --hosts >= 2, --guests >= 1 and --nodes >= 3"));
    }
    let nodes = peers.len();
    let interval = dwcp_consensus::NodeConfig::new(1).snapshot_interval;
    let configs = member_configs(base, &peers, interval);
    let mut members: Vec<Option<Cluster>> = Vec::new();
    for cfg in &configs {
        members.push(Some(start(cfg.clone())?));
    }
    let live = |ms: &[Option<Cluster>]| -> Vec<usize> {
        (0..ms.len()).filter(|&i| ms[i].is_some()).collect()
    };
    let all: Vec<&Cluster> = members.iter().flatten().collect();
    lead_with_node_1(&all, Instant::now())?;
    let last = nodes - 1;

    // 1. Register the fleet.
    let leader = get(&members, 0)?;
    let (_, pop_failed, populate_s) = drive(spec.concurrent, spec.guests, &|i, _| {
        let owner = (i as u64 % spec.hosts) + 1;
        match leader.node().propose(Command::RegisterGuest {
            guest: guest_id(i),
            owner,
        }) {
            Ok(_) => 0,
            Err(e) => {
                tracing::warn!(error = %e, "fleet benchmark: a registration failed");
                1
            }
        }
    });
    if pop_failed > 0 {
        return Err(fail(&format!(
            "{pop_failed} of {} registrations failed",
            spec.guests
        )));
    }

    // 2. Snapshot every member (the leader's cost is the figure).
    let log_bytes_before_snapshot = leader.node().storage().log_bytes();
    let commit = leader.node().status().commit_index;
    for &i in &live(&members) {
        wait_applied(get(&members, i)?, commit, "before the snapshot")?;
        compact(get(&members, i)?)?;
    }
    let st = leader.node().status();
    let (snapshot_bytes, snapshot_ms) = (st.snapshot_bytes, st.snapshot_micros as f64 / 1e3);

    // 3. Restart the last member from its snapshot.
    if let Some(m) = members[last].take() {
        m.shutdown();
    }
    let t = Instant::now();
    members[last] = Some(start(configs[last].clone())?);
    let restart_open_ms = t.elapsed().as_secs_f64() * 1e3;
    let commit = get(&members, 0)?.node().status().commit_index;
    wait_applied(get(&members, last)?, commit, "restart")?;
    let restart_caught_up_ms = t.elapsed().as_secs_f64() * 1e3;

    // 4. Concurrent migrations at the leader.
    let migrate = |m: &Cluster, k: usize, lat: &mut Vec<f64>| -> usize {
        let (guest, begin) = begin_command(&spec, k);
        let t = Instant::now();
        let epoch = match m.node().propose(begin) {
            Ok(Applied::MigrationBegun { epoch }) => epoch,
            _ => return 2,
        };
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        match m.node().propose(Command::CommitMigration { guest, epoch }) {
            Ok(_) => {
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                0
            }
            Err(_) => 1,
        }
    };
    let leader = get(&members, 0)?;
    let snaps_before = leader.node().status().snapshot_index;
    let (lat, failed, secs) = if pipelined(&spec) {
        drive_pipelined(&spec, leader, 0, spec.migrations)
    } else {
        drive(spec.concurrent, spec.migrations, &|k, lat| {
            migrate(leader, k, lat)
        })
    };
    let snapshots_during_migrations =
        u64::from(leader.node().status().snapshot_index > snaps_before);
    let ops = spec.migrations * 2 - failed;

    // 5. The last member misses half as many migrations again, the leader's
    //    log is compacted past it, and it comes back.
    let before = get(&members, last)?.node().status().last_index;
    if let Some(m) = members[last].take() {
        m.shutdown();
    }
    let more = (spec.migrations / 2).max(1);
    let leader = get(&members, 0)?;
    if pipelined(&spec) {
        drive_pipelined(&spec, leader, spec.migrations, more);
    } else {
        drive(spec.concurrent, more, &|k, lat| {
            migrate(leader, spec.migrations + k, lat)
        });
    }
    for &i in &live(&members) {
        compact(get(&members, i)?)?;
    }
    let commit = get(&members, 0)?.node().status().commit_index;
    let t = Instant::now();
    members[last] = Some(start(configs[last].clone())?);
    wait_applied(get(&members, last)?, commit, "catch-up")?;
    let catchup_ms = t.elapsed().as_secs_f64() * 1e3;
    let caught = get(&members, last)?.node().status();
    let catchup_via_snapshot = caught.snapshot_index > before;

    // 6. Every registry the same.
    let commit = get(&members, 0)?.node().status().commit_index;
    let reference: Vec<_> = get(&members, 0)?
        .node()
        .with_registry(|r| r.guests().cloned().collect());
    let mut consistent = reference.len() == spec.guests;
    for &i in &live(&members)[1..] {
        let m = get(&members, i)?;
        wait_applied(m, commit, "final check")?;
        consistent &= m.node().with_registry(|r| r.guests().eq(reference.iter()));
    }
    Ok(FleetResult {
        link: link.to_string(),
        nodes,
        hosts: spec.hosts,
        guests: spec.guests,
        concurrent: spec.concurrent,
        client_threads: spec.client_threads,
        migrations: spec.migrations,
        populate_s,
        populate_ops_per_sec: spec.guests as f64 / populate_s,
        log_bytes_before_snapshot,
        snapshot_bytes,
        snapshot_ms,
        restart_open_ms,
        restart_caught_up_ms,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        max_ms: percentile(&lat, 1.0),
        ops_per_sec: ops as f64 / secs,
        migrations_per_sec: (spec.migrations as f64 - failed as f64 / 2.0) / secs,
        failed,
        snapshots_during_migrations,
        catchup_entries: commit.saturating_sub(before),
        catchup_ms,
        catchup_via_snapshot,
        consistent,
    })
}

/// [`fleet_placed`] on loopback TCP, logs in a temporary directory.
pub fn bench_fleet(nodes: usize, spec: FleetSpec) -> Result<FleetResult, ClusterError> {
    let base = std::env::temp_dir().join(format!(
        "dwcp-consensus-fleet-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = loopback_peers(nodes).and_then(|(peers, listeners)| {
        fleet_placed(
            &base,
            peers,
            spec,
            "loopback",
            &loopback_start(Mutex::new(listeners)),
        )
    });
    let _ = std::fs::remove_dir_all(&base);
    result
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
