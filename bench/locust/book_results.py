"""What a Book holds, as a celery-bench results file and as a percentile spectrum.

One cell per request row (scenario ``locust``): params say what ran (request type,
name, user class, transport, clock) and how (Locust users and workers, arrival
rate, Celery workers); histograms ``latency`` (the request as timed), ``intended``
(from the intended start, open loop) and ``lag`` (schedule lag of its operation).
``celery-bench show/compare/report`` read it like any run.
"""
from __future__ import annotations

import math

from .. import recorder, results
from .hdr import Book

KIND_NOTES = {"": "", "intended": "from intended start", "lag": "schedule lag"}
# Percentile spectrum: x is the percentile, drawn as 1/(1 - p) on a log axis.
SPECTRUM = (0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 98.0, 99.0, 99.5, 99.8, 99.9, 99.95, 99.98,
            99.99, 99.995, 99.999, 99.9995, 99.9999)


def _recorded(row) -> recorder.Recorded:
    return recorder.Recorded(row.hist, row.overflow, invalid=row.invalid)


def cells(book: Book, common: dict, elapsed_s: float, rate: dict | None = None) -> list:
    """The results cells of ``book``: ``common`` params for every cell, ``rate`` the open
    loop's metrics (pacing.achieved) added to each operation's cell."""
    out = []
    for (request_type, name, kind), row in book.sorted_rows():
        if kind:
            continue
        hists = {"latency": _recorded(row)}
        for extra in ("intended", "lag"):
            other = book.rows.get((request_type, name, extra))
            if other is not None and other.hist.get_total_count():
                hists[extra] = _recorded(other)
        meta = row.meta
        params = {"request_type": request_type, "name": name,
                  **{k: meta[k] for k in ("user_class", "transport", "clock", "task",
                                          "join_method", "group_size", "backend")
                     if meta.get(k) is not None},
                  **common}
        ok = row.requests - row.failures
        metrics = {"requests": row.requests, "failures": row.failures, "errors": row.failures,
                   "sent": row.requests,
                   "throughput_per_s": ok / elapsed_s if elapsed_s > 0 else 0.0,
                   "duration_s": round(elapsed_s, 3), "overflow": row.overflow,
                   "invalid": row.invalid}
        if rate and meta.get("primary", True):
            metrics.update(rate)
        cell = results.aggregate("locust", params, [{"metrics": metrics, "histograms": hists}])
        notes = [f"Locust request type {request_type!r}, name {name!r}"]
        if meta.get("primary") is False:
            notes.append("one part of an operation")
        if row.failures:
            notes.append(f"{row.failures} of {row.requests} failed: " + ", ".join(
                f"{message} (x{n})" for message, n in row.errors.items()))
        if row.invalid:
            notes.append(f"{row.invalid} negative readings left out (clocks disagree)")
        if meta.get("polled"):
            notes.append(meta["polled"])
        if row.requests and not ok:
            cell.status = "failed"
        cell.reason = "; ".join(notes)
        out.append(cell)
    return out


def run(book: Book, common: dict, elapsed_s: float, rate: dict | None = None) -> results.Run:
    return results.Run(results.environment(), cells(book, common, elapsed_s, rate))


def label(key: tuple) -> tuple[str, str, str]:
    """(type, name, note) of a row as the UI shows it."""
    request_type, name, kind = key
    return request_type, name, KIND_NOTES.get(kind, kind)


def table(book: Book) -> list[dict]:
    """One dict per row: type, name, requests, fails, p50 .. p9999, max (us), note."""
    rows = []
    for key, row in book.sorted_rows():
        request_type, name, note = label(key)
        clock = row.meta.get("clock")
        if clock and clock != "monotonic":
            note = f"{note}; clock {clock}".lstrip("; ")
        if row.invalid:
            note = f"{note}; {row.invalid} negative left out".lstrip("; ")
        if row.meta.get("polled"):
            note = f"{note}; {row.meta['polled']}".lstrip("; ")
        rows.append({"type": request_type, "name": name, "requests": row.requests,
                     "fails": row.failures, **row.percentiles(), "note": note})
    return rows


def spectrum(book: Book) -> list[dict]:
    """Per row with data: label and [[percentile, us], ...] up to what its count supports
    (no p99.99 from 100 samples), the last point being the max."""
    out = []
    for key, row in book.sorted_rows():
        count = row.hist.get_total_count()
        if not count:
            continue
        usable = [p for p in SPECTRUM if p == 0 or 1.0 / (1.0 - p / 100.0) <= count]
        values = row.hist.get_percentile_to_value_dict(usable)
        points = [[p, values[p]] for p in usable]
        top = usable[-1] if usable else 0.0
        last = min(99.9999, max(top, 100.0 * (1.0 - 1.0 / (count + 1))))
        if last > top:
            points.append([last, row.hist.get_max_value()])
        request_type, name, note = label(key)
        out.append({"label": " ".join(x for x in (request_type, name, note and f"({note})") if x),
                    "count": count, "points": points})
    return out


def x_of(percentile: float) -> float:
    """Where a percentile sits on the spectrum's axis: log10(1 / (1 - p))."""
    return math.log10(1.0 / max(1e-9, 1.0 - percentile / 100.0))
