"""Sends due invitations: claims them in batches, sends, records the outcome, publishes deliveries.

A send goes pending → sending (committed before the provider is called) → sent | failed. A crash
between the two commits leaves it in ``sending``; it is then marked ``in_doubt`` and never retried
blindly, because a survey sent twice annoys more than one not sent. Transient provider errors put
the send back to pending with exponential back-off and jitter, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common import events
from services.common.db import unit_of_work
from services.common.events import DeliveryRecorded, InvitationRequested, utcnow
from services.common.faults import failpoint
from services.common.kafka import Outgoing, Producer, is_transient
from services.common.logging import bound
from services.common.program import Program
from services.common.runtime import Worker
from services.dispatcher import repository
from services.dispatcher.channels import EmailChannel, OutboundEmail, SendResult
from services.dispatcher.config import DispatcherSettings
from services.dispatcher.models import Send
from services.dispatcher.rendering import Renderer, build_message

log = logging.getLogger(__name__)

SENT = Counter("kaiku_invitations_sent_total", "Invitations sent", ["channel", "provider"])
FAILED = Counter(
    "kaiku_invitations_failed_total", "Invitations that failed for good", ["channel", "provider"]
)
RETRIED = Counter(
    "kaiku_invitations_retried_total", "Transient send failures retried", ["channel", "provider"]
)
IN_DOUBT = Counter(
    "kaiku_invitations_in_doubt_total",
    "Sends interrupted between start and recorded outcome (never retried)",
)
LATENCY = Gauge("kaiku_last_send_delay_seconds", "Delay between send_at and the actual send")


class Scheduler(Worker):
    def __init__(
        self,
        *,
        settings: DispatcherSettings,
        program: Program,
        renderer: Renderer,
        email: EmailChannel,
        sessions: async_sessionmaker[AsyncSession],
        producer: Producer,
        public_url: str,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(settings.poll_seconds)
        self.settings = settings
        self.program = program
        self.renderer = renderer
        self.email = email
        self.sessions = sessions
        self.producer = producer
        self.public_url = public_url
        self.clock = clock
        self._sem = asyncio.Semaphore(settings.send_concurrency)

    async def run(self) -> None:
        await self.recover()
        while not self.stopping:
            try:
                claimed = await self.round()
                await self.publish_deliveries()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("scheduler: transient error (%s); retrying", type(exc).__name__)
                await asyncio.sleep(self.settings.poll_seconds)
                continue
            if claimed < self.settings.claim_batch:
                await self.idle()

    async def recover(self) -> None:
        now = self.clock()
        async with unit_of_work(self.sessions) as session:
            n = await repository.mark_in_doubt(
                session,
                now=now,
                instance=self.settings.instance_id,
                lease_expired_before=now - timedelta(seconds=self.settings.sending_lease_seconds),
            )
        if n:
            IN_DOUBT.inc(n)
            log.warning("%d send(s) were interrupted by a crash and are now in doubt", n)

    async def round(self) -> int:
        """Claim one batch of due sends, send them, record the outcomes. Returns the batch size."""
        now = self.clock()
        async with unit_of_work(self.sessions) as session:
            claimed = await repository.claim_due(
                session,
                now=now,
                limit=self.settings.claim_batch,
                instance=self.settings.instance_id,
            )
        if not claimed:
            if now.second % 30 == 0:  # cheap periodic sweep for other replicas' abandoned claims
                await self.recover()
            return 0
        failpoint("dispatcher.after_claim")
        outcomes = await asyncio.gather(*(self._send_one(s) for s in claimed))
        failpoint("dispatcher.after_send")
        async with unit_of_work(self.sessions) as session:
            await repository.record_outcomes(session, outcomes)
        return len(claimed)

    async def _send_one(self, send: Send) -> dict[str, Any]:
        invitation = InvitationRequested.model_validate(send.invitation)
        with bound(invitation_id=str(send.invitation_id), customer_id=send.customer_id):
            async with self._sem:
                result = await self._deliver(invitation)
            now = self.clock()
            row: dict[str, Any] = {
                "invitation_id": send.invitation_id,
                "provider": self.email.name,
                "reason": result.reason,
            }
            labels = {"channel": send.channel, "provider": self.email.name}
            if result.outcome == "sent":
                SENT.labels(**labels).inc()
                LATENCY.set((now - send.send_at).total_seconds())
                log.info("invitation sent")
                row.update(
                    status="sent", finished_at=now, provider_message_id=result.provider_message_id
                )
            elif result.outcome == "transient" and send.attempts < self.settings.max_attempts:
                RETRIED.labels(**labels).inc()
                backoff = min(3600.0, 5.0 * 2 ** (send.attempts - 1)) * (0.5 + random.random())
                log.warning(
                    "send failed (%s); retry %d in %.0fs", result.reason, send.attempts, backoff
                )
                row.update(
                    status="pending",
                    send_at=now + timedelta(seconds=backoff),
                    claimed_by=None,
                    claimed_at=None,
                )
            else:
                FAILED.labels(**labels).inc()
                log.warning("send failed for good: %s", result.reason)
                row.update(status="failed", finished_at=now)
            return row

    async def _deliver(self, invitation: InvitationRequested) -> SendResult:
        try:
            survey = self.program.survey(invitation.survey_id)
        except KeyError:
            return SendResult("permanent", reason="the survey is no longer in the program")
        if invitation.channel != "email" or invitation.customer.email is None:
            return SendResult("permanent", reason=f"no provider for channel {invitation.channel}")
        rendered = self.renderer.email(invitation, survey)
        message = build_message(
            rendered,
            invitation=invitation,
            sender=self.settings.email_from,
            public_url=self.public_url,
            unsubscribe_mailto=self.settings.unsubscribe_mailto,
            domain=self.settings.email_domain,
        )
        return await self.email.send(OutboundEmail(str(invitation.invitation_id), message))

    async def publish_deliveries(self, limit: int = 500) -> int:
        """The outbox relay: publish the delivery events not yet on ``kaiku.deliveries``."""
        async with unit_of_work(self.sessions) as session:
            rows = await repository.unpublished(session, limit)
            if not rows:
                return 0
            await self.producer.publish([_delivery(r) for r in rows])
            ids: list[uuid.UUID] = [r.invitation_id for r in rows]
            await repository.mark_published(session, ids, self.clock())
        return len(rows)


def _delivery(send: Send) -> Outgoing:
    message = DeliveryRecorded(
        invitation_id=send.invitation_id,
        survey_id=send.survey_id,
        customer_id=send.customer_id,
        channel="sms" if send.channel == "sms" else "email",
        provider=send.provider or "none",
        status="sent"
        if send.status == "sent"
        else ("in_doubt" if send.status == "in_doubt" else "failed"),
        reason=send.reason,
        provider_message_id=send.provider_message_id,
        attempts=send.attempts,
        occurred_at=send.finished_at or utcnow(),
    )
    return Outgoing(events.DELIVERIES, send.customer_id, message)
