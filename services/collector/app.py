"""The collector service: survey pages, answers, and scores."""

from __future__ import annotations

from fastapi import FastAPI

from services.collector import alerting, api, bots, cursors, dashboard, erasure, links, responses
from services.collector.config import CollectorSettings, reporting_zone
from services.collector.handlers import DeliveryHandler, InvitationHandler
from services.collector.models import Base
from services.collector.outbox import ResponseRelay
from services.collector.pages import Pages
from services.common import events
from services.common.events import INVITATION_MESSAGE, DeliveryRecorded
from services.common.http import bearer_auth, install_body_limit
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
    zone = reporting_zone(collector, program)
    runtime = Runtime(
        name="collector", kafka=settings.kafka, database=settings.database, metadata=Base.metadata
    )
    relay = ResponseRelay(
        runtime.sessions,
        runtime.producer,
        keep_hits=bots.BotRules.of(collector).burst_window,
    )
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
        DeliveryHandler(zone),
        group="deliveries",
    )
    runtime.add_worker("response-relay", relay.run, relay.stop)
    alerter = alerting.AlertSender(settings=collector, program=program, sessions=runtime.sessions)
    runtime.add_worker("alert-sender", alerter.run, alerter.stop)
    runtime.on_stop(alerter.aclose)

    changes = dashboard.Changes()

    def answered() -> None:
        relay.wake()
        alerter.wake()
        changes.notify()

    app = service_app("kaiku collector", runtime)
    install_body_limit(app, settings.http.max_body_bytes, settings.http.body_timeout_seconds)
    app.include_router(
        links.router(
            program=program,
            links=LinkKeys.parse(settings.links.link_keys),
            pages=Pages(collector.template_dir),
            sessions=runtime.sessions,
            settings=collector,
            zone=zone,
            on_change=answered,
        )
    )
    app.include_router(
        api.router(
            program=program,
            sessions=runtime.sessions,
            auth=bearer_auth(settings.http.api_token),
            min_n=collector.min_n,
            cursor_key=cursors.cursor_key(settings.http.api_token),
            zone=zone,
        )
    )
    app.include_router(
        erasure.router(
            sessions=runtime.sessions,
            auth=bearer_auth(settings.http.api_token),
            salt=settings.erasure.erasure_salt,
            on_change=relay.wake,
        )
    )
    app.include_router(
        responses.router(
            sessions=runtime.sessions,
            auth=bearer_auth(settings.http.api_token),
            cursor_key=cursors.cursor_key(settings.http.api_token),
        )
    )
    app.include_router(
        dashboard.router(
            program=program,
            sessions=runtime.sessions,
            token=settings.http.api_token,
            zone=zone,
            min_n=collector.min_n,
            changes=changes,
            session_hours=collector.dashboard_session_hours,
        )
    )
    return app
