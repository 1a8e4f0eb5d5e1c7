//! `dwcp`: the DWCP command (agent daemon, migrate, stats, demo, benchmark,
//! load-test).

mod bench;
mod cluster;
mod config;
mod failure;
mod gendocs;
mod libvirt_migrate;
mod loadtest;
mod metrics;
mod migrate;
mod pba;
mod progress;
mod ramsample;
mod service;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use dwcp_core::agent::{control_call, Agent, AgentConfig};
use dwcp_core::transport::options::{self, Surface, TransportOption};
use dwcp_core::transport::{AcceptorLimits, TransportConfig};
use serde_json::{json, Value};

/// DWCP moves a running QEMU/KVM guest between hosts over many TCP streams
/// with compression and page deduplication.
#[derive(Parser, Debug)]
#[command(name = "dwcp", version, about, propagate_version = true,
          after_help = failure::exit_code_help())]
struct Cli {
    /// Log filter (error, warn, info, debug, trace; or RUST_LOG syntax).
    #[arg(long, global = true, default_value = "info", env = "DWCP_LOG")]
    log: String,
    /// Log line format: text (coloured only when stderr is a terminal) or
    /// json (one object per line, for log collectors).
    #[arg(long, global = true, default_value = "text", env = "DWCP_LOG_FORMAT",
          value_parser = ["text", "json"])]
    log_format: String,
    /// Configuration file (default /etc/dwcp/dwcp.toml when it exists);
    /// flags and DWCP_* variables override it.
    #[arg(long, global = true, env = "DWCP_CONFIG")]
    config: Option<PathBuf>,
    /// Machine-readable output on stdout: the result as JSON (migrate,
    /// virsh-migrate, stats, cluster status, guests, config check), and a
    /// failure as one object {"error", "kind", "exit_code"} (see below).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the per-host agent daemon (source and/or destination side).
    Agent(AgentArgs),
    /// Migrate a running QEMU through the local agent to a destination agent.
    #[command(after_help = failure::exit_code_help())]
    Migrate(migrate::MigrateArgs),
    /// Live-migrate a libvirt domain through DWCP (`virsh migrate --p2p` via the agents).
    #[command(after_help = failure::exit_code_help())]
    VirshMigrate(libvirt_migrate::VirshMigrateArgs),
    /// The configuration file: `dwcp config check [FILE]`.
    #[command(after_help = failure::exit_code_help())]
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Show the local agent's routes and sessions.
    #[command(after_help = failure::exit_code_help())]
    Stats(StatsArgs),
    /// Destination: accept a migration of this name (from this peer) on the
    /// local agent's data port.
    #[command(after_help = failure::exit_code_help())]
    Expect(ExpectArgs),
    /// Re-read the local agent's TLS credentials (as SIGHUP does).
    #[command(after_help = failure::exit_code_help())]
    ReloadTls(ReloadTlsArgs),
    /// The agents' raft cluster (`dwcp cluster status`).
    #[command(after_help = failure::exit_code_help())]
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// The guest ownership registry as the local agent's cluster member sees it.
    #[command(after_help = failure::exit_code_help())]
    Guests(cluster::ShowArgs),
    /// Boot the test guest on two emulated hosts and migrate it through DWCP.
    Demo(dwcp_lab::demo::DemoArgs),
    /// Benchmarks: DWCP against QEMU's own channels, codec, streams, consensus.
    Benchmark(bench::BenchArgs),
    /// Many synthetic guests (QEMU's precopy stream, no QEMU) migrating at
    /// once through two agents on emulated hosts; report with figures.
    LoadTest(loadtest::LoadTestArgs),
    /// Bandwidth prediction models: collect-samples, train, evaluate, deploy-model.
    #[command(subcommand)]
    Pba(pba::PbaCmd),
    /// Userspace WAN link emulator between two interfaces (`dwcp linkem --help`).
    #[command(disable_help_flag = true)]
    Linkem {
        /// Arguments for linkem (`run ...`, `profiles`, `--help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write man pages and shell completions generated from this CLI (packaging).
    #[command(hide = true)]
    GenerateDocs(gendocs::GenDocsArgs),
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Check a configuration file: every error with its line, key and
    /// allowed range (default: --config, else /etc/dwcp/dwcp.toml).
    Check {
        /// The file to check.
        file: Option<PathBuf>,
    },
}

/// Transport settings shared by `agent` and `migrate`: one flag per entry of
/// the transport option table (`dwcp_core::transport::options`), which the
/// agent's control requests and `dwcp:` URIs read too.
#[derive(Debug, Clone, Default)]
pub struct TransportArgs {
    /// The options given on the command line, in table order.
    given: Vec<(&'static TransportOption, String)>,
}

impl TransportArgs {
    pub fn config(&self) -> Result<TransportConfig> {
        self.config_over(TransportConfig::default())
    }

    /// `base` (e.g. the configuration file's values) with the given flags on top.
    pub fn config_over(&self, base: TransportConfig) -> Result<TransportConfig> {
        let mut c = base;
        for (o, v) in &self.given {
            o.apply(&mut c, v, Surface::Cli)?;
        }
        c.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
        Ok(c)
    }
}

/// The one transport option that is a flag on the command line.
const INSECURE: &str = "insecure";

impl clap::FromArgMatches for TransportArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut a = TransportArgs::default();
        a.update_from_arg_matches(m)?;
        Ok(a)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        for o in options::OPTIONS {
            if o.name == INSECURE {
                if m.get_flag(o.name) {
                    self.given.retain(|(g, _)| g.name != o.name);
                    self.given.push((o, "1".into()));
                }
                continue;
            }
            if let Some(v) = m.get_one::<String>(o.name) {
                self.given.retain(|(g, _)| g.name != o.name);
                self.given.push((o, v.clone()));
            }
        }
        Ok(())
    }
}

impl Args for TransportArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let defaults = TransportConfig::default();
        options::OPTIONS.iter().fold(cmd, |cmd, o| {
            if o.name == INSECURE {
                return cmd.arg(
                    clap::Arg::new(o.name)
                        .long(o.name)
                        .env("DWCP_INSECURE")
                        .action(clap::ArgAction::SetTrue)
                        .help(o.help)
                        .help_heading("Transport"),
                );
            }
            let d = o.show(&defaults);
            let help = if d.is_empty() || o.name == "workers" {
                format!("{} [{}]", o.help, o.allowed)
            } else {
                format!("{} [{}] [default: {d}]", o.help, o.allowed)
            };
            cmd.arg(
                clap::Arg::new(o.name)
                    .long(o.name)
                    // One small string per option, for the process's lifetime.
                    .env(&*Box::leak(
                        format!("DWCP_{}", o.name.replace('-', "_").to_uppercase())
                            .into_boxed_str(),
                    ))
                    .value_name("VALUE")
                    .help(help)
                    .help_heading("Transport"),
            )
        })
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// Data port to accept migrations on (destination role), e.g. 0.0.0.0:7070.
    #[arg(long, env = "DWCP_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for the control socket and route sockets [default: /run/dwcp].
    #[arg(long, env = "DWCP_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Directory where QEMU's incoming sockets (NAME.sock) are, on the
    /// destination [default: RUN_DIR/incoming].
    #[arg(long, env = "DWCP_INCOMING_DIR")]
    incoming_dir: Option<PathBuf>,
    /// Group given the run and incoming directories and each route socket,
    /// so that QEMU running as a member of it (libvirt's `libvirt-qemu` on
    /// Debian, `qemu` on Fedora) can connect to route sockets and create its
    /// incoming socket; a name or a gid. The run directory becomes 0750, the
    /// incoming directory 01770 (the same directory: 01770); the control
    /// socket stays root's alone (0600) [default: none, directories unchanged].
    #[arg(long, env = "DWCP_SOCKET_GROUP", value_name = "GROUP")]
    socket_group: Option<String>,
    /// Mode of each route socket, octal [default: 0660].
    #[arg(long, env = "DWCP_SOCKET_MODE", value_name = "MODE")]
    socket_mode: Option<String>,
    /// Routes to create at start: NAME=HOST:PORT (repeatable).
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Largest dedup cache per channel a peer may ask for, MiB [default: 1024].
    #[arg(long, env = "DWCP_MAX_DEDUP_CACHE_MB")]
    max_dedup_cache_mb: Option<u32>,
    /// Most incoming migrations running (or being set up) at once; one past
    /// it is refused at its handshake, naming this limit, and those running
    /// are not touched. With --session-memory this bounds the agent's memory
    /// (docs/protocol.md) [default: 16] [1..=1024].
    #[arg(long, env = "DWCP_MAX_SESSIONS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_sessions: Option<u16>,
    /// Re-migration (docs/hde.md): the distinct pages of each guest this
    /// agent sends or receives are kept, up to this many MiB per guest (in
    /// unlinked files in --spill-dir), so that the guest coming back costs
    /// only what changed; 0 keeps nothing [default: 2048].
    #[arg(long, env = "DWCP_KEEP_MB")]
    keep_mb: Option<u64>,
    /// How long a kept copy stays after its migration, seconds
    /// [default: 600].
    #[arg(long, env = "DWCP_KEEP_S")]
    keep_s: Option<u64>,
    /// Cutover gate of gated incoming migrations (libvirt hook): how long to
    /// keep trying to commit the ownership transfer before the migration
    /// fails and the guest stays on the source, ms [default: 5000].
    #[arg(long, env = "DWCP_GATE_TIMEOUT_MS")]
    gate_timeout_ms: Option<u64>,
    /// On SIGTERM/SIGINT: new migrations are refused at once, those in
    /// flight get this long to finish before they fail with a reason, s
    /// [default: 30].
    #[arg(long, env = "DWCP_SHUTDOWN_GRACE_S")]
    shutdown_grace_s: Option<u64>,
    /// Serve Prometheus metrics (/metrics) and the live dashboard
    /// (/dashboard) over HTTP on this address, e.g. 127.0.0.1:9464 [default: off].
    #[arg(long, env = "DWCP_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Destination: accept sessions only from these certificate identities
    /// (CN, DNS or IP SAN, or the whole subject; `*.example.org`), repeatable
    /// [default: any certificate the CA signed].
    #[arg(long = "allow-peer", value_name = "PATTERN")]
    allow_peer: Vec<String>,
    /// Destination: accept migrations whose name matches NAME_GLOB (from PEER
    /// only, when given) without a `dwcp expect` or a prepare, repeatable.
    #[arg(long = "allow", value_name = "NAME_GLOB[=PEER]")]
    allow: Vec<String>,
    /// Source: accept Nova's migration connections that an iptables
    /// REDIRECT rule sends here (e.g. 127.0.0.1:7071); each joins the DWCP
    /// session `nova-IP-PORT` of its original destination, to that host's
    /// agent (docs/nova.md) [default: off].
    #[arg(long, env = "DWCP_NOVA_INGRESS", value_name = "ADDR:PORT")]
    nova_ingress: Option<SocketAddr>,
    /// Ports of Nova's migrations, qemu.conf's migration_port_min-max: the
    /// ingress closes connections to others, --deliver-tcp never delivers
    /// to others [default: 49152-49215].
    #[arg(long, env = "DWCP_NOVA_PORTS", value_name = "LO-HI")]
    nova_ports: Option<String>,
    /// Source: the destination agents' data port for the ingress's sessions
    /// [default: the port of --listen, else 7070].
    #[arg(long, env = "DWCP_NOVA_PEER_PORT", value_name = "PORT")]
    nova_peer_port: Option<u16>,
    /// Destination: deliver the channels of migrations whose name matches
    /// NAME_GLOB and ends in -IP-PORT (e.g. 'nova-*') by TCP to IP:PORT,
    /// where QEMU listens (-incoming tcp:IP:PORT), instead of to
    /// INCOMING_DIR/NAME.sock; only to this host's own addresses and
    /// --nova-ports, repeatable.
    #[arg(long = "deliver-tcp", value_name = "NAME_GLOB")]
    deliver_tcp: Vec<String>,
    /// Bandwidth models: MODE.onnx files (`dwcp pba deploy-model`), reloaded
    /// when they change; without one the agent predicts with ewma(0.9).
    #[arg(long, env = "DWCP_MODEL_DIR", default_value = "/var/lib/dwcp/models")]
    model_dir: PathBuf,
    #[command(flatten)]
    transport: TransportArgs,
    #[command(flatten)]
    cluster: cluster::ClusterArgs,
}

#[derive(Args, Debug)]
struct ExpectArgs {
    /// The migration name (the destination QEMU's incoming socket NAME.sock).
    name: String,
    /// Accept it only from this source identity (certificate CN or SAN; with
    /// --insecure, the source's IP address) [default: any allowed peer].
    #[arg(long)]
    from: Option<String>,
    /// How long the expectation lasts unless a migration of that name
    /// completes first, s.
    #[arg(long, default_value_t = dwcp_core::agent::expect::DEFAULT_TTL_S)]
    ttl_s: u64,
    /// The agent's control socket.
    #[arg(long, default_value = "/run/dwcp/agent.sock")]
    agent: PathBuf,
}

#[derive(Args, Debug)]
struct ReloadTlsArgs {
    /// The agent's control socket.
    #[arg(long, default_value = "/run/dwcp/agent.sock")]
    agent: PathBuf,
}

#[derive(Args, Debug)]
struct StatsArgs {
    /// The agent's control socket.
    #[arg(long, default_value = "/run/dwcp/agent.sock")]
    agent: PathBuf,
    /// Print the raw JSON (the global --json).
    #[arg(skip)]
    json: bool,
    /// Refresh the view until interrupted: running migrations with rates
    /// (from successive samples), ETA, remaining bytes, tier and per-stream
    /// RTT; the downtime of those that ended. Not with --json.
    #[arg(long)]
    watch: bool,
    /// With --watch: time between refreshes (1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = watch::parse_interval)]
    interval: std::time::Duration,
    /// With --watch: stop after this many refreshes.
    #[arg(long, requires = "watch", hide = true)]
    count: Option<u64>,
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => usage_error(e, args.iter().skip(1).any(|a| a == "--json")),
    };
    // tract (the ONNX runtime of the bandwidth predictor) logs its CPU
    // kernel choices at info: only its warnings are shown.
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{},tract=warn", cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if cli.log_format == "json" {
        logs.json().flatten_event(true).init();
    } else {
        // No colour escapes in files and journals.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let json = cli.json;
    let r = match cli.cmd {
        Cmd::Agent(a) => run_agent(a, cli.config.as_deref()),
        Cmd::Config(ConfigCmd::Check { file }) => {
            config_check(file.as_deref().or(cli.config.as_deref()), json)
        }
        Cmd::Migrate(mut m) => {
            m.json = json;
            migrate::run(m)
        }
        Cmd::VirshMigrate(mut m) => {
            m.json = json;
            libvirt_migrate::run(m)
        }
        Cmd::Stats(mut s) => {
            s.json = json;
            stats(s)
        }
        Cmd::Expect(e) => expect(e, json),
        Cmd::ReloadTls(r) => control_call(&r.agent, &json!({"op": "reload_tls"}))
            .map(|v| {
                let m = v["message"].as_str().unwrap_or("reloaded");
                if json {
                    println!("{}", json!({"ok": true, "message": m}));
                } else {
                    eprintln!("{m}");
                }
            })
            .map_err(anyhow::Error::from),
        Cmd::Cluster(c) => cluster::cluster_cmd(c, json),
        Cmd::Guests(mut g) => {
            g.json = json;
            cluster::guests_cmd(g)
        }
        Cmd::Demo(d) => dwcp_lab::demo::run(d),
        Cmd::Benchmark(b) => bench::run(b),
        Cmd::LoadTest(l) => loadtest::run(l),
        Cmd::Pba(p) => pba::run(p, json),
        Cmd::Linkem { args } => linkem::cli_main(args),
        Cmd::GenerateDocs(g) => gendocs::run(g),
    };
    if let Err(e) = r {
        fail(&e, json);
    }
}

/// Reports a failure (text on stderr; with --json also the JSON object on
/// stdout) and exits with its class's code ([`failure::FailKind`]).
fn fail(e: &anyhow::Error, json: bool) -> ! {
    let kind = failure::classify(e);
    eprintln!("dwcp: error: {e:#}");
    if json {
        println!("{}", failure::json_error(e));
    }
    std::process::exit(kind.exit_code())
}

/// A command line clap refused: help and version are printed as usual; an
/// error exits 2 (with --json, after printing the JSON object on stdout).
fn usage_error(e: clap::Error, json: bool) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) || !json {
        e.exit()
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("bad usage");
    let _ = e.print();
    println!(
        "{}",
        json!({"error": first.strip_prefix("error: ").unwrap_or(first),
               "kind": failure::FailKind::Usage.name(),
               "exit_code": failure::FailKind::Usage.exit_code()})
    );
    std::process::exit(failure::FailKind::Usage.exit_code())
}

fn expect(e: ExpectArgs, json: bool) -> Result<()> {
    let mut req = json!({"op": "expect", "name": e.name, "ttl_s": e.ttl_s});
    if let Some(f) = &e.from {
        req["from"] = json!(f);
    }
    control_call(&e.agent, &req)?;
    let from = e.from.as_deref().unwrap_or("any allowed peer");
    if json {
        println!(
            "{}",
            json!({"ok": true, "name": e.name, "from": e.from, "ttl_s": e.ttl_s})
        );
    } else {
        eprintln!(
            "expecting migration {} from {from} for {} s",
            e.name, e.ttl_s
        );
    }
    Ok(())
}

/// A usage error found after parsing (exit 2, like clap's own).
pub fn usage(msg: impl std::fmt::Display) -> anyhow::Error {
    failure::classified(failure::FailKind::Usage, anyhow::anyhow!("{msg}"))
}

fn run_agent(mut a: AgentArgs, config: Option<&std::path::Path>) -> Result<()> {
    let file = match config::locate(config) {
        Some(p) => {
            let f = config::FileConfig::load(&p)?;
            tracing::info!("configuration {}", p.display());
            f
        }
        None => config::FileConfig::default(),
    };
    let mut base = TransportConfig::default();
    file.apply_transport(&mut base)?;
    file.tls.apply(&mut base)?;
    let mut transport = a.transport.config_over(base)?;
    let mut allow_peer = file.tls.allow_peer.clone().unwrap_or_default();
    allow_peer.extend(a.allow_peer.iter().cloned());
    transport.tls.allowed_peers = dwcp_core::tls::AllowedPeers::new(allow_peer);
    let mut allow = Vec::new();
    for r in file.tls.allow.iter().flatten().chain(&a.allow) {
        allow.push(
            r.parse::<dwcp_core::agent::AllowRule>()
                .map_err(|e| anyhow::anyhow!("--allow {e}"))?,
        );
    }
    // Every value is checked before credentials are read, so a bad flag is
    // reported as such on a host without a PKI too.
    let routes = if a.routes.is_empty() {
        file.agent.routes.clone().unwrap_or_default()
    } else {
        a.routes.clone()
    };
    for r in &routes {
        config::check_route(r).map_err(|e| anyhow::anyhow!("--route {e}"))?;
    }
    if transport.tls.insecure {
        tracing::warn!(
            "--insecure: migrations travel in clear text and peers are not authenticated; \
             anyone on the path can read guest RAM, and anyone who reaches the data port \
             can feed an expected migration"
        );
    } else {
        let store = transport
            .tls
            .load()
            .context("loading the TLS credentials (--tls-dir; --insecure for clear text)")?
            .expect("TLS");
        let c = store.current();
        tracing::info!(
            "TLS 1.3 with credentials {}: server {}, client {}; peers allowed: {}",
            store.dir().display(),
            c.server_identity(),
            c.client_identity(),
            if transport.tls.allowed_peers.is_any() {
                "any certificate the CA signed".to_string()
            } else {
                transport.tls.allowed_peers.entries().join(", ")
            }
        );
    }
    let fa = file.agent;
    a.cluster.fill_from(file.cluster);
    let cluster = match a.cluster.config()? {
        // The raft peers use the data streams' credentials (none: --insecure).
        Some(c) => Some(cluster::start(c.with_tls(transport.tls.store.clone()))?),
        None => None,
    };
    let metrics_listen = a.metrics_listen.or(file.metrics.listen);
    let (cluster, raft_metrics) = metrics::wrap_cluster(metrics_listen.is_some(), cluster);
    let run_dir = a
        .run_dir
        .or(fa.run_dir)
        .unwrap_or_else(|| PathBuf::from("/run/dwcp"));
    let max_dedup_cache_mb = a
        .max_dedup_cache_mb
        .or(fa.max_dedup_cache_mb)
        .unwrap_or(1024);
    let keep_mb = a.keep_mb.or(fa.keep_mb).unwrap_or(2048);
    let keep_s = a.keep_s.or(fa.keep_s).unwrap_or(600);
    if keep_mb > dwcp_core::codec::keep::MAX_KEEP_PAGES * 4 / 1024 {
        return Err(usage(format!(
            "--keep-mb {keep_mb} is out of range: 0..={}",
            dwcp_core::codec::keep::MAX_KEEP_PAGES * 4 / 1024
        )));
    }
    if keep_mb > 0 {
        transport.keep = Some(dwcp_core::codec::keep::KeepStore::new(
            &transport.spill_dir,
            std::time::Duration::from_secs(keep_s),
            keep_mb << 8,
        ));
    }
    let max_sessions = match a.max_sessions.or(fa.max_sessions) {
        Some(n) if !(1..=1024).contains(&n) => {
            anyhow::bail!("max_sessions = {n} is out of range: 1..=1024")
        }
        Some(n) => n,
        None => dwcp_core::transport::DEFAULT_MAX_SESSIONS as u16,
    };
    let socket_mode = match a.socket_mode.as_deref().or(fa.socket_mode.as_deref()) {
        Some(m) => dwcp_core::agent::sockets::parse_mode(m).map_err(|e| anyhow::anyhow!(e))?,
        None => dwcp_core::agent::sockets::DEFAULT_SOCKET_MODE,
    };
    let socket_group = match a.socket_group.as_deref().or(fa.socket_group.as_deref()) {
        Some(g) => {
            Some(dwcp_core::agent::sockets::resolve_group(g).map_err(|e| anyhow::anyhow!(e))?)
        }
        None => None,
    };
    let listen = a.listen.or(fa.listen);
    let nova_ports = match a.nova_ports.as_deref().or(fa.nova_ports.as_deref()) {
        Some(p) => dwcp_core::agent::nova::parse_ports(p)
            .map_err(|e| usage(format!("--nova-ports {e}")))?,
        None => dwcp_core::agent::nova::DEFAULT_PORTS,
    };
    let mut deliver_tcp = fa.deliver_tcp.clone().unwrap_or_default();
    deliver_tcp.extend(a.deliver_tcp.iter().cloned());
    if let Some(g) = deliver_tcp.iter().find(|g| g.trim().is_empty()) {
        return Err(usage(format!(
            "--deliver-tcp {g:?}: expected a name glob such as 'nova-*'"
        )));
    }
    let nova = dwcp_core::agent::NovaConfig {
        ingress: a.nova_ingress.or(fa.nova_ingress),
        ports: nova_ports,
        peer_port: a
            .nova_peer_port
            .or(fa.nova_peer_port)
            .or(listen.map(|l| l.port()))
            .unwrap_or(dwcp_core::agent::nova::DEFAULT_PEER_PORT),
        deliver_tcp,
    };
    if nova.peer_port == 0 {
        return Err(usage("--nova-peer-port 0: expected a port, 1..=65535"));
    }
    let cfg = AgentConfig {
        listen,
        incoming_dir: a
            .incoming_dir
            .or(fa.incoming_dir)
            .unwrap_or_else(|| run_dir.join("incoming")),
        run_dir: run_dir.clone(),
        transport: transport.clone(),
        limits: AcceptorLimits {
            max_ring_pages: ((max_dedup_cache_mb as u64) << 20 >> 12) as u32,
            max_sessions: max_sessions as usize,
            ..AcceptorLimits::default()
        },
        cluster,
        gate_timeout: std::time::Duration::from_millis(
            a.gate_timeout_ms.or(fa.gate_timeout_ms).unwrap_or(5000),
        ),
        allow,
        sockets: dwcp_core::agent::SocketAccess {
            group: socket_group,
            mode: socket_mode,
        },
        nova,
    };
    let agent = Agent::start(cfg).context("starting the agent")?;
    if let Some(addr) = metrics_listen {
        metrics::serve(addr, &agent, raft_metrics)?;
    }
    for r in &routes {
        let (name, to) = config::check_route(r).map_err(|e| anyhow::anyhow!("--route {e}"))?;
        agent
            .add_route(name, to, transport.clone())
            .map_err(|e| anyhow::anyhow!("--route {r:?}: {e}"))?;
    }
    eprintln!(
        "dwcp agent ready (control socket {})",
        run_dir.join("agent.sock").display()
    );
    pba::spawn_agent_predictor(run_dir.join("agent.sock"), a.model_dir.clone())?;
    let grace =
        std::time::Duration::from_secs(a.shutdown_grace_s.or(fa.shutdown_grace_s).unwrap_or(30));
    service::notify("READY=1");
    service::serve_signals(&agent, grace)
}

fn stats(a: StatsArgs) -> Result<()> {
    if a.watch && a.json {
        return Err(usage("--watch draws a terminal view: not with --json"));
    }
    if a.watch {
        return watch::run(&a.agent, a.interval, a.count);
    }
    let v = control_call(&a.agent, &json!({"op": "stats"}))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("Routes:");
    for r in v["routes"].as_array().into_iter().flatten() {
        println!(
            "  {} -> {}  streams={} codec={}  socket={}",
            r["name"].as_str().unwrap_or("?"),
            r["to"].as_str().unwrap_or("?"),
            r["streams"],
            r["codec"].as_str().unwrap_or("?"),
            r["socket"].as_str().unwrap_or("none (Nova ingress)")
        );
    }
    println!("Prepared migrations (newest last):");
    for p in v["prepared"].as_array().into_iter().flatten() {
        println!("  {}", prepared_line(p));
    }
    println!("Sessions (newest last):");
    for s in v["sessions"].as_array().into_iter().flatten() {
        let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
        let rtts: Vec<String> = s["per_stream"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["tcp"]["rtt_us"].as_u64())
            .map(|r| format!("{:.1}", r as f64 / 1000.0))
            .collect();
        println!(
            "  {:<16} {:<9} {:<9} {:>8.1} s  raw out {:>9.1} MiB  wire out {:>9.1} MiB  ratio {:>5.2}  raw in {:>7.1} MiB  streams {}  {}  dedup pages {}/{} (across channels {}, missed {}, from a kept copy {})  RTT ms [{}]{}",
            s["name"].as_str().unwrap_or("?"),
            s["role"].as_str().unwrap_or("?"),
            s["state"].as_str().unwrap_or("?"),
            f("elapsed_s"),
            f("raw_out") / 1048576.0,
            f("wire_out") / 1048576.0,
            f("ratio_out"),
            f("raw_in") / 1048576.0,
            s["streams"],
            session_codec(s),
            s["pages_deduped"],
            s["pages_seen"],
            s["pages_xref"].as_u64().unwrap_or(0),
            s["pages_missed_dups"],
            s["pages_kept"],
            rtts.join(" "),
            s["error"].as_str().map(|e| format!("\n    error: {e}")).unwrap_or_default(),
        );
        if let Some(line) = link_line(s) {
            println!("    {line}");
        }
    }
    Ok(())
}

/// The adaptive layer's line of a session in `dwcp stats`: the link mode
/// and its switches, the newest link sample, the ETA and how it was made.
pub(crate) fn link_line(s: &Value) -> Option<String> {
    let a = &s["adapt"];
    let m = &a["mode"];
    let l = &a["link"];
    if m["mode"].is_null() && l.is_null() {
        return None;
    }
    let mbit = |v: &Value| v.as_f64().map(|b| format!("{:.0} Mbit/s", b * 8.0 / 1e6));
    let mut parts = vec![format!(
        "mode {}{} ({} switch{})",
        m["mode"].as_str().unwrap_or("?"),
        if m["fixed"] == true { ", fixed" } else { "" },
        m["switches"].as_u64().unwrap_or(0),
        if m["switches"] == 1 { "" } else { "es" }
    )];
    if let Some(r) = l["rtt_us"].as_f64() {
        parts.push(format!("rtt {:.2} ms", r / 1000.0));
    }
    match mbit(&l["capacity_bytes_s"]) {
        Some(c) => parts.push(format!("capacity {c}")),
        None => {
            if let Some(f) = mbit(&l["rate_floor_bytes_s"]) {
                parts.push(format!("capacity >= {f}"));
            }
        }
    }
    if let Some(loss) = l["loss"].as_f64() {
        parts.push(format!("loss {:.3} %", loss * 100.0));
    }
    if let Some(w) = mbit(&l["wire_rate_bytes_s"]) {
        parts.push(format!("wire {w}"));
    }
    if let Some(c) = l["codec_cpu"].as_f64() {
        parts.push(format!("codec cpu {c:.2}"));
    }
    if let Some(e) = s["eta_s"].as_f64() {
        parts.push(format!(
            "ETA {e:.1} s ({})",
            s["eta_source"].as_str().unwrap_or("driver")
        ));
    }
    Some(format!("link: {}", parts.join(", ")))
}

/// The codec column of a session: the initiator's tier, or on the responder
/// the codecs of the frames it received (what the source actually sent).
fn session_codec(s: &Value) -> String {
    if s["role"] == "responder" {
        let c = &s["codecs_in"];
        let parts: Vec<String> = ["zstd_ctx", "zstd", "lz4", "none", "raw"]
            .iter()
            .filter_map(|k| {
                c[*k]
                    .as_u64()
                    .filter(|n| *n > 0)
                    .map(|n| format!("{k}:{n}"))
            })
            .collect();
        format!(
            "frames in {}",
            if parts.is_empty() {
                "-".into()
            } else {
                parts.join(" ")
            }
        )
    } else {
        // Compression with context: on now, and the frames it sent.
        let ctx = match (s["context_on"].as_bool(), s["frames_context_out"].as_u64()) {
            (Some(true), Some(n)) => format!(" +context ({n} frames)"),
            (_, Some(n)) if n > 0 => format!(" (context: {n} frames)"),
            _ => String::new(),
        };
        format!("tier {}{ctx}", s["tier"].as_str().unwrap_or("?"))
    }
}

/// UTC time of day of a Unix timestamp (seconds), `HH:MM:SS`.
fn clock(t: &Value) -> String {
    match t.as_f64() {
        Some(t) => {
            let s = t as u64 % 86400;
            format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        }
        None => "-".into(),
    }
}

/// One prepared migration for `dwcp stats`: the choice, its state and times,
/// and beside it what the relaying session actually used.
fn prepared_line(p: &Value) -> String {
    let s = |k: &str| p[k].as_str().unwrap_or("-").to_string();
    let mut line = format!(
        "{:<16} {:<9} {} streams={} codec={}  chosen by {}  from {}  uuid {}  prepared {} started {} ended {} UTC",
        s("name"),
        s("state"),
        s("transport"),
        p["streams"],
        s("codec"),
        s("chosen_by"),
        s("source_host"),
        s("uuid"),
        clock(&p["prepared_at"]),
        clock(&p["started_at"]),
        clock(&p["ended_at"]),
    );
    let u = &p["used"];
    if u.is_object() {
        line.push_str(&format!(
            "\n    used: session {} ({} {}) streams={} codec={}{}",
            u["session"].as_str().unwrap_or("?"),
            u["role"].as_str().unwrap_or("?"),
            u["state"].as_str().unwrap_or("?"),
            u["streams"],
            u["codec"].as_str().unwrap_or("-"),
            match p["used_matches"].as_bool() {
                Some(true) => "  (as prepared)",
                Some(false) => "  (DIFFERS from the prepared choice)",
                None => "",
            }
        ));
    } else {
        line.push_str("\n    used: no session yet");
    }
    if let Some(r) = p["reason"].as_str() {
        line.push_str(&format!("\n    reason: {r}"));
    }
    line
}

/// `dwcp config check [FILE]`: prints every problem with its line, key and
/// allowed range; Ok when there is none.
/// With `json`, prints `{"file": F, "ok": true}` instead; a file with
/// problems is a [`crate::failure::ConfigProblems`] error, which lists them.
fn config_check(path: Option<&std::path::Path>, json: bool) -> anyhow::Result<()> {
    let path = path
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    match config::FileConfig::parse(&text) {
        Ok(_) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"file": path.display().to_string(), "ok": true})
                );
            } else {
                println!("{}: ok", path.display());
            }
            Ok(())
        }
        Err(problems) => {
            if !json {
                for p in &problems {
                    println!("{}: {p}", path.display());
                }
            }
            Err(crate::failure::ConfigProblems {
                file: path.display().to_string(),
                problems: problems.iter().map(|p| p.to_string()).collect(),
            }
            .into())
        }
    }
}
