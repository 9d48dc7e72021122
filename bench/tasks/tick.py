"""The worker scenario's task: a no-op that says when it ran.

``bench.worker.tick(run, index)`` does nothing but append one fixed-size record
``(run, index, start_ns, end_ns)`` (``time.perf_counter_ns()``, CLOCK_MONOTONIC:
one clock for every process on the host) to ``<dir>/<pid>.bin``, ``<dir>``
being ``$CELERY_BENCH_TICK_DIR`` in the worker's environment. One ``os.write``
per task (~1 us beside Celery's ~100 us per task) instead of a result backend,
whose round trips would be measured instead of the worker: the harness reads
the files to count every task (lost, duplicates) and to time the run.
One file per process (pool children included), so no two writers share one.
"""
import os
import struct
import time

from celery import shared_task

from .common import RecordFile

TASK = "bench.worker.tick"
DIR_ENV = "CELERY_BENCH_TICK_DIR"
RECORD = struct.Struct("<qqqq")  # run, index, start_ns, end_ns

_now = time.perf_counter_ns
_pack = RECORD.pack
_records = RecordFile(DIR_ENV, TASK)


@shared_task(name=TASK, ignore_result=True)
def tick(run, index):
    start = _now()
    os.write(_records.fileno(), _pack(run, index, start, _now()))
