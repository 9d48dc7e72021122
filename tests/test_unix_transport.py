"""The unix transport and its broker: private sockets, exactly-once under load from
several processes, redelivery after a SIGKILL, restarts reported as connection
errors, garbage on the socket, prefetch, topic routing, the event loop, and a real
Celery worker. Real broker processes, real sockets, no mocks."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub
from kombu.exceptions import OperationalError

import transports  # noqa: F401  registers the unix alias
from transports import broker as unix_broker
from transports import protocol as proto
from transports import unix
from support import child, direct_queue, drain_quietly, drain_until, qname

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # generous bound for what takes milliseconds


# -- the socket and the URL ---------------------------------------------------------------

def test_socket_is_private(broker, sockdir):
    assert stat.S_IMODE(os.stat(broker.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(broker.path).st_mode)
    assert stat.S_IMODE(os.stat(sockdir).st_mode) == 0o700


def test_missing_directory_is_created_private(sockdir):
    path = sockdir / "sub" / "broker.sock"
    with unix_broker.running(str(path)):
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert not path.exists()  # removed on stop


def test_refuses_a_directory_others_can_enter(sockdir):
    shared = sockdir / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(ValueError, match="open to other users"):
        unix_broker.Broker(str(shared / "broker.sock")).listen()
    result = subprocess.run([sys.executable, "-m", "transports.broker",
                             f"unix://{shared}/broker.sock"], cwd=str(ROOT),
                            capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 2
    assert "open to other users" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_refuses_a_second_broker_on_the_same_socket(broker):
    with pytest.raises(ValueError, match="already serving"):
        unix_broker.Broker(broker.path).listen()


def test_url_needs_an_absolute_path():
    with pytest.raises(ValueError, match="absolute"):
        proto.socket_path_from_url("unix://relative/broker.sock")
    assert proto.socket_path_from_url("unix:///a/b.sock") == "/a/b.sock"
    assert Connection("unix:///a/b.sock").as_uri() == "unix:///a/b.sock"


def test_no_broker_is_an_operational_error_naming_the_socket(sockdir):
    path = sockdir / "nobody.sock"
    conn = Connection(f"unix://{path}", transport_options={"max_retries": 1,
                                                           "interval_start": 0})
    with pytest.raises(OperationalError, match=str(path)):
        conn.connect()
    with pytest.raises(OperationalError, match=str(path)):
        Producer(conn).publish("nobody", routing_key="x")
    conn.release()


# -- delivery guarantees --------------------------------------------------------------------

PRODUCER = """
import sys, transports
from kombu import Connection, Producer
url, name, me, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with Connection(url) as conn:
    publish = Producer(conn).publish
    for i in range(count):
        publish([me, i], routing_key=name)
print("done", flush=True)
"""


def test_100k_messages_from_4_producer_processes_arrive_exactly_once(broker):
    q = Queue(qname("load"), routing_key=None)
    per, producers = 25_000, 4
    seen = bytearray(per * producers)
    count = [0]

    def on_message(body, message):
        me, i = body
        seen[me * per + i] += 1
        count[0] += 1
        message.ack()

    with Connection(broker.url) as conn:
        q(conn.default_channel).declare()
        consumer = Consumer(conn, [q], callbacks=[on_message])
        consumer.qos(prefetch_count=1000)
        with consumer:
            procs = [child(PRODUCER, broker.url, q.name, p, per) for p in range(producers)]
            try:
                drain_until(conn, lambda: count[0] >= per * producers, timeout=120)
                drain_quietly(conn, 0.3)  # nothing more comes
            finally:
                for proc in procs:
                    _, err = proc.communicate(timeout=WAIT_S)
                    assert proc.returncode == 0, err
    assert count[0] == per * producers
    assert seen.count(1) == per * producers  # every message once, none twice


SLOW_CONSUMER = """
import sys, time, transports
from kombu import Connection, Consumer, Queue
url, name = sys.argv[1], sys.argv[2]
def on_message(body, message):
    message.ack()
    print(body, flush=True)          # acked ids, one per line
    time.sleep(0.001)
with Connection(url) as conn:
    consumer = Consumer(conn, [Queue(name, routing_key=name)], callbacks=[on_message])
    consumer.qos(prefetch_count=50)
    with consumer:
        while True:
            conn.drain_events(timeout=5)
"""


def test_sigkilled_consumer_loses_nothing(broker):
    q = Queue(qname("kill"), routing_key=None)
    total = 2000
    with Connection(broker.url) as conn:
        q(conn.default_channel).declare()
        producer = Producer(conn)
        for i in range(total):
            producer.publish(i, routing_key=q.name)
        victim = child(SLOW_CONSUMER, broker.url, q.name)
        acked = []
        try:
            deadline = time.monotonic() + WAIT_S
            while len(acked) < 300:  # mid-stream: some acked, 50 in flight, most queued
                line = victim.stdout.readline()
                assert line and time.monotonic() < deadline, victim.stderr.read()
                acked.append(int(line))
        finally:
            victim.kill()  # SIGKILL: no chance to clean up
            victim.wait(WAIT_S)
        acked += [int(line) for line in victim.stdout.read().split()]
        got, redelivered = [], []

        def on_message(body, message):
            got.append(body)
            if message.delivery_info.get("redelivered"):
                redelivered.append(body)
            message.ack()

        with Consumer(conn, [q], callbacks=[on_message]):
            drain_until(conn, lambda: len(set(got) | set(acked)) == total)
            drain_quietly(conn, 0.2)
    assert set(got) | set(acked) == set(range(total))  # nothing lost
    assert redelivered  # what the victim held came back, marked redelivered
    assert len(got) == len(set(got))


def test_broker_restart_is_a_connection_error_then_reconnects(sockdir):
    path = str(sockdir / "broker.sock")
    first = unix_broker.start(path)
    q = direct_queue()
    try:
        with Connection(f"unix://{path}") as conn:
            got = []
            consumer = Consumer(conn, [q], callbacks=[lambda b, m: (got.append(b), m.ack())])
            consumer.consume()
            stopper = threading.Timer(0.3, first.stop)
            stopper.start()
            started = time.monotonic()
            with pytest.raises(conn.connection_errors) as info:
                conn.drain_events(timeout=None)  # blocks: only the broker's exit ends it
            assert time.monotonic() - started < WAIT_S
            assert path in str(info.value)
            # The first broker drops its clients before it has exited: wait for the exit,
            # or the second one's readiness probe may be answered by the dying first.
            stopper.join(WAIT_S)
            assert not first.alive()

            second = unix_broker.start(path)
            try:
                conn.ensure_connection(max_retries=5, interval_start=0.05)
                consumer.revive(conn.default_channel)
                consumer.consume()
                Producer(conn).publish("after restart", exchange=q.exchange,
                                       routing_key=q.routing_key, declare=[q], retry=True)
                drain_until(conn, lambda: got)
                assert got == ["after restart"]
            finally:
                second.stop()
    finally:
        first.stop()


def test_a_stopped_broker_is_a_timeout_not_a_hang(broker):
    with Connection(broker.url, transport_options={"rpc_timeout": 0.5}) as conn:
        conn.connect()
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(unix.BrokerConnectionError, match="no answer"):
                direct_queue()(conn.default_channel).declare()
        finally:
            os.kill(broker.pid, signal.SIGCONT)


# -- robustness ---------------------------------------------------------------------------

def _raw(path, data, *, hello=True, close=True):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if hello:
        body = proto.RPC_HEAD.pack(proto.OP_HELLO, 0, 1) + proto.MAGIC \
            + proto.U16.pack(proto.PROTOCOL_VERSION)
        sock.sendall(proto.U32.pack(len(body)) + body)
    sock.sendall(data)
    if close:
        time.sleep(0.05)
        sock.close()
    return sock


def test_broker_survives_garbage_and_keeps_serving(broker):
    u32 = proto.U32.pack
    q = direct_queue()
    got = []
    with Connection(broker.url) as live, Connection(broker.url) as prod:
        consumer = Consumer(live, [q], callbacks=[lambda b, m: (got.append(b), m.ack())])
        with consumer:
            garbage = [
                (os.urandom(4096), False),                      # noise instead of a HELLO
                (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),  # the wrong protocol
                (u32(0xFFFFFFFF) + b"x", True),                 # a huge length prefix
                (u32(50) + b"\x02\x00", True),                  # a truncated frame, then EOF
                (u32(3) + b"\xee\x00\x01", True),               # an unknown op
                (u32(0), True),                                 # an empty frame
                (u32(5) + b"\x02\x00\x01\xff\xff", True),       # publish header past the end
                (u32(9) + b"\x06\x00\x01\x00\x00\x00\x07\x00\x01", True),  # short consume
            ]
            for n, (data, hello) in enumerate(garbage):
                _raw(broker.path, data, hello=hello)
                publish = Producer(prod).publish
                publish(n, exchange=q.exchange, routing_key=q.routing_key, declare=[q])
                drain_until(live, lambda: len(got) == n + 1)
            # A client that stops mid-frame and stays connected harms nobody either.
            stuck = _raw(broker.path, u32(1000) + b"\x02", close=False)
            try:
                Producer(prod).publish("still here", exchange=q.exchange,
                                       routing_key=q.routing_key)
                drain_until(live, lambda: got[-1] == "still here")
            finally:
                stuck.close()
    assert got == list(range(len(garbage))) + ["still here"]
    assert broker.alive()


# -- semantics ----------------------------------------------------------------------------

def test_prefetch_is_honoured(broker):
    q = direct_queue()
    got = []
    with Connection(broker.url) as conn:
        consumer = Consumer(conn, [q], callbacks=[lambda b, m: got.append(m)])
        consumer.qos(prefetch_count=3)
        with consumer:
            for i in range(10):
                Producer(conn).publish(i, exchange=q.exchange, routing_key=q.routing_key,
                                       declare=[q])
            drain_until(conn, lambda: len(got) == 3)
            drain_quietly(conn, 0.3)
            assert [m.payload for m in got] == [0, 1, 2]
            got[0].ack()
            drain_until(conn, lambda: len(got) == 4)
            drain_quietly(conn, 0.2)
            assert [m.payload for m in got] == [0, 1, 2, 3]
            for m in got[1:]:
                m.ack()
            drain_until(conn, lambda: len(got) == 7)


def test_topic_routing(broker):
    assert unix_broker.topic_matches(b"a.#".split(b"."), b"a".split(b"."))
    assert unix_broker.topic_matches(b"#.z".split(b"."), b"x.y.z".split(b"."))
    assert not unix_broker.topic_matches(b"a.*".split(b"."), b"a.b.c".split(b"."))
    name = qname("topic")
    exchange = Exchange(name, type="topic")
    keys = {"star": "a.*", "hash": "a.#", "all": "#", "exact": "b.x"}
    queues = {k: Queue(f"{name}-{k}", exchange, routing_key=v) for k, v in keys.items()}
    got = {k: [] for k in keys}
    with Connection(broker.url) as conn:
        consumers = [Consumer(conn, [q], callbacks=[
            lambda b, m, k=k: (got[k].append(b), m.ack())]) for k, q in queues.items()]
        for c in consumers:
            c.consume()
        for rk in ("a.b", "a.b.c", "b.x", "c"):
            Producer(conn).publish(rk, exchange=exchange, routing_key=rk)
        drain_until(conn, lambda: sum(map(len, got.values())) == 8)
        drain_quietly(conn, 0.2)
        for c in consumers:
            c.cancel()
    assert got == {"star": ["a.b"], "hash": ["a.b", "a.b.c"],
                   "all": ["a.b", "a.b.c", "b.x", "c"], "exact": ["b.x"]}


def test_event_loop_consumes_by_readiness(broker):
    assert unix.Transport.implements.asynchronous
    q = direct_queue()
    got = []
    hub = Hub()
    try:
        with Connection(broker.url) as conn, Connection(broker.url) as prod:
            conn.transport.register_with_event_loop(conn.connection, hub)
            with Consumer(conn, [q], callbacks=[lambda b, m: (got.append(b), m.ack())]):
                loop = hub.create_loop()
                for i in range(3):
                    Producer(prod).publish(i, exchange=q.exchange, routing_key=q.routing_key,
                                           declare=[q])
                deadline = time.monotonic() + WAIT_S
                while len(got) < 3 and time.monotonic() < deadline:
                    next(loop)
                assert got == [0, 1, 2]
    finally:
        hub.close()


def test_write_buffer_is_flushed_by_its_timer_and_on_close(broker):
    q = direct_queue()
    got = []
    opts = {"write_buffer": True, "write_buffer_interval": 0.01}
    with Connection(broker.url) as cons:
        with Consumer(cons, [q], callbacks=[lambda b, m: (got.append(b), m.ack())]):
            with Connection(broker.url, transport_options=opts) as prod:
                producer = Producer(prod)
                producer.maybe_declare(q)
                for i in range(10):
                    producer.publish(i, exchange=q.exchange, routing_key=q.routing_key)
                drain_until(cons, lambda: len(got) == 10)  # the timer sent them
                for i in range(10, 15):
                    producer.publish(i, exchange=q.exchange, routing_key=q.routing_key)
            drain_until(cons, lambda: len(got) == 15)  # close sent the rest
    assert got == list(range(15))


def test_producer_batch(broker):
    q = direct_queue()
    got = []
    with Connection(broker.url) as conn:
        assert conn.transport.implements.batch_publish
        with Consumer(conn, [q], callbacks=[lambda b, m: (got.append(b), m.ack())]):
            producer = Producer(conn)
            producer.maybe_declare(q)
            with producer.batch(100):
                for i in range(250):
                    producer.publish(i, exchange=q.exchange, routing_key=q.routing_key)
            with pytest.raises(RuntimeError):
                with producer.batch(100):
                    producer.publish("discarded", exchange=q.exchange,
                                     routing_key=q.routing_key)
                    raise RuntimeError("abort the batch")
            drain_until(conn, lambda: len(got) == 250)
            drain_quietly(conn, 0.2)
    assert got == list(range(250))


# -- Celery --------------------------------------------------------------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_celery_worker_runs_tasks_and_answers_ping(tmp_path, pool):
    from bench import brokers, celery_app, celery_workers

    q = qname("celery")
    conf = {"task_default_queue": q, "task_ignore_result": True}
    with brokers.broker("unix", tmp_path) as env:
        app = celery_app.make_app(env.url, **conf)
        with celery_workers.worker(env.url, conf=conf, pool=pool, concurrency=2,
                            stop_timeout=10) as w:
            with app.producer_or_acquire() as producer:
                for _ in range(50):
                    app.send_task("bench.noop", producer=producer)

            def done():
                return w.log_path.read_text(errors="replace").count("succeeded") >= 50
            deadline = time.monotonic() + 60
            while not done():
                assert time.monotonic() < deadline and w.alive(), w.log_tail()
                time.sleep(0.05)
            replies = app.control.inspect(timeout=5, destination=[w.hostname]).ping()
            assert replies == {w.hostname: {"ok": "pong"}}


def test_an_oversized_message_is_refused_before_it_is_sent(broker):
    q = direct_queue()
    with Connection(broker.url) as conn:
        producer = Producer(conn)
        with pytest.raises(conn.channel_errors, match="larger than"):
            producer.publish(b"x" * (unix.MAX_MESSAGE + 1), exchange=q.exchange,
                             routing_key=q.routing_key, declare=[q],
                             content_type="application/data", content_encoding="binary")
        producer.publish("fine", exchange=q.exchange, routing_key=q.routing_key)
        message = None
        deadline = time.monotonic() + WAIT_S
        while message is None and time.monotonic() < deadline:
            message = q(conn.default_channel).get(no_ack=True)
        assert message.payload == "fine"  # the connection is still good


def test_a_socket_that_is_not_a_broker_is_a_clear_connection_error(sockdir):
    path = str(sockdir / "impostor.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer_wrongly():
        peer, _ = server.accept()
        peer.recv(1024)
        peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        time.sleep(1)
        peer.close()

    thread = threading.Thread(target=answer_wrongly, daemon=True)
    thread.start()
    try:
        with Connection(f"unix://{path}", transport_options={"rpc_timeout": 5}) as conn:
            with pytest.raises(unix.BrokerConnectionError, match="not a unix broker"):
                direct_queue()(conn.default_channel).declare()
    finally:
        thread.join(5)
        server.close()


def test_cli_broker_runs_in_the_foreground_until_sigint(sockdir):
    """``celery-bench broker`` takes the broker's limits: the ones its errors advise raising."""
    path = sockdir / "cli" / "broker.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "bench", "broker", f"unix://{path}",
                             "--max-queue-messages", "1"],
                            cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (path.exists() and unix_broker._socket_accepts(str(path))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        with Connection(f"unix://{path}") as conn:
            q = direct_queue()
            Producer(conn).publish("hi", exchange=q.exchange, routing_key=q.routing_key,
                                   declare=[q])
            assert q(conn.default_channel).queue_declare(passive=True).message_count == 1
        opts = {"confirm_publish": True, "publish_timeout": 1}
        with Connection(f"unix://{path}", transport_options=opts) as conn:
            with pytest.raises(unix.PublishBlockedError, match="max_queue_messages=1"):
                Producer(conn).publish("full", exchange=q.exchange, routing_key=q.routing_key)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    bad = subprocess.run([sys.executable, "-m", "bench", "broker", "unix://relative.sock"],
                         cwd=str(ROOT), env=env, capture_output=True, text=True,
                         timeout=WAIT_S)
    assert bad.returncode == 2
    assert "absolute" in bad.stderr and "Traceback" not in bad.stderr
