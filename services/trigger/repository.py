"""All of the trigger's SQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, or_, select, text, tuple_, update
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


async def lock_keys(session: AsyncSession, keys: Sequence[str]) -> None:
    """Serialize fatigue reservations on these keys (customer, account, contact point) across
    every trigger worker until this transaction ends: PostgreSQL advisory locks, taken in one
    statement in a fixed order so workers never deadlock. SQLite has a single writer already."""
    if not keys or session.bind is None or session.bind.dialect.name != "postgresql":
        return
    await session.execute(
        text(
            "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h "
            "FROM unnest(CAST(:keys AS text[])) AS k ORDER BY h) AS ordered"
        ),
        {"keys": sorted(set(keys))},
    )


async def recent_invitations(
    session: AsyncSession,
    *,
    customers: Sequence[str],
    accounts: Sequence[str] = (),
    contacts: Sequence[str] = (),
    since: datetime,
    now: datetime,
) -> list[Invitation]:
    """Invitations of these customers, accounts or contact points created (or to be sent) since
    ``since``, or still pending: the history fatigue limits and coalescing look at."""
    if not customers:
        return []
    who = [Invitation.customer_id.in_(list(customers))]
    if accounts:
        who.append(Invitation.account_id.in_(list(accounts)))
    if contacts:
        who.append(Invitation.contact.in_(list(contacts)))
    stmt = (
        select(Invitation)
        .where(
            or_(*who),
            or_(
                Invitation.created_at >= since,
                Invitation.send_at >= since,
                Invitation.send_at > now,
            ),
        )
        .order_by(Invitation.created_at)
    )
    return list((await session.execute(stmt)).scalars())


async def decisions_for(
    session: AsyncSession, customer_id: str, *, limit: int, before: int | None
) -> list[Decision]:
    """The customer's decisions, newest first; ``before`` is the id to page back from."""
    stmt = select(Decision).where(Decision.customer_id == customer_id)
    if before is not None:
        stmt = stmt.where(Decision.id < before)
    stmt = stmt.order_by(Decision.id.desc()).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def add_invitations(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    if rows:
        await session.execute(insert_stmt(Invitation), rows)


async def mark_cancelled(session: AsyncSession, ids: list[uuid.UUID], now: datetime) -> None:
    if ids:
        await session.execute(
            update(Invitation).where(Invitation.invitation_id.in_(ids)).values(cancelled_at=now)
        )
