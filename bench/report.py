"""Tables a person can read, from a results run (never from live measurements).

Each scenario lists its columns in ``summary``: ``("metric", "header")`` for a
metric, ``("hist.pXX", "header")`` for a histogram percentile (``hist`` being
the histogram name); a scenario this checkout does not know (a Locust export,
an older run) gets generic columns: its throughputs and each histogram's p50
and p99. Params that vary within a table become columns; params the same in
every cell are said once under it.

How a table stays readable (and within :data:`WIDTH` columns in a terminal):

* cells whose columns are not a subset of another group's get a table of their
  own (the worker's throughput rows and latency rows), titled by the param that
  tells them apart; a column no cell has a value for is left out;
* a time column is shown in the unit (us, ms or s) in which the median of its
  values lies in [1, 1000), named in the header (``p99 ms``); the header's own
  unit word, if any, is replaced;
* with 2 repeats or more a value carries its spread, ``47,365 ±3%``: every
  repeat lies within 3% of the median shown;
* a percentile column no row's sample count supports (a quick join's ``lag p99`` over
  8 joins) becomes the highest lower percentile the table's smallest count supports
  (``lag p50``; :func:`supported_spec`), its header saying which;
* a percentile its sample count cannot support (:mod:`bench.percentiles`) reads
  "too few samples (n=30)", never a number; ``verbose`` adds, after each percentile
  column, its 95% interval (``p99 ms 95%``: ``1.10-1.40``);
* when a table is still too wide, columns whose value is the same in every row
  are said once under it, then the figures are split over several tables that
  repeat the param columns. A figure is never cut.
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from . import percentiles, results

__all__ = ["Console", "fmt", "column_value", "varying_params", "summary_columns",
           "plan_tables", "print_run", "cell_line", "metric_unit", "spec_unit"]

STATUS_STYLE = {"ok": "green", "skipped": "yellow", "failed": "red", "lost": "red"}
WIDTH = 100                       # a terminal table's budget, in columns
TIME_UNITS = (("us", 1e-6), ("ms", 1e-3), ("s", 1.0))
SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
HIST_VALUE_STATS = ("p50", "p90", "p99", "p999", "max", "min", "mean")
# Counts added up over repeats (results.SUMMED): their spread is no noise of a median.
NO_SPREAD = results.SUMMED


def fmt(value) -> str:
    """A value as the tables print it (compare and gate use it too)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_figure(value) -> str:
    """A figure in a table: 3 significant digits at least (HdrHistogram keeps 3), whole
    numbers with thousands separators."""
    if isinstance(value, float) and not value.is_integer() and 10 <= abs(value) < 100:
        return f"{value:.1f}"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    return fmt(value)


def column_value(cell: results.Cell, spec: str):
    """``spec`` is a metric name or ``hist.pXX`` / ``hist.max`` / ``hist.count``; a
    percentile too few samples support is the words "too few samples (n=30)"."""
    if spec in cell.metrics:
        return cell.metrics[spec]
    name, _, stat = spec.rpartition(".")
    if name and name in cell.histograms:
        p = percentile_of(cell, spec)
        if p is not None and p.value is not None and not p.enough:
            return p.too_few
        return cell.histograms[name].get(stat)
    return None


def percentile_of(cell: results.Cell, spec: str) -> percentiles.Percentile | None:
    """The recorded percentile ``hist.pXX`` of ``cell`` with its interval, or None."""
    name, _, stat = spec.rpartition(".")
    if not name or name not in cell.histograms or stat not in percentiles.NAMES:
        return None
    return percentiles.of_summary(cell.histograms[name], stat)


def spread_fraction(cell: results.Cell, spec: str) -> float | None:
    """How far the farthest repeat lies from the median, as a fraction of it; None
    below 2 repeats, for counts summed over repeats, and for a median of 0."""
    if spec in NO_SPREAD or spec.endswith((".count", ".overflow")):
        return None
    sp = cell.spread.get(spec)
    if not sp or sp.get("n", 0) < 2 or not _is_number(cell.metrics.get(spec)):
        return None
    mid, lo, hi = cell.metrics[spec], sp["min"], sp["max"]
    if not mid:
        return None
    return max(hi - mid, mid - lo) / abs(mid)


def spread_text(fraction: float | None) -> str:
    if fraction is None:
        return ""
    pct = 100 * fraction
    if 0 < pct < 0.1:
        return "±<0.1%"
    return f"±{pct:.1f}%" if 0 < pct < 1 else f"±{pct:.0f}%"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------- units
def metric_unit(name: str) -> str:
    """A metric's unit from its name (the schema's convention: ``_per_s`` a rate,
    ``_s``/``_ms``/``_us``/``_ns`` a time, ``_bytes`` a size, ``x_...`` a ratio)."""
    if name.endswith("_per_s"):
        return "1/s"
    m = re.search(r"_(ns|us|ms|s)$", name)
    if m:
        return m.group(1)
    m = re.search(r"_(ns|us|ms|s)_per_(\w+)$", name)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if name.endswith("_bytes"):
        return "B"
    if name.startswith("x_") or name in ("speedup", "ratio"):
        return "x"
    return ""


def spec_unit(spec: str, cells) -> str:
    """The unit of a column spec's raw values in ``cells``."""
    if any(spec in c.metrics for c in cells):
        return metric_unit(spec)
    name, _, stat = spec.rpartition(".")
    if stat in HIST_VALUE_STATS:
        for c in cells:
            if name in c.histograms:
                return c.histograms[name].get("unit", "us")
    return ""


def time_unit(values_s) -> tuple[str, float] | None:
    """(unit, seconds per unit) in which the median of the non-zero ``values_s`` lies in
    [1, 1000); us for anything smaller; None when there is no non-zero value."""
    nonzero = sorted(abs(v) for v in values_s if v)
    if not nonzero:
        return None
    mid = statistics.median(nonzero)
    chosen = TIME_UNITS[0]
    for unit, size in TIME_UNITS:
        if mid >= size:
            chosen = (unit, size)
    return chosen


# --------------------------------------------------------------------------- columns
def summary_columns(scenario: str, cells) -> list:
    """The scenario's summary columns; for one this checkout does not know, generic
    ones: throughputs, trouble counts, and each histogram's p50 and p99."""
    from .scenarios import summary as summary_of

    out = list(summary_of(scenario) or generic_columns(cells))
    if any("max_sustainable_rate_per_s" in c.metrics for c in cells):
        # a max-rate search's answer is a bracket, and how long it was held to confirm it
        out = [col for col in out if col[0] != "max_sustainable_rate_per_s"] + \
            [col for col in MAX_RATE_COLUMNS if col not in out]
    return out


MAX_RATE_COLUMNS = [("max_sustainable_rate_per_s", "sustained/s"),
                    ("not_sustained_per_s", "not sustained/s"),
                    ("confirm_hold_s", "confirm s")]


def generic_columns(cells) -> list:
    """Throughputs (any ``_per_s`` metric), ``slo``, trouble counts, and each histogram's
    p50 and p99."""
    ok = [c for c in cells if c.status == "ok"] or list(cells)
    out = []
    for c in ok:
        for m, v in c.metrics.items():
            if m.endswith("_per_s") and _is_number(v):
                out.append((m, m[: -len("_per_s")].replace("_", " ") + "/s"))
    if any("slo" in c.metrics for c in ok):
        out.append(("slo", "slo"))
    for m in ("lost", "errors"):
        if any(c.metrics.get(m) for c in ok):
            out.append((m, m))
    for c in ok:
        for h in c.histograms:
            out += [(f"{h}.p50", f"{h} p50"), (f"{h}.p99", f"{h} p99")]
    return list(dict.fromkeys(out))


@dataclass
class Column:
    """One figure column: how its raw values become the figures shown."""
    spec: str
    header: str                  # with the unit shown, e.g. "p99 ms"
    scale: float = 1.0           # shown = raw * scale
    unit: str = ""
    interval: bool = False       # this column shows the percentile's 95% interval

    def value(self, cell: results.Cell):
        if self.interval:
            p = percentile_of(cell, self.spec)
            if p is None or not p.enough:
                return None
            return f"{fmt_figure(p.lo * self.scale)}-{fmt_figure(p.hi * self.scale)}"
        v = column_value(cell, self.spec)
        if _is_number(v) and self.scale != 1.0:
            return v * self.scale
        return v

    def text(self, cell: results.Cell, with_spread: bool = True) -> tuple[str, str]:
        """(figure, spread) as shown."""
        return fmt_figure(self.value(cell)), \
            spread_text(spread_fraction(cell, self.spec)) \
            if with_spread and not self.interval else ""


def with_intervals(columns: list) -> list:
    """``columns`` with, after each percentile column, its 95% interval column."""
    out = []
    for c in columns:
        out.append(c)
        if percentiles.stat_name(c.spec) and not c.interval:
            out.append(Column(c.spec, f"{c.header} 95%", c.scale, c.unit, interval=True))
    return out


def make_column(spec: str, header: str, cells) -> Column:
    unit = spec_unit(spec, cells)
    words = header.split()
    if unit in SECONDS:
        raw = [column_value(c, spec) for c in cells]
        shown, size = time_unit([v * SECONDS[unit] for v in raw if _is_number(v)]) \
            or (unit, SECONDS[unit])
        if words and words[-1] in SECONDS:   # the scenario's own unit word is replaced
            words = words[:-1]
        return Column(spec, " ".join(words + [shown]), SECONDS[unit] / size, shown)
    return Column(spec, header, 1.0, unit)


def supported_spec(spec: str, header: str, cells) -> tuple[str, str]:
    """``(spec, header)`` for a table of ``cells``: a ``hist.pXX`` column no cell's sample
    count supports becomes the highest lower recorded percentile that the smallest count
    among them supports (``lag.p99`` -> ``lag.p50``, the header's ``p99`` word with it);
    with none supported, or any cell supporting pXX, the column is kept as asked (and a
    cell with too few still reads "too few samples")."""
    name, _, stat = spec.rpartition(".")
    found = [p for p in (percentile_of(c, spec) for c in cells) if p is not None]
    if not found or any(p.enough for p in found) or stat not in percentiles.NAMES:
        return spec, header
    smallest = min(p.n for p in found)
    lower = [k for k, pct in percentiles.NAMES.items() if pct < percentiles.NAMES[stat]
             and smallest >= percentiles.min_samples(pct)]
    if not lower:
        return spec, header
    chosen = max(lower, key=percentiles.NAMES.get)
    words = [chosen if w == stat else w for w in header.split()]
    return f"{name}.{chosen}", " ".join(words) if chosen in words else f"{header} ({chosen})"


def varying_params(cells: list[results.Cell]) -> tuple[list[str], dict]:
    keys: list[str] = []
    for c in cells:
        for k in c.params:
            if k not in keys:
                keys.append(k)
    varying, constant = [], {}
    for k in keys:
        values = {str(c.params.get(k)) for c in cells}
        if len(values) > 1:
            varying.append(k)
        else:
            constant[k] = cells[0].params.get(k)
    return varying, constant


# --------------------------------------------------------------------------- table plans
@dataclass
class TablePlan:
    """A table before it is drawn (terminal, markdown and HTML draw the same plans)."""
    scenario: str
    title: str
    cells: list
    params: list                  # param columns
    columns: list                 # [Column]
    caption: list = field(default_factory=list)   # "k=v" said once under the table

    def row(self, cell: results.Cell, with_spread: bool = True) -> list[tuple[str, str]]:
        return [c.text(cell, with_spread) for c in self.columns]


def _signature(cell, specs) -> frozenset:
    return frozenset(s for s in specs if column_value(cell, s) is not None)


def split_cells(cells, specs, exact: bool = False) -> list[list]:
    """Cells grouped so that no table mixes rows with different column sets: a group whose
    columns are a subset of another's joins it (``exact``: it does not); cells with no
    figure (skipped, failed) join the group they share most params with."""
    measured = [(c, _signature(c, specs)) for c in cells]
    sigs = list(dict.fromkeys(s for _, s in measured if s))
    # the widest first, so a subset finds the superset it joins
    homes: dict[frozenset, frozenset] = {}
    for sig in sorted(sigs, key=len, reverse=True):
        homes[sig] = sig if exact else \
            next((h for h in dict.fromkeys(homes.values()) if sig <= h), sig)
    groups: dict[frozenset, list] = {}
    for c, sig in measured:
        if sig:
            groups.setdefault(homes[sig], []).append(c)
    if not groups:
        return [list(cells)]
    for c, sig in measured:
        if not sig:
            best = max(groups.values(), key=lambda g: max(
                sum(str(o.params.get(k)) == str(v) for k, v in c.params.items()) for o in g))
            best.append(c)
    order = {id(c): i for i, c in enumerate(cells)}
    out = [sorted(g, key=lambda c: order[id(c)]) for g in groups.values()]
    return sorted(out, key=lambda g: order[id(g[0])])


def plan_tables(scenario: str, cells, summary=None, exact: bool = False,
                title: str | None = None) -> list[TablePlan]:
    """The tables of one scenario's cells (see the module's docstring); ``exact``: one
    table per set of columns, even when one set is a subset of another."""
    summary = summary_columns(scenario, cells) if summary is None else list(summary)
    # an ok cell none of whose figures the summary names (a max-rate search) gets the
    # generic columns, so it prints its figures
    bare = [c for c in cells if c.status == "ok"
            and all(column_value(c, s) is None for s, _ in summary)]
    if bare:
        summary += [col for col in generic_columns(bare) if col not in summary]
    groups = split_cells(list(cells), [s for s, _ in summary], exact)
    _, shared = varying_params(list(cells))
    # params that tell the tables apart name them
    telling = []
    if len(groups) > 1:
        for k in dict.fromkeys(k for c in cells for k in c.params):
            per = [{str(c.params.get(k)) for c in g} for g in groups]
            if all(len(v) == 1 for v in per) and len({next(iter(v)) for v in per}) == len(per):
                telling.append(k)
    plans = []
    for i, group in enumerate(groups):
        varying, constant = varying_params(group)
        name = title or scenario
        if len(groups) > 1:
            named = [f"{k}={constant[k]}" for k in telling[:2] if k in constant]
            name += (", " if ":" in name else ": ") + ", ".join(named) if named else \
                f" (rows {i + 1} of {len(groups)})"
        columns = []
        for spec, header in summary:
            if any(column_value(c, spec) is not None for c in group):
                shown = supported_spec(spec, header, group)
                if all(col.spec != shown[0] for col in columns):  # p99 -> a p50 shown already
                    columns.append(make_column(*shown, group))
        caption = [f"{k}={v}" for k, v in constant.items() if k not in telling[:2]]
        plans.append(TablePlan(scenario, name, group, varying, columns, caption))
    return plans


def note_number(cell: results.Cell, notes: dict) -> str:
    if not cell.reason:
        return cell.status
    return f"{cell.status} [{notes.setdefault(cell.reason, len(notes) + 1)}]"


# --------------------------------------------------------------------------- terminal
def _stack(header: str, width: int) -> str:
    """``header`` broken into lines no wider than ``width`` (or its longest word), so a
    long header does not widen a column of short figures."""
    lines, line = [], ""
    for word in header.replace("_", "_ ").split():
        joined = f"{line} {word}".replace("_ ", "_") if line else word
        if line and len(joined) > width:
            lines.append(line.replace("_ ", "_"))
            line = word
        else:
            line = joined
    lines.append(line.replace("_ ", "_"))
    return "\n".join(lines)


def _rich_table(plan: TablePlan, columns: list, notes: dict, title: str, caption: list,
                stack: bool = False) -> Table:
    """``stack``: break headers longer than their column's figures over several lines."""
    table = Table(title=f"[bold]{title}[/bold]", caption=", ".join(caption) or None,
                  caption_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    rows = [[fmt(c.params.get(k)) for k in plan.params] for c in plan.cells]
    figures = [[col.text(c) for col in columns] for c in plan.cells]
    for i, k in enumerate(plan.params):
        widest = max(len(r[i]) for r in rows)
        table.add_column(_stack(k, max(widest, 6)) if stack else k, no_wrap=True)
    shown = []
    for j, col in enumerate(columns):
        spread_w = max(len(f[j][1]) for f in figures)
        texts = [f[j][0] + (" " + f[j][1].ljust(spread_w) if spread_w else "") for f in figures]
        widest = max(len(t) for t in texts)
        table.add_column(_stack(col.header, max(widest, 5)) if stack else col.header,
                         justify="right", no_wrap=True)
        shown.append(texts)
    table.add_column("status", no_wrap=True)
    for i, c in enumerate(plan.cells):
        table.add_row(*rows[i], *(s[i] for s in shown),
                      Text(note_number(c, notes), style=STATUS_STYLE.get(c.status, "")))
    return table


def _width(console: Console, table: Table) -> int:
    return Measurement.get(console, console.options.update_width(10_000), table).maximum


def terminal_plans(scenario: str, cells, console: Console, width: int = WIDTH,
                   verbose: bool = False) -> list:
    """:func:`plan_tables`, with a table too wide for ``width`` split by exact column sets
    (memory publish cells, which have no e2e columns, apart from the others); ``verbose``:
    each percentile followed by its interval column."""
    out = []
    plans = plan_tables(scenario, cells)
    if verbose:
        for plan in plans:
            plan.columns = with_intervals(plan.columns)
    for plan in plans:
        if not any(_width(console, _rich_table(plan, plan.columns, {}, plan.title,
                                               plan.caption, stack)) <= width
                   for stack in (False, True)):
            finer = plan_tables(scenario, plan.cells, exact=True, title=plan.title)
            if verbose:
                for f in finer:
                    f.columns = with_intervals(f.columns)
            if len(finer) > 1:
                out += finer
                continue
        out.append(plan)
    return out


def terminal_tables(plan: TablePlan, notes: dict, console: Console,
                    width: int = WIDTH) -> list[Table]:
    """One plan as rich tables no wider than ``width`` where the figures allow: headers
    stacked first, then columns with one value in every row said under the table, then
    the figures split over several tables (each with the param columns)."""
    columns, caption = list(plan.columns), list(plan.caption)

    def fits(cols, cap, stack):
        return _width(console, _rich_table(plan, cols, {}, plan.title, cap, stack)) <= width

    for stack in (False, True):
        if fits(columns, caption, stack):
            return [_rich_table(plan, columns, notes, plan.title, caption, stack)]
    same = []
    for c in columns:
        texts = {c.text(cell) for cell in plan.cells if c.value(cell) is not None}
        if len(texts) == 1 and sum(c.value(cell) is not None for cell in plan.cells) > 1:
            same.append(c)
            caption.append(f"{c.header} {next(iter(texts))[0]} in every row measured")
    if same:
        columns = [c for c in columns if c not in same]
        if fits(columns, caption, True):
            return [_rich_table(plan, columns, notes, plan.title, caption, True)]
    chunks, current = [], []
    for col in columns:
        if current and not fits(current + [col], [], True):
            chunks.append(current)
            current = []
        current.append(col)
    chunks.append(current)
    return [_rich_table(plan, chunk, notes,
                        plan.title + (f" (columns {i + 1} of {len(chunks)})"
                                      if len(chunks) > 1 else ""),
                        caption if i == len(chunks) - 1 else [], True)
            for i, chunk in enumerate(chunks)]


def print_run(run: results.Run, console: Console | None = None, width: int = WIDTH,
              verbose: bool = False) -> None:
    from .exporters.speedups import calibration_cells, result_cells

    console = console or Console()
    _print_noise(console, calibration_cells(run.cells))
    by_scenario: dict[str, list] = {}
    for c in result_cells(run.cells):
        by_scenario.setdefault(c.scenario, []).append(c)
    for name, cells in by_scenario.items():
        notes: dict[str, int] = {}
        for plan in terminal_plans(name, cells, console, width, verbose):
            for table in terminal_tables(plan, notes, console, width):
                # Never truncate a figure: render at the table's natural width (a narrow
                # terminal wraps the lines; a pipe or CI log gets them whole).
                saved = console.width
                console.width = max(saved, _width(console, table))
                try:
                    console.print(table)
                    console.print()
                finally:
                    console.width = saved
        for text, number in notes.items():
            console.print(f"  [{number}] {text}", markup=False, highlight=False, soft_wrap=True)
        if notes:
            console.print()
    counts = {s: sum(1 for c in run.cells if c.status == s) for s in results.STATUSES}
    n = len(run.cells)
    console.print(f"{n} cell{'' if n == 1 else 's'}: {counts['ok']} ok, {counts['skipped']} skipped, "
                  f"{counts['failed']} failed, {counts['lost']} lost messages")


def _print_noise(console: Console, cells) -> None:
    """The calibration loop, apart from the results: the machine's noise during the run
    (a yardstick the gate's CPU ratios are read by, never a results row)."""
    for c in cells:
        spread = spread_text(spread_fraction(c, "throughput_per_s"))
        loops = fmt(c.metrics.get("throughput_per_s")) if c.status == "ok" else c.status
        console.print(f"machine noise (calibration loop, not a result): {loops} loops/s"
                      f"{' ' + spread if spread else ''}, {len(c.repeats)} repeat"
                      f"{'' if len(c.repeats) == 1 else 's'}", markup=False, highlight=False)
    if cells:
        console.print()


def cell_line(cell: results.Cell, figures: int = 4) -> str:
    """One plain line per finished cell, for progress and --quiet logs."""
    params = " ".join(f"{k}={v}" for k, v in cell.params.items())
    summary = summary_columns(cell.scenario, [cell])
    cols: list[Column] = []
    for spec, header in summary:
        if column_value(cell, spec) is None:
            continue
        # as the tables do: a percentile the cell's count cannot support becomes one it can
        shown = supported_spec(spec, header, [cell])
        if all(col.spec != shown[0] for col in cols):
            cols.append(make_column(*shown, [cell]))
    cols = cols[:figures]
    shown = "  ".join(f"{c.header}={' '.join(filter(None, c.text(cell)))}" for c in cols)
    tail = f"  ({cell.reason})" if cell.reason else ""
    return f"{cell.status:7s} {cell.scenario} {params}  {shown}".rstrip() + tail
