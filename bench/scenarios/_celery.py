"""What the scenarios that run real Celery workers share (prefetch, fanout, join):
the transport for their quick slice, waiting on results while watching the
workers, and deleting a cell's queues afterwards.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import ResultSet

from .. import brokers
from ..workers import WorkerError

# A wait polls in slices this long, so a dead worker fails the cell within it.
WATCH_S = 0.5
LOG_LINES = 6   # lines of a failed worker's log kept in the cell's reason


def embedded_transport(multi_consumer: bool = False) -> str:
    """The serverless transport for a quick slice: ours (unix) once it exists, else filesystem.

    ``multi_consumer``: several worker processes must share one queue.
    """
    try:
        mod = brokers.module("unix")
    except ImportError:
        return "filesystem"
    if not mod.CROSS_PROCESS or (multi_consumer and "multi_consumer" not in mod.CAPABILITIES):
        return "filesystem"
    return "unix"


def services(transport: str, *others: str | None) -> set[str]:
    """Services a cell needs: its transport's server (if any) and ``others``."""
    return {s for s in (brokers.module(transport).SERVICE, *others) if s}


def unusable(transport: str) -> str | None:
    """Why worker processes cannot use ``transport`` (None when they can)."""
    if not brokers.module(transport).CROSS_PROCESS:
        return f"the {transport} transport is in-process: a worker process cannot reach it"
    return None


def prepare_sqlite(app) -> None:
    """Create a SQLite result backend's tables before pool children race to, in WAL mode.

    WAL (kept in the file) lets the harness read while workers write, and costs
    one fsync per commit instead of a rollback journal's several.
    """
    from sqlalchemy import text

    session = app.backend.ResultSession()
    try:
        session.execute(text("PRAGMA journal_mode=WAL"))
        session.commit()
    finally:
        session.close()


def one_line(text: str, tail: int | None = None) -> str:
    """The runner keeps a failure's first line only: fold a log tail into it.

    ``tail``: keep the first line and only the last ``tail`` lines after it
    (a traceback's last lines say what went wrong).
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if tail is not None and len(lines) > tail + 1:
        lines = lines[:1] + ["..."] + lines[-tail:]
    return " | ".join(lines)


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
    for w in procs:
        w.terminate()
    deadline = time.monotonic() + grace
    for w in procs:
        w.stop(timeout=max(0.0, deadline - time.monotonic()))


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


def delete_queues(env, names) -> None:
    """Delete a cell's queues and their same-named exchanges (unique names, so ours)."""
    from kombu import Exchange, Queue
    from kombu.transport import virtual

    if not names:
        return
    try:
        with env.connection(connect_timeout=3) as conn:
            channel = conn.channel()
            # A virtual transport (redis...) deletes only the bindings its channel has
            # declared, so declare there first; a server (amqp) knows its own.
            redeclare = isinstance(conn.transport, virtual.Transport)
            for name in names:
                queue = Queue(name, Exchange(name), name, channel=channel)
                if redeclare:
                    queue.declare()
                queue.delete()
                Exchange(name, channel=channel).delete()
    except Exception:  # cleanup is best effort; the measurement is already made
        pass
