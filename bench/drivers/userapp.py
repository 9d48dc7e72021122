"""A user's own Celery app (``--app MODULE:APP``, ``--task NAME``): load it, check it,
name its broker. Every mistake is a one-line usage error."""
from __future__ import annotations

import importlib
import os
import sys
from functools import lru_cache

from .. import config


@lru_cache(maxsize=None)
def load_app(spec: str):
    """The Celery app named by ``MODULE:ATTR``."""
    from celery import Celery

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise config.UsageError(f"--app {spec!r}: expected MODULE:APP, e.g. proj.celery:app")
    if os.getcwd() not in sys.path:  # like `celery -A`: the project is where you run it
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        raise config.UsageError(
            f"--app {spec}: cannot import module {module!r} ({type(exc).__name__}: {exc}); "
            f"run from the project folder or set PYTHONPATH") from None
    app = getattr(mod, attr, None)
    if app is None:
        raise config.UsageError(f"--app {spec}: module {module!r} has no attribute {attr!r}")
    if not isinstance(app, Celery):
        raise config.UsageError(
            f"--app {spec}: {attr!r} is a {type(app).__name__}, not a Celery app")
    import bench.tasks  # noqa: F401  bench.noop, the default --task, binds to every app
    return app


def check_task(app, spec: str, name: str) -> None:
    try:
        app.loader.import_default_modules()
    except Exception:
        pass  # a project that needs more setup still has its directly defined tasks
    app.finalize(auto=True)
    if name not in app.tasks:
        own = sorted(t for t in app.tasks if not t.startswith("celery."))
        raise config.UsageError(
            f"--task {name}: app {spec} has no task named {name!r}; "
            f"its tasks: {', '.join(own[:8]) or 'none'}")


def broker_label(app) -> str:
    return config.mask_url(app.connection_for_write().as_uri())
