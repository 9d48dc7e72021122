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
