"""Tasks shared by the publish and worker scenarios."""
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
