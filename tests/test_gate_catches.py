"""The gate catches a real slowdown and does not fail the same tree without it.

A ``sitecustomize.py`` on the path makes one function do at least about 30% more work (the
regression the Verdicts issue found the old gate blind to): a busy loop sized, in this
process, to 60% of what one publish costs, since the loop's cost and the publish's are
estimated here on a noisy machine and what lands in the run moves (a loop sized to 40% added
20-45% to unix's CPU per message over memory's on the AMD EPYC VM, 2026-12-07). The rules
allow 15%.

- in our unix transport's framing (``transports.framing.encode_message``): the rule on
  unix's CPU per message over memory's, against the baseline, fails;
- in ``kombu.messaging.Producer.publish``: the calibration-normalised rule (5 rounds) and
  the instruction-count rule (callgrind) fail against the baseline.

The baseline is written by a clean run of this test; the committed rules are used as
they are (read from results/baselines/gates.toml by name). Each gate may re-measure its
undecided cells for GATE_BUDGET_S, as CI's gate does, in the environment its run had (the
slowdown included): on a noisy VM one cell's CPU per message moves 30% from round to round,
and 5 rounds can leave a 20% regression undecided. The gate judges head/baseline on both
runs' rounds (the baseline is a sample too), so the baseline is written from
BASELINE_ROUNDS rounds. Verdicts and exit codes are asserted,
never a duration.
"""
import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GATES = ROOT / "results" / "baselines" / "gates.toml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SLOWDOWN = 0.60
GATE_BUDGET_S = 60
BASELINE_ROUNDS = 10
# What the clean tree may get: never FAIL. Undecided (a warning, exit 0) is the honest answer
# where two clean runs of one tree differ by most of the bound (unix over memory 0.855 then
# 0.941, 10 and 26 rounds, AMD EPYC VM 2026-12-07: a run-level drift no round count removes).
CLEAN = ("PASS", "WARN")
CALIBRATED = "kombu held publish costs no more CPU per message, in units of the calibration loop"
UNIX = "our unix transport's publish costs no more CPU per message than memory's did"
INSTRUCTIONS = "instructions per message have not grown (callgrind, deterministic)"

SITECUSTOMIZE = '''
import os


def _burn(n):
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return acc


_N = int(os.environ["CB_TEST_SLOW_ITERATIONS"])
_WHERE = os.environ["CB_TEST_SLOW_WHERE"]
if _WHERE == "framing":
    import transports.framing as _framing

    _real = _framing.encode_message

    def encode_message(message):
        _burn(_N)
        return _real(message)
    _framing.encode_message = encode_message
elif _WHERE == "publish":
    import kombu.messaging as _messaging

    _real = _messaging.Producer.publish

    def publish(self, *args, **kwargs):
        _burn(_N)
        return _real(self, *args, **kwargs)
    _messaging.Producer.publish = publish
'''


def _rules(*names) -> str:
    """The committed [[gate]] tables with these names, as they are."""
    text = GATES.read_text()
    blocks = ["[[gate]]" + b for b in text.split("[[gate]]")[1:]]
    chosen = [b for b in blocks if any(f'name = "{n}"' in b for n in names)]
    assert len(chosen) == len(names), names
    return 'baseline = "base.json"\n' + "\n".join(chosen)


def _burn_us_per_iteration() -> float:
    def burn(n):
        acc = 0
        for i in range(n):
            acc += i * i % 7
        return acc
    c0 = time.thread_time()
    burn(2_000_000)
    return (time.thread_time() - c0) * 1e6 / 2_000_000


def _publish_run(cli_run, out, env=None, rounds=5) -> None:
    """kombu held on memory and unix, and the calibration loop: interleaved rounds."""
    res = cli_run("run", "publish", "--quick", "--repeat", str(rounds), "--no-html",
                  "--only", "api=kombu|calibration", "--only", "producer=held|-",
                  "--only", "retry=no|-", "--transport", "memory", "--transport", "unix",
                  "--duration", "0.6", "--out", out, "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-2000:]


def _cpu_per_msg(run_file: Path, transport: str) -> float:
    data = json.loads(run_file.read_text())
    (cell,) = [c for c in data["cells"] if c["params"].get("api") == "kombu"
               and c["params"]["transport"] == transport]
    return cell["metrics"]["cpu_us_per_msg"]


def _gate(cli_run, results, env=None, spec="spec.toml"):
    return cli_run("gate", results, "--spec", spec, "--budget", str(GATE_BUDGET_S), "-v",
                   env=env)


def _slow_env(tmp_path, where: str, iterations: int) -> dict:
    folder = tmp_path / "slow"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    return {"PYTHONPATH": f"{folder}:{ROOT}", "CB_TEST_SLOW_WHERE": where,
            "CB_TEST_SLOW_ITERATIONS": str(iterations)}


def _verdict(res, name) -> str:
    lines = [ln for ln in res.stdout.splitlines() if f"  {name}:" in ln]
    assert lines, res.stdout
    return lines[0].split()[0]


def test_a_slower_framing_fails_the_unix_rule(tmp_path, cli_run):
    (tmp_path / "spec.toml").write_text(_rules(UNIX))
    _publish_run(cli_run, str(tmp_path / "clean.json"), rounds=BASELINE_ROUNDS)
    res = cli_run("gate", "clean.json", "--spec", "spec.toml", "--write-baseline")
    assert res.returncode == 0, res.stderr
    # 30% of what a unix publish costs here, spent inside our framing.
    unix_us = _cpu_per_msg(tmp_path / "clean.json", "unix")
    iterations = max(1, round(SLOWDOWN * unix_us / _burn_us_per_iteration()))
    env = _slow_env(tmp_path, "framing", iterations)
    _publish_run(cli_run, str(tmp_path / "slow.json"), env=env)
    _publish_run(cli_run, str(tmp_path / "again.json"))
    slow, again = _gate(cli_run, "slow.json", env), _gate(cli_run, "again.json")
    assert _verdict(slow, UNIX) == "FAIL" and slow.returncode == 1, slow.stdout
    assert _verdict(again, UNIX) in CLEAN and again.returncode == 0, again.stdout


def test_a_slower_kombu_publish_fails_the_calibrated_and_instruction_rules(tmp_path, cli_run):
    if not shutil.which("valgrind"):
        pytest.skip("valgrind not installed: apt-get install valgrind")
    (tmp_path / "spec.toml").write_text(_rules(CALIBRATED, INSTRUCTIONS))
    _publish_run(cli_run, str(tmp_path / "clean.json"), rounds=BASELINE_ROUNDS)
    count = ("run", "instructions", "--only", "target=kombu-publish", "--no-html", "--quiet")
    res = cli_run(*count, "--out", "clean-i.json")
    assert res.returncode == 0, res.stderr[-2000:]
    clean = json.loads((tmp_path / "clean.json").read_text())
    clean["cells"] += json.loads((tmp_path / "clean-i.json").read_text())["cells"]
    (tmp_path / "clean.json").write_text(json.dumps(clean))
    res = cli_run("gate", "clean.json", "--spec", "spec.toml", "--write-baseline")
    assert res.returncode == 0, res.stderr

    memory_us = _cpu_per_msg(tmp_path / "clean.json", "memory")
    iterations = max(1, round(SLOWDOWN * memory_us / _burn_us_per_iteration()))
    env = _slow_env(tmp_path, "publish", iterations)
    for name, extra in (("slow", env), ("again", None)):
        _publish_run(cli_run, str(tmp_path / f"{name}.json"), env=extra)
        res = cli_run(*count, "--out", f"{name}-i.json", env=extra)
        assert res.returncode == 0, res.stderr[-2000:]
        run = json.loads((tmp_path / f"{name}.json").read_text())
        run["cells"] += json.loads((tmp_path / f"{name}-i.json").read_text())["cells"]
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    slow, again = _gate(cli_run, "slow.json", env), _gate(cli_run, "again.json")
    assert slow.returncode == 1, slow.stdout
    assert _verdict(slow, CALIBRATED) == "FAIL", slow.stdout
    assert _verdict(slow, INSTRUCTIONS) == "FAIL", slow.stdout
    assert again.returncode == 0, again.stdout
    assert _verdict(again, CALIBRATED) in CLEAN, again.stdout
    assert _verdict(again, INSTRUCTIONS) == "PASS", again.stdout
