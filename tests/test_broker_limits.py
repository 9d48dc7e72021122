"""The unix broker's limits: back-pressure instead of growth, bounded frames and
replies, memory returned after a purge. Real broker processes on private sockets;
every wait is bounded; memory is the broker's RSS as psutil reads it."""
from __future__ import annotations

import os
import socket
import threading
import time

import psutil
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

import transports  # noqa: F401  registers the unix alias
from transports import broker as unix_broker
from transports import protocol as proto
from transports import unix
from support import drain_quietly, drain_until, qname, wait_until

WAIT_S = 30.0  # generous bound for what takes milliseconds
MiB = 1024 * 1024
# Python, the selector and per-connection buffers: what a broker may hold beyond its
# messages in these tests (the old broker grew by hundreds of MB in each of them).
SLACK = 32 * MiB


def rss(b) -> int:
    return psutil.Process(b.pid).memory_info().rss


def direct(name=None) -> Queue:
    name = name or qname()
    return Queue(name, Exchange(name, "direct"), routing_key=name)


def publish_until_blocked(conn, q, limit, body_pad=1000):
    """Publish numbered messages until back-pressure raises; how many returned, and the error."""
    producer = Producer(conn)
    producer.maybe_declare(q)
    for i in range(limit):
        try:
            producer.publish({"i": i, "pad": "x" * body_pad}, exchange=q.exchange,
                             routing_key=q.routing_key)
        except unix.PublishBlockedError as exc:
            return i, exc
    raise AssertionError(f"{limit} publishes and no back-pressure")


def drain_ids(url, q, expected, timeout=WAIT_S):
    got = []
    with Connection(url) as conn:
        with Consumer(conn, [q], callbacks=[lambda b, m: (got.append(b["i"]), m.ack())]):
            drain_until(conn, lambda: len(got) >= expected, timeout=timeout)
            drain_quietly(conn, 0.3)
    return got


def raw(path, hello=True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(path)
    if hello:
        body = proto.RPC_HEAD.pack(proto.OP_HELLO, 0, 1) + proto.MAGIC \
            + proto.U16.pack(proto.PROTOCOL_VERSION)
        sock.sendall(proto.U32.pack(len(body)) + body)
    return sock


def rpc_frame(op, reqid, body=b"", channel=1) -> bytes:
    data = proto.RPC_HEAD.pack(op, channel, reqid) + body
    return proto.U32.pack(len(data)) + data


def closed_by_peer(sock, timeout=WAIT_S) -> bool:
    """Wait for the broker to close ``sock`` (reading and discarding what it sent)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


# -- back-pressure --------------------------------------------------------------------

@pytest.mark.parametrize("confirm", [False, True], ids=["pipelined", "confirm"])
def test_slow_consumer_gets_backpressure_not_a_growing_broker(start_broker, confirm):
    """A consumer that never acks: the publisher blocks, then a clear error; the broker
    stays within its bound; every publish that returned is delivered once afterwards."""
    b = start_broker(max_queue_messages=2000, max_memory=32 * MiB)
    q = direct()
    base = rss(b)
    with Connection(b.url) as stuck:
        hog = Consumer(stuck, [q], callbacks=[lambda body, m: None])  # never acks
        hog.qos(prefetch_count=10)
        hog.consume()
        opts = {"publish_timeout": 1.0, "confirm_publish": confirm}
        with Connection(b.url, transport_options=opts) as prod:
            returned, exc = publish_until_blocked(prod, q, 200_000)
        assert f"queue '{q.name}' is full" in str(exc)
        assert "max_queue_messages=2000" in str(exc)
        assert isinstance(exc, unix.BrokerConnectionError)  # an OperationalError, retryable
        # 200,000 x 1 KiB would be ~240 MB in an unbounded broker.
        assert rss(b) - base < 32 * MiB + SLACK
        if confirm:
            assert returned == 2000 + 10  # queue full, 10 with the consumer
    # The hog leaves (its 10 come back); a real consumer gets every publish that returned.
    got = drain_ids(b.url, q, returned)
    assert sorted(got) == list(range(returned))


def test_queue_arguments_set_the_limit(start_broker):
    b = start_broker()
    q = Queue(qname(), Exchange(qname(), "direct"), routing_key="k", max_length=5)
    opts = {"publish_timeout": 0.5, "confirm_publish": True}
    with Connection(b.url, transport_options=opts) as conn:
        returned, exc = publish_until_blocked(conn, q, 100)
    assert returned == 5
    assert "max_queue_messages=5" in str(exc)
    qb = Queue(qname(), Exchange(qname(), "direct"), routing_key="k", max_length_bytes=10_000)
    with Connection(b.url, transport_options=opts) as conn:
        returned, exc = publish_until_blocked(conn, qb, 100)
    assert 5 <= returned <= 12  # ~1 KiB each: full once 10,000 bytes are in
    assert "max_queue_bytes=10000" in str(exc)


def test_transport_options_set_limits_for_declared_queues(start_broker):
    b = start_broker()
    opts = {"publish_timeout": 0.5, "confirm_publish": True, "max_queue_messages": 3}
    with Connection(b.url, transport_options=opts) as conn:
        returned, exc = publish_until_blocked(conn, direct(), 100)
    assert returned == 3 and "max_queue_messages=3" in str(exc)


def test_others_are_served_while_a_publisher_waits_and_it_resumes(start_broker):
    b = start_broker(max_queue_messages=100)
    full, other = direct(), direct()
    outcome = {}
    with Connection(b.url) as admin:
        Producer(admin).maybe_declare(full)
        for i in range(100):
            Producer(admin).publish({"i": i}, exchange=full.exchange,
                                    routing_key=full.routing_key)
        wait_until(lambda: full(admin.default_channel).queue_declare(
            passive=True).message_count == 100, what="a full queue")

        sending = threading.Event()

        def blocked_publisher():
            opts = {"confirm_publish": True, "publish_timeout": WAIT_S}
            with Connection(b.url, transport_options=opts) as conn:
                conn.connect()
                sending.set()
                try:
                    Producer(conn).publish({"i": 100}, exchange=full.exchange,
                                           routing_key=full.routing_key)
                    outcome["ok"] = True
                except Exception as exc:  # reported below
                    outcome["error"] = exc
        thread = threading.Thread(target=blocked_publisher)
        thread.start()
        try:
            assert sending.wait(WAIT_S)
            time.sleep(0.3)  # its publish reaches the broker and is held back
            # Someone else publishes and consumes on another queue meanwhile.
            got = []
            with Connection(b.url) as conn:
                with Consumer(conn, [other], callbacks=[lambda body, m: (got.append(body),
                                                                         m.ack())]):
                    for i in range(50):
                        Producer(conn).publish(i, exchange=other.exchange,
                                               routing_key=other.routing_key, declare=[other])
                    drain_until(conn, lambda: len(got) == 50)
            assert "ok" not in outcome and "error" not in outcome  # still held back
            # Room appears: the held publish goes in.
            assert full(admin.default_channel).get(no_ack=True) is not None
        finally:
            thread.join(WAIT_S)
    assert outcome == {"ok": True}
    assert sorted(drain_ids(b.url, full, 100)) == list(range(1, 101))


def test_a_connection_consuming_what_it_publishes(start_broker):
    """Deliveries still reach a held-back connection: without a prefetch limit it drains
    its own queue and goes on; with one it cannot ack while blocked (documented)."""
    b = start_broker(max_queue_messages=50)
    q = direct()
    got = []
    with Connection(b.url, transport_options={"publish_timeout": 5.0}) as conn:
        consumer = Consumer(conn, [q], callbacks=[lambda body, m: (got.append(body["i"]),
                                                                   m.ack())])
        consumer.consume()  # prefetch 0: unlimited
        producer = Producer(conn)
        for i in range(5000):
            producer.publish({"i": i, "pad": "x" * 200}, exchange=q.exchange,
                             routing_key=q.routing_key)
        drain_until(conn, lambda: len(got) == 5000)
    assert got == list(range(5000))
    q2 = direct()
    with Connection(b.url, transport_options={"publish_timeout": 1.0}) as conn:
        consumer = Consumer(conn, [q2], callbacks=[lambda body, m: m.ack()])
        consumer.qos(prefetch_count=10)
        consumer.consume()
        _, exc = publish_until_blocked(conn, q2, 100_000, body_pad=200)
        assert "is full" in str(exc)


def test_memory_limit_blocks_every_publisher(start_broker):
    # This test's process may fill the whole broker (its own share is
    # tests/test_broker_shares.py's): the broker-wide limit is the one reached.
    b = start_broker(max_frame=MiB, max_memory=4 * MiB, max_client_memory=4 * MiB)
    base = rss(b)
    opts = {"publish_timeout": 0.5, "confirm_publish": True}
    with Connection(b.url, transport_options=opts) as conn:
        producer = Producer(conn)
        with pytest.raises(unix.PublishBlockedError, match=r"memory limit.*max_memory=4194304"):
            for n in range(1000):  # many queues, none full by itself
                q = direct()
                for i in range(20):
                    producer.publish({"i": i, "pad": "x" * 1000}, exchange=q.exchange,
                                     routing_key=q.routing_key, declare=[q] if not i else [])
    assert rss(b) - base < 4 * MiB + SLACK


@pytest.mark.parametrize("limit", ["queue", "memory"])
@pytest.mark.parametrize("write_buffer", [False, True])
def test_every_returned_publish_is_in_the_queue_or_counted_in_the_error(start_broker, limit,
                                                                         write_buffer):
    """A flood to an unconsumed queue (its limit, or the broker's memory limit with the
    queue's raised): the client gives up on its blocked write and closes; every publish
    that had returned is then in the queue, or counted in the error as not delivered."""
    if limit == "queue":
        b = start_broker(max_queue_messages=5000)
        q = direct()
    else:
        b = start_broker(max_frame=MiB, max_memory=8 * MiB, max_client_memory=8 * MiB)
        name = qname()
        q = Queue(name, Exchange(name, "direct"), routing_key=name,
                  max_length=2**62, max_length_bytes=2**62)
    opts = {"publish_timeout": 0.5, "write_buffer": write_buffer}
    with Connection(b.url, transport_options=opts) as conn:
        returned, exc = publish_until_blocked(conn, q, 1_000_000)
        undelivered = conn.transport.undelivered
    assert exc.undelivered == undelivered
    assert ("max_memory" if limit == "memory" else "is full") in str(exc)
    if undelivered:
        assert f"{undelivered} publishes whose publish() had returned" in str(exc)
    got = drain_ids(b.url, q, returned - undelivered)
    assert len(got) == len(set(got)) == returned - undelivered
    assert set(got) <= set(range(returned))


def test_the_write_buffer_timer_giving_up_still_says_why(start_broker):
    """write_buffer mode, publishes paced so the timer thread does every flush: it may
    not read the connection (the caller's thread does), so when its write blocks at the
    memory limit it looks at the broker's FLOW notice without taking it. The error the
    next publish raises names max_memory, not only the generic 'took no data'."""
    b = start_broker(max_frame=MiB, max_memory=8 * MiB, max_client_memory=8 * MiB)
    q = direct()
    opts = {"publish_timeout": 0.5, "write_buffer": True}
    with Connection(b.url, transport_options=opts) as conn:
        producer = Producer(conn)
        producer.maybe_declare(q)
        with pytest.raises(unix.PublishBlockedError) as exc:
            for i in range(2000):   # 32 KiB each: 8 MiB + the sockets' ~2 MB in ~320
                producer.publish({"i": i, "pad": "x" * 32_000}, exchange=q.exchange,
                                 routing_key=q.routing_key)
                time.sleep(0.01)    # under write_buffer_size: the timer flushes each
    assert "max_memory" in str(exc.value), str(exc.value)


@pytest.mark.parametrize("write_buffer", [False, True])
def test_a_publish_cell_the_transport_gave_up_on_is_lost_with_the_number(start_broker, tmp_path,
                                                                          write_buffer):
    """The publish scenario's loss accounting: a unix publisher blocked past
    publish_timeout (an unconsumed queue at its limit) ends the cell's publishing; the
    cell counts the refused publish and any the transport says it did not deliver as
    lost (not a failed cell, not ok), and says why in a note."""
    from bench import results, runner
    from bench.drivers import kombu as kombu_driver
    from bench.drivers.target import Target
    from bench.scenarios import publish

    # 20 kB messages: the queue's 50 plus the sockets' ~2 MB fill well inside one of the
    # cell's 1,000-message chunks, before its in-process consumer drains.
    b = start_broker(max_queue_messages=50)
    topts = {"publish_timeout": 0.5, "write_buffer": write_buffer}
    target = Target(lambda: Connection(b.url, transport_options=dict(topts)),
                    {"url": b.url, "transport_options": topts}, cross_process=False)
    driver = kombu_driver.Publisher(target, qname(), "held", "json", {"data": "x" * 20_000},
                                    WAIT_S)
    opts = runner.RunOptions(quick=True, workdir=tmp_path, messages=40_000, warmup=0.0,
                             timeout=WAIT_S, repeat=1)
    outcome = publish._measure(driver, False, opts, tmp_path)
    m = outcome.metrics
    assert 50 < m["sent"] < 1000
    assert m["received"] + m["lost"] == m["sent"]
    # The refused publish, plus what the transport counted undelivered: nothing unsaid.
    assert m["lost"] == 1 + m["undelivered"]
    assert m["received"] == m["sent"] - 1 - m["undelivered"]
    assert "the transport gave up" in outcome.notes[1] and "PublishBlockedError" in \
        outcome.notes[1]
    cell = results.aggregate("publish", {"transport": "unix"},
                             [{"metrics": outcome.metrics, "histograms": outcome.histograms,
                               "notes": outcome.notes}])
    assert cell.status == "lost"
    assert f"lost {m['lost']} of {m['sent']}" in cell.reason


# -- frames -----------------------------------------------------------------------------

def test_an_oversized_frame_costs_only_its_sender(start_broker):
    b = start_broker(max_frame=64 * 1024)
    q = direct()
    attacker = raw(b.path)
    attacker.sendall(proto.U32.pack(64 * 1024 + 1) + b"\x02")
    assert closed_by_peer(attacker)
    wait_until(lambda: "exceeds limit 65536" in b.log_tail(), what="the broker's log line")
    with Connection(b.url) as conn:
        # The client learns the broker's limit from its greeting and refuses first.
        with pytest.raises(conn.channel_errors, match="max_frame=65536"):
            Producer(conn).publish(b"x" * 70_000, exchange=q.exchange,
                                   routing_key=q.routing_key, declare=[q],
                                   content_type="application/data", content_encoding="binary")
        Producer(conn).publish(b"y" * 60_000, exchange=q.exchange, routing_key=q.routing_key,
                               content_type="application/data", content_encoding="binary")
        message = wait_until(lambda: q(conn.default_channel).get(no_ack=True), what="a message")
        assert message.body == b"y" * 60_000
    assert b.alive()


def test_stalled_big_frames_free_their_reservation_after_frame_timeout(start_broker):
    """Six connections each send an 8 MiB length prefix and 1 MiB of body, then stop:
    together they hold the whole big-frame reservation (max_memory/4). Once frame_timeout
    passes they are closed, and another client's 1 MiB publish goes through."""
    # One process here: its share of the reservation raised to the pool (48 MiB), so
    # the six take the pool (tests/test_broker_shares.py: one process, one share).
    b = start_broker(frame_timeout=1.0, max_process_reserved=48 * MiB)
    stalled = []
    head = b"\x02\x00\x01\x00\x00\x00\x01q"
    for _ in range(6):
        sock = raw(b.path)
        sock.sendall(proto.U32.pack(8 * MiB - 1) + head + b"z" * MiB)
        stalled.append(sock)
    try:
        q = direct()
        opts = {"confirm_publish": True, "publish_timeout": WAIT_S}
        with Connection(b.url, transport_options=opts) as conn:
            Producer(conn).publish(b"b" * MiB, exchange=q.exchange, routing_key=q.routing_key,
                                   declare=[q], content_type="application/data",
                                   content_encoding="binary")
            assert q(conn.default_channel).queue_declare(passive=True).message_count == 1
        assert all(closed_by_peer(sock) for sock in stalled)
        wait_until(lambda: b.log_tail(40).count("(frame_timeout)") == 6, what="six log lines")
    finally:
        for sock in stalled:
            sock.close()


def test_a_trickling_big_frame_loses_its_reservation_after_frame_timeout(start_broker):
    """A connection sends an 8 MiB length prefix and 1 KiB, then one byte every 0.2 s:
    never silent for frame_timeout (1 s), yet not a frame that will arrive. The bound
    counts from the reservation, so it is closed all the same (10 s: generous)."""
    b = start_broker(frame_timeout=1.0)
    sock = raw(b.path)
    sock.sendall(proto.U32.pack(8 * MiB - 1) + b"\x02\x00\x01\x00\x00\x00\x01q" + b"z" * 1024)
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.2):
            try:
                sock.send(b"z")
            except OSError:
                return
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        assert closed_by_peer(sock, timeout=10.0)
        wait_until(lambda: "(frame_timeout)" in b.log_tail(), what="the broker's log line")
    finally:
        stop.set()
        thread.join(WAIT_S)
        sock.close()


def test_a_stalled_big_frame_holds_one_share_and_a_full_size_one_still_fits(start_broker):
    """One connection stops half-way through an 8 MiB frame: it holds its share of the
    big-frame reservation (one frame, for good: frame_timeout off). With max_memory
    16 MiB a quarter would be 4 MiB, less than one frame; the pool is at least two
    frames, so another client's 6 MiB publish is read and confirmed (before, a frame
    over max_memory/4 could never be reserved: it waited forever)."""
    # Both connections are this process: its share of the reservation raised to the
    # pool (two frames), so the pool's floor is what is under test.
    b = start_broker(max_memory=16 * MiB, frame_timeout=0, max_process_reserved=16 * MiB)
    stalled = raw(b.path)
    stalled.sendall(proto.U32.pack(8 * MiB - 1) + b"\x02\x00\x01\x00\x00\x00\x01q" + b"z" * MiB)
    try:
        q = direct()
        opts = {"confirm_publish": True, "publish_timeout": WAIT_S}
        with Connection(b.url, transport_options=opts) as conn:
            Producer(conn).publish(b"b" * (6 * MiB), exchange=q.exchange,
                                   routing_key=q.routing_key, declare=[q],
                                   content_type="application/data", content_encoding="binary")
            assert q(conn.default_channel).queue_declare(passive=True).message_count == 1
    finally:
        stalled.close()


@pytest.mark.parametrize("share", [4 * MiB, 64 * MiB], ids=["own-share", "control-no-share"])
def test_a_consumer_hoarding_unacked_messages_cannot_stop_another_client(start_broker, share):
    """A consumer that never acks (no prefetch limit) is sent messages only up to its
    share, max_client_unacked_bytes (4 MiB), not up to the broker-wide max_memory
    (32 MiB) that stops every publisher: its queue then fills and only its own
    publisher waits, while another client's 1 MiB publish and consume go through. The
    control, a share larger than max_memory: the hoarder takes everything, the memory
    limit is reached and the other client's publish is blocked too."""
    # Share + a full queue (4 + 24 MiB) stay under max_memory; in the control the hoarder
    # only has to keep up with a third of the publishing for the memory limit to come first.
    # The publisher, hoarder and other client are one process here: its memory share is
    # the whole broker, so only the per-connection unacked share is under test.
    b = start_broker(max_memory=32 * MiB, max_queue_bytes=24 * MiB, max_client_unacked_bytes=share,
                     max_client_memory=32 * MiB)
    hoard, other = direct(), direct()
    held, ready, stop = [], threading.Event(), threading.Event()

    def hoarder():
        with Connection(b.url) as conn:
            with Consumer(conn, [hoard], callbacks=[lambda body, m: held.append(m)]):
                ready.set()
                while not stop.is_set():
                    drain_quietly(conn, 0.1)
    thread = threading.Thread(target=hoarder, daemon=True)
    thread.start()
    try:
        assert ready.wait(WAIT_S)
        opts = {"publish_timeout": 2.0, "confirm_publish": True}
        with Connection(b.url, transport_options=opts) as prod:
            _, exc = publish_until_blocked(prod, hoard, 10_000, body_pad=64 * 1024)
        body = b"o" * MiB
        with Connection(b.url, transport_options=opts) as conn:
            def publish():
                Producer(conn).publish(body, exchange=other.exchange,
                                       routing_key=other.routing_key, declare=[other],
                                       content_type="application/data",
                                       content_encoding="binary")
            if share < 32 * MiB:
                assert f"queue '{hoard.name}' is full" in str(exc)
                publish()
                got = []
                with Consumer(conn, [other], callbacks=[lambda b_, m: (got.append(b_),
                                                                       m.ack())]):
                    drain_until(conn, lambda: got)
                assert got == [body]
                # ~65.6 KiB each: the share, plus the one that crossed it.
                assert len(held) <= share // (64 * 1024) + 1
            else:
                assert "memory limit" in str(exc)
                with pytest.raises(unix.PublishBlockedError, match="memory limit"):
                    publish()
    finally:
        stop.set()
        thread.join(WAIT_S)
    assert b.alive()


@pytest.mark.parametrize("flags, words", [
    (["--max-client-unacked", "0"], ["--max-client-unacked", "> 0"]),
    (["--max-client-unacked-bytes", "lots"], ["--max-client-unacked-bytes", "not a size"]),
    (["--max-client-output", "100M", "--max-memory", "64M"], ["--max-client-output",
                                                               "--max-memory"]),
    # One client process's shares (tests/test_broker_shares.py).
    (["--max-client-memory", "0"], ["--max-client-memory", "> 0"]),
    (["--max-client-objects", "many"], ["--max-client-objects", "not a size"]),
    (["--max-process-reserved", "1M"], ["--max-process-reserved", "--max-frame"]),
])
def test_bad_per_connection_limits_are_one_line_and_exit_2(sockdir, flags, words):
    """``python -m transports.broker`` (celery-bench broker: tests/test_bad_inputs.py):
    one line naming the option, exit 2, nothing served."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "transports.broker",
                           f"unix://{sockdir}/b.sock", *flags],
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), done.stderr
    assert not (sockdir / "b.sock").exists()


def test_a_connections_unacked_count_follows_acks_rejects_gets_and_recover(sockdir):
    """The per-connection share is kept as two counters beside the channels' unacked
    maps (the dispatch loop reads them per message): after deliveries, single and
    multiple acks, rejects with and without requeue, basic_get and recover on two
    channels, each connection's counters equal what its channels hold; a share of 5
    messages stops deliveries at 5 and the next ack lets one more through."""
    broker = unix_broker.Broker(str(sockdir / "in.sock"),
                                limits=unix_broker.Limits(max_client_unacked=5))
    broker.listen()
    loop = threading.Thread(target=broker.serve_forever, kwargs={"install_signals": False},
                            daemon=True)
    loop.start()

    def settled(conn):   # a round trip: the broker ran everything sent before it
        conn.default_channel.basic_qos(0, 0, False)

    def counters_match():
        for client in list(broker.clients.values()):
            held = [e for ch in client.channels.values() for e in ch.unacked.values()]
            assert client.unacked == len(held)
            assert client.unacked_bytes == sum(len(p) + unix_broker.model.MSG_OVERHEAD
                                               for _, p, _ in held)
    try:
        q = direct()
        got = []
        with Connection(f"unix://{broker.path}") as conn:
            producer = Producer(conn)
            for i in range(20):
                producer.publish({"i": i}, exchange=q.exchange, routing_key=q.routing_key,
                                 declare=[q] if not i else [])
            with Consumer(conn, [q], callbacks=[lambda body, m: got.append(m)]):
                drain_until(conn, lambda: len(got) == 5)
                drain_quietly(conn, 0.3)
                assert len(got) == 5          # the share, not the 20 ready
                settled(conn)
                counters_match()
                got[0].ack()
                drain_until(conn, lambda: len(got) == 6)
                got[1].reject(requeue=True)
                got[2].reject(requeue=False)
                drain_until(conn, lambda: len(got) == 8)
                got[7].channel.basic_ack(got[7].delivery_tag, multiple=True)
                drain_until(conn, lambda: len(got) == 13)
                settled(conn)
                counters_match()
            other = conn.channel()
            message = other.basic_get(q.name, no_ack=False)
            assert message is not None
            settled(conn)
            counters_match()
            other.basic_recover(requeue=True)
            settled(conn)
            counters_match()
            other.close()
            settled(conn)
            counters_match()
    finally:
        broker.stop()
        loop.join(WAIT_S)


def test_big_frames_in_flight_are_bounded(start_broker):
    """Many connections each half-way through an 8 MiB frame: the broker reads at most
    max_memory/4 of them at once; small messages of others still flow."""
    # max_frame 8 MiB: 16 MiB of big frames in flight, the process's share raised to it
    # (every attacker is this process) so the pool is the bound under test.
    b = start_broker(max_memory=64 * MiB, max_process_reserved=16 * MiB)
    base = rss(b)
    frame_len = 8 * MiB - 1024
    attackers = []
    stop = threading.Event()

    def feed(sock):  # as much of the frame as the broker takes, never the last byte
        sock.setblocking(False)
        head = b"\x02\x00\x01\x00\x00\x00\x01q"
        data = memoryview(proto.U32.pack(frame_len) + head + b"z" * (frame_len - len(head) - 1))
        while data and not stop.is_set():
            try:
                data = data[sock.send(data):]
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                return

    threads = []
    try:
        for _ in range(24):  # 192 MiB if each were buffered
            sock = raw(b.path)
            attackers.append(sock)
            threads.append(threading.Thread(target=feed, args=(sock,), daemon=True))
            threads[-1].start()
        q = direct()
        got = []
        with Connection(b.url) as conn:
            with Consumer(conn, [q], callbacks=[lambda body, m: (got.append(body), m.ack())]):
                for i in range(200):
                    Producer(conn).publish(i, exchange=q.exchange, routing_key=q.routing_key,
                                           declare=[q])
                drain_until(conn, lambda: len(got) == 200)
        time.sleep(1.0)  # let the feeders push what they can
        assert rss(b) - base < 16 * MiB + SLACK
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_S)
        for sock in attackers:
            sock.close()
    assert b.alive()


# -- a client that does not read --------------------------------------------------------

def test_unread_replies_are_bounded_then_the_client_is_dropped(start_broker):
    b = start_broker(send_timeout=1.0)
    base = rss(b)
    q = direct()
    with Connection(b.url) as admin:
        q(admin.default_channel).declare()
        for i in range(5):
            Producer(admin).publish({"i": i}, exchange=q.exchange, routing_key=q.routing_key)
    flooder = raw(b.path)
    name = q.name.encode()
    flooder.sendall(rpc_frame(proto.OP_CONSUME, 2, proto.U32.pack(1) + b"\x00"
                              + proto.pack_str(name)))  # takes the 5, never acks
    ping = rpc_frame(proto.OP_PING, 3) * 10_000
    flooder.setblocking(False)
    sent = 0
    view = memoryview(ping)
    last = time.monotonic()
    # Until the broker stops taking pings (no progress for 2 s), or drops it.
    while time.monotonic() - last < 2.0 and sent < 64 * MiB:
        try:
            n = flooder.send(view)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        except OSError:
            break
        sent += n
        last = time.monotonic()
        view = view[n:] or memoryview(ping)
    assert 10 * MiB > sent > MiB  # it stopped taking them: a million pings and more
    assert rss(b) - base < SLACK  # 20 bytes of reply per ping: not kept without bound
    # Someone else is served while it sits there.
    other = direct()
    got = []
    with Connection(b.url) as conn:
        with Consumer(conn, [other], callbacks=[lambda body, m: (got.append(body), m.ack())]):
            Producer(conn).publish("hi", exchange=other.exchange, routing_key=other.routing_key,
                                   declare=[other])
            drain_until(conn, lambda: got == ["hi"])
    wait_until(lambda: "send_timeout" in b.log_tail(), what="the broker to drop the flooder")
    flooder.close()
    # What it held comes back.
    assert sorted(drain_ids(b.url, q, 5)) == list(range(5))


# -- memory given back ---------------------------------------------------------------------

def test_memory_comes_back_after_a_purge(start_broker):
    b = start_broker()
    q = direct()
    base = rss(b)
    body = {"pad": "x" * 1000}
    with Connection(b.url) as conn:
        producer = Producer(conn)
        producer.maybe_declare(q)
        for _ in range(60_000):  # ~70 MB held
            producer.publish(body, exchange=q.exchange, routing_key=q.routing_key)
        bound = q(conn.default_channel)
        wait_until(lambda: bound.queue_declare(passive=True).message_count == 60_000,
                   what="60,000 messages")
        peak = rss(b) - base
        assert peak > 60 * MiB
        assert bound.purge() == 60_000
        wait_until(lambda: rss(b) - base < 16 * MiB, what="the purged memory to come back")


# -- heartbeats ---------------------------------------------------------------------------

_STOPPED_CONSUMER = r"""
import sys, time
from kombu import Connection, Consumer, Exchange, Queue
import transports
url, name = sys.argv[1], sys.argv[2]
q = Queue(name, Exchange(name, "direct"), routing_key=name)
got = []
with Connection(url, heartbeat=1) as conn:
    with Consumer(conn, [q], callbacks=[lambda b, m: got.append(b)], prefetch_count=10):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.1)
            except TimeoutError:
                pass
            conn.heartbeat_check()
            if len(got) == 10:
                print("holding 10", flush=True)
                got.append(None)
"""


def test_a_stopped_consumers_unacked_messages_reach_another_within_the_heartbeat_bound(
        start_broker):
    """A consumer that asked for 1 s heartbeats holds 10 unacked messages, then is
    SIGSTOPped: its socket stays open, but two missed heartbeats later the broker drops
    it and another consumer gets the 10, redelivered (py-amqp's heartbeat semantics)."""
    import signal
    import subprocess
    import sys

    b = start_broker()
    q = direct()
    with Connection(b.url) as conn:
        producer = Producer(conn)
        for i in range(10):
            producer.publish({"i": i}, exchange=q.exchange, routing_key=q.routing_key,
                             declare=[q] if not i else [])
    child = subprocess.Popen([sys.executable, "-c", _STOPPED_CONSUMER, b.url, q.name],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "holding 10"
        os.kill(child.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        got = []
        with Connection(b.url) as conn:
            with Consumer(conn, [q], callbacks=[lambda body, m: (got.append(
                    (body["i"], m.delivery_info["redelivered"])), m.ack())]):
                # The bound: 2 heartbeats (2 s) + the broker's 0.25 s tick, generously.
                drain_until(conn, lambda: len(got) == 10, timeout=2 * 1 + 3.0)
        assert sorted(got) == [(i, True) for i in range(10)]
        assert time.monotonic() - stopped < 5.0
        wait_until(lambda: "2 heartbeats of 1s" in b.log_tail(), what="the broker's log line")
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait(WAIT_S)


def test_a_client_notices_a_stopped_broker_within_two_heartbeats(start_broker):
    """The broker SIGSTOPped: heartbeat_check raises a connection error once two
    heartbeat intervals passed with nothing from it."""
    import signal

    b = start_broker()
    with Connection(b.url, heartbeat=1) as conn:
        conn.connect()
        conn.default_channel.basic_qos(0, 1, False)
        os.kill(b.pid, signal.SIGSTOP)
        try:
            with pytest.raises(conn.connection_errors, match="no heartbeat from the broker"):
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline:
                    conn.heartbeat_check()
                    time.sleep(0.1)
        finally:
            os.kill(b.pid, signal.SIGCONT)
