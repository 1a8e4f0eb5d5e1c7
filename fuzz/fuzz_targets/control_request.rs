//! The agent's control socket: one JSON request per line, parsed by its
//! `"op"` tag into the request enum (`agent::control::parse_request`).
#![no_main]

use dwcp_core::agent::control::parse_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The server reads lines of UTF-8 (read_line) and trims them.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_request(text.trim()) {
        Ok(op) => assert!(!op.is_empty()),
        Err(answer) => assert!(answer.starts_with("{\"")),
    }
});
