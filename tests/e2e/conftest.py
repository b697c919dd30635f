"""Shared helpers for the end-to-end tests: run the real tidemark binary,
start a server on a free port with a temporary data dir, talk HTTP with the
standard library, and read Server-Sent Events over a raw socket.

Kept generic on purpose: any test file may use `run_tidemark`,
`start_server`, the `server` fixture, `Http` and `SseClient`.
"""
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import time

import pytest

BIN = os.environ.get("TIDEMARK_BIN",
                     os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../build/tidemark"))


def run_tidemark(*args, input=None, timeout=60):
    """Run `tidemark ARGS...`; returns subprocess.CompletedProcess (text)."""
    return subprocess.run([BIN, *map(str, args)], input=input, capture_output=True, text=True,
                          timeout=timeout)


class Server:
    """A running `tidemark serve`.  stderr goes to a log file (self.log_path)."""

    def __init__(self, data, args=(), log_dir=None, preexec_fn=None):
        self.data = data
        self.preexec_fn = preexec_fn   # runs in the child before exec (limits, signals)
        self.args = list(map(str, args))
        self.log_path = os.path.join(log_dir or os.path.dirname(data) or ".",
                                     "serve-%d.log" % time.monotonic_ns())
        self.proc = None
        self.port = None

    def start(self, timeout=15):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([BIN, "serve", "--data", self.data, "--port", "0", *self.args],
                                     stdout=subprocess.PIPE, stderr=self.log,
                                     preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if not line.startswith(b"ready port="):
            self.kill()
            raise RuntimeError("server did not start: %r\n%s" % (line, self.stderr()))
        assert line.endswith(b"\n")
        self.port = int(line.split(b"=")[1])
        return self

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def http(self, timeout=10):
        return Http(self.port, timeout)

    def stderr(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Signal the server and wait; returns its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("server did not stop after %s\n%s" % (sig, self.stderr()))

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.kill()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        if getattr(self, "log", None):
            self.log.close()


def start_server(data, *args, log_dir=None):
    """Start `tidemark serve --data DATA --port 0 ARGS...` and wait for ready."""
    return Server(data, args, log_dir).start()


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")


@pytest.fixture
def server(tmp_path):
    """A fresh server on a free port with an empty temporary data dir."""
    s = start_server(str(tmp_path / "data"), log_dir=str(tmp_path))
    yield s
    s.stop()
    s.close()


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def __repr__(self):
        return "<Response %d %r>" % (self.status, self.body[:300])


class Http:
    """A keep-alive HTTP/1.1 client (http.client) for one server."""

    def __init__(self, port, timeout=10):
        self.port = port
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, body=None, headers=None):
        hdrs = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=hdrs)
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.close()
                return Response(r.status, r.getheaders(), data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body=body, **kw)

    def append(self, stream, events, expect=None):
        h = {"Expected-Version": str(expect)} if expect is not None else None
        return self.post("/streams/" + stream, events, headers=h)

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None


class SseClient:
    """A raw-socket SSE client: sends the request itself, decodes the chunked
    body and splits it into messages {"id","event","data","comments"}."""

    def __init__(self, port, path, headers=None, rcvbuf=None, timeout=10):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1", "Accept: text/event-stream"]
        for k, v in (headers or {}).items():
            lines.append("%s: %s" % (k, v))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.raw = b""
        self.body = b""
        self.eof = False
        self.status = None
        self.headers = {}
        self.chunked = False
        self._read_head()

    def _recv(self, timeout):
        self.sock.settimeout(timeout)
        try:
            d = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            d = b""
        if not d:
            self.eof = True
            return False
        self.raw += d
        return True

    def _read_head(self):
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in self.raw:
            if not self._recv(max(0.01, deadline - time.monotonic())):
                if self.eof or time.monotonic() > deadline:
                    raise AssertionError("no response head: %r" % self.raw)
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        for l in lines[1:]:
            k, v = l.split(":", 1)
            self.headers[k.strip().lower()] = v.strip()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        if not self.chunked and "content-length" in self.headers:
            n = int(self.headers["content-length"])
            while len(self.raw) < n and self._recv(5):
                pass

    def _dechunk(self):
        if not self.chunked:
            self.body += self.raw
            self.raw = b""
            return
        while True:
            i = self.raw.find(b"\r\n")
            if i < 0:
                return
            size = int(self.raw[:i].split(b";")[0], 16)
            if len(self.raw) < i + 2 + size + 2:
                return
            self.body += self.raw[i + 2:i + 2 + size]
            self.raw = self.raw[i + 2 + size + 2:]
            if size == 0:
                self.eof = True
                return

    def next(self, timeout=5, skip_comments=True):
        """The next message (dict), or None on timeout / end of stream."""
        deadline = time.monotonic() + timeout
        while True:
            self._dechunk()
            while b"\n\n" in self.body:
                block, self.body = self.body.split(b"\n\n", 1)
                msg = {"id": None, "event": None, "data": None, "comments": [], "retry": None}
                data = []
                for line in block.decode().split("\n"):
                    if line.startswith(":"):
                        msg["comments"].append(line[1:].strip())
                        continue
                    k, _, v = line.partition(":")
                    v = v[1:] if v.startswith(" ") else v
                    if k == "data":
                        data.append(v)
                    elif k in ("id", "event", "retry"):
                        msg[k] = v
                if data:
                    msg["data"] = "\n".join(data)
                if skip_comments and msg["data"] is None and msg["event"] is None:
                    continue
                return msg
            left = deadline - time.monotonic()
            if self.eof or left <= 0:
                return None
            self._recv(min(left, 0.5))

    def events(self, n, timeout=10):
        """Exactly n data messages (asserts), as parsed dicts with 'json'."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            m = self.next(max(0.01, deadline - time.monotonic()))
            assert m is not None, "got %d of %d messages: %r" % (len(out), n, out[-3:])
            if m["data"] is not None and m["event"] != "close":
                m["json"] = json.loads(m["data"])
            out.append(m)
        return out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
