"""Kombu's filesystem transport over a private temporary folder."""
from contextlib import contextmanager

from . import BrokerEnv

NAME = "filesystem"
SERVICE = None
CROSS_PROCESS = True
SUPPORTS_BATCH = False
# A queue keeps what was published before its consumer attached (a backlog can be prefilled).
HOLDS_BACKLOG = True
# Kombu lists and sorts the whole folder per get: draining a backlog is quadratic in it
# (~1,000/s at 2,000 queued, ~170/s at 11,000), so benchmarks queue at most this many.
MAX_BACKLOG = 2_000
CAPABILITIES = {"ack", "requeue", "size", "purge", "multi_producer", "cross_process"}


@contextmanager
def broker(workdir):
    folder = workdir / "filesystem-broker"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # control_folder holds fanout bindings; kombu defaults it to ./control in the cwd.
    opts = {"data_folder_in": str(folder), "data_folder_out": str(folder),
            "control_folder": str(folder / "control"),
            "store_processed": False, "polling_interval": 0.01}
    yield BrokerEnv("filesystem://", opts, description=f"kombu filesystem transport in {folder}")
