"""Variants (bench.variants): bad specs exit 2 before measuring; a slowdown injected into
variant B only (a sitecustomize on B's PYTHONPATH) is called slower by `compare --by
variant` and fails the gate; the same runs without it (A/A) pass. Verdicts and exit codes
only, never a duration."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "bench"]


def bench(*args, timeout=600, env=None):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT), env=full)


@pytest.mark.parametrize("spec, words", [
    ("nosuch:x", "unknown kind 'nosuch'"),
    ("git:no-such-revision-xyz", "no commit 'no-such-revision-xyz'"),
    ("python:/no/such/python", "is not an executable interpreter"),
    ("conf:not_a_setting=1", "is not a Celery setting"),
    ("env:JUSTAKEY", "is not KEY=VALUE"),
])
def test_bad_spec_is_one_line_exit_2(spec, words, tmp_path):
    out = tmp_path / "r.json"
    res = bench("ab", "here", spec, "publish", "--out", str(out), timeout=120)
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("celery-bench: error")]
    assert len(errors) == 1 and words in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()   # nothing measured, nothing written


def test_interpreter_without_celery_is_refused(tmp_path):
    base = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([str(base), "-c", "import celery"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{base} imports celery: no interpreter without it here")
    res = bench("ab", "here", f"python:{base}", "publish", "--out", str(tmp_path / "r.json"),
                timeout=120)
    assert res.returncode == 2
    assert "cannot" in res.stderr or "No module named 'celery'" in res.stderr


def test_unsatisfiable_pin_is_refused(tmp_path):
    res = bench("ab", "here", "pip:celery==0.0.0.1", "publish",
                "--out", str(tmp_path / "r.json"), timeout=300,
                env={"CELERY_BENCH_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2
    assert "pip install celery==0.0.0.1 failed" in res.stderr


def _publish_cost_s() -> float:
    """Mean seconds of one kombu held publish on memory, here and now (sizes the slowdown)."""
    from kombu import Connection

    with Connection("memory://") as conn:
        name = f"size-{os.getpid()}"
        q = conn.SimpleQueue(name)
        producer = q.producer
        body = {"data": "x" * 100}
        for _ in range(500):
            producer.publish(body, routing_key=name)
        n, t0 = 3000, time.perf_counter()
        for _ in range(n):
            producer.publish(body, routing_key=name)
        took = (time.perf_counter() - t0) / n
        q.clear()
        q.close()
    return took


SLOW_PUBLISH = """
import os, time
import kombu.messaging

_extra = float(os.environ["CB_TEST_EXTRA_S"])
_orig = kombu.messaging.Producer.publish


def publish(self, *args, **kwargs):
    out = _orig(self, *args, **kwargs)
    end = time.perf_counter() + _extra   # CPU work, not a sleep: what a slower publish is
    while time.perf_counter() < end:
        pass
    return out


kombu.messaging.Producer.publish = publish
"""

SLOW_JOIN = """
import time
from celery.backends import redis

_orig = redis.ResultConsumer.drain_events


def drain_events(self, timeout=None):
    time.sleep(0.002)   # 2 ms per poll of a join: time, almost no CPU
    return _orig(self, timeout)


redis.ResultConsumer.drain_events = drain_events
"""


def _patch(tmp_path, name, code) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    return folder


PUBLISH_CELL = ["publish", "--only", "api=kombu", "--only", "producer=held",
                "--only", "retry=no", "--transport", "memory", "--only", "serializer=json"]


def _rows(out: Path, metric: str, *extra):
    res = bench("compare", str(out), "--by", "variant", "--metric", metric, *extra)
    return res, [ln for ln in res.stdout.splitlines() if ln.strip().startswith(metric)]


def test_slower_publish_in_b_only_is_called_slower_and_aa_is_not(tmp_path):
    extra = 0.25 * _publish_cost_s()
    patch = _patch(tmp_path, "slow", SLOW_PUBLISH)
    env = {"CB_TEST_EXTRA_S": repr(extra)}
    slow, same = tmp_path / "slow.json", tmp_path / "same.json"
    common = ["--quick", "--repeat", "8", "--duration", "1", "--quiet", "--no-html"]
    res = bench("ab", "here", f"env:PYTHONPATH={patch}", *PUBLISH_CELL, *common,
                "--out", str(slow), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    res = bench("ab", "here", "env:CB_TEST_SAME=1", *PUBLISH_CELL, *common,
                "--out", str(same), env=env)
    assert res.returncode == 0, res.stderr[-2000:]

    run = json.loads(slow.read_text())
    assert {c["params"]["variant"] for c in run["cells"]} == {"A", "B"}
    assert run["environment"]["variants"]["B"]["spec"] == f"env:PYTHONPATH={patch}"
    assert all(len(c["repeats"]) == 8 for c in run["cells"])

    res, rows = _rows(slow, "throughput_per_s", "--fail-on", "slower")
    assert res.returncode == 1, res.stdout
    assert len(rows) == 1 and "slower" in rows[0] and "paired rounds" in rows[0], res.stdout
    res, rows = _rows(same, "throughput_per_s", "--fail-on", "slower")
    assert res.returncode == 0, res.stdout
    assert len(rows) == 1 and "no significant difference" in rows[0], res.stdout


GATE_JOIN = """
missing = "fail"

[[gate]]
name = "no cell failed"
check = "no failed cells"

[[gate]]
name = "join over Redis: head at most 1.10x base"
check = "join[backend=redis,transport=redis,method=join,group_size=10,variant=head] total.p50 / [variant=base] <= 1.10"
"""


@pytest.mark.redis
def test_join_sleep_in_head_fails_the_gate_and_aa_passes(tmp_path, need):
    need("redis")
    spec = tmp_path / "gates.toml"
    spec.write_text(GATE_JOIN)
    patch = _patch(tmp_path, "slowjoin", SLOW_JOIN)
    args = ["gate", "--against", "HEAD", "--spec", str(spec), "--rounds", "5",
            "--budget", "60"]
    env = {"CELERY_BENCH_CACHE": str(tmp_path / "cache")}
    slow = bench(*args, str(tmp_path / "slow.json"), "--head", f"env:PYTHONPATH={patch}",
                 env=env)
    assert slow.returncode == 1, slow.stdout + slow.stderr[-2000:]
    assert "FAIL  join over Redis" in slow.stdout
    same = bench(*args, str(tmp_path / "same.json"), env=env)
    assert same.returncode == 0, same.stdout + same.stderr[-2000:]
    assert "FAIL" not in same.stdout
