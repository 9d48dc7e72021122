"""A fixed pure-Python workload, measured as if it were a publisher: the same-run
calibration of a machine's speed.

Absolute rates move 2x between machines of one kind and 1.7x between runs on one
machine, but a CPython workload moves with them. A rule such as "kombu held /
calibration >= baseline -15%" therefore compares a rate with the baseline's without
trusting either machine's clock. The work is interpreter work (loops, small dicts,
attribute and method calls, str formatting) and touches no I/O, no C accelerator
doing most of it, and nothing that changes with a dependency upgrade.
"""
from __future__ import annotations

from contextlib import contextmanager


def work(i: int) -> int:
    """One unit: about as much interpreter work as a few hundred bytecodes."""
    acc = 0
    for k in range(24):
        acc += (k * i) % 7
    d = {"i": i, "acc": acc, "name": f"msg-{i}", "parts": [acc, i, k]}
    return len(d["name"]) + sum(d["parts"]) + d.get("missing", 0)


def burst(units: int) -> int:
    """``units`` of the work in a row: the yardstick a publish cell sets beside each chunk
    of messages (``cpu_vs_calibration``), so whatever slows the CPU for a moment slows
    both sides of the ratio."""
    acc = 0
    for i in range(units):
        acc += work(i)
    return acc


class Publisher:
    api = "calibration"
    cross_process = False

    def __init__(self):
        self.counts = [0, 0]      # warm-up units, measured units (sent in order)
        self.drained = [0, 0]

    def open(self) -> None:
        pass

    @contextmanager
    def sending(self):
        """Yields ``send(i, t)``: one unit of work, counted like a message."""
        counts = self.counts

        def send(i, t):
            work(i)
            if i < 0:
                counts[0] += 1
            else:
                counts[1] = i + 1
        yield send

    def drain(self, tally, until=None, timeout: float = 0.0) -> None:
        """Every unit done is accounted for: nothing is in flight."""
        for _ in range(self.counts[0] - self.drained[0]):
            tally.add(-1, 0, 0)
        for i in range(self.drained[1], self.counts[1]):
            tally.add(i, 0, 0)
        self.drained = list(self.counts)

    def close(self) -> None:
        pass
