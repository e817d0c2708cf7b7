"""Publishes stored answers to ``kaiku.responses``, and opt-outs and erasures to ``kaiku.optouts``
(the outbox relay).

The survey page commits the answer and wakes this relay; the relay publishes every answer whose
``published_at`` is empty and then marks it, so an answer stored while the broker was away goes out
when it is back, and nothing is lost between the database and Kafka. Each round it also sweeps
what nobody will read again: delivery reports whose invitation has arrived since, and link hits
older than the burst window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import repository
from services.collector.models import Erasure, OptOut, Response
from services.common import events
from services.common.db import unit_of_work
from services.common.events import (
    CustomerErased,
    OptOutRecorded,
    ResponseSubmitted,
    SurveyContext,
    utcnow,
)
from services.common.kafka import Outgoing, Producer, is_transient
from services.common.runtime import Worker

log = logging.getLogger(__name__)


def response_message(r: Response) -> Outgoing:
    message = ResponseSubmitted(
        response_id=r.response_id,
        invitation_id=r.invitation_id,
        survey_id=r.survey_id,
        customer_id=r.customer_id or str(r.invitation_id),  # never erased: see the query
        metric=r.metric,
        score=r.score,
        comment=r.comment,
        locale=r.locale,
        revision=r.revision,
        submitted_at=r.submitted_at,
        context=SurveyContext(
            touchpoint=r.touchpoint,
            channel=r.channel,
            team=r.team,
            agent=r.agent,
            case_id=r.case_id,
            account_id=r.account_id,
        ),
    )
    return Outgoing(events.RESPONSES, message.customer_id, message)


def optout_message(o: OptOut, erased: Mapping[str, str] | None = None) -> Outgoing:
    """``erased``: customer hashes → ids of erasures not yet published. An opt-out recorded
    before its customer's erasure and published with it goes out under the customer id, on
    the customer's partition ahead of the ``CustomerErased`` event."""
    customer_id = (erased or {}).get(o.customer_id, o.customer_id)
    message = OptOutRecorded(
        optout_id=o.optout_id,
        customer_id=customer_id,
        channel="sms" if o.channel == "sms" else "email",
        invitation_id=o.invitation_id,
        survey_id=o.survey_id,
        source="one_click" if o.source == "one_click" else "unsubscribe_page",
        occurred_at=o.created_at,
    )
    return Outgoing(events.OPTOUTS, customer_id, message)


def erasure_message(e: Erasure) -> Outgoing:
    assert e.customer_id is not None  # kept until published
    message = CustomerErased(
        erasure_id=e.erasure_id, customer_id=e.customer_id, requested_at=e.requested_at
    )
    return Outgoing(events.OPTOUTS, e.customer_id, message)


class ResponseRelay(Worker):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        producer: Producer,
        poll_seconds: float = 2.0,
        clock: Callable[[], datetime] = utcnow,
        keep_hits: timedelta = timedelta(seconds=60),
    ) -> None:
        super().__init__(poll_seconds)
        self.sessions = sessions
        self.producer = producer
        self.clock = clock
        self.keep_hits = keep_hits

    async def run(self) -> None:
        while True:
            try:
                while await self.publish() == 500:
                    pass
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("response relay: transient error (%s)", type(exc).__name__)
            if self.stopping:
                return
            await self.idle()

    async def publish(self, limit: int = 500) -> int:
        """Publish one batch of each kind; returns the larger count (``limit`` means: more)."""
        async with unit_of_work(self.sessions) as session:
            await repository.sweep_early_deliveries(session)
            await repository.sweep_hits(session, self.clock() - self.keep_hits)
            rows = await repository.unpublished_responses(session, limit)
            optouts = await repository.unpublished_optouts(session, limit)
            erasures = await repository.unpublished_erasures(session, limit)
            if not rows and not optouts and not erasures:
                return 0
            erased = {e.customer_hash: e.customer_id for e in erasures if e.customer_id}
            # A suspected bot's answer stays in the collector: it must not cancel the person's
            # reminder or start a detractor cool-down downstream.
            await self.producer.publish(
                [response_message(r) for r in rows if not r.suspected_bot]
                + [optout_message(o, erased) for o in optouts]
                + [erasure_message(e) for e in erasures]
            )
            now = self.clock()
            await repository.mark_responses_published(
                session, [(r.response_id, r.revision) for r in rows], now
            )
            await repository.mark_optouts_published(
                session, [o.invitation_id for o in optouts], now
            )
            await repository.mark_erasures_published(session, [e.erasure_id for e in erasures], now)
        return max(len(rows), len(optouts), len(erasures))
