//! `dwcp_consensus::net::read_frame`: raft peer frames (header, cap, CRC,
//! protobuf payload), a stream of them. Byte 0 is a mode: bit 0 wraps the
//! rest as the payload of one well-formed frame (magic, version, kind, this
//! cluster's id, length, CRC) so the protobuf decoder is reached; bit 1 uses
//! the default 64 MiB cap instead of 4 KiB.
#![no_main]

use dwcp_consensus::net::{
    encode_frame, read_frame, FrameError, DEFAULT_MAX_FRAME, FRAME_MAGIC, FRAME_VERSION, KIND_RAFT,
};
use libfuzzer_sys::fuzz_target;

const CLUSTER: u64 = 0x5eed_cafe;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let buf = if mode & 1 != 0 {
        let mut b = Vec::with_capacity(rest.len() + 24);
        b.extend_from_slice(&FRAME_MAGIC);
        b.extend_from_slice(&FRAME_VERSION.to_le_bytes());
        b.extend_from_slice(&KIND_RAFT.to_le_bytes());
        b.extend_from_slice(&CLUSTER.to_le_bytes());
        b.extend_from_slice(&(rest.len() as u32).to_le_bytes());
        b.extend_from_slice(rest);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    } else {
        rest.to_vec()
    };
    let max = if mode & 2 != 0 {
        DEFAULT_MAX_FRAME
    } else {
        4096
    };
    let mut r = &buf[..];
    for _ in 0..16 {
        match read_frame(&mut r, CLUSTER, max) {
            Ok(m) => {
                // A message we accepted encodes to a frame we accept.
                let mut out = Vec::new();
                encode_frame(CLUSTER, &m, &mut out);
                read_frame(&mut &out[..], CLUSTER, DEFAULT_MAX_FRAME)
                    .expect("re-encoded message reads back");
            }
            Err(FrameError::Decode(_)) | Err(FrameError::WrongNode { .. }) => {}
            Err(_) => break,
        }
    }
});
