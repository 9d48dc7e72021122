"""Where the measured processes run (``--cpus ROLE=CPUS,...``) and how busy the machine
was meanwhile.

Roles: ``publisher`` (this, the measuring process), ``broker`` (a broker process the
harness started: the unix broker; Redis and RabbitMQ are shared services and are never
pinned), ``worker`` (the Celery worker's main process) and ``pool`` (its pool
children). CPUS is ``0``, ``0-1`` or ``0+2`` (CPUs this process may use). Pinning is
``os.sched_setaffinity``. :class:`CpuSample` reads ``/proc/stat`` so each cell (each
round) records how busy the whole machine was while it ran (``cpu_busy_pct``: every
process's share, others' jobs included), beside the 1-min load and steal share the
runner records for every repeat (``loadavg_1m``, ``cpu_steal``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

ROLES = ("publisher", "broker", "worker", "pool")
EXAMPLE = "--cpus publisher=0,worker=1,pool=1"


def parse_cpus(text: str, option: str = "--cpus") -> dict[str, tuple[int, ...]]:
    """``ROLE=CPUS,...`` -> {role: cpus}; ValueError saying what is wrong and what to write."""
    allowed = sorted(os.sched_getaffinity(0))
    out: dict[str, tuple[int, ...]] = {}
    for item in filter(None, (p.strip() for p in str(text).split(","))):
        role, sep, spec = item.partition("=")
        role = role.strip()
        if not sep or role not in ROLES:
            raise ValueError(f"{item!r}: expected ROLE=CPUS with ROLE one of "
                             f"{', '.join(ROLES)}, e.g. {EXAMPLE}")
        if role in out:
            raise ValueError(f"{role} is given twice, e.g. {EXAMPLE}")
        out[role] = _cpu_set(spec.strip(), role, allowed)
    if not out:
        raise ValueError(f"no ROLE=CPUS given, e.g. {EXAMPLE}")
    return out


def _cpu_set(spec: str, role: str, allowed: list[int]) -> tuple[int, ...]:
    cpus: set[int] = set()
    for part in spec.split("+"):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"{role}={spec!r}: CPUS is a number, a range 0-1 or a list "
                             f"0+2, e.g. {EXAMPLE}") from None
        if first > last:
            raise ValueError(f"{role}={spec!r}: the range runs backwards")
        cpus.update(range(first, last + 1))
    missing = sorted(cpus - set(allowed))
    if missing:
        raise ValueError(f"{role}={spec!r}: CPU {missing[0]} is not available here "
                         f"(this process may use {_text(allowed)})")
    return tuple(sorted(cpus))


def _text(cpus) -> str:
    return "+".join(str(c) for c in cpus)


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (all its threads'), from /proc."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Placement:
    """The ``--cpus`` asked for, applied to processes as they appear; ``record()`` says
    what each role runs on (pinned, or every CPU)."""
    cpus: dict

    def __post_init__(self):
        self.applied: dict[str, str] = {}

    def pin(self, role: str, pids) -> None:
        cpus = self.cpus.get(role)
        pids = [p for p in pids if p]
        if cpus is None or not pids:
            return
        for pid in pids:
            try:
                os.sched_setaffinity(pid, cpus)
            except OSError:      # gone already (a pool child replaced): nothing to pin
                continue
        self.applied[role] = _text(cpus)

    def pin_worker(self, worker_pid: int) -> None:
        self.pin("worker", [worker_pid])
        self.pin("pool", children(worker_pid))

    def pin_broker(self, marker: str) -> None:
        """The harness's own broker: a child of this process whose command line names
        ``marker`` (the cell's folder)."""
        self.pin("broker", [p for p in children(os.getpid()) if marker in cmdline(p)])

    def record(self, shared_broker: bool) -> str:
        every = _text(sorted(os.sched_getaffinity(0))) if not self.cpus else None
        parts = []
        for role in ROLES:
            if role == "broker" and shared_broker:
                parts.append("broker=not pinned (a shared service)")
            elif role in self.applied:
                parts.append(f"{role}={self.applied[role]}")
            else:
                parts.append(f"{role}=any" if every is None else f"{role}=any ({every})")
        return ",".join(parts)


class CpuSample:
    """``/proc/stat``'s all-CPU counters at one moment; ``since(earlier)`` gives the busy
    share (percent of all CPU time, steal excluded) between the two."""

    def __init__(self):
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice
        self.total = sum(fields[:8])
        self.idle = fields[3] + fields[4]
        self.steal = fields[7] if len(fields) > 7 else 0

    def since(self, earlier: "CpuSample") -> dict:
        span = self.total - earlier.total
        if span <= 0:
            return {}
        return {"cpu_busy_pct": 100.0 * (span - (self.idle - earlier.idle)
                                         - (self.steal - earlier.steal)) / span}
