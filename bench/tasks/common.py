"""Tasks shared by the publish and worker scenarios, and the per-process record file
the counting tasks (bench.worker.tick, bench.faults.work) append to."""
import os
import time

from celery import shared_task


@shared_task(name="bench.noop", ignore_result=True)
def noop(*args, **kwargs):
    """Does nothing: the publish ladder measures the path, not the task."""
    return None


@shared_task(name="bench.sleep")
def sleep(seconds=0.0, sent_ns=None):
    """Sleep, and return the worker-side timestamps (CLOCK_MONOTONIC, ns) with the result."""
    start = time.perf_counter_ns()
    if seconds:
        time.sleep(seconds)
    return {"sent_ns": sent_ns, "start_ns": start, "end_ns": time.perf_counter_ns()}


class RecordFile:
    """An append-only file per worker process, ``<$ENV folder>/<pid>.bin``, opened by the
    first task a process runs (a pool child opens its own after the fork): every task
    appends one fixed-size record, so the harness counts each run without a result backend."""

    def __init__(self, env: str, task: str):
        self.env, self.task = env, task
        self.pid = self.fd = None

    def fileno(self) -> int:
        pid = os.getpid()
        if self.pid != pid:
            folder = os.environ.get(self.env)
            if not folder:
                raise RuntimeError(f"{self.task} needs ${self.env} in the worker's environment")
            self.fd = os.open(os.path.join(folder, f"{pid}.bin"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.pid = pid
        return self.fd
