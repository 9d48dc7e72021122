"""Export a results run: one small function per format (hyperfine's habit).

* ``markdown`` - the tables of ``celery-bench show`` as GitHub markdown (for the README);
* ``csv``      - one row per cell: params, metrics, histogram percentiles;
* ``png``      - latency percentile curves from the recorded HdrHistograms
                 (x: percentile on the 1/(1-p) scale, y: latency, log-log).

``celery-bench report RESULTS --format md|csv|png [--out FILE]``.
"""
from __future__ import annotations

import csv as csv_module
import io
import math
from pathlib import Path

from . import results
from .report import varying_params, column_value, fmt

PERCENTILE_TICKS = (50.0, 90.0, 99.0, 99.9, 99.99, 99.999)


def _summary(scenario: str, cells: list) -> list:
    """The scenario's SUMMARY columns; for a scenario this checkout lacks (a Locust
    export, an older run), its throughputs and each histogram's p50 and p99."""
    from .compare import default_metrics
    from .scenarios import summary as summary_of

    known = summary_of(scenario)
    if known:
        return known
    names = dict.fromkeys(m for c in cells if c.status == "ok" for m in default_metrics(c))
    return [(m, m) for m in names]


def _by_scenario(run: results.Run) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in run.cells:
        out.setdefault(c.scenario, []).append(c)
    return out


def markdown(run: results.Run) -> str:
    env = run.environment
    lines = [f"celery {env.get('celery', '?')}, kombu {env.get('kombu', '?')}, "
             f"Python {env.get('python', '?')}, {env.get('cpu_count', '?')} x "
             f"{env.get('cpu_model', '?')}, {env.get('utc_time', '')}", ""]
    for name, cells in _by_scenario(run).items():
        varying, constant = varying_params(cells)
        summary = _summary(name, cells)
        lines.append(f"### {name}")
        if constant:
            lines.append("")
            lines.append(", ".join(f"{k}={v}" for k, v in constant.items()))
        header = varying + [h for _, h in summary] + ["status"]
        lines += ["", "| " + " | ".join(header) + " |",
                  "|" + "|".join("---" if i < len(varying) else "---:"
                                 for i in range(len(header) - 1)) + "|---|"]
        for c in cells:
            row = [fmt(c.params.get(k)) for k in varying]
            row += [fmt(column_value(c, spec)) for spec, _ in summary]
            row.append(c.status + (f": {c.reason}" if c.reason else ""))
            lines.append("| " + " | ".join(v.replace("|", "\\|") for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def csv(run: results.Run) -> str:
    params = list(dict.fromkeys(k for c in run.cells for k in c.params))
    metrics = list(dict.fromkeys(k for c in run.cells for k in c.metrics))
    hists = list(dict.fromkeys(f"{h}.{s}" for c in run.cells for h in c.histograms
                               for s in ("count", *results.PERCENTILES, "max", "overflow")))
    out = io.StringIO()
    writer = csv_module.writer(out, lineterminator="\n")
    writer.writerow(["scenario", "cell", "status", "reason", *params, *metrics, *hists])
    for c in run.cells:
        writer.writerow([c.scenario, c.key, c.status, c.reason,
                         *(c.params.get(k, "") for k in params),
                         *(c.metrics.get(k, "") for k in metrics),
                         *("" if (v := column_value(c, h)) is None else v for h in hists)])
    return out.getvalue()


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


def png(run: results.Run, path, cells=None, hist_names=None) -> Path:
    """Percentile curves of ``hist_names`` (default all) for ``cells`` (default all ok)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in (cells if cells is not None else run.cells) if c.status == "ok"]
    varying, constant = varying_params(cells) if cells else ([], {})
    fig, ax = plt.subplots(figsize=(10, 6))
    units, drawn = set(), 0
    for c in cells:
        for name, summary in c.histograms.items():
            if hist_names and name not in hist_names:
                continue
            levels, values = percentile_curve(summary)
            if not levels:
                continue
            x = [100 / (100 - p) for p in levels]
            label = ",".join(f"{k}={c.params.get(k)}" for k in varying) or c.scenario
            ax.plot(x, values, label=f"{label} {name}", linewidth=1.2)
            units.add(summary.get("unit", "us"))
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError("no recorded histogram to plot (check --cell / --hist)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([1 / (1 - p / 100) for p in PERCENTILE_TICKS])
    ax.set_xticklabels([f"{p:g}%" for p in PERCENTILE_TICKS])
    ax.set_xlabel("percentile")
    ax.set_ylabel(f"latency ({', '.join(sorted(units))})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    scenarios = ", ".join(dict.fromkeys(c.scenario for c in cells))
    shared = ", ".join(f"{k}={v}" for k, v in constant.items())
    ax.set_title(f"{scenarios}: latency by percentile (HdrHistogram)"
                 + (f"\n{shared}" if shared else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TEXT_FORMATS = {"md": markdown, "csv": csv}
FORMATS = ("md", "csv", "png")
