use super::*;

fn ent(index: u64, term: u64) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.data = format!("e{index}t{term}").into_bytes();
    e
}

fn fresh() -> (tempfile::TempDir, DiskStorage) {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = DiskStorage::open(d.path()).unwrap();
    s.bootstrap(&[1, 2, 3], b"reg".to_vec()).unwrap();
    (d, s)
}

fn ents(s: &DiskStorage) -> Vec<(u64, u64)> {
    let (f, l) = s.bounds();
    s.entries(f, l + 1, None, GetEntriesContext::empty(false))
        .unwrap()
        .iter()
        .map(|e| (e.index, e.term))
        .collect()
}

#[test]
fn reopen_round_trip_and_conflict_truncation() {
    let (d, s) = fresh();
    s.append(&(2..=6).map(|i| ent(i, 1)).collect::<Vec<_>>())
        .unwrap();
    // A new leader overwrites 5..: the suffix is replaced.
    s.append(&[ent(5, 2)]).unwrap();
    let mut hs = HardState::default();
    hs.term = 2;
    hs.vote = 3;
    hs.commit = 4;
    s.set_hard_state(&hs).unwrap();
    s.sync().unwrap();
    drop(s);
    let (s, rec) = DiskStorage::open(d.path()).unwrap();
    assert_eq!(rec.truncated_bytes, 0);
    assert_eq!(ents(&s), vec![(2, 1), (3, 1), (4, 1), (5, 2)]);
    assert_eq!(s.hard_state(), hs);
    assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
    assert_eq!(s.term(1).unwrap(), 1);
    assert!(matches!(
        s.term(0),
        Err(raft::Error::Store(raft::StorageError::Compacted))
    ));
}

#[test]
fn torn_tail_is_truncated() {
    let (d, s) = fresh();
    s.append(&(2..=4).map(|i| ent(i, 1)).collect::<Vec<_>>())
        .unwrap();
    drop(s);
    let path = d.path().join(LOG_FILE);
    let good_len = fs::metadata(&path).unwrap().len();
    // Half a record: header promising 100 bytes, 10 present.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&100u32.to_le_bytes()).unwrap();
    f.write_all(&[0u8; 15]).unwrap();
    drop(f);
    let (s, rec) = DiskStorage::open(d.path()).unwrap();
    assert_eq!(rec.truncated_bytes, 19);
    assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
    assert_eq!(s.bounds(), (2, 4));
    // A complete last record with a bad CRC is also a torn write.
    s.append(&[ent(5, 1)]).unwrap();
    drop(s);
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let (s, rec) = DiskStorage::open(d.path()).unwrap();
    assert!(rec.truncated_bytes > 0);
    assert_eq!(s.bounds(), (2, 4));
}

#[test]
fn corruption_in_the_middle_is_refused() {
    let (d, s) = fresh();
    s.append(&(2..=6).map(|i| ent(i, 1)).collect::<Vec<_>>())
        .unwrap();
    drop(s);
    let path = d.path().join(LOG_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 60] ^= 0x55; // inside an earlier entry
    fs::write(&path, &bytes).unwrap();
    let err = DiskStorage::open(d.path()).unwrap_err();
    assert!(matches!(err, StorageError::CorruptRecord { .. }), "{err}");
    assert!(err.to_string().contains("corrupt in the middle"));
}

#[test]
fn oversized_record_is_refused_before_allocation() {
    let (d, s) = fresh();
    drop(s);
    let path = d.path().join(LOG_FILE);
    let mut bytes = fs::read(&path).unwrap();
    // Rewrite the first record's length to a huge value, with enough bytes after it
    // that it is not mistaken for a torn tail.
    bytes[FILE_HEADER..FILE_HEADER + 4].copy_from_slice(&(MAX_RECORD + 1).to_le_bytes());
    bytes.resize(FILE_HEADER + REC_HEADER + MAX_RECORD as usize + 10, 0);
    fs::write(&path, &bytes).unwrap();
    let err = DiskStorage::open(d.path()).unwrap_err();
    assert!(matches!(err, StorageError::OversizedRecord { .. }), "{err}");
}

#[test]
fn bad_magic_is_refused() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(LOG_FILE), b"NOTALOG!\x01\x00\x00\x00").unwrap();
    assert!(matches!(
        DiskStorage::open(d.path()),
        Err(StorageError::Header { .. })
    ));
}

#[test]
fn snapshot_compacts_and_survives_reopen() {
    let (d, s) = fresh();
    s.append(&(2..=10).map(|i| ent(i, 2)).collect::<Vec<_>>())
        .unwrap();
    let mut cs = ConfState::default();
    cs.voters = vec![1, 2];
    s.create_snapshot(7, cs, b"state@7".to_vec()).unwrap();
    assert_eq!(s.bounds(), (8, 10));
    assert_eq!(s.term(7).unwrap(), 2);
    assert!(matches!(
        s.entries(5, 8, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(raft::StorageError::Compacted))
    ));
    drop(s);
    let (s, rec) = DiskStorage::open(d.path()).unwrap();
    assert_eq!(rec.snapshot_index, 7);
    assert_eq!(ents(&s), vec![(8, 2), (9, 2), (10, 2)]);
    let snap = s.snapshot(0, 2).unwrap();
    assert_eq!(snap.get_metadata().index, 7);
    assert_eq!(&snap.data[..], b"state@7");
    // Received snapshot replaces the log entirely.
    let mut inc = Snapshot::default();
    inc.mut_metadata().index = 20;
    inc.mut_metadata().term = 3;
    inc.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    s.apply_snapshot(inc).unwrap();
    drop(s);
    let (s, _) = DiskStorage::open(d.path()).unwrap();
    assert_eq!(s.bounds(), (21, 20));
    assert_eq!(s.hard_state().commit, 20);
}

#[test]
fn snapshot_newer_than_log_drops_divergent_entries() {
    // Crash between writing a received snapshot and rewriting the log.
    let (d, s) = fresh();
    s.append(&(2..=6).map(|i| ent(i, 1)).collect::<Vec<_>>())
        .unwrap();
    let log = fs::read(d.path().join(LOG_FILE)).unwrap();
    let mut inc = Snapshot::default();
    inc.mut_metadata().index = 4;
    inc.mut_metadata().term = 5; // our entry 4 has term 1: divergent
    s.apply_snapshot(inc).unwrap();
    drop(s);
    fs::write(d.path().join(LOG_FILE), &log).unwrap();
    let (s, _) = DiskStorage::open(d.path()).unwrap();
    assert_eq!(s.bounds(), (5, 4), "divergent entries kept");
}
