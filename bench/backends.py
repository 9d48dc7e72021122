"""Celery result backends the worker scenarios use: every fact about one, in one place.

A scenario picks a backend by what it can do (``native_join``, ``chords``, the
``bench.joins`` speedup that applies), never by name, and gets its URL, its
Celery settings and its cleanup from :meth:`Backend.open`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import brokers, config

NO_GET_MANY = ("the database backend has no get_many: join_native() raises AttributeError "
               "(GroupResult.get() falls back to join())")


@dataclass(frozen=True)
class Backend:
    name: str
    service: str | None = None        # a bench.config service it needs
    transport: str | None = None      # the broker it must go with (rpc replies over amqp)
    native_join: bool = False         # get_many: join_native()/get() wait natively
    native_join_missing: str = ""     # what happens instead, when it has none
    chords: bool = True
    chords_missing: str = ""
    speedup: str | None = None        # the bench.joins method for it (``method`` param)
    database: bool = False

    def open(self, folder: Path, tag: str) -> tuple[str, dict, Callable[[], None]]:
        """(result backend URL, Celery settings, cleanup after the workers stopped)."""
        if self.database:
            # Unique table names, so a shared database keeps each run's rows apart.
            tables = {"task": f"bench_taskmeta_{tag}", "group": f"bench_groupmeta_{tag}"}
            conf = {"database_table_names": tables}
            if self.service is None:
                return f"db+sqlite:///{folder / 'results.sqlite'}", conf, lambda: None
            url = config.service_url(self.service)
            return f"db+{url}", conf, lambda: _drop_tables(url, tables.values())
        if self.service is None:
            return "rpc://", {}, lambda: None
        return config.service_url(self.service), {"result_expires": 600}, lambda: None

    def prepare(self, app) -> None:
        """Get the backend ready before pool children race to (SQLite: tables, WAL)."""
        if self.database and self.service is None:
            _sqlite_wal(app)


BACKENDS = {
    b.name: b for b in (
        Backend("sqlite", database=True, native_join_missing=NO_GET_MANY,
                chords_missing="", speedup="db-batch"),
        Backend("postgresql", service="postgres", database=True,
                native_join_missing=NO_GET_MANY, speedup="db-batch"),
        Backend("redis", service="redis", native_join=True, speedup="redis-pubsub"),
        Backend("rpc", transport="amqp", native_join=True, chords=False,
                chords_missing="the rpc backend does not support chords"),
    )
}


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise config.UsageError(f"backend {name!r}: choose from {', '.join(BACKENDS)}") \
            from None


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def embedded() -> Backend:
    """The serverless backend (SQLite in the cell's folder)."""
    return next(b for b in BACKENDS.values() if b.service is None and b.transport is None)


def for_transport(transport: str) -> Backend:
    """The backend to pair with a broker: serverless with an embedded one, else the first
    server backend that needs no particular broker (redis)."""
    if brokers.info(transport).service is None:
        return embedded()
    return next(b for b in BACKENDS.values() if b.service and b.transport is None
                and not b.database)


def fastest_reachable(transport: str) -> Backend:
    """The fastest correct backend for a broker that is reachable now: redis (pub/sub, no
    polling) when its server answers, else the serverless one (SQLite, polled)."""
    fast = next(b for b in BACKENDS.values() if b.service and b.transport is None
                and not b.database)
    if config.probe(fast.service).ok:
        return fast
    return embedded()


# Waits that sleep one ``interval`` between looks: every wait on a database backend (one
# SELECT per poll), and join_native/get on redis, which sleep one interval before the
# first look when a member is pending.
NATIVE_SLEEPS = ("join_native", "get")


def polls(name: str, wait: str = "result") -> bool:
    """Does ``wait`` (``result``: AsyncResult.get, or a join method) on backend ``name``
    (ours, or a Celery backend class name for --app) sleep a polling interval?"""
    b = BACKENDS.get(name)
    database = b.database if b else name == "DatabaseBackend"
    if database:
        return wait != "redis_join"
    redis = name in ("redis", "RedisBackend")
    return redis and wait in NATIVE_SLEEPS


def services(name: str) -> set[str]:
    b = get(name)
    return ({b.service} if b.service else set()) | (brokers.services(b.transport)
                                                   if b.transport else set())


def _drop_tables(url: str, tables) -> None:
    """Drop a run's tables (unique names, so ours; Celery's sequences are shared, left)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for name in tables:
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}"')
    except Exception:  # best effort: the measurement is made, the server may be gone
        pass
    finally:
        engine.dispose()


def _sqlite_wal(app) -> None:
    """Create the tables in WAL mode: the harness reads while workers write, and a commit
    costs one fsync instead of a rollback journal's several."""
    from sqlalchemy import text

    session = app.backend.ResultSession()
    try:
        session.execute(text("PRAGMA journal_mode=WAL"))
        session.commit()
    finally:
        session.close()
