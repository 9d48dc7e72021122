"""Kombu's in-process memory transport: the ceiling for any real transport."""
from contextlib import contextmanager

from . import BrokerEnv, Transport

TRANSPORT = Transport(
    "memory", cross_process=False,
    capabilities={"ack", "requeue", "size", "purge", "fanout"})


@contextmanager
def broker(workdir):
    # polling_interval 0: a blocking drain returns at once instead of sleeping 1 s.
    # a hostname, though unused: kombu warns "No hostname was supplied" without one
    yield BrokerEnv("memory://localhost", {"polling_interval": 0.0})
