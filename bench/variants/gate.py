"""``celery-bench gate --against REV``: head against base in one run, judged by ratios.

The spec (``results/baselines/gates-ab.toml``) is an ordinary gate spec (bench.gate's
rule syntax) whose rules are ratios of a cell's ``variant=head`` to its ``[variant=base]``:
the cells to measure are exactly those the rules' selectors name. They are measured as
variants ``base=git:REV`` and ``head=here`` (the working tree), rounds counterbalanced;
undecided rules are re-measured within ``--budget`` as the stored-baseline gate does, then
warn. No number from another run or machine decides anything.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .. import config, gate as gates, gate_spec, results, runner, scenarios
from . import run as variant_run

AB_SPEC = Path(__file__).resolve().parents[2] / "results" / "baselines" / "gates-ab.toml"
ROUNDS = 5                 # paired rounds measured before judging (re-measures add more)
DURATION_S = 1.0           # seconds per timed cell-round (--quick sizes the rest)


def variants(rev: str, head: str = "here") -> list:
    """base=git:REV, head=the working tree (or ``head``'s spec, e.g. env:...): prepared and
    checked (exit 2 on a bad REV)."""
    return variant_run.prepare_all([f"base=git:{rev}", f"head={head}"])


def selections(spec: gate_spec.Spec) -> dict[str, list[dict]]:
    """Per scenario, each rule's params (``variant`` aside): one --only filter per rule (a
    union of them all would cross one rule's values with another's)."""
    out: dict[str, list[dict]] = {}
    for rule in spec.rules:
        scenario, params = None, {}
        for operand in rule.operands:
            if operand.relative:
                continue   # [variant=base]: the numerator's cell, another variant
            scenario = operand.selector.scenario or scenario
            params.update((k, str(v)) for k, v in operand.selector.params if k != "variant")
        if scenario and params not in out.setdefault(scenario, []):
            out[scenario].append(params)
    return out


def _options(name: str, params: dict, rounds: int, timeout: float) -> runner.RunOptions:
    return runner.RunOptions(scenarios=(name,), quick=True, only=tuple(sorted(params.items())),
                             repeat=rounds, duration=DURATION_S, timeout=timeout, quiet=True)


def cells_to_measure(spec: gate_spec.Spec, rounds: int, timeout: float) -> dict[str, list]:
    """Per scenario, the quick cells some rule's selector keeps (each once)."""
    out: dict[str, list] = {}
    for name, filters in selections(spec).items():
        for params in filters:
            planned = runner.plan(_options(name, params, rounds, timeout))
            for item in planned:
                item.scenario.close()
                for cell in item.cells:
                    if cell not in out.setdefault(name, []):
                        out[name].append(cell)
    return out


def measure(spec: gate_spec.Spec, chosen: list, out: str, rounds: int = ROUNDS,
            timeout: float = 120.0) -> results.Run:
    """Every cell the spec's rules name, once per variant per round, in one results file."""
    run_ = results.Run(results.environment(runner.services_environment()))
    run_.environment["variants"] = {v.name: v.environment() for v in chosen}
    run_.environment["gate_against"] = chosen[0].commit
    run_.environment["options"] = {"repeat": rounds, "duration": DURATION_S, "quick": True}
    workdir = Path(tempfile.mkdtemp(prefix="celery-bench-ab-"))
    try:
        for name, cells in cells_to_measure(spec, rounds, timeout).items():
            deterministic = scenarios.get(name).deterministic
            variant_run.measure(name, cells, chosen, range(1 if deterministic else rounds),
                                _options(name, {}, rounds, timeout), workdir,
                                variant_run.CellSlots(run_, out).record)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return run_


def remeasure(run_: results.Run, keys, rounds: int, chosen: list, timeout: float) -> None:
    """``rounds`` more counterbalanced rounds of the cells behind ``keys`` (both variants of
    each), numbered after the run's last, folded into those cells."""
    keyed = {c.key: c for c in run_.cells}
    wanted: dict[str, list[dict]] = {}
    for key in keys:
        cell = keyed.get(key)
        if cell is None or cell.status not in ("ok", "lost"):
            continue
        params = {k: v for k, v in cell.params.items() if k != "variant"}
        if params not in wanted.setdefault(cell.scenario, []):
            wanted[cell.scenario].append(params)
    first = 1 + max((r.get("round", -1) for c in run_.cells for r in c.repeats), default=-1)
    workdir = Path(tempfile.mkdtemp(prefix="celery-bench-ab-"))
    try:
        _remeasure(run_, wanted, keyed, first, rounds, chosen, timeout, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _remeasure(run_, wanted, keyed, first, rounds, chosen, timeout, workdir) -> None:
    for name, cells in wanted.items():
        opts = _options(name, {}, rounds, timeout)
        states = variant_run.measure(name, cells, chosen, range(first, first + rounds), opts,
                                     workdir, lambda key, state: None)
        for (i, vname), state in states.items():
            key = results.cell_key(name, {**cells[i], "variant": vname})
            old = keyed.get(key)
            if old is None:
                continue
            new = runner.remeasured(old, state)
            run_.cells[run_.cells.index(old)] = new
            keyed[key] = new


def against(rev: str, out: str, spec_path: str | None, budget: float, missing: str | None,
            echo, rounds: int = ROUNDS, timeout: float = 120.0, head: str = "here") -> list:
    """Measure, judge, re-measure within ``budget`` seconds; the verdicts."""
    spec = gate_spec.load_spec(spec_path or AB_SPEC)
    if not selections(spec):
        raise config.UsageError(f"{spec.path}: no rule names a cell; gate --against measures "
                                f"the cells its rules name (e.g. publish[...,variant=head])")
    chosen = variants(rev, head)
    base = chosen[0]
    echo(f"gate --against {rev} ({base.commit[:12]}): head = {chosen[1].spec}; "
         f"{rounds} counterbalanced rounds of each cell {spec.path} names")
    started = time.monotonic()
    run_ = measure(spec, chosen, out, rounds, timeout)
    echo(f"measured {len(run_.cells)} cells in {time.monotonic() - started:.0f} s; "
         f"results in {out}")
    verdicts = gates.decide(lambda: gates.run_gates(spec, run_, None, missing), run_,
                            lambda keys, n: remeasure(run_, keys, n, chosen, timeout),
                            budget, echo, out)
    return verdicts

