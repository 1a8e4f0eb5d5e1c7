//! The load test's results: the summary over the migration records, the
//! HTML report (figures drawn by the benchmark report's SVG charts) and the
//! text summary printed at the end.

use std::fmt::Write as _;

use super::{
    percentile, AgentsSummary, LoadReport, MigrationRecord, ProcFigures, Sample, StressStep,
    Summary,
};
use crate::bench::report::{esc, fmt_num, svg_bars, svg_lines, table};

#[allow(clippy::too_many_arguments)]
pub fn assemble(
    command: String,
    mode: String,
    settings: serde_json::Value,
    agent_args: Vec<String>,
    idle: (ProcFigures, ProcFigures),
    end: (ProcFigures, ProcFigures),
    timeline: Vec<Sample>,
    migrations: Vec<MigrationRecord>,
    stress: Vec<StressStep>,
    stress_verdict: Option<String>,
    wall_s: f64,
) -> LoadReport {
    let ok: Vec<&MigrationRecord> = migrations.iter().filter(|m| m.ok).collect();
    let mut secs: Vec<f64> = ok.iter().map(|m| m.secs).collect();
    secs.sort_by(f64::total_cmp);
    let mut fin: Vec<f64> = ok.iter().map(|m| m.final_ms as f64).collect();
    fin.sort_by(f64::total_cmp);
    let mut setup: Vec<f64> = ok.iter().map(|m| m.setup_ms as f64).collect();
    setup.sort_by(f64::total_cmp);
    let verified: u64 = ok.iter().map(|m| m.verified_bytes).sum();
    let summary = Summary {
        migrations: migrations.len() as u64,
        completed: ok.len() as u64,
        failed: (migrations.len() - ok.len()) as u64,
        verified_bytes: verified,
        wall_s,
        mean_delivered_mb_s: verified as f64 / wall_s.max(1e-3) / 1e6,
        peak_delivered_mb_s: timeline
            .iter()
            .map(|s| s.delivered_mb_s)
            .fold(0.0, f64::max),
        most_in_flight: timeline.iter().map(|s| s.in_flight).max().unwrap_or(0),
        secs_p50: percentile(&secs, 0.5),
        secs_p90: percentile(&secs, 0.9),
        secs_p99: percentile(&secs, 0.99),
        secs_max: secs.last().copied().unwrap_or(0.0),
        passes_mean: if ok.is_empty() {
            0.0
        } else {
            ok.iter().map(|m| m.passes as f64).sum::<f64>() / ok.len() as f64
        },
        final_ms_p50: percentile(&fin, 0.5),
        final_ms_p99: percentile(&fin, 0.99),
        setup_ms_p50: percentile(&setup, 0.5),
        setup_ms_p99: percentile(&setup, 0.99),
    };
    let agents = AgentsSummary {
        src_idle: idle.0,
        dst_idle: idle.1,
        src_end: end.0,
        dst_end: end.1,
        src_peak_rss_mib: timeline.iter().map(|s| s.src.rss_mib).fold(0.0, f64::max),
        dst_peak_rss_mib: timeline.iter().map(|s| s.dst.rss_mib).fold(0.0, f64::max),
        src_peak_threads: timeline.iter().map(|s| s.src.threads).max().unwrap_or(0),
        dst_peak_threads: timeline.iter().map(|s| s.dst.threads).max().unwrap_or(0),
        src_cpu_s: end.0.cpu_s - idle.0.cpu_s,
        dst_cpu_s: end.1.cpu_s - idle.1.cpu_s,
        ..Default::default()
    };
    LoadReport {
        command,
        dwcp_version: env!("CARGO_PKG_VERSION").to_string(),
        started_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(wall_s as u64))
            .unwrap_or(0),
        machine: crate::bench::Machine::probe(),
        mode,
        settings,
        agent_args,
        failures_by_reason: failure_reasons(&migrations),
        summary,
        agents,
        stress,
        stress_verdict,
        timeline,
        migrations,
    }
}

/// A failure's reason with its numbers elided (`N`), to group failures.
pub fn reason_class(e: &str) -> String {
    let mut key = String::new();
    let mut digits = false;
    for ch in e.chars() {
        if ch.is_ascii_digit() {
            if !digits {
                key.push('N');
            }
            digits = true;
        } else {
            digits = false;
            key.push(ch);
        }
    }
    key.chars().take(240).collect()
}

/// Failures grouped by their reason, numbers elided (most frequent first).
fn failure_reasons(m: &[MigrationRecord]) -> Vec<(String, u64)> {
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    for e in m.iter().filter_map(|m| m.error.as_deref()) {
        *by.entry(reason_class(e)).or_default() += 1;
    }
    let mut v: Vec<(String, u64)> = by.into_iter().collect();
    v.sort_by_key(|x| std::cmp::Reverse(x.1));
    v
}

/// Migration times as a histogram: 20 bins from 0 to the slowest.
fn histogram(r: &LoadReport) -> (Vec<String>, Vec<Option<f64>>) {
    let ok: Vec<f64> = r
        .migrations
        .iter()
        .filter(|m| m.ok)
        .map(|m| m.secs)
        .collect();
    let max = ok.iter().copied().fold(0.0, f64::max).max(1e-3);
    let bins = 20usize;
    let w = max / bins as f64;
    let mut counts = vec![0u64; bins];
    for s in ok {
        counts[((s / w) as usize).min(bins - 1)] += 1;
    }
    let cats = (0..bins)
        .map(|i| {
            format!(
                "{}–{} s",
                fmt_num(w * i as f64),
                fmt_num(w * (i + 1) as f64)
            )
        })
        .collect();
    (cats, counts.into_iter().map(|c| Some(c as f64)).collect())
}

fn series(r: &LoadReport, f: impl Fn(&Sample) -> f64) -> Vec<(f64, f64)> {
    r.timeline.iter().map(|s| (s.t_s, f(s))).collect()
}

pub fn html(r: &LoadReport) -> String {
    let s = &r.summary;
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>DWCP load test</title><style>
body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse;margin:.6em 0 1.2em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}} th{{background:#f3f3f3}} td:first-child{{text-align:left}}
small{{color:#777}} .bad{{color:#c00;font-weight:bold}} .good{{color:#070;font-weight:bold}}</style></head><body>
<h1>DWCP load test</h1><p>dwcp {} · command <code>{}</code></p>"#,
        esc(&r.dwcp_version),
        esc(&r.command)
    );
    let verdict = if s.failed == 0 && s.completed > 0 {
        format!(
            r#"<p class="good">{} migrations, all completed and verified byte for byte ({:.1} GiB).</p>"#,
            s.completed,
            s.verified_bytes as f64 / (1u64 << 30) as f64
        )
    } else {
        format!(
            r#"<p class="bad">{} of {} migrations FAILED (reasons below); {} completed and verified.</p>"#,
            s.failed, s.migrations, s.completed
        )
    };
    h.push_str(&verdict);
    if let Some(v) = &r.stress_verdict {
        let _ = write!(h, "<p><b>Stress:</b> {}</p>", esc(v));
    }
    h.push_str("<h2>Settings</h2>");
    let rows: Vec<Vec<String>> = r
        .settings
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| vec![esc(k), esc(v.to_string().trim_matches('"'))])
        .chain(std::iter::once(vec![
            "agent arguments".into(),
            esc(&r.agent_args.join(" ")),
        ]))
        .collect();
    table(&mut h, &["setting", "value"], &rows);

    h.push_str("<h2>Migrations</h2>");
    table(
        &mut h,
        &[
            "migrations",
            "completed",
            "failed",
            "most at once",
            "time p50",
            "p90",
            "p99",
            "max",
            "passes (mean)",
            "final pass p50 / p99",
            "set-up p50 / p99",
            "verified",
            "mean rate",
            "peak rate",
        ],
        &[vec![
            s.migrations.to_string(),
            s.completed.to_string(),
            s.failed.to_string(),
            s.most_in_flight.to_string(),
            format!("{:.2} s", s.secs_p50),
            format!("{:.2} s", s.secs_p90),
            format!("{:.2} s", s.secs_p99),
            format!("{:.2} s", s.secs_max),
            format!("{:.1}", s.passes_mean),
            format!("{:.0} / {:.0} ms", s.final_ms_p50, s.final_ms_p99),
            format!("{:.0} / {:.0} ms", s.setup_ms_p50, s.setup_ms_p99),
            format!("{:.2} GiB", s.verified_bytes as f64 / (1u64 << 30) as f64),
            format!("{:.0} MB/s", s.mean_delivered_mb_s),
            format!("{:.0} MB/s", s.peak_delivered_mb_s),
        ]],
    );
    let (cats, counts) = histogram(r);
    h.push_str(&svg_bars(
        "Migration time (completed migrations)",
        "migrations",
        &cats,
        &[("migrations".into(), counts)],
    ));
    h.push_str(&svg_lines(
        "Aggregate rate delivered by the destination agent",
        "s",
        "MB/s",
        &[("delivered".into(), series(r, |x| x.delivered_mb_s))],
    ));
    h.push_str(&svg_lines(
        "Migrations",
        "s",
        "guests",
        &[
            ("allowed (ramp)".into(), series(r, |x| x.active as f64)),
            ("migrating".into(), series(r, |x| x.in_flight as f64)),
        ],
    ));
    if !r.stress.is_empty() {
        h.push_str("<h2>Stress ramp</h2>");
        let rows: Vec<Vec<String>> = r
            .stress
            .iter()
            .map(|x| {
                vec![
                    x.vms.to_string(),
                    format!("{:.1}", x.delivered_mb_s),
                    format!("{:.2}", x.delivered_gbit_s),
                    x.completed.to_string(),
                    x.failed.to_string(),
                    format!("{:.0} %", x.src_cpu_pct),
                    format!("{:.0} %", x.dst_cpu_pct),
                ]
            })
            .collect();
        table(
            &mut h,
            &[
                "guests at once",
                "MB/s",
                "Gbit/s",
                "completed",
                "failed",
                "source agent CPU",
                "destination agent CPU",
            ],
            &rows,
        );
        h.push_str(&svg_bars(
            "Aggregate rate by guests migrating at once",
            "MB/s",
            &r.stress
                .iter()
                .map(|x| x.vms.to_string())
                .collect::<Vec<_>>(),
            &[(
                "delivered".into(),
                r.stress.iter().map(|x| Some(x.delivered_mb_s)).collect(),
            )],
        ));
    }

    h.push_str("<h2>Agents</h2>");
    let a = &r.agents;
    let row = |who: &str, idle: &ProcFigures, end: &ProcFigures, peak: f64, thr: u64, cpu: f64| {
        vec![
            who.to_string(),
            format!("{:.0} MiB", idle.rss_mib),
            format!("{peak:.0} MiB"),
            format!("{:.0} MiB", end.hwm_mib),
            format!("{:.0} MiB", end.rss_mib),
            format!("{} → {thr} → {}", idle.threads, end.threads),
            format!("{} → {}", idle.fds, end.fds),
            format!("{cpu:.1} s"),
        ]
    };
    table(
        &mut h,
        &[
            "agent",
            "RSS idle",
            "RSS peak (sampled)",
            "VmHWM",
            "RSS after",
            "threads idle → peak → after",
            "fds idle → after",
            "CPU (utime+stime)",
        ],
        &[
            row(
                "source",
                &a.src_idle,
                &a.src_end,
                a.src_peak_rss_mib,
                a.src_peak_threads,
                a.src_cpu_s,
            ),
            row(
                "destination",
                &a.dst_idle,
                &a.dst_end,
                a.dst_peak_rss_mib,
                a.dst_peak_threads,
                a.dst_cpu_s,
            ),
        ],
    );
    let _ = write!(
        h,
        "<p>The load test process (the guests' streams, the sinks, and on wan, internet and lossy the link emulator's forwarder) used {:.1} CPU s. Load average at the start {}, at the end {}.</p>",
        a.generator_cpu_s,
        esc(&a.loadavg_start),
        esc(&a.loadavg_end)
    );
    h.push_str(&svg_lines(
        "Agent CPU (utime + stime, % of one core)",
        "s",
        "%",
        &[
            ("source".into(), series(r, |x| x.src.cpu_pct)),
            ("destination".into(), series(r, |x| x.dst.cpu_pct)),
        ],
    ));
    h.push_str(&svg_lines(
        "Agent resident memory",
        "s",
        "MiB",
        &[
            ("source".into(), series(r, |x| x.src.rss_mib)),
            ("destination".into(), series(r, |x| x.dst.rss_mib)),
        ],
    ));
    h.push_str(&svg_lines(
        "Agent threads",
        "s",
        "threads",
        &[
            ("source".into(), series(r, |x| x.src.threads as f64)),
            ("destination".into(), series(r, |x| x.dst.threads as f64)),
        ],
    ));

    h.push_str("<h2>Failures</h2>");
    if r.failures_by_reason.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        let rows: Vec<Vec<String>> = r
            .failures_by_reason
            .iter()
            .map(|(why, n)| vec![esc(why), n.to_string()])
            .collect();
        table(&mut h, &["reason (numbers as N)", "migrations"], &rows);
    }
    let m = &r.machine;
    let _ = write!(
        h,
        "<h2>Machine</h2><p>{} · {} × {} · {} MiB RAM · Linux {}</p><p>Every migration: the JSON beside this file.</p></body></html>",
        esc(&m.hostname),
        m.cpus,
        esc(&m.cpu_model),
        m.mem_mib,
        esc(&m.kernel)
    );
    h
}

/// The summary printed at the end of a run.
pub fn text(r: &LoadReport) -> String {
    let s = &r.summary;
    let a = &r.agents;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "migrations: {} completed, {} failed (most at once {}); {:.2} GiB verified byte for byte",
        s.completed,
        s.failed,
        s.most_in_flight,
        s.verified_bytes as f64 / (1u64 << 30) as f64
    );
    let _ = writeln!(
        t,
        "time per migration: p50 {:.2} s, p90 {:.2} s, p99 {:.2} s, max {:.2} s; {:.1} passes on average, final pass p50 {:.0} ms; set-up (expect + route) p50 {:.0} ms, p99 {:.0} ms",
        s.secs_p50, s.secs_p90, s.secs_p99, s.secs_max, s.passes_mean, s.final_ms_p50,
        s.setup_ms_p50, s.setup_ms_p99
    );
    let _ = writeln!(
        t,
        "aggregate: {:.0} MB/s mean over {:.0} s, {:.0} MB/s peak",
        s.mean_delivered_mb_s, s.wall_s, s.peak_delivered_mb_s
    );
    for (who, idle, end, peak, thr, cpu) in [
        (
            "source",
            &a.src_idle,
            &a.src_end,
            a.src_peak_rss_mib,
            a.src_peak_threads,
            a.src_cpu_s,
        ),
        (
            "destination",
            &a.dst_idle,
            &a.dst_end,
            a.dst_peak_rss_mib,
            a.dst_peak_threads,
            a.dst_cpu_s,
        ),
    ] {
        let _ = writeln!(
            t,
            "{who} agent: RSS {:.0} MiB idle, {peak:.0} MiB peak (VmHWM {:.0}), {:.0} MiB after; threads {} / {thr} / {}; CPU {cpu:.1} s",
            idle.rss_mib, end.hwm_mib, end.rss_mib, idle.threads, end.threads
        );
    }
    let _ = writeln!(
        t,
        "load test process: CPU {:.1} s; load average {} at the start, {} at the end",
        a.generator_cpu_s, a.loadavg_start, a.loadavg_end
    );
    if let Some(v) = &r.stress_verdict {
        let _ = writeln!(t, "stress: {v}");
    }
    for (why, n) in r.failures_by_reason.iter().take(5) {
        let _ = writeln!(t, "failed ({n}x): {why}");
    }
    t
}
