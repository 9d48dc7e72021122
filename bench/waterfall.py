"""Where a task's time goes: the stage waterfall, from per-task timestamps to one
HdrHistogram per stage.

Eight points per task, in order; a stage runs from one point to the next, so the stages
of a task add up to its total (intended send -> result in the caller's hand):

    intended   the pacer's intended send time                         harness
    returned   the publish call returned (or the worker took the      harness
               message, if that came first: the stage never runs back)
    taken      Celery's consumer got the message off the broker       worker main (Strategy)
    handed     Celery handed the request to the pool                  worker main (on_task_request)
    started    ``task_prerun``                                        pool child
    finished   the task body returned                                 pool child (the task)
    stored     ``task_success`` (after ``backend.mark_as_done``: the  pool child
               result written; nothing written with ignore_result;
               or the caller had it, if that came first)
    in_hand    the caller's ``AsyncResult.get`` returned the result   harness
               (no caller waiting: when the harness read the record)

Every point is ``time.perf_counter_ns()``, CLOCK_MONOTONIC: one clock for all the
processes of one host (no cross-host stage here). :func:`stages` is public so other
callers (Locust's TaskRoundTrip) can hand it their own points.
"""
from __future__ import annotations

import numpy as np

from .recorder import HIGHEST_US, LOWEST_US, Recorder

POINTS = ("intended", "returned", "taken", "handed", "started", "finished", "stored",
          "in_hand")
STAGES = ("publish", "broker", "worker", "pool", "run", "store", "fetch")
TO_START = STAGES[:4]          # intended send -> task_prerun: the queue wait, split
WHAT = {
    "publish": "intended send -> publish call returned (schedule lag included)",
    "broker": "publish returned -> taken off the broker by the worker's consumer",
    "worker": "taken -> handed to the pool (Request built, task_received, prefetch)",
    "pool": "handed -> task_prerun in the pool child (pool pipe, free child)",
    "run": "task_prerun -> task body returned",
    "store": "body returned -> task_success, after backend.mark_as_done returned (the "
             "result written; with ignore_result nothing is written: Celery's bookkeeping)",
    "fetch": "task_success -> the result in the caller's hand (AsyncResult.get returned); "
             "with no caller waiting, when the harness read the task's record (the worker "
             "scenario reads records only after a step's last send, so as not to compete "
             "with its own sender: there this stage is the harness's wait, not Celery's)",
}
IN_HAND = {"caller": "a caller's AsyncResult.get returned the stored result",
           "read": "no caller waits (results ignored): the harness read the task's record"}
CLOCK = ("CLOCK_MONOTONIC (time.perf_counter_ns), one host: intended, returned, in_hand "
         "in the harness; taken, handed in the worker's main process; started, finished, "
         "stored in the pool child")
PREFIX = "waterfall."          # histogram names: waterfall.<stage>, waterfall.total
SUM_TOLERANCE = 0.01           # stages (as recorded, in us) vs total, per task


def stages(points: dict) -> tuple[dict, np.ndarray]:
    """``{stage: ns array}`` and the total (ns) from ``{point: ns array}`` (same length,
    one entry per task). A negative stage means two processes disagree on order: a
    missing stamp or a clock bug; :func:`record` counts such tasks and leaves them out."""
    p = {k: np.asarray(points[k], dtype=np.int64) for k in POINTS}
    # A worker can take a message before the publish call returned, and a caller can have
    # a result before the child's write call returned: the earlier point ends the stage.
    marks = [p["intended"], np.minimum(p["returned"], p["taken"]), *(p[k] for k in POINTS[2:6]),
             np.minimum(p["stored"], p["in_hand"]), p["in_hand"]]
    out = {name: marks[i + 1] - marks[i] for i, name in enumerate(STAGES)}
    return out, p["in_hand"] - p["intended"]


def one_round_trip(t0: int, t1: int, taken: int, handed: int, start: int, end: int,
                   t2: int, stored: int | None = None) -> list:
    """``[(stage, ns)]`` of one round trip timed by its caller (Locust's TaskRoundTrip),
    every point on one clock: ``t0`` intended (the publish start), ``t1`` the publish call
    returned, ``t2`` the result in hand. The stages are :data:`STAGES` with the same rules
    as :func:`stages` (the earlier point ends a stage: taken before ``t1``, in hand before
    ``stored``); without ``stored`` (the child's reading not known here) one ``result``
    stage stands for ``store`` and ``fetch``. They add up to ``t2 - t0`` exactly. Readings
    out of order (two hosts' clocks an offset error apart) give a negative stage, which the
    caller's recorder leaves out and counts: the round trip is still in every other stage."""
    points = [t0, min(t1, taken), taken, handed, start, end]
    names = list(STAGES[:5])
    if stored is None:
        names.append("result")
    else:
        names += ["store", "fetch"]
        points.append(min(stored, t2))
    points.append(t2)
    return [(name, b - a) for name, a, b in zip(names, points, points[1:])]


def record(rec: Recorder, points: dict) -> dict:
    """One histogram per stage (``waterfall.<stage>``, us) and ``waterfall.total`` into
    ``rec``; returns the metrics: tasks in the waterfall, tasks left out (a stage out of
    order), each stage's mean (``waterfall.<stage>.mean_us``: means add up, percentiles
    do not), the worst per-task gap between the recorded stages' sum and the total, and
    the clock."""
    per, total = stages(points)
    good = np.ones(len(total), dtype=bool)
    for v in per.values():
        good &= v >= 0
    # As the histograms hold them: whole us, at least 1 us (HdrHistogram's floor here).
    us = {name: np.clip(np.rint(v[good] / 1000.0), LOWEST_US, HIGHEST_US)
          for name, v in per.items()}
    total_us = total[good] / 1000.0
    for name in STAGES:
        rec.add(PREFIX + name, us[name])
    rec.add(PREFIX + "total", total_us)
    metrics = {"waterfall_tasks": int(good.sum()), "waterfall_out_of_order": int((~good).sum()),
               "waterfall_clock": CLOCK}
    if good.any():
        for name in STAGES:
            metrics[f"{PREFIX}{name}.mean_us"] = float(us[name].mean())
        metrics["waterfall_sum_error"] = sum_error(us, total_us)
    return metrics


def sum_error(stages_us: dict, total_us) -> float:
    """The largest per-task |sum of stages - total| / total."""
    total = np.asarray(total_us, dtype=np.float64)
    summed = np.sum([np.asarray(v, dtype=np.float64) for v in stages_us.values()], axis=0)
    return float(np.max(np.abs(summed - total) / np.maximum(total, 1.0))) if total.size else 0.0
