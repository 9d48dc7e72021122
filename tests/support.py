"""Helpers the test suites share: queue names, draining with a bound, child processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
from kombu import Exchange, Queue

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # generous bound for what takes milliseconds


def qname(prefix: str = "q") -> str:
    """A queue name no other test (or concurrent run) uses."""
    return f"cbtest-{prefix}-{uuid.uuid4().hex[:10]}"


def direct_queue(prefix: str = "q") -> Queue:
    name = qname(prefix)
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def drain_until(conn, pred, timeout: float = WAIT_S) -> None:
    """Drain ``conn`` until ``pred()`` holds; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("messages did not arrive in time")
        try:
            conn.drain_events(timeout=0.2)
        except socket.timeout:
            pass


def drain_quietly(conn, seconds: float) -> None:
    """Drain for ``seconds`` (to show that nothing more arrives)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.05)
        except socket.timeout:
            pass


def wait_until(pred, timeout: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def child(code: str, *args) -> subprocess.Popen:
    """A Python child with the repo importable; stdout and stderr piped."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=str(ROOT),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def celery_children() -> list:
    """Celery worker processes (and pool children) this test process still has."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "celery" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def counting_starts(monkeypatch) -> list:
    """Record every worker ``bench.celery_workers.start`` spawns (to check reuse across cells)."""
    from bench import celery_workers

    started = []
    real = celery_workers.start

    def start(*args, **kwargs):
        w = real(*args, **kwargs)
        started.append(w)
        return w
    monkeypatch.setattr(celery_workers, "start", start)
    return started


def scenario(name: str, opts):
    """An instance of scenario ``name`` for ``opts`` (close it, or use :func:`run_cell`)."""
    from bench import scenarios

    return scenarios.get(name)(opts)


def cells(name: str, opts) -> list:
    return scenario(name, opts).cells()


def run_cell(name: str, params: dict, opts, rounds: int = 1):
    """One cell through the runner's rules, in a scenario instance closed afterwards."""
    from contextlib import closing

    from bench import runner

    with closing(scenario(name, opts)) as sc:
        return runner.run_cell(sc, params, rounds)
