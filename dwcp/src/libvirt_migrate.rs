//! `dwcp virsh-migrate DOM --to DST`: a libvirt live migration through DWCP.
//!
//! Creates the route on the local agent (streams and codec from the flags,
//! else the domain's `<dwcp:migration>` metadata, else the agent's defaults),
//! then asks libvirt for a peer-to-peer live migration whose data URI is the
//! route's UNIX socket (`virDomainMigrateToURI3` with `VIR_MIGRATE_PARAM_URI
//! = unix://...`), shows progress from libvirt's job stats and the agent's
//! session stats, and prints the result.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use dwcp_core::agent::{control_call, control_request};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use virt::connect::Connect;
use virt::domain::MigrateParameters;
use virt::sys;

/// XML namespace of the domain metadata element `<dwcp:migration>`.
pub const METADATA_NS: &str = "https://dwcp.dev/xmlns/libvirt/1";

#[derive(Args, Debug)]
pub struct VirshMigrateArgs {
    /// Domain name.
    domain: String,
    /// Destination host (address of its libvirtd and its DWCP agent).
    #[arg(long)]
    to: String,
    /// Destination libvirt URI (default: qemu+tcp://TO/system).
    #[arg(long)]
    dest_uri: Option<String>,
    /// Local libvirt URI.
    #[arg(long, default_value = "qemu:///system")]
    connect: String,
    /// Data port of the destination agent.
    #[arg(long, default_value_t = 7070)]
    agent_port: u16,
    /// Control socket of the local agent.
    #[arg(long, default_value = "/run/dwcp/agent.sock")]
    agent: PathBuf,
    /// QEMU multifd connections (libvirt --parallel-connections).
    #[arg(long)]
    parallel: Option<i32>,
    /// DWCP streams (default: metadata, else the agent's).
    #[arg(long)]
    streams: Option<u16>,
    /// DWCP codec (default: metadata, else the agent's).
    #[arg(long)]
    codec: Option<String>,
    /// Print the result as JSON on stdout (the global --json).
    #[arg(skip)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Value of `name="..."` (or single quotes) in an XML start tag.
fn xml_attr(xml: &str, name: &str) -> Option<String> {
    for q in ['"', '\''] {
        let pat = format!("{name}={q}");
        if let Some(i) = xml.find(&pat) {
            let rest = &xml[i + pat.len()..];
            return rest.find(q).map(|j| rest[..j].to_string());
        }
    }
    None
}

pub fn run(a: VirshMigrateArgs) -> Result<()> {
    let conn =
        Connect::open(Some(&a.connect)).with_context(|| format!("connecting to {}", a.connect))?;
    let dom = conn
        .lookup_domain_by_name(&a.domain)
        .with_context(|| format!("domain {}", a.domain))?;
    let md = dom
        .metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(METADATA_NS),
            0,
        )
        .unwrap_or_default();
    let mut route =
        json!({"op": "route", "name": a.domain, "to": format!("{}:{}", a.to, a.agent_port)});
    if let Some(s) = a
        .streams
        .map(u64::from)
        .or_else(|| xml_attr(&md, "streams").and_then(|s| s.parse().ok()))
    {
        route["streams"] = json!(s);
    }
    if let Some(c) = a.codec.clone().or_else(|| xml_attr(&md, "codec")) {
        route["codec"] = json!(c);
    }
    let answer = control_call(&a.agent, &route).context("creating the route on the local agent")?;
    let socket = answer["socket"].as_str().unwrap_or_default().to_string();
    let dest_uri = a
        .dest_uri
        .clone()
        .unwrap_or_else(|| format!("qemu+tcp://{}/system", a.to));
    let mut flags = sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER;
    if a.parallel.is_some() {
        flags |= sys::VIR_MIGRATE_PARALLEL;
    }
    let params = MigrateParameters {
        uri: Some(format!("unix://{socket}")),
        parallel_connections: a.parallel,
        ..MigrateParameters::default()
    };
    let t0 = Instant::now();
    let mig_dom = conn.lookup_domain_by_name(&a.domain)?;
    let uri2 = dest_uri.clone();
    let worker = std::thread::spawn(move || mig_dom.migrate_to_uri3(Some(&uri2), params, flags));

    let pb = if a.quiet || a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} RAM, {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut downtime_ms = None;
    let mut reporter = crate::progress::Reporter::new(a.agent.clone(), &a.domain);
    let mut rate = crate::progress::RateWindow::default();
    while !worker.is_finished() {
        if let Ok(j) = dom.job_stats(0) {
            let total = j.mem_total.unwrap_or(0);
            let remaining = j.mem_remaining.unwrap_or(0);
            pb.set_length(total);
            pb.set_position(total.saturating_sub(remaining));
            if let Some(done) = j.mem_processed {
                rate.observe(Instant::now(), done);
            }
            // libvirt's dirty rate is in pages per second.
            let dirty = j
                .mem_dirty_rate
                .map(|p| (p * j.mem_page_size.unwrap_or(4096)) as f64);
            let eta_s = j
                .mem_remaining
                .and_then(|r| crate::progress::eta_s(r, rate.rate(), dirty));
            reporter.maybe_send(&crate::progress::Progress {
                remaining_bytes: j.mem_remaining,
                total_bytes: j.mem_total,
                eta_s,
                // For a running job libvirt's downtime is the expected one.
                expected_downtime_ms: j.downtime,
                downtime_ms: None,
                dirty_rate_bytes_s: dirty,
                ram_per_byte: None,
            });
            let eta = match reporter.eta(eta_s).0 {
                Some(s) => format!("{s:.1} s"),
                None => "?".into(),
            };
            let wire = dwcp_core::agent::newest_session(&a.agent, &a.domain)
                .map(|s| {
                    format!(
                        "{:.1} MiB on the wire, ratio {:.2}",
                        s["wire_out"].as_f64().unwrap_or(0.0) / 1048576.0,
                        s["ratio_out"].as_f64().unwrap_or(0.0)
                    )
                })
                .unwrap_or_default();
            pb.set_message(format!(
                "{:.1} MiB remaining, iteration {}, ETA {eta}; {wire}",
                j.data_remaining.unwrap_or(remaining) as f64 / 1048576.0,
                j.mem_iteration.unwrap_or(0)
            ));
            if j.downtime.is_some() {
                downtime_ms = j.downtime;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    pb.finish_and_clear();
    let res = worker
        .join()
        .map_err(|_| anyhow::anyhow!("migration thread panicked"))?;
    let elapsed = t0.elapsed().as_secs_f64();
    // Before the route goes: why it could not relay, if the destination refused.
    let refusal = res
        .is_err()
        .then(|| crate::migrate::peer_refusal(&a.agent, &a.domain))
        .flatten();
    let _ = control_request(&a.agent, &json!({"op": "unroute", "name": a.domain}));
    if let Err(e) = res {
        // libvirt resumed the guest here: when the local agent is a cluster
        // member, close what the registry still shows for its migration.
        if let Ok(uuid) = dom.uuid_string() {
            match control_request(&a.agent, &json!({"op": "reconcile", "guest": uuid})) {
                Ok(v) if v["action"] != "none" => eprintln!(
                    "dwcp: the cluster records the failed migration of {uuid} ({})",
                    v["action"].as_str().unwrap_or("?")
                ),
                _ => {}
            }
        }
        let e = anyhow::anyhow!(
            "libvirt migration of {} to {dest_uri} failed: {e}",
            a.domain
        );
        return Err(crate::migrate::failed_migration(e, refusal));
    }
    // The destination keeps the completed job's statistics (downtime).
    if let Ok(dconn) = Connect::open(Some(&dest_uri)) {
        if let Ok(d) = dconn.lookup_domain_by_name(&a.domain) {
            if let Ok(j) = d.job_stats(sys::VIR_DOMAIN_JOB_STATS_COMPLETED) {
                downtime_ms = j.downtime.or(downtime_ms);
            }
        }
    }
    reporter.finish(&crate::progress::Progress {
        remaining_bytes: Some(0),
        downtime_ms,
        ..Default::default()
    });
    let s = dwcp_core::agent::newest_session(&a.agent, &a.domain).unwrap_or(Value::Null);
    let out = json!({
        "domain": a.domain, "dest_uri": dest_uri, "socket": socket,
        "elapsed_s": elapsed, "downtime_ms": downtime_ms,
        "raw_bytes": s["raw_out"], "wire_bytes": s["wire_out"], "ratio": s["ratio_out"],
        "streams": s["streams"], "codec": s["tier"],
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "migrated {} to {} in {:.2} s, downtime {} ms, {:.1} MiB on the wire ({:.1} MiB raw, ratio {:.2}), {} streams, codec {}",
            a.domain,
            dest_uri,
            elapsed,
            downtime_ms.map(|d| d.to_string()).unwrap_or_else(|| "?".into()),
            s["wire_out"].as_f64().unwrap_or(0.0) / 1048576.0,
            s["raw_out"].as_f64().unwrap_or(0.0) / 1048576.0,
            s["ratio_out"].as_f64().unwrap_or(0.0),
            s["streams"],
            s["tier"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
