"""Locust against a real Celery system: TaskRoundTrip and GroupJoin with the workers the
harness starts (and always stops), distributed mode (a master and two workers: the merged
histograms count exactly what the workers recorded, and what Locust counted), and a
user's own app with the user's own worker."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bench import config
from test_locust import (ROOT, cells, check_counts, locust_cmd, locust_env, locust_counts,
                         ok, run_locust, stop_with)

PARTS = ("enqueue", "queue wait", "run", "result", "total")
# the waterfall's stages, from the Strategy the harness's workers load (bench.worker_stamps)
STAGE_PARTS = tuple(f"stage {s}" for s in ("publish", "broker", "worker", "pool", "run",
                                            "store", "fetch"))   # the worker scenario's
ROUND_TRIP = "roundtrip unix bench.roundtrip"
PIDS = re.compile(r"Celery worker\(s\) .*\(pids ([\d, ]+)\)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped by its parent yet) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def worker_pids(text: str) -> list[int]:
    m = PIDS.search(text)
    assert m, text[-3000:]
    return [int(p) for p in m.group(1).split(",")]


def wait_for(path: Path, pattern, timeout: float = 90.0, proc=None) -> re.Match:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = rx.search(text)
        if m:
            return m
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {pattern!r}:\n{text[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {path} after {timeout:g}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- round trips
def test_round_trip_and_group_join_over_unix_with_harness_workers(tmp_path):
    res = run_locust(tmp_path, "--transport", "unix", "--workers", "1", "--pool", "solo",
                     "--backend", "sqlite", "--interval", "0.01", "--join-method", "db_join",
                     classes=["TaskRoundTrip", "GroupJoin"], users=2, seconds=4)
    ok(res)
    ours = check_counts(tmp_path)
    group = "group 10 x bench.roundtrip db_join unix"
    assert set(ours) == {*((p, ROUND_TRIP) for p in PARTS + STAGE_PARTS), ("total", group),
                         ("lag", group)}
    for key, c in ours.items():
        assert c.metrics["failures"] == 0 and c.histograms["latency"]["count"] > 0, key
        assert c.params["celery_workers"] == 1 and c.params["backend"] == "sqlite"
    for part in ("queue wait", "run", "result"):
        assert ours[(part, ROUND_TRIP)].params["clock"] == "monotonic"   # same host
    # every operation records each stage once, and Locust counts it once (check_counts)
    total = ours[("total", ROUND_TRIP)].metrics["requests"]
    assert all(ours[(p, ROUND_TRIP)].metrics["requests"] == total for p in PARTS + STAGE_PARTS)
    # the waterfall's stages add up to the total: each round trip's exactly (as ns), so
    # their means within the histograms' rounding (3 figures, a 1 us floor per stage)
    from bench import results

    def mean(part):
        return results.decode(ours[(part, ROUND_TRIP)].histograms["latency"]).get_mean_value()
    assert mean("stage store") >= 1 and ours[("stage store", ROUND_TRIP)].params["clock"] == \
        "monotonic"                     # the child's stored reading, found by task id
    stage_mean, total_mean = sum(mean(p) for p in STAGE_PARTS), mean("total")
    assert abs(stage_mean - total_mean) <= 0.01 * total_mean + len(STAGE_PARTS), \
        (stage_mean, total_mean)
    theirs = locust_counts(tmp_path)
    assert set(theirs) == {("total", ROUND_TRIP), ("total", group)}
    hist = {p: ours[(p, ROUND_TRIP)].histograms["latency"] for p in PARTS}
    assert hist["run"]["p50"] < hist["total"]["p50"] and hist["result"]["max"] <= \
        hist["total"]["max"]
    # the harness's Celery workers were stopped, their folder removed
    assert not any(alive(pid) for pid in worker_pids(res.stderr))
    assert not list(Path("/tmp").glob("celery-bench-locust-*/results.sqlite"))


def test_a_polled_result_says_it_is_polled(tmp_path):
    """SQLite's result is looked for every --interval: the rows say so, and what removes it;
    redis (what "auto" picks when its server answers) hands the result over with no poll."""
    res = run_locust(tmp_path, "--transport", "unix", "--pool", "solo", "--backend", "sqlite",
                     classes=["TaskRoundTrip"], users=1, seconds=3)
    ok(res)
    ours = check_counts(tmp_path)
    said = "result: polled every 0.5 s; --interval or --backend redis"
    for part in ("result", "total"):
        assert said in ours[(part, ROUND_TRIP)].reason, part
    assert said not in ours[("run", ROUND_TRIP)].reason
    assert said in res.stderr                            # the exact table's Note column


@pytest.mark.redis
def test_backend_auto_picks_redis_and_nothing_is_polled(tmp_path):
    res = run_locust(tmp_path, "--transport", "unix", "--pool", "solo",
                     classes=["TaskRoundTrip"], users=1, seconds=3)
    ok(res)
    ours = check_counts(tmp_path)
    assert {c.params["backend"] for c in ours.values()} == {"redis"}
    assert not any("polled" in c.reason for c in ours.values())


def test_failed_tasks_are_failures_and_fail_the_check(tmp_path):
    res = run_locust(tmp_path, "--transport", "unix", "--pool", "solo", "--interval", "0.01",
                     "--task", "bench.join.fail", "--check-fail-ratio", "0.5",
                     classes=["TaskRoundTrip"], users=1, seconds=2)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "celery-bench check FAILED: fail ratio 1 " in res.stderr
    counts = locust_counts(tmp_path)
    requests, failures = counts[("total", "roundtrip unix bench.join.fail")]
    assert requests == failures > 0
    c = cells(tmp_path)[("total", "roundtrip unix bench.join.fail")]
    assert c.status == "failed" and c.metrics["failures"] == requests
    assert "OperationFailed: result: ValueError('bench.join.fail')" in c.reason


def test_ctrl_c_stops_the_celery_workers_and_keeps_the_results(tmp_path):
    log = tmp_path / "locust.log"
    cmd = locust_cmd("--headless", "-u", 1, "-r", 1, "-t", "120s", "--transport", "unix",
                     "--pool", "solo", "--interval", "0.01", "--results-out",
                     tmp_path / "r.json", "TaskRoundTrip")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT,
                                env=locust_env())
    try:
        pids = worker_pids(wait_for(log, PIDS.pattern, proc=proc).group(0))
        wait_for(log, "All users spawned", proc=proc)
        time.sleep(1.5)              # some round trips
        stop_with(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
    c = cells(tmp_path)[("total", ROUND_TRIP)]
    assert c.metrics["requests"] > 0 and c.metrics["failures"] == 0


# --------------------------------------------------------------------------- distributed
def test_master_and_two_workers_merge_exactly(tmp_path):
    port = free_port()
    master_log, logs = tmp_path / "master.log", [tmp_path / f"worker{i}.log" for i in (1, 2)]
    master_cmd = locust_cmd(
        "--headless", "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
        "--expect-workers", 2, "--expect-workers-max-wait", 60, "-u", 4, "-r", 4, "-t", "4s",
        "--only-summary", "--transport", "unix", "--pool", "solo", "--interval", "0.01",
        "--arrival-rate", 200, "--results-out", tmp_path / "r.json",
        "--json-file", tmp_path / "locust", "KombuPublisher", "TaskRoundTrip")
    procs = []
    try:
        with open(master_log, "w") as fh:
            procs.append(subprocess.Popen(master_cmd, cwd=tmp_path, stdout=fh,
                                          stderr=subprocess.STDOUT, env=locust_env()))
        for path in logs:
            with open(path, "w") as fh:
                procs.append(subprocess.Popen(
                    locust_cmd("--worker", "--master-host", "127.0.0.1", "--master-port", port),
                    cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, env=locust_env()))
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    texts = [master_log.read_text()] + [p.read_text() for p in logs]
    assert codes == [0, 0, 0], "\n=====\n".join(t[-2500:] for t in texts)
    assert not any("Traceback" in t for t in texts), "\n=====\n".join(texts)

    recorded: dict = {}
    for text in texts[1:]:
        line = next(x for x in text.splitlines() if "celery-bench worker recorded:" in x)
        report = json.loads(line.split("celery-bench worker recorded:", 1)[1])
        assert report["not_sent"] == 0 and report["sent_to_master"] > 0
        for key, n in report["rows"].items():
            recorded[key] = recorded.get(key, 0) + n
    ours = check_counts(tmp_path)              # merged file == Locust's own counts
    assert {f"{t} {n}": c.metrics["requests"] for (t, n), c in ours.items()} == recorded
    assert ("kombu", "publish unix/held") in ours and ("total", ROUND_TRIP) in ours
    for c in ours.values():
        assert c.params["locust_workers"] == 2 and c.params["users"] == 4
        assert c.params["celery_workers"] == 1        # started once, by the master
        assert c.params["arrival_rate"] == 200.0
    # 200/s in total, split over the 4 users of both workers (not 200/s per user or worker)
    rate = ours[("kombu", "publish unix/held")].metrics
    assert 0 < rate["due"] <= 1.5 * 200 * rate["duration_s"]
    assert "intended" in ours[("total", ROUND_TRIP)].histograms
    assert "celery-bench: broker unix" not in texts[1] + texts[2]   # workers start none
    assert not any(alive(pid) for pid in worker_pids(texts[0]))


def test_a_generator_on_another_host_is_refused_with_what_it_cannot_reach(tmp_path):
    port = free_port()
    master_log, worker_log = tmp_path / "master.log", tmp_path / "worker.log"
    procs = []
    try:
        with open(master_log, "w") as fh:
            procs.append(subprocess.Popen(locust_cmd(
                "--headless", "--master", "--master-bind-host", "127.0.0.1",
                "--master-bind-port", port, "--expect-workers", 1,
                "--expect-workers-max-wait", 60, "-u", 2, "-r", 2, "-t", "2s", "--only-summary",
                "--transport", "unix", "KombuPublisher"),
                cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, env=locust_env()))
        with open(worker_log, "w") as fh:
            procs.append(subprocess.Popen(
                locust_cmd("--worker", "--master-host", "127.0.0.1", "--master-port", port),
                cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT,
                env=locust_env({"CELERY_BENCH_BOOT_ID": "another-host"})))
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    text, master = worker_log.read_text(), master_log.read_text()
    # the master refuses before any user spawns: one line, exit 2 (the worker just quits)
    assert codes == [2, 0], master[-2000:] + text[-2000:]
    assert "Traceback" not in text + master
    lines = [x for x in master.splitlines() if "run on another host than the master, and the "
             "broker (unix) lives in a folder of the master's host" in x]
    assert len(lines) == 1 and "use --transport redis or amqp" in lines[0], master[-2000:]
    assert '"sent_to_master": 0' in text


# --------------------------------------------------------------------------- your app
PROJECT = """
from celery import Celery

app = Celery("proj", broker={url!r}, backend={url!r})
app.conf.task_default_queue = {queue!r}
app.conf.result_expires = 600


@app.task(name="proj.add")
def add(x, y):
    return x + y
"""


@pytest.mark.redis
def test_your_own_app_and_workers(tmp_path):
    url = config.service_url("redis")
    (tmp_path / "proj.py").write_text(PROJECT.format(url=url,
                                                     queue=f"proj-{uuid.uuid4().hex[:8]}"))
    env = locust_env({"PYTHONPATH": os.pathsep.join((str(ROOT), str(tmp_path)))})
    log = tmp_path / "worker.log"
    # The user's worker: their app, our tasks included (-I), and, as far as the clocks go,
    # on another host (another boot id): only wall clocks compare.
    worker_env = dict(env, CELERY_BENCH_BOOT_ID="another-host")
    with open(log, "w") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "proj", "worker", "--pool", "solo",
             "-I", "bench.tasks", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-l", "info"],
            cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, env=worker_env,
            start_new_session=True)
    try:
        wait_for(log, r"ready\.", proc=worker)
        # --run-time counts from the spawn, and each user's start imports the app: on a busy
        # machine a 3 s run could end before any request (no results file).
        res = run_locust(tmp_path, "--app", "proj:app", "--join-method", "redis_join",
                         classes=["TaskRoundTrip", "GroupJoin"], env=env, seconds=6)
        ok(res)
        ours = check_counts(tmp_path)
        name = "roundtrip proj:app bench.roundtrip"
        assert {(p, name) for p in PARTS} <= set(ours)
        assert ("lag", "group 10 x bench.roundtrip redis_join proj:app") in ours
        assert all(c.metrics["failures"] == 0 and c.params["app"] == "proj:app"
                   for c in ours.values())
        for part in ("queue wait", "run", "result"):
            # run is the worker's own monotonic clock; the others compare wall clocks
            assert ours[(part, name)].params["clock"] == \
                ("monotonic" if part == "run" else "realtime")
            assert ours[(part, name)].metrics["invalid"] == 0   # one host: clocks agree
        assert "your app proj:app (your workers)" in res.stderr

        # a task of yours without the worker's readings: enqueue and total only, said once
        plain = tmp_path / "plain"
        plain.mkdir()
        res = run_locust(plain, "--app", "proj:app", "--task", "proj.add", "--task-args",
                         "[2, 3]", classes=["TaskRoundTrip"], users=1, env=env, seconds=5)
        ok(res)
        assert set(check_counts(plain)) == {("enqueue", "roundtrip proj:app proj.add"),
                                            ("total", "roundtrip proj:app proj.add")}
        assert res.stderr.count("returns no worker readings") == 1
    finally:
        try:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
