"""The one owner of the child processes the bench starts.

Every child runs in its own session (process group), so a signal to the group reaches
whatever it forked (a worker's pool, valgrind's child) and nothing from the terminal
reaches it but ours. Stopping is SIGTERM, a grace period, then SIGKILL to the group.
Children that must not outlive this process (Celery workers, private redis-servers)
are registered with :data:`OWNER`; at exit, and on SIGTERM or SIGHUP, it stops them all
at once; a plain ``Popen`` (the progress ticker) joins it through :meth:`Owner.adopt`.
Short-lived children (callgrind runs, user commands) are stopped by whoever waits on
them, through :func:`stop` and :func:`kill_group`.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

EXIT_GRACE_S = 10.0      # at exit: every registered child's warm stop, all at once
SIGNAL_GRACE_S = 5.0     # on SIGTERM/SIGHUP: the same, shorter (someone is waiting)
PARENT_ENV = "CELERY_BENCH_PARENT_PID"   # a child that must die with its parent: the parent
ORPHAN_GRACE_S = 10.0    # an orphan's warm stop (SIGTERM) before it kills its own group
WATCH_S = 0.5            # how often an orphan-to-be looks for its parent
PR_SET_PDEATHSIG = 1


def _pdeathsig(parent: int, sig: int):
    """A ``preexec_fn``: the kernel sends ``sig`` to the child when the thread that forked it
    dies (SIGKILL included). A parent that died before the call leaves the child orphaned
    already: it exits at once then (its ``getppid()`` is no longer ``parent``)."""
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl

    def set_it():
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return set_it


def spawn(argv, *, die_with_parent: bool = False, **kwargs) -> subprocess.Popen:
    """``Popen`` in a session of its own (``start_new_session``; its pid is its group).

    ``die_with_parent``: the child gets SIGTERM (a warm stop) when this process dies however
    it dies (Linux ``PR_SET_PDEATHSIG``; call it from the main thread, or from a greenlet:
    the signal follows the forking *thread*), and learns this process's pid through
    ``$CELERY_BENCH_PARENT_PID``, so a Python child can :func:`watch_parent` to end its whole
    group if the warm stop hangs."""
    kwargs["start_new_session"] = True
    if die_with_parent and os.path.exists("/proc/self"):   # Linux: the prctl exists
        env = dict(kwargs.get("env") or os.environ)
        env[PARENT_ENV] = str(os.getpid())
        kwargs["env"] = env
        kwargs["preexec_fn"] = _pdeathsig(os.getpid(), signal.SIGTERM)
    return subprocess.Popen(argv, **kwargs)


def watch_parent(grace: float = ORPHAN_GRACE_S) -> threading.Thread | None:
    """In a child started with ``die_with_parent``: a daemon thread that notices the parent's
    death (``getppid()`` changes) and, ``grace`` seconds after it (the warm stop the kernel's
    SIGTERM started), SIGKILLs this process's whole group. None when not such a child."""
    raw = os.environ.get(PARENT_ENV, "")
    if not raw.isdigit() or os.getpgid(0) != os.getpid():
        return None             # not spawned so, or a forked pool child: its leader watches

    parent = int(raw)

    def watch():
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        time.sleep(grace)
        os.killpg(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="celery-bench-parent-watch", daemon=True)
    thread.start()
    return thread


def kill_group(pid: int, sig: int = signal.SIGKILL, *, missing_ok: bool = True) -> None:
    """``sig`` to the process group ``pid`` leads. A group that is gone is no error unless
    ``missing_ok`` is false (then ProcessLookupError: a fault aimed at nothing)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        if not missing_ok:
            raise


def stop(procs, grace: float) -> None:
    """SIGTERM every still-running ``Popen`` in ``procs`` (to its whole group), wait up to
    ``grace`` seconds for each, then SIGKILL the group of any that did not exit."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        kill_group(p.pid, signal.SIGTERM)
    for p in alive:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            kill_group(p.pid)
            p.wait()


def stop_together(children, timeout: float) -> None:
    """Stop registered-style children (``terminate()``, ``stop(timeout)``) all at once:
    every warm shutdown runs in parallel, within one shared ``timeout``."""
    children = list(children)
    for child in children:
        try:
            child.terminate()
        except Exception:
            pass
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.stop(max(0.0, deadline - time.monotonic()))
        except Exception:   # one child's failure must not leave the others running
            pass


class Adopted:
    """A plain ``Popen`` as a registered child (see :class:`Owner`): SIGTERM to its group,
    a grace period, then SIGKILL."""

    def __init__(self, owner: "Owner", proc: subprocess.Popen):
        self.owner, self.proc, self.pid = owner, proc, proc.pid

    def terminate(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.pid, signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        stop([self.proc], timeout)
        self.owner.release(self.pid)


class Owner:
    """The registry of children that must not outlive this process.

    A registered child is any object with ``pid``, ``terminate()`` (ask it to stop, do
    not wait) and ``stop(timeout)`` (stop it within ``timeout``, then kill its group;
    idempotent); it ``release``s itself once it has exited. :meth:`hook` installs the
    exit and signal handlers once.
    """

    def __init__(self):
        self._live: dict[int, object] = {}
        self._lock = threading.Lock()
        self._exit_hooked = False
        self._signals_hooked = False
        self._folders: dict[str, Path] = {}
        self.signals_taken = False   # set when another owner (Locust) handles SIGTERM

    def register(self, child, signals: bool = True) -> None:
        """Track ``child`` until released; ``signals``: also stop it on SIGTERM/SIGHUP."""
        if signals:
            self.hook()
        else:
            self._hook_exit()
        with self._lock:
            self._live[child.pid] = child

    def adopt(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Register a plain ``Popen`` (from :func:`spawn`); :meth:`finish` ends it. Only
        the exit hook covers it (no signal handler is installed for it): an adopted child
        is one that exits by itself once this process's end closes its stdin."""
        self.register(Adopted(self, proc), signals=False)
        return proc

    def finish(self, proc: subprocess.Popen, grace: float) -> None:
        """An adopted child told to exit: wait ``grace`` seconds, then SIGTERM, a second's
        grace and SIGKILL to its group; released either way."""
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            stop([proc], 1.0)
        finally:
            self.release(proc.pid)

    def release(self, pid: int) -> None:
        with self._lock:
            self._live.pop(pid, None)

    def running(self, kind: type | None = None) -> list:
        """The registered children (of class ``kind``, when given) not yet released."""
        with self._lock:
            return [c for c in self._live.values() if kind is None or isinstance(c, kind)]

    def stop_all(self, timeout: float = EXIT_GRACE_S, kind: type | None = None) -> None:
        """Stop every registered child (of ``kind``) at once within a shared ``timeout``."""
        stop_together(self.running(kind), timeout)

    def log_folder(self, prefix: str) -> Path:
        """A private folder for children's logs, one per ``prefix`` and process, made again
        if a /tmp cleaner removed it; removed at exit once the children are stopped,
        unless ``$CELERY_BENCH_KEEP_LOGS`` is set."""
        with self._lock:
            folder = self._folders.get(prefix)
            if folder is None:
                folder = self._folders[prefix] = Path(tempfile.mkdtemp(prefix=prefix))
        self._hook_exit()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder

    def _at_exit(self) -> None:
        self.stop_all()
        if not os.environ.get("CELERY_BENCH_KEEP_LOGS"):
            for folder in self._folders.values():
                shutil.rmtree(folder, ignore_errors=True)

    def _hook_exit(self) -> None:
        if not self._exit_hooked:
            self._exit_hooked = True
            atexit.register(self._at_exit)

    def hook(self) -> None:
        """Stop everything at exit; on SIGTERM and SIGHUP (terminal closed) stop
        everything, then exit 128+signal (finally blocks and atexit run). Installed once,
        from the main thread; a signal someone else already handles is left to them
        (atexit still covers us)."""
        self._hook_exit()
        if self._signals_hooked or self.signals_taken or \
                threading.current_thread() is not threading.main_thread():
            return
        self._signals_hooked = True

        def on_signal(signum, frame):
            self.stop_all(SIGNAL_GRACE_S)
            raise SystemExit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, on_signal)


OWNER = Owner()   # the one registry of this process (atexit and signals are per process)
