"""Publish rate: the ladder from a raw ``queue.Queue`` to Celery, per transport.

Rungs (cell params ``api`` / ``producer`` / ``method``):

- ``queue``  / ``-``                    / ``put``        the ceiling
- ``kombu``  / held, per-call, new-connection, batch / ``publish``; ``held-confirm`` on
  transports with publisher confirms (``confirm_publish``: publish waits for the broker)
- ``celery`` / default, held            / delay, apply_async, send_task
- ``calibration`` / ``-`` / ``loop``: a fixed pure-Python workload, the same-run yardstick
  of the machine's speed (:mod:`bench.drivers.calibration`)

``retry``: Kombu rungs publish as Kombu's default and the seed's ladder do, a plain
``publish`` (``no``); ``yes`` passes ``retry=True`` with Celery's retry policy, one more
rung (held) in the full matrix, every strategy with ``--only retry=yes``, so the ladder
shows what Kombu's retry wrapper (``Connection.ensure``) costs. Celery rungs keep
Celery's defaults (``task_publish_retry``: ``yes``).

over every transport in :mod:`bench.brokers` (a new broker module joins the
matrix with no change here) and each serializer (JSON unless ``--serializer`` names
others; pickle only then, and only its cell's consumer unpickles). Each cell warms up, publishes
(closed loop, or on a fixed schedule with ``--rate``), then a consumer counts
what arrived: ``lost = sent - received``. Where the transport declares
``cross_process`` the consumer is another process attached before publishing,
so it also records end-to-end latency; otherwise (memory) the cell drains in
this process every ``CHUNK`` messages, outside the timed sections, which keeps
memory flat. Sizing is by time (``--duration``, capped at ``Sizing.cap``
messages) unless ``--messages`` is given, so slow rungs send fewer messages
without taking longer. The body is ``{"data": "xx..."}`` whose JSON is
``payload_bytes`` long (112 by default); Celery sends it as the first task arg.

``cpu_us_per_msg`` (closed loop) is the publishing thread's own CPU time per
message: on a shared machine it is the figure being descheduled cannot inflate.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import brokers, maxrate, pacing, recorder
from ..drivers import calibration as calibration_driver
from ..drivers import celery as celery_driver
from ..drivers import kombu as kombu_driver
from ..drivers import queue as queue_driver
from ..drivers.consumer import ConsumerProcess, Received, Tally
from ..drivers.target import Target
from ..drivers.userapp import broker_label, check_task, load_app
from ..config import UsageError
from . import Outcome, Scenario, Skip, make_payload, payload_bytes, register, unique_name

CHUNK = 50_000            # in-process consumers drain every CHUNK messages (flat memory)
CAL_CHUNK = 1_000         # closed loop: a calibration burst after every CAL_CHUNK messages
CAL_UNITS = 1_000         # units of calibration work a burst does (a few ms)
APP_TRANSPORT = "app"     # the transport param of --app cells


@dataclass(frozen=True)
class Sizing:
    duration: float       # seconds of publishing per cell
    warmup: float         # seconds of warm-up, not counted
    cap: int              # most messages a cell sends (buffers are preallocated to it)


QUICK = Sizing(duration=0.4, warmup=0.1, cap=200_000)
STEP_S = 3.0             # seconds a rate step (--rate-sweep, --max-rate) is held
START_RATE = 1000.0      # where the max-rate search starts climbing
FULL = Sizing(duration=2.0, warmup=0.5, cap=2_000_000)

CELERY_RUNGS = (("delay", "default"), ("apply_async", "default"), ("send_task", "default"),
                ("apply_async", "held"), ("send_task", "held"))
# --quick over our cross-process transports: the Celery rungs that say the most per second.
CELERY_QUICK_REMOTE = (("apply_async", "default"), ("apply_async", "held"))
# --quick over a server: its held Kombu rung and Celery's default, the references.
KOMBU_QUICK_SERVER = ("held",)
# The held producer on a transport with publisher confirms turned on (confirm_publish):
# publish returns once the broker holds the message.
CONFIRM = "held-confirm"
CELERY_QUICK_SERVER = (("apply_async", "default"),)

SUMMARY = [
    ("throughput_per_s", "msg/s"),
    ("publish.p50", "p50 us"),
    ("publish.p99", "p99 us"),
    ("e2e.p50", "e2e p50"),
    ("e2e.p99", "e2e p99"),
    ("from_intended.p99", "p99 intended"),
    ("schedule_lag.p99", "lag p99"),
    ("lost", "lost"),
]


def _cell(api, producer, method, transport, serializer, payload, retry="-") -> dict:
    return {"api": api, "producer": producer, "method": method, "transport": transport,
            "serializer": serializer, "payload_bytes": payload, "retry": retry}


# --------------------------------------------------------------------------- hot loops
now_ns = recorder.now_ns


def _closed_loop(send, start, end, first: int, stop: int, deadline: int) -> int:
    """Publish as fast as possible; only timestamps into preallocated buffers."""
    now = now_ns
    i = first
    try:
        for i in range(first, stop):
            t = now()
            send(i, t)
            e = now()
            start[i] = t
            end[i] = e
            if e > deadline:
                return i + 1
    except Exception as exc:
        exc.returned = i   # the publishes before this one returned (see _GaveUp)
        raise
    return stop


def _paced_loop(send, intended, start, end, pacer, first: int, stop: int) -> int:
    """Publish on the pacer's schedule; the intended time is kept beside the actual one."""
    now, wait = now_ns, pacer.wait
    i = first
    try:
        for i in range(first, stop):
            due = wait(i)
            t = now()
            send(i, t)
            e = now()
            intended[i] = due
            start[i] = t
            end[i] = e
    except Exception as exc:
        exc.returned = i
        raise
    return stop


class _GaveUp(Exception):
    """The transport gave up publishing (back-pressure outlasted its timeout, or the
    broker hung up): ``error`` carries ``undelivered``, how many publishes that had
    returned it lost; ``returned`` publishes had returned in all. Not a failed cell:
    what the consumer did not get is counted as lost."""

    def __init__(self, error, returned: int):
        super().__init__(str(error))
        self.error, self.returned = error, returned


def _gave_up(exc) -> bool:
    """A transport's publish error that counts what it lost (``undelivered``, as
    transports.unix's do): publishing stops there and the loss is measured."""
    return isinstance(getattr(exc, "undelivered", None), int) and hasattr(exc, "returned")


# --------------------------------------------------------------------------- one cell
def _sizing(opts) -> Sizing:
    return QUICK if opts.quick else FULL


def _plan(opts, sizing: Sizing, rate, duration) -> tuple[int, int | None]:
    """(messages to send at most, publishing budget in ns or None)."""
    if opts.messages and not duration:
        return int(opts.messages), None
    duration = duration or opts.duration or sizing.duration
    if rate:
        return max(1, min(sizing.cap, math.ceil(rate * duration))), None
    return sizing.cap, int(duration * 1e9)


def _warmup(driver, seconds: float) -> int:
    """Publish warm-up messages (sequence -1) for ``seconds``; return how many."""
    if seconds <= 0:
        return 0
    sent = 0
    with driver.sending() as send:
        end = now_ns() + int(seconds * 1e9)
        while sent < CHUNK:
            send(-1, now_ns())
            sent += 1
            if now_ns() >= end:
                break
    return sent


def _publish(driver, ts, n: int, budget_ns, pacer, drain_chunk,
             calibrate: bool = False) -> tuple[int, int, int, list]:
    """Send up to ``n`` messages; return (sent, ns spent publishing, CPU ns of this thread,
    calibration pairs).

    The CPU time is what the publisher itself burned: on a shared machine it is the
    figure that being descheduled does not inflate. With ``calibrate`` (closed loop),
    every CAL_CHUNK messages are followed by a burst of the calibration work, outside the
    timed sections: each pair is (publish CPU ns per message, calibration CPU ns per
    unit) measured within milliseconds of each other, so a CPU slowed for a moment (a
    neighbour, the cache, the clock) slows both sides alike.
    """
    cpu0 = time.thread_time_ns()
    calibrate = calibrate and pacer is None
    try:
        return _publish_all(driver, ts, n, budget_ns, pacer, drain_chunk, calibrate, cpu0)
    except Exception as exc:
        if not _gave_up(exc):
            raise
        raise _GaveUp(exc, exc.returned) from None


def _publish_all(driver, ts, n, budget_ns, pacer, drain_chunk, calibrate, cpu0):
    sent = busy = 0
    pairs = []
    try:
        with driver.sending() as send:
            if pacer is not None:
                pacer.start()
            while sent < n:
                stop = min(n, sent + CHUNK) if drain_chunk else n
                if calibrate:
                    stop = min(stop, sent + CAL_CHUNK)
                first = sent
                c0, k0 = now_ns(), time.thread_time_ns()
                if pacer is not None:
                    sent = _paced_loop(send, ts.intended, ts.start, ts.end, pacer, sent, stop)
                else:
                    deadline = c0 + budget_ns - busy if budget_ns else 1 << 62
                    sent = _closed_loop(send, ts.start, ts.end, sent, stop, deadline)
                busy += now_ns() - c0
                if calibrate and sent > first:
                    k1 = time.thread_time_ns()
                    calibration_driver.burst(CAL_UNITS)
                    k2 = time.thread_time_ns()
                    cpu0 += k2 - k1     # the yardstick is not publishing
                    pairs.append(((k1 - k0) / (sent - first), (k2 - k1) / CAL_UNITS))
                if budget_ns and pacer is None and busy >= budget_ns:
                    break
                if drain_chunk and sent < n:
                    d0, w0 = time.thread_time_ns(), now_ns()
                    drain_chunk(sent)   # outside the timed sections
                    cpu0 += time.thread_time_ns() - d0
                    if pacer is not None:
                        pacer.shift(now_ns() - w0)  # our pause is not the system's lateness
            exit_start = now_ns()
    except Exception as exc:
        if not hasattr(exc, "returned"):
            exc.returned = sent   # raised by the batch's flush on exit, or between chunks
        raise
    busy += now_ns() - exit_start   # a batch flushes on exit: that is publishing too
    return sent, busy, time.thread_time_ns() - cpu0, pairs


def _histograms(ts, sent: int, got: Received, rate) -> tuple[dict, str]:
    rec = recorder.Recorder()
    ts.count = sent
    start, end = ts.column("start"), ts.column("end")
    rec.add("publish", (end - start) / 1000.0, at_ns=start)
    e2e_ns = lag_ns = mask = None
    if got.e2e_ns is not None:
        mask = got.seen[:sent].astype(bool)
        e2e_ns = got.e2e_ns[:sent][mask]
        rec.add("e2e", e2e_ns / 1000.0, at_ns=start[mask])
    basis = "receive" if e2e_ns is not None else "publish-return"
    if rate:
        intended = ts.column("intended")
        lag_ns = start - intended
        rec.add("schedule_lag", lag_ns / 1000.0)
        if e2e_ns is not None:  # receive time minus intended = e2e + how late the send left
            rec.add("from_intended", (e2e_ns + lag_ns[mask]) / 1000.0, at_ns=intended[mask])
            rec.add("from_send", e2e_ns / 1000.0)
        else:
            rec.add("from_intended", (end - intended) / 1000.0, at_ns=intended)
            rec.add("from_send", (end - start) / 1000.0)
    return rec.histograms, basis


def _measure(driver, cross_process: bool, opts, workdir: Path, rate: float | None = None,
             duration: float | None = None, slo: maxrate.SLO | None = None) -> Outcome:
    """One repeat of a cell: closed loop, or open loop at ``rate`` for ``duration`` s
    (``slo``: what the rate must keep, :meth:`Scenario.cell_slo`; needed with ``rate``)."""
    sizing = _sizing(opts)
    n, budget_ns = _plan(opts, sizing, rate, duration)
    warm_s = sizing.warmup if opts.warmup is None else opts.warmup
    cols = ("intended", "start", "end") if rate else ("start", "end")
    ts = recorder.Timestamps(n, cols)
    pacer = pacing.Pacer(rate) if rate else None
    consumer = None
    notes = []
    warm_note = None
    gave_up = None
    try:
        if cross_process:
            consumer = ConsumerProcess(driver.consumer_spec(), n, workdir, opts.timeout)
            consumer.start()
            consumer.wait_ready()
        driver.open()
        warm_sent = _warmup(driver, warm_s)
        if consumer is not None:
            warm_got = consumer.warm(warm_sent)
        else:
            wt = Tally(0)
            driver.drain(wt, lambda: wt.warmup >= warm_sent, opts.timeout)
            warm_got = wt.warmup
        if warm_got < warm_sent:
            warm_note = f"warm-up: {warm_sent - warm_got} of {warm_sent} lost"

        tally = None if cross_process else Tally(n)
        if tally is not None:
            tally.foreign = wt.foreign   # foreign messages of the warm-up count too

        def drain_upto(upto: int) -> None:
            driver.drain(tally, lambda: tally.received >= upto, opts.timeout)
        drain_chunk = None if cross_process else drain_upto

        # The calibration loop is its own yardstick; every other closed-loop cell is paired.
        p0 = time.monotonic_ns()
        try:
            sent, busy_ns, cpu_ns, pairs = _publish(driver, ts, n, budget_ns, pacer,
                                                    drain_chunk,
                                                    calibrate=driver.api != "calibration")
        except _GaveUp as stop:
            # The publishes that returned count as sent: what the consumer does not get
            # of them is lost (the transport's own count of those is in `undelivered`).
            sent, busy_ns, cpu_ns, pairs = stop.returned, time.monotonic_ns() - p0, None, []
            gave_up = stop
        t0 = time.monotonic()
        if consumer is not None:
            got = consumer.finish(sent)
            notes += got.notes
        else:
            drain_upto(sent)
            got = Received(**tally.counts())
        drain_s = time.monotonic() - t0
    finally:
        if consumer is not None:
            consumer.stop()
        driver.close()

    histograms, basis = _histograms(ts, sent, got, rate)
    busy_s = busy_ns / 1e9
    # A publish the transport refused (it gave up on it) was asked for and not delivered:
    # it is sent and lost, beside the returned ones the consumer never got.
    attempted = sent + (gave_up is not None)
    lost = attempted - got.received
    metrics = {
        "throughput_per_s": sent / busy_s if busy_s > 0 else 0.0,
        "sent": attempted, "received": got.received, "lost": lost,
        "duplicates": got.duplicates, "foreign": got.foreign, "consumer_errors": got.errors,
        "elapsed_s": round(busy_s, 6),
        # Closed loop only: with --rate the pacer's spin-wait would count as publishing.
        "cpu_us_per_msg": (cpu_ns / 1000.0 / sent if sent and not rate and cpu_ns is not None
                           else None),
        # CPU per message in units of the calibration work done beside it (median of the
        # chunk pairs): the machine's speed factored out, for rules against a baseline.
        "cpu_vs_calibration": statistics.median(p / c for p, c in pairs) if pairs else None,
        "drain_s": round(drain_s, 3), "warmup_sent": warm_sent,
        "consumer": "concurrent process" if cross_process else "in-process after publishing",
    }
    if gave_up is not None:
        undelivered = gave_up.error.undelivered
        metrics["undelivered"] = undelivered
        first = (str(gave_up.error).splitlines() or [""])[0][:300]
        notes.insert(0, f"the transport gave up after {sent} publishes returned"
                        + (f", {undelivered} of them undelivered by its own count"
                           if undelivered else "")
                        + f"; the publish it refused is counted lost: "
                          f"{type(gave_up.error).__name__}: {first}")
    if lost:
        notes.insert(0, f"lost {lost} of {attempted}")
    if warm_note:
        notes.append(warm_note)
    if got.stray:
        notes.append(f"{got.stray} messages with unknown sequence numbers")
    if got.foreign:
        notes.append(f"{got.foreign} foreign messages (not published by this run) counted apart")
    if rate:
        elapsed = (int(ts.column("end")[-1]) - pacer.t0) / 1e9 if sent else 0.0
        rate_metrics = pacing.achieved(rate, sent, elapsed)
        metrics.update(rate_metrics, latency_basis=basis)
        metrics["throughput_per_s"] = rate_metrics["rate_achieved_per_s"]
        if rate_metrics["rate_shortfall"]:
            notes.append(f"achieved {rate_metrics['rate_achieved_per_s']:.0f}/s of "
                         f"{rate:g}/s asked")
        if got.e2e_ns is not None and sent:
            # Backlog: published but not yet received, over the schedule's second half.
            intended = ts.column("intended")
            done = np.full(sent, np.inf)
            seen = got.seen[:sent].astype(bool)
            done[seen] = ts.column("start")[seen] + got.e2e_ns[:sent][seen]
            metrics["backlog_growth_per_s"] = pacing.backlog_growth(
                intended, done, int(intended[sent // 2]), int(ts.column("end")[-1]))
        step = maxrate.judge(maxrate.Step(
            rate, rate_metrics["rate_achieved_per_s"],
            histograms["from_intended"].hist.get_value_at_percentile(slo.percentile),
            metrics.get("backlog_growth_per_s")), slo)
        metrics.update(sustainable=step.ok, slo=slo.text)
        if not step.ok:
            notes.append(f"not sustainable at {rate:,.0f}/s: {step.why}")
    return Outcome(metrics, histograms, notes)


@register
class Publish(Scenario):
    name = "publish"
    description = ("Publish rate and latency: queue.Queue ceiling, Kombu producer strategies, "
                   "Celery delay/apply_async/send_task; every message counted")
    summary = SUMMARY
    rated = True

    def _app(self):
        """The user's app and task for --app/--task (validated: a usage error otherwise)."""
        app = load_app(self.opts.app)
        task = self.opts.task or celery_driver.DEFAULT_TASK
        check_task(app, self.opts.app, task)
        return app, task

    def _kombu(self, strategies, transport, ser, payload) -> list[dict]:
        """Plain publishes; with retry, the held rung again (full matrix), or every
        strategy when the user asks for ``--only retry=yes``."""
        out = [_cell("kombu", s, "publish", transport, ser, payload, "no") for s in strategies]
        info = brokers.declared(transport)
        if info and "confirm" in info.capabilities:  # what waiting for the broker's word costs, beside the pipelined rung
            out.append(_cell("kombu", CONFIRM, "publish", transport, ser, payload, "no"))
        if ("retry", "yes") in self.opts.only:
            out += [_cell("kombu", s, "publish", transport, ser, payload, "yes")
                    for s in strategies]
        elif not self.opts.quick:
            out.append(_cell("kombu", "held", "publish", transport, ser, payload, "yes"))
        return out

    def cells(self) -> list[dict]:
        opts = self.opts
        payload = payload_bytes(opts)
        serializers = tuple(opts.serializers) or ("json",)   # pickle only when asked for
        out = [_cell("queue", "-", "put", brokers.reference() or "-", "-", payload),
               _cell("calibration", "-", "loop", "-", "-", payload)]
        if opts.app:
            app, _ = self._app()
            ser = app.conf.task_serializer
            if ser == "pickle" and "pickle" not in opts.serializers:
                raise UsageError(f"--app {opts.app} serializes tasks with pickle: its cells' "
                                 f"consumer would unpickle what it reads; pass --serializer "
                                 f"pickle to accept that")
            retry = "yes" if app.conf.task_publish_retry else "no"
            out += self._kombu(kombu_driver.STRATEGIES, APP_TRANSPORT, ser, payload)
            out += [_cell("celery", p, m, APP_TRANSPORT, ser, payload, retry)
                    for m, p in CELERY_RUNGS]
            return self._rated(out)
        for transport in brokers.names():
            try:
                info = brokers.info(transport)
            except ImportError:  # listed, so the runner skips it with the reason
                info = brokers.Transport(transport)
            if opts.quick and info.slow:
                continue
            strategies, rungs = kombu_driver.STRATEGIES, CELERY_RUNGS
            if opts.quick and info.service:
                strategies, rungs = KOMBU_QUICK_SERVER, CELERY_QUICK_SERVER
            elif opts.quick and info.cross_process:
                rungs = CELERY_QUICK_REMOTE
            for ser in serializers:
                out += self._kombu(strategies, transport, ser, payload)
                out += [_cell("celery", p, m, transport, ser, payload, "yes") for m, p in rungs]
        return self._rated(out)

    def _rated(self, cells: list[dict]) -> list[dict]:
        """With --rate-sweep / --max-rate, every cell becomes its rate steps (param
        ``rate``) or one search (``rate=max`` and the ``slo``); the calibration loop is
        no publisher and stays out."""
        opts = self.opts
        if not (opts.rate_sweep or opts.max_rate):
            return cells
        return [r for c in cells if c["api"] != "calibration" for r in self.rate_cells(c)]

    def requires(self, params) -> set:
        if params["api"] in ("queue", "calibration") or params["transport"] == APP_TRANSPORT:
            return set()
        return brokers.services(params["transport"])

    def _target(self, params, stack: ExitStack, workdir: Path) -> Target:
        """Where this cell publishes: a bench broker environment, or the --app's broker."""
        opts = self.opts
        if params["transport"] == APP_TRANSPORT:
            app, _ = self._app()
            target = Target.for_app(app, opts.app)
            try:
                with target.connect() as conn:
                    conn.ensure_connection(max_retries=1, timeout=min(opts.timeout, 10.0))
            except Exception as exc:
                raise Skip(f"--app {opts.app}: broker {broker_label(app)} "
                           f"unreachable: {exc}") from None
            return target
        name = params["transport"]
        info = brokers.info(name)  # the runner skips a transport that does not load here
        if params["producer"] == "batch" and not info.supports_batch:
            raise Skip(f"no Producer.batch on {name} (supports_batch=False): it would "
                       f"publish one by one, as held does")
        env = stack.enter_context(brokers.broker(name, workdir))
        if params["producer"] == CONFIRM:
            env = brokers.BrokerEnv(env.url, {**env.transport_options, "confirm_publish": True})
        return Target.from_env(env, info)

    def run_cell(self, params) -> Outcome:
        step_s = self.opts.duration or STEP_S
        slo = self.cell_slo(params)
        return self.by_rate(
            params,
            search=lambda p: self.search_rate(
                p, lambda rate, hold, slo: self._once(p, rate, hold, slo), step_s, START_RATE),
            held=lambda rate: self._once(params, rate, step_s, slo),
            unrated=lambda: self._once(params, self.opts.rate, None, slo))   # --rate, if any

    def _once(self, params, rate, duration, slo) -> Outcome:
        opts = self.opts
        payload = make_payload(int(params["payload_bytes"]))
        with self.cell_folder() as workdir, ExitStack() as stack:
            if params["api"] == "queue":
                return _measure(queue_driver.Publisher(payload), False, opts, workdir,
                                rate, duration, slo)
            if params["api"] == "calibration":
                return _measure(calibration_driver.Publisher(), False, opts, workdir,
                                rate, duration, slo)
            target = self._target(params, stack, workdir)
            if params["producer"] == "batch" and not target.supports_batch:
                raise Skip("no Producer.batch on this broker: it would publish one by one, "
                           "as held does")
            user_app, task = self._app() if params["transport"] == APP_TRANSPORT \
                else (None, None)
            queue_name = unique_name(self.name)
            if params["api"] == "kombu":
                strategy = "held" if params["producer"] == CONFIRM else params["producer"]
                driver = kombu_driver.Publisher(target, queue_name, strategy,
                                                params["serializer"], payload, opts.timeout,
                                                retry=params.get("retry") == "yes")
            else:
                driver = celery_driver.Publisher(
                    target, queue_name, params["method"], params["producer"],
                    params["serializer"], payload, opts.timeout, app=user_app,
                    task_name=task or celery_driver.DEFAULT_TASK)
            outcome = _measure(driver, target.cross_process, opts, workdir, rate, duration,
                               slo)
            if user_app is not None:
                outcome.metrics["broker"] = broker_label(user_app)
            return outcome
