"""Scenario ``worker``: how fast a real Celery worker runs tasks, per transport.

A worker process (``celery worker``, Celery's defaults: prefetch multiplier 4,
early ack, log level WARNING) in the ``solo`` pool and in ``prefork`` with
concurrency 2, over every cross-process transport. The task,
``bench.worker.tick`` (:mod:`bench.tasks.tick`), does nothing but append its
worker-side start/end readings (CLOCK_MONOTONIC, shared by every process on the
host) to a per-process file, so every task is counted (received, lost,
duplicates) without a result backend in the measurement.

``mode=throughput``: ``tasks`` no-op tasks (10,000; 2,000 quick) wait in the
queue before the worker starts (``load=prefilled``), behind a tenth as many
warm-up tasks; ``tasks_per_s`` = tasks / (first start -> last end). A fifo
queue exists only while its consumer reads it, so there the worker runs first
and this process publishes as fast as it can while it works (``load=fed``,
Celery's own messages built ahead; ``min_backlog`` says whether the worker ever
waited for the publisher). ``stall_s`` adds up the pauses of a second or more
between two task starts; ``x_amqp``/``x_redis`` divide by that transport's
rate measured earlier in the same run.

``mode=latency``: the worker idle, tasks published with ``send_task`` at a
modest open-loop rate (200/s; ``--rate``, ``--duration``): ``publish_to_start``
= intended send time -> task start, ``from_send`` = actual send -> start,
``schedule_lag`` = how late the sender was.

One worker serves the throughput and latency cells of a transport and pool
(its queue is the worker's, unique, deleted after); a prefilled throughput
cell always starts a fresh one.

What the cells show, and why (Celery 5.7, Kombu 5.7):

- amqp + solo with a backlog pauses for 10 s now and then (~250-500 tasks/s
  over 10,000, 7-8k/s between pauses; a 2,000 backlog often has none). The
  solo pool runs a task inside the socket read; its early ack goes to the
  hub's ``call_soon`` queue. A read continued from that queue runs a task
  whose ack is queued after the hub chose its poll timeout, and the hub then
  polls (``fire_timers``: until the next timer, at most 10 s) without running
  it; with the prefetch window (4) used up, RabbitMQ sends nothing and the
  socket stays quiet. strace shows the acks written right after a 10 s
  ``epoll_wait``; a poll timeout of 0 while callbacks wait removes the pauses;
  ``worker_prefetch_multiplier`` 1 still pauses, 64 hid them (deliveries keep
  the socket readable). Prefork acks via its result pipe, which wakes the poll.
- fifo + solo: the fifo transport delivers from a hub tick callback, after the
  timeout was chosen, and stops reading while the window is full, so with a
  backlog the worker runs 4 tasks per poll timeout (1 s: no timers) and the
  publisher blocks on the full pipe: the throughput cell fails. Waking the
  hub when the tick leaves callbacks queued brings it to ~16k tasks/s.
- filesystem: Kombu lists and sorts the whole folder per message, so the rate
  falls with the backlog (~1,000/s at 2,000 queued, ~170/s at 11,000).
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
from kombu.utils.uuid import uuid as task_id

from .. import brokers, celery_workers, maxrate, pacing, recorder
from ..cleanup import delete_queues
from ..celery_app import make_app
from ..tasks import tick
from . import Outcome, Scenario, Skip, _celery, register

DESCRIPTION = (
    "A real Celery worker (solo, and prefork -c 2; Celery's defaults: prefetch x4, early "
    "ack) running no-op tasks over each cross-process transport. throughput: 10,000 tasks "
    "(2,000 quick) queued before the worker starts, behind 10% warm-up tasks (a fifo queue "
    "exists only while its consumer reads it: fed by a publisher while the worker runs); "
    "tasks/s = first task start -> last task end, worker-side CLOCK_MONOTONIC; every task "
    "counted (lost, duplicates); stall_s sums pauses >= 1 s between task starts. latency: "
    "send_task at 200/s (--rate) for 5 s (1 s quick; --duration); publish_to_start = "
    "intended send -> task start. Celery's own behaviour, found here: with the solo pool the "
    "event loop can sit in poll() (until its next timer: up to 10 s, 1 s without timers) "
    "while the acks of the tasks it just ran wait in its call_soon queue and the prefetch "
    "window (4) is used up, so nothing more arrives: amqp+solo pauses 10 s a few times per "
    "10,000 tasks (hence ~250-500 tasks/s; 7-8k/s between pauses), fifo+solo stops "
    "reading once a backlog builds (its throughput cell fails).")

TASK = tick.TASK
MODES = ("throughput", "latency")
POOLS = ("solo", "prefork")
QUICK_POOLS = ("prefork",)
DEFAULT_CONCURRENCY = 2
TASKS, TASKS_QUICK = 10_000, 2_000
RATE = 200.0
DURATION, DURATION_QUICK = 5.0, 1.0
WARMUP_FRACTION = 0.1      # prefilled: warm-up tasks queued ahead of the measured ones
WARMUP_LATENCY_S = 0.2     # paced warm-up before a latency stream (--warmup)
WARMUP_FED = 50            # tasks, paced, before a fed throughput run
STALL_S = 1.0              # a pause this long between two task starts is a stall
IDLE_LIMIT_S = 15.0        # no task for this long (Celery's longest poll is 10 s): stop waiting
# Rate steps (--rate-sweep, --max-rate): seconds held, warm-up first, and how long after the
# last send a step waits for its tasks to start (longer means the rate was not sustained).
STEP_S, STEP_S_QUICK = 5.0, 2.0
STEP_WARM_S, STEP_WARM_S_QUICK = 1.0, 0.5
STEP_WAIT_S = 3.0
START_RATE = 100.0         # where the max-rate search starts climbing
POLL_S = 0.01

SUMMARY = [
    ("tasks_per_s", "tasks/s"),
    # x_<server>: this rate over that server transport's, same round (amqp, redis).
    *[(f"x_{name}", f"x {name}") for name in brokers.servers()],
    ("lost", "lost"),
    ("stall_s", "stalled s"),
    ("publish_to_start.p50", "pub-start p50 us"),
    ("publish_to_start.p99", "pub-start p99 us"),
    ("sent", "sent"),
]


# --------------------------------------------------------------------------- tick files
class _Ticks:
    """The records ``bench.worker.tick`` appends to ``<folder>/<pid>.bin``, read as they come."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._offsets: dict[str, int] = {}
        self._by_run: dict[int, list] = {}

    def poll(self) -> None:
        size = tick.RECORD.size
        for entry in os.scandir(self.folder):
            if not entry.name.endswith(".bin"):
                continue
            offset = self._offsets.get(entry.name, 0)
            whole = (entry.stat().st_size - offset) // size * size
            if whole <= 0:
                continue
            with open(entry.path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(whole)
            self._offsets[entry.name] = offset + len(data)
            rows = np.frombuffer(data, dtype="<i8").reshape(-1, 4)
            for run in np.unique(rows[:, 0]).tolist():
                self._by_run.setdefault(run, []).append(rows[rows[:, 0] == run])

    def count(self, run: int) -> int:
        return sum(len(r) for r in self._by_run.get(run, ()))

    def records(self, run: int) -> np.ndarray:
        """(run, index, start_ns, end_ns) rows of ``run``, in arrival order."""
        parts = self._by_run.get(run)
        return np.concatenate(parts) if parts else np.empty((0, 4), dtype=np.int64)

    def forget(self, run: int) -> None:
        self._by_run.pop(run, None)


# --------------------------------------------------------------------------- the worker
@dataclass
class _Rig(_celery.WorkerSetup):
    env: object = None
    app: object = None
    queue: str = ""
    ticks: _Ticks = None
    warm: bool = False
    clean: bool = True      # nothing of an earlier run is still queued or running

    def alive(self) -> bool:
        return bool(self.procs) and self.clean and super().alive()


def _rig_key(params) -> tuple:
    return (params["transport"], params["pool"], int(params["concurrency"]))


def _open(params, opts) -> _Rig:
    """A broker environment, a unique queue and the app; no worker yet."""
    tag = uuid.uuid4().hex[:12]
    queue = f"bench.worker.{tag}"
    stack = ExitStack()
    try:
        folder = Path(opts.workdir or tempfile.gettempdir()) / f"worker-{tag}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        stack.callback(shutil.rmtree, folder, True)
        ticks = folder / "ticks"
        ticks.mkdir(mode=0o700)
        env = stack.enter_context(brokers.broker(params["transport"], folder))
        app = make_app(env.url, None, env.transport_options, task_default_queue=queue,
                       task_ignore_result=True)
        stack.callback(app.close)
        stack.callback(delete_queues, env, [queue])
    except BaseException:
        stack.close()
        raise
    return _Rig(_rig_key(params), stack, env=env, app=app, queue=queue, ticks=_Ticks(ticks))


def _start_worker(rig: _Rig, params, opts) -> None:
    env = rig.env
    with _celery.worker_failures():
        proc = rig.stack.enter_context(celery_workers.worker(
            env.url, transport_options=env.transport_options,
            conf={"task_default_queue": rig.queue, "task_ignore_result": True},
            pool=params["pool"], concurrency=int(params["concurrency"]), queues=[rig.queue],
            env={tick.DIR_ENV: str(rig.ticks.folder)}, loglevel="WARNING",
            ready_timeout=opts.timeout))
    rig.stack.callback(_celery.stop_quickly, [proc])
    rig.procs = [proc]


# --------------------------------------------------------------------------- publishing
class _PublishStopped(Exception):
    def __init__(self, published: int, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.published, self.error = published, error


def _messages(app, run: int, n: int) -> list[tuple]:
    """Celery's own messages (as ``send_task`` builds them), built ahead of publishing."""
    build = app.amqp.as_task_v2
    return [build(task_id(), TASK, args=(run, i), ignore_result=True)[:3] for i in range(n)]


def _publish(rig: _Rig, messages, sent=None) -> float:
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
                raise _PublishStopped(i, exc) from None
        elapsed = now() - t0
    return len(messages) / (elapsed / 1e9) if elapsed else 0.0


def _paced(rig: _Rig, run: int, n: int, rate: float, ts=None) -> float:
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


def _paced_prebuilt(rig: _Rig, messages, rate: float, ts) -> float:
    """Publish Celery's prebuilt messages on an open-loop schedule (intended and actual
    send times into ``ts``); returns the seconds it took. Cheaper per message than
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
    with app.producer_or_acquire() as producer:
        producer.maybe_declare(app.amqp.queues[queue])
        publish = producer.publish
        t0 = pacer.start()
        for i, (headers, properties, body) in enumerate(messages):
            intended[i] = pacer.wait(i)
            sent[i] = now()
            publish(body, exchange="", routing_key=queue, serializer="json",
                    headers=headers, delivery_mode=2, **properties)
        elapsed = now() - t0
    ts.count = len(messages)
    return elapsed / 1e9


def _purge(rig: _Rig, run: int) -> tuple[int, int]:
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
        got = rig.ticks.count(run)
        if got != last:
            last, quiet_since = got, time.monotonic()
        elif time.monotonic() - quiet_since > 0.3:
            break  # nothing more ran for a while: what is left was purged
        time.sleep(POLL_S)
    ran_after = len(np.unique(rig.ticks.records(run)[:, 1]))  # since _collect let go
    rig.ticks.forget(run)
    return purged, ran_after


# --------------------------------------------------------------------------- waiting
def _collect(rig: _Rig, run: int, n: int, opts, what: str,
             wait_s: float | None = None) -> tuple[np.ndarray, str | None]:
    """Rows of ``run`` once its ``n`` tasks all ran, or what is there and why not.

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


def _require_all(rig, run, n, opts, what) -> None:
    """Warm-up tasks must all run before anything is measured."""
    _, why = _collect(rig, run, n, opts, what)
    if why:
        raise TimeoutError(why)


def _first_runs(rows: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """One row per task index in [0, n) (its first run) and the count of extra runs."""
    rows = rows[(rows[:, 1] >= 0) & (rows[:, 1] < n)]
    order = np.argsort(rows[:, 2], kind="stable")
    rows = rows[order]
    _, first = np.unique(rows[:, 1], return_index=True)
    return rows[np.sort(first)], len(rows) - len(first)


def _counts(n: int, ran: np.ndarray, duplicates: int) -> dict:
    return {"sent": n, "received": len(ran), "lost": n - len(ran), "duplicates": duplicates}


def _min_backlog(sent: np.ndarray, starts: np.ndarray) -> int:
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



# --------------------------------------------------------------------------- the scenario
@register
class Worker(Scenario):
    name = "worker"
    description = DESCRIPTION
    summary = SUMMARY
    rated = True

    def __init__(self, opts):
        super().__init__(opts)
        self.kept = _celery.KeptWorker()
        self._runs = count(1)       # run ids tag each batch of tasks in the tick files
        # Throughput per (round, transport, pool, concurrency, tasks): x_<server>.
        self._rates: dict[tuple, float] = {}

    def _transports(self) -> list[str]:
        opts = self.opts
        if opts.transports:
            return list(opts.transports)
        return [t.name for t in brokers.available() if t.cross_process
                and not (opts.quick and (t.service or t.slow))]

    def cells(self) -> list[dict]:
        opts = self.opts
        concurrency = opts.concurrency or DEFAULT_CONCURRENCY
        tasks = opts.messages or (TASKS_QUICK if opts.quick else TASKS)
        rate = opts.rate or RATE
        duration = opts.duration or (DURATION_QUICK if opts.quick else DURATION)
        paced = opts.messages or max(1, round(rate * duration))
        out = []
        pools = (opts.pool,) if opts.pool else (QUICK_POOLS if opts.quick else POOLS)
        if opts.rate_sweep or opts.max_rate:
            # Rate cells only: a ladder of held rates, or the search for the highest one.
            step_s = opts.duration or (STEP_S_QUICK if opts.quick else STEP_S)
            for transport in self._transports():
                for pool in pools:
                    base = {"transport": transport, "pool": pool,
                            "concurrency": 1 if pool == "solo" else concurrency,
                            "mode": "latency"}
                    if opts.max_rate:
                        out.append({**base, "tasks": "-", "rate": "max",
                                    "slo": opts.slo or maxrate.DEFAULT_SLO})
                    out += [{**base, "tasks": max(1, round(r * step_s)), "rate": r}
                            for r in opts.rate_sweep]
            return out
        if opts.quick and not opts.transports and opts.pool in (None, "prefork"):
            # The servers' prefork throughput first (skipped when unreachable), so the
            # x_<server> ratios are measured side by side in every quick run.
            for transport in brokers.servers():
                out.append({"transport": transport, "pool": "prefork",
                            "concurrency": concurrency, "mode": "throughput", "tasks": tasks,
                            "rate": "-"})
        # The quick slice runs prefork only: the pool the servers' references use.
        for transport in self._transports():
            for pool in pools:
                c = 1 if pool == "solo" else concurrency
                base = {"transport": transport, "pool": pool, "concurrency": c}
                out.append({**base, "mode": "throughput", "tasks": tasks, "rate": "-"})
                out.append({**base, "mode": "latency", "tasks": paced, "rate": rate})
        return out

    def close(self) -> None:
        self.kept.close()

    def _running_rig(self, params) -> _Rig:
        """The kept worker when it fits this cell, else a new one."""
        def open_rig():
            rig = _open(params, self.opts)
            try:
                _start_worker(rig, params, self.opts)
            except BaseException:
                rig.close()
                raise
            return rig
        return self.kept.get(_rig_key(params), open_rig)

    # ----------------------------------------------------------------------- throughput
    def _throughput(self, params) -> Outcome:
        opts = self.opts
        transport, n = params["transport"], int(params["tasks"])
        fed = not brokers.info(transport).holds_backlog
        run = next(self._runs)
        if fed:
            rig = self._running_rig(params)
            if not rig.warm:
                warm = next(self._runs)
                _paced(rig, warm, WARMUP_FED, RATE)
                _require_all(rig, warm, WARMUP_FED, opts, "warm-up tasks")
                rig.warm = True
            messages = _messages(rig.app, run, n)
            sent = np.zeros(n, dtype=np.int64)
            try:
                publish_rate = _publish(rig, messages, sent)
            except _PublishStopped as exc:
                rig.clean = False
                rig.ticks.poll()
                raise RuntimeError(
                    f"the worker stopped taking tasks ({rig.ticks.count(run)} of "
                    f"{exc.published} published had run) and the publisher gave up: "
                    f"{exc}") from None
        else:
            # The backlog must be in place before a worker reads the queue: a fresh one.
            self.kept.close()
            rig = self.kept.rig = _open(params, opts)
            warm_n = max(100, int(n * WARMUP_FRACTION))
            warm = next(self._runs)
            _publish(rig, _messages(rig.app, warm, warm_n))
            publish_rate = _publish(rig, _messages(rig.app, run, n))
            sent = None
            _start_worker(rig, params, opts)
            _require_all(rig, warm, warm_n, opts, "warm-up tasks")
            rig.warm = True
        rows, why = _collect(rig, run, n, opts, "tasks")
        ran, duplicates = _first_runs(rows, n)
        metrics = {"load": "fed" if fed else "prefilled", **_counts(n, ran, duplicates),
                   "publish_per_s": publish_rate}
        rec = recorder.Recorder()
        notes = [why] if why else []
        if len(ran):
            starts = np.sort(ran[:, 2])
            span_s = (int(ran[:, 3].max()) - int(starts[0])) / 1e9
            gaps = np.diff(starts)
            stalls = gaps[gaps >= STALL_S * 1e9]
            stall_s = float(stalls.sum()) / 1e9
            metrics["tasks_per_s"] = len(ran) / span_s if span_s > 0 else None
            if len(ran) < n:
                # Not a rate of the cell that was asked for: say so beside the figure.
                metrics["partial"] = True
                notes.append(f"tasks/s is over the {len(ran)} of {n} tasks that ran "
                             f"(partial)")
            metrics["span_s"] = span_s
            metrics["stalls"] = int(len(stalls))
            metrics["stall_s"] = stall_s
            busy = span_s - stall_s
            metrics["tasks_per_s_between_stalls"] = len(ran) / busy if busy > 0 else None
            rec.add("start_gap", gaps / 1000.0)
            if len(stalls):
                notes.append(f"{len(stalls)} pause(s) >= {STALL_S:g} s between tasks, "
                             f"{stall_s:.1f} s in all (see the scenario's description)")
            if sent is not None:
                metrics["min_backlog"] = _min_backlog(sent, starts)
            self._ratios(metrics, params)
        return Outcome(metrics, rec.histograms, notes)

    def _ratios(self, metrics: dict, params) -> None:
        """x_<server>: this rate over that server transport's, measured earlier this round."""
        rate = metrics.get("tasks_per_s")
        if not rate:
            return
        same = (params["pool"], int(params["concurrency"]), int(params["tasks"]), self.round)
        self._rates[(params["transport"], *same)] = rate
        for base in brokers.servers():
            theirs = self._rates.get((base, *same))
            if base != params["transport"] and theirs:
                metrics[f"x_{base}"] = rate / theirs

    # ----------------------------------------------------------------------- latency
    def _latency(self, params) -> Outcome:
        rate = float(params["rate"])
        seconds = int(params["tasks"]) / rate
        warm_s = self.opts.warmup if self.opts.warmup is not None else WARMUP_LATENCY_S
        slo = maxrate.SLO.parse(self.opts.slo or maxrate.DEFAULT_SLO)
        return self._rate_step(params, rate, seconds, warm_s, slo)[0]

    def _rate_step(self, params, rate: float, seconds: float, warm_s: float,
                   slo: maxrate.SLO) -> tuple[Outcome, maxrate.Step]:
        """Hold ``rate`` for ``warm_s`` (not counted) then ``seconds``: Celery's own
        messages, built ahead, published on an open-loop schedule. ``publish_to_start``
        = intended send time -> task start (worker-side clock); a task that had not
        started when the step stopped waiting counts at that wait (a lower bound), so
        a rate the worker cannot take shows in the percentiles instead of hiding."""
        opts = self.opts
        rig = self._running_rig(params)
        n_warm = max(10, round(rate * warm_s)) if warm_s > 0 else 0
        n = max(1, round(rate * seconds))
        total = n_warm + n
        run = next(self._runs)
        messages = _messages(rig.app, run, total)
        ts = recorder.Timestamps(total, ("intended", "sent"))
        _paced_prebuilt(rig, messages, rate, ts)
        del messages
        rows, why = _collect(rig, run, total, opts, "tasks", wait_s=max(STEP_WAIT_S, seconds))
        waited_until = recorder.now_ns()
        ran, duplicates = _first_runs(rows, total)
        purged = ran_after = 0
        if len(ran) < total:
            purged, ran_after = _purge(rig, run)
        rig.warm = True
        intended, sent = ts.column("intended"), ts.column("sent")
        start = np.full(total, np.inf)
        start[ran[:, 1]] = ran[:, 2]
        m = slice(n_warm, total)
        started = np.isfinite(start[m])
        waits = np.where(started, start[m] - intended[m], waited_until - intended[m])
        rec = recorder.Recorder()
        hist = rec.add("publish_to_start", waits / 1000.0, at_ns=intended[m]).hist
        rec.add("from_send", (start[m][started] - sent[m][started]) / 1000.0,
                at_ns=intended[m][started])
        rec.add("schedule_lag", (sent[m] - intended[m]) / 1000.0, at_ns=intended[m])
        elapsed = (int(sent[-1]) - int(intended[n_warm])) / 1e9 + 1 / rate
        growth = pacing.backlog_growth(sent, start, int(intended[n_warm + n // 2]),
                                       int(sent[-1]))
        pending = total - len(ran)
        step = maxrate.judge(maxrate.Step(
            rate, n / elapsed, hist.get_value_at_percentile(slo.percentile) if n else None,
            growth, seconds), slo)
        metrics = {"sent": n, "received": int(started.sum()), "pending": int(n - started.sum()),
                   # a task neither run, nor purged, nor run after the purge: gone
                   "lost": max(0, pending - purged - ran_after), "duplicates": duplicates,
                   **pacing.achieved(rate, n, elapsed), "backlog_growth_per_s": growth,
                   "sustainable": step.ok, "slo": slo.text}
        notes = [why] if why else []
        if pending:
            notes.append(f"{pending} tasks had not started {max(STEP_WAIT_S, seconds):g} s "
                         f"after the last send (counted at that wait; then purged)")
        if not step.ok:
            notes.append(f"not sustainable at {rate:,.0f}/s: {step.why}")
        return Outcome(metrics, rec.histograms, notes), step

    def _max_rate(self, params) -> Outcome:
        """The highest rate this worker sustains within the SLO (bench.maxrate.search)."""
        opts = self.opts
        slo = maxrate.SLO.parse(params["slo"])
        seconds = opts.duration or (STEP_S_QUICK if opts.quick else STEP_S)
        warm_s = opts.warmup if opts.warmup is not None else \
            (STEP_WARM_S_QUICK if opts.quick else STEP_WARM_S)
        return self.max_rate(
            lambda rate, hold: self._rate_step(params, rate, hold, warm_s, slo)[0], slo,
            opts.rate or START_RATE, seconds, "publish_to_start", "tasks/s")

    # ----------------------------------------------------------------------- one cell
    def run_cell(self, params) -> Outcome:
        mode = params["mode"]
        if mode not in MODES:
            raise Skip(f"mode {mode!r} is not one of {', '.join(MODES)}")
        reason = _celery.unusable(params["transport"])
        if reason:
            raise Skip(reason)
        try:
            if mode == "throughput":
                out = self._throughput(params)
            else:
                out = self.by_rate(params, self._max_rate, lambda rate: self._latency(params),
                                   lambda: self._latency(params))
        except BaseException:
            self.kept.close()  # a failed or interrupted cell leaves no worker behind
            raise
        if self.kept.rig is not None and not self.kept.rig.clean:
            self.kept.close()
        return out
