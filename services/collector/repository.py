"""All of the collector's SQL."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.collector.models import (
    DeliveryCell,
    EarlyDelivery,
    Hit,
    Invitation,
    OptOut,
    Response,
    ScoreCell,
)
from services.common.db import upsert_insert

CONTEXT_FIELDS = ("touchpoint", "channel", "team", "agent", "account_id", "case_id")
# The segments scores can be grouped by (the key of the pre-aggregated cells besides the day).
SEGMENTS = ("touchpoint", "channel", "team", "agent", "account_id")
NO_SCORE = -1  # the score column of a cell counting answers without a score


def segment_key(row: Invitation | Response) -> dict[str, str]:
    """A row's segments as a cell key: "" for a segment the event did not carry."""
    return {f: getattr(row, f) or "" for f in SEGMENTS}


def _score_key(r: Response) -> dict[str, Any]:
    return {
        "survey_id": r.survey_id,
        "day": r.day,
        **segment_key(r),
        "score": NO_SCORE if r.score is None else r.score,
        "suspected_bot": r.suspected_bot,
    }


async def _add_to_cell(
    session: AsyncSession, model: type[ScoreCell] | type[DeliveryCell], key: dict[str, Any], n: int
) -> None:
    stmt = upsert_insert(session)(model).values(**key, n=n)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(key), set_={"n": model.n + stmt.excluded.n}
    )
    await session.execute(stmt)


async def count_answer(
    session: AsyncSession, before: dict[str, Any] | None, after: Response | None
) -> None:
    """Move one answer between score cells: out of ``before`` (the cell key of its previous
    revision, from ``score_cell_key``), into the cell of ``after``. Same transaction as the
    answer, so the cells always equal a recount of the answers."""
    new = _score_key(after) if after is not None else None
    if before == new:
        return
    if before is not None:
        await _add_to_cell(session, ScoreCell, before, -1)
    if new is not None:
        await _add_to_cell(session, ScoreCell, new, 1)


def score_cell_key(r: Response) -> dict[str, Any]:
    return _score_key(r)


async def mark_delivered(
    session: AsyncSession, deliveries: dict[uuid.UUID, tuple[datetime, date]]
) -> None:
    """Record the first sent-or-delivered report of each invitation and count it in its
    delivery cell (the response rate's denominator); later reports change nothing. A report
    for an invitation not stored yet waits in ``collector_early_deliveries``."""
    if not deliveries:
        return
    rows = list(
        (
            await session.execute(
                select(Invitation)
                .where(Invitation.invitation_id.in_(list(deliveries)))
                .with_for_update()
            )
        ).scalars()
    )
    for inv in rows:
        if inv.delivered_at is not None:
            continue
        at, day = deliveries[inv.invitation_id]
        inv.delivered_at = at
        await _add_to_cell(
            session, DeliveryCell, {"survey_id": inv.survey_id, "day": day, **segment_key(inv)}, 1
        )
    early = deliveries.keys() - {inv.invitation_id for inv in rows}
    if early:
        stmt = upsert_insert(session)(EarlyDelivery).values(
            [
                {"invitation_id": i, "delivered_at": deliveries[i][0], "day": deliveries[i][1]}
                for i in early
            ]
        )
        await session.execute(stmt.on_conflict_do_nothing(index_elements=["invitation_id"]))


async def apply_early_deliveries(session: AsyncSession, ids: list[uuid.UUID]) -> None:
    """Count the delivery reports that arrived before these invitations."""
    if not ids:
        return
    early = list(
        (
            await session.execute(
                delete(EarlyDelivery)
                .where(EarlyDelivery.invitation_id.in_(ids))
                .returning(
                    EarlyDelivery.invitation_id, EarlyDelivery.delivered_at, EarlyDelivery.day
                )
            )
        ).all()
    )
    await mark_delivered(session, {i: (at, day) for i, at, day in early})


async def store_invitations(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    if rows:
        stmt = (
            upsert_insert(session)(Invitation)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["invitation_id"])
        )
        await session.execute(stmt)
        await apply_early_deliveries(session, [r["invitation_id"] for r in rows])


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
    day: date,
    bot_reason: str | None = None,
) -> Response:
    """Insert the answer, or update it when the customer changes it (the last one counts),
    and keep the score cells equal to the answers. ``bot_reason`` marks it a suspected bot."""
    existing = await response_for(session, invitation.invitation_id)
    before = None
    if existing is None:
        existing = Response(
            response_id=uuid.uuid4(),
            invitation_id=invitation.invitation_id,
            survey_id=invitation.survey_id,
            metric=invitation.metric,
            customer_id=invitation.customer_id,
            locale=invitation.locale,
            revision=1,
            first_submitted_at=now,
            **{f: getattr(invitation, f) for f in CONTEXT_FIELDS},
        )
        session.add(existing)
    else:
        before = score_cell_key(existing)
        existing.revision += 1
    existing.score = score
    existing.comment = comment
    existing.submitted_at = now
    existing.day = day
    existing.suspected_bot = bot_reason is not None
    existing.bot_reason = bot_reason
    existing.published_at = None
    await session.flush()
    await count_answer(session, before, existing)
    return existing


async def flag_bot(session: AsyncSession, response: Response, reason: str) -> None:
    """Re-mark a stored answer as a suspected bot (it moves to the bot cells)."""
    before = score_cell_key(response)
    response.suspected_bot = True
    response.bot_reason = reason
    await session.flush()
    await count_answer(session, before, response)


async def add_hit(
    session: AsyncSession, invitation_id: uuid.UUID, kind: str, score: int | None, at: datetime
) -> None:
    session.add(Hit(invitation_id=invitation_id, kind=kind, score=score, at=at))
    await session.flush()


async def recent_hits(
    session: AsyncSession, invitation_id: uuid.UUID, since: datetime
) -> list[Hit]:
    stmt = select(Hit).where(Hit.invitation_id == invitation_id, Hit.at >= since).order_by(Hit.at)
    return list((await session.execute(stmt)).scalars())


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
        .where(Response.published_at.is_(None), Response.erased_at.is_(None))
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
