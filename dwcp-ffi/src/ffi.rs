//! Every pointer and every ownership transfer across the C boundary lives
//! here; the rest of the crate is safe Rust.
//!
//! Handles are never dereferenced. A handle pointer is a key into a registry
//! of live objects (`Arc`s): a lookup clones the `Arc` under a lock, `_free`
//! removes the entry. So a double free, a freed or foreign pointer, or a
//! handle of the wrong kind is reported as `DWCP_INVALID_HANDLE` instead of
//! touching freed memory, and a free racing another call on the same handle
//! only ends the object after that call returns. (A pointer freed and then
//! handed out again for a new object refers to the new object: the usual
//! limit of pointer handles.)

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::channel::Chan;
use crate::error::{dwcp_result, dwcp_result::*, Error};
use crate::incoming::Incoming;
use crate::outgoing::Outgoing;

enum Live {
    Outgoing(Arc<Outgoing>),
    Incoming(Arc<Incoming>),
    Channel(Arc<Chan>),
}

/// Live handles by address. The address is that of a 1-byte allocation
/// owned by the entry (`Box<u8>`), so keys are unique while live.
type Registry = HashMap<usize, (Box<u8>, Live)>;
static LIVE: Mutex<Option<Registry>> = Mutex::new(None);

fn registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut g = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

fn insert<T>(live: Live) -> *mut T {
    let key = Box::new(0u8);
    let addr = &*key as *const u8 as usize;
    registry(|m| m.insert(addr, (key, live)));
    addr as *mut T
}

/// Registers an outgoing migration and returns its C handle.
pub(crate) fn new_outgoing<T>(o: Outgoing) -> *mut T {
    insert(Live::Outgoing(Arc::new(o)))
}

/// Registers an incoming migration and returns its C handle.
pub(crate) fn new_incoming<T>(i: Incoming) -> *mut T {
    insert(Live::Incoming(Arc::new(i)))
}

/// Registers a direct channel and returns its C handle.
pub(crate) fn new_channel<T>(c: Chan) -> *mut T {
    insert(Live::Channel(Arc::new(c)))
}

pub(crate) fn channel<T>(h: *const T) -> Result<Arc<Chan>, Error> {
    if h.is_null() {
        return Err(Error::new(
            DWCP_NULL_PARAMETER,
            "the dwcp_channel handle is NULL",
        ));
    }
    registry(|m| match m.get(&(h as usize)) {
        Some((_, Live::Channel(c))) => Ok(c.clone()),
        _ => Err(not_live()),
    })
}

/// Removes a channel handle. NULL is a no-op (`DWCP_OK`).
pub(crate) fn free_channel<T>(h: *mut T) -> dwcp_result {
    free(h, |l| matches!(l, Live::Channel(_)))
}

/// Borrows the caller's array of `n` `dwcp_iovec`s as byte slices, for the
/// duration of a call. NULL `iov` is allowed only with `n == 0`, a NULL
/// `base` only with `len == 0`.
pub(crate) fn io_slices<'a>(
    iov: *const crate::dwcp_iovec,
    n: usize,
) -> Result<Vec<std::io::IoSlice<'a>>, Error> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if iov.is_null() {
        return Err(Error::new(
            DWCP_NULL_PARAMETER,
            "iov is NULL with iovcnt > 0",
        ));
    }
    // SAFETY: non-NULL (checked); the caller passes an array of `n`
    // initialised, aligned dwcp_iovec that stays valid and unchanged for
    // the call (documented on dwcp_channel_writev); we only read it.
    let entries = unsafe { std::slice::from_raw_parts(iov, n) };
    let mut total = 0usize;
    let mut out = Vec::with_capacity(n);
    for (i, e) in entries.iter().enumerate() {
        if e.len == 0 {
            continue;
        }
        if e.base.is_null() {
            return Err(Error::new(
                DWCP_NULL_PARAMETER,
                format!("iov[{i}].base is NULL with len {}", e.len),
            ));
        }
        total = total
            .checked_add(e.len)
            .filter(|t| *t <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::new(
                    DWCP_INVALID_ARGUMENT,
                    "the iov lengths add up past SSIZE_MAX",
                )
            })?;
        // SAFETY: base is non-NULL (checked) and, per the documented
        // contract, points to `len` readable bytes that stay valid and are
        // not written by anyone during the call; the total stays below
        // isize::MAX (checked), as from_raw_parts requires.
        let bytes = unsafe { std::slice::from_raw_parts(e.base.cast::<u8>(), e.len) };
        out.push(std::io::IoSlice::new(bytes));
    }
    Ok(out)
}

/// Borrows the caller's array of `n` `dwcp_iovec`s as writable byte
/// slices, for the duration of a call. Same rules as [`io_slices`]; the
/// buffers must also be writable and must not overlap (checked).
pub(crate) fn io_slices_mut<'a>(
    iov: *const crate::dwcp_iovec,
    n: usize,
) -> Result<Vec<std::io::IoSliceMut<'a>>, Error> {
    // Validates pointers and lengths the same way.
    let shared = io_slices(iov, n)?;
    let spans: Vec<(usize, usize)> = shared
        .iter()
        .map(|s| (s.as_ptr() as usize, s.len()))
        .collect();
    drop(shared);
    // QEMU reads into one buffer at a time: only sort (on this hot path)
    // when there is something that could overlap.
    if spans.len() > 1 {
        let mut sorted = spans.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(Error::new(DWCP_INVALID_ARGUMENT, "the iov buffers overlap"));
        }
    }
    Ok(spans
        .into_iter()
        .map(|(base, len)| {
            // SAFETY: each span is a non-NULL buffer of `len` bytes that
            // the caller lends us writable and untouched by anyone else for
            // the call (documented on dwcp_channel_readv); the spans do not
            // overlap (checked above), so the &mut slices never alias; the
            // total is below isize::MAX (checked by io_slices).
            let b = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
            std::io::IoSliceMut::new(b)
        })
        .collect())
}

fn not_live() -> Error {
    Error::new(
        DWCP_INVALID_HANDLE,
        "not a live dwcp handle of this kind (already freed?)",
    )
}

pub(crate) fn outgoing<T>(h: *const T) -> Result<Arc<Outgoing>, Error> {
    if h.is_null() {
        return Err(Error::new(
            DWCP_NULL_PARAMETER,
            "the dwcp_outgoing handle is NULL",
        ));
    }
    registry(|m| match m.get(&(h as usize)) {
        Some((_, Live::Outgoing(o))) => Ok(o.clone()),
        _ => Err(not_live()),
    })
}

pub(crate) fn incoming<T>(h: *const T) -> Result<Arc<Incoming>, Error> {
    if h.is_null() {
        return Err(Error::new(
            DWCP_NULL_PARAMETER,
            "the dwcp_incoming handle is NULL",
        ));
    }
    registry(|m| match m.get(&(h as usize)) {
        Some((_, Live::Incoming(i))) => Ok(i.clone()),
        _ => Err(not_live()),
    })
}

/// Removes an outgoing handle. NULL is a no-op (`DWCP_OK`).
pub(crate) fn free_outgoing<T>(h: *mut T) -> dwcp_result {
    free(h, |l| matches!(l, Live::Outgoing(_)))
}

/// Removes an incoming handle. NULL is a no-op (`DWCP_OK`).
pub(crate) fn free_incoming<T>(h: *mut T) -> dwcp_result {
    free(h, |l| matches!(l, Live::Incoming(_)))
}

fn free<T>(h: *mut T, kind: impl Fn(&Live) -> bool) -> dwcp_result {
    if h.is_null() {
        return DWCP_OK;
    }
    let removed = registry(|m| match m.get(&(h as usize)) {
        Some((_, l)) if kind(l) => m.remove(&(h as usize)),
        _ => None,
    });
    // Dropped outside the lock: dropping an Incoming joins its accept thread.
    match removed {
        Some(entry) => {
            drop(entry);
            DWCP_OK
        }
        None => DWCP_INVALID_HANDLE,
    }
}

/// Borrows a NUL-terminated UTF-8 string argument.
pub(crate) fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Error> {
    if p.is_null() {
        return Err(Error::new(DWCP_NULL_PARAMETER, format!("{what} is NULL")));
    }
    // SAFETY: the C caller passes NULL (handled above) or a pointer to a
    // NUL-terminated string that stays valid for this call (every function
    // taking a string documents this); we do not keep the borrow past it.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Error::new(DWCP_INVALID_UTF8, format!("{what} is not valid UTF-8")))
}

/// An optional string argument: NULL is `None`.
pub(crate) fn opt_str_arg<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Error> {
    if p.is_null() {
        Ok(None)
    } else {
        str_arg(p, what).map(Some)
    }
}

/// Checks an out-pointer before any work is done.
pub(crate) fn check_out<T>(p: *mut T, what: &str) -> Result<(), Error> {
    if p.is_null() {
        Err(Error::new(DWCP_NULL_PARAMETER, format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

/// Stores `v` through an out-pointer checked with [`check_out`].
pub(crate) fn write_out<T>(p: *mut T, v: T) {
    debug_assert!(!p.is_null());
    if p.is_null() {
        return;
    }
    // SAFETY: non-NULL (checked); the C caller passes a pointer to writable,
    // aligned storage for a T (documented per function). `write` does not
    // read or drop the old contents, which may be uninitialised.
    unsafe { p.write(v) }
}

/// Hands an fd's ownership to C.
pub(crate) fn give_fd(fd: OwnedFd, out: *mut c_int) {
    write_out(out, fd.into_raw_fd());
}

/// Copies `msg` into the caller's error buffer `buf` of `len` bytes,
/// truncated at a character boundary and always NUL-terminated. NULL `buf`
/// or `len == 0` means the caller wants no message.
pub(crate) fn write_message(buf: *mut c_char, len: usize, msg: &str) {
    if buf.is_null() || len == 0 {
        return;
    }
    let mut n = msg.len().min(len - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: the caller passes `buf` pointing to at least `len` writable
    // bytes (documented per function); we write n + 1 <= len bytes, and the
    // source (a Rust string) cannot overlap the caller's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
        buf.add(n).write(0);
    }
}
