"""A service's moving parts (engine, producer, consumer loops, background tasks) and their order
of starting and stopping, shared by the three FastAPI apps' lifespans.

Stopping (docs/operations-shutdown.md) runs within ``shutdown_seconds`` of the SIGTERM:
``begin_shutdown`` (at the signal) turns readiness false and lets no consumer take a new batch;
``stop`` (the lifespan's end, once uvicorn has drained HTTP) asks the workers to finish their
round, waits until ``drain_seconds`` for the consumers' batches in hand (committed, then the
group left) and the workers, then closes the clients, flushes the producer and closes the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import MetaData

from services.common import migrations
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.db import create_engine, create_sessionmaker, ping
from services.common.http import install_error_handlers, install_health
from services.common.kafka import (
    ConsumerLoop,
    Decoder,
    Handler,
    M,
    Prepare,
    Producer,
    ensure_topics,
)

log = logging.getLogger(__name__)


class Worker:
    """Base of a background worker that sleeps until woken or its poll interval passes, and that
    finishes the round in hand when asked to stop."""

    def __init__(self, poll_seconds: float) -> None:
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self.stopping = False

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()

    async def idle(self) -> None:
        """Wait for a wake-up, a stop or the poll interval, whichever comes first."""
        if self.stopping:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.poll_seconds)


class Runtime:
    def __init__(
        self, *, name: str, kafka: KafkaSettings, database: DatabaseSettings, metadata: MetaData
    ) -> None:
        self.name = name
        self.kafka = kafka
        self.database = database
        self.metadata = metadata
        self.engine = create_engine(database)
        self.sessions = create_sessionmaker(self.engine)
        self.producer = Producer(kafka)
        self.loops: list[ConsumerLoop[Any]] = []
        self._workers: list[
            tuple[str, Callable[[], Coroutine[Any, Any, None]], Callable[[], None] | None]
        ] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.failed = asyncio.Event()
        self._closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        # The whole shutdown, and the part of it for finishing work, both counted from the
        # SIGTERM; serve.py derives both from KAIKU_SHUTDOWN_SECONDS.
        self.shutdown_seconds = 20.0
        self.drain_seconds = 15.0
        self._shutdown_began: float | None = None

    @property
    def group_prefix(self) -> str:
        return f"{self.kafka.topic_prefix}{self.name}"

    def add_loop(self, loop: ConsumerLoop[Any]) -> None:
        self.loops.append(loop)

    def consume(
        self,
        name: str,
        topic: str,
        decode: Decoder[M],
        handler: Handler[M],
        after_batch: Callable[[], None] | None = None,
        prepare: Prepare[M] | None = None,
        group: str | None = None,
    ) -> ConsumerLoop[M]:
        """Run ``handler`` over ``topic`` in this service's consumer group (or in
        ``<prefix><service>.<group>`` when a service reads several topics in separate loops)."""
        loop = ConsumerLoop(
            name=name,
            topic=topic,
            group_id=f"{self.group_prefix}.{group}" if group else self.group_prefix,
            decode=decode,
            handler=handler,
            sessions=self.sessions,
            producer=self.producer,
            settings=self.kafka,
            after_batch=after_batch,
            prepare=prepare,
        )
        self.add_loop(loop)
        return loop

    def add_worker(
        self,
        name: str,
        run: Callable[[], Coroutine[Any, Any, None]],
        stop: Callable[[], None] | None = None,
    ) -> None:
        """A background coroutine (a scheduler, an outbox relay). On shutdown ``stop`` asks it to
        finish what it holds and return; without one, or if it takes too long, it is cancelled."""
        self._workers.append((name, run, stop))

    def on_stop(self, close: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Close something (an HTTP client) after the consumers and workers have stopped."""
        self._closers.append(close)

    async def start(self) -> None:
        schema = self.database.schema_name
        if self.database.migrate == "auto":
            await migrations.upgrade(self.engine, self.name, schema)
        await migrations.ensure_current(self.engine, self.name, schema)
        if self.kafka.create_topics:
            await ensure_topics(self.kafka)
        await self.producer.start()
        # Consumers join their groups concurrently: a join waits for the group to settle.
        await asyncio.gather(*(loop.start() for loop in self.loops))
        for loop in self.loops:
            assert loop._task is not None
            loop._task.add_done_callback(self._on_done)
        for name, run, _stop in self._workers:
            task = asyncio.create_task(run(), name=f"{self.name}-{name}")
            task.add_done_callback(self._on_done)
            self._tasks[name] = task
        log.info("%s started", self.name)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("%s: %s died: %r", self.name, task.get_name(), exc)
            self.failed.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown_began is not None

    def begin_shutdown(self) -> None:
        """The shutdown's first step, at the SIGTERM: readiness turns false and no consumer
        takes a new batch (the batches in hand go on). Idempotent; ``stop`` does the rest."""
        if self._shutdown_began is not None:
            return
        self._shutdown_began = time.monotonic()
        for loop in self.loops:
            loop.request_stop()
        log.info("%s: shutting down: not ready; no consumer takes a new batch", self.name)

    def _left(self, seconds: float) -> float:
        """Seconds until ``seconds`` after the shutdown began."""
        assert self._shutdown_began is not None
        return max(0.0, self._shutdown_began + seconds - time.monotonic())

    async def stop(self) -> None:
        """Stop taking work, finish and commit what is in hand, then close connections: the
        work within ``drain_seconds`` of the shutdown's start, everything within
        ``shutdown_seconds``. What does not finish in time is cancelled: a consumer's batch
        uncommitted (redone by the next owner, idempotently), a send in flight left in doubt."""
        self.begin_shutdown()
        assert self._shutdown_began is not None
        drain = self._left(self.drain_seconds)
        for name, _run, stop in self._workers:
            task = self._tasks.get(name)
            if task is not None:
                if stop is None:
                    task.cancel()
                else:
                    stop()
        log.info(
            "%s: finishing what %d consumer(s) and %d worker(s) hold (%.1fs left)",
            self.name,
            len(self.loops),
            len(self._tasks),
            drain,
        )
        workers = asyncio.create_task(self._finish_workers(drain))
        try:
            drained = await asyncio.wait_for(
                asyncio.gather(*(loop.stop(drain) for loop in self.loops), return_exceptions=True),
                max(1.0, self._left(self.shutdown_seconds)),
            )
        except TimeoutError:
            log.error("%s: the consumers did not leave their groups in time", self.name)
            drained = []
        finished = await workers
        log.info(
            "%s: %d of %d consumer(s) committed their batch in hand and left their group; "
            "%d of %d worker(s) finished their round",
            self.name,
            sum(d is True for d in drained),
            len(self.loops),
            finished,
            len(self._tasks),
        )
        for close in self._closers:
            await self._bounded(close(), "a client")
        await self._bounded(self.producer.stop(), "the producer")  # flushes what is pending
        await self._bounded(self.engine.dispose(), "the database pool")
        log.info("%s: producer flushed, clients and database pool closed", self.name)
        log.info("%s stopped in %.1fs", self.name, time.monotonic() - self._shutdown_began)

    async def _finish_workers(self, timeout: float) -> int:
        """Wait for the workers (already asked to stop) to finish their round; cancel those
        still busy after ``timeout`` seconds. Returns how many finished."""
        tasks = dict(self._tasks)
        if not tasks:
            return 0
        _done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
        for name, task in tasks.items():
            if task in pending:
                log.warning(
                    "%s: worker %s did not finish its round within %.1fs; cancelled",
                    self.name,
                    name,
                    timeout,
                )
                task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return sum(not t.cancelled() for t in tasks.values())

    async def _bounded(self, closing: Coroutine[Any, Any, None], what: str) -> None:
        """Close something within the shutdown budget (at least a second), logging a failure."""
        try:
            await asyncio.wait_for(closing, max(1.0, self._left(self.shutdown_seconds)))
        except Exception as exc:  # the process is exiting: report and go on
            log.warning("%s: closing %s failed: %r", self.name, what, exc)

    async def liveness(self) -> dict[str, bool]:
        checks = {f"consumer:{loop.name}": loop.healthy for loop in self.loops}
        checks.update({f"worker:{n}": not t.done() for n, t in self._tasks.items()})
        return checks

    async def readiness(self) -> dict[str, bool]:
        if self.shutting_down:  # at once, so that the Service stops routing here
            return {"accepting_work": False}
        database, broker = await asyncio.gather(ping(self.engine), self.producer.ping())
        return {"database": database, "broker": broker, **await self.liveness()}


def service_app(title: str, runtime: Runtime) -> FastAPI:
    """A FastAPI app whose lifespan starts and stops ``runtime``, with JSON errors, ``/healthz``,
    ``/readyz`` and ``/metrics``."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan)
    app.state.runtime = runtime
    install_error_handlers(app)
    install_health(app, runtime.liveness, runtime.readiness)
    return app
