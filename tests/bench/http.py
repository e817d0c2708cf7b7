"""HTTP benchmarks: a served app under load from a client in the same process.

The server runs under uvicorn in a thread of its own (its own event loop); the client keeps
``concurrency`` requests in flight. A baseline app is measured the same way in the same run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn

from tests.support import free_port

Request = Callable[[int], tuple[str, dict[str, str], bytes]]


class Served:
    """Serve an ASGI app (with its lifespan) on a free port in a background thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the benchmarked app did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


async def requests_per_second(
    base_url: str,
    make: Request,
    n: int,
    concurrency: int = 32,
    expect: int = 202,
    method: str = "POST",
) -> float:
    """Send ``n`` requests built by ``make(i)``; every answer must be ``expect``."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as http:
        for i in range(min(50, n)):  # warm-up: connections, caches, the first batch
            path, headers, body = make(-1 - i)
            await http.request(method, path, headers=headers, content=body)
        counter = iter(range(n))
        failures: list[int] = []

        async def worker() -> None:
            for i in counter:
                path, headers, body = make(i)
                for attempt in range(3):  # a keep-alive connection closed under our feet
                    try:
                        r = await http.request(method, path, headers=headers, content=body)
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                if r.status_code != expect:
                    failures.append(r.status_code)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. status {failures[0]}")
    return n / elapsed
