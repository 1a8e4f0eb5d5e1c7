//! In-process network for cluster tests (after raft-rs's `harness/src/network.rs`): it can
//! cut links, drop a share of messages and delay them. Nodes are real [`Node`] threads over
//! real [`DiskStorage`] in a temporary directory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};
use parking_lot::Mutex;
use raft::prelude::Message;
use rand::Rng;

use crate::node::{mailbox, Mailbox, Node, NodeConfig, ProposeError, Transport};
use crate::registry::{Applied, Command, HostId, Registry};
use crate::storage::DiskStorage;

#[derive(Default)]
struct NetState {
    boxes: HashMap<HostId, Mailbox>,
    cut: HashSet<(HostId, HostId)>,
    drop_pct: u32,
    delay: Duration,
}

#[derive(Clone)]
pub(crate) struct SimNet {
    state: Arc<Mutex<NetState>>,
    delayed: Sender<(Instant, Message)>,
}

impl SimNet {
    pub(crate) fn new() -> SimNet {
        let state = Arc::new(Mutex::new(NetState::default()));
        let (tx, rx) = unbounded::<(Instant, Message)>();
        let st = state.clone();
        std::thread::spawn(move || {
            while let Ok((due, m)) = rx.recv() {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let mb = st.lock().boxes.get(&m.to).cloned();
                if let Some(mb) = mb {
                    mb.deliver(m);
                }
            }
        });
        SimNet { state, delayed: tx }
    }

    fn register(&self, id: HostId, mb: Mailbox) {
        self.state.lock().boxes.insert(id, mb);
    }

    pub(crate) fn isolate(&self, id: HostId) {
        let mut s = self.state.lock();
        let ids: Vec<HostId> = s.boxes.keys().copied().collect();
        for o in ids {
            s.cut.insert((id, o));
            s.cut.insert((o, id));
        }
    }

    pub(crate) fn heal(&self) {
        self.state.lock().cut.clear();
    }

    pub(crate) fn set_drop(&self, pct: u32) {
        self.state.lock().drop_pct = pct;
    }

    pub(crate) fn set_delay(&self, d: Duration) {
        self.state.lock().delay = d;
    }
}

struct SimTransport {
    from: HostId,
    net: SimNet,
}

impl Transport for SimTransport {
    fn send(&self, msgs: Vec<Message>) {
        let s = self.net.state.lock();
        let mut rng = rand::thread_rng();
        for m in msgs {
            if s.cut.contains(&(self.from, m.to)) {
                continue;
            }
            if s.drop_pct > 0 && rng.gen_range(0..100) < s.drop_pct {
                continue;
            }
            if !s.delay.is_zero() {
                let _ = self.net.delayed.send((Instant::now() + s.delay, m));
            } else if let Some(mb) = s.boxes.get(&m.to) {
                mb.deliver(m);
            }
        }
    }
    fn add_peer(&self, _id: HostId, _addr: &str) {}
    fn remove_peer(&self, _id: HostId) {}
}

pub(crate) struct TestCluster {
    pub(crate) net: SimNet,
    pub(crate) nodes: BTreeMap<HostId, Node>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) snapshot_interval: u64,
    pub(crate) proposal_timeout: Duration,
}

pub(crate) fn test_config(id: HostId, snapshot_interval: u64) -> NodeConfig {
    let mut c = NodeConfig::new(id);
    c.snapshot_interval = snapshot_interval;
    c.proposal_timeout = Duration::from_millis(1500);
    c
}

impl TestCluster {
    pub(crate) fn new(n: u64, snapshot_interval: u64) -> TestCluster {
        Self::with_timeout(n, snapshot_interval, Duration::from_millis(1500))
    }

    /// [`TestCluster::new`] with nodes whose proposals time out after `timeout`.
    pub(crate) fn with_timeout(n: u64, snapshot_interval: u64, timeout: Duration) -> TestCluster {
        let mut c = TestCluster {
            net: SimNet::new(),
            nodes: BTreeMap::new(),
            dir: tempfile::tempdir().unwrap(),
            snapshot_interval,
            proposal_timeout: timeout,
        };
        let voters: Vec<HostId> = (1..=n).collect();
        for id in 1..=n {
            c.start(id, Some(&voters));
        }
        c
    }

    /// Starts (or restarts from its data dir) node `id`; `voters` bootstraps a fresh one.
    pub(crate) fn start(&mut self, id: HostId, voters: Option<&[HostId]>) {
        let (storage, _) = DiskStorage::open(self.dir.path().join(id.to_string())).unwrap();
        if let Some(v) = voters {
            if !storage.is_initialized() {
                storage.bootstrap(v, Registry::new().to_snapshot()).unwrap();
            }
        }
        let (mb, inbox) = mailbox();
        self.net.register(id, mb);
        let t = SimTransport {
            from: id,
            net: self.net.clone(),
        };
        let mut cfg = test_config(id, self.snapshot_interval);
        cfg.proposal_timeout = self.proposal_timeout;
        let node = Node::start(cfg, storage, t, inbox).unwrap();
        self.nodes.insert(id, node);
    }

    pub(crate) fn stop(&mut self, id: HostId) {
        if let Some(mut n) = self.nodes.remove(&id) {
            n.stop();
        }
        self.net.state.lock().boxes.remove(&id);
    }

    pub(crate) fn node(&self, id: HostId) -> &Node {
        &self.nodes[&id]
    }

    /// A leader that every node in `among` agrees on.
    pub(crate) fn wait_leader(&self, among: &[HostId], timeout: Duration) -> Option<HostId> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            let leaders: HashSet<Option<HostId>> = among
                .iter()
                .map(|id| self.nodes[id].status().leader)
                .collect();
            if leaders.len() == 1 {
                if let Some(Some(l)) = leaders.into_iter().next() {
                    if among.contains(&l) && self.nodes[&l].status().role == "leader" {
                        return Some(l);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Proposes on the current leader among `among`, retrying leader changes.
    pub(crate) fn propose(&self, among: &[HostId], cmd: Command) -> Result<Applied, ProposeError> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let r = match self.wait_leader(among, Duration::from_secs(5)) {
                Some(l) => self.nodes[&l].propose(cmd.clone()),
                None => Err(ProposeError::NotLeader { leader: None }),
            };
            match r {
                Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Timeout)
                    if Instant::now() < end =>
                {
                    continue
                }
                r => return r,
            }
        }
    }

    pub(crate) fn registry(&self, id: HostId) -> Registry {
        self.nodes[&id].with_registry(|r| r.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{MigrationState, RegistryError};
    use uuid::Uuid;

    const T: Duration = Duration::from_secs(5);

    fn reg(n: u128, owner: HostId) -> Command {
        Command::RegisterGuest {
            guest: Uuid::from_u128(n),
            owner,
        }
    }

    /// Waits until every node in `ids` holds the same log and the same registry.
    fn same_registry(c: &TestCluster, ids: &[HostId]) {
        let end = Instant::now() + T;
        loop {
            let st: Vec<_> = ids.iter().map(|id| c.node(*id).status()).collect();
            let settled = st
                .iter()
                .all(|s| s.applied_index == st[0].last_index && s.last_index == st[0].last_index);
            let regs: Vec<_> = ids
                .iter()
                .map(|id| {
                    let mut r = c.registry(*id);
                    r.set_applied_index(0);
                    r
                })
                .collect();
            if settled && regs.iter().all(|r| r == &regs[0]) {
                return;
            }
            assert!(
                Instant::now() < end,
                "registries differ: guests {:?}, statuses {st:?}",
                regs.iter().map(|r| r.guests().count()).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn elects_one_leader_and_replicates() {
        let c = TestCluster::new(3, 10_000);
        let l = c.wait_leader(&[1, 2, 3], T).expect("no leader");
        let terms: HashSet<u64> = (1..=3).map(|id| c.node(id).status().term).collect();
        assert_eq!(terms.len(), 1, "nodes disagree on the term");
        for i in 0..30 {
            c.propose(&[1, 2, 3], reg(i, 1)).unwrap();
        }
        same_registry(&c, &[1, 2, 3]);
        assert_eq!(c.registry(l).guests().count(), 30);
        // A follower's proposal is forwarded to the leader by raft.
        let f = (1..=3).find(|&id| id != l).unwrap();
        assert_eq!(c.node(f).propose(reg(100, 2)).unwrap(), Applied::Registered);
    }

    #[test]
    fn survives_drops_and_delay() {
        let c = TestCluster::new(3, 10_000);
        c.wait_leader(&[1, 2, 3], T).expect("no leader");
        c.net.set_drop(10);
        c.net.set_delay(Duration::from_millis(3));
        for i in 0..15 {
            // A retry after a timeout may find its first attempt applied.
            let r = c.propose(&[1, 2, 3], reg(i, 1));
            assert!(
                matches!(
                    r,
                    Ok(_)
                        | Err(ProposeError::Rejected(
                            RegistryError::AlreadyRegistered { .. }
                        ))
                ),
                "{r:?}"
            );
        }
        c.net.set_drop(0);
        c.net.set_delay(Duration::ZERO);
        same_registry(&c, &[1, 2, 3]);
    }

    #[test]
    fn leader_failover() {
        let c = TestCluster::new(3, 10_000);
        let old = c.wait_leader(&[1, 2, 3], T).expect("no leader");
        c.propose(&[1, 2, 3], reg(1, 1)).unwrap();
        let rest: Vec<HostId> = (1..=3).filter(|&id| id != old).collect();
        let t0 = Instant::now();
        c.net.isolate(old);
        let new = c.wait_leader(&rest, T).expect("no new leader");
        let took = t0.elapsed();
        eprintln!("leader failover: {old} -> {new} in {} ms", took.as_millis());
        assert_ne!(new, old);
        assert!(took < Duration::from_secs(2), "failover took {took:?}");
        // The isolated old leader cannot commit (check_quorum makes it step down too).
        let r = c.node(old).propose(reg(2, 1));
        assert!(
            matches!(
                r,
                Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Timeout)
            ),
            "{r:?}"
        );
        c.propose(&rest, reg(3, 1)).unwrap();
        c.net.heal();
        same_registry(&c, &[1, 2, 3]);
        assert!(c.registry(old).guest(&Uuid::from_u128(2)).is_none());
    }

    /// The leader dies while a follower's commit of an ownership transfer is on its
    /// way to it (the QMP gate's commit, proposed on the source's member): the
    /// forward is lost with the leader. The follower sends it again to the new
    /// leader, so the commit succeeds within one proposal timeout, and ownership
    /// moves exactly once.
    #[test]
    fn leader_killed_during_a_commit_still_commits_once() {
        // The agents' proposal timeout: an election fits in it even on a loaded machine.
        let mut c = TestCluster::with_timeout(3, 10_000, Duration::from_secs(3));
        let all = [1, 2, 3];
        let old = c.wait_leader(&all, T).expect("no leader");
        let g = Uuid::from_u128(77);
        c.propose(&all, reg(77, 1)).unwrap();
        let epoch = match c
            .propose(
                &all,
                Command::BeginMigration {
                    guest: g,
                    source: 1,
                    destination: 2,
                },
            )
            .unwrap()
        {
            Applied::MigrationBegun { epoch } => epoch,
            other => panic!("{other:?}"),
        };
        let gate = (1..=3).find(|&id| id != old).unwrap();
        let rest: Vec<HostId> = all.iter().copied().filter(|&id| id != old).collect();
        for &id in &rest {
            // Every survivor knows the intent, and still follows the old leader.
            wait_applied(&c, id, |r| r.guest(&g).is_some_and(|r| r.epoch == epoch));
            assert_eq!(c.node(id).status().leader, Some(old));
        }
        c.stop(old);
        let t0 = Instant::now();
        let r = c
            .node(gate)
            .propose(Command::CommitMigration { guest: g, epoch });
        eprintln!(
            "commit on node {gate} with leader {old} killed: {r:?} in {} ms",
            t0.elapsed().as_millis()
        );
        assert_eq!(r, Ok(Applied::MigrationCommitted));
        assert!(
            c.node(gate).status().resent >= 1,
            "the commit went through without being sent again: the forward was not lost"
        );
        let new = c.wait_leader(&rest, T).expect("no new leader");
        assert_ne!(new, old);
        // The gate retries (it cannot know the first answer was the only one): same answer.
        assert_eq!(
            c.node(gate)
                .propose(Command::CommitMigration { guest: g, epoch }),
            Ok(Applied::MigrationCommitted)
        );
        // The old leader comes back and catches up: one transfer, everywhere.
        c.start(old, None);
        c.wait_leader(&all, T).expect("no leader after the restart");
        wait_applied(&c, old, |r| r.guest(&g).is_some_and(|r| r.owner == 2));
        same_registry(&c, &all);
        for id in all {
            let reg = c.registry(id);
            let rec = reg.guest(&g).unwrap();
            assert_eq!((rec.owner, rec.epoch), (2, epoch), "node {id}");
            let moves: Vec<_> = reg.history().filter(|m| m.guest == g).collect();
            assert_eq!(moves.len(), 1, "node {id}: {moves:?}");
            assert_eq!(moves[0].state, MigrationState::Committed);
        }
    }

    /// A proposal that waits longer than a third of the proposal timeout is sent
    /// again (its forward may be lost); when both copies reach the log, the
    /// second is skipped on every node: a migration begun once has epoch 1.
    #[test]
    fn a_re_sent_proposal_applies_once() {
        // Each message 100 ms late (under the 150 ms election timeout, so the
        // leader stays): the follower's proposal applies after four hops plus a
        // heartbeat, ~0.45 s, later than the re-send after a third of the
        // 0.9 s proposal timeout (0.3 s) and within the timeout.
        let c = TestCluster::with_timeout(3, 10_000, Duration::from_millis(900));
        let all = [1, 2, 3];
        let l = c.wait_leader(&all, T).expect("no leader");
        let f = all.into_iter().find(|&id| id != l).unwrap();
        c.net.set_delay(Duration::from_millis(100));
        let g = Uuid::from_u128(78);
        let r = c.node(f).propose(Command::BeginMigration {
            guest: g,
            source: 1,
            destination: 2,
        });
        assert_eq!(r, Ok(Applied::MigrationBegun { epoch: 1 }));
        assert!(c.node(f).status().resent >= 1, "not sent again");
        c.net.set_delay(Duration::ZERO);
        c.propose(&all, reg(79, 1)).unwrap();
        same_registry(&c, &all);
        for id in all {
            assert!(
                c.node(id).status().skipped_copies >= 1,
                "node {id} skipped no copy"
            );
            assert_eq!(c.registry(id).guest(&g).unwrap().epoch, 1, "node {id}");
        }
    }

    fn wait_applied(c: &TestCluster, id: HostId, pred: impl Fn(&Registry) -> bool) {
        let end = Instant::now() + T;
        while !c.node(id).with_registry(&pred) {
            assert!(Instant::now() < end, "node {id} did not catch up");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn restart_from_disk() {
        let mut c = TestCluster::new(3, 10_000);
        c.wait_leader(&[1, 2, 3], T).expect("no leader");
        for i in 0..20 {
            c.propose(&[1, 2, 3], reg(i, 1)).unwrap();
        }
        same_registry(&c, &[1, 2, 3]);
        let term_before = c.node(1).status().term;
        for id in 1..=3 {
            c.stop(id);
        }
        for id in 1..=3 {
            c.start(id, None);
        }
        c.wait_leader(&[1, 2, 3], T)
            .expect("no leader after restart");
        assert!(c.node(1).status().term >= term_before);
        c.propose(&[1, 2, 3], reg(99, 1)).unwrap();
        same_registry(&c, &[1, 2, 3]);
        assert_eq!(c.registry(2).guests().count(), 21);
    }

    #[test]
    fn snapshot_compaction_and_lagging_follower() {
        let mut c = TestCluster::new(3, 20);
        let l = c.wait_leader(&[1, 2, 3], T).expect("no leader");
        let lag = (1..=3).find(|&id| id != l).unwrap();
        let up: Vec<HostId> = (1..=3).filter(|&id| id != lag).collect();
        c.net.isolate(lag);
        for i in 0..80 {
            c.propose(&up, reg(i, 1)).unwrap();
        }
        let ls = c.node(l).status();
        assert!(ls.snapshot_index >= 60, "no snapshot taken: {ls:?}");
        let (first, _) = c.node(l).storage().bounds();
        assert!(first > 60, "log not compacted, first index {first}");
        c.net.heal();
        same_registry(&c, &[1, 2, 3]);
        let snap = c.node(lag).storage().latest_snapshot();
        assert!(
            snap.get_metadata().index >= 60,
            "lagging follower did not get a snapshot"
        );
        // And it survives a restart from its snapshot + log.
        c.stop(lag);
        c.start(lag, None);
        c.propose(&[1, 2, 3], reg(1000, 1)).unwrap();
        same_registry(&c, &[1, 2, 3]);
        assert_eq!(c.registry(lag).guests().count(), 81);
    }

    #[test]
    fn membership_add_and_remove() {
        let mut c = TestCluster::new(3, 10_000);
        let l = c.wait_leader(&[1, 2, 3], T).expect("no leader");
        c.propose(&[1, 2, 3], reg(1, 1)).unwrap();
        c.start(4, None); // joins empty, learns everything from the leader
        c.node(l).add_node(4, "sim").unwrap();
        c.propose(&[1, 2, 3], reg(2, 1)).unwrap();
        same_registry(&c, &[1, 2, 3, 4]);
        assert_eq!(c.node(4).status().voters, vec![1, 2, 3, 4]);
        let gone = (1..=3).find(|&id| id != l).unwrap();
        c.node(l).remove_node(gone).unwrap();
        c.stop(gone);
        let left: Vec<HostId> = (1..=4).filter(|&id| id != gone).collect();
        c.propose(&left, reg(3, 1)).unwrap();
        same_registry(&c, &left);
        assert!(!c.node(4).status().voters.contains(&gone));
        // A follower cannot change membership; it names the leader.
        let f = *left.iter().find(|&&id| id != l).unwrap();
        assert!(matches!(
            c.node(f).add_node(9, "sim"),
            Err(ProposeError::NotLeader { leader: Some(x) }) if x == l
        ));
    }

    #[test]
    fn registry_rules_through_raft() {
        let c = TestCluster::new(3, 10_000);
        c.wait_leader(&[1, 2, 3], T).expect("no leader");
        let g = Uuid::from_u128(42);
        let all = [1, 2, 3];
        let begin = |s, d| Command::BeginMigration {
            guest: g,
            source: s,
            destination: d,
        };
        let epoch = match c.propose(&all, begin(1, 2)).unwrap() {
            Applied::MigrationBegun { epoch } => epoch,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            c.propose(&all, begin(1, 3)),
            Err(ProposeError::Rejected(
                RegistryError::AlreadyMigrating { .. }
            ))
        ));
        assert!(matches!(
            c.propose(
                &all,
                Command::CommitMigration {
                    guest: g,
                    epoch: epoch + 1
                }
            ),
            Err(ProposeError::Rejected(RegistryError::StaleEpoch { .. }))
        ));
        c.propose(&all, Command::CommitMigration { guest: g, epoch })
            .unwrap();
        assert!(matches!(
            c.propose(&all, begin(1, 3)),
            Err(ProposeError::Rejected(RegistryError::NotOwner {
                owner: 2,
                ..
            }))
        ));
        same_registry(&c, &all);
        assert_eq!(c.registry(3).guest(&g).unwrap().owner, 2);
    }

    #[test]
    fn partitioned_minority_cannot_commit() {
        let c = TestCluster::new(3, 10_000);
        let all = [1, 2, 3];
        let old = c.wait_leader(&all, T).expect("no leader");
        let g = Uuid::from_u128(7);
        let epoch = match c
            .propose(
                &all,
                Command::BeginMigration {
                    guest: g,
                    source: 1,
                    destination: 2,
                },
            )
            .unwrap()
        {
            Applied::MigrationBegun { epoch } => epoch,
            other => panic!("{other:?}"),
        };
        // The leader ends up alone: its commit of the ownership transfer must fail.
        c.net.isolate(old);
        let r = c
            .node(old)
            .propose(Command::CommitMigration { guest: g, epoch });
        assert!(
            matches!(
                r,
                Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Timeout)
            ),
            "{r:?}"
        );
        // The majority aborts the migration instead.
        let rest: Vec<HostId> = all.iter().copied().filter(|&id| id != old).collect();
        c.propose(&rest, Command::AbortMigration { guest: g, epoch })
            .unwrap();
        c.net.heal();
        same_registry(&c, &all);
        for id in all {
            let rec = c.registry(id).guest(&g).cloned().unwrap();
            assert_eq!(rec.owner, 1, "node {id}");
            assert_eq!(rec.migration.unwrap().state, MigrationState::Aborted);
        }
    }
}
