"""The recorder against a computed reference (numpy), and merging repeats."""
import math
import statistics

import numpy as np
import pytest

from bench import recorder, results

# 3 significant digits: a value is stored within 1/1024 of itself (HdrHistogram's
# sub-bucket resolution for 3 digits is 2048 buckets per power of two).
REL = 2 ** -10


def _reference(values, pct):
    """The smallest sample with at least pct% of the samples at or below it (the rank
    rounded first: 99.9% of 50,000 is 49,950, not the float 49,950.000000000004)."""
    ordered = np.sort(np.rint(values))
    rank = max(1, math.ceil(round(pct * ordered.size / 100, 6)))
    return ordered[rank - 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_match_numpy_within_hdr_precision(seed):
    rng = np.random.default_rng(seed)
    values = rng.lognormal(mean=np.log(300), sigma=1.2, size=50_000)  # ~1 us .. ~100 ms
    hist, overflow, *_ = recorder.histogram(values)
    assert overflow == 0
    assert hist.get_total_count() == values.size
    for pct in (1, 25, 50, 90, 99, 99.9, 99.99, 100):
        got = hist.get_value_at_percentile(pct)
        want = _reference(values, pct)
        assert abs(got - want) <= max(1, want * REL), (pct, got, want)
    assert abs(hist.get_max_value() - np.rint(values).max()) <= np.rint(values).max() * REL


def test_known_small_sample():
    hist, _, *_ = recorder.histogram([100, 200, 300, 400, 500, 600, 700, 800, 900, 1000])
    assert hist.get_value_at_percentile(50) == 500
    assert hist.get_value_at_percentile(90) == 900
    assert hist.get_value_at_percentile(100) == 1000
    assert hist.get_min_value() == 100


def test_overflow_is_clamped_and_counted():
    values = [10, 20, recorder.HIGHEST_US * 2, recorder.HIGHEST_US + 1]
    hist, overflow, *_ = recorder.histogram(values)
    assert overflow == 2
    assert hist.get_total_count() == 4            # clamped, not dropped
    assert hist.values_are_equivalent(hist.get_max_value(), recorder.HIGHEST_US)
    small, over, *_ = recorder.histogram([5, 50], highest=10)
    assert over == 1 and small.get_max_value() == 10


def test_values_below_one_microsecond_count_as_one():
    hist, overflow, *_ = recorder.histogram([0.0, 0.2, 0.7, 0.49, 3])
    assert overflow == 0 and hist.get_total_count() == 5
    assert hist.get_min_value() == 1
    assert hist.get_value_at_percentile(80) == 1
    assert hist.get_max_value() == 3


def test_empty_input():
    hist, overflow, *_ = recorder.histogram([])
    assert hist.get_total_count() == 0 and overflow == 0


def test_timestamps_buffers():
    ts = recorder.Timestamps(4)
    start, end = ts.start, ts.end
    for i in range(3):
        start[i] = 1_000 * i
        end[i] = 1_000 * i + 2_500 * (i + 1)
    ts.count = 3
    assert list((ts.column("end") - ts.column("start")) / 1000) == [2.5, 5.0, 7.5]
    assert len(ts.column("start")) == 3


def test_encode_decode_round_trip():
    rng = np.random.default_rng(7)
    hist, overflow, *_ = recorder.histogram(rng.integers(1, 10_000_000, 20_000))
    summary = results.summarize(hist, "us", overflow)
    back = results.decode(summary)
    assert back.get_total_count() == hist.get_total_count()
    for pct in results.PERCENTILES.values():
        assert back.get_value_at_percentile(pct) == hist.get_value_at_percentile(pct)
    assert summary["p99"] == hist.get_value_at_percentile(99)


def test_aggregate_merges_repeats():
    rng = np.random.default_rng(3)
    samples = [rng.lognormal(np.log(100 * (i + 1)), 0.5, 5_000 + 1_000 * i) for i in range(3)]
    throughputs = [900.0, 1000.0, 1300.0]
    repeats = []
    for values, tp in zip(samples, throughputs):
        rec = recorder.Recorder()
        rec.add("latency_us", values)
        repeats.append({"metrics": {"throughput_per_s": tp, "sent": len(values),
                                    "lost": 1, "transport": "memory"},
                        "histograms": rec.histograms})
    cell = results.aggregate("publish", {"api": "kombu"}, repeats)

    merged = cell.histograms["latency_us"]
    assert merged["count"] == sum(len(v) for v in samples)       # every sample of every repeat
    everything = np.concatenate(samples)
    want = _reference(everything, 99)
    assert abs(merged["p99"] - want) <= max(1, want * REL)
    assert results.decode(merged).get_total_count() == merged["count"]

    assert cell.metrics["throughput_per_s"] == 1000.0            # median over repeats
    assert cell.spread["throughput_per_s"] == {
        "min": 900.0, "max": 1300.0, "stdev": statistics.stdev(throughputs), "n": 3}
    assert cell.metrics["sent"] == sum(len(v) for v in samples)  # counts add up
    assert cell.metrics["lost"] == 3
    assert cell.metrics["transport"] == "memory"                 # non-numeric: kept as is
    assert len(cell.repeats) == 3
    assert [r["histograms"]["latency_us"]["count"] for r in cell.repeats] == \
        [len(v) for v in samples]
    assert "hdr" not in cell.repeats[0]["histograms"]["latency_us"]


def test_aggregate_single_repeat_has_no_spread():
    hist, overflow, *_ = recorder.histogram([1, 2, 3])
    cell = results.aggregate("s", {}, [{"metrics": {"x": 5.0},
                                        "histograms": {"h": recorder.Recorded(hist, overflow, "us")}}])
    assert cell.metrics["x"] == 5.0 and cell.spread == {}


def test_negative_and_nan_readings_are_counted_not_recorded():
    hist, overflow, invalid = recorder.histogram([5, -3, float("nan"), 7, -0.5, float("inf")])
    assert invalid == 4 and overflow == 0
    assert hist.get_total_count() == 2 and hist.get_min_value() == 5
    rec = recorder.Recorder()
    rec.add("h", [1, -1, 2])
    cell = results.aggregate("s", {}, [{"metrics": {}, "histograms": rec.histograms}])
    assert cell.histograms["h"]["invalid"] == 1 and cell.histograms["h"]["count"] == 2
    assert cell.repeats[0]["histograms"]["h"]["invalid"] == 1


def test_interval_histograms_split_by_time_and_sum_to_the_whole():
    at = np.array([0, 100, 900_000_000, 1_000_000_001, 2_500_000_000, 2_600_000_000])
    values = [10, 20, 30, 40, 50, 60]
    parts = recorder.intervals(values, at, interval_s=1.0, offset_ns=0)
    assert [p.hist.get_total_count() for p in parts] == [3, 1, 2]
    assert [round(p.start_s, 3) for p in parts] == [0.0, 1.0, 2.0]
    assert all(round(p.end_s - p.start_s, 6) == 1.0 for p in parts)
    rec = recorder.Recorder()
    rec.add("h", values, at_ns=at)
    summary = results.aggregate("s", {}, [{"metrics": {}, "histograms": rec.histograms}]) \
        .histograms["h"]
    assert sum(results.decode(iv).get_total_count() for iv in summary["intervals"]) == 6


def test_interval_count_is_bounded_whatever_the_span():
    at = np.array([0, 10 ** 13])   # ~2.8 hours apart at 1 s intervals
    parts = recorder.intervals([1, 2], at, interval_s=1.0, offset_ns=0)
    assert len(parts) == 2 and parts[-1].start_s <= 10 ** 4
    assert (parts[1].end_s - parts[1].start_s) * recorder.MAX_INTERVALS >= 10 ** 4
