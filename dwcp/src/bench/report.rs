//! `report.html` (self-contained, inline SVG) and the SVG figures. The
//! sections follow the Phase 5 benchmark template, but the report shows
//! only what the file holds: a line at the top names the suites run and
//! those not, and the template's items no run here can measure are one
//! line at the end, not rows of "not measured".
//!
//! Over 800 lines on purpose: the report is one document, written section by
//! section in the template's order; splitting it would scatter one page.

use std::fmt::Write as _;

use super::micro::pct;
use super::schema::{CompareSuite, ContenderSummary, GuestKind, Results, Stat};

const COLORS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f",
];

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let e = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * e {
            return m * e;
        }
    }
    10.0 * e
}

/// Grouped bar chart: one group per category, one bar per series.
pub(crate) fn svg_bars(
    title: &str,
    unit: &str,
    cats: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> String {
    let (w, h, l, b, t) = (760.0, 340.0, 70.0, 90.0, 40.0);
    let ph = h - b - t;
    let max = nice_max(
        series
            .iter()
            .flat_map(|(_, v)| v.iter().flatten())
            .fold(0.0f64, |a, &x| a.max(x)),
    );
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for i in 0..=4 {
        let y = t + ph - ph * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            w - 10.0,
            l - 4.0,
            y + 4.0,
            fmt_num(max * i as f64 / 4.0)
        );
    }
    let _ = write!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        t + ph / 2.0,
        t + ph / 2.0,
        esc(unit)
    );
    let gw = (w - l - 10.0) / cats.len().max(1) as f64;
    let bw = (gw * 0.8) / series.len().max(1) as f64;
    for (ci, c) in cats.iter().enumerate() {
        let gx = l + gw * ci as f64 + gw * 0.1;
        for (si, (_, vals)) in series.iter().enumerate() {
            let x = gx + bw * si as f64;
            match vals.get(ci).copied().flatten() {
                Some(v) => {
                    let bh = ph * v / max;
                    let _ = write!(
                        s,
                        r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"><title>{}</title></rect>"#,
                        t + ph - bh,
                        bw * 0.95,
                        COLORS[si % COLORS.len()],
                        fmt_num(v)
                    );
                }
                None => {
                    let _ = write!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#c00">✗</text>"##,
                        x + bw / 2.0,
                        t + ph - 4.0
                    );
                }
            }
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" transform="rotate(-30 {:.1} {:.1})">{}</text>"#,
            gx + gw * 0.4,
            t + ph + 14.0,
            gx + gw * 0.4,
            t + ph + 14.0,
            esc(c)
        );
    }
    legend(&mut s, series.iter().map(|(n, _)| n.as_str()), w);
    s.push_str("</svg>");
    s
}

fn legend<'a>(s: &mut String, names: impl Iterator<Item = &'a str>, w: f64) {
    for (i, n) in names.enumerate() {
        let y = 30.0 + 14.0 * i as f64;
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            w - 150.0,
            y,
            COLORS[i % COLORS.len()],
            w - 136.0,
            y + 9.0,
            esc(n)
        );
    }
}

/// Line chart of (x, y) series.
pub(crate) fn svg_lines(
    title: &str,
    xl: &str,
    yl: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let (w, h, l, b, t) = (760.0, 320.0, 70.0, 45.0, 40.0);
    let (pw, ph) = (w - l - 20.0, h - b - t);
    let xmax = nice_max(
        series
            .iter()
            .flat_map(|(_, v)| v)
            .fold(0.0f64, |a, p| a.max(p.0)),
    );
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|(_, v)| v)
            .fold(0.0f64, |a, p| a.max(p.1)),
    );
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for i in 0..=4 {
        let y = t + ph - ph * i as f64 / 4.0;
        let x = l + pw * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            l + pw,
            l - 4.0,
            y + 4.0,
            fmt_num(ymax * i as f64 / 4.0),
            t + ph + 14.0,
            fmt_num(xmax * i as f64 / 4.0)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        l + pw / 2.0,
        h - 8.0,
        esc(xl),
        t + ph / 2.0,
        t + ph / 2.0,
        esc(yl)
    );
    for (i, (_, pts)) in series.iter().enumerate() {
        let d: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", l + pw * x / xmax, t + ph - ph * y / ymax))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            COLORS[i % COLORS.len()],
            d.join(" ")
        );
    }
    legend(&mut s, series.iter().map(|(n, _)| n.as_str()), w);
    s.push_str("</svg>");
    s
}

pub(crate) fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn st(s: &Option<Stat>, scale: f64, prec: usize) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n <= 1 => format!("{:.*}", prec, s.median / scale),
        Some(s) => format!(
            "{:.*} <small>[{:.*}–{:.*}]</small>",
            prec,
            s.median / scale,
            prec,
            s.min / scale,
            prec,
            s.max / scale
        ),
    }
}

fn med(s: &Option<Stat>) -> Option<f64> {
    s.as_ref().map(|s| s.median)
}

pub(crate) fn table(h: &mut String, head: &[&str], rows: &[Vec<String>]) {
    h.push_str("<table><tr>");
    for c in head {
        let _ = write!(h, "<th>{c}</th>");
    }
    h.push_str("</tr>");
    for r in rows {
        h.push_str("<tr>");
        for c in r {
            let _ = write!(h, "<td>{c}</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
}

fn find<'a>(
    r: &'a Results,
    profile: &str,
    c: &str,
) -> Option<(&'a CompareSuite, &'a ContenderSummary)> {
    r.compare
        .iter()
        .filter(|s| s.profile == profile)
        .find_map(|s| s.summary.iter().find(|x| x.contender == c).map(|x| (s, x)))
}

/// Throughput over time (Mbit/s on the wire) from cumulative samples.
fn rate_series(run: &super::schema::RunResult) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut prev: Option<(u64, u64)> = None;
    for s in &run.timeline {
        match prev {
            Some((t, b)) if s.t_ms >= t + 400 => {
                let mbit = (s.wire_bytes.saturating_sub(b)) as f64 * 8.0
                    / ((s.t_ms - t) as f64 / 1000.0)
                    / 1e6;
                out.push((s.t_ms as f64 / 1000.0, mbit));
                prev = Some((s.t_ms, s.wire_bytes));
            }
            Some(_) => {}
            None => prev = Some((s.t_ms, s.wire_bytes)),
        }
    }
    out
}

/// Returns the HTML and the SVG figures (file name, content).
pub fn render(r: &Results) -> (String, Vec<(String, String)>) {
    let mut svgs: Vec<(String, String)> = Vec::new();
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>DWCP benchmark report</title><style>
body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse;margin:.6em 0 1.2em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}} th{{background:#f3f3f3}} td:first-child{{text-align:left}}
small{{color:#777}} i{{color:#886}} .bad{{color:#c00;font-weight:bold}}</style></head><body>
<h1>DWCP benchmark report</h1><p>dwcp {} · results schema v{} · command <code>{}</code></p>"#,
        esc(&r.dwcp_version),
        r.schema_version,
        esc(&r.command)
    );
    if r.corrupted_runs() > 0 {
        let _ = write!(
            h,
            r#"<p class="bad">{} run(s) CORRUPTED the guest: see the runs table.</p>"#,
            r.corrupted_runs()
        );
    }
    for e in &r.errors {
        let _ = write!(h, r#"<p class="bad">error: {}</p>"#, esc(e));
    }

    // ---- Executive summary.
    // Which suites this file holds; the report shows only those.
    let ran = ran_and_not(r);
    let _ = write!(h, r#"<p class="ran">{}</p>"#, esc(&ran));

    // ---- Executive summary: only the indicators this file measured.
    let mut kpi: Vec<Vec<String>> = Vec::new();
    let mut row = |name: &str, target: &str, got: Option<String>| {
        if let Some(g) = got {
            kpi.push(vec![name.into(), target.into(), g]);
        }
    };
    let best_amst = r
        .amst
        .iter()
        .flat_map(|a| a.points.iter().filter(|p| p.ok).map(move |p| (a, p)))
        .max_by(|a, b| a.1.mbit_s.total_cmp(&b.1.mbit_s));
    row(
        "Datacenter throughput (agents, no QEMU)",
        "≥2.4 GB/s",
        best_amst.map(|(a, p)| {
            format!(
                "{:.2} GB/s ({} streams, {})",
                p.mbit_s / 8000.0,
                p.streams,
                a.profile
            )
        }),
    );
    row(
        "Datacenter VM migration downtime (dwcp)",
        "<500 ms",
        find(r, "dc", "dwcp").map(|(s, c)| {
            format!(
                "{} ms ({})",
                st(&c.downtime_ms, 1.0, 0),
                esc(&s.guest.short())
            )
        }),
    );
    let hde_ratio = r.hde.as_ref().and_then(|hd| {
        hd.datasets
            .first()
            .and_then(|d| d.tiers.iter().find(|t| t.tier.starts_with("zstd")))
    });
    row(
        "Internet compression (size reduction, zstd tier, guest image)",
        "75–85 %",
        hde_ratio.map(|t| {
            format!(
                "{:.0} % (ratio {:.2})",
                (1.0 - 1.0 / t.ratio) * 100.0,
                t.ratio
            )
        }),
    );
    row(
        "Internet 2 GB VM migration",
        "<90 s",
        r.compare
            .iter()
            .find(|s| s.profile == "internet" && s.guest.mem_mb >= 2048)
            .and_then(|s| s.summary.iter().find(|c| c.contender == "dwcp"))
            .map(|c| format!("{} s", st(&c.total_time_ms, 1000.0, 1))),
    );
    row(
        "Consensus latency (datacenter)",
        "<100 ms",
        r.consensus.first().map(|b| {
            format!(
                "p50 {:.2} ms, p99 {:.2} ms ({} nodes, loopback)",
                b.p50_ms, b.p99_ms, b.nodes
            )
        }),
    );
    if !kpi.is_empty() {
        h.push_str("<h2>Executive summary: key indicators</h2>");
        table(&mut h, &["Component", "Target", "Achieved"], &kpi);
    }

    // ---- 1.1 AMST.
    let lossy = find(r, "lossy", "dwcp");
    if !r.amst.is_empty() || r.hde.is_some() || !r.consensus.is_empty() || lossy.is_some() {
        h.push_str("<h2>1. Component benchmarks</h2>");
    }
    if !r.amst.is_empty() {
        amst_section(&mut h, &mut svgs, r);
    }
    if let Some(hd) = &r.hde {
        hde_section(&mut h, hd);
    }
    if !r.consensus.is_empty() {
        consensus_section(&mut h, r);
    }
    if let Some((_, c)) = lossy {
        h.push_str("<h3>1.5 Transport under loss</h3>");
        table(
            &mut h,
            &["Scenario", "Throughput (dwcp, wire)", "Total time"],
            &[vec![
                "1 % loss (lossy profile: 50 Mbit/s, 150 ms RTT)".into(),
                format!("{} Mbit/s", st(&c.wire_mbit_s, 1.0, 1)),
                format!("{} s", st(&c.total_time_ms, 1000.0, 1)),
            ]],
        );
    }
    migration_section(&mut h, &mut svgs, r);

    // ---- Appendix.
    let m = &r.machine;
    let _ = write!(
        h,
        "<h2>Appendix B: test environment</h2><p>{} · {} × {} · {} MiB RAM · Linux {} · {}</p><p>Raw data: results.json next to this file.</p><p class=\"never\"><small>Never measured by this suite (no hardware, feature or machines for it; docs/benchmarks.md): {}.</small></p></body></html>",
        esc(&m.hostname),
        m.cpus,
        esc(&m.cpu_model),
        m.mem_mib,
        esc(&m.kernel),
        esc(&m.qemu),
        NEVER_MEASURED
    );
    (h, svgs)
}

/// The template's items no run here can measure, in one line at the end.
const NEVER_MEASURED: &str =
    "RDMA, 512 streams (the transport allows 256), runtime mode switching \
    (DWCP fixes tier and streams per route), snappy, a bandwidth predictor, BFT consensus, bulk \
    state sync, consensus over a real WAN, 5 % loss, concurrent migrations, 10–1000 node \
    clusters, VMware and Hyper-V, long-running stress";

/// Which suites the file holds, and which not: one line at the top.
fn ran_and_not(r: &Results) -> String {
    let mut ran = Vec::new();
    let mut not = Vec::new();
    let profiles = |v: Vec<&str>| v.join(", ");
    if r.compare.is_empty() {
        not.push("compare".to_string());
    } else {
        ran.push(format!(
            "compare ({})",
            profiles(r.compare.iter().map(|s| s.profile.as_str()).collect())
        ));
    }
    if r.converge.is_empty() {
        not.push("converge".into());
    } else {
        ran.push(format!(
            "converge ({})",
            profiles(r.converge.iter().map(|s| s.profile.as_str()).collect())
        ));
    }
    for (name, present) in [
        ("hde", r.hde.is_some()),
        ("amst", !r.amst.is_empty()),
        ("consensus", !r.consensus.is_empty()),
    ] {
        if present {
            ran.push(name.into());
        } else {
            not.push(name.into());
        }
    }
    let mut t = format!(
        "In this file: {}.",
        if ran.is_empty() {
            "nothing".to_string()
        } else {
            ran.join(", ")
        }
    );
    if !not.is_empty() {
        t.push_str(&format!(
            " Not run: {} (dwcp benchmark run runs the whole suite).",
            not.join(", ")
        ));
    }
    t
}

fn amst_section(h: &mut String, svgs: &mut Vec<(String, String)>, r: &Results) {
    h.push_str("<h3>1.1 AMST (multi-stream transport)</h3><h4>1.1.1 Transport throughput</h4>");
    let p8 = r
        .amst
        .iter()
        .flat_map(|a| {
            a.points
                .iter()
                .filter(|p| p.ok && p.streams == 8)
                .map(move |p| (a, p))
        })
        .next();
    if let Some((a, p)) = p8 {
        table(
            h,
            &["Scenario", "Throughput", "Streams", "Target"],
            &[vec![
                "TCP (8 streams, codec none)".into(),
                format!("{:.2} GB/s ({})", p.mbit_s / 8000.0, a.profile),
                "8".into(),
                "≥2.4 GB/s".into(),
            ]],
        );
    }
    h.push_str("<h4>1.1.2 Stream scalability</h4>");
    for a in &r.amst {
        let _ = write!(
            h,
            "<p>Profile <b>{}</b>, {} MiB of incompressible data per point through the two agents (codec none, dedup off), a sink reading on the destination.</p>",
            esc(&a.profile),
            a.data_bytes >> 20
        );
        let rows: Vec<Vec<String>> = a
            .points
            .iter()
            .map(|p| {
                if p.ok {
                    vec![
                        p.streams.to_string(),
                        format!("{:.2} GB/s ({:.0} Mbit/s)", p.mbit_s / 8000.0, p.mbit_s),
                        format!("{:.0} %", p.efficiency * 100.0),
                        format!("{:.2}", p.agent_cpu_s),
                    ]
                } else {
                    vec![
                        p.streams.to_string(),
                        format!("failed: {}", esc(p.error.as_deref().unwrap_or(""))),
                        "–".into(),
                        "–".into(),
                    ]
                }
            })
            .collect();
        table(
            h,
            &[
                "Streams",
                "Throughput",
                "Efficiency vs 1 stream",
                "Agent CPU s",
            ],
            &rows,
        );
        let pts: Vec<(f64, f64)> = a
            .points
            .iter()
            .filter(|p| p.ok)
            .map(|p| (p.streams as f64, p.mbit_s))
            .collect();
        let svg = svg_lines(
            &format!("Stream scalability ({})", a.profile),
            "streams",
            "Mbit/s",
            &[("throughput".into(), pts)],
        );
        h.push_str(&svg);
        svgs.push((format!("amst_{}.svg", a.profile), svg));
    }
}

fn hde_section(h: &mut String, hd: &super::schema::HdeResult) {
    h.push_str("<h3>1.2 HDE (codec: page dedup + compression)</h3>");
    {
        let _ = write!(
            h,
            "<p>Data: {}. Frames of {} KiB, dedup cache {} MiB. MB/s = 10<sup>6</sup> bytes of QEMU stream per second on one core. \"raw crate\" = the lz4/zstd crate alone on the same frames (no dedup).</p><h4>1.2.1 Compression ratios (size reduction; ratio in brackets)</h4>",
            esc(&hd.source),
            hd.chunk >> 10,
            hd.dedup_cache_bytes >> 20
        );
        let red = |d: &super::schema::HdeDataset, tier: &str| {
            d.tiers
                .iter()
                .find(|t| t.tier == tier)
                .map(|t| format!("{:.1} % ({:.2})", (1.0 - 1.0 / t.ratio) * 100.0, t.ratio))
                .unwrap_or_else(|| "–".into())
        };
        let rows: Vec<Vec<String>> = hd
            .datasets
            .iter()
            .map(|d| {
                vec![
                    esc(&d.name),
                    red(d, "lz4"),
                    red(d, "zstd:1"),
                    red(d, "zstd:3"),
                ]
            })
            .collect();
        table(h, &["Data", "LZ4", "ZSTD-1", "ZSTD-3"], &rows);
        h.push_str("<h4>1.2.2 Compression throughput (per core)</h4>");
        let mut rows = Vec::new();
        for d in &hd.datasets {
            for t in &d.tiers {
                rows.push(vec![
                    esc(&d.name),
                    t.tier.clone(),
                    format!("{:.2}", t.ratio),
                    format!("{:.0}", t.encode_mb_s),
                    format!("{:.0}", t.decode_mb_s),
                    format!("{:.2}", t.raw_crate_ratio),
                    format!("{:.0}", t.raw_crate_encode_mb_s),
                    format!("{:.0}", t.raw_crate_decode_mb_s),
                    pct(t.encode_mb_s, t.raw_crate_encode_mb_s),
                    pct(t.decode_mb_s, t.raw_crate_decode_mb_s),
                ]);
            }
        }
        table(
            h,
            &[
                "Data",
                "Tier",
                "Ratio",
                "Encode MB/s",
                "Decode MB/s",
                "Raw crate ratio",
                "Raw enc MB/s",
                "Raw dec MB/s",
                "Enc vs raw",
                "Dec vs raw",
            ],
            &rows,
        );
    }
}

fn consensus_section(h: &mut String, r: &Results) {
    // ---- 1.4 consensus.
    h.push_str("<h3>1.4 Consensus</h3><h4>1.4.1 Consensus latency (commit through a Raft-style cluster on loopback TCP, fsync'd logs)</h4>");
    let rows: Vec<Vec<String>> = r
        .consensus
        .iter()
        .map(|b| {
            vec![
                format!("Raft ({} nodes)", b.nodes),
                format!("{:.2}", b.p50_ms),
                format!("{:.2}", b.p99_ms),
                format!("{:.2}", b.max_ms),
                format!("{:.0}", b.ops_per_sec),
                format!("{} / {}", b.failed, b.ops),
            ]
        })
        .collect();
    table(
        h,
        &["Topology", "p50 ms", "p99 ms", "max ms", "ops/s", "failed"],
        &rows,
    );
}

/// Section 2, only for the suites this file holds.
fn migration_section(h: &mut String, svgs: &mut Vec<(String, String)>, r: &Results) {
    if !r.compare.is_empty() {
        compare_section(h, svgs, r);
    }
    if !r.converge.is_empty() {
        converge_section(h, r);
    }
}

fn compare_section(h: &mut String, svgs: &mut Vec<(String, String)>, r: &Results) {
    h.push_str("<h2>2. End-to-end migration: DWCP against QEMU's own channels</h2>");
    let kinds = |k: GuestKind| r.compare.iter().any(|s| s.guest.kind == k);
    let _ = write!(
        h,
        "<p>The same guest for every contender (described per profile below), the same emulated link, a fresh guest pair per run, runs interleaved. Every completed run's destination RAM was compared page by page with the source's{}{}. Cells: median <small>[min–max]</small> over converged runs. Wire bytes: DWCP's session bytes on its TCP streams; for QEMU native, QEMU's transferred bytes. Link bytes: what the source host's interface sent (TCP/IP headers and retransmissions included), the same meter for everyone. CPU: utime+stime of QEMU and agent processes on each host during the migration (under TCG the source QEMU figure includes the guest's own vCPU).</p>",
        if kinds(GuestKind::TestGuest) {
            "; the test guest's self-check also ran on the destination"
        } else {
            ""
        },
        if kinds(GuestKind::Own) {
            "; a guest of your own has no heartbeat, so it has no guest-pause figure"
        } else {
            ""
        },
    );
    let profiles: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for s in &r.compare {
            if !v.contains(&s.profile) {
                v.push(s.profile.clone());
            }
        }
        v
    };
    for s in &r.compare {
        let _ = write!(
            h,
            "<h3>Profile {} — {}, {} repeat(s), timeout {} s</h3>",
            esc(&s.profile),
            esc(&s.guest.describe()),
            s.repeat,
            s.timeout_s
        );
        let rows: Vec<Vec<String>> = s
            .summary
            .iter()
            .map(|c| {
                vec![
                    format!(
                        "{}{}",
                        esc(&c.contender),
                        if c.corrupted > 0 {
                            format!(" <span class=bad>{} CORRUPTED</span>", c.corrupted)
                        } else {
                            String::new()
                        }
                    ),
                    format!("{}/{}", c.converged, c.runs),
                    st(&c.total_time_ms, 1000.0, 2),
                    st(&c.downtime_ms, 1.0, 0),
                    st(&c.guest_pause_ms, 1.0, 0),
                    st(&c.ram_bytes, 1048576.0, 1),
                    st(&c.wire_bytes, 1048576.0, 1),
                    st(&c.link_tx_bytes, 1048576.0, 1),
                    st(&c.wire_mbit_s, 1.0, 0),
                    st(&c.ram_mbit_s, 1.0, 0),
                    st(&c.dirty_syncs, 1.0, 0),
                    st(&c.cpu_src_s, 1.0, 2),
                    st(&c.cpu_dst_s, 1.0, 2),
                    st(&c.cpu_s_per_gib, 1.0, 2),
                    st(&c.wire_floor_multiple, 1.0, 2),
                ]
            })
            .collect();
        table(
            h,
            &[
                "Contender",
                "Converged",
                "Total s",
                "Downtime ms (QEMU)",
                "Guest pause ms",
                "RAM MiB",
                "Wire MiB",
                "Link MiB",
                "Wire Mbit/s",
                "RAM Mbit/s",
                "Dirty syncs",
                "CPU s src",
                "CPU s dst",
                "CPU s / GiB",
                "Wire / floor",
            ],
            &rows,
        );
        if let Some(f) = &s.floor {
            let lv: Vec<String> = f
                .levels
                .iter()
                .map(|l| format!("zstd -{}: {:.1} MB", l.level, l.bytes as f64 / 1e6))
                .collect();
            let _ = write!(
                h,
                "<p>Compression floor of the guest's RAM ({}): {} zero, {} duplicate and {} unique pages; \
                 the unique pages compressed: {}. Wire / floor divides each run's wire bytes by the smallest.</p>",
                esc(&f.source),
                f.zero_pages,
                f.duplicate_pages,
                f.unique_pages,
                esc(&lv.join(", "))
            );
        }
        let bad: Vec<Vec<String>> = s
            .runs
            .iter()
            .filter(|x| x.error.is_some())
            .map(|x| {
                vec![
                    esc(&x.contender),
                    (x.repeat + 1).to_string(),
                    format!("{:?}", x.outcome),
                    esc(x.error.as_deref().unwrap_or("")),
                ]
            })
            .collect();
        if !bad.is_empty() {
            h.push_str("<p>Runs that did not complete:</p>");
            table(h, &["Contender", "Run", "Outcome", "Error"], &bad);
        }
    }
    if !r.compare.is_empty() {
        let cats: Vec<String> = {
            let mut v: Vec<String> = Vec::new();
            for s in &r.compare {
                for c in &s.contenders {
                    if !v.contains(c) {
                        v.push(c.clone());
                    }
                }
            }
            v
        };
        let series =
            |f: &dyn Fn(&ContenderSummary) -> Option<f64>| -> Vec<(String, Vec<Option<f64>>)> {
                profiles
                    .iter()
                    .map(|p| {
                        (
                            p.clone(),
                            cats.iter()
                                .map(|c| find(r, p, c).and_then(|(_, x)| f(x)))
                                .collect(),
                        )
                    })
                    .collect()
            };
        for (file, title, unit, f) in [
            (
                "compare_total_time.svg",
                "Total migration time (median; ✗ = did not converge)",
                "seconds",
                Box::new(|c: &ContenderSummary| med(&c.total_time_ms).map(|v| v / 1000.0))
                    as Box<dyn Fn(&ContenderSummary) -> Option<f64>>,
            ),
            (
                "compare_downtime.svg",
                "Downtime, QEMU's figure (median)",
                "ms",
                Box::new(|c: &ContenderSummary| med(&c.downtime_ms)),
            ),
            (
                "compare_guest_pause.svg",
                "Guest-side pause (heartbeat gap, median)",
                "ms",
                Box::new(|c: &ContenderSummary| med(&c.guest_pause_ms)),
            ),
            (
                "compare_wire_bytes.svg",
                "Bytes on the wire (median)",
                "MiB",
                Box::new(|c: &ContenderSummary| med(&c.wire_bytes).map(|v| v / 1048576.0)),
            ),
        ] {
            let data = series(&*f);
            if data.iter().all(|(_, v)| v.iter().all(Option::is_none)) {
                // Nothing to show (a guest of one's own has no guest-side
                // pause figure): no empty chart of ✗.
                continue;
            }
            let svg = svg_bars(title, unit, &cats, &data);
            h.push_str(&svg);
            svgs.push((file.to_string(), svg));
        }
        // Throughput over time of one DWCP migration (and QEMU tcp beside it).
        let mut lines = Vec::new();
        for c in ["dwcp", "qemu-tcp", "qemu-multifd-zstd"] {
            if let Some((s, run)) = r.compare.iter().find_map(|s| {
                s.runs
                    .iter()
                    .find(|x| x.contender == c && x.outcome == super::schema::Outcome::Completed)
                    .map(|x| (s, x))
            }) {
                lines.push((format!("{c} ({})", s.profile), rate_series(run)));
            }
        }
        if !lines.is_empty() {
            let svg = svg_lines(
                "Throughput over time of one migration (wire Mbit/s)",
                "seconds since migrate",
                "Mbit/s",
                &lines,
            );
            h.push_str(&svg);
            svgs.push(("timeline.svg".into(), svg));
        }
    }
}

fn converge_section(h: &mut String, r: &Results) {
    h.push_str("<h3>2.3 Convergence limit</h3><p>`dwcp benchmark converge`: the guest's dirty rate raised step by step; a contender that does not converge within the timeout at one rate is not tried at higher ones.</p>");
    for c in &r.converge {
        let _ = write!(
            h,
            "<h4>{} profile, {} MiB guest, {} MiB rewritten, timeout {} s</h4>",
            esc(&c.profile),
            c.guest.mem_mb,
            c.guest.fill_mb.unwrap_or(0),
            c.timeout_s
        );
        let rows: Vec<Vec<String>> = c
            .limits
            .iter()
            .map(|l| {
                let mut row = vec![esc(&l.contender)];
                for rate in &c.rates_mbps {
                    let cell = c
                        .runs
                        .iter()
                        .find(|x| x.dirty_mbps == *rate && x.run.contender == l.contender)
                        .map(|x| match x.run.outcome {
                            super::schema::Outcome::Completed => {
                                format!("✓ {:.1} s", x.run.total_time_ms as f64 / 1000.0)
                            }
                            o => format!("✗ {o:?}"),
                        })
                        .unwrap_or_else(|| "–".into());
                    row.push(cell);
                }
                row.push(
                    l.highest_converged_mbps
                        .map(|r| format!("{r} MiB/s"))
                        .unwrap_or_else(|| "none".into()),
                );
                row
            })
            .collect();
        let heads: Vec<String> = std::iter::once("Contender".to_string())
            .chain(c.rates_mbps.iter().map(|r| format!("{r} MiB/s")))
            .chain(std::iter::once("Highest converged".to_string()))
            .collect();
        let head_refs: Vec<&str> = heads.iter().map(String::as_str).collect();
        table(h, &head_refs, &rows);
    }
}

#[cfg(test)]
mod tests {
    use super::super::schema::{CompareSuite, ContenderSummary, GuestInfo, Results, Stat};
    use super::*;

    fn suite(profile: &str, guest: GuestInfo) -> CompareSuite {
        let stat = |v: f64| {
            Some(Stat {
                median: v,
                min: v,
                max: v,
                n: 1,
            })
        };
        CompareSuite {
            profile: profile.into(),
            guest,
            dwcp_congestion: None,
            repeat: 1,
            timeout_s: 60,
            qemu_max_bandwidth: 1 << 40,
            contenders: vec!["qemu-tcp".into(), "dwcp".into()],
            runs: Vec::new(),
            summary: ["qemu-tcp", "dwcp"]
                .iter()
                .map(|c| ContenderSummary {
                    contender: c.to_string(),
                    runs: 1,
                    converged: 1,
                    corrupted: 0,
                    total_time_ms: stat(2000.0),
                    downtime_ms: stat(40.0),
                    guest_pause_ms: None,
                    ram_bytes: stat(1e8),
                    wire_bytes: stat(9e7),
                    link_tx_bytes: stat(9.5e7),
                    wire_mbit_s: stat(400.0),
                    ram_mbit_s: stat(420.0),
                    dirty_syncs: stat(3.0),
                    cpu_src_s: stat(1.0),
                    cpu_dst_s: stat(1.0),
                    cpu_s_per_gib: stat(5.0),
                    wire_floor_multiple: stat(1.4),
                })
                .collect(),
            floor: None,
        }
    }

    /// A compare of one's own guest: the report shows that guest and only
    /// the compare suite, with one line naming what was not run.
    #[test]
    fn a_compare_of_an_own_guest_reports_only_that() {
        let mut r = Results::new("dwcp benchmark compare --qemu-args-file web.args".into());
        let args: Vec<String> = ["-machine", "q35", "-m", "2G", "-accel", "tcg"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        r.compare.push(suite(
            "dc",
            GuestInfo::own(std::path::Path::new("guests/web.args"), &args),
        ));
        let (html, _) = render(&r);
        for gone in [
            "not measured",
            "tests/guest",
            "realistic content",
            "Same test guest",
            "1. Component benchmarks",
            "1.2 HDE",
            "1.4 Consensus",
            "2.3 Convergence",
            "RDMA 64KB",
        ] {
            assert!(!html.contains(gone), "{gone:?} in the report:\n{html}");
        }
        for want in [
            "your guest from web.args: 2048 MiB RAM, running its own workload",
            "In this file: compare (dc). Not run: converge, hde, amst, consensus",
            "2048 MiB guest from web.args",
            "no guest-pause figure",
            "Never measured by this suite",
        ] {
            assert!(html.contains(want), "{want:?} not in the report:\n{html}");
        }
        let j = serde_json::to_value(&r).unwrap();
        let g = &j["compare"][0]["guest"];
        assert_eq!(j["schema_version"], 2);
        assert_eq!(g["kind"], "own");
        assert_eq!(g["mem_mb"], 2048);
        assert_eq!(g["qemu_args_file"], "guests/web.args");
        assert_eq!(g["accel"], "tcg");
        assert!(
            g.get("fill_mb").is_none() && g.get("dirty_mbps").is_none(),
            "{g}"
        );
    }

    /// The test guest is described as before.
    #[test]
    fn the_test_guest_is_described_by_its_workload() {
        let mut r = Results::new("dwcp benchmark compare".into());
        r.compare.push(suite(
            "dc",
            GuestInfo::test_guest(512, 256, 8, 1, "realistic", "tcg"),
        ));
        let (html, _) = render(&r);
        assert!(html.contains(
            "the test guest (tests/guest): 512 MiB RAM, 256 MiB realistic content, rewriting 8 MiB/s"
        ));
        assert!(html.contains("self-check also ran"));
        assert!(!html.contains("not measured"));
        let j = serde_json::to_value(&r).unwrap();
        let g = &j["compare"][0]["guest"];
        assert_eq!(
            (g["kind"].as_str(), g["fill_mb"].as_u64()),
            (Some("test_guest"), Some(256))
        );
    }
}
