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
from urllib.parse import urlsplit

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
    """A user's mistake: printed as one line, exit code 2, no traceback.

    Its text is masked (:func:`mask_secrets`): a URL quoted in the message never shows
    its password, whoever raised it."""

    def __str__(self) -> str:
        return mask_secrets(super().__str__())


# --------------------------------------------------------------------------- service URLs
# What each service's URL may start with: schemes Kombu (redis, amqp) or SQLAlchemy
# (postgres, synchronous drivers: Celery's database backend uses them) know.
SCHEMES = {
    "redis": ("redis", "rediss"),
    "amqp": ("amqp", "amqps", "pyamqp"),
    "postgres": ("postgresql", "postgresql+psycopg2", "postgresql+psycopg",
                 "postgresql+pg8000", "postgresql+psycopg2cffi"),
}
LABELS = {"redis": "Redis", "amqp": "RabbitMQ", "postgres": "PostgreSQL"}
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def check_url(service: str, url: str, source: str) -> str:
    """``url`` if it is a usable URL for ``service``; else UsageError naming ``source``
    (the flag or environment variable it came from), what is wrong and what to do.

    Parsed up front, before anything is measured: the scheme (one Kombu or SQLAlchemy
    knows for this service), a host (a name, an IPv4 address, or an IPv6 address in
    brackets), a port from 1 to 65535, a password whose ``/ ? #`` are percent-encoded,
    and for Redis a database number. The URL is quoted masked.
    """
    shown = mask_url(url) if isinstance(url, str) else repr(url)
    example = mask_url(DEFAULTS[service])

    def bad(problem: str):
        return UsageError(f"{source} {shown}: {problem}")

    if not isinstance(url, str) or not url.strip():
        raise UsageError(f"{source} is empty; give a URL such as {example}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise bad("contains a space or a control character; percent-encode it "
                  "(a space is %20)")
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        raise bad(f"is not a URL (scheme://host...), e.g. {example}")
    allowed = SCHEMES[service]
    if scheme.lower() not in allowed:
        raise bad(f"scheme {scheme + '://'!r} is not a {LABELS[service]} URL; use "
                  + " or ".join(f"{s}://" for s in allowed[:2]))
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in rest[len(authority):]:
        raise bad("an '@' after the host: a password with an unencoded '/', '?' or '#'? "
                  "percent-encode them (%2F, %3F, %23; '@' is %40)")
    userinfo, _, hostport = authority.rpartition("@")
    if service == "postgres" and "@" in userinfo:
        raise bad("the user or password holds an unencoded '@'; percent-encode it as %40")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        if "IPv6" in str(exc) or "[" in hostport or "]" in hostport:
            raise bad("the host is not a valid IPv6 address in brackets, e.g. "
                      "[::1]:6379") from None
        if hostport.count(":") > 1:
            raise bad("an IPv6 address goes in brackets, e.g. [::1]:6379 (a ':' in the "
                      "password must be encoded as %3A)") from None
        port_text = hostport.rpartition(":")[2]
        if port_text.isdigit():
            raise bad(f"port {int(port_text)} is not from 1 to 65535") from None
        raise bad(f"port {port_text!r} is not a number from 1 to 65535 (a '/' or ':' in "
                  f"the password must be encoded as %2F, %3A)") from None
    if port is not None and not 1 <= port <= 65535:
        raise bad(f"port {port} is not from 1 to 65535")
    if hostport.startswith("["):
        host = hostport[:hostport.find("]") + 1]
    else:
        host = hostport.rpartition(":")[0] if ":" in hostport else hostport
    if host.startswith("["):
        import ipaddress

        try:
            ipaddress.IPv6Address(host[1:-1].split("%", 1)[0])
        except ValueError:
            raise bad(f"{host} is not a valid IPv6 address; write it in brackets, "
                      f"e.g. [::1]") from None
    elif not host:
        if not (service == "postgres" and "host=" in parts.query):
            raise bad(f"no host; e.g. {example}")
    elif not _HOSTNAME.fullmatch(host):
        raise bad(f"host {host!r} is not a host name or an IP address")
    if service == "redis":
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise bad(f"database {db!r} is not a number; e.g. {scheme}://host:6379/0")
    return url


def service_url(name: str) -> str:
    """The URL for service ``name`` ('redis', 'amqp', 'postgres'): its environment variable
    (checked: a bad one is a UsageError naming it), else the default."""
    value = os.environ.get(ENV_VARS[name])
    if not value:
        return DEFAULTS[name]
    return _checked(name, value, ENV_VARS[name])


@lru_cache(maxsize=None)
def _checked(name: str, url: str, source: str) -> str:
    return check_url(name, url, source)


def set_service_url(name: str, url: str, source: str | None = None) -> None:
    """Override a service URL for this process and the workers it starts (checked first:
    a UsageError naming ``source``, default the environment variable)."""
    _checked(name, url, source or ENV_VARS[name])
    os.environ[ENV_VARS[name]] = url


# --------------------------------------------------------------------------- masking
MASK = "****"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
# A secret in a query string: ?password=..., &sasl_password=..., ;token=... (any case).
_QUERY_SECRET = re.compile(
    r"([?&;][^=&;#\s]*?(?:pass|pwd|secret|token|credential|api[_-]?key|access[_-]?key|"
    r"private[_-]?key|auth)[^=&;#\s]*=)[^&;#\s]*", re.IGNORECASE)


def _mask_userinfo(rest: str) -> str:
    """``user:pw@host...`` (what follows ``scheme://``) with the password masked.

    The password may hold unencoded ``@``, ``/``, ``?`` or ``#``: when the authority
    (up to the first ``/?#``) has a ``:`` or an ``@``, everything from the first ``:``
    to the LAST ``@`` of the URL is masked (more than needed, in a URL such as
    ``redis://h:6379/0?x=a@b``, rather than a leak)."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if ":" not in authority and "@" not in authority:
        return rest
    at = rest.rfind("@")
    if at <= 0:
        return rest
    colon = rest.find(":", 0, at)
    if colon == -1:
        return rest
    return f"{rest[:colon + 1]}{MASK}{rest[at:]}"


def mask_url(url: str) -> str:
    """``amqp://guest:guest@host//`` -> ``amqp://guest:****@host//``; query-string secrets
    (``?password=``, ``token=``, ``sasl_password=``...) too. Never raises."""
    if not isinstance(url, str):
        return url
    m = _SCHEME.match(url)
    if m:
        url = url[:m.end()] + _mask_userinfo(url[m.end():])
    return _QUERY_SECRET.sub(rf"\g<1>{MASK}", url) if "=" in url else url


def mask_text(text: str) -> str:
    """Every URL password and query-string secret inside a longer string masked:
    "--amqp-url=amqp://u:pw@h", an error message, a list's repr."""
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
    return _QUERY_SECRET.sub(rf"\g<1>{MASK}", text) if "=" in text else text


def mask_secrets(obj):
    """Mask every password found in URLs anywhere inside ``obj`` (dict/list/str)."""
    if isinstance(obj, str):
        return mask_text(obj)
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
    try:
        reach = _PROBES[name](url)
    except ValueError as exc:  # a URL the libraries cannot parse: not usable, said masked
        reach = Reachability(False, f"{name} at {mask_url(url)}: {exc}")
    # A driver's error text may quote the URL: never with its password.
    return Reachability(reach.ok, mask_text(reach.reason), reach.version)


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
