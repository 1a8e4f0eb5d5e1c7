//! The agent's side of the cutover gate: a destination session's
//! [`CutoverGate`] on top of the cluster ([`ClusterOps`]), the background
//! settling of migrations that did not finish (abort, or revert after a
//! late failure), the reconciliation an agent runs when it starts, and the
//! cluster ops of the control socket (`begin`, `commit`, `abort`, `revert`,
//! `settle`, `reconcile`), which drive the same registry by hand.
//! Whether a cluster error is final is its [`ClusterErrorKind`].
//! The protocol is in docs/consensus.md ("The transport gate").

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{info, warn};

use super::cluster::{ClusterError, ClusterErrorKind, ClusterOps};
use super::State;
use crate::transport::CutoverGate;

/// Where a gated migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateState {
    /// Prepared; the intent is recorded when the source connects.
    Pending,
    /// Intent recorded; the tail will be held.
    Intent,
    /// The tail is held and the commit is under way.
    Committing,
    /// Ownership moved; the tail is being written to QEMU.
    Committed,
    /// The tail went to QEMU.
    Released,
    /// The gate closed (commit refused or timed out, or the session failed
    /// first); the intent is being settled.
    Closed,
    /// Settled: the intent aborted, the guest stays with the source.
    Aborted,
    /// Settled: committed but the tail never reached QEMU; the source owns
    /// the guest again.
    Reverted,
}

#[derive(Debug)]
struct Inner {
    state: GateState,
    epoch: Option<u64>,
    src: Option<u64>,
    commit_ms: Option<u64>,
    reason: Option<String>,
}

/// The cutover gate of one migration into this host.
#[derive(Debug)]
pub struct AgentGate {
    cluster: Arc<dyn ClusterOps>,
    pub guest: String,
    pub dst: u64,
    timeout: Duration,
    inner: Mutex<Inner>,
}

/// Test failpoint: `DWCP_FAILPOINT_GATE_DELAY_MS` delays every commit by this
/// much, so fault-injection tests can act while the tail is held.
pub(crate) fn failpoint_delay() -> Option<Duration> {
    std::env::var("DWCP_FAILPOINT_GATE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

impl AgentGate {
    /// A gate for `guest` moving to this host. With `src` known the intent
    /// is recorded now (refusals are returned); without, when the source
    /// connects ([`AgentGate::begin_from`]).
    pub fn new(
        cluster: Arc<dyn ClusterOps>,
        guest: &str,
        src: Option<u64>,
        timeout: Duration,
    ) -> Result<Arc<AgentGate>, ClusterError> {
        let g = Arc::new(AgentGate {
            dst: cluster.node_id(),
            cluster,
            guest: guest.to_string(),
            timeout,
            inner: Mutex::new(Inner {
                state: GateState::Pending,
                epoch: None,
                src: None,
                commit_ms: None,
                reason: None,
            }),
        });
        if let Some(src) = src {
            g.begin(src)?;
        }
        Ok(g)
    }

    fn begin(&self, src: u64) -> Result<u64, ClusterError> {
        let epoch = self.cluster.begin(&self.guest, src, self.dst)?;
        info!(
            guest = self.guest,
            src,
            dst = self.dst,
            epoch,
            "cutover gate: intent recorded"
        );
        let mut i = self.inner.lock();
        i.epoch = Some(epoch);
        i.src = Some(src);
        i.state = GateState::Intent;
        Ok(epoch)
    }

    /// Records the intent when the source connects, if not done yet: the
    /// source is the cluster member at `ip`.
    pub fn begin_from(&self, ip: std::net::IpAddr) -> Result<(), String> {
        if self.inner.lock().epoch.is_some() {
            return Ok(());
        }
        let src = self.cluster.member_at(ip).ok_or_else(|| {
            format!("the source {ip} is not a cluster member, so the intent to move guest {} cannot be recorded", self.guest)
        })?;
        self.begin(src).map(|_| ()).map_err(|e| e.to_string())
    }

    pub fn state(&self) -> GateState {
        self.inner.lock().state
    }

    pub fn epoch(&self) -> Option<u64> {
        self.inner.lock().epoch
    }

    /// The source member of the intent this gate recorded, if any.
    pub fn src(&self) -> Option<u64> {
        self.inner.lock().src
    }

    pub fn to_json(&self) -> Value {
        let i = self.inner.lock();
        json!({"guest": self.guest, "src": i.src, "dst": self.dst, "epoch": i.epoch,
               "state": i.state, "commit_ms": i.commit_ms, "reason": i.reason})
    }

    /// The migration ended without its tail reaching QEMU (the session
    /// failed, or libvirt released the domain): settle the intent in the
    /// background — abort, or revert when the commit had gone through.
    pub fn close(self: &Arc<Self>, reason: &str) {
        let (state, epoch) = {
            let mut i = self.inner.lock();
            let s = i.state;
            if matches!(
                s,
                GateState::Released | GateState::Closed | GateState::Aborted | GateState::Reverted
            ) {
                return;
            }
            i.state = GateState::Closed;
            i.reason = Some(reason.to_string());
            (s, i.epoch)
        };
        let Some(epoch) = epoch else {
            return; // no intent was ever recorded
        };
        let committed = state == GateState::Committed;
        warn!(
            guest = self.guest,
            epoch, "cutover gate closed ({reason}); the guest stays on the source"
        );
        let me = self.clone();
        settle(
            self.cluster.clone(),
            self.guest.clone(),
            epoch,
            if committed {
                Settle::Revert
            } else {
                // A commit that timed out may still have gone through; the
                // tail never reached QEMU, so then revert.
                Settle::AbortOrRevert
            },
            Some(Box::new(move |s| me.inner.lock().state = s)),
        );
    }
}

impl CutoverGate for AgentGate {
    fn commit(&self) -> Result<(), String> {
        let epoch = {
            let mut i = self.inner.lock();
            i.state = GateState::Committing;
            i.epoch.ok_or("no intent was recorded")?
        };
        if let Some(d) = failpoint_delay() {
            std::thread::sleep(d);
        }
        let t0 = Instant::now();
        let mut last = String::from("no answer");
        while t0.elapsed() < self.timeout {
            match self.cluster.commit(&self.guest, epoch) {
                Ok(()) => {
                    let mut i = self.inner.lock();
                    i.state = GateState::Committed;
                    i.commit_ms = Some(t0.elapsed().as_millis() as u64);
                    info!(
                        guest = self.guest,
                        epoch,
                        ms = i.commit_ms,
                        "cutover gate: committed"
                    );
                    return Ok(());
                }
                Err(e) if e.is_final() => {
                    self.inner.lock().reason = Some(e.message.clone());
                    return Err(e.message);
                }
                Err(e) => last = e.message,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let e = format!(
            "ownership transfer of guest {} (epoch {epoch}) not committed within {:?}: {last}",
            self.guest, self.timeout
        );
        self.inner.lock().reason = Some(e.clone());
        Err(e)
    }

    fn released(&self) {
        self.inner.lock().state = GateState::Released;
    }
}

/// How to settle a migration that did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Abort the intent; if it turns out committed, leave it (the caller
    /// cannot tell whether the destination got the whole stream).
    Abort,
    /// Abort; if it turns out committed, revert (the destination never got
    /// the end of the stream).
    AbortOrRevert,
    /// Revert a committed migration (an open intent is aborted).
    Revert,
}

type Done = Box<dyn FnOnce(GateState) + Send>;

/// Settles `guest`'s migration at `epoch` in the background, retrying while
/// the cluster has no quorum (every 500 ms, for up to 30 minutes), so
/// nothing is lost when the cluster comes back.
pub fn settle(
    cluster: Arc<dyn ClusterOps>,
    guest: String,
    epoch: u64,
    how: Settle,
    done: Option<Done>,
) {
    std::thread::Builder::new()
        .name("dwcp-settle".into())
        .spawn(move || {
            let t0 = Instant::now();
            let mut how = how;
            let mut logged = false;
            while t0.elapsed() < Duration::from_secs(1800) {
                let r = match how {
                    Settle::Revert => cluster.revert(&guest, epoch),
                    _ => cluster.abort(&guest, epoch),
                };
                match r {
                    Ok(()) => {
                        let state = match how {
                            Settle::Revert => GateState::Reverted,
                            _ => GateState::Aborted,
                        };
                        info!(guest, epoch, ?how, "migration settled: {state:?}");
                        if let Some(d) = done {
                            d(state);
                        }
                        return;
                    }
                    Err(e)
                        if e.kind == ClusterErrorKind::AlreadyCommitted
                            && how == Settle::AbortOrRevert =>
                    {
                        how = Settle::Revert;
                        continue;
                    }
                    Err(e) if e.is_final() => {
                        warn!(guest, epoch, ?how, "settling refused: {e}");
                        return;
                    }
                    Err(e) => {
                        if !logged {
                            warn!(
                                guest,
                                epoch,
                                ?how,
                                "cannot settle yet ({e}); retrying in the background"
                            );
                            logged = true;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            warn!(guest, epoch, ?how, "gave up settling after 30 minutes");
        })
        .expect("spawn");
}

/// When an agent starts, no migration it relayed survived the restart: once
/// the cluster has a leader, abort the open intents this agent recorded
/// before it started (`earlier`, from its run directory), except any it
/// recorded again since (`fresh`). Intents other agents recorded are theirs
/// to settle (their session or `dwcp migrate` fails and settles them; the
/// source host's `reconcile` covers the rest).
pub fn reconcile_on_start(
    cluster: Arc<dyn ClusterOps>,
    earlier: HashSet<String>,
    fresh: Arc<Mutex<HashSet<String>>>,
) {
    std::thread::Builder::new()
        .name("dwcp-reconcile".into())
        .spawn(move || {
            if earlier.is_empty() {
                return;
            }
            let t0 = Instant::now();
            while cluster.status()["leader"].as_u64().is_none() {
                if t0.elapsed() > Duration::from_secs(600) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // Let this member catch up with the leader's log.
            std::thread::sleep(Duration::from_millis(500));
            for (guest, epoch, src, dst) in cluster.open_intents() {
                let key = format!("{guest}@{epoch}");
                if earlier.contains(&key) && !fresh.lock().contains(&key) {
                    info!(
                        guest,
                        epoch,
                        src,
                        dst,
                        "agent restarted during this migration: aborting its intent"
                    );
                    settle(cluster.clone(), guest, epoch, Settle::Abort, None);
                }
            }
        })
        .expect("spawn");
}

// The cluster ops of the control socket. Their fields are read leniently (a
// field of the wrong JSON type counts as missing) and unknown fields are
// ignored, as they always were; a missing guest is the empty string, which
// the cluster refuses as not a UUID.

/// `{"op":"begin","guest":UUID,"src":N,"dst":M}` (→ `"epoch"`).
#[derive(Debug, Deserialize)]
pub(crate) struct BeginRequest {
    #[serde(default, deserialize_with = "super::lenient_string_or_empty")]
    pub guest: String,
    #[serde(default, deserialize_with = "super::lenient_u64")]
    pub src: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient_u64")]
    pub dst: Option<u64>,
}

/// `{"op":"commit"|"abort"|"revert","guest":UUID,"epoch":E}`.
#[derive(Debug, Deserialize)]
pub(crate) struct EpochRequest {
    #[serde(default, deserialize_with = "super::lenient_string_or_empty")]
    pub guest: String,
    #[serde(default, deserialize_with = "super::lenient_u64")]
    pub epoch: Option<u64>,
}

/// `{"op":"settle","guest":UUID,"epoch":E,"revert_if_committed":BOOL}`
/// (only JSON `true` reverts).
#[derive(Debug, Deserialize)]
pub(crate) struct SettleRequest {
    #[serde(default, deserialize_with = "super::lenient_string_or_empty")]
    pub guest: String,
    #[serde(default, deserialize_with = "super::lenient_u64")]
    pub epoch: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient_true")]
    pub revert_if_committed: bool,
}

/// `{"op":"reconcile","guest":UUID}`.
#[derive(Debug, Deserialize)]
pub(crate) struct ReconcileRequest {
    #[serde(default, deserialize_with = "super::lenient_string_or_empty")]
    pub guest: String,
}

/// `{"op":"transfer_leader","to":N}`.
#[derive(Debug, Deserialize)]
pub(crate) struct TransferLeaderRequest {
    #[serde(default, deserialize_with = "super::lenient_u64")]
    pub to: Option<u64>,
}

/// A numeric field the op needs.
fn need(op: &str, field: &str, v: Option<u64>) -> Result<u64, ClusterError> {
    v.ok_or_else(|| ClusterError::invalid(format!("{op}: missing or non-numeric {field:?}")))
}

/// `begin`: records the intent (and remembers it as this agent's).
pub(super) fn begin_op(
    st: &State,
    c: &dyn ClusterOps,
    r: &BeginRequest,
) -> Result<Value, ClusterError> {
    let src = need("begin", "src", r.src)?;
    let dst = need("begin", "dst", r.dst)?;
    let guest = r.guest.as_str();
    let epoch = c.begin(guest, src, dst)?;
    st.record_intent(&format!("{guest}@{epoch}"));
    info!(guest, src, dst, epoch, "migration intent committed");
    Ok(json!({"ok": true, "epoch": epoch}))
}

/// `commit`: transfers ownership (counted in `stats` while under way).
pub(super) fn commit_op(
    st: &State,
    c: &dyn ClusterOps,
    r: &EpochRequest,
) -> Result<Value, ClusterError> {
    let (guest, e) = (r.guest.as_str(), need("commit", "epoch", r.epoch)?);
    st.commits_in_flight.fetch_add(1, Ordering::AcqRel);
    if let Some(d) = failpoint_delay() {
        std::thread::sleep(d);
    }
    let result = c.commit(guest, e);
    st.commits_in_flight.fetch_sub(1, Ordering::AcqRel);
    result?;
    info!(guest, epoch = e, "ownership transfer committed");
    Ok(json!({"ok": true}))
}

/// `abort`: abandons the intent.
pub(super) fn abort_op(c: &dyn ClusterOps, r: &EpochRequest) -> Result<Value, ClusterError> {
    let (guest, e) = (r.guest.as_str(), need("abort", "epoch", r.epoch)?);
    c.abort(guest, e)?;
    info!(guest, epoch = e, "migration aborted");
    Ok(json!({"ok": true}))
}

/// `revert`: a committed migration failed late; the source owns the guest again.
pub(super) fn revert_op(c: &dyn ClusterOps, r: &EpochRequest) -> Result<Value, ClusterError> {
    let (guest, e) = (r.guest.as_str(), need("revert", "epoch", r.epoch)?);
    c.revert(guest, e)?;
    info!(
        guest,
        epoch = e,
        "migration reverted: the source owns the guest again"
    );
    Ok(json!({"ok": true}))
}

/// `transfer_leader`: hands raft leadership to another member (this node
/// must lead; planned maintenance, and the soak's leader placement).
pub(super) fn transfer_leader_op(
    c: &dyn ClusterOps,
    r: &TransferLeaderRequest,
) -> Result<Value, ClusterError> {
    let to = need("transfer_leader", "to", r.to)?;
    c.transfer_leader(to)?;
    info!(to, "raft leadership handed over");
    Ok(json!({"ok": true, "leader": to}))
}

/// `settle`: abort (or revert) in the background, retried until the
/// cluster has a quorum.
pub(super) fn settle_op(c: &Arc<dyn ClusterOps>, r: &SettleRequest) -> Result<Value, ClusterError> {
    let e = need("settle", "epoch", r.epoch)?;
    let how = if r.revert_if_committed {
        Settle::AbortOrRevert
    } else {
        Settle::Abort
    };
    settle(c.clone(), r.guest.clone(), e, how, None);
    Ok(json!({"ok": true, "queued": true}))
}

/// `reconcile`: after a failed migration, on the host where the guest runs
/// again (the source), close what the registry still shows for the guest's
/// latest migration out of this host.
pub(super) fn reconcile_op(
    c: &Arc<dyn ClusterOps>,
    r: &ReconcileRequest,
) -> Result<Value, ClusterError> {
    let guest = r.guest.as_str();
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
        (Some(src), Some("intent"), Some(e)) if src == me => Some((e, Settle::Abort, "abort")),
        (Some(src), Some("committed"), Some(e)) if src == me => Some((e, Settle::Revert, "revert")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A cluster whose aborts answer from a script (then Ok); reverts succeed.
    #[derive(Debug, Default)]
    struct Scripted {
        aborts: Mutex<Vec<ClusterError>>,
        calls: Mutex<Vec<&'static str>>,
    }

    impl ClusterOps for Scripted {
        fn node_id(&self) -> u64 {
            2
        }
        fn status(&self) -> Value {
            Value::Null
        }
        fn guests(&self) -> Value {
            Value::Null
        }
        fn begin(&self, _: &str, _: u64, _: u64) -> Result<u64, ClusterError> {
            Ok(1)
        }
        fn commit(&self, _: &str, _: u64) -> Result<(), ClusterError> {
            Ok(())
        }
        fn abort(&self, _: &str, _: u64) -> Result<(), ClusterError> {
            self.calls.lock().push("abort");
            let mut a = self.aborts.lock();
            if a.is_empty() {
                Ok(())
            } else {
                Err(a.remove(0))
            }
        }
        fn revert(&self, _: &str, _: u64) -> Result<(), ClusterError> {
            self.calls.lock().push("revert");
            Ok(())
        }
        fn owner(&self, _: &str) -> Option<u64> {
            None
        }
        fn member_at(&self, _: std::net::IpAddr) -> Option<u64> {
            None
        }
        fn member_identity(&self, _: u64) -> Option<String> {
            None
        }
        fn open_intents(&self) -> Vec<(String, u64, u64, u64)> {
            Vec::new()
        }
    }

    /// Settles with abort answers `script`; returns the final state (None:
    /// gave up) and the calls made.
    fn settle_with(
        script: Vec<ClusterError>,
        how: Settle,
    ) -> (Option<GateState>, Vec<&'static str>) {
        let c = Arc::new(Scripted {
            aborts: Mutex::new(script),
            ..Default::default()
        });
        let (tx, rx) = mpsc::channel();
        settle(
            c.clone(),
            "g".into(),
            1,
            how,
            Some(Box::new(move |s| {
                let _ = tx.send(s);
            })),
        );
        let state = rx.recv_timeout(Duration::from_secs(5)).ok();
        let calls = c.calls.lock().clone();
        (state, calls)
    }

    #[test]
    fn settling_goes_by_the_error_kind() {
        use ClusterErrorKind::*;
        let committed = || ClusterError::new(AlreadyCommitted, "refused by the registry: ...");
        // Already committed: revert when asked to, else give up.
        let (s, calls) = settle_with(vec![committed()], Settle::AbortOrRevert);
        assert_eq!(
            (s, calls),
            (Some(GateState::Reverted), vec!["abort", "revert"])
        );
        let (s, calls) = settle_with(vec![committed()], Settle::Abort);
        assert_eq!((s, calls), (None, vec!["abort"]));
        // Refused or invalid: final. Unavailable: retried.
        for kind in [Refused, Invalid] {
            let (s, calls) = settle_with(vec![ClusterError::new(kind, "no")], Settle::Abort);
            assert_eq!((s, calls), (None, vec!["abort"]), "{kind:?}");
        }
        let (s, calls) = settle_with(vec![ClusterError::unavailable("no leader")], Settle::Abort);
        assert_eq!(
            (s, calls),
            (Some(GateState::Aborted), vec!["abort", "abort"])
        );
    }
}
