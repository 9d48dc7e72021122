"""Interval histograms as an HdrHistogram log (``.hlog``), written with
``hdrh.log.HistogramLogWriter`` and read back by ``hdrh.log.HistogramLogReader``,
Java's ``HistogramLogProcessor`` and HistogramLogAnalyzer.

One log for the whole run, a tag per cell and histogram
(``Tag=publish[api=kombu;producer=held;...]/publish``): the log format is made for
several tagged streams on one time line, so a latency spike in one cell lines up with
what the other cells saw at the same moment, and the tools pick a stream by tag
(``HistogramLogProcessor -tag ...``). A histogram recorded without intervals is written
as one interval spanning its cell's repeats.

Timestamps are seconds since ``#[BaseTime]`` (the first interval's start, Unix time);
values are microseconds (``Interval_Max`` is in milliseconds): with Java's
``HistogramLogProcessor`` pass ``-outputValueUnitRatio 1000`` to print milliseconds.
"""
from __future__ import annotations

import calendar
import math
import time
from pathlib import Path

from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogWriter

from .. import results
from .hgrm import TO_MS

MIN_LENGTH_S = 0.001   # the reader drops a line whose length would print as negative


def tag(cell_key: str, hist_name: str) -> str:
    """A log tag may not hold commas or whitespace (they end the tag field)."""
    return "".join("_" if ch.isspace() else ch
                   for ch in f"{cell_key}/{hist_name}".replace(",", ";"))


def _utc(text) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def _span(cell: results.Cell, run: results.Run) -> tuple[float, float]:
    """When a cell without interval histograms ran: its first repeat's start, for the
    sum of its repeats' elapsed time (else the run's time, 1 s)."""
    starts = [_utc(r.get("started_utc")) for r in cell.repeats]
    starts = [s for s in starts if s is not None]
    start = min(starts) if starts else _utc(run.environment.get("utc_time")) or time.time()
    elapsed = sum(float(r.get("elapsed_s") or 0) for r in cell.repeats) or 1.0
    return start, start + elapsed


def entries(run: results.Run, hist_names=None) -> list[tuple]:
    """``(start_s, end_s, tag, unit, HdrHistogram)`` for every interval, in time order."""
    out = []
    for cell in run.cells:
        if cell.status != "ok":
            continue
        for name, summary in cell.histograms.items():
            if (hist_names and name not in hist_names) or not summary.get("hdr") \
                    or not summary.get("count"):
                continue
            unit, label = summary.get("unit", "us"), tag(cell.key, name)
            ivs = summary.get("intervals") or []
            if ivs:
                for iv in ivs:
                    out.append((float(iv["start_s"]), float(iv["end_s"]), label, unit,
                                HdrHistogram.decode(iv["hdr"].encode("ascii"))))
            else:
                start, end = _span(cell, run)
                out.append((start, end, label, unit, results.decode(summary)))
    return sorted(out, key=lambda e: (e[0], e[2]))


def _start_time(first: float) -> float:
    """``StartTime`` and ``BaseTime``: the first interval's start floored to a whole
    millisecond, so it prints exactly in three decimals and is never after that start
    (a reader skips every interval that starts before ``StartTime``)."""
    base = math.floor(first * 1000.0) / 1000.0
    return base - 0.001 if base > first else base    # float product rounded up


def hlog(run: results.Run, path, hist_names=None) -> Path:
    """Write the run's interval histograms to ``path``; returns it."""
    rows = entries(run, hist_names)
    if not rows:
        raise ValueError("no recorded histogram to write (check --cell / --hist)")
    base = _start_time(rows[0][0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        writer = HistogramLogWriter(fh)
        env = run.environment
        writer.output_comment(f"[celery-bench run of {env.get('utc_time', '?')}, celery "
                              f"{env.get('celery', '?')}, kombu {env.get('kombu', '?')}, "
                              f"values in us]")
        writer.output_log_format_version()
        # hdrh's output_start_time cannot format its date (0.10): the same line by hand
        iso = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime(base))
        writer.output_comment(f"[StartTime: {base:.3f} (seconds since epoch), {iso}]")
        writer.output_base_time(base * 1000.0)
        writer.output_legend()
        for start, end, label, unit, hist in rows:
            fh.write(f"Tag={label},")
            rel = start - base
            writer.output_interval_histogram(
                hist, rel, rel + max(end - start, MIN_LENGTH_S),
                max_value_unit_ratio=TO_MS.get(unit, 1e3))
    return path
