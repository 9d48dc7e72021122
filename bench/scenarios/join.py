"""Scenario ``join``: how long, and at what cost, a process waits for a group.

The seed ("Celery uses spin-loops. Gah!"): a process waiting on subtasks polled
PostgreSQL ~600 times a second. Each cell publishes a group of ``bench.sleep``
tasks to a real worker process (prefork by default) and waits with one method:
Celery's ``join()``, ``join_native()``, ``GroupResult.get()``, a chord callback,
or one of the speedups in :mod:`bench.joins` (``redis-pubsub``, ``db-batch``).

Per join: ``total`` = publish start -> values in hand; ``done`` = publish start
-> end of the last task (worker-side CLOCK_MONOTONIC reading carried back in
the result); ``lag`` = total - done, the time spent purely waiting. Backend
round trips issued by the waiter during the wait are counted for real
(bench.roundtrips: redis commands, SQL statements, AMQP frames), as is the
waiter's CPU (process time).

A poll is one look followed by a sleep (counted: the waiter's ``time.sleep``
calls during the wait, plus the first look); a wait that sleeps not at all
(pub/sub, rpc) is one poll, so its round trips per poll are per join.
One worker serves every consecutive cell of the same backend/transport.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from celery import chord, group
from celery.exceptions import TimeoutError as CeleryTimeout

from .. import backends, brokers, celery_workers, joins, recorder, roundtrips
from ..cleanup import delete_queues
from ..celery_app import make_app
from . import Outcome, Scenario, Skip, _celery, register

DESCRIPTION = (
    "Waiting for a group's results: join(), join_native(), GroupResult.get(), a chord "
    "callback, and bench.joins' redis-pubsub / db-batch, over redis, rpc, SQLite and "
    "PostgreSQL result backends, with a real prefork worker. Histograms total (publish -> "
    "results in hand) and lag (results in hand - end of the last task, worker-side clock); "
    "per join: backend_round_trips (redis commands, SQL statements, AMQP frames the waiter "
    "sent while waiting), connects_per_join, waiter_cpu_s; round_trips_per_s, "
    "round_trips_per_poll (a poll = a look then a sleep). interval 'default' is Celery's "
    "(0.5 s). --task-seconds makes tasks sleep; --messages sets joins per cell.")

CELERY_METHODS = ("join", "join_native", "get", "chord")
GROUP_SIZES = (1, 10, 100, 1000)
INTERVALS = ("default", 0.05, 0.005)     # "default": not passed, Celery uses 0.5 s
# The quick slice: the known facts and both speedups, each beside Celery's own. On the
# serverless backend: join and its speedup at Celery's interval and at 5 ms, and a chord;
# on each server backend with a native join and a speedup: join, join_native, the speedup.
QUICK_EMBEDDED = (("join", "default"), ("speedup", "default"), ("join", 0.005),
                  ("speedup", 0.005), ("chord", "default"))
QUICK_SERVER = (("join", "default"), ("join_native", "default"), ("speedup", "default"))
QUICK_GROUP = 10
# Joins per repeat (after the warm-up), and the seconds after which a cell stops
# adding joins once it has MIN_JOINS.
JOINS = {1: 30, 10: 20, 100: 8, 1000: 3}
QUICK_JOINS = 8      # a p50 needs 6 samples for its 95% interval (bench.percentiles)
MIN_JOINS = 6        # ... so a cell stops adding joins only once its p50 can say how sure it is
BUDGET_S, QUICK_BUDGET_S = 8.0, 2.0
WARMUP_GROUP = 10
STOP_GRACE_S = 1.0   # an idle worker on a polling transport needs seconds for a warm shutdown

SUMMARY = [
    ("total.p50", "total p50 us"),
    ("lag.p50", "lag p50 us"),
    ("lag.p99", "lag p99 us"),
    ("round_trips_per_poll", "rt/poll"),
    ("round_trips_per_s", "rt/s"),
    ("waiter_cpu_s", "cpu s"),
]


def _transport(backend: backends.Backend) -> str:
    """The broker a backend's cells use: the one it must go with (rpc: amqp), the broker of
    its own server (redis with redis), or the serverless one (SQLite, PostgreSQL)."""
    if backend.transport:
        return backend.transport
    same = [t.name for t in brokers.available() if backend.service and t.service == backend.service]
    return same[0] if same else brokers.embedded()


def _methods(backend: backends.Backend) -> list[str]:
    return [*CELERY_METHODS, *([backend.speedup] if backend.speedup else [])]


def _unsupported(backend: backends.Backend, method: str) -> str:
    if method == "join_native" and not backend.native_join:
        return backend.native_join_missing
    if method == "chord" and not backend.chords:
        return backend.chords_missing
    return ""


def _cell(backend: backends.Backend, method, size, interval, task_seconds) -> dict:
    return {"backend": backend.name, "transport": _transport(backend), "method": method,
            "group_size": size, "interval": interval, "task_seconds": task_seconds}


# --------------------------------------------------------------------------- a kept worker
@dataclass
class _Setup(_celery.WorkerSetup):
    app: object = None
    counter: roundtrips.Counter = None
    joins: int = 0


def _start(params, opts) -> _Setup:
    tag = uuid.uuid4().hex[:10]
    base = Path(opts.workdir) if opts.workdir else Path(tempfile.gettempdir())
    folder = base / f"join-{tag}"
    folder.mkdir(mode=0o700, parents=True)
    stack = ExitStack()
    stack.callback(shutil.rmtree, folder, True)
    try:
        env = stack.enter_context(brokers.broker(params["transport"], folder))
        backend_url, conf, cleanup = backends.get(params["backend"]).open(folder, tag)
        stack.callback(cleanup)
        queue = f"bench.join.{tag}"
        conf["task_default_queue"] = queue
        stack.callback(delete_queues, env, [queue])
        with _celery.worker_failures():
            w = stack.enter_context(celery_workers.worker(
                env.url, backend_url, transport_options=env.transport_options, conf=conf,
                pool=opts.pool or "prefork", concurrency=opts.concurrency or 2,
                ready_timeout=min(60.0, opts.timeout), stop_timeout=STOP_GRACE_S))
        app = make_app(env.url, backend_url, env.transport_options, **conf)
        counter = roundtrips.attach(app.backend)  # before the backend's first use
        stack.callback(app.close)
        stack.callback(joins.release, app.backend)
        return _Setup(_key(params, opts), stack, [w], app=app, counter=counter)
    except BaseException:
        stack.close()
        raise


def _key(params, opts) -> tuple:
    return (params["backend"], params["transport"], opts.pool or "prefork", opts.concurrency or 2)


# --------------------------------------------------------------------------- measuring
def _waiter(method: str, interval, timeout: float):
    """``wait(result, on_interval) -> member values`` for ``method``."""
    kw = {} if interval == "default" else {"interval": float(interval)}
    if method == "join":
        return lambda r, cb: r.join(timeout=timeout, on_interval=cb, **kw)
    if method == "join_native":
        return lambda r, cb: r.join_native(timeout=timeout, on_interval=cb, **kw)
    if method == "get":
        return lambda r, cb: r.get(timeout=timeout, on_interval=cb, **kw)
    if method == "chord":
        return lambda r, cb: r.get(timeout=timeout, on_interval=cb, **kw)["members"]
    if method == "redis-pubsub":
        return lambda r, cb: joins.redis_join(r, timeout=timeout, on_interval=cb, **kw)
    if method == "db-batch":
        return lambda r, cb: joins.db_join(r, timeout=timeout, on_interval=cb, **kw)
    raise ValueError(f"unknown method {method!r}")


@dataclass
class _Sample:
    total_ns: list = field(default_factory=list)
    done_ns: list = field(default_factory=list)
    lag_ns: list = field(default_factory=list)
    wait_ns: int = 0
    cpu_ns: int = 0
    round_trips: int = 0
    publish_round_trips: int = 0
    connects: int = 0
    polls: int = 0


@contextmanager
def _watching_sleeps(worker: celery_workers.Worker):
    """Count the waiter's sleeps (its polls) and fail fast if the worker dies.

    Patches ``time.sleep`` for the duration of one wait, because Celery's own
    hook cannot count: ``AsyncResult.get`` wraps ``on_interval`` in a one-shot
    promise, so it fires at most once per member however often the waiter polls.
    """
    real_sleep = time.sleep
    count = [0]

    def sleep(seconds):
        count[0] += 1
        _check_alive(worker)
        real_sleep(seconds)

    time.sleep = sleep
    try:
        yield count
    finally:
        time.sleep = real_sleep


def _check_alive(worker: celery_workers.Worker, *_) -> None:
    if not worker.alive():
        raise celery_workers.WorkerError(celery_workers.one_line(
            f"worker {worker.hostname} died during the join; log {worker.log_path} "
            f"ends:\n{worker.log_tail(8)}"))


def _one_join(setup: _Setup, params, wait, acc: _Sample | None, size: int | None = None) -> None:
    app, n = setup.app, int(size or params["group_size"])
    sigs = [app.signature("bench.sleep", args=(params["task_seconds"],)) for _ in range(n)]
    worker = setup.procs[0]
    on_interval = partial(_check_alive, worker)
    counter, now = setup.counter, recorder.now_ns
    before_publish = counter.read()
    t0 = now()
    if params["method"] == "chord":
        res = chord(sigs, app=app)(app.signature("bench.join.collect"))
    else:
        res = group(sigs, app=app).apply_async()
    t_pub = now()
    rt_pub = counter.since(before_publish)[0]
    before_wait = counter.read()
    with _watching_sleeps(worker) as sleeps:
        cpu0 = time.process_time_ns()
        try:
            values = wait(res, on_interval)
        except CeleryTimeout:
            _check_alive(worker)  # a dead worker is the better reason
            raise
        t_end = now()
        cpu1 = time.process_time_ns()
    rt, connects = counter.since(before_wait)
    setup.joins += 1
    if len(values) != n:
        raise RuntimeError(f"{params['method']} returned {len(values)} values for {n} tasks")
    if acc is None:
        return
    last_end = max(v["end_ns"] for v in values)
    acc.total_ns.append(t_end - t0)
    acc.done_ns.append(last_end - t0)
    acc.lag_ns.append(t_end - last_end)
    acc.wait_ns += t_end - t_pub
    acc.cpu_ns += cpu1 - cpu0
    acc.round_trips += rt
    acc.publish_round_trips += rt_pub
    acc.connects += connects
    acc.polls += sleeps[0] + 1


def _measure(setup: _Setup, params, opts) -> Outcome:
    wait = _waiter(params["method"], params["interval"], opts.timeout)
    # Warm-up (pool children, connections, tables, this method's own caches); a small
    # group is enough, and a 1000-task warm-up would double the cell's time.
    for _ in range(2 if setup.joins == 0 else 1):
        _one_join(setup, params, wait, None, size=min(WARMUP_GROUP, int(params["group_size"])))
    size = int(params["group_size"])
    wanted = opts.messages or (QUICK_JOINS if opts.quick else JOINS.get(size, 3))
    budget = opts.duration or (QUICK_BUDGET_S if opts.quick else BUDGET_S)
    acc = _Sample()
    started = time.monotonic()
    while len(acc.total_ns) < wanted:
        _one_join(setup, params, wait, acc)
        if len(acc.total_ns) >= MIN_JOINS and time.monotonic() - started >= budget:
            break
    joins_ = len(acc.total_ns)
    rec = recorder.Recorder()
    rec.add("total", recorder.ns_to_us(acc.total_ns))
    rec.add("lag", recorder.ns_to_us(acc.lag_ns))
    rec.add("done", recorder.ns_to_us(acc.done_ns))
    wait_s = acc.wait_ns / 1e9
    metrics = {
        "joins": joins_,
        "tasks": joins_ * size,
        "backend_round_trips": acc.round_trips / joins_,
        "round_trips_per_s": acc.round_trips / wait_s if wait_s else None,
        "round_trips_per_poll": acc.round_trips / acc.polls,
        "polls_per_join": acc.polls / joins_,
        "connects_per_join": acc.connects / joins_,
        "publish_round_trips": acc.publish_round_trips / joins_,
        "waiter_cpu_s": acc.cpu_ns / 1e9 / joins_,
        "waiter_cpu_frac": acc.cpu_ns / acc.wait_ns if acc.wait_ns else None,
        "wait_s": wait_s / joins_,
    }
    return Outcome(metrics, rec.histograms)


@register
class Join(Scenario):
    name = "join"
    description = DESCRIPTION
    summary = SUMMARY

    def __init__(self, opts):
        super().__init__(opts)
        self.kept = _celery.KeptWorker()

    def cells(self) -> list[dict]:
        opts = self.opts
        task_seconds = float(opts.task_seconds or 0.0)
        every = [backends.get(n) for n in backends.names()]
        if opts.quick:
            out = []
            for b in every:
                if b.service is None and b.transport is None:
                    slice_ = QUICK_EMBEDDED
                elif b.service and b.native_join and b.speedup:
                    slice_ = QUICK_SERVER
                else:
                    continue
                out += [_cell(b, b.speedup if m == "speedup" else m, QUICK_GROUP, i,
                              task_seconds) for m, i in slice_]
            return out
        out = []
        for b in every:
            for m in _methods(b):
                if _unsupported(b, m):  # one skipped row says why, instead of twelve
                    out.append(_cell(b, m, QUICK_GROUP, "default", task_seconds))
                    continue
                out += [_cell(b, m, size, interval, task_seconds)
                        for size in GROUP_SIZES for interval in INTERVALS]
        return out

    def requires(self, params) -> set[str]:
        return brokers.services(params["transport"]) | backends.services(params["backend"])

    def close(self) -> None:
        self.kept.close()

    def run_cell(self, params) -> Outcome:
        reason = _unsupported(backends.get(params["backend"]), params["method"])
        if reason:
            raise Skip(reason)
        try:
            setup = self.kept.get(_key(params, self.opts), lambda: _start(params, self.opts))
            return _measure(setup, params, self.opts)
        except BaseException:
            self.kept.close()  # a failed or interrupted cell leaves no worker and no queue
            raise
