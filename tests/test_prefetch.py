"""The prefetch scenario reproduces the seed with real workers on real brokers.

These are facts about scheduling (which tasks wait behind the long one), not
timings: the only durations asserted are generous bounds derived from the
long task itself.
"""
import os
import signal
import time

import psutil
import pytest

from bench import backends, brokers, celery_workers, runner
from bench.cleanup import delete_queues
from bench.celery_app import make_app
from bench.scenarios import _celery, prefetch
from support import celery_children, cells, run_cell, scenario


def assert_no_worker_left():
    assert not celery_workers.running()
    assert celery_children() == []


def run(tmp_path, **kw):
    kw.setdefault("repeat", 1)
    opts = runner.RunOptions(scenarios=("prefetch",), workdir=tmp_path, timeout=60, **kw)
    return runner.run(opts)


def cell(run_, **params):
    (found,) = run_.find("prefetch", **params)
    return found


def check_seed(run_):
    early = cell(run_, prefetch_multiplier=4, acks_late=False)
    late = cell(run_, prefetch_multiplier=1, acks_late=True)
    for c in (early, late):
        assert c.status == "ok", c.reason
        m = c.metrics
        assert m["sent"] == m["received"] == 1 + prefetch.SHORTS and m["lost"] == 0
        assert c.histograms["short_wait"]["count"] == prefetch.SHORTS
        assert m["long_task_s"] >= c.params["long_s"] * 0.9
    long_s = early.params["long_s"]
    # The seed: short tasks stuck behind the long one while the other worker idles...
    assert early.metrics["short_tasks_delayed"] > 0
    assert early.metrics["short_wait_max_s"] > long_s / 2
    assert early.metrics["idle_s"] > 0
    # ...and none with multiplier 1 plus task_acks_late.
    assert late.metrics["short_tasks_delayed"] == 0
    assert late.metrics["short_wait_max_s"] < long_s / 2


def test_quick_slice_reproduces_the_seed_on_redis(tmp_path, need):
    need("redis")
    check_seed(run(tmp_path, quick=True, transports=("redis",)))
    assert_no_worker_left()


def test_quick_slice_reproduces_the_seed_without_a_server(tmp_path):
    """What `make bench` runs: the embedded transport, no server at all."""
    run_ = run(tmp_path, quick=True)
    assert {c.params["transport"] for c in run_.cells} == {
        brokers.embedded(multi_consumer=True)}
    check_seed(run_)
    assert_no_worker_left()


def test_disable_prefetch_stops_the_wait_on_redis(tmp_path, need):
    need("redis")
    params = prefetch._cell("redis", 4, False, True, 2.0)
    opts = runner.RunOptions(workdir=tmp_path, timeout=60)
    c = run_cell("prefetch", params, opts)
    assert c.status == "ok", c.reason
    assert c.metrics["short_tasks_delayed"] == 0
    assert_no_worker_left()


def test_disable_prefetch_is_skipped_with_the_reason_off_redis(tmp_path, need):
    need("amqp")
    params = prefetch._cell("amqp", 4, False, True, 2.0)
    c = run_cell("prefetch", params, runner.RunOptions(workdir=tmp_path))
    assert c.status == "skipped"
    assert "redis" in c.reason and "amqp" in c.reason
    assert_no_worker_left()


def test_an_unreachable_broker_skips_its_cells(tmp_path, monkeypatch):
    monkeypatch.setenv("CELERY_BENCH_REDIS_URL", "redis://127.0.0.1:1/0")
    params = prefetch._cell("redis", 4, False, False, 2.0)
    c = run_cell("prefetch", params, runner.RunOptions(workdir=tmp_path))
    assert c.status == "skipped" and "127.0.0.1:1" in c.reason


def test_cells_matrix():
    quick = cells("prefetch", runner.RunOptions(quick=True))
    assert [(c["prefetch_multiplier"], c["acks_late"]) for c in quick] == [(4, False), (1, True)]
    assert all(brokers.info(c["transport"]).service is None for c in quick)
    full = cells("prefetch", runner.RunOptions())
    assert {c["transport"] for c in full} >= {"redis", "amqp"}
    assert {c["prefetch_multiplier"] for c in full if c["disable_prefetch"]} == {4}
    sc = scenario("prefetch", runner.RunOptions())
    assert sc.requires(prefetch._cell("amqp", 1, True, False, 3.0)) == {"amqp"}
    assert sc.requires(quick[0]) == set()


def test_a_worker_that_dies_fails_the_wait_with_its_log(tmp_path):
    """What a cell sees when a worker dies mid-measurement: the reason, promptly."""
    with brokers.broker(brokers.embedded(), tmp_path) as env:
        queue = f"bench.prefetch.test-{os.getpid()}-{time.monotonic_ns()}"
        backend = f"db+sqlite:///{tmp_path / 'r.sqlite'}"
        app = make_app(env.url, backend, env.transport_options, task_default_queue=queue)
        backends.embedded().prepare(app)
        try:
            with celery_workers.worker(env.url, backend, transport_options=env.transport_options,
                                conf={"task_default_queue": queue}, queues=[queue]) as w:
                res = app.send_task(prefetch.TASK, kwargs={"seconds": 30}, queue=queue)
                os.killpg(w.pid, signal.SIGKILL)
                started = time.monotonic()
                with pytest.raises(celery_workers.WorkerError, match="died; log .* ends:"):
                    _celery.wait(app, [res], [w], time.monotonic() + 60, "a task")
                assert time.monotonic() - started < 30  # not the task, not the deadline
        finally:
            app.close()
            delete_queues(env, [queue])
    assert_no_worker_left()
