"""The unix broker under attack: random and malformed frames from many connections,
connection and publish floods, a refused HELLO with frames behind it, silent and idle
connections, the open-file limit, a pathological topic pattern. Each attack is
bounded in time and memory, runs on a private socket, and a good client is served
throughout. Seeds are fixed and printed on failure."""
from __future__ import annotations

import os
import random
import re
import resource
import socket
import threading
import time
from contextlib import contextmanager

import psutil
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

import transports  # noqa: F401  registers the unix alias
from transports import broker as unix_broker
from transports import protocol as proto
from transports import unix
from support import child, drain_quietly, drain_until, qname, wait_until

WAIT_S = 30.0  # generous bound for what takes milliseconds
MiB = 1024 * 1024
SLACK = 48 * MiB  # Python, buffers of the attacking connections, queues they made


def rss(b) -> int:
    return psutil.Process(b.pid).memory_info().rss


def hello(version=proto.PROTOCOL_VERSION, reqid=1) -> bytes:
    body = proto.RPC_HEAD.pack(proto.OP_HELLO, 0, reqid) + proto.MAGIC + proto.U16.pack(version)
    return proto.U32.pack(len(body)) + body


def rpc_frame(op, reqid, body=b"", channel=1) -> bytes:
    data = proto.RPC_HEAD.pack(op, channel, reqid) + body
    return proto.U32.pack(len(data)) + data


def publish_frame(queue: str, payload: bytes, channel=1) -> bytes:
    rk = queue.encode()
    data = proto.PUBLISH_HEAD.pack(proto.OP_PUBLISH, channel, 0) + proto.U16.pack(len(rk)) + rk \
        + payload
    return proto.U32.pack(len(data)) + data


def connect_raw(path, timeout=WAIT_S) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def closed_by_peer(sock, timeout=WAIT_S) -> bytes | None:
    """Everything the broker sent before closing ``sock``; None if it did not close it."""
    sock.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return got
        if not data:
            return got
        got += data
    return None


class GoodClient:
    """A Kombu client that publishes and consumes its own queue, round after round."""

    def __init__(self, url):
        self.url = url
        self.q = Queue(qname("good"), Exchange(qname("good"), "direct"), routing_key="good")
        self.got = []
        self.sent = 0

    def round(self, n=20):
        with Connection(self.url) as conn:
            with Consumer(conn, [self.q], callbacks=[lambda b, m: (self.got.append(b),
                                                                   m.ack())]):
                producer = Producer(conn)
                for _ in range(n):
                    producer.publish(self.sent, exchange=self.q.exchange,
                                     routing_key=self.q.routing_key, declare=[self.q])
                    self.sent += 1
                drain_until(conn, lambda: len(self.got) == self.sent)

    def check(self):
        assert self.got == list(range(self.sent))  # every one, once, in order


# -- malformed input ---------------------------------------------------------------------

OPS = [v for k, v in vars(proto).items() if k.startswith("OP_") and isinstance(v, int)]


def random_frame(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.55:  # a well-formed header and random arguments
        op = rng.choice(OPS)
        body = bytes([op]) + proto.U16.pack(rng.randrange(4)) + rng.randbytes(rng.randrange(40))
        if rng.random() < 0.3:  # names the broker will look up or create
            body += proto.pack_str(f"fz{rng.randrange(50)}")
        return proto.U32.pack(len(body)) + body
    if kind < 0.75:  # a valid publish or declare on a fuzz queue
        if rng.random() < 0.5:
            return publish_frame(f"fz{rng.randrange(20)}", rng.randbytes(rng.randrange(200)))
        return rpc_frame(proto.OP_QUEUE_DECLARE, rng.randrange(1 << 31),
                         b"\x00" + proto.pack_str(f"fz{rng.randrange(50)}"))
    if kind < 0.85:  # a lying length prefix
        return proto.U32.pack(rng.choice([0, 1, 2, 0xFFFFFFFF, 9 * MiB, rng.randrange(1 << 16)])) \
            + rng.randbytes(rng.randrange(16))
    return rng.randbytes(rng.randrange(1, 64))  # noise


@pytest.mark.timeout(300)
def test_fuzz_from_many_connections(start_broker):
    seed = int(os.environ.get("FUZZ_SEED", "20261130"))
    b = start_broker(handshake_timeout=1.0)
    base = rss(b)
    good = GoodClient(b.url)
    stop = threading.Event()
    stats = {"frames": 0, "connections": 0}

    def attacker(k):
        rng = random.Random(seed * 100 + k)
        sock = None
        while not stop.is_set() and stats["frames"] < 20_000:
            if sock is None:
                try:
                    sock = connect_raw(b.path, timeout=1.0)
                    stats["connections"] += 1
                    if rng.random() < 0.9:
                        sock.sendall(hello())
                except OSError:
                    sock = None
                    continue
            try:
                sock.sendall(b"".join(random_frame(rng) for _ in range(rng.randrange(1, 20))))
                stats["frames"] += 1
                if rng.random() < 0.3:  # read some, not all: replies may back up
                    sock.settimeout(0.001)
                    try:
                        sock.recv(65536)
                    except socket.timeout:
                        pass
                    sock.settimeout(1.0)
            except OSError:  # the broker hung up on it: a new connection
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=attacker, args=(k,), daemon=True) for k in range(16)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while stats["frames"] < 20_000 and time.monotonic() < deadline:
            good.round()
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_S)
    assert b.alive(), f"seed {seed}: {b.log_tail()}"
    assert stats["frames"] > 1000 and stats["connections"] > 16, stats
    good.round()
    good.check()
    assert rss(b) - base < SLACK, f"seed {seed}"
    assert "Traceback" not in b.log_tail(10_000), f"seed {seed}: a handler bug"


def test_a_refused_hello_runs_nothing_behind_it(start_broker):
    b = start_broker()
    name = qname("after-hello")
    sock = connect_raw(b.path)
    # One write: a HELLO of an unknown version, then a declare and a publish.
    sock.sendall(hello(version=99) + rpc_frame(proto.OP_QUEUE_DECLARE, 2,
                                               b"\x00" + proto.pack_str(name))
                 + publish_frame(name, b"x"))
    sent = closed_by_peer(sock)
    assert sent is not None, "the broker kept the connection"
    (length,) = proto.U32.unpack_from(sent, 0)
    _, _, reqid, status = proto.RPC_HEAD.unpack_from(sent, 4) + (sent[11],)
    assert (reqid, status) == (1, proto.STATUS_PRECONDITION)
    assert b"protocol version 99 not supported" in sent[12:4 + length]
    assert len(sent) == 4 + length  # nothing else: the declare never ran
    # A bad frame after a good HELLO: nothing behind it runs either.
    sock = connect_raw(b.path)
    sock.sendall(hello() + proto.U32.pack(3) + b"\xee\x00\x01"
                 + rpc_frame(proto.OP_QUEUE_DECLARE, 2, b"\x00" + proto.pack_str(name)))
    assert closed_by_peer(sock) is not None
    with Connection(b.url) as conn:
        with pytest.raises(conn.channel_errors, match="NOT_FOUND"):
            Queue(name)(conn.default_channel).queue_declare(passive=True)


def test_silent_connections_are_closed_greeted_idle_ones_are_not(start_broker):
    b = start_broker(handshake_timeout=0.5)
    silent = connect_raw(b.path)
    greeted = connect_raw(b.path)
    greeted.sendall(hello())
    assert closed_by_peer(silent) is not None  # no HELLO within 0.5 s
    # The greeted one sat idle as long; it still answers (idle_timeout is off by default).
    greeted.sendall(rpc_frame(proto.OP_PING, 7))
    greeted.settimeout(WAIT_S)
    data = b""
    while len(data) < 40:  # the greeting's answer, then the ping's (20 bytes each)
        data += greeted.recv(4096)
    assert proto.RPC_HEAD.unpack_from(data, 4 + 4 + 8 + proto.HELLO_OK.size)[2] == 7
    greeted.close()
    wait_until(lambda: "no HELLO within 0.5s" in b.log_tail(), what="the log line")


def test_idle_timeout_when_asked_for(start_broker):
    b = start_broker(idle_timeout=0.5)
    with Connection(b.url) as conn:
        conn.connect()
        q = Queue(qname())
        q(conn.default_channel).declare()
        wait_until(lambda: "idle_timeout" in b.log_tail(), what="the idle connection closed")
        with pytest.raises(conn.connection_errors):
            q(conn.default_channel).queue_declare(passive=True)


# -- floods -----------------------------------------------------------------------------

def test_a_connection_flood_is_busy_not_missing_and_passes(start_broker):
    b = start_broker(max_connections=16, backlog=4, handshake_timeout=1.0)
    flood = []
    try:
        refused_since = None
        # The 16 it serves, then its backlog, until connecting fails for half a second.
        while len(flood) < 200:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(b.path)
            except BlockingIOError:
                sock.close()
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > 0.5:
                    break
                time.sleep(0.02)
                continue
            refused_since = None
            flood.append(sock)
        else:
            pytest.fail("the broker accepted 200 connections past max_connections=16")
        conn = Connection(b.url, connect_timeout=0.2,
                          transport_options={"max_retries": 0})
        with pytest.raises(unix.BrokerConnectionError) as info:
            conn.transport.establish_connection()
        assert "is busy" in str(info.value) and "no unix broker" not in str(info.value)
        # With time to wait, it gets in: the silent ones are closed after their handshake time.
        good = GoodClient(b.url)
        with Connection(b.url, connect_timeout=WAIT_S) as c:
            c.connect()
        good.round()
        good.check()
    finally:
        for sock in flood:
            sock.close()
    wait_until(lambda: "not accepting more" in b.log_tail(100), what="the log line")
    assert b.log_tail(1000).count("not accepting more") <= 3  # once per episode


FLOODER = """
import sys, transports
from kombu import Connection, Producer
url, name, me, conns, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
connections = [Connection(url) for _ in range(conns)]
producers = [Producer(c) for c in connections]
for i in range(per):
    for k, p in enumerate(producers):
        p.publish([me, k, i], routing_key=name)
for c in connections:
    c.release()
print("done", flush=True)
"""


@pytest.mark.timeout(300)
def test_a_publish_flood_from_many_connections(start_broker):
    b = start_broker()
    q = Queue(qname("flood"), routing_key=None)
    procs_n, conns, per = 4, 16, 500
    total = procs_n * conns * per
    seen = set()
    good = GoodClient(b.url)
    with Connection(b.url) as conn:
        q(conn.default_channel).declare()
        with Consumer(conn, [q], callbacks=[lambda body, m: (seen.add(tuple(body)), m.ack())]):
            procs = [child(FLOODER, b.url, q.name, p, conns, per) for p in range(procs_n)]
            try:
                deadline = time.monotonic() + 120
                while len(seen) < total and time.monotonic() < deadline:
                    good.round(5)
                    try:
                        conn.drain_events(timeout=0.05)
                    except socket.timeout:
                        pass
                drain_until(conn, lambda: len(seen) >= total, timeout=120)
            finally:
                for proc in procs:
                    _, err = proc.communicate(timeout=120)
                    assert proc.returncode == 0, err
    assert len(seen) == total
    good.check()


def test_at_the_open_file_limit_accept_backs_off(start_broker, sockdir):
    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    b = start_broker(preexec_fn=low_fd_limit, handshake_timeout=WAIT_S)
    proc = psutil.Process(b.pid)
    socks = []
    try:
        for _ in range(60):  # past the limit: the rest wait in the backlog
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(b.path)
            except BlockingIOError:
                sock.close()
                break
            sock.send(hello())
            socks.append(sock)
        wait_until(lambda: "cannot accept connections" in b.log_tail(), what="EMFILE")
        cpu = proc.cpu_times()
        time.sleep(2.0)  # a window to see whether it spins
        used = sum(proc.cpu_times()[:2]) - sum(cpu[:2])
        assert used < 0.5, f"the broker burned {used:.2f} s of CPU in 2 s at the fd limit"
        # One line per episode (the readiness probe's exit ends the first), not per attempt.
        assert b.log_tail(1000).count("cannot accept connections") <= 3
    finally:
        for sock in socks:
            sock.close()
    good = GoodClient(b.url)
    good.round()
    good.check()
    wait_until(lambda: "accepting connections again" in b.log_tail(1000), what="the recovery")


# -- topic matching ----------------------------------------------------------------------

def _backtracking(pattern: list[bytes], words: list[bytes]) -> bool:
    """The matcher the broker had: right by definition, exponential in the '#'s."""
    if not pattern:
        return not words
    head = pattern[0]
    if head == b"#":
        return any(_backtracking(pattern[1:], words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == b"*" or head == words[0]) and _backtracking(pattern[1:], words[1:])


def test_topic_matching_agrees_with_a_reference():
    rng = random.Random(7)
    words = [b"a", b"b", b"c", b"*", b"#"]
    for _ in range(5000):
        pattern = b".".join(rng.choice(words) for _ in range(rng.randrange(1, 6)))
        key = b".".join(rng.choice([b"a", b"b", b"c"]) for _ in range(rng.randrange(1, 7)))
        assert unix_broker.topic_matches(pattern.split(b"."), key.split(b".")) == \
            _backtracking(pattern.split(b"."), key.split(b".")), (pattern, key)


@pytest.mark.timeout(60)
def test_a_pathological_topic_pattern_is_routed_promptly(start_broker):
    # Backtracking took 34.5 s for nine '#' against 24 words; this is far worse for it.
    assert not unix_broker.topic_matches([b"#"] * 30 + [b"x"], [b"w"] * 200)
    b = start_broker()
    name = qname("topic")
    exchange = Exchange(name, type="topic")
    trap = Queue(f"{name}-trap", exchange, routing_key=".".join(["#"] * 9 + ["x"]))
    got = []
    # rpc_timeout bounds every answer: a broker stuck routing fails this, it does not hang.
    with Connection(b.url, transport_options={"rpc_timeout": 10.0, "publish_timeout": 10.0,
                                              "confirm_publish": True}) as conn:
        with Consumer(conn, [trap], callbacks=[lambda body, m: (got.append(body), m.ack())]):
            producer = Producer(conn)
            for i in range(20):  # each key new: no cached route
                producer.publish("miss", exchange=exchange,
                                 routing_key=".".join(["w"] * 24 + [str(i)]))
            producer.publish("hit", exchange=exchange, routing_key=".".join(["w"] * 24 + ["x"]))
            drain_until(conn, lambda: got)
            drain_quietly(conn, 0.2)
    assert got == ["hit"]


def _recv_exactly(sock, n) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the broker closed the connection"
        data += chunk
    return data


@pytest.mark.timeout(120)
@contextmanager
def ping_probe(path):
    """A raw connection pinging every 2 ms in a thread; yields [worst round trip, s]."""
    pinger = connect_raw(path)
    pinger.sendall(hello())
    _recv_exactly(pinger, 20)
    worst, stop = [0.0], threading.Event()

    def ping():
        reqid = 100
        while not stop.is_set():
            reqid += 1
            t0 = time.perf_counter()
            pinger.sendall(rpc_frame(proto.OP_PING, reqid))
            _recv_exactly(pinger, 20)
            worst[0] = max(worst[0], time.perf_counter() - t0)
            time.sleep(0.002)
    thread = threading.Thread(target=ping, daemon=True)
    thread.start()
    try:
        yield worst
    finally:
        stop.set()
        thread.join(WAIT_S)
        pinger.close()


# The bounded-work guarantee is checked as CPU time: the broker records the most CPU
# one loop turn took (--measure-turns), and a ping waits for at most the turn under
# way. A ping's wall time through a scheduler at load ~12 on 2 vCPU also counts the
# time the broker was not running at all (it flaked at 50 ms); it is only checked
# for a freeze of seconds, as the 12.3 s one of issue 21.
TURN_CPU_MS = 50.0
PING_WALL_S = 2.0


def longest_turn_ms(b) -> float:
    """The most CPU time one loop turn of ``b`` took, from its log once stopped."""
    b.stop()
    found = re.findall(r"longest loop turn: ([0-9.]+) ms of CPU", b.log_path.read_text())
    assert found, b.log_tail()
    return float(found[-1])


def test_hash_bindings_and_a_64k_key_never_stall_a_concurrent_ping(start_broker):
    """25 topic bindings of 126 '#' each, then publishes with 65,533-byte keys (a raw
    client: ours refuses such a key) and with ever-new 255-byte keys: no loop turn of
    the broker takes 50 ms of CPU (a bounded-work guarantee, generous), and a ping on
    another connection is answered throughout."""
    b = start_broker(measure_turns=True)
    name = qname("topic")
    exchange = Exchange(name, type="topic")
    pattern = ".".join(["#"] * 126)
    with Connection(b.url) as conn:
        for k in range(25):
            Queue(f"{name}-{k}", exchange, routing_key=pattern)(conn.default_channel).declare()
        with pytest.raises(conn.channel_errors, match="at most 255 bytes"):
            Producer(conn).publish("x", exchange=exchange, routing_key="w." * 200)
    with ping_probe(b.path) as worst:
        attacker = connect_raw(b.path)
        attacker.sendall(hello())
        _recv_exactly(attacker, 20)
        ex = name.encode()
        for i in range(20):
            rk = (b"w." * 32766 + str(i).encode())[:65533]
            data = (proto.PUBLISH_HEAD.pack(proto.OP_PUBLISH, 1, len(ex)) + ex
                    + proto.U16.pack(len(rk)) + rk + b"{}")
            attacker.sendall(proto.U32.pack(len(data)) + data)
        attacker.sendall(rpc_frame(proto.OP_PING, 9))   # answered once all above ran
        _recv_exactly(attacker, 20)
        with Connection(b.url) as conn:
            producer = Producer(conn)
            for i in range(200):   # each key new: no cached route
                producer.publish("x", exchange=exchange,
                                 routing_key=(f"{i}." + "w." * 127)[:255])
            conn.default_channel.basic_qos(0, 1, False)  # a round trip: all routed
    assert b.alive()
    assert worst[0] < PING_WALL_S, f"a ping waited {worst[0]:.2f} s"
    turn = longest_turn_ms(b)
    assert turn < TURN_CPU_MS, f"one loop turn took {turn:.1f} ms of CPU"


def test_topic_matching_per_publish_is_bounded_whatever_the_bindings(start_broker):
    """The whole wildcard budget of a topic exchange (max_topic_wildcards distinct keys
    of the costliest shape, '#.w' x 62 then a word no key has: matched to the last word)
    beside thousands of literal bindings: publishes with ever-new 255-byte keys take no
    loop turn of 50 ms of CPU and a concurrent ping is answered throughout (literal keys
    are one look-up, not matched one by one). One more wildcard binding is refused,
    naming the limit; a literal one is still taken and routes."""
    b = start_broker(measure_turns=True)
    limit = unix_broker.Limits().max_topic_wildcards
    name = qname("topic")
    exchange = Exchange(name, type="topic")
    costly = ".".join(["#", "w"] * 62)
    with Connection(b.url) as conn:
        ch = conn.default_channel
        for k in range(limit):
            Queue(f"{name}-{k}", exchange, routing_key=f"{costly}.#.z{k}")(ch).declare()
        literal = Queue(f"{name}-literal", exchange, routing_key="plain.key")
        literal(ch).declare()
        for k in range(3000):
            ch.queue_bind(literal.name, exchange=name, routing_key=f"plain.{k}")
        with pytest.raises(conn.channel_errors, match="max_topic_wildcards"):
            ch.queue_bind(literal.name, exchange=name, routing_key="more.#")
        ch.queue_bind(literal.name, exchange=name, routing_key="plain.extra")
    with ping_probe(b.path) as worst:
        with Connection(b.url) as conn:
            producer = Producer(conn)
            for i in range(200):   # each key new: no cached route
                producer.publish("x", exchange=exchange,
                                 routing_key=(f"{i}." + "w." * 127)[:255])
            producer.publish("y", exchange=exchange, routing_key="plain.extra")
            conn.default_channel.basic_qos(0, 1, False)  # a round trip: all routed
            ch = conn.default_channel
            assert ch.queue_declare(literal.name, passive=True).message_count == 1
            assert ch.queue_declare(f"{name}-0", passive=True).message_count == 0
    assert b.alive()
    assert worst[0] < PING_WALL_S, f"a ping waited {worst[0]:.2f} s"
    turn = longest_turn_ms(b)
    assert turn < TURN_CPU_MS, f"one loop turn took {turn:.1f} ms of CPU"
