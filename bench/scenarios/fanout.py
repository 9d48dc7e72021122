"""Scenario ``fanout``: the seed "Think Parallel with Celery", scaled down.

A crawl of ``pages`` x ``objects`` where every step is an HTTP call (a sleep,
at 1/100 of the seed's seconds: page 5 ms; per object 2.5 + 7.5 + 20 ms), run
in the seed's shapes (see :mod:`bench.tasks.fanout`): ``serial`` (one task
loops over everything), ``per-page`` (one task per page), ``per-object`` (one
task per object, a ``group`` per page) and ``chord`` (one task per object in a
chord whose body collects every result).

One worker (``--pool``, ``--concurrency``, default prefork 4) serves every
shape of a transport: it is started for the first cell and kept while the
cells that follow use the same transport, backend, pool and concurrency (so
serial and the parallel shapes run side by side on the same worker); it is
stopped when the setup changes, on any error, and by ``finish()`` after the
scenario's last cell.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from .. import backends, brokers, celery_workers, config, recorder
from ..cleanup import delete_queues
from ..celery_app import make_app
from . import Outcome, Scenario, Skip, _celery, register

DESCRIPTION = (
    "The seed's crawl (pages x objects, HTTP calls as sleeps at 1/100 of its seconds: page "
    "5 ms, object 30 ms; --task-seconds sets the object's and scales the rest alike) in four "
    "shapes: serial (one task), per-page (a task per page), per-object (a group of one task "
    "per object for each page) and chord (one task per object, a chord body collecting "
    "every result), on one worker of the stated pool and concurrency. makespan: publish of "
    "the first task -> end of the last store (worker-side CLOCK_MONOTONIC), one sample per "
    "round (3 rounds a repeat; 2 quick). speedup: median serial makespan / median makespan, "
    "serial measured in this process on the same worker (the serial cell's rounds; when "
    "that cell did not run first, one serial round inside the cell, noted). Every object is "
    "accounted for (stored, lost, duplicates). Backend: SQLite (WAL) in the work folder on "
    "embedded transports (its chords poll through celery.chord_unlock, 1 s apart), Redis "
    "otherwise.")

SHAPES = ("serial", "per-page", "per-object", "chord")
START = "bench.fanout.start"
# The seed's HTTP calls and crunching, in seconds, at 1/100 of its values
# (--task-seconds sets the object's total and scales them all alike).
SLEEPS = {"page": 0.005, "get": 0.0025, "details": 0.0075, "crunch": 0.020}
OBJECT_S = SLEEPS["get"] + SLEEPS["details"] + SLEEPS["crunch"]
WARM_SLEEPS = {"page": 0.0, "get": 0.0, "details": 0.0, "crunch": 0.020}
SIZE, SIZE_QUICK = (20, 10), (4, 5)
ROUNDS, ROUNDS_QUICK = 3, 2
DEFAULT_CONCURRENCY = 4

SUMMARY = [
    ("makespan_s", "makespan s"),
    ("makespan.p90", "makespan p90 us"),
    ("speedup", "x serial"),
    ("serial_makespan_s", "serial s"),
    ("stored", "objects stored"),
    ("lost", "lost"),
]


def _sleeps(params) -> dict:
    scale = float(params["object_ms"]) / 1000 / OBJECT_S
    return {step: seconds * scale for step, seconds in SLEEPS.items()}


# --------------------------------------------------------------------------- the worker
@dataclass
class _FanoutSetup(_celery.WorkerSetup):
    app: object = None
    queue: str = ""
    forget: bool = False     # results live on a server: delete them when read


def _rig_key(params) -> tuple:
    return (params["transport"], params["backend"], params["pool"], int(params["concurrency"]))


def _open_rig(params, opts) -> _FanoutSetup:
    tag = uuid.uuid4().hex[:12]
    queue = f"bench.fanout.{tag}"
    workdir = Path(opts.workdir or tempfile.gettempdir()) / f"fanout-{tag}"
    stack = ExitStack()
    try:
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        stack.callback(shutil.rmtree, workdir, True)
        env = stack.enter_context(brokers.broker(params["transport"], workdir))
        backend = backends.get(params["backend"])
        backend_url, conf, cleanup = backend.open(workdir, tag)
        stack.callback(cleanup)
        # Results a run leaves on the server expire; chords' counters too.
        conf.update(task_default_queue=queue, result_expires=600)
        app = make_app(env.url, backend_url, env.transport_options, **conf)
        stack.callback(app.close)
        stack.callback(delete_queues, env, [queue])
        backend.prepare(app)
        with _celery.worker_failures():
            proc = stack.enter_context(celery_workers.worker(
                env.url, backend_url, transport_options=env.transport_options, conf=conf,
                pool=params["pool"], concurrency=int(params["concurrency"]), queues=[queue],
                ready_timeout=opts.timeout))
        stack.callback(_celery.stop_quickly, [proc])
        rig = _FanoutSetup(_rig_key(params), stack, [proc], app=app, queue=queue,
                   forget=backend.service is not None)
        # Warm-up: every pool child imports, connects and stores a result once.
        n = 2 * int(params["concurrency"])
        _run_shape(rig, "per-object", 1, n, WARM_SLEEPS, time.monotonic() + opts.timeout)
    except BaseException:
        stack.close()
        raise
    return rig


# --------------------------------------------------------------------------- one round
def _run_shape(rig: _FanoutSetup, shape, pages, objects, sleeps, deadline) -> tuple[float, dict]:
    """Run ``shape`` once; (makespan in seconds, the object accounting)."""
    app, procs = rig.app, rig.procs
    t0 = recorder.now_ns()
    head_result = app.send_task(START, args=(shape, pages, objects, sleeps), queue=rig.queue)
    head = _celery.wait(app, [head_result], procs, deadline, f"the {shape} start task")[0]
    seen = [head_result.id]
    if shape == "serial":
        leaves = [head]
    elif shape == "chord":
        seen.append(head["callback"])
        leaves = _celery.wait(app, [head["callback"]], procs, deadline, "the chord body")
    else:
        seen += head["children"]
        leaves = _celery.wait(app, head["children"], procs, deadline,
                              f"{len(head['children'])} page tasks")
        if shape == "per-object":
            ids = [i for page in leaves for i in page["children"]]
            seen += ids
            leaves = _celery.wait(app, ids, procs, deadline, f"{len(ids)} object tasks")
    makespan_ns = max(leaf["end_ns"] for leaf in leaves) - t0
    if rig.forget:
        for task_id in seen:
            app.AsyncResult(task_id).forget()
    stored = [i for leaf in leaves for i in leaf["ids"]]
    expected = set(range(pages * objects))
    got = set(stored) & expected
    counts = {"objects": len(expected), "stored": len(got), "lost": len(expected - got),
              "duplicates": len(stored) - len(set(stored))}
    return makespan_ns / 1e9, counts


@register
class Fanout(Scenario):
    name = "fanout"
    description = DESCRIPTION
    summary = SUMMARY

    def __init__(self, opts):
        super().__init__(opts)
        self.kept = _celery.KeptWorker()
        # Serial makespans (s) per round, rig key and size: the speedup's reference.
        self._serial: dict[tuple, list[float]] = {}

    def cells(self) -> list[dict]:
        opts = self.opts
        pool = opts.pool or "prefork"
        concurrency = opts.concurrency or DEFAULT_CONCURRENCY
        # --transport picks the transports (the quick slice too); else ours and the servers.
        embedded = brokers.embedded()
        transports = opts.transports or \
            ((embedded,) if opts.quick else (embedded, *brokers.servers()))
        pages, objects = SIZE_QUICK if opts.quick else SIZE
        object_ms = round((opts.task_seconds or OBJECT_S) * 1000, 3)
        return [{"transport": t, "backend": backends.for_transport(t).name, "shape": shape,
                 "pool": pool, "concurrency": concurrency, "pages": pages, "objects": objects,
                 "object_ms": object_ms}
                for t in transports for shape in SHAPES]

    def requires(self, params) -> set[str]:
        return brokers.services(params["transport"]) | backends.services(params["backend"])

    def close(self) -> None:
        self.kept.close()

    def run_cell(self, params) -> Outcome:
        opts = self.opts
        shape, pages, objects = params["shape"], int(params["pages"]), int(params["objects"])
        if shape not in SHAPES:
            raise config.UsageError(f"--only shape={shape}: choose from {', '.join(SHAPES)}")
        reason = _celery.unusable(params["transport"])
        if reason:
            raise Skip(reason)
        rounds = ROUNDS_QUICK if opts.quick else ROUNDS
        sleeps = _sleeps(params)
        notes = []
        try:
            rig = self.kept.get(_rig_key(params), lambda: _open_rig(params, opts))
            makespans, counts = [], Counter()
            for _ in range(rounds):
                seconds, tally = _run_shape(rig, shape, pages, objects, sleeps,
                                            time.monotonic() + opts.timeout)
                makespans.append(seconds)
                counts.update(tally)
            base_key = rig.key + (pages, objects, params["object_ms"], self.round)
            if shape == "serial":
                self._serial.setdefault(base_key, []).extend(makespans)
            elif not self._serial.get(base_key):
                seconds, _ = _run_shape(rig, "serial", pages, objects, sleeps,
                                        time.monotonic() + opts.timeout)
                self._serial[base_key] = [seconds]
                notes.append("serial baseline: one round measured inside this cell")
        except BaseException:
            self.kept.close()  # a failed or interrupted cell leaves no worker behind
            raise
        serial_s = statistics.median(self._serial[base_key])
        makespan_s = statistics.median(makespans)
        metrics = {"makespan_s": makespan_s, "speedup": serial_s / makespan_s,
                   "serial_makespan_s": serial_s, "rounds": rounds, **dict(counts)}
        rec = recorder.Recorder()
        rec.add("makespan", [s * 1e6 for s in makespans])
        if counts["lost"] or counts["duplicates"]:
            notes.insert(0, f"{counts['lost']} objects lost, {counts['duplicates']} duplicates")
        return Outcome(metrics, rec.histograms, notes)
