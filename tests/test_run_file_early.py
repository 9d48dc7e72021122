"""The results file exists from the first moment of a run: a Ctrl-C while the services
are still being probed leaves a file that says it was interrupted."""
import json

import pytest

from bench import runner


def test_an_interrupt_while_probing_services_leaves_a_results_file(monkeypatch, tmp_path):
    out = tmp_path / "r.json"

    def interrupted():
        assert out.exists()   # written before the probes start
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "services_environment", interrupted)
    opts = runner.RunOptions(scenarios=("publish",), quick=True, out=str(out),
                             workdir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runner.run(opts)
    data = json.loads(out.read_text())
    assert data["environment"]["interrupted"] is True and data["cells"] == []
