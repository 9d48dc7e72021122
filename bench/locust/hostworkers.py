"""The Celery workers a Locust worker starts on its own host (``--workers-per-host N``).

With N > 0 the system under test scales out with the load: the master starts the broker
environment, the result backend and the queue (its own OwnerSystem, no workers), and each Locust
worker starts N ``celery worker`` processes of the bench's app on its host, wired from the
options the master sends with the spawn message (:data:`system.WIRING`). One owner per
Locust process: started at ``test_start`` (before its users spawn, so no round trip waits
for a worker that is still booting), kept while the wiring stays the same, and stopped at
``quitting``, which Locust fires when the run ends and on Ctrl-C/SIGTERM;
``bench.celery_workers`` also stops them at exit. They are spawned to die with this process
(``bench.children.spawn(die_with_parent=True)``): a Locust worker killed with SIGKILL takes its
Celery workers with it. And when the master goes away (no heartbeat from it for
:data:`MASTER_GONE_S`; Locust's own worker waits 60 s before it quits) they are stopped then.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import gevent

from .. import celery_workers
from ..celery_workers import one_line
from .system import READY_S, STOP_S, stored_env

log = logging.getLogger("celery-bench.locust")
MASTER_GONE_S = 10.0     # no heartbeat from the master this long: it is gone (it sends 1 a second)


class HostWorkers:
    """This host's Celery workers for the current wiring."""

    def __init__(self):
        self.key: str | None = None
        self.stack: ExitStack | None = None
        self.procs: list = []
        self.lock = threading.Lock()   # gevent's, once Locust has patched threading
        self.watch = None              # the greenlet that stops them when the master is gone

    def ensure(self, wiring: dict, node: str) -> list:
        """Start ``wiring['per_host']`` workers for ``wiring`` (none if it asks for none);
        ``node`` names them (the Locust client id: unique across hosts). Raises WorkerError."""
        n = int(wiring.get("per_host") or 0)
        key = json.dumps([wiring, n], sort_keys=True)
        with self.lock:
            if key == self.key and all(w.alive() for w in self.procs):
                return self.procs
            self._close()
            if n < 1:
                return []
            try:
                with ExitStack() as stack:        # closed here if a worker fails to start
                    folder = Path(tempfile.mkdtemp(prefix="celery-bench-hostworkers-"))
                    stack.callback(shutil.rmtree, folder, True)
                    self.procs = stack.enter_context(celery_workers.workers(
                        n, wiring["url"], wiring.get("backend_url"),
                        transport_options=wiring["transport_options"], conf=wiring["conf"],
                        pool=wiring["pool"], concurrency=wiring["concurrency"],
                        ready_timeout=READY_S, stop_timeout=STOP_S,
                        hostname=f"locust-{node}@%h", die_with_parent=True,
                        env=stored_env(stack, folder)))
                    self.stack = stack.pop_all()
            except celery_workers.WorkerError as exc:
                self.procs = []
                raise celery_workers.WorkerError(one_line(exc, tail=6)) from None
            self.key = key
            log.info("celery-bench: %d Celery worker(s) on this host --pool %s -c %s (pids %s)",
                     n, wiring["pool"], wiring["concurrency"],
                     ", ".join(str(w.pid) for w in self.procs))
            return self.procs

    def watch_master(self, runner, gone_s: float = MASTER_GONE_S) -> None:
        """Stop this host's workers once ``runner`` (a Locust WorkerRunner) has heard no
        heartbeat from its master for ``gone_s`` seconds; one watcher per process."""
        if self.watch is not None and not self.watch.dead:
            return

        def watch():
            while True:
                gevent.sleep(1.0)
                last = getattr(runner, "last_heartbeat_timestamp", None)
                if self.procs and last and time.time() - last > gone_s:
                    log.error("celery-bench: no heartbeat from the master in %g s: stopping "
                              "this host's Celery workers", gone_s)
                    self.close()
        self.watch = gevent.spawn(watch)

    def _close(self) -> None:
        stack, self.stack = self.stack, None
        self.key, self.procs = None, []
        if stack is not None:
            stack.close()

    def close(self) -> None:
        with self.lock:
            self._close()
