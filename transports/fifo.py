"""FIFO (named pipe) transport module for Kombu.

One named pipe per queue under a private directory, and no broker: the
process that consumes a queue creates its FIFO and holds it open; producers
write length-prefixed frames (:mod:`transports.framing`) straight into it.
For producers and consumers that share a host.

What a pipe can do and what it cannot, enforced rather than hoped for:

* **One consumer process per queue.** The consumer takes an exclusive
  ``flock`` on ``<queue>.lock``; a consumer in another process gets
  :class:`QueueBusyError` naming the holder's pid. Connections of one
  process share the queue's pipe, and only one of them may consume it.
* **No consumer, no publish.** Nothing holds a message for a queue nobody
  reads: a publish to such a queue fails at once with
  :class:`NoConsumerError` (opening a FIFO for writing with no reader gives
  ``ENXIO``), or waits up to ``publish_timeout`` seconds for a consumer to
  attach. Start consumers first. Kombu does not retry it (not recoverable).
  A consumer that stops consuming a queue (``basic_cancel`` of its last
  consumer on it: ``Consumer.cancel()``, Celery's warm shutdown) lets the
  queue go at once: its pipe is closed and unlinked, so a publish from then
  on fails the same way, even through a write end a producer already holds
  (``EPIPE``, then ``ENOENT``), instead of filling a pipe nobody will read.
  Queues the connection declared ``auto_delete``/``exclusive`` (reply and
  broadcast queues) are the exception: held, unread, until their declarer
  lets go, so a consumer of them can stop and come back.
* **At-most-once delivery, no acks.** A message belongs to the consumer
  process once it is in its pipe. ``ack`` only frees the prefetch window;
  whatever is in the pipe or read but not processed is lost if the consumer
  dies or detaches, never redelivered to another process, and unacked
  messages are not restored on close. ``reject(requeue=True)`` puts the
  message back at the head of this process's buffer (redelivered, while the
  process holds the queue).
* **What a consumer's end loses: its prefetch window plus its pipe.** With a
  prefetch limit (``basic_qos``; Celery's ``worker_prefetch_multiplier`` x
  concurrency) the consumer never holds more than its window: it reads the
  pipe frame by frame, only as many messages as the window has room for
  (delivered-unacked plus read-not-handed-over <= prefetch). SIGKILL loses that
  window and whatever sits in the pipe (up to ``pipe_size`` bytes of
  messages). A warm shutdown (``basic_cancel``, which ``Consumer.cancel()`` and
  Celery's warm shutdown call) reads no more, hands over what was read and lets
  the queue go, so only what was in the pipe at that moment is lost (publishes
  made while a worker winds down fail instead). Letting a queue go logs what it
  drops. Without a prefetch limit reads are in bulk (``read_size``) and what
  was read but not handed over is lost too.
  For a backlogged stream (a producer faster than its consumer) that is the
  pipe's contents, whatever the way it stops; figures in docs/transports.md. The
  pipe is the floor, and it cannot be made small without making producers
  block sooner (``pipe_size``). For work that must not be lost, use the
  ``unix`` transport (acks, redelivery, publisher confirms).
* **Many producers, no interleaving.** Every write is at most ``PIPE_BUF``
  bytes, which a pipe keeps whole. A larger message is split into chunks
  tagged with the producer's stream id and reassembled by the consumer (no
  lock; a producer that dies mid-message leaves a fragment the consumer
  drops).
* **Backpressure.** A full pipe (``pipe_size``) holds a publish up to
  ``write_timeout`` seconds, then :class:`PublishTimeout`. A producer in the
  consuming process never waits on its own pipe: it moves the pipe's
  content into the consumer's buffer (waiting would deadlock).
* **Size and purge** only from the consuming process (others see 0).
* **Exchanges.** A consumer writes the named-exchange bindings of each queue
  it holds to ``.bindings/<queue>.json``, so a publisher that never declared
  them still routes. Direct exchanges use the publisher's own bindings first
  and fail like the default exchange when the consumer is missing; topic and
  fanout deliver to every bound queue whose consumer is attached at that
  moment and skip the rest, as a broadcast does.
* **Who holds a queue.** The process that consumes it (``basic_consume``,
  ``basic_get``), or the one that declares it ``auto_delete`` or
  ``exclusive`` unless another process already holds it: reply and broadcast
  queues belong to their declarer, so a reply sent before its consumer starts
  is kept. Do not declare an ``auto_delete`` queue first in a producer.
* Forked children close the pipes they inherit (prefork pool children do
  not keep a dead consumer's pipe alive) and take new stream ids. Producers
  need SIGPIPE ignored, as Python sets it (a warning says when it is not).

Celery: ``broker_url='fifo:///abs/dir'`` in the client and in
``celery worker``. The worker consumes by readiness: this transport says
``implements.asynchronous`` and registers each held FIFO's read end with the
worker's event loop, reading a queue only while its prefetch window has room
(no ``polling_interval`` sleeps); without an event loop,
``drain_events(timeout)`` blocks on ``select``. Remote control works over the
emulated fanout: ``celery inspect``/``control`` (pidbox broadcast, replies to
an auto_delete reply queue). The ``rpc://`` result backend works for the same
reason. Celery turns mingle and gossip off by itself for this transport (they
need ``driver_type`` amqp or redis); worker heartbeats and task events are
published to the ``celeryev`` topic and reach only event receivers attached
at that moment. Everything stays at-most-once: tasks a worker prefetched, and
those still in its pipe, are lost when it stops or dies (see above for how
many; ``task_acks_late`` does not bring them back). A warm shutdown cancels
the task consumer first, which lets the queue go: tasks published while the
worker winds down fail with :class:`NoConsumerError` (or wait
``publish_timeout`` for a replacement worker to attach) rather than being
accepted and lost. What can still be lost is what reached the worker in the
milliseconds between SIGTERM and that cancel: in its pipe, or received by
Celery but not yet taken by a pool process, which Celery drops at shutdown
because it counts on a broker to redeliver it. That is ~1 task for a paced
publisher, but a worker whose pipe is full (a publisher faster than it) loses the
pipe's contents: up to ``pipe_size`` bytes of tasks (docs/transports.md).

Features
========
* Type: Virtual
* Supports Direct: Yes
* Supports Topic: Yes (bindings shared through the directory)
* Supports Fanout: Yes (to consumers attached at publish time)
* Supports Priority: No
* Supports TTL: No

Connection String
=================
The URL names the directory (absolute path) that holds the pipes:

.. code-block::

    fifo:///absolute/path/to/dir

The consumer creates the directory (mode 0700) if missing. The directory must
belong to the current user and must not be writable by group or others; FIFOs
and lock files are created 0600.

Transport Options
=================
* ``publish_timeout``: (float) Seconds a publish waits for a consumer to
  attach to the queue before :class:`NoConsumerError`. Default ``0``
  (fail fast).
* ``write_timeout``: (float) Seconds a publish waits while the pipe is full
  (consumer attached but not reading) before :class:`PublishTimeout`.
  Default ``10``.
* ``pipe_size``: (int) Pipe capacity the consumer asks for with
  ``F_SETPIPE_SZ``; capped by ``/proc/sys/fs/pipe-max-size``. Default 1 MiB.
* ``read_size``: (int) Bytes read from a pipe per read call by a consumer
  without a prefetch limit (with one, reads are frame by frame). Default
  256 KiB.
* ``body_encoding``: Kombu's body encoding. Default ``None``: frames carry
  the body raw, so Kombu's base64 round trip is skipped.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import select
import signal
import socket
import stat
import struct
import termios
import threading
import time
import weakref
from collections import deque
from hashlib import sha256
from itertools import count
from queue import Empty

from kombu.exceptions import ChannelError, ConnectionError
from kombu.log import get_logger
from kombu.transport import virtual
from kombu.transport.virtual.exchange import STANDARD_EXCHANGE_TYPES, TopicExchange

from . import framing

logger = get_logger(__name__)

PIPE_BUF = select.PIPE_BUF
DEFAULT_PIPE_SIZE = 1 << 20
DEFAULT_READ_SIZE = 256 << 10
DEFAULT_WRITE_TIMEOUT = 10.0

# A frame payload whose first byte is 0xFF is a chunk of a large message: a whole
# message starts with its u32 meta length, which is < MAX_FRAME (64 MiB) < 0xFF000000.
CHUNK = 0xFF
_CHUNK_PREFIX = bytes([CHUNK])
_FIRST, _LAST = 1, 2
SID_SIZE = 8
_CHUNK_HEAD = 1 + SID_SIZE + 1          # 0xFF, stream id, flags
CHUNK_DATA = PIPE_BUF - framing.HEADER_SIZE - _CHUNK_HEAD
MAX_WHOLE = PIPE_BUF - framing.HEADER_SIZE  # largest payload sent as one write

_SAFE_NAME = re.compile(r"[A-Za-z0-9_@][A-Za-z0-9_.@-]{0,199}\Z")
_OPEN_WRITE = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
_MAX_OUTBOXES = 512
_BIND_DIR = ".bindings"

_HEADER = framing.HEADER_SIZE
_INT = struct.Struct("i")
_pack = framing.HEADER.pack
_encode = framing.encode_message
_decode = framing.decode_message
_write = os.write


class FifoError(ChannelError):
    """A fifo transport failure with a message that says what to do."""


class NoConsumerError(FifoError):
    """Publish to a queue that has no consumer attached."""


class QueueBusyError(FifoError):
    """A second consumer for a queue that already has one."""


class PublishTimeout(FifoError):
    """The consumer is attached but its pipe stayed full."""


def _option(opts, name, kind, default):
    value = opts.get(name)
    if value is None:
        return default
    try:
        value = kind(value)
    except (TypeError, ValueError):
        value = -1
    if value < 0:
        raise FifoError(f"fifo transport option {name}={opts.get(name)!r}: expected a "
                        f"non-negative {kind.__name__}")
    return value


def _set_pipe_size(fd, size):
    """Ask for ``size`` bytes of pipe, else the most an unprivileged process may have."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
        return
    except OSError:
        pass
    try:
        with open("/proc/sys/fs/pipe-max-size") as fh:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(size, int(fh.read())))
    except (OSError, ValueError):
        pass  # keep the kernel's default capacity


def queue_filename(queue: str) -> str:
    """A file name for ``queue``: itself when plain, else a hash ('%' never starts a plain one)."""
    if _SAFE_NAME.match(queue):
        return queue
    return "%" + sha256(queue.encode("utf-8")).hexdigest()[:40]


class _Inbox:
    """The consuming end of one queue's FIFO, held by this process.

    One per queue per process, shared by the connections of the process that
    hold it (a Celery client declares its reply queue on the publishing
    connection and consumes it on another); only one of them may consume.
    """

    __slots__ = ("key", "queue", "fifo_path", "lock_path", "bindings_path", "rfd", "wfd",
                 "lockfd", "ino", "pid", "reader", "frames", "requeued", "partials", "channel",
                 "holders", "reg", "lock", "stopped")

    def __init__(self, key, queue, fifo_path, lock_path, bindings_path):
        self.key = key
        self.queue = queue
        self.fifo_path = fifo_path
        self.lock_path = lock_path
        self.bindings_path = bindings_path
        self.rfd = self.wfd = self.lockfd = -1
        self.ino = None
        self.pid = os.getpid()
        self.reader = framing.FrameReader(PIPE_BUF)  # every frame is one write <= PIPE_BUF
        self.frames = deque()      # whole message payloads, not yet decoded
        self.requeued = deque()    # decoded messages put back by reject(requeue=True)
        self.partials = {}         # stream id -> bytearray of a chunked message
        self.channel = None        # the consuming channel (its QoS limits delivery)
        self.holders = set()       # transports of this process holding the queue
        self.reg = None            # (loop, transport) while the read end is in an event loop
        self.lock = threading.Lock()  # parsing: the consumer, or a producer of this process
        self.stopped = False       # consumer cancelled: read nothing more from the pipe

    def pending(self) -> bool:
        return bool(self.requeued or self.frames)


class _FifoTopicExchange(TopicExchange):
    """Topic delivery that skips queues without a consumer (it is a broadcast)."""

    def deliver(self, message, exchange, routing_key, **kwargs):
        put = self.channel._put_broadcast
        deadletter = self.channel.deadletter_queue
        for queue in self.channel._lookup(exchange, routing_key):
            if queue and queue != deadletter:
                put(queue, message)


class Channel(virtual.Channel):
    """FIFO channel: ``_put`` writes a frame into the queue's pipe."""

    body_encoding = None
    do_restore = False          # a consumer that closes cannot hand messages back
    supports_fanout = True      # fanout goes through the shared bindings
    exchange_types = dict(STANDARD_EXCHANGE_TYPES, topic=_FifoTopicExchange)

    # -- publishing ---------------------------------------------------------
    def basic_publish(self, message, exchange, routing_key, **kwargs):
        if not exchange or self.body_encoding:
            return super().basic_publish(message, exchange, routing_key, **kwargs)
        # A direct exchange the publisher bound itself: the route is cached until any
        # binding of this connection changes, saving kombu's per-message table look-up.
        routes = self.connection._routes
        queues = routes.get((exchange, routing_key))
        if queues is None:
            etype = self.typeof(exchange)
            try:
                local = etype.lookup(self.get_table(exchange), exchange, routing_key, None)
            except KeyError:
                local = ()
            if not (local and etype.type == "direct"):
                return super().basic_publish(message, exchange, routing_key, **kwargs)
            queues = routes[(exchange, routing_key)] = tuple(local)
        info = message["properties"]["delivery_info"]
        info["exchange"] = exchange
        info["routing_key"] = routing_key
        payload = _encode(message)
        send = self.connection._send
        for queue in queues:
            send(queue, payload, False)

    def exchange_declare(self, *args, **kwargs):
        self.connection._routes.clear()
        return super().exchange_declare(*args, **kwargs)

    def exchange_delete(self, *args, **kwargs):
        self.connection._routes.clear()
        return super().exchange_delete(*args, **kwargs)

    def queue_bind(self, *args, **kwargs):
        self.connection._routes.clear()
        return super().queue_bind(*args, **kwargs)

    def _inplace_augment_message(self, message, exchange, routing_key):
        if self.body_encoding:
            return super()._inplace_augment_message(message, exchange, routing_key)
        # No base64, and no uuid delivery tag: the consumer numbers what it reads.
        info = message["properties"]["delivery_info"]
        info["exchange"] = exchange
        info["routing_key"] = routing_key

    def _put(self, queue, message, **kwargs):
        self.connection._send(queue, _encode(message), False)

    def _put_broadcast(self, queue, message):
        self.connection._send(queue, _encode(message), True)

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        payload = _encode(message)
        for queue in self._bound_queues(exchange, routing_key, "fanout"):
            self.connection._send(queue, payload, True)

    def _lookup(self, exchange, routing_key, default=None):
        if not exchange:
            return [routing_key or default or self.deadletter_queue]
        etype = self.typeof(exchange)
        try:
            local = etype.lookup(self.get_table(exchange), exchange, routing_key, default)
        except KeyError:
            local = ()
        if local and etype.type == "direct":
            return local  # the publisher's own bindings: no file system look-up
        return self._bound_queues(exchange, routing_key, None, local)

    def _bound_queues(self, exchange, routing_key, type_, local=None):
        if local is None:
            try:
                local = self.typeof(exchange).lookup(
                    self.get_table(exchange), exchange, routing_key, None)
            except KeyError:
                local = ()
        queues = set(local)
        shared = self.connection._shared_bindings().get(exchange)
        if shared:
            etype = self.exchange_types.get(type_ or shared[0])
            if etype is not None:
                queues.update(etype.lookup(shared[1], exchange, routing_key, None))
        return queues

    # -- declaring ----------------------------------------------------------
    def _new_queue(self, queue, **kwargs):
        if kwargs.get("auto_delete") or kwargs.get("exclusive"):
            try:
                self.connection._attach(queue, self)
            except QueueBusyError:
                pass  # another process consumes it: we are only declaring before a publish
            else:
                self.connection._declared.add(queue)  # held until its declarer lets go

    def _has_queue(self, queue, **kwargs):
        return self.connection._has_queue(queue)

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        self.connection._share_bindings(queue)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        self.connection._routes.clear()
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        self.connection._share_bindings(queue)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        """Let go of the queue (kombu calls ``_delete`` per binding, so not for a bare queue)."""
        if if_empty and self._size(queue):
            return
        self.connection._routes.clear()
        super().queue_delete(queue, if_unused=if_unused, **kwargs)
        self.connection._detach(queue)

    def _delete(self, queue, *args, **kwargs):
        self.connection._detach(queue)

    def _size(self, queue):
        return self.connection._size(queue)

    def _purge(self, queue):
        return self.connection._purge(queue)

    # -- consuming ----------------------------------------------------------
    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        self.connection._attach(queue, self, consume=True)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag):
        """Stop reading the queue's pipe and hand over what was read; when that was the
        queue's last consumer, let the queue go (close and unlink its pipe), so what is
        published from then on fails (:class:`NoConsumerError`, or waits
        ``publish_timeout`` for a new consumer) instead of filling a pipe nobody reads.
        Celery's warm shutdown and ``Consumer.cancel()`` come through here.

        A queue this connection declared ``auto_delete``/``exclusive`` (a reply or
        broadcast queue) stays held, unread, until its declarer lets go: a consumer of
        it may come back (Celery's rpc result consumer does)."""
        conn = self.connection
        queue = self._tag_to_queue.get(consumer_tag)
        if queue is None or conn is None:
            return super().basic_cancel(consumer_tag)
        callback = conn._callbacks.get(queue)
        read = conn._stop_reading(queue)
        super().basic_cancel(consumer_tag)
        if queue not in conn._callbacks and queue not in conn._declared:
            conn._detach(queue)  # before the hand-over: every write from now on fails
            conn._let_go.add(queue)
        if callback is not None:
            for raw in read:
                callback(raw)
        inbox = conn._inboxes.get(queue)
        if inbox is not None and queue not in conn._callbacks:
            inbox.stopped = False  # still held (declared): nothing reads it but basic_get

    def _get(self, queue, timeout=None):
        inbox = self.connection._attach(queue, self)
        raw = self.connection._take(inbox)
        if raw is None:
            raise Empty()
        return raw

    def _restore(self, message):
        """reject(requeue=True): back to the head of this process's buffer, never elsewhere."""
        raw = message.serializable()
        raw["redelivered"] = True
        info = message.delivery_info
        raw["properties"]["delivery_info"] = dict(info, redelivered=True)
        held = self.connection._inboxes
        for queue in sorted(self._lookup(info.get("exchange"), info.get("routing_key")) or ()):
            if queue in held:
                held[queue].requeued.appendleft(raw)
                return
        logger.warning("fifo: requeued message dropped: this process no longer holds its "
                       "queue (delivery is at-most-once)")

    def _restore_at_beginning(self, message):
        return self._restore(message)


class Transport(virtual.Transport):
    """FIFO transport: one named pipe per queue, consumer-owned."""

    Channel = Channel

    driver_type = "fifo"
    driver_name = "fifo"
    polling_interval = None     # drain_events blocks on select, never sleeps a poll interval

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    connection_errors = (ConnectionError,)
    channel_errors = (ChannelError,)
    # Nothing here is cured by reconnecting: fail at once instead of retrying.
    recoverable_connection_errors = ()
    recoverable_channel_errors = ()

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        self.directory = self._parse_directory(client)
        opts = client.transport_options
        self.publish_timeout = _option(opts, "publish_timeout", float, 0.0)
        self.write_timeout = _option(opts, "write_timeout", float, DEFAULT_WRITE_TIMEOUT)
        self.pipe_size = _option(opts, "pipe_size", int, DEFAULT_PIPE_SIZE)
        self.read_size = max(PIPE_BUF, _option(opts, "read_size", int, DEFAULT_READ_SIZE))
        self._inboxes = {}          # queue -> _Inbox (consumer side)
        self._declared = set()      # queues held because this connection declared them
        self._let_go = set()        # queues it consumed and let go on cancel: still known
        self._by_fd = {}            # read fd -> _Inbox
        self._outboxes = {}         # queue -> write fd (producer side)
        self._rr = 0                # round robin between queues with buffered messages
        self._tags = count(1)
        self._sid = os.urandom(SID_SIZE)
        self._chunk_lock = threading.Lock()
        self._dir_checked = False
        self._sigpipe_checked = False
        self._bind_cache = None
        self._routes = {}           # (exchange, routing_key) -> queues, direct and local only
        self._loop = None
        self._wake_r = self._wake_w = None   # pipe that makes the event loop's poll return
        self._wake_armed = False
        _live_transports.add(self)

    @staticmethod
    def _parse_directory(client) -> str:
        host = client.hostname
        vhost = client.virtual_host or ""
        if (host and host != "localhost") or vhost in ("", "/"):
            raise FifoError(
                f"fifo URL must name an absolute directory, like fifo:///abs/dir "
                f"(got host={host!r} path={vhost!r})")
        return os.path.normpath("/" + vhost.lstrip("/"))

    def driver_version(self):
        return "N/A"

    @property
    def default_connection_params(self):
        return {}  # no host to default to (kombu warns when it fills in 'localhost')

    # -- files ----------------------------------------------------------------
    def _path(self, queue: str, suffix: str) -> str:
        return os.path.join(self.directory, queue_filename(queue) + suffix)

    def _check_directory(self, create: bool) -> bool:
        """The directory is ours and private; False if it does not exist (and not create)."""
        if self._dir_checked:
            return True
        if create:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise FifoError(f"fifo directory {self.directory} is not a directory")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise FifoError(
                f"fifo directory {self.directory} must belong to you and not be writable by "
                f"group or others (mode {stat.filemode(st.st_mode)}); use a private directory "
                f"(mkdir -m 700)")
        self._dir_checked = True
        return True

    def _has_queue(self, queue) -> bool:
        # A queue whose consumer this connection cancelled still exists for it, empty
        # and without a consumer (publishing to it fails), as an AMQP queue would.
        return (queue in self._inboxes or queue in self._let_go
                or os.path.exists(self._path(queue, ".fifo")))

    # -- consumer side --------------------------------------------------------
    def _attach(self, queue, channel, consume=False):
        """Hold the FIFO of ``queue``, creating it unless this process already does."""
        inbox = self._inboxes.get(queue)
        if inbox is None:
            self._let_go.discard(queue)
            key = (self.directory, queue)
            with _inboxes_lock:
                inbox = _process_inboxes.get(key)
                if inbox is None:
                    inbox = self._open_inbox(key, queue)
                    _process_inboxes[key] = inbox
                inbox.holders.add(self)
            self._inboxes[queue] = inbox
            self._by_fd[inbox.rfd] = inbox
            self._share_bindings(queue)
        if consume:
            for other in list(inbox.holders):
                if other is not self and queue in other._callbacks:
                    raise QueueBusyError(
                        f"fifo queue {queue!r} is already consumed by another connection of "
                        f"this process: a named pipe has exactly one consumer")
            inbox.channel = channel
            inbox.stopped = False
        elif inbox.channel is None:
            inbox.channel = channel
        return inbox

    def _open_inbox(self, key, queue):
        self._check_directory(create=True)
        inbox = _Inbox(key, queue, self._path(queue, ".fifo"), self._path(queue, ".lock"),
                       self._bindings_path(queue))
        inbox.lockfd = self._lock_queue(queue, inbox.lock_path)
        try:
            try:
                os.unlink(inbox.fifo_path)  # stale: its consumer died (we hold the lock)
            except FileNotFoundError:
                pass
            os.mkfifo(inbox.fifo_path, 0o600)
            inbox.rfd = os.open(inbox.fifo_path,
                                os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
            # Our own write end: the read end never sees EOF as producers come and go.
            inbox.wfd = os.open(inbox.fifo_path, _OPEN_WRITE)
            inbox.ino = os.fstat(inbox.rfd).st_ino
            _set_pipe_size(inbox.rfd, self.pipe_size)
        except BaseException:
            _close_inbox(inbox, unlink=True)
            raise
        return inbox

    def _lock_queue(self, queue, lock_path) -> int:
        for _ in range(10):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise QueueBusyError(
                    f"fifo queue {queue!r} already has a consumer (pid {holder}): a named pipe "
                    f"has exactly one consumer process; stop it or use another queue") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its previous owner unlinked while we waited
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                return fd
            os.close(fd)
        raise FifoError(f"could not lock fifo queue {queue!r}: its lock file keeps changing")

    def _detach(self, queue):
        """Let go of ``queue``; the last holder in the process closes and removes its FIFO."""
        self._declared.discard(queue)
        self._let_go.discard(queue)
        inbox = self._inboxes.pop(queue, None)
        if inbox is None:
            return
        self._by_fd.pop(inbox.rfd, None)
        if inbox.reg is not None and inbox.reg[1] is self:
            inbox.reg[0].remove_reader(inbox.rfd)
            inbox.reg = None
        with _inboxes_lock:
            inbox.holders.discard(self)
            if inbox.holders:
                return
            if _process_inboxes.get(inbox.key) is inbox:
                del _process_inboxes[inbox.key]
        _close_inbox(inbox, unlink=True)

    def _room(self, inbox):
        """How many more messages may come out of the pipe now; None = no limit.

        What was read is lost if this process dies, so a consumer with a prefetch
        limit never holds more than its window: delivered-unacked plus read-unhanded.
        """
        if inbox.stopped:
            return 0
        channel = inbox.channel
        if inbox.queue not in self._callbacks or channel is None or channel.connection is None:
            return 1  # basic_get: one at a time
        room = channel.qos.can_consume_max_estimate()
        if room is None:
            return None
        return room - len(inbox.frames) - len(inbox.requeued)

    def _fill(self, inbox, bulk: bool = False) -> bool:
        """Read from ``inbox``'s pipe, never blocking; True if any bytes came.

        No prefetch limit (or ``bulk``): one read of ``read_size``. Otherwise frame by
        frame, at most as many messages as :meth:`_room` allows: each read takes the
        rest of one frame and the next frame's length, so no read completes two.
        """
        # Read and parse under one lock: two threads reading (the consumer, and a producer
        # of this process making room) must feed the parser in pipe order.
        with inbox.lock:
            room = None if bulk else self._room(inbox)
            if room is None:
                data = self._read(inbox, self.read_size)
                if not data:
                    return False
                self._parse(inbox, data)
                return True
            got = False
            reader = inbox.reader
            target = len(inbox.frames) + room
            while len(inbox.frames) < target:
                n = reader.next_length()
                want = (_HEADER - reader.pending if n is None
                        else n + 2 * _HEADER - reader.pending)
                data = self._read(inbox, want)
                if not data:
                    break
                got = True
                self._parse(inbox, data)
                if len(data) < want:
                    break  # the pipe is empty for now
            return got

    @staticmethod
    def _read(inbox, size) -> bytes:
        try:
            return os.read(inbox.rfd, size)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EBADF:
                return b""
            raise

    def _parse(self, inbox, data):
        reader = inbox.reader
        reader.feed(data)
        try:
            frames = reader.frames()
        except framing.FrameError as exc:
            inbox.reader = framing.FrameReader(PIPE_BUF)
            raise FifoError(f"fifo queue {inbox.queue!r}: the pipe carries something that is "
                            f"not fifo frames ({exc}); only this transport may write to "
                            f"{inbox.fifo_path}") from None
        if frames:
            append = inbox.frames.append
            for f in frames:
                if f[0] != CHUNK:
                    append(f)
                else:
                    self._chunk(inbox, f)

    def _stop_reading(self, queue) -> list:
        """Warm shutdown of one consumer: read no more of the pipe; returns the messages
        read and not handed over yet (they fit the prefetch window they were read for),
        for the caller to hand over. What is still in the pipe is lost when the queue
        is let go (and logged)."""
        inbox = self._inboxes.get(queue)
        if inbox is None:
            return []
        inbox.stopped = True
        if inbox.reg is not None and inbox.reg[1] is self:
            inbox.reg[0].remove_reader(inbox.rfd)
            inbox.reg = None
        read = []
        if queue in self._callbacks:
            while inbox.pending() and inbox.rfd >= 0:
                raw = self._take(inbox)  # stopped: takes from memory, never the pipe
                if raw is None:
                    break
                read.append(raw)
        return read

    def _chunk(self, inbox, f):
        sid, flags, data = f[1:1 + SID_SIZE], f[1 + SID_SIZE], f[_CHUNK_HEAD:]
        partials = inbox.partials
        if flags & _FIRST:
            buf = partials[sid] = bytearray(data)
        else:
            buf = partials.get(sid)
            if buf is None:
                return  # the tail of a message whose start we never saw: drop it
            buf += data
            if len(buf) > framing.MAX_FRAME:
                del partials[sid]
                logger.error("fifo queue %r: chunked message over %d bytes dropped",
                             inbox.queue, framing.MAX_FRAME)
                return
        if flags & _LAST:
            del partials[sid]
            inbox.frames.append(bytes(buf))

    def _take(self, inbox):
        """The next message of ``inbox`` as a kombu dict (one read if empty), or None."""
        while True:
            if inbox.requeued:
                raw = inbox.requeued.popleft()
            elif inbox.frames or (self._fill(inbox) and inbox.frames):
                try:
                    raw = _decode(inbox.frames.popleft())
                    raw["properties"]["delivery_tag"] = next(self._tags)
                except (framing.FrameError, KeyError, TypeError) as exc:
                    logger.error("fifo queue %r: dropped a malformed message: %s",
                                 inbox.queue, exc)
                    continue
            else:
                return None
            return raw

    def _deliverable(self, inbox) -> bool:
        if inbox.queue not in self._callbacks:
            return False
        channel = inbox.channel
        return channel is None or (channel.connection is not None and channel.qos.can_consume())

    def _size(self, queue) -> int:
        inbox = self._inboxes.get(queue)
        if inbox is None:
            return 0  # only the consumer can look inside its pipe
        for _ in range(64):
            if not self._fill(inbox, bulk=True):
                break
        return len(inbox.frames) + len(inbox.requeued)

    def _purge(self, queue) -> int:
        size = self._size(queue)
        inbox = self._inboxes.get(queue)
        if inbox is not None:
            inbox.frames.clear()
            inbox.requeued.clear()
        return size

    def drain_events(self, connection, timeout=None):
        """Deliver one message; block on ``select`` up to ``timeout`` for one to arrive."""
        deadline = None
        yielded = False
        if len(self._inboxes) == 1:
            # Fast path: one queue held, a message already buffered.
            for inbox in self._inboxes.values():
                if inbox.frames and self._deliverable(inbox):
                    raw = self._take(inbox)
                    if raw is not None:
                        self._callbacks[inbox.queue](raw)
                        return
        while True:
            inboxes = [ib for ib in self._inboxes.values() if self._deliverable(ib)]
            n = len(inboxes)
            if n:
                start = self._rr % n
                for i in range(n):
                    inbox = inboxes[(start + i) % n]
                    raw = self._take(inbox)
                    if raw is not None:
                        self._rr = start + i + 1
                        self._callbacks[inbox.queue](raw)
                        return
            if deadline is None:
                deadline = float("inf") if timeout is None else time.monotonic() + timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            if n:
                if not yielded:
                    # Caught up: let a producer sharing our CPU write more before we sleep;
                    # being woken for every message costs the producer more than this.
                    yielded = True
                    os.sched_yield()
                    continue
                wait = None if remaining == float("inf") else remaining
                select.select([ib.rfd for ib in inboxes], [], [], wait)
            else:
                # No queue can take a message now (none consumed, or prefetch full):
                # an ack from another thread may free one, so look again soon.
                time.sleep(min(remaining, 0.01))

    # -- event loop -------------------------------------------------------------
    def register_with_event_loop(self, connection, loop):
        self._loop = loop
        # Buffered messages are in memory, not in a pipe, so readiness will not announce
        # them. Delivering them from the tick callback runs after the loop chose its poll
        # timeout: with the solo pool the tasks' acks then wait for that timeout (1 s
        # with no timers). The tick pokes this pipe instead, and delivery runs from poll().
        if self._wake_r is None:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._wake_r, self._on_wake)
        loop.on_tick.add(self._on_tick)

    def _on_wake(self, *args):
        try:
            os.read(self._wake_r, 512)
        except (BlockingIOError, TypeError):
            pass
        self._wake_armed = False
        for inbox in list(self._inboxes.values()):
            if inbox.rfd >= 0 and inbox.pending():
                self._pump(inbox)

    def on_readable(self, fd):
        """The read end of a queue is readable: read once, deliver what prefetch allows."""
        inbox = self._by_fd.get(fd)
        if inbox is not None:
            self._fill(inbox)
            self._pump(inbox)

    def _pump(self, inbox):
        callbacks = self._callbacks
        while inbox.pending() and self._deliverable(inbox):
            raw = self._take(inbox)
            if raw is None:
                break
            callbacks[inbox.queue](raw)
            if inbox.rfd < 0:
                break  # the callback closed the connection

    def _on_tick(self):
        """Each loop turn: deliver what is buffered, read only queues that can take more."""
        loop = self._loop
        if loop is None:
            return
        wake = False
        for inbox in list(self._inboxes.values()):
            if inbox.rfd < 0:
                continue
            if inbox.pending():
                wake = wake or self._deliverable(inbox)
            want = not inbox.pending() and self._deliverable(inbox)
            if want and inbox.reg is None:
                loop.add_reader(inbox.rfd, self.on_readable, inbox.rfd)
                inbox.reg = (loop, self)
            elif not want and inbox.reg is not None and inbox.reg[1] is self:
                loop.remove_reader(inbox.rfd)
                inbox.reg = None
        if wake and not self._wake_armed:
            self._wake_armed = True
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass

    # -- producer side ----------------------------------------------------------
    def _send(self, queue, payload, missing_ok):
        """Write one encoded message into ``queue``'s pipe, in writes of <= PIPE_BUF."""
        n = len(payload)
        if n <= MAX_WHOLE:
            fd = self._outboxes.get(queue)
            if fd is not None:
                try:
                    _write(fd, _pack(n) + payload)  # atomic: <= PIPE_BUF, all or nothing
                    return
                except OSError:
                    pass  # full pipe or consumer gone: the slow path sorts it out
            self._write_frames(queue, [_pack(n) + payload], missing_ok)
            return
        if n > framing.MAX_FRAME:
            raise FifoError(f"message of {n} bytes exceeds the fifo limit ({framing.MAX_FRAME})")
        frames = []
        sid = self._sid
        last = n - 1
        for start in range(0, n, CHUNK_DATA):
            flags = (_FIRST if start == 0 else 0) | (_LAST if start + CHUNK_DATA > last else 0)
            piece = payload[start:start + CHUNK_DATA]
            frames.append(_pack(_CHUNK_HEAD + len(piece)) + _CHUNK_PREFIX + sid
                          + bytes((flags,)) + piece)
        with self._chunk_lock:  # one stream id per transport: chunks of two threads must not mix
            self._write_frames(queue, frames, missing_ok)

    def _write_frames(self, queue, frames, missing_ok):
        write_deadline = None
        reopened = False
        i = 0
        while i < len(frames):
            fd = self._outboxes.get(queue)
            if fd is None:
                fd = self._open_outbox(queue, missing_ok)
                if fd is None:
                    return  # broadcast to a queue whose consumer is gone
            try:
                written = _write(fd, frames[i])
            except BlockingIOError:
                own = _process_inboxes.get((self.directory, queue))
                if own is not None and own.rfd >= 0 and self._fill(own, bulk=True):
                    # We consume this queue ourselves: waiting would deadlock, so move
                    # the pipe's content into our own buffer instead.
                    continue
                if write_deadline is None:
                    write_deadline = time.monotonic() + self.write_timeout
                self._wait_writable(queue, fd, write_deadline)
                continue
            except BrokenPipeError:
                # The consumer detached or died: a new one may hold a new pipe.
                self._drop_outbox(queue)
                if reopened:
                    if missing_ok:
                        return
                    raise NoConsumerError(self._no_consumer(queue)) from None
                reopened = True
                i = 0  # a chunked message starts over in the new pipe
                continue
            if written != len(frames[i]):  # cannot happen for <= PIPE_BUF; never corrupt
                raise FifoError(f"short write ({written} of {len(frames[i])}) on {queue!r}")
            i += 1

    def _wait_writable(self, queue, fd, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PublishTimeout(
                f"fifo queue {queue!r}: the consumer is not reading (pipe full for "
                f"{self.write_timeout:g} s); raise transport option write_timeout or speed "
                f"up the consumer")
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        poller.poll(remaining * 1000.0)

    def _open_outbox(self, queue, missing_ok):
        if not self._sigpipe_checked:
            self._sigpipe_checked = True
            if signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL:
                logger.warning("fifo transport: SIGPIPE is not ignored in this process, so a "
                               "publish racing a consumer that leaves kills it; Python ignores "
                               "SIGPIPE unless something restored the default")
        path = self._path(queue, ".fifo")
        deadline = None
        delay = 0.001
        while True:
            if self._check_directory(create=False):
                try:
                    fd = os.open(path, _OPEN_WRITE)
                except OSError as exc:
                    if exc.errno not in (errno.ENXIO, errno.ENOENT):
                        raise FifoError(f"cannot open fifo for queue {queue!r}: {exc}") from None
                else:
                    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                        os.close(fd)
                        raise FifoError(f"{path} is not a FIFO")
                    if len(self._outboxes) >= _MAX_OUTBOXES:
                        self._close_outboxes()
                    self._outboxes[queue] = fd
                    return fd
            if missing_ok:
                return None
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.publish_timeout
            if now >= deadline:
                raise NoConsumerError(self._no_consumer(queue))
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.05)

    def _no_consumer(self, queue):
        waited = (f" within publish_timeout={self.publish_timeout:g} s"
                  if self.publish_timeout else "")
        return (f"no consumer attached to fifo queue {queue!r} in {self.directory}{waited}: "
                f"start the consumer first, or set transport option publish_timeout to wait")

    def _drop_outbox(self, queue):
        fd = self._outboxes.pop(queue, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _close_outboxes(self):
        for queue in list(self._outboxes):
            self._drop_outbox(queue)

    # -- shared bindings ----------------------------------------------------------
    def _bindings_path(self, queue):
        return os.path.join(self.directory, _BIND_DIR, queue_filename(queue) + ".json")

    def _share_bindings(self, queue):
        """The consumer of ``queue`` publishes its named-exchange bindings for other processes."""
        if queue not in self._inboxes:
            return
        rows = []
        for exchange, routing_key, arguments in self.state.queue_bindings(queue):
            if not exchange:
                continue
            etype = self.state.exchanges.get(exchange, {}).get("type", "direct")
            impl = Channel.exchange_types.get(etype)
            if impl is None:
                continue
            rkey, pattern, _ = impl(None).prepare_bind(queue, exchange, routing_key, arguments)
            rows.append([exchange, etype, rkey, pattern, queue])
        path = self._bindings_path(queue)
        if not rows:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
                  "w") as fh:
            json.dump(rows, fh)
        os.replace(tmp, path)

    def _shared_bindings(self):
        """{exchange: (type, [(routing_key, pattern, queue)])} of attached consumers."""
        folder = os.path.join(self.directory, _BIND_DIR)
        try:
            mtime = os.stat(folder).st_mtime_ns
        except FileNotFoundError:
            return {}
        cached = self._bind_cache
        # A folder changed within the last 0.2 s may change again inside one mtime tick.
        if cached is not None and cached[0] == mtime and time.time_ns() - mtime > 200_000_000:
            return cached[1]
        table = {}
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(folder, name)) as fh:
                    rows = json.load(fh)
                for exchange, etype, rkey, pattern, queue in rows:
                    table.setdefault(exchange, (etype, []))[1].append((rkey, pattern, queue))
            except (OSError, ValueError, TypeError):
                continue  # vanished or half-written by another version: skip it
        self._bind_cache = (mtime, table)
        return table

    # -- lifecycle ----------------------------------------------------------------
    def close_connection(self, connection):
        try:
            super().close_connection(connection)
        finally:
            self._release()

    def _release(self):
        if self._loop is not None:
            self._loop.on_tick.discard(self._on_tick)
            if self._wake_r is not None:
                try:
                    self._loop.remove_reader(self._wake_r)
                except Exception:  # the loop may be closing already
                    pass
        for queue in list(self._inboxes):
            self._detach(queue)
        self._let_go.clear()
        self._loop = None
        self._close_wake()
        self._close_outboxes()

    def _close_wake(self):
        if self._wake_r is not None:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None
        self._wake_armed = False

    def _after_fork_in_child(self):
        self._inboxes.clear()
        self._by_fd.clear()
        self._close_outboxes()
        self._close_wake()
        self._loop = None
        self._sid = os.urandom(SID_SIZE)
        self._chunk_lock = threading.Lock()


def _close_inbox(inbox, unlink):
    if inbox.reg is not None:
        inbox.reg[0].remove_reader(inbox.rfd)
        inbox.reg = None
    if unlink and inbox.pid == os.getpid():
        _report_loss(inbox)
        # New producers get ENOENT first, then ones holding the pipe get EPIPE.
        try:
            if inbox.ino is not None and os.stat(inbox.fifo_path).st_ino == inbox.ino:
                os.unlink(inbox.fifo_path)
        except FileNotFoundError:
            pass
        try:
            os.unlink(inbox.bindings_path)
        except FileNotFoundError:
            pass
        if inbox.lockfd >= 0:
            try:
                os.unlink(inbox.lock_path)  # still holding the lock: see _lock_queue
            except FileNotFoundError:
                pass
    for name in ("rfd", "wfd", "lockfd"):
        fd = getattr(inbox, name)
        if fd >= 0:
            setattr(inbox, name, -1)
            try:
                os.close(fd)
            except OSError:
                pass
    inbox.frames.clear()
    inbox.requeued.clear()
    inbox.partials.clear()


def _report_loss(inbox):
    """Say what closing the queue loses: messages read and never handed over, and the
    bytes still in the pipe (at-most-once: nobody else can have them)."""
    unread = 0
    if inbox.rfd >= 0:
        try:
            unread = _INT.unpack(fcntl.ioctl(inbox.rfd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            pass
    read = len(inbox.frames) + len(inbox.requeued)
    if unread or read:
        logger.warning("fifo queue %r let go with %d messages read but not handed over and "
                       "%d bytes still in its pipe: they are lost (at-most-once)",
                       inbox.queue, read, unread)


_inboxes_lock = threading.Lock()
_process_inboxes = {}   # (directory, queue) -> _Inbox held by this process
_live_transports = weakref.WeakSet()


def _after_fork_in_child():
    """A forked child must not keep the parent's pipes alive, nor share its stream ids."""
    global _inboxes_lock
    _inboxes_lock = threading.Lock()
    for inbox in list(_process_inboxes.values()):
        inbox.reg = None  # the parent's event loop, not ours
        _close_inbox(inbox, unlink=False)
    _process_inboxes.clear()
    for transport in list(_live_transports):
        transport._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
