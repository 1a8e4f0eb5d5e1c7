//! `dwcp benchmark compare --baseline A.json --current B.json`: two results
//! files side by side, nothing run. For every profile and contender present in
//! both: the median (and range) of total time, downtime, bytes on the wire and
//! CPU per GiB, and the ratio current / baseline.
//!
//! The files are read as JSON values, not as the current schema, so results
//! written by an older `dwcp` still compare.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The figures compared, as (key in a contender summary, label, unit divisor, unit).
const METRICS: &[(&str, &str, f64, &str)] = &[
    ("total_time_ms", "total time", 1000.0, "s"),
    ("downtime_ms", "downtime (QEMU)", 1.0, "ms"),
    ("guest_pause_ms", "guest pause", 1.0, "ms"),
    ("wire_bytes", "bytes on the wire", 1048576.0, "MiB"),
    ("cpu_s_per_gib", "CPU s per GiB", 1.0, "s"),
];

fn load(p: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?;
    if v["compare"].as_array().is_none() {
        bail!(
            "{}: no \"compare\" suites (not a dwcp benchmark results.json?)",
            p.display()
        );
    }
    Ok(v)
}

/// What identifies a suite's guest, alike in schema 1 and 2: an own guest
/// by its RAM and QEMU arguments (schema 1 also wrote the unused test-guest
/// fields for it), the test guest by its workload fields.
fn guest_key(g: &Value) -> Value {
    if g.get("qemu_args").is_some_and(|a| !a.is_null()) {
        return serde_json::json!({"mem_mb": g["mem_mb"], "qemu_args": g["qemu_args"]});
    }
    let mut k = g.clone();
    if let Some(o) = k.as_object_mut() {
        o.remove("kind");
        o.retain(|_, v| !v.is_null());
    }
    k
}

fn stat(s: &Value, key: &str, div: f64) -> Option<(f64, f64, f64)> {
    let st = &s[key];
    Some((
        st["median"].as_f64()? / div,
        st["min"].as_f64()? / div,
        st["max"].as_f64()? / div,
    ))
}

/// Builds the comparison as text (a Markdown table per profile).
pub fn compare(baseline: &Path, current: &Path) -> Result<String> {
    let (b, c) = (load(baseline)?, load(current)?);
    let mut out = format!(
        "baseline: {} ({})\ncurrent:  {} ({})\n",
        baseline.display(),
        b["command"].as_str().unwrap_or("?"),
        current.display(),
        c["command"].as_str().unwrap_or("?"),
    );
    let mut rows = 0;
    for cs in c["compare"].as_array().into_iter().flatten() {
        let profile = cs["profile"].as_str().unwrap_or("?");
        let Some(bs) = b["compare"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["profile"] == cs["profile"])
        else {
            out.push_str(&format!("\nprofile {profile}: not in the baseline\n"));
            continue;
        };
        if guest_key(&bs["guest"]) != guest_key(&cs["guest"]) {
            out.push_str(&format!(
                "\nprofile {profile}: WARNING the guests differ: baseline {} / current {}\n",
                bs["guest"], cs["guest"]
            ));
        }
        out.push_str(&format!(
            "\nprofile {profile}\n\n| contender | figure | baseline median [range] | current median [range] | current / baseline |\n|---|---|---|---|---|\n"
        ));
        for cur in cs["summary"].as_array().into_iter().flatten() {
            let name = &cur["contender"];
            let Some(base) = bs["summary"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| &s["contender"] == name)
            else {
                continue;
            };
            for (key, label, div, unit) in METRICS {
                let (Some(x), Some(y)) = (stat(base, key, *div), stat(cur, key, *div)) else {
                    continue;
                };
                let ratio = if x.0 > 0.0 {
                    format!("{:.2}", y.0 / x.0)
                } else {
                    "-".into()
                };
                out.push_str(&format!(
                    "| {} | {label} | {:.2} {unit} [{:.2}-{:.2}] | {:.2} {unit} [{:.2}-{:.2}] | {ratio} |\n",
                    name.as_str().unwrap_or("?"),
                    x.0, x.1, x.2, y.0, y.1, y.2
                ));
                rows += 1;
            }
        }
    }
    if rows == 0 {
        bail!(
            "{} and {} have no profile and contender in common",
            baseline.display(),
            current.display()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_of_schema_1_and_2_compare_alike() {
        let v1 = serde_json::json!({"mem_mb": 512, "fill_mb": 256, "dirty_mbps": 8, "seed": 1,
                                    "mix": "realistic", "accel": "tcg"});
        let v2 = serde_json::json!({"kind": "test_guest", "mem_mb": 512, "fill_mb": 256,
                                    "dirty_mbps": 8, "seed": 1, "mix": "realistic", "accel": "tcg"});
        assert_eq!(guest_key(&v1), guest_key(&v2));
        let own1 = serde_json::json!({"mem_mb": 2048, "fill_mb": 256, "dirty_mbps": 8, "seed": 1,
                                      "mix": "realistic", "accel": "tcg", "qemu_args": ["-m", "2G"]});
        let own2 = serde_json::json!({"kind": "own", "mem_mb": 2048, "qemu_args_file": "a",
                                      "qemu_args": ["-m", "2G"]});
        assert_eq!(guest_key(&own1), guest_key(&own2));
        assert_ne!(guest_key(&v2), guest_key(&own2));
    }

    fn file(dir: &Path, name: &str, median: f64) -> std::path::PathBuf {
        let v = serde_json::json!({"command": name, "compare": [{
            "profile": "dc", "guest": {"mem_mb": 1024},
            "summary": [{"contender": "dwcp",
                "total_time_ms": {"median": median, "min": median, "max": median, "n": 1}}]}]});
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    #[test]
    fn ratios_of_common_contenders() {
        let dir = std::env::temp_dir().join(format!("dwcp-baseline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (file(&dir, "a.json", 2000.0), file(&dir, "b.json", 1500.0));
        let t = compare(&a, &b).unwrap();
        assert!(
            t.contains("| dwcp | total time | 2.00 s [2.00-2.00] | 1.50 s [1.50-1.50] | 0.75 |"),
            "{t}"
        );
        std::fs::write(dir.join("x.json"), "{}").unwrap();
        let e = compare(&a, &dir.join("x.json")).unwrap_err().to_string();
        assert!(e.contains("no \"compare\" suites"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
