"""gate: verdicts from hand-built results files; bad specs are one line and exit 2."""
import textwrap
from pathlib import Path

import pytest

from bench import gate, results

from factory import cell, write

ROOT = Path(__file__).resolve().parents[1]
HELD = dict(api="kombu", producer="held", transport="memory")


def _run(per_call=600.0, held=1000.0, p99_us=100.0, redis="skipped"):
    return [
        cell(throughputs=(held,), latency_us=p99_us, **HELD),
        cell(throughputs=(per_call,), seed=1, api="kombu", producer="per-call", transport="memory"),
        cell(throughputs=(40_000.0,), seed=2, api="queue", producer="held", transport="memory"),
        cell(status=redis, reason="redis unreachable", api="kombu", producer="held",
             transport="redis"),
    ]


def _spec(tmp_path, body, name="gates.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return gate.load_spec(path)


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
    assert ok.status == "PASS" and ok.text == "0.6 is between 0.4 and 0.9"
    assert "publish[api=kombu,producer=held,transport=memory] throughput_per_s 1,000/s" \
        in ok.values[0]
    (low,) = _verdicts(tmp_path, RATIO, _run(per_call=300))
    assert low.status == "FAIL" and low.text == "0.3 is below the range 0.4 and 0.9"
    (high,) = _verdicts(tmp_path, RATIO, _run(per_call=950))
    assert high.status == "FAIL" and "above" in high.text


def test_explicit_denominator_and_threshold(tmp_path):
    body = """
        [[gate]]
        check = "publish[api=kombu,producer=held,transport=memory] throughput_per_s / publish[api=queue] >= 0.02"
        [[gate]]
        check = "publish[api=kombu,transport=memory] lost == 0"
    """
    verdicts = _verdicts(tmp_path, body, _run())
    assert [v.status for v in verdicts] == ["PASS", "PASS", "PASS"]   # lost: one per cell
    assert verdicts[0].text == "0.025 is at least 0.02"
    verdicts = _verdicts(tmp_path, body.replace(">= 0.02", ">= 0.05"), _run())
    assert verdicts[0].status == "FAIL" and verdicts[0].text == "0.025 is not at least 0.05"


def test_rule_applies_to_every_matching_cell_against_its_own_reference(tmp_path):
    cells = _run() + [cell(throughputs=(2000.0,), seed=4, api="kombu", producer="held",
                           transport="amqp"),
                      cell(throughputs=(100.0,), seed=5, api="kombu", producer="per-call",
                           transport="amqp")]
    body = """
        [[gate]]
        check = "publish[producer=per-call] throughput_per_s / [producer=held] >= 0.4"
    """
    verdicts = _verdicts(tmp_path, body, cells)
    assert [(v.status, v.text) for v in verdicts] == [
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
    base = results.Run({}, [cell(throughputs=(1000.0,), latency_us=100, **HELD)])
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
    with pytest.raises(gate.SpecError) as err:
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
])
def test_bad_spec_files(tmp_path, body, words):
    with pytest.raises(gate.SpecError) as err:
        _spec(tmp_path, body)
    assert words in str(err.value)


def test_json_spec(tmp_path):
    path = tmp_path / "gates.json"
    path.write_text('{"gate": [{"check": "publish[api=queue] throughput_per_s >= 1000"}]}')
    spec = gate.load_spec(path)
    run = results.load(write(tmp_path / "run.json", *_run()))
    assert [v.status for v in gate.run_gates(spec, run)] == ["PASS"]


def test_committed_spec_parses():
    spec = gate.load_spec(ROOT / "results" / "baselines" / "gates.toml")
    assert spec.rules and all(r.check for r in spec.rules)


# --------------------------------------------------------------------------- the CLI
def test_cli_gate_exit_codes(tmp_path, cli_run):
    (tmp_path / "gates.toml").write_text(textwrap.dedent(RATIO))
    write(tmp_path / "good.json", *_run(per_call=600))
    write(tmp_path / "bad.json", *_run(per_call=100))
    res = cli_run("gate", "good.json", "--spec", "gates.toml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS  per-call vs held: 0.6 is between 0.4 and 0.9" in res.stdout
    assert "gate checks: 1 pass, 0 fail" in res.stdout
    res = cli_run("gate", "bad.json", "--spec", "gates.toml")
    assert res.returncode == 1
    assert "FAIL  per-call vs held: 0.1 is below the range" in res.stdout


def test_cli_gate_default_spec_is_found_from_the_repo(tmp_path, cli_run):
    write(tmp_path / "run.json", *_run())
    res = cli_run("gate", "run.json")
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
