"""All of the trigger's SQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert as insert_stmt
from sqlalchemy import select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.trigger.models import Decision, ProcessedEvent

EventKey = tuple[str, str]


async def processed(
    session: AsyncSession, keys: Sequence[EventKey]
) -> dict[EventKey, list[dict[str, Any]]]:
    """What was published for the events among ``keys`` that were handled before."""
    if not keys:
        return {}
    rows = await session.execute(
        select(ProcessedEvent.source, ProcessedEvent.event_id, ProcessedEvent.published).where(
            tuple_(ProcessedEvent.source, ProcessedEvent.event_id).in_(list(keys))
        )
    )
    return {(r.source, r.event_id): r.published for r in rows}


async def mark_processed(session: AsyncSession, rows: list[dict[str, Any]]) -> set[EventKey]:
    """Insert processed markers in one statement; return the keys this call inserted (another
    consumer may have won a race for the rest)."""
    if not rows:
        return set()
    dialect = session.bind.dialect.name if session.bind is not None else "postgresql"
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(ProcessedEvent)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["source", "event_id"])
        .returning(ProcessedEvent.source, ProcessedEvent.event_id)
    )
    result = await session.execute(stmt)
    return {(r.source, r.event_id) for r in result}


async def record_decisions(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    if rows:
        await session.execute(insert_stmt(Decision), rows)
