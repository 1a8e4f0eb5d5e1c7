//! The on-disk log/snapshot and the peer frames written by the build that used
//! rust-protobuf 2 (raft's `protobuf-codec`) stay readable by the build that
//! uses prost (`prost-codec`): protobuf is a wire standard and both codecs
//! speak it.
//!
//! `tests/fixtures/protobuf2/` was written by `write_fixture` below with the
//! last build of raft with `protobuf-codec` (commit 4398ef1, run as
//! `DWCP_WRITE_FIXTURE=dir cargo test -p dwcp-consensus --test format_compat
//! -- --ignored`); `fixture_is_readable` reads it with the current build and
//! checks every value. Do not regenerate it: the current build would write
//! prost's bytes, and the test would stop proving anything about old data.
#![allow(clippy::field_reassign_with_default)]

use std::path::{Path, PathBuf};

use dwcp_consensus::net::{encode_frame, read_frame};
use dwcp_consensus::storage::DiskStorage;
use raft::prelude::{
    ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot, SnapshotMetadata,
};
use raft::{GetEntriesContext, Storage};

const CLUSTER: u64 = 0x00C0_FFEE;

fn entry(index: u64, term: u64, kind: EntryType, data: &[u8], context: &[u8]) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.set_entry_type(kind);
    e.data = data.to_vec();
    e.context = context.to_vec();
    e
}

/// Entries 2..=6; 2..=3 end up in the snapshot, 4..=6 in the log.
fn entries() -> Vec<Entry> {
    vec![
        entry(2, 1, EntryType::EntryNormal, b"{\"register\":1}", b""),
        entry(
            3,
            1,
            EntryType::EntryConfChangeV2,
            &[0x0a, 0x02, 0x08, 0x04],
            b"ctx",
        ),
        entry(4, 2, EntryType::EntryNormal, &[], &[]),
        entry(
            5,
            2,
            EntryType::EntryConfChange,
            &[0x10, 0x05],
            b"{\"addr\":\"h:1\"}",
        ),
        entry(6, 3, EntryType::EntryNormal, &[0u8, 1, 2, 255, 128], b"c"),
    ]
}

fn conf_state() -> ConfState {
    let mut cs = ConfState::default();
    cs.voters = vec![1, 2, 3];
    cs.learners = vec![5];
    cs.voters_outgoing = vec![1, 2, 4];
    cs.learners_next = vec![4];
    cs.auto_leave = true;
    cs
}

fn hard_state() -> HardState {
    let mut hs = HardState::default();
    hs.term = 3;
    hs.vote = 2;
    hs.commit = 5;
    hs
}

/// A raft message using every kind of field: enums, repeated messages, a
/// nested snapshot, bytes, bools.
fn message() -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.to = 2;
    m.from = 1;
    m.term = 3;
    m.log_term = 2;
    m.index = 4;
    m.entries = entries()[2..].to_vec();
    m.commit = 5;
    m.commit_term = 2;
    let mut snap = Snapshot::default();
    let mut meta = SnapshotMetadata::default();
    meta.index = 3;
    meta.term = 1;
    meta.set_conf_state(conf_state());
    snap.set_metadata(meta);
    snap.data = b"registry".to_vec();
    m.set_snapshot(snap);
    m.request_snapshot = 7;
    m.reject = true;
    m.reject_hint = 9;
    m.context = b"context".to_vec();
    m.priority = -4;
    m
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/protobuf2")
}

#[test]
#[ignore = "writes the fixture; run only to regenerate it"]
fn write_fixture() {
    let out = PathBuf::from(std::env::var("DWCP_WRITE_FIXTURE").expect("DWCP_WRITE_FIXTURE=dir"));
    std::fs::create_dir_all(&out).unwrap();
    let (s, _) = DiskStorage::open(&out).unwrap();
    s.bootstrap(&[1, 2, 3], b"initial".to_vec()).unwrap();
    s.append(&entries()).unwrap();
    s.set_hard_state(&hard_state()).unwrap();
    s.set_conf_state(&conf_state()).unwrap();
    s.create_snapshot(3, conf_state(), b"registry@3".to_vec())
        .unwrap();
    s.sync().unwrap();
    let mut frame = Vec::new();
    encode_frame(CLUSTER, &message(), &mut frame);
    std::fs::write(out.join("frame.bin"), frame).unwrap();
}

#[test]
fn fixture_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["raft.log", "raft.snap", "frame.bin"] {
        std::fs::copy(fixture_dir().join(f), dir.path().join(f)).unwrap();
    }
    let (s, rec) = DiskStorage::open(dir.path()).unwrap();
    assert_eq!(rec.truncated_bytes, 0);
    assert_eq!(s.bounds(), (4, 6));
    let got = s
        .entries(4, 7, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(got, entries()[2..].to_vec());
    assert_eq!(got[1].get_entry_type(), EntryType::EntryConfChange);
    assert_eq!(s.hard_state(), hard_state());
    assert_eq!(s.conf_state(), conf_state());
    let snap = s.latest_snapshot();
    assert_eq!(snap.get_metadata().index, 3);
    assert_eq!(snap.get_metadata().term, 1);
    assert_eq!(snap.get_metadata().get_conf_state(), &conf_state());
    assert_eq!(&snap.data[..], b"registry@3");

    let frame = std::fs::read(dir.path().join("frame.bin")).unwrap();
    let m = read_frame(&mut &frame[..], CLUSTER, 1 << 20).unwrap();
    assert_eq!(m, message());
    assert_eq!(m.get_msg_type(), MessageType::MsgAppend);
    // The current encoder writes the same fields but not the same bytes:
    // prost packs repeated integers (proto3's default; rust-protobuf 2 wrote
    // them one tag each) and follows the .proto's declaration order where
    // rust-protobuf 2 followed field numbers. Protobuf requires every parser
    // to accept both forms, so old and new members read each other's frames.
    let mut again = Vec::new();
    encode_frame(CLUSTER, &message(), &mut again);
    assert_ne!(again, frame);
    assert_eq!(
        read_frame(&mut &again[..], CLUSTER, 1 << 20).unwrap(),
        message()
    );
}
