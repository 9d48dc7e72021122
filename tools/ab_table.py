"""A variant run's headline rows as one Markdown table (what README and docs/ab.md quote).

    .venv/bin/python tools/ab_table.py RESULTS.json

One row per cell and headline metric (publish: msg/s; worker: tasks/s; join: the whole
join's p50 and the lag p50; prefetch: the longest wait of a short task), with A, B, B/A and
its 95% interval from the paired rounds, as ``compare --by variant`` judges them.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import compare, results  # noqa: E402
from bench.report import fmt  # noqa: E402

HEADLINES = {"publish": ["throughput_per_s"], "worker": ["tasks_per_s"],
             "join": ["total.p50", "lag.p50"], "prefetch": ["short_wait_max_s"]}
SHOWN = ("api", "producer", "method", "transport", "backend", "pool", "prefetch_multiplier",
         "acks_late")


def table(path: str) -> str:
    run = results.load(path)
    lines = ["| scenario | cell | metric | A | B | B/A | verdict (95% CI, paired rounds) |",
             "|---|---|---|---|---|---|---|"]
    for scenario, metrics in HEADLINES.items():
        cells = [c for c in run.cells if c.scenario == scenario]
        if not cells:
            continue
        for group in compare.compare_within(results.Run({}, cells), "variant", metrics=metrics):
            label = " ".join(f"{group.shared[k]}" for k in SHOWN if k in group.shared)
            for _value, comps, note in group.rows:
                if note:
                    lines.append(f"| {scenario} | {label} | | | | | {note} |")
                for c in comps or []:
                    ratio = f"{c.ratio:.2f}" if c.ratio else "-"
                    lines.append(f"| {scenario} | {label} | {c.metric} | {fmt(c.base)}{c.unit} "
                                 f"| {fmt(c.new)}{c.unit} | {ratio} | {c.words} ({c.detail}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table(sys.argv[1]))
