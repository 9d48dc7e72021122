"""``celery-bench history``: add a run, show, report and check the history
(:mod:`bench.history`, :mod:`bench.history_check`). Registered on the main group by
``bench.cli``; bad input is a :class:`config.UsageError` (one line, exit 2) as there."""
from __future__ import annotations

import sys

import click

from . import config
from .history import DEFAULT_DIR, History, read

_DIR = click.option("--dir", "root", default=DEFAULT_DIR, show_default=True,
                    type=click.Path(file_okay=False), help="The history directory.")
_METRIC = click.option("--metric", "metrics", multiple=True, metavar="TEXT",
                       help="Only metrics whose 'cell metric' name contains TEXT (repeatable).")


def _history(root) -> History:
    history = History(root)
    if not history.entries():
        raise config.UsageError(f"--dir {root}: no history yet; add a run with "
                                f"'celery-bench history add RESULTS'")
    return history


@click.group()
def history():
    """Keep every gated run and read each metric over commits."""


@history.command()
@click.argument("paths", nargs=-1, required=True, metavar="RESULTS...")
@_DIR
@click.option("--variant", default="default", show_default=True,
              help="What else tells this run's series apart (e.g. quick, nightly).")
@click.option("--commit", help="The commit (default: the run's git_commit).")
def add(paths, root, variant, commit):
    """Append results files to the history, keyed by commit, time, machine and variant."""
    history = History(root)
    for path in paths:           # every file read before one is kept
        read(path)
    for path in paths:
        e = history.add(path, variant, commit)
        click.echo(f"added {path}: commit {e.commit[:12]}, {e.time}, {e.machine}, "
                   f"variant {e.variant}, {len(e.figures)} figures")


@history.command()
@_DIR
@_METRIC
def show(root, metrics):
    """Print each metric over commits, per machine kind and variant."""
    from .history_check import change_points
    from .report import fmt

    found = _history(root).series(metrics)
    if not found:
        raise config.UsageError(f"--metric {' '.join(metrics)}: no metric in the history matches")
    for s in found:
        click.echo(f"{s.metric} [{s.unit}] on {s.label}")
        steps = {cp.index: cp for cp in change_points([p.value for p in s.points])}
        for i, p in enumerate(s.points):
            iv = f" (95% {fmt(p.lo)}-{fmt(p.hi)}, n={p.n})" if p.lo is not None else \
                f" (n={p.n})"
            mark = f"   <- change point, {(steps[i].ratio - 1) * 100:+.1f}%" if i in steps else ""
            click.echo(f"  {p.commit[:12]:12s} {p.time}  {fmt(p.value)}{iv}{mark}")


@history.command()
@click.argument("out", metavar="OUT.html", type=click.Path(dir_okay=False))
@_DIR
@_METRIC
def report(out, root, metrics):
    """Write a self-contained HTML page: one chart per metric, change points marked."""
    from .exporters.history_html import write_history_html

    history = _history(root)
    path = write_history_html(history, out, metrics)
    click.echo(f"wrote {path}")


@history.command()
@_DIR
@_METRIC
@click.option("--threshold", type=float, default=0.10, show_default=True,
              help="A regression is a newest segment worse than the one before by more "
                   "than this fraction.")
def check(root, metrics, threshold):
    """Exit 1 when the newest segment of a metric's history regressed past --threshold."""
    from .compare import higher_is_better
    from .history_check import newest_regression

    if not 0 < threshold < 10:
        raise config.UsageError(f"--threshold {threshold}: a fraction above 0, e.g. 0.1")
    found = _history(root).series(metrics)
    bad = 0
    for s in found:
        metric = s.metric.rsplit(" ", 1)[-1]
        cp = newest_regression([p.value for p in s.points], higher_is_better(metric), threshold)
        if cp is not None:
            bad += 1
            click.echo(f"REGRESSION {s.metric} on {s.label}: {(cp.ratio - 1) * 100:+.1f}% "
                       f"between {s.points[cp.index - 1].commit[:12]} and "
                       f"{s.points[cp.index].commit[:12]} (p={cp.p:.1g})")
    click.echo(f"history check: {len(found)} series, {bad} regressed beyond "
               f"{threshold * 100:g}% in their newest segment")
    if bad:
        sys.exit(1)
