"""What the waterfall's hooks (bench.worker_stamps) add per task, timed in-process: the
main process's two readings and one record (the Strategy's message-handler wrapper, the
on_task_request wrapper) and the pool child's three signal handlers and one record, each
against the same calls without the hooks. Run: .venv/bin/python docs/scripts/hooks_cost.py
(writes its records under a temporary folder, removed after)."""
import shutil
import tempfile
import time
from types import SimpleNamespace

from bench import worker_stamps as ws

N = 200_000


def per_call_ns(fn, n=N) -> float:
    best = float("inf")
    for _ in range(5):          # the best of 5: the least disturbed by the shared machine
        t = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t) / n)
    return best


def main() -> None:
    folder = tempfile.mkdtemp()
    try:
        req = SimpleNamespace(args=(1, 2), request_dict={})
        task = SimpleNamespace(name="bench.worker.tick")
        bare = lambda r: None  # noqa: E731  Celery's own handler, here a no-op
        main = ws.MainStamps(ws.StampFile(folder))
        handed = main.wrap_handle(bare)

        def hooked_main():
            main.taken = ws._now()      # the Strategy wrapper's reading
            handed(req)                 # the on_task_request wrapper: reading + record
        child = ws.ChildStamps(ws.StampFile(folder), task.name)

        def hooked_child():
            child.prerun(task=task)
            child.success(sender=task)
            child.postrun(task=task, args=(1, 2))
        base = per_call_ns(lambda: bare(req))
        print(f"main process: {per_call_ns(hooked_main) - base:,.0f} ns per task added")
        print(f"pool child:   {per_call_ns(hooked_child) - base:,.0f} ns per task added")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
