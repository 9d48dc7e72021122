"""The multi-host rig (tests/netns.py): hosts that reach each other and nothing else,
a private /tmp each, and nothing left behind."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import IN_CI

PY = sys.executable


@pytest.fixture(scope="module")
def can_rig():
    why = netns.unavailable()
    if why:
        if IN_CI:
            pytest.fail(f"the multi-host rig must build in CI: {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture
def rig(can_rig):
    with netns.Rig(["broker", "master", "gen1", "gen2"]) as r:
        yield r


def test_hosts_reach_the_broker_host_redis(rig):
    url = netns.start_redis(rig)
    assert url.startswith("redis://198.18.")
    ping = f"import redis; print(redis.Redis.from_url({url!r}, socket_timeout=5).ping())"
    for role in ("master", "gen1", "gen2"):
        out = rig[role].run([PY, "-c", ping])
        assert out.stdout.strip() == "True", (role, out.stderr)


def test_hosts_do_not_reach_the_machine_network(rig):
    # The shared Redis on the machine's 127.0.0.1 is not the rig's loopback.
    probe = "import socket; socket.create_connection(('127.0.0.1', 6379), 1)"
    assert rig["gen1"].run([PY, "-c", probe]).returncode != 0


def test_each_host_has_its_own_tmp(rig):
    name = f"cbrig-{rig.tag}-mark"
    assert rig["gen1"].run(["sh", "-c", f"echo gen1 > /tmp/{name}"]).returncode == 0
    assert rig["gen1"].run(["cat", f"/tmp/{name}"]).stdout.strip() == "gen1"
    assert rig["gen2"].run(["test", "-e", f"/tmp/{name}"]).returncode != 0
    assert not Path("/tmp", name).exists()


def _leftovers(tag):
    spaces = [ns for ns in netns._namespaces() if f"x{tag}-" in ns]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return spaces, [ln for ln in links.splitlines() if tag in ln]


def test_close_removes_everything_even_with_processes_running(can_rig):
    r = netns.Rig(["a", "b"])
    r["a"].popen(["sleep", "300"])
    tag = r.tag
    assert _leftovers(tag)[0]
    r.close()
    assert _leftovers(tag) == ([], [])


def test_failed_build_removes_what_it_made(can_rig):
    with pytest.raises(ValueError):
        netns.Rig(["a", "a"])
    # A role name too long for 'ip netns' still leaves nothing behind.
    before = set(netns._namespaces())
    with pytest.raises(subprocess.CalledProcessError):
        netns.Rig(["ok", "x" * 300])
    assert set(netns._namespaces()) == before


def test_stale_rigs_from_dead_runs_are_removed(can_rig):
    dead = subprocess.Popen(["true"])
    dead.wait()
    ns = f"{netns.PREFIX}{dead.pid}xdead-host"
    bridge = f"cb{dead.pid}bdead"[:15]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    mine = f"{netns.PREFIX}{os.getpid()}xlive-host"
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        removed = netns.clean_stale()
        assert ns in removed and bridge in removed
        assert mine not in removed and mine in netns._namespaces()
    finally:
        for name in (ns, mine):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
