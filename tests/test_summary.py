"""The pull-request summary: `gate --summary FILE.md` and `compare --format markdown`
name what failed or moved, with its interval, in the first screen of Markdown."""
import textwrap

from factory import cell, write

HELD = dict(api="kombu", producer="held", transport="memory")
RULE = """
    [[gate]]
    name = "per-call vs held"
    check = "publish[api=kombu,producer=per-call,transport=memory] throughput_per_s / [producer=held] between 0.4 and 0.9"
    why = "per-call opens a channel a message; below 0.4 something else broke"
"""


def _rounds(x, spread=0.01):
    return (x * (1 - spread), x, x * (1 + spread))


def _cells(per_call=600.0, held=1000.0):
    return [cell(throughputs=_rounds(held), **HELD),
            cell(throughputs=_rounds(per_call), seed=1, api="kombu", producer="per-call",
                 transport="memory")]


def test_gate_summary_names_the_failing_rule_and_its_interval_first(cli_run, tmp_path):
    (tmp_path / "gates.toml").write_text(textwrap.dedent(RULE))
    write(tmp_path / "run.json", *_cells(per_call=300.0))
    res = cli_run("gate", "run.json", "--spec", "gates.toml", "--budget", "0",
                  "--summary", "out/summary.md")
    assert res.returncode == 1, res.stdout + res.stderr
    text = (tmp_path / "out" / "summary.md").read_text()
    first = text.splitlines()[:15]                       # the first screen
    assert first[0].startswith("**celery-bench gate: FAIL**")
    row = next(line for line in first if "per-call vs held" in line and line.startswith("|"))
    assert "**FAIL**" in row and "0.3 is outside 0.4 and 0.9" in row and "95% interval" in row
    assert "publish[api=kombu" in row


def test_gate_summary_of_a_pass_and_its_report_link(cli_run, tmp_path):
    (tmp_path / "gates.toml").write_text(textwrap.dedent(RULE))
    write(tmp_path / "run.json", *_cells(per_call=600.0))
    (tmp_path / "run.html").write_text("<html></html>")   # as `run --html` writes it
    res = cli_run("gate", "run.json", "--spec", "gates.toml", "--budget", "0",
                  "--summary", "summary.md")
    assert res.returncode == 0, res.stdout + res.stderr
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("**celery-bench gate: PASS**") and "Every rule passed." in text
    assert "[run.html](run.html)" in text


def test_gate_summary_to_a_folder_is_refused_before_anything(cli_run, tmp_path):
    (tmp_path / "gates.toml").write_text(textwrap.dedent(RULE))
    write(tmp_path / "run.json", *_cells())
    (tmp_path / "d").mkdir()
    res = cli_run("gate", "run.json", "--spec", "gates.toml", "--summary", "d")
    assert res.returncode == 2 and "--summary" in res.stderr and "directory" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_compare_markdown_lists_the_change_with_its_interval(cli_run, tmp_path):
    write(tmp_path / "base.json", *_cells(held=1000.0))
    write(tmp_path / "new.json", *_cells(held=400.0))
    (tmp_path / "new.html").write_text("<html></html>")
    res = cli_run("compare", "base.json", "new.json", "--format", "markdown")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("**celery-bench compare: slower**")
    row = next(line for line in lines if line.startswith("| [publish[api=kombu,producer=held"))
    assert "(new.html#s-publish)" in row and "**2.50x slower**" in row and "95% CI" in row
    assert "### Other largest movements" in res.stdout


def test_compare_markdown_needs_two_runs(cli_run, tmp_path):
    write(tmp_path / "run.json", *_cells())
    res = cli_run("compare", "run.json", "--by", "producer", "--format", "markdown")
    assert res.returncode == 2 and "--format markdown compares two results files" in res.stderr
