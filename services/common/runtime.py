"""A service's moving parts (engine, producer, consumer loops, background tasks) and their order
of starting and stopping, shared by the three FastAPI apps' lifespans."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import MetaData

from services.common.config import DatabaseSettings, KafkaSettings
from services.common.db import create_engine, create_sessionmaker, create_tables, ping
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
        self.drain_seconds = 15.0

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
        if self.database.create_tables:
            await create_tables(self.engine, self.metadata, self.database.schema_name)
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

    async def stop(self) -> None:
        """Stop taking work, finish and commit what is in hand, then close connections."""
        await asyncio.gather(*(loop.stop() for loop in self.loops), return_exceptions=True)
        for name, _run, stop in self._workers:
            task = self._tasks.get(name)
            if task is None:
                continue
            if stop is not None:
                stop()
                try:
                    await asyncio.wait_for(asyncio.shield(task), self.drain_seconds)
                except BaseException:  # noqa: S110 - cancelled below; errors already logged
                    pass
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for close in self._closers:
            await close()
        await self.producer.stop()
        await self.engine.dispose()
        log.info("%s stopped", self.name)

    async def liveness(self) -> dict[str, bool]:
        checks = {f"consumer:{loop.name}": loop.healthy for loop in self.loops}
        checks.update({f"worker:{n}": not t.done() for n, t in self._tasks.items()})
        return checks

    async def readiness(self) -> dict[str, bool]:
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
