//! A three-member DWCP cluster in the two-host lab: node 1 is the source
//! host's agent, node 2 the destination's, node 3 a third agent in the
//! source namespace (cluster member only). Real agents, real raft logs on
//! disk. Shared by the cluster tests and the fault-injection soak.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dwcp_core::agent::control_request;
use serde_json::{json, Value};

use linkem::topo::Middle;

use crate::hosts::{AgentProc, Lab};
use crate::locate::dwcp_bin;
use crate::migration::{GuestPair, MigrationSpec};

/// The cluster id of the lab's members.
pub const CLUSTER_ID: &str = "6060";

#[allow(missing_debug_implementations)]
pub struct ClusterLab {
    pub lab: Lab,
    pub third: Option<AgentProc>,
    pub third_args: Vec<String>,
    /// Agent arguments of nodes 1 and 2 (for restarts).
    pub node_args: [Vec<String>; 2],
    /// Node 3's host: the source's IP, or a second address of the source
    /// namespace ([`ClusterLab::with_third_host`]).
    pub third_ip: Ipv4Addr,
    /// Node 3's TLS directory: the source host's (node 3 runs on that host),
    /// or (own host) one whose certificates name only `third_ip`.
    pub third_tls_dir: PathBuf,
}

impl ClusterLab {
    /// Two hosts whose agents, and a third agent in the source namespace, form a
    /// raft cluster. With `dst_blocked`, nodes 1 and 3 know node 2 at an address
    /// nothing listens on: the destination can never take part in a quorum.
    pub fn new(tag: &str, dst_blocked: bool) -> ClusterLab {
        Self::with_args(tag, dst_blocked, &[])
    }

    /// [`ClusterLab::new`] with more arguments for every agent.
    pub fn with_args(tag: &str, dst_blocked: bool, extra: &[&str]) -> ClusterLab {
        Self::build(tag, Middle::Bridge, dst_blocked, extra, false)
    }

    /// The cluster with the two hosts joined by `middle` (e.g. an emulated
    /// link profile). Node 3 shares the source host's side.
    pub fn over(tag: &str, middle: Middle, extra: &[&str]) -> ClusterLab {
        Self::build(tag, middle, false, extra, false)
    }

    /// [`ClusterLab::with_args`], node 3 on a host of its own: a second
    /// address of the source namespace (`.3` of the lab's subnet), listed
    /// in `--peers` at that address, with certificates of the lab's CA that
    /// name only it. So node 3 is a valid member that is neither the source
    /// (node 1) nor the destination (node 2) host.
    pub fn with_third_host(tag: &str, extra: &[&str]) -> ClusterLab {
        Self::build(tag, Middle::Bridge, false, extra, true)
    }

    fn build(
        tag: &str,
        middle: Middle,
        dst_blocked: bool,
        extra: &[&str],
        third_host: bool,
    ) -> ClusterLab {
        let mut lab = Lab::new(tag, middle, &[]).expect("lab");
        let (s, d) = (lab.topo.src_ip, lab.topo.dst_ip);
        let (t, third_tls_dir) = if third_host {
            let [a, b, c, _] = s.octets();
            let t = Ipv4Addr::new(a, b, c, 3);
            let out = Command::new("ip")
                .args([
                    "-n",
                    lab.src_ns(),
                    "addr",
                    "add",
                    &format!("{t}/24"),
                    "dev",
                    "eth0",
                ])
                .output()
                .expect("ip addr add");
            assert!(
                out.status.success(),
                "adding {t} to the source namespace: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dir = lab.dir.join("third-pki");
            crate::hosts::issue_host_pki(&lab.ca, &dir, &[t.to_string().as_str()])
                .expect("node 3's certificates");
            (t, dir)
        } else {
            (s, lab.src_tls_dir.clone())
        };
        let dst_seen = if dst_blocked {
            format!("{d}:7199")
        } else {
            format!("{d}:7102")
        };
        let peers_of_others = format!("1={s}:7101,2={dst_seen},3={t}:7103");
        let peers_of_dst = format!("1={s}:7101,2={d}:7102,3={t}:7103");
        let args = |id: u32, listen: String, peers: &str, dir: &Path| -> Vec<String> {
            vec![
                "--node-id".into(),
                id.to_string(),
                "--cluster-id".into(),
                CLUSTER_ID.into(),
                "--raft-listen".into(),
                listen,
                "--peers".into(),
                peers.into(),
                "--data-dir".into(),
                dir.join(format!("raft-{id}")).display().to_string(),
                "--gate-timeout-ms".into(),
                "2000".into(),
            ]
        };
        let dir = lab.dir.clone();
        // Restart the lab's agents as cluster members.
        let with_extra = |mut v: Vec<String>| {
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let node_args = [
            with_extra(args(1, format!("{s}:7101"), &peers_of_others, &dir)),
            with_extra(args(2, format!("{d}:7102"), &peers_of_dst, &dir)),
        ];
        lab.agent_args = node_args[0].clone();
        drop(lab.src_agent.take());
        lab.start_agent(true).expect("source agent with cluster");
        lab.agent_args = node_args[1].clone();
        drop(lab.dst_agent.take());
        lab.start_agent(false)
            .expect("destination agent with cluster");
        let third_args = with_extra(args(3, format!("{t}:7103"), &peers_of_others, &dir));
        let mut c = ClusterLab {
            lab,
            third: None,
            third_args,
            node_args,
            third_ip: t,
            third_tls_dir,
        };
        c.start_third();
        let mut members = vec![
            c.lab.src_agent().control(),
            c.third.as_ref().unwrap().control(),
        ];
        if !dst_blocked {
            members.push(c.lab.dst_agent().control());
        }
        for m in members {
            c.wait_leader(&m, Duration::from_secs(15));
        }
        c
    }

    /// The control socket of node `id` (1, 2 or 3), running or not.
    pub fn control(&self, id: u64) -> PathBuf {
        let run = match id {
            1 => "src-run",
            2 => "dst-run",
            _ => "third-run",
        };
        self.lab.dir.join(run).join("agent.sock")
    }

    /// Whether node `id`'s agent process runs.
    pub fn alive(&self, id: u64) -> bool {
        match id {
            1 => self.lab.src_agent.is_some(),
            2 => self.lab.dst_agent.is_some(),
            _ => self.third.is_some(),
        }
    }

    /// Kills node `id`'s agent (SIGKILL): its raft log stays on disk.
    pub fn kill(&mut self, id: u64) {
        match id {
            1 => drop(self.lab.src_agent.take()),
            2 => drop(self.lab.dst_agent.take()),
            _ => drop(self.third.take()),
        }
    }

    /// Restarts node `id`'s agent from its data dir, if it is not running.
    pub fn restart(&mut self, id: u64) {
        if self.alive(id) {
            return;
        }
        match id {
            1 | 2 => {
                self.lab.agent_args = self.node_args[id as usize - 1].clone();
                self.lab.start_agent(id == 1).expect("restarting an agent");
            }
            _ => self.start_third(),
        }
    }

    /// The leader as some running member sees it.
    pub fn leader(&self) -> Option<u64> {
        (1..=3).filter(|&id| self.alive(id)).find_map(|id| {
            control_request(&self.control(id), &json!({"op": "cluster_status"}))
                .ok()
                .and_then(|v| v["status"]["leader"].as_u64())
        })
    }

    /// Moves raft leadership to node `to` (the `transfer_leader` op on the
    /// current leader) and waits until every running member sees it lead.
    pub fn move_leader(&self, to: u64, timeout: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            let views: Vec<Option<u64>> = (1..=3)
                .filter(|&id| self.alive(id))
                .map(|id| status_of(&self.control(id))["leader"].as_u64())
                .collect();
            if views.iter().all(|l| *l == Some(to)) {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                return Err(format!(
                    "leadership did not move to node {to} within {timeout:?} (members see {views:?})"
                ));
            }
            if let Some(l) = self.leader().filter(|&l| l != to) {
                let _ = control_request(
                    &self.control(l),
                    &json!({"op": "transfer_leader", "to": to}),
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn start_third(&mut self) {
        let run_dir = self.lab.dir.join("third-run");
        std::fs::create_dir_all(&run_dir).unwrap();
        let log = self.lab.dir.join("third-agent.log");
        let logf = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child: Child = self
            .lab
            .topo
            .exec(self.lab.src_ns(), dwcp_bin().unwrap())
            .args(["--log", "info", "agent", "--run-dir"])
            .arg(&run_dir)
            .arg("--tls-dir")
            .arg(&self.third_tls_dir)
            .args(&self.third_args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("third agent");
        let a = AgentProc {
            child,
            run_dir,
            log,
        };
        let t0 = Instant::now();
        while control_request(&a.control(), &json!({"op": "ping"})).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "third agent did not start:\n{}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.third = Some(a);
    }

    pub fn wait_leader(&self, agent: &Path, timeout: Duration) -> u64 {
        poll(timeout, Duration::from_millis(50), || {
            let st = status(agent);
            st["leader"]
                .as_u64()
                .ok_or_else(|| format!("no raft leader within {timeout:?}: {st}\n{}", self.logs()))
        })
    }

    pub fn logs(&self) -> String {
        format!(
            "source agent log:\n{}\ndestination agent log:\n{}\nthird agent log:\n{}",
            self.lab.src_agent().log_text(),
            self.lab.dst_agent().log_text(),
            self.third
                .as_ref()
                .map(AgentProc::log_text)
                .unwrap_or_default()
        )
    }
}

/// Cuts (or heals) the destination namespace off the raft group: its raft
/// port takes nothing in and it reaches no peer's raft port. The data port
/// (migrations) is untouched.
pub fn partition_dst(lab: &Lab, cut: bool) {
    let flag = if cut { "-I" } else { "-D" };
    for rule in [
        vec!["INPUT", "-p", "tcp", "--dport", "7102", "-j", "DROP"],
        vec![
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            "7101,7103",
            "-j",
            "DROP",
        ],
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", lab.dst_ns(), "iptables", flag])
            .args(&rule)
            .output()
            .expect("iptables");
        assert!(
            out.status.success(),
            "iptables {flag} {rule:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The destination agent's prepared entry for `name` (from `stats`).
pub fn prepared(agent: &Path, name: &str) -> Value {
    let v = control_request(agent, &json!({"op": "stats"})).expect("stats");
    v["prepared"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// [`status`], or Null when the agent does not answer.
fn status_of(agent: &Path) -> Value {
    control_request(agent, &json!({"op": "cluster_status"}))
        .map(|v| v["status"].clone())
        .unwrap_or(Value::Null)
}

pub fn status(agent: &Path) -> Value {
    control_request(agent, &json!({"op": "cluster_status"})).expect("cluster_status")["status"]
        .clone()
}

/// The registry record of `guest` as `agent`'s member has applied it.
pub fn record(agent: &Path, guest: &str) -> Value {
    let v = control_request(agent, &json!({"op": "guests"})).expect("guests");
    v["guests"]["guests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["guest"] == guest)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until `agent`'s registry shows `guest` matching `pred`.
pub fn wait_record(agent: &Path, guest: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_record_for(agent, guest, Duration::from_secs(10), pred)
}

pub fn wait_record_for(
    agent: &Path,
    guest: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    poll(timeout, Duration::from_millis(20), || {
        let r = record(agent, guest);
        if pred(&r) {
            Ok(r)
        } else {
            Err(format!(
                "registry at {} never matched; it shows {r}",
                agent.display()
            ))
        }
    })
}

/// Calls `probe` every `every` until it answers Ok; panics with its last
/// Err (what it saw) once `timeout` has passed.
fn poll<T>(timeout: Duration, every: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let t0 = Instant::now();
    loop {
        match probe() {
            Ok(v) => return v,
            Err(seen) => assert!(t0.elapsed() < timeout, "{seen}"),
        }
        std::thread::sleep(every);
    }
}

/// `dwcp migrate` as `dwcp_migrate` runs it, in the background.
pub fn spawn_migrate(lab: &Lab, pair: &GuestPair, mig: &MigrationSpec) -> Child {
    Command::new(dwcp_bin().unwrap())
        .args(["--log", "warn", "migrate", "--json", "--qmp"])
        .arg(&pair.src.qmp_path)
        .args(["--to", &lab.dst_addr(), "--name", &mig.name, "--agent"])
        .arg(lab.src_agent().control())
        .args(["--streams", &mig.streams.to_string(), "--codec", &mig.codec])
        .arg("--return-path")
        .args(&mig.extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dwcp migrate")
}

pub fn raft_log_bytes(dir: &Path, id: u32) -> u64 {
    let p: PathBuf = dir.join(format!("raft-{id}")).join("raft.log");
    p.metadata().map(|m| m.len()).unwrap_or(0)
}
