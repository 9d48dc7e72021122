"""Run scenarios across variants, interleaved and counterbalanced, in one results file.

Each (scenario, variant) gets one measuring process (:mod:`.serve`) in the variant's
interpreter and environment, kept for the scenario's rounds so its workers and brokers
are kept across rounds as a plain run keeps them (publish and join: a new one each
round, ``FRESH_EACH_ROUND``). Round r measures every cell once per
variant, in variant order on even rounds and reversed on odd ones (A B, B A, A B ...), so
a drift of the machine lands on both sides; cells carry ``variant`` as a param and their
repeats the round, so ``compare --by variant`` pairs them. Brokers and backends that are
services (Redis, RabbitMQ, PostgreSQL) are shared; the harness's own (unix, fifo) and the
Celery workers are each variant's, started from its interpreter.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from hdrh.histogram import HdrHistogram

from .. import compare, recorder, results, runner
from ..drivers.child import LineChild
from .spec import Variant

SERVE = Path(__file__).with_name("serve.py")
CELL_TIMEOUT_S = 3600.0   # one cell-round's bound; the cell's own waits are shorter
SLICES = {"publish": 5}   # slices per variant per round (:func:`slicing`); others: 1
MIN_SLICE_S = 0.15        # the shortest slice: its warm-up and set-up stay a fraction of it
# Scenarios whose measuring processes start afresh each round: a process's share of a busy
# machine stays with it for its life (an A/A gate on 2026-12-07 at load 5-6 had head's
# publish rate 0.61-0.86x base's in all 5 rounds at equal CPU per message; another, 1.40x),
# which pairing by round cannot cancel; a new pair of processes each round draws it anew,
# so it becomes round-to-round noise the interval counts (pyperf's worker processes, for
# the same reason). join too: its waiter and the Celery worker it keeps are that process's
# (the A/A runs are in docs/ab.md); a new worker a round costs a few seconds. Not (yet)
# worker, fanout, prefetch: they keep a Celery worker too, but no A/A run has shown them
# this offset (none was looked at).
FRESH_EACH_ROUND = frozenset({"publish", "join"})


class VariantProcess(LineChild):
    """The measuring process of one scenario for one variant."""
    ROLE = "variant"

    def __init__(self, variant: Variant, spec: dict, workdir: Path, timeout: float):
        super().__init__(spec, workdir, timeout)
        self.variant = variant
        self.ROLE = f"variant-{variant.name}"

    def argv(self) -> list[str]:
        return [self.variant.python, str(SERVE)]

    def cwd(self) -> str:
        return str(self.variant.root)

    def environment(self) -> dict:
        env = self.variant.child_env()
        if self.spec["options"].get("app"):
            # --app MODULE:APP lives where the user runs from (as `celery -A`): after the
            # variant's own paths, so it never shadows the variant's bench, celery or kombu
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.getcwd()])
        return env

    def measure(self, params: dict, round_: int, first: bool) -> dict:
        self.send_line("cell " + json.dumps({"params": params, "round": round_,
                                             "first": first}))
        return json.loads(self.wait_for("result ", CELL_TIMEOUT_S))


def order(variants: list, round_: int) -> list:
    """A B on even rounds, B A on odd: counterbalanced pairs."""
    return list(variants) if round_ % 2 == 0 else list(reversed(variants))


def run(opts: runner.RunOptions, variants: list[Variant], on_cell: Callable | None = None,
        on_start: Callable | None = None, on_cell_start: Callable | None = None) -> results.Run:
    """Like :func:`bench.runner.run`, each cell once per variant per round."""
    runner.check_named_transports(opts)
    planned = runner.plan(opts)
    for item in planned:
        item.scenario.close()   # this process only lists the cells; variants measure them
    run_ = results.Run(results.environment(runner.services_environment()))
    run_.environment["options"] = opts.to_dict()
    run_.environment["variants"] = {v.name: v.environment() for v in variants}
    if opts.out:
        results.dump(run_, opts.out)
    rounds = opts.rounds()
    if on_start:
        on_start(sum(len(p.cells) * len(variants) *
                     (1 if p.scenario.deterministic else rounds) for p in planned))
    workdir = Path(tempfile.mkdtemp(prefix="celery-bench-ab-"))
    try:
        for item in planned:
            if item.cells:
                _scenario(item, variants, 1 if item.scenario.deterministic else rounds,
                          opts, run_, workdir, on_cell, on_cell_start)
    except KeyboardInterrupt:
        run_.environment["interrupted"] = True
        if opts.out:
            results.dump(run_, opts.out)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return run_


class CellSlots:
    """Where each measured (cell, variant) sits in ``run_``: appended on its first round,
    replaced as more rounds come in, the results file rewritten each time."""

    def __init__(self, run_: results.Run, out: str | None, on_cell: Callable | None = None):
        self.run_, self.out, self.on_cell = run_, out, on_cell
        self.slots: dict = {}

    def record(self, key, state) -> None:
        cell = state.cell()
        if key not in self.slots:
            self.slots[key] = len(self.run_.cells)
            self.run_.cells.append(cell)
        self.run_.cells[self.slots[key]] = cell
        if self.out:
            results.dump(self.run_, self.out)
        if self.on_cell:
            self.on_cell(cell)


def _scenario(item, variants, rounds, opts, run_, workdir, on_cell, on_cell_start) -> None:
    measure(item.scenario.name, item.cells, variants, range(rounds), opts, workdir,
            CellSlots(run_, opts.out, on_cell).record, on_cell_start)


def child_options(opts: runner.RunOptions) -> dict:
    """The options a variant's process measures with: the results file's, with the secret
    ones (the broker commands --restart-cmd, --start-cmd) kept, since the process must run
    them. They reach it on its stdin only, never a file."""
    return opts.to_dict(secrets=True)


def slicing(name: str, opts) -> tuple[int, float | None]:
    """(slices per variant per round, each slice's --duration) for scenario ``name``.

    A closed-loop publish cell is CPU-bound and short: on a shared machine one 1 s round
    swings 10-30% with whatever else runs. So its round is ``SLICES`` short slices per
    variant, interleaved A B B A A B ... at that fine grain (a burst of load lands on both
    sides), each at least ``MIN_SLICE_S``, and the round's value of a rate or per-message
    cost is its best slice (:func:`merged`). Other scenarios (workers, joins, open loops,
    fixed message counts) keep one measurement per round.
    """
    wanted = SLICES.get(name, 1)
    if wanted == 1 or not opts.duration or opts.messages or opts.rate \
            or opts.rate_sweep or opts.max_rate:
        return 1, opts.duration
    k = max(1, min(wanted, int(opts.duration / MIN_SLICE_S)))
    return k, opts.duration / k


def measure(name: str, cells: list, variants: list, rounds: range, opts, workdir: Path,
            record: Callable, on_cell_start: Callable | None = None) -> dict:
    """Each of ``cells`` (params without ``variant``) once per variant per round of
    ``rounds``, counterbalanced (in :func:`slicing`'s slices where it applies);
    ``record((i, variant name), state)`` after each. Returns the states by that key (their
    repeats are the rounds measured here)."""
    options = child_options(opts)
    k, options["duration"] = slicing(name, opts)
    states = {(i, v.name): runner.CellRun(name, {**p, "variant": v.name})
              for i, p in enumerate(cells) for v in variants}
    started = set()
    with ExitStack() as stack:
        procs: dict = {}
        for n, round_ in enumerate(rounds):
            if all(state.status for state in states.values()):
                break   # every cell skipped or failed: nothing left to measure
            if n == 0 or name in FRESH_EACH_ROUND:
                _restart(procs, stack, variants, name, options, workdir, opts)
            for i, params in enumerate(cells):
                slices: dict = {v.name: [] for v in variants}
                for j in range(k):
                    for v in order(variants, round_ * k + j):
                        state = states[(i, v.name)]
                        if state.status:
                            continue
                        if on_cell_start and j == 0:
                            on_cell_start(name, state.params, round_)
                        got = _measure(procs[v.name], state, params, round_,
                                       first=(i, v.name) not in started)
                        started.add((i, v.name))
                        if got is not None:
                            slices[v.name].append(got)
                for v in variants:
                    state = states[(i, v.name)]
                    if slices[v.name] and not state.status:
                        state.repeats.append(merged(slices[v.name]))
                    if slices[v.name] or state.status:
                        record((i, v.name), state)
    return states


def _restart(procs: dict, stack: ExitStack, variants, name, options, workdir, opts) -> None:
    """(Re)start every variant's measuring process for scenario ``name`` into ``procs``."""
    for proc in procs.values():
        proc.stop()
    for v in variants:
        folder = workdir / name / v.name
        proc = VariantProcess(v, {"scenario": name, "options": options,
                                  "workdir": str(folder)}, folder, opts.timeout)
        stack.callback(proc.stop)
        proc.start()
        procs[v.name] = proc
    for proc in procs.values():
        proc.wait_for("ready", max(60.0, opts.timeout))


def _measure(proc: VariantProcess, state: runner.CellRun, params: dict, round_: int,
             first: bool) -> dict | None:
    """One slice of one cell in ``proc``: its repeat, or None (the state says why it stops)."""
    try:
        answer = proc.measure(params, round_, first=first)
    except (TimeoutError, RuntimeError) as exc:   # the variant's process died or hung
        state.status, state.reason = "failed", f"variant {proc.variant.name}: {exc}"
        return None
    state.measured_loss = answer.get("measured_loss") or state.measured_loss
    if answer.get("status"):
        state.status, state.reason = answer["status"], answer.get("reason", "")
    return _decoded(answer["repeat"]) if answer.get("repeat") else None


def best_of(metric: str) -> bool | None:
    """Whether a round's ``metric`` is its best slice: rates (``_per_s``, higher is
    better) and per-message costs (``_per_msg``, ``cpu_vs_calibration``: lower is better);
    None: folded as repeats are (median, counts summed)."""
    if metric.endswith("_per_msg") or metric in compare.COSTS:
        return False
    if metric.endswith("_per_s") and not metric.startswith("rate_"):
        return True
    return None


def merged(slices: list[dict]) -> dict:
    """One round's repeat from one variant's slices of it.

    Disturbance on a shared machine (preemption, a neighbour on the other hyperthread,
    cache pollution) only ever slows a slice, so the least disturbed slice is the nearest
    to the code's own speed: a rate is the round's highest slice, a per-message cost its
    lowest. Both variants are judged alike, so this sharpens the paired ratio without
    biasing it (A/A in docs/ab.md). Counts of messages add up, flags raised in any slice
    stay raised, other numbers are the median; histograms are merged (every sample).
    """
    if len(slices) == 1:
        return slices[0]
    metrics, _spread = results.fold_metrics([s.get("metrics", {}) for s in slices])
    for name in metrics:
        up = best_of(name)
        values = [s["metrics"].get(name) for s in slices]
        if up is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  for v in values):
            metrics[name] = max(values) if up else min(values)
    hists: dict = {}
    for s in slices:
        recorder.merge(hists, s.get("histograms") or {})
    out = dict(slices[0])
    out.update(metrics=metrics, histograms=hists, slices=len(slices),
               elapsed_s=round(sum(s.get("elapsed_s") or 0 for s in slices), 3),
               notes=list(dict.fromkeys(n for s in slices for n in s.get("notes") or ())))
    return out


def _decoded(repeat: dict) -> dict:
    """A repeat from a variant's process (:func:`.serve._portable`) with its histograms as
    bench.recorder.Recorded again, as results.aggregate takes them."""
    out = dict(repeat)
    out["histograms"] = {
        name: recorder.Recorded(
            HdrHistogram.decode(h["hdr"]), h.get("overflow", 0), h.get("unit", recorder.UNIT),
            h.get("invalid", 0),
            [recorder.Interval(a, b, HdrHistogram.decode(x)) for a, b, x in h.get("intervals", ())])
        for name, h in (repeat.get("histograms") or {}).items()}
    return out


def prepare_all(texts) -> list[Variant]:
    """``--variant`` values parsed, prepared and checked, in order (exit 2 on any)."""
    from ..config import UsageError
    from . import spec

    variants = [spec.parse(t) for t in texts]
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"--variant {dupes[0]}: named twice; give each variant its own name")
    if len(variants) < 2:
        raise UsageError("--variant: give at least two (e.g. --variant A=here "
                         "--variant B=conf:broker_pool_limit=1)")
    for v in variants:
        print(f"preparing variant {v.name} ({v.spec}) ...", file=sys.stderr, flush=True)
        spec.prepare(v)
    return variants
