"""Continuous projections inside `tidemark serve` and their HTTP routes
(engine/projmgr.c): loading from --projections at start, PUT, state /
partitions / queries, live updates, faults isolated in worker processes,
commands, SIGHUP reload, restart from checkpoints and kill -9, metrics.

"Equals a rebuild" means: the state the server served equals, byte for byte
as JSON, what `tidemark project` prints for the same file over the same data
directory once the server is stopped."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict

import pytest

from conftest import BIN, Server, SseClient, run_tidemark, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COUNT_BY_TYPE = """
-- count of events per type, plus a sum of data.amount
return {
  from = "all",
  init = function() return { n = 0, by_type = {}, amount = 0 } end,
  on = {
    ["$any"] = function(s, e)
      s.n = s.n + 1
      s.by_type[e.type] = (s.by_type[e.type] or 0) + 1
      if type(e.data) == "table" and type(e.data.amount) == "number" then
        s.amount = s.amount + e.data.amount
      end
    end,
  },
  queries = {
    count = function(s, args) return { n = s.n, type = args and args.type,
                                       of_type = args and s.by_type[args.type] or 0 } end,
  },
}
"""

PER_STREAM = """
-- per stream: events and the sum of data.amount
return {
  from = { category = "acct" },
  partition = function(e) return e.stream end,
  init = function() return { events = 0, total = 0 } end,
  on = { ["$any"] = function(s, e) s.events = s.events + 1; s.total = s.total + (e.data.amount or 0) end },
  queries = { biggest = function(all)
    local best, bk = -1, nil
    for k, s in pairs(all) do if s.total > best or (s.total == best and k < bk) then best, bk = s.total, k end end
    return { stream = bk, total = best } end },
}
"""

RUNTIME_ERROR = """
return { from = "all", init = function() return { n = 0 } end,
  on = { Tick = function(s, e) if e.data.i == 7 then error("bad tick " .. e.data.i) end; s.n = s.n + 1 end } }
"""
JIT_LOOP = """
return { from = "all", init = function() return { n = 0 } end,
  on = { Tick = function(s, e) if e.data.i == 3 then while true do end end; s.n = s.n + 1 end } }
"""
MEMORY_BOMB = """
return { from = "all", init = function() return { n = 0 } end,
  on = { Tick = function(s, e)
    if e.data.i == 5 then local t = {}; for i = 1, 1e9 do t[i] = string.rep("x", 1048576) .. i end end
    s.n = s.n + 1 end } }
"""
FIXED = """
return { from = "all", init = function() return { n = 0 } end,
  on = { Tick = function(s, e) s.n = s.n + 1 end } }
"""


def wait_until(fn, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s (last %r)" % (what, last))


def status(h, name):
    r = h.get("/projections/" + name)
    assert r.status == 200, r
    return r.json()


def caught_up(h, *names):
    def ok():
        r = h.get("/projections")
        assert r.status == 200, r
        body = r.json()
        ps = {p["name"]: p for p in body["projections"]}
        # a PUT of a changed source builds the new version beside the old one
        # (versions): caught up also means no version is still building
        return all(n in ps and ps[n]["status"] == "running" and ps[n]["lag"] == 0
                   and ps[n]["position"] == body["last_position"]
                   and ps[n].get("rebuilding") is None for n in names) and ps
    return wait_until(ok, what="projections %s caught up" % (names,))


def state(h, name, query=""):
    r = h.get("/projections/%s/state%s" % (name, query))
    assert r.status == 200, r
    return r.json()


def rebuild(data, path):
    r = run_tidemark("project", "--data", data, path, "--quiet")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def ticks(h, stream, start, n):
    body = [{"type": "Tick", "data": {"i": i}} for i in range(start, start + n)]
    r = h.append(stream, body)
    assert r.status == 201, r


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def pdir(tmp_path):
    d = tmp_path / "projections"
    d.mkdir()
    return d


def serve(tmp_path, data, *args):
    return start_server(str(data), *args, log_dir=str(tmp_path))


# ---------------------------------------------------------------- loading at start

def shop_dataset(tmp_path, events=4000):
    jsonl = str(tmp_path / "shop.jsonl")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/gen-events"), "--events", str(events),
                    "--seed", "3", "--out", jsonl], check=True, capture_output=True)
    data = str(tmp_path / "data")
    r = run_tidemark("import", "--data", data, jsonl)
    assert r.returncode == 0, r.stderr
    with open(jsonl) as f:
        return data, [json.loads(l) for l in f]


def test_dir_projections_load_at_start_and_match_python_and_rebuild(tmp_path, pdir):
    data, events = shop_dataset(tmp_path)
    for n in ("customers.lua", "order_funnel.lua"):
        shutil.copy(os.path.join(ROOT, "projections", n), str(pdir / n))
    write(str(pdir / "README.md"), "not a projection")
    s = serve(tmp_path, data, "--projections", str(pdir))
    try:
        h = s.http()
        ps = caught_up(h, "customers", "order_funnel")
        assert sorted(ps) == ["customers", "order_funnel"]  # only *.lua
        assert ps["customers"]["origin"] == "dir" and ps["customers"]["error"] is None
        # independent computation of customers.lua
        want = defaultdict(lambda: {"orders": 0, "revenue": 0.0})
        for e in events:
            if not e["stream"].startswith("order-"):
                continue
            if e["type"] == "OrderPlaced":
                want[e["data"]["customer"]]["orders"] += 1
            elif e["type"] == "PaymentReceived":
                want[e["data"]["customer"]]["revenue"] += e["data"]["amount"]
        got = state(h, "customers")
        assert set(got) == set(want) and len(got) > 10
        for k, v in want.items():
            assert got[k]["orders"] == v["orders"]
            assert abs(got[k]["revenue"] - v["revenue"]) < 1e-6
        # one partition, the partition list (paged), a query
        k0 = sorted(want)[0]
        assert state(h, "customers", "?partition=" + k0) == got[k0]
        assert state(h, "customers", "/" + k0) == got[k0]
        r = h.get("/projections/customers/state?partition=nobody")
        assert r.status == 404 and "nobody" in r.json()["error"]
        keys, after = [], None
        while True:
            q = "?limit=7" + ("&after=" + after if after else "")
            r = h.get("/projections/customers/partitions" + q).json()
            keys += r["partitions"]
            after = r["next"]
            if after is None:
                break
        assert keys == sorted(want)
        top = h.get('/projections/customers/query/top?args={"n":3,"by":"orders"}')
        assert top.status == 200, top
        best = sorted(want.items(), key=lambda kv: (-kv[1]["orders"], kv[0]))[:3]
        assert [r["customer"] for r in top.json()] == [k for k, _ in best]
        assert h.post("/projections/customers/query/top", {"n": 1}).json()[0]["customer"] == \
            sorted(want.items(), key=lambda kv: (-round(kv[1]["revenue"], 2), kv[0]))[0][0]
        assert h.get("/projections/customers/query/nope").status in (400, 404)
        funnel = state(h, "order_funnel")
        assert funnel["orders"] == sum(1 for e in events if e["type"] == "OrderPlaced")
    finally:
        assert s.stop() == 0
        s.close()
    assert rebuild(data, str(pdir / "customers.lua")) == got
    assert rebuild(data, str(pdir / "order_funnel.lua")) == funnel


# ---------------------------------------------------------------- PUT, queries, live

def test_put_query_live_updates_and_persisted_source(tmp_path):
    data = tmp_path / "data"
    s = serve(tmp_path, data)
    try:
        h = s.http()
        r = h.request("PUT", "/projections/counts", COUNT_BY_TYPE)
        assert r.status == 201, r
        assert r.json()["origin"] == "api" and r.json()["status"] == "running"
        assert h.request("PUT", "/projections/counts", COUNT_BY_TYPE).status == 200  # same source
        live = SseClient(s.port, "/projections/counts/live")
        assert live.status == 200
        h.append("acct-1", [{"type": "Deposit", "data": {"amount": 5}},
                            {"type": "Withdrawal", "data": {"amount": 2}}])
        h.append("acct-2", {"type": "Deposit", "data": {"amount": 10}})
        caught_up(h, "counts")
        assert state(h, "counts") == {"n": 3, "by_type": {"Deposit": 2, "Withdrawal": 1}, "amount": 17}
        r = h.get('/projections/counts/query/count?args={"type":"Deposit"}')
        assert r.json() == {"n": 3, "type": "Deposit", "of_type": 2}
        r = h.get("/projections/counts/query/count?type=Withdrawal")  # plain parameters
        assert r.json()["of_type"] == 1
        # live: an update reflecting all three events arrives
        deadline = time.monotonic() + 10
        seen = None
        while time.monotonic() < deadline:
            m = live.next(timeout=2)
            assert m is not None
            if m["data"]:
                u = json.loads(m["data"])
                assert u["name"] == "counts"
                if u.get("position") == 3:
                    seen = u
                    break
        assert seen and seen["state"]["n"] == 3 and seen["status"] == "running"
        # coalesced: 60 appends in ~0.6 s give at most ~10 updates per second
        t0 = time.monotonic()
        for i in range(60):
            h.append("acct-3", {"type": "Deposit", "data": {"amount": 1}})
            time.sleep(0.01)
        caught_up(h, "counts")
        time.sleep(0.3)
        n = 0
        last = None
        while True:
            m = live.next(timeout=0.5)
            if m is None:
                break
            if m["data"]:
                n += 1
                last = json.loads(m["data"])
        elapsed = time.monotonic() - t0
        assert 1 <= n <= elapsed * 10 + 3, (n, elapsed)
        assert last["position"] == 63 and last["state"]["n"] == 63
        live.close()
        # the multiplexed /live carries it too
        mux = SseClient(s.port, "/live?sub=projection:counts")
        h.append("acct-4", {"type": "Deposit", "data": {"amount": 1}})
        m = mux.next(timeout=5)
        while m and not m["data"]:
            m = mux.next(timeout=5)
        assert m["event"] == "projection:counts" and json.loads(m["data"])["name"] == "counts"
        mux.close()
    finally:
        assert s.stop() == 0
        s.close()
    # a PUT projection survives a restart (source kept in the store)
    s = serve(tmp_path, data)
    try:
        h = s.http()
        st = status(h, "counts")
        assert st["origin"] == "api" and st["position"] == 64 and st["status"] == "running"
        assert state(h, "counts")["n"] == 64
        assert st["events"] == 0  # resumed from its checkpoint, not rebuilt
    finally:
        s.stop()
        s.close()


def test_errors_and_auth(tmp_path):
    tok = tmp_path / "tokens"
    write(str(tok), "s3cret\n")
    s = serve(tmp_path, tmp_path / "data", "--token-file", str(tok))
    auth = {"Authorization": "Bearer s3cret"}
    try:
        h = s.http()
        assert h.request("PUT", "/projections/x", FIXED).status == 401
        r = h.request("PUT", "/projections/x", "return { from = 'all', on = { A = function( } }",
                      headers=auth)
        assert r.status == 400 and r.json()["error"].startswith("x.lua:1:"), r
        assert r.json()["code"] == 400
        r = h.request("PUT", "/projections/x", "return 42", headers=auth)
        assert r.status == 400, r
        assert h.request("PUT", "/projections/x", "", headers=auth).status == 400
        assert h.request("PUT", "/projections/bad%20name", FIXED, headers=auth).status == 400
        assert h.get("/projections/x").status == 404  # nothing was created
        assert h.request("PUT", "/projections/x", FIXED, headers=auth).status == 201
        assert h.get("/projections/x").status == 200  # reads need no token
        assert h.get("/projections/x/state").json() == {"n": 0}
        assert h.post("/projections/x/command", {"command": "stop"}).status == 401
        r = h.post("/projections/x/command", {"command": "explode"}, headers=auth)
        assert r.status == 400 and "explode" in r.json()["error"]
        assert h.post("/projections/x/command", {"nope": 1}, headers=auth).status == 400
        assert h.post("/projections/y/stop", "", headers=auth).status == 404
        assert h.get("/projections/x/nothing").status == 404
        assert h.request("DELETE", "/projections", headers=auth).status == 405
        r = h.get("/projections/x/query/none")
        assert r.status in (400, 404) and "error" in r.json()
        r = h.get("/projections/x/query/q?args={bad")
        assert r.status == 400
    finally:
        s.stop()
        s.close()


# ---------------------------------------------------------------- faults

def test_faulted_projections_are_isolated_then_fixed_and_resumed(tmp_path):
    s = serve(tmp_path, tmp_path / "data", "--projection-cpu-limit", "0.3",
              "--projection-memory-limit", "64")
    try:
        h = s.http()
        for name, src in (("good", FIXED), ("rt", RUNTIME_ERROR), ("loop", JIT_LOOP),
                          ("mem", MEMORY_BOMB)):
            assert h.request("PUT", "/projections/" + name, src).status == 201
        ticks(h, "tick-1", 0, 10)
        faulted = wait_until(lambda: all(status(h, n)["status"] == "faulted"
                                         for n in ("rt", "loop", "mem")), timeout=30,
                             what="three faulted projections")
        assert faulted
        rt = status(h, "rt")["error"]
        assert rt["position"] == 8 and rt["type"] == "Tick" and "bad tick 7" in rt["message"]
        assert "traceback" in rt["traceback"]
        mem = status(h, "mem")["error"]
        assert "memory" in mem["message"] and mem["position"] == 6
        loop = status(h, "loop")["error"]
        assert "CPU" in loop["message"] and loop["position"] == 4 and loop["type"] == "Tick"
        assert h.get("/projections/rt/state").status == 409
        assert h.get("/projections").json()["projections"][0]["name"] == "good"
        # the good one keeps following; the server keeps answering
        ticks(h, "tick-1", 10, 5)
        caught_up(h, "good")
        assert state(h, "good") == {"n": 15}
        assert h.get("/health").status == 200
        m = h.get("/metrics").body.decode()
        assert 'tidemark_projection_faulted{name="rt"} 1' in m
        assert 'tidemark_projection_faulted{name="good"} 0' in m
        assert 'tidemark_projection_position{name="good"} 15' in m
        assert 'tidemark_projection_lag{name="good"} 0' in m
        assert 'tidemark_projection_events_total{name="good"} 15' in m
        # start again without a fix: it faults again at the same event
        assert h.post("/projections/rt/start", "").status == 200
        wait_until(lambda: status(h, "rt")["status"] == "faulted", what="rt faults again")
        assert status(h, "rt")["error"]["position"] == 8
        # fix (PUT) -> rebuilt and running
        for n in ("rt", "loop", "mem"):
            r = h.request("PUT", "/projections/" + n, FIXED)
            assert r.status == 200, r
        caught_up(h, "rt", "loop", "mem", "good")
        for n in ("rt", "loop", "mem"):
            assert state(h, n) == {"n": 15}
            assert status(h, n)["error"] is None
    finally:
        assert s.stop() == 0
        s.close()


def test_commands_stop_start_reset_delete(tmp_path):
    data = tmp_path / "data"
    s = serve(tmp_path, data)
    try:
        h = s.http()
        assert h.request("PUT", "/projections/c", FIXED).status == 201
        ticks(h, "tick-1", 0, 5)
        caught_up(h, "c")
        r = h.post("/projections/c/command", {"command": "stop"})
        assert r.status == 200 and r.json()["status"] == "stopped"
        ticks(h, "tick-1", 5, 5)
        time.sleep(0.2)
        st = status(h, "c")
        assert st["status"] == "stopped" and st["position"] == 5 and st["lag"] == 5
        assert h.get("/projections/c/state").status == 409
        assert h.get("/projections/c/state?partition=").json() == {"n": 5}  # stored state
        assert h.post("/projections/c/command", {"command": "start"}).json()["status"] == "running"
        caught_up(h, "c")
        assert state(h, "c") == {"n": 10}
        assert h.post("/projections/c/reset", "").status == 200
        caught_up(h, "c")
        assert state(h, "c") == {"n": 10}
        assert status(h, "c")["events"] >= 15  # 5 + 5 + a rebuild of 10... at least
        assert h.post("/projections/c/stop", "").status == 200
    finally:
        assert s.stop() == 0
        s.close()
    s = serve(tmp_path, data)  # stopped stays stopped across a restart
    try:
        h = s.http()
        assert status(h, "c")["status"] == "stopped"
        r = h.request("DELETE", "/projections/c")
        assert r.status == 200 and r.json()["status"] == "deleted"
        assert h.get("/projections/c").status == 404
        assert h.get("/projections").json()["projections"] == []
    finally:
        s.stop()
        s.close()
    s = serve(tmp_path, data)
    try:
        assert s.http().get("/projections/c").status == 404
    finally:
        s.stop()
        s.close()


# ---------------------------------------------------------------- reload, restart, crash

def test_sighup_reloads_the_directory(tmp_path, pdir):
    write(str(pdir / "a.lua"), FIXED)
    write(str(pdir / "gone.lua"), FIXED)
    s = serve(tmp_path, tmp_path / "data", "--projections", str(pdir))
    try:
        h = s.http()
        ticks(h, "tick-1", 0, 4)
        h.append("acct-1", {"type": "Deposit", "data": {"amount": 3}})
        caught_up(h, "a", "gone")
        v1 = status(h, "a")["version"]
        write(str(pdir / "a.lua"), COUNT_BY_TYPE)        # changed
        write(str(pdir / "b.lua"), PER_STREAM)           # new
        os.unlink(str(pdir / "gone.lua"))               # removed
        write(str(pdir / "broken.lua"), "return {")      # faulted, others unharmed
        s.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: {p["name"] for p in h.get("/projections").json()["projections"]}
                   == {"a", "b", "broken"}, what="reloaded set")
        caught_up(h, "a", "b")
        assert status(h, "a")["version"] != v1
        assert state(h, "a") == {"n": 5, "by_type": {"Tick": 4, "Deposit": 1}, "amount": 3}
        assert state(h, "b") == {"acct-1": {"events": 1, "total": 3}}
        br = status(h, "broken")
        assert br["status"] == "faulted" and "broken.lua:1:" in br["error"]["message"]
        assert s.proc.poll() is None
    finally:
        assert s.stop() == 0
        s.close()


def test_restart_resumes_from_checkpoints_and_equals_rebuild(tmp_path, pdir):
    write(str(pdir / "counts.lua"), COUNT_BY_TYPE)
    write(str(pdir / "per_stream.lua"), PER_STREAM)
    data = str(tmp_path / "data")
    s = serve(tmp_path, data, "--projections", str(pdir))
    try:
        h = s.http()
        for i in range(40):
            h.append("acct-%d" % (i % 7), [{"type": "Deposit", "data": {"amount": i}},
                                          {"type": "Fee", "data": {"amount": 0.5}}])
        caught_up(h, "counts", "per_stream")
        before = state(h, "per_stream")
    finally:
        assert s.stop() == 0
        s.close()
    s = serve(tmp_path, data, "--projections", str(pdir))
    try:
        h = s.http()
        st = status(h, "per_stream")
        assert st["position"] == 80 and st["events"] == 0  # from the checkpoint
        assert state(h, "per_stream") == before
        for i in range(10):
            h.append("acct-%d" % (i % 3), {"type": "Deposit", "data": {"amount": 100 + i}})
        caught_up(h, "counts", "per_stream")
        assert status(h, "per_stream")["events"] == 10
        served = {n: state(h, n) for n in ("counts", "per_stream")}
    finally:
        assert s.stop() == 0
        s.close()
    for n in served:
        assert rebuild(data, str(pdir / (n + ".lua"))) == served[n]


def test_kill9_during_processing_then_restart_equals_rebuild(tmp_path, pdir):
    write(str(pdir / "counts.lua"), COUNT_BY_TYPE)
    write(str(pdir / "per_stream.lua"), PER_STREAM)
    data = str(tmp_path / "data")
    s = serve(tmp_path, data, "--projections", str(pdir))
    stop = threading.Event()
    appended = [0]

    def appender(k):
        h = s.http()
        i = 0
        while not stop.is_set():
            try:
                r = h.append("acct-%d" % ((i + k) % 11),
                             [{"type": "Deposit", "data": {"amount": i % 97}} for _ in range(20)])
            except Exception:
                return
            if r.status == 201:
                appended[0] += 20
            i += 1

    ts = [threading.Thread(target=appender, args=(k,)) for k in range(3)]
    try:
        for t in ts:
            t.start()
        h = s.http()
        wait_until(lambda: appended[0] >= 3000 and status(h, "per_stream")["position"] > 0,
                   what="appends under way")
        s.proc.kill()  # kill -9 while both projections are processing
        s.proc.wait()
    finally:
        stop.set()
        for t in ts:
            t.join()
        s.close()
    s = serve(tmp_path, data, "--projections", str(pdir))
    try:
        h = s.http()
        caught_up(h, "counts", "per_stream")
        served = {n: state(h, n) for n in ("counts", "per_stream")}
        assert served["counts"]["n"] >= appended[0]
    finally:
        assert s.stop() == 0
        s.close()
    for n in served:
        assert rebuild(data, str(pdir / (n + ".lua"))) == served[n]


# A checkpoint only when asked (partition listing, stop): the read model
# served between checkpoints is the worker's live state.
PER_STREAM_NO_TIMER = PER_STREAM.replace("return {", "return {\n  checkpoint_ms = 3600000,", 1)


def test_state_is_live_between_checkpoints_and_kill9_equals_rebuild(tmp_path, pdir):
    write(str(pdir / "live.lua"), PER_STREAM_NO_TIMER)
    write(str(pdir / "timed.lua"), PER_STREAM)  # default: a checkpoint within ~100 ms
    data = str(tmp_path / "data")
    s = serve(tmp_path, data, "--projections", str(pdir))
    expect = defaultdict(lambda: {"events": 0, "total": 0})

    def deposit(h, stream, amount):
        assert h.append(stream, {"type": "Deposit", "data": {"amount": amount}}).status == 201
        expect[stream]["events"] += 1
        expect[stream]["total"] += amount

    try:
        h = s.http()
        for i in range(30):
            deposit(h, "acct-%d" % (i % 4), i)
        caught_up(h, "live", "timed")
        # the timed one commits on its own; the live one has committed nothing
        wait_until(lambda: status(h, "timed")["checkpoint"] == 30, what="timed checkpoint")
        st = status(h, "live")
        assert st["position"] == 30 and st["checkpoint"] == 0, st
        # ... yet every read reflects every applied event
        assert state(h, "live") == expect
        assert state(h, "live", "?partition=acct-1") == expect["acct-1"]
        assert state(h, "live", "?partition=acct-2") == expect["acct-2"]
        assert h.get("/projections/live/state?partition=acct-9").status == 404
        assert state(h, "live") == expect  # asking did not create acct-9
        big = max(expect, key=lambda k: expect[k]["total"])
        assert h.get("/projections/live/query/biggest").json() == {
            "stream": big, "total": expect[big]["total"]}
        assert status(h, "live")["checkpoint"] == 0
        # a partition listing reads the store: it commits first
        assert h.get("/projections/live/partitions").json() == {
            "partitions": ["acct-0", "acct-1", "acct-2", "acct-3"], "next": None}
        assert status(h, "live")["checkpoint"] == 30
        for i in range(17):
            deposit(h, "acct-%d" % (i % 6), 100 + i)
        caught_up(h, "live", "timed")
        st = status(h, "live")
        assert st["position"] == 47 and st["checkpoint"] == 30, st
        assert state(h, "live") == expect
        assert state(h, "live", "?partition=acct-5") == expect["acct-5"]  # not stored yet
        s.proc.kill()  # kill -9 between checkpoints
        s.proc.wait()
    finally:
        s.close()
    s = serve(tmp_path, data, "--projections", str(pdir))
    try:
        h = s.http()
        st = status(h, "live")
        # restarted from the last checkpoint, then re-processes the rest
        assert st["checkpoint"] == 30 and st["events"] in (0, 17), st
        caught_up(h, "live", "timed")
        assert status(h, "live")["events"] == 17
        served = {n: state(h, n) for n in ("live", "timed")}
        assert served["live"] == served["timed"] == expect
    finally:
        assert s.stop() == 0  # SIGTERM checkpoints what was applied
        s.close()
    for n in served:
        assert rebuild(data, str(pdir / (n + ".lua"))) == served[n]
    s = serve(tmp_path, data, "--projections", str(pdir))
    try:
        st = status(s.http(), "live")
        assert st["position"] == st["checkpoint"] == 47 and st["events"] == 0, st
    finally:
        assert s.stop() == 0
        s.close()


def test_put_overrides_file_until_the_file_changes(tmp_path, pdir):
    write(str(pdir / "p.lua"), FIXED)
    data = tmp_path / "data"
    s = serve(tmp_path, data, "--projections", str(pdir))
    try:
        h = s.http()
        ticks(h, "tick-1", 0, 3)
        assert h.request("PUT", "/projections/p", COUNT_BY_TYPE).status == 200
        caught_up(h, "p")
        assert state(h, "p")["n"] == 3 and status(h, "p")["origin"] == "api"
    finally:
        s.stop()
        s.close()
    s = serve(tmp_path, data, "--projections", str(pdir))
    try:  # the PUT source is newer than the unchanged file: it stays
        h = s.http()
        caught_up(h, "p")
        assert status(h, "p")["origin"] == "api" and state(h, "p")["n"] == 3
        write(str(pdir / "p.lua"), FIXED.replace("s.n + 1", "s.n + 2"))
        s.proc.send_signal(signal.SIGHUP)  # the file changed after the PUT: it wins
        wait_until(lambda: status(h, "p")["origin"] == "dir", what="file wins")
        caught_up(h, "p")
        assert state(h, "p") == {"n": 6}
    finally:
        s.stop()
        s.close()


# ---------------------------------------------------------------- batched lookups

def test_concurrent_partition_lookups_each_get_their_own_answer(tmp_path):
    """Lookups of one projection arriving together share one worker hop and
    one round trip to the projection's process (http.c lanes,
    projmgr_handle_many): under 32 concurrent connections every answer must
    still be the asked partition's own state, a missing partition its own
    404, another projection's lookups their own states, and a stopped
    projection's lookups the stored checkpoint."""
    data = tmp_path / "data"
    s = serve(tmp_path, data)
    try:
        h = s.http()
        assert h.request("PUT", "/projections/per", PER_STREAM).status == 201
        assert h.request("PUT", "/projections/all", COUNT_BY_TYPE).status == 201
        expect = {}
        for i in range(40):
            stream = "acct-%d" % i
            n = 1 + i % 5
            r = h.append(stream, [{"type": "Dep", "data": {"amount": i * 10 + k}} for k in range(n)])
            assert r.status == 201, r
            expect[stream] = {"events": n, "total": sum(i * 10 + k for k in range(n))}
        caught_up(h, "per", "all")
        total = sum(e["events"] for e in expect.values())
        errors = []

        def client(c):
            from conftest import Http
            hc = Http(s.port)
            try:
                for j in range(60):
                    i = (c * 7 + j) % 45  # 40..44 do not exist
                    stream = "acct-%d" % i
                    if j % 3 == 0:
                        r = hc.get("/projections/per/state/" + stream)
                    else:
                        r = hc.get("/projections/per/state?partition=" + stream)
                    if stream in expect:
                        if r.status != 200 or r.json() != expect[stream]:
                            errors.append((stream, r.status, r.body[:200]))
                    elif r.status != 404 or stream not in r.json()["error"]:
                        errors.append((stream, r.status, r.body[:200]))
                    if j % 10 == 0:
                        r = hc.get("/projections/all/state?partition=")
                        if r.status != 200 or r.json()["n"] != total:
                            errors.append(("all", r.status, r.body[:200]))
                    if j % 20 == 0:
                        r = hc.get("/projections/nosuch/state?partition=x")
                        if r.status != 404:
                            errors.append(("nosuch", r.status, r.body[:200]))
            finally:
                hc.close()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        # stopped: lookups answer from the stored checkpoint, batched or not
        assert h.post("/projections/per/command", {"command": "stop"}).status == 200
        for stream in ("acct-3", "acct-17"):
            assert h.get("/projections/per/state/" + stream).json() == expect[stream]
        assert h.get("/projections/per/state/acct-99").status == 404
    finally:
        assert s.stop() == 0
        s.close()
