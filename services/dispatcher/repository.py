"""All of the dispatcher's SQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.db import upsert_insert
from services.dispatcher.models import OptOut, Receipt, Send

CUSTOMER_PREFIX = "customer:"


def customer_key(customer_id: str) -> str:
    """The opt-out key of a whole customer, when no contact point is known."""
    return CUSTOMER_PREFIX + customer_id


# -- sends ----------------------------------------------------------------------------------------


def cancelled(reason: str, now: datetime) -> dict[str, Any]:
    """The values of a send cancelled before it started."""
    return {"status": "cancelled", "reason": f"cancelled: {reason}", "finished_at": now}


async def schedule(session: AsyncSession, rows: list[dict[str, Any]]) -> int:
    """Store new sends; one seen before is left as it is (idempotent on invitation and kind)."""
    if not rows:
        return 0
    stmt = (
        upsert_insert(session)(Send)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["invitation_id", "kind"])
        .returning(Send.invitation_id)
    )
    return len((await session.execute(stmt)).all())


async def cancel(
    session: AsyncSession,
    ids: Iterable[uuid.UUID],
    *,
    reason: str,
    now: datetime,
    kinds: Sequence[str] = ("invitation", "reminder"),
) -> int:
    """Cancel sends that have not started; one already sending or sent is left as it is."""
    stmt = (
        update(Send)
        .where(Send.invitation_id.in_(list(ids)), Send.kind.in_(kinds), Send.status == "pending")
        .values(cancelled(reason, now))
        .returning(Send.invitation_id)
    )
    return len((await session.execute(stmt)).all())


async def cancel_to(
    session: AsyncSession, keys: Iterable[tuple[str, str]], *, reason: str, now: datetime
) -> int:
    """Cancel the pending sends to opted-out (channel, contact) pairs; a ``customer:<id>`` contact
    cancels all of that customer's on the channel."""
    conditions = []
    for channel, contact in set(keys):
        if contact.startswith(CUSTOMER_PREFIX):
            customer = contact.removeprefix(CUSTOMER_PREFIX)
            conditions.append(and_(Send.channel == channel, Send.customer_id == customer))
        else:
            conditions.append(and_(Send.channel == channel, Send.contact == contact))
    if not conditions:
        return 0
    stmt = (
        update(Send)
        .where(or_(*conditions), Send.status == "pending")
        .values(cancelled(reason, now))
        .returning(Send.invitation_id)
    )
    return len((await session.execute(stmt)).all())


async def due(session: AsyncSession, *, now: datetime, limit: int) -> list[Send]:
    """Due sends, locked for this transaction: ``FOR UPDATE SKIP LOCKED`` so replicas never
    share one (SQLite, single-process, serialises writers instead)."""
    stmt = (
        select(Send)
        .where(Send.status == "pending", Send.send_at <= now)
        .order_by(Send.send_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


async def update_sends(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk update by primary key: each row names ``invitation_id``, ``kind`` and new values."""
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        by_columns.setdefault(tuple(sorted(row)), []).append(row)
    for batch in by_columns.values():
        await session.execute(update(Send), batch)


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


async def in_doubt(session: AsyncSession, limit: int = 1000) -> list[Send]:
    stmt = (
        select(Send).where(Send.status == "in_doubt").order_by(Send.finished_at.desc()).limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def sends_of(session: AsyncSession, ids: Iterable[uuid.UUID]) -> list[Send]:
    stmt = select(Send).where(Send.invitation_id.in_(list(set(ids))))
    return list((await session.execute(stmt)).scalars())


async def sends_by_provider_id(
    session: AsyncSession, provider: str, message_ids: Iterable[str]
) -> list[Send]:
    stmt = select(Send).where(
        Send.provider == provider, Send.provider_message_id.in_(list(set(message_ids)))
    )
    return list((await session.execute(stmt)).scalars())


async def last_send_to(session: AsyncSession, channel: str, contact: str) -> Send | None:
    """The latest message sent to a contact point (an inbound STOP names only the number)."""
    stmt = (
        select(Send)
        .where(Send.channel == channel, Send.contact == contact, Send.finished_at.is_not(None))
        .order_by(Send.finished_at.desc())
        .limit(1)
    )
    return (await session.execute(stmt)).scalars().first()


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


async def mark_published(
    session: AsyncSession, keys: list[tuple[uuid.UUID, str]], now: datetime
) -> None:
    if keys:
        await session.execute(
            update(Send)
            .where(tuple_(Send.invitation_id, Send.kind).in_(keys))
            .values(delivery_published_at=now)
        )


async def counts(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(Send.status, func.count()).group_by(Send.status))
    return {status: n for status, n in rows.all()}


# -- opt-outs -------------------------------------------------------------------------------------


async def add_optouts(session: AsyncSession, rows: list[dict[str, Any]]) -> int:
    """Record opt-outs; one already there stays as it was (the first reason is kept)."""
    if not rows:
        return 0
    unique = {(r["channel"], r["contact"]): r for r in rows}
    stmt = (
        upsert_insert(session)(OptOut)
        .values(list(unique.values()))
        .on_conflict_do_nothing(index_elements=["channel", "contact"])
        .returning(OptOut.contact)
    )
    return len((await session.execute(stmt)).all())


async def suppress(
    session: AsyncSession, rows: list[dict[str, Any]], *, reason: str, now: datetime
) -> None:
    """Record opt-outs and cancel the pending sends and reminders to those contact points."""
    if rows:
        await add_optouts(session, rows)
        keys = [(r["channel"], r["contact"]) for r in rows]
        await cancel_to(session, keys, reason=reason, now=now)


async def opted_out(session: AsyncSession, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (channel, contact or ``customer:<id>``) keys have opted out."""
    wanted = list(set(keys))
    if not wanted:
        return set()
    stmt = select(OptOut.channel, OptOut.contact).where(
        tuple_(OptOut.channel, OptOut.contact).in_(wanted)
    )
    return {(c, k) for c, k in (await session.execute(stmt)).all()}


async def unpublished_optouts(session: AsyncSession, limit: int) -> list[OptOut]:
    stmt = (
        select(OptOut)
        .where(OptOut.published_at.is_(None))
        .order_by(OptOut.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


async def mark_optouts_published(
    session: AsyncSession, keys: list[tuple[str, str]], now: datetime
) -> None:
    if keys:
        await session.execute(
            update(OptOut)
            .where(tuple_(OptOut.channel, OptOut.contact).in_(keys))
            .values(published_at=now)
        )


# -- receipts -------------------------------------------------------------------------------------


async def add_receipts(session: AsyncSession, rows: list[dict[str, Any]]) -> list[str]:
    """Store receipts; a provider's retry of one already stored changes nothing. Returns the
    event ids that were new."""
    if not rows:
        return []
    unique = {(r["provider"], r["event_id"]): r for r in rows}
    stmt = (
        upsert_insert(session)(Receipt)
        .values(list(unique.values()))
        .on_conflict_do_nothing(index_elements=["provider", "event_id"])
        .returning(Receipt.event_id)
    )
    return list((await session.execute(stmt)).scalars())


async def unpublished_receipts(session: AsyncSession, limit: int) -> list[Receipt]:
    stmt = (
        select(Receipt)
        .where(Receipt.published_at.is_(None))
        .order_by(Receipt.received_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


async def mark_receipts_published(
    session: AsyncSession, keys: list[tuple[str, str]], now: datetime
) -> None:
    if keys:
        await session.execute(
            update(Receipt)
            .where(tuple_(Receipt.provider, Receipt.event_id).in_(keys))
            .values(published_at=now)
        )
