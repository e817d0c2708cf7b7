"""All of the collector's SQL."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.collector.models import Invitation, OptOut, Response
from services.common.db import upsert_insert

CONTEXT_FIELDS = ("touchpoint", "channel", "team", "agent", "account_id", "case_id")


async def store_invitations(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    if rows:
        stmt = (
            upsert_insert(session)(Invitation)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["invitation_id"])
        )
        await session.execute(stmt)


async def cancel_invitations(session: AsyncSession, ids: list[uuid.UUID], now: datetime) -> None:
    if ids:
        await session.execute(
            update(Invitation).where(Invitation.invitation_id.in_(ids)).values(cancelled_at=now)
        )


async def invitation_by_token(session: AsyncSession, token: str) -> Invitation | None:
    return (
        await session.execute(select(Invitation).where(Invitation.token == token))
    ).scalar_one_or_none()


async def response_for(session: AsyncSession, invitation_id: uuid.UUID) -> Response | None:
    return (
        await session.execute(select(Response).where(Response.invitation_id == invitation_id))
    ).scalar_one_or_none()


async def save_response(
    session: AsyncSession,
    invitation: Invitation,
    *,
    score: int | None,
    comment: str | None,
    now: datetime,
) -> Response:
    """Insert the answer, or update it when the customer changes it (the last one counts)."""
    existing = await response_for(session, invitation.invitation_id)
    if existing is None:
        existing = Response(
            response_id=uuid.uuid4(),
            invitation_id=invitation.invitation_id,
            survey_id=invitation.survey_id,
            metric=invitation.metric,
            customer_id=invitation.customer_id,
            locale=invitation.locale,
            revision=1,
            suspected_bot=False,
            first_submitted_at=now,
            **{f: getattr(invitation, f) for f in CONTEXT_FIELDS},
        )
        session.add(existing)
    else:
        existing.revision += 1
    existing.score = score
    existing.comment = comment
    existing.submitted_at = now
    existing.published_at = None
    await session.flush()
    return existing


async def record_optout(
    session: AsyncSession, invitation: Invitation, *, source: str, now: datetime
) -> None:
    """Idempotent: a second click on the same link records nothing new."""
    stmt = (
        upsert_insert(session)(OptOut)
        .values(
            invitation_id=invitation.invitation_id,
            optout_id=uuid.uuid4(),
            customer_id=invitation.customer_id,
            survey_id=invitation.survey_id,
            channel=invitation.survey_channel,
            source=source,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["invitation_id"])
    )
    await session.execute(stmt)


async def has_optout(session: AsyncSession, invitation_id: uuid.UUID) -> bool:
    row = await session.get(OptOut, invitation_id)
    return row is not None


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
    session: AsyncSession, ids: list[uuid.UUID], now: datetime
) -> None:
    if ids:
        await session.execute(
            update(OptOut).where(OptOut.invitation_id.in_(ids)).values(published_at=now)
        )


async def unpublished_responses(session: AsyncSession, limit: int) -> list[Response]:
    stmt = (
        select(Response)
        .where(Response.published_at.is_(None))
        .order_by(Response.submitted_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


async def mark_responses_published(
    session: AsyncSession, marks: list[tuple[uuid.UUID, int]], now: datetime
) -> None:
    """Mark published, unless the answer changed again meanwhile (then it goes out again)."""
    for response_id, revision in marks:
        await session.execute(
            update(Response)
            .where(Response.response_id == response_id, Response.revision == revision)
            .values(published_at=now)
        )


async def score_histogram(
    session: AsyncSession, survey_id: str, since: datetime | None, until: datetime | None
) -> dict[int, int]:
    """Counts per score value of the counted answers (scored, not suspected bots)."""
    stmt = (
        select(Response.score, func.count())
        .where(
            Response.survey_id == survey_id,
            Response.score.is_not(None),
            Response.suspected_bot.is_(False),
        )
        .group_by(Response.score)
    )
    if since is not None:
        stmt = stmt.where(Response.submitted_at >= since)
    if until is not None:
        stmt = stmt.where(Response.submitted_at < until)
    rows = await session.execute(stmt)
    return {int(s): int(c) for s, c in rows.all() if s is not None}
