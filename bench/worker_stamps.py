"""The worker-side stamps of the stage waterfall (:mod:`bench.waterfall`), taken with
Celery's own hooks and appended to ``<$CELERY_BENCH_STAMP_DIR>/<pid>.bin``.

Loaded into a worker through its settings (see :func:`worker_conf`): ``imports`` makes
the worker import this module before its pool forks, so every pool child has the
signal handlers; ``task_annotations`` sets the task's ``Strategy`` (Celery's hook for
how the worker's main process handles a task message) to :func:`strategy`.

Worker main process, one record per task (``MAIN``): *taken* (the strategy's message
handler is called: Kombu has taken the message off the broker and handed it to
Celery's consumer) and *handed* (Celery passes the request to the pool:
``consumer.on_task_request``; ``task_received`` fires between the two). Pool child
(``CHILD``): *started* (``task_prerun``), *stored* (``task_success``: fires after
Celery's ``backend.mark_as_done``; with ``ignore_result`` nothing is stored, so it is
the trace's own bookkeeping) and *postrun* (``task_postrun``, when the record is
written). Every reading is ``time.perf_counter_ns()``: CLOCK_MONOTONIC, one clock
for every process of the host. With ``$CELERY_BENCH_STAMP_DIR`` unset nothing is
connected and the strategy is Celery's default.

A caller that waits on the result itself (Locust's TaskRoundTrip) cannot get *stored* in
the result (the write is what delivers it): with ``$CELERY_BENCH_STORED_DIR`` set the pool
child appends ``(STORED, task id, stored)`` records there for ``bench.roundtrip``, and the
caller's :class:`StoredLedger` reads them on the same host (same clock) by task id.
"""
from __future__ import annotations

import os
import struct
import time
import uuid

from celery.signals import task_postrun, task_prerun, task_success

STAMP_ENV = "CELERY_BENCH_STAMP_DIR"
RECORD = struct.Struct("<qqqqqq")   # kind, run, index, a, b, c
COLUMNS = 6
MAIN, CHILD = 1, 2                  # kinds: (taken, handed, 0), (started, stored, postrun)
STORED = 3                          # kind: run, index = the task id's two halves; a = stored
STORED_ENV = "CELERY_BENCH_STORED_DIR"
KEEP_UNTAKEN = 200_000              # stored readings kept for a caller, oldest dropped first
REQUEST_KEY = "celery_bench_stamps"  # RequestStamps: [taken, handed] (bench.tasks.roundtrip)

_now = time.perf_counter_ns


def worker_conf(task: str) -> dict:
    """Celery settings that load these hooks for ``task`` (its args start (run, index))."""
    return {"imports": [__name__],
            "task_annotations": {task: {"Strategy": f"{__name__}:strategy"}}}


class StampFile:
    """This process's record file, opened on first use (a pool child opens its own)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.pid = self.fd = None

    def write(self, kind: int, run: int, index: int, a: int, b: int, c: int) -> None:
        pid = os.getpid()
        if self.pid != pid:
            self.fd = os.open(os.path.join(self.folder, f"{pid}.bin"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.pid = pid
        os.write(self.fd, RECORD.pack(kind, run, index, a, b, c))


class ChildStamps:
    """The pool child's readings of the task it is running."""

    def __init__(self, out: StampFile, task: str):
        self.out, self.task = out, task
        self.started = self.stored = 0

    def prerun(self, sender=None, task=None, **_):
        if getattr(task, "name", None) == self.task:
            self.started, self.stored = _now(), 0

    def success(self, sender=None, **_):
        if getattr(sender, "name", None) == self.task:
            self.stored = _now()

    def postrun(self, sender=None, task=None, args=None, **_):
        if getattr(task, "name", None) == self.task and args and len(args) >= 2:
            end = _now()
            self.out.write(CHILD, int(args[0]), int(args[1]), self.started,
                           self.stored or end, end)


class MainStamps:
    """The worker main process's readings: set by the strategy, written when handed."""

    def __init__(self, out: StampFile):
        self.out = out
        self.taken = 0

    def wrap_handle(self, handle):
        def handed(req):
            at = _now()
            args = req.args
            if args and len(args) >= 2:
                self.out.write(MAIN, int(args[0]), int(args[1]), self.taken, at, 0)
            return handle(req)
        return handed


class RequestStamps:
    """The worker main process's readings carried in the request the pool child gets
    (``task.request.celery_bench_stamps`` = [taken, handed]), for a task that returns
    them to its caller (``bench.roundtrip``, Locust's TaskRoundTrip): no files."""

    def __init__(self):
        self.taken = 0

    def wrap_handle(self, handle):
        def handed(req):
            req.request_dict[REQUEST_KEY] = [self.taken, _now()]
            return handle(req)
        return handed


def request_conf(task: str) -> dict:
    """Celery settings that put the main process's readings into ``task``'s requests."""
    return {"imports": [__name__],
            "task_annotations": {task: {"Strategy": f"{__name__}:strategy_in_request"}}}


def strategy(task, app, consumer, **kwargs):
    """Celery's default strategy for ``task``, stamping when a message arrives and when
    its request goes to the pool. ``consumer.on_task_request`` is swapped only while the
    default strategy binds it, so other tasks' strategies are untouched."""
    from celery.worker.strategy import default

    folder = os.environ.get(STAMP_ENV)
    if not folder:
        return default(task, app, consumer, **kwargs)
    return _stamping(MainStamps(StampFile(folder)), task, app, consumer, **kwargs)


def strategy_in_request(task, app, consumer, **kwargs):
    """:func:`strategy` with the readings carried in the request (:class:`RequestStamps`)."""
    return _stamping(RequestStamps(), task, app, consumer, **kwargs)


def _stamping(stamps, task, app, consumer, **kwargs):
    from celery.worker.strategy import default

    handle = consumer.on_task_request
    consumer.on_task_request = stamps.wrap_handle(handle)
    try:
        inner = default(task, app, consumer, **kwargs)
    finally:
        consumer.on_task_request = handle

    def task_message_handler(message, body, ack, reject, callbacks, **kw):
        stamps.taken = _now()
        return inner(message, body, ack, reject, callbacks, **kw)
    return task_message_handler


def task_key(task_id) -> tuple[int, int] | None:
    """A uuid task id as two signed 64-bit halves (a record's run and index), else None."""
    try:
        value = uuid.UUID(str(task_id)).int
    except ValueError:
        return None
    hi, lo = value >> 64, value & (1 << 64) - 1
    return tuple(v - (1 << 64) if v >= 1 << 63 else v for v in (hi, lo))


class StoredStamps:
    """The pool child's *stored* reading (``task_success``, after the backend write) of
    each ``task``, by task id, for a caller that waits on the result itself."""

    def __init__(self, out: StampFile, task: str):
        self.out, self.task = out, task

    def success(self, sender=None, **_):
        if getattr(sender, "name", None) == self.task:
            at = _now()
            key = task_key(getattr(getattr(sender, "request", None), "id", None))
            if key is not None:
                self.out.write(STORED, key[0], key[1], at, 0, 0)


class StoredLedger:
    """The stored readings of the folders this process's own workers write (one host: the
    same CLOCK_MONOTONIC), read as they are appended; :meth:`take` one by task id."""

    def __init__(self):
        self.readers: dict = {}              # folder -> record_files.RecordReader
        self.found: dict[tuple, int] = {}

    def watch(self, folder: str) -> None:
        # imported here: numpy is the Locust process's, not every worker child's
        from .record_files import RecordReader

        self.readers.setdefault(folder, RecordReader(folder, COLUMNS, run_col=0))

    def forget(self, folder: str) -> None:
        self.readers.pop(folder, None)

    def _read(self) -> None:
        for reader in self.readers.values():
            try:
                reader.poll()
            except OSError:                  # the folder went with its workers
                continue
            for _, hi, lo, stored, _, _ in reader.records(STORED).tolist():
                self.found[(hi, lo)] = stored
            reader.forget(STORED)
        if len(self.found) > KEEP_UNTAKEN:     # readings no caller took (a failed get)
            for key in list(self.found)[: len(self.found) // 2]:
                del self.found[key]

    def take(self, task_id, folder, timeout_s: float, sleep=time.sleep) -> int | None:
        """Task ``task_id``'s stored reading, written into ``folder`` (the result's
        ``stored_dir``), waiting up to ``timeout_s`` for the child to append it (it writes
        after the backend write, which may reach the caller first); None at once when
        ``folder`` is not one of ours (another process's or host's worker ran it)."""
        key = task_key(task_id)
        if key is None or folder not in self.readers:
            return None
        deadline = time.monotonic() + timeout_s
        while True:
            self._read()
            if key in self.found:
                return self.found.pop(key)
            if time.monotonic() >= deadline:
                return None
            sleep(0.0005)


LEDGER = StoredLedger()     # the Locust process's: its own workers' folders


class _Hooks:
    """The child's signal handlers, connected once at import when stamping is asked for
    (weak=False: the handlers live as long as the process)."""

    def __init__(self):
        self.child = None

    def connect(self, folder: str, task: str) -> None:
        self.child = ChildStamps(StampFile(folder), task)
        task_prerun.connect(self.child.prerun, weak=False)
        task_success.connect(self.child.success, weak=False)
        task_postrun.connect(self.child.postrun, weak=False)


HOOKS = _Hooks()
if os.environ.get(STORED_ENV):
    task_success.connect(StoredStamps(StampFile(os.environ[STORED_ENV]),
                                      "bench.roundtrip").success, weak=False)
if os.environ.get(STAMP_ENV):
    HOOKS.connect(os.environ[STAMP_ENV], os.environ.get(STAMP_ENV + "_TASK",
                                                        "bench.worker.tick"))
