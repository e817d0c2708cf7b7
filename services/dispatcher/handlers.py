"""The dispatcher's consumers: invitations in (scheduled sends, idempotent on id), answers in
(a pending reminder is no longer needed), opt-outs in (pending sends to that contact point are
cancelled, and the contact point is checked again at the moment of every send)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.erasure import DEV_ERASURE_SALT, customer_hash
from services.common.events import (
    CustomerErased,
    InvitationCancelled,
    InvitationRequested,
    OptOutRecorded,
    ResponseSubmitted,
    utcnow,
)
from services.common.kafka import HandlerResult, Incoming
from services.dispatcher import repository
from services.dispatcher.models import Send

log = logging.getLogger(__name__)


def contact_of(invitation: InvitationRequested) -> str | None:
    """The contact point an invitation goes to on its channel."""
    customer = invitation.customer
    if invitation.channel == "sms":
        return customer.phone
    return customer.email.lower() if customer.email else None


def send_row(inv: InvitationRequested, now: datetime) -> dict[str, Any]:
    """The pending send of an invitation."""
    return {
        "invitation_id": inv.invitation_id,
        "kind": "invitation",
        "customer_id": inv.customer.id,
        "survey_id": inv.survey_id,
        "channel": inv.channel,
        "contact": contact_of(inv),
        "invitation": inv.model_dump(mode="json"),
        "status": "pending",
        "send_at": inv.send_at,
        "attempts": 0,
        "created_at": now,
    }


def provider_optout(
    channel: str, contact: str, send: Send | None, reason: str, now: datetime
) -> dict[str, Any]:
    """An opt-out the dispatcher itself learnt of (a STOP reply, a bounce, a provider refusing
    the contact point). It is published to ``kaiku.optouts`` unless no send tells whose it is."""
    return {
        "channel": channel,
        "contact": contact,
        "customer_id": send.customer_id if send else None,
        "invitation_id": send.invitation_id if send else None,
        "survey_id": send.survey_id if send else None,
        "source": "provider",
        "reason": reason,
        "optout_id": uuid.uuid4(),
        "created_at": now,
        "published_at": None if send else now,
    }


@dataclass
class InvitationHandler:
    salt: SecretStr = field(default_factory=lambda: SecretStr(DEV_ERASURE_SALT))
    clock: Callable[[], datetime] = utcnow

    async def __call__(
        self,
        batch: list[Incoming[InvitationRequested | InvitationCancelled]],
        session: AsyncSession,
    ) -> HandlerResult:
        now = self.clock()
        rows = {}
        cancels: dict[str, list[uuid.UUID]] = {}
        erased: dict[str, list[uuid.UUID]] = {}
        for item in batch:
            inv = item.message
            if isinstance(inv, InvitationCancelled):
                cancels.setdefault(inv.reason, []).append(inv.invitation_id)
                if inv.reason == "erased":
                    erased.setdefault(inv.customer_id, []).append(inv.invitation_id)
                continue
            rows[inv.invitation_id] = send_row(inv, now)
        await repository.schedule(session, list(rows.values()))
        # A cancellation follows its request on the same partition: apply it after the inserts.
        for reason, ids in cancels.items():
            await repository.cancel(session, ids, reason=reason, now=now)
        for customer, ids in erased.items():  # scheduled after the customer's erasure here
            await repository.erase_sends(
                session,
                await repository.sends_of(session, ids),
                customer_hash(self.salt, customer),
                now,
            )
        return HandlerResult()


@dataclass
class ResponseHandler:
    """An answer makes the invitation's reminder unnecessary."""

    clock: Callable[[], datetime] = utcnow

    async def __call__(
        self, batch: list[Incoming[ResponseSubmitted]], session: AsyncSession
    ) -> HandlerResult:
        ids = {item.message.invitation_id for item in batch}
        await repository.cancel(
            session, ids, reason="answered", now=self.clock(), kinds=("reminder",)
        )
        return HandlerResult()


@dataclass
class OptOutHandler:
    """Opt-outs from the unsubscribe page (and from the other services): the contact point is
    resolved from the invitation's send, else the whole customer is opted out on the channel.
    Erasures: the customer's pending sends and reminders are cancelled and every trace of them
    erased, their opt-outs kept as salted hashes (after the batch's opt-outs are recorded)."""

    salt: SecretStr = field(default_factory=lambda: SecretStr(DEV_ERASURE_SALT))
    clock: Callable[[], datetime] = utcnow

    async def __call__(
        self, batch: list[Incoming[OptOutRecorded | CustomerErased]], session: AsyncSession
    ) -> HandlerResult:
        now = self.clock()
        await self._optouts(
            [Incoming(i.record, i.message) for i in batch if isinstance(i.message, OptOutRecorded)],
            session,
            now,
        )
        for item in batch:
            if isinstance(item.message, CustomerErased):
                n = await repository.erase_customer(
                    session, item.message.customer_id, self.salt, now
                )
                log.info("erasure %s: %d send(s) erased", item.message.erasure_id, n)
        return HandlerResult()

    async def _optouts(
        self, batch: list[Incoming[OptOutRecorded]], session: AsyncSession, now: datetime
    ) -> None:
        ids = [i.message.invitation_id for i in batch if i.message.invitation_id]
        contacts = {
            (s.invitation_id, s.channel): s.contact
            for s in await repository.sends_of(session, ids)
            if s.contact
        }
        rows: list[dict[str, Any]] = []
        for item in batch:
            o = item.message
            contact = contacts.get((o.invitation_id, o.channel)) if o.invitation_id else None
            key = contact or repository.customer_key(o.customer_id)
            rows.append(
                {
                    "channel": o.channel,
                    "contact": key,
                    "customer_id": o.customer_id,
                    "invitation_id": o.invitation_id,
                    "survey_id": o.survey_id,
                    "source": o.source,
                    "reason": o.reason,
                    "optout_id": o.optout_id,
                    "created_at": now,
                    "published_at": now,  # it came from the topic: nothing to publish
                }
            )
        await repository.suppress(session, rows, reason="opted out", now=now)
