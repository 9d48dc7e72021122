"""How sure is a percentile? Its sample count and a distribution-free 95% interval.

A percentile ``q_p`` of ``n`` independent samples lies between the order statistics
``X_(l)`` and ``X_(u)`` (1-based ranks) with probability ``P(l <= B < u)`` where
``B ~ Binomial(n, p)`` counts the samples below ``q_p``, whatever the distribution
(continuous). :func:`ranks` picks ``l = binom.ppf(a/2)`` and ``u = binom.ppf(1 - a/2) + 1``
(``a = 1 - confidence``), so each side misses with probability below ``a/2``: the
interval covers ``q_p`` in at least 95% of samples. The ranks are read from the
HdrHistogram itself: the lower bound is the lowest value of ``X_(l)``'s bucket, the upper
the highest value of ``X_(u)``'s, so HdrHistogram's 3-significant-figure buckets widen
the interval (by 0.1% at most) and never cost coverage.

**Too few samples.** When ``u`` would be beyond ``n`` (or ``l`` below 1), no order
statistic of the sample bounds the percentile at that confidence: the percentile is
"too few samples (n=30)", and is never shown as a number. For p99 that is below 368
samples (the maximum of n samples is above the true p99 with probability
``1 - 0.99**n``, at least 0.975 first at n = 368); for p50 below 6, p90 below 36, p99.9
below 3,688 (:func:`min_samples`).

What the interval does not know: the samples of a latency stream are not independent
(a stall delays every task behind it), so on a bursty system the interval is narrower
than the run-to-run spread; repeats (``--repeat``) are the check on that.
docs/latency.md says the same for readers of the tables. Where a verdict rests on one
stream (the max-rate search's steps), :func:`clustered` widens the interval by the
spread between the stream's 1 s interval histograms instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from hdrh.histogram import HdrHistogram

CONFIDENCE = 0.95
# The percentiles the results file records: name -> percent.
NAMES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


@lru_cache(maxsize=4096)
def ranks(n: int, pct: float, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """1-based ranks ``(l, u)`` of the order statistics bounding percentile ``pct`` of
    ``n`` samples at ``confidence``; None when ``n`` cannot support it."""
    if n <= 0:
        return None
    p, tail = pct / 100.0, (1.0 - confidence) / 2.0
    if p >= 1.0:
        return None                      # p100 (the maximum) has no upper bound from a sample
    from scipy.stats import binom   # on first use: seconds to import on a loaded host

    lo = int(binom.ppf(tail, n, p))
    hi = int(binom.ppf(1.0 - tail, n, p)) + 1
    if lo < 1 or hi > n:
        return None
    return lo, hi


@lru_cache(maxsize=256)
def min_samples(pct: float, confidence: float = CONFIDENCE) -> int:
    """The fewest samples for which :func:`ranks` gives an interval for ``pct``."""
    p, tail = pct / 100.0, (1.0 - confidence) / 2.0
    # Upper bound: the maximum covers q_p when 1 - p**n >= 1 - tail; lower: the minimum
    # when 1 - (1-p)**n >= 1 - tail. Start from those and step up to the first n that works.
    need = max(math.log(tail) / math.log(p), math.log(tail) / math.log(1 - p))
    n = max(1, math.floor(need))
    while ranks(n, pct, confidence) is None:
        n += 1
    return n


@dataclass(frozen=True)
class Percentile:
    """One percentile of one histogram: ``value`` as HdrHistogram reports it (None: no
    samples), ``n`` samples, interval ``lo``-``hi`` (None: too few samples). ``n_eff``:
    as many independent samples as the stream is worth (:func:`clustered`; None: ``n``)."""
    name: str
    pct: float
    n: int
    value: float | None
    lo: float | None = None
    hi: float | None = None
    confidence: float = CONFIDENCE
    n_eff: int | None = None

    @property
    def enough(self) -> bool:
        return self.lo is not None and self.hi is not None

    @property
    def too_few(self) -> str:
        """"too few samples (n=30)" when the percentile cannot be bounded, else ""."""
        return "" if self.enough else too_few_text(self.n)

    def below(self, limit: float) -> bool:
        """Shown within ``limit``: the whole interval is at or below it."""
        return self.enough and self.hi <= limit

    def above(self, limit: float) -> bool:
        """Shown beyond ``limit``: the whole interval is above it."""
        return self.enough and self.lo > limit


def too_few_text(n: int, more: str = "") -> str:
    """"too few samples (n=30)"; ``more`` goes inside the brackets, after the count."""
    return f"too few samples (n={n:,}{more})"


def _cumulative(hist: HdrHistogram) -> np.ndarray:
    counts = np.ctypeslib.as_array(hist.counts)[: hist.counts_len]
    return np.cumsum(counts, dtype=np.int64)


def _value_at_rank(hist: HdrHistogram, cumulative: np.ndarray, rank: int) -> tuple[int, int]:
    """(lowest, highest) value of the bucket holding the ``rank``-th smallest sample."""
    index = int(np.searchsorted(cumulative, rank, side="left"))
    value = hist.get_value_from_index(index)
    return hist.get_lowest_equivalent_value(value), hist.get_highest_equivalent_value(value)


def estimate(hist: HdrHistogram, names: dict | None = None,
             confidence: float = CONFIDENCE) -> dict[str, Percentile]:
    """Each of ``names`` (default :data:`NAMES`) of ``hist`` with its interval."""
    names = NAMES if names is None else names
    n = hist.get_total_count()
    cumulative = _cumulative(hist) if n else None
    out = {}
    for name, pct in names.items():
        value = hist.get_value_at_percentile(pct) if n else None
        r = ranks(n, pct, confidence)
        if r is None:
            out[name] = Percentile(name, pct, n, value, confidence=confidence)
            continue
        lo = _value_at_rank(hist, cumulative, r[0])[0]
        hi = _value_at_rank(hist, cumulative, r[1])[1]
        # HdrHistogram's own rank rounding may put the point a bucket outside: widen.
        out[name] = Percentile(name, pct, n, value, min(lo, value), max(hi, value), confidence)
    return out


MIN_BLOCKS = 3      # fewer interval histograms say nothing about the spread between them


def _design_effect(hist: HdrHistogram, blocks, index: int, n: int) -> tuple[float, float] | None:
    """(share of ``hist``'s samples above bucket ``index``, design effect), the design effect
    being 1.0 when the blocks disagree no more than independent samples would (chi-square at
    5%); None when nothing is known about clustering (fewer than :data:`MIN_BLOCKS` blocks,
    or none or all beyond)."""
    blocks = [b for b in blocks if b.get_total_count()]
    if len(blocks) < MIN_BLOCKS:
        return None
    sizes = np.array([b.get_total_count() for b in blocks], dtype=np.float64)
    beyond = np.array([b.get_total_count() - int(_cumulative(b)[min(index, b.counts_len - 1)])
                       for b in blocks], dtype=np.float64)
    q = float(beyond.sum() / sizes.sum())
    if not 0.0 < q < 1.0:
        return None
    k = len(blocks)
    var = k / (k - 1) * float(np.sum((beyond - q * sizes) ** 2)) / float(sizes.sum()) ** 2
    deff = var / (q * (1.0 - q) / n)
    # Blocks of independent samples disagree too (a design effect of 2 from 5 blocks is
    # common): widen only when they disagree more than that would, at 5% (chi-square).
    from scipy.stats import chi2

    return q, (deff if deff * (k - 1) > chi2.ppf(0.95, k - 1) else 1.0)


@dataclass(frozen=True)
class Share:
    """The share of a stream's samples beyond ``limit``, with its 95% interval, over ``n``
    samples worth ``n_eff`` independent ones (:func:`share_beyond`)."""
    limit: float
    n: int
    value: float
    lo: float
    hi: float
    n_eff: int


def share_beyond(hist: HdrHistogram, blocks, limit: float,
                 confidence: float = CONFIDENCE) -> Share | None:
    """What an SLO ``pNN <= limit`` turns on: the share of samples beyond ``limit`` (the SLO
    holds while it is at most 1 - NN/100), with an interval that knows the samples come in
    runs. Clopper-Pearson on the effective sample (Korn and Graubard's rule for survey
    proportions: ``n / design effect`` samples, the share of them beyond), the design effect
    from the 1 s ``blocks`` as in :func:`clustered`. Unlike a percentile's interval it needs
    no minimum sample: one stall among 30 s of quiet blocks gives an upper bound near 4.7
    times the share seen (a Poisson count of one), so a rate whose stalls cost it 0.1% of its
    samples passes a p99 SLO, and one whose stalls cost 0.9% stays undecided until more of
    them are seen. None: no samples."""
    n = hist.get_total_count()
    if not n:
        return None
    index = hist.get_counts_array_index(int(limit))
    x = float(n - int(_cumulative(hist)[min(index, hist.counts_len - 1)]))
    effect = _design_effect(hist, blocks, index, n)
    n_eff = n / effect[1] if effect else float(n)
    x_eff = x / n * n_eff
    from scipy.stats import beta

    tail = (1.0 - confidence) / 2.0
    lo = float(beta.ppf(tail, x_eff, n_eff - x_eff + 1)) if x_eff > 0 else 0.0
    hi = float(beta.ppf(1.0 - tail, x_eff + 1, n_eff - x_eff)) if x_eff < n_eff else 1.0
    return Share(limit, n, x / n, lo, hi, max(1, int(n_eff)))


def clustered(hist: HdrHistogram, blocks, pct: float, name: str = "p",
              confidence: float = CONFIDENCE, at: float | None = None) -> Percentile:
    """Percentile ``pct`` of ``hist`` with an interval that knows its samples come in runs.

    ``blocks`` are the same stream's interval histograms (1 s each, same layout as
    ``hist``). A stall delays every task behind it, so the samples beyond the percentile
    come clustered in some blocks: the binomial interval of :func:`estimate` is then far too
    narrow (a step with one 150 ms stall read "p99 148.7-151.3 ms" and the next step at the
    same rate 58 ms). The share of samples beyond the point estimate is a ratio over the
    blocks; its variance between blocks (the cluster-sample ratio estimator,
    ``k/(k-1) * sum((e_i - q n_i)^2) / n^2``) over the binomial ``q(1-q)/n`` is the design
    effect, and the interval is the binomial one for ``n / design effect`` samples, its
    ranks scaled back onto ``hist``, when the blocks disagree more than independent samples
    would (a chi-square test at 5%); otherwise it is the interval of :func:`estimate`.
    ``at`` (an SLO's limit): count the samples beyond it instead, so the clustering judged is
    the one the verdict turns on; none beyond it, the binomial interval stands. With fewer
    than :data:`MIN_BLOCKS` blocks nothing is known about clustering and the binomial
    interval stands too. Written here because the
    few lines of a ratio variance are less than a dependency on a survey-statistics
    package (statsmodels has no percentile interval for clustered streams either).
    """
    plain = estimate(hist, {name: pct}, confidence)[name]
    n = plain.n
    if plain.value is None or not plain.enough:
        return plain
    index = hist.get_counts_array_index(int(plain.value if at is None else at))
    effect = _design_effect(hist, blocks, index, n)
    if effect is None or effect[1] == 1.0:
        return plain
    n_eff = max(1, int(n / effect[1]))
    r = ranks(n_eff, pct, confidence)
    if r is None:
        return Percentile(name, pct, n, plain.value, confidence=confidence, n_eff=n_eff)
    cumulative = _cumulative(hist)
    lo_rank = max(1, math.floor(r[0] * n / n_eff))
    hi_rank = min(n, math.ceil(r[1] * n / n_eff))
    lo = _value_at_rank(hist, cumulative, lo_rank)[0]
    hi = _value_at_rank(hist, cumulative, hi_rank)[1]
    return Percentile(name, pct, n, plain.value, min(lo, plain.lo), max(hi, plain.hi),
                      confidence, n_eff)


def interval_of_values(values, pct: float, confidence: float = CONFIDENCE):
    """(lo, hi) of percentile ``pct`` from raw ``values`` (exact order statistics), or
    None when too few: the same rule without a histogram (the simulation test's check)."""
    v = np.asarray(values, dtype=np.float64)
    r = ranks(int(v.size), pct, confidence)
    if r is None:
        return None
    part = np.partition(v, (r[0] - 1, r[1] - 1))
    return float(part[r[0] - 1]), float(part[r[1] - 1])


# --------------------------------------------------------------------------- summaries
def to_json(estimates: dict[str, Percentile]) -> dict:
    """The ``ci`` entry of a histogram summary: ``{name: [lo, hi] | None}`` (None: too few)."""
    return {name: ([e.lo, e.hi] if e.enough else None) for name, e in estimates.items()}


def of_summary(summary: dict, name: str) -> Percentile | None:
    """Percentile ``name`` of a results-file histogram summary (None: not a recorded
    percentile). Summaries without ``ci`` (schema 1) get it from their ``hdr``; one with
    neither is treated as too few (nothing says how sure it is)."""
    if name not in NAMES or not isinstance(summary, dict):
        return None
    n = summary.get("count") or 0
    value = summary.get(name)
    ci = summary.get("ci")
    if ci is None and summary.get("hdr"):
        hist = HdrHistogram.decode(summary["hdr"].encode("ascii"))
        return estimate(hist, {name: NAMES[name]})[name]
    bounds = (ci or {}).get(name)
    if not bounds:
        return Percentile(name, NAMES[name], n, value)
    return Percentile(name, NAMES[name], n, value, bounds[0], bounds[1])


def stat_name(metric: str) -> str:
    """``publish.p99`` -> ``p99`` when it names a recorded percentile, else ""."""
    stat = metric.rpartition(".")[2]
    return stat if stat in NAMES and "." in metric else ""
