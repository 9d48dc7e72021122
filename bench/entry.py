"""``celery-bench``'s entry point. For ``run``, the results file exists before anything
heavy is imported (click, kombu, every scenario: ~0.2 s on an idle host, seconds on a
loaded one), so a Ctrl-C at any moment after Python started leaves one: a minimal
document in the results schema that says the run was interrupted, which the runner
replaces with its own. Then :func:`bench.cli.main`. Standard library only, on purpose.

A usage error (exit 2) puts back what the file held before, so a typo never clobbers
an earlier run's results.
"""
from __future__ import annotations

import json
import os
import sys
import time

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_OUT = "results/latest.json"   # bench.cli's --out default (a test keeps them equal)
SCHEMA = "celery-bench/2"             # bench.results.SCHEMA (a test keeps them equal)


def out_of(argv: list[str]) -> str | None:
    """The ``--out`` of a ``celery-bench run`` command line; None for other commands."""
    if not argv or argv[0] != "run" or "-h" in argv or "--help" in argv:
        return None
    out = DEFAULT_OUT
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        if arg == "--out" and i + 1 < len(argv):
            out = argv[i + 1]
        elif arg.startswith("--out="):
            out = arg[len("--out="):]
    return out


class EarlyFile:
    """The minimal results file written first, and what it replaced."""

    def __init__(self, path: str, argv: list[str]):
        self.path = path
        self.made: list[str] = []
        try:
            with open(path, "rb") as fh:
                self.previous: bytes | None = fh.read()
        except OSError:
            self.previous = None
        doc = {"schema": SCHEMA, "cells": [], "environment": {
            "interrupted": True,    # until the runner writes its own: not a finished run
            "python": "%d.%d.%d" % sys.version_info[:3],
            "argv": [sys.argv[0], *argv],
            "utc_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu_count": os.cpu_count(),
            "note": "interrupted while celery-bench was starting: nothing measured"}}
        self.data = (json.dumps(doc, indent=1) + "\n").encode()
        self.written = self._write(self.data)

    def _write(self, data: bytes) -> bool:
        """Atomically (as bench.results.dump); False when the path cannot be written
        (bench.cli then says so, in one line)."""
        folder = os.path.dirname(os.path.abspath(self.path))
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-early.json")  # no tempfile: 30 ms
        missing = folder
        while not os.path.exists(missing):   # the folders this creates, removed on restore
            self.made.append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)
            return True
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False

    def still_ours(self) -> bool:
        try:
            with open(self.path, "rb") as fh:
                return fh.read() == self.data
        except OSError:
            return False

    def restore(self) -> None:
        """Put back what the file held (or remove it), unless the runner rewrote it."""
        if not self.written or not self.still_ours():
            return
        if self.previous is None:
            try:
                os.unlink(self.path)
                for folder in self.made:   # deepest first
                    os.rmdir(folder)
            except OSError:
                pass
        else:
            self._write(self.previous)


def main() -> None:
    argv = sys.argv[1:]
    early = None
    try:
        out = out_of(argv)
        if out is not None:
            early = EarlyFile(out, argv)
        from bench import cli

        cli.main(argv)
    except KeyboardInterrupt:   # importing bench.cli, before its own handler runs
        written = early is not None and early.written
        print("celery-bench: interrupted" + (f": results so far written to {early.path}"
                                             if written else ""), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as exc:
        if early is not None and exc.code == EXIT_USAGE:
            early.restore()
        raise


if __name__ == "__main__":
    main()
