"""End-to-end tests of `tidemark project`: the real binary over a data dir
filled with `tidemark import`, results checked against answers computed
independently in Python."""
import json
import os
import random
import subprocess
import time

import pytest

BIN = os.environ.get("TIDEMARK_BIN", os.path.join(os.path.dirname(__file__), "../../build/tidemark"))

EXAMPLE = """
return {
  from      = { category = "order" },
  partition = function(e) return e.data.customer end,
  init      = function() return { orders = 0, revenue = 0 } end,
  on = {
    OrderPlaced     = function(s, e) s.orders = s.orders + 1 end,
    PaymentReceived = function(s, e) s.revenue = s.revenue + e.data.amount end,
  },
  queries = {
    customers_over = function(m, args)
      local r = {}
      for k, s in pairs(m) do if s.revenue > args.min then r[#r + 1] = k end end
      table.sort(r)
      return r
    end,
  },
}
"""


def tm(*args, input=None, timeout=120):
    return subprocess.run([BIN, *map(str, args)], input=input, capture_output=True, text=True,
                          timeout=timeout)


def events(n=3000, customers=40, seed=7):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        c = "cust-%d" % rnd.randrange(customers)
        order = "order-%d" % (i // 2)
        if rnd.random() < 0.1:  # other categories are not selected
            out.append({"stream": "shipment-%d" % i, "type": "OrderPlaced", "data": {"customer": c}})
        elif i % 2 == 0:
            out.append({"stream": order, "type": "OrderPlaced", "data": {"customer": c, "items": rnd.randrange(5)}})
        else:
            out.append({"stream": order, "type": "PaymentReceived",
                        "data": {"customer": c, "amount": rnd.randrange(1, 10000) / 100}})
    return out


def expected(evs):
    m = {}
    for e in evs:
        if not e["stream"].startswith("order-"):
            continue
        s = m.setdefault(e["data"]["customer"], {"orders": 0, "revenue": 0})
        if e["type"] == "OrderPlaced":
            s["orders"] += 1
        else:
            s["revenue"] += e["data"]["amount"]
    return m


@pytest.fixture
def store(tmp_path):
    d = str(tmp_path / "data")
    evs = events()
    p = tm("import", "--data", d, "-", input="".join(json.dumps(e) + "\n" for e in evs))
    assert p.returncode == 0, p.stderr
    return d, evs


def write(tmp_path, name, src):
    f = tmp_path / name
    f.write_text(src)
    return str(f)


def test_example_projection_matches_independent_answer(store, tmp_path):
    d, evs = store
    f = write(tmp_path, "customers.lua", EXAMPLE)
    p = tm("project", "--data", d, f)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    want = expected(evs)
    assert sorted(got) == sorted(want)
    for k, s in want.items():
        assert got[k]["orders"] == s["orders"]
        assert got[k]["revenue"] == pytest.approx(s["revenue"], rel=1e-9)
    # keys are printed sorted (deterministic output)
    assert list(got) == sorted(got)
    # a second run prints byte-identical output
    assert tm("project", "--data", d, f).stdout == p.stdout


def test_query_get_top(store, tmp_path):
    d, evs = store
    f = write(tmp_path, "customers.lua", EXAMPLE)
    want = expected(evs)
    p = tm("project", "--data", d, f, "--query", "customers_over", '{"min": 500}')
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == sorted(k for k, s in want.items() if s["revenue"] > 500)
    k = sorted(want)[0]
    p = tm("project", "--data", d, f, "--get", k)
    assert json.loads(p.stdout)["orders"] == want[k]["orders"]
    p = tm("project", "--data", d, f, "--top", "orders:3")
    top = json.loads(p.stdout)
    assert [t["value"] for t in top] == sorted((s["orders"] for s in want.values()), reverse=True)[:3]


def test_unpartitioned_any_handler_and_emit_persist(store, tmp_path):
    d, evs = store
    src = """
    return { from = "all", init = function() return { n = 0, types = {} } end,
      on = { ["$any"] = function(s, e)
        s.n = s.n + 1
        s.types[e.type] = (s.types[e.type] or 0) + 1
        if e.position % 1000 == 0 then tm.emit("milestones", "Reached", { at = e.position }) end
      end } }
    """
    f = write(tmp_path, "count.lua", src)
    p = tm("project", "--data", d, f, "--persist")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["n"] == len(evs)
    # emitted events were appended; a second persisted run resumes and emits nothing new
    r = tm("read", "--data", d, "milestones")
    assert r.returncode == 0, r.stderr
    ms = [json.loads(l) for l in r.stdout.splitlines()]
    assert [m["data"]["at"] for m in ms] == [1000, 2000, 3000]
    p2 = tm("project", "--data", d, f, "--persist")
    assert p2.returncode == 0, p2.stderr
    # the milestone events themselves were handled on resume (they come after)
    assert json.loads(p2.stdout)["n"] == len(evs) + 3
    r2 = tm("read", "--data", d, "milestones")
    assert len(r2.stdout.splitlines()) == 3


def test_runtime_error_is_a_fault_with_position_and_traceback(store, tmp_path):
    d, _ = store
    src = """
    local function explode(e) error("bad event " .. e.position) end
    return { from = "all", on = { PaymentReceived = function(s, e)
      if e.position > 100 then explode(e) end end } }
    """
    f = write(tmp_path, "bad.lua", src)
    p = tm("project", "--data", d, f)
    assert p.returncode == 1
    assert "faulted at position" in p.stderr
    assert "PaymentReceived" in p.stderr
    assert "bad.lua:2:" in p.stderr
    assert "stack traceback" in p.stderr
    assert p.stdout == ""


def test_syntax_error_and_usage(store, tmp_path):
    d, _ = store
    f = write(tmp_path, "syn.lua", "return {\n on = {\n")
    p = tm("project", "--data", d, f)
    assert p.returncode == 1
    assert "syn.lua:" in p.stderr
    assert tm("project", "--data", d).returncode == 1
    assert tm("project", "--help").returncode == 0
    assert tm("project", "--data", "/nonexistent/x", f).returncode != 0


def test_sandbox_escapes_fail(store, tmp_path):
    d, _ = store
    for expr in ("io.open('/etc/passwd')", "os.execute('true')", "require('ffi')",
                 "loadstring(string.dump(print))", "debug.getinfo(1)"):
        f = write(tmp_path, "esc.lua", "return { on = { OrderPlaced = function(s, e) %s end } }" % expr)
        p = tm("project", "--data", d, f)
        assert p.returncode == 1, (expr, p.stdout)
        assert "faulted" in p.stderr


def test_jit_loop_is_stopped_by_the_cpu_limit(store, tmp_path):
    d, _ = store
    f = write(tmp_path, "spin.lua", """
    return { on = { PaymentReceived = function(s, e)
      if e.position > 50 then local n = 0 while true do n = n + 1 end end end } }
    """)
    t0 = time.monotonic()
    p = tm("project", "--data", d, f, "--cpu-limit", "0.5", timeout=30)
    took = time.monotonic() - t0
    assert p.returncode == 1
    assert "CPU limit exceeded" in p.stderr
    assert "JIT-compiled loop" in p.stderr or "CPU limit exceeded (0.5s)" in p.stderr
    assert "position" in p.stderr and "PaymentReceived" in p.stderr
    assert took < 15


def test_memory_limit(store, tmp_path):
    d, _ = store
    f = write(tmp_path, "hog.lua", """
    return { on = { OrderPlaced = function(s, e)
      s.t = s.t or {} for i = 1, 1e7 do s.t[#s.t + 1] = { i } end end } }
    """)
    p = tm("project", "--data", d, f, "--memory-limit", "32")
    assert p.returncode == 1
    assert "memory limit exceeded" in p.stderr


def test_isolated_worker_matches_and_resumes(store, tmp_path):
    d, evs = store
    f = write(tmp_path, "customers.lua", EXAMPLE)
    p = tm("project", "--data", d, f, "--isolate")
    assert p.returncode == 0, p.stderr
    assert p.stdout == tm("project", "--data", d, f).stdout
    # the checkpoint was committed by the host: a second run resumes, same answer
    p2 = tm("project", "--data", d, f, "--isolate")
    assert p2.returncode == 0, p2.stderr
    assert p2.stdout == p.stdout
    q = tm("project", "--data", d, f, "--isolate", "--query", "customers_over", '{"min": 500}')
    want = expected(evs)
    assert json.loads(q.stdout) == sorted(k for k, s in want.items() if s["revenue"] > 500)


def test_isolated_runaway_worker_is_reported(store, tmp_path):
    d, _ = store
    f = write(tmp_path, "spin.lua", """
    return { on = { PaymentReceived = function(s, e)
      local n = 0 while true do n = n + 1 end end } }
    """)
    t0 = time.monotonic()
    p = tm("project", "--data", d, f, "--isolate", "--cpu-limit", "0.5", timeout=30)
    assert p.returncode == 1
    assert "worker exited" in p.stderr and "CPU limit exceeded" in p.stderr
    assert time.monotonic() - t0 < 15


def test_dead_letters_skip_failing_events(store, tmp_path):
    d, evs = store
    f = write(tmp_path, "dl.lua", """
    return { from = "all", on_error = "dead_letter", checkpoint_every = 500,
      init = function() return { n = 0 } end,
      on = { ["$any"] = function(s, e)
        s.n = s.n + 1
        if e.position % 1000 == 7 then error("unlucky") end
      end } }
    """)
    for extra in ([], ["--persist"]):
        p = tm("project", "--data", d, f, *extra)
        assert p.returncode == 0, p.stderr
        bad = len([i for i in range(1, len(evs) + 1) if i % 1000 == 7])
        assert json.loads(p.stdout)["n"] == len(evs) - bad


def test_isolated_builtin_reads_match_in_process(store, tmp_path):
    d, evs = store
    f = write(tmp_path, "customers.lua", EXAMPLE)
    k = sorted(expected(evs))[0]
    for extra in (["--get", k], ["--top", "orders:3"], ["--partitions"]):
        a = tm("project", "--data", d, f, *extra)
        b = tm("project", "--data", d, f, "--isolate", *extra)
        assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
        assert a.stdout == b.stdout, extra
