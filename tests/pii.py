"""Test helper for erasure: which tables of a service still hold any of some strings."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import MetaData, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


def _text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


async def tables_holding(
    sessions: async_sessionmaker[AsyncSession], metadata: MetaData, needles: Iterable[str]
) -> dict[str, list[str]]:
    """Table name → the columns (``column=value``) of its rows holding any of ``needles``
    (case-insensitively), over every table of ``metadata``; empty when none does."""
    wanted = [n.lower() for n in needles]
    found: dict[str, list[str]] = {}
    async with sessions() as session:
        for table in metadata.sorted_tables:
            for row in (await session.execute(select(table))).mappings():
                for column, value in row.items():
                    text = _text(value).lower()
                    if any(n in text for n in wanted):
                        found.setdefault(table.name, []).append(f"{column}={_text(value)[:80]}")
    return found
