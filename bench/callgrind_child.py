"""The child program the ``instructions`` scenario runs under callgrind.

``python -m bench.callgrind_child TARGET N`` sets TARGET up, sends a fixed warm-up of
messages, then N messages, and exits. The parent runs it twice with two totals
and divides the difference of the instruction counts by the difference of the
totals, so start-up, imports, set-up and warm-up cancel out. N may be zero-padded
(``00004000``) so both runs have the same argv length.

Targets (what one "message" is):

- ``queue-put``          ``queue.Queue.put`` of ``(i, t, body)``: the publish ladder's ceiling
- ``kombu-publish``      ``Producer.publish`` on the memory transport, producer held, json,
                         ``retry=False``: the publish scenario's Kombu driver, strategy held
- ``kombu-publish-retry`` the same with ``retry=True`` and Celery's retry policy
- ``celery-apply_async`` ``task.apply_async((body, i, t))`` on the memory transport with
                         Celery's default producer path (a pool acquire inside ``send_task``)
- ``framing-encode``     :func:`transports.framing.encode_message` of the message dict a
                         Kombu publish hands our unix transport
- ``framing-decode``     :func:`transports.framing.decode_message` of that payload
- ``recorder``           the publish scenario's closed loop (``_closed_loop``, read from
                         ``bench/scenarios/publish.py``) around a send that does nothing:
                         two ``perf_counter_ns()`` readings and two stores into
                         :class:`bench.recorder.Timestamps` buffers per message

Determinism: every message carries the same fixed timestamp (no clock reading
decides anything), queues are purged every ``CHUNK`` messages (memory stays flat,
as the publish scenario drains), and after set-up and warm-up ``gc.freeze()``
moves the start-up heap out of the collector's way, so a full collection costs
what the messages left behind, not what the imports did. The parent sets
``PYTHONHASHSEED=0``; OpenBLAS (numpy) runs one thread, since idle BLAS threads
spin for as long as the wall clock says. Nothing is printed on success.
"""
from __future__ import annotations

import ast
import gc
import json
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

CHUNK = 100               # messages between purges; N must be a multiple of it
WARMUP = 200              # messages sent before counting starts (in both runs)
PAYLOAD_BYTES = 112       # the publish scenario's default body size
SERIALIZER = "json"
STAMP = 123_456_789_012_345   # the send time every message carries (a perf_counter_ns-sized int)
QUEUE = "celery-bench-instructions"
PUBLISH_PY = Path(__file__).resolve().parent / "scenarios" / "publish.py"


class Probe(NamedTuple):
    send: Callable[[int, int], None]   # send(i, t): one message
    drain: Callable[[], None]          # empty whatever the messages filled
    close: Callable[[], None] = lambda: None


def make_payload(nbytes: int):
    """The publish scenario's body (:func:`bench.scenarios.make_payload`), rebuilt here
    because importing ``bench.scenarios`` imports every scenario (~1.7e9 instructions)."""
    overhead = len(json.dumps({"data": ""}))
    if nbytes < overhead:
        return "x" * max(0, nbytes - 2)
    return {"data": "x" * (nbytes - overhead)}


def _memory_target():
    import tempfile

    from bench import brokers
    from bench.drivers.target import Target

    # The memory broker makes nothing in its folder: a URL and transport options.
    with brokers.broker("memory", tempfile.gettempdir()) as env:
        return Target.from_env(env, brokers.info("memory"))


# --------------------------------------------------------------------------- targets
def queue_put(payload, serializer) -> Probe:
    from bench.drivers import queue as queue_driver

    pub = queue_driver.Publisher(payload)
    pub.open()
    sending = pub.sending()
    send = sending.__enter__()
    return Probe(send, pub.queue.queue.clear, lambda: sending.__exit__(None, None, None))


def _kombu(payload, serializer, retry: bool) -> Probe:
    from bench.drivers import kombu as kombu_driver

    pub = kombu_driver.Publisher(_memory_target(), QUEUE, "held", serializer, payload,
                                 timeout=60.0, retry=retry)
    pub.open()
    bound = pub.queue(pub.conn.default_channel)
    sending = pub.sending()
    send = sending.__enter__()

    def close():
        sending.__exit__(None, None, None)
        pub.close()
    return Probe(send, bound.purge, close)


def kombu_publish(payload, serializer) -> Probe:
    return _kombu(payload, serializer, retry=False)


def kombu_publish_retry(payload, serializer) -> Probe:
    return _kombu(payload, serializer, retry=True)


def celery_apply_async(payload, serializer) -> Probe:
    from bench.drivers import celery as celery_driver

    target = _memory_target()
    pub = celery_driver.Publisher(target, QUEUE, "apply_async", "default", serializer,
                                  payload, timeout=60.0)
    pub.open()
    conn = target.connect()
    bound = pub.queue(conn.default_channel)   # memory queues are process-global
    sending = pub.sending()
    send = sending.__enter__()

    def close():
        sending.__exit__(None, None, None)
        pub.close()
        conn.release()
    return Probe(send, bound.purge, close)


def unix_message(payload, serializer: str = SERIALIZER) -> dict:
    """The dict a held Kombu producer hands our unix channel's ``basic_publish`` for one
    publish of the Kombu driver (headers ``i``, ``t``), with the ``delivery_info`` the
    channel fills in before framing (``transports.unix.Channel._publish_frame``).

    Captured from a real ``Producer.publish``: the unix channel overrides
    ``basic_publish``, so what it frames is ``prepare_message``'s output, untouched."""
    from kombu import Connection, Exchange, Producer

    captured = []
    with Connection("memory://") as conn:
        channel = conn.channel()
        channel.basic_publish = lambda message, exchange, routing_key, **kw: \
            captured.append((message, exchange, routing_key))
        Producer(channel, exchange=Exchange(QUEUE, "direct"), serializer=serializer,
                 auto_declare=False).publish(payload, routing_key=QUEUE,
                                             headers={"i": 0, "t": STAMP})
    message, exchange, routing_key = captured[0]
    message["properties"]["delivery_info"].update(exchange=exchange, routing_key=routing_key)
    return message


def framing_encode(payload, serializer) -> Probe:
    from transports.framing import encode_message

    message = unix_message(payload, serializer)
    headers = message["headers"]

    def send(i, t):
        headers["i"] = i
        encode_message(message)
    return Probe(send, lambda: None)


def framing_decode(payload, serializer) -> Probe:
    from transports.framing import decode_message, encode_message

    message = unix_message(payload, serializer)
    frame = encode_message(message)   # i = 0 in every frame: decoding is what is counted

    def send(i, t):
        decode_message(frame)
    return Probe(send, lambda: None)


def _closed_loop_source() -> Callable:
    """``_closed_loop`` compiled from ``bench/scenarios/publish.py`` without importing
    ``bench.scenarios`` (which imports every scenario): the loop measured is the loop
    the publish scenario runs."""
    tree = ast.parse(PUBLISH_PY.read_text(), str(PUBLISH_PY))
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_closed_loop"]
    if not found:
        raise SystemExit(f"probe: {PUBLISH_PY} has no _closed_loop function")
    from bench import recorder

    namespace = {"now_ns": recorder.now_ns}
    code = compile(ast.Module(body=found, type_ignores=[]), str(PUBLISH_PY), "exec")
    exec(code, namespace)
    return namespace["_closed_loop"]


class _RecorderRun:
    """Runs the whole count through one ``_closed_loop`` call over preallocated
    :class:`bench.recorder.Timestamps`, as a publish cell does."""

    def __init__(self):
        from bench import recorder

        self.loop = _closed_loop_source()
        self.Timestamps = recorder.Timestamps

    def run(self, n: int) -> None:
        ts = self.Timestamps(n, ("start", "end"))
        sent = self.loop(_nothing, ts.start, ts.end, 0, n, 1 << 62)
        if sent != n:
            raise SystemExit(f"probe: the closed loop stopped after {sent} of {n}")


def _nothing(i, t):
    pass


TARGETS = {
    "queue-put": queue_put,
    "kombu-publish": kombu_publish,
    "kombu-publish-retry": kombu_publish_retry,
    "celery-apply_async": celery_apply_async,
    "framing-encode": framing_encode,
    "framing-decode": framing_decode,
    "recorder": None,     # a loop of its own: _RecorderRun
}


def run(target: str, n: int, payload_bytes: int = PAYLOAD_BYTES,
        serializer: str = SERIALIZER) -> None:
    if target not in TARGETS:
        raise SystemExit(f"probe: unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if n < 0 or n % CHUNK:
        raise SystemExit(f"probe: N must be a non-negative multiple of {CHUNK}, not {n}")
    if target == "recorder":
        rec = _RecorderRun()
        rec.run(WARMUP)
        gc.collect()
        gc.freeze()
        rec.run(n)
        return
    probe = TARGETS[target](make_payload(payload_bytes), serializer)
    send, drain = probe.send, probe.drain
    try:
        for i in range(WARMUP):
            send(i, STAMP)
        drain()
        gc.collect()
        gc.freeze()
        for first in range(0, n, CHUNK):
            for i in range(first, first + CHUNK):
                send(i, STAMP)
            drain()
    finally:
        probe.close()


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 4:
        print("usage: python -m bench.callgrind_child TARGET N [PAYLOAD_BYTES [SERIALIZER]]",
              file=sys.stderr)
        return 2
    # numpy (imported by bench.recorder) starts OpenBLAS threads that spin while idle:
    # under callgrind their instructions follow the wall clock. One thread, before numpy.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    payload_bytes = int(argv[2]) if len(argv) > 2 else PAYLOAD_BYTES
    serializer = argv[3] if len(argv) > 3 else SERIALIZER
    run(argv[0], int(argv[1]), payload_bytes, serializer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
