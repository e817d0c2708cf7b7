"""HTTP benchmarks: a served app under load from a lean client (``loadgen``) in another process.

The app is built in this process and served by uvicorn in a forked child (the app is started,
with its lifespan, only there), so the server and the client each have a core and a GIL of
their own. A baseline app is measured the same way in the same run.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from tests.bench.loadgen import closed_loop
from tests.support import free_port

Request = Callable[[int], tuple[str, dict[str, str], bytes]]


def _serve(app: Any, port: int) -> None:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
    )
    uvicorn.Server(config).run()


class Served:
    """Serve an ASGI app (with its lifespan) on a free port in a forked process."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        context = multiprocessing.get_context("fork")
        self.process = context.Process(target=_serve, args=(app, self.port), daemon=True)

    def __enter__(self) -> str:
        self.process.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or not self.process.is_alive():
                    raise RuntimeError("the benchmarked app did not start") from None
                time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)  # uvicorn shuts down gracefully
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


async def requests_per_second(
    base_url: str,
    make: Request,
    n: int,
    concurrency: int = 32,
    expect: int = 202,
    method: str = "POST",
) -> float:
    """Send ``n`` requests built by ``make(i)``; every answer must be ``expect``."""

    def build(i: int) -> tuple[str, str, dict[str, str], bytes]:
        return (method, *make(i))

    return await closed_loop(base_url, build, n, concurrency=concurrency, expect=expect)
