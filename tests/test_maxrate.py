"""The maximum-sustainable-rate search against fake systems (no clock, no broker):
it finds the knee, never reports more than was sustained, and cannot get stuck."""
import math
import random

import pytest

import numpy as np

from bench import maxrate, percentiles


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


# ------------------------------------------------------------ decided by intervals
def sampled(capacity: float, base_us: float = 1000.0, seed: int = 0, calls: list | None = None,
            jitter: float = 0.0):
    """A simulated queue that returns what a real step measures: rate x seconds latency
    samples (lognormal around base/(1-load)), the SLO percentile with its order-statistic
    interval. No clock: ``seconds`` only sets how many samples the step gets."""
    rng = np.random.default_rng(seed)

    def measure(rate, seconds, phase):
        n = max(1, int(round(rate * seconds)))
        if calls is not None:
            calls.append((rate, seconds, phase, n))
        cap = capacity * (math.exp(rng.normal(0, jitter)) if jitter else 1.0)
        load = rate / cap
        if load >= 1:
            return maxrate.Step(rate, cap, 1e7, rate - cap, n=n, lo_us=1e7, hi_us=1e7)
        values = rng.lognormal(math.log(base_us / (1 - load)), 0.5, n)
        # the median of a lognormal is exp(mu); its p99 is exp(mu + 2.326 * 0.5) = 3.2x
        bounds = percentiles.interval_of_values(values, SLO.percentile)
        lo, hi = bounds if bounds else (None, None)
        return maxrate.Step(rate, rate, float(np.percentile(values, 99)), 0.0, n=n,
                            lo_us=lo, hi_us=hi)
    return measure


def test_a_step_is_decided_by_the_interval():
    ok = maxrate.judge(maxrate.Step(100, 100, 9000, 0, n=1000, lo_us=8000, hi_us=9500), SLO)
    assert ok.ok and ok.decided
    bad = maxrate.judge(maxrate.Step(100, 100, 12000, 0, n=1000, lo_us=10500, hi_us=14000), SLO)
    assert not bad.ok and bad.decided and "over" in bad.why
    spans = maxrate.judge(maxrate.Step(100, 100, 9900, 0, n=1000, lo_us=9000, hi_us=11000), SLO)
    assert not spans.ok and not spans.decided and "spans" in spans.why
    few = maxrate.judge(maxrate.Step(10, 10, 5000, 0, n=30), SLO)
    assert not few.ok and not few.decided and "too few samples (n=30)" in few.why
    # a rate not achieved decides the step, whatever the interval
    slow = maxrate.judge(maxrate.Step(100, 50, 9900, 0, n=30), SLO)
    assert slow.decided and not slow.ok


def test_step_length_follows_the_rate_so_a_decided_step_has_enough_samples():
    calls = []
    got = maxrate.search(sampled(40, calls=calls), SLO, start=10, seconds=1)
    need = percentiles.min_samples(SLO.percentile)
    for rate, seconds, phase, n in calls:
        # twice the samples p99 needs, unless that would take longer than MAX_STEP_S
        # (at 10/s: 736 samples would be 73.6 s, so 60 s and 600 samples, still enough)
        assert n >= min(maxrate.SAMPLES_FACTOR * need, rate * maxrate.MAX_STEP_S) - 1
        assert n >= need
    assert max(s for r, s, _, _ in calls if r == 10) == maxrate.MAX_STEP_S
    assert got.rate > 0 and got.not_sustained is not None and got.not_sustained > got.rate


def test_an_undecided_step_is_held_longer_within_its_budget():
    calls = []

    def spanning(rate, seconds, phase):      # the interval always spans the SLO
        calls.append((rate, seconds, phase))
        return maxrate.Step(rate, rate, 10_000, 0.0, n=int(rate * seconds),
                            lo_us=9_000, hi_us=11_000)
    got = maxrate.search(spanning, SLO, start=1000, seconds=1)
    first = [c for c in calls if c[0] == 1000]
    assert [p for _, _, p in first] == ["climb", "hold", "hold"]  # held again, twice as long
    assert first[1][1] == 2 * first[0][1] and first[2][1] == 2 * first[1][1]
    assert sum(s for _, s, _ in first) <= maxrate.HOLD_BUDGET * first[0][1]
    # never shown sustained, never shown not sustained: no answer, no upper bracket
    assert got.rate == 0 and got.not_sustained is None
    assert all(not s.decided for s in got.steps)


def test_the_bracket_is_repeatable_and_brackets_the_true_knee():
    # base 1 ms, p99 = 3.2 x median: p99 <= 10 ms while 3.2 / (1 - load) <= 10, load <= 0.68
    knee = 0.68 * 500
    answers = []
    for seed in range(20):
        got = maxrate.search(sampled(500, seed=seed, jitter=0.03), SLO, start=20, seconds=1)
        answer = [s for s in got.steps if s.rate == got.rate and s.phase in ("confirm", "hold")]
        assert answer and answer[-1].ok                  # the answer was held again
        assert got.confirm_s >= maxrate.CONFIRM_FACTOR * 1
        assert got.rate <= knee * 1.1 and got.not_sustained >= knee / 1.1
        answers.append(got.rate)
        m = got.metrics(SLO)
        assert m["not_sustained_per_s"] == got.not_sustained and m["bracket"].startswith(
            "sustained ")
    assert max(answers) / min(answers) <= 1.2        # run to run within 20%


def test_a_latency_the_rate_does_not_set_stops_the_descent_and_says_so():
    """A busy machine: p99 12-14 ms whatever the rate, every task taken. Halving once
    shows the latency does not fall, so the search stops there (no 60 s steps at 6/s)."""
    calls = []
    rng = np.random.default_rng(1)

    def floored(rate, seconds, phase):
        calls.append((rate, phase))
        n = max(1, int(rate * seconds))
        values = rng.lognormal(np.log(4000), 0.45, n)
        lo, hi = percentiles.interval_of_values(values, 99.0)
        return maxrate.Step(rate, rate, float(np.percentile(values, 99)), 0.0, n=n,
                            lo_us=lo, hi_us=hi)
    got = maxrate.search(floored, SLO, start=100, seconds=1)
    assert got.rate == 0
    assert "did not fall" in got.why, got.why
    assert {r for r, _ in calls} <= {100.0, 50.0, 25.0, 12.5}     # never down to 6.25/s
    # a throughput limit is not a latency floor: a slow system still looks lower
    got = maxrate.search(fake(30), SLO, start=100, seconds=1)
    assert 0 < got.rate <= 27


def test_latency_floor_needs_both_rates_taken_and_no_fall():
    a = maxrate.judge(maxrate.Step(100, 100, 13000, 0, n=800, lo_us=12000, hi_us=14000), SLO)
    b = maxrate.judge(maxrate.Step(50, 50, 13500, 0, n=800, lo_us=12000, hi_us=15000), SLO)
    assert "did not fall" in maxrate.latency_floor(a, b, SLO)
    fell = maxrate.judge(maxrate.Step(50, 50, 11000, 0, n=800, lo_us=10500, hi_us=11800), SLO)
    assert maxrate.latency_floor(a, fell, SLO) == ""
    short = maxrate.judge(maxrate.Step(50, 40, 13500, 0, n=800, lo_us=12000, hi_us=15000), SLO)
    assert maxrate.latency_floor(a, short, SLO) == ""


def test_latency_floor_is_decided_by_the_intervals_not_the_point_estimates():
    a = maxrate.judge(maxrate.Step(100, 100, 13000, 0, n=800, lo_us=12000, hi_us=14000), SLO)
    # a lower point estimate whose interval overlaps: not shown lower, so the descent ends
    # (the point-estimate rule went on halving here)
    noise = maxrate.judge(maxrate.Step(50, 50, 12500, 0, n=800, lo_us=11000, hi_us=13500), SLO)
    why = maxrate.latency_floor(a, noise, SLO)
    assert "did not fall" in why and "12.00-14.00 ms (n=800)" in why, why
    assert "11.00-13.50 ms (n=800)" in why
    # intervals that touch are not disjoint either; one wholly below is shown lower
    touch = maxrate.judge(maxrate.Step(50, 50, 11000, 0, n=800, lo_us=10500, hi_us=12000), SLO)
    assert "did not fall" in maxrate.latency_floor(a, touch, SLO)
    # too few samples for an interval shows nothing either way: the descent goes on
    few = maxrate.judge(maxrate.Step(50, 50, 14000, 0, n=200), SLO)
    assert maxrate.latency_floor(a, few, SLO) == ""
    # steps without intervals (n unknown) still compare their point estimates
    p_a = maxrate.judge(maxrate.Step(100, 100, 13000, 0), SLO)
    assert maxrate.latency_floor(p_a, maxrate.judge(maxrate.Step(50, 50, 12000, 0), SLO),
                                 SLO) == ""
    assert "13.0 ms" in maxrate.latency_floor(
        p_a, maxrate.judge(maxrate.Step(50, 50, 13500, 0), SLO), SLO)


def test_a_latency_the_load_sets_is_shown_lower_and_the_descent_goes_on():
    """Capacity 120/s, base 2 ms: 100/s and 50/s miss p99<=10ms, but halving lowers the
    p99 well beyond its interval (about 38 ms -> 11 ms), so the search goes on down and
    finds a rate that passes instead of stopping at a latency floor."""
    got = maxrate.search(sampled(120, base_us=2000, seed=3), SLO, start=100, seconds=1)
    assert "did not fall" not in got.why
    assert got.rate > 0 and got.rate < 50


def test_a_search_cell_says_which_histogram_it_judged():
    """Scenario.max_rate reads the SLO percentile from the histogram it is given (a
    roundtrip cell and a latency cell both judge ``queue_wait``) and says so in the
    metrics and the note; the other histograms do not decide."""
    from bench import recorder
    from bench.scenarios import Outcome, Scenario
    from bench.run_options import RunOptions

    rng = np.random.default_rng(5)

    def once(rate, hold):
        n = max(1, int(rate * hold))
        rec = recorder.Recorder()
        load = min(rate / 500, 0.999)
        rec.add("queue_wait", rng.lognormal(np.log(1000 / (1 - load)), 0.5, n))
        rec.add("waterfall.total", rng.lognormal(np.log(50_000), 0.1, n))  # always over
        return Outcome({"rate_achieved_per_s": rate, "backlog_growth_per_s": 0.0},
                       rec.histograms)
    out = Scenario(RunOptions()).max_rate(once, SLO, 20, 1, "queue_wait", "tasks/s")
    m = out.metrics
    assert m["slo_histogram"] == "queue_wait" and m["max_sustainable_rate_per_s"] > 0
    assert "p99<=10ms of queue_wait" in out.notes[0], out.notes


def test_a_rate_held_again_is_judged_on_all_its_samples():
    """Scenario.max_rate pools every sample held at a rate (climb, retry, hold, confirm):
    each step's n is the sum of what every hold at its rate recorded, ``holds`` counts them,
    and a stall that fell into one hold is a share of the rate's samples."""
    from collections import defaultdict

    from bench import recorder
    from bench.run_options import RunOptions
    from bench.scenarios import Outcome, Scenario

    rng = np.random.default_rng(7)
    made = defaultdict(list)

    def once(rate, hold):
        n = max(1, int(rate * hold))
        made[rate].append(n)
        load = min(rate / 500, 0.999)
        values = rng.lognormal(np.log(1000 / (1 - load)), 0.6, n)
        if len(made[rate]) == 1 and rate > 100:
            values[: n // 20] = 60_000            # a stall in the first hold of a rate
        rec = recorder.Recorder()
        rec.add("queue_wait", values)
        return Outcome({"rate_achieved_per_s": rate, "backlog_growth_per_s": 0.0},
                       rec.histograms)
    out = Scenario(RunOptions()).max_rate(once, SLO, 20, 1, "queue_wait", "tasks/s")
    steps = out.metrics["steps"]
    seen = defaultdict(int)
    for s in steps:
        seen[s["rate"]] += 1
        assert s["holds"] == seen[s["rate"]]
        assert s["n"] == sum(made[s["rate"]][:seen[s["rate"]]]), s
    again = [s for s in steps if s["holds"] > 1]
    assert again, [(s["rate"], s["phase"]) for s in steps]
    assert any(f"{s['holds']} holds" in s["why"] for s in again if s["why"])


def test_a_step_with_the_share_beyond_the_limit_is_decided_by_it():
    """``beyond`` (the share of samples over the SLO's limit) decides before the percentile's
    interval: p99 <= 10 ms holds while at most 1% are over 10 ms."""
    def step(lo, hi):
        return maxrate.judge(maxrate.Step(500, 500, 12_000, 0.0, n=5_000, lo_us=None,
                                          hi_us=None, beyond=(lo + hi) / 2, beyond_lo=lo,
                                          beyond_hi=hi, n_eff=400, holds=2), SLO)
    ok, bad, open_ = step(0.001, 0.008), step(0.02, 0.05), step(0.005, 0.02)
    assert ok.ok and ok.decided and ok.why == ""
    assert not bad.ok and bad.decided and "of tasks over 10.0 ms, 1.00% allowed" in bad.why
    assert "2 holds, worth 400 independent" in bad.why
    assert not open_.ok and not open_.decided and open_.why.startswith("undecided: p99 12.00 ms")


def test_the_answer_keeps_its_own_figures_after_probes_above_it():
    """A climb that stops at an undecided rate probes above the answer; the cell still
    reports the answer's own hold (its metrics and histograms), not the last probe's."""
    from bench import recorder
    from bench.run_options import RunOptions
    from bench.scenarios import Outcome, Scenario

    rng = np.random.default_rng(3)

    def once(rate, hold):
        n = max(1, int(rate * hold))
        values = rng.lognormal(np.log(1000), 0.3, n)
        if rate > 300:                   # one stall in the first second: undecided
            values[: n // 40] = 50_000
        at = (np.arange(n) / rate * 1e9).astype(np.int64)
        rec = recorder.Recorder()
        rec.add("queue_wait", values, at_ns=at)
        return Outcome({"rate_achieved_per_s": rate, "backlog_growth_per_s": 0.0,
                        "sent": n}, rec.histograms)
    out = Scenario(RunOptions()).max_rate(once, SLO, 20, 1, "queue_wait", "tasks/s")
    m, steps = out.metrics, out.metrics["steps"]
    assert any(s["phase"] == "probe" for s in steps), [(s["rate"], s["phase"]) for s in steps]
    answer = m["max_sustainable_rate_per_s"]
    assert 0 < answer <= 300
    last = [s for s in steps if s["rate"] == answer][-1]
    assert m["sent"] == int(answer * last["seconds"])
    assert out.histograms["queue_wait"].hist.get_total_count() == m["sent"]
