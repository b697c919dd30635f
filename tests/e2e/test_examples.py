"""Golden tests of the example projections in projections/.

The input is generated in the test (scripts/gen-events, fixed seed, small N)
and imported with `tidemark import`; every projection is run with `tidemark
project` (its state and a few named/built-in queries) and the output must
equal tests/golden/<name>.expected.json.  Each expected file is ALSO checked
against an independent computation in Python from the same generated
events: exact for counts and sums, within documented bounds for sketches
(HLL, KLL quantiles, Space-Saving top-k) and exact per-window for windows.
A determinism test runs every projection twice, once more over a fresh
re-import and once in a worker process (--isolate), and wants byte-identical
output.

scripts/update-golden (for humans) imports this module and rewrites the
expected files with golden_outputs(); tests never call it.
"""
import bisect
import json
import math
import os
import subprocess
import sys
from collections import defaultdict

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
BIN = os.environ.get("TIDEMARK_BIN", os.path.join(ROOT, "build/tidemark"))
GEN = os.path.join(ROOT, "scripts/gen-events")
PROJ = os.path.join(ROOT, "projections")
GOLDEN = os.path.join(ROOT, "tests/golden")

# The data set: ~5 hours of a small shop across a UTC midnight (2023-11-14
# 22:13 to 2023-11-15 ~03:30); update-golden uses these very values.
GEN_ARGS = ["--events", "20000", "--customers", "1000", "--seed", "7",
            "--start-time", "1700000000000", "--sessions-per-minute", "20"]

# name -> {label: extra `tidemark project` arguments}
CASES = {
    "customers": {
        "state": [],
        "top5": ["--query", "top", '{"n":5}'],
        "top5_orders": ["--query", "top", '{"n":5,"by":"orders"}'],
        "summary": ["--query", "summary"],
        "customer": ["--query", "customer", '{"key":"cust-3"}'],
        "customer_unknown": ["--query", "customer", '{"key":"cust-nobody"}'],
        "get": ["--get", "cust-3"],
        "top_builtin": ["--top", "revenue:5"],
    },
    "order_funnel": {
        "state": [],
        "funnel": ["--query", "funnel"],
        "rate": ["--query", "rate", '{"from":"checkouts","to":"paid"}'],
    },
    "top_products": {
        "state": [],
        "top_units": ["--query", "top", '{"n":10}'],
        "top_revenue": ["--query", "top", '{"n":10,"by":"revenue"}'],
        "product": ["--query", "product", '{"sku":"SKU-0002"}'],
    },
    "orders_per_minute": {
        "state": [],
        "busiest": ["--query", "busiest", '{"n":5}'],
        "minutes": ["--query", "minutes", '{"from":1700036000000,"to":1700040000000}'],
    },
    "distinct_customers_per_day": {
        "state": [],
        "days": ["--query", "days"],
        "range": ["--query", "range"],
        "range_2": ["--query", "range", '{"from":"2023-11-15","to":"2023-11-16"}'],
        "partitions": ["--partitions"],
    },
    "payment_percentiles": {
        "state": [],
        "percentiles": ["--query", "percentiles"],
        "rank": ["--query", "rank", '{"amount":100}'],
        "rank_card": ["--query", "rank", '{"amount":50,"method":"card"}'],
    },
}


# --- running things ---------------------------------------------------------

def run(args, **kw):
    p = subprocess.run(args, capture_output=True, timeout=120, **kw)
    assert p.returncode == 0, (args, p.returncode, p.stderr.decode(errors="replace"))
    return p.stdout


def make_dataset(dirpath):
    """Generate the events into dirpath/events.jsonl, import them into
    dirpath/data; returns (data_dir, jsonl_path)."""
    os.makedirs(dirpath, exist_ok=True)
    path = os.path.join(dirpath, "events.jsonl")
    run([sys.executable, GEN, *GEN_ARGS, "--out", path])
    data = os.path.join(dirpath, "data")
    run([BIN, "import", "--quiet", "--data", data, path])
    return data, path


def project(data, name, extra):
    return run([BIN, "project", "--quiet", "--data", data, os.path.join(PROJ, name + ".lua"), *extra])


def golden_outputs(data):
    """{name: {label: parsed JSON}} for every case (used by update-golden)."""
    return {name: {label: json.loads(project(data, name, extra)) for label, extra in cases.items()}
            for name, cases in CASES.items()}


def golden_path(name):
    return os.path.join(GOLDEN, name + ".expected.json")


def load_expected(name):
    path = golden_path(name)
    if not os.path.exists(path):
        pytest.fail("%s is missing: run scripts/update-golden and review the diff" % path)
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data, path = make_dataset(str(tmp_path_factory.mktemp("examples")))
    events = []
    versions = defaultdict(int)
    with open(path) as f:
        for pos, line in enumerate(f, 1):
            e = json.loads(line)
            e["position"] = pos
            e["version"] = versions[e["stream"]]
            versions[e["stream"]] += 1
            events.append(e)
    return data, events


# --- the golden comparison ----------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_output_equals_golden(dataset, name):
    data, _ = dataset
    expected = load_expected(name)
    assert sorted(expected) == sorted(CASES[name]), "golden labels differ: run scripts/update-golden"
    for label, extra in CASES[name].items():
        got = json.loads(project(data, name, extra))
        assert got == expected[label], "%s %s differs from %s" % (name, label, golden_path(name))


def test_projection_runs_are_byte_identical(dataset, tmp_path):
    data, _ = dataset
    fresh, _ = make_dataset(str(tmp_path / "again"))
    for name in sorted(CASES):
        a = project(data, name, [])
        assert a == project(data, name, []), (name, "two runs differ")
        assert a == project(fresh, name, []), (name, "a rebuild over a fresh import differs")
    # The same in a worker process (--isolate, as the server runs projections;
    # it persists, so the later calls answer from the stored state).
    for name in sorted(CASES):
        for label, extra in CASES[name].items():
            if extra and extra[0] in BUILTIN_QUERIES:
                continue  # see test_isolate_builtin_queries
            assert project(fresh, name, ["--isolate", *extra]) == project(data, name, extra), \
                (name, label, "--isolate differs")


BUILTIN_QUERIES = ("--get", "--top", "--partitions")


def test_isolate_builtin_queries(dataset, tmp_path):
    data, _ = dataset
    fresh, _ = make_dataset(str(tmp_path / "iso"))
    for name in sorted(CASES):
        for label, extra in CASES[name].items():
            if extra and extra[0] in BUILTIN_QUERIES:
                assert project(fresh, name, ["--isolate", *extra]) == project(data, name, extra), (name, label)


def test_generator_is_deterministic_and_well_formed(tmp_path):
    a = run([sys.executable, GEN, "--events", "3000", "--seed", "3"])
    b = run([sys.executable, GEN, "--events", "3000", "--seed", "3"])
    c = run([sys.executable, GEN, "--events", "3000", "--seed", "4"])
    assert a == b and a != c
    evs = [json.loads(l) for l in a.decode().splitlines()]
    assert len(evs) == 3000
    types = {e["type"] for e in evs}
    assert types >= {"CartCreated", "ItemAdded", "CheckoutStarted", "OrderPlaced", "PaymentReceived"}
    assert len({e["id"] for e in evs}) == 3000
    # Causal order inside each stream; a few events out of time order overall.
    first = {}
    for e in evs:
        first.setdefault(e["stream"], e["type"])
    assert all(t == ("CartCreated" if s.startswith("cart-") else "OrderPlaced") for s, t in first.items())
    backwards = sum(1 for x, y in zip(evs, evs[1:]) if y["time"] < x["time"])
    assert 0 < backwards < len(evs) // 4
    late = 0
    mx = 0
    for e in evs:
        if e["time"] < mx - 60000:
            late += 1
        mx = max(mx, e["time"])
    assert late > 0
    # Exactly N even when N cuts a session; N = 0 writes nothing.
    assert run([sys.executable, GEN, "--events", "0"]) == b""
    assert len(run([sys.executable, GEN, "--events", "7"]).splitlines()) == 7
    # Live mode writes the same lines, only paced (here 20000x real time).
    assert run([sys.executable, GEN, "--events", "300", "--seed", "3", "--pace", "20000"]) == \
        b"".join(a.splitlines(True)[:300])
    assert subprocess.run([sys.executable, GEN, "--events", "-1"], capture_output=True).returncode == 1


# --- independent computations -------------------------------------------------

def round2(x):
    return math.floor(x * 100 + 0.5) / 100


def of_type(events, *types):
    return [e for e in events if e["type"] in types]


def test_customers_matches_python(dataset):
    _, events = dataset
    exp = load_expected("customers")
    state = {}
    for e in events:
        if not e["stream"].startswith("order-") or e["type"] not in ("OrderPlaced", "PaymentReceived"):
            continue
        s = state.setdefault(e["data"]["customer"], {"orders": 0, "revenue": 0})
        if e["type"] == "OrderPlaced":
            s["orders"] += 1
        else:
            s["revenue"] += e["data"]["amount"]
    assert exp["state"] == state
    assert len(state) > 50

    def top(by, n):
        rows = [{"customer": k, "orders": s["orders"], "revenue": round2(s["revenue"])} for k, s in state.items()]
        rows.sort(key=lambda r: (-r[by], r["customer"]))
        return rows[:n]
    assert exp["top5"] == top("revenue", 5)
    assert exp["top5_orders"] == top("orders", 5)
    keys = sorted(state)
    revenue = 0
    for k in keys:
        revenue += state[k]["revenue"]
    orders = sum(s["orders"] for s in state.values())
    assert exp["summary"] == {"customers": len(state), "orders": orders, "revenue": round2(revenue),
                              "paying_customers": sum(1 for s in state.values() if s["revenue"] > 0),
                              "avg_order_value": round2(revenue / orders)}
    c3 = state["cust-3"]
    assert exp["customer"] == {"customer": "cust-3", "orders": c3["orders"], "revenue": round2(c3["revenue"])}
    assert exp["customer_unknown"] == {"customer": "cust-nobody", "orders": 0, "revenue": 0}
    assert exp["get"] == c3
    ranked = sorted(state.items(), key=lambda kv: (-kv[1]["revenue"], kv[0]))[:5]
    assert exp["top_builtin"] == [{"key": k, "value": s["revenue"]} for k, s in ranked]


def test_order_funnel_matches_python(dataset):
    _, events = dataset
    exp = load_expected("order_funnel")
    carts_with_items = {e["stream"] for e in of_type(events, "ItemAdded")}
    st = {
        "carts": len(of_type(events, "CartCreated")),
        "with_items": len(carts_with_items),
        "checkouts": len(of_type(events, "CheckoutStarted")),
        "orders": len(of_type(events, "OrderPlaced")),
        "paid": len(of_type(events, "PaymentReceived")),
        "shipped": len(of_type(events, "OrderShipped")),
        "items": sum(e["data"]["qty"] for e in of_type(events, "ItemAdded")),
    }
    value = 0
    for e in of_type(events, "OrderPlaced"):
        value += e["data"]["amount"]
    st["order_value"] = value
    assert exp["state"] == st
    assert st["shipped"] > 0
    stages = ["carts", "with_items", "checkouts", "orders", "paid", "shipped"]
    for i, row in enumerate(exp["funnel"]):
        assert row["stage"] == stages[i] and row["count"] == st[stages[i]]
        prev = st[stages[i - 1]] if i else st["carts"]
        assert abs(row["from_previous"] - st[stages[i]] / prev) <= 0.00005 + 1e-12
        assert abs(row["from_start"] - st[stages[i]] / st["carts"]) <= 0.00005 + 1e-12
    assert len(exp["funnel"]) == len(stages)
    assert exp["rate"]["from"] == "checkouts" and exp["rate"]["to"] == "paid"
    assert abs(exp["rate"]["rate"] - st["paid"] / st["checkouts"]) <= 0.00005 + 1e-12
    # The funnel narrows at every stage.
    assert all(st[a] >= st[b] for a, b in zip(stages, stages[1:]))


def test_top_products_matches_python(dataset):
    _, events = dataset
    exp = load_expected("top_products")
    units, revenue = defaultdict(int), defaultdict(float)
    lines = 0
    orders = of_type(events, "OrderPlaced")
    for e in orders:
        for it in e["data"]["items"]:
            units[it["sku"]] += it["qty"]
            revenue[it["sku"]] += it["price"] * it["qty"]
            lines += 1
    st = exp["state"]
    assert st["orders"] == len(orders) and st["lines"] == lines
    assert st["units_total"] == sum(units.values())
    # More SKUs sold than the 200 monitored: the sketch really evicts.
    assert len(units) > 200

    for label, by, truth in (("top_units", "units", units), ("top_revenue", "revenue", revenue)):
        got = exp[label]
        exact = sorted(truth.items(), key=lambda kv: (-kv[1], kv[0]))
        total = sum(truth.values())
        assert len(got) == 10
        # Skewed popularity: each of the exact top 10 weighs more than
        # total/capacity, so Space-Saving must monitor it; and on this skewed
        # stream the sketch's top 10 is the exact top 10, in order.
        assert exact[9][1] > total / 200
        assert [r["sku"] for r in got] == [k for k, _ in exact[:10]]
        for r in got:
            true = truth[r["sku"]]
            assert r["error"] <= total / 200 + 0.01
            assert r[by] - r["error"] - 0.011 <= true <= r[by] + 0.011
    p = exp["product"]
    assert p["sku"] == "SKU-0002"
    assert p["units"] - p["units_error"] <= units["SKU-0002"] <= p["units"]
    assert p["revenue"] - p["revenue_error"] - 0.011 <= revenue["SKU-0002"] <= p["revenue"] + 0.011


def test_orders_per_minute_matches_python(dataset):
    _, events = dataset
    exp = load_expected("orders_per_minute")
    size, lateness = 60000, 30000
    open_w = {}          # start -> [count, sum]
    closed = []
    late_n, late_rev = 0, 0
    maxt = None
    for e in of_type(events, "OrderPlaced"):
        t, amount = e["time"], e["data"]["amount"]
        start = t // size * size
        if maxt is not None and start + size <= maxt - lateness:
            late_n += 1
            late_rev = round2(late_rev + amount)
        else:
            w = open_w.setdefault(start, [0, 0])
            w[0] += 1
            w[1] += amount
        maxt = t if maxt is None else max(maxt, t)
        for s in sorted(open_w):
            if s + size <= maxt - lateness:
                c, v = open_w.pop(s)
                closed.append({"minute": s, "orders": c, "revenue": round2(v)})
    assert exp["state"]["closed"] == closed
    assert exp["state"]["late"] == {"orders": late_n, "revenue": late_rev}
    assert late_n > 0 and len(closed) > 100
    still_open = [{"minute": s, "orders": c, "revenue": round2(v), "closed": False}
                  for s, (c, v) in sorted(open_w.items())]
    lo, hi = 1700036000000, 1700040000000
    assert exp["minutes"] == [dict(r, closed=True) for r in closed if lo <= r["minute"] < hi] + \
        [r for r in still_open if lo <= r["minute"] < hi]
    assert any(r["closed"] for r in exp["minutes"]) and any(not r["closed"] for r in exp["minutes"])
    busiest = sorted(closed, key=lambda r: (-r["orders"], r["minute"]))[:5]
    assert exp["busiest"] == busiest
    # Every on-time order is in exactly one minute.
    assert sum(r["orders"] for r in closed + still_open) + late_n == len(of_type(events, "OrderPlaced"))


def utc_day(ms):
    import datetime
    return datetime.datetime.fromtimestamp(ms // 1000, datetime.timezone.utc).strftime("%Y-%m-%d")


def hll_ok(est, exact):
    # 0.81% standard error; allow 3 sigma, and +-3 for tiny sets.
    return abs(est - exact) <= max(3, 0.0243 * exact)


def test_distinct_customers_per_day_matches_python(dataset):
    _, events = dataset
    exp = load_expected("distinct_customers_per_day")
    days = defaultdict(lambda: {"shoppers": set(), "buyers": set(), "carts": 0, "orders": 0})
    for e in of_type(events, "CartCreated", "OrderPlaced"):
        d = days[utc_day(e["time"])]
        if e["type"] == "CartCreated":
            d["carts"] += 1
            d["shoppers"].add(e["data"]["customer"])
        else:
            d["orders"] += 1
            d["buyers"].add(e["data"]["customer"])
    assert len(days) >= 2
    assert exp["partitions"] == sorted(days)
    assert sorted(exp["state"]) == sorted(days)
    assert [r["day"] for r in exp["days"]] == sorted(days)
    for r in exp["days"]:
        d = days[r["day"]]
        assert r["carts"] == d["carts"] and r["orders"] == d["orders"]
        assert hll_ok(r["shoppers"], len(d["shoppers"])), (r, len(d["shoppers"]))
        assert hll_ok(r["buyers"], len(d["buyers"])), (r, len(d["buyers"]))
        assert exp["state"][r["day"]]["carts"] == d["carts"]

    def union(names):
        sh, bu = set(), set()
        for n in names:
            sh |= days[n]["shoppers"]
            bu |= days[n]["buyers"]
        return sh, bu
    for label, names in (("range", sorted(days)),
                         ("range_2", [d for d in sorted(days) if "2023-11-15" <= d <= "2023-11-16"])):
        r = exp[label]
        sh, bu = union(names)
        assert r["days"] == len(names)
        assert r["carts"] == sum(days[n]["carts"] for n in names)
        assert r["orders"] == sum(days[n]["orders"] for n in names)
        assert hll_ok(r["shoppers"], len(sh)) and hll_ok(r["buyers"], len(bu)), (r, len(sh), len(bu))
        # A union is not a sum: customers come back on several days.
        if len(names) > 1:
            assert r["shoppers"] < sum(len(days[n]["shoppers"]) for n in names)


def quantile_ok(values_sorted, q, v, eps=0.01):
    n = len(values_sorted)
    lt = bisect.bisect_left(values_sorted, v) / n
    le = bisect.bisect_right(values_sorted, v) / n
    return lt - eps <= q <= le + eps


def test_payment_percentiles_matches_python(dataset):
    _, events = dataset
    exp = load_expected("payment_percentiles")
    pays = of_type(events, "PaymentReceived")
    groups = defaultdict(list)
    total = 0
    for e in pays:
        groups["all"].append(e["data"]["amount"])
        groups[e["data"]["method"]].append(e["data"]["amount"])
        total += e["data"]["amount"]
    assert exp["state"]["count"] == len(pays) and exp["state"]["total"] == total
    assert sorted(exp["state"]["by_method"]) == sorted(k for k in groups if k != "all")
    assert len(pays) > 1000
    res = exp["percentiles"]
    assert sorted(res["by_method"]) == sorted(k for k in groups if k != "all")
    for key, vals in groups.items():
        r = res["all"] if key == "all" else res["by_method"][key]
        vs = sorted(vals)
        assert r["count"] == len(vs) and r["min"] == vs[0] and r["max"] == vs[-1]
        for q, f in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            assert quantile_ok(vs, q, r[f]), (key, f, r[f])
    vs = sorted(groups["all"])
    assert exp["rank"]["method"] == "all"
    assert abs(exp["rank"]["fraction"] - bisect.bisect_right(vs, 100) / len(vs)) <= 0.01
    cs = sorted(groups["card"])
    assert exp["rank_card"]["method"] == "card"
    assert abs(exp["rank_card"]["fraction"] - bisect.bisect_right(cs, 50) / len(cs)) <= 0.01


def test_emit_on_close_persisted_in_two_steps_equals_rebuild(tmp_path):
    """orders_per_minute with --persist over half the events, then the rest:
    the state equals a one-shot rebuild, and every closed minute was emitted
    once as a MinuteClosed event (ids derived from the source position, so a
    resumed run does not duplicate them)."""
    path = str(tmp_path / "ev.jsonl")
    run([sys.executable, GEN, "--events", "4000", "--seed", "3", "--out", path])
    lines = open(path).read().splitlines(True)
    half = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    open(half[0], "w").writelines(lines[:2000])
    open(half[1], "w").writelines(lines[2000:])
    lua = os.path.join(PROJ, "orders_per_minute.lua")
    d1, d2 = str(tmp_path / "d1"), str(tmp_path / "d2")
    for h in half:
        run([BIN, "import", "--quiet", "--data", d1, h])
        persisted = run([BIN, "project", "--quiet", "--persist", "--data", d1, lua])
    # Re-running with nothing new changes nothing and emits nothing new.
    assert run([BIN, "project", "--quiet", "--persist", "--data", d1, lua]) == persisted
    run([BIN, "import", "--quiet", "--data", d2, path])
    assert persisted == run([BIN, "project", "--quiet", "--data", d2, lua])
    closed = json.loads(persisted)["closed"]
    emitted = [json.loads(l) for l in run([BIN, "read", "--data", d1, "stats-orders_per_minute"]).decode().splitlines()]
    assert [e["type"] for e in emitted] == ["MinuteClosed"] * len(closed)
    assert [e["data"] for e in emitted] == closed and len(closed) > 10


def test_orders_per_minute_keeps_a_bounded_list(dataset, tmp_path):
    """The closed-minute list is trimmed to the newest KEEP_MINUTES rows, a
    TRIM at a time: run a copy with tiny limits and compare with the full run."""
    data, _ = dataset
    src = open(os.path.join(PROJ, "orders_per_minute.lua")).read()
    small = src.replace("local KEEP_MINUTES = 7 * 1440", "local KEEP_MINUTES = 50") \
               .replace("local TRIM = 1440", "local TRIM = 7")
    assert "local KEEP_MINUTES = 50 " in small and "local TRIM = 7 " in small
    path = str(tmp_path / "opm_small.lua")
    open(path, "w").write(small)
    full = load_expected("orders_per_minute")["state"]["closed"]
    got = json.loads(run([BIN, "project", "--quiet", "--data", data, path]))["closed"]
    n = len(full)
    assert n > 57
    # Trimmed whenever 57 rows are held: between 50 and 56 rows remain, the newest ones.
    assert 50 <= len(got) < 57 and len(got) == 50 + (n - 50) % 7
    assert got == full[-len(got):]


def test_persisted_in_steps_equals_rebuild_for_every_example(tmp_path):
    """Every example, persisted with frequent checkpoints (checkpoint_every =
    97) in two import steps, ends with exactly the state of a one-shot dry
    run: states with sketches and windows survive checkpoint and reload."""
    path = str(tmp_path / "ev.jsonl")
    run([sys.executable, GEN, "--events", "3000", "--seed", "11", "--out", path])
    lines = open(path).read().splitlines(True)
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    open(a, "w").writelines(lines[:1700])
    open(b, "w").writelines(lines[1700:])
    stepped, full = str(tmp_path / "stepped"), str(tmp_path / "full")
    run([BIN, "import", "--quiet", "--data", full, path])
    run([BIN, "import", "--quiet", "--data", stepped, a])
    copies = {}
    for name in sorted(CASES):
        src = open(os.path.join(PROJ, name + ".lua")).read()
        assert src.count("\nreturn {\n") == 1
        copies[name] = str(tmp_path / (name + ".lua"))
        open(copies[name], "w").write(src.replace("\nreturn {\n", "\nreturn {\n  checkpoint_every = 97,\n"))
        run([BIN, "project", "--quiet", "--persist", "--data", stepped, copies[name]])
    run([BIN, "import", "--quiet", "--data", stepped, b])
    for name in sorted(CASES):
        got = run([BIN, "project", "--quiet", "--persist", "--data", stepped, copies[name]])
        want = run([BIN, "project", "--quiet", "--data", full, copies[name]])
        assert got == want, name
        # Named queries answer the same from the persisted (reloaded) state.
        for label, extra in CASES[name].items():
            if extra and extra[0] == "--query":
                assert run([BIN, "project", "--quiet", "--persist", "--data", stepped, copies[name], *extra]) == \
                    run([BIN, "project", "--quiet", "--data", full, copies[name], *extra]), (name, label)


def test_demo_generator_feeds_every_example_projection(tmp_path):
    """`make demo`'s live generator (scripts/demo-gen) speaks the same model
    as the examples: a server with projections/ loaded, fed by it over HTTP,
    has every projection running (none faulted) and counting events.  (It
    once emitted its own event shapes; order_funnel faulted on them.)"""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import start_server
    s = start_server(str(tmp_path / "d"), "--projections", PROJ, log_dir=str(tmp_path))
    try:
        p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/demo-gen"), "--url", s.url,
                            "--count", "1500", "--pace", "3000", "--rate", "3000", "--seed", "3"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        h = s.http()
        import time
        for _ in range(400):   # projections emit events of their own: >= 1500
            body = h.get("/projections").json()
            if body["last_position"] >= 1500 and all(x["lag"] == 0 for x in body["projections"]):
                break
            time.sleep(0.05)
        assert body["last_position"] >= 1500, body
        names = {x["name"] for x in body["projections"]}
        assert names == {f[:-4] for f in os.listdir(PROJ) if f.endswith(".lua")}, names
        for x in body["projections"]:
            assert x["status"] == "running" and x["error"] is None and x["events"] > 0, x
        funnel = h.get("/projections/order_funnel/state").json()
        assert funnel["orders"] > 0 and funnel["order_value"] > 0, funnel
    finally:
        s.stop()
        s.close()
