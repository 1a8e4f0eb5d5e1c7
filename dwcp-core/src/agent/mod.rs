//! The per-host agent: relays QEMU migrations between hosts.
//!
//! On the source host the agent owns *routes*: a route `NAME -> DST:PORT`
//! listens on `<run-dir>/NAME.sock`, which QEMU (or libvirt's
//! `--migrateuri unix://`) migrates to. Each connection QEMU opens there (the
//! main channel, then one per multifd channel) joins the route's current
//! session. On the destination host the agent accepts sessions on its data
//! port and connects each channel to `<incoming-dir>/NAME.sock`, where
//! `qemu -incoming unix:...` listens.
//!
//! The agent is driven through a control socket speaking JSON lines:
//! `{"op":"route","name":..,"to":..,...}`, `{"op":"unroute","name":..}`,
//! `{"op":"stats"}`, `{"op":"ping"}`. Each answer has `"ok"`, and `"error"`
//! when it is false.
//!
//! A management layer (the libvirt hook) tells the agent what it decided for
//! a migration before the data arrives: `{"op":"prepare","name":DOM,
//! "uuid":..,"transport":"tcp","streams":N,"codec":C,"source_host":..,
//! "chosen_by":..}`, then `{"op":"started","name":DOM}` and
//! `{"op":"release","name":DOM,"outcome":"ok"|"failed","reason":..}`. The
//! agent keeps the newest [`KEEP_PREPARED`] of these (`prepared` → `started`
//! → `released` | `failed`), links each to the session that relays a
//! migration of that name (which ends it: completed → `released`, failed →
//! `failed`), shows both in `stats`, and a `route` request without its own
//! streams/codec takes those of the name's active prepared entry.
//!
//! An agent that is a cluster member (see [`ClusterOps`]) also answers
//! `{"op":"cluster_status"}`, `{"op":"guests"}`,
//! `{"op":"begin","guest":UUID,"src":N,"dst":M}` (→ `"epoch"`),
//! `{"op":"commit","guest":UUID,"epoch":E}`, `{"op":"abort","guest":UUID,"epoch":E}`,
//! `{"op":"revert","guest":UUID,"epoch":E}` (a committed migration failed late:
//! the source owns the guest again) and `{"op":"settle","guest":UUID,"epoch":E,
//! "revert_if_committed":BOOL}` (abort, or revert, in the background, retried
//! until the cluster has a quorum), and `{"op":"reconcile","guest":UUID}`: after a
//! failed migration, on the host running the guest again, abort or revert
//! whatever the registry still shows for its latest migration out of here;
//! `{"op":"transfer_leader","to":N}` on the leader hands raft leadership to
//! member N (planned maintenance).
//! An error answer of these ops also has `"kind"` ([`ClusterErrorKind`]).
//! A `prepare` with `"gate": true` (and the
//! guest's `uuid`) gates the migration's cutover on the cluster: see
//! [`cutover`] and docs/consensus.md; its streams are then accepted only
//! from the source the registry's intent names ([`expect`],
//! `NotIntendedSource`).
//!
//! # Modules
//!
//! This module owns the [`Agent`], its configuration and the state its
//! threads share ([`State`]: routes, recent sessions, prepared migrations,
//! recorded intents). Its children use that state; among themselves they
//! depend one way only (`control` → `route`, `prepared` → `cutover` →
//! `cluster`):
//!
//! - [`cluster`]: the [`ClusterOps`] trait and its [`ClusterError`] (a leaf)
//! - [`cutover`]: the cutover gate, settling and reconciliation, and the
//!   cluster ops of the control socket
//! - `prepared`: the prepared-migration table and `prepare`/`started`/`release`
//! - `route`: the source side, routes and `route`/`unroute`
//! - `accept`: the destination side, the data port
//! - [`nova`]: Nova's redirected TCP connections on the source (the
//!   ingress) and TCP delivery to QEMU on the destination (`--deliver-tcp`)
//! - [`control`]: the control socket: the request enum, dispatch, and the
//!   client ([`control_request`])

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tracing::{error, info, warn};

use crate::transport::{AcceptorLimits, Session, SessionStats, TransportConfig};

mod accept;
pub mod cluster;
pub mod control;
pub mod cutover;
pub mod expect;
pub mod nova;
mod prepared;
pub mod progress;
mod route;
pub mod sockets;

pub use cluster::{ClusterError, ClusterErrorKind, ClusterOps};
pub use control::{
    control_call, control_call_within, control_request, newest_session, settled_session,
    ControlError,
};
pub use expect::AllowRule;
pub use nova::NovaConfig;
pub use prepared::{PrepState, KEEP_PREPARED};
pub use progress::{DowntimeObserver, MigrationProgress};
pub use sockets::SocketAccess;

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// TCP address of the data port (destination role); None = source only.
    pub listen: Option<SocketAddr>,
    /// Directory of route sockets (`NAME.sock`) and the control socket.
    pub run_dir: PathBuf,
    /// Directory where QEMU's incoming sockets are (`NAME.sock`).
    pub incoming_dir: PathBuf,
    /// Defaults for new routes, and the destination's transport settings.
    pub transport: TransportConfig,
    pub limits: AcceptorLimits,
    /// The raft cluster this agent is a member of, if any (the `dwcp` binary
    /// implements it on `dwcp_consensus::Cluster`; the engine stays free of raft).
    pub cluster: Option<Arc<dyn ClusterOps>>,
    /// How long a gated session keeps trying to commit the ownership
    /// transfer before the gate closes (`prepare` with `"gate": true`).
    pub gate_timeout: Duration,
    /// `--allow NAME_GLOB[=PEER]`: migrations accepted without an `expect`
    /// or `prepare` (see [`expect`]).
    pub allow: Vec<AllowRule>,
    /// `--socket-group`, `--socket-mode`: who may use the route sockets and
    /// create QEMU's incoming sockets ([`sockets`]).
    pub sockets: SocketAccess,
    /// Nova's migrations: the source's ingress, the destination's TCP
    /// delivery ([`nova`]).
    pub nova: NovaConfig,
}

impl AgentConfig {
    pub fn control_path(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
}

/// What the agent's threads share.
struct State {
    cfg: AgentConfig,
    routes: Mutex<HashMap<String, Arc<route::Route>>>,
    /// The most recent sessions, newest last (bounded).
    sessions: Mutex<VecDeque<Session>>,
    /// Prepared migrations, newest last (bounded, [`KEEP_PREPARED`]).
    prepared: Mutex<VecDeque<prepared::Prepared>>,
    /// Intents recorded through this agent since it started (`guest@epoch`).
    fresh_intents: Arc<Mutex<HashSet<String>>>,
    /// `commit` requests under way (shown in `stats`).
    commits_in_flight: AtomicUsize,
    /// Set by [`Agent::shutdown`]: new sessions, routes and prepares are refused.
    draining: AtomicBool,
    /// Called with each session's final figures when it ends
    /// ([`Agent::on_session_end`]; the metrics endpoint counts outcomes).
    observers: Mutex<Vec<SessionObserver>>,
    /// Migrations announced with `expect` ([`expect`]).
    expected: Mutex<Vec<expect::Expectation>>,
    /// What the migrations' drivers reported ([`progress`]), by session id.
    progress: Mutex<progress::Reports>,
    /// Called once per session when its downtime is first reported.
    downtime_observers: Mutex<Vec<DowntimeObserver>>,
    /// What the Nova ingress did ([`nova`]).
    ingress: nova::IngressStats,
}

/// A callback run once per session, with its final figures, when it ends
/// (on the thread that watched it; keep it short).
pub type SessionObserver = Arc<dyn Fn(&SessionStats) + Send + Sync>;

const KEEP_SESSIONS: usize = 32;

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
        .unwrap_or(0.0)
}

/// Why new work is refused while the agent shuts down.
const DRAINING: &str = "the agent is shutting down: no new migrations";

impl State {
    /// Err while the agent shuts down ([`Agent::shutdown`]).
    fn check_not_draining(&self) -> Result<(), String> {
        if self.draining() {
            return Err(DRAINING.to_string());
        }
        Ok(())
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Sessions that have not ended yet.
    fn live_sessions(&self) -> Vec<Session> {
        self.sessions
            .lock()
            .iter()
            .filter(|s| !s.is_finished())
            .cloned()
            .collect()
    }

    fn remember(&self, s: &Session) {
        let mut v = self.sessions.lock();
        if v.len() >= KEEP_SESSIONS {
            v.pop_front();
        }
        v.push_back(s.clone());
        drop(v);
        self.link_session(s);
    }

    /// Waits for a session to end, logs how it went, and ends its prepared
    /// entry with it.
    fn watch_session(&self, session: Session) {
        let result = match session.wait() {
            Ok(s) => {
                if s.role == crate::transport::Role::Responder {
                    self.expectation_used(&s.name, session.started());
                }
                info!(
                    name = %s.name,
                    "session done: {} raw bytes out, {} in, {} on the wire out, ratio {:.2}, {:.2} s",
                    s.raw_out, s.raw_in, s.wire_out, s.ratio_out, s.elapsed_s
                );
                Ok(())
            }
            Err(e) => {
                error!(name = session.name(), "{e}");
                Err(e.to_string())
            }
        };
        self.session_ended(&session, &result);
        let observers = self.observers.lock().clone();
        if !observers.is_empty() {
            let last = session.stats();
            for o in &observers {
                o(&last);
            }
        }
        self.retire(&session);
    }

    /// Replaces every handle the agent keeps of an ended session (its
    /// history, the prepared entry, the route's current session) with a
    /// retired one ([`Session::retired`]): the figures stay for `stats`, the
    /// sockets close. Without this an agent holds every remembered
    /// migration's streams and QEMU sockets open.
    fn retire(&self, session: &Session) {
        let retired = session.retired();
        for s in self.sessions.lock().iter_mut() {
            if s.same(session) {
                *s = retired.clone();
            }
        }
        self.retire_prepared(session, &retired);
        // Not nested in another lock: `attach` takes a route's `current`
        // and then the history's.
        let routes: Vec<Arc<route::Route>> = self.routes.lock().values().cloned().collect();
        for r in routes {
            r.retire(session, &retired);
        }
    }

    /// Remembers an intent recorded through this agent (`guest@epoch`): in
    /// memory, and in `<run-dir>/intents`, so that after a restart the agent
    /// aborts exactly its own orphans ([`cutover::reconcile_on_start`]).
    fn record_intent(&self, key: &str) {
        self.fresh_intents.lock().insert(key.to_string());
        let path = self.cfg.run_dir.join("intents");
        let line = format!("{key}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            warn!("recording intent {key} in {}: {e}", path.display());
        }
    }
}

/// A running agent. Dropping it does not stop its threads; the process owns it.
#[derive(Clone)]
pub struct Agent {
    state: Arc<State>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("run_dir", &self.state.cfg.run_dir)
            .finish()
    }
}

/// Errors starting the agent; each names the path or address involved.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what} {path}: {source}")]
    Path {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("binding data port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("binding the Nova ingress {addr}: {source}")]
    BindIngress {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

impl Agent {
    /// Binds the control socket and the data port and starts serving.
    pub fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        cfg.transport
            .validate()
            .map_err(|e| AgentError::Config(e.to_string()))?;
        // QEMU creates its incoming sockets in the incoming directory; the
        // run directory only needs to let it reach the route sockets.
        let run_mode = if cfg.run_dir == cfg.incoming_dir {
            sockets::INCOMING_DIR_MODE
        } else {
            sockets::RUN_DIR_MODE
        };
        for (what, dir, mode) in [
            ("run directory", &cfg.run_dir, run_mode),
            (
                "incoming directory",
                &cfg.incoming_dir,
                sockets::INCOMING_DIR_MODE,
            ),
        ] {
            sockets::prepare_dir(dir, &cfg.sockets, mode).map_err(|source| AgentError::Path {
                what,
                path: dir.display().to_string(),
                source,
            })?;
        }
        let control = cfg.control_path();
        let ctl = bind_unix(&control, "control socket")?;
        let data = match cfg.listen {
            Some(addr) => {
                let l =
                    TcpListener::bind(addr).map_err(|source| AgentError::Bind { addr, source })?;
                sockets::deepen_backlog(&l);
                Some(l)
            }
            None => None,
        };
        let ingress = match cfg.nova.ingress {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .map_err(|source| AgentError::BindIngress { addr, source })?,
            ),
            None => None,
        };
        let state = Arc::new(State {
            cfg,
            routes: Mutex::new(HashMap::new()),
            sessions: Mutex::new(VecDeque::new()),
            prepared: Mutex::new(VecDeque::new()),
            fresh_intents: Arc::new(Mutex::new(HashSet::new())),
            commits_in_flight: Default::default(),
            draining: AtomicBool::new(false),
            observers: Mutex::new(Vec::new()),
            expected: Mutex::new(Vec::new()),
            progress: Mutex::new(progress::Reports::new()),
            downtime_observers: Mutex::new(Vec::new()),
            ingress: Default::default(),
        });
        if let Some(c) = &state.cfg.cluster {
            // Intents this agent recorded before it (re)started.
            let path = state.cfg.run_dir.join("intents");
            let earlier: HashSet<String> = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect();
            let _ = std::fs::remove_file(&path);
            cutover::reconcile_on_start(c.clone(), earlier, state.fresh_intents.clone());
        }
        if let Some(l) = data {
            info!(
                "data port listening on {}",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            );
            let st = state.clone();
            std::thread::Builder::new()
                .name("dwcp-accept".into())
                .spawn(move || accept::accept_loop(st, l))
                .expect("spawn");
        }
        if let Some(l) = ingress {
            let n = &state.cfg.nova;
            info!(
                "nova ingress listening on {}: redirected connections to ports {}-{} go to the \
                 destination agents' port {}",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                n.ports.start(),
                n.ports.end(),
                n.peer_port
            );
            let st = state.clone();
            std::thread::Builder::new()
                .name("dwcp-nova-in".into())
                .spawn(move || nova::ingress_loop(st, l))
                .expect("spawn");
        }
        let st = state.clone();
        std::thread::Builder::new()
            .name("dwcp-control".into())
            .spawn(move || control::serve(st, ctl))
            .expect("spawn");
        info!("control socket {}", control.display());
        Ok(Agent { state })
    }

    /// Adds (or replaces) a route and returns its socket path.
    pub fn add_route(
        &self,
        name: &str,
        to: SocketAddr,
        cfg: TransportConfig,
    ) -> Result<PathBuf, String> {
        route::add_route(&self.state, name, to, cfg, "request")
    }

    /// The most recent sessions (running and ended, newest last; bounded):
    /// what `stats` shows. Reading their [`Session::stats`] costs what a
    /// `stats` request does; nothing on the data path.
    pub fn sessions(&self) -> Vec<Session> {
        self.state.sessions.lock().iter().cloned().collect()
    }

    /// Runs `f` with the final figures of every session that ends from now on.
    pub fn on_session_end(&self, f: SessionObserver) {
        self.state.observers.lock().push(f);
    }

    /// Runs `f` once per session, when the driver of its migration first
    /// reports the guest's downtime ([`progress`]).
    pub fn on_downtime(&self, f: DowntimeObserver) {
        self.state.downtime_observers.lock().push(f);
    }

    /// The latest progress report of the session with this id, if any.
    pub fn progress(&self, session: &str) -> Option<MigrationProgress> {
        self.state.progress.lock().get(session).cloned()
    }

    /// The number of routes.
    pub fn route_count(&self) -> usize {
        self.state.routes.lock().len()
    }

    /// Kept copies for re-migration and their pages (None: the agent keeps
    /// none, `--keep-mb 0`).
    pub fn kept_usage(&self) -> Option<(usize, u64)> {
        self.state.cfg.transport.keep.as_ref().map(|k| k.usage())
    }

    /// The agent's cluster membership, if any.
    pub fn cluster(&self) -> Option<Arc<dyn ClusterOps>> {
        self.state.cfg.cluster.clone()
    }
}

impl Agent {
    /// Re-reads the TLS credentials (SIGHUP, `{"op":"reload_tls"}`):
    /// sessions from now on use the new ones, those in flight keep theirs;
    /// on failure the old ones stay and the error names the file.
    pub fn reload_tls(&self) -> Result<String, String> {
        reload_tls(&self.state)
    }
}

fn reload_tls(st: &State) -> Result<String, String> {
    let Some(store) = &st.cfg.transport.tls.store else {
        return Err(if st.cfg.transport.tls.insecure {
            "the agent runs with --insecure: no TLS credentials to reload".into()
        } else {
            "no TLS credentials loaded".into()
        });
    };
    match store.reload() {
        Ok(c) => {
            let msg = format!(
                "TLS credentials reloaded from {} (generation {}): server {}, client {}",
                store.dir().display(),
                store.generation(),
                c.server_identity(),
                c.client_identity()
            );
            info!("{msg}");
            Ok(msg)
        }
        Err(e) => {
            let msg = format!("TLS reload failed, keeping the credentials in force: {e}");
            error!("{msg}");
            Err(msg)
        }
    }
}

/// What [`Agent::shutdown`] did with the migrations it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Sessions that ended by themselves within the grace period.
    pub drained: usize,
    /// Sessions still running at its end, failed with a reason.
    pub aborted: usize,
}

impl Agent {
    /// Shuts the agent down without failing a migration silently: from now
    /// on new sessions (data port and routes), routes and prepares are
    /// refused with a reason; migrations in flight get `grace` to finish;
    /// those still running then fail with "the agent is shutting down" (the
    /// peer gets an abort; the source guest keeps running). The control
    /// socket keeps answering `stats` meanwhile.
    pub fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let st = &self.state;
        st.draining.store(true, Ordering::Release);
        let at_start = st.live_sessions().len();
        info!("shutting down: {at_start} migration(s) in flight, {grace:?} to finish");
        let deadline = std::time::Instant::now() + grace;
        while !st.live_sessions().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let left = st.live_sessions();
        for s in &left {
            warn!(name = s.name(), "failing the migration: {DRAINING}");
            s.abort(DRAINING);
        }
        for s in &left {
            let _ = s.wait();
        }
        ShutdownReport {
            drained: at_start.saturating_sub(left.len()),
            aborted: left.len(),
        }
    }
}

fn bind_unix(path: &Path, what: &'static str) -> Result<UnixListener, AgentError> {
    // Root's alone; a stale socket of a dead agent is replaced, a live one refused.
    sockets::bind_with(path, None, sockets::CONTROL_SOCKET_MODE).map_err(|source| {
        AgentError::Path {
            what,
            path: path.display().to_string(),
            source,
        }
    })
}

// Lenient request fields, for the ops whose fields were always read loosely
// (`req["k"].as_u64()` and the like): a field of another JSON type counts as
// missing, so the handler's own message ("missing or non-numeric ...") is
// what the client sees, as before the request enum. Use with
// `#[serde(default, deserialize_with = "...")]`.

/// A number that fits u64, else None.
fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Value::deserialize(d)?.as_u64())
}

/// A string, else None.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Value::deserialize(d)?.as_str().map(str::to_string))
}

/// A string, else "".
fn lenient_string_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(lenient_string(d)?.unwrap_or_default())
}

/// JSON `true`; anything else is false.
fn lenient_true<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Value::deserialize(d)? == Value::Bool(true))
}

#[cfg(test)]
mod tests;
