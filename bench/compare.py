"""Compare cells: two runs paired by cell key, or cells of one run side by side.

Each comparison says the ratio in plain words, the way pyperf's ``compare_to``
does: "1.80x faster (95% CI 1.62-1.98, 5 vs 5 repeats, p=0.0004)", "no
significant difference (...)", or "not enough repeats to judge (1 vs 1; ...)".
The statistics are in :mod:`bench.stats`:

* fewer than 3 repeats a side (or 3 paired rounds): no verdict, only the ratio
  as measured;
* within one run (``--by``, two ``--cell``): repeats are paired by the round
  they were measured in (``repeats[i]["round"]``, else by position) and judged on
  the per-round ratios, so whatever slowed the machine during a round cancels;
* across two runs: the ratio of medians, Welch's t on the logs of the repeats.
  A drift of the whole machine between runs moves every repeat of a run alike
  and no test on the repeats can see it, so across runs a difference is called
  only when its 95% interval lies wholly beyond ``--noise`` (default 30%).

A verdict is significant when p < 0.05 and the 95% interval (which always
contains the printed ratio, in the words' own terms) clears the noise band.

Metrics are named as in the tables: a metric (``throughput_per_s``) or a
histogram statistic (``publish_us.p99``). Cells are picked with selectors,
``scenario[key=value,...]``, matching every cell whose params include those.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from . import config, percentiles, results, stats
from .report import fmt

NOISE_ACROSS_RUNS = 0.30   # whole runs drift 1.3x (and more) between runs on a shared machine
NOISE_WITHIN_RUN = 0.05    # paired rounds: drift cancels; anything smaller is "practically equal"
CONFIDENCE = stats.CONFIDENCE
HIST_STATS = ("p50", "p90", "p99", "p999", "max", "count")
DEFAULT_HIST_STATS = ("p50", "p99")
# Costs per message named otherwise than *_per_msg: publish CPU per message in units of the
# calibration work done beside it (bench/scenarios/publish.py), lower is better
COSTS = ("cpu_vs_calibration",)


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
    return [v for v in (_repeat_value(rep, metric) for rep in cell.repeats) if v is not None]


def _repeat_value(rep: dict, metric: str):
    hist, _, stat = metric.rpartition(".")
    if metric in rep.get("metrics", {}):
        return _number(rep["metrics"][metric])
    if hist in rep.get("histograms", {}):
        return _number(rep["histograms"][hist].get(stat))
    return None


def paired_values(base: results.Cell, new: results.Cell, metric: str) -> tuple[list, list]:
    """``metric`` in the repeats of two cells of one run, paired by ``round`` (else by
    position): ``(base_values, new_values)``, entry i of both from the same round."""
    pairs = stats.pair_indices([r.get("round") for r in base.repeats],
                               [r.get("round") for r in new.repeats])
    out_b, out_n = [], []
    for i, j in pairs:
        b, n = _repeat_value(base.repeats[i], metric), _repeat_value(new.repeats[j], metric)
        if b is not None and n is not None:
            out_b.append(b)
            out_n.append(n)
    return out_b, out_n


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
    if metric.endswith("_per_msg") or metric in COSTS:   # a cost per message
        return False
    if metric in ("lost", "errors", "duplicates", "overflow") or \
            re.search(r"(_ns|_us|_ms|_s|_seconds|latency|lag)$", metric):
        return False
    return None


def default_metrics(cell: results.Cell) -> list[str]:
    """Throughputs, costs per message (``cpu_us_per_msg``, ``cpu_vs_calibration``: what
    preemption and a busy neighbour on a shared machine inflate least) and each histogram's
    p50 and p99 (waterfall stages only when named: ``--metric waterfall.broker.p99``)."""
    names = [m for m in cell.metrics if higher_is_better(m) is True or m.endswith("_per_msg")
             or m in COSTS]
    for hist in cell.histograms:
        if not hist.startswith("waterfall."):
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
    ratio: float | None = None        # new / base (paired: the median per-round ratio)
    significant: bool | None = None   # None: not judged (missing, zero, too few repeats)
    direction: str = ""               # "faster" | "slower" | "higher" | "lower" | ""
    words: str = ""                   # the verdict in plain words
    detail: str = ""                  # how it was judged
    verdict: stats.Verdict | None = None

    def line(self, width: int = 24) -> str:
        values = f"{fmt(self.base)}{self.unit} -> {fmt(self.new)}{self.unit}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.metric:<{width}} {values:<28} {self.words}{detail}"


def ratio_words(ratio: float, better_up: bool | None, digits: int = 2) -> tuple[str, str]:
    """(direction, words) for new/base = ``ratio``: "1.80x faster", "1.12x slower"."""
    if abs(ratio - 1) < 0.5 * 10 ** -digits:
        return "", f"{1:.{digits}f}x, unchanged"
    if better_up is None:
        return ("higher", f"{ratio:.{digits}f}x higher") if ratio >= 1 else \
            ("lower", f"{1 / ratio:.{digits}f}x lower")
    gain = ratio if better_up else 1 / ratio
    return ("faster", f"{gain:.{digits}f}x faster") if gain >= 1 else \
        ("slower", f"{1 / gain:.{digits}f}x slower")


def words_show_inverse(ratio: float, better_up: bool | None, digits: int = 2) -> bool:
    """Whether :func:`ratio_words` prints 1/ratio (e.g. "2.00x slower" for a rate ratio 0.5)."""
    if abs(ratio - 1) < 0.5 * 10 ** -digits:
        return False
    return ratio <= 1 if better_up is False else ratio < 1


def interval_words(interval: stats.Interval, better_up: bool | None, digits: int = 2) -> str:
    """"95% CI 1.62-1.98" in the terms the words use, so it contains the printed ratio."""
    inverse = words_show_inverse(interval.point, better_up, digits)
    shown = interval.inverted() if inverse else interval
    return f"{interval.confidence:.0%} CI {shown.lo:.{digits}f}-{shown.hi:.{digits}f}"


def p_words(p: float) -> str:
    return "p<0.0001" if p < 0.0001 else f"p={p:.2g}"


def judge(metric: str, base: float | None, new: float | None, base_reps: list[float],
          new_reps: list[float], noise: float | None = None, unit: str = "",
          paired: bool = False, confidence: float = CONFIDENCE) -> Comparison:
    """One metric of two cells, in plain words.

    ``paired``: ``base_reps[i]`` and ``new_reps[i]`` were measured in the same round of
    one run (:func:`paired_values`); otherwise they are two independent samples (two
    runs). ``noise`` (default 5% paired, 30% across runs) is the smallest difference
    called: the interval must clear ``1/(1+noise)``-``(1+noise)``.
    """
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
    if noise is None:
        noise = NOISE_WITHIN_RUN if paired else NOISE_ACROSS_RUNS
    better_up = higher_is_better(metric)
    how = f"{len(base_reps)} paired round{'s' if len(base_reps) != 1 else ''}" if paired \
        else f"{len(base_reps)} vs {len(new_reps)} repeats"
    try:
        v = stats.paired(base_reps, new_reps, confidence, noise) if paired else \
            stats.two_sample(base_reps, new_reps, confidence, noise, point=new / base)
    except ValueError:                  # a repeat at 0 (or below): no ratio to work with
        v = None
    if v is None or not v.enough:
        c.ratio = new / base
        c.direction, words = ratio_words(c.ratio, better_up)
        c.words = "cannot judge" if v is None else "not enough repeats to judge"
        why = "a repeat is 0: no ratio" if v is None else how.replace(" repeats", "")
        c.detail = f"{why}; ratio {c.ratio:.2f}x" + (f", {words} as measured"
                                                      if c.direction else "")
        return c
    c.verdict, c.ratio, c.significant = v, v.ratio, v.significant
    digits = 2       # a significant difference too small for 2 decimals gets more of them
    while v.significant and digits < 6 and not ratio_words(v.ratio, better_up, digits)[0]:
        digits += 1
    c.direction, words = ratio_words(v.ratio, better_up, digits)
    how = f"{interval_words(v.interval, better_up, digits)}, {how}, {p_words(v.p)}"
    if v.significant:
        c.words, c.detail = words, how
    else:
        band = f"; inside the ±{noise * 100:g}% noise band" if v.within_noise else ""
        c.words, c.detail = "no significant difference", f"{words}, {how}{band}"
    return c


def compare_cells(base: results.Cell, new: results.Cell, metrics=None,
                  noise: float | None = None, paired: bool = False) -> list[Comparison]:
    """Every metric (default: throughputs, p50, p99) of ``new`` against ``base``.

    ``paired``: the two cells are of one run; their repeats pair by round.
    """
    if metrics is None:
        metrics = [m for m in default_metrics(base) if m in default_metrics(new)]
    out = []
    for m in metrics:
        few = _too_few(base, m, "base") or _too_few(new, m, "new")
        if few:
            # the too-few side shows no number ("-"), the detail says why
            out.append(Comparison(m, None if _too_few(base, m, "base") else metric_value(base, m),
                                  None if _too_few(new, m, "new") else metric_value(new, m),
                                  unit_of(base, m) or unit_of(new, m), words="not compared",
                                  detail=few))
            continue
        reps = paired_values(base, new, m) if paired else \
            (repeat_values(base, m), repeat_values(new, m))
        c = judge(m, metric_value(base, m), metric_value(new, m), *reps, noise,
                  unit_of(base, m) or unit_of(new, m), paired)
        c.detail = "; ".join(filter(None, (c.detail, _percentile_words(base, new, m))))
        out.append(c)
    return out


def _percentile(cell: results.Cell, metric: str) -> percentiles.Percentile | None:
    stat = percentiles.stat_name(metric)
    hist = metric.rpartition(".")[0]
    if not stat or hist not in cell.histograms:
        return None
    return percentiles.of_summary(cell.histograms[hist], stat)


def _too_few(cell: results.Cell, metric: str, side: str) -> str:
    """"too few samples (n=30) in base" for a percentile its samples cannot support."""
    p = _percentile(cell, metric)
    if p is None or p.value is None or p.enough:
        return ""
    return f"{p.too_few} in {side}"


def _percentile_words(base: results.Cell, new: results.Cell, metric: str) -> str:
    """Each side's sample count and 95% order-statistic interval of a percentile."""
    b, n = _percentile(base, metric), _percentile(new, metric)
    if b is None or n is None or not (b.enough and n.enough):
        return ""
    return (f"95% intervals {fmt(b.lo)}-{fmt(b.hi)} (n={b.n:,}) -> "
            f"{fmt(n.lo)}-{fmt(n.hi)} (n={n.n:,})")


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


def compare_runs(base: results.Run, new: results.Run, metrics=None,
                 noise: float | None = None, selectors=()) -> list[Pair]:
    """Pair cells by :func:`results.cell_key` (BASE order, then cells only in NEW); each
    metric judged as two independent samples, beyond ``noise`` (default 30%)."""
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
                   metrics=None, noise: float | None = None, selectors=()) -> list[Group]:
    """Cells of one run grouped by every param but ``by``, as ratios of ``by=reference``.

    ``reference`` defaults to the first value of ``by`` in each group (e.g. ``held``).
    Repeats pair by round; ``noise`` defaults to 5%.
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
            group.rows.append((value, [] if note else
                               compare_cells(ref, c, metrics, noise, paired=True), note))
    return [g for g, _ in groups.values() if g.rows]


def compare_pair(base: results.Cell, new: results.Cell, metrics=None,
                 noise: float | None = None) -> Pair:
    """Two cells of ONE run (``--cell A --cell B``): paired by round, like ``--by``."""
    note = _not_ok(base, "BASE") or _not_ok(new, "NEW")
    return Pair(new.key, base, new,
                [] if note else compare_cells(base, new, metrics, noise, paired=True), note)


# --------------------------------------------------------------------------- printing
FAIL_ON = ("slower", "faster", "any")


def failing(comparisons, fail_on: str) -> list[Comparison]:
    """The comparisons ``--fail-on`` counts: significantly slower, faster, or either way
    (``any`` includes "higher"/"lower" of metrics with no better direction)."""
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on is one of {', '.join(FAIL_ON)}, not {fail_on!r}")
    return [c for c in comparisons
            if c.significant and (fail_on == "any" or c.direction == fail_on)]


def every_comparison(pairs_or_groups) -> list[Comparison]:
    """The comparisons of :func:`compare_runs` pairs or :func:`compare_within` groups."""
    out = []
    for item in pairs_or_groups:
        if isinstance(item, Group):
            out += [c for _, comparisons, _ in item.rows for c in comparisons or ()]
        else:
            out += item.comparisons
    return out


def summary_counts(comparisons) -> str:
    counts = {"faster": 0, "slower": 0, "same": 0, "few": 0}
    for c in comparisons:
        if c.significant and c.direction in ("faster", "slower"):
            counts[c.direction] += 1
        elif c.significant is False:
            counts["same"] += 1
        elif c.words == "not enough repeats to judge":
            counts["few"] += 1
    text = (f"{counts['faster']} faster, {counts['slower']} slower, "
            f"{counts['same']} no significant difference")
    return text + (f", {counts['few']} not enough repeats to judge" if counts["few"] else "")


def run_shift(comparisons) -> tuple[float, int] | None:
    """The median row's gain (>1: faster) over metrics that have a better direction, and
    how many rows: the shift of the run as a whole. None below 5 rows."""
    gains = sorted(c.ratio if higher_is_better(c.metric) else 1 / c.ratio
                   for c in comparisons
                   if c.ratio and higher_is_better(c.metric) is not None)
    if len(gains) < 5:
        return None
    mid = len(gains) // 2
    return (gains[mid] if len(gains) % 2 else (gains[mid - 1] * gains[mid]) ** 0.5), len(gains)


def _rule(noise: float, paired: bool) -> str:
    if paired:
        return (f"Repeats are paired by round and judged on the per-round ratios; a difference "
                f"is called when its {CONFIDENCE:.0%} interval lies beyond ±{noise * 100:g}% "
                f"(--noise) and p < {1 - CONFIDENCE:.2g}; 3 rounds at least.")
    return (f"Across runs a difference is called only when its {CONFIDENCE:.0%} interval lies "
            f"beyond ±{noise * 100:g}% (--noise) and p < {1 - CONFIDENCE:.2g}: a shared machine "
            f"drifts as a whole between runs (1.3-1.7x seen here), which no test on the "
            f"repeats can see; 3 repeats a side at least. Smaller effects: compare "
            f"configurations within one run (--by), or lower --noise on a quiet machine.")


def format_runs(pairs: list[Pair], base_name: str, new_name: str,
                noise: float | None = None, paired: bool = False) -> str:
    """Two runs (or, ``paired``, two cells of one run) line by line, with a summary."""
    if noise is None:
        noise = NOISE_WITHIN_RUN if paired else NOISE_ACROSS_RUNS
    lines = [f"NEW = {new_name}, BASE = {base_name}; each line reads BASE -> NEW.",
             _rule(noise, paired), ""]
    every = []
    for p in pairs:
        if p.note:
            lines.append(f"{p.key}: not compared, {p.note}")
            continue
        lines.append(p.key)
        for c in p.comparisons:
            lines.append("  " + c.line())
            every.append(c)
    lines.append("")
    shift = None if paired else run_shift(every)
    if shift:
        gain, rows = shift
        _, words = ratio_words(gain, True)
        lines.append(f"The run as a whole: the median row is {words} ({rows} rows); across "
                     f"runs a drift of the machine and a change that touches every cell "
                     f"look alike." + (f" It exceeds ±{noise * 100:g}%: read the verdicts as "
                                       f"possibly drift." if max(gain, 1 / gain) > 1 + noise
                                       else ""))
    lines.append(summary_counts(every) + f"; {sum(1 for p in pairs if p.note)} cells not compared")
    return "\n".join(lines)


def format_within(groups: list[Group], name: str, noise: float | None = None) -> str:
    if noise is None:
        noise = NOISE_WITHIN_RUN
    lines = [f"{name}: ratios of cells measured side by side in this run; "
             "each line reads reference -> other.", _rule(noise, True), ""]
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
                ratio = f"{c.ratio:.2f}x of {g.reference}; " if c.verdict else ""
                c = dataclasses.replace(c, detail=ratio + c.detail)
                lines.append("    " + c.line(22))
                every.append(c)
    lines += ["", summary_counts(every)]
    return "\n".join(lines)
