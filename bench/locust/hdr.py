"""Every Locust request into an HdrHistogram, as it happens, in fixed memory.

Locust keeps response times rounded to whole milliseconds; a :class:`Book` keeps
each request row's exact distribution: microseconds, 1 us to 1 h, 3 significant
digits (``bench.recorder``'s histogram: ~190 KB per row whatever the count; values
under 1 us count as 1 us, over an hour as an hour and as ``overflow``; a negative
or NaN value, a clock bug, is left out and counted as ``invalid``).

A row is ``(request_type, name, kind)``; kind ``""`` is the request as Locust saw it,
``"intended"`` the same latency measured from the request's intended start in open
loop (coordinated omission corrected), ``"lag"`` how late those starts were. An
operation's stages arrive in its request's context (``parts``) and get rows of their
own.
``requests`` and ``failures`` count like Locust's Request Count and Failure Count
(a failure counts as a request); the histogram holds the successes.

Distributed: a Locust worker records into its Book and hands over what it recorded
since its last report with :meth:`Book.take` (``HdrHistogram.encode()`` text, inside
Locust's ``report_to_master`` data); the master adds it up with :meth:`Book.merge`
(``decode_and_add``). Nothing here imports Locust.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from ..recorder import HIGHEST_US, LOWEST_US, new_histogram

KEY = "celery_bench"      # our entry in a worker's report
VERSION = 1
MAX_ERRORS = 5            # distinct failure messages kept per row (the rest: "(other errors)")
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9),
               ("p9999", 99.99))
# Context keys a row remembers (the first it sees) and the results file carries.
META_KEYS = ("user_class", "transport", "clock", "primary", "from_start", "task",
             "join_method", "group_size", "backend", "polled")


def _meta(ctx: dict) -> dict:
    return {k: ctx[k] for k in META_KEYS if k in ctx}


@dataclass
class Row:
    hist: HdrHistogram = field(default_factory=new_histogram)
    requests: int = 0
    failures: int = 0
    overflow: int = 0
    invalid: int = 0
    meta: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)   # message -> count, MAX_ERRORS messages

    def error(self, message: str, n: int = 1) -> None:
        if message not in self.errors and len(self.errors) >= MAX_ERRORS:
            message = "(other errors)"
        self.errors[message] = self.errors.get(message, 0) + n

    def record_us(self, us: float) -> None:
        if not us >= 0:                 # negative or NaN
            self.invalid += 1
            return
        value = int(us + 0.5)
        if value > HIGHEST_US:
            self.overflow += 1
            value = HIGHEST_US
        self.hist.record_value(value if value >= LOWEST_US else LOWEST_US)

    def empty(self) -> bool:
        return not (self.requests or self.invalid or self.hist.get_total_count())

    def clear(self) -> None:
        self.hist.reset()
        self.requests = self.failures = self.overflow = self.invalid = 0
        self.errors = {}

    def percentiles(self) -> dict:
        """p50 .. p99.99 and max in microseconds (None when nothing succeeded)."""
        count = self.hist.get_total_count()
        if not count:
            return {**{name: None for name, _ in PERCENTILES}, "max": None}
        values = self.hist.get_percentile_to_value_dict([p for _, p in PERCENTILES])
        out = {name: values[p] for name, p in PERCENTILES}
        out["max"] = self.hist.get_max_value()
        return out


class Book:
    """The rows of one Locust process (or, on the master, of all its workers)."""

    def __init__(self):
        self.rows: dict[tuple, Row] = {}
        self.counters: dict[str, int] = {}   # additive (open loop: "due", "started")

    def row(self, key: tuple, meta: dict | None = None) -> Row:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = Row(meta=dict(meta or {}))
        elif meta and not row.meta:
            row.meta = dict(meta)
        return row

    def record(self, request_type: str, name: str, response_time_ms, exception=None,
               context: dict | None = None) -> None:
        """One ``events.request``. In ``context``: ``schedule_lag_us`` (open loop) makes an
        ``intended`` row for requests timed from the operation's start (``from_start``), and
        a ``lag`` row for the operation's primary request (``primary``)."""
        ctx = context or {}
        row = self.rows.get((request_type, name, "")) or \
            self.row((request_type, name, ""), _meta(ctx))
        row.requests += 1
        us = response_time_ms * 1000.0 if response_time_ms is not None else math.nan
        lag = ctx.get("schedule_lag_us")
        if exception is not None:
            row.failures += 1
            row.error(f"{type(exception).__name__}: {exception}"[:300])
        else:
            row.record_us(us)
            if lag is not None and ctx.get("from_start"):
                intended = self.row((request_type, name, "intended"), row.meta)
                intended.requests += 1
                intended.record_us(us + lag)
        if lag is not None and ctx.get("primary"):
            late = self.row((request_type, name, "lag"), row.meta)
            late.requests += 1
            late.record_us(lag)
        for part in ctx.get("parts", ()):   # an operation's stages: rows of their own
            self.record(part["request_type"], name, part["response_time"], None,
                        part["context"])

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # -- distribution
    def take(self) -> dict:
        """What was recorded since the last take, encoded for a worker's report; the rows
        are cleared (their memory is kept)."""
        rows = []
        for (request_type, name, kind), row in self.rows.items():
            if row.empty():
                continue
            rows.append({"type": request_type, "name": name, "kind": kind,
                         "hdr": row.hist.encode().decode("ascii"),
                         "requests": row.requests, "failures": row.failures,
                         "overflow": row.overflow, "invalid": row.invalid, "meta": row.meta,
                         "errors": row.errors})
            row.clear()
        counters, self.counters = self.counters, {}
        return {"v": VERSION, "rows": rows, "counters": counters}

    def merge(self, payload: dict | None) -> int:
        """Add a worker's :meth:`take`; returns the requests it carried."""
        if not payload:
            return 0
        if payload.get("v") != VERSION:
            raise ValueError(f"celery-bench report version {payload.get('v')!r}, expected "
                             f"{VERSION}: run the same celery-bench on master and workers")
        added = 0
        for item in payload.get("rows", ()):
            row = self.row((item["type"], item["name"], item["kind"]), item.get("meta"))
            row.hist.decode_and_add(item["hdr"])
            row.requests += item["requests"]
            row.failures += item["failures"]
            row.overflow += item["overflow"]
            row.invalid += item["invalid"]
            for message, n in item.get("errors", {}).items():
                row.error(message, n)
            if not item["kind"]:
                added += item["requests"]
        for name, n in payload.get("counters", {}).items():
            self.count(name, n)
        return added

    def reset(self) -> None:
        self.rows = {}
        self.counters = {}

    # -- reading
    def requests(self) -> dict[tuple, int]:
        """Requests per (request_type, name), as Locust counts them."""
        return {(t, n): r.requests for (t, n, kind), r in self.rows.items() if not kind}

    def operations(self) -> tuple[int, int]:
        """(operations, failed operations): each publish, round trip or join counted once,
        by its primary request (a round trip reports five requests, one of them primary)."""
        primary = [r for (t, n, kind), r in self.rows.items()
                   if not kind and r.meta.get("primary", True)]
        return sum(r.requests for r in primary), sum(r.failures for r in primary)

    def sorted_rows(self):
        """(key, row) in display order: by name, then the request's own row, its intended
        row, its lag row."""
        order = {"": 0, "intended": 1, "lag": 2}
        return sorted(self.rows.items(), key=lambda kv: (kv[0][1], order.get(kv[0][2], 3),
                                                         kv[0][0]))
