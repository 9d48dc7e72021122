"""A producer in another process: ``python -m bench.drivers.producer``.

For a queue that holds nothing until its consumer attaches (a fifo pipe), a
scenario consumes in its own process while this one publishes with the Kombu
driver's held producer (:class:`bench.drivers.kombu.Publisher`) as fast as it
can, so the consumer is fed while it drains.

Lines on stdin (parent -> child): the JSON spec, then ``send FIRST N`` (publish
sequence numbers FIRST .. FIRST+N-1; FIRST = -1 sends N warm-up messages).
Lines on stdout (child -> parent): ``ready``, ``sent N SECONDS``.
"""
from __future__ import annotations

import json
import os
import sys

from . import kombu as kombu_driver


class ProducerProcess(kombu_driver.ConsumerProcess):
    """The parent's side: the consumer process's line protocol and shutdown, another child."""

    MAIN = "bench.drivers.producer"
    ROLE = "producer"

    def __init__(self, target: kombu_driver.Target, queue_name: str, serializer: str,
                 payload, workdir, timeout: float):
        super().__init__({"target": target.spec, "queue_name": queue_name,
                          "serializer": serializer, "payload": payload}, 0, workdir, timeout)

    def send(self, first: int, n: int) -> None:
        """Order ``n`` messages; returns at once (see :meth:`wait_sent`)."""
        self._send(f"send {int(first)} {int(n)}")

    def wait_sent(self) -> tuple[int, float]:
        """(messages sent, seconds the child spent publishing them)."""
        n, seconds = self._wait("sent", self.timeout).split()
        return int(n), float(seconds)


def _produce_main() -> int:
    spec = json.loads(sys.stdin.readline())
    try:
        import transports  # noqa: F401  registers the unix and fifo aliases
    except ImportError:
        pass
    url_spec = spec["target"]
    target = kombu_driver.Target(lambda: kombu_driver.target_connection(url_spec), url_spec)
    driver = kombu_driver.Publisher(target, spec["queue_name"], "held", spec["serializer"],
                                    spec["payload"], float(spec["timeout"]))
    driver.open()
    try:
        print("ready", flush=True)
        now = kombu_driver.now_ns
        for line in sys.stdin:
            order = line.split()
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
    try:
        code = _produce_main()
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    os._exit(code)
