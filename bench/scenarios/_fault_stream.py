"""The faults scenario's task stream: the open-loop publisher thread that sends it and
the records its workers write (one folder per worker generation), read back."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .. import pacing, recorder
from ..tasks import spans as work

TASK = work.TASK


class Runs:
    """What ``bench.faults.work`` wrote: ``<folder>/<gen>/<pid>.bin``, one folder per worker."""

    def __init__(self, folder: Path):
        self.folder = folder

    def read(self) -> np.ndarray:
        """Rows (gen, index, start_ns, end_ns); end_ns 0 = started, not finished."""
        size = work.RECORD.size
        parts = []
        for gen_dir in sorted(self.folder.iterdir()) if self.folder.exists() else ():
            if not gen_dir.is_dir():
                continue
            gen = int(gen_dir.name)
            for entry in os.scandir(gen_dir):
                if not entry.name.endswith(".bin"):
                    continue
                with open(entry.path, "rb") as fh:
                    data = fh.read()
                data = data[:len(data) // size * size]
                if not data:
                    continue
                rows = np.frombuffer(data, dtype="<i8").reshape(-1, 3)
                parts.append(np.column_stack([np.full(len(rows), gen, dtype=np.int64), rows]))
        return np.concatenate(parts) if parts else np.empty((0, 4), dtype=np.int64)


class Publisher(threading.Thread):
    """``send_task`` on an open-loop schedule, in a thread, before, during and after the
    fault. Records each task's intended time and when its call started and returned,
    whether it raised, and the first error of each kind."""

    def __init__(self, app, queue: str, tag: str, n: int, rate: float, task_s: float):
        super().__init__(name="faults-publisher", daemon=True)
        self.app, self.queue, self.tag = app, queue, tag
        self.n, self.rate, self.task_s = n, rate, task_s
        self.pacer = pacing.Pacer(rate)
        self.intended = np.zeros(n, dtype=np.int64)
        self.called = np.zeros(n, dtype=np.int64)
        self.returned = np.zeros(n, dtype=np.int64)
        self.ok = np.zeros(n, dtype=bool)
        self.attempted = 0
        self.errors: dict[str, tuple[int, str]] = {}   # kind -> (count, first message)
        self._halt = threading.Event()

    def start_at(self, t0: int) -> None:
        self.pacer.start(t0)
        self.start()

    def run(self) -> None:
        now = recorder.now_ns
        send = self.app.send_task
        for i in range(self.n):
            if self._halt.is_set():
                break
            self.intended[i] = self.pacer.wait(i)
            self.called[i] = now()
            try:
                send(TASK, args=(i, self.task_s), queue=self.queue, task_id=f"{self.tag}.{i}",
                     ignore_result=True)
                self.ok[i] = True
            except Exception as exc:  # the publisher's errors are what the cell reports
                kind = type(exc).__name__
                count, first = self.errors.get(kind, (0, f"{kind}: {exc}"))
                self.errors[kind] = (count + 1, first)
            self.returned[i] = now()
            self.attempted = i + 1

    def stop(self, timeout: float = 10.0) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout)


def task_index(task_id) -> int | None:
    """Our tasks' ids are ``<tag>.<index>``; None for anything else (warm-up, strangers)."""
    head, _, tail = str(task_id).rpartition(".")
    return int(tail) if head and tail.isdigit() else None
