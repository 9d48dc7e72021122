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
``schedule_lag`` = how late the sender was, ``queue_wait`` (what ``--slo`` and
``--max-rate`` judge) = ``publish_to_start`` less the harness's own lateness (from when
it could send, the intended time or the previous publish call's return if later, to
when it did): the system's back pressure kept.

``--only hooks=on|off``: each throughput cell twice, with the waterfall's hooks
(:mod:`bench.worker_stamps`, always loaded otherwise) and without (Celery's default
strategy, no signal handlers): what the hooks cost the worker (``compare --by hooks``).

``mode=roundtrip`` (asked for with ``--only mode=roundtrip``): a latency cell whose
tasks store their results (``backend``: Redis when it answers, else SQLite) and a
caller thread waits for each with ``AsyncResult.get`` in send order, so the
waterfall's last stages are real: *stored* is ``task_success`` (after the backend
write), *in hand* when the caller's ``get`` returned it. With ``--max-rate`` or
``--rate-sweep`` it is a search (or ladder) cell beside the latency one; the search still
judges ``queue_wait``.

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

import os
from itertools import count

import numpy as np

from .. import (backends, brokers, maxrate, pacing, placement, recorder, waterfall,
               worker_stamps)
from . import Outcome, Scenario, Skip, _celery, register
from . import worker_rig
from .worker_rig import TASK

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

MODES = ("throughput", "latency", "roundtrip")
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
# Rate steps (--rate-sweep, --max-rate): seconds held, warm-up first, and how long after the
# last send a step waits for its tasks to start (longer means the rate was not sustained).
STEP_S, STEP_S_QUICK = 5.0, 2.0
STEP_WARM_S, STEP_WARM_S_QUICK = 1.0, 0.5
STEP_WAIT_S = 3.0
START_RATE = 100.0         # where the max-rate search starts climbing

SUMMARY = [
    ("tasks_per_s", "tasks/s"),
    # x_<server>: this rate over that server transport's, same round (amqp, redis).
    *[(f"x_{name}", f"x {name}") for name in brokers.servers()],
    ("lost", "lost"),
    ("stall_s", "stalled s"),
    ("publish_to_start.p50", "pub-start p50 us"),
    ("publish_to_start.p99", "pub-start p99 us"),
    ("queue_wait.p99", "queue wait p99 us"),
    ("sent", "sent"),
]


# --------------------------------------------------------------------------- waterfall
def _waterfall(rec: recorder.Recorder, ts: recorder.Timestamps, ran: np.ndarray,
               stamp_rows: np.ndarray, first: int, in_hand: np.ndarray | None = None) -> dict:
    """The stage waterfall (:mod:`bench.waterfall`) of the tasks from index ``first`` on
    that have every stamp: the harness's send times (``ts``), the tick rows (``ran``: the
    body's end) and :mod:`bench.worker_stamps`' rows (the worker's main process and pool
    child, each with when the harness read it). ``in_hand``: when a waiting caller had
    each result (roundtrip cells), else the harness's read of the child's record."""
    total = ts.count
    cols = {name: np.full(total, -1, dtype=np.int64) for name in waterfall.POINTS}
    cols["intended"][:] = ts.column("intended")
    cols["returned"][:] = ts.column("returned")
    cols["finished"][ran[:, 1]] = ran[:, 3]
    for kind, names in ((worker_stamps.CHILD, ("started", "stored", None, "in_hand")),
                        (worker_stamps.MAIN, ("taken", "handed", None, None))):
        rows = stamp_rows[stamp_rows[:, 0] == kind]
        rows = rows[(rows[:, 2] >= 0) & (rows[:, 2] < total)]
        # a redelivered task's first record counts, as its first run does (first_runs)
        _, first_row = np.unique(rows[:, 2], return_index=True)
        rows = rows[first_row]
        for col, name in zip((3, 4, 5, 6), names):
            if name:
                cols[name][rows[:, 2]] = rows[:, col]
    if in_hand is not None:
        cols["in_hand"][:] = in_hand
    have = np.all([v >= 0 for v in cols.values()], axis=0)
    have[:first] = False
    out = waterfall.record(rec, {k: v[have] for k, v in cols.items()})
    out["waterfall_in_hand"] = waterfall.IN_HAND["caller" if in_hand is not None else "read"]
    return out


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
        # --cpus: this (publishing) process is pinned now, the others as they start.
        self.placement = placement.Placement(
            placement.parse_cpus(opts.cpus) if getattr(opts, "cpus", None) else {})
        self.placement.pin("publisher", [os.getpid()])

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
        roundtrip = any(k == "mode" and "roundtrip" in v.split("|") for k, v in opts.only)
        if opts.rate_sweep or opts.max_rate:
            # Rate cells only: a ladder of held rates, or the search for the highest one;
            # with --only mode=roundtrip also with results stored and a caller waiting.
            step_s = opts.duration or (STEP_S_QUICK if opts.quick else STEP_S)
            for transport in self._transports():
                for pool in pools:
                    modes = [{"mode": "latency"}]
                    if roundtrip:
                        modes.append({"mode": "roundtrip",
                                      "backend": backends.fastest_reachable(transport).name})
                    for mode in modes:
                        base = {"transport": transport, "pool": pool,
                                "concurrency": 1 if pool == "solo" else concurrency, **mode}
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
        # --only hooks=...: throughput with the waterfall's hooks and without, side by side
        hooks = ("on", "off") if any(k == "hooks" for k, _ in opts.only) else (None,)
        # The quick slice runs prefork only: the pool the servers' references use.
        for transport in self._transports():
            for pool in pools:
                c = 1 if pool == "solo" else concurrency
                base = {"transport": transport, "pool": pool, "concurrency": c}
                out += [{**base, "mode": "throughput", "tasks": tasks, "rate": "-",
                         **({"hooks": h} if h else {})} for h in hooks]
                out.append({**base, "mode": "latency", "tasks": paced, "rate": rate})
                if roundtrip:
                    out.append({**base, "mode": "roundtrip", "tasks": paced, "rate": rate,
                                "backend": backends.fastest_reachable(transport).name})
        return out

    def close(self) -> None:
        self.kept.close()

    def _running_rig(self, params) -> worker_rig.MeasuredWorker:
        """The kept worker when it fits this cell, else a new one."""
        def open_rig():
            rig = worker_rig.open_rig(params, self.opts)
            try:
                self.placement.pin_broker(str(rig.ticks.folder.parent))
                worker_rig.start_worker(rig, params, self.opts)
                self.placement.pin_worker(rig.procs[0].pid)
            except BaseException:
                rig.close()
                raise
            return rig
        return self.kept.get(worker_rig.rig_key(params), open_rig)

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
                worker_rig.paced(rig, warm, WARMUP_FED, RATE)
                worker_rig.require_all(rig, warm, WARMUP_FED, opts, "warm-up tasks")
                rig.warm = True
            messages = worker_rig.build_messages(rig.app, run, n)
            sent = np.zeros(n, dtype=np.int64)
            try:
                publish_rate = worker_rig.publish_all(rig, messages, sent)
            except worker_rig.PublishStopped as exc:
                rig.clean = False
                rig.ticks.poll()
                raise RuntimeError(
                    f"the worker stopped taking tasks ({rig.ticks.count(run)} of "
                    f"{exc.published} published had run) and the publisher gave up: "
                    f"{exc}") from None
        else:
            # The backlog must be in place before a worker reads the queue: a fresh one.
            self.kept.close()
            rig = self.kept.rig = worker_rig.open_rig(params, opts)
            self.placement.pin_broker(str(rig.ticks.folder.parent))
            warm_n = max(100, int(n * WARMUP_FRACTION))
            warm = next(self._runs)
            worker_rig.publish_all(rig, worker_rig.build_messages(rig.app, warm, warm_n))
            publish_rate = worker_rig.publish_all(rig, worker_rig.build_messages(rig.app, run, n))
            sent = None
            worker_rig.start_worker(rig, params, opts)
            self.placement.pin_worker(rig.procs[0].pid)
            worker_rig.require_all(rig, warm, warm_n, opts, "warm-up tasks")
            rig.warm = True
        rows, why = worker_rig.collect(rig, run, n, opts, "tasks")
        ran, duplicates = worker_rig.first_runs(rows, n)
        metrics = {"load": "fed" if fed else "prefilled", **worker_rig.counts(n, ran, duplicates),
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
                metrics["min_backlog"] = worker_rig.min_backlog(sent, starts)
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
        messages = worker_rig.build_messages(rig.app, run, total, store=bool(rig.backend))
        ts = recorder.Timestamps(total, ("intended", "sent", "returned"))
        wait_s = max(STEP_WAIT_S, seconds)
        caller = worker_rig.Caller(rig.app, messages, wait_s) if rig.backend else None
        if caller:
            caller.start()
        worker_rig.paced_prebuilt(rig, messages, rate, ts)
        del messages
        rows, why = worker_rig.collect(rig, run, total, opts, "tasks", wait_s=wait_s,
                                       stamps=True)
        waited_until = recorder.now_ns()
        in_hand = caller.finish(wait_s) if caller else None
        ran, duplicates = worker_rig.first_runs(rows, total)
        purged = ran_after = 0
        if len(ran) < total:
            purged, ran_after = worker_rig.purge(rig, run)
        stamp_rows = worker_rig.take_stamps(rig, run, len(ran))
        rig.warm = True
        intended, sent = ts.column("intended"), ts.column("sent")
        start = np.full(total, np.inf)
        start[ran[:, 1]] = ran[:, 2]
        m = slice(n_warm, total)
        started = np.isfinite(start[m])
        waits = np.where(started, start[m] - intended[m], waited_until - intended[m])
        rec = recorder.Recorder()
        rec.add("publish_to_start", waits / 1000.0, at_ns=intended[m])
        rec.add("from_send", (start[m][started] - sent[m][started]) / 1000.0,
                at_ns=intended[m][started])
        rec.add("schedule_lag", (sent[m] - intended[m]) / 1000.0, at_ns=intended[m])
        # The SLO's wait: from the intended send time, less the harness's own lateness
        # (its timer waking late on a busy machine: from when it could send, the intended
        # time or the previous publish call's return if later, to when it did). The
        # system's back pressure (a publish call returning late) still counts.
        could = np.maximum(intended, np.r_[intended[:1], ts.column("returned")[:-1]])
        own_lateness = sent - could
        queue_wait = np.where(started, start[m], waited_until) - intended[m] - own_lateness[m]
        slo_hist = rec.add("queue_wait", queue_wait / 1000.0, at_ns=intended[m]).hist
        stages = _waterfall(rec, ts, ran, stamp_rows, n_warm, in_hand)
        elapsed = (int(sent[-1]) - int(intended[n_warm])) / 1e9 + 1 / rate
        growth = pacing.backlog_growth(sent, start, int(intended[n_warm + n // 2]),
                                       int(sent[-1]))
        pending = total - len(ran)
        step = maxrate.judge(maxrate.Step(
            rate, n / elapsed, slo_hist.get_value_at_percentile(slo.percentile) if n else None,
            growth, seconds), slo)
        metrics = {"sent": n, "received": int(started.sum()), "pending": int(n - started.sum()),
                   # a task neither run, nor purged, nor run after the purge: gone
                   "lost": max(0, pending - purged - ran_after), "duplicates": duplicates,
                   **pacing.achieved(rate, n, elapsed), "backlog_growth_per_s": growth,
                   "sustainable": step.ok, "slo": slo.text, **stages}
        notes = [why] if why else []
        if caller and caller.error:
            notes.append(caller.error)
        left_out = int(started.sum()) - stages.get("waterfall_tasks", 0)
        if left_out:
            notes.append(f"{left_out} started tasks are not in the waterfall (a stamp missing "
                         f"or out of order)")
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
            opts.rate or START_RATE, seconds, "queue_wait", "tasks/s")

    # ----------------------------------------------------------------------- one cell
    def run_cell(self, params) -> Outcome:
        mode = params["mode"]
        if mode not in MODES:
            raise Skip(f"mode {mode!r} is not one of {', '.join(MODES)}")
        reason = _celery.unusable(params["transport"])
        if reason:
            raise Skip(reason)
        before = placement.CpuSample()
        try:
            if mode == "throughput":
                out = self._throughput(params)
            else:   # latency, roundtrip: held rates; roundtrip with a caller waiting
                out = self.by_rate(params, self._max_rate, lambda rate: self._latency(params),
                                   lambda: self._latency(params))
        except BaseException:
            self.kept.close()  # a failed or interrupted cell leaves no worker behind
            raise
        # Where it ran and how busy the (shared) machine was meanwhile: per cell, per round.
        out.metrics.update(placement.CpuSample().since(before))
        out.metrics["placement"] = self.placement.record(
            bool(brokers.info(params["transport"]).service))
        if self.kept.rig is not None and not self.kept.rig.clean:
            self.kept.close()
        return out
