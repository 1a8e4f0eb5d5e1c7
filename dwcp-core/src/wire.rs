//! The DWCP wire format: the session handshake and the frame header.
//!
//! Everything is little-endian and fixed-size, and every header carries a
//! CRC-32C, so a zeroed, truncated or garbled header is never taken for a valid
//! one (kind 0 is `Invalid`, and the CRC of zeros is not zero).
//!
//! ```text
//! initiator (source agent)                       responder (destination agent)
//!   | TCP connect, stream i of N                          |
//!   |-- Hello {magic, versions, session, i, N, name} ---->|  validates, checks the target
//!   |<------------- Reply {magic, version, status} -------|  (status != 0 => closed)
//!   |        ... once all N streams are in ...            |
//!   |== Frame{Data|Eof|Window|Ping|Abort} both ways =====>|
//! ```
//!
//! See `docs/protocol.md` for the field tables and the compatibility rules.

use std::io::{self, Read, Write};

use crate::codec::{CodecId, MAX_PLAN_LEN, MAX_RAW_LEN};

/// First four bytes of every hello and reply.
pub const MAGIC: [u8; 4] = *b"DWCP";
/// Oldest protocol version this build speaks.
pub const VERSION_MIN: u16 = 1;
/// Newest protocol version this build speaks. Version 2 added raw frames
/// (codec 4), version 3 raw frames without a payload checksum (codec 4 with
/// [`UNCHECKED`]); a session uses the lower of the two ends' newest versions.
pub const VERSION_MAX: u16 = 3;
/// First version with raw frames (codec 4).
pub const VERSION_RAW: u16 = 2;
/// First version with unchecked raw frames ([`UNCHECKED`]).
pub const VERSION_UNCHECKED: u16 = 3;
/// Flag in a raw data frame's codec byte: the payload carries no checksum
/// (`payload_crc` is 0), so the sender can write it straight from the
/// caller's buffers. TCP's checksum still covers it, as it covers QEMU's own
/// `tcp:` stream; the header keeps its CRC.
pub const UNCHECKED: u8 = 0x80;
/// Size of the fixed part of a hello (the name and a CRC follow).
pub const HELLO_FIXED_LEN: usize = 44;
/// Size of a reply.
pub const REPLY_LEN: usize = 24;
/// Size of a frame header.
pub const FRAME_HEADER_LEN: usize = 32;
/// Longest migration name (it names the UNIX sockets on both hosts).
pub const MAX_NAME_LEN: usize = 64;
/// Largest payload any frame may carry: a plan that did not compress, or an
/// lz4/zstd output of a plan, whose worst case is slightly larger.
pub const MAX_WIRE_LEN: usize = MAX_PLAN_LEN + MAX_PLAN_LEN / 128 + 1024;
/// Slack of [`max_plan_len`] for the smallest frames.
pub const PLAN_SLACK: u64 = 16;

/// Largest plan a Data frame of `len` raw bytes may carry: a receiver
/// refuses a longer one before reading its payload, so what it buffers stays
/// proportional to the raw bytes its window counts (a planner's plans stay
/// within `len + len / 400 + 8`).
pub fn max_plan_len(len: u64) -> u64 {
    (len + len / 64 + PLAN_SLACK).min(MAX_PLAN_LEN as u64)
}

/// Largest payload of a compressed (lz4, zstd) Data frame whose plan is
/// `plan_len` bytes: a sender compresses only when that shrinks the plan;
/// this leaves room for a codec's worst case.
pub fn max_compressed_len(plan_len: u64) -> u64 {
    (plan_len + plan_len / 128 + 1024).min(MAX_WIRE_LEN as u64)
}

/// Longest abort reason carried on the wire.
pub const MAX_ABORT_LEN: usize = 1024;
/// Most TCP streams one session may use (a hello's stream count).
pub const MAX_STREAMS: usize = 256;

/// Errors in what a peer sent. Each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:02x?} (expected \"DWCP\"): not a DWCP peer")]
    BadMagic([u8; 4]),
    #[error("no common protocol version: peer speaks {min}..={max}, we speak {VERSION_MIN}..={VERSION_MAX}")]
    Version { min: u16, max: u16 },
    #[error("{what} checksum mismatch (got {got:#010x}, computed {want:#010x})")]
    Checksum {
        what: &'static str,
        got: u32,
        want: u32,
    },
    #[error("invalid {field}: {value} ({allowed})")]
    Field {
        field: &'static str,
        value: u64,
        allowed: &'static str,
    },
    #[error("invalid migration name {0:?}: 1-64 characters of A-Z a-z 0-9 . _ -")]
    Name(String),
    #[error("peer refused the stream: {0}")]
    Refused(Status),
    /// One end speaks TLS and the other clear text (`--insecure`).
    #[error("{0}")]
    TlsMismatch(&'static str),
    /// The TLS layer under the hello failed (handshake, certificate).
    #[error("{0}")]
    Tls(String),
    #[error("truncated {what}: connection closed after {got} of {want} bytes")]
    Truncated {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("i/o error reading/writing {what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

/// What a stream is for. Only data streams exist in version 1; the field lets
/// later versions add control or RDMA side channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Data = 1,
}

/// First message on every TCP stream, from the initiator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    pub session: [u8; 16],
    pub stream_index: u16,
    pub stream_count: u16,
    pub role: Role,
    /// Per-channel flow-control window in raw bytes.
    pub window: u32,
    /// Dedup ring capacity per channel, in 4 KiB pages (both sides keep one).
    pub ring_pages: u32,
    /// Pages of the dedup spill file per channel the initiator asks for
    /// (bytes 40..44, zero in hellos before it existed: no spill).
    pub spill_pages: u32,
    /// Feature flags ([`FLAG_DELTA`]; byte 30, zero in hellos before it
    /// existed).
    pub flags: u8,
    /// Migration name: the destination agent connects to `<incoming-dir>/<name>.sock`.
    pub name: String,
}

/// Reply status codes. Numbers are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    BadVersion = 1,
    UnknownTarget = 2,
    SessionMismatch = 3,
    BadHello = 4,
    TooLarge = 5,
    Busy = 6,
    /// The destination was not told to expect a migration of this name (from
    /// this peer): no `expect`/`prepare` entry and no `--allow` rule matches.
    NotExpected = 7,
    /// The peer's certificate identity is not in the destination's
    /// `--allow-peer` list.
    PeerNotAllowed = 8,
    /// The session's streams (with the smallest window on every channel)
    /// need more memory than the destination's per-session budget
    /// (`--session-memory`).
    MemoryBudget = 9,
    /// The destination already runs (or sets up) its maximum of concurrent
    /// sessions (`--max-sessions`).
    MaxSessions = 10,
    /// The migration is gated by the cluster and the registry's intent for
    /// its guest names another member as the source: the peer's certificate
    /// does not name that member's host (clear text: the peer's address is
    /// not that member's).
    NotIntendedSource = 11,
}

impl Status {
    fn from_wire(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::BadVersion,
            2 => Status::UnknownTarget,
            3 => Status::SessionMismatch,
            4 => Status::BadHello,
            5 => Status::TooLarge,
            6 => Status::Busy,
            7 => Status::NotExpected,
            8 => Status::PeerNotAllowed,
            9 => Status::MemoryBudget,
            10 => Status::MaxSessions,
            11 => Status::NotIntendedSource,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::BadVersion => "no common protocol version",
            Status::UnknownTarget => {
                "no incoming QEMU socket for this migration name on the destination"
            }
            Status::SessionMismatch => {
                "stream does not match its session (count, name or settings differ)"
            }
            Status::BadHello => "malformed hello",
            Status::TooLarge => "window or dedup ring larger than the destination allows",
            Status::Busy => "destination has too many sessions being set up",
            Status::NotExpected => {
                "the destination was not told to expect this migration name from this peer \
                 (dwcp expect NAME, the libvirt hook's prepare, or an --allow rule)"
            }
            Status::PeerNotAllowed => {
                "the destination does not allow this peer's certificate identity (--allow-peer)"
            }
            Status::MemoryBudget => {
                "this many streams need more memory than the destination's per-session budget \
                 (--session-memory); use fewer streams or raise the destination's budget"
            }
            Status::MaxSessions => {
                "the destination already runs its maximum of concurrent sessions (--max-sessions)"
            }
            Status::NotIntendedSource => {
                "the cluster's registry names another host as the source of this guest's \
                 migration (the peer's certificate, or in clear text its address, is not \
                 that member's)"
            }
        })
    }
}

/// The responder's answer to a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub version: u16,
    pub status: Status,
    pub window: u32,
    pub ring_pages: u32,
    /// Pages of the dedup spill file per channel the responder grants
    /// (bytes 16..20, zero from responders before it existed: no spill).
    pub spill_pages: u32,
    /// Feature flags granted ([`FLAG_DELTA`]; byte 7, zero from
    /// responders before it existed).
    pub flags: u8,
}

/// Hello/reply flag: the initiator may send DELTA plan ops (codec), the
/// responder's rebuilder understands them.
pub const FLAG_DELTA: u8 = 0x01;

/// Hello/reply flag: re-migration ([`crate::codec::keep`]). The initiator
/// may send HAVE plan ops and reads HAVE frames; the responder may announce
/// a kept copy of the guest in HAVE frames.
pub const FLAG_KEEP: u8 = 0x02;

/// Hello/reply flag: the initiator may send [`CodecId::ZstdCtx`] frames
/// (compression with context across a channel's frames,
/// [`crate::codec::context`]); granted when the responder allows them.
pub const FLAG_CONTEXT: u8 = 0x04;

/// Hello/reply flag: the initiator may find the pages of QEMU's multifd
/// channels and send them as page ops, each such channel with a smaller
/// dedup ring announced by a RING plan op ([`crate::codec`]); granted by
/// responders that understand the op.
pub const FLAG_MULTIFD: u8 = 0x08;

/// Hello/reply flag: the initiator may send XREF plan ops, references to a
/// page another channel of the session holds in its spill file
/// ([`crate::codec::xref`]); granted by responders that resolve them.
pub const FLAG_XREF: u8 = 0x10;

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(WireError::Truncated {
                    what,
                    got,
                    want: buf.len(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(WireError::Io { what, source }),
        }
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !name.starts_with('.')
}

/// Checks a migration name (it becomes a socket file name on both hosts).
pub fn check_name(name: &str) -> Result<(), WireError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(WireError::Name(name.to_string()))
    }
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HELLO_FIXED_LEN + self.name.len() + 4);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version_min.to_le_bytes());
        b.extend_from_slice(&self.version_max.to_le_bytes());
        b.extend_from_slice(&self.session);
        b.extend_from_slice(&self.stream_index.to_le_bytes());
        b.extend_from_slice(&self.stream_count.to_le_bytes());
        b.push(self.role as u8);
        b.push(self.name.len() as u8);
        b.extend_from_slice(&[self.flags, 0]);
        b.extend_from_slice(&self.window.to_le_bytes());
        b.extend_from_slice(&self.ring_pages.to_le_bytes());
        b.extend_from_slice(&self.spill_pages.to_le_bytes());
        debug_assert_eq!(b.len(), HELLO_FIXED_LEN);
        b.extend_from_slice(self.name.as_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads and validates a hello. The caller bounds the time with a socket
    /// read timeout; memory is bounded by the fixed size and the name cap.
    pub fn read(r: &mut impl Read) -> Result<Hello, WireError> {
        let mut fixed = [0u8; HELLO_FIXED_LEN];
        read_exact_or(r, &mut fixed[..4], "hello")?;
        let magic: [u8; 4] = fixed[..4].try_into().expect("4 bytes");
        if magic[0] == 0x16 && magic[1] == 0x03 {
            return Err(WireError::TlsMismatch(
                "the peer is speaking TLS and this agent runs with --insecure (clear text): \
                 both ends must use TLS, or both --insecure",
            ));
        }
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        read_exact_or(r, &mut fixed[4..], "hello").map_err(|e| match e {
            WireError::Truncated { got, want, .. } => WireError::Truncated {
                what: "hello",
                got: got + 4,
                want: want + 4,
            },
            e => e,
        })?;
        let u16_at = |o: usize| u16::from_le_bytes([fixed[o], fixed[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(fixed[o..o + 4].try_into().expect("4 bytes"));
        let name_len = fixed[29] as usize;
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(WireError::Field {
                field: "hello name length",
                value: name_len as u64,
                allowed: "1..=64",
            });
        }
        let mut tail = vec![0u8; name_len + 4];
        read_exact_or(r, &mut tail, "hello name")?;
        let mut crc = crc32c::crc32c(&fixed);
        crc = crc32c::crc32c_append(crc, &tail[..name_len]);
        let got = u32::from_le_bytes(tail[name_len..].try_into().expect("4 bytes"));
        if got != crc {
            return Err(WireError::Checksum {
                what: "hello",
                got,
                want: crc,
            });
        }
        let (version_min, version_max) = (u16_at(4), u16_at(6));
        if version_min > version_max || version_max < VERSION_MIN || version_min > VERSION_MAX {
            return Err(WireError::Version {
                min: version_min,
                max: version_max,
            });
        }
        if fixed[28] != Role::Data as u8 {
            return Err(WireError::Field {
                field: "hello role",
                value: fixed[28] as u64,
                allowed: "1 (data)",
            });
        }
        let stream_count = u16_at(26);
        let stream_index = u16_at(24);
        if stream_count == 0 || stream_count > MAX_STREAMS as u16 {
            return Err(WireError::Field {
                field: "hello stream count",
                value: stream_count as u64,
                allowed: "1..=256",
            });
        }
        if stream_index >= stream_count {
            return Err(WireError::Field {
                field: "hello stream index",
                value: stream_index as u64,
                allowed: "below the stream count",
            });
        }
        let name = String::from_utf8_lossy(&tail[..name_len]).into_owned();
        check_name(&name)?;
        Ok(Hello {
            version_min,
            version_max,
            session: fixed[8..24].try_into().expect("16 bytes"),
            stream_index,
            stream_count,
            role: Role::Data,
            window: u32_at(32),
            ring_pages: u32_at(36),
            spill_pages: u32_at(40),
            flags: fixed[30],
            name,
        })
    }
}

impl Reply {
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = self.status as u8;
        b[7] = self.flags;
        b[8..12].copy_from_slice(&self.window.to_le_bytes());
        b[12..16].copy_from_slice(&self.ring_pages.to_le_bytes());
        b[16..20].copy_from_slice(&self.spill_pages.to_le_bytes());
        let crc = crc32c::crc32c(&b[..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn read(r: &mut impl Read) -> Result<Reply, WireError> {
        let mut b = [0u8; REPLY_LEN];
        read_exact_or(r, &mut b[..1], "reply")?;
        if b[0] == 0x15 || b[0] == 0x16 {
            // A TLS record (alert or handshake) where a clear-text reply was due.
            return Err(WireError::TlsMismatch(
                "the destination speaks TLS and this side runs with --insecure (clear text): \
                 both ends must use TLS, or both --insecure",
            ));
        }
        read_exact_or(r, &mut b[1..], "reply").map_err(|e| match e {
            WireError::Truncated { got, want, .. } => WireError::Truncated {
                what: "reply",
                got: got + 1,
                want: want + 1,
            },
            other => other,
        })?;
        let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let want = crc32c::crc32c(&b[..20]);
        let got = u32::from_le_bytes(b[20..24].try_into().expect("4 bytes"));
        if got != want {
            return Err(WireError::Checksum {
                what: "reply",
                got,
                want,
            });
        }
        let status = Status::from_wire(b[6]).ok_or(WireError::Field {
            field: "reply status",
            value: b[6] as u64,
            allowed: "0..=11",
        })?;
        Ok(Reply {
            version: u16::from_le_bytes([b[4], b[5]]),
            status,
            window: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            ring_pages: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
            spill_pages: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
            flags: b[7],
        })
    }
}

/// Frame kinds. 0 is never valid, so a zeroed header is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Migration bytes of one channel: `seq` orders them, the payload is a
    /// compressed plan (see `codec`).
    Data = 1,
    /// The channel's local socket reached end of file; `seq` is its place.
    Eof = 2,
    /// Flow-control credit: the receiver delivered `len` more bytes of `channel`.
    Window = 3,
    /// Keeps an idle stream alive; ignored.
    Ping = 4,
    /// The sender gave up; the payload is a UTF-8 reason.
    Abort = 5,
    /// Initiator only: every channel is finished on our side; `len` is the
    /// number of channels the session had. The responder completes once its
    /// side of each of them is finished too, then both close the streams.
    Close = 6,
    /// Responder only, with [`FLAG_KEEP`]: part of the list of pages the
    /// responder kept from an earlier migration of this guest. The payload
    /// is SHA-256 digests (32 bytes each), `seq` the index of the first,
    /// `len` the list's length; frames may arrive on any stream.
    Have = 7,
}

/// A frame header, 32 bytes on the wire:
/// `kind u8, codec u8, channel u16, len u32, seq u64, plan_len u32,
/// wire_len u32, payload_crc u32, header_crc u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: Kind,
    /// Codec of the payload (`Data` only; 0 otherwise).
    pub codec: u8,
    pub channel: u16,
    /// `Data`: raw bytes the frame rebuilds to. `Window`: credit bytes.
    pub len: u32,
    pub seq: u64,
    /// `Data`: bytes of the plan the payload decompresses to.
    pub plan_len: u32,
    /// Payload bytes that follow the header.
    pub wire_len: u32,
    pub payload_crc: u32,
}

impl FrameHeader {
    /// A `Data` frame of `channel` whose payload (`payload`, encoded with
    /// `codec`) rebuilds to `raw_len` bytes from a plan of `plan_len`.
    pub fn data(
        channel: u16,
        seq: u64,
        codec: CodecId,
        raw_len: u32,
        plan_len: u32,
        payload: &[u8],
    ) -> FrameHeader {
        FrameHeader {
            kind: Kind::Data,
            codec: codec as u8,
            channel,
            len: raw_len,
            seq,
            plan_len,
            wire_len: payload.len() as u32,
            payload_crc: crc32c::crc32c(payload),
        }
    }

    /// A raw `Data` frame of `len` bytes ([`CodecId::Raw`]) with the payload
    /// checksum `crc`, or without one ([`UNCHECKED`]) when None.
    pub fn raw(channel: u16, seq: u64, len: u32, crc: Option<u32>) -> FrameHeader {
        FrameHeader {
            kind: Kind::Data,
            codec: CodecId::Raw as u8 | if crc.is_some() { 0 } else { UNCHECKED },
            channel,
            len,
            seq,
            plan_len: len,
            wire_len: len,
            payload_crc: crc.unwrap_or(0),
        }
    }

    /// A payload-less frame of `kind`.
    fn control(kind: Kind, channel: u16, len: u32, seq: u64) -> FrameHeader {
        FrameHeader {
            kind,
            codec: 0,
            channel,
            len,
            seq,
            plan_len: 0,
            wire_len: 0,
            payload_crc: crc32c::crc32c(&[]),
        }
    }

    /// The end of `channel`'s stream, after its frame `seq - 1`.
    pub fn eof(channel: u16, seq: u64) -> FrameHeader {
        FrameHeader::control(Kind::Eof, channel, 0, seq)
    }

    /// `credit` more bytes of `channel` were delivered.
    pub fn window(channel: u16, credit: u32) -> FrameHeader {
        FrameHeader::control(Kind::Window, channel, credit, 0)
    }

    /// Keeps an idle stream alive.
    pub fn ping() -> FrameHeader {
        FrameHeader::control(Kind::Ping, 0, 0, 0)
    }

    /// Every one of the session's `channels` is finished on the initiator.
    pub fn close(channels: u32) -> FrameHeader {
        FrameHeader::control(Kind::Close, 0, channels, 0)
    }

    /// Hashes `first..` of an announcement of `total` kept pages
    /// (`payload`: 32-byte SHA-256 digests).
    pub fn have(total: u32, first: u64, payload: &[u8]) -> FrameHeader {
        FrameHeader {
            wire_len: payload.len() as u32,
            payload_crc: crc32c::crc32c(payload),
            ..FrameHeader::control(Kind::Have, 0, total, first)
        }
    }

    /// The sender gives up; `reason` (at most [`MAX_ABORT_LEN`] bytes) is
    /// the payload.
    pub fn abort(reason: &[u8]) -> FrameHeader {
        FrameHeader {
            wire_len: reason.len() as u32,
            payload_crc: crc32c::crc32c(reason),
            ..FrameHeader::control(Kind::Abort, 0, 0, 0)
        }
    }

    /// The payload's codec, without the [`UNCHECKED`] flag.
    pub fn codec_id(&self) -> Option<CodecId> {
        CodecId::from_wire(self.codec & !UNCHECKED)
    }

    /// Whether the payload carries a checksum (see [`UNCHECKED`]).
    pub fn checked(&self) -> bool {
        self.codec & UNCHECKED == 0
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.codec;
        b[2..4].copy_from_slice(&self.channel.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.plan_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.wire_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a header: checksum, kind, and every length
    /// against its cap, so the caller can allocate `wire_len` safely.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN], max_channels: u16) -> Result<FrameHeader, WireError> {
        let want = crc32c::crc32c(&b[..28]);
        let got = u32::from_le_bytes(b[28..32].try_into().expect("4 bytes"));
        if got != want {
            return Err(WireError::Checksum {
                what: "frame header",
                got,
                want,
            });
        }
        let kind = match b[0] {
            1 => Kind::Data,
            2 => Kind::Eof,
            3 => Kind::Window,
            4 => Kind::Ping,
            5 => Kind::Abort,
            6 => Kind::Close,
            7 => Kind::Have,
            k => {
                return Err(WireError::Field {
                    field: "frame kind",
                    value: k as u64,
                    allowed: "1..=7",
                })
            }
        };
        let h = FrameHeader {
            kind,
            codec: b[1],
            channel: u16::from_le_bytes([b[2], b[3]]),
            len: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            seq: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            plan_len: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
            wire_len: u32::from_le_bytes(b[20..24].try_into().expect("4 bytes")),
            payload_crc: u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
        };
        let field = |field, value: u64, allowed| {
            Err(WireError::Field {
                field,
                value,
                allowed,
            })
        };
        if matches!(kind, Kind::Data | Kind::Eof | Kind::Window) && h.channel >= max_channels {
            return field(
                "frame channel",
                h.channel as u64,
                "below the session's channel limit",
            );
        }
        match kind {
            Kind::Data => {
                let Some(codec) = h.codec_id() else {
                    return field(
                        "frame codec",
                        h.codec as u64,
                        "1 (none), 2 (lz4), 3 (zstd), 4 (raw), 132 (raw, unchecked)",
                    );
                };
                if !h.checked() && (codec != CodecId::Raw || h.payload_crc != 0) {
                    return field(
                        "unchecked frame",
                        h.codec as u64,
                        "a raw frame whose payload checksum is 0",
                    );
                }
                if h.len == 0 || h.len as usize > MAX_RAW_LEN {
                    return field("frame raw length", h.len as u64, "1..=1048576");
                }
                if h.plan_len == 0 || h.plan_len as usize > MAX_PLAN_LEN {
                    return field("frame plan length", h.plan_len as u64, "1..=MAX_PLAN_LEN");
                }
                if h.wire_len as usize > MAX_WIRE_LEN || h.wire_len == 0 {
                    return field("frame wire length", h.wire_len as u64, "1..=MAX_WIRE_LEN");
                }
                if codec == CodecId::Raw && (h.plan_len != h.len || h.wire_len != h.len) {
                    return field(
                        "raw frame plan/wire length",
                        h.wire_len as u64,
                        "equal to the raw length",
                    );
                }
                if h.plan_len as u64 > max_plan_len(h.len as u64) {
                    return field(
                        "frame plan length",
                        h.plan_len as u64,
                        "at most len + len/64 + 16 for the frame's raw length",
                    );
                }
                if matches!(codec, CodecId::Lz4 | CodecId::Zstd | CodecId::ZstdCtx)
                    && h.wire_len as u64 > max_compressed_len(h.plan_len as u64)
                {
                    return field(
                        "compressed frame wire length",
                        h.wire_len as u64,
                        "at most plan_len + plan_len/128 + 1024",
                    );
                }
                if codec == CodecId::None && h.wire_len != h.plan_len {
                    return field(
                        "uncompressed frame wire length",
                        h.wire_len as u64,
                        "equal to the plan length",
                    );
                }
            }
            Kind::Eof | Kind::Ping => {
                if h.len != 0 || h.plan_len != 0 || h.wire_len != 0 || h.codec != 0 {
                    return field(
                        "control frame lengths",
                        (h.len | h.plan_len | h.wire_len) as u64,
                        "0",
                    );
                }
            }
            Kind::Close => {
                if h.len > max_channels as u32 || h.plan_len != 0 || h.wire_len != 0 || h.codec != 0
                {
                    return field(
                        "close channel count",
                        h.len as u64,
                        "up to the session's channel limit, no payload",
                    );
                }
            }
            Kind::Window => {
                if h.len == 0 || h.plan_len != 0 || h.wire_len != 0 || h.codec != 0 {
                    return field("window credit", h.len as u64, "> 0 with no payload");
                }
            }
            Kind::Abort => {
                if h.wire_len as usize > MAX_ABORT_LEN || h.plan_len != 0 {
                    return field("abort reason length", h.wire_len as u64, "0..=1024");
                }
            }
            Kind::Have => {
                let max = crate::codec::keep::HAVE_CHUNK * 32;
                if h.wire_len == 0
                    || h.wire_len as u64 > max
                    || !h.wire_len.is_multiple_of(32)
                    || h.plan_len != 0
                    || h.codec != 0
                    || h.channel != 0
                {
                    return field(
                        "HAVE frame length",
                        h.wire_len as u64,
                        "1..=8192 whole 32-byte hashes, no plan, codec or channel",
                    );
                }
                if h.len == 0
                    || h.len as u64 > crate::codec::keep::MAX_KEEP_PAGES
                    || h.seq >= h.len as u64
                {
                    return field(
                        "HAVE announcement",
                        h.len as u64,
                        "1..=1048576 pages, the frame's first index below it",
                    );
                }
            }
        }
        Ok(h)
    }

    /// Reads one header. `Ok(None)` is a clean end of stream before a header.
    pub fn read(r: &mut impl Read, max_channels: u16) -> Result<Option<FrameHeader>, WireError> {
        let mut b = [0u8; FRAME_HEADER_LEN];
        let mut got = 0;
        while got < FRAME_HEADER_LEN {
            match r.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(WireError::Truncated {
                        what: "frame header",
                        got,
                        want: FRAME_HEADER_LEN,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(WireError::Io {
                        what: "frame header",
                        source,
                    })
                }
            }
        }
        FrameHeader::decode(&b, max_channels).map(Some)
    }
}

/// Reads a payload of `len` bytes into `buf` (resized) and checks its CRC
/// (unless the frame is [`UNCHECKED`]).
pub fn read_payload(
    r: &mut impl Read,
    h: &FrameHeader,
    buf: &mut Vec<u8>,
) -> Result<(), WireError> {
    let len = h.wire_len as usize;
    buf.clear();
    buf.reserve(len);
    // read_to_end fills the spare capacity without zeroing it first: one
    // pass less over every payload than resize + read_exact.
    let got = loop {
        match r.by_ref().take((len - buf.len()) as u64).read_to_end(buf) {
            Ok(_) => break buf.len(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(WireError::Io {
                    what: "frame payload",
                    source,
                })
            }
        }
    };
    if got < len {
        return Err(WireError::Truncated {
            what: "frame payload",
            got,
            want: len,
        });
    }
    if !h.checked() {
        return Ok(());
    }
    let want = crc32c::crc32c(buf);
    if want != h.payload_crc {
        return Err(WireError::Checksum {
            what: "frame payload",
            got: h.payload_crc,
            want,
        });
    }
    Ok(())
}

/// Writes a header and its payload in one call where possible.
pub fn write_frame(w: &mut impl Write, h: &FrameHeader, payload: &[u8]) -> io::Result<()> {
    write_frame_vectored(w, h, &[io::IoSlice::new(payload)])
}

/// [`write_frame`] with the payload in pieces (gathered by the kernel, not
/// copied first).
pub fn write_frame_vectored(
    w: &mut impl Write,
    h: &FrameHeader,
    payload: &[io::IoSlice<'_>],
) -> io::Result<()> {
    let head = h.encode();
    let mut bufs = Vec::with_capacity(payload.len() + 1);
    bufs.push(io::IoSlice::new(&head));
    bufs.extend(
        payload
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| io::IoSlice::new(p)),
    );
    let mut slices: &mut [io::IoSlice<'_>] = &mut bufs;
    let total: usize = slices.iter().map(|s| s.len()).sum();
    let mut written = 0;
    while written < total {
        let n = match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        written += n;
        io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
