"""Celery driver: send one task message by ``delay``, ``apply_async`` or ``send_task``,
with the app's default per-call producer or one producer held across the loop.

- ``producer=default``  what user code does: ``send_task`` acquires a producer from the
                        pool per call (``app.producer_or_acquire()`` with no producer)
- ``producer=held``     ``app.producer_or_acquire()`` entered once and passed as
                        ``producer=`` to ``apply_async`` / ``send_task`` (``delay`` cannot)

A message carries ``(payload, i, t)`` as its args: the task is never run here,
a Kombu consumer drains the raw messages (:func:`extract` reads them back).

The bench's own app is built per cell with ``ignore_result`` (a result backend
would SUBSCRIBE per task and be measured instead of publishing). ``--app`` points
these cells at a user's app and ``--task`` at one of its tasks; only the queue is
changed (a route to the cell's unique queue, undone afterwards), so nothing
reaches the user's workers.
"""
from __future__ import annotations

from contextlib import contextmanager

from kombu import pools

from .consumer import drain
from .target import Target, delete_queue, queue_spec

METHODS = ("delay", "apply_async", "send_task")
PRODUCERS = ("default", "held")
DEFAULT_TASK = "bench.noop"
EXTRACT = "bench.drivers.celery:extract"


def extract(message) -> tuple[int, int]:
    """(sequence number, send time ns) from a task message this driver sent."""
    body = message.decode()
    args = body[0] if isinstance(body, (list, tuple)) else body["args"]  # protocol 2 or 1
    return int(args[1]), int(args[2])


# --------------------------------------------------------------------------- publisher
class Publisher:
    api = "celery"
    extract = EXTRACT

    def __init__(self, target: Target, queue_name: str, method: str,
                 producer: str, serializer: str, payload: str, timeout: float,
                 app=None, task_name: str = DEFAULT_TASK):
        if method not in METHODS or producer not in PRODUCERS:
            raise ValueError(f"unknown celery method/producer {method!r}/{producer!r}")
        if method == "delay" and producer == "held":
            raise ValueError("delay() cannot take a producer")
        self.target = target
        self.queue_name = queue_name
        self.method = method
        self.producer = producer
        self.serializer = serializer
        self.payload = payload
        self.timeout = timeout
        self.user_app = app
        self.task_name = task_name
        self.app = self.task = self.queue = None
        self._old_routes = None

    def prepare(self) -> None:
        """Build the app and resolve the cell's queue (no I/O): a consumer needs the queue
        before anything is published."""
        if self.app is not None:
            return
        q = self.queue_name
        if self.user_app is None:
            from ..celery_app import make_app

            spec = self.target.spec
            self.app = make_app(
                spec["url"], None, spec.get("transport_options"),
                task_default_queue=q, task_default_exchange=q, task_default_routing_key=q,
                task_ignore_result=True, task_serializer=self.serializer,
                accept_content=[self.serializer], broker_connection_timeout=self.timeout)
        else:
            app = self.app = self.user_app
            old = self._old_routes = app.conf.task_routes
            rest = [] if old is None else list(old) if isinstance(old, (list, tuple)) else [old]
            app.conf.task_routes = [{self.task_name: {"queue": q}}, *rest]
            app.amqp.flush_routes()
            app.amqp.router = app.amqp.Router()
        self.task = self.app.tasks[self.task_name]
        self.queue = self.app.amqp.router.route({}, self.task_name)["queue"]

    def open(self) -> None:
        self.prepare()
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=self.timeout)
            self.queue(conn.default_channel).declare()

    @property
    def accept(self) -> list:
        """Exactly the serializer this cell publishes with (the cell's ``serializer``
        param), whatever else the app accepts: the counting consumer decodes nothing
        else, and pickle only in a cell that asked for it."""
        return [self.serializer]

    @contextmanager
    def sending(self):
        """Yields ``send(i, t)``: one task message carrying ``i`` and ``t`` in its args."""
        body, task, app, name = self.payload, self.task, self.app, self.task_name
        if self.producer == "held":
            with app.producer_or_acquire() as producer:
                if self.method == "apply_async":
                    apply_async = task.apply_async

                    def send(i, t):
                        apply_async((body, i, t), producer=producer)
                else:
                    send_task = app.send_task

                    def send(i, t):
                        send_task(name, (body, i, t), producer=producer)
                yield send
            return
        if self.method == "delay":
            delay = task.delay

            def send(i, t):
                delay(body, i, t)
        elif self.method == "apply_async":
            apply_async = task.apply_async

            def send(i, t):
                apply_async((body, i, t))
        else:
            send_task = app.send_task

            def send(i, t):
                send_task(name, (body, i, t))
        yield send

    def drain(self, tally, until, timeout: float) -> None:
        with self.target.connect() as conn:
            drain(conn, self.queue, extract, tally, until, timeout, accept=self.accept)

    def consumer_spec(self) -> dict:
        self.prepare()
        return {"target": self.target.spec, "queue": queue_spec(self.queue),
                "extract": self.extract, "accept": self.accept}

    def close(self) -> None:
        app = self.app
        if app is None:
            return
        if self.queue is not None:
            delete_queue(self.target.connect, self.queue,
                         delete_exchange=self.queue.exchange is not None
                                      and self.queue.exchange.name == self.queue_name)
        # Celery's producer pool lives in kombu's process-global pools: close this cell's.
        try:
            conn = app.connection_for_write()
            for group in (pools.producers, pools.connections):
                try:
                    group[conn].force_close_all()
                    del group[conn]
                except Exception:
                    pass
            app.amqp._producer_pool = None
        except Exception:
            pass
        if self.user_app is not None:
            app.conf.task_routes = self._old_routes
            app.amqp.flush_routes()
            app.amqp.router = app.amqp.Router()
        else:
            app.close()
        self.app = None
