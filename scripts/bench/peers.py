"""scripts/bench/peers.py — the servers the benchmarks start and stop.

Owns the life cycle of every server process a benchmark talks to:
  TidemarkServer  `tidemark serve --data DIR --port 0 ...`, waits for
                  "ready port=N" on stdout
  Redis           redis-server on a free loopback port, AOF on with
                  appendfsync always, in its own directory (no RDB)
  Postgres        initdb + pg_ctl from /usr/lib/postgresql/<newest>/bin on a
                  unix socket in its own directory (no TCP), fsync on; as a
                  non-root user (runuser -u postgres when run as root)
Invariants: every process is started by us, in a directory under the
benchmark's temp dir, and stopped by its pid (stop() is idempotent; the
runner calls it in a finally block).  A peer that is not installed raises
Skip with the reason; one that fails to start raises the runner's error.
"""
import os
import pwd
import select
import shutil
import socket
import stat
import subprocess
import time


class Skip(Exception):
    """A peer is not available on this machine (the line says SKIPPED)."""


class PeerError(Exception):
    """A peer was available but could not be started or used."""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tail(path, n=3):
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f.read().splitlines() if l.strip()]
        return " | ".join(lines[-n:]) or "(empty log)"
    except OSError:
        return "(no log)"


def stop_process(p, timeout=30):
    """SIGTERM the process we started, then SIGKILL if it lingers."""
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


class ReadyServer:
    """A program that prints `ready port=N` on stdout once it serves
    (DESIGN.md's contract; probe_evhttp keeps it too)."""

    def __init__(self, argv, log):
        self.argv = list(argv)
        self.log = log
        self.p = None
        self.port = None

    def start(self, timeout=120):
        logf = open(self.log, "w")
        self.p = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=logf,
                                  stdin=subprocess.DEVNULL, universal_newlines=True)
        logf.close()
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.p.stdout], [], [], 0.5)
            if r:
                line = self.p.stdout.readline()
                if line.startswith("ready port="):
                    self.port = int(line.split("=", 1)[1])
                    return self
                if not line:
                    break
            if self.p.poll() is not None:
                break
        self.stop()
        raise PeerError("%s did not print 'ready port=N': %s"
                        % (os.path.basename(self.argv[0]), tail(self.log)))

    def stop(self):
        stop_process(self.p)
        if self.p and self.p.stdout:
            self.p.stdout.close()
        self.p = None


class TidemarkServer(ReadyServer):
    def __init__(self, binary, data, extra=(), log=None):
        ReadyServer.__init__(self, [binary, "serve", "--data", data, "--port", "0"] + list(extra),
                             log or data.rstrip("/") + ".serve.log")


class Redis:
    """redis-server, durable like our default mode: appendonly + fsync always."""

    def __init__(self, workdir):
        self.dir = workdir
        self.p = None
        self.port = None
        self.exe = shutil.which("redis-server")
        if not self.exe:
            raise Skip("redis-server is not installed (scripts/install-bench-deps)")

    def start(self, timeout=20):
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        log = os.path.join(self.dir, "redis.log")
        self.p = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no", "--logfile", log, "--protected-mode", "yes"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                break
            try:
                if self.command(b"*1\r\n$4\r\nPING\r\n", 1).startswith(b"+PONG"):
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise PeerError("redis-server did not start: %s" % tail(log))

    def command(self, raw, replies):
        """Send raw RESP bytes; return the reply bytes once `replies` CRLF-ended
        simple replies (+, -, :) have arrived."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        try:
            s.sendall(raw)
            got = b""
            while got.count(b"\r\n") < replies:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
            return got
        finally:
            s.close()

    def hset_many(self, key, fields):
        """HSET key f v for every (f, v) (strings), pipelined; checks the replies."""
        def bulk(b):
            return b"$%d\r\n%s\r\n" % (len(b), b)
        raw = b"".join(b"*4\r\n$4\r\nHSET\r\n" + bulk(key.encode()) + bulk(f.encode()) +
                       bulk(v.encode()) for f, v in fields)
        got = self.command(raw, len(fields))
        if got.count(b":") < len(fields) or b"-" in got[:1]:
            raise PeerError("redis HSET failed: %r" % got[:200])

    def stop(self):
        stop_process(self.p)
        self.p = None


def _pg_bin():
    env = os.environ.get("BENCH_PG_BIN")
    if env:
        return env if os.access(os.path.join(env, "initdb"), os.X_OK) else None
    root = "/usr/lib/postgresql"
    try:
        versions = sorted((v for v in os.listdir(root) if v.isdigit()), key=int, reverse=True)
    except OSError:
        return None
    for v in versions:
        b = os.path.join(root, v, "bin")
        if os.access(os.path.join(b, "initdb"), os.X_OK):
            return b
    return None


class Postgres:
    """A private PostgreSQL cluster: unix socket only, fsync on."""

    def __init__(self, workdir, bench_tmp, settings):
        self.bin = _pg_bin()
        if not self.bin or not shutil.which("psql"):
            raise Skip("PostgreSQL is not installed (scripts/install-bench-deps)")
        self.dir = workdir
        self.data = os.path.join(workdir, "data")
        self.sock = workdir
        self.settings = settings
        self.started = False
        self.wrap = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise Skip("running as root and there is no 'postgres' user to run PostgreSQL as")
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            if not shutil.which("runuser"):
                raise Skip("running as root without runuser to drop to the postgres user")
            self.wrap = ["runuser", "-u", "postgres", "--"]
            # The postgres user must reach its directory: let others traverse
            # the (root-owned, 0700) bench temp dir, not read it.
            os.chmod(bench_tmp, 0o711)
            st = os.stat("/dev/null")
            if not st.st_mode & stat.S_IWOTH:
                # This machine's /dev/null is not writable by other users,
                # which initdb needs.  Give our PostgreSQL processes a private
                # one (a bind mount in their own mount namespace); the
                # system's /dev/null is left as it is.
                null = os.path.join(bench_tmp, "devnull")
                if not os.path.exists(null):
                    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                    os.chmod(null, 0o666)
                self.wrap = ["unshare", "-m", "sh", "-c",
                             'mount --bind "$0" /dev/null && exec runuser -u postgres -- "$@"',
                             null]
        os.makedirs(self.dir, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(self.dir, self.uid, self.gid)

    def _run(self, argv, what, timeout=300):
        p = subprocess.run(self.wrap + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, universal_newlines=True, timeout=timeout)
        if p.returncode != 0:
            lines = [l for l in p.stdout.splitlines() if l.strip()]
            raise PeerError("%s failed (exit %d): %s" % (what, p.returncode,
                                                        " | ".join(lines[-3:])))
        return p.stdout

    def start(self):
        self._run([os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust",
                   "-U", "postgres", "-E", "UTF8", "--no-sync"], "initdb")
        opts = "-k %s -c listen_addresses='' -c fsync=on" % self.sock
        for k, v in self.settings.items():
            opts += " -c %s=%s" % (k, v)
        log = os.path.join(self.dir, "server.log")
        try:
            self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", log, "-w",
                       "-t", "120", "-o", opts, "start"], "pg_ctl start")
        except PeerError as e:
            raise PeerError("%s; log: %s" % (e, tail(log)))
        self.started = True
        return self

    def psql(self, args, stdin=None, out=None):
        """Run psql as a client (any user may: trust on the private socket)."""
        argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.sock,
                "-U", "postgres", "-d", "postgres"] + list(args)
        p = subprocess.run(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if p.returncode != 0:
            raise PeerError("psql failed (exit %d): %s" % (p.returncode, p.stderr.strip()[-300:]))
        return p.stdout

    def stop(self):
        if not self.started:
            return
        self.started = False
        try:
            self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "fast", "-w",
                       "stop"], "pg_ctl stop", timeout=120)
        except (PeerError, subprocess.TimeoutExpired):
            # last resort: the postmaster's pid, from its own pid file
            try:
                with open(os.path.join(self.data, "postmaster.pid")) as f:
                    os.kill(int(f.readline()), 9)
            except (OSError, ValueError):
                pass
