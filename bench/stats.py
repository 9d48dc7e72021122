"""Is a difference real? Intervals and verdicts for ratios of repeated measurements.

Everything here works on ratios, in logs: the noise of a shared machine is
multiplicative (a busy neighbour slows every message by some factor), so the
log of a rate or a latency is modelled as normal, and a ratio's interval is a
t-interval on the mean log ratio, turned back into a ratio. Two questions:

* **Paired** (:func:`paired`, :func:`paired_ratio_interval`): two cells of ONE
  run, measured round by round (ABC ABC ABC). Each round gives one ratio
  ``num[i] / den[i]``; whatever slowed the machine during that round slowed both
  cells and cancels, and so does the drift of the whole run. Point: the median
  paired ratio. Interval: one-sample t-interval on the log ratios (n - 1 degrees
  of freedom). Assumes rounds are independent of each other.
* **Two samples** (:func:`two_sample`): the same cell in two runs, nothing to pair.
  Point: the ratio of medians. Interval and p: Welch's t on the logs of the
  repeats. Assumes the repeats of each side are independent. It cannot see a
  drift of the whole run (the machine was busier during one run): that moves
  every repeat of a side together. So across runs a difference is called only
  when its whole interval lies beyond a minimum effect, ``noise`` (e.g. 0.30:
  outside 1/1.3-1.3), the drift one must expect between runs here.

Both say "not enough" below ``MIN_N`` (3) values a side or paired rounds: with
one or two there is no spread worth the name, and the interval is unbounded
(``lo``/``hi`` None). Mann-Whitney U (what asv uses) is not the decision rule:
with 3 vs 3 its smallest two-sided p is 0.10 (it can never reach 0.05), with 5 vs 5
0.008 (never asv's 0.002), and it answers "different?" but not "by how much?", which
the noise band needs; asv itself falls back to confidence intervals when samples
are few. :func:`mann_whitney_p` is here for larger samples.

Every interval is widened, when needed, to include its point, so a printed
ratio always lies inside its printed interval (a t-interval is centred on the
geometric mean, the point is a median; widening only makes it more cautious).
A verdict is significant when the interval (a) excludes 1 at ``confidence``
and (b) lies wholly beyond ``1/(1+noise)``-``(1+noise)``.

What that buys, simulated with noise like this machine's (``python
tests/test_stats.py`` prints the table): two runs of one tree say "no significant
difference" on >= 97% of rows at 3 or 5 repeats, even with the whole run drifted
1.3x; within one run, 5 paired rounds call a 25% slowdown on 98% of rows when each
cell's own (unpaired) noise is 5%, 12 rounds when it is 10%. Across runs under a 1.3x
drift a 25% change is not called: it is inside the band, as it should be.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def _st():
    """scipy.stats, imported on first use: it takes seconds on a loaded host, and every
    ``celery-bench`` command imports this module before it can write its results file."""
    from scipy import stats

    return stats


MIN_N = 3
CONFIDENCE = 0.95


# --------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """A ratio ``point`` and its interval ``lo``-``hi`` (None: unbounded, not enough data).

    ``n`` is the number of paired rounds, or the smaller side's repeats;
    ``method`` says how it was made, in words.
    """
    point: float | None
    lo: float | None
    hi: float | None
    n: int
    method: str
    confidence: float = CONFIDENCE

    @property
    def bounded(self) -> bool:
        return self.lo is not None and self.hi is not None

    def above(self, x: float) -> bool:
        """The whole interval is above ``x`` (False when unbounded: we cannot say)."""
        return self.bounded and self.lo > x

    def below(self, x: float) -> bool:
        """The whole interval is below ``x`` (False when unbounded)."""
        return self.bounded and self.hi < x

    def contains(self, x: float) -> bool:
        """``x`` lies in the interval (an unbounded interval contains everything)."""
        return not self.bounded or self.lo <= x <= self.hi

    def outside(self, noise: float) -> bool:
        """The whole interval lies beyond the band ``1/(1+noise)``-``(1+noise)``."""
        return self.above(1 + noise) or self.below(1 / (1 + noise))

    def inverted(self) -> "Interval":
        """The same interval for the reciprocal ratio (den/num): 1/point, 1/hi-1/lo."""
        inv = (lambda x: None if x is None else (math.inf if x == 0 else 1 / x))
        return Interval(inv(self.point), inv(self.hi), inv(self.lo), self.n, self.method,
                        self.confidence)


def _positive(values) -> list[float]:
    out = [float(v) for v in values]
    if any(not (v > 0) or math.isinf(v) for v in out):
        raise ValueError("ratios need finite values above 0")
    return out


def _t_bounds(mean: float, se: float, df: float, confidence: float) -> tuple[float, float]:
    if se == 0:
        return mean, mean
    half = _st().t.ppf(0.5 + confidence / 2, df) * se
    return mean - half, mean + half


def _t_p(mean: float, se: float, df: float) -> float:
    """Two-sided p of ``mean`` against 0."""
    if se == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * _st().t.sf(abs(mean) / se, df))


def _hull(point: float, lo_log: float, hi_log: float) -> tuple[float, float]:
    return min(point, math.exp(lo_log)), max(point, math.exp(hi_log))


def paired_ratio_interval(num: list[float], den: list[float],
                          confidence: float = CONFIDENCE, min_n: int = MIN_N) -> Interval:
    """Interval of num/den from per-round paired ratios ``num[i] / den[i]``.

    Point: the median paired ratio. Interval: one-sample t-interval on the log
    ratios (mean +- t(n-1) * s / sqrt(n)), exponentiated and widened to include the
    point. With fewer than ``min_n`` rounds (1 or 2) the interval is unbounded
    (lo/hi None, method "not enough rounds"); with none, the point is None too.
    """
    return _paired(num, den, confidence, min_n)[0]


def _paired(num, den, confidence, min_n) -> tuple[Interval, float | None]:
    if len(num) != len(den):
        raise ValueError(f"paired values: {len(num)} numerators but {len(den)} denominators")
    ratios = [a / b for a, b in zip(_positive(num), _positive(den))]
    n = len(ratios)
    point = statistics.median(ratios) if ratios else None
    if n < max(min_n, 2):
        return Interval(point, None, None, n, f"not enough rounds ({n} < {max(min_n, 2)})",
                        confidence), None
    logs = [math.log(r) for r in ratios]
    mean, se = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(n)
    lo, hi = _hull(point, *_t_bounds(mean, se, n - 1, confidence))
    method = f"t-interval on {n} paired log ratios"
    return Interval(point, lo, hi, n, method, confidence), _t_p(mean, se, n - 1)


def ratio_interval(base: list[float], new: list[float], confidence: float = CONFIDENCE,
                   min_n: int = MIN_N, point: float | None = None) -> tuple[Interval, float | None]:
    """Interval of new/base from two independent samples, and Welch's two-sided p.

    Point: ``point`` if given (e.g. the ratio of the figures a table prints), else
    median(new) / median(base). Interval: Welch's t-interval on mean(log new) -
    mean(log base), exponentiated, widened to include the point. Fewer than
    ``min_n`` values a side: unbounded interval and p None.
    """
    base, new = _positive(base), _positive(new)
    if point is not None:
        point = _positive([point])[0]
    nb, nn = len(base), len(new)
    if point is None and base and new:
        point = statistics.median(new) / statistics.median(base)
    if min(nb, nn) < max(min_n, 2):
        return Interval(point, None, None, min(nb, nn),
                        f"not enough repeats ({nb} vs {nn}, need {max(min_n, 2)} a side)",
                        confidence), None
    lb, ln = [math.log(v) for v in base], [math.log(v) for v in new]
    d = statistics.fmean(ln) - statistics.fmean(lb)
    vb, vn = statistics.variance(lb) / nb, statistics.variance(ln) / nn
    se = math.sqrt(vb + vn)
    df = (vb + vn) ** 2 / (vb ** 2 / (nb - 1) + vn ** 2 / (nn - 1)) if se else nb + nn - 2
    lo, hi = _hull(point, *_t_bounds(d, se, df, confidence))
    method = f"Welch t-interval on log values, {nb} vs {nn}"
    return Interval(point, lo, hi, min(nb, nn), method, confidence), _t_p(d, se, df)


def mann_whitney_p(base: list[float], new: list[float]) -> float | None:
    """Two-sided Mann-Whitney U p (exact for small samples), None below 2 a side.

    Its smallest attainable p is 2 / C(nb + nn, nb): 0.10 for 3 vs 3, 0.029 for
    4 vs 4, 0.008 for 5 vs 5 (see :func:`min_mann_whitney_p`).
    """
    if min(len(base), len(new)) < 2:
        return None
    return float(_st().mannwhitneyu(new, base, alternative="two-sided").pvalue)


def min_mann_whitney_p(nb: int, nn: int) -> float:
    """The smallest two-sided p Mann-Whitney U can give for ``nb`` vs ``nn`` samples."""
    return min(1.0, 2 / math.comb(nb + nn, nb))


# --------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Verdict:
    """Is new different from base? ``ratio`` is new/base (a paired one: the median
    per-round ratio). ``significant`` is None when there is not ``enough`` data."""
    ratio: float | None
    interval: Interval
    p: float | None
    significant: bool | None
    enough: bool
    n_base: int
    n_new: int
    paired: bool
    noise: float

    @property
    def direction(self) -> int:
        """+1 when significantly above 1, -1 when below, 0 otherwise."""
        if not self.significant:
            return 0
        return 1 if self.ratio > 1 else -1

    @property
    def within_noise(self) -> bool:
        """p says different, but the interval does not clear the noise band."""
        return bool(self.enough and not self.significant and self.p is not None
                    and self.p < 1 - self.interval.confidence)


def _verdict(interval: Interval, p, n_base, n_new, paired, noise) -> Verdict:
    enough = interval.bounded
    significant = None
    if enough:
        alpha = 1 - interval.confidence
        significant = bool(p < alpha and interval.outside(noise))
    return Verdict(interval.point, interval, p, significant, enough, n_base, n_new, paired,
                   noise)


def paired(base: list[float], new: list[float], confidence: float = CONFIDENCE,
           noise: float = 0.0, min_n: int = MIN_N) -> Verdict:
    """Verdict on new/base from rounds paired in one run (``base[i]``, ``new[i]``: round i).

    Significant when the paired t-test on log ratios gives p < 1 - confidence and
    the :func:`paired_ratio_interval` lies wholly beyond the ``noise`` band.
    """
    interval, p = _paired(new, base, confidence, min_n)
    return _verdict(interval, p, len(base), len(new), True, noise)


def two_sample(base: list[float], new: list[float], confidence: float = CONFIDENCE,
               noise: float = 0.0, min_n: int = MIN_N, point: float | None = None) -> Verdict:
    """Verdict on new/base from two independent samples (two runs).

    Significant when Welch's t on the logs gives p < 1 - confidence and the
    :func:`ratio_interval` lies wholly beyond the ``noise`` band (pass the drift
    expected between runs, e.g. 0.30; within one run, prefer :func:`paired`).
    """
    interval, p = ratio_interval(base, new, confidence, min_n, point)
    return _verdict(interval, p, len(base), len(new), False, noise)


def pair_indices(a_rounds: list, b_rounds: list) -> list[tuple[int, int]]:
    """Index pairs (i, j) of two cells' repeats measured in the same round.

    ``a_rounds[i]`` is repeat i's ``round`` (an int) or None. When every repeat of
    both cells has one, repeats pair by equal round (rounds only one cell has are
    dropped); otherwise by position, up to the shorter list.
    """
    def known(rounds):
        return all(isinstance(r, int) and not isinstance(r, bool) for r in rounds)

    if a_rounds and b_rounds and known(a_rounds) and known(b_rounds):
        first_b = {}
        for j, r in enumerate(b_rounds):
            first_b.setdefault(r, j)
        seen = set()
        out = []
        for i, r in enumerate(a_rounds):
            if r in first_b and r not in seen:
                seen.add(r)
                out.append((i, first_b[r]))
        return out
    return [(i, i) for i in range(min(len(a_rounds), len(b_rounds)))]
