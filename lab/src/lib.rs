//! The two-host lab: network namespaces joined by a (possibly emulated)
//! link, a `dwcp agent` on each host, the test guest running under QEMU on
//! the source and waiting with `-incoming` on the destination, and the checks
//! that prove a migration moved the guest intact.
//!
//! Used by `dwcp demo` and `dwcp benchmark`, and by the end-to-end tests in
//! `tests/tests/`. Everything is real: namespaces, sockets, QEMU, agents.
//!
//! * [`locate`] — where the guest's scripts, the built guest and `dwcp` are,
//!   found at run time.
//! * [`hosts`] — the two hosts ([`Lab`]) and their agents.
//! * [`guest`] — a QEMU guest in one host: start, console, heartbeats.
//! * [`migration`] — boot a pair, migrate through `dwcp migrate`, verify.
//! * [`cluster`] — three agents as a raft cluster in the lab.
//! * [`procstat`] — a process's memory, descriptors and threads from `/proc`,
//!   and the slope of a series of them.
//! * [`demo`] — `dwcp demo`.

pub mod cluster;
pub mod demo;
pub mod guest;
pub mod hosts;
pub mod locate;
pub mod migration;
pub mod procstat;

pub use guest::{longest_heartbeat_gap, Guest, GuestSpec, Heartbeat};
pub use hosts::{grep, scratch_dir, spawn_proxy, wait_log, AgentProc, Lab, AGENT_PORT};
pub use linkem::topo::{Middle, Topology};
pub use linkem::Profile;
pub use locate::{dwcp_bin, guest_files, DataDir};
pub use migration::{
    boot_pair, boot_pair_as, compare_memory, compare_memory_keeping, dwcp_migrate,
    restart_destination, start_incoming, verify, verify_keeping, GuestPair, MemoryCheck,
    MigrationSpec, Verified,
};
pub use procstat::{proc_sample, slope, ProcSample};
