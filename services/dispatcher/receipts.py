"""``POST /v1/provider-events/{provider}``: delivery receipts, bounces, spam reports and STOP
replies from the providers, verified as each provider documents it.

Each receipt is matched to the message it is about (by the invitation id the provider echoes,
else by the provider's message id from the send, else — an inbound STOP — by the phone number of
the latest SMS sent to it), stored idempotently on the provider's event id (providers retry) and
answered. The outbox relay then publishes it on ``kaiku.deliveries``; hard bounces, spam reports
and STOP also become opt-outs: the contact point is suppressed here at once, its pending sends
are cancelled, and the opt-out is published on ``kaiku.optouts``. Storing before answering means
a receipt is never lost while the broker is away, and a provider's retry is harmless.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.db import unit_of_work
from services.common.events import utcnow
from services.common.http import ApiError, error_responses
from services.common.webhooks import WebhookError, receive, unauthorized
from services.dispatcher import repository
from services.dispatcher.channels import Receipt, ReceiptSource
from services.dispatcher.handlers import provider_optout
from services.dispatcher.models import Send

log = logging.getLogger(__name__)

RECEIPTS = Counter(
    "kaiku_provider_events_total",
    "Provider events (delivery receipts, bounces, STOP) by provider and status",
    ["provider", "status"],
)
REFUSED = Counter(
    "kaiku_provider_events_refused_total", "Refused provider event requests", ["provider", "code"]
)

RESPONSES = error_responses(
    {
        400: "Malformed payload",
        401: "Missing, forged or stale signature",
        404: "Unknown or unconfigured provider",
        413: "Body too large",
        415: "Not the content type the provider sends",
    }
)


async def _match(
    session: AsyncSession, provider: str, receipts: list[Receipt]
) -> list[Send | None]:
    """The send each receipt is about, or None."""
    ids = set()
    for r in receipts:
        if r.invitation_id:
            try:
                ids.add(uuid.UUID(r.invitation_id))
            except ValueError:
                pass
    by_invitation: dict[tuple[uuid.UUID, str], Send] = {
        (s.invitation_id, s.kind): s for s in await repository.sends_of(session, ids)
    }
    message_ids = [r.provider_message_id for r in receipts if r.provider_message_id]
    by_message = {
        s.provider_message_id: s
        for s in await repository.sends_by_provider_id(session, provider, message_ids)
    }
    found: list[Send | None] = []
    for r in receipts:
        send = by_message.get(r.provider_message_id) if r.provider_message_id else None
        if send is None and r.invitation_id:
            try:
                key = uuid.UUID(r.invitation_id)
            except ValueError:
                key = None
            if key is not None:
                send = by_invitation.get((key, "invitation")) or by_invitation.get(
                    (key, "reminder")
                )
        if send is None and r.contact:
            send = await repository.last_send_to(session, "sms", r.contact)
        found.append(send)
    return found


def _row(
    provider: str, r: Receipt, send: Send | None, channel: str, now: datetime
) -> dict[str, Any]:
    return {
        "provider": provider,
        "event_id": r.event_id[:300],
        "invitation_id": send.invitation_id if send else None,
        "kind": send.kind if send else "invitation",
        "customer_id": send.customer_id if send else None,
        "survey_id": send.survey_id if send else None,
        "channel": send.channel if send else channel,
        "status": r.status,
        "reason": r.reason,
        "provider_message_id": r.provider_message_id,
        "occurred_at": r.occurred_at or now,
        "received_at": now,
        # Nothing to publish about a message kaiku cannot find.
        "published_at": None if send else now,
    }


async def record(
    session: AsyncSession,
    provider: str,
    channel: str,
    receipts: list[Receipt],
    now: datetime,
) -> int:
    """Store receipts and the opt-outs they imply; returns how many were new."""
    sends = await _match(session, provider, receipts)
    rows = [_row(provider, r, s, channel, now) for r, s in zip(receipts, sends, strict=True)]
    new = set(await repository.add_receipts(session, rows))
    optouts = []
    for r, send in zip(receipts, sends, strict=True):
        contact = (send.contact if send else None) or r.contact
        if r.event_id[:300] in new and r.suppress is not None and contact is not None:
            on = send.channel if send else channel
            optouts.append(provider_optout(on, contact, send, r.suppress, now))
    await repository.suppress(session, optouts, reason="opted out through the provider", now=now)
    return len(new)


def router(
    sources: Mapping[str, tuple[ReceiptSource, str]],
    sessions: async_sessionmaker[AsyncSession],
    max_body: int,
    public_url: str | None,
    on_stored: Callable[[], None] = lambda: None,
    clock: Callable[[], datetime] = utcnow,
) -> APIRouter:
    """``sources``: provider name → (its receipt source, its channel: email or sms)."""
    api = APIRouter()

    @api.post(
        "/v1/provider-events/{provider}",
        responses=RESPONSES,
        summary="Delivery receipts, bounces, spam reports and STOP replies from a provider "
        "(sendgrid, mailgun, twilio, 46elks)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {}},
                    "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
                },
            }
        },
    )
    async def provider_event(provider: str, request: Request) -> Response:
        configured = sources.get(provider)
        if configured is None:
            raise ApiError(
                404, "unknown_provider", f"no provider {provider!r} is configured", "provider"
            )
        source, channel = configured
        try:
            incoming = await receive(
                request,
                sender=provider,
                content_types=source.CONTENT_TYPES,
                max_body=max_body,
                public_url=public_url,
                now=clock(),
            )
        except ApiError as exc:
            REFUSED.labels(provider=provider, code=exc.code).inc()
            raise

        def refused(exc: WebhookError) -> ApiError:
            REFUSED.labels(provider=provider, code=exc.code).inc()
            log.warning("provider event from %s refused: %s", provider, exc.message)
            return ApiError(exc.status, exc.code, exc.message)

        try:
            source.verify(incoming)
            receipts = source.receipts(incoming)
            one_use = source.replay_token(incoming)
        except WebhookError as exc:
            raise refused(exc) from None
        new = 0
        if receipts or one_use is not None:
            now = clock()
            # The token and the receipts in one transaction: a request that fails stores
            # neither, and the provider's retry is taken.
            async with unit_of_work(sessions) as session:
                if one_use is not None:
                    token, keep_seconds = one_use
                    digest = hashlib.sha256(incoming.body).hexdigest()
                    if not await repository.token_fits(
                        session, provider, token, digest, keep_seconds, now=now
                    ):
                        raise refused(
                            unauthorized(
                                "this signature's token was used before with another body: a replay"
                            )
                        )
                if receipts:
                    new = await record(session, provider, channel, receipts, now)
            if receipts:
                on_stored()
        for r in receipts:
            RECEIPTS.labels(provider=provider, status=r.status).inc()
        log.info("provider events from %s: %d received, %d new", provider, len(receipts), new)
        custom = source.acknowledge()
        if custom is not None:
            return custom
        return JSONResponse({"received": len(receipts), "new": new})

    return api
