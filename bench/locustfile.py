"""Locust users that publish with Kombu and with Celery, through the harness's drivers.

    make locust                                         # web UI on http://127.0.0.1:8089
    locust -f bench/locustfile.py --web-host 127.0.0.1 --transport redis --producer per-call
    locust -f bench/locustfile.py --headless -u 4 -r 4 -t 30s --transport amqp KombuPublisher
    LOCUST_TRANSPORT=unix locust -f bench/locustfile.py ...      # options from the environment

Each publish is reported through ``events.request``: request_type ``kombu`` or
``celery``, name ``publish <transport>/<how>`` (``held``, ``per-call``,
``new-connection``; ``apply_async``, ``delay``, ``send_task``). ``--results-out FILE``
also writes what Locust measured as a celery-bench results file (scenario
``locust``), which ``celery-bench show/compare/report`` read.

The publishing is bench.drivers' (the same code as ``celery-bench run publish``);
this file only schedules it. Locust measures closed loop, as a user sees it; for
latency from the intended send time, repeats and ratios measured side by side,
run ``celery-bench run publish``. Nothing consumes here: each user purges its own
queue every ``PURGE_EVERY`` publishes and deletes it when it stops.
"""
import locust  # noqa: F401  first: gevent patches the standard library before kombu and redis load

import contextlib
import logging
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from locust import User, constant, events, task

from bench import brokers, recorder, results
from bench.drivers import celery as celery_driver
from bench.drivers import kombu as kombu_driver
from bench.drivers.target import Target

PURGE_EVERY = 10_000
PAYLOAD = "x" * 112                     # the publish scenario's default body
TIMEOUT_S = 30.0
# A FIFO queue refuses publishes until its consumer is attached, and these users only publish.
NEEDS_CONSUMER = {"fifo": "a FIFO queue takes messages only once its consumer is attached, "
                          "and Locust users only publish; use 'celery-bench run publish "
                          "--transport fifo'"}
log = logging.getLogger("celery-bench.locust")
now_ns = time.perf_counter_ns


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--transport", choices=brokers.names(), default="memory",
                        env_var="LOCUST_TRANSPORT", include_in_web_ui=True,
                        help="celery-bench transport to publish over (default memory)")
    parser.add_argument("--producer", default="held", env_var="LOCUST_PRODUCER",
                        choices=[s for s in kombu_driver.STRATEGIES if s != "batch"],
                        include_in_web_ui=True, help="KombuPublisher's producer strategy")
    parser.add_argument("--method", default="apply_async", env_var="LOCUST_METHOD",
                        choices=celery_driver.METHODS, include_in_web_ui=True,
                        help="CeleryPublisher's way to send a task")
    parser.add_argument("--results-out", default="", env_var="LOCUST_RESULTS_OUT",
                        help="also write Locust's measurements as a celery-bench results file")


def _option(environment, name, default):
    return getattr(environment.parsed_options, name, None) or default


class Broker:
    """The transport's broker environment, started once per Locust process (again
    if the transport is changed in the web UI between two tests)."""
    stack = contextlib.ExitStack()
    lock = threading.Lock()             # a gevent lock: locust has patched threading
    env = None
    name = ""

    @classmethod
    def target(cls, environment) -> Target:
        name = _option(environment, "transport", "memory")
        with cls.lock:
            if cls.env is None or name != cls.name:
                cls.close()
                workdir = Path(tempfile.mkdtemp(prefix="celery-bench-locust-"))
                cls.stack.callback(shutil.rmtree, workdir, ignore_errors=True)
                cls.env = cls.stack.enter_context(brokers.broker(name, workdir))
                cls.name = name
            return Target.from_env(cls.env, brokers.info(cls.name))

    @classmethod
    def close(cls):
        cls.stack.close()
        cls.env = None


@events.init.add_listener
def _check_transport(environment, **kwargs):
    """An unreachable transport is the user's setting: say which, and stop (exit 2)."""
    name = _option(environment, "transport", "memory")
    reach = brokers.reachability(name)
    reason = NEEDS_CONSUMER.get(name) or (None if reach.ok else reach.reason)
    if reason:
        log.error("--transport %s: %s", name, reason)
        sys.exit(2)


class _Publisher(User):
    abstract = True
    wait_time = constant(0)             # closed loop: publish again as soon as one returns
    request_type = ""

    def make_driver(self, target, queue_name):
        raise NotImplementedError

    def on_start(self):
        target = Broker.target(self.environment)
        self.transport = Broker.name
        self.driver = self.make_driver(target, f"celery-bench-locust-{uuid.uuid4().hex[:12]}")
        self.driver.open()
        self.sending = contextlib.ExitStack()
        self.send = self.sending.enter_context(self.driver.sending())
        self.i = 0

    def on_stop(self):
        try:
            self.sending.close()
        finally:
            self.driver.close()
            self._delete_queue()

    def _delete_queue(self):
        # A virtual transport (redis) deletes only bindings its own channel declared, so
        # a delete on a fresh connection leaves the queue behind: declare, then delete.
        queue = self.driver.queue
        with contextlib.suppress(Exception), self.driver.target.connect() as conn:
            bound = queue(conn.default_channel)
            bound.declare()
            bound.delete()
            if queue.exchange is not None and queue.exchange.name:
                queue.exchange(conn.default_channel).delete()

    @task
    def publish(self):
        t = now_ns()
        exc = None
        try:
            self.send(self.i, t)
        except Exception as e:          # a Locust failure; the test goes on
            exc = e
        events.request.fire(request_type=self.request_type, name=self.name,
                            response_time=(now_ns() - t) / 1e6, response_length=len(PAYLOAD),
                            exception=exc, context={"transport": self.transport})
        self.i += 1
        if self.i % PURGE_EVERY == 0:
            with contextlib.suppress(Exception), self.driver.target.connect() as conn:
                self.driver.queue(conn.default_channel).purge()


class KombuPublisher(_Publisher):
    """``Producer.publish`` with the ``--producer`` strategy (default: held)."""
    request_type = "kombu"

    def make_driver(self, target, queue_name):
        strategy = _option(self.environment, "producer", "held")
        self.name = f"publish {Broker.name}/{strategy}"
        return kombu_driver.Publisher(target, queue_name, strategy, "json", PAYLOAD, TIMEOUT_S)


class CeleryPublisher(_Publisher):
    """``bench.noop`` sent by ``--method`` (default: apply_async, Celery's producer pool)."""
    request_type = "celery"

    def make_driver(self, target, queue_name):
        method = _option(self.environment, "method", "apply_async")
        self.name = f"publish {Broker.name}/{method}"
        return celery_driver.Publisher(target, queue_name, method, "default", "json", PAYLOAD,
                                       TIMEOUT_S)


# --------------------------------------------------------------------------- --results-out
class Recorded:
    """What Locust measured, per (request_type, transport, name)."""
    samples: dict = {}
    errors: dict = {}
    started = None
    elapsed = 0.0


@events.test_start.add_listener
def _started(environment, **kwargs):
    Recorded.samples, Recorded.errors = {}, {}
    Recorded.started = time.monotonic()


@events.request.add_listener
def _record(request_type, name, response_time, exception, context=None, **kwargs):
    key = (request_type, (context or {}).get("transport", ""), name)
    if exception is not None:
        Recorded.errors[key] = Recorded.errors.get(key, 0) + 1
    else:
        Recorded.samples.setdefault(key, []).append(response_time * 1000.0)  # ms -> us


@events.test_stop.add_listener
def _stopped(environment, **kwargs):
    if Recorded.started is not None:
        Recorded.elapsed = time.monotonic() - Recorded.started


@events.quitting.add_listener
def _write_results(environment, **kwargs):
    out = _option(environment, "results_out", "")
    if not out or not (Recorded.samples or Recorded.errors):
        return
    cells = []
    for key in sorted(set(Recorded.samples) | set(Recorded.errors)):
        request_type, transport, name = key
        samples = Recorded.samples.get(key, [])
        errors = Recorded.errors.get(key, 0)
        hist, overflow, invalid = recorder.histogram(samples)
        metrics = {"sent": len(samples) + errors, "errors": errors,
                   "throughput_per_s": len(samples) / Recorded.elapsed if Recorded.elapsed
                   else 0.0, "duration_s": round(Recorded.elapsed, 3)}
        params = {"api": request_type, "how": name.rsplit("/", 1)[-1], "transport": transport,
                  "users": _option(environment, "num_users", None)}
        cell = results.aggregate("locust", params, [
            {"metrics": metrics,
             "histograms": {"publish": recorder.Recorded(hist, overflow, invalid=invalid)}}])
        cell.reason = f"Locust request {request_type} {name!r}, closed loop"
        cells.append(cell)
    results.dump(results.Run(results.environment(), cells), out)
    log.info("results written to %s", out)


@events.quitting.add_listener
def _stop_broker(environment, **kwargs):
    Broker.close()                      # registered last: runs after the results are written
