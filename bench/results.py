"""The results file: the one place that knows the schema.

A run is ``{"schema", "environment", "cells"}``. Each cell::

    {"scenario": "publish",
     "params": {"api": "kombu", "producer": "held", "transport": "memory", ...},
     "status": "ok" | "skipped" | "failed",
     "reason": "",                      # why skipped/failed; notes otherwise
     "metrics": {"throughput_per_s": ..., "sent": ..., "received": ..., "lost": ...},
     "spread": {"throughput_per_s": {"min", "max", "stdev", "n"}},   # over repeats
     "repeats": [{"metrics": {...}, "histograms": {name: summary without hdr}}],
     "histograms": {name: {"unit", "count", "p50", "p90", "p99", "p999",
                           "max", "overflow", "hdr"}}}   # merged over repeats

``hdr`` is ``HdrHistogram.encode()`` (base64 text), so any HdrHistogram
implementation can decode and merge it. Every string written is passed through
:func:`bench.config.mask_secrets`. Compare, report, gate and Locust read runs
only through :func:`load` and the helpers here.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hdrh.histogram import HdrHistogram

from .config import mask_secrets

SCHEMA = "celery-bench/1"
STATUSES = ("ok", "skipped", "failed")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


# --------------------------------------------------------------------------- histograms
def summarize(hist: HdrHistogram, unit: str = "us", overflow: int = 0,
              with_hdr: bool = True) -> dict:
    """The JSON form of one histogram."""
    out = {"unit": unit, "count": hist.get_total_count()}
    for name, pct in PERCENTILES.items():
        out[name] = hist.get_value_at_percentile(pct) if out["count"] else None
    out["max"] = hist.get_max_value() if out["count"] else None
    out["overflow"] = int(overflow)
    if with_hdr:
        out["hdr"] = hist.encode().decode("ascii")
    return out


def decode(summary: dict) -> HdrHistogram:
    """The HdrHistogram behind a summary written by :func:`summarize`."""
    return HdrHistogram.decode(summary["hdr"].encode("ascii"))


# --------------------------------------------------------------------------- cells
@dataclass
class Cell:
    scenario: str
    params: dict
    status: str = "ok"
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    spread: dict = field(default_factory=dict)
    repeats: list = field(default_factory=list)
    histograms: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return cell_key(self.scenario, self.params)

    def to_dict(self) -> dict:
        if self.status not in STATUSES:
            raise ValueError(f"bad cell status {self.status!r}")
        return mask_secrets({
            "scenario": self.scenario, "params": self.params, "status": self.status,
            "reason": self.reason, "metrics": self.metrics, "spread": self.spread,
            "repeats": self.repeats, "histograms": self.histograms,
        })

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(d["scenario"], d.get("params", {}), d.get("status", "ok"),
                   d.get("reason", ""), d.get("metrics", {}), d.get("spread", {}),
                   d.get("repeats", []), d.get("histograms", {}))


def cell_key(scenario: str, params: dict) -> str:
    """A stable identity for a cell, used to pair cells across runs."""
    inner = ",".join(f"{k}={params[k]}" for k in sorted(params))
    return f"{scenario}[{inner}]"


def aggregate(scenario: str, params: dict, repeats: list[dict], unit_of=None) -> Cell:
    """Fold repeats into one cell.

    Each repeat is ``{"metrics": {...}, "histograms": {name: (HdrHistogram, overflow, unit)}}``.
    Numeric metrics become the median over repeats (spread kept beside them);
    histograms are merged, so percentiles cover every sample of every repeat.
    """
    cell = Cell(scenario, dict(params))
    merged: dict[str, list] = {}
    for rep in repeats:
        rep_hists = {}
        for name, (hist, overflow, unit) in rep.get("histograms", {}).items():
            if name in merged:
                merged[name][0].add(hist)
                merged[name][1] += overflow
            else:
                copy = HdrHistogram(hist.lowest_trackable_value,
                                    hist.highest_trackable_value,
                                    hist.significant_figures)
                copy.add(hist)
                merged[name] = [copy, overflow, unit]
            rep_hists[name] = summarize(hist, unit, overflow, with_hdr=False)
        cell.repeats.append({"metrics": rep.get("metrics", {}), "histograms": rep_hists})
    names = []
    for rep in repeats:
        for k in rep.get("metrics", {}):
            if k not in names:
                names.append(k)
    for name in names:
        values = [r["metrics"][name] for r in repeats if name in r.get("metrics", {})]
        numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numeric and len(numeric) == len(values):
            med = statistics.median(numeric)
            if all(isinstance(v, int) for v in numeric) and name in SUMMED:
                cell.metrics[name] = sum(numeric)
            else:
                cell.metrics[name] = med
            if len(numeric) > 1:
                cell.spread[name] = {"min": min(numeric), "max": max(numeric),
                                     "stdev": statistics.stdev(numeric), "n": len(numeric)}
        elif values and all(isinstance(v, bool) for v in values):
            cell.metrics[name] = any(values)  # a flag raised in any repeat stays raised
        else:
            cell.metrics[name] = values[-1]
    for name, (hist, overflow, unit) in merged.items():
        cell.histograms[name] = summarize(hist, unit, overflow)
    return cell


# Counts that add up over repeats (every message must be accounted for).
SUMMED = {"sent", "received", "lost", "duplicates", "errors", "overflow", "consumer_errors"}


# --------------------------------------------------------------------------- environment
def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(services: dict | None = None) -> dict:
    """What a reader needs to judge a run: versions, CPU, kernel, commit, argv, time."""
    import celery
    import kombu

    return mask_secrets({
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "services": services or {},
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "argv": sys.argv,
        "utc_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


# --------------------------------------------------------------------------- run files
@dataclass
class Run:
    environment: dict
    cells: list[Cell] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "environment": mask_secrets(self.environment),
                "cells": [c.to_dict() for c in self.cells]}

    def find(self, scenario: str | None = None, **params) -> list[Cell]:
        """Cells of ``scenario`` whose params include every ``params`` item.

        A value may list alternatives: ``transport="memory|redis"``.
        """
        return [c for c in self.cells
                if (scenario is None or c.scenario == scenario)
                and all(str(c.params.get(k)) in str(v).split("|") for k, v in params.items())]


class SchemaError(ValueError):
    pass


def validate(data: dict) -> None:
    """Raise SchemaError with a precise message when ``data`` is not a run."""
    if not isinstance(data, dict):
        raise SchemaError("a results file holds a JSON object")
    if data.get("schema") != SCHEMA:
        raise SchemaError(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("environment", "cells"):
        if key not in data:
            raise SchemaError(f"missing top-level key {key!r}")
    for i, cell in enumerate(data["cells"]):
        for key in ("scenario", "params", "status", "metrics", "histograms"):
            if key not in cell:
                raise SchemaError(f"cell {i} lacks {key!r}")
        if cell["status"] not in STATUSES:
            raise SchemaError(f"cell {i} has status {cell['status']!r}")
        for name, h in cell["histograms"].items():
            for key in ("unit", "count", "p50", "p99", "max", "overflow", "hdr"):
                if key not in h:
                    raise SchemaError(f"cell {i} histogram {name!r} lacks {key!r}")


def dump(run: Run, path: str | os.PathLike) -> None:
    """Write atomically, so a crash or Ctrl-C never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(run.to_dict(), fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> Run:
    with open(path) as fh:
        data = json.load(fh)
    validate(data)
    return Run(data["environment"], [Cell.from_dict(c) for c in data["cells"]])
