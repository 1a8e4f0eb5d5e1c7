//! The cutover gate in the transport: on the destination, a gated session
//! holds back the last bytes of QEMU's main migration channel (channel 0)
//! until the ownership transfer is committed. QEMU's device state ends with
//! `QEMU_VM_EOF` followed by the VM description (`QEMU_VM_VMDESCRIPTION`,
//! a be32 length and JSON); while the held bytes contain that end marker,
//! the destination QEMU cannot finish loading, so the guest cannot start
//! there. The gate opens when the held tail is QEMU's end of stream and
//! either the source closed the channel (no return path) or the channel went
//! quiet (with a return path the source waits for the destination before it
//! closes). See docs/consensus.md, "The transport gate".

use std::collections::VecDeque;

/// What decides whether a held tail may go to QEMU. Implemented by the agent
/// on top of the raft cluster; the engine stays free of raft.
pub trait CutoverGate: Send + Sync + std::fmt::Debug {
    /// Commits the ownership transfer. Called at most once per session, from
    /// the main channel's delivery thread, when the held tail is QEMU's end
    /// of stream. Blocks until committed (Ok) or given up (Err: the reason;
    /// the session then fails and the tail is never delivered).
    fn commit(&self) -> Result<(), String>;
    /// The held tail was written to QEMU after the commit.
    fn released(&self);
}

/// Bytes held back at least: QEMU's VM description (JSON) is a few KB to a
/// few hundred KB; its end marker must lie inside what is held.
pub const GATE_HOLD: usize = 4 << 20;

/// `QEMU_VM_EOF` and `QEMU_VM_VMDESCRIPTION` (migration/savevm.c).
const QEMU_VM_EOF: u8 = 0x00;
const QEMU_VM_VMDESCRIPTION: u8 = 0x06;

/// Where QEMU's end of stream starts in `tail`: the offset of `QEMU_VM_EOF`
/// when `tail` ends with `QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, be32 len,
/// JSON object of len bytes`; None otherwise.
pub fn qemu_stream_end(tail: &[u8]) -> Option<usize> {
    let n = tail.len();
    if n < 8 || tail[n - 1] != b'}' {
        return None;
    }
    // The JSON starts with '{' right after the 6-byte header; try every
    // '{' from the end whose header matches its length exactly.
    (6..n - 1).rev().find_map(|j| {
        if tail[j] != b'{' {
            return None;
        }
        let p = j - 6;
        let len = u32::from_be_bytes(tail[p + 2..j].try_into().ok()?) as usize;
        (tail[p] == QEMU_VM_EOF && tail[p + 1] == QEMU_VM_VMDESCRIPTION && len == n - j)
            .then_some(p)
    })
}

/// The held-back tail of a channel: frames in order, at least `cap` bytes
/// kept while more may come.
#[derive(Debug)]
pub struct TailHold {
    frames: VecDeque<Vec<u8>>,
    held: usize,
    cap: usize,
    /// `held` when the tail was last checked for an end (no re-scan until
    /// more arrives).
    checked_at: Option<usize>,
}

impl TailHold {
    pub fn new(cap: usize) -> TailHold {
        TailHold {
            frames: VecDeque::new(),
            held: 0,
            cap,
            checked_at: None,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Holds `bytes`; returns what may go to QEMU now (oldest first), keeping
    /// at least `cap` bytes back.
    pub fn push(&mut self, bytes: Vec<u8>) -> Vec<Vec<u8>> {
        if !bytes.is_empty() {
            self.held += bytes.len();
            self.frames.push_back(bytes);
            self.checked_at = None;
        }
        let mut out = Vec::new();
        while let Some(f) = self.frames.front() {
            if self.held - f.len() < self.cap {
                break;
            }
            self.held -= f.len();
            out.push(self.frames.pop_front().expect("front exists"));
        }
        out
    }

    /// Everything held, oldest first (the gate opened).
    pub fn take(&mut self) -> Vec<Vec<u8>> {
        self.held = 0;
        self.checked_at = None;
        self.frames.drain(..).collect()
    }

    /// Whether the held bytes end with QEMU's end of stream (cached until
    /// more bytes arrive).
    pub fn at_stream_end(&mut self) -> bool {
        if self.checked_at == Some(self.held) {
            return false;
        }
        self.checked_at = Some(self.held);
        self.ends_stream()
    }

    /// Whether the held bytes end with QEMU's end of stream.
    pub fn ends_stream(&self) -> bool {
        // Cheap first: QEMU's end is a JSON object.
        if self.frames.back().and_then(|f| f.last()) != Some(&b'}') {
            return false;
        }
        let tail: Vec<u8> = self.frames.iter().flatten().copied().collect();
        qemu_stream_end(&tail).is_some()
    }

    /// Whether the last check found no end at the current length.
    pub fn checked(&self) -> bool {
        self.checked_at == Some(self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(json: &str) -> Vec<u8> {
        let mut v = vec![QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION];
        v.extend_from_slice(&(json.len() as u32).to_be_bytes());
        v.extend_from_slice(json.as_bytes());
        v
    }

    #[test]
    fn finds_qemu_end_of_stream() {
        let json = r#"{"page_size": 4096, "devices": [{"name": "{x}"}]}"#;
        let mut s = vec![7u8; 1000];
        let at = s.len();
        s.extend(end(json));
        assert_eq!(qemu_stream_end(&s), Some(at));
        // Truncated, extended, wrong marker, wrong length: no end.
        assert_eq!(qemu_stream_end(&s[..s.len() - 1]), None);
        let mut longer = s.clone();
        longer.push(b'}');
        assert_eq!(qemu_stream_end(&longer), None);
        let mut wrong = s.clone();
        wrong[at + 1] = 0x05;
        assert_eq!(qemu_stream_end(&wrong), None);
        let mut badlen = s.clone();
        badlen[at + 5] ^= 1;
        assert_eq!(qemu_stream_end(&badlen), None);
        assert_eq!(qemu_stream_end(b"}"), None);
        assert_eq!(qemu_stream_end(&end("{}")), Some(0));
    }

    #[test]
    fn hold_keeps_the_tail_and_releases_the_rest_in_order() {
        let mut h = TailHold::new(10);
        assert!(h.push(vec![1; 4]).is_empty());
        assert!(h.push(vec![2; 4]).is_empty());
        // 4+4+4 = 12: dropping the first still leaves 8 < 10, so nothing yet.
        assert!(h.push(vec![3; 4]).is_empty());
        let out = h.push(vec![4; 4]);
        assert_eq!(out, vec![vec![1; 4]]);
        assert_eq!(h.held(), 12);
        let rest: Vec<u8> = h.take().concat();
        assert_eq!(rest, [[2u8; 4], [3; 4], [4; 4]].concat());
        assert_eq!(h.held(), 0);
    }

    #[test]
    fn end_check_is_cached_until_more_arrives() {
        let mut h = TailHold::new(1 << 20);
        h.push(vec![9; 100]);
        assert!(!h.at_stream_end());
        assert!(h.checked());
        h.push(end(r#"{"devices": []}"#));
        assert!(!h.checked());
        assert!(h.at_stream_end());
    }
}
