"""The worker scenario with real workers: every task accounted for, latency histograms
that cover every task sent, one worker per transport and pool, none left behind.

Speed ratios (unix vs amqp/redis) are benchmark results, not assertions here:
the machine is shared and noisy.
"""
import numpy as np
import pytest
from kombu import Connection

from bench import brokers, celery_workers, config, runner
from bench.scenarios import worker as scenario
from bench.scenarios import worker_rig
from support import celery_children, cells, counting_starts

pytestmark = pytest.mark.timeout(300)

TASKS = 500   # --messages: per throughput cell, and per latency cell (at RATE: 1 s)
RATE = 500.0


def run(tmp_path, **kw):
    kw.setdefault("timeout", 60)
    kw.setdefault("repeat", 1)
    opts = runner.RunOptions(scenarios=("worker",), workdir=tmp_path, **kw)
    return runner.run(opts)


def assert_no_worker_left():
    assert not celery_workers.running()
    assert celery_children() == []


def check_throughput(c, tasks):
    assert c.status == "ok", c.reason
    m = c.metrics
    assert m["sent"] == m["received"] == tasks
    assert m["lost"] == 0 and m["duplicates"] == 0
    assert m["tasks_per_s"] > 0
    assert c.histograms["start_gap"]["count"] == tasks - 1


def check_latency(c):
    assert c.status == "ok", c.reason
    m = c.metrics
    assert m["lost"] == 0 and m["duplicates"] == 0
    assert m["received"] == m["sent"] == c.params["tasks"]
    for name in ("publish_to_start", "from_send", "schedule_lag", "queue_wait"):
        assert c.histograms[name]["count"] == m["sent"], name
    # From the intended time, never less than from the actual send.
    assert c.histograms["publish_to_start"]["p50"] >= c.histograms["from_send"]["p50"]
    # the SLO's wait leaves only the harness's lateness out: between the two
    assert c.histograms["publish_to_start"]["p50"] >= c.histograms["queue_wait"]["p50"] >= \
        c.histograms["from_send"]["p50"]


def test_matrix_and_quick_slice():
    quick = cells("worker", runner.RunOptions(quick=True))
    # The embedded transports in both pools, plus the servers' prefork throughput first
    # (the references of the unix/amqp and unix/redis ratios).
    refs = [c for c in quick if c["transport"] in brokers.servers()]
    assert quick[:len(refs)] == refs
    assert {(c["transport"], c["pool"], c["mode"]) for c in refs} == {
        ("amqp", "prefork", "throughput"), ("redis", "prefork", "throughput")}
    embedded = quick[len(refs):]
    assert {c["transport"] for c in embedded} == {"unix", "fifo"}
    assert {(c["pool"], c["concurrency"]) for c in embedded} == {("prefork", 2)}
    assert {c["tasks"] for c in quick if c["mode"] == "throughput"} == {scenario.TASKS_QUICK}
    full = cells("worker", runner.RunOptions())
    assert {c["transport"] for c in full} == {"filesystem", "redis", "amqp", "unix", "fifo"}
    assert {c["tasks"] for c in full if c["mode"] == "throughput"} == {10_000}
    assert len(full) == 5 * 2 * 2
    # Throughput before latency, so the latency cell reuses the worker.
    modes = [c["mode"] for c in full]
    assert modes[:2] == ["throughput", "latency"]
    assert all(c["transport"] != "memory" for c in full)


@pytest.mark.parametrize("transport", ["unix", "fifo"])
def test_embedded_transport_counts_every_task(tmp_path, monkeypatch, transport):
    """Prefork -c 2: unix prefilled, fifo fed; one worker for both modes."""
    started = counting_starts(monkeypatch)
    run_ = run(tmp_path, quick=True, transports=(transport,), only=(("pool", "prefork"),))
    by_mode = {c.params["mode"]: c for c in run_.cells}
    assert set(by_mode) == {"throughput", "latency"}
    thr = by_mode["throughput"]
    check_throughput(thr, scenario.TASKS_QUICK)
    assert thr.metrics["load"] == ("fed" if transport == "fifo" else "prefilled")
    check_latency(by_mode["latency"])
    assert len(started) == 1  # the latency cell reused the throughput cell's worker
    assert all("--concurrency 2" in " ".join(w.argv) for w in started)
    assert_no_worker_left()


def test_solo_on_unix_small(tmp_path):
    run_ = run(tmp_path, transports=("unix",), messages=TASKS, rate=RATE,
               only=(("pool", "solo"),))
    by_mode = {c.params["mode"]: c for c in run_.cells}
    check_throughput(by_mode["throughput"], TASKS)
    check_latency(by_mode["latency"])
    assert by_mode["latency"].params["tasks"] == TASKS  # --messages sets both
    assert_no_worker_left()


def queue_gone(transport: str, name: str) -> bool:
    if transport == "redis":
        import redis

        client = redis.Redis.from_url(config.service_url("redis"))
        try:
            return not client.exists(name, f"_kombu.binding.{name}")
        finally:
            client.close()
    with Connection(config.service_url("amqp")) as conn:
        try:
            conn.channel().queue_declare(queue=name, passive=True)
        except conn.channel_errors:
            return True
    return False


@pytest.mark.parametrize("transport", ["redis", "amqp"])
def test_server_transport(tmp_path, need, monkeypatch, transport):
    need(transport)
    queues = []
    real = worker_rig.open_rig

    def recording_open(params, opts):
        rig = real(params, opts)
        queues.append(rig.queue)
        return rig
    monkeypatch.setattr(worker_rig, "open_rig", recording_open)
    run_ = run(tmp_path, transports=(transport,), messages=TASKS,
               only=(("pool", "prefork"), ("mode", "throughput")))
    (c,) = run_.cells
    check_throughput(c, TASKS)
    assert c.metrics["load"] == "prefilled"
    assert_no_worker_left()
    assert len(queues) == 1 and queue_gone(transport, queues[0])


def test_ratio_to_a_baseline_measured_in_the_same_run(tmp_path, need):
    need("redis")
    run_ = run(tmp_path, transports=("redis", "unix"), messages=TASKS,
               only=(("pool", "prefork"), ("mode", "throughput")))
    redis_cell, unix_cell = run_.cells
    assert redis_cell.params["transport"] == "redis" and "x_redis" not in redis_cell.metrics
    assert unix_cell.metrics["x_redis"] == pytest.approx(
        unix_cell.metrics["tasks_per_s"] / redis_cell.metrics["tasks_per_s"])
    assert_no_worker_left()


def test_a_worker_that_dies_fails_its_cell_with_its_log(tmp_path, monkeypatch):
    """The pool children are killed mid-cell: a failed cell saying why, nothing left."""
    real = worker_rig.start_worker

    def start_then_kill(rig, params, opts):
        real(rig, params, opts)
        rig.procs[0].stop(timeout=0)  # SIGTERM then SIGKILL: the worker is gone
    monkeypatch.setattr(worker_rig, "start_worker", start_then_kill)
    run_ = run(tmp_path, transports=("unix",), messages=TASKS,
               only=(("pool", "solo"), ("mode", "throughput")))
    (c,) = run_.cells
    assert c.status == "failed"
    assert "died" in c.reason or "exited" in c.reason
    assert_no_worker_left()


def test_first_runs_and_backlog():
    rows = np.array([[1, 0, 10, 11], [1, 1, 20, 21], [1, 1, 30, 31], [1, 5, 40, 41]])
    ran, duplicates = worker_rig.first_runs(rows, 3)
    assert ran[:, 1].tolist() == [0, 1] and duplicates == 1  # index 5 is not ours
    sent = np.arange(100, dtype=np.int64)           # one sent per ns
    starts = np.arange(50, 100, dtype=np.int64) + 0  # starts lag far behind sends
    assert worker_rig.min_backlog(sent, starts) > 40


# --------------------------------------------------------------------------- rates
def test_rate_cells_replace_the_matrix():
    sweep = cells("worker", runner.RunOptions(quick=True, rate_sweep=(100.0, 400.0)))
    assert {c["mode"] for c in sweep} == {"latency"}
    assert sorted({c["rate"] for c in sweep}) == [100.0, 400.0]
    search = cells("worker", runner.RunOptions(max_rate=True, slo="p99<=20ms"))
    assert {(c["rate"], c["slo"]) for c in search} == {("max", "p99<=20ms")}
    assert {c["transport"] for c in search} == {t.name for t in brokers.available()
                                                 if t.cross_process}


def test_max_rate_takes_only_mode_roundtrip(monkeypatch):
    """--max-rate --only mode=roundtrip: a search cell with results stored (the fastest
    reachable backend) beside the latency one, and the --only filter keeps just it."""
    from bench import backends

    monkeypatch.setattr(backends, "fastest_reachable", lambda transport: backends.embedded())
    opts = runner.RunOptions(max_rate=True, transports=("unix",), only=(("mode", "roundtrip"),))
    every = cells("worker", opts)
    kept = [c for c in every if runner.matches(c, opts)]
    assert kept and {(c["mode"], c["rate"], c["backend"]) for c in kept} == \
        {("roundtrip", "max", backends.embedded().name)}
    assert {c["mode"] for c in every} == {"latency", "roundtrip"}
    # without asking, no roundtrip cell (and no backend) in the search
    plain = cells("worker", runner.RunOptions(max_rate=True, transports=("unix",)))
    assert {c["mode"] for c in plain} == {"latency"} and not any("backend" in c for c in plain)


def test_a_rate_step_accounts_for_every_task_and_judges_the_rate(tmp_path):
    run_ = run(tmp_path, transports=("unix",), only=(("pool", "prefork"),),
               rate_sweep=(200.0,), duration=0.5, warmup=0.2)
    (c,) = run_.cells
    assert c.status == "ok", c.reason
    m = c.metrics
    assert m["sent"] == 100 and m["received"] + m["pending"] == m["sent"] and m["lost"] == 0
    assert m["rate_target_per_s"] == 200.0 and m["backlog_growth_per_s"] is not None
    assert isinstance(m["sustainable"], bool) and m["slo"] == "p99<=10ms"
    assert c.histograms["publish_to_start"]["count"] == m["sent"]
    assert c.histograms["publish_to_start"]["intervals"]      # a time series for hlog/html
    assert_no_worker_left()


def test_max_rate_search_reports_its_steps(tmp_path):
    """A tiny ceiling-free search on unix with short steps: it ends, with evidence."""
    run_ = run(tmp_path, transports=("unix",), only=(("pool", "prefork"),), max_rate=True,
               slo="p99<=2s", duration=0.3, warmup=0.1, rate=200.0, timeout=30)
    (c,) = run_.cells
    assert c.status == "ok", c.reason
    m = c.metrics
    assert m["max_sustainable_rate_per_s"] >= 0 and m["slo"] == "p99<=2s"
    assert m["search_steps"] == len(m["steps"]) >= 2
    assert {s["phase"] for s in m["steps"]} >= {"climb", "confirm"} or \
        m["max_sustainable_rate_per_s"] == 0
    assert all(set(s) >= {"rate", "achieved", "latency_us", "ok", "why"} for s in m["steps"])
    assert_no_worker_left()


@pytest.mark.parametrize("transport,pool", [
    ("unix", "prefork"), ("unix", "solo"), ("fifo", "prefork"), ("redis", "prefork"),
    ("amqp", "prefork"), ("filesystem", "prefork")])
def test_waterfall_stages_add_up(tmp_path, need, transport, pool):
    """Every task of a latency cell has every stage (real worker, Celery's hooks), each
    stage is a histogram of every task, and per task the stages as recorded add up to
    intended send -> result in hand within 1%; the means in the JSON add up too."""
    from bench import results, waterfall

    if transport in brokers.servers():
        need(transport)
    run_ = run(tmp_path, transports=(transport,), rate=50.0, duration=1.0, warmup=0.2,
               only=(("pool", pool), ("mode", "latency")))
    (c,) = run_.cells
    check_latency(c)
    m, h = c.metrics, c.histograms
    assert m["waterfall_tasks"] == m["sent"] and m["waterfall_out_of_order"] == 0
    assert m["waterfall_sum_error"] <= waterfall.SUM_TOLERANCE
    assert "CLOCK_MONOTONIC" in m["waterfall_clock"]
    for stage in (*waterfall.STAGES, "total"):
        assert h[f"waterfall.{stage}"]["count"] == m["sent"], stage
    means = sum(results.decode(h[f"waterfall.{s}"]).get_mean_value() for s in waterfall.STAGES)
    total = results.decode(h["waterfall.total"]).get_mean_value()
    assert abs(means - total) <= waterfall.SUM_TOLERANCE * total
    # The queue wait split in four: intended send -> task_prerun, as publish_to_start has
    # it up to the tick's own first reading (just after task_prerun).
    to_start = sum(m[f"waterfall.{s}.mean_us"] for s in waterfall.TO_START)
    assert to_start <= results.decode(h["publish_to_start"]).get_mean_value() * 1.01 + 5
    assert_no_worker_left()


@pytest.mark.parametrize("transport", ["unix", "redis", "amqp"])
def test_roundtrip_waterfall_has_a_real_store_and_a_caller(tmp_path, need, transport):
    """mode=roundtrip: the tasks' results are written to Redis and a caller waits for each
    with AsyncResult.get, so every task in the waterfall was stored and had in hand; the
    stages still add up to the total within 1% per task."""
    from bench import waterfall

    need("redis")
    if transport in brokers.servers():
        need(transport)
    run_ = run(tmp_path, transports=(transport,), rate=50.0, duration=1.0, warmup=0.2,
               only=(("pool", "prefork"), ("mode", "roundtrip")))
    (c,) = run_.cells
    check_latency(c)
    m, h = c.metrics, c.histograms
    assert c.params["backend"] == "redis"
    assert m["waterfall_in_hand"] == waterfall.IN_HAND["caller"]
    assert m["waterfall_tasks"] == m["sent"] and m["waterfall_out_of_order"] == 0
    assert m["waterfall_sum_error"] <= waterfall.SUM_TOLERANCE
    assert h["waterfall.fetch"]["count"] == h["waterfall.store"]["count"] == m["sent"]
    assert_no_worker_left()


def test_hooks_on_and_off_are_measured_side_by_side(tmp_path, monkeypatch):
    """--only hooks=on|off: each throughput cell with the waterfall's hooks and without;
    the worker of the 'off' cell has neither the stamp folder nor the strategy."""
    from bench import worker_stamps

    envs = []
    real = celery_workers.start

    def start(*args, **kwargs):
        envs.append((dict(kwargs.get("env") or {}), dict(kwargs.get("conf") or {})))
        return real(*args, **kwargs)
    monkeypatch.setattr(celery_workers, "start", start)
    run_ = run(tmp_path, transports=("unix",), messages=300, repeat=2,
               only=(("pool", "prefork"), ("mode", "throughput"), ("hooks", "on|off")))
    assert sorted(c.params["hooks"] for c in run_.cells) == ["off", "on"]
    for c in run_.cells:
        assert c.status == "ok", c.reason
        assert c.metrics["sent"] == c.metrics["received"] == 2 * 300   # summed over rounds
        assert c.metrics["lost"] == 0 and c.metrics["tasks_per_s"] > 0
    hooked = [worker_stamps.STAMP_ENV in env and "task_annotations" in conf
              for env, conf in envs]
    assert hooked.count(True) == hooked.count(False) == 2, envs   # 2 rounds, fresh workers
    assert_no_worker_left()


def test_cpus_pins_the_worker_and_its_pool(tmp_path, monkeypatch):
    """--cpus worker=C,pool=C: the worker's main process and every pool child are pinned
    (os.sched_setaffinity on their pids), and the cell says where each role ran and how
    busy the machine was."""
    import os

    from bench import placement

    cpu = min(os.sched_getaffinity(0))
    pinned = []
    real = os.sched_setaffinity

    def spy(pid, cpus):
        pinned.append((pid, tuple(cpus)))
        return real(pid, cpus)

    monkeypatch.setattr(placement.os, "sched_setaffinity", spy)
    run_ = run(tmp_path, transports=("unix",), rate=50.0, duration=0.5, warmup=0.1,
               cpus=f"worker={cpu},pool={cpu}", only=(("pool", "prefork"), ("mode", "latency")))
    (c,) = run_.cells
    check_latency(c)
    assert f"worker={cpu}" in c.metrics["placement"] and f"pool={cpu}" in c.metrics["placement"]
    assert "publisher=any" in c.metrics["placement"]
    assert len(pinned) == 3 and {cpus for _, cpus in pinned} == {(cpu,)}  # main + 2 children
    assert "cpu_busy_pct" in c.metrics
    assert all(r["loadavg_1m"] is not None for r in c.repeats)   # the runner's, per round
    assert_no_worker_left()
