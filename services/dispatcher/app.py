"""The dispatcher service: schedules, renders and sends invitations."""

from __future__ import annotations

from fastapi import FastAPI

from services.common import events
from services.common.events import INVITATION_MESSAGE
from services.common.kafka import json_decoder
from services.common.program import Program, load_program
from services.common.runtime import Runtime, service_app
from services.common.settings import CommonSettings
from services.dispatcher.channels import EmailChannel
from services.dispatcher.channels.file import FileEmailChannel
from services.dispatcher.channels.smtp import SmtpEmailChannel
from services.dispatcher.config import DispatcherSettings, SmtpSettings
from services.dispatcher.handlers import InvitationHandler
from services.dispatcher.models import Base
from services.dispatcher.rendering import Renderer
from services.dispatcher.scheduler import Scheduler


def email_channel(dispatcher: DispatcherSettings) -> EmailChannel:
    if dispatcher.email_channel == "smtp":
        return SmtpEmailChannel(SmtpSettings())
    return FileEmailChannel(dispatcher.outbox_dir)


def create_app(
    settings: CommonSettings | None = None,
    dispatcher: DispatcherSettings | None = None,
    program: Program | None = None,
    email: EmailChannel | None = None,
) -> FastAPI:
    settings = (settings or CommonSettings()).with_database("dispatcher")
    dispatcher = dispatcher or DispatcherSettings()
    program = program or load_program(settings.program.program)
    runtime = Runtime(
        name="dispatcher", kafka=settings.kafka, database=settings.database, metadata=Base.metadata
    )
    scheduler = Scheduler(
        settings=dispatcher,
        program=program,
        renderer=Renderer(settings.links.public_url, dispatcher.template_dir),
        email=email or email_channel(dispatcher),
        sessions=runtime.sessions,
        producer=runtime.producer,
        public_url=settings.links.public_url,
    )
    runtime.consume(
        "dispatcher",
        events.INVITATIONS,
        json_decoder(INVITATION_MESSAGE),
        InvitationHandler(),
        after_batch=scheduler.wake,
    )
    runtime.add_worker("scheduler", scheduler.run, scheduler.stop)

    app = service_app("kaiku dispatcher", runtime)
    app.state.scheduler = scheduler
    return app
