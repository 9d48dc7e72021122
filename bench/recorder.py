"""Cheap recording on the hot path, histograms after.

The measured loop only stores ``time.perf_counter_ns()`` readings into
preallocated ``array('q')`` buffers (one store per reading, no allocation), so
the harness does not slow what it measures; :class:`Recorder` turns the
differences into an HdrHistogram once the loop is over, and, given the time of
each reading, into interval histograms (1 s by default) that show a latency
spike over time (HdrHistogram's log format, ``report --format hlog``).

``perf_counter_ns`` is CLOCK_MONOTONIC on Linux, one clock for every process
on the host, so timestamps carried in messages compare across processes.
"""
from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass, field

import numpy as np
from hdrh.histogram import HdrHistogram

now_ns = time.perf_counter_ns

UNIT = "us"
LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: longer values are clamped and counted as overflow
SIGNIFICANT_FIGURES = 3
INTERVAL_S = 1.0            # interval histograms' length
MAX_INTERVALS = 3600        # a cell longer than this many intervals gets wider ones


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def histogram(values_us, highest: int = HIGHEST_US) -> tuple[HdrHistogram, int, int]:
    """HdrHistogram of ``values_us`` (any int/float sequence), the overflow count, and the
    count of invalid readings (negative or NaN: a clock or accounting bug, left out and
    counted, never recorded as 1 us).

    Values above the range are clamped to ``highest`` and counted; values in [0, 1) us
    are recorded as 1 us (the histogram's floor). Equal values are recorded once with
    their count, so a million samples cost a few thousand calls.
    """
    v = np.asarray(values_us, dtype=np.float64)
    hist = new_histogram()
    if v.size == 0:
        return hist, 0, 0
    valid = np.isfinite(v) & (v >= 0)
    invalid = int(v.size - np.count_nonzero(valid))
    v = np.rint(v[valid]).astype(np.int64)
    overflow = int(np.count_nonzero(v > highest))
    np.clip(v, LOWEST_US, highest, out=v)
    uniq, counts = np.unique(v, return_counts=True)
    record = hist.record_value
    for value, count in zip(uniq.tolist(), counts.tolist()):
        record(value, count)
    return hist, overflow, invalid


def ns_to_us(values_ns) -> np.ndarray:
    return np.asarray(values_ns, dtype=np.float64) / 1000.0


def epoch_offset_ns() -> int:
    """Add to a perf_counter_ns reading to get Unix time in ns (for logs read by others)."""
    return time.time_ns() - time.perf_counter_ns()


class Timestamps:
    """Preallocated columns of nanosecond readings for ``capacity`` events.

    Use in a hot loop as ``start = ts.start; ...; start[i] = now_ns()`` (bind the
    column to a local first). ``count`` is set by the caller when the loop ends.
    """

    def __init__(self, capacity: int, columns=("start", "end")):
        self.capacity = int(capacity)
        self.count = 0
        zero = bytes(8 * self.capacity)
        for name in columns:
            setattr(self, name, array("q", zero))
        self.columns = tuple(columns)

    def column(self, name: str) -> np.ndarray:
        """The first ``count`` readings of ``name`` as an int64 array (no copy)."""
        return np.frombuffer(getattr(self, name), dtype=np.int64)[: self.count]


@dataclass
class Interval:
    start_s: float          # Unix time the interval starts
    end_s: float
    hist: HdrHistogram


@dataclass
class Recorded:
    """One histogram of one repeat, with what was left out of it."""
    hist: HdrHistogram
    overflow: int = 0
    unit: str = UNIT
    invalid: int = 0
    intervals: list = field(default_factory=list)   # [Interval], in time order


def merge(recs: dict[str, Recorded], more: dict[str, Recorded]) -> dict[str, Recorded]:
    """Fold ``more`` (name -> Recorded) into ``recs``, in place: every sample of every
    histogram, with what was left out of each summed. The first of a name sets the shape."""
    for name, rec in more.items():
        into = recs.get(name)
        if into is None:
            h = rec.hist
            into = recs[name] = Recorded(HdrHistogram(h.lowest_trackable_value,
                                                      h.highest_trackable_value,
                                                      h.significant_figures), 0, rec.unit)
        into.hist.add(rec.hist)
        into.overflow += rec.overflow
        into.invalid += rec.invalid
        into.intervals += rec.intervals
    return recs


def intervals(values_us, at_ns, interval_s: float = INTERVAL_S,
              offset_ns: int | None = None) -> list[Interval]:
    """Interval histograms of ``values_us`` by the perf_counter_ns time ``at_ns`` of each
    reading (same length), built after the loop: one sort, then one histogram per slice."""
    at = np.asarray(at_ns, dtype=np.int64)
    v = np.asarray(values_us, dtype=np.float64)
    if at.size == 0 or at.size != v.size:
        return []
    offset = epoch_offset_ns() if offset_ns is None else offset_ns
    t0, t1 = int(at.min()), int(at.max())
    width_ns = int(interval_s * 1e9)
    if (t1 - t0) // width_ns + 1 > MAX_INTERVALS:  # bounded size, whatever the duration
        width_ns = math.ceil((t1 - t0 + 1) / MAX_INTERVALS)
    slot = (at - t0) // width_ns
    order = np.argsort(slot, kind="stable")
    slot, v = slot[order], v[order]
    bounds = np.flatnonzero(np.diff(slot)) + 1
    out = []
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, slot.size]):
        k = int(slot[lo])
        hist, _, _ = histogram(v[lo:hi])
        start = (t0 + k * width_ns + offset) / 1e9
        out.append(Interval(start, start + width_ns / 1e9, hist))
    return out


class Recorder:
    """Collects one repeat's histograms (``name -> Recorded``) for an Outcome."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.histograms: dict[str, Recorded] = {}
        self.interval_s = interval_s

    def add(self, name: str, values_us, unit: str = UNIT, at_ns=None) -> Recorded:
        """Record ``values_us``; with ``at_ns`` (the perf_counter_ns time of each value)
        also interval histograms."""
        hist, overflow, invalid = histogram(values_us)
        rec = Recorded(hist, overflow, unit, invalid)
        if at_ns is not None:
            rec.intervals = intervals(values_us, at_ns, self.interval_s)
        self.histograms[name] = rec
        return rec
