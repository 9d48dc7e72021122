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
