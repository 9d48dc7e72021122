"""Each load generator's clock offset to the master, estimated NTP-style over Locust messages.

The master sends :data:`PING` with its wall clock ``t1``; the generator answers at once with
its own wall clock ``t2`` and its boot id; the master reads ``t4`` on arrival. With the
answer's two legs taken as equal, the generator's clock is ``t2 - (t1 + t4) / 2`` ahead of the
master's, give or take half the round trip; of :data:`ROUNDS` exchanges the one with the
shortest round trip is kept (the least queueing in either direction). The master runs them at
``test_start``, before any user spawns, and sends every host's offset (by boot id, the
master's own 0) to the generators (:data:`TABLE`), where a stage timed across two hosts (queue
wait: a generator's send to a Celery worker's start, each on its own wall clock) is moved onto
the master's clock. The boot ids also say which generators are on another host than the master.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import gevent

log = logging.getLogger("celery-bench.locust")

PING = "celery_bench_clock"         # master -> generator {seq, t1}; generator -> master + t2
TABLE = "celery_bench_offsets"      # master -> generators {boot_id: offset_ns}
ROUNDS = 12
ROUND_WAIT_S = 0.5                  # longest wait for one round's answers
PROBE_S = 6.0                       # longest the whole exchange takes
ENV_ATTR = "celery_bench_offsets"   # where a generator keeps the table: on its Environment


@dataclass
class Estimate:
    boot_id: str
    offset_ns: int         # the generator's wall clock minus the master's
    rtt_ns: int            # the round trip of the exchange kept; uncertainty is half of it
    rounds: int

    def to_dict(self) -> dict:
        return {"boot_id": self.boot_id, "clock_offset_ms": round(self.offset_ns / 1e6, 3),
                "clock_uncertainty_ms": round(self.rtt_ns / 2e6, 3), "clock_exchanges":
                self.rounds}


class Clocks:
    """The master's estimates, one per generator (Locust client id)."""

    def __init__(self):
        self.estimates: dict[str, Estimate] = {}
        self._answers: dict[tuple, tuple] = {}   # (client, seq) -> (t1, t2, t4, boot_id)

    def answered(self, environment, msg, **kwargs) -> None:
        """A generator's answer to a PING (a master's message listener)."""
        t4 = time.time_ns()
        d = msg.data or {}
        self._answers[(msg.node_id, d.get("seq"))] = (d["t1"], d["t2"], t4, d.get("boot_id"))

    def probe(self, runner, own_boot_id: str, rounds: int = ROUNDS) -> dict[str, Estimate]:
        """Exchange ``rounds`` pings with every connected generator; returns the estimates
        and sends the offset table to every generator."""
        self._answers = {}
        clients = [c.id for c in runner.clients.all if c.state != "missing"]
        # A generator that connected last may get its first pings before it can answer them
        # (Locust starts the test while that worker is still starting): ping on until each
        # has answered ``rounds`` times, or PROBE_S is up.
        end, seq = time.monotonic() + PROBE_S, 0
        while clients and time.monotonic() < end:
            short = [cid for cid in clients
                     if sum(1 for (c, _) in self._answers if c == cid) < rounds]
            if not short:
                break
            for cid in short:
                runner.send_message(PING, {"seq": seq, "t1": time.time_ns()}, client_id=cid)
            deadline = min(end, time.monotonic() + ROUND_WAIT_S)
            while time.monotonic() < deadline and \
                    not all((cid, seq) in self._answers for cid in short):
                gevent.sleep(0.001)
            seq += 1
        for cid in clients:
            got = [a for (c, _), a in self._answers.items() if c == cid]
            if not got:
                log.warning("celery-bench: generator %s did not answer the clock exchange", cid)
                continue
            t1, t2, t4, boot = min(got, key=lambda a: a[2] - a[0])
            self.estimates[cid] = Estimate(boot or "", t2 - (t1 + t4) // 2, t4 - t1, len(got))
        table = {own_boot_id: 0}
        for est in self.estimates.values():
            if est.boot_id and est.boot_id != own_boot_id:
                table[est.boot_id] = est.offset_ns
        for cid in clients:
            runner.send_message(TABLE, table, client_id=cid)
        return self.estimates

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
