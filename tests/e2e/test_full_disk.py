"""Full disk: the data directory lives on a small tmpfs mounted by the test
(needs root; skipped with the reason otherwise).  Filling it with events,
or with a filler file, must make appends fail fast (exit 4, one clear
line), never lose an acknowledged event, and leave a store that is clean
and takes writes again once space is freed (remount bigger / delete the
filler)."""
import os
import subprocess
import time

import pytest

from faultlib import assert_holds, events, import_acked, jsonl, no_crash, ok, tm


def _mount(path, size):
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(path)],
                          capture_output=True, text=True)


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("full-disk tests mount a tmpfs and need root")
    p = _mount(mnt, "1m")
    if p.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + p.stderr.strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def big_events(n, prefix, start=0):
    evs = events(n, prefix, streams=3, start=start)
    for e in evs:
        e["data"]["pad"] = "p" * 3000
    return evs


def fill_with_events(tmp_path, data):
    """Import big events in batches of 5 until the disk is full; returns
    (acknowledged events, every event tried)."""
    evs = big_events(600, "fill")
    src = tmp_path / "fill.jsonl"
    src.write_text(jsonl(evs))
    t0 = time.monotonic()
    p = tm("import", "--data", data, str(src), "--batch", "5")
    no_crash(p)
    assert p.returncode == 4, "1 MiB should not hold 600 events of 3 KB: " + p.stderr
    assert "No space left on device" in p.stderr, p.stderr
    assert time.monotonic() - t0 < 10
    return import_acked(p, evs), evs


def refused_fast(data, n=3):
    for i in range(n):
        t0 = time.monotonic()
        p = tm("append", "--data", data, "acct-0", "T", '{"late":%d}' % i)
        took = time.monotonic() - t0
        no_crash(p)
        assert p.returncode == 4, ("append on a full disk succeeded?", p.stdout, p.stderr)
        assert "No space left on device" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert took < 1.0, "refusal took %.2f s" % took


def test_full_disk_by_events(small_fs, tmp_path):
    data = str(small_fs / "data")
    base = events(20, "base")
    ok(tm("import", "--data", data, "-", input=jsonl(base)))
    acked, tried = fill_with_events(tmp_path, data)
    assert len(acked) > 0
    refused_fast(data)
    # free space: every acknowledged event is there, the store is clean and writable
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
    known = {e["id"]: e for e in base + tried}
    got = assert_holds(data, base + acked, known)
    assert len(got) >= len(base) + len(acked)
    ok(tm("append", "--data", data, "acct-0", "T", "{}"))
    ok(tm("check", "--data", data))


def test_full_disk_by_filler(small_fs, tmp_path):
    data = str(small_fs / "data")
    base = events(30, "base")
    ok(tm("import", "--data", data, "-", input=jsonl(base)))
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    refused_fast(data)
    os.unlink(filler)
    known = {e["id"]: e for e in base}
    assert_holds(data, base, known)
    ok(tm("append", "--data", data, "acct-0", "T", "{}"))


def test_reads_work_when_full(small_fs, tmp_path):
    """A CLI read on a completely full disk: opening needs LevelDB to write,
    so the store releases its RESERVE space for readers (never for writers)."""
    data = str(small_fs / "data")
    base = events(20, "base")
    ok(tm("import", "--data", data, "-", input=jsonl(base)))
    acked, _ = fill_with_events(tmp_path, data)
    p = tm("read", "--data", data, "--all")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) >= len(base) + len(acked)
