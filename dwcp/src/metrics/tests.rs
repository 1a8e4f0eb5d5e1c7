//! The exposition of two real agents relaying a loopback session: names,
//! types and HELP of every family, values after the session, the HTTP
//! endpoint's routes and content negotiation.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use dwcp_core::agent::{Agent, AgentConfig};
use dwcp_core::transport::{AcceptorLimits, TransportConfig};

use super::*;

fn agent(tag: &str, listen: bool) -> (Agent, PathBuf, Option<SocketAddr>) {
    let dir = std::env::temp_dir().join(format!("dwcp-metrics-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let addr = listen.then(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    });
    let a = Agent::start(AgentConfig {
        listen: addr,
        run_dir: dir.clone(),
        incoming_dir: dir.join("incoming"),
        transport: TransportConfig {
            workers: 1,
            // Loopback between two agents of this test: clear text, any name.
            tls: dwcp_core::transport::TlsSettings::insecure(),
            ..TransportConfig::default()
        },
        limits: AcceptorLimits::default(),
        cluster: None,
        gate_timeout: Duration::from_secs(5),
        allow: vec!["*".parse().unwrap()],
        sockets: Default::default(),
        nova: Default::default(),
    })
    .unwrap();
    (a, dir, addr)
}

/// One parsed sample: family metadata checked by [`parse`].
#[derive(Debug)]
struct Sample {
    name: String,
    labels: String,
    value: f64,
}

/// Parses the text format 0.0.4 strictly enough for the checks here:
/// every sample belongs to a family with HELP and TYPE, counters' samples
/// end in `_total`, histograms have `_bucket`/`_sum`/`_count`.
fn parse(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
    let mut types = HashMap::new();
    let mut helps = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(r) = line.strip_prefix("# HELP ") {
            let (n, h) = r.split_once(' ').unwrap();
            assert!(!h.is_empty(), "{line}");
            helps.insert(n.to_string(), h.to_string());
        } else if let Some(r) = line.strip_prefix("# TYPE ") {
            let (n, t) = r.split_once(' ').unwrap();
            types.insert(n.to_string(), t.to_string());
        } else {
            assert!(!line.starts_with('#'), "stray comment {line}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n.to_string(), l.trim_end_matches('}').to_string()),
                None => (series.to_string(), String::new()),
            };
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
    }
    for s in &samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                s.name
                    .strip_suffix(suf)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(&s.name);
        let t = types
            .get(family)
            .unwrap_or_else(|| panic!("{} has no TYPE", s.name));
        assert!(helps.contains_key(family), "{} has no HELP", s.name);
        assert!(s.name.starts_with("dwcp_"), "{}", s.name);
        if t == "counter" {
            assert!(s.name.ends_with("_total"), "{}", s.name);
        } else {
            assert!(!s.name.ends_with("_total"), "{} is a {t}", s.name);
        }
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, labels: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels == labels)
        .map(|s| s.value)
}

fn get(addr: SocketAddr, path: &str, accept: &str) -> (String, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.0\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

#[test]
fn a_relayed_session_shows_in_the_exposition() {
    let (src, sdir, _) = agent("src", false);
    let (dst, ddir, daddr) = agent("dst", true);
    let (ms, md) = (Metrics::attach(&src, None), Metrics::attach(&dst, None));

    // Before any migration: the agent-wide families are there, parsed and
    // typed (the per-migration ones appear with a running migration: the e2e
    // test scrapes them mid-flight).
    let (types, samples) = parse(&ms.text());
    for (n, t) in [
        ("dwcp_build_info", "gauge"),
        ("dwcp_migrations_total", "counter"),
        ("dwcp_migration_duration_seconds", "histogram"),
        ("dwcp_migration_downtime_seconds", "histogram"),
        ("dwcp_qemu_bytes_total", "counter"),
        ("dwcp_wire_bytes_total", "counter"),
        ("dwcp_migrations_in_progress", "gauge"),
        ("dwcp_agent_start_time_seconds", "gauge"),
        ("dwcp_routes", "gauge"),
    ] {
        assert_eq!(types.get(n).map(String::as_str), Some(t), "{n}");
    }
    let completed = r#"role="source",outcome="completed""#;
    assert_eq!(
        value(&samples, "dwcp_migrations_total", completed),
        Some(0.0)
    );
    assert!(ms.openmetrics().ends_with("# EOF\n"));

    let sock = src
        .add_route(
            "m1",
            daddr.unwrap(),
            TransportConfig {
                tls: dwcp_core::transport::TlsSettings::insecure(),
                ..TransportConfig::default()
            },
        )
        .unwrap();
    let incoming = UnixListener::bind(ddir.join("incoming/m1.sock")).unwrap();
    let qemu = std::thread::spawn(move || {
        let (mut c, _) = incoming.accept().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        got.len()
    });
    let payload: Vec<u8> = (0..4u32 << 20).map(|i| (i / 4096) as u8).collect();
    let mut q = UnixStream::connect(sock).unwrap();
    q.write_all(&payload).unwrap();

    // While it runs: the driver's report (`dwcp migrate` sends one a
    // second) shows as the ETA and remaining-bytes gauges.
    let ctl = sdir.join("agent.sock");
    let mut running = Vec::new();
    for _ in 0..200 {
        let a = dwcp_core::agent::control_call(
            &ctl,
            &json!({"op": "progress", "name": "m1", "remaining_bytes": 3u64 << 20,
                    "total_bytes": 64u64 << 20, "eta_s": 2.5, "expected_downtime_ms": 40}),
        )
        .unwrap();
        running = parse(&ms.text()).1;
        if a["session"].is_string()
            && value(
                &running,
                "dwcp_migration_eta_seconds",
                r#"migration="m1",role="source""#,
            )
            .is_some()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let l = r#"migration="m1",role="source""#;
    assert_eq!(value(&running, "dwcp_migration_eta_seconds", l), Some(2.5));
    assert_eq!(
        value(&running, "dwcp_migration_remaining_bytes", l),
        Some((3u64 << 20) as f64)
    );
    assert_eq!(
        value(&running, "dwcp_migration_expected_downtime_seconds", l),
        Some(0.04)
    );
    let api = &ms.migrations_json()["running"][0];
    assert_eq!(
        (api["eta_s"].as_f64(), api["total_bytes"].as_u64()),
        (Some(2.5), Some(64 << 20))
    );
    // A report without an ETA (the guest dirties as fast as it is sent)
    // removes it: no ETA rather than a stale one.
    dwcp_core::agent::control_call(
        &ctl,
        &json!({"op": "progress", "name": "m1", "remaining_bytes": 3u64 << 20}),
    )
    .unwrap();
    let running = parse(&ms.text()).1;
    assert_eq!(value(&running, "dwcp_migration_eta_seconds", l), None);
    q.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    q.read_to_end(&mut rest).unwrap();
    assert_eq!(qemu.join().unwrap(), payload.len());

    // The session-end callbacks run on the agents' watcher threads.
    let mut samples = Vec::new();
    for _ in 0..200 {
        samples = parse(&ms.text()).1;
        if value(&samples, "dwcp_migrations_total", completed) == Some(1.0)
            && value(
                &parse(&md.text()).1,
                "dwcp_migrations_total",
                r#"role="destination",outcome="completed""#,
            ) == Some(1.0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(
        value(&samples, "dwcp_migrations_total", completed),
        Some(1.0)
    );
    let n = payload.len() as f64;
    assert_eq!(
        value(&samples, "dwcp_qemu_bytes_total", r#"direction="sent""#),
        Some(n)
    );
    let wire = value(&samples, "dwcp_wire_bytes_total", r#"direction="sent""#).unwrap();
    assert!(wire > 0.0, "{wire}");
    assert_eq!(
        value(&samples, "dwcp_migration_duration_seconds_count", completed),
        Some(1.0)
    );
    let dsamples = parse(&md.text()).1;
    assert_eq!(
        value(
            &dsamples,
            "dwcp_qemu_bytes_total",
            r#"direction="received""#
        ),
        Some(n)
    );
    // Nothing runs now: no per-migration series.
    assert!(!samples.iter().any(|s| s.name == "dwcp_stream_rtt_seconds"));
    assert!(!samples
        .iter()
        .any(|s| s.name == "dwcp_migration_eta_seconds"
            || s.name == "dwcp_migration_remaining_bytes"));
    // The downtime, reported once QEMU completed (twice here: counted once).
    assert_eq!(
        value(&samples, "dwcp_migration_downtime_seconds_count", ""),
        Some(0.0)
    );
    for _ in 0..2 {
        dwcp_core::agent::control_call(
            &ctl,
            &json!({"op": "progress", "name": "m1", "remaining_bytes": 0, "downtime_ms": 45}),
        )
        .unwrap();
    }
    let samples = parse(&ms.text()).1;
    assert_eq!(
        value(&samples, "dwcp_migration_downtime_seconds_count", ""),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "dwcp_migration_downtime_seconds_sum", ""),
        Some(0.045)
    );
    assert_eq!(
        value(
            &samples,
            "dwcp_migration_downtime_seconds_bucket",
            r#"le="0.05""#
        ),
        Some(1.0)
    );
    assert_eq!(ms.migrations_json()["history"][0]["downtime_ms"], 45);
    assert_eq!(
        value(&samples, "dwcp_migrations_in_progress", r#"role="source""#),
        Some(0.0)
    );

    // The history, and the HTTP endpoint.
    let h = &ms.migrations_json()["history"];
    assert_eq!(h[0]["name"], "m1");
    assert_eq!(h[0]["state"], "completed");
    assert_eq!(h[0]["qemu_bytes"].as_u64(), Some(payload.len() as u64));
    let addr = http::serve("127.0.0.1:0".parse().unwrap(), ms.clone()).unwrap();
    let (head, body) = get(addr, "/metrics", "*/*");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    parse(&body);
    let (head, body) = get(
        addr,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.contains("# TYPE dwcp_migrations counter") && body.ends_with("# EOF\n"));
    let (_, body) = get(addr, "/api/migrations", "*/*");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["history"][0]["name"], "m1");
    let (_, body) = get(addr, "/dashboard", "*/*");
    assert!(body.contains("/api/migrations"));
    let (head, _) = get(addr, "/nope", "*/*");
    assert!(head.contains("404"), "{head}");
    let _ = std::fs::remove_dir_all(&sdir);
    let _ = std::fs::remove_dir_all(&ddir);
}
