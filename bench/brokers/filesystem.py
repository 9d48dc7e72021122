"""Kombu's filesystem transport over a private temporary folder."""
from contextlib import contextmanager

from . import BrokerEnv, Transport

TRANSPORT = Transport(
    "filesystem",
    # Kombu lists and sorts the whole folder per get: draining a backlog is quadratic in it
    # (~1,000/s at 2,000 queued, ~170/s at 11,000), so benchmarks queue at most this many.
    max_backlog=2_000,
    slow="kombu lists and sorts the whole folder per message (~1k msg/s): full runs only",
    known_loss=("kombu's filesystem consumer reads a message file without the writer's lock "
                "and sometimes drops it under a concurrent consumer (0.3-1% here)"),
    capabilities={"ack", "requeue", "size", "purge", "multi_producer"})


@contextmanager
def broker(workdir):
    folder = workdir / "filesystem-broker"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # control_folder holds fanout bindings; kombu defaults it to ./control in the cwd.
    opts = {"data_folder_in": str(folder), "data_folder_out": str(folder),
            "control_folder": str(folder / "control"),
            "store_processed": False, "polling_interval": 0.01}
    yield BrokerEnv("filesystem://", opts)
