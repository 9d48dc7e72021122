"""Terminal tables (bench.report) and progress (bench.progress), from hand-built runs."""
import fcntl
import io
import os
import re
import select
import struct
import termios
import threading
import time

import pytest
from rich.console import Console

from bench import progress, report, results

from factory import cell, rich_cell


def _printed(run, width=100, console_width=200):
    buf = io.StringIO()
    report.print_run(run, Console(file=buf, width=console_width, color_system=None), width)
    return buf.getvalue()


def _worker_run():
    """The worker scenario's two modes: throughput rows and latency rows."""
    cells = []
    for i, (transport, pool) in enumerate([(t, p) for t in ("memory", "unix", "redis", "amqp")
                                           for p in ("solo", "prefork")]):
        cells.append(rich_cell(
            "worker", seed=i, histograms={},
            metrics={"tasks_per_s": 1500.0 + 100 * i, "x_amqp": 1.2, "x_redis": 0.9,
                     "lost": 0, "stall_s": 0.0, "sent": 20000},
            transport=transport, pool=pool, concurrency=2 if pool == "prefork" else 1,
            mode="throughput", tasks=20000))
        cells.append(rich_cell(
            "worker", seed=100 + i, histograms={"publish_to_start": (1_200_000.0, 400)},
            metrics={"lost": 0, "sent": 400},
            transport=transport, pool=pool, concurrency=2 if pool == "prefork" else 1,
            mode="latency", tasks=400))
    cells.append(cell("worker", status="skipped", reason="postgres unreachable: refused",
                      transport="sqs", pool="solo", concurrency=1, mode="latency", tasks=400))
    return results.Run({"python": "3"}, cells)


def _tables(text):
    """Blocks of lines between blank lines."""
    return [b for b in re.split(r"\n\s*\n", text) if b.strip()]


def test_worker_throughput_and_latency_rows_get_their_own_tables_within_100_columns():
    text = _printed(_worker_run())
    assert "worker: mode=throughput" in text and "worker: mode=latency" in text
    for line in text.splitlines():
        if not line.startswith("  ["):           # notes are prose, wrapped by the terminal
            assert len(line.rstrip()) <= 100, line
    throughput, latency = text.split("worker: mode=latency")
    assert "tasks/s" in throughput and "pub-start" not in throughput
    assert "pub-start" in latency and "tasks/s" not in latency
    # the skipped cell joins the table it shares most params with, its reason a note
    assert "skipped [1]" in latency and "[1] postgres unreachable" in text


def test_seconds_are_shown_in_seconds_with_the_unit_in_the_header():
    text = _printed(_worker_run())
    # publish_to_start median ~1.2 s: the column is in s, not 1,2xx,xxx us
    assert re.search(r"pub-start\s+p50\s+s|pub-start p50 s", text), text
    assert not re.search(r"\d,\d{3},\d{3}", text.split("mode=latency")[1]), text
    assert "stalled s" in text          # all 0: the metric's own unit stays


def test_time_unit_rule():
    assert report.time_unit([2e-6, 40e-6, 0.0]) == ("us", 1e-6)
    assert report.time_unit([0.0, 0]) is None          # all zero: the metric keeps its unit
    assert report.time_unit([7e-3, 39e-3, 1.05]) == ("ms", 1e-3)
    assert report.time_unit([1.05, 2.04, 0.111]) == ("s", 1.0)
    col = report.make_column("total.p50", "total p50 us",
                             [rich_cell("join", histograms={"total": (40_000.0, 500)})])
    assert col.header == "total p50 ms" and col.unit == "ms"
    assert report.make_column("throughput_per_s", "msg/s", [cell()]).header == "msg/s"


def test_spread_of_repeats_is_shown_as_plus_minus():
    c = cell(throughputs=(1000.0, 1100.0, 1030.0), api="kombu", transport="memory")
    # median 1030; farthest repeat 1100: +6.8%
    assert report.spread_text(report.spread_fraction(c, "throughput_per_s")) == "±7%"
    text = _printed(results.Run({}, [c, cell(throughputs=(600.0, 610.0, 605.0), seed=1,
                                             api="celery", transport="memory")]))
    assert "1,030 ±7%" in text and "605 ±0.8%" in text
    one = cell(throughputs=(1000.0,), api="kombu")
    assert report.spread_fraction(one, "throughput_per_s") is None
    assert report.spread_fraction(c, "sent") is None       # a sum over repeats, no noise


def test_unknown_scenario_prints_generic_figures():
    """A Locust export: no summary in this checkout, still throughputs and percentiles."""
    locust = [cell("locust", throughputs=(812.5,), latency_us=2500, api="kombu",
                   how="publish", transport="memory", users=4),
              cell("locust", throughputs=(640.0,), latency_us=3000, seed=2, api="celery",
                   how="delay", transport="memory", users=4)]
    text = _printed(results.Run({}, locust))
    assert "throughput/s" in text and "812" in text and "640" in text
    assert "publish_us p50" in text and "publish_us p99" in text
    assert "-  ok" not in text.replace("  ", " ")     # every row has its figures


def test_wide_tables_split_and_never_cut_a_figure():
    cells = [rich_cell("locust", seed=i, histograms={
        f"h{j}": (100.0 * (j + 1), 500) for j in range(6)},
        metrics={"throughput_per_s": 123456.789 + i, "lost": 0},
        a=f"value-{i}-long", b=f"other-{i}") for i in range(3)]
    text = _printed(results.Run({}, cells))
    assert "(columns 1 of " in text                      # split over several tables
    for line in text.splitlines():
        assert len(line.rstrip()) <= 100, line
    for c in cells:                               # every figure is there, whole
        for spec, header in report.summary_columns("locust", cells):
            col = report.make_column(spec, header, cells)
            assert col.text(c)[0] in text, (spec, col.text(c))


def test_empty_columns_are_dropped_and_constants_said_once():
    cells = [cell(throughputs=(1000.0,), api="kombu", transport="memory"),
             cell(throughputs=(900.0,), seed=3, api="celery", transport="memory")]
    text = _printed(results.Run({}, cells))
    assert "intended" not in text and "e2e" not in text   # no cell has those
    assert "transport=memory" in text


def test_cell_line_names_figures_with_units():
    line = report.cell_line(rich_cell("join", histograms={"total": (40_000.0, 500)},
                                      metrics={"round_trips_per_s": 12.5}, backend="redis"))
    assert line.startswith("ok      join backend=redis")
    assert "total p50 ms=" in line


def test_cell_line_shows_a_percentile_the_count_supports_as_the_tables_do():
    """A quick join (12 joins) cannot support lag p99: the progress line prints lag p50,
    never "lag p99 us=too few samples"; a count below every percentile still says so."""
    line = report.cell_line(_join_cell(12, backend="redis"))
    assert "lag p50" in line and "too few" not in line and "lag p99" not in line, line
    few = report.cell_line(_fanout_cell(3))
    assert "too few samples (n=3)" in few, few


def test_csv_has_units_in_its_header(tmp_path):
    from bench.exporters import csv

    text = csv(results.Run({}, [rich_cell(api="kombu")]))
    header = text.splitlines()[0].split(",")
    assert "throughput_per_s [1/s]" in header and "publish.p99 [us]" in header
    assert "throughput_per_s.min [1/s]" in header and "repeats" in header
    assert "sent" in header and "publish.count" in header   # counts carry no unit


def test_markdown_shows_spread_and_split_tables():
    from bench.exporters import markdown

    text = markdown(_worker_run())
    assert "### worker: mode=throughput" in text and "### worker: mode=latency" in text
    assert "±" in text


# --------------------------------------------------------------------------- progress
class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_quiet_progress_prints_one_plain_line_per_finished_cell():
    out = io.StringIO()
    clock = FakeClock()
    p = progress.Progress(quiet=True, stream=out, clock_fn=clock)
    p.start(4, rounds=2)
    a = cell(api="kombu", transport="memory")
    p.cell_started("publish", a.params, 0)
    clock.t += 2.5
    p.cell_done(a)
    s = cell(status="skipped", reason="redis unreachable", api="kombu", transport="redis")
    p.cell_started("publish", s.params, 0)
    p.cell_done(s)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in out.getvalue()
    assert lines[0].startswith("[1/4] ok      publish api=kombu") and "(2.5 s)" in lines[0]
    # the skipped cell does not run in round 2: the total drops to 3
    assert lines[1].startswith("[2/3] skipped publish") and "redis unreachable" in lines[1]


def test_eta_uses_each_scenarios_own_pace():
    assert progress.estimate_left({}, {"publish": 3}) is None
    assert progress.estimate_left({"publish": [2.0, 4.0]}, {"publish": 3, "join": 2}) == \
        pytest.approx(3 * 3.0 + 2 * 3.0)
    assert progress.estimate_left({"publish": [1.0], "join": [10.0]},
                                  {"publish": 2, "join": 1}) == pytest.approx(12.0)
    clock = FakeClock()
    p = progress.Progress(quiet=True, stream=io.StringIO(), clock_fn=clock)
    p.start(6, plan={"publish": 4, "join": 2})
    for _ in range(2):
        c = cell(api="kombu")
        p.cell_started("publish", c.params, 0)
        clock.t += 3
        p.cell_done(c)
    assert p.eta_s() == pytest.approx(4 * 3.0)      # 2 publish + 2 join at publish's pace
    assert progress.human(12) == "12 s" and progress.human(14 * 60) == "14 min"
    assert progress.clock(3723) == "1:02:03" and progress.clock(42) == "0:42"


def _pty(columns=120):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, os.fdopen(slave, "w")


def test_live_progress_names_the_cell_and_its_clock_moves_without_a_thread():
    master, tty = _pty()
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    threads = threading.active_count()
    p = progress.Progress(stream=tty)
    assert p.live
    p.start(2)
    # no thread in this (the measuring) process: the ticker is another process
    assert threading.active_count() == threads
    assert p._ticker is not None and p._ticker.poll() is None
    c = cell(api="kombu", transport="memory")
    p.cell_started("publish", c.params, 0)
    deadline = time.monotonic() + 10
    while b"0:01 in cell" not in b"".join(chunks) and time.monotonic() < deadline:
        time.sleep(0.1)                  # the ticker redraws the clock once a second
    p.cell_done(c)
    p.close()
    assert p._ticker is None
    time.sleep(0.2)
    text = b"".join(chunks).decode()
    assert "[1/2] publish api=kombu transport=memory" in text
    assert "0:01 in cell" in text, text[-500:]
    assert "[1/2] ok      publish api=kombu" in text and "left" in text
    assert text.endswith("\r\x1b[2K")     # the status line is cleared at the end
    for line in re.split(r"\r\n|\r\x1b\[2K", text):
        assert len(line) <= 120, line      # the status line never wraps
    tty.close()
    os.close(master)


def test_live_progress_without_ticker_draws_on_events():
    master, tty = _pty(60)
    p = progress.Progress(stream=tty, ticker=False)
    p.start(1)
    p.cell_started("publish", {"api": "kombu", "producer": "new-connection",
                               "transport": "memory", "serializer": "json"}, 0)
    p.cell_done(cell(api="kombu", producer="new-connection", transport="memory"))
    p.close()
    tty.flush()
    data = b""
    while select.select([master], [], [], 0.5)[0]:
        data += os.read(master, 65536)
    text = data.decode()
    assert "[1/1] publish api=kombu" in text and "…" in text   # cut to 60 columns
    assert "[1/1] ok      publish api=kombu producer=new-connection transport=memory" in text
    tty.close()
    os.close(master)


def test_the_calibration_loop_is_the_machines_noise_not_a_results_row():
    kombu = cell(throughputs=(1000.0, 1100.0, 1030.0), api="kombu", transport="memory")
    loop = cell(throughputs=(48_000.0, 50_000.0, 49_000.0), seed=1, api="calibration")
    text = _printed(results.Run({}, [kombu, loop]))
    noise, _, tables = text.partition("\n\n")
    assert noise == "machine noise (calibration loop, not a result): 49,000 loops/s ±2%, " \
                    "3 repeats"
    assert "calibration" not in tables and "49,000" not in tables
    assert "1,030 ±7%" in tables


def _join_cell(joins: int, seed: int = 0, **params):
    """A join cell whose ``lag`` and ``total`` histograms hold ``joins`` samples."""
    import numpy as np
    from bench import recorder

    rng = np.random.default_rng(seed)
    rec = recorder.Recorder()
    rec.add("total", rng.lognormal(np.log(900.0), 0.3, joins))
    rec.add("lag", rng.lognormal(np.log(300.0), 0.3, joins))
    return results.aggregate("join", params, [{"metrics": {"round_trips_per_s": 50.0},
                                               "histograms": rec.histograms}])


def test_a_percentile_no_row_supports_becomes_one_the_counts_do():
    """Quick join cells (8 joins) cannot support lag p99: the table prints lag p50 (once),
    never a column of 'too few samples'."""
    cells = [_join_cell(8, seed=i, backend=b) for i, b in enumerate(("redis", "sqlite"))]
    plan, = report.plan_tables("join", cells)
    headers = [c.header for c in plan.columns]
    assert not any("p99" in h for h in headers), headers
    assert sum(h.startswith("lag p50") for h in headers) == 1, headers
    texts = [t for c in cells for col in plan.columns for t in col.text(c)]
    assert not any("too few" in t for t in texts), texts


def test_a_supported_percentile_column_is_kept_and_too_few_still_says_so():
    cells = [_join_cell(400, backend="redis"), _join_cell(8, seed=1, backend="sqlite")]
    plan, = report.plan_tables("join", cells)
    p99 = [c for c in plan.columns if c.spec == "lag.p99"]
    assert p99, [c.header for c in plan.columns]
    assert "too few samples (n=8)" in p99[0].text(cells[1])[0]
    assert "too few" not in p99[0].text(cells[0])[0]


def test_a_count_below_every_percentile_keeps_the_column_as_asked():
    spec, header = report.supported_spec("makespan.p90", "makespan p90 us",
                                         [_fanout_cell(3)])
    assert (spec, header) == ("makespan.p90", "makespan p90 us")
    assert report.supported_spec("makespan.p90", "makespan p90 us", [_fanout_cell(12)]) == \
        ("makespan.p50", "makespan p50 us")


def _fanout_cell(n: int):
    import numpy as np
    from bench import recorder

    rec = recorder.Recorder()
    rec.add("makespan", np.linspace(1000.0, 2000.0, n))
    return results.aggregate("fanout", {"transport": "redis"},
                             [{"metrics": {"makespan_s": 0.002}, "histograms": rec.histograms}])
