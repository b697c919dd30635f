"""Corruption: random bit flips, zeroed ranges and truncations of the files
in a small store's data directory, one damage per seed.  For each:
  - no command crashes: export, a category read and check exit 0 or 4;
  - never a wrong value: every event any read prints equals the original
    event at that position (the export taken before the damage);
  - damage is detected or harmless: if export and check both exit 0, the
    export is complete and identical to the original; and any index read
    (a category, a type, a stream) that exits 0 returned all its events.  The one exception
    is a truncated LevelDB log (.log): a torn tail is what a crash leaves,
    so LevelDB drops it silently by design; the export must then still be
    an exact prefix of the original (whole batches, nothing wrong).
Seeds: TIDEMARK_CORRUPT_SEEDS (default 100; `make corrupt-long` runs 2000),
starting at TIDEMARK_CORRUPT_SEED0 (default 1)."""
import collections
import json
import os
import random
import shutil

import pytest

from faultlib import copy_store, events, jsonl, ok, tm

SEEDS = int(os.environ.get("TIDEMARK_CORRUPT_SEEDS", "100"))
SEED0 = int(os.environ.get("TIDEMARK_CORRUPT_SEED0", "1"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A store with table files (.ldb, after a reopen) and a non-empty log,
    and its export taken on a copy (every open rewrites the directory)."""
    root = tmp_path_factory.mktemp("corrupt")
    d = str(root / "pristine")
    first, second = events(600, "old", streams=6), events(30, "new", streams=6, start=600)
    # batches of 1: one index run per event, so the indexes span many blocks
    ok(tm("import", "--data", d, "-", "--batch", "1", input=jsonl(first)))
    ok(tm("export", "--data", d))  # reopen: the log becomes a table file
    ok(tm("import", "--data", d, "-", "--batch", "5", input=jsonl(second)))
    ref_dir = str(root / "ref")
    copy_store(d, ref_dir)
    ref = [json.loads(l) for l in ok(tm("export", "--data", ref_dir)).stdout.splitlines()]
    assert len(ref) == 630
    ok(tm("check", "--data", ref_dir))
    return d, ref


def damage(rng, d):
    """Damage one file in d; returns a description (file, what)."""
    files = [f for f in sorted(os.listdir(d)) if f != "LOCK" and os.path.getsize(os.path.join(d, f))]
    weights = []
    for f in files:
        weights.append(50 if f.endswith(".ldb") else 25 if f.endswith(".log")
                       else 15 if f.startswith("MANIFEST") else 5)
    f = rng.choices(files, weights)[0]
    path = os.path.join(d, f)
    size = os.path.getsize(path)
    op = rng.choices(["flip", "truncate", "zero"], [70, 20, 10])[0]
    with open(path, "r+b") as fh:
        if op == "flip":
            offs = sorted(rng.randrange(size) for _ in range(rng.randint(1, 4)))
            for o in offs:
                fh.seek(o)
                b = fh.read(1)[0]
                fh.seek(o)
                fh.write(bytes([b ^ (1 << rng.randrange(8))]))
            what = "flip bits at %s" % offs
        elif op == "truncate":
            n = rng.randrange(size)
            fh.truncate(n)
            what = "truncate %d -> %d" % (size, n)
        else:
            o = rng.randrange(size)
            n = min(size - o, rng.randint(16, 512))
            fh.seek(o)
            fh.write(b"\0" * n)
            what = "zero %d bytes at %d" % (n, o)
    return f, op, what


def parse_lines(out):
    evs = []
    for l in out.splitlines():
        if l.strip():
            evs.append(json.loads(l))
    return evs


def test_corruption_is_detected_never_served(pristine, tmp_path):
    src, ref = pristine
    by_pos = {e["position"]: e for e in ref}
    d = str(tmp_path / "d")
    tally = collections.Counter()
    for seed in range(SEED0, SEED0 + SEEDS):
        rng = random.Random(seed)
        copy_store(src, d)
        f, op, what = damage(rng, d)
        ctx = "seed %d: %s: %s" % (seed, f, what)
        ex = tm("export", "--data", d)
        cat = tm("read", "--data", d, "--category", "acct")
        typ = tm("read", "--data", d, "--type", "Deposited")
        stm = tm("read", "--data", d, "acct-1")
        ck = tm("check", "--data", d)
        for name, p in (("export", ex), ("read", cat), ("read", typ), ("read", stm), ("check", ck)):
            assert p.returncode in (0, 4), (ctx, name, p.returncode, p.stderr[-2000:])
            assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, (ctx, p.stderr)
            if p.returncode:
                assert p.stderr.strip() or name == "check", (ctx, name, "no message")
        got = parse_lines(ex.stdout)
        for p, want in ((cat, ref), (typ, [e for e in ref if e["type"] == "Deposited"]),
                        (stm, [e for e in ref if e["stream"] == "acct-1"])):
            evs = parse_lines(p.stdout)
            for e in evs:
                assert by_pos.get(e["position"]) == e, (ctx, "WRONG VALUE SERVED", e)
            if p.returncode == 0 and evs != want:
                # only a torn log tail may shorten a read without an error
                assert f.endswith(".log") and op == "truncate" and evs == want[: len(evs)], \
                    (ctx, p.args, "read exited 0 but skipped events", len(evs), len(want))
        for e in got:
            assert by_pos.get(e["position"]) == e, (ctx, "WRONG VALUE SERVED", e)
        if ex.returncode == 0 and ck.returncode == 0:
            if got == ref:
                tally["harmless"] += 1
            else:
                assert f.endswith(".log") and op == "truncate" and got == ref[: len(got)], \
                    (ctx, "damage neither detected nor harmless", len(got))
                tally["torn log tail dropped"] += 1
        else:
            tally["detected"] += 1
    print("corruption outcomes over %d seeds: %s" % (SEEDS, dict(tally)))
    assert tally["detected"] > SEEDS // 4
