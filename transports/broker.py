"""The broker behind the ``unix`` transport: one process that owns the queues.

Run it in the foreground (``python -m transports.broker unix:///abs/dir/broker.sock``
or ``celery-bench broker unix:///abs/dir/broker.sock``) until SIGINT/SIGTERM. It
creates the socket 0600 in a directory only its owner can enter, keeps queues in
memory, routes direct/topic/fanout exchanges, pushes deliveries to consumers that
have credit (round robin, honouring each channel's prefetch), and puts a
connection's unacknowledged messages back at the head of their queues when it
goes away (at-least-once, like RabbitMQ).

The broker is a single-threaded ``selectors`` loop. Messages are opaque bytes
to it: it never parses the kombu message, it only routes on the exchange and
routing key in the publish frame. Inside a stream of publishes it pauses
``--coalesce-us`` (200 us) between turns so it works in batches. A client that
sends a malformed frame is disconnected (its unacked messages requeued); the
others are not affected. Also here: :func:`start` / :func:`running`, a broker
subprocess for a harness, ready when its socket accepts.

Wire protocol (every frame is ``framing``'s ``u32 length`` + body; big-endian)::

    body = op:u8 channel:u16 ...
    client -> broker, no reply (pipelined):
      PUBLISH  exlen:u16 exchange rklen:u16 routing_key message
      ACK      tag:u64 multiple:u8          REJECT  tag:u64 requeue:u8
      QOS      prefetch_count:u32           CANCEL  consumer_id:u32
      CHANNEL_CLOSE
    client -> broker, answered by REPLY with the same reqid:
      op channel reqid:u32 args   (strings are u16 length + UTF-8)
    broker -> client:
      REPLY    reqid:u32 status:u8 data
      DELIVER  consumer_id:u32 tag:u64 redelivered:u8 message

``message`` is ``framing.encode_message`` output, carried untouched.
"""
from __future__ import annotations

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
from pathlib import Path

from .framing import FrameError, FrameReader

log = logging.getLogger("transports.broker")

MAGIC = b"CBUX"
PROTOCOL_VERSION = 1

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
# broker -> client
OP_REPLY = 100
OP_DELIVER = 101

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
TAG_FLAG = struct.Struct(">BHQB")        # ACK / REJECT
QOS_BODY = struct.Struct(">BHI")         # QOS / CANCEL
REPLY_HEAD = struct.Struct(">IBHIB")     # frame length, op, channel, reqid, status
DELIVER_HEAD = struct.Struct(">IBHIQB")  # frame length, op, channel, consumer, tag, redelivered
DELIVER_BODY = struct.Struct(">BHIQB")     # the same, as read from a frame body
DELIVER_BODY_HEAD = DELIVER_BODY.size
REPLY_BODY_HEAD = REPLY_HEAD.size - 4
COUNTS = struct.Struct(">II")
GET_OK = struct.Struct(">QB")
EXCHANGE_TYPES = (b"direct", b"topic", b"fanout")

READ_SIZE = 256 * 1024
# Stop pushing to a client whose unsent output passes this; resume when it drains.
HIGH_WATER = 512 * 1024
SOCKET_BUFFER = 1024 * 1024
ROUTE_CACHE_MAX = 4096
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the NUL
# Inside a stream of publishes or acks (a busy turn within twice this of the last
# one), pause this long before looking again, so the broker takes frames and writes
# deliveries in batches instead of being woken for every message: fewer context
# switches for everyone on a small host. At most this much added latency under
# load; none for a lone message or for calls that wait for an answer. 0 = off.
DEFAULT_COALESCE_S = 200e-6


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


# -- topic matching (AMQP semantics: '*' is one word, '#' zero or more) ----------

def topic_matches(pattern: list[bytes], words: list[bytes]) -> bool:
    if not pattern:
        return not words
    head = pattern[0]
    if head == b"#":
        rest = pattern[1:]
        if not rest:
            return True
        return any(topic_matches(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    if head == b"*" or head == words[0]:
        return topic_matches(pattern[1:], words[1:])
    return False


# -- broker state ------------------------------------------------------------------

class Queue:
    __slots__ = ("name", "messages", "consumers", "rr", "auto_delete", "owner",
                 "had_consumers", "bindings", "deleted")

    def __init__(self, name: bytes, auto_delete=False, owner=None):
        self.name = name
        self.messages: deque = deque()   # (payload, redelivered)
        self.consumers: list = []
        self.rr = 0
        self.auto_delete = auto_delete
        self.owner = owner               # the client of an exclusive queue
        self.had_consumers = False
        self.bindings: set = set()       # (exchange name, routing key)
        self.deleted = False


class Exchange:
    __slots__ = ("name", "type", "bindings", "cache")

    def __init__(self, name: bytes, type: bytes):
        self.name = name
        self.type = type
        self.bindings: dict = {}         # binding key -> [Queue]
        self.cache: dict = {}            # routing key -> tuple of Queue

    def route(self, rk: bytes) -> tuple:
        try:
            return self.cache[rk]
        except KeyError:
            pass
        if self.type == b"fanout":
            seen = {}
            for queues in self.bindings.values():
                for q in queues:
                    seen[id(q)] = q
            found = tuple(seen.values())
        elif self.type == b"topic":
            words = rk.split(b".")
            seen = {}
            for key, queues in self.bindings.items():
                if topic_matches(key.split(b"."), words):
                    for q in queues:
                        seen[id(q)] = q
            found = tuple(seen.values())
        else:
            found = tuple(self.bindings.get(rk, ()))
        if len(self.cache) >= ROUTE_CACHE_MAX:
            self.cache.clear()
        self.cache[rk] = found
        return found


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
    __slots__ = ("sock", "fd", "reader", "channels", "out", "outlen", "writing",
                 "throttled", "greeted", "closed", "name")

    def __init__(self, sock, name):
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader()
        self.channels: dict = {}
        self.out: list = []
        self.outlen = 0
        self.writing = False             # registered for EVENT_WRITE
        self.throttled = False           # a dispatch stopped at HIGH_WATER
        self.greeted = False
        self.closed = False
        self.name = name


class Broker:
    """Queues, exchanges and connected clients; ``serve_forever`` runs the loop."""

    def __init__(self, path: str, *, watch_parent: bool = False,
                 coalesce: float = DEFAULT_COALESCE_S):
        self.path = path
        self.coalesce = max(0.0, float(coalesce))
        self.queues: dict[bytes, Queue] = {}
        self.exchanges: dict[bytes, Exchange] = {
            b"amq.direct": Exchange(b"amq.direct", b"direct"),
            b"amq.topic": Exchange(b"amq.topic", b"topic"),
            b"amq.fanout": Exchange(b"amq.fanout", b"fanout"),
        }
        self.clients: dict[int, Client] = {}
        self._dirty_queues: set = set()
        self._dirty_clients: set = set()
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._stopping = False
        self._watch_parent = os.getppid() if watch_parent else None
        self._wake_r = self._wake_w = None
        self._handlers = {
            OP_PUBLISH: self._on_publish, OP_ACK: self._on_ack, OP_REJECT: self._on_reject,
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
        self._last_busy = 0.0

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
        sock.listen(512)
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
        try:
            while not self._stopping:
                for key, mask in select(1.0 if self._watch_parent else None):
                    data = key.data
                    if data.__class__ is Client:
                        if data.closed:
                            continue
                        if mask & selectors.EVENT_WRITE:
                            self._flush(data)
                        if mask & selectors.EVENT_READ and not data.closed:
                            self._on_readable(data)
                    else:
                        data(key.fileobj, mask)
                self._settle()
                if self._busy:
                    self._busy = False
                    now = time.monotonic()
                    # Only inside a stream (this busy turn came soon after the last):
                    # a lone message is never held back.
                    if self.coalesce and now - self._last_busy < 2 * self.coalesce:
                        time.sleep(self.coalesce)
                    self._last_busy = now
                if self._watch_parent and os.getppid() != self._watch_parent:
                    log.warning("parent process went away; broker stopping")
                    break
        finally:
            self.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client, None)
        if self._listener is not None:
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
        """Dispatch what became deliverable, then write everything out."""
        for _ in range(16):
            if self._dirty_queues:
                queues, self._dirty_queues = self._dirty_queues, set()
                for q in queues:
                    if q.messages and q.consumers and not q.deleted:
                        self._dispatch(q)
            if not self._dirty_clients:
                return
            clients, self._dirty_clients = self._dirty_clients, set()
            for client in clients:
                if not client.closed:
                    self._flush(client)
            if not self._dirty_queues:
                return

    def _accept(self, listener, mask):
        for _ in range(64):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            except OSError:
                pass
            self._client_seq += 1
            client = Client(sock, f"client#{self._client_seq}")
            self.clients[client.fd] = client
            self._sel.register(sock, selectors.EVENT_READ, client)

    def _on_readable(self, client: Client):
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"read failed: {exc}")
            return
        if not data:
            self._drop(client, None)
            return
        reader = client.reader
        reader.feed(data)
        handlers = self._handlers
        try:
            frames = reader.frames()
            if not client.greeted:
                if not frames:
                    if reader.pending > 64:
                        raise ProtocolError("no HELLO frame")
                    return
                self._on_hello(client, frames[0])
                frames = frames[1:]
            for frame in frames:
                handler = handlers.get(frame[0])
                if handler is None:
                    raise ProtocolError(f"unknown op {frame[0]}")
                handler(client, frame)
        except (FrameError, ProtocolError, struct.error, IndexError, UnicodeDecodeError,
                ValueError) as exc:
            log.warning("%s sent a bad frame (%s); disconnecting it", client.name, exc)
            self._drop(client, None)
        except Exception:  # a bug must cost one client, never the broker
            log.exception("error handling %s; disconnecting it", client.name)
            self._drop(client, None)

    def _flush(self, client: Client):
        out = client.out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._drop(client, f"write failed: {exc}")
            return
        if sent == len(data):
            out.clear()
            client.outlen = 0
            if client.writing:
                client.writing = False
                self._sel.modify(client.sock, selectors.EVENT_READ, client)
        else:
            rest = memoryview(data)[sent:] if sent else data
            out[:] = [rest]
            client.outlen = len(rest)
            if not client.writing:
                client.writing = True
                self._sel.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 client)
        if client.throttled and client.outlen < HIGH_WATER:
            client.throttled = False
            for ch in client.channels.values():
                for c in ch.consumers.values():
                    self._dirty_queues.add(c.queue)

    def _drop(self, client: Client, reason: str | None):
        """Forget a client: its unacked messages go back to their queues."""
        if client.closed:
            return
        client.closed = True
        if reason:
            log.warning("%s: %s", client.name, reason)
        self.clients.pop(client.fd, None)
        try:
            self._sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        self._dirty_clients.discard(client)
        for ch in list(client.channels.values()):
            self._close_channel(ch)
        client.channels.clear()
        for q in [q for q in self.queues.values() if q.owner is client]:
            self._delete_queue(q)

    # -- helpers ----------------------------------------------------------------------

    def _channel(self, client: Client, chid: int) -> Channel:
        ch = client.channels.get(chid)
        if ch is None:
            ch = client.channels[chid] = Channel(chid, client)
        return ch

    def _reply(self, client: Client, chid: int, reqid: int, status=STATUS_OK, data=b""):
        client.out.append(REPLY_HEAD.pack(REPLY_BODY_HEAD + len(data), OP_REPLY, chid, reqid,
                                          status))
        if data:
            client.out.append(data)
        client.outlen += REPLY_HEAD.size + len(data)
        self._dirty_clients.add(client)

    def _error(self, client, chid, reqid, status, text: str):
        self._reply(client, chid, reqid, status, text.encode("utf-8"))

    def _close_channel(self, ch: Channel):
        for consumer in list(ch.consumers.values()):
            self._remove_consumer(consumer)
        ch.consumers.clear()
        self._requeue_unacked(ch)

    def _requeue_unacked(self, ch: Channel):
        unacked = ch.unacked
        if not unacked:
            return
        # Newest first onto the head, so the queue keeps the original order.
        for queue, payload in reversed(list(unacked.values())):
            if not queue.deleted:
                queue.messages.appendleft((payload, True))
                self._dirty_queues.add(queue)
        unacked.clear()

    def _remove_consumer(self, consumer: Consumer):
        q = consumer.queue
        try:
            q.consumers.remove(consumer)
        except ValueError:
            return
        if q.auto_delete and q.had_consumers and not q.consumers and not q.deleted:
            self._delete_queue(q)

    def _delete_queue(self, q: Queue) -> int:
        count = len(q.messages)
        q.deleted = True
        q.messages.clear()
        for consumer in list(q.consumers):
            consumer.channel.consumers.pop(consumer.cid, None)
        q.consumers.clear()
        for ex_name, key in list(q.bindings):
            self._unbind(q, ex_name, key)
        if self.queues.get(q.name) is q:
            del self.queues[q.name]
        return count

    def _unbind(self, q: Queue, ex_name: bytes, key: bytes):
        q.bindings.discard((ex_name, key))
        ex = self.exchanges.get(ex_name)
        if ex is None:
            return
        queues = ex.bindings.get(key)
        if queues and q in queues:
            queues.remove(q)
            if not queues:
                del ex.bindings[key]
            ex.cache.clear()

    def _dispatch(self, q: Queue):
        """Push ready messages of ``q`` to its consumers that have credit, round robin."""
        msgs, consumers = q.messages, q.consumers
        n = len(consumers)
        idle = 0
        i = q.rr
        while msgs and idle < n:
            c = consumers[i % n]
            i += 1
            ch = c.channel
            client = ch.client
            if client.outlen >= HIGH_WATER:
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
            while msgs and budget:
                budget -= 1
                payload, redelivered = msgs.popleft()
                if c.no_ack:
                    tag = 0
                else:
                    ch.next_tag = tag = ch.next_tag + 1
                    ch.unacked[tag] = (q, payload)
                out.append(DELIVER_HEAD.pack(DELIVER_BODY_HEAD + len(payload), OP_DELIVER,
                                             ch.id, c.cid, tag, redelivered))
                out.append(payload)
                outlen += DELIVER_HEAD.size + len(payload)
                if outlen >= HIGH_WATER:
                    client.throttled = True
                    break
                if ch.prefetch and not c.no_ack and len(ch.unacked) >= ch.prefetch:
                    break
            client.outlen = outlen
            self._dirty_clients.add(client)
        q.rr = i % n if n else 0

    def _enqueue(self, q: Queue, payload: bytes):
        q.messages.append((payload, False))
        if q.consumers:
            self._dirty_queues.add(q)

    # -- frame handlers -----------------------------------------------------------------

    def _on_hello(self, client: Client, frame):
        op, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        if op != OP_HELLO or bytes(frame[7:11]) != MAGIC:
            raise ProtocolError("first frame is not a HELLO")
        (version,) = U16.unpack_from(frame, 11)
        if version != PROTOCOL_VERSION:
            self._error(client, chid, reqid, STATUS_PRECONDITION,
                        f"protocol version {version} not supported (broker speaks "
                        f"{PROTOCOL_VERSION})")
            return
        client.greeted = True
        self._reply(client, chid, reqid, STATUS_OK, U32.pack(os.getpid()))

    def _on_publish(self, client: Client, frame):
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
        payload = frame[pos:]
        if not ex:
            q = self.queues.get(rk)
            if q is None:  # like kombu's virtual transports: the default exchange creates it
                q = self.queues[rk] = Queue(rk)
            self._enqueue(q, payload)
            return
        exchange = self.exchanges.get(ex)
        if exchange is None:
            return  # unroutable, as with an unbound exchange
        for q in exchange.route(rk):
            self._enqueue(q, payload)

    def _on_ack(self, client: Client, frame):
        _, chid, tag, multiple = TAG_FLAG.unpack_from(frame, 0)
        self._busy = True
        ch = client.channels.get(chid)
        if ch is None:
            return
        unacked = ch.unacked
        if multiple:
            for t in [t for t in unacked if t <= tag]:
                del unacked[t]
        elif unacked.pop(tag, None) is None:
            return
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
            queue.messages.appendleft((payload, True))
            self._dirty_queues.add(queue)
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

    def _on_consume(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        cid, no_ack = struct.unpack_from(">IB", frame, 7)
        (name,), _ = unpack_strs(frame, 12, 1)
        ch = self._channel(client, chid)
        q = self.queues.get(name)
        if q is None:  # consuming creates the queue, as kombu's virtual transports do
            q = self.queues[name] = Queue(name)
        old = ch.consumers.pop(cid, None)
        if old is not None:
            self._remove_consumer(old)
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
        if type_ not in EXCHANGE_TYPES:
            self._error(client, chid, reqid, STATUS_PRECONDITION,
                        f"exchange type {type_.decode(errors='replace')!r} not supported "
                        "(direct, topic, fanout)")
            return
        if ex is None:
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
            for key, queues in ex.bindings.items():
                for q in queues:
                    q.bindings.discard((name, key))
        self._reply(client, chid, reqid)

    def _on_queue_declare(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        (flags,) = U8.unpack_from(frame, 7)
        (name,), _ = unpack_strs(frame, 8, 1)
        q = self.queues.get(name)
        if q is None:
            if flags & F_PASSIVE:
                self._error(client, chid, reqid, STATUS_NOT_FOUND,
                            f"NOT_FOUND - no queue {name.decode(errors='replace')!r}")
                return
            q = self.queues[name] = Queue(
                name, auto_delete=bool(flags & F_AUTO_DELETE),
                owner=client if flags & F_EXCLUSIVE else None)
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
            q.bindings.add((exname, key))
            ex.bindings.setdefault(key, []).append(q)
            ex.cache.clear()
        self._reply(client, chid, reqid)

    def _on_queue_unbind(self, client: Client, frame):
        self._on_queue_bind(client, frame, unbind=True)

    def _on_queue_purge(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        (name,), _ = unpack_strs(frame, 7, 1)
        q = self.queues.get(name)
        count = 0
        if q is not None:
            count = len(q.messages)
            q.messages.clear()
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
        tag = 0
        if not no_ack:
            ch = self._channel(client, chid)
            ch.next_tag = tag = ch.next_tag + 1
            ch.unacked[tag] = (q, payload)
        self._reply(client, chid, reqid, STATUS_OK, GET_OK.pack(tag, redelivered) + payload)

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
          coalesce: float = DEFAULT_COALESCE_S) -> None:
    """Serve the socket at ``path`` until SIGINT/SIGTERM (or the parent exits)."""
    broker = Broker(path, watch_parent=watch_parent, coalesce=coalesce)
    try:
        broker.listen()
    except OSError as exc:  # e.g. a directory we may not write: the user's to fix
        raise ValueError(f"cannot serve on {path}: {exc.strerror or exc}") from None
    print(f"unix broker listening on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    broker.serve_forever(install_signals=install_signals)
    print("unix broker stopped", file=sys.stderr, flush=True)


def main(url: str, *, watch_parent: bool = False, coalesce: float = DEFAULT_COALESCE_S) -> int:
    """``celery-bench broker unix:///abs/path.sock``: run in the foreground.

    Raises ValueError with a one-line reason for a bad URL or an unsafe directory.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    serve(socket_path_from_url(url), watch_parent=watch_parent, coalesce=coalesce)
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
          coalesce: float = DEFAULT_COALESCE_S) -> BrokerProcess:
    """Start ``python -m transports.broker unix://PATH`` and wait until the socket accepts.

    The broker exits by itself if this process dies (``--watch-parent``).
    """
    path = socket_path_from_url(path)
    project_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        # Own session: a terminal Ctrl-C reaches the harness, which stops us in order.
        proc = subprocess.Popen(
            [sys.executable, "-m", "transports.broker", f"unix://{path}", "--watch-parent",
             "--coalesce-us", f"{coalesce * 1e6:g}"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
            start_new_session=True)
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


def _cli(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m transports.broker",
        description="Run the unix transport's broker in the foreground until SIGINT/SIGTERM.")
    parser.add_argument("url", help="unix:///abs/path/broker.sock")
    parser.add_argument("--watch-parent", action="store_true",
                        help="exit when the process that started this one goes away")
    parser.add_argument("--coalesce-us", type=float, default=DEFAULT_COALESCE_S * 1e6,
                        help="pause after a busy turn, microseconds (default %(default)g; 0 = off)")
    args = parser.parse_args(argv)
    if args.coalesce_us < 0:
        parser.error("--coalesce-us must be >= 0")
    try:
        return main(args.url, watch_parent=args.watch_parent, coalesce=args.coalesce_us / 1e6)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
