"""The broker's flow control: holding a client's frames back (behind a full queue, the
memory limit or its own unread output), reserving memory for big frames, FLOW notices,
letting held clients go on when room appears, and what a hung-up publisher left."""
from __future__ import annotations

import struct
from fcntl import ioctl

from ..framing import FrameError
from ..protocol import (
    FLOW_HEAD, OP_ACK, OP_FLOW, OP_PUBLISH, OP_PUBLISH_CONFIRM, OP_REJECT, ProtocolError,
)
from .model import (
    PARK_LIMIT, PIECE, READ_SIZE, REMAINS_SLACK_DIV, REMAINS_SLACK_MIN, REPLY_WATER, SMALL_FRAME,
    _INT, _MEMORY, _RPC_OPS, _SHARE, _SIOCOUTQ, Client, _unsent, log,
)


class FlowControl:
    """Back-pressure and reservations (a mixin of :class:`~transports.broker.loop.Broker`)."""

    def _reserve(self, client: Client, n: int):
        """Big-frame memory: ``n`` more (or fewer) bytes reserved by ``client``, counted
        in the broker's pool and in its process's share."""
        self.reserved += n
        client.peer.reserved += n

    def _reserve_next(self, client: Client):
        """Reserve max_memory for a big frame the client started, or stop reading it."""
        if client.rsv_reader:
            return
        n = client.reader.next_length()
        if n is None or n <= SMALL_FRAME:
            if client.waiting_memory:
                client.waiting_memory = False
                self._memory_waiters.discard(client)
                self._set_reading(client)
            return
        if n > self.limits.max_frame:
            return  # the reader refuses it on the next read
        # One connection's share: one frame's worth (a held-back big frame and the next
        # one being read would be two), so one connection never holds more than half;
        # one process's connections together max_process_reserved (one frame's worth).
        if (self.reserved + n <= self.max_reserved
                and client.rsv_parked + n <= self.limits.max_frame
                and client.peer.reserved + n <= self.limits.max_process_reserved):
            self._reserve(client, n)
            client.rsv_reader = n
            client.rsv_since = self._now
            if client.waiting_memory:
                client.waiting_memory = False
                self._memory_waiters.discard(client)
                self._set_reading(client)
        elif not client.waiting_memory:
            client.waiting_memory = True
            self._memory_waiters.add(client)
            self._set_reading(client)

    def _set_reading(self, client: Client):
        want = (not client.waiting_memory and client.parked_bytes < PARK_LIMIT
                and not client.closed)
        if want != client.reading:
            client.reading = want
            self._update_events(client)

    def _park(self, client: Client, frame):
        """Hold ``frame`` back, after the others held; stop reading past PARK_LIMIT."""
        n = len(frame)
        client.parked.append(frame)
        client.parked_bytes += n + PIECE
        if frame[0] == OP_PUBLISH or frame[0] == OP_PUBLISH_CONFIRM:
            client.parked_pub += 1
        if n > SMALL_FRAME:
            self._reserve(client, n)
            client.rsv_parked += n
        if client.reading and client.parked_bytes >= PARK_LIMIT:
            self._set_reading(client)

    def _unpark(self, client: Client):
        """Run the client's held-back frames in order until one must wait again."""
        parked = client.parked
        handlers = self._handlers
        try:
            while parked and not client.closed:
                frame = parked.popleft()
                n = len(frame)
                client.parked_bytes -= n + PIECE
                op = frame[0]
                if op == OP_PUBLISH or op == OP_PUBLISH_CONFIRM:
                    taken = self._route_publish(client, frame, op == OP_PUBLISH_CONFIRM,
                                                park=False)
                    if taken:
                        client.parked_pub -= 1
                else:
                    taken = not (op in _RPC_OPS and _unsent(client) >= REPLY_WATER)
                    if taken:
                        handlers[op](client, frame)
                if not taken:
                    parked.appendleft(frame)
                    client.parked_bytes += n + PIECE
                    break
                if n > SMALL_FRAME and not client.closed:
                    # Its reservation ends (a publish counts it as a message now):
                    # another connection, of this process too, may read a big frame.
                    self._reserve(client, -n)
                    client.rsv_parked -= n
                    self._freed = True
        except (ProtocolError, struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
            log.warning("%s sent a bad frame (%s); disconnecting it", client.name, exc)
            self._drop(client, None)
            return
        except Exception:  # a bug must cost one client, never the broker
            log.exception("error handling %s; disconnecting it", client.name)
            self._drop(client, None)
            return
        if client.closed:
            return
        if not parked and client.flow_sent:
            self._flow(client, False, b"")
        if not client.reading:
            if client.waiting_memory:
                self._reserve_next(client)  # its held-back frame may have held its share
            self._set_reading(client)
            if client.reading:
                self._take_input(client)  # what waited in the reader's buffer

    def _retry_blocked(self):
        for client in list(self._blocked):
            reason = client.blocked
            if reason is _MEMORY:
                ready = self.held < self.max_memory
            elif reason is _SHARE:
                ready = client.peer.memory < self.max_client_memory
            else:
                ready = reason is None or reason.deleted or not reason.full()
            if ready:
                self._blocked.discard(client)
                client.blocked = None
                if not client.closed:
                    self._unpark(client)

    def _block(self, client: Client, reason, frame=None) -> bool:
        """A publish of ``client`` must wait for room in ``reason`` (held back when
        ``frame`` is given): tell it, once."""
        client.blocked = reason
        self._blocked.add(client)
        if frame is not None:
            self._park(client, frame)
        if not client.flow_sent:
            limits = self.limits
            if reason is _MEMORY:
                text = (f"the broker's memory limit is reached: {self.held} bytes held "
                        f"(max_memory={limits.max_memory})")
            elif reason is _SHARE:
                peer = client.peer
                text = (f"this client's memory limit is reached: {peer.memory} bytes held of "
                        f"what {peer.label} published on its {peer.conns} connection(s) "
                        f"(max_client_memory={limits.max_client_memory}, broker option "
                        "--max-client-memory); other clients still publish")
            else:
                text = (f"queue {reason.name.decode(errors='replace')!r} is full: "
                        f"{len(reason.messages)} messages, {reason.bytes} bytes ready "
                        f"(max_queue_messages={reason.max_messages}, "
                        f"max_queue_bytes={reason.max_bytes})")
            self._flow(client, True, text.encode())
        return False

    def _flow(self, client: Client, blocked: bool, text: bytes):
        """A FLOW notice, unless the client has much unread already: a producer that
        never reads would have notices pile up (it reads them when its write blocks)."""
        client.flow_sent = False
        if blocked:
            try:
                if _INT.unpack(ioctl(client.fd, _SIOCOUTQ, b"\0\0\0\0"))[0] > 65536:
                    return
            except OSError:
                pass
            client.flow_sent = True
        client.out.append(FLOW_HEAD.pack(4 + len(text), OP_FLOW, 0, 1 if blocked else 0) + text)
        client.outlen += FLOW_HEAD.size + len(text)
        self._dirty_clients.add(client)

    def _take_remains(self, client: Client):
        """The peer hung up. Its pipelined publishes returned as sent on its side: take
        those held back and those still unread in its socket (bounded by its send
        buffer), past the queue limits while max_memory allows. Unconfirmed
        confirm-publishes are dropped: their publisher was told they failed."""
        frames = list(client.parked)
        why = f" (held back: {self._why_blocked(client)})" if client.blocked else ""
        client.parked.clear()
        client.parked_bytes = client.parked_pub = 0
        self._reserve(client, -client.rsv_parked)
        client.rsv_parked = 0
        reader = client.reader
        try:
            while True:
                data = client.sock.recv(READ_SIZE)
                if not data:
                    break
                reader.feed(data)
                frames += reader.frames()
        except (OSError, FrameError):
            pass  # what could be read is taken; a partial frame is not a message
        taken = dropped = unconfirmed = 0
        # Its publish() calls returned: keep them past max_memory too. They are bounded
        # by the connection's socket buffer and PARK_LIMIT; the slack caps the sum over
        # every connection that hangs up while the broker is full.
        ceiling = self.max_memory + max(self.max_memory // REMAINS_SLACK_DIV,
                                        REMAINS_SLACK_MIN)
        for frame in frames:
            op = frame[0]
            try:
                if op == OP_PUBLISH:
                    if self.held >= ceiling:
                        dropped += 1
                    else:
                        self._route_publish(client, frame, False, park=False, force=True)
                        taken += 1
                elif op == OP_PUBLISH_CONFIRM:
                    unconfirmed += 1
                elif op == OP_ACK or op == OP_REJECT:
                    self._handlers[op](client, frame)
            except (ProtocolError, struct.error, IndexError, ValueError):
                break
        if dropped or unconfirmed or taken:
            log.warning("%s hung up before the broker took all its frames%s: %d publishes "
                        "taken (past the queue limits if need be), %d dropped at max_memory, "
                        "%d unconfirmed confirm-publishes dropped", client.name, why, taken,
                        dropped, unconfirmed)

    def _why_blocked(self, client: Client) -> str:
        reason = client.blocked
        if reason is _MEMORY:
            return "max_memory reached"
        if reason is _SHARE:
            return "max_client_memory reached"
        if reason is None:
            return "its output not read"
        return f"queue {reason.name.decode(errors='replace')!r} full"
