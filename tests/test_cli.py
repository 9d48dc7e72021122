"""The real ``celery-bench`` command, run as a subprocess (the ``cli_run`` fixture)."""
import json
import re

import pytest

from bench import config, runner, scenarios

from factory import cell, write

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


def _scenario_args():
    """Every scenario (the default)."""
    return []


def _one_line_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["run", "--repeat", "0"], ["--repeat"]),
    (["run", "--rate", "-5"], ["--rate", "must be > 0"]),
    (["run", "--duration", "0"], ["--duration"]),
    (["run", "--transport", "pigeon"], ["pigeon", "choose from"]),
    (["run", "--only", "api"], ["--only", "KEY=VALUE"]),
    (["run", "--amqp-url", "localhost"], ["--amqp-url", "is not a URL"]),
    (["run", "--app", "proj"], ["--app", "MODULE:APP"]),
    (["run", "nosuch"], ["scenario 'nosuch' does not exist"]),
    (["run", "--pool", "fork"], ["--pool"]),
    (["show", "missing.json"], ["missing.json"]),
    (["frobnicate"], ["frobnicate"]),
    (["report", "r.json", "--format", "pdf"], ["--format"]),
    (["report", "missing.json"], ["missing.json"]),
    (["gate", "r.json", "--spec", "missing.toml"], ["missing.toml"]),
])
def test_bad_arguments_exit_2_with_one_line(cli_run, tmp_path, args, words):
    write(tmp_path / "r.json", cell(api="kombu", transport="memory"))
    _one_line_error(cli_run(*args), *words)


def test_task_without_app_is_a_usage_error(cli_run):
    _one_line_error(cli_run("run", *_scenario_args(), "--task", "proj.add"), "--task needs --app")


def test_help_and_version(cli_run):
    res = cli_run("--help")
    assert res.returncode == 0
    for command in ("run", "list", "show", "compare", "gate", "report"):
        assert re.search(rf"^\s+{command}\b", res.stdout, re.M), command
    assert cli_run("--version").returncode == 0


def test_list_names_the_services_and_whether_they_are_reachable(cli_run):
    res = cli_run("list", timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("publish", "join", "prefetch", "fanout", "memory", "unix", "fifo"):
        assert name in res.stdout
    for service in config.DEFAULTS:
        reach = config.probe(service)
        rows = [line for line in res.stdout.splitlines()
                if re.match(rf"^\W*{service}\s", line)]
        assert rows, f"no row for {service}"
        word = "yes" if reach.ok else "no"
        assert any(re.search(rf"\b{word}\b", row) for row in rows), (service, rows)
        if reach.ok and reach.version:
            assert reach.version.split()[0] in res.stdout
    assert "guest:guest@" not in res.stdout          # the default amqp password is masked


def test_unreachable_named_transport_exits_2_naming_it(cli_run):
    res = cli_run("run", *_scenario_args(), "--transport", "redis", "--out", "out.json",
                  env={"CELERY_BENCH_REDIS_URL": UNREACHABLE_REDIS})
    line = _one_line_error(res, "--transport redis", "redis")
    assert "127.0.0.1:1" in line


def _scenario_with_redis_cells():
    for name in scenarios.names():
        if any(p.get("transport") == "redis"
               for p in scenarios.get(name)(runner.RunOptions()).cells()):
            return name
    pytest.skip("no scenario has redis cells yet")


def test_passwords_given_by_flag_or_env_never_reach_the_results_file(cli_run, tmp_path):
    """Every cell is skipped at once (redis unreachable): a run that writes a file fast."""
    scenario = _scenario_with_redis_cells()
    res = cli_run("run", scenario, "--only", "transport=redis", "--quiet", "--out", "r.json",
                  "--amqp-url=amqp://guest:flag-s3cret@127.0.0.1:5672//",
                  env={"CELERY_BENCH_REDIS_URL": "redis://:env-s3cret@127.0.0.1:1/0",
                       "CELERY_BENCH_POSTGRES_URL":
                           "postgresql+psycopg2://postgres:pg-s3cret@127.0.0.1:1/test"},
                  timeout=300)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "r.json").read_text()
    for secret in ("flag-s3cret", "env-s3cret", "pg-s3cret"):
        assert secret not in text
        assert secret not in res.stdout and secret not in res.stderr
    data = json.loads(text)
    services = data["environment"]["services"]
    assert services["amqp"]["url"] == "amqp://guest:****@127.0.0.1:5672//"
    assert services["redis"]["url"] == "redis://:****@127.0.0.1:1/0"
    assert data["cells"] and all(c["status"] == "skipped" for c in data["cells"])
    assert any("--amqp-url=amqp://guest:****@" in a for a in data["environment"]["argv"])


def test_quick_memory_publish_run_masks_the_amqp_password(cli_run, tmp_path):
    res = cli_run("run", "publish", "--quick", "--repeat", "1", "--transport", "memory", "--quiet",
                  "--out", "r.json", "--amqp-url", "amqp://guest:quick-s3cret@127.0.0.1:5672//",
                  timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    text = (tmp_path / "r.json").read_text()
    assert "quick-s3cret" not in text and "quick-s3cret" not in res.stdout + res.stderr
    data = json.loads(text)
    # memory's cells, and the calibration loop (no transport) every run carries
    assert data["cells"] and {c["params"]["transport"] for c in data["cells"]} == \
        {"memory", "-"}
    assert any(c["status"] == "ok" for c in data["cells"])
    # the file reads back through every reader
    for args in (["show", "r.json"], ["report", "r.json"], ["gate", "r.json", "--budget", "0"]):
        res = cli_run(*args)
        assert res.returncode in (0, 1) and "Traceback" not in res.stderr, (args, res.stderr)


def test_report_formats(cli_run, tmp_path):
    write(tmp_path / "r.json",
          cell(throughputs=(1000.0, 1100.0), api="kombu", producer="held", transport="memory"),
          cell(throughputs=(600.0,), seed=1, api="kombu", producer="per-call",
               transport="memory"),
          cell(status="skipped", reason="redis unreachable", api="kombu", producer="held",
               transport="redis"))
    md = cli_run("report", "r.json", "--format", "md")
    assert md.returncode == 0, md.stderr
    assert "### publish" in md.stdout and "| producer |" in md.stdout.replace("| api ", "")
    assert "skipped: redis unreachable" in md.stdout
    csv_ = cli_run("report", "r.json", "--format", "csv", "--out", "r.csv")
    assert csv_.returncode == 0, csv_.stderr
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0].startswith("scenario,cell,status,reason,api,producer,transport")
    assert len(rows) == 4 and "publish_us.p99" in rows[0]
    png = cli_run("report", "r.json", "--format", "png", "--cell", "publish[transport=memory]")
    assert png.returncode == 0, png.stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _one_line_error(cli_run("report", "r.json", "--format", "png", "--hist", "nope"),
                    "no recorded histogram")


def test_every_run_option_is_a_run_options_field():
    """`run`'s options reach RunOptions by name (one declaration each beside its click
    option): a new option without a field, or a field without an option, fails here."""
    import dataclasses

    from bench.cli import run
    from bench.runner import RunOptions

    options = {p.name for p in run.params} - {"html", "variants", "verbose", "redis_url",
                                              "amqp_url", "postgres_url"}
    fields = {f.name for f in dataclasses.fields(RunOptions)} - {"workdir"}
    assert options == fields


def test_run_options_click_fields_and_record_come_from_one_table():
    """Each option of `run` is declared once (bench.run_options.OPTIONS): run's click
    parameters, RunOptions' fields and the results' options record are that table's, in
    its order; adding an option is one entry there."""
    import dataclasses

    from bench import run_options
    from bench.cli import run

    table = run_options.OPTIONS
    assert len({o.name for o in table}) == len(table)
    assert [p.name for p in run.params] == [o.name for o in table if o.decls]
    assert [f.name for f in dataclasses.fields(run_options.RunOptions)] == \
        [o.name for o in table if not o.cli_only]
    assert list(run_options.RunOptions().to_dict()) == \
        [o.name for o in table if not o.cli_only and o.recorded]
    assert set(run_options.CLI_ONLY) == {"html", "variants", "verbose", "redis_url",
                                         "amqp_url", "postgres_url"}
    opts = run_options.RunOptions(quick=True, only=(("api", "kombu"),), restart_cmd="pw")
    assert run_options.RunOptions.from_dict(opts.to_dict()).only == opts.only


def test_the_fast_tier_cannot_measure_or_start_a_child(cli_inproc):
    """tests/conftest.py's guard: outside the slow tier a run that got past its checks
    stops at the first cell, and no child process starts (a broken check fails at once)."""
    import sys

    from bench import children
    from conftest import RealMeasurementInFastTier

    with pytest.raises(RealMeasurementInFastTier, match="must not measure a cell"):
        cli_inproc("run", "publish", "--only", "transport=memory", "--only", "api=kombu",
                   "--quick", "--quiet", "--no-html", "--out", "r.json")
    with pytest.raises(RealMeasurementInFastTier, match="must not start a child process"):
        children.spawn([sys.executable, "-c", "pass"])
