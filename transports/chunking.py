"""Chunks: a message too big for one atomic pipe write, split into frames of at most
``PIPE_BUF`` bytes (:mod:`transports.framing`'s length prefix included) and joined again.

A chunk's payload is ``0xFF``, the writer's 8-byte stream id, a flags byte (first, last)
and a piece of the message. A whole message's payload starts with its u32 meta length,
which is < ``framing.MAX_FRAME`` (64 MiB) < 0xFF000000, so the first byte tells them apart.
Chunks of many writers interleave in one pipe; each stream id is reassembled on its own.
"""
from __future__ import annotations

import select

from . import framing

PIPE_BUF = select.PIPE_BUF
CHUNK = 0xFF
SID_SIZE = 8
FIRST, LAST = 1, 2
CHUNK_HEAD = 1 + SID_SIZE + 1           # 0xFF, stream id, flags
CHUNK_DATA = PIPE_BUF - framing.HEADER_SIZE - CHUNK_HEAD
MAX_WHOLE = PIPE_BUF - framing.HEADER_SIZE  # largest payload sent as one write

_PREFIX = bytes([CHUNK])
_pack = framing.HEADER.pack


def split(payload: bytes, sid: bytes) -> list[bytes]:
    """``payload`` (over MAX_WHOLE) as framed chunks of stream ``sid``, in order."""
    frames = []
    last = len(payload) - 1
    for start in range(0, len(payload), CHUNK_DATA):
        flags = (FIRST if start == 0 else 0) | (LAST if start + CHUNK_DATA > last else 0)
        piece = payload[start:start + CHUNK_DATA]
        frames.append(_pack(CHUNK_HEAD + len(piece)) + _PREFIX + sid + bytes((flags,)) + piece)
    return frames


class TooBig(ValueError):
    """A chunked message grew past ``framing.MAX_FRAME``; its pieces were dropped."""


def join(partials: dict, chunk) -> bytes | None:
    """Add ``chunk`` (a frame payload starting with CHUNK) to ``partials`` (stream id ->
    bytearray); the whole message once its last chunk came, else None. A tail whose start
    was never seen (its writer began before we opened the pipe) is dropped."""
    sid, flags, data = chunk[1:1 + SID_SIZE], chunk[1 + SID_SIZE], chunk[CHUNK_HEAD:]
    if flags & FIRST:
        buf = partials[sid] = bytearray(data)
    else:
        buf = partials.get(sid)
        if buf is None:
            return None
        buf += data
        if len(buf) > framing.MAX_FRAME:
            del partials[sid]
            raise TooBig(f"chunked message over {framing.MAX_FRAME} bytes dropped")
    if flags & LAST:
        del partials[sid]
        return bytes(buf)
    return None
