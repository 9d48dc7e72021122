"""Our ``fifo`` transport: one named pipe per queue in a private folder, no broker.

What a pipe can do, stated in CAPABILITIES (see transports/fifo.py for the rules):
one consumer process per queue (no ``multi_consumer``), at-most-once once read
(no ``ack``, no durable ``requeue``), a publish needs its consumer attached
first, size/purge only from the consuming process, fanout to the consumers
attached at publish time.
"""
import shutil
from contextlib import contextmanager
from urllib.parse import quote

import transports  # noqa: F401  registers the fifo:// alias wherever this env is used

from . import BrokerEnv

NAME = "fifo"
SERVICE = None
CROSS_PROCESS = True
SUPPORTS_BATCH = False
# size/purge: seen from the consuming process; fanout: to consumers attached at publish time.
# No consumer, no publish: a backlog exists only while its consumer reads (feed it instead).
HOLDS_BACKLOG = False
MAX_BACKLOG = None  # no backlog size makes each message dearer
CAPABILITIES = {"size", "purge", "multi_producer", "fanout", "cross_process"}


@contextmanager
def broker(workdir):
    folder = (workdir / "fifo-broker").resolve()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # mkdir's mode is masked by umask and ignored for an existing folder
    try:
        yield BrokerEnv(f"fifo://{quote(str(folder))}", {}, description=f"named pipes in {folder}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
