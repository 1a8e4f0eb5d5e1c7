//! What the driver of a migration reports about it: the `progress` control
//! request.
//!
//! The agent relays bytes and cannot tell how much guest RAM is left or
//! when the guest was stopped; whoever drives QEMU can (`dwcp migrate`,
//! `dwcp virsh-migrate`). Once a second it sends
//! `{"op":"progress","name":N,"remaining_bytes":B,"total_bytes":T,"eta_s":S,
//! "expected_downtime_ms":D}` and, once QEMU completed, `"downtime_ms":D`.
//! The report is attached to the newest source-side session of that name;
//! `stats` shows its figures with the session, and the metrics endpoint
//! exports them (ETA and remaining bytes while the session runs, the
//! downtime into a histogram once, when it is first reported).
//!
//! With `"dirty_rate_bytes_s":R` (QEMU's dirty-pages-rate times the page
//! size) the agent computes the ETA itself from the remaining bytes, that
//! dirty rate and the session's measured rate and compression ratio
//! ([`crate::adapt::eta`]; with `"ram_per_byte":F`, the guest RAM QEMU
//! gets through per byte it writes for what is left, zero pages being
//! nearly free, `"backlog_bytes":B`, RAM dirtied behind QEMU's first
//! pass that `remaining_bytes` does not count yet, and
//! `"dirty_behind_bytes_s":D`, the part of the dirty rate that lands behind
//! that pass), and
//! answers it (`eta_s`, `eta_source: "model"`, or `"predicted"` when the
//! rate came from the agent's bandwidth predictor, [`crate::predict::latest`])
//! with the link mode, the rate estimate and the prediction; without it the driver's own `eta_s` stands
//! (`eta_source: "driver"`).
//!
//! Every field but `name` is optional; a field left out (or not a finite
//! non-negative number) clears the previous value: an ETA that can no longer
//! be computed is shown as unknown, never as a stale figure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use super::{lenient_u64, State};
use crate::adapt::eta;
use crate::transport::Role;

/// How long a report stays current: older ones (the driver died, or
/// stopped reporting) no longer give an ETA.
pub const FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// `{"op":"progress",...}`.
#[derive(Debug, Deserialize)]
pub(crate) struct ProgressRequest {
    #[serde(default, deserialize_with = "super::lenient_string_or_empty")]
    pub name: String,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub remaining_bytes: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub total_bytes: Option<u64>,
    #[serde(default, deserialize_with = "lenient_seconds")]
    pub eta_s: Option<f64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub expected_downtime_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub downtime_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_seconds")]
    pub dirty_rate_bytes_s: Option<f64>,
    #[serde(default, deserialize_with = "lenient_seconds")]
    pub ram_per_byte: Option<f64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub backlog_bytes: Option<u64>,
    #[serde(default, deserialize_with = "lenient_seconds")]
    pub dirty_behind_bytes_s: Option<f64>,
}

/// A finite number >= 0, else None.
fn lenient_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Value::deserialize(d)?
        .as_f64()
        .filter(|v| v.is_finite() && *v >= 0.0))
}

/// The latest report for one session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationProgress {
    /// The migration name.
    pub name: String,
    /// The session it belongs to ([`crate::transport::SessionStats::session`]).
    pub session: String,
    /// Guest RAM QEMU still has to send, bytes.
    pub remaining_bytes: Option<u64>,
    /// Guest RAM in all, bytes.
    pub total_bytes: Option<u64>,
    /// Seconds until the migration completes, at the recent rate net of the
    /// guest's dirty rate; None when that is unknown or the guest dirties
    /// as fast as the migration sends.
    pub eta_s: Option<f64>,
    /// Who computed `eta_s`: `predicted` (the agent, from the predicted
    /// rate, the measured ratio and the dirty rate), `model` (the same with
    /// the measured rate) or `driver`.
    pub eta_source: Option<&'static str>,
    /// QEMU's expected downtime at this point, ms.
    pub expected_downtime_ms: Option<u64>,
    /// QEMU's downtime, once the migration completed, ms.
    pub downtime_ms: Option<u64>,
    /// When the report came, Unix time.
    pub reported_at: f64,
    #[serde(skip)]
    received: Option<Instant>,
}

impl MigrationProgress {
    /// Whether the report is recent enough to show an ETA ([`FRESH_FOR`]).
    pub fn is_fresh(&self) -> bool {
        self.received.is_some_and(|t| t.elapsed() < FRESH_FOR)
    }

    /// The fields `stats` adds to the session's figures.
    pub(super) fn session_fields(&self) -> Value {
        let fresh = self.is_fresh();
        json!({
            "remaining_bytes": self.remaining_bytes.filter(|_| fresh),
            "total_bytes": self.total_bytes,
            "eta_s": self.eta_s.filter(|_| fresh),
            "eta_source": self.eta_source.filter(|_| fresh && self.eta_s.is_some()),
            "expected_downtime_ms": self.expected_downtime_ms.filter(|_| fresh),
            "downtime_ms": self.downtime_ms,
            "progress_at": self.reported_at,
        })
    }
}

/// Called once per session when its downtime is first reported.
pub type DowntimeObserver = Arc<dyn Fn(&MigrationProgress) + Send + Sync>;

/// The reports, by session id (only sessions the agent still remembers).
pub(super) type Reports = HashMap<String, MigrationProgress>;

/// `{"op":"progress",...}`: attaches the report to the newest source-side
/// session of that name. Answers the session's id, or null when there is
/// no such session (yet: QEMU may not have connected).
pub(super) fn progress(st: &Arc<State>, r: ProgressRequest) -> Result<Value, String> {
    if r.name.is_empty() {
        return Err("missing field `name`".into());
    }
    let found = st
        .sessions
        .lock()
        .iter()
        .rev()
        .find(|s| s.name() == r.name && s.role() == Role::Initiator)
        .cloned();
    let Some(session) = found else {
        return Ok(json!({"ok": true, "session": null}));
    };
    let id = session.id();
    // The model's ETA, from the predicted rate (the agent's predictor, when
    // this is its only running migration: it predicts the sum of them) or
    // else the session's measured rate, and the measured ratio.
    let adapt = session.adapt();
    let sources = st
        .sessions
        .lock()
        .iter()
        .filter(|s| s.role() == Role::Initiator && !s.is_finished())
        .count();
    // The predictor samples once a second: before it has seen a few
    // seconds of this session its figure is the previous migration's, or
    // one partial second of this one.
    let seen = session.started().elapsed() >= PREDICTION_AFTER;
    let predicted = (sources == 1 && seen)
        .then(crate::predict::latest)
        .flatten();
    let estimate = predicted_estimate(adapt.estimate, predicted.as_ref().map(|p| p.0));
    let model = match (r.remaining_bytes, estimate, r.downtime_ms) {
        (Some(remaining), Some(estimate), None) if r.dirty_rate_bytes_s.is_some() => {
            // Beyond the estimate's 5 s, the session's mean wire rate.
            let s = session.stats();
            let mean = (s.elapsed_s >= PREDICTION_AFTER.as_secs_f64())
                .then(|| s.wire_out as f64 / s.elapsed_s);
            eta::eta_over_horizon(
                &eta::EtaInput {
                    remaining_bytes: remaining,
                    dirty_rate_bytes_s: r.dirty_rate_bytes_s.unwrap_or(0.0),
                    ram_per_byte: r.ram_per_byte.unwrap_or(1.0),
                    backlog_bytes: r.backlog_bytes.unwrap_or(0),
                    dirty_behind_bytes_s: r.dirty_behind_bytes_s,
                    estimate,
                },
                mean,
            )
        }
        _ => None,
    };
    let (eta_s, eta_source) = match (model, r.eta_s) {
        (Some(m), _) if estimate.is_some_and(|e| e.source == PREDICTED) => {
            (Some(m), Some(PREDICTED))
        }
        (Some(m), _) => (Some(m), Some("model")),
        (None, Some(d)) => (Some(d), Some("driver")),
        (None, None) => (None, None),
    };
    let first_downtime = {
        let sessions = st.sessions.lock();
        let mut reports = st.progress.lock();
        reports.retain(|k, _| *k == id || sessions.iter().any(|s| s.id() == *k));
        let previous = reports.get(&id).and_then(|p| p.downtime_ms);
        let p = MigrationProgress {
            name: r.name,
            session: id.clone(),
            remaining_bytes: r.remaining_bytes,
            total_bytes: r.total_bytes,
            eta_s,
            eta_source,
            expected_downtime_ms: r.expected_downtime_ms,
            // Reported once QEMU completed; it stays.
            downtime_ms: previous.or(r.downtime_ms),
            reported_at: super::now_s(),
            received: Some(Instant::now()),
        };
        let first = (previous.is_none() && p.downtime_ms.is_some()).then(|| p.clone());
        reports.insert(id.clone(), p);
        first
    };
    if let Some(p) = &first_downtime {
        let observers = st.downtime_observers.lock().clone();
        for o in &observers {
            o(p);
        }
    }
    let prediction = predicted.map(|(p, name)| {
        json!({"next_1s_mbit": p.next_1s, "mean_5s_mbit": p.mean_5s, "predictor": name})
    });
    Ok(
        json!({"ok": true, "session": id, "eta_s": eta_s, "eta_source": eta_source,
              "mode": adapt.mode.mode, "estimate": estimate, "measured": adapt.estimate,
              "prediction": prediction,
              "codec_cpu": adapt.link.map(|l| l.codec_cpu)}),
    )
}

/// How long a session runs before its ETA may use the predicted rate.
pub const PREDICTION_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// `eta_source` and [`eta::RateEstimate::source`] of an ETA from the
/// predicted rate.
pub const PREDICTED: &str = "predicted";

/// The rate estimate an ETA is computed from: the predicted wire rate (the
/// 5-s mean, Mbit/s) with the measured compression ratio when both are
/// there, else the measured estimate. A prediction of 0 (the predictor saw
/// nothing moving) is no estimate.
pub fn predicted_estimate(
    measured: Option<eta::RateEstimate>,
    predicted: Option<crate::predict::Prediction>,
) -> Option<eta::RateEstimate> {
    let m = measured?;
    match predicted {
        Some(p) if p.mean_5s.is_finite() && p.mean_5s > 0.0 => Some(eta::RateEstimate {
            wire_rate_bytes_s: p.mean_5s * 1e6 / 8.0,
            ratio: m.ratio,
            source: PREDICTED,
        }),
        _ => Some(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prediction_replaces_the_measured_rate_and_keeps_the_ratio() {
        let m = eta::RateEstimate {
            wire_rate_bytes_s: 12.5e6,
            ratio: 2.5,
            source: "measured",
        };
        let p = |mean_5s: f64| crate::predict::Prediction {
            next_1s: mean_5s,
            mean_5s,
        };
        let e = predicted_estimate(Some(m), Some(p(20.0))).unwrap();
        assert_eq!(
            (e.wire_rate_bytes_s, e.ratio, e.source),
            (2.5e6, 2.5, PREDICTED)
        );
        // no prediction, a zero or NaN one: the measured rate
        assert_eq!(predicted_estimate(Some(m), None), Some(m));
        assert_eq!(predicted_estimate(Some(m), Some(p(0.0))), Some(m));
        assert_eq!(predicted_estimate(Some(m), Some(p(f64::NAN))), Some(m));
        // nothing measured yet (no ratio): no estimate
        assert_eq!(predicted_estimate(None, Some(p(20.0))), None);
    }

    #[test]
    fn bad_numbers_count_as_missing() {
        let r: ProgressRequest = serde_json::from_value(json!({
            "op": "progress", "name": "vm1", "remaining_bytes": -1, "eta_s": -3.0,
            "expected_downtime_ms": "12", "downtime_ms": 40}))
        .unwrap();
        assert_eq!(r.name, "vm1");
        assert_eq!(
            (r.remaining_bytes, r.eta_s, r.expected_downtime_ms),
            (None, None, None)
        );
        assert_eq!(r.downtime_ms, Some(40));
        let r: ProgressRequest =
            serde_json::from_value(json!({"op": "progress", "name": "a", "eta_s": 2.5})).unwrap();
        assert_eq!((r.eta_s, r.dirty_rate_bytes_s), (Some(2.5), None));
        let r: ProgressRequest = serde_json::from_value(
            json!({"op": "progress", "name": "a", "dirty_rate_bytes_s": 4.5e6}),
        )
        .unwrap();
        assert_eq!(r.dirty_rate_bytes_s, Some(4.5e6));
        let r: ProgressRequest = serde_json::from_value(
            json!({"op": "progress", "name": "a", "dirty_rate_bytes_s": -1}),
        )
        .unwrap();
        assert_eq!(r.dirty_rate_bytes_s, None);
    }
}
