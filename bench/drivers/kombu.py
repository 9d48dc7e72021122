"""Kombu driver: publish with a producer strategy.

Strategies (``producer`` cell param):

- ``held``            one :class:`kombu.Producer` on one channel for the whole loop
- ``per-call``        ``kombu.pools.producers[connection].acquire()`` around every publish
- ``new-connection``  a new :class:`kombu.Connection` (and producer) for every message
- ``batch``           ``Producer.batch()`` (Kombu 5.7) around the loop; only transports
                      whose channel implements it really batch (redis, our unix). On
                      redis each publish through a named exchange still reads the
                      routing table (SMEMBERS) unbatched: only the LPUSH is batched.

Producers are built with Kombu's defaults (``auto_declare``: every publish passes
its exchange to ``maybe_declare``, answered from a per-connection cache). With
``retry`` every publish passes ``retry=True`` with Celery's default
``task_publish_retry_policy`` (3 retries), as Celery does; without it, a plain
``publish`` as Kombu's default (``retry=False``) and the seed's ladder have it.

A message carries its sequence number ``i`` and its send time ``t``
(``perf_counter_ns``) in two headers; warm-up messages carry ``i = -1``.
Consumers never decode the body for Kombu messages (:func:`extract`).
"""
from __future__ import annotations

from contextlib import contextmanager

from kombu import Exchange, Producer, Queue
from kombu import pools

from .consumer import Tally, drain
from .target import Target, delete_queue, queue_spec

STRATEGIES = ("held", "per-call", "new-connection", "batch")
# Celery's default task_publish_retry_policy: bounded, unlike retry=True alone.
RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}
EXTRACT = "bench.drivers.kombu:extract"


def extract(message) -> tuple[int, int]:
    """(sequence number, send time ns) of a message published by this driver."""
    h = message.headers
    return h["i"], h["t"]


class Publisher:
    """Publishes to one unique queue with one strategy; consumes it back."""

    api = "kombu"
    extract = EXTRACT

    def __init__(self, target: Target, queue_name: str, strategy: str, serializer: str,
                 payload, timeout: float, retry: bool = False):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown kombu producer strategy {strategy!r}")
        self.target = target
        self.strategy = strategy
        self.serializer = serializer
        self.payload = payload
        self.timeout = timeout
        self.retry = retry
        # Kombu's defaults (durable, persistent messages), as Celery's own queues are.
        self.exchange = Exchange(queue_name, "direct")
        self.queue = Queue(queue_name, self.exchange, routing_key=queue_name)
        self.accept = [serializer]
        self.conn = None
        self._pool_used = False

    def open(self) -> None:
        self.conn = self.target.connect()
        self.conn.ensure_connection(max_retries=1, timeout=self.timeout)
        self.queue(self.conn.default_channel).declare()

    def _retry_kwargs(self) -> dict:
        return {"retry": True, "retry_policy": RETRY_POLICY} if self.retry else {}

    @contextmanager
    def sending(self):
        """Yields ``send(i, t)``: publish one message carrying ``i`` and ``t``."""
        body, rk, ser, ex = self.payload, self.queue.routing_key, self.serializer, self.exchange
        extra = self._retry_kwargs()
        if self.strategy in ("held", "batch"):
            channel = self.conn.channel()
            producer = Producer(channel, exchange=ex, serializer=ser)
            publish = producer.publish

            if extra:
                def send(i, t):
                    publish(body, routing_key=rk, headers={"i": i, "t": t}, **extra)
            else:  # the plain call, as user code makes it: no keyword unpacking
                def send(i, t):
                    publish(body, routing_key=rk, headers={"i": i, "t": t})

            try:
                if self.strategy == "batch":
                    with producer.batch():  # Kombu's default max_size (1000)
                        yield send
                else:
                    yield send
            finally:
                channel.close()
        elif self.strategy == "per-call":
            conn, group, acquire_timeout = self.conn, pools.producers, self.timeout
            self._pool_used = True

            def send(i, t):
                with group[conn].acquire(block=True, timeout=acquire_timeout) as producer:
                    producer.publish(body, exchange=ex, routing_key=rk, serializer=ser,
                                     headers={"i": i, "t": t}, **extra)
            yield send
        else:  # new-connection
            connect = self.target.connect

            def send(i, t):
                with connect() as conn:
                    Producer(conn, exchange=ex, serializer=ser).publish(
                        body, routing_key=rk, headers={"i": i, "t": t}, **extra)
            yield send

    def drain(self, tally: Tally, until, timeout: float) -> None:
        with self.target.connect() as conn:
            drain(conn, self.queue, extract, tally, until, timeout, accept=self.accept)

    def consumer_spec(self) -> dict:
        return {"target": self.target.spec, "queue": queue_spec(self.queue),
                "extract": self.extract, "accept": self.accept}

    def close(self) -> None:
        if self._pool_used and self.conn is not None:
            # kombu pools are process-global: drop this cell's pools with the cell.
            for group in (pools.producers, pools.connections):
                try:
                    group[self.conn].force_close_all()
                    del group[self.conn]
                except Exception:
                    pass
        delete_queue(self.target.connect, self.queue, delete_exchange=True)
        if self.conn is not None:
            self.conn.release()
            self.conn = None
