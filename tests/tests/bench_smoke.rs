//! CI's smoke version of `dwcp benchmark` (the full suite is `make bench-full`
//! and `dwcp benchmark run`): one small interleaved compare on the unshaped
//! link and a codec-tier measurement, checking that the outputs are complete
//! and honest (every completed run verified, schema fields present, the
//! report and its figures written). Needs root (namespaces) and QEMU 10.0.

use std::process::Command;

use dwcp_lab::dwcp_bin;
use serde_json::Value;

fn bench(args: &[&str], out: &std::path::Path) -> Value {
    let o = Command::new(dwcp_bin().unwrap())
        .args(["--log", "warn", "benchmark"])
        .args(args)
        .arg("--output")
        .arg(out)
        .output()
        .expect("dwcp benchmark");
    assert!(
        o.status.success(),
        "dwcp benchmark {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    serde_json::from_str(&text).expect("results.json parses")
}

#[test]
fn compare_smoke_writes_verified_runs_and_a_report() {
    let out = std::env::temp_dir().join(format!("dwcp-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let r = bench(
        &[
            "compare",
            "--profile",
            "dc",
            "--guest-mem",
            "256",
            "--fill",
            "96",
            "--dirty-rate",
            "4",
            "--contenders",
            "qemu-tcp,dwcp",
            "--timeout",
            "120",
        ],
        &out,
    );
    assert_eq!(r["schema_version"], 2);
    let suite = &r["compare"][0];
    assert_eq!(suite["profile"], "dc");
    // The guest block describes the guest that ran: the test guest here.
    let g = &suite["guest"];
    assert_eq!(g["kind"], "test_guest", "{g}");
    assert_eq!(
        (g["mem_mb"].as_u64(), g["fill_mb"].as_u64()),
        (Some(256), Some(96)),
        "{g}"
    );
    let runs = suite["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{suite}");
    for run in runs {
        assert_eq!(run["outcome"], "completed", "{run}");
        assert_eq!(run["memory_verified"], true, "{run}");
        assert!(run["total_time_ms"].as_u64().unwrap() > 0, "{run}");
        assert!(
            run["ram_bytes"].as_u64().unwrap() > 90 << 20,
            "QEMU sent less than the guest's content: {run}"
        );
        assert!(run["wire_bytes"].as_u64().unwrap() > 0, "{run}");
        assert!(!run["timeline"].as_array().unwrap().is_empty(), "{run}");
    }
    for c in suite["summary"].as_array().unwrap() {
        assert_eq!(c["converged"], 1, "{c}");
        assert_eq!(c["total_time_ms"]["n"], 1, "{c}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).expect("report.html");
    assert!(html.contains("<svg") && html.contains("qemu-tcp") && html.contains("dwcp"));
    // Only what ran: the compare, the guest it migrated, one line for the rest.
    assert!(
        !html.contains("not measured"),
        "rows of \"not measured\" in the report"
    );
    assert!(html.contains("In this file: compare (dc). Not run: converge, hde, amst, consensus"));
    assert!(html.contains(
        "the test guest (tests/guest): 256 MiB RAM, 96 MiB realistic content, rewriting 4 MiB/s"
    ));
    for f in [
        "compare_total_time.svg",
        "compare_wire_bytes.svg",
        "timeline.svg",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn hde_smoke_measures_every_tier_losslessly() {
    let out = std::env::temp_dir().join(format!("dwcp-hde-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let r = bench(&["hde", "--data-size", "8"], &out);
    let sets = r["hde"]["datasets"].as_array().expect("datasets");
    assert!(!sets.is_empty());
    for d in sets {
        for t in d["tiers"].as_array().unwrap() {
            assert_eq!(t["roundtrip_ok"], true, "{t}");
            assert!(t["ratio"].as_f64().unwrap() >= 0.99, "{t}");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}
