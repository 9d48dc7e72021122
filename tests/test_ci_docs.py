"""docs/ci.md's GitHub Actions workflow is valid YAML and runs only commands that exist:
its make targets in the Makefile, its celery-bench subcommands and options in the CLI."""
import re
import shlex
from pathlib import Path

import yaml

from bench.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def _workflow():
    text = (ROOT / "docs" / "ci.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    return yaml.safe_load(blocks[0])


def _commands(flow):
    for job in flow["jobs"].values():
        for step in job["steps"]:
            for line in str(step.get("run", "")).splitlines():
                if line.strip():
                    yield line.strip()


def test_the_workflow_parses_and_its_commands_exist():
    flow = _workflow()
    triggers = flow.get(True, flow.get("on"))        # YAML 1.1 reads the key `on` as True
    assert "pull_request" in triggers and "schedule" in triggers
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    seen = {"make": 0, "celery-bench": 0}
    for line in _commands(flow):
        words = shlex.split(line.replace("${{", "'${{").replace("}}", "}}'"))
        if words[0] == "make":
            assert words[1] in targets, line
            seen["make"] += 1
        elif words[0].endswith("celery-bench"):
            seen["celery-bench"] += 1
            command, rest = cli, words[1:]
            while rest and hasattr(command, "commands") and rest[0] in command.commands:
                command, rest = command.commands[rest[0]], rest[1:]
            assert not hasattr(command, "commands"), f"{line}: no such subcommand"
            options = {o for p in command.params for o in getattr(p, "opts", [])}
            for word in rest:
                if word.startswith("--"):
                    assert word.split("=")[0] in options, f"{line}: {word} is not an option"
    assert seen["make"] >= 2 and seen["celery-bench"] >= 4, seen


def test_the_gate_summary_reaches_the_job_page():
    lines = list(_commands(_workflow()))
    gate = next(line for line in lines if "gate" in line)
    assert "--summary results/summary.md" in gate
    assert any("results/summary.md" in line and "GITHUB_STEP_SUMMARY" in line for line in lines)
