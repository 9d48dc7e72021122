"""The consuming end of a fifo queue, held by one process: :class:`_Inbox` (the pipe's
read end, its lock file, the frames read and not yet handed over), its pipe size, and
letting it go (:func:`_close_inbox`, which logs what that loses)."""
from __future__ import annotations

import fcntl
import os
import struct
import termios
import threading
from collections import deque

from kombu.log import get_logger

from . import framing
from .chunking import PIPE_BUF

logger = get_logger("transports.fifo")
_INT = struct.Struct("i")


def _set_pipe_size(fd, size):
    """Ask for ``size`` bytes of pipe, else the most an unprivileged process may have."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
        return
    except OSError:
        pass
    try:
        with open("/proc/sys/fs/pipe-max-size") as fh:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(size, int(fh.read())))
    except (OSError, ValueError):
        pass  # keep the kernel's default capacity


class _Inbox:
    """The consuming end of one queue's FIFO, held by this process.

    One per queue per process, shared by the connections of the process that
    hold it (a Celery client declares its reply queue on the publishing
    connection and consumes it on another); only one of them may consume.
    """

    __slots__ = ("key", "queue", "fifo_path", "lock_path", "bindings_path", "rfd", "wfd",
                 "lockfd", "ino", "pid", "reader", "frames", "requeued", "partials", "channel",
                 "holders", "reg", "lock", "stopped")

    def __init__(self, key, queue, fifo_path, lock_path, bindings_path):
        self.key = key
        self.queue = queue
        self.fifo_path = fifo_path
        self.lock_path = lock_path
        self.bindings_path = bindings_path
        self.rfd = self.wfd = self.lockfd = -1
        self.ino = None
        self.pid = os.getpid()
        self.reader = framing.FrameReader(PIPE_BUF)  # every frame is one write <= PIPE_BUF
        self.frames = deque()      # whole message payloads, not yet decoded
        self.requeued = deque()    # decoded messages put back by reject(requeue=True)
        self.partials = {}         # stream id -> bytearray of a chunked message
        self.channel = None        # the consuming channel (its QoS limits delivery)
        self.holders = set()       # transports of this process holding the queue
        self.reg = None            # (loop, transport) while the read end is in an event loop
        self.lock = threading.Lock()  # parsing: the consumer, or a producer of this process
        self.stopped = False       # consumer cancelled: read nothing more from the pipe

    def pending(self) -> bool:
        return bool(self.requeued or self.frames)


def _close_inbox(inbox, unlink):
    if inbox.reg is not None:
        inbox.reg[0].remove_reader(inbox.rfd)
        inbox.reg = None
    if unlink and inbox.pid == os.getpid():
        _report_loss(inbox)
        # New producers get ENOENT first, then ones holding the pipe get EPIPE.
        try:
            if inbox.ino is not None and os.stat(inbox.fifo_path).st_ino == inbox.ino:
                os.unlink(inbox.fifo_path)
        except FileNotFoundError:
            pass
        try:
            os.unlink(inbox.bindings_path)
        except FileNotFoundError:
            pass
        if inbox.lockfd >= 0:
            try:
                os.unlink(inbox.lock_path)  # still holding the lock: see _lock_queue
            except FileNotFoundError:
                pass
    for name in ("rfd", "wfd", "lockfd"):
        fd = getattr(inbox, name)
        if fd >= 0:
            setattr(inbox, name, -1)
            try:
                os.close(fd)
            except OSError:
                pass
    inbox.frames.clear()
    inbox.requeued.clear()
    inbox.partials.clear()


def _report_loss(inbox):
    """Say what closing the queue loses: messages read and never handed over, and the
    bytes still in the pipe (at-most-once: nobody else can have them)."""
    unread = 0
    if inbox.rfd >= 0:
        try:
            unread = _INT.unpack(fcntl.ioctl(inbox.rfd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            pass
    read = len(inbox.frames) + len(inbox.requeued)
    if unread or read:
        logger.warning("fifo queue %r let go with %d messages read but not handed over and "
                       "%d bytes still in its pipe: they are lost (at-most-once)",
                       inbox.queue, read, unread)
