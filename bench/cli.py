"""``celery-bench``: run scenarios, list what can run here, run a unix broker,
and read results files (show / compare / gate).

A user's mistake prints one line (which setting, what was wrong, what to do)
and exits 2; Ctrl-C exits 130 after writing the results measured so far.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import config

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_float(name):
    def parse(ctx, param, value):
        if value is not None and not value > 0:
            raise click.BadParameter(f"must be > 0, got {value}", param_hint=name)
        return value
    return parse


def _service_url(service):
    def parse(ctx, param, value):
        if value:
            if "://" not in value:
                raise click.BadParameter(f"{value!r} is not a URL (scheme://host...)",
                                         param_hint=param.opts[0])
            config.set_service_url(service, value)
        return value
    return parse


def _app_spec(ctx, param, value):
    if value is None:
        return None
    module, sep, attr = value.partition(":")
    if not sep or not module or not attr:
        raise click.BadParameter(f"{value!r}: expected MODULE:APP, e.g. proj.celery:app",
                                 param_hint="--app")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="celery-bench")
def cli():
    """Load tests and benchmarks for Celery and Kombu, recorded as HdrHistograms."""


@cli.command()
@click.argument("scenarios", nargs=-1)
@click.option("--quick", is_flag=True, help="The quick slice of each scenario (make bench).")
@click.option("--transport", "transports", multiple=True, metavar="NAME",
              help="Keep cells over this transport (repeatable). Unreachable -> exit 2.")
@click.option("--only", multiple=True, metavar="KEY=VALUE",
              help="Keep cells whose param KEY equals VALUE (repeatable), e.g. api=kombu.")
@click.option("--repeat", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Repeat each cell N times; medians and spread over repeats.")
@click.option("--duration", type=float, callback=_positive_float("--duration"),
              help="Seconds of measurement per cell.")
@click.option("--messages", type=click.IntRange(1, 100_000_000),
              help="Messages per cell (instead of --duration).")
@click.option("--rate", type=float, callback=_positive_float("--rate"),
              help="Open loop: send at this many per second, latency from intended time.")
@click.option("--warmup", type=float, help="Seconds of warm-up before measuring.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              callback=_positive_float("--timeout"), help="Longest single wait, seconds.")
@click.option("--serializer", "serializers", multiple=True,
              type=click.Choice(["json", "pickle", "msgpack", "yaml"]),
              help="Serializers for publish cells (default json and pickle).")
@click.option("--payload-bytes", type=click.IntRange(0, 64 * 1024 * 1024),
              help="Message body size for publish cells (default 112).")
@click.option("--app", "app", callback=_app_spec, metavar="MODULE:APP",
              help="Point the celery cells at your own app (and its broker).")
@click.option("--task", metavar="NAME", help="Task name the celery cells send (with --app).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads", "eventlet", "gevent"]),
              default="prefork", show_default=True, help="Worker pool for worker scenarios.")
@click.option("--concurrency", type=click.IntRange(1, 256), help="Worker concurrency.")
@click.option("--task-seconds", type=click.FloatRange(0, 3600),
              help="Seconds each task sleeps in join cells.")
@click.option("--redis-url", callback=_service_url("redis"), expose_value=False,
              help=f"Redis URL (env {config.ENV_VARS['redis']}).")
@click.option("--amqp-url", callback=_service_url("amqp"), expose_value=False,
              help=f"RabbitMQ URL (env {config.ENV_VARS['amqp']}).")
@click.option("--postgres-url", callback=_service_url("postgres"), expose_value=False,
              help=f"PostgreSQL URL (env {config.ENV_VARS['postgres']}).")
@click.option("--out", default="results/latest.json", show_default=True,
              type=click.Path(dir_okay=False), help="Results file, rewritten after every cell.")
@click.option("--quiet", is_flag=True, help="No progress bars: one plain line per cell.")
def run(scenarios, quick, transports, only, repeat, duration, messages, rate, warmup, timeout,
        serializers, payload_bytes, app, task, pool, concurrency, task_seconds, out, quiet):
    """Run SCENARIOS (default: all of them) and write a results file."""
    from . import brokers, report, runner

    for name in transports:
        brokers.module(name)  # validates the name: one line, exit 2
    opts = runner.RunOptions(
        scenarios=tuple(scenarios) or runner.DEFAULT_SCENARIOS, quick=quick,
        transports=tuple(transports), only=runner.parse_only(only), repeat=repeat,
        duration=duration, rate=rate, messages=messages, warmup=warmup, timeout=timeout,
        pool=pool, concurrency=concurrency, task_seconds=task_seconds, app=app, task=task,
        payload_bytes=payload_bytes, serializers=tuple(serializers), out=out, quiet=quiet)
    for name in opts.scenarios:
        runner.scenario_module(name)
    if task and not app:
        raise config.UsageError("--task needs --app MODULE:APP (the app that defines it)")

    console = report.Console(stderr=True)
    progress = None

    def on_start(cells):
        nonlocal progress
        if not cells:
            raise config.UsageError("no cell matches the filters given (--only/--transport)")
        if not quiet and console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
            progress = Progress(TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, transient=True)
            progress.start()
            progress.add_task("cells", total=len(cells))

    def on_cell(cell):
        line = report.cell_line(cell)
        if progress is not None:
            progress.console.print(line, markup=False, highlight=False)
            progress.advance(0)
        else:
            click.echo(line, err=True)

    try:
        result = runner.run(opts, on_cell=on_cell, on_start=on_start)
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
        click.echo(f"interrupted: results so far written to {out}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if progress is not None:
            progress.stop()
    report.print_run(result)
    click.echo(f"results written to {out}")


@cli.command(name="list")
def list_():
    """Scenarios, transports, and which services are reachable now (and why not)."""
    from rich.console import Console
    from rich.table import Table

    from . import brokers, runner

    console = Console()
    t = Table(title="scenarios", header_style="bold")
    t.add_column("name")
    t.add_column("what it measures")
    for name in runner.SCENARIOS:
        try:
            t.add_row(name, runner.scenario_module(name).DESCRIPTION)
        except ImportError as exc:
            t.add_row(name, f"[red]unavailable: {exc}")
    console.print(t)
    t = Table(title="transports", header_style="bold")
    for col in ("name", "needs", "reachable", "detail"):
        t.add_column(col)
    for name in brokers.names():
        try:
            mod = brokers.module(name)
        except ImportError as exc:
            t.add_row(name, "-", "[red]no", f"module missing: {exc}")
            continue
        reach = brokers.reachability(name)
        t.add_row(name, mod.SERVICE or "nothing (embedded)",
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


@cli.command()
@click.argument("url")
def broker(url):
    """Run the unix-socket broker in the foreground: celery-bench broker unix:///abs/path.sock"""
    from transports import broker as unix_broker

    unix_broker.main(url)


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def show(path):
    """Print the tables of a results file."""
    from . import report, results

    report.print_run(_load(path, results))


def _load(path, results):
    try:
        return results.load(path)
    except (OSError, ValueError) as exc:
        raise config.UsageError(f"{path}: not a celery-bench results file ({exc})")


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
