"""Engine, sessionmaker, naming convention and the one unit of work.

Services never call ``commit()`` themselves: ``unit_of_work()`` commits once when the block ends and
rolls back when it raises.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    DateTime,
    MetaData,
    bindparam,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from services.common.config import DatabaseSettings

Row = TypeVar("Row")

log = logging.getLogger(__name__)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def metadata() -> MetaData:
    return MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamptz on PostgreSQL; on SQLite, stored as UTC and read back timezone-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a timestamptz column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    url = settings.url
    kwargs: dict[str, Any] = {"echo": settings.echo}
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:  # one in-memory database shared by every session (kaiku simulate)
            kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_size"] = settings.pool_size
        kwargs["pool_pre_ping"] = True
        if settings.schema_name:
            kwargs["connect_args"] = {"server_settings": {"search_path": settings.schema_name}}
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def upsert_insert(session: AsyncSession) -> Any:
    """The INSERT construct of the session's database, which has ON CONFLICT (PostgreSQL's or
    SQLite's): every repository's idempotent writes go through it."""
    return dialect_insert(session.bind.dialect.name if session.bind is not None else "postgresql")


def dialect_insert(dialect: str) -> Any:
    """``upsert_insert`` by the dialect's name."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def one_of(session: AsyncSession, column: Any, values: Any) -> ColumnElement[bool]:
    """``column IN values``. On PostgreSQL it is ``column IN (SELECT unnest($1))`` with the
    values as one array parameter: one bind and one cached statement whatever the number of
    values (an expanding ``IN`` renders a placeholder per value on every execution), and the
    planner joins the values against an index instead of comparing each row with every value
    (``= ANY($1)`` is a linear scan of the array per row). SQLite gets the plain ``IN``."""
    values = list(values)
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        unnested = select(func.unnest(bindparam(None, values, ARRAY(column.type))))
        return cast(ColumnElement[bool], column.in_(unnested))
    return cast(ColumnElement[bool], column.in_(values))


async def claim_oldest(
    session: AsyncSession,
    model: type[Row],
    *where: ColumnElement[bool],
    order_by: Any,
    limit: int,
) -> list[Row]:
    """Up to ``limit`` rows of ``model`` matching ``where``, oldest first, locked with
    ``FOR UPDATE SKIP LOCKED``: the outbox relays of several replicas take different rows."""
    stmt = (
        select(model)
        .where(*where)
        .order_by(order_by)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def unit_of_work(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One transaction: commit when the block ends, roll back when it raises."""
    async with sessions() as session, session.begin():
        yield session


# Held while tables are created, so replicas starting together on an empty database do not race
# (both would see a table missing and one would fail with "already exists").
CREATE_TABLES_LOCK = 0x6B61696B75  # "kaiku"


async def create_tables(engine: AsyncEngine, meta: MetaData, schema: str | None) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": CREATE_TABLES_LOCK}
            )
            if schema:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        await conn.run_sync(meta.create_all)


async def ping(engine: AsyncEngine) -> bool:
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception:  # readiness only reports; the reason is logged
        log.warning("database is not reachable", exc_info=True)
        return False
    return True
