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

from . import cli_params, config, run_options

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="celery-bench")
def cli():
    """Load tests and benchmarks for Celery and Kombu, recorded as HdrHistograms."""
    from . import plugins

    plugins.load()


@cli.command()
@run_options.click_params   # every option of `run` is declared once, in bench/run_options.py
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
    opts = runner.RunOptions.from_cli(given)
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
