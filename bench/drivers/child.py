"""A helper process that talks to the harness in lines: ``python -m MODULE``.

The parent writes the child's JSON spec as the first line of its stdin, then orders;
the child answers on stdout. Every wait has a timeout. The child is started and
registered through :mod:`bench.children` (its own process group, stopped at exit);
:meth:`LineChild.stop` always ends it (EOF, then SIGTERM to its group, then SIGKILL).
"""
from __future__ import annotations

import json
import os
import queue as queue_mod
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import children

STOP_GRACE_S = 0.5        # how long a child may take to close after EOF before SIGTERM
TERM_GRACE_S = 3.0        # then how long after SIGTERM before SIGKILL


class LineChild:
    MAIN = ""            # the child's module, run as ``python -m MAIN``
    ROLE = "child"       # names its stderr file

    def __init__(self, spec: dict, workdir: Path, timeout: float):
        self.spec = spec
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.proc = None
        self._lines: queue_mod.Queue = queue_mod.Queue()
        self._stderr = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.workdir / f"{self.ROLE}.stderr", "w+")
        self.proc = children.spawn(
            self.argv(), stdin=subprocess.PIPE, cwd=self.cwd(),
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1,
            env=self.environment())
        self.pid = self.proc.pid
        children.OWNER.register(self)
        threading.Thread(target=self._read, daemon=True).start()
        self.send_line(json.dumps(self.spec))

    def argv(self) -> list[str]:
        """The child's command line (bench.variants runs another interpreter)."""
        return [sys.executable, "-m", self.MAIN]

    def cwd(self) -> str | None:
        return None

    def environment(self) -> dict:
        env = dict(os.environ)
        # Whatever this process can import (an --app module, the transports), the child can.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        return env

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def send_line(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child died: the next wait says why

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The rest of the child's next line that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.ROLE} process: no {prefix!r} within {timeout:g}s")
            try:
                line = self._lines.get(timeout=left)
            except queue_mod.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise RuntimeError(f"the {self.ROLE} process exited with code "
                                   f"{self.proc.returncode}; its last words: {self.stderr_tail()}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().strip().splitlines() if ln.strip()]
            return lines[-1] if lines else "(no output)"
        except (OSError, ValueError):
            return "(stderr unavailable)"

    def wait_ready(self) -> None:
        self.wait_for("ready", min(self.timeout, 30.0))

    # --- what bench.children.OWNER asks of a registered child (it stops us at exit)
    def terminate(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            children.kill_group(proc.pid, signal.SIGTERM)

    def stop(self, timeout: float | None = None) -> None:
        """EOF (the child exits on its own), then SIGTERM and SIGKILL to its group; within
        ``timeout`` seconds when given (the owner's shared exit deadline). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        eof_grace = STOP_GRACE_S if timeout is None else min(STOP_GRACE_S, timeout / 2)
        term_grace = TERM_GRACE_S if timeout is None else max(0.0, timeout - eof_grace)
        try:
            if proc.poll() is None:
                try:
                    proc.stdin.close()   # EOF: the child exits on its own
                except OSError:
                    pass
                try:
                    proc.wait(timeout=eof_grace)
                except subprocess.TimeoutExpired:
                    children.stop([proc], term_grace)
        finally:
            children.OWNER.release(proc.pid)
            for fh in (proc.stdin, proc.stdout, self._stderr):
                try:
                    fh.close()
                except Exception:
                    pass


def run_child(main) -> None:
    """A child's ``__main__``: run ``main()``, exit with its code without the interpreter's
    teardown (nothing is left to flush; a close could wait out a blocking poll)."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    os._exit(code)
