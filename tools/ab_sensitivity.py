"""How often does an A/B run call a known slowdown, and how often does A/A call anything?

Issue 15's proof, measured on this machine (docs/ab.md records the figures):

- ``slow``: RUNS runs of ``celery-bench ab here env:PYTHONPATH=DIR`` on the kombu held
  publish cell (memory), DIR holding a ``sitecustomize`` that makes B's
  ``kombu.messaging.Producer.publish`` spin ``--slowdown`` (default 10%) of a publish's
  cost more, sized from a publish timed in this process just before each run. Each run is
  judged by ``compare --by variant`` rules (bench.compare.compare_within): is each of
  ``SLOW_METRICS`` called "slower" (throughput; CPU per message and CPU per message in
  calibration units, which preemption on a shared machine inflates least)? ``--same``:
  the same runs with B unpatched (A/A on that cell and those rounds).
- ``aa``: RUNS runs of ``celery-bench gate --against HEAD --head env:CB_AA=1`` with the
  rules of results/baselines/gates-ab.toml that need no worker-throughput or callgrind
  cells (``--full`` keeps them all), i.e. the same tree as base and head: gate failures,
  and the share of ``compare --by variant`` rows (every default metric of every cell)
  "no significant difference".

    .venv/bin/python tools/ab_sensitivity.py slow --runs 10 --rounds 12 [--slowdown 0.25]
    .venv/bin/python tools/ab_sensitivity.py slow --same --runs 10 --rounds 12
    .venv/bin/python tools/ab_sensitivity.py aa --runs 10
    .venv/bin/python tools/ab_sensitivity.py tally     # both again under other noise bands

Prints one line per run and a summary; the results files stay in --dir.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import compare, results  # noqa: E402

PUBLISH_CELL = ["publish", "--only", "api=kombu", "--only", "producer=held",
                "--only", "retry=no", "--transport", "memory", "--only", "serializer=json"]
SITECUSTOMIZE = """\
import os, time
import kombu.messaging

_extra = float(os.environ["CB_SENS_EXTRA_S"])
_orig = kombu.messaging.Producer.publish


def publish(self, *args, **kwargs):
    out = _orig(self, *args, **kwargs)
    end = time.perf_counter() + _extra   # CPU work, not a sleep: what a slower publish is
    while time.perf_counter() < end:
        pass
    return out


kombu.messaging.Producer.publish = publish
"""
RUN_TIMEOUT_S = 1800
# what a slowdown run is judged on: the wall-clock rate, the publishing thread's CPU time per
# message, and that CPU time in units of the calibration work done beside it (the verdict
# that holds on a shared machine, docs/ab.md)
SLOW_METRICS = ("throughput_per_s", "cpu_us_per_msg", "cpu_vs_calibration")


def publish_cost_s() -> float:
    """CPU seconds of one kombu held publish on memory as the publish cell makes it (its
    driver's call), here and now: the least of 3 batches, so a preempted batch does not
    inflate the slowdown."""
    from kombu import Connection, Exchange, Producer, Queue

    name = f"sens-{os.getpid()}"
    exchange = Exchange(name, "direct")
    with Connection("memory://") as conn:
        queue = Queue(name, exchange, routing_key=name)
        queue(conn.default_channel).declare()
        channel = conn.channel()
        publish = Producer(channel, exchange=exchange, serializer="json").publish
        body, best = {"data": "x" * 100}, float("inf")
        for _ in range(4):
            n, t0 = 3000, time.process_time()
            for i in range(n):
                publish(body, routing_key=name, headers={"i": i, "t": 0.0})
            best = min(best, (time.process_time() - t0) / n)
            queue(conn.default_channel).purge()
        channel.close()
    return best


def wrapper_cost_s() -> float:
    """CPU seconds the sitecustomize's wrapper adds to a call spinning 0 (a call through
    *args/**kwargs, two clock reads): SITECUSTOMIZE itself laid over a publish that does
    nothing, against that bare publish, least of 9 alternated batches each. Timed on its own, not as
    the difference of two whole publishes (~16 us each, which at load 4-7 differ by +-1 us)."""
    import kombu.messaging

    original = kombu.messaging.Producer.publish

    def bare(self, body, routing_key=None, headers=None):
        return None

    def cost(call) -> float:
        n, t0 = 20000, time.process_time()
        for i in range(n):
            call(None, {"data": "x"}, routing_key="k", headers={"i": i, "t": 0.0})
        return (time.process_time() - t0) / n

    os.environ["CB_SENS_EXTRA_S"] = "0"
    try:
        kombu.messaging.Producer.publish = bare
        exec(SITECUSTOMIZE, {})
        wrapped = kombu.messaging.Producer.publish
        pairs = [(cost(bare), cost(wrapped)) for _ in range(9)]   # alternated batches
        return max(0.0, min(w for _b, w in pairs) - min(b for b, _w in pairs))
    finally:
        kombu.messaging.Producer.publish = original
        del os.environ["CB_SENS_EXTRA_S"]


def spin_for(slowdown: float) -> tuple[float, float]:
    """(publish cost, spin) in seconds: the spin that makes a publish ``slowdown`` dearer,
    the wrapper's own cost (:func:`wrapper_cost_s`) counted. The publish cost is the least
    of 5 timings: other jobs only ever slow a batch (on 2026-12-07, at load 4-7, medians
    sized a "10%" spin that the cell saw as +19% in one run and +2% in another)."""
    base = min(publish_cost_s() for _ in range(5))
    return base, max(0.0, slowdown * base - wrapper_cost_s())


def bench(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=str(ROOT), text=True,
                          capture_output=True, timeout=RUN_TIMEOUT_S,
                          env=dict(os.environ, **(env or {})))


def rows(path: Path, metrics=None, noise=None) -> list[tuple[str, compare.Comparison]]:
    """(cell key, comparison) of every ``--by variant`` row of the run."""
    out = []
    run = results.load(path)
    if not any("variant" in c.params for c in run.cells):
        return out    # a run still starting, or one that measured nothing
    for group in compare.compare_within(run, "variant", metrics=metrics, noise=noise):
        for _value, comparisons, _note in group.rows:
            out += [(group.scenario, c) for c in comparisons]
    return out


def load_words(path: Path) -> str:
    """"load 3.1-6.2": the 1-minute load average over the run's rounds."""
    loads = [r.get("loadavg_1m") for c in results.load(path).cells for r in c.repeats] \
        if path.exists() else []
    loads = [x for x in loads if x is not None]
    return f"load {min(loads):.1f}-{max(loads):.1f}" if loads else "load -"


def slow(args) -> int:
    folder = args.dir / "sitecustomize"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    called = {m: 0 for m in SLOW_METRICS}
    # --same: A/A on the very cell and rounds of the slowdown runs (B without the patch)
    other, stem = ("env:CB_SENS_SAME=1", "same") if args.same else \
        (f"env:PYTHONPATH={folder}", "slow")
    for i in range(args.runs):
        cost, spin = (0.0, 0.0) if args.same else spin_for(args.slowdown)
        out = args.dir / f"{stem}-{i}.json"
        res = bench("ab", "here", other, *PUBLISH_CELL, "--quick",
                    "--repeat", str(args.rounds), "--duration", str(args.duration), "--quiet",
                    "--no-html", "--out", str(out),
                    env={"CB_SENS_EXTRA_S": repr(spin)})
        if res.returncode != 0:
            print(f"run {i}: exit {res.returncode}: {res.stderr.strip()[-300:]}", flush=True)
            continue
        words = []
        for _key, c in rows(out, list(SLOW_METRICS)):
            hit = c.significant and (args.same or c.direction in ("slower", "higher"))
            called[c.metric] += bool(hit)
            words.append(f"{c.metric}: {c.words} ({c.detail})")
        print(f"run {i} (publish {cost * 1e6:.2f} us, spin {spin * 1e6:.2f} us, "
              f"{load_words(out)}): " + "; ".join(words), flush=True)
    what = "A/A (called either way)" if args.same else f"slowdown {args.slowdown:.0%}"
    print(f"{what}, {args.rounds} rounds, runs called (of {args.runs}): "
          + ", ".join(f"{m} {n}" for m, n in called.items()))
    return 0


def aa_spec(full: bool) -> str:
    """gates-ab.toml's rules, without the worker-throughput and callgrind ones unless
    ``full`` (they take most of a gate's time)."""
    spec = tomllib.loads((ROOT / "results" / "baselines" / "gates-ab.toml").read_text())
    keep = [g for g in spec["gate"] if full or not re.search(r"\b(worker|instructions)\[",
                                                            g["check"])]
    lines = [f'missing = "{spec.get("missing", "warn")}"']
    for g in keep:
        lines += ["", "[[gate]]"] + [f"{k} = {json.dumps(v)}" for k, v in g.items()]
    return "\n".join(lines) + "\n"


def aa(args) -> int:
    spec = args.dir / "gates-aa.toml"
    spec.write_text(aa_spec(args.full))
    failures = same = total = 0
    for i in range(args.runs):
        out = args.dir / f"aa-{i}.json"
        t0 = time.monotonic()
        res = bench("gate", "--against", "HEAD", "--head", "env:CB_AA=1", "--spec", str(spec),
                    "--rounds", str(args.rounds), "--budget", str(args.budget), str(out))
        failed = [ln.strip() for ln in res.stdout.splitlines() if ln.strip().startswith("FAIL")]
        failures += bool(failed) or res.returncode != 0
        judged = rows(out) if out.exists() else []
        n_same = sum(1 for _k, c in judged if c.significant is False)
        n_judged = sum(1 for _k, c in judged if c.significant is not None)
        same, total = same + n_same, total + n_judged
        called = [f"{k} {c.metric}: {c.words} ({c.detail})" for k, c in judged if c.significant]
        print(f"run {i} ({load_words(out)}, {time.monotonic() - t0:.0f} s): gate exit "
              f"{res.returncode}, {len(failed)} FAIL; "
              f"rows {n_same}/"
              f"{n_judged} no significant difference" + (f"; called: {'; '.join(called)}"
                                                          if called else ""), flush=True)
        for line in res.stdout.splitlines():   # failures, warnings and the join's verdict
            if line.startswith(("FAIL", "WARN")) or line.startswith("PASS  join"):
                print(f"    {line.strip()}", flush=True)
    share = same / total if total else 0.0
    print(f"A/A {args.runs} runs, {args.rounds} rounds: {failures} gate failure(s); "
          f"{same}/{total} rows ({share:.1%}) no significant difference")
    return 0


def median_interval(ratios: list[float], confidence: float = 0.95):
    """Distribution-free interval of the median per-round ratio (the sign test's order
    statistics): one outlier round cannot widen it, as it widens a t-interval."""
    from scipy.stats import binom

    xs, n = sorted(ratios), len(ratios)
    k = int(binom.ppf((1 - confidence) / 2, n, 0.5))   # P(X < k) <= alpha/2
    while k > 0 and binom.cdf(k - 1, n, 0.5) > (1 - confidence) / 2:
        k -= 1
    if k < 1:
        return None
    return xs[k - 1], xs[n - k]


def median_verdicts(path: Path, metrics=None, noise: float = compare.NOISE_WITHIN_RUN):
    """Per (cell, metric): +1 above the band, -1 below, 0 neither, by :func:`median_interval`
    (every default metric when ``metrics`` is None)."""
    run = results.load(path)
    out = []
    if not any("variant" in c.params for c in run.cells):
        return out
    for group in compare.compare_within(run, "variant", metrics=metrics):
        by_variant = {str(c.params["variant"]): c for c in run.cells
                      if results.cell_key(c.scenario, {k: v for k, v in c.params.items()
                                                       if k != "variant"}) ==
                      results.cell_key(group.scenario, group.shared)}
        ref = by_variant.get(group.reference)
        for value, comps, _note in group.rows:
            for c in comps or []:
                base, new = compare.paired_values(ref, by_variant[value], c.metric)
                ratios = [n / b for b, n in zip(base, new) if b > 0 and n > 0]
                bounds = median_interval(ratios) if len(ratios) >= 6 else None
                if bounds is None:
                    continue
                lo, hi = bounds
                out.append((c.metric, 1 if lo > 1 + noise else -1 if hi < 1 / (1 + noise) else 0))
    return out


def tally(args) -> int:
    """The runs in --dir judged again under other noise bands (0: p < 0.05 alone), to see
    what limits the verdicts: the interval's width or the band it must clear."""
    for noise in (None, 0.025, 0.0):
        band = "default ±5%" if noise is None else f"±{noise:.1%}"
        slow_runs = sorted(args.dir.glob("slow-*.json"))
        hits = {"throughput_per_s": 0, "cpu_us_per_msg": 0}
        for path in slow_runs:
            for _k, c in rows(path, list(hits), noise):
                hits[c.metric] += bool(c.significant and c.direction in ("slower", "higher"))
        aa_runs = sorted(args.dir.glob("aa-*.json"))
        judged = [c for path in aa_runs for _k, c in rows(path, noise=noise)
                  if c.significant is not None]
        same = sum(1 for c in judged if c.significant is False)
        print(f"{band}: slow {len(slow_runs)} runs: throughput slower in "
              f"{hits['throughput_per_s']}, CPU/msg higher in {hits['cpu_us_per_msg']}; "
              f"A/A {len(aa_runs)} runs: {same}/{len(judged)} rows no significant difference")
    hits = {"throughput_per_s": 0, "cpu_us_per_msg": 0}
    for path in sorted(args.dir.glob("slow-*.json")):
        for metric, sign in median_verdicts(path, list(hits)):
            hits[metric] += (sign < 0) if metric == "throughput_per_s" else (sign > 0)
    aa_signs = [sign for path in sorted(args.dir.glob("aa-*.json"))
                for _m, sign in median_verdicts(path)]
    print(f"median of per-round ratios, sign-test 95% interval, ±5%: throughput slower in "
          f"{hits['throughput_per_s']}, CPU/msg higher in {hits['cpu_us_per_msg']}; A/A "
          f"{aa_signs.count(0)}/{len(aa_signs)} rows within")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("slow", "aa", "tally"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None,
                        help="paired rounds per run (slow: 12; aa: the gate's 5)")
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--slowdown", type=float, default=0.10)
    parser.add_argument("--same", action="store_true",
                        help="slow: B without the patch (A/A on the same cell and rounds)")
    parser.add_argument("--budget", type=float, default=60.0, help="aa: the gate's --budget")
    parser.add_argument("--full", action="store_true", help="aa: every gates-ab.toml rule")
    parser.add_argument("--dir", type=Path, default=Path("results") / "sensitivity")
    args = parser.parse_args()
    args.dir = args.dir.resolve()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.rounds is None:
        args.rounds = 12 if args.what == "slow" else 5
    return {"slow": slow, "aa": aa, "tally": tally}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
