//! Gives libdwcp.so a soname, so a system install can be versioned
//! (libdwcp.so.0 -> libdwcp.so.0.1.0) and QEMU records libdwcp.so.0.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libdwcp.so.0");
}
