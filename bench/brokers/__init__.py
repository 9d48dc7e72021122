"""Broker environments: one module per transport, so adding one touches no scenario.

Each module declares what the transport is and can do, once, and how to start it::

    TRANSPORT = Transport("redis", service="redis", supports_batch=True,
                          capabilities={"ack", "requeue", ...})

    @contextmanager
    def broker(workdir: Path) -> Iterator[BrokerEnv]

``broker()`` starts whatever the transport needs (a temp folder, our unix broker
process) and tears it down on exit, including on KeyboardInterrupt. Scenarios and
drivers read a transport's facts through :func:`info` and choose transports by
those facts (:func:`embedded`, :func:`servers`, :func:`reference`), never by name.

A transport outside this package joins by :func:`register` (``bench.plugins`` loads
the modules named in ``CELERY_BENCH_PLUGINS``): ``register("mypkg.mytransport")``.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

from .. import config

# Capabilities a transport may claim; the contract suite skips what it lacks.
CAPABILITY_NAMES = frozenset({
    "ack",               # unacked messages come back (reject/requeue, redelivery)
    "requeue",           # Message.requeue()/reject(requeue=True) puts it back
    "size",              # queue_declare(passive=True) reports the message count
    "purge",
    "multi_consumer",    # several consumer processes on one queue
    "multi_producer",    # several producer processes on one queue
    "fanout",            # fanout exchanges (Celery remote control)
    "disable_prefetch",  # Celery honours worker_disable_prefetch on it (5.7: redis only)
    "confirm",           # publisher confirms with transport option confirm_publish=True
})


@dataclass(frozen=True)
class Transport:
    """What a transport is and can do: every fact about it, in one place."""
    name: str                           # the value of the ``transport`` cell param
    service: str | None = None          # a bench.config service it needs; None = embedded
    cross_process: bool = True          # can another process (consumer, worker) reach it
    supports_batch: bool = False        # does kombu ``Producer.batch`` batch for real
    holds_backlog: bool = True          # can messages wait before their consumer attaches
    max_backlog: int | None = None      # most messages worth queueing (each costs more as
                                        # the backlog grows); None = no such limit
    slow: str = ""                      # why quick slices leave it out ("" = they keep it)
    known_loss: str = ""                # why its cells may lose messages that are not ours
    known_loss_when: dict = field(default_factory=dict)  # only for cells with these params
    shutdown_loss: str = ""             # what a consumer's warm shutdown loses, if anything
    capabilities: frozenset = frozenset()

    def __post_init__(self):
        unknown = set(self.capabilities) - CAPABILITY_NAMES
        if unknown:
            raise ValueError(f"transport {self.name}: unknown capabilities {sorted(unknown)}")
        object.__setattr__(self, "capabilities", frozenset(self.capabilities))

    def loss_exemption(self, params: dict) -> str:
        """Why a loss in a cell with ``params`` is this transport's known behaviour, or ""."""
        if not self.known_loss:
            return ""
        if all(str(params.get(k)) == str(v) for k, v in self.known_loss_when.items()):
            return self.known_loss
        return ""


class TransportUnavailable(config.UsageError, ImportError):
    """A transport module that does not import: a usage error on the CLI, an ImportError
    (skip) for scenarios."""


@dataclass
class BrokerEnv:
    url: str
    transport_options: dict = field(default_factory=dict)
    # Stop the broker the harness started and start it again at the same address
    # (``restart(down_s=0.0)``); None for a broker it does not own (the faults scenario).
    restart: Callable | None = None

    def connection(self, **kwargs):
        from kombu import Connection

        return Connection(self.url, transport_options=dict(self.transport_options), **kwargs)


class Registry:
    """Transport name -> the module that declares it (imported on first use)."""

    def __init__(self, builtin: dict[str, str]):
        self._paths = dict(builtin)     # order is the order of the tables

    def register(self, module_path: str) -> str:
        """Add the transport declared by ``module_path``; returns its name."""
        mod = importlib.import_module(module_path)
        name = mod.TRANSPORT.name
        self._paths[name] = module_path
        return name

    def names(self) -> tuple[str, ...]:
        return tuple(self._paths)

    def module(self, name: str) -> ModuleType:
        if name not in self._paths:
            raise config.UsageError(f"--transport {name!r} is not a transport; choose from "
                                    f"{', '.join(self._paths)}")
        try:
            return importlib.import_module(self._paths[name])
        except ImportError as exc:
            raise TransportUnavailable(f"transport {name!r} cannot be loaded here: {exc}") \
                from None


# Embedded first, then servers, then ours.
REGISTRY = Registry({name: f"{__name__}.{name}" for name in
                     ("memory", "filesystem", "redis", "amqp", "unix", "fifo")})


def register(module_path: str) -> str:
    return REGISTRY.register(module_path)


def names() -> tuple[str, ...]:
    return REGISTRY.names()


def module(name: str) -> ModuleType:
    return REGISTRY.module(name)


def info(name: str) -> Transport:
    """The transport's declared facts; TransportUnavailable if its module cannot load."""
    return module(name).TRANSPORT


def declared(name: str) -> Transport | None:
    """What ``name`` declares, or None when it declares nothing here: not one of ours (a
    user's --app broker) or a module that does not load on this machine."""
    if name not in names():
        return None
    try:
        return info(name)
    except ImportError:
        return None


def available() -> list[Transport]:
    """Every transport whose module loads here, in table order."""
    out = []
    for name in names():
        try:
            out.append(info(name))
        except ImportError:
            continue
    return out


def services(name: str | None) -> set[str]:
    """The services a cell over transport ``name`` needs (none for an embedded one)."""
    if not name:
        return set()
    service = info(name).service
    return {service} if service else set()


def embedded(multi_consumer: bool = False) -> str | None:
    """The first serverless transport worker processes can reach (ours: unix), for quick
    slices; ``multi_consumer``: several workers share one queue."""
    for t in available():
        if t.service is None and t.cross_process and not t.slow and \
                (not multi_consumer or "multi_consumer" in t.capabilities):
            return t.name
    return None


def servers() -> list[str]:
    """Transports that need a server (redis, amqp): the references a quick run measures."""
    return [t.name for t in available() if t.service]


def reference() -> str | None:
    """The in-process ceiling that other transports are ratios of (memory)."""
    return next((t.name for t in available() if not t.cross_process), None)


def reachability(name: str) -> config.Reachability:
    """Whether the transport can run here now (its service is up, or it is embedded)."""
    service = info(name).service
    if service is None:
        return config.Reachability(True, "embedded")
    return config.probe(service)


@contextmanager
def broker(name: str, workdir: Path):
    """Start transport ``name``'s broker environment under ``workdir``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with module(name).broker(workdir) as env:
        yield env
