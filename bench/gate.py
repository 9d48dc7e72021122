"""Performance gates for CI: the rules of a spec (:mod:`bench.gate_spec`) judged on
intervals so that a gate neither flaps (fails on noise) nor sleeps (passes a real
regression).

How a rule is judged: SIDE is measured once per round (a ratio: per round, the two
cells of that round, so whatever slowed the machine then cancels), and its 95%
interval (:func:`bench.stats.paired_ratio_interval`) is set against the bound (a rule
against a stored baseline: head/baseline over both runs' rounds, Welch's interval, since
the baseline is a sample too). PASS
when the whole interval is on the right side, FAIL only when it is wholly on the
wrong side, otherwise INCONCLUSIVE: the gate then re-measures just those cells with
more rounds (``--budget`` seconds), and a rule still inconclusive after that is a
warning saying so, not a failure. Fewer than 3 rounds make no interval. A rule on a
percentile alone (``SIDE OP NUMBER``, ``SIDE OP baseline``) is judged on the
percentile's own order-statistic interval over every sample of the cell
(:mod:`bench.percentiles`); a percentile with too few samples for that interval (in
the cell, or in any round of a ratio) is INCONCLUSIVE, so it never passes. A rule with
``exact = true`` (counts, instruction counts, properties of the code rather than
timings) is judged on its value.

Absolute figures are never compared with a baseline from another machine as times:
only through a same-run calibration cell (a ratio to ``publish[api=calibration]``) or
instruction counts. A baseline measured with another python, celery or kombu is
refused (one line naming what differs) unless ``--across-versions`` is given.

A rule whose cell is missing or skipped in the run is "not measured": a warning
by default, a failure with ``missing = "fail"``, silent with ``missing = "ignore"``
(in the spec, per rule, or ``--missing``). A cell that failed in the run fails its rules: a gate
must not pass because the benchmark crashed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import percentiles, results, stats
from .compare import Selector, _repeat_value, metric_value, unit_of
from .gate_spec import OPS, Rule, Spec
from .report import fmt

VERSION_KEYS = ("python", "celery", "kombu")
REMEASURE_ROUNDS = 3


# --------------------------------------------------------------------------- verdicts
class NotMeasured(Exception):
    pass


class NotComparable(NotMeasured):
    """The stored baseline was recorded where its figures do not carry over (another CPU
    model, or other python/celery/kombu): the rule warns and decides nothing."""


class Broken(Exception):
    """The rule cannot pass: its cell failed, or the selector is ambiguous."""


STATUSES = ("PASS", "FAIL", "INCONCLUSIVE", "WARN", "SKIP")


@dataclass
class Verdict:
    rule: Rule
    status: str           # PASS | FAIL | INCONCLUSIVE (re-measure) | WARN (not measured) | SKIP
    text: str
    values: list = field(default_factory=list)     # the measured values, one line each
    value: float | None = None
    cells: tuple = ()     # keys of the cells the verdict read (what a re-measure runs)

    def lines(self, details: bool = True) -> list[str]:
        out = [f"{self.shown:4s}  {self.rule.name}: {self.text}"]
        if self.values and details:
            out += ["      " + line for line in self.values]
        if self.status == "FAIL" and self.rule.why:
            out.append(f"      why this bound: {self.rule.why}")
        return out

    @property
    def shown(self) -> str:
        # Still undecided when the gate stops: a warning, never a failure.
        return "WARN" if self.status == "INCONCLUSIVE" else self.status


def _usable(cell: results.Cell, which: str) -> results.Cell:
    if cell.status == "failed":
        raise Broken(f"{cell.key} failed in the {which}: {cell.reason}")
    if cell.status != "ok":
        raise NotMeasured(f"{cell.key} was {cell.status} in the {which}"
                          + (f" ({cell.reason})" if cell.reason else ""))
    return cell


def _by_key(run: results.Run, key: str, which: str) -> results.Cell:
    for cell in run.cells:
        if cell.key == key:
            return _usable(cell, which)
    raise NotMeasured(f"no cell {key} in the {which}")


def _one(run: results.Run, sel: Selector, which: str) -> results.Cell:
    cells = sel.matches(run)
    if not cells:
        raise NotMeasured(f"no cell matches {sel} in the {which}")
    if len(cells) > 1:
        differ = sorted({k for c in cells for k in c.params
                         if len({str(x.params.get(k)) for x in cells}) > 1})
        raise Broken(f"{sel} matches {len(cells)} cells in the {which}; "
                     f"name {', '.join(differ) or 'more params'} too")
    return _usable(cells[0], which)


def _denominator(rule: Rule, num: results.Cell, run: results.Run, which: str) -> results.Cell:
    den = rule.denominator
    if den.relative:
        params = {**num.params, **dict(den.selector.params)}
        return _by_key(run, results.cell_key(num.scenario, params), which)
    return _one(run, den.selector, which)


@dataclass
class Side:
    """A rule's left side for one numerator cell: the value, its interval, and how."""
    value: float                        # the aggregated value (median, or median ratio)
    interval: stats.Interval | None     # per-round interval (None for exact rules)
    shown: str
    cells: tuple
    rounds: tuple = ()                  # the per-round values (or paired ratios) behind it


def _per_round(cell: results.Cell, metric: str) -> list[tuple]:
    return [(r.get("round"), _repeat_value(r, metric)) for r in cell.repeats]


def side(rule: Rule, num: results.Cell, run: results.Run, which: str = "run") -> Side:
    """The rule's left side for numerator cell ``num``."""
    metric = rule.numerator.metric
    value = metric_value(_usable(num, which), metric)
    if value is None:
        raise NotMeasured(f"{num.key} has no metric {metric!r} in the {which}")
    shown = f"{num.key} {metric} {fmt(value)}{unit_of(num, metric)}"
    pct = percentiles.stat_name(metric)
    if rule.denominator is None and pct:
        p = percentiles.of_summary(num.histograms.get(metric.rpartition(".")[0]), pct)
        if p is not None and (not rule.exact or not p.enough):
            if not p.enough:
                shown = f"{num.key} {metric} {p.too_few}"
            method = f"order statistics of {p.n:,} samples" if p.enough else p.too_few
            interval = stats.Interval(p.value, p.lo, p.hi, p.n, method)
            return Side(value, interval, shown, (num.key,))
    if rule.denominator is None:
        rounds = [v for _, v in _per_round(num, metric) if v is not None]
        interval = None if rule.exact else _interval(rounds, [1.0] * len(rounds))
        if interval is not None and interval.point is not None:
            value = interval.point
        return Side(value, interval, shown, (num.key,), tuple(rounds))
    den = _denominator(rule, num, run, which)
    den_metric = rule.denominator.metric
    den_value = metric_value(den, den_metric)
    if den_value is None:
        raise NotMeasured(f"{den.key} has no metric {den_metric!r} in the {which}")
    if den_value == 0:
        raise Broken(f"{den.key} {den_metric} is 0: no ratio")
    shown += f" / {den.key} {den_metric} {fmt(den_value)}{unit_of(den, den_metric)}"
    interval = None
    if not rule.exact:
        a, b = _per_round(num, metric), _per_round(den, den_metric)
        pairs = stats.pair_indices([r for r, _ in a], [r for r, _ in b])
        both = [(a[i][1], b[j][1]) for i, j in pairs if a[i][1] is not None and b[j][1]]
        interval = _interval([x for x, _ in both], [y for _, y in both])
        few = _too_few_round(num, metric) or _too_few_round(den, den_metric)
        if few:
            interval = stats.Interval(interval.point, None, None, interval.n, few)
    value = value / den_value
    if interval is not None and interval.point is not None:
        value = interval.point   # the median per-round ratio: inside its own interval
    ratios = () if rule.exact else tuple(x / y for x, y in both if x > 0)
    return Side(value, interval, shown, (num.key, den.key), ratios)


def _too_few_round(cell: results.Cell, metric: str) -> str:
    """"too few samples (n=30) in round 2" when a round's percentile cannot be bounded."""
    pct = percentiles.stat_name(metric)
    if not pct:
        return ""
    for i, rep in enumerate(cell.repeats):
        p = percentiles.of_summary(rep.get("histograms", {}).get(metric.rpartition(".")[0]),
                                   pct)
        if p is not None and p.value is not None and not p.enough:
            return f"{p.too_few} in {cell.key} round {rep.get('round', i)}"
    return ""


def _interval(num: list, den: list) -> stats.Interval:
    try:
        return stats.paired_ratio_interval(num, den)
    except ValueError:   # a zero or negative value: no ratio interval
        return stats.Interval(None, None, None, len(num), "values not all above 0")


def _decide(interval: stats.Interval | None, value: float, ok_above, ok_below) -> str:
    """PASS / FAIL / INCONCLUSIVE for a bound: ``ok_above(x)`` says x satisfies it."""
    if interval is None:
        return "PASS" if ok_above(value) and ok_below(value) else "FAIL"
    if not interval.bounded:
        return "INCONCLUSIVE"
    lo, hi = interval.lo, interval.hi
    if ok_above(lo) and ok_below(hi):
        return "PASS"
    # Wholly on the wrong side of one bound.
    if not ok_above(hi) or not ok_below(lo):
        return "FAIL"
    return "INCONCLUSIVE"


def _holds(value: float, op: str, limit: float) -> bool:
    return {">=": value >= limit, "<=": value <= limit, ">": value > limit,
            "<": value < limit, "==": value == limit, "!=": value != limit}[op]


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else fmt(x)


def _interval_text(interval: stats.Interval | None) -> str:
    if interval is None:
        return ""
    if interval.method.startswith("too few samples"):
        return f" ({interval.method}: undecided)"
    if not interval.bounded:
        return f" ({interval.n} round{'s' if interval.n != 1 else ''}: not enough for an interval)"
    if interval.method.startswith("order statistics"):
        return f" (95% interval {_num(interval.lo)}-{_num(interval.hi)}, {interval.method})"
    return f" (95% interval {_num(interval.lo)}-{_num(interval.hi)}, {interval.n} rounds)"


def _bound_check(op: str, limit: float):
    """(ok_above, ok_below) pair for ``SIDE op limit``: which values satisfy it."""
    if op in (">=", ">"):
        return (lambda x: _holds(x, op, limit)), (lambda x: True)
    if op in ("<=", "<"):
        return (lambda x: True), (lambda x: _holds(x, op, limit))
    return (lambda x: _holds(x, op, limit)), (lambda x: _holds(x, op, limit))


def _judge(rule: Rule, num: results.Cell, run: results.Run,
           baseline: results.Run | None) -> Verdict:
    s = side(rule, num, run)
    exact = s.interval is None or rule.op in ("==", "!=")
    interval = None if exact else s.interval
    if s.interval is not None and s.interval.method.startswith("too few samples"):
        interval = s.interval     # undecided, whatever the rule: it never passes
    if rule.kind == "between":
        status = _decide(interval, s.value, lambda x: x >= rule.low, lambda x: x <= rule.high)
        words = {"PASS": "is between", "FAIL": "is outside",
                 "INCONCLUSIVE": "may be outside"}[status]
        text = f"{_num(s.value)} {words} {_num(rule.low)} and {_num(rule.high)}"
        return Verdict(rule, status, text + _interval_text(interval), [s.shown], s.value,
                       s.cells)
    if rule.kind == "compare":
        limit, extra = rule.low, []
    else:
        if baseline is None:
            raise NotMeasured("no baseline run given")
        differs = not_comparable(run, baseline)
        if differs:
            raise NotComparable(differs)
        base = side(rule, _by_key(baseline, num.key, "baseline"), baseline, "baseline")
        limit = base.value * (1 + rule.percent / 100.0)
        extra = ["baseline: " + base.shown]
        if interval is not None and s.rounds and base.rounds:
            return _against_baseline_rounds(rule, s, base, limit, extra)
    status = _decide(interval, s.value, *_bound_check(rule.op, limit))
    words = {"PASS": "is", "FAIL": "is not", "INCONCLUSIVE": "may not be"}[status]
    text = f"{_num(s.value)} {words} {OPS[rule.op]} {_num(limit)}"
    if rule.kind == "baseline":
        text += f" (baseline {_num(base.value)} {rule.percent:+g}%)"
    return Verdict(rule, status, text + _interval_text(interval), [s.shown, *extra], s.value,
                   s.cells)


def _against_baseline_rounds(rule: Rule, s: Side, base: Side, limit: float,
                             extra: list) -> Verdict:
    """A ``baseline`` rule judged on both runs' rounds: the baseline is a sample too (its
    5 rounds' median moved 0.71-0.89 between clean runs of one tree on the AMD EPYC VM,
    2026-12-07), so head/baseline gets Welch's interval over the two runs' per-round
    values (unpaired: two runs) and that is set against 1 + percent. Re-measuring narrows
    the head's side only; a baseline of few rounds keeps the verdict undecided."""
    rel, _ = stats.ratio_interval(list(base.rounds), list(s.rounds))
    bound = 1 + rule.percent / 100.0
    status = _decide(rel, rel.point, *_bound_check(rule.op, bound))
    words = {"PASS": "is", "FAIL": "is not", "INCONCLUSIVE": "may not be"}[status]
    text = (f"{_num(s.value)} {words} {OPS[rule.op]} {_num(limit)} (baseline "
            f"{_num(base.value)} {rule.percent:+g}%) (head/baseline {_num(rel.point)}")
    if rel.bounded:
        text += (f", 95% interval {_num(rel.lo)}-{_num(rel.hi)}, {len(s.rounds)} vs "
                 f"{len(base.rounds)} rounds)")
    else:
        text += f": {rel.method})"
    return Verdict(rule, status, text, [s.shown, *extra], s.value, s.cells)


def _not_measured_status(missing: str) -> str:
    return {"fail": "FAIL", "warn": "WARN", "ignore": "SKIP"}[missing]


def _whole_run(rule: Rule, run: results.Run) -> list[Verdict]:
    """``no failed cells`` / ``no lost messages``: one verdict per offending cell, or one
    PASS. A loss the cell's transport declares (``exempt``) passes and says why."""
    if rule.kind == "failed":
        bad = [c for c in run.cells if c.status == "failed"]
        if not bad:
            return [Verdict(rule, "PASS", f"none of {len(run.cells)} cells failed")]
        return [Verdict(rule, "FAIL", f"{c.key} failed: {c.reason}", cells=(c.key,))
                for c in bad]
    lost = [c for c in run.cells if (c.metrics.get("lost") or 0) > 0 or c.status == "lost"]
    out = [Verdict(rule, "FAIL", f"{c.key} lost {c.metrics.get('lost')} of "
                                 f"{c.metrics.get('sent')}: {c.reason}", cells=(c.key,))
           for c in lost if not c.exempt]
    exempt = [c for c in lost if c.exempt]
    counted = sum(1 for c in run.cells if "lost" in c.metrics)
    if not out:
        text = f"{counted} cells accounted for every message"
        if exempt:
            text += (f"; {len(exempt)} lost what their transport declares: "
                     + "; ".join(f"{c.key}: {c.exempt}" for c in exempt))
        out.append(Verdict(rule, "PASS", text))
    return out


def evaluate(rule: Rule, run: results.Run, baseline: results.Run | None = None,
             missing: str | None = None) -> list[Verdict]:
    """One verdict per cell the rule's first selector matches (one rule can cover every
    transport of a full run), or one "not measured" verdict when it matches none."""
    if rule.numerator is None:
        return _whole_run(rule, run)
    missing = missing or rule.missing
    cells = rule.numerator.selector.matches(run)
    if not cells:
        return [Verdict(rule, _not_measured_status(missing),
                        f"not measured: no cell matches {rule.numerator.selector} in the run")]
    out = []
    for num in cells:
        try:
            out.append(_judge(rule, num, run, baseline))
        except NotComparable as exc:
            out.append(Verdict(rule, "WARN", f"not comparable: {exc}"))
        except NotMeasured as exc:
            out.append(Verdict(rule, _not_measured_status(missing), f"not measured: {exc}"))
        except Broken as exc:
            out.append(Verdict(rule, "FAIL", str(exc)))
    return out


def run_gates(spec: Spec, run: results.Run, baseline: results.Run | None = None,
              missing: str | None = None) -> list[Verdict]:
    return [v for rule in spec.rules for v in evaluate(rule, run, baseline, missing)]


def not_comparable(run: results.Run, baseline: results.Run) -> str | None:
    """Why a stored baseline's figures do not carry over to ``run``, or None.

    Measured (issue 15): the CPU-per-message ratio to the calibration loop moved 12.3 ->
    16.4 from an Intel Xeon to an AMD EPYC VM on an unchanged tree, so a stored-baseline rule
    decides only on the CPU model it was recorded on, and only with the same python, celery
    and kombu (``--across-versions`` drops the version half on purpose)."""
    mine, theirs = run.environment.get("cpu_model"), baseline.environment.get("cpu_model")
    if str(mine) != str(theirs):
        return f"baseline from {theirs or 'an unknown CPU'}, this is {mine or 'an unknown CPU'}"
    if baseline.environment.get("_across_versions"):
        return None
    differs = version_mismatch(run, baseline)
    return f"baseline measured with other versions ({differs})" if differs else None


def version_mismatch(run: results.Run, baseline: results.Run) -> str | None:
    """What differs between the versions a run and its baseline were measured with."""
    diffs = [f"{k} {baseline.environment.get(k)} (baseline) vs {run.environment.get(k)}"
             for k in VERSION_KEYS
             if str(baseline.environment.get(k)) != str(run.environment.get(k))]
    return ", ".join(diffs) or None


def inconclusive_cells(verdicts: list[Verdict]) -> list[str]:
    return list(dict.fromkeys(k for v in verdicts if v.status == "INCONCLUSIVE"
                              for k in v.cells))


def seconds_per_round(run: results.Run, keys) -> float:
    """What one more round of these cells takes, from what their rounds took."""
    total = 0.0
    for cell in run.cells:
        if cell.key in keys:
            took = [r.get("elapsed_s") or 0.0 for r in cell.repeats]
            total += max(took) if took else 1.0
    return total


def decide(judge, run_: results.Run, remeasure, budget: float, echo, out) -> list[Verdict]:
    """``judge()``'s verdicts, the cells of undecided rules re-measured
    (``remeasure(keys, rounds)``) while another round of them fits in ``budget`` seconds;
    ``run_`` is rewritten to ``out`` after each re-measure, Ctrl-C included."""
    verdicts = judge()
    deadline = time.monotonic() + budget
    while True:
        keys = inconclusive_cells(verdicts)
        cost = seconds_per_round(run_, keys) * REMEASURE_ROUNDS
        if not keys or time.monotonic() + cost > deadline:
            return verdicts
        echo(f"re-measuring {len(keys)} cell(s) for {REMEASURE_ROUNDS} more rounds "
             f"(~{cost:.0f} s): their rules' intervals could not decide yet")
        try:
            remeasure(keys, REMEASURE_ROUNDS)
        finally:
            results.dump(run_, out)
        verdicts = judge()


def report_lines(verdicts: list[Verdict], verbose: bool = False) -> list[str]:
    """Every verdict in plain words. Failures and warnings show each cell and its values;
    passes take one line per rule (``verbose``: every cell with its values, and the
    ignored not-measured cells)."""
    out = []
    by_rule: dict[int, list[Verdict]] = {}
    for v in verdicts:
        by_rule.setdefault(id(v.rule), []).append(v)
    for group in by_rule.values():
        if not verbose:
            passed = [v for v in group if v.status == "PASS"]
            if len(passed) > 1:
                values = [v.value for v in passed if v.value is not None]
                span = "" if not values else (
                    f" (values {_num(min(values))})" if min(values) == max(values) else
                    f" (values {_num(min(values))} to {_num(max(values))})")
                out.append(f"PASS  {group[0].rule.name}: {len(passed)} cells pass{span}")
            elif passed:
                out += passed[0].lines(details=False)
            group = [v for v in group if v.status in ("FAIL", "WARN", "INCONCLUSIVE")]
        for v in group:
            out += v.lines()
    return out


def summary(verdicts: list[Verdict]) -> str:
    n = {s: sum(1 for v in verdicts if v.status == s) for s in STATUSES}
    # Worded unlike a test runner's closing line: CI logs must not read gate checks as tests.
    text = f"gate checks: {n['PASS']} pass, {n['FAIL']} fail"
    if n["INCONCLUSIVE"]:
        text += f", {n['INCONCLUSIVE']} inconclusive (warned)"
    if n["WARN"]:
        text += f", {n['WARN']} not measured (warned)"
    if n["SKIP"]:
        text += f", {n['SKIP']} not measured (ignored)"
    return text


def baseline_cells(spec: Spec, run: results.Run) -> results.Run:
    """The part of ``run`` the baseline rules read: a compact baseline file."""
    keep: dict[str, results.Cell] = {}
    for rule in spec.rules:
        if rule.kind != "baseline":
            continue
        for num in rule.numerator.selector.matches(run):
            if num.status != "ok":
                continue
            keep.setdefault(num.key, num)
            if rule.denominator:
                try:
                    den = _denominator(rule, num, run, "run")
                except (NotMeasured, Broken):
                    continue
                keep.setdefault(den.key, den)
    return results.Run(run.environment, list(keep.values()))
