"""The HTML report, opened in headless Chromium: self-contained, no console error,
charts with data. Screenshots are saved under the test's tmp_path."""
import re

from bench import results
from bench.exporters import compare_html, write_compare_html, write_html

from browser import browser  # noqa: F401  (the fixture)
from factory import cell, rich_cell, sweep_cells


def _run():
    cells = []
    for i, (api, producer) in enumerate([("queue", "-"), ("kombu", "held"), ("kombu", "per-call"),
                                         ("kombu", "new-connection"), ("celery", "default"),
                                         ("celery", "held")]):
        for j, transport in enumerate(("memory", "unix")):
            hists = {"publish": (30.0 * (i + 1), 1500)}
            if transport != "memory":
                hists["e2e"] = (400.0 * (i + 1), 1500)
            cells.append(rich_cell(
                "publish", seed=10 * i + j, histograms=hists,
                metrics={"throughput_per_s": 50000.0 / (i + 1) / (j + 1), "sent": 1500, "lost": 0},
                api=api, producer=producer, transport=transport, serializer="json"))
    cells.append(cell("publish", status="skipped", reason="no Producer.batch on memory",
                      api="kombu", producer="batch", transport="memory", serializer="json"))
    cells += sweep_cells("publish", api="kombu", producer="held", transport="memory",
                         serializer="json")
    cells.append(rich_cell("worker", histograms={}, metrics={"tasks_per_s": 1800.0, "lost": 0},
                           transport="unix", pool="solo", mode="throughput"))
    cells.append(rich_cell("worker", histograms={"publish_to_start": (1_100_000.0, 300)},
                           metrics={"lost": 0}, transport="unix", pool="solo", mode="latency"))
    cells.append(cell("locust", throughputs=(812.0,), api="kombu", how="publish",
                      transport="memory", users=4))
    env = {"python": "3.11", "celery": "5.7", "kombu": "5.7", "cpu_model": "test CPU",
           "cpu_count": 2, "utc_time": "2023-11-14T22:13:20Z", "git_commit": "abc123",
           "argv": ["celery-bench", "run", "--quick"], "options": {"quick": True, "rate": None},
           "services": {"redis": {"url": "redis://127.0.0.1:6379/0", "reachable": False}}}
    return results.Run(env, cells)


def test_page_is_self_contained(tmp_path):
    path = write_html(_run(), tmp_path / "r.html")
    text = path.read_text()
    assert "<script" not in text and "<link" not in text and "@import" not in text
    # the only URLs are XML namespace names, which nothing fetches
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    assert not re.search(r"""\b(src|href)=["']?(https?:)?//""", text)
    ids = re.findall(r'\bid="([^"]+)"', text)
    assert len(ids) == len(set(ids)), "ids repeat across charts"
    for section in ("s-publish", "s-worker", "s-locust", "environment"):
        assert f'id="{section}"' in text
    assert "±" in text and "Latency against rate" in text and "Latency over time" in text


def _chart_report(page):
    """Per chart: its id, data series with a drawn path, and the most spectrum curves
    on one axes."""
    return page.evaluate("""() => [...document.querySelectorAll('figure.chart')].map(f => {
        const series = [...f.querySelectorAll('g[id*="-data-"]')];
        // a line is a path; markers alone (a search's steps) are <use> of a marker
        const drawn = series.filter(g => [...g.querySelectorAll('path')].some(
            p => (p.getAttribute('d') || '').length > 10) || g.querySelector('use'));
        const axes = [...f.querySelectorAll('g[id*="-axes_"]')];
        const perAxes = axes.map(a => a.querySelectorAll('g[id*="-data-spectrum"]').length);
        const box = f.querySelector('svg').getBoundingClientRect();
        return {id: f.id, series: series.length, drawn: drawn.length,
                most: Math.max(0, ...perAxes), width: box.width, height: box.height,
                text: f.textContent};
    })""")


def test_report_renders_in_chromium_with_charts_and_no_errors(browser, tmp_path):
    path = write_html(_run(), tmp_path / "report.html")
    shot = tmp_path / "report.png"
    visit = browser.open(path, screenshot=shot)
    assert visit.console_errors == []
    assert visit.blocked == [] and visit.requests == [path.resolve().as_uri()]
    charts = _chart_report(visit.page)
    assert len(charts) >= 8
    for chart in charts:
        assert chart["series"] > 0 and chart["drawn"] == chart["series"], chart["id"]
        assert chart["most"] <= 6, chart
        assert chart["width"] > 200 and chart["height"] > 100, chart
    texts = " ".join(c["text"] for c in charts)
    assert "max sustainable 3,000/s" in texts
    assert "publish latency" in texts and "e2e latency" in texts
    assert "from_intended latency against rate" in texts
    assert "max-rate search" in texts and "SLO p99<5ms" in texts
    assert shot.stat().st_size > 50_000


def test_compare_view_renders_in_chromium(browser, tmp_path):
    base = _run()
    new = _run()
    for c in new.cells:
        if "throughput_per_s" in c.metrics:
            c.metrics["throughput_per_s"] *= 1.5
    path = write_compare_html(base, new, tmp_path / "cmp.html", "base.json", "new.json")
    visit = browser.open(path, screenshot=tmp_path / "cmp.png")
    assert visit.console_errors == [] and visit.blocked == []
    charts = _chart_report(visit.page)
    assert charts and all(c["drawn"] == c["series"] > 0 for c in charts)
    assert all(c["most"] <= 6 for c in charts)
    body = visit.page.inner_text("body")
    assert "base.json" in body and "new.json" in body
    assert "verdict" in body
    # BASE dashed, NEW solid
    assert visit.page.locator('g[id*="-data-spectrum"] path[style*="dasharray"]').count() > 0


def test_compare_view_survives_a_compare_module_that_fails(monkeypatch):
    from bench import compare

    def broken(*a, **k):
        raise RuntimeError("statistics being rewritten")

    monkeypatch.setattr(compare, "compare_runs", broken)
    text = compare_html(_run(), _run())
    assert "compare_runs failed: statistics being rewritten" in text
    assert "<svg" in text


def _ladder_run():
    """A publish ladder over two transports, the calibration loop beside it, and a
    consume cell carrying its recorded x_memory per round."""
    cells = []
    for j, transport in enumerate(("memory", "unix")):
        for i, producer in enumerate(("held", "per-call", "new-connection")):
            cells.append(rich_cell(
                "publish", seed=10 * i + j,
                histograms={"publish": (30.0 * (i + 1), 1500), "e2e": (300.0 * (i + 1), 1500)},
                metrics={"throughput_per_s": 40000.0 / (i + 1) / (j + 1), "sent": 1500,
                         "lost": 0},
                api="kombu", producer=producer, transport=transport, serializer="json",
                payload_bytes=112))
    cells.append(rich_cell("publish", seed=99, histograms={"publish": (5.0, 1500)},
                           metrics={"throughput_per_s": 900000.0, "sent": 1500, "lost": 0},
                           api="calibration", producer="-", transport="loop", serializer="-",
                           payload_bytes=112))
    cells.append(rich_cell("consume", seed=7, histograms={"gap": (20.0, 1500)},
                           metrics={"consume_per_s": 9000.0, "x_memory": 0.4, "lost": 0},
                           transport="unix", serializer="json", ack="late"))
    env = {"python": "3.11", "celery": "5.7", "kombu": "5.7", "cpu_model": "test CPU",
           "cpu_count": 2, "utc_time": "2023-11-14T22:13:20Z"}
    return results.Run(env, cells)


def test_tables_carry_ratios_and_tails_and_no_calibration_row(browser, tmp_path):
    path = write_html(_ladder_run(), tmp_path / "ladder.html")
    visit = browser.open(path, screenshot=tmp_path / "ladder.png")
    assert visit.console_errors == [] and visit.blocked == []
    page = visit.page
    heads = page.evaluate("""() => [...document.querySelectorAll('section table')].map(
        t => [...t.querySelectorAll('thead th')].map(th => th.textContent))""")
    publish = [h for h in heads if "x held (95% CI)" in h]
    assert publish, heads
    for stat in ("p50", "p90", "p99", "p99.9", "max"):
        assert any(h.startswith(stat) for h in publish[0]), (stat, publish[0])
    assert any("x memory (95% CI)" in h for h in heads), heads
    # the recorded ratio is not shown twice (a bare "x memory" column beside the interval)
    assert not any("x memory" in h for hs in heads for h in hs if "CI" not in h)
    ratios = page.evaluate("""() => [...document.querySelectorAll('td.ratio')].map(
        td => td.textContent)""")
    assert "1.00x (1.00-1.00)" in ratios                     # the reference itself
    per_call = [r for r in ratios if r.startswith("0.5")]    # half the held rate
    assert per_call and all("(" in r and "-" in r for r in per_call), ratios
    # the calibration loop: in no results table or chart, shown beside the environment
    rows = page.evaluate("""() => [...document.querySelectorAll('section tbody tr')].map(
        tr => tr.textContent)""")
    assert rows and not [r for r in rows if "calibration" in r or "loop" in r]
    noise = page.inner_text("#noise") + page.inner_text("table.noise")
    assert "calibration" in noise and "api=calibration" in page.inner_text("table.noise")
    charts = _chart_report(page)
    texts = " ".join(c["text"] for c in charts)
    assert "calibration" not in texts and "loop" not in texts
    assert "payload_bytes=112" in texts                      # the facet stays in the title
    assert "throughput, messages per second (msg/s)" in texts
    assert "throughput_per_s (1/s)" not in texts


def test_throughput_bars_are_linear_or_dots_on_log():
    from bench.exporters import charts

    def axes_of(values):
        cells = [rich_cell("publish", seed=i, metrics={"throughput_per_s": v, "lost": 0},
                           api="kombu", producer=str(i)) for i, v in enumerate(values)]
        with charts.style():
            fig = charts.new_figure(8, 3)
            charts.draw_rates(fig, cells, "throughput_per_s", ["producer"])
        return fig.axes[0]

    near = axes_of([1000.0, 3000.0, 9000.0])
    assert near.get_xscale() == "linear" and near.get_xlim()[0] == 0
    assert len(near.patches) == 3                             # bars from zero
    far = axes_of([100.0, 30000.0, 900000.0])
    assert far.get_xscale() == "log" and len(far.patches) == 0   # dots, no bars
    assert "messages per second" in far.get_xlabel()


def test_compare_view_keeps_the_calibration_loop_beside_the_environments():
    text = compare_html(_ladder_run(), _ladder_run(), "a.json", "b.json")
    body, _, tail = text.partition('<h2 id="environment">')
    body = body.partition("<details><summary>as <code>celery-bench compare")[0]  # its own words
    assert "api=calibration" not in body and "calibration · loop" not in body
    noise = tail[tail.index('<table class="noise">'):]
    assert noise.count("api=calibration") == 2 and "a.json" in noise and "b.json" in noise
