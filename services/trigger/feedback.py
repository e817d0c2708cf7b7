"""What comes back to the trigger: deliveries, answers and opt-outs, for fatigue clocks
(``delivered``, ``responded``), failed sends (which do not count), the cool-down after an unhappy
answer, and opt-outs (suppression). Each handler is idempotent: it only fills what is empty, or
adds an opt-out that changes nothing when repeated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.common.events import DeliveryRecorded, OptOutRecorded, ResponseSubmitted, utcnow
from services.common.kafka import HandlerResult, Incoming
from services.common.program import Program
from services.trigger import repository


async def on_deliveries(
    batch: list[Incoming[DeliveryRecorded]], session: AsyncSession
) -> HandlerResult:
    rows = []
    for item in batch:
        d = item.message
        if d.kind != "invitation":
            continue
        if d.status in ("sent", "delivered"):
            rows.append({"b_id": d.invitation_id, "delivered_at": d.occurred_at})
        elif d.status in ("failed", "bounced"):
            rows.append({"b_id": d.invitation_id, "failed_at": d.occurred_at})
    await repository.record_outcomes(session, rows)
    return HandlerResult()


@dataclass
class ResponseHandler:
    program: Program
    clock: Callable[[], datetime] = utcnow

    async def __call__(
        self, batch: list[Incoming[ResponseSubmitted]], session: AsyncSession
    ) -> HandlerResult:
        limits = self.program.suppression.detractor_max
        answered = []
        unhappy: dict[str, datetime] = {}
        for item in batch:
            r = item.message
            answered.append({"b_id": r.invitation_id, "responded_at": r.submitted_at})
            if r.score is not None and r.score <= limits.get(r.metric, -1):
                unhappy[r.customer_id] = max(
                    unhappy.get(r.customer_id, r.submitted_at), r.submitted_at
                )
        await repository.record_outcomes(session, answered)
        now = self.clock()
        await repository.mark_unhappy(
            session,
            [
                {"customer_id": c, "last_unhappy_at": at, "updated_at": now}
                for c, at in unhappy.items()
            ],
        )
        return HandlerResult()


@dataclass
class OptOutHandler:
    clock: Callable[[], datetime] = utcnow

    async def __call__(
        self, batch: list[Incoming[OptOutRecorded]], session: AsyncSession
    ) -> HandlerResult:
        ids = [i.message.invitation_id for i in batch if i.message.invitation_id]
        contacts = await repository.contacts_of(session, ids)
        now = self.clock()
        rows = []
        for item in batch:
            o = item.message
            known = contacts.get(o.invitation_id) if o.invitation_id else None
            contact = known[0] if known else None
            rows.append(
                {
                    "customer_id": o.customer_id,
                    "contact": contact,
                    "channel": o.channel,
                    "source": o.source,
                    "created_at": now,
                }
            )
        await repository.add_optouts(session, rows)
        return HandlerResult()
