"""Kombu driver: publish with a producer strategy, consume and count.

Strategies (``producer`` cell param):

- ``held``            one :class:`kombu.Producer` on one channel for the whole loop
- ``per-call``        ``kombu.pools.producers[connection].acquire()`` around every publish
- ``new-connection``  a new :class:`kombu.Connection` (and producer) for every message
- ``batch``           ``Producer.batch()`` (Kombu 5.7) around the loop; only transports
                      whose channel implements it really batch (redis, our unix). On
                      redis each publish through a named exchange still reads the
                      routing table (SMEMBERS) unbatched: only the LPUSH is batched.

Producers are built with Kombu's defaults (``auto_declare``: every publish passes
its exchange to ``maybe_declare``, answered from a per-connection cache) and every
publish passes ``retry=True`` with Celery's default ``task_publish_retry_policy``
(3 retries), as Celery does: the Kombu and Celery rungs then differ only by what
Celery adds, and a broker that dies fails the cell instead of retrying forever.

A message carries its sequence number ``i`` and its send time ``t``
(``perf_counter_ns``, one clock for the whole host) in two headers; warm-up
messages carry ``i = -1``. Consumers never decode the body for Kombu messages.

This module also holds the consumer used by every API: :func:`drain` in this
process, or :class:`ConsumerProcess`, which runs ``python -m bench.drivers.kombu``
so a cross-process transport has a consumer attached while the publisher runs.
"""
from __future__ import annotations

import importlib
import json
import os
import queue as queue_mod
import socket
import subprocess
import sys
import threading
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kombu import Connection, Exchange, Producer, Queue
from kombu import pools

STRATEGIES = ("held", "per-call", "new-connection", "batch")
CONSUMER_POLL_S = 0.02    # a consumer's drain_events timeout: how often it looks at its orders
# Celery's default task_publish_retry_policy: bounded, unlike retry=True alone.
RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}
# After the last expected message, drain this long more so a late duplicate is counted.
GRACE_S = 0.1
SETTLE_S = 2.0            # once all is sent, a consumer stops after this long without a message
STOP_GRACE_S = 0.5        # how long a consumer process may take to close before SIGTERM
MAX_ERRORS = 1000         # a consumer process gives up after this many receive errors
FORMAT = "bench.drivers.kombu:extract"

now_ns = time.perf_counter_ns


# --------------------------------------------------------------------------- where messages go
@dataclass
class Target:
    """How to reach a broker here, and how another process rebuilds the same connection."""
    connect: Callable[[], Connection]
    spec: dict                       # {"url", "transport_options"} or {"app": "module:attr"}
    cross_process: bool = True
    supports_batch: bool = False

    @classmethod
    def from_env(cls, env, cross_process: bool, supports_batch: bool) -> "Target":
        """From a :class:`bench.brokers.BrokerEnv` and its broker module's attributes."""
        url, opts = env.url, dict(env.transport_options)
        return cls(lambda: Connection(url, transport_options=dict(opts)),
                   {"url": url, "transport_options": opts},
                   cross_process=cross_process, supports_batch=supports_batch)


def target_connection(spec: dict) -> Connection:
    """A connection built from a :class:`Target` spec (in a consumer process)."""
    if spec.get("app"):
        from .celery import load_app

        return load_app(spec["app"]).connection_for_read()
    return Connection(spec["url"], transport_options=dict(spec.get("transport_options") or {}))


def queue_spec(q: Queue) -> dict:
    """A Queue as plain JSON, so a consumer process declares exactly the same one."""
    ex = q.exchange
    return {"name": q.name, "routing_key": q.routing_key, "durable": q.durable,
            "auto_delete": q.auto_delete, "queue_arguments": q.queue_arguments,
            "exchange": ex.name if ex is not None else "",
            "exchange_type": ex.type if ex is not None else "direct",
            "exchange_durable": ex.durable if ex is not None else True,
            "exchange_auto_delete": ex.auto_delete if ex is not None else False}


def queue_from_spec(d: dict) -> Queue:
    ex = Exchange(d["exchange"], d["exchange_type"], durable=d["exchange_durable"],
                  auto_delete=d["exchange_auto_delete"])
    return Queue(d["name"], ex, routing_key=d["routing_key"], durable=d["durable"],
                 auto_delete=d["auto_delete"], queue_arguments=d["queue_arguments"])


def delete_queue(connect: Callable[[], Connection], q: Queue, delete_exchange: bool) -> None:
    """Best-effort removal of a cell's queue (and its own exchange)."""
    try:
        with connect() as conn:
            conn.ensure_connection(max_retries=1, timeout=10)
            bound = q(conn.default_channel)
            # A virtual transport (redis) unbinds only what this channel declared:
            # declare first, or the binding keys outlive the queue.
            bound.declare()
            bound.delete()
            if delete_exchange and q.exchange is not None and q.exchange.name:
                q.exchange(conn.default_channel).delete()
    except Exception:  # cleanup must never hide the measurement
        pass


# --------------------------------------------------------------------------- counting
class Tally:
    """Counts what a consumer received, by sequence number, with preallocated buffers.

    ``e2e`` (when kept) holds receive time minus the carried send time, in ns,
    indexed by sequence number.
    """

    def __init__(self, capacity: int, keep_e2e: bool = False):
        self.capacity = int(capacity)
        self.seen = bytearray(self.capacity)
        self.e2e = array("q", bytes(8 * self.capacity)) if keep_e2e else None
        self.received = 0
        self.duplicates = 0
        self.warmup = 0
        self.stray = 0      # sequence numbers this run never sent

    def add(self, i: int, t: int, recv: int) -> None:
        if i < 0:
            self.warmup += 1
        elif i >= self.capacity:
            self.stray += 1
        elif self.seen[i]:
            self.duplicates += 1
        else:
            self.seen[i] = 1
            self.received += 1
            if self.e2e is not None:
                self.e2e[i] = recv - t

    def counts(self) -> dict:
        return {"received": self.received, "duplicates": self.duplicates,
                "warmup": self.warmup, "stray": self.stray}


def extract(message) -> tuple[int, int]:
    """(sequence number, send time ns) of a message published by this driver."""
    h = message.headers
    return h["i"], h["t"]


def import_path(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def drain(conn: Connection, q: Queue, extract_fn, tally: Tally, until: Callable[[], bool],
          timeout: float, settle: float = 0.2, accept=("json",)) -> None:
    """Consume ``q`` into ``tally`` until ``until()``, ``settle`` s without a message, or
    ``timeout`` s in all (then raise TimeoutError)."""
    def on_message(message):
        recv = now_ns()
        i, t = extract_fn(message)
        tally.add(i, t, recv)

    deadline = time.monotonic() + timeout
    last = time.monotonic()
    with conn.Consumer([q], on_message=on_message, no_ack=True, accept=list(accept)):
        while not until():
            before = tally.received + tally.warmup + tally.duplicates
            try:
                conn.drain_events(timeout=CONSUMER_POLL_S)
            except socket.timeout:
                pass
            now = time.monotonic()
            if tally.received + tally.warmup + tally.duplicates != before:
                last = now
            elif now - last > settle:
                return
            if now > deadline:
                raise TimeoutError(f"draining {q.name}: still short after {timeout:g}s")


# --------------------------------------------------------------------------- publisher
class Publisher:
    """Publishes to one unique queue with one strategy; consumes it back."""

    api = "kombu"
    extract = FORMAT

    def __init__(self, target: Target, queue_name: str, strategy: str, serializer: str,
                 payload: str, timeout: float):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown kombu producer strategy {strategy!r}")
        self.target = target
        self.strategy = strategy
        self.serializer = serializer
        self.payload = payload
        self.timeout = timeout
        # Kombu's defaults (durable, persistent messages), as Celery's own queues are.
        self.exchange = Exchange(queue_name, "direct")
        self.queue = Queue(queue_name, self.exchange, routing_key=queue_name)
        self.accept = [serializer]
        self.conn = None
        self._pool_used = False

    def open(self) -> None:
        self.conn = self.target.connect()
        self.conn.ensure_connection(max_retries=1, timeout=self.timeout)
        self.queue(self.conn.default_channel).declare()

    @contextmanager
    def sending(self):
        """Yields ``send(i, t)``: publish one message carrying ``i`` and ``t``."""
        body, rk, ser, ex = self.payload, self.queue.routing_key, self.serializer, self.exchange
        if self.strategy in ("held", "batch"):
            channel = self.conn.channel()
            producer = Producer(channel, exchange=ex, serializer=ser)
            publish = producer.publish

            def send(i, t):
                publish(body, routing_key=rk, headers={"i": i, "t": t}, retry=True,
                        retry_policy=RETRY_POLICY)

            try:
                if self.strategy == "batch":
                    with producer.batch():  # Kombu's default max_size (1000)
                        yield send
                else:
                    yield send
            finally:
                channel.close()
        elif self.strategy == "per-call":
            conn, group, acquire_timeout = self.conn, pools.producers, self.timeout
            self._pool_used = True

            def send(i, t):
                with group[conn].acquire(block=True, timeout=acquire_timeout) as producer:
                    producer.publish(body, exchange=ex, routing_key=rk, serializer=ser,
                                     headers={"i": i, "t": t}, retry=True,
                                     retry_policy=RETRY_POLICY)
            yield send
        else:  # new-connection
            connect = self.target.connect

            def send(i, t):
                with connect() as conn:
                    Producer(conn, exchange=ex, serializer=ser).publish(
                        body, routing_key=rk, headers={"i": i, "t": t}, retry=True,
                        retry_policy=RETRY_POLICY)
            yield send

    def drain(self, tally: Tally, until, timeout: float) -> None:
        with self.target.connect() as conn:
            drain(conn, self.queue, extract, tally, until, timeout, accept=self.accept)

    def consumer_spec(self) -> dict:
        return {"target": self.target.spec, "queue": queue_spec(self.queue),
                "extract": self.extract, "accept": self.accept}

    def close(self) -> None:
        if self._pool_used and self.conn is not None:
            # kombu pools are process-global: drop this cell's pools with the cell.
            for group in (pools.producers, pools.connections):
                try:
                    group[self.conn].force_close_all()
                    del group[self.conn]
                except Exception:
                    pass
        delete_queue(self.target.connect, self.queue, delete_exchange=True)
        if self.conn is not None:
            self.conn.release()
            self.conn = None


# --------------------------------------------------------------------------- consumer process
@dataclass
class Received:
    """What a consumer got: counts, plus per-sequence e2e ns when it ran concurrently."""
    received: int = 0
    duplicates: int = 0
    warmup: int = 0
    stray: int = 0
    errors: int = 0              # receive errors the consumer survived (each may be a loss)
    seen: object = None          # numpy uint8 array indexed by sequence number, or None
    e2e_ns: object = None        # numpy int64 array indexed by sequence number, or None
    notes: list = field(default_factory=list)


class ConsumerProcess:
    """A consumer in another process: ``python -m bench.drivers.kombu``.

    Lines on stdin (parent -> child): the JSON spec, ``warm N``, ``expect N``.
    Lines on stdout (child -> parent): ``ready``, ``warmed N``, ``done {json}``.
    Every wait has a timeout; :meth:`stop` always ends the process.
    """

    MAIN = "bench.drivers.kombu"   # the child's module (a subclass runs another child)
    ROLE = "consumer"              # names its stderr file

    def __init__(self, spec: dict, capacity: int, workdir: Path, timeout: float):
        self.spec = dict(spec, capacity=int(capacity), timeout=float(timeout),
                         out=str(Path(workdir) / "consumer"))
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.proc = None
        self._lines: queue_mod.Queue = queue_mod.Queue()
        self._stderr = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Whatever this process can import (an --app module, the transports), the consumer can.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        self._stderr = open(self.workdir / f"{self.ROLE}.stderr", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.MAIN], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1, env=env)
        threading.Thread(target=self._read, daemon=True).start()
        self._send(json.dumps(self.spec))

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child died: the next wait says why

    def _wait(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"consumer process: no {prefix!r} within {timeout:g}s")
            try:
                line = self._lines.get(timeout=left)
            except queue_mod.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise RuntimeError(f"consumer process exited ({self.proc.returncode}): "
                                   f"{self.stderr_tail()}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().strip().splitlines() if ln.strip()]
            return lines[-1] if lines else "(no output)"
        except (OSError, ValueError):
            return "(stderr unavailable)"

    def wait_ready(self) -> None:
        self._wait("ready", min(self.timeout, 30.0))

    def warm(self, sent: int) -> int:
        """Wait until the warm-up messages arrived (so measuring starts on an empty queue)."""
        self._send(f"warm {sent}")
        return int(self._wait("warmed", self.timeout))

    def finish(self, sent: int) -> Received:
        self._send(f"expect {sent}")
        info = json.loads(self._wait("done", self.timeout + SETTLE_S + 5))
        import numpy as np

        out = self.spec["out"]
        got = Received(info["received"], info["duplicates"], info["warmup"], info["stray"],
                       info["errors"], np.fromfile(out + ".seen", dtype=np.uint8),
                       np.fromfile(out + ".e2e", dtype=np.int64), info.get("notes", []))
        for suffix in (".seen", ".e2e"):
            os.unlink(out + suffix)
        return got

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.close()   # EOF: the child exits on its own
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
                    try:
                        self.proc.wait(timeout=3)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(timeout=3)
        finally:
            for fh in (self.proc.stdin, self.proc.stdout, self._stderr):
                try:
                    fh.close()
                except Exception:
                    pass
            self.proc = None


def _consume_main() -> int:
    """The consumer process: attach, say ready, count until told how many were sent."""
    spec = json.loads(sys.stdin.readline())
    try:
        import transports  # noqa: F401  registers the unix and fifo aliases
    except ImportError:
        pass
    orders: queue_mod.Queue = queue_mod.Queue()

    def read_orders():
        for line in sys.stdin:
            orders.put(line.split())
        orders.put(["eof"])

    q = queue_from_spec(spec["queue"])
    extract_fn = import_path(spec["extract"])
    tally = Tally(spec["capacity"], keep_e2e=True)
    timeout = float(spec["timeout"])
    warm_target = expect = None
    notes = []
    errors = phase_errors = 0   # phase_errors: in this phase (warm-up, then measured)

    def on_message(message):
        recv = now_ns()
        i, t = extract_fn(message)
        tally.add(i, t, recv)

    conn = target_connection(spec["target"])
    with conn:
        conn.ensure_connection(max_retries=3, timeout=timeout)
        q(conn.default_channel).declare()
        with conn.Consumer([q], on_message=on_message, no_ack=True, accept=spec["accept"]):
            try:  # one look first: some transports attach lazily
                conn.drain_events(timeout=0.01)
            except socket.timeout:
                pass
            print("ready", flush=True)
            threading.Thread(target=read_orders, daemon=True).start()
            deadline = last = complete_at = None
            while True:
                while not orders.empty():
                    order = orders.get()
                    if order[0] == "eof":
                        return 3  # the parent went away: nothing to report to
                    if order[0] == "warm":
                        warm_target = int(order[1])
                    elif order[0] == "expect":
                        expect = int(order[1])
                        complete_at = None
                    deadline = last = time.monotonic()
                before = tally.received + tally.warmup + tally.duplicates
                try:
                    conn.drain_events(timeout=CONSUMER_POLL_S)
                except socket.timeout:
                    pass
                except Exception as exc:  # count it and go on: the loss shows in the counts
                    errors += 1
                    phase_errors += 1
                    if errors == 1:
                        notes.append(f"first: {type(exc).__name__}: {str(exc)[:60]}")
                    if errors >= MAX_ERRORS:
                        notes.append(f"consumer gave up after {errors} receive errors")
                        break
                now = time.monotonic()
                if tally.received + tally.warmup + tally.duplicates != before:
                    last = now
                # A receive error has most likely eaten a message: do not wait for it.
                if warm_target is not None and (tally.warmup + phase_errors >= warm_target
                                                or now - last > SETTLE_S):
                    print(f"warmed {tally.warmup}", flush=True)
                    warm_target = None
                    phase_errors = 0
                if expect is not None:
                    if tally.received + phase_errors >= expect:
                        complete_at = complete_at or now
                        if now - complete_at >= GRACE_S:
                            break
                    elif now - last > SETTLE_S:
                        notes.append(f"no message for {SETTLE_S:g}s: stopped counting")
                        break
                    if now - deadline > timeout:
                        notes.append(f"gave up after {timeout:g}s")
                        break
            # Report before closing: a close can wait out a blocking poll (redis BRPOP,
            # 1 s by default); the parent stops this process soon after "done" anyway.
            _report(spec["out"], tally, errors, notes)
    return 0


def _report(out: str, tally: Tally, errors: int, notes: list) -> None:
    # Raw buffers (no numpy here: it would add to every consumer's start-up time).
    with open(out + ".seen", "wb") as fh:
        fh.write(tally.seen)
    with open(out + ".e2e", "wb") as fh:
        fh.write(memoryview(tally.e2e).cast("B"))
    if errors:
        notes.insert(0, f"{errors} consumer receive error{'s' if errors > 1 else ''}")
    print("done " + json.dumps(dict(tally.counts(), errors=errors, notes=notes)), flush=True)


if __name__ == "__main__":
    try:
        code = _consume_main()
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    os._exit(code)  # skip the interpreter's teardown: nothing is left to flush
