"""The stage waterfall's arithmetic: stages in order, one histogram each, a task whose
stamps disagree left out and counted, and the stages naming metrics for compare."""
import numpy as np

from bench import compare, results, waterfall
from bench.recorder import Recorder


def points(n=5, **override):
    base = {name: np.arange(n, dtype=np.int64) * 1_000_000 + i * 100_000
            for i, name in enumerate(waterfall.POINTS)}
    base.update({k: np.asarray(v, dtype=np.int64) for k, v in override.items()})
    return base


def test_stages_run_point_to_point_and_add_up():
    per, total = waterfall.stages(points())
    assert list(per) == list(waterfall.STAGES)
    assert all((v == 100_000).all() for v in per.values())
    assert (total == 700_000).all()


def test_a_worker_faster_than_the_publish_call_never_makes_a_stage_run_back():
    p = points(1)
    p["returned"] = p["taken"] + 50_000       # the publish call returned after the worker took it
    per, total = waterfall.stages(p)
    assert per["broker"][0] == 0 and per["publish"][0] == 200_000
    assert sum(v[0] for v in per.values()) == total[0]


def test_a_caller_faster_than_the_write_call_never_makes_a_stage_run_back():
    p = points(1)
    p["stored"] = p["in_hand"] + 30_000       # the caller had the result before the child
    per, total = waterfall.stages(p)          # came back from the backend's write call
    assert per["fetch"][0] == 0 and per["store"][0] == 200_000
    assert sum(v[0] for v in per.values()) == total[0]


def test_out_of_order_task_is_left_out_and_counted():
    p = points(4)
    p["started"][2] = p["handed"][2] - 1      # a child stamp before its hand-over
    rec = Recorder()
    m = waterfall.record(rec, p)
    assert m["waterfall_tasks"] == 3 and m["waterfall_out_of_order"] == 1
    assert all(rec.histograms[f"waterfall.{s}"].hist.get_total_count() == 3
               for s in (*waterfall.STAGES, "total"))
    assert m["waterfall_sum_error"] <= waterfall.SUM_TOLERANCE
    assert m["waterfall.pool.mean_us"] == 100.0


def test_sum_error_sees_a_gap():
    assert waterfall.sum_error({"a": [50.0], "b": [40.0]}, [100.0]) == 0.1


def test_a_stage_is_a_metric_compare_reads_and_not_a_default_one():
    rec = Recorder()
    m = waterfall.record(rec, points())
    cell = results.Cell("worker", {"transport": "unix"}, "ok",
                        histograms={k: results.summarize(r.hist) for k, r in
                                    rec.histograms.items()}, metrics=m)
    assert compare.metric_value(cell, "waterfall.broker.p50") == 100
    assert compare.metric_value(cell, "waterfall.broker.mean_us") == 100.0
    assert compare.higher_is_better("waterfall.broker.p99") is False
    assert compare.higher_is_better("waterfall.broker.mean_us") is False
    assert not any(name.startswith("waterfall.") for name in compare.default_metrics(cell))


def test_the_gate_names_a_stage():
    from bench import gate, gate_spec

    rec = Recorder()
    m = waterfall.record(rec, points(400))   # enough samples for a p99 the gate trusts
    hists = {k: results.summarize(r.hist) for k, r in rec.histograms.items()}
    cell = results.Cell("worker", {"transport": "unix"}, "ok", metrics=m, histograms=hists,
                        repeats=[{"round": i, "metrics": m, "histograms": hists}
                                 for i in range(5)])
    run = results.Run({}, [cell])
    verdicts = {}
    for check in ("worker[transport=unix] waterfall.broker.p99 <= 150",
                  "worker[transport=unix] waterfall.broker.p99 <= 50"):
        rule = gate_spec.Rule(check, check, **gate_spec.parse_check(check))
        (v,) = gate.evaluate(rule, run)
        verdicts[check] = v.status
    assert list(verdicts.values()) == ["PASS", "FAIL"], verdicts


def test_report_draws_the_stages_stacked_per_cell():
    from bench.exporters.html import html as render

    cells = []
    for transport in ("unix", "redis"):
        rec = Recorder()
        m = waterfall.record(rec, points())
        cells.append(results.Cell("worker", {"transport": transport, "rate": 10.0}, "ok",
                                  metrics=m))
    page = render(results.Run({}, cells))
    at = page.index("Where a task")
    chart = page[page.rindex("<svg", 0, at):at]
    for stage in ("publish", "broker", "worker", "pool", "run", "store"):
        assert f">{stage}<" in chart, stage


# ------------------------------------------------------- one round trip, caller-timed
def test_a_callers_round_trip_splits_store_and_fetch_and_adds_up():
    """Locust's TaskRoundTrip: with the pool child's stored reading the stages are the
    worker scenario's (store and fetch apart); without it one ``result`` stage; both add
    up to the total exactly."""
    t = dict(t0=0, t1=300, taken=200, handed=500, start=900, end=1_900, t2=3_000)
    split = waterfall.one_round_trip(**t, stored=2_400)
    assert [n for n, _ in split] == list(waterfall.STAGES)
    assert dict(split)["publish"] == 200           # taken before the publish call returned
    assert dict(split)["store"] == 500 and dict(split)["fetch"] == 600
    assert sum(ns for _, ns in split) == t["t2"] - t["t0"]
    joined = waterfall.one_round_trip(**t)
    assert [n for n, _ in joined] == [*waterfall.STAGES[:5], "result"]
    assert dict(joined)["result"] == 1_100 and sum(ns for _, ns in joined) == 3_000
    # the result in hand before the child came back from its write: fetch 0, not negative
    early = dict(waterfall.one_round_trip(**t, stored=3_500))
    assert early["store"] == 1_100 and early["fetch"] == 0
    # two clocks an offset apart: the worker's end after the result in hand; the stage is
    # negative (the recorder leaves it out and counts it), the sum still the total
    skewed = dict(waterfall.one_round_trip(**{**t, "t2": 1_500}))
    assert skewed["result"] == -400 and sum(skewed.values()) == 1_500


def test_the_stored_reading_goes_by_task_id_from_the_child_to_its_own_caller(tmp_path):
    """The pool child appends (STORED, task id, stored) on task_success; the caller's
    ledger finds it by task id in a folder it watches, waits for one not written yet,
    skips a record half written, and does not wait at all for another process's folder."""
    import uuid
    from types import SimpleNamespace

    from bench import worker_stamps as ws

    folder = tmp_path / "stored"
    folder.mkdir()
    ledger = ws.StoredLedger()
    ledger.watch(str(folder))
    child = ws.StoredStamps(ws.StampFile(str(folder)), "bench.roundtrip")
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for tid in ids[:2]:
        child.success(sender=SimpleNamespace(name="bench.roundtrip",
                                             request=SimpleNamespace(id=tid)))
    child.success(sender=SimpleNamespace(name="bench.other", request=SimpleNamespace(id=ids[2])))
    got = ledger.take(ids[1], str(folder), timeout_s=0)
    assert isinstance(got, int) and got > 0
    assert ledger.take(ids[1], str(folder), timeout_s=0) is None    # taken once
    assert ledger.take(ids[2], str(folder), timeout_s=0) is None    # not our task
    # written while the caller waits (the child writes after the backend write)
    key = ws.task_key(ids[2])
    late = folder / "999.bin"
    record = ws.RECORD.pack(ws.STORED, key[0], key[1], 12345, 0, 0)
    late.write_bytes(record[:20])                                   # half a record
    waits = []

    def sleep(s):
        waits.append(s)
        if len(waits) == 2:
            with open(late, "ab") as fh:
                fh.write(record[20:])
    assert ledger.take(ids[2], str(folder), timeout_s=60, sleep=sleep) == 12345
    assert len(waits) == 2
    # another process's folder: None at once, no wait
    waits.clear()
    assert ledger.take(ids[0], str(tmp_path / "theirs"), timeout_s=60, sleep=sleep) is None
    assert not waits
    assert ws.task_key("not-a-uuid") is None
    assert ws.task_key(ids[0]) != ws.task_key(ids[1])
