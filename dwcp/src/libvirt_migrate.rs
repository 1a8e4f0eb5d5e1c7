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

/// How `--transport` reaches the destination's libvirtd.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LibvirtTransport {
    /// `qemu+tcp://TO/system` (libvirtd's TCP listener; SASL or no auth).
    Tcp,
    /// `qemu+tls://TO/system` (libvirtd's TLS listener and PKI).
    Tls,
    /// `qemu+ssh://TO/system` (ssh to TO as the current user).
    Ssh,
}

#[derive(Args, Debug)]
pub struct VirshMigrateArgs {
    /// Domain name.
    domain: String,
    /// Destination host (address of its libvirtd and its DWCP agent).
    #[arg(long)]
    to: String,
    /// Destination libvirt URI, any of qemu+tcp://, qemu+tls://,
    /// qemu+ssh:// (or qemu+libssh://, qemu+libssh2://)
    /// [default: qemu+TRANSPORT://TO/system].
    #[arg(long, conflicts_with = "transport")]
    dest_uri: Option<String>,
    /// How to reach the destination's libvirtd: qemu+tcp, qemu+tls or
    /// qemu+ssh to TO/system [default: tcp].
    #[arg(long, value_enum)]
    transport: Option<LibvirtTransport>,
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
    /// Define the domain on the destination (VIR_MIGRATE_PERSIST_DEST, virsh --persistent).
    #[arg(long)]
    persistent: bool,
    /// Undefine the domain on the source once it runs on the destination
    /// (VIR_MIGRATE_UNDEFINE_SOURCE, virsh --undefinesource).
    #[arg(long)]
    undefinesource: bool,
    /// Let QEMU throttle the guest's vCPUs when memory is dirtied faster than
    /// it is sent (VIR_MIGRATE_AUTO_CONVERGE, virsh --auto-converge).
    #[arg(long)]
    auto_converge: bool,
    /// Post-copy: refused, DWCP does not carry post-copy migrations yet.
    #[arg(long)]
    postcopy: bool,
    /// Print the result as JSON on stdout (the global --json).
    #[arg(skip)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Why `--postcopy` is refused.
pub const POSTCOPY_REFUSED: &str = "post-copy is not supported by DWCP yet: only pre-copy \
    migrations are carried (and tested) through the agents; migrate without --postcopy \
    (--auto-converge helps a guest that dirties memory faster than the link sends it)";

/// The libvirt flags of a migration with these arguments.
fn migrate_flags(a: &VirshMigrateArgs) -> Result<sys::virDomainMigrateFlags> {
    if a.postcopy {
        anyhow::bail!(POSTCOPY_REFUSED);
    }
    let mut flags = sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER;
    for (on, flag) in [
        (a.parallel.is_some(), sys::VIR_MIGRATE_PARALLEL),
        (a.persistent, sys::VIR_MIGRATE_PERSIST_DEST),
        (a.undefinesource, sys::VIR_MIGRATE_UNDEFINE_SOURCE),
        (a.auto_converge, sys::VIR_MIGRATE_AUTO_CONVERGE),
    ] {
        if on {
            flags |= flag;
        }
    }
    Ok(flags)
}

/// Schemes accepted for the destination's libvirt connection.
const DEST_SCHEMES: [&str; 5] = [
    "qemu+tcp",
    "qemu+tls",
    "qemu+ssh",
    "qemu+libssh",
    "qemu+libssh2",
];

/// The destination's libvirt URI: `--dest-uri` (checked), else
/// `qemu+TRANSPORT://TO/system`.
fn dest_uri(a: &VirshMigrateArgs) -> Result<String> {
    if let Some(u) = &a.dest_uri {
        let scheme = u.split_once("://").map(|(s, _)| s).unwrap_or("");
        if !DEST_SCHEMES.contains(&scheme) {
            anyhow::bail!(
                "--dest-uri {u:?}: a peer-to-peer migration needs a remote QEMU driver URI \
                 ({}://HOST/system)",
                DEST_SCHEMES.join("://, ")
            );
        }
        return Ok(u.clone());
    }
    let t = match a.transport.unwrap_or(LibvirtTransport::Tcp) {
        LibvirtTransport::Tcp => "tcp",
        LibvirtTransport::Tls => "tls",
        LibvirtTransport::Ssh => "ssh",
    };
    let host = if a.to.contains(':') && !a.to.starts_with('[') {
        format!("[{}]", a.to) // an IPv6 address
    } else {
        a.to.clone()
    };
    Ok(format!("qemu+{t}://{host}/system"))
}

/// What a domain's `<dwcp:migration>` metadata asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrationMetadata {
    pub streams: Option<u16>,
    pub codec: Option<String>,
}

/// Reads `<metadata><migration xmlns="METADATA_NS" .../></metadata>` (any
/// prefix) from a domain's XML. `Ok(None)`: no such element. An error names
/// what is wrong: XML that is not well-formed, or a bad attribute.
pub fn migration_metadata(domain_xml: &str) -> Result<Option<MigrationMetadata>> {
    let doc = roxmltree::Document::parse(domain_xml)
        .map_err(|e| anyhow::anyhow!("the domain XML is not well-formed: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        anyhow::bail!(
            "the domain XML's root element is <{}>, not <domain>",
            root.tag_name().name()
        );
    }
    let Some(el) = root
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "metadata")
        .flat_map(|m| m.children())
        .find(|n| {
            n.is_element()
                && n.tag_name().name() == "migration"
                && n.tag_name().namespace() == Some(METADATA_NS)
        })
    else {
        return Ok(None);
    };
    let streams = match el.attribute("streams") {
        Some(v) => Some(
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "metadata <dwcp:migration streams='{v}'>: not a number of streams (1..=256)"
                    )
                })?,
        ),
        None => None,
    };
    Ok(Some(MigrationMetadata {
        streams,
        codec: el.attribute("codec").map(|c| c.trim().to_string()),
    }))
}

pub fn run(a: VirshMigrateArgs) -> Result<()> {
    // Bad flags are refused before anything is touched.
    let flags = migrate_flags(&a)?;
    let dest_uri = dest_uri(&a)?;
    // libvirt's default handler prints every error on stderr, also the
    // expected ones (job stats of a domain that just left); ours carry
    // libvirt's message in the Result.
    virt::error::clear_error_callback();
    let conn =
        Connect::open(Some(&a.connect)).with_context(|| format!("connecting to {}", a.connect))?;
    let dom = conn
        .lookup_domain_by_name(&a.domain)
        .with_context(|| format!("domain {}", a.domain))?;
    let xml = dom
        .xml_desc(0)
        .with_context(|| format!("reading the XML of domain {}", a.domain))?;
    let md = migration_metadata(&xml)
        .with_context(|| format!("domain {}", a.domain))?
        .unwrap_or_default();
    let mut route =
        json!({"op": "route", "name": a.domain, "to": format!("{}:{}", a.to, a.agent_port)});
    if let Some(s) = a.streams.or(md.streams) {
        route["streams"] = json!(s);
    }
    if let Some(c) = a.codec.clone().or(md.codec) {
        route["codec"] = json!(c);
    }
    let answer = control_call(&a.agent, &route).context("creating the route on the local agent")?;
    let socket = answer["socket"].as_str().unwrap_or_default().to_string();
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
    let mut rates = crate::progress::QemuRates::default();
    while !worker.is_finished() {
        if let Ok(j) = dom.job_stats(0) {
            let total = j.mem_total.unwrap_or(0);
            let remaining = j.mem_remaining.unwrap_or(0);
            pb.set_length(total);
            pb.set_position(total.saturating_sub(remaining));
            // libvirt's job statistics are QEMU's `query-migrate` figures
            // under other names: the same report (RAM per byte for what is
            // left, pass by pass; no RAM sample, libvirt holds the monitor).
            let report = crate::progress::from_query_migrate(
                &libvirt_as_query_migrate(&j),
                &mut rates,
                Instant::now(),
            );
            let eta_s = report.eta_s;
            reporter.maybe_send(&report);
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

/// libvirt's job statistics as QEMU's `query-migrate` answer (libvirt's
/// `memory_*` fields are QEMU's `ram` ones; its dirty rate is in pages per
/// second, as QEMU's; its downtime, while the job runs, the expected one).
fn libvirt_as_query_migrate(j: &virt::domain::JobStats) -> serde_json::Value {
    serde_json::json!({
        "status": "active",
        "expected-downtime": j.downtime,
        "ram": {
            "total": j.mem_total,
            "remaining": j.mem_remaining,
            "transferred": j.mem_processed,
            "normal": j.mem_normal,
            "duplicate": j.mem_constant,
            "page-size": j.mem_page_size,
            "dirty-pages-rate": j.mem_dirty_rate,
            "dirty-sync-count": j.mem_iteration,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: VirshMigrateArgs,
    }

    #[test]
    fn libvirt_job_statistics_read_as_query_migrate() {
        let j = virt::domain::JobStats {
            mem_total: Some(1 << 30),
            mem_remaining: Some(1 << 29),
            mem_processed: Some(64 << 20),
            mem_normal: Some(16_384),
            mem_constant: Some(49_152),
            mem_page_size: Some(4096),
            mem_dirty_rate: Some(256),
            mem_iteration: Some(1),
            downtime: Some(120),
            ..Default::default()
        };
        let mut rates = crate::progress::QemuRates::default();
        let p = crate::progress::from_query_migrate(
            &libvirt_as_query_migrate(&j),
            &mut rates,
            std::time::Instant::now(),
        );
        assert_eq!(p.remaining_bytes, Some(1 << 29));
        assert_eq!(p.total_bytes, Some(1 << 30));
        assert_eq!(p.expected_downtime_ms, Some(120));
        assert_eq!(p.dirty_rate_bytes_s, Some(256.0 * 4096.0));
        // 64 MiB written for 256 MiB of RAM (three quarters zero pages)
        assert_eq!(p.ram_per_byte, Some(4.0));
    }

    fn args(extra: &[&str]) -> Result<VirshMigrateArgs, clap::Error> {
        let mut v = vec!["t", "g1", "--to", "10.0.0.2"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).map(|c| c.a)
    }

    #[test]
    fn flags_map_to_libvirt_migrate_flags() {
        let base = sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER;
        assert_eq!(migrate_flags(&args(&[]).unwrap()).unwrap(), base);
        let all = args(&[
            "--persistent",
            "--undefinesource",
            "--auto-converge",
            "--parallel",
            "4",
        ])
        .unwrap();
        assert_eq!(
            migrate_flags(&all).unwrap(),
            base | sys::VIR_MIGRATE_PERSIST_DEST
                | sys::VIR_MIGRATE_UNDEFINE_SOURCE
                | sys::VIR_MIGRATE_AUTO_CONVERGE
                | sys::VIR_MIGRATE_PARALLEL
        );
        assert_eq!(
            migrate_flags(&args(&["--persistent"]).unwrap()).unwrap(),
            base | sys::VIR_MIGRATE_PERSIST_DEST
        );
        let e = migrate_flags(&args(&["--postcopy", "--persistent"]).unwrap()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("post-copy is not supported by DWCP yet: "),
            "{e}"
        );
    }

    #[test]
    fn destination_uri_from_transport_or_given() {
        let uri = |x: &[&str]| dest_uri(&args(x).unwrap());
        assert_eq!(uri(&[]).unwrap(), "qemu+tcp://10.0.0.2/system");
        assert_eq!(
            uri(&["--transport", "tls"]).unwrap(),
            "qemu+tls://10.0.0.2/system"
        );
        assert_eq!(
            uri(&["--transport", "ssh"]).unwrap(),
            "qemu+ssh://10.0.0.2/system"
        );
        for u in [
            "qemu+tls://dst.example.org/system",
            "qemu+ssh://root@dst/system?keyfile=/k",
            "qemu+tcp://10.0.0.2/system",
        ] {
            assert_eq!(uri(&["--dest-uri", u]).unwrap(), u);
        }
        let e = uri(&["--dest-uri", "qemu:///system"]).unwrap_err();
        assert!(e.to_string().contains("remote QEMU driver URI"), "{e}");
        let e = uri(&["--dest-uri", "xen+ssh://h/system"]).unwrap_err();
        assert!(e.to_string().contains("qemu+tls://"), "{e}");
        // Not both.
        assert!(args(&["--transport", "tls", "--dest-uri", "qemu+tls://h/system"]).is_err());
        assert!(args(&["--transport", "udp"]).is_err());
        let v6 = Cli::try_parse_from(["t", "g1", "--to", "fd00::2"])
            .unwrap()
            .a;
        assert_eq!(dest_uri(&v6).unwrap(), "qemu+tcp://[fd00::2]/system");
    }

    fn domain(metadata: &str) -> String {
        format!(
            "<domain type='qemu'><name>g1</name><metadata>{metadata}</metadata>\
             <os><type>hvm</type></os></domain>"
        )
    }

    #[test]
    fn metadata_is_read_by_namespace_not_prefix() {
        let md = |m: &str| migration_metadata(&domain(m)).unwrap();
        let want = Some(MigrationMetadata {
            streams: Some(2),
            codec: Some("zstd".into()),
        });
        assert_eq!(
            md(&format!(
                "<dwcp:migration xmlns:dwcp='{METADATA_NS}' transport='tcp' streams='2' codec='zstd'/>"
            )),
            want
        );
        // Another prefix, the default namespace, double quotes, other
        // metadata around it: the same.
        assert_eq!(
            md(&format!(
                "<app:x xmlns:app='urn:other' streams='9'/><m:migration xmlns:m=\"{METADATA_NS}\" codec=\"zstd\" streams=\"2\"></m:migration>"
            )),
            want
        );
        assert_eq!(
            md(&format!(
                "<migration xmlns='{METADATA_NS}' streams='2' codec='zstd'/>"
            )),
            want
        );
        // The same name in another namespace is not ours; an attribute in
        // a comment or text is not an attribute.
        assert_eq!(md("<x:migration xmlns:x='urn:other' streams='4'/>"), None);
        assert_eq!(
            migration_metadata(
                "<domain><name>streams='4'</name><!-- <dwcp:migration streams='4'/> --></domain>"
            )
            .unwrap(),
            None
        );
        // Only some attributes.
        assert_eq!(
            md(&format!(
                "<dwcp:migration xmlns:dwcp='{METADATA_NS}' codec='lz4'/>"
            )),
            Some(MigrationMetadata {
                streams: None,
                codec: Some("lz4".into())
            })
        );
        // No metadata at all.
        assert_eq!(
            migration_metadata("<domain type='qemu'><name>g1</name></domain>").unwrap(),
            None
        );
    }

    #[test]
    fn malformed_xml_and_bad_values_are_errors() {
        let e = migration_metadata("<domain><metadata></domain>").unwrap_err();
        assert!(e.to_string().contains("not well-formed"), "{e}");
        let e = migration_metadata("").unwrap_err();
        assert!(e.to_string().contains("not well-formed"), "{e}");
        let e = migration_metadata("<network/>").unwrap_err();
        assert!(e.to_string().contains("not <domain>"), "{e}");
        for bad in ["999", "0", "two", ""] {
            let e = migration_metadata(&domain(&format!(
                "<dwcp:migration xmlns:dwcp='{METADATA_NS}' streams='{bad}'/>"
            )))
            .unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("<dwcp:migration streams='{bad}'>")),
                "{e}"
            );
        }
        // An undeclared prefix is not well-formed XML either.
        let e = migration_metadata(&domain("<dwcp:migration streams='2'/>")).unwrap_err();
        assert!(e.to_string().contains("not well-formed"), "{e}");
    }
}
