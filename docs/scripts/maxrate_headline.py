"""The README's max-rate headline, printed as Markdown from the results files the runs
wrote (so every figure in it is one the code produced):

    .venv/bin/python docs/scripts/maxrate_headline.py RUN1.json RUN2.json [BREAKDOWN.json [HIST]]

RUN1/RUN2: two `celery-bench run worker --max-rate --pool prefork` runs; BREAKDOWN: a
`run worker --only mode=latency|roundtrip --rate 100` run (the stage waterfall at 100/s);
HIST: the breakdown's wait column (default queue_wait; publish_to_start: from the intended time).
"""
import sys

from bench import percentiles, results, waterfall


def load_of(cell) -> str:
    loads = [r.get("loadavg_1m") for r in cell.repeats if r.get("loadavg_1m") is not None]
    return "/".join(f"{x:.1f}" for x in loads) or "?"


def pct(cell, hist: str, name: str) -> str:
    summary = cell.histograms.get(hist)
    p = percentiles.of_summary(summary, name) if summary else None
    if p is None or p.value is None:
        return "-"
    if not p.enough:
        return p.too_few
    return f"{p.value / 1000:.2f} ms ({p.lo / 1000:.2f}-{p.hi / 1000:.2f}, n={p.n:,})"


def by_transport(run) -> dict:
    return {c.params["transport"]: c for c in run.cells}


def agree(a: float, b: float) -> str:
    if not a and not b:
        return "both 0"
    return f"{min(a, b) / max(a, b):.2f}" if max(a, b) else "-"


def main(run1: str, run2: str, breakdown: str = "", wait: str = "queue_wait") -> None:
    one, two = (by_transport(results.load(p)) for p in (run1, run2))
    print("| transport | run 1 (load) | run 2 (load) | lower/higher | queue wait at the "
          "answer, run 2: p50 / p99 (95% interval, n) |")
    print("|---|---|---|---|---|")
    for t in one:
        a, b = one[t], two.get(t)
        if b is None:
            continue
        ra = a.metrics.get("max_sustainable_rate_per_s") or 0.0
        rb = b.metrics.get("max_sustainable_rate_per_s") or 0.0
        print(f"| {t} | {a.metrics.get('bracket')} ({load_of(a)}) | "
              f"{b.metrics.get('bracket')} ({load_of(b)}) | {agree(ra, rb)} | "
              f"{pct(b, 'queue_wait', 'p50')} / {pct(b, 'queue_wait', 'p99')} |")
    if not breakdown:
        return
    print()
    cells = results.load(breakdown).cells
    print("| transport, mode | " + " | ".join(waterfall.STAGES) + f" | total | {wait} "
          "p50 / p99 (95% interval, n) | load |")
    print("|---|" + "---:|" * (len(waterfall.STAGES) + 1) + "---|---|")
    for c in cells:
        m = c.metrics
        means = [m.get(f"waterfall.{s}.mean_us") for s in waterfall.STAGES]
        if None in means:
            continue
        caller = m.get("waterfall_in_hand") == waterfall.IN_HAND["caller"]
        if not caller:      # no caller waits: fetch is the harness's read, not a stage
            means = means[:-1]
        row = " | ".join(f"{v / 1000:.3f}" for v in means) + ("" if caller else " | n/a")
        print(f"| {c.params['transport']}, {c.params['mode']} | {row} | "
              f"{sum(means) / 1000:.3f} | {pct(c, wait, 'p50')} / "
              f"{pct(c, wait, 'p99')} | {load_of(c)} |")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4, 5):
        sys.exit(__doc__)
    main(*sys.argv[1:])
