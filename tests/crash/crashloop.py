#!/usr/bin/env python3
"""tests/crash/crashloop.py — kill -9 `tidemark serve` at random moments
during concurrent durable appends, restart, repeat; after every kill check
that no acknowledged event was lost or duplicated.

One data directory lives through every iteration.  Each iteration:
  1. start `tidemark serve --data DIR --port 0` (durable mode, the default);
  2. THREADS client threads append batches of 1-4 events with client-chosen
     ids and explicit times (so a retry is byte-identical): first the batch
     left unanswered by the previous kill (an idempotent retry), then new
     ones.  Half the threads own a stream and send the exact
     Expected-Version they know; the others share two streams with `any`;
  3. after a random delay SIGKILL the server (sometimes before it is even
     ready: a kill during store recovery);
  4. with the server dead: `tidemark check` must be clean and `tidemark
     export` must hold every acknowledged event exactly once, at the
     position / version / stream the acknowledgement named; every batch
     left unanswered is there entirely or not at all; nothing unknown is
     there; positions are 1..N.

With projections (run(projections={name: lua}), the script's --projections
flag, on by default) the server also runs continuous projections over the
same appends, so kills land while they process; after every kill and store
check the server is restarted without writers, each projection catches up,
its served read model is read, the server is stopped, and every read model
must equal a rebuild from the log (`tidemark project`).

Usable as a module (run(...) -> stats dict, raises CrashLoopError) and as a
script: crashloop.py --bin build/tidemark [--iterations N] [--seconds S].
Environment for `make crash`: CRASH_ITERATIONS, CRASH_SECONDS, CRASH_SEED.
"""
import argparse
import http.client
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid


class CrashLoopError(AssertionError):
    pass


class Server:
    def __init__(self, bin_, data, log, extra=()):
        self.bin = bin_
        self.data = data
        self.log = log
        self.extra = list(extra)
        self.proc = None
        self.port = None

    def spawn(self):
        self.proc = subprocess.Popen([self.bin, "serve", "--data", self.data, "--port", "0",
                                      *self.extra],
                                     stdout=subprocess.PIPE, stderr=self.log)

    def stop(self, timeout=60):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill9()
        if rc != 0:
            raise CrashLoopError("server exit status %s after SIGTERM" % rc)

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline()
                if not line.startswith(b"ready port="):
                    raise CrashLoopError("server did not start: %r" % line)
                self.port = int(line.split(b"=")[1])
                return
            if self.proc.poll() is not None:
                raise CrashLoopError("server exited with %s before ready" % self.proc.returncode)
        raise CrashLoopError("server not ready after %ss" % timeout)

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait()
            self.proc.stdout.close()


class Writer:
    """One client thread's state; it survives iterations."""

    def __init__(self, tid, rng, pad_max):
        self.tid = tid
        self.rng = rng
        self.pad_max = pad_max
        self.own = tid % 2 == 0
        self.stream = ("own%d-1" % tid) if self.own else ("shared-%d" % (tid % 4 // 2))
        self.version = -1             # own stream: last acknowledged version
        self.pending = None           # batch sent, answer never seen
        self.acked = []               # (id, stream, position, version)
        self.sent_ids = set()
        self.requests = 0
        self.retries = 0
        self.retried_found = 0
        self.error = None

    def new_batch(self):
        n = self.rng.randint(1, 4)
        evs = []
        for _ in range(n):
            eid = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            evs.append({"type": "Crash%d" % self.rng.randint(0, 2),
                        "data": {"w": self.tid, "amount": self.rng.randint(-1000, 1000),
                                 "pad": "x" * self.rng.randint(0, self.pad_max)},
                        "id": eid, "time": 1700000000000 + self.requests})
            self.sent_ids.add(eid)
        return evs

    def run(self, port, stop):
        conn = None
        try:
            while not stop.is_set():
                batch = self.pending or self.new_batch()
                retry = self.pending is not None
                self.pending = batch
                headers = {"Content-Type": "application/json"}
                if self.own:
                    headers["Expected-Version"] = "no_stream" if self.version < 0 else str(self.version)
                body = json.dumps(batch if len(batch) > 1 or self.rng.random() < 0.5 else batch[0])
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    conn.request("POST", "/streams/" + self.stream, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                except (OSError, http.client.HTTPException):
                    return          # the server died: the batch stays pending
                self.requests += 1
                if r.status != 201:
                    raise CrashLoopError("writer %d: %d %r (retry=%s)" % (self.tid, r.status, data,
                                                                           retry))
                j = json.loads(data)
                if j["ids"] != [e["id"] for e in batch]:
                    raise CrashLoopError("writer %d: ids %r for %r" % (self.tid, j["ids"], batch))
                pos, ver = j["positions"], j["versions"]
                if pos != list(range(pos[0], pos[0] + len(batch))):
                    raise CrashLoopError("writer %d: batch positions not contiguous: %r" % (self.tid, pos))
                if self.own and ver != list(range(self.version + 1, self.version + 1 + len(batch))):
                    raise CrashLoopError("writer %d: versions %r after version %d" % (self.tid, ver, self.version))
                if retry:
                    self.retries += 1
                for e, p, v in zip(batch, pos, ver):
                    self.acked.append((e["id"], self.stream, p, v))
                if self.own:
                    self.version = ver[-1]
                self.pending = None
        except Exception as e:   # reported by the main thread
            self.error = e
        finally:
            if conn:
                conn.close()


def export_events(bin_, data):
    p = subprocess.run([bin_, "export", "--data", data], capture_output=True, timeout=600)
    if p.returncode != 0:
        raise CrashLoopError("export exit %d: %s" % (p.returncode, p.stderr.decode()[-2000:]))
    return [json.loads(l) for l in p.stdout.splitlines() if l.strip()]


def check_store(bin_, data):
    p = subprocess.run([bin_, "check", "--data", data], capture_output=True, timeout=600)
    if p.returncode != 0:
        raise CrashLoopError("check exit %d:\n%s%s" % (p.returncode, p.stdout.decode()[-3000:],
                                                      p.stderr.decode()[-2000:]))


def verify(bin_, data, writers):
    """The store after a kill: check clean, every ack kept exactly once."""
    if not any(w.sent_ids for w in writers) and not os.path.exists(os.path.join(data, "CURRENT")):
        return 0   # killed before the store was ever created: nothing to keep
    check_store(bin_, data)
    evs = export_events(bin_, data)
    where = {}
    for i, e in enumerate(evs):
        if e["position"] != i + 1:
            raise CrashLoopError("export: position %d at line %d" % (e["position"], i + 1))
        if e["id"] in where:
            raise CrashLoopError("duplicate id %s at positions %d and %d" %
                                 (e["id"], where[e["id"]]["position"], e["position"]))
        where[e["id"]] = e
    sent = set()
    for w in writers:
        sent |= w.sent_ids
        for eid, stream, pos, ver in w.acked:
            e = where.get(eid)
            if e is None:
                raise CrashLoopError("acknowledged event %s (position %d) lost" % (eid, pos))
            if (e["stream"], e["position"], e["version"]) != (stream, pos, ver):
                raise CrashLoopError("acknowledged event %s moved: acked %r, stored %r" %
                                     (eid, (stream, pos, ver),
                                      (e["stream"], e["position"], e["version"])))
        if w.pending:
            have = [x["id"] in where for x in w.pending]
            if any(have) and not all(have):
                raise CrashLoopError("batch partly stored: %r" % list(zip(w.pending, have)))
    unknown = [eid for eid in where if eid not in sent]
    if unknown:
        raise CrashLoopError("%d events nobody sent, e.g. %s" % (len(unknown), unknown[0]))
    return len(evs)


# Projections run by the server during the loop (by default): one over the
# whole log, one partitioned by stream.
PROJECTIONS = {
    "by_type": """
return {
  from = "all",
  init = function() return { n = 0, by_type = {}, amount = 0, last = 0 } end,
  on = { ["$any"] = function(s, e)
    s.n = s.n + 1
    s.by_type[e.type] = (s.by_type[e.type] or 0) + 1
    s.amount = s.amount + (e.data.amount or 0)
    s.last = e.position
  end },
}
""",
    # Deliberately slow (about 0.1 ms of work per event), so that kills land
    # while a projection is still behind the log, whatever the machine.
    "slow": """
return {
  from = "all",
  init = function() return { n = 0, h = 0 } end,
  on = { ["$any"] = function(s, e)
    local h = s.h
    for i = 1, 50000 do h = (h * 31 + i) % 1000003 end
    s.h = h
    s.n = s.n + 1
  end },
}
""",
    "per_stream": """
return {
  from = "all",
  partition = function(e) return e.stream end,
  init = function() return { events = 0, total = 0, versions = 0 } end,
  on = { ["$any"] = function(s, e)
    s.events = s.events + 1
    s.total = s.total + (e.data.amount or 0)
    s.versions = s.versions + e.version
  end },
}
""",
}


def http_json(port, path, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise CrashLoopError("GET %s: %d %r" % (path, r.status, body[:300]))
        return json.loads(body)
    finally:
        c.close()


def projections_busy(port, names):
    """(processing, behind): every projection has handled events in this
    server's life while the writers append (so it is feeding when the kill
    comes), and whether one has not yet considered every stored event."""
    try:
        j = http_json(port, "/projections", timeout=2)
    except (OSError, http.client.HTTPException, CrashLoopError):
        return False, False
    ps = {p["name"]: p for p in j["projections"]}
    processing = all(n in ps and ps[n]["status"] == "running" and ps[n]["events"] > 0 for n in names)
    behind = any(n in ps and ps[n]["position"] < j["last_position"] for n in names)
    return processing, behind


def served_read_models(srv, names, timeout=120):
    """Wait until every projection is running and caught up; their states."""
    deadline = time.monotonic() + timeout
    while True:
        j = http_json(srv.port, "/projections")
        ps = {p["name"]: p for p in j["projections"]}
        for n in names:
            if n in ps and ps[n]["status"] == "faulted":
                raise CrashLoopError("projection %s faulted: %r" % (n, ps[n].get("error")))
        if all(n in ps and ps[n]["status"] == "running" and ps[n]["position"] == j["last_position"]
               for n in names):
            break
        if time.monotonic() > deadline:
            raise CrashLoopError("projections not caught up after %ss: %r" % (timeout, ps))
        time.sleep(0.05)
    return {n: http_json(srv.port, "/projections/%s/state" % n) for n in names}


def check_projections(bin_, data, served, proj_dir):
    """Every read model the server served (caught up, persisted through its
    checkpoints across the kills) equals a rebuild from the log."""
    for name, state in served.items():
        src = os.path.join(proj_dir, name + ".lua")
        p = subprocess.run([bin_, "project", "--data", data, src, "--quiet"], capture_output=True,
                           timeout=600)
        if p.returncode != 0:
            raise CrashLoopError("project %s exit %d: %s" % (name, p.returncode, p.stderr.decode()))
        rebuilt = json.loads(p.stdout)
        if rebuilt != state:
            diff = [k for k in set(rebuilt) | set(state) if rebuilt.get(k) != state.get(k)] \
                if isinstance(rebuilt, dict) and isinstance(state, dict) else []
            raise CrashLoopError("projection %s differs from its rebuild (keys %r)" % (name, diff[:5]))


def run(bin_, workdir, iterations=10, seconds=None, threads=16, seed=None, max_run=0.6,
        pad_max=200, log=print, projections=None):
    """Run the loop; returns stats.  Stops after `iterations`, or when
    `seconds` have passed (whichever comes first; None = no time limit).
    projections: {name: Lua source} run by the server and checked against
    rebuilds after every kill (None: none)."""
    seed = seed if seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    data = os.path.join(workdir, "data")
    logf = open(os.path.join(workdir, "serve.log"), "ab")
    writers = [Writer(t, random.Random(rng.getrandbits(64)), pad_max) for t in range(threads)]
    stats = {"seed": seed, "iterations": 0, "early_kills": 0, "events": 0, "acked": 0,
             "unanswered_at_kill": 0, "retries": 0}
    extra = []
    names = sorted(projections or {})
    proj_dir = os.path.join(workdir, "projections")
    if projections:
        os.makedirs(proj_dir, exist_ok=True)
        for n, src in projections.items():
            with open(os.path.join(proj_dir, n + ".lua"), "w") as f:
                f.write(src)
        extra = ["--projections", proj_dir]
        stats["projection_checks"] = 0
        stats["kills_while_projecting"] = 0   # projections feeding as appends arrive
        stats["kills_while_behind"] = 0       # ... and one was seen behind the log
    t0 = time.monotonic()
    try:
        for it in range(iterations):
            if seconds is not None and time.monotonic() - t0 > seconds:
                break
            srv = Server(bin_, data, logf, extra)
            srv.spawn()
            if rng.random() < 0.1:
                # Kill while the store opens / recovers.
                time.sleep(rng.uniform(0, 0.05))
                srv.kill9()
                stats["early_kills"] += 1
            else:
                try:
                    srv.wait_ready()
                except CrashLoopError:
                    srv.kill9()
                    raise
                stop = threading.Event()
                ts = [threading.Thread(target=w.run, args=(srv.port, stop)) for w in writers]
                for t in ts:
                    t.start()
                time.sleep(rng.uniform(0.05, max_run))
                if names:
                    processing, behind = projections_busy(srv.port, names)
                    stats["kills_while_projecting"] += processing
                    stats["kills_while_behind"] += processing and behind
                srv.kill9()
                stop.set()
                for t in ts:
                    t.join(60)
                    if t.is_alive():
                        raise CrashLoopError("a writer thread hangs after the kill")
                for w in writers:
                    if w.error:
                        raise w.error
                stats["unanswered_at_kill"] += sum(1 for w in writers if w.pending)
            n = verify(bin_, data, writers)
            if names:
                srv = Server(bin_, data, logf, extra)
                srv.spawn()
                try:
                    srv.wait_ready()
                    served = served_read_models(srv, names)
                    srv.stop()
                finally:
                    srv.kill9()
                check_projections(bin_, data, served, proj_dir)
                stats["projection_checks"] += len(names)
            stats["iterations"] += 1
            stats["events"] = n
            stats["acked"] = sum(len(w.acked) for w in writers)
            stats["retries"] = sum(w.retries for w in writers)
            log("iteration %d: %d events stored, %d acknowledged, %d batches unanswered at the kill"
                % (it + 1, n, stats["acked"], sum(1 for w in writers if w.pending)))
    except CrashLoopError as e:
        raise CrashLoopError("%s (seed %d, iteration %d; data in %s)" %
                             (e, seed, stats["iterations"] + 1, data)) from None
    finally:
        logf.close()
    stats["seconds"] = round(time.monotonic() - t0, 1)
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--bin", default=os.environ.get("TIDEMARK_BIN",
                                                    os.path.join(here, "../../build/tidemark")))
    ap.add_argument("--iterations", type=int, default=int(os.environ.get("CRASH_ITERATIONS", "1000")))
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("CRASH_SECONDS", "600")))
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--seed", type=int, default=int(os.environ["CRASH_SEED"]) if os.environ.get("CRASH_SEED") else None)
    ap.add_argument("--max-run", type=float, default=1.5, help="longest run before a kill (s)")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    ap.add_argument("--no-projections", action="store_true",
                    help="appends only (no projections in the server)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tidemark-crash-")
    ok = False
    try:
        st = run(os.path.abspath(a.bin), work, a.iterations, a.seconds, a.threads, a.seed,
                 a.max_run, projections=None if a.no_projections else PROJECTIONS)
        print("crash loop ok: %s" % json.dumps(st))
        ok = True
    except CrashLoopError as e:
        print("CRASH LOOP FAILED: %s" % e, file=sys.stderr)
    finally:
        if ok and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
