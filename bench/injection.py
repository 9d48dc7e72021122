"""Fault injection for the faults scenario, and the private ``redis-server`` it owns.

Everything here touches only what the harness started or owns, never a shared
service:

* :class:`RedisServer`: a ``redis-server`` on a free loopback port, in a private
  folder, started and stopped by its ``Popen`` (never ``SHUTDOWN`` sent to a port,
  which might by then be someone else's); ``restart()`` is a graceful stop (SIGTERM:
  Redis writes its RDB snapshot) and a start on the same port and folder, which loads
  it back. It dies with the harness (``PR_SET_PDEATHSIG``), and at exit
  (registered with :data:`bench.children.OWNER`).
* :func:`drop_unix_connections`: the connections a worker's processes hold to our unix
  broker, shut down from outside (``pidfd_getfd`` duplicates each socket into this
  process; ``shutdown()`` ends the connection for both ends, as a broker that hung up
  would). Needs Linux >= 5.6 and ptrace rights over the worker (our own child).
* :func:`redis_kill_clients`: ``CLIENT KILL ADDR`` on our private server, for exactly
  the worker's connections (their local addresses, read with psutil).
* :func:`rabbit_close_connections`: ``rabbitmqctl close_connection`` for exactly the
  worker's connections (matched by peer port), when ``rabbitmqctl`` can reach the
  broker's node here; nothing else on the broker is touched.
* :func:`run_command`: a user's ``--restart-cmd`` / ``--start-cmd``, bounded in time.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil

from . import children, config

POLL_S = 0.02
SYS_PIDFD_GETFD = 438          # the same number on every Linux architecture (5.6+)
# Redis's own default save points, given explicitly so no config file changes them:
# a graceful stop writes the snapshot, a start loads it (the queue survives a restart).
REDIS_SAVE = "3600 1 300 100 60 10000"


class FaultError(RuntimeError):
    """A fault could not be injected (or a broker did not come back) as asked."""


# --------------------------------------------------------------------------- redis-server
def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the harness (the forking thread) dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class RedisServer:
    """A private ``redis-server`` in ``folder`` on a free loopback port.

    ``start()`` waits until it answers PING; ``stop()`` is SIGTERM to its group, then
    SIGKILL after ``timeout``; ``restart(down_s)`` stops it, waits ``down_s``, starts it again on the
    same port and folder. Idempotent ``stop()``; also stopped at exit.
    """

    def __init__(self, folder: Path, binary: str | None = None):
        self.folder = Path(folder)
        self.binary = binary or redis_server_binary()
        if not self.binary:
            raise FileNotFoundError("redis-server is not on PATH (apt-get install redis-server)")
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.log_path = self.folder / "redis.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs):
        import redis

        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 2)
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, **kwargs)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _argv(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--dbfilename", "dump.rdb",
                "--save", REDIS_SAVE, "--appendonly", "no", "--daemonize", "no",
                "--protected-mode", "yes", "--logfile", str(self.log_path),
                "--unixsocket", ""]

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if self.alive():
            return self
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        attempts = 1 if self.port else 5   # a restart keeps its port: clients reconnect there
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_port()
            self.proc = children.spawn(
                self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd=str(self.folder), preexec_fn=_die_with_parent)
            self.pid = self.proc.pid
            children.OWNER.register(self)
            if self._wait_ready(timeout):
                self.starts += 1
                return self
            self._reap()
        raise FaultError(f"private redis-server on 127.0.0.1:{self.port} did not start: "
                         f"{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        client = self.client(socket_timeout=1, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False  # e.g. the port was taken meanwhile
                try:
                    if client.ping():
                        return True
                except Exception:
                    pass
                time.sleep(POLL_S)
            self.stop(1.0)
            return False
        finally:
            client.close()

    def _reap(self) -> None:
        if self.proc is not None:
            children.OWNER.release(self.proc.pid)

    def terminate(self) -> None:
        """Ask it to stop, without waiting (redis: save the snapshot, close the port, exit)."""
        if self.alive():
            children.kill_group(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        children.stop([proc], timeout)
        self._reap()
        return proc.returncode

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    # -- what Kombu keeps in it
    @staticmethod
    def visibility_default() -> float:
        """Kombu's ``visibility_timeout`` when the transport options do not set one."""
        from kombu.transport.redis import Channel

        return float(Channel.visibility_timeout)

    @staticmethod
    def visibility_options(seconds: float) -> dict:
        """Transport options for a short ``visibility_timeout`` whose tasks come back within
        a cell: Kombu sweeps every second instead of every ~100 s."""
        return {"visibility_timeout": seconds, "unacked_restore_interval": 1,
                "unacked_restore_throttle": 1}

    def held(self, queue: str, visibility_timeout: float, index_of) -> dict:
        """What Kombu's redis transport still holds for ``queue``: task indices (``index_of``
        maps a task id to one, or None) ``queued`` in its lists, ``invisible`` in the
        unacked hash, and when each invisible one becomes visible again (``visible_at``:
        wall clock, delivery + ``visibility_timeout``). Every key is ours: a private server."""
        out = {"queued": set(), "invisible": set(), "visible_at": {}}
        client = self.client()
        try:
            for key in client.scan_iter(match=f"{queue}*"):   # priority lists included
                if client.type(key) != b"list":
                    continue
                for raw in client.lrange(key, 0, -1):
                    idx = index_of(json.loads(raw).get("headers", {}).get("id"))
                    if idx is not None:
                        out["queued"].add(idx)
            scores = dict(client.zrange("unacked_index", 0, -1, withscores=True))
            for tag, raw in client.hgetall("unacked").items():
                message = json.loads(raw)[0]
                idx = index_of(message.get("headers", {}).get("id"))
                if idx is not None:
                    out["invisible"].add(idx)
                    if tag in scores:
                        out["visible_at"][idx] = scores[tag] + visibility_timeout
        finally:
            client.close()
        return out


def running_servers() -> list[RedisServer]:
    """The private servers this process started and has not stopped yet."""
    return children.OWNER.running(RedisServer)


# --------------------------------------------------------------------------- processes
def process_tree(pid: int) -> list[int]:
    """``pid`` and its living descendants (a worker and its pool children)."""
    try:
        proc = psutil.Process(pid)
        return [pid] + [c.pid for c in proc.children(recursive=True)]
    except psutil.Error:
        return []


def tcp_local_addrs(pids, port: int, host: str = "127.0.0.1") -> list[tuple[str, int]]:
    """Local (ip, port) of every TCP connection the ``pids`` hold to ``host:port``."""
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            if c.raddr and c.raddr.port == port and c.raddr.ip == host and \
                    c.status == psutil.CONN_ESTABLISHED:
                out.append((c.laddr.ip, c.laddr.port))
    return sorted(set(out))


# --------------------------------------------------------------------------- connection drops
def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    out = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if out < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return out


def drop_unix_connections(pids, path: str) -> int:
    """Shut down every AF_UNIX connection the ``pids`` hold to the socket at ``path``.

    Returns how many. FaultError when the kernel refuses (no ``pidfd_getfd``, no
    ptrace rights), with the reason.
    """
    target = os.path.realpath(path)
    dropped = 0
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except (OSError, AttributeError) as exc:
            raise FaultError(f"pidfd_open: {exc}") from None
        try:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for name in fds:
                try:
                    if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                        continue
                except OSError:
                    continue
                try:
                    dup = _pidfd_getfd(pidfd, int(name))
                except OSError as exc:
                    if exc.errno == errno.EBADF:   # closed meanwhile
                        continue
                    raise FaultError(f"pidfd_getfd on the worker's socket: {exc} (needs Linux "
                                     f">= 5.6 and ptrace rights over the worker)") from None
                sock = socket.socket(fileno=dup)
                try:
                    if sock.family != socket.AF_UNIX:
                        continue
                    try:
                        peer = sock.getpeername()
                    except OSError:
                        continue
                    if isinstance(peer, bytes) or not peer or \
                            os.path.realpath(peer) != target:
                        continue
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                        dropped += 1
                    except OSError:
                        pass
                finally:
                    sock.close()  # our duplicate only; the shutdown is what the worker sees
        finally:
            os.close(pidfd)
    return dropped


def redis_kill_clients(server: RedisServer, addrs) -> int:
    """``CLIENT KILL ADDR`` each of ``addrs`` ((ip, port) pairs) on our private server."""
    killed = 0
    client = server.client()
    try:
        for ip, port in addrs:
            try:
                client.execute_command("CLIENT", "KILL", "ADDR", f"{ip}:{port}")
                killed += 1
            except Exception:  # gone meanwhile ("No such client")
                pass
    finally:
        client.close()
    return killed


def rabbitmqctl_binary() -> str | None:
    return shutil.which("rabbitmqctl")


def rabbit_close_connections(local_ports, reason: str, timeout: float = 30.0) -> int:
    """Close, server-side, the RabbitMQ connections whose peer port is in ``local_ports``
    (the worker's own), with ``rabbitmqctl``. Returns how many; FaultError when
    ``rabbitmqctl`` is missing or fails (the broker's node is not reachable from here)."""
    binary = rabbitmqctl_binary()
    if not binary:
        raise FaultError("rabbitmqctl is not on PATH")
    wanted = {int(p) for p in local_ports}
    listing = subprocess.run([binary, "list_connections", "pid", "peer_host", "peer_port",
                              "-q", "--no-table-headers"], capture_output=True, text=True,
                             timeout=timeout)
    if listing.returncode:
        raise FaultError(f"rabbitmqctl list_connections failed: "
                         f"{(listing.stderr or listing.stdout).strip().splitlines()[-1:]}")
    pids = []   # close_connection takes the connection's Erlang pid
    for line in listing.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1] in ("127.0.0.1", "::1") and parts[2].isdigit() \
                and int(parts[2]) in wanted:
            pids.append(parts[0])
    closed = 0
    for pid in pids:
        res = subprocess.run([binary, "close_connection", pid, reason], capture_output=True,
                             text=True, timeout=timeout)
        if res.returncode == 0:
            closed += 1
    return closed


# --------------------------------------------------------------------------- per broker
# What this module can do to each transport's broker. The faults scenario asks these
# functions and never names a transport itself.
_PRIVATE = {"redis": RedisServer}       # brokers it can run privately (start, restart, remove)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def private_server(transport: str, folder: Path) -> RedisServer | None:
    """A private server (not started yet) for ``transport`` in ``folder``, when this module
    runs that broker itself; None for a transport it does not."""
    cls = _PRIVATE.get(transport)
    return cls(folder) if cls is not None else None


def runs_privately(transport: str) -> bool:
    return transport in _PRIVATE


def private_unavailable(transport: str) -> str | None:
    """Why the private server of ``transport`` cannot run here (None: it can, or it has
    none)."""
    if transport in _PRIVATE and not redis_server_binary():
        return ("redis-server is not on PATH: the faults scenario runs redis cells on a "
                "private redis-server it starts and removes (apt-get install redis-server)")
    return None


def drop_unavailable(transport: str) -> str | None:
    """Why a worker's connections to ``transport``'s broker cannot be dropped from here
    (None: :func:`drop_connections` can)."""
    if transport == "unix" or transport in _PRIVATE:
        return None
    if transport == "amqp":
        if not rabbitmqctl_binary():
            return ("it closes the worker's connection with rabbitmqctl close_connection, and "
                    "rabbitmqctl is not on PATH")
        host = urlparse(config.service_url("amqp")).hostname or "localhost"
        if host not in _LOOPBACK:
            return (f"RabbitMQ at {host} is not this host's node, which rabbitmqctl here "
                    f"controls")
        return None
    return f"no way to drop a {transport} worker's connections is known to the harness"


def drop_connections(transport: str, url: str, server, pids, timeout: float) -> int:
    """End every connection the ``pids`` (a worker and its pool children) hold to the
    broker at ``url``, and nothing else; returns how many. unix: shut down from outside;
    a private redis: ``CLIENT KILL``; amqp: ``rabbitmqctl close_connection``."""
    if transport == "unix":
        return drop_unix_connections(pids, urlparse(url).path)
    if server is not None:
        return redis_kill_clients(server, tcp_local_addrs(pids, server.port))
    port = urlparse(url).port or 5672
    ports = [p for _, p in tcp_local_addrs(pids, port)]
    return rabbit_close_connections(ports, "celery-bench faults: connection-drop", timeout)


# --------------------------------------------------------------------------- commands
def run_command(cmd: str, timeout: float, what: str) -> float:
    """Run a user's shell command (``--restart-cmd``...) within ``timeout``; returns the
    seconds it took. FaultError, with its output's last line, when it fails or overruns
    (its whole process group is killed then)."""
    t0 = time.monotonic()
    proc = children.spawn(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        children.kill_group(proc.pid)
        proc.communicate()
        raise FaultError(f"{what} {shlex.quote(cmd)} did not finish within {timeout:g} s") \
            from None
    except BaseException:
        children.kill_group(proc.pid)
        proc.wait()
        raise
    if proc.returncode:
        last = (out or "").strip().splitlines()[-1:] or [""]
        raise FaultError(f"{what} {shlex.quote(cmd)} exited with {proc.returncode}: {last[0]}")
    return time.monotonic() - t0
