"""celery-bench's Locust options, and what makes a choice of them bad.

Every option is also a ``LOCUST_*`` environment variable and a ``locust.conf`` key;
those marked UI are in the web UI's form ("Custom parameters"). A bad choice gets
one message that says what to do instead: on the command line one line and exit 2,
in the web UI the form's error (see :func:`problems`).
"""
from __future__ import annotations

import argparse
import json

from .. import backends, brokers, config

# Locust's Host field means nothing here: the users talk to a broker, chosen by --transport
# (or by --app). User classes carry this as their host so the form shows it, and a different
# Host is refused with the reason (an empty field would make Locust ask for one).
HOST_NOT_USED = "celery-bench://broker-from-transport"
HOST_MESSAGE = ("Host is not used by celery-bench: the users talk to the broker chosen by "
                "Transport (or by --app); leave Host as " + HOST_NOT_USED)
HOST_FLAG_MESSAGE = ("-H/--host is not used by celery-bench: the users talk to the broker "
                     "chosen by --transport (or by --app); drop it")

POOLS = ("prefork", "solo", "threads")
JOIN_METHODS = ("join", "join_native", "get", "redis_join", "db_join")
AUTO = "auto"
DEFAULT_TASK = "bench.roundtrip"


def _refused(t: brokers.Transport) -> str:
    """Why Locust does not offer transport ``t`` ('' when it does)."""
    if not t.holds_backlog:
        return (f"a {t.name} queue takes messages only once its consumer is attached, and "
                f"Locust's publishers have none; use 'celery-bench run publish "
                f"--transport {t.name}'")
    return ""


def offered_transports() -> tuple[str, ...]:
    """The transports the UI offers: every one that loads here and works for Locust."""
    return tuple(t.name for t in brokers.available() if not _refused(t))


def _transport(value: str) -> str:
    """argparse type: a transport we refuse gets its reason, not 'invalid choice'."""
    try:
        reason = _refused(brokers.info(value))
    except (config.UsageError, ImportError):
        return value  # the choices check names the transports that are offered
    if reason:
        raise argparse.ArgumentTypeError(f"{value} is left out: {reason}")
    return value


def add(parser) -> None:
    """Register the options on Locust's parser (``init_command_line_parser``)."""
    # On the parser itself: only its add_argument knows include_in_web_ui (a group's does not).
    g = parser
    g.add_argument("--transport", type=_transport, choices=offered_transports(),
                   default="unix", env_var="LOCUST_TRANSPORT",
                   help="broker the users talk to, in place of Locust's Host (not used); "
                        "the harness starts it (unix: our socket broker; redis, amqp: the "
                        "servers; default unix)")
    g.add_argument("--producer", default="held", env_var="LOCUST_PRODUCER",
                   choices=("held", "per-call", "new-connection"),
                   help="KombuPublisher: producer held across publishes, acquired per call, "
                        "or a new connection per message")
    g.add_argument("--method", default="apply_async", env_var="LOCUST_METHOD",
                   choices=("delay", "apply_async", "send_task"),
                   help="CeleryPublisher: how a task message is sent")
    g.add_argument("--workers", type=int, default=1, env_var="LOCUST_WORKERS",
                   help="Celery worker processes the harness starts for TaskRoundTrip and "
                        "GroupJoin (bench's own app; not with --app). Started once, by the "
                        "master in distributed mode, stopped on quit (default 1)")
    g.add_argument("--workers-per-host", type=int, default=0, env_var="LOCUST_WORKERS_PER_HOST",
                   help="distributed mode: each Locust worker starts this many Celery workers "
                        "on its own host (the master then starts none; alone, like --workers); "
                        "stopped with the run, on Ctrl-C and when the master goes away "
                        "(default 0)")
    g.add_argument("--pool", choices=POOLS, default="prefork", env_var="LOCUST_POOL",
                   help="those workers' pool (default prefork)")
    g.add_argument("--concurrency", type=int, default=2, env_var="LOCUST_CONCURRENCY",
                   help="those workers' concurrency (default 2)")
    g.add_argument("--backend", choices=(AUTO, *backends.names()), default=AUTO,
                   env_var="LOCUST_BACKEND",
                   help="result backend of the bench's app (auto: redis when its server is "
                        "reachable, no polling; else sqlite, polled every --interval)")
    g.add_argument("--join-method", choices=JOIN_METHODS, default="join",
                   env_var="LOCUST_JOIN_METHOD",
                   help="GroupJoin: how the group is waited on (redis_join, db_join: "
                        "bench.joins' speedups)")
    g.add_argument("--group-size", type=int, default=10, env_var="LOCUST_GROUP_SIZE",
                   help="GroupJoin: tasks per group (default 10)")
    g.add_argument("--interval", type=float, default=0.5, env_var="LOCUST_INTERVAL",
                   help="seconds between result polls in get()/join() (Celery's default "
                        "0.5; pub/sub backends and redis_join do not poll)")
    g.add_argument("--task-args", default="[]", env_var="LOCUST_TASK_ARGS",
                   help="JSON: a list of positional args or an object of keyword args for "
                        "--task (bench.roundtrip: [seconds to sleep])")
    g.add_argument("--arrival-rate", type=float, default=0.0, env_var="LOCUST_ARRIVAL_RATE",
                   help="open loop: operations started per second in total, split over all "
                        "users; latency is also recorded from each intended start "
                        "(0: closed loop)")
    g.add_argument("--timeout", type=float, default=30.0, env_var="LOCUST_TIMEOUT",
                   help="seconds a round trip or join may take before it counts as failed")
    g.add_argument("--app", default="", env_var="LOCUST_APP", include_in_web_ui=False,
                   help="MODULE:APP, your own Celery app: its broker and result backend, "
                        "your workers (the harness starts none)")
    g.add_argument("--task", default=DEFAULT_TASK, env_var="LOCUST_TASK",
                   include_in_web_ui=False,
                   help="task TaskRoundTrip and GroupJoin run (default bench.roundtrip; with "
                        "--app your workers need it: celery -A proj worker -I bench.tasks)")
    g.add_argument("--results-out", default="", env_var="LOCUST_RESULTS_OUT",
                   include_in_web_ui=False,
                   help="write the exact (HdrHistogram) figures as a celery-bench results "
                        "file (the master writes it in distributed mode)")
    g.add_argument("--check-p99-us", type=float, default=0.0, env_var="LOCUST_CHECK_P99_US",
                   include_in_web_ui=False,
                   help="CI: exit 3 if an operation's p99 (from the intended start in open "
                        "loop) is above this many microseconds")
    g.add_argument("--check-fail-ratio", type=float, default=-1.0,
                   env_var="LOCUST_CHECK_FAIL_RATIO", include_in_web_ui=False,
                   help="CI: exit 3 if failed operations / operations is above this (0-1)")


def get(environment, name: str, default=None):
    """An option's value now (the web UI may have changed it since start-up)."""
    value = getattr(environment.parsed_options, name, None) if environment.parsed_options \
        else None
    return default if value is None else value


def task_args(text: str) -> tuple[list, dict]:
    """``--task-args`` as (args, kwargs)."""
    try:
        value = json.loads(text or "[]")
    except ValueError as exc:
        raise config.UsageError(f"--task-args {text!r}: not JSON ({exc})") from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    raise config.UsageError(f"--task-args {text!r}: give a JSON list (positional args) or "
                            f"object (keyword args)")


def backend_name(opts: dict) -> str:
    """The bench app's result backend for these options (``auto``: the fastest correct one
    that is reachable, redis before SQLite)."""
    if opts.get("backend", AUTO) != AUTO:
        return opts["backend"]
    return backends.fastest_reachable(opts["transport"]).name


def problems(opts: dict, classes, host: str | None = None, form: bool = False) -> str | None:
    """The first bad choice among ``opts`` (a dict of option values) for running the User
    classes ``classes``, as one message saying what to do instead; None if all is well.
    ``form``: the choice comes from the web UI's form (``host`` is its Host field)."""
    if host and host.strip() and host.strip() != HOST_NOT_USED:
        return HOST_MESSAGE if form else HOST_FLAG_MESSAGE
    names = [c.__name__ for c in classes]
    tasks = [c.__name__ for c in classes if getattr(c, "runs_tasks", False)]
    for key in ("workers", "workers_per_host", "concurrency", "group_size"):
        minimum = 0 if key.startswith("workers") else 1
        if int(opts.get(key) or 0) < minimum:
            return f"--{key.replace('_', '-')} {opts.get(key)}: must be at least {minimum}"
    for key in ("interval", "arrival_rate"):
        if float(opts.get(key) or 0) < 0:
            return f"--{key.replace('_', '-')} {opts.get(key)}: must not be negative"
    if float(opts.get("timeout") or 0) <= 0:
        return f"--timeout {opts.get('timeout')}: seconds, above 0"
    ratio = float(opts.get("check_fail_ratio", -1))
    if ratio > 1:
        return f"--check-fail-ratio {ratio:g}: a ratio between 0 and 1"
    try:
        task_args(opts.get("task_args", "[]"))
    except config.UsageError as exc:
        return str(exc)
    joins = any(getattr(c, "joins", False) for c in classes)
    if opts.get("app"):
        return _app_problems(opts, tasks, joins)
    transport = opts["transport"]
    try:
        info = brokers.info(transport)
    except (config.UsageError, ImportError) as exc:
        return f"--transport {transport}: {exc}"
    reason = _refused(info)
    if reason:
        return f"--transport {transport}: {reason}"
    reach = brokers.reachability(transport)
    if not reach.ok:
        return f"--transport {transport}: {reach.reason}"
    if not tasks:
        return None
    need = "needs" if len(tasks) == 1 else "need"
    if not info.cross_process:
        return (f"{', '.join(tasks)} {need} a broker a worker process can reach, and {transport} "
                f"is in-process: choose {', '.join(_worker_transports())}, or run only "
                f"{' '.join(n for n in names if n not in tasks) or 'the publishers'}")
    if int(opts.get("workers") or 0) < 1 and int(opts.get("workers_per_host") or 0) < 1:
        return (f"{', '.join(tasks)} {need} Celery workers: --workers N (N >= 1) starts the "
                f"bench's own, --workers-per-host N on each load generator, or --app "
                f"MODULE:APP uses yours")
    if opts.get("task", DEFAULT_TASK) != DEFAULT_TASK:
        from ..celery_app import make_app
        from ..drivers.userapp import check_task
        app = make_app("memory://")
        try:
            check_task(app, "bench.celery_app", opts["task"])
        except config.UsageError as exc:
            return str(exc)
        finally:
            app.close()
    backend = backends.get(backend_name(opts))
    if backend.transport and backend.transport != transport:
        return (f"--backend {backend.name} works only with --transport {backend.transport} "
                f"(its replies travel over that broker)")
    for service in sorted(backends.services(backend.name)):
        probe = config.probe(service)
        if not probe.ok:
            return f"--backend {backend.name}: {probe.reason}"
    if joins:
        return _join_problem(opts.get("join_method", "join"), backend.name,
                             backend.native_join, backend.name == "redis", backend.database)
    return None


def _worker_transports() -> list[str]:
    return [t.name for t in brokers.available() if t.cross_process and not _refused(t)]


def _join_problem(method: str, backend: str, native: bool, redis: bool, database: bool):
    if method == "join_native" and not native:
        return (f"--join-method join_native: the {backend} backend has no native join "
                f"(get_many); use join, get or "
                f"{'db_join' if database else 'redis_join' if redis else 'join'}")
    if method == "redis_join" and not redis:
        return f"--join-method redis_join needs the redis result backend, not {backend}"
    if method == "db_join" and not database:
        return f"--join-method db_join needs a database result backend, not {backend}"
    return None


def _app_problems(opts: dict, tasks: list[str], joins: bool) -> str | None:
    from ..drivers.userapp import check_task, load_app

    spec = opts["app"]
    try:
        app = load_app(spec)
        if tasks:
            check_task(app, spec, opts.get("task") or DEFAULT_TASK)
    except config.UsageError as exc:
        return str(exc)
    if not tasks:
        return None
    backend = app.backend
    kind = type(backend).__name__
    if kind == "DisabledBackend":
        return (f"--app {spec}: {', '.join(tasks)} wait for results, and the app has no "
                f"result backend (set result_backend)")
    if not joins:
        return None
    database = hasattr(backend, "task_cls") and hasattr(backend, "session_manager")
    return _join_problem(opts.get("join_method", "join"), kind,
                         bool(getattr(backend, "supports_native_join", False)),
                         kind == "RedisBackend", database)
