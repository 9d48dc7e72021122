"""Consume rate: how fast Kombu drains a queue, per transport.

A cell declares a unique queue, prefills it with ``N`` messages from the
publish scenario's held Kombu producer (not timed), then a
:class:`kombu.Consumer` in this process, whose callback decodes the body and
acks each message (``ack=yes``, Kombu's default; ``ack=no`` consumes with
``no_ack``), drains it with ``conn.drain_events(timeout=...)`` until every
message arrived. ``consume_per_s`` = received / (first drain call -> last
message received); ``cpu_us_per_msg`` is the draining thread's own CPU time per
message (not inflated by waiting or being descheduled). Every message carries its sequence number, so ``lost``
and ``duplicates`` are counted; ``gap`` is the time between consecutive
receives. A small prefill + drain warms up first, not counted.

A transport whose queue holds nothing until its consumer attaches (broker
``holds_backlog=False``: fifo) cannot be prefilled: the consumer
attaches first and a producer in another process
(:class:`bench.drivers.producer.ProducerProcess`) publishes the ``N``
messages as fast as it can while this process drains, so that cell is bounded
by the producer's rate too (its note says so; ``feed_per_s`` is that rate).

``x_memory`` divides by the in-process reference transport's rate (memory,
:func:`bench.brokers.reference`) measured earlier in the same round (same
serializer, payload and ack): its cells come first.

Sizing: at most 20,000 messages for embedded transports and 2,000 for servers
(``--quick``: every transport not declared ``slow``), 100,000 / 10,000 in the
full matrix (every transport, ``ack`` yes and no); the prefill stops early after
``Sizing.prefill_s`` seconds (slow publishers send fewer: filesystem, redis).
A transport's ``max_backlog`` caps ``N`` where each message costs more as the
backlog grows (filesystem: 2,000). ``--messages`` sets ``N``.
"""
from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import brokers, maxrate, pacing, recorder
from ..drivers import kombu as kombu_driver
from ..drivers.consumer import SETTLE_S, Tally
from ..drivers.producer import ProducerProcess
from ..drivers.target import Target
from ..config import UsageError
from . import Outcome, Scenario, Skip, make_payload, payload_bytes, register, unique_name

FED_NOTE = "fed by a concurrent producer process: bounded by the producer's rate"
POLL_S = 0.05        # one drain_events wait; the whole drain is bounded by opts.timeout
STEP_S = 3.0         # seconds a rate step (--rate-sweep, --max-rate) is held
STEP_WAIT_S = 3.0    # after the schedule, how long a step waits for what is on its way
START_RATE = 1000.0  # where the max-rate search starts climbing


@dataclass(frozen=True)
class Sizing:
    embedded: int        # messages for a transport without a server
    server: int          # messages for redis, amqp
    prefill_s: float     # the prefill stops after this long (slow publishers send fewer)


QUICK = Sizing(embedded=20_000, server=2_000, prefill_s=1.5)
FULL = Sizing(embedded=100_000, server=10_000, prefill_s=5.0)

SUMMARY = [
    ("consume_per_s", "msg/s"),
    ("x_memory", "x memory"),
    ("cpu_us_per_msg", "cpu us/msg"),
    ("gap.p50", "gap p50 us"),
    ("gap.p99", "gap p99 us"),
    ("received", "received"),
    ("lost", "lost"),
    ("duplicates", "dups"),
]


# --------------------------------------------------------------------------- draining
def _numbers(message) -> tuple:
    h = message.headers
    return h["i"], h["t"]


class _Drainer:
    """A Consumer on ``conn`` counting into a Tally, with a receive timestamp per message."""

    def __init__(self, conn, queue, ack: bool, accept, capacity: int, keep_e2e: bool = False):
        self.conn = conn
        self.tally = Tally(capacity, keep_e2e=keep_e2e)
        self.ts = recorder.Timestamps(capacity, ("recv",))
        self.consumer = conn.Consumer([queue], callbacks=[self._callback(ack)], no_ack=not ack,
                                      accept=list(accept))

    def _callback(self, ack: bool):
        take, recv, now, cap = self.tally.take, self.ts.recv, recorder.now_ns, self.ts.capacity
        seen = self._seen = [0]

        def record(message) -> None:
            t = now()
            i = take(_numbers, message, t)
            if i is None:   # foreign: counted apart by the tally
                return
            k = seen[0]
            if k < cap and i >= 0:
                recv[k] = t
                seen[0] = k + 1

        if not ack:
            return lambda body, message: record(message)

        def on_body(body, message):  # kombu decoded the body: a real consumer's cost
            record(message)
            message.ack()
        return on_body

    def __enter__(self):
        self.consumer.consume()
        try:  # one look first: a fifo consumer attaches (holds its pipe) here
            self.conn.drain_events(timeout=0.01)
        except socket.timeout:
            pass
        return self

    def __exit__(self, *exc):
        try:
            self.consumer.cancel()
        except Exception:  # a broken connection: the cell's error says why
            pass

    def got(self) -> int:
        t = self.tally
        return t.received + t.duplicates + t.stray

    def until(self, count: int, warm: bool, timeout: float) -> int:
        """Drain until ``count`` (measured, or warm-up) messages arrived, no message came
        for SETTLE_S, or ``timeout`` s passed. Returns perf_counter_ns of the first call;
        ``cpu_ns`` is then this thread's CPU time spent draining."""
        tally, drain = self.tally, self.conn.drain_events
        progress = (lambda: tally.warmup) if warm else self.got
        settle, deadline = SETTLE_S, time.monotonic() + timeout
        last = time.monotonic()
        cpu0 = time.thread_time_ns()
        t0 = recorder.now_ns()
        while progress() < count:
            before = progress()
            try:
                drain(timeout=POLL_S)
            except socket.timeout:
                pass
            now = time.monotonic()
            if progress() != before:
                last = now
            elif now - last > settle or now > deadline:
                break
        self.cpu_ns = time.thread_time_ns() - cpu0
        return t0

    def receive_times(self):
        self.ts.count = self._seen[0]
        return self.ts.column("recv")


def _measure_paced(driver, target, n: int, ack: bool, rate: float, seconds: float, opts,
                   workdir: Path, slo: maxrate.SLO) -> Outcome:
    """Drain while a producer process publishes at ``rate`` (open loop): latency from
    each message's intended send time to its receipt, and how the backlog moved."""
    warm_n = max(10, round(rate * min(1.0, seconds / 4)))
    producer = None
    try:
        driver.open()
        drainer = _Drainer(driver.conn, driver.queue, ack, driver.accept, n, keep_e2e=True)
        with drainer:  # the consumer first: a fifo keeps nothing for a queue nobody reads
            producer = ProducerProcess(target, driver.queue.name, driver.serializer,
                                       driver.payload, workdir, opts.timeout)
            producer.start()
            producer.wait_ready()
            producer.pace(-1, warm_n, rate)
            drainer.until(warm_n, True, opts.timeout)
            producer.wait_paced(opts.timeout)
            producer.pace(0, n, rate)
            # Wait for the schedule, then a bounded while for what is still on its way.
            drainer.until(n, False, seconds + STEP_WAIT_S)
            sent, spent, t0 = producer.wait_paced(opts.timeout)
            drainer.until(n, False, 0.2)
    finally:
        if producer is not None:
            producer.stop()
        driver.close()
    tally = drainer.tally
    period = 1e9 / rate
    intended = t0 + (np.arange(sent) * period).astype(np.int64)   # as the Pacer schedules
    seen = np.frombuffer(tally.seen, dtype=np.uint8)[:sent].astype(bool)
    e2e = np.frombuffer(tally.e2e, dtype=np.int64)[:sent]
    done = np.where(seen, intended + e2e, np.inf)
    waited_until = recorder.now_ns()
    # A message not received when the step stopped waiting counts at that wait.
    latency = np.where(seen, e2e, waited_until - intended)
    rec = recorder.Recorder()
    hist = rec.add("from_intended", latency / 1000.0, at_ns=intended).hist
    elapsed = spent + 1 / rate
    growth = pacing.backlog_growth(intended, done, int(intended[sent // 2]),
                                   int(intended[-1]))
    step = maxrate.judge(maxrate.Step(rate, sent / elapsed,
                                      hist.get_value_at_percentile(slo.percentile),
                                      growth, seconds), slo)
    lost = sent - tally.received
    metrics = {"consume_per_s": tally.received / elapsed, "sent": sent,
               "received": tally.received, "lost": lost, "duplicates": tally.duplicates,
               **pacing.achieved(rate, sent, elapsed), "backlog_growth_per_s": growth,
               "sustainable": step.ok, "slo": slo.text, "load": "paced"}
    notes = [f"lost {lost} of {sent} (or not received {STEP_WAIT_S:g} s after the schedule)"] \
        if lost else []
    if not step.ok:
        notes.append(f"not sustainable at {rate:,.0f}/s: {step.why}")
    return Outcome(metrics, rec.histograms, notes)


# --------------------------------------------------------------------------- one cell
def _sizing(opts) -> Sizing:
    return QUICK if opts.quick else FULL


def _count(info: brokers.Transport, opts) -> int:
    if opts.messages:
        return int(opts.messages)
    sizing = _sizing(opts)
    n = sizing.server if info.service else sizing.embedded
    limit = info.max_backlog   # filesystem: its drain is quadratic in the backlog
    return min(n, limit) if limit else n


def _prefill(driver, first: int, n: int, budget_s: float | None) -> int:
    """Publish ``n`` messages (sequence numbers from ``first``; -1 = warm-up) with the held
    producer; stop early after ``budget_s``. Returns how many were sent."""
    now = recorder.now_ns
    end = now() + int(budget_s * 1e9) if budget_s else 1 << 62
    sent = 0
    with driver.sending() as send:
        for k in range(n):
            t = now()
            send(-1 if first < 0 else first + k, t)
            sent += 1
            if t > end:
                break
    return sent


def _measure(driver, target, holds_backlog: bool, n: int, ack: bool, opts,
             workdir: Path) -> Outcome:
    warm_n = max(50, n // 20)
    notes = []
    producer = None
    feed_s = None
    try:
        driver.open()
        drainer = _Drainer(driver.conn, driver.queue, ack, driver.accept, n)
        if holds_backlog:
            warm_sent = _prefill(driver, -1, warm_n, None)
            with drainer:
                drainer.until(warm_sent, True, opts.timeout)
            # --messages asks for exactly N; otherwise slow publishers send fewer in time.
            sent = _prefill(driver, 0, n, None if opts.messages else _sizing(opts).prefill_s)
            with drainer:
                t0 = drainer.until(sent, False, opts.timeout)
        else:
            with drainer:  # the consumer first: nothing is kept for a queue nobody reads
                producer = ProducerProcess(target, driver.queue.name, driver.serializer,
                                           driver.payload, workdir, opts.timeout)
                producer.start()
                producer.wait_ready()
                producer.send(-1, warm_n)
                drainer.until(warm_n, True, opts.timeout)
                warm_sent, _ = producer.wait_sent()
                producer.send(0, n)
                t0 = drainer.until(n, False, opts.timeout)
                sent, feed_s = producer.wait_sent()
            notes.append(FED_NOTE)
    finally:
        if producer is not None:
            producer.stop()
        driver.close()

    tally = drainer.tally
    recv = drainer.receive_times()
    elapsed_s = (int(recv[-1]) - t0) / 1e9 if len(recv) else 0.0
    rec = recorder.Recorder()
    rec.add("gap", (recv[1:] - recv[:-1]) / 1000.0)
    lost = sent - tally.received
    if lost:
        notes.insert(0, f"lost {lost} of {sent}")
    if tally.warmup < warm_sent:
        notes.append(f"warm-up: {warm_sent - tally.warmup} of {warm_sent} lost")
    if tally.stray:
        notes.append(f"{tally.stray} messages with unknown sequence numbers")
    if tally.foreign:
        notes.append(f"{tally.foreign} foreign messages (not published by this run) counted apart")
    metrics = {
        "consume_per_s": tally.received / elapsed_s if elapsed_s > 0 else 0.0,
        "sent": sent, "received": tally.received, "lost": lost,
        "duplicates": tally.duplicates, "foreign": tally.foreign,
        "elapsed_s": round(elapsed_s, 6),
        # This thread's CPU per message while draining: waiting (for a producer, or
        # descheduled on a shared machine) does not count, so it compares fed and prefilled.
        "cpu_us_per_msg": drainer.cpu_ns / 1000.0 / tally.received if tally.received else None,
        "warmup_sent": warm_sent,
        "load": "prefilled" if holds_backlog else "fed",
    }
    if feed_s:
        metrics["feed_per_s"] = sent / feed_s
    return Outcome(metrics, rec.histograms, notes)


@register
class Consume(Scenario):
    name = "consume"
    description = ("Consume (drain) rate per transport: a prefilled queue drained by a Kombu "
                   "Consumer in this process (callback decodes and acks), drain_events in a "
                   "loop; consume/s from the first drain call to the last message; every "
                   "message counted; a transport that holds no backlog (fifo) is fed by a "
                   "concurrent producer process")
    summary = SUMMARY
    rated = True

    def __init__(self, opts):
        super().__init__(opts)
        # The reference transport's rate per (round, serializer, payload, ack).
        self._reference_rates: dict[tuple, float] = {}

    def cells(self) -> list[dict]:
        opts = self.opts
        payload = payload_bytes(opts)
        serializers = tuple(opts.serializers) or ("json",)
        transports = [t.name for t in brokers.available() if not (opts.quick and t.slow)] \
            if opts.quick else list(brokers.names())
        acks = ("yes",) if opts.quick else ("yes", "no")
        # The reference (memory) first in brokers' order: x_memory needs its rate already.
        out = [{"transport": t, "serializer": s, "payload_bytes": payload, "ack": a}
               for a in acks for s in serializers for t in transports]
        if not (opts.rate_sweep or opts.max_rate):
            return out
        # Rate cells: a producer process feeds the queue at each rate (not in-process ones).
        rated = []
        for c in out:
            try:
                if not brokers.info(c["transport"]).cross_process:
                    continue
            except ImportError:
                pass
            rated += self.rate_cells(c)
        return rated

    def _ratio(self, metrics: dict, params) -> None:
        rate = metrics.get("consume_per_s")
        reference = brokers.reference()
        if not rate or reference is None:
            return
        # Paired with the reference cell of the same round.
        key = (self.round, params["serializer"], int(params["payload_bytes"]), params["ack"])
        if params["transport"] == reference:
            self._reference_rates[key] = rate
            metrics[f"x_{reference}"] = 1.0
        elif key in self._reference_rates:
            metrics[f"x_{reference}"] = rate / self._reference_rates[key]

    def run_cell(self, params) -> Outcome:
        step_s = self.opts.duration or STEP_S
        return self.by_rate(
            params,
            search=lambda p: self.search_rate(
                p, lambda rate, hold, slo: self._once(p, rate, hold, slo), step_s, START_RATE),
            held=lambda rate: self._once(params, rate, step_s, self.cell_slo(params)),
            unrated=lambda: self._once(params, None, None, None))   # closed loop

    def _once(self, params, rate, seconds, slo) -> Outcome:
        name = params["transport"]
        info = brokers.info(name)  # the runner skips a transport that does not load here
        if params["ack"] not in ("yes", "no"):
            raise UsageError(f"--only ack={params['ack']}: expected yes or no")
        if rate and not info.cross_process:
            raise Skip(f"{name} is in-process: no producer process can feed it at a rate")
        payload = make_payload(int(params["payload_bytes"]))
        with self.cell_folder() as workdir, ExitStack() as stack:
            env = stack.enter_context(brokers.broker(name, workdir))
            target = Target.from_env(env, info)
            driver = kombu_driver.Publisher(target, unique_name(self.name), "held",
                                            params["serializer"], payload, self.opts.timeout)
            if rate:
                return _measure_paced(driver, target, max(1, round(rate * seconds)),
                                      params["ack"] == "yes", rate, seconds, self.opts,
                                      workdir, slo)
            outcome = _measure(driver, target, info.holds_backlog, _count(info, self.opts),
                               params["ack"] == "yes", self.opts, workdir)
        self._ratio(outcome.metrics, params)
        return outcome
