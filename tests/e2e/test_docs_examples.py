"""The Lua examples in the docs must run.

Every ```lua block of docs/lua-api.md (and docs/sketches.md) that is a
complete projection -- its first line that is not a comment or blank starts
with `return {`, or it carries a comment `-- example: NAME` -- is written to a
file and run with `tidemark project` over a small generated data set (the
e-commerce events of scripts/gen-events plus a few page views for the
page-analytics example).  It must exit 0 and print JSON, and each of its
named queries must run without arguments.

When the block is followed by a plain ``` block showing a `$ tidemark
project ...` command and its output, the same command (same --query/--get/
--top arguments) is run and its output must have the same SHAPE as the
documented one: the same keys and JSON types (numbers are numbers, a
partitioned projection's partitions all look like the documented ones).  The
values cannot be compared: the docs do not say which events they ran on.
"""
import json
import os
import random
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
BIN = os.environ.get("TIDEMARK_BIN", os.path.join(ROOT, "build/tidemark"))
GEN = os.path.join(ROOT, "scripts/gen-events")
DOCS = ["docs/lua-api.md", "docs/sketches.md"]

FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")


def blocks(text):
    """[(lang, body, line)] of the fenced blocks of a markdown text."""
    out, cur, lang, start = [], None, None, 0
    for i, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.strip()) if line.lstrip().startswith("```") else None
        if cur is None:
            if m:
                cur, lang, start = [], m.group(1), i
        elif line.strip() == "```":
            out.append((lang, "\n".join(cur) + "\n", start))
            cur = None
        else:
            cur.append(line)
    return out


def is_projection(body):
    if re.search(r"^\s*--\s*example:\s*\S+", body, re.M):
        return True
    for line in body.splitlines():
        s = line.strip()
        if not s or s.startswith("--"):
            continue
        return s.startswith("return {") or s == "return{"
    return False


def doc_examples():
    """[(id, doc, line, lua, shown)] where shown is (argv after the file, output text) or None."""
    found = []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        if not os.path.exists(path):
            continue
        bl = blocks(open(path).read())
        for i, (lang, body, line) in enumerate(bl):
            if lang != "lua" or not is_projection(body):
                continue
            shown = None
            if i + 1 < len(bl) and bl[i + 1][0] == "":
                shown = parse_shown(bl[i + 1][1])
            m = re.search(r"^\s*--\s*example:\s*(\S+)", body, re.M)
            name = m.group(1) if m else "%s_%d" % (os.path.basename(doc)[:-3].replace("-", "_"), line)
            found.append(("%s:%d" % (doc, line), doc, line, body, shown, name))
    return found


def parse_shown(text):
    """A '$ tidemark project ... FILE.lua [args]' line and the output after it."""
    lines = text.splitlines()
    for i, l in enumerate(lines):
        if l.startswith("$ tidemark project"):
            argv = shlex.split(l[2:])
            rest = []
            skip = False
            for j, a in enumerate(argv[2:]):
                if skip:
                    skip = False
                    continue
                if a == "--data":
                    skip = True
                    continue
                if a.endswith(".lua"):
                    continue
                rest.append(a)
            out = "\n".join(x for x in lines[i + 1:] if not x.startswith("$")).strip()
            return rest, out
    return None


EXAMPLES = doc_examples()


def page_events(n=400, seed=11):
    r = random.Random(seed)
    pages = ["/", "/cart", "/checkout", "/p/SKU-0001", "/p/SKU-0002", "/search"]
    refs = ["google", "newsletter", "instagram", None]
    out = []
    for i in range(n):
        d = {"page": r.choice(pages), "visitor": "v-%d" % r.randrange(150),
             "ms": round(r.lognormvariate(5, 0.7), 1)}
        ref = r.choice(refs)
        if ref:
            d["referrer"] = ref
        out.append(json.dumps({"stream": "page-%d" % (i % 40), "type": "PageViewed", "data": d,
                               "time": 1700000000000 + i * 1500}))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    ev = str(d / "events.jsonl")
    subprocess.run([sys.executable, GEN, "--events", "3000", "--seed", "5", "--customers", "200",
                    "--out", ev], check=True)
    with open(ev, "a") as f:
        f.write(page_events())
    dd = str(d / "data")
    p = subprocess.run([BIN, "import", "--quiet", "--data", dd, ev], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return dd


def shape(v):
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if v is None:
        return "null"
    if isinstance(v, list):
        return ["list", sorted({json.dumps(shape(x), sort_keys=True) for x in v})]
    return {k: shape(x) for k, x in v.items()}


def same_shape(doc_value, got, partitioned):
    if partitioned and isinstance(doc_value, dict) and isinstance(got, dict):
        want = {json.dumps(shape(x), sort_keys=True) for x in doc_value.values()}
        have = {json.dumps(shape(x), sort_keys=True) for x in got.values()}
        return bool(got) and have <= want, (want, have)
    return shape(doc_value) == shape(got), (shape(doc_value), shape(got))


def test_docs_have_examples():
    assert any(doc == "docs/lua-api.md" for _, doc, *_ in EXAMPLES), "no complete projection found in docs/lua-api.md"


@pytest.mark.parametrize("ex", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_doc_example_runs(data, tmp_path, ex):
    where, doc, line, lua, shown, name = ex
    path = str(tmp_path / (name + ".lua"))
    with open(path, "w") as f:
        f.write(lua)
    p = subprocess.run([BIN, "project", "--quiet", "--data", data, path], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, "%s: the example fails (exit %d): %s" % (where, p.returncode, p.stderr.strip())
    state = json.loads(p.stdout)
    # The data set is chosen so that every documented example sees events.
    assert state not in ({}, None, []), "%s: the example built an empty model over the test data" % where
    # Every named query of the example runs without arguments.
    q = re.search(r"\bqueries\s*=\s*\{(.*)", lua, re.S)
    for qname in re.findall(r"^\s*([A-Za-z_]\w*)\s*=\s*function\s*\(", q.group(1), re.M) if q else []:
        p = subprocess.run([BIN, "project", "--quiet", "--data", data, path, "--query", qname],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, "%s: query %s fails: %s" % (where, qname, p.stderr.strip())
        json.loads(p.stdout)
    if shown is None:
        return
    extra, out = shown
    p = subprocess.run([BIN, "project", "--quiet", "--data", data, path, *extra],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, "%s: the documented command fails: %s" % (where, p.stderr.strip())
    doc_value = json.loads(out)
    ok, detail = same_shape(doc_value, json.loads(p.stdout), "partition" in lua and not extra)
    assert ok, "%s: output does not have the documented shape: %s" % (where, detail)
