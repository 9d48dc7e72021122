"""The HTML report's A/B part: per scenario of a variant run, B/A per cell and metric.

A run with ``--variant`` (``celery-bench ab``) holds each cell once per variant, their
repeats paired by round. For each scenario this adds, per variant against the first one
(the reference), the verdict table of ``compare --by variant`` (B/A, its 95% interval from
the paired rounds, the words) and one chart: every row's B/A ratio with its interval, a
line at 1 and the noise band shaded, so a pair's picture is one glance.
"""
from __future__ import annotations

from html import escape
from types import SimpleNamespace

from .. import compare, results
from . import charts

ROW_HEIGHT_IN = 0.24      # chart inches per ratio drawn


def groups(cells) -> list[compare.Group]:
    """``compare --by variant`` of these cells (one scenario's), [] without variants."""
    if len({str(c.params.get("variant")) for c in cells if "variant" in c.params}) < 2:
        return []
    return compare.compare_within(results.Run({}, list(cells)), "variant")


def pairs(found: list[compare.Group]) -> dict[tuple[str, str], list]:
    """(reference, variant) -> [(cell label params, comparisons or [], note)]."""
    out: dict[tuple[str, str], list] = {}
    for group in found:
        for value, comps, note in group.rows:
            out.setdefault((group.reference, value), []).append((group, comps or [], note))
    return out


def section(page, scenario: str, cells, verdict_rows) -> None:
    """The A/B table and chart of each variant pair of ``scenario``; nothing without
    variants. ``verdict_rows`` is the report's row renderer (html._verdict_rows)."""
    found = groups(cells)
    if not found:
        return
    keys = [k for k in charts.varying_keys(cells) if k != "variant"]
    by_key = {results.cell_key(c.scenario, c.params): c for c in cells}
    for (ref, value), rows in pairs(found).items():
        page.add(f"<h3>{escape(value)} / {escape(ref)}: variant {escape(value)} as a ratio "
                 f"of variant {escape(ref)}, paired by round</h3>")
        shown = [_pair(by_key, group, ref, value, comps, note) for group, comps, note in rows]
        table = verdict_rows(shown, {scenario: keys}).get(scenario, [])
        page.add('<div class="scroll"><table class="verdicts"><thead><tr><th>cell</th>'
                 f'<th>metric</th><th class="num">{escape(ref)}</th><th class="num">'
                 f'{escape(value)}</th><th>verdict ({escape(value)}/{escape(ref)})</th>'
                 '<th>how</th></tr></thead><tbody>', *table, "</tbody></table></div>")
        with charts.style():   # drawn and rendered under the report's chart style
            fig = forest(rows, keys, ref, value)
            if fig is not None:
                page.chart(fig, f"{value}/{ref} per cell and metric: the median of the per-round "
                                f"ratios, whiskers its 95% interval; the grey band is the "
                                f"noise band a difference must clear (±5%). For a "
                                f"throughput right of 1 is faster; for a latency, slower.")


def _pair(by_key, group, ref, value, comps, note):
    """The shape html._verdict_rows reads (a compare.Pair's attributes)."""
    base = by_key.get(results.cell_key(group.scenario, {**group.shared, "variant": ref}))
    new = by_key.get(results.cell_key(group.scenario, {**group.shared, "variant": value}))
    return SimpleNamespace(base=base, new=new, comparisons=comps, note=note,
                           key=results.cell_key(group.scenario, group.shared))


def forest(rows, keys, ref: str, value: str):
    """One row per judged (cell, metric): the ratio and its interval on a log axis."""
    drawn = []
    for group, comps, _note in rows:
        label = ", ".join(f"{k}={group.shared[k]}" for k in keys if k in group.shared) \
            or group.scenario
        for c in comps:
            interval = c.verdict.interval if c.verdict is not None else None
            if c.ratio is None or interval is None or interval.lo is None:
                continue
            drawn.append((f"{label} · {c.metric}", c.ratio, interval.lo, interval.hi,
                          c.significant, c.direction))
    if not drawn:
        return None
    from matplotlib.ticker import FuncFormatter

    fig = charts.new_figure(7.5, 0.9 + ROW_HEIGHT_IN * len(drawn))
    ax = fig.subplots()
    ax.axvline(1.0, color="#000000", linewidth=1)
    ax.axvspan(1 / (1 + compare.NOISE_WITHIN_RUN), 1 + compare.NOISE_WITHIN_RUN,
               color="#d6d6d6", alpha=0.5, linewidth=0)
    for i, (_label, ratio, lo, hi, significant, direction) in enumerate(drawn):
        colour = {"faster": charts.PALETTE[3], "slower": charts.PALETTE[5]}.get(
            direction, charts.PALETTE[4]) if significant else "#5a5a5a"
        line = ax.errorbar([ratio], [i], xerr=[[ratio - lo], [hi - ratio]], fmt="o",
                           color=colour, capsize=3, markersize=4)
        line.lines[0].set_gid(f"data-ab-{value}-{i}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _pos: f"{x:g}x"))
    ax.set_yticks(range(len(drawn)))
    ax.set_yticklabels([d[0] for d in drawn], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{value}/{ref} (log axis)")
    return fig
