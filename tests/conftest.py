"""Shared test fixtures: real services, never mocks.

A test that needs a service asks for it with the ``need`` fixture (or the
``redis``/``amqp``/``postgres`` markers). When the service is unreachable the
test is skipped with the reason, except in CI (``CI=true``), where the
services are part of the contract and the test fails instead.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import config  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"
SERVICE_MARKS = {"redis": "redis", "amqp": "amqp", "postgres": "postgres"}


def require(service: str) -> config.Reachability:
    reach = config.probe(service)
    if not reach.ok:
        if IN_CI:
            pytest.fail(f"{service} must be reachable in CI: {reach.reason}", pytrace=False)
        pytest.skip(reach.reason)
    return reach


@pytest.fixture
def need():
    """``need("redis")`` skips (or fails in CI) when Redis is unreachable."""
    return require


@pytest.fixture
def redis_url():
    require("redis")
    return config.service_url("redis")


@pytest.fixture
def amqp_url():
    require("amqp")
    return config.service_url("amqp")


@pytest.fixture
def postgres_url():
    require("postgres")
    return config.service_url("postgres")


def pytest_runtest_setup(item):
    for mark, service in SERVICE_MARKS.items():
        if item.get_closest_marker(mark):
            require(service)


@pytest.fixture
def cli_run(tmp_path):
    """Run the real ``celery-bench`` command as a subprocess."""
    import subprocess

    def run(*args, timeout=600, env=None):
        full_env = dict(os.environ, **(env or {}))
        full_env.setdefault("COLUMNS", "200")
        return subprocess.run([sys.executable, "-m", "bench", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout, env=full_env)
    return run


@pytest.fixture
def cli_inproc(tmp_path, monkeypatch):
    """Run ``celery-bench`` in this process through click's ``CliRunner``, in ``tmp_path``.

    The fast tier's twin of ``cli_run``: same arguments, same result shape
    (``returncode``, ``stdout``, ``stderr``), no interpreter start-up. The environment
    is restored afterwards (``config`` writes resolved URLs back into it).
    """
    import subprocess

    from click.testing import CliRunner

    from bench import cli

    monkeypatch.chdir(tmp_path)

    def run(*args, timeout=None, env=None):   # timeout: the subprocess twin's; unused here
        saved = dict(os.environ)
        env = dict({"COLUMNS": "200"}, **(env or {}))
        try:
            with CliRunner().isolation(env=env) as (out, err, _):
                try:
                    cli.main(list(args))
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return subprocess.CompletedProcess(args, code, stdout, stderr)
    return run


# ------------------------------------------------------------------ our unix broker
@pytest.fixture
def sockdir():
    """A short private folder for sockets: sun_path holds 107 bytes, tmp_path can be longer."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="cbs-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def start_broker(sockdir):
    """``start_broker(**options)``: a broker subprocess (transports.broker.start) with those
    limits and options, its socket and log in ``sockdir``; every one is stopped after."""
    from transports import broker as unix_broker

    started = []

    def start(**options):
        n = len(started)
        b = unix_broker.start(str(sockdir / f"b{n}.sock"), log_path=sockdir / f"b{n}.log",
                              **options)
        started.append(b)
        return b
    yield start
    for b in started:
        b.stop()


@pytest.fixture
def broker(sockdir):
    """One broker subprocess at ``sockdir/broker.sock``, stopped after."""
    from transports import broker as unix_broker

    proc = unix_broker.start(str(sockdir / "broker.sock"), log_path=sockdir / "broker.log")
    yield proc
    proc.stop()


# The fast tier (``make check`` = ``pytest -m "not slow"``): no services, no browser, no
# valgrind, no subprocess-started CLI. A test that asks for a service (its marker or
# fixture) or for ``cli_run`` is slow by that fact; files whose every test starts
# brokers, workers, Locust or a browser are listed in SLOW_FILES (measured with
# ``--durations``, see docs/extending.md "Test tiers").
SLOW_FIXTURES = {"cli_run", "need", "redis_url", "amqp_url", "postgres_url", "page", "browser"}
SLOW_FILES = {
    "test_broker_attacks.py", "test_broker_confirm.py", "test_broker_limits.py",
    "test_consume.py", "test_fanout.py", "test_faults.py", "test_fifo_loss.py",
    "test_fifo_transport.py", "test_html_report.py", "test_instructions.py", "test_join.py",
    "test_locust.py", "test_locust_celery.py", "test_locust_hdr.py", "test_locust_webui.py",
    "test_maxrate.py", "test_overhead.py", "test_plugins.py", "test_prefetch.py",
    "test_publish.py", "test_transport_contract.py", "test_transport_faults.py",
    "test_unix_transport.py", "test_worker_scenario.py", "test_workers.py",
    "test_microbench.py", "test_locust_rig.py", "test_variants.py", "test_foreign_messages.py",
    "test_run_file_early.py", "test_broker_shares.py",
}


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        if (item.path.name in SLOW_FILES
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or any(item.get_closest_marker(m) for m in SERVICE_MARKS)):
            item.add_marker(slow)


class RealMeasurementInFastTier(BaseException):
    """Raised in the fast tier where a cell would be measured or a child process started.

    A unit broken so that a bad value passes its check would otherwise go on to measure
    for real (minutes a test, and a SIGTERM only ends the test it lands in). A
    BaseException, so neither the runner's per-cell ``except Exception`` nor the CLI's
    handlers turn it into a failed cell or an exit code: the test fails at once, naming it.
    """


TICKER = str(ROOT / "bench" / "progress.py")   # the status line's helper: measures nothing


@pytest.fixture(autouse=True)
def _fast_tier_cannot_measure(request, monkeypatch):
    """In the fast tier nothing measures: ``runner.measure_once`` (every cell of a run, a
    gate's re-measure, ``run_cell``) and ``children.spawn`` (workers, brokers, measuring
    and callgrind children; all but the progress ticker) raise
    :class:`RealMeasurementInFastTier`. The full tier (``slow``) is left as it is."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    from bench import children, runner

    def refuse(what):
        def guard(*args, **kwargs):
            raise RealMeasurementInFastTier(
                f"{request.node.nodeid}: the fast tier (make check) must not {what}; a "
                f"check that should have refused the input let it through (or mark the "
                f"test slow)")
        return guard

    spawn, refuse_spawn = children.spawn, refuse("start a child process")

    def guarded_spawn(argv, **kwargs):
        if isinstance(argv, (list, tuple)) and TICKER in map(str, argv):
            return spawn(argv, **kwargs)
        return refuse_spawn(argv, **kwargs)

    monkeypatch.setattr(runner, "measure_once", refuse("measure a cell"))
    monkeypatch.setattr(children, "spawn", guarded_spawn)
    yield
