"""The dispatcher's consumer: invitations in, scheduled sends stored (idempotent on id)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.common.events import InvitationRequested, utcnow
from services.common.kafka import HandlerResult, Incoming
from services.dispatcher import repository


@dataclass
class InvitationHandler:
    clock: Callable[[], datetime] = utcnow

    async def __call__(
        self, batch: list[Incoming[InvitationRequested]], session: AsyncSession
    ) -> HandlerResult:
        now = self.clock()
        rows = {}
        for item in batch:
            inv = item.message
            rows[inv.invitation_id] = {
                "invitation_id": inv.invitation_id,
                "customer_id": inv.customer.id,
                "survey_id": inv.survey_id,
                "channel": inv.channel,
                "invitation": inv.model_dump(mode="json"),
                "status": "pending",
                "send_at": inv.send_at,
                "attempts": 0,
                "created_at": now,
            }
        await repository.schedule(session, list(rows.values()))
        return HandlerResult()
