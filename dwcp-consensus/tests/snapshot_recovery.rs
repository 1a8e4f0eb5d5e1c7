//! Snapshots, restart and catch-up of a three-member cluster on loopback TCP with real
//! raft logs on disk (fsync'd), at a size where they matter: thousands of guests and
//! migrations. The fleet-size figures (100,000 guests, 1,000 concurrent migrations) are
//! `dwcp benchmark consensus --guests` (docs/scale.md); this is their correctness half.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use dwcp_consensus::{Answer, Applied, Cluster, ClusterConfig, Command, GuestRecord, PeerAddr};
use uuid::Uuid;

const GUESTS: usize = 5_000;
const HOSTS: u64 = 50;
const IN_FLIGHT: usize = 500;

fn guest(i: usize) -> Uuid {
    Uuid::from_u128(0x5eed << 64 | i as u128)
}

fn configs(dir: &Path) -> (Vec<ClusterConfig>, Vec<TcpListener>) {
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
    let cfgs = peers
        .iter()
        .map(|p| {
            ClusterConfig::new(
                p.id,
                peers.clone(),
                dir.join(p.id.to_string()),
                cluster_id,
                &p.addr,
            )
        })
        .collect();
    (cfgs, ls)
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The member that leads (every member started).
fn leader(ms: &[Option<Cluster>]) -> &Cluster {
    let mut found = None;
    wait_until("a leader", 10, || {
        found = ms
            .iter()
            .flatten()
            .position(|m| m.node().status().role == "leader");
        found.is_some()
    });
    ms.iter().flatten().nth(found.unwrap()).unwrap()
}

/// Proposes `cmds` on `m`, `IN_FLIGHT` at a time; every one must apply.
fn propose_all(m: &Cluster, cmds: impl IntoIterator<Item = Command>) -> Vec<Applied> {
    let cmds: Vec<Command> = cmds.into_iter().collect();
    let mut out = Vec::with_capacity(cmds.len());
    for chunk in cmds.chunks(IN_FLIGHT) {
        let answers: Vec<Answer> = chunk
            .iter()
            .map(|c| m.node().propose_async(c.clone()))
            .collect();
        for (a, c) in answers.into_iter().zip(chunk) {
            out.push(m.node().wait(a).unwrap_or_else(|e| panic!("{c:?}: {e}")));
        }
    }
    out
}

/// Migrates guests `range` one host on, intent then commit (as the gate does).
fn migrate(m: &Cluster, range: std::ops::Range<usize>) {
    let owners: Vec<u64> = m.node().with_registry(|r| {
        range
            .clone()
            .map(|i| r.guest(&guest(i)).unwrap().owner)
            .collect()
    });
    let begun = propose_all(
        m,
        range
            .clone()
            .zip(&owners)
            .map(|(i, &o)| Command::BeginMigration {
                guest: guest(i),
                source: o,
                destination: o % HOSTS + 1,
            }),
    );
    propose_all(
        m,
        range.zip(begun).map(|(i, a)| match a {
            Applied::MigrationBegun { epoch } => Command::CommitMigration {
                guest: guest(i),
                epoch,
            },
            other => panic!("begin answered {other:?}"),
        }),
    );
}

fn guests_of(m: &Cluster) -> Vec<GuestRecord> {
    m.node().with_registry(|r| r.guests().cloned().collect())
}

/// Waits until `m` has applied what `of` has applied, then compares registries.
fn same_registry(m: &Cluster, of: &Cluster) {
    // The registry's own index: the status is published after the answers went out.
    let (applied, a) = of
        .node()
        .with_registry(|r| (r.applied_index(), r.guests().cloned().collect::<Vec<_>>()));
    wait_until("the member to apply the leader's log", 30, || {
        m.node().with_registry(|r| r.applied_index()) >= applied
    });
    let b = guests_of(m);
    assert_eq!(a.len(), b.len(), "member {} guest count", m.id());
    assert!(
        a == b,
        "member {} registry differs from member {}",
        m.id(),
        of.id()
    );
}

fn compact(m: &Cluster) {
    let applied = m.node().status().applied_index;
    m.node().compact();
    wait_until("a snapshot", 30, || {
        m.node().status().snapshot_index >= applied
    });
}

#[test]
fn snapshot_restart_and_catch_up_through_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (cfgs, ls) = configs(dir.path());
    let mut ms: Vec<Option<Cluster>> = cfgs
        .iter()
        .cloned()
        .zip(ls)
        .map(|(c, l)| Some(Cluster::start_with_listener(c, l).unwrap()))
        .collect();
    let l = leader(&ms);
    let lid = l.id() as usize - 1;
    // The member that is restarted and left behind: not the leader.
    let f = (lid + 1) % 3;

    propose_all(
        l,
        (0..GUESTS).map(|i| Command::RegisterGuest {
            guest: guest(i),
            owner: i as u64 % HOSTS + 1,
        }),
    );
    migrate(l, 0..1_000);

    // 1. A snapshot on every member: it holds the whole registry and the log is
    //    compacted to it.
    for m in ms.iter().flatten() {
        same_registry(m, l);
        compact(m);
        let st = m.node().status();
        let (first, _) = m.node().storage().bounds();
        assert_eq!(first, st.snapshot_index + 1, "log not compacted: {st:?}");
        assert!(
            st.snapshot_bytes > (GUESTS * 50) as u64,
            "snapshot of {} bytes for {GUESTS} guests",
            st.snapshot_bytes
        );
        let snap = m.node().storage().latest_snapshot();
        let reg = dwcp_consensus::registry::Registry::from_snapshot(&snap.data).unwrap();
        assert_eq!(reg.guests().count(), GUESTS);
    }

    // 2. Restart a member from its snapshot and log: same registry, before and after
    //    it hears from the leader again.
    let before = guests_of(ms[f].as_ref().unwrap());
    ms[f].take().unwrap().shutdown();
    let restarted = Cluster::start(cfgs[f].clone()).unwrap();
    assert_eq!(
        guests_of(&restarted),
        before,
        "registry rebuilt from the snapshot differs"
    );
    ms[f] = Some(restarted);
    let l = leader(&ms);
    same_registry(ms[f].as_ref().unwrap(), l);

    // 3. Stop it, commit more than it holds, compact the others past it: it must
    //    catch up by installing the leader's snapshot.
    let m = ms[f].take().unwrap();
    let behind_at = m.node().status().last_index;
    m.shutdown();
    let l = leader(&ms);
    migrate(l, 1_000..3_000);
    for m in ms.iter().flatten() {
        compact(m);
        assert!(m.node().storage().bounds().0 > behind_at + 1);
    }
    ms[f] = Some(Cluster::start(cfgs[f].clone()).unwrap());
    let l = leader(&ms);
    let back = ms[f].as_ref().unwrap();
    same_registry(back, l);
    let st = back.node().status();
    assert!(
        back.node().storage().latest_snapshot().get_metadata().index > behind_at,
        "caught up without the leader's snapshot: {st:?}"
    );
    // And it takes part again: a commit with it in the quorum.
    migrate(l, 3_000..3_100);
    same_registry(ms[f].as_ref().unwrap(), l);

    // 4. The whole cluster restarts from disk with the same registry.
    let reference = guests_of(l);
    assert_eq!(
        reference.iter().filter(|g| g.migration.is_some()).count(),
        3_100
    );
    for m in ms.iter_mut() {
        m.take().unwrap().shutdown();
    }
    let ms: Vec<Option<Cluster>> = cfgs
        .iter()
        .map(|c| Some(Cluster::start(c.clone()).unwrap()))
        .collect();
    let l = leader(&ms);
    propose_all(
        l,
        [Command::RegisterGuest {
            guest: guest(GUESTS),
            owner: 1,
        }],
    );
    for m in ms.iter().flatten() {
        same_registry(m, l);
        let g = guests_of(m);
        assert_eq!(g.len(), GUESTS + 1);
        assert!(g
            .iter()
            .filter(|r| r.guest != guest(GUESTS))
            .eq(reference.iter()));
    }
}
