"""A history of gated runs: every results file kept, keyed by commit, time, machine and
variant, and each metric's value over commits read back from it.

The store is a directory (asv and conbench keep a file per run too): ``runs/`` holds the
results files as added, ``index.jsonl`` one line per run with its key and the figures
``history show/report/check`` read (so they never re-read megabytes of histograms).
A figure is a cell's metric as the tables print it (the median over repeats) with a 95%
interval from its repeats (t-interval on their logs, :mod:`bench.stats`), so a point on a
chart carries how sure it is. Series are per machine kind (CPU model) and variant: a
number from another CPU is another series, never a step.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import config, results, stats

DEFAULT_DIR = "results/history"
INDEX = "index.jsonl"


@dataclass
class Entry:
    """One run in the history."""
    commit: str
    time: str                  # the run's utc_time, ISO 8601
    machine: str               # the CPU model
    variant: str
    file: str                  # under runs/
    figures: dict = field(default_factory=dict)   # "cell metric" -> {value, lo, hi, n, unit}

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass
class Point:
    """One metric of one run, as a series holds it."""
    commit: str
    time: str
    value: float
    lo: float | None
    hi: float | None
    n: int


@dataclass
class Series:
    """A metric over commits on one machine kind and variant, oldest first."""
    metric: str                # "cell-key metric"
    machine: str
    variant: str
    unit: str
    points: list

    @property
    def label(self) -> str:
        return f"{self.machine} / {self.variant}"


def _slug(text: str, width: int = 24) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[:width] or "x"


def figures(run: results.Run) -> dict:
    """Each ok cell's compared metrics (compare's defaults: throughputs, p50, p99) with the
    interval of their repeats."""
    from .compare import default_metrics, metric_value, repeat_values, unit_of

    out = {}
    for cell in run.cells:
        if cell.status != "ok":
            continue
        for metric in default_metrics(cell):
            value = metric_value(cell, metric)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                continue
            reps = [v for v in repeat_values(cell, metric) if v > 0]
            lo = hi = None
            if len(reps) >= 2:
                iv = stats.paired_ratio_interval(reps, [1.0] * len(reps))
                lo, hi = (iv.lo, iv.hi) if iv.bounded else (None, None)
            out[f"{cell.key} {metric}"] = {"value": float(value), "lo": lo, "hi": hi,
                                           "n": len(reps), "unit": unit_of(cell, metric)}
    return out


def read(path) -> results.Run:
    """The results file at ``path``, or one line saying why it is not one."""
    try:
        return results.load(path)
    except FileNotFoundError:
        raise config.UsageError(f"history add {path}: no such results file")
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise config.UsageError(f"history add {path}: not a celery-bench results file "
                                f"({first})")


class History:
    """The directory store."""

    def __init__(self, root=DEFAULT_DIR):
        self.root = Path(root)

    @property
    def index(self) -> Path:
        return self.root / INDEX

    def entries(self) -> list[Entry]:
        """Every run, oldest first (by time, then commit)."""
        if not self.index.exists():
            return []
        out = []
        for number, line in enumerate(self.index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(Entry(**json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise config.UsageError(f"{self.index}:{number}: not a history line ({exc}); "
                                        f"remove it or restore the file")
        return sorted(out, key=lambda e: (e.time, e.commit))

    def add(self, path, variant: str = "default", commit: str | None = None,
            machine: str | None = None) -> Entry:
        """Append the results file at ``path``; a file that does not load is refused
        (:class:`config.UsageError`) before anything is written."""
        run = read(path)
        env = run.environment
        entry = Entry(commit=str(commit or env.get("git_commit") or "unknown"),
                      time=str(env.get("utc_time") or "unknown"),
                      machine=str(machine or env.get("cpu_model") or "unknown"),
                      variant=str(variant), file="", figures=figures(run))
        if not entry.figures:
            raise config.UsageError(f"history add {path}: no ok cell with a figure to keep")
        name = (f"{_slug(entry.time)}-{_slug(entry.commit, 12)}-{_slug(entry.machine)}-"
                f"{_slug(entry.variant)}.json")
        runs = self.root / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        target = runs / name
        i = 1
        while target.exists():
            i += 1
            target = runs / name.replace(".json", f"-{i}.json")
        shutil.copyfile(path, target)
        entry.file = target.name
        with open(self.index, "a") as fh:
            fh.write(entry.to_json() + "\n")
        return entry

    def series(self, metric_filters=()) -> list[Series]:
        """Every metric's series per machine kind and variant; ``metric_filters``: keep the
        metrics containing any of these strings."""
        groups: dict[tuple, Series] = {}
        for e in self.entries():
            for metric, f in e.figures.items():
                if metric_filters and not any(s in metric for s in metric_filters):
                    continue
                key = (metric, e.machine, e.variant)
                s = groups.setdefault(key, Series(metric, e.machine, e.variant,
                                                  f.get("unit", ""), []))
                s.points.append(Point(e.commit, e.time, f["value"], f.get("lo"), f.get("hi"),
                                      f.get("n", 0)))
        return list(groups.values())
