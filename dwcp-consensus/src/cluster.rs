//! The handle an agent embeds: storage + TCP transport + raft node + registry API.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_core::tls::CredentialStore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::net::{TcpTransport, DEFAULT_MAX_FRAME};
use crate::node::{mailbox, Node, NodeConfig, NodeError, NodeStatus, ProposeError, Transport};
use crate::registry::{Applied, Command, GuestRecord, HostId, Migration};
use crate::storage::{DiskStorage, StorageError};

/// A peer as `id=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    /// Node (host) id, non-zero.
    pub id: HostId,
    /// `HOST:PORT` of its raft listener.
    pub addr: String,
}

impl PeerAddr {
    /// Parses `id=HOST:PORT`.
    pub fn parse(s: &str) -> Result<PeerAddr, ClusterError> {
        let bad = || ClusterError::Config(format!("peer {s:?} is not id=HOST:PORT"));
        let (id, addr) = s.trim().split_once('=').ok_or_else(bad)?;
        let id: HostId = id.trim().parse().map_err(|_| bad())?;
        let addr = addr.trim();
        if id == 0
            || addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(bad());
        }
        Ok(PeerAddr {
            id,
            addr: addr.to_owned(),
        })
    }

    /// Parses a comma-separated list of `id=HOST:PORT`.
    pub fn parse_list(s: &str) -> Result<Vec<PeerAddr>, ClusterError> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(PeerAddr::parse)
            .collect()
    }
}

/// What [`Cluster::start`] needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// This node's id (non-zero; the agent's host id).
    pub node_id: HostId,
    /// The founding members, this node included or not (its own entry is ignored).
    pub peers: Vec<PeerAddr>,
    /// Where the raft log and snapshots live.
    pub data_dir: PathBuf,
    /// Shared by all members; frames with another id are refused.
    pub cluster_id: u64,
    /// `HOST:PORT` to listen on for peers.
    pub listen: String,
    /// Join an existing cluster (added by `add_node` on its leader) instead of founding one.
    pub join: bool,
    /// Timing and sizing of the raft node.
    pub node: NodeConfig,
    /// Mutual TLS 1.3 on every peer connection with these credentials (libvirt's
    /// layout: the member's certificates must come from the cluster's CA and name the
    /// host its peers dial). `None` is clear text, only for the agent's `--insecure`.
    #[serde(skip)]
    pub tls: Option<Arc<CredentialStore>>,
}

impl ClusterConfig {
    /// A config with the seed timing (10 ms tick, 150 ms election, 50 ms heartbeat).
    pub fn new(
        node_id: HostId,
        peers: Vec<PeerAddr>,
        data_dir: impl Into<PathBuf>,
        cluster_id: u64,
        listen: &str,
    ) -> ClusterConfig {
        ClusterConfig {
            node_id,
            peers,
            data_dir: data_dir.into(),
            cluster_id,
            listen: listen.to_owned(),
            join: false,
            node: NodeConfig::new(node_id),
            tls: None,
        }
    }

    /// The same config with peer TLS from `tls` (`None`: clear text, `--insecure`).
    pub fn with_tls(mut self, tls: Option<Arc<CredentialStore>>) -> ClusterConfig {
        self.tls = tls;
        self
    }
}

/// Errors of the cluster handle.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Bad configuration.
    #[error("cluster config: {0}")]
    Config(String),
    /// Binding the peer listener failed.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Storage failed to open or bootstrap.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The node failed to start.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A proposal failed.
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// The registry answered something unexpected for the command.
    #[error("unexpected registry answer {0:?}")]
    Unexpected(Applied),
}

/// One member as `dwcp cluster status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node id.
    pub id: HostId,
    /// Its address as this node knows it (empty for itself when unknown).
    pub addr: String,
    /// Voter (true) or learner.
    pub voter: bool,
}

/// `dwcp cluster status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node.
    pub node_id: HostId,
    /// The cluster id.
    pub cluster_id: u64,
    /// This node's raft role.
    pub role: String,
    /// The leader this node knows of.
    pub leader: Option<HostId>,
    /// Current term.
    pub term: u64,
    /// Members.
    pub members: Vec<MemberStatus>,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied to this node's registry.
    pub applied_index: u64,
    /// Latest snapshot (log compacted to here).
    pub snapshot_index: u64,
    /// Last log index.
    pub last_index: u64,
    /// Size of the log file.
    pub log_bytes: u64,
    /// Guests in the registry.
    pub guests: usize,
    /// Migrations with an open intent.
    pub migrating: usize,
    /// Peer frames refused since start.
    pub rejected_frames: u64,
    /// Whether peer connections are mutual TLS (false: `--insecure`, clear text).
    pub peer_tls: bool,
    /// Incoming peer connections refused before any frame reached raft (TLS handshake
    /// failed: no certificate or another CA's, not TLS, timeout; too many connections;
    /// or the certificate does not name the host of the member its frames come from).
    pub refused_connections: u64,
    /// Set when the node stopped on an error.
    pub failure: Option<String>,
    /// This node's proposals sent to raft again (a new leader, a lost forward).
    #[serde(default)]
    pub resent: u64,
    /// Log copies of already applied proposals this node skipped.
    #[serde(default)]
    pub skipped_copies: u64,
}

/// `dwcp guests`: the registry as applied on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestsView {
    /// Raft index the view reflects.
    pub applied_index: u64,
    /// Every guest.
    pub guests: Vec<GuestRecord>,
    /// Finished migrations, oldest first.
    pub history: Vec<Migration>,
}

/// A running cluster member.
#[derive(Debug)]
pub struct Cluster {
    cfg: ClusterConfig,
    node: Node,
    net: TcpTransport,
}

impl Cluster {
    /// Opens the data dir, starts the peer transport on `config.listen`, starts raft.
    pub fn start(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        let listener =
            TcpListener::bind(&config.listen).map_err(|source| ClusterError::Listen {
                addr: config.listen.clone(),
                source,
            })?;
        Cluster::start_with_listener(config, listener)
    }

    /// As [`Cluster::start`] on an already bound listener (tests, port 0).
    pub fn start_with_listener(
        mut config: ClusterConfig,
        listener: TcpListener,
    ) -> Result<Cluster, ClusterError> {
        if config.node_id == 0 {
            return Err(ClusterError::Config("node id 0 is reserved".into()));
        }
        config.node.id = config.node_id;
        let (storage, recovery) = DiskStorage::open(&config.data_dir)?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(
                bytes = recovery.truncated_bytes,
                "raft log had a torn tail, truncated"
            );
        }
        if !storage.is_initialized() && !config.join {
            let mut voters: Vec<HostId> = config.peers.iter().map(|p| p.id).collect();
            voters.push(config.node_id);
            voters.sort_unstable();
            voters.dedup();
            storage.bootstrap(&voters, crate::registry::Registry::new().to_snapshot())?;
        }
        let (mb, inbox) = mailbox();
        let net = TcpTransport::start(
            config.node_id,
            config.cluster_id,
            listener,
            mb,
            DEFAULT_MAX_FRAME,
            config.tls.clone(),
        )
        .map_err(|source| ClusterError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
        for p in &config.peers {
            net.add_peer(p.id, &p.addr);
        }
        let node = match Node::start(config.node.clone(), storage, net.clone(), inbox) {
            Ok(n) => n,
            Err(e) => {
                net.shutdown();
                return Err(e.into());
            }
        };
        Ok(Cluster {
            cfg: config,
            node,
            net,
        })
    }

    /// This node's id.
    pub fn id(&self) -> HostId {
        self.cfg.node_id
    }

    /// The address the peer transport listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.net.local_addr()
    }

    /// The raft node (lower-level access).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The transport (counters).
    pub fn transport(&self) -> &TcpTransport {
        &self.net
    }

    /// Member `id`'s raft address as this node knows it (`--peers`, or `add_node`;
    /// for this node its own entry in `--peers`, else where it listens). None when
    /// unknown.
    pub fn member_addr(&self, id: HostId) -> Option<String> {
        if id == self.cfg.node_id {
            let own = self.cfg.peers.iter().find(|p| p.id == id);
            return Some(own.map_or_else(|| self.net.local_addr().to_string(), |p| p.addr.clone()));
        }
        self.net
            .peers()
            .into_iter()
            .find(|(p, _)| *p == id)
            .map(|(_, a)| a)
    }

    /// Member `id`'s identity: the host part of its raft address
    /// ([`crate::net::peer_host`]), the name its certificates must carry.
    pub fn member_host(&self, id: HostId) -> Option<String> {
        self.member_addr(id)
            .map(|a| crate::net::peer_host(&a).to_string())
    }

    /// Records a guest and its owner.
    pub fn register_guest(&self, guest: Uuid, owner: HostId) -> Result<(), ClusterError> {
        self.node.propose(Command::RegisterGuest { guest, owner })?;
        Ok(())
    }

    /// Records the intent to migrate `guest` from `src` to `dst`; returns the epoch that
    /// commit or abort must name. Refused while the guest migrates or if `src` is not
    /// its owner.
    pub fn begin_migration(
        &self,
        guest: Uuid,
        src: HostId,
        dst: HostId,
    ) -> Result<u64, ClusterError> {
        match self.node.propose(Command::BeginMigration {
            guest,
            source: src,
            destination: dst,
        })? {
            Applied::MigrationBegun { epoch } => Ok(epoch),
            other => Err(ClusterError::Unexpected(other)),
        }
    }

    /// Transfers ownership to the intent's destination. Only after this returns Ok may
    /// the destination release the migration stream's tail.
    pub fn commit_migration(&self, guest: Uuid, epoch: u64) -> Result<(), ClusterError> {
        self.node
            .propose(Command::CommitMigration { guest, epoch })?;
        Ok(())
    }

    /// Abandons the intent; the guest stays with the source.
    pub fn abort_migration(&self, guest: Uuid, epoch: u64) -> Result<(), ClusterError> {
        self.node
            .propose(Command::AbortMigration { guest, epoch })?;
        Ok(())
    }

    /// Returns a committed migration's guest to its source after a late
    /// failure (the destination never got the end of the stream); on an open
    /// intent, an abort.
    pub fn revert_migration(&self, guest: Uuid, epoch: u64) -> Result<(), ClusterError> {
        self.node
            .propose(Command::RevertMigration { guest, epoch })?;
        Ok(())
    }

    /// The guest's record as applied on this node (may lag the leader by a few ms).
    pub fn owner(&self, guest: Uuid) -> Option<GuestRecord> {
        self.node.with_registry(|r| r.guest(&guest).cloned())
    }

    /// All guests and the recent migration history, as applied on this node.
    pub fn guests(&self) -> GuestsView {
        self.node.with_registry(|r| GuestsView {
            applied_index: r.applied_index(),
            guests: r.guests().cloned().collect(),
            history: r.history().cloned().collect(),
        })
    }

    /// Adds a member reachable at `addr` (call on the leader; the new node starts with
    /// `join: true`).
    pub fn add_node(&self, id: HostId, addr: &str) -> Result<(), ClusterError> {
        self.node.add_node(id, addr)?;
        Ok(())
    }

    /// Removes a member (call on the leader).
    pub fn remove_node(&self, id: HostId) -> Result<(), ClusterError> {
        self.node.remove_node(id)?;
        Ok(())
    }

    /// `dwcp cluster status`.
    pub fn status(&self) -> ClusterStatus {
        let st: NodeStatus = self.node.status();
        let addrs = self.net.peers();
        let addr_of = |id: HostId| {
            if id == self.cfg.node_id {
                self.net.local_addr().to_string()
            } else {
                addrs
                    .iter()
                    .find(|(p, _)| *p == id)
                    .map(|(_, a)| a.clone())
                    .unwrap_or_default()
            }
        };
        let mut members: Vec<MemberStatus> = st
            .voters
            .iter()
            .map(|&id| MemberStatus {
                id,
                addr: addr_of(id),
                voter: true,
            })
            .chain(st.learners.iter().map(|&id| MemberStatus {
                id,
                addr: addr_of(id),
                voter: false,
            }))
            .collect();
        members.sort_by_key(|m| m.id);
        let (guests, migrating) = self.node.with_registry(|r| {
            let migrating = r
                .guests()
                .filter(|g| {
                    g.migration
                        .as_ref()
                        .is_some_and(|m| m.state == crate::registry::MigrationState::Intent)
                })
                .count();
            (r.guests().count(), migrating)
        });
        ClusterStatus {
            node_id: self.cfg.node_id,
            cluster_id: self.cfg.cluster_id,
            role: st.role,
            leader: st.leader,
            term: st.term,
            members,
            commit_index: st.commit_index,
            applied_index: st.applied_index,
            snapshot_index: st.snapshot_index,
            last_index: st.last_index,
            log_bytes: self.node.storage().log_bytes(),
            guests,
            migrating,
            rejected_frames: self
                .net
                .stats()
                .rejected
                .load(std::sync::atomic::Ordering::Relaxed),
            peer_tls: self.net.is_tls(),
            refused_connections: self
                .net
                .stats()
                .tls_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            failure: st.failure,
            resent: st.resent,
            skipped_copies: st.skipped_copies,
        }
    }

    /// Moves leadership to voter `to` (planned maintenance: take it off a host
    /// before draining it). Only the leader can hand it over; waits until this
    /// node sees `to` lead, up to `timeout`.
    pub fn transfer_leader(&self, to: HostId, timeout: Duration) -> Result<(), ClusterError> {
        let st = self.node.status();
        if !st.voters.contains(&to) {
            return Err(ClusterError::Config(format!(
                "node {to} is not a voting member (voters: {:?})",
                st.voters
            )));
        }
        if st.leader == Some(to) {
            return Ok(());
        }
        if st.leader != Some(self.cfg.node_id) {
            return Err(ProposeError::NotLeader { leader: st.leader }.into());
        }
        let end = Instant::now() + timeout;
        let mut asked = Instant::now() - Duration::from_secs(1);
        loop {
            // Re-asked now and then: raft drops the transfer if `to` does not
            // catch up within an election timeout.
            if asked.elapsed() >= Duration::from_millis(300) {
                self.node.transfer_leader(to);
                asked = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(5));
            if self.node.status().leader == Some(to) {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(ProposeError::Timeout.into());
            }
        }
    }

    /// Waits until this node knows a leader; returns it.
    pub fn wait_for_leader(&self, timeout: Duration) -> Option<HostId> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.node.status().leader {
                return Some(l);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops raft and the transport.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.node.stop();
        self.net.shutdown();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
