//! `dwcp benchmark`: DWCP against QEMU's own migration channel on the same
//! emulated link, plus component benchmarks (codec tiers, stream
//! scalability, consensus). Every command writes `results.json` (schema in
//! [`schema`], documented in docs/benchmarks.md) and a self-contained
//! `report.html` with SVG figures into `--output`.

mod baseline;
mod compare;
mod consensus;
mod floor;
mod handshake;
mod micro;
mod remigrate;
pub(crate) mod report;
mod schema;
mod tiers;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

pub use compare::cpu_seconds;
pub use schema::{Machine, Results};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: BenchCmd,
    #[command(flatten)]
    data: dwcp_lab::locate::DataDirArgs,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Migrate the same guest over the same emulated link with QEMU's own
    /// channels and with DWCP; interleaved runs, median/min/max.
    Compare(compare::CompareArgs),
    /// The highest guest dirty rate at which each contender still converges
    /// on a link (rates ascending; a contender stops at its first failure).
    Converge(compare::ConvergeArgs),
    /// Codec tiers on a guest-like memory image: ratio and MB/s per core,
    /// DWCP's codec against the raw lz4/zstd crates.
    Hde(micro::HdeArgs),
    /// Stream scalability through two agents (no QEMU): 1..32 streams.
    Amst(micro::AmstArgs),
    /// Consensus commit latency and throughput (3 and 5 nodes, loopback);
    /// with --guests, the registry at fleet size.
    Consensus(micro::ConsensusArgs),
    /// What TLS adds to session set-up: time until N streams are ready,
    /// TLS against clear text through two agent pairs on one emulated link.
    Handshake(handshake::HandshakeArgs),
    /// The compression floor of a guest's RAM: zero, duplicate and unique
    /// pages, and what zstd makes of the unique ones (bytes and seconds on a
    /// link), from a `pmemsave` image or the test guest.
    Floor(floor::FloorArgs),
    /// Bandwidth predictors on the FCC test traces: MAE, RMSE, R² (next
    /// second and 5-s mean), inference latency p50/p99, model size.
    Pba(crate::pba::BenchPbaArgs),
    /// A guest migrated to the other host and, after a while there, back:
    /// both trips' time and bytes per contender (DWCP's way back sends
    /// only what the first host did not keep), every trip verified.
    Remigrate(remigrate::RemigrateArgs),
    /// The whole suite with small defaults (compare on dc and internet,
    /// hde, amst, consensus) and one report.
    Run(RunArgs),
}

#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Directory for results.json, report.html and the SVG figures.
    #[arg(long, default_value = "dwcp-bench")]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// Profiles for the migration comparison.
    #[arg(long, value_delimiter = ',', default_value = "dc,internet")]
    profiles: Vec<String>,
    /// Repeats per contender and profile.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    guest_mem: u64,
    /// Realistic content the guest fills, MiB.
    #[arg(long, default_value_t = 256)]
    fill: u64,
    /// Guest dirty rate, MiB/s.
    #[arg(long, default_value_t = 8)]
    dirty_rate: u64,
    /// Contenders (see `compare --help`).
    #[arg(long, value_delimiter = ',', default_value = compare::DEFAULT_CONTENDERS)]
    contenders: Vec<String>,
    /// Per-migration timeout, seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// Prints a command's table and writes it as `NAME.md`, with its figures
/// as `NAME.json`, into `dir`.
fn write_table(dir: &Path, name: &str, table: &str, figures: &impl serde::Serialize) -> Result<()> {
    print!("{table}");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("{name}.md")), table)?;
    let json = dir.join(format!("{name}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(figures)?)?;
    println!("results: {}", json.display());
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    a.data.apply();
    // The command as one would type it: `dwcp ...`, not the binary's path.
    let cmdline: Vec<String> = std::env::args()
        .enumerate()
        .map(|(i, a)| match i {
            0 => Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or(a),
            _ => a,
        })
        .collect();
    let mut res = Results::new(cmdline.join(" "));
    if let BenchCmd::Handshake(h) = &a.cmd {
        let p = Progress::new(
            (h.streams.len() * 2 * h.repeat) as u64,
            (h.streams.len() * 2 * h.repeat) as u64,
        );
        let r = handshake::run(h, &p)?;
        p.finish();
        let t = handshake::table(&r);
        return write_table(&h.out.output, "handshake", &t, &r);
    }
    if let BenchCmd::Remigrate(r) = &a.cmd {
        let n = (r.contenders.len() * r.repeat) as u64;
        let p = Progress::new(n, n);
        let s = remigrate::run(r, cmdline.join(" "), &p)?;
        p.finish();
        let t = remigrate::summary(&s);
        return write_table(&r.out.output, "remigrate", &t, &s);
    }
    if let BenchCmd::Floor(f) = &a.cmd {
        floor::run(f)?;
        return Ok(());
    }
    if let BenchCmd::Pba(p) = a.cmd {
        return crate::pba::bench(p, cmdline.join(" "));
    }
    let out = match a.cmd {
        BenchCmd::Compare(c) if c.baseline.is_some() || c.current.is_some() => {
            let (Some(b), Some(cur)) = (&c.baseline, &c.current) else {
                anyhow::bail!(
                    "--baseline and --current go together (two results.json files to compare)"
                );
            };
            print!("{}", baseline::compare(b, cur)?);
            return Ok(());
        }
        BenchCmd::Compare(c) => {
            let p = Progress::new(c.runs() as u64, c.runs() as u64 * 40);
            let s = compare::run(&c, &p)?;
            p.finish();
            compare::print_summary(&s);
            res.compare.push(s);
            c.out.output.clone()
        }
        BenchCmd::Converge(c) => {
            let p = Progress::new(c.max_runs() as u64, c.max_runs() as u64 * 60);
            let s = compare::converge(&c, &p)?;
            p.finish();
            print!("{}", compare::converge_summary(&s));
            res.converge.push(s);
            c.out.output.clone()
        }
        BenchCmd::Hde(h) => {
            let r = micro::hde(&h)?;
            micro::print_hde(&r);
            res.hde = Some(r);
            h.out.output.clone()
        }
        BenchCmd::Amst(m) => {
            let p = Progress::new(m.streams.len() as u64, m.streams.len() as u64 * 10);
            let r = micro::amst(&m, &p)?;
            p.finish();
            micro::print_amst(&r);
            res.amst.push(r);
            m.out.output.clone()
        }
        BenchCmd::Consensus(c) if c.guests > 0 => {
            res.consensus_fleet = micro::consensus_fleet(&c)?;
            micro::print_fleet(&res.consensus_fleet);
            c.out.output.clone()
        }
        BenchCmd::Consensus(c) => {
            let r = micro::consensus(&c)?;
            micro::print_consensus(&r);
            res.consensus = r;
            c.out.output.clone()
        }
        BenchCmd::Run(r) => {
            suite(&r, &mut res)?;
            r.out.output.clone()
        }
        BenchCmd::Handshake(_) | BenchCmd::Floor(_) | BenchCmd::Pba(_) | BenchCmd::Remigrate(_) => {
            unreachable!("handled above")
        }
    };
    write_outputs(&res, &out)?;
    println!(
        "results: {}  report: {}",
        out.join("results.json").display(),
        out.join("report.html").display()
    );
    if res.corrupted_runs() > 0 {
        anyhow::bail!(
            "{} benchmark run(s) CORRUPTED the guest (see results.json)",
            res.corrupted_runs()
        );
    }
    Ok(())
}

fn suite(r: &RunArgs, res: &mut Results) -> Result<()> {
    let compares: Vec<compare::CompareArgs> = r
        .profiles
        .iter()
        .map(|p| compare::CompareArgs {
            out: r.out.clone(),
            profile: p.clone(),
            trace: None,
            trace_mean_mbit: 100.0,
            guest_mem: r.guest_mem,
            fill: r.fill,
            dirty_rate: r.dirty_rate,
            repeat: r.repeat,
            contenders: r.contenders.clone(),
            timeout: r.timeout,
            seed: 1,
            max_bandwidth: 0,
            qemu_args_file: None,
            warmup: 20,
            congestion: None,
            qemu: std::env::var("DWCP_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
            baseline: None,
            current: None,
            floor_levels: vec![3, 19],
            no_floor: false,
            guest_initrd: std::env::var_os("DWCP_GUEST_INITRD").map(PathBuf::from),
        })
        .collect();
    let amst = micro::AmstArgs {
        out: r.out.clone(),
        profile: "dc".into(),
        streams: vec![1, 2, 4, 8, 16, 32],
        data_size: 256,
        congestion: None,
    };
    let hde = micro::HdeArgs {
        out: r.out.clone(),
        data_size: 128,
        input: None,
        seed: 1,
    };
    let cons = micro::ConsensusArgs {
        out: r.out.clone(),
        nodes: vec![3, 5],
        ops: 500,
        batch: 8,
        link: vec!["loopback".into(), "internet".into()],
        hosts: 1000,
        guests: 0,
        concurrent: 1000,
        migrations: None,
        client_threads: 0,
    };
    // Units: one per migration run / stream count, plus hde and consensus.
    let runs: u64 = compares.iter().map(|c| c.runs() as u64).sum();
    let units = runs + amst.streams.len() as u64 + 2;
    let est_secs = runs * 40 + amst.streams.len() as u64 * 10 + 60;
    let p = Progress::new(units, est_secs);
    p.set_message("hde: codec tiers");
    match micro::hde(&hde) {
        Ok(h) => {
            micro::print_hde(&h);
            res.hde = Some(h)
        }
        Err(e) => res.errors.push(format!("hde: {e:#}")),
    }
    p.inc();
    p.set_message("consensus: 3 and 5 nodes");
    match micro::consensus(&cons) {
        Ok(c) => res.consensus = c,
        Err(e) => res.errors.push(format!("consensus: {e:#}")),
    }
    p.inc();
    match micro::amst(&amst, &p) {
        Ok(a) => res.amst.push(a),
        Err(e) => res.errors.push(format!("amst: {e:#}")),
    }
    for c in &compares {
        match compare::run(c, &p) {
            Ok(s) => {
                p.println(compare::summary_text(&s));
                res.compare.push(s)
            }
            Err(e) => res
                .errors
                .push(format!("compare --profile {}: {e:#}", c.profile)),
        }
        // Results so far survive a later failure or interruption.
        let _ = write_outputs(res, &r.out.output);
    }
    p.finish();
    Ok(())
}

fn write_outputs(res: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(res)?)?;
    let (html, svgs) = report::render(res);
    for (name, svg) in &svgs {
        std::fs::write(dir.join(name), svg)?;
    }
    std::fs::write(dir.join("report.html"), html)?;
    Ok(())
}

/// The suite's progress bar: what runs now and the ETA. When stderr is not a
/// terminal (CI, `make bench > log`), each message becomes a plain line with
/// the elapsed time, the step and the ETA instead.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    plain: bool,
}

impl Progress {
    /// `units` steps; `est_secs` the expected duration (for the ETA before
    /// the first step finishes).
    pub(crate) fn new(units: u64, est_secs: u64) -> Progress {
        let bar = ProgressBar::new(units);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} ETA {eta} {wide_msg}",
            )
            .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        let p = Progress {
            bar,
            plain: !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        p.set_message(format!("(estimated {} min)", est_secs.div_ceil(60)));
        p
    }
    pub fn set_message(&self, m: impl Into<String>) {
        let m = m.into();
        if self.plain {
            let pos = self.bar.position();
            let len = self.bar.length().unwrap_or(0);
            let eta = if pos == 0 {
                "?".to_string()
            } else {
                let left = self.bar.elapsed().as_secs_f64() * (len - pos.min(len)) as f64;
                format!("{:.0}s", left / pos as f64)
            };
            eprintln!(
                "[{:>5}s] {pos}/{len} ETA {eta} {m}",
                self.bar.elapsed().as_secs(),
            );
        }
        self.bar.set_message(m);
    }
    pub fn inc(&self) {
        self.bar.inc(1);
    }
    pub fn println(&self, m: impl AsRef<str>) {
        if self.plain {
            eprintln!("{}", m.as_ref());
        } else {
            self.bar.println(m);
        }
    }
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
