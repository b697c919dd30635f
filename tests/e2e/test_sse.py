"""End-to-end tests of the live endpoints (Server-Sent Events) with a raw
socket client: live delivery, Last-Event-ID resume without gap or
duplicate, filters, multiplexing, heartbeats, slow consumers, shutdown."""
import json
import signal
import threading
import time

import pytest

from conftest import SseClient, start_server


def ev(type_, data=None):
    return {"type": type_, "data": data if data is not None else {}}


def test_stream_live_receives_new_events(server):
    h = server.http()
    h.append("order-1", ev("Before"))
    c = SseClient(server.port, "/streams/order-1/live")
    try:
        assert c.status == 200
        assert c.headers["content-type"].startswith("text/event-stream")
        h.append("order-2", ev("Other"))
        h.append("order-1", [ev("A", {"i": 1}), ev("B", {"i": 2})])
        msgs = c.events(2)
        assert [m["json"]["type"] for m in msgs] == ["A", "B"]
        assert [m["id"] for m in msgs] == ["3", "4"]
        assert all(m["event"] is None for m in msgs)
        assert msgs[0]["json"]["position"] == 3 and msgs[0]["json"]["version"] == 1
        assert msgs[0]["json"]["stream"] == "order-1"
    finally:
        c.close()


def test_all_live_with_filters(server):
    h = server.http()
    call = SseClient(server.port, "/all/live")
    ccat = SseClient(server.port, "/all/live?category=order")
    ctype = SseClient(server.port, "/all/live?type=Paid")
    cboth = SseClient(server.port, "/all/live?category=order&type=Paid")
    try:
        h.append("order-1", ev("Placed"))
        h.append("user-1", ev("Paid"))
        h.append("order-1", ev("Paid"))
        assert [m["id"] for m in call.events(3)] == ["1", "2", "3"]
        assert [m["id"] for m in ccat.events(2)] == ["1", "3"]
        assert [m["id"] for m in ctype.events(2)] == ["2", "3"]
        assert [m["id"] for m in cboth.events(1)] == ["3"]
        assert cboth.next(timeout=0.3) is None
    finally:
        for c in (call, ccat, ctype, cboth):
            c.close()


def test_last_event_id_resume_no_gap_no_duplicate(server):
    h = server.http()
    for i in range(30):
        h.append("order-%d" % (i % 3), ev("E", {"i": i}))
    # Resume after position 10 while appends continue concurrently.
    stop = threading.Event()

    def writer():
        from conftest import Http
        w = Http(server.port)
        i = 30
        while not stop.is_set() and i < 200:
            w.append("order-%d" % (i % 3), ev("E", {"i": i}))
            i += 1
        w.close()

    t = threading.Thread(target=writer)
    t.start()
    c = SseClient(server.port, "/all/live", headers={"Last-Event-ID": "10"})
    try:
        got = [int(m["id"]) for m in c.events(60, timeout=20)]
        stop.set()
        t.join()
        total = server.http().get("/health").json()["last_position"]
        rest = [int(m["id"]) for m in c.events(total - 70, timeout=20)]
        ids = got + rest
        assert ids == list(range(11, total + 1))
        assert c.next(timeout=0.3) is None
    finally:
        stop.set()
        c.close()


def test_resume_on_stream_and_category(server):
    h = server.http()
    for i in range(10):
        h.append("order-%d" % (i % 2), ev("E", {"i": i}))
        h.append("user-%d" % (i % 2), ev("U", {"i": i}))
    c = SseClient(server.port, "/streams/order-1/live", headers={"Last-Event-ID": "6"})
    c2 = SseClient(server.port, "/all/live?category=user&last_event_id=15")
    c3 = SseClient(server.port, "/streams/order-0/live?from=1")
    try:
        # order-1 holds positions 3,7,11,15,19
        assert [m["id"] for m in c.events(4)] == ["7", "11", "15", "19"]
        assert [m["id"] for m in c2.events(3)] == ["16", "18", "20"]
        assert [m["id"] for m in c3.events(5)] == ["1", "5", "9", "13", "17"]
        h.append("order-1", ev("Live"))
        h.append("user-0", ev("Live"))
        assert c.events(1)[0]["id"] == "21"
        assert c2.events(1)[0]["id"] == "22"
        assert c.next(timeout=0.2) is None and c3.next(timeout=0.2) is None
    finally:
        for x in (c, c2, c3):
            x.close()


def test_multiplexed_subscriptions(server):
    h = server.http()
    c = SseClient(server.port, "/live?sub=stream:order-1&sub=category:user&sub=type:Paid")
    try:
        assert c.status == 200
        h.append("order-1", ev("Placed"))
        h.append("user-2", ev("Seen"))
        h.append("cart-1", ev("Paid"))
        h.append("order-1", ev("Paid"))
        msgs = c.events(5)
        got = [(m["id"], m["event"]) for m in msgs]
        assert got == [("1", "stream:order-1"), ("2", "category:user"), ("3", "type:Paid"),
                       ("4", "stream:order-1"), ("4", "type:Paid")]
        assert msgs[1]["json"]["stream"] == "user-2"
    finally:
        c.close()


def test_bad_live_requests(server):
    for path in ("/live", "/live?sub=bogus", "/live?sub=stream:"):
        c = SseClient(server.port, path)
        assert c.status == 400, path
        c.close()
    c = SseClient(server.port, "/all/live", headers={"Last-Event-ID": "abc"})
    assert c.status == 400
    c.close()


def test_heartbeats(tmp_path):
    s = start_server(str(tmp_path / "d"), "--sse-heartbeat", "1", log_dir=str(tmp_path))
    c = SseClient(s.port, "/all/live")
    try:
        m = c.next(timeout=3, skip_comments=False)  # opening comment
        assert m is not None and m["comments"]
        t0 = time.monotonic()
        hb = None
        while time.monotonic() - t0 < 4:
            m = c.next(timeout=3, skip_comments=False)
            if m and "heartbeat" in m["comments"]:
                hb = m
                break
        assert hb is not None
    finally:
        c.close()
        s.stop()
        s.close()


def test_slow_consumer_is_closed_with_reason(tmp_path):
    s = start_server(str(tmp_path / "d"), "--sse-buffer", "65536", log_dir=str(tmp_path))
    c = SseClient(s.port, "/all/live", rcvbuf=4096)
    try:
        h = s.http()
        blob = "x" * 2000
        for i in range(100):   # ~100 * 50 * 2 KB = 10 MB, far beyond buffers
            r = h.append("slow-1", [ev("Big", {"i": i, "blob": blob}) for _ in range(50)])
            assert r.status == 201
        # Now read: some events, then a close message with a reason, then EOF.
        close = None
        n = 0
        while True:
            m = c.next(timeout=10)
            if m is None:
                break
            if m["event"] == "close":
                close = m
                break
            n += 1
        assert close is not None, "no close message after %d events" % n
        reason = json.loads(close["data"])["reason"]
        assert "slow" in reason
        assert n < 5000
        assert c.next(timeout=5) is None and c.eof
        metrics = h.get("/metrics").body.decode()
        assert "tidemark_sse_slow_closed_total 1" in metrics
        # The server is healthy and other clients still work.
        c2 = SseClient(s.port, "/all/live")
        h.append("slow-1", ev("After"))
        assert c2.events(1)[0]["json"]["type"] == "After"
        c2.close()
    finally:
        c.close()
        s.stop()
        s.close()


def test_sse_clients_gauge_and_shutdown_close_event(tmp_path):
    s = start_server(str(tmp_path / "d"), log_dir=str(tmp_path))
    c = SseClient(s.port, "/all/live")
    c2 = SseClient(s.port, "/live?sub=all")
    try:
        c.next(timeout=0.2)
        m = s.http().get("/metrics").body.decode()
        assert "tidemark_sse_clients 2" in m
        s.proc.send_signal(signal.SIGTERM)
        for x in (c, c2):
            m = x.next(timeout=5)
            assert m is not None and m["event"] == "close"
            assert "shutting down" in json.loads(m["data"])["reason"]
        assert s.proc.wait(10) == 0
    finally:
        c.close()
        c2.close()
        s.kill()
        s.close()


def test_fanout_to_many_clients(server):
    clients = [SseClient(server.port, "/all/live") for _ in range(20)]
    try:
        h = server.http()
        for i in range(10):
            h.append("fan-1", [ev("E", {"i": i * 10 + j}) for j in range(10)])
        for c in clients:
            msgs = c.events(100)
            assert [m["json"]["data"]["i"] for m in msgs] == list(range(100))
    finally:
        for c in clients:
            c.close()


def test_idle_stream_outlives_timeout_and_close_is_noticed(tmp_path):
    s = start_server(str(tmp_path / "d"), "--timeout", "1", log_dir=str(tmp_path))
    c = SseClient(s.port, "/all/live")
    try:
        time.sleep(2.5)   # idle for longer than the connection timeout
        h = s.http()
        h.append("idle-1", ev("Late"))
        assert c.events(1)[0]["json"]["type"] == "Late"
        assert "tidemark_sse_clients 1" in h.get("/metrics").body.decode()
        c.close()
        deadline = time.monotonic() + 5
        while "tidemark_sse_clients 0" not in h.get("/metrics").body.decode():
            assert time.monotonic() < deadline, "closed client still counted"
            time.sleep(0.1)
    finally:
        c.close()
        s.stop()
        s.close()
