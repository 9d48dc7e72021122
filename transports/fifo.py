"""FIFO (named pipe) transport module for Kombu.

One named pipe per queue under a private directory, and no broker: the
process that consumes a queue creates its FIFO and holds it open; producers
write length-prefixed frames (:mod:`transports.framing`) straight into it.
For producers and consumers that share a host.

What it promises (one consumer process per queue; no consumer, no publish; at-most-once,
``ack`` only frees the prefetch window; a consumer's end loses its prefetch window plus its
pipe; no interleaving of many producers: writes of at most ``PIPE_BUF``, larger messages
chunked by :mod:`transports.chunking`; back-pressure through a full pipe; bindings shared
through the directory, :mod:`transports.fifo_bindings`) and what was measured:
docs/transports.md. The consuming end is :mod:`transports.fifo_inbox`, the producing end
:mod:`transports.fifo_outbox`, the channel :mod:`transports.fifo_channel`, the hooks of
Celery's event loop :mod:`transports.fifo_loop`.
Celery: ``broker_url='fifo:///abs/dir'`` in the client and in ``celery worker``.

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
import os
import re
import select
import socket
import stat
import threading
import time
import weakref
from hashlib import sha256
from itertools import count

from kombu.exceptions import ChannelError, ConnectionError
from kombu.log import get_logger
from kombu.transport import virtual

from . import chunking, framing
from .chunking import CHUNK, CHUNK_DATA, MAX_WHOLE, PIPE_BUF, SID_SIZE
from .fifo_bindings import SharedBindings
from .fifo_channel import Channel
from .fifo_errors import FifoError, NoConsumerError, PublishTimeout, QueueBusyError, _option
from .fifo_inbox import _close_inbox, _Inbox, _set_pipe_size
from .fifo_loop import EventLoopHooks
from .fifo_outbox import Outboxes

__all__ = ("Transport", "Channel", "FifoError", "NoConsumerError", "QueueBusyError",
           "PublishTimeout", "queue_filename", "CHUNK", "CHUNK_DATA", "MAX_WHOLE", "PIPE_BUF")

logger = get_logger(__name__)

DEFAULT_PIPE_SIZE = 1 << 20
DEFAULT_READ_SIZE = 256 << 10
DEFAULT_WRITE_TIMEOUT = 10.0

_SAFE_NAME = re.compile(r"[A-Za-z0-9_@][A-Za-z0-9_.@-]{0,199}\Z")
_OPEN_WRITE = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW

_HEADER = framing.HEADER_SIZE
_decode = framing.decode_message


def queue_filename(queue: str) -> str:
    """A file name for ``queue``: itself when plain, else a hash ('%' never starts a plain one)."""
    if _SAFE_NAME.match(queue):
        return queue
    return "%" + sha256(queue.encode("utf-8")).hexdigest()[:40]


class Transport(Outboxes, EventLoopHooks, virtual.Transport):
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
        self._bindings = SharedBindings(self.directory, queue_filename)
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

    def _own_inbox(self, queue):
        """This process's consuming end of ``queue``, if it holds one (a producer must
        not wait on its own pipe)."""
        return _process_inboxes.get((self.directory, queue))

    def _open_inbox(self, key, queue):
        self._check_directory(create=True)
        inbox = _Inbox(key, queue, self._path(queue, ".fifo"), self._path(queue, ".lock"),
                       self._bindings.path(queue))
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
        try:
            whole = chunking.join(inbox.partials, f)
        except chunking.TooBig as exc:
            logger.error("fifo queue %r: %s", inbox.queue, exc)
            return
        if whole is not None:
            inbox.frames.append(whole)

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

    # -- shared bindings ----------------------------------------------------------
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
        self._bindings.write(queue, rows)

    def _shared_bindings(self):
        return self._bindings.table()

    # -- lifecycle ----------------------------------------------------------------
    def close_connection(self, connection):
        try:
            super().close_connection(connection)
        finally:
            self._release()

    def _release(self):
        self._leave_loop()
        for queue in list(self._inboxes):
            self._detach(queue)
        self._let_go.clear()
        self._loop = None
        self._close_wake()
        self._close_outboxes()

    def _after_fork_in_child(self):
        self._inboxes.clear()
        self._by_fd.clear()
        self._close_outboxes()
        self._close_wake()
        self._loop = None
        self._sid = os.urandom(SID_SIZE)
        self._chunk_lock = threading.Lock()


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
