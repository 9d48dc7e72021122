"""The broker's selector loop (:class:`Broker`): the listening socket in its private
directory, accepting, reading frames and running their handlers, writing output,
timeouts and dropping clients. Back-pressure is in :mod:`.flow`."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import selectors
import signal
import socket
import stat
import struct
import time
from pathlib import Path
from select import POLLRDHUP, poll

from ..framing import FrameError
from ..protocol import (
    OP_ACK, OP_CANCEL, OP_CHANNEL_CLOSE, OP_CONSUME, OP_EXCHANGE_DECLARE, OP_EXCHANGE_DELETE,
    OP_GET, OP_PING, OP_PUBLISH, OP_PUBLISH_CONFIRM, OP_QOS, OP_QUEUE_BIND, OP_QUEUE_DECLARE,
    OP_QUEUE_DELETE, OP_QUEUE_PURGE, OP_QUEUE_UNBIND, OP_RECOVER, OP_REJECT, ProtocolError,
    OP_HEARTBEAT, HEAD, U32,
)
from .model import (
    DEFAULT_COALESCE_S, FLUSH_CHUNK, MAX_ACCEPT_PAUSE_S, READ_SIZE, REPLY_WATER,
    ROUTE_WORK_PER_TURN, SMALL_FRAME, SOCKET_BUFFER, TICK_S, TRIM_AFTER, _EMFILE, _HANG_UP,
    _IMMEDIATE, _RPC_OPS,
    Client, Exchange, Limits, Peer, Queue, Routing, _unsent, log,
)
from .flow import FlowControl
from .handlers import Handlers
from .sockets import _socket_accepts, prepare_socket_dir  # noqa: F401  (re-exported)


_HEARTBEAT = U32.pack(HEAD.size) + HEAD.pack(OP_HEARTBEAT, 0)
_PEERCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


def _libc_trim():
    """``malloc_trim(0)`` of glibc, or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class Broker(FlowControl, Handlers, Routing):
    """Queues, exchanges and connected clients; ``serve_forever`` runs the loop."""

    def __init__(self, path: str, *, watch_parent: bool = False,
                 coalesce: float = DEFAULT_COALESCE_S, limits: Limits | None = None,
                 measure_turns: bool = False):
        self.path = path
        # The most CPU time one loop turn took (measure_turns; logged at exit): the
        # bounded-work guarantee as the broker itself sees it, whatever the scheduler.
        self.measure_turns = measure_turns
        self.longest_turn = 0.0
        self.limits = limits = limits or Limits()
        self.max_memory = limits.max_memory
        self.max_client_memory = limits.max_client_memory   # read on every publish
        self.coalesce = max(0.0, float(coalesce))
        self.queues: dict[bytes, Queue] = {}
        self.exchanges: dict[bytes, Exchange] = {
            b"amq.direct": Exchange(b"amq.direct", b"direct"),
            b"amq.topic": Exchange(b"amq.topic", b"topic"),
            b"amq.fanout": Exchange(b"amq.fanout", b"fanout"),
        }
        self.objects = 0                 # queues, exchanges, bindings, channels, consumers
        self.clients: dict[int, Client] = {}
        self.peers: dict[int, Peer] = {}  # Peer.key -> its shares, while it holds anything
        self.held = 0                    # cost of every message held (<= max_memory)
        self.reserved = 0                # big frames being read or held back
        self.max_reserved = limits.max_reserved
        self._cached_routes = 0          # entries in every Exchange.cache
        self._dirty_queues: set = set()
        self._dirty_clients: set = set()
        self._unfinished: set = set()    # clients whose whole frames wait for the next turn
        self.route_work = 0              # topic patterns matched this turn (Routing._route)
        self._blocked: set = set()       # clients whose held-back publish waits for room
        self._memory_waiters: set = set()  # clients whose big frame waits for max_memory
        self._freed = False              # room may have appeared this turn
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._accept_paused: str | None = None   # why accepting stopped, None = accepting
        self._accept_at = 0.0
        self._accept_backoff = 0.05
        self._accept_since = 0.0
        self._stopping = False
        self._watch_parent = os.getppid() if watch_parent else None
        self._wake_r = self._wake_w = None
        self._handlers = {
            OP_PUBLISH: self._route_publish, OP_PUBLISH_CONFIRM: self._on_publish_confirm,
            OP_ACK: self._on_ack, OP_REJECT: self._on_reject,
            OP_QOS: self._on_qos, OP_CANCEL: self._on_cancel,
            OP_CHANNEL_CLOSE: self._on_channel_close,
            OP_CONSUME: self._on_consume, OP_EXCHANGE_DECLARE: self._on_exchange_declare,
            OP_EXCHANGE_DELETE: self._on_exchange_delete,
            OP_QUEUE_DECLARE: self._on_queue_declare, OP_QUEUE_BIND: self._on_queue_bind,
            OP_QUEUE_UNBIND: self._on_queue_unbind, OP_QUEUE_PURGE: self._on_queue_purge,
            OP_QUEUE_DELETE: self._on_queue_delete, OP_GET: self._on_get,
            OP_RECOVER: self._on_recover, OP_PING: self._on_ping,
            OP_HEARTBEAT: self._on_heartbeat,
        }
        self._client_seq = 0
        self._busy = False
        self._answered = False
        self._last_busy = 0.0
        self._now = time.monotonic()
        self._next_tick = 0.0
        self._held_high = 0              # most held since the last trim
        self._trim = _libc_trim()

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
        sock.listen(int(self.limits.backlog))
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
        monotonic = time.monotonic
        cpu = time.thread_time if self.measure_turns else None
        turn_cpu = cpu() if cpu else 0.0
        try:
            while not self._stopping:
                if cpu:   # from turn to turn: select() and the coalescing sleep cost none
                    now_cpu = cpu()
                    self.longest_turn = max(self.longest_turn, now_cpu - turn_cpu)
                    turn_cpu = now_cpu
                self.route_work = 0
                for key, mask in select(0 if self._unfinished else TICK_S):
                    data = key.data
                    if data.__class__ is Client:
                        if data.closed:
                            continue
                        if mask & selectors.EVENT_WRITE:
                            self._flush(data)
                        if (mask & selectors.EVENT_READ and data.reading and not data.closed
                                and data not in self._unfinished):  # read once caught up
                            self._on_readable(data)
                    else:
                        data(key.fileobj, mask)
                if self._unfinished:
                    self._continue_input()
                self._now = now = monotonic()
                self._settle()
                if now >= self._next_tick:
                    self._housekeeping(now)
                if self._busy:
                    self._busy = False
                    # Only inside a stream (this busy turn came soon after the last):
                    # a lone message is never held back, nor a turn that answered
                    # someone (a confirm, an RPC: the caller is waiting).
                    if (self.coalesce and not self._answered
                            and now - self._last_busy < 2 * self.coalesce):
                        time.sleep(self.coalesce)
                    self._last_busy = now
                self._answered = False
                if self._watch_parent and os.getppid() != self._watch_parent:
                    log.warning("parent process went away; broker stopping")
                    break
        finally:
            self.close()
            if cpu:
                log.info("longest loop turn: %.3f ms of CPU", self.longest_turn * 1e3)

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client, None)
        if self._listener is not None:
            if not self._accept_paused:
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
        """Dispatch what became deliverable, let held-back clients go on, write everything."""
        for _ in range(16):
            if self._dirty_queues:
                queues, self._dirty_queues = self._dirty_queues, set()
                for q in queues:
                    if q.messages and q.consumers and not q.deleted:
                        self._dispatch(q)
            if self._freed:
                self._freed = False
                if self._blocked:
                    self._retry_blocked()
                if self._memory_waiters and self.reserved < self.max_reserved:
                    for client in list(self._memory_waiters):
                        if not client.closed:
                            self._reserve_next(client)
            if not self._dirty_clients:
                if not self._dirty_queues and not self._freed:
                    return
                continue
            clients, self._dirty_clients = self._dirty_clients, set()
            for client in clients:
                if not client.closed:
                    self._flush(client)
            if not self._dirty_queues and not self._freed:
                return

    def _housekeeping(self, now):
        """Timeouts, hung-up peers of held-back clients, paused accepts, memory trim."""
        self._next_tick = now + TICK_S
        limits = self.limits
        paused = []
        for client in list(self.clients.values()):
            if client.heartbeat and now - client.hb_sent >= client.heartbeat / 2:
                client.hb_sent = now   # so a client notices a hung broker
                client.out.append(_HEARTBEAT)
                client.outlen += len(_HEARTBEAT)
                self._dirty_clients.add(client)
            if not client.greeted:
                if now - client.since > limits.handshake_timeout:
                    self._drop(client, f"no HELLO within {limits.handshake_timeout:g}s; "
                                       "closing it")
            elif client.stalled_at and now - client.stalled_at > limits.send_timeout:
                self._drop(client, f"took none of its {client.outlen} bytes of output for "
                                   f"{limits.send_timeout:g}s (send_timeout); disconnecting "
                                   "it, its unacknowledged messages go back to their queues")
            elif (client.rsv_reader and limits.frame_timeout
                  and now - client.rsv_since > limits.frame_timeout):
                # Its reservation would keep every other big publish waiting for nothing;
                # counted from the reservation, not the last byte, so a trickle ends too.
                self._drop(client, f"sent part of a {client.rsv_reader}-byte frame, not "
                                   f"all of it within {limits.frame_timeout:g}s "
                                   "(frame_timeout); closing it, the frame is dropped")
            elif not client.reading:
                paused.append(client)
            elif client.heartbeat and now - client.last_in > 2 * client.heartbeat:
                # Stopped (SIGSTOP), hung or gone without closing: like py-amqp's
                # heartbeat_check, two missed heartbeats and its messages go to others.
                self._drop(client, f"sent nothing for {now - client.last_in:.1f}s, 2 "
                                   f"heartbeats of {client.heartbeat}s; disconnecting it, its "
                                   "unacknowledged messages go back to their queues")
                continue
            elif (limits.idle_timeout and now - client.last_in > limits.idle_timeout
                  and not client.out):
                self._drop(client, f"idle for {limits.idle_timeout:g}s (idle_timeout); "
                                   "closing it")
        if paused:
            # Held-back clients are not read, so their hang-up would go unseen.
            poller = poll()
            for client in paused:
                poller.register(client.fd, POLLRDHUP)
            gone = {fd for fd, _ in poller.poll(0)}
            for client in paused:
                if client.fd in gone and not client.closed:
                    self._drop(client, None, hung_up=True)
        if self._accept_paused and now >= self._accept_at:
            self._resume_accept()
        self._held_high = max(self._held_high, self.held)
        if self._held_high - self.held >= TRIM_AFTER:
            if self._trim is not None:
                self._trim(0)
            self._held_high = self.held
        if self._dirty_clients or self._dirty_queues or self._freed:
            self._settle()

    # -- accepting --------------------------------------------------------------------

    def _accept(self, listener, mask):
        for _ in range(64):
            if len(self.clients) >= self.limits.max_connections:
                self._pause_accept("limit", None)
                return
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EMFILE:
                    self._pause_accept("fd", exc)
                    return
                continue  # ECONNABORTED and the like: that one connection is gone
            if self._accept_since:
                log.warning("accepting connections again after %.1fs (%d open)",
                            self._now - self._accept_since, len(self.clients))
                self._accept_since = 0.0
                self._accept_backoff = 0.05
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            except OSError:
                pass
            self._client_seq += 1
            name = f"client#{self._client_seq}"
            client = Client(sock, name, self._now, self.limits.max_frame,
                            self._peer_of(sock, name))
            self.clients[client.fd] = client
            client.events = selectors.EVENT_READ
            self._sel.register(sock, selectors.EVENT_READ, client)

    def _peer_pid(self, sock: socket.socket) -> int | None:
        """The connecting process (SO_PEERCRED), or None where that is unknown."""
        try:
            pid, _uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except (AttributeError, OSError, struct.error):
            return None
        return pid or None   # 0: a process this broker's pid namespace cannot name

    def _peer_of(self, sock: socket.socket, name: str) -> Peer:
        """Whose shares a new connection counts in: its process's, else its own."""
        pid = self._peer_pid(sock)
        if pid is None:
            key = -self._client_seq
            peer = self.peers[key] = Peer(key, None, name)
        else:
            peer = self.peers.get(pid)
            if peer is None:
                peer = self.peers[pid] = Peer(pid, pid, f"process {pid}")
        peer.conns += 1
        return peer

    def _pause_accept(self, why: str, exc: OSError | None):
        """Stop accepting for a while: one log line per episode, not one per attempt."""
        if self._accept_paused:
            return
        self._sel.unregister(self._listener)
        self._accept_paused = why
        now = time.monotonic()
        if not self._accept_since:
            self._accept_since = now
            if why == "fd":
                log.warning("cannot accept connections: %s (%d open); pausing accepts until a "
                            "descriptor frees up (raise the open-file limit: ulimit -n)",
                            exc.strerror or exc, len(self.clients))
            else:
                log.warning("%d connections (max_connections): not accepting more until one "
                            "closes; new clients wait in the listen backlog",
                            len(self.clients))
        else:
            self._accept_backoff = min(self._accept_backoff * 2, MAX_ACCEPT_PAUSE_S)
        self._accept_at = now + (self._accept_backoff if why == "fd" else TICK_S)

    def _resume_accept(self):
        if not self._accept_paused or self._listener is None:
            return
        if self._accept_paused == "limit" and len(self.clients) >= self.limits.max_connections:
            self._accept_at = time.monotonic() + TICK_S
            return
        self._accept_paused = None
        self._sel.register(self._listener, selectors.EVENT_READ, self._accept)

    # -- reading ------------------------------------------------------------------------

    def _on_readable(self, client: Client):
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # A peer that went away is no news; anything else is worth a line.
            self._drop(client, None if exc.errno in _HANG_UP else f"read failed: {exc}",
                       hung_up=True)
            return
        if not data:
            self._drop(client, None, hung_up=True)
            return
        client.last_in = self._now
        client.reader.feed(data)
        self._take_input(client)

    def _take_input(self, client: Client):
        """Run the whole frames buffered; past PARK_LIMIT held back, leave the rest unread."""
        reader = client.reader
        handlers = self._handlers
        try:
            frames = reader.frames()
            if not client.greeted:
                if not frames:
                    n = reader.next_length()
                    if reader.pending > 64 or (n is not None and n > 64):
                        raise ProtocolError("no HELLO frame")
                    return
                if not self._on_hello(client, frames[0]):
                    return
                frames = frames[1:]
            i = 0
            for frame in frames:
                i += 1
                op = frame[0]
                handler = handlers.get(op)
                if handler is None:
                    raise ProtocolError(f"unknown op {op}")
                if client.rsv_reader and len(frame) > SMALL_FRAME:
                    # Its reservation ends here; a publish counts it again as a message.
                    self._reserve(client, -client.rsv_reader)
                    client.rsv_reader = 0
                    self._freed = True
                if (client.parked and op not in _IMMEDIATE) or (
                        op in _RPC_OPS and _unsent(client) >= REPLY_WATER):
                    self._park(client, frame)
                    if not client.reading:
                        # Held back enough: the rest waits in the reader's buffer, as
                        # compact bytes (thousands of tiny frame objects cost 5x more).
                        reader.push_back(frames[i:])
                        return
                    continue
                handler(client, frame)
                if self.route_work >= ROUTE_WORK_PER_TURN and i < len(frames):
                    # Bounded work per turn: the rest waits for the next one, after the
                    # other clients had theirs (a ping never waits behind a stream of
                    # publishes each matched against every wildcard binding).
                    reader.push_back(frames[i:])
                    self._unfinished.add(client)
                    return
            if client.reading:
                self._reserve_next(client)
        except (FrameError, ProtocolError, struct.error, IndexError, UnicodeDecodeError,
                ValueError) as exc:
            log.warning("%s sent a bad frame (%s); disconnecting it", client.name, exc)
            self._drop(client, None)
        except Exception:  # a bug must cost one client, never the broker
            log.exception("error handling %s; disconnecting it", client.name)
            self._drop(client, None)

    def _continue_input(self):
        clients, self._unfinished = self._unfinished, set()
        for client in clients:
            if not client.closed and client.reading:
                self._take_input(client)

    def _update_events(self, client: Client):
        events = (selectors.EVENT_READ if client.reading else 0) | (
            selectors.EVENT_WRITE if client.out else 0)
        if events == client.events or client.closed:
            return
        if not client.events:
            self._sel.register(client.sock, events, client)
        elif not events:
            self._sel.unregister(client.sock)
        else:
            self._sel.modify(client.sock, events, client)
        client.events = events

    # -- writing ------------------------------------------------------------------------

    def _flush(self, client: Client):
        out = client.out
        sock = client.sock
        sent_any = False
        while out:
            first = out[0]
            if len(out) == 1 or len(first) >= FLUSH_CHUNK:
                data = out.popleft()
            elif client.outlen <= FLUSH_CHUNK:
                data = b"".join(out)  # the usual case: all of it, joined in C
                out.clear()
            else:
                # Join a bounded piece: a client that reads slowly never makes the broker
                # copy its whole backlog per turn.
                pieces = []
                size = 0
                while out and size < FLUSH_CHUNK:
                    item = out.popleft()
                    pieces.append(item)
                    size += len(item)
                data = b"".join(pieces)
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._drop(client, None if exc.errno in _HANG_UP else f"write failed: {exc}",
                           hung_up=True)
                return
            if sent:
                sent_any = True
                client.outlen -= sent
            if sent < len(data):
                out.appendleft(memoryview(data)[sent:] if sent else data)
                break
        if out:
            if sent_any or not client.stalled_at:
                client.stalled_at = self._now
        else:
            client.stalled_at = 0.0
            client.outlen = 0
            if client.held_out:
                self.held -= client.held_out
                client.held_out = 0
                self._freed = True
        if bool(out) != bool(client.events & selectors.EVENT_WRITE):
            self._update_events(client)
        if client.throttled and _unsent(client) < self.limits.max_client_output:
            client.throttled = False
            for ch in client.channels.values():
                for c in ch.consumers.values():
                    self._dirty_queues.add(c.queue)
        if client.parked and client.blocked is None and _unsent(client) < REPLY_WATER:
            self._unpark(client)

    def _drop(self, client: Client, reason: str | None, hung_up: bool = False):
        """Forget a client: its unacked messages go back to their queues."""
        if client.closed:
            return
        if reason:
            log.warning("%s: %s", client.name, reason)
        if hung_up:
            self._take_remains(client)
        elif client.parked_pub:
            log.warning("%s: %d publishes held back by back-pressure (%s) are dropped with "
                        "it", client.name, client.parked_pub, self._why_blocked(client))
        client.closed = True
        self.clients.pop(client.fd, None)
        if client.events:
            try:
                self._sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()
        self._dirty_clients.discard(client)
        self._blocked.discard(client)
        self._memory_waiters.discard(client)
        self.held -= client.held_out
        self._reserve(client, -(client.rsv_reader + client.rsv_parked))
        client.held_out = client.rsv_reader = client.rsv_parked = 0
        client.parked.clear()
        client.out.clear()
        self._freed = True
        for ch in list(client.channels.values()):
            self._close_channel(ch)
        client.channels.clear()
        for q in [q for q in self.queues.values() if q.owner is client]:
            self._delete_queue(q)
        client.peer.conns -= 1
        self._forget_peer(client.peer)
        if self._accept_paused:
            self._resume_accept()
