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


def _celery_workers_on(host) -> list[int]:
    """The pids of ``celery worker`` processes (pool children included) on ``host``."""
    out = []
    for pid in netns._ip("netns", "pids", host.ns, check=False).stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"\0-m\0celery\0" in cmdline and b"\0worker\0" in cmdline:
            out.append(int(pid))
    return out


def _until_no_celery_on(host, bound: float) -> float:
    """Seconds until ``host`` has no Celery worker left; fails past ``bound``."""
    start = time.monotonic()
    while _celery_workers_on(host):
        assert time.monotonic() - start < bound, \
            f"Celery workers still on {host.role} after {bound:g} s: {_celery_workers_on(host)}"
        time.sleep(0.2)
    return time.monotonic() - start


def _spawned(tmp_path, procs, timeout: float = 90) -> None:
    """Wait until the master has sent its spawn jobs (the load is starting)."""
    log = tmp_path / "master.log"
    deadline = time.monotonic() + timeout
    while "Sending spawn jobs" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline and procs["master"].poll() is None, "no spawn"
        time.sleep(0.2)


OWN_BOOT_IDS = {"gen1": {"CELERY_BENCH_BOOT_ID": "rig-gen1"},
                "gen2": {"CELERY_BENCH_BOOT_ID": "rig-gen2"}}
SAME, CROSS = "queue wait same-host", "queue wait cross-host"
ONE_CLOCK = "queue wait cross-host monotonic"
POPULATIONS_MS = 3.0   # two samples of ~2,000 tasks: their medians' noise is ~0.5 ms here


# Stages that start on one host's clock and end on another's: the result (a task's end on the
# worker to the result in the sender's hand) and the waterfall's publish and result.
TWO_CLOCKS = ("result", "stage publish", "stage result")


def _few_negative(ours) -> None:
    """A stage timed on two clocks when they are on two hosts, and short (~3 ms): an offset
    error near its length can make a reading negative, left out and counted. A handful in
    thousands; none in a stage timed on one clock (check_counts)."""
    for (t, _), c in ours.items():
        if t in TWO_CLOCKS:
            assert c.metrics["invalid"] <= c.metrics["requests"] // 200, (t, c.metrics)


def _queue_waits(ours) -> tuple[dict, dict, dict]:
    """The round trip's queue wait for tasks run on the sender's host (one monotonic clock),
    for tasks run on the other generator's host (corrected wall clocks), and for those same
    cross-host tasks on the one monotonic clock the rig's hosts really share: each present and
    labelled with its clock, none negative; their latency summaries. The corrected cross-host
    median is within 1 ms of the same tasks' on one clock (the same-host stage of the very same
    tasks), and within POPULATIONS_MS of the same-host tasks' (another sample of the stage)."""
    name = next(n for (t, n) in ours if t == "total")
    wait, same, cross, one = (ours[(t, name)] for t in ("queue wait", SAME, CROSS, ONE_CLOCK))
    assert same.params["clock"] == "monotonic" and one.params["clock"] == "monotonic"
    assert cross.params["clock"] == "realtime corrected", cross.params
    assert wait.params["clock"].startswith("per task:"), wait.params
    assert same.metrics["requests"] + cross.metrics["requests"] == wait.metrics["requests"]
    assert one.metrics["requests"] == cross.metrics["requests"]
    assert min(same.metrics["requests"], cross.metrics["requests"]) >= 100, \
        (same.metrics, cross.metrics)
    assert all(c.metrics["invalid"] == 0 for c in (same, cross, one))
    same, cross, one = (c.histograms["latency"] for c in (same, cross, one))
    print(f"queue wait p50 (us): cross-host corrected {cross['p50']} (n={cross['count']}), the "
          f"same tasks on one clock {one['p50']}, same-host tasks {same['p50']} "
          f"(n={same['count']})")
    assert abs(cross["p50"] - one["p50"]) <= 1000, (cross, one)
    assert abs(cross["p50"] - same["p50"]) <= POPULATIONS_MS * 1000, (cross, same)
    return same, cross, one


def test_master_and_two_generators_on_their_own_hosts_merge_exactly(rig, tmp_path):
    """The proof run: master, two generators each with its own Celery worker, the broker
    host; 20 s of TaskRoundTrip over redis. Each generator claims a boot id of its own (the
    rig's hosts share one kernel), so a task run on the other generator's host is timed on
    two wall clocks, corrected by the measured offsets, as on real machines; a task run on
    the sender's own host is timed on one monotonic clock, and so is every cross-host task a
    second time (the rig's kernel is one). The corrected median is within 1 ms of the same
    tasks' on one clock (_queue_waits)."""
    from test_locust import check_counts
    files = {}

    def list_tmp(procs):         # mid-run, while the Celery workers' logs exist
        _spawned(tmp_path, procs)
        time.sleep(5)
        for role in rig.hosts:
            files[role] = netns.private_files(rig[role])
    codes, logs = _locust_on_rig(rig, tmp_path, seconds=20, gen_env=OWN_BOOT_IDS,
                                 master_args=("--workers-per-host", 1), during=list_tmp)
    text = _joined(logs)
    assert all(c == 0 for c in codes.values()), (codes, text)
    assert not any("Traceback" in t for t in logs.values()), text
    # No file is shared between hosts: what one host had under /tmp mid-run (each
    # generator's Celery worker logs, say) no other host had; the master's results are in
    # its own /tmp only.
    for role in ("gen1", "gen2"):
        assert any("celery-bench-workers-" in f and f.endswith(".log") for f in files[role]), \
            files[role]
    for role, mine in files.items():
        for other, theirs in files.items():
            assert other == role or not mine & theirs, (role, other, mine & theirs)
    for role in ("gen1", "gen2"):
        assert rig[role].run(["test", "-e", "/tmp/r.json"]).returncode != 0
    # merged file == Locust's own counts, exactly (result, timed on two clocks, may leave a
    # rare negative reading out: _few_negative)
    ours = check_counts(tmp_path, may_read_negative=TWO_CLOCKS)
    _few_negative(ours)
    # ... and == what each generator recorded: every last report arrived (the final flush)
    assert _recorded(logs, ("gen1", "gen2")) == \
        {f"{t} {n}": c.metrics["requests"] for (t, n), c in ours.items()}, text
    gens = _generators(tmp_path)
    assert len(gens) == 2 and all(g["final_report"] for g in gens.values()), gens
    assert "no final report" not in logs["master"]
    total = next(c for (t, _), c in ours.items() if t == "total")
    assert total.metrics["requests"] > 0 and total.status == "ok"
    # a task run on the sender's own host splits store and fetch (the child's stored
    # reading is written on that host); one run on the other generator's host cannot, and
    # reports one result stage: each round trip has exactly one of the two
    name = total.params["name"]
    split, joined = (ours[(f"stage {s}", name)].metrics["requests"] for s in ("store", "result"))
    assert split > 0 and joined > 0 and split + joined == total.metrics["requests"], \
        (split, joined)
    assert ours[("stage fetch", name)].metrics["requests"] == split
    for c in ours.values():
        assert c.params["locust_workers"] == 2
        assert c.params["celery_workers"] == 2 and c.params["celery_workers_per_host"] == 1
    # the Celery workers ran on the generator hosts, none on the master's, all stopped
    assert "on each Locust worker's host (--workers-per-host)" in logs["master"]
    for role in ("gen1", "gen2"):
        pids = re.search(r"Celery worker\(s\) on this host .*\(pids ([\d, ]+)\)", logs[role])
        assert pids, logs[role][-2000:]
        assert not any(alive(int(p)) for p in pids.group(1).split(","))
    _queue_waits(ours)
    print("offsets in use (ms, +/-):", {
        g["boot_id"]: [(pt["offset_ms"], pt["uncertainty_ms"]) for pt in g["clock_series"]]
        for g in gens.values()})
    for g in gens.values():     # the offsets were followed all through the test
        assert len(g["clock_series"]) >= 5 and g["clock_exchanges"] >= 12 + 4 * 4, g


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
    took = []

    def kill_gen1(procs):
        _spawned(tmp_path, procs)
        time.sleep(10)                      # 10 s into the 20 s test
        # nsenter without --fork execs: this pid is gen1's Locust worker itself
        cmdline = Path(f"/proc/{procs['gen1'].pid}/cmdline").read_bytes()
        assert b"--worker" in cmdline, cmdline
        assert _celery_workers_on(rig["gen1"]), "gen1 has no Celery worker to lose"
        os.kill(procs["gen1"].pid, signal.SIGKILL)
        # its Celery workers go with it: the kernel's SIGTERM starts their warm stop (their
        # own watchdog SIGKILLs the group 10 s on, if that hangs)
        took.append(_until_no_celery_on(rig["gen1"], bound=20))
        assert _celery_workers_on(rig["gen2"])          # the other host's stay
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
    assert "Traceback" not in logs["master"], logs["master"][-3000:]   # pings to the dead one
    for c in ours.values():
        assert c.status == "lost" and dead[0] in c.reason
    print(f"gen1's Celery workers gone {took[0]:.1f} s after its Locust worker was killed")


def test_ctrl_c_and_a_vanished_master_stop_the_generators_celery_workers(rig, tmp_path):
    """Ctrl-C to gen2's Locust worker stops its Celery workers with it; then the master is
    SIGKILLed, and gen1, whose Locust worker lives on (Locust's own waits 60 s), stops its
    Celery workers once the master's heartbeats have been missing for MASTER_GONE_S."""
    from bench.locust.hostworkers import MASTER_GONE_S
    took = {}

    def interrupt_then_lose_master(procs):
        _spawned(tmp_path, procs)
        time.sleep(3)
        assert _celery_workers_on(rig["gen2"]) and _celery_workers_on(rig["gen1"])
        os.kill(procs["gen2"].pid, signal.SIGINT)
        took["ctrl-c"] = _until_no_celery_on(rig["gen2"], bound=20)
        assert procs["gen2"].wait(timeout=20) is not None
        os.kill(procs["master"].pid, signal.SIGKILL)
        took["master gone"] = _until_no_celery_on(rig["gen1"], bound=MASTER_GONE_S + 20)
        assert procs["gen1"].poll() is None       # not by its Locust worker's exit
        os.kill(procs["gen1"].pid, signal.SIGTERM)
    codes, logs = _locust_on_rig(rig, tmp_path, seconds=60,
                                 master_args=("--workers-per-host", 1),
                                 during=interrupt_then_lose_master)
    assert "no heartbeat from the master" in logs["gen1"], _joined(logs)
    print("Celery workers gone after:", {k: round(v, 1) for k, v in took.items()})


SHIFT = """import time
_time_ns = time.time_ns
T0, OFFSET_NS, RATE = {t0}, {offset_ns}, {rate}


def time_ns():
    t = _time_ns()
    return t + OFFSET_NS + int(RATE * (t - T0))


time.time_ns = time_ns
time.time = lambda: time_ns() / 1e9
"""
DRIFT = 1e-4          # gen2's clock gains 0.1 ms a second (100 ppm: a clock NTP does not steer)


def test_a_generator_clock_50_ms_ahead_and_one_drifting_are_measured_and_corrected(
        rig, tmp_path):
    """gen1's wall clock (its Locust worker and its Celery worker) runs 50 ms ahead, gen2's
    gains 0.1 ms a second, through a sitecustomize on each one's PYTHONPATH; each generator
    claims a boot id of its own, so queue wait compares wall clocks across hosts as on real
    machines. Every estimate the master put in use is within its own uncertainty of the
    truth, and within 1 ms for gen1 (1.5 ms for gen2, drifting at the most PHI follows);
    gen2's series follows its drift; the corrected cross-host queue wait agrees with the
    same tasks' on one clock within 1 ms: uncorrected, a task sent from gen1 and run on gen2
    would read 50 ms too early (negative), the reverse 50 ms late."""
    from test_locust import check_counts, locust_env
    shift = "/tmp/shift"
    t0 = time.time_ns()
    truth = {"rig-gen1": lambda t: 50.0, "rig-gen2": lambda t: DRIFT * (t - t0 / 1e9) * 1e3}
    gen_env = {}
    for role, offset_ns, rate in (("gen1", 50_000_000, 0.0), ("gen2", 0, DRIFT)):
        code = SHIFT.format(t0=t0, offset_ns=offset_ns, rate=rate)
        made = rig[role].run(["sh", "-c", f"mkdir -p {shift} && cat > {shift}/sitecustomize.py"],
                             input=code)
        assert made.returncode == 0, made.stderr
        gen_env[role] = dict(OWN_BOOT_IDS[role],
                             PYTHONPATH=f"{shift}:{locust_env()['PYTHONPATH']}")
    codes, logs = _locust_on_rig(rig, tmp_path, seconds=20, gen_env=gen_env,
                                 master_args=("--workers-per-host", 1))
    text = _joined(logs)
    assert all(c == 0 for c in codes.values()), (codes, text)
    ours = check_counts(tmp_path, may_read_negative=TWO_CLOCKS)
    _few_negative(ours)
    gens = _generators(tmp_path)
    by_boot = {g["boot_id"]: g for g in gens.values()}
    assert set(by_boot) == {"rig-gen1", "rig-gen2"}, gens
    worst = {}
    for boot, g in by_boot.items():
        assert g["clock_exchanges"] >= 12 and len(g["clock_series"]) >= 5, g
        t0_s = g["clock_series_t0_unix_s"]
        for pt in g["clock_series"]:
            # each burst's best exchange brackets the truth (always, whatever the legs took)
            burst_error = pt["burst_offset_ms"] - truth[boot](t0_s + pt["burst_t_s"])
            assert abs(burst_error) <= pt["burst_uncertainty_ms"] + 0.05, (boot, pt)
        # the estimate in use, from each update on, is within its uncertainty, and within
        # 1 ms of a steady clock (1.5 ms of one drifting at PHI, the most it follows)
        errors = [(pt["offset_ms"] - truth[boot](t0_s + pt["t_s"]), pt["uncertainty_ms"])
                  for pt in g["clock_series"]]
        bound = 1.0 if boot == "rig-gen1" else 1.5
        assert all(abs(e) <= bound and abs(e) <= unc + 0.05 for e, unc in errors), \
            (boot, errors)
        worst[boot] = round(max(abs(e) for e, _ in errors), 3)
    drift = by_boot["rig-gen2"]["clock_series"]
    span = drift[-1]["t_s"] - drift[0]["t_s"]
    assert drift[-1]["offset_ms"] - drift[0]["offset_ms"] >= DRIFT * 1e3 * span / 2, drift
    print(f"worst offset error (ms): {worst}")
    _queue_waits(ours)      # uncorrected, the cross-host tasks would read 50 ms off


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
