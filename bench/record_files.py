"""Record files read as they are appended: fixed-size int64 records that a worker's
processes write (:class:`bench.worker_stamps.StampFile`, the tick task), read by the
harness (the worker scenario's rig) or by a Locust process (its round trips' *stored*)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import recorder


class RecordReader:
    """Fixed-size int64 records appended to ``<folder>/<pid>.bin``, read as they come,
    grouped by the run id in column ``run_col``. ``read_at``: add a last column, when
    this reader first saw the record (perf_counter_ns): when the harness had it."""

    def __init__(self, folder: Path, columns: int = 4, run_col: int = 0,
                 read_at: bool = False):
        self.folder, self.columns, self.run_col, self.read_at = folder, columns, run_col, read_at
        self._offsets: dict[str, int] = {}
        self._by_run: dict[int, list] = {}

    def poll(self) -> None:
        size = 8 * self.columns
        for entry in os.scandir(self.folder):
            if not entry.name.endswith(".bin"):
                continue
            offset = self._offsets.get(entry.name, 0)
            whole = (entry.stat().st_size - offset) // size * size
            if whole <= 0:
                continue
            with open(entry.path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(whole)
            seen = recorder.now_ns()
            self._offsets[entry.name] = offset + len(data)
            rows = np.frombuffer(data, dtype="<i8").reshape(-1, self.columns)
            if self.read_at:
                rows = np.column_stack([rows, np.full(len(rows), seen, dtype=np.int64)])
            runs = rows[:, self.run_col]
            for run in np.unique(runs).tolist():
                self._by_run.setdefault(run, []).append(rows[runs == run])

    def count(self, run: int) -> int:
        return sum(len(r) for r in self._by_run.get(run, ()))

    def records(self, run: int) -> np.ndarray:
        """The rows of ``run`` (ticks: run, index, start_ns, end_ns), in arrival order."""
        parts = self._by_run.get(run)
        width = self.columns + self.read_at
        return np.concatenate(parts) if parts else np.empty((0, width), dtype=np.int64)

    def forget(self, run: int, earlier: bool = False) -> None:
        """Drop the rows of ``run`` (``earlier``: and of every run before it)."""
        self._by_run.pop(run, None)
        if earlier:
            self._by_run = {k: v for k, v in self._by_run.items() if k > run}
