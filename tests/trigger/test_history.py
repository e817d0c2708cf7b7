"""The history the trigger reads for fatigue reaches as far back as its rules need: a survey sent
before a rule's window but answered (or delivered) inside it still counts, and cancelled
invitations count for nothing. The handler on PostgreSQL and SQLite, with a clock moved by hand."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.db import unit_of_work
from services.common.events import CloudEvent, InvitationRequested, ResponseSubmitted
from services.common.kafka import Incoming
from services.common.program import parse_program
from services.common.tokens import LinkKeys
from services.trigger import repository
from services.trigger.feedback import ResponseHandler
from services.trigger.handlers import EventHandler

START = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
# One survey a month per customer, counted from the answer; links live 14 days.
PROGRAM = parse_program(
    """
version: 1
surveys:
  - {id: nps, metric: nps, question: {en: "Q?"}, link_expiry: 14d}
triggers:
  - {id: delivered, event: order.delivered, survey: nps}
fatigue:
  rules:
    - {id: answered-monthly, key: customer, scope: global, channel: any, clock: responded,
       window: 30d, limit: 1, action: drop}
"""
)


def delivered(customer: str, at: datetime) -> CloudEvent:
    return CloudEvent.model_validate(
        {
            "specversion": "1.0",
            "id": f"e-{uuid.uuid4().hex[:8]}",
            "source": "test://history",
            "type": "order.delivered",
            "time": at.isoformat(),
            "data": {"customer": {"id": customer, "email": f"{customer}@example.com"}},
        }
    )


async def handle(sessions: async_sessionmaker[AsyncSession], handler: Any, message: Any) -> Any:
    async with unit_of_work(sessions) as session:
        return await handler([Incoming(None, message)], session)


@pytest.mark.parametrize(
    ("answered_after", "asked_after", "decision"),
    [
        # Sent on day 0, answered on day 13 (the link's last day): on day 35 the answer is 22
        # days old, inside the 30-day window, though the survey was sent 35 days before.
        (timedelta(days=13), timedelta(days=35), "skipped"),
        # The same answer on day 44 is 31 days old: the window has passed.
        (timedelta(days=13), timedelta(days=44), "invited"),
    ],
)
async def test_an_answer_inside_the_window_counts_though_the_survey_was_sent_before_it(
    sessions: async_sessionmaker[AsyncSession],
    answered_after: timedelta,
    asked_after: timedelta,
    decision: str,
) -> None:
    now = [START]
    events = EventHandler(PROGRAM, LinkKeys.parse("k:history-test-key"), clock=lambda: now[0])
    answers = ResponseHandler(PROGRAM, clock=lambda: now[0])

    [invitation] = [
        o.value for o in (await handle(sessions, events, delivered("c1", START))).publish
    ]
    assert isinstance(invitation, InvitationRequested)
    now[0] = START + answered_after
    answer = ResponseSubmitted(
        response_id=uuid.uuid4(),
        invitation_id=invitation.invitation_id,
        survey_id="nps",
        customer_id="c1",
        metric="nps",
        score=9,
        locale="en",
        submitted_at=now[0],
    )
    await handle(sessions, answers, answer)

    now[0] = START + asked_after
    result = await handle(sessions, events, delivered("c1", now[0]))
    published = [o.value for o in result.publish]
    async with sessions() as session:
        [last] = await repository.decisions_for(session, "c1", limit=1, before=None)
    if decision == "skipped":
        assert published == []
        assert (last.decision, last.reason) == ("skipped", "fatigue:answered-monthly")
        assert last.next_eligible_at == START + answered_after + timedelta(days=30)
    else:
        assert [type(p) for p in published] == [InvitationRequested]
        assert last.decision == "invited"
