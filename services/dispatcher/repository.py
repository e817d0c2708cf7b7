"""All of the dispatcher's SQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlalchemy import and_, case, delete, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.db import claim_oldest, upsert_insert
from services.common.erasure import contact_hash, customer_hash, is_hash
from services.dispatcher.models import OptOut, Receipt, Send, WebhookToken

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


async def release_claims(
    session: AsyncSession, *, instance: str, lease_expired_before: datetime
) -> int:
    """Sends claimed by a crashed round and never started (the provider was not called):
    ours (we restarted) or anyone's past the lease go back to pending, their attempt uncounted."""
    stmt = (
        update(Send)
        .where(
            Send.status == "claimed",
            or_(Send.claimed_by == instance, Send.claimed_at < lease_expired_before),
        )
        .values(
            status="pending",
            claimed_by=None,
            claimed_at=None,
            attempts=case((Send.attempts > 0, Send.attempts - 1), else_=0),
        )
        .returning(Send.invitation_id)
    )
    return len((await session.execute(stmt)).all())


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


def hashed_key(salt: SecretStr | str, channel: str, contact: str) -> str:
    """The opt-out key an erasure keeps: the salted hash of the contact point, or
    ``customer:<hash of the id>`` for a whole customer."""
    if contact.startswith(CUSTOMER_PREFIX):
        customer = contact.removeprefix(CUSTOMER_PREFIX)
        return contact if is_hash(customer) else customer_key(customer_hash(salt, customer))
    return contact if is_hash(contact) else contact_hash(salt, channel, contact)


async def opted_out(
    session: AsyncSession,
    keys: Iterable[tuple[str, str]],
    salt: SecretStr | str | None = None,
) -> set[tuple[str, str]]:
    """Which of these (channel, contact or ``customer:<id>``) keys have opted out. With the
    erasure ``salt``, a key also matches the hashed opt-out an erasure left of it."""
    plain = {(c, k): (c, k) for c, k in set(keys)}
    if salt is not None:
        plain.update({(c, hashed_key(salt, c, k)): (c, k) for c, k in list(plain)})
    if not plain:
        return set()
    stmt = select(OptOut.channel, OptOut.contact).where(
        tuple_(OptOut.channel, OptOut.contact).in_(list(plain))
    )
    return {plain[(c, k)] for c, k in (await session.execute(stmt)).all()}


async def unpublished_optouts(session: AsyncSession, limit: int) -> list[OptOut]:
    return await claim_oldest(
        session, OptOut, OptOut.published_at.is_(None), order_by=OptOut.created_at, limit=limit
    )


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


async def token_fits(
    session: AsyncSession,
    provider: str,
    token: str,
    body_sha256: str,
    keep_seconds: float,
    *,
    now: datetime,
) -> bool:
    """Note a webhook's one-use token with its body's digest. True when the token is new, or
    came before with this same body (the provider's retry of a request whose answer it did not
    get); False when it came with another body (its signature reused: a forgery). Tokens older
    than ``keep_seconds`` are forgotten on the way (the timestamp check refuses them)."""
    await session.execute(
        delete(WebhookToken).where(
            WebhookToken.provider == provider,
            WebhookToken.seen_at < now - timedelta(seconds=keep_seconds),
        )
    )
    stmt = (
        upsert_insert(session)(WebhookToken)
        .values(provider=provider, token=token[:200], body_sha256=body_sha256, seen_at=now)
        .on_conflict_do_nothing(index_elements=["provider", "token"])
        .returning(WebhookToken.token)
    )
    if (await session.execute(stmt)).first() is not None:
        return True
    seen = select(WebhookToken.body_sha256).where(
        WebhookToken.provider == provider, WebhookToken.token == token[:200]
    )
    return (await session.execute(seen)).scalar_one_or_none() == body_sha256


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
    return await claim_oldest(
        session, Receipt, Receipt.published_at.is_(None), order_by=Receipt.received_at, limit=limit
    )


async def mark_receipts_published(
    session: AsyncSession, keys: list[tuple[str, str]], now: datetime
) -> None:
    if keys:
        await session.execute(
            update(Receipt)
            .where(tuple_(Receipt.provider, Receipt.event_id).in_(keys))
            .values(published_at=now)
        )


# -- erasure --------------------------------------------------------------------------------------

# What an erased send keeps of its customer in the stored invitation.
_KEPT_CUSTOMER_FIELDS = ("locale", "timezone")


def scrubbed_invitation(invitation: dict[str, Any], hashed: str) -> dict[str, Any]:
    """The stored invitation without the customer's identity and contact points."""
    customer = invitation.get("customer") or {}
    kept = {k: customer[k] for k in _KEPT_CUSTOMER_FIELDS if customer.get(k) is not None}
    context = {**(invitation.get("context") or {}), "case_id": None}
    # The source's event id may embed the customer's (it was needed only to trace the event).
    return {
        **invitation,
        "customer": {"id": hashed, **kept},
        "context": context,
        "event_id": "erased",
    }


async def erase_sends(
    session: AsyncSession, sends: Sequence[Send], hashed: str, now: datetime
) -> None:
    """Cancel these sends if they have not started (reason ``erased``: never sent) and strip
    them of the customer's identity: the contact point, the invitation's contact fields; the
    customer id becomes its salted hash."""
    await cancel(session, {s.invitation_id for s in sends}, reason="erased", now=now)
    for s in sends:
        s.contact = None
        s.customer_id = hashed
        s.invitation = scrubbed_invitation(s.invitation, hashed)
    await session.flush()


async def erase_customer(
    session: AsyncSession, customer_id: str, salt: SecretStr | str, now: datetime
) -> int:
    """Forget a customer: every pending send and reminder is cancelled, every send loses the
    contact point and identity, receipts lose the customer id, and the customer's opt-outs stay
    only as salted hashes (so they still suppress the contact point). Idempotent. Returns the
    number of sends erased."""
    hashed = customer_hash(salt, customer_id)
    sends = list(
        (
            await session.execute(select(Send).where(Send.customer_id.in_([customer_id, hashed])))
        ).scalars()
    )
    contacts = {(s.channel, s.contact) for s in sends if s.contact}
    await erase_sends(session, sends, hashed, now)
    await session.execute(
        update(Receipt).where(Receipt.customer_id == customer_id).values(customer_id=None)
    )
    whose = [
        OptOut.customer_id == customer_id,
        OptOut.contact == customer_key(customer_id),
        *(and_(OptOut.channel == ch, OptOut.contact == c) for ch, c in contacts),
    ]
    optouts = list((await session.execute(select(OptOut).where(or_(*whose)))).scalars())
    rows = []
    for o in optouts:  # the contact is part of the primary key: delete and insert
        rows.append(
            {
                "channel": o.channel,
                "contact": hashed_key(salt, o.channel, o.contact),
                "customer_id": None,
                "invitation_id": o.invitation_id,
                "survey_id": o.survey_id,
                "source": o.source,
                "reason": o.reason,
                "optout_id": o.optout_id,
                "created_at": o.created_at,
                "published_at": o.published_at or now,
            }
        )
    if optouts:
        await session.execute(
            delete(OptOut).where(
                tuple_(OptOut.channel, OptOut.contact).in_(
                    [(o.channel, o.contact) for o in optouts]
                )
            )
        )
        await add_optouts(session, rows)
    return len(sends)
