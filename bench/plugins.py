"""Scenarios and transports from outside this package.

``CELERY_BENCH_PLUGINS=mypkg.myscenario,mypkg.mytransport`` names modules to import
before anything runs (in the CLI, and in every worker process the harness starts,
which inherit the variable). A scenario module registers its class with
``@bench.scenarios.register``; a transport module declares ``TRANSPORT`` and
``broker()`` as ``bench/brokers/*.py`` do and is registered here.
"""
from __future__ import annotations

import importlib
import os

from . import brokers, config

ENV = "CELERY_BENCH_PLUGINS"


def load() -> list[str]:
    """Import the plugin modules named in the environment; returns their names."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:
            raise config.UsageError(f"{ENV}: cannot import {name!r} ({type(exc).__name__}: "
                                    f"{exc}); fix the module or its name") from None
        if hasattr(mod, "TRANSPORT"):
            try:
                brokers.register(name)
            except Exception as exc:
                raise config.UsageError(
                    f"{ENV}: {name!r} declares a TRANSPORT that is not a "
                    f"bench.brokers.Transport ({type(exc).__name__}: {exc}); declare it as "
                    f"bench/brokers/memory.py does") from None
    return names
