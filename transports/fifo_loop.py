"""The fifo transport's hooks into Celery's event loop (kombu's ``Hub``): a queue's read
end is watched only while it can take more, buffered messages are delivered from the
loop's poll through a wake-up pipe, and both are undone when the connection closes.
A mixin of :class:`transports.fifo.Transport`, which owns the inboxes and ``_take``.
"""
from __future__ import annotations

import os


class EventLoopHooks:
    """``register_with_event_loop`` and what it installs (``_loop``, the wake pipe)."""

    def register_with_event_loop(self, connection, loop):
        self._loop = loop
        # Buffered messages are in memory, not in a pipe, so readiness will not announce
        # them. Delivering them from the tick callback runs after the loop chose its poll
        # timeout: with the solo pool the tasks' acks then wait for that timeout (1 s
        # with no timers). The tick pokes this pipe instead, and delivery runs from poll().
        if self._wake_r is None:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._wake_r, self._on_wake)
        loop.on_tick.add(self._on_tick)

    def _on_wake(self, *args):
        try:
            os.read(self._wake_r, 512)
        except (BlockingIOError, TypeError):
            pass
        self._wake_armed = False
        for inbox in list(self._inboxes.values()):
            if inbox.rfd >= 0 and inbox.pending():
                self._pump(inbox)

    def on_readable(self, fd):
        """The read end of a queue is readable: read once, deliver what prefetch allows."""
        inbox = self._by_fd.get(fd)
        if inbox is not None:
            self._fill(inbox)
            self._pump(inbox)

    def _pump(self, inbox):
        callbacks = self._callbacks
        while inbox.pending() and self._deliverable(inbox):
            raw = self._take(inbox)
            if raw is None:
                break
            callbacks[inbox.queue](raw)
            if inbox.rfd < 0:
                break  # the callback closed the connection

    def _on_tick(self):
        """Each loop turn: deliver what is buffered, read only queues that can take more."""
        loop = self._loop
        if loop is None:
            return
        wake = False
        for inbox in list(self._inboxes.values()):
            if inbox.rfd < 0:
                continue
            if inbox.pending():
                wake = wake or self._deliverable(inbox)
            want = not inbox.pending() and self._deliverable(inbox)
            if want and inbox.reg is None:
                loop.add_reader(inbox.rfd, self.on_readable, inbox.rfd)
                inbox.reg = (loop, self)
            elif not want and inbox.reg is not None and inbox.reg[1] is self:
                loop.remove_reader(inbox.rfd)
                inbox.reg = None
        if wake and not self._wake_armed:
            self._wake_armed = True
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass

    def _leave_loop(self):
        """Undo :meth:`register_with_event_loop` (the wake pipe stays until ``_close_wake``)."""
        if self._loop is not None:
            self._loop.on_tick.discard(self._on_tick)
            if self._wake_r is not None:
                try:
                    self._loop.remove_reader(self._wake_r)
                except Exception:  # the loop may be closing already
                    pass

    def _close_wake(self):
        if self._wake_r is not None:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None
        self._wake_armed = False
