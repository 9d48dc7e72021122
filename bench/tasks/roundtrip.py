"""The Locust round-trip task: does (almost) nothing and says when it ran, by two clocks.

``bench.roundtrip(seconds=0.0, *args, **kwargs)`` sleeps ``seconds`` and returns
:func:`stamps`: the worker's ``time.perf_counter_ns()`` readings at start and end
(CLOCK_MONOTONIC: one clock for every process on one host, since its boot), the
same instants by the wall clock (``time.time_ns()``, CLOCK_REALTIME), and the host's
boot id, so the caller knows which clock it shares with the worker:

- same boot id: the caller compares monotonic readings, exact to the nanosecond;
- another host (or boot): only the wall clocks compare, and the offset between the
  two hosts' clocks (NTP keeps it around 0.1-10 ms, chrony on a LAN tens of us) is
  added to the queue wait and taken off the result wait. The run (start to end) is
  one host's monotonic clock either way.

A task of your own reports the same parts when it returns ``stamps(start_ns)``
(or a dict with at least ``start_ns`` and ``end_ns``). With the workers' Strategy from
:func:`bench.worker_stamps.strategy_in_request` the result also carries ``taken_ns``
and ``handed_ns`` (the worker main process's readings, same clock as ``start_ns``), so
the caller can split the queue wait into the waterfall's broker, worker and pool stages;
with ``$CELERY_BENCH_STORED_DIR`` set (the Locust workers) ``stored_dir`` names where the pool
child writes its *stored* reading (:class:`bench.worker_stamps.StoredLedger`).
"""
from __future__ import annotations

import os
import socket
import time

from celery import shared_task

from ..worker_stamps import REQUEST_KEY  # the main process's [taken, handed], same clock
from ..worker_stamps import STORED_ENV   # where this worker's children write *stored*

TASK = "bench.roundtrip"
BOOT_ID_ENV = "CELERY_BENCH_BOOT_ID"


def _kernel_boot_id() -> str:
    """The kernel's boot id, '' when there is none to read (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _boot_id(kernel: str) -> str:
    """This host's boot id: processes that share it share CLOCK_MONOTONIC.
    ``$CELERY_BENCH_BOOT_ID`` overrides it (a container in its own time namespace; tests
    of the other-host path); not Linux: the host name stands in (same host = same clock)."""
    if os.environ.get(BOOT_ID_ENV):
        return os.environ[BOOT_ID_ENV]
    return kernel or f"host:{socket.gethostname()}"


def _clock_id(kernel: str) -> str:
    """Which CLOCK_MONOTONIC this process reads, whatever boot id it claims: the kernel's boot
    id and its time namespace's offsets (Linux 5.6+; none: no time namespaces). '' elsewhere.
    Two processes with one clock id compare monotonic readings exactly, even when they claim
    to be on two hosts (the multi-host rig's namespaces share one kernel)."""
    if not kernel:
        return ""
    try:
        with open("/proc/self/timens_offsets") as fh:
            offsets = ",".join(fh.read().split())
    except OSError:
        offsets = ""
    return f"{kernel}:{offsets}"


_KERNEL_BOOT_ID = _kernel_boot_id()
BOOT_ID = _boot_id(_KERNEL_BOOT_ID)
CLOCK_ID = _clock_id(_KERNEL_BOOT_ID)
HOST = socket.gethostname()


def stamps(start_ns: int, start_wall_ns: int | None = None) -> dict:
    """The worker-side readings a caller needs, ``start_ns`` being the task's first
    ``time.perf_counter_ns()``; call it last thing in the task."""
    end = time.perf_counter_ns()
    wall_end = time.time_ns()
    wall_start = start_wall_ns if start_wall_ns is not None else wall_end - (end - start_ns)
    return {"start_ns": start_ns, "end_ns": end, "start_wall_ns": wall_start,
            "end_wall_ns": wall_end, "boot_id": BOOT_ID, "clock_id": CLOCK_ID, "host": HOST,
            "pid": os.getpid()}


@shared_task(name=TASK, bind=True)
def roundtrip(self, seconds=0.0, *args, **kwargs):
    start = time.perf_counter_ns()
    wall = time.time_ns()
    if seconds:
        time.sleep(float(seconds))
    out = stamps(start, wall)
    main = getattr(self.request, REQUEST_KEY, None)
    if isinstance(main, (list, tuple)) and len(main) == 2:
        out["taken_ns"], out["handed_ns"] = int(main[0]), int(main[1])
    if os.environ.get(STORED_ENV):     # the caller reads *stored* there if it is its own
        out["stored_dir"] = os.environ[STORED_ENV]
    return out
