"""The multi-host rig (tests/netns.py): hosts that reach each other and nothing else,
a private /tmp each, and nothing left behind."""
import json
import os
import re
import signal
import time
import subprocess
import sys
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import IN_CI
from test_locust_celery import alive

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
    with netns.Hosts(["broker", "master", "gen1", "gen2"]) as r:
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
    r = netns.Hosts(["a", "b"])
    r["a"].popen(["sleep", "300"])
    tag = r.tag
    assert _leftovers(tag)[0]
    r.close()
    assert _leftovers(tag) == ([], [])


def test_failed_build_removes_what_it_made(can_rig):
    with pytest.raises(ValueError):
        netns.Hosts(["a", "a"])
    # A role name too long for 'ip netns' still leaves nothing behind.
    before = set(netns._namespaces())
    with pytest.raises(subprocess.CalledProcessError):
        netns.Hosts(["ok", "x" * 300])
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


# --------------------------------------------------------------------------- Locust on the rig
def _locust_on_rig(rig, tmp_path, seconds, master_args=(), classes=("TaskRoundTrip",),
                   during=None, gen_env=None):
    """A Locust master on 'master', a Locust worker on each 'gen*' host, the broker's redis
    on 'broker'; every file a host writes stays in its own /tmp. ``during(procs)`` runs while
    they do; ``gen_env[role]`` adds to a generator's environment. Returns (codes, logs)."""
    from test_locust import locust_cmd, locust_env
    url = netns.start_redis(rig)
    gens = [h for role, h in rig.hosts.items() if role.startswith("gen")]
    env = locust_env({"CELERY_BENCH_REDIS_URL": url})
    master = rig["master"]
    port = 5557
    cmd = locust_cmd(
        "--headless", "--master", "--master-bind-host", master.addr, "--master-bind-port", port,
        "--expect-workers", len(gens), "--expect-workers-max-wait", 60,
        "-u", 2 * len(gens), "-r", 2 * len(gens), "-t", f"{seconds}s", "--only-summary",
        "--transport", "redis", "--backend", "redis", "--pool", "solo",
        "--results-out", "/tmp/r.json", "--json-file", "/tmp/locust", *master_args, *classes)
    logs = {role: tmp_path / f"{role}.log" for role in ["master", *(g.role for g in gens)]}
    procs = {}
    with open(logs["master"], "w") as fh:
        procs["master"] = master.popen(cmd, cwd="/tmp", stdout=fh, stderr=subprocess.STDOUT,
                                       env=env)
    for g in gens:
        with open(logs[g.role], "w") as fh:
            procs[g.role] = g.popen(
                locust_cmd("--worker", "--master-host", master.addr, "--master-port", port),
                cwd="/tmp", stdout=fh, stderr=subprocess.STDOUT,
                env=dict(env, **(gen_env or {}).get(g.role, {})))
    if during is not None:
        during(procs)
    codes = {}
    for role, p in procs.items():
        try:
            codes[role] = p.wait(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            codes[role] = None
    for name in ("r.json", "locust.json"):          # out of the master's own /tmp
        out = master.run(["cat", f"/tmp/{name}"])
        (tmp_path / name).write_text(out.stdout)
    return codes, {role: p.read_text(errors="replace") for role, p in logs.items()}


def _joined(logs) -> str:
    return "\n=====\n".join(f"{r}:\n{t[-2500:]}" for r, t in logs.items())


def _recorded(logs, roles) -> dict:
    """What the generators say they recorded and handed to the master, summed per row."""
    out: dict = {}
    for role in roles:
        line = next(x for x in logs[role].splitlines() if "celery-bench worker recorded:" in x)
        report = json.loads(line.split("celery-bench worker recorded:", 1)[1])
        assert report["not_sent"] == 0, (role, report)
        for key, n in report["rows"].items():
            out[key] = out.get(key, 0) + n
    return out


def _generators(tmp_path) -> dict:
    return json.loads((tmp_path / "r.json").read_text())["environment"]["generators"]


def test_master_and_two_generators_on_their_own_hosts_merge_exactly(rig, tmp_path):
    from test_locust import check_counts
    codes, logs = _locust_on_rig(rig, tmp_path, seconds=20,
                                 master_args=("--workers-per-host", 1))
    text = _joined(logs)
    assert all(c == 0 for c in codes.values()), (codes, text)
    assert not any("Traceback" in t for t in logs.values()), text
    # the master wrote its files in its own /tmp, which no generator sees
    assert rig["gen1"].run(["test", "-e", "/tmp/r.json"]).returncode != 0
    ours = check_counts(tmp_path)              # merged file == Locust's own counts, exactly
    # ... and == what each generator recorded: every last report arrived (the final flush)
    assert _recorded(logs, ("gen1", "gen2")) == \
        {f"{t} {n}": c.metrics["requests"] for (t, n), c in ours.items()}, text
    gens = _generators(tmp_path)
    assert len(gens) == 2 and all(g["final_report"] for g in gens.values()), gens
    assert "no final report" not in logs["master"]
    total = next(c for (t, _), c in ours.items() if t == "total")
    assert total.metrics["requests"] > 0 and total.status == "ok"
    for c in ours.values():
        assert c.params["locust_workers"] == 2
        assert c.params["celery_workers"] == 2 and c.params["celery_workers_per_host"] == 1
    # the Celery workers ran on the generator hosts, none on the master's, all stopped
    assert "on each Locust worker's host (--workers-per-host)" in logs["master"]
    for role in ("gen1", "gen2"):
        pids = re.search(r"Celery worker\(s\) on this host .*\(pids ([\d, ]+)\)", logs[role])
        assert pids, logs[role][-2000:]
        assert not any(alive(int(p)) for p in pids.group(1).split(","))


def test_workers_per_host_counts_as_celery_workers_and_is_checked(need):
    """No rig needed: the option's check, one message. (Not importing locust here: it would
    monkey-patch this pytest process.)"""
    need("redis")
    from bench.locust import arguments

    class TaskRoundTrip:
        runs_tasks = True
    opts = dict(transport="redis", workers=0, workers_per_host=1, concurrency=1, group_size=1,
                interval=0.5, arrival_rate=0.0, timeout=30.0, task_args="[]",
                check_fail_ratio=-1.0, task=arguments.DEFAULT_TASK, backend="auto", app="")
    assert arguments.problems(opts, [TaskRoundTrip]) is None
    assert arguments.problems(dict(opts, workers_per_host=0), [TaskRoundTrip]).startswith(
        "TaskRoundTrip needs Celery workers")
    assert arguments.problems(dict(opts, workers_per_host=-1), [TaskRoundTrip]) == \
        "--workers-per-host -1: must be at least 0"


def test_a_generator_killed_mid_run_is_named_and_its_reports_kept(rig, tmp_path):
    """gen1's Locust worker is SIGKILLed at 10 s of 20: the run finishes, the results and the
    log name it, its counts up to its last report stay in the merge (== Locust's own)."""
    def kill_gen1(procs):
        log = tmp_path / "master.log"
        deadline = time.monotonic() + 90
        while "Sending spawn jobs" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and procs["master"].poll() is None, "no spawn"
            time.sleep(0.2)
        time.sleep(10)                      # 10 s into the 20 s test
        # nsenter without --fork execs: this pid is gen1's Locust worker itself
        cmdline = Path(f"/proc/{procs['gen1'].pid}/cmdline").read_bytes()
        assert b"--worker" in cmdline, cmdline
        os.kill(procs["gen1"].pid, signal.SIGKILL)
    from test_locust import check_counts
    codes, logs = _locust_on_rig(rig, tmp_path, seconds=20, during=kill_gen1,
                                 master_args=("--workers-per-host", 1))
    text = _joined(logs)
    assert codes["master"] == 0 and codes["gen2"] == 0, (codes, text)
    assert codes["gen1"] != 0
    ours = check_counts(tmp_path)              # what was reported == Locust's own counts
    gens = _generators(tmp_path)
    assert len(gens) == 2, gens
    dead = [cid for cid, g in gens.items() if not g["final_report"]]
    assert len(dead) == 1, gens
    assert gens[dead[0]]["requests"] > 0 and gens[dead[0]]["last_report_s"] < 13
    live = next(g for cid, g in gens.items() if cid != dead[0])
    assert live["final_report"] and live["requests"] > gens[dead[0]]["requests"]
    assert sum(g["requests"] for g in gens.values()) == \
        sum(c.metrics["requests"] for c in ours.values())
    assert f"load generator(s) MISSING, no final report: {dead[0]}" in logs["master"]
    for c in ours.values():
        assert c.status == "lost" and dead[0] in c.reason


SHIFT = """import time
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + 0.050
time.time_ns = lambda: _time_ns() + 50_000_000
"""


def test_a_generator_clock_50_ms_ahead_is_measured_and_corrected(rig, tmp_path):
    """gen1's wall clock (its Locust worker and its Celery worker) runs 50 ms ahead, through a
    sitecustomize on its PYTHONPATH; each generator claims a boot id of its own, so queue wait
    compares wall clocks across hosts as on real machines. The master measures gen1 at
    +50 ms and gen2 at 0, within 1 ms, and the corrected queue waits are never negative."""
    from test_locust import check_counts, locust_env
    shift = "/tmp/shift"
    made = rig["gen1"].run(["sh", "-c", f"mkdir -p {shift} && cat > {shift}/sitecustomize.py"],
                           input=SHIFT)
    assert made.returncode == 0, made.stderr
    path = locust_env()["PYTHONPATH"]
    gen_env = {"gen1": {"PYTHONPATH": f"{shift}:{path}", "CELERY_BENCH_BOOT_ID": "rig-gen1"},
               "gen2": {"CELERY_BENCH_BOOT_ID": "rig-gen2"}}
    codes, logs = _locust_on_rig(rig, tmp_path, seconds=20, gen_env=gen_env,
                                 master_args=("--workers-per-host", 1))
    text = _joined(logs)
    assert all(c == 0 for c in codes.values()), (codes, text)
    ours = check_counts(tmp_path)
    gens = _generators(tmp_path)
    by_boot = {g["boot_id"]: g for g in gens.values()}
    assert set(by_boot) == {"rig-gen1", "rig-gen2"}, gens
    assert abs(by_boot["rig-gen1"]["clock_offset_ms"] - 50.0) <= 1.0, gens
    assert abs(by_boot["rig-gen2"]["clock_offset_ms"]) <= 1.0, gens
    for g in gens.values():
        assert g["clock_uncertainty_ms"] <= 1.0 and g["clock_exchanges"] >= 12, gens
    wait = next(c for (t, _), c in ours.items() if t == "queue wait")
    # (a row keeps the clock label of its first reading: a task may run on its own host)
    assert wait.params["clock"] in ("realtime corrected", "monotonic"), wait.params
    # uncorrected, a task sent from gen1 and run on gen2 reads 50 ms too early (negative,
    # left out as invalid), one from gen2 run on gen1 50 ms too late
    assert wait.metrics["invalid"] == 0 and wait.metrics["requests"] > 0


def test_a_holder_that_never_says_ready_times_out_and_leaves_nothing(can_rig, monkeypatch):
    """The /tmp holder's 'ready' is waited for with a timeout; the half-built rig is removed."""
    monkeypatch.setattr(netns, "TIMEOUT", 1.0)
    monkeypatch.setattr(netns, "_private_tmp_script", lambda: "exec sleep infinity")
    before = set(netns._namespaces())
    with pytest.raises(netns.HostsUnavailable, match="private /tmp"):
        netns.Hosts(["stuck"])
    assert set(netns._namespaces()) == before
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"cb{os.getpid()}b" not in links


def test_a_one_host_transport_with_remote_generators_is_refused_before_load(rig, tmp_path):
    """unix lives in a folder on the master's host: generators on other hosts (their own boot
    ids) get no load; the master says so in one line and exits 2."""
    gen_env = {g: {"CELERY_BENCH_BOOT_ID": f"rig-{g}"} for g in ("gen1", "gen2")}
    codes, logs = _locust_on_rig(rig, tmp_path, seconds=20, gen_env=gen_env,
                                 master_args=("--transport", "unix", "--workers", 1))
    text = _joined(logs)
    assert codes["master"] == 2, (codes, text)
    lines = [x for x in logs["master"].splitlines() if "on another host than the master" in x]
    assert len(lines) == 1 and "--transport redis or amqp" in lines[0], text
    assert "Traceback" not in logs["master"], text
    assert _recorded(logs, ("gen1", "gen2")) == {}, text      # no generator made a request
    assert (tmp_path / "r.json").read_text() == ""           # nothing was measured
