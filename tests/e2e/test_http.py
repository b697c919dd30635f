"""End-to-end tests of the HTTP API: the real `tidemark serve` on a free port
with a temporary data dir, driven by http.client and raw sockets."""
import json
import os
import signal
import socket
import struct
import threading
import time
import uuid

import pytest

from conftest import Http, run_tidemark, start_server


def ev(type_, data=None, **kw):
    e = {"type": type_, "data": data if data is not None else {}}
    e.update(kw)
    return e


def raw_request(port, data, timeout=10):
    """Send raw bytes, return (status, headers dict, body bytes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    buf = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
            if b"\r\n\r\n" in buf:
                head, body = buf.split(b"\r\n\r\n", 1)
                hdrs = {}
                for l in head.decode().split("\r\n")[1:]:
                    k, v = l.split(":", 1)
                    hdrs[k.strip().lower()] = v.strip()
                n = int(hdrs.get("content-length", "-1"))
                if n >= 0 and len(body) >= n:
                    break
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    hdrs = {}
    for l in lines[1:]:
        k, v = l.split(":", 1)
        hdrs[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), hdrs, body


def assert_error(r, status):
    assert r.status == status, r
    j = r.json()
    assert j["code"] == status and isinstance(j["error"], str) and j["error"], j
    return j


# ---- msgpack encoder (stdlib only) for the msgpack body tests ----

def mp(v):
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        return (bytes([0xa0 | len(b)]) if len(b) < 32 else b"\xd9" + bytes([len(b)])) + b
    if isinstance(v, bytes):
        return b"\xc4" + bytes([len(v)]) + v
    if isinstance(v, list):
        return bytes([0x90 | len(v)]) + b"".join(mp(x) for x in v)
    if isinstance(v, dict):
        return bytes([0x80 | len(v)]) + b"".join(mp(k) + mp(x) for k, x in v.items())
    raise TypeError(v)


# ---- appends ----

def test_append_one_and_many(server):
    h = server.http()
    r = h.append("order-1", ev("OrderPlaced", {"customer": "c-1", "amount": 42.5}))
    assert r.status == 201, r
    j = r.json()
    assert j["positions"] == [1] and j["versions"] == [0]
    assert j["first_position"] == 1 and j["last_position"] == 1
    uuid.UUID(j["ids"][0])
    r = h.append("order-1", [ev("PaymentReceived", {"amount": 42.5}), ev("OrderShipped")])
    assert r.status == 201, r
    j = r.json()
    assert j["positions"] == [2, 3] and j["versions"] == [1, 2]
    assert j["first_position"] == 2 and j["last_position"] == 3


def test_append_msgpack(server):
    h = server.http()
    body = mp([{"type": "OrderPlaced", "data": {"amount": 7, "sku": "x"}},
               {"type": "OrderShipped", "data": {"n": 1.5}}])
    r = h.post("/streams/order-9", body, headers={"Content-Type": "application/msgpack"})
    assert r.status == 201, r
    assert r.json()["versions"] == [0, 1]
    got = h.get("/streams/order-9").json()["events"]
    assert got[0]["data"] == {"amount": 7, "sku": "x"} and got[1]["data"] == {"n": 1.5}


def test_append_malformed_json_and_msgpack(server):
    h = server.http()
    j = assert_error(h.post("/streams/s-1", '{"type": "A", "data": ', headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in j["error"] or "json" in j["error"]
    assert_error(h.post("/streams/s-1", "[]", headers={"Content-Type": "application/json"}), 400)
    assert_error(h.post("/streams/s-1", "42", headers={"Content-Type": "application/json"}), 400)
    assert_error(h.post("/streams/s-1", json.dumps({"data": {}})), 400)  # no type
    assert_error(h.post("/streams/s-1", json.dumps({"type": "A", "bogus": 1})), 400)
    j = assert_error(h.post("/streams/s-1", b"\x92\x81\xa4type", headers={"Content-Type": "application/msgpack"}), 400)
    assert "msgpack" in j["error"]
    assert_error(h.post("/streams/s-1", b"\xc1", headers={"Content-Type": "application/msgpack"}), 400)
    # Nothing was written by any of these.
    assert h.get("/health").json()["last_position"] == 0
    assert_error(h.get("/streams/s-1"), 404)


def test_expected_version_and_conflict(server):
    h = server.http()
    assert h.append("acct-1", ev("Opened"), expect="no_stream").status == 201
    j = assert_error(h.append("acct-1", ev("Opened"), expect="no_stream"), 409)
    assert j["current_version"] == 0
    assert h.append("acct-1", ev("Deposited"), expect=0).status == 201
    j = assert_error(h.append("acct-1", ev("Deposited"), expect=0), 409)
    assert j["current_version"] == 1
    j = assert_error(h.append("acct-2", ev("Deposited"), expect="exists"), 409)
    assert j["current_version"] == -1
    j = assert_error(h.append("acct-2", ev("Deposited"), expect=3), 409)
    assert j["current_version"] == -1
    assert h.append("acct-1", ev("Deposited"), expect="exists").status == 201
    assert h.append("acct-1", ev("Deposited"), expect="any").status == 201
    assert_error(h.append("acct-1", ev("Deposited"), expect="sometimes"), 400)
    assert_error(h.append("acct-1", ev("Deposited"), expect="-5"), 400)
    assert h.get("/streams/acct-1").json()["version"] == 3


def test_idempotent_retry(server):
    h = server.http()
    eid = str(uuid.uuid4())
    a = h.append("cart-1", ev("ItemAdded", {"sku": "a"}, id=eid)).json()
    b = h.append("cart-1", ev("ItemAdded", {"sku": "a"}, id=eid))
    assert b.status in (200, 201) and b.json()["positions"] == a["positions"]
    assert_error(h.append("cart-1", ev("ItemAdded", {"sku": "OTHER"}, id=eid)), 409)
    assert h.get("/health").json()["last_position"] == 1


# ---- reads ----

def fill(h, stream, n, type_="Tick"):
    for i in range(0, n, 50):
        r = h.append(stream, [ev(type_, {"i": j}) for j in range(i, min(n, i + 50))])
        assert r.status == 201, r


def test_read_stream_paging_and_direction(server):
    h = server.http()
    fill(h, "order-1", 25)
    fill(h, "user-1", 3, "Seen")
    r = h.get("/streams/order-1?limit=10")
    assert r.status == 200 and r.header("Content-Type").startswith("application/json")
    j = r.json()
    assert [e["version"] for e in j["events"]] == list(range(10))
    e0 = j["events"][0]
    assert list(e0.keys())[:2] == ["stream", "type"]
    for k in ("stream", "type", "data", "metadata", "id", "time", "position", "version"):
        assert k in e0
    seen = [e["data"]["i"] for e in j["events"]]
    while j["next"] and j["events"]:
        j = h.get(j["next"]).json()
        seen += [e["data"]["i"] for e in j["events"]]
    assert seen == list(range(25))
    j = h.get("/streams/order-1?direction=backward&limit=5").json()
    assert [e["version"] for e in j["events"]] == [24, 23, 22, 21, 20]
    j2 = h.get(j["next"]).json()
    assert [e["version"] for e in j2["events"]] == [19, 18, 17, 16, 15]
    j = h.get("/streams/order-1?from=20").json()
    assert [e["version"] for e in j["events"]] == [20, 21, 22, 23, 24]
    assert_error(h.get("/streams/nope-1"), 404)
    assert_error(h.get("/streams/order-1?limit=0"), 400)
    assert_error(h.get("/streams/order-1?limit=abc"), 400)
    assert_error(h.get("/streams/order-1?direction=sideways"), 400)


def test_read_all_and_filters(server):
    h = server.http()
    h.append("order-1", [ev("OrderPlaced"), ev("OrderShipped")])
    h.append("user-7", [ev("UserSeen")])
    h.append("order-2", [ev("OrderPlaced")])
    j = h.get("/all").json()
    assert [e["position"] for e in j["events"]] == [1, 2, 3, 4]
    j = h.get("/all?from=2&limit=2").json()
    assert [e["position"] for e in j["events"]] == [2, 3]
    assert [e["position"] for e in h.get(j["next"]).json()["events"]] == [4]
    j = h.get("/all?category=order").json()
    assert [e["position"] for e in j["events"]] == [1, 2, 4]
    j = h.get("/all?type=OrderPlaced").json()
    assert [e["stream"] for e in j["events"]] == ["order-1", "order-2"]
    j = h.get("/all?direction=backward&limit=3").json()
    assert [e["position"] for e in j["events"]] == [4, 3, 2]
    assert_error(h.get("/all?category=order&type=X"), 400)
    assert_error(h.get("/all?from=-1"), 400)
    j = h.get("/streams").json()
    assert [s["stream"] for s in j["streams"]] == ["order-1", "order-2", "user-7"]
    j = h.get("/categories").json()
    assert sorted(c["category"] for c in j["categories"]) == ["order", "user"]


def test_stream_names_are_percent_decoded(server):
    h = server.http()
    assert h.append("caf%C3%A9-1", ev("X")).status == 201
    assert h.get("/all").json()["events"][0]["stream"] == "café-1"
    assert h.get("/streams/caf%C3%A9-1").json()["events"][0]["stream"] == "café-1"


# ---- routes, methods, limits ----

def test_health_metrics_dashboard(server):
    h = server.http()
    h.append("order-1", [ev("A"), ev("B")])
    assert h.get("/health").json() == {"status": "ok", "last_position": 2}
    r = h.get("/metrics")
    assert r.status == 200 and r.header("Content-Type").startswith("text/plain")
    text = r.body.decode()
    assert "tidemark_appends_total 2" in text
    assert "tidemark_last_position 2" in text
    assert 'tidemark_http_requests_total{code="201"} 1' in text
    assert "tidemark_sse_clients 0" in text
    # group commits: one append request, one commit, synced (the default
    # durable mode)
    vals = dict(l.split(" ", 1) for l in text.splitlines() if l and not l.startswith("#"))
    commits = int(vals["tidemark_store_commits_total"])
    assert commits >= 1 and int(vals["tidemark_store_syncs_total"]) == commits
    h.append("order-1", [ev("C")])
    text = h.get("/metrics").body.decode()
    vals = dict(l.split(" ", 1) for l in text.splitlines() if l and not l.startswith("#"))
    assert int(vals["tidemark_store_commits_total"]) == commits + 1
    r = h.get("/")
    assert r.status == 200 and b"<html" in r.body.lower()
    assert r.header("Content-Type").startswith("text/html")
    r = h.get("/dashboard/chart.min.js")
    assert r.status == 200 and b"Chart" in r.body[:2000]


def test_unknown_route_and_wrong_method(server):
    h = server.http()
    assert_error(h.get("/nope"), 404)
    assert_error(h.get("/streams/a/b/c/d"), 404)
    r = h.request("DELETE", "/streams/order-1")
    assert_error(r, 405)
    assert "POST" in r.header("Allow") and "GET" in r.header("Allow")
    r = h.post("/health", "{}")
    assert_error(r, 405)
    assert r.header("Allow") == "GET"
    assert_error(h.request("PUT", "/all", "{}"), 405)
    for live in ("/all/live", "/live?sub=all", "/streams/a-1/live", "/projections/p/live"):
        r = h.request("HEAD", live)
        assert r.status == 405 and r.header("Allow") == "GET", (live, r)
        assert_error(h.post(live, "{}"), 405)
    assert h.request("HEAD", "/health").status == 200


def test_projection_routes_are_served(server):
    # the projection manager answers (tests/e2e/test_projections_http.py covers it)
    h = server.http()
    r = h.get("/projections")
    assert r.status == 200 and r.json()["projections"] == []
    assert_error(h.get("/projections/revenue"), 404)


def test_body_too_large_413(tmp_path):
    s = start_server(str(tmp_path / "d"), "--max-body", "1000", log_dir=str(tmp_path))
    try:
        h = s.http()
        big = json.dumps(ev("Big", {"s": "x" * 1500}))
        assert_error(h.post("/streams/big-1", big), 413)
        h = s.http()
        assert h.post("/streams/big-1", json.dumps(ev("Small", {"s": "x"}))).status == 201
        # Far above the limit: cut before the body is read (status still 413).
        st, _, _ = raw_request(s.port, b"POST /streams/big-1 HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{")
        assert st == 413
    finally:
        s.stop()
        s.close()


def test_headers_too_large_431(server):
    st, hdrs, body = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " +
                                 b"a" * 70000 + b"\r\n\r\n")
    assert st == 431
    assert json.loads(body)["code"] == 431
    # Many headers, 3x the limit in all: still our 431.
    st, _, body = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" +
                              b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(190)) + b"\r\n")
    assert st == 431 and json.loads(body)["code"] == 431
    # Beyond 4x the limit libevent cuts the request itself (documented 400).
    st, _, _ = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " +
                           b"a" * 300000 + b"\r\n\r\n")
    assert st == 400
    # The server is still fine.
    assert server.http().get("/health").status == 200


def test_keepalive_many_requests(server):
    h = server.http()
    for i in range(200):
        assert h.append("k-1", ev("E", {"i": i})).status == 201
    assert h.get("/streams/k-1?limit=1&direction=backward").json()["events"][0]["version"] == 199


def test_concurrent_appends_all_acknowledged(server):
    results = []
    lock = threading.Lock()

    def worker(n):
        h = server.http()
        for i in range(25):
            r = h.append("conc-%d" % n, ev("E", {"i": i}))
            with lock:
                results.append((r.status, tuple(r.json()["positions"])))
        h.close()

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(s == 201 for s, _ in results)
    positions = sorted(p for _, ps in results for p in ps)
    assert positions == list(range(1, 16 * 25 + 1))


def test_token_file_protects_writes(tmp_path):
    tok = tmp_path / "tokens"
    tok.write_text("# writers\nsecret-one\n  secret-two  \n")
    s = start_server(str(tmp_path / "d"), "--token-file", str(tok), log_dir=str(tmp_path))
    try:
        h = s.http()
        assert_error(h.append("a-1", ev("X")), 401)
        assert_error(h.post("/streams/a-1", ev("X"), headers={"Authorization": "Bearer nope"}), 401)
        assert h.post("/streams/a-1", ev("X"), headers={"Authorization": "Bearer secret-two"}).status == 201
        assert h.get("/streams/a-1").status == 200   # reads stay open
    finally:
        s.stop()
        s.close()


def test_serve_usage_errors(tmp_path):
    assert run_tidemark("serve").returncode == 1
    p = run_tidemark("serve", "--help")
    assert p.returncode == 0 and p.stdout.startswith("usage: tidemark serve")
    assert run_tidemark("serve", "--data", str(tmp_path / "d"), "--port", "x").returncode == 1
    assert run_tidemark("serve", "--data", str(tmp_path / "d"), "--durability", "maybe").returncode == 1


def test_port_in_use_fails_cleanly(server, tmp_path):
    p = run_tidemark("serve", "--data", str(tmp_path / "other"), "--port", server.port, timeout=20)
    assert p.returncode == 4
    assert "listen" in p.stderr


# ---- shutdown ----

def test_sigterm_with_appends_in_flight(tmp_path):
    data = str(tmp_path / "d")
    s = start_server(data, log_dir=str(tmp_path))
    acked = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(n):
        h = Http(s.port, timeout=10)
        i = 0
        while not stop.is_set():
            try:
                r = h.append("sig-%d" % n, ev("E", {"n": n, "i": i}))
            except OSError:
                break
            if r.status != 201:
                break
            with lock:
                acked.append((n, i, r.json()["positions"][0]))
            i += 1
        h.close()

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in ts:
        t.start()
    time.sleep(0.7)
    assert s.stop(signal.SIGTERM) == 0
    stop.set()
    for t in ts:
        t.join()
    s.close()
    assert len(acked) > 10
    assert "shutting down" in s.stderr()
    s2 = start_server(data, log_dir=str(tmp_path))
    try:
        h = s2.http()
        have = {}
        j = h.get("/all?limit=10000").json()
        while True:
            for e in j["events"]:
                have[e["position"]] = (e["data"]["n"], e["data"]["i"])
            if len(j["events"]) < 10000:
                break
            j = h.get(j["next"]).json()
        for n, i, p in acked:
            assert have.get(p) == (n, i)
    finally:
        s2.stop()
        s2.close()


def test_store_refusing_writes_is_503(tmp_path):
    """A failed write (file size limit -> EFBIG) puts the store into its
    refusing state: appends answer 503 from then on, reads keep working."""
    import resource
    from conftest import Server

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))

    s = Server(str(tmp_path / "d"), log_dir=str(tmp_path), preexec_fn=limit).start()
    try:
        h = s.http()
        blob = "x" * 4000
        statuses = []
        for i in range(200):
            r = h.append("big-1", ev("Big", {"i": i, "blob": blob}))
            statuses.append(r.status)
            if r.status != 201:
                break
        assert statuses[0] == 201 and statuses[-1] == 503, statuses
        assert_error(r, 503)
        j = assert_error(h.append("big-1", ev("After")), 503)
        assert "reopen" in j["error"] or "refus" in j["error"]
        acked = statuses.count(201)
        assert len(h.get("/streams/big-1?limit=1000").json()["events"]) == acked
        assert h.get("/health").status == 200
        assert "tidemark_store_errors_total 0" not in h.get("/metrics").body.decode()
    finally:
        s.stop()
        s.close()
