//! The source side: routes. A route `NAME -> DST:PORT` listens on
//! `<run-dir>/NAME.sock`; each connection QEMU opens there joins the route's
//! current session (a new one once the last has finished). Also the
//! `route` and `unroute` control requests. The Nova ingress ([`super::nova`])
//! makes routes without a socket, whose connections arrive on its TCP
//! listener and join sessions the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{error, info, warn};

use super::State;
use crate::transport::options::{self, Surface, TransportOption};
use crate::transport::{LocalConn, PeerRefusal, Session, SessionError, TransportConfig};
use crate::wire;

pub(super) struct Route {
    name: String,
    to: SocketAddr,
    cfg: TransportConfig,
    /// Where streams/codec came from: `request`, `prepared` or `defaults`.
    settings_from: &'static str,
    /// The route socket; `None` for a route of the Nova ingress.
    socket: Option<PathBuf>,
    current: Mutex<Option<Session>>,
    /// When the last connection arrived (the Nova ingress retires its idle
    /// routes).
    last_conn: Mutex<Instant>,
    stop: AtomicBool,
    /// Why the last connection QEMU opened could not be relayed, if it
    /// could not (shown in `stats`; `dwcp migrate` reads it to tell a
    /// refusal by the destination from other failures).
    last_error: Mutex<Option<RouteFailure>>,
}

/// A connection of QEMU's the route could not relay.
#[derive(Debug, Clone)]
struct RouteFailure {
    message: String,
    /// Set when the destination refused the session (or TLS failed).
    peer_refusal: Option<PeerRefusal>,
    at: f64,
}

/// Why relaying a connection of QEMU's failed.
struct AttachError {
    message: String,
    peer_refusal: Option<PeerRefusal>,
}

impl From<String> for AttachError {
    fn from(message: String) -> AttachError {
        AttachError {
            message,
            peer_refusal: None,
        }
    }
}

impl From<SessionError> for AttachError {
    fn from(e: SessionError) -> AttachError {
        AttachError {
            peer_refusal: e.peer_refusal(),
            message: e.to_string(),
        }
    }
}

impl Route {
    /// The route as `stats` shows it.
    pub(super) fn to_json(&self) -> Value {
        let last_error = self.last_error.lock().as_ref().map(|f| {
            json!({"error": f.message, "refused_by_peer": f.peer_refusal.is_some(),
                   "refusal": f.peer_refusal, "at": f.at})
        });
        let via = if self.socket.is_some() {
            "socket"
        } else {
            "nova-ingress"
        };
        json!({"name": self.name, "to": self.to.to_string(), "socket": self.socket, "via": via,
               "streams": self.cfg.streams, "codec": self.cfg.codec_name(),
               "settings_from": self.settings_from, "last_error": last_error})
    }

    /// Replaces the route's handle of the ended session `s` with `retired`.
    pub(super) fn retire(&self, s: &Session, retired: &Session) {
        let mut current = self.current.lock();
        if current.as_ref().is_some_and(|c| c.same(s)) {
            *current = Some(retired.clone());
        }
    }

    /// Stops the route's accept loop (its socket file stays).
    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(socket) = &self.socket {
            let _ = UnixStream::connect(socket); // wakes its accept loop
        }
    }

    /// Whether a route request for `to` with `cfg` can keep this route:
    /// the same destination, settings and socket, still listening, and no
    /// session of it running or being set up (a new migration must not join
    /// an old session).
    fn reusable_for(
        &self,
        to: SocketAddr,
        cfg: &TransportConfig,
        settings_from: &str,
        socket: &std::path::Path,
    ) -> bool {
        let shown = |c: &TransportConfig| {
            options::OPTIONS
                .iter()
                .map(|o| o.show(c))
                .collect::<Vec<String>>()
        };
        self.to == to
            && self.settings_from == settings_from
            && self.socket.as_deref() == Some(socket)
            && !self.stop.load(Ordering::Acquire)
            && socket.exists()
            && shown(&self.cfg) == shown(cfg)
            // Locked: a connection is being attached (a migration is
            // starting), so not free.
            && self
                .current
                .try_lock()
                .is_some_and(|c| c.as_ref().is_none_or(|s| s.is_finished()))
    }

    pub(super) fn to(&self) -> SocketAddr {
        self.to
    }

    pub(super) fn has_socket(&self) -> bool {
        self.socket.is_some()
    }

    /// No session running, and no connection for `quiet`.
    pub(super) fn idle_for(&self, quiet: std::time::Duration) -> bool {
        self.last_conn.lock().elapsed() >= quiet
            && self.current.lock().as_ref().is_none_or(|s| s.is_finished())
    }
}

/// `{"op":"route",...}`. Transport options use the fields of the option
/// table (`transport::options`, e.g. `streams`, `codec`, `window_mb`); unset
/// or null ones take the agent's defaults (streams and codec: the name's
/// prepared choice first); unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct RouteRequest {
    pub name: String,
    pub to: String,
    #[serde(flatten)]
    pub options: BTreeMap<String, Value>,
}

impl RouteRequest {
    /// The request's value for `o`, as text; `None` when unset or null.
    pub fn option(&self, o: &TransportOption) -> Option<String> {
        match self.options.get(o.control?)? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            v => Some(v.to_string()),
        }
    }
}

/// `{"op":"unroute","name":..}`; a missing name is the empty name.
#[derive(Debug, Deserialize)]
pub(crate) struct UnrouteRequest {
    #[serde(default, deserialize_with = "super::lenient_string_or_empty")]
    pub name: String,
}

/// Adds (or replaces) the route a request describes; returns its socket.
pub(super) fn route(st: &Arc<State>, r: RouteRequest) -> Result<PathBuf, String> {
    let to: SocketAddr = r.to.parse().map_err(|e| {
        format!(
            "to = {:?}: not HOST:PORT with a numeric address ({e})",
            r.to
        )
    })?;
    let mut cfg = st.cfg.transport.clone();
    let is = |name| move |o: &&TransportOption| o.name == name;
    let chosen = |name| {
        options::OPTIONS
            .iter()
            .find(is(name))
            .and_then(|o| r.option(o))
    };
    // Unset streams/codec: the name's prepared choice, else the defaults.
    let mut from = "defaults";
    if chosen("streams").is_none() || chosen("codec").is_none() {
        if let Some((n, c)) = st.prepared_settings(&r.name) {
            cfg.streams = n;
            cfg.set_codec(&c)?;
            from = "prepared";
        }
    }
    for o in options::OPTIONS {
        if let Some(v) = r.option(o) {
            o.apply(&mut cfg, &v, Surface::Control)
                .map_err(|e| e.to_string())?;
            if o.name == "streams" || o.name == "codec" {
                from = "request";
            }
        }
    }
    add_route(st, &r.name, to, cfg, from)
}

/// Removes a route and its socket.
pub(super) fn unroute(st: &State, r: &UnrouteRequest) -> Result<(), String> {
    let name = &r.name;
    match st.routes.lock().remove(name) {
        Some(r) => {
            r.stop();
            if let Some(socket) = &r.socket {
                let _ = std::fs::remove_file(socket);
            }
            Ok(())
        }
        None => Err(format!("no route named {name:?}")),
    }
}

pub(super) fn add_route(
    st: &Arc<State>,
    name: &str,
    to: SocketAddr,
    cfg: TransportConfig,
    settings_from: &'static str,
) -> Result<PathBuf, String> {
    wire::check_name(name).map_err(|e| e.to_string())?;
    cfg.validate().map_err(|e| e.to_string())?;
    let socket = st.cfg.run_dir.join(format!("{name}.sock"));
    // The same route again (same destination and settings, its listener up,
    // no session of it running): kept as it is. An orchestrator that routes
    // every migration of a guest anew then costs the agent no thread.
    let same = st.routes.lock().get(name).cloned();
    if let Some(old) = same.filter(|o| o.reusable_for(to, &cfg, settings_from, &socket)) {
        *old.last_conn.lock() = Instant::now();
        return Ok(socket);
    }
    let replaced = st.routes.lock().remove(name);
    if let Some(old) = replaced {
        // Our own socket: its listener is going away.
        old.stop();
        let _ = std::fs::remove_file(&socket);
    }
    // Otherwise a stale socket (a crashed agent's) is replaced and one
    // something listens on is refused.
    let access = &st.cfg.sockets;
    let l = super::sockets::bind_with(&socket, access.group, access.mode)
        .map_err(|e| format!("binding {}: {e}", socket.display()))?;
    let route = Arc::new(Route {
        name: name.to_string(),
        to,
        cfg,
        settings_from,
        socket: Some(socket.clone()),
        current: Mutex::new(None),
        last_conn: Mutex::new(Instant::now()),
        stop: AtomicBool::new(false),
        last_error: Mutex::new(None),
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
        match conn {
            Ok(c) => {
                let _ = relay(&st, &route, c.into());
            }
            Err(e) => warn!(route = %route.name, "accept: {e}"),
        }
    }
}

/// The route of the Nova ingress for `name` (see [`super::nova`]): the
/// route of that name when it goes to `to` already, else a new one without
/// a socket, with the agent's transport defaults (streams and codec: the
/// name's prepared choice first).
pub(super) fn ingress_route(
    st: &Arc<State>,
    name: &str,
    to: SocketAddr,
) -> Result<Arc<Route>, String> {
    if let Some(r) = st.routes.lock().get(name).filter(|r| r.to == to) {
        return Ok(r.clone());
    }
    wire::check_name(name).map_err(|e| e.to_string())?;
    let mut cfg = st.cfg.transport.clone();
    let mut settings_from = "defaults";
    if let Some((n, c)) = st.prepared_settings(name) {
        cfg.streams = n;
        cfg.set_codec(&c)?;
        settings_from = "prepared";
    }
    cfg.validate().map_err(|e| e.to_string())?;
    let route = Arc::new(Route {
        name: name.to_string(),
        to,
        cfg,
        settings_from,
        socket: None,
        current: Mutex::new(None),
        last_conn: Mutex::new(Instant::now()),
        stop: AtomicBool::new(false),
        last_error: Mutex::new(None),
    });
    if let Some(old) = st.routes.lock().insert(name.to_string(), route.clone()) {
        old.stop();
    }
    info!(name, %to, streams = route.cfg.streams, tier = %route.cfg.tier, settings_from, "route added for the Nova ingress");
    Ok(route)
}

/// Removes `route` from the agent's routes if it is still there.
pub(super) fn remove_if_same(st: &State, route: &Arc<Route>) {
    let mut routes = st.routes.lock();
    if routes
        .get(&route.name)
        .is_some_and(|r| Arc::ptr_eq(r, route))
    {
        routes.remove(&route.name);
    }
}

/// Joins a connection of QEMU's to the route's session. On error the
/// connection is closed (QEMU's migration fails with a socket error; the
/// source guest keeps running), the cause logged and kept for `stats`.
pub(super) fn relay(st: &Arc<State>, route: &Arc<Route>, conn: LocalConn) -> Result<(), String> {
    *route.last_conn.lock() = Instant::now();
    attach(st, route, conn).map_err(|e| {
        error!(route = %route.name, "cannot relay migration to {}: {}", route.to, e.message);
        *route.last_error.lock() = Some(RouteFailure {
            message: e.message.clone(),
            peer_refusal: e.peer_refusal,
            at: super::now_s(),
        });
        e.message
    })
}

/// Joins QEMU's connection to the route's current session (a new one when
/// there is none, or it finished). The error is the session's message.
fn attach(st: &Arc<State>, route: &Arc<Route>, conn: LocalConn) -> Result<(), AttachError> {
    let mut current = route.current.lock();
    for _ in 0..2 {
        let session = match current.as_ref() {
            Some(s) if !s.is_finished() => s.clone(),
            _ => {
                st.check_not_draining()?;
                let s = Session::connect(&route.cfg, &route.name, route.to)?;
                st.remember(&s);
                let (w, st2) = (s.clone(), st.clone());
                std::thread::spawn(move || st2.watch_session(w));
                *current = Some(s.clone());
                s
            }
        };
        let conn = conn
            .try_clone()
            .map_err(|e| format!("migration failed: {e}"))?;
        match session.add_local_channel(conn) {
            Ok(_) => return Ok(()),
            Err(SessionError::Finished) => {
                *current = None;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SessionError::Finished.into())
}
