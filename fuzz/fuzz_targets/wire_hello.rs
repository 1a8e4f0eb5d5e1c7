//! `wire::Hello::read`: the first bytes a destination agent reads from any
//! TCP peer. Byte 0 of the input is a mode: bit 0 repairs the hello's CRC so
//! the checks behind it (versions, role, counts, name) are reached.
#![no_main]

use dwcp_core::wire::{check_name, Hello, HELLO_FIXED_LEN, MAX_NAME_LEN, VERSION_MAX, VERSION_MIN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut buf = rest.to_vec();
    if mode & 1 != 0 && buf.len() >= HELLO_FIXED_LEN {
        let end = HELLO_FIXED_LEN + buf[29] as usize;
        if buf.len() >= end + 4 {
            let crc = crc32c::crc32c(&buf[..end]);
            buf[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let Ok(h) = Hello::read(&mut &buf[..]) else {
        return;
    };
    assert!(h.version_min <= h.version_max);
    assert!(h.version_max >= VERSION_MIN && h.version_min <= VERSION_MAX);
    assert!(h.stream_index < h.stream_count);
    assert!(!h.name.is_empty() && h.name.len() <= MAX_NAME_LEN);
    assert!(check_name(&h.name).is_ok());
    // What was accepted encodes to a hello that reads back the same.
    let again = Hello::read(&mut &h.encode()[..]).expect("re-encoded hello reads back");
    assert_eq!(again, h);
});
