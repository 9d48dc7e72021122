"""A short Markdown summary for a pull request: what a CI job posts as a comment or writes
to ``$GITHUB_STEP_SUMMARY``.

First screen: a one-line verdict, then a table of the gate rules that failed or could
not decide (with their intervals), then the largest movements with their intervals,
each linked to its scenario's section of the HTML report (``REPORT.html#s-publish``).
The verdicts are :mod:`bench.gate`'s and :mod:`bench.compare`'s, never re-judged here.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..report import fmt

TOP_MOVES = 8          # the largest movements listed
ICON = {"FAIL": "FAIL", "INCONCLUSIVE": "undecided", "WARN": "not measured"}


def _cell(text) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _scenario(key: str) -> str:
    return key.split("[", 1)[0]


def _link(key: str, report: str | None) -> str:
    return f"[{_cell(key)}]({report}#s-{_scenario(key)})" if report else f"`{_cell(key)}`"


def movements(comparisons_by_key, top: int = TOP_MOVES) -> list[tuple]:
    """``(key, comparison)`` of the largest movements first: the biggest |log ratio|
    among those judged (significant or not), so a reader sees what moved most and how
    sure the interval is."""
    rows = [(k, c) for k, cs in comparisons_by_key for c in cs
            if c.ratio and c.ratio > 0 and c.verdict is not None]
    rows.sort(key=lambda kc: -abs(math.log(kc[1].ratio)))
    return rows[:top]


def _moves_table(moves, report: str | None, base_name: str, new_name: str) -> list[str]:
    if not moves:
        return ["No judged movement (nothing compared with enough repeats)."]
    out = [f"| cell | metric | {_cell(base_name)} | {_cell(new_name)} | verdict | interval |",
           "|---|---|---:|---:|---|---|"]
    for key, c in moves:
        out.append(f"| {_link(key, report)} | {_cell(c.metric)} | "
                   f"{_cell(fmt(c.base))}{_cell(c.unit)} | "
                   f"{_cell(fmt(c.new))}{_cell(c.unit)} | "
                   f"{'**' if c.significant else ''}{_cell(c.words)}"
                   f"{'**' if c.significant else ''} | {_cell(c.detail)} |")
    return out


def _report_line(report: str | None) -> list[str]:
    return [f"Full report: [{report}]({report})", ""] if report else []


def gate_markdown(verdicts, run_name: str, report: str | None = None,
                  pairs=None, base_name: str = "baseline") -> str:
    """The gate's verdicts (``bench.gate.Verdict``) as Markdown; ``pairs``: the run
    compared with its baseline (``bench.compare.compare_runs``), for the movements."""
    from .. import gate as gates

    failed = [v for v in verdicts if v.status == "FAIL"]
    open_ = [v for v in verdicts if v.status in ("INCONCLUSIVE", "WARN")]
    word = "FAIL" if failed else ("PASS with warnings" if open_ else "PASS")
    out = [f"**celery-bench gate: {word}** on `{_cell(run_name)}`: {gates.summary(verdicts)}",
           ""]
    if failed or open_:
        out += ["| result | rule | cells | verdict and interval |", "|---|---|---|---|"]
        for v in failed + open_:
            cells = ", ".join(_link(k, report) for k in v.cells) or "-"
            out.append(f"| {'**FAIL**' if v.status == 'FAIL' else ICON[v.status]} | "
                       f"{_cell(v.rule.name)} | {cells} | {_cell(v.text)} |")
        out.append("")
        why = [f"- {_cell(v.rule.name)}: {_cell(v.rule.why)}" for v in failed if v.rule.why]
        if why:
            out += ["Why these bounds:", *dict.fromkeys(why), ""]
    else:
        out += ["Every rule passed.", ""]
    if pairs is not None:
        out += [f"### Largest movements against {_cell(base_name)}", ""]
        out += _moves_table(movements((p.key, p.comparisons) for p in pairs), report,
                            base_name, run_name)
        out.append("")
    return "\n".join(out + _report_line(report)).rstrip() + "\n"


def compare_markdown(pairs, base_name: str, new_name: str, report: str | None = None) -> str:
    """``compare BASE NEW`` as Markdown: a verdict line, the significant changes, the
    largest movements."""
    from .. import compare as cmp

    every = cmp.every_comparison(pairs)
    slower = [(p.key, c) for p in pairs for c in p.comparisons
              if c.significant and c.direction == "slower"]
    faster = [(p.key, c) for p in pairs for c in p.comparisons
              if c.significant and c.direction == "faster"]
    word = "slower" if slower else ("faster" if faster else "no significant change")
    out = [f"**celery-bench compare: {word}**, `{_cell(new_name)}` against "
           f"`{_cell(base_name)}`: {cmp.summary_counts(every)}", ""]
    if slower or faster:
        out += ["### Significant changes", ""]
        out += _moves_table(slower + faster, report, base_name, new_name)
        out.append("")
    not_compared = [p for p in pairs if p.note]
    if not_compared:
        out += [f"{len(not_compared)} cell(s) not compared: "
                + "; ".join(f"{_cell(p.key)} ({_cell(p.note)})" for p in not_compared[:5])
                + (" ..." if len(not_compared) > 5 else ""), ""]
    listed = {id(c) for _, c in slower + faster}
    out += ["### Other largest movements" if listed else "### Largest movements", ""]
    out += _moves_table(movements((p.key, [c for c in p.comparisons if id(c) not in listed])
                                  for p in pairs), report, base_name, new_name)
    out.append("")
    return "\n".join(out + _report_line(report)).rstrip() + "\n"


def write(path, text: str) -> None:
    """Write (``-``: print) a summary."""
    if str(path) == "-":
        print(text, end="")
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def report_href(results_path, summary_path=None, given: str | None = None) -> str | None:
    """Where the summary links: ``given`` (a URL, e.g. a CI artifact), else the HTML
    report written beside RESULTS (``RESULTS.html``) relative to the summary, if it exists."""
    import os

    if given:
        return given
    page = Path(results_path).with_suffix(".html")
    if not page.exists():
        return None
    start = Path(summary_path).parent if summary_path and str(summary_path) != "-" else Path(".")
    return os.path.relpath(page, start)


def write_gate(path, verdicts, run_name: str, run, baseline=None, baseline_name=None,
               report: str | None = None) -> None:
    """``gate --summary``: the verdicts, and the movements against the baseline if any."""
    pairs = None
    if baseline is not None:
        from ..compare import compare_runs

        pairs = compare_runs(baseline, run)
    write(path, gate_markdown(verdicts, str(run_name), report, pairs,
                              str(baseline_name or "baseline")))
