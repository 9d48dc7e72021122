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

What it promises, and what it does not:

* **Delivery to consumers: at-least-once.** A connection's unacknowledged
  messages are redelivered (marked so) when it goes away.
* **Publishing: at-most-once by default.** ``publish`` returns once the frame is
  in the kernel, before the broker has read it: a broker that dies (SIGKILL,
  OOM) loses what it had not yet taken. With ``confirm_publish=True`` it returns
  only once the broker holds the message in every queue it routes to (a round
  trip per publish; ``Producer.batch`` waits once per batch): nothing that
  returned can be lost short of the broker's own death, which loses everything
  it holds (no persistence).
* **Back-pressure, not loss.** A queue holds at most ``max_queue_messages``
  messages / ``max_queue_bytes`` bytes, the broker at most ``max_memory``
  (broker settings). A publish into a full queue is held back by the broker,
  which stops reading the connection; the publisher's write blocks, then after
  ``publish_timeout`` seconds :class:`PublishBlockedError` (an
  ``OperationalError``) names the queue and the limit, and the connection is
  closed. Publishes that had returned are not lost: when a held-back connection
  closes, the broker takes its remaining complete publishes past the queue's
  limit (never past ``max_memory``: those it drops and logs); the publish that
  raised was not sent whole and is not delivered (with ``confirm_publish``, a
  publish that raised is dropped by the broker, so a retry does not duplicate it).
  A consumer on a blocked connection still receives, but cannot ack until its
  publish returns: publish and consume on separate connections.
* **Limits.** A frame (message plus routing) is at most ``max_frame`` bytes
  (8 MiB unless the broker says otherwise): a larger message is refused before
  anything is sent. A broker at its connection limit leaves new connections in
  its listen backlog; when that is full too, connecting retries for
  ``connect_timeout`` and then says the broker is busy (not that it is missing).
* **A lost connection is a connection error, everywhere.** An ack, reject,
  QoS change or publish whose connection is gone (the broker restarted, the
  connection dropped, the channel was closed) raises
  :class:`BrokerConnectionError`, one of the transport's
  ``connection_errors``. For an ack that is the truth about the message: the
  broker requeued it when the connection ended, so it will be delivered again
  (a duplicate, never a loss); Celery logs "Couldn't ack" and the worker
  carries on (``task_acks_late``: the task runs again). An ack never reaches
  another connection: delivery tags carry the connection they came on, and a
  reconnected transport refuses an earlier connection's tags (the broker
  numbers each connection's deliveries from 1). A failure found by a write
  (an ack, a publish) while registered with an event loop is raised by the
  loop too, so a worker that swallowed it still reconnects.

Not there: persistence (a broker restart loses every queue, and clients see a
connection error), priorities, TTLs, queue arguments other than
``x-max-length`` / ``x-max-length-bytes`` (accepted, ignored). A connection
must not be used from a forked child (kombu's pools, and Celery, open new ones
after a fork).

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

import errno
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from itertools import count
from json import JSONDecoder
from time import monotonic

from amqp.protocol import queue_declare_ok_t
from kombu.exceptions import ChannelError, OperationalError
from kombu.log import get_logger
from kombu.message import Message as _BaseMessage
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.uuid import uuid

from . import protocol as proto
from .framing import FrameError, FrameReader, encode_message

__all__ = ("Transport", "Channel", "BrokerConnectionError", "PublishBlockedError")

logger = get_logger(__name__)

DEFAULT_RPC_TIMEOUT = 10.0
DEFAULT_PUBLISH_TIMEOUT = 10.0
DEFAULT_READ_SIZE = 256 * 1024
DEFAULT_WRITE_BUFFER_SIZE = 64 * 1024
DEFAULT_WRITE_BUFFER_INTERVAL = 0.002
SOCKET_BUFFER = 1024 * 1024
ROUTE_CACHE_MAX = 1024
MAX_ROUTING_KEY = 255   # bytes, as AMQP's shortstr: the broker routes no longer key
# The largest message (encoded, with its routing) the default broker takes.
MAX_MESSAGE = proto.DEFAULT_MAX_FRAME - proto.DELIVERY_ROOM
# A delivery tag as kombu sees it: the broker's tag (per channel and connection, from 1)
# in the low TAG_BITS, the number of the connection it came on above them. An ack for a
# delivery of an earlier connection is refused, never sent on the new one (where the
# same broker tag names another message).
TAG_BITS = 48
TAG_MASK = (1 << TAG_BITS) - 1

_U16 = proto.U16.pack
_U32 = proto.U32.pack
_PUBLISH_HEAD = proto.PUBLISH_HEAD.pack
_CONFIRM_HEAD = proto.CONFIRM_HEAD.pack
_TAG_FLAG = proto.TAG_FLAG.pack
_QOS = proto.QOS_BODY.pack
_ACK_LEN = proto.U32.pack(proto.TAG_FLAG.size)
_RPC_HEAD = proto.RPC_HEAD.pack
_DELIVER_UNPACK = proto.DELIVER_BODY.unpack_from
_HEAD_LEN = proto.U32.unpack_from
_OP_DELIVER = proto.OP_DELIVER
_OP_REPLY = proto.OP_REPLY
_OP_FLOW = proto.OP_FLOW
_POLLIN = select.POLLIN | select.POLLERR | select.POLLHUP
_POLLOUT = select.POLLOUT | select.POLLERR | select.POLLHUP


# The C scanner under json.loads, minus its per-call checks: the header is ours.
_scan_json = JSONDecoder().scan_once


class BrokerConnectionError(ConnectionError, OperationalError):
    """The unix broker is not there, went away, or stopped answering.

    An ``OSError`` (so it is one of the transport's ``connection_errors``, which
    kombu's ``ensure`` retries) and kombu's ``OperationalError`` (what
    ``Connection.connect()`` raises on other transports for "nobody is there").
    ``undelivered``: publishes whose publish() had returned that this failure lost
    (write_buffer mode only; otherwise the broker keeps what was written).
    """

    undelivered = 0


class PublishBlockedError(BrokerConnectionError):
    """Back-pressure held a publish longer than ``publish_timeout``; says which queue
    and limit. The connection is closed (kombu's ``ensure`` may retry on a new one)."""


def _ack_lost(path: str, what: str, tag: int, why: str) -> BrokerConnectionError:
    return BrokerConnectionError(
        f"unix broker at {path}: cannot {what} delivery {tag & TAG_MASK}: {why}; the broker "
        f"put it back in its queue when that connection ended (unacknowledged messages are "
        f"redelivered: at-least-once), so it will be delivered again")


def _ms(timeout):
    return None if timeout is None else max(0, int(timeout * 1000 + 0.999))


class Message(virtual.Message):
    """A delivery: the broker's delivery tag and redelivered flag, the body raw."""

    def __init__(self, payload, channel=None, **kwargs):
        self._raw = payload
        properties = payload["properties"]
        # kombu's base Message, skipping virtual.Message's body decoding (no base64 here).
        _BaseMessage.__init__(
            self, body=payload.get("body"), channel=channel,
            delivery_tag=properties["delivery_tag"],
            content_type=payload.get("content-type"),
            content_encoding=payload.get("content-encoding"), headers=payload.get("headers"),
            properties=properties, delivery_info=properties.get("delivery_info"),
            postencode="utf-8", **kwargs)


def _decode_delivery(frame, offset: int, tag: int, redelivered: int) -> dict:
    """Message payload inside ``frame`` at ``offset`` -> kombu message dict."""
    (head_len,) = _HEAD_LEN(frame, offset)
    start = offset + 4
    end = start + head_len
    meta = _scan_json(frame[start:end].decode("utf-8"), 0)[0]
    kind = meta.pop("_b")
    body = frame[end:]
    if kind == "n":
        body = None
    elif kind == "s" and not body:
        body = ""
    # A str body stays UTF-8 bytes: kombu's Message would encode it back anyway.
    props = meta["properties"]
    props["delivery_tag"] = tag
    info = props.get("delivery_info")
    if info is None:
        info = props["delivery_info"] = {}
    info["redelivered"] = bool(redelivered)
    meta["body"] = body
    return meta


class PublishBatch:
    """``Producer.batch`` session: frames are joined and written once per flush
    (with ``confirm_publish``, the flush waits for the batch's confirms)."""

    def __init__(self, channel, max_size):
        self.channel = channel
        self.max_size = max_size
        self._frames: list[bytes] = []
        self._reqids: list[int] = []
        self._closed = False
        self._aborted = False

    def publish(self, message, exchange="", routing_key="", **kwargs):
        if self._closed or self._aborted:
            raise RuntimeError("unix publish batch is closed")
        conn = self.channel._conn()
        reqid = next(conn._reqids) if conn.confirm_publish else 0
        self._frames.append(self.channel._publish_frame(message, exchange, routing_key, reqid))
        if reqid:
            self._reqids.append(reqid)
        if len(self._frames) >= self.max_size:
            self.flush()

    def flush(self):
        frames = self._frames
        if frames:
            data = b"".join(frames)
            frames.clear()
            conn = self.channel._conn()
            conn._send_now(data)
            if self._reqids:
                reqids, self._reqids = self._reqids, []
                conn._await_confirms(reqids)

    def discard(self):
        self._aborted = True
        self._frames.clear()
        self._reqids.clear()

    def close(self):
        self._closed = True
        self._frames.clear()
        self._reqids.clear()


class Channel(virtual.Channel):
    """A channel on the broker: routing, queues and acks live there."""

    Message = Message
    body_encoding = None          # the frame carries bytes: no base64
    do_restore = False            # the broker redelivers unacked messages itself
    supports_fanout = True
    supports_batch_publish = True

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        self._cid_seq = count(1)
        self._by_cid: dict[int, tuple] = {}     # cid -> (callback, no_ack, consumer_tag, queue)
        self._tag_to_cid: dict[str, int] = {}
        self._route_prefix: dict[tuple, bytes] = {}
        self.no_ack_consumers = set()
        self._path = connection.path
        connection._channel_by_id[self.channel_id] = self

    def _conn(self):
        """The connection, or the connection error a closed channel is (never None:
        an ``AttributeError`` would be fatal to a Celery worker, a connection error makes
        it reconnect)."""
        conn = self.connection
        if conn is None:
            raise BrokerConnectionError(
                f"unix broker at {self._path}: channel {self.channel_id} is closed (its "
                f"connection was lost or closed)")
        return conn

    # -- publishing -------------------------------------------------------------------

    def _publish_frame(self, message, exchange, routing_key, reqid=0) -> bytes:
        props = message["properties"]
        info = props.get("delivery_info")
        if info is None:
            props["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
        else:
            info["exchange"] = exchange
            info["routing_key"] = routing_key
        payload = encode_message(message)
        if len(routing_key or "") > MAX_ROUTING_KEY // 4 and \
                len((routing_key or "").encode("utf-8")) > MAX_ROUTING_KEY:
            raise ChannelError(f"routing key of {len(routing_key.encode('utf-8'))} bytes: the "
                               f"unix broker routes keys of at most {MAX_ROUTING_KEY} bytes "
                               "(AMQP's limit)")
        if reqid:
            ex = (exchange or "").encode("utf-8")
            rk = (routing_key or "").encode("utf-8")
            prefix = (_CONFIRM_HEAD(proto.OP_PUBLISH_CONFIRM, self.channel_id, reqid, len(ex))
                      + ex + _U16(len(rk)) + rk)
        else:
            key = (exchange, routing_key)
            prefix = self._route_prefix.get(key)
            if prefix is None:
                ex = (exchange or "").encode("utf-8")
                rk = (routing_key or "").encode("utf-8")
                prefix = (_PUBLISH_HEAD(proto.OP_PUBLISH, self.channel_id, len(ex)) + ex
                          + _U16(len(rk)) + rk)
                if len(self._route_prefix) >= ROUTE_CACHE_MAX:
                    self._route_prefix.clear()
                self._route_prefix[key] = prefix
        size = len(prefix) + len(payload)
        if size > self.connection._max_frame:
            self.connection._check_frame_size(size)
        return b"".join((_U32(size), prefix, payload))

    def basic_publish(self, message, exchange="", routing_key="", **kwargs):
        conn = self._conn()
        if conn.confirm_publish:
            reqid = next(conn._reqids)
            conn._send_now(self._publish_frame(message, exchange, routing_key, reqid))
            conn._await_confirms((reqid,))
            return
        frame = self._publish_frame(message, exchange, routing_key)
        if conn.write_buffer:
            conn._buffer(frame)
        else:
            conn._write(frame)

    def create_publish_batch(self, max_size):
        return PublishBatch(self, max_size)

    # -- declarations (answered by the broker) --------------------------------------------

    def exchange_declare(self, exchange=None, type="direct", durable=False, auto_delete=False,
                         arguments=None, nowait=False, passive=False):
        type = type or "direct"
        exchange = exchange or f"amq.{type}"
        flags = ((proto.F_PASSIVE if passive else 0) | (proto.F_DURABLE if durable else 0)
                 | (proto.F_AUTO_DELETE if auto_delete else 0))
        self._rpc(proto.OP_EXCHANGE_DECLARE,
                  bytes((flags,)) + proto.pack_str(exchange) + proto.pack_str(type),
                  "Channel.exchange_declare")

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        self._rpc(proto.OP_EXCHANGE_DELETE, proto.pack_str(exchange), "Channel.exchange_delete")

    def prepare_queue_arguments(self, arguments, **kwargs):
        # Queue(max_length=..., max_length_bytes=...) -> x-max-length(-bytes), as for amqp.
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def queue_declare(self, queue=None, passive=False, durable=False, exclusive=False,
                      auto_delete=False, arguments=None, nowait=False, **kwargs):
        queue = queue or f"amq.gen-{uuid()}"
        flags = ((proto.F_PASSIVE if passive else 0) | (proto.F_DURABLE if durable else 0)
                 | (proto.F_AUTO_DELETE if auto_delete else 0)
                 | (proto.F_EXCLUSIVE if exclusive else 0))
        body = bytes((flags,)) + proto.pack_str(queue)
        if not passive:
            conn = self._conn()
            args = arguments or {}
            max_messages = int(args.get("x-max-length") or conn.max_queue_messages or 0)
            max_bytes = int(args.get("x-max-length-bytes") or conn.max_queue_bytes or 0)
            if max_messages or max_bytes:
                body += proto.QUEUE_LIMITS.pack(min(max_messages, 0xFFFFFFFF), max_bytes)
        data = self._rpc(proto.OP_QUEUE_DECLARE, body, "Channel.queue_declare")
        messages, consumers = proto.COUNTS.unpack_from(data, 0)
        return queue_declare_ok_t(queue, messages, consumers)

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        self._rpc(proto.OP_QUEUE_BIND, proto.pack_str(queue) + proto.pack_str(exchange)
                  + proto.pack_str(routing_key or ""), "Channel.queue_bind")

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        self._rpc(proto.OP_QUEUE_UNBIND, proto.pack_str(queue) + proto.pack_str(exchange)
                  + proto.pack_str(routing_key or ""), "Channel.queue_unbind")

    def queue_purge(self, queue, **kwargs):
        data = self._rpc(proto.OP_QUEUE_PURGE, proto.pack_str(queue), "Channel.queue_purge")
        return proto.U32.unpack_from(data, 0)[0]

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        flags = (proto.F_IF_UNUSED if if_unused else 0) | (proto.F_IF_EMPTY if if_empty else 0)
        data = self._rpc(proto.OP_QUEUE_DELETE, bytes((flags,)) + proto.pack_str(queue),
                         "Channel.queue_delete")
        return proto.U32.unpack_from(data, 0)[0]

    def after_reply_message_received(self, queue):
        self.queue_delete(queue)

    # The virtual-channel interface, for code written against it.
    def _put(self, queue, message, **kwargs):
        self.basic_publish(message, "", queue)

    def _get(self, queue, timeout=None):
        from queue import Empty

        message = self.basic_get(queue, no_ack=True)
        if message is None:
            raise Empty()
        return message._raw

    def _size(self, queue):
        return self.queue_declare(queue, passive=True).message_count

    def _purge(self, queue):
        return self.queue_purge(queue)

    def _delete(self, queue, *args, **kwargs):
        self.queue_delete(queue)

    def _new_queue(self, queue, **kwargs):
        self.queue_declare(queue)

    def _has_queue(self, queue, **kwargs):
        try:
            self.queue_declare(queue, passive=True)
        except ChannelError:
            return False
        return True

    # -- consuming -------------------------------------------------------------------------

    def basic_qos(self, prefetch_size=0, prefetch_count=0, apply_global=False):
        self._conn()._send_now(_U32(7) + _QOS(proto.OP_QOS, self.channel_id,
                                                 int(prefetch_count or 0)))

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        cid = next(self._cid_seq)
        self._by_cid[cid] = (callback, bool(no_ack), consumer_tag, queue)
        self._tag_to_cid[consumer_tag] = cid
        self._consumers.add(consumer_tag)
        self._tag_to_queue[consumer_tag] = queue
        self._active_queues.append(queue)
        if no_ack:
            self.no_ack_consumers.add(consumer_tag)
        self._rpc(proto.OP_CONSUME, proto.U32.pack(cid) + bytes((1 if no_ack else 0,))
                  + proto.pack_str(queue), "Channel.basic_consume")
        return consumer_tag

    def basic_cancel(self, consumer_tag):
        cid = self._tag_to_cid.pop(consumer_tag, None)
        self._consumers.discard(consumer_tag)
        self.no_ack_consumers.discard(consumer_tag)
        queue = self._tag_to_queue.pop(consumer_tag, None)
        try:
            self._active_queues.remove(queue)
        except ValueError:
            pass
        if cid is None:
            return
        self._by_cid.pop(cid, None)
        conn = self.connection
        if conn is not None and conn._usable():
            conn._send_now(_U32(7) + _QOS(proto.OP_CANCEL, self.channel_id, cid))

    def basic_get(self, queue, no_ack=False, **kwargs):
        data = self._rpc(proto.OP_GET, bytes((1 if no_ack else 0,)) + proto.pack_str(queue),
                         "Channel.basic_get", empty_ok=True)
        if data is None:
            return None
        tag, redelivered = proto.GET_OK.unpack_from(data, 0)
        if tag:
            tag |= self.connection._tag_base
        raw = _decode_delivery(data, proto.GET_OK.size, tag, redelivered)
        return self.Message(raw, channel=self)

    def _ack_conn(self, delivery_tag, what):
        """The connection an ack (or reject) of ``delivery_tag`` can go on, else the
        connection error saying why it cannot (the broker requeued that delivery when its
        connection ended; Celery logs "Couldn't ack" and the worker carries on)."""
        conn = self.connection
        if conn is None:
            raise _ack_lost(self._path, what, delivery_tag,
                            f"channel {self.channel_id} is closed (its connection was lost or "
                            f"closed)")
        if conn._sock is None or delivery_tag >> TAG_BITS != conn._gen:
            why = ("the connection it came on is lost" if conn._sock is None
                   else "it came on an earlier connection, which was lost")
            raise _ack_lost(self._path, what, delivery_tag, why)
        return conn

    def basic_ack(self, delivery_tag, multiple=False):
        conn = self.connection
        if conn is None or conn._sock is None or delivery_tag >> TAG_BITS != conn._gen:
            conn = self._ack_conn(delivery_tag, "acknowledge")
        conn._send_ack(_ACK_LEN + _TAG_FLAG(proto.OP_ACK, self.channel_id,
                                            delivery_tag & TAG_MASK, 1 if multiple else 0))

    def basic_reject(self, delivery_tag, requeue=False):
        conn = self._ack_conn(delivery_tag, "reject")
        conn._send_ack(_ACK_LEN + _TAG_FLAG(proto.OP_REJECT, self.channel_id,
                                            delivery_tag & TAG_MASK, 1 if requeue else 0))

    def _reject_quietly(self, tag, requeue):
        """A reject of our own making: when the connection is gone, the broker has
        requeued the delivery already."""
        try:
            self.basic_reject(tag, requeue=requeue)
        except BrokerConnectionError:
            pass

    def basic_recover(self, requeue=False):
        if not requeue:
            raise NotImplementedError("Does not support recover(requeue=False)")
        self._rpc(proto.OP_RECOVER, b"", "Channel.basic_recover")

    def _on_delivery(self, frame, cid, tag, redelivered):
        entry = self._by_cid.get(cid)
        if entry is None:
            # Cancelled while the delivery was in flight: hand it back, unread.
            if tag:
                self._reject_quietly(tag, True)
            return
        callback, _no_ack, consumer_tag, queue = entry
        try:
            raw = _decode_delivery(frame, proto.DELIVER_BODY_HEAD, tag, redelivered)
        except (ValueError, StopIteration, KeyError, TypeError, AttributeError,
                struct.error) as exc:
            # Someone published bytes that are not a kombu message: drop it rather
            # than fail on it forever (it would come back on every redelivery).
            logger.error("unix transport: dropping a malformed message from queue %r: %r",
                         queue, exc)
            if tag:
                self._reject_quietly(tag, False)
            return
        info = raw["properties"]["delivery_info"]
        info["consumer_tag"] = consumer_tag
        callback(Message(raw, channel=self))

    # -- plumbing ----------------------------------------------------------------------------

    def _rpc(self, op, body, method, empty_ok=False):
        return self._conn()._rpc(op, self.channel_id, body, method, empty_ok)

    def drain_events(self, timeout=None, callback=None):
        return self.connection.drain_events(self.connection, timeout=timeout)

    def close(self):
        if self.closed:
            return
        self.closed = True
        conn = self.connection
        for consumer_tag in list(self._consumers):
            self.basic_cancel(consumer_tag)
        if conn is not None:
            conn._channel_by_id.pop(self.channel_id, None)
            if conn._usable():
                try:
                    conn._send_now(_U32(3) + proto.HEAD.pack(proto.OP_CHANNEL_CLOSE,
                                                             self.channel_id))
                except conn.connection_errors:
                    pass
            conn.close_channel(self)
        self.exchange_types = None


class Transport(virtual.Transport):
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
        heartbeats=False,
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

    def _connect(self):
        timeout = self.client.connect_timeout or self.rpc_timeout
        sock = self._open_socket(timeout)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._pid = os.getpid()
        self._poller = select.poll()
        self._wpoller = select.poll()
        self._failure = None
        self._flow = ""
        # A new stream: nothing read from, or owed to, the one before carries over (its
        # deliveries were requeued by the broker; their tags name nothing here).
        self._gen += 1
        self._tag_base = self._gen << TAG_BITS
        self._reader = FrameReader(max(self._max_frame, proto.DEFAULT_MAX_FRAME)
                                   + proto.DELIVERY_ROOM)
        self._pending.clear()
        self._replies.clear()
        self._acks.clear()
        # The greeting is not waited for (a round trip per connection saved): its
        # answer is checked when it arrives, before anything that follows it.
        self._hello = next(self._reqids)
        body = proto.MAGIC + _U16(proto.PROTOCOL_VERSION)
        self._write(_U32(7 + len(body)) + _RPC_HEAD(proto.OP_HELLO, 0, self._hello) + body)

    def _open_socket(self, timeout: float) -> socket.socket:
        """Connect, retrying while the broker's listen backlog is full (it is busy)."""
        deadline = monotonic() + timeout
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.001, deadline - monotonic()))
            try:
                sock.connect(self.path)
                return sock
            except OSError as exc:
                sock.close()
                busy = exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or isinstance(
                    exc, socket.timeout)
                if busy and monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
                    continue
                if busy:
                    raise BrokerConnectionError(
                        f"unix broker at {self.path} is busy: it did not take the connection "
                        f"within {timeout:g}s (its listen backlog is full: at its connection "
                        "limit, or flooded); retry later, or raise its --max-connections"
                    ) from None
                reason = exc.strerror or str(exc)
                if exc.errno == errno.ECONNREFUSED:
                    reason += " (the socket exists but nobody listens: a broker that died?)"
                raise BrokerConnectionError(
                    f"no unix broker at {self.path}: {reason} "
                    f"(start one with: celery-bench broker unix://{self.path})") from None

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

    def _close_socket(self):
        """Close the socket and take it out of the event loop. The loop keeps our wake
        pipe and tick until the connection is closed: a failure must still reach it."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        loop = self._loop
        if loop is not None:
            try:
                loop.remove(self._fd)
            except Exception:  # the hub may already have dropped it
                pass
        with self._wcond:
            self._wcond.notify_all()
        # In a forked child this only drops our copy of the fd; the parent keeps its own.
        sock.close()

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

    def _broken(self, reason: str, kind=BrokerConnectionError):
        """The stream is unusable (EOF, error, timeout): close it and raise.

        Whoever called us may swallow the error (Celery logs a failed ack and carries
        on), so an event loop we are registered with is woken to raise it too: the
        worker then reconnects instead of waiting on a socket that is gone."""
        self._close_socket()
        exc = kind(f"unix broker at {self.path}: {reason}")
        self._failure = exc
        if self._loop is not None and self._wake_w is not None:
            try:
                os.write(self._wake_w, b"!")
            except OSError:  # full (a wake-up is due anyway) or closed meanwhile
                pass
        raise exc

    def _raise_lost(self):
        """In the event loop: the connection broke (maybe where the error was swallowed):
        say so, as a connection error, until the connection is closed."""
        failure = self._failure or BrokerConnectionError(
            f"unix broker at {self.path}: connection lost")
        raise type(failure)(*failure.args)

    def _blocked(self, what: str):
        """Back-pressure outlasted publish_timeout: say why, close, raise."""
        why = self._flow or ("the broker took no data (it stopped reading this connection: "
                             "a queue full, its memory limit reached, or the broker stopped)")
        self._broken(f"{what} blocked for {self.publish_timeout:g}s (publish_timeout): {why}; "
                     "consume the queue or raise the limit (broker --max-queue-messages, "
                     "--max-queue-bytes, --max-memory; queue arguments x-max-length, "
                     "x-max-length-bytes)", PublishBlockedError)

    def _check_frame_size(self, size: int):
        """Refuse a frame over the broker's max_frame before sending any of it."""
        if self._hello is not None and self._max_frame_option is None and self._usable():
            self._await_hello(self.rpc_timeout)  # learn the broker's limit
        if size > self._max_frame:
            raise ChannelError(
                f"message of {size} bytes (with its routing) is larger than the unix broker "
                f"accepts (max_frame={self._max_frame}); raise it on both sides (broker "
                f"--max-frame, transport option max_frame) or send it another way")

    # -- writing -----------------------------------------------------------------------------

    def _send_ack(self, data: bytes):
        if self._dispatching:
            self._acks.append(data)
        else:
            self._send_now(data)

    def _send_now(self, data: bytes):
        if self._acks:
            # Acks held back during a dispatch go first: a channel close or a
            # recover must not overtake them (the broker would requeue acked work).
            data = b"".join(self._acks) + data
            self._acks.clear()
        if self.write_buffer:
            # The timer thread writes too: one writer at a time, buffered frames first.
            with self._wcond:
                if self._wbuf:
                    self._flush_locked()
                self._write(data)
        else:
            self._write(data)

    def _write(self, data: bytes, may_read: bool = True):
        sock = self._sock
        if sock is None:
            raise self._failure or BrokerConnectionError(
                f"unix broker at {self.path}: connection is closed")
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._unsent = len(data)
            self._broken(f"write failed: {exc.strerror or exc}")
        if sent != len(data):
            self._send_rest(memoryview(data)[sent:], may_read)

    def _send_rest(self, view, may_read: bool):
        """The socket is full: the broker is slow or holds this connection back. Wait
        (up to publish_timeout without progress), reading what it sends meanwhile: its
        FLOW notice says why, and deliveries must not back up behind our write."""
        poller = self._wpoller  # its own: the timer thread may write while we read
        # Only the thread that reads (not the write_buffer timer) looks at input.
        poller.register(self._fd, _POLLOUT | (select.POLLIN if may_read else 0))
        try:
            deadline = monotonic() + self.publish_timeout
            while view:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    self._unsent = len(view)
                    self._blocked("a write")
                events = poller.poll(_ms(remaining))
                if not events:
                    continue
                if may_read and events[0][1] & select.POLLIN:
                    self._read(0)
                    if not events[0][1] & _POLLOUT:
                        continue
                try:
                    sent = self._sock.send(view)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self._unsent = len(view)
                    self._broken(f"write failed: {exc.strerror or exc}")
                if sent:
                    view = view[sent:]
                    deadline = monotonic() + self.publish_timeout
        finally:
            if self._sock is not None:
                poller.unregister(self._fd)

    def _buffer(self, data: bytes):
        with self._wcond:
            if self._failure is not None:
                lost, self._wbuf, self._wlen = len(self._wbuf), [], 0
                raise self._undelivered(self._failure, lost)
            was_empty = not self._wbuf
            self._wbuf.append(data)
            self._wlen += len(data)
            if self._wlen >= self.write_buffer_size:
                self._flush_locked(returned=len(self._wbuf) - 1)  # not this publish
            elif was_empty:
                if self._flusher is None or self._flusher[1] != os.getpid():
                    thread = threading.Thread(target=self._flush_periodically,
                                              name="unix-transport-flush", daemon=True)
                    self._flusher = (thread, os.getpid())
                    thread.start()
                self._wcond.notify()

    def _flush_wbuf(self):
        if self._wbuf:
            with self._wcond:
                self._flush_locked()

    def _flush_locked(self, may_read: bool = True, returned: int | None = None):
        """Write the buffered frames; if that fails, count those not wholly written among
        the first ``returned`` (default: all, whose publish() calls returned) and say so."""
        frames = self._wbuf
        if not frames:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self._wbuf = []
        self._wlen = 0
        try:
            self._write(data, may_read)
        except BrokerConnectionError as exc:
            left, lost = self._unsent, 0
            for frame in reversed(frames):
                if left <= 0:
                    break
                lost += 1
                left -= len(frame)
            if returned is not None:
                lost -= len(frames) - returned
            raise self._undelivered(exc, lost) from None

    def _undelivered(self, exc: BrokerConnectionError, lost: int) -> BrokerConnectionError:
        """``exc`` saying how many returned publishes were not delivered (also kept in
        ``self.undelivered`` for the caller's loss accounting)."""
        if lost <= 0:
            return exc
        self.undelivered += lost
        new = type(exc)(f"{exc.args[0] if exc.args else exc}; {lost} publishes whose "
                        "publish() had returned were still in this client's write buffer: "
                        "not delivered")
        new.undelivered = lost
        self._failure = new
        return new

    def _flush_periodically(self):
        # Timer flush so a buffered publish never waits longer than the interval.
        interval = self.write_buffer_interval
        cond = self._wcond
        with cond:
            while self._sock is not None:
                if not self._wbuf:
                    cond.wait(1.0)
                    continue
                cond.wait(interval)
                try:
                    self._flush_locked(may_read=False)
                except BrokerConnectionError as exc:  # counted in it; raised to the next call
                    self._failure = exc
                    self._wbuf = []
                    return
                except OSError as exc:
                    self._failure = BrokerConnectionError(str(exc))
                    return

    # -- reading -----------------------------------------------------------------------------

    def _read(self, timeout) -> bool:
        """Read what is there (waiting up to ``timeout``; None = forever); sort the frames."""
        sock = self._sock
        if sock is None:
            raise self._failure or BrokerConnectionError(
                f"unix broker at {self.path}: connection is closed")
        try:
            data = sock.recv(self.read_size)
        except (BlockingIOError, InterruptedError):
            if timeout == 0:
                return False
            poller = self._poller
            poller.register(self._fd, _POLLIN)
            try:
                ready = poller.poll(_ms(timeout))
            finally:
                poller.unregister(self._fd)
            if not ready:
                return False
            try:
                data = sock.recv(self.read_size)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self._broken(f"read failed: {exc.strerror or exc}")
        except OSError as exc:
            self._broken(f"read failed: {exc.strerror or exc}")
        if not data:
            self._broken("the broker closed the connection"
                         + (f" ({self._flow})" if self._flow else ""))
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        try:
            frames = reader.frames()
        except FrameError as exc:
            self._broken(f"not a unix broker, or a broken stream: {exc}")
        for frame in frames:
            op = frame[0]
            if op == _OP_DELIVER:
                pending.append(frame)
            elif op == _OP_REPLY and len(frame) >= 8:
                reqid = proto.RPC_HEAD.unpack_from(frame, 0)[2]
                if reqid == self._hello:
                    self._on_hello(frame)
                else:
                    self._replies[reqid] = frame
            elif op == _OP_FLOW and len(frame) >= 4:
                self._flow = bytes(frame[4:]).decode("utf-8", "replace") if frame[3] else ""
            else:
                self._broken(f"unexpected frame (op {op}) from {self.path}: not a unix broker?")
        return True

    def _on_hello(self, frame):
        self._hello = None
        if frame[7] != proto.STATUS_OK:
            self._broken(bytes(frame[8:]).decode("utf-8", "replace"))
        if len(frame) >= 8 + proto.HELLO_OK.size:
            _pid, announced = proto.HELLO_OK.unpack_from(frame, 8)
            opt = self._max_frame_option
            self._max_frame = min(opt, announced) if opt else announced
            self._reader.max_frame = max(self._reader.max_frame,
                                         announced + proto.DELIVERY_ROOM)

    def _await_hello(self, timeout):
        """Read until the greeting is answered (_read takes its answer)."""
        deadline = monotonic() + timeout
        while self._hello is not None:
            remaining = deadline - monotonic()
            if remaining <= 0:
                self._broken(f"no answer to the greeting within {timeout:g}s")
            self._read(remaining)

    def _rpc(self, op, channel_id, body, method, empty_ok=False, timeout=None):
        reqid = next(self._reqids)
        self._send_now(_U32(7 + len(body)) + _RPC_HEAD(op, channel_id, reqid) + body)
        timeout = self.rpc_timeout if timeout is None else timeout
        deadline = monotonic() + timeout
        replies = self._replies
        while reqid not in replies:
            remaining = deadline - monotonic()
            if remaining <= 0:
                self._broken(f"no answer to {method} within {timeout:g}s"
                             + (f" ({self._flow})" if self._flow else ""))
            self._read(remaining)
        frame = replies.pop(reqid)
        status = frame[7]
        data = frame[8:]
        if status == proto.STATUS_OK:
            return data
        if status == proto.STATUS_EMPTY and empty_ok:
            return None
        text = bytes(data).decode("utf-8", "replace")
        code = 404 if status == proto.STATUS_NOT_FOUND else 406
        raise ChannelError(text, (50, 10), method, code)

    def _await_confirms(self, reqids):
        """Wait until the broker holds every publish in ``reqids`` (publish_timeout)."""
        replies = self._replies
        deadline = monotonic() + self.publish_timeout
        for reqid in reqids:
            while reqid not in replies:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    self._blocked("a confirmed publish")
                self._read(remaining)
            frame = replies.pop(reqid)
            if frame[7] != proto.STATUS_OK:
                raise ChannelError(bytes(frame[8:]).decode("utf-8", "replace"))

    def _flush_acks(self):
        if self._acks:
            self._send_now(b"")

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
