"""The dispatcher service: schedules, renders and sends invitations and their reminders, and
takes the providers' delivery receipts."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from services.common import events
from services.common.events import INVITATION_MESSAGE, OPTOUT_MESSAGE, ResponseSubmitted
from services.common.http import install_body_limit
from services.common.kafka import json_decoder
from services.common.program import Program, load_program
from services.common.runtime import Runtime, service_app
from services.common.settings import CommonSettings
from services.dispatcher import providers, receipts
from services.dispatcher.channels import Provider
from services.dispatcher.config import DispatcherSettings
from services.dispatcher.handlers import InvitationHandler, OptOutHandler, ResponseHandler
from services.dispatcher.models import Base
from services.dispatcher.rendering import Renderer
from services.dispatcher.scheduler import Scheduler


def create_app(
    settings: CommonSettings | None = None,
    dispatcher: DispatcherSettings | None = None,
    program: Program | None = None,
    email: Provider[Any] | None = None,
    sms: Provider[Any] | None = None,
) -> FastAPI:
    """``email`` and ``sms`` replace the providers the settings choose (tests, embedding)."""
    settings = (settings or CommonSettings()).with_database("dispatcher")
    dispatcher = dispatcher or DispatcherSettings()
    program = program or load_program(settings.program.program)
    public_url = dispatcher.provider_callback_url or settings.links.public_url
    runtime = Runtime(
        name="dispatcher", kafka=settings.kafka, database=settings.database, metadata=Base.metadata
    )
    channels: dict[str, Provider[Any]] = {"email": email or providers.email_provider(dispatcher)}
    sms_provider = sms or providers.sms_provider(dispatcher, public_url)
    if sms_provider is not None:
        channels["sms"] = sms_provider
    for provider in channels.values():
        runtime.on_stop(provider.aclose)
    scheduler = Scheduler(
        settings=dispatcher,
        program=program,
        renderer=Renderer(settings.links.public_url, dispatcher.template_dir),
        providers=channels,
        sessions=runtime.sessions,
        producer=runtime.producer,
        salt=settings.erasure.erasure_salt,
    )
    runtime.consume(
        "dispatcher",
        events.INVITATIONS,
        json_decoder(INVITATION_MESSAGE),
        InvitationHandler(settings.erasure.erasure_salt),
        after_batch=scheduler.wake,
    )
    runtime.consume(
        "dispatcher-responses",
        events.RESPONSES,
        json_decoder(ResponseSubmitted),
        ResponseHandler(),
        group="responses",
    )
    runtime.consume(
        "dispatcher-optouts",
        events.OPTOUTS,
        json_decoder(OPTOUT_MESSAGE),
        OptOutHandler(settings.erasure.erasure_salt),
        group="optouts",
    )
    runtime.add_worker("scheduler", scheduler.run, scheduler.stop)

    app = service_app("kaiku dispatcher", runtime)
    install_body_limit(app, settings.http.max_body_bytes, settings.http.body_timeout_seconds)
    app.include_router(
        receipts.router(
            providers.receipt_sources(dispatcher),
            runtime.sessions,
            settings.http.max_body_bytes,
            public_url,
            on_stored=scheduler.wake,
        )
    )
    app.state.scheduler = scheduler
    return app
