"""bench/locustfile.py run headless by the real ``locust`` command: publishers, bad choices
(one line, exit 2), the CI checks (exit 3), the open loop. The Celery users, distributed
mode and the web UI have their own modules (test_locust_celery.py, test_locust_webui.py);
the helpers here are shared with them."""
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import results

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "bench" / "locustfile.py"
TIMEOUT_S = 120


def locust_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *map(str, args)]


def locust_env(env=None) -> dict:
    out = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out.update(env or {})
    return out


def run_locust(tmp_path, *args, classes=(), env=None, seconds=3, users=2,
               results_out=True, timeout=TIMEOUT_S):
    """A headless run: options, then the user classes (Locust wants them last)."""
    cmd = locust_cmd("--headless", "-u", users, "-r", users, "-t", f"{seconds}s",
                     "--only-summary", "--json-file", tmp_path / "locust",
                     *(["--results-out", tmp_path / "r.json"] if results_out else []),
                     *args, *classes)
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=locust_env(env))


def locust_counts(tmp_path) -> dict:
    """Locust's own final request counts, {(type, name): (requests, failures)}."""
    with open(tmp_path / "locust.json") as fh:
        return {(e["method"], e["name"]): (e["num_requests"], e["num_failures"])
                for e in json.load(fh)}


def cells(tmp_path) -> dict:
    run = results.load(tmp_path / "r.json")
    return {(c.params["request_type"], c.params["name"]): c for c in run.cells}


STAGES = ("enqueue", "queue wait", "run", "result", "lag", "queue wait same-host",
          "queue wait cross-host", "queue wait cross-host monotonic",
          *(f"stage {s}" for s in ("publish", "broker", "worker", "pool", "run", "store",
                                   "fetch", "result")))


def check_counts(tmp_path, may_read_negative=()) -> dict:
    """Every request Locust counted is in the results file, exactly, and in reverse; the
    stages of a round trip or join are ours only (Locust counts each operation once). A stage
    in ``may_read_negative`` (timed on two hosts' clocks) may leave readings out as invalid."""
    ours = cells(tmp_path)
    theirs = locust_counts(tmp_path)
    stages = {key: c for key, c in ours.items() if key not in theirs}
    assert set(ours) - set(stages) == set(theirs)
    for (part, name), c in stages.items():
        assert part in STAGES and ("total", name) in theirs, (part, name)
        assert "one part of an operation" in c.reason
        assert c.metrics["requests"] <= theirs[("total", name)][0]
    for key, c in ours.items():
        if key in theirs:
            assert (c.metrics["requests"], c.metrics["failures"]) == theirs[key], key
        left_out = c.metrics["invalid"] if key[0] in may_read_negative else 0
        assert c.histograms["latency"]["count"] == \
            c.metrics["requests"] - c.metrics["failures"] - left_out, key
    return ours


def ok(res):
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Traceback" not in res.stderr, res.stderr[-4000:]


def one_line_exit_2(res, *words):
    """A bad choice: exit 2, one line naming it, no traceback."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if all(w in line for w in words)]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- publishers
def test_publishers_on_memory_record_every_request_exactly(tmp_path):
    res = run_locust(tmp_path, "--transport", "memory",
                     classes=["KombuPublisher", "CeleryPublisher"])
    ok(res)
    ours = check_counts(tmp_path)
    assert set(ours) == {("kombu", "publish memory/held"),
                         ("celery", "publish memory/apply_async")}
    for c in ours.values():
        assert c.status == "ok" and c.metrics["requests"] > 0 and c.metrics["failures"] == 0
        lat = c.histograms["latency"]
        assert lat["unit"] == "us" and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
        assert c.params["users"] == 2 and c.params["locust_workers"] == 0
        assert c.params["arrival_rate"] == 0.0 and "intended" not in c.histograms
    # the exact figures are also printed at the end, in microseconds
    assert "celery-bench exact latencies" in res.stderr
    assert "No hostname was supplied" not in res.stderr    # nothing is wrong: no warning


@pytest.mark.redis
def test_redis_publisher_options_from_the_environment(tmp_path):
    res = run_locust(tmp_path, classes=["KombuPublisher"], users=1,
                     env={"LOCUST_TRANSPORT": "redis", "LOCUST_PRODUCER": "per-call"})
    ok(res)
    assert set(check_counts(tmp_path)) == {("kombu", "publish redis/per-call")}


@pytest.mark.amqp
def test_amqp_celery_publisher(tmp_path):
    res = run_locust(tmp_path, "--transport", "amqp", "--method", "send_task",
                     classes=["CeleryPublisher"], users=1)
    ok(res)
    assert set(check_counts(tmp_path)) == {("celery", "publish amqp/send_task")}


def test_unix_transport_starts_and_stops_its_broker(tmp_path):
    res = run_locust(tmp_path, "--transport", "unix", classes=["KombuPublisher"], users=1)
    ok(res)
    assert set(check_counts(tmp_path)) == {("kombu", "publish unix/held")}
    assert not list(Path(tempfile.gettempdir()).glob("celery-bench-locust-*/**/*.sock"))


# --------------------------------------------------------------------------- bad choices
def test_unreachable_transport_exits_2_and_names_it(tmp_path):
    res = run_locust(tmp_path, "--transport", "redis", classes=["KombuPublisher"],
                     env={"CELERY_BENCH_REDIS_URL": "redis://127.0.0.1:1/0"})
    one_line_exit_2(res, "--transport redis: redis at redis://127.0.0.1:1/0 unreachable")


def test_fifo_is_left_out_with_the_reason(tmp_path):
    res = run_locust(tmp_path, "--transport", "fifo")
    one_line_exit_2(res, "--transport", "fifo is left out",
                    "only once its consumer is attached")


def test_unknown_transport_is_refused(tmp_path):
    res = run_locust(tmp_path, "--transport", "pigeon")
    one_line_exit_2(res, "--transport", "pigeon")


def test_host_is_refused_with_the_reason(tmp_path):
    res = run_locust(tmp_path, "-H", "http://example.com", "--transport", "memory",
                     classes=["KombuPublisher"])
    one_line_exit_2(res, "-H/--host is not used by celery-bench")


def test_tasks_on_an_in_process_broker_are_refused(tmp_path):
    res = run_locust(tmp_path, "--transport", "memory")      # every user class
    line = one_line_exit_2(res, "memory is in-process")
    assert "TaskRoundTrip" in line and "unix" in line and "KombuPublisher" in line


def test_join_method_the_backend_lacks_is_refused(tmp_path):
    res = run_locust(tmp_path, "--transport", "unix", "--backend", "sqlite",
                     "--join-method", "join_native", classes=["GroupJoin"])
    one_line_exit_2(res, "join_native", "sqlite backend has no native join")


def test_bad_task_args_are_refused(tmp_path):
    res = run_locust(tmp_path, "--transport", "unix", "--task-args", "{oops",
                     classes=["TaskRoundTrip"])
    one_line_exit_2(res, "--task-args", "not JSON")


# --------------------------------------------------------------------------- CI checks
def test_checks_set_the_exit_code(tmp_path):
    res = run_locust(tmp_path, "--transport", "memory", "--check-p99-us", "1",
                     "--check-fail-ratio", "0", classes=["KombuPublisher"], users=1,
                     seconds=2, results_out=False)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "celery-bench check FAILED: p99 of kombu 'publish memory/held'" in res.stderr
    assert "celery-bench check passed: fail ratio 0 " in res.stderr

    loose = tmp_path / "loose"
    loose.mkdir()
    res = run_locust(loose, "--transport", "memory", "--check-p99-us", "100000000",
                     "--check-fail-ratio", "0", classes=["KombuPublisher"], users=1,
                     seconds=2, results_out=False)
    ok(res)
    assert "check FAILED" not in res.stderr and "check passed: p99 of kombu" in res.stderr


# --------------------------------------------------------------------------- open loop
def test_open_loop_records_from_the_intended_start(tmp_path):
    res = run_locust(tmp_path, "--transport", "memory", "--arrival-rate", "100",
                     classes=["KombuPublisher"], users=2, seconds=3)
    ok(res)
    (c,) = check_counts(tmp_path).values()
    lat, intended, lag = (c.histograms[k] for k in ("latency", "intended", "lag"))
    assert intended["count"] == lat["count"] == lag["count"] > 0
    # from the intended start = as timed + how late it started, request by request
    assert intended["max"] >= lat["max"] and intended["p50"] >= lat["p50"]
    assert c.params["arrival_rate"] == 100.0
    assert c.metrics["rate_target_per_s"] == 100.0
    assert 0 < c.metrics["started"] <= c.metrics["due"]


def test_open_loop_shortfall_is_flagged(tmp_path):
    res = run_locust(tmp_path, "--transport", "memory", "--arrival-rate", "1000000",
                     classes=["KombuPublisher"], users=1, seconds=2)
    ok(res)
    assert "SHORTFALL: the users cannot keep up" in res.stderr
    (c,) = cells(tmp_path).values()
    assert c.metrics["rate_shortfall"] is True and c.metrics["behind"] > 0


# --------------------------------------------------------------------------- Ctrl-C
def stop_with(proc: subprocess.Popen, sig=signal.SIGINT, timeout=60) -> tuple[str, str]:
    """Send ``sig`` and wait for the exit; kill on timeout (never left running)."""
    try:
        proc.send_signal(sig)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
