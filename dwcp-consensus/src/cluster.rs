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
    /// Incoming peer connections refused before any frame (TLS handshake failed:
    /// no certificate or another CA's, not TLS, timeout; or too many connections).
    pub refused_connections: u64,
    /// Set when the node stopped on an error.
    pub failure: Option<String>,
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
mod tests {
    use super::*;
    use crate::net::encode_frame;
    use dwcp_core::tls::testca::write_test_pki;
    use raft::prelude::{Message, MessageType};
    use std::io::Write;
    use std::path::Path;
    use std::sync::atomic::Ordering;

    /// A fresh CA and certificates for 127.0.0.1 under `dir/name`.
    fn pki(dir: &Path, name: &str) -> Arc<CredentialStore> {
        let d = dir.join(name);
        write_test_pki(&d, &["127.0.0.1", "localhost"]).unwrap();
        Arc::new(CredentialStore::load(&d).unwrap())
    }

    fn three(dir: &Path, cluster_id: u64, tls: Option<Arc<CredentialStore>>) -> Vec<Cluster> {
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
        ls.into_iter()
            .enumerate()
            .map(|(i, l)| {
                let id = i as u64 + 1;
                let cfg =
                    ClusterConfig::new(id, peers.clone(), dir.join(id.to_string()), cluster_id, "")
                        .with_tls(tls.clone());
                Cluster::start_with_listener(cfg, l).unwrap()
            })
            .collect()
    }

    fn leader(cs: &[Cluster]) -> &Cluster {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(c) = cs.iter().find(|c| c.status().role == "leader") {
                return c;
            }
            assert!(Instant::now() < end, "no leader over TCP");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < end, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A vote request with a huge term: stepping it would bump the target's term.
    fn hostile_vote(target: &Cluster) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgRequestVote);
        m.to = target.id();
        m.from = 3;
        m.term = target.status().term + 1000;
        m.log_term = 1000;
        m.index = 1000;
        m
    }

    #[test]
    fn peer_list_parsing() {
        let p = PeerAddr::parse_list("1=host-a:7000, 2=host-b:7000,").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[1],
            PeerAddr {
                id: 2,
                addr: "host-b:7000".into()
            }
        );
        for bad in ["x=1.2.3.4:5", "0=h:1", "1=h", "1=:5", "1=h:99999", "1"] {
            assert!(PeerAddr::parse(bad).is_err(), "{bad}");
        }
    }

    fn migrate_a_guest(tls: bool) {
        let dir = tempfile::tempdir().unwrap();
        let store = tls.then(|| pki(dir.path(), "pki"));
        let cs = three(dir.path(), 0xD3C9, store);
        let l = leader(&cs);
        let g = Uuid::from_u128(0xfeed);
        let epoch = l.begin_migration(g, 1, 2).unwrap();
        assert!(matches!(
            l.begin_migration(g, 1, 3),
            Err(ClusterError::Propose(ProposeError::Rejected(_)))
        ));
        // From a follower: raft forwards the proposal to the leader (once
        // the follower has heard from it).
        let f = cs.iter().find(|c| c.id() != l.id()).unwrap();
        wait_until("follower learns the leader", 5, || {
            f.node().status().leader == Some(l.id())
        });
        f.commit_migration(g, epoch).unwrap();
        wait_until("ownership replicated", 5, || {
            cs.iter().all(|c| c.owner(g).map(|r| r.owner) == Some(2))
        });
        let st = f.status();
        assert_eq!(st.members.len(), 3);
        assert_eq!(st.guests, 1);
        assert_eq!(st.peer_tls, tls);
        assert_eq!(st.refused_connections, 0);
        let json = serde_json::to_string(&st).unwrap();
        assert!(json.contains("\"leader\""));
        let guests = serde_json::to_value(f.guests()).unwrap();
        assert_eq!(guests["guests"][0]["owner"], 2);
        assert_eq!(guests["history"][0]["state"], "committed");
    }

    #[test]
    fn three_nodes_over_tls_migrate_a_guest() {
        migrate_a_guest(true);
    }

    #[test]
    fn three_nodes_insecure_migrate_a_guest() {
        migrate_a_guest(false);
    }

    /// Clear text (`--insecure`): the frame checks are the only gate.
    #[test]
    fn bad_peer_input_is_rejected_and_never_stepped() {
        let dir = tempfile::tempdir().unwrap();
        let cs = three(dir.path(), 77, None);
        let l = leader(&cs);
        let target = cs.iter().find(|c| c.id() != l.id()).unwrap();
        let m = hostile_vote(target);
        let term = target.status().term;
        let addr = target.local_addr();
        let send = |bytes: &[u8]| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let _ = s.write_all(bytes);
            let _ = s.flush();
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut wrong_cluster = Vec::new();
        encode_frame(78, &m, &mut wrong_cluster);
        send(&wrong_cluster);
        let mut bad_crc = Vec::new();
        encode_frame(77, &m, &mut bad_crc);
        let n = bad_crc.len();
        bad_crc[n - 1] ^= 1;
        send(&bad_crc);
        send(b"\x00\x01garbage that is not a frame at all....");
        let mut oversized = Vec::new();
        encode_frame(77, &m, &mut oversized);
        oversized[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        send(&oversized);
        wait_until("frames rejected", 3, || {
            target.transport().stats().rejected.load(Ordering::Relaxed) >= 4
        });
        let st = target.status();
        assert!(
            st.term < term + 1000,
            "a rejected frame reached raft: {st:?}"
        );
        assert_eq!(st.rejected_frames, 4);
        assert!(!st.peer_tls);
        // The cluster still works.
        leader(&cs).register_guest(Uuid::from_u128(1), 1).unwrap();
    }

    /// With TLS, clear-text bytes (even a well-formed frame of this cluster)
    /// never reach the frame parser.
    #[test]
    fn clear_text_peer_is_refused_by_a_tls_member() {
        let dir = tempfile::tempdir().unwrap();
        let cs = three(dir.path(), 77, Some(pki(dir.path(), "pki")));
        let l = leader(&cs);
        let target = cs.iter().find(|c| c.id() != l.id()).unwrap();
        let term = target.status().term;
        let mut frame = Vec::new();
        encode_frame(77, &hostile_vote(target), &mut frame);
        for bytes in [&frame[..], b"\x16\x03\x01garbage, not a client hello"] {
            let mut s = std::net::TcpStream::connect(target.local_addr()).unwrap();
            let _ = s.write_all(bytes);
            let _ = s.flush();
        }
        wait_until("clear-text connections refused", 5, || {
            target.status().refused_connections >= 2
        });
        let st = target.status();
        assert!(st.term < term + 1000, "clear text reached raft: {st:?}");
        assert_eq!(st.rejected_frames, 0, "clear text reached the frame parser");
        leader(&cs).register_guest(Uuid::from_u128(1), 1).unwrap();
    }

    /// Accepts any server certificate: the hostile peer does not care who we are.
    #[derive(Debug)]
    struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// A client presenting `dir`'s client certificate (another CA's) and
    /// trusting any server.
    fn hostile_client(dir: &Path) -> Arc<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("client-cert.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
            .with_client_auth_cert(certs, key)
            .unwrap();
        Arc::new(cfg)
    }

    /// The security issue's case: a raft peer with a certificate from another
    /// CA is refused (logged with its address and the reason), injects
    /// nothing, and the cluster keeps committing; a new member with the
    /// right CA joins.
    #[test]
    fn peer_with_a_certificate_from_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = pki(dir.path(), "pki");
        let evil = pki(dir.path(), "evil-pki");
        let cs = three(dir.path(), 0xC1A5, Some(good.clone()));
        let l = leader(&cs);
        l.register_guest(Uuid::from_u128(1), 1).unwrap();
        let target = cs.iter().find(|c| c.id() != l.id()).unwrap();
        let term = target.status().term;
        let delivered = || {
            cs.iter()
                .map(|c| c.transport().stats().delivered.load(Ordering::Relaxed))
                .sum::<u64>()
        };

        // 1. A hostile client that skips server verification and presents the
        // other CA's client certificate, then writes a well-formed frame of
        // this cluster with the right cluster id.
        let tcp = std::net::TcpStream::connect(target.local_addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let me = tcp.local_addr().unwrap().to_string();
        let mut frame = Vec::new();
        encode_frame(0xC1A5, &hostile_vote(target), &mut frame);
        // TLS 1.3: the client's handshake ends before the server has checked
        // its certificate, so it may get as far as sending records.
        if let Ok(link) =
            dwcp_core::tls::client_handshake(tcp, hostile_client(evil.dir()), "127.0.0.1")
        {
            let mut w = link.writer();
            let _ = w.write_all(&frame);
        }
        wait_until("another CA's client refused", 5, || {
            target.status().refused_connections >= 1
        });
        let why = target
            .transport()
            .stats()
            .last_rejection
            .lock()
            .clone()
            .unwrap_or_default();
        assert!(why.contains(&me), "refusal does not name the peer: {why}");
        // Both test CAs carry the same name, so webpki finds "our" CA as the
        // issuer and the signature check fails; a CA of another name gives
        // "certificate signed by an unknown CA".
        assert!(
            why.contains("signature invalid") || why.contains("unknown CA"),
            "refusal does not say why: {why}"
        );

        // 2. A whole member (node 4) of another CA that lists our members as
        // its peers and campaigns: its connections fail both ways (it does
        // not trust our servers; our servers refuse it).
        let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peers: Vec<PeerAddr> = cs
            .iter()
            .map(|c| PeerAddr {
                id: c.id(),
                addr: c.local_addr().to_string(),
            })
            .collect();
        peers.push(PeerAddr {
            id: 4,
            addr: l4.local_addr().unwrap().to_string(),
        });
        let cfg = ClusterConfig::new(4, peers.clone(), dir.path().join("4"), 0xC1A5, "")
            .with_tls(Some(evil));
        let refused = || {
            cs.iter()
                .map(|c| c.status().refused_connections)
                .sum::<u64>()
        };
        let refused_before = refused();
        let intruder = Cluster::start_with_listener(cfg, l4).unwrap();
        intruder.node().campaign();
        // Its (pre-)vote requests never arrive: every member it dials ends
        // the handshake (it rejects our server certificate with an alert).
        wait_until("the intruder's connections refused", 5, || {
            refused() >= refused_before + 3
        });
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(intruder.status().leader, None);
        assert_ne!(intruder.status().role, "leader");
        let before = delivered();

        // 3. The cluster keeps working and no hostile message was stepped.
        let l = leader(&cs);
        l.register_guest(Uuid::from_u128(2), 2).unwrap();
        let st = target.status();
        assert!(
            st.term < term + 1000,
            "a hostile frame reached raft: {st:?}"
        );
        assert_eq!(st.rejected_frames, 0, "a hostile frame reached the parser");
        assert!(cs.iter().all(|c| c.status().members.len() == 3));
        assert!(delivered() > before, "the members stopped talking");
        intruder.shutdown();

        // 4. A new member with the right CA joins and catches up.
        let l5 = TcpListener::bind("127.0.0.1:0").unwrap();
        let a5 = l5.local_addr().unwrap().to_string();
        let mut cfg = ClusterConfig::new(5, peers[..3].to_vec(), dir.path().join("5"), 0xC1A5, "")
            .with_tls(Some(good));
        cfg.join = true;
        let joiner = Cluster::start_with_listener(cfg, l5).unwrap();
        l.add_node(5, &a5).unwrap();
        l.register_guest(Uuid::from_u128(3), 3).unwrap();
        wait_until("the new member catches up", 10, || {
            joiner.guests().guests.len() == 3
        });
        assert_eq!(joiner.status().refused_connections, 0);
    }

    #[test]
    fn restart_over_tls_keeps_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let store = pki(dir.path(), "pki");
        {
            let cs = three(dir.path(), 5, Some(store.clone()));
            leader(&cs).register_guest(Uuid::from_u128(9), 3).unwrap();
        }
        let cs = three(dir.path(), 5, Some(store));
        let l = leader(&cs);
        wait_until("registry back after restart", 5, || {
            l.owner(Uuid::from_u128(9)).is_some()
        });
        assert_eq!(l.owner(Uuid::from_u128(9)).unwrap().owner, 3);
    }
}
