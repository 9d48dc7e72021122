"""Locust load tests of a real Celery system, with exact latencies (the file Locust loads).

    make locust                                  # web UI on http://127.0.0.1:8089
    locust -f bench/locustfile.py --headless -u 4 -r 4 -t 30s TaskRoundTrip \\
           --transport unix --workers 1 --results-out r.json
    locust -f bench/locustfile.py --headless -u 8 -r 8 -t 1m --arrival-rate 200 \\
           TaskRoundTrip --check-p99-us 50000 --check-fail-ratio 0.01    # a CI gate
    locust -f bench/locustfile.py --master ...  /  --worker --master-host HOST   # distributed
    locust -f bench/locustfile.py --app proj.celery:app --task proj.tasks.add \\
           --task-args '[2, 3]' TaskRoundTrip                      # your app, your workers

Users (bench.locust.users): KombuPublisher, CeleryPublisher (publish only), TaskRoundTrip
(apply_async -> a worker runs it -> result in hand: enqueue, queue wait, run, result,
total) and GroupJoin (a group waited on by --join-method: total and lag). The harness
starts the broker and ``--workers`` Celery workers (the master does, in distributed
mode) and stops them on quit. Every request also goes into an HdrHistogram (us, 3
significant digits): the "celery-bench (us)" tab and /celery-bench/ show those exact
percentiles; Locust's own columns are rounded to whole milliseconds. Options: README's
Locust section and bench/locust/arguments.py (Locust's --help lists only its own), or
"Custom parameters" in the UI.
"""
import locust  # noqa: F401  first: gevent patches the standard library before kombu and redis

from bench.locust import plugin  # noqa: F401  options, the Celery system, recording, web UI
from bench.locust.users import CeleryPublisher, GroupJoin, KombuPublisher, TaskRoundTrip

__all__ = ["KombuPublisher", "CeleryPublisher", "TaskRoundTrip", "GroupJoin"]
