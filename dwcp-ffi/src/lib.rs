//! libdwcp: the C ABI of DWCP, so that QEMU (`migrate dwcp:HOST:PORT`) moves
//! a migration over DWCP's multi-stream transport without an agent process.
//!
//! QEMU gets ordinary file descriptors: every QEMU connection (the main
//! migration channel, each multifd channel; the return path shares the main
//! one) is one end of a socketpair whose other end libdwcp relays through
//! the session's TCP streams. QEMU's QIOChannel code is reused unchanged.
//!
//! ```text
//! source QEMU ──fd──► libdwcp (dwcp_outgoing) ══ N TCP streams ══► libdwcp (dwcp_incoming) ──fd──► destination QEMU
//! ```
//!
//! Conventions (the header repeats them per function):
//! - Every function returns a `dwcp_result` (`DWCP_OK`, `DWCP_AGAIN` =
//!   nothing yet, or an error; `dwcp_result_str()` names it). None aborts:
//!   a panic inside becomes `DWCP_PANIC`.
//! - Functions taking `char *err, size_t err_len` write a NUL-terminated
//!   message there on failure (truncated to fit); `err` may be NULL.
//! - Handles are opaque; `*_free(NULL)` is a no-op, and passing a freed
//!   handle returns `DWCP_INVALID_HANDLE` (see src/ffi.rs for how).
//! - Every function may be called from any thread, concurrently.
//! - File descriptors returned are owned by the caller (close-on-exec set).
//!
//! Layout: `ffi` holds every pointer cast and ownership transfer; `panic` the
//! panic boundary; `error` the result codes; `uri`, `outgoing`, `incoming`,
//! `stats` are safe Rust over dwcp-core.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int};
use std::time::Duration;

mod error;
mod ffi;
mod incoming;
mod outgoing;
mod panic;
mod socketpair;
mod stats;
pub mod uri;

pub use error::dwcp_result;
use error::{dwcp_result::*, Error};
pub use stats::{dwcp_state, dwcp_stats};

/// An outgoing migration (source side). Opaque.
#[derive(Debug)]
pub struct dwcp_outgoing {
    _private: [u8; 0],
}

/// A listening incoming migration (destination side). Opaque.
#[derive(Debug)]
pub struct dwcp_incoming {
    _private: [u8; 0],
}

/// Runs `f` in the panic boundary; an error's message goes to `err`.
fn run(err: *mut c_char, err_len: usize, f: impl FnOnce() -> Result<(), Error>) -> dwcp_result {
    let mut message = None;
    let r = panic::boundary(|| match f() {
        Ok(()) => DWCP_OK,
        Err(e) => {
            message = Some(e.message);
            e.code
        }
    });
    if r == DWCP_PANIC {
        message = Some("internal error in libdwcp (a panic was caught; see stderr)".into());
    }
    if let Some(m) = message {
        ffi::write_message(err, err_len, &m);
    }
    r
}

/// The library version, e.g. `"0.1.0"`: a static NUL-terminated string (do
/// not free). Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_version() -> *const c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

/// A static NUL-terminated description of `result` (do not free); never NULL
/// (an unknown number gives `"unknown dwcp result code"`). Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_result_str(result: u32) -> *const c_char {
    panic::boundary_or(
        c"unknown dwcp result code".as_ptr(),
        || match dwcp_result::from_u32(result) {
            Some(r) => r.as_cstr().as_ptr(),
            None => c"unknown dwcp result code".as_ptr(),
        },
    )
}

/// Checks a dwcp URI (`dwcp:HOST:PORT[?KEY=VALUE&...]`) without connecting
/// or resolving. Returns `DWCP_OK`, or `DWCP_INVALID_URI` with a message
/// naming the problem in `err` (`err_len` bytes, may be NULL).
/// `uri`: borrowed for the call; NULL gives `DWCP_NULL_PARAMETER`.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_uri_parse(
    uri: *const c_char,
    err: *mut c_char,
    err_len: usize,
) -> dwcp_result {
    run(err, err_len, || {
        let uri = ffi::str_arg(uri, "uri")?;
        uri::DwcpUri::parse(uri)
            .map(|_| ())
            .map_err(|m| Error::new(DWCP_INVALID_URI, m))
    })
}

/// Starts an outgoing migration: resolves HOST, opens the URI's `streams`
/// TCP connections to a dwcp listener and handshakes. **Blocks** up to about
/// the URI's `connect-timeout` (default 10 s): call it off the main loop.
///
/// On success `*out` is a new handle owned by the caller (free it with
/// `dwcp_outgoing_free()`); on failure `*out` is NULL and `err` says why
/// (`DWCP_INVALID_URI`, `DWCP_RESOLVE_FAILED`, `DWCP_CONNECT_FAILED`,
/// `DWCP_HANDSHAKE_FAILED`). `uri` is borrowed for the call. NULL `uri` or
/// `out` gives `DWCP_NULL_PARAMETER`. Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_outgoing_new(
    uri: *const c_char,
    out: *mut *mut dwcp_outgoing,
    err: *mut c_char,
    err_len: usize,
) -> dwcp_result {
    run(err, err_len, || {
        ffi::check_out(out, "out")?;
        ffi::write_out(out, std::ptr::null_mut());
        let uri = ffi::str_arg(uri, "uri")?;
        let o = outgoing::Outgoing::connect(uri)?;
        ffi::write_out(out, ffi::new_outgoing(o));
        Ok(())
    })
}

/// Opens the next channel of the migration and stores in `*fd` a connected
/// stream socket for QEMU to write the channel to (and read its return path
/// from). Call once per QEMU connection, main channel first, then one per
/// multifd channel. The fd is owned by the caller (close it when done:
/// closing is the channel's end of stream); close-on-exec is set.
///
/// Errors: `DWCP_CANCELLED` after `dwcp_outgoing_cancel()`,
/// `DWCP_SESSION_FAILED`, `DWCP_TOO_MANY_CHANNELS`, `DWCP_FINISHED`; `*fd` is
/// then untouched. NULL `h`/`fd` gives `DWCP_NULL_PARAMETER`, a freed `h`
/// `DWCP_INVALID_HANDLE`. Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_outgoing_channel(
    h: *const dwcp_outgoing,
    fd: *mut c_int,
    err: *mut c_char,
    err_len: usize,
) -> dwcp_result {
    run(err, err_len, || {
        ffi::check_out(fd, "fd")?;
        let o = ffi::outgoing(h)?;
        ffi::give_fd(o.channel()?, fd);
        Ok(())
    })
}

/// Copies the session's current figures into `*out` (caller-owned storage).
/// Cheap; may be called at any time while the handle is live, from any
/// thread, also after cancel or failure. NULL `h`/`out` gives
/// `DWCP_NULL_PARAMETER`.
#[no_mangle]
pub extern "C" fn dwcp_outgoing_stats(
    h: *const dwcp_outgoing,
    out: *mut dwcp_stats,
) -> dwcp_result {
    run(std::ptr::null_mut(), 0, || {
        ffi::check_out(out, "out")?;
        let o = ffi::outgoing(h)?;
        ffi::write_out(out, dwcp_stats::from(&o.stats()));
        Ok(())
    })
}

/// Copies why the session failed into `buf` (`len` bytes, NUL-terminated,
/// truncated to fit). Returns `DWCP_OK` with an empty string while the
/// session has not failed, `DWCP_SESSION_FAILED` or `DWCP_CANCELLED` with
/// the reason once it has. NULL `buf` is allowed (nothing written).
#[no_mangle]
pub extern "C" fn dwcp_outgoing_error(
    h: *const dwcp_outgoing,
    buf: *mut c_char,
    len: usize,
) -> dwcp_result {
    run(buf, len, || {
        let o = ffi::outgoing(h)?;
        match o.stats().error {
            None => {
                ffi::write_message(buf, len, "");
                Ok(())
            }
            Some(e) if e.starts_with(outgoing::CANCEL_PREFIX) => Err(Error::new(DWCP_CANCELLED, e)),
            Some(e) => Err(Error::new(DWCP_SESSION_FAILED, e)),
        }
    })
}

/// Cancels the migration: the session fails at once, the peer is told,
/// every channel fd handed out sees its connection shut down. `reason` (may
/// be NULL) is borrowed for the call and appears in the peer's log and in
/// `dwcp_outgoing_error()`. The handle stays live (stats still readable;
/// `dwcp_outgoing_channel()` now gives `DWCP_CANCELLED`) until freed.
/// Cancelling twice is harmless. Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_outgoing_cancel(
    h: *const dwcp_outgoing,
    reason: *const c_char,
) -> dwcp_result {
    run(std::ptr::null_mut(), 0, || {
        let o = ffi::outgoing(h)?;
        let reason = ffi::opt_str_arg(reason, "reason")?.unwrap_or("by the caller");
        o.cancel(reason);
        Ok(())
    })
}

/// Releases the handle. A migration still in flight is *not* cancelled: it
/// keeps draining what QEMU wrote and ends on its own (call
/// `dwcp_outgoing_cancel()` first to stop it); a handle that never opened a
/// channel is aborted. NULL is a no-op (`DWCP_OK`); a handle already freed
/// gives `DWCP_INVALID_HANDLE` without touching memory. Does not block.
#[no_mangle]
pub extern "C" fn dwcp_outgoing_free(h: *mut dwcp_outgoing) -> dwcp_result {
    panic::boundary(|| ffi::free_outgoing(h))
}

/// Listens for incoming dwcp migrations on the URI's HOST:PORT (PORT 0
/// picks a free port, see `dwcp_incoming_port()`). Does not block: the bind
/// happens here (so a busy port fails now), accepting runs on a thread.
/// The URI's parameters set this side's options (codec of the return path,
/// workers, dedup); the source's `streams` wins.
///
/// On success `*out` is a new handle owned by the caller (free with
/// `dwcp_incoming_free()`); on failure `*out` is NULL and `err` says why
/// (`DWCP_INVALID_URI`, `DWCP_RESOLVE_FAILED`, `DWCP_LISTEN_FAILED`).
/// NULL `uri`/`out` gives `DWCP_NULL_PARAMETER`. Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_incoming_new(
    uri: *const c_char,
    out: *mut *mut dwcp_incoming,
    err: *mut c_char,
    err_len: usize,
) -> dwcp_result {
    run(err, err_len, || {
        ffi::check_out(out, "out")?;
        ffi::write_out(out, std::ptr::null_mut());
        let uri = ffi::str_arg(uri, "uri")?;
        let i = incoming::Incoming::listen(uri)?;
        ffi::write_out(out, ffi::new_incoming(i));
        Ok(())
    })
}

/// Stores the TCP port the handle listens on in `*port`. NULL arguments give
/// `DWCP_NULL_PARAMETER`. Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_incoming_port(h: *const dwcp_incoming, port: *mut u16) -> dwcp_result {
    run(std::ptr::null_mut(), 0, || {
        ffi::check_out(port, "port")?;
        let i = ffi::incoming(h)?;
        ffi::write_out(port, i.local_addr().port());
        Ok(())
    })
}

/// Stores in `*fd` a descriptor that is readable exactly while a channel is
/// waiting to be taken with `dwcp_incoming_next_channel()`, for a main loop
/// to watch (QEMU: `qemu_set_fd_handler`). The fd stays owned by the handle:
/// do not read it or close it; it is valid until `dwcp_incoming_free()`.
#[no_mangle]
pub extern "C" fn dwcp_incoming_notify_fd(h: *const dwcp_incoming, fd: *mut c_int) -> dwcp_result {
    run(std::ptr::null_mut(), 0, || {
        ffi::check_out(fd, "fd")?;
        let i = ffi::incoming(h)?;
        ffi::write_out(fd, i.notify_fd());
        Ok(())
    })
}

/// Takes the next incoming channel: `*fd` becomes a connected stream socket
/// carrying what the source QEMU wrote to the matching outgoing channel (and
/// taking this side's return path). The fd is owned by the caller;
/// close-on-exec is set. Channels come in the order their first data
/// arrived, which for QEMU need not be the source's order (QEMU tells main
/// and multifd channels apart by their first bytes).
///
/// `timeout_ms`: 0 polls, a negative value waits forever, otherwise waits
/// at most that long; `DWCP_AGAIN` (not an error) when nothing came.
/// `DWCP_CANCELLED` after `dwcp_incoming_cancel()`. NULL `h`/`fd` gives
/// `DWCP_NULL_PARAMETER`. Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_incoming_next_channel(
    h: *const dwcp_incoming,
    timeout_ms: c_int,
    fd: *mut c_int,
    err: *mut c_char,
    err_len: usize,
) -> dwcp_result {
    run(err, err_len, || {
        ffi::check_out(fd, "fd")?;
        let i = ffi::incoming(h)?;
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        ffi::give_fd(i.next_channel(timeout)?, fd);
        Ok(())
    })
}

/// Copies the figures of the most recent incoming session into `*out`
/// (`state` is `DWCP_STATE_LISTENING` and all counters 0 before the first
/// one). Same rules as `dwcp_outgoing_stats()`.
#[no_mangle]
pub extern "C" fn dwcp_incoming_stats(
    h: *const dwcp_incoming,
    out: *mut dwcp_stats,
) -> dwcp_result {
    run(std::ptr::null_mut(), 0, || {
        ffi::check_out(out, "out")?;
        let i = ffi::incoming(h)?;
        let s = i
            .stats()
            .map(|s| dwcp_stats::from(&s))
            .unwrap_or_else(dwcp_stats::listening);
        ffi::write_out(out, s);
        Ok(())
    })
}

/// Stops accepting, fails every session of this listener (the source sees
/// its migration fail) and closes channels not yet taken. The handle stays
/// live until freed; `dwcp_incoming_next_channel()` then gives
/// `DWCP_CANCELLED`. `reason` may be NULL. Cancelling twice is harmless.
#[no_mangle]
pub extern "C" fn dwcp_incoming_cancel(
    h: *const dwcp_incoming,
    reason: *const c_char,
) -> dwcp_result {
    run(std::ptr::null_mut(), 0, || {
        let i = ffi::incoming(h)?;
        let reason = ffi::opt_str_arg(reason, "reason")?.unwrap_or("by the caller");
        i.cancel(reason);
        Ok(())
    })
}

/// Stops listening and releases the handle; channels not yet taken are
/// closed. Sessions already running are *not* cancelled: they end on their
/// own. Blocks up to ~100 ms (joins the accept thread). NULL is a no-op
/// (`DWCP_OK`); a handle already freed gives `DWCP_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn dwcp_incoming_free(h: *mut dwcp_incoming) -> dwcp_result {
    panic::boundary(|| ffi::free_incoming(h))
}
