"""Rate ladders and the search for the maximum sustainable rate.

A rate is *sustainable* when a step held at it (open loop, latency from the intended
send time) achieved at least 98% of the rate asked, its backlog did not grow, and
the SLO percentile stayed within bound (``p99<=10ms`` by default).

The search learns from the OpenMessaging Benchmark rate controller's record: it got
stuck at 0 or 1 msg/s (#84, #163), oscillated between 2 and 50,000 msg/s, and settled
above what was achievable (#329, #336). So:

- it never adapts towards 0: it starts at a floor, doubles while steps pass, and if
  even the floor fails it halves a bounded number of times and then says so; it stops
  halving as soon as halving the rate did not lower the SLO percentile while every
  task was taken, judged on the two 95% intervals (:func:`latency_floor`: the latency is
  not the load's, and lower rates only cost ever longer steps);
- a failed step is measured once more before it counts (one noisy second must not
  end the climb), and bisection only narrows the bracket [good, bad], so the rate
  cannot swing back and forth;
- a rate is reported only after it was *held* again for longer (confirmation); if
  that fails the rate steps down by the resolution and is held again, so the figure
  is one the system sustained twice, never the last optimistic step;
- the answer is never above what was achieved: the reported rate is the asked rate of
  a step that achieved >= 98% of it.

The latency test is decided by the share of samples beyond the SLO's limit when the step
carries it (``beyond``, ``beyond_lo``, ``beyond_hi``: :func:`bench.percentiles.share_beyond`,
whose interval widens when the step's delays came in runs, as a stall's do; ``pNN <= L``
holds while at most 1 - NN/100 are beyond L), else by the SLO percentile's 95% interval
(``n``, ``lo_us``, ``hi_us``). The caller pools every sample held at the rate so far
(``holds``), so a stall that fell into one hold weighs as what it is, a share of the rate's
samples: a step passes when the upper
bound is within the SLO and fails when the lower bound is beyond it; otherwise (the interval
spans the SLO, or too few samples) it is *undecided* and held again, twice as long, until it
decides or its rate's hold budget (``HOLD_BUDGET`` step lengths) is spent; still undecided, it
counts as not shown sustained, and never as shown not sustained. A step's length follows the
rate (``step_seconds``): at least ``SAMPLES_FACTOR`` times the samples the percentile needs
(p99: 368), so a decided step has enough samples. The answer is a bracket: the highest rate
shown sustained (and confirmed by a hold ``CONFIRM_FACTOR`` times a step), and the lowest rate
shown not sustained above it.

Everything is driven through ``measure(rate, seconds, phase) -> Step`` so the search
is tested with a fake system (tests/test_maxrate.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import percentiles

ACHIEVED_MIN = 0.98         # of the rate asked
BACKLOG_GROWTH_MAX = 0.02   # tasks or messages per second, as a fraction of the rate asked
BACKLOG_GROWTH_FLOOR = 1.0  # per second: below this a slope is one message in flight
RESOLUTION = 1.1            # stop bisecting when bad/good is below this
CONFIRM_FACTOR = 2.0        # a confirmation holds the rate this many times a step's length
MAX_STEPS = 18
CONFIRMS = 6                # holds of a candidate rate at most, after the search
FLOOR_HALVINGS = 4          # how far below START the search looks before giving up
SAMPLES_FACTOR = 2.0        # a step holds this many times the samples its percentile needs
MAX_STEP_S = 60.0           # ... but no step is longer than this (at very low rates)
HOLD_BUDGET = 8.0           # an undecided rate is held up to this many step lengths in all
                            # (1 + 2 + 4: three holds; two left a 0.3% share undecided)
PROBES = 3                  # rates above an undecided end tried for the bracket's upper end


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class SLO:
    """``pNN <= VALUE UNIT``: the latency percentile a sustainable rate keeps within."""
    percentile: float
    limit_us: float
    text: str

    @classmethod
    def parse(cls, text: str) -> "SLO":
        m = re.fullmatch(r"\s*p(\d+(?:\.\d+)?)\s*<=?\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s)\s*",
                         text or "")
        if not m:
            raise SpecError(f"{text!r}: expected pNN<=VALUE with a unit us, ms or s, "
                            f"e.g. p99<=10ms")
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise SpecError(f"{text!r}: the percentile must be in (0, 100]")
        scale = {"us": 1.0, "µs": 1.0, "ms": 1e3, "s": 1e6}[m.group(3)]
        limit = float(m.group(2)) * scale
        if not limit > 0 or math.isinf(limit):
            raise SpecError(f"{text!r}: the bound must be a positive number")
        return cls(pct, limit, f"p{m.group(1)}<={m.group(2)}{m.group(3)}")


DEFAULT_SLO = "p99<=10ms"


def parse_sweep(text: str) -> tuple[float, ...]:
    """``START:STOP[:STEPS]`` -> the rates of the ladder, geometric (a rate ladder spans
    orders of magnitude; equal ratios give every decade the same number of steps)."""
    parts = (text or "").split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        start, stop = float(parts[0]), float(parts[1])
        steps = int(parts[2]) if len(parts) == 3 else 5
    except ValueError:
        raise SpecError(f"{text!r}: expected START:STOP[:STEPS], e.g. 100:5000:6") from None
    if not (math.isfinite(start) and math.isfinite(stop)) or start <= 0 or stop <= 0:
        raise SpecError(f"{text!r}: START and STOP must be positive rates per second")
    if stop < start:
        raise SpecError(f"{text!r}: STOP is below START")
    if not 1 <= steps <= 100:
        raise SpecError(f"{text!r}: STEPS must be 1 to 100")
    if steps == 1 or stop == start:
        return (start,)
    ratio = (stop / start) ** (1 / (steps - 1))
    return tuple(round(start * ratio ** i, 3) for i in range(steps))


@dataclass
class Step:
    """One held rate: what was asked and what happened."""
    rate: float                       # asked, per second
    achieved: float                   # per second
    latency_us: float | None          # the SLO percentile, from the intended send time
    backlog_growth: float | None      # per second over the step's second half (None: n/a)
    seconds: float = 0.0
    phase: str = ""                   # climb | retry | bisect | floor | confirm | hold | probe
    ok: bool = False
    why: str = ""
    n: int | None = None              # samples behind latency_us (None: no interval known)
    lo_us: float | None = None        # the SLO percentile's 95% interval (None: too few)
    hi_us: float | None = None
    decided: bool = True              # False: the interval spans the SLO, or too few samples
    n_eff: int | None = None          # independent samples n is worth (None: n; percentiles.clustered)
    holds: int = 1                    # holds of this rate whose samples n pools (this one last)
    beyond: float | None = None       # share of the samples beyond the SLO limit (decides)
    beyond_lo: float | None = None    # ... its 95% interval (percentiles.share_beyond)
    beyond_hi: float | None = None
    stages_us: dict | None = None     # where the time went: {stage: [p50, p99]} (waterfall)


def judge(step: Step, slo: SLO) -> Step:
    """Fill in ``ok`` and ``why``."""
    whys = []
    if step.achieved < ACHIEVED_MIN * step.rate:
        whys.append(f"achieved {step.achieved:,.0f}/s of {step.rate:,.0f}/s")
    if step.backlog_growth is not None and \
            step.backlog_growth > max(BACKLOG_GROWTH_MAX * step.rate, BACKLOG_GROWTH_FLOOR):
        whys.append(f"backlog grew {step.backlog_growth:,.0f}/s")
    undecided = ""
    name = f"p{slo.percentile:g}"
    runs = (f", worth {step.n_eff:,} independent: delays came in runs"
            if step.n_eff is not None and step.n is not None and step.n_eff < step.n else "")
    if step.holds > 1:
        runs = f", {step.holds} holds{runs}"
    allowed = 1.0 - slo.percentile / 100.0
    if step.latency_us is None:
        whys.append("no latency measured")
    elif step.beyond_hi is not None:
        share = (f"{name} {step.latency_us / 1000:,.2f} ms: {_pc(step.beyond)} "
                 f"({_pc(step.beyond_lo)}-{_pc(step.beyond_hi)}) of tasks over "
                 f"{slo.limit_us / 1000:,.1f} ms, {_pc(allowed)} allowed (n={step.n:,}{runs})")
        if step.beyond_lo > allowed:
            whys.append(share)
        elif step.beyond_hi > allowed:
            undecided = share
    elif step.n is not None and (step.lo_us is None or step.hi_us is None):
        undecided = f"{name} {percentiles.too_few_text(step.n, runs)}"
    elif step.n is not None:
        if step.lo_us > slo.limit_us:
            whys.append(f"{name} {step.lo_us / 1000:,.2f}-{step.hi_us / 1000:,.2f} ms "
                        f"over {slo.limit_us / 1000:,.1f} ms (n={step.n:,}{runs})")
        elif step.hi_us > slo.limit_us:
            undecided = (f"{name} {step.lo_us / 1000:,.2f}-{step.hi_us / 1000:,.2f} ms spans "
                         f"{slo.limit_us / 1000:,.1f} ms (n={step.n:,}{runs})")
    elif step.latency_us > slo.limit_us:
        whys.append(f"{name} {step.latency_us / 1000:,.1f} ms over "
                    f"{slo.limit_us / 1000:,.1f} ms")
    # Any other failure decides the step; only the latency can leave it undecided.
    step.decided = bool(whys) or not undecided
    step.ok = not whys and not undecided
    step.why = "; ".join(whys) if whys else (f"undecided: {undecided}" if undecided else "")
    return step


def _pc(share: float) -> str:
    return f"{share * 100:.2f}%"


def _rate_held(step: Step) -> bool:
    """The rate was achieved and the backlog did not grow: only the latency missed."""
    return step.achieved >= ACHIEVED_MIN * step.rate and (
        step.backlog_growth is None or
        step.backlog_growth <= max(BACKLOG_GROWTH_MAX * step.rate, BACKLOG_GROWTH_FLOOR))


def _ms(step: Step) -> str:
    """The SLO percentile of ``step`` as the floor's reason says it: its 95% interval
    and n when it has one, else the point estimate."""
    if step.lo_us is not None and step.hi_us is not None:
        return (f"{step.lo_us / 1000:,.2f}-{step.hi_us / 1000:,.2f} ms "
                f"(n={step.n:,})" if step.n is not None else
                f"{step.lo_us / 1000:,.2f}-{step.hi_us / 1000:,.2f} ms")
    return f"{step.latency_us / 1000:,.1f} ms"


def latency_floor(above: Step, below: Step, slo: SLO) -> str:
    """Why descending further is pointless, or "": both rates were taken in full and
    missed only the latency, and halving the rate did not lower the SLO percentile (a
    latency set by something other than the load asked, such as a busy machine's
    scheduling); lower rates would hold ever longer steps (up to ``MAX_STEP_S``) to
    learn nothing more.

    Decided on the 95% intervals, like the steps: the halved rate's percentile is *shown
    lower* only when its interval lies wholly below the other's (``below.hi < above.lo``),
    and then the descent goes on; overlapping intervals are no evidence that the load
    sets the latency, so they end it (a point estimate a little lower by sampling noise
    no longer buys a 60 s step). A step whose percentile has too few samples for an
    interval shows nothing either way: the descent goes on (boundedly, ``FLOOR_HALVINGS``).
    Steps that carry no interval at all (``n`` None) compare their point estimates."""
    if above.ok or below.ok or not (_rate_held(above) and _rate_held(below)):
        return ""
    if above.latency_us is None or below.latency_us is None:
        return ""
    if above.n is not None and below.n is not None:
        if None in (above.lo_us, above.hi_us, below.lo_us, below.hi_us):
            return ""                             # too few samples: nothing shown
        if below.hi_us < above.lo_us:
            return ""                             # shown lower: the rate sets it
    elif below.latency_us < above.latency_us:
        return ""
    name = f"p{slo.percentile:g}"
    return (f"{name} did not fall when the rate halved ({above.rate:,.3g}/s: "
            f"{_ms(above)}, {below.rate:,.3g}/s: {_ms(below)}): the latency is not set "
            f"by the rate, so no lower rate was tried; {slo.text} is below this machine's "
            f"latency now")


def step_seconds(rate: float, seconds: float, slo: SLO) -> float:
    """How long a step at ``rate`` is held: ``seconds`` at least, and long enough for
    ``SAMPLES_FACTOR`` times the samples the SLO percentile needs, up to ``MAX_STEP_S``."""
    need = SAMPLES_FACTOR * percentiles.min_samples(min(slo.percentile, 99.99)) / rate
    return max(seconds, min(need, MAX_STEP_S))


@dataclass
class Result:
    rate: float                       # the maximum sustainable rate (0: not even the floor)
    steps: list = field(default_factory=list)
    why: str = ""
    not_sustained: float | None = None   # the lowest rate above it shown not sustained
    confirm_s: float | None = None       # how long the answer was held to confirm it

    @property
    def bracket(self) -> str:
        """"sustained 400/s, not 566/s" (the answer lies between)."""
        high = f"not {self.not_sustained:,.0f}/s" if self.not_sustained is not None else \
            "no higher rate shown not sustained"
        return f"sustained {self.rate:,.0f}/s, {high}"

    def metrics(self, slo: SLO) -> dict:
        return {"max_sustainable_rate_per_s": self.rate,
                "not_sustained_per_s": self.not_sustained, "confirm_hold_s": self.confirm_s,
                "bracket": self.bracket, "slo": slo.text,
                "search_steps": len(self.steps), "search_why": self.why,
                "undecided_steps": sum(not s.decided for s in self.steps),
                "steps": [asdict(s) for s in self.steps]}


def _bracket(result: Result) -> Result:
    """Fill ``not_sustained``: the lowest rate above the answer a decided step failed at."""
    above = [s.rate for s in result.steps if s.decided and not s.ok and s.rate > result.rate]
    result.not_sustained = min(above) if above else None
    return result


def search(measure: Callable[[float, float, str], Step], slo: SLO, start: float,
           seconds: float, ceiling: float | None = None, max_steps: int = MAX_STEPS,
           resolution: float = RESOLUTION) -> Result:
    """The highest rate ``measure`` sustains, and every step it took to say so."""
    steps: list[Step] = []

    def held(rate: float, phase: str, factor: float = 1.0) -> bool:
        hold = step_seconds(rate, seconds, slo) * factor
        budget = hold * HOLD_BUDGET
        spent = 0.0
        while True:
            step = judge(measure(rate, hold, phase), slo)
            step.phase, step.seconds = phase, hold
            steps.append(step)
            spent += hold
            # undecided: hold it again, twice as long, while the rate's budget allows
            if step.decided or spent + 2 * hold > budget or len(steps) >= max_steps + CONFIRMS:
                return step.ok
            hold, phase = 2 * hold, "hold"

    def passes(rate: float, phase: str) -> bool:
        # A failure is measured once more before it counts: one noisy second must not
        # end the climb, and two passes are never required (that would favour noise up).
        # An undecided rate already spent its hold budget: no retry on top.
        return held(rate, phase) or (len(steps) < max_steps and steps[-1].decided
                                     and held(rate, "retry"))

    good, bad, rate = None, None, float(start)
    while len(steps) < max_steps:                     # climb: double while it passes
        at_ceiling = ceiling is not None and rate >= ceiling
        if at_ceiling:
            rate = float(ceiling)
        if passes(rate, "climb"):
            good, rate = rate, rate * 2
            if at_ceiling:
                break                                 # nothing higher may be asked
        else:
            bad = rate
            break
    floor = float(start)
    floored = ""
    for _ in range(FLOOR_HALVINGS):                   # even START failed: look lower, boundedly
        if good is not None or len(steps) >= max_steps:
            break
        above = steps[-1]
        floor /= 2
        if passes(floor, "floor"):
            good = floor
        else:
            bad = floor
            floored = latency_floor(above, steps[-1], slo)
            if floored:
                break
    if good is None:
        return _bracket(Result(0.0, steps, floored or f"not sustained even at {floor:,.3g}/s"))
    while bad is not None and bad / good > resolution and len(steps) < max_steps:
        mid = math.sqrt(good * bad)                   # bisect in log space: only narrows
        if passes(mid, "bisect"):
            good = mid
        else:
            bad = mid
    # Confirm: hold it again, longer. Failing that, a little lower (the resolution), then
    # each lower rate that passed before, highest first: the answer is a rate that passed
    # twice, never the last optimistic step, and a noisy knee does not end in 0.
    passed = sorted({s.rate for s in steps if s.ok and s.rate < good}, reverse=True)
    candidates = [good, good / resolution, good / resolution ** 2] + \
        [r for r in passed if r < good / resolution ** 2]
    for rate in candidates[:CONFIRMS]:
        if held(rate, "confirm", CONFIRM_FACTOR):
            why = "" if bad is not None else \
                f"the ladder stopped at {steps[-1].rate:,.0f}/s before finding a limit"
            result = Result(rate, steps, why, confirm_s=steps[-1].seconds)
            # The climb may have stopped at an undecided rate: the bracket's upper end must
            # be a rate shown not sustained, so probe above it (doubling, a few times).
            probe = bad
            for _ in range(PROBES):
                if probe is None or _bracket(result).not_sustained is not None:
                    break
                probe *= 2
                if ceiling is not None and probe > ceiling:
                    break
                held(probe, "probe")
            return _bracket(result)
    return _bracket(Result(0.0, steps, "no rate was sustained when held again"))
