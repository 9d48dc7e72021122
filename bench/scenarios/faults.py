"""Scenario ``faults``: what happens to my tasks when something dies?

Per transport (unix, fifo, redis, amqp), ack mode (early ack, ``task_acks_late``)
and fault, a real worker (``celery worker --pool prefork -c 2``, the pool most
deployments run; Celery's defaults otherwise: prefetch multiplier 4, so up to 8
tasks reserved, the running ones in pool children) runs a stream of tasks that
take a little time (``bench.faults.work``: 20 ms asleep; ``--task-seconds``),
published by a thread of this process with ``send_task`` at a modest open-loop
rate (50/s, half of what the worker can run; ``--rate``) for 5 s (3 s quick;
``--duration``). One fault hits a third into the stream, halfway between two
sends (``fault_at_s``):

``worker-kill``
    SIGKILL to the worker's process group (the worker and its pool children die
    at once, as when a container or host dies); a replacement worker is started
    at once, as a supervisor would.
``warm-shutdown``
    SIGTERM (Celery's warm shutdown: running tasks finish, then it exits; SIGKILL
    after 10 s); the replacement starts once it has exited (a deploy).
``broker-restart``
    A graceful stop and a start at the same address of a broker the harness
    owns: our unix broker (queues in memory: a restart loses them), a private
    ``redis-server`` on a free loopback port (SIGTERM: it saves its snapshot and
    loads it back). RabbitMQ or a user's own broker only with ``--restart-cmd``
    (and ``--start-cmd`` when that only stops it); otherwise skipped. The worker
    stays and must reconnect.
``connection-drop``
    The worker's own broker connections end, the worker stays: unix: shut down
    from outside (``pidfd_getfd``); redis: ``CLIENT KILL`` on the private server;
    amqp: ``rabbitmqctl close_connection`` for exactly the worker's connections.
    fifo has neither a broker nor a connection: both cells are skipped.

Publishing goes on past the stream until a task received after the fault has
run for 1 s (at most 10 s after the fault). A worker that exits by itself (a
crash after the fault) is started again, as a supervisor would, and counted
(``worker_exits``, its last error line in the notes). Then a bounded observation
window (until every task ran, or nothing ran for 3 s and nothing ready is
queued; at most 12 s, 6 s quick), a short warm stop of the idle worker, and
every task is accounted for by its sequence number: ran once, ran more than
once (``duplicates``: extra runs), ``pending`` (still queued, or invisible:
redis's unacked hash), or ``lost`` (none of those). ``interrupted``: tasks that
started and never finished anywhere; ``held_after_run``: tasks that ran but the
broker still holds (their ack was lost: they will run again). ``recovery_s``:
fault -> the first task start by a worker that received it after the fault
(the replacement worker; for broker faults, a task published after the fault).
``publish_errors``: ``send_task`` calls that raised (those tasks are not counted
as sent; one that ran all the same is ``ran_unconfirmed``). Redis's unacked
tasks come back only ``visibility_timeout`` after their delivery
(``returns_after_s``, from the fault), then at a restore sweep (~100 s apart) or
when a worker starts; a cell may carry ``visibility_timeout`` (seconds) to see
them come back.

``lost`` > 0 makes the cell ``lost``: the fault's doing (early ack, a broker
without persistence, a pipe), counted, never hidden. What the cells show (Celery 5.7,
Kombu 5.7, with machine and date): docs/faults.md.

One injection per cell: with ``--quick`` and no ``--repeat`` the runner's three
interleaved rounds are skipped (no ratios between cells to pair); ``--repeat N``
injects N times and adds the counts up.
"""
from __future__ import annotations

import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kombu import Queue

from .. import brokers, celery_workers, children, config, injection, recorder
from ..cleanup import delete_queues
from ..celery_app import make_app
from ..tasks import spans as work
from . import Outcome, Scenario, Skip, _celery, register
from ._fault_account import account
from ._fault_stream import Publisher, Runs, task_index

FAULTS = ("worker-kill", "warm-shutdown", "broker-restart", "connection-drop")
WORKER_FAULTS = ("worker-kill", "warm-shutdown")
TASK = work.TASK
TASK_S = 0.02              # each task sleeps this long (--task-seconds)
RATE = 50.0                # tasks/s published, open loop (--rate): half of what -c 2 runs
STREAM_S, STREAM_S_QUICK = 5.0, 3.0     # publishing, fault a third in (--duration)
FAULT_AT = 1 / 3
POOL, CONCURRENCY = "prefork", 2
WARMUP = 10                # tasks run (and waited for) before the stream
IDLE_S = 3.0               # nothing ran this long and nothing ready is queued: stop watching
OBSERVE_S, OBSERVE_S_QUICK = 12.0, 6.0  # most the window lasts after the stream
WARM_SHUTDOWN_S = 10.0     # a warm shutdown this long is cut with SIGKILL
STOP_S = 1.0               # the (idle) worker's warm stop at the end, then SIGKILL
TAIL_S = 1.0               # publishing goes on this long after the first task received
MAX_AFTER_S = 10.0         # after the fault has run, at most this long after the fault
MAX_RESTARTS = 2           # a worker that exits by itself is started again this often
POLL_S = 0.05
SIZE_EVERY_S = 0.5         # how often the window asks the broker for its ready count
# Seconds a restore sweep may take after redis's tasks become visible, when a cell waits
# for them (a cell with a short visibility_timeout): sweeps every unacked_restore_interval.
RESTORE_SLACK_S = 3.0

SUMMARY = [   # `sent` (~250 a cell), `interrupted`, `running_at_fault`... are in the JSON
    ("lost", "lost"),
    ("duplicates", "dup"),
    ("pending", "pending"),
    ("recovery_s", "recovery s"),
    ("returns_after_s", "back in s"),
    ("publish_errors", "pub err"),
    ("worker_exits", "crashes"),
]

DESCRIPTION = (
    "What happens to my tasks when something dies: a prefork -c 2 worker (prefetch x4) runs "
    "20 ms tasks published at 50/s for 5 s (3 s quick) while one fault hits a third in: "
    "worker-kill (SIGKILL to its process group; a replacement starts at once), "
    "warm-shutdown (SIGTERM; replacement after it exits), broker-restart (our unix broker, "
    "a private redis-server; RabbitMQ only with --restart-cmd), connection-drop (the "
    "worker's broker connections end). Per transport and ack mode: every task accounted "
    "for by sequence number: lost, duplicates (extra runs), pending (queued, or invisible "
    "in redis's unacked hash until visibility_timeout), recovery_s (fault -> first task "
    "run by a worker that received it after the fault), publish errors, worker crashes "
    "(restarted as a supervisor would). Opt-in: `celery-bench run faults`.")


def _cell(transport: str, acks_late: bool, fault: str) -> dict:
    return {"transport": transport, "acks_late": acks_late, "fault": fault}


def _owned_restart(transport: str) -> bool:
    """Does the harness start this transport's broker itself (so it may restart it)? The
    embedded ones (their environment says how, ``BrokerEnv.restart``), and those this
    scenario runs on a private server (:func:`bench.injection.private_server`)."""
    return injection.runs_privately(transport) or brokers.info(transport).service is None


# --------------------------------------------------------------------------- one cell's rig
@dataclass
class _FaultCell:
    params: dict
    stack: ExitStack
    folder: Path
    env: brokers.BrokerEnv = None
    server: injection.RedisServer | None = None
    app: object = None
    queue: str = ""
    tag: str = ""
    conf: dict = field(default_factory=dict)
    runs: Runs = None
    procs: dict = field(default_factory=dict)   # gen -> Worker
    live: object = None                          # the worker that should be running
    exits: list = field(default_factory=list)    # workers that exited by themselves

    @property
    def transport(self) -> str:
        return self.params["transport"]


@register
class Faults(Scenario):
    name = "faults"
    description = DESCRIPTION
    summary = SUMMARY
    opt_in = True   # minutes, and its losses are findings: `celery-bench run faults`

    def __init__(self, opts):
        super().__init__(opts)
        # One injection per cell under --quick unless --repeat asks for more: the rounds
        # the runner interleaves pair ratios, and a fault cell has none.
        self.deterministic = bool(opts.quick and not opts.repeat)

    # ----------------------------------------------------------------------- the matrix
    def _transports(self) -> list[str]:
        opts = self.opts
        if opts.transports:
            return [t for t in opts.transports if brokers.info(t).cross_process]
        chosen = [t for t in brokers.available() if t.cross_process and not t.slow
                  and (t.service is None or not opts.quick)]
        # Ours first (no server needed), then the servers.
        return [t.name for t in sorted(chosen, key=lambda t: t.service is not None)]

    def cells(self) -> list[dict]:
        opts = self.opts
        if opts.start_cmd is not None and not opts.restart_cmd:
            raise config.UsageError("--start-cmd needs --restart-cmd (the command that "
                                    "stops or restarts the broker)")
        for flag, value in (("--restart-cmd", opts.restart_cmd),
                            ("--start-cmd", opts.start_cmd)):
            if value is not None and not value.strip():
                raise config.UsageError(f"{flag} is empty: give the shell command, e.g. "
                                        f"{flag} 'rabbitmqctl stop_app'")
        return [_cell(t, acks_late, fault) for t in self._transports()
                for acks_late in (False, True) for fault in FAULTS]

    def requires(self, params: dict) -> set[str]:
        if injection.runs_privately(params.get("transport")):
            return set()   # a private server (redis-server), never the shared one
        return brokers.services(params.get("transport"))

    # ----------------------------------------------------------------------- refusals
    def _why_not(self, params) -> str | None:
        transport, fault = params["transport"], params["fault"]
        if fault not in FAULTS:
            return f"fault {fault!r} is not one of {', '.join(FAULTS)}"
        reason = _celery.unusable(transport)
        if reason:
            return reason
        t = brokers.info(transport)
        reason = injection.private_unavailable(transport)
        if reason:
            return reason
        if "ack" not in t.capabilities and fault in ("broker-restart", "connection-drop"):
            return (f"{transport} has no broker and no connection: a queue is a named pipe "
                    f"its consumer holds, so there is nothing to restart or drop (the worker "
                    f"detaching is what worker-kill and warm-shutdown measure)")
        if fault == "broker-restart" and not _owned_restart(transport) \
                and not self.opts.restart_cmd:
            return (f"broker-restart on {transport}: the harness restarts only brokers it "
                    f"started (our unix broker, a private redis-server); give --restart-cmd "
                    f"(and --start-cmd if it only stops the broker) to restart yours")
        if fault == "connection-drop":
            reason = injection.drop_unavailable(transport)
            if reason:
                return f"connection-drop on {transport}: {reason}"
        return None

    # ----------------------------------------------------------------------- setup
    def _open(self, params, stack: ExitStack, folder: Path) -> _FaultCell:
        opts = self.opts
        rig = _FaultCell(dict(params), stack, folder)
        transport = rig.transport
        server = injection.private_server(transport, folder / "broker")
        if server is None:
            rig.env = stack.enter_context(brokers.broker(transport, folder))
        else:
            stack.callback(server.stop)
            server.start()
            with brokers.broker(transport, folder) as shared:   # the transport's own options
                options = dict(shared.transport_options)
            if params.get("visibility_timeout") is not None:
                # A short one, to see the unacked tasks come back within the cell.
                options.update(server.visibility_options(float(params["visibility_timeout"])))
            rig.server = server
            rig.env = brokers.BrokerEnv(server.url, options, restart=server.restart)
        rig.tag = uuid.uuid4().hex[:12]
        rig.queue = f"bench.faults.{rig.tag}"
        rig.conf = {"task_default_queue": rig.queue, "task_ignore_result": True,
                    "task_acks_late": bool(params["acks_late"])}
        rig.app = make_app(rig.env.url, None, rig.env.transport_options, **rig.conf)
        stack.callback(rig.app.close)
        stack.callback(delete_queues, rig.env, [rig.queue])
        rig.runs = Runs(folder / "runs")
        rig.runs.folder.mkdir(mode=0o700)
        return rig

    def _start_worker(self, rig: _FaultCell, gen: int):
        opts = self.opts
        out = rig.runs.folder / str(gen)
        out.mkdir(mode=0o700)
        with _celery.worker_failures():
            w = celery_workers.start(rig.env.url, transport_options=rig.env.transport_options,
                              conf=rig.conf, pool=opts.pool or POOL,
                              concurrency=opts.concurrency or CONCURRENCY, queues=[rig.queue],
                              env={work.DIR_ENV: str(out)}, loglevel="WARNING")
            rig.stack.callback(w.stop, STOP_S)
            rig.procs[gen] = w
            rig.live = w
            w.wait_ready(opts.timeout)
        return w

    def _warm_up(self, rig: _FaultCell, w) -> None:
        """WARMUP tasks through the worker (its pool children started and consuming)."""
        deadline = time.monotonic() + self.opts.timeout
        for i in range(WARMUP):
            rig.app.send_task(TASK, args=(-1 - i, 0.0), queue=rig.queue,
                              task_id=f"{rig.tag}.w{i}", ignore_result=True)
        while True:
            rows = rig.runs.read()
            if ((rows[:, 1] < 0) & (rows[:, 3] > 0)).sum() >= WARMUP:
                return
            _celery.check_alive([w])
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out waiting for {WARMUP} warm-up tasks")
            time.sleep(POLL_S)

    # ----------------------------------------------------------------------- the faults
    def _inject(self, rig: _FaultCell, fault: str, info: dict) -> int:
        """Inject ``fault``; returns its instant (perf_counter ns). Fills ``info``."""
        now = recorder.now_ns
        w = rig.procs[1]
        if fault == "worker-kill":
            t = now()
            try:
                children.kill_group(w.pid, missing_ok=False)   # with its pool children
            except ProcessLookupError:
                raise injection.FaultError("the worker was gone before the fault") from None
            w.stop(0.0)                            # reap it
            info["inject_s"] = (now() - t) / 1e9
            return t
        if fault == "warm-shutdown":
            t = now()
            code = w.stop(WARM_SHUTDOWN_S)         # SIGTERM; SIGKILL only past the bound
            info["shutdown_s"] = (now() - t) / 1e9
            info["shutdown_killed"] = code is not None and code < 0
            return t
        if fault == "broker-restart":
            return self._restart_broker(rig, info)
        return self._drop_connections(rig, w, info)

    def _restart_broker(self, rig: _FaultCell, info: dict) -> int:
        now = recorder.now_ns
        opts = self.opts
        if rig.env.restart is not None:
            t = now()
            rig.env.restart()
            info["down_s"] = (now() - t) / 1e9
            return t
        # A broker the harness did not start: the user's commands, bounded in time.
        t = now()
        injection.run_command(opts.restart_cmd, opts.timeout, "--restart-cmd")
        if opts.start_cmd:
            injection.run_command(opts.start_cmd, opts.timeout, "--start-cmd")
        self._wait_reachable(rig)
        info["down_s"] = (now() - t) / 1e9
        return t

    def _wait_reachable(self, rig: _FaultCell) -> None:
        deadline = time.monotonic() + self.opts.timeout
        last = None
        while time.monotonic() < deadline:
            try:
                with rig.env.connection(connect_timeout=2) as conn:
                    conn.ensure_connection(max_retries=1)
                    return
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        raise injection.FaultError(f"the broker did not come back within {self.opts.timeout:g} s "
                                f"after --restart-cmd/--start-cmd: {last}")

    def _drop_connections(self, rig: _FaultCell, w, info: dict) -> int:
        now = recorder.now_ns
        pids = injection.process_tree(w.pid)
        t0 = now()
        try:
            dropped = injection.drop_connections(rig.transport, rig.env.url, rig.server, pids,
                                              self.opts.timeout)
        except injection.FaultError as exc:   # the kernel or rabbitmqctl refused: not here
            raise Skip(f"connection-drop on {rig.transport}: {exc}") from None
        # The instant the connections are gone (rabbitmqctl takes ~1 s to return).
        t = now()
        info["inject_s"] = (t - t0) / 1e9
        if not dropped:
            raise injection.FaultError(f"no connection of the worker (pids {pids}) to the broker "
                                    f"was found to drop")
        info["connections_dropped"] = dropped
        return t

    # ----------------------------------------------------------------------- watching
    def _ready_count(self, rig: _FaultCell) -> int | None:
        """Messages ready in the queue now (None when the broker cannot say)."""
        if "ack" not in brokers.info(rig.transport).capabilities:
            return None   # a pipe: only its consumer could say
        try:
            with rig.env.connection(connect_timeout=1) as conn:
                channel = conn.default_channel
                return channel.queue_declare(rig.queue, passive=True).message_count
        except Exception:
            return None

    def _supervise(self, rig: _FaultCell) -> None:
        """A worker that exited by itself is started again, as a supervisor would (at most
        MAX_RESTARTS times a cell); its exit code and last error line are kept."""
        live = rig.live
        if live is None or live.alive():
            return
        code = live.stop(0.0)
        rig.exits.append(f"worker {live.hostname} exited (code {code}): "
                         f"{_last_error(live.log_tail(40))}")
        if len(rig.exits) > MAX_RESTARTS:
            rig.live = None
            return
        self._start_worker(rig, max(rig.procs) + 1)

    def _recovered(self, rig: _FaultCell, pub: Publisher, rows, t_fault: int) -> int | None:
        """When a worker first started a task it received after the fault (ns), or None:
        a replacement worker's first task (worker faults), else the first start of a task
        published after the fault."""
        if rig.params["fault"] in WORKER_FAULTS:
            after = rows[rows[:, 0] >= 2]
        else:
            attempted = pub.attempted
            fresh = np.flatnonzero(pub.called[:attempted] >= t_fault)
            after = rows[np.isin(rows[:, 1], fresh) & (rows[:, 2] >= t_fault)]
        return int(after[:, 2].min()) if len(after) else None

    def _publish_through(self, rig: _FaultCell, pub: Publisher, t_fault: int,
                         stream_end: int) -> None:
        """Keep publishing to the end of the stream, and past it until a task received
        after the fault has run for TAIL_S (at most MAX_AFTER_S after the fault)."""
        limit = t_fault + int(min(MAX_AFTER_S, self.opts.timeout) * 1e9)
        while pub.is_alive():
            now = recorder.now_ns()
            rows = rig.runs.read()
            rows = rows[rows[:, 1] >= 0]
            back = self._recovered(rig, pub, rows, t_fault)
            if now >= stream_end and (now >= limit or
                                      (back is not None and now >= back + TAIL_S * 1e9)):
                break
            self._supervise(rig)
            time.sleep(POLL_S)
        pub.stop()

    def _observe(self, rig: _FaultCell, pub: Publisher, invisible_due: float | None) -> str:
        """After the stream: wait until every published task ran, or nothing runs any more
        and nothing ready is queued (or the window is over). Returns why it stopped."""
        opts = self.opts
        start = time.monotonic()
        end = start + min(OBSERVE_S_QUICK if opts.quick else OBSERVE_S, opts.timeout)
        if invisible_due is not None:   # a short visibility_timeout: wait for the return
            end = max(end, min(start + opts.timeout, invisible_due + RESTORE_SLACK_S))
        wanted = np.flatnonzero(pub.ok[:pub.attempted])
        last_done, changed, next_size, ready = -1, start, 0.0, None
        while True:
            rows = rig.runs.read()
            done = rows[(rows[:, 1] >= 0) & (rows[:, 3] > 0)]
            if np.isin(wanted, done[:, 1]).all():
                return "every published task ran"
            now = time.monotonic()
            if len(done) != last_done:
                last_done, changed = len(done), now
            if now >= next_size:
                ready, next_size = self._ready_count(rig), now + SIZE_EVERY_S
            if now - changed >= IDLE_S and not ready and \
                    (invisible_due is None or now > invisible_due + RESTORE_SLACK_S):
                return f"nothing ran for {IDLE_S:g} s" + \
                    (" and nothing was ready in the queue" if ready == 0 else "")
            if now >= end:
                return f"the window ({end - start:.0f} s after the stream) was over"
            self._supervise(rig)
            if rig.live is None:
                return "the worker kept exiting"
            time.sleep(POLL_S)

    # ----------------------------------------------------------------------- what is left
    def _visibility_timeout(self, rig: _FaultCell) -> float:
        return float(rig.env.transport_options.get("visibility_timeout",
                                                   rig.server.visibility_default()))

    def _leftovers(self, rig: _FaultCell) -> dict:
        """Task indices the broker still holds, by where (``queued``, ``invisible``), and
        when a private server's invisible ones become visible again (``visible_at``)."""
        if rig.server is not None:
            return rig.server.held(rig.queue, self._visibility_timeout(rig), task_index)
        out = {"queued": set(), "invisible": set(), "visible_at": {}}
        transport = rig.transport
        if "ack" not in brokers.info(transport).capabilities:
            return out   # a pipe holds nothing once its consumer left
        deadline = time.monotonic() + 10.0
        try:
            with rig.env.connection(connect_timeout=3) as conn:
                queue = Queue(rig.queue, no_declare=True)(conn.default_channel)
                while time.monotonic() < deadline:
                    message = queue.get(no_ack=True)
                    if message is None:
                        break
                    idx = task_index((message.headers or {}).get("id"))
                    if idx is not None:
                        out["queued"].add(idx)
        except Exception:   # the queue is gone (a broker restart without persistence)
            pass
        return out

    # ----------------------------------------------------------------------- one cell
    def measured_loss(self, params) -> str:
        # What a fault costs is this scenario's finding, not a broken run: the run exits 0
        # and the gate's loss rule passes these cells, saying why.
        return f"the loss this cell measures: {params.get('fault')} with " \
               f"acks_late={params.get('acks_late')}"

    def run_cell(self, params) -> Outcome:
        reason = self._why_not(params)
        if reason:
            raise Skip(reason)
        opts = self.opts
        fault = params["fault"]
        rate = float(opts.rate or RATE)
        task_s = float(opts.task_seconds if opts.task_seconds is not None else TASK_S)
        stream_s = float(opts.duration or (STREAM_S_QUICK if opts.quick else STREAM_S))
        cap = max(3, round(rate * (stream_s + min(MAX_AFTER_S, opts.timeout) + 1)))
        with self.cell_folder() as folder, ExitStack() as stack:
            rig = self._open(params, stack, folder)
            if fault == "broker-restart" and rig.env.restart is None and not opts.restart_cmd:
                raise Skip(f"broker-restart on {rig.transport}: its broker environment has no "
                           f"restart; give --restart-cmd (and --start-cmd) to restart it")
            first = self._start_worker(rig, 1)
            self._warm_up(rig, first)
            pub = Publisher(rig.app, rig.queue, rig.tag, cap, rate, task_s)
            stack.callback(pub.stop)
            t0 = recorder.now_ns()
            stream_end = t0 + int(stream_s * 1e9)
            # Halfway between two sends, a third into the stream: not in a publish's shadow.
            fault_due = t0 + int((round(stream_s * FAULT_AT * rate) + 0.5) / rate * 1e9)
            pub.start_at(t0)
            info: dict = {}
            time.sleep(max(0.0, (fault_due - recorder.now_ns()) / 1e9))
            t_fault = self._inject(rig, fault, info)
            wall_fault = time.time() - (recorder.now_ns() - t_fault) / 1e9
            if fault in WORKER_FAULTS:
                self._start_worker(rig, 2)       # at once, as a supervisor would
                info["replacement_ready_s"] = (recorder.now_ns() - t_fault) / 1e9
            self._publish_through(rig, pub, t_fault, stream_end)
            info["stream_s"] = (recorder.now_ns() - t0) / 1e9
            invisible_due = None
            if params.get("visibility_timeout") is not None and rig.server is not None:
                invisible_due = time.monotonic() + float(params["visibility_timeout"]) - \
                    (time.time() - wall_fault)
            why = self._observe(rig, pub, invisible_due)
            if rig.live is not None:   # idle by now: a short warm shutdown, then SIGKILL
                _celery.stop_quickly([rig.live], STOP_S)
            rows = rig.runs.read()
            left = self._leftovers(rig)
            return account(rig, pub, rows, left, t_fault, wall_fault, info, why,
                           self._recovered(rig, pub, rows, t_fault),
                           self._visibility_timeout(rig) if rig.server is not None else None)

def _last_error(log: str) -> str:
    """The line of a worker's log that says why it stopped (or its last line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if "CRITICAL" in line or "Unrecoverable" in line or "Error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "(empty log)"
