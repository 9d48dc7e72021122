"""The maximum-sustainable-rate search against fake systems (no clock, no broker):
it finds the knee, never reports more than was sustained, and cannot get stuck."""
import math
import random

import pytest

from bench import maxrate


def fake(capacity: float, base_us: float = 1000.0, noise: float = 0.0, seed: int = 0,
         calls: list | None = None):
    """A queue with service rate ``capacity``: latency grows as 1/(1-load), beyond
    capacity it cannot keep up (achieved capped, backlog growing)."""
    rng = random.Random(seed)

    def measure(rate, seconds, phase):
        if calls is not None:
            calls.append((rate, phase))
        jitter = math.exp(rng.gauss(0, noise)) if noise else 1.0
        cap = capacity * jitter
        load = rate / cap
        if load < 1:
            return maxrate.Step(rate, rate, base_us / (1 - load), 0.0)
        return maxrate.Step(rate, cap, 1e7, rate - cap)
    return measure


SLO = maxrate.SLO.parse("p99<=10ms")    # base 1 ms: within SLO up to 90% of capacity


def test_slo_and_sweep_parsing():
    assert SLO.percentile == 99 and SLO.limit_us == 10_000
    assert maxrate.SLO.parse("p99.9 <= 500us").limit_us == 500
    assert maxrate.SLO.parse("p50<=2s").limit_us == 2e6
    for bad in ("p99", "99<=10ms", "p99<=10", "p0<=1ms", "p101<=1ms", "p99<=0ms"):
        with pytest.raises(maxrate.SpecError):
            maxrate.SLO.parse(bad)
    assert maxrate.parse_sweep("100:10000:3") == (100.0, 1000.0, 10000.0)
    assert len(maxrate.parse_sweep("10:20")) == 5
    for bad in ("100", "a:b", "0:10", "10:5", "1:10:0", "1:inf", "nan:10", "1:10:200"):
        with pytest.raises(maxrate.SpecError):
            maxrate.parse_sweep(bad)


@pytest.mark.parametrize("capacity", [37.0, 900.0, 12_345.0])
def test_finds_the_knee_without_noise(capacity):
    got = maxrate.search(fake(capacity), SLO, start=10, seconds=1)
    true_max = 0.9 * capacity
    assert true_max / maxrate.RESOLUTION ** 2 <= got.rate <= true_max
    assert got.steps[-1].phase == "confirm" and got.steps[-1].ok
    assert len(got.steps) <= maxrate.MAX_STEPS + 3


def test_never_reports_more_than_it_sustained_under_noise():
    over = 0
    for seed in range(200):
        got = maxrate.search(fake(5000, noise=0.08, seed=seed), SLO, start=50, seconds=1)
        confirm = [s for s in got.steps if s.phase == "confirm" and s.rate == got.rate]
        assert got.rate == 0 or (confirm and confirm[-1].ok)  # the answer was held again
        assert all(s.achieved >= 0.98 * s.rate for s in confirm if s.ok)
        over += got.rate > 0.9 * 5000 * 1.1
    assert over <= 10   # a lucky confirmation can exceed the noiseless knee, rarely


def test_a_start_above_capacity_looks_lower_and_a_dead_system_says_so():
    got = maxrate.search(fake(30), SLO, start=100, seconds=1)
    assert 0 < got.rate <= 27
    calls = []
    dead = maxrate.search(fake(0.001, calls=calls), SLO, start=100, seconds=1)
    assert dead.rate == 0 and "not sustained even at" in dead.why
    assert len(calls) <= 2 * (1 + maxrate.FLOOR_HALVINGS)     # bounded, not stuck at 0


def test_no_oscillation_the_bracket_only_narrows():
    calls = []
    maxrate.search(fake(2000, noise=0.05, seed=3, calls=calls), SLO, start=2, seconds=1)
    bisect = [r for r, phase in calls if phase == "bisect"]
    lo, hi = min(bisect), max(bisect)
    assert hi / lo < 2.1          # all bisection inside one doubling, no 2 <-> 50,000 swings


def test_a_ceiling_stops_the_climb():
    got = maxrate.search(fake(1e9), SLO, start=100, seconds=1, ceiling=1000)
    assert got.rate <= 1000 and all(s.rate <= 1000 * 1.01 for s in got.steps)
