"""Erasure in the collector, on PostgreSQL and SQLite: the answer keeps its score (and the score
cells do not move) without identity, comment, case or follow-up note; the invitation's link no
longer resolves; its hits are gone; the opt-out keeps the customer as a salted hash; and the
relay publishes ``CustomerErased`` on ``kaiku.optouts`` after the customer's opt-out."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import repository
from services.collector.erasure import erase
from services.collector.models import Base, Erasure, Invitation, OptOut, Response, ScoreCell
from services.collector.outbox import ResponseRelay
from services.common import events
from services.common.db import unit_of_work
from services.common.erasure import customer_hash
from services.common.events import OPTOUT_MESSAGE, CustomerErased, OptOutRecorded
from services.common.kafka import Outgoing
from tests.pii import tables_holding

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
SALT = SecretStr("test-salt")
CUSTOMER = "zz-erasure-customer"
COMMENT = "zz secret comment about my neighbour"


class Captured:
    """Stands in for the producer: keeps what the relay publishes."""

    def __init__(self) -> None:
        self.messages: list[Outgoing] = []

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        self.messages.extend(messages)


async def cells(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[object, ...]]:
    async with sessions() as session:
        rows = (await session.execute(select(ScoreCell))).scalars().all()
    return sorted((c.survey_id, c.day, c.team, c.score, c.suspected_bot, c.n) for c in rows)


async def test_erasure_scrubs_the_collector_and_publishes_the_event(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    invitation_id = uuid.uuid4()
    async with unit_of_work(sessions) as session:
        await repository.store_invitations(
            session,
            [
                {
                    "invitation_id": invitation_id,
                    "token": "zz-token-0123456789",
                    "survey_id": "relationship-nps",
                    "metric": "nps",
                    "customer_id": CUSTOMER,
                    "locale": "fi",
                    "survey_channel": "email",
                    "expires_at": NOW + timedelta(days=14),
                    "created_at": NOW,
                    "team": "billing",
                    "case_id": "case-zz-secret",
                }
            ],
        )
        invitation = await repository.invitation_by_token(session, "zz-token-0123456789")
        assert invitation is not None
        await repository.add_hit(
            session, invitation_id, "open", None, NOW, keep=timedelta(minutes=1)
        )
        response = await repository.save_response(
            session, invitation, score=3, comment=COMMENT, now=NOW, day=date(2026, 11, 20)
        )
        response.followup_note = f"called {CUSTOMER}"
        await repository.record_optout(session, invitation, source="one_click", now=NOW)
    before = await cells(sessions)
    assert before == [("relationship-nps", date(2026, 11, 20), "billing", 3, False, 1)]

    async with unit_of_work(sessions) as session:
        erasure_id = await erase(session, CUSTOMER, SALT, NOW)
    async with unit_of_work(sessions) as session:  # a second request is harmless
        second = await erase(session, CUSTOMER, SALT, NOW)
    assert second != erasure_id

    assert await cells(sessions) == before
    async with sessions() as session:
        [answer] = (await session.execute(select(Response))).scalars().all()
        assert (answer.score, answer.survey_id, answer.team, answer.day, answer.revision) == (
            3,
            "relationship-nps",
            "billing",
            date(2026, 11, 20),
            1,
        )
        assert (answer.customer_id, answer.comment, answer.case_id, answer.followup_note) == (
            None,
            None,
            None,
            None,
        )
        assert answer.erased_at is not None
        [inv] = (await session.execute(select(Invitation))).scalars().all()
        assert (inv.customer_id, inv.case_id, inv.erased_at is not None) == (None, None, True)
        [optout] = (await session.execute(select(OptOut))).scalars().all()
        assert optout.customer_id == customer_hash(SALT, CUSTOMER)
        assert await repository.recent_hits(session, invitation_id, NOW - timedelta(days=1)) == []
    # Until the event is published, the outbox row needs the id: nothing else holds it.
    held = await tables_holding(sessions, Base.metadata, [CUSTOMER, COMMENT, "case-zz-secret"])
    assert held == {"collector_erasures": [f"customer_id={CUSTOMER}"] * 2}

    captured = Captured()
    relay = ResponseRelay(sessions, captured, clock=lambda: NOW)  # type: ignore[arg-type]
    assert await relay.publish() == 2
    published = [
        (m.topic, m.key, OPTOUT_MESSAGE.validate_json(m.encode()))
        for m in captured.messages
        if m.topic == events.OPTOUTS
    ]
    # The opt-out (recorded before the erasure, published with it) goes out under the customer
    # id, ahead of the erasures, on the customer's partition.
    assert [(t, k, type(m)) for t, k, m in published] == [
        (events.OPTOUTS, CUSTOMER, OptOutRecorded),
        (events.OPTOUTS, CUSTOMER, CustomerErased),
        (events.OPTOUTS, CUSTOMER, CustomerErased),
    ]
    assert published[0][2].customer_id == CUSTOMER
    assert {m.erasure_id for _, _, m in published[1:]} == {erasure_id, second}  # type: ignore[union-attr]
    assert not any(m.topic == events.RESPONSES for m in captured.messages)  # the answer stays
    assert await relay.publish() == 0
    assert await tables_holding(sessions, Base.metadata, [CUSTOMER, COMMENT]) == {}
    async with sessions() as session:
        rows = (await session.execute(select(Erasure))).scalars().all()
    assert {(e.customer_hash, e.customer_id) for e in rows} == {
        (customer_hash(SALT, CUSTOMER), None)
    }
    assert json.loads(captured.messages[-1].encode())["type"] == "customer.erased"
