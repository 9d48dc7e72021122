"""The fifo transport: what a named pipe can do, enforced; many producers, one consumer;
the event loop; a real Celery worker. No broker, no mocks: real pipes, real processes."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue, binding
from kombu.asynchronous import Hub

import transports  # noqa: F401  registers the fifo alias
from bench import brokers
from transports import fifo, framing
from support import child, drain_until, qname

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # generous bound for anything that should take milliseconds


@pytest.fixture
def env(tmp_path):
    with brokers.broker("fifo", tmp_path) as e:
        yield e


CONSUMER_CHILD = """
import sys, time, transports
from kombu import Connection, Queue
with Connection(sys.argv[1]) as c:
    with c.Consumer([Queue(sys.argv[2])], callbacks=[lambda b, m: None]):
        print("ready", flush=True)
        time.sleep(60)
"""


# --------------------------------------------------------------------------- the environment
def test_broker_env_is_a_private_folder_removed_after(tmp_path):
    assert {"ack", "requeue", "multi_consumer"}.isdisjoint(brokers.info("fifo").capabilities)
    with brokers.broker("fifo", tmp_path) as e:
        folder = Path(Connection(e.url).transport.directory)
        assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700
        assert e.url.startswith("fifo:///") and brokers.info("fifo").cross_process
    assert not folder.exists()


@pytest.mark.parametrize("url", ["fifo://", "fifo:///", "fifo://somehost/dir"])
def test_url_must_name_an_absolute_directory(url):
    with pytest.raises(fifo.FifoError, match="absolute directory"):
        Connection(url).connect()


@pytest.mark.parametrize("opts", [{"write_timeout": "soon"}, {"pipe_size": -1}])
def test_bad_transport_options_say_which(env, opts):
    (name,) = opts
    with pytest.raises(fifo.FifoError, match=f"option {name}="):
        Connection(env.url, transport_options=opts).connect()


def test_shared_directory_is_refused(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    with Connection(f"fifo://{folder}") as c:
        with pytest.raises(fifo.FifoError, match="writable by group or others"):
            c.Consumer([Queue("x")]).consume()


# --------------------------------------------------------------------------- honest limits
def test_publish_without_consumer_fails_fast(env):
    q = qname()
    with env.connection() as c:
        with pytest.raises(fifo.NoConsumerError, match=f"no consumer attached to fifo queue '{q}'"):
            # retry=True: kombu must not retry an error that reconnecting cannot cure.
            Producer(c).publish({"x": 1}, routing_key=q, serializer="json", retry=True)


def test_publish_waits_up_to_publish_timeout_for_a_consumer(env):
    q, got = qname(), []
    with env.connection() as cons_conn, Connection(
            env.url, transport_options={"publish_timeout": WAIT_S}) as prod_conn:
        def attach_later():
            time.sleep(0.3)
            cons_conn.Consumer([Queue(q)], callbacks=[lambda b, m: got.append(b)]).consume()
        t = threading.Thread(target=attach_later)
        t.start()
        Producer(prod_conn).publish({"late": True}, routing_key=q, serializer="json")
        t.join()
        drain_until(cons_conn, lambda: got)
    assert got == [{"late": True}]


def test_second_consumer_process_is_refused(env):
    q = qname()
    with env.connection() as c:
        c.Consumer([Queue(q)]).consume()
        p = child(CONSUMER_CHILD, env.url, q)
        out, err = p.communicate(timeout=WAIT_S)
    assert p.returncode != 0 and "ready" not in out
    assert "QueueBusyError" in err and f"(pid {os.getpid()})" in err


def test_second_consumer_connection_in_one_process_is_refused(env):
    q = qname()
    with env.connection() as a, env.connection() as b:
        a.Consumer([Queue(q)]).consume()
        with pytest.raises(fifo.QueueBusyError, match="already consumed"):
            b.Consumer([Queue(q)]).consume()


def test_a_killed_consumer_leaves_nothing_that_accepts_messages(env):
    q = qname()
    p = child(CONSUMER_CHILD, env.url, q)
    try:
        assert p.stdout.readline().strip() == "ready"
        with env.connection() as prod:
            producer = Producer(prod)
            producer.publish({"n": 1}, routing_key=q, serializer="json")  # caches its write end
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=WAIT_S)
            with pytest.raises(fifo.NoConsumerError):
                producer.publish({"n": 2}, routing_key=q, serializer="json")
            # The stale FIFO and lock are taken over by the next consumer.
            got = []
            with env.connection() as cons:
                cons.Consumer([Queue(q)], callbacks=[lambda b, m: got.append(b)]).consume()
                producer.publish({"n": 3}, routing_key=q, serializer="json")
                drain_until(cons, lambda: got)
            assert got == [{"n": 3}]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=WAIT_S)


def test_forked_child_does_not_keep_the_pipe_alive(env):
    q = qname()
    with env.connection() as prod:
        producer = Producer(prod)
        cons = env.connection()
        cons.Consumer([Queue(q)]).consume()
        producer.publish({"n": 1}, routing_key=q, serializer="json")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a prefork pool child, say: it must not hold the parent's pipe
            os.write(w, b"1")  # the at-fork hook has run by the time fork() returns here
            time.sleep(10)
            os._exit(0)
        os.close(w)
        try:
            assert os.read(r, 1) == b"1"
            os.close(r)
            cons.release()  # the consumer leaves; only the child could still hold the pipe
            with pytest.raises(fifo.NoConsumerError):
                producer.publish({"n": 2}, routing_key=q, serializer="json")
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_size_and_purge_from_the_consumer(env):
    q = qname()
    with env.connection() as cons, env.connection() as prod:
        cons.Consumer([Queue(q)]).consume()
        for i in range(5):
            Producer(prod).publish({"i": i}, routing_key=q, serializer="json")
        ch = cons.default_channel
        assert ch.queue_declare(q, passive=True).message_count == 5
        assert ch.queue_purge(q) == 5
        assert ch.queue_declare(q, passive=True).message_count == 0
        # A process that does not consume the queue cannot see inside the pipe.
        assert prod.default_channel.queue_declare(q).message_count == 0


def test_publishing_to_a_queue_this_process_consumes_never_deadlocks(env):
    q, got = qname(), []
    small = {"pipe_size": 65536}
    with Connection(env.url, transport_options=small) as cons, env.connection() as prod:
        cons.Consumer([Queue(q)], callbacks=[lambda b, m: got.append(b)]).consume()
        producer = Producer(prod)
        for i in range(3000):  # ~1 MB into a 64 KiB pipe, nobody draining meanwhile
            producer.publish({"i": i, "pad": "p" * 250}, routing_key=q, serializer="json")
        drain_until(cons, lambda: len(got) == 3000)
    assert [b["i"] for b in got] == list(range(3000))


def test_requeue_redelivers_in_the_consuming_process(env):
    q, got = qname(), []
    with env.connection() as cons, env.connection() as prod:
        cons.Consumer([Queue(q)], callbacks=[lambda b, m: got.append(m)]).consume()
        Producer(prod).publish({"a": 1}, routing_key=q, serializer="json")
        drain_until(cons, lambda: got)
        got.pop().requeue()
        drain_until(cons, lambda: got)
        assert got[0].payload == {"a": 1} and got[0].delivery_info["redelivered"] is True


# --------------------------------------------------------------------------- frames
def test_bodies_of_every_size_arrive_intact(env):
    q, got = qname(), []
    sizes = ([0, 1, 100] + list(range(fifo.MAX_WHOLE - 400, fifo.MAX_WHOLE + 64, 13))
             + [fifo.CHUNK_DATA * k + d for k in (1, 2, 3) for d in (-1, 0, 1)]
             + [1 << 20, 3 << 20])
    with env.connection() as cons, env.connection() as prod:
        cons.Consumer([Queue(q)], callbacks=[lambda b, m: got.append(m.body)],
                      accept=["application/data"]).consume()
        sent = [os.urandom(n) for n in sizes]

        def publish_all():  # from a thread: more than a pipe holds, so the consumer must run
            producer = Producer(prod)
            for body in sent:
                producer.publish(body, routing_key=q, content_type="application/data",
                                 content_encoding="binary")
        t = threading.Thread(target=publish_all)
        t.start()
        drain_until(cons, lambda: len(got) == len(sent))
        t.join(WAIT_S)
    assert got == sent


def test_body_travels_raw_not_base64(env):
    q = qname()
    with env.connection() as cons, env.connection() as prod:
        cons.default_channel.basic_consume(q, True, lambda m: None, "tag")
        Producer(prod).publish({"plain": "text-in-frame"}, routing_key=q, serializer="json")
        inbox = cons.transport._inboxes[q]
        data = os.read(inbox.rfd, 65536)
    reader = framing.FrameReader()
    reader.feed(data)
    (payload,) = reader.frames()
    message = framing.decode_message(payload)
    assert json.loads(message["body"]) == {"plain": "text-in-frame"}
    assert message["properties"].get("body_encoding") is None
    assert b"text-in-frame" in data


def test_fragments_of_a_dead_producer_are_dropped(env):
    q, got = qname(), []
    with env.connection() as cons, env.connection() as prod:
        cons.Consumer([Queue(q)], callbacks=[lambda b, m: got.append(b)]).consume()
        Producer(prod).publish({"warm": 1}, routing_key=q, serializer="json")
        drain_until(cons, lambda: got)
        fd = prod.transport._outboxes[q]
        sid = b"deadbeef"
        first = bytes([fifo.CHUNK]) + sid + bytes([1]) + b"x" * 100        # first, never last
        tail = bytes([fifo.CHUNK]) + b"orphan!!" + bytes([2]) + b"y" * 100  # last, never first
        os.write(fd, framing.frame(first) + framing.frame(tail))
        Producer(prod).publish({"after": 1}, routing_key=q, serializer="json")
        drain_until(cons, lambda: len(got) == 2)
        assert got == [{"warm": 1}, {"after": 1}]
        assert cons.default_channel.queue_declare(q, passive=True).message_count == 0


# --------------------------------------------------------------------------- many producers
N_PRODUCERS, PER_PRODUCER, BIG_EVERY = 4, 25_000, 97


def _produce(url, q, index, count, big_every):
    with Connection(url, transport_options={"write_timeout": 120}) as c:
        producer = Producer(c.channel())
        for seq in range(count):
            pad = ("%d-%d;" % (index, seq)) * (1200 if seq % big_every == 0 else 4)
            body = {"p": index, "s": seq, "pad": pad,
                    "h": hashlib.sha1(pad.encode()).hexdigest()}
            producer.publish(body, routing_key=q, serializer="json")


def test_four_producer_processes_deliver_exactly_once(env):
    q = qname("many")
    seen = [bytearray(PER_PRODUCER) for _ in range(N_PRODUCERS)]
    stats = {"n": 0, "dup": 0, "bad": 0, "big": 0}

    def on_message(body, message):
        stats["n"] += 1
        if hashlib.sha1(body["pad"].encode()).hexdigest() != body["h"]:
            stats["bad"] += 1
        if len(body["pad"]) > fifo.PIPE_BUF:
            stats["big"] += 1
        row = seen[body["p"]]
        if row[body["s"]]:
            stats["dup"] += 1
        row[body["s"]] = 1

    ctx = multiprocessing.get_context("fork")
    with env.connection() as cons:
        cons.Consumer([Queue(q)], callbacks=[on_message], no_ack=True,
                      accept=["json"]).consume()
        procs = [ctx.Process(target=_produce, args=(env.url, q, i, PER_PRODUCER, BIG_EVERY))
                 for i in range(N_PRODUCERS)]
        for p in procs:
            p.start()
        try:
            total = N_PRODUCERS * PER_PRODUCER
            drain_until(cons, lambda: stats["n"] >= total, timeout=240)
            for p in procs:
                p.join(WAIT_S)
                assert p.exitcode == 0
            with pytest.raises(socket.timeout):  # and nothing more
                cons.drain_events(timeout=0.2)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    assert stats["bad"] == 0 and stats["dup"] == 0
    assert sum(sum(row) for row in seen) == N_PRODUCERS * PER_PRODUCER
    assert stats["big"] == N_PRODUCERS * len(range(0, PER_PRODUCER, BIG_EVERY))  # > PIPE_BUF


# --------------------------------------------------------------------------- exchanges
def test_topic_and_fanout_reach_consumers_of_other_connections(env):
    q1, q2 = qname("fan"), qname("fan")
    fan, topic = Exchange(qname("fx"), "fanout"), Exchange(qname("tx"), "topic")
    got = {q1: [], q2: []}
    with env.connection() as a, env.connection() as b, env.connection() as prod:
        # Each connection has its own kombu state, like another process.
        for conn, q, key in ((a, q1, "w.*"), (b, q2, "w.#")):
            queue = Queue(q, bindings=[binding(fan), binding(topic, routing_key=key)])
            conn.Consumer([queue], callbacks=[lambda body, m, q=q: got[q].append(body)]).consume()
        producer = Producer(prod)
        producer.publish({"to": "all"}, exchange=fan, serializer="json", declare=[fan])
        producer.publish({"to": "w.x"}, exchange=topic, routing_key="w.x", serializer="json",
                         declare=[topic])
        producer.publish({"to": "w.x.y"}, exchange=topic, routing_key="w.x.y",
                         serializer="json")
        drain_until(a, lambda: len(got[q1]) == 2)
        drain_until(b, lambda: len(got[q2]) == 3)
        a.release()  # a broadcast skips consumers that left; a direct publish fails
        producer.publish({"to": "all-2"}, exchange=fan, serializer="json")
        drain_until(b, lambda: len(got[q2]) == 4)
        with pytest.raises(fifo.NoConsumerError):
            producer.publish({}, routing_key=q1, serializer="json")
    assert got[q1] == [{"to": "all"}, {"to": "w.x"}]
    assert got[q2] == [{"to": "all"}, {"to": "w.x"}, {"to": "w.x.y"}, {"to": "all-2"}]


# --------------------------------------------------------------------------- event loop
def test_event_loop_delivers_by_readiness_within_prefetch(env):
    q, got = qname(), []
    hub = Hub()
    hub.call_repeatedly(0.05, lambda: None)  # bounds each poll, so the loop turns
    try:
        with env.connection() as cons, env.connection() as prod:
            cons.ensure_connection()
            assert cons.transport.implements.asynchronous
            cons.transport.register_with_event_loop(cons.connection, hub)
            ch = cons.channel()
            ch.basic_qos(0, 1, False)
            Consumer(ch, [Queue(q)], callbacks=[lambda b, m: got.append(m)]).consume()
            for i in range(3):
                Producer(prod).publish({"i": i}, routing_key=q, serializer="json")

            def turn_until(pred, turns=400):
                for _ in range(turns):
                    if pred():
                        return
                    hub.run_once()
                raise AssertionError("the event loop did not deliver")

            turn_until(lambda: len(got) == 1)
            for _ in range(5):
                hub.run_once()
            assert len(got) == 1  # prefetch 1: the reader paused, nothing more delivered
            got[0].ack()
            turn_until(lambda: len(got) == 2)
            got[1].ack()
            turn_until(lambda: len(got) == 3)
            assert [m.payload["i"] for m in got] == [0, 1, 2]
    finally:
        hub.close()


def test_blocking_drain_without_consumers_times_out(env):
    with env.connection() as c:
        c.ensure_connection()
        with pytest.raises(socket.timeout):
            c.drain_events(timeout=0.05)


# --------------------------------------------------------------------------- celery
def test_celery_worker_runs_tasks_over_fifo(env):
    from bench import celery_workers
    from bench.celery_app import make_app

    q = qname("celery")
    conf = {"task_default_queue": q, "worker_prefetch_multiplier": 1}
    # rpc:// works too: the client's reply queue is auto_delete, so it is held from declare.
    app = make_app(env.url, "rpc://", env.transport_options, **conf)
    with celery_workers.worker(env.url, "rpc://", transport_options=env.transport_options, conf=conf,
                        concurrency=2, without=(), stop_timeout=15) as w:
        results = [app.send_task("bench.sleep", kwargs={"seconds": 0}) for _ in range(20)]
        done = [r.get(timeout=WAIT_S) for r in results]
        assert all(d["end_ns"] >= d["start_ns"] for d in done)
        # Remote control over the emulated fanout + reply queue.
        replies = app.control.ping(timeout=2.0)
        assert {w.hostname: {"ok": "pong"}} in replies
    app.close()


# --------------------------------------------------------------------------- crash exposure
def _in_pipe(inbox) -> int:
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(inbox.rfd, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_the_reader_holds_no_more_than_the_prefetch_window(env):
    """What was read dies with the process: with prefetch 2 at most 2 are out of the
    pipe (delivered-unacked + read-unhanded); the rest stays in it."""
    q, got = qname(), []
    with env.connection() as cons, env.connection() as prod:
        ch = cons.channel()
        ch.basic_qos(0, 2, False)
        Consumer(ch, [Queue(q)], callbacks=[lambda b, m: got.append(m)]).consume()
        for i in range(50):
            Producer(prod).publish({"i": i}, routing_key=q, serializer="json")
        drain_until(cons, lambda: len(got) == 2)
        with pytest.raises(socket.timeout):
            cons.drain_events(timeout=0.1)  # the window is full: nothing more delivered
        inbox = cons.transport._inboxes[q]
        assert len(got) + len(inbox.frames) + len(inbox.requeued) <= 2
        assert _in_pipe(inbox) > 40 * 40  # 48 messages still in the pipe, not in memory
        got[0].ack()
        drain_until(cons, lambda: len(got) == 3)
        assert len(inbox.frames) + len(inbox.requeued) <= 1
        assert [m.payload["i"] for m in got] == [0, 1, 2]


def test_cancel_hands_over_what_was_read_then_lets_the_queue_go(env, caplog):
    """Cancelling a queue's last consumer (a warm shutdown) hands over what was read and
    closes and unlinks the pipe: a publish from then on fails at once, even through a
    write end the producer already holds, instead of filling a pipe nobody reads."""
    q, got = qname(), []
    with env.connection() as cons, env.connection() as prod:
        ch = cons.channel()
        ch.basic_qos(0, 5, False)
        consumer = Consumer(ch, [Queue(q)],
                            callbacks=[lambda b, m: (got.append(b["i"]), m.ack())])
        consumer.consume()
        producer = Producer(prod)
        for i in range(20):
            producer.publish({"i": i}, routing_key=q, serializer="json")
        inbox = cons.transport._inboxes[q]
        cons.transport._fill(inbox)  # read as a busy consumer would, deliver nothing yet
        read = len(inbox.frames)
        assert 1 <= read <= 5
        left = _in_pipe(inbox)
        assert left > 0
        path = inbox.fifo_path
        with caplog.at_level("WARNING", logger="transports.fifo"):
            consumer.cancel()  # a warm shutdown
        assert got == list(range(read))  # what was read was handed over
        assert q not in cons.transport._inboxes and inbox.rfd < 0
        assert not os.path.exists(path)
        # What was still in the pipe is lost, and said so.
        assert f"{left} bytes still in its pipe" in caplog.text
        with pytest.raises(fifo.NoConsumerError, match="no consumer attached"):
            producer.publish({"i": 20}, routing_key=q, serializer="json")
        # Consuming again attaches a new pipe, and publishing works again.
        consumer.consume()
        producer.publish({"i": 21}, routing_key=q, serializer="json")
        drain_until(cons, lambda: got[-1:] == [21])
        assert got == list(range(read)) + [21]


def test_cancel_keeps_a_queue_its_connection_declared_auto_delete(env):
    """A reply queue belongs to its declarer: a consumer of it may stop and come back
    (Celery's rpc result consumer does) without the replies meanwhile being refused."""
    q, got = qname("reply"), []
    with env.connection() as cons, env.connection() as prod:
        queue = Queue(q, auto_delete=True)
        consumer = Consumer(cons, [queue], callbacks=[lambda b, m: got.append(b)])
        consumer.consume()
        producer = Producer(prod)
        producer.publish(1, routing_key=q)
        drain_until(cons, lambda: got == [1])
        consumer.cancel()
        assert q in cons.transport._inboxes
        producer.publish(2, routing_key=q)   # accepted: held, read when it comes back
        consumer.consume()
        drain_until(cons, lambda: got == [1, 2])
