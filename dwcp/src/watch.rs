//! `dwcp stats --watch`: the agent's sessions, refreshed in place every
//! interval, with rates computed from successive samples.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use dwcp_core::agent::control_call;
use serde_json::{json, Value};

/// Parses `1s`, `500ms`, `2` (seconds), `0.5s`.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: use e.g. 1s, 500ms or 2"))?;
    let d = v * scale;
    if !(0.1..=3600.0).contains(&d) {
        return Err(format!("{s:?}: between 100ms and 3600s"));
    }
    Ok(Duration::from_secs_f64(d))
}

/// The bytes a session has moved: QEMU bytes sent (source) or written
/// (destination), and wire bytes.
fn moved(s: &Value) -> (u64, u64) {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    if s["role"] == "responder" {
        (n("raw_in"), n("wire_in"))
    } else {
        (n("raw_out"), n("wire_out"))
    }
}

/// One sample of a session, for the next rate.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    qemu: u64,
    wire: u64,
}

/// Per-session rates between two samples, bytes/s.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub qemu: f64,
    pub wire: f64,
}

fn rates(prev: Option<&Sample>, now: &Sample) -> Option<Rates> {
    let p = prev?;
    let dt = now.at.duration_since(p.at).as_secs_f64();
    (dt > 0.0).then(|| Rates {
        qemu: now.qemu.saturating_sub(p.qemu) as f64 / dt,
        wire: now.wire.saturating_sub(p.wire) as f64 / dt,
    })
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / 1048576.0)
}

fn mbit(b: f64) -> String {
    format!("{:.0} Mbit/s", b * 8.0 / 1e6)
}

/// The view of one `stats` answer; `rates` by session id.
fn render(v: &Value, rates: &HashMap<String, Rates>, every: Duration) -> String {
    let mut out = String::new();
    let sessions: Vec<&Value> = v["sessions"].as_array().into_iter().flatten().collect();
    let running: Vec<&&Value> = sessions
        .iter()
        .filter(|s| s["state"] == "running")
        .collect();
    out.push_str(&format!(
        "dwcp stats --watch: every {:.1} s, {} running, {} route(s), {} commit(s) in flight  (Ctrl-C to quit)\n\n",
        every.as_secs_f64(),
        running.len(),
        v["routes"].as_array().map(Vec::len).unwrap_or(0),
        v["commits_in_flight"].as_u64().unwrap_or(0),
    ));
    if running.is_empty() {
        out.push_str("No migration in progress.\n");
    }
    for s in &running {
        let id = s["session"].as_str().unwrap_or("");
        let (qemu, wire) = moved(s);
        let r = rates.get(id);
        let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
        // The ETA and the size left come from the migration's driver
        // (`dwcp migrate` reports QEMU's figures to the agent once a
        // second); the ETA accounts for the guest's dirty rate and is
        // unknown when the guest dirties as fast as the migration sends.
        let eta = match s["eta_s"].as_f64() {
            Some(eta) => format!("{eta:.1} s"),
            None => "?".into(),
        };
        let left = s["remaining_bytes"]
            .as_u64()
            .map(|b| format!("  left {}", mib(b as f64)))
            .unwrap_or_default();
        let expected = s["expected_downtime_ms"]
            .as_u64()
            .map(|d| format!("  expected downtime {d} ms"))
            .unwrap_or_default();
        let mode = if s["role"] == "responder" {
            "destination"
        } else {
            "source"
        };
        out.push_str(&format!(
            "{}  [{mode}, session {}]  {:.1} s\n",
            s["name"].as_str().unwrap_or("?"),
            &id[..id.len().min(8)],
            f("elapsed_s"),
        ));
        out.push_str(&format!(
            "  moved {}  wire {}  rate {} (wire {}){left}  ETA {eta}{expected}\n",
            mib(qemu as f64),
            mib(wire as f64),
            r.map(|r| mbit(r.qemu)).unwrap_or_else(|| "…".into()),
            r.map(|r| mbit(r.wire)).unwrap_or_else(|| "…".into()),
        ));
        out.push_str(&format!(
            "  {}  ratio {:.2}  delivery {}  in flight {}  streams {}\n",
            crate::session_codec(s),
            f("ratio_out"),
            mbit(f("delivery_rate")),
            mib(f("inflight_bytes")),
            s["streams"],
        ));
        if let Some(line) = crate::link_line(s) {
            out.push_str(&format!("  {line}\n"));
        }
        let per: Vec<String> = s["per_stream"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let t = &p["tcp"];
                match t["rtt_us"].as_u64() {
                    Some(rtt) => format!(
                        "#{} {:.2} ms{}",
                        p["index"],
                        rtt as f64 / 1000.0,
                        match t["total_retrans"].as_u64() {
                            Some(n) if n > 0 => format!(" ({n} retr)"),
                            _ => String::new(),
                        }
                    ),
                    None => format!("#{} ?", p["index"]),
                }
            })
            .collect();
        out.push_str(&format!("  RTT {}\n\n", per.join("  ")));
    }
    let ended: Vec<&&Value> = sessions
        .iter()
        .filter(|s| s["state"] != "running")
        .rev()
        .take(5)
        .collect();
    if !ended.is_empty() {
        out.push_str("\nRecent (newest first):\n");
        for s in ended {
            let (qemu, wire) = moved(s);
            out.push_str(&format!(
                "  {:<16} {:<9} {:>8.1} s  moved {}  wire {}{}{}\n",
                s["name"].as_str().unwrap_or("?"),
                s["state"].as_str().unwrap_or("?"),
                s["elapsed_s"].as_f64().unwrap_or(0.0),
                mib(qemu as f64),
                mib(wire as f64),
                s["downtime_ms"]
                    .as_u64()
                    .map(|d| format!("  downtime {d} ms"))
                    .unwrap_or_default(),
                s["error"]
                    .as_str()
                    .map(|e| format!("  error: {e}"))
                    .unwrap_or_default(),
            ));
        }
    }
    out
}

/// Refreshes the view until interrupted; `count` stops after that many
/// frames (tests). On a terminal the screen is redrawn in place.
pub fn run(agent: &Path, every: Duration, count: Option<u64>) -> Result<()> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last: HashMap<String, Sample> = HashMap::new();
    let mut frame = 0u64;
    loop {
        let v = control_call(agent, &json!({"op": "stats"}))?;
        let now = Instant::now();
        let mut rs = HashMap::new();
        let mut next = HashMap::new();
        for s in v["sessions"].as_array().into_iter().flatten() {
            let id = s["session"].as_str().unwrap_or("").to_string();
            let (qemu, wire) = moved(s);
            let smp = Sample {
                at: now,
                qemu,
                wire,
            };
            if let Some(r) = rates(last.get(&id), &smp) {
                rs.insert(id.clone(), r);
            }
            next.insert(id, smp);
        }
        last = next;
        let text = render(&v, &rs, every);
        let mut o = std::io::stdout().lock();
        if tty {
            // Home, clear the screen.
            write!(o, "\x1b[H\x1b[2J")?;
        } else if frame > 0 {
            writeln!(o, "----")?;
        }
        write!(o, "{text}")?;
        o.flush()?;
        frame += 1;
        if count.is_some_and(|c| frame >= c) {
            return Ok(());
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_line_shows_mode_sample_and_eta() {
        let s = json!({"adapt": {
            "mode": {"mode": "internet", "fixed": false, "switches": 1},
            "link": {"rtt_us": 80_930, "capacity_bytes_s": 11_875_000.0,
                     "rate_floor_bytes_s": 11_875_000.0, "loss": 0.00104,
                     "wire_rate_bytes_s": 12_000_000.0, "codec_cpu": 0.25}},
            "eta_s": 12.34, "eta_source": "model"});
        assert_eq!(
            crate::link_line(&s).unwrap(),
            "link: mode internet (1 switch), rtt 80.93 ms, capacity 95 Mbit/s, \
             loss 0.104 %, wire 96 Mbit/s, codec cpu 0.25, ETA 12.3 s (model)"
        );
        // only a floor, no sample figures beyond it: "capacity >="
        let s = json!({"adapt": {"mode": {"mode": "datacenter", "switches": 0},
                       "link": {"rate_floor_bytes_s": 2.5e6}}});
        assert_eq!(
            crate::link_line(&s).unwrap(),
            "link: mode datacenter (0 switches), capacity >= 20 Mbit/s"
        );
        assert_eq!(crate::link_line(&json!({"adapt": {"mode": {}}})), None);
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("2").unwrap(), Duration::from_secs(2));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("fast").is_err());
    }

    #[test]
    fn rates_come_from_successive_samples_and_the_view_shows_them() {
        let t0 = Instant::now();
        let a = Sample {
            at: t0,
            qemu: 0,
            wire: 0,
        };
        let b = Sample {
            at: t0 + Duration::from_secs(2),
            qemu: 200 << 20,
            wire: 100 << 20,
        };
        let r = rates(Some(&a), &b).unwrap();
        assert_eq!(r.qemu, (100 << 20) as f64);
        assert_eq!(r.wire, (50 << 20) as f64);
        assert!(rates(None, &b).is_none());
        let v = json!({"sessions": [{
            "name": "vm1", "session": "0123456789abcdef", "role": "initiator", "state": "running",
            "elapsed_s": 3.0, "raw_out": 200u64 << 20, "wire_out": 100u64 << 20, "ratio_out": 2.0,
            "tier": "lz4", "streams": 2, "delivery_rate": 1e8, "inflight_bytes": 1048576,
            "remaining_bytes": 300u64 << 20, "eta_s": 4.31, "expected_downtime_ms": 120,
            "per_stream": [{"index": 0, "tcp": {"rtt_us": 1500, "total_retrans": 3}},
                           {"index": 1, "tcp": {"rtt_us": 2500, "total_retrans": 0}}]},
            {"name": "vm0", "session": "fedcba9876543210", "role": "initiator", "state": "completed",
             "elapsed_s": 9.5, "raw_out": 1u64 << 20, "wire_out": 1u64 << 20, "downtime_ms": 37}],
            "routes": [], "commits_in_flight": 0});
        let mut rs = HashMap::new();
        rs.insert("0123456789abcdef".to_string(), r);
        let text = render(&v, &rs, Duration::from_secs(1));
        for want in [
            "vm1  [source, session 01234567]",
            "moved 200.0 MiB",
            "rate 839 Mbit/s (wire 419 Mbit/s)",
            "left 300.0 MiB",
            "ETA 4.3 s",
            "expected downtime 120 ms",
            "downtime 37 ms",
            "tier lz4",
            "ratio 2.00",
            "#0 1.50 ms (3 retr)",
            "#1 2.50 ms",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }
}
