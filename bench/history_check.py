"""Change points in a metric's history, and the nightly check on the newest segment.

Detection is ``ruptures``' PELT with a least-squares cost on the log values (a step is a
ratio, whatever the metric's size), its penalty BIC-like from the series' own noise
(5 sigma^2 log n, sigma from the median absolute first difference, so a step does not
inflate it). MongoDB's ``signal-processing-algorithms`` (E-Divisive means) pins numpy<2
and gevent<25, and Apache Otava pins numpy 2.2 and scipy<1.17, both against this
project's pins (constraints.txt), so ruptures it is. Each candidate is then kept only if
Welch's t-test between its neighbouring segments says p < :data:`P_MAX`, as E-Divisive
keeps a change only past its permutation test: noise alone then finds none.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

MIN_SIZE = 3          # points a segment holds at least
P_MAX = 1e-4          # a change point's Welch p between its neighbouring segments
PENALTY = 5           # x sigma^2 log n: 3 (BIC) let ~3% of pure-noise series through
THRESHOLD = 0.10      # history check: the newest segment regresses by more than this


@dataclass
class ChangePoint:
    """A step at ``index``: points ``[.., index)`` before it, ``[index, ..)`` after."""
    index: int
    before: float            # median of the segment before
    after: float             # median of the segment after
    p: float

    @property
    def ratio(self) -> float:
        return self.after / self.before


def _sigma(x: np.ndarray) -> float:
    d = np.diff(x)
    mad = float(np.median(np.abs(d - np.median(d)))) * 1.4826 / math.sqrt(2)
    return mad or float(np.std(x)) or 1e-9


def _welch_p(a, b) -> float:
    from scipy import stats as st

    if len(a) < 2 or len(b) < 2:
        return 1.0
    p = st.ttest_ind(a, b, equal_var=False).pvalue
    return 1.0 if math.isnan(p) else float(p)


def change_points(values, min_size: int = MIN_SIZE, p_max: float = P_MAX) -> list[ChangePoint]:
    """The steps in ``values`` (positive numbers, oldest first)."""
    import ruptures as rpt

    x = np.log(np.asarray(values, dtype=float))
    n = len(x)
    if n < 2 * min_size:
        return []
    pen = PENALTY * _sigma(x) ** 2 * math.log(n)
    bkps = rpt.Pelt(model="l2", min_size=min_size, jump=1).fit(x.reshape(-1, 1)).predict(pen=pen)
    edges = [0] + [b for b in bkps if b < n] + [n]
    # drop the weakest candidate until every one left passes its test
    while len(edges) > 2:
        ps = [_welch_p(x[edges[i - 1]:edges[i]], x[edges[i]:edges[i + 1]])
              for i in range(1, len(edges) - 1)]
        worst = max(range(len(ps)), key=ps.__getitem__)
        if ps[worst] < p_max:
            break
        del edges[worst + 1]
    out = []
    for i in range(1, len(edges) - 1):
        a, b = values[edges[i - 1]:edges[i]], values[edges[i]:edges[i + 1]]
        out.append(ChangePoint(edges[i], statistics.median(a), statistics.median(b),
                               _welch_p(x[edges[i - 1]:edges[i]], x[edges[i]:edges[i + 1]])))
    return out


def newest_regression(values, higher_is_better: bool | None,
                      threshold: float = THRESHOLD) -> ChangePoint | None:
    """The last change point if the segment it opens (the newest) is worse than the one
    before by more than ``threshold``; None otherwise (or for a metric with no better
    direction)."""
    if higher_is_better is None:
        return None
    found = change_points(values)
    if not found:
        return None
    last = found[-1]
    worse = last.ratio < 1 / (1 + threshold) if higher_is_better else \
        last.ratio > 1 + threshold
    return last if worse else None
