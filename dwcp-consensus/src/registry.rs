//! The replicated state machine: which host owns which guest, and migration records.
//!
//! Every command is validated when it is applied, from the registry's own state only, so
//! every node reaches the same verdict for the same log: a rejected command is rejected
//! everywhere and changes nothing.
//!
//! Per guest: the owner host id and an epoch. `BeginMigration` bumps the epoch and records
//! an intent `{source, destination, epoch}`; it is refused while another intent for the
//! guest is open, or when the owner is not the source. `CommitMigration` /
//! `AbortMigration` must name the current epoch (a stale one is refused); commit moves the
//! ownership to the destination. Retrying the same commit or abort is answered with
//! success, so a client that timed out can retry safely.
//!
//! A node re-sends its proposals when the leader changes (the old one may have died with
//! them), so the log can hold two copies of one proposal. [`Proposers`] remembers which
//! proposals were applied, so a second copy is skipped on every node alike: each command
//! takes effect once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A raft node id, which is also the agent's host id.
pub type HostId = u64;

/// How many finished migrations the registry keeps for `dwcp guests` history.
pub const HISTORY: usize = 256;

/// State of a migration record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Recorded before any byte moves; the guest still runs on the source.
    Intent,
    /// Ownership moved to the destination.
    Committed,
    /// Given up; the guest stays on the source.
    Aborted,
    /// Committed, but the destination never received the end of the stream
    /// (the migration failed after the commit): the guest runs on the source
    /// again, which owns it once more.
    Reverted,
}

/// One migration of one guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The guest.
    pub guest: Uuid,
    /// Host the guest runs on when the migration begins.
    pub source: HostId,
    /// Host the guest moves to.
    pub destination: HostId,
    /// The guest's epoch this migration holds.
    pub epoch: u64,
    /// Where it stands.
    pub state: MigrationState,
    /// Raft log index at which the intent was applied.
    pub intent_index: u64,
}

/// What the registry knows of one guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// The guest.
    pub guest: Uuid,
    /// Host that owns (runs) it.
    pub owner: HostId,
    /// Bumped by every `BeginMigration`.
    pub epoch: u64,
    /// The latest migration, open or finished.
    pub migration: Option<Migration>,
}

/// A command replicated through the raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Records a guest and its owner; refused if already known.
    RegisterGuest {
        /// The guest.
        guest: Uuid,
        /// Its host.
        owner: HostId,
    },
    /// Records a migration intent. An unknown guest is registered as owned by `source`.
    BeginMigration {
        /// The guest.
        guest: Uuid,
        /// Current host.
        source: HostId,
        /// Target host.
        destination: HostId,
    },
    /// Moves the ownership to the intent's destination.
    CommitMigration {
        /// The guest.
        guest: Uuid,
        /// Epoch returned by `BeginMigration`.
        epoch: u64,
    },
    /// Drops the intent; the guest stays with the source.
    AbortMigration {
        /// The guest.
        guest: Uuid,
        /// Epoch returned by `BeginMigration`.
        epoch: u64,
    },
    /// The migration failed after its commit, so the guest never left the
    /// source: ownership returns to the source. Proposed by whoever knows the
    /// destination cannot have started the guest (the destination agent that
    /// withheld the stream's tail, or the source after QEMU failed before
    /// completing). On an open intent it acts as an abort.
    RevertMigration {
        /// The guest.
        guest: Uuid,
        /// Epoch returned by `BeginMigration`.
        epoch: u64,
    },
}

/// Result of an applied command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Guest recorded.
    Registered,
    /// Intent recorded with this epoch.
    MigrationBegun {
        /// The migration's epoch.
        epoch: u64,
    },
    /// Ownership transferred (or had been, for a retry).
    MigrationCommitted,
    /// Intent aborted (or had been, for a retry).
    MigrationAborted,
    /// A committed migration reverted: the source owns the guest again.
    MigrationReverted,
    /// A membership change took effect.
    MembershipChanged,
}

/// Why the registry refused a command (the same on every node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RegistryError {
    /// The guest is not in the registry.
    #[error("guest {0} is not registered")]
    UnknownGuest(Uuid),
    /// Register for a guest already known.
    #[error("guest {guest} is already registered, owned by host {owner}")]
    AlreadyRegistered {
        /// The guest.
        guest: Uuid,
        /// Its owner.
        owner: HostId,
    },
    /// An intent is already open for the guest.
    #[error("guest {guest} is already migrating ({source_host} -> {destination}, epoch {epoch})")]
    AlreadyMigrating {
        /// The guest.
        guest: Uuid,
        /// Open intent's source.
        source_host: HostId,
        /// Open intent's destination.
        destination: HostId,
        /// Open intent's epoch.
        epoch: u64,
    },
    /// The named source does not own the guest.
    #[error("guest {guest} is owned by host {owner}, not by the source {source_host}")]
    NotOwner {
        /// The guest.
        guest: Uuid,
        /// Its actual owner.
        owner: HostId,
        /// The source named.
        source_host: HostId,
    },
    /// Source and destination are the same host.
    #[error("source and destination are both host {0}")]
    SameHost(HostId),
    /// The epoch named is not the guest's current one.
    #[error("stale epoch {given} for guest {guest} (current epoch {current})")]
    StaleEpoch {
        /// The guest.
        guest: Uuid,
        /// Current epoch.
        current: u64,
        /// Epoch given.
        given: u64,
    },
    /// No migration to commit or abort.
    #[error("guest {0} has no migration at this epoch")]
    NoMigration(Uuid),
    /// Commit of an aborted migration.
    #[error("migration of guest {guest} at epoch {epoch} was aborted")]
    WasAborted {
        /// The guest.
        guest: Uuid,
        /// Epoch.
        epoch: u64,
    },
    /// Abort of a committed migration.
    #[error("migration of guest {guest} at epoch {epoch} is already committed")]
    WasCommitted {
        /// The guest.
        guest: Uuid,
        /// Epoch.
        epoch: u64,
    },
    /// Commit of a migration reverted after a late failure.
    #[error("migration of guest {guest} at epoch {epoch} was reverted after a late failure")]
    WasReverted {
        /// The guest.
        guest: Uuid,
        /// Epoch.
        epoch: u64,
    },
}

/// How many runs (incarnations) of one node [`Proposers`] remembers.
const RUNS_PER_NODE: usize = 4;

/// One run of a proposing node: the proposals of it already applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ProposerRun {
    incarnation: u64,
    /// The node is done with every proposal below this (answered or given up):
    /// a copy of one that arrives now is stale and skipped.
    low_water: u64,
    /// Proposals at or above `low_water` already applied.
    applied: BTreeSet<u64>,
}

/// Which proposals were applied, per proposing node and run: what makes a re-sent
/// proposal take effect once. Part of the replicated state (in snapshots), so every node
/// skips the same copies. Bounded: a run keeps only the proposals at or above its
/// low-water mark (those still in flight at the proposer), and a node's oldest runs are
/// forgotten beyond [`RUNS_PER_NODE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposers {
    runs: BTreeMap<HostId, VecDeque<ProposerRun>>,
}

impl Proposers {
    /// Records that proposal `seq` of `origin`'s run `incarnation` is being applied;
    /// false if it was applied before, or is older than the proposer's low-water mark
    /// (then the copy must be skipped). `low_water` is the one the copy carries.
    pub fn first_time(
        &mut self,
        origin: HostId,
        incarnation: u64,
        seq: u64,
        low_water: u64,
    ) -> bool {
        let runs = self.runs.entry(origin).or_default();
        let run = match runs.iter().position(|r| r.incarnation == incarnation) {
            Some(i) => &mut runs[i],
            None => {
                if runs.len() == RUNS_PER_NODE {
                    runs.pop_front();
                }
                runs.push_back(ProposerRun {
                    incarnation,
                    ..Default::default()
                });
                runs.back_mut().expect("just pushed")
            }
        };
        if low_water > run.low_water {
            run.low_water = low_water;
            run.applied = run.applied.split_off(&low_water);
        }
        seq >= run.low_water && run.applied.insert(seq)
    }
}

/// The registry state; serialized whole into raft snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    guests: BTreeMap<Uuid, GuestRecord>,
    history: VecDeque<Migration>,
    applied_index: u64,
    /// Applied proposals, so a re-sent copy is skipped (absent in older snapshots).
    #[serde(default)]
    proposers: Proposers,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Restores a registry from snapshot data (empty data gives an empty registry).
    pub fn from_snapshot(data: &[u8]) -> Result<Registry, serde_json::Error> {
        if data.is_empty() {
            return Ok(Registry::default());
        }
        serde_json::from_slice(data)
    }

    /// Serializes the registry for a snapshot.
    pub fn to_snapshot(&self) -> Vec<u8> {
        // A map of plain records always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The raft index of the last command applied.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub(crate) fn set_applied_index(&mut self, index: u64) {
        self.applied_index = index;
    }

    /// The record of one guest.
    pub fn guest(&self, guest: &Uuid) -> Option<&GuestRecord> {
        self.guests.get(guest)
    }

    /// All guests, by UUID.
    pub fn guests(&self) -> impl Iterator<Item = &GuestRecord> {
        self.guests.values()
    }

    /// Finished migrations, oldest first (at most [`HISTORY`]).
    pub fn history(&self) -> impl Iterator<Item = &Migration> {
        self.history.iter()
    }

    /// The table of applied proposals ([`Proposers`]).
    pub(crate) fn proposers_mut(&mut self) -> &mut Proposers {
        &mut self.proposers
    }

    /// Applies one command at raft index `index`.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Result<Applied, RegistryError> {
        self.applied_index = self.applied_index.max(index);
        match *cmd {
            Command::RegisterGuest { guest, owner } => {
                if let Some(r) = self.guests.get(&guest) {
                    return Err(RegistryError::AlreadyRegistered {
                        guest,
                        owner: r.owner,
                    });
                }
                self.guests.insert(
                    guest,
                    GuestRecord {
                        guest,
                        owner,
                        epoch: 0,
                        migration: None,
                    },
                );
                Ok(Applied::Registered)
            }
            Command::BeginMigration {
                guest,
                source,
                destination,
            } => {
                if source == destination {
                    return Err(RegistryError::SameHost(source));
                }
                let rec = self.guests.entry(guest).or_insert(GuestRecord {
                    guest,
                    owner: source,
                    epoch: 0,
                    migration: None,
                });
                if let Some(m) = &rec.migration {
                    if m.state == MigrationState::Intent {
                        return Err(RegistryError::AlreadyMigrating {
                            guest,
                            source_host: m.source,
                            destination: m.destination,
                            epoch: m.epoch,
                        });
                    }
                }
                if rec.owner != source {
                    return Err(RegistryError::NotOwner {
                        guest,
                        owner: rec.owner,
                        source_host: source,
                    });
                }
                rec.epoch += 1;
                rec.migration = Some(Migration {
                    guest,
                    source,
                    destination,
                    epoch: rec.epoch,
                    state: MigrationState::Intent,
                    intent_index: index,
                });
                Ok(Applied::MigrationBegun { epoch: rec.epoch })
            }
            Command::CommitMigration { guest, epoch } => self.finish(guest, epoch, End::Commit),
            Command::AbortMigration { guest, epoch } => self.finish(guest, epoch, End::Abort),
            Command::RevertMigration { guest, epoch } => self.finish(guest, epoch, End::Revert),
        }
    }

    fn finish(&mut self, guest: Uuid, epoch: u64, end: End) -> Result<Applied, RegistryError> {
        use MigrationState::*;
        let rec = self
            .guests
            .get_mut(&guest)
            .ok_or(RegistryError::UnknownGuest(guest))?;
        if rec.epoch != epoch {
            return Err(RegistryError::StaleEpoch {
                guest,
                current: rec.epoch,
                given: epoch,
            });
        }
        let m = rec
            .migration
            .as_mut()
            .filter(|m| m.epoch == epoch)
            .ok_or(RegistryError::NoMigration(guest))?;
        let done = match (m.state, end) {
            // Retries answer as the first time did.
            (Committed, End::Commit) => return Ok(Applied::MigrationCommitted),
            (Aborted, End::Abort | End::Revert) => return Ok(Applied::MigrationAborted),
            (Reverted, End::Abort | End::Revert) => return Ok(Applied::MigrationReverted),
            (Aborted, End::Commit) => return Err(RegistryError::WasAborted { guest, epoch }),
            (Reverted, End::Commit) => return Err(RegistryError::WasReverted { guest, epoch }),
            (Committed, End::Abort) => return Err(RegistryError::WasCommitted { guest, epoch }),
            (Intent, End::Commit) => {
                m.state = Committed;
                rec.owner = m.destination;
                Applied::MigrationCommitted
            }
            (Intent, End::Abort | End::Revert) => {
                m.state = Aborted;
                Applied::MigrationAborted
            }
            (Committed, End::Revert) => {
                m.state = Reverted;
                rec.owner = m.source;
                Applied::MigrationReverted
            }
        };
        let finished = m.clone();
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(finished);
        Ok(done)
    }
}

/// How a migration record ends.
#[derive(Debug, Clone, Copy)]
enum End {
    Commit,
    Abort,
    Revert,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn begin_commit_moves_ownership() {
        let mut r = Registry::new();
        r.apply(
            1,
            &Command::RegisterGuest {
                guest: g(1),
                owner: 1,
            },
        )
        .unwrap();
        let begun = r
            .apply(
                2,
                &Command::BeginMigration {
                    guest: g(1),
                    source: 1,
                    destination: 2,
                },
            )
            .unwrap();
        assert_eq!(begun, Applied::MigrationBegun { epoch: 1 });
        assert_eq!(
            r.guest(&g(1)).unwrap().owner,
            1,
            "intent does not move ownership"
        );
        r.apply(
            3,
            &Command::CommitMigration {
                guest: g(1),
                epoch: 1,
            },
        )
        .unwrap();
        assert_eq!(r.guest(&g(1)).unwrap().owner, 2);
        // Retried commit is fine; abort after commit is not.
        r.apply(
            4,
            &Command::CommitMigration {
                guest: g(1),
                epoch: 1,
            },
        )
        .unwrap();
        assert!(matches!(
            r.apply(
                5,
                &Command::AbortMigration {
                    guest: g(1),
                    epoch: 1
                }
            ),
            Err(RegistryError::WasCommitted { .. })
        ));
        assert_eq!(r.history().count(), 1);
    }

    #[test]
    fn revert_after_a_late_failure_returns_the_guest() {
        let mut r = Registry::new();
        let cmd = |c: fn(Uuid, u64) -> Command| c(g(9), 1);
        let begin = Command::BeginMigration {
            guest: g(9),
            source: 1,
            destination: 2,
        };
        r.apply(1, &begin).unwrap();
        let commit = |guest, epoch| Command::CommitMigration { guest, epoch };
        let revert = |guest, epoch| Command::RevertMigration { guest, epoch };
        r.apply(2, &cmd(commit)).unwrap();
        assert_eq!(r.guest(&g(9)).unwrap().owner, 2);
        assert_eq!(
            r.apply(3, &cmd(revert)).unwrap(),
            Applied::MigrationReverted
        );
        let rec = r.guest(&g(9)).unwrap();
        assert_eq!((rec.owner, rec.epoch), (1, 1));
        assert_eq!(
            rec.migration.as_ref().unwrap().state,
            MigrationState::Reverted
        );
        // A late commit for that epoch can no longer move it; a retried revert is fine.
        assert!(matches!(
            r.apply(4, &cmd(commit)),
            Err(RegistryError::WasReverted { .. })
        ));
        assert_eq!(
            r.apply(5, &cmd(revert)).unwrap(),
            Applied::MigrationReverted
        );
        // The source may migrate it again, at the next epoch.
        assert_eq!(
            r.apply(6, &begin).unwrap(),
            Applied::MigrationBegun { epoch: 2 }
        );
        // On an open intent, revert is an abort; a stale epoch is refused.
        assert_eq!(
            r.apply(
                7,
                &Command::RevertMigration {
                    guest: g(9),
                    epoch: 2
                }
            )
            .unwrap(),
            Applied::MigrationAborted
        );
        assert!(matches!(
            r.apply(8, &cmd(revert)),
            Err(RegistryError::StaleEpoch { .. })
        ));
    }

    #[test]
    fn double_intent_and_wrong_source_rejected() {
        let mut r = Registry::new();
        let begin = |s, d| Command::BeginMigration {
            guest: g(7),
            source: s,
            destination: d,
        };
        r.apply(1, &begin(1, 2)).unwrap();
        assert!(matches!(
            r.apply(2, &begin(1, 3)),
            Err(RegistryError::AlreadyMigrating { .. })
        ));
        r.apply(
            3,
            &Command::AbortMigration {
                guest: g(7),
                epoch: 1,
            },
        )
        .unwrap();
        assert!(matches!(
            r.apply(4, &begin(2, 3)),
            Err(RegistryError::NotOwner { owner: 1, .. })
        ));
        assert!(matches!(
            r.apply(5, &begin(1, 1)),
            Err(RegistryError::SameHost(1))
        ));
        assert_eq!(
            r.apply(6, &begin(1, 3)).unwrap(),
            Applied::MigrationBegun { epoch: 2 }
        );
    }

    #[test]
    fn stale_epoch_rejected() {
        let mut r = Registry::new();
        r.apply(
            1,
            &Command::BeginMigration {
                guest: g(3),
                source: 1,
                destination: 2,
            },
        )
        .unwrap();
        r.apply(
            2,
            &Command::AbortMigration {
                guest: g(3),
                epoch: 1,
            },
        )
        .unwrap();
        r.apply(
            3,
            &Command::BeginMigration {
                guest: g(3),
                source: 1,
                destination: 2,
            },
        )
        .unwrap();
        assert!(matches!(
            r.apply(
                4,
                &Command::CommitMigration {
                    guest: g(3),
                    epoch: 1
                }
            ),
            Err(RegistryError::StaleEpoch {
                current: 2,
                given: 1,
                ..
            })
        ));
        assert_eq!(r.guest(&g(3)).unwrap().owner, 1);
        assert!(matches!(
            r.apply(
                5,
                &Command::CommitMigration {
                    guest: g(9),
                    epoch: 1
                }
            ),
            Err(RegistryError::UnknownGuest(_))
        ));
    }

    #[test]
    fn a_re_sent_proposal_takes_effect_once() {
        let mut p = Proposers::default();
        // Node 1, run 7: proposals 5 and 6 in flight.
        assert!(p.first_time(1, 7, 5, 5));
        assert!(!p.first_time(1, 7, 5, 5), "second copy of 5");
        assert!(p.first_time(1, 7, 6, 5));
        // Another run of node 1, and another node, have their own numbers.
        assert!(p.first_time(1, 8, 5, 1));
        assert!(p.first_time(2, 7, 5, 1));
        // Node 1 run 7 is done below 9: a late copy of 6, or of 8 never applied, is stale.
        assert!(p.first_time(1, 7, 9, 9));
        assert!(!p.first_time(1, 7, 6, 9));
        assert!(!p.first_time(1, 7, 8, 9));
        assert_eq!(p.runs[&1][0].applied, BTreeSet::from([9]), "pruned below 9");
        // The oldest runs of a node are forgotten beyond RUNS_PER_NODE.
        for inc in 100..100 + RUNS_PER_NODE as u64 {
            assert!(p.first_time(1, inc, 1, 1));
        }
        assert_eq!(p.runs[&1].len(), RUNS_PER_NODE);
        assert!(p.runs[&1].iter().all(|r| r.incarnation >= 100));
        // It travels in snapshots; one without it (an older build's) reads as empty.
        let mut r = Registry::new();
        r.proposers.first_time(3, 1, 1, 1);
        let back = Registry::from_snapshot(&r.to_snapshot()).unwrap();
        assert_eq!(back, r);
        let old = br#"{"guests":{},"history":[],"applied_index":4}"#;
        assert_eq!(
            Registry::from_snapshot(old).unwrap().proposers,
            Proposers::default()
        );
    }

    #[test]
    fn snapshot_round_trip() {
        let mut r = Registry::new();
        r.apply(
            1,
            &Command::BeginMigration {
                guest: g(3),
                source: 1,
                destination: 2,
            },
        )
        .unwrap();
        r.apply(
            2,
            &Command::CommitMigration {
                guest: g(3),
                epoch: 1,
            },
        )
        .unwrap();
        let back = Registry::from_snapshot(&r.to_snapshot()).unwrap();
        assert_eq!(back, r);
        assert_eq!(Registry::from_snapshot(&[]).unwrap(), Registry::new());
    }
}
