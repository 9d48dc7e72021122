"""The publish scenario against real brokers: every message counted, the real CLI run.

No test asserts a duration; rates are checked only as ratios of what was asked.
"""
import socket
import textwrap
import time
import uuid

import psutil
import pytest

from bench import brokers, results, runner
from bench.drivers import kombu as kombu_driver
from bench.drivers.consumer import ConsumerProcess, Tally
from bench.drivers.target import Target
from bench.scenarios import publish
from support import cells, run_cell

KEYS = {"api", "producer", "method", "transport", "serializer", "payload_bytes", "retry"}


def cell(api="kombu", producer="held", method="publish", transport="memory", serializer="json",
         payload_bytes=112, retry=None) -> dict:
    if retry is None:
        retry = {"kombu": "no", "celery": "yes"}.get(api, "-")
    return {"api": api, "producer": producer, "method": method, "transport": transport,
            "serializer": serializer, "payload_bytes": payload_bytes, "retry": retry}


def options(tmp_path, **kw) -> runner.RunOptions:
    kw.setdefault("duration", 0.2)
    kw.setdefault("warmup", 0.05)
    kw.setdefault("timeout", 60.0)
    kw.setdefault("repeat", 1)
    return runner.RunOptions(quick=True, workdir=tmp_path, **kw)


def transport_ready(name: str, need) -> None:
    """Skip while a transport's module is missing; need its service (fail in CI)."""
    try:
        info = brokers.info(name)
    except ImportError as exc:
        pytest.skip(f"bench.brokers.{name} not importable yet: {exc}")
    if info.service:
        need(info.service)


def consumer_processes() -> list:
    return [p for p in psutil.Process().children(recursive=True)
            if "bench.drivers.consumer" in " ".join(p.cmdline())]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_counted(c: results.Cell) -> None:
    m = c.metrics
    if c.params["transport"] == "filesystem" and c.status == "lost":
        assert "filesystem" in c.exempt      # kombu's own loss, declared by the transport
    else:
        assert c.status == "ok", c.reason
    assert m["sent"] > 0
    assert m["received"] + m["lost"] == m["sent"]
    assert c.histograms["publish"]["count"] == m["sent"]
    if c.params["transport"] == "filesystem":
        # Kombu's filesystem transport races a concurrent consumer (it can take a file
        # before the publisher wrote it: JSONDecodeError, message gone); each such loss
        # must show as a consumer receive error, never vanish.
        assert m["lost"] <= m["consumer_errors"], c.reason
    else:
        assert m["lost"] == 0, c.reason
        assert m["duplicates"] == 0


# --------------------------------------------------------------------------- the matrix
def test_every_cell_has_the_same_params_and_every_transport_is_in():
    for quick in (True, False):
        every = cells("publish", runner.RunOptions(quick=quick))
        assert all(set(c) == KEYS for c in every)
        assert [c["api"] for c in every[:2]] == ["queue", "calibration"]
        wanted = {t.name for t in brokers.available() if not (quick and t.slow)}
        assert {c["transport"] for c in every[2:]} == wanted
        for name in wanted:
            kombu = {c["producer"] for c in every
                     if c["transport"] == name and c["api"] == "kombu"}
            info = brokers.info(name)
            confirm = {publish.CONFIRM} if "confirm" in info.capabilities else set()
            assert kombu == ({"held"} if quick and info.service else
                             set(kombu_driver.STRATEGIES)) | confirm
    quick = cells("publish", runner.RunOptions(quick=True))
    full = cells("publish", runner.RunOptions(quick=False))
    assert {c["serializer"] for c in quick if c["api"] in ("kombu", "celery")} == {"json"}
    # JSON only unless pickle is asked for (--serializer pickle): safe by default.
    assert {c["serializer"] for c in full if c["api"] in ("kombu", "celery")} == {"json"}
    asked = cells("publish", runner.RunOptions(serializers=("json", "pickle")))
    assert {c["serializer"] for c in asked if c["api"] == "kombu"} == {"json", "pickle"}
    assert all(c in full for c in quick)
    memory_celery = {(c["method"], c["producer"]) for c in quick
                     if c["transport"] == "memory" and c["api"] == "celery"}
    assert memory_celery == set(publish.CELERY_RUNGS)


def test_kombu_rungs_publish_plainly_and_retry_is_a_rung_of_its_own():
    quick = cells("publish", runner.RunOptions(quick=True))
    full = cells("publish", runner.RunOptions(quick=False))
    assert {c["retry"] for c in quick if c["api"] == "kombu"} == {"no"}
    assert {c["retry"] for c in full if c["api"] == "celery"} == {"yes"}  # Celery's default
    with_retry = [c for c in full if c["api"] == "kombu" and c["retry"] == "yes"]
    assert with_retry and {c["producer"] for c in with_retry} == {"held"}
    asked = cells("publish", runner.RunOptions(only=(("retry", "yes"),)))
    assert {c["producer"] for c in asked if c["api"] == "kombu" and c["retry"] == "yes"} == \
        set(kombu_driver.STRATEGIES)


def test_a_confirmed_publish_is_a_rung_of_its_own(tmp_path):
    c = run_cell("publish", cell(producer=publish.CONFIRM, transport="unix"), options(tmp_path))
    assert_counted(c)


def test_calibration_and_retry_cells_count_every_message(tmp_path):
    opts = options(tmp_path)
    calibration = run_cell("publish", cell("calibration", "-", "loop", "-", "-", retry="-"),
                           opts)
    assert_counted(calibration)
    assert calibration.metrics["cpu_us_per_msg"] > 0
    assert_counted(run_cell("publish", cell(retry="yes"), opts))


def test_tally_counts_duplicates_warmup_and_strays():
    t = Tally(3, keep_e2e=True)
    for i in (0, 1, 1, -1, 7, 2):
        t.add(i, 100, 350)
    assert t.counts() == {"received": 3, "duplicates": 1, "warmup": 1, "stray": 1,
                          "foreign": 0}
    assert list(t.e2e) == [250, 250, 250]


# --------------------------------------------------------------------------- the real CLI
def test_cli_quick_memory_counts_every_message(cli_run, tmp_path):
    proc = cli_run("run", "publish", "--quick", "--repeat", "1", "--transport", "memory", "--out", "x.json",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    run = results.load(tmp_path / "x.json")
    found = run.find("publish", transport="memory")
    assert len(found) == len([c for c in cells("publish", runner.RunOptions(quick=True))
                              if c["transport"] == "memory"])
    assert run.find("publish", api="calibration")[0].status == "ok"   # the in-run CPU reference
    for c in found:
        if c.params["producer"] == "batch":
            assert c.status == "skipped" and "batch" in c.reason
            continue
        assert_counted(c)
        assert "e2e" not in c.histograms       # memory: drained after publishing
    held = run.find("publish", api="kombu", producer="held")[0]
    assert held.metrics["consumer"].startswith("in-process")


# --------------------------------------------------------------------------- every transport
@pytest.mark.parametrize("transport", brokers.names())
def test_each_transport_loses_nothing(transport, need, tmp_path):
    transport_ready(transport, need)
    opts = options(tmp_path)
    cross = brokers.info(transport).cross_process
    for params in (cell(transport=transport),
                   cell("celery", "default", "apply_async", transport=transport)):
        c = run_cell("publish", params, opts)
        assert_counted(c)
        if cross:
            assert c.metrics["consumer"] == "concurrent process"
            assert c.histograms["e2e"]["count"] == c.metrics["received"]
        else:
            assert "e2e" not in c.histograms
    assert consumer_processes() == []


def test_batch_publishes_on_redis(need, tmp_path):
    need("redis")
    c = run_cell("publish", cell(producer="batch", transport="redis"), options(tmp_path))
    assert_counted(c)


def test_batch_is_skipped_with_the_reason_where_unsupported(tmp_path):
    c = run_cell("publish", cell(producer="batch", transport="memory"), options(tmp_path))
    assert c.status == "skipped"
    assert "Producer.batch" in c.reason and "supports_batch" in c.reason


def test_pickle_cells(tmp_path):
    opts = options(tmp_path)
    for params in (cell(serializer="pickle"),
                   cell("celery", "held", "send_task", serializer="pickle")):
        assert_counted(run_cell("publish", params, opts))


def test_a_missing_transport_module_skips_with_the_reason(monkeypatch, tmp_path):
    real = brokers.REGISTRY.module

    def module(name):
        if name == "fifo":  # what brokers.module raises when the module cannot import
            raise brokers.TransportUnavailable(
                "transport 'fifo' cannot be loaded here: No module named 'bench.brokers.fifo'")
        return real(name)

    monkeypatch.setattr(brokers.REGISTRY, "module", module)
    assert any(c["transport"] == "fifo" for c in cells("publish", options(tmp_path)))
    c = run_cell("publish", cell(transport="fifo"), options(tmp_path))
    assert c.status == "skipped"
    assert "fifo" in c.reason and "cannot be loaded" in c.reason


# --------------------------------------------------------------------------- open loop
def test_open_loop_rate_holds_on_memory(tmp_path):
    c = run_cell("publish", cell(), options(tmp_path, rate=500, duration=2.0))
    assert_counted(c)
    m = c.metrics
    assert m["sent"] == 1000
    assert abs(m["rate_achieved_per_s"] - 500) <= 0.05 * 500, m
    assert m["rate_shortfall"] is False
    assert m["latency_basis"] == "publish-return"
    for name in ("from_intended", "from_send", "schedule_lag"):
        assert c.histograms[name]["count"] == 1000
    # Latency from the intended time can only be longer than from the actual send.
    assert c.histograms["from_intended"]["p99"] >= c.histograms["from_send"]["p50"]


def test_open_loop_with_a_concurrent_consumer_measures_from_receipt(need, tmp_path):
    need("redis")
    c = run_cell("publish", cell(transport="redis"), options(tmp_path, rate=200, duration=1.0))
    assert_counted(c)
    assert c.metrics["latency_basis"] == "receive"
    assert c.histograms["from_intended"]["count"] == c.metrics["received"]
    assert c.histograms["from_send"]["count"] == c.histograms["e2e"]["count"]


# --------------------------------------------------------------------------- loss is reported
def test_the_consumer_process_reports_loss_and_duplicates(need, tmp_path):
    need("redis")
    from bench.brokers import redis as redis_broker

    with redis_broker.broker(tmp_path) as env:
        target = Target.from_env(env, brokers.info("redis"))
        driver = kombu_driver.Publisher(target, f"celery-bench-test-{uuid.uuid4().hex[:8]}",
                                        "held", "json", "x", 30.0)
        consumer = ConsumerProcess(driver.consumer_spec(), 20, tmp_path, 30.0)
        try:
            consumer.start()
            consumer.wait_ready()
            driver.open()
            with driver.sending() as send:
                for i in (0, 1, 2, 3, 3, 4):   # 3 twice; 5 and 6 "sent" but never published
                    send(i, time.perf_counter_ns())
            got = consumer.finish(7)
        finally:
            consumer.stop()
            driver.close()
    assert (got.received, got.duplicates) == (5, 1)
    assert got.seen[:7].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert any("stopped counting" in n for n in got.notes)
    assert consumer_processes() == []


# --------------------------------------------------------------------------- --app / --task
APP_MODULE = """
    import os
    from celery import Celery

    app = Celery("{name}", broker=os.environ["CELERY_BENCH_REDIS_URL"])
    app.conf.task_routes = {{"{name}.add": {{"queue": "{real_queue}"}}}}

    @app.task(name="{name}.add")
    def add(x, y, z=0):
        return x + y
"""


def write_app(folder, redis_url) -> tuple[str, str]:
    name = f"proj_{uuid.uuid4().hex[:8]}"
    real_queue = f"celery-bench-test-real-{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(
        APP_MODULE.format(name=name, real_queue=real_queue)))
    return name, real_queue


def test_app_and_task_measure_a_users_stack(cli_run, tmp_path, redis_url):
    import redis

    name, real_queue = write_app(tmp_path, redis_url)
    proc = cli_run("run", "publish", "--quick", "--repeat", "1", "--app", f"{name}:app", "--task", f"{name}.add",
                   "--only", "api=celery", "--duration", "0.2", "--out", "app.json", "--quiet",
                   env={"CELERY_BENCH_REDIS_URL": redis_url})
    assert proc.returncode == 0, proc.stderr
    cells = results.load(tmp_path / "app.json").find("publish", api="celery")
    assert {(c.params["method"], c.params["producer"]) for c in cells} == \
        set(publish.CELERY_RUNGS)
    for c in cells:
        assert c.params["transport"] == "app"
        assert_counted(c)
        assert "****" in c.metrics["broker"] or "@" not in c.metrics["broker"]
    # Only the cell's own queue was used: the app's real route received nothing.
    assert redis.Redis.from_url(redis_url).llen(real_queue) == 0


def test_app_routes_are_restored_after_a_cell(tmp_path, redis_url, monkeypatch):
    from bench.drivers import userapp

    name, real_queue = write_app(tmp_path, redis_url)
    monkeypatch.setenv("CELERY_BENCH_REDIS_URL", redis_url)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    opts = options(tmp_path, app=f"{name}:app", task=f"{name}.add")
    app = userapp.load_app(opts.app)
    before = app.conf.task_routes
    c = run_cell("publish", cell("celery", "default", "delay", transport="app"), opts)
    assert_counted(c)
    assert app.conf.task_routes == before
    assert app.amqp.router.route({}, f"{name}.add")["queue"].name == real_queue


def test_app_usage_errors_are_one_line(cli_run, tmp_path, redis_url):
    name, _ = write_app(tmp_path, redis_url)
    cases = {
        "cannot import module": ["--app", "no_such_module_here:app"],
        "has no attribute": ["--app", f"{name}:nope"],
        "has no task named": ["--app", f"{name}:app", "--task", "no.such.task"],
    }
    for expected, args in cases.items():
        proc = cli_run("run", "publish", "--quick", "--repeat", "1", *args, "--out", "e.json",
                       env={"CELERY_BENCH_REDIS_URL": redis_url})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- unreachable services
def test_unreachable_redis_skips_its_cells_and_the_run_still_passes(cli_run, tmp_path):
    url = f"redis://127.0.0.1:{closed_port()}/0"
    proc = cli_run("run", "publish", "--quick", "--repeat", "1", "--only", "api=kombu", "--only", "producer=held",
                   "--duration", "0.1", "--warmup", "0", "--out", "u.json", "--quiet",
                   env={"CELERY_BENCH_REDIS_URL": url})
    assert proc.returncode == 0, proc.stderr
    run = results.load(tmp_path / "u.json")
    (redis_cell,) = run.find("publish", transport="redis")
    assert redis_cell.status == "skipped"
    assert "unreachable" in redis_cell.reason
    (memory_cell,) = run.find("publish", api="kombu", transport="memory")
    assert memory_cell.status == "ok"

    proc = cli_run("run", "publish", "--transport", "redis", "--out", "v.json",
                   env={"CELERY_BENCH_REDIS_URL": url})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis" in lines[0], proc.stderr


# --------------------------------------------------------------------------- rate sweeps
def test_a_rate_sweep_holds_each_step_and_judges_it(tmp_path):
    opts = options(tmp_path, rate_sweep=(300.0, 600.0), duration=0.5)
    steps = [c for c in cells("publish", opts)
             if c["api"] == "kombu" and c["producer"] == "held" and c["transport"] == "redis"]
    assert [c["rate"] for c in steps] == [300.0, 600.0]
    c = run_cell("publish", cell(transport="unix") | {"rate": 300.0}, opts)
    assert_counted(c)
    m = c.metrics
    assert m["rate_target_per_s"] == 300.0 and m["sent"] == 150
    assert m["backlog_growth_per_s"] is not None and isinstance(m["sustainable"], bool)
    assert c.histograms["from_intended"]["count"] == m["received"]
