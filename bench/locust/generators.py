"""The master's view of its load generators (Locust workers): the final flush and who is missing.

Locust's master stops taking messages half a second after it sends ``quit`` (locust #1426):
a generator's last statistics can arrive too late, for Locust's counts and ours alike. So at
``test_stop`` the master asks every generator it still hears from for a *final* report
(:data:`FINAL`, a Locust custom message): the generator stops its users (Locust's own
``runner.stop()``, a no-op when they are stopped already) and sends one last ordinary
``stats`` message, which carries Locust's statistics and our HdrHistograms together and
names the request it answers. The master waits, bounded by :data:`FINAL_WAIT_S`, until each
one has answered; one connection carries a generator's messages in order, so its answer
arrives after everything it reported before. The request count in ``--results-out`` then
equals Locust's own, and both hold every request made.

A generator that stops answering (killed, its host gone) keeps what it reported; the results
and the UI name it, and the cells say they lost what it had not reported yet.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import gevent

log = logging.getLogger("celery-bench.locust")

FINAL = "celery_bench_final"      # master -> generator: stop your users, send your last report
FINAL_WAIT_S = 15.0               # longest the master waits for the last answer
MISSING = "missing"               # Locust's state for a worker whose heartbeats stopped


@dataclass
class Generator:
    """What the master knows of one generator in the current test."""
    client_id: str
    requests: int = 0              # Locust-counted requests it reported
    reports: int = 0
    last_report: float | None = None   # time.monotonic()
    final: bool = False

    def to_dict(self, started: float | None, state: str) -> dict:
        since = None if self.last_report is None or started is None \
            else round(self.last_report - started, 3)
        return {"requests": self.requests, "reports": self.reports, "final_report": self.final,
                "last_report_s": since, "state": state}


class Generators:
    """Per-generator bookkeeping on the master, and the final flush it waits for."""

    def __init__(self):
        self.seen: dict[str, Generator] = {}
        self.token: str | None = None     # the current final request
        self.flushed = False               # the final flush ran for this test
        self.started: float | None = None

    def reset(self) -> None:
        self.seen, self.token, self.flushed = {}, None, False
        self.started = time.monotonic()

    def reported(self, client_id: str, requests: int, final: str | None) -> None:
        gen = self.seen.get(client_id)
        if gen is None:
            gen = self.seen[client_id] = Generator(client_id)
        gen.requests += requests
        gen.reports += 1
        gen.last_report = time.monotonic()
        if final is not None and final == self.token:
            gen.final = True

    def flush(self, runner, timeout: float = FINAL_WAIT_S) -> list[str]:
        """Ask each generator Locust still hears from for its last report and wait for the
        answers; returns the ids that did not answer in ``timeout``. Once per test: Locust
        fires ``test_stop`` again while it shuts down, when nobody is listening any more."""
        if self.flushed:
            return []
        self.flushed = True
        self.token = secrets.token_hex(4)
        asked = [c.id for c in runner.clients.all if c.state != MISSING]
        for client_id in asked:
            self.seen.setdefault(client_id, Generator(client_id))
            runner.send_message(FINAL, {"token": self.token}, client_id=client_id)
        deadline = time.monotonic() + timeout
        while True:
            late = [c for c in asked if not self.seen[c].final and c in runner.clients]
            if not late or time.monotonic() > deadline:
                break
            gevent.sleep(0.05)
        if late:
            log.warning("celery-bench: no final report from %s in %g s; keeping what they "
                        "reported before", ", ".join(late), timeout)
        return late

    def states(self, runner) -> dict[str, str]:
        """Locust's state for each generator seen (``gone`` once Locust dropped it)."""
        clients = runner.clients if runner is not None and hasattr(runner, "clients") else {}
        return {cid: (clients[cid].state if cid in clients else "gone") for cid in self.seen}

    def missing(self, runner) -> list[str]:
        """Generators that reported in this test and gave no final report."""
        if not self.flushed:
            return []
        return sorted(cid for cid, g in self.seen.items() if not g.final and g.reports)

    def to_dict(self, runner) -> dict:
        states = self.states(runner)
        return {cid: g.to_dict(self.started, states[cid]) for cid, g in sorted(self.seen.items())}

    def text(self, runner) -> str:
        """One line naming the generators lost mid-run, or ''."""
        gone = self.missing(runner)
        if not gone:
            return ""
        parts = [f"{cid} ({self.seen[cid].requests:,} requests, last report at "
                 f"{self.seen[cid].to_dict(self.started, '')['last_report_s']} s)"
                 for cid in gone]
        return ("load generator(s) MISSING, no final report: " + ", ".join(parts) +
                "; their counts up to their last report are kept, later requests are lost")
