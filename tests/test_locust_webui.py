"""The real Locust web UI in headless Chromium (tests/browser.py): a bad choice gets one
message in the form, a started test fills the celery-bench tab with non-zero microsecond
percentiles, our page draws the percentile spectrum and serves the results file, Stop
stops, and quitting stops the Celery workers the UI's test started.

Skipped with the reason where Chromium or playwright is missing, except with CI=true."""
import json
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import results
from browser import browser  # noqa: F401  (the fixture)
from test_locust import ROOT, locust_cmd, locust_env, stop_with
from test_locust_celery import PIDS, alive, free_port, wait_for, worker_pids

TAB = "celery-bench (us)"


@dataclass
class LocustUI:
    """A Locust web UI this test started, and the browser page open on its form."""
    port: int
    log: Path
    proc: subprocess.Popen | None = None
    visit: object = None

    def stop(self) -> None:
        """SIGTERM (Locust quits, stopping the workers it started); idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            stop_with(self.proc, signal.SIGTERM)


@pytest.fixture
def locust_ui(tmp_path, browser):  # noqa: F811
    """``locust_ui(cwd, *locust args, screenshot=None)``: start Locust's web UI on a free
    port, logging to tmp_path/locust.log, wait until it listens and open its form in the
    browser. Stopped at the end of the test if the test did not stop it."""
    started = []

    def start(cwd, *args, screenshot=None) -> LocustUI:
        ui = LocustUI(free_port(), tmp_path / "locust.log")
        cmd = locust_cmd("--web-host", "127.0.0.1", "--web-port", ui.port, *args)
        with open(ui.log, "w") as fh:
            ui.proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                       env=locust_env())
        started.append(ui)
        wait_for(ui.log, "Starting web interface", proc=ui.proc)
        _listening(ui.port, ui.proc)           # Locust logs that line before it binds
        ui.visit = browser.open(f"http://127.0.0.1:{ui.port}/", screenshot=screenshot)
        ui.visit.page.wait_for_selector("form input[name=userCount]", timeout=30_000)
        return ui

    yield start
    for ui in started:
        ui.stop()


def test_web_ui_tab_page_and_bad_choice(tmp_path, browser, locust_ui):  # noqa: F811
    ui = locust_ui(tmp_path, "--transport", "unix", "--pool", "solo", "--interval", "0.01",
                   "KombuPublisher", "TaskRoundTrip", screenshot=tmp_path / "form.png")
    port, log, visit = ui.port, ui.log, ui.visit
    page = visit.page
    try:
        # The form offers only what works: fifo is left out, Host says it is not used.
        options = page.locator("select[name=transport] option").all_inner_texts()
        assert "unix" in options and "fifo" not in options
        assert page.input_value("input[name=host]") == "celery-bench://broker-from-transport"
        page.fill("input[name=host]", "http://example.com")
        page.fill("input[name=userCount]", "2")
        page.fill("input[name=spawnRate]", "2")
        page.click("button[type=submit]")
        alert = page.get_by_role("alert").filter(has_text="Host is not used by celery-bench")
        alert.wait_for(timeout=30_000)
        assert page.locator("form").count() == 1          # nothing started

        page.fill("input[name=host]", "celery-bench://broker-from-transport")
        page.click("button[type=submit]")             # starts the Celery worker, then the test
        tab, alert = page.get_by_role("tab", name=TAB), page.get_by_role("alert")
        tab.or_(alert).first.wait_for(timeout=90_000)
        assert not alert.count(), alert.all_inner_texts()
        tab.click()
        rows = _rows_with_percentiles(page, {"kombu", "total"}, timeout_s=90)
        for row in rows.values():
            p50, p99, mx = (int(row[k]) for k in ("p50 us", "p99 us", "max us"))
            assert 0 < p50 <= p99 <= mx                # exact microseconds, never a rounded 0
        assert {"enqueue", "queue wait", "run", "result", "total"} <= set(rows)
        page.screenshot(path=str(tmp_path / "tab.png"), full_page=True)

        # Download Data links to our page; it draws the spectrum and serves the results file.
        page.get_by_role("tab", name="Download Data").click()
        link = page.get_by_role("link", name=re.compile("percentile spectrum chart"))
        href = link.get_attribute("href")
        assert href.endswith("/celery-bench/")
        ours = browser.open(f"http://127.0.0.1:{port}{href}").page
        ours.wait_for_function(
            "document.querySelectorAll('#spectrum polyline.series').length >= 6",
            timeout=30_000)
        labels = ours.eval_on_selector_all("#spectrum polyline.series",
                                           "els => els.map(e => e.dataset.label)")
        assert any(label.startswith("kombu publish unix/held") for label in labels)
        assert int(ours.locator("#percentiles tbody tr td[data-col=p50]").first
                   .inner_text().replace(",", "")) > 0
        ours.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        download = ours.request.get(
            f"http://127.0.0.1:{port}{href}" + ours.get_attribute("#download", "href"))
        assert download.ok
        run = json.loads(download.text())
        results.validate(run)
        assert {c["params"]["request_type"] for c in run["cells"]} >= {"kombu", "total"}
        assert all(c["histograms"]["latency"]["count"] > 0 for c in run["cells"])
        assert not visit.console_errors, visit.console_errors
        ours_visit = browser.open(f"http://127.0.0.1:{port}{href}")
        ours_visit.page.wait_for_selector("#percentiles tbody tr", timeout=30_000)
        assert not ours_visit.console_errors, ours_visit.console_errors   # favicon: no 404
        _same_counts(ours_visit.page, port)

        stop_from_the_ui(page)
        pids = worker_pids(log.read_text())
    finally:
        ui.stop()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), PIDS.pattern


def stop_from_the_ui(page, tries: int = 3) -> None:
    """Click Locust's Stop until the page says STOPPED (20 s a try), as a user would click
    again. In one CI run and one of four runs beside two CPU burners the page never said
    STOPPED within 60 s of a single click (the users had stopped sending; cause not found:
    a click lost while the header re-renders, or a user slow to die). A runner that never
    stops still fails here after the last try."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(tries):
        stop = page.get_by_role("button", name="Stop")
        try:
            if attempt == 0 or stop.count():   # gone once the first click took: just wait
                stop.click(timeout=5_000)
        except PlaywrightTimeout:
            pass                               # it went while the header re-rendered
        try:
            page.get_by_text("STOPPED", exact=False).first.wait_for(timeout=20_000)
            return
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise


def _listening(port, proc, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Locust's web UI is not listening on {port}") from None
            time.sleep(0.1)


def _same_counts(page, port) -> None:
    """The tab's data (Locust's /stats/requests poll) and the page's stats.json read the same
    snapshot: fetched between two reads of one snapshot, the tab has its counts exactly."""
    base = f"http://127.0.0.1:{port}"
    for _ in range(20):
        first = page.request.get(f"{base}/celery-bench/stats.json").json()
        tab = page.request.get(f"{base}/stats/requests").json()
        last = page.request.get(f"{base}/celery-bench/stats.json").json()
        if first["taken"] != last["taken"]:
            continue                                  # a new snapshot in between: again
        (entry,) = [e for e in tab["extended_stats"] if e["key"] == "celery-bench"]
        counts = {(r["type"], r["name"]): r["requests"] for r in entry["data"]}
        assert counts == {(r["type"], r["name"]): r["requests"] for r in first["rows"]}
        assert sum(counts.values()) > 0
        return
    raise AssertionError("no two reads of stats.json shared a snapshot")


def test_class_picker_ticks_what_was_named_and_the_transport_runs(locust_ui):
    """locust.conf turns the picker on; named KombuPublisher and TaskRoundTrip on memory (no
    worker can reach it): only KombuPublisher is ticked, Start works, one request per
    publish in Locust's own table, nothing in the console, no warning in the Logs tab."""
    ui = locust_ui(ROOT, "--transport", "memory", "KombuPublisher", "TaskRoundTrip")
    port, log, visit = ui.port, ui.log, ui.visit
    page = visit.page
    try:
        ticks = {}
        for name in ("KombuPublisher", "CeleryPublisher", "TaskRoundTrip", "GroupJoin"):
            row = page.locator("tr").filter(has=page.get_by_role("cell", name=name,
                                                                 exact=True))
            ticks[name] = row.locator("input[type=checkbox]").is_checked()
        assert ticks == {"KombuPublisher": True, "CeleryPublisher": False,
                         "TaskRoundTrip": False, "GroupJoin": False}
        page.fill("input[name=userCount]", "1")
        page.fill("input[name=spawnRate]", "1")
        page.click("button[type=submit]")
        tab, alert = page.get_by_role("tab", name=TAB), page.get_by_role("alert")
        tab.or_(alert).first.wait_for(timeout=60_000)
        assert not alert.count(), alert.all_inner_texts()
        tab.click()
        _rows_with_percentiles(page, {"kombu"}, timeout_s=60)
        page.get_by_role("tab", name="Logs").click()
        page.wait_for_timeout(2500)                   # a log poll
        text = log.read_text()
        assert "WARNING" not in text and "No hostname was supplied" not in text, text[-3000:]
        assert not visit.console_errors, visit.console_errors
        stats = page.request.get(f"http://127.0.0.1:{port}/stats/requests").json()
        assert {(s["method"], s["name"]) for s in stats["stats"]
                if s["name"] != "Aggregated"} == {("kombu", "publish memory/held")}
        stop_from_the_ui(page)
    finally:
        ui.stop()
    assert "Traceback" not in log.read_text()


def _rows_with_percentiles(page, types: set, timeout_s: float) -> dict:
    """The tab's rows by type, once every type in ``types`` has a p50 (the UI polls every
    2 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        heads = page.locator("table thead th").all_inner_texts()
        rows = {}
        for tr in page.locator("table tbody tr").all():
            cells = tr.locator("td").all_inner_texts()
            if len(cells) == len(heads):
                row = dict(zip(heads, cells))
                rows[row["Type"]] = row
        if all(rows.get(t, {}).get("p50 us", "").strip().isdigit() for t in types):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"no percentiles for {types} in the tab: {rows}")
        page.wait_for_timeout(500)
