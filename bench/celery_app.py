"""The bench's Celery app: built per cell in the measuring process, and from
``CELERY_BENCH_APP_CONF`` (JSON settings) in worker processes started as
``celery -A bench.celery_app worker``.

Importing it imports :mod:`transports`, so ``unix://`` and ``fifo://`` broker
URLs work in the publisher and in the worker alike.
"""
from __future__ import annotations

import json
import os

from celery import Celery
from celery.signals import worker_ready

import transports  # noqa: F401  registers the unix and fifo kombu aliases
import bench.tasks  # noqa: F401  shared tasks bind to every app built here
from bench import children, plugins

CONF_ENV = "CELERY_BENCH_APP_CONF"
# A conf: variant's Celery settings (bench.variants), JSON; laid over every app built in
# its processes, the measuring one and its workers alike (workers inherit the environment).
VARIANT_CONF_ENV = "CELERY_BENCH_VARIANT_CONF"
# bench.celery_workers sets this in a worker's environment; the worker writes the file when ready.
READY_FILE_ENV = "CELERY_BENCH_READY_FILE"

# Safe, measurement-friendly defaults; a cell overrides what it studies.
DEFAULTS = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "enable_utc": True,
    "broker_connection_retry_on_startup": True,
    "broker_connection_timeout": 4,
    "worker_hijack_root_logger": False,
    "worker_redirect_stdouts": False,
    "task_ignore_result": False,
    # A benchmark leaves no day of results behind in a shared backend (Celery's default).
    "result_expires": 3600,
}


def make_app(broker_url: str, backend_url: str | None = None,
             transport_options: dict | None = None, main: str = "celery_bench",
             **conf) -> Celery:
    """A fresh app for one cell. ``conf`` are Celery settings (lower-case names)."""
    app = Celery(main, broker=broker_url, backend=backend_url, set_as_current=False,
                 include=["bench.tasks"])
    settings = dict(DEFAULTS)
    if transport_options:
        settings["broker_transport_options"] = dict(transport_options)
    settings.update(conf)
    settings.update(json.loads(os.environ.get(VARIANT_CONF_ENV) or "{}"))
    app.conf.update(settings)
    return app


def conf_env(broker_url: str, backend_url: str | None = None,
             transport_options: dict | None = None, **conf) -> dict:
    """Environment variables that make a worker build the same app as ``make_app``."""
    payload = {"broker_url": broker_url, "backend_url": backend_url,
               "transport_options": transport_options or {}, "conf": conf}
    return {CONF_ENV: json.dumps(payload)}


def _app_from_env() -> Celery:
    raw = os.environ.get(CONF_ENV)
    if not raw:
        # `celery -A bench.celery_app inspect ...` without a cell: memory broker.
        return make_app("memory://")
    payload = json.loads(raw)
    return make_app(payload["broker_url"], payload.get("backend_url"),
                    payload.get("transport_options"), **payload.get("conf", {}))


@worker_ready.connect
def _write_ready_file(sender=None, **kwargs):
    """Tell bench.celery_workers this worker consumes now (works on every transport, fanout or not)."""
    path = os.environ.get(READY_FILE_ENV)
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"pid": os.getpid(), "hostname": getattr(sender, "hostname", None)}, fh)
    os.replace(tmp, path)  # atomic: the harness never reads half a file


plugins.load()  # a plugin transport must be known in a worker process too
# A worker started to die with its parent (a Locust worker's --workers-per-host): the kernel's
# SIGTERM starts a warm stop when the parent dies; this ends the group if that stop hangs.
children.watch_parent()
app = _app_from_env()
app.set_current()
