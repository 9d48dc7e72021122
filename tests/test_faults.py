"""The faults scenario: real workers, real faults, every task accounted for, nothing left
running. Redis cells run on a private redis-server the scenario starts (never the shared
one); amqp cells need RabbitMQ (skipped without it, failed in CI) and never restart it.

No test asserts a duration: the machine is shared. Outcomes that depend on timing
(which task a kill catches in flight) are made certain by a saturated stream: 100 ms
tasks at 20/s keep both pool processes busy and the prefetch window full at the fault.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from bench import brokers, celery_workers, injection, runner, scenarios
from bench.scenarios import faults as scenario
from support import ROOT, celery_children, cells

pytestmark = pytest.mark.timeout(600)

SATURATED = {"task_seconds": 0.1, "rate": 20.0, "duration": 2.0}
needs_redis_server = pytest.mark.skipif(not injection.redis_server_binary(),
                                        reason="redis-server is not on PATH")


def opts(tmp_path, **kw):
    kw.setdefault("timeout", 60)
    return runner.RunOptions(scenarios=("faults",), workdir=tmp_path, **kw)


def run_cell(params, options):
    with closing(scenarios.get("faults")(options)) as sc:
        return runner.run_cell(sc, params)


def accounted(cell):
    """Every task sent ran, is still held by the broker, or is lost: nothing else."""
    m = cell.metrics
    assert m["sent"] == m["received"] + m["pending"] + m["lost"], m
    assert m["duplicates"] >= 0 and m["pending_invisible"] <= m["pending"]


def assert_nothing_left():
    assert not celery_workers.running()
    assert celery_children() == []
    assert not injection.running_servers()
    assert [p for p in psutil.Process().children(recursive=True)
            if "redis-server" in " ".join(p.cmdline())] == []


def started_under(root: Path) -> list:
    """Processes (other than this one) whose command line or environment names ``root``:
    whatever a run with TMPDIR=root started, and its children."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            text = " ".join(proc.info["cmdline"] or [])
            if str(root) in text or any(str(root) in v for v in proc.environ().values()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def cli(tmp_path, *args, **kw):
    env = dict(os.environ, TMPDIR=str(tmp_path), COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# --------------------------------------------------------------------------- the matrix
def test_matrix_opt_in_and_one_injection_per_quick_cell():
    assert "faults" in scenarios.names()
    assert scenarios.get("faults").opt_in is True
    assert "faults" not in runner.RunOptions().names()       # not in make bench / a plain run
    quick = cells("faults", runner.RunOptions(quick=True))
    assert {c["transport"] for c in quick} == {"unix", "fifo"}
    assert {(c["acks_late"], c["fault"]) for c in quick} == \
        {(a, f) for a in (False, True) for f in scenario.FAULTS}
    full = cells("faults", runner.RunOptions())
    assert {c["transport"] for c in full} >= {"unix", "fifo", "redis", "amqp"}
    assert "memory" not in {c["transport"] for c in full}
    assert scenarios.get("faults")(runner.RunOptions(quick=True)).deterministic
    assert not scenarios.get("faults")(runner.RunOptions(quick=True, repeat=3)).deterministic


def test_redis_cells_need_no_shared_redis():
    sc = scenarios.get("faults")(runner.RunOptions())
    assert sc.requires({"transport": "redis", "acks_late": True, "fault": "worker-kill"}) \
        == set()
    assert sc.requires({"transport": "amqp", "acks_late": True, "fault": "worker-kill"}) \
        == {"amqp"}


def test_broker_restart_on_amqp_is_skipped_without_restart_cmd(tmp_path):
    cell = run_cell({"transport": "amqp", "acks_late": True, "fault": "broker-restart"},
                    opts(tmp_path))
    assert cell.status == "skipped"
    reach = brokers.reachability("amqp")
    if reach.ok:   # unreachable: the runner says so first, also a skip
        assert "--restart-cmd" in cell.reason and "brokers it started" in cell.reason
    assert_nothing_left()


def test_fifo_has_nothing_to_restart_or_drop(tmp_path):
    for fault in ("broker-restart", "connection-drop"):
        cell = run_cell({"transport": "fifo", "acks_late": False, "fault": fault},
                        opts(tmp_path))
        assert cell.status == "skipped" and "named pipe" in cell.reason


@pytest.mark.parametrize("args, word", [
    (("--start-cmd", "rabbitmqctl start_app"), "--start-cmd needs --restart-cmd"),
    (("--restart-cmd", "  "), "--restart-cmd is empty"),
])
def test_restart_command_mistakes_are_one_line_exit_2(cli_run, args, word):
    res = cli_run("run", "faults", *args, "--out", "r.json", timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and word in lines[0], res.stderr


# --------------------------------------------------------------------------- quick, real CLI
def test_quick_run_through_the_cli_accounts_for_every_task(tmp_path):
    """`celery-bench run faults --quick`: no server needed; a loss (early ack, a pipe) is
    reported as `lost` and is the only reason the run may exit 1."""
    proc = cli(tmp_path, "run", "faults", "--quick", "--quiet", "--no-html",
               "--out", "r.json")
    try:
        out, err = proc.communicate(timeout=540)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 1), err
    if proc.returncode == 1:
        flagged = [line for line in err.splitlines() if line.startswith(("lost:", "failed:"))]
        assert flagged and all(line.startswith("lost: faults[") for line in flagged), err
    data = json.loads((tmp_path / "r.json").read_text())
    got = {(c["params"]["transport"], c["params"]["acks_late"], c["params"]["fault"]): c
           for c in data["cells"]}
    assert {t for t, _, _ in got} == {"unix", "fifo"}
    assert len(got) == 16
    for (transport, acks_late, fault), c in got.items():
        if transport == "fifo" and fault in ("broker-restart", "connection-drop"):
            assert c["status"] == "skipped", c
            continue
        assert c["status"] in ("ok", "lost"), (c["params"], c["reason"])
        m = c["metrics"]
        assert m["sent"] == m["received"] + m["pending"] + m["lost"], (c["params"], m)
        assert m["recovery_s"] is not None, (c["params"], c["reason"])
        assert len(c["repeats"]) == 1                # one injection per quick cell
    # Our unix broker hands a dead consumer's unacked tasks back at once.
    late_kill = got[("unix", True, "worker-kill")]["metrics"]
    assert late_kill["lost"] == 0 and late_kill["pending"] == 0
    assert "faults" in out
    assert started_under(tmp_path) == []


def test_ctrl_c_stops_every_process_it_started(tmp_path):
    proc = cli(tmp_path, "run", "faults", "--quick", "--quiet", "--no-html", "--out",
               "r.json", "--only", "transport=unix", "--only", "fault=worker-kill")
    try:
        deadline = time.monotonic() + 120
        while not any("celery" in " ".join(p.cmdline()) for p in started_under(tmp_path)
                      if p.pid != proc.pid):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no worker started"
            time.sleep(0.1)
        time.sleep(1.5)   # inside the cell: worker, broker, publisher running
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert started_under(tmp_path) == []


# --------------------------------------------------------------------------- unix
def test_unix_broker_restart_reconnects_and_accounts(tmp_path):
    cell = run_cell({"transport": "unix", "acks_late": False, "fault": "broker-restart"},
                    opts(tmp_path, quick=True))
    assert cell.status in ("ok", "lost"), cell.reason
    accounted(cell)
    m = cell.metrics
    assert m["down_s"] > 0
    assert m["recovery_s"] is not None, cell.reason   # tasks published after it ran
    assert m["pending"] == 0
    assert_nothing_left()


def test_unix_connection_drop_hits_only_the_worker(tmp_path):
    cell = run_cell({"transport": "unix", "acks_late": False, "fault": "connection-drop"},
                    opts(tmp_path, quick=True))
    assert cell.status in ("ok", "lost"), cell.reason
    accounted(cell)
    assert cell.metrics["connections_dropped"] >= 1
    assert cell.metrics["recovery_s"] is not None
    assert_nothing_left()


# --------------------------------------------------------------------------- redis (private)
@needs_redis_server
def test_redis_worker_kill_acks_late_leaves_tasks_invisible_for_the_visibility_timeout(
        tmp_path):
    cell = run_cell({"transport": "redis", "acks_late": True, "fault": "worker-kill"},
                    opts(tmp_path, **SATURATED))
    assert cell.status in ("ok", "lost"), cell.reason
    accounted(cell)
    m = cell.metrics
    # The killed worker's reserved and running tasks sit in redis's unacked hash.
    assert m["pending"] >= 1 and m["pending_invisible"] == m["pending"], cell.reason
    assert m["returns_after_s"] > 3000                 # visibility_timeout: 3600 s
    assert "visibility_timeout 3600 s" in cell.reason
    assert m["recovery_s"] is not None                 # the replacement ran new tasks
    assert_nothing_left()


@needs_redis_server
def test_redis_short_visibility_timeout_brings_them_back(tmp_path):
    cell = run_cell({"transport": "redis", "acks_late": True, "fault": "worker-kill",
                     "visibility_timeout": 3}, opts(tmp_path, **SATURATED))
    assert cell.status in ("ok", "lost"), cell.reason
    accounted(cell)
    m = cell.metrics
    assert m["pending"] == 0, cell.reason             # restored and run within the cell
    assert m["running_at_fault"] >= 1
    assert_nothing_left()


@needs_redis_server
def test_redis_broker_restart_keeps_the_queue(tmp_path):
    """A private server restarted gracefully (its snapshot saved and loaded): nothing
    queued is lost; the shared Redis is never touched."""
    cell = run_cell({"transport": "redis", "acks_late": False, "fault": "broker-restart"},
                    opts(tmp_path, quick=True))
    assert cell.status in ("ok", "lost"), cell.reason
    accounted(cell)
    assert cell.metrics["down_s"] > 0 and cell.metrics["recovery_s"] is not None
    assert_nothing_left()


# --------------------------------------------------------------------------- amqp
@pytest.mark.amqp
def test_amqp_worker_kill_acks_late_redelivers_at_once(tmp_path):
    cell = run_cell({"transport": "amqp", "acks_late": True, "fault": "worker-kill"},
                    opts(tmp_path, **SATURATED))
    assert cell.status == "ok", cell.reason
    accounted(cell)
    m = cell.metrics
    assert m["lost"] == 0 and m["pending"] == 0
    assert m["running_at_fault"] >= 1                  # it did hold tasks when it died
    assert_nothing_left()


@pytest.mark.amqp
def test_amqp_restart_cmd_runs_the_users_command(tmp_path):
    """The command is the user's: here a harmless one that restarts nothing."""
    marker = tmp_path / "restart-ran"
    cell = run_cell({"transport": "amqp", "acks_late": True, "fault": "broker-restart"},
                    opts(tmp_path, quick=True, restart_cmd=f"touch {marker}"))
    assert marker.exists()
    assert cell.status == "ok", cell.reason
    accounted(cell)
    assert cell.metrics["down_s"] > 0
    assert_nothing_left()


# --------------------------------------------------------------------------- the helpers
@needs_redis_server
def test_private_redis_server_restarts_on_its_port_with_its_data(tmp_path):
    server = injection.RedisServer(tmp_path / "r")
    try:
        server.start()
        port, pid = server.port, server.proc.pid
        client = server.client()
        client.set("k", "v")
        client.close()
        server.restart()
        assert server.port == port and server.proc.pid != pid
        client = server.client()
        assert client.get("k") == b"v"
        client.close()
    finally:
        server.stop()
    assert not server.alive() and not injection.running_servers()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_drop_unix_connections_shuts_down_only_the_peer_path(tmp_path):
    path = str(tmp_path / "s.sock")
    other = str(tmp_path / "other.sock")
    servers = []
    for p in (path, other):
        s = socket.socket(socket.AF_UNIX)
        s.bind(p)
        s.listen()
        servers.append(s)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import socket, sys, time\n"
         "a = socket.socket(socket.AF_UNIX); a.connect(sys.argv[1])\n"
         "b = socket.socket(socket.AF_UNIX); b.connect(sys.argv[2])\n"
         "print('ok', flush=True); time.sleep(30)\n", path, other],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "ok"
        conn, _ = servers[0].accept()
        conn2, _ = servers[1].accept()
        assert injection.drop_unix_connections([child.pid], path) == 1
        conn.settimeout(5)
        assert conn.recv(10) == b""                    # the peer hung up
        conn2.setblocking(False)
        with pytest.raises(BlockingIOError):           # the other connection is untouched
            conn2.recv(10)
    finally:
        child.kill()
        child.wait()
        for s in servers:
            s.close()


def test_run_command_is_bounded_and_says_why_it_failed(tmp_path):
    assert injection.run_command("true", 10, "--restart-cmd") >= 0
    with pytest.raises(injection.FaultError, match="exited with 3"):
        injection.run_command("echo boom; exit 3", 10, "--restart-cmd")
    marker = tmp_path / "late"
    with pytest.raises(injection.FaultError, match="did not finish within"):
        injection.run_command(f"sleep 30; touch {marker}", 0.5, "--start-cmd")
    time.sleep(0.2)
    assert not marker.exists()
