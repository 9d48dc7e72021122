"""The faults scenario's task: takes a little time and says when it started and ended.

``bench.faults.work(index, seconds)`` appends two fixed-size records to
``<dir>/<pid>.bin`` (``<dir>`` is ``$CELERY_BENCH_FAULTS_DIR`` in the worker's
environment; each worker the scenario starts gets its own folder, so the
harness knows which worker ran what): ``(index, start_ns, 0)`` when it starts
and ``(index, start_ns, end_ns)`` when it has slept ``seconds``. A task killed
mid-run leaves only its start record: it was interrupted, not run. Readings are
``time.perf_counter_ns()`` (CLOCK_MONOTONIC, one clock for every process on the
host). One ``os.write`` per record, one file per process (pool children included).
"""
import os
import struct
import time

from celery import shared_task

from .common import RecordFile

TASK = "bench.faults.work"
DIR_ENV = "CELERY_BENCH_FAULTS_DIR"
RECORD = struct.Struct("<qqq")  # index, start_ns, end_ns (0: started, not finished)

_now = time.perf_counter_ns
_pack = RECORD.pack
_records = RecordFile(DIR_ENV, TASK)


@shared_task(name=TASK, ignore_result=True)
def work(index, seconds=0.0):
    start = _now()
    fd = _records.fileno()
    os.write(fd, _pack(index, start, 0))
    if seconds:
        time.sleep(seconds)
    os.write(fd, _pack(index, start, _now()))
