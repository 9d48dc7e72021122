"""What goes on which chart, without drawing anything: cells cut into facets of at most
:data:`MAX_CURVES` by the params that vary, histogram kinds, rate sweeps and max-rate
searches, interval series. :mod:`.charts` draws what these return (matplotlib, SVG);
kept apart so the grouping is tested and reused without a plotting library.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

from .. import results

MAX_CURVES = 6


TO_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}


# Rate metrics of sweeps, not throughputs of their own (drawn against rate instead).
SWEEP_METRICS = ("rate_target_per_s", "rate_achieved_per_s", "backlog_growth_per_s",
                 "max_sustainable_rate_per_s")


def cell_label(cell: results.Cell, keys, with_names: bool = False) -> str:
    """The cell's values of ``keys`` (those it has: a sweep's ``rate`` is not everyone's)."""
    keys = [k for k in keys if k in cell.params]
    if not keys:
        return cell.scenario
    if with_names:
        return ", ".join(f"{k}={_value(cell.params[k])}" for k in keys)
    return " · ".join(_value(cell.params[k]) for k in keys)


def _value(v) -> str:
    """A param as a label: a whole float without its ``.0`` (rate=500)."""
    return f"{v:g}" if isinstance(v, float) and v.is_integer() and abs(v) < 1e15 else str(v)


def varying_keys(cells) -> list:
    keys = list(dict.fromkeys(k for c in cells for k in c.params))
    return [k for k in keys if len({str(c.params.get(k)) for c in cells}) > 1]


@dataclass
class Facet:
    """Cells drawn on one chart: ``shared`` params said in its title, ``keys`` telling
    its curves apart."""
    shared: dict
    cells: list
    keys: list = field(default_factory=list)

    @property
    def title(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.shared.items())


def shared_params(cells) -> dict:
    """Params every one of ``cells`` has, with the same value."""
    keys = list(dict.fromkeys(k for c in cells for k in c.params))
    return {k: cells[0].params[k] for k in keys
            if all(k in c.params and str(c.params[k]) == str(cells[0].params[k]) for c in cells)}


def facets(cells, max_curves: int = MAX_CURVES) -> list[Facet]:
    """``cells`` cut into facets of at most ``max_curves``: by the varying param that
    needs the fewest facets (the earlier param on a tie), recursively, then small
    neighbours merged back while they fit."""
    keys = varying_keys(cells)
    if len(cells) <= max_curves or not keys:
        if len(cells) <= max_curves:
            return [Facet(shared_params(cells), list(cells), keys)]
        return [Facet(dict(shared_params(cells), part=i // max_curves + 1),
                      list(cells[i:i + max_curves]), keys)
                for i in range(0, len(cells), max_curves)]

    def split(key):
        groups: dict[str, list] = {}
        for c in cells:
            groups.setdefault(str(c.params.get(key)), []).append(c)
        return groups

    best = min(keys, key=lambda k: (sum(math.ceil(len(g) / max_curves)
                                        for g in split(k).values()), keys.index(k)))
    out: list[Facet] = []
    for value, group in split(best).items():
        out += facets(group, max_curves)
    merged: list[Facet] = []
    for f in out:
        last = merged[-1] if merged else None
        if last and len(last.cells) + len(f.cells) <= max_curves:
            together = last.cells + f.cells
            merged[-1] = Facet(shared_params(together), together, varying_keys(together))
        else:
            merged.append(f)
    return merged


def spectrum_facets(cells, max_curves: int = MAX_CURVES) -> list[tuple[Facet, list]]:
    """``(facet, kinds)`` for the ok cells with histograms: cells with different sets of
    histogram kinds (a sweep's, memory's without e2e) are never on one chart."""
    groups: dict[tuple, list] = {}
    for c in cells:
        if c.status == "ok" and hist_kinds([c]):
            groups.setdefault(tuple(hist_kinds([c])), []).append(c)
    order = hist_kinds(cells)
    out = []
    for kinds, group in groups.items():
        kinds = sorted(kinds, key=order.index)
        out += [(f, kinds) for f in facets(group, max_curves)]
    return out


def hist_kinds(cells) -> list[str]:
    return list(dict.fromkeys(h for c in cells for h, s in c.histograms.items()
                              if s.get("count") and s.get("hdr")))


def rate_metrics(summary, cells) -> list[str]:
    """The throughput metrics to draw as bars: the table's ``_per_s`` columns (or every
    ``_per_s`` metric), sweep bookkeeping left out."""
    specs = [s for s, _ in summary if s.endswith("_per_s")] or \
        list(dict.fromkeys(m for c in cells for m in c.metrics if m.endswith("_per_s")))
    return [m for m in specs if m not in SWEEP_METRICS
            and any(isinstance(c.metrics.get(m), (int, float)) for c in cells)]


@dataclass
class Sweep:
    """Ok cells that differ only in a numeric ``rate`` param, in rate order."""
    scenario: str
    shared: dict
    cells: list
    max_rate: float | None = None
    slo: object = None

    @property
    def title(self) -> str:
        return f"{self.scenario}: " + ", ".join(f"{k}={v}" for k, v in self.shared.items())


def _rate(cell):
    try:
        return float(cell.params["rate"])
    except (KeyError, TypeError, ValueError):
        return None


def sweeps(cells) -> list[Sweep]:
    """Groups of 2+ ok cells of one scenario that differ only in a numeric ``rate``,
    each with the maximum sustainable rate when a cell of the group, or a cell with the
    same other params, holds ``max_sustainable_rate_per_s``."""
    groups: dict[str, Sweep] = {}
    for c in cells:
        if c.status == "ok" and _rate(c) is not None:
            shared = {k: v for k, v in c.params.items() if k != "rate"}
            key = results.cell_key(c.scenario, shared)
            groups.setdefault(key, Sweep(c.scenario, shared, [])).cells.append(c)
    out = []
    for sweep in groups.values():
        if len(sweep.cells) < 2:
            continue
        sweep.cells.sort(key=_rate)
        for c in cells:
            if c.scenario != sweep.scenario or "max_sustainable_rate_per_s" not in c.metrics:
                continue
            # the search cell says rate=max and its slo as params; the rest must match
            own = {k: str(v) for k, v in c.params.items() if k not in ("rate", "slo")}
            if all(str(sweep.shared.get(k)) == v for k, v in own.items()):
                sweep.max_rate = c.metrics["max_sustainable_rate_per_s"]
                sweep.slo = c.metrics.get("slo")
                break
        out.append(sweep)
    return out


def searches(cells) -> list:
    """Max-rate search cells: ok cells with ``max_sustainable_rate_per_s``."""
    return [c for c in cells if c.status == "ok"
            and isinstance(c.metrics.get("max_sustainable_rate_per_s"), (int, float))]


def slo_us(slo) -> float | None:
    """The latency bound of an SLO such as ``p99<=10ms``, in us."""
    m = re.search(r"<=?\s*([\d.]+)\s*(ns|us|ms|s)\b", str(slo or ""))
    return float(m.group(1)) * TO_US[m.group(2)] if m else None


def interval_series(summary: dict):
    """(seconds since the first interval, p50, p99, max) per interval, in us; a gap
    (between repeats) becomes a break in the line."""
    from hdrh.histogram import HdrHistogram

    ivs = sorted(summary.get("intervals") or (), key=lambda iv: iv["start_s"])
    if not ivs:
        return None
    scale = TO_US.get(summary.get("unit", "us"), 1.0)
    width = statistics.median(iv["end_s"] - iv["start_s"] for iv in ivs) or 1.0
    t0 = ivs[0]["start_s"]
    out = ([], [], [], [])
    last_end = None
    for iv in ivs:
        h = HdrHistogram.decode(iv["hdr"].encode("ascii"))
        if not h.get_total_count():
            continue
        if last_end is not None and iv["start_s"] - last_end > 0.5 * width:
            for col in out:
                col.append(float("nan"))
        out[0].append((iv["start_s"] + iv["end_s"]) / 2 - t0)
        out[1].append(h.get_value_at_percentile(50) * scale)
        out[2].append(h.get_value_at_percentile(99) * scale)
        out[3].append(h.get_max_value() * scale)
        last_end = iv["end_s"]
    return out


def cells_with_intervals(cells, kind: str) -> list:
    return [c for c in cells if c.status == "ok" and c.histograms.get(kind, {}).get("intervals")]
