"""Broker environments: one module per transport, so adding one touches no scenario.

Each module defines::

    NAME = "redis"                 # the value of the ``transport`` cell param
    SERVICE = "redis" | None       # a bench.config service it needs, None = embedded
    CROSS_PROCESS = True           # can another process (consumer, worker) reach it
    SUPPORTS_BATCH = False         # does kombu ``Producer.batch`` batch for real
    HOLDS_BACKLOG = True           # can messages wait in a queue before its consumer attaches
                                   # (optional: missing means True; see HOLDS_BACKLOG_DEFAULT)
    MAX_BACKLOG = None             # the most messages worth queueing (optional: None = no
                                   # limit), where each message costs more as the backlog grows
    CAPABILITIES = {...}           # what the transport does (see CAPABILITY_NAMES)
    @contextmanager
    def broker(workdir: Path) -> Iterator[BrokerEnv]

``broker()`` starts whatever the transport needs (a temp folder, our unix broker
process) and tears it down on exit, including on KeyboardInterrupt.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from .. import config

# Order is the order of the tables: embedded first, then servers, then ours.
MODULES = ("memory", "filesystem", "redis", "amqp", "unix", "fifo")

# Capabilities a transport may claim; the contract suite skips what it lacks.
CAPABILITY_NAMES = {
    "ack",            # unacked messages come back (reject/requeue, redelivery)
    "requeue",        # Message.requeue()/reject(requeue=True) puts it back
    "size",           # queue_declare(passive=True) reports the message count
    "purge",
    "multi_consumer", # several consumer processes on one queue
    "multi_producer", # several producer processes on one queue
    "fanout",         # fanout exchanges (Celery remote control)
    "cross_process",
}


# For a broker module that does not say HOLDS_BACKLOG.
HOLDS_BACKLOG_DEFAULT = True


class TransportUnavailable(config.UsageError, ImportError):
    """A transport module that does not import: a usage error on the CLI, an ImportError
    for scenarios that skip such cells."""


@dataclass
class BrokerEnv:
    url: str
    transport_options: dict = field(default_factory=dict)
    cross_process: bool = True
    description: str = ""

    def connection(self, **kwargs):
        from kombu import Connection

        return Connection(self.url, transport_options=dict(self.transport_options), **kwargs)


def module(name: str) -> ModuleType:
    if name not in MODULES:
        raise config.UsageError(
            f"--transport {name!r} is not a transport; choose from {', '.join(MODULES)}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        raise TransportUnavailable(f"transport {name!r} cannot be loaded here: {exc}") from None


def names() -> tuple[str, ...]:
    return MODULES


def reachability(name: str) -> config.Reachability:
    """Whether the transport can run here now (its service is up, or it is embedded)."""
    mod = module(name)
    if mod.SERVICE is None:
        return config.Reachability(True, "embedded")
    return config.probe(mod.SERVICE)


@contextmanager
def broker(name: str, workdir: Path):
    """Start transport ``name``'s broker environment under ``workdir``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with module(name).broker(workdir) as env:
        yield env
