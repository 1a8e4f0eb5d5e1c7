//! Content sent once per migration across channels: a page one channel
//! sends whose content another channel of the same session already sent
//! goes as a cross-channel reference (`XREF`) to where that channel's
//! dedup spill file holds it, on both ends.
//!
//! Each channel keeps its own ring and spill file, in its own order (the
//! channels run in parallel, on each end in a different interleaving), so a
//! reference into another channel must name a page that channel's file is
//! certain to hold on the receiving end when the reference is rebuilt:
//!
//! - **Written there.** The source refers only to index `i` of channel B
//!   once the destination has credited B's frames up to a point where its
//!   ring held more than `i + ring pages` pages: index `i` had then left
//!   B's memory ring, so its spill batch was in B's file
//!   ([`Shared::confirm`] follows B's credits).
//! - **Not yet overwritten.** B's file slot of `i` is reused for index
//!   `i + spill pages`. The source refers only to an `i` within the newer
//!   half of B's spill window as the source sees it, so B must send another
//!   half a spill file (512 MiB with the defaults) before the destination
//!   could reuse the slot; a reference overtaken by that much of another
//!   channel's data would still not be a wrong page (next point).
//! - **Never a wrong page.** The source reads its own copy of B's slot and
//!   compares it byte for byte with the page it is about to send; the
//!   reference carries the page's xxh3-64, and the destination checks the
//!   page it read against it before it goes anywhere. A reference to a
//!   channel without a spill file, to an index B's file does not hold yet,
//!   or to a slot whose content changed fails the channel with the reason
//!   named, and the source guest keeps running.
//!
//! Memory: the source's session-wide index holds at most [`INDEX_MAX`]
//! entries (about 40 MiB) and starts over when full (which costs references,
//! never pages); it is filled only once a second channel takes part, so a
//! single-channel session pays neither its memory nor its lock per page.
//! The destination holds nothing beyond the channels' own spill files.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::plan::IdHasher;
use super::PAGE_SIZE;

/// Most entries of the source's session-wide content index.
pub const INDEX_MAX: usize = 1 << 20;

/// One channel's part of [`Shared`].
#[derive(Debug)]
pub struct ChannelShare {
    file: Arc<File>,
    ring_cap: AtomicU64,
    spill_cap: u64,
    /// Pages this end inserted into the channel's ring so far.
    count: AtomicU64,
    /// Source: pages the destination's ring surely held (credited).
    confirmed: AtomicU64,
    /// Source: (raw bytes sent up to the end of the frame, ring count
    /// after it) of planned frames not yet credited.
    pending: Mutex<VecDeque<(u64, u64)>>,
}

impl ChannelShare {
    /// The channel's ring was resized (a RING op) before its first page.
    pub(crate) fn set_ring(&self, ring_cap: u64) {
        self.ring_cap.store(ring_cap, Ordering::Relaxed);
    }

    /// The channel's ring now holds `count` pages in all.
    pub(crate) fn inserted(&self, count: u64) {
        self.count.store(count, Ordering::Release);
    }
}

/// What a session's channels share for cross-channel references (one per
/// session and end).
#[derive(Debug, Default)]
pub struct Shared {
    index: Mutex<HashMap<u64, (u16, u64), BuildHasherDefault<IdHasher>>>,
    channels: RwLock<HashMap<u16, Arc<ChannelShare>>>,
    /// Two channels or more take part: only then is the index filled.
    multi: AtomicBool,
}

/// Where another channel's copy of a page is, for a reference to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub channel: u16,
    pub idx: u64,
}

impl Shared {
    /// Registers `channel`'s spill file (a channel without one takes no
    /// part).
    /// Returns the channel's part, which its ring updates directly.
    pub(crate) fn register(
        &self,
        channel: u16,
        file: Arc<File>,
        ring_cap: u64,
        spill_cap: u64,
    ) -> Arc<ChannelShare> {
        let c = Arc::new(ChannelShare {
            file,
            ring_cap: AtomicU64::new(ring_cap),
            spill_cap,
            count: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            pending: Mutex::new(VecDeque::new()),
        });
        let mut chans = self.channels.write();
        chans.insert(channel, c.clone());
        if chans.len() > 1 {
            self.multi.store(true, Ordering::Release);
        }
        c
    }

    fn channel(&self, channel: u16) -> Option<Arc<ChannelShare>> {
        self.channels.read().get(&channel).cloned()
    }

    /// Source: `channel` inserted page `idx` with content hash `h`.
    /// Nothing while one channel takes part: no other channel could refer
    /// to it.
    pub(crate) fn indexed(&self, channel: u16, idx: u64, h: u64) {
        if !self.multi.load(Ordering::Acquire) {
            return;
        }
        let mut ix = self.index.lock();
        if ix.len() >= INDEX_MAX {
            ix.clear();
        }
        ix.insert(h, (channel, idx));
    }

    /// Source: a planned frame of `channel` ends at `raw_end` bytes of the
    /// channel's stream, with the ring at `count` pages.
    pub fn planned(&self, channel: u16, raw_end: u64, count: u64) {
        if let Some(c) = self.channel(channel) {
            c.pending.lock().push_back((raw_end, count));
        }
    }

    /// Source: the destination has now credited `credited` raw bytes of
    /// `channel` in all (delivered to its QEMU, so rebuilt into its ring).
    pub fn confirm(&self, channel: u16, credited: u64) {
        let Some(c) = self.channel(channel) else {
            return;
        };
        let mut p = c.pending.lock();
        let mut upto = None;
        while let Some(&(end, count)) = p.front() {
            if end > credited {
                break;
            }
            upto = Some(count);
            p.pop_front();
        }
        if let Some(n) = upto {
            c.confirmed.fetch_max(n, Ordering::AcqRel);
        }
    }

    /// Source: another channel's page with content hash `h` that the
    /// destination surely holds in its spill file (module doc), not yet
    /// verified.
    pub(crate) fn candidate(&self, own: u16, h: u64) -> Option<Candidate> {
        let (channel, idx) = *self.index.lock().get(&h)?;
        if channel == own {
            return None;
        }
        let c = self.channel(channel)?;
        let ring = c.ring_cap.load(Ordering::Relaxed);
        let written = idx + ring < c.confirmed.load(Ordering::Acquire);
        let fresh = idx + c.spill_cap / 2 >= c.count.load(Ordering::Acquire);
        (written && fresh).then_some(Candidate { channel, idx })
    }

    /// Reads `channel`'s copy of page `idx` from its spill file into `buf`
    /// (both ends). None: no such channel, or `idx` not in its file yet.
    pub(crate) fn read(
        &self,
        channel: u16,
        idx: u64,
        buf: &mut [u8],
    ) -> Result<bool, std::io::Error> {
        let Some(c) = self.channel(channel) else {
            return Ok(false);
        };
        if idx + c.ring_cap.load(Ordering::Relaxed) >= c.count.load(Ordering::Acquire) {
            return Ok(false);
        }
        let off = (idx % c.spill_cap) * PAGE_SIZE as u64;
        std::os::unix::fs::FileExt::read_exact_at(&*c.file, buf, off)?;
        Ok(true)
    }

    /// Entries in the source's index (tests).
    pub fn index_len(&self) -> usize {
        self.index.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One channel fills no index; from the second channel on, every
    /// inserted page is indexed.
    #[test]
    fn the_index_is_filled_only_once_two_channels_take_part() {
        let sh = Shared::default();
        let f = Arc::new(
            super::super::keep::unlinked_file(&std::env::temp_dir(), "xref-test").unwrap(),
        );
        sh.register(1, f.clone(), 64, 1024);
        for i in 0..100 {
            sh.indexed(1, i, 1000 + i);
        }
        assert_eq!(sh.index_len(), 0);
        sh.register(2, f, 64, 1024);
        for i in 0..100 {
            sh.indexed(2, i, 5000 + i);
        }
        assert_eq!(sh.index_len(), 100);
        assert_eq!(sh.candidate(1, 5000), None, "not confirmed yet");
    }
}
