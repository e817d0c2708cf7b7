from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.config import DatabaseSettings
from services.common.db import create_engine, create_sessionmaker, create_tables
from services.trigger.models import Base


@pytest.fixture
async def sessions(database: DatabaseSettings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """The trigger's tables in the test's database (PostgreSQL or SQLite)."""
    engine = create_engine(database)
    await create_tables(engine, Base.metadata, database.schema_name)
    yield create_sessionmaker(engine)
    await engine.dispose()
