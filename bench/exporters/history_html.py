"""``celery-bench history report OUT.html``: each metric over commits, one chart per
metric, a line per machine kind and variant, whiskers for each run's 95% interval, and
the change points found (:mod:`bench.history_check`) marked with the commits they fall
between and the size of the step. Self-contained like the run report (inline SVG, no
script, nothing fetched)."""
from __future__ import annotations

from html import escape
from pathlib import Path

from ..history import History, Series
from ..history_check import change_points
from . import charts
from .html import Page


def _short(commit: str) -> str:
    return commit[:10]


def steps(series: Series) -> list[tuple]:
    """``(change point, first commit after, last commit before)`` of a series."""
    values = [p.value for p in series.points]
    return [(cp, series.points[cp.index].commit, series.points[cp.index - 1].commit)
            for cp in change_points(values)]


def _draw(fig, group: list[Series]) -> list[tuple]:
    ax = fig.subplots()
    found = []
    commits = list(dict.fromkeys(p.commit for s in group for p in s.points))
    where = {c: i for i, c in enumerate(commits)}
    for k, s in enumerate(group):
        colour = charts.PALETTE[(k + 4) % len(charts.PALETTE)]
        xs = [where[p.commit] for p in s.points]
        ys = [p.value for p in s.points]
        lo = [p.value - p.lo if p.lo is not None else 0 for p in s.points]
        hi = [p.hi - p.value if p.hi is not None else 0 for p in s.points]
        line = ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=colour, ecolor="#777777",
                           capsize=2, markersize=3, linewidth=1,
                           label=f"{s.label} (n={len(s.points)} runs)")
        line.lines[0].set_gid(f"data-history-{k}")
        for cp, after, before in steps(s):
            x = (where[before] + where[after]) / 2
            ax.axvline(x, color=charts.PALETTE[5], linestyle="--", linewidth=1)
            ax.annotate(f"{(cp.ratio - 1) * 100:+.0f}%", (x, cp.after), fontsize=7,
                        color=charts.PALETTE[5], xytext=(3, 3), textcoords="offset points")
            found.append((s, cp, before, after))
    ax.set_xticks(range(len(commits)))
    ax.set_xticklabels([c[:7] for c in commits], rotation=60, fontsize=6)
    ax.set_xlabel("commit, oldest first")
    ax.set_ylabel(group[0].unit or "value")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False, fontsize=7)
    return found


def history_html(history: History, metric_filters=(), title: str = "celery-bench history") -> str:
    page = Page(title)
    entries = history.entries()
    page.add(f"<h1>{escape(title)}</h1>",
             f'<p class="meta">{len(entries)} runs in {escape(str(history.root))}; '
             f"{len({e.commit for e in entries})} commits; machines: "
             f"{escape(', '.join(sorted({e.machine for e in entries})) or '-')}</p>",
             '<p class="muted">Each point is a run\'s figure (median over its repeats) with '
             "its 95% interval; a dashed line is a change point (PELT on the log values, kept "
             "when Welch's test between its segments gives p &lt; 1e-4), labelled with the "
             "step.</p>")
    by_metric: dict[str, list] = {}
    for s in history.series(metric_filters):
        by_metric.setdefault(s.metric, []).append(s)
    for i, (metric, group) in enumerate(by_metric.items()):
        page.add(f'<section class="metric" id="m-{i}"><h2>{escape(metric)}</h2>')
        with charts.style():
            fig = charts.new_figure(10, 3.6)
            found = _draw(fig, group)
            page.chart(fig, f"{metric} over commits, per machine kind / variant.")
        if found:
            page.add("<table class=\"changes\"><thead><tr><th>series</th><th>between</th>"
                     '<th class="num">step</th><th class="num">before</th>'
                     '<th class="num">after</th><th class="num">p</th></tr></thead><tbody>',
                     *(f"<tr><td>{escape(s.label)}</td><td><code>{escape(_short(b))}</code>.."
                       f"<code>{escape(_short(a))}</code></td>"
                       f'<td class="num">{(cp.ratio - 1) * 100:+.1f}%</td>'
                       f'<td class="num">{cp.before:.4g}</td><td class="num">{cp.after:.4g}</td>'
                       f'<td class="num">{cp.p:.1g}</td></tr>'
                       for s, cp, b, a in found), "</tbody></table>")
        else:
            page.add('<p class="muted">No change point.</p>')
        page.add("</section>")
    if not by_metric:
        page.add('<p class="banner">No metric in this history matches.</p>')
    return page.text()


def write_history_html(history: History, path, metric_filters=()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(history_html(history, metric_filters), encoding="utf-8")
    return path
