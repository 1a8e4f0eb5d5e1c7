//! libdwcp: the C ABI of DWCP, so that QEMU (`migrate dwcp:HOST:PORT`) moves
//! a migration over DWCP's multi-stream transport without an agent process.
//!
//! QEMU gets ordinary file descriptors: every QEMU connection (the main
//! migration channel, each multifd channel; the return path shares the main
//! one) is one end of a socketpair whose other end libdwcp relays through
//! the session's TCP streams. *Direct* channels skip that relay: on the
//! source (`dwcp_outgoing_channel_direct()`) QEMU's writes go straight in
//! with `dwcp_channel_writev()`; on the destination
//! (`dwcp_incoming_next_channel_direct()`) QEMU reads straight from the
//! reorder buffer with `dwcp_channel_readv()`, waiting on
//! `dwcp_channel_ready_fd()`. Their socketpair then carries only the other
//! direction (the return path).
//!
//! ```text
//! source QEMU ──writev──► libdwcp (dwcp_outgoing) ══ N TCP streams ══► libdwcp (dwcp_incoming) ──readv──► destination QEMU
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

use std::ffi::{c_char, c_int, c_void};
use std::time::Duration;

mod channel;
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

/// One direct channel: the sending half of an outgoing channel
/// (`dwcp_outgoing_channel_direct()`), or the receiving half of an incoming
/// one (`dwcp_incoming_next_channel_direct()`). Opaque.
#[derive(Debug)]
pub struct dwcp_channel {
    _private: [u8; 0],
}

/// One buffer of a vectored write or read: `len` bytes at `base` (for a
/// read, `base` must point to writable memory). Same layout as POSIX
/// `struct iovec` on Linux (`void *iov_base; size_t iov_len;`), so an
/// array of those may be passed as an array of these.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_iovec {
    pub base: *const c_void,
    pub len: usize,
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

/// Opens the next channel of the migration like `dwcp_outgoing_channel()`,
/// but its bytes are handed to libdwcp with `dwcp_channel_writev()` instead
/// of being written to a socket (one copy and one relay thread less per
/// channel). `*fd` is still a connected stream socket, owned by the caller
/// (close-on-exec set): it carries only what the peer sends back on this
/// channel (QEMU's return path), sees end of file when the session
/// completes; do not write to it (nothing reads it). `*ch` is a new handle
/// owned by the caller: `dwcp_channel_free()` ends the channel's stream.
///
/// Errors as for `dwcp_outgoing_channel()`; `*fd` and `*ch` are then
/// untouched. NULL `h`/`fd`/`ch` gives `DWCP_NULL_PARAMETER`, a freed `h`
/// `DWCP_INVALID_HANDLE`. Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_outgoing_channel_direct(
    h: *const dwcp_outgoing,
    fd: *mut c_int,
    ch: *mut *mut dwcp_channel,
    err: *mut c_char,
    err_len: usize,
) -> dwcp_result {
    run(err, err_len, || {
        ffi::check_out(fd, "fd")?;
        ffi::check_out(ch, "ch")?;
        let o = ffi::outgoing(h)?;
        let (sock, w) = o.channel_direct()?;
        ffi::write_out(ch, ffi::new_channel(channel::Chan::Writer(w)));
        ffi::give_fd(sock, fd);
        Ok(())
    })
}

/// Sends the `iovcnt` buffers of `iov`, in order, as the channel's next
/// bytes, and stores their total length in `*written` (NULL allowed).
/// **Blocks** while the peer's flow-control credit or the session's
/// in-flight budget is used up (as a write to a full socket would); returns
/// once every byte is queued for the TCP streams, after which the caller may
/// reuse the buffers. A write is all or nothing for the caller: on error the
/// channel is unusable (part may have been sent).
///
/// `iov` (may be NULL when `iovcnt` is 0) and the bytes it points to are
/// borrowed for the call and must not change during it; an entry with
/// `len` 0 may have a NULL `base`. Writes to one channel must not overlap
/// in time (one writer at a time, like a socket); different channels may
/// be written concurrently from different threads.
///
/// Errors: `DWCP_SESSION_FAILED`, `DWCP_CANCELLED` (session cancelled, or
/// `dwcp_channel_shutdown()`), `DWCP_FINISHED` (after the stream ended),
/// `DWCP_NULL_PARAMETER` (NULL `ch`, or a NULL `iov`/`base` with a length),
/// `DWCP_INVALID_ARGUMENT` (lengths adding up past `SSIZE_MAX`, or a
/// receiving channel), `DWCP_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn dwcp_channel_writev(
    ch: *const dwcp_channel,
    iov: *const dwcp_iovec,
    iovcnt: usize,
    written: *mut usize,
    err: *mut c_char,
    err_len: usize,
) -> dwcp_result {
    run(err, err_len, || {
        let w = ffi::channel(ch)?;
        let bufs = ffi::io_slices(iov, iovcnt)?;
        let n = w.writev(&bufs)?;
        if !written.is_null() {
            ffi::write_out(written, n);
        }
        Ok(())
    })
}

/// `dwcp_channel_readv()` flag: copy the bytes but leave them to be read
/// again (like `MSG_PEEK`). A peek may return fewer bytes than asked while
/// the rest is on its way; peek again.
pub const DWCP_READ_PEEK: u32 = 1;
/// `dwcp_channel_readv()` flag: return `DWCP_AGAIN` instead of waiting when
/// nothing is there yet (like `MSG_DONTWAIT`).
pub const DWCP_READ_NONBLOCK: u32 = 2;

/// Reads the receiving channel's next bytes into the `iovcnt` buffers of
/// `iov`, in order, and stores how many in `*nread`: at least one, or 0 at
/// the end of the stream (the source ended the channel) or after
/// `dwcp_channel_shutdown()`. Without `DWCP_READ_NONBLOCK`, **blocks** until
/// there is a byte (as a read from a socket would); with it, returns
/// `DWCP_AGAIN` (`*nread` untouched) when there is none yet: wait for
/// `dwcp_channel_ready_fd()` to be readable, then read again. Bytes read
/// are credited back to the source. `flags` is 0 or a combination of
/// `DWCP_READ_PEEK` and `DWCP_READ_NONBLOCK`.
///
/// `iov` (may be NULL when `iovcnt` is 0) is borrowed for the call: its
/// buffers must be writable, must not overlap and nobody else may use them
/// during it; an entry with `len` 0 may have a NULL `base`. Reads on one
/// channel are serialised; different channels may be read concurrently
/// from different threads.
///
/// Errors: `DWCP_SESSION_FAILED` (the migration failed: the message says
/// why), `DWCP_CANCELLED`, `DWCP_NULL_PARAMETER` (NULL `ch`/`nread`, or a
/// NULL `iov`/`base` with a length), `DWCP_INVALID_ARGUMENT` (unknown
/// flags, overlapping buffers, lengths past `SSIZE_MAX`, or a sending
/// channel), `DWCP_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn dwcp_channel_readv(
    ch: *const dwcp_channel,
    iov: *const dwcp_iovec,
    iovcnt: usize,
    flags: u32,
    nread: *mut usize,
    err: *mut c_char,
    err_len: usize,
) -> dwcp_result {
    run(err, err_len, || {
        ffi::check_out(nread, "nread")?;
        let c = ffi::channel(ch)?;
        if flags & !(DWCP_READ_PEEK | DWCP_READ_NONBLOCK) != 0 {
            return Err(Error::new(
                DWCP_INVALID_ARGUMENT,
                format!("unknown dwcp_channel_readv flags {flags:#x}"),
            ));
        }
        let mut bufs = ffi::io_slices_mut(iov, iovcnt)?;
        let n = c.readv(
            &mut bufs,
            flags & DWCP_READ_PEEK != 0,
            flags & DWCP_READ_NONBLOCK == 0,
        )?;
        ffi::write_out(nread, n);
        Ok(())
    })
}

/// Stores in `*fd` a descriptor of the receiving channel that is readable
/// whenever `dwcp_channel_readv()` may make progress (bytes, the end of the
/// stream, a failure or a shutdown), for a main loop or coroutine to wait
/// on (QEMU: `qio_channel_yield()`). It may be readable spuriously, never
/// misses a wake-up after a `DWCP_AGAIN`. Owned by the handle: do not read
/// or close it; valid until `dwcp_channel_free()`. A sending channel gives
/// `DWCP_INVALID_ARGUMENT`; NULL `ch`/`fd` `DWCP_NULL_PARAMETER`.
#[no_mangle]
pub extern "C" fn dwcp_channel_ready_fd(ch: *const dwcp_channel, fd: *mut c_int) -> dwcp_result {
    run(std::ptr::null_mut(), 0, || {
        ffi::check_out(fd, "fd")?;
        let c = ffi::channel(ch)?;
        ffi::write_out(fd, c.ready_fd()?);
        Ok(())
    })
}

/// Shuts the channel down like shutdown(2) on a socket (QEMU: yank,
/// `migrate_cancel`, the end of multifd). A sending channel: a
/// `dwcp_channel_writev()` blocked on it, and every later one, fail at once
/// with `DWCP_CANCELLED`, and the stream ends after the bytes already taken
/// (the peer reads end of file). A receiving channel: a
/// `dwcp_channel_readv()` blocked on it, and every later one, return end of
/// stream (0 bytes). To fail the migration on the peer too, cancel the
/// session. The handle stays live until `dwcp_channel_free()`. Twice is
/// harmless. Does not block. NULL `ch` gives `DWCP_NULL_PARAMETER`.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_channel_shutdown(ch: *const dwcp_channel) -> dwcp_result {
    run(std::ptr::null_mut(), 0, || {
        ffi::channel(ch)?.shutdown();
        Ok(())
    })
}

/// Releases the handle. A sending channel's stream ends after everything
/// written so far (the peer's QEMU reads end of file; nothing more after a
/// shutdown, which already ended it, or a session failure); if a
/// `dwcp_channel_writev()` on it is still running in another thread, the
/// stream ends when that call returns. A receiving channel freed with
/// bytes unread, or before bytes still on their way, fails the migration
/// (as closing a socket with data unread would); after its end of stream
/// it is simply released. Does not block. The session otherwise stays
/// alive. NULL is a no-op (`DWCP_OK`); a handle already
/// freed gives `DWCP_INVALID_HANDLE`. Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_channel_free(ch: *mut dwcp_channel) -> dwcp_result {
    panic::boundary(|| ffi::free_channel(ch))
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
        match o.failure() {
            None => {
                ffi::write_message(buf, len, "");
                Ok(())
            }
            Some(reason) => Err(Error::failure(&reason)),
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

/// Takes the next incoming channel as a *direct* channel: `*ch` becomes a
/// new receiving handle (free with `dwcp_channel_free()`) whose bytes are
/// read with `dwcp_channel_readv()` straight from libdwcp (no relay thread,
/// no socketpair copy), and `*fd` a connected stream socket, owned by the
/// caller (close-on-exec set), that carries only this side's return path:
/// write to it; reading it gives nothing until end of file when the session
/// completes. Order, `timeout_ms` and errors as for
/// `dwcp_incoming_next_channel()`; on error `*fd` and `*ch` are untouched.
/// NULL `h`/`fd`/`ch` gives `DWCP_NULL_PARAMETER`. Thread-safe.
#[no_mangle]
pub extern "C" fn dwcp_incoming_next_channel_direct(
    h: *const dwcp_incoming,
    timeout_ms: c_int,
    fd: *mut c_int,
    ch: *mut *mut dwcp_channel,
    err: *mut c_char,
    err_len: usize,
) -> dwcp_result {
    run(err, err_len, || {
        ffi::check_out(fd, "fd")?;
        ffi::check_out(ch, "ch")?;
        let i = ffi::incoming(h)?;
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        let (sock, reader) = i.next_channel_direct(timeout)?;
        ffi::write_out(ch, ffi::new_channel(channel::Chan::Reader(reader)));
        ffi::give_fd(sock, fd);
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
