"""The wire protocol between :mod:`transports.unix` (client) and :mod:`transports.broker`.

Both sides import this module and nothing of each other. Every frame is
:mod:`transports.framing`'s ``u32 length`` + body; integers are big-endian::

    body = op:u8 channel:u16 ...
    client -> broker, no reply (pipelined):
      PUBLISH  exlen:u16 exchange rklen:u16 routing_key message
      ACK      tag:u64 multiple:u8          REJECT  tag:u64 requeue:u8
      QOS      prefetch_count:u32           CANCEL  consumer_id:u32
      CHANNEL_CLOSE
    client -> broker, answered by REPLY with the same reqid:
      op channel reqid:u32 args   (strings are u16 length + UTF-8)
      HELLO            "CBUX" version:u16 [heartbeat:u16 s] -> pid:u32 max_frame:u32
      PUBLISH_CONFIRM  exlen:u16 exchange rklen:u16 routing_key message
                       -> answered once the broker holds the message
      QUEUE_DECLARE    flags:u8 name [max_messages:u32 max_bytes:u64]  (0 = broker default)
    broker -> client:
      REPLY    reqid:u32 status:u8 data
      DELIVER  consumer_id:u32 tag:u64 redelivered:u8 message
      FLOW     blocked:u8 text        (channel 0: why publishing is held back, or that it
                                       no longer is; the client reads it while blocked)
    either way, no reply: HEARTBEAT (only after a HELLO that asked for heartbeats: each
      side sends one every heartbeat/2 s; silent for 2 x heartbeat = gone)

``message`` is ``framing.encode_message`` output, carried untouched.
"""
from __future__ import annotations

import os
import struct

MAGIC = b"CBUX"
# 2: max_frame in the HELLO answer, PUBLISH_CONFIRM, FLOW, queue limits on declare.
PROTOCOL_VERSION = 2

# client -> broker
OP_HELLO = 1
OP_PUBLISH = 2
OP_ACK = 3
OP_REJECT = 4
OP_QOS = 5
OP_CONSUME = 6
OP_CANCEL = 7
OP_EXCHANGE_DECLARE = 8
OP_EXCHANGE_DELETE = 9
OP_QUEUE_DECLARE = 10
OP_QUEUE_BIND = 11
OP_QUEUE_UNBIND = 12
OP_QUEUE_PURGE = 13
OP_QUEUE_DELETE = 14
OP_GET = 15
OP_RECOVER = 16
OP_CHANNEL_CLOSE = 17
OP_PING = 18
OP_PUBLISH_CONFIRM = 19
OP_HEARTBEAT = 20
# broker -> client
OP_REPLY = 100
OP_DELIVER = 101
OP_FLOW = 102

OP_NAMES = {v: k[3:].lower() for k, v in globals().items() if k.startswith("OP_")}

STATUS_OK = 0
STATUS_NOT_FOUND = 1      # AMQP 404
STATUS_PRECONDITION = 2   # AMQP 406
STATUS_EMPTY = 3          # basic_get on an empty queue

# Flags
F_PASSIVE, F_DURABLE, F_AUTO_DELETE, F_EXCLUSIVE = 1, 2, 4, 8
F_IF_UNUSED, F_IF_EMPTY = 1, 2

U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
HEAD = struct.Struct(">BH")              # op, channel
RPC_HEAD = struct.Struct(">BHI")         # op, channel, reqid
PUBLISH_HEAD = struct.Struct(">BHH")     # op, channel, exchange length
CONFIRM_HEAD = struct.Struct(">BHIH")    # op, channel, reqid, exchange length
TAG_FLAG = struct.Struct(">BHQB")        # ACK / REJECT
QOS_BODY = struct.Struct(">BHI")         # QOS / CANCEL
REPLY_HEAD = struct.Struct(">IBHIB")     # frame length, op, channel, reqid, status
DELIVER_HEAD = struct.Struct(">IBHIQB")  # frame length, op, channel, consumer, tag, redelivered
DELIVER_BODY = struct.Struct(">BHIQB")   # the same, as read from a frame body
DELIVER_BODY_HEAD = DELIVER_BODY.size
REPLY_BODY_HEAD = REPLY_HEAD.size - 4
FLOW_HEAD = struct.Struct(">IBHB")       # frame length, op, channel, blocked
HELLO_OK = struct.Struct(">II")          # pid, max_frame
QUEUE_LIMITS = struct.Struct(">IQ")      # max_messages, max_bytes
COUNTS = struct.Struct(">II")
GET_OK = struct.Struct(">QB")
EXCHANGE_TYPES = (b"direct", b"topic", b"fanout")

# Limits both sides must agree on. A frame is refused above max_frame (the broker's
# setting, announced in the HELLO answer); the client refuses a larger publish before
# sending it. Small by default so a client cannot make the broker hold much for it.
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
# The broker's deliveries carry a header in front of the message: room for it.
DELIVERY_ROOM = 64
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the NUL


class ProtocolError(Exception):
    """A client broke the protocol: it is disconnected, the broker carries on."""


def pack_str(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise ValueError(f"name of {len(raw)} bytes is longer than 65535")
    return U16.pack(len(raw)) + raw


def unpack_strs(buf, pos: int, count: int) -> tuple[list[bytes], int]:
    """``count`` u16-prefixed strings from ``buf`` at ``pos`` (bytes, new pos)."""
    out = []
    for _ in range(count):
        (n,) = U16.unpack_from(buf, pos)
        pos += 2
        if pos + n > len(buf):
            raise ProtocolError("string runs past the end of the frame")
        out.append(bytes(buf[pos:pos + n]))
        pos += n
    return out, pos


# The request shapes after RPC_HEAD (op, channel, reqid; 7 bytes): each decoder returns the
# channel, the request id, what the body holds and where the names end.
def unpack_named(frame, count: int) -> tuple[int, int, list[bytes], int]:
    """A request of ``count`` names (exchange delete, queue bind/unbind/purge)."""
    _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
    names, pos = unpack_strs(frame, RPC_HEAD.size, count)
    return chid, reqid, names, pos


def unpack_flagged(frame, count: int) -> tuple[int, int, int, list[bytes], int]:
    """A request of a flags byte then ``count`` names (exchange/queue declare, queue
    delete, get); returns ``(chid, reqid, flags, names, pos)``."""
    _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
    (flags,) = U8.unpack_from(frame, RPC_HEAD.size)
    names, pos = unpack_strs(frame, RPC_HEAD.size + 1, count)
    return chid, reqid, flags, names, pos


def socket_path_from_url(url: str) -> str:
    """``unix:///abs/path.sock`` (or a bare absolute path) -> ``/abs/path.sock``."""
    text = str(url).strip()
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme != "unix":
            raise ValueError(f"{url!r} is not a unix:// URL; use unix:///abs/path/broker.sock")
        text = rest.split("?", 1)[0]
    if not text.startswith("/"):
        raise ValueError(
            f"{url!r} does not name an absolute socket path; "
            "use three slashes: unix:///abs/path/broker.sock")
    if len(os.fsencode(text)) > MAX_UNIX_PATH:
        raise ValueError(
            f"socket path {text!r} is {len(os.fsencode(text))} bytes; "
            f"unix sockets allow at most {MAX_UNIX_PATH}: use a shorter directory")
    return text
