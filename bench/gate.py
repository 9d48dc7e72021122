"""Performance gates for CI: readable rules in a committed spec file.

The spec (TOML, or JSON of the same shape) lists rules; each ``check`` is one
line in one of three forms::

    SIDE between LOW and HIGH
    SIDE OP NUMBER                       # OP is >=, <=, >, <, == or !=
    SIDE OP baseline [+N% | -N%]         # against the committed baseline run

where SIDE is a cell's metric, ``publish[api=kombu,producer=held] throughput_per_s``,
or a ratio of two cells of the SAME run, ``A metric / B [metric]``. B may be
written ``[producer=held]``: A's cell with those params replaced, and its
metric defaults to A's. Metrics are named as in the tables (``throughput_per_s``,
``publish_us.p99``). A selector names the params that matter; the rule applies
to EVERY cell it matches (one verdict each), so ``publish[producer=per-call]``
covers each transport and serializer of a full run, each against its own held cell.
An explicit B (with its scenario) must match exactly one cell.

The machine is shared and noisy, so prefer ratios of cells measured side by side
in one run; compare with the baseline only with generous tolerances.

A rule whose cell is missing or skipped in the run is "not measured": a warning
by default, a failure with ``missing = "fail"``, silent with ``missing = "ignore"``
(in the spec, per rule, or ``--missing``). A cell that failed in the run fails its rules: a gate
must not pass because the benchmark crashed.

Example (results/baselines/gates.toml)::

    missing = "warn"
    baseline = "baseline.json"      # optional, relative to this file

    [[gate]]
    name = "a pool acquire per publish costs something, not everything"
    check = "publish[api=kombu,producer=per-call,transport=memory] throughput_per_s / [producer=held] between 0.4 and 0.9"
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import config, results
from .compare import Selector, metric_value, parse_selector, unit_of
from .report import fmt

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

MISSING_MODES = ("warn", "fail", "ignore")
OPS = {">=": "at least", "<=": "at most", ">": "more than", "<": "less than",
       "==": "exactly", "!=": "other than"}
SPEC_KEYS = {"missing", "baseline", "gate"}
RULE_KEYS = {"name", "check", "why", "missing"}


class SpecError(config.UsageError):
    """A gate spec that cannot be read: one line, exit 2."""


# --------------------------------------------------------------------------- rules
@dataclass
class Operand:
    selector: Selector
    metric: str
    relative: bool = False          # "[producer=held]": the numerator's cell, these params replaced

    def __str__(self) -> str:
        return f"{self.selector} {self.metric}"


@dataclass
class Rule:
    name: str
    check: str
    numerator: Operand
    denominator: Operand | None
    kind: str                       # "between" | "compare" | "baseline"
    op: str = ">="
    low: float | None = None
    high: float | None = None
    percent: float = 0.0            # baseline tolerance, signed
    missing: str = "warn"
    why: str = ""

    @property
    def operands(self) -> list[Operand]:
        return [self.numerator] + ([self.denominator] if self.denominator else [])


TOKEN_RE = re.compile(r"""\s*(?:
    (?P<sel>(?:[A-Za-z_][\w-]*)?\[[^\[\]]*\])
  | (?P<op>>=|<=|==|!=|>|<)
  | (?P<pct>[+-]?\d+(?:\.\d+)?%)
  | (?P<num>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<slash>/)
  | (?P<word>[A-Za-z_][\w.-]*)
)""", re.VERBOSE)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read {text[pos:]!r}")
        out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def parse_check(check: str) -> dict:
    """The parts of one ``check`` line; ValueError says what is wrong."""
    toks = _tokens(check)
    i = 0

    def take(kind, what):
        nonlocal i
        if i >= len(toks) or toks[i][0] != kind:
            got = repr(toks[i][1]) if i < len(toks) else "the end"
            raise ValueError(f"expected {what}, found {got}")
        i += 1
        return toks[i - 1][1]

    def peek(kind, value=None):
        return i < len(toks) and toks[i][0] == kind and (value is None or toks[i][1] == value)

    sel = parse_selector(take("sel", "a cell selector like publish[api=kombu]"))
    if sel.scenario is None:
        raise ValueError("the first selector needs its scenario, e.g. publish[...]")
    num = Operand(sel, take("word", "a metric name after the selector"))
    den = None
    if peek("slash"):
        i += 1
        other = parse_selector(take("sel", "a cell selector after '/'"))
        metric = take("word", "") if peek("word") and toks[i][1] not in ("between",) else num.metric
        den = Operand(other, metric, relative=other.scenario is None)
    parts = {"numerator": num, "denominator": den}
    if peek("word", "between"):
        i += 1
        low = float(take("num", "a number after 'between'"))
        if not peek("word", "and"):
            raise ValueError("expected 'and' in 'between LOW and HIGH'")
        i += 1
        high = float(take("num", "a number after 'and'"))
        if low > high:
            raise ValueError(f"between {low:g} and {high:g}: LOW is above HIGH")
        parts.update(kind="between", low=low, high=high)
    else:
        op = take("op", "'between' or one of " + " ".join(OPS))
        if peek("word", "baseline"):
            i += 1
            pct = float(take("pct", "")[:-1]) if peek("pct") else 0.0
            parts.update(kind="baseline", op=op, percent=pct)
        else:
            parts.update(kind="compare", op=op, low=float(take("num", "a number or 'baseline'")))
    if i != len(toks):
        raise ValueError(f"unexpected {toks[i][1]!r} at the end")
    return parts


@dataclass
class Spec:
    path: Path
    rules: list[Rule]
    missing: str = "warn"
    baseline: Path | None = None


def default_spec_path() -> Path:
    """results/baselines/gates.toml here, else the one committed next to this package."""
    local = Path("results/baselines/gates.toml")
    if local.exists():
        return local
    return Path(__file__).resolve().parents[1] / "results" / "baselines" / "gates.toml"


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"gate spec {path}: {exc.strerror or exc}; pass --spec FILE")
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise SpecError(f"gate spec {path}: not valid {kind} ({exc})")
    if not isinstance(data, dict):
        raise SpecError(f"gate spec {path}: expected a table of settings and [[gate]] rules")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise SpecError(f"gate spec {path}: unknown key {sorted(unknown)[0]!r}; "
                        f"keys are {', '.join(sorted(SPEC_KEYS))}")
    missing = data.get("missing", "warn")
    if missing not in MISSING_MODES:
        raise SpecError(f"gate spec {path}: missing = {missing!r}; use "
                        f"\"warn\", \"fail\" or \"ignore\"")
    baseline = data.get("baseline")
    if baseline is not None and not isinstance(baseline, str):
        raise SpecError(f"gate spec {path}: baseline must be a file name")
    gates = data.get("gate", [])
    if not isinstance(gates, list) or not gates:
        raise SpecError(f"gate spec {path}: no rules; add [[gate]] tables with a check = \"...\"")
    rules = []
    for n, g in enumerate(gates, 1):
        where = f"gate spec {path}, rule {n}"
        if not isinstance(g, dict) or not isinstance(g.get("check"), str):
            raise SpecError(f"{where}: needs check = \"SIDE between LOW and HIGH\" (or OP ...)")
        bad = set(g) - RULE_KEYS
        if bad:
            raise SpecError(f"{where}: unknown key {sorted(bad)[0]!r}; "
                            f"keys are {', '.join(sorted(RULE_KEYS))}")
        rule_missing = g.get("missing", missing)
        if rule_missing not in MISSING_MODES:
            raise SpecError(f"{where}: missing = {rule_missing!r}; use \"warn\", \"fail\" "
                            f"or \"ignore\"")
        try:
            parts = parse_check(g["check"])
        except ValueError as exc:
            raise SpecError(f"{where} ({g['check']!r}): {exc}")
        rules.append(Rule(name=g.get("name") or g["check"], check=g["check"],
                          missing=rule_missing, why=g.get("why", ""), **parts))
    base_path = (path.parent / baseline) if baseline else None
    return Spec(path, rules, missing, base_path)


# --------------------------------------------------------------------------- verdicts
class NotMeasured(Exception):
    pass


class Broken(Exception):
    """The rule cannot pass: its cell failed, or the selector is ambiguous."""


@dataclass
class Verdict:
    rule: Rule
    status: str                    # "PASS" | "FAIL" | "WARN" | "SKIP" (not measured, ignored)
    text: str
    values: list = field(default_factory=list)     # the measured values, one line each
    value: float | None = None

    def lines(self, details: bool = True) -> list[str]:
        out = [f"{self.status:4s}  {self.rule.name}: {self.text}"]
        if self.values and details:
            out += ["      " + line for line in self.values]
        if self.status == "FAIL" and self.rule.why:
            out.append(f"      why this bound: {self.rule.why}")
        return out


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


def _value(cell: results.Cell, metric: str, which: str) -> tuple[float, str]:
    value = metric_value(cell, metric)
    if value is None:
        raise NotMeasured(f"{cell.key} has no metric {metric!r} in the {which}")
    return value, f"{cell.key} {metric} {fmt(value)}{unit_of(cell, metric)}"


def side_value(rule: Rule, num: results.Cell, run: results.Run,
               which: str = "run") -> tuple[float, str]:
    """The rule's left side for numerator cell ``num``, and how it was computed."""
    value, shown = _value(_usable(num, which), rule.numerator.metric, which)
    if rule.denominator is None:
        return value, shown
    den, shown_den = _value(_denominator(rule, num, run, which), rule.denominator.metric, which)
    if den == 0:
        raise Broken(f"{shown_den}: no ratio with a zero denominator")
    return value / den, f"{shown} / {shown_den}"


def _holds(value: float, op: str, limit: float) -> bool:
    return {">=": value >= limit, "<=": value <= limit, ">": value > limit,
            "<": value < limit, "==": value == limit, "!=": value != limit}[op]


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else fmt(x)


def _judge(rule: Rule, num: results.Cell, run: results.Run,
           baseline: results.Run | None) -> tuple[bool, str, list[str], float]:
    value, shown = side_value(rule, num, run)
    if rule.kind == "between":
        ok = rule.low <= value <= rule.high
        span = f"{_num(rule.low)} and {_num(rule.high)}"
        text = f"{_num(value)} is between {span}" if ok else \
            f"{_num(value)} is {'below' if value < rule.low else 'above'} the range {span}"
        return ok, text, [shown], value
    if rule.kind == "compare":
        ok = _holds(value, rule.op, rule.low)
        return ok, f"{_num(value)} is {'' if ok else 'not '}{OPS[rule.op]} {_num(rule.low)}", \
            [shown], value
    if baseline is None:
        raise NotMeasured("no baseline run given")
    base, base_shown = side_value(rule, _by_key(baseline, num.key, "baseline"), baseline,
                                  "baseline")
    limit = base * (1 + rule.percent / 100.0)
    ok = _holds(value, rule.op, limit)
    text = (f"{_num(value)} is {'' if ok else 'not '}{OPS[rule.op]} {_num(limit)} "
            f"(baseline {_num(base)} {rule.percent:+g}%)")
    return ok, text, [shown, "baseline: " + base_shown], value


def _not_measured_status(missing: str) -> str:
    return {"fail": "FAIL", "warn": "WARN", "ignore": "SKIP"}[missing]


def evaluate(rule: Rule, run: results.Run, baseline: results.Run | None = None,
             missing: str | None = None) -> list[Verdict]:
    """One verdict per cell the rule's first selector matches (one rule can cover every
    transport of a full run), or one "not measured" verdict when it matches none."""
    missing = missing or rule.missing
    cells = rule.numerator.selector.matches(run)
    if not cells:
        return [Verdict(rule, _not_measured_status(missing),
                        f"not measured: no cell matches {rule.numerator.selector} in the run")]
    out = []
    for num in cells:
        try:
            ok, text, shown, value = _judge(rule, num, run, baseline)
            out.append(Verdict(rule, "PASS" if ok else "FAIL", text, shown, value))
        except NotMeasured as exc:
            out.append(Verdict(rule, _not_measured_status(missing), f"not measured: {exc}"))
        except Broken as exc:
            out.append(Verdict(rule, "FAIL", str(exc)))
    return out


def run_gates(spec: Spec, run: results.Run, baseline: results.Run | None = None,
              missing: str | None = None) -> list[Verdict]:
    return [v for rule in spec.rules for v in evaluate(rule, run, baseline, missing)]


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
                values = [v.value for v in passed]
                span = _num(min(values)) if min(values) == max(values) else \
                    f"{_num(min(values))} to {_num(max(values))}"
                out.append(f"PASS  {group[0].rule.name}: {len(passed)} cells pass "
                           f"(values {span})")
            elif passed:
                out += passed[0].lines(details=False)
            group = [v for v in group if v.status in ("FAIL", "WARN")]
        for v in group:
            out += v.lines()
    return out


def summary(verdicts: list[Verdict]) -> str:
    n = {s: sum(1 for v in verdicts if v.status == s) for s in ("PASS", "FAIL", "WARN", "SKIP")}
    # Worded unlike a test runner's closing line: CI logs must not read gate checks as tests.
    text = f"gate checks: {n['PASS']} pass, {n['FAIL']} fail"
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
