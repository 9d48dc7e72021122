"""The fifo transport's Kombu channel: publishing straight into the queues' pipes
(direct routes cached, topic and fanout through the shared bindings), declaring and
binding (shared with other processes), consuming and rejecting."""
from __future__ import annotations

from queue import Empty

from kombu.log import get_logger
from kombu.transport import virtual
from kombu.transport.virtual.exchange import STANDARD_EXCHANGE_TYPES, TopicExchange

from . import framing

from .fifo_errors import QueueBusyError

logger = get_logger("transports.fifo")
_encode = framing.encode_message


class _FifoTopicExchange(TopicExchange):
    """Topic delivery that skips queues without a consumer (it is a broadcast)."""

    def deliver(self, message, exchange, routing_key, **kwargs):
        put = self.channel._put_broadcast
        deadletter = self.channel.deadletter_queue
        for queue in self.channel._lookup(exchange, routing_key):
            if queue and queue != deadletter:
                put(queue, message)


class Channel(virtual.Channel):
    """FIFO channel: ``_put`` writes a frame into the queue's pipe."""

    body_encoding = None
    do_restore = False          # a consumer that closes cannot hand messages back
    supports_fanout = True      # fanout goes through the shared bindings
    exchange_types = dict(STANDARD_EXCHANGE_TYPES, topic=_FifoTopicExchange)

    # -- publishing ---------------------------------------------------------
    def basic_publish(self, message, exchange, routing_key, **kwargs):
        if not exchange or self.body_encoding:
            return super().basic_publish(message, exchange, routing_key, **kwargs)
        # A direct exchange the publisher bound itself: the route is cached until any
        # binding of this connection changes, saving kombu's per-message table look-up.
        routes = self.connection._routes
        queues = routes.get((exchange, routing_key))
        if queues is None:
            etype = self.typeof(exchange)
            try:
                local = etype.lookup(self.get_table(exchange), exchange, routing_key, None)
            except KeyError:
                local = ()
            if not (local and etype.type == "direct"):
                return super().basic_publish(message, exchange, routing_key, **kwargs)
            queues = routes[(exchange, routing_key)] = tuple(local)
        info = message["properties"]["delivery_info"]
        info["exchange"] = exchange
        info["routing_key"] = routing_key
        payload = _encode(message)
        send = self.connection._send
        for queue in queues:
            send(queue, payload, False)

    def exchange_declare(self, *args, **kwargs):
        self.connection._routes.clear()
        return super().exchange_declare(*args, **kwargs)

    def exchange_delete(self, *args, **kwargs):
        self.connection._routes.clear()
        return super().exchange_delete(*args, **kwargs)

    def queue_bind(self, *args, **kwargs):
        self.connection._routes.clear()
        return super().queue_bind(*args, **kwargs)

    def _inplace_augment_message(self, message, exchange, routing_key):
        if self.body_encoding:
            return super()._inplace_augment_message(message, exchange, routing_key)
        # No base64, and no uuid delivery tag: the consumer numbers what it reads.
        info = message["properties"]["delivery_info"]
        info["exchange"] = exchange
        info["routing_key"] = routing_key

    def _put(self, queue, message, **kwargs):
        self.connection._send(queue, _encode(message), False)

    def _put_broadcast(self, queue, message):
        self.connection._send(queue, _encode(message), True)

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        payload = _encode(message)
        for queue in self._bound_queues(exchange, routing_key, "fanout"):
            self.connection._send(queue, payload, True)

    def _lookup(self, exchange, routing_key, default=None):
        if not exchange:
            return [routing_key or default or self.deadletter_queue]
        etype = self.typeof(exchange)
        try:
            local = etype.lookup(self.get_table(exchange), exchange, routing_key, default)
        except KeyError:
            local = ()
        if local and etype.type == "direct":
            return local  # the publisher's own bindings: no file system look-up
        return self._bound_queues(exchange, routing_key, None, local)

    def _bound_queues(self, exchange, routing_key, type_, local=None):
        if local is None:
            try:
                local = self.typeof(exchange).lookup(
                    self.get_table(exchange), exchange, routing_key, None)
            except KeyError:
                local = ()
        queues = set(local)
        shared = self.connection._shared_bindings().get(exchange)
        if shared:
            etype = self.exchange_types.get(type_ or shared[0])
            if etype is not None:
                queues.update(etype.lookup(shared[1], exchange, routing_key, None))
        return queues

    # -- declaring ----------------------------------------------------------
    def _new_queue(self, queue, **kwargs):
        if kwargs.get("auto_delete") or kwargs.get("exclusive"):
            try:
                self.connection._attach(queue, self)
            except QueueBusyError:
                pass  # another process consumes it: we are only declaring before a publish
            else:
                self.connection._declared.add(queue)  # held until its declarer lets go

    def _has_queue(self, queue, **kwargs):
        return self.connection._has_queue(queue)

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        self.connection._share_bindings(queue)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        self.connection._routes.clear()
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        self.connection._share_bindings(queue)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        """Let go of the queue (kombu calls ``_delete`` per binding, so not for a bare queue)."""
        if if_empty and self._size(queue):
            return
        self.connection._routes.clear()
        super().queue_delete(queue, if_unused=if_unused, **kwargs)
        self.connection._detach(queue)

    def _delete(self, queue, *args, **kwargs):
        self.connection._detach(queue)

    def _size(self, queue):
        return self.connection._size(queue)

    def _purge(self, queue):
        return self.connection._purge(queue)

    # -- consuming ----------------------------------------------------------
    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        self.connection._attach(queue, self, consume=True)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag):
        """Stop reading the queue's pipe and hand over what was read; when that was the
        queue's last consumer, let the queue go (close and unlink its pipe), so what is
        published from then on fails (:class:`NoConsumerError`, or waits
        ``publish_timeout`` for a new consumer) instead of filling a pipe nobody reads.
        Celery's warm shutdown and ``Consumer.cancel()`` come through here.

        A queue this connection declared ``auto_delete``/``exclusive`` (a reply or
        broadcast queue) stays held, unread, until its declarer lets go: a consumer of
        it may come back (Celery's rpc result consumer does)."""
        conn = self.connection
        queue = self._tag_to_queue.get(consumer_tag)
        if queue is None or conn is None:
            return super().basic_cancel(consumer_tag)
        callback = conn._callbacks.get(queue)
        read = conn._stop_reading(queue)
        super().basic_cancel(consumer_tag)
        if queue not in conn._callbacks and queue not in conn._declared:
            conn._detach(queue)  # before the hand-over: every write from now on fails
            conn._let_go.add(queue)
        if callback is not None:
            for raw in read:
                callback(raw)
        inbox = conn._inboxes.get(queue)
        if inbox is not None and queue not in conn._callbacks:
            inbox.stopped = False  # still held (declared): nothing reads it but basic_get

    def _get(self, queue, timeout=None):
        inbox = self.connection._attach(queue, self)
        raw = self.connection._take(inbox)
        if raw is None:
            raise Empty()
        return raw

    def _restore(self, message):
        """reject(requeue=True): back to the head of this process's buffer, never elsewhere."""
        raw = message.serializable()
        raw["redelivered"] = True
        info = message.delivery_info
        raw["properties"]["delivery_info"] = dict(info, redelivered=True)
        held = self.connection._inboxes
        for queue in sorted(self._lookup(info.get("exchange"), info.get("routing_key")) or ()):
            if queue in held:
                held[queue].requeued.appendleft(raw)
                return
        logger.warning("fifo: requeued message dropped: this process no longer holds its "
                       "queue (delivery is at-most-once)")

    def _restore_at_beginning(self, message):
        return self._restore(message)
