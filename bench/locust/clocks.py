"""Each load generator's clock offset to the master, estimated NTP-style over Locust messages,
at the test's start and again all through it.

The master sends :data:`PING` with its wall clock ``t1``; the generator answers at once with
its own wall clock ``t2`` and its boot id; the master reads ``t4`` on arrival. With the
answer's two legs taken as equal, the generator's clock is ``t2 - (t1 + t4) / 2`` ahead of the
master's, give or take half the round trip (the true offset lies in ``[t2 - t4, t2 - t1]``
whatever the legs take). Of several exchanges the one with the shortest round trip is kept (the
least queueing in either direction).

At ``test_start``, before any user spawns, the master runs :data:`ROUNDS` exchanges with each
generator (:meth:`Clocks.probe`); then, every :data:`PERIOD_S` while the test runs,
:data:`LIVE_ROUNDS` more (:meth:`Clocks.follow`), so a clock that drifts is followed. Each
update is one point of the generator's offset series in the results (:class:`Point`). The
estimate in use is, of the exchanges of the last :data:`WINDOW_S`, the one whose uncertainty
is smallest, an exchange's uncertainty being half its round trip plus :data:`PHI` (100 ppm)
per second of its age: an old exchange with a short round trip is kept until a fresher one is
better, and a clock drifting up to PHI is followed within the uncertainty recorded. After each
update the master sends every host's current offset (by boot id, the master's own 0) to the
generators (:data:`TABLE`), where a stage timed across two hosts (queue wait: a generator's
send to a Celery worker's start, each on its own wall clock) is moved onto the master's clock.
The boot ids also say which generators are on another host than the master.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import gevent

log = logging.getLogger("celery-bench.locust")

PING = "celery_bench_clock"         # master -> generator {seq, t1}; generator -> master + t2
TABLE = "celery_bench_offsets"      # master -> generators {boot_id: offset_ns}
ROUNDS = 12                         # exchanges at the test's start, no load running yet
ROUND_WAIT_S = 0.5                  # longest wait for one round's answers
PROBE_S = 6.0                       # longest the start's exchange takes
PERIOD_S = 2.0                      # a live burst this often while the test runs
LIVE_ROUNDS = 8                     # exchanges per live burst, spread over its period (under
                                    # load some land between the master's merges: short trips)
WINDOW_S = 30.0                     # the estimate in use comes from the exchanges this recent
PHI = 100e-6                        # the worst drift followed, s/s: an unsteered crystal's
                                    # tolerance (NTP assumes 15 ppm of a steered clock)
ENV_ATTR = "celery_bench_offsets"   # where a generator keeps the table: on its Environment


@dataclass
class Estimate:
    boot_id: str
    offset_ns: int         # the generator's wall clock minus the master's (the one in use)
    rtt_ns: int            # the round trip of the exchange it comes from
    rounds: int            # exchanges answered so far
    at_ns: int = 0         # the master's wall clock when that exchange ended (t4)
    uncertainty_ns: int = 0   # half that round trip, plus PHI per second of its age
    series: list = field(default_factory=list)   # a Point per update

    def to_dict(self) -> dict:
        t0 = self.series[0].at_ns if self.series else self.at_ns
        return {"boot_id": self.boot_id, "clock_offset_ms": round(self.offset_ns / 1e6, 3),
                "clock_uncertainty_ms": round(self.uncertainty_ns / 1e6, 3),
                "clock_exchanges": self.rounds, "clock_series_t0_unix_s": round(t0 / 1e9, 6),
                "clock_series": [pt.to_dict(t0) for pt in self.series]}


@dataclass
class Point:
    """One update of a generator's estimate: the offset in use from then on, and the burst's
    own best exchange (which the estimate in use need not be)."""
    at_ns: int
    offset_ns: int
    uncertainty_ns: int
    burst_at_ns: int
    burst_offset_ns: int
    burst_uncertainty_ns: int

    def to_dict(self, t0_ns: int) -> dict:
        return {"t_s": round((self.at_ns - t0_ns) / 1e9, 3),
                "offset_ms": round(self.offset_ns / 1e6, 3),
                "uncertainty_ms": round(self.uncertainty_ns / 1e6, 3),
                "burst_t_s": round((self.burst_at_ns - t0_ns) / 1e9, 3),
                "burst_offset_ms": round(self.burst_offset_ns / 1e6, 3),
                "burst_uncertainty_ms": round(self.burst_uncertainty_ns / 1e6, 3)}


def _offset(a) -> int:
    t1, t2, t4, _ = a
    return t2 - (t1 + t4) // 2


def _best(answers, now_ns: int) -> tuple:
    """The exchange of ``answers`` ((t1, t2, t4, boot) each) with the least uncertainty at
    ``now_ns``, and that uncertainty."""
    def cost(a):
        return (a[2] - a[0]) / 2 + max(0, now_ns - a[2]) * PHI
    a = min(answers, key=cost)
    return a, int(cost(a))


class Clocks:
    """The master's estimates, one per generator (Locust client id), and their series."""

    def __init__(self):
        self.estimates: dict[str, Estimate] = {}
        self._answers: dict[tuple, tuple] = {}   # (client, seq) -> (t1, t2, t4, boot_id)
        self._seq = 0
        self._follower = None

    def answered(self, environment, msg, **kwargs) -> None:
        """A generator's answer to a PING (a master's message listener)."""
        t4 = time.time_ns()
        d = msg.data or {}
        self._answers[(msg.node_id, d.get("seq"))] = (d["t1"], d["t2"], t4, d.get("boot_id"))

    def _ping(self, runner, client_id: str) -> int:
        self._seq += 1
        runner.send_message(PING, {"seq": self._seq, "t1": time.time_ns()}, client_id=client_id)
        return self._seq

    def _count(self, client_id: str) -> int:
        return sum(1 for (c, _) in self._answers if c == client_id)

    def probe(self, runner, own_boot_id: str, rounds: int = ROUNDS) -> dict[str, Estimate]:
        """At a test's start: exchange ``rounds`` pings with every connected generator,
        one round at a time; returns the estimates and sends the offset table."""
        self.stop()
        self._answers, self.estimates = {}, {}
        clients = [c.id for c in runner.clients.all if c.state != "missing"]
        # A generator that connected last may get its first pings before it can answer them
        # (Locust starts the test while that worker is still starting): ping on until each
        # has answered ``rounds`` times, or PROBE_S is up.
        end = time.monotonic() + PROBE_S
        while clients and time.monotonic() < end:
            short = [cid for cid in clients if self._count(cid) < rounds]
            if not short:
                break
            sent = {cid: self._ping(runner, cid) for cid in short}
            deadline = min(end, time.monotonic() + ROUND_WAIT_S)
            while time.monotonic() < deadline and \
                    not all((cid, seq) in self._answers for cid, seq in sent.items()):
                gevent.sleep(0.001)
        self._update(runner, own_boot_id, since_ns=0)
        for cid in clients:
            if cid not in self.estimates:
                log.warning("celery-bench: generator %s did not answer the clock exchange", cid)
        return self.estimates

    def _update(self, runner, own_boot_id: str, since_ns: int) -> None:
        """Add each generator's best exchange since ``since_ns`` to its series, choose the
        estimate in use from the window, send the table to every generator."""
        now = time.time_ns()
        by_client: dict[str, list] = {}
        for (cid, _), a in self._answers.items():
            by_client.setdefault(cid, []).append(a)
        for cid, got in by_client.items():
            fresh = [a for a in got if a[2] >= since_ns]
            if not fresh:
                continue
            burst = min(fresh, key=lambda a: a[2] - a[0])
            est = self.estimates.get(cid) or Estimate(burst[3] or "", 0, 0, 0)
            recent = [a for a in got if a[2] >= now - WINDOW_S * 1e9] or fresh
            used, est.uncertainty_ns = _best(recent, now)
            est.offset_ns, est.rtt_ns, est.at_ns = _offset(used), used[2] - used[0], used[2]
            est.rounds += len(fresh)
            est.series.append(Point(now, est.offset_ns, est.uncertainty_ns, burst[2],
                                    _offset(burst), (burst[2] - burst[0]) // 2))
            self.estimates[cid] = est
        old = now - WINDOW_S * 1e9              # kept bounded for a long test
        self._answers = {k: a for k, a in self._answers.items() if a[2] >= old}
        table = {own_boot_id: 0}
        for est in sorted(self.estimates.values(), key=lambda e: -e.uncertainty_ns):
            if est.boot_id and est.boot_id != own_boot_id:
                table[est.boot_id] = est.offset_ns    # two generators on one host: the better
        for c in runner.clients.all:
            if c.state != "missing":
                runner.send_message(TABLE, table, client_id=c.id)

    def follow(self, runner, own_boot_id: str, period: float = PERIOD_S) -> None:
        """While the test runs: a burst of LIVE_ROUNDS exchanges with every generator each
        ``period`` seconds, and the estimates and table updated after each."""
        self.stop()

        def loop():
            while True:
                since = time.time_ns()
                for _ in range(LIVE_ROUNDS):
                    gevent.sleep(period / LIVE_ROUNDS)
                    for c in runner.clients.all:
                        if c.state != "missing":
                            self._ping(runner, c.id)
                gevent.sleep(min(ROUND_WAIT_S, period / LIVE_ROUNDS))
                self._update(runner, own_boot_id, since_ns=since)
        self._follower = gevent.spawn(loop)

    def stop(self) -> None:
        """The live exchanges end (at the test's stop)."""
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.kill(block=False)

    def remote(self, own_boot_id: str) -> list[str]:
        """Generators on another host than the master (another boot id)."""
        return sorted(cid for cid, e in self.estimates.items() if e.boot_id != own_boot_id)

    def to_dict(self, client_id: str) -> dict:
        est = self.estimates.get(client_id)
        return est.to_dict() if est else {}


def answer(boot_id: str):
    """A generator's PING listener: its wall clock, at once."""
    def listener(environment, msg, **kwargs):
        t2 = time.time_ns()
        environment.runner.send_message(PING, dict(msg.data, t2=t2, boot_id=boot_id))
    return listener


def keep_table(environment, msg, **kwargs) -> None:
    """A generator's TABLE listener: the offsets its users correct cross-host stages with."""
    setattr(environment, ENV_ATTR, dict(msg.data or {}))


def to_master_ns(wall_ns: int, boot_id: str | None, offsets: dict) -> int | None:
    """``wall_ns`` read on the host ``boot_id`` as the master's clock reads it, or None when
    that host's offset is unknown."""
    if boot_id not in offsets:
        return None
    return wall_ns - offsets[boot_id]
