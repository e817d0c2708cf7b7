"""What comes back to the trigger: deliveries, answers and opt-outs, for fatigue clocks
(``delivered``, ``responded``), failed sends (which do not count), the cool-down after an unhappy
answer, opt-outs (suppression) and erasures (``CustomerErased``). Each handler is idempotent: it
only fills what is empty, or adds an opt-out that changes nothing when repeated, or erases what
is already erased."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from services.common import events
from services.common.erasure import DEV_ERASURE_SALT, customer_hash
from services.common.events import (
    CustomerErased,
    DeliveryRecorded,
    InvitationCancelled,
    OptOutRecorded,
    ResponseSubmitted,
    utcnow,
)
from services.common.kafka import HandlerResult, Incoming, Outgoing
from services.common.program import Program
from services.trigger import repository

log = logging.getLogger(__name__)


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
    """Opt-outs (suppression) and erasures from ``kaiku.optouts``. The opt-outs of a batch are
    recorded before its erasures, so an opt-out followed by its customer's erasure is kept, as
    salted hashes."""

    salt: SecretStr = field(default_factory=lambda: SecretStr(DEV_ERASURE_SALT))
    clock: Callable[[], datetime] = utcnow

    async def __call__(
        self, batch: list[Incoming[OptOutRecorded | CustomerErased]], session: AsyncSession
    ) -> HandlerResult:
        optouts = [
            Incoming(i.record, i.message) for i in batch if isinstance(i.message, OptOutRecorded)
        ]
        await self._optouts(optouts, session)
        publish: list[Outgoing] = []
        for item in batch:
            if isinstance(item.message, CustomerErased):
                publish.extend(await self._erase(item.message, session))
        return HandlerResult(publish=publish)

    async def _erase(self, erased: CustomerErased, session: AsyncSession) -> list[Outgoing]:
        """Erase the customer, and cancel their invitations not yet sent (again on a
        redelivery: cancelling twice changes nothing downstream)."""
        now = self.clock()
        customer = erased.customer_id
        pending = await repository.erase_customer(
            session, customer, customer_hash(self.salt, customer), self.salt, now
        )
        log.info("erasure %s: %d pending invitation(s) cancelled", erased.erasure_id, len(pending))
        return [
            Outgoing(
                events.INVITATIONS,
                customer,
                InvitationCancelled(
                    invitation_id=p.invitation_id,
                    customer_id=customer,
                    survey_id=p.survey_id,
                    reason="erased",
                    cancelled_at=now,
                ),
            )
            for p in pending
        ]

    async def _optouts(self, batch: list[Incoming[OptOutRecorded]], session: AsyncSession) -> None:
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
