"""Open-loop pacing: intended send times on a fixed schedule.

With a rate set, message ``i`` is due at ``t0 + i / rate`` whatever happened to
message ``i-1``; latency is measured from that intended time (so a stalled
sender cannot hide its queueing: coordinated omission corrected), and the
sender's own lateness is recorded separately as schedule lag. The clock and
sleep are passed in so the pacing is testable with a fake clock.
"""
from __future__ import annotations

import time

# Sleep while more than this is left, then spin: time.sleep overshoots by ~50-100 us.
# Spinning longer burns a core at a few thousand msg/s, CPU the consumer and broker need.
SPIN_NS = 100_000


class Pacer:
    def __init__(self, rate: float, clock=time.perf_counter_ns, sleep=time.sleep):
        if not rate or rate <= 0:
            raise ValueError("rate must be a positive number of messages per second")
        self.rate = float(rate)
        self.period_ns = 1e9 / self.rate
        self.clock = clock
        self.sleep = sleep
        self.t0 = None

    def start(self, t0: int | None = None) -> int:
        self.t0 = self.clock() if t0 is None else t0
        return self.t0

    def shift(self, ns: int) -> None:
        """Move the whole schedule later by ``ns``: for pauses the harness itself takes
        (draining an in-process queue), which must not count as lateness."""
        self.t0 += int(ns)

    def intended(self, i: int) -> int:
        return self.t0 + int(i * self.period_ns)

    def wait(self, i: int) -> int:
        """Block until message ``i`` is due; return its intended time (ns)."""
        due = self.t0 + int(i * self.period_ns)
        clock = self.clock
        left = due - clock()
        while left > 0:
            if left > SPIN_NS:
                self.sleep((left - SPIN_NS) / 1e9)
            left = due - clock()
        return due


def achieved(rate: float, sent: int, elapsed_s: float) -> dict:
    """The rate metrics for a paced run: what was asked, what happened, and a flag."""
    got = sent / elapsed_s if elapsed_s > 0 else 0.0
    return {"rate_target_per_s": rate, "rate_achieved_per_s": got,
            "rate_shortfall": bool(got < 0.95 * rate)}


def backlog_growth(sent_ns, done_ns, t_from: int, t_to: int, points: int = 64) -> float | None:
    """How fast the backlog (sent but not yet done) grew between two instants, per second:
    the least-squares slope of the backlog sampled at ``points`` instants (a single
    difference would read the one message in flight at the end as growth).

    ``sent_ns``: when each item was sent; ``done_ns``: when each was received or started
    (``numpy.inf`` for one never done). A steady state has ~0; a rate the system cannot
    take has a growth near ``rate - capacity``.
    """
    import numpy as np

    if t_to <= t_from:
        return None
    sent = np.sort(np.asarray(sent_ns, dtype=np.float64))
    done = np.sort(np.asarray(done_ns, dtype=np.float64))
    t = np.linspace(float(t_from), float(t_to), points)
    backlog = np.searchsorted(sent, t, side="right") - np.searchsorted(done, t, side="right")
    slope_per_ns = np.polyfit(t - t[0], backlog.astype(np.float64), 1)[0]
    return float(slope_per_ns * 1e9)
