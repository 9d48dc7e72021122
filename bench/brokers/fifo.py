"""Our ``fifo`` transport: one named pipe per queue in a private folder, no broker.

What a pipe can do, stated in CAPABILITIES (the rules: docs/transports.md):
one consumer process per queue (no ``multi_consumer``), at-most-once once read
(no ``ack``, no durable ``requeue``), a publish needs its consumer attached
first, size/purge only from the consuming process, fanout to the consumers
attached at publish time.
"""
import shutil
from contextlib import contextmanager
from urllib.parse import quote

import transports  # noqa: F401  registers the fifo:// alias wherever this env is used

from . import BrokerEnv, Transport

TRANSPORT = Transport(
    "fifo",
    # No consumer, no publish: a backlog exists only while its consumer reads (feed it).
    holds_backlog=False,
    # size/purge: seen from the consuming process; fanout: to consumers attached at
    # publish time; one consumer process per queue, at-most-once once read.
    capabilities={"size", "purge", "multi_producer", "fanout"},
    shutdown_loss="a warm shutdown loses what is in the worker's pipe when it starts: ~1 task "
                  "for a paced publisher, the pipe's contents (up to pipe_size, 1 MiB: ~1,000 "
                  "tasks) for a backlogged stream (docs/transports.md)")

# A publisher blocked on a full pipe gives up after this long: a consumer that reads empties
# a full pipe in well under a second, so a longer block means it stopped reading.
WRITE_TIMEOUT_S = 3.0


@contextmanager
def broker(workdir):
    folder = (workdir / "fifo-broker").resolve()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # mkdir's mode is masked by umask and ignored for an existing folder
    try:
        yield BrokerEnv(f"fifo://{quote(str(folder))}", {"write_timeout": WRITE_TIMEOUT_S})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
