"""Variants (bench.variants): bad specs exit 2 before measuring; a slowdown injected into
variant B only (a sitecustomize on B's PYTHONPATH) is called slower by `compare --by
variant` and fails the gate; the same runs without it (A/A) pass. Verdicts and exit codes
only, never a duration."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "bench"]


def bench(*args, timeout=600, env=None):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT), env=full)


@pytest.mark.parametrize("spec, words", [
    ("nosuch:x", "unknown kind 'nosuch'"),
    ("git:no-such-revision-xyz", "no commit 'no-such-revision-xyz'"),
    ("python:/no/such/python", "is not an executable interpreter"),
    ("conf:not_a_setting=1", "is not a Celery setting"),
    ("env:JUSTAKEY", "is not KEY=VALUE"),
])
def test_bad_spec_is_one_line_exit_2(spec, words, tmp_path):
    out = tmp_path / "r.json"
    res = bench("ab", "here", spec, "publish", "--out", str(out), timeout=120)
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("celery-bench: error")]
    assert len(errors) == 1 and words in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()   # nothing measured, nothing written


def test_interpreter_without_celery_is_refused(tmp_path):
    base = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([str(base), "-c", "import celery"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{base} imports celery: no interpreter without it here")
    res = bench("ab", "here", f"python:{base}", "publish", "--out", str(tmp_path / "r.json"),
                timeout=120)
    assert res.returncode == 2
    assert "cannot" in res.stderr or "No module named 'celery'" in res.stderr


def test_unsatisfiable_pin_is_refused(tmp_path):
    res = bench("ab", "here", "pip:celery==0.0.0.1", "publish",
                "--out", str(tmp_path / "r.json"), timeout=300,
                env={"CELERY_BENCH_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2
    assert "pip install celery==0.0.0.1 failed" in res.stderr


def _sensitivity():
    """tools/ab_sensitivity.py: the publish slowdown's sitecustomize and its sizing."""
    spec = importlib.util.spec_from_file_location("ab_sensitivity",
                                                  ROOT / "tools" / "ab_sensitivity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SLOW_JOIN = """
import time
from celery.backends import redis

_orig = redis.ResultConsumer.drain_events


def drain_events(self, timeout=None):
    time.sleep(0.002)   # 2 ms per poll of a join: time, almost no CPU
    return _orig(self, timeout)


redis.ResultConsumer.drain_events = drain_events
"""


def _patch(tmp_path, name, code) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    return folder


PUBLISH_CELL = ["publish", "--only", "api=kombu", "--only", "producer=held",
                "--only", "retry=no", "--transport", "memory", "--only", "serializer=json"]


def _rows(out: Path, metric: str, *extra):
    res = bench("compare", str(out), "--by", "variant", "--metric", metric, *extra)
    return res, [ln for ln in res.stdout.splitlines() if ln.strip().startswith(metric)]


def test_slower_publish_in_b_only_is_called_slower_and_aa_is_not(tmp_path):
    sens = _sensitivity()
    patch = _patch(tmp_path, "slow", sens.SITECUSTOMIZE)
    # 50%: a clear effect, so the test holds on a shared 2 vCPU machine (at load ~10 a
    # true 25% was missed once in 8 rounds); how often ~10% is called: docs/ab.md
    env = {"CB_SENS_EXTRA_S": repr(sens.spin_for(0.50)[1])}
    slow, same = tmp_path / "slow.json", tmp_path / "same.json"
    common = ["--quick", "--repeat", "8", "--duration", "1", "--quiet", "--no-html"]
    res = bench("ab", "here", f"env:PYTHONPATH={patch}", *PUBLISH_CELL, *common,
                "--out", str(slow), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    res = bench("ab", "here", "env:CB_TEST_SAME=1", *PUBLISH_CELL, *common,
                "--out", str(same), env=env)
    assert res.returncode == 0, res.stderr[-2000:]

    run = json.loads(slow.read_text())
    assert {c["params"]["variant"] for c in run["cells"]} == {"A", "B"}
    assert run["environment"]["variants"]["B"]["spec"] == f"env:PYTHONPATH={patch}"
    assert all(len(c["repeats"]) == 8 for c in run["cells"])

    # the CPU cost per message in calibration units decides (docs/ab.md: the wall-clock
    # rate of a 1 s round swings 10-30% at this load, and a 1.36x slower rate went
    # uncalled here at load ~6); every default row is judged for the exit code
    res, rows = _rows(slow, "cpu_vs_calibration", "--fail-on", "slower")
    assert res.returncode == 1, res.stdout
    assert len(rows) == 1 and "slower" in rows[0] and "paired rounds" in rows[0], res.stdout
    res = bench("compare", str(slow), "--by", "variant", "--fail-on", "slower")
    assert res.returncode == 1, res.stdout
    # A/A: the rate and both CPU costs (the latency tails, p99, carry a per-process offset
    # that one A/A gate run of five called, docs/ab.md; they do not decide here)
    res = bench("compare", str(same), "--by", "variant", "--fail-on", "slower",
                "--metric", "throughput_per_s", "--metric", "cpu_us_per_msg",
                "--metric", "cpu_vs_calibration")
    assert res.returncode == 0, res.stdout
    rows = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("cpu_vs_calibration")]
    assert len(rows) == 1 and "no significant difference" in rows[0], res.stdout


def _gate_join() -> str:
    """A gate spec of CI's own join rule (results/baselines/gates-ab.toml, its bound
    included) and "no failed cells": the proof covers the rule CI runs."""
    import tomllib

    rules = tomllib.loads((ROOT / "results" / "baselines" / "gates-ab.toml").read_text())
    join = [g for g in rules["gate"] if g["check"].startswith("join[")]
    assert len(join) == 1, join
    return (f'missing = "fail"\n\n[[gate]]\nname = "no cell failed"\n'
            f'check = "no failed cells"\n\n[[gate]]\nname = {json.dumps(join[0]["name"])}\n'
            f'check = {json.dumps(join[0]["check"])}\n')


@pytest.mark.redis
def test_join_sleep_in_head_fails_the_gate_and_aa_passes(tmp_path, need):
    need("redis")
    spec = tmp_path / "gates.toml"
    spec.write_text(_gate_join())
    patch = _patch(tmp_path, "slowjoin", SLOW_JOIN)
    args = ["gate", "--against", "HEAD", "--spec", str(spec), "--rounds", "5",
            "--budget", "60"]
    env = {"CELERY_BENCH_CACHE": str(tmp_path / "cache")}
    slow = bench(*args, str(tmp_path / "slow.json"), "--head", f"env:PYTHONPATH={patch}",
                 env=env)
    assert slow.returncode == 1, slow.stdout + slow.stderr[-2000:]
    assert "FAIL  join over Redis" in slow.stdout, slow.stdout
    same = bench(*args, str(tmp_path / "same.json"), env=env)
    assert same.returncode == 0, same.stdout + same.stderr[-2000:]
    assert "FAIL" not in same.stdout


# Every scenario and the rate options run with two variants: one narrow cell each, one
# round (what is checked is that both variants measure it, not a verdict).
EVERY_SCENARIO = {
    "publish": PUBLISH_CELL,
    "consume": ["consume", "--transport", "redis", "--only", "ack=yes"],
    "worker": ["worker", "--transport", "redis", "--only", "mode=latency"],
    "join": ["join", "--transport", "redis", "--only", "backend=redis", "--only", "method=join"],
    "fanout": ["fanout", "--transport", "redis", "--only", "shape=per-page"],
    "prefetch": ["prefetch", "--transport", "redis", "--only", "prefetch_multiplier=1"],
    "instructions": ["instructions", "--only", "target=queue-put"],
    "faults": ["faults", "--transport", "redis", "--only", "fault=warm-shutdown",
               "--only", "acks_late=True"],
    "rate-sweep": [*PUBLISH_CELL, "--rate-sweep", "200:400:2"],
    "max-rate": [*PUBLISH_CELL, "--max-rate"],
}


@pytest.mark.redis
@pytest.mark.parametrize("case", sorted(EVERY_SCENARIO))
def test_every_scenario_runs_with_two_variants(case, tmp_path, need):
    need("redis")
    out = tmp_path / "r.json"
    res = bench("ab", "here", "env:CB_SAME=1", *EVERY_SCENARIO[case], "--quick", "--repeat",
                "1", "--duration", "0.3", "--quiet", "--no-html", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    by_variant = {v: [c for c in cells if c["params"]["variant"] == v] for v in "AB"}
    assert by_variant["A"] and len(by_variant["A"]) == len(by_variant["B"]), cells
    assert all(c["status"] == "ok" for c in cells), [(c["status"], c["reason"]) for c in cells]


@pytest.mark.redis
def test_app_runs_with_two_variants_from_the_users_folder(tmp_path, need):
    """--app MODULE:APP is imported from where the user runs, in each variant's process."""
    need("redis")
    (tmp_path / "abproj.py").write_text(textwrap.dedent("""
        from celery import Celery

        app = Celery("abproj", broker="memory://")


        @app.task(name="abproj.add")
        def add(x, y, z=0):
            return x + y
    """))
    res = subprocess.run([*CLI, "ab", "here", "env:CB_SAME=1", "publish", "--app", "abproj:app",
                          "--task", "abproj.add", "--only", "api=celery", "--only",
                          "method=delay", "--quick", "--repeat", "1", "--duration", "0.3",
                          "--quiet", "--no-html", "--out", "r.json"],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr[-2000:]
    cells = json.loads((tmp_path / "r.json").read_text())["cells"]
    assert {c["params"]["variant"] for c in cells} == {"A", "B"}
    assert all(c["status"] == "ok" for c in cells), [(c["status"], c["reason"]) for c in cells]


def test_a_variants_process_gets_the_broker_commands_unmasked():
    from bench import runner
    from bench.variants import run as variant_run

    opts = runner.RunOptions(scenarios=("faults",), restart_cmd="echo restart",
                             start_cmd="echo start")
    assert opts.to_dict()["restart_cmd"] != "echo restart"   # the results file's copy
    sent = variant_run.child_options(opts)
    assert (sent["restart_cmd"], sent["start_cmd"]) == ("echo restart", "echo start")


def _variant_cell(variant: str, rates: list[float]):
    from bench import results

    repeats = [{"metrics": {"throughput_per_s": r, "sent": 100, "received": 100, "lost": 0},
                "histograms": {}, "notes": [], "round": i} for i, r in enumerate(rates)]
    return results.aggregate("publish", {"api": "kombu", "transport": "memory",
                                         "variant": variant}, repeats)


def test_the_report_shows_each_variant_pair_as_a_table_and_a_chart():
    from bench import results
    from bench.exporters import html

    base = [1000.0, 1040.0, 980.0, 1010.0, 1025.0, 995.0]
    run = results.Run({}, [_variant_cell("A", base),
                           _variant_cell("B", [0.8 * r for r in base]),
                           _variant_cell("C", [r * (1.01 if i % 2 else 0.99)
                                               for i, r in enumerate(base)])])
    page = html(run)
    assert "B / A: variant B as a ratio of variant A" in page
    assert "C / A: variant C as a ratio of variant A" in page
    b_part = page.split("B / A:")[1].split("C / A:")[0]
    assert "1.25x slower" in b_part and "data-ab-B-0" in b_part   # the table and its chart
    c_part = page.split("C / A:")[1]
    assert "no significant difference" in c_part and "data-ab-C-0" in c_part
    plain = results.Run({}, [_variant_cell("A", base)])
    assert "as a ratio of variant" not in html(plain)   # a run without variants: nothing


def test_the_sensitivity_tally_counts_a_called_slowdown_and_a_quiet_aa(tmp_path):
    """tools/ab_sensitivity.py tally: a run whose B is 20% slower counts as called, an A/A
    run's rows as no significant difference."""
    from bench import results

    base = [1000.0, 1040.0, 980.0, 1010.0, 1025.0, 995.0, 1005.0, 1015.0]
    results.dump(results.Run({}, [_variant_cell("A", base),
                                  _variant_cell("B", [0.8 * r for r in base])]),
                 str(tmp_path / "slow-0.json"))
    results.dump(results.Run({}, [_variant_cell("base", base), _variant_cell(
        "head", [r * (1.01 if i % 2 else 0.99) for i, r in enumerate(base)])]),
        str(tmp_path / "aa-0.json"))
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "ab_sensitivity.py"), "tally",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0]
    assert "throughput slower in 1" in first and "1/1 rows no significant difference" in first


def test_a_round_of_slices_keeps_each_variants_best_slice_and_every_message():
    """bench.variants.run.merged: a rate is the round's best slice, a cost per message its
    least, counts of messages add up (a loss in one slice is never hidden), flags raised
    stay raised, histograms hold every sample."""
    from hdrh.histogram import HdrHistogram

    from bench import recorder
    from bench.variants import run as variant_run

    def one(rate, cpu, lost, samples):
        hist = HdrHistogram(1, 60_000_000, 3)
        for v in samples:
            hist.record_value(v)
        return {"metrics": {"throughput_per_s": rate, "cpu_us_per_msg": cpu, "sent": 100,
                            "lost": lost, "drain_s": 0.5, "gave_up": lost > 0},
                "histograms": {"publish": recorder.Recorded(hist, 1)}, "notes": [f"n{lost}"],
                "round": 3, "elapsed_s": 0.25}

    got = variant_run.merged([one(900.0, 20.0, 0, [10, 11]), one(1000.0, 19.0, 1, [12]),
                              one(400.0, 40.0, 0, [50])])
    m = got["metrics"]
    assert (m["throughput_per_s"], m["cpu_us_per_msg"]) == (1000.0, 19.0)
    assert (m["sent"], m["lost"], m["gave_up"]) == (300, 1, True)
    assert got["histograms"]["publish"].hist.get_total_count() == 4
    assert got["histograms"]["publish"].overflow == 3
    assert got["round"] == 3 and got["slices"] == 3 and got["notes"] == ["n0", "n1"]
    lone = one(5.0, 1.0, 0, [1])
    assert variant_run.merged([lone]) is lone


@pytest.mark.parametrize("scenario, given, expect", [
    ("publish", {"duration": 1.0}, (5, 0.2)),
    ("publish", {"duration": 0.3}, (2, 0.15)),          # never under MIN_SLICE_S
    ("publish", {"duration": 0.1}, (1, 0.1)),
    ("publish", {}, (1, None)),                          # the scenario's own sizing
    ("publish", {"duration": 1.0, "rate": 100.0}, (1, 1.0)),   # open loop: one piece
    ("publish", {"duration": 1.0, "messages": 500}, (1, 1.0)),
    ("join", {"duration": 1.0}, (1, 1.0)),
])
def test_slices_only_for_closed_loop_publish_cells_and_never_too_short(scenario, given, expect):
    from bench import runner
    from bench.variants import run as variant_run

    assert variant_run.slicing(scenario, runner.RunOptions(**given)) == expect


@pytest.mark.parametrize("scenario, fresh", [("publish", True), ("join", True),
                                             ("worker", False)])
def test_publish_and_join_rounds_each_run_in_new_measuring_processes(scenario, fresh,
                                                                     monkeypatch, tmp_path):
    """bench.variants.run.measure: a publish or join round is measured by a new pair of
    processes (a process's share of a busy machine stays with it for its life, docs/ab.md
    "The join rule's bound"); other scenarios keep one process per variant throughout."""
    from types import SimpleNamespace

    from bench import runner
    from bench.variants import run as variant_run

    started, stopped = [], []

    class Process:   # stands in for VariantProcess: no child, the same calls
        def __init__(self, variant, spec, workdir, timeout):
            self.variant, self.id = variant, len(started)
            started.append(variant.name)

        def start(self):
            pass

        def stop(self):
            stopped.append(self.id)

        def wait_for(self, what, timeout):
            return ""

        def measure(self, params, round_, first):
            return {"repeat": {"metrics": {"by_process": float(self.id)}, "round": round_}}

    monkeypatch.setattr(variant_run, "VariantProcess", Process)
    variants = [SimpleNamespace(name="A"), SimpleNamespace(name="B")]
    opts = runner.RunOptions(duration=1.0, timeout=30.0)
    states = variant_run.measure(scenario, [{"x": 1}], variants, range(3), opts, tmp_path,
                                 lambda key, state: None)
    by_round = {v.name: [r["metrics"]["by_process"] for r in states[(0, v.name)].repeats]
                for v in variants}
    assert all(len(ids) == 3 for ids in by_round.values())
    if fresh:
        assert started == ["A", "B"] * 3
        assert all(len(set(ids)) == 3 for ids in by_round.values())   # one process a round
    else:
        assert started == ["A", "B"]
        assert all(len(set(ids)) == 1 for ids in by_round.values())
    assert set(stopped) == set(range(len(started)))   # every process stopped at the end
