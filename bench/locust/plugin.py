"""The Locust event listeners that tie celery-bench's pieces together.

Roles: the *owner* is the process that drives the test (the single process, or the
master), a *worker* is a Locust worker process. The owner checks the options (a bad
choice: one line and exit 2 on the command line, one message in the web UI), owns
the Celery system (:mod:`.system`), keeps the merged Book, writes ``--results-out``,
and sets the exit code from the checks. A worker records into its Book and sends it
with each report (every 3 s, and at once when its users stop, so the master has it
all when the test stops).
"""
import locust  # noqa: F401  first: gevent patches the standard library

import json
import logging
import os
import signal
import sys
import time

import gevent
import greenlet
from locust import events
from locust.runners import MasterRunner, WorkerRunner

from .. import results as results_file
from .. import celery_workers
from . import arguments, book_results, checks, hdr, hostworkers, openloop, system, webui

log = logging.getLogger("celery-bench.locust")


class State:
    role = "local"                  # "local", "master" or "worker"
    book = hdr.Book()               # local: recorded; worker: since last report; master: merged
    rig = system.OwnerSystem()
    host_workers = hostworkers.HostWorkers()   # worker: --workers-per-host, on this host
    started = None                  # time.monotonic() of test start (owner)
    stopped = None
    locust_workers = 0
    sent: dict = {}                 # worker: requests handed to the master, per row
    environment = None


def _role(runner) -> str:
    if isinstance(runner, MasterRunner):
        return "master"
    if isinstance(runner, WorkerRunner):
        return "worker"
    return "local"


def _opts(environment) -> dict:
    return dict(vars(environment.parsed_options)) if environment.parsed_options else {}


def _owner_opts(opts: dict) -> dict:
    """``--workers-per-host`` as the owner's OwnerSystem reads it: alone (one host) it is that
    host's ``--workers``; on a master the Locust workers start them and the master none."""
    per_host = int(opts.get("workers_per_host") or 0)
    if per_host < 1:
        return opts
    if State.role == "master":
        return dict(opts, workers=0)
    return dict(opts, workers=per_host, workers_per_host=0)


def _needs_workers(classes) -> bool:
    return any(getattr(c, "runs_tasks", False) for c in classes)


# --------------------------------------------------------------------------- start-up
@events.init_command_line_parser.add_listener
def _add_options(parser, **kwargs):
    arguments.add(parser)


@events.init.add_listener
def _init(environment, runner=None, web_ui=None, **kwargs):
    State.environment = environment
    State.role = _role(runner)
    if State.role == "worker":
        _signals()
        return                      # the master checks the options and owns the workers
    opts = _opts(environment)
    headless = bool(opts.get("headless"))
    # Which users will run is known now only on the command line; the web UI's form is
    # checked when a test is started from it.
    classes = list(environment.user_classes) if headless else []
    message = arguments.problems(opts, classes, host=environment.host)
    if message:
        log.error(message)
        sys.exit(2)
    if headless:
        try:
            State.rig.ensure(_owner_opts(opts), _needs_workers(classes))
        except celery_workers.WorkerError as exc:
            log.error("cannot start the Celery workers: %s", exc)
            sys.exit(1)
    if web_ui is not None:
        webui.register(web_ui, environment, page_data=lambda: _page_data(environment),
                       results_json=lambda: json.dumps(_run(environment).to_dict(), indent=1),
                       check_swarm=lambda form: _check_swarm(environment, form))
    _signals()


def _signals() -> None:
    """Ctrl-C goes to the main greenlet, where Locust shuts down (firing `quitting`, where the
    Celery workers are stopped): not into whichever user happened to run (a traceback, and
    an operation cut in half). A closed terminal (SIGHUP) shuts down like SIGTERM."""
    main = greenlet.getcurrent()     # init runs in the main greenlet
    hub = gevent.get_hub()
    gevent.signal_handler(signal.SIGINT,
                          lambda: hub.loop.run_callback(main.throw, KeyboardInterrupt))
    gevent.signal_handler(signal.SIGHUP, lambda: os.kill(os.getpid(), signal.SIGTERM))


def _check_swarm(environment, form) -> str | None:
    """The web UI's start form: a bad choice is refused with one message; a good one gets
    its Celery workers started before Locust starts the test."""
    opts = _opts(environment)
    for key in form:
        if key in opts and key not in ("user_classes", "host"):
            current = opts[key]
            value = form.get(key)
            try:
                opts[key] = type(current)(value) if current is not None and \
                    not isinstance(current, (bool, list)) else value
            except ValueError:
                return f"{key.replace('_', ' ')}: {value!r} is not a valid value"
    classes = list(environment.user_classes)
    picked = form.getlist("user_classes")
    if picked and environment.available_user_classes:
        classes = [environment.available_user_classes[n] for n in picked
                   if n in environment.available_user_classes]
    message = arguments.problems(opts, classes, host=form.get("host"), form=True)
    if message:
        return message
    runner = environment.runner
    if form.get("user_count", "").strip().isdigit():
        _share_user_count(environment, int(form["user_count"]))
    if runner is not None and runner.state in ("spawning", "running"):
        return None                 # editing a running test: the Celery system stays
    try:
        State.rig.ensure(_owner_opts(opts), _needs_workers(classes))
    except celery_workers.WorkerError as exc:
        return f"cannot start the Celery workers: {exc}"
    return None


def _share_user_count(environment, users) -> None:
    """The test's total user count, for the open loop's split: Locust sends its own
    ``num_users`` to no worker, but it sends every option of ours with each spawn."""
    if environment.parsed_options is not None and users:
        setattr(environment.parsed_options, openloop.USERS, int(users))


# --------------------------------------------------------------------------- a test
@events.test_start.add_listener
def _test_start(environment, **kwargs):
    openloop.reset(environment)
    system.close_client(environment)   # the previous test's users are gone
    State.book.reset()
    State.sent = {}
    State.started, State.stopped = time.monotonic(), None
    if State.role == "worker":
        _start_host_workers(environment)
        return
    runner = environment.runner
    State.locust_workers = runner.worker_count if State.role == "master" else 0
    _share_user_count(environment, runner.target_user_count)
    opts = _opts(environment)
    wiring = None
    try:
        wiring = State.rig.ensure(_owner_opts(opts), _needs_workers(environment.user_classes))
    except celery_workers.WorkerError as exc:
        log.error("cannot start the Celery workers: %s", exc)
    setattr(environment.parsed_options, system.WIRING, wiring)


def _start_host_workers(environment) -> None:
    """--workers-per-host: this Locust worker's own Celery workers, before its users spawn."""
    wiring = getattr(environment.parsed_options, system.WIRING, None) or {}
    if not wiring.get("per_host"):
        State.host_workers.close()
        return
    try:
        system.check_reachable(wiring)
        State.host_workers.ensure(wiring, environment.runner.client_id)
    except (celery_workers.WorkerError, system.Unreachable) as exc:
        log.error("celery-bench: cannot start this host's Celery workers: %s", exc)


@events.request.add_listener
def _record(request_type, name, response_time, exception=None, context=None, **kwargs):
    State.book.record(request_type, name, response_time, exception, context)


@events.report_to_master.add_listener
def _report(client_id, data, **kwargs):
    for name, n in openloop.take(State.environment).items():
        State.book.count(name, n)
    payload = State.book.take()
    for item in payload["rows"]:
        if not item["kind"]:
            key = f"{item['type']} {item['name']}"
            State.sent[key] = State.sent.get(key, 0) + item["requests"]
    data[hdr.KEY] = payload


@events.worker_report.add_listener
def _merge(client_id, data, **kwargs):
    try:
        State.book.merge(data.get(hdr.KEY))
    except (ValueError, KeyError, TypeError) as exc:
        log.error("celery-bench: report from %s not merged: %s", client_id, exc)


def _flush(environment, **kwargs):
    """A worker sends what it has now, so the master holds it all before the test ends."""
    runner = environment.runner
    if State.role != "worker" or runner is None:
        return
    data: dict = {}
    environment.events.report_to_master.fire(client_id=runner.client_id, data=data)
    runner.send_message("stats", data)


events.test_stopping.add_listener(_flush)


@events.test_stop.add_listener
def _test_stop(environment, **kwargs):
    if State.role == "worker":
        _flush(environment)
        return
    State.stopped = time.monotonic()
    _write_results(environment)
    verdict = _rate(environment)
    if verdict and verdict["rate_shortfall"]:
        log.warning("celery-bench: %s", _rate_text(environment, verdict))


@events.reset_stats.add_listener
def _reset(**kwargs):
    if State.role != "worker":
        State.book.reset()
        State.started = time.monotonic()


@events.spawning_complete.add_listener
def _spawned(user_count, **kwargs):
    """``--reset-stats``: Locust forgets the ramp-up when every user is spawned; so do we."""
    env = State.environment
    if env is not None and env.reset_stats:
        State.book.reset()
        State.sent = {}
        State.started = time.monotonic()


@events.quitting.add_listener
def _quitting(environment, **kwargs):
    """Runs after the runner has quit (Locust fires `quitting` in reverse order), so the
    master holds every worker's last report by now."""
    try:
        if State.role == "worker":
            State.host_workers.close()
            _flush_log()
            return
        runner = environment.runner
        if State.role == "local" and runner is not None:
            # Ctrl-C or SIGTERM mid-test: Locust stops a local runner's users only after
            # `quitting`; stop them first, or they would run on against a stopped broker.
            runner.stop()
        if State.started is not None and State.stopped is None:
            State.stopped = time.monotonic()
        _write_results(environment)
        _log_table(environment)
        _judge(environment)
    finally:
        system.close_client(environment)
        State.rig.close()


# --------------------------------------------------------------------------- reading
def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def _live() -> hdr.Book:
    if State.role == "local":       # the open loop's counters are read, not reported
        State.book.counters = _add(State.book.counters, openloop.take(State.environment))
    return State.book


def _elapsed() -> float:
    if State.started is None:
        return 0.0
    return (State.stopped or time.monotonic()) - State.started


def _rate(environment) -> dict | None:
    rate = float(arguments.get(environment, "arrival_rate", 0.0) or 0.0)
    if rate <= 0:
        return None
    return openloop.verdict(rate, _live().counters, _elapsed())


def _rate_text(environment, v: dict) -> str:
    text = (f"arrival rate {v['rate_target_per_s']:,.0f}/s asked, "
            f"{v['rate_achieved_per_s']:,.1f}/s achieved ({v['started']:,} of {v['due']:,} "
            f"intended starts made)")
    if v["rate_shortfall"]:
        text += (f"; SHORTFALL: the users cannot keep up ({v['behind']:,} starts behind, "
                 f"see the schedule lag rows); add users (-u) or Locust workers")
    return text


def _common(environment) -> dict:
    wiring = State.rig.wiring or {}
    out = {"users": arguments.get(environment, "num_users", None),
           "locust_workers": State.locust_workers,
           "arrival_rate": float(arguments.get(environment, "arrival_rate", 0.0) or 0.0)}
    if wiring.get("app"):
        out["app"] = wiring["app"]
    elif wiring.get("workers") or wiring.get("per_host"):
        per_host = int(wiring.get("per_host") or 0)
        if per_host:
            out["celery_workers_per_host"] = per_host
        out.update(celery_workers=wiring["workers"] + per_host * State.locust_workers,
                   pool=wiring["pool"],
                   concurrency=wiring["concurrency"], backend=wiring["backend"])
    return out


def _run(environment) -> results_file.Run:
    verdict = _rate(environment)
    rate = None
    if verdict:
        rate = {k: verdict[k] for k in ("rate_target_per_s", "rate_achieved_per_s",
                                        "rate_shortfall", "due", "started", "behind")}
    return book_results.run(_live(), _common(environment), _elapsed(), rate)


def _write_results(environment) -> None:
    out = arguments.get(environment, "results_out", "")
    if not out or not State.book.rows:
        return
    results_file.dump(_run(environment), out)
    log.info("celery-bench: results written to %s", out)


def _page_data(environment) -> dict:
    book = _live()
    verdict = _rate(environment)
    return {"state": environment.runner.state if environment.runner else "",
            "rows": book_results.table(book), "spectrum": book_results.spectrum(book),
            "rate": _rate_text(environment, verdict) if verdict else "",
            "shortfall": bool(verdict and verdict["rate_shortfall"])}


def _log_table(environment) -> None:
    rows = book_results.table(_live())
    if not rows:
        return
    width = min(64, max(len(r["name"]) for r in rows))
    lines = [f"{'type':<12} {'name':<{width}} {'requests':>9} {'fails':>6} {'p50':>9} "
             f"{'p99':>9} {'p99.9':>9} {'max':>9}  (us, exact)"]
    for r in rows:
        cells = [f"{r[k]:>9,}" if r[k] is not None else f"{'-':>9}"
                 for k in ("p50", "p99", "p999", "max")]
        lines.append(f"{r['type'][:12]:<12} {r['name'][:width]:<{width}} {r['requests']:>9,} "
                     f"{r['fails']:>6,} {' '.join(cells)}  {r['note']}".rstrip())
    verdict = _rate(environment)
    if verdict:
        lines.append(_rate_text(environment, verdict))
    log.info("celery-bench exact latencies (HdrHistogram):\n%s", "\n".join(lines))


def _judge(environment) -> None:
    p99 = float(arguments.get(environment, "check_p99_us", 0.0) or 0.0)
    ratio = float(arguments.get(environment, "check_fail_ratio", -1.0))
    if p99 <= 0 and ratio < 0:
        return
    failed, passed = checks.judge(_live(), p99, ratio)
    for line in passed:
        log.info("celery-bench check passed: %s", line)
    for line in failed:
        log.error("celery-bench check FAILED: %s", line)
    if failed:
        environment.process_exit_code = checks.EXIT_CODE


def _flush_log() -> None:
    pending = sum(r.requests for (t, n, kind), r in State.book.rows.items() if not kind)
    total = sum(State.sent.values())
    log.info("celery-bench worker recorded: %s", json.dumps(
        {"sent_to_master": total, "not_sent": pending, "rows": State.sent}, sort_keys=True))
