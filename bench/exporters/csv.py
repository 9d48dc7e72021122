"""One row per cell: params, metrics (with the lowest and highest repeat where a cell
has several), histogram statistics. Units are in the header: ``publish.p99 [us]``,
``throughput_per_s [1/s]``; a column without brackets is a count or a label."""
from __future__ import annotations

import csv as csv_module
import io
import json

from .. import results
from ..report import column_value, metric_unit, spec_unit

HIST_STATS = ("count", *results.PERCENTILES, "max", "overflow")


def _head(name: str, unit: str) -> str:
    return f"{name} [{unit}]" if unit else name


def _text(value):
    """Lists and objects (a search's steps) as JSON, not Python's repr."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def csv(run: results.Run) -> str:
    cells = run.cells
    params = list(dict.fromkeys(k for c in cells for k in c.params))
    metrics = list(dict.fromkeys(k for c in cells for k in c.metrics))
    spread = [m for m in metrics if any(m in c.spread for c in cells)]
    hists = list(dict.fromkeys(f"{h}.{s}" for c in cells for h in c.histograms
                               for s in HIST_STATS))
    header = ["scenario", "cell", "status", "reason", *params, "repeats"]
    header += [_head(m, metric_unit(m)) for m in metrics]
    header += [_head(f"{m}.{end}", metric_unit(m)) for m in spread for end in ("min", "max")]
    header += [_head(h, spec_unit(h, cells)) for h in hists]
    out = io.StringIO()
    writer = csv_module.writer(out, lineterminator="\n")
    writer.writerow(header)
    for c in cells:
        writer.writerow([
            c.scenario, c.key, c.status, c.reason,
            *(c.params.get(k, "") for k in params), len(c.repeats),
            *(_text(c.metrics.get(k, "")) for k in metrics),
            *(c.spread.get(m, {}).get(end, "") for m in spread for end in ("min", "max")),
            *("" if (v := column_value(c, h)) is None else v for h in hists)])
    return out.getvalue()
