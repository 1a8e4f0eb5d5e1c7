//! QEMU's machine protocol (QMP) and a migration driver on top of it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

/// QMP failures. Messages carry QEMU's own error text.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: QEMU closed the monitor connection")]
    Closed,
    #[error("QMP: bad message from QEMU: {0}")]
    Protocol(String),
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("migration {0}")]
    Migration(String),
}

/// A synchronous QMP client. Events that arrive while waiting for a reply
/// are kept in `events`.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        // QEMU serves one monitor client at a time; a second one waits for
        // the greeting forever, so a short first read turns that into an error.
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            events: Vec::new(),
        };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        q.execute("qmp_capabilities", None)?;
        // pmemsave of a large guest can take a while.
        q.writer.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(q)
    }

    /// Connects, retrying until `timeout` (QEMU creates the socket a moment
    /// after it starts).
    pub fn connect_retry(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let t0 = Instant::now();
        loop {
            match Qmp::connect(path) {
                Ok(q) => return Ok(q),
                Err(e) if t0.elapsed() > timeout => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn read_msg(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let m = self.read_msg()?;
            if m.get("event").is_some() {
                if self.events.len() < 1024 {
                    self.events.push(m);
                }
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply {m}")));
        }
    }

    /// A human monitor command (for `pmemsave` and friends); returns its output.
    pub fn hmp(&mut self, cmdline: &str) -> Result<String, QmpError> {
        let r = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": cmdline })),
        )?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    /// The run state (`running`, `paused`, `postmigrate`, `inmigrate` ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None)?;
        Ok(r["status"].as_str().unwrap_or("?").to_string())
    }
}

/// How QEMU should migrate (the parts DWCP sets).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationSetup {
    /// Multifd channels (None = plain precopy on one connection).
    pub multifd_channels: Option<u32>,
    /// QEMU's own multifd compression (`none`, `zlib`, `zstd`).
    pub multifd_compression: Option<String>,
    pub xbzrle: bool,
    pub return_path: bool,
    /// QEMU's auto-converge (throttles a guest that dirties memory faster
    /// than the migration sends it). QEMU refuses to change capabilities
    /// while a migration runs, so it is set before, or not at all.
    pub auto_converge: bool,
    /// Bytes per second; None leaves QEMU's default.
    pub max_bandwidth: Option<u64>,
    pub downtime_limit_ms: Option<u64>,
    /// QEMU's own TLS: a `tls-creds-x509` object over this directory
    /// (libvirt's layout; `endpoint` client on the source, server on the
    /// destination, peers verified) set as the `tls-creds` parameter.
    pub tls_dir: Option<std::path::PathBuf>,
}

/// The id of the `tls-creds-x509` object [`MigrationSetup::apply`] creates.
pub const TLS_CREDS_ID: &str = "dwcp-mig-tls";

impl MigrationSetup {
    /// Sets capabilities and parameters. Must be applied to both source and
    /// destination QEMU (multifd and return-path need both sides).
    pub fn apply(&self, qmp: &mut Qmp, destination: bool) -> Result<(), QmpError> {
        let mut caps = vec![
            json!({"capability": "multifd", "state": self.multifd_channels.is_some()}),
            json!({"capability": "return-path", "state": self.return_path}),
        ];
        if !destination || self.xbzrle {
            caps.push(json!({"capability": "xbzrle", "state": self.xbzrle}));
        }
        if !destination {
            caps.push(json!({"capability": "auto-converge", "state": self.auto_converge}));
        }
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )?;
        let mut params = serde_json::Map::new();
        if let Some(n) = self.multifd_channels {
            params.insert("multifd-channels".into(), json!(n));
            if let Some(c) = &self.multifd_compression {
                params.insert("multifd-compression".into(), json!(c));
            }
        }
        if !destination {
            if let Some(b) = self.max_bandwidth {
                params.insert("max-bandwidth".into(), json!(b));
            }
            if let Some(d) = self.downtime_limit_ms {
                params.insert("downtime-limit".into(), json!(d));
            }
            if self.xbzrle {
                params.insert("xbzrle-cache-size".into(), json!(256u64 << 20));
            }
        }
        if let Some(dir) = &self.tls_dir {
            qmp.execute(
                "object-add",
                Some(json!({
                    "qom-type": "tls-creds-x509",
                    "id": TLS_CREDS_ID,
                    "dir": dir,
                    "endpoint": if destination { "server" } else { "client" },
                    "verify-peer": true,
                })),
            )?;
            params.insert("tls-creds".into(), json!(TLS_CREDS_ID));
        }
        if !params.is_empty() {
            qmp.execute("migrate-set-parameters", Some(Value::Object(params)))?;
        }
        Ok(())
    }
}

/// QEMU's figures for a finished migration (from `query-migrate`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationResult {
    pub status: String,
    pub total_time_ms: u64,
    pub downtime_ms: u64,
    pub setup_time_ms: u64,
    /// Bytes QEMU wrote to the migration channel(s) for RAM.
    pub ram_transferred: u64,
    pub ram_total: u64,
    pub dirty_sync_count: u64,
    /// Wall time seen by the driver, from `migrate` to completion.
    pub wall_ms: u64,
    pub error: Option<String>,
}

impl MigrationResult {
    /// QEMU's figures from a `query-migrate` answer; `wall` is the driver's
    /// own time since `migrate`.
    pub fn from_query(v: &Value, wall: Duration) -> MigrationResult {
        let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        MigrationResult {
            status: v["status"].as_str().unwrap_or("?").to_string(),
            total_time_ms: n("/total-time"),
            downtime_ms: n("/downtime"),
            setup_time_ms: n("/setup-time"),
            ram_transferred: n("/ram/transferred"),
            ram_total: n("/ram/total"),
            dirty_sync_count: n("/ram/dirty-sync-count"),
            wall_ms: wall.as_millis() as u64,
            error: v["error-desc"].as_str().map(str::to_string),
        }
    }
}

/// The migration's closed-loop tuning, once a second (docs/adaptivity.md,
/// "Closed-loop tuning"). One loop for everything the driver sets on QEMU:
///
/// - **switchover**: QEMU stops the guest once its remaining dirty RAM would
///   cross within `downtime-limit` at the rate it writes into its migration
///   socket. Through DWCP, the destination also waits, after the stop, for
///   the bytes the relay still holds (the in-flight budget, about two RTTs
///   of data) and for the last round trip (return path). So the source QEMU
///   gets `downtime-limit = goal - inflight_bytes / delivery_rate - min RTT`
///   (wire bytes over the wire rate; at least [`SWITCHOVER_FLOOR_MS`]) and
///   `avail-switchover-bandwidth`, the QEMU bytes per second the relay will
///   deliver: the predicted wire rate times the measured compression ratio
///   when the agent has a prediction ([`TuneInputs`]), else the raw rate it
///   measured.
/// - **max-bandwidth**: unless the operator fixed one, lifted to twice the
///   expected raw rate whenever that comes within 80 % of the cap in force
///   (QEMU's default, 128 MiB/s, would otherwise hold back a fast path).
/// - **convergence**: when the expected raw rate (times the RAM QEMU gets
///   through per byte) does not outrun the guest's dirty rate for
///   [`NOT_CONVERGING_AFTER`] decisions in a row, a warning with the
///   numbers, once, early instead of after many wasted passes (QEMU does not
///   let auto-converge be switched on while a migration runs; enable it
///   before, `--auto-converge`, and QEMU throttles the guest itself).
///
/// The codec tier and level are the agent's part of the loop (its tier
/// tuner, `--codec auto`), where the encoder's CPU is measured.
#[derive(Debug)]
pub struct SwitchoverTuner {
    goal_ms: u64,
    last: Option<Instant>,
    sent: Option<(u64, u64)>,
    /// The max-bandwidth in force (bytes/s) and whether the tuner may move
    /// it (not fixed by the operator).
    max_bandwidth: u64,
    lift_bandwidth: bool,
    /// Decisions in a row that found the migration not converging.
    behind: u32,
    /// The first not-converging verdict, with its numbers.
    pub not_converging: Option<Value>,
    /// Decisions taken (each logged with its inputs).
    pub decisions: u32,
}

/// Smallest downtime-limit the tuner sets, ms.
pub const SWITCHOVER_FLOOR_MS: u64 = 30;

/// QEMU's default max-bandwidth, bytes/s.
pub const QEMU_DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

/// Decisions in a row without convergence before the tuner says so.
pub const NOT_CONVERGING_AFTER: u32 = 3;

/// What the agent knows beyond the session's own figures, from its answer
/// to the driver's `progress` report, and QEMU's dirty rate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TuneInputs {
    /// Predicted wire rate (5-s mean), bytes/s, and the predictor's name.
    pub predicted_wire: Option<(f64, String)>,
    /// Measured raw bytes per wire byte.
    pub ratio: Option<f64>,
    /// Guest RAM dirtied per second, bytes.
    pub dirty_rate: Option<f64>,
    /// Guest RAM QEMU gets through per byte it writes.
    pub ram_per_byte: Option<f64>,
    /// Guest RAM still to send, bytes.
    pub remaining: Option<u64>,
}

impl SwitchoverTuner {
    /// A tuner aiming at `goal_ms` of downtime as the destination sees it.
    pub fn new(goal_ms: u64) -> SwitchoverTuner {
        SwitchoverTuner {
            goal_ms,
            last: None,
            sent: None,
            max_bandwidth: QEMU_DEFAULT_MAX_BANDWIDTH,
            lift_bandwidth: false,
            behind: 0,
            not_converging: None,
            decisions: 0,
        }
    }

    /// Lets the tuner raise QEMU's max-bandwidth, which starts at `current`
    /// bytes/s (None: the operator fixed it; the tuner leaves it alone).
    pub fn with_max_bandwidth(mut self, current: Option<u64>) -> Self {
        if let Some(c) = current {
            self.max_bandwidth = c;
            self.lift_bandwidth = true;
        }
        self
    }

    /// Whether a second has passed since the last look (fetch the session's
    /// stats only then).
    pub fn due(&self) -> bool {
        self.last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    }

    /// Parameters to set on the source now (`migrate-set-parameters`), from
    /// the relay session's stats alone; None when nothing (new) is known.
    pub fn params(&mut self, session: &Value) -> Option<Value> {
        self.decide(session, &TuneInputs::default())
    }

    /// One decision of the loop (type doc): parameters to set on the
    /// source now, None when nothing (new) is known. Logged with its inputs.
    pub fn decide(&mut self, session: &Value, i: &TuneInputs) -> Option<Value> {
        if !self.due() {
            return None;
        }
        self.last = Some(Instant::now());
        let wire_rate = session["delivery_rate"]
            .as_u64()
            .filter(|r| *r >= 1 << 20)?;
        let measured_raw = session["raw_rate"].as_u64().filter(|r| *r >= 1 << 20)?;
        let inflight = session["inflight_bytes"].as_u64().unwrap_or(0);
        let rtt_ms = session["min_rtt_us"].as_u64().unwrap_or(0) / 1000;
        let pipeline_ms = inflight.saturating_mul(1000) / wire_rate;
        let limit = self
            .goal_ms
            .saturating_sub(pipeline_ms + rtt_ms)
            .max(SWITCHOVER_FLOOR_MS);
        // The raw rate to expect: predicted wire rate x measured ratio.
        let ratio = i
            .ratio
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(measured_raw as f64 / wire_rate as f64);
        let (rate, source) = match &i.predicted_wire {
            Some((w, name)) if w.is_finite() && *w * ratio >= (1 << 20) as f64 => {
                ((*w * ratio) as u64, name.as_str())
            }
            _ => (measured_raw, "measured"),
        };
        self.decisions += 1;
        let mut params = serde_json::Map::new();
        // Leave QEMU alone for changes under 10 %.
        let small = self
            .sent
            .is_some_and(|(l, r)| l.abs_diff(limit) * 10 < l && r.abs_diff(rate) * 10 < r);
        if !small {
            self.sent = Some((limit, rate));
            params.insert("downtime-limit".into(), json!(limit));
            params.insert("avail-switchover-bandwidth".into(), json!(rate));
        }
        if self.lift_bandwidth && rate * 5 >= self.max_bandwidth * 4 {
            self.max_bandwidth = rate.saturating_mul(2);
            params.insert("max-bandwidth".into(), json!(self.max_bandwidth));
        }
        // Convergence: RAM the link gets through per second against what
        // the guest dirties.
        let rpb = i
            .ram_per_byte
            .filter(|r| r.is_finite() && *r >= 1.0)
            .unwrap_or(1.0);
        let through = rate as f64 * rpb;
        let dirty = i.dirty_rate.filter(|d| d.is_finite()).unwrap_or(0.0);
        if dirty > 0.0 && through <= dirty {
            self.behind += 1;
        } else {
            self.behind = 0;
        }
        tracing::info!(
            downtime_limit_ms = limit,
            switchover_mb_s = rate as f64 / 1e6,
            max_bandwidth_mb_s = self.max_bandwidth as f64 / 1e6,
            rate_source = source,
            wire_mb_s = wire_rate as f64 / 1e6,
            predicted_wire_mb_s = i.predicted_wire.as_ref().map(|p| p.0 / 1e6),
            ratio,
            dirty_mb_s = dirty / 1e6,
            ram_per_byte = rpb,
            inflight_bytes = inflight,
            min_rtt_ms = rtt_ms,
            set = ?params.keys().collect::<Vec<_>>(),
            "tuning"
        );
        if self.behind >= NOT_CONVERGING_AFTER && self.not_converging.is_none() {
            let wire = rate as f64 / ratio;
            tracing::warn!(
                "tuning: this migration will not converge at this pace: the link is expected to \
                 carry {:.1} Mbit/s ({source}) x ratio {ratio:.2} x {rpb:.2} RAM per byte = \
                 {:.1} MB/s of guest RAM, the guest dirties {:.1} MB/s ({} decisions in a row; \
                 {:.0} MiB left). Enable auto-converge before migrating (`dwcp migrate --auto-converge`) or lower the guest's \
                 load; QEMU refuses to switch it on during a migration",
                wire * 8.0 / 1e6,
                through / 1e6,
                dirty / 1e6,
                self.behind,
                i.remaining.unwrap_or(0) as f64 / 1048576.0
            );
            self.not_converging = Some(json!({
                "at_decision": self.decisions, "wire_mbit": wire * 8.0 / 1e6,
                "rate_source": source, "ratio": ratio, "ram_per_byte": rpb,
                "ram_mb_s": through / 1e6, "dirty_mb_s": dirty / 1e6,
                "remaining_bytes": i.remaining,
            }));
        }
        (!params.is_empty()).then_some(Value::Object(params))
    }
}

/// Sets switchover parameters on an active migration, best effort: a QEMU
/// older than 8.2 has no `avail-switchover-bandwidth`, so on refusal only
/// `downtime-limit` is set.
pub fn tune(qmp: &mut Qmp, query: &Value, params: Value) {
    if query["status"] != "active" {
        return;
    }
    if let Err(e) = qmp.execute("migrate-set-parameters", Some(params.clone())) {
        tracing::debug!("switchover parameters not set: {e}");
        if let Some(d) = params.get("downtime-limit") {
            let _ = qmp.execute("migrate-set-parameters", Some(json!({"downtime-limit": d})));
        }
    }
}

/// Starts `migrate` to `uri` and polls until it ends. `progress` sees every
/// `query-migrate` answer, with the monitor to ask QEMU more (the driver
/// samples guest RAM through it for the ETA), and may return parameters to
/// set on the source (`migrate-set-parameters`, e.g. from a
/// [`SwitchoverTuner`]). A migration that does not finish within `timeout`
/// is cancelled. Returns QEMU's figures; a failed or cancelled migration is
/// an error carrying QEMU's reason.
pub fn migrate(
    qmp: &mut Qmp,
    uri: &str,
    timeout: Duration,
    mut progress: impl FnMut(&Value, &mut Qmp) -> Option<Value>,
) -> Result<MigrationResult, QmpError> {
    let t0 = Instant::now();
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    loop {
        let v = qmp.execute("query-migrate", None)?;
        if let Some(params) = progress(&v, qmp) {
            tune(qmp, &v, params);
        }
        match v["status"].as_str().unwrap_or("") {
            "completed" => return Ok(MigrationResult::from_query(&v, t0.elapsed())),
            "failed" | "cancelled" => {
                let r = MigrationResult::from_query(&v, t0.elapsed());
                return Err(QmpError::Migration(format!(
                    "{}: {}",
                    r.status,
                    r.error.unwrap_or_else(|| "QEMU gave no reason".into())
                )));
            }
            _ => {}
        }
        if t0.elapsed() > timeout {
            let _ = qmp.execute("migrate_cancel", None);
            return Err(QmpError::Migration(format!(
                "did not complete within {timeout:?}; cancelled"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(rate: u64, inflight: u64, rtt_us: u64) -> Value {
        json!({"delivery_rate": rate, "raw_rate": 2 * rate, "inflight_bytes": inflight, "min_rtt_us": rtt_us})
    }

    #[test]
    fn switchover_tuner_subtracts_pipeline_and_rtt() {
        // 25 MB/s, 5 MB in flight (200 ms), 80 ms RTT: 300 - 200 - 80 = 20 -> floor.
        let mut t = SwitchoverTuner::new(300);
        let p = t.params(&session(25_000_000, 5_000_000, 80_000)).unwrap();
        assert_eq!(p["downtime-limit"], SWITCHOVER_FLOOR_MS);
        assert_eq!(p["avail-switchover-bandwidth"], 50_000_000);
        // Not again within a second.
        assert!(!t.due());
        assert!(t.params(&session(25_000_000, 0, 0)).is_none());

        // A datacenter path: 1 GB/s, 2 MB in flight (2 ms), 0.1 ms RTT.
        let mut t = SwitchoverTuner::new(300);
        let p = t.params(&session(1_000_000_000, 2_000_000, 100)).unwrap();
        assert_eq!(p["downtime-limit"], 298);
    }

    #[test]
    fn the_loop_uses_the_prediction_lifts_the_cap_and_says_when_it_cannot_converge() {
        // 100 MB/s measured wire, ratio 2: 200 MB/s raw; a prediction of
        // 10 MB/s wire (the link is about to drop) x ratio 3.
        let mut t = SwitchoverTuner::new(300).with_max_bandwidth(Some(128 << 20));
        let i = TuneInputs {
            predicted_wire: Some((10e6, "lstm".into())),
            ratio: Some(3.0),
            dirty_rate: Some(8e6),
            ram_per_byte: Some(1.0),
            remaining: Some(1 << 30),
        };
        let p = t.decide(&session(100_000_000, 0, 100), &i).unwrap();
        assert_eq!(p["avail-switchover-bandwidth"], 30_000_000);
        assert!(
            p.get("max-bandwidth").is_none(),
            "30 MB/s is far below the cap"
        );
        // Measured only: 200 MB/s raw comes near the 128 MiB/s cap: lifted.
        let mut t = SwitchoverTuner::new(300).with_max_bandwidth(Some(128 << 20));
        let p = t
            .decide(&session(100_000_000, 0, 100), &TuneInputs::default())
            .unwrap();
        assert_eq!(p["max-bandwidth"], 400_000_000);
        // The operator's cap stays.
        let mut t = SwitchoverTuner::new(300).with_max_bandwidth(None);
        let p = t
            .decide(&session(100_000_000, 0, 100), &TuneInputs::default())
            .unwrap();
        assert!(p.get("max-bandwidth").is_none());
        // 2 MB/s wire x 3 = 6 MB/s of RAM against 8 MB/s dirtied: after
        // three decisions in a row, the verdict with its numbers.
        let mut t = SwitchoverTuner::new(300);
        let slow = TuneInputs {
            predicted_wire: Some((2e6, "lstm".into())),
            ..i
        };
        for k in 0..NOT_CONVERGING_AFTER {
            t.last = None;
            t.decide(&session(2_000_000, 0, 100), &slow);
            assert_eq!(t.not_converging.is_some(), k + 1 == NOT_CONVERGING_AFTER);
        }
        let v = t.not_converging.clone().unwrap();
        assert_eq!(v["ram_mb_s"], 6.0);
        assert_eq!(v["dirty_mb_s"], 8.0);
        assert_eq!(v["rate_source"], "lstm");
    }

    #[test]
    fn switchover_tuner_waits_for_a_rate() {
        let mut t = SwitchoverTuner::new(300);
        assert!(t.params(&json!({})).is_none());
        let mut t = SwitchoverTuner::new(300);
        assert!(t.params(&session(1000, 0, 0)).is_none(), "below 1 MiB/s");
    }
}
