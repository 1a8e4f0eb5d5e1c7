//! The two hosts: network namespaces joined by a (possibly emulated) link,
//! a `dwcp agent` on each, and small helpers on them (scratch space, agent
//! logs, a bit-flipping proxy).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dwcp_core::tls::testca::{LeafSpec, TestCa, Usage};
use linkem::topo::{Middle, Topology};

use crate::locate::dwcp_bin;

/// The data port agents listen on inside their namespace.
pub const AGENT_PORT: u16 = 7070;
/// The data port of the optional clear-text agent pair ([`Lab::start_plain_agents`]).
pub const PLAIN_AGENT_PORT: u16 = 7071;

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// Two hosts and their agents. Dropping it stops everything it started.
pub struct Lab {
    pub topo: Topology,
    pub dir: PathBuf,
    pub src_agent: Option<AgentProc>,
    pub dst_agent: Option<AgentProc>,
    pub agent_args: Vec<String>,
    /// The source host's TLS directory (libvirt's layout, as its
    /// /etc/pki/qemu would be): the lab CA's certificate and a server and a
    /// client certificate naming only the source's IP (IP SAN and CN),
    /// generated at run time. The source agent gets `--tls-dir` with it
    /// unless its arguments say `--insecure`; anything acting as the source
    /// host (a client connecting from its namespace) uses it too.
    pub src_tls_dir: PathBuf,
    /// The destination host's TLS directory: the same CA, certificates
    /// naming only the destination's IP. So neither host's certificate
    /// passes as the other's, as the raft peers' per-member identity check
    /// and the data port's intended-source check need.
    pub dst_tls_dir: PathBuf,
    /// A second agent pair started with `--insecure` on [`PLAIN_AGENT_PORT`]
    /// (source, destination), for benchmarks that compare TLS with clear
    /// text on the same link: [`Lab::start_plain_agents`].
    pub plain: Option<(AgentProc, AgentProc)>,
    /// The CA that signed the hosts' certificates, to issue more identities
    /// of the same PKI (e.g. a third host's).
    pub ca: TestCa,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("dir", &self.dir).finish()
    }
}

/// A `dwcp agent` process in one namespace.
#[derive(Debug)]
pub struct AgentProc {
    pub child: Child,
    pub run_dir: PathBuf,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn control(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
    pub fn incoming(&self, name: &str) -> PathBuf {
        self.run_dir.join("incoming").join(format!("{name}.sock"))
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Lab {
    /// Creates the hosts (`tag` names them) joined by `middle`, and starts an
    /// agent on each with `agent_args` (e.g. `--streams 8`).
    pub fn new(tag: &str, middle: Middle, agent_args: &[&str]) -> Result<Lab> {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let prefix = format!("dw{}{}{tag}", pid % 100000, seq);
        let prefix: String = prefix.chars().take(24).collect();
        let dir = PathBuf::from(format!("/tmp/dwcp-lab/{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let subnet = 100 + ((pid + seq) % 150) as u8;
        let topo = Topology::create(&prefix, subnet, middle).context("creating the two hosts")?;
        let (src_tls_dir, dst_tls_dir) = (dir.join("src-pki"), dir.join("dst-pki"));
        let ca = TestCa::new("DWCP lab CA")?;
        for (tls_dir, ip) in [(&src_tls_dir, topo.src_ip), (&dst_tls_dir, topo.dst_ip)] {
            issue_host_pki(&ca, tls_dir, &[ip.to_string().as_str()])
                .with_context(|| format!("writing the lab's throwaway PKI of {ip}"))?;
        }
        let mut lab = Lab {
            topo,
            dir,
            src_agent: None,
            dst_agent: None,
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
            src_tls_dir,
            dst_tls_dir,
            plain: None,
            ca,
        };
        lab.start_agent(true)?;
        lab.start_agent(false)?;
        Ok(lab)
    }

    pub fn src_ns(&self) -> &str {
        &self.topo.src_ns
    }
    pub fn dst_ns(&self) -> &str {
        &self.topo.dst_ns
    }
    /// The destination agent's data address.
    pub fn dst_addr(&self) -> String {
        format!("{}:{AGENT_PORT}", self.topo.dst_ip)
    }

    /// The data address of the destination agent of the TLS pair
    /// (`plain = false`) or of the clear-text pair.
    pub fn dst_addr_of(&self, plain: bool) -> String {
        let port = if plain { PLAIN_AGENT_PORT } else { AGENT_PORT };
        format!("{}:{port}", self.topo.dst_ip)
    }

    /// (Re)starts the source (`src = true`) or destination agent.
    pub fn start_agent(&mut self, src: bool) -> Result<()> {
        let a = self.spawn_agent(src, false)?;
        if src {
            self.src_agent = Some(a);
        } else {
            self.dst_agent = Some(a);
        }
        Ok(())
    }

    /// Starts a second agent pair in the same namespaces, in clear text
    /// (`--insecure`, port [`PLAIN_AGENT_PORT`]), unless it runs already.
    pub fn start_plain_agents(&mut self) -> Result<()> {
        if self.plain.is_none() {
            let s = self.spawn_agent(true, true)?;
            let d = self.spawn_agent(false, true)?;
            self.plain = Some((s, d));
        }
        Ok(())
    }

    /// The (source, destination) agents of the TLS pair or the clear-text one.
    pub fn agents(&self, plain: bool) -> (&AgentProc, &AgentProc) {
        if plain {
            let (s, d) = self.plain.as_ref().expect("clear-text agents started");
            (s, d)
        } else {
            (self.src_agent(), self.dst_agent())
        }
    }

    /// The TLS directory of the source (`src = true`) or destination host.
    pub fn tls_dir(&self, src: bool) -> &Path {
        if src {
            &self.src_tls_dir
        } else {
            &self.dst_tls_dir
        }
    }

    fn spawn_agent(&self, src: bool, plain: bool) -> Result<AgentProc> {
        let (ns, name, ip) = if src {
            (self.topo.src_ns.clone(), "src", self.topo.src_ip)
        } else {
            (self.topo.dst_ns.clone(), "dst", self.topo.dst_ip)
        };
        let (name, port) = if plain {
            (format!("{name}-plain"), PLAIN_AGENT_PORT)
        } else {
            (name.to_string(), AGENT_PORT)
        };
        let name = name.as_str();
        let run_dir = self.dir.join(format!("{name}-run"));
        std::fs::create_dir_all(&run_dir)?;
        let log = self.dir.join(format!("{name}-agent.log"));
        let logf = File::options().create(true).append(true).open(&log)?;
        let mut cmd = self.topo.exec(&ns, dwcp_bin()?);
        // The agents' log filter: `info`, or DWCP_LAB_AGENT_LOG (e.g.
        // `info,dwcp_core::transport::session::adapt=debug` for every link
        // sample).
        let level = std::env::var("DWCP_LAB_AGENT_LOG").unwrap_or_else(|_| "info".into());
        cmd.args([
            "--log",
            &level,
            "agent",
            "--listen",
            &format!("{ip}:{port}"),
            "--run-dir",
        ])
        .arg(&run_dir)
        .args(&self.agent_args);
        if plain {
            if !self.agent_args.iter().any(|a| a == "--insecure") {
                cmd.arg("--insecure");
            }
        } else if !self.agent_args.iter().any(|a| a == "--insecure") {
            cmd.arg("--tls-dir").arg(self.tls_dir(src));
        }
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let child = cmd.spawn().context("starting dwcp agent")?;
        let mut a = AgentProc {
            child,
            run_dir,
            log,
        };
        let t0 = Instant::now();
        loop {
            if dwcp_core::agent::control_request(&a.control(), &serde_json::json!({"op": "ping"}))
                .is_ok()
            {
                break;
            }
            if let Some(st) = a.child.try_wait()? {
                bail!("agent on {name} exited ({st}) at start:\n{}", a.log_text());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!(
                    "agent on {name} did not answer within 10 s:\n{}",
                    a.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(a)
    }

    /// Tells the destination agent to accept a migration named `name` (from
    /// the peer `from`, else any peer the CA signed), as its operator would
    /// with `dwcp expect NAME`.
    pub fn expect(&self, name: &str, from: Option<&str>) -> Result<()> {
        self.expect_on(false, name, from)
    }

    /// [`Lab::expect`] on the destination agent of the TLS pair
    /// (`plain = false`) or of the clear-text pair.
    pub fn expect_on(&self, plain: bool, name: &str, from: Option<&str>) -> Result<()> {
        let mut req = serde_json::json!({"op": "expect", "name": name});
        if let Some(f) = from {
            req["from"] = serde_json::json!(f);
        }
        dwcp_core::agent::control_request(&self.agents(plain).1.control(), &req)
            .map_err(|e| anyhow::anyhow!("expect {name} on the destination agent: {e}"))?;
        Ok(())
    }

    pub fn src_agent(&self) -> &AgentProc {
        self.src_agent.as_ref().expect("source agent running")
    }
    pub fn dst_agent(&self) -> &AgentProc {
        self.dst_agent.as_ref().expect("destination agent running")
    }
}

/// Writes libvirt's layout under `dir`: `ca`'s certificate and a server and
/// a client certificate of `ca` naming `hosts` (IP addresses become IP
/// SANs, names DNS SANs; CN `hosts[0]`).
pub fn issue_host_pki(ca: &TestCa, dir: &Path, hosts: &[&str]) -> Result<()> {
    let cn = hosts.first().copied().unwrap_or("localhost");
    let server = ca.issue(&LeafSpec::new(cn, hosts, Usage::Server))?;
    let client = ca.issue(&LeafSpec::new(cn, hosts, Usage::Client))?;
    ca.write_layout(dir, &server, &client)?;
    Ok(())
}

/// Scratch directory for RAM dumps (tmpfs when available).
pub fn scratch_dir(lab: &Lab) -> Result<PathBuf> {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        lab.dir.clone()
    };
    let d = base.join(format!("dwcp-{}", lab.topo.prefix));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The lines of `path` containing `pat`, waiting up to 10 s for one (an
/// agent's log line written by another process).
pub fn wait_log(path: &Path, pat: &str) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let hits = grep(path, pat);
        if !hits.is_empty() || t0.elapsed() > Duration::from_secs(10) {
            return hits;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads the lines of a file that contain `pat` (agent logs).
pub fn grep(path: &Path, pat: &str) -> Vec<String> {
    match File::open(path) {
        Ok(f) => BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains(pat))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A TCP proxy inside the destination namespace, listening on
/// `dst_ip:listen_port` and forwarding to the destination agent. On the
/// first connection it flips one bit at byte `flip_at` (counted from the
/// start of the connection, so past the handshake when large) when given.
pub fn spawn_proxy(lab: &Lab, listen_port: u16, flip_at: Option<u64>) -> Result<()> {
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listen = format!("{}:{listen_port}", lab.topo.dst_ip);
    let to = lab.dst_addr();
    let (tx, rx) = std::sync::mpsc::channel();
    // The listener is created inside the namespace; the thread keeps serving
    // until the namespace is torn down with the lab.
    let _h = lab.topo.spawn_in(lab.dst_ns(), move || {
        let l = match TcpListener::bind(&listen) {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        for (i, c) in l.incoming().flatten().enumerate() {
            let Ok(up) = TcpStream::connect(&to) else {
                return;
            };
            let (mut c2, mut up2) = (c.try_clone().expect("dup"), up.try_clone().expect("dup"));
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut c2);
                let _ = c2.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut c, mut up) = (c, up);
                let mut buf = vec![0u8; 64 << 10];
                let mut off = 0u64;
                loop {
                    let n = match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let (0, Some(at)) = (i, flip_at) {
                        if off <= at && at < off + n as u64 {
                            buf[(at - off) as usize] ^= 0x04;
                        }
                    }
                    off += n as u64;
                    if up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = up.shutdown(Shutdown::Write);
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))?
        .map_err(|e| anyhow!("proxy bind: {e}"))
}
