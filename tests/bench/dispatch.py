"""Dispatcher throughput: sends per second through the scheduler (claim with SKIP LOCKED,
checks, render, send, record) to an SMTP sink (aiosmtpd) and to a local HTTP provider, beside a
bare loop that sends the same rendered messages with the same client and concurrency and no
dispatcher, in the same run."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from services.common.config import DatabaseSettings
from services.common.db import create_engine, create_sessionmaker, create_tables, unit_of_work
from services.common.events import InvitationRequested
from services.common.program import Program
from services.dispatcher import repository
from services.dispatcher.channels import OutboundEmail, Provider, SendResult
from services.dispatcher.channels.smtp import SmtpEmail
from services.dispatcher.channels.webhook import WebhookChannel
from services.dispatcher.config import DispatcherSettings, SmtpSettings, WebhookChannelSettings
from services.dispatcher.handlers import send_row
from services.dispatcher.models import Base
from services.dispatcher.rendering import Renderer
from services.dispatcher.scheduler import Scheduler
from tests.support import SmtpSink, email_invitation
from tests.vendor_api import LocalApi

PUBLIC_URL = "https://surveys.example.com"
SETTINGS = DispatcherSettings(claim_batch=100, send_concurrency=20, poll_seconds=0.05)


def invitations(n: int) -> list[InvitationRequested]:
    due = datetime.now(UTC) - timedelta(seconds=1)
    return [email_invitation(f"c-{i}", send_at=due) for i in range(n)]


def rendered(program: Program, items: list[InvitationRequested]) -> list[OutboundEmail]:
    renderer = Renderer(PUBLIC_URL)
    survey = program.survey("relationship-nps")
    return [
        renderer.outbound_email(
            inv,
            survey,
            sender=SETTINGS.email_from,
            unsubscribe_mailto=None,
            domain=SETTINGS.email_domain,
        )
        for inv in items
    ]


async def bare(provider: Provider[Any], messages: list[OutboundEmail]) -> float:
    """The same messages, the same client and concurrency, no dispatcher: sends per second."""
    sem = asyncio.Semaphore(SETTINGS.send_concurrency)

    async def one(m: OutboundEmail) -> SendResult:
        async with sem:
            return await provider.send(m)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(m) for m in messages))
    elapsed = time.perf_counter() - started
    assert all(r.outcome == "sent" for r in results), results[:3]
    return len(messages) / elapsed


async def dispatched(
    provider: Provider[Any], program: Program, database: DatabaseSettings, n: int
) -> float:
    """Sends per second through the scheduler, from due rows in the table to recorded outcomes
    (the relay's publishing to Kafka is not part of it)."""
    engine = create_engine(database)
    await create_tables(engine, Base.metadata, database.schema_name)
    sessions = create_sessionmaker(engine)
    now = datetime.now(UTC)
    rows = [send_row(inv, now) for inv in invitations(n)]
    async with unit_of_work(sessions) as session:
        for start in range(0, n, 1000):
            await repository.schedule(session, rows[start : start + 1000])
    scheduler = Scheduler(
        settings=SETTINGS,
        program=program,
        renderer=Renderer(PUBLIC_URL),
        providers={"email": provider},
        sessions=sessions,
        producer=None,  # type: ignore[arg-type]  (round() does not publish)
    )
    started = time.perf_counter()
    done = 0
    while done < n:
        claimed = await scheduler.round()
        if claimed == 0:
            break
        done += claimed
    elapsed = time.perf_counter() - started
    async with sessions() as session:
        counts = await repository.counts(session)
    await engine.dispose()
    assert counts.get("sent") == n, counts
    return n / elapsed


async def smtp_rates(program: Program, database: DatabaseSettings, n: int) -> tuple[float, float]:
    sink = SmtpSink()
    sink.start()
    try:
        provider = SmtpEmail(SmtpSettings(host="127.0.0.1", port=sink.port))
        baseline = await bare(provider, rendered(program, invitations(n)))
        rate = await dispatched(provider, program, database, n)
    finally:
        sink.stop()
    return rate, baseline


async def http_rates(program: Program, database: DatabaseSettings, n: int) -> tuple[float, float]:
    api = LocalApi()

    @api.route("POST", "/invitations")
    async def receive(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"id": uuid.uuid4().hex}, status_code=202)

    with api:
        provider = WebhookChannel(
            WebhookChannelSettings(url=f"{api.url}/invitations", secret="bench-secret")
        )
        try:
            baseline = await bare(provider, rendered(program, invitations(n)))
            api.calls.clear()
            rate = await dispatched(provider, program, database, n)
        finally:
            await provider.aclose()
    return rate, baseline
