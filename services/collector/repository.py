"""All of the collector's SQL."""

from __future__ import annotations

import functools
import math
import operator
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Date,
    DateTime,
    Integer,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy import column as named_column
from sqlalchemy.ext.asyncio import AsyncSession

from services.collector.models import (
    MONTH_SET_DIMS,
    AlertDelivery,
    ContactWait,
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
from services.common.db import claim_oldest, dialect_insert, upsert_insert

CONTEXT_FIELDS = ("touchpoint", "channel", "team", "agent", "account_id", "case_id")
# The segments scores can be grouped by (the key of the pre-aggregated cells besides the day).
SEGMENTS = ("touchpoint", "channel", "team", "agent", "account_id")
NO_SCORE = -1  # the score column of a cell counting answers without a score
# The roll-ups' column of each score of a person's answer; a suspected bot's counts in "bots".
SCORE_COLUMNS = {NO_SCORE: "no_score", **{s: f"score_{s}" for s in range(11)}}

# A row's key, (column, value) pairs in the order of the table's primary key.
Key = tuple[tuple[str, Any], ...]
# What to add to a row's count columns.
Counts = dict[str, int]


def segment_key(row: Invitation | Response) -> dict[str, str]:
    """A row's segments as a cell key: "" for a segment the event did not carry."""
    return {f: getattr(row, f) or "" for f in SEGMENTS}


@dataclass(frozen=True)
class Counted:
    """What the cells count of one answer (``counted``): its cell (survey, day, segments), its
    score (``NO_SCORE`` for none) and bot flag, whether it raised an alert and, when it was
    contacted since, the wait from the alert to the contact in microseconds (exact: both are
    timestamps with microseconds). Taken before a change and compared with the answer after
    it, it says what moves between the cells (``count_answer``)."""

    response_id: uuid.UUID
    cell: Key
    score: int
    suspected_bot: bool
    alerted: bool
    wait_us: int | None


def counted(r: Response) -> Counted:
    wait = None
    if r.alerted_at is not None and r.contacted_at is not None:
        wait = (r.contacted_at - r.alerted_at) // timedelta(microseconds=1)
    return Counted(
        response_id=r.response_id,
        cell=(("survey_id", r.survey_id), ("day", r.day), *segment_key(r).items()),
        score=NO_SCORE if r.score is None else r.score,
        suspected_bot=r.suspected_bot,
        alerted=r.alerted_at is not None,
        wait_us=wait,
    )


# The buckets of the roll-ups: the day, its ISO week's Monday, the first of its month.
GRAINS = ("day", "week", "month")
CellModel = type[ScoreCell] | type[DeliveryCell] | type[ScoreRollup] | type[DeliveryRollup]


# The grouping sets the roll-ups keep, smallest first: none, each segment alone, the two
# pairs a report drills into (touchpoint and channel; team and agent: an agent's team), and
# every segment but the account (for any other combination of them; a few thousand rows per
# survey and month, where the cells, account included, are about as many as the answers). A
# request reads the smallest set that covers its segments; with the account and another
# segment only a set of MONTH_SETS may (over whole months), else it reads the full cells.
ROLLUP_SETS: tuple[tuple[str, ...], ...] = (
    (),
    *((segment,) for segment in SEGMENTS),
    ("touchpoint", "channel"),
    ("team", "agent"),
    ("touchpoint", "channel", "team", "agent"),
)
# Kept at the month grain only, smallest first: the account with each other segment, with
# the touchpoint and channel, and with the team and agent (per survey and month at most
# accounts x 5 touchpoints, x 4 channels, x teams, x 20 touchpoint-channel pairs: several times
# fewer rows than the month's cells; the account with the agent, or with the team and agent
# (an agent is in one team), 72% of the answers in the benchmark, where its cells are one per
# answer: not fewer rows, but one per group, in the report's order; a day of any of them would
# be about as many rows as the day's answers). They answer a request by month, or over whole
# months, that groups by the account and those segments: each group one row, so a page of
# such a report is a range of the primary key (migrations 0002, 0003 and 0005 filled them
# from the cells).
# ``models.MONTH_SET_DIMS`` (an index of the roll-ups holds their month rows' counts).
MONTH_SETS: tuple[tuple[str, ...], ...] = tuple(tuple(d.split(",")) for d in MONTH_SET_DIMS)
# Every grouping set each grain keeps. The week grain (migration 0004) answers a report by
# week with a row per group and week, as the month grain does by month: a page of it is a range
# of the primary key, where from the days it summed seven rows per group.
GRAIN_SETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "day": ROLLUP_SETS,
    "week": ROLLUP_SETS,
    "month": ROLLUP_SETS + MONTH_SETS,
}


def _rollup_keys(cell: Key) -> list[Key]:
    """The roll-up rows a cell counts in: per grain (the day, the week, the month) and grouping
    set, its segments in the set and "" for the others."""
    values = dict(cell)
    day: date = values["day"]
    out: list[Key] = []
    for grain in GRAINS:
        bucket = floor(day, grain)
        base = (("survey_id", values["survey_id"]), ("grain", grain))
        for grouping in GRAIN_SETS[grain]:
            segments = tuple((s, values[s] if s in grouping else "") for s in SEGMENTS)
            out.append((*base, ("dim", ",".join(grouping)), ("bucket", bucket), *segments))
    return out


class _Deltas:
    """Counts to add per row of one table, merged per key (one INSERT must not touch a key
    twice on PostgreSQL; a move within one row cancels out)."""

    def __init__(self) -> None:
        self.rows: dict[Key, Counts] = defaultdict(lambda: defaultdict(int))

    def add(self, key: Key, counts: Counts, sign: int = 1) -> None:
        row = self.rows[key]
        for column, n in counts.items():
            row[column] += sign * n


async def _write(session: AsyncSession, model: CellModel, deltas: _Deltas) -> None:
    """Add the deltas to the rows, sorted by key (concurrent transactions lock rows in the same
    order): one INSERT ... ON CONFLICT DO UPDATE executed for every row (a single prepared
    statement, compiled once per set of columns), inserting and setting only the columns that
    change (a new row's other counts are 0)."""
    changed = {k: c for k, c in deltas.rows.items() if any(c.values())}
    if not changed:
        return
    columns = tuple(sorted({col for c in changed.values() for col, n in c.items() if n}))
    rows = [
        {**dict(key), **{col: counts.get(col, 0) for col in columns}}
        for key, counts in sorted(changed.items())
    ]
    keys = tuple(name for name, _ in next(iter(changed)))
    conn = await session.connection()
    await conn.execute(_upsert(conn.dialect.name, model, keys, columns), rows)


@functools.cache
def _upsert(dialect: str, model: CellModel, keys: tuple[str, ...], columns: tuple[str, ...]) -> Any:
    """The statement adding counts to a row of ``model``, built once per set of columns (its
    ``excluded`` alias copies every column of the table: per answer that was a tenth of the
    time of storing it)."""
    table = model.__table__
    stmt = dialect_insert(dialect)(table)
    return stmt.on_conflict_do_update(
        index_elements=list(keys),
        set_={col: table.c[col] + stmt.excluded[col] for col in columns},
    )


async def count_answer(
    session: AsyncSession, before: Counted | None, after: Response | None
) -> None:
    """Move one answer between the cells (and their roll-ups): out of what ``before`` counted
    (its state before the change, from ``counted``), into what ``after`` counts: its score cell
    (``n``, ``alerted``, ``contacted``), that cell's roll-up rows (one per grain and grouping
    set: a column per score, ``bots``, ``alerted``, ``contacted``) and, for a contacted alert,
    its row in ``collector_contact_waits``. Same transaction as the answer, so the cells always
    equal a recount of the answers; one statement per table. Callers: ``save_response`` (a new
    or changed answer), ``flag_bot``, ``record_alert`` (the first alert),
    ``set_followup_status`` (the first contact); an erasure changes nothing counted."""
    new = counted(after) if after is not None else None
    if before == new:
        return
    cells, rollups = _Deltas(), _Deltas()
    for state, sign in ((before, -1), (new, 1)):
        if state is None:
            continue
        contacted = int(state.wait_us is not None)
        alerts = {"alerted": int(state.alerted), "contacted": contacted}
        score_key = (*state.cell, ("score", state.score), ("suspected_bot", state.suspected_bot))
        cells.add(score_key, {"n": 1, **alerts}, sign)
        column = "bots" if state.suspected_bot else SCORE_COLUMNS[state.score]
        for key in _rollup_keys(state.cell):
            rollups.add(key, {column: 1, **alerts}, sign)
    await _write(session, ScoreCell, cells)
    await _write(session, ScoreRollup, rollups)
    await _count_wait(session, before, new)


async def _count_wait(session: AsyncSession, before: Counted | None, new: Counted | None) -> None:
    """Keep the answer's row in ``collector_contact_waits``: there while it is a contacted
    alert, with its cell and wait."""
    was = (
        (before.cell, before.wait_us) if before is not None and before.wait_us is not None else None
    )
    now = (new.cell, new.wait_us) if new is not None and new.wait_us is not None else None
    if was == now:
        return
    if now is None:
        assert before is not None
        await session.execute(
            delete(ContactWait).where(ContactWait.response_id == before.response_id)
        )
        return
    assert new is not None and new.wait_us is not None
    row = {"response_id": new.response_id, **dict(new.cell), "wait_us": new.wait_us}
    stmt = upsert_insert(session)(ContactWait).values(row)
    stmt = stmt.on_conflict_do_update(
        index_elements=["response_id"], set_={k: v for k, v in row.items() if k != "response_id"}
    )
    await session.execute(stmt)


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
    cells, rollups = _Deltas(), _Deltas()
    for inv in rows:
        if inv.delivered_at is not None:
            continue
        at, day = deliveries[inv.invitation_id]
        inv.delivered_at = at
        cell = (("survey_id", inv.survey_id), ("day", day), *segment_key(inv).items())
        cells.add(cell, {"n": 1})
        for key in _rollup_keys(cell):
            rollups.add(key, {"n": 1})
    await _write(session, DeliveryCell, cells)
    await _write(session, DeliveryRollup, rollups)
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
    before: Counted | None = None
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
        before = counted(existing)
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
    before = counted(response)
    response.suspected_bot = True
    response.bot_reason = reason
    await session.flush()
    await count_answer(session, before, response)


async def add_hit(
    session: AsyncSession,
    invitation_id: uuid.UUID,
    kind: str,
    score: int | None,
    at: datetime,
    *,
    keep: timedelta,
) -> None:
    """Note a request to the link, and forget the link's requests older than ``keep`` (the
    longest bot detection looks back): however often a link is fetched, its hits stay few."""
    await session.execute(delete(Hit).where(Hit.invitation_id == invitation_id, Hit.at < at - keep))
    session.add(Hit(invitation_id=invitation_id, kind=kind, score=score, at=at))
    await session.flush()


async def sweep_hits(session: AsyncSession, before: datetime, limit: int = 5000) -> None:
    """Delete up to ``limit`` hits older than ``before`` (the burst window back: no bot
    detection reads them), oldest first. ``add_hit`` prunes a link's old hits when it is
    fetched again; this forgets those of links nobody fetches again. The relay sweeps each
    round (every two seconds when idle: a backlog at 2,500 hits a second or more)."""
    old = select(Hit.id).where(Hit.at < before).order_by(Hit.at).limit(limit).scalar_subquery()
    await session.execute(delete(Hit).where(Hit.id.in_(old)))


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
    due: datetime,
) -> None:
    """Mark the answer alerted (``rules``: every rule that has alerted for it so far), open its
    follow-up if it has none, and queue one delivery per (webhook URL, its new rules), due at
    ``due``. The first alert counts in the answer's cells (``alerted``, and ``contacted`` with
    its wait if the customer was contacted already)."""
    before = counted(response)
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
            next_attempt_at=due,
            status="pending",
            created_at=now,
        )
        for url, new in deliveries
    )
    await session.flush()
    await count_answer(session, before, response)


async def set_followup_status(
    session: AsyncSession, response: Response, status: str, now: datetime
) -> None:
    """Move the follow-up to ``status`` (open, contacted, resolved): the first contact (or a
    resolution without one) sets ``contacted_at``, which counts the answer as contacted in its
    cells, with the wait since its alert, if it was alerted."""
    if status == response.followup_status:
        return
    before = counted(response)
    response.followup_status = status
    if status in ("contacted", "resolved") and response.contacted_at is None:
        response.contacted_at = now
    response.resolved_at = now if status == "resolved" else None
    await session.flush()
    await count_answer(session, before, response)


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


# Segments, each with values (``KeyRange.listed``).
Listed = tuple[tuple[str, tuple[str, ...]], ...]
# (survey_id, period start or None, segment values ("" for none), ...)
CellGroup = tuple[str, date | None, tuple[str, ...]]


@dataclass(frozen=True)
class KeyRange:
    """Which groups of a read, by their position in a report's order (survey, period start,
    segment values, compared by the database): after ``start`` (from it, with ``from_start``)
    up to ``end`` inclusive, the first ``limit`` of them. None: unbounded."""

    start: CellGroup | None = None
    from_start: bool = False
    end: CellGroup | None = None
    limit: int | None = None
    # The groups whose first segments (of the order) are from the first of these values to
    # the second, inclusive (``_by_leading``: they differ in their last value alone).
    lead: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    # Values of the segments between the day and the segment ``_lead_bounds`` puts a range on,
    # in the cells' primary key, each a superset of the values the read's days hold
    # (``_cell_where``, ``_before``).
    listed: Listed = ()


EVERY = KeyRange()


def _flat(group: CellGroup) -> list[Any]:
    """A group's key values as a read selects them (no period start for ``none``)."""
    survey, start, segments = group
    return [survey, *([] if start is None else [start]), *segments]


OPERATORS = {">": operator.gt, ">=": operator.ge, "<=": operator.le}


def _in_range(
    keys: list[Any], r: KeyRange, position: Callable[[CellGroup], list[Any]] = _flat
) -> list[ColumnElement[bool]]:
    """The rows whose ``keys`` (row values, compared as one) fall in ``r``; ``position`` the
    values of a group's keys. Before grouping: a row's keys are its group's."""
    bounds = []
    if r.start is not None:
        bounds.append((r.start, ">=" if r.from_start else ">"))
    if r.end is not None:
        bounds.append((r.end, "<="))
    out = []
    for group, op in bounds:
        values = [
            bindparam(None, v, type_=k.type) for k, v in zip(keys, position(group), strict=True)
        ]
        out.append(OPERATORS[op](tuple_(*keys), tuple_(*values)))
    return out


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


def floor(day: date, period: str) -> date:
    """The first day of the day's period (``day``, ``week`` or ``month``)."""
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return day


def step(start: date, period: str, back: bool = False) -> date:
    """The start of the next (or, ``back``, the previous) period."""
    if period == "day":
        return start + timedelta(days=-1 if back else 1)
    if period == "week":
        return start + timedelta(days=-7 if back else 7)
    if back:
        return (start - timedelta(days=1)).replace(day=1)
    return (start + timedelta(days=32)).replace(day=1)


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


# At most this many days are listed one by one in a read of the cells (``_cell_where``).
MAX_LISTED_DAYS = 732


# At most this many scans of the cells' primary key a read lists (days x listed values).
MAX_LISTED_SCANS = 20_000


def _cell_where(
    model: Any, q: CellQuery, each_day: bool = False, listed: Listed = ()
) -> list[ColumnElement[bool]]:
    """The cells (or contact waits) of ``q``'s surveys and days. ``each_day``: the days as a
    list, not a range, when both ends are known (and not too far apart): a read bounded by its
    leading segments (``_leading``) then looks each day's rows of those values up in the
    primary key (survey, day, segments…) instead of reading every row of the days from the
    index — PostgreSQL 15 has no skip scan; each listed day is a scan of its own (a quarter of
    one survey: 91 short scans instead of 19,000 index pages). ``listed``: the same for the
    segments between the day and a bounded one (the touchpoint and channel before the team),
    each combination of a day and their values a scan (up to ``MAX_LISTED_SCANS``): the scans
    then read only the bounded values' rows of the index too."""
    where: list[ColumnElement[bool]] = [model.survey_id.in_(q.surveys)]
    if each_day and q.since is not None and q.until is not None:
        days = (q.until - q.since).days
        if 0 < days <= MAX_LISTED_DAYS:
            where.append(model.day.in_([q.since + timedelta(days=i) for i in range(days)]))
            if days * math.prod(len(values) for _, values in listed) <= MAX_LISTED_SCANS:
                where += [getattr(model, column).in_(values) for column, values in listed]
            return where
    if q.since is not None:
        where.append(model.day >= q.since)
    if q.until is not None:
        where.append(model.day < q.until)
    return where


def _group(row: Any, q: CellQuery) -> CellGroup:
    """A row's group: the survey, the period start (None for ``none``) and the segment values
    (never NULL in the cells and roll-ups: "" for a segment the answer did not carry)."""
    if q.period == "none":
        return (row[0], None, tuple(row[1 : 1 + len(q.segments)]))
    return (row[0], row[1], tuple(row[2 : 2 + len(q.segments)]))


SCORE_VALUES = range(NO_SCORE, 11)  # every score a cell can hold: -1 (none) and 0…10


class CellSums(NamedTuple):
    """One group's counts: ``hist`` {score: answers} of the persons' answers with a score,
    ``skipped`` the persons' answers without one, the suspected bots' answers apart, how many
    answers (persons and bots) raised an alert and how many of those were contacted, and the
    invitations delivered."""

    hist: dict[int, int]
    skipped: int
    bots: int
    alerted: int
    contacted: int
    delivered: int


class ContactWaits(NamedTuple):
    """One group's contacted alerts: how many, and the two middle waits (microseconds; the
    same one when the count is odd), whose mean is the exact median."""

    contacted: int
    lower_us: int
    upper_us: int


def _next_month(day: date) -> date:
    return step(floor(day, "month"), "month")


# (grain, first bucket or None, end bucket (exclusive) or None)
RollupRange = tuple[str, date | None, date | None]


def rollup_ranges(q: CellQuery) -> list[RollupRange]:
    """Which roll-up rows cover days ``since <= day < until``: for a day period the day grain;
    for a week period whole weeks from the week grain, otherwise whole months from the month
    grain; the partial weeks or months at either end from the day grain."""
    if q.period == "day":
        return [("day", q.since, q.until)]
    grain = "week" if q.period == "week" else "month"
    first = q.since
    if first is not None and floor(first, grain) != first:
        first = step(floor(first, grain), grain)
    end = q.until if q.until is None else floor(q.until, grain)
    if first is not None and end is not None and first >= end:  # no whole week or month inside
        return [("day", q.since, q.until)]
    out: list[RollupRange] = []
    if q.since is not None and first is not None and q.since < first:
        out.append(("day", q.since, first))
    out.append((grain, first, end))
    if q.until is not None and end is not None and end < q.until:
        out.append(("day", end, q.until))
    return out


def rollup_set(q: CellQuery) -> tuple[str, ...] | None:
    """The smallest grouping set of the roll-ups that covers the requested segments, at every
    grain the request reads (``MONTH_SETS`` only when it reads whole months alone); None when
    none does (the account with segments no month set holds together, or with any segment
    over days or weeks): then the full cells answer, the slower path (there are about as many
    cells as answers)."""
    for column in q.segments:
        if column not in SEGMENTS:
            raise ValueError(f"not a segment: {column}")
    grains = {grain for grain, _, _ in rollup_ranges(q)}
    sets = GRAIN_SETS["month"] if grains == {"month"} else ROLLUP_SETS
    return next((g for g in sets if set(q.segments) <= set(g)), None)


def uses_rollups(q: CellQuery) -> bool:
    return rollup_set(q) is not None


def _aligned(q: CellQuery) -> bool:
    """Whether the roll-ups' buckets are the period's: by day, by week over whole weeks, or by
    month over whole months."""
    grains = {grain for grain, _, _ in rollup_ranges(q)}
    return q.period == "day" or (q.period in ("week", "month") and grains == {q.period})


def in_index_order(q: CellQuery) -> bool:
    """Whether every roll-up row ``q`` reads is a group of its own (a grouping set of exactly
    the requested segments, the period's buckets): its groups are then read in the order of the
    roll-ups' primary key, and a page of them is a range of the index."""
    grouping = rollup_set(q)
    return grouping is not None and _aligned(q) and set(grouping) == set(q.segments)


def _rollup_query(
    session: AsyncSession,
    model: type[ScoreRollup] | type[DeliveryRollup],
    q: CellQuery,
    r: KeyRange = EVERY,
) -> tuple[list[Any], list[ColumnElement[bool]], bool]:
    """The group keys and the filter of a read of the roll-ups, laid out like the cells'
    (survey, period start, segment values), the rows of groups in ``r``; and whether every row
    is a group of its own (the set's segments are the requested ones and the period's buckets
    the roll-ups': by day, or by week or month over whole ones), read in the order of the
    primary key: then a page of groups is a range of the index. Within ``r.lead``, or the
    values of the set's first segment a range of one survey and period spans (``_leading``)."""
    grouping = rollup_set(q)
    if grouping is None:
        raise ValueError(f"no roll-up groups by {', '.join(q.segments)}")
    ranges = rollup_ranges(q)
    grains = {grain for grain, _, _ in ranges}
    aligned = _aligned(q)
    keys: list[Any] = [model.survey_id]
    if q.period != "none":
        bucket = model.bucket if aligned else period_start(session, model.bucket, q.period)
        keys.append(bucket.label("period_start"))
    keys.extend(getattr(model, column) for column in q.segments)
    spans = []
    for grain, first, end in ranges:
        span: list[ColumnElement[bool]] = [model.grain == grain]
        if first is not None and end is not None and step(first, grain) == end:
            # One bucket: equal to it, so the index scan ends at the bounds of the later key
            # columns too (a range of buckets would end only at the range's end).
            span.append(model.bucket == first)
        else:
            if first is not None:
                span.append(model.bucket >= first)
            if end is not None:
                span.append(model.bucket < end)
        spans.append(and_(*span))
    where = [
        model.survey_id.in_(q.surveys),
        model.dim == ",".join(grouping),
        or_(*spans) if len(spans) > 1 else spans[0],
        # "" in every segment the set sums over (true of every row of the set): the planner
        # then reads the primary key as ordered by the set's segments.
        *(getattr(model, c) == "" for c in SEGMENTS if c not in grouping),
    ]
    unique = in_index_order(q)
    if unique:
        # The range as one row value over the primary key's columns from the bucket on (the
        # survey, grain and set are the same in every row read; over several surveys, from the
        # survey on): the index scan starts at the first group of the page.
        (grain,) = grains
        dim = ",".join(grouping)
        columns: tuple[str, ...] = ("bucket", *SEGMENTS)
        if len(q.surveys) > 1:
            columns = ("survey_id", "grain", "dim", *columns)
        if r.end is not None and _within_one(q, r) and grouping:
            # Within one survey and bucket, those are fixed (below) and the row value starts at
            # the set's first segment: PostgreSQL (15) ends an index scan at a row value's
            # bound only where the row value's first column decides, and with the bucket first
            # it never does within the bucket (the scan then reads the rest of the bucket's
            # index: 4,600 pages instead of 1,700 for a month of the account and agent).
            columns = SEGMENTS[min(SEGMENTS.index(c) for c in grouping) :]
            where += [model.survey_id == r.end[0], model.bucket == r.end[1]]

        def position(group: CellGroup) -> list[Any]:
            values = dict(zip(q.segments, group[2], strict=True))
            key = {"survey_id": group[0], "grain": grain, "dim": dim, "bucket": group[1]}
            return [key[c] if c in key else values.get(c, "") for c in columns]

        where += _in_range([getattr(model, c) for c in columns], r, position)
    else:
        where += _in_range(keys, r)
    return keys, where + _leading(model, q, r), unique


async def plan_for_reports(session: AsyncSession) -> None:
    """Before a report's reads, on PostgreSQL, for the rest of the transaction:

    - no JIT compilation (``jit = off``). The reads are index scans of a few thousand to tens
      of thousands of roll-up rows, but the planner can overestimate them tenfold (the roll-ups
      hold every grouping set in one table) and then spends more time compiling the query than
      running it: 160 of 250 ms for the account by month over 10M answers;
    - a plan for each statement's own values (``plan_cache_mode = force_custom_plan``): the
      driver prepares statements, and after five runs PostgreSQL may keep a generic plan,
      which cannot use the month sets' covering index (its predicate is proved from the
      values) nor end a scan at their bounds: at 10M answers January 15 to December 15 by
      account and team went from 0.83 s to 1.2 s after a few requests. Planning takes a few
      milliseconds of reads that take hundreds.

    (Tried: ``work_mem`` 32 MB, so that summing a page's rows does not spill to disk; the
    planner then sorts them instead of hashing, and the partial months by account and team
    took 1.0–1.3 s instead of 0.76–0.78.)"""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        await session.execute(text("SET LOCAL jit = off"))
        await session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))


async def _rows(session: AsyncSession, stmt: Any) -> list[Any]:
    """The rows of a Core statement (no ORM result processing: the reads are wide)."""
    conn = await session.connection()
    return list((await conn.execute(stmt)).all())


# The count columns of a read, in order: the skipped (NO_SCORE), each score 0…10, the bots'
# answers, the alerted, the contacted, the delivered.
_SUMS = (*SCORE_COLUMNS.values(), "bots", "alerted", "contacted", "delivered")


def sources(q: CellQuery) -> list[tuple[CellQuery, bool]]:
    """Where ``q``'s days are read, each part with whether from the roll-ups: all of them from
    the roll-ups when a grouping set covers the segments at every grain read; else, when a
    month set covers them (the account with other segments), the whole months from the month
    roll-ups and the days around them from the cells; else all from the cells."""
    if uses_rollups(q):
        return [(q, True)]
    ranges = rollup_ranges(q)
    months = any(grain == "month" for grain, _, _ in ranges)
    if not months or not any(set(q.segments) <= set(g) for g in MONTH_SETS):
        return [(q, False)]
    return [
        (CellQuery(q.surveys, first, end, q.period, q.segments), grain == "month")
        for grain, first, end in ranges
    ]


def _count_selects(session: AsyncSession, q: CellQuery, r: KeyRange) -> list[Any]:
    """SELECTs of the same shape (group keys ``k0``…, then a column per name in ``_SUMS``),
    one row per group in ``r`` each, two per source of ``sources``: the answers (a column per
    score already in the roll-ups; pivoted from the cells) and the deliveries, each 0 in the
    other's columns. With a limit, each is the first ``limit`` groups of its table in order:
    the first ``limit`` groups of all are among them (each has at most ``limit`` - 1 before it
    in any one)."""
    out = []
    for part, rollups in sources(q):
        months = _month_reads(part, r) if rollups else None
        if months is None:
            out += _source_selects(session, part, r, rollups)
        else:
            for month, within in months:
                out += _source_selects(session, month, within, rollups, keep_period=False)
    return out


# At most this many reads of a survey's month (below).
MAX_MONTH_READS = 24


def _month_reads(q: CellQuery, r: KeyRange) -> list[tuple[CellQuery, KeyRange]] | None:
    """A page or a range of groups of a read without a period over whole months, from a
    grouping set of exactly its segments, as a read of each survey's month by month (at most
    ``MAX_MONTH_READS``): each month then holds a row per group in the order of the index, so
    each read is a range of it (at most ``r.limit`` rows) where one read of all the months
    would sum every row of the set to find the page's groups (at 10M answers, a quarter by
    account and team: 119,000 rows for a page of 5,000). None: read it at once."""
    if q.period != "none" or r == EVERY or q.since is None or q.until is None:
        return None
    # By month, the same days would be read in the index's order (whole months, a set of
    # exactly the segments).
    if not in_index_order(CellQuery(q.surveys, q.since, q.until, "month", q.segments)):
        return None
    months = [q.since]
    while _next_month(months[-1]) < q.until:
        months.append(_next_month(months[-1]))
    surveys = _surveys_in(q, r)
    if len(surveys) * len(months) > MAX_MONTH_READS:
        return None

    def at(group: CellGroup | None, month: date) -> CellGroup | None:
        return None if group is None else (group[0], month, group[2])

    return [
        (
            CellQuery((survey,), month, _next_month(month), "month", q.segments),
            KeyRange(at(start, month), r.from_start, at(end, month), r.limit, r.lead),
        )
        for survey, start, end in surveys
        for month in months
    ]


def _surveys_in(q: CellQuery, r: KeyRange) -> list[tuple[str, CellGroup | None, CellGroup | None]]:
    """The surveys of ``q`` that ``r`` reaches, in the order of the groups (the survey is their
    first key), each with the bounds of ``r`` within it: a bound in another survey bounds none
    of this one's groups."""
    return [
        (
            survey,
            r.start if r.start is not None and r.start[0] == survey else None,
            r.end if r.end is not None and r.end[0] == survey else None,
        )
        for survey in sorted(q.surveys)
        if (r.start is None or survey >= r.start[0]) and (r.end is None or survey <= r.end[0])
    ]


def _source_selects(
    session: AsyncSession, q: CellQuery, r: KeyRange, rollups: bool, *, keep_period: bool = True
) -> list[Any]:
    """``_count_selects`` of one source: the roll-ups or the cells; without the period's key
    (``keep_period`` False: a month read of a report without a period)."""
    zero: ColumnElement[int] = literal_column("0", Integer())
    answers: list[Any]
    if rollups:
        keys, where, unique = _rollup_query(session, ScoreRollup, q, r)
        answers = [getattr(ScoreRollup, c) for c in _SUMS[:-1]]
        # Groups with answers (scored, skipped or bots: alerts are of answers); a row can have
        # come down to none when its answers moved.
        anything: Any = sum(answers[1:13], answers[0])
        dkeys, dwhere, _ = _rollup_query(session, DeliveryRollup, q, r)
        delivered: Any = DeliveryRollup.n
    else:
        unique = False
        keys = _cell_keys(session, ScoreCell, q)
        person = ScoreCell.suspected_bot.is_(False)
        answers = [
            case((and_(person, ScoreCell.score == value), ScoreCell.n), else_=0)
            for value in SCORE_VALUES
        ]
        answers += [
            case((ScoreCell.suspected_bot.is_(True), ScoreCell.n), else_=0),
            ScoreCell.alerted,
            ScoreCell.contacted,
        ]
        anything = ScoreCell.n
        lead = _leading(ScoreCell, q, r)
        where = _cell_where(ScoreCell, q, bool(lead), r.listed) + lead
        dkeys = _cell_keys(session, DeliveryCell, q)
        dlead = _leading(DeliveryCell, q, r)
        dwhere = _cell_where(DeliveryCell, q, bool(dlead), r.listed) + dlead
        delivered = DeliveryCell.n
    # Read in the order of the keys (on a roll-up read by month or day, that of the index);
    # a month read of a report without a period orders by the month too (the index's order,
    # whatever the planner makes of a one-month range) but does not select it.
    order, dorder = keys, dkeys
    dated = keep_period and q.period != "none"
    if not keep_period:
        keys, dkeys = [keys[0], *keys[2:]], [dkeys[0], *dkeys[2:]]
    if not unique:
        # Summed per group first: a group has many rows (every day, every other segment). As
        # BIGINT: PostgreSQL sums a BIGINT column (the cells' counts) into NUMERIC, which the
        # report's sum over the sources would then add up as NUMERIC too, several times slower.
        answers = [cast(func.sum(c), BigInteger) for c in answers]
        anything, delivered = func.sum(anything), cast(func.sum(delivered), BigInteger)
    out = [
        select(
            *(k.label(f"k{i}") for i, k in enumerate(keys)),
            *(c.label(name) for c, name in zip(answers, _SUMS[:-1], strict=True)),
            zero.label("delivered"),
        ).where(*where),
        select(
            *(k.label(f"k{i}") for i, k in enumerate(dkeys)),
            *(zero.label(name) for name in _SUMS[:-1]),
            delivered.label("delivered"),
        ).where(*dwhere),
    ]
    if unique:
        out = [out[0].where(anything > 0), out[1].where(delivered > 0)]
    else:
        out = [
            out[0].group_by(*keys).having(anything > 0),
            out[1].group_by(*dkeys).having(delivered > 0),
        ]
    if not rollups and (r.start is not None or r.end is not None):
        # The cells' range of groups is applied to their sums, behind OFFSET 0 (PostgreSQL
        # pushes no condition through it; a HAVING on the group keys alone it would move to
        # WHERE). In WHERE, PostgreSQL would take the row value for a bound of the index scan
        # on its first column (the survey), beside that column's own condition, and then no
        # longer end each day's scan at the leading segments' bounds (a quarter's previous
        # period: 18,700 index pages instead of about 4,000).
        named = _named(len(keys), dated)
        order = dorder = named[: len(keys)]
        out = [
            select(*named).select_from(part.offset(0).subquery()).where(*_in_range(order, r))
            for part in out
        ]
    if r.limit is not None:
        # In a subquery: SQLite takes no ORDER BY or LIMIT in a member of a UNION.
        out = [
            select(*_named(len(keys), dated)).select_from(
                part.order_by(*by).limit(r.limit).subquery()
            )
            for part, by in ((out[0], order), (out[1], dorder))
        ]
    return out


def _named_keys(width: int, dated: bool = False) -> list[Any]:
    """A read's group keys by name, ``k0``… (``width`` of them; ``dated``: the second is the
    period's start), to select them from a subquery: its ``.c`` would build a proxy of each
    column (for a union, of every SELECT's: a third of building a report's statements in
    Python)."""
    keys: list[Any] = [named_column(f"k{i}", String()) for i in range(width)]
    if dated:  # typed: SQLite returns a date as text
        keys[1] = named_column("k1", Date())
    return keys


def _named(width: int, dated: bool) -> list[Any]:
    """The columns of ``_count_selects``' SELECTs by name: ``_named_keys`` and ``_SUMS``."""
    return _named_keys(width, dated) + [named_column(name) for name in _SUMS]


def _within_one(q: CellQuery, r: KeyRange) -> bool:
    """Whether every group of ``r`` (which has an end) is of the survey and period of its end:
    its start's are the same, or it has none and ``q`` reads one survey over one period."""
    assert r.end is not None
    if r.start is not None:
        return r.start[:2] == r.end[:2]
    if len(q.surveys) != 1:
        return False
    if q.period == "none":
        return True
    return (
        q.since is not None
        and q.until is not None
        and step(floor(q.since, q.period), q.period) >= q.until
    )


def _lead_bounds(
    q: CellQuery, r: KeyRange
) -> tuple[tuple[str, ...] | None, tuple[str, ...], int] | None:
    """The first segments of the order that every group in ``r`` is within, as (low, high,
    i): ``r.lead``, or a range's first and last group's within one survey and period. The
    segments before the ``i``-th are equal to low's (and high's), the ``i``-th is between
    low's and high's; without a first group (low None), the first segment up to high's."""
    if not q.segments:
        return None
    if r.lead is not None:
        low, high = r.lead
    elif r.end is not None and _within_one(q, r):
        if r.start is None:  # from the first group of the survey and period
            return None, r.end[2], 0
        low, high = r.start[2], r.end[2]
    else:
        return None
    same = next((i for i, (a, b) in enumerate(zip(low, high, strict=True)) if a != b), len(low) - 1)
    return low, high, same


def _leading(model: Any, q: CellQuery, r: KeyRange) -> list[Any]:
    """Bounds of the first segments of the order that every group in ``r`` is within
    (``_lead_bounds``): each a condition on one column, which the index checks before a row is
    read (a row value over columns that are not next to each other in the index is checked
    only on the rows read). The cells' index then reads the period's days, but only the rows
    of those values from the table; a roll-up's index only those rows."""
    bounds = _lead_bounds(q, r)
    if bounds is None:
        return []
    low, high, same = bounds
    columns = [getattr(model, c) for c in q.segments]
    if low is None:
        return [columns[0] <= high[0]]
    return [
        *(columns[i] == low[i] for i in range(same)),
        columns[same] >= low[same],
        columns[same] <= high[same],
    ]


def _before(q: CellQuery, at: int) -> list[str]:
    """The segments between the day and ``q``'s ``at``-th segment in the cells' primary key
    that the bounds of ``_leading`` leave open (those before it in ``q`` are equal to a value):
    what ``KeyRange.listed`` lists."""
    column = q.segments[at]
    return [c for c in SEGMENTS[: SEGMENTS.index(column)] if c not in q.segments[:at]]


# A group's counts as a read returns them, in the order of ``_SUMS``.
ReadCounts = tuple[int, ...]


async def cell_counts(
    session: AsyncSession, q: CellQuery, r: KeyRange = EVERY
) -> list[tuple[CellGroup, ReadCounts]]:
    """Each group's answers by score, alerts and deliveries, summed in SQL into one row per
    group, in the order of the groups, those in ``r``: from the roll-ups (a column per score
    already) when a grouping set covers the segments, else from the cells (a column per score
    value pivoted in SQL); the answers and the deliveries in one statement (``UNION ALL``, then
    ``GROUP BY`` the group). The counts stay as read (``sums`` makes them a ``CellSums``): a
    report scores only the groups of its page.

    A page (``r.limit``) of a report by period whose groups are sums of several rows (partial
    weeks or months, the full cells) is read a few periods at a time (``_by_periods``): its
    groups are in the order of the periods, so the first page does not sum the whole range."""
    if (
        r.limit is not None
        and r.end is None
        and q.period != "none"
        and q.since is not None
        and q.until is not None
        and not in_index_order(q)
    ):
        return await _by_periods(session, q, r)
    if r.limit is not None and r.end is None and q.period == "none" and _by_cells(q):
        out: list[tuple[CellGroup, ReadCounts]] = []
        for survey, start, _ in _surveys_in(q, r):
            if len(out) < r.limit:
                one = replace(q, surveys=(survey,))
                within = KeyRange(start, r.from_start, None, r.limit - len(out))
                out += await _by_leading(session, one, within)
        return out
    if _by_cells(q):
        # A range of the cells' groups (a page's previous period): list what its bounds leave
        # open, as a page's reads do.
        bounds = _lead_bounds(q, r)
        if bounds is not None:
            r = replace(r, listed=await _segment_values(session, q, _before(q, bounds[2])))
    return await _counts(session, q, r)


def _by_cells(q: CellQuery) -> bool:
    """Whether ``q`` reads some of its days from the full cells (no roll-up holds its segments
    at those days' grain), grouped by more than one segment: then a page is read a few values
    of the first segment at a time (``_by_leading``)."""
    return len(q.segments) > 1 and not all(rollups for _, rollups in sources(q))


async def _by_leading(
    session: AsyncSession, q: CellQuery, r: KeyRange
) -> list[tuple[CellGroup, ReadCounts]]:
    """``cell_counts`` of a page of one survey over one period (or without one) that reads cells,
    a few values of its leading segments at a time (every segment but the last, the account:
    the groups are in their order). Those values from the cursor's on, each with its answers
    and deliveries, come from the roll-ups (every segment but the account has them: a few
    thousand rows at most); then the cells of as many values as the rest of the page needs at
    the groups per answer or delivery so far (at first one each, the most there can be; a
    quarter more), until the page is full. A read takes values that differ in their last
    segment alone (the agents of one touchpoint for the account, touchpoint and agent): its
    cells are then bounded by the others' values and a range of the last (``_leading``). The
    cells' index still covers the period's days, but only the rows of those values are read
    from the table and summed, not every cell."""
    assert r.limit is not None and r.end is None
    lead = q.segments[:-1]
    period = None if q.period == "none" or q.since is None else floor(q.since, q.period)
    # The cursor's values of the segments bound the values only in its own period.
    start = None
    if r.start is not None and r.start[1] == period:
        start = (r.start[0], None, r.start[2][: len(lead)])
    one = CellQuery(q.surveys, q.since, q.until, "none", lead)
    values = [
        (group[2], sum(counts[:13]) + counts[15])  # answers (bots too) and deliveries
        for group, counts in await _counts(session, one, KeyRange(start, True))
    ]
    listed = await _segment_values(session, q, _before(q, len(lead) - 1))
    out: list[tuple[CellGroup, ReadCounts]] = []
    rate, counted, i = 1.0, 0, 0
    while i < len(values) and len(out) < r.limit:
        missing = r.limit - len(out)
        j, weight = i, 0
        while (
            j < len(values)
            and weight * rate < 1.25 * missing
            and values[j][0][:-1] == values[i][0][:-1]
        ):
            weight += values[j][1]
            j += 1
        within = replace(r, limit=missing, lead=(values[i][0], values[j - 1][0]), listed=listed)
        found = await _counts(session, q, within)
        out += found
        counted += weight
        rate = len(out) / counted if out and counted else rate / 2
        i = j
    return out


async def _segment_values(session: AsyncSession, q: CellQuery, columns: list[str]) -> Listed:
    """Each of ``columns`` with the values its month roll-ups hold (answers or deliveries) over
    the months of ``q``'s days: a superset of the values of its cells in those days (a few
    rows per value and month)."""
    if not columns or q.since is None or q.until is None:
        return ()
    found: dict[str, set[str]] = {column: set() for column in columns}
    for model in (ScoreRollup, DeliveryRollup):
        stmt = select(model.dim, *(getattr(model, c) for c in columns)).where(
            model.survey_id.in_(q.surveys),
            model.grain == "month",
            model.dim.in_(columns),
            model.bucket >= floor(q.since, "month"),
            model.bucket < q.until,
        )
        for row in await _rows(session, stmt):
            found[row[0]].add(row[1 + columns.index(row[0])])
    return tuple((column, tuple(sorted(found[column]))) for column in columns)


async def _by_periods(
    session: AsyncSession, q: CellQuery, r: KeyRange
) -> list[tuple[CellGroup, ReadCounts]]:
    """``cell_counts`` of a page, survey by survey (the first key of the order) and, within a
    survey, over windows of whole periods from the page's first period on: one period first,
    then as many as the groups per period read so far say the rest of the page needs, until
    the page is full or the range read."""
    assert r.limit is not None and q.since is not None and q.until is not None
    out: list[tuple[CellGroup, ReadCounts]] = []
    for survey, start, _ in _surveys_in(q, r):
        since = q.since if start is None or start[1] is None else max(q.since, start[1])
        width, periods, groups = 1, 0, 0
        while since < q.until and len(out) < r.limit:
            until = floor(since, q.period)
            for _ in range(width):
                until = step(until, q.period)
                if until >= q.until:
                    break
            window = CellQuery((survey,), since, min(until, q.until), q.period, q.segments)
            within = KeyRange(start, r.from_start, None, r.limit - len(out))
            if width == 1 and _by_cells(window):  # one period of the full cells
                found = await _by_leading(session, window, within)
            else:
                found = await _counts(session, window, within)
            out.extend(found)
            periods, groups = periods + width, groups + len(found)
            # As many periods as the rest of the page needs at the groups per period so far,
            # and a quarter more (one more read if that falls short, the whole rest at most).
            missing = r.limit - len(out)
            width = math.ceil(1.25 * missing * periods / groups) if groups else 2 * width
            since, start = until, None
    return out


async def _counts(
    session: AsyncSession, q: CellQuery, r: KeyRange
) -> list[tuple[CellGroup, ReadCounts]]:
    """``cell_counts`` in one statement; a page read month by month in two, its last group
    first (``_page_end``), and a third if the page came out short."""
    if r.limit is not None and r.end is None:
        end = await _page_end(session, q, r)
        if end is not None:
            found = await _counts(session, q, replace(r, end=end))
            if len(found) < r.limit:  # some of the keys read had come down to no answers
                found += await _counts(
                    session, q, KeyRange(end, False, None, r.limit - len(found), r.lead)
                )
            return found
    width = 1 + (q.period != "none") + len(q.segments)
    named = _named(width, q.period != "none")
    keys, counts = named[:width], named[width:]
    stmt = (
        select(*keys, *(cast(func.sum(c), BigInteger) for c in counts))
        .select_from(union_all(*_count_selects(session, q, r)).subquery())
        .group_by(*keys)
        .order_by(*keys)
    )
    if r.limit is not None:
        stmt = stmt.limit(r.limit)
    return [(_group(row, q), tuple(row[width:])) for row in await _rows(session, stmt)]


async def _page_end(session: AsyncSession, q: CellQuery, r: KeyRange) -> CellGroup | None:
    """The last group of a page of ``q`` that is read month by month from the roll-ups
    (``_month_reads``), when the months' reads can stop before their ``r.limit`` rows each: the
    ``r.limit``-th of the groups the months' first ``r.limit`` keys hold, read from the primary
    key's index alone (no row of the table: the keys are in the index). The first ``r.limit``
    groups of all are up to it, and each month's rows up to it are every row the page needs of
    that month: where a group has rows in a third of the months (the year by account and agent
    at 10M answers), a third of what the months' first ``r.limit`` rows each would be. None:
    no such read, or fewer groups than the limit (read them all)."""
    assert r.limit is not None
    months = _month_reads(q, r) if sources(q) == [(q, True)] else None
    if months is None or len(months) < 2:
        return None
    columns = _named_keys(1 + len(q.segments))
    reads = []
    for month, within in months:
        for model in (ScoreRollup, DeliveryRollup):
            keys, where, _ = _rollup_query(session, model, month, within)
            labelled = [k.label(f"k{i}") for i, k in enumerate([keys[0], *keys[2:]])]
            read = select(*labelled).where(*where).order_by(*keys).limit(r.limit)
            reads.append(select(*columns).select_from(read.subquery()))
    every = union_all(*reads).subquery()
    stmt = (
        select(*columns)
        .select_from(every)
        .distinct()
        .order_by(*columns)
        .offset(r.limit - 1)
        .limit(1)
    )
    rows = await _rows(session, stmt)
    return (rows[0][0], None, tuple(rows[0][1:])) if rows else None


def sums(counts: ReadCounts) -> CellSums:
    """A group's ``CellSums`` from the counts ``cell_counts`` read: no_score, score_0 …
    score_10, bots, alerted, contacted, delivered."""
    hist = {s: c for s, c in enumerate(counts[1:12]) if c}
    return CellSums(hist, counts[0], counts[12], counts[13], counts[14], counts[15])


# percentile_disc(f) is the wait at position ⌈f·n⌉: with f = 0.5 + 1e-9 that is n/2 + 1 for an
# even n and (n + 1)/2 for an odd one, for any group of fewer than 500 million waits.
UPPER_MIDDLE = "0.500000001"


async def contact_waits(
    session: AsyncSession, q: CellQuery, r: KeyRange = EVERY
) -> list[tuple[CellGroup, ContactWaits]]:
    """Each group's contacted alerts and the two middle waits, from ``collector_contact_waits``
    (a row per contacted alert: a few per cent of the answers). On PostgreSQL both middles come
    from one sort of each group's waits: ``percentile_disc`` of 0.5 is the wait at position
    ⌈n/2⌉ (the lower middle) and of ``UPPER_MIDDLE`` the one at ⌈n/2⌉ + 1 when n is even, the
    same one when n is odd; the segments are compared bytewise (``COLLATE "C"``: only equality
    matters). Elsewhere (SQLite) a running count of each group's waits in order: the lower
    middle is the first wait whose running count reaches half the group's (2·upto ≥ total),
    the upper middle the first that passes it (2·upto > total). Only the groups in ``r``
    (its limit aside: a page's waits are read for the page's range of groups)."""
    postgres = session.bind is None or session.bind.dialect.name == "postgresql"
    keys = _cell_keys(session, ContactWait, q)
    where = _cell_where(ContactWait, q) + _in_range(keys, r)
    if postgres:
        keys = keys[: len(keys) - len(q.segments)] + [
            getattr(ContactWait, column).collate("C") for column in q.segments
        ]
        middles = func.percentile_disc(literal_column(f"ARRAY[0.5, {UPPER_MIDDLE}]"))
        stmt = (
            select(*keys, func.count(), middles.within_group(ContactWait.wait_us))
            .where(*where)
            .group_by(*keys)
        )
        # (keys…, count, [lower, upper]) as (keys…, count, lower, upper), as on SQLite
        rows = [(*row[:-1], *row[-1]) for row in await _rows(session, stmt)]
    else:
        inner = (
            select(*(k.label(f"k{i}") for i, k in enumerate(keys)), ContactWait.wait_us)
            .where(*where)
            .subquery()
        )
        part = [inner.c[f"k{i}"] for i in range(len(keys))]
        ranked = select(
            *part,
            inner.c.wait_us,
            func.count().over(partition_by=part, order_by=inner.c.wait_us).label("upto"),
            func.count().over(partition_by=part).label("total"),
        ).subquery()
        by = [ranked.c[f"k{i}"] for i in range(len(keys))]
        upto, total, wait = ranked.c.upto, ranked.c.total, ranked.c.wait_us
        stmt = select(
            *by,
            func.max(total),
            func.min(case((2 * upto >= total, wait))),
            func.min(case((2 * upto > total, wait))),
        ).group_by(*by)
        rows = await _rows(session, stmt)
    return [
        (_group(row, q), ContactWaits(int(row[-3]), int(row[-2]), int(row[-1]))) for row in rows
    ]
