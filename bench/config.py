"""Service addresses, reachability probes and secret masking.

Every service URL comes from here: defaults are the standard loopback ones,
overridden by ``CELERY_BENCH_*`` environment variables or the matching CLI flags.
"""
from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

DEFAULTS = {
    "redis": "redis://127.0.0.1:6379/0",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
    "postgres": "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
}
ENV_VARS = {
    "redis": "CELERY_BENCH_REDIS_URL",
    "amqp": "CELERY_BENCH_AMQP_URL",
    "postgres": "CELERY_BENCH_POSTGRES_URL",
}
PROBE_TIMEOUT_S = 1.0


class UsageError(Exception):
    """A user's mistake: printed as one line, exit code 2, no traceback."""


def service_url(name: str) -> str:
    """The URL for service ``name`` ('redis', 'amqp', 'postgres')."""
    return os.environ.get(ENV_VARS[name]) or DEFAULTS[name]


def set_service_url(name: str, url: str) -> None:
    """Override a service URL for this process and the workers it starts."""
    os.environ[ENV_VARS[name]] = url


def mask_url(url: str) -> str:
    """``amqp://guest:guest@host//`` -> ``amqp://guest:****@host//``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:****@{netloc[1]}"))


# A URL's password inside a longer string: "--amqp-url=amqp://u:pw@h", an error message.
_EMBEDDED_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)([^\s@/]+)(@)")


def mask_secrets(obj):
    """Mask every password found in URLs anywhere inside ``obj`` (dict/list/str)."""
    if isinstance(obj, str):
        return _EMBEDDED_PASSWORD.sub(r"\1****\3", mask_url(obj)) if "://" in obj else obj
    if isinstance(obj, dict):
        return {k: mask_secrets(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Reachability:
    ok: bool
    reason: str = ""
    version: str | None = None


def _tcp_probe(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{host}:{port} unreachable ({exc.strerror or exc})"


def _probe_redis(url: str) -> Reachability:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=PROBE_TIMEOUT_S,
                                      socket_connect_timeout=PROBE_TIMEOUT_S)
        info = client.info("server")
        client.close()
        return Reachability(True, version=info.get("redis_version"))
    except Exception as exc:  # any failure means "not usable"
        return Reachability(False, f"redis at {mask_url(url)} unreachable: {exc}")


def _probe_amqp(url: str) -> Reachability:
    parts = urlsplit(url)
    err = _tcp_probe(parts.hostname or "127.0.0.1", parts.port or 5672)
    if err:
        return Reachability(False, f"rabbitmq at {mask_url(url)}: {err}")
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=PROBE_TIMEOUT_S * 3) as conn:
            conn.connect()
            props = conn.connection.server_properties or {}
            version = props.get("version")
            if isinstance(version, bytes):
                version = version.decode()
            return Reachability(True, version=version)
    except Exception as exc:
        return Reachability(False, f"rabbitmq at {mask_url(url)} unusable: {exc}")


def _probe_postgres(url: str) -> Reachability:
    parts = urlsplit(url)
    err = _tcp_probe(parts.hostname or "127.0.0.1", parts.port or 5432)
    if err:
        return Reachability(False, f"postgresql at {mask_url(url)}: {err}")
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url, poolclass=sa.pool.NullPool,
                                  connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            version = conn.execute(sa.text("SHOW server_version")).scalar()
        engine.dispose()
        return Reachability(True, version=str(version))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        return Reachability(False, f"postgresql at {mask_url(url)} unusable: {first}")


_PROBES = {"redis": _probe_redis, "amqp": _probe_amqp, "postgres": _probe_postgres}


@lru_cache(maxsize=None)
def _probe_cached(name: str, url: str) -> Reachability:
    return _PROBES[name](url)


def probe(name: str) -> Reachability:
    """Is service ``name`` reachable right now? Cached per URL for the run."""
    return _probe_cached(name, service_url(name))


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
