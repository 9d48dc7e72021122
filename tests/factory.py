"""Hand-built results files for the tests of compare, gate, report and the CLI.

Cells are made the way the runner makes them (``results.aggregate`` over repeats),
with known throughputs and latency samples, so a test knows the right answer.
"""
import numpy as np

from bench import recorder, results


def cell(scenario="publish", throughputs=(1000.0,), latency_us=100.0, samples=2000,
         seed=0, status="ok", reason="", **params):
    """One cell: a repeat per throughput, each with lognormal latencies around ``latency_us``."""
    if status != "ok":
        return results.Cell(scenario, params, status, reason)
    rng = np.random.default_rng(seed)
    repeats = []
    for tp in throughputs:
        rec = recorder.Recorder()
        rec.add("publish_us", rng.lognormal(np.log(latency_us), 0.2, samples))
        repeats.append({"metrics": {"throughput_per_s": float(tp), "sent": samples,
                                    "received": samples, "lost": 0},
                        "histograms": rec.histograms})
    made = results.aggregate(scenario, params, repeats)
    made.reason = reason
    return made


def write(path, *cells, environment=None):
    run = results.Run(environment or {"python": "3", "celery": "5.7", "kombu": "5.7"},
                      list(cells))
    results.dump(run, path)
    return path


def with_rounds(made, rounds):
    """``made`` with ``repeats[i]["round"] = rounds[i]``, as an interleaving runner writes."""
    for rep, r in zip(made.repeats, rounds):
        rep["round"] = r
    return made


def noisy_cell(scenario="publish", throughputs=(1000.0,), latencies_us=(100.0,), samples=500,
               seed=0, **params):
    """One cell whose repeats differ: repeat i has throughput ``throughputs[i]`` and
    lognormal latencies around ``latencies_us[i]``."""
    rng = np.random.default_rng(seed)
    repeats = []
    for tp, lat in zip(throughputs, latencies_us):
        rec = recorder.Recorder()
        rec.add("publish_us", rng.lognormal(np.log(lat), 0.2, samples))
        repeats.append({"metrics": {"throughput_per_s": float(tp), "sent": samples,
                                    "received": samples, "lost": 0},
                        "histograms": rec.histograms})
    return results.aggregate(scenario, params, repeats)


def rich_cell(scenario="publish", rounds=3, metrics=None, histograms=None, seed=0,
              interval_s=1.0, seconds=3, status="ok", reason="", **params):
    """A cell with several rounds, metrics that vary between them, and histograms with
    1 s interval histograms (``histograms``: name -> (median latency in us, samples)).

    ``metrics``: name -> value of the first round; later rounds drift by +-5%, so the
    cell has a spread. Latencies are lognormal; one late interval holds a spike."""
    if status != "ok":
        return results.Cell(scenario, params, status, reason)
    rng = np.random.default_rng(seed)
    metrics = {"throughput_per_s": 1000.0, "sent": 1000, "lost": 0} if metrics is None \
        else metrics
    histograms = {"publish": (100.0, 3000)} if histograms is None else histograms
    repeats = []
    t0 = 1_700_000_000 * 10**9
    for r in range(rounds):
        rec = recorder.Recorder(interval_s)
        for name, (latency_us, samples) in histograms.items():
            values = rng.lognormal(np.log(latency_us), 0.3, samples)
            values[-samples // 20:] *= 20          # a spike at the end of the round
            at = np.linspace(0, seconds * 1e9, samples, endpoint=False).astype(np.int64)
            rec.histograms[name] = recorder.Recorded(*recorder.histogram(values)[:2])
            rec.histograms[name].intervals = recorder.intervals(
                values, at, interval_s, offset_ns=t0 + r * 10 * 10**9)
        drift = 1 + 0.05 * (r - (rounds - 1) / 2)
        repeats.append({"round": r, "started_utc": "2023-11-14T22:13:20Z", "elapsed_s": seconds,
                        "metrics": {k: (v * drift if isinstance(v, float) else v)
                                    for k, v in metrics.items()},
                        "histograms": rec.histograms})
    made = results.aggregate(scenario, params, repeats)
    made.reason = reason
    return made


def sweep_cells(scenario="publish", rates=(500, 1000, 2000, 4000), max_rate=3000.0,
                slo="p99<5ms", **params):
    """A rate sweep: cells that differ only in ``rate`` (latency grows with it), and the
    max-rate search cell holding ``max_sustainable_rate_per_s`` (no ``rate`` param)."""
    out = []
    for i, rate in enumerate(rates):
        achieved = rate * (1.0 if rate <= max_rate else 0.8)
        out.append(rich_cell(
            scenario, rounds=1, seed=10 + i,
            metrics={"rate_target_per_s": float(rate), "rate_achieved_per_s": achieved,
                     "rate_shortfall": 1 - achieved / rate, "backlog_growth_per_s": 0.0,
                     "throughput_per_s": achieved, "lost": 0},
            histograms={"from_intended": (100.0 * (1 + 4 * i * i), 2000),
                        "publish_to_start": (300.0 * (1 + i), 2000)},
            **{**params, "rate": rate}))
    # as bench.maxrate writes it: rate=max and the slo as params, the steps it tried
    steps = [{"rate": float(r), "achieved": r * (1.0 if r <= max_rate else 0.8),
              "latency_us": 800 * (1 + i), "ok": r <= max_rate, "phase": "climb"}
             for i, r in enumerate(rates)]
    search = results.Cell(scenario, {**params, "rate": "max", "slo": slo}, "ok", "",
                          {"max_sustainable_rate_per_s": max_rate, "slo": slo,
                           "steps": steps})
    return out + [search]
