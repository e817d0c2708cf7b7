"""The dispatcher's consumer: invitations in, scheduled sends stored (idempotent on id)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.common.events import InvitationCancelled, InvitationRequested, utcnow
from services.common.kafka import HandlerResult, Incoming
from services.dispatcher import repository


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
        cancels: dict[str, list[uuid.UUID]] = {}
        for item in batch:
            inv = item.message
            if isinstance(inv, InvitationCancelled):
                cancels.setdefault(inv.reason, []).append(inv.invitation_id)
                continue
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
        # A cancellation follows its request on the same partition: apply it after the inserts.
        for reason, ids in cancels.items():
            await repository.cancel(session, ids, reason=reason, now=now)
        return HandlerResult()
