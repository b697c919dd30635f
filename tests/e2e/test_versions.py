"""Versioned projections in `tidemark serve` (engine/projmgr.c, issue #6):
a PUT of a changed source builds the new version in the background (its
own worker, keys under proj/NAME@VERSION/) while the old version keeps
serving queries and live updates; once it has caught up with the live log
it replaces the old one in one atomic step.  No query ever sees a missing
or half-built model; a fault in the new version leaves the old one serving
(rebuild_error); a restart mid-rebuild serves the old version and resumes
the build.  "Equals a rebuild": the state served equals what `tidemark
project` prints for the same source over the same data once stopped."""
import json
import threading
import time

from conftest import SseClient, run_tidemark, start_server

V1 = """
return { from = "all", init = function() return { v = 1, n = 0 } end,
  on = { Tick = function(s, e) s.n = s.n + 1 end } }
"""
# v2 counts the same events (so `n` never goes back across the swap) and
# burns some CPU per event so that its rebuild takes a while
V2 = """
return { from = "all", init = function() return { v = 2, n = 0, sum = 0 } end,
  on = { Tick = function(s, e)
    local x = 0
    for j = 1, 4000 do x = x + (j % 7) end
    s.n = s.n + 1
    s.sum = s.sum + e.data.i + (x - x)
  end } }
"""
V2_BAD = """
return { from = "all", init = function() return { v = 2, n = 0 } end,
  on = { Tick = function(s, e)
    if e.data.i == 777 then error("bad tick " .. e.data.i) end
    s.n = s.n + 1 end } }
"""
# emits one event per 100 ticks; the gate drops them while rebuilding
V2_EMIT = """
return { from = { category = "tick" }, init = function() return { v = 2, n = 0 } end,
  on = { Tick = function(s, e)
    s.n = s.n + 1
    if e.data.i % 100 == 0 then tm.emit("marks-1", "Mark", { i = e.data.i }) end
  end } }
"""


def wait_until(fn, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s (last %r)" % (what, last))


def status(h, name="p"):
    r = h.get("/projections/" + name)
    assert r.status == 200, r
    return r.json()


def state(h, name="p"):
    r = h.get("/projections/%s/state" % name)
    assert r.status == 200, r
    return r.json()


def ticks(h, start, n, stream="tick-1"):
    for a in range(start, start + n, 1000):
        body = [{"type": "Tick", "data": {"i": i}} for i in range(a, min(a + 1000, start + n))]
        r = h.append(stream, body)
        assert r.status == 201, r


def settled(h, version, name="p"):
    """Serving `version`, nothing building, caught up."""
    def ok():
        st = status(h, name)
        last = h.get("/projections").json()["last_position"]
        return (st["status"] == "running" and st["version"] == version and
                st["rebuilding"] is None and st["position"] == last and st) or None
    return wait_until(ok, what="projection serving %s" % version)


def project(data, path):
    r = run_tidemark("project", "--data", data, path, "--quiet")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def put(h, src, name="p"):
    r = h.request("PUT", "/projections/" + name, src)
    assert r.status in (200, 201), r
    return r.json()


def test_swap_under_live_appends_no_query_sees_a_gap(tmp_path):
    data = str(tmp_path / "data")
    s = start_server(data, log_dir=str(tmp_path))
    try:
        h = s.http()
        ticks(h, 0, 20000)
        v1 = put(h, V1)["version"]
        settled(h, v1)
        live = SseClient(s.port, "/projections/p/live")
        assert live.status == 200
        stop = threading.Event()
        seen, problems = [], []

        def reader():
            q = s.http()
            while not stop.is_set():
                r = q.get("/projections/p/state")
                if r.status != 200:
                    problems.append(r)
                    continue
                seen.append(r.json())

        def writer():
            w = s.http()
            i = 20000
            while not stop.is_set():
                ticks(w, i, 50)
                i += 50
                time.sleep(0.01)

        threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.2)
            p0 = h.get("/projections").json()["last_position"]
            st = put(h, V2)
            # the old version still serves; the new one builds beside it
            assert st["version"] == v1 and st["rebuilding"] is not None, st
            v2 = st["rebuilding"]["version"]
            assert v2 != v1
            # while it builds, the status reports it and the old model answers
            mid = wait_until(lambda: (lambda x: x["rebuilding"] and x["rebuilding"]["position"] > 0
                                      and x)(status(h)), what="rebuild progress")
            assert mid["version"] == v1 and state(h)["v"] == 1
            wait_until(lambda: status(h)["version"] == v2, what="swap")
            time.sleep(0.3)  # queries and appends go on after the swap
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not problems, problems[:3]
        assert len(seen) > 20
        # every answer is a whole model: v1 then v2, `n` never goes back
        vs = [x["v"] for x in seen]
        assert vs[0] == 1 and vs[-1] == 2 and vs == sorted(vs), "version went back"
        ns = [x["n"] for x in seen]
        assert all(b >= a for a, b in zip(ns, ns[1:])), "a query saw a reset model"
        assert min(ns) >= 20000
        final = settled(h, v2)
        assert final["rebuild_error"] is None
        served = state(h)
        # live updates: the old version pushed while the new one built, then the new one
        ups = []
        while True:
            m = live.next(timeout=1)
            if m is None:
                break
            if m["data"]:
                u = json.loads(m["data"])
                if "state" in u:
                    ups.append(u)
        live.close()
        uv = [u["state"]["v"] for u in ups]
        assert uv == sorted(uv) and uv[-1] == 2, uv
        assert any(u["state"]["v"] == 1 and u["position"] > p0 and u.get("rebuilding")
                   for u in ups), "no live update from the old version during the build"
        un = [u["state"]["n"] for u in ups]
        assert all(b >= a for a, b in zip(un, un[1:]))
    finally:
        s.stop()
        s.close()
    path = str(tmp_path / "v2.lua")
    with open(path, "w") as f:
        f.write(V2)
    assert served == project(data, path)
    assert "projection version swapped in" in s.stderr()


def test_fault_in_new_version_leaves_the_old_serving(tmp_path):
    data = str(tmp_path / "data")
    s = start_server(data, log_dir=str(tmp_path))
    try:
        h = s.http()
        ticks(h, 0, 2000)
        v1 = put(h, V1)["version"]
        settled(h, v1)
        put(h, V2_BAD)
        st = wait_until(lambda: (lambda x: x["rebuild_error"] and x)(status(h)),
                        what="rebuild_error")
        assert st["version"] == v1 and st["status"] == "running" and st["rebuilding"] is None
        err = st["rebuild_error"]
        assert "bad tick 777" in err["message"] and err["type"] == "Tick", err
        assert err["position"] == 778  # the 778th event of the log
        assert state(h) == {"v": 1, "n": 2000}
        # the old version still follows the log
        ticks(h, 2000, 10)
        settled(h, v1)
        assert state(h) == {"v": 1, "n": 2010}
        # no staged keys are left behind: a good PUT afterwards builds and swaps
        v2 = put(h, V2)["rebuilding"]["version"]
        settled(h, v2)
        assert status(h)["rebuild_error"] is None
        assert state(h)["v"] == 2 and state(h)["n"] == 2010
    finally:
        s.stop()
        s.close()


def test_restart_mid_rebuild_serves_old_and_resumes(tmp_path):
    data = str(tmp_path / "data")
    s = start_server(data, log_dir=str(tmp_path))
    try:
        h = s.http()
        ticks(h, 0, 40000)
        v1 = put(h, V1)["version"]
        settled(h, v1)
        v2 = put(h, V2)["rebuilding"]["version"]
        # stop once the build has checkpointed part of the way
        wait_until(lambda: (lambda x: x["rebuilding"] and x["rebuilding"]["position"] > 5000
                            and x)(status(h)), what="rebuild progress")
        assert status(h)["version"] == v1
    finally:
        assert s.stop() == 0
        s.close()
    s = start_server(data, log_dir=str(tmp_path))
    try:
        h = s.http()
        first = status(h)
        # whatever the timing: a whole model answers (v1 before the swap)
        st = state(h)
        assert st["n"] == 40000 and st["v"] in (1, 2)
        assert first["version"] == v1 and first["rebuilding"]["version"] == v2, first
        settled(h, v2)
        assert state(h)["n"] == 40000 and state(h)["v"] == 2
    finally:
        s.stop()
        s.close()
    log = s.stderr()
    assert "its new version resumes building" in log
    # the build resumed from its staged checkpoint, not from position 0
    starts = [int(l.rsplit("from=", 1)[1]) for l in log.splitlines()
              if "projection version building" in l]
    assert len(starts) == 1 and starts[0] > 5000, starts


def test_emits_are_gated_while_rebuilding(tmp_path):
    data = str(tmp_path / "data")
    s = start_server(data, log_dir=str(tmp_path))
    try:
        h = s.http()
        ticks(h, 0, 1000)
        v1 = put(h, V1)["version"]
        settled(h, v1)
        v2 = put(h, V2_EMIT)["rebuilding"]["version"]
        settled(h, v2)
        # history was re-projected without side effects
        r = h.get("/streams/marks-1")
        assert r.status in (200, 404), r
        assert r.status == 404 or r.json().get("events", []) == [], r.json()
        # live events after the swap emit
        ticks(h, 1000, 101)
        settled(h, v2)

        def marks():
            r = h.get("/streams/marks-1")
            return r.status == 200 and [e["data"]["i"] for e in r.json()["events"]]
        assert wait_until(marks, what="emitted marks") == [1000, 1100]
    finally:
        s.stop()
        s.close()


def test_put_while_building_cancels_or_replaces_the_build(tmp_path):
    data = str(tmp_path / "data")
    s = start_server(data, log_dir=str(tmp_path))
    try:
        h = s.http()
        ticks(h, 0, 40000)
        v1 = put(h, V1)["version"]
        settled(h, v1)
        # the serving source again while v2 builds: the build is dropped
        v2 = put(h, V2)["rebuilding"]["version"]
        st = put(h, V1)
        assert st["version"] == v1 and st["rebuilding"] is None, st
        time.sleep(0.5)
        assert status(h)["version"] == v1 and state(h) == {"v": 1, "n": 40000}
        # the building source again: a no-op; another source: replaces the build
        assert put(h, V2)["rebuilding"]["version"] == v2
        assert put(h, V2)["rebuilding"]["version"] == v2
        v3_src = V2.replace("v = 2", "v = 3")
        v3 = put(h, v3_src)["rebuilding"]["version"]
        assert v3 not in (v1, v2)
        settled(h, v3)
        assert state(h)["v"] == 3 and state(h)["n"] == 40000
    finally:
        s.stop()
        s.close()
    assert s.stderr().count("projection version swapped in") == 1


# Partitioned versions: built on several worker processes, split by the
# router's partition key (projmgr.c, "sharded builds").
P1 = """
return { from = "all", partition = function(e) return e.data.c end,
  init = function() return { v = 1, n = 0 } end,
  on = { Tick = function(s, e) s.n = s.n + 1 end } }
"""
P2 = """
return { from = "all", partition = function(e) return e.data.c end,
  init = function() return { v = 2, n = 0, sum = 0 } end,
  on = { Tick = function(s, e)
    local x = 0
    for j = 1, 4000 do x = x + (j % 7) end
    s.n = s.n + 1
    s.sum = s.sum + e.data.i + (x - x)
  end } }
"""
P2_BAD = P2.replace("s.n = s.n + 1\n", "if e.data.i == 777 then error('bad tick ' .. e.data.i) end\n    s.n = s.n + 1\n", 1)


def cticks(h, start, n, stream="tick-1"):
    for a in range(start, start + n, 1000):
        body = [{"type": "Tick", "data": {"i": i, "c": "c-%d" % (i % 37)}}
                for i in range(a, min(a + 1000, start + n))]
        r = h.append(stream, body)
        assert r.status == 201, r


def test_sharded_swap_under_live_appends_equals_project(tmp_path):
    data = str(tmp_path / "data")
    s = start_server(data, "--rebuild-workers", "2", log_dir=str(tmp_path))
    try:
        h = s.http()
        cticks(h, 0, 20000)
        v1 = put(h, P1)["version"]
        settled(h, v1)
        stop = threading.Event()
        seen, problems = [], []

        def reader():
            q = s.http()
            while not stop.is_set():
                r = q.get("/projections/p/state/c-7")
                if r.status != 200:
                    problems.append(r)
                    continue
                seen.append(r.json())

        def writer():
            w = s.http()
            i = 20000
            while not stop.is_set():
                cticks(w, i, 50)
                i += 50
                time.sleep(0.01)

        threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
        for t in threads:
            t.start()
        try:
            st = put(h, P2)
            assert st["version"] == v1 and st["rebuilding"] is not None, st
            v2 = st["rebuilding"]["version"]
            mid = wait_until(lambda: (lambda x: x["rebuilding"] and x["rebuilding"]["position"] > 0
                                      and x)(status(h)), what="rebuild progress")
            assert mid["rebuilding"]["workers"] == 2, mid
            wait_until(lambda: status(h)["version"] == v2, what="swap")
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not problems, problems[:3]
        vs = [x["v"] for x in seen]
        assert vs[0] == 1 and vs[-1] == 2 and vs == sorted(vs), "version went back"
        ns = [x["n"] for x in seen]
        assert all(b >= a for a, b in zip(ns, ns[1:])), "a query saw a reset partition"
        settled(h, v2)
        served = state(h)
        assert len(served) == 37
        # after the swap one worker serves the merged model and follows the log
        cticks(h, 900000, 37)
        settled(h, v2)
        assert state(h)["c-7"]["n"] == served["c-7"]["n"] + 1
        served = state(h)
    finally:
        s.stop()
        s.close()
    path = str(tmp_path / "p2.lua")
    with open(path, "w") as f:
        f.write(P2)
    assert served == project(data, path)
    log = s.stderr()
    assert "workers=2" in log and "projection version swapped in" in log


def test_sharded_fault_is_confirmed_on_one_worker(tmp_path):
    data = str(tmp_path / "data")
    s = start_server(data, "--rebuild-workers", "2", log_dir=str(tmp_path))
    try:
        h = s.http()
        cticks(h, 0, 2000)
        v1 = put(h, P1)["version"]
        settled(h, v1)
        put(h, P2_BAD)
        st = wait_until(lambda: (lambda x: x["rebuild_error"] and x)(status(h)),
                        what="rebuild_error")
        assert st["version"] == v1 and st["status"] == "running" and st["rebuilding"] is None
        err = st["rebuild_error"]
        assert "bad tick 777" in err["message"] and err["type"] == "Tick", err
        assert err["position"] == 778
        assert state(h)["c-7"] == {"v": 1, "n": len(range(7, 2000, 37))}
        v2 = put(h, P2)["rebuilding"]["version"]
        settled(h, v2)
        assert status(h)["rebuild_error"] is None and state(h)["c-7"]["v"] == 2
    finally:
        s.stop()
        s.close()
    assert "building on one worker" in s.stderr()


def test_sharded_restart_mid_rebuild_resumes_each_shard(tmp_path):
    data = str(tmp_path / "data")
    s = start_server(data, "--rebuild-workers", "2", log_dir=str(tmp_path))
    try:
        h = s.http()
        cticks(h, 0, 60000)
        v1 = put(h, P1)["version"]
        settled(h, v1)
        v2 = put(h, P2)["rebuilding"]["version"]
        wait_until(lambda: (lambda x: x["rebuilding"] and x["rebuilding"]["position"] > 8000
                            and x)(status(h)), what="rebuild progress")
    finally:
        assert s.stop() == 0
        s.close()
    s = start_server(data, "--rebuild-workers", "2", log_dir=str(tmp_path))
    try:
        h = s.http()
        first = status(h)
        assert first["version"] == v1 and first["rebuilding"]["version"] == v2, first
        settled(h, v2)
        served = state(h)
    finally:
        s.stop()
        s.close()
    path = str(tmp_path / "p2.lua")
    with open(path, "w") as f:
        f.write(P2)
    assert served == project(data, path)
    starts = [int(l.rsplit("from=", 1)[1]) for l in s.stderr().splitlines()
              if "projection version building" in l]
    assert len(starts) == 1 and starts[0] > 5000, starts


def test_rebuild_command_rebuilds_the_serving_source_beside_it(tmp_path):
    """POST /projections/NAME/rebuild: the serving source is built again from
    position 0 as a version beside the serving model (on two workers here)
    and swapped in; a stopped projection answers 409."""
    data = str(tmp_path / "data")
    s = start_server(data, "--rebuild-workers", "2", log_dir=str(tmp_path))
    try:
        h = s.http()
        cticks(h, 0, 30000)
        v2 = put(h, P2)["version"]
        settled(h, v2)
        served = state(h)
        r = h.request("POST", "/projections/p/rebuild")
        assert r.status == 200, r
        st = r.json()
        assert st["version"] == v2 and st["rebuilding"]["version"] == v2, st
        assert st["rebuilding"]["workers"] == 2, st
        # the serving model answers throughout
        assert state(h)["c-7"] == served["c-7"]
        wait_until(lambda: status(h)["rebuilding"] is None, what="the rebuild's swap")
        after = settled(h, v2)
        assert after["rebuild_error"] is None
        assert state(h) == served
        assert after["checkpoint"] == 30000  # the swap's one checkpoint, at the log's end
        # a stopped projection is not rebuilt
        assert h.request("POST", "/projections/p/stop").status == 200
        r = h.request("POST", "/projections/p/rebuild")
        assert r.status == 409 and "not running" in r.json()["error"], r
        r = h.request("POST", "/projections/p/command", '{"command":"bogus"}')
        assert r.status == 400 and "rebuild" in r.json()["error"], r
    finally:
        s.stop()
        s.close()
    path = str(tmp_path / "p2.lua")
    with open(path, "w") as f:
        f.write(P2)
    assert served == project(data, path)
    log = s.stderr()
    assert "command=rebuild" in log and "workers=2" in log
    assert log.count("projection version swapped in") == 1
