"""The tables of ``celery-bench show`` as GitHub markdown (for a README or a PR)."""
from __future__ import annotations

from .. import results
from ..report import fmt, plan_tables


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(run: results.Run) -> str:
    env = run.environment
    lines = [f"celery {env.get('celery', '?')}, kombu {env.get('kombu', '?')}, "
             f"Python {env.get('python', '?')}, {env.get('cpu_count', '?')} x "
             f"{env.get('cpu_model', '?')}, {env.get('utc_time', '')}", ""]
    by_scenario: dict[str, list] = {}
    for c in run.cells:
        by_scenario.setdefault(c.scenario, []).append(c)
    for name, cells in by_scenario.items():
        for plan in plan_tables(name, cells):
            lines.append(f"### {plan.title}")
            if plan.caption:
                lines += ["", ", ".join(plan.caption)]
            header = plan.params + [c.header for c in plan.columns] + ["status"]
            lines += ["", "| " + " | ".join(header) + " |",
                      "|" + "|".join(["---"] * len(plan.params) + ["---:"] * len(plan.columns)
                                     + ["---"]) + "|"]
            for c in plan.cells:
                row = [fmt(c.params.get(k)) for k in plan.params]
                row += [" ".join(filter(None, t)) for t in plan.row(c)]
                row.append(f"{c.status}: {c.reason}" if c.reason else c.status)
                lines.append("| " + " | ".join(_escape(v) for v in row) + " |")
            lines.append("")
    return "\n".join(lines)
