"""Our ``unix`` transport: a private broker subprocess (transports.broker) per environment."""
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .. import children
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


def _start(path: Path, folder: Path):
    """Our broker subprocess, registered with the one owner of children (bench.children):
    transports/ imports nothing from bench, so the harness adopts what it started, and the
    broker is stopped with the rest at exit and on SIGTERM/SIGHUP (it is in a session, so
    a process group, of its own)."""
    from transports import broker as unix_broker

    started = unix_broker.start(str(path), log_path=folder / "broker.log")
    children.OWNER.register(children.Adopted(children.OWNER, started.proc))
    return started


def _stop(started) -> None:
    started.stop()
    children.OWNER.release(started.pid)


@contextmanager
def broker(workdir):
    folder = _private_dir(Path(workdir))
    path = folder / "broker.sock"
    running = [_start(path, folder)]

    def restart(down_s: float = 0.0) -> None:
        """Stop our broker (its queues are in memory: all lost) and start a new one on the
        same socket path, as a restarted broker would be (the faults scenario)."""
        _stop(running[0])
        if down_s > 0:
            time.sleep(down_s)
        running[0] = _start(path, folder)

    try:
        yield BrokerEnv(f"unix://{path}", {}, restart=restart)
    finally:
        # Runs on KeyboardInterrupt too: SIGTERM, then SIGKILL after 5 s.
        _stop(running[0])
        if not str(folder).startswith(str(Path(workdir))):
            shutil.rmtree(folder, ignore_errors=True)
