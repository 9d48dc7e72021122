"""The Locust users: publishers, a task round trip, a group join.

Each user runs one operation after another (closed loop), or at ``--arrival-rate``
(open loop, :mod:`.openloop`), and reports through ``events.request`` only, one
request per operation: a round trip's or join's stages travel in that request's
context (``parts``), so Locust's RPS and fail ratio count operations; the Book
(:mod:`.hdr`) records every request and every stage exactly, Locust its rounded
figures of the operation.

=================  ==============  ===========================================  ==============
class              request type    name                                         primary
=================  ==============  ===========================================  ==============
KombuPublisher     ``kombu``       ``publish <transport>/<producer>``           the publish
CeleryPublisher    ``celery``      ``publish <transport>/<method>``             the publish
TaskRoundTrip      ``total``       ``roundtrip <transport> <task>``             ``total``
                   stages: ``enqueue``, ``queue wait``, ``run``, ``result``
GroupJoin          ``total``       ``group <n> x <task> <join method>           ``total``
                   stage: ``lag``  <transport>``
=================  ==============  ===========================================  ==============

TaskRoundTrip: ``apply_async``, a real worker runs the task, ``get()`` hands back its
result. ``enqueue``: until ``apply_async`` returns; ``queue wait``: publish start to
task start; ``run``: task start to end; ``result``: task end to result in hand;
``total`` = queue wait + run + result (enqueue is the caller's share of the queue
wait). With the harness's workers (their Strategy carries the main process's readings
back in the result, :mod:`bench.worker_stamps`) the round trip also reports the stage
waterfall, ``stage publish|broker|worker|pool|run|store|fetch`` (:func:`_waterfall`; a task
run on another host's worker: ``stage result`` for store and fetch together), which adds up
to ``total``. The worker's readings come back in the result (``bench.roundtrip``); the
clock compared is CLOCK_MONOTONIC when the worker runs on this host (same boot id),
else the wall clock, offset between hosts included (the rows say ``clock
realtime``), or corrected by the master's offset estimates (``realtime corrected``). When the
run spans hosts (the offsets name more than one), queue wait is also split by where the task
ran: ``queue wait same-host`` (sender and worker on one host: one monotonic clock, no offset)
and ``queue wait cross-host`` (corrected wall clocks); the two are the same stage over the
same queue, so their difference shows the correction's error, plus sampling noise
(docs/distributed.md). Hosts that claim two boot ids on one kernel (the multi-host rig) also
give ``queue wait cross-host monotonic``: the cross-host tasks again, on the one monotonic clock
they really share. A task of yours without those readings reports enqueue and total.

GroupJoin: a group of ``--group-size`` tasks, waited on by ``--join-method``;
``total``: publish start to every result in hand; ``lag``: results in hand minus
the end of the last task (the time spent purely waiting).

A stage bounded by a polling interval (``result`` on a database backend, a join that
sleeps ``--interval``) says so in its rows' note (meta ``polled``), with what removes it.

A failed operation is one failure, on its primary request, whose message says which
part failed; the parts that completed before it are still reported.
"""
import locust  # noqa: F401  first: gevent patches the standard library before kombu and redis

import contextlib
import logging
import time
import uuid

from celery import group as celery_group
from locust import User, constant, task
from locust.exception import StopUser

from .. import backends, joins, waterfall, worker_stamps
from ..drivers import celery as celery_driver
from ..drivers import kombu as kombu_driver
from ..tasks.roundtrip import BOOT_ID, CLOCK_ID
from . import arguments, clocks, openloop, system

log = logging.getLogger("celery-bench.locust")
now_ns = time.perf_counter_ns
PAYLOAD = "x" * 112                 # the publish scenario's default body
PURGE_EVERY = 10_000                # nothing consumes the publishers' queues: purge them
PUBLISH_TIMEOUT_S = 30.0


class OperationFailed(Exception):
    """A round trip or join that did not complete; the message says which part."""


class CeleryBenchUser(User):
    abstract = True
    wait_time = constant(0)         # closed loop: the next operation as soon as one ends
    host = arguments.HOST_NOT_USED
    runs_tasks = False              # needs Celery workers and a result backend
    joins = False                   # waits with --join-method

    def on_start(self):
        self.lag_us = None
        self.schedule = None
        self.ready = False
        try:
            self.system = system.client(self.environment)
        except system.Unreachable as exc:
            # the first task stops the user (quietly, unlike on_start)
            system.Local.of(self.environment).say_once(str(exc))
            return
        self.transport = self.system.label
        self.setup()
        self.ready = True
        self.schedule = openloop.schedule(self.environment)

    def on_stop(self):
        openloop.retire(self.environment, self.schedule)
        if self.ready:
            self.ready = False
            self.teardown()

    def setup(self):
        pass

    def teardown(self):
        pass

    @task
    def operate(self):
        if not self.ready:
            raise StopUser()
        if self.schedule is not None:
            intended = self.schedule.next()
            self.lag_us = (now_ns() - intended) / 1000.0
        self.operation()

    def operation(self):
        raise NotImplementedError

    def report(self, request_type: str, name: str, ns: int, exception=None, *,
               primary=True, from_start=True, length=0, parts=(), **meta):
        """One Locust request. ``parts``: the operation's stages, ``(request_type, ns,
        context)`` each, carried in its context: the Book records them as rows of their
        own, Locust's statistics (RPS, fail ratio) count the operation once."""
        context = {"user_class": type(self).__name__, "transport": self.transport,
                   "primary": primary, "from_start": from_start, **meta}
        if self.lag_us is not None:
            context["schedule_lag_us"] = self.lag_us
        if parts:
            # a stage shares the operation's context but its own note (``polled``)
            shared = {k: v for k, v in context.items() if k != "polled"}
            context["parts"] = [
                {"request_type": t, "response_time": n / 1e6,
                 "context": {**shared, "primary": False, "from_start": True, **ctx}}
                for t, n, ctx in parts]
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=ns / 1e6,
            response_length=length, exception=exception, context=context)


# --------------------------------------------------------------------------- publishers
class _Publisher(CeleryBenchUser):
    abstract = True
    request_type = ""

    def make_driver(self, target, queue_name):
        raise NotImplementedError

    def setup(self):
        self.driver = self.make_driver(self.system.target,
                                       f"celery-bench-locust-{uuid.uuid4().hex[:12]}")
        self.driver.open()
        self.sending = contextlib.ExitStack()
        self.send = self.sending.enter_context(self.driver.sending())
        self.i = 0

    def teardown(self):
        try:
            self.sending.close()
        finally:
            self.driver.close()     # deletes the user's queue

    def operation(self):
        t = now_ns()
        exc = None
        try:
            self.send(self.i, t)
        except Exception as e:      # a Locust failure; the test goes on
            exc = e
        self.report(self.request_type, self.name, now_ns() - t, exc, length=len(PAYLOAD))
        self.i += 1
        if self.i % PURGE_EVERY == 0:
            with contextlib.suppress(Exception), self.driver.target.connect() as conn:
                self.driver.queue(conn.default_channel).purge()


class KombuPublisher(_Publisher):
    """``Producer.publish`` with the ``--producer`` strategy (default: held), to a queue of
    its own that nothing consumes (purged every 10,000 messages, deleted on stop)."""
    request_type = "kombu"

    def make_driver(self, target, queue_name):
        strategy = arguments.get(self.environment, "producer", "held")
        self.name = f"publish {self.transport}/{strategy}"
        return kombu_driver.Publisher(target, queue_name, strategy, "json", PAYLOAD,
                                      PUBLISH_TIMEOUT_S)


class CeleryPublisher(_Publisher):
    """``bench.noop`` sent by ``--method`` (default: apply_async, Celery's producer pool) to
    a queue of its own: no worker runs it (TaskRoundTrip is the user whose tasks run)."""
    request_type = "celery"

    def make_driver(self, target, queue_name):
        method = arguments.get(self.environment, "method", "apply_async")
        self.name = f"publish {self.transport}/{method}"
        app = self.system.app if self.system.user_app else None
        return celery_driver.Publisher(target, queue_name, method, "default", "json",
                                       PAYLOAD, PUBLISH_TIMEOUT_S, app=app)


# --------------------------------------------------------------------------- real tasks
def _stamps(value) -> dict | None:
    """The worker's readings in a task's result (bench.roundtrip's, or any dict with
    start_ns and end_ns), or None."""
    if isinstance(value, dict) and isinstance(value.get("start_ns"), int) \
            and isinstance(value.get("end_ns"), int):
        return value
    return None


def _on_our_clock(stamps: dict, t0: int, wall0: int,
                  offsets: dict | None = None) -> tuple[str, int, int]:
    """(clock, task start, task end) in this process's perf_counter_ns terms.

    Same boot: CLOCK_MONOTONIC readings compare as they are. Another host: the worker's
    wall-clock readings, moved onto our monotonic axis through the wall clock we read at
    the publish start; the offset between the two hosts' clocks stays in them, unless the
    master measured both hosts' ``offsets`` (bench.locust.clocks): then ``realtime corrected``."""
    if stamps.get("boot_id") == BOOT_ID or "start_wall_ns" not in stamps:
        return "monotonic", stamps["start_ns"], stamps["end_ns"]
    theirs = clocks.to_master_ns(stamps["start_wall_ns"], stamps.get("boot_id"), offsets or {})
    ours = clocks.to_master_ns(wall0, BOOT_ID, offsets or {})
    clock = "realtime"
    if theirs is not None and ours is not None:
        clock, start = "realtime corrected", t0 + (theirs - ours)
    else:
        start = t0 + (stamps["start_wall_ns"] - wall0)
    return clock, start, start + (stamps["end_ns"] - stamps["start_ns"])


MIXED = "per task: monotonic on one host, realtime corrected across hosts"
ONE_CLOCK = "queue wait cross-host monotonic"


def _placement(stamps: dict, offsets: dict) -> str | None:
    """``same-host`` or ``cross-host`` for a task's worker when the run spans hosts (the
    master's offset table names more than one), else None."""
    if len(offsets) < 2:
        return None
    return "same-host" if stamps.get("boot_id") == BOOT_ID else "cross-host"


STORED_WAIT_S = 0.5     # for the pool child's stored reading (it writes after the backend)


def _waterfall(stamps: dict, ours: tuple, late: dict, polled: dict,
               stored: int | None = None) -> list:
    """The waterfall's stages of one round trip (``stage <name>`` parts, as
    :mod:`bench.waterfall` names them), when the worker's Strategy put its main process's
    readings in the result (``taken_ns``, ``handed_ns``; same clock as ``start_ns``):
    publish (apply_async), broker, worker, pool (handed -> the body's first reading), run,
    then ``store`` (body end -> ``task_success`` after the backend write, the pool child's
    ``stored`` reading on the worker's clock) and ``fetch`` (-> the result in hand), as in
    the worker scenario. Without ``stored`` (a worker on another host, or none of this
    process's: its reading is written where only that host reads it) one ``result`` stage
    (body end -> in hand) stands for both. ``ours``: (t0, t1, start, end, t2) on our clock.
    A worker that took the message before apply_async returned ends the publish stage
    there, and a result in hand before the child's write call returned ends the store
    stage there (no stage runs back), as in the worker scenario. They add up to ``total``."""
    if not isinstance(stamps.get("taken_ns"), int) or not isinstance(stamps.get("handed_ns"), int):
        return []
    t0, t1, start, end, t2 = ours
    shift = start - stamps["start_ns"]          # the worker host's clock onto ours
    got = waterfall.one_round_trip(t0, t1, stamps["taken_ns"] + shift,
                                   stamps["handed_ns"] + shift, start, end, t2,
                                   None if stored is None else stored + shift)
    ctx = [{"clock": late["clock"]}, *([late] * 4), *([{**late, **polled}] * (len(got) - 5))]
    return [(f"stage {name}", ns, c) for (name, ns), c in zip(got, ctx)]


class _TaskUser(CeleryBenchUser):
    abstract = True
    runs_tasks = True

    def setup(self):
        env = self.environment
        self.app = self.system.app
        if self.app is None:
            raise RuntimeError("no result backend in the wiring: the owner started no "
                               "Celery workers for this test")
        self.task_name = arguments.get(env, "task", arguments.DEFAULT_TASK)
        self.args, self.kwargs = arguments.task_args(arguments.get(env, "task_args", "[]"))
        self.timeout = float(arguments.get(env, "timeout", 30.0))
        self.interval = float(arguments.get(env, "interval", 0.5))
        self.task_obj = self.app.tasks[self.task_name]
        self.warned = False

    def _polled(self, stage: str, wait: str) -> dict:
        """``{"polled": note}`` when ``stage`` waits a polling interval on this backend (the
        Note column and the results file say so, with what removes it), else {}."""
        backend = self.system.backend or ""
        if self.interval <= 0 or not backends.polls(backend, wait):
            return {}
        fix = ("--backend redis" if backends.polls(backend, "join")
               else "--join-method join or redis_join")
        if self.system.user_app:
            fix = "a result backend that does not poll" if backends.polls(backend, "join") \
                else "--join-method join"
        return {"polled": f"{stage}: polled every {self.interval:g} s; --interval or {fix}"}

    def _offsets(self) -> dict:
        return getattr(self.environment, clocks.ENV_ATTR, None) or {}

    def _no_stamps(self, parts: str):
        if not self.warned:
            self.warned = True
            log.warning("task %s returns no worker readings (start_ns, end_ns): %s reports "
                        "no %s; return bench.tasks.roundtrip.stamps(start) from it, or use "
                        "--task bench.roundtrip", self.task_name, type(self).__name__, parts)


class TaskRoundTrip(_TaskUser):
    """``apply_async`` of ``--task`` (default bench.roundtrip), run by a real worker, result
    in hand: enqueue, queue wait, run, result and total as separate request types."""

    def setup(self):
        super().setup()
        self.name = f"roundtrip {self.transport} {self.task_name}"
        self.meta = {"task": self.task_name, "backend": self.system.backend}
        self.polled = self._polled("result", "result")

    @staticmethod
    def _stored(task_id, stamps: dict) -> int | None:
        """The pool child's stored reading of ``task_id`` (worker's clock), when it ran on
        one of this process's own workers (its ``stored_dir`` is one this process reads,
        on this host), else None. Read after the result is in hand: the wait is outside
        every timed stage."""
        if stamps.get("boot_id") != BOOT_ID or not stamps.get("stored_dir"):
            return None
        return worker_stamps.LEDGER.take(task_id, stamps["stored_dir"], STORED_WAIT_S)

    def operation(self):
        name, meta = self.name, self.meta
        wall0 = time.time_ns()
        t0 = now_ns()
        try:
            r = self.task_obj.apply_async(self.args, self.kwargs)
        except Exception as exc:
            self.report("total", name, now_ns() - t0,
                        OperationFailed(f"enqueue: {exc!r}"), **meta)
            return
        t1 = now_ns()
        parts = [("enqueue", t1 - t0, {})]
        try:
            value = r.get(timeout=self.timeout, interval=self.interval)
        except Exception as exc:
            what = (f"no result within {self.timeout:g} s (is a worker consuming?)"
                    if type(exc).__name__ == "TimeoutError" else repr(exc))
            self.report("total", name, now_ns() - t0, OperationFailed(f"result: {what}"),
                        parts=parts, **meta, **self.polled)
            return
        t2 = now_ns()
        stamps = _stamps(value)
        if stamps is not None:
            offsets = self._offsets()
            clock, start, end = _on_our_clock(stamps, t0, wall0, offsets)
            where = _placement(stamps, offsets)
            across = {"from_start": False, "clock": MIXED if where else clock}
            parts += [("queue wait", start - t0, {"clock": across["clock"]}),
                      ("run", stamps["end_ns"] - stamps["start_ns"],
                       {"from_start": False, "clock": "monotonic"}),    # the worker's own
                      ("result", t2 - end, {**across, **self.polled})]
            if where:
                parts.append((f"queue wait {where}", start - t0, {"clock": clock}))
            if where == "cross-host" and CLOCK_ID and stamps.get("clock_id") == CLOCK_ID:
                # "hosts" on one kernel (the rig): the same task on the one monotonic clock
                parts.append((ONE_CLOCK, stamps["start_ns"] - t0, {"clock": "monotonic"}))
            parts += _waterfall(stamps, (t0, t1, start, end, t2),
                                {"from_start": False, "clock": across["clock"]}, self.polled,
                                self._stored(r.id, stamps))
        else:
            self._no_stamps("queue wait, run or result")
        self.report("total", name, t2 - t0, parts=parts, **meta, **self.polled)


class GroupJoin(_TaskUser):
    """A group of ``--group-size`` tasks waited on by ``--join-method``: total (publish
    start to results in hand) and lag (results in hand minus the end of the last task)."""
    joins = True

    def setup(self):
        super().setup()
        env = self.environment
        self.size = int(arguments.get(env, "group_size", 10))
        self.method = arguments.get(env, "join_method", "join")
        self.name = f"group {self.size} x {self.task_name} {self.method} {self.transport}"
        self.meta = {"task": self.task_name, "join_method": self.method,
                     "group_size": self.size, "backend": self.system.backend}
        self.polled = self._polled("join", self.method)
        self.wait = self._waiter(self.method)

    def _waiter(self, method):
        t, i = self.timeout, self.interval
        return {
            "join": lambda r: r.join(timeout=t, interval=i),
            "join_native": lambda r: r.join_native(timeout=t, interval=i),
            "get": lambda r: r.get(timeout=t, interval=i),
            "redis_join": lambda r: joins.redis_join(r, timeout=t),
            "db_join": lambda r: joins.db_join(r, timeout=t, interval=i),
        }[method]

    def operation(self):
        name, meta = self.name, self.meta
        sigs = [self.app.signature(self.task_name, args=self.args, kwargs=self.kwargs)
                for _ in range(self.size)]
        wall0 = time.time_ns()
        t0 = now_ns()
        part = "enqueue"
        try:
            res = celery_group(sigs, app=self.app).apply_async()
            part = "join"
            values = self.wait(res)
        except Exception as exc:
            what = (f"not all results within {self.timeout:g} s"
                    if type(exc).__name__ == "TimeoutError" else repr(exc))
            self.report("total", name, now_ns() - t0, OperationFailed(f"{part}: {what}"),
                        **meta)
            return
        t2 = now_ns()
        stamps = [_stamps(v) for v in values]
        parts = []
        if values and all(s is not None for s in stamps):
            ends = [_on_our_clock(s, t0, wall0, self._offsets()) for s in stamps]
            clock = next((c for c, _, _ in ends if c != "monotonic"), "monotonic")
            parts.append(("lag", t2 - max(e for _, _, e in ends),
                          {"from_start": False, "clock": clock, **self.polled}))
        else:
            self._no_stamps("lag")
        self.report("total", name, t2 - t0, parts=parts, **meta, **self.polled)
