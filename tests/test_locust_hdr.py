"""The Locust recorder without Locust: recording, worker -> master merging, the results
cells, the spectrum and the CI checks (bench.locust.hdr/book_results/checks never import Locust,
which would monkey-patch this test process)."""
import subprocess
import sys
from pathlib import Path

from hdrh.histogram import HdrHistogram

from bench import results
from bench.locust import book_results, checks, hdr
from bench.recorder import HIGHEST_US

ROUND_TRIP = "roundtrip unix bench.roundtrip"


def near(value, expected):
    """Equal within HdrHistogram's 3 significant digits."""
    return abs(value - expected) <= expected * 0.001 + 1


def fire(book, request_type, name, ms, exc=None, **ctx):
    book.record(request_type, name, ms, exc, ctx)


def test_no_locust_import():
    """Importing Locust monkey-patches the process: these modules must not."""
    code = ("import sys, bench.locust.hdr, bench.locust.book_results, bench.locust.checks; "
            "assert 'locust' not in sys.modules and 'gevent' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=Path(__file__).resolve().parents[1])


def test_rows_keep_exact_microseconds_in_fixed_memory():
    book = hdr.Book()
    for us in (7, 18, 18, 250, 1_234):
        fire(book, "kombu", "publish memory/held", us / 1000)
    row = book.rows[("kombu", "publish memory/held", "")]
    before = len(row.hist.counts)
    for _ in range(10_000):
        fire(book, "kombu", "publish memory/held", 0.018)
    assert len(row.hist.counts) == before          # memory does not grow with the count
    assert row.requests == row.hist.get_total_count() == 10_005
    p = row.percentiles()
    assert p["p50"] == 18 and near(p["max"], 1_234)    # Locust would say 0 and 1 ms


def test_failures_invalid_and_overflow_are_counted_apart():
    book = hdr.Book()
    fire(book, "total", ROUND_TRIP, 5.0)
    fire(book, "total", ROUND_TRIP, 5.0, exc=RuntimeError("result: timeout"))
    fire(book, "queue wait", ROUND_TRIP, -0.2, primary=False)   # clocks that disagree
    fire(book, "total", ROUND_TRIP, (HIGHEST_US + 10) / 1000)
    total = book.rows[("total", ROUND_TRIP, "")]
    assert (total.requests, total.failures, total.overflow) == (3, 1, 1)
    assert total.hist.get_total_count() == 2       # successes only
    wait = book.rows[("queue wait", ROUND_TRIP, "")]
    assert (wait.requests, wait.invalid, wait.hist.get_total_count()) == (1, 1, 0)


def test_open_loop_rows_intended_and_lag():
    book = hdr.Book()
    fire(book, "total", ROUND_TRIP, 2.0, schedule_lag_us=500.0, primary=True,
         from_start=True)
    fire(book, "run", ROUND_TRIP, 0.001, schedule_lag_us=500.0, primary=False,
         from_start=False)
    intended = book.rows[("total", ROUND_TRIP, "intended")]
    assert near(intended.hist.get_value_at_percentile(100), 2_500)
    assert near(book.rows[("total", ROUND_TRIP, "lag")].hist.get_max_value(), 500)
    assert ("run", ROUND_TRIP, "intended") not in book.rows   # run starts later: no correction
    assert ("run", ROUND_TRIP, "lag") not in book.rows        # lag belongs to the operation


def test_take_and_merge_add_up_to_the_sum_of_the_workers():
    workers = [hdr.Book(), hdr.Book()]
    master = hdr.Book()
    expected = HdrHistogram(1, HIGHEST_US, 3)
    for i, book in enumerate(workers):
        for round_ in range(3):                 # several reports each
            for us in range(1, 200, 3):
                value = us * (i + 1) + round_
                fire(book, "kombu", "publish unix/held", value / 1000)
                expected.record_value(value)
            fire(book, "kombu", "publish unix/held", 1.0, exc=ValueError("x"))
            book.count("started", 5)
            master.merge(book.take())
            assert not book.requests() or not any(book.requests().values())
    row = master.rows[("kombu", "publish unix/held", "")]
    assert row.requests == 2 * 3 * (len(range(1, 200, 3)) + 1)
    assert row.failures == 6
    assert row.hist.get_total_count() == expected.get_total_count()
    for p in (50, 90, 99, 99.9, 100):
        assert row.hist.get_value_at_percentile(p) == expected.get_value_at_percentile(p)
    assert master.counters == {"started": 30}
    assert master.operations() == (row.requests, 6)


def test_operations_count_each_round_trip_once():
    book = hdr.Book()
    for part in ("enqueue", "queue wait", "run", "result"):
        fire(book, part, ROUND_TRIP, 1.0, primary=False)
    fire(book, "total", ROUND_TRIP, 4.0, primary=True)
    fire(book, "total", ROUND_TRIP, 4.0, exc=RuntimeError("result"), primary=True)
    assert book.operations() == (2, 1)


def test_results_cells_and_the_spectrum():
    book = hdr.Book()
    for us in range(1, 1001):
        fire(book, "total", ROUND_TRIP, us / 1000, primary=True, user_class="TaskRoundTrip",
             transport="unix", schedule_lag_us=10.0, from_start=True)
    run = book_results.run(book, {"users": 4, "locust_workers": 2, "arrival_rate": 50.0}, 2.0,
                     {"rate_target_per_s": 50.0, "rate_shortfall": False})
    data = run.to_dict()
    results.validate(data)
    (cell,) = run.cells
    assert cell.params["users"] == 4 and cell.params["locust_workers"] == 2
    assert cell.params["user_class"] == "TaskRoundTrip" and cell.params["arrival_rate"] == 50.0
    assert set(cell.histograms) == {"latency", "intended", "lag"}
    assert cell.histograms["latency"]["count"] == 1000
    assert cell.metrics["throughput_per_s"] == 500.0
    assert results.decode(cell.histograms["latency"]).get_total_count() == 1000
    spectrum = {s["label"]: s for s in book_results.spectrum(book)}
    points = spectrum[f"total {ROUND_TRIP}"]["points"]
    assert points[0][0] == 0.0 and points[-1][1] >= 1000 * 0.999
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(points, points[1:]))
    assert max(p for p, _ in points) < 99.99       # 1,000 samples say nothing about p99.99


def test_checks():
    book = hdr.Book()
    for _ in range(99):
        fire(book, "kombu", "publish memory/held", 0.02)
    fire(book, "kombu", "publish memory/held", 0.02, exc=RuntimeError("x"))
    failed, passed = checks.judge(book, p99_us=100, fail_ratio=0.05)
    assert not failed and len(passed) == 2
    failed, _ = checks.judge(book, p99_us=10, fail_ratio=0.001)
    assert any("p99 of kombu 'publish memory/held' is 20 us" in f for f in failed)
    assert any("fail ratio 0.01 (1 of 100 operations failed) > 0.001" in f for f in failed)
    failed, _ = checks.judge(hdr.Book(), p99_us=10, fail_ratio=0.1)
    assert len(failed) == 2 and all("no operation was measured" in f for f in failed)


def test_checks_use_the_intended_start_in_open_loop():
    book = hdr.Book()
    fire(book, "kombu", "publish memory/held", 0.02, schedule_lag_us=5_000.0, primary=True,
         from_start=True)
    failed, _ = checks.judge(book, p99_us=1_000)
    assert failed and "from intended start is 5,0" in failed[0]
