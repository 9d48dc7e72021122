"""Scenario ``prefetch``: head-of-line blocking behind a long task.

The seed ("celery prefetch: a very slow queue"): a short task sat 30 s in a
worker's prefetch buffer behind an 80 s task while another worker idled.
Scaled down: two prefork ``-c 1`` workers share one queue; a long task (2-3 s)
is published and, while it runs, ten 10 ms tasks in one burst. The worker
running the long task keeps fetching, up to its prefetch window; the short
tasks in that buffer wait for the long one to end while the other worker idles.

Measured here (redis, amqp, unix): multiplier 4 with early ack leaves 4 short
tasks behind the long one, multiplier 1 with early ack 1, multiplier 1 with
``task_acks_late`` none, ``worker_disable_prefetch`` (redis) none. On a
polling transport without an event loop (filesystem) the prefork master blocks
handing the second task to its busy child, so only 1 waits whatever the
multiplier.
"""
from __future__ import annotations

import time
import uuid
from contextlib import ExitStack

from .. import backends, brokers, celery_workers, recorder
from ..cleanup import delete_queues
from ..celery_app import make_app
from . import Outcome, Scenario, Skip, _celery, register

DESCRIPTION = (
    "Head-of-line blocking: two prefork -c 1 workers; a long task (3 s; 2 s quick; "
    "--task-seconds) is published and, once it has started, 10 x 10 ms tasks in one "
    "burst; across worker_prefetch_multiplier 1/4, task_acks_late off/on, and "
    "worker_disable_prefetch at multiplier 4 (Celery 5.7, redis brokers only: elsewhere "
    "Celery ignores it, so those cells are skipped). short_wait is each short task's queue "
    "wait, publish -> task start (worker-side CLOCK_MONOTONIC); short_tasks_delayed counts "
    "short tasks that waited over half the long task; idle_s is how long the other worker "
    "sat idle while they waited. Both workers are warmed up (each has run a task) before "
    "the long task. Result backend: SQLite (WAL) in the work folder.")

TASK = "bench.prefetch.work"
LONG_S, LONG_S_QUICK = 3.0, 2.0
SHORT_S = 0.010
SHORTS = 10
WORKERS = 2

SUMMARY = [
    ("long_task_s", "long task s"),
    ("short_wait.p50", "short wait p50 us"),
    ("short_wait_max_s", "short wait max s"),
    ("short_tasks_delayed", "delayed"),
    ("idle_s", "other worker idle s"),
]


def _cell(transport, multiplier, acks_late, disable_prefetch, long_s) -> dict:
    return {"transport": transport, "prefetch_multiplier": multiplier, "acks_late": acks_late,
            "disable_prefetch": disable_prefetch, "long_s": long_s, "shorts": SHORTS}


def _disable_prefetch_unsupported(transport: str) -> str | None:
    # Celery 5.7 (worker/consumer/tasks.py) honours it only when driver_type == 'redis'.
    if "disable_prefetch" in brokers.info(transport).capabilities:
        return None
    return (f"worker_disable_prefetch is ignored by Celery 5.7 over {transport} (it honours "
            f"it on redis only): the cell would measure multiplier 4")


def _warm_up(app, queue, procs, deadline) -> None:
    """One task at a time until every worker has run one: all consume, children warm."""
    seen = set()
    hostnames = {w.hostname for w in procs}
    while seen != hostnames:
        res = app.send_task(TASK, kwargs={"seconds": 0.0}, queue=queue)
        seen.add(_celery.wait(app, [res], procs, deadline, "a warm-up task")[0]["hostname"])


def _send(app, queue, producer, seconds, index):
    sent = recorder.now_ns()
    return app.send_task(TASK, kwargs={"seconds": seconds, "sent_ns": sent, "index": index},
                         queue=queue, producer=producer)


def _publish(app, queue, long_s, shorts, procs, deadline) -> list:
    """The long task; once a worker runs it, the short ones in one burst.

    Waiting for the long task to start (``task_track_started``) makes the cell
    deterministic: the short tasks always arrive while it runs, as in the seed,
    never ahead of it in a worker's buffer.
    """
    with app.producer_or_acquire() as producer:
        pending = [_send(app, queue, producer, long_s, 0)]
        while pending[0].state == "PENDING":
            _celery.check_alive(procs)
            if time.monotonic() >= deadline:
                raise TimeoutError("timed out waiting for the long task to start")
            time.sleep(0.005)
        for i in range(1, shorts + 1):
            pending.append(_send(app, queue, producer, SHORT_S, i))
    return pending


def _measure(runs: list[dict], long_s: float) -> tuple[dict, list]:
    long_run, short_runs = runs[0], runs[1:]
    waits_ns = [r["start_ns"] - r["sent_ns"] for r in short_runs]
    delayed = [r for r, w in zip(short_runs, waits_ns) if w > long_s / 2 * 1e9]
    busy = long_run["hostname"]
    # While the delayed tasks waited, how long had the other worker(s) been idle?
    others_done = max([r["end_ns"] for r in runs if r["hostname"] != busy]
                      + [long_run["sent_ns"]])
    idle_ns = max([r["start_ns"] - others_done for r in delayed] + [0])
    metrics = {
        "long_task_s": (long_run["end_ns"] - long_run["start_ns"]) / 1e9,
        "short_wait_max_s": max(waits_ns) / 1e9,
        "short_tasks_delayed": len(delayed),
        "shorts_on_long_worker": sum(1 for r in short_runs if r["hostname"] == busy),
        "idle_s": idle_ns / 1e9,
        "sent": len(runs),
        "received": len({r["index"] for r in runs}),
    }
    metrics["lost"] = metrics["sent"] - metrics["received"]
    return metrics, [w / 1000.0 for w in waits_ns]


@register
class Prefetch(Scenario):
    name = "prefetch"
    description = DESCRIPTION
    summary = SUMMARY

    def cells(self) -> list[dict]:
        opts = self.opts
        # --transport picks the transports (the quick slice too); else ours and the servers.
        embedded = brokers.embedded(multi_consumer=True)
        if opts.quick:
            long_s = opts.task_seconds or LONG_S_QUICK
            # The seed's default (early ack, prefetch 4) against the documented cure.
            return [_cell(t, m, a, False, long_s) for t in (opts.transports or (embedded,))
                    for m, a in ((4, False), (1, True))]
        long_s = opts.task_seconds or LONG_S
        out = []
        for transport in opts.transports or (embedded, *brokers.servers()):
            for multiplier in (4, 1):
                for acks_late in (False, True):
                    out.append(_cell(transport, multiplier, acks_late, False, long_s))
            for acks_late in (False, True):
                out.append(_cell(transport, 4, acks_late, True, long_s))
        return out

    def run_cell(self, params) -> Outcome:
        long_s, shorts = float(params["long_s"]), int(params["shorts"])
        opts = self.opts
        reason = _celery.unusable(params["transport"]) or \
            (params["disable_prefetch"] and _disable_prefetch_unsupported(params["transport"]))
        if reason:
            raise Skip(reason)
        queue = f"bench.prefetch.{uuid.uuid4().hex[:12]}"
        conf = {"task_default_queue": queue,
                "worker_prefetch_multiplier": int(params["prefetch_multiplier"]),
                "task_acks_late": bool(params["acks_late"]),
                "worker_disable_prefetch": bool(params["disable_prefetch"]),
                "task_track_started": True}
        backend = backends.embedded()
        with self.cell_folder() as workdir, \
                brokers.broker(params["transport"], workdir) as env, ExitStack() as stack:
            backend_url, backend_conf, cleanup = backend.open(workdir, "prefetch")
            stack.callback(cleanup)
            conf.update(backend_conf)
            stack.callback(delete_queues, env, [queue])
            app = make_app(env.url, backend_url, env.transport_options, **conf)
            stack.callback(app.close)
            backend.prepare(app)
            with _celery.worker_failures():
                procs = stack.enter_context(celery_workers.workers(
                    WORKERS, env.url, backend_url, transport_options=env.transport_options,
                    conf=conf, pool="prefork", concurrency=1, queues=[queue],
                    ready_timeout=opts.timeout))
                _warm_up(app, queue, procs, time.monotonic() + opts.timeout)
                pending = _publish(app, queue, long_s, shorts, procs,
                                   time.monotonic() + opts.timeout)
                runs = _celery.wait(app, pending, procs,
                                    time.monotonic() + long_s + opts.timeout,
                                    f"the long task and {shorts} short ones")
                _celery.stop_quickly(procs)
            metrics, waits_us = _measure(runs, long_s)
            rec = recorder.Recorder()
            rec.add("short_wait", waits_us)
            return Outcome(metrics, rec.histograms)
