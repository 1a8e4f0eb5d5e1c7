//! What the agent needs of the raft cluster it is a member of: the
//! [`ClusterOps`] trait (the `dwcp` binary implements it on
//! `dwcp_consensus::Cluster`, so the engine stays free of raft) and its typed
//! error, [`ClusterError`], whose [`ClusterErrorKind`] says whether a retry
//! can help. This module uses nothing else of the agent.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The cluster operations the control socket exposes. Guests are UUID
/// strings; an error's message is shown to the operator as is.
pub trait ClusterOps: Send + Sync + std::fmt::Debug {
    /// This agent's node (host) id.
    fn node_id(&self) -> u64;
    /// `dwcp cluster status`.
    fn status(&self) -> Value;
    /// `dwcp guests`: the registry as applied on this node.
    fn guests(&self) -> Value;
    /// Records the intent to migrate `guest` from `src` to `dst`; returns its epoch.
    fn begin(&self, guest: &str, src: u64, dst: u64) -> Result<u64, ClusterError>;
    /// Transfers ownership to the intent's destination.
    fn commit(&self, guest: &str, epoch: u64) -> Result<(), ClusterError>;
    /// Abandons the intent; the guest stays with the source.
    fn abort(&self, guest: &str, epoch: u64) -> Result<(), ClusterError>;
    /// Returns a committed migration's guest to its source after a late
    /// failure (an open intent is aborted).
    fn revert(&self, guest: &str, epoch: u64) -> Result<(), ClusterError>;
    /// The guest's owner as applied on this node, if the guest is known.
    fn owner(&self, guest: &str) -> Option<u64>;
    /// The member whose raft address has this IP (the host's agent).
    fn member_at(&self, ip: std::net::IpAddr) -> Option<u64>;
    /// Member `node`'s identity: the host part of its raft address (`HOST`
    /// of `HOST:PORT`, IPv6 brackets removed), the name its certificates
    /// must carry (a DNS or IP SAN, or the CN) and, in clear text, the
    /// address it connects from. None when this node knows no address for it.
    fn member_identity(&self, node: u64) -> Option<String>;
    /// Open intents as applied on this node: (guest, epoch, src, dst).
    fn open_intents(&self) -> Vec<(String, u64, u64, u64)>;
    /// Hands raft leadership to member `to` (this node must lead); returns
    /// once `to` leads.
    fn transfer_leader(&self, to: u64) -> Result<(), ClusterError> {
        let _ = to;
        Err(ClusterError::invalid(
            "this cluster cannot transfer leadership",
        ))
    }
}

/// Why a cluster operation failed. On the control socket an error answer of
/// a cluster op carries it as `"kind"` (snake_case), next to `"error"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterErrorKind {
    /// No leader reachable, the proposal timed out, or the node stopped:
    /// the same request may succeed later (once there is a quorum).
    Unavailable,
    /// The registry refused the command (every node decides the same): final.
    Refused,
    /// The registry refused because the migration is already committed (an
    /// abort came too late): final, but a revert can still settle it.
    AlreadyCommitted,
    /// The request is malformed (a guest that is not a UUID, a missing
    /// epoch): final.
    Invalid,
    /// This agent is not a cluster member: final. Only the agent itself
    /// gives this kind; [`ClusterOps`] implementations never do.
    NotMember,
}

impl ClusterErrorKind {
    /// No retry can change the answer.
    pub fn is_final(self) -> bool {
        self != ClusterErrorKind::Unavailable
    }

    /// The cluster's registry decided against the command (as opposed to
    /// the request never reaching a decision).
    pub fn refused_by_registry(self) -> bool {
        matches!(
            self,
            ClusterErrorKind::Refused | ClusterErrorKind::AlreadyCommitted
        )
    }
}

/// A failed cluster operation: its kind and the message for the operator
/// (displayed as is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ClusterError {
    pub kind: ClusterErrorKind,
    pub message: String,
}

impl ClusterError {
    pub fn new(kind: ClusterErrorKind, message: impl Into<String>) -> ClusterError {
        ClusterError {
            kind,
            message: message.into(),
        }
    }

    /// [`ClusterErrorKind::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> ClusterError {
        ClusterError::new(ClusterErrorKind::Unavailable, message)
    }

    /// [`ClusterErrorKind::Invalid`].
    pub fn invalid(message: impl Into<String>) -> ClusterError {
        ClusterError::new(ClusterErrorKind::Invalid, message)
    }

    /// No retry can change the answer ([`ClusterErrorKind::is_final`]).
    pub fn is_final(&self) -> bool {
        self.kind.is_final()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_final_unless_unavailable_and_show_in_snake_case() {
        use ClusterErrorKind::*;
        for k in [Refused, AlreadyCommitted, Invalid, NotMember] {
            assert!(k.is_final(), "{k:?}");
        }
        assert!(!Unavailable.is_final());
        assert!(Refused.refused_by_registry() && AlreadyCommitted.refused_by_registry());
        assert!(!Invalid.refused_by_registry() && !NotMember.refused_by_registry());
        assert_eq!(
            serde_json::to_value(AlreadyCommitted).unwrap(),
            "already_committed"
        );
        let e = ClusterError::new(Refused, "refused by the registry: no");
        assert_eq!(e.to_string(), "refused by the registry: no");
    }
}
