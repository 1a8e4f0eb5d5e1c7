//! `wire::FrameHeader::decode` with an arbitrary session channel limit, then
//! `FrameHeader::read` + `read_payload` over the whole input as a stream of
//! frames. Input: mode byte (bit 0 repairs the first header's CRC, bit 1 its
//! payload CRC), max_channels (u16 LE), then the stream.
#![no_main]

use dwcp_core::codec::{CodecId, MAX_PLAN_LEN, MAX_RAW_LEN};
use dwcp_core::wire::{
    read_payload, FrameHeader, Kind, FRAME_HEADER_LEN, MAX_ABORT_LEN, MAX_WIRE_LEN,
};
use libfuzzer_sys::fuzz_target;

fn check(h: &FrameHeader, max_channels: u16) {
    assert!(h.wire_len as usize <= MAX_WIRE_LEN);
    match h.kind {
        Kind::Data => {
            assert!(h.channel < max_channels);
            let codec = h.codec_id().expect("data frame has a codec");
            assert!(h.len >= 1 && h.len as usize <= MAX_RAW_LEN);
            assert!(h.plan_len >= 1 && h.plan_len as usize <= MAX_PLAN_LEN);
            assert!(h.wire_len >= 1);
            if !h.checked() {
                assert!(codec == CodecId::Raw && h.payload_crc == 0);
            }
        }
        Kind::Eof | Kind::Window => assert!(h.channel < max_channels && h.wire_len == 0),
        Kind::Ping | Kind::Close => assert_eq!(h.wire_len, 0),
        Kind::Abort => assert!(h.wire_len as usize <= MAX_ABORT_LEN),
        Kind::Have => {
            assert!(h.channel == 0 && h.wire_len >= 32 && h.wire_len % 32 == 0);
            assert!(h.seq < h.len as u64);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mode = data[0];
    let max_channels = u16::from_le_bytes([data[1], data[2]]);
    let mut buf = data[3..].to_vec();
    if buf.len() >= FRAME_HEADER_LEN {
        if mode & 2 != 0 {
            let wire_len = u32::from_le_bytes(buf[20..24].try_into().unwrap()) as usize;
            let end = FRAME_HEADER_LEN.saturating_add(wire_len).min(buf.len());
            let crc = crc32c::crc32c(&buf[FRAME_HEADER_LEN..end]);
            buf[24..28].copy_from_slice(&crc.to_le_bytes());
        }
        if mode & 1 != 0 {
            let crc = crc32c::crc32c(&buf[..28]);
            buf[28..32].copy_from_slice(&crc.to_le_bytes());
        }
        let head: [u8; FRAME_HEADER_LEN] = buf[..FRAME_HEADER_LEN].try_into().unwrap();
        if let Ok(h) = FrameHeader::decode(&head, max_channels) {
            check(&h, max_channels);
            assert_eq!(h.encode(), head, "a decoded header encodes to its bytes");
        }
    }
    let mut r = &buf[..];
    let mut payload = Vec::new();
    for _ in 0..64 {
        match FrameHeader::read(&mut r, max_channels) {
            Ok(Some(h)) => {
                check(&h, max_channels);
                if read_payload(&mut r, &h, &mut payload).is_err() {
                    break;
                }
                assert_eq!(payload.len(), h.wire_len as usize);
            }
            _ => break,
        }
    }
});
