"""RabbitMQ over py-amqp (CELERY_BENCH_AMQP_URL, default amqp://guest:****@127.0.0.1:5672//)."""
from contextlib import contextmanager

from .. import config
from . import BrokerEnv, Transport

TRANSPORT = Transport(
    "amqp", service="amqp",
    # Celery 5.7's solo pool over py-amqp stalls in 10 s steps (an ack queued with call_soon
    # after the event loop chose its poll timeout; with the prefetch window used up RabbitMQ
    # sends nothing), so a 10,000-task cell cannot finish in time: Celery's bug, not ours.
    known_loss=("Celery's solo pool over amqp stalls in 10 s steps (an ack queued after the "
                "event loop chose its poll timeout): tasks not run within the timeout"),
    known_loss_when={"pool": "solo"},
    capabilities={"ack", "requeue", "size", "purge", "multi_consumer", "multi_producer", "confirm",
                  "fanout"})


@contextmanager
def broker(workdir):
    yield BrokerEnv(config.service_url("amqp"), {})
