"""Tasks of the prefetch scenario: one long task, many short ones.

Each returns worker-side ``time.perf_counter_ns()`` readings (CLOCK_MONOTONIC,
one clock for every process on the host), so the harness computes the queue
wait (publish -> task start) exactly, and which worker ran it.
"""
import os
import time

from celery import shared_task


@shared_task(name="bench.prefetch.work", bind=True)
def work(self, seconds=0.0, sent_ns=None, index=None):
    start = time.perf_counter_ns()
    if seconds:
        time.sleep(seconds)
    return {"index": index, "sent_ns": sent_ns, "start_ns": start,
            "end_ns": time.perf_counter_ns(), "hostname": self.request.hostname,
            "pid": os.getpid()}
