"""The unix transport's Kombu channel: publishing (one frame per message, pipelined or
confirmed, ``Producer.batch``), declarations answered by the broker, consuming with
prefetch, acks that refuse a tag of an earlier connection, and delivery decoding.
"""
from __future__ import annotations

import struct
from itertools import count
from json import JSONDecoder

from amqp.protocol import queue_declare_ok_t
from kombu.exceptions import ChannelError
from kombu.log import get_logger
from kombu.message import Message as _BaseMessage
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.uuid import uuid

from . import protocol as proto
from .framing import encode_message
from .unix_wire import (
    MAX_ROUTING_KEY, ROUTE_CACHE_MAX, TAG_BITS, TAG_MASK, _ACK_LEN, _CONFIRM_HEAD, _HEAD_LEN,
    _PUBLISH_HEAD, _QOS, _TAG_FLAG, _U16, _U32, BrokerConnectionError, _ack_lost,
)

logger = get_logger("transports.unix")


# The C scanner under json.loads, minus its per-call checks: the header is ours.
_scan_json = JSONDecoder().scan_once


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
