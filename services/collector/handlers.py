"""The collector's consumer: keeps what the survey page and the scores need of each invitation."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession

from services.collector import repository
from services.collector.config import local_day
from services.common.events import (
    DeliveryRecorded,
    InvitationCancelled,
    InvitationRequested,
    utcnow,
)
from services.common.kafka import HandlerResult, Incoming


@dataclass
class InvitationHandler:
    clock: Callable[[], datetime] = utcnow

    async def __call__(
        self,
        batch: list[Incoming[InvitationRequested | InvitationCancelled]],
        session: AsyncSession,
    ) -> HandlerResult:
        now = self.clock()
        rows = {}
        cancelled = []
        erased: list[uuid.UUID] = []
        for item in batch:
            inv = item.message
            if isinstance(inv, InvitationCancelled):
                cancelled.append(inv.invitation_id)
                if inv.reason == "erased":  # stored after the customer's erasure here
                    erased.append(inv.invitation_id)
                continue
            rows[inv.invitation_id] = {
                "invitation_id": inv.invitation_id,
                "token": inv.token,
                "survey_id": inv.survey_id,
                "metric": inv.metric,
                "customer_id": inv.customer.id,
                "locale": inv.locale,
                "survey_channel": inv.channel,
                "expires_at": inv.expires_at,
                "created_at": now,
                **{f: getattr(inv.context, f) for f in repository.CONTEXT_FIELDS},
            }
        await repository.store_invitations(session, list(rows.values()))
        await repository.cancel_invitations(session, cancelled, now)
        await repository.erase_invitations(session, erased, now)
        return HandlerResult()


@dataclass
class DeliveryHandler:
    """Counts each invitation once, at its first "sent" or "delivered" report (reminders and
    failures are not deliveries): the denominator of the response rate, per day and segment."""

    zone: ZoneInfo

    async def __call__(
        self, batch: list[Incoming[DeliveryRecorded]], session: AsyncSession
    ) -> HandlerResult:
        first: dict[uuid.UUID, tuple[datetime, date]] = {}
        for item in batch:
            d = item.message
            if d.kind != "invitation" or d.status not in ("sent", "delivered"):
                continue
            if d.invitation_id not in first or d.occurred_at < first[d.invitation_id][0]:
                first[d.invitation_id] = (d.occurred_at, local_day(d.occurred_at, self.zone))
        await repository.mark_delivered(session, first)
        return HandlerResult()
