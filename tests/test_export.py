"""Exports: HdrHistogram's own formats read back by the hdrh package, the PNG's facets,
and the report command."""
import math
import re

import pytest
from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader

from bench import results
from bench.exporters import charts, hgrm, hlog, png

from factory import cell, rich_cell, sweep_cells, write


def _run():
    return results.Run({"utc_time": "2023-11-14T22:13:20Z", "celery": "5", "kombu": "5"}, [
        rich_cell(api="kombu", transport="unix", histograms={"publish": (50.0, 3000),
                                                            "e2e": (400.0, 2990)}),
        rich_cell(api="celery", transport="unix", seed=1),
        cell(api="queue", transport="memory"),                 # no intervals
        cell(status="skipped", reason="no redis", api="kombu", transport="redis"),
    ])


# --------------------------------------------------------------------------- hgrm
def _parse_hgrm(text):
    rows, footer = [], {}
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("#["):
            for key, value in re.findall(r"(\w+)\s*=\s*([\d.]+)", line):
                footer[key] = float(value)
        elif parts and re.fullmatch(r"[\d.]+", parts[0]):
            rows.append((float(parts[0]), float(parts[1]), int(parts[2])))
    return rows, footer


def test_hgrm_is_hdrhistograms_own_percentile_distribution(tmp_path):
    run = _run()
    written = hgrm(run, tmp_path / "h")
    ok = [c for c in run.cells if c.status == "ok"]
    assert len(written) == sum(len(c.histograms) for c in ok)
    for path in written:
        assert re.fullmatch(r"[A-Za-z0-9._=+-]+\.hgrm", path.name), path.name
    for c in ok:
        for name, summary in c.histograms.items():
            path = [p for p in written if p.name.endswith(f".{name}.hgrm")
                    and f"api={c.params['api']}" in p.name][0]
            text = path.read_text()
            assert text.splitlines()[0].split() == ["Value", "Percentile", "TotalCount",
                                                    "1/(1-Percentile)"]
            # the same table as hdrh's own dump of the stored histogram (ms: ratio 1000)
            import io
            own = io.BytesIO()
            HdrHistogram.dump(summary["hdr"].encode(), own, 1000)
            # ... then one interval comment per recorded percentile (bench.percentiles)
            mine = [l for l in text.splitlines() if "StdDeviation" not in l
                    and not l.startswith("#[p")]
            assert sum(l.startswith("#[p") for l in text.splitlines()) == 4
            theirs = [l for l in own.getvalue().decode().splitlines()
                      if "StdDeviation" not in l]
            assert mine == theirs
            rows, footer = _parse_hgrm(text)
            hist = results.decode(summary)
            assert rows[-1][2] == hist.get_total_count() == summary["count"]
            assert footer["TotalCount"] == summary["count"]
            assert footer["Max"] == pytest.approx(hist.get_max_value() / 1000, abs=1e-3)
            assert footer["StdDeviation"] == pytest.approx(hist.get_stddev() / 1000, abs=2e-3)
            for a, b in zip(rows, rows[1:]):            # a distribution, in order
                assert a[0] <= b[0] and a[1] <= b[1] and a[2] <= b[2]
            below = [r for r in rows if r[1] < 0.5][-1]
            above = next(r for r in rows if r[1] >= 0.5)
            p50 = hist.get_value_at_percentile(50) / 1000
            assert below[0] - 1.5e-3 <= p50 <= above[0] + 1.5e-3


# --------------------------------------------------------------------------- hlog
def _read_log(path):
    reader = HistogramLogReader(str(path), HdrHistogram(1, 3_600_000_000, 3))
    out = []
    while True:
        h = reader.get_next_interval_histogram()
        if h is None:
            return out, reader
        out.append(h)


def test_hlog_reads_back_every_interval_with_its_tag(tmp_path):
    run = _run()
    path = hlog(run, tmp_path / "r.hlog")
    read, reader = _read_log(path)
    by_tag = {}
    for h in read:
        by_tag.setdefault(h.get_tag(), []).append(h)
    expected = {}
    for c in run.cells:
        if c.status != "ok":
            continue
        for name, summary in c.histograms.items():
            tag = f"{c.key}/{name}".replace(",", ";")
            assert tag in by_tag, (tag, list(by_tag))
            ivs = summary.get("intervals") or [None]
            expected[tag] = len(ivs)
            got = by_tag[tag]
            assert len(got) == len(ivs)
            # every interval decodes back to the same counts; they add up to the cell's
            assert sum(h.get_total_count() for h in got) == summary["count"]
            for h, iv in zip(got, summary.get("intervals") or []):
                ref = HdrHistogram.decode(iv["hdr"].encode())
                assert h.get_total_count() == ref.get_total_count()
                assert h.get_max_value() == ref.get_max_value()
                assert h.get_start_time_stamp() / 1000 == pytest.approx(iv["start_s"], abs=1e-3)
    assert set(by_tag) == set(expected)
    # times are in order (the tools read a log forwards)
    starts = [h.get_start_time_stamp() for h in read]
    assert starts == sorted(starts)
    assert reader.get_start_time_sec() == pytest.approx(min(starts) / 1000, abs=1e-3)


def test_hlog_reads_back_whole_whatever_the_sub_millisecond_start(tmp_path):
    """hdrh's reader skips an interval that starts before ``StartTime``: a start whose
    sub-millisecond part rounds up (.475705 -> .476) once lost the first interval."""
    import random
    made = rich_cell(api="kombu", transport="unix", histograms={"publish": (50.0, 600),
                                                               "e2e": (400.0, 590)})
    total = sum(s["count"] for s in made.histograms.values())
    ivs = [iv for s in made.histograms.values() for iv in s["intervals"]]
    first = min(iv["start_s"] for iv in ivs)
    rng = random.Random(20)
    for i in range(100):
        # a start whose sub-millisecond part is >= .5 ms, so three decimals round it up
        target = 1_700_000_000 + rng.randrange(10**6) + rng.randrange(1000) / 1000 \
            + rng.uniform(0.0005, 0.00099)
        shift, first = target - first, target
        for iv in ivs:
            iv["start_s"] += shift
            iv["end_s"] += shift
        path = hlog(results.Run({"utc_time": "2023-11-14T22:13:20Z"}, [made]),
                    tmp_path / f"r{i}.hlog")
        read, reader = _read_log(path)
        assert len(read) == len(ivs), (i, target)
        assert sum(h.get_total_count() for h in read) == total, (i, target)
        assert reader.get_start_time_sec() <= target


def test_hlog_tags_hold_no_comma_or_space():
    assert hlog.__module__  # the function, not the module
    from bench.exporters.hlog import tag
    t = tag("publish[api=kombu,how=a b]", "e2e")
    assert "," not in t and " " not in t and t.endswith("/e2e")


# --------------------------------------------------------------------------- charts
def test_facets_hold_at_most_six_cells_and_split_by_params():
    cells = [cell(api=a, producer=p, transport=t, seed=i)
             for i, (a, p, t) in enumerate([(a, p, t) for a in ("kombu", "celery")
                                            for p in ("held", "per-call", "new")
                                            for t in ("memory", "unix", "amqp")])]
    found = charts.facets(cells)
    assert sum(len(f.cells) for f in found) == len(cells) == 18
    assert all(len(f.cells) <= charts.MAX_CURVES for f in found)
    for f in found:                       # a facet's title says what its cells share
        for k, v in f.shared.items():
            assert all(str(c.params[k]) == str(v) for c in f.cells)
    assert len(found) <= 4


def test_spectrum_rows_keep_kinds_apart_with_distinct_colours_and_outside_legends():
    cells = [rich_cell(api=f"a{i}", seed=i, histograms={"publish": (50.0, 500),
                                                        "e2e": (5000.0, 500)})
             for i in range(6)]
    facet = charts.facets(cells)[0]
    with charts.style():
        fig = charts.new_figure(10, 4)
        assert charts.draw_spectra(fig, facet, ["publish", "e2e"]) == 12
        fig.canvas.draw()
        axes = fig.axes
        assert [a.get_title() for a in axes] == ["publish latency", "e2e latency"]
        for ax in axes:
            lines = [l for l in ax.get_lines() if (l.get_gid() or "").startswith("data-")]
            assert len(lines) == 6
            assert len({l.get_color() for l in lines}) == 6
            assert all(c.upper() in charts.PALETTE for c in (l.get_color() for l in lines))
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert all("(n=" in t for t in labels)
            legend = ax.get_legend().get_window_extent()
            assert legend.y1 <= ax.get_window_extent().y0 + 1     # below the plot
        # publish in us, e2e in ms: each on its own axis
        assert axes[0].get_ylim()[1] < axes[1].get_ylim()[1]


def test_png_of_a_quick_publish_like_run(tmp_path):
    cells = [rich_cell(api=a, producer=p, transport="memory", seed=i, rounds=1)
             for i, (a, p) in enumerate([("kombu", p) for p in ("held", "per-call", "new")]
                                        + [("celery", p) for p in ("d1", "d2", "d3", "h1", "h2")]
                                        + [("queue", "-")])]
    path = png(results.Run({}, cells), tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no recorded histogram"):
        png(results.Run({}, cells), tmp_path / "x.png", hist_names={"nope"})


def test_sweeps_are_found_and_marked():
    cells = sweep_cells(transport="memory") + sweep_cells(transport="unix", max_rate=1500.0) \
        + [cell(api="x")]
    found = charts.sweeps(cells)
    assert [s.shared for s in found] == [{"transport": "memory"}, {"transport": "unix"}]
    assert [s.max_rate for s in found] == [3000.0, 1500.0]
    assert [charts._rate(c) for c in found[0].cells] == [500, 1000, 2000, 4000]
    with charts.style():
        fig = charts.new_figure(10, 4)
        assert charts.draw_sweep(fig, found[0]) == 10     # 5 statistics x 2 kinds
        texts = [t.get_text() for ax in fig.axes if ax.get_legend()
                 for t in ax.get_legend().get_texts()]
        assert any("max sustainable 3,000/s" in t for t in texts)
    search = charts.searches(cells)
    assert [c.params["transport"] for c in search] == ["memory", "unix"]
    assert charts.slo_us("p99<=5ms") == 5000 and charts.slo_us(None) is None
    with charts.style():
        fig = charts.new_figure(10, 4)
        assert charts.draw_search(fig, search[0], []) == 4   # passed/failed x 2 charts
        lat = fig.axes[0]
        assert [l.get_ydata()[0] for l in lat.get_lines() if "SLO" in l.get_label()] == [5000]


def test_interval_series_breaks_between_repeats():
    c = rich_cell(rounds=2, seconds=3)
    t, p50, p99, mx = charts.interval_series(c.histograms["publish"])
    assert sum(math.isnan(x) for x in t) == 1            # one gap: between the 2 rounds
    assert all(a <= b <= m for a, b, m in zip(p50, p99, mx) if not math.isnan(a))


# --------------------------------------------------------------------------- the command
def test_report_command_writes_every_format(cli_run, tmp_path):
    run = _run()
    results.dump(run, tmp_path / "r.json")
    res = cli_run("report", "r.json", "--format", "hgrm")
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "r-hgrm").glob("*.hgrm"))) == 4   # kombu 2, celery 1, queue 1
    res = cli_run("report", "r.json", "--format", "hlog", "--hist", "e2e")
    assert res.returncode == 0, res.stderr
    read, _ = _read_log(tmp_path / "r.hlog")
    assert {h.get_tag().rsplit("/", 1)[1] for h in read} == {"e2e"}
    for fmt in ("html", "png"):
        res = cli_run("report", "r.json", "--format", fmt)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / f"r.{fmt}").stat().st_size > 1000
    write(tmp_path / "b.json", cell(api="kombu", transport="unix"))
    res = cli_run("report", "b.json", "r.json", "--format", "html", "--out", "cmp.html")
    assert res.returncode == 0, res.stderr
    assert "against" in (tmp_path / "cmp.html").read_text()
    res = cli_run("report", "b.json", "r.json", "--format", "md")
    assert res.returncode == 2 and "only as --format html" in res.stderr
    res = cli_run("report", "r.json", "--format", "hgrm", "--hist", "nope")
    assert res.returncode == 2 and "no recorded histogram" in res.stderr


def test_a_run_of_max_rate_searches_draws_their_overview(tmp_path):
    from bench import results
    from bench.exporters.png import png as draw_png

    cells = []
    for transport, best in (("unix", 800.0), ("redis", 200.0)):
        steps = [{"rate": r, "achieved": r, "latency_us": lat, "backlog_growth": 0.0,
                  "seconds": 1.0, "phase": "climb", "ok": lat <= 10_000, "why": ""}
                 for r, lat in ((100, 900.0), (200, 2_000.0), (400, 6_000.0),
                                (800, 9_000.0), (1600, 90_000.0))]
        cell = results.Cell("worker", {"transport": transport, "rate": "max",
                                       "slo": "p99<=10ms"})
        cell.metrics = {"max_sustainable_rate_per_s": best, "slo": "p99<=10ms",
                        "steps": steps}
        cells.append(cell)
    out = draw_png(results.Run({}, cells), tmp_path / "overview.png")
    assert out.exists() and out.stat().st_size > 10_000
