"""A producer in another process: ``python -m bench.drivers.producer``.

For a queue that holds nothing until its consumer attaches (a fifo pipe), a
scenario consumes in its own process while this one publishes with the Kombu
driver's held producer (:class:`bench.drivers.kombu.Publisher`) as fast as it
can, so the consumer is fed while it drains.

Lines on stdin (parent -> child): the JSON spec, then ``send FIRST N`` (publish
sequence numbers FIRST .. FIRST+N-1 as fast as it can; FIRST = -1 sends N warm-up
messages) or ``pace FIRST N RATE`` (the same on an open-loop schedule: message i is due
at t0 + i/RATE and carries that *intended* time, so the consumer's latency is measured
from it, coordinated omission corrected).
Lines on stdout (child -> parent): ``ready``, ``sent N SECONDS``, ``paced N SECONDS T0``.
"""
from __future__ import annotations

import json
import sys
from time import perf_counter_ns as now

from ..pacing import Pacer
from .child import LineChild, run_child
from .target import Target, connection_from_spec


class ProducerProcess(LineChild):
    MAIN = "bench.drivers.producer"
    ROLE = "producer"

    def __init__(self, target: Target, queue_name: str, serializer: str,
                 payload, workdir, timeout: float):
        super().__init__({"target": target.spec, "queue_name": queue_name,
                          "serializer": serializer, "payload": payload,
                          "timeout": float(timeout)}, workdir, timeout)

    def send(self, first: int, n: int) -> None:
        """Order ``n`` messages; returns at once (see :meth:`wait_sent`)."""
        self.send_line(f"send {int(first)} {int(n)}")

    def wait_sent(self) -> tuple[int, float]:
        """(messages sent, seconds the child spent publishing them)."""
        n, seconds = self.wait_for("sent", self.timeout).split()
        return int(n), float(seconds)

    def pace(self, first: int, n: int, rate: float) -> None:
        """Order ``n`` messages at ``rate``; returns at once (see :meth:`wait_paced`)."""
        self.send_line(f"pace {int(first)} {int(n)} {float(rate)!r}")

    def wait_paced(self, timeout: float) -> tuple[int, float, int]:
        """(messages sent, seconds it took, the schedule's t0 in perf_counter_ns)."""
        n, seconds, t0 = self.wait_for("paced", timeout).split()
        return int(n), float(seconds), int(t0)


def _produce_main() -> int:
    from . import kombu as kombu_driver

    spec = json.loads(sys.stdin.readline())
    try:
        import transports  # noqa: F401  registers the unix and fifo aliases
    except ImportError:
        pass
    url_spec = spec["target"]
    target = Target(lambda: connection_from_spec(url_spec), url_spec)
    driver = kombu_driver.Publisher(target, spec["queue_name"], "held", spec["serializer"],
                                    spec["payload"], float(spec["timeout"]))
    driver.open()
    try:
        print("ready", flush=True)
        for line in sys.stdin:
            order = line.split()
            if order and order[0] == "pace":
                first, n, rate = int(order[1]), int(order[2]), float(order[3])
                pacer = Pacer(rate)
                with driver.sending() as send:
                    t0 = pacer.start()
                    for k in range(n):
                        send(-1 if first < 0 else first + k, pacer.wait(k))
                    spent = (now() - t0) / 1e9
                print(f"paced {n} {spent:.6f} {t0}", flush=True)
                continue
            if not order or order[0] != "send":
                continue
            first, n = int(order[1]), int(order[2])
            with driver.sending() as send:
                t0 = now()
                if first < 0:
                    for _ in range(n):
                        send(-1, now())
                else:
                    for i in range(first, first + n):
                        send(i, now())
                spent = (now() - t0) / 1e9
            print(f"sent {n} {spent:.6f}", flush=True)
    finally:
        # Not driver.close(): that deletes the queue, which is the consumer's to delete.
        driver.conn.release()
    return 0


if __name__ == "__main__":
    run_child(_produce_main)
