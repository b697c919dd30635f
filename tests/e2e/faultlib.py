"""Helpers shared by the hardening tests (test_failio, test_full_disk,
test_corruption): running tidemark, workloads with known event ids, and
the comparison "every acknowledged event is there, unchanged"."""
import json
import os
import re
import shutil
import subprocess
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
BIN = os.environ.get("TIDEMARK_BIN", os.path.join(ROOT, "build", "tidemark"))
SHIM = os.environ.get("FAILIO_SO", os.path.join(ROOT, "build", "faults", "failio.so"))
MEMSHIM = os.environ.get("FAILMEM_SO", os.path.join(ROOT, "build", "faults", "failmem.so"))

# Sanitizer builds: the shim must come before the ASan runtime in the
# library list, which ASan refuses unless told not to verify the order.
BASE_ENV = dict(os.environ)
BASE_ENV["ASAN_OPTIONS"] = (BASE_ENV.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0").lstrip(":")


def tm(*args, input=None, env=None, timeout=60):
    e = dict(BASE_ENV)
    if env:
        e.update(env)
    return subprocess.run([BIN, *map(str, args)], input=input, capture_output=True, text=True, errors="backslashreplace",
                          timeout=timeout, env=e)


def ok(p, what=""):
    assert p.returncode == 0, (what, p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p


def events(n, prefix="e", streams=5, start=0):
    """n events with fixed ids (deterministic: uuid5 of prefix and index)."""
    out = []
    for i in range(start, start + n):
        out.append({
            "stream": "acct-%d" % (i % streams),
            "type": "Deposited" if i % 3 else "Opened",
            "data": {"i": i, "amount": i * 1.25, "note": "x" * (i % 7), "tags": ["a", i]},
            "metadata": {"correlation_id": "c-%d" % i},
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "tidemark-test/%s/%d" % (prefix, i))),
            "time": 1700000000000 + i,
        })
    return out


def jsonl(evs):
    return "".join(json.dumps(e) + "\n" for e in evs)


def export(data):
    p = ok(tm("export", "--data", data), "export after reopen")
    return [json.loads(l) for l in p.stdout.splitlines() if l.strip()]


def check_clean(data):
    p = tm("check", "--data", data)
    assert p.returncode == 0 and p.stdout.rstrip().splitlines()[-1].startswith("clean:"), \
        ("check not clean", p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p


def same_event(stored, orig):
    return all(stored[k] == orig[k] for k in ("stream", "type", "data", "metadata", "id", "time"))


def assert_holds(data, acked, known):
    """After a clean reopen: every acknowledged event (list of input dicts) is
    in the export, unchanged; nothing in the export is unknown or twice;
    positions are 1..n; `tidemark check` is clean.  Returns the export."""
    got = export(data)
    assert [e["position"] for e in got] == list(range(1, len(got) + 1)), "positions not gapless"
    by_id = {}
    for e in got:
        assert e["id"] not in by_id, ("event stored twice", e["id"])
        by_id[e["id"]] = e
    for a in acked:
        assert a["id"] in by_id, ("acknowledged event lost", a)
        assert same_event(by_id[a["id"]], a), ("acknowledged event changed", a, by_id[a["id"]])
    for e in got:
        assert e["id"] in known, ("unknown event in the store", e)
        assert same_event(e, known[e["id"]]), ("stored event differs from what was sent", e)
    check_clean(data)
    return got


IMPORT_STORED = re.compile(r"(?:imported|stored) (\d+) events \(lines 1-(\d+)")


def import_acked(p, evs):
    """The events an import run acknowledged, from its exit status and summary."""
    if p.returncode == 0:
        return list(evs)
    m = IMPORT_STORED.search(p.stderr)
    if not m:  # "nothing was stored", or the store could not be opened
        return []
    return evs[: int(m.group(1))]


def no_crash(p, allowed=(0, 4)):
    """Exit status is one we allow (not a signal, not a sanitizer report), and
    a failure says why in one clear line on stderr."""
    assert p.returncode in allowed, ("unexpected exit status", p.returncode, p.stderr[-3000:])
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr[-3000:]
    if p.returncode:
        msgs = [l for l in p.stderr.splitlines() if l.startswith("tidemark ") and ": " in l]
        assert msgs, ("no error message", p.stderr)


def copy_store(src, dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
