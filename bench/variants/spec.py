"""Variants of the system under test: ``NAME=SPEC`` parsed, prepared and checked.

A :class:`Variant` holds what makes its cells differ: the interpreter, the harness tree
the cells run from, paths laid before it (``PYTHONPATH``), environment and Celery
settings. Preparing one (a git export, a pip target folder) is cached under
``$CELERY_BENCH_CACHE`` (default ``~/.cache/celery-bench``), and :func:`prepare` checks it
can import celery, kombu and the harness before anything is measured: a bad spec is a
:class:`~bench.config.UsageError` (one line, exit 2).

SPEC kinds: ``here`` (this tree, this interpreter), ``git:REV`` (this repository at REV),
``pip:REQ,REQ`` (these pins over this tree), ``python:PATH`` (another interpreter or venv),
``conf:KEY=VALUE,...`` (Celery settings), ``env:KEY=VALUE,...`` (environment).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import UsageError

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("here", "git", "pip", "python", "conf", "env")
NAME_RE = re.compile(r"^[A-Za-z][\w.-]{0,31}$")
PIP_TIMEOUT_S = 900.0
PROBE_TIMEOUT_S = 120.0

# Run in the variant's interpreter, with its environment: what it would measure with.
_PROBE = r"""
import json, os, subprocess, sys
import celery, kombu
import bench, bench.scenarios, bench.runner
root = os.path.dirname(os.path.dirname(os.path.abspath(bench.__file__)))
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=root, timeout=10).stdout.strip() or None
except Exception:
    commit = None
print(json.dumps({"python": sys.version.split()[0], "executable": sys.executable,
                  "celery": celery.__version__, "kombu": kombu.__version__,
                  "harness": root, "commit": commit}))
"""


def cache_dir() -> Path:
    return Path(os.environ.get("CELERY_BENCH_CACHE") or
                Path.home() / ".cache" / "celery-bench").expanduser()


@dataclass
class Variant:
    """One side of an A/B run; the cells of a variant run in :meth:`child_env`."""
    name: str
    spec: str
    python: str = sys.executable
    root: Path = ROOT               # the harness tree (bench/, transports/) its cells run from
    paths: tuple = ()               # laid before ``root`` on PYTHONPATH (pip pins)
    env: dict = field(default_factory=dict)
    conf: dict = field(default_factory=dict)
    commit: str | None = None       # git: the revision resolved
    described: dict = field(default_factory=dict)   # what the probe found (versions)

    @property
    def kind(self) -> str:
        return self.spec.partition(":")[0]

    def child_env(self) -> dict:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)   # this process's paths are not the variant's
        env.pop("PYTHONHOME", None)
        env.update(self.env)
        # env:PYTHONPATH=DIR lays DIR first (e.g. a sitecustomize patching this variant only)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [self.env.get("PYTHONPATH"), *map(str, self.paths), str(self.root)] if p)
        if self.conf:
            from ..celery_app import VARIANT_CONF_ENV
            env[VARIANT_CONF_ENV] = json.dumps(self.conf)
        else:
            env.pop("CELERY_BENCH_VARIANT_CONF", None)
        return env

    def environment(self) -> dict:
        """For the results file: the spec, what it resolved to, and the versions it runs."""
        out = {"spec": self.spec, **self.described}
        if self.commit:
            out["commit"] = self.commit
        if self.conf:
            out["settings"] = dict(self.conf)
        if self.env:
            out["env"] = {k: ("***" if _secret(k) else v) for k, v in self.env.items()}
        return out


def _secret(key: str) -> bool:
    return any(w in key.upper() for w in ("PASS", "SECRET", "TOKEN", "KEY"))


def parse(text: str) -> Variant:
    """``NAME=SPEC`` -> an unprepared Variant (the spec's syntax checked, nothing run)."""
    name, sep, spec = text.partition("=")
    if not sep or not NAME_RE.match(name.strip()) or not spec.strip():
        raise UsageError(f"--variant {text!r}: expected NAME=SPEC, e.g. base=git:HEAD~1 "
                         f"(NAME: a letter, then letters, digits, . _ -)")
    return parse_spec(name.strip(), spec.strip())


def parse_spec(name: str, spec: str) -> Variant:
    kind, _, arg = spec.partition(":")
    where = f"variant {name} ({spec})"
    if kind not in KINDS:
        raise UsageError(f"{where}: unknown kind {kind!r}; write one of "
                         f"{', '.join(k + ':...' if k != 'here' else k for k in KINDS)}")
    v = Variant(name, spec)
    if kind == "here":
        if arg:
            raise UsageError(f"{where}: 'here' takes nothing after it")
    elif not arg:
        raise UsageError(f"{where}: nothing after '{kind}:'")
    elif kind == "conf":
        v.conf = _settings(where, arg)
    elif kind == "env":
        v.env = {k: val for k, val in _pairs(where, arg)}
    return v


def _pairs(where: str, text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{where}: {item!r} is not KEY=VALUE")
        out.append((key.strip(), value.strip()))
    if not out:
        raise UsageError(f"{where}: no KEY=VALUE given")
    return out


def _settings(where: str, text: str) -> dict:
    """Celery settings by their lower-case names; values read as JSON where they parse
    (``1``, ``true``, ``[\"json\"]``), else kept as strings."""
    from celery.app.defaults import NAMESPACES, flatten

    known = {key for key, _ in flatten(NAMESPACES)}
    out = {}
    for key, raw in _pairs(where, text):
        if key not in known:
            raise UsageError(f"{where}: {key!r} is not a Celery setting (lower-case names, "
                             f"e.g. broker_pool_limit=1)")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _run(argv, where: str, what: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UsageError(f"{where}: {what} failed: {exc}") from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        raise UsageError(f"{where}: {what} failed: {lines[-1] if lines else res.returncode}")
    return res


def prepare(v: Variant) -> Variant:
    """Make the variant runnable (cached) and check it imports celery, kombu and the
    harness; records what it found. UsageError (exit 2) otherwise."""
    kind, _, arg = v.spec.partition(":")
    where = f"variant {v.name} ({v.spec})"
    if kind == "git":
        v.commit, v.root = _git_tree(where, arg)
    elif kind == "pip":
        v.paths = (_pip_target(where, arg),)
    elif kind == "python":
        v.python = _interpreter(where, arg)
    res = _run([v.python, "-c", _PROBE], where, "importing celery, kombu and the harness",
               PROBE_TIMEOUT_S, env=v.child_env(), cwd=str(v.root))
    try:
        v.described = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise UsageError(f"{where}: the interpreter's probe printed no versions") from None
    return v


def _git_tree(where: str, rev: str) -> tuple[str, Path]:
    """REV's tree, exported once per commit. ``git archive`` rather than ``git worktree
    add``: a commit never changes, so an export is the whole of what is needed and it
    leaves no worktree bookkeeping in the repository to prune."""
    try:
        res = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                             capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    except (OSError, subprocess.SubprocessError) as exc:
        raise UsageError(f"{where}: cannot run git here: {exc}") from None
    sha = res.stdout.strip()
    if res.returncode or not sha:
        raise UsageError(f"{where}: no commit {rev!r} in the repository at {ROOT} "
                         f"(a fresh clone needs its history: git fetch --unshallow)")
    dest = cache_dir() / "git" / sha
    if not (dest / ".complete").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(["git", "archive", "--format=tar", sha], cwd=str(ROOT),
                                   stdout=subprocess.PIPE)
        try:
            _run(["tar", "-x", "-C", str(dest)], where, "exporting the tree", 300,
                 stdin=archive.stdout)
        finally:
            archive.stdout.close()
            archive.wait(timeout=60)
        if archive.returncode:
            raise UsageError(f"{where}: git archive {sha[:12]} failed ({archive.returncode})")
        (dest / ".complete").touch()
    if not (dest / "bench" / "runner.py").exists():
        raise UsageError(f"{where}: {sha[:12]} has no bench/runner.py; not a celery-bench "
                         f"tree this harness can run")
    return sha, dest


def _pip_target(where: str, text: str) -> Path:
    """The pins installed (with their dependencies) into a folder laid before this tree on
    PYTHONPATH, once per set of pins. Cheaper than a venv holding the whole project (numpy,
    scipy, matplotlib...): only what the pins bring is new; the rest is this venv's."""
    reqs = sorted(filter(None, (r.strip() for r in text.split(","))))
    if not reqs:
        raise UsageError(f"{where}: no requirement given, e.g. pip:celery==5.5.3,kombu==5.5.4")
    digest = hashlib.sha256("\n".join([sys.version, *reqs]).encode()).hexdigest()[:16]
    dest = cache_dir() / "pip" / digest
    if not (dest / ".complete").exists():
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "--no-input", "--upgrade", "--target", str(dest), *reqs], where,
             f"pip install {' '.join(reqs)}", PIP_TIMEOUT_S)
        (dest / "pins.txt").write_text("\n".join(reqs) + "\n")
        (dest / ".complete").touch()
    return dest


def _interpreter(where: str, path: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "bin" / "python"
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise UsageError(f"{where}: {p} is not an executable interpreter (give a python "
                         f"binary or a venv folder)")
    return str(p)
