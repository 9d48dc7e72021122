"""Charts of a run, drawn with matplotlib for the PNG and the HTML report.

What makes them readable:

* at most :data:`MAX_CURVES` curves on one chart: the cells are cut into facets by
  the params that vary (``api=kombu`` | ``api=celery``), never by position alone;
* one chart per histogram kind (publish call vs end to end), side by side, so a
  millisecond kind does not squash a microsecond one onto the same axis;
* Okabe-Ito colours (told apart with any colour vision), the same colour for the
  same cell across the kinds of a row, the legend outside the plot, ``n`` per curve.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot, no global
state) inside :func:`style`, which sets the few rc values they need. Which cells go on
which chart is decided in :mod:`.facets` (pure data); this module only draws.
"""
from __future__ import annotations

import io
import math
import re
import statistics
from contextlib import contextmanager

from .. import results
from .facets import (  # noqa: F401 - the grouping, re-exported for the drawers' callers
    Facet, MAX_CURVES, SWEEP_METRICS, Sweep, TO_US, _rate, _value, cell_label,
    cells_with_intervals, facets, hist_kinds, interval_series, rate_metrics, searches,
    shared_params, slo_us, spectrum_facets, sweeps, varying_keys)

# Okabe & Ito (2008): black, orange, sky blue, bluish green, blue, vermillion, reddish
# purple. Their yellow is left out: too pale against white.
PALETTE = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7")
LOG_SPAN = 50      # values spanning more than this factor: dots on a log axis, not bars
PERCENTILE_TICKS = (50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 99.9999)


@contextmanager
def style():
    import matplotlib

    with matplotlib.rc_context({
        "svg.fonttype": "none",          # text stays text in the SVG (small, selectable)
        "svg.hashsalt": "celery-bench",  # the same run draws the same file
        "font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8,
        "axes.grid": True, "grid.alpha": 0.3, "axes.prop_cycle": matplotlib.cycler(
            color=PALETTE)}):
        yield


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------- labels


def log_us_axis(axis) -> None:
    """A log axis of microseconds labelled 100 us / 2 ms / 1.5 s, at 1-2-5 steps (so a
    range under a decade still gets labels, and never 4x10^4)."""
    from matplotlib.ticker import LogLocator

    (axis.axes.set_yscale if axis.axis_name == "y" else axis.axes.set_xscale)("log")
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(us_formatter())
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    axis.set_minor_formatter(us_formatter(minor=True))


def us_formatter(minor: bool = False):
    """Tick labels for an axis of microseconds: 100 us, 2 ms, 1.5 s. ``minor``: label
    only where the axis spans under ~1.5 decades (else the decades say enough)."""
    from matplotlib.ticker import Formatter

    class Microseconds(Formatter):
        def __call__(self, v, pos=None):
            if v <= 0:
                return ""
            if minor and self.axis is not None:
                lo, hi = self.axis.get_view_interval()
                if lo <= 0 or hi / lo > 30:
                    return ""
            for size, unit in ((1e6, "s"), (1e3, "ms"), (1.0, "us")):
                if v >= size:
                    return f"{v / size:g} {unit}"
            return f"{v:g} us"
    return Microseconds()


# --------------------------------------------------------------------------- facets


# --------------------------------------------------------------------------- spectra
def percentile_curve(summary: dict) -> tuple[list[float], list[float]]:
    """(percentiles, values) of a histogram summary, dense towards the tail."""
    hist = results.decode(summary)
    count = hist.get_total_count()
    if not count:
        return [], []
    # 1/(1-p) up to the count: beyond it the tail holds less than one sample.
    top = max(1.0, math.log10(count))
    levels = [100.0 * (1 - 10 ** (-top * i / 60)) for i in range(61)]
    values = hist.get_percentile_to_value_dict(levels)
    return levels, [values[p] for p in levels]


def _percentile_axis(ax, top_count: int) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    log_us_axis(ax.yaxis)
    top = max(10.0, float(top_count))   # 1/(1-p) reaches the count at most
    ticks = [p for p in PERCENTILE_TICKS if 1 / (1 - p / 100) <= top * 1.0001]
    ax.set_xticks([1 / (1 - p / 100) for p in ticks])
    ax.set_xticklabels([f"{p:g}%" for p in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("percentile")


def draw_spectra(fig, facet: Facet, kinds, runs=None, title: str | None = None,
                 slots: int | None = None) -> int:
    """One chart per histogram kind, side by side in ``fig`` (a Figure or SubFigure),
    each with its legend below it (``slots``: at least this many places in the row). ``runs``: ``[(name, {cell key: cell}, linestyle)]``
    to overlay the same cells of several runs (compare view). Returns curves drawn."""
    runs = runs or [("", None, "-")]
    axes = fig.subplots(1, max(len(kinds), slots or 0), squeeze=False)[0]
    for ax in axes[len(kinds):]:     # empty slots keep the charts of a page one width
        ax.set_visible(False)
    drawn, missing = 0, []
    for ax, kind in zip(axes, kinds):
        lines, top = 0, 10
        for i, cell in enumerate(facet.cells):
            for r, (run_name, by_key, dash) in enumerate(runs):
                c = by_key.get(cell.key) if by_key is not None else cell
                if c is None or c.status != "ok" or kind not in c.histograms:
                    continue
                summary = c.histograms[kind]
                levels, values = percentile_curve(summary)
                if not levels:
                    continue
                scale = TO_US.get(summary.get("unit", "us"), 1.0)
                label = cell_label(c, facet.keys) if facet.keys else "all"
                label += f"{' ' + run_name if run_name else ''} (n={summary['count']:,})"
                line, = ax.plot([1 / (1 - p / 100) if p < 100 else 1e12 for p in levels],
                                [v * scale for v in values], dash, linewidth=1.4,
                                color=PALETTE[i % len(PALETTE)], label=label)
                line.set_gid(f"data-spectrum-{kind}-{i}-{r}")
                top = max(top, summary["count"])
                lines += 1
        _percentile_axis(ax, top)
        ax.set_title(f"{kind} latency")
        if lines:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False,
                      title=" · ".join(facet.keys) or None, title_fontsize=8)
        else:   # the column stays, so a kind keeps its place down the page
            ax.set_visible(False)
            missing.append(kind)
        drawn += lines
    title = facet.title if title is None else title
    if missing:
        title += f"{' ' if title else ''}(no {', '.join(missing)} histogram in these cells)"
    if title:
        fig.suptitle(title, fontsize=10, fontweight="bold")
    return drawn


def spectrum_height(facet: Facet, runs: int = 1) -> float:
    return 2.8 + 0.19 * len(facet.cells) * runs + (0.2 if facet.keys else 0)


# --------------------------------------------------------------------------- rates


def rate_words(metric: str) -> str:
    """An axis label in words: ``throughput_per_s`` -> "throughput, messages per second"."""
    words = {"throughput_per_s": "throughput, messages per second (msg/s)",
             "consume_per_s": "consume rate, messages per second (msg/s)",
             "tasks_per_s": "tasks per second (tasks/s)",
             "round_trips_per_s": "round trips per second (1/s)"}
    return words.get(metric) or f"{metric[:-len('_per_s')].replace('_', ' ')} per second (1/s)"


def draw_rates(fig, cells, metric: str, keys, runs=None) -> int:
    """``metric`` per cell, whiskers from the lowest to the highest repeat, each labelled
    with its value, spread and repeat count. Bars from zero on a linear axis (their
    lengths compare); when the values span more than :data:`LOG_SPAN` a bar's length on
    a log axis would mean nothing, so they are dots on a log axis instead. ``runs``: as in
    :func:`draw_spectra` (one bar or dot per run)."""
    from ..report import fmt_figure, spread_fraction, spread_text

    runs = runs or [("", None, "-")]
    ax = fig.subplots()
    height = 0.8 / len(runs)
    points, ylabels = [], []
    for i, cell in enumerate(cells):
        ylabels.append(cell_label(cell, keys))
        for j, (run_name, by_key, _) in enumerate(runs):
            c = by_key.get(cell.key) if by_key is not None else cell
            v = c.metrics.get(metric) if c is not None and c.status == "ok" else None
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            sp = c.spread.get(metric) or {}
            lo, hi = min(sp.get("min", v), v), max(sp.get("max", v), v)
            y = i + (j - (len(runs) - 1) / 2) * height
            n = sp.get("n", len(c.repeats) or 1)
            text = f" {fmt_figure(v)} {spread_text(spread_fraction(c, metric))} n={n}"
            points.append((i, j, y, v, lo, hi, sp, text + (f" {run_name}" if run_name else ""),
                           run_name))
    positive = [x for p in points for x in p[3:6] if x > 0]
    log = bool(positive) and max(positive) / min(positive) > LOG_SPAN
    for i, j, y, v, lo, hi, sp, _, run_name in points:
        colour = PALETTE[4 if j == len(runs) - 1 else 2]
        err = [[v - lo], [hi - v]] if sp else None
        if log:
            drawn = ax.errorbar([v], [y], xerr=err, fmt="o", color=colour, ecolor="#000000",
                                capsize=3, elinewidth=1, markersize=5, label=run_name or None)
            drawn.lines[0].set_gid(f"data-rate-{metric}-{i}-{j}")
        else:
            bar = ax.barh(y, v, height=height * 0.9, color=colour, xerr=err,
                          error_kw={"ecolor": "#000000", "capsize": 3, "linewidth": 1},
                          label=run_name or None)
            bar.patches[0].set_gid(f"data-rate-{metric}-{i}-{j}")
    ax.set_yticks(range(len(cells)))
    ax.set_yticklabels(ylabels)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(positive) / 2, max(positive) * 8)    # room on the right for labels
    elif positive:
        ax.set_xlim(0, max(positive) * 1.45)
    for _, _, y, v, lo, hi, _, text, _ in points:   # clear of the whisker's cap
        x = max(hi, v)
        ax.text(x * 1.06 if log else x + 0.01 * max(positive), y, text, va="center", fontsize=7)
    ax.set_xlabel(rate_words(metric) + ("; log axis, dots" if log else "") +
                  "; median over repeats, whiskers: lowest to highest repeat")
    if len(runs) > 1:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=len(runs),
                  frameon=False)
    return len(points)


# --------------------------------------------------------------------------- sweeps


SWEEP_STATS = (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9"),
               ("max", "max"))


def draw_sweep(fig, sweep: Sweep) -> int:
    """Latency percentiles against the target rate, one chart per histogram kind, the
    maximum sustainable rate marked."""
    kinds = hist_kinds(sweep.cells)
    cols = min(3, max(1, len(kinds)))
    rows = math.ceil(len(kinds) / cols) if kinds else 1
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    drawn = 0
    for ax, kind in zip(axes, kinds):
        for i, (stat, name) in enumerate(SWEEP_STATS):
            xs, ys = [], []
            for c in sweep.cells:
                s = c.histograms.get(kind)
                if s and s.get(stat) is not None and s.get("count"):
                    xs.append(_rate(c))
                    ys.append(s[stat] * TO_US.get(s.get("unit", "us"), 1.0))
            if xs:
                line, = ax.plot(xs, ys, "o-", markersize=3, linewidth=1.4,
                                color=PALETTE[i], label=name)
                line.set_gid(f"data-sweep-{kind}-{stat}")
                drawn += 1
        log_us_axis(ax.yaxis)
        ax.set_xlabel("target rate (1/s)")
        ax.set_title(f"{kind} latency against rate")
        if sweep.max_rate is not None:
            ax.axvline(sweep.max_rate, color=PALETTE[5], linestyle="--", linewidth=1.2,
                       label=f"max sustainable {sweep.max_rate:,.0f}/s"
                             + (f" ({sweep.slo})" if sweep.slo else ""))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False)
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    fig.suptitle(sweep.title, fontsize=10)
    return drawn


def draw_search(fig, cell, keys) -> int:
    """A max-rate search step by step: the SLO's latency at each rate tried (filled: the
    step passed, cross: it failed) and the rate achieved against the rate asked, with
    the maximum sustainable rate and the SLO's bound marked."""
    steps = [s for s in cell.metrics.get("steps") or () if isinstance(s, dict)
             and isinstance(s.get("rate"), (int, float))]
    best = cell.metrics["max_sustainable_rate_per_s"]
    slo = cell.metrics.get("slo") or cell.params.get("slo")
    lat_ax, rate_ax = fig.subplots(1, 2)
    drawn = 0
    for ok, marker, colour, name in ((True, "o", PALETTE[3], "passed"),
                                     (False, "x", PALETTE[5], "failed")):
        chosen = [s for s in steps if bool(s.get("ok")) == ok]
        lat = [s for s in chosen if isinstance(s.get("latency_us"), (int, float))
               and s["latency_us"] > 0]
        if lat:
            pts, = lat_ax.plot([s["rate"] for s in lat], [s["latency_us"] for s in lat],
                               marker, color=colour, label=f"step {name}", linestyle="none")
            pts.set_gid(f"data-search-latency-{name}")
            drawn += 1
        ach = [s for s in chosen if isinstance(s.get("achieved"), (int, float))]
        if ach:
            pts, = rate_ax.plot([s["rate"] for s in ach], [s["achieved"] for s in ach],
                                marker, color=colour, label=f"step {name}", linestyle="none")
            pts.set_gid(f"data-search-achieved-{name}")
            drawn += 1
    top = max([s["rate"] for s in steps] + [best, 1.0])
    rate_ax.plot([0, top], [0, top], ":", color="#888888", label="achieved = asked")
    bound = slo_us(slo)
    if bound:
        lat_ax.axhline(bound, color="#555555", linestyle=":", label=f"SLO {slo}")
    for ax in (lat_ax, rate_ax):
        ax.axvline(best, color=PALETTE[4], linestyle="--",
                   label=f"max sustainable {best:,.0f}/s")
        ax.set_xlabel("rate asked (1/s)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
    log_us_axis(lat_ax.yaxis)
    lat_ax.set_title(f"latency the SLO reads ({slo or 'no SLO recorded'})")
    rate_ax.set_ylabel("rate achieved (1/s)")
    rate_ax.set_title("rate achieved")
    fig.suptitle(f"{cell.scenario} max-rate search: {cell_label(cell, keys, True)}",
                 fontsize=10)
    return drawn


def draw_search_overview(fig, cells, keys) -> int:
    """Every max-rate search of a run on one chart: the SLO's latency at each rate tried,
    one line per cell (sorted by rate), each cell's maximum sustainable rate marked on
    its line, and the SLO's bound."""
    ax = fig.subplots(1, 1)
    drawn, slo = 0, None
    for i, cell in enumerate(cells):
        tried: dict[float, list] = {}
        for s in cell.metrics.get("steps") or ():
            if isinstance(s, dict) and isinstance(s.get("latency_us"), (int, float)) \
                    and s["latency_us"] > 0:
                tried.setdefault(s["rate"], []).append(s)
        # One point per rate tried (a retried or confirmed rate was held more than once):
        # its median latency, sustained if any hold of it was.
        steps = [{"rate": r, "latency_us": statistics.median(x["latency_us"] for x in held),
                  "ok": any(x.get("ok") for x in held)} for r, held in sorted(tried.items())]
        if not steps:
            continue
        colour = PALETTE[i % len(PALETTE)]
        best = cell.metrics["max_sustainable_rate_per_s"]
        label = f"{cell_label(cell, keys)}: {best:,.0f}/s"
        line, = ax.plot([s["rate"] for s in steps], [s["latency_us"] for s in steps], "-",
                        color=colour, linewidth=1.2, label=label)
        line.set_gid(f"data-overview-{i}")
        ok = [s for s in steps if s.get("ok")]
        ax.plot([s["rate"] for s in ok], [s["latency_us"] for s in ok], "o", color=colour,
                markersize=3)
        bad = [s for s in steps if not s.get("ok")]
        ax.plot([s["rate"] for s in bad], [s["latency_us"] for s in bad], "x", color=colour,
                markersize=4)
        if best:
            ax.axvline(best, color=colour, linestyle="--", linewidth=0.9)
        slo = slo or cell.metrics.get("slo")
        drawn += 1
    bound = slo_us(slo)
    if bound:
        ax.axhline(bound, color="#555555", linestyle=":", label=f"SLO {slo}")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    # Plain rates (2,000 not 2x10^3), the minor ticks at 2 and 5 of each decade only.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:,.0f}" if f"{v:.0e}"[0] in "25" else ""))
    log_us_axis(ax.yaxis)
    ax.set_xlabel("rate asked (1/s): o sustained, x not; dashed: the maximum sustained")
    ax.set_title(f"latency the SLO reads ({slo}) at each rate the search tried")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return drawn


def sweep_height(sweep: Sweep) -> float:
    return 3.6 * max(1, math.ceil(len(hist_kinds(sweep.cells)) / 3))


# --------------------------------------------------------------------------- intervals


def timeseries_svg(cell, kind: str, keys, ident: str, width: int = 540,
                   height: int = 170) -> str:
    """p50, p99 and max of each interval histogram of ``cell``'s ``kind`` over time, as
    a small SVG written by hand: there can be one per cell and histogram, and matplotlib
    takes about a second for each, this a millisecond."""
    from html import escape

    series = interval_series(cell.histograms[kind])
    if not series:
        return ""
    t, *curves = series
    left, right, top, bottom = 62, 12, 24, 30
    pw, ph = width - left - right, height - top - bottom
    finite = [v for c in curves for v in c if v == v and v > 0]
    ts = [x for x in t if x == x]
    lo = 10 ** math.floor(math.log10(min(finite)))
    hi = 10 ** math.ceil(math.log10(max(finite)))
    hi = hi * 10 if hi <= lo else hi
    t_max = max(ts) or 1.0

    def x(v):
        return left + pw * v / t_max

    def y(v):
        return top + ph * (1 - (math.log10(v) - math.log10(lo)) /
                           (math.log10(hi) - math.log10(lo)))

    label = us_formatter()
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{ident}-root" role="img" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'font-family="sans-serif" font-size="10">',
           f'<text x="{left}" y="14" font-size="11">{escape(cell_label(cell, keys))} '
           f'(n={cell.histograms[kind]["count"]:,})</text>',
           f'<g id="{ident}-axes_1" stroke="#d6d6d6">']
    decade = lo
    while decade <= hi * 1.0001:
        yy = y(decade)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}"/>'
                   f'<text x="{left - 4}" y="{yy + 3:.1f}" text-anchor="end" stroke="none" '
                   f'fill="#333">{escape(label(decade))}</text>')
        decade *= 10
    step = 10 ** math.floor(math.log10(t_max)) if t_max >= 1 else 0.5
    step *= 2 if t_max / step > 6 else 1
    tick = 0.0
    while tick <= t_max * 1.0001:
        xx = x(tick)
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{top + ph}"/>'
                   f'<text x="{xx:.1f}" y="{top + ph + 12}" text-anchor="middle" stroke="none" '
                   f'fill="#333">{tick:g}</text>')
        tick += step
    out.append(f'<text x="{left + pw / 2}" y="{height - 2}" text-anchor="middle" '
               f'stroke="none" fill="#333">s since the cell\'s first interval</text>')
    for i, (values, name) in enumerate(zip(curves, ("p50", "p99", "max"))):
        colour = PALETTE[(4, 1, 0)[i]]          # blue, orange, black
        runs, current = [], []
        for tv, v in zip(t, values):
            if v != v or tv != tv or v <= 0:
                if current:
                    runs.append(current)
                current = []
            else:
                current.append(f"{x(tv):.1f},{y(v):.1f}")
        if current:
            runs.append(current)
        d = " ".join("M" + " L".join(r) for r in runs if r)
        points = [p for r in runs for p in r]
        # a point alone (a 1 s repeat) draws no line: every point gets a dot when few
        dots = "".join(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.2"/>'
                       for p in points) if len(points) <= 60 else ""
        out.append(f'<g id="{ident}-data-time-{i}" fill="{colour}"><path d="{d}" fill="none" '
                   f'stroke="{colour}" stroke-width="1.4"/>{dots}</g>')
        lx = left + pw - 150 + 50 * i
        out.append(f'<line x1="{lx}" x2="{lx + 14}" y1="12" y2="12" stroke="{colour}" '
                   f'stroke-width="2"/><text x="{lx + 17}" y="15" stroke="none" '
                   f'fill="#333">{name}</text>')
    out.append("</g></svg>")
    return "".join(out)


# --------------------------------------------------------------------------- output
def svg(fig, prefix: str) -> str:
    """``fig`` as an ``<svg>`` element to inline in HTML: no XML prolog, and every id
    prefixed so several charts in one page do not share ids (clip paths, markers)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)   # RDF credits, bulk
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = re.sub(r'url\(#([^)]+)\)', lambda m: f"url(#{prefix}-{m.group(1)})", text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m.group(1)}"', text)
    # matplotlib's <style> says "*{...}": scoped to this chart, not the whole page
    text = text.replace("*{", f"#{prefix}-root *{{")
    return text.replace("<svg ", f'<svg id="{prefix}-root" role="img" ', 1)
