"""Open loop for Locust users: a constant arrival rate, split over every user.

``--arrival-rate R`` gives each user ``R / users`` operations per second (``users``
is the test's total, across all Locust workers, so the total is R once every user
is spawned). A user waits for each operation's intended start on its own schedule
(``bench.pacing.Pacer`` with ``time.perf_counter_ns`` and a gevent sleep that wakes
~1 ms early and then yields until the start, since gevent's timers wake up to a
millisecond late; a random phase so users do not start in lockstep), then runs it.
How late it started is its *schedule lag*, and every request timed from the
operation's start is also recorded from the intended start (latency + lag:
coordinated omission corrected).

A user runs one operation at a time, so when operations take longer than its
period it falls behind; nothing is dropped, the lag grows. ``due`` (starts whose
intended time has passed) and ``started`` are counted per process and summed by
the master: when started < 95% of due the users cannot keep up (a shortfall:
add users, or Locust workers).
"""
from __future__ import annotations

import random
import time

import gevent

from ..pacing import Pacer, achieved
from . import arguments

now_ns = time.perf_counter_ns
USERS = "celery_bench_users"     # the test's total users, carried to Locust workers
# gevent's timers wake up to ~1 ms late (a 0.3 ms sleep takes ~1.1 ms, a 5 ms one ~5.1 ms):
# sleep until about this long before the start, then yield to other greenlets until due.
EARLY_S = 0.0012


def _sleep(seconds: float) -> None:
    """The Pacer's sleep: a gevent sleep that wakes early, then yields (cooperative spin)."""
    gevent.sleep(seconds - EARLY_S if seconds > 1.5 * EARLY_S else 0)

_live: set = set()
_due_done = 0          # intended starts of users that have stopped
_due_taken = 0
_started = 0
_started_taken = 0


class Schedule:
    def __init__(self, rate_per_user: float):
        self.pacer = Pacer(rate_per_user, clock=now_ns, sleep=_sleep)
        self.pacer.start(now_ns() + int(random.random() * self.pacer.period_ns))
        self.i = 0

    def next(self) -> int:
        """Wait for the next operation's intended start; return it (ns)."""
        global _started
        intended = self.pacer.wait(self.i)
        self.i += 1
        _started += 1
        return intended

    def due(self, at_ns: int) -> int:
        t0 = self.pacer.t0
        return 0 if at_ns < t0 else int((at_ns - t0) // self.pacer.period_ns) + 1


def schedule(environment) -> Schedule | None:
    """A new user's schedule, or None in closed loop."""
    rate = float(arguments.get(environment, "arrival_rate", 0.0) or 0.0)
    if rate <= 0:
        return None
    users = max(1, int(arguments.get(environment, USERS, 0) or
                       arguments.get(environment, "num_users", 1) or 1))
    s = Schedule(rate / users)
    _live.add(s)
    return s


def retire(s: Schedule | None) -> None:
    global _due_done
    if s is not None and s in _live:
        _live.discard(s)
        _due_done += s.due(now_ns())


def take() -> dict:
    """Intended starts due and operations started since the last take (for the Book)."""
    global _due_taken, _started_taken
    now = now_ns()
    due = _due_done + sum(s.due(now) for s in list(_live))
    out = {"due": due - _due_taken, "started": _started - _started_taken}
    _due_taken, _started_taken = due, _started
    return {k: v for k, v in out.items() if v}


def reset() -> None:
    global _due_done, _due_taken, _started, _started_taken
    _live.clear()
    _due_done = _due_taken = _started = _started_taken = 0


def verdict(rate: float, counters: dict, elapsed_s: float) -> dict:
    """The open loop's metrics: asked, achieved, behind, and the shortfall flag."""
    due, started = counters.get("due", 0), counters.get("started", 0)
    out = achieved(rate, started, elapsed_s)
    behind = max(0, due - started)
    out.update(due=due, started=started, behind=behind,
               rate_shortfall=bool(due and started < 0.95 * due and behind >= 2))
    return out
