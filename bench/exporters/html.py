"""One self-contained HTML page per run (or per comparison of two runs).

No network: styles are inline, charts are SVG drawn by matplotlib and inlined, no
script. For each scenario: its tables with the repeat spread (±), throughput bars
with whiskers from the lowest to the highest repeat, latency percentile spectra
(faceted, one chart per histogram kind), latency against rate for sweeps with the
maximum sustainable rate marked, latency over time from the interval histograms;
then the environment.

``write_html(run, path)`` is what ``celery-bench run`` calls for
``results/latest.html``; ``write_compare_html(base, new, path)`` backs
``celery-bench report BASE.json NEW.json --format html``.
"""
from __future__ import annotations

import itertools
import json
import shlex
from html import escape
from pathlib import Path

from .. import results
from ..report import (fmt, fmt_figure, percentile_of, plan_tables, spread_fraction, spread_text,
                      summary_columns)
from . import charts, speedups, variants

CSS = """
:root { --fg: #1b1b1b; --muted: #5a5a5a; --line: #d6d6d6; --bg-alt: #f5f5f5; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); margin: 0 auto; max-width: 1180px; padding: 0 24px 48px; }
h1 { font-size: 22px; margin: 24px 0 4px; } h2 { font-size: 19px; margin: 36px 0 8px;
  border-bottom: 2px solid var(--fg); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 22px 0 6px; } h4 { font-size: 14px; margin: 14px 0 4px; }
p.meta, p.caption, .muted { color: var(--muted); margin: 4px 0; }
nav a { margin-right: 14px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { text-align: left; background: var(--bg-alt); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td .spread { color: var(--muted); font-size: 12px; margin-left: 4px; }
td.ok { color: #007a4d; } td.skipped { color: #9a6a00; } td.failed, td.lost { color: #b3261e; }
tr.faster td.verdict { color: #007a4d; font-weight: 600; }
tr.slower td.verdict { color: #b3261e; font-weight: 600; }
tr.changed td { background: #fff4d6; }
table.verdicts { width: 100%; }
td.how { white-space: normal; font-size: 12px; }
td.cell { vertical-align: top; white-space: normal; width: 24%; }
ol.notes { color: var(--muted); margin: 4px 0 8px; }
figure { margin: 10px 0 18px; } figure svg { max-width: 100%; height: auto; }
.grid { display: flex; flex-wrap: wrap; gap: 0 16px; } .grid figure { margin: 4px 0; }
figcaption { color: var(--muted); font-size: 12px; }
details > summary { cursor: pointer; color: var(--muted); margin: 6px 0; }
.banner { background: #fde7e4; border: 1px solid #b3261e; padding: 8px 12px; }
pre { background: var(--bg-alt); padding: 8px; overflow-x: auto; font-size: 12px; }
"""


class Page:
    """The parts of one page being built, and a counter for unique chart ids."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self._ids = itertools.count(1)

    def add(self, *html: str) -> None:
        self.parts.extend(html)

    def next_id(self) -> str:
        return f"chart{next(self._ids)}"

    def chart(self, fig, caption: str = "") -> None:
        ident = self.next_id()
        self.add(f'<figure class="chart" id="{ident}">', charts.svg(fig, ident),
                 f"<figcaption>{escape(caption)}</figcaption>" if caption else "", "</figure>")

    def text(self) -> str:
        return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{escape(self.title)}</title><style>{CSS}</style></head><body>\n"
                + "\n".join(p for p in self.parts if p) + "\n</body></html>\n")


# --------------------------------------------------------------------------- pieces
def _by_scenario(cells) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in cells:
        out.setdefault(c.scenario, []).append(c)
    return out


def _description(scenario: str) -> str:
    from .. import scenarios

    try:
        return scenarios.get(scenario).description
    except Exception:            # a scenario this checkout lacks (a Locust export)
        return ""


def _interval_tip(cell, col) -> str:
    """A percentile cell's tooltip: its 95% interval and sample count (or too few)."""
    p = percentile_of(cell, col.spec)
    if p is None or p.value is None:
        return ""
    if not p.enough:
        return f' title="{escape(p.too_few)}"'
    lo, hi = fmt_figure(p.lo * col.scale), fmt_figure(p.hi * col.scale)
    return f' title="95% interval {escape(lo)}-{escape(hi)} {escape(col.unit)}, n={p.n:,}"'


def _tables(page: Page, scenario: str, cells) -> None:
    notes: dict[str, int] = {}
    ratios = speedups.ratios(scenario, cells)
    summary = speedups.wide_summary(summary_columns(scenario, cells),
                                    [r.header for r in ratios])
    for plan in plan_tables(scenario, cells, summary):
        if plan.title != scenario:
            page.add(f"<h4>{escape(plan.title)}</h4>")
        shown = [r for r in ratios if any(id(c) in r.values for c in plan.cells)]
        head = "".join(f"<th>{escape(k)}</th>" for k in plan.params)
        head += "".join(f'<th class="num">{escape(c.header)}</th>' for c in plan.columns)
        head += "".join(f'<th class="num ratio">{escape(r.header)} (95% CI)</th>' for r in shown)
        rows = []
        for c in plan.cells:
            tds = "".join(f"<td>{escape(fmt(c.params.get(k)))}</td>" for k in plan.params)
            for col, (figure, spread) in zip(plan.columns, plan.row(c)):
                extra = f'<span class="spread">{escape(spread)}</span>' if spread else ""
                tip = _interval_tip(c, col)
                tds += f'<td class="num"{tip}>{escape(figure)}{extra}</td>'
            tds += "".join(f'<td class="num ratio">{escape(r.text(c))}</td>' for r in shown)
            status = escape(c.status)
            if c.reason:
                number = notes.setdefault(c.reason, len(notes) + 1)
                status += f' <a href="#note-{escape(scenario)}-{number}">[{number}]</a>'
            rows.append(f"<tr>{tds}<td class=\"{escape(c.status)}\">{status}</td></tr>")
        page.add('<div class="scroll"><table>', f"<thead><tr>{head}<th>status</th></tr></thead>",
                 "<tbody>", *rows, "</tbody></table></div>")
        if plan.caption:
            page.add(f'<p class="caption">{escape(", ".join(plan.caption))}</p>')
        if shown:
            page.add(f'<p class="caption">{escape("; ".join(r.explain for r in shown))}; the '
                     'median of per-round ratios, 95% t-interval on their logs.</p>')
    if notes:
        page.add('<ol class="notes">', *(f'<li id="note-{escape(scenario)}-{n}">{escape(t)}</li>'
                                         for t, n in notes.items()), "</ol>")
    if any(len(c.repeats) > 1 for c in cells):
        page.add('<p class="muted">Figures are medians over repeats; ±x%: every repeat '
                 'lies within x% of the median. Percentiles are of all repeats merged.</p>')


def _metric(cell, by_key, metric):
    """``metric`` of ``cell`` (or of the cell with its key in ``by_key``), if a number."""
    c = cell if by_key is None else by_key.get(cell.key)
    v = c.metrics.get(metric) if c is not None and c.status == "ok" else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _rate_charts(page: Page, scenario: str, cells, runs=None) -> None:
    sources = runs or [("", None, "-")]
    ok = [c for c in cells if c.status == "ok"]
    keys = charts.varying_keys(cells)
    heading = False
    for metric in charts.rate_metrics(summary_columns(scenario, ok), ok):
        shown = [c for c in cells if any(_metric(c, r, metric) is not None for _, r, _ in sources)]
        if not shown:
            continue
        if not heading:
            page.add("<h3>Throughput</h3>")
            heading = True
        with charts.style():
            fig = charts.new_figure(10, 1.2 + 0.32 * len(shown) * len(sources))
            charts.draw_rates(fig, shown, metric, keys, runs)
            page.chart(fig, f"{charts.rate_words(metric)}: medians over repeats, whiskers "
                            f"span the lowest to the highest repeat; n = repeats.")


def _spectra(page: Page, cells, runs=None, note: str = "") -> None:
    per = charts.MAX_CURVES // (len(runs) if runs else 1)
    rows = charts.spectrum_facets(cells, per)
    if not rows:
        return
    page.add("<h3>Latency by percentile</h3>",
             '<p class="muted">x: percentile on the 1/(1-p) scale, y: latency, both log; at '
             'most six curves a chart, one chart per histogram kind; n = samples in the '
             f'histogram (all repeats merged).{escape(note)}</p>')
    slots = max(len(kinds) for _, kinds in rows)
    for facet, kinds in rows:
        with charts.style():
            fig = charts.new_figure(4.8 * slots + 0.4,
                                    charts.spectrum_height(facet, len(runs) if runs else 1))
            charts.draw_spectra(fig, facet, kinds, runs, slots=slots)
            page.chart(fig)


def _sweeps(page: Page, cells) -> None:
    found = charts.sweeps(cells)
    searched = charts.searches(cells)
    if not found and not searched:
        return
    page.add("<h3>Latency against rate</h3>")
    keys = charts.varying_keys(cells)
    for cell in searched:
        with charts.style():
            fig = charts.new_figure(10, 3.9)
            charts.draw_search(fig, cell, keys)
            page.chart(fig, f"Each step of the search for the highest rate that keeps "
                            f"{cell.metrics.get('slo') or 'the SLO'}; maximum sustainable "
                            f"rate {cell.metrics['max_sustainable_rate_per_s']:,.0f}/s"
                            + (f" ({cell.metrics['search_why']})"
                               if cell.metrics.get("search_why") else "") + ".")
    for sweep in found:
        with charts.style():
            fig = charts.new_figure(4.6 * min(3, max(1, len(charts.hist_kinds(sweep.cells))))
                                    + 0.4, charts.sweep_height(sweep))
            charts.draw_sweep(fig, sweep)
            note = (f"maximum sustainable rate {sweep.max_rate:,.0f}/s"
                    + (f" ({sweep.slo})" if sweep.slo else "")) if sweep.max_rate is not None else \
                "no maximum sustainable rate recorded for this sweep"
            page.chart(fig, f"Percentiles of each rate's cell; {note}.")


def _waterfalls(page: Page, cells) -> None:
    from . import waterfall_chart

    shown = waterfall_chart.cells_with_waterfall(cells)
    if not shown:
        return
    with charts.style():
        fig = charts.new_figure(8, waterfall_chart.height(len(shown)))
        waterfall_chart.draw(fig, shown, charts.varying_keys(shown))
        page.chart(fig, waterfall_chart.caption())


def _timeseries(page: Page, cells) -> None:
    kinds = [k for k in charts.hist_kinds(cells) if charts.cells_with_intervals(cells, k)]
    if not kinds:
        return
    page.add("<h3>Latency over time</h3>",
             '<p class="muted">p50, p99 and max of each interval histogram (1 s by default); '
             'a break in a line is the time between two repeats of the cell.</p>')
    keys = charts.varying_keys(cells)
    for kind in kinds:
        shown = charts.cells_with_intervals(cells, kind)
        page.add(f"<details{' open' if len(shown) <= 6 else ''}><summary>{escape(kind)}: "
                 f"{len(shown)} cell{'s' * (len(shown) != 1)}</summary>", '<div class="grid">')
        for cell in shown:
            ident = page.next_id()
            page.add(f'<figure class="chart" id="{ident}">',
                     charts.timeseries_svg(cell, kind, keys, ident), "</figure>")
        page.add("</div></details>")


def _value(v, key: str = "") -> str:
    """An environment value, compactly: argv as a shell line, a dict of dicts (services)
    as a small table, any other dict as its set ``k=v`` items."""
    if key == "argv" and isinstance(v, list):
        return f"<code>{escape(shlex.join(str(a) for a in v))}</code>"
    if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
        cols = list(dict.fromkeys(k for x in v.values() for k in x))
        head = "".join(f"<th>{escape(c)}</th>" for c in cols)
        rows = "".join(f"<tr><th>{escape(str(name))}</th>"
                       + "".join(f"<td>{escape(fmt(x.get(c)))}</td>" for c in cols) + "</tr>"
                       for name, x in v.items())
        return f"<table><thead><tr><th></th>{head}</tr></thead>{rows}</table>"
    if isinstance(v, dict):
        return escape(", ".join(f"{k}={json.dumps(x, default=str) if isinstance(x, (list, dict)) else x}"
                                for k, x in v.items() if x not in (None, "", [], {}, ())))
    if isinstance(v, list):
        return escape(", ".join(str(x) for x in v))
    return escape(fmt(v))


def _environment(page: Page, env: dict, other: dict | None = None,
                 names=("BASE", "NEW")) -> None:
    page.add('<h2 id="environment">Environment</h2>', '<div class="scroll"><table>')
    if other is None:
        page.add(*(f"<tr><th>{escape(k)}</th><td>{_value(v, k)}</td></tr>"
                   for k, v in env.items()))
    else:
        page.add(f"<thead><tr><th></th><th>{escape(names[0])}</th>"
                 f"<th>{escape(names[1])}</th></tr></thead>")
        for k in dict.fromkeys([*env, *other]):
            a, b = env.get(k), other.get(k)
            changed = ' class="changed"' if a != b and k not in ("utc_time", "argv") else ""
            page.add(f"<tr{changed}><th>{escape(k)}</th><td>{_value(a, k)}</td>"
                     f"<td>{_value(b, k)}</td></tr>")
    page.add("</table></div>")


def _noise(page: Page, runs) -> None:
    """The calibration loop, beside the environment: how steady this machine was.
    ``runs``: ``[(name, cells)]`` (one unnamed run for a report, BASE and NEW to compare)."""
    rows = [(name, c) for name, cells in runs for c in cells if c.status == "ok"]
    if not rows:
        return
    named = any(name for name, _ in rows)
    page.add('<h3 id="noise">Machine noise: the calibration loop</h3>',
             '<p class="muted">A fixed pure-Python workload run in the same rounds as the '
             'cells: the yardstick the gate\'s CPU ratios are read by, not a result. The '
             'spread of its repeats is this machine\'s noise during the run.</p>',
             '<table class="noise"><thead><tr>' + ("<th>run</th>" if named else "")
             + '<th>cell</th><th class="num">loops/s</th><th class="num">spread of repeats'
             '</th><th class="num">repeats</th></tr></thead><tbody>')
    for name, c in rows:
        spread = spread_text(spread_fraction(c, "throughput_per_s")) or "-"
        page.add("<tr>" + (f"<td>{escape(name)}</td>" if named else "")
                 + f"<td>{escape(c.key)}</td>"
                 f'<td class="num">{escape(fmt(c.metrics.get("throughput_per_s")))}</td>'
                 f'<td class="num">{escape(spread)}</td><td class="num">{len(c.repeats)}</td></tr>')
    page.add("</tbody></table>")


def _header(page: Page, run: results.Run, title: str) -> None:
    env = run.environment
    counts = {s: sum(1 for c in run.cells if c.status == s) for s in results.STATUSES}
    commit = str(env.get("git_commit") or "?")[:12]
    page.add(f"<h1>{escape(title)}</h1>",
             f'<p class="meta">{escape(str(env.get("utc_time", "")))} · celery '
             f'{escape(str(env.get("celery", "?")))} · kombu {escape(str(env.get("kombu", "?")))}'
             f' · Python {escape(str(env.get("python", "?")))} · {escape(str(env.get("cpu_count", "?")))}'
             f' x {escape(str(env.get("cpu_model", "?")))} · commit {escape(commit)}</p>',
             f'<p class="meta">{len(run.cells)} cells: {counts["ok"]} ok, {counts["skipped"]} '
             f'skipped, {counts["failed"]} failed, {counts["lost"]} lost messages</p>')
    if env.get("interrupted"):
        page.add('<p class="banner">This run was interrupted: only the cells measured '
                 'before it stopped are here.</p>')


def _nav(page: Page, scenarios) -> None:
    page.add("<nav>", *(f'<a href="#s-{escape(s)}">{escape(s)}</a>' for s in scenarios),
             '<a href="#environment">environment</a>', "</nav>")


# --------------------------------------------------------------------------- one run
def html(run: results.Run, title: str = "celery-bench report") -> str:
    page = Page(title)
    _header(page, run, title)
    groups = _by_scenario(speedups.result_cells(run.cells))
    _nav(page, groups)
    for scenario, cells in groups.items():
        page.add(f'<section id="s-{escape(scenario)}"><h2>{escape(scenario)}</h2>')
        desc = _description(scenario)
        if desc:
            page.add(f'<p class="muted">{escape(desc)}</p>')
        _tables(page, scenario, cells)
        variants.section(page, scenario, cells, _verdict_rows)
        _rate_charts(page, scenario, cells)
        _spectra(page, cells)
        _sweeps(page, cells)
        _waterfalls(page, cells)
        _timeseries(page, cells)
        page.add("</section>")
    _environment(page, run.environment)
    _noise(page, [("", speedups.calibration_cells(run.cells))])
    return page.text()


def write_html(run: results.Run, path, title: str = "celery-bench report") -> Path:
    """Write the run's report to ``path`` (one file, nothing fetched when opened)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html(run, title), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- two runs
def _comparisons(base: results.Run, new: results.Run, base_name: str = "BASE",
                 new_name: str = "NEW"):
    """(pairs, text, error) from bench.compare, whatever of it works: its statistics are
    its own business, this page only shows them."""
    try:
        from .. import compare as cmp
    except Exception as exc:                       # pragma: no cover - a broken module
        return [], "", f"bench.compare could not be imported: {exc}"
    pairs, text, error = [], "", ""
    try:
        pairs = list(cmp.compare_runs(base, new))
    except Exception as exc:
        error = f"compare_runs failed: {exc}"
    if pairs:
        try:
            text = cmp.format_runs(pairs, base_name, new_name)
        except Exception:
            text = ""
    return pairs, text, error


def _verdict_rows(pairs, keys_by_scenario) -> dict[str, list]:
    rows: dict[str, list] = {}
    for pair in pairs:
        cell = getattr(pair, "new", None) or getattr(pair, "base", None)
        scenario = cell.scenario if cell is not None else str(getattr(pair, "key", "?"))
        label = charts.cell_label(cell, keys_by_scenario.get(scenario, []), with_names=True) \
            if cell is not None else str(getattr(pair, "key", ""))
        note = getattr(pair, "note", "")
        comps = list(getattr(pair, "comparisons", []) or [])
        if note or not comps:
            rows.setdefault(scenario, []).append(
                f'<tr><td class="cell">{escape(label)}</td><td colspan="5" class="muted how">'
                f"{escape(note or 'nothing compared')}</td></tr>")
            continue
        for i, comp in enumerate(comps):
            unit = str(getattr(comp, "unit", "") or "")
            direction = str(getattr(comp, "direction", "") or "")
            significant = getattr(comp, "significant", None)
            cls = direction if significant and direction in ("faster", "slower") else ""
            first = f'<td rowspan="{len(comps)}" class="cell">{escape(label)}</td>' if i == 0 \
                else ""
            rows.setdefault(scenario, []).append(
                f'<tr class="{cls}">{first}'
                f"<td>{escape(str(getattr(comp, 'metric', '')))}</td>"
                f'<td class="num">{escape(fmt(getattr(comp, "base", None)) + unit)}</td>'
                f'<td class="num">{escape(fmt(getattr(comp, "new", None)) + unit)}</td>'
                f'<td class="verdict">{escape(str(getattr(comp, "words", "")))}</td>'
                f'<td class="muted how">{escape(str(getattr(comp, "detail", "")))}</td></tr>')
    return rows


def compare_html(base: results.Run, new: results.Run, base_name: str = "BASE",
                 new_name: str = "NEW") -> str:
    """BASE against NEW: the verdicts of :mod:`bench.compare`, throughputs side by side,
    spectra overlaid (BASE dashed, NEW solid), both environments."""
    title = f"celery-bench: {base_name} against {new_name}"
    page = Page(title)
    page.add(f"<h1>{escape(title)}</h1>",
             f'<p class="meta">BASE = {escape(base_name)} ({escape(str(base.environment.get("utc_time", "")))}), '
             f'NEW = {escape(new_name)} ({escape(str(new.environment.get("utc_time", "")))})</p>')
    pairs, text, error = _comparisons(base, new, base_name, new_name)
    if error:
        page.add(f'<p class="banner">{escape(error)}</p>')
    try:
        from ..compare import every_comparison, summary_counts

        page.add(f'<p class="meta">{escape(summary_counts(every_comparison(pairs)))}</p>')
    except Exception:
        pass
    by_key_base = {c.key: c for c in base.cells}
    by_key_new = {c.key: c for c in new.cells}
    union = speedups.result_cells({**by_key_base, **by_key_new}.values())
    groups = _by_scenario(union)
    keys = {s: charts.varying_keys(cells) for s, cells in groups.items()}
    shown = [p for p in pairs if not any(c is not None and speedups.is_calibration(c)
                                         for c in (getattr(p, "new", None),
                                                   getattr(p, "base", None)))]
    verdicts = _verdict_rows(shown, keys)
    runs = [(base_name, by_key_base, "--"), (new_name, by_key_new, "-")]
    _nav(page, groups)
    for scenario, cells in groups.items():
        page.add(f'<section id="s-{escape(scenario)}"><h2>{escape(scenario)}</h2>')
        if verdicts.get(scenario):
            page.add('<div class="scroll"><table class="verdicts"><thead><tr><th>cell</th>'
                     '<th>metric</th>'
                     f'<th class="num">{escape(base_name)}</th><th class="num">'
                     f'{escape(new_name)}</th><th>verdict</th><th>how</th></tr></thead><tbody>',
                     *verdicts[scenario], "</tbody></table></div>")
        _rate_charts(page, scenario, cells, runs)
        _spectra(page, cells, runs, f" {base_name} dashed, {new_name} solid, the same colour "
                                    "for the same cell.")
        page.add("</section>")
    if text:
        page.add("<details><summary>as <code>celery-bench compare</code> prints it</summary>",
                 f"<pre>{escape(text)}</pre></details>")
    _environment(page, base.environment, new.environment, (base_name, new_name))
    _noise(page, [(base_name, speedups.calibration_cells(base.cells)),
                  (new_name, speedups.calibration_cells(new.cells))])
    return page.text()


def write_compare_html(base: results.Run, new: results.Run, path, base_name: str = "BASE",
                       new_name: str = "NEW") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compare_html(base, new, base_name, new_name), encoding="utf-8")
    return path
