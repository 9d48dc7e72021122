"""Headless Chromium for tests: Debian's ``chromium`` driven through playwright's Python
package (``executable_path``; playwright's own browser download is never used).

``browser`` is a fixture (import it into a test module: ``from browser import browser``)
whose ``open(url_or_path, screenshot=PATH)`` loads a page and returns a :class:`Visit`
with what the page said on its console, the errors it raised, and every request it made.
Where the browser or playwright is missing the test is skipped with the reason, except
with ``CI=true``, where it fails: CI installs both (``make install``).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("file", "data", "about", "blob") or \
        (parts.hostname or "") in LOCAL_HOSTS


def chromium_path() -> str | None:
    """``$CELERY_BENCH_CHROMIUM`` (if it is an executable), else Debian's chromium on the
    PATH."""
    chosen = os.environ.get("CELERY_BENCH_CHROMIUM")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _missing(reason: str):
    if IN_CI:
        pytest.fail(f"the browser tests must run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class Visit:
    """What a page did while it loaded."""
    page: object                                    # playwright Page, still open
    console: list = field(default_factory=list)     # [(type, text)]
    errors: list = field(default_factory=list)      # uncaught exceptions
    requests: list = field(default_factory=list)    # every URL asked for
    blocked: list = field(default_factory=list)     # URLs refused (not local)

    @property
    def console_errors(self) -> list[str]:
        return [text for kind, text in self.console if kind == "error"] + self.errors


class Browser:
    def __init__(self, context):
        self.context = context

    def open(self, target, screenshot=None, local_only: bool = True,
             wait_until: str = "load", width: int = 1280, height: int = 900) -> Visit:
        """Load ``target`` (a URL or a file path). ``local_only``: refuse (and record) any
        request that is not a file or loopback URL, so a page that needs the network shows
        it. ``screenshot``: a full-page PNG written there."""
        url = target if "://" in str(target) else Path(target).resolve().as_uri()
        page = self.context.new_page()
        page.set_viewport_size({"width": width, "height": height})
        visit = Visit(page)
        page.on("console", lambda m: visit.console.append((m.type, m.text)))
        page.on("pageerror", lambda exc: visit.errors.append(str(exc)))

        def route(r):
            req_url = r.request.url
            visit.requests.append(req_url)
            if local_only and not is_local(req_url):
                visit.blocked.append(req_url)
                return r.abort()
            return r.continue_()

        page.route("**/*", route)
        page.goto(url, wait_until=wait_until)
        if screenshot:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        return visit


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with a fresh profile under ``tmp_path``."""
    exe = chromium_path()
    if not exe:
        _missing("no chromium browser: apt-get install chromium (or set CELERY_BENCH_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("no playwright Python package: pip install playwright (make install)")
    profile = tmp_path / "chromium-profile"
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield Browser(context)
        finally:
            context.close()
