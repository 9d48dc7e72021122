"""The unix transport's wire client: one socket to :mod:`transports.broker`, speaking
:mod:`transports.protocol`. :class:`WireClient` connects (retrying a full listen
backlog), writes frames (pipelined, or buffered with ``write_buffer``, waiting up to
``publish_timeout`` on back-pressure), reads and sorts what comes back (deliveries,
replies, FLOW notices), and turns every failure into a :class:`BrokerConnectionError`
that counts the publishes it lost. :class:`transports.unix.Transport` is the Kombu side.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from time import monotonic

from kombu.exceptions import ChannelError, OperationalError

from . import protocol as proto
from .framing import FrameError, FrameReader

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
_OP_HEARTBEAT = proto.OP_HEARTBEAT
_HEARTBEAT = proto.U32.pack(proto.HEAD.size) + proto.HEAD.pack(proto.OP_HEARTBEAT, 0)
_POLLIN = select.POLLIN | select.POLLERR | select.POLLHUP
_POLLOUT = select.POLLOUT | select.POLLERR | select.POLLHUP


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


class WireClient:
    """One connection's socket, its buffers and its reads (a base of
    :class:`transports.unix.Transport`, whose options it reads)."""

    _loop = None
    _wake_w = None
    heartbeat = 0.0          # seconds between heartbeats asked of the broker (0 = off)
    _last_recv = _hb_sent = 0.0

    def heartbeat_check(self, connection=None, rate=2):
        """As py-amqp's: send a heartbeat when due, and report a broker silent for two
        heartbeat intervals as a lost connection (it is hung, stopped or gone)."""
        if not self.heartbeat or self._sock is None:
            return
        now = monotonic()
        if now - self._last_recv > 2 * self.heartbeat:
            self._read(0)   # what may be waiting unread
            if monotonic() - self._last_recv > 2 * self.heartbeat:
                self._broken(f"no heartbeat from the broker for "
                             f"{now - self._last_recv:.1f}s (heartbeat={self.heartbeat:g}s)")
        if now - self._hb_sent >= self.heartbeat / 2:
            self._hb_sent = now
            self._send_now(_HEARTBEAT)

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
        if self.heartbeat:   # ask the broker to expect (and send) heartbeats
            body += _U16(max(1, min(0xFFFF, int(self.heartbeat + 0.5))))
        self._last_recv = self._hb_sent = monotonic()
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

    def _blocked(self, what: str, may_read: bool = True):
        """Back-pressure outlasted publish_timeout: say why, close, raise."""
        why = self._flow or (not may_read and self._peek_flow()) or (
            "the broker took no data (it stopped reading this connection: a queue full, "
            "its memory limit reached, or the broker stopped)")
        self._broken(f"{what} blocked for {self.publish_timeout:g}s (publish_timeout): {why}; "
                     "consume the queue or raise the limit (broker --max-queue-messages, "
                     "--max-queue-bytes, --max-memory, --max-client-memory; queue arguments "
                     "x-max-length, x-max-length-bytes)", PublishBlockedError)

    def _peek_flow(self) -> str:
        """The broker's FLOW notice among what it sent and nobody read yet, looked at and
        not taken (the write_buffer timer may not read: the caller's thread does); ''
        when there is none, or the input does not start at a frame."""
        if self._reader.pending:
            return ""
        try:
            data = self._sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return ""
        pos, text = 0, ""
        while pos + 4 <= len(data):
            (n,) = proto.U32.unpack_from(data, pos)
            frame = data[pos + 4:pos + 4 + n]
            if len(frame) < n:
                break
            if n >= 4 and frame[0] == _OP_FLOW:
                text = frame[4:].decode("utf-8", "replace") if frame[3] else ""
            pos += 4 + n
        return text

    def _check_frame_size(self, size: int):
        """Refuse a frame over the broker's max_frame before sending any of it."""
        if self._hello is not None and self._max_frame_option is None and self._usable():
            self._await_hello(self.rpc_timeout)  # learn the broker's limit
        if size > self._max_frame:
            raise ChannelError(
                f"message of {size} bytes (with its routing) is larger than the unix broker "
                f"accepts (max_frame={self._max_frame}); raise it on both sides (broker "
                f"--max-frame, transport option max_frame) or send it another way")

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
                    self._blocked("a write", may_read)
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
        self._last_recv = monotonic()
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
            elif op == _OP_HEARTBEAT:
                pass   # the broker is alive: _last_recv moved
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
