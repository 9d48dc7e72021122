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
