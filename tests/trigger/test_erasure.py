"""Erasure in the trigger, on PostgreSQL and SQLite: a ``CustomerErased`` deletes the customer's
memory, cases and decision ledger, cancels their pending invitations, and leaves their opt-outs
as salted hashes that still suppress the contact point for a new customer id."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.db import unit_of_work
from services.common.erasure import contact_hash, customer_hash
from services.common.events import (
    CloudEvent,
    CustomerErased,
    InvitationCancelled,
    InvitationRequested,
    OptOutRecorded,
)
from services.common.kafka import Incoming, Outgoing
from services.common.program import parse_program
from services.common.tokens import LinkKeys
from services.trigger import repository
from services.trigger.feedback import OptOutHandler
from services.trigger.handlers import EventHandler
from services.trigger.models import Base, Decision, Invitation, OptOut
from tests.pii import tables_holding

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
SALT = SecretStr("test-salt")
CUSTOMER = "zz-erasure-customer"
EMAIL = "Aino.Erasure@Example.fi"
PROGRAM = parse_program(
    """
version: 1
surveys:
  - {id: nps, metric: nps, question: {en: "Q?"}}
  - {id: csat, metric: csat, question: {en: "Q?"}}
triggers:
  - {id: delivered, event: order.delivered, survey: nps}
  - {id: solved, event: ticket.solved, survey: csat, delay: 2h}
suppression:
  open_case: {}
"""
)


def event(kind: str, customer: str = CUSTOMER, email: str = EMAIL) -> CloudEvent:
    return CloudEvent.model_validate(
        {
            "specversion": "1.0",
            "id": f"{kind}-{uuid.uuid4().hex[:8]}",
            "source": "test://erasure",
            "type": kind,
            "time": NOW.isoformat(),
            "data": {
                "customer": {"id": customer, "email": email, "phone": "+358401234567"},
                "case_id": "case-zz-secret",
            },
        }
    )


async def handle(
    sessions: async_sessionmaker[AsyncSession], handler: Any, *messages: Any
) -> list[Outgoing]:
    async with unit_of_work(sessions) as session:
        result = await handler([Incoming(None, m) for m in messages], session)
    return list(result.publish)


async def test_erasure_forgets_the_customer_and_keeps_the_opt_out_hashed(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    events = EventHandler(
        PROGRAM, LinkKeys.parse("k:erasure-test-key"), clock=lambda: NOW, salt=SALT
    )
    optouts = OptOutHandler(SALT, clock=lambda: NOW)
    invited = []
    for kind in ("order.delivered", "ticket.solved"):
        invited += [o.value for o in await handle(sessions, events, event(kind))]
    sent, pending = invited
    assert isinstance(sent, InvitationRequested) and isinstance(pending, InvitationRequested)
    async with unit_of_work(sessions) as session:  # the first one went out
        await repository.record_outcomes(
            session, [{"b_id": sent.invitation_id, "delivered_at": NOW}]
        )
    optout = OptOutRecorded(
        optout_id=uuid.uuid4(),
        customer_id=CUSTOMER,
        channel="email",
        invitation_id=sent.invitation_id,
        source="unsubscribe_page",
        occurred_at=NOW,
    )
    erased = CustomerErased(erasure_id=uuid.uuid4(), customer_id=CUSTOMER, requested_at=NOW)
    # The opt-out and the erasure in one batch: the opt-out is recorded, then hashed.
    published = await handle(sessions, optouts, optout, erased)

    cancels = [o.value for o in published]
    assert [(c.invitation_id, c.reason) for c in cancels if isinstance(c, InvitationCancelled)] == [
        (pending.invitation_id, "erased")
    ]
    assert {o.key for o in published} == {CUSTOMER}  # on the customer's partition
    needles = [CUSTOMER, EMAIL, "+358401234567", "case-zz-secret"]
    assert await tables_holding(sessions, Base.metadata, needles) == {}
    async with sessions() as session:
        rows = (await session.execute(select(OptOut))).scalars().all()
        assert [(o.customer_id, o.contact, o.channel) for o in rows] == [
            (customer_hash(SALT, CUSTOMER), contact_hash(SALT, "email", EMAIL), "email")
        ]
        invitations = (await session.execute(select(Invitation))).scalars().all()
        assert {i.customer_id for i in invitations} == {customer_hash(SALT, CUSTOMER)}
        assert {i.invitation_id for i in invitations if i.cancelled_at} == {pending.invitation_id}
        assert (await session.execute(select(Decision))).scalars().all() == []

    # A redelivered erasure changes nothing and tells the others again.
    again = await handle(sessions, optouts, erased)
    assert [o.value.invitation_id for o in again] == [pending.invitation_id]  # type: ignore[union-attr]

    # A new customer id with the same address (any case) is suppressed by the hashed opt-out,
    # and the ledger says why.
    newcomer = event("order.delivered", customer="zz-newcomer", email=EMAIL.upper())
    assert await handle(sessions, events, newcomer) == []
    async with sessions() as session:
        ledger = await repository.decisions_for(session, "zz-newcomer", limit=5, before=None)
    assert [(d.decision, d.reason) for d in ledger] == [("skipped", "suppressed:opted_out")]
    # Another address of the newcomer is not suppressed.
    other = event("order.delivered", customer="zz-other", email="someone.else@example.fi")
    assert len(await handle(sessions, events, other)) == 1


async def test_an_erased_whole_customer_opt_out_still_suppresses_the_customer_id(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """An opt-out without a known contact point opts out the whole customer; after the erasure
    it is kept under the hash of the id, so the same id coming back stays opted out."""
    optouts = OptOutHandler(SALT, clock=lambda: NOW)
    await handle(
        sessions,
        optouts,
        OptOutRecorded(
            optout_id=uuid.uuid4(),
            customer_id=CUSTOMER,
            channel="email",
            source="unsubscribe_page",
            occurred_at=NOW,
        ),
        CustomerErased(erasure_id=uuid.uuid4(), customer_id=CUSTOMER, requested_at=NOW),
    )
    assert await tables_holding(sessions, Base.metadata, [CUSTOMER]) == {}
    events = EventHandler(
        PROGRAM,
        LinkKeys.parse("k:erasure-test-key"),
        clock=lambda: NOW + timedelta(days=1),
        salt=SALT,
    )
    assert await handle(sessions, events, event("order.delivered")) == []
    async with sessions() as session:
        ledger = await repository.decisions_for(session, CUSTOMER, limit=5, before=None)
    assert [d.reason for d in ledger] == ["suppressed:opted_out"]
    assert json.dumps(ledger[0].detail) == '{"channel": "email"}'
