"""The trigger's HTTP ingress: ``POST /v1/events`` takes CloudEvents and puts them on Kafka."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from services.common import events
from services.common.events import CloudEvent
from services.common.http import ApiError, error_responses, field_path, read_body
from services.common.kafka import Outgoing, Producer

log = logging.getLogger(__name__)

JSON_TYPES = (
    "application/json",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
)


class Accepted(BaseModel):
    accepted: list[str]


ERRORS = error_responses(
    {
        400: "Malformed JSON",
        401: "Missing or wrong bearer token",
        413: "Body or batch too large",
        415: "Not a JSON content type",
        422: "Not a valid CloudEvent; the error names the field",
        503: "The broker did not acknowledge; retry after the Retry-After seconds",
    }
)


def parse_events(body: bytes, max_events: int) -> list[CloudEvent]:
    """Decode one CloudEvent or a JSON array of them, naming the failing field on error."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not UTF-8 or JSON, too long a number, too deep
        where = (
            f" at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise ApiError(400, "malformed_json", f"the body is not valid JSON{where}") from None
    single = isinstance(raw, dict)
    items = [raw] if single else raw
    if not isinstance(items, list):
        raise ApiError(422, "invalid", "expected a CloudEvent object or an array of them")
    if not items:
        raise ApiError(422, "invalid", "the array holds no event")
    if len(items) > max_events:
        raise ApiError(413, "too_many_events", f"at most {max_events} events per request")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(CloudEvent.model_validate(item))
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            loc = tuple(err["loc"]) if single else (i, *err["loc"])
            raise ApiError(422, "invalid_event", str(err["msg"]), field_path(loc)) from None
    return out


def event_message(event: CloudEvent) -> Outgoing:
    """An accepted event as it goes onto kaiku.events: structured mode, keyed by customer."""
    return Outgoing(
        events.EVENTS,
        event.customer_id,
        event,
        (("content-type", b"application/cloudevents+json"),),
    )


async def publish_or_unavailable(producer: Producer, messages: list[Outgoing]) -> None:
    """Publish and await the broker's acknowledgement, or answer 503 with Retry-After: an
    ingress never accepts what it could not store.

    A 503 after waiting the whole timeout leaves the messages queued in the producer, written
    if the broker comes back (a sender's retry with the same id is then a duplicate, which the
    trigger ignores); while earlier sends still wait for the broker beyond the timeout, nothing
    more is queued: the answer is 503 at once and the events are not stored."""
    timeout = producer.settings.produce_timeout_seconds
    unavailable = ApiError(
        503,
        "unavailable",
        "the event store is unavailable; retry later",
        headers={"Retry-After": "5"},
    )
    if producer.stalled(timeout):
        log.warning("not accepted: the broker has not acknowledged for %.0fs", timeout)
        raise unavailable
    try:
        async with asyncio.timeout(timeout):
            await producer.publish(messages)
    except (KafkaError, TimeoutError) as exc:
        log.warning("not accepted: the broker did not acknowledge (%s)", type(exc).__name__)
        raise unavailable from None


def router(producer: Producer, auth: Any, max_body: int, max_events: int) -> APIRouter:
    api = APIRouter()

    @api.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        responses=ERRORS,
        dependencies=[Depends(auth)],
        summary="Submit one CloudEvent or a JSON array of them",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    t: {
                        "schema": {
                            "anyOf": [
                                {"$ref": "#/components/schemas/CloudEvent"},
                                {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/CloudEvent"},
                                },
                            ]
                        }
                    }
                    for t in JSON_TYPES
                },
            }
        },
    )
    async def post_events(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send JSON ({', '.join(JSON_TYPES)}), not {ctype or 'nothing'}",
            )
        body = await read_body(request, max_body)
        batch = parse_events(body, max_events)
        await publish_or_unavailable(producer, [event_message(e) for e in batch])
        return JSONResponse({"accepted": [e.id for e in batch]}, status_code=202)

    return api
