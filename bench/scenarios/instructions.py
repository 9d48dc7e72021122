"""Instructions per message, counted by valgrind's callgrind: a figure that does not move.

Wall-clock rates on a shared 2-core VM move 1.7x between consecutive runs; the
number of instructions a publish executes does not (0.1% here). Each cell runs
``python -m bench.callgrind_child TARGET N`` (:mod:`bench.callgrind_child`) under
``valgrind --tool=callgrind`` twice, with ``N1`` and ``N2`` messages, both at once
(two cores), and reports::

    instructions_per_msg = (I(N2) - I(N1)) / (N2 - N1)

so start-up, imports, set-up and the probe's fixed warm-up cancel. Targets
(cell param ``target``, see :mod:`bench.callgrind_child`): ``queue-put``, ``kombu-publish``
(memory, held producer, ``retry=False``), ``kombu-publish-retry`` (the same with
``retry=True``, as the publish scenario's Kombu rows publish), ``celery-apply_async``
(memory, Celery's default producer path), ``framing-encode`` / ``framing-decode``
(our unix and fifo transports' message codec), ``recorder`` (the publish loop's
timestamp stores around a send that does nothing).

Both runs get the same environment (the caller's, plus ``PYTHONHASHSEED=0``,
``PYTHONDONTWRITEBYTECODE=1``, one OpenBLAS thread and the repository first on
``PYTHONPATH``) and argv of the same length (N zero-padded). A plain run of the
probe first compiles the bytecode both counted runs then read, and fails the cell
fast, with the probe's last stderr line, when the probe cannot run. The message
totals are fixed per target (not ``--duration``/``--messages``/``--quick``), so
every run counts the same thing and compares with a committed baseline.

Opt-in: not in ``celery-bench run``'s default list; name it (``celery-bench run
instructions``). Without valgrind every cell is skipped with how to get it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import callgrind_child, children
from . import Outcome, Scenario, Skip, payload_bytes, register

ROOT = Path(__file__).resolve().parents[2]
NOT_INSTALLED = "valgrind not installed: apt-get install valgrind (Debian package valgrind)"
WIDTH = 8                 # N is passed zero-padded to this many digits: same argv length
STOP_GRACE_S = 2.0        # after SIGTERM, how long a valgrind may take before SIGKILL


@dataclass(frozen=True)
class Size:
    n1: int               # messages in the smaller run (after the probe's warm-up)
    messages: int         # N2 - N1: what the figure is divided by


# Sized so the difference is 1.2e8-3e8 instructions (a total moves ~1e5 from run to run)
# and the larger run takes ~10-25 s under callgrind here. Per message, measured here:
SIZES = {
    "queue-put": Size(100, 20_000),           # ~8.1k instructions
    "kombu-publish": Size(100, 2_000),        # ~145k
    "kombu-publish-retry": Size(100, 1_000),  # ~240k
    "celery-apply_async": Size(100, 200),     # ~1.3M
    "framing-encode": Size(100, 5_000),       # ~37k
    "framing-decode": Size(100, 5_000),       # ~39k
    "recorder": Size(100, 40_000),            # ~3.0k
}
# Targets whose messages go through a serializer (the others take the body as it is).
SERIALIZED = ("kombu-publish", "kombu-publish-retry", "celery-apply_async",
              "framing-encode", "framing-decode")

SUMMARY = [
    ("instructions_per_msg", "instr/msg"),
    ("messages", "messages"),
    ("instructions_n1", "I(N1)"),
    ("instructions_n2", "I(N2)"),
]


class ProbeFailed(RuntimeError):
    """The probe exited with an error: the cell fails with its last stderr line."""


def valgrind_path() -> str | None:
    return shutil.which("valgrind")


def valgrind_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def child_env(base: dict | None = None) -> dict:
    """The probe's environment: the caller's (a ``PYTHONPATH`` entry set there, e.g. a
    ``sitecustomize``, stays), the repository first on the path, and what makes a
    count repeat."""
    env = dict(os.environ if base is None else base)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env["PYTHONHASHSEED"] = "0"
    env["OPENBLAS_NUM_THREADS"] = "1"     # idle BLAS threads spin as long as the clock says
    env["OMP_NUM_THREADS"] = "1"
    return env


def probe_argv(target: str, n: int, payload: int, serializer: str) -> list[str]:
    return [sys.executable, "-m", "bench.callgrind_child", target, f"{n:0{WIDTH}d}", str(payload),
            serializer]


def callgrind_total(out_file: Path, stderr: str = "") -> int:
    """The instruction total of a callgrind run: the ``totals:`` (or ``summary:``) line of
    its out file, else ``Collected : N`` on its stderr."""
    try:
        with open(out_file) as fh:
            summary = None
            for line in fh:
                if line.startswith("totals:"):
                    return int(line.split()[1])
                if line.startswith("summary:"):
                    summary = int(line.split()[1])
            if summary is not None:
                return summary
    except OSError:
        pass
    for line in reversed(stderr.splitlines()):
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1].strip().replace(",", ""))
    raise ProbeFailed(f"no instruction total in {out_file.name} nor on valgrind's stderr")


def last_error_line(stderr: str) -> str:
    """The probe's last stderr line (valgrind's own ``==pid==`` lines left out)."""
    lines = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and not ln.startswith("==")]
    return lines[-1] if lines else "(no output)"


def _stop(procs) -> None:
    children.stop(procs, STOP_GRACE_S)


def _wait(procs, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise ProbeFailed(f"{what} took longer than {timeout:g} s (--timeout)") from None


def run_plain(argv, env, timeout: float, folder: Path) -> None:
    """The probe without valgrind (compiles bytecode, fails fast with its stderr)."""
    err_path = folder / "plain.err"
    with open(err_path, "w") as err:
        proc = children.spawn(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait([proc], timeout, "the probe")
        finally:
            _stop([proc])
    if proc.returncode:
        raise ProbeFailed(f"probe exited {proc.returncode}: "
                          f"{last_error_line(err_path.read_text(errors='replace'))}")


def count_pair(valgrind: str, argvs: list[list[str]], env: dict, timeout: float,
               folder: Path) -> list[int]:
    """Run each argv under callgrind, all at once; their instruction totals, in order."""
    env = dict(env, PYTHONDONTWRITEBYTECODE="1")   # both read the same bytecode
    procs, outs, errs, files = [], [], [], []
    try:
        for k, argv in enumerate(argvs):
            out = folder / f"run{k}.callgrind"     # same length for every run
            err_path = folder / f"run{k}.err"
            fh = open(err_path, "w")
            files.append(fh)
            outs.append(out)
            errs.append(err_path)
            procs.append(children.spawn(
                [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=fh))
        _wait(procs, timeout, "callgrind")
    finally:
        _stop(procs)
        for fh in files:
            fh.close()
    totals = []
    for proc, out, err_path in zip(procs, outs, errs):
        stderr = err_path.read_text(errors="replace")
        if proc.returncode:
            raise ProbeFailed(f"probe under callgrind exited {proc.returncode}: "
                              f"{last_error_line(stderr)}")
        totals.append(callgrind_total(out, stderr))
    return totals


@register
class Instructions(Scenario):
    name = "instructions"
    description = ("Instructions per message under valgrind's callgrind (deterministic, for "
                   "CI gates): queue put, Kombu and Celery publish on memory, our framing "
                   "codec, the recorder")
    summary = SUMMARY
    opt_in = True         # not in the default scenario list: name it, or --instructions
    # Counts repeat to ~0.03%: one round decides (the runner runs one whatever --repeat
    # says), and the gate's rules on them are `exact`: the value, not an interval.
    deterministic = True

    def __init__(self, opts):
        super().__init__(opts)
        self._valgrind_version = None

    def cells(self) -> list[dict]:
        payload = payload_bytes(self.opts)
        serializers = tuple(self.opts.serializers) or ("json",)
        out = []
        for target in SIZES:
            for ser in (serializers if target in SERIALIZED else ("-",)):
                out.append({"target": target, "payload_bytes": payload, "serializer": ser})
        return out

    def requires(self, params) -> set:
        return set()

    def run_cell(self, params) -> Outcome:
        valgrind = valgrind_path()
        if valgrind is None:
            raise Skip(NOT_INSTALLED)
        if self._valgrind_version is None:
            self._valgrind_version = valgrind_version(valgrind)
        target = params["target"]
        size = SIZES.get(target)
        if size is None:
            raise ProbeFailed(f"unknown target {target!r}; choose from {', '.join(SIZES)}")
        ser = params["serializer"] if params["serializer"] != "-" else callgrind_child.SERIALIZER
        payload = int(params["payload_bytes"])
        n1, n2 = size.n1, size.n1 + size.messages
        env = child_env()
        timeout = self.opts.timeout
        with self.cell_folder() as folder:
            run_plain(probe_argv(target, n1, payload, ser), env, timeout, folder)
            i1, i2 = count_pair(valgrind, [probe_argv(target, n, payload, ser)
                                           for n in (n1, n2)], env, timeout, folder)
        metrics = {
            "instructions_per_msg": (i2 - i1) / size.messages,
            "instructions_n1": i1, "instructions_n2": i2,
            "messages": size.messages, "n1": n1, "n2": n2,
            "valgrind": self._valgrind_version,
        }
        notes = []
        if i2 <= i1:
            notes.append(f"I(N2) {i2} <= I(N1) {i1}: the probe did not count its messages")
        return Outcome(metrics, {}, notes)
