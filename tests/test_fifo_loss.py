"""What a fifo consumer loses when it dies or shuts down, measured and bounded.

A Kombu consumer at prefetch 1 in another process, a producer here publishing as
fast as it can (so the pipe is full: the worst case), the consumer killed
mid-stream. Lost = publishes that returned minus messages the consumer handled.
The transport promises: at most the prefetch window plus what fits in the pipe
(SIGKILL), only what is in the pipe (warm shutdown: ``Consumer.cancel()`` hands
over what was read). A 64 KiB pipe makes the bound tight enough that the old
reader (256 KiB read at a time, whatever the prefetch) fails it.

Also a measurement: ``python tests/test_fifo_loss.py [ROUNDS]`` prints the loss for
Kombu (SIGKILL, SIGTERM; 64 KiB and 1 MiB pipes) and for a Celery solo worker at
``worker_prefetch_multiplier=1`` (SIGKILL, SIGTERM)."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kombu import Connection, Producer  # noqa: E402

import transports  # noqa: E402,F401  registers the fifo alias
from transports import fifo, framing  # noqa: E402
from support import ROOT, child, qname  # noqa: E402

WAIT_S = 30.0  # generous bound for what takes milliseconds
PAD = "x" * 200

CONSUMER = """
import signal, socket, sys, time, transports
from kombu import Connection, Consumer, Queue
url, name, prefetch, pipe = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
work_s = float(sys.argv[5])
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
def on_message(body, message):
    if work_s:
        time.sleep(work_s)          # a task that takes a while
    sys.stdout.write(body["i"] + "\\n")
    sys.stdout.flush()              # handled = printed
    message.ack()
with Connection(url, transport_options={"pipe_size": pipe}) as conn:
    consumer = Consumer(conn, [Queue(name)], callbacks=[on_message])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    print("ready", flush=True)
    while not stop:
        try:
            conn.drain_events(timeout=0.1)
        except socket.timeout:
            pass
    consumer.cancel()               # warm shutdown: what was read is handed over
"""


def body(i: int) -> dict:
    return {"i": f"{i:09d}", "pad": PAD}  # every message the same size


def frame_size(conn, name: str) -> int:
    """Bytes one of our messages takes in the pipe (kombu's envelope included)."""
    channel = conn.default_channel
    message = channel.prepare_message(json.dumps(body(0)), 0, "application/json", "utf-8",
                                      {}, {"delivery_mode": 2})
    message["properties"]["delivery_info"] = {"exchange": "", "routing_key": name}
    return framing.HEADER_SIZE + len(framing.encode_message(message))


def run_once(url: str, sig: int, prefetch: int = 1, pipe: int = 65536,
             after: int = 300, work_s: float = 0.0) -> dict:
    """Start a consumer, publish until it has handled ``after``, send it ``sig``; count."""
    name = qname("loss")
    consumer = child(CONSUMER, url, name, prefetch, pipe, work_s)
    handled: list[str] = []
    published = [0]
    failure = []
    stop = threading.Event()
    try:
        assert consumer.stdout.readline().strip() == "ready", consumer.stderr.read()

        def produce():
            with Connection(url, transport_options={"write_timeout": WAIT_S}) as conn:
                producer = Producer(conn)
                i = 0
                try:
                    while not stop.is_set():
                        producer.publish(body(i), routing_key=name, serializer="json")
                        i += 1
                        published[0] = i
                except fifo.FifoError as exc:  # the consumer is gone: expected
                    failure.append(exc)
        thread = threading.Thread(target=produce)
        thread.start()
        deadline = time.monotonic() + WAIT_S
        while len(handled) < after and time.monotonic() < deadline:
            line = consumer.stdout.readline()
            if not line:
                break
            handled.append(line.strip())
        assert len(handled) >= after, consumer.stderr.read()
        consumer.send_signal(sig)
        # read(), not communicate(): that would skip what readline() buffered.
        handled += consumer.stdout.read().split()
        consumer.wait(WAIT_S)
        thread.join(WAIT_S)
    finally:
        stop.set()
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait(WAIT_S)
    with Connection(url) as conn:
        size = frame_size(conn, name)
    ids = [int(x) for x in handled]
    assert failure, "the producer never noticed the consumer was gone"
    assert len(ids) == len(set(ids)), "a message was handled twice"
    assert set(ids) <= set(range(published[0])), "a message nobody published"
    return {"published": published[0], "handled": len(ids),
            "lost": published[0] - len(ids), "frame": size,
            "pipe_messages": math.ceil(pipe / size), "prefetch": prefetch}


@pytest.fixture
def fifo_url():
    folder = Path(tempfile.mkdtemp(prefix="cbfl-"))
    os.chmod(folder, 0o700)
    yield f"fifo://{folder}"
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(120)
def test_a_killed_consumer_loses_at_most_its_window_and_its_pipe(fifo_url):
    # 2 ms a message: a reader that took a pipe-full at once would hold it for 0.3 s.
    r = run_once(fifo_url, signal.SIGKILL, after=200, work_s=0.002)
    # + 1: the frame whose length the reader had taken (its body still in the pipe)
    bound = r["prefetch"] + r["pipe_messages"] + 1
    assert r["lost"] <= bound, r
    assert r["published"] > r["handled"] + r["pipe_messages"] // 2, \
        f"the pipe was not full: not the worst case this test is about ({r})"


@pytest.mark.timeout(120)
def test_a_warm_shutdown_loses_only_what_is_in_the_pipe(fifo_url):
    r = run_once(fifo_url, signal.SIGTERM, after=200, work_s=0.002)
    assert r["lost"] <= r["pipe_messages"] + 1, r


# -- measurement ------------------------------------------------------------------------

CELERY_WORKER = """
import os, sys, transports
from celery import Celery
url, name = sys.argv[1], sys.argv[2]
app = Celery("loss", broker=url, set_as_current=False)
app.conf.update(task_default_queue=name, worker_prefetch_multiplier=1, task_ignore_result=True,
                worker_hijack_root_logger=False, broker_transport_options={"pipe_size": int(sys.argv[3])})
@app.task(name="loss.record")
def record(i):
    os.write(1, (i + "\\n").encode())  # fd 1: Celery redirects sys.stdout to its log
app.worker_main(["worker", "-P", "solo", "--without-mingle", "--without-gossip",
                 "--without-heartbeat", "-l", "WARNING", "-n", f"loss-{name}@%h"])
"""


def _ids(text: str) -> list[str]:
    return [w for w in text.split() if len(w) == 9 and w.isdigit()]


def run_celery_once(url: str, sig: int, pipe: int, after: int = 300) -> dict:
    """A Celery solo worker at prefetch multiplier 1; tasks sent as fast as possible."""
    from celery import Celery

    name = qname("closs")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    worker = subprocess.Popen([sys.executable, "-c", CELERY_WORKER, url, name, str(pipe)],
                              cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    app = Celery("loss-client", broker=url, set_as_current=False)
    app.conf.update(task_default_queue=name, task_ignore_result=True, task_publish_retry=False,
                    broker_transport_options={"publish_timeout": WAIT_S, "write_timeout": WAIT_S})
    handled, published, stop = [], [0], threading.Event()

    def produce():
        i = 0
        with app.producer_or_acquire() as producer:
            try:
                while not stop.is_set():
                    app.send_task("loss.record", args=(f"{i:09d}",), producer=producer)
                    i += 1
                    published[0] = i
            except Exception:  # the worker is gone
                pass
    thread = threading.Thread(target=produce)
    thread.start()
    try:
        while len(handled) < after:
            line = worker.stdout.readline()
            if not line:
                raise RuntimeError(worker.stderr.read())
            handled += _ids(line)  # Celery's banner shares the stdout
        worker.send_signal(sig)
        handled += _ids(worker.stdout.read())  # not communicate(): see run_once
        worker.wait(60)
    finally:
        stop.set()
        thread.join(60)
        if worker.poll() is None:
            worker.kill()
            worker.wait(WAIT_S)
        app.close()
    return {"published": published[0], "handled": len(set(handled)),
            "lost": published[0] - len(set(handled))}


def measure(rounds: int = 3) -> None:
    folder = Path(tempfile.mkdtemp(prefix="cbfm-"))
    os.chmod(folder, 0o700)
    url = f"fifo://{folder}"
    cases = [("kombu prefetch 1", sig, pipe) for pipe in (65536, 1 << 20)
             for sig in (signal.SIGKILL, signal.SIGTERM)]
    cases += [("celery solo x1", sig, pipe) for pipe in (65536, 1 << 20)
              for sig in (signal.SIGKILL, signal.SIGTERM)]
    for label, sig, pipe in cases:
        runs = []
        for _ in range(rounds):
            after = 300 if pipe <= 65536 else 6000  # long enough for the pipe to fill
            if label.startswith("kombu"):
                runs.append(run_once(url, sig, pipe=pipe, after=after))
            else:
                runs.append(run_celery_once(url, sig, pipe, after=after))
        lost = [r["lost"] for r in runs]
        extra = ""
        if "pipe_messages" in runs[0]:
            extra = f", pipe holds ~{runs[0]['pipe_messages']} messages of {runs[0]['frame']} B"
        print(f"{label:18s} {signal.Signals(sig).name:7s} pipe {pipe // 1024:5d} KiB: lost "
              f"median {statistics.median(lost):.0f} {lost} of "
              f"{[r['published'] for r in runs]} published{extra}", flush=True)


if __name__ == "__main__":
    measure(*(int(a) for a in sys.argv[1:2]))
