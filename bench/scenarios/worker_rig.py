"""The worker scenario's rig: the worker it measures, the publishing into its queue, and
the record files its processes write (the tick task's, :mod:`bench.worker_stamps`'),
read as they come. :mod:`bench.scenarios.worker` decides what each cell measures.
"""
from __future__ import annotations

import gc
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kombu.utils.uuid import uuid as task_id

from .. import backends, brokers, celery_workers, pacing, recorder, worker_stamps
from ..celery_app import make_app
from ..cleanup import delete_queues
from ..record_files import RecordReader
from ..tasks import tick
from . import _celery

TASK = tick.TASK
IDLE_LIMIT_S = 15.0        # no task for this long (Celery's longest poll is 10 s): stop waiting
STAMPS_WAIT_S = 1.0        # after the last tick, how long the pool's last stamps may take
POLL_S = 0.01

# --------------------------------------------------------------------------- the worker
@dataclass
class MeasuredWorker(_celery.WorkerSetup):
    env: object = None
    app: object = None
    queue: str = ""
    ticks: RecordReader = None
    stamps: RecordReader = None     # bench.worker_stamps' records, with when they were read
    warm: bool = False
    clean: bool = True      # nothing of an earlier run is still queued or running
    backend: str = ""       # the result backend (roundtrip cells: a caller waits), or none
    backend_url: str | None = None
    backend_conf: dict = None

    def alive(self) -> bool:
        return bool(self.procs) and self.clean and super().alive()


def rig_key(params) -> tuple:
    return (params["transport"], params["pool"], int(params["concurrency"]),
            params.get("backend", ""), params.get("hooks", "on"))


def open_rig(params, opts) -> MeasuredWorker:
    """A broker environment, a unique queue and the app; no worker yet."""
    tag = uuid.uuid4().hex[:12]
    queue = f"bench.worker.{tag}"
    stack = ExitStack()
    try:
        folder = Path(opts.workdir or tempfile.gettempdir()) / f"worker-{tag}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        stack.callback(shutil.rmtree, folder, True)
        ticks, stamps = folder / "ticks", folder / "stamps"
        ticks.mkdir(mode=0o700)
        stamps.mkdir(mode=0o700)
        env = stack.enter_context(brokers.broker(params["transport"], folder))
        backend = params.get("backend") or ""
        backend_url, backend_conf = None, {}
        if backend:
            backend_url, backend_conf, drop = backends.get(backend).open(folder, tag)
            stack.callback(drop)
        app = make_app(env.url, backend_url, env.transport_options, task_default_queue=queue,
                       task_ignore_result=True, **backend_conf)
        stack.callback(app.close)
        if backend:
            backends.get(backend).prepare(app)
        stack.callback(delete_queues, env, [queue])
    except BaseException:
        stack.close()
        raise
    return MeasuredWorker(rig_key(params), stack, env=env, app=app, queue=queue,
                          ticks=RecordReader(ticks), backend=backend, backend_url=backend_url,
                          backend_conf=backend_conf,
                          stamps=RecordReader(stamps, worker_stamps.COLUMNS, run_col=1,
                                              read_at=True))


def start_worker(rig: MeasuredWorker, params, opts) -> None:
    env = rig.env
    with _celery.worker_failures():
        # hooks=off: Celery's default strategy and no signal handlers (their cost, measured)
        hooks = params.get("hooks", "on") != "off"
        conf = {"task_default_queue": rig.queue, "task_ignore_result": True,
                **(worker_stamps.worker_conf(TASK) if hooks else {})}
        conf.update(rig.backend_conf)
        proc = rig.stack.enter_context(celery_workers.worker(
            env.url, rig.backend_url, transport_options=env.transport_options, conf=conf,
            pool=params["pool"], concurrency=int(params["concurrency"]), queues=[rig.queue],
            env={tick.DIR_ENV: str(rig.ticks.folder),
                 **({worker_stamps.STAMP_ENV: str(rig.stamps.folder)} if hooks else {})},
            loglevel="WARNING",
            ready_timeout=opts.timeout))
    rig.stack.callback(_celery.stop_quickly, [proc])
    rig.procs = [proc]


# --------------------------------------------------------------------------- publishing
class PublishStopped(Exception):
    def __init__(self, published: int, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.published, self.error = published, error


def build_messages(app, run: int, n: int, store: bool = False) -> list[tuple]:
    """Celery's own messages (as ``send_task`` builds them), built ahead of publishing;
    ``store``: their results are stored (a caller waits for them), else ignored."""
    build = app.amqp.as_task_v2
    return [build(task_id(), TASK, args=(run, i), ignore_result=not store)[:3]
            for i in range(n)]


class Caller(threading.Thread):
    """A caller waiting for each task's result in send order (``AsyncResult.get``, the
    backend's own wait: redis pub/sub), stamping when it has it in hand (``in_hand``,
    perf_counter_ns; -1: not had). A task not in hand within ``wait_s`` of the caller
    asking ends the wait: the tasks after it are not had either (the step purges them)."""

    def __init__(self, app, messages, wait_s: float):
        super().__init__(name="celery-bench-caller", daemon=True)
        self.app, self.wait_s = app, wait_s
        self.ids = [headers["id"] for headers, _, _ in messages]
        self.in_hand = np.full(len(self.ids), -1, dtype=np.int64)
        self.error: str | None = None

    def run(self) -> None:
        now, AsyncResult = recorder.now_ns, self.app.AsyncResult
        for i, tid in enumerate(self.ids):
            try:
                AsyncResult(tid).get(timeout=self.wait_s, propagate=False)
            except Exception as exc:  # a timeout: what is left is counted as not had
                self.error = f"result {i} not in hand: {type(exc).__name__}"
                return
            self.in_hand[i] = now()

    def finish(self, timeout: float) -> np.ndarray:
        self.join(timeout)
        return self.in_hand


def publish_all(rig: MeasuredWorker, messages, sent=None) -> float:
    """Publish ``messages`` back to back; returns the rate (messages/s)."""
    app, queue = rig.app, rig.queue
    with app.producer_or_acquire() as producer:
        producer.maybe_declare(app.amqp.queues[queue])
        publish, now = producer.publish, recorder.now_ns
        t0 = now()
        for i, (headers, properties, body) in enumerate(messages):
            if sent is not None:
                sent[i] = now()
            try:
                publish(body, exchange="", routing_key=queue, serializer="json",
                        headers=headers, delivery_mode=2, **properties)
            except Exception as exc:
                raise PublishStopped(i, exc) from None
        elapsed = now() - t0
    return len(messages) / (elapsed / 1e9) if elapsed else 0.0


def paced(rig: MeasuredWorker, run: int, n: int, rate: float, ts=None) -> float:
    """``send_task`` on an open-loop schedule; returns the seconds it took."""
    app, queue = rig.app, rig.queue
    pacer = pacing.Pacer(rate)
    now = recorder.now_ns
    with app.producer_or_acquire() as producer:
        send = app.send_task
        t0 = pacer.start()
        for i in range(n):
            due = pacer.wait(i)
            if ts is not None:
                ts.intended[i] = due
                ts.sent[i] = now()
            send(TASK, args=(run, i), queue=queue, producer=producer, ignore_result=True)
        elapsed = now() - t0
    if ts is not None:
        ts.count = n
    return elapsed / 1e9


def paced_prebuilt(rig: MeasuredWorker, messages, rate: float, ts) -> float:
    """Publish Celery's prebuilt messages on an open-loop schedule (intended and actual
    send times, and when each publish call returned, into ``ts``); returns the seconds it took. Cheaper per message than
    ``send_task``, so the worker, not the sender, is what a high rate finds the limit of."""
    app, queue = rig.app, rig.queue
    pacer = pacing.Pacer(rate)
    now = recorder.now_ns
    intended, sent = ts.intended, ts.sent
    # The messages built ahead are many objects: out of the collector's sight, so a full
    # collection of them cannot stall this (harness) sender and pass for the worker's latency.
    gc.freeze()
    try:
        return _paced_publish(app, queue, messages, pacer, now, intended, sent, ts)
    finally:
        gc.unfreeze()


def _paced_publish(app, queue, messages, pacer, now, intended, sent, ts) -> float:
    returned = ts.returned   # when each publish call returned: the waterfall's first stage
    with app.producer_or_acquire() as producer:
        producer.maybe_declare(app.amqp.queues[queue])
        publish = producer.publish
        t0 = pacer.start()
        for i, (headers, properties, body) in enumerate(messages):
            intended[i] = pacer.wait(i)
            sent[i] = now()
            publish(body, exchange="", routing_key=queue, serializer="json",
                    headers=headers, delivery_mode=2, **properties)
            returned[i] = now()
        elapsed = now() - t0
    ts.count = len(messages)
    return elapsed / 1e9


def purge(rig: MeasuredWorker, run: int) -> tuple[int, int]:
    """Empty the queue after a step the worker could not keep up with, and let what it
    had prefetched finish, so the next step starts from an empty queue. Returns (tasks
    purged, tasks of ``run`` that ran meanwhile): every task is accounted for."""
    try:
        with rig.app.connection_for_write() as conn:
            purged = conn.default_channel.queue_purge(rig.queue) or 0
    except Exception:  # a transport that cannot purge from here (fifo): the worker drains it
        purged = 0
    last, quiet_since = -1, time.monotonic()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        rig.ticks.poll()
        rig.stamps.poll()
        got = rig.ticks.count(run)
        if got != last:
            last, quiet_since = got, time.monotonic()
        elif time.monotonic() - quiet_since > 0.3:
            break  # nothing more ran for a while: what is left was purged
        time.sleep(POLL_S)
    ran_after = len(np.unique(rig.ticks.records(run)[:, 1]))  # since collect let go
    rig.ticks.forget(run)
    return purged, ran_after


# --------------------------------------------------------------------------- waiting
def collect(rig: MeasuredWorker, run: int, n: int, opts, what: str,
            wait_s: float | None = None, stamps: bool = False) -> tuple[np.ndarray, str | None]:
    """Rows of ``run`` once its ``n`` tasks all ran, or what is there and why not.
    ``stamps``: read the worker's stamps as they come too (see :func:`take_stamps`).

    Stops waiting when no task ran for IDLE_LIMIT_S (longer than any pause Celery
    takes by itself) or after ``wait_s`` (default ``opts.timeout``); a dead worker
    fails the cell. A rate step passes ``wait_s`` and purges what is left itself.
    """
    limit = opts.timeout if wait_s is None else min(wait_s, opts.timeout)
    deadline = time.monotonic() + limit
    idle_limit = min(IDLE_LIMIT_S, limit)
    seen, changed = -1, time.monotonic()
    while True:
        rig.ticks.poll()
        if stamps:
            rig.stamps.poll()
        got = rig.ticks.count(run)
        now = time.monotonic()
        if got >= n and len(np.unique(rig.ticks.records(run)[:, 1])) >= n:
            rows = rig.ticks.records(run)
            rig.ticks.forget(run)
            return rows, None
        if got != seen:
            seen, changed = got, now
        _celery.check_alive(rig.procs)
        if now >= deadline or now - changed >= idle_limit:
            rows = rig.ticks.records(run)
            rig.ticks.forget(run)
            rig.clean = wait_s is not None   # a rate step purges its leftovers
            done = len(np.unique(rows[:, 1]))
            return rows, (f"{n - done} of {n} {what} had not run after "
                          f"{limit if now >= deadline else idle_limit:g} s"
                          f"{'' if now >= deadline else ' without a task running'}")
        time.sleep(POLL_S)


def take_stamps(rig: MeasuredWorker, run: int, started: int) -> np.ndarray:
    """The :mod:`bench.worker_stamps` rows of ``run`` (kind, run, index, a, b, c, read_ns),
    waiting up to STAMPS_WAIT_S for the pool children's records of the ``started`` tasks
    (written at ``task_postrun``, just after the tick's). Rows of earlier runs are dropped."""
    deadline = time.monotonic() + STAMPS_WAIT_S
    while True:
        rig.stamps.poll()
        rows = rig.stamps.records(run)
        if np.count_nonzero(rows[:, 0] == worker_stamps.CHILD) >= started or \
                time.monotonic() >= deadline:
            rig.stamps.forget(run, earlier=True)
            return rows
        time.sleep(POLL_S)


def require_all(rig, run, n, opts, what) -> None:
    """Warm-up tasks must all run before anything is measured."""
    _, why = collect(rig, run, n, opts, what)
    if why:
        raise TimeoutError(why)


def first_runs(rows: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """One row per task index in [0, n) (its first run) and the count of extra runs."""
    rows = rows[(rows[:, 1] >= 0) & (rows[:, 1] < n)]
    order = np.argsort(rows[:, 2], kind="stable")
    rows = rows[order]
    _, first = np.unique(rows[:, 1], return_index=True)
    return rows[np.sort(first)], len(rows) - len(first)


def counts(n: int, ran: np.ndarray, duplicates: int) -> dict:
    return {"sent": n, "received": len(ran), "lost": n - len(ran), "duplicates": duplicates}


def min_backlog(sent: np.ndarray, starts: np.ndarray) -> int:
    """Fewest tasks published but not yet started at a task start while publishing
    (past the first tenth: the backlog builds up from nothing).

    At or below the prefetch window the worker may have waited for the publisher.
    """
    first = len(starts) // 10
    during = starts[first:]
    during = during[during <= sent.max()]
    if not len(during):
        return 0
    started_before = np.arange(first, first + len(during))
    backlog = np.searchsorted(np.sort(sent), during, side="right") - started_before
    return int(backlog.min())
