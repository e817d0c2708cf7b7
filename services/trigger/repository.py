"""All of the trigger's SQL."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from pydantic import SecretStr
from sqlalchemy import Row, Table, bindparam, delete, func, or_, select, text, tuple_, union, update
from sqlalchemy import insert as insert_stmt
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.db import one_of, upsert_insert
from services.common.erasure import contact_hash, is_hash
from services.trigger.models import Case, Customer, Decision, Invitation, OptOut, ProcessedEvent

EventKey = tuple[str, str]
AnyRow = Row[*tuple[Any, ...]]  # a result row, read by column name


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
    insert = upsert_insert(session)
    table = _table(ProcessedEvent)  # Core, not the ORM's bulk machinery: it is the hot path
    stmt = (
        insert(table)
        .on_conflict_do_nothing(index_elements=["source", "event_id"])
        .returning(table.c.source, table.c.event_id)
    )
    # An executemany with RETURNING: SQLAlchemy batches it into multi-row INSERTs whose compiled
    # form is cached (a .values(rows) statement compiles anew for every batch size).
    result = await session.execute(stmt, rows)
    return {(r.source, r.event_id) for r in result}


def _table(model: type[Any]) -> Table:
    return cast(Table, model.__table__)


async def record_decisions(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    if rows:
        await session.execute(insert_stmt(_table(Decision)), rows)


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


# The columns fatigue and coalescing read: plain rows, not ORM objects (the hot path loads a few
# thousand per batch).
HISTORY_COLUMNS = (
    Invitation.invitation_id,
    Invitation.customer_id,
    Invitation.trigger_id,
    Invitation.survey_id,
    Invitation.case_id,
    Invitation.send_at,
    Invitation.created_at,
    Invitation.account_id,
    Invitation.contact,
    Invitation.channel,
    Invitation.delivered_at,
    Invitation.responded_at,
    Invitation.failed_at,
)


async def recent_invitations(
    session: AsyncSession,
    *,
    customers: Sequence[str],
    accounts: Sequence[str] = (),
    contacts: Sequence[str] = (),
    since: Mapping[str, datetime],
    now: datetime,
) -> list[AnyRow]:
    """The invitations not cancelled of these customers, accounts or contact points created
    (or to be sent) since ``since[key]`` (for the keys "customer", "account" and "contact"; a
    key without it is not read), or still pending: the history fatigue limits and coalescing
    look at."""
    if not customers:
        return []
    keys = [
        ("customer", Invitation.customer_id, customers),
        ("account", Invitation.account_id, accounts),
        ("contact", Invitation.contact, contacts),
    ]
    # One SELECT per key, so each is a join of the values against that key's index (an OR of
    # the three would scan the table), and their UNION (an invitation may match several).
    selects = [
        select(*HISTORY_COLUMNS).where(
            one_of(session, column, values),
            Invitation.cancelled_at.is_(None),
            or_(
                Invitation.created_at >= since[key],
                Invitation.send_at >= since[key],
                Invitation.send_at > now,
            ),
        )
        for key, column, values in keys
        if values and key in since
    ]
    stmt = union(*selects).order_by("created_at")
    return list((await session.execute(stmt)).all())


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
        await session.execute(insert_stmt(_table(Invitation)), rows)


async def mark_cancelled(session: AsyncSession, ids: list[uuid.UUID], now: datetime) -> None:
    if ids:
        await session.execute(
            update(Invitation)
            .where(one_of(session, Invitation.invitation_id, ids))
            .values(cancelled_at=now)
        )


async def remember_customers(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Upsert customers' last known time zones (rows: customer_id, timezone, updated_at)."""
    if not rows:
        return
    stmt = upsert_insert(session)(Customer).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["customer_id"],
        set_={"timezone": stmt.excluded.timezone, "updated_at": stmt.excluded.updated_at},
    )
    await session.execute(stmt)


async def mark_unhappy(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Upsert the time of customers' latest unhappy answer (customer_id, last_unhappy_at)."""
    if not rows:
        return
    stmt = upsert_insert(session)(Customer).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["customer_id"],
        set_={
            "last_unhappy_at": stmt.excluded.last_unhappy_at,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    await session.execute(stmt)


async def customers(session: AsyncSession, ids: Sequence[str]) -> dict[str, AnyRow]:
    """What the trigger remembers of these customers: time zone and last unhappy answer."""
    if not ids:
        return {}
    rows = await session.execute(
        select(Customer.customer_id, Customer.timezone, Customer.last_unhappy_at).where(
            one_of(session, Customer.customer_id, ids)
        )
    )
    return {c.customer_id: c for c in rows}


async def update_cases(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Upsert cases' open/closed state (customer_id, case_id, open, updated_at)."""
    if not rows:
        return
    stmt = upsert_insert(session)(Case).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["customer_id", "case_id"],
        set_={"open": stmt.excluded.open, "updated_at": stmt.excluded.updated_at},
    )
    await session.execute(stmt)


async def open_cases(session: AsyncSession, ids: Sequence[str]) -> dict[str, set[str]]:
    if not ids:
        return {}
    rows = await session.execute(
        select(Case.customer_id, Case.case_id).where(
            one_of(session, Case.customer_id, ids), Case.open
        )
    )
    found: dict[str, set[str]] = {}
    for customer_id, case_id in rows.all():
        found.setdefault(customer_id, set()).add(case_id)
    return found


async def optouts(
    session: AsyncSession, customer_ids: Sequence[str], contacts: Sequence[str]
) -> list[AnyRow]:
    """Opt-outs (customer_id, contact, channel) of these customers or contact points."""
    if not customer_ids and not contacts:
        return []
    stmt = select(OptOut.customer_id, OptOut.contact, OptOut.channel).where(
        or_(
            one_of(session, OptOut.customer_id, customer_ids),
            one_of(session, OptOut.contact, contacts),
        )
    )
    return list((await session.execute(stmt)).all())


async def add_optouts(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    if rows:
        await session.execute(insert_stmt(_table(OptOut)), rows)


async def contacts_of(
    session: AsyncSession, invitation_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[str | None, str]]:
    """The contact point and channel of each invitation."""
    if not invitation_ids:
        return {}
    rows = await session.execute(
        select(Invitation.invitation_id, Invitation.contact, Invitation.channel).where(
            Invitation.invitation_id.in_(list(invitation_ids))
        )
    )
    return {i: (c, ch) for i, c, ch in rows.all()}


async def record_outcomes(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Delivery and response times of invitations (b_id plus delivered_at / failed_at /
    responded_at; a value already set is kept)."""
    table = cast(Table, Invitation.__table__)
    for column in ("delivered_at", "failed_at", "responded_at"):
        batch = [{"b_id": r["b_id"], "b_value": r[column]} for r in rows if r.get(column)]
        if batch:
            await session.execute(
                update(table)
                .where(table.c.invitation_id == bindparam("b_id"), table.c[column].is_(None))
                .values({column: bindparam("b_value")}),
                batch,
            )


async def quota_used(session: AsyncSession, survey_id: str, start: datetime, end: datetime) -> int:
    """Invitations of a survey to be sent in [start, end), not cancelled."""
    stmt = (
        select(func.count())
        .select_from(Invitation)
        .where(
            Invitation.survey_id == survey_id,
            Invitation.send_at >= start,
            Invitation.send_at < end,
            Invitation.cancelled_at.is_(None),
        )
    )
    return int((await session.execute(stmt)).scalar_one())


async def deliver_due(session: AsyncSession, now: datetime) -> None:
    """Mark every invitation due by ``now`` as delivered at its send time (``kaiku simulate``)."""
    await session.execute(
        update(Invitation)
        .where(
            Invitation.delivered_at.is_(None),
            Invitation.send_at <= now,
            Invitation.cancelled_at.is_(None),
        )
        .values(delivered_at=Invitation.send_at)
    )


async def all_decisions(session: AsyncSession) -> list[Decision]:
    return list((await session.execute(select(Decision))).scalars())


async def live_invitations(session: AsyncSession) -> list[Invitation]:
    """Every invitation not cancelled."""
    stmt = select(Invitation).where(Invitation.cancelled_at.is_(None))
    return list((await session.execute(stmt)).scalars())


# -- erasure --------------------------------------------------------------------------------------


async def erase_customer(
    session: AsyncSession, customer_id: str, hashed: str, salt: SecretStr, now: datetime
) -> list[Invitation]:
    """Forget a customer (``hashed`` is the salted hash of the id): their memory, cases and
    decision ledger are deleted; their invitations keep only what fatigue and quotas count (the
    customer id becomes its hash, contact and case are emptied); what was published for their
    events is dropped; their opt-outs keep the contact point and customer id as salted hashes.
    Returns the invitations not yet sent, cancelled here (again, on a redelivery) so the caller
    can tell the other services."""
    ids = [customer_id, hashed]
    pending = list(
        (
            await session.execute(
                select(Invitation).where(
                    Invitation.customer_id.in_(ids),
                    Invitation.delivered_at.is_(None),
                    Invitation.failed_at.is_(None),
                    Invitation.responded_at.is_(None),
                )
            )
        ).scalars()
    )
    await session.execute(
        update(Invitation)
        .where(Invitation.invitation_id.in_([p.invitation_id for p in pending]))
        .where(Invitation.cancelled_at.is_(None))
        .values(cancelled_at=now)
    )
    await session.execute(
        update(Invitation)
        .where(Invitation.customer_id == customer_id)
        .values(customer_id=hashed, contact=None, case_id=None)
    )
    await session.execute(
        update(ProcessedEvent)
        .where(ProcessedEvent.customer_id == customer_id)
        .values(customer_id=hashed, published=[])
    )
    for model in (Customer, Case, Decision):
        await session.execute(delete(model).where(model.customer_id == customer_id))
    for o in (await session.execute(select(OptOut).where(OptOut.customer_id.in_(ids)))).scalars():
        o.customer_id = hashed
        if o.contact is not None and not is_hash(o.contact):
            o.contact = contact_hash(salt, o.channel, o.contact)
    await session.flush()
    return pending
