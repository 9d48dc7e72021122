"""The fifo transport's errors (each says what to do) and its option parsing."""
from __future__ import annotations

from kombu.exceptions import ChannelError


class FifoError(ChannelError):
    """A fifo transport failure with a message that says what to do."""


class NoConsumerError(FifoError):
    """Publish to a queue that has no consumer attached."""


class QueueBusyError(FifoError):
    """A second consumer for a queue that already has one."""


class PublishTimeout(FifoError):
    """The consumer is attached but its pipe stayed full."""


def _option(opts, name, kind, default):
    value = opts.get(name)
    if value is None:
        return default
    try:
        value = kind(value)
    except (TypeError, ValueError):
        value = -1
    if value < 0:
        raise FifoError(f"fifo transport option {name}={opts.get(name)!r}: expected a "
                        f"non-negative {kind.__name__}")
    return value
