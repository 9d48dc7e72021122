"""Counting what arrived: every message carries its sequence number and send time.

:func:`drain` consumes in this process; :class:`ConsumerProcess` runs
``python -m bench.drivers.consumer`` so a cross-process transport has a consumer
attached while the publisher runs (it also records end-to-end latency, receive
time minus the send time carried in the message: ``perf_counter_ns`` is
CLOCK_MONOTONIC, one clock for every process on the host). How a message carries
its numbers is the publisher's: it names an ``extract`` function
(``"module:function"``) that the consumer imports.

Consumers accept only the serializers the cell published with (JSON unless a cell
asks for another): a consumer never decodes what it was not told to expect. A message
the harness did not publish (no sequence number, an undecodable body) is counted as
``foreign`` and reported in the cell; it never stops a consumer.
"""
from __future__ import annotations

import importlib
import json
import os
import queue as queue_mod
import socket
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kombu import Connection, Queue

from .child import LineChild, run_child
from .target import connection_from_spec, queue_from_spec

CONSUMER_POLL_S = 0.02    # a consumer's drain_events timeout: how often it looks at its orders
# After the last expected message, drain this long more so a late duplicate is counted.
GRACE_S = 0.1
SETTLE_S = 2.0            # once all is sent, a consumer stops after this long without a message
MAX_ERRORS = 1000         # a consumer process gives up after this many receive errors

now_ns = time.perf_counter_ns


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
        self.foreign = 0    # messages the harness did not publish (no numbers to read)

    def take(self, extract_fn, message, recv: int) -> int:
        """Count ``message``; returns its sequence number, or None for a foreign one.

        Anyone who can write to the queue can put anything there: whatever ``extract_fn``
        cannot read (a missing header, another body shape, a body it may not decode) is
        foreign, so the cell reports it instead of its consumer crashing."""
        try:
            i, t = extract_fn(message)
            i, t = int(i), int(t)
        except Exception:  # any failure to read our numbers means: not ours
            self.foreign += 1
            return None
        self.add(i, t, recv)
        return i

    def progress(self) -> int:
        """Messages counted so far, of any kind: a consumer waits while this grows."""
        return self.received + self.warmup + self.duplicates + self.stray + self.foreign

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
                "warmup": self.warmup, "stray": self.stray, "foreign": self.foreign}


def import_path(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def drain(conn: Connection, q: Queue, extract_fn, tally: Tally, until: Callable[[], bool],
          timeout: float, settle: float = 0.2, accept=("json",)) -> None:
    """Consume ``q`` into ``tally`` until ``until()``, ``settle`` s without a message, or
    ``timeout`` s in all (then raise TimeoutError)."""
    def on_message(message):
        tally.take(extract_fn, message, now_ns())

    deadline = time.monotonic() + timeout
    last = time.monotonic()
    with conn.Consumer([q], on_message=on_message, no_ack=True, accept=list(accept)):
        while not until():
            before = tally.progress()
            try:
                conn.drain_events(timeout=CONSUMER_POLL_S)
            except socket.timeout:
                pass
            now = time.monotonic()
            if tally.progress() != before:
                last = now
            elif now - last > settle:
                return
            if now > deadline:
                raise TimeoutError(f"draining {q.name}: still short after {timeout:g}s")


@dataclass
class Received:
    """What a consumer got: counts, plus per-sequence e2e ns when it ran concurrently."""
    received: int = 0
    duplicates: int = 0
    warmup: int = 0
    stray: int = 0
    foreign: int = 0             # messages the harness did not publish, counted apart
    errors: int = 0              # receive errors the consumer survived (each may be a loss)
    seen: object = None          # numpy uint8 array indexed by sequence number, or None
    e2e_ns: object = None        # numpy int64 array indexed by sequence number, or None
    notes: list = field(default_factory=list)


class ConsumerProcess(LineChild):
    """A consumer in another process.

    Lines on stdin (parent -> child): the JSON spec, ``warm N``, ``expect N``.
    Lines on stdout (child -> parent): ``ready``, ``warmed N``, ``done {json}``.
    """

    MAIN = "bench.drivers.consumer"
    ROLE = "consumer"

    def __init__(self, spec: dict, capacity: int, workdir: Path, timeout: float):
        super().__init__(dict(spec, capacity=int(capacity), timeout=float(timeout),
                              out=str(Path(workdir) / "consumer")), workdir, timeout)

    def warm(self, sent: int) -> int:
        """Wait until the warm-up messages arrived (so measuring starts on an empty queue)."""
        self.send_line(f"warm {sent}")
        return int(self.wait_for("warmed", self.timeout))

    def finish(self, sent: int) -> Received:
        self.send_line(f"expect {sent}")
        info = json.loads(self.wait_for("done", self.timeout + SETTLE_S + 5))
        import numpy as np

        out = self.spec["out"]
        got = Received(info["received"], info["duplicates"], info["warmup"], info["stray"],
                       info.get("foreign", 0), info["errors"],
                       np.fromfile(out + ".seen", dtype=np.uint8),
                       np.fromfile(out + ".e2e", dtype=np.int64), info.get("notes", []))
        for suffix in (".seen", ".e2e"):
            os.unlink(out + suffix)
        return got


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
        tally.take(extract_fn, message, now_ns())

    conn = connection_from_spec(spec["target"])
    with conn:
        conn.ensure_connection(max_retries=3, timeout=timeout)
        q(conn.default_channel).declare()
        # Exactly what the cell published with; JSON when a spec says nothing.
        accept = list(spec.get("accept") or ["json"])
        with conn.Consumer([q], on_message=on_message, no_ack=True, accept=accept):
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
                before = tally.progress()
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
                if tally.progress() != before:
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
    run_child(_consume_main)
