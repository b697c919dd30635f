"""Browser test of the dashboard: headless Debian chromium driven over the
DevTools protocol (a minimal stdlib WebSocket client below).  Loads the
page from a real server, checks the history tail, appends events over HTTP,
checks they arrive live through the page's multiplexed EventSource, and
saves a screenshot to build/artifacts/dashboard.png.  Skipped when
/usr/bin/chromium is missing (scripts/install-deps installs it)."""
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request

import pytest

from conftest import start_server

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../build/artifacts")

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed")


class WebSocket:
    """Just enough RFC 6455 for the DevTools protocol: text frames, client masking."""

    def __init__(self, url, timeout=20):
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", url)
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n" % (path, host, port, key)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0

    def _exact(self, n):
        b = b""
        while len(b) < n:
            d = self.sock.recv(n - len(b))
            if not d:
                raise EOFError("devtools connection closed")
            b += d
        return b

    def send(self, obj):
        data = json.dumps(obj).encode()
        hdr = bytes([0x81])
        n = len(data)
        if n < 126:
            hdr += bytes([0x80 | n])
        elif n < 65536:
            hdr += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            hdr += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self):
        msg = b""
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            payload = self._exact(n)
            op = b0 & 0x0F
            if op in (0x1, 0x0):
                msg += payload
                if b0 & 0x80:
                    return json.loads(msg)
            elif op == 0x8:
                raise EOFError("devtools closed the websocket")

    def call(self, method, **params):
        self.next_id += 1
        mid = self.next_id
        self.send({"id": mid, "method": method, "params": params})
        while True:
            m = self.recv()
            if m.get("id") == mid:
                if "error" in m:
                    raise AssertionError("%s: %s" % (method, m["error"]))
                return m.get("result", {})

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r.get("result", {}).get("value")

    def close(self):
        self.sock.close()


@pytest.fixture
def browser(tmp_path):
    prof = tempfile.mkdtemp(prefix="tm-chromium-")
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync",
                             "--user-data-dir=" + prof, "--remote-debugging-port=0",
                             "--window-size=1400,1000", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode("utf-8", "replace")
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if m:
            port = int(m.group(1))
            break
        if not line and proc.poll() is not None:
            break
    if port is None:
        proc.kill()
        pytest.fail("chromium did not start its DevTools endpoint")
    try:
        yield port
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
        shutil.rmtree(prof, ignore_errors=True)


def page_ws(devtools_port):
    targets = json.load(urllib.request.urlopen("http://127.0.0.1:%d/json/list" % devtools_port, timeout=10))
    page = next(t for t in targets if t.get("type") == "page")
    return WebSocket(page["webSocketDebuggerUrl"])


def wait_for(ws, expr, timeout=15):
    deadline = time.monotonic() + timeout
    v = None
    while time.monotonic() < deadline:
        v = ws.eval(expr)
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError("timed out waiting for %s (last %r)" % (expr, v))


def test_dashboard_shows_history_and_live_events(tmp_path, browser):
    s = start_server(str(tmp_path / "d"), log_dir=str(tmp_path))
    ws = None
    try:
        h = s.http()
        for i in range(3):
            assert h.append("order-%d" % i, [{"type": "OrderPlaced", "data": {"total": 10 + i}},
                                             {"type": "PaymentReceived", "data": {"amount": 10 + i}}]).status == 201
        ws = page_ws(browser)
        ws.call("Page.enable")
        ws.call("Page.navigate", url=s.url + "/")
        # History: the six stored events are in the tail and the streams table.
        wait_for(ws, "document.querySelectorAll('#tail tbody tr.history').length == 6")
        wait_for(ws, "document.getElementById('conn').textContent == 'live'")
        assert ws.eval("document.querySelectorAll('#streams tbody tr').length") == 3
        assert "projections" in ws.eval("document.getElementById('projnote').textContent").lower()
        assert ws.eval("typeof Chart") == "function"
        # Live: appended events arrive through the page's EventSource.
        for i in range(20):
            h.append("customer-%d" % (i % 4), {"type": "CustomerRegistered", "data": {"n": i}})
            h.append("product-sku-%d" % (i % 3), {"type": "ProductViewed", "data": {"n": i}})
        wait_for(ws, "document.querySelectorAll('#tail tbody tr.live').length == 40")
        top = ws.eval("document.querySelector('#tail tbody tr').dataset.position")
        assert top == "46"
        assert ws.eval("document.getElementById('lastpos').textContent") == "46"
        wait_for(ws, "document.querySelectorAll('#streams tbody tr').length == 10")
        wait_for(ws, "Chart.getChart('catChart').data.datasets.length >= 2")
        # Filters act on the tail.
        ws.eval("document.getElementById('ftype').value = 'ProductViewed';"
                "document.getElementById('ftype').dispatchEvent(new Event('input'))")
        h.append("product-sku-1", {"type": "ProductViewed", "data": {}})
        h.append("customer-1", {"type": "CustomerRegistered", "data": {}})
        wait_for(ws, "document.querySelectorAll('#tail tbody tr').length == 1")
        assert ws.eval("document.querySelector('#tail tbody tr').cells[3].textContent") == "ProductViewed"
        ws.eval("document.getElementById('ftype').value = '';"
                "document.getElementById('ftype').dispatchEvent(new Event('input'))")
        for i in range(10):
            h.append("order-%d" % (i % 3), {"type": "OrderShipped", "data": {"i": i}})
        wait_for(ws, "document.querySelectorAll('#tail tbody tr').length >= 10")
        time.sleep(1.2)   # let the charts redraw once more
        shot = ws.call("Page.captureScreenshot", format="png")
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, "dashboard.png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        assert os.path.getsize(path) > 10000
    finally:
        if ws:
            ws.close()
        s.stop()
        s.close()


def test_dashboard_projections_panel(tmp_path, browser):
    """The projections panel lists the server's projections (GET /projections)
    and follows their live updates (position, faulted status)."""
    s = start_server(str(tmp_path / "d"), log_dir=str(tmp_path))
    ws = None
    try:
        h = s.http()
        counter = ("return { from = 'all', init = function() return { n = 0 } end,"
                   " on = { Tick = function(st, e) st.n = st.n + 1 end } }")
        failing = ("return { from = 'all', init = function() return { n = 0 } end,"
                   " on = { Tick = function(st, e) if e.data.i == 5 then error('no 5') end end } }")
        assert h.request("PUT", "/projections/ticks", counter).status == 201
        assert h.request("PUT", "/projections/fails", failing).status == 201
        h.append("tick-1", [{"type": "Tick", "data": {"i": i}} for i in range(3)])
        ws = page_ws(browser)
        ws.call("Page.enable")
        ws.call("Page.navigate", url=s.url + "/")
        row = "[...document.querySelectorAll('#projections tbody tr')].find(r => r.cells[0].textContent == '%s')"
        wait_for(ws, "!!(%s)" % (row % "ticks"))
        wait_for(ws, "document.getElementById('conn').textContent == 'live'")
        assert ws.eval("(%s).cells[1].textContent" % (row % "ticks")) == "running"
        h.append("tick-1", [{"type": "Tick", "data": {"i": i}} for i in range(3, 8)])
        wait_for(ws, "(%s).cells[2].textContent == '8'" % (row % "ticks"))
        wait_for(ws, "(%s).cells[1].textContent == 'faulted'" % (row % "fails"))
    finally:
        if ws:
            ws.close()
        s.stop()
        s.close()
