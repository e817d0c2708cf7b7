"""Fixtures of the dispatcher's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.config import DatabaseSettings
from services.dispatcher.models import Base
from tests.support import service_tables


@pytest.fixture
async def sessions(database: DatabaseSettings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """The dispatcher's tables in the test's database (PostgreSQL schema or SQLite file)."""
    async with service_tables(database, Base.metadata) as sessions:
        yield sessions
