//! Where the guest pages are in a QEMU multifd channel, so that the
//! [`super::Planner`] can deduplicate and delta-encode them as it does the
//! page records of the main channel.
//!
//! A multifd channel carries no per-page record headers: after a 64-byte
//! `MultiFDInit_t` it is a sequence of packets, each a header followed by
//! its payload (QEMU 9.0-10.0, `migration/multifd.h`; every field
//! big-endian):
//!
//! - `MultiFDPacketHdr_t`: magic `0x11223344`, version 1, flags.
//! - RAM packet: the rest of `MultiFDPacket_t` (320 bytes in all: pages
//!   allocated, normal pages, next packet size, packet number, zero pages,
//!   reserved words, the RAM block's name in 256 bytes) and one 64-bit
//!   offset per allocated page. With no compression flag the payload is
//!   the normal pages, 4 KiB each, at the first `normal_pages` offsets.
//!   A SYNC packet has none.
//! - Device state packet (flag 64): 276 bytes of header and
//!   `next_packet_size` bytes of state.
//! - Compressed RAM packets (zlib, zstd, ...): `next_packet_size` bytes
//!   this parser does not look into.
//!
//! The parser only tells the planner where whole pages lie in a frame. It
//! never changes a byte: whatever it makes of a stream, the plan still
//! rebuilds it exactly. So a stream it does not understand (another QEMU
//! version, a page size other than 4 KiB, data that is not multifd at all)
//! only costs the dedup: the parser stops looking ("lost") and every byte
//! goes as literal or zero runs, as it did before this parser existed. A
//! page that straddles two frames is passed as bytes, not as a page.

use std::collections::HashMap;

use super::PAGE_SIZE;

/// `MULTIFD_MAGIC`, big-endian on the wire.
pub(crate) const MAGIC: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
const VERSION: u32 = 1;
/// `sizeof(MultiFDInit_t)`.
const INIT_LEN: usize = 64;
/// `sizeof(MultiFDPacket_t)` without the offsets.
const RAM_FIXED: usize = 320;
/// `sizeof(MultiFDPacketDeviceState_t)`.
const DEVICE_LEN: usize = 276;
const FLAG_COMPRESSION_MASK: u32 = 0x1f << 1;
const FLAG_DEVICE_STATE: u32 = 32 << 1;
/// Most pages a packet may list (QEMU: 512 KiB / page size = 128 with
/// 4 KiB pages); beyond that the header is not one this parser believes.
const MAX_PAGES: usize = 4096;
/// Offsets in a RAM packet header until a packet says otherwise:
/// `MULTIFD_PACKET_SIZE` (512 KiB) of 4 KiB pages. A SYNC packet says 0
/// pages allocated but has the same length as every other.
const DEFAULT_PAGES: usize = 128;
/// RAM blocks told apart by their number in a page's key.
const MAX_BLOCKS: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes of the init packet still to pass.
    Init(usize),
    /// Collecting a packet header into `hdr`.
    Header,
    /// Passing the current packet's normal pages.
    Pages,
    /// Bytes of a payload this parser does not look into.
    Opaque(u64),
    /// The stream stopped making sense: no more pages.
    Lost,
}

/// Follows one multifd channel's byte stream, frame by frame, in order.
#[derive(Debug)]
pub(crate) struct Parser {
    state: State,
    /// The packet header collected so far, and the length it will have
    /// (known once its first 16 bytes are in).
    hdr: Vec<u8>,
    need: usize,
    /// The current packet's normal pages: their keys, the next one, and
    /// how many bytes of it (split across frames) have passed.
    keys: Vec<u64>,
    /// Offsets every RAM packet header carries (QEMU's page count per
    /// packet: 512 KiB of 4 KiB pages, or what a packet said).
    alloc: usize,
    next: usize,
    partial: usize,
    blocks: HashMap<Vec<u8>, u64>,
    /// A guest page's key from its block's number and its offset.
    key: fn(u64, u64) -> u64,
    /// Why the parser gave up (tests and logs).
    pub(crate) lost: Option<&'static str>,
}

impl Parser {
    /// Whether a channel whose first bytes are `raw` is a multifd channel.
    pub(crate) fn starts(raw: &[u8]) -> bool {
        raw.len() >= 8 && raw[..4] == MAGIC && be32(&raw[4..8]) == VERSION
    }

    /// A parser for a channel that [`Parser::starts`] recognised; `key`
    /// makes a guest page's key from its RAM block's number and offset.
    pub(crate) fn new(key: fn(u64, u64) -> u64) -> Parser {
        Parser {
            key,
            state: State::Init(INIT_LEN),
            hdr: Vec::with_capacity(RAM_FIXED + 8 * 128),
            need: 16,
            keys: Vec::new(),
            alloc: DEFAULT_PAGES,
            next: 0,
            partial: 0,
            blocks: HashMap::new(),
            lost: None,
        }
    }

    /// The pages wholly inside `raw`, the next piece of the stream: each as
    /// (offset in `raw`, the guest page's key), appended to `out` in order.
    pub(crate) fn pages(&mut self, raw: &[u8], out: &mut Vec<(usize, u64)>) {
        let mut pos = 0;
        while pos < raw.len() {
            let rest = raw.len() - pos;
            match self.state {
                State::Init(left) => {
                    let t = left.min(rest);
                    pos += t;
                    self.state = if left == t {
                        State::Header
                    } else {
                        State::Init(left - t)
                    };
                }
                State::Header => {
                    let t = (self.need - self.hdr.len()).min(rest);
                    self.hdr.extend_from_slice(&raw[pos..pos + t]);
                    pos += t;
                    if self.hdr.len() == self.need {
                        self.header();
                    }
                }
                State::Opaque(left) => {
                    let t = left.min(rest as u64);
                    pos += t as usize;
                    self.state = if left == t {
                        State::Header
                    } else {
                        State::Opaque(left - t)
                    };
                }
                State::Pages => {
                    if self.partial > 0 {
                        let t = (PAGE_SIZE - self.partial).min(rest);
                        pos += t;
                        self.partial += t;
                        if self.partial < PAGE_SIZE {
                            continue;
                        }
                        self.partial = 0;
                    } else if rest >= PAGE_SIZE {
                        out.push((pos, self.keys[self.next]));
                        pos += PAGE_SIZE;
                    } else {
                        self.partial = rest;
                        pos += rest;
                        continue;
                    }
                    self.next += 1;
                    if self.next == self.keys.len() {
                        self.state = State::Header;
                    }
                }
                State::Lost => return,
            }
        }
    }

    fn lose(&mut self, why: &'static str) {
        self.state = State::Lost;
        self.lost = Some(why);
        self.keys = Vec::new();
        self.hdr = Vec::new();
    }

    /// `hdr` holds `need` bytes: either the first 16 of a header (which say
    /// how long it is) or all of it.
    fn header(&mut self) {
        let h = &self.hdr;
        if h[..4] != MAGIC || be32(&h[4..8]) != VERSION {
            return self.lose("a packet header without multifd's magic and version");
        }
        let flags = be32(&h[8..12]);
        if self.need == 16 {
            self.need = if flags & FLAG_DEVICE_STATE != 0 {
                DEVICE_LEN
            } else {
                let alloc = be32(&h[12..16]) as usize;
                if alloc > MAX_PAGES {
                    return self.lose("a packet of more pages than multifd allocates");
                }
                if alloc > 0 {
                    self.alloc = alloc;
                }
                RAM_FIXED + 8 * self.alloc
            };
            return;
        }
        let (need, hdr) = (self.need, std::mem::take(&mut self.hdr));
        self.need = 16;
        self.state = State::Header;
        if flags & FLAG_DEVICE_STATE != 0 {
            let size = be32(&hdr[DEVICE_LEN - 4..DEVICE_LEN]);
            if size > 0 {
                self.state = State::Opaque(u64::from(size));
            }
        } else {
            let alloc = self.alloc;
            let normal = be32(&hdr[16..20]) as usize;
            let size = be32(&hdr[20..24]);
            let zero = be32(&hdr[32..36]) as usize;
            if normal + zero > alloc || need != RAM_FIXED + 8 * alloc {
                return self.lose("a packet listing more pages than it allocates");
            }
            if flags & FLAG_COMPRESSION_MASK != 0 {
                if size > 0 {
                    self.state = State::Opaque(u64::from(size));
                }
            } else if size as usize != normal * PAGE_SIZE {
                return self.lose("a packet whose payload is not its pages at 4 KiB each");
            } else if normal > 0 {
                let name = &hdr[64..RAM_FIXED];
                let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
                let block = match self.blocks.get(name) {
                    Some(&b) => b,
                    None => {
                        let b = (self.blocks.len() as u64).min(MAX_BLOCKS - 1);
                        if (self.blocks.len() as u64) < MAX_BLOCKS {
                            self.blocks.insert(name.to_vec(), b);
                        }
                        b
                    }
                };
                self.keys.clear();
                for i in 0..normal {
                    let at = RAM_FIXED + 8 * i;
                    let off = u64::from_be_bytes(hdr[at..at + 8].try_into().unwrap_or([0; 8]));
                    self.keys.push((self.key)(block, off));
                }
                self.next = 0;
                self.partial = 0;
                self.state = State::Pages;
            }
        }
        self.hdr = hdr;
        self.hdr.clear();
    }
}

#[inline]
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
