"""Kombu's in-process memory transport: the ceiling for any real transport."""
from contextlib import contextmanager

from . import BrokerEnv

NAME = "memory"
SERVICE = None
CROSS_PROCESS = False
SUPPORTS_BATCH = False
# A queue keeps what was published before its consumer attached (a backlog can be prefilled).
HOLDS_BACKLOG = True
MAX_BACKLOG = None  # no backlog size makes each message dearer
CAPABILITIES = {"ack", "requeue", "size", "purge", "fanout"}


@contextmanager
def broker(workdir):
    # polling_interval 0: a blocking drain returns at once instead of sleeping 1 s.
    yield BrokerEnv("memory://", {"polling_interval": 0.0}, cross_process=False,
                    description="kombu memory transport (in-process)")
