"""celery-bench on top of Locust: one module per job.

- :mod:`.options`  the command-line / web-UI options, and what makes a choice bad
- :mod:`.system`   the broker, result backend and Celery workers a run talks to
- :mod:`.users`    the User classes (publishers, TaskRoundTrip, GroupJoin)
- :mod:`.openloop` constant arrival rate: per-user schedules, shortfall accounting
- :mod:`.hdr`      every request into an HdrHistogram; worker -> master merging
- :mod:`.export`   the results file, the percentile spectrum
- :mod:`.checks`   ``--check-p99-us`` / ``--check-fail-ratio``: the CI exit code
- :mod:`.webui`    the celery-bench tab and page of Locust's web UI
- :mod:`.plugin`   the Locust event listeners that tie them together

``bench/locustfile.py`` is the file Locust loads. :mod:`.hdr`, :mod:`.export` and
:mod:`.checks` never import Locust (it monkey-patches the process on import), so
they can be used and tested anywhere.
"""
