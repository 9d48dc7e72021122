"""Progress of a run: which cell is running, for how long, and when the run will end.

``celery-bench run`` drives one :class:`Progress`::

    progress = Progress(quiet=quiet)           # stream: sys.stderr by default
    progress.start(total_runs, rounds=repeat, plan={"publish": 30, "join": 24})
    progress.cell_started("publish", params, round_)   # runner's on_cell_start
    progress.cell_done(cell)                            # runner's on_cell
    progress.close()                                    # also on Ctrl-C (a with block)

On a terminal the bottom line says ``[14/62] join backend=redis ... round 2/3 ·
0:42 in cell · run 6:12 · ~14 min left`` and finished cells scroll above it. Under
``--quiet`` or into a pipe (CI logs) it prints one plain line per finished cell.

Not perturbing the measurement: the measuring process draws nothing on a timer. It
writes one short message to a pipe when a cell starts or ends (moments that are not
measured); a helper process (the *ticker*, this file run as a script, standard library
only, ``nice`` 10) owns the status line and redraws its clocks once a second. So no
thread of the measuring process wakes up, or asks for the GIL, inside a measured loop;
the only cost left is a 1 Hz process that runs for well under a millisecond each time,
which the scheduler gives way to the measured processes (nice 10). Where the ticker
cannot start, the line is redrawn on events only (the clocks then move when a cell ends).
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

TICK_S = 1.0
CLEAR = "\r\x1b[2K"


def clock(seconds: float) -> str:
    """``0:42``, ``6:12``, ``1:02:03``."""
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def human(seconds: float) -> str:
    """An estimate, as rough as it is: ``40 s``, ``14 min``, ``1 h 05 min``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def estimate_left(durations: dict, remaining: dict) -> float | None:
    """Seconds left: each scenario's remaining cell runs at that scenario's mean measured
    duration so far (the run's mean for a scenario not started yet). None before the
    first measured cell. ``durations``: scenario -> [seconds]; ``remaining``: scenario ->
    runs (key ``None`` for runs of unknown scenarios)."""
    every = [d for ds in durations.values() for d in ds]
    if not every:
        return None
    overall = sum(every) / len(every)
    total = 0.0
    for scenario, n in remaining.items():
        own = durations.get(scenario)
        total += max(0, n) * (sum(own) / len(own) if own else overall)
    return total


class Progress:
    """See the module's docstring. ``clock_fn`` is for tests (wall seconds)."""

    def __init__(self, quiet: bool = False, stream=None, clock_fn=time.time,
                 ticker: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.now = clock_fn
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.live = tty and not quiet
        self.use_ticker = ticker
        self.total = 0
        self.rounds = 1
        self.done = 0
        self.remaining: dict = {}
        self.durations: dict[str, list] = {}
        self.run_t0 = None
        self.cell_t0 = None
        self.current = None          # (scenario, params, round)
        self._ticker = None

    # ------------------------------------------------------------------ events
    def start(self, total_runs: int, rounds: int = 1, plan: dict | None = None) -> None:
        """``total_runs``: cell runs ahead (cells x rounds); ``rounds``: --repeat, so a cell
        skipped in round 1 drops its later rounds from the count; ``plan``: runs per
        scenario (cells x rounds), for a per-scenario ETA."""
        self.total, self.rounds = int(total_runs), max(1, int(rounds))
        self.remaining = dict(plan) if plan else {None: self.total}
        self.run_t0 = self.now()
        if self.live and self.use_ticker:
            self._ticker = _start_ticker(self.stream)
        self._status()

    def cell_started(self, scenario: str, params: dict, round: int) -> None:
        self.current = (scenario, dict(params), int(round))
        self.cell_t0 = self.now()
        self._status()

    def cell_done(self, cell) -> None:
        from .report import cell_line

        elapsed = self.now() - self.cell_t0 if self.cell_t0 is not None else 0.0
        round_ = self.current[2] if self.current else 0
        self.done += 1
        key = cell.scenario if cell.scenario in self.remaining else None
        self.remaining[key] = self.remaining.get(key, 0) - 1
        if cell.status in ("skipped", "failed"):
            # the runner does not run it again in later rounds
            later = self.rounds - 1 - round_
            self.total -= later
            self.remaining[key] = self.remaining.get(key, 0) - later
        else:
            self.durations.setdefault(cell.scenario, []).append(elapsed)
        self.current, self.cell_t0 = None, None
        self._status()
        self.print(f"[{self.done}/{self.total}] {cell_line(cell)}  ({elapsed:.1f} s)")

    def print(self, line: str) -> None:
        """A line above the status line (route any other message of the run through here
        while the status line is shown)."""
        if self._send({"print": line}):
            return
        if self.live:
            self._write(CLEAR + line + "\n" + self._status_text())
        else:
            self._write(line + "\n")

    def close(self) -> None:
        """Stop the ticker and clear the status line. Idempotent."""
        from . import children

        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            try:
                ticker.stdin.write(b'{"quit": true}\n')
                ticker.stdin.close()
            except OSError:
                pass
            children.OWNER.finish(ticker, 2.0)
        if self.live:
            self._write(CLEAR)
            self.live = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ drawing
    def eta_s(self) -> float | None:
        left = estimate_left(self.durations, self.remaining)
        if left is not None and self.cell_t0 is not None and self.current:
            own = self.durations.get(self.current[0])
            if own:   # the running cell is part way through
                left -= min(self.now() - self.cell_t0, sum(own) / len(own))
        return left

    def state(self) -> dict:
        """What the status line shows, with the times the ticker counts from."""
        label = "next cell" if self.done else "starting"
        if self.current:
            scenario, params, round_ = self.current
            label = f"{scenario} " + " ".join(f"{k}={v}" for k, v in params.items())
            if self.rounds > 1:
                label += f" round {round_ + 1}/{self.rounds}"
        eta = self.eta_s()
        now = self.now()
        return {"prefix": f"[{self.done + (1 if self.current else 0)}/{self.total}] {label}",
                "cell_t0": self.cell_t0, "run_t0": self.run_t0,
                "eta_at": now + eta if eta is not None else None}

    def _status_text(self) -> str:
        return render(self.state(), self.now(), _columns(self.stream))

    def _status(self) -> None:
        if not self.live:
            return
        if not self._send({"status": self.state()}):
            self._write(CLEAR + self._status_text())

    def _send(self, message: dict) -> bool:
        if self._ticker is None:
            return False
        try:
            self._ticker.stdin.write(json.dumps(message).encode() + b"\n")
            self._ticker.stdin.flush()
            return True
        except OSError:          # the ticker died: draw on events from here on
            self._ticker = None
            return False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def render(state: dict, now: float, columns: int) -> str:
    """The status line for ``state`` at ``now``, cut to the terminal's width (it is
    redrawn in place, so it must not wrap; finished cells are printed whole)."""
    parts = [state["prefix"]]
    if state.get("cell_t0") is not None:
        parts.append(f"{clock(now - state['cell_t0'])} in cell")
    if state.get("run_t0") is not None:
        parts.append(f"run {clock(now - state['run_t0'])}")
    if state.get("eta_at") is not None:
        parts.append(f"~{human(state['eta_at'] - now)} left")
    line = " · ".join(parts)
    width = max(20, columns - 1)
    return line if len(line) <= width else line[: width - 1] + "…"


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 100


def _start_ticker(stream):
    """The ticker process writing to ``stream``'s terminal, or None. Owned by
    :data:`bench.children.OWNER`, so it cannot outlive this process."""
    from . import children

    try:
        stream.flush()
        return children.OWNER.adopt(children.spawn(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=stream.fileno(), stderr=subprocess.DEVNULL, close_fds=True))
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------- the ticker
def ticker_main(inp: int = 0, out: int = 1) -> None:
    """Own the status line: print what the parent sends, redraw the clocks every
    second, clear the line and exit on ``quit`` or when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle
    try:
        os.nice(10)
    except OSError:
        pass
    state, buf = None, b""

    def draw(prefix: str = "") -> None:
        text = CLEAR + prefix
        if state:
            try:
                columns = os.get_terminal_size(out).columns
            except OSError:
                columns = 100
            text += render(state, time.time(), columns)
        os.write(out, text.encode("utf-8", "replace"))

    while True:
        ready, _, _ = select.select([inp], [], [], TICK_S - time.time() % TICK_S)
        if not ready:
            draw()
            continue
        chunk = os.read(inp, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg.get("quit"):
                os.write(out, CLEAR.encode())
                return
            if "status" in msg:
                state = msg["status"]
                draw()
            if "print" in msg:
                draw(msg["print"] + "\n")
    os.write(out, CLEAR.encode())


if __name__ == "__main__":
    ticker_main()
