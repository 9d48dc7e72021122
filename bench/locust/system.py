"""The Celery system a Locust run talks to: broker, result backend, Celery workers.

One place owns it: the Locust process that drives the test, i.e. the single process,
or the master in distributed mode (Locust workers never start Celery workers: N
load generators would otherwise start N sets, all consuming the same queue). The
owner's :class:`OwnerSystem` starts the transport's broker environment (our unix broker,
a folder, or a queue on the redis/amqp server), the result backend, and ``--workers``
real ``celery worker`` processes of the bench's app (``bench.celery_workers``: own process
groups, stopped on quit, Ctrl-C, SIGTERM and at exit); it keeps them while the
settings stay the same and restarts them when the web UI changes them.

What the users need to reach it, the *wiring* (broker URL and options, backend URL,
queue, app settings, or ``--app``), travels in Locust's own options: the owner
stores it in ``parsed_options`` at ``test_start`` and Locust sends those to every
worker with the spawn message. Each Locust process then builds one :class:`Client`
from it (a Celery app, a Kombu target) shared by its users, kept by its :class:`Local`
(on the process's ``Environment``).

With ``--app MODULE:APP`` nothing is started: the wiring names the app, every Locust
process imports it (so it must be importable on every load generator, as it is for
``celery -A``), and your own workers run the tasks.

Across machines the wiring must name something every load generator can reach:
redis or amqp for the broker, redis (or PostgreSQL) for results. ``unix`` and the
SQLite backend live in the owner's temporary folder, reachable from its host only.
"""
from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
import threading
import uuid
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

from .. import backends, brokers, celery_workers, children, config, joins, worker_stamps
from ..brokers import BrokerEnv
from ..celery_app import make_app
from ..drivers.target import Target
from ..drivers.userapp import load_app
from ..celery_workers import one_line
from ..cleanup import delete_queues
from ..tasks.roundtrip import BOOT_ID
from ..tasks.roundtrip import TASK as ROUNDTRIP
from . import arguments

log = logging.getLogger("celery-bench.locust")
WIRING = "celery_bench_wiring"   # the parsed_options attribute Locust carries to workers
STOP_S = 2.0     # warm-shutdown grace for our workers before SIGKILL (they are idle by then)
READY_S = 60.0

# Locust owns SIGTERM in this process (its handler fires `quitting`, where the OwnerSystem stops
# the workers); bench.children must not replace it with its own Python-level handler.
children.OWNER.signals_taken = True


class OwnerSystem:
    """The owner's broker environment, result backend and Celery workers."""

    def __init__(self):
        self.key = None
        self.wiring: dict | None = None
        self.stack: ExitStack | None = None
        self.procs: list = []
        self.lock = threading.Lock()   # gevent's, once Locust has patched threading

    def alive(self) -> bool:
        return all(w.alive() for w in self.procs)

    def ensure(self, opts: dict, need_workers: bool) -> dict:
        """The wiring for ``opts``: the running rig if it matches, else a new one (the old
        one stopped first). Raises WorkerError (one line) when a worker cannot start."""
        with self.lock:
            if opts.get("app"):
                key = ("app", opts["app"])
            else:
                n = int(opts.get("workers") or 0) if need_workers else 0
                # --workers-per-host: the Locust workers start them, this OwnerSystem none
                per_host = int(opts.get("workers_per_host") or 0) if need_workers else 0
                some = n or per_host
                key = (opts["transport"], arguments.backend_name(opts) if some else None, n,
                       opts.get("pool"), int(opts.get("concurrency") or 1) if some else None,
                       per_host)
            if key == self.key and self.alive():
                return self.wiring
            self._close()
            try:
                self.wiring = self._start(key, opts)
            except celery_workers.WorkerError as exc:
                self._close()
                raise celery_workers.WorkerError(one_line(exc, tail=6)) from None
            except BaseException:
                self._close()
                raise
            self.key = key
            self._started()
            return self.wiring

    def _start(self, key, opts) -> dict:
        if key[0] == "app":
            return {"app": opts["app"], "label": opts["app"]}
        transport, backend_name, n, pool, concurrency, per_host = key
        tag = uuid.uuid4().hex[:10]
        stack = self.stack = ExitStack()
        folder = Path(tempfile.mkdtemp(prefix="celery-bench-locust-"))
        stack.callback(shutil.rmtree, folder, True)
        env = stack.enter_context(brokers.broker(transport, folder))
        wiring = {"transport": transport, "label": transport, "url": env.url,
                  "transport_options": dict(env.transport_options), "boot_id": BOOT_ID,
                  "host_only": _host_only("broker", transport, env.url)}
        if not n and not per_host:
            return wiring
        backend = backends.get(backend_name)
        backend_url, conf, cleanup = backend.open(folder, tag)
        stack.callback(cleanup)
        queue = f"celery-bench-locust-{tag}"
        conf["task_default_queue"] = queue
        # bench.roundtrip's requests carry the worker main process's readings (the
        # waterfall's taken and handed points), returned in its result
        conf.update(worker_stamps.request_conf(ROUNDTRIP))
        stack.callback(delete_queues, env, [queue])
        app = make_app(env.url, backend_url, env.transport_options, **conf)
        try:
            backend.prepare(app)       # SQLite: tables and WAL before the pool children race
        finally:
            app.close()
        self.procs = [] if not n else stack.enter_context(celery_workers.workers(
            n, env.url, backend_url, transport_options=env.transport_options, conf=conf,
            pool=pool, concurrency=concurrency, ready_timeout=READY_S, stop_timeout=STOP_S,
            hostname=f"locust-{tag}@%h", die_with_parent=True,
            env=stored_env(stack, folder)))
        wiring.update(backend=backend.name, backend_url=backend_url, conf=conf, queue=queue,
                      workers=n, pool=pool, concurrency=concurrency, per_host=per_host)
        wiring["host_only"] = wiring["host_only"] or _host_only("result backend", backend.name,
                                                                backend_url)
        return wiring

    def _started(self) -> None:
        log.info("celery-bench: %s", self.describe())

    def describe(self) -> str:
        w = self.wiring or {}
        if w.get("app"):
            return f"your app {w['app']} (your workers)"
        if w.get("per_host"):
            return (f"broker {w['transport']}, backend {w['backend']}, {w['per_host']} Celery "
                    f"worker(s) --pool {w['pool']} -c {w['concurrency']} on each Locust "
                    f"worker's host (--workers-per-host)")
        if not w.get("workers"):
            return f"broker {w.get('transport')} (no Celery workers needed)"
        return (f"broker {w['transport']}, backend {w['backend']}, {w['workers']} Celery "
                f"worker(s) --pool {w['pool']} -c {w['concurrency']} (pids "
                f"{', '.join(str(p.pid) for p in self.procs)})")

    def _close(self) -> None:
        stack, self.stack = self.stack, None
        self.key = self.wiring = None
        self.procs = []
        if stack is not None:
            stack.close()

    def close(self) -> None:
        with self.lock:
            self._close()


def stored_env(stack: ExitStack, folder: Path) -> dict:
    """The environment that has this process's Celery workers' pool children write each
    round trip's *stored* reading into ``folder``/stored (:mod:`bench.worker_stamps`), read
    by this process's TaskRoundTrip users through ``worker_stamps.LEDGER`` (one host, one
    clock); ``stack`` stops reading it when the workers go."""
    stored = folder / "stored"
    stored.mkdir(mode=0o700, exist_ok=True)
    worker_stamps.LEDGER.watch(str(stored))
    stack.callback(worker_stamps.LEDGER.forget, str(stored))
    return {worker_stamps.STORED_ENV: str(stored)}


def _host_only(what: str, name: str, url: str) -> str:
    """Why ``url`` reaches the owner's host only ('' when any host can use it)."""
    if url.startswith(("unix:", "filesystem:", "fifo:")) or "sqlite" in url:
        return f"the {what} ({name}) lives in a folder of the master's host"
    host = (urlsplit(url).hostname or "") if "://" in url else ""
    if host in ("127.0.0.1", "localhost", "::1"):
        service = {"postgresql": "postgres"}.get(name, name)
        var = config.ENV_VARS.get(service, "the service URL")
        return (f"the {what} URL {config.mask_url(url)} is the master's loopback (set "
                f"{var} to an address every load generator reaches)")
    return ""


class Unreachable(RuntimeError):
    """This Locust worker runs on another host than what the master started."""


def check_reachable(wiring: dict) -> None:
    """Raise Unreachable when this process is on another host than what ``wiring`` names
    and that lives on the master's host only."""
    if wiring.get("host_only") and wiring.get("boot_id") not in (None, BOOT_ID):
        raise Unreachable(f"this Locust worker is on another host than the master, and "
                          f"{wiring['host_only']}: use --transport redis or amqp and "
                          f"--backend redis (or postgresql) at addresses every load "
                          f"generator reaches")


class Client:
    """What one Locust process's users share: a Celery app, a Kombu target, a label."""

    def __init__(self, wiring: dict):
        check_reachable(wiring)
        self.wiring = wiring
        self.label = wiring["label"]
        if wiring.get("app"):
            self.app = load_app(wiring["app"])
            self.target = Target.for_app(self.app, wiring["app"])
            self.user_app = True
            self.backend = type(self.app.backend).__name__
        else:
            env = BrokerEnv(wiring["url"], dict(wiring["transport_options"]))
            self.target = Target.from_env(env, brokers.info(wiring["transport"]))
            self.user_app = False
            self.backend = wiring.get("backend")
            self.app = None
            if wiring.get("backend_url"):
                self.app = make_app(env.url, wiring["backend_url"], env.transport_options,
                                    **wiring["conf"])

    def close(self) -> None:
        app, self.app = self.app, None
        try:
            if app is not None and not self.user_app:
                try:
                    joins.release(app.backend)
                finally:
                    app.close()
        finally:
            # AsyncResults left by interrupted operations unsubscribe in __del__ (redis
            # backend), which needs gevent's hub: let them go now, not at interpreter exit.
            del app
            gc.collect()


class Local:
    """What one Locust process keeps for its users (on its ``Environment``): the Client
    for the current wiring, and the messages already said."""

    ATTR = "celery_bench_local"

    def __init__(self):
        self.client: Client | None = None
        self.key: str | None = None
        self.lock = threading.Lock()
        self.said: set = set()

    @classmethod
    def of(cls, environment) -> "Local":
        local = getattr(environment, cls.ATTR, None)
        if local is None:
            local = cls()
            setattr(environment, cls.ATTR, local)
        return local

    def say_once(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            log.error("celery-bench: %s", message)

    def get(self, wiring: dict) -> Client:
        key = json.dumps(wiring, sort_keys=True)
        with self.lock:
            if self.client is None or key != self.key:
                self.close()
                self.client = Client(wiring)
                self.key = key
            return self.client

    def close(self) -> None:
        c, self.client, self.key = self.client, None, None
        if c is not None:
            try:
                c.close()
            except Exception:  # closing must never hide a measurement
                pass


def client(environment) -> Client:
    """This process's Client for the current test's wiring (built on first use)."""
    wiring = getattr(environment.parsed_options, WIRING, None)
    if not wiring:
        raise RuntimeError("no celery-bench wiring: the master (or this process) did not "
                           "start the test through bench/locustfile.py")
    return Local.of(environment).get(wiring)


def close_client(environment) -> None:
    Local.of(environment).close()
