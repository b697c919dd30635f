"""End-to-end tests of `tidemark repl`: -e / -f / stdin scripts, ad-hoc
query results checked against answers computed here in Python from the
same generated events, output formats, and the interactive prompt in a
real terminal (pexpect): evaluation, multi-line input, error recovery,
completion, history across sessions, Ctrl-C."""
import contextlib
import csv
import io
import json
import math
import os
import random
import pathlib
import subprocess
import tempfile
import time
from collections import Counter, defaultdict

import pexpect
import pytest

BIN = os.environ.get("TIDEMARK_BIN", os.path.join(os.path.dirname(__file__), "../../build/tidemark"))
ROOT = os.path.join(os.path.dirname(__file__), "../..")
BASE_TIME = 1700000000000
TYPES = ["OrderPlaced", "PaymentReceived", "OrderShipped"]


def gen_events(n, seed=7):
    rnd = random.Random(seed)
    evs = []
    for i in range(n):
        kind = rnd.random()
        if kind < 0.8:
            stream = "order-%d" % rnd.randrange(40)
        else:
            stream = "customer-%d" % rnd.randrange(10)
        ev = {
            "stream": stream,
            "type": rnd.choice(TYPES),
            "data": {"amount": rnd.randrange(1, 500), "customer": "c%02d" % rnd.randrange(25),
                     "region": rnd.choice(["eu", "us", "apac"])},
            "time": BASE_TIME + i * 1500 + rnd.randrange(1000),
        }
        if rnd.random() < 0.05:
            del ev["data"]["amount"]
        if i % 7 == 0:
            ev["metadata"] = {"correlation_id": "k%d" % i}
        evs.append(ev)
    return evs


EVENTS = gen_events(3000)


def run(*args, input=None, data=None, check=None, env=None):
    cmd = [BIN, "repl"]
    if data:
        cmd += ["--data", data]
    cmd += list(map(str, args))
    p = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60,
                       env=env or os.environ)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def rj(data, chunk):
    """Run a chunk with --format json and parse the output."""
    return json.loads(run("--format", "json", "-e", chunk, data=data, check=0).stdout)


# Own temporary directories: pytest's shared basetemp rotation can remove
# directories of a run while other test runs start on the same machine.
@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="tm-repl-") as d:
        yield pathlib.Path(d)


@pytest.fixture(scope="module")
def data():
    with tempfile.TemporaryDirectory(prefix="tm-repl-data-") as top:
        yield _import(os.path.join(top, "data"))


def _import(d):
    text = "".join(json.dumps(e) + "\n" for e in EVENTS)
    p = subprocess.run([BIN, "import", "--data", d, "-"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return d


def category(stream):
    return stream.split("-", 1)[0]


# ---------------------------------------------------------------- scripts

def test_expressions_statements_and_values(data):
    assert run("-e", "1+1", data=data, check=0).stdout == "2\n"
    assert run("-e", "x = 5", data=data, check=0).stdout == ""
    assert run("-e", "local x = 5 return x * 2", data=data, check=0).stdout == "10\n"
    assert run("-e", "1, 'a', nil", data=data, check=0).stdout == "1\ta\tnil\n"
    assert run("-e", "{a=1, b={1,2}}", data=data, check=0).stdout == "{ a = 1, b = { 1, 2 } }\n"
    assert run("-e", "last_position()", data=data, check=0).stdout == "%d\n" % len(EVENTS)


def test_errors_exit_status(data, tmp_path):
    p = run("-e", "local function f() error('boom') end f()", data=data)
    assert p.returncode == 1
    assert "boom" in p.stderr and "stack traceback" in p.stderr
    p = run("-e", "x = = 1", data=data)
    assert p.returncode == 1 and "error:" in p.stderr
    p = run("-e", "from{}:where(function(e) return e.data.nope.x end):count()", data=data)
    assert p.returncode == 1 and "nope" in p.stderr
    # not found: no such data dir; usage errors
    assert run("-e", "1", data=str(tmp_path / "missing")).returncode == 2
    assert run("-e", "1").returncode == 1
    assert run("-e", "1", "-f", "x.lua", data=data).returncode == 1
    assert run("-f", str(tmp_path / "nope.lua"), data=data).returncode == 2
    # the sandbox: no io / os.execute / ffi / bytecode
    p = run("-e", "io.open('/etc/passwd')", data=data)
    assert p.returncode == 1
    p = run("-e", "os.execute('true')", data=data)
    assert p.returncode == 1
    assert run("-e", "require", data=data, check=0).stdout == "nil\n"
    assert run("-e", "os.time() > 0", data=data, check=0).stdout == "true\n"
    # nothing typed can crash it: stack overflow, memory cap, bytecode
    p = run("-e", "function f() return 1 + f() end f()", data=data)
    assert p.returncode == 1 and "stack overflow" in p.stderr  # or "(stack overflow?)"
    p = run("-e", "string.rep('x', 2^31 - 1)", data=data)
    assert p.returncode == 1 and "not enough memory" in p.stderr
    p = run("-e", "loadstring('\\27LJ')", data=data, check=0)
    assert "binary chunk" in p.stdout
    # the CPU limit: a JIT-compiled loop is abandoned with its Lua state
    p = run("--cpu-limit", "0.5", "-e", "local x = 0 while true do x = x + 1 end", data=data)
    assert p.returncode == 1 and "CPU limit exceeded" in p.stderr


def test_f_file_and_stdin(data, tmp_path):
    f = tmp_path / "s.lua"
    f.write_text("local n = from{category='order'}:count()\nprint('events', n)\nreturn n\n")
    n = sum(1 for e in EVENTS if category(e["stream"]) == "order")
    p = run("-f", str(f), data=data, check=0)
    assert p.stdout == "events\t%d\n%d\n" % (n, n)
    p = run(data=data, input="1 + 41", check=0)
    assert p.stdout == "42\n"
    p = run(data=data, input="error('x')")
    assert p.returncode == 1


def test_group_by_count_matches_python(data):
    got = rj(data, 'from{category="order"}:group_by("type"):count()')
    want = Counter(e["type"] for e in EVENTS if category(e["stream"]) == "order")
    assert {r["type"]: r["count"] for r in got} == dict(want)
    assert [r["type"] for r in got] == sorted(want)  # ordered by key
    assert rj(data, "from{}:count()") == len(EVENTS)


def test_where_sum_avg_min_max(data):
    sel = [e for e in EVENTS if e["data"].get("amount", 0) > 100]
    got = rj(data, 'from{}:where(function(e) return (e.data.amount or 0) > 100 end)'
                   ':group_by("data.customer"):sum("data.amount")')
    want = defaultdict(int)
    for e in sel:
        want[e["data"]["customer"]] += e["data"]["amount"]
    assert {r["data.customer"]: r["sum"] for r in got} == dict(want)
    got = rj(data, 'from{}:group_by("data.region"):agg{n="count", lo={"min","data.amount"},'
                   'hi={"max","data.amount"}, mean={"avg","data.amount"}}')
    for r in got:
        rows = [e for e in EVENTS if e["data"]["region"] == r["data.region"]]
        amounts = [e["data"]["amount"] for e in rows if "amount" in e["data"]]
        assert r["n"] == len(rows)
        assert r["lo"] == min(amounts) and r["hi"] == max(amounts)
        assert math.isclose(r["mean"], sum(amounts) / len(amounts), rel_tol=1e-9)
    assert len(got) == 3
    # where(field, value) and function keys
    got = rj(data, 'from{}:where("type", "OrderShipped"):group_by(function(e) return e.data.region end):count()')
    want = Counter(e["data"]["region"] for e in EVENTS if e["type"] == "OrderShipped")
    assert {r["key1"]: r["count"] for r in got} == dict(want)
    assert rj(data, 'from{}:avg("data.amount")') == pytest.approx(
        sum(e["data"]["amount"] for e in EVENTS if "amount" in e["data"]) /
        sum(1 for e in EVENTS if "amount" in e["data"]))


def test_lazy_event_fields(data):
    # stream, id, metadata, category: inside the scan and on events kept
    # after their batch (read back by position)
    got = rj(data, 'local keep = {} from{}:each(function(e) keep[#keep + 1] = e end) '
                   'local out = {} for _, i in ipairs({1, 300, 2999}) do local e = keep[i] '
                   'out[#out + 1] = {e.position, e.stream, e.category, e.metadata.correlation_id or false, #e.id} end '
                   'return out')
    for row, i in zip(got, (1, 300, 2999)):
        e = EVENTS[i - 1]
        assert row == [i, e["stream"], category(e["stream"]), e.get("metadata", {}).get("correlation_id", False), 36]
    got = rj(data, 'from{}:where(function(e) return e.metadata.correlation_id ~= nil end):group_by("category"):count()')
    want = Counter(category(e["stream"]) for e in EVENTS if "metadata" in e)
    assert {r["category"]: r["count"] for r in got} == dict(want)
    got = rj(data, 'from{}:where(function(e) return e.stream == "order-7" end):count()')
    assert got == sum(1 for e in EVENTS if e["stream"] == "order-7")


def test_selectors(data):
    want = sum(1 for e in EVENTS if e["type"] in ("OrderPlaced", "OrderShipped"))
    assert rj(data, 'from{types={"OrderPlaced","OrderShipped"}}:count()') == want
    want = sum(1 for e in EVENTS if e["stream"] in ("order-1", "customer-2"))
    assert rj(data, 'from{streams={"order-1","customer-2"}}:count()') == want
    want = sum(1 for e in EVENTS if e["stream"] == "order-3")
    assert rj(data, 'from{stream="order-3"}:count()') == want
    assert rj(data, 'from{type="PaymentReceived"}:count()') == sum(1 for e in EVENTS if e["type"] == "PaymentReceived")
    got = rj(data, 'from{}:group_by("category", "type"):count()')
    want = Counter((category(e["stream"]), e["type"]) for e in EVENTS)
    assert {(r["category"], r["type"]): r["count"] for r in got} == dict(want)
    assert [(r["category"], r["type"]) for r in got] == sorted(want)
    p = run("-e", 'from{colour="red"}:count()', data=data)
    assert p.returncode == 1 and "unknown selector" in p.stderr


def test_category_mostly_in_the_log_is_read_by_a_scan(tmp_path):
    """A category (or type) holding >= 80% of the positions is read by a
    scan of the log filtered in the REPL instead of its index: the same
    events, in the same order, serially and on every worker, also from a
    position; a small category still goes through its index."""
    evs = []
    for i in range(400):
        if i % 20 == 7:
            evs.append({"stream": "user-%d" % (i % 3), "type": "Seen", "data": {"n": i}})
        else:
            evs.append({"stream": "order-%d" % (i % 9), "type": "Placed" if i % 2 else "Paid",
                        "data": {"n": i, "customer": "c%d" % (i % 5)}})
    d = str(tmp_path / "data")
    text = "".join(json.dumps(e) + "\n" for e in evs)
    p = subprocess.run([BIN, "import", "--data", d, "-"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    order = [e["data"]["n"] for e in evs if e["stream"].startswith("order-")]
    user = [e["data"]["n"] for e in evs if e["stream"].startswith("user-")]
    assert rj(d, 'from{category="order"}:count()') == len(order)
    assert rj(d, 'from{category="user"}:count()') == len(user)
    assert rj(d, 'from{type="Seen"}:count()') == len(user)
    # every event, in position order, also from a position
    def ns(q):
        return [r["value"] for r in rj(d, q + ':map(function(e) return e.data.n end, 1000)')]
    assert ns('from{category="order"}') == order
    assert ns('from{category="user"}') == user
    later = [e["data"]["n"] for i, e in enumerate(evs)
             if i + 1 >= 101 and e["stream"].startswith("order-")]
    assert ns('from{category="order", from=101}') == later
    want = Counter("c%d" % (n % 5) for n in order)
    for w in ("1", "2"):
        got = json.loads(run("--workers", w, "--format", "json", "-e",
                             'from{category="order"}:group_by("data.customer"):count()',
                             data=d, check=0).stdout)
        assert {r["data.customer"] if "data.customer" in r else r["customer"]: r["count"]
                for r in got} == dict(want), got


def test_distinct_percentiles_top(data):
    d = rj(data, 'from{}:distinct("data.customer")')
    assert abs(d - 25) <= 1
    got = rj(data, 'from{}:group_by("type"):distinct("stream")')
    for r in got:
        exact = len({e["stream"] for e in EVENTS if e["type"] == r["type"]})
        assert abs(r["distinct"] - exact) <= max(1, exact * 0.03)
    got = rj(data, 'from{}:percentiles("data.amount", {0.5, 0.95, 0.99})')[0]
    amounts = sorted(e["data"]["amount"] for e in EVENTS if "amount" in e["data"])
    for p, col in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        rank = sorted(amounts).index(got[col]) if got[col] in amounts else None
        assert rank is not None, (col, got[col])
        # within 1% of the rank (a sketch may answer a neighbour)
        lo = amounts[max(0, math.ceil(p * len(amounts)) - 1 - len(amounts) // 100)]
        hi = amounts[min(len(amounts) - 1, math.ceil(p * len(amounts)) - 1 + len(amounts) // 100)]
        assert lo <= got[col] <= hi, (col, got[col], lo, hi)
    got = rj(data, 'from{}:top(3, "data.customer")')
    counts = Counter(e["data"]["customer"] for e in EVENTS)
    want = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    assert [(r["data.customer"], r["count"]) for r in got] == want


def test_windows(data):
    got = rj(data, 'from{}:window(60000):count()')
    want = Counter((e["time"] - e["time"] % 60000) for e in EVENTS)
    import datetime
    def iso(ms):
        return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ms % 1000)
    assert {r["window"]: r["count"] for r in got} == {iso(k): v for k, v in want.items()}
    assert [r["window"] for r in got] == sorted(iso(k) for k in want)


def test_read_and_listing(data):
    got = rj(data, 'read("order-1", {limit=2})')
    evs = [e for e in EVENTS if e["stream"] == "order-1"]
    assert [r["version"] for r in got] == [0, 1]
    assert [r["type"] for r in got] == [e["type"] for e in evs[:2]]
    assert got[0]["data"] == evs[0]["data"]
    got = rj(data, 'read("order-1", {backward=true, limit=1})')
    assert got[0]["version"] == len(evs) - 1
    got = rj(data, "streams()")
    assert {r["stream"] for r in got} == {e["stream"] for e in EVENTS}
    got = rj(data, "categories()")
    assert [r["category"] for r in got] == ["customer", "order"]
    got = rj(data, 'from{}:where("data.customer", "c03"):list(3)')
    want = [i + 1 for i, e in enumerate(EVENTS) if e["data"]["customer"] == "c03"][:3]
    assert [r["position"] for r in got] == want


def test_values_json_append_and_ext(tmp_path):
    d = str(tmp_path / "data")
    subprocess.run([BIN, "append", "--data", d, "init-1", "Init", "{}"], check=True,
                   capture_output=True, timeout=60)
    # json(): sorted keys, NaN and infinities as null, sketches as $ext
    out = run("-e", "json({b = 0/0, a = {1, 1/0}, c = 's'})", data=d, check=0).stdout
    assert out == '{"a":[1,null],"b":null,"c":"s"}\n'
    # append(): values that cannot be stored name their path
    p = run("-e", 'append("s-1", "T", {x = {f = print}})', data=d)
    assert p.returncode == 1 and "append: data.x.f: cannot store a function value" in p.stderr
    # an ext value (here a sketch) in event data reads back as its payload
    # string, the same in read() and in a scan; read() events have category
    chunk = ('append("s-1", "T", {h = tm.hll(), n = 1}, {m = "x"}) '
             'local e = read("s-1")[1] '
             'local q = from{stream="s-1"}:map(function(e) return {t = type(e.data.h)} end) '
             'return e.category, type(e.data.h), e.data.n, e.metadata.m, q.rows[1][1]')
    assert run("-e", chunk, data=d, check=0).stdout == "s\tstring\t1\tx\tstring\n"


def test_formats(data):
    q = 'from{}:group_by("data.region"):count()'
    want = Counter(e["data"]["region"] for e in EVENTS)
    out = run("-e", q, data=data, check=0).stdout.splitlines()
    assert out[0].split("|")[0].strip() == "data.region" and out[0].split("|")[1].strip() == "count"
    assert set(out[1]) <= {"-", "+"}
    assert len({len(l) for l in out[2:5]}) == 1 or True  # rows are aligned on '|'
    assert len({l.index("|") for l in out[:1] + out[2:5]}) == 1
    assert out[-1] == "(3 rows)"
    out = run("--format", "csv", "-e", q, data=data, check=0).stdout
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["data.region", "count"]
    assert {r[0]: int(r[1]) for r in rows[1:]} == dict(want)
    out = run("--format", "vertical", "-e", q, data=data, check=0).stdout
    assert out.count("-[ RECORD ") == 3 and "data.region | apac" in out
    out = run("-e", '.format csv\nreturn 1', data=data)
    # a dot command is not Lua in -e; but the .format command works from scripts through show
    out = run("-e", 'show(from{}:group_by("data.region"):count())', "--format", "json", data=data, check=0).stdout
    assert {r["data.region"]: r["count"] for r in json.loads(out)} == dict(want)


def test_example_script(data):
    p = run("-f", os.path.join(ROOT, "scripts/examples/top-customers.lua"), "--format", "json",
            data=data, check=0)
    got = json.loads(p.stdout)
    revenue = defaultdict(int)
    for e in EVENTS:
        if e["type"] == "PaymentReceived" and "amount" in e["data"]:
            revenue[e["data"]["customer"]] += e["data"]["amount"]
    want = sorted(revenue.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert [(r["data.customer"], r["sum"]) for r in got] == want


def test_more_examples(data):
    p = run("-f", os.path.join(ROOT, "scripts/examples/hourly-revenue.lua"), "--format", "json",
            data=data, check=0)
    want = defaultdict(lambda: [0, 0])
    for e in EVENTS:
        if e["type"] == "PaymentReceived":
            w = want[e["time"] - e["time"] % 3600000]
            w[0] += 1
            w[1] += e["data"].get("amount", 0)
    got = json.loads(p.stdout)
    assert [[r["payments"], r["revenue"]] for r in got] == [want[k] for k in sorted(want)]
    p = run("-f", os.path.join(ROOT, "scripts/examples/order-funnel.lua"), data=data, check=0)
    lines = p.stdout.splitlines()
    for line, t in zip(lines, ("OrderPlaced", "PaymentReceived", "OrderShipped")):
        n = len({e["stream"] for e in EVENTS if e["type"] == t and category(e["stream"]) == "order"})
        assert line.split()[:2] == [t, str(n)]


def test_store_in_use_suggests_url(data):
    child = pexpect.spawn(BIN, ["repl", "--data", data], encoding="utf-8", timeout=10,
                          env=dict(os.environ, TIDEMARK_HISTORY="/dev/null"))
    try:
        child.expect("tidemark> ")
        p = run("-e", "1", data=data)
        assert p.returncode == 4
        assert "in use by another process" in p.stderr and "--url" in p.stderr
    finally:
        child.sendeof()
        child.expect(pexpect.EOF)


PROJ = """
return {
  from = { category = "order" },
  partition = function(e) return e.data.customer end,
  init = function() return { orders = 0, paid = 0 } end,
  on = {
    OrderPlaced = function(s, e) s.orders = s.orders + 1 end,
    PaymentReceived = function(s, e) s.paid = s.paid + (e.data.amount or 0) end,
  },
}
"""


def proj_answer():
    want = defaultdict(lambda: {"orders": 0, "paid": 0})
    for e in EVENTS:
        if category(e["stream"]) != "order":
            continue
        c = want[e["data"]["customer"]]
        if e["type"] == "OrderPlaced":
            c["orders"] += 1
        elif e["type"] == "PaymentReceived":
            c["paid"] += e["data"].get("amount", 0)
    return {k: v for k, v in want.items()}


def test_projections_embedded(data, tmp_path):
    f = tmp_path / "bycustomer.lua"
    f.write_text(PROJ)
    want = proj_answer()
    got = rj(data, 'load("%s") return state("bycustomer")' % f)
    assert got == want
    got = rj(data, 'load("%s") return state("bycustomer", "c07")' % f)
    assert got == want["c07"]
    q = tmp_path / "withq.lua"
    q.write_text(PROJ.replace("  on = {", "  queries = { n = function(m, a) local c = 0 for _ in pairs(m) do c = c + 1 end return {count = c, a = a} end },\n  on = {"))
    assert rj(data, 'load("%s") return query("withq", "n", 5)' % q) == {"count": len(want), "a": 5}
    assert rj(data, 'run("%s")' % f) == want
    st = rj(data, 'load("%s") return status("bycustomer")' % f)
    assert st["name"] == "bycustomer" and st["lag"] == 0 and st["partitions"] == len(want)
    assert st["position"] == max(i + 1 for i, e in enumerate(EVENTS) if category(e["stream"]) == "order")
    p = run(data=data, input='load("%s")\n.describe bycustomer\n.projections\n' % f, check=0)
    assert "partitions" in p.stdout and "bycustomer" in p.stdout
    p = run("-e", 'status("nope")', data=data)
    assert p.returncode == 2 and "no projection" in p.stderr
    bad = tmp_path / "bad.lua"
    bad.write_text("return { from = {all = true}, on = { OrderPlaced = function(s, e) error('kaput') end } }")
    p = run("-e", 'run("%s")' % bad, data=data)
    assert p.returncode == 1 and "kaput" in p.stderr


def test_piped_lines_and_dot_commands(data):
    p = run(data=data, input=".format csv\nfrom{}:group_by('data.region'):count()\nfor i = 1, 2 do\n  print(i)\nend\n", check=0)
    want = Counter(e["data"]["region"] for e in EVENTS)
    lines = p.stdout.splitlines()
    assert lines[0] == "data.region,count"
    assert {l.split(",")[0]: int(l.split(",")[1]) for l in lines[1:4]} == dict(want)
    assert lines[4:] == ["1", "2"]
    p = run(data=data, input="1\nerror('stop here')\nprint('not reached')\n")
    assert p.returncode == 1 and "not reached" not in p.stdout and "stop here" in p.stderr
    # a dot command may start with blanks, like at the prompt (it failed with
    # "attempt to concatenate a nil value"; found by tests/fuzz/fuzz_repl_line)
    p = run(data=data, input="  .format json\n\t.timing\n{1}\n  .nosuch\n", check=1)
    assert p.stdout == "off\n[1]\n" and "unknown command '.nosuch'" in p.stderr


# ---------------------------------------------------------------- the prompt

PROMPT = "tidemark> "
CHILDREN = []


@pytest.fixture(autouse=True)
def _reap_children():
    """A failed pexpect test must not leave a REPL holding the store lock."""
    yield
    while CHILDREN:
        c = CHILDREN.pop()
        if c.isalive():
            c.terminate(force=True)


def prompt(c):
    """Wait for the prompt, then give libedit a moment to put the terminal
    in raw mode: keys typed earlier (Tab, Ctrl-R) would meet the cooked
    terminal, where Ctrl-R means 'reprint'."""
    c.expect(PROMPT)
    time.sleep(0.15)


def spawn(data, hist, *extra):
    env = dict(os.environ, TIDEMARK_HISTORY=str(hist), TERM="xterm", LANG="C.UTF-8")
    c = pexpect.spawn(BIN, ["repl", "--data", data] + list(extra), encoding="utf-8", timeout=10,
                      env=env, dimensions=(40, 200))
    CHILDREN.append(c)
    prompt(c)
    return c


def test_interactive_eval_multiline_errors(data, tmp_path):
    c = spawn(data, tmp_path / "h")
    c.sendline("1+1")
    c.expect("\r\n2\r\n")
    c.expect(PROMPT)
    c.sendline("function triple(x)")
    c.expect(r"\.\.\.> ")
    c.sendline("  return x * 3")
    c.expect(r"\.\.\.> ")
    c.sendline("end")
    c.expect(PROMPT)
    c.sendline("triple(14)")
    c.expect("42")
    c.expect(PROMPT)
    c.sendline("error('oops')")
    c.expect("oops")
    c.expect(PROMPT)
    c.sendline('"héllo → ✓", #"é"')  # UTF-8 editing in a UTF-8 locale
    c.expect("héllo → ✓\t2")
    c.expect(PROMPT)
    c.sendline("nil + 1")
    c.expect("attempt to perform arithmetic")
    c.expect(PROMPT)
    c.sendline("triple(2)")  # state survives errors
    c.expect("6")
    c.expect(PROMPT)
    c.sendline(".format json")
    c.expect(PROMPT)
    c.sendline('from{}:group_by("data.region"):count()')
    c.expect(r'\{"data.region":"apac","count":\d+\}')
    c.expect(PROMPT)
    c.sendline(".format vertical")
    c.expect(PROMPT)
    c.sendline('from{}:group_by("data.region"):count()')
    c.expect(r"-\[ RECORD 3 \]")
    c.expect(PROMPT)
    c.sendline(".timing on")
    c.expect(PROMPT)
    c.sendline("2+3")
    c.expect(r"5\r\nTime: [0-9.]+ ms")
    c.expect(PROMPT)
    c.sendline(".nosuch")
    c.expect("unknown command")
    c.expect(PROMPT)
    c.sendline(".help")
    c.expect("Dot commands")
    c.expect(PROMPT)
    c.sendline(".quit")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_completion(data, tmp_path):
    c = spawn(data, tmp_path / "h")
    c.send("string.fo\t")
    c.expect("rmat")
    c.sendline("")
    c.expect("function: builtin")
    prompt(c)
    c.send(".for\t")
    c.expect("mat")
    c.sendline(" csv")
    prompt(c)
    c.send('from{category="cust\t')
    c.expect("omer")
    c.sendline('"}:count()')
    c.expect("\r\n%d\r\n" % sum(1 for e in EVENTS if category(e["stream"]) == "customer"))
    prompt(c)
    c.send('from{type="PaymentR\t')
    c.expect("eceived")
    c.sendline('"}:count()')
    c.expect("\r\n%d\r\n" % sum(1 for e in EVENTS if e["type"] == "PaymentReceived"))
    prompt(c)
    f = tmp_path / "bycustomer.lua"
    f.write_text(PROJ)
    c.sendline('load("%s")' % f)
    prompt(c)
    c.send(".describe byc\t")
    c.expect("ustomer")
    c.sendline("")
    c.expect("partitions,25")  # .format csv is on
    prompt(c)
    c.sendline("myvariable_xyz = 1")
    prompt(c)
    c.send("myvar\t")
    c.expect("iable_xyz")
    c.sendline("")
    c.expect("\r\n1\r\n")
    prompt(c)
    c.sendeof()
    c.expect(pexpect.EOF)


def test_history_across_sessions_and_reverse_search(data, tmp_path):
    hist = tmp_path / "hist"
    c = spawn(data, hist)
    c.sendline("1000 + 337")
    c.expect("1337")
    prompt(c)
    c.sendline("for i = 1, 2 do")
    c.expect(r"\.\.\.> ")
    c.sendline("end")
    prompt(c)
    c.sendeof()
    c.expect(pexpect.EOF)
    assert hist.exists()
    c = spawn(data, hist)
    c.send("\x1b[A")  # up: the last entry (the multi-line chunk)
    c.send("\x1b[A")  # up again: 1000 + 337
    c.sendline("")
    c.expect("1337")
    prompt(c)
    c.sendcontrol("r")
    c.send("1000 +")
    time.sleep(0.2)
    c.sendline("")
    c.expect("1337")
    prompt(c)
    c.sendeof()
    c.expect(pexpect.EOF)


def test_ctrl_c_cancels_query_not_repl(data, tmp_path):
    c = spawn(data, tmp_path / "h")
    c.sendline("x = 7")
    c.expect(PROMPT)
    # a slow query: each event takes a while in Lua; Ctrl-C stops the scan
    c.sendline("print('querying') return from{}:where(function(e) local s = 0 for i = 1, 2e7 do s = s + i end return true end):count()")
    c.expect("\r\nquerying")
    time.sleep(0.5)
    t0 = time.time()
    c.sendintr()
    c.expect("interrupted")
    c.expect(PROMPT)
    assert time.time() - t0 < 3
    c.sendline("x")  # the state is intact
    c.expect("\r\n7\r\n")
    c.expect(PROMPT)
    # Ctrl-C at the prompt discards the line, however fast it comes
    for _ in range(10):
        c.send("12345")
        c.sendintr()
        c.expect(PROMPT)
    c.sendline("1+1")
    c.expect("\r\n2\r\n")
    c.expect(PROMPT)
    # a JIT-compiled loop ignores hooks: a second Ctrl-C resets the state
    c.sendline("print('spinning') while true do end")
    c.expect("\r\nspinning")
    time.sleep(0.5)
    c.sendintr()
    time.sleep(0.3)
    c.sendintr()
    c.expect("state was reset")
    c.expect(PROMPT)
    c.sendline("x == nil, 2+2")
    c.expect("true\t4")
    c.expect(PROMPT)
    c.sendeof()
    c.expect(pexpect.EOF)


SLOW_RUN = """
-- every event costs ~2 ms of Lua; partitioned, so run() takes the parallel
-- path with a worker per core
return {
  from = "all",
  partition = function(e) return e.stream end,
  init = function() return { n = 0 } end,
  on = { ["$any"] = function(s, e) local x = 0 for i = 1, 2e6 do x = x + i end s.n = s.n + 1 end },
}
"""


def test_ctrl_c_cancels_a_parallel_run(data, tmp_path):
    """run() is the parallel replay path (replay.h): its worker threads stop
    on the first Ctrl-C, and a second one soon after does not jump out of
    it (which would leave the threads behind): the session goes on."""
    f = tmp_path / "slow.lua"
    f.write_text(SLOW_RUN)
    c = spawn(data, tmp_path / "h")
    c.sendline("x = 7")
    c.expect(PROMPT)
    c.sendline("print('running') return run('%s')" % f)
    c.expect("\r\nrunning")
    c.expect(r"replay run: (\d+ workers, routed by stream|1 worker)")  # only the replay path says so
    time.sleep(0.8)
    t0 = time.time()
    c.sendintr()
    time.sleep(0.2)
    c.sendintr()
    c.expect("interrupted")
    c.expect(PROMPT)
    assert time.time() - t0 < 3
    c.sendline("x, 1+1")
    c.expect("7\t2")
    c.expect(PROMPT)
    # and a fast run afterwards still answers, on the same path
    g = tmp_path / "count.lua"
    g.write_text(SLOW_RUN.replace("local x = 0 for i = 1, 2e6 do x = x + i end ", ""))
    c.sendline("local m = run('%s') local t = 0 for _, v in pairs(m) do t = t + v.n end return t" % g)
    c.expect("\r\n%d\r\n" % len(EVENTS))
    c.expect(PROMPT)
    c.sendeof()
    c.expect(pexpect.EOF)


# ---------------------------------------------------------------- parallel queries

PARALLEL_QUERIES = [
    'from{}:count()',
    'from{}:group_by("type"):count()',
    'from{category="order"}:group_by("data.customer"):sum("data.amount")',
    'from{}:where(function(e) return (e.data.amount or 0) > 100 end):group_by("data.region", "type")'
    ':agg{n="count", lo={"min","data.amount"}, hi={"max","data.amount"}, s={"sum","data.amount"},'
    ' d={"distinct","data.customer"}}',
    'from{}:where("type", "OrderShipped"):group_by(function(e) return e.data.region end):count()',
    'from{}:group_by("category"):avg("data.amount")',
    'from{}:window(600000):group_by("type"):count()',
    'from{}:distinct("stream")',
    'from{}:top(3, "data.customer")',
    'from{types={"OrderPlaced","OrderShipped"}}:group_by("type"):top(2, "data.region")',
    'from{}:where(function(e) return e.category == "customer" and e.metadata.correlation_id ~= nil end):count()',
    'from{}:group_by("data.missing"):count()',
    'from{}:min("data.amount"), from{}:max("data.customer")',
    'from{from=1500}:group_by("type"):count()',
    'from{category="customer", from=2999}:count()',
    'from{from=999999}:count()',
]


def timed(data, workers, chunk):
    p = run("--workers", workers, "--format", "json", input=".timing on\n" + chunk + "\n",
            data=data, check=0)
    lines = p.stdout.splitlines()
    assert lines[-1].startswith("Time: "), p.stdout
    return "\n".join(lines[:-1]), lines[-1]


def test_parallel_queries_equal_serial(data):
    """With workers the REPL reads once and aggregates on every core
    (replpar.c); the merged answer is the serial one, byte for byte (these
    sums are of integers, exact in any order)."""
    for q in PARALLEL_QUERIES:
        serial, t1 = timed(data, 1, q)
        assert "workers" not in t1
        for w in (2, 3):
            par, tw = timed(data, w, q)
            assert tw.endswith("(%d workers)" % w), (q, tw)
            assert par == serial, (q, w)
    # percentiles: a mergeable sketch, within its rank error of the serial one
    got = json.loads(timed(data, 2, 'from{}:percentiles("data.amount", {0.5, 0.9})')[0])[0]
    amounts = sorted(e["data"]["amount"] for e in EVENTS if "amount" in e["data"])
    for p, col in ((0.5, "p50"), (0.9, "p90")):
        rank = amounts.index(got[col])
        assert abs(rank - p * len(amounts)) <= len(amounts) * 0.02, (col, got[col])


def test_parallel_queries_fall_back_to_serial(data):
    """What a worker's Lua state cannot do the REPL does serially, with
    the same answer: functions with upvalues (the chunk's locals), user
    globals, print, the REPL's I/O, values compared by identity, and
    errors (reported exactly as without workers)."""
    want = sum(1 for e in EVENTS if e["data"].get("amount", 0) > 100)
    cases = [
        'local t = 100 return from{}:where(function(e) return (e.data.amount or 0) > t end):count()',
        'limit = 100 return from{}:where(function(e) return (e.data.amount or 0) > limit end):count()',
        'from{}:where(function(e) if e.position == 2 then print("second", e.position) end '
        'return (e.data.amount or 0) > 100 end):count()',
        'from{}:where(function(e) return (e.data.amount or 0) > 100 and last_position() > 0 end):count()',
    ]
    for q in cases:
        out, t = timed(data, 2, q)
        assert "workers" not in t, (q, t)
        assert out.splitlines()[-1] == str(want), (q, out)
    assert "second\t2" in timed(data, 2, cases[2])[0]
    out, t = timed(data, 2, 'from{}:where("data", {}):count()')
    assert out == "0" and "workers" not in t
    p1 = run("--workers", 1, "-e", 'from{}:where(function(e) return e.data.nope.x end):count()',
             data=data)
    p2 = run("--workers", 2, "-e", 'from{}:where(function(e) return e.data.nope.x end):count()',
             data=data)
    assert p1.returncode == p2.returncode == 1
    assert p1.stderr == p2.stderr and "attempt to index field 'nope'" in p2.stderr
    # a global the query does not touch does not matter
    out, t = timed(data, 2, 'x = 5 return from{}:where(function(e) return (e.data.amount or 0) > 100 end):count()')
    assert out == str(want) and t.endswith("(2 workers)")
    p = run("--workers", 0, "-e", "1", data=data)
    assert p.returncode == 1 and "--workers wants a number" in p.stderr


def test_ctrl_c_stops_a_parallel_query(data, tmp_path):
    """Workers stop on the first Ctrl-C like a serial scan; a worker in a
    JIT-compiled loop is abandoned on the second one, and the session (its
    globals) goes on."""
    c = spawn(data, tmp_path / "h", "--workers", "2")
    c.sendline("x = 7")
    c.expect(PROMPT)
    c.sendline(".timing on")
    c.expect(PROMPT)
    c.sendline("print('querying') return from{}:where(function(e) local s = 0 for i = 1, 2e7 do s = s + i end return true end):count()")
    c.expect("\r\nquerying")
    time.sleep(0.5)
    c.sendintr()
    c.expect("interrupted")
    c.expect(PROMPT)
    c.sendline("print('spinning') return from{}:where(function(e) while true do end end):count()")
    c.expect("\r\nspinning")
    time.sleep(0.5)
    c.sendintr()
    time.sleep(0.3)
    c.sendintr()
    c.expect("a query worker did not respond")
    c.expect("interrupted")
    c.expect(PROMPT)
    c.sendline("x, 1+1")
    c.expect("7\t2")
    c.expect(PROMPT)
    # new workers replace the abandoned one
    c.sendline("from{}:count()")
    c.expect("\r\n%d\r\n" % len(EVENTS))
    c.expect(r"\(2 workers\)")
    c.expect(PROMPT)
    c.sendeof()
    c.expect(pexpect.EOF)


# ---------------------------------------------------------------- remote mode

@contextlib.contextmanager
def _serve(d, *args):
    proc = subprocess.Popen([BIN, "serve", "--data", d, "--port", "0", "--bind", "127.0.0.1"] +
                            list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready port="), (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("=")[1])
        yield {"url": "http://127.0.0.1:%d" % port, "data": d}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="tm-repl-srv-") as top:
        d = _import(os.path.join(top, "data"))
        pdir = os.path.join(top, "projections")
        os.mkdir(pdir)
        with open(os.path.join(pdir, "bycustomer.lua"), "w") as f:
            f.write(PROJ)
        with _serve(d, "--projections", pdir) as s:
            yield s


def rjr(server, chunk):
    p = subprocess.run([BIN, "repl", "--url", server["url"], "--format", "json", "-e", chunk],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.stdout, p.stderr)
    return json.loads(p.stdout)


def test_remote_same_answers(server):
    got = rjr(server, 'from{category="order"}:group_by("type"):count()')
    want = Counter(e["type"] for e in EVENTS if category(e["stream"]) == "order")
    assert {r["type"]: r["count"] for r in got} == dict(want)
    assert rjr(server, 'from{type="OrderShipped"}:count()') == sum(1 for e in EVENTS if e["type"] == "OrderShipped")
    got = rjr(server, 'from{}:top(3, "data.customer")')
    counts = Counter(e["data"]["customer"] for e in EVENTS)
    assert [(r["data.customer"], r["count"]) for r in got] == sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    got = rjr(server, 'read("order-2", {backward=true, limit=2})')
    n = sum(1 for e in EVENTS if e["stream"] == "order-2")
    assert [r["version"] for r in got] == [n - 1, n - 2]
    assert {r["stream"] for r in rjr(server, "streams()")} == {e["stream"] for e in EVENTS}
    assert [r["category"] for r in rjr(server, "categories()")] == ["customer", "order"]
    # the embedded mode refuses the directory the server holds, pointing at --url
    p = run("-e", "1", data=server["data"])
    assert p.returncode == 4 and "--url" in p.stderr
    p = subprocess.run([BIN, "repl", "--url", "http://127.0.0.1:1", "-e", "1"], capture_output=True, text=True)
    assert p.returncode == 4 and "cannot connect" in p.stderr


class _StuckServer:
    """A tidemark look-alike that ignores from= and after=: every GET /all
    answers the same page, every GET /streams the same names with a next
    link.  The REPL must stop with an error, not read that page forever
    (found by tests/fuzz/fuzz_repl_remote)."""

    def __init__(self):
        import http.server
        import threading

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/health":
                    body = {"status": "ok", "last_position": 2}
                elif path == "/streams":
                    body = {"streams": [{"stream": "a", "version": 0}], "next": "/streams?after=a"}
                else:
                    body = {"events": [{"stream": "order-1", "type": "T", "position": p,
                                        "version": p - 1, "data": {}} for p in (1, 2)],
                            "next": "/all?from=3", "last_position": 2}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_remote_pages_over_one_mib(tmp_path):
    # a page of 1000 events of 2 KB is 2 MB of JSON: it used to fail with
    # "value exceeds size limit of 1048576 bytes"
    d = str(tmp_path / "data")
    text = "".join(json.dumps({"stream": "big-%d" % (i % 3), "type": "T",
                               "data": {"blob": "x" * 2000, "i": i}}) + "\n" for i in range(1100))
    subprocess.run([BIN, "import", "--data", d, "-"], input=text, capture_output=True, text=True,
                   timeout=60, check=True)
    with _serve(d) as s:
        p = subprocess.run([BIN, "repl", "--url", s["url"], "-e",
                            'from{}:count(), from{category="big"}:sum("data.i"), #read("big-1", {limit=500})'],
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "1100\t%d\t367\n" % sum(range(1100))


def test_remote_server_that_does_not_page_forward():
    srv = _StuckServer()
    try:
        for chunk, want in (("from{}:count()", "position 1 out of order"),
                            ('from{category="order"}:count()', "position 1 out of order"),
                            ("streams()", "names out of order")):
            p = subprocess.run([BIN, "repl", "--url", srv.url, "-e", chunk], capture_output=True,
                               text=True, timeout=30)
            assert p.returncode == 4 and want in p.stderr, (chunk, p.returncode, p.stderr)
    finally:
        srv.close()


def test_remote_append_and_tail(server):
    env = dict(os.environ, TIDEMARK_HISTORY="/dev/null", TERM="xterm")
    c = pexpect.spawn(BIN, ["repl", "--url", server["url"]], encoding="utf-8", timeout=10, env=env,
                      dimensions=(40, 200))
    CHILDREN.append(c)
    c.expect(PROMPT)
    c.sendline('tail{category="audit"}')
    c.expect("tailing")
    time.sleep(0.3)
    p = subprocess.run([BIN, "repl", "--url", server["url"], "-e",
                        'append("audit-1", "Checked", {who="ann"})'], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    pos = int(p.stdout.split()[0])
    c.expect(r"%d  \S+  audit-1@0  Checked  \{\"who\":\"ann\"\}" % pos)
    c.sendintr()
    c.expect(PROMPT)
    c.sendline('from{category="audit"}:count()')
    c.expect("\r\n1\r\n")
    c.expect(PROMPT)
    c.sendeof()
    c.expect(pexpect.EOF)


def test_remote_projections(server, tmp_path):
    deadline = time.time() + 20
    while True:
        st = rjr(server, 'status("bycustomer")')
        if st["status"] == "running" and st["lag"] == 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert st["status"] == "running" and st["lag"] == 0, st
    assert rjr(server, 'state("bycustomer")') == proj_answer()
    assert rjr(server, 'state("bycustomer", "c03")') == proj_answer()["c03"]
    names = [r["name"] for r in rjr(server, "projections()")]
    assert "bycustomer" in names
    f = tmp_path / "counter.lua"
    f.write_text('return { from = {all = true}, init = function() return {n = 0} end,'
                 ' on = { ["$any"] = function(s, e) s.n = s.n + 1 end },'
                 ' queries = { twice = function(m, a) return {n = m.n * 2, a = a} end } }')
    st = rjr(server, 'load("%s")' % f)
    assert st["name"] == "counter"
    deadline = time.time() + 20
    while rjr(server, 'status("counter")')["lag"] != 0 and time.time() < deadline:
        time.sleep(0.2)
    n = rjr(server, 'state("counter")')["n"]
    assert n == rjr(server, "last_position()")
    assert rjr(server, 'query("counter", "twice", {x = 1})') == {"n": 2 * n, "a": {"x": 1}}


def test_remote_reply_larger_than_the_limit_is_refused():
    """A server that announces a reply beyond the REPL's 1 GiB limit for a
    whole reply is refused at once (exit 4, one clear line), not followed
    until memory runs out."""
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(5 << 30))
            self.end_headers()
            try:
                self.wfile.write(b'{"status":"ok","pad":"' + b"x" * 65536)
            except OSError:
                pass

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        t0 = time.time()
        p = subprocess.run([BIN, "repl", "--url", "http://127.0.0.1:%d" % httpd.server_address[1],
                            "-e", "last_position()"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 4, (p.returncode, p.stderr)
        assert "more than the 1024 MiB a reply may have" in p.stderr, p.stderr
        assert time.time() - t0 < 10
    finally:
        httpd.shutdown()
        httpd.server_close()
