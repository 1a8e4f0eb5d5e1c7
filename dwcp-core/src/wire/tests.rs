use super::*;

fn hello() -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        session: [7; 16],
        stream_index: 2,
        stream_count: 8,
        role: Role::Data,
        window: 1 << 24,
        ring_pages: 1024,
        spill_pages: 0,
        flags: 0,
        name: "vm-1".into(),
    }
}

#[test]
fn hello_round_trip() {
    let h = hello();
    let b = h.encode();
    assert_eq!(Hello::read(&mut &b[..]).unwrap(), h);
}

#[test]
fn hello_rejects_garbage_magic_version_truncation_and_flips() {
    let err = Hello::read(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]).unwrap_err();
    assert!(matches!(err, WireError::BadMagic(_)), "{err}");
    assert!(err.to_string().contains("bad magic"));

    let mut h = hello();
    h.version_min = 7;
    h.version_max = 9;
    let err = Hello::read(&mut &h.encode()[..]).unwrap_err();
    assert!(
        matches!(err, WireError::Version { min: 7, max: 9 }),
        "{err}"
    );

    let b = hello().encode();
    for cut in [4, 10, HELLO_FIXED_LEN, b.len() - 1] {
        let err = Hello::read(&mut &b[..cut]).unwrap_err();
        assert!(
            matches!(err, WireError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
    for bit in 32..(b.len() * 8) {
        let mut c = b.clone();
        c[bit / 8] ^= 1 << (bit % 8);
        assert!(Hello::read(&mut &c[..]).is_err(), "bit {bit} flip accepted");
    }
    let mut bad = hello();
    bad.name = "../etc/passwd".into();
    assert!(matches!(
        Hello::read(&mut &bad.encode()[..]),
        Err(WireError::Name(_))
    ));
    let mut bad = hello();
    bad.stream_index = 8;
    assert!(Hello::read(&mut &bad.encode()[..]).is_err());
}

#[test]
fn reply_round_trip_and_flip() {
    let r = Reply {
        version: 1,
        status: Status::UnknownTarget,
        window: 5,
        ring_pages: 6,
        spill_pages: 0,
        flags: 0,
    };
    let b = r.encode();
    assert_eq!(Reply::read(&mut &b[..]).unwrap(), r);
    let mut c = b;
    c[9] ^= 4;
    assert!(Reply::read(&mut &c[..]).is_err());
}

#[test]
fn every_refusal_status_survives_the_reply_and_names_its_reason() {
    for status in [
        Status::NotExpected,
        Status::PeerNotAllowed,
        Status::NotIntendedSource,
    ] {
        let r = Reply {
            version: VERSION_MAX,
            status,
            window: 0,
            ring_pages: 0,
            spill_pages: 0,
            flags: 0,
        };
        assert_eq!(Reply::read(&mut &r.encode()[..]).unwrap().status, status);
    }
    assert_eq!(Status::NotIntendedSource as u8, 11);
    let e = WireError::Refused(Status::NotIntendedSource).to_string();
    assert!(e.contains("registry names another host"), "{e}");
}

fn data_header() -> FrameHeader {
    FrameHeader {
        kind: Kind::Data,
        codec: CodecId::Lz4 as u8,
        channel: 3,
        len: 65536,
        seq: 42,
        plan_len: 65600,
        wire_len: 30000,
        payload_crc: 0xdead_beef,
    }
}

#[test]
fn frame_header_round_trip_and_rejections() {
    let h = data_header();
    assert_eq!(FrameHeader::decode(&h.encode(), 16).unwrap(), h);
    let raw_frame = FrameHeader {
        codec: 4,
        plan_len: h.len,
        wire_len: h.len,
        ..h
    };
    assert_eq!(
        FrameHeader::decode(&raw_frame.encode(), 16).unwrap(),
        raw_frame
    );
    // A zeroed header is invalid.
    assert!(FrameHeader::decode(&[0; FRAME_HEADER_LEN], 16).is_err());
    // Every single-bit flip is caught.
    let b = h.encode();
    for bit in 0..(FRAME_HEADER_LEN * 8) {
        let mut c = b;
        c[bit / 8] ^= 1 << (bit % 8);
        assert!(FrameHeader::decode(&c, 16).is_err(), "bit {bit}");
    }
    // Out-of-range fields with a valid checksum.
    for bad in [
        FrameHeader { channel: 16, ..h },
        FrameHeader {
            len: (MAX_RAW_LEN + 1) as u32,
            ..h
        },
        FrameHeader { len: 0, ..h },
        FrameHeader {
            wire_len: u32::MAX,
            ..h
        },
        FrameHeader {
            plan_len: u32::MAX,
            ..h
        },
        FrameHeader { codec: 0, ..h },
        FrameHeader { codec: 9, ..h },
        FrameHeader {
            codec: 1,
            wire_len: 5,
            ..h
        },
        // Raw frames: plan and wire lengths must equal the raw length.
        FrameHeader {
            codec: 4,
            plan_len: h.len,
            wire_len: h.len - 1,
            ..h
        },
        FrameHeader {
            codec: 4,
            plan_len: h.len + 1,
            wire_len: h.len,
            ..h
        },
        FrameHeader {
            kind: Kind::Eof,
            ..h
        },
        FrameHeader {
            kind: Kind::Window,
            len: 0,
            plan_len: 0,
            wire_len: 0,
            codec: 0,
            ..h
        },
        FrameHeader {
            kind: Kind::Abort,
            wire_len: 5000,
            plan_len: 0,
            ..h
        },
    ] {
        assert!(FrameHeader::decode(&bad.encode(), 16).is_err(), "{bad:?}");
    }
    let mut raw = h.encode();
    raw[0] = 9;
    let crc = crc32c::crc32c(&raw[..28]);
    raw[28..].copy_from_slice(&crc.to_le_bytes());
    let err = FrameHeader::decode(&raw, 16).unwrap_err();
    assert!(err.to_string().contains("frame kind"), "{err}");
}

/// An unchecked frame is a raw frame with payload checksum 0, and its
/// payload is read without a check; the flag on any other codec, or
/// with a checksum, is refused by name.
#[test]
fn unchecked_raw_frames() {
    let h = data_header();
    let unchecked = FrameHeader {
        codec: CodecId::Raw as u8 | UNCHECKED,
        plan_len: h.len,
        wire_len: h.len,
        payload_crc: 0,
        ..h
    };
    let got = FrameHeader::decode(&unchecked.encode(), 16).unwrap();
    assert_eq!(got, unchecked);
    assert!(!got.checked() && got.codec_id() == Some(CodecId::Raw));
    let payload = vec![0x5a; h.len as usize];
    let mut buf = Vec::new();
    read_payload(&mut &payload[..], &got, &mut buf).unwrap();
    assert_eq!(buf, payload);
    // The same payload with the checked codec and checksum 0 fails.
    let checked = FrameHeader {
        codec: CodecId::Raw as u8,
        ..unchecked
    };
    let err = read_payload(&mut &payload[..], &checked, &mut buf).unwrap_err();
    assert!(matches!(err, WireError::Checksum { .. }), "{err}");
    for bad in [
        FrameHeader {
            payload_crc: 1,
            ..unchecked
        },
        FrameHeader {
            codec: CodecId::Lz4 as u8 | UNCHECKED,
            ..h
        },
    ] {
        let err = FrameHeader::decode(&bad.encode(), 16).unwrap_err();
        assert!(err.to_string().contains("unchecked frame"), "{err}");
    }
}

/// A frame written from pieces reads back as one payload.
#[test]
fn vectored_frame_write() {
    let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let h = FrameHeader {
        kind: Kind::Data,
        codec: CodecId::Raw as u8,
        channel: 1,
        len: payload.len() as u32,
        seq: 3,
        plan_len: payload.len() as u32,
        wire_len: payload.len() as u32,
        payload_crc: crc32c::crc32c(&payload),
    };
    let pieces = [
        io::IoSlice::new(&payload[..1]),
        io::IoSlice::new(&[]),
        io::IoSlice::new(&payload[1..7000]),
        io::IoSlice::new(&payload[7000..]),
    ];
    let mut out = Vec::new();
    write_frame_vectored(&mut out, &h, &pieces).unwrap();
    let mut r = &out[..];
    let got = FrameHeader::read(&mut r, 16).unwrap().unwrap();
    let mut buf = Vec::new();
    read_payload(&mut r, &got, &mut buf).unwrap();
    assert_eq!(buf, payload);
}

#[test]
fn payload_crc_checked() {
    let payload = b"hello world".to_vec();
    let h = FrameHeader {
        kind: Kind::Abort,
        codec: 0,
        channel: 0,
        len: 0,
        seq: 0,
        plan_len: 0,
        wire_len: payload.len() as u32,
        payload_crc: crc32c::crc32c(&payload),
    };
    let mut out = Vec::new();
    write_frame(&mut out, &h, &payload).unwrap();
    let mut r = &out[..];
    let got = FrameHeader::read(&mut r, 1).unwrap().unwrap();
    let mut buf = Vec::new();
    read_payload(&mut r, &got, &mut buf).unwrap();
    assert_eq!(buf, payload);
    out[FRAME_HEADER_LEN + 2] ^= 1;
    let mut r = &out[..];
    let got = FrameHeader::read(&mut r, 1).unwrap().unwrap();
    assert!(matches!(
        read_payload(&mut r, &got, &mut buf),
        Err(WireError::Checksum { .. })
    ));
}

/// The spill sizes ride in bytes that earlier versions sent as zero: a
/// hello or reply from before them reads as "no spill", and the new values
/// round-trip.
#[test]
fn spill_pages_travel_in_the_formerly_reserved_bytes() {
    let mut h = hello();
    h.spill_pages = 262_144;
    let b = h.encode();
    assert_eq!(b.len(), HELLO_FIXED_LEN + h.name.len() + 4);
    assert_eq!(&b[40..44], &262_144u32.to_le_bytes());
    assert_eq!(Hello::read(&mut &b[..]).unwrap(), h);
    assert_eq!(
        Hello::read(&mut &hello().encode()[..]).unwrap().spill_pages,
        0
    );
    let r = Reply {
        version: 3,
        status: Status::Ok,
        window: 5,
        ring_pages: 6,
        spill_pages: 7,
        flags: 0,
    };
    let b = r.encode();
    assert_eq!(&b[16..20], &7u32.to_le_bytes());
    assert_eq!(Reply::read(&mut &b[..]).unwrap(), r);
}

/// The delta flag rides in a byte earlier versions sent as zero (hello byte
/// 30, reply byte 7): an old peer's hello or reply reads as "no deltas".
#[test]
fn delta_flag_travels_in_the_formerly_reserved_bytes() {
    let mut h = hello();
    h.flags = crate::wire::FLAG_DELTA;
    let b = h.encode();
    assert_eq!(b[30], crate::wire::FLAG_DELTA);
    assert_eq!(Hello::read(&mut &b[..]).unwrap(), h);
    assert_eq!(Hello::read(&mut &hello().encode()[..]).unwrap().flags, 0);
    let r = Reply {
        version: 3,
        status: Status::Ok,
        window: 5,
        ring_pages: 6,
        spill_pages: 7,
        flags: crate::wire::FLAG_DELTA,
    };
    let b = r.encode();
    assert_eq!(b[7], crate::wire::FLAG_DELTA);
    assert_eq!(Reply::read(&mut &b[..]).unwrap(), r);
    let old = Reply { flags: 0, ..r }.encode();
    assert_eq!(Reply::read(&mut &old[..]).unwrap().flags, 0);
}

#[test]
fn have_frames_are_checked_before_their_payload_is_read() {
    use crate::codec::keep::{HAVE_CHUNK, MAX_KEEP_PAGES};
    let payload = vec![7u8; 64];
    let h = FrameHeader::have(100, 0, &payload);
    assert_eq!(h.kind, Kind::Have);
    assert_eq!(FrameHeader::decode(&h.encode(), 16).unwrap(), h);
    let bad = |h: FrameHeader| {
        FrameHeader::decode(&h.encode(), 16)
            .unwrap_err()
            .to_string()
    };
    // Not whole hashes, none, too many in one frame.
    assert!(bad(FrameHeader { wire_len: 33, ..h }).contains("HAVE frame length"));
    assert!(bad(FrameHeader { wire_len: 0, ..h }).contains("HAVE frame length"));
    let too_long = (HAVE_CHUNK * 32 + 32) as u32;
    assert!(bad(FrameHeader {
        wire_len: too_long,
        ..h
    })
    .contains("HAVE frame length"));
    // A channel, a codec or a plan length where none belongs.
    assert!(bad(FrameHeader { channel: 1, ..h }).contains("HAVE frame length"));
    assert!(bad(FrameHeader { codec: 2, ..h }).contains("HAVE frame length"));
    // An announcement of nothing, or past the bound, or a first index past it.
    assert!(bad(FrameHeader { len: 0, ..h }).contains("HAVE announcement"));
    let over = MAX_KEEP_PAGES as u32 + 1;
    assert!(bad(FrameHeader { len: over, ..h }).contains("HAVE announcement"));
    assert!(bad(FrameHeader { seq: 100, ..h }).contains("HAVE announcement"));
    // The flag travels in the hello's and the reply's flag bytes.
    let mut hh = hello();
    hh.flags = crate::wire::FLAG_DELTA | crate::wire::FLAG_KEEP;
    assert_eq!(Hello::read(&mut &hh.encode()[..]).unwrap().flags, 3);
}
