"""All of the trigger's SQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, or_, select, tuple_, update
from sqlalchemy import insert as insert_stmt
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.trigger.models import Decision, Invitation, ProcessedEvent

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


async def set_published(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Store what was published for each event (rows of source, event_id, published)."""
    if rows:
        table = cast(Table, ProcessedEvent.__table__)  # Core: an executemany by key
        await session.execute(
            update(table)
            .where(
                table.c.source == bindparam("b_source"),
                table.c.event_id == bindparam("b_event_id"),
            )
            .values(published=bindparam("b_published")),
            [
                {
                    "b_source": r["source"],
                    "b_event_id": r["event_id"],
                    "b_published": r["published"],
                }
                for r in rows
            ],
        )


async def recent_invitations(
    session: AsyncSession, customers: Sequence[str], since: datetime, now: datetime
) -> list[Invitation]:
    """The customers' invitations created since ``since`` or still pending, oldest first."""
    if not customers:
        return []
    stmt = (
        select(Invitation)
        .where(
            Invitation.customer_id.in_(list(customers)),
            or_(Invitation.created_at >= since, Invitation.send_at > now),
        )
        .order_by(Invitation.created_at)
    )
    return list((await session.execute(stmt)).scalars())


async def add_invitations(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    if rows:
        await session.execute(insert_stmt(Invitation), rows)


async def mark_cancelled(session: AsyncSession, ids: list[uuid.UUID], now: datetime) -> None:
    if ids:
        await session.execute(
            update(Invitation).where(Invitation.invitation_id.in_(ids)).values(cancelled_at=now)
        )
