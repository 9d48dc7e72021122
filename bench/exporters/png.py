"""Latency percentile spectra as one PNG: a row per facet of at most six cells, a chart
per histogram kind in the row (x: percentile on the 1/(1-p) scale, y: latency, both
log), legends below the charts. See :mod:`.charts` for the rules."""
from __future__ import annotations

from pathlib import Path

from .. import results
from . import charts, speedups


def png(run: results.Run, path, cells=None, hist_names=None, dpi: int = 110) -> Path:
    """Spectra of ``hist_names`` (default all) for ``cells`` (default all ok); a run of
    max-rate searches gets their overview instead (latency against the rates tried)."""
    # the calibration loop is the machine's yardstick, not a result: drawn only if asked for
    chosen = [c for c in (cells if cells is not None else speedups.result_cells(run.cells))
              if c.status == "ok"]
    found = charts.searches(chosen)
    if found and len(found) == len(chosen):
        with charts.style():
            fig = charts.new_figure(9.5, 4.2)
            charts.draw_search_overview(fig, found, charts.varying_keys(found))
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=dpi, bbox_inches="tight")
        return path
    rows = []
    by_scenario: dict[str, list] = {}
    for c in chosen:
        by_scenario.setdefault(c.scenario, []).append(c)
    for scenario, group in by_scenario.items():
        if hist_names:
            group = [results.Cell(c.scenario, c.params, c.status, c.reason, c.metrics,
                                  c.spread, c.repeats,
                                  {k: v for k, v in c.histograms.items() if k in hist_names})
                     for c in group]
        rows += [(scenario, f, kinds) for f, kinds in charts.spectrum_facets(group)]
    if not rows:
        raise ValueError("no recorded histogram to plot (check --cell / --hist)")
    slots = max(len(k) for _, _, k in rows)
    width = 4.8 * slots + 0.4
    heights = [charts.spectrum_height(f) for _, f, _ in rows]
    with charts.style():
        fig = charts.new_figure(width, sum(heights))
        subfigs = fig.subfigures(len(rows), 1, height_ratios=heights, squeeze=False)[:, 0]
        for sub, (scenario, facet, kinds) in zip(subfigs, rows):
            charts.draw_spectra(sub, facet, kinds, slots=slots,
                                title=f"{scenario}: {facet.title}" if facet.title else scenario)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return path
