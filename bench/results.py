"""The results file: the one place that knows the schema.

A run is ``{"schema", "environment", "cells"}``. Each cell::

    {"scenario": "publish",
     "params": {"api": "kombu", "producer": "held", "transport": "memory", ...},
     "status": "ok" | "skipped" | "failed" | "lost",
     "reason": "",                      # why skipped/failed; notes otherwise
     "exempt": "",                      # why a loss is a known behaviour (the transport's)
     "metrics": {"throughput_per_s": ..., "sent": ..., "received": ..., "lost": ...},
     "spread": {"throughput_per_s": {"min", "max", "stdev", "n"}},   # over repeats
     "repeats": [{"round": 0, "started_utc", "elapsed_s", "loadavg_1m", "cpu_steal",
                  "metrics": {...}, "histograms": {name: summary without hdr},
                  "notes": [...]}],
     "histograms": {name: {"unit", "count", "p50", "p90", "p99", "p999",
                           "ci": {"p50": [lo, hi] | null, ...},
                           "max", "overflow", "hdr"}}}   # merged over repeats

``ci`` (schema 2) is each percentile's distribution-free 95% interval from order
statistics (:mod:`bench.percentiles`), null when ``count`` is too few samples for that
percentile: readers show it as "too few samples (n=30)", never as a number. Schema 1
files (no ``ci``) are still read; their intervals come from ``hdr``.

A cell is ``lost`` when messages or tasks it published did not all arrive (its
``lost`` metric is above 0): never ``ok``. Repeats are rounds: with ``--repeat N``
every selected cell runs once per round (ABC ABC ABC), and ``round`` pairs the
repeats of two cells measured side by side.

``hdr`` is ``HdrHistogram.encode()`` (base64 text), so any HdrHistogram
implementation can decode and merge it. Every string written is passed through
:func:`bench.config.mask_secrets`. Compare, report, gate and Locust read runs
only through :func:`load` and the helpers here.
"""
from __future__ import annotations

import json
import math
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

from . import percentiles, recorder
from .config import mask_secrets

SCHEMA = "celery-bench/2"
READABLE = ("celery-bench/1", SCHEMA)   # 1: no percentile intervals (``ci``)
STATUSES = ("ok", "skipped", "failed", "lost")
PERCENTILES = percentiles.NAMES


# --------------------------------------------------------------------------- histograms
def summarize(hist: HdrHistogram, unit: str = "us", overflow: int = 0,
              with_hdr: bool = True, invalid: int = 0, intervals=()) -> dict:
    """The JSON form of one histogram.

    ``invalid``: negative or NaN readings left out (a clock or accounting bug);
    ``intervals``: :class:`bench.recorder.Interval` s, kept as
    ``[{"start_s", "end_s", "hdr"}]`` (Unix seconds) for HdrHistogram's log format.
    """
    out = {"unit": unit, "count": hist.get_total_count()}
    estimates = percentiles.estimate(hist, PERCENTILES)
    for name, e in estimates.items():
        out[name] = e.value
    out["ci"] = percentiles.to_json(estimates)
    out["max"] = hist.get_max_value() if out["count"] else None
    out["overflow"] = int(overflow)
    if invalid:
        out["invalid"] = int(invalid)
    if with_hdr:
        out["hdr"] = hist.encode().decode("ascii")
        if intervals:
            out["intervals"] = [{"start_s": round(iv.start_s, 6), "end_s": round(iv.end_s, 6),
                                 "hdr": iv.hist.encode().decode("ascii")} for iv in intervals]
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
    exempt: str = ""

    @property
    def key(self) -> str:
        return cell_key(self.scenario, self.params)

    def to_dict(self) -> dict:
        if self.status not in STATUSES:
            raise ValueError(f"bad cell status {self.status!r}")
        out = {
            "scenario": self.scenario, "params": self.params, "status": self.status,
            "reason": self.reason, "metrics": self.metrics, "spread": self.spread,
            "repeats": self.repeats, "histograms": self.histograms,
        }
        if self.exempt:
            out["exempt"] = self.exempt
        return mask_secrets(out)

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(d["scenario"], d.get("params", {}), d.get("status", "ok"),
                   d.get("reason", ""), d.get("metrics", {}), d.get("spread", {}),
                   d.get("repeats", []), d.get("histograms", {}), d.get("exempt", ""))


def cell_key(scenario: str, params: dict) -> str:
    """A stable identity for a cell, used to pair cells across runs."""
    inner = ",".join(f"{k}={params[k]}" for k in sorted(params))
    return f"{scenario}[{inner}]"


REPEAT_INFO = ("round", "started_utc", "elapsed_s", "loadavg_1m", "cpu_steal")


def aggregate(scenario: str, params: dict, repeats: list[dict]) -> Cell:
    """Fold repeats into one cell.

    Each repeat is ``{"metrics": {...}, "histograms": {name: bench.recorder.Recorded},
    "notes": [...]}`` plus the runner's :data:`REPEAT_INFO` about when and how it ran.
    Numeric metrics become the median over repeats (spread kept beside them);
    histograms are merged, so percentiles cover every sample of every repeat.
    """
    cell = Cell(scenario, dict(params))
    merged: dict[str, recorder.Recorded] = {}
    for rep in repeats:
        recorder.merge(merged, rep.get("histograms", {}))
        rep_hists = {name: summarize(rec.hist, rec.unit, rec.overflow, with_hdr=False,
                                     invalid=rec.invalid)
                     for name, rec in rep.get("histograms", {}).items()}
        kept = {k: rep[k] for k in REPEAT_INFO if k in rep}
        kept.update(metrics=rep.get("metrics", {}), histograms=rep_hists)
        if rep.get("notes"):
            kept["notes"] = list(rep["notes"])
        cell.repeats.append(kept)
    cell.metrics, cell.spread = fold_metrics([rep.get("metrics", {}) for rep in repeats])
    for name, m in merged.items():
        cell.histograms[name] = summarize(m.hist, m.unit, m.overflow, invalid=m.invalid,
                                          intervals=sorted(m.intervals,
                                                           key=lambda iv: iv.start_s))
    notes = [n for rep in repeats for n in rep.get("notes") or ()]
    cell.reason = "; ".join(dict.fromkeys(notes))
    if (cell.metrics.get("lost") or 0) > 0:
        cell.status = "lost"
    return cell


def fold_metrics(per_repeat: list[dict]) -> tuple[dict, dict]:
    """(metrics, spread) over repeats: numbers become their median (counts of messages
    add up), with min/max/stdev beside; a flag raised in any repeat stays raised;
    anything else keeps its last value."""
    metrics, spread = {}, {}
    names = list(dict.fromkeys(k for m in per_repeat for k in m))
    for name in names:
        values = [m[name] for m in per_repeat if name in m]
        numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numeric and len(numeric) == len(values):
            if all(isinstance(v, int) for v in numeric) and name in SUMMED:
                metrics[name] = sum(numeric)
            else:
                metrics[name] = statistics.median(numeric)
            if len(numeric) > 1:
                spread[name] = {"min": min(numeric), "max": max(numeric),
                                "stdev": statistics.stdev(numeric), "n": len(numeric)}
        elif values and all(isinstance(v, bool) for v in values):
            metrics[name] = any(values)
        else:
            metrics[name] = values[-1]
    return metrics, spread


def extend(cell: Cell, repeats: list[dict]) -> Cell:
    """``cell`` with more repeats (more rounds measured later, e.g. by the gate): metrics
    folded again over every repeat, histograms merged with the new ones."""
    more = aggregate(cell.scenario, cell.params, repeats)
    out = Cell(cell.scenario, dict(cell.params), repeats=cell.repeats + more.repeats,
               exempt=cell.exempt)
    out.metrics, out.spread = fold_metrics([r.get("metrics", {}) for r in out.repeats])
    for name in dict.fromkeys([*cell.histograms, *more.histograms]):
        parts = [h[name] for h in (cell.histograms, more.histograms) if name in h]
        hist = decode(parts[0])
        for extra in parts[1:]:
            hist.add(decode(extra))
        summary = summarize(hist, parts[0].get("unit", "us"),
                            sum(p.get("overflow", 0) for p in parts),
                            invalid=sum(p.get("invalid", 0) for p in parts))
        intervals = [iv for p in parts for iv in p.get("intervals", ())]
        if intervals:
            summary["intervals"] = intervals
        out.histograms[name] = summary
    out.reason = "; ".join(dict.fromkeys(filter(None, (cell.reason, more.reason))))
    if (out.metrics.get("lost") or 0) > 0:
        out.status = "lost"
    return out


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


def validate(data) -> None:
    """Raise SchemaError with a precise message when ``data`` is not a run: every level
    the readers (show, compare, gate, report, Locust) rely on, down to each ``hdr``."""
    if not isinstance(data, dict):
        raise SchemaError("a results file holds a JSON object")
    if data.get("schema") not in READABLE:
        raise SchemaError(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    for key, kind in (("environment", dict), ("cells", list)):
        if key not in data:
            raise SchemaError(f"missing top-level key {key!r}")
        _expect(data[key], kind, repr(key))
    env = data["environment"]
    for key, kind in (("options", dict), ("services", dict), ("argv", list)):
        if key in env:
            _expect(env[key], kind, f"environment {key!r}")
    for i, cell in enumerate(data["cells"]):
        _expect(cell, dict, f"cell {i}")
        for key, kind in (("scenario", str), ("params", dict), ("status", str),
                          ("metrics", dict), ("histograms", dict)):
            if key not in cell:
                raise SchemaError(f"cell {i} lacks {key!r}")
            _expect(cell[key], kind, f"cell {i}: {key!r}")
        if cell["status"] not in STATUSES:
            raise SchemaError(f"cell {i} has status {cell['status']!r}")
        for key, value in cell["params"].items():
            if not isinstance(value, _SCALARS):
                raise SchemaError(f"cell {i} param {key!r} is a {type(value).__name__}; "
                                  f"params are strings or numbers")
        for key in ("reason", "exempt"):
            _expect(cell.get(key, ""), str, f"cell {i}: {key!r}")
        _expect(cell.get("spread", {}), dict, f"cell {i}: 'spread'")
        for name, s in cell.get("spread", {}).items():
            _expect(s, dict, f"cell {i} spread {name!r}")
        _expect(cell.get("repeats", []), list, f"cell {i}: 'repeats'")
        for r, rep in enumerate(cell.get("repeats", [])):
            where = f"cell {i} repeat {r}"
            _expect(rep, dict, where)
            _expect(rep.get("metrics", {}), dict, f"{where}: 'metrics'")
            _expect(rep.get("histograms", {}), dict, f"{where}: 'histograms'")
            _expect(rep.get("notes", []), list, f"{where}: 'notes'")
            if "round" in rep and (not isinstance(rep["round"], int)
                                   or isinstance(rep["round"], bool)):
                raise SchemaError(f"{where}: 'round' is {rep['round']!r}, not a round number")
            for name, h in rep.get("histograms", {}).items():
                _histogram(h, f"{where} histogram {name!r}", with_hdr=False)
        for name, h in cell["histograms"].items():
            _histogram(h, f"cell {i} histogram {name!r}", with_hdr=True)


_SCALARS = (str, int, float, bool, type(None))
_NUMBERS = (int, float)


def _expect(value, kind, where: str) -> None:
    if not isinstance(value, kind):
        names = {dict: "an object", list: "a list", str: "a string"}
        raise SchemaError(f"{where} is {_a(value)}, expected {names.get(kind, kind.__name__)}")


def _a(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                       type(value).__name__)


def _histogram(h, where: str, with_hdr: bool) -> None:
    _expect(h, dict, where)
    needed = ("unit", "count", "p50", "p99", "max", "overflow") + (("hdr",) if with_hdr else ())
    for key in needed:
        if key not in h:
            raise SchemaError(f"{where} lacks {key!r}")
    _expect(h["unit"], str, f"{where}: 'unit'")
    for key in ("count", "overflow"):
        if not isinstance(h[key], int) or isinstance(h[key], bool) or h[key] < 0:
            raise SchemaError(f"{where}: {key!r} is {h[key]!r}, not a count")
    for key in ("p50", "p90", "p99", "p999", "max"):
        v = h.get(key)
        if v is not None and (not isinstance(v, _NUMBERS) or isinstance(v, bool)):
            raise SchemaError(f"{where}: {key!r} is {v!r}, not a number")
    ci = h.get("ci", {})
    _expect(ci, dict, f"{where}: 'ci'")
    for key, bounds in ci.items():
        if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2 and all(
                isinstance(b, _NUMBERS) and not isinstance(b, bool) for b in bounds)):
            raise SchemaError(f"{where}: 'ci' {key!r} is {bounds!r}, not [low, high] or null")
    if with_hdr:
        _expect(h["hdr"], str, f"{where}: 'hdr'")
        _hdr(h["hdr"], f"{where}: 'hdr'")
    intervals = h.get("intervals", [])
    _expect(intervals, list, f"{where}: 'intervals'")
    for n, iv in enumerate(intervals):
        w = f"{where} intervals[{n}]"
        _expect(iv, dict, w)
        for key in ("start_s", "end_s"):
            if not isinstance(iv.get(key), _NUMBERS) or isinstance(iv.get(key), bool):
                raise SchemaError(f"{w}: {key!r} is {iv.get(key)!r}, not a time in seconds")
        _expect(iv.get("hdr"), str, f"{w}: 'hdr'")
        _hdr(iv["hdr"], f"{w}: 'hdr'", full=False)


def _hdr(text: str, where: str, full: bool = True) -> None:
    """``text`` must be an ``HdrHistogram.encode()``: base64, and (``full``) decodable."""
    import base64
    import binascii

    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise SchemaError(f"{where} is not base64 (an HdrHistogram encoding)") from None
    if not raw:
        raise SchemaError(f"{where} is empty, not an HdrHistogram encoding")
    if full:
        try:
            HdrHistogram.decode(text.encode("ascii"))
        except Exception as exc:  # the codec raises its own kinds
            raise SchemaError(f"{where} is not an HdrHistogram encoding "
                              f"({type(exc).__name__})") from None


def dump(run: Run, path: str | os.PathLike) -> None:
    """Write atomically, so a crash or Ctrl-C never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(_finite(run.to_dict()), fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def _finite(obj):
    """NaN and infinities written as null (no value): JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _no_constant(name: str):
    raise SchemaError(f"{name} is not a JSON number; a results file holds finite numbers")


def load(path: str | os.PathLike) -> Run:
    with open(path) as fh:
        data = json.load(fh, parse_constant=_no_constant)
    validate(data)
    return Run(data["environment"], [Cell.from_dict(c) for c in data["cells"]])
