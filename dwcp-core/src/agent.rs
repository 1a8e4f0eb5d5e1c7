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
//! whatever the registry still shows for its latest migration out of here.
//! A `prepare` with `"gate": true` (and the
//! guest's `uuid`) gates the migration's cutover on the cluster: see
//! [`crate::cutover`] and docs/consensus.md.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{error, info, warn};

use crate::cutover::{reconcile_on_start, settle, AgentGate, Settle};
use crate::transport::{
    Acceptor, AcceptorLimits, CutoverGate, GateProvider, Role, Session, SessionError,
    TransportConfig, MAX_STREAMS,
};
use crate::wire;

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
}

/// The cluster operations the control socket exposes. Guests are UUID strings;
/// errors are the cluster's message, shown to the operator as is.
pub trait ClusterOps: Send + Sync + std::fmt::Debug {
    /// This agent's node (host) id.
    fn node_id(&self) -> u64;
    /// `dwcp cluster status`.
    fn status(&self) -> Value;
    /// `dwcp guests`: the registry as applied on this node.
    fn guests(&self) -> Value;
    /// Records the intent to migrate `guest` from `src` to `dst`; returns its epoch.
    fn begin(&self, guest: &str, src: u64, dst: u64) -> Result<u64, String>;
    /// Transfers ownership to the intent's destination.
    fn commit(&self, guest: &str, epoch: u64) -> Result<(), String>;
    /// Abandons the intent; the guest stays with the source.
    fn abort(&self, guest: &str, epoch: u64) -> Result<(), String>;
    /// Returns a committed migration's guest to its source after a late
    /// failure (an open intent is aborted).
    fn revert(&self, guest: &str, epoch: u64) -> Result<(), String>;
    /// The guest's owner as applied on this node, if the guest is known.
    fn owner(&self, guest: &str) -> Option<u64>;
    /// The member whose raft address has this IP (the host's agent).
    fn member_at(&self, ip: std::net::IpAddr) -> Option<u64>;
    /// Open intents as applied on this node: (guest, epoch, src, dst).
    fn open_intents(&self) -> Vec<(String, u64, u64, u64)>;
}

impl AgentConfig {
    pub fn control_path(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
}

struct Route {
    name: String,
    to: SocketAddr,
    cfg: TransportConfig,
    /// Where streams/codec came from: `request`, `prepared` or `defaults`.
    settings_from: &'static str,
    socket: PathBuf,
    current: Mutex<Option<Session>>,
    stop: AtomicBool,
}

struct State {
    cfg: AgentConfig,
    routes: Mutex<HashMap<String, Arc<Route>>>,
    /// The most recent sessions, newest last (bounded).
    sessions: Mutex<VecDeque<Session>>,
    /// Prepared migrations, newest last (bounded, [`KEEP_PREPARED`]).
    prepared: Mutex<VecDeque<Prepared>>,
    /// Intents recorded through this agent since it started (`guest@epoch`).
    fresh_intents: Arc<Mutex<HashSet<String>>>,
    /// `commit` requests under way (shown in `stats`).
    commits_in_flight: std::sync::atomic::AtomicUsize,
}

const KEEP_SESSIONS: usize = 32;

/// How many prepared migrations the agent remembers (newest kept).
pub const KEEP_PREPARED: usize = 64;
/// Longest `source_host`, `chosen_by` or `reason` accepted, in bytes.
const MAX_TEXT: usize = 256;

/// Where a prepared migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrepState {
    /// Accepted by the management layer; no data yet.
    Prepared,
    /// QEMU is up for it, or its session has begun.
    Started,
    /// Done: its session completed, or released with outcome ok.
    Released,
    /// Its session failed, or released with outcome failed.
    Failed,
}

/// One `prepare`: what the management layer chose for a migration.
struct Prepared {
    name: String,
    uuid: Option<String>,
    transport: String,
    streams: u16,
    codec: String,
    source_host: Option<String>,
    chosen_by: String,
    state: PrepState,
    prepared_at: f64,
    started_at: Option<f64>,
    ended_at: Option<f64>,
    reason: Option<String>,
    /// The session that relays this migration (linked by name).
    session: Option<Session>,
    /// The cutover gate, when the migration is gated by the cluster.
    gate: Option<Arc<AgentGate>>,
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
        .unwrap_or(0.0)
}

/// `zstd:3` -> `zstd`.
fn codec_family(c: &str) -> &str {
    c.split(':').next().unwrap_or(c)
}

impl Prepared {
    fn active(&self) -> bool {
        matches!(self.state, PrepState::Prepared | PrepState::Started)
    }

    fn finish(&mut self, state: PrepState, reason: Option<String>) {
        if state == PrepState::Failed {
            if let Some(g) = &self.gate {
                g.close(reason.as_deref().unwrap_or("failed"));
            }
        }
        self.state = state;
        self.ended_at = Some(now_s());
        self.reason = reason;
    }

    fn to_json(&self) -> Value {
        // What the relaying session actually used: the initiator knows its
        // tier; the responder sees the codec of each frame it receives.
        let used = self.session.as_ref().map(|s| {
            let st = s.stats();
            let codec = match st.role {
                Role::Initiator => st.tier.to_string(),
                Role::Responder => st.codecs_in.dominant().unwrap_or("-").to_string(),
            };
            json!({
                "session": st.session, "role": st.role, "state": st.state,
                "streams": st.streams, "codec": codec, "codecs_in": st.codecs_in,
                "raw_out": st.raw_out, "raw_in": st.raw_in,
                "wire_out": st.wire_out, "wire_in": st.wire_in,
                "elapsed_s": st.elapsed_s, "error": st.error,
            })
        });
        let matches = used.as_ref().and_then(|u| {
            let codec = u["codec"].as_str()?;
            if codec == "-" {
                return None;
            }
            let same_codec =
                self.codec == "auto" || codec_family(codec) == codec_family(&self.codec);
            Some(u["streams"].as_u64() == Some(self.streams as u64) && same_codec)
        });
        json!({
            "name": self.name, "uuid": self.uuid, "transport": self.transport,
            "streams": self.streams, "codec": self.codec,
            "source_host": self.source_host, "chosen_by": self.chosen_by,
            "state": self.state, "prepared_at": self.prepared_at,
            "started_at": self.started_at, "ended_at": self.ended_at,
            "reason": self.reason, "used": used, "used_matches": matches,
            "gate": self.gate.as_ref().map(|g| g.to_json()),
        })
    }
}

impl State {
    fn remember(&self, s: &Session) {
        let mut v = self.sessions.lock();
        if v.len() >= KEEP_SESSIONS {
            v.pop_front();
        }
        v.push_back(s.clone());
        drop(v);
        self.link_session(s);
    }

    /// Remembers an intent recorded through this agent (`guest@epoch`): in
    /// memory, and in `<run-dir>/intents`, so that after a restart the agent
    /// aborts exactly its own orphans ([`reconcile_on_start`]).
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

    /// Links a new session to the active prepared entry of the same name.
    fn link_session(&self, s: &Session) {
        let mut p = self.prepared.lock();
        if let Some(e) = p
            .iter_mut()
            .rev()
            .find(|e| e.name == s.name() && e.active())
        {
            info!(name = e.name, "session linked to the prepared migration");
            e.session = Some(s.clone());
            if e.state == PrepState::Prepared {
                e.state = PrepState::Started;
                e.started_at = Some(now_s());
            }
        }
    }

    /// A session ended: its prepared entry (if still active) ends with it.
    fn session_ended(&self, s: &Session, result: &Result<(), String>) {
        let mut p = self.prepared.lock();
        let same = |e: &Prepared| e.session.as_ref().is_some_and(|x| x.same(s));
        if let Some(e) = p.iter_mut().rev().find(|e| same(e) && e.active()) {
            match result {
                Ok(()) => e.finish(PrepState::Released, Some("session completed".to_string())),
                Err(err) => e.finish(PrepState::Failed, Some(format!("session failed: {err}"))),
            }
            if let Some(g) = &e.gate {
                // A completed session always released its tail; anything
                // else settles the intent (a no-op once released).
                g.close("the migration's session ended before the gate released the tail");
            }
        }
    }

    /// The cutover gate for a session about to start: that of the active
    /// prepared entry of the same name, its intent recorded now if it was
    /// not yet (the source is the member at the peer's address).
    fn gate_for(
        &self,
        name: &str,
        peer: SocketAddr,
    ) -> Result<Option<Arc<dyn CutoverGate>>, String> {
        let gate = self
            .prepared
            .lock()
            .iter()
            .rev()
            .find(|e| e.name == name && e.active())
            .and_then(|e| e.gate.clone());
        let Some(gate) = gate else {
            return Ok(None);
        };
        if let Err(e) = gate.begin_from(peer.ip()) {
            gate.close(&e);
            return Err(e);
        }
        if let Some(epoch) = gate.epoch() {
            self.record_intent(&format!("{}@{epoch}", gate.guest));
        }
        Ok(Some(gate as Arc<dyn CutoverGate>))
    }

    /// The newest active prepared entry called `name`: (streams, codec).
    fn prepared_settings(&self, name: &str) -> Option<(u16, String)> {
        self.prepared
            .lock()
            .iter()
            .rev()
            .find(|e| e.name == name && e.active())
            .map(|e| (e.streams, e.codec.clone()))
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
    #[error("{0}")]
    Config(String),
}

impl Agent {
    /// Binds the control socket and the data port and starts serving.
    pub fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        cfg.transport
            .validate()
            .map_err(|e| AgentError::Config(e.to_string()))?;
        for (what, dir) in [
            ("run directory", &cfg.run_dir),
            ("incoming directory", &cfg.incoming_dir),
        ] {
            std::fs::create_dir_all(dir).map_err(|source| AgentError::Path {
                what,
                path: dir.display().to_string(),
                source,
            })?;
        }
        let control = cfg.control_path();
        let ctl = bind_unix(&control, "control socket")?;
        let data = match cfg.listen {
            Some(addr) => {
                Some(TcpListener::bind(addr).map_err(|source| AgentError::Bind { addr, source })?)
            }
            None => None,
        };
        let state = Arc::new(State {
            cfg,
            routes: Mutex::new(HashMap::new()),
            sessions: Mutex::new(VecDeque::new()),
            prepared: Mutex::new(VecDeque::new()),
            fresh_intents: Arc::new(Mutex::new(HashSet::new())),
            commits_in_flight: Default::default(),
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
            reconcile_on_start(c.clone(), earlier, state.fresh_intents.clone());
        }
        if let Some(l) = data {
            info!(
                "data port listening on {}",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            );
            let st = state.clone();
            std::thread::Builder::new()
                .name("dwcp-accept".into())
                .spawn(move || accept_loop(st, l))
                .expect("spawn");
        }
        let st = state.clone();
        std::thread::Builder::new()
            .name("dwcp-control".into())
            .spawn(move || control_loop(st, ctl))
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
        add_route(&self.state, name, to, cfg, "request")
    }
}

fn bind_unix(path: &Path, what: &'static str) -> Result<UnixListener, AgentError> {
    if path.exists() {
        // A live agent answers; a stale socket from a dead one is replaced.
        if UnixStream::connect(path).is_ok() {
            return Err(AgentError::Path {
                what,
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process is serving it",
                ),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| AgentError::Path {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn accept_loop(st: Arc<State>, l: TcpListener) {
    let mut acceptor = Acceptor::new(
        st.cfg.transport.clone(),
        st.cfg.limits.clone(),
        st.cfg.incoming_dir.clone(),
    );
    if st.cfg.cluster.is_some() {
        let s2 = st.clone();
        let gates: GateProvider = Arc::new(move |name, peer| s2.gate_for(name, peer));
        acceptor = acceptor.with_gates(gates);
    }
    let acceptor = Arc::new(acceptor);
    for conn in l.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!("data port accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = conn
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let (st, acceptor) = (st.clone(), acceptor.clone());
        // Each handshake on its own thread: a slow or hostile peer never
        // holds up others.
        std::thread::spawn(move || match acceptor.handle(conn) {
            Ok(Some(session)) => {
                st.remember(&session);
                watch_session(&st, session);
            }
            Ok(None) => {}
            Err(e) => warn!("data port: rejected connection from {peer}: {e}"),
        });
    }
}

fn watch_session(st: &State, session: Session) {
    let result = match session.wait() {
        Ok(s) => {
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
    st.session_ended(&session, &result);
}

fn add_route(
    st: &Arc<State>,
    name: &str,
    to: SocketAddr,
    cfg: TransportConfig,
    settings_from: &'static str,
) -> Result<PathBuf, String> {
    wire::check_name(name).map_err(|e| e.to_string())?;
    cfg.validate().map_err(|e| e.to_string())?;
    let socket = st.cfg.run_dir.join(format!("{name}.sock"));
    if let Some(old) = st.routes.lock().remove(name) {
        old.stop.store(true, Ordering::Release);
        let _ = UnixStream::connect(&old.socket); // wakes its accept loop
    }
    let _ = std::fs::remove_file(&socket);
    let l =
        UnixListener::bind(&socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
    let route = Arc::new(Route {
        name: name.to_string(),
        to,
        cfg,
        settings_from,
        socket: socket.clone(),
        current: Mutex::new(None),
        stop: AtomicBool::new(false),
    });
    st.routes.lock().insert(name.to_string(), route.clone());
    info!(name, %to, streams = route.cfg.streams, tier = %route.cfg.tier, settings_from, "route added at {}", socket.display());
    let st2 = st.clone();
    std::thread::Builder::new()
        .name(format!("dwcp-route-{name}"))
        .spawn(move || route_loop(st2, route, l))
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

fn route_loop(st: Arc<State>, route: Arc<Route>, l: UnixListener) {
    for conn in l.incoming() {
        if route.stop.load(Ordering::Acquire) {
            return;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(route = %route.name, "accept: {e}");
                continue;
            }
        };
        if let Err(e) = attach(&st, &route, conn) {
            // Dropping the connection makes QEMU's migration fail with a
            // socket error; the source guest keeps running.
            error!(route = %route.name, "cannot relay migration to {}: {e}", route.to);
        }
    }
}

fn attach(st: &Arc<State>, route: &Arc<Route>, conn: UnixStream) -> Result<(), SessionError> {
    let mut current = route.current.lock();
    for _ in 0..2 {
        let session = match current.as_ref() {
            Some(s) if !s.is_finished() => s.clone(),
            _ => {
                let s = Session::connect(&route.cfg, &route.name, route.to)?;
                st.remember(&s);
                let (w, st2) = (s.clone(), st.clone());
                std::thread::spawn(move || watch_session(&st2, w));
                *current = Some(s.clone());
                s
            }
        };
        match session.add_local_channel(
            conn.try_clone()
                .map_err(|e| SessionError::Failed(e.to_string().into()))?,
        ) {
            Ok(_) => return Ok(()),
            Err(SessionError::Finished) => {
                *current = None;
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    Err(SessionError::Finished)
}

/// A route request on the control socket. Unset fields take the agent's defaults.
#[derive(Debug, Deserialize)]
struct RouteRequest {
    name: String,
    to: String,
    streams: Option<u16>,
    codec: Option<String>,
    workers: Option<usize>,
    dedup_cache_mb: Option<u32>,
    congestion: Option<String>,
    window_mb: Option<u32>,
}

fn control_loop(st: Arc<State>, l: UnixListener) {
    for conn in l.incoming().flatten() {
        let st = st.clone();
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(300)));
            let mut w = match conn.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            // Bounded lines: a request over 64 KiB is refused.
            let mut r = BufReader::new(conn).take(64 << 10);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                let answer = handle_control(&st, line.trim());
                let mut text = answer.to_string();
                text.push('\n');
                if w.write_all(text.as_bytes()).is_err() {
                    return;
                }
                line.clear();
                r.set_limit(64 << 10);
            }
        });
    }
}

use std::io::Read as _;

fn handle_control(st: &Arc<State>, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("request is not JSON: {e}")}),
    };
    match req["op"].as_str().unwrap_or("") {
        "ping" => json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}),
        "stats" => {
            let sessions: Vec<Value> = st
                .sessions
                .lock()
                .iter()
                .map(|s| serde_json::to_value(s.stats()).unwrap_or(Value::Null))
                .collect();
            let routes: Vec<Value> = st
                .routes
                .lock()
                .values()
                .map(|r| json!({"name": r.name, "to": r.to.to_string(), "socket": r.socket, "streams": r.cfg.streams, "codec": r.cfg.codec_name(), "settings_from": r.settings_from}))
                .collect();
            let prepared: Vec<Value> = st.prepared.lock().iter().map(Prepared::to_json).collect();
            json!({"ok": true, "sessions": sessions, "routes": routes, "prepared": prepared,
                   "commits_in_flight": st.commits_in_flight.load(Ordering::Relaxed)})
        }
        "unroute" => {
            let name = req["name"].as_str().unwrap_or("");
            match st.routes.lock().remove(name) {
                Some(r) => {
                    r.stop.store(true, Ordering::Release);
                    let _ = UnixStream::connect(&r.socket);
                    let _ = std::fs::remove_file(&r.socket);
                    json!({"ok": true})
                }
                None => json!({"ok": false, "error": format!("no route named {name:?}")}),
            }
        }
        "route" => match route_from_request(st, req) {
            Ok(path) => json!({"ok": true, "socket": path}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        op @ ("prepare" | "started" | "release") => {
            let r = match op {
                "prepare" => prepare(st, req.clone()),
                "started" => started(st, &req),
                _ => release(st, req.clone()),
            };
            r.unwrap_or_else(|e| {
                warn!("{op} refused: {e}");
                json!({"ok": false, "error": format!("{op}: {e}")})
            })
        }
        op @ ("cluster_status" | "guests" | "begin" | "commit" | "abort" | "revert" | "settle"
        | "reconcile") => cluster_control(st, op, &req),
        other => {
            json!({"ok": false, "error": format!("unknown op {other:?}: use route, unroute, stats, ping, prepare, started, release, cluster_status, guests, begin, commit or abort")})
        }
    }
}

fn cluster_control(st: &Arc<State>, op: &str, req: &Value) -> Value {
    let Some(c) = st.cfg.cluster.as_ref() else {
        return json!({"ok": false, "error": format!("{op}: this agent is not a cluster member (start it with --node-id, --cluster-id, --raft-listen, --peers and --data-dir)")});
    };
    let guest = req["guest"].as_str().unwrap_or("");
    let num = |k: &str| {
        req[k]
            .as_u64()
            .ok_or_else(|| format!("{op}: missing or non-numeric {k:?}"))
    };
    let r = match op {
        "cluster_status" => Ok(json!({"ok": true, "status": c.status()})),
        "guests" => Ok(json!({"ok": true, "guests": c.guests()})),
        "begin" => (|| {
            let src = num("src")?;
            let dst = num("dst")?;
            let epoch = c.begin(guest, src, dst)?;
            st.record_intent(&format!("{guest}@{epoch}"));
            info!(guest, src, dst, epoch, "migration intent committed");
            Ok(json!({"ok": true, "epoch": epoch}))
        })(),
        "commit" => num("epoch").and_then(|e| {
            st.commits_in_flight.fetch_add(1, Ordering::AcqRel);
            if let Some(d) = crate::cutover::failpoint_delay() {
                std::thread::sleep(d);
            }
            let r = c.commit(guest, e);
            st.commits_in_flight.fetch_sub(1, Ordering::AcqRel);
            r?;
            info!(guest, epoch = e, "ownership transfer committed");
            Ok(json!({"ok": true}))
        }),
        "reconcile" => {
            // After a failed migration, on the host where the guest runs
            // again (the source): close what the registry still shows for
            // the guest's latest migration out of this host.
            let me = c.node_id();
            let rec = c.guests()["guests"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|g| g["guest"].as_str() == Some(guest))
                .cloned();
            let m = rec
                .as_ref()
                .map(|r| r["migration"].clone())
                .unwrap_or(Value::Null);
            let action = match (
                m["source"].as_u64(),
                m["state"].as_str(),
                m["epoch"].as_u64(),
            ) {
                (Some(src), Some("intent"), Some(e)) if src == me => {
                    Some((e, Settle::Abort, "abort"))
                }
                (Some(src), Some("committed"), Some(e)) if src == me => {
                    Some((e, Settle::Revert, "revert"))
                }
                _ => None,
            };
            match action {
                Some((e, how, name)) => {
                    info!(
                        guest,
                        epoch = e,
                        "reconcile: the guest runs on this host (the source) again: {name}"
                    );
                    settle(c.clone(), guest.to_string(), e, how, None);
                    Ok(json!({"ok": true, "action": name, "epoch": e}))
                }
                None => Ok(json!({"ok": true, "action": "none", "record": rec})),
            }
        }
        "settle" => num("epoch").map(|e| {
            // In the background, retried until the cluster has a quorum.
            let how = if req["revert_if_committed"] == true {
                Settle::AbortOrRevert
            } else {
                Settle::Abort
            };
            settle(c.clone(), guest.to_string(), e, how, None);
            json!({"ok": true, "queued": true})
        }),
        "revert" => num("epoch").and_then(|e| {
            c.revert(guest, e)?;
            info!(
                guest,
                epoch = e,
                "migration reverted: the source owns the guest again"
            );
            Ok(json!({"ok": true}))
        }),
        _ => num("epoch").and_then(|e| {
            c.abort(guest, e)?;
            info!(guest, epoch = e, "migration aborted");
            Ok(json!({"ok": true}))
        }),
    };
    r.unwrap_or_else(|e| {
        if op != "cluster_status" && op != "guests" {
            warn!(guest, "{op} refused: {e}");
        }
        json!({"ok": false, "error": e})
    })
}

fn route_from_request(st: &Arc<State>, req: Value) -> Result<PathBuf, String> {
    let r: RouteRequest =
        serde_json::from_value(req).map_err(|e| format!("bad route request: {e}"))?;
    let to: SocketAddr = r.to.parse().map_err(|e| {
        format!(
            "to = {:?}: not HOST:PORT with a numeric address ({e})",
            r.to
        )
    })?;
    let mut cfg = st.cfg.transport.clone();
    // Unset streams/codec: the name's prepared choice, else the defaults.
    let mut from = "defaults";
    if r.streams.is_none() || r.codec.is_none() {
        if let Some((n, c)) = st.prepared_settings(&r.name) {
            cfg.streams = n;
            cfg.set_codec(&c)?;
            from = "prepared";
        }
    }
    if let Some(n) = r.streams {
        cfg.streams = n;
        from = "request";
    }
    if let Some(c) = r.codec {
        cfg.set_codec(&c)?;
        from = "request";
    }
    if let Some(w) = r.workers {
        cfg.workers = w;
    }
    if let Some(d) = r.dedup_cache_mb {
        cfg.dedup_cache_mb = d;
    }
    if let Some(c) = r.congestion {
        cfg.tuning.congestion = Some(c);
    }
    if let Some(w) = r.window_mb {
        cfg.window = w.saturating_mul(1 << 20);
    }
    add_route(st, &r.name, to, cfg, from)
}

/// `{"op":"prepare",...}`: what the management layer chose for a migration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrepareRequest {
    #[allow(dead_code)] // always "prepare"
    op: String,
    name: String,
    uuid: Option<String>,
    transport: Option<String>,
    streams: Option<u64>,
    codec: Option<String>,
    source_host: Option<String>,
    chosen_by: Option<String>,
    /// Gate the cutover on the cluster (needs `uuid` and cluster membership).
    gate: Option<bool>,
    /// The source host's node id; default: the guest's owner in the
    /// registry, else the member the source connects from.
    src_node: Option<u64>,
}

fn check_name(name: &str) -> Result<(), String> {
    if name.len() > wire::MAX_NAME_LEN {
        return Err(format!(
            "name is {} bytes long: at most {} (it names the socket on both hosts)",
            name.len(),
            wire::MAX_NAME_LEN
        ));
    }
    wire::check_name(name).map_err(|e| e.to_string())
}

fn check_text(field: &str, v: &str) -> Result<(), String> {
    if v.len() > MAX_TEXT {
        return Err(format!(
            "{field} is {} bytes long: at most {MAX_TEXT}",
            v.len()
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{field} {v:?} has control characters"));
    }
    Ok(())
}

fn check_uuid(u: &str) -> Result<(), String> {
    let ok = u.len() == 36
        && u.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "uuid {u:?} is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
        ))
    }
}

fn prepare(st: &Arc<State>, req: Value) -> Result<Value, String> {
    let r: PrepareRequest = serde_json::from_value(req).map_err(|e| e.to_string())?;
    check_name(&r.name)?;
    if let Some(u) = &r.uuid {
        check_uuid(u)?;
    }
    let transport = r.transport.unwrap_or_else(|| "tcp".into());
    match transport.as_str() {
        "tcp" => {}
        "rdma" => {
            return Err("transport \"rdma\": this agent has no RDMA streams (use tcp)".to_string())
        }
        t => return Err(format!("transport {t:?} is not tcp or rdma")),
    }
    let streams = r.streams.unwrap_or(st.cfg.transport.streams as u64);
    if streams == 0 || streams > MAX_STREAMS as u64 {
        return Err(format!(
            "streams = {streams} is out of range: 1..={MAX_STREAMS}"
        ));
    }
    let mut probe = st.cfg.transport.clone();
    let codec = match r.codec {
        Some(c) => {
            probe.set_codec(&c)?;
            c
        }
        None => probe.codec_name(),
    };
    for (field, v) in [("source_host", &r.source_host), ("chosen_by", &r.chosen_by)] {
        if let Some(v) = v {
            check_text(field, v)?;
        }
    }
    let gate = if r.gate == Some(true) {
        let c = st.cfg.cluster.clone().ok_or(
            "gate: this agent is not a cluster member (start it with --node-id, --cluster-id, --raft-listen, --peers and --data-dir)",
        )?;
        let guest = r
            .uuid
            .clone()
            .ok_or("gate: a gated migration needs the guest's \"uuid\"")?;
        let src = r.src_node.or_else(|| c.owner(&guest));
        let g = AgentGate::new(c, &guest, src, st.cfg.gate_timeout).map_err(|e| {
            format!("gate: the cluster refused to begin migrating guest {guest} to this host: {e}")
        })?;
        if let Some(epoch) = g.epoch() {
            st.record_intent(&format!("{guest}@{epoch}"));
        }
        Some(g)
    } else {
        if r.src_node.is_some() {
            return Err("src_node is only meaningful with \"gate\": true".into());
        }
        None
    };
    let entry = Prepared {
        gate,
        name: r.name,
        uuid: r.uuid,
        transport,
        streams: streams as u16,
        codec,
        source_host: r.source_host,
        chosen_by: r.chosen_by.unwrap_or_else(|| "unspecified".into()),
        state: PrepState::Prepared,
        prepared_at: now_s(),
        started_at: None,
        ended_at: None,
        reason: None,
        session: None,
    };
    info!(
        name = entry.name, streams = entry.streams, codec = entry.codec,
        chosen_by = entry.chosen_by, source_host = ?entry.source_host,
        "migration prepared"
    );
    let answer = entry.to_json();
    let mut p = st.prepared.lock();
    for old in p.iter_mut().filter(|e| e.name == entry.name && e.active()) {
        old.finish(
            PrepState::Failed,
            Some("superseded by a new prepare".to_string()),
        );
    }
    if p.len() >= KEEP_PREPARED {
        // Forget the oldest finished entry, else the oldest.
        let i = p.iter().position(|e| !e.active()).unwrap_or(0);
        p.remove(i);
    }
    p.push_back(entry);
    Ok(json!({"ok": true, "prepared": answer}))
}

fn started(st: &Arc<State>, req: &Value) -> Result<Value, String> {
    let name = req["name"].as_str().ok_or("missing \"name\"")?;
    check_name(name)?;
    let mut p = st.prepared.lock();
    let e = p
        .iter_mut()
        .rev()
        .find(|e| e.name == name && e.active())
        .ok_or_else(|| format!("no prepared migration named {name:?} is active"))?;
    if e.state == PrepState::Prepared {
        e.state = PrepState::Started;
        e.started_at = Some(now_s());
    }
    Ok(json!({"ok": true, "prepared": e.to_json()}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    #[allow(dead_code)] // always "release"
    op: String,
    name: String,
    outcome: String,
    reason: Option<String>,
}

/// Ends the newest entry called `name`. An entry that already ended (its
/// session completed or failed) keeps its state: `"changed": false`.
fn release(st: &Arc<State>, req: Value) -> Result<Value, String> {
    let r: ReleaseRequest = serde_json::from_value(req).map_err(|e| e.to_string())?;
    check_name(&r.name)?;
    let state = match r.outcome.as_str() {
        "ok" => PrepState::Released,
        "failed" => PrepState::Failed,
        o => return Err(format!("outcome {o:?} is not ok or failed")),
    };
    if let Some(v) = &r.reason {
        check_text("reason", v)?;
    }
    let mut p = st.prepared.lock();
    let e = p
        .iter_mut()
        .rev()
        .find(|e| e.name == r.name)
        .ok_or_else(|| format!("no prepared migration named {:?}", r.name))?;
    let changed = e.active();
    if changed {
        info!(
            name = r.name,
            outcome = r.outcome,
            "prepared migration released"
        );
        e.finish(
            state,
            r.reason
                .or_else(|| Some(format!("released: {}", r.outcome))),
        );
    }
    Ok(json!({"ok": true, "changed": changed, "prepared": e.to_json()}))
}

/// Sends one request to an agent's control socket and returns the answer;
/// an answer with `"ok": false` becomes an error carrying its message.
pub fn control_request(path: &Path, req: &Value) -> Result<Value, String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the agent at {}: {e} (is `dwcp agent` running?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut text = req.to_string();
    text.push('\n');
    s.write_all(text.as_bytes())
        .map_err(|e| format!("agent control socket: {e}"))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("agent control socket: {e}"))?;
    let v: Value =
        serde_json::from_str(&line).map_err(|e| format!("agent answered non-JSON: {e}"))?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v)
    } else {
        Err(v["error"]
            .as_str()
            .unwrap_or("agent refused the request")
            .to_string())
    }
}

/// The agent's newest session called `name` (from `{"op":"stats"}`), if any.
pub fn newest_session(control: &Path, name: &str) -> Option<Value> {
    let v = control_request(control, &json!({"op": "stats"})).ok()?;
    v["sessions"]
        .as_array()?
        .iter()
        .rev()
        .find(|s| s["name"] == name)
        .cloned()
}

/// [`newest_session`], waiting up to `timeout` for it to leave `running`,
/// so its counters are final.
pub fn settled_session(control: &Path, name: &str, timeout: Duration) -> Option<Value> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let s = newest_session(control, name);
        if s.as_ref().is_some_and(|s| s["state"] != "running")
            || std::time::Instant::now() > deadline
        {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{Shutdown, TcpListener};

    /// A real agent on a fresh temp run dir (and a data port when `listen`).
    fn agent(tag: &str, listen: bool) -> (Agent, PathBuf, Option<SocketAddr>) {
        let dir = std::env::temp_dir().join(format!("dwcp-agent-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let addr = listen.then(|| {
            // A free port: bind :0, read it, let it go for the agent.
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        });
        let transport = TransportConfig {
            workers: 1,
            ..TransportConfig::default()
        };
        let a = Agent::start(AgentConfig {
            listen: addr,
            run_dir: dir.clone(),
            incoming_dir: dir.join("incoming"),
            transport,
            limits: AcceptorLimits::default(),
            cluster: None,
            gate_timeout: Duration::from_secs(5),
        })
        .unwrap();
        (a, dir, addr)
    }

    fn ctl(dir: &Path, req: Value) -> Result<Value, String> {
        control_request(&dir.join("agent.sock"), &req)
    }

    fn prepared(dir: &Path) -> Vec<Value> {
        ctl(dir, json!({"op": "stats"})).unwrap()["prepared"]
            .as_array()
            .unwrap()
            .clone()
    }

    #[test]
    fn prepare_started_release_shows_in_stats() {
        let (_a, dir, _) = agent("life", false);
        let uuid = "0b2c5e9e-5a4f-4c1e-9a57-3f1f2b8c9d10";
        let r = ctl(
            &dir,
            json!({"op": "prepare", "name": "g1", "uuid": uuid, "transport": "tcp",
                   "streams": 2, "codec": "zstd", "source_host": "10.0.0.1",
                   "chosen_by": "metadata"}),
        )
        .unwrap();
        assert_eq!(r["prepared"]["state"], "prepared");
        let p = prepared(&dir);
        assert_eq!(p.len(), 1);
        let e = &p[0];
        assert_eq!(
            (&e["name"], &e["uuid"], &e["streams"], &e["codec"]),
            (&json!("g1"), &json!(uuid), &json!(2), &json!("zstd"))
        );
        assert_eq!(e["source_host"], "10.0.0.1");
        assert_eq!(e["chosen_by"], "metadata");
        assert!(e["prepared_at"].as_f64().unwrap() > 1.6e9);
        assert!(e["started_at"].is_null() && e["used"].is_null());

        let r = ctl(&dir, json!({"op": "started", "name": "g1"})).unwrap();
        assert_eq!(r["prepared"]["state"], "started");
        assert!(prepared(&dir)[0]["started_at"].as_f64().is_some());

        let r = ctl(
            &dir,
            json!({"op": "release", "name": "g1", "outcome": "failed", "reason": "QEMU exited"}),
        )
        .unwrap();
        assert_eq!(r["changed"], true);
        let e = &prepared(&dir)[0];
        assert_eq!(e["state"], "failed");
        assert_eq!(e["reason"], "QEMU exited");
        assert!(e["ended_at"].as_f64().is_some());
        // Releasing a finished entry again changes nothing.
        let r = ctl(
            &dir,
            json!({"op": "release", "name": "g1", "outcome": "ok"}),
        )
        .unwrap();
        assert_eq!(r["changed"], false);
        assert_eq!(prepared(&dir)[0]["state"], "failed");

        // A second prepare of the same name supersedes an active one.
        ctl(&dir, json!({"op": "prepare", "name": "g2"})).unwrap();
        ctl(&dir, json!({"op": "prepare", "name": "g2", "streams": 3})).unwrap();
        let p = prepared(&dir);
        assert_eq!(p.len(), 3);
        assert_eq!(p[1]["state"], "failed");
        assert_eq!(p[1]["reason"], "superseded by a new prepare");
        // Unset fields take the agent's defaults.
        assert_eq!(
            (&p[1]["streams"], &p[1]["codec"]),
            (&json!(4), &json!("auto"))
        );
        assert_eq!(p[2]["streams"], 3);
        assert_eq!(p[2]["chosen_by"], "unspecified");
        ctl(
            &dir,
            json!({"op": "release", "name": "g2", "outcome": "ok"}),
        )
        .unwrap();
        assert_eq!(prepared(&dir)[2]["state"], "released");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        let (_a, dir, _) = agent("bad", false);
        let long = "x".repeat(65);
        let cases = [
            (
                json!({"op": "prepare", "name": "g1", "codec": "lz9"}),
                "prepare: codec \"lz9\"",
            ),
            (
                json!({"op": "prepare", "name": "g1", "codec": "zstd:99"}),
                "codec \"zstd:99\"",
            ),
            (
                json!({"op": "prepare", "name": "g1", "streams": 0}),
                "streams = 0 is out of range: 1..=256",
            ),
            (
                json!({"op": "prepare", "name": "g1", "streams": 999}),
                "streams = 999 is out of range: 1..=256",
            ),
            (
                json!({"op": "prepare", "name": long}),
                "name is 65 bytes long: at most 64",
            ),
            (
                json!({"op": "prepare", "name": "../etc"}),
                "invalid migration name",
            ),
            (json!({"op": "prepare"}), "missing field `name`"),
            (
                json!({"op": "prepare", "name": "g1", "transport": "rdma"}),
                "no RDMA streams",
            ),
            (
                json!({"op": "prepare", "name": "g1", "transport": "udp"}),
                "transport \"udp\" is not tcp or rdma",
            ),
            (
                json!({"op": "prepare", "name": "g1", "uuid": "nope"}),
                "uuid \"nope\" is not a UUID",
            ),
            (
                json!({"op": "prepare", "name": "g1", "strems": 2}),
                "unknown field `strems`",
            ),
            (
                json!({"op": "prepare", "name": "g1", "gate": true}),
                "gate: this agent is not a cluster member",
            ),
            (
                json!({"op": "prepare", "name": "g1", "src_node": 1}),
                "src_node is only meaningful with \"gate\": true",
            ),
            (
                json!({"op": "reconcile", "guest": "x"}),
                "reconcile: this agent is not a cluster member",
            ),
            (
                json!({"op": "prepare", "name": "g1", "chosen_by": "y".repeat(300)}),
                "chosen_by is 300 bytes long: at most 256",
            ),
            (
                json!({"op": "started", "name": "g9"}),
                "no prepared migration named \"g9\" is active",
            ),
            (
                json!({"op": "release", "name": "g9", "outcome": "ok"}),
                "no prepared migration named \"g9\"",
            ),
            (
                json!({"op": "release", "name": "g9", "outcome": "maybe"}),
                "outcome \"maybe\" is not ok or failed",
            ),
            (
                json!({"op": "release", "name": "g9"}),
                "missing field `outcome`",
            ),
        ];
        for (req, want) in cases {
            let err = ctl(&dir, req.clone()).unwrap_err();
            assert!(err.contains(want), "{req}: {err:?} does not say {want:?}");
        }
        assert!(prepared(&dir).is_empty(), "a refused prepare left an entry");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn table_keeps_the_newest() {
        let (_a, dir, _) = agent("bound", false);
        for i in 0..KEEP_PREPARED + 6 {
            ctl(&dir, json!({"op": "prepare", "name": format!("vm{i}")})).unwrap();
        }
        let p = prepared(&dir);
        assert_eq!(p.len(), KEEP_PREPARED);
        assert_eq!(p[0]["name"], "vm6");
        assert_eq!(
            p[KEEP_PREPARED - 1]["name"],
            format!("vm{}", KEEP_PREPARED + 5)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The prepared choice drives a route that sets none of its own, the
    /// relayed session is linked to the entries on both agents, reports what
    /// it used, and its completion releases them.
    #[test]
    fn prepared_settings_drive_the_route_and_the_session_ends_the_entry() {
        let (_src, sdir, _) = agent("src", false);
        let (_dst, ddir, daddr) = agent("dst", true);
        let daddr = daddr.unwrap();
        for dir in [&sdir, &ddir] {
            ctl(
                dir,
                json!({"op": "prepare", "name": "g1", "streams": 3, "codec": "zstd:1",
                       "chosen_by": "metadata"}),
            )
            .unwrap();
        }
        let r = ctl(
            &sdir,
            json!({"op": "route", "name": "g1", "to": daddr.to_string()}),
        )
        .unwrap();
        let routes = ctl(&sdir, json!({"op": "stats"})).unwrap()["routes"].clone();
        assert_eq!(routes[0]["streams"], 3);
        assert_eq!(routes[0]["codec"], "zstd:1");
        assert_eq!(routes[0]["settings_from"], "prepared");

        // The destination "QEMU": listens where the agent delivers, echoes EOF.
        let incoming = UnixListener::bind(ddir.join("incoming/g1.sock")).unwrap();
        let qemu = std::thread::spawn(move || {
            let (mut c, _) = incoming.accept().unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            got.len()
        });
        let payload: Vec<u8> = (0..4u32 << 20).map(|i| (i / 4096) as u8).collect();
        let mut q = UnixStream::connect(r["socket"].as_str().unwrap()).unwrap();
        q.write_all(&payload).unwrap();
        q.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        q.read_to_end(&mut rest).unwrap();
        assert_eq!(qemu.join().unwrap(), payload.len());

        for (dir, role) in [(&sdir, "initiator"), (&ddir, "responder")] {
            let mut e = Value::Null;
            for _ in 0..200 {
                e = prepared(dir)[0].clone();
                if e["state"] == "released" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            assert_eq!(e["state"], "released", "{role}: {e}");
            assert_eq!(e["reason"], "session completed");
            let u = &e["used"];
            assert_eq!(u["role"], role);
            assert_eq!(u["state"], "completed");
            assert_eq!(u["streams"], 3, "{role}: {e}");
            assert!(
                u["codec"].as_str().unwrap().starts_with("zstd"),
                "{role}: {e}"
            );
            assert_eq!(e["used_matches"], true, "{role}: {e}");
        }
        // A release after the session ended it keeps the session's verdict.
        let r = ctl(
            &ddir,
            json!({"op": "release", "name": "g1", "outcome": "failed"}),
        )
        .unwrap();
        assert_eq!(r["changed"], false);
        assert_eq!(r["prepared"]["state"], "released");
        // A route with its own settings says so.
        ctl(
            &sdir,
            json!({"op": "route", "name": "g1", "to": daddr.to_string(), "streams": 1}),
        )
        .unwrap();
        let routes = ctl(&sdir, json!({"op": "stats"})).unwrap()["routes"].clone();
        assert_eq!(routes[0]["settings_from"], "request");
        let _ = std::fs::remove_dir_all(&sdir);
        let _ = std::fs::remove_dir_all(&ddir);
    }
}
