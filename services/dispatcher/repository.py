"""All of the dispatcher's SQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.db import upsert_insert
from services.dispatcher.models import Send


async def schedule(session: AsyncSession, rows: list[dict[str, Any]]) -> int:
    """Store new sends; an invitation seen before is left as it is (idempotent on its id)."""
    if not rows:
        return 0
    stmt = (
        upsert_insert(session)(Send)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["invitation_id"])
        .returning(Send.invitation_id)
    )
    return len((await session.execute(stmt)).all())


async def cancel(session: AsyncSession, ids: list[uuid.UUID], *, reason: str, now: datetime) -> int:
    """Cancel sends that have not started; one already sending or sent is left as it is."""
    stmt = (
        update(Send)
        .where(Send.invitation_id.in_(ids), Send.status == "pending")
        .values(status="cancelled", reason=f"cancelled: {reason}", finished_at=now)
        .returning(Send.invitation_id)
    )
    return len((await session.execute(stmt)).all())


async def claim_due(
    session: AsyncSession, *, now: datetime, limit: int, instance: str
) -> list[Send]:
    """Claim due sends for this replica: ``FOR UPDATE SKIP LOCKED`` so replicas never share one."""
    due = (
        select(Send.invitation_id)
        .where(Send.status == "pending", Send.send_at <= now)
        .order_by(Send.send_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list((await session.execute(due)).scalars())
    if not ids:
        return []
    stmt = (
        update(Send)
        .where(Send.invitation_id.in_(ids), Send.status == "pending")
        .values(status="sending", claimed_by=instance, claimed_at=now, attempts=Send.attempts + 1)
        .returning(Send)
    )
    return list((await session.execute(stmt)).scalars())


async def record_outcomes(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk update by primary key: each row names ``invitation_id`` and the new values."""
    if rows:
        await session.execute(update(Send), list(rows))


async def mark_in_doubt(
    session: AsyncSession, *, now: datetime, instance: str, lease_expired_before: datetime
) -> int:
    """Sends left in ``sending`` by a crash: ours (we restarted) or anyone's past the lease."""
    stmt = (
        update(Send)
        .where(
            Send.status == "sending",
            or_(Send.claimed_by == instance, Send.claimed_at < lease_expired_before),
        )
        .values(
            status="in_doubt",
            finished_at=now,
            reason="the process stopped after the send started and before its outcome "
            "was recorded; not retried so the customer is never surveyed twice",
        )
        .returning(Send.invitation_id)
    )
    return len((await session.execute(stmt)).all())


async def unpublished(session: AsyncSession, limit: int) -> list[Send]:
    stmt = (
        select(Send)
        .where(
            Send.status.in_(("sent", "failed", "in_doubt")),
            Send.delivery_published_at.is_(None),
        )
        .order_by(Send.finished_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


async def mark_published(session: AsyncSession, ids: list[uuid.UUID], now: datetime) -> None:
    if ids:
        await session.execute(
            update(Send).where(Send.invitation_id.in_(ids)).values(delivery_published_at=now)
        )


async def counts(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(Send.status, func.count()).group_by(Send.status))
    return {status: n for status, n in rows.all()}


async def next_due(session: AsyncSession) -> datetime | None:
    stmt = select(func.min(Send.send_at)).where(and_(Send.status == "pending"))
    return (await session.execute(stmt)).scalar_one_or_none()
