"""The Locust event listeners that tie celery-bench's pieces together.

Roles: the *owner* is the process that drives the test (the single process, or the
master), a *worker* is a Locust worker process. The owner checks the options (a bad
choice: one line and exit 2 on the command line, one message in the web UI), owns
the Celery system (:mod:`.system`), keeps the merged Book, writes ``--results-out``,
and sets the exit code from the checks. A worker records into its Book and sends it
with each report (every 3 s, and once more when its users stop); at the end the master
waits for each worker's final report (:mod:`.generators`). All state is on one
:class:`Plugin` instance, whose bound methods are Locust's listeners.
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
from ..tasks.roundtrip import BOOT_ID
from . import (arguments, book_results, checks, clocks, generators, hdr, hostworkers, openloop,
               system, webui)

log = logging.getLogger("celery-bench.locust")


def _role(runner) -> str:
    if isinstance(runner, MasterRunner):
        return "master"
    if isinstance(runner, WorkerRunner):
        return "worker"
    return "local"


def _runner(environment, timeout: float = 10.0):
    """``environment.runner``, waiting for it if need be: a worker that connects last gets the
    spawn message (and fires ``test_start``) while Locust is still building its runner."""
    deadline = time.monotonic() + timeout
    while environment.runner is None and time.monotonic() < deadline:
        gevent.sleep(0.05)
    return environment.runner


def _opts(environment) -> dict:
    return dict(vars(environment.parsed_options)) if environment.parsed_options else {}


def _owner_opts(opts: dict, role: str) -> dict:
    """``--workers-per-host`` as the owner's OwnerSystem reads it: alone (one host) it is that
    host's ``--workers``; on a master the Locust workers start them and the master none."""
    per_host = int(opts.get("workers_per_host") or 0)
    if per_host < 1:
        return opts
    if role == "master":
        return dict(opts, workers=0)
    return dict(opts, workers=per_host, workers_per_host=0)


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def _needs_workers(classes) -> bool:
    return any(getattr(c, "runs_tasks", False) for c in classes)


class Plugin:
    """One Locust process's celery-bench: its role, Book, Celery system and test clock."""

    def __init__(self):
        self.role = "local"             # "local", "master" or "worker"
        self.book = hdr.Book()          # local: recorded; worker: since last report; master: merged
        self.rig = system.OwnerSystem()
        self.host_workers = hostworkers.HostWorkers()   # worker: --workers-per-host, this host
        self.generators = generators.Generators()       # master: who reported, the final flush
        self.clocks = clocks.Clocks()                   # master: each generator's clock offset
        self.started = None             # time.monotonic() of test start (owner)
        self.stopped = None
        self.locust_workers = 0
        self.sent: dict = {}            # worker: requests handed to the master, per row
        self.environment = None

    def listen(self, events) -> None:
        """Register this instance's listeners on Locust's ``events``."""
        for name, listener in (
                ("init_command_line_parser", self._add_options), ("init", self._init),
                ("test_start", self._test_start), ("request", self._record),
                ("report_to_master", self._report), ("worker_report", self._merge),
                ("test_stop", self._test_stop), ("reset_stats", self._reset),
                ("spawning_complete", self._spawned), ("quitting", self._quitting)):
            getattr(events, name).add_listener(listener)

    # --------------------------------------------------------------------------- start-up
    def _add_options(self, parser, **kwargs):
        arguments.add(parser)

    def _init(self, environment, runner=None, web_ui=None, **kwargs):
        self.environment = environment
        self.role = _role(runner)
        if self.role == "worker":
            runner.register_message(generators.FINAL, self._on_final)
            runner.register_message(clocks.PING, clocks.answer(BOOT_ID))
            runner.register_message(clocks.TABLE, clocks.keep_table)
            self._signals()
            return                      # the master checks the options and owns the workers
        if self.role == "master":
            runner.register_message(clocks.PING, self.clocks.answered)
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
                self.rig.ensure(_owner_opts(opts, self.role), _needs_workers(classes))
            except celery_workers.WorkerError as exc:
                log.error("cannot start the Celery workers: %s", exc)
                sys.exit(1)
        if web_ui is not None:
            webui.register(web_ui, environment, page_data=lambda: self._page_data(environment),
                           results_json=lambda: json.dumps(self._run(environment).to_dict(),
                                                             indent=1),
                           check_swarm=lambda form: self._check_swarm(environment, form))
        self._signals()

    def _signals(self) -> None:
        """Ctrl-C goes to the main greenlet, where Locust shuts down (firing `quitting`, where the
        Celery workers are stopped): not into whichever user happened to run (a traceback, and
        an operation cut in half). A closed terminal (SIGHUP) shuts down like SIGTERM."""
        main = greenlet.getcurrent()     # init runs in the main greenlet
        hub = gevent.get_hub()
        gevent.signal_handler(signal.SIGINT,
                              lambda: hub.loop.run_callback(main.throw, KeyboardInterrupt))
        gevent.signal_handler(signal.SIGHUP, lambda: os.kill(os.getpid(), signal.SIGTERM))

    def _check_swarm(self, environment, form) -> str | None:
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
            self._share_user_count(environment, int(form["user_count"]))
        if runner is not None and runner.state in ("spawning", "running"):
            return None                 # editing a running test: the Celery system stays
        try:
            self.rig.ensure(_owner_opts(opts, self.role), _needs_workers(classes))
        except celery_workers.WorkerError as exc:
            return f"cannot start the Celery workers: {exc}"
        return None

    def _share_user_count(self, environment, users) -> None:
        """The test's total user count, for the open loop's split: Locust sends its own
        ``num_users`` to no worker, but it sends every option of ours with each spawn."""
        if environment.parsed_options is not None and users:
            setattr(environment.parsed_options, openloop.USERS, int(users))

    # --------------------------------------------------------------------------- a test
    def _test_start(self, environment, **kwargs):
        if environment.runner is None:  # before `init`: see _runner
            self.role = _role(_runner(environment))
        openloop.reset(environment)
        system.close_client(environment)           # the previous test's users are gone
        self.book.reset()
        self.sent = {}
        self.started, self.stopped = time.monotonic(), None
        self.generators.reset()
        if self.role == "worker":
            self._start_host_workers(environment)
            return
        runner = environment.runner
        self.locust_workers = runner.worker_count if self.role == "master" else 0
        self._share_user_count(environment, runner.target_user_count)
        opts = _opts(environment)
        wiring = None
        try:
            wiring = self.rig.ensure(_owner_opts(opts, self.role),
                                     _needs_workers(environment.user_classes))
        except celery_workers.WorkerError as exc:
            log.error("cannot start the Celery workers: %s", exc)
        setattr(environment.parsed_options, system.WIRING, wiring)
        if self.role == "master":
            self._clocks_and_hosts(environment, wiring)

    def _clocks_and_hosts(self, environment, wiring) -> None:
        """Before any user spawns: each generator's clock offset, and which are on another
        host; a broker or backend that lives on the master's host only is refused then."""
        runner = environment.runner
        self.clocks.probe(runner, BOOT_ID)
        for cid, est in sorted(self.clocks.estimates.items()):
            log.info("celery-bench: generator %s clock %+.3f ms from the master's (+/- %.3f ms, "
                     "%d exchanges)", cid, est.offset_ns / 1e6, est.rtt_ns / 2e6, est.rounds)
        remote = self.clocks.remote(BOOT_ID)
        if not (remote and wiring and wiring.get("host_only")):
            self.clocks.follow(runner, BOOT_ID)     # and on through the test
            return
        log.error("celery-bench: load generator(s) %s run on another host than the master, "
                  "and %s: use --transport redis or amqp and --backend redis or postgresql at "
                  "addresses every host reaches", ", ".join(remote), wiring["host_only"])
        environment.process_exit_code = 2
        runner.quit()                   # tells the generators to quit; no load has started
        raise gevent.GreenletExit       # out of Locust's start(): no spawn message is sent

    def _start_host_workers(self, environment) -> None:
        """--workers-per-host: this Locust worker's own Celery workers, before its users spawn."""
        wiring = getattr(environment.parsed_options, system.WIRING, None) or {}
        if not wiring.get("per_host"):
            self.host_workers.close()
            return
        try:
            system.check_reachable(wiring)
            self.host_workers.ensure(wiring, environment.runner.client_id)
            self.host_workers.watch_master(environment.runner)
        except (celery_workers.WorkerError, system.Unreachable) as exc:
            log.error("celery-bench: cannot start this host's Celery workers: %s", exc)

    def _record(self, request_type, name, response_time, exception=None, context=None, **kwargs):
        self.book.record(request_type, name, response_time, exception, context)

    def _report(self, client_id, data, **kwargs):
        for name, n in openloop.take(self.environment).items():
            self.book.count(name, n)
        payload = self.book.take()
        for item in payload["rows"]:
            if not item["kind"]:
                key = f"{item['type']} {item['name']}"
                self.sent[key] = self.sent.get(key, 0) + item["requests"]
        data[hdr.KEY] = payload

    def _merge(self, client_id, data, **kwargs):
        payload = data.get(hdr.KEY)
        try:
            added = self.book.merge(payload)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("celery-bench: report from %s not merged: %s", client_id, exc)
            return
        if payload:
            self.generators.reported(client_id, added, payload.get("final"))

    def _send_report(self, environment, final) -> None:
        """A worker's report now, out of turn: Locust's statistics and ours in one ordinary
        ``stats`` message (what Locust's own reporter sends), marked ``final``."""
        runner = environment.runner
        data: dict = {}
        environment.events.report_to_master.fire(client_id=runner.client_id, data=data)
        data.setdefault(hdr.KEY, {"v": hdr.VERSION, "rows": [], "counters": {}})["final"] = final
        runner.send_message("stats", data)

    def _on_final(self, environment, msg, **kwargs):
        """The master asks for this worker's last report: its users stop first (Locust's own
        stop, nothing when they are stopped already), so nothing is recorded after it."""
        environment.runner.stop()
        self._send_report(environment, msg.data.get("token"))

    def _test_stop(self, environment, **kwargs):
        if self.role == "worker":
            self._send_report(environment, True)    # the users are stopped: all there is
            return
        if self.stopped is None:
            self.stopped = time.monotonic()
        if self.role == "master":
            self.clocks.stop()
            self.generators.flush(environment.runner)
            lost = self.generators.text(environment.runner)
            if lost:
                log.warning("celery-bench: %s", lost)
        self._write_results(environment)
        verdict = self._rate(environment)
        if verdict and verdict["rate_shortfall"]:
            log.warning("celery-bench: %s", self._rate_text(environment, verdict))

    def _reset(self, **kwargs):
        if self.role != "worker":
            self.book.reset()
            self.started = time.monotonic()

    def _spawned(self, user_count, **kwargs):
        """``--reset-stats``: Locust forgets the ramp-up when every user is spawned; so do we."""
        env = self.environment
        if env is not None and env.reset_stats:
            self.book.reset()
            self.sent = {}
            self.started = time.monotonic()

    def _quitting(self, environment, **kwargs):
        """Runs after the runner has quit (Locust fires `quitting` in reverse order), so the
        master holds every worker's last report by now."""
        try:
            if self.role == "worker":
                self.host_workers.close()
                self._flush_log()
                return
            runner = environment.runner
            if self.role == "local" and runner is not None:
                # Ctrl-C or SIGTERM mid-test: Locust stops a local runner's users only after
                # `quitting`; stop them first, or they would run on against a stopped broker.
                runner.stop()
            if self.started is not None and self.stopped is None:
                self.stopped = time.monotonic()
            self._write_results(environment)
            self._log_table(environment)
            self._judge(environment)
        finally:
            self.clocks.stop()
            system.close_client(environment)
            self.rig.close()

    # --------------------------------------------------------------------------- reading
    def _live(self) -> hdr.Book:
        if self.role == "local":       # the open loop's counters are read, not reported
            self.book.counters = _add(self.book.counters, openloop.take(self.environment))
        return self.book

    def _elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.stopped or time.monotonic()) - self.started

    def _rate(self, environment) -> dict | None:
        rate = float(arguments.get(environment, "arrival_rate", 0.0) or 0.0)
        if rate <= 0:
            return None
        return openloop.verdict(rate, self._live().counters, self._elapsed())

    def _rate_text(self, environment, v: dict) -> str:
        text = (f"arrival rate {v['rate_target_per_s']:,.0f}/s asked, "
                f"{v['rate_achieved_per_s']:,.1f}/s achieved ({v['started']:,} of {v['due']:,} "
                f"intended starts made)")
        if v["rate_shortfall"]:
            text += (f"; SHORTFALL: the users cannot keep up ({v['behind']:,} starts behind, "
                     f"see the schedule lag rows); add users (-u) or Locust workers")
        return text

    def _common(self, environment) -> dict:
        wiring = self.rig.wiring or {}
        out = {"users": arguments.get(environment, "num_users", None),
               "locust_workers": self.locust_workers,
               "arrival_rate": float(arguments.get(environment, "arrival_rate", 0.0) or 0.0)}
        if wiring.get("app"):
            out["app"] = wiring["app"]
        elif wiring.get("workers") or wiring.get("per_host"):
            per_host = int(wiring.get("per_host") or 0)
            if per_host:
                out["celery_workers_per_host"] = per_host
            out.update(celery_workers=wiring["workers"] + per_host * self.locust_workers,
                       pool=wiring["pool"],
                       concurrency=wiring["concurrency"], backend=wiring["backend"])
        return out

    def _run(self, environment) -> results_file.Run:
        verdict = self._rate(environment)
        rate = None
        if verdict:
            rate = {k: verdict[k] for k in ("rate_target_per_s", "rate_achieved_per_s",
                                            "rate_shortfall", "due", "started", "behind")}
        run = book_results.run(self._live(), self._common(environment), self._elapsed(), rate)
        if self.role == "master":
            runner = environment.runner
            run.environment["generators"] = {
                cid: dict(g, **self.clocks.to_dict(cid))
                for cid, g in self.generators.to_dict(runner).items()}
            lost = self.generators.text(runner)
            for cell in run.cells if lost else ():
                if cell.status == "ok":
                    cell.status = "lost"
                cell.reason = f"{cell.reason}; {lost}" if cell.reason else lost
        return run

    def _write_results(self, environment) -> None:
        out = arguments.get(environment, "results_out", "")
        if not out or not self.book.rows:
            return
        results_file.dump(self._run(environment), out)
        log.info("celery-bench: results written to %s", out)

    def _page_data(self, environment) -> dict:
        book = self._live()
        verdict = self._rate(environment)
        lost = self.generators.text(environment.runner) if self.role == "master" else ""
        text = "; ".join(t for t in (self._rate_text(environment, verdict) if verdict else "",
                                     lost) if t)
        return {"state": environment.runner.state if environment.runner else "",
                "rows": book_results.table(book), "spectrum": book_results.spectrum(book), "rate": text,
                "shortfall": bool(verdict and verdict["rate_shortfall"]) or bool(lost),
                "missing_generators": self.generators.missing(environment.runner)
                if self.role == "master" else []}

    def _log_table(self, environment) -> None:
        rows = book_results.table(self._live())
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
        verdict = self._rate(environment)
        if verdict:
            lines.append(self._rate_text(environment, verdict))
        log.info("celery-bench exact latencies (HdrHistogram):\n%s", "\n".join(lines))

    def _judge(self, environment) -> None:
        p99 = float(arguments.get(environment, "check_p99_us", 0.0) or 0.0)
        ratio = float(arguments.get(environment, "check_fail_ratio", -1.0))
        if p99 <= 0 and ratio < 0:
            return
        failed, passed = checks.judge(self._live(), p99, ratio)
        for line in passed:
            log.info("celery-bench check passed: %s", line)
        for line in failed:
            log.error("celery-bench check FAILED: %s", line)
        if failed:
            environment.process_exit_code = checks.EXIT_CODE

    def _flush_log(self) -> None:
        pending = sum(r.requests for (t, n, kind), r in self.book.rows.items() if not kind)
        total = sum(self.sent.values())
        log.info("celery-bench worker recorded: %s", json.dumps(
            {"sent_to_master": total, "not_sent": pending, "rows": self.sent}, sort_keys=True))


PLUGIN = Plugin()   # the one instance Locust's events call
PLUGIN.listen(events)
