"""The collector's consumer: keeps what the survey page and the scores need of each invitation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.collector import repository
from services.common.events import InvitationCancelled, InvitationRequested, utcnow
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
        for item in batch:
            inv = item.message
            if isinstance(inv, InvitationCancelled):
                cancelled.append(inv.invitation_id)
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
        return HandlerResult()
