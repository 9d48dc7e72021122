"""UNIX domain socket transport module for Kombu.

Talks to the small broker process in :mod:`transports.broker`, which owns the
queues, routes exchanges and tracks unacknowledged messages; start it with
``celery-bench broker unix:///abs/path/broker.sock``. Built for a producer and
consumers on one host: publishes are pipelined (no reply per message; each is
handed to the kernel before ``publish`` returns), acks written while a batch of
deliveries is handed out go out in one write, and the broker pushes deliveries
to consumers that have credit, which this client reads in batches. One socket
per connection; its channels are multiplexed on it. The protocol is
:mod:`transports.protocol`.

What it promises (at-least-once to consumers; at-most-once publishing unless
``confirm_publish``; back-pressure with :class:`PublishBlockedError`, never silent loss;
a lost connection is a connection error everywhere) and what was measured:
docs/transports.md. The socket side is :mod:`transports.unix_wire`, the channel
:mod:`transports.unix_channel`.

Features
========
* Type: Virtual (broker-side routing)
* Supports Direct: Yes
* Supports Topic: Yes
* Supports Fanout: Yes
* Supports Priority: No
* Supports TTL: No
* Acknowledgements: Yes: a connection's unacknowledged messages are redelivered
  when it disconnects (at-least-once, like RabbitMQ)
* Publisher confirms: Yes, opt-in (``confirm_publish``)
* Flow control: Yes (per-queue and broker-wide limits block publishers)
* Prefetch (QoS): Yes (``prefetch_count``, per channel)
* Event loop: Yes (``register_with_event_loop``; Celery workers consume by readiness)
* ``Producer.batch``: Yes

Connection String
=================
Connection string has the following format:

.. code-block::

    unix:///ABSOLUTE/PATH/TO/broker.sock

The three slashes matter: the path must be absolute. Importing ``transports``
registers the ``unix`` alias with Kombu.

Transport Options
=================
* ``confirm_publish``: (bool) ``publish`` returns once the broker holds the
  message (a round trip each). Default ``False`` (pipelined).
* ``publish_timeout``: (float) Seconds a publish may stay blocked by
  back-pressure (its write, or its confirm) before :class:`PublishBlockedError`.
  Default ``10``.
* ``rpc_timeout``: (float) Seconds to wait for the broker's answer to a
  declaration, ``basic_get`` and the like before the connection is reported
  broken. Default ``10``.
* ``max_frame``: (int) Refuse publishes whose frame is larger than this. Default:
  what the broker announces (its ``--max-frame``, 8 MiB unless raised).
* ``max_queue_messages``, ``max_queue_bytes``: (int) Limits for the queues this
  connection declares, unless the queue's own arguments (``x-max-length``,
  ``x-max-length-bytes``, i.e. kombu's ``Queue(max_length=...)``) say otherwise.
  Default ``0``: the broker's.
* ``write_buffer``: (bool) Opt-in: publishes are buffered in the client and
  written in batches; the buffer is flushed when it reaches
  ``write_buffer_size`` bytes, every ``write_buffer_interval`` seconds by a
  timer, before any call that waits for the broker, and on close. Off by
  default: every publish is handed to the kernel before ``publish`` returns.
  Ignored with ``confirm_publish``. If the connection fails with publishes still
  buffered, the error (and the transport's ``undelivered``) counts them.
* ``write_buffer_size``: (int) Default ``65536``.
* ``write_buffer_interval``: (float) Default ``0.002``.
* ``read_size``: (int) Bytes read per ``recv``. Default ``262144``.
"""
from __future__ import annotations

import os
import socket
import threading
from collections import deque
from itertools import count
from time import monotonic

from kombu.transport import virtual

from . import protocol as proto
from .framing import FrameReader
from .unix_channel import Channel
from .unix_wire import (
    DEFAULT_PUBLISH_TIMEOUT, DEFAULT_READ_SIZE, DEFAULT_RPC_TIMEOUT,
    DEFAULT_WRITE_BUFFER_INTERVAL, DEFAULT_WRITE_BUFFER_SIZE, MAX_MESSAGE, TAG_MASK,
    _DELIVER_UNPACK, BrokerConnectionError, PublishBlockedError, WireClient,
)

__all__ = ("Transport", "Channel", "BrokerConnectionError", "PublishBlockedError", "MAX_MESSAGE",
           "TAG_MASK")


class Transport(WireClient, virtual.Transport):
    """Kombu transport over a UNIX domain socket to :mod:`transports.broker`."""

    Channel = Channel

    can_parse_url = True
    polling_interval = None
    default_port = None
    driver_type = "unix"
    driver_name = "unix"

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        batch_publish=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=True,
    )

    connection_errors = virtual.Transport.connection_errors + (OSError,)
    channel_errors = virtual.Transport.channel_errors

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        opts = client.transport_options or {}
        self.path = self._socket_path(client)
        self.rpc_timeout = float(opts.get("rpc_timeout", DEFAULT_RPC_TIMEOUT))
        self.publish_timeout = float(opts.get("publish_timeout", DEFAULT_PUBLISH_TIMEOUT))
        self.confirm_publish = bool(opts.get("confirm_publish", False))
        self.read_size = int(opts.get("read_size", DEFAULT_READ_SIZE))
        # Connection(heartbeat=N): both sides send one every N/2 s (heartbeat_check).
        self.heartbeat = float(getattr(client, "heartbeat", 0) or 0)
        self.write_buffer = bool(opts.get("write_buffer", False)) and not self.confirm_publish
        self.write_buffer_size = int(opts.get("write_buffer_size", DEFAULT_WRITE_BUFFER_SIZE))
        self.write_buffer_interval = float(
            opts.get("write_buffer_interval", DEFAULT_WRITE_BUFFER_INTERVAL))
        self.max_queue_messages = int(opts.get("max_queue_messages") or 0)
        self.max_queue_bytes = int(opts.get("max_queue_bytes") or 0)
        # Until the broker announces its own, the protocol's default (or the option).
        self._max_frame_option = int(opts["max_frame"]) if opts.get("max_frame") else None
        self._max_frame = self._max_frame_option or proto.DEFAULT_MAX_FRAME
        self._sock = None
        self._fd = None
        self._pid = None
        self._reader = FrameReader(max(self._max_frame, proto.DEFAULT_MAX_FRAME)
                                   + proto.DELIVERY_ROOM)
        self._pending: deque = deque()   # delivery frames not yet handed to consumers
        self._replies: dict[int, bytes] = {}
        self._reqids = count(1)
        self._channel_by_id: dict[int, Channel] = {}
        self._acks: list[bytes] = []     # acks coalesced while a batch is dispatched
        self._dispatching = 0
        self._closing = False
        self._loop = None
        self._wake_r = self._wake_w = None
        self._wake_armed = False
        self._poller = self._wpoller = None
        self._hello = None               # reqid of the greeting whose answer is due
        self._flow = ""                  # the broker's last word on why publishing waits
        self._failure: BaseException | None = None
        self._gen = -1                   # connections made so far, minus one (TAG_BITS)
        self._tag_base = 0
        # write_buffer mode
        self._wbuf: list[bytes] = []
        self._wlen = 0
        # Publishes whose publish() had returned but which never reached the broker
        # (buffered in write_buffer mode when the connection failed): the error says so.
        self.undelivered = 0
        self._unsent = 0                 # bytes of the last write left when it failed
        self._wcond = threading.Condition(threading.RLock())
        self._flusher = None

    @staticmethod
    def _socket_path(client) -> str:
        url = client.hostname or ""
        if "://" not in url:
            # Connection(transport='unix', virtual_host='/abs/path.sock') and friends.
            url = client.virtual_host or url
            if url and not url.startswith("/"):
                url = "/" + url
        return proto.socket_path_from_url(url)

    def as_uri(self, uri, include_password=False, mask="**"):
        return f"unix://{self.path}"

    def driver_version(self):
        return str(proto.PROTOCOL_VERSION)

    # -- connection -------------------------------------------------------------------------

    def establish_connection(self):
        self._connect()
        return super().establish_connection()

    def _usable(self) -> bool:
        return self._sock is not None and self._pid == os.getpid() and not self._closing

    def verify_connection(self, connection):
        return self._sock is not None

    def close_connection(self, connection):
        if self._sock is not None and self._pid == os.getpid():
            try:
                self._flush_acks()
                self._flush_wbuf()
            except self.connection_errors:
                pass
        self._closing = True
        super().close_connection(connection)
        self._close_socket()
        self._leave_loop()

    def _leave_loop(self):
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.on_tick.discard(self._on_tick)
            if self._wake_r is not None:
                try:
                    loop.remove(self._wake_r)
                except Exception:
                    pass
        if self._wake_r is not None:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None
        self._wake_armed = False

    def _raise_lost(self):
        """In the event loop: the connection broke (maybe where the error was swallowed):
        say so, as a connection error, until the connection is closed."""
        failure = self._failure or BrokerConnectionError(
            f"unix broker at {self.path}: connection lost")
        raise type(failure)(*failure.args)

    # -- writing -----------------------------------------------------------------------------

    # -- reading -----------------------------------------------------------------------------

    def _dispatch(self):
        """Hand every buffered delivery to its consumer; acks written meanwhile go out once."""
        pending = self._pending
        channels = self._channel_by_id
        unpack = _DELIVER_UNPACK
        base = self._tag_base
        self._dispatching += 1
        try:
            while pending:
                frame = pending.popleft()
                _, chid, cid, tag, redelivered = unpack(frame, 0)
                channel = channels.get(chid)
                if channel is None:
                    continue  # closed channel: the broker requeued its unacked already
                channel._on_delivery(frame, cid, tag | base if tag else 0, redelivered)
        finally:
            self._dispatching -= 1
            if not self._dispatching and self._acks and self._sock is not None:
                self._flush_acks()

    def drain_events(self, connection, timeout=None):
        if not self._pending:
            if self._wbuf:
                self._flush_wbuf()
            if timeout is None:
                while not self._pending:
                    self._read(None)
            else:
                deadline = monotonic() + timeout
                while not self._pending:
                    got = self._read(max(0.0, deadline - monotonic()))
                    if not got and not self._pending and monotonic() >= deadline:
                        raise socket.timeout()
        self._dispatch()

    # -- event loop --------------------------------------------------------------------------

    def register_with_event_loop(self, connection, loop):
        self._loop = loop
        loop.add_reader(self._fd, self.on_readable)
        # Deliveries read while waiting for an RPC answer sit in memory, not on the
        # socket, so readiness will not announce them. A tick callback notices them
        # and pokes our own pipe rather than dispatching there and then: the
        # dispatch then runs from poll(), before the next turn's tick callbacks
        # (the prefork pool's among them) look for work, so nothing waits for the
        # poll timeout.
        if self._wake_r is None:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._wake_r, self._on_wake)
        loop.on_tick.add(self._on_tick)

    def _on_tick(self):
        if self._sock is None and not self._closing and self._pid == os.getpid():
            self._raise_lost()
        if self._pending and not self._wake_armed:
            self._wake_armed = True
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass

    def _on_wake(self, *args):
        try:
            os.read(self._wake_r, 512)
        except BlockingIOError:
            pass
        self._wake_armed = False
        if self._sock is None:
            if not self._closing and self._pid == os.getpid():
                self._raise_lost()
            return
        if self._pending:
            self._dispatch()

    def on_readable(self, fileno=None):
        if self._sock is None:
            return
        self._read(0)
        if self._pending:
            self._dispatch()
