"""The join scenario and bench.joins, against real workers, Redis, RabbitMQ and PostgreSQL."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from celery import group
from celery.exceptions import TimeoutError as CeleryTimeout

from bench import backends, brokers, celery_workers, config, joins, results, roundtrips, runner
from bench.cleanup import delete_queues
from bench.celery_app import make_app
from bench.scenarios import _celery
from bench.scenarios import join as scenario
from support import run_cell

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)


# --------------------------------------------------------------------------- helpers
def sqlite_url(folder: Path) -> str:
    return f"db+sqlite:///{folder / 'results.sqlite'}"


def pg_url() -> str:
    return "db+" + config.service_url("postgres")


def db_conf(tag: str) -> dict:
    return {"database_table_names": {"task": f"bench_test_taskmeta_{tag}",
                                     "group": f"bench_test_groupmeta_{tag}"}}


def drop_tables(conf: dict) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(config.service_url("postgres"), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        for name in conf["database_table_names"].values():
            conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}"')
    engine.dispose()


class Bench:
    """A worker and a publishing app sharing one broker and result backend."""

    def __init__(self, app, worker):
        self.app, self.worker = app, worker

    def group_of(self, task, args_list):
        return group([self.app.signature(task, args=a) for a in args_list], app=self.app)


def bench_setup(tmp_path, broker_name, backend_url, **conf):
    from contextlib import ExitStack

    stack = ExitStack()
    env = stack.enter_context(brokers.broker(broker_name, tmp_path))
    conf["task_default_queue"] = f"bench.test.join.{uuid.uuid4().hex[:10]}"
    stack.callback(delete_queues, env, [conf["task_default_queue"]])
    stack.enter_context(celery_workers.worker(env.url, backend_url, conf=conf, concurrency=2,
                                       transport_options=env.transport_options,
                                       stop_timeout=2))
    app = make_app(env.url, backend_url, env.transport_options, **conf)
    stack.callback(app.close)
    stack.callback(joins.release, app.backend)
    return stack, Bench(app, None)


def embedded() -> str:
    return scenario._transport(backends.get("sqlite"))


def opts_for(tmp_path, **kw) -> runner.RunOptions:
    kw.setdefault("scenarios", ("join",))
    kw.setdefault("workdir", tmp_path)
    kw.setdefault("repeat", 1)
    return runner.RunOptions(**kw)


# --------------------------------------------------------------------------- speedups
def test_redis_join_returns_what_celery_returns(redis_url, tmp_path):
    stack, b = bench_setup(tmp_path, "redis", redis_url, result_expires=120)
    with stack:
        counter = roundtrips.attach(b.app.backend)
        warm = b.group_of("bench.join.echo", [(0,)]).apply_async()
        assert joins.redis_join(warm, timeout=30) == [0]  # opens its connections
        res = b.group_of("bench.join.echo", [(i * 3,) for i in range(12)]).apply_async()
        before = counter.read()
        fast = joins.redis_join(res, timeout=30)
        trips, _ = counter.since(before)
        assert fast == res.join(timeout=30) == res.join_native(timeout=30) == \
            [i * 3 for i in range(12)]
        # SUBSCRIBE, MGET, UNSUBSCRIBE: whatever the group size, never a poll.
        assert trips == 3

        failing = b.group_of("bench.join.fail", [("boom",)]).apply_async()
        ok = b.group_of("bench.join.echo", [(1,)]).apply_async()
        for wait in (lambda r, **kw: r.join(timeout=30, **kw),
                     lambda r, **kw: joins.redis_join(r, timeout=30, **kw)):
            with pytest.raises(ValueError, match="boom"):
                wait(failing)
            [exc] = wait(failing, propagate=False)
            assert isinstance(exc, ValueError)
            assert wait(ok) == [1]

        pending = b.group_of("bench.sleep", [(5,)]).apply_async()
        with pytest.raises(CeleryTimeout):
            joins.redis_join(pending, timeout=0.3)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_db_join_returns_what_celery_returns(backend, tmp_path, need):
    tag = uuid.uuid4().hex[:8]
    conf = db_conf(tag)
    if backend == "postgresql":
        need("postgres")
    url = sqlite_url(tmp_path) if backend == "sqlite" else pg_url()
    stack, b = bench_setup(tmp_path, embedded(), url, **conf)
    try:
        with stack:
            res = b.group_of("bench.join.echo", [(f"v{i}",) for i in range(15)]).apply_async()
            expected = [f"v{i}" for i in range(15)]
            assert joins.db_join(res, timeout=60, interval=0.01) == expected
            assert res.join(timeout=60) == expected

            failing = b.group_of("bench.join.fail", [("bad",)]).apply_async()
            with pytest.raises(ValueError, match="bad"):
                joins.db_join(failing, timeout=60, interval=0.01)
            with pytest.raises(ValueError, match="bad"):
                failing.join(timeout=60)
            [exc] = joins.db_join(failing, timeout=60, propagate=False)
            assert isinstance(exc, ValueError)
    finally:
        if backend == "postgresql":
            drop_tables(conf)


def test_round_trips_match_known_polls_on_sqlite(tmp_path):
    """No worker: every look finds the task pending, so looks = sleeps + 1, exactly."""
    tag = uuid.uuid4().hex[:8]
    app = make_app("memory://", sqlite_url(tmp_path), **db_conf(tag))
    try:
        counter = roundtrips.attach(app.backend)
        res = app.GroupResult(tag, [app.AsyncResult(f"{tag}-{i}") for i in range(5)])
        worker = type("Idle", (), {"alive": lambda self: True})()

        def looks(wait):
            before = counter.read()
            with scenario._watching_sleeps(worker) as sleeps:
                with pytest.raises(CeleryTimeout):
                    wait()
            trips, connects = counter.since(before)
            return trips, connects, sleeps[0]

        app.backend.get_task_meta(f"{tag}-warm")  # creates the tables (outside the count)
        # Celery's join(): one SELECT per look at the first member, a new engine
        # and connection per look (the process has not forked).
        trips, connects, sleeps = looks(lambda: res.join(timeout=0.3, interval=0.05))
        assert sleeps >= 3
        assert trips == sleeps + 1
        assert connects == trips
        # db-batch: one SELECT for all five pending ids per look, one pooled connection.
        trips, connects, sleeps = looks(
            lambda: joins.db_join(res, timeout=0.3, interval=0.05))
        assert sleeps >= 3
        assert trips == sleeps + 1
        assert connects <= 1
    finally:
        joins.release(app.backend)
        app.close()


# --------------------------------------------------------------------------- the scenario
def test_quick_sqlite_cells_measure_both_waiters(tmp_path):
    opts = opts_for(tmp_path, quick=True, only=(("backend", "sqlite"), ("interval", "0.005")))
    run = runner.run(opts)
    by_method = {c.params["method"]: c for c in run.cells}
    assert set(by_method) == {"join", "db-batch"}
    for cell in run.cells:
        assert cell.status == "ok", cell.reason
        assert cell.histograms["total"]["count"] == cell.metrics["joins"] >= 3
        assert cell.histograms["lag"]["count"] == cell.metrics["joins"]
        assert cell.metrics["waiter_cpu_s"] > 0
    join, batch = by_method["join"], by_method["db-batch"]
    assert batch.metrics["round_trips_per_poll"] == 1.0
    assert batch.metrics["connects_per_join"] == 0
    # Celery's join opens a new engine and connection for every look.
    assert join.metrics["connects_per_join"] == join.metrics["backend_round_trips"]
    assert join.metrics["backend_round_trips"] >= 10  # at least one SELECT per member
    assert not celery_workers.running()  # the last cell stopped the shared worker


def test_interval_sweep_scales_waiter_queries_and_cpu_with_sleeping_tasks(tmp_path):
    """The seed's spin loop: Celery's join() on tasks that sleep queries ~1/interval."""
    opts = opts_for(tmp_path, task_seconds=0.4, messages=1,
                    only=(("backend", "sqlite"), ("method", "join"), ("group_size", "1")))
    run = runner.run(opts)
    assert all(c.status == "ok" for c in run.cells), [c.reason for c in run.cells]
    rate = {c.params["interval"]: c.metrics["round_trips_per_s"] for c in run.cells}
    cpu = {c.params["interval"]: c.metrics["waiter_cpu_s"] for c in run.cells}
    # Every 5 ms vs every 50 ms vs every 500 ms: ideally 10x apart each; at 5 ms a query's
    # own cost caps it on a loaded VM (54 vs 19 queries/s in one CI run, AMD EPYC VM).
    assert rate[0.005] > 1.5 * rate[0.05] and rate[0.05] > 3 * rate["default"]
    assert cpu[0.005] > 2 * cpu[0.05]


def test_redis_cells_reproduce_join_native_sleep_and_pubsub_gain(tmp_path, need):
    need("redis")
    opts = opts_for(tmp_path, quick=True, only=(("backend", "redis"),))
    run = runner.run(opts)
    lag = {c.params["method"]: c.histograms["lag"]["p50"] for c in run.cells}
    assert all(c.status == "ok" for c in run.cells), [c.reason for c in run.cells]
    # join_native sleeps one interval (0.5 s) before its second look.
    assert lag["join_native"] >= 400_000
    assert lag["redis-pubsub"] * 10 < lag["join_native"]


def test_rpc_and_postgres_cells_run(tmp_path, need, monkeypatch):
    need("amqp")
    need("postgres")
    tables = []
    real_open = backends.Backend.open

    def recording_open(self, *args):
        url, conf, cleanup = real_open(self, *args)
        if self.name == "postgresql":
            tables.extend(conf["database_table_names"].values())
        return url, conf, cleanup
    monkeypatch.setattr(backends.Backend, "open", recording_open)
    only = (("group_size", "10"), ("interval", "0.05"))
    opts = opts_for(tmp_path, messages=3, only=only + (("method", "join"),))
    run = runner.run(opts)
    cells = {c.params["backend"]: c for c in run.cells}
    for name in ("rpc", "postgresql"):
        assert cells[name].status == "ok", cells[name].reason
    assert cells["rpc"].metrics["backend_round_trips"] == 0  # replies are pushed, no polls
    # The postgres cell dropped its tables on the way out.
    import sqlalchemy as sa

    engine = sa.create_engine(config.service_url("postgres"), poolclass=sa.pool.NullPool)
    assert len(tables) == 2
    with engine.connect() as conn:
        left = [t for t in tables if sa.inspect(conn).has_table(t)]
    engine.dispose()
    assert not left
    assert not celery_workers.running()


def test_join_timeout_fails_the_cell_and_stops_the_worker(tmp_path):
    opts = opts_for(tmp_path, task_seconds=30, timeout=1.5, messages=1)
    params = scenario._cell(backends.get("sqlite"), "db-batch", 1, 0.05, 30.0)
    cell = run_cell("join", params, opts)
    assert cell.status == "failed"
    assert "TimeoutError" in cell.reason
    assert not celery_workers.running()


def test_worker_dying_mid_join_fails_the_cell_with_its_log(tmp_path):
    opts = opts_for(tmp_path, task_seconds=30, timeout=60, messages=1)
    params = scenario._cell(backends.get("sqlite"), "join", 1, 0.05, 30.0)

    def kill_when_started():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for w in celery_workers.running():
                if w.ready_file.exists():
                    time.sleep(1.0)  # let the cell reach its wait
                    os.killpg(w.pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    started = time.monotonic()
    cell = run_cell("join", params, opts)
    killer.join(5)
    assert cell.status == "failed"
    assert "died" in cell.reason and "log" in cell.reason
    assert time.monotonic() - started < 50  # well before the 60 s join timeout
    assert not celery_workers.running()


def _tagged(tag):
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("CELERY_BENCH_TEST_TAG") == tag and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


def test_ctrl_c_mid_cell_keeps_finished_cells_and_leaves_no_worker(tmp_path):
    tag = uuid.uuid4().hex
    out = tmp_path / "run.json"
    env = dict(os.environ, CELERY_BENCH_TEST_TAG=tag, COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # Five sqlite cells of a few seconds each, one worker for all of them.
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "run", "join", "--quick", "--repeat", "1",
         "--only", "backend=sqlite",
         "--quiet", "--out", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if out.exists() and json.loads(out.read_text())["cells"]:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("no cell finished in 90 s")
        time.sleep(0.3)  # the next cell is under way
        assert _tagged(tag), "the shared worker should be running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    run = results.load(out)
    assert len(run.cells) >= 1 and run.cells[0].status == "ok"
    assert run.environment.get("interrupted") is True
    time.sleep(0.5)
    assert not _tagged(tag)
