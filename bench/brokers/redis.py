"""Redis (CELERY_BENCH_REDIS_URL, default redis://127.0.0.1:6379/0)."""
from contextlib import contextmanager

from .. import config
from . import BrokerEnv, Transport

TRANSPORT = Transport(
    "redis", service="redis",
    supports_batch=True,  # kombu 5.7 implements Producer.batch for redis only
    capabilities={"ack", "requeue", "size", "purge", "multi_consumer", "multi_producer",
                  "fanout", "disable_prefetch"})


@contextmanager
def broker(workdir):
    yield BrokerEnv(config.service_url("redis"), {"polling_interval": 0.01})
