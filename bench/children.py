"""Child processes the bench starts: each in its own session (process group), stopped
with a grace period and then SIGKILL to the whole group, so nothing it forked outlives it.
"""
from __future__ import annotations

import os
import signal
import subprocess


def stop(procs, grace: float) -> None:
    """SIGTERM every still-running ``Popen`` in ``procs`` (to its whole group), wait up to
    ``grace`` seconds for each, then SIGKILL the group of any that did not exit."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except OSError:
            pass
    for p in alive:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
