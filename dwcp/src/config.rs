//! The configuration file, `/etc/dwcp/dwcp.toml` (or `--config FILE`,
//! `DWCP_CONFIG`).
//!
//! Sections: `[agent]` (the daemon's own settings), `[transport]` (defaults of
//! every migration: the keys of the transport option table, e.g. `streams`,
//! `codec`, `window_mb`), `[cluster]` (raft membership; the cluster id belongs
//! here rather than on a command line). Unknown sections and keys are errors,
//! so a typo never silently becomes a default. Precedence, highest first:
//! command-line flags, `DWCP_*` environment variables, this file, built-in
//! defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use dwcp_core::transport::options::{self, Surface};
use dwcp_core::transport::TransportConfig;
use serde::Deserialize;
use toml::Spanned;

/// Where the agent looks for its configuration when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/dwcp/dwcp.toml";

/// The file as written: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub transport: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub tls: TlsSection,
}

/// `[metrics]`: the metrics endpoint and dashboard (`--metrics-listen`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// HTTP address of /metrics and /dashboard; unset: off.
    pub listen: Option<SocketAddr>,
}

/// `[tls]`: TLS of the data streams, as `dwcp agent --tls-dir ...` takes it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// libvirt's layout (default /etc/pki/qemu).
    pub dir: Option<PathBuf>,
    /// Clear text (warned about at start).
    pub insecure: Option<bool>,
    /// The name destinations' certificates must carry.
    pub hostname: Option<String>,
    /// `--allow-peer` patterns.
    pub allow_peer: Option<Vec<String>>,
    /// `--allow NAME_GLOB[=PEER]` rules.
    pub allow: Option<Vec<String>>,
}

impl TlsSection {
    /// Applies `dir`, `insecure` and `hostname` to `cfg` (through the option
    /// table, so the checks are the command line's).
    pub fn apply(&self, cfg: &mut TransportConfig) -> anyhow::Result<()> {
        let set = |cfg: &mut TransportConfig, name: &str, v: String| {
            options::find(name, Surface::Cli)
                .expect("a table option")
                .apply(cfg, &v, Surface::Cli)
                .map_err(|e| anyhow::anyhow!("config tls.{}: {e}", name.replace("tls-", "")))
        };
        if let Some(d) = &self.dir {
            set(cfg, "tls-dir", d.display().to_string())?;
        }
        if let Some(i) = self.insecure {
            set(cfg, "insecure", i.to_string())?;
        }
        if let Some(h) = &self.hostname {
            set(cfg, "tls-hostname", h.clone())?;
        }
        Ok(())
    }
}

/// `[agent]`: the flags of `dwcp agent` that are not transport options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub listen: Option<SocketAddr>,
    pub run_dir: Option<PathBuf>,
    pub incoming_dir: Option<PathBuf>,
    /// `--socket-group`: group of the run/incoming directories and route sockets.
    pub socket_group: Option<String>,
    /// `--socket-mode`: mode of route sockets, octal text (`"0660"`).
    pub socket_mode: Option<String>,
    /// Routes created at start, `NAME=HOST:PORT`.
    pub routes: Option<Vec<String>>,
    pub max_dedup_cache_mb: Option<u32>,
    pub max_sessions: Option<u16>,
    /// `--keep-mb`, `--keep-s`: kept copies for re-migration.
    pub keep_mb: Option<u64>,
    pub keep_s: Option<u64>,
    pub gate_timeout_ms: Option<u64>,
    pub shutdown_grace_s: Option<u64>,
    /// `--nova-ingress`: where redirected Nova connections are accepted.
    pub nova_ingress: Option<SocketAddr>,
    /// `--nova-ports LO-HI`.
    pub nova_ports: Option<String>,
    /// `--nova-peer-port`.
    pub nova_peer_port: Option<u16>,
    /// `--deliver-tcp NAME_GLOB` rules.
    pub deliver_tcp: Option<Vec<String>>,
}

/// `[cluster]`: raft membership, as `dwcp agent --node-id ...` takes it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub node_id: Option<u64>,
    pub cluster_id: Option<u64>,
    pub raft_listen: Option<SocketAddr>,
    /// `1=IP:PORT,2=IP:PORT,...`
    pub peers: Option<String>,
    pub data_dir: Option<PathBuf>,
}

/// One problem in a configuration file, with where it is.
#[derive(Debug)]
pub struct ConfigProblem {
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The config key of a transport option: its command-line name in snake case.
pub fn transport_key(o: &options::TransportOption) -> String {
    o.name.replace('-', "_")
}

impl FileConfig {
    /// Parses `text`; `Err` lists every problem found (a syntax error or an
    /// unknown key stops the parse, so it comes alone).
    pub fn parse(text: &str) -> Result<FileConfig, Vec<ConfigProblem>> {
        let cfg: FileConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            vec![ConfigProblem {
                line,
                key: "syntax".into(),
                message: e.message().trim().to_string(),
            }]
        })?;
        let mut problems = Vec::new();
        let mut probe = TransportConfig::default();
        for (key, value) in &cfg.transport {
            let line = Some(line_of(text, value.span().start));
            let Some(o) = options::OPTIONS.iter().find(|o| transport_key(o) == *key) else {
                let known: Vec<String> = options::OPTIONS.iter().map(transport_key).collect();
                problems.push(ConfigProblem {
                    line,
                    key: format!("transport.{key}"),
                    message: format!("unknown key (known: {})", known.join(", ")),
                });
                continue;
            };
            if let Err(e) = o.apply(&mut probe, &value_text(value.get_ref()), Surface::Cli) {
                problems.push(ConfigProblem {
                    line,
                    key: format!("transport.{key}"),
                    message: format!(
                        "{} is out of range: {}",
                        value_text(value.get_ref()),
                        e.allowed
                    ),
                });
            }
        }
        if let Some(routes) = &cfg.agent.routes {
            for r in routes {
                if check_route(r).is_err() {
                    problems.push(ConfigProblem {
                        line: None,
                        key: "agent.routes".into(),
                        message: format!("{r:?}: expected NAME=IP:PORT"),
                    });
                }
            }
        }
        if let Some(m) = &cfg.agent.socket_mode {
            if let Err(e) = dwcp_core::agent::sockets::parse_mode(m) {
                problems.push(ConfigProblem {
                    line: None,
                    key: "agent.socket_mode".into(),
                    message: e,
                });
            }
        }
        if let Some(p) = &cfg.agent.nova_ports {
            if let Err(e) = dwcp_core::agent::nova::parse_ports(p) {
                problems.push(ConfigProblem {
                    line: None,
                    key: "agent.nova_ports".into(),
                    message: e,
                });
            }
        }
        if cfg.cluster.node_id == Some(0) {
            problems.push(ConfigProblem {
                line: None,
                key: "cluster.node_id".into(),
                message: "0 is reserved; use 1, 2, ...".into(),
            });
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    /// Reads and parses `path`; the error names the file and every problem.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        FileConfig::parse(&text).map_err(|p| {
            let lines: Vec<String> = p.iter().map(|p| format!("  {p}")).collect();
            anyhow::anyhow!("{}:\n{}", path.display(), lines.join("\n"))
        })
    }

    /// The `[transport]` values, applied to `cfg` in table order.
    pub fn apply_transport(&self, cfg: &mut TransportConfig) -> anyhow::Result<()> {
        for o in options::OPTIONS {
            if let Some(v) = self.transport.get(&transport_key(o)) {
                o.apply(cfg, &value_text(v.get_ref()), Surface::Cli)
                    .map_err(|e| anyhow::anyhow!("config transport.{}: {e}", transport_key(o)))?;
            }
        }
        Ok(())
    }
}

/// `NAME=IP:PORT` split and checked.
pub fn check_route(r: &str) -> anyhow::Result<(&str, SocketAddr)> {
    let Some((name, to)) = r.split_once('=') else {
        anyhow::bail!("{r:?}: expected NAME=HOST:PORT");
    };
    let to: SocketAddr = to
        .parse()
        .map_err(|_| anyhow::anyhow!("{r:?}: {to:?} is not HOST:PORT"))?;
    Ok((name, to))
}

fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The file to read: `--config`/`DWCP_CONFIG` if given (it must exist), else
/// the default path if it exists, else none.
pub fn locate(given: Option<&Path>) -> Option<PathBuf> {
    match given {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_PATH)).filter(|p| p.exists()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_file_parses() {
        let text = include_str!("../../packaging/dwcp.toml");
        let c = FileConfig::parse(text).unwrap();
        assert_eq!(c.agent.listen, Some("0.0.0.0:7070".parse().unwrap()));
        // Every commented key is a real one: uncomment them all and parse.
        let all: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|l| l.contains(" = "))
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        FileConfig::parse(&all).unwrap();
    }

    #[test]
    fn a_full_file_parses_and_applies() {
        let c = FileConfig::parse(
            "[agent]\nlisten = \"0.0.0.0:7070\"\nroutes = [\"vm1=10.0.0.2:7070\"]\n\
             [transport]\nstreams = 8\ncodec = \"zstd:3\"\nwindow_mb = 16\n\
             [cluster]\nnode_id = 1\ncluster_id = 42\n",
        )
        .unwrap();
        let mut t = TransportConfig::default();
        c.apply_transport(&mut t).unwrap();
        assert_eq!(
            (t.streams, t.codec_name(), t.window),
            (8, "zstd:3".into(), 16 << 20)
        );
        assert_eq!(c.cluster.cluster_id, Some(42));
    }

    #[test]
    fn problems_name_line_key_and_range() {
        let e = FileConfig::parse("[transport]\ncodec = \"lz4\"\nstreams = 0\nwindow_mb = 999\n")
            .unwrap_err();
        let text: Vec<String> = e.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "line 3: transport.streams: 0 is out of range: 1..=256",
                "line 4: transport.window_mb: 999 is out of range: 1..=256 MiB",
            ]
        );
        let e = FileConfig::parse("[transport]\nstreamz = 4\n").unwrap_err();
        assert_eq!(e[0].line, Some(2));
        assert!(e[0]
            .message
            .starts_with("unknown key (known: streams, codec"));
        let e = FileConfig::parse("[agent]\nlisten = \"0.0.0.0:7070\"\nlisen = 1\n").unwrap_err();
        assert_eq!(e[0].line, Some(3));
        assert!(
            e[0].message.contains("unknown field `lisen`"),
            "{}",
            e[0].message
        );
        let e = FileConfig::parse("[agent]\nsocket_mode = \"0868\"\n").unwrap_err();
        assert_eq!(e[0].key, "agent.socket_mode");
        assert!(e[0].message.contains("octal"), "{}", e[0].message);
        let c =
            FileConfig::parse("[agent]\nsocket_group = \"libvirt-qemu\"\nsocket_mode = \"0640\"\n")
                .unwrap();
        assert_eq!(c.agent.socket_group.as_deref(), Some("libvirt-qemu"));
        assert_eq!(c.agent.socket_mode.as_deref(), Some("0640"));
        let e = FileConfig::parse("[metrix]\n").unwrap_err();
        assert!(
            e[0].message.contains("unknown field `metrix`"),
            "{}",
            e[0].message
        );
    }
}
