"""compare: plain-word verdicts from repeats, across runs and within one run."""
import re

import numpy as np
import pytest

from bench import compare, results

from factory import cell, with_rounds, write

HELD = dict(api="kombu", producer="held", transport="memory")
PER_CALL = dict(api="kombu", producer="per-call", transport="memory")

SHOWN = re.compile(r"(\d+\.\d+)x( faster| slower| higher| lower|, unchanged)")
CI = re.compile(r"95% CI (\d+\.\d+)-(\d+\.\d+)")


def test_clearly_faster_with_repeats():
    base = cell(throughputs=(1000, 1020, 980), latency_us=100, **HELD)
    new = cell(throughputs=(1800, 1830, 1790), latency_us=100, seed=1, **HELD)
    by_metric = {c.metric: c for c in compare.compare_cells(base, new)}
    tp = by_metric["throughput_per_s"]
    assert tp.significant and tp.words == "1.80x faster"
    assert "95% CI" in tp.detail and "3 vs 3 repeats, p<0.0001" in tp.detail
    p50 = by_metric["publish_us.p50"]
    assert p50.significant is False and p50.words == "no significant difference"


def test_slower_latency_reads_as_slower_with_its_interval_in_the_same_terms():
    base = cell(throughputs=(1000, 1000, 1000), latency_us=100, **HELD)
    new = cell(throughputs=(1000, 1000, 1000), latency_us=250, seed=1, **HELD)
    p99 = next(c for c in compare.compare_cells(base, new) if c.metric == "publish_us.p99")
    assert p99.significant and p99.direction == "slower"
    assert p99.words.endswith("x slower") and 2.2 < p99.ratio < 2.8
    lo, hi = map(float, CI.search(p99.detail).groups())
    assert lo <= float(p99.words.split("x")[0]) <= hi


def test_the_issue_inverted_latency_interval_is_gone():
    # the issue's line: "4.64x slower (95% CI 0.09-0.53)" for a latency that grew 4.64x
    c = compare.judge("publish_us.p99", 100, 464, [95, 100, 105], [450, 464, 480])
    assert c.words == "4.64x slower"
    lo, hi = map(float, CI.search(c.detail).groups())
    assert 1 < lo <= 4.64 <= hi


def test_overlapping_repeats_are_not_significant():
    c = compare.judge("throughput_per_s", 1000, 1150, [800, 1000, 1300], [900, 1150, 1400])
    assert c.significant is False
    assert c.words == "no significant difference"
    assert "1.15x faster" in c.detail


def test_within_noise_is_not_significant_even_when_ranges_separate():
    c = compare.judge("throughput_per_s", 1000, 1030, [999, 1000, 1001], [1029, 1030, 1031],
                      noise=0.05)
    assert c.significant is False and "inside the ±5% noise band" in c.detail
    assert c.verdict.p < 0.05                       # the test alone would have said "faster"
    assert compare.judge("throughput_per_s", 1000, 1030, [999, 1000, 1001],
                         [1029, 1030, 1031], noise=0.0).significant


def test_across_runs_the_default_band_is_the_drift_of_a_run():
    # 1.25x with tight repeats: real for the repeats, but within what a whole run drifts
    c = compare.judge("throughput_per_s", 1000, 1250, [990, 1000, 1010], [1240, 1250, 1260])
    assert c.significant is False and "inside the ±30% noise band" in c.detail
    assert compare.judge("throughput_per_s", 1000, 1500, [990, 1000, 1010],
                         [1490, 1500, 1510]).significant


@pytest.mark.parametrize("nb, nn", [(1, 1), (2, 2), (3, 2), (1, 5)])
def test_fewer_than_three_repeats_a_side_gives_no_verdict(nb, nn):
    c = compare.judge("throughput_per_s", 1000, 2000, [1000] * nb, [2000] * nn)
    assert c.significant is None and c.words == "not enough repeats to judge"
    assert c.detail == f"{nb} vs {nn}; ratio 2.00x, 2.00x faster as measured"
    assert c.ratio == 2.0


def test_fewer_than_three_paired_rounds_gives_no_verdict():
    c = compare.judge("publish_us.p50", 100, 50, [100, 100], [50, 50], paired=True)
    assert c.significant is None and c.words == "not enough repeats to judge"
    assert c.detail == "2 paired rounds; ratio 0.50x, 2.00x faster as measured"


def test_zero_and_missing_values():
    assert compare.judge("lost", 0, 0, [], []).words == "same (both 0)"
    assert compare.judge("lost", 0, 3, [], []).words == "not compared"
    assert compare.judge("x_per_s", None, 3, [], []).words == "not compared"
    zero_rep = compare.judge("publish_us.p50", 1, 2, [0, 1, 1], [2, 2, 2])
    assert zero_rep.words == "cannot judge" and zero_rep.significant is None


def test_pairing_cancels_what_a_round_does_to_both_cells():
    """Rounds that swing 1.5x, the same 20% gap in each: paired sees it, unpaired cannot."""
    base = [1000, 1500, 800, 1200, 900]
    new = [b * 0.8 * f for b, f in zip(base, (1.01, 0.99, 1.0, 1.02, 0.98))]
    paired = compare.judge("throughput_per_s", 1000, 800, base, new, paired=True)
    assert paired.significant and paired.words == "1.25x slower"
    assert "5 paired rounds" in paired.detail
    unpaired = compare.judge("throughput_per_s", 1000, 800, base, new, noise=0.05)
    assert unpaired.significant is False


def test_paired_values_pair_by_round_else_by_position():
    a = with_rounds(cell(throughputs=(100, 200, 300), **HELD), [0, 1, 2])
    b = with_rounds(cell(throughputs=(220, 330, 110), **PER_CALL), [1, 2, 0])
    assert compare.paired_values(a, b, "throughput_per_s") == ([100, 200, 300], [110, 220, 330])
    c = cell(throughputs=(1, 2), **PER_CALL)                # no rounds: by position
    assert compare.paired_values(a, c, "throughput_per_s") == ([100, 200], [1, 2])
    d = with_rounds(cell(throughputs=(5, 6), **PER_CALL), [2, 7])   # round 7 has no partner
    assert compare.paired_values(a, d, "throughput_per_s") == ([300], [5])


# --------------------------------------------------------------------------- the words' terms
METRIC_DIRECTIONS = [("throughput_per_s", True), ("publish_us.p99", False), ("queue_depth", None)]


@pytest.mark.parametrize("metric, better_up", METRIC_DIRECTIONS)
@pytest.mark.parametrize("paired", [False, True])
def test_printed_interval_contains_printed_ratio_for_every_direction(metric, better_up, paired):
    """Property: whatever the data, the interval printed contains the ratio printed, in the
    words' own terms (a "2.00x slower" rate has an interval around 2, not around 0.5)."""
    assert compare.higher_is_better(metric) is better_up
    rng = np.random.default_rng(7)
    judged = 0
    for trial in range(400):
        n = int(rng.integers(3, 8))
        nn = n if paired else int(rng.integers(3, 8))
        true = float(np.exp(rng.choice([0.0, rng.normal(0, 0.02), rng.normal(0, 0.7)])))
        sigma = float(rng.choice([0.001, 0.05, 0.3, 1.0]))
        base = list(1000 * np.exp(rng.normal(0, sigma, n)))
        new = list(1000 * true * np.exp(rng.normal(0, sigma, nn)))
        shown_base, shown_new = float(np.median(base)), float(np.median(new))
        if rng.random() < 0.3:      # a figure other than the median (a merged p99)
            shown_new *= float(np.exp(rng.normal(0, 0.3)))
        c = compare.judge(metric, shown_base, shown_new, base, new,
                          noise=float(rng.choice([0.0, 0.05, 0.3])), paired=paired)
        text = c.line()
        ratio_text = SHOWN.search(text)
        ci = CI.search(text)
        assert ratio_text and ci, text
        lo, hi = float(ci.group(1)), float(ci.group(2))
        shown = float(ratio_text.group(1))
        assert lo <= shown <= hi, text
        words = ratio_text.group(2).strip()
        assert not (c.significant and words == ", unchanged"), text
        assert len(ci.group(1).split(".")[1]) == len(ratio_text.group(1).split(".")[1])
        if words != ", unchanged":   # and the words agree with the ratio's side of 1
            bigger = {"faster": better_up is not False, "slower": better_up is False,
                      "higher": True, "lower": False}[words]
            assert (c.ratio > 1) == bigger, text
        judged += 1
    assert judged == 400


def test_a_significant_difference_too_small_for_two_decimals_gets_three():
    c = compare.judge("throughput_per_s", 1000, 1003, [1000] * 3, [1003, 1003.1, 1002.9],
                      noise=0.0)
    assert c.significant and c.words == "1.003x faster"
    assert "95% CI 1.003-1.003" in c.detail


@pytest.mark.parametrize("metric, better_up", METRIC_DIRECTIONS)
def test_direction_words(metric, better_up):
    up = compare.judge(metric, 100, 200, [99, 100, 101], [199, 200, 201], noise=0.05)
    down = compare.judge(metric, 200, 100, [199, 200, 201], [99, 100, 101], noise=0.05)
    expect = {True: ("faster", "slower"), False: ("slower", "faster"),
              None: ("higher", "lower")}[better_up]
    assert (up.direction, down.direction) == expect
    assert up.words == f"2.00x {expect[0]}" and down.words == f"2.00x {expect[1]}"


@pytest.mark.parametrize("metric, better_up", [
    ("throughput_per_s", True), ("publish_us.p99", False), ("publish_us.max", False),
    ("lost", False), ("schedule_lag_us", False), ("rate_target_per_s", None),
    ("cpu_us_per_msg", False), ("instructions_per_msg", False), ("cpu_vs_calibration", False),
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
                                   api="kombu", producer="held", transport="redis"),
                              cell(throughputs=(300,), api="kombu", producer="new-connection",
                                   transport="memory")))
    new = results.load(write(tmp_path / "b.json",
                             cell(throughputs=(2000, 2010, 1990), seed=3, **HELD),
                             cell(throughputs=(600, 605, 598), seed=4, **PER_CALL),
                             cell(api="queue", producer="held", transport="memory"),
                             cell(throughputs=(150,), api="kombu", producer="new-connection",
                                  transport="memory")))
    pairs = {p.key: p for p in compare.compare_runs(base, new, ["throughput_per_s"])}
    held = pairs[results.cell_key("publish", HELD)]
    assert held.comparisons[0].words == "2.00x faster"
    per_call = pairs[results.cell_key("publish", PER_CALL)]
    assert per_call.comparisons[0].words == "no significant difference"
    new_conn = pairs["publish[api=kombu,producer=new-connection,transport=memory]"]
    assert new_conn.comparisons[0].words == "not enough repeats to judge"
    assert "skipped in BASE (redis unreachable)" in pairs[
        "publish[api=kombu,producer=held,transport=redis]"].note
    assert pairs["publish[api=queue,producer=held,transport=memory]"].note == "only in NEW"
    text = compare.format_runs(list(pairs.values()), "a.json", "b.json")
    assert ("1 faster, 0 slower, 1 no significant difference, 1 not enough repeats to judge; "
            "2 cells not compared") in text
    assert "beyond ±30% (--noise)" in text
    assert "not enough repeats to judge (1 vs 1; ratio 0.50x, 2.00x slower as measured)" in text


def test_a_run_compared_with_itself_says_nothing_changed(tmp_path):
    cells = [cell(throughputs=tuple(1000 * (1 + 0.1 * np.sin(i + k)) for k in range(5)),
                  seed=i, api="kombu", producer=f"p{i}", transport="memory")
             for i in range(6)]
    run = results.load(write(tmp_path / "r.json", *cells))
    pairs = compare.compare_runs(run, run)
    every = compare.every_comparison(pairs)
    assert every and all(c.significant is False for c in every)
    assert "the median row is 1.00x, unchanged (18 rows)" in compare.format_runs(pairs, "r", "r")


def test_the_run_as_a_whole_is_named_when_it_moved(tmp_path):
    base = [cell(throughputs=(1000, 1010, 990), seed=i, api="kombu", producer=f"p{i}",
                 transport="memory") for i in range(5)]
    new = [cell(throughputs=(1500, 1515, 1485), seed=i, api="kombu", producer=f"p{i}",
                transport="memory") for i in range(5)]
    a = results.load(write(tmp_path / "a.json", *base))
    b = results.load(write(tmp_path / "b.json", *new))
    text = compare.format_runs(compare.compare_runs(a, b, ["throughput_per_s"]), "a", "b")
    assert "the median row is 1.50x faster (5 rows)" in text
    assert "It exceeds ±30%: read the verdicts as possibly drift." in text


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
    assert rows["per-call"].ratio == pytest.approx(0.61)      # median of 0.61, 0.594, 0.626
    assert rows["per-call"].words == "1.64x slower"
    assert "3 paired rounds" in rows["per-call"].detail
    assert rows["new-connection"].ratio == pytest.approx(0.27)
    text = compare.format_within(groups, "r.json")
    assert "0.61x of held" in text and "producer=per-call vs held" in text
    assert "paired by round" in text

    by_transport = compare.compare_within(run, "transport", metrics=["throughput_per_s"])
    verdict = by_transport[0].rows[0][1][0]
    assert verdict.words == "not enough repeats to judge"    # 1 repeat of redis
    assert verdict.detail == "1 paired round; ratio 1.70x, 1.70x faster as measured"

    with pytest.raises(Exception, match="no cell has a param 'nope'"):
        compare.compare_within(run, "nope")
    with pytest.raises(Exception, match="producer takes held, per-call, new-connection"):
        compare.compare_within(run, "producer", reference="batch")


def test_compare_within_pairs_repeats_by_round(tmp_path):
    # the same rounds written in a different order: paired by round, the ratio is exact
    held = with_rounds(cell(throughputs=(1000, 2000, 1500), **HELD), [0, 1, 2])
    per_call = with_rounds(cell(throughputs=(750, 500, 1000), seed=1, **PER_CALL), [2, 0, 1])
    run = results.load(write(tmp_path / "r.json", held, per_call))
    row = compare.compare_within(run, "producer", metrics=["throughput_per_s"])[0].rows[0]
    c = row[1][0]
    assert c.ratio == pytest.approx(0.5) and c.significant and c.words == "2.00x slower"
    assert "95% CI 2.00-2.00" in c.detail


def test_failing_rows():
    slower = compare.judge("throughput_per_s", 1000, 500, [1000] * 3, [500] * 3)
    faster = compare.judge("publish_us.p50", 100, 50, [100] * 3, [50] * 3)
    higher = compare.judge("queue_depth", 10, 30, [10] * 3, [30] * 3)
    few = compare.judge("throughput_per_s", 1000, 100, [1000], [100])
    rows = [slower, faster, higher, few]
    assert compare.failing(rows, "slower") == [slower]
    assert compare.failing(rows, "faster") == [faster]
    assert compare.failing(rows, "any") == [slower, faster, higher]
    with pytest.raises(ValueError):
        compare.failing(rows, "worse")


def test_cli_compare_two_files(tmp_path, cli_run):
    write(tmp_path / "a.json", cell(throughputs=(1000, 1010, 990), **HELD))
    write(tmp_path / "b.json", cell(throughputs=(1500, 1490, 1510), seed=5, **HELD))
    res = cli_run("compare", "a.json", "b.json", "--metric", "throughput_per_s")
    assert res.returncode == 0, res.stderr
    assert "publish[api=kombu,producer=held,transport=memory]" in res.stdout
    assert "1.50x faster (95% CI 1.47-1.53, 3 vs 3 repeats, p<0.0001)" in res.stdout


def test_cli_compare_fail_on(tmp_path, cli_run):
    write(tmp_path / "a.json", cell(throughputs=(1000, 1010, 990), **HELD))
    write(tmp_path / "b.json", cell(throughputs=(500, 505, 495), seed=5, **HELD))
    write(tmp_path / "one.json", cell(throughputs=(300,), seed=5, **HELD))
    args = ("--metric", "throughput_per_s", "--fail-on")
    res = cli_run("compare", "a.json", "b.json", *args, "slower")
    assert res.returncode == 1, res.stderr
    assert "2.00x slower" in res.stdout
    assert "--fail-on slower: 1 row(s) significantly slower" in res.stdout
    assert cli_run("compare", "a.json", "b.json", *args, "faster").returncode == 0
    assert cli_run("compare", "a.json", "b.json", *args, "any").returncode == 1
    assert cli_run("compare", "b.json", "a.json", *args, "slower").returncode == 0
    # one repeat: no verdict, so nothing to fail on
    res = cli_run("compare", "a.json", "one.json", *args, "slower")
    assert res.returncode == 0 and "not enough repeats to judge" in res.stdout
    assert "--fail-on" in cli_run("compare", "--help").stdout


def test_cli_compare_by_and_two_cells(tmp_path, cli_run):
    write(tmp_path / "r.json", cell(throughputs=(1000, 1010, 990), **HELD),
          cell(throughputs=(500, 505, 495), seed=1, **PER_CALL))
    res = cli_run("compare", "r.json", "--by", "producer", "--metric", "throughput_per_s")
    assert res.returncode == 0, res.stderr
    assert "2.00x slower (0.50x of held; 95% CI 2.00-2.00, 3 paired rounds" in res.stdout
    res = cli_run("compare", "r.json", "--cell", "publish[producer=held]",
                  "--cell", "publish[producer=per-call]", "--metric", "throughput_per_s",
                  "--fail-on", "slower")
    assert res.returncode == 1, res.stderr
    assert "2.00x slower (95% CI 2.00-2.00, 3 paired rounds" in res.stdout
    assert "paired by round" in res.stdout


@pytest.mark.parametrize("args, words", [
    (["compare", "r.json"], "compare needs BASE NEW"),
    (["compare", "r.json", "missing.json"], "missing.json"),
    (["compare", "r.json", "--by", "nope"], "no cell has a param 'nope'"),
    (["compare", "r.json", "--cell", "publish[api=kombu]", "--cell", "publish[x=y]"],
     "matches 2 cells"),
    (["compare", "r.json", "--cell", "garbage"], "not a cell selector"),
    (["compare", "r.json", "r.json", "--by", "producer"], "ONE run"),
    (["compare", "r.json", "r.json", "--fail-on", "worse"], "--fail-on"),
])
def test_cli_compare_bad_input(tmp_path, cli_run, args, words):
    write(tmp_path / "r.json", cell(**HELD), cell(**PER_CALL))
    res = cli_run(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in res.stderr
