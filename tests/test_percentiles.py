"""Percentiles with their sample counts and distribution-free intervals (bench.percentiles):
the intervals cover the true percentile as often as they claim (simulated, seeded), too few
samples are said in words everywhere a percentile is shown, and the gate never passes one."""
import importlib
import math

import numpy as np
import pytest
from scipy import optimize, stats as st

from bench import compare, gate, gate_spec, percentiles, recorder, report, results
from bench.exporters.hgrm import distribution
from tests import factory

html_exporter = importlib.import_module("bench.exporters.html")

# 100,000 samples x 400 draws takes ~20 s here: the full tier
SIZES = (300, 1000, 10_000, pytest.param(100_000, marks=pytest.mark.slow))
DRAWS = 400


def lognormal(rng, n):
    return rng.lognormal(math.log(1000.0), 0.6, n)


def bimodal(rng, n):
    # 90% fast (around 1 ms), 10% slow (around 20 ms): p90 sits in the gap between them.
    slow = rng.random(n) < 0.10
    return np.where(slow, rng.lognormal(math.log(20_000.0), 0.3, n),
                    rng.lognormal(math.log(1000.0), 0.3, n))


def true_lognormal(pct):
    return float(st.lognorm.ppf(pct / 100, 0.6, scale=1000.0))


def true_bimodal(pct):
    def cdf(x):
        return 0.9 * st.lognorm.cdf(x, 0.3, scale=1000.0) + \
            0.1 * st.lognorm.cdf(x, 0.3, scale=20_000.0)
    return float(optimize.brentq(lambda x: cdf(x) - pct / 100, 1.0, 1e7, xtol=1e-6))


@pytest.mark.parametrize("draw,truth", [(lognormal, true_lognormal),
                                        (bimodal, true_bimodal)], ids=["lognormal", "bimodal"])
@pytest.mark.parametrize("n", SIZES)
def test_the_interval_covers_the_true_percentile(draw, truth, n):
    rng = np.random.default_rng(17 + n)
    checked = 0
    for name, pct in percentiles.NAMES.items():
        q = truth(pct)
        if n < percentiles.min_samples(pct):
            assert percentiles.interval_of_values(draw(rng, n), pct) is None
            continue
        covered = 0
        for _ in range(DRAWS):
            lo, hi = percentiles.interval_of_values(draw(rng, n), pct)
            covered += lo <= q <= hi
        assert covered / DRAWS >= 0.93, (name, n, covered / DRAWS)
        checked += 1
    # p50 and p90 at every size; p99 from 368 samples (at 300 it is too few, checked
    # above), p99.9 from 3,688
    assert checked == sum(n >= percentiles.min_samples(p) for p in percentiles.NAMES.values()) >= 2


@pytest.mark.parametrize("draw,truth", [(lognormal, true_lognormal),
                                        (bimodal, true_bimodal)], ids=["lognormal", "bimodal"])
def test_through_the_histogram_the_coverage_holds(draw, truth):
    """The same check through HdrHistogram (what the results file holds): bucket edges
    widen the interval, never lose coverage."""
    rng = np.random.default_rng(5)
    for n in (400, 1000):             # p99 needs 368 samples
        covered = {name: 0 for name in ("p50", "p90", "p99")}
        for _ in range(200):
            est = percentiles.estimate(recorder.histogram(draw(rng, n))[0])
            for name in covered:
                covered[name] += est[name].lo <= truth(percentiles.NAMES[name]) <= est[name].hi
        assert all(c / 200 >= 0.93 for c in covered.values()), (n, covered)


def test_too_few_samples_is_the_rank_rule():
    assert [percentiles.min_samples(p) for p in (50, 90, 99, 99.9)] == [6, 36, 368, 3688]
    for pct in (50.0, 90.0, 99.0, 99.9):
        m = percentiles.min_samples(pct)
        assert percentiles.ranks(m - 1, pct) is None
        lo, hi = percentiles.ranks(m, pct)
        assert 1 <= lo <= m * pct / 100 <= hi <= m
    assert percentiles.ranks(0, 50) is None and percentiles.ranks(10**6, 100.0) is None


def test_a_summary_carries_the_interval_and_says_too_few():
    hist = recorder.histogram(np.arange(1, 31) * 100.0)[0]
    s = results.summarize(hist)
    assert s["count"] == 30 and s["ci"]["p99"] is None and s["ci"]["p999"] is None
    lo, hi = s["ci"]["p50"]
    assert lo <= s["p50"] <= hi
    p = percentiles.of_summary(s, "p99")
    assert not p.enough and p.too_few == "too few samples (n=30)"
    big = results.summarize(recorder.histogram(np.arange(1, 5001) * 1.0)[0])
    lo, hi = big["ci"]["p99"]
    assert lo <= 4950 <= hi and lo <= big["p99"] <= hi
    old = {k: v for k, v in big.items() if k != "ci"}          # a schema-1 summary
    assert percentiles.of_summary(old, "p99").hi == hi


def test_a_run_file_round_trips_and_schema_1_still_loads(tmp_path):
    path = factory.write(tmp_path / "r.json", factory.cell("foo", samples=30))
    run = results.load(path)
    assert run.cells[0].histograms["publish_us"]["ci"]["p99"] is None
    text = path.read_text().replace(results.SCHEMA, "celery-bench/1")
    (tmp_path / "old.json").write_text(text)
    assert results.load(tmp_path / "old.json").cells
    bad = path.read_text().replace('"p50": [', '"p50": ["x", ', 1)
    (tmp_path / "bad.json").write_text(bad)
    with pytest.raises(results.SchemaError, match="'ci'"):
        results.load(tmp_path / "bad.json")


def _run():
    return results.Run({}, [factory.cell("foo", samples=30, transport="redis"),
                            factory.cell("foo", samples=5000, transport="unix",
                                         latency_us=2000)])


def test_tables_say_too_few_and_show_intervals_only_when_verbose():
    run = _run()
    console = report.Console(width=200, record=True)
    report.print_run(run, console)
    plain = console.export_text()
    assert "too few samples (n=30)" in plain and "95%" not in plain
    console = report.Console(width=200, record=True)
    report.print_run(run, console, verbose=True)
    verbose = console.export_text()
    assert "95%" in verbose and "too few samples (n=30)" in verbose
    unix = next(line for line in verbose.splitlines() if line.startswith("unix"))
    assert "-" in unix.split()[-2]            # the p99 interval column, e.g. 3.11-3.23


def test_html_tooltip_and_hgrm_comments():
    run = _run()
    page = html_exporter.html(run)
    assert 'title="too few samples (n=30)"' in page
    assert 'title="95% interval ' in page and "n=5,000" in page
    few = distribution(run.cells[0].histograms["publish_us"])
    assert "#[p99 = too few samples (n=30)]" in few
    many = distribution(run.cells[1].histograms["publish_us"])
    assert "#[p99 = " in many and "95% interval" in many and "n=5000" in many


def test_compare_does_not_compare_a_too_few_percentile():
    run = _run()
    by = {c.metric: c for c in compare.compare_cells(run.cells[0], run.cells[1])}
    assert by["publish_us.p99"].words == "not compared"
    assert "too few samples (n=30) in base" in by["publish_us.p99"].detail
    assert "95% intervals" in by["publish_us.p50"].detail


def _verdict(tmp_path, run, check):
    (tmp_path / "g.toml").write_text(f'[[gate]]\nname = "tail"\ncheck = "{check}"\n')
    spec = gate_spec.load_spec(tmp_path / "g.toml")
    return gate.run_gates(spec, run)[0]


def test_the_gate_decides_a_percentile_by_its_interval(tmp_path):
    run = _run()
    # the unix cell: p99 around 3.2 ms, interval a few % wide
    assert _verdict(tmp_path, run, "foo[transport=unix] publish_us.p99 <= 5000").status == "PASS"
    assert _verdict(tmp_path, run, "foo[transport=unix] publish_us.p99 <= 2000").status == "FAIL"
    near = run.cells[1].histograms["publish_us"]["ci"]["p99"]
    mid = (near[0] + near[1]) / 2
    v = _verdict(tmp_path, run, f"foo[transport=unix] publish_us.p99 <= {mid}")
    assert v.status == "INCONCLUSIVE" and v.shown == "WARN"
    # 30 samples: whatever the bound, undecided, never a pass
    for bound in (1e9, 1):
        v = _verdict(tmp_path, run, f"foo[transport=redis] publish_us.p99 <= {bound}")
        assert v.status == "INCONCLUSIVE" and "too few samples (n=30)" in v.text
