"""The spec of the performance gates: readable rules in a committed file, read and
checked here (a bad spec is one line, exit 2).

The spec (TOML, or JSON of the same shape) lists rules; each ``check`` is one
line in one of these forms::

    SIDE between LOW and HIGH
    SIDE OP NUMBER                       # OP is >=, <=, >, <, == or !=
    SIDE OP baseline [+N% | -N%]         # against the committed baseline run
    no failed cells
    no lost messages                     # but a loss the cell's transport declares

where SIDE is a cell's metric, ``publish[api=kombu,producer=held] throughput_per_s``,
or a ratio of two cells of the SAME run, ``A metric / B [metric]``. B may be
written ``[producer=held]``: A's cell with those params replaced, and its
metric defaults to A's. Metrics are named as in the tables (``throughput_per_s``,
``publish_us.p99``). A selector names the params that matter; the rule applies
to EVERY cell it matches (one verdict each), so ``publish[producer=per-call]``
covers each transport and serializer of a full run, each against its own held cell.
An explicit B (with its scenario) must match exactly one cell.

Example (results/baselines/gates.toml)::

    missing = "warn"
    baseline = "baseline.json"      # optional, relative to this file

    [[gate]]
    name = "a pool acquire per publish costs something, not everything"
    check = "publish[api=kombu,producer=per-call,transport=memory] throughput_per_s / [producer=held] between 0.4 and 0.9"

Judging the rules is :mod:`bench.gate`'s job; this module reads the spec.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import config
from .compare import Selector, parse_selector

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

MISSING_MODES = ("warn", "fail", "ignore")
OPS = {">=": "at least", "<=": "at most", ">": "more than", "<": "less than",
       "==": "exactly", "!=": "other than"}
SPEC_KEYS = {"missing", "baseline", "gate"}
RULE_KEYS = {"name", "check", "why", "missing", "exact"}
WHOLE_RUN = {"no failed cells": "failed", "no lost messages": "lost"}


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
    kind: str                       # "between" | "compare" | "baseline" | "failed" | "lost"
    op: str = ">="
    low: float | None = None
    high: float | None = None
    percent: float = 0.0            # baseline tolerance, signed
    missing: str = "warn"
    why: str = ""
    exact: bool = False             # judge the value, not an interval (counts, instructions)

    @property
    def operands(self) -> list[Operand]:
        if self.numerator is None:
            return []
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
    whole = WHOLE_RUN.get(" ".join(check.split()).lower())
    if whole:
        return {"numerator": None, "denominator": None, "kind": whole}
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
        if not isinstance(g.get("exact", False), bool):
            raise SpecError(f"{where}: exact must be true or false")
        rule_missing = g.get("missing", missing)
        if rule_missing not in MISSING_MODES:
            raise SpecError(f"{where}: missing = {rule_missing!r}; use \"warn\", \"fail\" "
                            f"or \"ignore\"")
        try:
            parts = parse_check(g["check"])
        except ValueError as exc:
            raise SpecError(f"{where} ({g['check']!r}): {exc}")
        rules.append(Rule(name=g.get("name") or g["check"], check=g["check"],
                          missing=rule_missing, why=g.get("why", ""),
                          exact=g.get("exact", False), **parts))
    base_path = (path.parent / baseline) if baseline else None
    return Spec(path, rules, missing, base_path)
