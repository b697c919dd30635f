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


def http(body, status=200, mode="length", ctype="application/json"):
    """One HTTP/1.1 reply as a server sends it: Content-Length, chunked
    (two chunks, one with an extension) or until EOF."""
    body = body.encode() if isinstance(body, str) else body
    head = "HTTP/1.1 %d X\r\nContent-Type: %s\r\nConnection: close\r\n" % (status, ctype)
    if mode == "length":
        return (head + "Content-Length: %d\r\n\r\n" % len(body)).encode() + body
    if mode == "chunked":
        h = len(body) // 2
        return ((head + "Transfer-Encoding: chunked\r\n\r\n").encode() +
                b"%x\r\n" % h + body[:h] + b"\r\n" +
                b"%x;ext=1\r\n" % (len(body) - h) + body[h:] + b"\r\n0\r\n\r\n")
    return (head + "\r\n").encode() + body


def page(events, nxt=None):
    return json.dumps({"events": events, "next": nxt, "last_position": 9})


def ev(pos, stream="order-1", typ="T", version=0, data=None, meta=None):
    e = {"stream": stream, "type": typ, "position": pos, "version": version,
         "id": "9b0c6a1e-2f4d-4c1a-8f1e-%012x" % pos, "time": 1700000000000 + pos,
         "data": data if data is not None else {"n": pos, "tags": ["a", 1.5, None]}}
    if meta is not None:
        e["metadata"] = meta
    return e


def repl_remote_seeds():
    """fuzz_repl_remote: byte 0 = operation (| 8: limit 3), then the
    server's replies separated by NUL (ops 0-5 start with GET /health)."""
    health = http(json.dumps({"status": "ok", "last_position": 9}))
    end = http(page([]))
    seeds = [
        bytes([0]) + b"\0".join([health, http(page([ev(1), ev(2, meta={"correlation_id": "k"})])),
                                  http(page([ev(3, "customer-2", "U")]), mode="chunked"), end]),
        bytes([8]) + b"\0".join([health, http(page([ev(1), ev(2), ev(3), ev(4)]))]),
        bytes([1]) + b"\0".join([health, http(page([ev(5, version=1), ev(2, version=0)]))]),
        bytes([2]) + b"\0".join([health, http(page([ev(1), ev(4, "orderly-1"), ev(6, "order")]),
                                               mode="eof")]),
        bytes([3]) + b"\0".join([health, http(page([ev(2, typ="T", data=[1, {"x": {}}])])), end]),
        bytes([4]) + b"\0".join([health,
                                  http(json.dumps({"streams": [{"stream": "a-1", "version": 0},
                                                               {"stream": "b", "version": 3}],
                                                   "next": "/streams?after=b"})),
                                  http(json.dumps({"streams": [{"stream": "c", "version": 1}],
                                                   "next": None}))]),
        bytes([5]) + b"\0".join([health, http(json.dumps({"categories": [
            {"category": "order", "version": 1}, {"category": "user"}]}), mode="chunked")]),
        bytes([6]) + http("id: 1\ndata: " + json.dumps(ev(1)) + "\n\n: comment\r\n"
                          "event: all\r\ndata: {\"a\":\r\ndata: [1,2]}\r\n\r\ndata: nope\n\n",
                          ctype="text/event-stream", mode="chunked"),
        bytes([7]) + http(json.dumps({"name": "p", "status": "running", "position": 3,
                                      "state": {"n": [1, 2, {"deep": [[[]]]}], "s": "\u00e9"}})),
        bytes([7]) + http('{"error":"no such projection","code":404}', status=404, mode="eof"),
        # a server that ignores from= keeps sending the same page: the read
        # must end (with an error), not return the same events again
        bytes([0]) + b"\0".join([health, http(page([ev(1), ev(2)]))]),
        # ... and one that ignores after= on /streams
        bytes([4]) + b"\0".join([health, http(json.dumps(
            {"streams": [{"stream": "a", "version": 0}], "next": "/streams?after=a"}))]),
        # an empty body (Content-Length: 0) has no buffer: it reached
        # json_to_mp as NULL (UBSan: zero offset applied to a null pointer)
        bytes([0]) + http(""),
    ]
    return seeds


REPL_LINES = [
    ".help", ".streams\n.categories\n.projections", ".describe nope", ".describe",
    ".format json\n.format\n.format bogus", ".timing on\n.timing\n.timing maybe", ".quit",
    ".nosuch arg", "from{category=\"or", "string.fo", "x = tm.", "s:up", ".format j", ".des",
    "read('order-1'", "'", "math.",
    # blanks before a dot command: T.dot raised "attempt to concatenate a nil value"
    "\t.help", "  .streams",
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
    write("fuzz_repl_remote", repl_remote_seeds())
    write("fuzz_repl_line", [l.encode() for l in REPL_LINES])


if __name__ == "__main__":
    main()
