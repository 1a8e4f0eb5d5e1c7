//! `dwcp benchmark handshake`: what TLS adds to a session's set-up. From the
//! source host, `Session::connect` to the destination agent with N streams,
//! once through the TLS agent and once through a clear-text one
//! (`--insecure`) on the same emulated link, interleaved; the time until
//! every stream has its reply, i.e. until the first byte of guest RAM can
//! go. The streams connect and handshake in parallel, so TLS 1.3 should add
//! one round trip whatever N is. (Session resumption would not remove it:
//! a resumed TLS 1.3 handshake is still one round trip without 0-RTT data,
//! which the transport does not send; see docs/security.md.)

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Args;
use dwcp_core::transport::{Session, TlsSettings, TransportConfig};
use serde::Serialize;

use super::{compare::open_lab, OutputArgs, Progress};

#[derive(Args, Debug)]
pub struct HandshakeArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Link profile: dc, wan, internet (80 ms RTT), lossy.
    #[arg(long, default_value = "internet")]
    pub profile: String,
    /// Stream counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,64")]
    pub streams: Vec<u16>,
    /// Sessions per stream count and mode (interleaved TLS, clear, TLS, ...).
    #[arg(long, default_value_t = 7)]
    pub repeat: usize,
}

#[derive(Debug, Serialize)]
pub struct HandshakeRow {
    pub streams: u16,
    pub tls: bool,
    /// Milliseconds from the first connect to the last stream's reply.
    pub ready_ms: Vec<f64>,
    pub median_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct HandshakeResult {
    pub profile: String,
    /// The link's measured round-trip time (a one-stream clear-text TCP
    /// connect, median), ms.
    pub rtt_ms: f64,
    pub rows: Vec<HandshakeRow>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

pub fn run(a: &HandshakeArgs, p: &Progress) -> Result<HandshakeResult> {
    let mut lab = open_lab("handshake", "hs", &a.profile, &[], p)?;
    lab.start_plain_agents()
        .context("starting the clear-text agent pair")?;
    let src_ns = lab.src_ns().to_string();
    let mut rows: Vec<HandshakeRow> = Vec::new();
    for &n in &a.streams {
        for tls in [true, false] {
            rows.push(HandshakeRow {
                streams: n,
                tls,
                ready_ms: Vec::new(),
                median_ms: 0.0,
            });
        }
    }
    // A destination QEMU stand-in per session name: a socket that takes
    // whatever comes (nothing does: each session is closed once ready).
    let mut sinks = Vec::new();
    let mut seq = 0u32;
    let mut rtts = Vec::new();
    for r in 0..a.repeat {
        for row in rows.iter_mut() {
            seq += 1;
            let name = format!("hs{seq}");
            let (_, dst) = lab.agents(!row.tls);
            let incoming: PathBuf = dst.incoming(&name);
            std::fs::create_dir_all(incoming.parent().expect("parent"))?;
            let _ = std::fs::remove_file(&incoming);
            let l = UnixListener::bind(&incoming)
                .with_context(|| format!("binding {}", incoming.display()))?;
            std::thread::spawn(move || {
                for mut c in l.incoming().flatten() {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                    });
                }
            });
            sinks.push(incoming);
            lab.expect_on(!row.tls, &name, None)?;
            let mut cfg = TransportConfig {
                streams: row.streams,
                ..Default::default()
            };
            cfg.tls = if row.tls {
                TlsSettings {
                    dir: lab.src_tls_dir.clone(),
                    ..Default::default()
                }
            } else {
                TlsSettings::insecure()
            };
            let addr = lab
                .dst_addr_of(!row.tls)
                .parse()
                .map_err(|e| anyhow!("destination address: {e}"))?;
            p.set_message(format!(
                "handshake {}: {} streams, {} (round {}/{})",
                a.profile,
                row.streams,
                if row.tls { "TLS" } else { "clear text" },
                r + 1,
                a.repeat
            ));
            let cfg = Arc::new(cfg);
            let (ms, rtt) = lab.topo.in_ns(&src_ns, {
                let cfg = cfg.clone();
                let name = name.clone();
                move || -> Result<(f64, f64)> {
                    // One plain TCP connect first: the link's RTT.
                    let t = Instant::now();
                    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                    let rtt = t.elapsed().as_secs_f64() * 1e3;
                    drop(s);
                    let t = Instant::now();
                    let sess = Session::connect(&cfg, &name, addr)
                        .map_err(|e| anyhow!("connect {name}: {e}"))?;
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    sess.cancel("handshake benchmark: set-up measured");
                    Ok((ms, rtt))
                }
            })??;
            rtts.push(rtt);
            row.ready_ms.push(ms);
            p.inc();
        }
    }
    for row in rows.iter_mut() {
        row.median_ms = median(&row.ready_ms);
    }
    for s in sinks {
        let _ = std::fs::remove_file(s);
    }
    Ok(HandshakeResult {
        profile: a.profile.clone(),
        rtt_ms: median(&rtts),
        rows,
    })
}

/// The table printed and written to `handshake.md`.
pub fn table(r: &HandshakeResult) -> String {
    let mut t = format!(
        "handshake --profile {} (TCP connect RTT {:.1} ms): time until every stream is ready, median [min-max] ms\n\n| streams | clear text | TLS 1.3 | TLS extra | extra in RTTs |\n|---:|---:|---:|---:|---:|\n",
        r.profile, r.rtt_ms
    );
    let mut ns: Vec<u16> = r.rows.iter().map(|x| x.streams).collect();
    ns.dedup();
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{:.0} [{lo:.0}-{hi:.0}]", median(v))
    };
    for n in ns {
        let get = |tls: bool| r.rows.iter().find(|x| x.streams == n && x.tls == tls);
        if let (Some(t1), Some(t0)) = (get(true), get(false)) {
            let extra = t1.median_ms - t0.median_ms;
            t.push_str(&format!(
                "| {n} | {} | {} | {:+.0} ms | {:+.2} |\n",
                range(&t0.ready_ms),
                range(&t1.ready_ms),
                extra,
                extra / r.rtt_ms.max(0.001)
            ));
        }
    }
    t
}
