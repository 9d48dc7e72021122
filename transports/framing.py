"""Length-prefixed frames and the message codec shared by the unix and fifo transports.

A frame is ``u32 big-endian length`` + ``length`` bytes. A kombu message
(the dict a virtual channel hands to ``_put``) travels as one frame::

    u32 meta_len | meta (JSON: everything but the body) | body (raw bytes)

The body is carried raw, so the channels set ``body_encoding = None`` and skip
kombu's default base64 round trip; ``meta["_b"]`` says whether the body was
``str`` (decoded back as UTF-8) or ``bytes``.
"""
from __future__ import annotations

import datetime
import decimal
import json
import struct
import uuid
from json.encoder import c_make_encoder, encode_basestring_ascii

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
# Refuse absurd length prefixes (garbage on a socket) instead of allocating them. The
# ceiling of both transports; the unix broker's own limit is smaller (protocol.py).
MAX_FRAME = 64 * 1024 * 1024


def _not_json(obj):
    # What kombu's JSON would write as a string; anything else is the caller's bug.
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (uuid.UUID, decimal.Decimal)):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


if c_make_encoder is not None:
    # The C encoder under json.dumps, called directly (no per-call option checks):
    # this runs once per publish. ASCII output, so encoding it to bytes is cheap.
    _encode_c = c_make_encoder(None, _not_json, encode_basestring_ascii, None, ":", ",",
                               False, False, True)

    def _dumps(obj) -> str:
        return "".join(_encode_c(obj, 0))
else:  # pragma: no cover - CPython always has _json
    _dumps = json.JSONEncoder(separators=(",", ":"), default=_not_json).encode
_loads = json.loads
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


class FrameError(ValueError):
    """A malformed or oversized frame: the peer is broken or hostile."""


def frame(payload: bytes) -> bytes:
    """One frame around ``payload``."""
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    return _pack(len(payload)) + payload


def encode_message(message: dict) -> bytes:
    """A kombu message dict -> frame payload (not yet framed).

    The dict is borrowed, not copied (this is the publish hot path): its body is
    taken out while the header is encoded and put back before returning.
    """
    had_body = "body" in message
    body = message.pop("body", None)
    if isinstance(body, str):
        raw = body.encode("utf-8")
        message["_b"] = "s"
    elif body is None:
        raw = b""
        message["_b"] = "n"
    else:
        raw = bytes(body)
        message["_b"] = "b"
    try:
        head = _dumps(message).encode("ascii")
    finally:
        del message["_b"]
        if had_body:
            message["body"] = body
    return _pack(len(head)) + head + raw


def decode_message(payload) -> dict:
    """Frame payload -> kombu message dict. Raises FrameError when malformed."""
    try:
        (head_len,) = _unpack_from(payload, 0)
        end = HEADER_SIZE + head_len
        if end > len(payload):
            raise FrameError("message header runs past the frame")
        meta = _loads(str(payload[HEADER_SIZE:end], "utf-8"))  # str: json skips sniffing
        kind = meta.pop("_b")
    except FrameError:
        raise
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FrameError(f"malformed message frame: {exc}") from None
    if not isinstance(meta, dict):
        raise FrameError("message header is not an object")
    raw = bytes(payload[end:])
    meta["body"] = raw.decode("utf-8") if kind == "s" else (None if kind == "n" else raw)
    return meta


class FrameReader:
    """Incremental frame parser: feed bytes as they arrive, take whole frames out.

    Hand-written because no maintained library does length-prefixed framing over a
    raw fd without bringing its own event loop.
    """

    __slots__ = ("_buf", "_pos", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME):
        self._buf = bytearray()
        self._pos = 0
        self.max_frame = max_frame

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[bytes]:
        """Every complete frame buffered so far (raises FrameError on a bad prefix)."""
        buf, pos, out = self._buf, self._pos, []
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            (n,) = _unpack_from(buf, pos)
            if n > self.max_frame:
                raise FrameError(f"length prefix {n} exceeds limit {self.max_frame}")
            if end - pos - HEADER_SIZE < n:
                break
            start = pos + HEADER_SIZE
            if n < 65536:
                out.append(bytes(buf[start:start + n]))
            else:  # one copy, not two, of a big frame
                with memoryview(buf) as view:
                    out.append(bytes(view[start:start + n]))
            pos = start + n
        # Compact once the consumed prefix is large, not on every call.
        if pos and (pos == end or pos > 65536):
            del buf[:pos]
            pos = 0
        self._pos = pos
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered that are not yet a whole frame."""
        return len(self._buf) - self._pos

    def push_back(self, frames) -> None:
        """Put whole ``frames`` taken by :meth:`frames` back in front of what is buffered."""
        if frames:
            self._buf[self._pos:self._pos] = b"".join(_pack(len(f)) + f for f in frames)

    def next_length(self) -> int | None:
        """The length prefix of the incomplete frame buffered, None before its 4 bytes."""
        if len(self._buf) - self._pos < HEADER_SIZE:
            return None
        return _unpack_from(self._buf, self._pos)[0]
