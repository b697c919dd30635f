"""End-to-end tests of `tidemark replay`: the real binary over a data dir
filled with `tidemark import`.  The parallel rebuild must print the same
bytes as `tidemark project` (serial) for every worker count, the persisted
model must equal the continuous run's, Ctrl-C must checkpoint and --resume
must finish with the same bytes, and a faulting rebuild must leave the old
model serving."""
import json
import os
import signal
import subprocess
import time

import pytest

BIN = os.environ.get("TIDEMARK_BIN", os.path.join(os.path.dirname(__file__), "../../build/tidemark"))

EXAMPLE = """
return {
  from      = { category = "order" },
  partition = function(e) return e.data.customer end,
  init      = function() return { orders = 0, revenue = 0, last = 0 } end,
  on = {
    OrderPlaced     = function(s, e) s.orders = s.orders + 1; s.last = e.position end,
    PaymentReceived = function(s, e) s.revenue = s.revenue + e.data.amount * s.orders end,
  },
  queries = {
    over = function(m, min)
      local r = {}
      for k, s in pairs(m) do if s.revenue > min then r[#r + 1] = k end end
      table.sort(r)
      return r
    end,
  },
}
"""


def tm(*args, input=None, timeout=120):
    return subprocess.run([BIN, *map(str, args)], input=input, capture_output=True, text=True,
                          timeout=timeout)


def write_events(path, n, customers=300, start=0):
    with open(path, "w") as f:
        for i in range(start, start + n):
            c = "cust-%d" % ((i * 7919) % customers) if i % 5 else (i % 17)  # numbers too
            if i % 2 == 0:
                e = {"stream": "order-%d" % (i // 2), "type": "OrderPlaced", "data": {"customer": c}}
            else:
                e = {"stream": "order-%d" % (i // 2), "type": "PaymentReceived",
                     "data": {"customer": c, "amount": (i % 1000) / 8}}
            if i % 13 == 0:
                e["stream"] = "audit-%d" % i
            f.write(json.dumps(e) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    ev = d / "ev.jsonl"
    write_events(ev, 40000)
    r = tm("import", "--data", d / "data", ev)
    assert r.returncode == 0, r.stderr
    (d / "ex.lua").write_text(EXAMPLE)
    return d


def copy(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def test_parallel_equals_serial_for_every_worker_count(data):
    serial = tm("project", "--data", data / "data", data / "ex.lua")
    assert serial.returncode == 0, serial.stderr
    assert len(json.loads(serial.stdout)) > 100
    for w in (1, 2, 3, 4, 8):
        r = tm("replay", "--data", data / "data", data / "ex.lua", "--workers", w)
        assert r.returncode == 0, r.stderr
        assert r.stdout == serial.stdout, "workers=%d" % w
        if w > 1:
            assert "%d workers, routed by data.customer" % w in r.stderr
    for extra in (["--query", "over", "300"], ["--top", "revenue:5"], ["--partitions"],
                  ["--get", "cust-7"], ["--get", "3"]):
        a = tm("project", "--data", data / "data", data / "ex.lua", *extra)
        b = tm("replay", "--data", data / "data", data / "ex.lua", "--workers", 3, *extra)
        assert a.returncode == 0 and b.returncode == 0, b.stderr
        assert a.stdout == b.stdout, extra


def test_unwritable_output_is_an_error(data):
    """A result that cannot be written (a full disk) is exit status 4 with
    the reason, whoever renders the pairs (one worker, or each worker in
    its own thread)."""
    for cmd in ("project", "replay"):
        for w in (1, 2):
            with open("/dev/full", "w") as full:
                r = subprocess.run([BIN, cmd, "--data", str(data / "data"), str(data / "ex.lua"),
                                    "--workers", str(w), "--quiet"], stdout=full,
                                   stderr=subprocess.PIPE, text=True, timeout=120)
            assert r.returncode == 4, (cmd, w, r.stderr)
            assert "cannot write the output: No space left on device" in r.stderr, (cmd, w)


def test_default_workers_follow_cpu_affinity(data):
    """Without --workers, replay and project use the cores the process may
    run on (taskset, cpusets), not every core of the machine."""
    cpus = sorted(os.sched_getaffinity(0))

    def pinned(n, *args):
        return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True,
                              timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, cpus[:n]))

    serial = tm("project", "--data", data / "data", data / "ex.lua", "--workers", 1)
    one = pinned(1, "replay", "--data", data / "data", data / "ex.lua")
    assert one.returncode == 0, one.stderr
    assert "1 worker" in one.stderr and "workers" not in one.stderr.splitlines()[0], one.stderr
    assert one.stdout == serial.stdout
    if len(cpus) >= 2:
        two = pinned(2, "replay", "--data", data / "data", data / "ex.lua")
        assert "2 workers, routed by data.customer" in two.stderr, two.stderr
        assert two.stdout == serial.stdout
    proj = pinned(1, "project", "--data", data / "data", data / "ex.lua")
    assert proj.returncode == 0 and proj.stdout == serial.stdout, proj.stderr


def test_persist_equals_continuous_and_resumes(data, tmp_path):
    # continuous: a projection fed in two rounds with appends in between
    cont = copy(data / "data", tmp_path / "cont")
    par = copy(data / "data", tmp_path / "par")
    more = tmp_path / "more.jsonl"
    write_events(more, 3000, start=40000)
    r = tm("project", "--data", cont, data / "ex.lua", "--persist", "--quiet")
    assert r.returncode == 0, r.stderr
    for d in (cont, par):
        assert tm("import", "--data", d, more).returncode == 0
    cont_out = tm("project", "--data", cont, data / "ex.lua", "--persist", "--quiet")
    assert cont_out.returncode == 0
    r = tm("replay", "--data", par, data / "ex.lua", "--workers", 3, "--persist", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == cont_out.stdout
    # the swapped-in model is the projection's: project --persist continues from it
    after = tm("project", "--data", par, data / "ex.lua", "--persist", "--quiet")
    assert after.stdout == cont_out.stdout


def test_sigint_checkpoints_and_resume_finishes(data, tmp_path):
    d = copy(data / "data", tmp_path / "d")
    serial = tm("project", "--data", d, data / "ex.lua").stdout
    slow = tmp_path / "slow.lua"
    # a slow handler so the replay is still running when SIGINT arrives
    slow.write_text(EXAMPLE.replace("s.orders = s.orders + 1;",
                                    "s.orders = s.orders + 1; local x = 0; for i = 1, 300000 do x = x + i % 7 end;"
                                    " if x < 0 then s.orders = 0 end;"))
    p = subprocess.Popen([BIN, "replay", "--data", str(d), str(slow), "--name", "ex", "--workers", "2",
                          "--persist", "--checkpoint-every", "2000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("replay finished before SIGINT (machine too fast)")
    assert p.returncode == 130, err
    assert "--resume" in err and "checkpointed at position" in err
    # resumed with another worker count: the checkpoint's count is used
    r = tm("replay", "--data", d, slow, "--name", "ex", "--resume", "--workers", "3")
    assert r.returncode == 0, r.stderr
    assert "2 workers" in r.stderr
    assert r.stdout == serial
    r = tm("replay", "--data", d, slow, "--name", "ex", "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr


def test_fault_during_rebuild_keeps_old_model(data, tmp_path):
    d = copy(data / "data", tmp_path / "d")
    old = tm("replay", "--data", d, data / "ex.lua", "--name", "ex", "--persist", "--quiet")
    assert old.returncode == 0, old.stderr
    bad = tmp_path / "bad.lua"
    bad.write_text(EXAMPLE.replace("s.orders = s.orders + 1;",
                                   "if e.position == 30001 then error('boom') end s.orders = s.orders + 1;"))
    serial = tm("project", "--data", d, bad, "--name", "ex")
    assert serial.returncode == 1 and "position 30001" in serial.stderr
    r = tm("replay", "--data", d, bad, "--name", "ex", "--persist", "--workers", 2)
    assert r.returncode == 1
    assert "position 30001" in r.stderr and "boom" in r.stderr
    # the old model still serves: project --persist resumes from it unchanged
    now = tm("project", "--data", d, data / "ex.lua", "--name", "ex", "--persist", "--quiet")
    assert now.stdout == old.stdout


def test_cli_errors(data, tmp_path):
    r = tm("replay", "--data", data / "data", "no-such-projection")
    assert r.returncode == 2 and "no-such-projection" in r.stderr
    r = tm("replay", "--data", data / "data", data / "ex.lua", "--workers", "0")
    assert r.returncode == 1
    r = tm("replay", "--data", tmp_path / "nope", data / "ex.lua")
    assert r.returncode == 2
    r = tm("replay", "--help")
    assert r.returncode == 0 and "--resume" in r.stdout
    r = tm("replay", "--data", data / "data", data / "ex.lua", "--summary", "--workers", 2)
    s = json.loads(r.stdout)
    assert s["workers"] == 2 and s["events"] > 0 and s["position"] == 40000


def _wait_caught_up(h, name, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = h.get("/projections/" + name).json()
        if st["status"] == "running" and st["lag"] == 0:
            return st
        assert st["status"] != "faulted", st
        time.sleep(0.1)
    raise AssertionError("projection %s did not catch up: %r" % (name, st))


def test_server_projection_by_name_and_version_handshake(data, tmp_path):
    """`tidemark replay NAME` replays a projection installed with PUT (its
    stored source); the swap records which source built proj/NAME/, so a
    server whose source is the same keeps the replayed model, and one whose
    source differs rebuilds instead of serving another script's model."""
    from conftest import Http, start_server
    d = str(copy(data / "data", tmp_path / "d"))
    srv = start_server(d, log_dir=str(tmp_path))
    try:
        h = Http(srv.port)
        assert h.request("PUT", "/projections/ex", body=EXAMPLE).status == 201
        _wait_caught_up(h, "ex")
        served = h.get("/projections/ex/state").json()
    finally:
        srv.stop()
        srv.close()
    # by name: the stored source, the same model
    r = tm("replay", "--data", d, "ex", "--persist", "--workers", 2, "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == served
    srv = start_server(d, log_dir=str(tmp_path))
    try:
        h = Http(srv.port)
        st = _wait_caught_up(h, "ex")
        assert st["events"] == 0  # kept: nothing re-fed since the start
        assert h.get("/projections/ex/state").json() == served
    finally:
        srv.stop()
        srv.close()
    # another script swapped in under the same name: the server rebuilds
    other = tmp_path / "other.lua"
    other.write_text(EXAMPLE.replace("s.orders + 1", "s.orders + 2"))
    r = tm("replay", "--data", d, other, "--name", "ex", "--persist", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) != served
    srv = start_server(d, log_dir=str(tmp_path))
    try:
        h = Http(srv.port)
        st = _wait_caught_up(h, "ex")
        assert st["events"] > 0
        assert h.get("/projections/ex/state").json() == served
    finally:
        srv.stop()
        srv.close()


def test_many_partitions_merge_in_key_order_for_every_worker_count(tmp_path):
    """The JSON of a partitioned result is cut into one segment per worker at
    sampled keys and each segment merged in a thread of its own: thousands of
    partitions (numbers and strings, keys that share long prefixes) must
    come out in the serial run's byte order for any worker count."""
    ev = tmp_path / "ev.jsonl"
    write_events(ev, 24000, customers=6000)
    r = tm("import", "--data", tmp_path / "data", ev)
    assert r.returncode == 0, r.stderr
    (tmp_path / "ex.lua").write_text(EXAMPLE)
    serial = tm("project", "--data", tmp_path / "data", tmp_path / "ex.lua")
    assert serial.returncode == 0, serial.stderr
    assert len(json.loads(serial.stdout)) > 4000
    for w in (2, 3, 5, 8):
        r = tm("replay", "--data", tmp_path / "data", tmp_path / "ex.lua", "--workers", w)
        assert r.returncode == 0, r.stderr
        assert r.stdout == serial.stdout, "workers=%d" % w
