"""The results file exists from the first moment of a run: a Ctrl-C while the services
are still being probed leaves a file that says it was interrupted."""
import json

import pytest

from bench import runner


@pytest.mark.parametrize("stage", ["services_environment", "plan"])
def test_an_interrupt_while_probing_or_planning_leaves_a_results_file(monkeypatch, tmp_path,
                                                                       stage):
    """Probing the services, or planning (which imports every scenario: seconds on a
    loaded host): either way the file exists and says the run was interrupted."""
    out = tmp_path / "r.json"

    def interrupted(*args):
        if stage == "services_environment":
            assert out.exists()   # written before the probes start
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, stage, interrupted)
    opts = runner.RunOptions(scenarios=("publish",), quick=True, out=str(out),
                             workdir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runner.run(opts)
    data = json.loads(out.read_text())
    assert data["environment"]["interrupted"] is True and data["cells"] == []


def test_an_interrupt_before_the_runner_starts_leaves_a_results_file(monkeypatch, tmp_path,
                                                                     capsys):
    """Ctrl-C while `celery-bench run` is still importing and checking (before the runner
    wrote anything): exit 130, and the file exists and says it was interrupted."""
    from bench import cli, cli_params

    out = tmp_path / "r.json"

    def interrupted(path, what, folder=False):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_params, "check_writable", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "publish", "--quick", "--out", str(out)])
    assert exit_.value.code == cli.EXIT_INTERRUPTED
    data = json.loads(out.read_text())
    assert data["environment"]["interrupted"] is True and data["cells"] == []
    assert f"results so far written to {out}" in capsys.readouterr().err


def test_the_command_starts_without_importing_scipy():
    """scipy.stats takes seconds to import on a loaded host, and a Ctrl-C before
    `celery-bench run` is imported cannot leave a results file: it is imported on use."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import sys, bench.cli; "
                            "print(sorted(m for m in sys.modules if m.startswith('scipy')))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.2])
def test_a_ctrl_c_in_the_first_moments_exits_130_and_leaves_a_results_file(tmp_path, delay):
    """SIGINT early in `celery-bench run`, while Python imports the command (click, kombu,
    the scenarios) or the runner plans: exit 130, and the file is a valid results file
    that says the run was interrupted. The delays count from the moment the entry point
    (bench.entry, standard library only) wrote its file, ~0.1 s after the start: before
    that only Python's own start-up runs (site, ~70 ms here), where no code of ours can."""
    import signal
    import subprocess
    import sys
    import time

    from bench import results

    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bench.entry import main; main()", "run", "publish",
         "--quick", "--transport", "memory", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no results file within 60 s"
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    run = results.load(out)
    assert run.environment["interrupted"] is True and run.cells == []


def test_a_usage_error_leaves_an_earlier_results_file_as_it_was(tmp_path):
    """The entry point writes its file before it knows the options are good: a usage
    error (exit 2) puts back what the file held, and removes a file it created."""
    import subprocess
    import sys

    out = tmp_path / "r.json"
    out.write_text('{"earlier": "run"}\n')
    cmd = [sys.executable, "-c", "from bench.entry import main; main()", "run", "publish",
           "--rate", "-5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert out.read_text() == '{"earlier": "run"}\n'
    fresh = tmp_path / "new" / "dir" / "fresh.json"
    done = subprocess.run(cmd[:-1] + [str(fresh)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]   # no temporary left


def test_the_entry_points_constants_match_the_commands():
    from bench import cli, entry, results

    assert entry.SCHEMA == results.SCHEMA
    assert entry.EXIT_INTERRUPTED == cli.EXIT_INTERRUPTED
    assert entry.DEFAULT_OUT == next(p.default for p in cli.run.params if p.name == "out")
