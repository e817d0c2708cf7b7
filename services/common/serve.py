"""Run one service under uvicorn, and exit non-zero when one of its consumers or workers dies,
so the orchestrator restarts it from the last committed offset.

On SIGTERM (or Ctrl+C) the service shuts down within ``KAIKU_SHUTDOWN_SECONDS`` and exits 0:
readiness turns false and the consumers take no new batch at once; uvicorn stops accepting
connections and finishes the requests in flight (half the budget at most); then the lifespan
stops the runtime (docs/operations-shutdown.md). A second Ctrl+C skips the waiting.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextvars import Context
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from services.common import logging as kaiku_logging
from services.common.config import HttpSettings
from services.common.runtime import Runtime

log = logging.getLogger(__name__)


def shutdown_budget(total: float) -> tuple[int, float]:
    """Of a shutdown budget: the seconds uvicorn waits for requests in flight, and the seconds
    from the signal by which the consumers and workers must have finished what they hold."""
    return max(1, int(total * 0.5)), total * 0.75


class _Server(uvicorn.Server):
    """uvicorn's server, except that a signal also starts the runtimes' shutdown at once, and is
    not re-raised once the shutdown is done: a clean drain exits 0, not 143."""

    def __init__(self, config: uvicorn.Config, runtimes: Sequence[Runtime], budget: float) -> None:
        super().__init__(config)
        self.runtimes = runtimes
        self.budget = budget
        self.loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl+C: stop waiting for HTTP connections
            return
        self.should_exit = True
        if self.loop is not None:  # a signal handler: hand over to the event loop, in a
            # context of its own (not that of the task the signal interrupted, with its ids)
            name = signal.Signals(sig).name
            self.loop.call_soon_threadsafe(self.begin_shutdown, name, context=Context())

    def begin_shutdown(self, why: str) -> None:
        log.info("%s: shutting down within %gs", why, self.budget)
        for runtime in self.runtimes:
            runtime.begin_shutdown()


async def _watch(runtimes: Sequence[Runtime], server: _Server) -> None:
    await asyncio.wait(
        [asyncio.create_task(r.failed.wait()) for r in runtimes],
        return_when=asyncio.FIRST_COMPLETED,
    )
    log.critical("a consumer or worker died: shutting down so the orchestrator restarts us")
    server.should_exit = True
    server.begin_shutdown("a consumer or worker died")


def tune_gc(threshold: int) -> None:
    """Once a service has started: move everything alive to the collector's permanent
    generation (``gc.freeze``: the modules, the app and its settings are never garbage, and no
    collection scans them again) and let ``threshold`` allocations pass between runs of the
    youngest generation. A consumer batch or a ``/v1/scores`` report creates tens of thousands
    of objects that stay alive until it is done; with Python's default (700) the collector ran
    about every 700 of them and, every hundredth run or so, over the whole heap (half the time
    of a 24,000-group report's reads)."""
    gc.collect()
    gc.freeze()
    if threshold:
        _, second, third = gc.get_threshold()
        gc.set_threshold(threshold, second, third)


async def _when_listening(server: uvicorn.Server, callback: Callable[[], None]) -> None:
    """Call ``callback`` once the server accepts connections (uvicorn binds its socket only after
    the lifespan's startup, so a line printed at startup could name a port not yet open)."""
    while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, it has no event
        await asyncio.sleep(0.02)
    callback()


async def serve_app(
    app: Any,
    runtimes: Sequence[Runtime],
    http: HttpSettings,
    on_listening: Callable[[], None] | None = None,
) -> int:
    http_seconds, drain_seconds = shutdown_budget(http.shutdown_seconds)
    for runtime in runtimes:
        runtime.shutdown_seconds = http.shutdown_seconds
        runtime.drain_seconds = drain_seconds
    config = uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=http_seconds,
        proxy_headers=True,
        server_header=False,
    )
    server = _Server(config, runtimes, http.shutdown_seconds)
    server.loop = asyncio.get_running_loop()
    watchers = [
        asyncio.create_task(_watch(runtimes, server)),
        asyncio.create_task(_when_listening(server, lambda: tune_gc(http.gc_threshold))),
    ]
    if on_listening is not None:
        watchers.append(asyncio.create_task(_when_listening(server, on_listening)))
    try:
        await server.serve()
    finally:
        for watcher in watchers:
            watcher.cancel()
    if any(r.failed.is_set() for r in runtimes):
        return 1
    if server.started:
        log.info("shut down cleanly")
        return 0
    return 3


def _factory(name: str) -> Callable[[], FastAPI]:
    if name == "trigger":
        from services.trigger.app import create_app as trigger

        return trigger
    if name == "dispatcher":
        from services.dispatcher.app import create_app as dispatcher

        return dispatcher
    from services.collector.app import create_app as collector

    return collector


def main(name: str) -> None:
    """Entry point of ``python -m services.<name>``."""
    http = HttpSettings()
    kaiku_logging.configure(http.log_level, os.environ.get("KAIKU_LOG_FORMAT", "json"))
    from services.common.program import ProgramError

    try:
        app = _factory(name)()
    except ProgramError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(serve_app(app, [app.state.runtime], http)))
