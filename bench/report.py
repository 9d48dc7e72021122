"""Tables a person can read, from a results run (never from live measurements).

Each scenario module lists its columns in ``SUMMARY``: ``("metric", "header")``
for a metric, ``("hist.pXX", "header")`` for a histogram percentile (``hist``
being the histogram name). Params that vary within a scenario become columns
of their own; params that are the same in every cell are said once above.
"""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from . import results

STATUS_STYLE = {"ok": "green", "skipped": "yellow", "failed": "red", "lost": "red"}


def fmt(value) -> str:
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


def column_value(cell: results.Cell, spec: str):
    """``spec`` is a metric name or ``hist.pXX`` / ``hist.max`` / ``hist.count``."""
    if spec in cell.metrics:
        return cell.metrics[spec]
    name, _, stat = spec.rpartition(".")
    if name and name in cell.histograms:
        return cell.histograms[name].get(stat)
    return None


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


def scenario_table(name: str, cells: list[results.Cell], summary,
                   notes: dict[str, int] | None = None) -> Table:
    """One scenario's table. Long reasons become numbered notes (``notes``: text -> number),
    printed under the table, so each cell stays one line."""
    notes = {} if notes is None else notes
    varying, constant = varying_params(cells)
    # A column nobody has a value for (e.g. rate columns in a closed-loop run) is left out.
    summary = [(spec, header) for spec, header in summary
               if any(column_value(c, spec) is not None for c in cells)]
    caption = ", ".join(f"{k}={v}" for k, v in constant.items())
    table = Table(title=f"[bold]{name}[/bold]", caption=caption or None, caption_justify="left",
                  show_lines=False, header_style="bold", box=box.SIMPLE_HEAD)
    for k in varying:
        table.add_column(k, no_wrap=True)
    for _, header in summary:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=11)
    for c in cells:
        row = [fmt(c.params.get(k)) for k in varying]
        row += [fmt(column_value(c, spec)) for spec, _ in summary]
        status = c.status
        if c.reason:
            number = notes.setdefault(c.reason, len(notes) + 1)
            status = f"{status} [{number}]"
        row.append(Text(status, style=STATUS_STYLE.get(c.status, "")))
        table.add_row(*row)
    return table


def print_run(run: results.Run, console: Console | None = None) -> None:
    from .scenarios import summary as summary_of

    console = console or Console()
    by_scenario: dict[str, list] = {}
    for c in run.cells:
        by_scenario.setdefault(c.scenario, []).append(c)
    for name, cells in by_scenario.items():
        summary = summary_of(name)
        notes: dict[str, int] = {}
        table = scenario_table(name, cells, summary, notes)
        # Never truncate a figure: render at the table's natural width (a narrow terminal
        # wraps the lines; a pipe or CI log gets them whole, not cut at 80 columns).
        wide = console.options.update_width(10_000)
        natural = Measurement.get(console, wide, table).maximum
        saved = console.width
        console.width = max(saved, natural)
        try:
            console.print(table)
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


def cell_line(cell: results.Cell) -> str:
    """One plain line per finished cell, for progress and --quiet logs."""
    from .scenarios import summary as summary_of

    params = " ".join(f"{k}={v}" for k, v in cell.params.items())
    summary = summary_of(cell.scenario)
    figures = "  ".join(f"{h}={fmt(column_value(cell, s))}" for s, h in summary[:4])
    tail = f"  ({cell.reason})" if cell.reason else ""
    return f"{cell.status:7s} {cell.scenario} {params}  {figures}{tail}"
