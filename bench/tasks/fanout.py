"""Tasks of the fanout scenario: the seed's paginated crawl ("Think Parallel
with Celery") in three shapes, with its HTTP calls as sleeps scaled down.

``start`` fetches the pages one after the other (as the seed's generator does)
and then, by ``shape``:

- ``serial``: stores every object inline, in this one task;
- ``per-page``: one ``store_page`` task per page (objects stored in a loop);
- ``per-object``: one ``store_page_group`` task per page, each starting a
  ``group`` of ``store_object`` tasks, one per object;
- ``chord``: one ``chord`` of ``store_object`` over every object, ``collect``
  as its body.

Nothing here waits for another task (a task blocking on a subtask can deadlock
a pool); each task returns the ids of the tasks it started, so the harness
follows the tree. Stores return the object ids they stored and worker-side
``time.perf_counter_ns()`` readings (CLOCK_MONOTONIC, same clock in every
process on the host), so the makespan is publish -> last store, measured
exactly, and every object is accounted for.
"""
import time

from celery import chord, group, shared_task

SHAPES = ("serial", "per-page", "per-object", "chord")


# The seed's helpers; ``sleeps`` holds their durations in seconds.
def get_page(page, objects, sleeps):
    time.sleep(sleeps["page"])
    return [page * objects + i for i in range(objects)]


def store_obj_info(obj_id, sleeps):
    time.sleep(sleeps["get"])        # get_obj: an HTTP call
    time.sleep(sleeps["details"])    # get_obj_details: another one
    time.sleep(sleeps["crunch"])     # crunch_and_save
    return obj_id


def _stored(ids, start_ns):
    return {"ids": list(ids), "start_ns": start_ns, "end_ns": time.perf_counter_ns()}


@shared_task(name="bench.fanout.store_object")
def store_object(obj_id, sleeps):
    start = time.perf_counter_ns()
    return _stored([store_obj_info(obj_id, sleeps)], start)


@shared_task(name="bench.fanout.store_page")
def store_page(obj_ids, sleeps):
    start = time.perf_counter_ns()
    return _stored([store_obj_info(i, sleeps) for i in obj_ids], start)


@shared_task(name="bench.fanout.store_page_group")
def store_page_group(obj_ids, sleeps):
    res = group(store_object.s(i, sleeps) for i in obj_ids).apply_async()
    return {"children": [r.id for r in res.results]}


@shared_task(name="bench.fanout.collect")
def collect(results):
    start = time.perf_counter_ns()
    return _stored(sorted(i for r in results for i in r["ids"]), start)


@shared_task(name="bench.fanout.start")
def start(shape, pages, objects, sleeps):
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    begin = time.perf_counter_ns()
    if shape == "serial":
        ids = []
        for page in range(pages):
            ids.extend(store_obj_info(i, sleeps) for i in get_page(page, objects, sleeps))
        return _stored(ids, begin)
    if shape == "chord":
        ids = [i for page in range(pages) for i in get_page(page, objects, sleeps)]
        body = chord(store_object.s(i, sleeps) for i in ids)(collect.s())
        return {"callback": body.id}
    per_page = store_page if shape == "per-page" else store_page_group
    children = [per_page.delay(get_page(page, objects, sleeps), sleeps).id
                for page in range(pages)]
    return {"children": children}
