"""Run one service under uvicorn, and exit non-zero when one of its consumers or workers dies,
so the orchestrator restarts it from the last committed offset."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI

from services.common import logging as kaiku_logging
from services.common.config import HttpSettings
from services.common.runtime import Runtime

log = logging.getLogger(__name__)


async def _watch(runtimes: Sequence[Runtime], server: uvicorn.Server) -> None:
    await asyncio.wait(
        [asyncio.create_task(r.failed.wait()) for r in runtimes],
        return_when=asyncio.FIRST_COMPLETED,
    )
    log.critical("a consumer or worker died: shutting down so the orchestrator restarts us")
    server.should_exit = True


async def serve_app(app: Any, runtimes: Sequence[Runtime], http: HttpSettings) -> int:
    config = uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=20,
        proxy_headers=True,
        server_header=False,
    )
    server = uvicorn.Server(config)
    watcher = asyncio.create_task(_watch(runtimes, server))
    try:
        await server.serve()
    finally:
        watcher.cancel()
    if any(r.failed.is_set() for r in runtimes):
        return 1
    return 0 if server.started else 3


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
