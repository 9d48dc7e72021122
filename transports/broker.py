"""The broker behind the ``unix`` transport: one process that owns the queues.

Run it in the foreground (``python -m transports.broker unix:///abs/dir/broker.sock``
or ``celery-bench broker unix:///abs/dir/broker.sock``) until SIGINT/SIGTERM. It
creates the socket 0600 in a directory only its owner can enter, keeps queues in
memory, routes direct/topic/fanout exchanges, pushes deliveries to consumers that
have credit (round robin, honouring each channel's prefetch), and puts a
connection's unacknowledged messages back at the head of their queues when it
goes away. The wire protocol is in :mod:`transports.protocol`; :func:`start` /
:func:`running` run a broker subprocess for a harness, ready when its socket accepts.

What it promises
================
* **Delivery**: at-least-once to consumers. A message is removed only when
  acknowledged (or delivered to a ``no_ack`` consumer, or rejected without
  requeue); a consumer's connection that goes away hands its unacknowledged
  messages back, marked redelivered.
* **Publishing**: a ``PUBLISH_CONFIRM`` is answered once every queue it routes to
  holds the message (the client's ``confirm_publish``). A plain ``PUBLISH`` is
  pipelined: no answer, so what the broker had not yet read when it died is lost
  (at-most-once on the publish side). Frames of one connection are taken in order.
* **Bounded memory** (:class:`Limits`): a queue holds at most
  ``max_queue_messages`` (1,000,000) messages and ``max_queue_bytes`` (128 MiB)
  ready for delivery; all messages held (ready, unacknowledged, being written) at
  most ``max_memory`` (192 MiB, payload plus ``MSG_OVERHEAD`` each). A frame is at
  most ``max_frame`` (8 MiB); frames over 64 KiB are read only with memory reserved
  for them, a quarter of ``max_memory`` in all. At most ``max_connections`` (256)
  connections, each holding at most ~200 KiB of buffers, and ``max_objects``
  (20,000) queues + exchanges + bindings + channels + consumers, names at most 255
  bytes. With the defaults that is under 512 MB whatever the clients do
  (measured: docs/transports.md). Past ``max_objects`` nobody can declare;
  past ``max_memory`` every publisher waits: a global limit is not fair-shared.
* **Back-pressure, never silent loss**: a publish to a full queue (or past
  ``max_memory``) is held back, not dropped: the broker stops taking further
  frames from that connection (acks, rejects and QoS still go through) and reads
  no more of its socket once 64 KiB are held back, so the client's write blocks;
  it sends the client a ``FLOW`` notice saying which queue and limit. When room
  appears the held frames run in order. A client that hangs up while held back
  (its write timed out, or it closed) returned from those publishes: the broker
  takes its remaining whole publishes past the queue's limit and past
  ``max_memory`` by up to an eighth of it, at least 8 MiB (beyond that they are dropped and counted
  in this log: only when many blocked publishers hang up at once), and drops its
  unconfirmed ``PUBLISH_CONFIRM`` frames (their publisher was told they failed).
  Deliveries to a held-back connection go on, so it can drain its own queue
  unless its prefetch window is full of messages it cannot ack while blocked
  (publish and consume on separate connections, as Celery does).
* **Fair to the others**: a client that does not read stops getting deliveries
  past 256 KiB of unsent output and has its requests held past 64 KiB; one whose
  output takes no byte for ``send_timeout`` is disconnected and its
  unacknowledged messages requeued. A connection that sends no HELLO within
  ``handshake_timeout`` is closed; one idle for ``idle_timeout`` too (off by
  default: on a unix socket a dead peer is seen at once, and Kombu/Celery
  connections legitimately sit idle for hours). At the open-file limit the broker
  stops accepting for a moment (logged once per episode), and at
  ``max_connections`` until one closes; connecting clients wait in the listen
  backlog and report a busy broker if it stays full.
* A client that sends a malformed or oversized frame, or anything before a valid
  HELLO, is disconnected (its unacked messages requeued); nothing after the bad
  frame runs; the others are not affected. Topic matching is O(pattern x words).
* Memory freed by a purge, a queue deletion or a drained backlog goes back to the
  system (``malloc_trim`` once 16 MiB came free).

Not there: persistence (a broker restart loses every queue), priorities, TTLs,
mandatory/returned messages (unroutable messages are dropped, as AMQP does),
authentication beyond the socket's file permissions.

The broker is a single-threaded ``selectors`` loop. Messages are opaque bytes to
it: it only routes on the exchange and routing key in the publish frame. Inside a
stream of publishes it pauses ``--coalesce-us`` (200 us) between turns so it works
in batches.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from fcntl import ioctl
from pathlib import Path
from select import POLLRDHUP, poll

from .framing import FrameError, FrameReader
from .protocol import (
    COUNTS, DEFAULT_MAX_FRAME, DELIVER_BODY_HEAD, DELIVER_HEAD, EXCHANGE_TYPES, F_AUTO_DELETE,
    F_EXCLUSIVE, F_IF_EMPTY, F_IF_UNUSED, F_PASSIVE, FLOW_HEAD, GET_OK, HEAD, HELLO_OK, MAGIC,
    OP_ACK, OP_CANCEL, OP_CHANNEL_CLOSE, OP_CONSUME, OP_DELIVER, OP_EXCHANGE_DECLARE,
    OP_EXCHANGE_DELETE, OP_FLOW, OP_GET, OP_HELLO, OP_PING, OP_PUBLISH, OP_PUBLISH_CONFIRM,
    OP_QOS, OP_QUEUE_BIND, OP_QUEUE_DECLARE, OP_QUEUE_DELETE, OP_QUEUE_PURGE, OP_QUEUE_UNBIND,
    OP_RECOVER, OP_REJECT, OP_REPLY, PROTOCOL_VERSION, QOS_BODY, QUEUE_LIMITS, REPLY_BODY_HEAD,
    REPLY_HEAD, RPC_HEAD, STATUS_EMPTY, STATUS_NOT_FOUND, STATUS_OK, STATUS_PRECONDITION,
    TAG_FLAG, U8, U16, U32, ProtocolError, socket_path_from_url, unpack_strs,
)

__all__ = ("Broker", "BrokerProcess", "Limits", "main", "running", "serve", "start",
           "socket_path_from_url", "topic_matches", "TopicPattern")

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
# Stop pushing deliveries to a client whose unsent output passes this; resume when it drains.
HIGH_WATER = 256 * 1024
# What a buffered piece costs beyond its bytes (a small bytes object, a deque slot):
# counted against the limits above, or thousands of 11-byte pings cost 5x their size.
PIECE = 64
# Output is joined and written in pieces of this size: never the whole backlog per turn.
FLUSH_CHUNK = 256 * 1024
SOCKET_BUFFER = 1024 * 1024
ROUTE_CACHE_MAX = 65536
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
_IMMEDIATE = frozenset((OP_ACK, OP_REJECT, OP_QOS))
_RPC_OPS = frozenset((OP_CONSUME, OP_EXCHANGE_DECLARE, OP_EXCHANGE_DELETE, OP_QUEUE_DECLARE,
                      OP_QUEUE_BIND, OP_QUEUE_UNBIND, OP_QUEUE_PURGE, OP_QUEUE_DELETE, OP_GET,
                      OP_RECOVER, OP_PING))
_MEMORY = "memory"       # Client.blocked when max_memory, not a queue, holds it back
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
    handshake_timeout: float = 5.0                # seconds to send a HELLO
    idle_timeout: float = 0.0                     # seconds without a frame; 0 = never
    frame_timeout: float = 10.0                   # seconds a big frame's reservation may
                                                  # wait for its next byte; 0 = never
    send_timeout: float = 30.0                    # seconds output may wait with no progress
    backlog: int = 512                            # listen(2) backlog

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"broker setting {f.name}={value!r}: expected a number >= 0")
        if not 1024 <= self.max_frame <= 64 * 1024 * 1024:
            raise ValueError(f"max_frame={self.max_frame}: between 1 KiB and 64 MiB")
        if self.max_memory < 2 * self.max_frame:
            raise ValueError(f"max_memory={self.max_memory} must be at least twice "
                             f"max_frame ({self.max_frame})")
        for name in ("max_queue_messages", "max_queue_bytes", "max_connections", "max_objects",
                     "handshake_timeout", "send_timeout", "backlog"):
            if not getattr(self, name):
                raise ValueError(f"broker setting {name} must be > 0")

    def flags(self) -> list[str]:
        """The ``python -m transports.broker`` options that give these limits."""
        out = []
        for name, value in asdict(self).items():
            if value != getattr(Limits, name):
                out += [f"--{name.replace('_', '-')}", repr(value)]
        return out


# -- topic matching (AMQP semantics: '*' is one word, '#' zero or more) ----------

class TopicPattern:
    """A binding key compiled once for matching: an NFA over its word positions run as
    bitsets (Python ints), so one routing-key word costs a few integer operations
    whatever the pattern. '#.#' is collapsed to '#' (it matches the same keys), so one
    shift closes over "'#' may match no word"."""

    __slots__ = ("n", "hashes", "stars", "literals")

    def __init__(self, key: bytes):
        parts: list[bytes] = []
        for w in key.split(b"."):
            if not (w == b"#" and parts and parts[-1] == b"#"):
                parts.append(w)
        self.n = len(parts)
        self.hashes = self.stars = 0
        self.literals: dict = {}
        for i, w in enumerate(parts):
            if w == b"#":
                self.hashes |= 1 << i
            elif w == b"*":
                self.stars |= 1 << i
            else:
                self.literals[w] = self.literals.get(w, 0) | (1 << i)

    def matches(self, words: list[bytes]) -> bool:
        hashes, stars, literals = self.hashes, self.stars, self.literals
        reach = 1 | (1 & hashes) << 1
        for word in words:
            # A '#' at i eats the word and stays; '*' or the same literal moves on.
            nxt = (reach & hashes) | ((reach & (stars | literals.get(word, 0))) << 1)
            if not nxt:
                return False
            reach = nxt | (nxt & hashes) << 1
        return bool(reach >> self.n & 1)


def topic_matches(pattern: list[bytes], words: list[bytes]) -> bool:
    """Whether routing key ``words`` match binding ``pattern`` (AMQP's topic rules)."""
    return TopicPattern(b".".join(pattern)).matches(words)


def _size(text: str) -> int:
    """``8MiB``, ``512M``, ``65536`` -> bytes (CLI)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (like 8MiB, 512M, 65536)") from None


def _libc_trim():
    """``malloc_trim(0)`` of glibc, or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


# -- broker state ------------------------------------------------------------------

class Queue:
    __slots__ = ("name", "messages", "bytes", "consumers", "rr", "auto_delete", "owner",
                 "had_consumers", "bindings", "deleted", "max_messages", "max_bytes")

    def __init__(self, name: bytes, limits: Limits, auto_delete=False, owner=None):
        self.name = name
        self.messages: deque = deque()   # (payload, redelivered)
        self.bytes = 0                   # payload bytes of the ready messages
        self.consumers: list = []
        self.rr = 0
        self.auto_delete = auto_delete
        self.owner = owner               # the client of an exclusive queue
        self.had_consumers = False
        self.bindings: set = set()       # (exchange name, routing key)
        self.deleted = False
        self.max_messages = limits.max_queue_messages
        self.max_bytes = limits.max_queue_bytes

    def full(self) -> bool:
        return len(self.messages) >= self.max_messages or self.bytes >= self.max_bytes


class Exchange:
    __slots__ = ("name", "type", "bindings", "cache", "patterns")

    def __init__(self, name: bytes, type: bytes):
        self.name = name
        self.type = type
        self.bindings: dict = {}         # binding key -> [Queue]
        self.patterns: dict = {}         # binding key -> TopicPattern (topic exchanges)
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
        self.unacked: dict = {}          # tag -> (Queue, payload); insertion = tag order
        self.next_tag = 0
        self.consumers: dict = {}        # cid -> Consumer


class Client:
    __slots__ = ("sock", "fd", "reader", "channels", "out", "outlen", "events", "reading",
                 "throttled", "greeted", "closed", "name", "parked", "parked_bytes",
                 "parked_pub", "rsv_reader", "rsv_parked", "held_out", "blocked", "flow_sent",
                 "waiting_memory", "since", "last_in", "stalled_at")

    def __init__(self, sock, name, now, max_frame):
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader(max_frame)
        self.channels: dict = {}
        self.out: deque = deque()        # bytes-like pieces not yet written
        self.outlen = 0
        self.events = 0                  # selector events registered (0 = not registered)
        self.reading = True              # False while the broker is holding this client back
        self.throttled = False           # a dispatch stopped at HIGH_WATER
        self.greeted = False
        self.closed = False
        self.name = name
        self.parked: deque = deque()     # frames held back, in arrival order
        self.parked_bytes = 0
        self.parked_pub = 0              # publishes among them
        self.rsv_reader = 0              # memory reserved for the big frame being read
        self.rsv_parked = 0              # ... and for big frames held back
        self.held_out = 0                # cost of no_ack messages in `out` (still counted)
        self.blocked = None              # the Queue (or _MEMORY) a held publish waits for
        self.flow_sent = False           # a FLOW "blocked" notice is out
        self.waiting_memory = False      # a big frame waits for max_memory room
        self.since = now
        self.last_in = now
        self.stalled_at = 0.0            # output pending without progress since (0 = none)


class Broker:
    """Queues, exchanges and connected clients; ``serve_forever`` runs the loop."""

    def __init__(self, path: str, *, watch_parent: bool = False,
                 coalesce: float = DEFAULT_COALESCE_S, limits: Limits | None = None):
        self.path = path
        self.limits = limits = limits or Limits()
        self.max_memory = limits.max_memory
        self.coalesce = max(0.0, float(coalesce))
        self.queues: dict[bytes, Queue] = {}
        self.exchanges: dict[bytes, Exchange] = {
            b"amq.direct": Exchange(b"amq.direct", b"direct"),
            b"amq.topic": Exchange(b"amq.topic", b"topic"),
            b"amq.fanout": Exchange(b"amq.fanout", b"fanout"),
        }
        self.objects = 0                 # queues, exchanges, bindings, channels, consumers
        self.clients: dict[int, Client] = {}
        self.held = 0                    # cost of every message held (<= max_memory)
        self.reserved = 0                # big frames being read or held back
        self.max_reserved = limits.max_memory // 4
        self._cached_routes = 0          # entries in every Exchange.cache
        self._dirty_queues: set = set()
        self._dirty_clients: set = set()
        self._blocked: set = set()       # clients whose held-back publish waits for room
        self._memory_waiters: set = set()  # clients whose big frame waits for max_memory
        self._freed = False              # room may have appeared this turn
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._accept_paused: str | None = None   # why accepting stopped, None = accepting
        self._accept_at = 0.0
        self._accept_backoff = 0.05
        self._accept_since = 0.0
        self._stopping = False
        self._watch_parent = os.getppid() if watch_parent else None
        self._wake_r = self._wake_w = None
        self._handlers = {
            OP_PUBLISH: self._route_publish, OP_PUBLISH_CONFIRM: self._on_publish_confirm,
            OP_ACK: self._on_ack, OP_REJECT: self._on_reject,
            OP_QOS: self._on_qos, OP_CANCEL: self._on_cancel,
            OP_CHANNEL_CLOSE: self._on_channel_close,
            OP_CONSUME: self._on_consume, OP_EXCHANGE_DECLARE: self._on_exchange_declare,
            OP_EXCHANGE_DELETE: self._on_exchange_delete,
            OP_QUEUE_DECLARE: self._on_queue_declare, OP_QUEUE_BIND: self._on_queue_bind,
            OP_QUEUE_UNBIND: self._on_queue_unbind, OP_QUEUE_PURGE: self._on_queue_purge,
            OP_QUEUE_DELETE: self._on_queue_delete, OP_GET: self._on_get,
            OP_RECOVER: self._on_recover, OP_PING: self._on_ping,
        }
        self._client_seq = 0
        self._busy = False
        self._answered = False
        self._last_busy = 0.0
        self._now = time.monotonic()
        self._next_tick = 0.0
        self._held_high = 0              # most held since the last trim
        self._trim = _libc_trim()

    # -- socket setup --------------------------------------------------------------

    def listen(self) -> None:
        path = Path(self.path)
        prepare_socket_dir(path.parent)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ValueError(f"{path} exists and is not a socket; refusing to replace it")
            if _socket_accepts(str(path)):
                raise ValueError(f"a broker is already serving on {path}")
            path.unlink()  # stale socket left by a broker that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(int(self.limits.backlog))
        sock.setblocking(False)
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, self._accept)

    def _install_signals(self):
        # A signal only sets a flag; the wakeup fd makes select() return at once.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self._stopping = True

    def _on_wakeup(self, sock, mask):
        try:
            while sock.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def stop(self):
        self._stopping = True

    # -- the loop ----------------------------------------------------------------------

    def serve_forever(self, install_signals: bool = True) -> None:
        if self._listener is None:
            self.listen()
        if install_signals:
            self._install_signals()
        select = self._sel.select
        monotonic = time.monotonic
        try:
            while not self._stopping:
                for key, mask in select(TICK_S):
                    data = key.data
                    if data.__class__ is Client:
                        if data.closed:
                            continue
                        if mask & selectors.EVENT_WRITE:
                            self._flush(data)
                        if mask & selectors.EVENT_READ and data.reading and not data.closed:
                            self._on_readable(data)
                    else:
                        data(key.fileobj, mask)
                self._now = now = monotonic()
                self._settle()
                if now >= self._next_tick:
                    self._housekeeping(now)
                if self._busy:
                    self._busy = False
                    # Only inside a stream (this busy turn came soon after the last):
                    # a lone message is never held back, nor a turn that answered
                    # someone (a confirm, an RPC: the caller is waiting).
                    if (self.coalesce and not self._answered
                            and now - self._last_busy < 2 * self.coalesce):
                        time.sleep(self.coalesce)
                    self._last_busy = now
                self._answered = False
                if self._watch_parent and os.getppid() != self._watch_parent:
                    log.warning("parent process went away; broker stopping")
                    break
        finally:
            self.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client, None)
        if self._listener is not None:
            if not self._accept_paused:
                try:
                    self._sel.unregister(self._listener)
                except (KeyError, ValueError):
                    pass
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._wake_r is not None:
            signal.set_wakeup_fd(-1)
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None
        self._sel.close()

    def _settle(self):
        """Dispatch what became deliverable, let held-back clients go on, write everything."""
        for _ in range(16):
            if self._dirty_queues:
                queues, self._dirty_queues = self._dirty_queues, set()
                for q in queues:
                    if q.messages and q.consumers and not q.deleted:
                        self._dispatch(q)
            if self._freed:
                self._freed = False
                if self._blocked:
                    self._retry_blocked()
                if self._memory_waiters and self.reserved < self.max_reserved:
                    for client in list(self._memory_waiters):
                        if not client.closed:
                            self._reserve_next(client)
            if not self._dirty_clients:
                if not self._dirty_queues and not self._freed:
                    return
                continue
            clients, self._dirty_clients = self._dirty_clients, set()
            for client in clients:
                if not client.closed:
                    self._flush(client)
            if not self._dirty_queues and not self._freed:
                return

    def _housekeeping(self, now):
        """Timeouts, hung-up peers of held-back clients, paused accepts, memory trim."""
        self._next_tick = now + TICK_S
        limits = self.limits
        paused = []
        for client in list(self.clients.values()):
            if not client.greeted:
                if now - client.since > limits.handshake_timeout:
                    self._drop(client, f"no HELLO within {limits.handshake_timeout:g}s; "
                                       "closing it")
            elif client.stalled_at and now - client.stalled_at > limits.send_timeout:
                self._drop(client, f"took none of its {client.outlen} bytes of output for "
                                   f"{limits.send_timeout:g}s (send_timeout); disconnecting "
                                   "it, its unacknowledged messages go back to their queues")
            elif (client.rsv_reader and limits.frame_timeout
                  and now - client.last_in > limits.frame_timeout):
                # Its reservation would keep every other big publish waiting for nothing.
                self._drop(client, f"sent part of a {client.rsv_reader}-byte frame, then "
                                   f"nothing for {limits.frame_timeout:g}s (frame_timeout); "
                                   "closing it, the frame is dropped")
            elif not client.reading:
                paused.append(client)
            elif (limits.idle_timeout and now - client.last_in > limits.idle_timeout
                  and not client.out):
                self._drop(client, f"idle for {limits.idle_timeout:g}s (idle_timeout); "
                                   "closing it")
        if paused:
            # Held-back clients are not read, so their hang-up would go unseen.
            poller = poll()
            for client in paused:
                poller.register(client.fd, POLLRDHUP)
            gone = {fd for fd, _ in poller.poll(0)}
            for client in paused:
                if client.fd in gone and not client.closed:
                    self._drop(client, None, hung_up=True)
        if self._accept_paused and now >= self._accept_at:
            self._resume_accept()
        self._held_high = max(self._held_high, self.held)
        if self._held_high - self.held >= TRIM_AFTER:
            if self._trim is not None:
                self._trim(0)
            self._held_high = self.held
        if self._dirty_clients or self._dirty_queues or self._freed:
            self._settle()

    # -- accepting --------------------------------------------------------------------

    def _accept(self, listener, mask):
        for _ in range(64):
            if len(self.clients) >= self.limits.max_connections:
                self._pause_accept("limit", None)
                return
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EMFILE:
                    self._pause_accept("fd", exc)
                    return
                continue  # ECONNABORTED and the like: that one connection is gone
            if self._accept_since:
                log.warning("accepting connections again after %.1fs (%d open)",
                            self._now - self._accept_since, len(self.clients))
                self._accept_since = 0.0
                self._accept_backoff = 0.05
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            except OSError:
                pass
            self._client_seq += 1
            client = Client(sock, f"client#{self._client_seq}", self._now,
                            self.limits.max_frame)
            self.clients[client.fd] = client
            client.events = selectors.EVENT_READ
            self._sel.register(sock, selectors.EVENT_READ, client)

    def _pause_accept(self, why: str, exc: OSError | None):
        """Stop accepting for a while: one log line per episode, not one per attempt."""
        if self._accept_paused:
            return
        self._sel.unregister(self._listener)
        self._accept_paused = why
        now = time.monotonic()
        if not self._accept_since:
            self._accept_since = now
            if why == "fd":
                log.warning("cannot accept connections: %s (%d open); pausing accepts until a "
                            "descriptor frees up (raise the open-file limit: ulimit -n)",
                            exc.strerror or exc, len(self.clients))
            else:
                log.warning("%d connections (max_connections): not accepting more until one "
                            "closes; new clients wait in the listen backlog",
                            len(self.clients))
        else:
            self._accept_backoff = min(self._accept_backoff * 2, MAX_ACCEPT_PAUSE_S)
        self._accept_at = now + (self._accept_backoff if why == "fd" else TICK_S)

    def _resume_accept(self):
        if not self._accept_paused or self._listener is None:
            return
        if self._accept_paused == "limit" and len(self.clients) >= self.limits.max_connections:
            self._accept_at = time.monotonic() + TICK_S
            return
        self._accept_paused = None
        self._sel.register(self._listener, selectors.EVENT_READ, self._accept)

    # -- reading ------------------------------------------------------------------------

    def _on_readable(self, client: Client):
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # A peer that went away is no news; anything else is worth a line.
            self._drop(client, None if exc.errno in _HANG_UP else f"read failed: {exc}",
                       hung_up=True)
            return
        if not data:
            self._drop(client, None, hung_up=True)
            return
        client.last_in = self._now
        client.reader.feed(data)
        self._take_input(client)

    def _take_input(self, client: Client):
        """Run the whole frames buffered; past PARK_LIMIT held back, leave the rest unread."""
        reader = client.reader
        handlers = self._handlers
        try:
            frames = reader.frames()
            if not client.greeted:
                if not frames:
                    n = reader.next_length()
                    if reader.pending > 64 or (n is not None and n > 64):
                        raise ProtocolError("no HELLO frame")
                    return
                if not self._on_hello(client, frames[0]):
                    return
                frames = frames[1:]
            i = 0
            for frame in frames:
                i += 1
                op = frame[0]
                handler = handlers.get(op)
                if handler is None:
                    raise ProtocolError(f"unknown op {op}")
                if client.rsv_reader and len(frame) > SMALL_FRAME:
                    # Its reservation ends here; a publish counts it again as a message.
                    self.reserved -= client.rsv_reader
                    client.rsv_reader = 0
                    self._freed = True
                if (client.parked and op not in _IMMEDIATE) or (
                        op in _RPC_OPS and _unsent(client) >= REPLY_WATER):
                    self._park(client, frame)
                    if not client.reading:
                        # Held back enough: the rest waits in the reader's buffer, as
                        # compact bytes (thousands of tiny frame objects cost 5x more).
                        reader.push_back(frames[i:])
                        return
                    continue
                handler(client, frame)
            if client.reading:
                self._reserve_next(client)
        except (FrameError, ProtocolError, struct.error, IndexError, UnicodeDecodeError,
                ValueError) as exc:
            log.warning("%s sent a bad frame (%s); disconnecting it", client.name, exc)
            self._drop(client, None)
        except Exception:  # a bug must cost one client, never the broker
            log.exception("error handling %s; disconnecting it", client.name)
            self._drop(client, None)

    def _reserve_next(self, client: Client):
        """Reserve max_memory for a big frame the client started, or stop reading it."""
        if client.rsv_reader:
            return
        n = client.reader.next_length()
        if n is None or n <= SMALL_FRAME:
            if client.waiting_memory:
                client.waiting_memory = False
                self._memory_waiters.discard(client)
                self._set_reading(client)
            return
        if n > self.limits.max_frame:
            return  # the reader refuses it on the next read
        if self.reserved + n <= self.max_reserved:
            self.reserved += n
            client.rsv_reader = n
            if client.waiting_memory:
                client.waiting_memory = False
                self._memory_waiters.discard(client)
                self._set_reading(client)
        elif not client.waiting_memory:
            client.waiting_memory = True
            self._memory_waiters.add(client)
            self._set_reading(client)

    def _set_reading(self, client: Client):
        want = (not client.waiting_memory and client.parked_bytes < PARK_LIMIT
                and not client.closed)
        if want != client.reading:
            client.reading = want
            self._update_events(client)

    def _update_events(self, client: Client):
        events = (selectors.EVENT_READ if client.reading else 0) | (
            selectors.EVENT_WRITE if client.out else 0)
        if events == client.events or client.closed:
            return
        if not client.events:
            self._sel.register(client.sock, events, client)
        elif not events:
            self._sel.unregister(client.sock)
        else:
            self._sel.modify(client.sock, events, client)
        client.events = events

    def _park(self, client: Client, frame):
        """Hold ``frame`` back, after the others held; stop reading past PARK_LIMIT."""
        n = len(frame)
        client.parked.append(frame)
        client.parked_bytes += n + PIECE
        if frame[0] == OP_PUBLISH or frame[0] == OP_PUBLISH_CONFIRM:
            client.parked_pub += 1
        if n > SMALL_FRAME:
            self.reserved += n
            client.rsv_parked += n
        if client.reading and client.parked_bytes >= PARK_LIMIT:
            self._set_reading(client)

    def _unpark(self, client: Client):
        """Run the client's held-back frames in order until one must wait again."""
        parked = client.parked
        handlers = self._handlers
        try:
            while parked and not client.closed:
                frame = parked.popleft()
                n = len(frame)
                client.parked_bytes -= n + PIECE
                if n > SMALL_FRAME:
                    self.reserved -= n
                    client.rsv_parked -= n
                op = frame[0]
                if op == OP_PUBLISH or op == OP_PUBLISH_CONFIRM:
                    taken = self._route_publish(client, frame, op == OP_PUBLISH_CONFIRM,
                                                park=False)
                    if taken:
                        client.parked_pub -= 1
                else:
                    taken = not (op in _RPC_OPS and _unsent(client) >= REPLY_WATER)
                    if taken:
                        handlers[op](client, frame)
                if not taken:
                    parked.appendleft(frame)
                    client.parked_bytes += n + PIECE
                    if n > SMALL_FRAME:
                        self.reserved += n
                        client.rsv_parked += n
                    break
        except (ProtocolError, struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
            log.warning("%s sent a bad frame (%s); disconnecting it", client.name, exc)
            self._drop(client, None)
            return
        except Exception:  # a bug must cost one client, never the broker
            log.exception("error handling %s; disconnecting it", client.name)
            self._drop(client, None)
            return
        if client.closed:
            return
        if not parked and client.flow_sent:
            self._flow(client, False, b"")
        if not client.reading:
            self._set_reading(client)
            if client.reading:
                self._take_input(client)  # what waited in the reader's buffer

    def _retry_blocked(self):
        for client in list(self._blocked):
            reason = client.blocked
            if reason is _MEMORY:
                ready = self.held < self.max_memory
            else:
                ready = reason is None or reason.deleted or not reason.full()
            if ready:
                self._blocked.discard(client)
                client.blocked = None
                if not client.closed:
                    self._unpark(client)

    def _block(self, client: Client, reason, frame=None) -> bool:
        """A publish of ``client`` must wait for room in ``reason`` (held back when
        ``frame`` is given): tell it, once."""
        client.blocked = reason
        self._blocked.add(client)
        if frame is not None:
            self._park(client, frame)
        if not client.flow_sent:
            limits = self.limits
            if reason is _MEMORY:
                text = (f"the broker's memory limit is reached: {self.held} bytes held "
                        f"(max_memory={limits.max_memory})")
            else:
                text = (f"queue {reason.name.decode(errors='replace')!r} is full: "
                        f"{len(reason.messages)} messages, {reason.bytes} bytes ready "
                        f"(max_queue_messages={reason.max_messages}, "
                        f"max_queue_bytes={reason.max_bytes})")
            self._flow(client, True, text.encode())
        return False

    def _flow(self, client: Client, blocked: bool, text: bytes):
        """A FLOW notice, unless the client has much unread already: a producer that
        never reads would have notices pile up (it reads them when its write blocks)."""
        client.flow_sent = False
        if blocked:
            try:
                if _INT.unpack(ioctl(client.fd, _SIOCOUTQ, b"\0\0\0\0"))[0] > 65536:
                    return
            except OSError:
                pass
            client.flow_sent = True
        client.out.append(FLOW_HEAD.pack(4 + len(text), OP_FLOW, 0, 1 if blocked else 0) + text)
        client.outlen += FLOW_HEAD.size + len(text)
        self._dirty_clients.add(client)

    # -- writing ------------------------------------------------------------------------

    def _flush(self, client: Client):
        out = client.out
        sock = client.sock
        sent_any = False
        while out:
            first = out[0]
            if len(out) == 1 or len(first) >= FLUSH_CHUNK:
                data = out.popleft()
            elif client.outlen <= FLUSH_CHUNK:
                data = b"".join(out)  # the usual case: all of it, joined in C
                out.clear()
            else:
                # Join a bounded piece: a client that reads slowly never makes the broker
                # copy its whole backlog per turn.
                pieces = []
                size = 0
                while out and size < FLUSH_CHUNK:
                    item = out.popleft()
                    pieces.append(item)
                    size += len(item)
                data = b"".join(pieces)
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._drop(client, None if exc.errno in _HANG_UP else f"write failed: {exc}",
                           hung_up=True)
                return
            if sent:
                sent_any = True
                client.outlen -= sent
            if sent < len(data):
                out.appendleft(memoryview(data)[sent:] if sent else data)
                break
        if out:
            if sent_any or not client.stalled_at:
                client.stalled_at = self._now
        else:
            client.stalled_at = 0.0
            client.outlen = 0
            if client.held_out:
                self.held -= client.held_out
                client.held_out = 0
                self._freed = True
        if bool(out) != bool(client.events & selectors.EVENT_WRITE):
            self._update_events(client)
        if client.throttled and _unsent(client) < HIGH_WATER:
            client.throttled = False
            for ch in client.channels.values():
                for c in ch.consumers.values():
                    self._dirty_queues.add(c.queue)
        if client.parked and client.blocked is None and _unsent(client) < REPLY_WATER:
            self._unpark(client)

    def _drop(self, client: Client, reason: str | None, hung_up: bool = False):
        """Forget a client: its unacked messages go back to their queues."""
        if client.closed:
            return
        if reason:
            log.warning("%s: %s", client.name, reason)
        if hung_up:
            self._take_remains(client)
        elif client.parked_pub:
            log.warning("%s: %d publishes held back by back-pressure (%s) are dropped with "
                        "it", client.name, client.parked_pub, self._why_blocked(client))
        client.closed = True
        self.clients.pop(client.fd, None)
        if client.events:
            try:
                self._sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()
        self._dirty_clients.discard(client)
        self._blocked.discard(client)
        self._memory_waiters.discard(client)
        self.held -= client.held_out
        self.reserved -= client.rsv_reader + client.rsv_parked
        client.held_out = client.rsv_reader = client.rsv_parked = 0
        client.parked.clear()
        client.out.clear()
        self._freed = True
        for ch in list(client.channels.values()):
            self._close_channel(ch)
        client.channels.clear()
        for q in [q for q in self.queues.values() if q.owner is client]:
            self._delete_queue(q)
        if self._accept_paused:
            self._resume_accept()

    def _take_remains(self, client: Client):
        """The peer hung up. Its pipelined publishes returned as sent on its side: take
        those held back and those still unread in its socket (bounded by its send
        buffer), past the queue limits while max_memory allows. Unconfirmed
        confirm-publishes are dropped: their publisher was told they failed."""
        frames = list(client.parked)
        why = f" (held back: {self._why_blocked(client)})" if client.blocked else ""
        client.parked.clear()
        client.parked_bytes = client.parked_pub = 0
        self.reserved -= client.rsv_parked
        client.rsv_parked = 0
        reader = client.reader
        try:
            while True:
                data = client.sock.recv(READ_SIZE)
                if not data:
                    break
                reader.feed(data)
                frames += reader.frames()
        except (OSError, FrameError):
            pass  # what could be read is taken; a partial frame is not a message
        taken = dropped = unconfirmed = 0
        # Its publish() calls returned: keep them past max_memory too. They are bounded
        # by the connection's socket buffer and PARK_LIMIT; the slack caps the sum over
        # every connection that hangs up while the broker is full.
        ceiling = self.max_memory + max(self.max_memory // REMAINS_SLACK_DIV,
                                        REMAINS_SLACK_MIN)
        for frame in frames:
            op = frame[0]
            try:
                if op == OP_PUBLISH:
                    if self.held >= ceiling:
                        dropped += 1
                    else:
                        self._route_publish(client, frame, False, park=False, force=True)
                        taken += 1
                elif op == OP_PUBLISH_CONFIRM:
                    unconfirmed += 1
                elif op == OP_ACK or op == OP_REJECT:
                    self._handlers[op](client, frame)
            except (ProtocolError, struct.error, IndexError, ValueError):
                break
        if dropped or unconfirmed or taken:
            log.warning("%s hung up before the broker took all its frames%s: %d publishes "
                        "taken (past the queue limits if need be), %d dropped at max_memory, "
                        "%d unconfirmed confirm-publishes dropped", client.name, why, taken,
                        dropped, unconfirmed)

    def _why_blocked(self, client: Client) -> str:
        reason = client.blocked
        if reason is _MEMORY:
            return "max_memory reached"
        if reason is None:
            return "its output not read"
        return f"queue {reason.name.decode(errors='replace')!r} full"

    # -- helpers ----------------------------------------------------------------------

    def _new_object(self, what: str):
        if self.objects >= self.limits.max_objects:
            raise _ResourceLimit(f"resource limit: {self.objects} queues, exchanges, bindings, "
                                 f"channels and consumers (max_objects="
                                 f"{self.limits.max_objects}); cannot add a {what}")
        self.objects += 1

    def _channel(self, client: Client, chid: int) -> Channel:
        ch = client.channels.get(chid)
        if ch is None:
            try:
                self._new_object("channel")
            except _ResourceLimit as exc:
                raise ProtocolError(str(exc)) from None
            ch = client.channels[chid] = Channel(chid, client)
        return ch

    def _new_queue(self, name: bytes, **kwargs) -> Queue:
        self._new_object("queue")
        q = self.queues[name] = Queue(name, self.limits, **kwargs)
        return q

    def _reply(self, client: Client, chid: int, reqid: int, status=STATUS_OK, data=b""):
        head = REPLY_HEAD.pack(REPLY_BODY_HEAD + len(data), OP_REPLY, chid, reqid, status)
        if len(data) > 256:
            client.out.append(head)
            client.out.append(data)
        else:  # one small object, not two
            client.out.append(head + data if data else head)
        client.outlen += REPLY_HEAD.size + len(data)
        self._dirty_clients.add(client)
        self._answered = True

    def _error(self, client, chid, reqid, status, text: str):
        self._reply(client, chid, reqid, status, text.encode("utf-8"))

    def _close_channel(self, ch: Channel):
        for consumer in list(ch.consumers.values()):
            self._remove_consumer(consumer)
        ch.consumers.clear()
        self._requeue_unacked(ch)
        self.objects -= 1

    def _requeue_unacked(self, ch: Channel):
        unacked = ch.unacked
        if not unacked:
            return
        # Newest first onto the head, so the queue keeps the original order.
        for queue, payload in reversed(list(unacked.values())):
            if not queue.deleted:
                queue.messages.appendleft((payload, True))
                queue.bytes += len(payload)
                self._dirty_queues.add(queue)
            else:
                self.held -= len(payload) + MSG_OVERHEAD
        unacked.clear()
        self._freed = True

    def _remove_consumer(self, consumer: Consumer):
        q = consumer.queue
        try:
            q.consumers.remove(consumer)
        except ValueError:
            return
        self.objects -= 1
        if q.auto_delete and q.had_consumers and not q.consumers and not q.deleted:
            self._delete_queue(q)

    def _drop_messages(self, q: Queue) -> int:
        """Empty ``q``; a new deque, so the old one's blocks are freed, not kept."""
        count = len(q.messages)
        if count:
            self._held_high = max(self._held_high, self.held)  # so the trim sees the peak
            self.held -= q.bytes + count * MSG_OVERHEAD
            q.messages = deque()
            q.bytes = 0
            self._freed = True
        return count

    def _delete_queue(self, q: Queue) -> int:
        count = self._drop_messages(q)
        q.deleted = True
        for consumer in list(q.consumers):
            consumer.channel.consumers.pop(consumer.cid, None)
            self.objects -= 1
        q.consumers.clear()
        for ex_name, key in list(q.bindings):
            self._unbind(q, ex_name, key)
        if self.queues.get(q.name) is q:
            del self.queues[q.name]
            self.objects -= 1
        self._forget_routes()
        return count

    def _unbind(self, q: Queue, ex_name: bytes, key: bytes):
        if (ex_name, key) in q.bindings:
            q.bindings.discard((ex_name, key))
            self.objects -= 1
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
            words = rk.split(b".")
            seen = {}
            patterns = exchange.patterns
            for bkey, queues in exchange.bindings.items():
                pattern = patterns.get(bkey)
                if pattern is None:
                    pattern = patterns[bkey] = TopicPattern(bkey)
                if pattern.matches(words):
                    for q in queues:
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
        n = len(consumers)
        idle = 0
        i = q.rr
        taken = 0
        while msgs and idle < n:
            c = consumers[i % n]
            i += 1
            ch = c.channel
            client = ch.client
            if _unsent(client) >= HIGH_WATER:
                client.throttled = True
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
            while msgs and budget:
                budget -= 1
                payload, redelivered = msgs.popleft()
                size = len(payload)
                taken += size
                if c.no_ack:
                    tag = 0
                    # Still in memory until written: counted until the output drains.
                    client.held_out += size + MSG_OVERHEAD
                else:
                    ch.next_tag = tag = ch.next_tag + 1
                    ch.unacked[tag] = (q, payload)
                out.append(DELIVER_HEAD.pack(DELIVER_BODY_HEAD + size, OP_DELIVER,
                                             ch.id, c.cid, tag, redelivered))
                out.append(payload)
                outlen += DELIVER_HEAD.size + size
                cost += DELIVER_HEAD.size + size + 2 * PIECE
                if cost >= HIGH_WATER:
                    client.throttled = True
                    break
                if ch.prefetch and not c.no_ack and len(ch.unacked) >= ch.prefetch:
                    break
            client.outlen = outlen
            self._dirty_clients.add(client)
        q.rr = i % n if n else 0
        if taken:
            q.bytes -= taken
            self._freed = True

    def _enqueue(self, q: Queue, payload: bytes):
        q.messages.append((payload, False))
        size = len(payload)
        q.bytes += size
        self.held += size + MSG_OVERHEAD
        if q.consumers:
            self._dirty_queues.add(q)

    # -- frame handlers -----------------------------------------------------------------

    def _on_hello(self, client: Client, frame) -> bool:
        """Greet the client; a refused HELLO ends the connection at once (False)."""
        op, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        if op != OP_HELLO or bytes(frame[7:11]) != MAGIC:
            raise ProtocolError("first frame is not a HELLO")
        (version,) = U16.unpack_from(frame, 11)
        if version != PROTOCOL_VERSION:
            text = (f"protocol version {version} not supported (broker speaks "
                    f"{PROTOCOL_VERSION})").encode()
            # Best effort, then gone: nothing that came after the HELLO runs.
            try:
                client.sock.send(REPLY_HEAD.pack(REPLY_BODY_HEAD + len(text), OP_REPLY, chid,
                                                 reqid, STATUS_PRECONDITION) + text)
            except OSError:
                pass
            self._drop(client, f"refused: {text.decode()}")
            return False
        client.greeted = True
        self._reply(client, chid, reqid, STATUS_OK,
                    HELLO_OK.pack(os.getpid(), self.limits.max_frame))
        return True

    def _on_publish_confirm(self, client: Client, frame):
        self._route_publish(client, frame, True)

    def _route_publish(self, client: Client, frame, confirm: bool = False, park: bool = True,
                       force: bool = False) -> bool:
        """Enqueue a publish where it routes (the PUBLISH handler). When it must wait:
        held back (``park``) and False. ``force``: never wait, past any limit."""
        if confirm:
            _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
            (exlen,) = U16.unpack_from(frame, 7)
            pos = 9 + exlen
            ex = frame[9:pos]
        else:
            (exlen,) = U16.unpack_from(frame, 3)
            pos = 5 + exlen
            ex = frame[5:pos]
        (rklen,) = U16.unpack_from(frame, pos)
        pos += 2
        rk = frame[pos:pos + rklen]
        pos += rklen
        if pos > len(frame):
            raise ProtocolError("publish header runs past the frame")
        self._busy = True
        if self.held >= self.max_memory and not force:
            return self._block(client, _MEMORY, frame if park else None)
        if not ex:
            q = self.queues.get(rk)
            if q is None:
                # Like kombu's virtual transports: the default exchange creates it
                # (unroutable past the limits, as a publish to no queue is in AMQP).
                if len(rk) > MAX_NAME or self.objects >= self.limits.max_objects:
                    targets = ()
                else:
                    targets = (self._new_queue(rk),)
            else:
                targets = (q,)
        else:
            exchange = self.exchanges.get(ex)
            if exchange is None or len(rk) > MAX_NAME:
                # A key longer than AMQP's shortstr is unroutable (the client refuses one
                # first): matching work per publish stays bounded by the key's 128 words.
                targets = ()
            else:
                targets = exchange.cache.get(rk)
                if targets is None:
                    targets = self._route(exchange, rk)
        for q in targets:
            if (len(q.messages) >= q.max_messages or q.bytes >= q.max_bytes) and not force:
                return self._block(client, q, frame if park else None)
        if targets:
            payload = frame[pos:]
            for q in targets:
                self._enqueue(q, payload)
        if confirm:
            self._reply(client, chid, reqid)
        return True

    def _on_ack(self, client: Client, frame):
        _, chid, tag, multiple = TAG_FLAG.unpack_from(frame, 0)
        self._busy = True
        ch = client.channels.get(chid)
        if ch is None:
            return
        unacked = ch.unacked
        if multiple:
            freed = 0
            for t in [t for t in unacked if t <= tag]:
                freed += len(unacked.pop(t)[1]) + MSG_OVERHEAD
            self.held -= freed
        else:
            entry = unacked.pop(tag, None)
            if entry is None:
                return
            self.held -= len(entry[1]) + MSG_OVERHEAD
        self._freed = True
        if ch.prefetch:
            for c in ch.consumers.values():
                if c.queue.messages:
                    self._dirty_queues.add(c.queue)

    def _on_reject(self, client: Client, frame):
        _, chid, tag, requeue = TAG_FLAG.unpack_from(frame, 0)
        ch = client.channels.get(chid)
        if ch is None:
            return
        entry = ch.unacked.pop(tag, None)
        if entry is None:
            return
        queue, payload = entry
        if requeue and not queue.deleted:
            # Past the queue's limit if need be: a message already held is never dropped.
            queue.messages.appendleft((payload, True))
            queue.bytes += len(payload)
            self._dirty_queues.add(queue)
        else:
            self.held -= len(payload) + MSG_OVERHEAD
            self._freed = True
        if ch.prefetch:
            for c in ch.consumers.values():
                self._dirty_queues.add(c.queue)

    def _on_qos(self, client: Client, frame):
        _, chid, prefetch = QOS_BODY.unpack_from(frame, 0)
        ch = self._channel(client, chid)
        ch.prefetch = prefetch
        for c in ch.consumers.values():
            self._dirty_queues.add(c.queue)

    def _on_cancel(self, client: Client, frame):
        _, chid, cid = QOS_BODY.unpack_from(frame, 0)
        ch = client.channels.get(chid)
        if ch is None:
            return
        consumer = ch.consumers.pop(cid, None)
        if consumer is not None:
            self._remove_consumer(consumer)

    def _on_channel_close(self, client: Client, frame):
        _, chid = HEAD.unpack_from(frame, 0)
        ch = client.channels.pop(chid, None)
        if ch is not None:
            self._close_channel(ch)

    def _name_error(self, client, chid, reqid, *names) -> bool:
        for name in names:
            if len(name) > MAX_NAME:
                self._error(client, chid, reqid, STATUS_PRECONDITION,
                            f"PRECONDITION_FAILED - name of {len(name)} bytes: at most "
                            f"{MAX_NAME}")
                return True
        return False

    def _limit_error(self, client, chid, reqid, exc) -> None:
        self._error(client, chid, reqid, STATUS_PRECONDITION, f"PRECONDITION_FAILED - {exc}")

    def _on_consume(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        cid, no_ack = struct.unpack_from(">IB", frame, 7)
        (name,), _ = unpack_strs(frame, 12, 1)
        if self._name_error(client, chid, reqid, name):
            return
        ch = self._channel(client, chid)
        q = self.queues.get(name)
        old = ch.consumers.pop(cid, None)
        if old is not None:
            self._remove_consumer(old)
        try:
            if q is None:  # consuming creates the queue, as kombu's virtual transports do
                q = self._new_queue(name)
            self._new_object("consumer")
        except _ResourceLimit as exc:
            self._limit_error(client, chid, reqid, exc)
            return
        consumer = Consumer(cid, ch, q, bool(no_ack))
        ch.consumers[cid] = consumer
        q.consumers.append(consumer)
        q.had_consumers = True
        self._reply(client, chid, reqid)
        if q.messages:
            self._dirty_queues.add(q)

    def _on_exchange_declare(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        (flags,) = U8.unpack_from(frame, 7)
        (name, type_), _ = unpack_strs(frame, 8, 2)
        type_ = type_ or b"direct"
        ex = self.exchanges.get(name)
        if flags & F_PASSIVE:
            if ex is None:
                self._error(client, chid, reqid, STATUS_NOT_FOUND,
                            f"NOT_FOUND - no exchange {name.decode(errors='replace')!r}")
            else:
                self._reply(client, chid, reqid)
            return
        if self._name_error(client, chid, reqid, name):
            return
        if type_ not in EXCHANGE_TYPES:
            self._error(client, chid, reqid, STATUS_PRECONDITION,
                        f"exchange type {type_.decode(errors='replace')!r} not supported "
                        "(direct, topic, fanout)")
            return
        if ex is None:
            try:
                self._new_object("exchange")
            except _ResourceLimit as exc:
                self._limit_error(client, chid, reqid, exc)
                return
            self.exchanges[name] = Exchange(name, type_)
        elif ex.type != type_:
            self._error(client, chid, reqid, STATUS_PRECONDITION,
                        f"PRECONDITION_FAILED - exchange {name.decode(errors='replace')!r} "
                        f"is {ex.type.decode()}, not {type_.decode(errors='replace')}")
            return
        self._reply(client, chid, reqid)

    def _on_exchange_delete(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        (name,), _ = unpack_strs(frame, 7, 1)
        ex = self.exchanges.pop(name, None)
        if ex is not None:
            self.objects -= 1
            for key, queues in ex.bindings.items():
                for q in queues:
                    if (name, key) in q.bindings:
                        q.bindings.discard((name, key))
                        self.objects -= 1
            self._forget_routes()
        self._reply(client, chid, reqid)

    def _on_queue_declare(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        (flags,) = U8.unpack_from(frame, 7)
        (name,), pos = unpack_strs(frame, 8, 1)
        max_messages = max_bytes = 0
        if len(frame) >= pos + QUEUE_LIMITS.size:
            max_messages, max_bytes = QUEUE_LIMITS.unpack_from(frame, pos)
        q = self.queues.get(name)
        if q is None:
            if flags & F_PASSIVE:
                self._error(client, chid, reqid, STATUS_NOT_FOUND,
                            f"NOT_FOUND - no queue {name.decode(errors='replace')!r}")
                return
            if self._name_error(client, chid, reqid, name):
                return
            try:
                q = self._new_queue(name, auto_delete=bool(flags & F_AUTO_DELETE),
                                    owner=client if flags & F_EXCLUSIVE else None)
            except _ResourceLimit as exc:
                self._limit_error(client, chid, reqid, exc)
                return
        if max_messages:
            q.max_messages = max_messages
        if max_bytes:
            q.max_bytes = max_bytes
        if max_messages or max_bytes:
            self._freed = True  # a raised limit may let held publishes go on
        self._reply(client, chid, reqid, STATUS_OK,
                    COUNTS.pack(len(q.messages), len(q.consumers)))

    def _on_queue_bind(self, client: Client, frame, unbind=False):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        (qname, exname, key), _ = unpack_strs(frame, 7, 3)
        q = self.queues.get(qname)
        ex = self.exchanges.get(exname)
        if q is None or ex is None:
            if unbind:
                self._reply(client, chid, reqid)
                return
            what = (f"queue {qname.decode(errors='replace')!r}" if q is None
                    else f"exchange {exname.decode(errors='replace')!r}")
            self._error(client, chid, reqid, STATUS_NOT_FOUND, f"NOT_FOUND - no {what}")
            return
        if unbind:
            self._unbind(q, exname, key)
        elif (exname, key) not in q.bindings:
            if self._name_error(client, chid, reqid, key):
                return
            try:
                self._new_object("binding")
            except _ResourceLimit as exc:
                self._limit_error(client, chid, reqid, exc)
                return
            q.bindings.add((exname, key))
            ex.bindings.setdefault(key, []).append(q)
            self._forget_routes()
        self._reply(client, chid, reqid)

    def _on_queue_unbind(self, client: Client, frame):
        self._on_queue_bind(client, frame, unbind=True)

    def _on_queue_purge(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        (name,), _ = unpack_strs(frame, 7, 1)
        q = self.queues.get(name)
        count = self._drop_messages(q) if q is not None else 0
        self._reply(client, chid, reqid, STATUS_OK, U32.pack(count))

    def _on_queue_delete(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        (flags,) = U8.unpack_from(frame, 7)
        (name,), _ = unpack_strs(frame, 8, 1)
        q = self.queues.get(name)
        count = 0
        if q is not None:
            if flags & F_IF_UNUSED and q.consumers or flags & F_IF_EMPTY and q.messages:
                self._reply(client, chid, reqid, STATUS_OK, U32.pack(0))
                return
            count = self._delete_queue(q)
        self._reply(client, chid, reqid, STATUS_OK, U32.pack(count))

    def _on_get(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        (no_ack,) = U8.unpack_from(frame, 7)
        (name,), _ = unpack_strs(frame, 8, 1)
        q = self.queues.get(name)
        if q is None or not q.messages:
            self._reply(client, chid, reqid, STATUS_EMPTY)
            return
        payload, redelivered = q.messages.popleft()
        size = len(payload)
        q.bytes -= size
        self._freed = True
        tag = 0
        if not no_ack:
            ch = self._channel(client, chid)
            ch.next_tag = tag = ch.next_tag + 1
            ch.unacked[tag] = (q, payload)
        else:
            client.held_out += size + MSG_OVERHEAD
        # Header and payload as two pieces: the payload is not copied.
        head = GET_OK.pack(tag, redelivered)
        client.out.append(REPLY_HEAD.pack(REPLY_BODY_HEAD + len(head) + size, OP_REPLY, chid,
                                          reqid, STATUS_OK) + head)
        client.out.append(payload)
        client.outlen += REPLY_HEAD.size + len(head) + size
        self._dirty_clients.add(client)

    def _on_recover(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        ch = client.channels.get(chid)
        if ch is not None:
            self._requeue_unacked(ch)
        self._reply(client, chid, reqid)

    def _on_ping(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        self._reply(client, chid, reqid, STATUS_OK,
                    COUNTS.pack(len(self.queues), len(self.clients)))


def _unsent(client: Client) -> int:
    """What a client's unsent output costs: its bytes and its pieces."""
    return client.outlen + len(client.out) * PIECE


class _ResourceLimit(Exception):
    """max_objects reached: an error answer to an RPC, a disconnect otherwise."""


# -- directory / socket safety -----------------------------------------------------------

def prepare_socket_dir(folder: Path) -> None:
    """Create ``folder`` 0700 if missing; refuse one that other users can enter."""
    folder = Path(folder)
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)
    st = folder.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{folder} is not a directory")
    if st.st_uid != os.geteuid():
        raise ValueError(f"{folder} is owned by uid {st.st_uid}, not by this user "
                         f"({os.geteuid()}); put the socket in a directory you own")
    if st.st_mode & 0o077:
        raise ValueError(
            f"{folder} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); put the "
            "socket in a private directory (it is created 0700 when missing), e.g. "
            f"unix://{Path(tempfile_dir()) / 'celery-bench-unix' / 'broker.sock'}")


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def _socket_accepts(path: str, timeout: float = 0.5) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


# -- entry points ---------------------------------------------------------------------------

def serve(path: str, *, watch_parent: bool = False, install_signals: bool = True,
          coalesce: float = DEFAULT_COALESCE_S, limits: Limits | None = None) -> None:
    """Serve the socket at ``path`` until SIGINT/SIGTERM (or the parent exits)."""
    broker = Broker(path, watch_parent=watch_parent, coalesce=coalesce, limits=limits)
    try:
        broker.listen()
    except OSError as exc:  # e.g. a directory we may not write: the user's to fix
        raise ValueError(f"cannot serve on {path}: {exc.strerror or exc}") from None
    print(f"unix broker listening on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    broker.serve_forever(install_signals=install_signals)
    print("unix broker stopped", file=sys.stderr, flush=True)


def main(url: str, *, watch_parent: bool = False, coalesce: float = DEFAULT_COALESCE_S,
         **settings) -> int:
    """``celery-bench broker unix:///abs/path.sock``: run in the foreground.

    ``settings`` are :class:`Limits` fields. Raises ValueError with a one-line reason for
    a bad URL, a bad setting or an unsafe directory.
    """
    limits = Limits(**settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    serve(socket_path_from_url(url), watch_parent=watch_parent, coalesce=coalesce,
          limits=limits)
    return 0


class BrokerProcess:
    """A broker subprocess the harness started; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, path: str, proc: subprocess.Popen, log_path: Path | None):
        self.path = path
        self.url = f"unix://{path}"
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start(path: str, *, timeout: float = 10.0, log_path: Path | None = None,
          coalesce: float = DEFAULT_COALESCE_S, preexec_fn=None, **settings) -> BrokerProcess:
    """Start ``python -m transports.broker unix://PATH`` and wait until the socket accepts.

    ``settings`` are :class:`Limits` fields (``max_queue_messages=1000``...). The broker
    exits by itself if this process dies (``--watch-parent``).
    """
    path = socket_path_from_url(path)
    limits = Limits(**settings)
    project_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        # Own session: a terminal Ctrl-C reaches the harness, which stops us in order.
        proc = subprocess.Popen(
            [sys.executable, "-m", "transports.broker", f"unix://{path}", "--watch-parent",
             "--coalesce-us", f"{coalesce * 1e6:g}", *limits.flags()],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
            start_new_session=True, preexec_fn=preexec_fn)
    finally:
        if log_path:
            log_file.close()
    broker = BrokerProcess(path, proc, Path(log_path) if log_path else None)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = broker.log_tail()
            raise RuntimeError(f"unix broker for {path} exited with code {proc.returncode}"
                               + (f": {tail}" if tail else ""))
        if _socket_accepts(path):
            return broker
        if time.monotonic() >= deadline:
            broker.stop()
            raise TimeoutError(f"unix broker did not accept connections on {path} within "
                               f"{timeout:g}s")
        time.sleep(0.02)


@contextmanager
def running(path: str, **kwargs):
    """``with running('/dir/broker.sock') as b:`` a broker subprocess, always stopped."""
    broker = start(path, **kwargs)
    try:
        yield broker
    finally:
        broker.stop()


def _cli(argv=None, prog: str = "python -m transports.broker") -> int:
    """The broker's command line; ``celery-bench broker`` runs this too (same options)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2 (argparse adds a usage block)
            print(f"{prog}: error: {message} (--help lists the options)", file=sys.stderr)
            sys.exit(2)

    parser = Parser(
        prog=prog,
        description="Run the unix transport's broker in the foreground until SIGINT/SIGTERM.")
    parser.add_argument("url", help="unix:///abs/path/broker.sock")
    parser.add_argument("--watch-parent", action="store_true",
                        help="exit when the process that started this one goes away")
    parser.add_argument("--coalesce-us", type=float, default=DEFAULT_COALESCE_S * 1e6,
                        help="pause after a busy turn, microseconds (default %(default)g; 0 = off)")
    default = Limits()
    helps = {
        "max_frame": "largest frame (message + routing) a client may send, bytes",
        "max_queue_messages": "ready messages a queue holds before publishers wait",
        "max_queue_bytes": "ready payload bytes a queue holds before publishers wait",
        "max_memory": "bytes of messages held in all before every publisher waits",
        "max_connections": "connections served at once; more wait in the listen backlog",
        "max_objects": "queues + exchanges + bindings + channels + consumers",
        "handshake_timeout": "seconds a new connection has to send its HELLO",
        "idle_timeout": "close a connection silent this long, seconds (0 = never)",
        "frame_timeout": "close a connection whose half-sent big frame (holding its share of "
                         "max_memory) gets no byte this long, seconds (0 = never)",
        "send_timeout": "disconnect a client that takes none of its output this long, seconds",
        "backlog": "listen backlog",
    }
    for f in fields(Limits):
        kind = float if f.type == "float" else _size
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind,
                            default=getattr(default, f.name),
                            help=f"{helps[f.name]} (default %(default)s)")
    args = parser.parse_args(argv)
    if args.coalesce_us < 0:
        parser.error("--coalesce-us must be >= 0")
    settings = {f.name: getattr(args, f.name) for f in fields(Limits)}
    try:
        return main(args.url, watch_parent=args.watch_parent, coalesce=args.coalesce_us / 1e6,
                    **settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
