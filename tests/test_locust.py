"""bench/locustfile.py run headless by the real ``locust`` command."""
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import results

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "bench" / "locustfile.py"


def _locust(tmp_path, *args, env=None, seconds=4, users=2):
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--only-summary",
           "--csv", str(tmp_path / "locust"), "--results-out", str(tmp_path / "r.json"), *args]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=full_env)


def _stats(tmp_path):
    with open(tmp_path / "locust_stats.csv") as fh:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(fh)}


def _check_run(res, tmp_path, expected):
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    stats = _stats(tmp_path)
    total = stats[("", "Aggregated")]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    for key in expected:
        assert int(stats[key]["Request Count"]) > 0, key
    run = results.load(tmp_path / "r.json")           # what Locust measured, in our schema
    assert {(c.params["api"], c.params["transport"]) for c in run.cells} == \
        {(t, name.split()[1].split("/")[0]) for t, name in expected}
    for c in run.cells:
        assert c.status == "ok" and c.metrics["sent"] > 0 and c.metrics["errors"] == 0
        assert c.histograms["publish"]["count"] == c.metrics["sent"]


def test_headless_memory_both_users(tmp_path):
    res = _locust(tmp_path)
    _check_run(res, tmp_path, [("kombu", "publish memory/held"),
                               ("celery", "publish memory/apply_async")])


@pytest.mark.redis
def test_headless_redis_from_the_environment(tmp_path):
    res = _locust(tmp_path, "KombuPublisher",
                  env={"LOCUST_TRANSPORT": "redis", "LOCUST_PRODUCER": "per-call"}, users=1)
    _check_run(res, tmp_path, [("kombu", "publish redis/per-call")])


@pytest.mark.amqp
def test_headless_amqp_celery(tmp_path):
    res = _locust(tmp_path, "CeleryPublisher", "--transport", "amqp", "--method", "send_task",
                  users=1)
    _check_run(res, tmp_path, [("celery", "publish amqp/send_task")])


def test_unreachable_transport_exits_2_and_names_it(tmp_path):
    res = _locust(tmp_path, "--transport", "redis",
                  env={"CELERY_BENCH_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--transport redis: redis at redis://127.0.0.1:1/0 unreachable" in res.stderr
    assert "Traceback" not in res.stderr


def test_unix_transport_starts_and_stops_its_broker(tmp_path):
    res = _locust(tmp_path, "KombuPublisher", "--transport", "unix", users=1, seconds=3)
    _check_run(res, tmp_path, [("kombu", "publish unix/held")])
    assert not list(Path(tempfile.gettempdir()).glob("celery-bench-locust-*/**/*.sock"))


def test_fifo_is_refused_with_the_reason(tmp_path):
    res = _locust(tmp_path, "--transport", "fifo")
    assert res.returncode == 2
    assert "--transport fifo: a FIFO queue takes messages only once its consumer" in res.stderr


def test_unknown_transport_is_refused(tmp_path):
    res = _locust(tmp_path, "--transport", "pigeon")
    assert res.returncode == 2
    assert "pigeon" in res.stderr and "Traceback" not in res.stderr
