"""``celery-bench gate --against REV``: head against base in one run, judged by ratios.

The spec (``results/baselines/gates-ab.toml``) is an ordinary gate spec (bench.gate's
rule syntax) whose rules are ratios of a cell's ``variant=head`` to its ``[variant=base]``:
the cells to measure are exactly those the rules' selectors name. They are measured as
variants ``base=git:REV`` and ``head=here`` (the working tree), rounds counterbalanced;
undecided rules are re-measured within ``--budget`` as the stored-baseline gate does, then
warn. No number from another run or machine decides anything.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .. import config, gate as gates, results, runner
from . import run as variant_run
from . import spec as variant_spec

AB_SPEC = Path(__file__).resolve().parents[2] / "results" / "baselines" / "gates-ab.toml"
ROUNDS = 5                 # paired rounds measured before judging (re-measures add more)
DURATION_S = 1.0           # seconds per timed cell-round (--quick sizes the rest)


def variants(rev: str) -> list:
    """base=git:REV, head=the working tree: prepared and checked (exit 2 on a bad REV)."""
    return variant_run.prepare_all([f"base=git:{rev}", "head=here"])


def selections(spec: gates.Spec) -> dict[str, dict[str, set]]:
    """Per scenario, the params its rules name (``variant`` aside): the --only filters."""
    out: dict[str, dict[str, set]] = {}
    for rule in spec.rules:
        scenario = None
        for operand in rule.operands:
            scenario = operand.selector.scenario or scenario
            if not scenario:
                continue
            wanted = out.setdefault(scenario, {})
            for key, value in operand.selector.params:
                if key != "variant":
                    wanted.setdefault(key, set()).add(str(value))
    return out


def _options(name: str, params: dict, rounds: int, timeout: float) -> runner.RunOptions:
    only = tuple((k, "|".join(sorted(v))) for k, v in sorted(params.items()))
    return runner.RunOptions(scenarios=(name,), quick=True, only=only, repeat=rounds,
                             duration=DURATION_S, timeout=timeout, quiet=True)


def measure(spec: gates.Spec, chosen: list, out: str, rounds: int = ROUNDS,
            timeout: float = 120.0, on_cell=None) -> results.Run:
    """Every cell the spec's rules name, once per variant per round, in one results file."""
    run_ = results.Run(results.environment(runner.services_environment()))
    run_.environment["variants"] = {v.name: v.environment() for v in chosen}
    run_.environment["gate_against"] = chosen[0].commit
    asked = {}
    for name, params in selections(spec).items():
        opts = _options(name, params, rounds, timeout)
        asked[name] = opts.to_dict()
        part = variant_run.run(opts, chosen, on_cell=on_cell)
        run_.cells.extend(part.cells)
        run_.environment["options"] = {"per_scenario": asked}
        results.dump(run_, out)
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
    for name, cells in wanted.items():
        opts = _options(name, {}, rounds, timeout)
        states = variant_run.measure(name, cells, chosen, range(first, first + rounds), opts,
                                     workdir, lambda key, state: None)
        for (i, vname), state in states.items():
            key = results.cell_key(name, {**cells[i], "variant": vname})
            old = keyed.get(key)
            if old is None:
                continue
            if state.status:
                new = results.Cell(old.scenario, old.params, state.status,
                                   f"when re-measured: {state.reason}", old.metrics,
                                   old.spread, old.repeats, old.histograms)
            else:
                new = results.extend(old, state.repeats)
                new.exempt = old.exempt
            run_.cells[run_.cells.index(old)] = new
            keyed[key] = new


def against(rev: str, out: str, spec_path: str | None, budget: float, missing: str | None,
            echo, rounds: int = ROUNDS, timeout: float = 120.0) -> list:
    """Measure, judge, re-measure within ``budget`` seconds; the verdicts."""
    spec = gates.load_spec(spec_path or AB_SPEC)
    if not selections(spec):
        raise config.UsageError(f"{spec.path}: no rule names a cell; gate --against measures "
                                f"the cells its rules name (e.g. publish[...,variant=head])")
    chosen = variants(rev)
    base = chosen[0]
    echo(f"gate --against {rev} ({base.commit[:12]}): head = the working tree; "
         f"{rounds} counterbalanced rounds of each cell {spec.path} names")
    started = time.monotonic()
    run_ = measure(spec, chosen, out, rounds, timeout,
                   on_cell=lambda c: None)
    echo(f"measured {len(run_.cells)} cells in {time.monotonic() - started:.0f} s; "
         f"results in {out}")
    verdicts = gates.run_gates(spec, run_, None, missing)
    deadline = time.monotonic() + budget
    while True:
        keys = gates.inconclusive_cells(verdicts)
        cost = gates.seconds_per_round(run_, keys) * gates.REMEASURE_ROUNDS
        if not keys or time.monotonic() + cost > deadline:
            break
        echo(f"re-measuring {len(keys)} cell(s) for {gates.REMEASURE_ROUNDS} more rounds "
             f"(~{cost:.0f} s): their rules' intervals could not decide yet")
        remeasure(run_, keys, gates.REMEASURE_ROUNDS, chosen, timeout)
        results.dump(run_, out)
        verdicts = gates.run_gates(spec, run_, None, missing)
    return verdicts

