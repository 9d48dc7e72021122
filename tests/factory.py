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
