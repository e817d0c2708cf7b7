"""Creating tables on start: replicas starting together on an empty database all come up."""

from __future__ import annotations

import asyncio

from sqlalchemy import inspect

from services.common.config import DatabaseSettings
from services.common.db import create_engine, create_tables
from services.dispatcher.models import Base


async def test_replicas_creating_the_tables_at_once_all_succeed(postgres: DatabaseSettings) -> None:
    engines = [create_engine(postgres) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(create_tables(e, Base.metadata, postgres.schema_name) for e in engines),
            return_exceptions=True,
        )
        assert [r for r in results if r is not None] == []
        async with engines[0].connect() as conn:
            tables = await conn.run_sync(
                lambda c: inspect(c).get_table_names(schema=postgres.schema_name)
            )
        assert set(Base.metadata.tables) <= set(tables)
    finally:
        for e in engines:
            await e.dispose()
