"""Where a driver publishes: a connection factory, and a plain-JSON spec from which
another process (a consumer, a producer) rebuilds the same connection and queue."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kombu import Connection, Exchange, Queue

from .. import brokers
from .userapp import load_app

# Transport aliases Kombu knows that name one of bench.brokers' transports differently.
ALIASES = {"pyamqp": "amqp", "amqps": "amqp", "librabbitmq": "amqp", "rediss": "redis"}


@dataclass
class Target:
    connect: Callable[[], Connection]
    spec: dict                       # {"url", "transport_options"} or {"app": "module:attr"}
    cross_process: bool = True
    supports_batch: bool = False

    @classmethod
    def from_env(cls, env: brokers.BrokerEnv, transport: brokers.Transport) -> "Target":
        """A bench broker environment and what its transport declares."""
        url, opts = env.url, dict(env.transport_options)
        return cls(lambda: Connection(url, transport_options=dict(opts)),
                   {"url": url, "transport_options": opts},
                   cross_process=transport.cross_process,
                   supports_batch=transport.supports_batch)

    @classmethod
    def for_app(cls, app, spec: str) -> "Target":
        """Where a user's app publishes, with what its transport declares (when the bench
        knows it; an unknown one is taken to be a server: cross-process, no batch)."""
        alias = app.connection_for_write().transport_cls
        name = ALIASES.get(alias, alias)
        cross, batch = True, False
        if name in brokers.names():
            try:
                info = brokers.info(name)
                cross, batch = info.cross_process, info.supports_batch
            except ImportError:
                pass
        return cls(app.connection_for_write, {"app": spec}, cross_process=cross,
                   supports_batch=batch)


def connection_from_spec(spec: dict) -> Connection:
    """A connection built from a :class:`Target` spec (in another process)."""
    if spec.get("app"):
        return load_app(spec["app"]).connection_for_read()
    return Connection(spec["url"], transport_options=dict(spec.get("transport_options") or {}))


def queue_spec(q: Queue) -> dict:
    """A Queue as plain JSON, so another process declares exactly the same one."""
    ex = q.exchange
    return {"name": q.name, "routing_key": q.routing_key, "durable": q.durable,
            "auto_delete": q.auto_delete, "queue_arguments": q.queue_arguments,
            "exchange": ex.name if ex is not None else "",
            "exchange_type": ex.type if ex is not None else "direct",
            "exchange_durable": ex.durable if ex is not None else True,
            "exchange_auto_delete": ex.auto_delete if ex is not None else False}


def queue_from_spec(d: dict) -> Queue:
    ex = Exchange(d["exchange"], d["exchange_type"], durable=d["exchange_durable"],
                  auto_delete=d["exchange_auto_delete"])
    return Queue(d["name"], ex, routing_key=d["routing_key"], durable=d["durable"],
                 auto_delete=d["auto_delete"], queue_arguments=d["queue_arguments"])


def delete_queue(connect: Callable[[], Connection], q: Queue, delete_exchange: bool) -> None:
    """Best-effort removal of a cell's queue (and its own exchange)."""
    try:
        with connect() as conn:
            conn.ensure_connection(max_retries=1, timeout=10)
            bound = q(conn.default_channel)
            # A virtual transport (redis) unbinds only what this channel declared:
            # declare first, or the binding keys outlive the queue.
            bound.declare()
            bound.delete()
            if delete_exchange and q.exchange is not None and q.exchange.name:
                q.exchange(conn.default_channel).delete()
    except Exception:  # cleanup must never hide the measurement
        pass
