"""``POST /v1/webhooks/{source}``: the vendors' own webhooks, verified, mapped and put on Kafka."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter

from services.common.events import CloudEvent, utcnow
from services.common.http import ApiError, error_responses
from services.common.kafka import Outgoing, Producer, dead_letter_of
from services.common.program import Program
from services.common.webhooks import receive
from services.trigger.api import event_message, publish_or_unavailable
from services.trigger.ingress import Vendor, WebhookError
from services.trigger.ingress.mapping import Ignored, Unmappable, to_event

log = logging.getLogger(__name__)

WEBHOOKS = Counter(
    "kaiku_webhooks_total", "Webhook requests by source and outcome", ["source", "outcome"]
)

RESPONSES = error_responses(
    {
        400: "Malformed payload",
        401: "Missing, forged or stale signature",
        404: "Unknown or unconfigured source",
        413: "Body too large",
        415: "Not the content type the vendor sends",
        503: "The broker did not acknowledge; retry later",
    }
)


def _dead_letter(vendor: str, item_id: str | None, reason: str, body: bytes) -> Outgoing:
    return dead_letter_of(
        item_id or vendor,
        body,
        reason,
        origin=f"webhook:{vendor}",
        consumer="trigger-webhooks",
        error="Unmappable",
    )


def router(
    vendors: dict[str, Vendor],
    program: Program,
    producer: Producer,
    max_body: int,
    public_url: str | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> APIRouter:
    api = APIRouter()

    @api.head("/v1/webhooks/{source}", include_in_schema=False)
    async def probe(source: str) -> Response:
        """Vendors (Intercom) check an endpoint with HEAD when it is saved."""
        return Response(status_code=200 if source in vendors else 404)

    @api.post(
        "/v1/webhooks/{source}",
        status_code=202,
        responses=RESPONSES,
        summary="A vendor's native webhook (zendesk, hubspot, freshdesk, intercom, salesforce, "
        "servicenow, generic)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {}},
                    "text/xml": {"schema": {"type": "string"}},
                },
            }
        },
    )
    async def webhook(source: str, request: Request) -> Response:
        vendor = vendors.get(source)
        if vendor is None:
            raise ApiError(
                404, "unknown_source", f"no webhook source {source!r} is configured", "source"
            )
        try:
            webhook_request = await receive(
                request,
                sender=source,
                content_types=vendor.CONTENT_TYPES,
                max_body=max_body,
                public_url=public_url,
                now=clock(),
            )
        except ApiError as exc:
            if exc.status == 415:
                WEBHOOKS.labels(source=source, outcome="unsupported_media_type").inc()
            raise
        try:
            vendor.verify(webhook_request)
            items = vendor.items(webhook_request)
        except WebhookError as exc:
            WEBHOOKS.labels(source=source, outcome=exc.code).inc()
            log.warning("webhook from %s refused: %s", source, exc.message)
            raise ApiError(exc.status, exc.code, exc.message) from None

        config = program.sources.get(source)  # type: ignore[call-overload]
        accepted: list[CloudEvent] = []
        ignored: list[str | None] = []
        dead: list[Unmappable] = []
        for item in items:
            result = to_event(vendor, item, config)
            if isinstance(result, CloudEvent):
                accepted.append(result)
            elif isinstance(result, Ignored):
                ignored.append(result.vendor_type)
            else:
                dead.append(result)
        messages = [event_message(e) for e in accepted] + [
            _dead_letter(source, d.event_id, d.reason, webhook_request.body) for d in dead
        ]
        try:
            await publish_or_unavailable(producer, messages)
        except ApiError:
            WEBHOOKS.labels(source=source, outcome="unavailable").inc()
            raise
        WEBHOOKS.labels(source=source, outcome="accepted").inc()
        for d in dead:
            log.warning("webhook item from %s dead-lettered: %s", source, d.reason)
        ids = [e.id for e in accepted]
        custom = vendor.acknowledge(ids)
        if custom is not None:
            return custom
        return JSONResponse(
            {
                "accepted": ids,
                "ignored": len(ignored),
                "dead_lettered": [{"id": d.event_id, "reason": d.reason} for d in dead],
            },
            status_code=202,
        )

    return api
