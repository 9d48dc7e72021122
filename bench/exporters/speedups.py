"""What the HTML tables add to the terminal's: each cell's ratio to its reference with a
95% interval, the tail percentiles, and the calibration loop kept out of the results.

The references are the terminal's own: a publish cell against the ``producer=held``
rung of its ladder (``compare --by producer``), a join method against ``join_native``,
and the ratios the scenarios record themselves per round (``x_memory`` of consume,
``x_amqp``/``x_redis`` of the worker, ``speedup`` = x serial of fanout). Every ratio is
the median of per-round ratios and a t-interval on their logs
(:func:`bench.stats.paired_ratio_interval`), the statistics compare and gate use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import results, stats

# (scenario, param, reference value, metric, higher is better): ratios computed here.
PAIRED_REFERENCES = (
    ("publish", "producer", "held", "throughput_per_s", True),
    ("join", "method", "join_native", "total.p50", False),
)
# Ratios a scenario records in each repeat: metric -> header.
RECORDED = {"x_memory": "x memory", "x_amqp": "x amqp", "x_redis": "x redis",
            "speedup": "x serial"}
TAIL_STATS = (("p90", "p90"), ("p999", "p99.9"), ("max", "max"))


def is_calibration(cell: results.Cell) -> bool:
    """The CPU calibration loop (``publish[api=calibration]``): the machine's yardstick,
    not a result."""
    return str(cell.params.get("api")) == "calibration"


def result_cells(cells) -> list:
    return [c for c in cells if not is_calibration(c)]


def calibration_cells(cells) -> list:
    return [c for c in cells if is_calibration(c)]


@dataclass
class Ratio:
    """A column of ratios: ``values`` maps ``id(cell)`` to its Interval."""
    header: str
    explain: str
    values: dict = field(default_factory=dict)

    def text(self, cell) -> str:
        iv = self.values.get(id(cell))
        if iv is None or iv.point is None:
            return "-"
        if not iv.bounded:
            return f"{iv.point:.2f}x (n={iv.n}: no interval)"
        return f"{iv.point:.2f}x ({iv.lo:.2f}-{iv.hi:.2f})"


def _recorded(cells, metric: str) -> dict:
    out = {}
    for c in cells:
        values = [float(r["metrics"][metric]) for r in c.repeats
                  if isinstance((r.get("metrics") or {}).get(metric), (int, float))
                  and r["metrics"][metric] > 0]
        if c.status == "ok" and values:
            out[id(c)] = stats.paired_ratio_interval(values, [1.0] * len(values))
    return out


def _paired(cells, by: str, ref_value: str, metric: str, higher_better: bool) -> dict:
    from ..compare import paired_values

    refs = {results.cell_key(c.scenario, {k: v for k, v in c.params.items() if k != by}): c
            for c in cells if str(c.params.get(by)) == ref_value and c.status == "ok"}
    out = {}
    for c in cells:
        if by not in c.params or c.status != "ok":
            continue
        ref = refs.get(results.cell_key(c.scenario,
                                        {k: v for k, v in c.params.items() if k != by}))
        if ref is None:
            continue
        base, new = paired_values(ref, c, metric)
        pairs = [(b, n) for b, n in zip(base, new) if b > 0 and n > 0]
        if not pairs:
            continue
        base, new = [b for b, _ in pairs], [n for _, n in pairs]
        out[id(c)] = stats.paired_ratio_interval(new, base) if higher_better else \
            stats.paired_ratio_interval(base, new)          # a time: speed, ref/this
    return out


def ratios(scenario: str, cells) -> list[Ratio]:
    """The ratio columns of one scenario's table (only those some cell has)."""
    out = []
    for scen, by, ref, metric, up in PAIRED_REFERENCES:
        if scen == scenario:
            what = f"{metric.replace('_per_s', '')} over" if up else f"speed (1/{metric}) over"
            col = Ratio(f"x {ref}", f"x {ref}: this cell's {what} the {by}={ref} cell's "
                                    "with the same other params", _paired(cells, by, ref, metric, up))
            if col.values:
                out.append(col)
    for metric, header in RECORDED.items():
        col = Ratio(header, f"{header}: as the scenario records it in each round",
                    _recorded(cells, metric))
        if col.values:
            out.append(col)
    return out


def wide_summary(summary: list, ratio_headers=()) -> list:
    """The table's columns for HTML: recorded ratios left to their ratio column, and each
    histogram shown with p99 gets p90 before it and p99.9 and max after it."""
    recorded = {m for m, h in RECORDED.items() if h in ratio_headers}
    out = []
    for spec, header in summary:
        if spec in recorded:
            continue
        name, _, stat = spec.rpartition(".")
        if name and stat == "p99":
            tail = lambda s: (header.replace("p99", s) if "p99" in header else f"{name} {s}")
            out.append((f"{name}.p90", tail("p90")))
            out.append((spec, header))
            out += [(f"{name}.{st}", tail(words)) for st, words in TAIL_STATS[1:]]
        else:
            out.append((spec, header))
    return list({spec: (spec, header) for spec, header in reversed(out)}.values())[::-1]
