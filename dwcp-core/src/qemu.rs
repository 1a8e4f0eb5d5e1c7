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
    /// Bytes per second; None leaves QEMU's default.
    pub max_bandwidth: Option<u64>,
    pub downtime_limit_ms: Option<u64>,
}

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
    fn from_query(v: &Value, wall: Duration) -> MigrationResult {
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

/// Starts `migrate` to `uri` and polls until it ends. `progress` sees every
/// `query-migrate` answer. A migration that does not finish within `timeout`
/// is cancelled. Returns QEMU's figures; a failed or cancelled migration is
/// an error carrying QEMU's reason.
pub fn migrate(
    qmp: &mut Qmp,
    uri: &str,
    timeout: Duration,
    mut progress: impl FnMut(&Value),
) -> Result<MigrationResult, QmpError> {
    let t0 = Instant::now();
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    loop {
        let v = qmp.execute("query-migrate", None)?;
        progress(&v);
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
