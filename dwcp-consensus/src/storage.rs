//! Raft storage on our own disk format: an append-only log plus one snapshot file.
//!
//! This module owns everything the raft group persists: log entries, the hard state
//! (term, vote, commit), the conf state (membership) and the latest snapshot (the registry
//! serialized). It implements raft-rs's [`Storage`] over an in-memory copy that is
//! rebuilt from disk on [`DiskStorage::open`].
//!
//! # Files in the data directory
//!
//! * `raft.log` — header `b"DWCPRLOG"` + version `u32` LE, then records. A record is
//!   `len: u32 LE | crc32c: u32 LE | kind: u8 | payload[len]`, the CRC covering kind and
//!   payload. Kinds: 1 entry (protobuf `Entry`), 2 hard state (protobuf `HardState`),
//!   3 conf state (protobuf `ConfState`), 4 base (`index: u64 LE | term: u64 LE`, the
//!   snapshot this log continues from; always the first record). An entry record whose
//!   index is at or below the last entry replaces that suffix (raft conflict truncation),
//!   so the file is only ever appended to, except by compaction, which rewrites it.
//! * `raft.snap` — `b"DWCPSNAP"` + version `u32` + `len: u64` + protobuf `Snapshot` +
//!   crc32c `u32` over everything before it. Written to `raft.snap.tmp`, fsynced,
//!   renamed, directory fsynced.
//!
//! # When we fsync
//!
//! * [`DiskStorage::sync`] (fdatasync of the log) is called by the node once per
//!   `Ready`, after its entries and hard state are written and before any message
//!   that depends on them is sent (raft's persisted messages, and acks).
//! * Snapshot files and rewritten logs are fsynced before their rename, and the
//!   directory after it.
//! * Conf state records are written and synced when a conf change is applied.
//!
//! # Recovery
//!
//! A record cut short by a crash (the file ends inside it), or a last record whose CRC
//! fails, is a torn tail: the file is truncated to the last good record, with a warning.
//! A CRC failure with more data after it is corruption in the middle and
//! [`DiskStorage::open`] refuses with [`StorageError::CorruptRecord`]. Record lengths are
//! capped ([`MAX_RECORD`], [`MAX_SNAPSHOT`]) before anything is allocated.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use prost::Message as PbMessage;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage};

/// Magic at the start of `raft.log`.
pub const LOG_MAGIC: &[u8; 8] = b"DWCPRLOG";
/// Magic at the start of `raft.snap`.
pub const SNAP_MAGIC: &[u8; 8] = b"DWCPSNAP";
/// On-disk format version of both files.
pub const FORMAT_VERSION: u32 = 1;
/// Largest record payload accepted when reading the log.
pub const MAX_RECORD: u32 = 64 << 20;
/// Largest snapshot accepted when reading `raft.snap`.
pub const MAX_SNAPSHOT: u64 = 512 << 20;

const LOG_FILE: &str = "raft.log";
const LOG_TMP: &str = "raft.log.tmp";
const SNAP_FILE: &str = "raft.snap";
const SNAP_TMP: &str = "raft.snap.tmp";
const REC_HEADER: usize = 9;
const FILE_HEADER: usize = 12;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_CONF_STATE: u8 = 3;
const KIND_BASE: u8 = 4;

/// Errors of the on-disk storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Creating or listing the data directory failed.
    #[error("preparing data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the log file failed.
    #[error("reading raft log {path}: {source}")]
    ReadLog {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing or syncing the log failed; the node must stop.
    #[error("writing raft log: {0}")]
    WriteLog(#[source] io::Error),
    /// The file does not start with our magic and version.
    #[error(
        "{path} is not a DWCP raft file of version {FORMAT_VERSION} (found version {version})"
    )]
    Header {
        /// The file.
        path: PathBuf,
        /// The version found (0 when the magic is wrong).
        version: u32,
    },
    /// A record in the middle of the log fails its checksum.
    #[error(
        "raft log {path}: checksum mismatch in the record at offset {offset}, with {following} \
         more bytes after it; the log is corrupt in the middle, refusing to start \
         (restore this node from a peer: move the data dir away and rejoin)"
    )]
    CorruptRecord {
        /// The file.
        path: PathBuf,
        /// Offset of the bad record.
        offset: u64,
        /// Bytes after the bad record.
        following: u64,
    },
    /// A record declares a length above [`MAX_RECORD`].
    #[error("raft log {path}: record at offset {offset} declares {len} bytes, above the {MAX_RECORD} byte cap")]
    OversizedRecord {
        /// The file.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// Declared length.
        len: u32,
    },
    /// A record passed its checksum but its payload does not decode.
    #[error("raft log {path}: record of kind {kind} at offset {offset} does not decode: {reason}")]
    DecodeRecord {
        /// The file.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// Record kind.
        kind: u8,
        /// Why.
        reason: String,
    },
    /// The log's entries do not follow one another.
    #[error("raft log {path}: entry {index} does not follow entry {last}")]
    Gap {
        /// The file.
        path: PathBuf,
        /// Index found.
        index: u64,
        /// Last index before it.
        last: u64,
    },
    /// The snapshot file is unreadable or corrupt.
    #[error("snapshot {path}: {reason}")]
    Snapshot {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Writing the snapshot failed.
    #[error("writing snapshot {path}: {source}")]
    WriteSnapshot {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Asked to snapshot or compact at an index we do not hold.
    #[error("cannot snapshot at index {index}: log holds {first}..={last}")]
    SnapshotIndex {
        /// Requested index.
        index: u64,
        /// First index held.
        first: u64,
        /// Last index held.
        last: u64,
    },
}

/// What [`DiskStorage::open`] found on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records read from the log.
    pub records: u64,
    /// Bytes of a torn tail record that were truncated away.
    pub truncated_bytes: u64,
    /// Index of the snapshot loaded (0 for none).
    pub snapshot_index: u64,
    /// Entries recovered after the snapshot.
    pub entries: u64,
}

#[derive(Debug)]
struct Core {
    dir: PathBuf,
    log: File,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term the log continues from (the latest snapshot's).
    base_index: u64,
    base_term: u64,
    snapshot: Snapshot,
    entries: Vec<Entry>,
    buf: Vec<u8>,
}

/// Raft storage on disk; cheap to clone (all clones share one state).
#[derive(Debug, Clone)]
pub struct DiskStorage {
    core: Arc<RwLock<Core>>,
}

fn crc_of(kind: u8, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload)
}

fn encode_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc_of(kind, payload).to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
}

fn pb_bytes(m: &impl PbMessage) -> Vec<u8> {
    // prost: the protobuf wire format, the same bytes rust-protobuf 2 wrote.
    m.encode_to_vec()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Core {
    fn first_index(&self) -> u64 {
        self.base_index + 1
    }

    fn last_index(&self) -> u64 {
        self.entries.last().map_or(self.base_index, |e| e.index)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.base_index {
            return Ok(self.base_term);
        }
        if idx < self.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if idx > self.last_index() {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first_index()) as usize].term)
    }

    fn push_entries(&mut self, ents: &[Entry]) {
        let Some(first) = ents.iter().position(|e| e.index > self.base_index) else {
            return;
        };
        let ents = &ents[first..];
        let start = ents[0].index;
        if start <= self.last_index() {
            self.entries.truncate((start - self.first_index()) as usize);
        }
        self.entries.extend_from_slice(ents);
    }

    /// Writes `raft.log` anew: base, hard state, conf state and the entries we hold.
    fn rewrite_log(&mut self) -> Result<(), StorageError> {
        let tmp = self.dir.join(LOG_TMP);
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(LOG_MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let mut base = [0u8; 16];
        base[..8].copy_from_slice(&self.base_index.to_le_bytes());
        base[8..].copy_from_slice(&self.base_term.to_le_bytes());
        encode_record(&mut buf, KIND_BASE, &base);
        encode_record(&mut buf, KIND_HARD_STATE, &pb_bytes(&self.hard_state));
        encode_record(&mut buf, KIND_CONF_STATE, &pb_bytes(&self.conf_state));
        for e in &self.entries {
            encode_record(&mut buf, KIND_ENTRY, &pb_bytes(e));
        }
        let write = || -> io::Result<File> {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join(LOG_FILE))?;
            sync_dir(&self.dir)?;
            OpenOptions::new()
                .append(true)
                .open(self.dir.join(LOG_FILE))
        };
        self.log = write().map_err(StorageError::WriteLog)?;
        Ok(())
    }

    fn write_snapshot_file(&self, snap: &Snapshot) -> Result<(), StorageError> {
        let tmp = self.dir.join(SNAP_TMP);
        let body = pb_bytes(snap);
        let mut buf = Vec::with_capacity(body.len() + 24);
        buf.extend_from_slice(SNAP_MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
        buf.extend_from_slice(&body);
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join(SNAP_FILE))?;
            sync_dir(&self.dir)
        };
        write().map_err(|source| StorageError::WriteSnapshot {
            path: self.dir.join(SNAP_FILE),
            source,
        })
    }

    fn flush_buf(&mut self) -> Result<(), StorageError> {
        if !self.buf.is_empty() {
            self.log
                .write_all(&self.buf)
                .map_err(StorageError::WriteLog)?;
            self.buf.clear();
        }
        Ok(())
    }
}

fn read_snapshot_file(path: &Path) -> Result<Option<Snapshot>, StorageError> {
    let bad = |reason: String| StorageError::Snapshot {
        path: path.to_owned(),
        reason,
    };
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let mut head = [0u8; 20];
    f.read_exact(&mut head)
        .map_err(|e| bad(format!("header: {e}")))?;
    let version = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
    if &head[..8] != SNAP_MAGIC || version != FORMAT_VERSION {
        return Err(StorageError::Header {
            path: path.to_owned(),
            version: if &head[..8] == SNAP_MAGIC { version } else { 0 },
        });
    }
    let len = u64::from_le_bytes(head[12..20].try_into().unwrap_or_default());
    if len > MAX_SNAPSHOT {
        return Err(bad(format!(
            "declares {len} bytes, above the {MAX_SNAPSHOT} cap"
        )));
    }
    let mut body = vec![0u8; len as usize + 4];
    f.read_exact(&mut body)
        .map_err(|e| bad(format!("short file: {e}")))?;
    let (body, crc) = body.split_at(len as usize);
    let want = u32::from_le_bytes(crc.try_into().unwrap_or_default());
    if crc32c::crc32c_append(crc32c::crc32c(&head), body) != want {
        return Err(bad("checksum mismatch".into()));
    }
    Snapshot::decode(body)
        .map(Some)
        .map_err(|e| bad(format!("does not decode: {e}")))
}

impl DiskStorage {
    /// Opens (or creates) the storage in `dir`, replaying the snapshot and the log.
    pub fn open(dir: impl AsRef<Path>) -> Result<(DiskStorage, Recovery), StorageError> {
        let dir = dir.as_ref().to_owned();
        fs::create_dir_all(&dir).map_err(|source| StorageError::DataDir {
            path: dir.clone(),
            source,
        })?;
        // Leftovers of an interrupted snapshot or compaction: the rename never happened,
        // so the old file is still the valid one.
        for tmp in [SNAP_TMP, LOG_TMP] {
            let _ = fs::remove_file(dir.join(tmp));
        }
        let mut rec = Recovery::default();
        let snapshot = read_snapshot_file(&dir.join(SNAP_FILE))?.unwrap_or_default();
        let meta = snapshot.get_metadata();
        rec.snapshot_index = meta.index;
        let log_path = dir.join(LOG_FILE);
        let exists = log_path.exists();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| StorageError::ReadLog {
                path: log_path.clone(),
                source,
            })?;
        let mut core = Core {
            dir: dir.clone(),
            log,
            hard_state: HardState::default(),
            conf_state: meta.get_conf_state().clone(),
            base_index: meta.index,
            base_term: meta.term,
            entries: Vec::new(),
            snapshot: snapshot.clone(),
            buf: Vec::new(),
        };
        core.hard_state.term = meta.term;
        core.hard_state.commit = meta.index;
        if exists {
            replay_log(&mut core, &log_path, &mut rec)?;
        } else {
            core.rewrite_log()?;
        }
        // The commit index can never point past what we hold (it may lag, which is safe).
        let last = core.last_index();
        if core.hard_state.commit > last {
            tracing::warn!(
                commit = core.hard_state.commit,
                last,
                "raft log: commit index past the last entry, lowering it"
            );
            core.hard_state.commit = last;
        }
        if core.hard_state.commit < core.base_index {
            core.hard_state.commit = core.base_index;
        }
        rec.entries = core.entries.len() as u64;
        Ok((
            DiskStorage {
                core: Arc::new(RwLock::new(core)),
            },
            rec,
        ))
    }

    /// True when this storage has ever been part of a cluster (bootstrapped, or
    /// received a snapshot or entries).
    pub fn is_initialized(&self) -> bool {
        let c = self.core.read();
        c.base_index > 0 || !c.entries.is_empty() || !c.conf_state.voters.is_empty()
    }

    /// Initializes a fresh storage as a founding member: a snapshot at index 1, term 1,
    /// holding `voters` and the initial state machine `data`.
    pub fn bootstrap(&self, voters: &[u64], data: Vec<u8>) -> Result<(), StorageError> {
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = voters.to_vec();
        snap.data = data;
        self.apply_snapshot(snap)
    }

    /// Appends entries (not yet durable: call [`DiskStorage::sync`]).
    pub fn append(&self, ents: &[Entry]) -> Result<(), StorageError> {
        if ents.is_empty() {
            return Ok(());
        }
        let mut c = self.core.write();
        let mut buf = std::mem::take(&mut c.buf);
        for e in ents.iter().filter(|e| e.index > c.base_index) {
            encode_record(&mut buf, KIND_ENTRY, &pb_bytes(e));
        }
        c.buf = buf;
        c.flush_buf()?;
        c.push_entries(ents);
        Ok(())
    }

    /// Records a new hard state (not yet durable: call [`DiskStorage::sync`]).
    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StorageError> {
        let mut c = self.core.write();
        if c.hard_state == *hs {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut c.buf);
        encode_record(&mut buf, KIND_HARD_STATE, &pb_bytes(hs));
        c.buf = buf;
        c.flush_buf()?;
        c.hard_state = hs.clone();
        Ok(())
    }

    /// Records a new commit index (lazily durable: losing it is safe, it is re-learned).
    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.core.read().hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Records and syncs the membership after a conf change was applied.
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StorageError> {
        let mut c = self.core.write();
        let mut buf = std::mem::take(&mut c.buf);
        encode_record(&mut buf, KIND_CONF_STATE, &pb_bytes(cs));
        c.buf = buf;
        c.flush_buf()?;
        c.log.sync_data().map_err(StorageError::WriteLog)?;
        c.conf_state = cs.clone();
        Ok(())
    }

    /// Makes everything written so far durable (fdatasync).
    pub fn sync(&self) -> Result<(), StorageError> {
        let c = self.core.read();
        c.log.sync_data().map_err(StorageError::WriteLog)
    }

    /// Installs a snapshot received from the leader: persists it, drops the log.
    pub fn apply_snapshot(&self, snap: Snapshot) -> Result<(), StorageError> {
        let mut c = self.core.write();
        let meta = snap.get_metadata().clone();
        if meta.index < c.base_index {
            return Err(StorageError::SnapshotIndex {
                index: meta.index,
                first: c.first_index(),
                last: c.last_index(),
            });
        }
        c.write_snapshot_file(&snap)?;
        c.base_index = meta.index;
        c.base_term = meta.term;
        c.hard_state.term = c.hard_state.term.max(meta.term);
        c.hard_state.commit = meta.index;
        c.conf_state = meta.get_conf_state().clone();
        c.entries.clear();
        c.snapshot = snap;
        c.rewrite_log()
    }

    /// Takes a snapshot of the state machine at `index` (already applied) with
    /// membership `cs`, persists it and compacts the log up to `index`.
    pub fn create_snapshot(
        &self,
        index: u64,
        cs: ConfState,
        data: Vec<u8>,
    ) -> Result<(), StorageError> {
        let mut c = self.core.write();
        if index <= c.base_index {
            return Ok(());
        }
        let term = c.term(index).map_err(|_| StorageError::SnapshotIndex {
            index,
            first: c.first_index(),
            last: c.last_index(),
        })?;
        let mut snap = Snapshot::default();
        let mut meta = SnapshotMetadata::default();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(cs);
        snap.set_metadata(meta);
        snap.data = data;
        c.write_snapshot_file(&snap)?;
        let drop = (index + 1 - c.first_index()) as usize;
        c.entries.drain(..drop);
        c.base_index = index;
        c.base_term = term;
        c.snapshot = snap;
        c.rewrite_log()
    }

    /// The latest snapshot (index 0 and no data when there is none).
    pub fn latest_snapshot(&self) -> Snapshot {
        self.core.read().snapshot.clone()
    }

    /// Current hard state.
    pub fn hard_state(&self) -> HardState {
        self.core.read().hard_state.clone()
    }

    /// Current membership.
    pub fn conf_state(&self) -> ConfState {
        self.core.read().conf_state.clone()
    }

    /// First and last log index held (first > last when empty).
    pub fn bounds(&self) -> (u64, u64) {
        let c = self.core.read();
        (c.first_index(), c.last_index())
    }

    /// Size of `raft.log` in bytes.
    pub fn log_bytes(&self) -> u64 {
        let c = self.core.read();
        c.log.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

fn replay_log(core: &mut Core, path: &Path, rec: &mut Recovery) -> Result<(), StorageError> {
    let read_err = |source| StorageError::ReadLog {
        path: path.to_owned(),
        source,
    };
    let file_len = fs::metadata(path).map_err(read_err)?.len();
    let mut r = BufReader::new(File::open(path).map_err(read_err)?);
    let mut head = [0u8; FILE_HEADER];
    if file_len < FILE_HEADER as u64 {
        // Created but never written (crash right after create): start it properly.
        tracing::warn!(path = %path.display(), "raft log: empty or torn header, rewriting");
        rec.truncated_bytes = file_len;
        return core.rewrite_log();
    }
    r.read_exact(&mut head).map_err(read_err)?;
    let version = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
    if &head[..8] != LOG_MAGIC || version != FORMAT_VERSION {
        return Err(StorageError::Header {
            path: path.to_owned(),
            version: if &head[..8] == LOG_MAGIC { version } else { 0 },
        });
    }
    let snap_index = core.base_index;
    let snap_term = core.base_term;
    let mut off = FILE_HEADER as u64;
    let mut payload = Vec::new();
    let mut torn_at = None;
    let mut log_base = snap_index;
    let mut term_at_snap = None;
    while off < file_len {
        let remaining = file_len - off;
        if remaining < REC_HEADER as u64 {
            torn_at = Some(off);
            break;
        }
        let mut h = [0u8; REC_HEADER];
        r.read_exact(&mut h).map_err(read_err)?;
        let len = u32::from_le_bytes(h[0..4].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(h[4..8].try_into().unwrap_or_default());
        let kind = h[8];
        let end = off + REC_HEADER as u64 + len as u64;
        if end > file_len {
            torn_at = Some(off);
            break;
        }
        if len > MAX_RECORD {
            return Err(StorageError::OversizedRecord {
                path: path.to_owned(),
                offset: off,
                len,
            });
        }
        payload.resize(len as usize, 0);
        r.read_exact(&mut payload).map_err(read_err)?;
        if crc_of(kind, &payload) != crc {
            if end == file_len {
                torn_at = Some(off);
                break;
            }
            return Err(StorageError::CorruptRecord {
                path: path.to_owned(),
                offset: off,
                following: file_len - end,
            });
        }
        let decode_err = |reason: String| StorageError::DecodeRecord {
            path: path.to_owned(),
            offset: off,
            kind,
            reason,
        };
        match kind {
            KIND_ENTRY => {
                let e = Entry::decode(&payload[..]).map_err(|e| decode_err(e.to_string()))?;
                match e.index.cmp(&snap_index) {
                    // A rewrite at or below the snapshot index also truncates what follows.
                    std::cmp::Ordering::Less => {
                        term_at_snap = None;
                        core.entries.clear();
                    }
                    std::cmp::Ordering::Equal => {
                        term_at_snap = Some(e.term);
                        core.entries.clear();
                    }
                    std::cmp::Ordering::Greater => {}
                }
                if e.index > core.base_index {
                    let last = core.last_index();
                    if e.index > last + 1 {
                        return Err(StorageError::Gap {
                            path: path.to_owned(),
                            index: e.index,
                            last,
                        });
                    }
                    core.push_entries(std::slice::from_ref(&e));
                }
            }
            KIND_HARD_STATE => {
                core.hard_state =
                    HardState::decode(&payload[..]).map_err(|e| decode_err(e.to_string()))?;
            }
            KIND_CONF_STATE => {
                core.conf_state =
                    ConfState::decode(&payload[..]).map_err(|e| decode_err(e.to_string()))?;
            }
            KIND_BASE => {
                if payload.len() != 16 {
                    return Err(decode_err(format!(
                        "base record of {} bytes",
                        payload.len()
                    )));
                }
                let index = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                log_base = index;
                if index > snap_index {
                    return Err(decode_err(format!(
                        "log continues from index {index} but the snapshot is at {snap_index}"
                    )));
                }
            }
            other => return Err(decode_err(format!("unknown record kind {other}"))),
        }
        rec.records += 1;
        off = end;
    }
    // A snapshot newer than the log (crash between writing the snapshot and rewriting
    // the log): entries after it are kept only if the log agrees with the snapshot at its
    // index (raft's log matching); otherwise they belong to a divergent history.
    if log_base < snap_index && term_at_snap != Some(snap_term) && !core.entries.is_empty() {
        tracing::warn!(
            snap_index,
            "raft log: entries after the snapshot do not match it, dropping them"
        );
        core.entries.clear();
    }
    if let Some(at) = torn_at {
        let torn = file_len - at;
        tracing::warn!(
            path = %path.display(),
            offset = at,
            bytes = torn,
            "raft log: truncating a torn tail record"
        );
        rec.truncated_bytes = torn;
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(read_err)?;
        f.set_len(at).map_err(StorageError::WriteLog)?;
        f.sync_all().map_err(StorageError::WriteLog)?;
    }
    Ok(())
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.core.read();
        Ok(RaftState::new(c.hard_state.clone(), c.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let c = self.core.read();
        if low < c.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > c.last_index() + 1 {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        let lo = (low - c.first_index()) as usize;
        let hi = (high - c.first_index()) as usize;
        let mut ents = c.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.core.read().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.core.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.core.read().last_index())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // The latest snapshot always covers everything compacted away (we only compact
        // right after taking one), so it is always good enough for a lagging follower.
        Ok(self.core.read().snapshot.clone())
    }
}

#[cfg(test)]
mod tests;
