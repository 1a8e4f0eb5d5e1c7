//! Test topology: two "hosts" (network namespaces) joined through a third
//! namespace holding either a kernel bridge or the linkem forwarder.
//!
//! ```text
//!  {prefix}-src            {prefix}-link                {prefix}-dst
//!  eth0 10.250.S.1 <-veth-> a  [br0 | linkem]  b <-veth-> eth0 10.250.S.2
//! ```

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::config::{LinkConfig, Profile};
use crate::forwarder::{Forwarder, Stats};
use crate::sys;

/// What joins ports `a` and `b` in the link namespace.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // built once per topology
pub enum Middle {
    /// A kernel bridge `br0` (unshaped, the `dc` profile).
    Bridge,
    /// The linkem forwarder (threads of this process inside the link ns).
    Emulator(LinkConfig),
    /// Ports `a` and `b` up and joined by nothing: run a forwarder yourself,
    /// e.g. `dwcp linkem run --netns {prefix}-link` as a child process.
    External,
}

impl Profile {
    /// The middle box a [`Topology`] uses for this profile. (It lives here,
    /// not in `config`, so that `config` does not depend on the topology.)
    pub fn middle(self) -> Middle {
        match self {
            Profile::Dc => Middle::Bridge,
            p => Middle::Emulator(p.config()),
        }
    }
}

/// Three namespaces and two veth pairs; dropping it deletes everything.
#[derive(Debug)]
pub struct Topology {
    /// Name prefix of the namespaces.
    pub prefix: String,
    /// Source host namespace (`{prefix}-src`).
    pub src_ns: String,
    /// Destination host namespace (`{prefix}-dst`).
    pub dst_ns: String,
    /// Namespace of the middle box (`{prefix}-link`).
    pub link_ns: String,
    /// Address of `eth0` in the source namespace (10.250.S.1).
    pub src_ip: Ipv4Addr,
    /// Address of `eth0` in the destination namespace (10.250.S.2).
    pub dst_ip: Ipv4Addr,
    forwarder: Option<Forwarder>,
    made: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Topology {
    /// Build the topology. `subnet` picks 10.250.`subnet`.0/24. The prefix
    /// must be unique on the machine (e.g. `lk-<pid>-<n>`) and short enough
    /// for namespace names.
    pub fn create(prefix: &str, subnet: u8, middle: Middle) -> Result<Topology> {
        let mut t = Topology {
            prefix: prefix.to_string(),
            src_ns: format!("{prefix}-src"),
            dst_ns: format!("{prefix}-dst"),
            link_ns: format!("{prefix}-link"),
            src_ip: Ipv4Addr::new(10, 250, subnet, 1),
            dst_ip: Ipv4Addr::new(10, 250, subnet, 2),
            forwarder: None,
            made: Vec::new(),
        };
        // On any error below, dropping `t` removes what was made.
        for ns in [t.src_ns.clone(), t.dst_ns.clone(), t.link_ns.clone()] {
            ip(&["netns", "add", &ns])?;
            t.made.push(ns.clone());
            t.sysctl(&ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
            t.sysctl(&ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "link", "add", "eth0", "netns", &t.src_ns, "type", "veth", "peer", "name", "a",
            "netns", &t.link_ns,
        ])?;
        ip(&[
            "link", "add", "eth0", "netns", &t.dst_ns, "type", "veth", "peer", "name", "b",
            "netns", &t.link_ns,
        ])?;
        let emulated = !matches!(middle, Middle::Bridge);
        for (ns, addr) in [(t.src_ns.clone(), t.src_ip), (t.dst_ns.clone(), t.dst_ip)] {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            if emulated {
                // Frames must look like wire frames to the forwarder: no
                // TSO/GSO super-frames, no partial checksums (the receiver
                // verifies checksums of frames injected via AF_PACKET).
                sys::in_netns(&ns, || sys::wire_like_offloads("eth0"))??;
                // Let TCP fill long fat pipes (1 Gbit/s x 50 ms + queue).
                t.sysctl(&ns, "net.ipv4.tcp_rmem", "4096 131072 67108864")?;
                t.sysctl(&ns, "net.ipv4.tcp_wmem", "4096 65536 67108864")?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        let l = t.link_ns.clone();
        match middle {
            Middle::Bridge => {
                ip(&[
                    "-n",
                    &l,
                    "link",
                    "add",
                    "br0",
                    "type",
                    "bridge",
                    "forward_delay",
                    "0",
                    "stp_state",
                    "0",
                ])?;
                ip(&["-n", &l, "link", "set", "dev", "a", "master", "br0"])?;
                ip(&["-n", &l, "link", "set", "dev", "b", "master", "br0"])?;
                for dev in ["a", "b", "br0"] {
                    ip(&["-n", &l, "link", "set", "dev", dev, "up"])?;
                }
            }
            Middle::Emulator(_) | Middle::External => {
                for dev in ["a", "b"] {
                    sys::in_netns(&l, || {
                        let _ = sys::set_offload(dev, sys::Offload::Gro, false);
                    })?;
                    ip(&["-n", &l, "link", "set", "dev", dev, "up"])?;
                }
                if let Middle::Emulator(cfg) = middle {
                    t.forwarder = Some(Forwarder::start(&cfg, "a", "b", Some(&l))?);
                }
            }
        }
        Ok(t)
    }

    fn sysctl(&self, ns: &str, key: &str, val: &str) -> Result<()> {
        run(self
            .exec(ns, "sysctl")
            .args(["-qw", &format!("{key}={val}")]))
    }

    /// `ip netns exec {ns} {program}`: add arguments and run it.
    pub fn exec(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Run `f` on a thread inside namespace `ns` and wait for it.
    pub fn in_ns<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        sys::in_netns(ns, f)
    }

    /// Spawn a thread inside namespace `ns`.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        sys::spawn_in_netns(ns, f)
    }

    /// The forwarder (for `Middle::Emulator`).
    pub fn forwarder(&self) -> Option<&Forwarder> {
        self.forwarder.as_ref()
    }

    /// Forwarder counters (a_to_b = src -> dst).
    pub fn stats(&self) -> Option<Stats> {
        self.forwarder.as_ref().map(Forwarder::stats)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Stop the forwarder before its interfaces disappear.
        drop(self.forwarder.take());
        for ns in self.made.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}
