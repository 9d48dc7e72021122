"""Tasks of the join scenario. Members are ``bench.sleep`` (common.py), which
returns its worker-side start/end readings; the chord body returns the members'
results with its own readings, so the harness still sees when the last member ended."""
import time

from celery import shared_task


@shared_task(name="bench.join.collect")
def collect(members):
    """Chord body: hand the members' results back unchanged, with its own timestamps."""
    start = time.perf_counter_ns()
    return {"members": members, "start_ns": start, "end_ns": time.perf_counter_ns()}


@shared_task(name="bench.join.echo")
def echo(value):
    """Return ``value``: lets tests compare what each waiting method hands back."""
    return value


@shared_task(name="bench.join.fail")
def fail(message="bench.join.fail"):
    """Raise, so tests can check that a waiting method propagates a failure."""
    raise ValueError(message)
