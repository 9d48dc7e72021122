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
add users, or Locust workers). The counters live on an :class:`OpenLoop`, one per
Locust process, kept on its ``Environment``.
"""
from __future__ import annotations

import random
import time

import gevent

from ..pacing import Pacer, achieved
from . import arguments

now_ns = time.perf_counter_ns
USERS = "celery_bench_users"     # the test's total users, carried to Locust workers
ATTR = "celery_bench_open_loop"  # the Environment attribute holding its OpenLoop
# gevent's timers wake up to ~1 ms late (a 0.3 ms sleep takes ~1.1 ms, a 5 ms one ~5.1 ms):
# sleep until about this long before the start, then yield to other greenlets until due.
EARLY_S = 0.0012


def _sleep(seconds: float) -> None:
    """The Pacer's sleep: a gevent sleep that wakes early, then yields (cooperative spin)."""
    gevent.sleep(seconds - EARLY_S if seconds > 1.5 * EARLY_S else 0)


class Schedule:
    def __init__(self, rate_per_user: float, loop: "OpenLoop"):
        self.pacer = Pacer(rate_per_user, clock=now_ns, sleep=_sleep)
        self.pacer.start(now_ns() + int(random.random() * self.pacer.period_ns))
        self.loop = loop
        self.i = 0

    def next(self) -> int:
        """Wait for the next operation's intended start; return it (ns)."""
        intended = self.pacer.wait(self.i)
        self.i += 1
        self.loop.started += 1
        return intended

    def due(self, at_ns: int) -> int:
        t0 = self.pacer.t0
        return 0 if at_ns < t0 else int((at_ns - t0) // self.pacer.period_ns) + 1


class OpenLoop:
    """One Locust process's schedules and its due/started counters."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.live: set = set()
        self.due_done = 0          # intended starts of users that have stopped
        self.due_taken = 0
        self.started = 0
        self.started_taken = 0

    def schedule(self, rate_per_user: float) -> Schedule:
        s = Schedule(rate_per_user, self)
        self.live.add(s)
        return s

    def retire(self, s: Schedule | None) -> None:
        if s is not None and s in self.live:
            self.live.discard(s)
            self.due_done += s.due(now_ns())

    def take(self) -> dict:
        """Intended starts due and operations started since the last take (for the Book)."""
        now = now_ns()
        due = self.due_done + sum(s.due(now) for s in list(self.live))
        out = {"due": due - self.due_taken, "started": self.started - self.started_taken}
        self.due_taken, self.started_taken = due, self.started
        return {k: v for k, v in out.items() if v}


def of(environment) -> OpenLoop:
    """The OpenLoop of this Locust process (kept on its Environment)."""
    loop = getattr(environment, ATTR, None)
    if loop is None:
        loop = OpenLoop()
        setattr(environment, ATTR, loop)
    return loop


def schedule(environment) -> Schedule | None:
    """A new user's schedule, or None in closed loop."""
    rate = float(arguments.get(environment, "arrival_rate", 0.0) or 0.0)
    if rate <= 0:
        return None
    users = max(1, int(arguments.get(environment, USERS, 0) or
                       arguments.get(environment, "num_users", 1) or 1))
    return of(environment).schedule(rate / users)


def retire(environment, s: Schedule | None) -> None:
    of(environment).retire(s)


def take(environment) -> dict:
    return of(environment).take()


def reset(environment) -> None:
    of(environment).reset()


def verdict(rate: float, counters: dict, elapsed_s: float) -> dict:
    """The open loop's metrics: asked, achieved, behind, and the shortfall flag."""
    due, started = counters.get("due", 0), counters.get("started", 0)
    out = achieved(rate, started, elapsed_s)
    behind = max(0, due - started)
    out.update(due=due, started=started, behind=behind,
               rate_shortfall=bool(due and started < 0.95 * due and behind >= 2))
    return out
