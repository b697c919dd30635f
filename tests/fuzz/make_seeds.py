#!/usr/bin/env python3
"""tests/fuzz/make_seeds.py — (re)write the small committed seed corpora in
tests/fuzz/corpus/<target>/.  Each seed is a hand-built example of the
format a target reads; the fuzzer mutates from there."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def mp(v):
    """A minimal msgpack encoder (smallest forms), enough for seeds."""
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        if v >= 0:
            for c, f in ((0xcc, ">B"), (0xcd, ">H"), (0xce, ">I"), (0xcf, ">Q")):
                try:
                    return bytes([c]) + struct.pack(f, v)
                except struct.error:
                    pass
        for c, f in ((0xd0, ">b"), (0xd1, ">h"), (0xd2, ">i"), (0xd3, ">q")):
            try:
                return bytes([c]) + struct.pack(f, v)
            except struct.error:
                pass
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        if len(b) < 32:
            return bytes([0xa0 | len(b)]) + b
        return b"\xd9" + bytes([len(b)]) + b if len(b) < 256 else b"\xda" + struct.pack(">H", len(b)) + b
    if isinstance(v, bytes):
        return b"\xc4" + bytes([len(v)]) + v
    if isinstance(v, list):
        h = bytes([0x90 | len(v)]) if len(v) < 16 else b"\xdc" + struct.pack(">H", len(v))
        return h + b"".join(mp(x) for x in v)
    if isinstance(v, dict):
        h = bytes([0x80 | len(v)]) if len(v) < 16 else b"\xde" + struct.pack(">H", len(v))
        return h + b"".join(mp(k) + mp(x) for k, x in v.items())
    raise TypeError(v)


VALUES = [
    None, True, 0, 1, -1, 127, 128, -33, 65536, 2**63 + 5, -(2**40), 1.5, -0.0, 1e300,
    "", "héllo", "x" * 40, b"\x00\x01binary",
    [], [1, [2, [3, [4]]]], {}, {"a": 1, "b": [True, None, 2.25]},
    {"customer": "c-9", "amount": 42.5, "items": [{"sku": "s-1", "qty": 2}]},
]

JSONS = [
    'null', 'true', '0', '-0', '-0.0', '1.5e3', '123456789012345678901', '18446744073709551615',
    '-9223372036854775808', '0.1', '1e-320', '"a\\u00e9\\ud83d\\ude00\\n"', '[]', '{}',
    '[1,[2,[3]],{"a":null}]', '{"customer":"c-9","amount":42.5,"tags":["x","y"]}',
    '{"$bin":"AAEC"}', ' { "k" : [ true , false ] } ',
]

EVENTS = [
    {"stream": "order-1", "type": "OrderPlaced", "data": {"customer": "c-1", "amount": 42.5}},
    {"stream": "order-2", "type": "PaymentReceived", "data": {"amount": 1}, "metadata": {"correlation_id": "c-1"},
     "id": "9b0c6a1e-2f4d-4c1a-8f1e-0123456789ab", "time": 1700000000000},
    {"stream": "user", "type": "T", "data": [1, 2, 3], "position": 5, "version": 0},
    {"stream": "s", "type": "t"},
]


def record(stream, typ, version, time, meta, data, ident=bytes(range(16))):
    # metadata and data are raw msgpack appended verbatim, as record_encode does
    body = b"\x98" + mp(1) + mp(ident) + mp(stream) + mp(typ) + mp(version) + mp(time) + mp(meta) + mp(data)
    return struct.pack("<I", crc32c(body)) + body


def write(target, items):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    for i, b in enumerate(items):
        with open(os.path.join(d, "seed-%02d" % i), "wb") as f:
            f.write(b)


def main():
    assert crc32c(b"123456789") == 0xE3069283
    write("fuzz_mp_validate", [mp(v) for v in VALUES])
    write("fuzz_json", [s.encode() for s in JSONS])
    write("fuzz_event_json", [json.dumps(e).encode() for e in EVENTS])
    recs = [
        record("order-1", "OrderPlaced", 0, 1700000000000, {}, {"customer": "c-1", "amount": 42.5}),
        record("s", "t", 2**40, -5, {"correlation_id": "x"}, None),
        record("cat-x", "Typ", 7, 0, {}, [1, [2, {"k": b"\x00"}]]),
    ]
    # mode byte: 0 = as is, 1 = the fuzz target fixes the checksum
    write("fuzz_record", [bytes([m]) + r for r in recs for m in (0, 1)])


if __name__ == "__main__":
    main()
