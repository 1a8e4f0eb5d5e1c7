//! DWCP cluster consensus: the agents of a cluster form a raft group (tikv's raft-rs,
//! embedded) that records which host owns which guest. No migration switches over unless
//! the ownership transfer is committed here. See `docs/consensus.md`.
//!
//! * [`storage`] — raft log, hard state and snapshots in our own checksummed files.
//! * [`node`] — the raft node thread: ticks, `Ready` handling, proposals, membership.
//! * [`net`] — peer transport over TCP with framed, checksummed, cluster-bound messages.
//! * [`registry`] — the replicated state machine: guest → owner + epoch, migrations.
//! * [`reply`] — the answer to one proposal, awaited by its caller.
//! * [`cluster`] — the handle an agent embeds: [`Cluster::start`], the registry API,
//!   status. (Commit benchmarks are `dwcp benchmark consensus`, in the `dwcp` crate.)

// raft's protobuf messages (prost structs) are built by assigning fields to a default, as raft-rs's own
// examples do.
#![allow(clippy::field_reassign_with_default)]

pub mod cluster;
pub mod net;
pub mod node;
pub mod registry;
pub mod reply;
pub mod storage;

#[cfg(test)]
mod testnet;

pub use cluster::{Cluster, ClusterConfig, ClusterError, ClusterStatus, PeerAddr};
pub use node::{NodeConfig, NodeStatus, ProposeError};
pub use registry::{
    Applied, Command, GuestRecord, HostId, Migration, MigrationState, RegistryError,
};
pub use reply::Answer;
