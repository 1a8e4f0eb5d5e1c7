//! `wire::Reply::read`: the responder's answer, read by the source agent and
//! by libdwcp inside QEMU. Byte 0: bit 0 repairs the reply's CRC.
#![no_main]

use dwcp_core::wire::{Reply, REPLY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut buf = rest.to_vec();
    if mode & 1 != 0 && buf.len() >= REPLY_LEN {
        let crc = crc32c::crc32c(&buf[..20]);
        buf[20..24].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(r) = Reply::read(&mut &buf[..]) else {
        return;
    };
    let again = Reply::read(&mut &r.encode()[..]).expect("re-encoded reply reads back");
    assert_eq!(again, r);
});
