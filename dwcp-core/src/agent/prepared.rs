//! Prepared migrations: what the management layer chose for a migration
//! before its data arrives (`prepare`, `started`, `release`), the table of
//! the newest [`KEEP_PREPARED`] entries, and their links to the sessions
//! that relay them (and to their cutover gates).

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::info;

use super::cutover::AgentGate;
use super::{now_s, State};
use crate::transport::{CutoverGate, Role, Session, MAX_STREAMS};
use crate::wire;

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
pub(super) struct Prepared {
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

    /// The entry as `stats` and the prepare ops show it.
    pub(super) fn to_json(&self) -> Value {
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
    /// Whether an active prepared entry names `name` (it counts as the
    /// destination expecting that migration).
    pub(super) fn prepared_active(&self, name: &str) -> bool {
        self.prepared
            .lock()
            .iter()
            .any(|e| e.name == name && e.active())
    }

    /// Links a new session to the active prepared entry of the same name.
    pub(super) fn link_session(&self, s: &Session) {
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
    /// `result` carries the session's failure as its message.
    /// Replaces the prepared entries' handle of `s` with `retired` ([`State::retire`]).
    pub(super) fn retire_prepared(&self, s: &Session, retired: &Session) {
        for e in self.prepared.lock().iter_mut() {
            if e.session.as_ref().is_some_and(|x| x.same(s)) {
                e.session = Some(retired.clone());
            }
        }
    }

    pub(super) fn session_ended(&self, s: &Session, result: &Result<(), String>) {
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
    pub(super) fn gate_for(
        &self,
        name: &str,
        peer: SocketAddr,
    ) -> Result<Option<Arc<dyn CutoverGate>>, String> {
        let Some(gate) = self.gate_of(name) else {
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

    /// The cutover gate of the newest active prepared entry called `name`,
    /// when that migration is gated by the cluster.
    pub(super) fn gate_of(&self, name: &str) -> Option<Arc<AgentGate>> {
        self.prepared
            .lock()
            .iter()
            .rev()
            .find(|e| e.name == name && e.active())
            .and_then(|e| e.gate.clone())
    }

    /// The newest active prepared entry called `name`: (streams, codec).
    pub(super) fn prepared_settings(&self, name: &str) -> Option<(u16, String)> {
        self.prepared
            .lock()
            .iter()
            .rev()
            .find(|e| e.name == name && e.active())
            .map(|e| (e.streams, e.codec.clone()))
    }
}

/// `{"op":"prepare",...}`: what the management layer chose for a migration.
/// Unknown fields are refused (a misspelt field must not be ignored).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrepareRequest {
    pub name: String,
    pub uuid: Option<String>,
    pub transport: Option<String>,
    pub streams: Option<u64>,
    pub codec: Option<String>,
    pub source_host: Option<String>,
    pub chosen_by: Option<String>,
    /// Gate the cutover on the cluster (needs `uuid` and cluster membership).
    pub gate: Option<bool>,
    /// The source host's node id; default: the guest's owner in the
    /// registry, else the member the source connects from.
    pub src_node: Option<u64>,
}

/// `{"op":"started","name":..}`; a name that is not a string is missing.
#[derive(Debug, Deserialize)]
pub(crate) struct StartedRequest {
    #[serde(default, deserialize_with = "super::lenient_string")]
    pub name: Option<String>,
}

/// `{"op":"release","name":..,"outcome":"ok"|"failed","reason":..}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseRequest {
    pub name: String,
    pub outcome: String,
    pub reason: Option<String>,
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

/// Records a prepared migration (superseding an active one of the same name).
pub(super) fn prepare(st: &State, r: PrepareRequest) -> Result<Value, String> {
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

/// QEMU is up for the newest active entry called `name`.
pub(super) fn started(st: &State, r: StartedRequest) -> Result<Value, String> {
    let name = r.name.ok_or("missing \"name\"")?;
    check_name(&name)?;
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

/// Ends the newest entry called `name`. An entry that already ended (its
/// session completed or failed) keeps its state: `"changed": false`.
pub(super) fn release(st: &State, r: ReleaseRequest) -> Result<Value, String> {
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
