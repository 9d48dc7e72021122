"""The scenario contract, the registry, and what scenarios share.

A scenario is one class in its own module::

    @register
    class Publish(Scenario):
        name = "publish"
        description = "one line for `celery-bench list`"
        summary = [("throughput_per_s", "msg/s"), ("publish.p99", "p99 us")]  # table columns

        def cells(self) -> list[dict]: ...          # the params of every cell the options select
        def run_cell(self, params) -> Outcome: ...  # measure one cell once (one repeat)
        def requires(self, params) -> set[str]: ... # services (default: the transport's)
        def close(self) -> None: ...                # stop what it kept (workers, brokers)

The runner builds one instance per run from the options (``Scenario(opts)``: no I/O
there), runs its cells round by round (ABC ABC ABC), tells it each round
(:meth:`Scenario.begin_round`), and closes it with ``contextlib.closing`` when its
cells are done, on a failure and on Ctrl-C. Whatever a scenario keeps between cells
(a worker, ratios to an earlier cell of the round) lives on the instance.

Two ways to refuse: raise :class:`Skip` for "cannot run here" (the cell is skipped
with the reason), :class:`bench.config.UsageError` for a user's mistake (one line,
exit 2). Any other exception fails the cell and the run goes on.

A scenario outside this package joins with ``@register`` in a module that
``bench.plugins`` imports (``CELERY_BENCH_PLUGINS=mypkg.myscenario``).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

from .. import brokers, config

PAYLOAD_BYTES = 112       # the default message body's JSON length (the seeds' size)


class Skip(Exception):
    """This cell cannot run here (a transport that lacks something, a missing module)."""


@dataclass
class Outcome:
    """One repeat of one cell: figures, HdrHistograms, and notes for the reader.

    ``histograms``: name -> ``(HdrHistogram, overflow, unit)`` as built by
    :class:`bench.recorder.Recorder` (``Recorder.histograms``).
    """
    metrics: dict
    histograms: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


class Scenario:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    summary: ClassVar[list] = []          # [(metric or "hist.pXX", column header)]
    opt_in: ClassVar[bool] = False        # run only when named (or asked for by a flag)
    rated: ClassVar[bool] = False         # has open-loop rate cells (--rate-sweep, --max-rate)
    deterministic: ClassVar[bool] = False # its figures repeat exactly: one round is enough

    def __init__(self, opts):
        self.opts = opts
        self.round = 0

    def cells(self) -> list[dict]:
        raise NotImplementedError

    def requires(self, params: dict) -> set[str]:
        """Services the cell needs; an unreachable one skips it with the reason."""
        return brokers.services(params.get("transport"))

    def begin_round(self, index: int) -> None:
        """Round ``index`` (0-based) starts: every selected cell runs once in it."""
        self.round = index

    def run_cell(self, params: dict) -> Outcome:
        raise NotImplementedError

    def measured_loss(self, params: dict) -> str:
        """Why a loss in this cell is what the scenario measures, not a failure of the
        run ("" by default: every message must arrive). The faults scenario's cells lose
        tasks on purpose."""
        return ""

    def close(self) -> None:
        """Stop whatever the scenario kept across cells. Idempotent."""

    # -- a cell's rate: read here only
    def rate_cells(self, cell: dict) -> list[dict]:
        """``cell`` as the rate cells --max-rate and --rate-sweep ask for: one search
        (``rate=max`` with the run's ``slo``) and one held step per swept rate."""
        from .. import maxrate

        out = [{**cell, "rate": "max", "slo": self.opts.slo or maxrate.DEFAULT_SLO}] \
            if self.opts.max_rate else []
        return out + [{**cell, "rate": r} for r in self.opts.rate_sweep]

    def cell_slo(self, params: dict):
        """What a sustainable rate keeps in this cell: its own ``slo`` (a search cell),
        else the run's --slo, else :data:`bench.maxrate.DEFAULT_SLO`."""
        from .. import maxrate

        return maxrate.SLO.parse(params.get("slo") or self.opts.slo or maxrate.DEFAULT_SLO)

    def by_rate(self, params: dict, search, held, unrated) -> Outcome:
        """The one dispatch on a cell's ``rate`` param: ``"max"`` is ``search(params)``
        (the highest sustainable rate), a number ``held(rate)`` (one step of a sweep),
        ``"-"`` or none ``unrated()`` (the scenario's own cell)."""
        rate = params.get("rate", "-")
        if rate == "max":
            return search(params)
        if rate not in ("-", None):
            return held(float(rate))
        return unrated()

    def search_rate(self, params: dict, step, seconds: float, start: float,
                    histogram: str = "from_intended", unit: str = "msg/s") -> Outcome:
        """:meth:`max_rate` for a search cell: ``step(rate, hold, slo) -> Outcome``, held
        ``seconds`` a step, climbing from the run's --rate or ``start``."""
        slo = self.cell_slo(params)
        return self.max_rate(lambda rate, hold: step(rate, hold, slo), slo,
                             self.opts.rate or start, seconds, histogram, unit)

    # -- shared helpers
    def max_rate(self, once, slo, start: float, seconds: float, histogram: str,
                 unit: str = "msg/s") -> Outcome:
        """The highest rate ``once(rate, seconds) -> Outcome`` sustains within ``slo``
        (:func:`bench.maxrate.search`: the latency percentile read from ``histogram``, the
        rate achieved and backlog growth from the outcome's metrics), reported with the
        confirmation's figures and histograms and every step tried."""
        from .. import maxrate, percentiles, recorder

        last: dict = {}         # rate -> its last hold's outcome
        pooled: dict = {}       # rate -> every sample held at it so far, in every phase
        holds: dict = {}

        def measure(rate, hold, phase):
            outcome = once(rate, hold)
            last[rate] = outcome        # each rate's last hold: the answer's, after probes
            m = outcome.metrics
            # Every sample held at this rate (climb, retry, hold and confirm pooled: a stall
            # that fell into one hold is evidence about the rate, not about that hold): the
            # step is decided by the share beyond the SLO's limit, its interval widened when
            # the delays came in runs (the 1 s interval histograms disagree).
            rec = recorder.merge(pooled.setdefault(rate, {}),
                                 {histogram: outcome.histograms[histogram]})[histogram]
            holds[rate] = holds.get(rate, 0) + 1
            blocks = [iv.hist for iv in rec.intervals]
            p = percentiles.clustered(rec.hist, blocks, slo.percentile, "slo", at=slo.limit_us)
            share = percentiles.share_beyond(rec.hist, blocks, slo.limit_us)
            n_eff = share.n_eff if share and share.n_eff < share.n else p.n_eff
            return maxrate.Step(rate, m["rate_achieved_per_s"], p.value,
                                m.get("backlog_growth_per_s"), n=p.n, lo_us=p.lo, hi_us=p.hi,
                                n_eff=n_eff, holds=holds[rate],
                                beyond=share and share.value, beyond_lo=share and share.lo,
                                beyond_hi=share and share.hi,
                                stages_us=_stage_tails(outcome.histograms))

        result = maxrate.search(measure, slo, start=start, seconds=seconds)
        held = last.get(result.rate)
        metrics = dict(held.metrics) if held else {}
        metrics.update(result.metrics(slo))
        metrics["slo_histogram"] = histogram     # which histogram's percentile was judged
        held_for = f" (confirmed by holding it {result.confirm_s:.3g} s)" \
            if result.confirm_s else ""
        notes = [f"max sustainable {result.rate:,.0f} {unit} with {slo.text} of {histogram}: "
                 f"{result.bracket}{held_for}"]
        if result.why:
            notes.append(result.why)
        return Outcome(metrics, held.histograms if held else {}, notes)

    @contextmanager
    def cell_folder(self, tag: str | None = None) -> Iterator[Path]:
        """A private folder (0700) for one cell under the run's work folder, removed after."""
        folder = Path(self.opts.workdir or tempfile.gettempdir()) / \
            f"{self.name}-{tag or uuid.uuid4().hex[:12]}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _stage_tails(histograms: dict) -> dict | None:
    """Each waterfall stage's p50 and p99 (us) of a step, so a failed step says where its
    time went (None: the cell records no waterfall)."""
    from ..waterfall import PREFIX
    out = {name[len(PREFIX):]: [h.hist.get_value_at_percentile(50),
                                h.hist.get_value_at_percentile(99)]
           for name, h in histograms.items()
           if name.startswith(PREFIX) and h.hist.get_total_count()}
    return out or None


def unique_name(scenario: str) -> str:
    """A queue name no other cell or concurrent run uses."""
    return f"celery-bench-{scenario}-{uuid.uuid4().hex[:12]}"


def make_payload(nbytes: int):
    """A body whose JSON is ``nbytes`` long: ``{"data": "xxx..."}`` (a bare string when
    smaller than the braces)."""
    overhead = len(json.dumps({"data": ""}))
    if nbytes < overhead:
        return "x" * max(0, nbytes - 2)
    return {"data": "x" * (nbytes - overhead)}


def payload_bytes(opts) -> int:
    return PAYLOAD_BYTES if opts.payload_bytes is None else int(opts.payload_bytes)


class Registry:
    """Scenario name -> class, in the order `celery-bench run` runs them."""

    def __init__(self):
        self._classes: dict[str, type[Scenario]] = {}

    def register(self, cls: type[Scenario]) -> type[Scenario]:
        if not cls.name:
            raise ValueError(f"{cls.__name__}: a scenario needs a name")
        self._classes[cls.name] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)

    def get(self, name: str) -> type[Scenario]:
        try:
            return self._classes[name]
        except KeyError:
            raise config.UsageError(f"scenario {name!r} does not exist; choose from "
                                    f"{', '.join(self._classes)}") from None


REGISTRY = Registry()
register = REGISTRY.register
names = REGISTRY.names
get = REGISTRY.get


def summary(name: str) -> list:
    """The table columns of scenario ``name`` ([] for one this checkout does not know)."""
    try:
        return list(get(name).summary)
    except config.UsageError:
        return []


# The built-in scenarios register themselves; their order is the run's order.
from . import publish, consume, worker, join, prefetch, fanout, instructions  # noqa: E402,F401
from . import faults  # noqa: E402,F401  opt-in: `celery-bench run faults`
