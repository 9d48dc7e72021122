"""Runs scenario cells: scenario -> runner -> results file.

The runner owns what every scenario shares: the ``--only``/``--transport``
filters, probing services (an unreachable one skips its cells with the reason),
rounds, turning an exception into a failed cell, rewriting the results file
after every cell, and keeping what was measured when Ctrl-C arrives. It owns
each scenario's lifetime: one instance per run, closed (``contextlib.closing``)
when its cells are done, on a failure and on Ctrl-C.

Rounds: with ``--repeat N`` every selected cell of a scenario runs once per
round (ABC ABC ABC), so a noisy minute lands on both sides of a ratio, and the
scenario keeps its workers and brokers across rounds where the setup matches.
Each repeat records its round, start time, elapsed time, the load average and
the CPU time stolen by the hypervisor while it ran (``/proc/stat``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import brokers, config, results, scenarios
# RunOptions lives with the declarations of run's options; runner.RunOptions is its old name.
from .run_options import INSTRUCTIONS, QUICK_ROUNDS, RunOptions, parse_only  # noqa: F401


def matches(params: dict, opts: RunOptions) -> bool:
    """Does a cell with ``params`` pass the --only/--transport filters?

    ``--only KEY=A|B`` keeps either value. A cell over no transport (``transport=-``: the
    calibration loop) passes any --transport: it is the yardstick the others are read by.
    """
    for key, value in opts.only:
        if key in params and str(params[key]) not in value.split("|"):
            return False
    transport = params.get("transport")
    if opts.transports and transport not in (None, "-") and transport not in opts.transports:
        return False
    return True


@dataclass
class Planned:
    scenario: scenarios.Scenario
    cells: list                     # params of each selected cell


def plan(opts: RunOptions) -> list[Planned]:
    """Every scenario the options name (an instance each) and its selected cells."""
    out, known = [], set()
    for name in opts.names():
        scenario = scenarios.get(name)(opts)
        every = scenario.cells()
        known |= {k for p in every for k in p}
        out.append(Planned(scenario, [p for p in every if matches(p, opts)]))
    for key, _ in opts.only:
        if key not in known:
            raise config.UsageError(
                f"--only {key}=...: no cell has a param {key!r}; "
                f"params are {', '.join(sorted(known))}")
    return out


def check_named_transports(opts: RunOptions) -> None:
    """A transport the user named explicitly must be reachable: exit 2 otherwise."""
    for name in opts.transports:
        reach = brokers.reachability(name)
        if not reach.ok:
            raise config.UsageError(f"--transport {name}: {reach.reason}")


def _unreachable(scenario: scenarios.Scenario, params) -> str | None:
    try:
        needed = scenario.requires(params)
    except ImportError as exc:  # a transport module that does not load here
        return str(exc)
    for service in sorted(needed):
        reach = config.probe(service)
        if not reach.ok:
            return reach.reason
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    where = traceback.extract_tb(exc.__traceback__)
    loc = f" (at {Path(where[-1].filename).name}:{where[-1].lineno})" if where else ""
    return f"{type(exc).__name__}: {detail}{loc}"


def _cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs so far, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()[1:]
        values = [int(v) for v in fields]
        return (values[7] if len(values) > 7 else 0), sum(values[:8])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class CellRun:
    """One cell across rounds: its repeats so far, or why it stopped."""
    scenario: str
    params: dict
    repeats: list = field(default_factory=list)
    status: str = ""                # "" while it runs; "skipped" / "failed" once it stopped
    reason: str = ""
    measured_loss: str = ""         # the scenario's: why a loss here is what it measures

    def cell(self) -> results.Cell:
        cell = results.aggregate(self.scenario, self.params, self.repeats) if self.repeats \
            else results.Cell(self.scenario, dict(self.params))
        if self.status:
            cell.status = self.status
            cell.reason = "; ".join(filter(None, (self.reason, cell.reason)))
        if cell.status == "lost":
            cell.exempt = self.measured_loss
            info = brokers.declared(self.params.get("transport", ""))
            if not cell.exempt and info:
                cell.exempt = info.loss_exemption(self.params)
        return cell


def measure_once(scenario: scenarios.Scenario, state: CellRun, round_: int) -> None:
    """Run one repeat of a cell; record it, or why the cell stops."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu0 = _cpu_times()
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.monotonic()
    try:
        outcome = scenario.run_cell(dict(state.params))
    except (scenarios.Skip, brokers.TransportUnavailable) as exc:
        state.status, state.reason = "skipped", str(exc)
        return
    except (KeyboardInterrupt, config.UsageError):
        raise
    except Exception as exc:  # a failed cell must not stop the run
        state.status, state.reason = "failed", _one_line(exc)
        if os.environ.get("CELERY_BENCH_DEBUG"):
            traceback.print_exc()
        return
    cpu1 = _cpu_times()
    steal = None
    if cpu0 and cpu1 and cpu1[1] > cpu0[1]:
        steal = round((cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1]), 4)
    metrics = dict(outcome.metrics)
    metrics.setdefault("cell_wall_s", round(time.monotonic() - t0, 3))
    state.repeats.append({
        "metrics": metrics, "histograms": outcome.histograms, "notes": list(outcome.notes),
        "round": round_, "started_utc": started_utc,
        "elapsed_s": round(time.monotonic() - t0, 3),
        "loadavg_1m": round(load, 2) if load is not None else None, "cpu_steal": steal})


def _dump_interrupted(run_: results.Run, opts: RunOptions) -> None:
    """The results file of a run interrupted before its first cell: no cells, said so."""
    run_.environment["options"] = opts.to_dict()
    run_.environment["interrupted"] = True
    if opts.out:
        results.dump(run_, opts.out)


def run(opts: RunOptions, on_cell: Callable | None = None, on_start: Callable | None = None,
        on_cell_start: Callable | None = None, run_: results.Run | None = None) -> results.Run:
    """Run every selected cell, round by round; write ``opts.out`` after each. Returns the run.

    ``on_start(n)`` gets the number of cell runs ahead (cells x rounds);
    ``on_cell_start(scenario, params, round)`` and ``on_cell(cell)`` frame each one.
    On KeyboardInterrupt the results so far are written (``interrupted: true``) and the
    interrupt is re-raised (the caller exits 130); every scenario is closed on the way.
    """
    try:
        check_named_transports(opts)
        planned = plan(opts)   # may still refuse the options: no file for a usage error
    except KeyboardInterrupt:  # planning imports every scenario: seconds on a loaded host
        _dump_interrupted(run_ or results.Run(results.environment()), opts)
        raise
    early = run_ or results.Run(results.environment())
    early.environment["options"] = opts.to_dict()
    if opts.out:
        results.dump(early, opts.out)  # the file exists from the first moment, before the probes
    try:
        if run_ is None:
            run_ = results.Run(results.environment(services_environment()))
    except KeyboardInterrupt:   # interrupted while probing the services
        early.environment["interrupted"] = True
        if opts.out:
            results.dump(early, opts.out)
        raise
    run_.environment["options"] = opts.to_dict()
    if opts.out:
        results.dump(run_, opts.out)
    own_workdir = opts.workdir is None
    if own_workdir:
        opts.workdir = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    rounds = opts.rounds()
    if on_start:
        on_start(sum(len(p.cells) * (1 if p.scenario.deterministic else rounds)
                     for p in planned))
    try:
        for item in planned:
            with closing(item.scenario) as scenario:
                _run_rounds(scenario, item.cells, 1 if scenario.deterministic else rounds,
                            opts, run_, on_cell, on_cell_start)
    except KeyboardInterrupt:
        run_.environment["interrupted"] = True
        if opts.out:
            results.dump(run_, opts.out)
        raise
    finally:
        for item in planned:  # scenarios that never started hold nothing; close is idempotent
            item.scenario.close()
        if own_workdir:
            shutil.rmtree(opts.workdir, ignore_errors=True)
            opts.workdir = None
    return run_


def _run_rounds(scenario, cells, rounds, opts, run_, on_cell, on_cell_start) -> None:
    states = [CellRun(scenario.name, dict(p), measured_loss=scenario.measured_loss(p))
              for p in cells]
    slots = {}   # id(state) -> index of its cell in run_.cells (its first round's place)
    for round_ in range(rounds):
        scenario.begin_round(round_)
        for state in states:
            if state.status:
                continue  # skipped or failed in an earlier round
            if on_cell_start:
                on_cell_start(scenario.name, state.params, round_)
            if round_ == 0:
                reason = _unreachable(scenario, state.params)
                if reason:
                    state.status, state.reason = "skipped", reason
            if not state.status:
                measure_once(scenario, state, round_)
            cell = state.cell()
            if id(state) not in slots:
                slots[id(state)] = len(run_.cells)
                run_.cells.append(cell)
            run_.cells[slots[id(state)]] = cell
            if opts.out:
                results.dump(run_, opts.out)
            if on_cell:
                on_cell(cell)


def services_environment() -> dict:
    out = {}
    for name in config.DEFAULTS:
        reach = config.probe(name)
        out[name] = {"url": config.mask_url(config.service_url(name)), "reachable": reach.ok,
                     "version": reach.version, "reason": reach.reason or None}
    return out


def failures(run_: results.Run) -> list[results.Cell]:
    """Cells that make `celery-bench run` exit 1: failed, or lost messages without an
    exemption their transport declares."""
    return [c for c in run_.cells
            if c.status == "failed" or (c.status == "lost" and not c.exempt)]


def remeasured(cell: results.Cell, state: "CellRun") -> results.Cell:
    """``cell`` with the rounds ``state`` measured again folded in; if it failed this time,
    say so and keep what it had."""
    if state.status:
        return results.Cell(cell.scenario, cell.params, state.status,
                            f"when re-measured: {state.reason}", cell.metrics,
                            cell.spread, cell.repeats, cell.histograms)
    new = results.extend(cell, state.repeats)
    new.exempt = cell.exempt
    return new


def remeasure(run_: results.Run, keys, rounds: int, opts: RunOptions | None = None,
              on_cell: Callable | None = None) -> list[results.Cell]:
    """Run the cells of ``run_`` whose keys are in ``keys`` for ``rounds`` more rounds
    (numbered after the run's last), interleaved as a run does them, and fold the new
    repeats into those cells in place. For the gate, whose rules could not decide yet.
    Returns the updated cells."""
    opts = opts or RunOptions.from_dict(run_.environment.get("options", {}))
    chosen = [c for c in run_.cells if c.key in set(keys) and c.status in ("ok", "lost")]
    first = 1 + max((r.get("round", -1) for c in run_.cells for r in c.repeats), default=-1)
    by_scenario: dict[str, list] = {}
    for cell in chosen:
        by_scenario.setdefault(cell.scenario, []).append(cell)
    own_workdir = opts.workdir is None
    if own_workdir:
        opts.workdir = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    updated = []
    try:
        for name, cells in by_scenario.items():
            with closing(scenarios.get(name)(opts)) as scenario:
                states = [CellRun(name, dict(c.params),
                                  measured_loss=scenario.measured_loss(c.params))
                          for c in cells]
                for round_ in range(first, first + rounds):
                    scenario.begin_round(round_)
                    for state in states:
                        if not state.status:
                            measure_once(scenario, state, round_)
            for cell, state in zip(cells, states):
                new = remeasured(cell, state)
                run_.cells[run_.cells.index(cell)] = new
                updated.append(new)
                if on_cell:
                    on_cell(new)
    finally:
        if own_workdir:
            shutil.rmtree(opts.workdir, ignore_errors=True)
            opts.workdir = None
    return updated


def run_cell(scenario: scenarios.Scenario, params: dict, rounds: int = 1) -> results.Cell:
    """One cell of an open scenario, ``rounds`` times (for tests and the gate's re-measure):
    the runner's own skip, failure and status rules, no results file."""
    state = CellRun(scenario.name, dict(params),
                    measured_loss=scenario.measured_loss(params))
    reason = _unreachable(scenario, state.params)
    if reason:
        state.status, state.reason = "skipped", reason
    for round_ in range(rounds):
        if state.status:
            break
        scenario.begin_round(round_)
        measure_once(scenario, state, round_)
    return state.cell()
