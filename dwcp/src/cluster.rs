//! The agent's raft cluster membership (`dwcp agent --node-id ...`), the
//! `dwcp cluster status` / `dwcp guests` commands, and the QMP cutover gate
//! that `dwcp migrate --gate` runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use dwcp_consensus::{
    Cluster, ClusterConfig, ClusterError as RaftError, PeerAddr, ProposeError, RegistryError,
};
use dwcp_core::agent::{control_call, ClusterError, ClusterErrorKind, ClusterOps};
use dwcp_core::qemu::{MigrationResult, Qmp};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Cluster membership flags of `dwcp agent` (all or none).
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// This agent's node (host) id in the raft cluster, non-zero.
    #[arg(long, env = "DWCP_NODE_ID")]
    pub node_id: Option<u64>,
    /// Cluster id shared by all members (peer frames with another id are
    /// refused); better set in the configuration file ([cluster] cluster_id)
    /// or DWCP_CLUSTER_ID than on a command line.
    #[arg(long, env = "DWCP_CLUSTER_ID")]
    pub cluster_id: Option<u64>,
    /// IP:PORT the raft peer transport listens on.
    #[arg(long)]
    pub raft_listen: Option<SocketAddr>,
    /// The founding members: 1=IP:PORT,2=IP:PORT,3=IP:PORT (this node's own entry is ignored).
    #[arg(long)]
    pub peers: Option<String>,
    /// Directory of the raft log and snapshots.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl ClusterArgs {
    /// Takes each setting not given as a flag from the configuration file.
    pub fn fill_from(&mut self, f: crate::config::ClusterSection) {
        self.node_id = self.node_id.or(f.node_id);
        self.cluster_id = self.cluster_id.or(f.cluster_id);
        self.raft_listen = self.raft_listen.or(f.raft_listen);
        self.peers = self.peers.take().or(f.peers);
        self.data_dir = self.data_dir.take().or(f.data_dir);
    }

    /// None when no cluster flag is given; an error naming the missing ones when
    /// only some are.
    pub fn config(&self) -> Result<Option<ClusterConfig>> {
        let given = [
            ("--node-id", self.node_id.is_some()),
            ("--cluster-id", self.cluster_id.is_some()),
            ("--raft-listen", self.raft_listen.is_some()),
            ("--peers", self.peers.is_some()),
            ("--data-dir", self.data_dir.is_some()),
        ];
        if given.iter().all(|(_, g)| !g) {
            return Ok(None);
        }
        let missing: Vec<&str> = given.iter().filter(|(_, g)| !g).map(|(f, _)| *f).collect();
        if !missing.is_empty() {
            bail!(
                "cluster membership needs all of --node-id, --cluster-id, --raft-listen, --peers and --data-dir; missing {}",
                missing.join(", ")
            );
        }
        let node_id = self.node_id.unwrap_or_default();
        if node_id == 0 {
            bail!("--node-id 0 is reserved; use 1, 2, ...");
        }
        let peers = PeerAddr::parse_list(self.peers.as_deref().unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("--peers: {e}"))?;
        if peers.is_empty() {
            bail!("--peers lists no member");
        }
        Ok(Some(ClusterConfig::new(
            node_id,
            peers,
            self.data_dir.clone().unwrap_or_default(),
            self.cluster_id.unwrap_or_default(),
            &self.raft_listen.map(|a| a.to_string()).unwrap_or_default(),
        )))
    }
}

/// Starts the raft member; the agent's control socket serves it. Peer TLS comes
/// from `cfg.tls` (set it with `cfg.with_tls(Some(store))`; `None` is clear text,
/// for `--insecure` only).
pub fn start(cfg: ClusterConfig) -> Result<Arc<dyn ClusterOps>> {
    let (id, listen, dir) = (cfg.node_id, cfg.listen.clone(), cfg.data_dir.clone());
    let security = match &cfg.tls {
        Some(t) => format!("mutual TLS with {}", t.dir().display()),
        None => "clear text (--insecure)".to_string(),
    };
    let c = Cluster::start(cfg).context("starting the raft cluster member")?;
    tracing::info!(
        node = id,
        "raft member listening on {listen} ({security}), data dir {}",
        dir.display()
    );
    Ok(Arc::new(AgentCluster(c)))
}

#[derive(Debug)]
struct AgentCluster(Cluster);

fn guest_uuid(s: &str) -> Result<Uuid, ClusterError> {
    Uuid::parse_str(s).map_err(|e| ClusterError::invalid(format!("guest {s:?} is not a UUID: {e}")))
}

/// The raft cluster's error as the agent reports it: a refusal by the
/// registry is final (the same on every node; an abort of a committed
/// migration is `AlreadyCommitted`), anything else may pass with a quorum.
fn explain(e: RaftError) -> ClusterError {
    match e {
        RaftError::Propose(ProposeError::NotLeader { leader: None }) => {
            ClusterError::unavailable("no raft leader reachable (no quorum?)")
        }
        RaftError::Propose(ProposeError::Timeout) => ClusterError::unavailable(
            "not committed within the proposal timeout (no quorum, or partitioned)",
        ),
        RaftError::Propose(ProposeError::Rejected(r)) => {
            let kind = match r {
                RegistryError::WasCommitted { .. } => ClusterErrorKind::AlreadyCommitted,
                _ => ClusterErrorKind::Refused,
            };
            ClusterError::new(kind, format!("refused by the registry: {r}"))
        }
        other => ClusterError::unavailable(other.to_string()),
    }
}

impl ClusterOps for AgentCluster {
    fn node_id(&self) -> u64 {
        self.0.id()
    }
    fn status(&self) -> Value {
        serde_json::to_value(self.0.status()).unwrap_or(Value::Null)
    }
    fn guests(&self) -> Value {
        serde_json::to_value(self.0.guests()).unwrap_or(Value::Null)
    }
    fn begin(&self, guest: &str, src: u64, dst: u64) -> Result<u64, ClusterError> {
        self.0
            .begin_migration(guest_uuid(guest)?, src, dst)
            .map_err(explain)
    }
    fn commit(&self, guest: &str, epoch: u64) -> Result<(), ClusterError> {
        self.0
            .commit_migration(guest_uuid(guest)?, epoch)
            .map_err(explain)
    }
    fn abort(&self, guest: &str, epoch: u64) -> Result<(), ClusterError> {
        self.0
            .abort_migration(guest_uuid(guest)?, epoch)
            .map_err(explain)
    }
    fn revert(&self, guest: &str, epoch: u64) -> Result<(), ClusterError> {
        self.0
            .revert_migration(guest_uuid(guest)?, epoch)
            .map_err(explain)
    }
    fn owner(&self, guest: &str) -> Option<u64> {
        self.0.owner(guest_uuid(guest).ok()?).map(|r| r.owner)
    }
    fn member_at(&self, ip: std::net::IpAddr) -> Option<u64> {
        // Exactly one member on that host, or no answer.
        let at: Vec<u64> = self
            .0
            .status()
            .members
            .iter()
            .filter(|m| m.addr.parse::<SocketAddr>().is_ok_and(|a| a.ip() == ip))
            .map(|m| m.id)
            .collect();
        (at.len() == 1).then(|| at[0])
    }
    fn member_identity(&self, node: u64) -> Option<String> {
        self.0.member_host(node)
    }
    fn open_intents(&self) -> Vec<(String, u64, u64, u64)> {
        self.0
            .guests()
            .guests
            .iter()
            .filter_map(|g| {
                let m = g.migration.as_ref()?;
                (m.state == dwcp_consensus::MigrationState::Intent)
                    .then(|| (g.guest.to_string(), m.epoch, m.source, m.destination))
            })
            .collect()
    }
    fn transfer_leader(&self, to: u64) -> Result<(), ClusterError> {
        self.0
            .transfer_leader(to, Duration::from_secs(3))
            .map_err(|e| match e {
                RaftError::Config(m) => ClusterError::invalid(m),
                RaftError::Propose(ProposeError::NotLeader { leader }) => {
                    ClusterError::unavailable(format!(
                        "this node does not lead, so it cannot hand leadership over (leader: {})",
                        leader.map_or_else(|| "none known".to_string(), |l| format!("node {l}"))
                    ))
                }
                RaftError::Propose(ProposeError::Timeout) => ClusterError::unavailable(format!(
                    "node {to} did not take the leadership within 3 s"
                )),
                other => explain(other),
            })
    }
}

/// The UUID of a guest known only by its migration name: the first 16 bytes of
/// SHA-256("dwcp-guest:" + name), marked as an RFC 4122 version-8 (custom) UUID.
/// The same name always gives the same UUID.
pub fn uuid_from_name(name: &str) -> Uuid {
    let h = Sha256::digest(format!("dwcp-guest:{name}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    Uuid::from_bytes(b)
}

/// `dwcp cluster ...`
#[derive(clap::Subcommand, Debug)]
pub enum ClusterCmd {
    /// The raft group as the local agent sees it: role, leader, term, members, log.
    Status(ShowArgs),
    /// After a failed migration, on the host where the guest runs again (the
    /// source): abort the open intent, or revert the committed transfer, that
    /// the registry still shows for the guest's latest migration out of here.
    Reconcile(ReconcileArgs),
}

/// Flags of `dwcp cluster reconcile`.
#[derive(Args, Debug)]
pub struct ReconcileArgs {
    /// The guest's UUID (libvirt: `virsh domuuid DOMAIN`).
    #[arg(long)]
    guest: String,
    /// The agent's control socket.
    #[arg(long, default_value = "/run/dwcp/agent.sock")]
    agent: PathBuf,
}

/// Flags of `dwcp cluster status` and `dwcp guests`.
#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The agent's control socket.
    #[arg(long, default_value = "/run/dwcp/agent.sock")]
    agent: PathBuf,
    /// Print the raw JSON (the global --json).
    #[arg(skip)]
    pub json: bool,
}

pub fn cluster_cmd(c: ClusterCmd, json: bool) -> Result<()> {
    let mut a = match c {
        ClusterCmd::Status(a) => a,
        ClusterCmd::Reconcile(r) => {
            let v = control_call(&r.agent, &json!({"op": "reconcile", "guest": r.guest}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            match v["action"].as_str().unwrap_or("none") {
                "none" => println!(
                    "nothing to reconcile for guest {}: {}",
                    r.guest,
                    if v["record"].is_null() {
                        "the registry does not know it".to_string()
                    } else {
                        v["record"].to_string()
                    }
                ),
                act => println!(
                    "guest {}: {act} of epoch {} handed to the agent (it retries until the cluster has a quorum; see dwcp guests)",
                    r.guest, v["epoch"]
                ),
            }
            return Ok(());
        }
    };
    a.json = json;
    let v = control_call(&a.agent, &json!({"op": "cluster_status"}))?;
    let s = &v["status"];
    if a.json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!(
        "node {} of cluster {}: {} (term {}, leader {})",
        s["node_id"],
        s["cluster_id"],
        s["role"].as_str().unwrap_or("?"),
        s["term"],
        s["leader"]
            .as_u64()
            .map(|l| l.to_string())
            .unwrap_or_else(|| "none".into())
    );
    for m in s["members"].as_array().into_iter().flatten() {
        println!(
            "  member {} {} {}",
            m["id"],
            m["addr"].as_str().unwrap_or("?"),
            if m["voter"] == true {
                "voter"
            } else {
                "learner"
            }
        );
    }
    println!(
        "log: commit {} applied {} snapshot {} last {} ({} bytes); guests {}, migrating {}; rejected peer frames {}",
        s["commit_index"], s["applied_index"], s["snapshot_index"], s["last_index"],
        s["log_bytes"], s["guests"], s["migrating"], s["rejected_frames"]
    );
    println!(
        "peer transport: {}; refused peer connections {}",
        if s["peer_tls"] == true {
            "mutual TLS"
        } else {
            "clear text (--insecure)"
        },
        s["refused_connections"]
    );
    if let Some(f) = s["failure"].as_str() {
        println!("FAILED: {f}");
    }
    Ok(())
}

pub fn guests_cmd(a: ShowArgs) -> Result<()> {
    let v = control_call(&a.agent, &json!({"op": "guests"}))?;
    let g = &v["guests"];
    if a.json {
        println!("{}", serde_json::to_string_pretty(g)?);
        return Ok(());
    }
    println!("registry at applied index {}:", g["applied_index"]);
    for r in g["guests"].as_array().into_iter().flatten() {
        let m = &r["migration"];
        let mig = if m.is_null() {
            String::new()
        } else {
            format!(
                "  last migration {} -> {} epoch {} {}",
                m["source"],
                m["destination"],
                m["epoch"],
                m["state"].as_str().unwrap_or("?")
            )
        };
        println!(
            "  {}  owner {}  epoch {}{mig}",
            r["guest"].as_str().unwrap_or("?"),
            r["owner"],
            r["epoch"]
        );
    }
    Ok(())
}

/// The gate's side of a migration: what `dwcp migrate --gate` asked the cluster.
#[derive(Debug)]
pub struct Gate {
    pub agent: PathBuf,
    pub guest: String,
    pub epoch: u64,
    pub src: u64,
    pub dst: u64,
    pub commit_timeout: Duration,
}

impl Gate {
    /// Records the intent (guest, src → dst) before any byte moves. `src`
    /// defaults to the local agent's node id.
    pub fn begin(agent: &Path, guest: &str, src: Option<u64>, dst: u64) -> Result<Gate> {
        let src = match src {
            Some(s) => s,
            None => {
                let v = control_call(agent, &json!({"op": "cluster_status"}))
                    .context("asking the local agent for its node id")?;
                v["status"]["node_id"]
                    .as_u64()
                    .context("the agent's cluster status has no node_id")?
            }
        };
        let v = control_call(
            agent,
            &json!({"op": "begin", "guest": guest, "src": src, "dst": dst}),
        )
        .with_context(|| {
            format!("the cluster refused to begin migrating guest {guest} from host {src} to host {dst}")
        })?;
        let epoch = v["epoch"].as_u64().context("begin answered no epoch")?;
        Ok(Gate {
            agent: agent.to_path_buf(),
            guest: guest.to_string(),
            epoch,
            src,
            dst,
            commit_timeout: Duration::from_secs(5),
        })
    }

    /// Commits the ownership transfer, retrying "no leader" and timeouts until
    /// `commit_timeout`; a refusal by the registry is final (the error is
    /// then the agent's [`dwcp_core::agent::ControlError`], of its kind).
    pub fn commit(&self) -> Result<()> {
        let end = Instant::now() + self.commit_timeout;
        let mut last = String::from("no answer");
        while Instant::now() < end {
            let (tx, rx) = std::sync::mpsc::channel();
            let (agent, req) = (
                self.agent.clone(),
                json!({"op": "commit", "guest": self.guest, "epoch": self.epoch}),
            );
            std::thread::spawn(move || {
                let _ = tx.send(control_call(&agent, &req));
            });
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.kind.is_some_and(ClusterErrorKind::refused_by_registry) => {
                    return Err(e.into())
                }
                Ok(Err(e)) => last = e.message,
                Err(_) => {
                    last = format!("no answer within {:?}", self.commit_timeout);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "ownership transfer not committed within {:?}: {last}",
            self.commit_timeout
        )
    }

    /// The migration failed: the agent aborts the intent, or reverts the
    /// transfer when the commit had gone through, retrying until the cluster
    /// has a quorum. Returns the error text when the agent did not take it.
    pub fn settle(&self) -> Option<String> {
        // The agent may be restarting (it died with the migration): keep
        // asking for a while, since nothing else knows the guest is back.
        let t0 = Instant::now();
        loop {
            match control_call(
                &self.agent,
                &json!({"op": "settle", "guest": self.guest, "epoch": self.epoch,
                        "revert_if_committed": true}),
            ) {
                Ok(_) => return None,
                Err(e)
                    if t0.elapsed() > Duration::from_secs(30)
                        || e.kind == Some(ClusterErrorKind::NotMember) =>
                {
                    return Some(e.message)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

/// `migrate` with QEMU's `pause-before-switchover`: at `pre-switchover` (source
/// stopped, device state not yet sent) `gate` runs; Ok continues, Err cancels
/// (and resumes the source if QEMU left it stopped). Returns the result and the
/// time from pre-switchover to continue, in ms.
pub fn gated_migrate(
    q: &mut Qmp,
    uri: &str,
    timeout: Duration,
    mut progress: impl FnMut(&Value, &mut Qmp) -> Option<Value>,
    mut gate: impl FnMut() -> Result<()>,
) -> Result<(MigrationResult, u64)> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]})),
    )
    .context("enabling pause-before-switchover on the source")?;
    let t0 = Instant::now();
    q.execute("migrate", Some(json!({ "uri": uri })))?;
    let mut gate_ms = None;
    loop {
        let v = q.execute("query-migrate", None)?;
        if let Some(params) = progress(&v, q) {
            dwcp_core::qemu::tune(q, &v, params);
        }
        let status = v["status"].as_str().unwrap_or("");
        match status {
            "completed" => {
                let r = MigrationResult::from_query(&v, t0.elapsed());
                return Ok((r, gate_ms.unwrap_or(0)));
            }
            "failed" | "cancelled" => bail!(
                "QEMU migration {status}: {}",
                v["error-desc"].as_str().unwrap_or("QEMU gave no reason")
            ),
            "pre-switchover" if gate_ms.is_none() => {
                let tg = Instant::now();
                if let Err(e) = gate() {
                    cancel_and_resume(q);
                    return Err(e.context(
                        "cutover gate closed (migration cancelled, the guest stays on the source)",
                    ));
                }
                q.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
                    .context("migrate-continue after the gate")?;
                gate_ms = Some(tg.elapsed().as_millis() as u64);
                continue;
            }
            _ => {}
        }
        if t0.elapsed() > timeout {
            cancel_and_resume(q);
            bail!("did not complete within {timeout:?}; cancelled");
        }
        // Poll fast: at pre-switchover the guest is stopped and waiting for us.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Cancels the migration and makes sure the source guest runs again.
fn cancel_and_resume(q: &mut Qmp) {
    let _ = q.execute("migrate_cancel", None);
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let st = q
            .execute("query-migrate", None)
            .ok()
            .and_then(|v| v["status"].as_str().map(str::to_string))
            .unwrap_or_default();
        if matches!(st.as_str(), "cancelled" | "failed" | "completed" | "") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Ok(st) = q.status() {
        if st != "running" && st != "postmigrate" {
            tracing::warn!("source guest is {st} after the cancel; resuming it");
            let _ = q.execute("cont", None);
        }
    }
}
