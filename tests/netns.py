"""A multi-host rig on one Linux machine, for the distributed Locust tests.

Each "host" is a network namespace (``ip netns add``) joined to the others by a
bridge through a veth pair, with addresses in the benchmarking range
198.18.0.0/15 (RFC 2544), and its own ``/tmp``: a holder process owns a mount
namespace with a tmpfs on ``/tmp``, and every command for that host enters
both namespaces with ``nsenter``, so two hosts never share a file under /tmp.
The bridge has no address of its own: traffic stays between the namespaces
(and each namespace's own loopback), never the machine's real network.

Namespaces are named ``cbrig<pid>x<tag>-<role>`` and the bridge
``cb<pid>b<tag>``, so a run can find and remove what an earlier run left behind
(killed with SIGKILL, say): names whose pid is gone are deleted by prefix, with
every process still inside them. A rig is
removed on ``close()``, on leaving its ``with`` block, and at interpreter exit.

Why not a library: pyroute2 could build the links, but the namespaces, the
mount namespace and the ``nsenter`` wrapping are a few iproute2/util-linux
calls, which also say plainly what a user would type to rebuild the rig.
"""
from __future__ import annotations

import atexit
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

# terminate, then kill, each process group (one owner of that sequence in the tree)
from bench import children

PREFIX = "cbrig"
SUBNET = "198.18.0"   # hosts get .1, .2, ...; /24 inside the 198.18.0.0/15 range
NAME_RE = re.compile(rf"^{PREFIX}(\d+)x([0-9a-f]+)-")
TIMEOUT = 10.0
STOP_GRACE_S = 2.0    # after SIGTERM, how long a host's processes may take before SIGKILL


def bound_back() -> list[str]:
    """The checkout and interpreter paths under /tmp that every host's private /tmp binds
    back (shared code, never results): empty unless the checkout lives under /tmp."""
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parents[1]
    return sorted({str(p) for p in (here, Path(sys.prefix).resolve())
                   if str(p).startswith("/tmp/")})


def private_files(host) -> set[str]:
    """Every path under ``host``'s /tmp except the bound-back code (and the folders that
    hold it), NUL-separated so a name with a space stays one path."""
    keep = bound_back()
    argv = ["find", "/tmp", "-mindepth", "1"]
    for path in keep:
        argv += ["-path", path, "-prune", "-o"]
    found = host.run([*argv, "-print0"]).stdout.split("\0")
    return {f for f in found
            if f and not any(k == f or k.startswith(f + "/") for k in keep)}


def _private_tmp_script() -> str:
    """The holder's shell: a tmpfs on /tmp, then 'ready'. A checkout or interpreter that
    itself lives under /tmp (a CI clone, say) is bound back into the new /tmp first, or no
    host could run the harness: shared code, like an install, never shared results."""
    keep = bound_back()
    lines = ["set -e", "stash=$(mktemp -d /run/cbrig-keep.XXXXXX)"]
    for i, path in enumerate(keep):
        lines.append(f"mkdir $stash/{i} && mount --bind '{path}' $stash/{i}")
    lines.append("mount -t tmpfs -o mode=1777 tmpfs /tmp")
    for i, path in enumerate(keep):
        lines.append(f"mkdir -p '{path}' && mount --bind $stash/{i} '{path}' && umount $stash/{i}")
    lines += ["rm -rf $stash", "echo ready", "exec sleep infinity"]
    return "\n".join(lines)


class HostsUnavailable(Exception):
    """This machine cannot build the rig (not root, no iproute2, no namespaces)."""


def _ready_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line ``proc`` prints, or '' if none comes within ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, check=check)


def unavailable() -> str | None:
    """Why the rig cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "the multi-host rig needs root (network and mount namespaces)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            pkg = "iproute2" if tool == "ip" else "util-linux"
            return f"the multi-host rig needs '{tool}' ({pkg}); `make install` installs it as root"
    probe = f"{PREFIX}{os.getpid()}xprobe-p"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"network namespaces are not available here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def clean_stale() -> list[str]:
    """Delete rig namespaces and bridges left by runs whose process is gone."""
    removed = []
    for ns in _namespaces():
        m = NAME_RE.match(ns)
        if m and not _alive(int(m.group(1))):
            _kill_inside(ns)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout
    for name, pid in re.findall(rf"^\d+:\s+({PREFIX[:2]}(\d+)b[0-9a-f]+)[:@]", links, re.M):
        if not _alive(int(pid)):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class Host:
    """One namespace: its name on the rig, its address, its /tmp holder."""
    role: str
    ns: str
    addr: str
    veth: str = ""
    holder: subprocess.Popen | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside this host's network and mount namespaces."""
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-m", "--", *argv]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start a process on this host; the rig stops it when it is removed."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], timeout: float = TIMEOUT, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(argv), timeout=timeout, **kw)


class Hosts:
    """Hosts on a bridge: ``Hosts(["broker", "master", "gen1", "gen2"])``."""

    def __init__(self, roles: list[str]):
        if len(set(roles)) != len(roles):
            raise ValueError(f"host roles must be unique: {roles}")
        clean_stale()
        self.tag = secrets.token_hex(2)
        # 15 characters at most for a link name; the pid lets clean_stale() judge it.
        self.bridge = f"{PREFIX[:2]}{os.getpid()}b{self.tag}"
        self.hosts: dict[str, Host] = {}
        self._closed = False
        atexit.register(self.close)
        try:
            self._build(roles)
        except BaseException:
            self.close()
            raise

    def _build(self, roles: list[str]) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i, role in enumerate(roles, start=1):
            ns = f"{PREFIX}{os.getpid()}x{self.tag}-{role}"
            outside, inside = f"cbv{self.tag}{i}", f"cbp{self.tag}{i}"
            host = Host(role, ns, f"{SUBNET}.{i}", veth=outside)
            self.hosts[role] = host
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "link", "set", inside, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # The holder keeps this host's mount namespace (with its own /tmp) alive;
            # 'ready' on stdout says the tmpfs is mounted.
            host.holder = subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private",
                 "sh", "-c", _private_tmp_script()],
                stdout=subprocess.PIPE, text=True, start_new_session=True)
            line = _ready_line(host.holder, TIMEOUT)
            if line != "ready":
                raise HostsUnavailable(f"host {role}: private /tmp could not be mounted "
                                     f"(holder said {line!r} in {TIMEOUT:g} s)")

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_tcp(self, host: Host, addr: str, port: int, timeout: float = TIMEOUT) -> None:
        """Wait until ``addr:port`` accepts connections as seen from ``host``."""
        probe = ["python3", "-c",
                 f"import socket; socket.create_connection(({addr!r}, {port}), 1).close()"]
        deadline = time.monotonic() + timeout
        while True:
            if host.run(probe).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{addr}:{port} not reachable from {host.role} in {timeout:g} s")
            time.sleep(0.1)

    def close(self) -> None:
        """Stop every process on every host and delete the namespaces and bridge."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            children.stop(host.procs, STOP_GRACE_S)
            _kill_inside(host.ns)
            if host.holder is not None:
                children.stop([host.holder], STOP_GRACE_S)
            # The kernel frees a deleted namespace (and its veth) asynchronously:
            # delete our end of the pair now so nothing is left when close() returns.
            _ip("link", "del", host.veth, check=False)
            _ip("netns", "del", host.ns, check=False)
        _ip("link", "del", self.bridge, check=False)
        atexit.unregister(self.close)


def start_redis(rig: Hosts, role: str = "broker", port: int = 6390) -> str:
    """A private redis-server on ``role``'s address; returns its URL."""
    host = rig[role]
    server = shutil.which("redis-server")
    if server is None:
        raise HostsUnavailable("redis-server is not installed")
    host.popen([server, "--bind", host.addr, "--port", str(port), "--save", "",
                "--appendonly", "no", "--protected-mode", "no"],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rig.wait_tcp(host, host.addr, port)
    return f"redis://{host.addr}:{port}/0"
