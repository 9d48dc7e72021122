"""What the scenarios that run real Celery workers share (worker, join, prefetch,
fanout): a kept worker, waiting on results while watching the workers, and deleting a
cell's queues afterwards.
"""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import ResultSet

from .. import brokers, children
from ..celery_workers import WorkerError, one_line

# A wait polls in slices this long, so a dead worker fails the cell within it.
WATCH_S = 0.5
LOG_LINES = 6   # lines of a failed worker's log kept in the cell's reason


def unusable(transport: str) -> str | None:
    """Why worker processes cannot use ``transport`` (None when they can)."""
    if not brokers.info(transport).cross_process:
        return f"the {transport} transport is in-process: a worker process cannot reach it"
    return None


@dataclass
class WorkerSetup:
    """What a scenario keeps across cells: workers and whatever it started for them
    (broker environment, app, folders), all closed by ``stack``."""
    key: tuple
    stack: ExitStack
    procs: list = field(default_factory=list)

    def alive(self) -> bool:
        return all(w.alive() for w in self.procs)

    def close(self) -> None:
        self.stack.close()


class KeptWorker:
    """One rig reused while the setup key matches and its workers are alive.

    ``get(key, open_rig)`` returns the kept rig or closes it and opens a new one with
    ``open_rig()``; ``close()`` (the scenario's) stops it. A failed cell should call
    ``close()`` so nothing half-used is reused.
    """

    def __init__(self):
        self.rig: WorkerSetup | None = None

    def get(self, key: tuple, open_rig) -> WorkerSetup:
        rig = self.rig
        if rig is not None and rig.key == key and rig.alive():
            return rig
        self.close()
        self.rig = open_rig()
        return self.rig

    def close(self) -> None:
        rig, self.rig = self.rig, None
        if rig is not None:
            rig.close()


@contextmanager
def worker_failures():
    """Re-raise a WorkerError (dead / never ready) with its log's last lines on one line."""
    try:
        yield
    except WorkerError as exc:
        raise WorkerError(one_line(exc, tail=LOG_LINES)) from None


def check_alive(procs) -> None:
    for w in procs:
        if not w.alive():
            raise WorkerError(one_line(f"worker {w.hostname} died; log {w.log_path} ends:\n"
                                       f"{w.log_tail(LOG_LINES)}"))


def stop_quickly(procs, grace: float = 1.0) -> None:
    """Stop workers whose work is all done: a short warm shutdown, then SIGKILL.

    Nothing is in flight once a cell has its results, and a worker on a polling
    transport takes seconds to finish a warm shutdown.
    """
    children.stop_together(procs, grace)


def wait(app, results, procs, deadline: float, what: str, interval: float = 0.05) -> list:
    """Values of ``results`` (AsyncResults or task ids), in order.

    Raises TimeoutError at ``deadline`` (a ``time.monotonic()`` value) saying how
    many arrived, a WorkerError as soon as a worker in ``procs`` dies, and a
    task's own exception if it failed.
    """
    rs = ResultSet([app.AsyncResult(r) if isinstance(r, str) else r for r in results],
                   app=app)
    while True:
        check_alive(procs)
        left = deadline - time.monotonic()
        try:
            return rs.join(timeout=max(0.0, min(WATCH_S, left)), interval=interval)
        except CeleryTimeout:
            if time.monotonic() >= deadline:
                done = sum(1 for r in rs.results if r.ready())
                raise TimeoutError(f"timed out waiting for {what}: {done}/{len(rs.results)} "
                                   f"results arrived") from None
