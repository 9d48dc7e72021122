"""Runs scenario cells: scenario -> runner -> results file.

The runner owns what every scenario shares: the ``--only``/``--transport``
filters, probing services (an unreachable one skips its cells with the reason),
repeats, turning an exception into a failed cell, rewriting the results file
after every cell, and keeping what was measured when Ctrl-C arrives.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import brokers, config, results

SCENARIOS = ("publish", "consume", "worker", "join", "prefetch", "fanout")
# The quick suite of `make bench`: every scenario, each its own quick slice.
DEFAULT_SCENARIOS = SCENARIOS


class Skip(Exception):
    """Raised by a scenario to skip a cell with a reason."""


@dataclass
class RunOptions:
    scenarios: tuple = DEFAULT_SCENARIOS
    quick: bool = False
    transports: tuple = ()          # --transport: keep cells with these transports
    only: tuple = ()                # --only KEY=VALUE pairs
    repeat: int = 1
    duration: float | None = None   # seconds of measurement per cell (scenario default if None)
    rate: float | None = None       # messages per second (open loop); None = closed loop
    messages: int | None = None     # messages per cell (overrides duration where it applies)
    warmup: float | None = None     # seconds of warm-up (scenario default if None)
    timeout: float = 120.0          # the longest any single wait may take
    pool: str | None = None         # worker pool; None = each scenario's default
    concurrency: int | None = None
    task_seconds: float | None = None
    app: str | None = None          # --app MODULE:APP for the celery publish cells
    task: str | None = None         # --task NAME
    payload_bytes: int | None = None
    serializers: tuple = ()
    out: str | None = None
    quiet: bool = False
    workdir: Path | None = None
    extra: dict = field(default_factory=dict)


def scenario_module(name: str):
    if name not in SCENARIOS:
        raise config.UsageError(
            f"scenario {name!r} does not exist; choose from {', '.join(SCENARIOS)}")
    return importlib.import_module(f"bench.scenarios.{name}")


def parse_only(items) -> tuple:
    pairs = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise config.UsageError(
                f"--only {item!r}: expected KEY=VALUE, e.g. --only api=kombu")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def matches(params: dict, opts: RunOptions) -> bool:
    """Does a cell with ``params`` pass the --only/--transport filters?"""
    for key, value in opts.only:
        if key in params and str(params[key]) != value:
            return False
    if opts.transports and "transport" in params and params["transport"] not in opts.transports:
        return False
    return True


def plan(opts: RunOptions) -> list[tuple]:
    """Every (scenario module, params) the options select, in order."""
    cells = []
    for name in opts.scenarios:
        mod = scenario_module(name)
        for params in mod.cells(opts):
            if matches(params, opts):
                cells.append((mod, params))
    if opts.only:
        known = {k for _, p in cells for k in p} | {k for name in opts.scenarios
                                                    for p in scenario_module(name).cells(opts)
                                                    for k in p}
        for key, _ in opts.only:
            if key not in known:
                raise config.UsageError(
                    f"--only {key}=...: no cell has a param {key!r}; "
                    f"params are {', '.join(sorted(known))}")
    return cells


def _finish(mod) -> None:
    """A scenario's cells are over (or the run stops): let it stop what it kept.

    Scenarios that keep a worker across cells of the same setup define ``finish()``.
    """
    finish = getattr(mod, "finish", None)
    if finish is not None:
        finish()


def check_named_transports(opts: RunOptions) -> None:
    """A transport the user named explicitly must be reachable: exit 2 otherwise."""
    for name in opts.transports:
        reach = brokers.reachability(name)
        if not reach.ok:
            raise config.UsageError(f"--transport {name}: {reach.reason}")


def _unreachable(mod, params) -> str | None:
    for service in sorted(mod.requires(params)):
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


def run_cell(mod, params: dict, opts: RunOptions) -> results.Cell:
    reason = _unreachable(mod, params)
    if reason:
        return results.Cell(mod.NAME, params, "skipped", reason)
    repeats = []
    try:
        for _ in range(max(1, opts.repeat)):
            repeats.append(mod.run_cell(dict(params), opts))
    except (Skip, brokers.TransportUnavailable) as exc:  # a transport that cannot load here
        return results.Cell(mod.NAME, params, "skipped", str(exc))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a failed cell must not stop the run
        cell = results.aggregate(mod.NAME, params, repeats) if repeats else \
            results.Cell(mod.NAME, params)
        cell.status, cell.reason = "failed", _one_line(exc)
        if os.environ.get("CELERY_BENCH_DEBUG"):
            traceback.print_exc()
        return cell
    cell = results.aggregate(mod.NAME, params, repeats)
    notes = [r.get("note") for r in repeats if r.get("note")]
    if notes:
        cell.reason = "; ".join(dict.fromkeys(notes))
    return cell


def services_environment() -> dict:
    out = {}
    for name in config.DEFAULTS:
        reach = config.probe(name)
        out[name] = {"url": config.mask_url(config.service_url(name)), "reachable": reach.ok,
                     "version": reach.version, "reason": reach.reason or None}
    return out


def run(opts: RunOptions, on_cell: Callable | None = None,
        on_start: Callable | None = None) -> results.Run:
    """Run every selected cell; write ``opts.out`` after each. Returns the run.

    On KeyboardInterrupt the results so far are written and the interrupt is
    re-raised (the caller exits 130); scenarios stop their own processes on the
    way out through their ``finally`` blocks.
    """
    check_named_transports(opts)
    cells = plan(opts)
    run_ = results.Run(results.environment(services_environment()))
    own_workdir = opts.workdir is None
    if own_workdir:
        opts.workdir = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    if on_start:
        on_start(cells)
    current = None  # the scenario whose cells are running: finish() it when they end
    try:
        for mod, params in cells:
            if mod is not current:
                _finish(current)
                current = mod
            started = time.monotonic()
            cell = run_cell(mod, params, opts)
            cell.metrics.setdefault("cell_wall_s", round(time.monotonic() - started, 3))
            run_.cells.append(cell)
            if opts.out:
                results.dump(run_, opts.out)
            if on_cell:
                on_cell(cell)
    except KeyboardInterrupt:
        run_.environment["interrupted"] = True
        if opts.out:
            results.dump(run_, opts.out)
        raise
    finally:
        _finish(current)
        if own_workdir:
            shutil.rmtree(opts.workdir, ignore_errors=True)
            opts.workdir = None
    return run_
