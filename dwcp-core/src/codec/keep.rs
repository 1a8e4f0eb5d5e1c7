//! Kept copies of a guest's page content, for re-migration (docs/hde.md,
//! layer 3).
//!
//! Every session that plans pages (both ends: the source's [`super::Planner`]
//! and the destination's [`super::Rebuilder`]) records each distinct page
//! content it moves into a [`Recorder`]: an unlinked file of pages. When the
//! session completes, the recorder is sealed into the host's [`KeepStore`]
//! under the migration's name: the SHA-256 of every page is computed (on a
//! thread of its own) and the copy is kept for `keep-s` seconds.
//!
//! When the same guest later migrates *to* this host, the destination
//! announces the SHA-256 list of its kept copy (HAVE frames), and the
//! source sends each page whose content is on that list as a reference to
//! it (plan op `HAVE`, a varint). The destination reads the page from its
//! copy and hashes it again before the page goes anywhere: a copy changed on
//! disk, or an index past what was announced, fails the channel with the
//! reason named. The source compares full 256-bit SHA-256 digests: with
//! no page of the kept copy in its hands it cannot compare bytes, and a
//! collision of SHA-256 is the argument (docs/hde.md).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::BuildHasherDefault;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64;

use super::plan::IdHasher;
use super::{CodecError, PAGE_SIZE};

/// A page's SHA-256.
pub type PageHash = [u8; 32];

/// Most pages one kept copy (and one announcement) may hold: 4 GiB of
/// distinct content. The initiator's index of an announcement costs about
/// 48 bytes per page (48 MiB at this bound).
pub const MAX_KEEP_PAGES: u64 = 1 << 20;

/// Most copies a host keeps at once (each holds a file descriptor); the
/// oldest goes first.
pub const MAX_COPIES: usize = 8;

/// Pages written to a recorder's file at once.
const WRITE_BATCH: usize = 64;

/// SHA-256 of one page.
pub fn page_hash(page: &[u8]) -> PageHash {
    Sha256::digest(page).into()
}

/// Creates an unlinked read-write file in `dir` (nothing is left behind if
/// the process dies).
pub(crate) fn unlinked_file(dir: &Path, what: &str) -> std::io::Result<File> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!(
        ".dwcp-{what}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// A sealed copy: the pages in a file, their SHA-256 in order.
pub struct KeptCopy {
    file: File,
    hashes: Vec<PageHash>,
    sealed: Instant,
}

impl std::fmt::Debug for KeptCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptCopy")
            .field("pages", &self.hashes.len())
            .field("age", &self.sealed.elapsed())
            .finish()
    }
}

impl KeptCopy {
    /// A copy of `pages` (concatenated 4 KiB pages) in an unlinked file in
    /// `dir` (tests and benchmarks).
    pub fn from_pages(dir: &Path, pages: &[u8]) -> std::io::Result<KeptCopy> {
        let file = unlinked_file(dir, "keep")?;
        file.write_all_at(pages, 0)?;
        Ok(KeptCopy {
            file,
            hashes: pages.chunks_exact(PAGE_SIZE).map(page_hash).collect(),
            sealed: Instant::now(),
        })
    }

    /// Pages in the copy.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether the copy holds no page.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The pages' SHA-256, in the order the plan's `HAVE` ops index them.
    pub fn hashes(&self) -> &[PageHash] {
        &self.hashes
    }

    /// Reads page `idx` into `page` (4 KiB) and checks it still hashes to
    /// what was announced.
    pub fn read(&self, idx: u64, page: &mut [u8]) -> Result<(), CodecError> {
        let Some(want) = self.hashes.get(idx as usize) else {
            return Err(CodecError::KeptOutOfRange {
                idx,
                len: self.hashes.len() as u64,
            });
        };
        self.file
            .read_exact_at(page, idx * PAGE_SIZE as u64)
            .map_err(|source| CodecError::KeptRead { idx, source })?;
        if page_hash(page) != *want {
            return Err(CodecError::KeptCorrupt { idx });
        }
        Ok(())
    }

    /// Overwrites page `idx` in the file (tests: a copy changed on disk).
    #[doc(hidden)]
    pub fn corrupt_page(&self, idx: u64) -> std::io::Result<()> {
        self.file.write_all_at(&[0xA5; 16], idx * PAGE_SIZE as u64)
    }
}

/// The host's kept copies, by migration name.
pub struct KeepStore {
    dir: PathBuf,
    ttl: Duration,
    max_pages: u64,
    copies: Mutex<HashMap<String, Arc<KeptCopy>>>,
    /// Copies being sealed (hashing), for [`KeepStore::wait_sealed`].
    sealing: Mutex<usize>,
    sealed_cv: parking_lot::Condvar,
}

impl std::fmt::Debug for KeepStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepStore")
            .field("dir", &self.dir)
            .field("ttl", &self.ttl)
            .field("max_pages", &self.max_pages)
            .field("copies", &self.copies.lock().len())
            .finish()
    }
}

impl KeepStore {
    /// A store whose files go in `dir` (unlinked), kept `ttl` after the
    /// session that made them, at most `max_pages` pages per copy (and in
    /// all copies together twice that), at most [`MAX_COPIES`] copies.
    pub fn new(dir: &Path, ttl: Duration, max_pages: u64) -> Arc<KeepStore> {
        Arc::new(KeepStore {
            dir: dir.to_path_buf(),
            ttl,
            max_pages: max_pages.min(MAX_KEEP_PAGES),
            copies: Mutex::new(HashMap::new()),
            sealing: Mutex::new(0),
            sealed_cv: parking_lot::Condvar::new(),
        })
    }

    /// The copy kept for `name`, unless there is none or it expired.
    pub fn get(&self, name: &str) -> Option<Arc<KeptCopy>> {
        let mut c = self.copies.lock();
        c.retain(|_, k| k.sealed.elapsed() < self.ttl);
        c.get(name).cloned()
    }

    /// Puts a copy in the store under `name` (tests; sessions seal theirs
    /// through a [`Recorder`]).
    pub fn insert(&self, name: &str, copy: KeptCopy) {
        let mut c = self.copies.lock();
        c.insert(name.to_string(), Arc::new(copy));
        self.evict(&mut c);
    }

    /// Kept copies and their pages, for logs and stats.
    pub fn usage(&self) -> (usize, u64) {
        let c = self.copies.lock();
        (c.len(), c.values().map(|k| k.len() as u64).sum())
    }

    /// Waits until no copy is being sealed, at most `timeout`.
    pub fn wait_sealed(&self, timeout: Duration) -> bool {
        let mut n = self.sealing.lock();
        let deadline = Instant::now() + timeout;
        while *n > 0 {
            if self.sealed_cv.wait_until(&mut n, deadline).timed_out() {
                return false;
            }
        }
        true
    }

    /// A recorder for a session of `name` that files its copy here when the
    /// session completes; None when the directory takes no file.
    pub fn recorder(self: &Arc<Self>, name: &str) -> Option<Arc<Recorder>> {
        if self.max_pages == 0 {
            return None;
        }
        match unlinked_file(&self.dir, "keep") {
            Ok(file) => Some(Arc::new(Recorder {
                store: Arc::downgrade(self),
                name: name.to_string(),
                st: Mutex::new(Some(RecState {
                    file,
                    seen: HashSet::default(),
                    pages: 0,
                    buf: Vec::with_capacity(WRITE_BATCH * PAGE_SIZE),
                    failed: None,
                })),
                max_pages: self.max_pages,
            })),
            Err(e) => {
                tracing::warn!(name, dir = %self.dir.display(), "no kept copy for re-migration: {e}");
                None
            }
        }
    }

    /// Drops the oldest copies while all of them hold more than twice the
    /// per-copy bound, or there are more than [`MAX_COPIES`].
    fn evict(&self, c: &mut HashMap<String, Arc<KeptCopy>>) {
        loop {
            let total: u64 = c.values().map(|k| k.len() as u64).sum();
            if total <= 2 * self.max_pages && c.len() <= MAX_COPIES {
                return;
            }
            let Some(oldest) = c
                .iter()
                .min_by_key(|(_, k)| k.sealed)
                .map(|(n, _)| n.clone())
            else {
                return;
            };
            c.remove(&oldest);
        }
    }

    /// Hashes a finished recording's pages and keeps it under `name`.
    fn seal(&self, name: &str, st: RecState) {
        let started = Instant::now();
        let mut hashes = Vec::with_capacity(st.pages as usize);
        let mut buf = vec![0u8; WRITE_BATCH * PAGE_SIZE];
        let mut f = &st.file;
        let mut left = st.pages as usize;
        let mut res = Ok(());
        while left > 0 {
            let n = left.min(WRITE_BATCH);
            if let Err(e) = f.read_exact(&mut buf[..n * PAGE_SIZE]) {
                res = Err(e);
                break;
            }
            hashes.extend(buf[..n * PAGE_SIZE].chunks_exact(PAGE_SIZE).map(page_hash));
            left -= n;
        }
        if let Err(e) = res {
            tracing::warn!(name, "kept copy not kept: reading it back: {e}");
            return;
        }
        let pages = hashes.len();
        let mut c = self.copies.lock();
        c.insert(
            name.to_string(),
            Arc::new(KeptCopy {
                file: st.file,
                hashes,
                sealed: Instant::now(),
            }),
        );
        self.evict(&mut c);
        tracing::info!(
            name,
            pages,
            mib = (pages as u64 * PAGE_SIZE as u64) >> 20,
            seal_ms = started.elapsed().as_millis() as u64,
            ttl_s = self.ttl.as_secs(),
            "kept a copy of the guest's pages for a re-migration to this host"
        );
    }
}

struct RecState {
    file: File,
    /// xxh3-64 of the pages recorded: a second page with the same hash is
    /// not recorded (a collision only leaves that page out of the copy).
    seen: HashSet<u64, BuildHasherDefault<IdHasher>>,
    pages: u64,
    /// Pages not yet written.
    buf: Vec<u8>,
    /// The first write that failed: nothing more is recorded, and the
    /// copy is not kept.
    failed: Option<std::io::Error>,
}

impl RecState {
    fn flush(&mut self) {
        if self.buf.is_empty() || self.failed.is_some() {
            return;
        }
        let at = (self.pages - (self.buf.len() / PAGE_SIZE) as u64) * PAGE_SIZE as u64;
        if let Err(e) = self.file.write_all_at(&self.buf, at) {
            self.failed = Some(e);
        }
        self.buf.clear();
    }
}

/// Records the distinct pages one session moves (shared by its channels).
pub struct Recorder {
    store: Weak<KeepStore>,
    name: String,
    st: Mutex<Option<RecState>>,
    max_pages: u64,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("name", &self.name)
            .finish()
    }
}

impl Recorder {
    /// Records `page` (4 KiB) unless the same content was recorded or the
    /// copy is full.
    pub fn add(&self, page: &[u8]) {
        let h = xxh3_64(page);
        let mut g = self.st.lock();
        let Some(st) = g.as_mut() else {
            return;
        };
        if st.failed.is_some() || st.pages >= self.max_pages || !st.seen.insert(h) {
            return;
        }
        st.buf.extend_from_slice(page);
        st.pages += 1;
        if st.buf.len() >= WRITE_BATCH * PAGE_SIZE {
            st.flush();
        }
    }

    /// The session completed: the copy goes to the store (sealed on a
    /// thread of its own). Pages added later are not recorded.
    pub fn finish(&self) {
        let Some(mut st) = self.st.lock().take() else {
            return;
        };
        st.flush();
        if let Some(e) = &st.failed {
            tracing::warn!(name = %self.name, "kept copy not kept: writing it: {e}");
            return;
        }
        let Some(store) = self.store.upgrade() else {
            return;
        };
        if st.pages == 0 {
            return;
        }
        *store.sealing.lock() += 1;
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name("dwcp-keep-seal".into())
            .spawn({
                let store = store.clone();
                move || {
                    store.seal(&name, st);
                    trim();
                    *store.sealing.lock() -= 1;
                    store.sealed_cv.notify_all();
                }
            });
        if spawned.is_err() {
            *store.sealing.lock() -= 1;
            store.sealed_cv.notify_all();
        }
    }
}

/// Gives the memory a recording used (its index of hashes, buffers,
/// freed by now) back to the system: glibc keeps what a thread freed in that
/// thread's arena, and an agent records once per migration for months.
fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and only walks glibc's own
    // arenas, under their locks; any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The initiator's side: what the destination announced it holds (HAVE
/// frames), as SHA-256 -> index of the page in the announcement.
#[derive(Debug, Default)]
pub struct PeerHas {
    map: HashMap<PageHash, u32>,
}

impl PeerHas {
    /// The index of `h` in the announcement.
    pub fn get(&self, h: &PageHash) -> Option<u32> {
        self.map.get(h).copied()
    }

    /// Pages announced.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing was announced.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// From a list of hashes (tests).
    pub fn from_hashes(hashes: &[PageHash]) -> PeerHas {
        let mut map = HashMap::with_capacity(hashes.len());
        for (i, h) in hashes.iter().enumerate() {
            map.entry(*h).or_insert(i as u32);
        }
        PeerHas { map }
    }
}

/// Hashes per HAVE frame (256 KiB of payload).
pub const HAVE_CHUNK: u64 = 8192;

/// Collects an announcement's HAVE frames, which may arrive on any stream in
/// any order: each carries the index of its first hash (a multiple of
/// [`HAVE_CHUNK`]) and the announcement's total.
#[derive(Debug, Default)]
pub struct HaveCollector {
    total: u64,
    hashes: Vec<PageHash>,
    got: Vec<bool>,
    chunks_left: u64,
}

impl HaveCollector {
    /// Adds one frame's hashes (`payload`, whole 32-byte hashes) starting at
    /// `first` of `total`; returns the whole announcement once every frame
    /// arrived. Errors name what is inconsistent.
    pub fn add(
        &mut self,
        total: u64,
        first: u64,
        payload: &[u8],
    ) -> Result<Option<PeerHas>, String> {
        if total == 0 || total > MAX_KEEP_PAGES {
            return Err(format!(
                "HAVE announces {total} pages (1..={MAX_KEEP_PAGES})"
            ));
        }
        if self.total == 0 && self.chunks_left == 0 && self.hashes.is_empty() {
            self.total = total;
            self.hashes = vec![[0u8; 32]; total as usize];
            let chunks = total.div_ceil(HAVE_CHUNK);
            self.got = vec![false; chunks as usize];
            self.chunks_left = chunks;
        } else if total != self.total {
            return Err(format!(
                "HAVE frames disagree on the total: {total} after {}",
                self.total
            ));
        }
        let n = (payload.len() / 32) as u64;
        let chunk = first / HAVE_CHUNK;
        if !first.is_multiple_of(HAVE_CHUNK)
            || first >= total
            || n != (total - first).min(HAVE_CHUNK)
            || !payload.len().is_multiple_of(32)
        {
            return Err(format!(
                "HAVE frame of {n} hashes at {first} does not fit an announcement of {total}"
            ));
        }
        if std::mem::replace(&mut self.got[chunk as usize], true) {
            return Err(format!("HAVE frame at {first} sent twice"));
        }
        for (i, h) in payload.chunks_exact(32).enumerate() {
            self.hashes[first as usize + i].copy_from_slice(h);
        }
        self.chunks_left -= 1;
        if self.chunks_left > 0 {
            return Ok(None);
        }
        let hashes = std::mem::take(&mut self.hashes);
        Ok(Some(PeerHas::from_hashes(&hashes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(k: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        for (i, w) in p.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes());
        }
        p
    }

    #[test]
    fn a_finished_recording_is_kept_and_read_back_verified() {
        let dir = std::env::temp_dir();
        let store = KeepStore::new(&dir, Duration::from_secs(60), 1000);
        let rec = store.recorder("vm1").expect("recorder");
        for k in 0..200 {
            rec.add(&page(k));
            rec.add(&page(k)); // the same content again: recorded once
        }
        assert!(store.get("vm1").is_none(), "nothing kept before finish");
        rec.finish();
        rec.add(&page(999)); // after finish: ignored
        assert!(store.wait_sealed(Duration::from_secs(10)));
        let copy = store.get("vm1").expect("kept");
        assert_eq!(copy.len(), 200);
        let mut buf = vec![0u8; PAGE_SIZE];
        for k in [0u64, 63, 64, 199] {
            copy.read(k, &mut buf).expect("read");
            assert_eq!(buf, page(k));
            assert_eq!(copy.hashes()[k as usize], page_hash(&page(k)));
        }
        assert!(matches!(
            copy.read(200, &mut buf),
            Err(CodecError::KeptOutOfRange { idx: 200, len: 200 })
        ));
        copy.corrupt_page(5).expect("corrupt");
        let e = copy.read(5, &mut buf).unwrap_err();
        assert!(matches!(e, CodecError::KeptCorrupt { idx: 5 }), "{e}");
        assert!(e.to_string().contains("page 5"), "{e}");
    }

    #[test]
    fn copies_expire_are_bounded_and_capped() {
        let dir = std::env::temp_dir();
        let store = KeepStore::new(&dir, Duration::from_millis(300), 50);
        let rec = store.recorder("big").expect("recorder");
        for k in 0..80 {
            rec.add(&page(k));
        }
        rec.finish();
        assert!(store.wait_sealed(Duration::from_secs(10)));
        assert_eq!(
            store.get("big").expect("kept").len(),
            50,
            "capped at max_pages"
        );
        // Two more copies: all together at most 2 x 50 pages, oldest out.
        for name in ["b", "c"] {
            let pages: Vec<u8> = (0..50).flat_map(page).collect();
            store.insert(name, KeptCopy::from_pages(&dir, &pages).expect("copy"));
        }
        assert!(store.get("big").is_none(), "oldest evicted");
        assert!(store.get("b").is_some() && store.get("c").is_some());
        // At most MAX_COPIES copies, however small.
        let big = KeepStore::new(&dir, Duration::from_secs(60), 1000);
        for k in 0..MAX_COPIES + 3 {
            big.insert(
                &format!("g{k}"),
                KeptCopy::from_pages(&dir, &page(k as u64)).unwrap(),
            );
        }
        assert_eq!(big.usage().0, MAX_COPIES);
        assert!(big.get("g0").is_none() && big.get(&format!("g{}", MAX_COPIES + 2)).is_some());
        std::thread::sleep(Duration::from_millis(350));
        assert!(store.get("b").is_none(), "expired");
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn have_frames_in_any_order_make_one_announcement() {
        let total = HAVE_CHUNK * 2 + 5;
        let hashes: Vec<PageHash> = (0..total).map(|k| page_hash(&page(k))).collect();
        let frame = |first: u64| -> Vec<u8> {
            let end = (first + HAVE_CHUNK).min(total);
            hashes[first as usize..end as usize].concat()
        };
        let mut c = HaveCollector::default();
        assert!(c
            .add(total, 2 * HAVE_CHUNK, &frame(2 * HAVE_CHUNK))
            .unwrap()
            .is_none());
        assert!(c.add(total, 0, &frame(0)).unwrap().is_none());
        let e = c.add(total, 0, &frame(0)).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let has = c
            .add(total, HAVE_CHUNK, &frame(HAVE_CHUNK))
            .unwrap()
            .expect("done");
        assert_eq!(has.len(), total as usize);
        assert_eq!(has.get(&hashes[7]), Some(7));
        assert_eq!(has.get(&hashes[total as usize - 1]), Some(total as u32 - 1));

        let mut c = HaveCollector::default();
        let e = c.add(total, 3, &frame(0)).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let e = HaveCollector::default()
            .add(MAX_KEEP_PAGES + 1, 0, &frame(0))
            .unwrap_err();
        assert!(e.contains("announces"), "{e}");
        let mut c = HaveCollector::default();
        c.add(total, 0, &frame(0)).unwrap();
        let e = c
            .add(total + 1, HAVE_CHUNK, &frame(HAVE_CHUNK))
            .unwrap_err();
        assert!(e.contains("disagree"), "{e}");
    }
}
