//! Component benchmarks: `hde` (codec tiers), `amst` (stream scalability
//! through two agents, no QEMU) and `consensus`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use dwcp_core::agent::control_request;
use dwcp_core::codec::Tier;
use dwcp_lab::Lab;
use serde_json::json;

use super::compare::cpu_seconds;
use super::schema::{AmstPoint, AmstSuite, HdeDataset, HdeResult};
use super::tiers::measure_tiers;
use super::{OutputArgs, Progress};

const PAGE: usize = 4096;

#[derive(Args, Debug, Clone)]
pub struct HdeArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// MiB of generated guest memory (realistic mix; the text, code and
    /// random mixes use min(this, 32) MiB).
    #[arg(long, default_value_t = 128)]
    pub data_size: u64,
    /// Use this memory image (raw guest RAM, e.g. from QEMU `pmemsave`)
    /// instead of generating one.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Content seed of the generated image.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Builds QEMU's precopy RAM stream for an image: one record per page (zero
/// pages as ZERO records, the first with the RAMBlock idstr), so the codec
/// sees what it sees in a real migration.
pub fn precopy_stream(image: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(image.len() + image.len() / 400 + 64);
    for (i, page) in image.chunks(PAGE).enumerate() {
        let off = (i * PAGE) as u64;
        let zero = page.iter().all(|&b| b == 0);
        if i == 0 {
            let flags = if zero { 0x02 } else { 0x08 };
            s.extend_from_slice(&(off | flags).to_be_bytes());
            s.push(6);
            s.extend_from_slice(b"pc.ram");
        } else {
            let flags = if zero { 0x22 } else { 0x28 };
            s.extend_from_slice(&(off | flags).to_be_bytes());
        }
        if zero {
            s.push(0);
        } else {
            s.extend_from_slice(page);
            s.resize(s.len() + PAGE - page.len(), 0);
        }
    }
    s
}

fn generate(mix: &str, mib: u64, seed: u64) -> Result<Vec<u8>> {
    let tool = dwcp_lab::locate::workload_tool()
        .context("the guest workload's host copy (dwcp-workload), with no --input given")?;
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let file = dir.join(format!("dwcp-hde-{}-{mix}.img", std::process::id()));
    let st = Command::new(&tool)
        .arg("--dump")
        .arg(&file)
        .args(["--fill", &mib.to_string(), "--seed", &seed.to_string()])
        .args(["--mix", mix])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running dwcp-workload --dump")?;
    let data = std::fs::read(&file);
    let _ = std::fs::remove_file(&file);
    if !st.success() {
        bail!("dwcp-workload --dump --mix {mix} failed ({st})");
    }
    Ok(data?)
}

pub fn hde(a: &HdeArgs) -> Result<HdeResult> {
    let tiers = [
        Tier::Raw,
        Tier::None,
        Tier::Lz4,
        Tier::Zstd(1),
        Tier::Zstd(3),
    ];
    let chunk = dwcp_core::transport::TransportConfig::default().chunk;
    let cache = 256usize << 20;
    let mut sets: Vec<(String, Vec<u8>)> = Vec::new();
    let source = match &a.input {
        Some(f) => {
            let data = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            sets.push((f.display().to_string(), data));
            format!("file {}", f.display())
        }
        None => {
            let small = a.data_size.min(32);
            for (mix, mib) in [
                ("realistic", a.data_size),
                ("text", small),
                ("code", small),
                ("random", small),
            ] {
                sets.push((format!("{mix} ({mib} MiB)"), generate(mix, mib, a.seed)?));
            }
            format!(
                "tests/guest/out/dwcp-workload --dump (seed {}), as QEMU precopy page records",
                a.seed
            )
        }
    };
    let mut datasets = Vec::new();
    for (name, image) in sets {
        let stream = precopy_stream(&image);
        let mut m = measure_tiers(&stream, &tiers, chunk, cache);
        // Compression with context, at the level `auto` starts from, the
        // one its probe climbs to, and one above (docs/hde.md, layer 4).
        for level in [3, 6, 9] {
            m.push(super::tiers::measure_context(&stream, level, chunk, cache));
        }
        if let Some(bad) = m.iter().find(|t| !t.roundtrip_ok) {
            bail!("codec round trip FAILED for tier {} on {name}", bad.tier);
        }
        datasets.push(HdeDataset {
            name,
            image_bytes: image.len() as u64,
            stream_bytes: stream.len() as u64,
            tiers: m,
        });
    }
    Ok(HdeResult {
        source,
        chunk,
        dedup_cache_bytes: cache,
        datasets,
    })
}

pub fn print_hde(r: &HdeResult) {
    println!(
        "hde: {} ; frames of {} KiB, dedup cache {} MiB; MB/s per core (one thread)",
        r.source,
        r.chunk >> 10,
        r.dedup_cache_bytes >> 20
    );
    println!(
        "{:<22} {:<10} {:>7} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>7} {:>7}",
        "data",
        "tier",
        "ratio",
        "enc MB/s",
        "dec MB/s",
        "raw ratio",
        "raw enc",
        "raw dec",
        "enc %",
        "dec %"
    );
    for d in &r.datasets {
        for t in &d.tiers {
            println!(
                "{:<22} {:<10} {:>7.2} {:>9.0} {:>9.0} | {:>9.2} {:>9.0} {:>9.0} | {:>7} {:>7}",
                d.name,
                t.tier,
                t.ratio,
                t.encode_mb_s,
                t.decode_mb_s,
                t.raw_crate_ratio,
                t.raw_crate_encode_mb_s,
                t.raw_crate_decode_mb_s,
                pct(t.encode_mb_s, t.raw_crate_encode_mb_s),
                pct(t.decode_mb_s, t.raw_crate_decode_mb_s),
            );
        }
    }
}

pub fn pct(ours: f64, raw: f64) -> String {
    if raw > 0.0 && ours > 0.0 {
        format!("{:.0}%", ours / raw * 100.0)
    } else {
        "-".into()
    }
}

#[derive(Args, Debug, Clone)]
pub struct AmstArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Link profile between the two agents.
    #[arg(long, default_value = "dc")]
    pub profile: String,
    /// Stream counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub streams: Vec<u16>,
    /// MiB pushed through per stream count.
    #[arg(long, default_value_t = 256)]
    pub data_size: u64,
    /// TCP congestion control of the agents' streams (e.g. cubic; default:
    /// the kernel's, and BBR once the agents find an internet path).
    #[arg(long)]
    pub congestion: Option<String>,
}

fn pseudo_random(len: usize, mut x: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn amst(a: &AmstArgs, p: &Progress) -> Result<AmstSuite> {
    let agent_args: Vec<&str> = match &a.congestion {
        Some(cc) => vec!["--congestion", cc.as_str()],
        None => Vec::new(),
    };
    let lab = super::compare::open_lab("amst", "amst", &a.profile, &agent_args, p)?;
    let block = pseudo_random(16 << 20, 0x9e37_79b9_7f4a_7c15);
    let total = a.data_size << 20;
    // Warm-up (not recorded): first session, page cache, TCP buffers.
    p.set_message(format!("amst {}: warm-up", a.profile));
    let _ = amst_point(&lab, 1, (32u64 << 20).min(total), &block);
    let mut points: Vec<AmstPoint> = Vec::new();
    for &n in &a.streams {
        p.set_message(format!(
            "amst {}: {n} stream(s), {} MiB",
            a.profile, a.data_size
        ));
        let pt = match amst_point(&lab, n, total, &block) {
            Ok(pt) => pt,
            Err(e) => AmstPoint {
                streams: n,
                ok: false,
                error: Some(format!("{e:#}")),
                secs: 0.0,
                mbit_s: 0.0,
                efficiency: 0.0,
                agent_cpu_s: 0.0,
            },
        };
        points.push(pt);
        p.inc();
    }
    let base = points
        .iter()
        .find(|p| p.streams == 1 && p.ok)
        .map(|p| p.mbit_s);
    if let Some(b) = base {
        for pt in points.iter_mut().filter(|p| p.ok) {
            pt.efficiency = pt.mbit_s / b;
        }
    }
    Ok(AmstSuite {
        profile: a.profile.clone(),
        data_bytes: total,
        codec: "none".into(),
        points,
    })
}

fn amst_point(lab: &Lab, n: u16, total: u64, block: &[u8]) -> Result<AmstPoint> {
    let name = format!("amst{n}-{}", total >> 20);
    let incoming = lab.dst_agent().incoming(&name);
    std::fs::create_dir_all(incoming.parent().expect("parent"))?;
    lab.expect(&name, None)?;
    let _ = std::fs::remove_file(&incoming);
    let listener = UnixListener::bind(&incoming).context("sink listener")?;
    // The sink: reads and discards what the destination agent delivers.
    let sink = std::thread::spawn(move || -> std::io::Result<(u64, Instant)> {
        let (mut c, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let k = c.read(&mut buf)?;
            if k == 0 {
                return Ok((got, Instant::now()));
            }
            got += k as u64;
        }
    });
    let ctl = lab.src_agent().control();
    let route = control_request(
        &ctl,
        &json!({"op": "route", "name": name, "to": lab.dst_addr(), "streams": n,
                "codec": "none", "dedup_cache_mb": 0}),
    )
    .map_err(|e| anyhow!("route: {e}"))?;
    let socket = route["socket"].as_str().unwrap_or_default().to_string();
    let pids = [lab.src_agent().child.id(), lab.dst_agent().child.id()];
    let cpu0: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let mut c = UnixStream::connect(&socket).context("route socket")?;
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let k = ((total - sent) as usize).min(block.len());
        c.write_all(&block[..k])?;
        sent += k as u64;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let (got, t1) = sink
        .join()
        .map_err(|_| anyhow!("sink thread panicked"))?
        .context("sink")?;
    let cpu1: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    // Let the session finish its close handshake.
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let _ = std::io::copy(&mut c, &mut std::io::sink());
    let _ = control_request(&ctl, &json!({"op": "unroute", "name": name}));
    if got != total {
        bail!("sink received {got} of {total} bytes");
    }
    let secs = (t1 - t0).as_secs_f64();
    Ok(AmstPoint {
        streams: n,
        ok: true,
        error: None,
        secs,
        mbit_s: total as f64 * 8.0 / secs / 1e6,
        efficiency: 0.0,
        agent_cpu_s: cpu1 - cpu0,
    })
}

pub fn print_amst(r: &AmstSuite) {
    println!(
        "amst --profile {}: {} MiB per point, codec {}",
        r.profile,
        r.data_bytes >> 20,
        r.codec
    );
    println!(
        "{:>8} {:>10} {:>12} {:>11} {:>12}",
        "streams", "secs", "Mbit/s", "efficiency", "agent CPU s"
    );
    for p in &r.points {
        if p.ok {
            println!(
                "{:>8} {:>10.2} {:>12.0} {:>10.0}% {:>12.2}",
                p.streams,
                p.secs,
                p.mbit_s,
                p.efficiency * 100.0,
                p.agent_cpu_s
            );
        } else {
            println!(
                "{:>8} failed: {}",
                p.streams,
                p.error.as_deref().unwrap_or("")
            );
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ConsensusArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Cluster sizes.
    #[arg(long, value_delimiter = ',', default_value = "3,5")]
    pub nodes: Vec<usize>,
    /// Commands committed per cluster size.
    #[arg(long, default_value_t = 500)]
    pub ops: usize,
    /// Proposals in flight at once.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Where the members run: `loopback` (one host), or a link profile
    /// (dc, wan, internet, ...): the leader and a minority of members on one
    /// side of the emulated link, the majority on the other, so every
    /// commit crosses the link once.
    #[arg(long, value_delimiter = ',', default_value = "loopback")]
    pub link: Vec<String>,
    /// Fleet mode (with --guests): hosts the guests are spread over.
    #[arg(long, default_value_t = 1000)]
    pub hosts: u64,
    /// Fleet mode: register this many guests, snapshot, restart a member from
    /// its snapshot, run --migrations migrations (intent + commit each)
    /// --concurrent at a time, then let a stopped member catch up through a
    /// snapshot. 0 (the default) runs the commit benchmark instead.
    #[arg(long, default_value_t = 0)]
    pub guests: usize,
    /// Fleet mode: migrations in flight at once.
    #[arg(long, default_value_t = 1000)]
    pub concurrent: usize,
    /// Fleet mode: migrations measured (default: 10 x --concurrent).
    #[arg(long)]
    pub migrations: Option<usize>,
    /// Fleet mode: client threads keeping the --concurrent migrations in
    /// flight. 0 (the default): one per migration, as one gate each on the
    /// leader's host; fewer: each keeps its share in flight with asynchronous
    /// proposals, so the figure is raft's, not that of a thousand threads
    /// waiting on the same cores.
    #[arg(long, default_value_t = 0)]
    pub client_threads: usize,
}

pub fn consensus(a: &ConsensusArgs) -> Result<Vec<super::consensus::BenchResult>> {
    let mut out = Vec::new();
    for link in &a.link {
        for &n in &a.nodes {
            let r = if link == "loopback" {
                super::consensus::bench_commits(n, a.ops, a.batch)
                    .map_err(|e| anyhow!("{n} nodes: {e}"))?
            } else {
                over_link(link, n, &|base, peers, start| {
                    super::consensus::bench_placed(base, peers, a.ops, a.batch, link, start)
                })
                .with_context(|| format!("{n} nodes over {link}"))?
            };
            out.push(r);
        }
    }
    Ok(out)
}

/// `dwcp benchmark consensus --guests N`: the registry at fleet size.
pub fn consensus_fleet(a: &ConsensusArgs) -> Result<Vec<super::consensus::FleetResult>> {
    let spec = super::consensus::FleetSpec {
        hosts: a.hosts,
        guests: a.guests,
        concurrent: a.concurrent.max(1),
        migrations: a.migrations.unwrap_or(a.concurrent.max(1) * 10),
        client_threads: a.client_threads,
    };
    if spec.hosts < 2 {
        bail!("--hosts {}: a migration needs at least 2 hosts", spec.hosts);
    }
    if spec.migrations + spec.migrations / 2 > spec.guests {
        bail!(
            "--migrations {} needs at least {} guests (1.5 x, one migration per guest), --guests is {}",
            spec.migrations,
            spec.migrations + spec.migrations / 2,
            spec.guests
        );
    }
    if let Some(&n) = a.nodes.iter().find(|&&n| n < 3) {
        bail!("--nodes {n}: fleet mode needs at least 3 members (one is stopped and restarted)");
    }
    let mut out = Vec::new();
    for link in &a.link {
        for &n in &a.nodes {
            eprintln!("fleet: {n} members, {link}");
            let r = if link == "loopback" {
                super::consensus::bench_fleet(n, spec).map_err(|e| anyhow!("{n} nodes: {e}"))?
            } else {
                over_link(link, n, &|base, peers, start| {
                    super::consensus::fleet_placed(base, peers, spec, link, start)
                })
                .with_context(|| format!("{n} nodes over {link}"))?
            };
            out.push(r);
        }
    }
    Ok(out)
}

pub fn print_fleet(r: &[super::consensus::FleetResult]) {
    println!(
        "{:>9} {:>5} {:>7} {:>5} {:>9} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>9} {:>5}",
        "link",
        "nodes",
        "guests",
        "conc",
        "reg/s",
        "snap MB",
        "snap ms",
        "open ms",
        "restart",
        "p50 ms",
        "p99 ms",
        "max ms",
        "ops/s",
        "failed",
        "catchup",
        "same"
    );
    for b in r {
        println!(
            "{:>9} {:>5} {:>7} {:>5} {:>9.0} {:>8.1} {:>9.0} {:>8.0} {:>8.0} {:>8.2} {:>8.2} {:>8.2} {:>9.0} {:>6} {:>7.0}{} {:>5}",
            b.link,
            b.nodes,
            b.guests,
            b.concurrent,
            b.populate_ops_per_sec,
            b.snapshot_bytes as f64 / 1e6,
            b.snapshot_ms,
            b.restart_open_ms,
            b.restart_caught_up_ms,
            b.p50_ms,
            b.p99_ms,
            b.max_ms,
            b.ops_per_sec,
            b.failed,
            b.catchup_ms,
            if b.catchup_via_snapshot { "s" } else { "l" },
            if b.consistent { "yes" } else { "NO" }
        );
    }
}

/// Members in the two namespaces of an emulated link: ids 1..=k (k =
/// (n-1)/2, a minority, node 1 the leader) on the source side, the rest on
/// the destination side. Each member is started from a thread inside its
/// namespace, so its sockets (and the threads it spawns) live there.
type StartMember<'a> = &'a dyn Fn(
    dwcp_consensus::ClusterConfig,
) -> Result<dwcp_consensus::Cluster, dwcp_consensus::ClusterError>;

/// A benchmark run on placed members: data dir base, their addresses, how to start one.
type PlacedRun<'a, R> = &'a dyn Fn(
    &std::path::Path,
    Vec<dwcp_consensus::PeerAddr>,
    StartMember<'_>,
) -> Result<R, dwcp_consensus::ClusterError>;

fn over_link<R>(link: &str, n: usize, run: PlacedRun<'_, R>) -> Result<R> {
    let prof: dwcp_lab::Profile = link.parse().map_err(|e| anyhow!("--link {link:?}: {e}"))?;
    let prefix = format!("dwcons{}", std::process::id() % 100000);
    let subnet = 100 + (std::process::id() % 150) as u8;
    let topo = linkem::Topology::create(&prefix, subnet, prof.middle())
        .context("creating the two hosts")?;
    let k = (n.max(1) - 1) / 2;
    let side = |id: u64| -> (String, std::net::Ipv4Addr) {
        if id as usize <= k.max(1) {
            (topo.src_ns.clone(), topo.src_ip)
        } else {
            (topo.dst_ns.clone(), topo.dst_ip)
        }
    };
    let peers: Vec<dwcp_consensus::PeerAddr> = (1..=n as u64)
        .map(|id| dwcp_consensus::PeerAddr {
            id,
            addr: format!("{}:{}", side(id).1, 7300 + id),
        })
        .collect();
    let base = std::env::temp_dir().join(format!("{prefix}-raft"));
    let _ = std::fs::remove_dir_all(&base);
    let r = run(&base, peers, &|cfg| {
        let (ns, _) = side(cfg.node_id);
        linkem::sys::in_netns(&ns, move || {
            let l = std::net::TcpListener::bind(&cfg.listen).map_err(|source| {
                dwcp_consensus::ClusterError::Listen {
                    addr: cfg.listen.clone(),
                    source,
                }
            })?;
            dwcp_consensus::Cluster::start_with_listener(cfg, l)
        })
        .map_err(|e| dwcp_consensus::ClusterError::Listen {
            addr: ns.clone(),
            source: std::io::Error::other(e.to_string()),
        })?
    });
    let _ = std::fs::remove_dir_all(&base);
    drop(topo);
    r.map_err(|e| anyhow!("{e}"))
}

pub fn print_consensus(r: &[super::consensus::BenchResult]) {
    println!(
        "{:>9} {:>6} {:>6} {:>6} {:>9} {:>9} {:>9} {:>10} {:>7} {:>12} {:>12}",
        "link",
        "nodes",
        "ops",
        "batch",
        "p50 ms",
        "p99 ms",
        "max ms",
        "ops/s",
        "failed",
        "election ms",
        "failover ms"
    );
    for b in r {
        println!(
            "{:>9} {:>6} {:>6} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>10.0} {:>7} {:>12.0} {:>12.0}",
            if b.link.is_empty() {
                "loopback"
            } else {
                &b.link
            },
            b.nodes,
            b.ops,
            b.batch,
            b.p50_ms,
            b.p99_ms,
            b.max_ms,
            b.ops_per_sec,
            b.failed,
            b.election_ms,
            b.failover_ms
        );
    }
}
