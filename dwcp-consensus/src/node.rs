//! One raft node: a thread that owns a raft-rs [`RawNode`] over [`DiskStorage`], ticks it,
//! steps peer messages, batches proposals and handles each `Ready` in raft-rs's
//! documented order.
//!
//! The node owns the algorithm's side effects (persist, send, apply); the network is
//! behind [`Transport`] so tests can swap TCP for an in-process network.
//!
//! Proposals: callers hand a [`Command`] to the node thread with a reply channel. The
//! thread gathers every proposal waiting in its inbox into one log entry (batching), and
//! answers each caller when the entry is applied on this node. A follower's proposal is
//! forwarded to the leader by raft itself (`MsgPropose`).
//!
//! Leader failover: raft forwards a proposal once and never again, and a leader that dies
//! (or steps down) takes the proposals it had not replicated with it. So the node keeps
//! every proposal until it is applied and sends it again when a new leader (or term)
//! appears, when it was dropped for want of a leader, and when it has waited a third of
//! the proposal timeout; a proposal made while no leader is known waits for one (up to
//! the timeout) instead of failing. The log may then hold two copies of a proposal: each
//! carries its proposer's identity (node, run, sequence number) and the registry's
//! [`Proposers`](crate::registry::Proposers) table skips a copy already applied, on every
//! node alike. A proposal that was never handed to raft fails with
//! [`ProposeError::NotLeader`] at the timeout (it is in no log); one that was, with
//! [`ProposeError::Timeout`] (it may still commit).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::RwLock;
use prost::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, Snapshot,
};
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};

use crate::registry::{Applied, Command, HostId, Registry, RegistryError};
use crate::reply::{reply, Answer, Reply};
use crate::storage::{DiskStorage, StorageError};

/// Sends raft messages to peers. Delivery is best effort: raft retries.
pub trait Transport: Send + 'static {
    /// Sends messages (each names its destination in `to`).
    fn send(&self, msgs: Vec<Message>);
    /// A node joined the group at `addr` (from an applied conf change).
    fn add_peer(&self, id: HostId, addr: &str);
    /// A node left the group.
    fn remove_peer(&self, id: HostId);
}

/// Timing and sizing of a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeConfig {
    /// This node's id (non-zero).
    pub id: HostId,
    /// Length of one raft tick.
    pub tick: Duration,
    /// Election timeout (rounded to ticks; raft randomizes in [timeout, 2 * timeout)).
    pub election_timeout: Duration,
    /// Leader heartbeat interval (rounded to ticks).
    pub heartbeat_interval: Duration,
    /// Take a snapshot and compact the log every this many applied entries.
    pub snapshot_interval: u64,
    /// Most proposals gathered into one log entry.
    pub max_batch: usize,
    /// How long a proposal waits to be applied before failing with `Timeout`.
    pub proposal_timeout: Duration,
}

impl NodeConfig {
    /// Seed defaults: 10 ms tick, 150 ms election timeout, 50 ms heartbeat.
    pub fn new(id: HostId) -> NodeConfig {
        NodeConfig {
            id,
            tick: Duration::from_millis(10),
            election_timeout: Duration::from_millis(150),
            heartbeat_interval: Duration::from_millis(50),
            snapshot_interval: 10_000,
            max_batch: 4096,
            proposal_timeout: Duration::from_secs(3),
        }
    }

    fn ticks(&self, d: Duration) -> usize {
        let t = self.tick.as_nanos().max(1);
        (d.as_nanos().div_ceil(t) as usize).max(1)
    }

    /// Election timeout in ticks.
    pub fn election_ticks(&self) -> usize {
        self.ticks(self.election_timeout)
            .max(self.heartbeat_ticks() + 1)
    }

    /// Heartbeat interval in ticks.
    pub fn heartbeat_ticks(&self) -> usize {
        self.ticks(self.heartbeat_interval)
    }
}

/// Why a proposal did not take effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    /// This node knows no leader, or raft dropped the proposal; retry at the hint.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader {
        /// The leader this node last heard of.
        leader: Option<HostId>,
    },
    /// Not applied within the proposal timeout (no quorum, partition, lost forward).
    /// The command may still commit later.
    #[error("proposal not applied within the timeout")]
    Timeout,
    /// The node thread has stopped.
    #[error("raft node stopped")]
    Stopped,
    /// Committed, but the registry refused it (the same on every node).
    #[error("rejected: {0}")]
    Rejected(#[from] RegistryError),
    /// A membership change raft refused.
    #[error("membership change refused: {0}")]
    ConfChange(String),
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The storage could not be read.
    #[error("raft storage: {0}")]
    Storage(#[from] StorageError),
    /// The snapshot's registry data does not decode.
    #[error("registry snapshot does not decode: {0}")]
    RegistrySnapshot(#[source] serde_json::Error),
    /// raft-rs refused the configuration or state.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The node thread could not be spawned.
    #[error("spawning the raft thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// A node's view of the group, refreshed by the node thread after every step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node.
    pub id: HostId,
    /// `leader`, `follower`, `candidate`, `pre_candidate`, or `stopped`.
    pub role: String,
    /// The leader this node knows of.
    pub leader: Option<HostId>,
    /// Current term.
    pub term: u64,
    /// Voting members.
    pub voters: Vec<HostId>,
    /// Non-voting members.
    pub learners: Vec<HostId>,
    /// Highest log index known committed.
    pub commit_index: u64,
    /// Highest log index applied to the registry.
    pub applied_index: u64,
    /// Index of the latest snapshot (the log is compacted up to it).
    pub snapshot_index: u64,
    /// Last log index held.
    pub last_index: u64,
    /// Size of the latest snapshot this node took (the registry serialized), bytes.
    #[serde(default)]
    pub snapshot_bytes: u64,
    /// How long taking it stalled the node thread (serialize, write and fsync, compact
    /// the log), microseconds.
    #[serde(default)]
    pub snapshot_micros: u64,
    /// Set when the node thread stopped on an error (storage failure).
    pub failure: Option<String>,
    /// Proposals of this node sent to raft again (leader change, lost forward).
    #[serde(default)]
    pub resent: u64,
    /// Log copies of an already applied proposal that this node skipped.
    #[serde(default)]
    pub skipped_copies: u64,
}

/// Proposal identity carried in the log so the origin node can answer its caller, and so
/// a re-sent copy is applied once.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Proposal {
    origin: HostId,
    /// Random per node start, so a replayed old entry never answers a new caller.
    incarnation: u64,
    seq: u64,
    /// The origin was done with every proposal below this one when it sent it (0 in
    /// entries of older builds).
    #[serde(default)]
    low_water: u64,
    cmd: Command,
}

#[derive(Debug, Serialize, Deserialize)]
struct ConfContext {
    origin: HostId,
    incarnation: u64,
    seq: u64,
    addr: Option<String>,
}

/// A caller waiting for its proposal (or membership change) to be applied.
struct Pending {
    reply: Reply,
    deadline: Instant,
    /// The proposal, kept to be re-sent; None for a membership change.
    proposal: Option<Proposal>,
    /// When raft last took it (None: never, so it is in no log).
    sent: Option<Instant>,
}

enum Input {
    Raft(Box<Message>),
    Propose(Command, Reply),
    Conf(ConfChange, Option<String>, Reply),
    Campaign,
    TransferLeader(u64),
    Compact,
    Stop,
}

/// Where transports deliver incoming raft messages for a node.
#[derive(Clone)]
pub struct Mailbox {
    tx: Sender<Input>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mailbox")
    }
}

impl Mailbox {
    /// Hands a message from a peer to the node; false once the node has stopped.
    pub fn deliver(&self, msg: Message) -> bool {
        self.tx.send(Input::Raft(Box::new(msg))).is_ok()
    }
}

struct Shared {
    registry: RwLock<Registry>,
    status: RwLock<NodeStatus>,
}

/// A running raft node. Dropping it stops the thread.
pub struct Node {
    id: HostId,
    tx: Sender<Input>,
    shared: Arc<Shared>,
    storage: DiskStorage,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).finish()
    }
}

/// A mailbox created before its node, so a transport can be wired first.
pub fn mailbox() -> (Mailbox, MailboxReceiver) {
    let (tx, rx) = unbounded();
    (Mailbox { tx: tx.clone() }, MailboxReceiver { tx, rx })
}

/// The receiving half of [`mailbox`], consumed by [`Node::start`].
pub struct MailboxReceiver {
    tx: Sender<Input>,
    rx: Receiver<Input>,
}

impl std::fmt::Debug for MailboxReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MailboxReceiver")
    }
}

impl Node {
    /// Starts the node thread over `storage` (opened, and bootstrapped if this node is a
    /// founding member), sending through `transport`, receiving on `inbox`.
    pub fn start(
        cfg: NodeConfig,
        storage: DiskStorage,
        transport: impl Transport,
        inbox: MailboxReceiver,
    ) -> Result<Node, NodeError> {
        let snap = storage.latest_snapshot();
        let mut registry =
            Registry::from_snapshot(&snap.data).map_err(NodeError::RegistrySnapshot)?;
        let applied = snap.get_metadata().index;
        registry.set_applied_index(applied);
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks(),
            heartbeat_tick: cfg.heartbeat_ticks(),
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_cfg, storage.clone(), &logger)?;
        let shared = Arc::new(Shared {
            registry: RwLock::new(registry),
            status: RwLock::new(NodeStatus {
                id: cfg.id,
                ..Default::default()
            }),
        });
        let mut worker = Worker {
            cfg: cfg.clone(),
            raw,
            storage: storage.clone(),
            transport,
            shared: shared.clone(),
            incarnation: rand::random(),
            seq: 0,
            pending: HashMap::new(),
            batch: Vec::new(),
            seen_leader: (raft::INVALID_ID, 0),
            next_resend_scan: Instant::now(),
            resent: 0,
            skipped_copies: 0,
            snapshot_index: applied,
            force_snapshot: false,
            snapshot_cost: (0, 0),
            wake: Vec::new(),
            waker: None,
            next_expire: Instant::now(),
        };
        worker.waker = spawn_waker(cfg.id);
        let rx = inbox.rx;
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}", cfg.id))
            .spawn(move || worker.run(rx))
            .map_err(NodeError::Spawn)?;
        Ok(Node {
            id: cfg.id,
            tx: inbox.tx,
            shared,
            storage,
            timeout: cfg.proposal_timeout,
            thread: Some(thread),
        })
    }

    /// This node's id.
    pub fn id(&self) -> HostId {
        self.id
    }

    /// Where peers' messages go.
    pub fn mailbox(&self) -> Mailbox {
        Mailbox {
            tx: self.tx.clone(),
        }
    }

    /// Proposes a command and waits until it is applied here, refused, or times out.
    pub fn propose(&self, cmd: Command) -> Result<Applied, ProposeError> {
        self.wait(self.propose_async(cmd))
    }

    /// Proposes without waiting; the [`Answer`] yields the outcome. (A node thread
    /// that has stopped drops the reply unanswered: the answer is `Stopped`.)
    pub fn propose_async(&self, cmd: Command) -> Answer {
        let (tx, rx) = reply();
        let _ = self.tx.send(Input::Propose(cmd, tx));
        rx
    }

    /// Waits for an outcome from [`Node::propose_async`] up to the proposal timeout.
    pub fn wait(&self, rx: Answer) -> Result<Applied, ProposeError> {
        rx.wait(self.timeout)
    }

    /// Adds a voter reachable at `addr` (must be proposed on the leader).
    pub fn add_node(&self, id: HostId, addr: &str) -> Result<(), ProposeError> {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = id;
        self.conf_change(cc, Some(addr.to_owned()))
    }

    /// Removes a member (must be proposed on the leader).
    pub fn remove_node(&self, id: HostId) -> Result<(), ProposeError> {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::RemoveNode);
        cc.node_id = id;
        self.conf_change(cc, None)
    }

    fn conf_change(&self, cc: ConfChange, addr: Option<String>) -> Result<(), ProposeError> {
        let (tx, rx) = reply();
        self.tx
            .send(Input::Conf(cc, addr, tx))
            .map_err(|_| ProposeError::Stopped)?;
        self.wait(rx).map(|_| ())
    }

    /// Starts an election now (tests, and planned leadership moves).
    pub fn campaign(&self) {
        let _ = self.tx.send(Input::Campaign);
    }

    /// Asks this node, if it leads, to hand leadership to `to` (raft's
    /// leader transfer; planned moves and benchmarks).
    pub fn transfer_leader(&self, to: u64) {
        let _ = self.tx.send(Input::TransferLeader(to));
    }

    /// Takes a snapshot at the applied index and compacts the log now, instead of
    /// after the next `snapshot_interval` entries (operators, benchmarks). Returns at
    /// once; `status().snapshot_index` shows when it is done.
    pub fn compact(&self) {
        let _ = self.tx.send(Input::Compact);
    }

    /// The node's current view of the group.
    pub fn status(&self) -> NodeStatus {
        self.shared.status.read().clone()
    }

    /// Reads the registry as applied on this node (may lag the leader).
    pub fn with_registry<R>(&self, f: impl FnOnce(&Registry) -> R) -> R {
        f(&self.shared.registry.read())
    }

    /// The node's storage (for inspection).
    pub fn storage(&self) -> &DiskStorage {
        &self.storage
    }

    /// Stops the node thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.tx.send(Input::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker<T: Transport> {
    cfg: NodeConfig,
    raw: RawNode<DiskStorage>,
    storage: DiskStorage,
    transport: T,
    shared: Arc<Shared>,
    incarnation: u64,
    seq: u64,
    pending: HashMap<u64, Pending>,
    /// Sequence numbers of pending proposals to hand to raft in the next entry.
    batch: Vec<u64>,
    /// The (leader, term) the pending proposals were last sent under.
    seen_leader: (HostId, u64),
    /// When to look for proposals that waited too long.
    next_resend_scan: Instant,
    resent: u64,
    skipped_copies: u64,
    snapshot_index: u64,
    /// Set when membership changed: the next snapshot must carry the new conf state,
    /// because raft-rs refuses a snapshot whose conf state lacks the receiving node, and
    /// a joining node is brought up by one.
    force_snapshot: bool,
    /// Bytes and microseconds of the latest snapshot taken (for the status).
    snapshot_cost: (u64, u64),
    /// Callers answered in this round, still to be woken.
    wake: Vec<Thread>,
    /// The waker thread: wakes the callers of a round's answers, so the raft thread
    /// goes on with the next round meanwhile (None: it could not be spawned, the raft
    /// thread wakes them itself).
    waker: Option<(Sender<Vec<Thread>>, JoinHandle<()>)>,
    /// When to look for proposals past their deadline next.
    next_expire: Instant,
}

/// Rounds that answer at most this many callers wake them on the raft thread (one
/// hand-off to the waker thread costs about as much as a few wake-ups).
const WAKE_INLINE: usize = 4;

/// Starts the thread that unparks answered callers. With a thousand proposals in
/// flight, waking each caller (a futex wake and, on a small host, a context switch)
/// was the largest item of the leader's raft thread (`perf`, docs/scale.md): done on
/// the raft thread it lengthened every commit round by the wake-ups of the last.
fn spawn_waker(id: HostId) -> Option<(Sender<Vec<Thread>>, JoinHandle<()>)> {
    let (tx, rx) = unbounded::<Vec<Thread>>();
    let h = std::thread::Builder::new()
        .name(format!("raft-wake-{id}"))
        .stack_size(64 << 10)
        .spawn(move || {
            for round in rx {
                for t in round {
                    t.unpark();
                }
            }
        })
        .ok()?;
    Some((tx, h))
}

impl<T: Transport> Worker<T> {
    fn run(&mut self, rx: Receiver<Input>) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        let result = loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let mut stop = false;
            match rx.recv_timeout(wait) {
                Ok(input) => stop |= self.handle(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            while !stop {
                match rx.try_recv() {
                    Ok(input) => stop |= self.handle(input),
                    Err(_) => break,
                }
            }
            if stop {
                break Ok(());
            }
            self.flush_batch();
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick += self.cfg.tick;
                if next_tick < now {
                    next_tick = now + self.cfg.tick;
                }
            }
            if let Err(e) = self.on_ready() {
                break Err(e);
            }
            self.resend(now);
            if let Err(e) = self.on_ready() {
                break Err(e);
            }
            self.expire(now);
            self.wake_callers();
            self.publish_status(None);
        };
        if let Err(e) = result {
            tracing::error!(node = self.cfg.id, error = %e, "raft node stopped on a storage failure");
            self.publish_status(Some(e.to_string()));
        } else {
            self.publish_status(Some("stopped".into()));
        }
        self.wake_callers();
        if let Some((tx, h)) = self.waker.take() {
            drop(tx);
            let _ = h.join();
        }
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(ProposeError::Stopped));
        }
    }

    /// Answers a caller; it is woken at the end of the round ([`Worker::wake_callers`]).
    fn answer(&mut self, reply: &Reply, r: Result<Applied, ProposeError>) {
        if let Ok(Some(t)) = reply.set(r) {
            self.wake.push(t);
        }
    }

    /// Wakes the callers answered in this round: on the waker thread when there are
    /// many, here when there are a few (or no waker thread).
    fn wake_callers(&mut self) {
        if self.wake.is_empty() {
            return;
        }
        if self.wake.len() > WAKE_INLINE {
            if let Some((tx, _)) = &self.waker {
                if let Err(e) = tx.send(std::mem::take(&mut self.wake)) {
                    self.wake = e.into_inner();
                }
            }
        }
        for t in self.wake.drain(..) {
            t.unpark();
        }
    }

    /// Returns true to stop.
    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Raft(msg) => {
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(node = self.cfg.id, error = %e, "raft message not stepped");
                }
            }
            Input::Propose(cmd, reply) => {
                self.seq += 1;
                let proposal = Proposal {
                    origin: self.cfg.id,
                    incarnation: self.incarnation,
                    seq: self.seq,
                    low_water: 0,
                    cmd,
                };
                self.pending.insert(
                    self.seq,
                    Pending {
                        reply,
                        deadline: Instant::now() + self.cfg.proposal_timeout,
                        proposal: Some(proposal),
                        sent: None,
                    },
                );
                // With no leader known it waits for one (`resend`).
                if self.raw.raft.leader_id != raft::INVALID_ID {
                    self.batch.push(self.seq);
                    if self.batch.len() >= self.cfg.max_batch {
                        self.flush_batch();
                    }
                }
            }
            Input::Conf(cc, addr, reply) => {
                if self.raw.raft.state != StateRole::Leader {
                    let leader = Some(self.raw.raft.leader_id).filter(|&l| l != raft::INVALID_ID);
                    let _ = reply.send(Err(ProposeError::NotLeader { leader }));
                    return false;
                }
                self.seq += 1;
                let ctx = ConfContext {
                    origin: self.cfg.id,
                    incarnation: self.incarnation,
                    seq: self.seq,
                    addr,
                };
                let ctx = serde_json::to_vec(&ctx).unwrap_or_default();
                match self.raw.propose_conf_change(ctx, cc) {
                    Ok(()) => {
                        self.pending.insert(
                            self.seq,
                            Pending {
                                reply,
                                deadline: Instant::now() + self.cfg.proposal_timeout,
                                proposal: None,
                                sent: Some(Instant::now()),
                            },
                        );
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::ConfChange(e.to_string())));
                    }
                }
            }
            Input::Campaign => {
                if let Err(e) = self.raw.campaign() {
                    tracing::debug!(node = self.cfg.id, error = %e, "campaign refused");
                }
            }
            Input::TransferLeader(to) => self.raw.transfer_leader(to),
            Input::Compact => self.force_snapshot = true,
            Input::Stop => return true,
        }
        false
    }

    /// Hands the batched proposals to raft as one entry. If raft drops it (no leader, a
    /// leader transfer under way) they stay pending and are sent again (`resend`).
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.batch);
        // Everything below the oldest pending proposal is answered or given up.
        let low_water = self.pending.keys().min().copied().unwrap_or(self.seq + 1);
        let batch: Vec<Proposal> = seqs
            .iter()
            .filter_map(|s| self.pending.get(s)?.proposal.clone())
            .map(|mut p| {
                p.low_water = low_water;
                p
            })
            .collect();
        if batch.is_empty() {
            return;
        }
        let data = serde_json::to_vec(&batch).unwrap_or_default();
        match self.raw.propose(vec![], data) {
            Ok(()) => {
                let now = Instant::now();
                for s in seqs {
                    if let Some(p) = self.pending.get_mut(&s) {
                        p.sent = Some(now);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(node = self.cfg.id, error = %e, "proposal dropped; kept to be sent again");
            }
        }
    }

    /// Sends pending proposals again: all of them when a leader (or term) appears that
    /// they were not sent under, else those raft never took or that have waited a third
    /// of the proposal timeout (a forward lost on the way). Copies are harmless: the
    /// registry applies a proposal once.
    fn resend(&mut self, now: Instant) {
        let r = &self.raw.raft;
        if self.pending.is_empty() || r.leader_id == raft::INVALID_ID {
            return;
        }
        let leader = (r.leader_id, r.term);
        let changed = leader != self.seen_leader;
        if !changed && now < self.next_resend_scan {
            return;
        }
        self.seen_leader = leader;
        self.next_resend_scan = now + Duration::from_millis(100);
        let stale = self.cfg.proposal_timeout / 3;
        let mut seqs: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.proposal.is_some()
                    && !p.reply.abandoned()
                    && (changed || p.sent.is_none_or(|t| now.duration_since(t) >= stale))
            })
            .map(|(s, _)| *s)
            .filter(|s| !self.batch.contains(s))
            .collect();
        if seqs.is_empty() {
            return;
        }
        seqs.sort_unstable();
        if changed {
            tracing::debug!(
                node = self.cfg.id,
                leader = leader.0,
                term = leader.1,
                proposals = seqs.len(),
                "new leader: sending pending proposals again"
            );
        }
        self.resent += seqs.len() as u64;
        for chunk in seqs.chunks(self.cfg.max_batch.max(1)) {
            self.batch.extend_from_slice(chunk);
            self.flush_batch();
        }
    }

    /// Fails the proposals past their deadline. Looked for once a tick, not on every
    /// message: with a thousand pending a scan per message was a visible cost.
    fn expire(&mut self, now: Instant) {
        if self.pending.is_empty() || now < self.next_expire {
            return;
        }
        self.next_expire = now + self.cfg.tick;
        let leader = Some(self.raw.raft.leader_id).filter(|&l| l != raft::INVALID_ID);
        let mut wake = std::mem::take(&mut self.wake);
        self.pending.retain(|_, p| {
            // A caller that gave up (its wait can end before this thread, slowed by
            // load, reaches the deadline) is dropped too: never sent again.
            if p.deadline <= now || p.reply.abandoned() {
                // Never handed to raft: it is in no log and will never apply.
                let e = match p.sent {
                    None => ProposeError::NotLeader { leader },
                    Some(_) => ProposeError::Timeout,
                };
                if let Ok(Some(t)) = p.reply.set(Err(e)) {
                    wake.push(t);
                }
                false
            } else {
                true
            }
        });
        self.wake = wake;
    }

    /// One `Ready`, in raft-rs's documented order.
    fn on_ready(&mut self) -> Result<(), StorageError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // 1. Messages that need no persistence first (the leader's appends: it may send
        //    before its own write, raft's thesis §10.2.1).
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        // 2. A snapshot from the leader: persist it, load the registry from it.
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_snapshot(snap)?;
        }
        // 3. Apply what is committed (already durable on a quorum and on this node).
        self.apply(ready.take_committed_entries())?;
        // 4. Persist new entries and the hard state, then fsync, before any message that
        //    depends on them (votes, append acks) leaves.
        let mut dirty = false;
        if !ready.entries().is_empty() {
            self.storage.append(ready.entries())?;
            dirty = true;
        }
        if let Some(hs) = ready.hs() {
            self.storage.set_hard_state(hs)?;
            dirty = true;
        }
        if dirty || ready.must_sync() {
            self.storage.sync()?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        // 5. Advance, then the light ready: commit index, messages, more committed entries.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.maybe_snapshot()
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), StorageError> {
        let index = snap.get_metadata().index;
        match Registry::from_snapshot(&snap.data) {
            Ok(mut reg) => {
                reg.set_applied_index(index);
                *self.shared.registry.write() = reg;
            }
            Err(e) => {
                // Every node produced this data; a decode failure means a bug or corruption.
                tracing::error!(node = self.cfg.id, error = %e, "snapshot registry does not decode");
                return Err(StorageError::Snapshot {
                    path: "received".into(),
                    reason: e.to_string(),
                });
            }
        }
        self.storage.apply_snapshot(snap)?;
        self.snapshot_index = index;
        tracing::info!(
            node = self.cfg.id,
            index,
            "installed snapshot from the leader"
        );
        Ok(())
    }

    fn reply(
        &mut self,
        origin: HostId,
        incarnation: u64,
        seq: u64,
        r: Result<Applied, ProposeError>,
    ) {
        if origin == self.cfg.id && incarnation == self.incarnation {
            if let Some(p) = self.pending.remove(&seq) {
                self.answer(&p.reply, r);
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StorageError> {
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if !entry.data.is_empty() {
                        self.apply_normal(&entry);
                    }
                    self.shared.registry.write().set_applied_index(entry.index);
                }
                EntryType::EntryConfChange => {
                    let parsed = ConfChange::decode(&entry.data[..]);
                    let ctx: Option<ConfContext> = serde_json::from_slice(&entry.context).ok();
                    let r = match parsed {
                        Ok(cc) => self.apply_conf_change(&cc, ctx.as_ref()),
                        Err(e) => Err(ProposeError::ConfChange(e.to_string())),
                    };
                    if let Some(ctx) = ctx {
                        self.reply(ctx.origin, ctx.incarnation, ctx.seq, r);
                    }
                    self.shared.registry.write().set_applied_index(entry.index);
                }
                EntryType::EntryConfChangeV2 => {
                    if let Ok(cc) = ConfChangeV2::decode(&entry.data[..]) {
                        match self.raw.apply_conf_change(&cc) {
                            Ok(cs) => self.storage.set_conf_state(&cs)?,
                            Err(e) => tracing::warn!(error = %e, "conf change v2 refused"),
                        }
                    }
                    self.shared.registry.write().set_applied_index(entry.index);
                }
            }
        }
        Ok(())
    }

    fn apply_normal(&mut self, entry: &Entry) {
        let batch: Vec<Proposal> = match serde_json::from_slice(&entry.data) {
            Ok(b) => b,
            Err(e) => {
                // Deterministic on every node: the entry is skipped everywhere.
                tracing::error!(index = entry.index, error = %e, "undecodable log entry skipped");
                return;
            }
        };
        let mut results = Vec::with_capacity(batch.len());
        {
            let mut reg = self.shared.registry.write();
            for p in &batch {
                // A re-sent copy of a proposal applied before: its caller had the answer.
                if !reg
                    .proposers_mut()
                    .first_time(p.origin, p.incarnation, p.seq, p.low_water)
                {
                    tracing::debug!(
                        index = entry.index,
                        origin = p.origin,
                        seq = p.seq,
                        "copy of an applied proposal skipped"
                    );
                    self.skipped_copies += 1;
                    continue;
                }
                let r = reg.apply(entry.index, &p.cmd);
                if let Err(e) = &r {
                    tracing::debug!(index = entry.index, error = %e, "registry refused a command");
                }
                results.push((p, r));
            }
        }
        for (p, r) in results {
            self.reply(
                p.origin,
                p.incarnation,
                p.seq,
                r.map_err(ProposeError::Rejected),
            );
        }
    }

    fn apply_conf_change(
        &mut self,
        cc: &ConfChange,
        ctx: Option<&ConfContext>,
    ) -> Result<Applied, ProposeError> {
        let cs = self
            .raw
            .apply_conf_change(cc)
            .map_err(|e| ProposeError::ConfChange(e.to_string()))?;
        if let Err(e) = self.storage.set_conf_state(&cs) {
            tracing::error!(error = %e, "persisting the conf state failed");
        }
        self.force_snapshot = true;
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if let Some(addr) = ctx.and_then(|c| c.addr.as_deref()) {
                    if cc.node_id != self.cfg.id {
                        self.transport.add_peer(cc.node_id, addr);
                    }
                }
            }
            ConfChangeType::RemoveNode => {
                if cc.node_id != self.cfg.id {
                    self.transport.remove_peer(cc.node_id);
                }
            }
        }
        tracing::info!(node = self.cfg.id, change = ?cc.get_change_type(), target = cc.node_id, "membership changed");
        Ok(Applied::MembershipChanged)
    }

    fn maybe_snapshot(&mut self) -> Result<(), StorageError> {
        let applied = self.raw.raft.raft_log.applied;
        if applied < self.snapshot_index + self.cfg.snapshot_interval && !self.force_snapshot {
            return Ok(());
        }
        self.force_snapshot = false;
        if applied <= self.snapshot_index {
            return Ok(());
        }
        let t = Instant::now();
        let data = self.shared.registry.read().to_snapshot();
        let bytes = data.len() as u64;
        let cs = self.raw.raft.prs().conf().to_conf_state();
        self.storage.create_snapshot(applied, cs, data)?;
        self.snapshot_index = applied;
        self.snapshot_cost = (bytes, t.elapsed().as_micros() as u64);
        tracing::debug!(
            node = self.cfg.id,
            index = applied,
            "snapshot taken, log compacted"
        );
        Ok(())
    }

    fn publish_status(&self, failure: Option<String>) {
        let r = &self.raw.raft;
        let mut cs = r.prs().conf().to_conf_state();
        cs.voters.sort_unstable();
        cs.learners.sort_unstable();
        let role = if failure.is_some() {
            "stopped"
        } else {
            match r.state {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre_candidate",
            }
        };
        let st = NodeStatus {
            id: self.cfg.id,
            role: role.into(),
            leader: Some(r.leader_id).filter(|&l| l != raft::INVALID_ID),
            term: r.term,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            commit_index: r.raft_log.committed,
            applied_index: r.raft_log.applied,
            snapshot_index: self.snapshot_index,
            last_index: r.raft_log.last_index(),
            snapshot_bytes: self.snapshot_cost.0,
            snapshot_micros: self.snapshot_cost.1,
            failure,
            resent: self.resent,
            skipped_copies: self.skipped_copies,
        };
        *self.shared.status.write() = st;
    }
}
