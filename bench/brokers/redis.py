"""Redis (CELERY_BENCH_REDIS_URL, default redis://127.0.0.1:6379/0)."""
from contextlib import contextmanager

from .. import config
from . import BrokerEnv

NAME = "redis"
SERVICE = "redis"
CROSS_PROCESS = True
SUPPORTS_BATCH = True  # kombu 5.7 implements Producer.batch for redis only
# A queue keeps what was published before its consumer attached (a backlog can be prefilled).
HOLDS_BACKLOG = True
MAX_BACKLOG = None  # no backlog size makes each message dearer
CAPABILITIES = {"ack", "requeue", "size", "purge", "multi_consumer", "multi_producer",
                "fanout", "cross_process"}


@contextmanager
def broker(workdir):
    yield BrokerEnv(config.service_url("redis"), {"polling_interval": 0.01},
                    description="redis server")
