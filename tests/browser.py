"""Real headless Chromium for page tests: Debian's ``chromium`` driven through Playwright, a live
server that runs an app under uvicorn (lifespan included) for it, and axe-core checks.

The browser is the system's (``make test`` installs Debian's ``chromium``); Playwright never
downloads one. Tests that use the ``browser`` fixture are plain ``def`` functions (Playwright's
sync API); the app under test runs in a thread of its own with its own event loop, and
``LiveServer.run`` runs a coroutine there (publish a message, read the database).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from axe_playwright_python.sync_playwright import Axe  # type: ignore[import-untyped]
from playwright.sync_api import Browser, Page, sync_playwright

from services.embedded import free_port

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "var" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHONE: dict[str, Any] = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}
WCAG_21_AA = ("wcag2a", "wcag2aa", "wcag21a", "wcag21aa")


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Debian's chromium is not installed (the page tests drive it through Playwright): "
            "run `make test`, or `apt-get install chromium`"
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module."""
    executable = chromium_path()
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as exc:
            pytest.fail(f"cannot start {executable} through Playwright: {exc}")
        yield launched
        launched.close()


def axe_violations(page: Page, tags: Sequence[str] = WCAG_21_AA) -> str:
    """axe-core's violations of ``tags`` on the page as it is now: "" when there are none,
    else a report naming each rule, element and reason."""
    options = {"runOnly": {"type": "tag", "values": list(tags)}, "resultTypes": ["violations"]}
    results = Axe().run(page, options=options)
    if not results.violations_count:
        return ""
    return f"{page.url}: {results.generate_report()}"


def screenshot(page: Page, name: str) -> Path:
    """A full-page screenshot at ``var/screenshots/<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


class LiveServer:
    """An ASGI app under uvicorn on a free local port, in a thread with its own event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="live-server")
        self._server: uvicorn.Server | None = None
        self._serving: concurrent.futures.Future[None] | None = None
        self.url = ""

    def __enter__(self) -> LiveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, app: Any, timeout: float = 30.0) -> str:
        """Start serving ``app`` (its lifespan first); returns its base URL."""
        port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, lifespan="on", log_config=None, access_log=False
        )
        self._server = uvicorn.Server(config)
        self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(), self.loop)

        async def started() -> None:
            assert self._server is not None and self._serving is not None
            while not self._server.started:
                if self._serving.done():
                    raise RuntimeError("the app did not start under uvicorn (see the log)")
                await asyncio.sleep(0.02)

        self.run(started(), timeout)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            self._serving.result(30)
            self._server = None
