"""Count, for real, the round trips this process issues to a Celery result backend.

- redis: every write of a command (or pipeline) on the backend's connection
  pool, its pub/sub connections included, through a counting subclass of the
  pool's connection class; connections opened are counted apart.
- database (SQLAlchemy): every SQL statement (``before_cursor_execute``) and
  every DBAPI connection opened (pool ``connect``), on every engine in the
  process, since Celery builds a new engine per poll when it has not forked.
- rpc (AMQP): the frames py-amqp writes on the result consumer's connection.

    counter = attach(app.backend)   # before the backend's first use
    before = counter.read(); ...; trips, connects = counter.since(before)
"""
from __future__ import annotations

import weakref

class Counter:
    def __init__(self, kind: str, reader=None):
        self.kind = kind
        self.round_trips = 0
        self.connects = 0
        self._reader = reader  # for counts kept elsewhere (AMQP frames)

    def read(self) -> tuple[int, int]:
        if self._reader is not None:
            return self._reader(), self.connects
        return self.round_trips, self.connects

    def since(self, before: tuple[int, int]) -> tuple[int, int]:
        now = self.read()
        return max(0, now[0] - before[0]), max(0, now[1] - before[1])


def _counting_class(cls, counter: Counter):
    def send_packed_command(self, command, check_health=True):
        counter.round_trips += 1
        return cls.send_packed_command(self, command, check_health)

    def connect_check_health(self, *args, **kwargs):
        if not getattr(self, "_sock", None):  # redis-py calls it on every checkout
            counter.connects += 1
        return cls.connect_check_health(self, *args, **kwargs)

    return type(f"Counting{cls.__name__}", (cls,), {
        "send_packed_command": send_packed_command,
        "connect_check_health": connect_check_health})


def _attach_redis(backend) -> Counter:
    counter = Counter("redis")
    pool = backend.client.connection_pool
    if getattr(pool.connection_class, "_bench_counter", None) is not None:
        return pool.connection_class._bench_counter
    cls = _counting_class(pool.connection_class, counter)
    cls._bench_counter = counter
    pool.connection_class = cls
    pool.disconnect()  # connections made before counting would go uncounted
    return counter


class _DbCounting:
    """The counters SQLAlchemy's process-wide events feed, kept on ``Engine`` itself
    (``_bench_counting``) as the redis counter is kept on its connection class."""

    def __init__(self):
        self.counters: "weakref.WeakSet[Counter]" = weakref.WeakSet()

    def on_statement(self, *args, **kwargs):
        for c in list(self.counters):
            c.round_trips += 1

    def on_connect(self, *args, **kwargs):
        for c in list(self.counters):
            c.connects += 1


def _attach_db() -> Counter:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    counting = Engine.__dict__.get("_bench_counting")
    if counting is None:
        counting = Engine._bench_counting = _DbCounting()
        event.listen(Engine, "before_cursor_execute", counting.on_statement)
        event.listen(Pool, "connect", counting.on_connect)
    counter = Counter("database")
    counting.counters.add(counter)
    return counter


def _attach_amqp(backend) -> Counter:
    state = {"conn": None, "base": 0}

    def frames() -> int:
        consumer = getattr(backend, "result_consumer", None)
        kombu_conn = getattr(consumer, "_connection", None)
        amqp_conn = getattr(kombu_conn, "_connection", None) if kombu_conn else None
        if amqp_conn is None:
            return state["base"]
        if amqp_conn is not state["conn"]:  # a (re)connect: carry the old total over
            if state["conn"] is not None:
                state["base"] += state["conn"].bytes_sent
            state["conn"] = amqp_conn
            counter.connects += 1
        # py-amqp counts frames written in ``bytes_sent`` (one per frame).
        return state["base"] + amqp_conn.bytes_sent

    counter = Counter("amqp", frames)
    return counter


def attach(backend) -> Counter:
    """A live round-trip counter for ``backend`` (redis, database or rpc)."""
    name = type(backend).__name__
    if name == "RedisBackend" or hasattr(backend, "client") and hasattr(backend, "mget"):
        return _attach_redis(backend)
    if hasattr(backend, "session_manager"):
        return _attach_db()
    if name == "RPCBackend":
        return _attach_amqp(backend)
    raise ValueError(f"cannot count round trips of a {name}")
