"""Running a broker: :func:`serve` / :func:`main` in the foreground, :func:`start` /
:func:`running` as a subprocess ready when its socket accepts, and the ``python -m transports.broker`` command line (:func:`_cli`)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from ..protocol import socket_path_from_url
from .model import DEFAULT_COALESCE_S, DERIVED, Limits
from .loop import Broker, _socket_accepts


def _size(text: str) -> int:
    """``8MiB``, ``512M``, ``65536`` -> bytes (CLI)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (like 8MiB, 512M, 65536)") from None


# -- entry points ---------------------------------------------------------------------------


def serve(path: str, *, watch_parent: bool = False, install_signals: bool = True,
          coalesce: float = DEFAULT_COALESCE_S, limits: Limits | None = None,
          measure_turns: bool = False) -> None:
    """Serve the socket at ``path`` until SIGINT/SIGTERM (or the parent exits)."""
    broker = Broker(path, watch_parent=watch_parent, coalesce=coalesce, limits=limits,
                    measure_turns=measure_turns)
    try:
        broker.listen()
    except OSError as exc:  # e.g. a directory we may not write: the user's to fix
        raise ValueError(f"cannot serve on {path}: {exc.strerror or exc}") from None
    print(f"unix broker listening on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    broker.serve_forever(install_signals=install_signals)
    print("unix broker stopped", file=sys.stderr, flush=True)


def main(url: str, *, watch_parent: bool = False, coalesce: float = DEFAULT_COALESCE_S,
         measure_turns: bool = False, **settings) -> int:
    """``celery-bench broker unix:///abs/path.sock``: run in the foreground.

    ``settings`` are :class:`Limits` fields. Raises ValueError with a one-line reason for
    a bad URL, a bad setting or an unsafe directory.
    """
    limits = Limits(**settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    serve(socket_path_from_url(url), watch_parent=watch_parent, coalesce=coalesce,
          limits=limits, measure_turns=measure_turns)
    return 0


class BrokerProcess:
    """A broker subprocess the harness started; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, path: str, proc: subprocess.Popen, log_path: Path | None):
        self.path = path
        self.url = f"unix://{path}"
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start(path: str, *, timeout: float = 10.0, log_path: Path | None = None,
          coalesce: float = DEFAULT_COALESCE_S, preexec_fn=None, measure_turns: bool = False,
          **settings) -> BrokerProcess:
    """Start ``python -m transports.broker unix://PATH`` and wait until the socket accepts.

    ``settings`` are :class:`Limits` fields (``max_queue_messages=1000``...). The broker
    exits by itself if this process dies (``--watch-parent``).
    """
    path = socket_path_from_url(path)
    limits = Limits(**settings)
    project_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        # Own session: a terminal Ctrl-C reaches the harness, which stops us in order.
        proc = subprocess.Popen(
            [sys.executable, "-m", "transports.broker", f"unix://{path}", "--watch-parent",
             "--coalesce-us", f"{coalesce * 1e6:g}", *limits.flags(),
             *(["--measure-turns"] if measure_turns else [])],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
            start_new_session=True, preexec_fn=preexec_fn)
    finally:
        if log_path:
            log_file.close()
    broker = BrokerProcess(path, proc, Path(log_path) if log_path else None)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = broker.log_tail()
            raise RuntimeError(f"unix broker for {path} exited with code {proc.returncode}"
                               + (f": {tail}" if tail else ""))
        if _socket_accepts(path):
            return broker
        if time.monotonic() >= deadline:
            broker.stop()
            raise TimeoutError(f"unix broker did not accept connections on {path} within "
                               f"{timeout:g}s")
        time.sleep(0.02)


@contextmanager
def running(path: str, **kwargs):
    """``with running('/dir/broker.sock') as b:`` a broker subprocess, always stopped."""
    broker = start(path, **kwargs)
    try:
        yield broker
    finally:
        broker.stop()


def _cli(argv=None, prog: str = "python -m transports.broker") -> int:
    """The broker's command line; ``celery-bench broker`` runs this too (same options)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2 (argparse adds a usage block)
            print(f"{prog}: error: {message} (--help lists the options)", file=sys.stderr)
            sys.exit(2)

    parser = Parser(
        prog=prog,
        description="Run the unix transport's broker in the foreground until SIGINT/SIGTERM.")
    parser.add_argument("url", help="unix:///abs/path/broker.sock")
    parser.add_argument("--watch-parent", action="store_true",
                        help="exit when the process that started this one goes away")
    parser.add_argument("--measure-turns", action="store_true",
                        help="log the most CPU time one loop turn took, at exit")
    parser.add_argument("--coalesce-us", type=float, default=DEFAULT_COALESCE_S * 1e6,
                        help="pause after a busy turn, microseconds (default %(default)g; 0 = off)")
    default = Limits()
    helps = {
        "max_frame": "largest frame (message + routing) a client may send, bytes",
        "max_queue_messages": "ready messages a queue holds before publishers wait",
        "max_queue_bytes": "ready payload bytes a queue holds before publishers wait",
        "max_memory": "bytes of messages held in all before every publisher waits",
        "max_connections": "connections served at once; more wait in the listen backlog",
        "max_objects": "queues + exchanges + bindings + channels + consumers",
        "max_topic_wildcards": "bindings with '*' or '#' per topic exchange (each is matched "
                               "on every publish with a new routing key)",
        "handshake_timeout": "seconds a new connection has to send its HELLO",
        "idle_timeout": "close a connection silent this long, seconds (0 = never)",
        "frame_timeout": "close a connection whose big frame (holding its share of "
                         "max_memory) is not all there this long after it began, seconds "
                         "(0 = never)",
        "send_timeout": "disconnect a client that takes none of its output this long, seconds",
        "backlog": "listen backlog",
        "max_client_unacked": "unacknowledged messages one connection holds before its "
                              "deliveries pause (its share, not the whole max_memory)",
        "max_client_unacked_bytes": "bytes of unacknowledged messages one connection holds "
                                    "before its deliveries pause",
        "max_client_output": "unsent output of one connection before its deliveries pause, "
                             "bytes",
        # A client here is a process: its connections share one budget.
        "max_client_memory": "bytes of held messages one client process published before "
                             "its publishes wait (the others publish on)",
        "max_client_objects": "queues + exchanges + bindings + channels + consumers one "
                              "client process made that still exist; past it a declare is "
                              "refused",
        "max_process_reserved": "big-frame bytes the connections of one client process may "
                                "have reserved at once (at least --max-frame)",
    }
    def size(text):   # argparse prints this message, not "invalid _size value"
        try:
            return _size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    for f in fields(Limits):
        kind = float if f.type == "float" else size
        derived = DERIVED.get(f.name)   # None until Limits derives it from the others
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind,
                            default=None if derived else getattr(default, f.name),
                            help=f"{helps[f.name]} (default "
                                 f"{derived[1] if derived else '%(default)s'})")
    args = parser.parse_args(argv)
    if args.coalesce_us < 0:
        parser.error("--coalesce-us must be >= 0")
    settings = {f.name: getattr(args, f.name) for f in fields(Limits)}
    try:
        return main(args.url, watch_parent=args.watch_parent, coalesce=args.coalesce_us / 1e6,
                    measure_turns=args.measure_turns, **settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
