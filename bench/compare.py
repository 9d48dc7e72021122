"""Compare cells: two runs paired by cell key, or cells of one run side by side.

Each comparison says the ratio in plain words, the way pyperf's ``compare_to``
does: "1.80x faster", "1.12x slower", or "no significant difference". Whether
a difference is significant is judged from the repeats a cell keeps:

* both cells have >= 2 repeats: a bootstrap 95% interval of the ratio of the
  repeat medians; significant when the interval leaves out 1.0;
* one cell has repeats: significant when the other's single value lies outside
  their min-max range and outside the noise band;
* neither has repeats: significant only outside the noise band (default 5%),
  and the line says there was no spread to judge by.

Speed is best judged by ratios measured side by side in ONE run
(:func:`compare_within`, ``celery-bench compare RUN --by producer``); across
runs on a shared machine, repeat with ``--repeat`` and read the interval.

Metrics are named as in the tables: a metric (``throughput_per_s``) or a
histogram statistic (``publish_us.p99``). Cells are picked with selectors,
``scenario[key=value,...]``, matching every cell whose params include those.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from . import config, results
from .report import fmt

NOISE = 0.05
BOOTSTRAP_RESAMPLES = 2000
HIST_STATS = ("p50", "p90", "p99", "p999", "max", "count")
DEFAULT_HIST_STATS = ("p50", "p99")


# --------------------------------------------------------------------------- selectors
@dataclass(frozen=True)
class Selector:
    """``scenario[key=value,...]``: the cells of ``scenario`` whose params include these."""
    scenario: str | None
    params: tuple = ()

    def __str__(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.scenario or ''}[{inner}]"

    def matches(self, run: results.Run) -> list[results.Cell]:
        return run.find(self.scenario, **dict(self.params))

    def replace(self, other: "Selector") -> "Selector":
        """This selector with ``other``'s params laid over it (``[producer=held]``)."""
        params = dict(self.params)
        params.update(other.params)
        return Selector(other.scenario or self.scenario, tuple(params.items()))


SELECTOR_RE = re.compile(r"^\s*([A-Za-z_][\w-]*)?\s*\[([^\[\]]*)\]\s*$")


def parse_selector(text: str) -> Selector:
    """``publish[api=kombu, producer=held]`` -> Selector; ValueError says what is wrong."""
    m = SELECTOR_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a cell selector; write scenario[key=value,...], "
                         f"e.g. publish[api=kombu,transport=memory]")
    pairs = []
    for item in filter(None, (p.strip() for p in m.group(2).split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{text!r}: {item!r} is not key=value")
        pairs.append((key.strip(), value.strip()))
    return Selector(m.group(1), tuple(pairs))


# --------------------------------------------------------------------------- values
def metric_value(cell: results.Cell, metric: str):
    """The cell's value of ``metric`` (median over repeats), or None."""
    if metric in cell.metrics:
        return _number(cell.metrics[metric])
    hist, _, stat = metric.rpartition(".")
    if hist in cell.histograms and stat in HIST_STATS:
        return _number(cell.histograms[hist].get(stat))
    return None


def repeat_values(cell: results.Cell, metric: str) -> list[float]:
    """``metric`` in each repeat (histogram statistics come from each repeat's own summary)."""
    out = []
    hist, _, stat = metric.rpartition(".")
    for rep in cell.repeats:
        if metric in rep.get("metrics", {}):
            value = rep["metrics"][metric]
        elif hist in rep.get("histograms", {}):
            value = rep["histograms"][hist].get(stat)
        else:
            value = None
        value = _number(value)
        if value is not None:
            out.append(value)
    return out


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def higher_is_better(metric: str) -> bool | None:
    """Throughputs up, latencies and counts of trouble down, anything else: no opinion."""
    hist, _, stat = metric.rpartition(".")
    if hist and stat in HIST_STATS and stat != "count":
        return False
    if metric.endswith("_per_s"):
        return None if metric.startswith("rate_target") else True
    if metric in ("lost", "errors", "duplicates", "overflow") or \
            re.search(r"(_ns|_us|_ms|_s|_seconds|latency|lag)$", metric):
        return False
    return None


def default_metrics(cell: results.Cell) -> list[str]:
    """Throughputs and each histogram's p50 and p99."""
    names = [m for m in cell.metrics if higher_is_better(m) is True]
    for hist in cell.histograms:
        names += [f"{hist}.{s}" for s in DEFAULT_HIST_STATS]
    return names


def unit_of(cell: results.Cell, metric: str) -> str:
    hist, _, stat = metric.rpartition(".")
    if hist in cell.histograms and stat not in ("count",):
        return " " + cell.histograms[hist].get("unit", "")
    return "/s" if metric.endswith("_per_s") else ""


# --------------------------------------------------------------------------- verdicts
@dataclass
class Comparison:
    metric: str
    base: float | None
    new: float | None
    unit: str = ""
    ratio: float | None = None        # new / base
    significant: bool | None = None
    direction: str = ""               # "faster" | "slower" | "higher" | "lower" | ""
    words: str = ""                   # the verdict in plain words
    detail: str = ""                  # how it was judged

    def line(self, width: int = 24) -> str:
        values = f"{fmt(self.base)}{self.unit} -> {fmt(self.new)}{self.unit}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.metric:<{width}} {values:<28} {self.words}{detail}"


def ratio_words(ratio: float, better_up: bool | None) -> tuple[str, str]:
    """(direction, words) for new/base = ``ratio``: "1.80x faster", "1.12x slower"."""
    if abs(ratio - 1) < 0.005:
        return "", "1.00x, unchanged"
    if better_up is None:
        return ("higher", f"{ratio:.2f}x higher") if ratio >= 1 else \
            ("lower", f"{1 / ratio:.2f}x lower")
    gain = ratio if better_up else 1 / ratio
    return ("faster", f"{gain:.2f}x faster") if gain >= 1 else \
        ("slower", f"{1 / gain:.2f}x slower")


def bootstrap_ratio_ci(base: list[float], new: list[float], seed: int = 0,
                       resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95% interval of median(new)/median(base), resampling repeats (seeded: reproducible)."""
    rng = np.random.default_rng(seed)
    b = np.median(rng.choice(np.asarray(base), (resamples, len(base))), axis=1)
    n = np.median(rng.choice(np.asarray(new), (resamples, len(new))), axis=1)
    ok = b > 0
    ratios = n[ok] / b[ok]
    if ratios.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def judge(metric: str, base: float | None, new: float | None, base_reps: list[float],
          new_reps: list[float], noise: float = NOISE, unit: str = "") -> Comparison:
    """One metric of two cells, in plain words."""
    c = Comparison(metric, base, new, unit)
    if base is None or new is None:
        c.words = "not compared"
        c.detail = f"missing in {'base' if base is None else 'new'}"
        return c
    if base == 0 or new == 0:
        c.words = "same (both 0)" if base == new else "not compared"
        c.detail = "" if base == new else "a zero value has no ratio"
        c.significant = False if base == new else None
        return c
    c.ratio = new / base
    better_up = higher_is_better(metric)
    c.direction, words = ratio_words(c.ratio, better_up)
    nb, nn = len(base_reps), len(new_reps)
    outside_noise = abs(c.ratio - 1) > noise
    if nb >= 2 and nn >= 2:
        lo, hi = bootstrap_ratio_ci(base_reps, new_reps)
        c.significant = outside_noise and not (lo <= 1.0 <= hi)
        if c.significant:  # the interval in the words' own terms: "1.66x slower, 95% CI 1.6-1.7"
            flip = (c.ratio < 1) if better_up is not False else (c.ratio > 1)
            a, b = sorted((1 / lo, 1 / hi) if flip and better_up is not None else (lo, hi))
            how = f"95% CI {a:.2f}-{b:.2f}, {nb} vs {nn} repeats"
        else:
            how = f"ratio {lo:.2f}-{hi:.2f} at 95%, {nb} vs {nn} repeats"
    elif nb >= 2 or nn >= 2:
        reps, single = (base_reps, new) if nb >= 2 else (new_reps, base)
        c.significant = outside_noise and not (min(reps) <= single <= max(reps))
        how = f"{nb} vs {nn} repeats, range {fmt(min(reps))}-{fmt(max(reps))}"
    else:
        c.significant = outside_noise
        how = "1 repeat each: no spread to judge by"
    if not outside_noise:
        how += f"; within the ±{noise:.0%} noise band"
    if c.significant:
        c.words, c.detail = words, how
    else:
        c.words, c.detail = "no significant difference", f"{words}; {how}"
    return c


def compare_cells(base: results.Cell, new: results.Cell, metrics=None,
                  noise: float = NOISE) -> list[Comparison]:
    """Every metric (default: throughputs, p50, p99) of ``new`` against ``base``."""
    if metrics is None:
        metrics = [m for m in default_metrics(base) if m in default_metrics(new)]
    return [judge(m, metric_value(base, m), metric_value(new, m), repeat_values(base, m),
                  repeat_values(new, m), noise, unit_of(base, m) or unit_of(new, m))
            for m in metrics]


# --------------------------------------------------------------------------- two runs
@dataclass
class Pair:
    key: str
    base: results.Cell | None
    new: results.Cell | None
    comparisons: list
    note: str = ""            # why nothing was compared


def _not_ok(cell: results.Cell | None, side: str) -> str:
    if cell is None:
        return f"only in {'NEW' if side == 'BASE' else 'BASE'}"
    if cell.status != "ok":
        return f"{cell.status} in {side}" + (f" ({cell.reason})" if cell.reason else "")
    return ""


def compare_runs(base: results.Run, new: results.Run, metrics=None, noise: float = NOISE,
                 selectors=()) -> list[Pair]:
    """Pair cells by :func:`results.cell_key` (BASE order, then cells only in NEW)."""
    def keep(run):
        if not selectors:
            return run.cells
        chosen = {id(c) for s in selectors for c in s.matches(run)}
        return [c for c in run.cells if id(c) in chosen]

    base_cells = {c.key: c for c in keep(base)}
    new_cells = {c.key: c for c in keep(new)}
    pairs = []
    for key in list(base_cells) + [k for k in new_cells if k not in base_cells]:
        b, n = base_cells.get(key), new_cells.get(key)
        note = _not_ok(b, "BASE") or _not_ok(n, "NEW")
        pairs.append(Pair(key, b, n, [] if note else compare_cells(b, n, metrics, noise), note))
    return pairs


# --------------------------------------------------------------------------- one run
@dataclass
class Group:
    """Cells that differ only in ``by``; each compared to the reference value."""
    scenario: str
    shared: dict
    by: str
    reference: str
    rows: list                 # [(value, comparisons or None, note)]


def compare_within(run: results.Run, by: str, reference: str | None = None,
                   metrics=None, noise: float = NOISE, selectors=()) -> list[Group]:
    """Cells of one run grouped by every param but ``by``, as ratios of ``by=reference``.

    ``reference`` defaults to the first value of ``by`` in each group (e.g. ``held``).
    """
    cells = run.cells
    if selectors:
        chosen = {id(c) for s in selectors for c in s.matches(run)}
        cells = [c for c in cells if id(c) in chosen]
    cells = [c for c in cells if by in c.params]
    if not cells:
        raise config.UsageError(f"--by {by}: no cell has a param {by!r}")
    values = list(dict.fromkeys(str(c.params[by]) for c in cells))
    if reference is not None and reference not in values:
        raise config.UsageError(f"--ref {reference!r}: {by} takes {', '.join(values)} in this run")
    groups: dict[str, tuple[Group, list]] = {}
    for c in cells:
        shared = {k: v for k, v in c.params.items() if k != by}
        key = results.cell_key(c.scenario, shared)
        # the reference defaults to each group's first value (held for kombu, default for celery)
        ref_value = reference if reference is not None else str(c.params[by])
        groups.setdefault(key, (Group(c.scenario, shared, by, ref_value, []), []))[1].append(c)
    for group, members in groups.values():
        ref = next((c for c in members if str(c.params[by]) == group.reference), None)
        for c in members:
            value = str(c.params[by])
            if value == group.reference:
                continue
            note = _not_ok(ref, "the run") if ref else \
                f"no {by}={group.reference} cell to compare with"
            note = note or _not_ok(c, "the run")
            group.rows.append((value, [] if note else compare_cells(ref, c, metrics, noise),
                               note))
    return [g for g, _ in groups.values() if g.rows]


# --------------------------------------------------------------------------- printing
def summary_counts(comparisons) -> str:
    counts = {"faster": 0, "slower": 0, "same": 0}
    for c in comparisons:
        if c.significant and c.direction in ("faster", "slower"):
            counts[c.direction] += 1
        elif c.significant is False:
            counts["same"] += 1
    return (f"{counts['faster']} faster, {counts['slower']} slower, "
            f"{counts['same']} no significant difference")


def format_runs(pairs: list[Pair], base_name: str, new_name: str) -> str:
    lines = [f"NEW = {new_name}, BASE = {base_name}; each line reads BASE -> NEW.", ""]
    every = []
    for p in pairs:
        if p.note:
            lines.append(f"{p.key}: not compared, {p.note}")
            continue
        lines.append(p.key)
        for c in p.comparisons:
            lines.append("  " + c.line())
            every.append(c)
    lines += ["", summary_counts(every) + f"; {sum(1 for p in pairs if p.note)} cells not compared"]
    return "\n".join(lines)


def format_within(groups: list[Group], name: str) -> str:
    lines = [f"{name}: ratios of cells measured side by side in this run; "
             "each line reads reference -> other.", ""]
    every = []
    for g in groups:
        lines.append(f"{results.cell_key(g.scenario, g.shared)}: {g.by} as a ratio of "
                     f"{g.by}={g.reference}")
        for value, comparisons, note in g.rows:
            if note:
                lines.append(f"  {g.by}={value}: not compared, {note}")
                continue
            lines.append(f"  {g.by}={value} vs {g.reference}")
            for c in comparisons:
                ratio = f"{c.ratio:.2f}x of {g.reference}; " if c.ratio else ""
                c = dataclasses.replace(c, detail=ratio + c.detail)
                lines.append("    " + c.line(22))
                every.append(c)
    lines += ["", summary_counts(every)]
    return "\n".join(lines)
