#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Small valid inputs in each target's input layout (see the comment at the top
of each fuzz_targets/*.rs): handshakes and frames as the encoders in
dwcp-core/src/wire.rs write them, raft frames, control lines, URIs, trace
lines and configuration files from the tests and packaging/. Re-running it
rewrites the seed-* files only (what fuzzing added stays).
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_T = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    _T.append(c)


def crc32c(b):
    c = 0xFFFFFFFF
    for x in b:
        c = _T[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def hello(vmin=1, vmax=3, idx=0, count=4, role=1, name=b"vm-1", window=1 << 24, ring=1024):
    b = b"DWCP" + struct.pack("<HH", vmin, vmax) + bytes(range(16))
    b += struct.pack("<HHBB", idx, count, role, len(name)) + b"\0\0"
    b += struct.pack("<II", window, ring) + b"\0" * 4
    assert len(b) == 44
    b += name
    return b + struct.pack("<I", crc32c(b))


def reply(version=3, status=0, window=1 << 24, ring=1024):
    b = bytearray(24)
    b[:4] = b"DWCP"
    b[4:6] = struct.pack("<H", version)
    b[6] = status
    b[8:16] = struct.pack("<II", window, ring)
    b[20:24] = struct.pack("<I", crc32c(bytes(b[:20])))
    return bytes(b)


def frame(kind, codec=0, channel=0, length=0, seq=0, plan_len=0, payload=b"", checked=True):
    pcrc = crc32c(payload) if checked else 0
    b = struct.pack("<BBHIQIII", kind, codec, channel, length, seq, plan_len, len(payload), pcrc)
    return b + struct.pack("<I", crc32c(b)) + payload


def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def plan_lit(data):
    return b"\x01" + varint(len(data)) + data


def codec_frame(codec, payload, plan_len=None, raw_len=None):
    plan_len = len(payload) if plan_len is None else plan_len
    raw_len = len(payload) if raw_len is None else raw_len
    return (bytes([codec]) + plan_len.to_bytes(3, "little") + raw_len.to_bytes(3, "little")
            + struct.pack("<H", len(payload)) + payload)


def pb_varint_field(num, v):
    return varint(num << 3) + varint(v)


def raft_msg(msg_type, to=2, frm=1, term=5, index=0, commit=0, entries=b""):
    m = pb_varint_field(1, msg_type) + pb_varint_field(2, to) + pb_varint_field(3, frm)
    m += pb_varint_field(4, term) + pb_varint_field(6, index) + pb_varint_field(8, commit)
    if entries:
        m += varint((7 << 3) | 2) + varint(len(entries)) + entries
    return m


def raft_frame(payload, cluster=0x5EEDCAFE):
    b = b"DWRF" + struct.pack("<HHQI", 1, 1, cluster, len(payload)) + payload
    return b + struct.pack("<I", crc32c(b))


def seeds():
    s = {}
    s["wire_hello"] = [b"\0" + hello(), b"\0" + hello(vmin=1, vmax=1, idx=3, count=8, name=b"guest_7.x"),
                       b"\1" + hello(name=b"a" * 64), b"\1" + hello(vmin=7, vmax=9),
                       b"\0GET / HTTP/1.1\r\n\r\n"]
    s["wire_reply"] = [b"\0" + reply(status=st) for st in range(7)] + [b"\1" + reply(version=1)]
    data = bytes(range(256)) * 4
    plan = plan_lit(data)
    s["wire_frame"] = [
        b"\0\4\0" + frame(1, 1, 0, len(data), 0, len(plan), plan),
        b"\0\4\0" + frame(1, 4, 1, len(data), 1, len(data), data),
        b"\0\4\0" + frame(1, 0x84, 2, len(data), 2, len(data), data, checked=False),
        b"\0\4\0" + frame(2, 0, 3, 0, 9) + frame(3, 0, 1, 65536) + frame(4) + frame(6, 0, 0, 4),
        b"\0\4\0" + frame(5, payload=b"source gave up: qemu exited"),
        b"\3\1\0" + frame(1, 2, 0, 100, 0, 50, b"\0" * 20),
    ]
    page = bytes((i * 7) & 0xFF for i in range(4096))
    mf_init = bytes.fromhex("1122334400000001") + b"\0" * 56

    def mf_packet(pages, sync=False):
        # QEMU 10.0 MultiFDPacket_t (big-endian), 128 offsets, then pages
        h = bytes.fromhex("1122334400000001") + struct.pack(
            ">IIIIQII", 1 if sync else 0, 0 if sync else 128, len(pages),
            4096 * len(pages), 7, 0, 0) + b"\0" * 24
        h += b"pc.ram".ljust(256, b"\0")
        h += b"".join(struct.pack(">Q", i * 4096) for i in range(128))
        return h + b"".join(pages)

    s["codec_decode"] = [
        b"\4" + codec_frame(0x80, page + page) + codec_frame(0x81, page + b"\0" * 4096),
        b"\4" + codec_frame(0x82, b"\0" * 600 + page[:3000]) + codec_frame(0x80, page),
        b"\0" + codec_frame(1, plan) + codec_frame(1, b"\x02" + varint(4096), raw_len=4096),
        b"\2" + codec_frame(1, b"\x03" + page + b"\x04\x00", raw_len=8192),
        b"\2" + codec_frame(1, plan_lit(page) + b"\x05\x04\x00", raw_len=8192),
        b"\0" + codec_frame(4, data) + codec_frame(2, b"\x1f" + b"abcdefghijklmnopqrstuvwxyz01234" + b"\x00",
                                                   plan_len=31),
        b"\0" + codec_frame(3, bytes.fromhex("28b52ffd2004210000616263"), plan_len=4),
        # the context stream: three round-trip pieces, then a hand-made one
        b"\4" + codec_frame(0x83, page + page) + codec_frame(0x83, page[1:] + page[:1])
        + codec_frame(0x83, b"\0" * 600 + page[:3000])
        + codec_frame(5, bytes.fromhex("28b52ffd0058210000616263"), plan_len=4),
        # a multifd channel (RING op, pages followed), then hand-made RING
        # and XREF ops
        b"\4" + codec_frame(0x80, mf_init + mf_packet([page, page[1:] + page[:1]]))
        + codec_frame(0x81, mf_packet([], sync=True) + mf_packet([page])),
        b"\4" + codec_frame(1, b"\x08\x02" + plan_lit(page[:100]), raw_len=100),
        b"\4" + codec_frame(1, b"\x09\x02\x00" + b"\x11" * 8, raw_len=4096),
    ]
    guest = "6f0e7b8c-1d2e-4f5a-9b6c-7d8e9f0a1b2c"
    s["control_request"] = [x.encode() for x in [
        '{"op":"route","name":"vm1","to":"10.0.0.2:4800","streams":4,"codec":"zstd"}',
        '{"op":"unroute","name":"vm1"}', '{"op":"stats"}', '{"op":"ping","id":7}',
        '{"op":"prepare","name":"vm1","uuid":"%s","transport":"tcp","streams":2}' % guest,
        '{"op":"started","name":"vm1"}',
        '{"op":"release","name":"vm1","outcome":"failed","reason":"why"}',
        '{"op":"cluster_status"}', '{"op":"guests"}',
        '{"op":"begin","guest":"%s","src":1,"dst":2}' % guest,
        '{"op":"commit","guest":"%s","epoch":3}' % guest,
        '{"op":"abort","guest":"%s","epoch":3}' % guest,
        '{"op":"revert","guest":"%s","epoch":3}' % guest,
        '{"op":"settle","guest":"%s","epoch":3,"revert_if_committed":true}' % guest,
        '{"op":"reconcile","guest":"%s"}' % guest, '{"op":"frobnicate"}', 'not json',
    ]]
    s["dwcp_uri"] = [x.encode() for x in [
        "dwcp:10.0.0.2:4444?streams=8&codec=zstd:3&name=vm1", "dwcp:h:5?checksum=all", "dwcp:[::1]:5",
        "dwcp:host-a.example:0", "dwcp:0.0.0.0:0?window=64&codec=auto", "dwcp:h:5?streams=2&streams=3",
        "dwcp:h:5?name=../x", "dwcp:[zz]:5", "tcp:1.2.3.4:5",
    ]]
    s["raft_frame"] = [
        b"\1" + raft_msg(3, index=7, commit=6, entries=pb_varint_field(2, 5) + pb_varint_field(3, 8)),
        b"\1" + raft_msg(4), b"\3" + raft_msg(6, term=9),
        b"\0" + raft_frame(raft_msg(8)) + raft_frame(raft_msg(3, to=9)),
        b"\2" + raft_frame(b"\xff\xff"),
    ]
    s["linkem_config"] = [bytes([0]) + t for t in [
        b"# t\tmbit\n0\t10\n2\t20\n\n4\t5\n", b"0 7", b"0\t20\n2\t60\n"]]
    s["linkem_config"] += [bytes([1]) + d for d in [b"25ms", b"1.5s", b"300us", b"100ns", b"7"]]
    s["linkem_config"] += [bytes([2]) + d for d in [b"100mbit", b"1Gbit", b"2.5M", b"50mbps", b"500kbit/s"]]
    s["linkem_config"] += [bytes([3]) + d for d in [b"0.1%", b"0.02", b"120%"]]
    s["linkem_config"] += [bytes([4]) + d for d in [b"bdp", b"64kb", b"1mib", b"20ms", b"30000"]]
    with open(os.path.join(ROOT, "packaging", "dwcp.toml"), "rb") as f:
        packaged = f.read()
    uncommented = b"\n".join(
        l[2:] if l.startswith(b"# ") and b"=" in l.split(b"#")[1] else l for l in packaged.split(b"\n"))
    s["config_toml"] = [packaged, uncommented,
                        b'[transport]\nstreams = 8\ncodec = "zstd:3"\n[agent]\nroutes = ["vm1=10.0.0.2:4800"]\n',
                        b"[cluster]\nnode_id = 0\n", b"[transport]\nbogus = 1\n"]
    return s


def main():
    out = os.path.join(HERE, "corpus")
    for target, inputs in seeds().items():
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for i, b in enumerate(inputs):
            with open(os.path.join(d, "seed-%02d" % i), "wb") as f:
                f.write(b)
    print("seeds written to", out, file=sys.stderr)


if __name__ == "__main__":
    main()
