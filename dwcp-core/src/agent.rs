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
//! An agent that is a cluster member (see [`ClusterOps`]) also answers
//! `{"op":"cluster_status"}`, `{"op":"guests"}`,
//! `{"op":"begin","guest":UUID,"src":N,"dst":M}` (→ `"epoch"`),
//! `{"op":"commit","guest":UUID,"epoch":E}` and `{"op":"abort","guest":UUID,"epoch":E}`.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{error, info, warn};

use crate::transport::{Acceptor, AcceptorLimits, Session, SessionError, TransportConfig};
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
    socket: PathBuf,
    current: Mutex<Option<Session>>,
    stop: AtomicBool,
}

struct State {
    cfg: AgentConfig,
    routes: Mutex<HashMap<String, Arc<Route>>>,
    /// The most recent sessions, newest last (bounded).
    sessions: Mutex<VecDeque<Session>>,
}

const KEEP_SESSIONS: usize = 32;

impl State {
    fn remember(&self, s: &Session) {
        let mut v = self.sessions.lock();
        if v.len() >= KEEP_SESSIONS {
            v.pop_front();
        }
        v.push_back(s.clone());
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
        });
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
        add_route(&self.state, name, to, cfg)
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
    let acceptor = Arc::new(Acceptor::new(
        st.cfg.transport.clone(),
        st.cfg.limits.clone(),
        st.cfg.incoming_dir.clone(),
    ));
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
                watch_session(session);
            }
            Ok(None) => {}
            Err(e) => warn!("data port: rejected connection from {peer}: {e}"),
        });
    }
}

fn watch_session(session: Session) {
    match session.wait() {
        Ok(s) => info!(
            name = %s.name,
            "session done: {} raw bytes out, {} in, {} on the wire out, ratio {:.2}, {:.2} s",
            s.raw_out, s.raw_in, s.wire_out, s.ratio_out, s.elapsed_s
        ),
        Err(e) => error!(name = session.name(), "{e}"),
    }
}

fn add_route(
    st: &Arc<State>,
    name: &str,
    to: SocketAddr,
    cfg: TransportConfig,
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
        socket: socket.clone(),
        current: Mutex::new(None),
        stop: AtomicBool::new(false),
    });
    st.routes.lock().insert(name.to_string(), route.clone());
    info!(name, %to, streams = route.cfg.streams, tier = %route.cfg.tier, "route added at {}", socket.display());
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
                let w = s.clone();
                std::thread::spawn(move || watch_session(w));
                *current = Some(s.clone());
                s
            }
        };
        match session.add_local_channel(
            conn.try_clone()
                .map_err(|e| SessionError::Failed(e.to_string()))?,
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
                .map(|r| json!({"name": r.name, "to": r.to.to_string(), "socket": r.socket, "streams": r.cfg.streams, "codec": r.cfg.codec_name()}))
                .collect();
            json!({"ok": true, "sessions": sessions, "routes": routes})
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
        op @ ("cluster_status" | "guests" | "begin" | "commit" | "abort") => {
            cluster_control(st, op, &req)
        }
        other => {
            json!({"ok": false, "error": format!("unknown op {other:?}: use route, unroute, stats, ping, cluster_status, guests, begin, commit or abort")})
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
            info!(guest, src, dst, epoch, "migration intent committed");
            Ok(json!({"ok": true, "epoch": epoch}))
        })(),
        "commit" => num("epoch").and_then(|e| {
            c.commit(guest, e)?;
            info!(guest, epoch = e, "ownership transfer committed");
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
    if let Some(n) = r.streams {
        cfg.streams = n;
    }
    if let Some(c) = r.codec {
        cfg.set_codec(&c)?;
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
    add_route(st, &r.name, to, cfg)
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
