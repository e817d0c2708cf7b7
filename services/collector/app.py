"""The collector service: survey pages, answers, and scores."""

from __future__ import annotations

from fastapi import FastAPI

from services.collector import api, links
from services.collector.bots import reporting_zone
from services.collector.config import CollectorSettings
from services.collector.handlers import DeliveryHandler, InvitationHandler
from services.collector.models import Base
from services.collector.outbox import ResponseRelay
from services.collector.pages import Pages
from services.common import events
from services.common.events import INVITATION_MESSAGE, DeliveryRecorded
from services.common.http import bearer_auth
from services.common.kafka import json_decoder
from services.common.program import Program, load_program
from services.common.runtime import Runtime, service_app
from services.common.settings import CommonSettings
from services.common.tokens import LinkKeys


def create_app(
    settings: CommonSettings | None = None,
    collector: CollectorSettings | None = None,
    program: Program | None = None,
) -> FastAPI:
    settings = (settings or CommonSettings()).with_database("collector")
    collector = collector or CollectorSettings()
    program = program or load_program(settings.program.program)
    runtime = Runtime(
        name="collector", kafka=settings.kafka, database=settings.database, metadata=Base.metadata
    )
    relay = ResponseRelay(runtime.sessions, runtime.producer)
    runtime.consume(
        "collector-invitations",
        events.INVITATIONS,
        json_decoder(INVITATION_MESSAGE),
        InvitationHandler(),
    )
    runtime.consume(
        "collector-deliveries",
        events.DELIVERIES,
        json_decoder(DeliveryRecorded),
        DeliveryHandler(reporting_zone(collector, program)),
        group="deliveries",
    )
    runtime.add_worker("response-relay", relay.run, relay.stop)

    app = service_app("kaiku collector", runtime)
    app.include_router(
        links.router(
            program=program,
            links=LinkKeys.parse(settings.links.link_keys),
            pages=Pages(collector.template_dir),
            sessions=runtime.sessions,
            settings=collector,
            on_change=relay.wake,
        )
    )
    app.include_router(
        api.router(
            program=program,
            sessions=runtime.sessions,
            auth=bearer_auth(settings.http.api_token),
            min_n=collector.min_n,
        )
    )
    return app
