"""RabbitMQ over py-amqp (CELERY_BENCH_AMQP_URL, default amqp://guest:****@127.0.0.1:5672//)."""
from contextlib import contextmanager

from .. import config
from . import BrokerEnv

NAME = "amqp"
SERVICE = "amqp"
CROSS_PROCESS = True
SUPPORTS_BATCH = False
# A queue keeps what was published before its consumer attached (a backlog can be prefilled).
HOLDS_BACKLOG = True
MAX_BACKLOG = None  # no backlog size makes each message dearer
CAPABILITIES = {"ack", "requeue", "size", "purge", "multi_consumer", "multi_producer",
                "fanout", "cross_process"}


@contextmanager
def broker(workdir):
    yield BrokerEnv(config.service_url("amqp"), {}, description="rabbitmq server")
