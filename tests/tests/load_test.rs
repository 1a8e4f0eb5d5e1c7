//! CI's short `dwcp load-test` (the long runs are `make load-test`): four
//! synthetic guests migrating back to back through two real agents over the
//! link emulator, every migration verified byte for byte at the destination;
//! and the agent's session limit binding: with `--max-sessions 1` the
//! migrations past it are refused, counted as failures with the limit named,
//! and the run fails. Needs root (namespaces).

use std::path::Path;
use std::process::{Command, Output};

use dwcp_lab::dwcp_bin;
use serde_json::Value;

fn load_test(args: &[&str], report: &Path) -> (Output, Value) {
    let o = Command::new(dwcp_bin().unwrap())
        .args(["--log", "warn", "load-test"])
        .args(args)
        .arg("--report")
        .arg(report)
        .output()
        .expect("dwcp load-test");
    let json = report.with_extension("json");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\nstderr:\n{}",
            json.display(),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (
        o,
        serde_json::from_str(&text).expect("the report's JSON parses"),
    )
}

fn out_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dwcp-load-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn four_guests_migrate_back_to_back_and_every_byte_is_verified() {
    let d = out_dir("smoke");
    let report = d.join("lt.html");
    let (o, r) = load_test(
        &[
            "--vms",
            "4",
            "--duration",
            "10s",
            "--ramp-up",
            "2s",
            "--vm-size",
            "16MiB",
            "--dirty-rate",
            "2MiB/s",
        ],
        &report,
    );
    assert!(
        o.status.success(),
        "dwcp load-test failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    let s = &r["summary"];
    assert_eq!(s["failed"], 0, "{s}\n{}", r["failures_by_reason"]);
    assert!(s["completed"].as_u64().unwrap() >= 4, "{s}");
    let migrations = r["migrations"].as_array().unwrap();
    for m in migrations {
        assert_eq!(m["ok"], true, "{m}");
        // What the destination delivered is what was sent (length and hash),
        // and more than the guest's non-zero pages.
        assert_eq!(m["verified_bytes"], m["bytes"], "{m}");
        assert!(m["bytes"].as_u64().unwrap() > 8 << 20, "{m}");
        assert!(m["passes"].as_u64().unwrap() >= 1, "{m}");
    }
    let vms: std::collections::BTreeSet<u64> = migrations
        .iter()
        .map(|m| m["vm"].as_u64().unwrap())
        .collect();
    assert_eq!(vms.len(), 4, "every guest migrated: {vms:?}");
    assert!(
        migrations.iter().any(|m| m["seq"].as_u64().unwrap() >= 1),
        "a guest migrated again, back to back (the expect of its next \
         migration survives the end of the last)"
    );
    assert!(s["secs_p99"].as_f64().unwrap() >= s["secs_p50"].as_f64().unwrap());
    let tl = r["timeline"].as_array().unwrap();
    assert!(tl.len() >= 5, "sampled once a second");
    assert!(tl
        .iter()
        .all(|x| x["src"]["rss_mib"].as_f64().unwrap() > 1.0
            && x["dst"]["rss_mib"].as_f64().unwrap() > 1.0));
    assert!(r["agents"]["src_cpu_s"].as_f64().unwrap() > 0.0);
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.matches("<svg").count() >= 6, "figures in the report");
    assert!(html.contains("all completed and verified"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn migrations_past_max_sessions_are_refused_with_the_limit_named() {
    let d = out_dir("limit");
    let (o, r) = load_test(
        &[
            "--vms",
            "3",
            "--duration",
            "6s",
            "--ramp-up",
            "0",
            "--vm-size",
            "32MiB",
            "--max-sessions",
            "1",
        ],
        &d.join("lt.html"),
    );
    assert!(!o.status.success(), "refusals are failures of the run");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("migrations failed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = &r["summary"];
    assert!(s["failed"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["completed"].as_u64().unwrap() > 0,
        "the one admitted completes: {s}"
    );
    let reasons = r["failures_by_reason"].to_string();
    assert!(reasons.contains("--max-sessions"), "{reasons}");
    // A refused migration never reaches the destination's "QEMU".
    for m in r["migrations"].as_array().unwrap() {
        if m["ok"] == false {
            assert_eq!(m["verified_bytes"], 0, "{m}");
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}
