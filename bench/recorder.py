"""Cheap recording on the hot path, histograms after.

The measured loop only stores ``time.perf_counter_ns()`` readings into
preallocated ``array('q')`` buffers (one store per reading, no allocation), so
the harness does not slow what it measures; :func:`histogram` turns the
differences into an HdrHistogram once the loop is over.

``perf_counter_ns`` is CLOCK_MONOTONIC on Linux, one clock for every process
on the host, so timestamps carried in messages compare across processes.
"""
from __future__ import annotations

import time
from array import array

import numpy as np
from hdrh.histogram import HdrHistogram

now_ns = time.perf_counter_ns

UNIT = "us"
LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: longer values are clamped and counted as overflow
SIGNIFICANT_FIGURES = 3


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def histogram(values_us, highest: int = HIGHEST_US) -> tuple[HdrHistogram, int]:
    """HdrHistogram of ``values_us`` (any int/float sequence) and the overflow count.

    Values above the range are clamped to ``highest`` and counted; values below
    1 us are recorded as 1 us. Equal values are recorded once with their count,
    so a million samples cost a few thousand calls.
    """
    v = np.rint(np.asarray(values_us, dtype=np.float64)).astype(np.int64)
    hist = new_histogram()
    if v.size == 0:
        return hist, 0
    overflow = int(np.count_nonzero(v > highest))
    np.clip(v, LOWEST_US, highest, out=v)
    uniq, counts = np.unique(v, return_counts=True)
    record = hist.record_value
    for value, count in zip(uniq.tolist(), counts.tolist()):
        record(value, count)
    return hist, overflow


def ns_to_us(values_ns) -> np.ndarray:
    return np.asarray(values_ns, dtype=np.float64) / 1000.0


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

    def diff_us(self, later: str, earlier: str) -> np.ndarray:
        return (self.column(later) - self.column(earlier)) / 1000.0


class Recorder:
    """Collects one repeat's histograms in the shape ``results.aggregate`` expects."""

    def __init__(self):
        self.histograms: dict = {}

    def add(self, name: str, values_us, unit: str = UNIT) -> HdrHistogram:
        hist, overflow = histogram(values_us)
        self.histograms[name] = (hist, overflow, unit)
        return hist

    def add_histogram(self, name: str, hist: HdrHistogram, overflow: int = 0, unit: str = UNIT):
        self.histograms[name] = (hist, overflow, unit)
