"""compare: plain-word verdicts from repeats, across runs and within one run."""
import pytest

from bench import compare, results

from factory import cell, write

HELD = dict(api="kombu", producer="held", transport="memory")
PER_CALL = dict(api="kombu", producer="per-call", transport="memory")


def test_clearly_faster_with_repeats():
    base = cell(throughputs=(1000, 1020, 980), latency_us=100, **HELD)
    new = cell(throughputs=(1800, 1830, 1790), latency_us=100, seed=1, **HELD)
    by_metric = {c.metric: c for c in compare.compare_cells(base, new)}
    tp = by_metric["throughput_per_s"]
    assert tp.significant and tp.words == "1.80x faster"
    assert "95% CI" in tp.detail and "3 vs 3 repeats" in tp.detail
    p50 = by_metric["publish_us.p50"]
    assert p50.significant is False and p50.words == "no significant difference"


def test_slower_latency_reads_as_slower():
    base = cell(throughputs=(1000, 1000, 1000), latency_us=100, **HELD)
    new = cell(throughputs=(1000, 1000, 1000), latency_us=250, seed=1, **HELD)
    p99 = next(c for c in compare.compare_cells(base, new) if c.metric == "publish_us.p99")
    assert p99.significant and p99.direction == "slower"
    assert p99.words.endswith("x slower") and 2.2 < p99.ratio < 2.8


def test_overlapping_repeats_are_not_significant():
    c = compare.judge("throughput_per_s", 1000, 1150, [800, 1000, 1300], [900, 1150, 1400])
    assert c.significant is False
    assert c.words == "no significant difference"
    assert "1.15x faster" in c.detail


def test_within_noise_is_not_significant_even_when_ranges_separate():
    c = compare.judge("throughput_per_s", 1000, 1030, [999, 1000, 1001], [1029, 1030, 1031])
    assert c.significant is False and "noise band" in c.detail


def test_single_repeat_uses_the_noise_band_and_says_so():
    big = compare.judge("throughput_per_s", 1000, 2000, [1000], [2000])
    assert big.significant and big.words == "2.00x faster"
    assert "no spread" in big.detail
    small = compare.judge("throughput_per_s", 1000, 1030, [1000], [1030])
    assert small.significant is False


def test_one_side_with_repeats_uses_its_range():
    inside = compare.judge("throughput_per_s", 1000, 1200, [900, 1000, 1250], [1200])
    assert inside.significant is False
    outside = compare.judge("throughput_per_s", 1000, 2000, [900, 1000, 1100], [2000])
    assert outside.significant is True


def test_zero_and_missing_values():
    assert compare.judge("lost", 0, 0, [], []).words == "same (both 0)"
    assert compare.judge("lost", 0, 3, [], []).words == "not compared"
    assert compare.judge("x_per_s", None, 3, [], []).words == "not compared"


def test_bootstrap_interval_is_reproducible():
    a = compare.bootstrap_ratio_ci([1, 2, 3], [2, 4, 6])
    assert a == compare.bootstrap_ratio_ci([1, 2, 3], [2, 4, 6])
    assert a[0] <= 2.0 <= a[1]


@pytest.mark.parametrize("metric, better_up", [
    ("throughput_per_s", True), ("publish_us.p99", False), ("publish_us.max", False),
    ("lost", False), ("schedule_lag_us", False), ("rate_target_per_s", None),
    ("queue_depth", None)])
def test_direction_of_metrics(metric, better_up):
    assert compare.higher_is_better(metric) is better_up


def test_selectors():
    sel = compare.parse_selector("publish[api=kombu, producer=held]")
    assert sel.scenario == "publish" and dict(sel.params) == {"api": "kombu", "producer": "held"}
    assert str(sel) == "publish[api=kombu,producer=held]"
    assert compare.parse_selector("publish[]").params == ()
    over = sel.replace(compare.parse_selector("[producer=per-call]"))
    assert str(over) == "publish[api=kombu,producer=per-call]"
    for bad in ("publish", "publish[api]", "publish[api=kombu", "[a=b]]"):
        with pytest.raises(ValueError):
            compare.parse_selector(bad)


def test_compare_runs_pairs_by_cell_key(tmp_path):
    base = results.load(write(tmp_path / "a.json",
                              cell(throughputs=(1000, 1010, 990), **HELD),
                              cell(throughputs=(600, 610, 590), **PER_CALL),
                              cell(status="skipped", reason="redis unreachable",
                                   api="kombu", producer="held", transport="redis")))
    new = results.load(write(tmp_path / "b.json",
                             cell(throughputs=(2000, 2010, 1990), seed=3, **HELD),
                             cell(throughputs=(600, 605, 598), seed=4, **PER_CALL),
                             cell(api="queue", producer="held", transport="memory")))
    pairs = {p.key: p for p in compare.compare_runs(base, new, ["throughput_per_s"])}
    held = pairs[results.cell_key("publish", HELD)]
    assert held.comparisons[0].words == "2.00x faster"
    per_call = pairs[results.cell_key("publish", PER_CALL)]
    assert per_call.comparisons[0].words == "no significant difference"
    assert "skipped in BASE (redis unreachable)" in pairs[
        "publish[api=kombu,producer=held,transport=redis]"].note
    assert pairs["publish[api=queue,producer=held,transport=memory]"].note == "only in NEW"
    text = compare.format_runs(list(pairs.values()), "a.json", "b.json")
    assert "1 faster, 0 slower, 1 no significant difference; 2 cells not compared" in text


def test_compare_within_one_run_as_ratios_of_the_reference(tmp_path):
    run = results.load(write(
        tmp_path / "r.json",
        cell(throughputs=(1000, 1010, 990), **HELD),
        cell(throughputs=(610, 600, 620), seed=1, **PER_CALL),
        cell(throughputs=(270, 280, 260), seed=2, api="kombu", producer="new-connection",
             transport="memory"),
        cell(throughputs=(1700,), seed=3, api="kombu", producer="held", transport="redis")))
    groups = compare.compare_within(run, "producer", metrics=["throughput_per_s"])
    assert len(groups) == 1                     # redis has no per-call cell to compare
    g = groups[0]
    assert g.reference == "held" and g.shared == {"api": "kombu", "transport": "memory"}
    rows = {value: comps[0] for value, comps, _ in g.rows}
    assert rows["per-call"].ratio == pytest.approx(0.61)
    assert rows["per-call"].words == "1.64x slower"
    assert rows["new-connection"].ratio == pytest.approx(0.27)
    text = compare.format_within(groups, "r.json")
    assert "0.61x of held" in text and "producer=per-call vs held" in text

    by_transport = compare.compare_within(run, "transport", metrics=["throughput_per_s"])
    assert by_transport[0].rows[0][1][0].words == "1.70x faster"    # 1 repeat vs 3

    with pytest.raises(Exception, match="no cell has a param 'nope'"):
        compare.compare_within(run, "nope")
    with pytest.raises(Exception, match="producer takes held, per-call, new-connection"):
        compare.compare_within(run, "producer", reference="batch")


def test_cli_compare_two_files(tmp_path, cli_run):
    write(tmp_path / "a.json", cell(throughputs=(1000, 1010, 990), **HELD))
    write(tmp_path / "b.json", cell(throughputs=(1500, 1490, 1510), seed=5, **HELD))
    res = cli_run("compare", "a.json", "b.json", "--metric", "throughput_per_s")
    assert res.returncode == 0, res.stderr
    assert "publish[api=kombu,producer=held,transport=memory]" in res.stdout
    assert "1.50x faster" in res.stdout


def test_cli_compare_by_and_two_cells(tmp_path, cli_run):
    write(tmp_path / "r.json", cell(throughputs=(1000, 1010, 990), **HELD),
          cell(throughputs=(500, 505, 495), seed=1, **PER_CALL))
    res = cli_run("compare", "r.json", "--by", "producer", "--metric", "throughput_per_s")
    assert res.returncode == 0, res.stderr
    assert "2.00x slower (0.50x of held" in res.stdout
    res = cli_run("compare", "r.json", "--cell", "publish[producer=held]",
                  "--cell", "publish[producer=per-call]", "--metric", "throughput_per_s")
    assert res.returncode == 0, res.stderr
    assert "2.00x slower" in res.stdout


@pytest.mark.parametrize("args, words", [
    (["compare", "r.json"], "compare needs BASE NEW"),
    (["compare", "r.json", "missing.json"], "missing.json"),
    (["compare", "r.json", "--by", "nope"], "no cell has a param 'nope'"),
    (["compare", "r.json", "--cell", "publish[api=kombu]", "--cell", "publish[x=y]"],
     "matches 2 cells"),
    (["compare", "r.json", "--cell", "garbage"], "not a cell selector"),
    (["compare", "r.json", "r.json", "--by", "producer"], "ONE run"),
])
def test_cli_compare_bad_input(tmp_path, cli_run, args, words):
    write(tmp_path / "r.json", cell(**HELD), cell(**PER_CALL))
    res = cli_run(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in res.stderr
