"""``celery-bench``: run scenarios, list what can run here, run a unix broker,
and read results files (show / compare / gate).

A user's mistake prints one line (which setting, what was wrong, what to do)
and exits 2; Ctrl-C exits 130 after writing the results measured so far.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from . import cli_params, config

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="celery-bench")
def cli():
    """Load tests and benchmarks for Celery and Kombu, recorded as HdrHistograms."""
    from . import plugins

    plugins.load()


@cli.command()
@click.argument("scenarios", nargs=-1)
@click.option("--quick", is_flag=True, help="The quick slice of each scenario (make bench).")
@click.option("--transport", "transports", multiple=True, metavar="NAME",
              help="Keep cells over this transport (repeatable). Unreachable -> exit 2.")
@click.option("--only", multiple=True, metavar="KEY=VALUE",
              help="Keep cells whose param KEY equals VALUE (repeatable), e.g. api=kombu.")
@click.option("--repeat", type=click.IntRange(1, 1000),
              help="Rounds: every cell runs once per round (ABC ABC ABC); medians and "
                   "spread over rounds. Default 3 with --quick, else 1.")
@click.option("--duration", type=float, callback=cli_params.positive_float("--duration", "10"),
              help="Seconds of measurement per cell.")
@click.option("--messages", type=click.IntRange(1, 100_000_000),
              help="Messages per cell (instead of --duration).")
@click.option("--rate", type=float, callback=cli_params.positive_float("--rate", "2000"),
              help="Open loop: send at this many per second, latency from intended time.")
@click.option("--warmup", type=float, callback=cli_params.seconds("--warmup", 3600, "1"),
              help="Seconds of warm-up before measuring.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              callback=cli_params.positive_float("--timeout", "120"),
              help="Longest single wait, seconds.")
@click.option("--serializer", "serializers", multiple=True,
              type=click.Choice(["json", "pickle", "msgpack", "yaml"]), callback=cli_params.serializers,
              help="Serializers for publish/consume cells (default json; pickle only when "
                   "named, and only that cell's consumer unpickles).")
@click.option("--payload-bytes", type=click.IntRange(0, 64 * 1024 * 1024),
              help="Message body size for publish cells (default 112).")
@click.option("--app", "app", callback=cli_params.app_spec, metavar="MODULE:APP",
              help="Point the celery cells at your own app (and its broker).")
@click.option("--task", metavar="NAME", help="Task name the celery cells send (with --app).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads", "eventlet", "gevent"]),
              help="Worker pool for worker scenarios (default: prefork; the worker "
                   "scenario runs solo and prefork unless given).")
@click.option("--concurrency", type=click.IntRange(1, 256), help="Worker concurrency.")
@click.option("--task-seconds", type=float, callback=cli_params.seconds("--task-seconds", 3600, "0.01"),
              help="Seconds each task sleeps in join cells.")
@click.option("--redis-url", callback=cli_params.service_url("redis"), expose_value=False,
              help=f"Redis URL (env {config.ENV_VARS['redis']}).")
@click.option("--amqp-url", callback=cli_params.service_url("amqp"), expose_value=False,
              help=f"RabbitMQ URL (env {config.ENV_VARS['amqp']}).")
@click.option("--postgres-url", callback=cli_params.service_url("postgres"), expose_value=False,
              help=f"PostgreSQL URL (env {config.ENV_VARS['postgres']}).")
@click.option("--out", default="results/latest.json", show_default=True,
              type=click.Path(dir_okay=False), help="Results file, rewritten after every cell.")
@click.option("--quiet", is_flag=True, help="No progress bars: one plain line per cell.")
@click.option("--rate-sweep", metavar="START:STOP[:STEPS]",
              help="Open-loop rate ladder (geometric, 5 steps by default) for the rated "
                   "scenarios (worker, publish): each step held --duration s, latency "
                   "from the intended send time.")
@click.option("--max-rate", is_flag=True,
              help="Find the highest rate each rated cell sustains: >= 98% of the rate "
                   "achieved, no growing backlog, and --slo kept; confirmed by holding it.")
@click.option("--slo", metavar="pNN<=VALUE",
              help="What a sustainable rate keeps, e.g. 'p99<=10ms' (the default).")
@click.option("--html/--no-html", default=True, show_default=True,
              help="Also write the HTML report next to --out (RESULTS.html).")
@click.option("--instructions", is_flag=True,
              help="Also count instructions per message of the in-process cells under "
                   "valgrind's callgrind (deterministic where time is not).")
@click.option("--restart-cmd", metavar="CMD",
              help="faults: shell command that restarts (or stops) a broker the harness did "
                   "not start (RabbitMQ, a plugin transport's server), e.g. 'rabbitmqctl "
                   "stop_app'; without it those broker-restart cells are skipped.")
@click.option("--start-cmd", metavar="CMD",
              help="faults: shell command run after --restart-cmd to bring the broker back "
                   "when --restart-cmd only stops it, e.g. 'rabbitmqctl start_app'.")
@click.option("--cpus", metavar="ROLE=CPUS,...",
              help="Pin the publisher, the harness's broker, the worker's main process and "
                   "its pool children (roles publisher, broker, worker, pool), e.g. "
                   "'publisher=0,worker=1,pool=1' (docs/latency.md: placement).")
@click.option("--variant", "variants", multiple=True, metavar="NAME=SPEC",
              help="Measure every cell once per variant per round, counterbalanced (A B, "
                   "B A, ...): SPEC is here, git:REV, pip:REQ,REQ, python:PATH, "
                   "conf:KEY=VALUE,... or env:KEY=VALUE,... (docs/ab.md). Twice at least.")
@click.option("--verbose", "-v", is_flag=True,
              help="Tables: each percentile's 95% interval in a column of its own.")
def run(html, variants=(), verbose=False, **given):
    """Run SCENARIOS (default: all of them) and write a results file.

    Exits 1 when a cell failed or lost messages (unless its transport declares that loss
    as a known behaviour), naming them."""
    started = time.time()
    out = given["out"]
    try:
        _run(html, variants, verbose, started, given)
    except KeyboardInterrupt:
        # Before the runner wrote it (importing the scenarios takes seconds on a loaded
        # host), the file still says the run was interrupted: it exists from the first moment.
        written = Path(out).exists() and Path(out).stat().st_mtime >= started - 1
        if not written:
            from . import results

            early = results.Run(results.environment())
            early.environment["interrupted"] = True
            try:
                results.dump(early, out)
                written = True
            except OSError:
                pass
        click.echo(f"interrupted: results so far written to {out}" if written else
                   f"interrupted: {out} could not be written", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _run(html, variants, verbose, started, given):
    from . import brokers, report, runner
    from . import scenarios as registry

    for name in given["transports"]:
        brokers.info(name)  # validates the name: one line, exit 2
    for name in given["scenarios"]:
        registry.get(name)  # one line, exit 2
    # Every other option of `run` is a RunOptions field of the same name (test_cli checks).
    opts = runner.RunOptions(**{
        **given, "scenarios": tuple(given["scenarios"]),
        "transports": tuple(given["transports"]), "only": runner.parse_only(given["only"]),
        "serializers": tuple(given["serializers"]),
        "rate_sweep": cli_params.sweep(given["rate_sweep"]), "slo": cli_params.slo(given["slo"]),
        "cpus": cli_params.cpus(given["cpus"])})
    if opts.instructions:
        registry.get(runner.INSTRUCTIONS)
    if opts.rate_sweep or opts.max_rate:
        flag = "--rate-sweep" if opts.rate_sweep else "--max-rate"
        unrated = [n for n in opts.scenarios if not registry.get(n).rated]
        if unrated:
            rated = [n for n in registry.names() if registry.get(n).rated]
            raise config.UsageError(f"{flag}: scenario {unrated[0]!r} has no rate cells; "
                                    f"use it with {', '.join(rated)}")
    if opts.task and not opts.app:
        raise config.UsageError("--task needs --app MODULE:APP (the app that defines it)")
    out = opts.out
    cli_params.check_writable(out, "--out")
    if variants:
        from .variants import run as variant_run

        chosen = variant_run.prepare_all(variants)   # bad specs: exit 2 before measuring
        measure = lambda opts, **kw: variant_run.run(opts, chosen, **kw)  # noqa: E731
    else:
        measure = runner.run

    from .progress import Progress

    progress = Progress(quiet=opts.quiet)

    def on_start(total):
        if not total:
            raise config.UsageError("no cell matches the filters given (--only/--transport)")
        progress.start(total, rounds=opts.rounds())

    with progress:
        result = measure(opts, on_cell=progress.cell_done, on_start=on_start,
                         on_cell_start=progress.cell_started)
    report.print_run(result, verbose=verbose)
    click.echo(f"results written to {out}")
    if html:
        from .exporters import write_html

        page = write_html(result, Path(out).with_suffix(".html"))
        click.echo(f"report written to {page}")
    bad = runner.failures(result)
    if bad:
        for cell in bad:
            click.echo(f"{cell.status}: {cell.key}: {cell.reason}", err=True)
        click.echo(f"celery-bench: {len(bad)} cell{'s' if len(bad) > 1 else ''} failed or "
                   f"lost messages", err=True)
        sys.exit(1)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("spec_a")
@click.argument("spec_b")
@click.pass_context
def ab(ctx, spec_a, spec_b):
    """Short for `run [SCENARIOS] [run options] --variant A=SPEC_A --variant B=SPEC_B`;
    read it with `compare RESULTS --by variant`."""
    args = [*ctx.args, "--variant", f"A={spec_a}", "--variant", f"B={spec_b}"]
    with run.make_context("run", args, parent=ctx.parent) as sub:
        run.invoke(sub)


@cli.command(name="list")
def list_():
    """Scenarios, transports, and which services are reachable now (and why not)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from . import brokers, scenarios

    console = Console()
    t = Table(title="scenarios", header_style="bold")
    t.add_column("name")
    t.add_column("what it measures")
    for name in scenarios.names():
        t.add_row(name, Text(scenarios.get(name).description))
    console.print(t)
    t = Table(title="transports", header_style="bold")
    for col in ("name", "needs", "reachable", "detail"):
        t.add_column(col)
    for name in brokers.names():
        try:
            info = brokers.info(name)
        except ImportError as exc:
            t.add_row(name, "-", "[red]no", f"module missing: {exc}")
            continue
        reach = brokers.reachability(name)
        t.add_row(name, info.service or "nothing (embedded)",
                  "[green]yes" if reach.ok else "[red]no",
                  reach.version or reach.reason or "")
    console.print(t)
    t = Table(title="services", header_style="bold")
    for col in ("service", "url", "reachable", "version / reason"):
        t.add_column(col)
    for name in config.DEFAULTS:
        reach = config.probe(name)
        t.add_row(name, config.mask_url(config.service_url(name)),
                  "[green]yes" if reach.ok else "[red]no", reach.version or reach.reason)
    console.print(t)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
             add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def broker(args):
    """Run the unix-socket broker in the foreground: celery-bench broker unix:///abs/path.sock
    [--max-queue-messages N --max-queue-bytes N --max-memory N ...] (--help lists them)."""
    from transports import broker as unix_broker

    # The broker's own parser: the same options as python -m transports.broker, so the
    # limits its errors advise raising exist here too. Bad input: one line, exit 2.
    sys.exit(unix_broker._cli(list(args), prog="celery-bench broker"))


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--width", type=click.IntRange(40, 10_000), default=100, show_default=True,
              help="Split tables wider than this many columns (figures are never cut).")
@click.option("--verbose", "-v", is_flag=True,
              help="Each percentile's 95% interval in a column of its own.")
def show(path, width, verbose):
    """Print the tables of a results file."""
    from . import report, results

    report.print_run(cli_params.load(path, results), width=width, verbose=verbose)


from .cli_results import compare, gate, report_  # noqa: E402 - after cli is defined
from .history_cli import history as _history_group  # noqa: E402

for _command in (compare, gate, report_, _history_group):
    cli.add_command(_command)


def main(argv=None):
    """Console entry point: one line and exit 2 for a user's mistake."""
    try:
        cli.main(args=argv, prog_name="celery-bench", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("celery-bench: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as exc:
        hint = f" (see 'celery-bench {exc.ctx.info_name} --help')" if exc.ctx else ""
        click.echo(f"celery-bench: error: {exc.format_message()}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"celery-bench: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except config.UsageError as exc:
        click.echo(f"celery-bench: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("celery-bench: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
