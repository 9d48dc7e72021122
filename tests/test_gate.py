"""gate: verdicts from hand-built results files (3 rounds each, so every ratio has an
interval), undecided rules, whole-run rules, versions; bad specs are one line and exit 2."""
import textwrap
from pathlib import Path

import pytest

from bench import gate, gate_spec, results

from factory import cell, write

ROOT = Path(__file__).resolve().parents[1]
HELD = dict(api="kombu", producer="held", transport="memory")
ENV = {"python": "3", "celery": "5.7", "kombu": "5.7"}   # what factory.write records


def rounds(x, spread=0.01):
    """Three rounds around ``x``, a little apart (a machine is never exactly steady)."""
    return (x * (1 - spread), x, x * (1 + spread))


def _run(per_call=600.0, held=1000.0, p99_us=100.0, redis="skipped"):
    return [
        cell(throughputs=rounds(held), latency_us=p99_us, **HELD),
        cell(throughputs=rounds(per_call), seed=1, api="kombu", producer="per-call",
             transport="memory"),
        cell(throughputs=rounds(40_000.0), seed=2, api="queue", producer="held",
             transport="memory"),
        cell(status=redis, reason="redis unreachable", api="kombu", producer="held",
             transport="redis"),
    ]


def _spec(tmp_path, body, name="gates.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return gate_spec.load_spec(path)


RATIO = """
    [[gate]]
    name = "per-call vs held"
    check = "publish[api=kombu,producer=per-call,transport=memory] throughput_per_s / [producer=held] between 0.4 and 0.9"
"""


def _verdicts(tmp_path, spec_body, cells, baseline=None, missing=None):
    spec = _spec(tmp_path, spec_body)
    run = results.load(write(tmp_path / "run.json", *cells))
    return gate.run_gates(spec, run, baseline, missing)


def test_ratio_rule_passes_and_fails(tmp_path):
    (ok,) = _verdicts(tmp_path, RATIO, _run(per_call=600))
    assert ok.status == "PASS" and ok.text.startswith("0.6 is between 0.4 and 0.9 (95% interval")
    assert "publish[api=kombu,producer=held,transport=memory] throughput_per_s 1,000/s" \
        in ok.values[0]
    (low,) = _verdicts(tmp_path, RATIO, _run(per_call=300))
    assert low.status == "FAIL" and low.text.startswith("0.3 is outside 0.4 and 0.9")
    (high,) = _verdicts(tmp_path, RATIO, _run(per_call=950))
    assert high.status == "FAIL" and "outside" in high.text


def test_explicit_denominator_and_threshold(tmp_path):
    body = """
        [[gate]]
        check = "publish[api=kombu,producer=held,transport=memory] throughput_per_s / publish[api=queue] >= 0.02"
        [[gate]]
        check = "publish[api=kombu,transport=memory] lost == 0"
    """
    verdicts = _verdicts(tmp_path, body, _run())
    assert [v.status for v in verdicts] == ["PASS", "PASS", "PASS"]   # lost: one per cell
    assert verdicts[0].text.startswith("0.025 is at least 0.02")
    verdicts = _verdicts(tmp_path, body.replace(">= 0.02", ">= 0.05"), _run())
    assert verdicts[0].status == "FAIL" and verdicts[0].text.startswith(
        "0.025 is not at least 0.05")


def test_rule_applies_to_every_matching_cell_against_its_own_reference(tmp_path):
    cells = _run() + [cell(throughputs=rounds(2000.0), seed=4, api="kombu", producer="held",
                           transport="amqp"),
                      cell(throughputs=rounds(100.0), seed=5, api="kombu", producer="per-call",
                           transport="amqp")]
    body = """
        [[gate]]
        check = "publish[producer=per-call] throughput_per_s / [producer=held] >= 0.4"
    """
    verdicts = _verdicts(tmp_path, body, cells)
    assert [(v.status, v.text.split(" (")[0]) for v in verdicts] == [
        ("PASS", "0.6 is at least 0.4"), ("FAIL", "0.05 is not at least 0.4")]


def test_ambiguous_explicit_denominator_fails_and_names_the_params(tmp_path):
    body = """
        [[gate]]
        check = "publish[api=queue] throughput_per_s / publish[api=kombu] >= 1"
    """
    (v,) = _verdicts(tmp_path, body, _run())
    assert v.status == "FAIL" and "matches 3 cells" in v.text and "producer, transport" in v.text


def test_not_measured_warns_by_default_and_can_fail(tmp_path):
    body = """
        [[gate]]
        name = "redis"
        check = "publish[api=kombu,producer=held,transport=redis] throughput_per_s / [transport=memory] >= 0.01"
        [[gate]]
        name = "unix"
        check = "publish[transport=unix] throughput_per_s / [transport=memory] >= 0.75"
    """
    verdicts = _verdicts(tmp_path, body, _run())
    assert [v.status for v in verdicts] == ["WARN", "WARN"]
    assert "was skipped in the run (redis unreachable)" in verdicts[0].text
    assert "no cell matches publish[transport=unix]" in verdicts[1].text
    assert gate.summary(verdicts) == "gate checks: 0 pass, 0 fail, 2 not measured (warned)"
    verdicts = _verdicts(tmp_path, body, _run(), missing="fail")
    assert [v.status for v in verdicts] == ["FAIL", "FAIL"]
    verdicts = _verdicts(tmp_path, 'missing = "fail"\n' + textwrap.dedent(body), _run())
    assert [v.status for v in verdicts] == ["FAIL", "FAIL"]


def test_ignored_not_measured_and_the_compact_report(tmp_path):
    body = '[[gate]]\ncheck = "publish[] lost == 0"\nmissing = "ignore"\n'
    verdicts = _verdicts(tmp_path, body, _run())
    assert [v.status for v in verdicts] == ["PASS", "PASS", "PASS", "SKIP"]
    assert gate.report_lines(verdicts) == ["PASS  publish[] lost == 0: 3 cells pass (values 0)"]
    verbose = gate.report_lines(verdicts, verbose=True)
    assert len(verbose) == 7 and verbose[-1].startswith("SKIP  ")   # 3 x (verdict, values) + 1
    assert gate.summary(verdicts) == "gate checks: 3 pass, 0 fail, 1 not measured (ignored)"


def test_a_failed_cell_fails_its_rules(tmp_path):
    body = """
        [[gate]]
        check = "publish[api=kombu,producer=held,transport=redis] throughput_per_s >= 1"
    """
    (v,) = _verdicts(tmp_path, body, _run(redis="failed"))
    assert v.status == "FAIL" and "failed in the run" in v.text


def test_baseline_rules_with_tolerance(tmp_path):
    base = results.Run(ENV, [cell(throughputs=rounds(1000.0), latency_us=100, **HELD)])
    body = """
        [[gate]]
        check = "publish[api=kombu,producer=held,transport=memory] publish_us.p99 <= baseline +50%"
        [[gate]]
        check = "publish[api=kombu,producer=held,transport=memory] throughput_per_s >= baseline -40%"
    """
    verdicts = _verdicts(tmp_path, body, _run(held=700, p99_us=140), baseline=base)
    assert [v.status for v in verdicts] == ["PASS", "PASS"]
    assert "(baseline 1,000 -40%)" in verdicts[1].text and verdicts[1].values[1].startswith(
        "baseline: publish[")
    verdicts = _verdicts(tmp_path, body, _run(held=500, p99_us=200), baseline=base)
    assert [v.status for v in verdicts] == ["FAIL", "FAIL"]
    verdicts = _verdicts(tmp_path, body, _run())
    assert verdicts[0].status == "WARN" and "no baseline" in verdicts[0].text


@pytest.mark.parametrize("check, words", [
    ("publish throughput_per_s >= 1", "expected a cell selector"),
    ("publish[api=kombu] >= 1", "expected a metric name"),
    ("publish[api=kombu] throughput_per_s", "expected 'between' or one of"),
    ("publish[api=kombu] throughput_per_s between 3", "expected 'and'"),
    ("publish[api=kombu] throughput_per_s between 3 and 1", "LOW is above HIGH"),
    ("publish[api=kombu] throughput_per_s >= fast", "expected a number or 'baseline'"),
    ("publish[api=kombu] throughput_per_s >= 1 please", "unexpected 'please'"),
    ("[api=kombu] throughput_per_s >= 1", "needs its scenario"),
    ("publish[api] throughput_per_s >= 1", "is not key=value"),
    ("publish[a=b] x ~ 1", "cannot read"),
])
def test_bad_checks(tmp_path, check, words):
    with pytest.raises(gate_spec.SpecError) as err:
        _spec(tmp_path, f'[[gate]]\ncheck = "{check}"\n')
    assert words in str(err.value) and "rule 1" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("body, words", [
    ("[[gate]\n", "not valid TOML"),
    ("missing = \"maybe\"\n[[gate]]\ncheck = \"a[] x >= 1\"\n", "missing = 'maybe'"),
    ("colour = 1\n", "unknown key 'colour'"),
    ("missing = \"warn\"\n", "no rules"),
    ("[[gate]]\nname = \"x\"\n", "needs check ="),
    ("[[gate]]\ncheck = \"a[] x >= 1\"\nwhy_not = 1\n", "unknown key 'why_not'"),
    ("[[gate]]\ncheck = \"a[] x >= 1\"\nexact = 1\n", "exact must be true or false"),
])
def test_bad_spec_files(tmp_path, body, words):
    with pytest.raises(gate_spec.SpecError) as err:
        _spec(tmp_path, body)
    assert words in str(err.value)


def test_json_spec(tmp_path):
    path = tmp_path / "gates.json"
    path.write_text('{"gate": [{"check": "publish[api=queue] throughput_per_s >= 1000"}]}')
    spec = gate_spec.load_spec(path)
    run = results.load(write(tmp_path / "run.json", *_run()))
    assert [v.status for v in gate.run_gates(spec, run)] == ["PASS"]


def test_committed_spec_parses():
    spec = gate_spec.load_spec(ROOT / "results" / "baselines" / "gates.toml")
    assert spec.rules and all(r.check for r in spec.rules)


# --------------------------------------------------------------------------- the CLI
def test_cli_gate_exit_codes(tmp_path, cli_run):
    (tmp_path / "gates.toml").write_text(textwrap.dedent(RATIO))
    write(tmp_path / "good.json", *_run(per_call=600))
    write(tmp_path / "bad.json", *_run(per_call=100))
    res = cli_run("gate", "good.json", "--spec", "gates.toml", "--budget", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS  per-call vs held: 0.6 is between 0.4 and 0.9" in res.stdout
    assert "gate checks: 1 pass, 0 fail" in res.stdout
    res = cli_run("gate", "bad.json", "--spec", "gates.toml", "--budget", "0")
    assert res.returncode == 1
    assert "FAIL  per-call vs held: 0.1 is outside 0.4 and 0.9" in res.stdout


def test_cli_gate_default_spec_is_found_from_the_repo(tmp_path, cli_run):
    write(tmp_path / "run.json", *_run())
    res = cli_run("gate", "run.json", "--budget", "0", "--across-versions")
    assert res.returncode in (0, 1), res.stderr
    assert "gates " in res.stdout and "baselines/gates.toml" in res.stdout


def test_cli_write_baseline_then_gate(tmp_path, cli_run):
    (tmp_path / "gates.toml").write_text(textwrap.dedent("""
        baseline = "base.json"
        [[gate]]
        check = "publish[producer=per-call] throughput_per_s / [producer=held] >= baseline -20%"
    """))
    write(tmp_path / "run.json", *_run())
    res = cli_run("gate", "run.json", "--spec", "gates.toml", "--write-baseline")
    assert res.returncode == 0, res.stderr
    assert "wrote 2 cells" in res.stdout
    assert len(results.load(tmp_path / "base.json").cells) == 2
    res = cli_run("gate", "run.json", "--spec", "gates.toml")
    assert res.returncode == 0 and "PASS" in res.stdout, res.stdout + res.stderr
    write(tmp_path / "slow.json", *_run(per_call=300))
    assert cli_run("gate", "slow.json", "--spec", "gates.toml").returncode == 1


@pytest.mark.parametrize("args, words", [
    (["gate", "missing.json", "--spec", "gates.toml"], "missing.json"),
    (["gate", "run.json", "--spec", "nope.toml"], "nope.toml"),
    (["gate", "run.json", "--spec", "broken.toml"], "expected 'and'"),
    (["gate", "run.json", "--spec", "gates.toml", "--missing", "maybe"], "--missing"),
    (["gate", "notjson.json", "--spec", "gates.toml"], "not a celery-bench results file"),
])
def test_cli_gate_bad_input_is_one_line_exit_2(tmp_path, cli_run, args, words):
    (tmp_path / "gates.toml").write_text(textwrap.dedent(RATIO))
    (tmp_path / "broken.toml").write_text('[[gate]]\ncheck = "publish[a=b] x between 1"\n')
    (tmp_path / "notjson.json").write_text("{")
    write(tmp_path / "run.json", *_run())
    res = cli_run(*args)
    assert res.returncode == 2, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in res.stderr


# --------------------------------------------------------------------------- undecided
def test_one_round_makes_no_interval_so_the_rule_is_inconclusive(tmp_path):
    cells = [cell(throughputs=(1000.0,), **HELD),
             cell(throughputs=(600.0,), seed=1, api="kombu", producer="per-call",
                  transport="memory")]
    (v,) = _verdicts(tmp_path, RATIO, cells)
    assert v.status == "INCONCLUSIVE" and v.shown == "WARN"
    assert "1 round: not enough for an interval" in v.text
    assert set(v.cells) == {c.key for c in cells}           # what a re-measure would run
    assert gate.summary([v]) == "gate checks: 0 pass, 0 fail, 1 inconclusive (warned)"


def test_an_interval_across_the_bound_is_inconclusive_and_wholly_past_it_fails(tmp_path):
    body = """
        [[gate]]
        check = "publish[api=kombu,producer=per-call,transport=memory] throughput_per_s / [producer=held] >= 0.55"
    """
    noisy = [cell(throughputs=(1000.0, 1000.0, 1000.0), **HELD),
             cell(throughputs=(450.0, 600.0, 700.0), seed=1, api="kombu",
                  producer="per-call", transport="memory")]
    (v,) = _verdicts(tmp_path, body, noisy)
    assert v.status == "INCONCLUSIVE" and "may not be at least 0.55" in v.text
    (v,) = _verdicts(tmp_path, body, _run(per_call=400))
    assert v.status == "FAIL"       # 0.396-0.404: wholly below


def test_exact_rules_judge_the_value_even_from_one_round(tmp_path):
    body = """
        [[gate]]
        check = "publish[api=kombu,producer=held,transport=memory] throughput_per_s >= 900"
        exact = true
    """
    (v,) = _verdicts(tmp_path, body, [cell(throughputs=(1000.0,), **HELD)])
    assert v.status == "PASS" and "interval" not in v.text


def test_no_failed_cells_and_no_lost_messages(tmp_path):
    body = """
        [[gate]]
        check = "no failed cells"
        [[gate]]
        check = "no lost messages"
    """
    verdicts = _verdicts(tmp_path, body, _run())
    assert [v.status for v in verdicts] == ["PASS", "PASS"]
    lossy = cell(throughputs=rounds(10.0), seed=6, api="kombu", producer="held",
                 transport="filesystem")
    lossy.metrics["lost"], lossy.status = 3, "lost"
    other = cell(throughputs=rounds(10.0), seed=7, api="kombu", producer="held",
                 transport="unix")
    other.metrics["lost"], other.status = 1, "lost"
    lossy.exempt = "kombu's filesystem consumer reads without the writer's lock"
    verdicts = _verdicts(tmp_path, body, _run(redis="failed") + [lossy, other])
    assert [v.status for v in verdicts] == ["FAIL", "FAIL"]
    assert "transport=redis" in verdicts[0].text and "failed" in verdicts[0].text
    assert "transport=unix" in verdicts[1].text and "lost 1" in verdicts[1].text
    verdicts = _verdicts(tmp_path, body, _run() + [lossy])
    assert verdicts[1].status == "PASS" and "filesystem" in verdicts[1].text


BASELINE_RULE = """
    baseline = "base.json"
    [[gate]]
    check = "publish[producer=per-call] throughput_per_s / [producer=held] >= baseline -20%"
"""


def test_a_baseline_of_other_versions_warns_unless_asked(tmp_path, cli_run):
    (tmp_path / "gates.toml").write_text(textwrap.dedent(BASELINE_RULE))
    write(tmp_path / "base.json", *_run(),
          environment={"python": "3", "celery": "5.7", "kombu": "5.6.9"})
    write(tmp_path / "slow.json", *_run(per_call=100))
    res = cli_run("gate", "slow.json", "--spec", "gates.toml", "--budget", "0")
    assert res.returncode == 0, res.stdout + res.stderr     # it decides nothing
    assert "WARN" in res.stdout and "not comparable" in res.stdout
    assert "kombu 5.6.9 (baseline) vs 5.7" in res.stdout
    res = cli_run("gate", "slow.json", "--spec", "gates.toml", "--budget", "0",
                  "--across-versions")
    assert res.returncode == 1 and "FAIL" in res.stdout, res.stdout + res.stderr


def test_a_baseline_from_another_cpu_model_decides_nothing(tmp_path, cli_run):
    """Issue 15: Intel's calibrated CPU per message does not carry over to AMD. A rule
    against a stored baseline from another CPU model warns in one line, whatever it reads,
    and --across-versions does not lift it."""
    (tmp_path / "gates.toml").write_text(textwrap.dedent(BASELINE_RULE))
    env = {"python": "3", "celery": "5.7", "kombu": "5.7"}
    write(tmp_path / "base.json", *_run(), environment={**env, "cpu_model": "Intel(R) Xeon(R) Processor"})
    write(tmp_path / "slow.json", *_run(per_call=100), environment={**env, "cpu_model": "AMD EPYC"})
    for extra in ((), ("--across-versions",)):
        res = cli_run("gate", "slow.json", "--spec", "gates.toml", "--budget", "0", *extra)
        assert res.returncode == 0, res.stdout + res.stderr
        warn = [ln for ln in res.stdout.splitlines() if ln.startswith("WARN")]
        assert warn and "not comparable: baseline from Intel(R) Xeon(R) Processor, this is AMD EPYC" in warn[0]
    write(tmp_path / "base.json", *_run(), environment={**env, "cpu_model": "AMD EPYC"})
    res = cli_run("gate", "slow.json", "--spec", "gates.toml", "--budget", "0")
    assert res.returncode == 1 and "FAIL" in res.stdout, res.stdout


def test_the_gate_re_measures_undecided_cells_and_writes_them_back(tmp_path, cli_run):
    """A real quick run with one round: the ratio has no interval, so the gate runs
    three more rounds of just those two cells and decides."""
    res = cli_run("run", "publish", "--quick", "--repeat", "1", "--only", "transport=memory",
                  "--only", "api=kombu", "--only", "producer=held", "--duration", "0.1",
                  "--warmup", "0.02", "--out", "r.json", "--quiet")
    assert res.returncode == 0, res.stderr
    res = cli_run("run", "publish", "--quick", "--repeat", "1", "--only", "api=calibration",
                  "--duration", "0.1", "--warmup", "0.02", "--out", "c.json", "--quiet")
    assert res.returncode == 0, res.stderr
    merged = results.load(tmp_path / "r.json")
    merged.cells += results.load(tmp_path / "c.json").cells
    results.dump(merged, tmp_path / "r.json")
    (tmp_path / "gates.toml").write_text(textwrap.dedent("""
        [[gate]]
        check = "publish[api=kombu,producer=held,transport=memory] cpu_us_per_msg / publish[api=calibration] between 0.001 and 1000"
    """))
    res = cli_run("gate", "r.json", "--spec", "gates.toml", "--budget", "120")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "re-measuring 2 cell(s)" in res.stdout and "PASS" in res.stdout
    run = results.load(tmp_path / "r.json")
    for c in run.cells:
        assert [r["round"] for r in c.repeats] == [0, 1, 2, 3]
        assert c.histograms["publish"]["count"] == sum(
            r["histograms"]["publish"]["count"] for r in c.repeats)
