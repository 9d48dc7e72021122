"""``celery-bench``: run scenarios, list what can run here, run a unix broker,
and read results files (show / compare / gate).

A user's mistake prints one line (which setting, what was wrong, what to do)
and exits 2; Ctrl-C exits 130 after writing the results measured so far.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from . import config, options

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_float(name, example=""):
    """A finite number > 0 (inf and nan refused): seconds, a rate."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return options.parse_positive_float(value, name, example)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None
    return parse


def _seconds(name, maximum=None, example=""):
    """A finite number of seconds >= 0 (0: none), at most ``maximum``."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return options.parse_seconds(value, name, maximum, example)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None
    return parse


def _finite_range(name, low, high):
    """A finite number from ``low`` to ``high`` (click's FloatRange lets nan through)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return options.parse_float(value, name, minimum=low, open_min=False, maximum=high)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None
    return parse


def _service_url(service):
    """The flag's URL, checked and set for this process and its workers; without the
    flag, the environment variable's URL is checked here too (before anything runs)."""
    def parse(ctx, param, value):
        if value is None:
            config.service_url(service)  # a bad CELERY_BENCH_*_URL: one line, exit 2
            return None
        name = param.opts[0]
        try:
            options.parse_service_url(service, value, name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None
        config.set_service_url(service, value, name)
        return value
    return parse


def _app_spec(ctx, param, value):
    if value is None:
        return None
    try:
        return options.parse_app_spec(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--app") from None


def _serializers(ctx, param, values):
    """Each --serializer must be installed here (pickle only when named: JSON otherwise)."""
    try:
        return tuple(options.parse_serializer(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--serializer") from None


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
@click.option("--duration", type=float, callback=_positive_float("--duration", "10"),
              help="Seconds of measurement per cell.")
@click.option("--messages", type=click.IntRange(1, 100_000_000),
              help="Messages per cell (instead of --duration).")
@click.option("--rate", type=float, callback=_positive_float("--rate", "2000"),
              help="Open loop: send at this many per second, latency from intended time.")
@click.option("--warmup", type=float, callback=_seconds("--warmup", 3600, "1"),
              help="Seconds of warm-up before measuring.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              callback=_positive_float("--timeout", "120"),
              help="Longest single wait, seconds.")
@click.option("--serializer", "serializers", multiple=True,
              type=click.Choice(["json", "pickle", "msgpack", "yaml"]), callback=_serializers,
              help="Serializers for publish/consume cells (default json; pickle only when "
                   "named, and only that cell's consumer unpickles).")
@click.option("--payload-bytes", type=click.IntRange(0, 64 * 1024 * 1024),
              help="Message body size for publish cells (default 112).")
@click.option("--app", "app", callback=_app_spec, metavar="MODULE:APP",
              help="Point the celery cells at your own app (and its broker).")
@click.option("--task", metavar="NAME", help="Task name the celery cells send (with --app).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads", "eventlet", "gevent"]),
              help="Worker pool for worker scenarios (default: prefork; the worker "
                   "scenario runs solo and prefork unless given).")
@click.option("--concurrency", type=click.IntRange(1, 256), help="Worker concurrency.")
@click.option("--task-seconds", type=float, callback=_seconds("--task-seconds", 3600, "0.01"),
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
@click.option("--rate-sweep", metavar="START:STOP[:STEPS]",
              help="Open-loop rate ladder (geometric, 5 steps by default) for the rated "
                   "scenarios (worker, publish): each step held --duration s, latency "
                   "from the intended send time.")
@click.option("--max-rate", is_flag=True,
              help="Find the highest rate each rated cell sustains: >= 98%% of the rate "
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
              help="Tables: each percentile's 95%% interval in a column of its own.")
def run(scenarios, quick, transports, only, repeat, duration, messages, rate, warmup, timeout,
        serializers, payload_bytes, app, task, pool, concurrency, task_seconds, out, quiet,
        rate_sweep, max_rate, slo, html, instructions, restart_cmd, start_cmd, cpus=None,
        variants=(), verbose=False):
    """Run SCENARIOS (default: all of them) and write a results file.

    Exits 1 when a cell failed or lost messages (unless its transport declares that loss
    as a known behaviour), naming them."""
    started = time.time()
    try:
        _run(scenarios, quick, transports, only, repeat, duration, messages, rate, warmup,
             timeout, serializers, payload_bytes, app, task, pool, concurrency, task_seconds,
             out, quiet, rate_sweep, max_rate, slo, html, instructions, restart_cmd,
             start_cmd, variants, started, verbose, cpus)
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


def _run(scenarios, quick, transports, only, repeat, duration, messages, rate, warmup,
         timeout, serializers, payload_bytes, app, task, pool, concurrency, task_seconds,
         out, quiet, rate_sweep, max_rate, slo, html, instructions, restart_cmd, start_cmd,
         variants, started, verbose=False, cpus=None):
    from . import brokers, report, runner
    from . import scenarios as registry

    for name in transports:
        brokers.info(name)  # validates the name: one line, exit 2
    for name in scenarios:
        registry.get(name)  # one line, exit 2
    opts = runner.RunOptions(
        scenarios=tuple(scenarios), quick=quick,
        transports=tuple(transports), only=runner.parse_only(only), repeat=repeat,
        duration=duration, rate=rate, messages=messages, warmup=warmup, timeout=timeout,
        pool=pool, concurrency=concurrency, task_seconds=task_seconds, app=app, task=task,
        payload_bytes=payload_bytes, serializers=tuple(serializers), out=out, quiet=quiet,
        instructions=instructions, rate_sweep=_sweep(rate_sweep), max_rate=max_rate,
        slo=_slo(slo), restart_cmd=restart_cmd, start_cmd=start_cmd, cpus=_cpus(cpus))
    if instructions:
        registry.get(runner.INSTRUCTIONS)
    if rate_sweep or max_rate:
        flag = "--rate-sweep" if rate_sweep else "--max-rate"
        unrated = [n for n in scenarios if not registry.get(n).rated]
        if unrated:
            rated = [n for n in registry.names() if registry.get(n).rated]
            raise config.UsageError(f"{flag}: scenario {unrated[0]!r} has no rate cells; "
                                    f"use it with {', '.join(rated)}")
    if task and not app:
        raise config.UsageError("--task needs --app MODULE:APP (the app that defines it)")
    _check_writable(out, "--out")
    if variants:
        from .variants import run as variant_run

        chosen = variant_run.prepare_all(variants)   # bad specs: exit 2 before measuring
        measure = lambda opts, **kw: variant_run.run(opts, chosen, **kw)  # noqa: E731
    else:
        measure = runner.run

    from .progress import Progress

    progress = Progress(quiet=quiet)

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


def _sweep(text):
    from .maxrate import SpecError, parse_sweep

    if text is None:
        return ()
    try:
        return parse_sweep(text)
    except SpecError as exc:
        raise config.UsageError(f"--rate-sweep {exc}") from None


def _cpus(text):
    from .placement import parse_cpus

    if text is None:
        return None
    try:
        parse_cpus(text)
    except ValueError as exc:
        raise config.UsageError(f"--cpus {exc}") from None
    return text


def _slo(text):
    from .maxrate import SLO, SpecError

    if text is None:
        return None
    try:
        return SLO.parse(text).text
    except SpecError as exc:
        raise config.UsageError(f"--slo {exc}") from None


def _check_writable(path: str, option: str, folder: bool = False) -> None:
    """Fail before measuring, not after: one line naming the option, exit 2.
    ``folder``: ``path`` is a folder to write files in (made if missing)."""
    target = Path(path)
    if folder:
        if target.exists() and not target.is_dir():
            raise config.UsageError(f"{option} {path}: is a file; give a folder")
    elif target.exists() and target.is_dir():
        raise config.UsageError(f"{option} {path}: is a folder; give a file path")
    folder = target if folder else (target.parent if str(target.parent) else Path("."))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".celery-bench-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise config.UsageError(f"{option} {path}: cannot write there "
                                f"({exc.strerror or exc}); choose a writable path") from None


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
              help="Each percentile's 95%% interval in a column of its own.")
def show(path, width, verbose):
    """Print the tables of a results file."""
    from . import report, results

    report.print_run(_load(path, results), width=width, verbose=verbose)


def _load(path, results):
    try:
        return results.load(path)
    except FileNotFoundError:
        raise config.UsageError(f"{path}: no such results file (run 'celery-bench run' first)")
    except (OSError, ValueError) as exc:
        raise config.UsageError(f"{path}: not a celery-bench results file ({exc})")


def _selectors(values, option="--cell"):
    from .compare import parse_selector

    try:
        return [parse_selector(v) for v in values]
    except ValueError as exc:
        raise config.UsageError(f"{option}: {exc}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="BASE [NEW]")
@click.option("--by", metavar="PARAM",
              help="One run: compare cells that differ only in PARAM, e.g. --by producer.")
@click.option("--ref", metavar="VALUE",
              help="With --by: the reference value (default: each group's first).")
@click.option("--cell", "cells", multiple=True, metavar="SELECTOR",
              help="Only cells matching scenario[key=value,...] (repeatable). One run and "
                   "two --cell: compare those two cells.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Metric to compare, e.g. throughput_per_s or publish_us.p99 "
                   "(default: throughputs, p50 and p99).")
@click.option("--noise", type=float, callback=_finite_range("--noise", 0, 10),
              metavar="FRACTION",
              help="Smallest difference called: the 95% interval must lie beyond "
                   "1/(1+FRACTION)-(1+FRACTION). Default 0.30 across runs (a shared "
                   "machine drifts between runs), 0.05 within one run (rounds paired).")
@click.option("--fail-on", type=click.Choice(["slower", "faster", "any"]),
              help="Exit 1 when any row is significantly slower (or faster, or either "
                   "way, 'any' including higher/lower of metrics with no better side).")
@click.option("--format", "out_format", type=click.Choice(["text", "markdown"]),
              default="text", show_default=True,
              help="markdown (BASE NEW only): a pull-request summary, verdict line first.")
def compare(paths, by, ref, cells, metrics, noise, fail_on, out_format):
    """Compare two results files cell by cell, or cells within one run (--by / two --cell).

    \b
    Each row: "1.80x faster (95% CI 1.62-1.98, 5 vs 5 repeats, p=0.0004)",
    "no significant difference (...)", or "not enough repeats to judge" (fewer
    than 3 repeats a side: the ratio is shown as measured). Within one run,
    repeats pair by the round they were measured in. Exit 0, or 1 with --fail-on.
    """
    from . import compare as cmp
    from . import results

    if len(paths) > 2:
        raise config.UsageError(f"compare takes one or two results files, got {len(paths)}")
    if ref and not by:
        raise config.UsageError("--ref needs --by PARAM")
    selectors = _selectors(cells)
    if out_format == "markdown" and len(paths) != 2:
        raise config.UsageError("--format markdown compares two results files: give BASE NEW")
    runs = [_load(p, results) for p in paths]
    metrics = list(metrics) or None
    if len(runs) == 2:
        if by:
            raise config.UsageError("--by compares cells within ONE run; give one results file")
        pairs = cmp.compare_runs(runs[0], runs[1], metrics, noise, selectors)
        if out_format == "markdown":
            from .exporters import summary as md

            click.echo(md.compare_markdown(pairs, paths[0], paths[1],
                                           md.report_href(paths[1])), nl=False)
        else:
            click.echo(cmp.format_runs(pairs, paths[0], paths[1], noise))
        judged = cmp.every_comparison(pairs)
    elif by:
        groups = cmp.compare_within(runs[0], by, ref, metrics, noise, selectors)
        if not groups:
            raise config.UsageError(f"--by {by}: no two cells differ only in {by}")
        click.echo(cmp.format_within(groups, paths[0], noise))
        judged = cmp.every_comparison(groups)
    elif len(selectors) == 2:
        found = []
        for sel in selectors:
            matches = sel.matches(runs[0])
            if len(matches) != 1:
                raise config.UsageError(f"--cell {sel}: matches {len(matches)} cells in "
                                        f"{paths[0]}; it must match exactly one")
            found.append(matches[0])
        pair = cmp.compare_pair(found[0], found[1], metrics, noise)
        click.echo(cmp.format_runs([pair], found[0].key, found[1].key, noise, paired=True))
        judged = pair.comparisons
    else:
        raise config.UsageError("compare needs BASE NEW, or one run with --by PARAM "
                                "or two --cell SELECTOR")
    if fail_on:
        failed = cmp.failing(judged, fail_on)
        if failed:
            click.echo(f"--fail-on {fail_on}: {len(failed)} row(s) significantly "
                       f"{fail_on if fail_on != 'any' else 'different'}")
            sys.exit(1)


@cli.command()
@click.argument("path", metavar="RESULTS", required=False)
@click.option("--spec", type=click.Path(dir_okay=False),
              help="Gate spec (default results/baselines/gates.toml; with --against, "
                   "results/baselines/gates-ab.toml).")
@click.option("--baseline", type=click.Path(dir_okay=False),
              help="Baseline results file (default: the spec's 'baseline').")
@click.option("--missing", type=click.Choice(["warn", "fail", "ignore"]),
              help="A rule whose cell was not measured: warn, fail or ignore "
                   "(default: the spec's).")
@click.option("--write-baseline", is_flag=True,
              help="Write the cells the baseline rules read from RESULTS to the baseline file.")
@click.option("--budget", type=float, callback=_finite_range("--budget", 0, 3600),
              default=180.0, show_default=True,
              help="Seconds the gate may spend re-measuring the cells of rules whose interval "
                   "could not decide (0: never re-measure; those rules then warn).")
@click.option("--across-versions", is_flag=True,
              help="Judge rules against a baseline measured with another python/celery/kombu "
                   "(same CPU model only); otherwise those rules warn, not comparable.")
@click.option("--verbose", "-v", is_flag=True, help="One line per cell, passes included.")
@click.option("--against", metavar="REV",
              help="Measure the spec's cells now as variants base=git:REV and head=the "
                   "working tree, and judge head/base ratios (RESULTS: where to write them, "
                   "default results/ab-gate.json). No stored baseline.")
@click.option("--head", "head", default="here", show_default=True, metavar="SPEC",
              help="With --against: what head is (a variant SPEC, e.g. conf:KEY=VALUE).")
@click.option("--rounds", type=click.IntRange(3, 100), default=5, show_default=True,
              help="With --against: paired rounds measured before judging.")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False), metavar="FILE.md",
              help="Also write a Markdown summary for a pull request (verdict, failed and "
                   "undecided rules, largest movements; '-': stdout).")
@click.option("--report-url", metavar="URL",
              help="With --summary: where its links point (default RESULTS.html if it exists).")
def gate(path, spec, baseline, missing, write_baseline, budget, across_versions, verbose,
         summary_path=None, report_url=None, against=None, head="here", rounds=5):
    """Check RESULTS against the gate spec: exit 1 if any rule fails.

    A rule passes when the 95% interval of its per-round values is on the right side of
    its bound and fails only when it is wholly on the wrong side. Rules in between are
    re-measured (more rounds of just their cells, written back to RESULTS) within
    --budget seconds; still undecided, they warn."""
    from . import gate as gates
    from . import results, runner

    if against:
        from .variants import gate as ab_gate

        out = path or "results/ab-gate.json"
        _check_writable(out, "RESULTS")
        verdicts = ab_gate.against(against, out, spec, budget, missing, click.echo,
                                   rounds=rounds, head=head)
        if summary_path:
            _write_summary(summary_path, verdicts, out, _load(out, results), None, None,
                           report_url)
        _gate_verdicts(gates, verdicts, verbose)
        return
    if not path:
        raise config.UsageError("gate needs RESULTS (a results file), or --against REV")
    spec_ = gates.load_spec(spec or gates.default_spec_path())
    if summary_path and summary_path != "-":
        _check_writable(summary_path, "--summary")
    run_ = _load(path, results)
    base_path = baseline or spec_.baseline
    if write_baseline:
        if not base_path:
            raise config.UsageError("--write-baseline: no baseline file; set baseline = "
                                    "\"FILE\" in the spec or pass --baseline FILE")
        _check_writable(str(base_path), "--write-baseline")
        compact = gates.baseline_cells(spec_, run_)
        results.dump(compact, base_path)
        click.echo(f"wrote {len(compact.cells)} cells from {path} to {base_path}")
        return
    base_run = None
    if base_path and any(r.kind == "baseline" for r in spec_.rules):
        if not Path(base_path).exists():
            raise config.UsageError(f"baseline {base_path} does not exist; write it with "
                                    f"'celery-bench gate RESULTS --write-baseline'")
        base_run = _load(base_path, results)
        if across_versions:
            base_run.environment["_across_versions"] = True
        differs = gates.not_comparable(run_, base_run)
        if differs:
            click.echo(f"not comparable: {differs}; the rules against {base_path} warn "
                       f"and decide nothing")
    click.echo(f"gates {spec_.path} on {path}"
               + (f" (baseline {base_path})" if base_run else ""))
    verdicts = gates.decide(lambda: gates.run_gates(spec_, run_, base_run, missing), run_,
                            lambda keys, rounds: runner.remeasure(run_, keys, rounds),
                            budget, click.echo, path)
    if summary_path:
        _write_summary(summary_path, verdicts, path, run_, base_run, base_path, report_url)
    _gate_verdicts(gates, verdicts, verbose)


def _gate_verdicts(gates, verdicts, verbose) -> None:
    for line in gates.report_lines(verdicts, verbose):
        click.echo(line)
    click.echo(gates.summary(verdicts))
    if any(v.status == "FAIL" for v in verdicts):
        sys.exit(1)


def _write_summary(summary_path, verdicts, path, run_, base_run, base_path, report_url):
    from .exporters import summary as md

    md.write_gate(summary_path, verdicts, path, run_, base_run, base_path,
                  md.report_href(path, summary_path, report_url))


@cli.command(name="report")
@click.argument("paths", nargs=-1, required=True, metavar="RESULTS [NEW]")
@click.option("--format", "fmt", default="md", show_default=True,
              type=click.Choice(["md", "csv", "png", "hgrm", "hlog", "html"]),
              help="md/csv tables; png percentile spectra; hgrm (HdrHistogram percentile "
                   "files, one per histogram) or hlog (an HdrHistogram interval log); html "
                   "(a self-contained page; with two results files, a comparison).")
@click.option("--out", type=click.Path(),
              help="md/csv: a file (default stdout); png/hlog/html: a file (default RESULTS "
                   "with that suffix); hgrm: a folder (default RESULTS-hgrm/).")
@click.option("--cell", "cells", multiple=True, metavar="SELECTOR",
              help="Only cells matching scenario[key=value,...] (repeatable).")
@click.option("--hist", "hists", multiple=True, metavar="NAME",
              help="png/hgrm/hlog: only these histograms (repeatable).")
def report_(paths, fmt, out, cells, hists):
    """Export a results file as tables, charts, HdrHistogram files or an HTML page;
    two results files (BASE NEW) as an HTML comparison."""
    from . import exporters, results

    if len(paths) > 2:
        raise config.UsageError(f"report takes one or two results files, got {len(paths)}")
    if len(paths) == 2 and fmt != "html":
        raise config.UsageError(f"two results files compare only as --format html, "
                                f"not {fmt}")
    runs = [_load(p, results) for p in paths]
    selectors = _selectors(cells)
    if selectors:
        for i, run_ in enumerate(runs):
            chosen = {id(c) for s in selectors for c in s.matches(run_)}
            runs[i] = results.Run(run_.environment, [c for c in run_.cells if id(c) in chosen])
        if not any(r.cells for r in runs):
            raise config.UsageError("--cell: no cell of the run matches")
    path, run_ = paths[-1], runs[-1]
    names = set(hists) or None
    if out or fmt not in exporters.TEXT_FORMATS:  # where it will write, checked first
        if out:
            where = out
        elif fmt == "hgrm":
            where = str(Path(path).with_name(Path(path).stem + "-hgrm"))
        elif fmt == "html" and len(runs) == 2:
            where = str(Path(path).with_suffix(".compare.html"))
        else:
            where = str(Path(path).with_suffix(f".{fmt}"))
        _check_writable(where, "--out", folder=fmt == "hgrm")
    if fmt in exporters.TEXT_FORMATS:
        text = exporters.TEXT_FORMATS[fmt](run_)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text)
            click.echo(f"wrote {out}")
        else:
            click.echo(text, nl=False)
        return
    try:
        if fmt == "hgrm":
            folder = Path(out) if out else Path(path).with_name(Path(path).stem + "-hgrm")
            written = exporters.hgrm(run_, folder, hist_names=names)
            click.echo(f"wrote {len(written)} .hgrm file{'s' * (len(written) != 1)} "
                       f"to {folder}")
            return
        if fmt == "html" and len(runs) == 2:
            target = Path(out) if out else Path(path).with_suffix(".compare.html")
            exporters.write_compare_html(runs[0], runs[1], target, Path(paths[0]).name,
                                         Path(paths[1]).name)
        else:
            target = Path(out) if out else Path(path).with_suffix(f".{fmt}")
            if fmt == "png":
                exporters.png(run_, target, hist_names=names)
            elif fmt == "hlog":
                exporters.hlog(run_, target, hist_names=names)
            else:
                exporters.write_html(run_, target)
    except ValueError as exc:
        raise config.UsageError(f"--format {fmt}: {exc}")
    except IsADirectoryError:
        raise config.UsageError(f"--out {out}: is a folder; give a file path")
    click.echo(f"wrote {target}")


from .history_cli import history as _history_group  # noqa: E402 - after cli is defined

cli.add_command(_history_group)


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
