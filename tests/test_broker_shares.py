"""One client's shares of the unix broker's broker-wide limits: a client is a process
(its connections share one budget, SO_PEERCRED), and what one fills (max_client_memory,
max_client_objects, max_process_reserved) stops only it, never another process. Real
brokers on private sockets; the other clients are child processes; every wait is
bounded. Each test has a control: the share raised to the broker-wide limit, where
the same client does stop the others."""
from __future__ import annotations

import os
import socket
import threading

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import ChannelError

import transports  # noqa: F401  registers the unix alias
from transports import broker as unix_broker
from transports import protocol as proto
from transports import unix
from support import child, drain_until, qname, wait_until

WAIT_S = 30.0  # generous bound for what takes milliseconds
MiB = 1024 * 1024
UNBOUNDED = 2 ** 62   # queue limits out of the way: memory is what fills

# Another client process: "fill NAME" publishes 10 KB messages to an unconsumed queue
# until back-pressure refuses one; "publish NAME SIZE" one confirmed publish; "declare
# NAME" one queue. Each prints one line: "ok", or "refused <count> <error>".
CLIENT = r"""
import sys
from kombu import Connection, Exchange, Producer, Queue
import transports
url, action, name = sys.argv[1:4]
q = Queue(name, Exchange(name, "direct"), routing_key=name, max_length=2 ** 62,
          max_length_bytes=2 ** 62)
opts = {"publish_timeout": 1.0, "confirm_publish": True}
n = 0
try:
    with Connection(url, transport_options=opts) as conn:
        if action == "declare":
            conn.default_channel.queue_declare(name)
        else:
            producer = Producer(conn)
            producer.maybe_declare(q)
            if action == "fill":
                for n in range(1_000_000):
                    producer.publish({"pad": "x" * 10_000}, exchange=q.exchange,
                                     routing_key=q.routing_key)
            else:
                producer.publish(b"p" * int(sys.argv[4]), exchange=q.exchange,
                                 routing_key=q.routing_key, content_type="application/data",
                                 content_encoding="binary")
    print("ok", flush=True)
except Exception as exc:
    print("refused", n, f"{type(exc).__name__}: {exc}", flush=True)
"""


def other_client(url, action, name, *args) -> str:
    """Run CLIENT in a child process (another pid: another client); its one line."""
    proc = child(CLIENT, url, action, name, *args)
    out, err = proc.communicate(timeout=WAIT_S * 2)
    assert proc.returncode == 0, err
    return out.strip()


def unbounded(name=None) -> Queue:
    name = name or qname()
    return Queue(name, Exchange(name, "direct"), routing_key=name, max_length=UNBOUNDED,
                 max_length_bytes=UNBOUNDED)


def publish_one(conn, q, size=1000):
    Producer(conn).publish(b"o" * size, exchange=q.exchange, routing_key=q.routing_key,
                           declare=[q], content_type="application/data",
                           content_encoding="binary")


CONFIRMED = {"publish_timeout": 1.0, "confirm_publish": True}


# -- memory ----------------------------------------------------------------------------

@pytest.mark.parametrize("share", [4 * MiB, 16 * MiB], ids=["own-share", "control-no-share"])
def test_a_client_filling_its_memory_share_cannot_stop_another_client(start_broker, share):
    """Another process publishes to a queue nobody consumes (its limits out of the way)
    until refused: at its share, max_client_memory (4 MiB of the broker's 16 MiB), with
    an error naming that option; this process then publishes and consumes as before,
    though the hoarder's messages are all still held. The control, a share
    as large as max_memory: the hoarder reaches the broker-wide limit and this process's
    publish is refused too."""
    b = start_broker(max_memory=16 * MiB, max_client_memory=share)
    hoard = qname()
    line = other_client(b.url, "fill", hoard)
    assert line.startswith("refused ") and "PublishBlockedError" in line, line
    count = int(line.split()[1])
    mine = unbounded()
    with Connection(b.url, transport_options=CONFIRMED) as conn:
        if share < 16 * MiB:
            assert f"max_client_memory={share}" in line and "--max-client-memory" in line
            assert "1 connection(s)" in line
            assert count * 10_000 < share + 64 * 1024   # it stopped at its share
            publish_one(conn, mine, MiB)
            got = []
            with Consumer(conn, [mine], callbacks=[lambda body, m: (got.append(body),
                                                                    m.ack())]):
                drain_until(conn, lambda: got)
            assert got == [b"o" * MiB]
        else:
            assert "memory limit" in line and "max_memory=" in line, line
            with pytest.raises(unix.PublishBlockedError, match="the broker's memory limit"):
                publish_one(conn, mine)
        # Its messages are all there: held back is not dropped.
        assert unbounded(hoard)(conn.default_channel).queue_declare(
            passive=True).message_count == count
    assert b.alive()


@pytest.mark.parametrize("grouping", ["process", "control-per-connection"])
def test_a_processs_second_connection_shares_the_first_ones_budget(start_broker, sockdir,
                                                                    monkeypatch, grouping):
    """Connection A of this process publishes 3 MiB, past its 2 MiB memory share (a
    publish is taken while under it); a second connection B of the same process, A still
    open, is refused, the error counting both connections. Acking A's message gives the
    budget back: B publishes then. The control, a broker that cannot tell processes
    apart (SO_PEERCRED unavailable: each connection is its own client, an in-thread
    broker with the look-up failing): B publishes while A is past its share."""
    share = 2 * MiB
    if grouping == "process":
        b = start_broker(max_memory=16 * MiB, max_client_memory=share)
        url, stop = b.url, None
    else:
        monkeypatch.setattr(unix_broker.Broker, "_peer_pid", lambda self, sock: None)
        broker = unix_broker.Broker(str(sockdir / "in.sock"), limits=unix_broker.Limits(
            max_memory=16 * MiB, max_client_memory=share))
        broker.listen()
        loop = threading.Thread(target=broker.serve_forever,
                                kwargs={"install_signals": False}, daemon=True)
        loop.start()
        url = f"unix://{broker.path}"

        def stop():
            broker.stop()
            loop.join(WAIT_S)
    try:
        qa, qb = unbounded(), unbounded()
        with Connection(url, transport_options=CONFIRMED) as a:
            publish_one(a, qa, 3 * MiB)
            count = 1
            with Connection(url, transport_options=CONFIRMED) as conn_b:
                if grouping == "process":
                    with pytest.raises(unix.PublishBlockedError,
                                       match=r"its 2 connection\(s\) \(max_client_memory="):
                        publish_one(conn_b, qb)
                else:
                    publish_one(conn_b, qb)
                    return
            # Its messages acked (from a third connection): the budget is back.
            got = []
            with Connection(url) as reader:
                with Consumer(reader, [qa], callbacks=[lambda body, m: (got.append(1),
                                                                        m.ack())]):
                    drain_until(reader, lambda: len(got) == count)
            with Connection(url, transport_options=CONFIRMED) as conn_b:
                publish_one(conn_b, qb)
                assert qb(conn_b.default_channel).queue_declare(
                    passive=True).message_count == 1
    finally:
        if stop:
            stop()


# -- objects ---------------------------------------------------------------------------

@pytest.mark.parametrize("share", [20, 100], ids=["own-share", "control-no-share"])
def test_a_client_at_its_object_share_is_refused_naming_the_option(start_broker, share):
    """This process declares queues until refused: at max_client_objects (20 of the
    broker's 100), a PRECONDITION_FAILED naming the option. Another
    process still declares a queue; once this one deletes a queue, it declares again.
    The control, a share as large as max_objects: the refusal names max_objects and
    the other process is refused too."""
    b = start_broker(max_objects=100, max_client_objects=share)
    declared = []
    with Connection(b.url) as conn:
        channel = conn.default_channel
        with pytest.raises(ChannelError) as refused:
            for _ in range(200):
                declared.append(qname())
                channel.queue_declare(declared[-1])
        text = str(refused.value)
        assert len(declared) - 1 == share   # the last one refused
        other = other_client(b.url, "declare", qname())
        if share < 100:
            assert f"max_client_objects={share}" in text and "--max-client-objects" in text
            assert other == "ok", other
            channel.queue_delete(declared[0])
            channel.queue_declare(declared[-1])   # refused before, room now
        else:
            assert "max_objects=100" in text, text
            assert other.startswith("refused"), other


# -- the big-frame reservation ----------------------------------------------------------

def round_trip(url):
    """An answered request: the broker has read what was sent before it (its turn ran)."""
    with Connection(url) as conn:
        conn.default_channel.queue_declare(qname(), passive=False)


@pytest.mark.parametrize("reserved", [None, 48 * MiB], ids=["own-share", "control-no-share"])
def test_a_processs_connections_together_hold_one_big_frame_reservation(start_broker,
                                                                         reserved):
    """A connection of this process stops half-way through an 8 MiB frame: it holds the
    process's big-frame reservation, max_process_reserved (one frame's worth by
    default). Another connection of this process cannot have its 6 MiB publish read
    (its confirm times out); another process's 6 MiB publish is read and confirmed.
    The control, the share raised to the whole pool (48 MiB): the second connection's
    publish goes through too (before, connections of one process were not counted
    together)."""
    options = {"frame_timeout": 0}
    if reserved:
        options["max_process_reserved"] = reserved
    b = start_broker(**options)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.settimeout(WAIT_S)
    stalled.connect(b.path)
    hello = proto.RPC_HEAD.pack(proto.OP_HELLO, 0, 1) + proto.MAGIC + proto.U16.pack(
        proto.PROTOCOL_VERSION)
    stalled.sendall(proto.U32.pack(len(hello)) + hello + proto.U32.pack(8 * MiB - 1)
                    + b"\x02\x00\x01\x00\x00\x00\x01q" + b"z" * MiB)
    try:
        round_trip(b.url)   # the stalled frame's reservation is made
        q = unbounded()
        with Connection(b.url, transport_options=CONFIRMED) as conn:
            if reserved is None:
                with pytest.raises(unix.PublishBlockedError):
                    publish_one(conn, q, 6 * MiB)
            else:
                publish_one(conn, q, 6 * MiB)
        assert other_client(b.url, "publish", qname(), 6 * MiB) == "ok"
    finally:
        stalled.close()
    # Its reservation ends with it: this process reads big frames again.
    with Connection(b.url, transport_options=dict(CONFIRMED, publish_timeout=WAIT_S)) as conn:
        publish_one(conn, q, 6 * MiB)


# -- the accounting itself ---------------------------------------------------------------

def test_a_processs_shares_follow_publishes_acks_rejects_purges_and_deletes(sockdir):
    """In-thread broker, its state read directly: after publishes on two connections,
    deliveries, acks, rejects with and without requeue, a no_ack get, a purge and a
    queue delete, this process's memory share equals the cost of its held messages
    (ready and unacked) and its object share what it declared that still exists; its
    shares outlive its connections while it holds messages; once its connections are
    gone and its queues deleted the broker forgets it."""
    broker = unix_broker.Broker(str(sockdir / "in.sock"))
    broker.listen()
    loop = threading.Thread(target=broker.serve_forever, kwargs={"install_signals": False},
                            daemon=True)
    loop.start()
    overhead = unix_broker.model.MSG_OVERHEAD

    def settled(conn):   # a round trip: the broker ran everything sent before it
        conn.default_channel.basic_qos(0, 0, False)

    def shares_match():
        peer = broker.peers[os.getpid()]
        held = [m for q in broker.queues.values() for m in q.messages]
        held += [e[1:] for c in broker.clients.values() for ch in c.channels.values()
                 for e in ch.unacked.values()]
        assert all(m[-1] == peer.key for m in held)
        assert peer.memory == sum(len(m[0]) + overhead for m in held)
        objects = (len(broker.queues) + len(broker.exchanges) - 3 + sum(
            len(q.bindings) for q in broker.queues.values()) + sum(
            len(c.channels) + sum(len(ch.consumers) for ch in c.channels.values())
            for c in broker.clients.values()))
        assert peer.objects == broker.objects == objects
        return peer
    try:
        q1, q2 = unbounded(), unbounded()
        url = f"unix://{broker.path}"
        got = []
        with Connection(url) as conn, Connection(url) as conn2:
            for i in range(30):
                Producer(conn if i % 2 else conn2).publish(
                    {"i": i}, exchange=q1.exchange, routing_key=q1.routing_key,
                    declare=[q1, q2] if i < 2 else [])
                Producer(conn).publish({"i": i}, exchange=q2.exchange,
                                       routing_key=q2.routing_key)
            settled(conn)
            settled(conn2)
            before = shares_match()
            assert before.conns == 2
            consumer = Consumer(conn, [q1], callbacks=[lambda body, m: got.append(m)])
            consumer.qos(prefetch_count=10)
            consumer.consume()
            drain_until(conn, lambda: len(got) == 10)
            settled(conn)
            shares_match()
            got[0].ack()
            got[1].reject(requeue=True)
            got[2].reject(requeue=False)
            got[9].channel.basic_ack(got[9].delivery_tag, multiple=True)
            drain_until(conn, lambda: len(got) >= 12)
            consumer.cancel()
            settled(conn)
            shares_match()
            assert conn2.default_channel.basic_get(q2.name, no_ack=True) is not None
            settled(conn2)
            shares_match()
            assert q2(conn2.default_channel).purge() == 29
            settled(conn2)
            assert shares_match().memory > 0   # q1's, ready and unacked
        with Connection(url) as conn:
            settled(conn)
            # The two closed connections are seen gone (their EOF may come a turn later).
            wait_until(lambda: broker.peers[os.getpid()].conns == 1, what="one connection")
            peer = shares_match()
            # The same shares: what it holds still counts when it reconnects.
            assert peer is before and peer.memory > 0
            for q in (q1, q2):
                q(conn.default_channel).delete()
                q.exchange(conn.default_channel).delete()
            settled(conn)
            assert shares_match().memory == 0
        # Nothing held and no connection: a new process with this pid starts afresh.
        wait_until(lambda: os.getpid() not in broker.peers, what="the peer forgotten")
    finally:
        broker.stop()
        loop.join(WAIT_S)


# -- settings ----------------------------------------------------------------------------

# Bad values of these settings: tests/test_broker_limits.py's
# test_bad_per_connection_limits_are_one_line_and_exit_2 (and test_bad_inputs.py).

def test_shares_follow_the_broker_wide_limits_unless_set():
    limits = unix_broker.Limits(max_memory=64 * MiB, max_objects=400)
    assert (limits.max_client_memory, limits.max_client_objects,
            limits.max_process_reserved) == (32 * MiB, 100, limits.max_frame)
    assert limits.flags() == ["--max-memory", repr(64 * MiB), "--max-objects", "400"]
    assert "--max-client-memory" in unix_broker.Limits(max_client_memory=MiB).flags()
