"""Erasure in the dispatcher, on PostgreSQL and SQLite: the customer's pending sends and reminders
are cancelled for good, every send forgets the contact point, receipts the customer, and opt-outs
stay as salted hashes that the checks at the moment of sending still match."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.db import unit_of_work
from services.common.erasure import contact_hash, customer_hash
from services.common.events import CustomerErased, InvitationCancelled, OptOutRecorded
from services.common.kafka import Incoming
from services.dispatcher import repository
from services.dispatcher.handlers import InvitationHandler, OptOutHandler
from services.dispatcher.models import Base, OptOut, Send
from tests.pii import tables_holding
from tests.support import email_invitation

NOW = datetime.now(UTC)
SALT = SecretStr("test-salt")
CUSTOMER = "zz-erasure-customer"
EMAIL = f"{CUSTOMER}@example.com"
SECOND = "zz-second-address@example.org"


async def handle(sessions: async_sessionmaker[AsyncSession], handler: Any, *messages: Any) -> None:
    async with unit_of_work(sessions) as session:
        await handler([Incoming(None, m) for m in messages], session)


async def all_sends(sessions: async_sessionmaker[AsyncSession]) -> list[Send]:
    async with sessions() as session:
        return list((await session.execute(select(Send))).scalars())


async def test_erasure_cancels_pending_sends_and_keeps_opt_outs_hashed(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    invitations = InvitationHandler(SALT, clock=lambda: NOW)
    sent = email_invitation(CUSTOMER)
    later = email_invitation(CUSTOMER, send_at=NOW + timedelta(hours=2))
    later.customer.email = SECOND  # another address: the opt-out does not cancel it
    await handle(sessions, invitations, sent, later)
    async with unit_of_work(sessions) as session:  # the first went out and has its reminder
        await repository.update_sends(
            session,
            [{"invitation_id": sent.invitation_id, "kind": "invitation", "status": "sent"}],
        )
        send = (await repository.sends_of(session, [sent.invitation_id]))[0]
        await repository.schedule(
            session,
            [
                {
                    **{c: getattr(send, c) for c in ("invitation_id", "customer_id", "survey_id")},
                    **{c: getattr(send, c) for c in ("channel", "contact", "invitation")},
                    "kind": "reminder",
                    "status": "pending",
                    "send_at": NOW + timedelta(days=3),
                    "attempts": 0,
                    "created_at": NOW,
                }
            ],
        )
        await repository.add_receipts(
            session,
            [
                {
                    "provider": "smtp",
                    "event_id": "r1",
                    "invitation_id": sent.invitation_id,
                    "customer_id": CUSTOMER,
                    "survey_id": sent.survey_id,
                    "channel": "email",
                    "status": "delivered",
                    "occurred_at": NOW,
                    "received_at": NOW,
                    "published_at": NOW,
                }
            ],
        )
    optouts = OptOutHandler(SALT, clock=lambda: NOW)
    await handle(
        sessions,
        optouts,
        OptOutRecorded(
            optout_id=uuid.uuid4(),
            customer_id=CUSTOMER,
            channel="email",
            invitation_id=sent.invitation_id,
            source="one_click",
            occurred_at=NOW,
        ),
    )
    erased = CustomerErased(erasure_id=uuid.uuid4(), customer_id=CUSTOMER, requested_at=NOW)
    await handle(sessions, optouts, erased)
    await handle(sessions, optouts, erased)  # a redelivery changes nothing

    sends = {(s.invitation_id, s.kind): s for s in await all_sends(sessions)}
    assert {k: (s.status, s.reason) for k, s in sends.items()} == {
        (sent.invitation_id, "invitation"): ("sent", None),
        (sent.invitation_id, "reminder"): ("cancelled", "cancelled: opted out"),
        (later.invitation_id, "invitation"): ("cancelled", "cancelled: erased"),
    }
    assert {s.customer_id for s in sends.values()} == {customer_hash(SALT, CUSTOMER)}
    assert await tables_holding(sessions, Base.metadata, [CUSTOMER, EMAIL, SECOND]) == {}
    async with sessions() as session:
        rows = (await session.execute(select(OptOut))).scalars().all()
        assert [(o.channel, o.contact, o.customer_id) for o in rows] == [
            ("email", contact_hash(SALT, "email", EMAIL), None)
        ]
        # The checks at the moment of sending match a plain contact point by its hash.
        keys = [("email", EMAIL.upper().lower()), ("email", "someone@example.com")]
        assert await repository.opted_out(session, keys, SALT) == {("email", EMAIL)}
        assert await repository.opted_out(session, keys) == set()


async def test_a_send_scheduled_after_the_erasure_is_erased_by_its_cancellation(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The trigger's cancellation (reason ``erased``) follows its request on the invitations
    topic, so an invitation that reached the dispatcher after the erasure is erased too."""
    invitations = InvitationHandler(SALT, clock=lambda: NOW)
    await handle(
        sessions,
        OptOutHandler(SALT, clock=lambda: NOW),
        CustomerErased(erasure_id=uuid.uuid4(), customer_id=CUSTOMER, requested_at=NOW),
    )
    late = email_invitation(CUSTOMER, send_at=NOW + timedelta(hours=1))
    cancel = InvitationCancelled(
        invitation_id=late.invitation_id,
        customer_id=CUSTOMER,
        survey_id=late.survey_id,
        reason="erased",
        cancelled_at=NOW,
    )
    await handle(sessions, invitations, late, cancel)
    [send] = await all_sends(sessions)
    assert (send.status, send.contact, send.reason) == ("cancelled", None, "cancelled: erased")
    assert await tables_holding(sessions, Base.metadata, [CUSTOMER, EMAIL]) == {}
