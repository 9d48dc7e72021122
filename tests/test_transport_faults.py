"""Our transports when something dies under a real Celery worker (what the faults scenario
found), and the Kombu-level rules behind the fixes. Real brokers, real workers, real
pipes, no mocks; every wait bounded, every process stopped.

unix: an ack (or reject, qos...) whose connection is gone raises the transport's
connection error, never ``AttributeError``: Celery logs "Couldn't ack" and carries on
(the broker requeued the delivery when the connection ended: at-least-once), and a
failure found by a write reaches the worker's event loop, so it reconnects.

fifo: cancelling a queue's last consumer (Celery's warm shutdown) lets the pipe go, so
publishes made while the worker winds down fail at once instead of being lost.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from kombu import Connection, Consumer, Producer
from kombu.asynchronous import Hub

import transports  # noqa: F401  registers the unix and fifo aliases
from bench import brokers, celery_workers, injection
from bench.celery_app import make_app
from bench.tasks import spans as work
from transports import fifo, unix
from support import celery_children, direct_queue, drain_until, qname

pytestmark = pytest.mark.timeout(300)

WAIT_S = 60.0          # generous bound for what takes well under a second
RECORD = work.RECORD


# --------------------------------------------------------------------------- helpers
def runs(folder: Path) -> dict:
    """bench.faults.work's records under ``folder``: index -> [started, finished] counts."""
    out: dict[int, list[int]] = {}
    for path in folder.glob("*.bin"):
        data = path.read_bytes()
        for off in range(0, len(data) // RECORD.size * RECORD.size, RECORD.size):
            index, _start, end = RECORD.unpack_from(data, off)
            counts = out.setdefault(index, [0, 0])
            counts[1 if end else 0] += 1
    return out


def wait_for(pred, w, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert w.alive(), f"the worker exited while waiting for {what}:\n{w.log_tail(40)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{w.log_tail(40)}"
        time.sleep(0.02)


def started(folder, *indices):
    got = runs(folder)
    return all(got.get(i, [0, 0])[0] >= 1 for i in indices)


def finished(folder, *indices):
    got = runs(folder)
    return all(got.get(i, [0, 0])[1] >= 1 for i in indices)


@pytest.fixture
def nothing_left():
    yield
    assert not celery_workers.running()
    assert celery_children() == []


# --------------------------------------------------------------------------- unix, Kombu
def _one_unacked(conn, q):
    got = []
    consumer = Consumer(conn, [q], callbacks=[lambda b, m: got.append(m)])
    consumer.qos(prefetch_count=1)
    consumer.consume()
    drain_until(conn, lambda: got)
    return consumer, got


def test_ack_reject_and_qos_on_a_closed_channel_are_connection_errors(broker):
    q = direct_queue()
    with Connection(broker.url) as conn:
        Producer(conn).publish("a", exchange=q.exchange, routing_key=q.routing_key,
                               declare=[q])
        consumer, got = _one_unacked(conn, q)
        channel = got[0].channel
        channel.close()   # what Celery's reconnect does to the old channel
        for call in (got[0].ack, lambda: got[0].reject(requeue=True),
                     lambda: channel.basic_qos(0, 5, False)):
            with pytest.raises(conn.connection_errors) as info:
                call()
            assert isinstance(info.value, unix.BrokerConnectionError)
            assert broker.path in str(info.value) and "closed" in str(info.value)
        # The broker put the delivery back when the channel closed: nothing lost.
        got2 = []
        with Consumer(conn.channel(), [q],
                      callbacks=[lambda b, m: (got2.append(b), m.ack())]):
            drain_until(conn, lambda: got2)
        assert got2 == ["a"]


def test_an_ack_from_an_earlier_connection_never_acks_another_message(broker):
    """The same transport reconnected (``ensure_connection``): the broker numbers a new
    connection's deliveries from 1 again, so the old message's tag names the redelivered
    copy. Its ack must fail, not remove that copy."""
    q = direct_queue()
    with Connection(broker.url) as conn:
        Producer(conn).publish("a", exchange=q.exchange, routing_key=q.routing_key,
                               declare=[q])
        consumer, got = _one_unacked(conn, q)
        old = got.pop()
        conn.transport._sock.shutdown(socket.SHUT_RDWR)      # the connection drops
        with pytest.raises(conn.connection_errors):
            conn.drain_events(timeout=WAIT_S)
        conn.ensure_connection(max_retries=3, interval_start=0)
        consumer.revive(conn.default_channel)
        consumer.consume()
        drain_until(conn, lambda: got)                       # "a" again, redelivered
        assert got[0].delivery_info["redelivered"]
        assert got[0].delivery_tag & unix.TAG_MASK == old.delivery_tag & unix.TAG_MASK
        with pytest.raises(conn.connection_errors, match="earlier connection"):
            old.ack()
        consumer.cancel()
    # The redelivered copy was not acked by the stale ack: it is still queued.
    with Connection(broker.url) as conn:
        assert q(conn.default_channel).queue_declare(passive=True).message_count == 1


def test_a_failure_found_by_a_write_reaches_the_event_loop(broker):
    """Celery swallows a failed ack (it logs "Couldn't ack"). The socket is gone by then,
    so no readiness will ever announce it: the loop itself must raise, or the worker
    waits forever on a connection that no longer exists."""
    q = direct_queue()
    got = []
    hub = Hub()
    try:
        with Connection(broker.url) as conn:
            Producer(conn).publish("a", exchange=q.exchange, routing_key=q.routing_key,
                                   declare=[q])
            conn.transport.register_with_event_loop(conn.connection, hub)
            with Consumer(conn, [q], callbacks=[lambda b, m: got.append(m)]):
                loop = hub.create_loop()
                deadline = time.monotonic() + WAIT_S
                while not got and time.monotonic() < deadline:
                    next(loop)
                assert got
                conn.transport._sock.shutdown(socket.SHUT_WR)   # the next write fails
                with pytest.raises(conn.connection_errors):
                    got[0].ack()
                with pytest.raises(conn.connection_errors):
                    for _ in range(5):      # a turn waits at most the hub's 1 s poll
                        next(loop)
    finally:
        hub.close()


# --------------------------------------------------------------------------- unix, Celery
def _acks_late_worker(env, q, out):
    conf = {"task_default_queue": q, "task_ignore_result": True, "task_acks_late": True,
            "worker_prefetch_multiplier": 1}
    app = make_app(env.url, None, env.transport_options, **conf)
    w = celery_workers.worker(env.url, transport_options=env.transport_options, conf=conf,
                       pool="prefork", concurrency=2, queues=[q],
                       env={work.DIR_ENV: str(out)}, loglevel="INFO", stop_timeout=10)
    return app, w


def _assert_survived(w):
    log = w.log_path.read_text(errors="replace")
    assert w.alive(), log[-4000:]
    assert "AttributeError" not in log, log[-4000:]
    assert "Unrecoverable" not in log, log[-4000:]
    # Our connection error reached Celery's ack_log_error: logged, not fatal.
    assert "Couldn't ack" in log and "BrokerConnectionError" in log, log[-4000:]


@pytest.mark.timeout(240)
def test_celery_acks_late_worker_survives_a_unix_broker_restart(tmp_path, nothing_left):
    q = qname("restart")
    out = tmp_path / "runs"
    out.mkdir()
    with brokers.broker("unix", tmp_path) as env:
        app, worker_cm = _acks_late_worker(env, q, out)
        try:
            with worker_cm as w:
                for i in (0, 1):   # both pool processes busy across the restart
                    app.send_task(work.TASK, args=(i, 2.0), queue=q, task_id=f"{q}.{i}")
                wait_for(lambda: started(out, 0, 1), w, "both tasks to start")
                env.restart()
                # They finish after the restart: their acks find the connection gone.
                wait_for(lambda: finished(out, 0, 1), w, "both tasks to finish")
                # The worker reconnected: a task published to the new broker runs.
                app.send_task(work.TASK, args=(2, 0.0), queue=q, task_id=f"{q}.2")
                wait_for(lambda: finished(out, 2), w, "a task published after the restart")
                _assert_survived(w)
        finally:
            app.close()


@pytest.mark.timeout(240)
def test_celery_acks_late_worker_survives_its_connection_dropped(tmp_path, nothing_left):
    q = qname("drop")
    out = tmp_path / "runs"
    out.mkdir()
    with brokers.broker("unix", tmp_path) as env:
        app, worker_cm = _acks_late_worker(env, q, out)
        try:
            with worker_cm as w:
                for i in (0, 1):
                    app.send_task(work.TASK, args=(i, 2.0), queue=q, task_id=f"{q}.{i}")
                wait_for(lambda: started(out, 0, 1), w, "both tasks to start")
                path = env.url[len("unix://"):]
                try:
                    dropped = injection.drop_unix_connections(injection.process_tree(w.pid), path)
                except injection.FaultError as exc:
                    pytest.skip(f"cannot drop the worker's connections here: {exc}")
                assert dropped >= 1
                wait_for(lambda: finished(out, 0, 1), w, "both tasks to finish")
                app.send_task(work.TASK, args=(2, 0.0), queue=q, task_id=f"{q}.2")
                wait_for(lambda: finished(out, 2), w, "a task published after the drop")
                # The broker (alive) requeued the two unacked tasks when the connection
                # ended: they run again on the new one (at-least-once: duplicates).
                wait_for(lambda: all(runs(out).get(i, [0, 0])[1] >= 2 for i in (0, 1)), w,
                         "the requeued tasks to run again")
                _assert_survived(w)
        finally:
            app.close()


# --------------------------------------------------------------------------- fifo, Celery
@pytest.mark.timeout(240)
def test_fifo_publishes_during_a_warm_shutdown_fail_instead_of_being_lost(tmp_path,
                                                                          nothing_left):
    """A worker in warm shutdown (SIGTERM: running tasks finish, then it exits) stops
    reading its pipe at once. Publishes made meanwhile must fail (NoConsumerError), even
    through the write end the publisher already holds, not land in a pipe nobody reads.

    Publishes in the few milliseconds between SIGTERM and the worker's cancel can still
    reach the pipe (what is in it then is lost, and logged by the worker): a pipe accepts
    what is written while a reader holds it. This test is about the seconds after."""
    q = qname("warm")
    out = tmp_path / "runs"
    out.mkdir()
    conf = {"task_default_queue": q, "task_ignore_result": True,
            "task_publish_retry": False, "worker_prefetch_multiplier": 1}
    with brokers.broker("fifo", tmp_path) as env:
        app = make_app(env.url, None, env.transport_options, **conf)
        pipe = Path(unquote(env.url[len("fifo://"):])) / f"{fifo.queue_filename(q)}.fifo"
        sent: list[tuple[int, bool, bool, str]] = []  # index, pipe there, running, error
        try:
            with celery_workers.worker(env.url, transport_options=env.transport_options,
                                conf=conf, pool="prefork", concurrency=2, queues=[q],
                                env={work.DIR_ENV: str(out)}, loglevel="INFO",
                                stop_timeout=30) as w:
                with app.producer_or_acquire() as producer:
                    # Two long tasks: the warm shutdown lasts as long as they run. The
                    # publisher now holds the pipe's write end.
                    for i in (0, 1):
                        app.send_task(work.TASK, args=(i, 3.0), queue=q, producer=producer)
                    wait_for(lambda: started(out, 0, 1), w, "both long tasks to start")
                    w.terminate()                                   # SIGTERM
                    deadline = time.monotonic() + WAIT_S
                    i = 2
                    while w.alive() and time.monotonic() < deadline:
                        # Still winding down: the long tasks have not finished yet.
                        running = not finished(out, 0, 1)
                        there = pipe.exists()
                        error = ""
                        try:
                            app.send_task(work.TASK, args=(i, 0.0), queue=q,
                                          producer=producer)
                        except fifo.NoConsumerError as exc:
                            error = str(exc)
                        sent.append((i, there, running, error))
                        i += 1
                        time.sleep(0.02)
                    assert not w.alive(), "the warm shutdown did not end"
                    code = w.stop(0)
                assert code == 0, w.log_tail(40)
        finally:
            app.close()
    got = runs(out)
    assert all(got.get(i, [0, 0])[1] == 1 for i in (0, 1)), got   # the warm shutdown
    accepted = [s for s in sent if not s[3]]
    lost = [s[0] for s in accepted if got.get(s[0], [0, 0])[1] == 0]
    during = [s for s in sent if not s[1] and s[2]]   # pipe let go, tasks still running
    assert during, (f"the worker held its pipe while its running tasks finished: "
                    f"{len(accepted)} of {len(sent)} publishes accepted, {len(lost)} lost")
    assert all(s[3] and "no consumer attached" in s[3] for s in sent if not s[1]), sent
    # Only publishes made before the worker let go of the pipe can have been accepted
    # (and, of those, lost: the milliseconds after SIGTERM).
    assert all(s[1] for s in accepted), (accepted, lost)
