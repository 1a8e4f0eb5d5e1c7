//! Result codes. The numbers are ABI: they start at a fixed base (7000), are
//! grouped by area in ranges of 100, and a retired number is never reused.

use std::fmt;

use dwcp_core::transport::{FailReason, ReadError, SessionError, WriteError};

/// The result of every fallible `dwcp_*` function.
///
/// `DWCP_OK` is success and `DWCP_AGAIN` means "nothing to do yet" (not an
/// error); every other value is an error whose text `dwcp_result_str()` gives.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum dwcp_result {
    DWCP_OK = 7000,
    /// Nothing is ready yet (e.g. no incoming channel within the timeout).
    DWCP_AGAIN = 7001,

    // 7100..7199: arguments and handles
    /// A required pointer argument was NULL.
    DWCP_NULL_PARAMETER = 7100,
    /// The handle is not a live handle of the expected type (already freed,
    /// never returned by this library, or of the other kind).
    DWCP_INVALID_HANDLE = 7101,
    /// A string argument is not valid UTF-8.
    DWCP_INVALID_UTF8 = 7102,
    /// An argument is out of its allowed range.
    DWCP_INVALID_ARGUMENT = 7103,

    // 7200..7299: URIs
    /// The dwcp URI is malformed or has an invalid parameter.
    DWCP_INVALID_URI = 7200,

    // 7300..7399: connection set-up
    /// The host name did not resolve.
    DWCP_RESOLVE_FAILED = 7300,
    /// A TCP connection to the destination failed.
    DWCP_CONNECT_FAILED = 7301,
    /// The DWCP handshake with the peer failed or was refused.
    DWCP_HANDSHAKE_FAILED = 7302,
    /// The listening socket could not be created.
    DWCP_LISTEN_FAILED = 7303,

    // 7400..7499: sessions
    /// The migration session failed (peer gone, stream error, checksum).
    DWCP_SESSION_FAILED = 7400,
    /// The handle was cancelled with `dwcp_*_cancel()`.
    DWCP_CANCELLED = 7401,
    /// The session already carries its maximum number of channels.
    DWCP_TOO_MANY_CHANNELS = 7402,
    /// The session has already completed.
    DWCP_FINISHED = 7403,
    /// A local system call (socketpair, thread creation) failed.
    DWCP_IO = 7404,

    // 7900..7999: internal
    /// A bug in libdwcp: a Rust panic was caught at the API boundary.
    DWCP_PANIC = 7900,
}

use dwcp_result::*;

const ALL: &[dwcp_result] = &[
    DWCP_OK,
    DWCP_AGAIN,
    DWCP_NULL_PARAMETER,
    DWCP_INVALID_HANDLE,
    DWCP_INVALID_UTF8,
    DWCP_INVALID_ARGUMENT,
    DWCP_INVALID_URI,
    DWCP_RESOLVE_FAILED,
    DWCP_CONNECT_FAILED,
    DWCP_HANDSHAKE_FAILED,
    DWCP_LISTEN_FAILED,
    DWCP_SESSION_FAILED,
    DWCP_CANCELLED,
    DWCP_TOO_MANY_CHANNELS,
    DWCP_FINISHED,
    DWCP_IO,
    DWCP_PANIC,
];

impl dwcp_result {
    /// The code with this number, if there is one.
    pub fn from_u32(n: u32) -> Option<dwcp_result> {
        ALL.iter().copied().find(|r| *r as u32 == n)
    }

    /// A static, NUL-terminated description.
    pub fn as_cstr(self) -> &'static std::ffi::CStr {
        match self {
            DWCP_OK => c"success",
            DWCP_AGAIN => c"nothing ready yet",
            DWCP_NULL_PARAMETER => c"a required pointer argument was NULL",
            DWCP_INVALID_HANDLE => {
                c"not a live dwcp handle of this type (freed, foreign or wrong kind)"
            }
            DWCP_INVALID_UTF8 => c"a string argument is not valid UTF-8",
            DWCP_INVALID_ARGUMENT => c"an argument is out of range",
            DWCP_INVALID_URI => c"invalid dwcp URI",
            DWCP_RESOLVE_FAILED => c"the host name did not resolve",
            DWCP_CONNECT_FAILED => c"connecting to the destination failed",
            DWCP_HANDSHAKE_FAILED => c"the DWCP handshake failed or was refused",
            DWCP_LISTEN_FAILED => c"could not listen on the given address",
            DWCP_SESSION_FAILED => c"the migration session failed",
            DWCP_CANCELLED => c"cancelled",
            DWCP_TOO_MANY_CHANNELS => c"the session has its maximum number of channels",
            DWCP_FINISHED => c"the session has already completed",
            DWCP_IO => c"a local system call failed",
            DWCP_PANIC => c"internal error in libdwcp (a panic was caught)",
        }
    }
}

/// An error with its code and a message for humans (goes into the caller's
/// error buffer).
#[derive(Debug, Clone)]
pub struct Error {
    pub code: dwcp_result,
    pub message: String,
}

impl Error {
    pub fn new(code: dwcp_result, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The one place where the transport's errors become result codes.
impl Error {
    /// A failed session: `DWCP_CANCELLED` when it was cancelled on this
    /// side, `DWCP_SESSION_FAILED` otherwise (a peer's cancel included: it
    /// reaches us as [`FailReason::PeerAborted`]).
    pub fn failure(reason: &FailReason) -> Error {
        let code = match reason {
            FailReason::Cancelled(_) => DWCP_CANCELLED,
            _ => DWCP_SESSION_FAILED,
        };
        Error::new(code, reason.to_string())
    }

    /// Opening a session failed.
    pub fn connect(e: SessionError) -> Error {
        let code = match &e {
            SessionError::Connect { .. } => DWCP_CONNECT_FAILED,
            SessionError::Handshake { .. } | SessionError::Tls { .. } => DWCP_HANDSHAKE_FAILED,
            _ => DWCP_SESSION_FAILED,
        };
        Error::new(code, e.to_string())
    }

    /// Adding a channel to a session failed.
    pub fn channel(e: SessionError) -> Error {
        match e {
            SessionError::TooManyChannels(_) => Error::new(DWCP_TOO_MANY_CHANNELS, e.to_string()),
            SessionError::Finished => Error::new(DWCP_FINISHED, e.to_string()),
            _ => Error::new(DWCP_SESSION_FAILED, e.to_string()),
        }
    }
}

impl From<WriteError> for Error {
    /// A failed direct-channel write.
    fn from(e: WriteError) -> Error {
        match e {
            WriteError::Failed(reason) => Error::failure(&reason),
            WriteError::Shutdown => Error::new(DWCP_CANCELLED, e.to_string()),
            WriteError::Ended => Error::new(DWCP_FINISHED, e.to_string()),
        }
    }
}

impl From<ReadError> for Error {
    /// A failed direct-channel read (or nothing to read yet).
    fn from(e: ReadError) -> Error {
        match e {
            ReadError::WouldBlock => Error::new(DWCP_AGAIN, "nothing to read yet"),
            ReadError::Failed(reason) => Error::failure(&reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_cancel_and_only_that_is_cancelled() {
        let e = Error::failure(&FailReason::Cancelled("operator said so".into()));
        assert_eq!(e.code, DWCP_CANCELLED);
        assert_eq!(e.message, "cancelled: operator said so");
        let e = Error::failure(&FailReason::PeerAborted("cancelled: x".into()));
        assert_eq!(e.code, DWCP_SESSION_FAILED);
        assert_eq!(e.message, "peer aborted: cancelled: x");
        let e = Error::from(WriteError::Failed(FailReason::Cancelled("y".into())));
        assert_eq!(e.code, DWCP_CANCELLED);
        let e = Error::from(ReadError::Failed(FailReason::PeerClosed));
        assert_eq!(e.code, DWCP_SESSION_FAILED);
        assert_eq!(Error::from(WriteError::Shutdown).code, DWCP_CANCELLED);
        assert_eq!(Error::from(WriteError::Ended).code, DWCP_FINISHED);
        assert_eq!(Error::from(ReadError::WouldBlock).code, DWCP_AGAIN);
    }

    #[test]
    fn codes_round_trip_and_have_text() {
        for r in ALL {
            assert_eq!(dwcp_result::from_u32(*r as u32), Some(*r));
            assert!(!r.as_cstr().to_bytes().is_empty());
        }
        assert_eq!(dwcp_result::from_u32(0), None);
        assert_eq!(dwcp_result::from_u32(7002), None);
    }
}
