"""Delivered invitations (the response rate's denominator), on PostgreSQL and SQLite: counted
once, at the first "sent" or "delivered" report, even when the report arrives before the
invitation, or while the invitation is being stored by the other consumer."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import repository
from services.collector.models import DeliveryCell, EarlyDelivery, Invitation
from services.common.db import unit_of_work

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DAY = date(2026, 11, 20)


def invitation(invitation_id: uuid.UUID, team: str = "billing") -> dict[str, object]:
    return {
        "invitation_id": invitation_id,
        "token": uuid.uuid4().hex[:29],
        "survey_id": "relationship-nps",
        "metric": "nps",
        "customer_id": "cust-1",
        "locale": "fi",
        "survey_channel": "email",
        "expires_at": NOW + timedelta(days=14),
        "created_at": NOW,
        "team": team,
    }


async def delivered(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    async with sessions() as session:
        rows = (await session.execute(select(DeliveryCell))).scalars().all()
        waiting = len((await session.execute(select(EarlyDelivery))).scalars().all())
    counts = {c.team: c.n for c in rows}
    counts["waiting"] = waiting
    return counts


async def test_counted_once_whatever_the_order(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    async with unit_of_work(sessions) as s:
        await repository.store_invitations(s, [invitation(first)])
    async with unit_of_work(sessions) as s:
        await repository.mark_delivered(s, {first: (NOW, DAY)})
    async with unit_of_work(sessions) as s:  # a second report (e.g. "delivered" after "sent")
        await repository.mark_delivered(s, {first: (NOW + timedelta(minutes=1), DAY)})
    assert await delivered(sessions) == {"billing": 1, "waiting": 0}

    # The report before the invitation: it waits, and counts when the invitation arrives.
    async with unit_of_work(sessions) as s:
        await repository.mark_delivered(s, {second: (NOW, DAY)})
    assert await delivered(sessions) == {"billing": 1, "waiting": 1}
    async with unit_of_work(sessions) as s:
        await repository.store_invitations(s, [invitation(second)])
    assert await delivered(sessions) == {"billing": 2, "waiting": 0}


async def test_a_report_stored_while_its_invitation_was_committed_is_swept(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The race of the two consumers: the delivery transaction did not see the invitation yet,
    the invitation transaction did not see the waiting report yet. The relay's sweep counts it."""
    raced = uuid.uuid4()
    async with unit_of_work(sessions) as s:
        await repository.mark_delivered(s, {raced: (NOW, DAY)})
    async with unit_of_work(sessions) as s:  # stored without seeing the report
        s.add(Invitation(**invitation(raced, team="support")))
    assert await delivered(sessions) == {"waiting": 1}
    async with unit_of_work(sessions) as s:
        await repository.sweep_early_deliveries(s)
    assert await delivered(sessions) == {"support": 1, "waiting": 0}
    async with unit_of_work(sessions) as s:  # sweeping again changes nothing
        await repository.sweep_early_deliveries(s)
    assert await delivered(sessions) == {"support": 1, "waiting": 0}
