"""A lean HTTP/1.1 load generator for the benchmarks (in the spirit of wrk and wrk2).

httpx costs more CPU per request than a small FastAPI endpoint does to answer it, so a
benchmark loaded through it measures the client. This one writes prebuilt requests on
keep-alive connections (asyncio streams) and reads back the status line, the headers and the
body (``Content-Length`` or chunked): a few tens of microseconds per request.

- ``closed_loop``: ``concurrency`` connections each send the next request as soon as the last
  one is answered (throughput).
- ``open_loop``: requests start on a fixed schedule (``rate`` per second) whatever the answers
  do; a request that finds every connection busy waits, and its latency still counts from its
  scheduled start (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

# (method, path, headers, body) of request i
Build = Callable[[int], tuple[str, str, dict[str, str], bytes]]


def raw_request(host: str, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive connection; reopened when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> int:
        """Send one request; its status code. A connection found closed is reopened once."""
        for attempt in (1, 2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(raw)
                return await self._response()
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _response(self) -> int:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        if fields.get("transfer-encoding") == "chunked":
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
        else:
            await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection") == "close":
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Outcome:
    index: int
    scheduled: float  # time.monotonic() the request was due to start
    status: int


async def closed_loop(
    url: str, build: Build, n: int, *, concurrency: int = 32, expect: int = 200
) -> float:
    """Requests per second answered, ``n`` requests on ``concurrency`` connections, after a
    warm-up of 50; every answer must have status ``expect``."""
    host, port = _address(url)
    conns = [Connection(host, port) for _ in range(concurrency)]
    for i in range(min(50, n)):
        await conns[i % concurrency].request(raw_request(host, *build(-1 - i)))
    counter = iter(range(n))
    failures: list[int] = []

    async def worker(conn: Connection) -> None:
        for i in counter:
            status = await conn.request(raw_request(host, *build(i)))
            if status != expect:
                failures.append(status)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.close()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. status {failures[0]}")
    return n / elapsed


async def open_loop(
    url: str, build: Build, *, rate: float, n: int, concurrency: int = 256
) -> tuple[list[Outcome], float]:
    """Start request i at ``i / rate`` seconds; the outcomes and the seconds the offering took."""
    host, port = _address(url)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(concurrency):
        idle.put_nowait(Connection(host, port))
    outcomes: list[Outcome] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        raw = raw_request(host, *build(i))
        conn = await idle.get()
        try:
            outcomes.append(Outcome(i, due, await conn.request(raw)))
        except (OSError, asyncio.IncompleteReadError):
            outcomes.append(Outcome(i, due, 0))
        finally:
            idle.put_nowait(conn)

    started = time.monotonic()
    for i in range(n):
        due = started + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    offered_for = time.monotonic() - started
    await asyncio.gather(*tasks)
    while not idle.empty():
        idle.get_nowait().close()
    return outcomes, offered_for


def _address(url: str) -> tuple[str, int]:
    hostport = url.removeprefix("http://").split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return host, int(port)
