"""Crash loop (CI-sized): kill -9 `tidemark serve` at random moments while 16
threads append durably, restart, repeat; after every kill `tidemark check`
is clean and every acknowledged event is stored exactly once where its
acknowledgement said (tests/crash/crashloop.py has the details; `make crash`
runs the long version)."""
import os
import random
import sys

import pytest

from conftest import BIN

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crash"))
import crashloop  # noqa: E402


def test_crash_loop_keeps_every_acknowledged_event(tmp_path):
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(1 << 30))
    st = crashloop.run(os.path.abspath(BIN), str(tmp_path), iterations=10, seconds=20,
                       threads=16, seed=seed, max_run=0.5, log=lambda s: None)
    print("crash loop:", st)
    assert st["iterations"] >= 4, st
    # The kills really hit appends in flight, and the retries ran.
    assert st["unanswered_at_kill"] > 0 and st["retries"] > 0, st
    assert st["acked"] > 500, st


def test_crash_loop_with_projections_read_models_equal_rebuilds(tmp_path):
    """The same with two projections running in the server: kills land while
    they process; after each, the restarted server's caught-up read models
    equal `tidemark project` rebuilds."""
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(1 << 30))
    st = crashloop.run(os.path.abspath(BIN), str(tmp_path), iterations=6, seconds=25,
                       threads=16, seed=seed, max_run=0.5, log=lambda s: None,
                       projections=crashloop.PROJECTIONS)
    print("crash loop with projections:", st)
    assert st["iterations"] >= 3 and st["projection_checks"] == len(crashloop.PROJECTIONS) * st["iterations"], st
    assert st["kills_while_projecting"] > 0 and st["unanswered_at_kill"] > 0, st


class _FakeWriter:
    def __init__(self, acked, sent, pending=None):
        self.acked = acked
        self.sent_ids = set(sent)
        self.pending = pending


def test_verifier_catches_lost_moved_and_partial(tmp_path):
    """The checks above can fail: a store with known content against
    acknowledgements that disagree with it."""
    data = str(tmp_path / "d")
    ids = ["00000000-0000-4000-8000-%012d" % i for i in range(4)]
    import subprocess
    lines = "".join('{"stream":"s-1","type":"T","data":{},"id":"%s"}\n' % i for i in ids[:3])
    p = subprocess.run([BIN, "import", "--data", data, "-"], input=lines.encode(),
                       capture_output=True)
    assert p.returncode == 0, p.stderr
    good = [(ids[0], "s-1", 1, 0), (ids[1], "s-1", 2, 1)]
    assert crashloop.verify(BIN, data, [_FakeWriter(good, ids[:3])]) == 3
    with pytest.raises(crashloop.CrashLoopError, match="lost"):
        crashloop.verify(BIN, data, [_FakeWriter(good + [(ids[3], "s-1", 4, 3)], ids)])
    with pytest.raises(crashloop.CrashLoopError, match="moved"):
        crashloop.verify(BIN, data, [_FakeWriter([(ids[0], "s-1", 2, 1)], ids[:3])])
    with pytest.raises(crashloop.CrashLoopError, match="partly"):
        crashloop.verify(BIN, data, [_FakeWriter([], ids, pending=[{"id": ids[2]}, {"id": ids[3]}])])
    with pytest.raises(crashloop.CrashLoopError, match="nobody sent"):
        crashloop.verify(BIN, data, [_FakeWriter([], ids[:2])])
    # A served read model that differs from the rebuild is caught.
    pdir = tmp_path / "p"
    pdir.mkdir()
    (pdir / "by_type.lua").write_text(crashloop.PROJECTIONS["by_type"])
    p = subprocess.run([BIN, "project", "--data", data, str(pdir / "by_type.lua"), "--quiet"],
                       capture_output=True)
    good_state = __import__("json").loads(p.stdout)
    crashloop.check_projections(BIN, data, {"by_type": good_state}, str(pdir))
    bad_state = dict(good_state, n=good_state["n"] + 1)
    with pytest.raises(crashloop.CrashLoopError, match="differs"):
        crashloop.check_projections(BIN, data, {"by_type": bad_state}, str(pdir))
