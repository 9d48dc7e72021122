"""The fifo transport's producer side: writing a message into a queue's pipe in
writes of at most ``PIPE_BUF`` (chunked when larger), waiting ``write_timeout`` on a
full pipe and ``publish_timeout`` for a consumer, the open write ends it keeps."""
from __future__ import annotations

import errno
import os
import select
import signal
import stat
import time

from kombu.log import get_logger

from . import chunking, framing
from .chunking import MAX_WHOLE

from .fifo_errors import FifoError, NoConsumerError, PublishTimeout

logger = get_logger("transports.fifo")
_OPEN_WRITE = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
_MAX_OUTBOXES = 512
_pack = framing.HEADER.pack
_write = os.write


class Outboxes:
    """Write ends of queues' pipes (a mixin of :class:`transports.fifo.Transport`)."""

    def _send(self, queue, payload, missing_ok):
        """Write one encoded message into ``queue``'s pipe, in writes of <= PIPE_BUF."""
        n = len(payload)
        if n <= MAX_WHOLE:
            fd = self._outboxes.get(queue)
            if fd is not None:
                try:
                    _write(fd, _pack(n) + payload)  # atomic: <= PIPE_BUF, all or nothing
                    return
                except OSError:
                    pass  # full pipe or consumer gone: the slow path sorts it out
            self._write_frames(queue, [_pack(n) + payload], missing_ok)
            return
        if n > framing.MAX_FRAME:
            raise FifoError(f"message of {n} bytes exceeds the fifo limit ({framing.MAX_FRAME})")
        frames = chunking.split(payload, self._sid)
        with self._chunk_lock:  # one stream id per transport: chunks of two threads must not mix
            self._write_frames(queue, frames, missing_ok)

    def _write_frames(self, queue, frames, missing_ok):
        write_deadline = None
        reopened = False
        i = 0
        while i < len(frames):
            fd = self._outboxes.get(queue)
            if fd is None:
                fd = self._open_outbox(queue, missing_ok)
                if fd is None:
                    return  # broadcast to a queue whose consumer is gone
            try:
                written = _write(fd, frames[i])
            except BlockingIOError:
                own = self._own_inbox(queue)
                if own is not None and own.rfd >= 0 and self._fill(own, bulk=True):
                    # We consume this queue ourselves: waiting would deadlock, so move
                    # the pipe's content into our own buffer instead.
                    continue
                if write_deadline is None:
                    write_deadline = time.monotonic() + self.write_timeout
                self._wait_writable(queue, fd, write_deadline)
                continue
            except BrokenPipeError:
                # The consumer detached or died: a new one may hold a new pipe.
                self._drop_outbox(queue)
                if reopened:
                    if missing_ok:
                        return
                    raise NoConsumerError(self._no_consumer(queue)) from None
                reopened = True
                i = 0  # a chunked message starts over in the new pipe
                continue
            if written != len(frames[i]):  # cannot happen for <= PIPE_BUF; never corrupt
                raise FifoError(f"short write ({written} of {len(frames[i])}) on {queue!r}")
            i += 1

    def _wait_writable(self, queue, fd, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PublishTimeout(
                f"fifo queue {queue!r}: the consumer is not reading (pipe full for "
                f"{self.write_timeout:g} s); raise transport option write_timeout or speed "
                f"up the consumer")
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        poller.poll(remaining * 1000.0)

    def _open_outbox(self, queue, missing_ok):
        if not self._sigpipe_checked:
            self._sigpipe_checked = True
            if signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL:
                logger.warning("fifo transport: SIGPIPE is not ignored in this process, so a "
                               "publish racing a consumer that leaves kills it; Python ignores "
                               "SIGPIPE unless something restored the default")
        path = self._path(queue, ".fifo")
        deadline = None
        delay = 0.001
        while True:
            if self._check_directory(create=False):
                try:
                    fd = os.open(path, _OPEN_WRITE)
                except OSError as exc:
                    if exc.errno not in (errno.ENXIO, errno.ENOENT):
                        raise FifoError(f"cannot open fifo for queue {queue!r}: {exc}") from None
                else:
                    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                        os.close(fd)
                        raise FifoError(f"{path} is not a FIFO")
                    if len(self._outboxes) >= _MAX_OUTBOXES:
                        self._close_outboxes()
                    self._outboxes[queue] = fd
                    return fd
            if missing_ok:
                return None
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.publish_timeout
            if now >= deadline:
                raise NoConsumerError(self._no_consumer(queue))
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.05)

    def _no_consumer(self, queue):
        waited = (f" within publish_timeout={self.publish_timeout:g} s"
                  if self.publish_timeout else "")
        return (f"no consumer attached to fifo queue {queue!r} in {self.directory}{waited}: "
                f"start the consumer first, or set transport option publish_timeout to wait")

    def _drop_outbox(self, queue):
        fd = self._outboxes.pop(queue, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _close_outboxes(self):
        for queue in list(self._outboxes):
            self._drop_outbox(queue)
