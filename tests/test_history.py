"""History: runs kept by commit/time/machine/variant, each metric drawn over commits,
change points found by ruptures (a 15% step at point 20 of 30, not in pure noise), and
`history check` failing a regressed newest segment. The page is checked in Chromium."""
import json

import numpy as np
import pytest

from bench.history import History
from bench.history_check import change_points, newest_regression

from browser import browser  # noqa: F401  (the fixture)
from factory import cell, write

NOISE = 0.05      # run-to-run spread of a point (lognormal sigma): within-run rounds here
                  # spread +-1-5% (README tables), so 5% per run is on the noisy side


def _series(seed, step_at=None, step=0.85, n=30):
    rng = np.random.default_rng(seed)
    v = 1000.0 * np.exp(rng.normal(0, NOISE, n))
    if step_at is not None:
        v[step_at:] *= step
    return list(v)


def test_a_15_percent_step_at_point_20_is_found_there():
    found = [change_points(_series(seed, 20)) for seed in range(40)]
    right = [f for f in found if len(f) == 1 and abs(f[0].index - 20) <= 1]
    assert len(right) >= 36, [[c.index for c in f] for f in found]   # 90% of noisy series
    assert all(0.8 < f[0].ratio < 0.9 for f in right)                # the step's size


def test_pure_noise_has_no_change_point():
    found = [change_points(_series(seed)) for seed in range(40)]
    assert sum(1 for f in found if f) <= 1, [[c.index for c in f] for f in found if f]


def test_newest_regression_knows_which_way_is_worse():
    down = _series(3, 20)
    assert newest_regression(down, higher_is_better=True).index in (19, 20, 21)
    assert newest_regression(down, higher_is_better=False) is None   # a time that fell
    assert newest_regression(down, higher_is_better=True, threshold=0.3) is None
    assert newest_regression(_series(3), higher_is_better=True) is None


def _history(tmp_path, step_at=20, n=30):
    """n runs of one commit each; the held producer's rate drops 15% from ``step_at``."""
    rates = _series(7, step_at, n=n)
    for i, rate in enumerate(rates):
        path = write(tmp_path / f"r{i}.json",
                     cell(throughputs=(rate * 0.99, rate, rate * 1.01), seed=i, samples=500,
                          api="kombu", producer="held", transport="memory"),
                     environment={"python": "3.11", "celery": "5.7", "kombu": "5.7",
                                  "cpu_model": "AMD EPYC test", "git_commit": f"c{i:02d}" + "a" * 38,
                                  "utc_time": f"2026-12-{1 + i // 24:02d}T{i % 24:02d}:00:00Z"})
        yield path


def test_history_add_show_check(cli_run, tmp_path):
    paths = [p.name for p in _history(tmp_path)]
    res = cli_run("history", "add", *paths)
    assert res.returncode == 0, res.stderr
    assert "commit c00aaaaaaaaa" in res.stdout and "AMD EPYC test" in res.stdout
    res = cli_run("history", "check")                     # 10 runs after the step: found
    assert res.returncode == 1, res.stdout + res.stderr
    assert "REGRESSION publish[api=kombu,producer=held,transport=memory] throughput_per_s" \
        in res.stdout and "between c19" in res.stdout
    res = cli_run("history", "show", "--metric", "throughput")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0].startswith("publish[api=kombu,producer=held,transport=memory] "
                               "throughput_per_s [/s] on AMD EPYC test / default")
    assert len(lines) == 31 and "95%" in lines[1]
    assert "<- change point" in next(line for line in lines if line.strip().startswith("c20"))
    index = [json.loads(line) for line in (tmp_path / "results/history/index.jsonl")
             .read_text().splitlines()]
    assert {e["variant"] for e in index} == {"default"} and len(index) == 30
    assert len(list((tmp_path / "results/history/runs").iterdir())) == 30


def test_history_without_a_step_checks_clean(cli_run, tmp_path):
    paths = [p.name for p in _history(tmp_path, step_at=None, n=12)]
    assert cli_run("history", "add", *paths, "--variant", "quick").returncode == 0
    res = cli_run("history", "check")
    assert res.returncode == 0 and "0 regressed" in res.stdout, res.stdout


def test_history_add_refuses_an_unreadable_file_in_one_line(cli_run, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    write(tmp_path / "good.json", cell(api="kombu", producer="held", transport="memory"))
    res = cli_run("history", "add", "good.json", "bad.json")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0
    assert "history add bad.json: not a celery-bench results file" in res.stderr
    assert not (tmp_path / "results/history").exists()     # nothing kept, not even good.json
    res = cli_run("history", "show")
    assert res.returncode == 2 and "no history yet" in res.stderr


def test_history_report_in_chromium(cli_run, browser, tmp_path):  # noqa: F811
    paths = [p.name for p in _history(tmp_path)]
    assert cli_run("history", "add", *paths).returncode == 0
    res = cli_run("history", "report", "h.html")
    assert res.returncode == 0, res.stderr
    history = History(tmp_path / "results/history")
    metrics = {s.metric for s in history.series()}
    visit = browser.open(tmp_path / "h.html", screenshot=tmp_path / "h.png")
    assert visit.console_errors == [] and visit.blocked == []
    page = visit.page
    per_section = page.evaluate("""() => [...document.querySelectorAll('section.metric')].map(
        s => [s.querySelector('h2').textContent, s.querySelectorAll('figure.chart svg').length,
              s.querySelectorAll('g[id*="-data-history"]').length])""")
    assert sorted(name for name, _, _ in per_section) == sorted(metrics)
    assert all(n == 1 and drawn == 1 for _, n, drawn in per_section), per_section
    changes = page.inner_text("section.metric:has(h2:text('throughput_per_s')) table.changes")
    assert "c19aaaaaaa..c20aaaaaaa" in changes.replace("\t", "").replace(" ", "") or \
        "c20aaaaaaa..c21aaaaaaa" in changes.replace("\t", "").replace(" ", ""), changes
    assert "-1" in changes and "%" in changes                 # a step of about -15%


@pytest.mark.parametrize("bad", [["--threshold", "0"], ["--threshold", "-1"]])
def test_history_check_bad_threshold(cli_run, tmp_path, bad):
    res = cli_run("history", "check", *bad)
    assert res.returncode == 2 and "--threshold" in res.stderr


SLOW_PUBLISH = '''"""Injected by tests/test_history.py: every Producer.publish 0.5 ms slower."""
import time

import kombu.messaging

_publish = kombu.messaging.Producer.publish


def publish(self, *args, **kwargs):
    time.sleep(0.0005)
    return _publish(self, *args, **kwargs)


kombu.messaging.Producer.publish = publish
'''


def test_seeded_history_from_real_runs_finds_the_injected_step(cli_run, tmp_path):
    """Ten real short runs (one held Kombu publish cell over memory, 3 rounds each); from
    the sixth commit on a sitecustomize slows Producer.publish. The step is found at that
    commit, and only there."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_PUBLISH)
    for i in range(10):
        env = {"PYTHONPATH": str(slow)} if i >= 5 else {}
        res = cli_run("run", "publish", "--transport", "memory", "--only", "api=kombu",
                      "--only", "producer=held", "--only", "retry=no", "--messages", "400",
                      "--repeat", "3", "--warmup", "0.1", "--quiet", "--no-html",
                      "--out", f"r{i}.json", env=env, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        res = cli_run("history", "add", f"r{i}.json", "--commit", f"c{i:02d}" + "b" * 38)
        assert res.returncode == 0, res.stderr
    res = cli_run("history", "check", "--metric", "throughput_per_s")
    assert res.returncode == 1, res.stdout
    regressed = [line for line in res.stdout.splitlines() if line.startswith("REGRESSION")]
    assert regressed and all("between c04bbbbbbbbb and c05bbbbbbbbb" in line
                             for line in regressed), res.stdout
    assert any("api=kombu" in line and "producer=held" in line for line in regressed)
