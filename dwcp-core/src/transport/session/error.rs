//! Why a session could not start ([`SessionError`]) or did not finish
//! ([`FailReason`]): one typed reason, carried by the session's fail path,
//! [`SessionError::Failed`] and the direct channels' errors. Its `Display`
//! is the text logs, the peer's Abort frame and `dwcp stats` show.

use std::net::SocketAddr;
use std::time::Duration;

use crate::wire::WireError;

/// Why a session could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connecting stream {index} to {addr}: {source}")]
    Connect {
        index: usize,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake on stream {index} with {addr}: {source}")]
    Handshake {
        index: usize,
        addr: SocketAddr,
        source: WireError,
    },
    #[error("TLS on stream {index} with {addr}: {}", tls_text(source))]
    Tls {
        index: usize,
        addr: SocketAddr,
        source: Box<crate::tls::TlsError>,
    },
    #[error("migration failed: {0}")]
    Failed(FailReason),
    #[error("session already finished")]
    Finished,
    #[error("session has its maximum of {0} channels")]
    TooManyChannels(u16),
    /// A new channel would take the session past its memory budget.
    #[error("{0}")]
    MemoryBudget(String),
}

/// Why the destination refused a session before it started: it was not
/// told to expect the migration ([`crate::wire::Status::NotExpected`]), it
/// does not allow this source's certificate identity
/// ([`crate::wire::Status::PeerNotAllowed`]), the cluster's registry names
/// another host as the source of this gated migration
/// ([`crate::wire::Status::NotIntendedSource`]), it runs its maximum of
/// migrations or the session does not fit its memory budget, or the two
/// agents did not authenticate each other over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRefusal {
    NotExpected,
    PeerNotAllowed,
    NotIntendedSource,
    Tls,
    /// The destination runs its maximum of migrations at once
    /// ([`crate::wire::Status::MaxSessions`], `--max-sessions`).
    MaxSessions,
    /// The session's streams do not fit the destination's per-session
    /// memory budget ([`crate::wire::Status::MemoryBudget`], `--session-memory`).
    MemoryBudget,
}

impl SessionError {
    /// The destination's refusal (or the failed TLS authentication) that
    /// kept this session from starting, if that is why it failed.
    pub fn peer_refusal(&self) -> Option<PeerRefusal> {
        use crate::wire::Status;
        match self {
            SessionError::Handshake {
                source: WireError::Refused(Status::NotExpected),
                ..
            } => Some(PeerRefusal::NotExpected),
            SessionError::Handshake {
                source: WireError::Refused(Status::PeerNotAllowed),
                ..
            } => Some(PeerRefusal::PeerNotAllowed),
            SessionError::Handshake {
                source: WireError::Refused(Status::NotIntendedSource),
                ..
            } => Some(PeerRefusal::NotIntendedSource),
            SessionError::Tls { .. } => Some(PeerRefusal::Tls),
            SessionError::Handshake {
                source: WireError::Refused(Status::MaxSessions),
                ..
            } => Some(PeerRefusal::MaxSessions),
            SessionError::Handshake {
                source: WireError::Refused(Status::MemoryBudget),
                ..
            } => Some(PeerRefusal::MemoryBudget),
            _ => None,
        }
    }
}

fn tls_text(e: &crate::tls::TlsError) -> String {
    match e {
        crate::tls::TlsError::HandshakeIo { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            format!(
                "{e} (a destination running with --insecure, clear text, closes TLS \
                 connections at once: both ends must use TLS, or both --insecure)"
            )
        }
        _ => e.to_string(),
    }
}

/// Why a session failed. The first reason sticks ([`super::Session::failure`]);
/// its text goes to the peer in the Abort frame, which fails the peer's
/// session with [`FailReason::PeerAborted`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailReason {
    /// Cancelled by the embedder or the operator ([`super::Session::cancel`]).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The peer sent an Abort frame; its reason.
    #[error("peer aborted: {0}")]
    PeerAborted(String),
    /// No frame from the peer for the idle timeout.
    #[error("nothing from the peer for {0:?}")]
    PeerSilent(Duration),
    /// The peer closed its streams before the session completed.
    #[error("the peer closed its streams before the migration ended")]
    PeerClosed,
    /// Something went wrong on one stream (reading it, or a frame read from
    /// it).
    #[error("stream {index}: {error}")]
    Stream {
        index: usize,
        error: Box<FailReason>,
    },
    /// The peer broke the protocol (an invalid header, a frame out of place,
    /// credit or data beyond the window).
    #[error("{0}")]
    Protocol(String),
    /// A frame's payload failed its checks or did not decode (`seq` None:
    /// rebuilding the channel's bytes failed).
    #[error("{}", codec_text(*channel, *seq, error))]
    Codec {
        channel: u16,
        seq: Option<u64>,
        error: String,
    },
    /// Writing to a stream failed (`what`: "sending", "sending credit").
    #[error("{what} to the peer failed: {error}")]
    Send { what: &'static str, error: String },
    /// QEMU's side of a channel: connecting, writing, or closing it early.
    #[error("{}", qemu_text(*channel, error))]
    QemuIo { channel: Option<u16>, error: String },
    /// The cutover gate closed: QEMU never gets the end of the stream.
    #[error("cutover gate closed: {0}")]
    GateClosed(String),
    /// The cutover gate refused the session before it started.
    #[error("cutover gate: {0}")]
    GateRefused(String),
    /// What the peer sent would take the session past its memory budget
    /// (`session-memory`): a channel opened, or dedup rings filled, beyond it.
    #[error("{0}")]
    MemoryBudget(String),
    /// Failed from this side for a reason of its own
    /// ([`super::Session::abort`], an invalid configuration, a stuck queue).
    #[error("{0}")]
    Local(String),
    /// The session is down, with no reason recorded yet.
    #[error("session is shutting down")]
    ShuttingDown,
}

fn codec_text(channel: u16, seq: Option<u64>, error: &str) -> String {
    match seq {
        Some(seq) => format!("channel {channel} frame {seq}: {error}"),
        None => format!("channel {channel}: {error}"),
    }
}

fn qemu_text(channel: Option<u16>, error: &str) -> String {
    match channel {
        Some(c) => format!("channel {c}: {error}"),
        None => error.to_string(),
    }
}

impl FailReason {
    /// Whether the session was cancelled on this side.
    pub fn is_cancel(&self) -> bool {
        matches!(self, FailReason::Cancelled(_))
    }
}

impl From<String> for FailReason {
    fn from(reason: String) -> FailReason {
        FailReason::Local(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_the_ones_logs_and_tests_match() {
        let cases = [
            (FailReason::Cancelled("x".into()), "cancelled: x"),
            (FailReason::PeerAborted("y".into()), "peer aborted: y"),
            (
                FailReason::PeerSilent(Duration::from_secs(15)),
                "nothing from the peer for 15s",
            ),
            (
                FailReason::PeerClosed,
                "the peer closed its streams before the migration ended",
            ),
            (
                FailReason::Stream {
                    index: 2,
                    error: Box::new(FailReason::PeerSilent(Duration::from_secs(1))),
                },
                "stream 2: nothing from the peer for 1s",
            ),
            (
                FailReason::Codec {
                    channel: 1,
                    seq: Some(7),
                    error: "bad".into(),
                },
                "channel 1 frame 7: bad",
            ),
            (
                FailReason::Codec {
                    channel: 1,
                    seq: None,
                    error: "bad".into(),
                },
                "channel 1: bad",
            ),
            (
                FailReason::Send {
                    what: "sending",
                    error: "broken pipe".into(),
                },
                "sending to the peer failed: broken pipe",
            ),
            (
                FailReason::QemuIo {
                    channel: Some(3),
                    error: "writing to QEMU failed: e".into(),
                },
                "channel 3: writing to QEMU failed: e",
            ),
            (
                FailReason::GateClosed("no quorum".into()),
                "cutover gate closed: no quorum",
            ),
            (FailReason::GateRefused("r".into()), "cutover gate: r"),
            (FailReason::Local("z".into()), "z"),
            (FailReason::ShuttingDown, "session is shutting down"),
        ];
        for (r, text) in cases {
            assert_eq!(r.to_string(), text);
        }
        assert_eq!(
            SessionError::Failed(FailReason::PeerClosed).to_string(),
            "migration failed: the peer closed its streams before the migration ended"
        );
    }
}
