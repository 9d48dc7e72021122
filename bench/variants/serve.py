"""A variant's measuring process: one scenario's cells, in the variant's interpreter.

Run by path (``python .../bench/variants/serve.py``), not as ``-m bench.variants.serve``:
the ``bench`` it imports is the variant's tree (``git:REV`` may predate this file). It
uses only what every tree this harness runs has: ``scenarios.get``, ``runner.RunOptions``,
``runner.CellRun``, ``runner.measure_once``.

Protocol (lines): the first stdin line is ``{"scenario", "options", "workdir"}``; the child
answers ``ready``. Each ``cell {"params", "round"}`` is measured once and answered
``result {"repeat"}`` or ``result {"status", "reason"}``. EOF closes the scenario and
stops its workers.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.pop(0)   # this script's folder: never shadow the variant's own modules


def _hdr(hist) -> str:
    return hist.encode().decode("ascii")


def _portable(repeat: dict) -> dict:
    """A repeat as JSON: each histogram (a bench.recorder.Recorded) HdrHistogram-encoded,
    with its interval histograms; bench.variants.run decodes them."""
    out = dict(repeat)
    out["histograms"] = {
        name: {"hdr": _hdr(rec.hist), "overflow": rec.overflow, "unit": rec.unit,
               "invalid": rec.invalid,
               "intervals": [[iv.start_s, iv.end_s, _hdr(iv.hist)]
                             for iv in getattr(rec, "intervals", ())]}
        for name, rec in (repeat.get("histograms") or {}).items()}
    return out


def main() -> int:
    from bench import celery_workers, runner, scenarios

    spec = json.loads(sys.stdin.readline())
    opts = runner.RunOptions.from_dict(spec["options"])
    opts.workdir = Path(spec.get("workdir") or tempfile.mkdtemp(prefix="celery-bench-v-"))
    opts.workdir.mkdir(parents=True, exist_ok=True)
    scenario = scenarios.get(spec["scenario"])(opts)
    last_round = None
    try:
        print("ready", flush=True)
        for line in sys.stdin:
            order, _, body = line.strip().partition(" ")
            if order != "cell":
                continue
            job = json.loads(body)
            params, round_ = job["params"], job["round"]
            state = runner.CellRun(scenario.name, dict(params),
                                   measured_loss=scenario.measured_loss(params))
            if job.get("first"):
                reason = runner._unreachable(scenario, state.params)
                if reason:
                    state.status, state.reason = "skipped", reason
            if not state.status:
                if round_ != last_round:
                    scenario.begin_round(round_)
                    last_round = round_
                runner.measure_once(scenario, state, round_)
            answer = {"status": state.status, "reason": state.reason,
                      "measured_loss": state.measured_loss}
            if state.repeats:
                answer["repeat"] = _portable(state.repeats[-1])
            print("result " + json.dumps(answer, default=str), flush=True)
    finally:
        scenario.close()
        celery_workers.stop_all(timeout=10.0)
    return 0


if __name__ == "__main__":
    from bench.drivers.child import run_child   # the variant's tree (every REV gate allows)

    run_child(main)
