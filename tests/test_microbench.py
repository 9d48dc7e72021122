"""pytest-benchmark on the harness's own hot spots: the code between two clock reads.

These record timings (``--benchmark-only`` / ``--benchmark-compare`` to study them,
``make microbench``) but assert only correctness: speed targets live in the
benchmark and the gate, not in unit tests.
"""
import numpy as np

from bench import recorder
from transports import framing

MESSAGE = {
    "body": '{"data": "' + "x" * 100 + '"}',
    "content-encoding": "utf-8",
    "content-type": "application/json",
    "headers": {},
    "properties": {"delivery_info": {"exchange": "bench", "routing_key": "bench"},
                   "delivery_mode": 2, "priority": 0},
}


def test_frame_encode(benchmark):
    out = benchmark(lambda: framing.frame(framing.encode_message(MESSAGE)))
    assert framing.decode_message(out[framing.HEADER_SIZE:]) == MESSAGE


def test_frame_decode(benchmark):
    payload = framing.encode_message(MESSAGE)
    assert benchmark(framing.decode_message, payload) == MESSAGE


def test_frame_reader_batch(benchmark):
    chunk = framing.frame(framing.encode_message(MESSAGE)) * 1000

    def parse():
        reader = framing.FrameReader()
        reader.feed(chunk)
        return reader.frames()

    assert len(benchmark(parse)) == 1000


def test_timestamps_hot_loop(benchmark):
    """What the publish loop adds per message: two clock reads and two array stores."""
    ts = recorder.Timestamps(10_000)
    now = recorder.now_ns

    def loop():
        start, end = ts.start, ts.end
        for i in range(10_000):
            start[i] = now()
            end[i] = now()
        ts.count = 10_000

    benchmark(loop)
    assert ((ts.column("end") - ts.column("start")) >= 0).all()


def test_histogram_of_a_million_samples(benchmark):
    values = np.random.default_rng(1).lognormal(3, 1, 1_000_000)
    hist, overflow, *_ = benchmark.pedantic(recorder.histogram, args=(values,), rounds=3)
    assert hist.get_total_count() == 1_000_000 and overflow == 0
