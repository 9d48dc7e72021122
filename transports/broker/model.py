"""The broker's model: its limits, the objects it keeps (queues, peers,
exchanges, consumers, channels, clients) and :class:`Routing`, the operations on them
that routing and delivery need (no socket I/O here: the loop in :mod:`.loop` writes
what these put in a client's output)."""
from __future__ import annotations

import errno
import logging
import struct
from collections import deque
from dataclasses import asdict, dataclass, fields
from operator import itemgetter

from ..framing import FrameReader
from ..protocol import (
    DEFAULT_MAX_FRAME, DELIVER_BODY_HEAD, DELIVER_HEAD, OP_ACK, OP_CONSUME, OP_DELIVER,
    OP_EXCHANGE_DECLARE, OP_EXCHANGE_DELETE, OP_GET, OP_HEARTBEAT, OP_PING, OP_QOS,
    OP_QUEUE_BIND,
    OP_QUEUE_DECLARE, OP_QUEUE_DELETE, OP_QUEUE_PURGE, OP_QUEUE_UNBIND, OP_RECOVER, OP_REJECT,
    ProtocolError,
)

from .topic import TopicPattern, is_wildcard, topic_matches  # noqa: F401  (re-exported)

log = logging.getLogger("transports.broker")

READ_SIZE = 64 * 1024
# Frames up to this size are read as they come; a larger one first reserves its
# size from max_memory, so many connections each half-way through a big frame
# cannot add up to more than the broker allows.
SMALL_FRAME = 64 * 1024
# Frames held back (behind a blocked publish, or requests while output waits) past
# which the broker stops reading the client: its socket fills and its write blocks.
PARK_LIMIT = 64 * 1024
# A hung-up publisher's remaining publishes are taken past max_memory by up to
# max_memory / REMAINS_SLACK_DIV in all: its publish() calls had returned.
REMAINS_SLACK_DIV = 8
REMAINS_SLACK_MIN = 8 * 1024 * 1024  # one connection's socket holds up to ~2 MB of them
# A client's requests wait while this much of its output is unsent (it is not reading).
REPLY_WATER = 64 * 1024
# What a buffered piece costs beyond its bytes (a small bytes object, a deque slot):
# counted against the limits above, or thousands of 11-byte pings cost 5x their size.
PIECE = 64
# Output is joined and written in pieces of this size: never the whole backlog per turn.
FLUSH_CHUNK = 256 * 1024
SOCKET_BUFFER = 1024 * 1024
ROUTE_CACHE_MAX = 65536
# Topic patterns matched per loop turn (a publish with a new key on a topic exchange
# costs one per wildcard binding) before a client's remaining frames wait for the next
# turn: 13-170 us each on a shared 2 vCPU host (2026-12-07), so a turn stays within
# a few milliseconds (docs/transports.md).
ROUTE_WORK_PER_TURN = 32
ROUTE_KEY_CACHED = 255   # longer routing keys are routed but not cached
MAX_NAME = 255           # AMQP's shortstr: queue, exchange and binding key names
# What a held message costs beyond its payload (bytes object, tuple, deque slot or
# unacked entry), measured ~120 bytes on CPython 3.11; counted against max_memory.
MSG_OVERHEAD = 160
# Give freed memory back to the system once this much came free since the last time.
TRIM_AFTER = 16 * 1024 * 1024
TICK_S = 0.25            # timeouts, paused accepts and hung-up peers are looked at this often
MAX_ACCEPT_PAUSE_S = 2.0
# Inside a stream of publishes or acks (a busy turn within twice this of the last
# one), pause this long before looking again, so the broker takes frames and writes
# deliveries in batches instead of being woken for every message: fewer context
# switches for everyone on a small host. At most this much added latency under
# load; none for a lone message or for calls that wait for an answer. 0 = off.
DEFAULT_COALESCE_S = 200e-6

# Frames that run even while a client's other frames are held back: they only free
# resources (credit, unacked messages), and holding them could deadlock a consumer.
_IMMEDIATE = frozenset((OP_ACK, OP_REJECT, OP_QOS, OP_HEARTBEAT))
_RPC_OPS = frozenset((OP_CONSUME, OP_EXCHANGE_DECLARE, OP_EXCHANGE_DELETE, OP_QUEUE_DECLARE,
                      OP_QUEUE_BIND, OP_QUEUE_UNBIND, OP_QUEUE_PURGE, OP_QUEUE_DELETE, OP_GET,
                      OP_RECOVER, OP_PING))
_MEMORY = "memory"       # Client.blocked when max_memory, not a queue, holds it back
_SHARE = "share"         # ... when its own max_client_memory does
_PEER_OF = itemgetter(2)  # a held message's publisher, its Peer.key (queued or unacked)
_EMFILE = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_HANG_UP = frozenset((errno.EPIPE, errno.ECONNRESET))
_SIOCOUTQ = 0x5411       # Linux: bytes written to a socket that its peer has not read yet
_INT = struct.Struct("i")


@dataclass(frozen=True)
class Limits:
    """What the broker lets its clients make it hold (CLI: ``--max-frame`` etc.)."""

    max_frame: int = DEFAULT_MAX_FRAME            # bytes in one frame (message + routing)
    max_queue_messages: int = 1_000_000           # ready messages per queue
    max_queue_bytes: int = 128 * 1024 * 1024      # ready payload bytes per queue
    max_memory: int = 192 * 1024 * 1024           # every message held (big frames: + 1/4)
    max_connections: int = 256
    max_objects: int = 20_000                     # queues+exchanges+bindings+channels+consumers
    max_topic_wildcards: int = 32                 # distinct '*'/'#' keys per topic exchange
    handshake_timeout: float = 5.0                # seconds to send a HELLO
    idle_timeout: float = 0.0                     # seconds without a frame; 0 = never
    frame_timeout: float = 10.0                   # seconds a big frame may take once its
                                                  # memory is reserved; 0 = never
    send_timeout: float = 30.0                    # seconds output may wait with no progress
    backlog: int = 512                            # listen(2) backlog
    # One connection's share (so it cannot starve the others of the broker-wide ones):
    max_client_unacked: int = 100_000             # unacked messages; then no deliveries
    max_client_unacked_bytes: int = 48 * 1024 * 1024  # ... their bytes (+ MSG_OVERHEAD)
    max_client_output: int = 256 * 1024           # unsent output; then no deliveries
    # One client's share, a client being a process (the connections with one SO_PEERCRED
    # pid; one connection when that is unknown). None: derived (DERIVED below).
    max_client_memory: int | None = None          # held messages it published; then its
                                                  # publishes wait
    max_client_objects: int | None = None         # queues+exchanges+bindings+channels+
                                                  # consumers it made that still exist
    max_process_reserved: int | None = None       # big-frame bytes its connections reserve

    def __post_init__(self):
        # Each message names the setting and its option (--max-frame...): the same on
        # python -m transports.broker and celery-bench broker.
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in DERIVED:
                continue
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{_setting(f.name)}={value!r}: expected a number >= 0")
        if not 1024 <= self.max_frame <= 64 * 1024 * 1024:
            raise ValueError(f"{_setting('max_frame')}={self.max_frame}: between 1 KiB and "
                             "64 MiB")
        if self.max_memory < 2 * self.max_frame:
            raise ValueError(f"{_setting('max_memory')}={self.max_memory} must be at least "
                             f"twice {_setting('max_frame')} ({self.max_frame})")
        if not 4096 <= self.max_client_output <= self.max_memory // 4:
            raise ValueError(f"{_setting('max_client_output')}={self.max_client_output}: "
                             f"between 4 KiB and a quarter of {_setting('max_memory')} "
                             f"({self.max_memory // 4})")
        for name in ("max_queue_messages", "max_queue_bytes", "max_connections", "max_objects",
                     "max_topic_wildcards", "handshake_timeout", "send_timeout", "backlog",
                     "max_client_unacked", "max_client_unacked_bytes"):
            if not getattr(self, name):
                raise ValueError(f"{_setting(name)} must be > 0")
        for name, (derive, _) in DERIVED.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, derive(self))
            elif not getattr(self, name):
                raise ValueError(f"{_setting(name)} must be > 0")
        if self.max_process_reserved < self.max_frame:
            raise ValueError(f"{_setting('max_process_reserved')}={self.max_process_reserved} "
                             f"must be at least {_setting('max_frame')} ({self.max_frame}), "
                             "or a frame that big could never be read")

    @property
    def max_reserved(self) -> int:
        """Big-frame bytes reserved for all connections: a quarter of max_memory, and at
        least two frames, since one connection may hold one (so one cannot hold it all,
        and a max_frame frame always fits)."""
        return max(self.max_memory // 4, 2 * self.max_frame)

    def flags(self) -> list[str]:
        """The ``python -m transports.broker`` options that give these limits."""
        out = []
        for name, value in asdict(self).items():
            default = DERIVED[name][0](self) if name in DERIVED else getattr(Limits, name)
            if value != default:
                out += [f"--{name.replace('_', '-')}", repr(value)]
        return out


# Shares that follow the broker-wide limits unless set: how, and how --help says it.
DERIVED = {
    "max_client_memory": (lambda lim: max(1, lim.max_memory // 2), "half of --max-memory"),
    "max_client_objects": (lambda lim: max(1, lim.max_objects // 4),
                           "a quarter of --max-objects"),
    "max_process_reserved": (lambda lim: lim.max_frame,
                             "--max-frame: one frame's worth, what one connection may hold"),
}


def _setting(name: str) -> str:
    """``max_frame (--max-frame)``: a setting as Python and both command lines name it."""
    return f"{name} (--{name.replace('_', '-')})"


# -- broker state ------------------------------------------------------------------


class Peer:
    """One client's shares: a process (the connections with one SO_PEERCRED pid) or,
    when the pid is unknown, one connection. Kept while it holds anything, so a client
    that reconnects finds its budget spent (a :class:`Broker` forgets it once idle).
    Held messages name it by ``key``, an int: a tuple of atomic values is untracked by
    the garbage collector, one holding this object would be scanned in every full
    collection (measured +330 ns per publish with 100,000 held)."""

    __slots__ = ("key", "pid", "label", "conns", "memory", "objects", "reserved")

    def __init__(self, key: int, pid: int | None, label: str):
        self.key = key                   # Broker.peers: the pid, or -n for connection n
        self.pid = pid                   # None: this one connection only
        self.label = label               # "process 1234" / "client#7", for messages
        self.conns = 0                   # its open connections
        self.memory = 0                  # cost of the held messages it published
        self.objects = 0                 # queues, exchanges, bindings, channels, consumers
        self.reserved = 0                # big-frame bytes its connections reserved


class Queue:
    __slots__ = ("name", "messages", "bytes", "consumers", "rr", "auto_delete", "owner",
                 "had_consumers", "bindings", "deleted", "max_messages", "max_bytes",
                 "creator")

    def __init__(self, name: bytes, limits: Limits, creator: Peer | None = None,
                 auto_delete=False, owner=None):
        self.name = name
        self.creator = creator           # the Peer whose share it counts in
        self.messages: deque = deque()   # (payload, redelivered, publisher's Peer.key)
        self.bytes = 0                   # payload bytes of the ready messages
        self.consumers: list = []
        self.rr = 0
        self.auto_delete = auto_delete
        self.owner = owner               # the client of an exclusive queue
        self.had_consumers = False
        self.bindings: dict = {}         # (exchange name, routing key) -> creating Peer
        self.deleted = False
        self.max_messages = limits.max_queue_messages
        self.max_bytes = limits.max_queue_bytes

    def full(self) -> bool:
        return len(self.messages) >= self.max_messages or self.bytes >= self.max_bytes


class Exchange:
    __slots__ = ("name", "type", "bindings", "cache", "patterns", "creator")

    def __init__(self, name: bytes, type: bytes, creator: Peer | None = None):
        self.name = name
        self.type = type
        self.creator = creator           # None: the broker's own amq.* exchanges
        self.bindings: dict = {}         # binding key -> [Queue]
        self.patterns: dict = {}         # wildcard binding key -> TopicPattern (topic only)
        self.cache: dict = {}            # routing key -> tuple of Queue (Broker._route)


class Consumer:
    __slots__ = ("cid", "channel", "queue", "no_ack")

    def __init__(self, cid, channel, queue, no_ack):
        self.cid, self.channel, self.queue, self.no_ack = cid, channel, queue, no_ack


class Channel:
    __slots__ = ("id", "client", "prefetch", "unacked", "next_tag", "consumers")

    def __init__(self, id, client):
        self.id = id
        self.client = client
        self.prefetch = 0
        self.unacked: dict = {}          # tag -> (Queue, payload, Peer.key); in tag order
        self.next_tag = 0
        self.consumers: dict = {}        # cid -> Consumer


class Client:
    __slots__ = ("sock", "fd", "reader", "channels", "out", "outlen", "events", "reading",
                 "throttled", "greeted", "closed", "name", "parked", "parked_bytes",
                 "parked_pub", "rsv_reader", "rsv_parked", "held_out", "blocked", "flow_sent",
                 "waiting_memory", "since", "last_in", "stalled_at", "heartbeat", "hb_sent",
                 "unacked", "unacked_bytes", "hoarding", "rsv_since", "peer")

    def __init__(self, sock, name, now, max_frame, peer: Peer):
        self.sock = sock
        self.peer = peer                 # whose shares its requests count in
        self.fd = sock.fileno()
        self.reader = FrameReader(max_frame)
        self.channels: dict = {}
        self.out: deque = deque()        # bytes-like pieces not yet written
        self.outlen = 0
        self.events = 0                  # selector events registered (0 = not registered)
        self.reading = True              # False while the broker is holding this client back
        self.throttled = False           # a dispatch stopped at max_client_output
        self.greeted = False
        self.closed = False
        self.name = name
        self.parked: deque = deque()     # frames held back, in arrival order
        self.parked_bytes = 0
        self.parked_pub = 0              # publishes among them
        self.rsv_reader = 0              # memory reserved for the big frame being read
        self.rsv_since = 0.0             # ... since (frame_timeout)
        self.rsv_parked = 0              # ... and for big frames held back
        self.held_out = 0                # cost of no_ack messages in `out` (still counted)
        self.blocked = None              # the Queue (or _MEMORY) a held publish waits for
        self.flow_sent = False           # a FLOW "blocked" notice is out
        self.waiting_memory = False      # a big frame waits for max_memory room
        self.since = now
        self.last_in = now
        self.stalled_at = 0.0            # output pending without progress since (0 = none)
        self.heartbeat = 0               # seconds the client asked for in its HELLO (0 = off)
        self.hb_sent = now               # when the broker last sent it a HEARTBEAT
        self.unacked = 0                 # messages delivered to it, not yet acked (all
        self.unacked_bytes = 0           # channels) and their cost: its share of max_memory
        self.hoarding = False            # a dispatch stopped at max_client_unacked(_bytes)


def _unsent(client: Client) -> int:
    """What a client's unsent output costs: its bytes and its pieces."""
    return client.outlen + len(client.out) * PIECE


class _ResourceLimit(Exception):
    """max_objects or a client's max_client_objects reached: an error answer to an RPC,
    a disconnect otherwise."""


class Routing:
    """Queues, exchanges, bindings and deliveries: the broker's operations on its
    model (a mixin of :class:`~transports.broker.loop.Broker`, whose state they use)."""

    def _new_object(self, what: str, peer: Peer):
        limits = self.limits
        if self.objects >= limits.max_objects:
            raise _ResourceLimit(f"resource limit: {self.objects} queues, exchanges, bindings, "
                                 f"channels and consumers (max_objects="
                                 f"{limits.max_objects}); cannot add a {what}")
        if peer.objects >= limits.max_client_objects:
            raise _ResourceLimit(f"resource limit: this client ({peer.label}) made "
                                 f"{peer.objects} queues, exchanges, bindings, channels and "
                                 f"consumers that still exist (max_client_objects="
                                 f"{limits.max_client_objects}, broker option "
                                 f"--max-client-objects); cannot add a {what}")
        self.objects += 1
        peer.objects += 1

    def _free_object(self, peer: Peer | None):
        self.objects -= 1
        if peer is not None:
            peer.objects -= 1
            if not peer.conns:
                self._forget_peer(peer)

    def _release(self, key: int, cost: int):
        """A message the Peer ``key`` published is no longer held (acked, dropped...)."""
        peer = self.peers[key]
        peer.memory -= cost
        if not peer.conns and peer.memory <= 0:
            self._forget_peer(peer)

    def _forget_peer(self, peer: Peer):
        """A gone client that holds nothing any more: a new process with its pid starts
        afresh (until then one that reconnects finds its shares as it left them)."""
        if (not peer.conns and peer.memory <= 0 and peer.objects <= 0 and not peer.reserved
                and self.peers.get(peer.key) is peer):
            del self.peers[peer.key]

    def _channel(self, client: Client, chid: int) -> Channel:
        ch = client.channels.get(chid)
        if ch is None:
            try:
                self._new_object("channel", client.peer)
            except _ResourceLimit as exc:
                raise ProtocolError(str(exc)) from None
            ch = client.channels[chid] = Channel(chid, client)
        return ch

    def _new_queue(self, name: bytes, peer: Peer, **kwargs) -> Queue:
        self._new_object("queue", peer)
        q = self.queues[name] = Queue(name, self.limits, peer, **kwargs)
        return q

    def _close_channel(self, ch: Channel):
        for consumer in list(ch.consumers.values()):
            self._remove_consumer(consumer)
        ch.consumers.clear()
        self._requeue_unacked(ch)
        self._free_object(ch.client.peer)

    def _requeue_unacked(self, ch: Channel):
        unacked = ch.unacked
        if not unacked:
            return
        self._settle_unacked(ch.client, len(unacked), sum(len(e[1]) for e in unacked.values())
                             + len(unacked) * MSG_OVERHEAD)
        # Newest first onto the head, so the queue keeps the original order.
        for queue, payload, key in reversed(list(unacked.values())):
            if not queue.deleted:
                queue.messages.appendleft((payload, True, key))
                queue.bytes += len(payload)
                self._dirty_queues.add(queue)
            else:
                self.held -= len(payload) + MSG_OVERHEAD
                self._release(key, len(payload) + MSG_OVERHEAD)
        unacked.clear()
        self._freed = True

    def _settle_unacked(self, client: Client, count: int, cost: int):
        """``count`` of the client's unacked messages (``cost`` bytes) are acked, rejected
        or requeued: below its share again, its consumers get deliveries again."""
        client.unacked -= count
        client.unacked_bytes -= cost
        if client.hoarding and (client.unacked < self.limits.max_client_unacked and
                                client.unacked_bytes < self.limits.max_client_unacked_bytes):
            client.hoarding = False
            for ch in client.channels.values():
                for c in ch.consumers.values():
                    self._dirty_queues.add(c.queue)

    def _remove_consumer(self, consumer: Consumer):
        q = consumer.queue
        try:
            q.consumers.remove(consumer)
        except ValueError:
            return
        self._free_object(consumer.channel.client.peer)
        if q.auto_delete and q.had_consumers and not q.consumers and not q.deleted:
            self._delete_queue(q)

    def _drop_messages(self, q: Queue) -> int:
        """Empty ``q``; a new deque, so the old one's blocks are freed, not kept."""
        msgs = q.messages
        count = len(msgs)
        if count:
            self._held_high = max(self._held_high, self.held)  # so the trim sees the peak
            self.held -= q.bytes + count * MSG_OVERHEAD
            # Each message leaves its publisher's share. The usual queue has one
            # publisher: found at C speed, one subtraction; else one pass per message.
            keys = set(map(_PEER_OF, msgs))
            peers = self.peers
            if len(keys) == 1:
                peers[next(iter(keys))].memory -= q.bytes + count * MSG_OVERHEAD
            else:
                for payload, _, key in msgs:
                    peers[key].memory -= len(payload) + MSG_OVERHEAD
            for key in keys:
                if not peers[key].conns:
                    self._forget_peer(peers[key])
            q.messages = deque()
            q.bytes = 0
            self._freed = True
        return count

    def _delete_queue(self, q: Queue) -> int:
        count = self._drop_messages(q)
        q.deleted = True
        for consumer in list(q.consumers):
            consumer.channel.consumers.pop(consumer.cid, None)
            self._free_object(consumer.channel.client.peer)
        q.consumers.clear()
        for ex_name, key in list(q.bindings):
            self._unbind(q, ex_name, key)
        if self.queues.get(q.name) is q:
            del self.queues[q.name]
            self._free_object(q.creator)
        self._forget_routes()
        return count

    def _unbind(self, q: Queue, ex_name: bytes, key: bytes):
        if (ex_name, key) in q.bindings:
            self._free_object(q.bindings.pop((ex_name, key)))
        ex = self.exchanges.get(ex_name)
        if ex is None:
            return
        queues = ex.bindings.get(key)
        if queues and q in queues:
            queues.remove(q)
            if not queues:
                del ex.bindings[key]
                ex.patterns.pop(key, None)
            self._forget_routes()

    def _forget_routes(self):
        if self._cached_routes:
            for ex in self.exchanges.values():
                ex.cache.clear()
            self._cached_routes = 0

    def _route(self, exchange: Exchange, rk: bytes) -> tuple:
        """The queues ``rk`` reaches through ``exchange`` (callers look in its cache first)."""
        if exchange.type == b"fanout":
            seen = {}
            for queues in exchange.bindings.values():
                for q in queues:
                    seen[id(q)] = q
            found = tuple(seen.values())
        elif exchange.type == b"topic":
            # A key without wildcards matches only itself: one look-up. Only the wildcard
            # bindings (at most max_topic_wildcards per exchange) are matched one by one.
            words = rk.split(b".")
            seen = {}
            bindings = exchange.bindings
            if rk not in exchange.patterns:
                for q in bindings.get(rk, ()):
                    seen[id(q)] = q
            self.route_work += len(exchange.patterns)
            for bkey, pattern in exchange.patterns.items():
                if pattern.matches(words):
                    for q in bindings[bkey]:
                        seen[id(q)] = q
            found = tuple(seen.values())
        else:
            found = tuple(exchange.bindings.get(rk, ()))
        if len(rk) <= ROUTE_KEY_CACHED:
            if self._cached_routes >= ROUTE_CACHE_MAX:
                self._forget_routes()
            exchange.cache[rk] = found
            self._cached_routes += 1
        return found

    def _dispatch(self, q: Queue):
        """Push ready messages of ``q`` to its consumers that have credit, round robin."""
        msgs, consumers = q.messages, q.consumers
        limits = self.limits
        high_water = limits.max_client_output
        max_unacked, max_unacked_bytes = limits.max_client_unacked, limits.max_client_unacked_bytes
        overhead = MSG_OVERHEAD
        peers = self.peers
        n = len(consumers)
        idle = 0
        i = q.rr
        taken = 0
        while msgs and idle < n:
            c = consumers[i % n]
            i += 1
            ch = c.channel
            client = ch.client
            if _unsent(client) >= high_water:
                client.throttled = True
                idle += 1
                continue
            if not c.no_ack and (client.unacked >= max_unacked
                                 or client.unacked_bytes >= max_unacked_bytes):
                # Its share of max_memory: a consumer that never acks stops here, not
                # at the broker-wide limit that would stop every publisher.
                client.hoarding = True
                idle += 1
                continue
            if not c.no_ack and ch.prefetch and len(ch.unacked) >= ch.prefetch:
                idle += 1
                continue
            idle = 0
            # A lone consumer takes a run of messages at once; several take turns.
            budget = 1 if n > 1 else 1 << 30
            out = client.out
            outlen = client.outlen
            cost = outlen + len(out) * PIECE   # what _unsent() would say, kept up to date
            # Its share, kept in locals (this loop runs per message): what it may still
            # take, in messages (the budget) and bytes; written back once below.
            first_tag = ch.next_tag
            spent = 0
            room = max_unacked_bytes - client.unacked_bytes
            if not c.no_ack:
                budget = min(budget, max_unacked - client.unacked)
            while msgs and budget:
                budget -= 1
                payload, redelivered, key = msgs.popleft()
                size = len(payload)
                taken += size
                if c.no_ack:
                    tag = 0
                    # Still in memory until written: counted until the output drains;
                    # delivered, so out of its publisher's share.
                    client.held_out += size + overhead
                    peer = peers[key]
                    peer.memory -= size + overhead
                    if not peer.conns and peer.memory <= 0:
                        self._forget_peer(peer)
                else:
                    ch.next_tag = tag = ch.next_tag + 1
                    ch.unacked[tag] = (q, payload, key)
                    spent += size + overhead
                    if spent >= room:
                        budget = 0
                out.append(DELIVER_HEAD.pack(DELIVER_BODY_HEAD + size, OP_DELIVER,
                                             ch.id, c.cid, tag, redelivered))
                out.append(payload)
                outlen += DELIVER_HEAD.size + size
                cost += DELIVER_HEAD.size + size + 2 * PIECE
                if cost >= high_water:
                    client.throttled = True
                    break
                if ch.prefetch and not c.no_ack and len(ch.unacked) >= ch.prefetch:
                    break
            client.outlen = outlen
            if spent:
                client.unacked += ch.next_tag - first_tag
                client.unacked_bytes += spent
                if client.unacked >= max_unacked or client.unacked_bytes >= max_unacked_bytes:
                    client.hoarding = True
            self._dirty_clients.add(client)
        q.rr = i % n if n else 0
        if taken:
            q.bytes -= taken
            self._freed = True

    def _enqueue(self, q: Queue, payload: bytes, peer: Peer):
        q.messages.append((payload, False, peer.key))
        size = len(payload)
        q.bytes += size
        self.held += size + MSG_OVERHEAD
        peer.memory += size + MSG_OVERHEAD
        if q.consumers:
            self._dirty_queues.add(q)
