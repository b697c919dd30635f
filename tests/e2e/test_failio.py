"""Failed I/O: every write, sync, rename and open the store makes is failed
in turn (an LD_PRELOAD shim, tests/faults/failio.c) during a small import
or append, and afterwards, on a clean reopen:
  - the command either succeeded or exited 4 with a clear message (never a
    signal, never a sanitizer report: run with SAN=1 this is the
    LeakSanitizer check of the failure paths too);
  - every event it acknowledged is stored, unchanged (an unacknowledged
    one MAY be there: the write can land before its sync fails);
  - nothing is stored twice or invented, positions are gapless, `tidemark
    check` is clean, and retrying the same import converges.
TIDEMARK_FAILIO_STRIDE=k tries every k-th call only (default 1: all)."""
import json
import os
import subprocess

import pytest

from faultlib import (BIN, MEMSHIM, SHIM, assert_holds, copy_store, events, import_acked, jsonl, no_crash, ok,
                      tm)

pytestmark = pytest.mark.skipif(not os.path.exists(SHIM),
                                reason="fault shim not built (make build/faults/failio.so)")

STRIDE = int(os.environ.get("TIDEMARK_FAILIO_STRIDE", "1"))


def shim_env(data, kind, n, mode="once", err="EIO", count_file=None):
    e = {"LD_PRELOAD": MEMSHIM if kind == "malloc" else SHIM, "FAILIO_CALL": kind, "FAILIO_N": str(n), "FAILIO_MODE": mode,
         "FAILIO_ERRNO": err, "FAILIO_DIR": os.path.abspath(data)}
    if count_file:
        e["FAILIO_COUNT_FILE"] = str(count_file)
    return e


def count_calls(tmp_path, template, kind, args):
    """How many calls of `kind` the command makes on a copy of template."""
    d = str(tmp_path / "count")
    copy_store(template, d)
    cf = tmp_path / "count.txt"
    p = tm(*[a.replace("@DATA@", d) for a in args], env=shim_env(d, kind, 0, count_file=cf))
    ok(p, "counting run")
    return int(cf.read_text().split()[0])


def test_shim_counts_and_fails(tmp_path):
    """The shim itself: it counts calls under the data dir and fails the Nth."""
    d = str(tmp_path / "d")
    ok(tm("append", "--data", d, "s-1", "T", "{}"))
    cf = tmp_path / "c.txt"
    ok(tm("append", "--data", d, "s-1", "T", "{}", env=shim_env(d, "sync", 0, count_file=cf)))
    calls = int(cf.read_text().split()[0])
    assert calls >= 1
    p = tm("append", "--data", d, "s-1", "T", "{}", env=shim_env(d, "sync", calls, count_file=cf))
    assert p.returncode == 4 and cf.read_text().split() == [str(calls), "1"], (p.stderr, cf.read_text())
    # calls outside FAILIO_DIR are not counted
    other = str(tmp_path / "other")
    ok(tm("append", "--data", d, "s-1", "T", "{}", env=shim_env(other, "all", 1, count_file=cf)))
    assert cf.read_text().split() == ["0", "0"]


CASES = [("sync", "once", "EIO"), ("write", "once", "EIO"), ("write", "persistent", "ENOSPC"),
         ("rename", "once", "EIO"), ("open", "once", "EIO"), ("sync", "persistent", "EIO")]


@pytest.mark.parametrize("kind,mode,err", CASES)
def test_import_under_failed_io(tmp_path, kind, mode, err):
    pre = events(5, "pre")
    evs = events(50, "imp")
    known = {e["id"]: e for e in pre + evs}
    src = tmp_path / "in.jsonl"
    src.write_text(jsonl(evs))
    template = str(tmp_path / "template")
    ok(tm("import", "--data", template, "-", input=jsonl(pre)))
    args = ["import", "--data", "@DATA@", str(src), "--batch", "5"]
    calls = count_calls(tmp_path, template, kind, args)
    assert calls > 0
    d = str(tmp_path / "d")
    failures = 0
    for n in range(1, calls + 1, STRIDE):
        copy_store(template, d)
        p = tm(*[a.replace("@DATA@", d) for a in args], env=shim_env(d, kind, n, mode, err))
        no_crash(p)
        # nothing else holds the directory: an I/O error must not be blamed on a lock
        assert "in use by another process" not in p.stderr, p.stderr
        acked = import_acked(p, evs)
        failures += p.returncode != 0
        ctx = "%s #%d (%s, %s): %s" % (kind, n, mode, err, p.stderr.strip()[-300:])
        try:
            got = assert_holds(d, pre + acked, known)
            # retrying the whole import after the failure converges to everything, once
            ok(tm(*[a.replace("@DATA@", d) for a in args]), "retry")
            got = assert_holds(d, pre + evs, known)
            assert len(got) == 55
        except AssertionError as ex:
            raise AssertionError(ctx) from ex
    assert failures > 0, "no injected failure made the import fail"


def append_args(e, data):
    """`tidemark append` of event e (with its id, metadata and time) into data."""
    return ["append", "--data", data, e["stream"], e["type"], json.dumps(e["data"]),
            "--id", e["id"], "--metadata", json.dumps(e["metadata"]), "--time", str(e["time"])]


def append_setup(tmp_path):
    """A template store of 3 events in one stream, and 3 more to append:
    (pre, new, known ids -> events, template dir)."""
    pre, new = events(3, "pre", streams=1), events(3, "app", streams=1)
    template = str(tmp_path / "template")
    ok(tm("import", "--data", template, "-", input=jsonl(pre)))
    return pre, new, {e["id"]: e for e in pre + new}, template


@pytest.mark.parametrize("kind", ["sync", "write"])
def test_append_under_failed_io(tmp_path, kind):
    pre, new, known, template = append_setup(tmp_path)

    calls = count_calls(tmp_path, template, kind, append_args(new[0], "@DATA@"))
    d = str(tmp_path / "d")
    for n in range(1, calls + 1, STRIDE):
        copy_store(template, d)
        p = tm(*append_args(new[0], d), env=shim_env(d, kind, n))
        no_crash(p)
        acked = list(pre)
        if p.returncode == 0:
            res = json.loads(p.stdout)
            assert res["id"] == new[0]["id"]
            acked.append(new[0])
        # the store takes writes again after the failed process is gone (reopen)
        for e in new[1:]:
            ok(tm(*append_args(e, d)), "append after reopen")
            acked.append(e)
        try:
            got = assert_holds(d, acked, known)
        except AssertionError as ex:
            raise AssertionError("%s #%d: %s" % (kind, n, p.stderr.strip())) from ex
        if p.returncode == 0:
            assert [e["id"] for e in got] == [e["id"] for e in pre + new]


# ---------------------------------------------------------------- malloc
# Out of memory is fail-stop (err.h tm_oom, as Redis's zmalloc): tidemark's
# own code says "tidemark: out of memory" and aborts; LevelDB (C++) throws
# std::bad_alloc and terminates, or -- in a few places of Debian's
# LevelDB 1.23 that use malloc unchecked (leveldb_get's copy, the block
# cache's insert) -- dies of SIGSEGV, which the crash report
# (engine/crash.c) shows to be inside LevelDB.  Whatever the way out, what
# must hold is what holds for a failed write: every acknowledged event is
# there after a restart, nothing else changed, `check` is clean.

def _sanitized():
    p = subprocess.run(["ldd", BIN], capture_output=True, text=True)
    return "libasan" in p.stdout


OOM_OUTCOMES = ("ok", "error", "oom", "bad_alloc", "leveldb_segv")


def oom_outcome(p):
    """How a run under a failing malloc ended; an AssertionError if it ended
    any other way (a crash in our code, a hang, a silent failure)."""
    if p.returncode == 0:
        return "ok"
    if p.returncode > 0:
        no_crash(p, allowed=(1, 4))
        return "error"
    if p.returncode == -6 and "tidemark: out of memory" in p.stderr:
        return "oom"
    if p.returncode == -6 and "std::bad_alloc" in p.stderr:
        return "bad_alloc"
    if p.returncode == -11 and "tidemark: crashed: SIGSEGV" in p.stderr:
        frames = p.stderr.split("backtrace:\n", 1)[1].splitlines()
        # [0] the handler, [1] the signal trampoline, [2] the faulting
        # frame: in LevelDB, or libc's memcpy called by LevelDB
        if "libleveldb" in frames[2] or ("libc.so" in frames[2] and "libleveldb" in frames[3]):
            return "leveldb_segv"
    raise AssertionError(("a failed malloc ended in an unexpected way", p.returncode,
                          p.stderr[-3000:]))


@pytest.mark.skipif(_sanitized(), reason="ASan's allocator cannot be interposed by the shim")
@pytest.mark.skipif(not os.path.exists(MEMSHIM), reason="malloc shim not built (make faults)")
@pytest.mark.parametrize("mode", ["once", "persistent"])
def test_append_and_import_under_failed_malloc(tmp_path, mode):
    pre, new, known, template = append_setup(tmp_path)
    imp = events(12, "imp")
    known.update({e["id"]: e for e in imp})
    src = tmp_path / "in.jsonl"
    src.write_text(jsonl(imp))

    workloads = [
        ("append", lambda d: append_args(new[0], d), lambda p: [new[0]] if p.returncode == 0 else []),
        ("import", lambda d: ["import", "--data", d, str(src), "--batch", "4"],
         lambda p: import_acked(p, imp)),
    ]
    # persistent: every malloc from the Nth on fails; a sample of N is enough
    stride = STRIDE if mode == "once" else max(STRIDE, 7)
    seen = dict.fromkeys(OOM_OUTCOMES, 0)
    d = str(tmp_path / "d")
    for name, args, acked_of in workloads:
        calls = count_calls(tmp_path, template, "malloc", args("@DATA@"))
        assert calls > 50, (name, calls)
        for n in range(1, calls + 1, stride):
            copy_store(template, d)
            p = tm(*args(d), env=shim_env(d, "malloc", n, mode))
            ctx = "%s, malloc #%d (%s): %s" % (name, n, mode, p.stderr.strip()[-1500:])
            try:
                seen[oom_outcome(p)] += 1
                acked = pre + acked_of(p)
                ok(tm(*append_args(new[1], d)), "append after the restart")
                assert_holds(d, acked + [new[1]], known)
            except AssertionError as ex:
                raise AssertionError(ctx) from ex
    # the failures reached tidemark's own allocations, not only LevelDB's;
    # a one-off failure is often survived
    assert seen["oom"] > 0 and (seen["ok"] > 0 or mode == "persistent"), seen
