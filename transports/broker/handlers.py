"""The broker's request handlers: one ``_on_*`` method per frame op (declarations,
bindings, publish, consume, ack/reject, QoS, get, ping) and the replies they write."""
from __future__ import annotations

import os
import struct

from ..protocol import (
    COUNTS, EXCHANGE_TYPES, F_AUTO_DELETE, F_EXCLUSIVE, F_IF_EMPTY, F_IF_UNUSED, F_PASSIVE,
    GET_OK, HEAD, HELLO_OK, MAGIC, OP_HELLO, OP_REPLY, PROTOCOL_VERSION, QOS_BODY,
    QUEUE_LIMITS, REPLY_BODY_HEAD, REPLY_HEAD, RPC_HEAD, STATUS_EMPTY, STATUS_NOT_FOUND,
    STATUS_OK, STATUS_PRECONDITION, TAG_FLAG, U16, U32, ProtocolError, unpack_flagged,
    unpack_named, unpack_strs,
)
from .model import (
    MAX_NAME, MSG_OVERHEAD, _MEMORY, _SHARE, Client, Consumer, Exchange, TopicPattern,
    _ResourceLimit, is_wildcard,
)


class Handlers:
    """The frame handlers (a mixin of :class:`~transports.broker.loop.Broker`)."""

    def _reply(self, client: Client, chid: int, reqid: int, status=STATUS_OK, data=b""):
        head = REPLY_HEAD.pack(REPLY_BODY_HEAD + len(data), OP_REPLY, chid, reqid, status)
        if len(data) > 256:
            client.out.append(head)
            client.out.append(data)
        else:  # one small object, not two
            client.out.append(head + data if data else head)
        client.outlen += REPLY_HEAD.size + len(data)
        self._dirty_clients.add(client)
        self._answered = True

    def _error(self, client, chid, reqid, status, text: str):
        self._reply(client, chid, reqid, status, text.encode("utf-8"))
    # -- frame handlers -----------------------------------------------------------------

    def _on_hello(self, client: Client, frame) -> bool:
        """Greet the client; a refused HELLO ends the connection at once (False)."""
        op, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        if op != OP_HELLO or bytes(frame[7:11]) != MAGIC:
            raise ProtocolError("first frame is not a HELLO")
        (version,) = U16.unpack_from(frame, 11)
        if version != PROTOCOL_VERSION:
            text = (f"protocol version {version} not supported (broker speaks "
                    f"{PROTOCOL_VERSION})").encode()
            # Best effort, then gone: nothing that came after the HELLO runs.
            try:
                client.sock.send(REPLY_HEAD.pack(REPLY_BODY_HEAD + len(text), OP_REPLY, chid,
                                                 reqid, STATUS_PRECONDITION) + text)
            except OSError:
                pass
            self._drop(client, f"refused: {text.decode()}")
            return False
        client.greeted = True
        if len(frame) >= 15:   # the client asks for heartbeats every N seconds (0 = none)
            (client.heartbeat,) = U16.unpack_from(frame, 13)
        self._reply(client, chid, reqid, STATUS_OK,
                    HELLO_OK.pack(os.getpid(), self.limits.max_frame))
        return True

    def _on_publish_confirm(self, client: Client, frame):
        self._route_publish(client, frame, True)

    def _route_publish(self, client: Client, frame, confirm: bool = False, park: bool = True,
                       force: bool = False) -> bool:
        """Enqueue a publish where it routes (the PUBLISH handler). When it must wait:
        held back (``park``) and False. ``force``: never wait, past any limit."""
        if confirm:
            _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
            (exlen,) = U16.unpack_from(frame, 7)
            pos = 9 + exlen
            ex = frame[9:pos]
        else:
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
        peer = client.peer
        if not force:
            if self.held >= self.max_memory:
                return self._block(client, _MEMORY, frame if park else None)
            if peer.memory >= self.max_client_memory:
                # Its own share: it waits the same way, the other clients publish on.
                return self._block(client, _SHARE, frame if park else None)
        if not ex:
            q = self.queues.get(rk)
            if q is None:
                # Like kombu's virtual transports: the default exchange creates it
                # (unroutable past the limits, as a publish to no queue is in AMQP).
                if (len(rk) > MAX_NAME or self.objects >= self.limits.max_objects
                        or peer.objects >= self.limits.max_client_objects):
                    targets = ()
                else:
                    targets = (self._new_queue(rk, peer),)
            else:
                targets = (q,)
        else:
            exchange = self.exchanges.get(ex)
            if exchange is None or len(rk) > MAX_NAME:
                # A key longer than AMQP's shortstr is unroutable (the client refuses one
                # first): matching work per publish stays bounded by the key's 128 words.
                targets = ()
            else:
                targets = exchange.cache.get(rk)
                if targets is None:
                    targets = self._route(exchange, rk)
        for q in targets:
            if (len(q.messages) >= q.max_messages or q.bytes >= q.max_bytes) and not force:
                return self._block(client, q, frame if park else None)
        if targets:
            payload = frame[pos:]
            for q in targets:
                self._enqueue(q, payload, peer)
        if confirm:
            self._reply(client, chid, reqid)
        return True

    def _on_ack(self, client: Client, frame):
        _, chid, tag, multiple = TAG_FLAG.unpack_from(frame, 0)
        self._busy = True
        ch = client.channels.get(chid)
        if ch is None:
            return
        unacked = ch.unacked
        peers = self.peers
        if multiple:
            tags = [t for t in unacked if t <= tag]
            freed = 0
            for t in tags:   # each leaves its publisher's share
                _, payload, key = unacked.pop(t)
                cost = len(payload) + MSG_OVERHEAD
                freed += cost
                peer = peers[key]
                peer.memory -= cost
                if not peer.conns and peer.memory <= 0:
                    self._forget_peer(peer)
            count = len(tags)
        else:
            entry = unacked.pop(tag, None)
            if entry is None:
                return
            freed, count = len(entry[1]) + MSG_OVERHEAD, 1
            peer = peers[entry[2]]   # inline: the usual ack, one per message
            peer.memory -= freed
            if not peer.conns and peer.memory <= 0:
                self._forget_peer(peer)
        self.held -= freed
        self._settle_unacked(client, count, freed)
        self._freed = True
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
        queue, payload, key = entry
        self._settle_unacked(client, 1, len(payload) + MSG_OVERHEAD)
        if requeue and not queue.deleted:
            # Past the queue's limit if need be: a message already held is never dropped.
            queue.messages.appendleft((payload, True, key))
            queue.bytes += len(payload)
            self._dirty_queues.add(queue)
        else:
            self.held -= len(payload) + MSG_OVERHEAD
            self._release(key, len(payload) + MSG_OVERHEAD)
            self._freed = True
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

    def _name_error(self, client, chid, reqid, *names) -> bool:
        for name in names:
            if len(name) > MAX_NAME:
                self._error(client, chid, reqid, STATUS_PRECONDITION,
                            f"PRECONDITION_FAILED - name of {len(name)} bytes: at most "
                            f"{MAX_NAME}")
                return True
        return False

    def _limit_error(self, client, chid, reqid, exc) -> None:
        self._error(client, chid, reqid, STATUS_PRECONDITION, f"PRECONDITION_FAILED - {exc}")

    def _on_consume(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        cid, no_ack = struct.unpack_from(">IB", frame, 7)
        (name,), _ = unpack_strs(frame, 12, 1)
        if self._name_error(client, chid, reqid, name):
            return
        ch = self._channel(client, chid)
        q = self.queues.get(name)
        old = ch.consumers.pop(cid, None)
        if old is not None:
            self._remove_consumer(old)
        try:
            if q is None:  # consuming creates the queue, as kombu's virtual transports do
                q = self._new_queue(name, client.peer)
            self._new_object("consumer", client.peer)
        except _ResourceLimit as exc:
            self._limit_error(client, chid, reqid, exc)
            return
        consumer = Consumer(cid, ch, q, bool(no_ack))
        ch.consumers[cid] = consumer
        q.consumers.append(consumer)
        q.had_consumers = True
        self._reply(client, chid, reqid)
        if q.messages:
            self._dirty_queues.add(q)

    def _on_exchange_declare(self, client: Client, frame):
        chid, reqid, flags, (name, type_), _ = unpack_flagged(frame, 2)
        type_ = type_ or b"direct"
        ex = self.exchanges.get(name)
        if flags & F_PASSIVE:
            if ex is None:
                self._error(client, chid, reqid, STATUS_NOT_FOUND,
                            f"NOT_FOUND - no exchange {name.decode(errors='replace')!r}")
            else:
                self._reply(client, chid, reqid)
            return
        if self._name_error(client, chid, reqid, name):
            return
        if type_ not in EXCHANGE_TYPES:
            self._error(client, chid, reqid, STATUS_PRECONDITION,
                        f"exchange type {type_.decode(errors='replace')!r} not supported "
                        "(direct, topic, fanout)")
            return
        if ex is None:
            try:
                self._new_object("exchange", client.peer)
            except _ResourceLimit as exc:
                self._limit_error(client, chid, reqid, exc)
                return
            self.exchanges[name] = Exchange(name, type_, client.peer)
        elif ex.type != type_:
            self._error(client, chid, reqid, STATUS_PRECONDITION,
                        f"PRECONDITION_FAILED - exchange {name.decode(errors='replace')!r} "
                        f"is {ex.type.decode()}, not {type_.decode(errors='replace')}")
            return
        self._reply(client, chid, reqid)

    def _on_exchange_delete(self, client: Client, frame):
        chid, reqid, (name,), _ = unpack_named(frame, 1)
        ex = self.exchanges.pop(name, None)
        if ex is not None:
            self._free_object(ex.creator)
            for key, queues in ex.bindings.items():
                for q in queues:
                    if (name, key) in q.bindings:
                        self._free_object(q.bindings.pop((name, key)))
            self._forget_routes()
        self._reply(client, chid, reqid)

    def _on_queue_declare(self, client: Client, frame):
        chid, reqid, flags, (name,), pos = unpack_flagged(frame, 1)
        max_messages = max_bytes = 0
        if len(frame) >= pos + QUEUE_LIMITS.size:
            max_messages, max_bytes = QUEUE_LIMITS.unpack_from(frame, pos)
        q = self.queues.get(name)
        if q is None:
            if flags & F_PASSIVE:
                self._error(client, chid, reqid, STATUS_NOT_FOUND,
                            f"NOT_FOUND - no queue {name.decode(errors='replace')!r}")
                return
            if self._name_error(client, chid, reqid, name):
                return
            try:
                q = self._new_queue(name, client.peer, auto_delete=bool(flags & F_AUTO_DELETE),
                                    owner=client if flags & F_EXCLUSIVE else None)
            except _ResourceLimit as exc:
                self._limit_error(client, chid, reqid, exc)
                return
        if max_messages:
            q.max_messages = max_messages
        if max_bytes:
            q.max_bytes = max_bytes
        if max_messages or max_bytes:
            self._freed = True  # a raised limit may let held publishes go on
        self._reply(client, chid, reqid, STATUS_OK,
                    COUNTS.pack(len(q.messages), len(q.consumers)))

    def _on_queue_bind(self, client: Client, frame, unbind=False):
        chid, reqid, (qname, exname, key), _ = unpack_named(frame, 3)
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
            if self._name_error(client, chid, reqid, key):
                return
            wild = ex.type == b"topic" and key not in ex.patterns and is_wildcard(key)
            if wild and len(ex.patterns) >= self.limits.max_topic_wildcards:
                # Each is matched on every publish with a new key: bounded work per publish.
                self._error(client, chid, reqid, STATUS_PRECONDITION,
                            f"PRECONDITION_FAILED - exchange "
                            f"{exname.decode(errors='replace')!r} has {len(ex.patterns)} "
                            f"wildcard bindings (max_topic_wildcards="
                            f"{self.limits.max_topic_wildcards}); bind without '*'/'#', or "
                            "raise the broker's --max-topic-wildcards")
                return
            try:
                self._new_object("binding", client.peer)
            except _ResourceLimit as exc:
                self._limit_error(client, chid, reqid, exc)
                return
            q.bindings[(exname, key)] = client.peer
            ex.bindings.setdefault(key, []).append(q)
            if wild:
                ex.patterns[key] = TopicPattern(key)
            self._forget_routes()
        self._reply(client, chid, reqid)

    def _on_queue_unbind(self, client: Client, frame):
        self._on_queue_bind(client, frame, unbind=True)

    def _on_queue_purge(self, client: Client, frame):
        chid, reqid, (name,), _ = unpack_named(frame, 1)
        q = self.queues.get(name)
        count = self._drop_messages(q) if q is not None else 0
        self._reply(client, chid, reqid, STATUS_OK, U32.pack(count))

    def _on_queue_delete(self, client: Client, frame):
        chid, reqid, flags, (name,), _ = unpack_flagged(frame, 1)
        q = self.queues.get(name)
        count = 0
        if q is not None:
            if flags & F_IF_UNUSED and q.consumers or flags & F_IF_EMPTY and q.messages:
                self._reply(client, chid, reqid, STATUS_OK, U32.pack(0))
                return
            count = self._delete_queue(q)
        self._reply(client, chid, reqid, STATUS_OK, U32.pack(count))

    def _on_get(self, client: Client, frame):
        chid, reqid, no_ack, (name,), _ = unpack_flagged(frame, 1)
        q = self.queues.get(name)
        if q is None or not q.messages:
            self._reply(client, chid, reqid, STATUS_EMPTY)
            return
        payload, redelivered, key = q.messages.popleft()
        size = len(payload)
        q.bytes -= size
        self._freed = True
        tag = 0
        if not no_ack:
            ch = self._channel(client, chid)
            ch.next_tag = tag = ch.next_tag + 1
            ch.unacked[tag] = (q, payload, key)
            client.unacked += 1   # counted in its share; a get is never held back by it
            client.unacked_bytes += size + MSG_OVERHEAD
        else:
            client.held_out += size + MSG_OVERHEAD
            self._release(key, size + MSG_OVERHEAD)
        # Header and payload as two pieces: the payload is not copied.
        head = GET_OK.pack(tag, redelivered)
        client.out.append(REPLY_HEAD.pack(REPLY_BODY_HEAD + len(head) + size, OP_REPLY, chid,
                                          reqid, STATUS_OK) + head)
        client.out.append(payload)
        client.outlen += REPLY_HEAD.size + len(head) + size
        self._dirty_clients.add(client)

    def _on_recover(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        ch = client.channels.get(chid)
        if ch is not None:
            self._requeue_unacked(ch)
        self._reply(client, chid, reqid)

    def _on_heartbeat(self, client: Client, frame):
        pass   # reading it is the point: client.last_in moved (Broker._housekeeping)

    def _on_ping(self, client: Client, frame):
        _, chid, reqid = RPC_HEAD.unpack_from(frame, 0)
        self._reply(client, chid, reqid, STATUS_OK,
                    COUNTS.pack(len(self.queues), len(self.clients)))
