//! The control socket (JSON lines): the request enum [`ControlRequest`],
//! one variant per op, parsed by its `"op"` tag; the server loop and the
//! dispatch to the handlers beside the state they act on (`route`,
//! `prepared`, `cutover`); the shape of answers and error texts; and the
//! client side ([`control_request`], [`control_call`]).
//!
//! Answers are `{"ok": true, ...}` or `{"ok": false, "error": TEXT}`; an
//! error of a cluster op also has `"kind"` ([`ClusterErrorKind`]). The error
//! texts are the protocol's: route's parse errors read `bad route request:
//! ...`, those of `prepare`/`started`/`release` are prefixed with the op.

use std::io::{BufRead, BufReader, Read as _, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tracing::warn;

use super::cluster::{ClusterError, ClusterErrorKind, ClusterOps};
use super::cutover::{
    self, BeginRequest, EpochRequest, ReconcileRequest, SettleRequest, TransferLeaderRequest,
};
use super::expect::{self, ExpectRequest};
use super::prepared::{self, PrepareRequest, ReleaseRequest, StartedRequest};
use super::progress::{self, ProgressRequest};
use super::route::{self, RouteRequest, UnrouteRequest};
use super::State;

/// Longest request line, in bytes (a longer one ends the connection).
const MAX_LINE: u64 = 64 << 10;

/// Declares [`ControlRequest`] and, from the same list, [`ControlRequest::OPS`]
/// and [`ControlRequest::op`], so the list of ops can never miss one.
macro_rules! control_requests {
    ($( $(#[doc = $doc:literal])* $op:literal => $variant:ident $(($req:ty))?, )+) => {
        /// One request on the control socket: `{"op": OP, ...fields}`.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "op")]
        pub(crate) enum ControlRequest {
            $( $(#[doc = $doc])* #[serde(rename = $op)] $variant $(($req))?, )+
        }

        impl ControlRequest {
            /// Every op, in the order the unknown-op message lists them.
            pub(crate) const OPS: &'static [&'static str] = &[$($op),+];

            /// This request's op.
            pub(crate) fn op(&self) -> &'static str {
                match self {
                    $( ControlRequest::$variant { .. } => $op, )+
                }
            }
        }
    };
}

control_requests! {
    /// Adds (or replaces) a route; answers its `"socket"`.
    "route" => Route(RouteRequest),
    /// Removes a route.
    "unroute" => Unroute(UnrouteRequest),
    /// Sessions, routes, prepared migrations, commits under way.
    "stats" => Stats,
    /// Liveness; answers the agent's `"version"`.
    "ping" => Ping,
    /// What the management layer chose for a migration.
    "prepare" => Prepare(PrepareRequest),
    /// QEMU is up for a prepared migration.
    "started" => Started(StartedRequest),
    /// The management layer is done with a prepared migration.
    "release" => Release(ReleaseRequest),
    /// Accept a migration of this name (from this peer) on the data port.
    "expect" => Expect(ExpectRequest),
    /// Re-read the TLS credentials (as SIGHUP does).
    "reload_tls" => ReloadTls,
    /// The raft group as this member sees it.
    "cluster_status" => ClusterStatus,
    /// The guest registry as applied on this member.
    "guests" => Guests,
    /// Records a migration intent; answers its `"epoch"`.
    "begin" => Begin(BeginRequest),
    /// Transfers ownership to the intent's destination.
    "commit" => Commit(EpochRequest),
    /// Abandons the intent.
    "abort" => Abort(EpochRequest),
    /// Returns a committed migration's guest to its source.
    "revert" => Revert(EpochRequest),
    /// Abort (or revert) in the background until the cluster has a quorum.
    "settle" => Settle(SettleRequest),
    /// Closes what the registry still shows for the guest's last migration.
    "reconcile" => Reconcile(ReconcileRequest),
    /// Hands raft leadership to member `"to"` (ask the leader).
    "transfer_leader" => TransferLeader(TransferLeaderRequest),
    /// The driver's figures for a migration: remaining bytes, ETA, downtime.
    "progress" => Progress(ProgressRequest),
}

impl ControlRequest {
    /// The error for an op the agent does not know (or a request without
    /// one): it lists every op.
    pub(crate) fn unknown_op(op: &str) -> String {
        let (last, rest) = ControlRequest::OPS.split_last().expect("ops");
        format!("unknown op {op:?}: use {} or {last}", rest.join(", "))
    }

    /// Parses one request line; the error is the answer to send. (The
    /// cluster ops' fields are all lenient, so only `route`, `prepare` and
    /// `release` can fail here, as before the enum; a cluster op on an agent
    /// that is no member is refused by [`dispatch`].)
    pub(crate) fn parse(line: &str) -> Result<ControlRequest, Refusal> {
        let req: Value = serde_json::from_str(line)
            .map_err(|e| Refusal::plain(format!("request is not JSON: {e}")))?;
        let op = req["op"].as_str().unwrap_or("");
        let Some(op) = ControlRequest::OPS.iter().find(|o| **o == op) else {
            return Err(Refusal::plain(ControlRequest::unknown_op(op)));
        };
        serde_json::from_value(req).map_err(|e| match *op {
            "route" => Refusal::plain(format!("bad route request: {e}")),
            op => Refusal::logged(op, e.to_string()),
        })
    }
}

/// Parses one request line as the agent does, without acting on it: the op,
/// or the error answer the agent would send. The entry point of the
/// `control_request` fuzz target (docs/fuzzing.md).
#[doc(hidden)]
pub fn parse_request(line: &str) -> Result<&'static str, String> {
    ControlRequest::parse(line)
        .map(|r| r.op())
        .map_err(|r| r.answer.to_string())
}

/// A request the agent refuses: the error answer, and whether to log it.
#[derive(Debug)]
pub(crate) struct Refusal {
    answer: Value,
    log: Option<String>,
}

impl Refusal {
    /// `{"ok":false,"error":TEXT}`, not logged.
    fn plain(error: String) -> Refusal {
        Refusal {
            answer: json!({"ok": false, "error": error}),
            log: None,
        }
    }

    /// `{"ok":false,"error":"OP: TEXT"}`, logged as `OP refused: TEXT`.
    fn logged(op: &str, error: String) -> Refusal {
        Refusal {
            answer: json!({"ok": false, "error": format!("{op}: {error}")}),
            log: Some(format!("{op} refused: {error}")),
        }
    }

    /// A cluster op's error: `{"ok":false,"error":TEXT,"kind":KIND}`; logged
    /// unless the op only reads.
    fn cluster(op: &str, e: ClusterError) -> Refusal {
        let reads = matches!(op, "cluster_status" | "guests");
        let log =
            (!reads && e.kind != ClusterErrorKind::NotMember).then(|| format!("{op} refused: {e}"));
        Refusal {
            answer: json!({"ok": false, "error": e.message, "kind": e.kind}),
            log,
        }
    }
}

/// Serves the control socket: a thread per connection, one answer per line.
/// (A pool of long-lived threads was tried for the 1,000-migration load
/// test and reverted: it did not remove the wait there, which was thread
/// start and exit elsewhere in the agent, and its threads' allocator
/// arenas raised the agent's resident memory; docs/scale.md.)
pub(super) fn serve(st: Arc<State>, l: UnixListener) {
    for conn in l.incoming().flatten() {
        let st = st.clone();
        std::thread::spawn(move || serve_conn(&st, conn));
    }
}

/// One control connection: a request per line, an answer per line, until
/// the client closes it (or is silent for 5 minutes).
fn serve_conn(st: &Arc<State>, conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(300)));
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    // Bounded lines: a request over 64 KiB is refused.
    let mut r = BufReader::new(conn).take(MAX_LINE);
    let mut line = String::new();
    while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let answer = handle(st, line.trim());
        let mut text = answer.to_string();
        text.push('\n');
        if w.write_all(text.as_bytes()).is_err() {
            return;
        }
        line.clear();
        r.set_limit(MAX_LINE);
    }
}

/// The answer to one request line.
fn handle(st: &Arc<State>, line: &str) -> Value {
    let refused = match ControlRequest::parse(line).and_then(|req| dispatch(st, req)) {
        Ok(answer) => return answer,
        Err(r) => r,
    };
    if let Some(l) = &refused.log {
        warn!("{l}");
    }
    refused.answer
}

fn dispatch(st: &Arc<State>, req: ControlRequest) -> Result<Value, Refusal> {
    let op = req.op();
    let local = |r: Result<Value, String>| r.map_err(|e| Refusal::logged(op, e));
    match req {
        ControlRequest::Ping => Ok(json!({"ok": true, "version": env!("CARGO_PKG_VERSION")})),
        ControlRequest::Stats => Ok(stats(st)),
        ControlRequest::Route(_) | ControlRequest::Prepare(_) | ControlRequest::Expect(_)
            if st.draining() =>
        {
            Err(Refusal::plain(super::DRAINING.to_string()))
        }
        ControlRequest::Route(r) => route::route(st, r)
            .map(|path| json!({"ok": true, "socket": path}))
            .map_err(Refusal::plain),
        ControlRequest::Unroute(r) => route::unroute(st, &r)
            .map(|()| json!({"ok": true}))
            .map_err(Refusal::plain),
        ControlRequest::Prepare(r) => local(prepared::prepare(st, r)),
        ControlRequest::Started(r) => local(prepared::started(st, r)),
        ControlRequest::Release(r) => local(prepared::release(st, r)),
        ControlRequest::Expect(r) => local(expect::expect(st, r)),
        ControlRequest::Progress(r) => progress::progress(st, r).map_err(Refusal::plain),
        ControlRequest::ReloadTls => {
            local(super::reload_tls(st).map(|m| json!({"ok": true, "message": m})))
        }
        cluster_op => {
            let c = st.cfg.cluster.as_ref().ok_or_else(|| not_member(op))?;
            cluster_dispatch(st, c, cluster_op).map_err(|e| Refusal::cluster(op, e))
        }
    }
}

fn not_member(op: &str) -> Refusal {
    Refusal::cluster(
        op,
        ClusterError::new(
            ClusterErrorKind::NotMember,
            format!("{op}: this agent is not a cluster member (start it with --node-id, --cluster-id, --raft-listen, --peers and --data-dir)"),
        ),
    )
}

fn cluster_dispatch(
    st: &State,
    c: &Arc<dyn ClusterOps>,
    req: ControlRequest,
) -> Result<Value, ClusterError> {
    match req {
        ControlRequest::ClusterStatus => Ok(json!({"ok": true, "status": c.status()})),
        ControlRequest::Guests => Ok(json!({"ok": true, "guests": c.guests()})),
        ControlRequest::Begin(r) => cutover::begin_op(st, c.as_ref(), &r),
        ControlRequest::Commit(r) => cutover::commit_op(st, c.as_ref(), &r),
        ControlRequest::Abort(r) => cutover::abort_op(c.as_ref(), &r),
        ControlRequest::Revert(r) => cutover::revert_op(c.as_ref(), &r),
        ControlRequest::Settle(r) => cutover::settle_op(c, &r),
        ControlRequest::Reconcile(r) => cutover::reconcile_op(c, &r),
        ControlRequest::TransferLeader(r) => cutover::transfer_leader_op(c.as_ref(), &r),
        other => unreachable!("{} is not a cluster op", other.op()),
    }
}

fn stats(st: &State) -> Value {
    let reports = st.progress.lock().clone();
    let sessions: Vec<Value> = st
        .sessions
        .lock()
        .iter()
        .map(|s| {
            let stats = s.stats();
            let mut v = serde_json::to_value(&stats).unwrap_or(Value::Null);
            if let (Some(p), Some(o)) = (reports.get(&stats.session), v.as_object_mut()) {
                for (k, x) in p.session_fields().as_object().into_iter().flatten() {
                    o.insert(k.clone(), x.clone());
                }
            }
            v
        })
        .collect();
    let routes: Vec<Value> = st.routes.lock().values().map(|r| r.to_json()).collect();
    let prepared: Vec<Value> = st.prepared.lock().iter().map(|p| p.to_json()).collect();
    json!({"ok": true, "sessions": sessions, "routes": routes, "prepared": prepared,
           "commits_in_flight": st.commits_in_flight.load(Ordering::Relaxed),
           "nova": st.nova_json()})
}

/// A failed control request: the agent's (or the connection's) message, and
/// the kind of a cluster op's error when the agent gave one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub message: String,
    pub kind: Option<ClusterErrorKind>,
    /// The control socket could not be connected to (missing, refused, no
    /// permission): no agent answered at all.
    pub unreachable: bool,
}

impl ControlError {
    fn local(message: String) -> ControlError {
        ControlError {
            message,
            kind: None,
            unreachable: false,
        }
    }
}

/// Sends one request to an agent's control socket and returns the answer;
/// an answer with `"ok": false` becomes an error carrying its message and
/// kind.
pub fn control_call(path: &Path, req: &Value) -> Result<Value, ControlError> {
    control_call_within(path, req, CONTROL_ANSWER_TIMEOUT)
}

/// How long [`control_call`] waits for the agent's answer.
pub const CONTROL_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// [`control_call`] waiting up to `wait` for the answer (an orchestrator
/// that starts hundreds of migrations at once may wait longer than 30 s).
pub fn control_call_within(
    path: &Path,
    req: &Value,
    wait: Duration,
) -> Result<Value, ControlError> {
    let mut s = UnixStream::connect(path).map_err(|e| ControlError {
        unreachable: true,
        ..ControlError::local(format!(
            "cannot reach the agent at {}: {e} (is `dwcp agent` running?)",
            path.display()
        ))
    })?;
    s.set_read_timeout(Some(wait))
        .map_err(|e| ControlError::local(e.to_string()))?;
    let mut text = req.to_string();
    text.push('\n');
    s.write_all(text.as_bytes())
        .map_err(|e| ControlError::local(format!("agent control socket: {e}")))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(|e| {
        let e = if e.kind() == std::io::ErrorKind::WouldBlock {
            format!("no answer within {} s", wait.as_secs())
        } else {
            e.to_string()
        };
        ControlError::local(format!("agent control socket: {e}"))
    })?;
    let v: Value = serde_json::from_str(&line)
        .map_err(|e| ControlError::local(format!("agent answered non-JSON: {e}")))?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v)
    } else {
        Err(ControlError {
            unreachable: false,
            message: v["error"]
                .as_str()
                .unwrap_or("agent refused the request")
                .to_string(),
            kind: serde_json::from_value(v["kind"].clone()).ok(),
        })
    }
}

/// [`control_call`] with the error as its message.
pub fn control_request(path: &Path, req: &Value) -> Result<Value, String> {
    control_call(path, req).map_err(|e| e.message)
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

    fn parse(v: Value) -> ControlRequest {
        ControlRequest::parse(&v.to_string()).unwrap_or_else(|r| panic!("{v}: {:?}", r.answer))
    }

    fn refusal(v: Value) -> Value {
        ControlRequest::parse(&v.to_string())
            .expect_err("parsed")
            .answer
    }

    /// Every op, as the clients send it today (the `dwcp` CLI, the libvirt
    /// hooks, the shell and Rust tests), parses into its variant with its
    /// fields.
    #[test]
    fn each_op_parses_from_what_clients_send() {
        let guest = "0b2c5e9e-5a4f-4c1e-9a57-3f1f2b8c9d10";
        let cases = [
            // dwcp migrate: every route field, congestion possibly null.
            json!({"op": "route", "name": "vm1", "to": "10.0.0.2:4800", "streams": 4,
                   "codec": "zstd:3", "workers": 2, "dedup_cache_mb": 64,
                   "congestion": null, "window_mb": 16}),
            json!({"op": "unroute", "name": "vm1"}),
            json!({"op": "stats"}),
            json!({"op": "ping"}),
            json!({"op": "prepare", "name": "vm1", "uuid": guest, "transport": "tcp",
                   "streams": 2, "codec": "zstd", "source_host": "10.0.0.1",
                   "chosen_by": "metadata", "gate": true, "src_node": 1}),
            json!({"op": "started", "name": "vm1"}),
            json!({"op": "release", "name": "vm1", "outcome": "failed", "reason": "why"}),
            // dwcp expect
            json!({"op": "expect", "name": "vm1", "from": "src1", "ttl_s": 60}),
            json!({"op": "reload_tls"}),
            json!({"op": "cluster_status"}),
            json!({"op": "guests"}),
            json!({"op": "begin", "guest": guest, "src": 1, "dst": 2}),
            json!({"op": "commit", "guest": guest, "epoch": 3}),
            json!({"op": "abort", "guest": guest, "epoch": 3}),
            json!({"op": "revert", "guest": guest, "epoch": 3}),
            json!({"op": "settle", "guest": guest, "epoch": 3, "revert_if_committed": true}),
            json!({"op": "reconcile", "guest": guest}),
            // the soak (tests/tests/soak.rs): place the raft leader.
            json!({"op": "transfer_leader", "to": 3}),
            // dwcp migrate, dwcp virsh-migrate: once a second.
            json!({"op": "progress", "name": "vm1", "remaining_bytes": 1048576,
                   "total_bytes": 536870912, "eta_s": 1.5, "expected_downtime_ms": 120}),
        ];
        assert_eq!(cases.len(), ControlRequest::OPS.len());
        for (v, op) in cases.iter().zip(ControlRequest::OPS) {
            assert_eq!(parse(v.clone()).op(), *op, "{v}");
        }
        match parse(cases[0].clone()) {
            ControlRequest::Route(r) => {
                assert_eq!((r.name.as_str(), r.to.as_str()), ("vm1", "10.0.0.2:4800"));
                let opt = |name: &str| {
                    let o = crate::transport::options::OPTIONS
                        .iter()
                        .find(|o| o.name == name)
                        .unwrap();
                    r.option(o)
                };
                assert_eq!(
                    (opt("streams"), opt("codec")),
                    (Some("4".into()), Some("zstd:3".into()))
                );
                assert_eq!(
                    (opt("workers"), opt("dedup-cache-mb")),
                    (Some("2".into()), Some("64".into()))
                );
                assert_eq!(
                    (opt("congestion"), opt("window-mb")),
                    (None, Some("16".into()))
                );
            }
            other => panic!("{other:?}"),
        }
        match parse(cases[4].clone()) {
            ControlRequest::Prepare(r) => {
                assert_eq!(r.uuid.as_deref(), Some(guest));
                assert_eq!(
                    (r.streams, r.gate, r.src_node),
                    (Some(2), Some(true), Some(1))
                );
                assert_eq!(r.chosen_by.as_deref(), Some("metadata"));
            }
            other => panic!("{other:?}"),
        }
        match parse(cases[11].clone()) {
            ControlRequest::Begin(r) => {
                assert_eq!((r.guest.as_str(), r.src, r.dst), (guest, Some(1), Some(2)))
            }
            other => panic!("{other:?}"),
        }
        match parse(cases[15].clone()) {
            ControlRequest::Settle(r) => {
                assert_eq!((r.epoch, r.revert_if_committed), (Some(3), true))
            }
            other => panic!("{other:?}"),
        }
    }

    /// Optional fields may be left out; fields ops never checked stay
    /// ignored (route, unroute, stats, ping and the cluster ops), and loosely
    /// read fields of another type count as missing.
    #[test]
    fn optional_unknown_and_loose_fields() {
        let ControlRequest::Route(r) =
            parse(json!({"op": "route", "name": "a", "to": "1.2.3.4:5", "extra": 1}))
        else {
            panic!()
        };
        assert_eq!(r.options.keys().collect::<Vec<_>>(), ["extra"]);
        let ControlRequest::Prepare(r) = parse(json!({"op": "prepare", "name": "g"})) else {
            panic!()
        };
        assert!(r.uuid.is_none() && r.gate.is_none() && r.streams.is_none());
        for v in [
            json!({"op": "ping", "id": 7}),
            json!({"op": "stats", "verbose": true}),
            json!({"op": "cluster_status", "x": null}),
        ] {
            parse(v);
        }
        let ControlRequest::Unroute(r) = parse(json!({"op": "unroute"})) else {
            panic!()
        };
        assert_eq!(r.name, "");
        let ControlRequest::Started(r) = parse(json!({"op": "started", "name": 5})) else {
            panic!()
        };
        assert_eq!(r.name, None);
        let ControlRequest::Commit(r) =
            parse(json!({"op": "commit", "guest": 1, "epoch": "3", "who": "me"}))
        else {
            panic!()
        };
        assert_eq!((r.guest.as_str(), r.epoch), ("", None));
        let ControlRequest::Settle(r) =
            parse(json!({"op": "settle", "guest": "g", "epoch": 1, "revert_if_committed": "true"}))
        else {
            panic!()
        };
        assert!(!r.revert_if_committed);
    }

    /// An unknown op (or none) is refused with a message naming every op.
    #[test]
    fn unknown_op_lists_every_op() {
        for (v, shown) in [
            (json!({"op": "frobnicate"}), "\"frobnicate\""),
            (json!({"name": "x"}), "\"\""),
            (json!({"op": 3}), "\"\""),
            (json!([1, 2]), "\"\""),
        ] {
            let a = refusal(v.clone());
            assert_eq!(a["ok"], false);
            let e = a["error"].as_str().unwrap();
            assert!(e.starts_with(&format!("unknown op {shown}: use ")), "{e}");
            for op in ControlRequest::OPS {
                assert!(e.contains(&format!(" {op}")), "{v}: {e} misses {op}");
            }
            assert!(e.ends_with(", transfer_leader or progress"), "{e}");
        }
        assert_eq!(ControlRequest::OPS.len(), 19);
    }

    /// Refused requests read as they always did.
    #[test]
    fn parse_errors_keep_their_texts() {
        let a = refusal(json!({"op": "route", "name": "a"}));
        assert_eq!(a["error"], "bad route request: missing field `to`");
        let a = refusal(json!({"op": "prepare"}));
        assert_eq!(a["error"], "prepare: missing field `name`");
        let a = refusal(json!({"op": "prepare", "name": "g", "strems": 2}));
        assert!(a["error"]
            .as_str()
            .unwrap()
            .starts_with("prepare: unknown field `strems`"));
        let a = refusal(json!({"op": "release", "name": "g"}));
        assert_eq!(a["error"], "release: missing field `outcome`");
        assert!(a.get("kind").is_none());
        let a = refusal(json!({"op": "release", "name": "g", "outcome": "ok", "x": 1}));
        assert!(a["error"]
            .as_str()
            .unwrap()
            .starts_with("release: unknown field `x`"));
        assert_eq!(
            ControlRequest::parse("{").unwrap_err().answer["error"]
                .as_str()
                .unwrap()
                .split(':')
                .next(),
            Some("request is not JSON")
        );
    }
}
