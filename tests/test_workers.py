"""bench.celery_workers: real worker processes start, become ready, and never outlive their owner."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from bench import brokers, celery_workers, config
from bench.celery_app import make_app
from bench.cleanup import delete_queues

pytestmark = pytest.mark.timeout(120)


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries CELERY_BENCH_TEST_TAG=tag."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("CELERY_BENCH_TEST_TAG") == tag and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def family(pid: int) -> list[psutil.Process]:
    main = psutil.Process(pid)
    return [main, *main.children(recursive=True)]


def gone(procs) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=5)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def queue():
    name = f"bench.test.workers.{uuid.uuid4().hex[:10]}"
    yield name
    if config.probe("redis").ok:  # the redis tests leave kombu binding keys behind
        delete_queues(brokers.BrokerEnv(config.service_url("redis")), [name])


def test_worker_runs_tasks_and_leaves_no_process(redis_url, queue):
    conf = {"task_default_queue": queue, "result_expires": 60}
    with celery_workers.worker(redis_url, redis_url, conf=conf, concurrency=2) as w:
        assert w.alive() and "@" in w.hostname and w.log_path.exists()
        procs = family(w.pid)
        assert len(procs) >= 3  # the main process and its two pool children
        app = make_app(redis_url, redis_url, **conf)
        before = time.perf_counter_ns()
        out = app.send_task("bench.sleep", (0.01,)).get(timeout=30)
        after = time.perf_counter_ns()
        app.close()
        # Worker-side readings come back with the result, on this process's clock.
        assert before <= out["start_ns"] <= out["end_ns"] <= after
        assert out["end_ns"] - out["start_ns"] >= 10_000_000
        assert "ready" in w.log_tail(50)
    assert not w.alive()
    assert gone(procs)
    assert w not in celery_workers.running()


def test_worker_stopped_when_the_block_raises(queue, tmp_path):
    with brokers.broker("filesystem", tmp_path) as env:
        with pytest.raises(ZeroDivisionError):
            with celery_workers.worker(env.url, transport_options=env.transport_options,
                                conf={"task_default_queue": queue}, stop_timeout=2) as w:
                procs = family(w.pid)
                1 / 0
    assert gone(procs)


def test_never_ready_fails_quickly_with_log_tail():
    started = time.monotonic()
    with pytest.raises(celery_workers.WorkerError) as err:
        # Nothing listens on port 1: the worker keeps retrying and is never ready.
        with celery_workers.worker("redis://127.0.0.1:1/0", ready_timeout=2, stop_timeout=1):
            pytest.fail("the worker cannot be ready")
    assert time.monotonic() - started < 30  # generous: 2 s + the stop
    assert "not ready after 2s" in str(err.value)
    assert "Cannot connect" in str(err.value)  # the log tail says why
    assert not celery_workers.running()


def test_worker_that_dies_at_start_reports_its_exit_and_log():
    with pytest.raises(celery_workers.WorkerError) as err:
        with celery_workers.worker("memory://", pool="no-such-pool", ready_timeout=30):
            pytest.fail("the worker cannot start")
    assert "exited with code" in str(err.value)
    assert "no-such-pool" in str(err.value)


def test_n_workers_start_together_and_all_stop(redis_url, queue):
    with celery_workers.workers(2, redis_url, conf={"task_default_queue": queue},
                         hostname="benchtest@%h", stop_timeout=3) as ws:
        assert len({w.hostname for w in ws}) == 2
        assert all(w.alive() for w in ws)
        procs = [p for w in ws for p in family(w.pid)]
    assert gone(procs)


def _script(tag: str, body: str) -> list[str]:
    code = textwrap.dedent(f"""
        import os, sys, time
        os.environ["CELERY_BENCH_TEST_TAG"] = {tag!r}
        from bench import celery_workers
        w = celery_workers.start("memory://", conf={{"task_default_queue": "q-{tag}"}})
        w.wait_ready(60)
        print("ready", w.pid, flush=True)
    """) + textwrap.dedent(body)
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_owner_exit_or_sigterm_stops_its_workers(how):
    """atexit and the SIGTERM handler stop workers nobody stopped explicitly."""
    tag = uuid.uuid4().hex
    body = "sys.exit(0)\n" if how == "exit" else "time.sleep(60)\n"
    proc = subprocess.Popen(_script(tag, body), stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        if how == "sigterm":
            assert tagged_processes(tag)  # the worker is up while its owner lives
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == (0 if how == "exit" else 128 + signal.SIGTERM)
    deadline = time.monotonic() + 10
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tagged_processes(tag)


def _sigkill_owner_and_wait(tag: str, body: str, bound: float) -> list:
    """Run ``body`` (it prints 'ready' once its children are up), SIGKILL it (no atexit, no
    handler runs), and return the tagged processes still alive after ``bound`` seconds."""
    code = textwrap.dedent(f"""
        import os, sys, time
        os.environ["CELERY_BENCH_TEST_TAG"] = {tag!r}
    """) + textwrap.dedent(body)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        assert len(tagged_processes(tag)) >= 2     # its children (the owner's own environ
        # is not tagged: os.environ changes no /proc/<pid>/environ)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + bound
    while len(tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return tagged_processes(tag)


def test_workers_started_to_die_with_their_owner_stop_when_it_is_sigkilled():
    """die_with_parent: the kernel's SIGTERM (PR_SET_PDEATHSIG) warm-stops a prefork worker
    and its pool children when the process that started it is SIGKILLed."""
    tag = uuid.uuid4().hex
    left = _sigkill_owner_and_wait(tag, f"""
        from bench import celery_workers
        w = celery_workers.start("memory://", conf={{"task_default_queue": "q-{tag}"}},
                                 pool="prefork", concurrency=2, die_with_parent=True)
        w.wait_ready(60)
        print("ready", flush=True)
        time.sleep(120)
    """, bound=20)
    assert not left, [p.cmdline() for p in left]


def test_an_orphan_whose_warm_stop_hangs_kills_its_own_group():
    """watch_parent: a child that ignores SIGTERM, with a grandchild in its group, still ends,
    all of it, ``grace`` after its parent died."""
    tag = uuid.uuid4().hex
    child = ("import signal, subprocess, sys, time; from bench import children; "
             "signal.signal(signal.SIGTERM, signal.SIG_IGN); children.watch_parent(grace=0.5); "
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
             "time.sleep(120)")
    left = _sigkill_owner_and_wait(tag, f"""
        from bench import children
        children.spawn([sys.executable, "-c", {child!r}], die_with_parent=True)
        while True:
            import psutil
            kids = psutil.Process().children(recursive=True)
            if sum("import time; time.sleep(120)" in k.cmdline() for k in kids) == 1:
                break
            time.sleep(0.05)
        print("ready", flush=True)
        time.sleep(120)
    """, bound=10)
    assert not left, [p.cmdline() for p in left]
