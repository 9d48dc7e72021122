"""Celery workers as separate processes: start, wait until ready, always stop.

A measured worker must not share the GIL with the measuring process, so each
worker is ``python -m celery -A bench.celery_app worker ...`` in its own
session (process group). Its app is the cell's app, passed through
:func:`bench.celery_app.conf_env`; readiness is a file the worker writes from
its ``worker_ready`` signal (works on every transport, fanout or not).

Every worker this process starts is registered with :data:`bench.children.OWNER`:
leaving a ``with worker(...)`` block stops it (also on an exception or Ctrl-C), the
owner stops what is left at exit and on SIGTERM, so no worker is ever left behind. Stopping is SIGTERM to the
worker (Celery's warm shutdown), then SIGKILL to its whole process group.

    with worker(broker_url, backend_url, conf={"task_default_queue": q}) as w:
        ...            # w.pid, w.hostname, w.log_path, w.alive(), w.log_tail()
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from . import celery_app, children

ROOT = Path(__file__).resolve().parents[1]
APP = "bench.celery_app"
# Mingle and gossip cost a second of start-up and need fanout; heartbeats need events.
DEFAULT_WITHOUT = ("gossip", "mingle", "heartbeat")
POLL_S = 0.02
# Bound at import: a measurement may wrap time.sleep (to count a waiter's polls),
# and stopping a worker must never run through that wrapper.
_sleep = time.sleep


class WorkerError(RuntimeError):
    """A worker died, never became ready, or could not be started (with its log tail)."""


def one_line(text: str, tail: int | None = None) -> str:
    """The runner keeps a failure's first line only: fold a log tail into it.

    ``tail``: keep the first line and only the last ``tail`` lines after it
    (a traceback's last lines say what went wrong).
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if tail is not None and len(lines) > tail + 1:
        lines = lines[:1] + ["..."] + lines[-tail:]
    return " | ".join(lines)


def _logs() -> Path:
    """This process's worker log folder (a /tmp cleaner may have removed it mid-run: a
    worker's log must still have a home)."""
    return children.OWNER.log_folder("celery-bench-workers-")


class Worker:
    """One worker process. Built by :func:`worker`/:func:`workers`, or :func:`start`."""

    def __init__(self, proc: subprocess.Popen, hostname: str, log_path: Path,
                 ready_file: Path, argv: list[str]):
        self._proc = proc
        self.pid = proc.pid
        self.hostname = hostname
        self.log_path = log_path
        self.ready_file = ready_file
        self.argv = argv
        self.returncode: int | None = None

    def __repr__(self):
        state = "alive" if self.alive() else f"exited {self.returncode}"
        return f"<Worker {self.hostname} pid={self.pid} {state}>"

    # -- state
    def _exited(self) -> bool:
        """Has the main process exited? Does not reap it, so its pgid stays ours."""
        if self.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already (by Popen.poll elsewhere)
            self.returncode = self._proc.returncode if self._proc.returncode is not None else -1
            return True
        return info is not None

    def alive(self) -> bool:
        return not self._exited()

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(deque(fh, maxlen=lines)).rstrip()
        except OSError as exc:
            return f"(no log: {exc})"

    def _failure(self, what: str) -> WorkerError:
        return WorkerError(f"worker {self.hostname}: {what}; log {self.log_path} ends:\n"
                           f"{self.log_tail()}")

    def wait_ready(self, timeout: float = 60.0) -> "Worker":
        """Block until the worker consumes; WorkerError if it dies or takes over ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self._exited():
                self._reap()
                raise self._failure(f"exited with code {self.returncode} before it was ready")
            if time.monotonic() >= deadline:
                self.stop(timeout=2)
                raise self._failure(f"not ready after {timeout:g}s")
            _sleep(POLL_S)
        return self

    # -- stopping
    def _reap(self) -> None:
        if self.returncode is None:
            # Non-blocking: safe even when a signal handler interrupted another wait.
            code = self._proc.poll()
            if code is not None:
                self.returncode = code
        if self.returncode is not None:
            children.OWNER.release(self.pid)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() >= deadline:
                return False
            _sleep(POLL_S)
        return True

    def terminate(self) -> None:
        """Ask for Celery's warm shutdown (finishes running tasks), without waiting."""
        if not self._exited():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the whole process group.

        Idempotent; returns the exit code (negative: killed by that signal).
        """
        self.terminate()
        self._wait_exit(timeout)
        # The main process is exited-but-unreaped (or still running), so the group id
        # cannot have been reused: killing the group reaches any orphaned pool child.
        children.kill_group(self.pid)
        self._wait_exit(5.0)
        self._reap()
        for path in (self.ready_file,):
            try:
                path.unlink()
            except OSError:
                pass
        return self.returncode


def running() -> list[Worker]:
    """The workers this process started and has not stopped yet."""
    return children.OWNER.running(Worker)


def stop_all(timeout: float = 10.0) -> None:
    """Stop every worker this process started and has not stopped yet (all at once)."""
    children.OWNER.stop_all(timeout, kind=Worker)


def command(*, pool="prefork", concurrency=1, queues=None, hostname=None,
            without=DEFAULT_WITHOUT, loglevel="INFO", extra_args=()) -> list[str]:
    """The worker's argv (without the environment that carries the app's settings)."""
    argv = [sys.executable, "-m", "celery", "-A", APP, "worker", "--pool", pool,
            "--concurrency", str(int(concurrency)), "--loglevel", loglevel]
    if hostname:
        argv += ["--hostname", hostname]
    if queues:
        argv += ["--queues", queues if isinstance(queues, str) else ",".join(queues)]
    argv += [f"--without-{w}" for w in without]
    return argv + [str(a) for a in extra_args]


def start(broker_url: str, backend_url: str | None = None, *, transport_options=None,
          conf=None, pool="prefork", concurrency=1, queues=None, hostname=None,
          extra_args=(), env=None, without=DEFAULT_WITHOUT, loglevel="INFO",
          die_with_parent=False) -> Worker:
    """Spawn a worker and return at once (call ``wait_ready``); prefer :func:`worker`.
    ``die_with_parent``: it stops when this process dies, SIGKILL included
    (:func:`bench.children.spawn`)."""
    tag = uuid.uuid4().hex[:8]
    hostname = hostname or f"bench-{tag}@%h"
    log_path = _logs() / f"worker-{tag}.log"
    ready_file = _logs() / f"worker-{tag}.ready"
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.update(celery_app.conf_env(broker_url, backend_url, transport_options,
                                        **dict(conf or {})))
    full_env[celery_app.READY_FILE_ENV] = str(ready_file)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full_env.get("PYTHONPATH")) if p)
    argv = command(pool=pool, concurrency=concurrency, queues=queues, hostname=hostname,
                   without=without, loglevel=loglevel, extra_args=extra_args)
    with open(log_path, "wb") as log:
        try:
            # Its own group: killing the group reaches the pool children.
            proc = children.spawn(argv, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT),
                                  die_with_parent=die_with_parent)
        except OSError as exc:
            raise WorkerError(f"cannot start worker ({' '.join(argv[:6])} ...): {exc}") from exc
    try:
        w = Worker(proc, hostname.replace("%h", os.uname().nodename), log_path, ready_file, argv)
        children.OWNER.register(w)
    except BaseException:  # e.g. Ctrl-C before it was registered: nothing else knows of it
        children.kill_group(proc.pid)
        proc.wait()
        raise
    return w


@contextmanager
def worker(broker_url: str, backend_url: str | None = None, *, transport_options=None,
           conf=None, pool="prefork", concurrency=1, queues=None, hostname=None,
           ready_timeout=60.0, extra_args=(), env=None, without=DEFAULT_WITHOUT,
           loglevel="INFO", stop_timeout=10.0) -> Iterator[Worker]:
    """A ready worker for the block; stopped on the way out, whatever happens.

    ``stop_timeout`` is the grace given to the warm shutdown before SIGKILL: an idle
    worker on a polling transport needs ~4 s to notice SIGTERM (Celery's synloop
    drains with a 2 s timeout), so callers that know it is idle may pass less.
    """
    w = start(broker_url, backend_url, transport_options=transport_options, conf=conf,
              pool=pool, concurrency=concurrency, queues=queues, hostname=hostname,
              extra_args=extra_args, env=env, without=without, loglevel=loglevel)
    try:
        w.wait_ready(ready_timeout)
        yield w
    finally:
        w.stop(stop_timeout)


@contextmanager
def workers(n: int, broker_url: str, backend_url: str | None = None, *,
            ready_timeout=60.0, stop_timeout=10.0, **kwargs) -> Iterator[list[Worker]]:
    """``n`` ready workers (started together, so start-up overlaps); all stopped on exit.

    Takes the keyword arguments of :func:`worker`; an explicit ``hostname`` gets
    ``-<i>`` appended to its name part so the names stay unique.
    """
    if n < 1:
        raise ValueError(f"workers(n={n}): n must be at least 1")
    base = kwargs.pop("hostname", None)
    started: list[Worker] = []
    with ExitStack() as stack:
        stack.callback(lambda: children.stop_together(started, stop_timeout))
        for i in range(n):
            name = None
            if base:
                node, at, host = base.partition("@")
                name = f"{node}-{i}{at}{host}"
            started.append(start(broker_url, backend_url, hostname=name, **kwargs))
        deadline = time.monotonic() + ready_timeout
        for w in started:
            w.wait_ready(max(0.1, deadline - time.monotonic()))
        yield list(started)
