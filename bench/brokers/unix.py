"""Our ``unix`` transport: a private broker subprocess (transports.broker) per environment."""
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from . import BrokerEnv, Transport

TRANSPORT = Transport(
    "unix",
    supports_batch=True,  # transports.unix implements Producer.batch
    capabilities={"ack", "requeue", "size", "purge", "multi_consumer", "multi_producer", "confirm",
                  "fanout"})

# sun_path holds 107 bytes; a deep workdir falls back to a short private dir in /tmp.
_MAX_PATH = 100


def _private_dir(workdir: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="unix-broker-", dir=workdir))  # created 0700
    if len(str(folder / "broker.sock").encode()) > _MAX_PATH:
        shutil.rmtree(folder, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix="cb-unix-"))
    return folder


@contextmanager
def broker(workdir):
    from transports import broker as unix_broker

    folder = _private_dir(Path(workdir))
    path = folder / "broker.sock"
    running = [unix_broker.start(str(path), log_path=folder / "broker.log")]

    def restart(down_s: float = 0.0) -> None:
        """Stop our broker (its queues are in memory: all lost) and start a new one on the
        same socket path, as a restarted broker would be (the faults scenario)."""
        running[0].stop()
        if down_s > 0:
            time.sleep(down_s)
        running[0] = unix_broker.start(str(path), log_path=folder / "broker.log")

    try:
        yield BrokerEnv(f"unix://{path}", {}, restart=restart)
    finally:
        # Runs on KeyboardInterrupt too: SIGTERM, then SIGKILL after 5 s.
        running[0].stop()
        if not str(folder).startswith(str(Path(workdir))):
            shutil.rmtree(folder, ignore_errors=True)
