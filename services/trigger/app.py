"""The trigger service: HTTP ingress and the worker that turns events into invitations."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from services.common import events
from services.common.events import (
    OPTOUT_MESSAGE,
    CloudEvent,
    DeliveryRecorded,
    ResponseSubmitted,
)
from services.common.http import bearer_auth, install_body_limit
from services.common.kafka import json_decoder
from services.common.program import Program, load_program
from services.common.runtime import Runtime, service_app
from services.common.settings import CommonSettings
from services.common.tokens import LinkKeys
from services.trigger import api, feedback, ledger
from services.trigger.config import TriggerSettings
from services.trigger.decoding import decode_event
from services.trigger.enrich import Enricher
from services.trigger.handlers import EventHandler
from services.trigger.ingress import ContactResolver, Vendor, registry
from services.trigger.ingress import router as webhooks
from services.trigger.models import Base


def create_app(
    settings: CommonSettings | None = None,
    trigger: TriggerSettings | None = None,
    program: Program | None = None,
    vendors: dict[str, Vendor] | None = None,
    resolvers: dict[str, ContactResolver] | None = None,
) -> FastAPI:
    settings = (settings or CommonSettings()).with_database("trigger")
    trigger = trigger or TriggerSettings()
    program = program or load_program(settings.program.program)
    links = LinkKeys.parse(settings.links.link_keys)
    runtime = Runtime(
        name="trigger", kafka=settings.kafka, database=settings.database, metadata=Base.metadata
    )
    http = httpx.AsyncClient(timeout=httpx.Timeout(trigger.lookup_timeout_seconds))
    runtime.on_stop(http.aclose)
    enricher = Enricher(program, registry.resolvers() if resolvers is None else resolvers, http)
    runtime.consume(
        "trigger",
        events.EVENTS,
        decode_event,
        EventHandler(
            program,
            links,
            lookup_notes=lambda: enricher.notes,
            salt=settings.erasure.erasure_salt,
        ),
        prepare=enricher,
    )
    runtime.consume(
        "trigger-deliveries",
        events.DELIVERIES,
        json_decoder(DeliveryRecorded),
        feedback.on_deliveries,
        group="deliveries",
    )
    runtime.consume(
        "trigger-responses",
        events.RESPONSES,
        json_decoder(ResponseSubmitted),
        feedback.ResponseHandler(program),
        group="responses",
    )
    runtime.consume(
        "trigger-optouts",
        events.OPTOUTS,
        json_decoder(OPTOUT_MESSAGE),
        feedback.OptOutHandler(settings.erasure.erasure_salt),
        group="optouts",
    )

    app = service_app("kaiku trigger", runtime)
    install_body_limit(app, settings.http.max_body_bytes, settings.http.body_timeout_seconds)
    app.include_router(
        webhooks.router(
            registry.configured() if vendors is None else vendors,
            program,
            runtime.producer,
            settings.http.max_body_bytes,
            trigger.webhook_public_url,
        )
    )
    app.include_router(ledger.router(runtime.sessions, bearer_auth(settings.http.api_token)))
    app.include_router(
        api.router(
            runtime.producer,
            bearer_auth(settings.http.api_token),
            settings.http.max_body_bytes,
            trigger.max_batch_events,
        )
    )
    # The CloudEvent schema is referenced by the hand-written request body of /v1/events.
    original = app.openapi

    def openapi() -> dict[str, object]:
        if app.openapi_schema is None:
            schema = original()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            defs = CloudEvent.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(defs.pop("$defs", {}))
            comps["CloudEvent"] = defs
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
