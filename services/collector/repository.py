"""All of the collector's SQL."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Date,
    DateTime,
    and_,
    case,
    cast,
    delete,
    func,
    literal_column,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from services.collector.models import (
    AlertDelivery,
    DeliveryCell,
    DeliveryRollup,
    EarlyDelivery,
    Erasure,
    Hit,
    Invitation,
    OptOut,
    Response,
    ScoreCell,
    ScoreRollup,
)
from services.common.db import claim_oldest, upsert_insert

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


# What one statement may carry: asyncpg and SQLite both refuse more than 32,767 parameters.
_MAX_PARAMETERS = 30_000
GRAINS = ("day", "month")
CellModel = type[ScoreCell] | type[DeliveryCell] | type[ScoreRollup] | type[DeliveryRollup]


def _rollup_keys(key: dict[str, Any]) -> list[dict[str, Any]]:
    """The roll-up rows a cell counts in: per grain (the day, the month), one summed over every
    segment (``dim`` "") and one per segment."""
    day: date = key["day"]
    rest = {k: v for k, v in key.items() if k not in SEGMENTS and k not in ("survey_id", "day")}
    out = []
    for grain, bucket in (("day", day), ("month", day.replace(day=1))):
        base = {"survey_id": key["survey_id"], "grain": grain, "bucket": bucket}
        out.append({**base, "dim": "", "value": "", **rest})
        out.extend({**base, "dim": dim, "value": key[dim], **rest} for dim in SEGMENTS)
    return out


async def _add_to_cells(
    session: AsyncSession, model: CellModel, deltas: list[tuple[dict[str, Any], int]]
) -> None:
    """Add each ``n`` to the row of its key, merged per key first (one INSERT must not touch a
    key twice on PostgreSQL; a move within one row cancels out) and sorted (concurrent
    transactions lock rows in the same order): one INSERT ... ON CONFLICT DO UPDATE."""
    merged: dict[tuple[tuple[str, Any], ...], int] = defaultdict(int)
    for key, n in deltas:
        merged[tuple(sorted(key.items()))] += n
    rows = [{**dict(k), "n": n} for k, n in sorted(merged.items()) if n]
    if not rows:
        return
    size = max(1, _MAX_PARAMETERS // len(rows[0]))
    for start in range(0, len(rows), size):
        stmt = upsert_insert(session)(model).values(rows[start : start + size])
        stmt = stmt.on_conflict_do_update(
            index_elements=[k for k in rows[0] if k != "n"], set_={"n": model.n + stmt.excluded.n}
        )
        await session.execute(stmt)


async def _add_to_cell(
    session: AsyncSession,
    cell: type[ScoreCell] | type[DeliveryCell],
    deltas: list[tuple[dict[str, Any], int]],
) -> None:
    """Count ``n`` more (or fewer) in each cell key and in its roll-ups: one statement for the
    cells and one for the roll-ups."""
    rollup: CellModel = ScoreRollup if cell is ScoreCell else DeliveryRollup
    await _add_to_cells(session, cell, deltas)
    await _add_to_cells(session, rollup, [(r, n) for key, n in deltas for r in _rollup_keys(key)])


async def count_answer(
    session: AsyncSession, before: dict[str, Any] | None, after: Response | None
) -> None:
    """Move one answer between score cells (and their roll-ups): out of ``before`` (the cell
    key of its previous revision, from ``score_cell_key``), into the cell of ``after``. Same
    transaction as the answer, so the cells always equal a recount of the answers."""
    new = _score_key(after) if after is not None else None
    if before == new:
        return
    deltas = []
    if before is not None:
        deltas.append((before, -1))
    if new is not None:
        deltas.append((new, 1))
    await _add_to_cell(session, ScoreCell, deltas)


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
    counted = []
    for inv in rows:
        if inv.delivered_at is not None:
            continue
        at, day = deliveries[inv.invitation_id]
        inv.delivered_at = at
        counted.append(({"survey_id": inv.survey_id, "day": day, **segment_key(inv)}, 1))
    await _add_to_cell(session, DeliveryCell, counted)
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


async def sweep_early_deliveries(session: AsyncSession, limit: int = 500) -> None:
    """Count the waiting delivery reports whose invitation has arrived since. The consumers of
    kaiku.invitations and kaiku.deliveries run concurrently: a report stored as early while its
    invitation was being committed would otherwise wait for ever. The relay sweeps each round."""
    ids = list(
        (
            await session.execute(
                select(EarlyDelivery.invitation_id)
                .where(EarlyDelivery.invitation_id.in_(select(Invitation.invitation_id)))
                .limit(limit)
            )
        ).scalars()
    )
    await apply_early_deliveries(session, ids)


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


async def latest_change(session: AsyncSession, surveys: list[str]) -> tuple[Any, ...]:
    """A cheap stamp that changes when an answer or a follow-up does: per survey, the last
    submitted_at (an index scan each) and the last follow-up update."""
    stamps: list[Any] = []
    for survey_id in surveys:
        stamps.append(
            await session.scalar(
                select(func.max(Response.submitted_at)).where(Response.survey_id == survey_id)
            )
        )
    stamps.append(await session.scalar(select(func.max(Response.followup_updated_at))))
    return tuple(stamps)


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
    return await claim_oldest(
        session, OptOut, OptOut.published_at.is_(None), order_by=OptOut.created_at, limit=limit
    )


async def mark_optouts_published(
    session: AsyncSession, ids: list[uuid.UUID], now: datetime
) -> None:
    if ids:
        await session.execute(
            update(OptOut).where(OptOut.invitation_id.in_(ids)).values(published_at=now)
        )


async def unpublished_responses(session: AsyncSession, limit: int) -> list[Response]:
    return await claim_oldest(
        session,
        Response,
        Response.published_at.is_(None),
        Response.erased_at.is_(None),
        order_by=Response.submitted_at,
        limit=limit,
    )


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


# -- erasure --------------------------------------------------------------------------------------


async def erase_customer(
    session: AsyncSession, customer_id: str, customer_hash: str, now: datetime
) -> list[uuid.UUID]:
    """Scrub one customer from the collector's tables: answers keep their score, survey, day and
    scoring segments but lose the customer id, the comment, the case and the follow-up note;
    invitations lose the customer and the case (their links then answer "not found") and their
    hits are deleted; opt-outs keep the customer only as its salted hash. The score cells do not
    change. Returns the ids of the customer's invitations."""
    ids = list(
        (
            await session.execute(
                select(Invitation.invitation_id).where(Invitation.customer_id == customer_id)
            )
        ).scalars()
    )
    await session.execute(
        update(Response)
        .where(Response.customer_id == customer_id)
        .values(customer_id=None, comment=None, case_id=None, followup_note=None, erased_at=now)
    )
    await erase_invitations(session, ids, now)
    await session.execute(
        update(OptOut).where(OptOut.customer_id == customer_id).values(customer_id=customer_hash)
    )
    return ids


async def erase_invitations(session: AsyncSession, ids: list[uuid.UUID], now: datetime) -> None:
    """Forget whose these invitations were (and delete their hits)."""
    if not ids:
        return
    await session.execute(
        update(Invitation)
        .where(Invitation.invitation_id.in_(ids))
        .values(customer_id=None, case_id=None, erased_at=now)
    )
    await session.execute(
        update(Response)
        .where(Response.invitation_id.in_(ids), Response.erased_at.is_(None))
        .values(customer_id=None, comment=None, case_id=None, followup_note=None, erased_at=now)
    )
    await session.execute(delete(Hit).where(Hit.invitation_id.in_(ids)))


async def add_erasure(session: AsyncSession, row: dict[str, Any]) -> None:
    session.add(Erasure(**row))
    await session.flush()


async def unpublished_erasures(session: AsyncSession, limit: int) -> list[Erasure]:
    return await claim_oldest(
        session, Erasure, Erasure.published_at.is_(None), order_by=Erasure.requested_at, limit=limit
    )


async def mark_erasures_published(
    session: AsyncSession, ids: list[uuid.UUID], now: datetime
) -> None:
    """Published: the customer id is no longer needed, only its hash stays."""
    if ids:
        await session.execute(
            update(Erasure)
            .where(Erasure.erasure_id.in_(ids))
            .values(published_at=now, customer_id=None)
        )


# -- close the loop: the responses API, follow-up, alert deliveries ------------------------------


@dataclass(frozen=True)
class ResponseQuery:
    """The filters of ``GET /v1/responses`` (and its CSV)."""

    survey_id: str | None = None
    metric: str | None = None
    since: datetime | None = None  # submitted_at >= since
    until: datetime | None = None  # submitted_at < until
    score_min: int | None = None
    score_max: int | None = None
    followup_status: str | None = None
    alerted: bool | None = None
    bots: str = "exclude"  # exclude | include | only
    has_comment: bool | None = None
    segments: tuple[tuple[str, str], ...] = ()  # (column, value): touchpoint ... account_id


def _response_filters(q: ResponseQuery) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if q.survey_id is not None:
        where.append(Response.survey_id == q.survey_id)
    if q.metric is not None:
        where.append(Response.metric == q.metric)
    if q.since is not None:
        where.append(Response.submitted_at >= q.since)
    if q.until is not None:
        where.append(Response.submitted_at < q.until)
    if q.score_min is not None:
        where.append(Response.score >= q.score_min)
    if q.score_max is not None:
        where.append(Response.score <= q.score_max)
    if q.followup_status is not None:
        where.append(Response.followup_status == q.followup_status)
    if q.alerted is not None:
        where.append(
            Response.alerted_at.is_not(None) if q.alerted else Response.alerted_at.is_(None)
        )
    if q.bots == "exclude":
        where.append(Response.suspected_bot.is_(False))
    elif q.bots == "only":
        where.append(Response.suspected_bot.is_(True))
    if q.has_comment is not None:
        with_comment = and_(Response.comment.is_not(None), Response.comment != "")
        where.append(with_comment if q.has_comment else ~with_comment)
    for column, value in q.segments:
        if column not in SEGMENTS:
            raise ValueError(f"not a segment: {column}")
        where.append(getattr(Response, column) == value)
    return where


async def find_responses(
    session: AsyncSession,
    query: ResponseQuery,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Response]:
    """One page of answers, newest first: keyset paging on (submitted_at, response_id), both
    descending, strictly after the ``after`` position."""
    stmt = select(Response).where(*_response_filters(query))
    if after is not None:
        at, response_id = after
        stmt = stmt.where(
            or_(
                Response.submitted_at < at,
                and_(Response.submitted_at == at, Response.response_id < response_id),
            )
        )
    stmt = stmt.order_by(Response.submitted_at.desc(), Response.response_id.desc()).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def response_by_id(
    session: AsyncSession, response_id: uuid.UUID, *, for_update: bool = False
) -> Response | None:
    stmt = select(Response).where(Response.response_id == response_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def record_alert(
    session: AsyncSession,
    response: Response,
    *,
    rules: list[str],
    deliveries: list[tuple[str, list[str]]],
    now: datetime,
) -> None:
    """Mark the answer alerted (``rules``: every rule that has alerted for it so far), open its
    follow-up if it has none, and queue one delivery per (webhook URL, its new rules)."""
    if response.alerted_at is None:
        response.alerted_at = now
    joined = ",".join(rules)
    while len(joined) > 500:  # the column's size; the ids are in the deliveries anyway
        joined = joined.rsplit(",", 1)[0]
    response.alert_rules = joined
    if response.followup_status is None:
        response.followup_status = "open"
        response.followup_updated_at = now
    session.add_all(
        AlertDelivery(
            id=uuid.uuid4(),
            response_id=response.response_id,
            revision=response.revision,
            rules=",".join(new)[:500],
            url=url,
            attempts=0,
            next_attempt_at=now,
            status="pending",
            created_at=now,
        )
        for url, new in deliveries
    )
    await session.flush()


async def due_alert_deliveries(
    session: AsyncSession, *, now: datetime, limit: int
) -> list[tuple[AlertDelivery, Response | None]]:
    """Pending deliveries whose time has come, each with its answer, locked (SKIP LOCKED: each
    replica claims its own)."""
    stmt = (
        select(AlertDelivery, Response)
        .outerjoin(Response, Response.response_id == AlertDelivery.response_id)
        .where(AlertDelivery.status == "pending", AlertDelivery.next_attempt_at <= now)
        .order_by(AlertDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(of=AlertDelivery, skip_locked=True)
    )
    return [(d, r) for d, r in (await session.execute(stmt)).all()]


async def finish_alert_delivery(
    session: AsyncSession, delivery_id: uuid.UUID, attempts: int, values: dict[str, Any]
) -> None:
    """Record an attempt's outcome, unless another replica claimed the row again meanwhile."""
    await session.execute(
        update(AlertDelivery)
        .where(AlertDelivery.id == delivery_id, AlertDelivery.attempts == attempts)
        .values(**values)
    )


# -- scores: sums of the pre-aggregated cells, grouped in SQL (GET /v1/scores) ------------------

PERIODS = ("none", "day", "week", "month")


@dataclass(frozen=True)
class CellQuery:
    """What ``GET /v1/scores`` sums: these surveys, days ``since <= day < until`` (reporting
    time zone; None: unbounded), bucketed by ``period`` and grouped by ``segments`` (columns of
    ``SEGMENTS``)."""

    surveys: tuple[str, ...]
    since: date | None
    until: date | None
    period: str = "none"
    segments: tuple[str, ...] = ()


# (survey_id, period start or None, segment values ("" for none), ...)
CellGroup = tuple[str, date | None, tuple[str, ...]]


def period_start(session: AsyncSession, day: Any, period: str) -> Any:
    """The first day of the day's period in SQL: the day itself, its ISO week's Monday, or the
    first of its month; None for ``none``. ``day`` is a DATE column."""
    if period == "none":
        return None
    if period == "day":
        return day
    if period not in PERIODS:
        raise ValueError(f"not a period: {period}")
    dialect = session.bind.dialect.name if session.bind is not None else "postgresql"
    if dialect == "postgresql":  # on a timestamp without time zone: the session's zone is moot
        return cast(func.date_trunc(literal_column(f"'{period}'"), cast(day, DateTime())), Date)
    # SQLite: 'weekday 0' moves to the coming Sunday (or stays on one), 6 days back is Monday.
    modifiers = ("'weekday 0'", "'-6 days'") if period == "week" else ("'start of month'",)
    return type_coerce(func.date(day, *(literal_column(m) for m in modifiers)), Date)


def _cell_keys(session: AsyncSession, model: Any, q: CellQuery) -> list[Any]:
    for column in q.segments:
        if column not in SEGMENTS:
            raise ValueError(f"not a segment: {column}")
    bucket = period_start(session, model.day, q.period)
    return [
        model.survey_id,
        *([bucket.label("period_start")] if bucket is not None else []),
        *(getattr(model, column) for column in q.segments),
    ]


def _cell_where(model: Any, q: CellQuery) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [model.survey_id.in_(q.surveys)]
    if q.since is not None:
        where.append(model.day >= q.since)
    if q.until is not None:
        where.append(model.day < q.until)
    return where


def _group(row: Any, q: CellQuery) -> CellGroup:
    bucket = row[1] if q.period != "none" else None
    first = 2 if q.period != "none" else 1
    return (row[0], bucket, tuple(v or "" for v in row[first : first + len(q.segments)]))


SCORE_VALUES = range(NO_SCORE, 11)  # every score a cell can hold: -1 (none) and 0…10


@dataclass
class CellSums:
    """One group's answers: ``hist`` {score: answers} of persons (``NO_SCORE`` for a skipped
    score) and the suspected bots apart."""

    hist: dict[int, int]
    bots: int


def _next_month(day: date) -> date:
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1)


# (grain, first bucket or None, end bucket (exclusive) or None)
RollupRange = tuple[str, date | None, date | None]


def rollup_ranges(q: CellQuery) -> list[RollupRange]:
    """Which roll-up rows cover days ``since <= day < until``: for a day or week period the
    day grain; otherwise whole months from the month grain and the partial months at either
    end from the day grain."""
    if q.period in ("day", "week"):
        return [("day", q.since, q.until)]
    first = q.since if q.since is None or q.since.day == 1 else _next_month(q.since)
    end = q.until if q.until is None else q.until.replace(day=1)
    if first is not None and end is not None and first >= end:  # no whole month inside
        return [("day", q.since, q.until)]
    out: list[RollupRange] = []
    if q.since is not None and first is not None and q.since < first:
        out.append(("day", q.since, first))
    out.append(("month", first, end))
    if q.until is not None and end is not None and end < q.until:
        out.append(("day", end, q.until))
    return out


def uses_rollups(q: CellQuery) -> bool:
    """At most one segment: the roll-ups answer. Two or more: the full cells (slower: at a
    high cardinality there are about as many cells as answers)."""
    return len(q.segments) <= 1


def _rollup_query(
    session: AsyncSession, model: type[ScoreRollup] | type[DeliveryRollup], q: CellQuery
) -> tuple[list[Any], list[ColumnElement[bool]]]:
    """The group keys and the filter of a read of the roll-ups, laid out like the cells'
    (survey, period start, segment value)."""
    for column in q.segments:
        if column not in SEGMENTS:
            raise ValueError(f"not a segment: {column}")
    ranges = rollup_ranges(q)
    keys: list[Any] = [model.survey_id]
    if q.period != "none":
        aligned = q.period == "day" or all(grain == "month" for grain, _, _ in ranges)
        bucket = model.bucket if aligned else period_start(session, model.bucket, q.period)
        keys.append(bucket.label("period_start"))
    keys.extend(model.value for _ in q.segments)
    spans = []
    for grain, first, end in ranges:
        span: list[ColumnElement[bool]] = [model.grain == grain]
        if first is not None:
            span.append(model.bucket >= first)
        if end is not None:
            span.append(model.bucket < end)
        spans.append(and_(*span))
    where = [
        model.survey_id.in_(q.surveys),
        model.dim == (q.segments[0] if q.segments else ""),
        or_(*spans) if len(spans) > 1 else spans[0],
    ]
    return keys, where


async def score_cell_sums(session: AsyncSession, q: CellQuery) -> list[tuple[CellGroup, CellSums]]:
    """Each group's histogram summed in SQL, one row per group (a column per score value),
    whatever the number of answers: from the roll-ups for at most one segment, else from the
    cells."""
    model: type[ScoreCell] | type[ScoreRollup]
    if uses_rollups(q):
        model = ScoreRollup
        keys, where = _rollup_query(session, ScoreRollup, q)
    else:
        model = ScoreCell
        keys, where = _cell_keys(session, ScoreCell, q), _cell_where(ScoreCell, q)
    person = model.suspected_bot.is_(False)
    columns = [
        func.sum(case((and_(person, model.score == value), model.n), else_=0))
        for value in SCORE_VALUES
    ]
    bots = func.sum(case((model.suspected_bot.is_(True), model.n), else_=0))
    stmt = select(*keys, bots, *columns).where(*where).group_by(*keys)
    out = []
    for row in (await session.execute(stmt)).all():
        counts = row[len(keys) + 1 :]
        hist = {v: int(c) for v, c in zip(SCORE_VALUES, counts, strict=True) if c}
        if hist or row[len(keys)]:
            out.append((_group(row, q), CellSums(hist, int(row[len(keys)]))))
    return out


async def delivery_cell_sums(session: AsyncSession, q: CellQuery) -> list[tuple[CellGroup, int]]:
    """(group, delivered invitations) summed in SQL, from the roll-ups or the cells (as
    ``score_cell_sums``)."""
    model: type[DeliveryCell] | type[DeliveryRollup]
    if uses_rollups(q):
        model = DeliveryRollup
        keys, where = _rollup_query(session, DeliveryRollup, q)
    else:
        model = DeliveryCell
        keys, where = _cell_keys(session, DeliveryCell, q), _cell_where(DeliveryCell, q)
    stmt = select(*keys, func.sum(model.n)).where(*where).group_by(*keys)
    return [
        (_group(row, q), int(row[-1])) for row in (await session.execute(stmt)).all() if row[-1]
    ]


async def alerted_answers(
    session: AsyncSession, q: CellQuery
) -> list[tuple[CellGroup, datetime, datetime | None]]:
    """(group, alerted_at, contacted_at) of every alerted answer (the alerts are few: the
    ``(survey_id, alerted_at)`` index finds them without reading the other answers)."""
    keys = _cell_keys(session, Response, q)
    stmt = select(*keys, Response.alerted_at, Response.contacted_at).where(
        *_cell_where(Response, q), Response.alerted_at.is_not(None)
    )
    return [(_group(row, q), row[-2], row[-1]) for row in (await session.execute(stmt)).all()]
