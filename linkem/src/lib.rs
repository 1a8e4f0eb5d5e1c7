//! linkem: a userspace WAN link emulator (delay, jitter, rate with a
//! drop-tail queue, random loss, bandwidth traces) forwarding L2 frames
//! between two AF_PACKET ports, for machines without `netem`.
//!
//! * [`run`] / [`cli_main`]: run the forwarder between two interfaces of the
//!   current (or a named) network namespace (`dwcp linkem run ...`).
//! * [`topo::Topology`]: src / link / dst namespaces for tests, with either a
//!   kernel bridge or the forwarder (as threads of the calling process) in
//!   the middle.
//!
//! Modules depend one way only: [`sys`] (syscalls) and [`config`] (what a
//! link does) use nothing else of the crate; `forwarder` uses both; [`topo`]
//! uses all three (and gives [`Profile`] its [`Middle`]).
//!
//! See README.md for the design and measured accuracy.

pub mod config;
mod forwarder;
pub mod sys;
pub mod topo;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub use config::{DirConfig, LinkConfig, Profile, QueueLimit, Trace};
pub use forwarder::{DirCounters, Forwarder, Stats};
pub use topo::{Middle, Topology};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Forward between `iface_a` and `iface_b` (in the caller's network
/// namespace) until SIGINT/SIGTERM; writes `config.stats_file` every second.
/// Returns the final counters.
pub fn run(config: &LinkConfig, iface_a: &str, iface_b: &str) -> Result<Stats> {
    run_opts(config, iface_a, iface_b, None, None)
}

fn run_opts(
    config: &LinkConfig,
    iface_a: &str,
    iface_b: &str,
    netns: Option<&str>,
    duration: Option<Duration>,
) -> Result<Stats> {
    STOP.store(false, Ordering::Relaxed);
    install_signal_handlers();
    let fw = Forwarder::start(config, iface_a, iface_b, netns)?;
    forwarder::run_until(fw, config, &STOP, duration)
}

/// Usage text of [`cli_main`].
pub const USAGE: &str = "\
usage: linkem run [options]          forward between two interfaces
       linkem profiles               list the named profiles

options of run (a time: 25ms, 1.5s, 300us; a rate: 100mbit, 1gbit, 500kbit):
  --iface-a IF      port a (default a)        --iface-b IF   port b (default b)
  --netns NS        open the ports inside named network namespace NS
  --profile P       dc | wan | internet | lossy (default dc = unshaped)
  --delay T         one-way delay             --jitter T     +- bounded jitter
  --rate R          rate limit                --queue Q      bdp | 20ms | 64kb
  --loss L          0.1% or 0.001             --trace FILE   lines `time_s<TAB>Mbit/s`, loops
  --overhead N      extra wire bytes/frame    --seed N       loss/jitter seed
  --stats-file F    JSON counters, rewritten every second
  --duration T      stop after T (default: until SIGINT/SIGTERM)
  Shaping options apply to both directions; append -ab or -ba (e.g.
  --rate-ab 20mbit) for one direction (a->b or b->a).
";

/// Entry point of the `linkem` command line; `args` are the arguments
/// after the program / subcommand name, e.g. `["run", "--profile", "wan"]`.
pub fn cli_main<I, S>(args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let args: Vec<String> = args.into_iter().map(Into::into).collect();
    match args.first().map(String::as_str) {
        Some("run") => {}
        Some("profiles") => {
            for p in Profile::ALL {
                let c = p.config().a_to_b;
                match c.rate_bps {
                    None => println!("{:<9} unshaped (kernel bridge)", p.name()),
                    Some(r) => println!(
                        "{:<9} {} Mbit/s, RTT {} ms, loss {}% per direction",
                        p.name(),
                        r / 1_000_000,
                        (c.delay * 2).as_millis(),
                        c.loss * 100.0
                    ),
                }
            }
            return Ok(());
        }
        Some("help") | Some("-h") | Some("--help") | None => {
            print!("{USAGE}");
            return Ok(());
        }
        Some(other) => bail!("unknown subcommand {other:?}\n{USAGE}"),
    }
    let mut opts: Vec<(String, String)> = Vec::new();
    let mut it = args[1..].iter();
    while let Some(k) = it.next() {
        let Some(name) = k.strip_prefix("--") else {
            bail!("unexpected argument {k:?}\n{USAGE}");
        };
        let (name, val) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (
                name.to_string(),
                it.next()
                    .with_context(|| format!("--{name} needs a value"))?
                    .clone(),
            ),
        };
        opts.push((name, val));
    }
    let get = |n: &str| {
        opts.iter()
            .rev()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    let profile: Profile = get("profile").unwrap_or("dc").parse()?;
    let mut cfg = profile.config();
    // Shaping options, in command-line order, both directions or one.
    for (k, v) in &opts {
        let (base, dirs): (&str, &[usize]) = if let Some(b) = k.strip_suffix("-ab") {
            (b, &[0])
        } else if let Some(b) = k.strip_suffix("-ba") {
            (b, &[1])
        } else {
            (k.as_str(), &[0, 1])
        };
        for &d in dirs {
            let dc = if d == 0 {
                &mut cfg.a_to_b
            } else {
                &mut cfg.b_to_a
            };
            match base {
                "delay" => dc.delay = config::parse_duration(v)?,
                "jitter" => dc.jitter = config::parse_duration(v)?,
                "rate" => dc.rate_bps = Some(config::parse_rate(v)?),
                "queue" => dc.queue = config::parse_queue(v)?,
                "loss" => dc.loss = config::parse_loss(v)?,
                "trace" => dc.trace = Some(std::sync::Arc::new(Trace::load(v.as_ref())?)),
                "overhead" => dc.overhead = v.parse().context("--overhead")?,
                "iface-a" | "iface-b" | "netns" | "profile" | "seed" | "stats-file"
                | "duration"
                    if dirs.len() == 2 => {}
                _ => bail!("unknown option --{k}\n{USAGE}"),
            }
        }
    }
    if let Some(s) = get("seed") {
        cfg.seed = s.parse().context("--seed")?;
    }
    cfg.stats_file = get("stats-file").map(Into::into);
    let duration = get("duration").map(config::parse_duration).transpose()?;
    let a = get("iface-a").unwrap_or("a");
    let b = get("iface-b").unwrap_or("b");
    let stats = run_opts(&cfg, a, b, get("netns"), duration)?;
    eprint!("{}", stats.to_json());
    Ok(())
}
