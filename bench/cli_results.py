"""``celery-bench compare``, ``gate`` and ``report``: the commands that read results files.

Registered on the ``celery-bench`` group by :mod:`bench.cli`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import cli_params, config, gate_spec


@click.command()
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
                   "(default: throughputs, costs per message, p50 and p99).")
@click.option("--noise", type=float, callback=cli_params.finite_range("--noise", 0, 10),
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
    selectors = cli_params.selectors(cells)
    if out_format == "markdown" and len(paths) != 2:
        raise config.UsageError("--format markdown compares two results files: give BASE NEW")
    runs = [cli_params.load(p, results) for p in paths]
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


@click.command()
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
@click.option("--budget", type=float, callback=cli_params.finite_range("--budget", 0, 3600),
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
        cli_params.check_writable(out, "RESULTS")
        verdicts = ab_gate.against(against, out, spec, budget, missing, click.echo,
                                   rounds=rounds, head=head)
        if summary_path:
            _write_summary(summary_path, verdicts, out, cli_params.load(out, results), None, None,
                           report_url)
        _gate_verdicts(gates, verdicts, verbose)
        return
    if not path:
        raise config.UsageError("gate needs RESULTS (a results file), or --against REV")
    spec_ = gate_spec.load_spec(spec or gate_spec.default_spec_path())
    if summary_path and summary_path != "-":
        cli_params.check_writable(summary_path, "--summary")
    run_ = cli_params.load(path, results)
    base_path = baseline or spec_.baseline
    if write_baseline:
        if not base_path:
            raise config.UsageError("--write-baseline: no baseline file; set baseline = "
                                    "\"FILE\" in the spec or pass --baseline FILE")
        cli_params.check_writable(str(base_path), "--write-baseline")
        compact = gates.baseline_cells(spec_, run_)
        results.dump(compact, base_path)
        click.echo(f"wrote {len(compact.cells)} cells from {path} to {base_path}")
        return
    base_run = None
    if base_path and any(r.kind == "baseline" for r in spec_.rules):
        if not Path(base_path).exists():
            raise config.UsageError(f"baseline {base_path} does not exist; write it with "
                                    f"'celery-bench gate RESULTS --write-baseline'")
        base_run = cli_params.load(base_path, results)
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


@click.command(name="report")
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
    runs = [cli_params.load(p, results) for p in paths]
    selectors = cli_params.selectors(cells)
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
        cli_params.check_writable(where, "--out", folder=fmt == "hgrm")
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
