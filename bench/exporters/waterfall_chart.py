"""The stage waterfall drawn for the HTML report: one stacked bar per cell that has
one (transport, pool, rate...), a segment per stage's mean (means add up to the whole;
percentiles would not). ``fetch`` is left out of the bar and named in the caption: in
the worker scenario it is the harness's own wait (see :mod:`bench.waterfall`)."""
from __future__ import annotations

from .. import waterfall
from . import charts
from .facets import cell_label

DRAWN = tuple(s for s in waterfall.STAGES if s != "fetch")


def cells_with_waterfall(cells) -> list:
    return [c for c in cells if c.status == "ok" and
            all(f"{waterfall.PREFIX}{s}.mean_us" in c.metrics for s in DRAWN)]


def draw(fig, cells, keys) -> None:
    """Horizontal stacked bars of the stages' means (ms), one row per cell."""
    ax = fig.add_subplot(1, 1, 1)
    labels = [cell_label(c, keys) for c in cells]
    left = [0.0] * len(cells)
    for i, stage in enumerate(DRAWN):
        widths = [c.metrics[f"{waterfall.PREFIX}{stage}.mean_us"] / 1000.0 for c in cells]
        ax.barh(range(len(cells)), widths, left=left, label=stage,
                color=charts.PALETTE[i % len(charts.PALETTE)], height=0.6)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(cells)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("mean ms per task, intended send -> task_success")
    ax.legend(ncols=len(DRAWN), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)


def height(n_cells: int) -> float:
    return 1.0 + 0.3 * n_cells


def caption() -> str:
    return ("Where a task's time goes, by stage (means: they add up): " +
            "; ".join(f"{s}: {waterfall.WHAT[s]}" for s in DRAWN) +
            ". Not drawn: fetch (" + waterfall.WHAT["fetch"] + "). Clock: " + waterfall.CLOCK
            + ".")
