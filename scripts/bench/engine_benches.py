"""scripts/bench/engine_benches.py — the replay, server and REPL benchmarks
(issues #3, #4, #5, and the PostgreSQL peer for issue #6).

A mixin of scripts/bench/run's Runner: each bench_* method returns
(limit_fn, ours_fn[, cleanup]) like the store benchmarks; a side returns
(value, note) or (value, note, fail_reason).  Values are events/s,
requests/s, MiB or ms (the entry in BENCHMARKS says which, and whether
lower is better).  Peers (Redis, PostgreSQL) and servers are started here
on loopback in the temp dir and stopped by cleanup (peers.py); a peer that
is not installed makes the line SKIPPED with the reason.

What is timed, per benchmark, is said in docs/benchmarks.md; the rule is
that only what the benchmark names is timed: generation, import, loading a
peer and result checks happen before or after, untimed.
"""
import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.request

import peers

H = None  # scripts/bench/run's module (helpers, settings), set by setup()


def setup(run_module):
    global H
    H = run_module


def env_int(name, default):
    return H.env_int(name, default)


# Sizes (environment; defaults in brackets, see docs/benchmarks.md).
def sizes():
    s = {
        "replay_events": env_int("BENCH_PROJECT_EVENTS", 2000000),
        "customers": env_int("BENCH_CUSTOMERS", 5000),
        "partitions": env_int("BENCH_PARTITIONS", 1000000),
        "lookup_events": env_int("BENCH_LOOKUP_EVENTS", 200000),
        "seconds": env_int("BENCH_SECONDS", 5),
        "clients": env_int("BENCH_CLIENTS", 64),
        "sse_clients": env_int("BENCH_SSE_CLIENTS", 100),
        "sse_rate": env_int("BENCH_SSE_RATE", 10000),
        "sse_appenders": env_int("BENCH_SSE_APPENDERS", 64),
        "pg_workers": env_int("BENCH_PG_WORKERS", 2),
    }
    cpus = sorted(os.sched_getaffinity(0))
    cpu = os.environ.get("BENCH_CPU", "")
    s["cpu"] = int(cpu) if cpu.isdigit() else cpus[-1]
    s["cores"] = len(cpus)
    return s


def measured(argv, what, stdout_path=None, env=None):
    """Run a whole process; return (wall s, cpu s, peak RSS KiB, stderr text).
    Raises BenchError on a non-zero exit (the stderr's last line says why)."""
    H.need_exe(argv[0]) if os.path.isabs(argv[0]) else None
    out = open(stdout_path, "w") if stdout_path else subprocess.DEVNULL
    errf = open(stdout_path + ".err" if stdout_path else os.devnull, "w+")
    try:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=out, stderr=errf, stdin=subprocess.DEVNULL, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read()
    finally:
        if stdout_path:
            out.close()
        errf.close()
    if p.returncode != 0:
        raise H.BenchError("%s failed (exit %d): %s" % (what, p.returncode, H.last_line(err)))
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss, err


def same_numbers(a, b, rel=1e-9):
    """Two decoded JSON values are equal, floats up to rounding."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k], rel) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
    return a == b


def first_diff(a, b):
    for k in sorted(set(a) | set(b)):
        if not same_numbers(a.get(k), b.get(k)):
            return "%s: %r vs %r" % (k, a.get(k), b.get(k))
    return "(none)"


def keep_cpu(cpus, side, cpu):
    cpus[side] = min(cpus.get(side, cpu), cpu)


def print_cpu_ratio(cpus):
    """Information: the ratio in CPU time (steadier than wall time on a
    loaded machine, where other processes share the pinned core)."""
    if "ours" in cpus and "limit" in cpus and cpus["ours"] > 0:
        print("   cpu:   ours %.2f s, limit %.2f s: CPU-time ratio %.2f (information)"
              % (cpus["ours"], cpus["limit"], cpus["limit"] / cpus["ours"]))


COUNT_LUA = """-- the projection equivalent of the REPL query
-- from{category="order"}:group_by("data.customer"):count()
return {
  from = { category = "order" },
  partition = function(e) return e.data.customer end,
  init = function() return 0 end,
  on = { ["$any"] = function(n, e) return n + 1 end },
}
"""
REPL_QUERY = 'from{category="order"}:group_by("data.customer"):count()'

PG_QUERY = ("SELECT data->>'customer' AS customer, "
            "count(*) FILTER (WHERE type = 'OrderPlaced') AS orders, "
            "coalesce(sum((data->>'amount')::float8) FILTER (WHERE type = 'PaymentReceived'), 0)"
            " AS revenue "
            "FROM events WHERE stream LIKE 'order-%' "
            "AND type IN ('OrderPlaced', 'PaymentReceived') GROUP BY 1")


class EngineBenches:
    """Mixed into scripts/bench/run's Runner."""

    BENCHMARKS_MORE = [
        ("project_rate", "bench_project_rate", 1.0,
         "tidemark project customers.lua (BENCH_PROJECT_EVENTS events), one core vs 3M events/s",
         {"limit_word": "target"}),
        ("project_vs_c", "bench_project_vs_c", 0.6,
         "tidemark project customers.lua vs the same scan + aggregation in C, one core",
         {}),
        ("project_memory", "bench_project_memory", 1.0,
         "tidemark project customers.lua, BENCH_PARTITIONS partitions: peak RSS vs 512 MiB",
         {"unit": "MiB", "lower": True, "limit_word": "target", "repeat": 1}),
        ("http_append", "bench_http_append", 1.5,
         "BENCH_CLIENTS connections x 1 event per POST, durable vs Redis XADD appendfsync always",
         {"unit": "req/s", "limit_word": "peer"}),
        ("http_lookup", "bench_http_lookup", 1.0,
         "GET /projections/customers/state?partition=K, BENCH_CLIENTS connections vs Redis HGET",
         {"unit": "req/s", "limit_word": "peer"}),
        ("http_floor", "bench_http_floor", None,
         "GET /health (evhttp's own cost per request, no work) vs Redis HGET: the ceiling of "
         "http_lookup's and http_append's ratios (info)",
         {"unit": "req/s", "limit_word": "peer", "info": True}),
        ("http_ceiling", "bench_http_ceiling", None,
         "build/bench/probe_evhttp: a bare evhttp server (no engine, one loop per core on one "
         "SO_REUSEPORT port) answering GET /health vs Redis HGET, same client: what any evhttp "
         "server can reach on this machine (info: the bound on http_lookup and http_append)",
         {"unit": "req/s", "limit_word": "peer", "info": True}),
        ("sse_latency", "bench_sse_latency", 1.0,
         "append -> SSE delivery, BENCH_SSE_RATE events/s to BENCH_SSE_CLIENTS clients: p99 vs 2 ms",
         {"unit": "ms", "lower": True, "limit_word": "target"}),
        ("repl_group_by", "bench_repl_group_by", 1 / 1.5,
         "tidemark repl -e group_by count vs tidemark project of the same, one core",
         {"limit_word": "limit"}),
        ("repl_parallel", "bench_repl_parallel", 1.8,
         "tidemark repl -e group_by count on every core (--workers = cores) vs --workers 1",
         {"limit_word": "limit"}),
        ("cpu_scaling", "bench_cpu_scaling", None,
         "the C probe of project_vs_c, two processes at once (on two copies of the store) vs "
         "one alone: how much two busy cores of this machine give (info: the ceiling of "
         "repl_parallel's and replay_scaling's ratios)",
         {"limit_word": "limit", "info": True, "repeat": 1}),
        ("pg_group_by", "bench_pg_group_by", None,
         "tidemark project customers.lua vs PostgreSQL GROUP BY over jsonb (info, issue #6)",
         {"limit_word": "peer", "info": True}),
    ]

    # -- shared artefacts --

    @property
    def sz(self):
        if "sizes" not in self.cache:
            self.cache["sizes"] = sizes()
        return self.cache["sizes"]

    def exe(self, name):
        return os.path.join(H.BUILD, "bench", name)

    def orders_store(self, key, events, customers, pgcopy=False):
        """A store of gen_orders events (imported untimed, lose-on-os-crash,
        then settled); returns {"dir", "pgcopy"?}."""
        if key in self.cache:
            return self.cache[key]
        d = self.fresh(key)
        jsonl = d + ".jsonl"
        argv = [self.exe("gen_orders"), str(events), str(customers), jsonl]
        if pgcopy:
            argv.append(d + ".pgcopy")
        H.run_program_plain(argv, "gen_orders")
        H.run_program_plain([H.TIDEMARK, "import", "--data", d, "--durability",
                             "lose-on-os-crash", "--quiet", jsonl], "tidemark import")
        os.unlink(jsonl)
        self.check_store(d, events)  # also settles: the first open replays the log
        self.cache[key] = {"dir": d, "pgcopy": d + ".pgcopy" if pgcopy else None}
        return self.cache[key]

    def replay_store(self):
        return self.orders_store("replay", self.sz["replay_events"], self.sz["customers"],
                                 pgcopy=True)

    def pinned(self, argv):
        return ["taskset", "-c", str(self.sz["cpu"])] + argv

    def project(self, store, script, out, pin=True, extra=()):
        argv = [H.TIDEMARK, "project", "--data", store, "--quiet"] + list(extra) + [script]
        return measured(self.pinned(argv) if pin else argv, "tidemark project", out)

    def customers_lua(self):
        return os.path.join(H.ROOT, "projections", "customers.lua")

    # -- 3a. project rate, one core, against 3M events/s --

    def bench_project_rate(self):
        n = self.sz["replay_events"]

        def limit():
            return 3e6, "issue #3: 3M events/s on one core"

        def ours():
            st = self.replay_store()
            out = os.path.join(self.tmp, "project-rate.json")
            wall, cpu, _, _ = self.project(st["dir"], self.customers_lua(), out)
            return n / wall, "%d events in %.2f s wall, %.2f s CPU (%s per CPU second), " \
                "pinned to cpu %d" % (n, wall, cpu, H.fmt_rate(n / cpu), self.sz["cpu"])

        return limit, ours

    # -- 3b. project vs the C probe of the same scan --

    def bench_project_vs_c(self):
        n = self.sz["replay_events"]
        outs, cpus = {}, {}

        def limit():
            st = self.replay_store()
            out = os.path.join(self.tmp, "probe-project.json")
            wall, cpu, _, _ = measured(self.pinned([self.exe("probe_project"), st["dir"], out]),
                                       "probe_project", out + ".stdout")
            outs["limit"] = out
            keep_cpu(cpus, "limit", cpu)
            return n / wall, "%.2f s wall, %.2f s CPU (store_read_category + C msgpack walk + " \
                "hash map)" % (wall, cpu)

        def ours():
            st = self.replay_store()
            out = os.path.join(self.tmp, "project-vs-c.json")
            wall, cpu, _, _ = self.project(st["dir"], self.customers_lua(), out)
            outs["ours"] = out
            keep_cpu(cpus, "ours", cpu)
            return n / wall, "%.2f s wall, %.2f s CPU" % (wall, cpu)

        def check():
            print_cpu_ratio(cpus)
            # untimed: both sides computed the same read model
            if "limit" in outs and "ours" in outs:
                a, b = json.load(open(outs["ours"])), json.load(open(outs["limit"]))
                if not same_numbers(a, b):
                    raise H.BenchError("the probe's state differs from tidemark's: %s"
                                       % first_diff(a, b))

        return limit, ours, check

    # -- 3c. 1M partitions: peak RSS --

    def bench_project_memory(self):
        parts = self.sz["partitions"]
        events = 2 * parts

        def limit():
            return 512.0, "issue #3: at most 512 MiB resident"

        def ours():
            st = self.orders_store("partitions", events, parts)
            out = os.path.join(self.tmp, "project-memory.json")
            fail = None
            try:
                _, _, rss, _ = self.project(st["dir"], self.customers_lua(), out, pin=False)
                how = "default options"
            except H.BenchError as e:
                if "memory limit" not in str(e):
                    raise
                fail = "faults with the default --memory-limit: %s" % str(e).split(": ", 1)[-1]
                _, _, rss, _ = self.project(st["dir"], self.customers_lua(), out, pin=False,
                                            extra=["--memory-limit", "4096"])
                how = "--memory-limit 4096 (the default cap faults)"
            nparts = len(json.load(open(out)))
            if nparts != parts:
                raise H.BenchError("expected %d partitions, the state has %d" % (parts, nparts))
            # the C floor of the same scan, for scale (file-backed LevelDB pages count in RSS)
            _, _, prss, _ = measured([self.exe("probe_project"), st["dir"], out + ".probe"],
                                     "probe_project", out + ".probe.stdout")
            note = "%d partitions, %d events, %s; C probe of the same scan: %.0f MiB" % (
                nparts, events, how, prss / 1024.0)
            return rss / 1024.0, note, fail

        return limit, ours

    # -- 4a. HTTP append vs Redis XADD --

    def load_client(self, mode, port, keys=None, path=None):
        """build/bench/load_client MODE against port: (rate, note).  keys: the
        key count of the GET modes; path: LOAD_PATH (what http-get asks for)."""
        secs, conns = self.sz["seconds"], self.sz["clients"]
        argv = [self.exe("load_client"), mode, str(port), str(conns), str(secs)]
        if keys:
            argv += [str(keys), mode]
        env = dict(os.environ, LOAD_PATH=path) if path else None
        r = H.run_program(argv, "load_client " + mode, env=env)
        if int(r["bad"]):
            raise H.BenchError("%s: %s of %s answers were not the expected kind"
                               % (mode, r["bad"], r["events"]))
        return float(r["rate"]), "%d conns, %sp50 %s ms, p99 %s ms" % (
            conns, "%d keys, " % keys if keys and not path else "", r["p50_ms"], r["p99_ms"])

    def bench_http_append(self):
        def limit():
            red = peers.Redis(self.fresh("redis-xadd"))
            try:
                red.start()
                rate, note = self.load_client("redis-xadd", red.port)
            finally:
                red.stop()
                self.drop(red.dir)
            return rate, "XADD appendfsync always, " + note

        def ours():
            d = self.fresh("serve-append")
            srv = peers.TidemarkServer(H.TIDEMARK, d)
            try:
                srv.start()
                rate, note = self.load_client("http-append", srv.port)
            finally:
                srv.stop()
                self.drop(d)
            return rate, "POST /streams/order-C, durable, " + note

        return limit, ours

    # -- 4x. the HTTP floor: what evhttp alone costs per request --

    def bench_http_floor(self):
        keys = self.sz["customers"]

        def limit():
            red = peers.Redis(self.fresh("redis-floor"))
            try:
                red.start()
                red.hset_many("customers", [("cust-%d" % k, '{"orders":1}') for k in range(keys)])
                rate, note = self.load_client("redis-hget", red.port, keys)
            finally:
                red.stop()
                self.drop(red.dir)
            return rate, "HGET customers KEY, " + note

        def ours():
            d = self.fresh("serve-floor")
            srv = peers.TidemarkServer(H.TIDEMARK, d)
            try:
                srv.start()
                rate, note = self.load_client("http-get", srv.port, keys, path="/health")
            finally:
                srv.stop()
                self.drop(d)
            return rate, "GET /health (answered on the loop, no store, no worker), " + note

        return limit, ours

    def bench_http_ceiling(self):
        keys = self.sz["customers"]

        def limit():
            red = peers.Redis(self.fresh("redis-ceiling"))
            try:
                red.start()
                red.hset_many("customers", [("cust-%d" % k, '{"orders":1}') for k in range(keys)])
                rate, note = self.load_client("redis-hget", red.port, keys)
            finally:
                red.stop()
                self.drop(red.dir)
            return rate, "HGET customers KEY, " + note

        def probe(loops):
            srv = peers.ReadyServer([self.exe("probe_evhttp"), str(loops)],
                                    os.path.join(self.tmp, "probe-evhttp-%d.log" % loops))
            try:
                srv.start()
                return self.load_client("http-get", srv.port, keys, path="/health")
            finally:
                srv.stop()

        def ours():
            loops = max(1, self.sz["cores"])
            one, one_note = probe(1)
            rate, note = probe(loops) if loops > 1 else (one, one_note)
            return rate, "%d loops: %s; 1 loop: %s, %s" % (loops, note, H.fmt_rate(one),
                                                          one_note)

        return limit, ours

    # -- information: what two cores give to two independent scans --

    def bench_cpu_scaling(self):
        n = self.sz["replay_events"]

        def limit():
            st = self.replay_store()
            out = os.path.join(self.tmp, "scaling-alone.json")
            walls = [measured([self.exe("probe_project"), st["dir"], out], "probe_project",
                              out + ".stdout")[0] for _ in range(3)]
            return n / min(walls), "one probe_project alone: best of %s s" % \
                ", ".join("%.2f" % w for w in walls)

        def ours():
            st = self.replay_store()
            copy = st["dir"] + "-copy"
            if not os.path.isdir(copy):
                shutil.copytree(st["dir"], copy)
            best = None
            for _ in range(3):
                t0 = time.monotonic()
                procs = [subprocess.Popen([self.exe("probe_project"), d,
                                           os.path.join(self.tmp, "scaling-%d.json" % i)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                         for i, d in enumerate((st["dir"], copy))]
                for p in procs:
                    if p.wait() != 0:
                        raise H.BenchError("probe_project failed (exit %d)" % p.returncode)
                wall = time.monotonic() - t0
                best = wall if best is None else min(best, wall)
            return 2 * n / best, "two probe_project at once, on two copies: %.2f s for both " \
                "(a ratio of 2.00 is perfect scaling)" % best

        return limit, ours

    # -- 4b. read-model lookups vs Redis HGET --

    def lookup_setup(self):
        """A store with the customers projection's events, and its state
        (computed untimed by `tidemark project`) for the Redis side."""
        if "lookup" not in self.cache:
            st = self.orders_store("lookup-store", self.sz["lookup_events"], self.sz["customers"])
            state_path = os.path.join(self.tmp, "lookup-state.json")
            self.project(st["dir"], self.customers_lua(), state_path, pin=False)
            pdir = os.path.join(self.tmp, "lookup-projections")
            os.makedirs(pdir, exist_ok=True)
            shutil.copy(self.customers_lua(), pdir)
            self.cache["lookup"] = (st["dir"], json.load(open(state_path)), pdir)
        return self.cache["lookup"]

    def bench_http_lookup(self):
        keys = self.sz["customers"]

        def limit():
            _, state, _ = self.lookup_setup()
            red = peers.Redis(self.fresh("redis-hget"))
            try:
                red.start()
                red.hset_many("customers", [(k, json.dumps(v, separators=(",", ":")))
                                            for k, v in state.items()])
                rate, note = self.load_client("redis-hget", red.port, keys)
            finally:
                red.stop()
                self.drop(red.dir)
            return rate, "HGET customers KEY (the same states as JSON), " + note

        def ours():
            store, state, pdir = self.lookup_setup()
            srv = peers.TidemarkServer(H.TIDEMARK, store, ["--projections", pdir],
                                       log=os.path.join(self.tmp, "lookup-serve.log"))
            try:
                srv.start()
                self.wait_projection(srv.port, "customers", self.sz["lookup_events"])
                key = sorted(state)[len(state) // 2]
                got = self.http_json(srv.port, "/projections/customers/state?partition=" + key)
                if not same_numbers(got, state[key]):
                    raise H.BenchError("state of %s over HTTP is %r, tidemark project says %r"
                                       % (key, got, state[key]))
                rate, note = self.load_client("http-get", srv.port, keys)
            finally:
                srv.stop()
            return rate, "GET /projections/customers/state?partition=KEY, " + note

        return limit, ours

    def http_json(self, port, path):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=30) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")[:200]
            if e.code == 501:
                raise H.BenchError("GET %s answered 501 (projection routes not in this build: "
                                   "they come with branch serveproj): %s" % (path, body))
            raise H.BenchError("GET %s answered %d: %s" % (path, e.code, body))
        except OSError as e:
            raise H.BenchError("GET %s: %s" % (path, e))

    def wait_projection(self, port, name, position, timeout=300):
        """Untimed: wait until the server's projection has caught up."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.http_json(port, "/projections")
            for p in st.get("projections", []):
                if p.get("name") == name:
                    if p.get("status") not in ("running", "catching_up", "starting", None):
                        raise H.BenchError("projection %s is %s: %s" % (name, p.get("status"),
                                                                        p.get("error")))
                    if p.get("position", 0) >= position:
                        return
            if time.monotonic() > deadline:
                raise H.BenchError("projection %s did not reach position %d in %d s: %r"
                                   % (name, position, timeout, st))
            time.sleep(0.2)

    # -- 4c. append -> SSE latency --

    def bench_sse_latency(self):
        s = self.sz

        def limit():
            return 2.0, "issue #4: p99 at most 2 ms"

        def ours():
            d = self.fresh("serve-sse")
            srv = peers.TidemarkServer(H.TIDEMARK, d)
            try:
                srv.start()
                r = H.run_program([self.exe("sse_latency"), str(srv.port), str(s["sse_clients"]),
                                   str(s["sse_rate"]), str(s["seconds"]),
                                   str(s["sse_appenders"]), "sse_latency"], "sse_latency")
            finally:
                srv.stop()
                self.drop(d)
            fail = None
            if int(r["messages"]) < int(r["expected"]):
                fail = "clients received %s of %s messages" % (r["messages"], r["expected"])
            elif float(r["rate"]) < 0.95 * s["sse_rate"]:
                fail = "appends reached %s/s, not %d/s" % (r["rate"], s["sse_rate"])
            note = ("%s clients, %s events/s appended (target %d), p50 %s ms, p99.9 %s ms, "
                    "max %s ms; POST round trip p50 %s ms, p99 %s ms" % (
                        r["clients"], r["rate"], s["sse_rate"], r["p50_ms"], r["p999_ms"],
                        r["max_ms"], r["post_p50_ms"], r["post_p99_ms"]))
            return float(r["p99_ms"]), note, fail

        return limit, ours

    # -- 5. REPL ad-hoc query vs the equivalent projection --

    def bench_repl_group_by(self):
        n = self.sz["replay_events"]
        outs, cpus = {}, {}

        def limit():
            st = self.replay_store()
            lua = os.path.join(self.tmp, "count_by_customer.lua")
            with open(lua, "w") as f:
                f.write(COUNT_LUA)
            out = os.path.join(self.tmp, "count-project.json")
            wall, cpu, _, _ = self.project(st["dir"], lua, out)
            outs["limit"] = out
            keep_cpu(cpus, "limit", cpu)
            return n / wall, "tidemark project (partition data.customer, $any -> n + 1): " \
                "%.2f s wall, %.2f s CPU" % (wall, cpu)

        def ours():
            st = self.replay_store()
            out = os.path.join(self.tmp, "count-repl.csv")
            wall, cpu, _, _ = measured(self.pinned([H.TIDEMARK, "repl", "--data", st["dir"],
                                                    "--format", "csv", "-e", REPL_QUERY]),
                                       "tidemark repl", out)
            outs["ours"] = out
            keep_cpu(cpus, "ours", cpu)
            return n / wall, "repl -e '%s': %.2f s wall, %.2f s CPU" % (REPL_QUERY, wall, cpu)

        def check():
            print_cpu_ratio(cpus)
            if "limit" in outs and "ours" in outs:
                proj = json.load(open(outs["limit"]))
                with open(outs["ours"]) as f:
                    rows = f.read().splitlines()[1:]
                repl = {r.rsplit(",", 1)[0]: int(r.rsplit(",", 1)[1]) for r in rows if r}
                if repl != proj:
                    raise H.BenchError("the REPL's counts differ from the projection's: %s"
                                       % first_diff(repl, proj))

        return limit, ours, check

    # -- 5b. the same REPL query on every core vs one worker (issue #6) --

    def bench_repl_parallel(self):
        n = self.sz["replay_events"]
        cores = os.cpu_count() or 1
        outs, cpus = {}, {}

        def side(workers, key):
            st = self.replay_store()
            out = os.path.join(self.tmp, "repl-w%d.csv" % workers)
            wall, cpu, _, _ = measured([H.TIDEMARK, "repl", "--data", st["dir"], "--workers",
                                        str(workers), "--format", "csv", "-e", REPL_QUERY],
                                       "tidemark repl", out)
            outs[key] = out
            keep_cpu(cpus, key, cpu)
            return n / wall, "repl --workers %d -e '%s': %.2f s wall, %.2f s CPU" % (
                workers, REPL_QUERY, wall, cpu)

        def check():
            print_cpu_ratio(cpus)
            if "limit" in outs and "ours" in outs:
                if open(outs["limit"]).read() != open(outs["ours"]).read():
                    raise H.BenchError("--workers %d printed other rows than --workers 1" % cores)

        return (lambda: side(1, "limit")), (lambda: side(cores, "ours")), check

    # -- 6. PostgreSQL GROUP BY over jsonb (information for issue #6) --

    def bench_pg_group_by(self):
        n = self.sz["replay_events"]
        box = {}

        def start_pg():
            if "pg" in box:
                return box["pg"]
            st = self.replay_store()
            pg = peers.Postgres(os.path.join(self.tmp, "pg"), self.tmp,
                                {"max_parallel_workers_per_gather": self.sz["pg_workers"],
                                 "shared_buffers": "256MB"})
            box["pg"] = pg
            pg.start()
            pg.psql(["-c", "CREATE TABLE events (position bigint PRIMARY KEY, stream text, "
                           "type text, data jsonb)"])
            with open(st["pgcopy"]) as f:
                pg.psql(["-c", "COPY events FROM STDIN"], stdin=f)
            pg.psql(["-c", "VACUUM ANALYZE events"])
            plan = pg.psql(["-c", "EXPLAIN (ANALYZE, COSTS OFF) " + PG_QUERY])
            m = re.search(r"Workers Launched: (\d+)", plan)
            box["workers"] = m.group(1) if m else "0"
            got = pg.psql(["-At", "-F", ",", "-c", PG_QUERY])
            box["state"] = {c: {"orders": int(o), "revenue": float(r)}
                            for c, o, r in (l.split(",") for l in got.splitlines() if l)}
            return pg

        def limit():
            pg = start_pg()
            out = os.path.join(self.tmp, "pg-group-by.csv")
            timing = pg.psql(["-At", "-F", ",", "-o", out, "-c", "\\timing on", "-c", PG_QUERY])
            m = re.search(r"Time: ([0-9.]+) ms", timing)
            if not m:
                raise H.BenchError("psql printed no timing: %r" % timing[-200:])
            secs = float(m.group(1)) / 1000
            return n / secs, "GROUP BY over %d jsonb rows: %.2f s, %s parallel workers " \
                "launched" % (n, secs, box["workers"])

        def ours():
            st = self.replay_store()
            out = os.path.join(self.tmp, "project-pg.json")
            wall, cpu, _, _ = self.project(st["dir"], self.customers_lua(), out, pin=False)
            box["ours"] = out
            return n / wall, "tidemark project (no pinning): %.2f s wall, %.2f s CPU" % (wall, cpu)

        def cleanup():
            try:
                if "state" in box and "ours" in box:
                    a = json.load(open(box["ours"]))
                    if not same_numbers(a, box["state"], rel=1e-6):
                        raise H.BenchError("PostgreSQL's read model differs from tidemark's: %s"
                                           % first_diff(a, box["state"]))
            finally:
                if "pg" in box:
                    box["pg"].stop()
                    self.drop(box["pg"].dir)

        return limit, ours, cleanup
