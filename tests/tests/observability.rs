//! End-to-end observability: both lab agents serve metrics
//! (`--metrics-listen`), a real Prometheus server (Debian's package) scrapes
//! them every second while the test guest migrates, and the test reads the
//! series back through Prometheus's HTTP API; `promtool check metrics` lints
//! a live scrape; headless Chromium (Debian's package) loads the agent's
//! dashboard twice during the migration and must show the migration's name
//! and two different progress figures. The guest's RAM is verified as in
//! tests/migrate.rs.
//!
//! Prometheus and Chromium run in the source host's namespace (they reach
//! the destination agent over the lab link). Set `DWCP_SAVE_RESULTS=DIR` to
//! copy the screenshot and the live scrape there (docs/results/...).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dwcp_lab::{
    boot_pair, dwcp_migrate, scratch_dir, verify, GuestSpec, Lab, Middle, MigrationSpec,
};
use serde_json::Value;

const METRICS_PORT: u16 = 9464;
const PROM_PORT: u16 = 9090;
const NAME: &str = "obs-web-01";

fn need(bin: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{bin} not found: this test needs Debian's prometheus and chromium packages \
         (`make setup`, i.e. scripts/setup-host.sh, installs them)"
    );
}

/// A plain HTTP/1.0 GET from inside namespace `ns`; returns (status line, body).
fn http_get(lab: &Lab, ns: &str, host: String, path: String) -> Result<(String, String), String> {
    lab.topo
        .spawn_in(ns, move || -> Result<(String, String), String> {
            let mut c = TcpStream::connect(&host).map_err(|e| format!("{host}: {e}"))?;
            c.set_read_timeout(Some(Duration::from_secs(10))).ok();
            write!(c, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
            let mut r = Vec::new();
            c.read_to_end(&mut r).map_err(|e| e.to_string())?;
            let r = String::from_utf8_lossy(&r).to_string();
            let (head, body) = r.split_once("\r\n\r\n").ok_or("no HTTP header")?;
            Ok((
                head.lines().next().unwrap_or("").to_string(),
                body.to_string(),
            ))
        })
        .join()
        .map_err(|_| "thread panicked".to_string())?
        .map_err(|e| e.to_string())?
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Kills a child process when dropped.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts Prometheus in the source namespace, scraping both agents every second.
fn start_prometheus(lab: &Lab, dir: &Path) -> Proc {
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: dwcp\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n    static_configs:\n      - targets: ['{s}:{METRICS_PORT}', '{d}:{METRICS_PORT}']\n",
            rules = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../packaging/prometheus/dwcp-rules.yml")
                .display(),
            s = lab.topo.src_ip,
            d = lab.topo.dst_ip,
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = lab
        .topo
        .exec(lab.src_ns(), "prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!(
            "--web.listen-address={}:{PROM_PORT}",
            lab.topo.src_ip
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting prometheus");
    Proc(child)
}

/// Runs a PromQL instant query; returns the `data.result` array.
fn query(lab: &Lab, q: &str) -> Vec<Value> {
    let (status, body) = http_get(
        lab,
        lab.src_ns(),
        format!("{}:{PROM_PORT}", lab.topo.src_ip),
        format!("/api/v1/query?query={}", urlencode(q)),
    )
    .expect("querying prometheus");
    assert!(status.contains("200"), "{q}: {status} {body}");
    let v: Value = serde_json::from_str(&body).expect("prometheus JSON");
    assert_eq!(v["status"], "success", "{v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn sample_value(r: &Value) -> f64 {
    r["value"][1]
        .as_str()
        .unwrap_or("nan")
        .parse()
        .unwrap_or(f64::NAN)
}

/// Runs headless Chromium in the source namespace on `url` with `mode`
/// (`--dump-dom` or `--screenshot=PATH`); returns stdout.
fn chromium(lab: &Lab, dir: &Path, url: &str, mode: &str) -> String {
    let profile = tempdir(dir, "chromium-profile");
    let out = lab
        .topo
        .exec(lab.src_ns(), "chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1200,800",
            // The page polls every second: let it run ~2.5 s of its own time.
            "--virtual-time-budget=2500",
            "--timeout=15000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(mode)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("running chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn tempdir(base: &Path, tag: &str) -> PathBuf {
    let d = base.join(format!(
        "{tag}-{}",
        Instant::now().elapsed().as_nanos() ^ rand::random::<u64>() as u128
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The progress figure the dashboard shows for `name` (the text of its
/// `progress` cell), if the row is there.
fn progress_of(dom: &str, name: &str) -> Option<String> {
    cell_of(dom, name, "progress")
}

/// The text of the element of class `class` in `name`'s row.
fn cell_of(dom: &str, name: &str, class: &str) -> Option<String> {
    let row = dom.find(&format!("data-name=\"{name}\""))?;
    let rest = &dom[row..];
    let tag = format!("class=\"{class}\"");
    let at = rest.find(&tag)?;
    let cell = at + rest[at..].find('>')? + 1;
    let end = rest[cell..].find('<')?;
    Some(rest[cell..cell + end].to_string())
}

#[test]
fn prometheus_scrapes_both_agents_and_the_dashboard_shows_the_migration() {
    for bin in ["prometheus", "promtool", "chromium"] {
        need(bin);
    }
    // The alerting rules: valid, and their unit tests pass.
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus");
    for args in [
        ["check", "rules", "dwcp-rules.yml"],
        ["test", "rules", "dwcp-rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&rules)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listen = format!("0.0.0.0:{METRICS_PORT}");
    let lab = Lab::new("obs", Middle::Bridge, &["--metrics-listen", &listen]).expect("lab");
    let dir = lab.dir.join("observability");
    std::fs::create_dir_all(&dir).unwrap();
    let prom = start_prometheus(&lab, &dir);

    let spec = GuestSpec::default();
    let mig = MigrationSpec {
        name: NAME.into(),
        streams: 4,
        codec: "lz4".into(),
        // Slow enough (QEMU's own limit) for two dashboard loads mid-flight.
        extra: vec!["--max-bandwidth-mb".into(), "4".into()],
        ..Default::default()
    };
    let pair = boot_pair(&lab, &spec, &mig).expect("boot guests");
    let src_metrics = format!("{}:{METRICS_PORT}", lab.topo.src_ip);
    let dashboard = format!("http://{src_metrics}/dashboard");

    let (result, during) = std::thread::scope(|sc| {
        let m = sc.spawn(|| dwcp_migrate(&lab, &pair, &mig));
        // Wait for the session to show on the source agent.
        let t0 = Instant::now();
        loop {
            let (_, body) = http_get(
                &lab,
                lab.src_ns(),
                src_metrics.clone(),
                "/api/migrations".into(),
            )
            .expect("/api/migrations");
            let v: Value = serde_json::from_str(&body).unwrap();
            if v["running"]
                .as_array()
                .is_some_and(|r| r.iter().any(|m| m["name"] == NAME))
            {
                break;
            }
            assert!(
                !m.is_finished(),
                "the migration ended before the dashboard saw it"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no running session: {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // A live scrape, linted by promtool, once `dwcp migrate` has
        // reported an ETA (its first report has no rate yet; it reports
        // once a second).
        let eta_series =
            format!("dwcp_migration_eta_seconds{{migration=\"{NAME}\",role=\"source\"}}");
        let t0 = Instant::now();
        let scrape = loop {
            let (status, scrape) =
                http_get(&lab, lab.src_ns(), src_metrics.clone(), "/metrics".into()).unwrap();
            assert!(status.contains("200"), "{status}");
            if scrape.contains(&eta_series)
                || m.is_finished()
                || t0.elapsed() > Duration::from_secs(20)
            {
                break scrape;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let dom1 = chromium(&lab, &dir, &dashboard, "--dump-dom");
        let shot = dir.join("dashboard.png");
        chromium(
            &lab,
            &dir,
            &dashboard,
            &format!("--screenshot={}", shot.display()),
        );
        let dom2 = chromium(&lab, &dir, &dashboard, "--dump-dom");
        let still_running = !m.is_finished();
        let r = m.join().expect("migration thread");
        (r, (scrape, dom1, dom2, shot, still_running))
    });
    let (scrape, dom1, dom2, shot, still_running) = during;
    let result = match result {
        Ok(r) => r,
        Err(e) => panic!(
            "{e:#}\nsource agent log:\n{}\ndestination agent log:\n{}",
            lab.src_agent().log_text(),
            lab.dst_agent().log_text()
        ),
    };
    assert_eq!(result["status"], "completed", "{result}");
    let v = verify(&pair, result, &scratch_dir(&lab).unwrap()).expect("verification");
    assert_eq!(v.memory.differing_pages, 0);
    assert!(
        still_running,
        "the migration ended before the second dashboard load: slow it down"
    );

    // promtool on the live scrape.
    let scrape_path = dir.join("scrape.txt");
    std::fs::write(&scrape_path, &scrape).unwrap();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let lint = lint.wait_with_output().unwrap();
    let lint_text = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    eprintln!(
        "promtool check metrics: exit {}, output {lint_text:?}",
        lint.status
    );
    assert!(
        lint.status.success() && lint_text.trim().is_empty(),
        "{lint_text}\n{scrape}"
    );
    for want in [
        format!("dwcp_migration_qemu_bytes{{migration=\"{NAME}\",role=\"source\"}}"),
        "dwcp_stream_rtt_seconds{".to_string(),
        "dwcp_migration_codec_tier{".to_string(),
        "# TYPE dwcp_qemu_bytes_total counter".to_string(),
        // What dwcp migrate reports to the agent once a second.
        format!("dwcp_migration_eta_seconds{{migration=\"{NAME}\",role=\"source\"}}"),
        format!("dwcp_migration_remaining_bytes{{migration=\"{NAME}\",role=\"source\"}}"),
        "# TYPE dwcp_migration_downtime_seconds histogram".to_string(),
    ] {
        assert!(
            scrape.contains(&want),
            "{want} not in the live scrape:\n{scrape}"
        );
    }

    // The dashboard: the migration's name and a moving progress figure.
    let p1 = progress_of(&dom1, NAME).unwrap_or_else(|| panic!("no row for {NAME}:\n{dom1}"));
    let p2 = progress_of(&dom2, NAME).unwrap_or_else(|| panic!("no row for {NAME}:\n{dom2}"));
    eprintln!(
        "dashboard progress: {p1:?} then {p2:?}; screenshot {}",
        shot.display()
    );
    assert_ne!(p1, p2, "the progress figure did not move");
    // The ETA dwcp migrate reported, in seconds.
    let eta = cell_of(&dom2, NAME, "eta").unwrap_or_default();
    eprintln!("dashboard ETA: {eta:?}");
    assert!(
        eta.ends_with(" s"),
        "no ETA on the dashboard: {eta:?}\n{dom2}"
    );
    assert!(std::fs::metadata(&shot)
        .map(|m| m.len() > 10_000)
        .unwrap_or(false));

    // Prometheus: wait for a scrape after the end, then read the series back.
    let t0 = Instant::now();
    let completed = loop {
        let r = query(&lab, "dwcp_migrations_total{outcome=\"completed\"} == 1");
        if r.len() == 2 || t0.elapsed() > Duration::from_secs(30) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("prometheus: dwcp_migrations_total{{outcome=\"completed\"}} == 1 -> {completed:?}");
    let roles: Vec<&str> = completed
        .iter()
        .filter_map(|r| r["metric"]["role"].as_str())
        .collect();
    assert!(
        roles.contains(&"source") && roles.contains(&"destination"),
        "both agents' completed migration: {completed:?}\n{}",
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );
    let qemu_bytes = v.result["qemu_bytes"].as_u64().unwrap() as f64;
    // The source sent the QEMU stream, the destination received it (and
    // sent QEMU's return path back).
    let src_inst = format!("{}:{METRICS_PORT}", lab.topo.src_ip);
    let dst_inst = format!("{}:{METRICS_PORT}", lab.topo.dst_ip);
    let sent = query(
        &lab,
        &format!("dwcp_qemu_bytes_total{{direction=\"sent\",instance=\"{src_inst}\"}}"),
    );
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sample_value(&sent[0]), qemu_bytes, "{sent:?}");
    let received = query(
        &lab,
        &format!("dwcp_qemu_bytes_total{{direction=\"received\",instance=\"{dst_inst}\"}}"),
    );
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(sample_value(&received[0]), qemu_bytes, "{received:?}");
    // The downtime dwcp migrate reported once QEMU completed, observed once.
    let t0 = Instant::now();
    let downtime = loop {
        let r = query(
            &lab,
            &format!("dwcp_migration_downtime_seconds_count{{instance=\"{src_inst}\"}}"),
        );
        if r.first().map(sample_value) == Some(1.0) || t0.elapsed() > Duration::from_secs(30) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        downtime.first().map(sample_value),
        Some(1.0),
        "{downtime:?}"
    );
    let wire = query(&lab, "sum(dwcp_wire_bytes_total{direction=\"sent\"})");
    assert!(sample_value(&wire[0]) > 0.0, "{wire:?}");
    // Series only there while it ran: Prometheus saw them mid-flight.
    let progress = query(
        &lab,
        &format!(
            "max_over_time(dwcp_migration_qemu_bytes{{migration=\"{NAME}\",role=\"source\"}}[10m])"
        ),
    );
    assert_eq!(progress.len(), 1, "{progress:?}");
    assert!(sample_value(&progress[0]) > 0.0);
    let rtt = query(
        &lab,
        &format!("count(count_over_time(dwcp_stream_rtt_seconds{{migration=\"{NAME}\"}}[10m]))"),
    );
    assert!(sample_value(&rtt[0]) >= 4.0, "stream RTT series: {rtt:?}");
    let durations = query(
        &lab,
        "dwcp_migration_duration_seconds_count{outcome=\"completed\"} == 1",
    );
    assert_eq!(durations.len(), 2, "{durations:?}");
    let build = query(&lab, "dwcp_build_info");
    assert_eq!(build.len(), 2, "{build:?}");
    eprintln!(
        "prometheus: qemu bytes sent {} received {}, wire sent {}, {} stream RTT series",
        sample_value(&sent[0]),
        sample_value(&received[0]),
        sample_value(&wire[0]),
        sample_value(&rtt[0])
    );

    if let Ok(out) = std::env::var("DWCP_SAVE_RESULTS") {
        let out = PathBuf::from(out);
        let date =
            String::from_utf8(Command::new("date").arg("+%F").output().unwrap().stdout).unwrap();
        let date = date.trim();
        let d1 = out.join(format!("{date}-dashboard"));
        let d2 = out.join(format!("{date}-metrics"));
        std::fs::create_dir_all(&d1).unwrap();
        std::fs::create_dir_all(&d2).unwrap();
        std::fs::copy(&shot, d1.join("dashboard.png")).unwrap();
        std::fs::write(d1.join("dashboard-dom-1.html"), &dom1).unwrap();
        std::fs::write(d2.join("scrape.txt"), &scrape).unwrap();
        let summary = format!(
            "promtool check metrics (live scrape of the source agent mid-migration): exit {}, output {:?}\n\
             dashboard progress figures: {p1:?} then {p2:?}\n\
             prometheus dwcp_migrations_total{{outcome=\"completed\"}} == 1: {}\n\
             prometheus dwcp_qemu_bytes_total sent {} received {} (dwcp migrate: {qemu_bytes})\n",
            lint.status,
            lint_text.trim(),
            serde_json::to_string(&completed).unwrap(),
            sample_value(&sent[0]),
            sample_value(&received[0]),
        );
        std::fs::write(d2.join("summary.txt"), summary).unwrap();
        eprintln!("saved {} and {}", d1.display(), d2.display());
    }
    drop(prom);
}
