"""End-to-end tests of the store commands (append, read, import, export,
check, help) against the real tidemark binary on temporary data dirs."""
import json
import os
import signal
import subprocess
import time
import uuid

import pytest

BIN = os.environ.get("TIDEMARK_BIN", os.path.join(os.path.dirname(__file__), "../../build/tidemark"))


def tm(*args, input=None, check=None):
    """Run tidemark; returns CompletedProcess (text).  check=N asserts the exit status."""
    p = subprocess.run([BIN, *map(str, args)], input=input, capture_output=True, text=True, timeout=60)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def lines(out):
    return [json.loads(l) for l in out.splitlines() if l.strip()]


@pytest.fixture
def data(tmp_path):
    return str(tmp_path / "data")


def test_help_lists_every_command():
    p = tm("help", check=0)
    for c in ("append", "read", "import", "export", "check"):
        assert c in p.stdout
    for c in ("append", "read", "import", "export", "check"):
        h = tm(c, "--help", check=0)
        assert h.stdout.startswith("usage: tidemark " + c)
    assert tm("nope").returncode == 1
    assert "unknown command" in tm("nope").stderr


def test_append_and_read_stream(data):
    a = json.loads(tm("append", "--data", data, "order-1", "OrderPlaced", '{"customer":"c-1","amount":42.5}', check=0).stdout)
    assert a["position"] == 1 and a["version"] == 0
    uuid.UUID(a["id"])
    b = json.loads(tm("append", "--data", data, "order-1", "PaymentReceived", '{"amount":42.5}', check=0).stdout)
    assert b["position"] == 2 and b["version"] == 1
    evs = lines(tm("read", "--data", data, "order-1", check=0).stdout)
    assert [e["type"] for e in evs] == ["OrderPlaced", "PaymentReceived"]
    assert evs[0]["data"] == {"customer": "c-1", "amount": 42.5}
    assert list(evs[0].keys())[:2] == ["stream", "type"]
    assert evs[0]["position"] == 1 and evs[1]["version"] == 1
    back = lines(tm("read", "--data", data, "order-1", "--backward", check=0).stdout)
    assert [e["position"] for e in back] == [2, 1]


def test_expected_versions_and_conflicts(data):
    tm("append", "--data", data, "acct-1", "Opened", "{}", "--expect", "no_stream", check=0)
    p = tm("append", "--data", data, "acct-1", "Opened", "{}", "--expect", "no_stream")
    assert p.returncode == 3 and "0" in p.stderr
    tm("append", "--data", data, "acct-1", "Deposited", "{}", "--expect", "0", check=0)
    p = tm("append", "--data", data, "acct-1", "Deposited", "{}", "--expect", "0")
    assert p.returncode == 3 and "1" in p.stderr
    tm("append", "--data", data, "acct-1", "Deposited", "{}", "--expect", "exists", check=0)
    assert tm("append", "--data", data, "acct-2", "X", "{}", "--expect", "exists").returncode == 3
    assert tm("append", "--data", data, "acct-1", "X", "{}", "--expect", "bogus").returncode == 1


def test_idempotent_append_by_id(data):
    i = str(uuid.uuid4())
    a = json.loads(tm("append", "--data", data, "s-1", "T", '{"x":1}', "--id", i, check=0).stdout)
    b = json.loads(tm("append", "--data", data, "s-1", "T", '{"x":1}', "--id", i, check=0).stdout)
    assert a == b
    assert len(lines(tm("read", "--data", data, "--all", check=0).stdout)) == 1
    assert tm("append", "--data", data, "s-1", "T", '{"x":2}', "--id", i).returncode == 3


def test_bad_input_is_refused(data):
    p = tm("append", "--data", data, "s-1", "T", '{"x":')
    assert p.returncode == 1 and "JSON" in p.stderr
    assert tm("append", "--data", data, "", "T", "{}").returncode == 1
    assert tm("append", "--data", data, "s" * 300, "T", "{}").returncode == 1
    big = json.dumps({"stream": "s-1", "type": "T", "data": {"blob": "x" * (1 << 20)}})
    p = tm("import", "--data", data, "-", input=big + "\n")
    assert p.returncode == 1 and "line 1" in p.stderr, p.stderr
    # nothing was stored by the failures
    assert tm("read", "--data", data, "--all", check=0).stdout == ""


def test_read_missing_stream_and_dir(data, tmp_path):
    tm("append", "--data", data, "a-1", "T", "{}", check=0)
    p = tm("read", "--data", data, "nope-1")
    assert p.returncode == 2 and "not found" in p.stderr
    assert tm("read", "--data", str(tmp_path / "none"), "--all").returncode in (2, 4)


def test_values_round_trip_exactly(data):
    doc = '{"i":1,"neg":-7,"big":18446744073709551615,"f":1.5,"one":1.0,"s":"h\\u00e9","n":null,"t":true,"a":[1,2.25,"x"],"z":{"b":1,"a":2}}'
    tm("append", "--data", data, "v-1", "T", doc, check=0)
    line = tm("read", "--data", data, "v-1", check=0).stdout
    ev = json.loads(line)
    assert ev["data"] == json.loads(doc)
    assert isinstance(ev["data"]["one"], float) and isinstance(ev["data"]["i"], int)
    assert list(ev["data"]["z"].keys()) == ["b", "a"]  # key order kept
    assert '"one":1.0' in line.replace(" ", "")


def make_events(n, streams=10):
    out = []
    for i in range(n):
        s = f"order-{i % streams}" if i % 3 else f"cart-{i % streams}"
        out.append(json.dumps({"stream": s, "type": "OrderPlaced" if i % 2 else "ItemAdded",
                               "data": {"n": i, "amount": i * 1.5}, "time": 1700000000000 + i}))
    return "\n".join(out) + "\n"


def test_import_export_round_trip_and_indexes(data, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(make_events(2500))
    p = tm("import", "--data", data, str(f), "--batch", "1000", check=0)
    assert "2500" in p.stderr
    evs = lines(tm("export", "--data", data, check=0).stdout)
    assert [e["position"] for e in evs] == list(range(1, 2501))
    assert [e["data"]["n"] for e in evs] == list(range(2500))
    # per-stream versions are contiguous
    seen = {}
    for e in evs:
        assert e["version"] == seen.get(e["stream"], -1) + 1
        seen[e["stream"]] = e["version"]
    cat = lines(tm("read", "--data", data, "--category", "cart", check=0).stdout)
    assert [e["position"] for e in cat] == [e["position"] for e in evs if e["stream"].startswith("cart-")]
    typ = lines(tm("read", "--data", data, "--type", "ItemAdded", "--from", "100", "--limit", "5", check=0).stdout)
    assert [e["position"] for e in typ] == [e["position"] for e in evs if e["type"] == "ItemAdded" and e["position"] >= 100][:5]
    assert lines(tm("read", "--data", data, "--all", "--from", "2499", check=0).stdout)[0]["position"] == 2499
    # export output re-imports into an identical store (ids kept)
    data2 = str(tmp_path / "d2")
    tm("import", "--data", data2, "-", input=tm("export", "--data", data, check=0).stdout, check=0)
    assert tm("export", "--data", data2, check=0).stdout == tm("export", "--data", data, check=0).stdout
    c = tm("check", "--data", data, check=0)
    assert c.stdout.strip().splitlines()[-1].startswith("clean: 2500 events")


def test_import_bad_line_stops_with_line_number(data, tmp_path):
    f = tmp_path / "in.jsonl"
    good = make_events(25).splitlines()
    good.insert(22, '{"stream":"x-1","type":"T","data":{')  # line 23 is broken
    f.write_text("\n".join(good) + "\n")
    p = tm("import", "--data", data, str(f), "--batch", "10")
    assert p.returncode == 1
    assert "line 23" in p.stderr
    evs = lines(tm("export", "--data", data, check=0).stdout)
    assert len(evs) == 20  # two whole batches, nothing of the third
    tm("check", "--data", data, check=0)


def test_import_killed_leaves_whole_batches(data, tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_text(make_events(200000, streams=500))
    p = subprocess.Popen([BIN, "import", "--data", data, str(f), "--batch", "5000"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait until some batches are committed, then kill -9
    deadline = time.time() + 30
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
        if os.path.exists(os.path.join(data, "CURRENT")) and time.time() > deadline - 29.7:
            break
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    tm("check", "--data", data, check=0)
    evs = lines(tm("export", "--data", data, check=0).stdout)
    assert len(evs) % 5000 == 0
    assert [e["data"]["n"] for e in evs] == list(range(len(evs)))


def test_check_reports_corruption(data, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(make_events(300))
    tm("import", "--data", data, str(f), check=0)
    # flip bytes in every table / log file: check must not report clean
    hit = False
    for name in os.listdir(data):
        if name.endswith(".ldb") or name.endswith(".log"):
            path = os.path.join(data, name)
            b = bytearray(open(path, "rb").read())
            if len(b) > 200:
                for off in range(100, len(b) - 50, 97):
                    b[off] ^= 0x5A
                open(path, "wb").write(bytes(b))
                hit = True
    assert hit
    p = tm("check", "--data", data)
    assert p.returncode == 4, (p.stdout, p.stderr)
    r = tm("read", "--data", data, "--all")
    assert r.returncode == 4, "a corrupt store must fail reads, never serve or skip silently"
