//! The panic boundary: every exported function runs its body through
//! [`boundary`], so a panic in libdwcp becomes `DWCP_PANIC` instead of
//! unwinding into (and aborting) QEMU or libvirtd.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::dwcp_result;

#[cfg(panic = "abort")]
compile_error!(
    "dwcp-ffi needs panic = \"unwind\": its panic boundary turns panics into DWCP_PANIC"
);

/// Runs `f`, turning a panic into `DWCP_PANIC`.
pub(crate) fn boundary(f: impl FnOnce() -> dwcp_result) -> dwcp_result {
    // AssertUnwindSafe: after a panic the only state left behind is inside
    // the handle the panic happened in; the caller gets DWCP_PANIC and should
    // cancel and free it.
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(dwcp_result::DWCP_PANIC)
}

/// Runs `f`, turning a panic into `fallback` (for functions that do not
/// return a result code).
pub(crate) fn boundary_or<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_result_code() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        assert_eq!(boundary(|| panic!("boom")), dwcp_result::DWCP_PANIC);
        assert_eq!(boundary_or(7, || panic!("boom")), 7);
        std::panic::set_hook(prev);
        assert_eq!(boundary(|| dwcp_result::DWCP_OK), dwcp_result::DWCP_OK);
    }
}
