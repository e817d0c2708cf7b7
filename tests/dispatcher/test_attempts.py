"""A send that keeps failing transiently is tried exactly KAIKU_MAX_ATTEMPTS times, with each
back-off one step longer than the last, then fails for good (PostgreSQL and SQLite)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.db import unit_of_work
from services.common.kafka import Incoming, Outgoing
from services.common.program import load_program
from services.dispatcher.channels import SendResult
from services.dispatcher.config import DispatcherSettings
from services.dispatcher.handlers import InvitationHandler
from services.dispatcher.models import Send
from services.dispatcher.rendering import Renderer
from services.dispatcher.scheduler import Scheduler
from tests.conftest import ROOT
from tests.support import email_invitation

# A Tuesday, midday in Helsinki: no quiet hours in the way.
START = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


class FailingProvider:
    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, message: Any) -> SendResult:
        self.calls += 1
        return SendResult("transient", reason="503 from the provider")

    async def aclose(self) -> None:
        return None


class Published:
    def __init__(self) -> None:
        self.messages: list[Outgoing] = []

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        self.messages.extend(messages)


async def test_transient_failures_are_tried_max_attempts_times(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    now = [START]
    invitation = email_invitation("zz-flaky", send_at=START)
    async with unit_of_work(sessions) as session:
        await InvitationHandler(clock=lambda: now[0])([Incoming(None, invitation)], session)  # type: ignore[arg-type]
    provider = FailingProvider()
    settings = DispatcherSettings(max_attempts=3, retry_base_seconds=60, retry_max_seconds=3600)
    scheduler = Scheduler(
        settings=settings,
        program=load_program(ROOT / "deploy/local/program.yaml"),
        renderer=Renderer("https://kaiku.example.com", None),
        providers={"email": provider},
        sessions=sessions,
        producer=Published(),  # type: ignore[arg-type]
        clock=lambda: now[0],
    )
    retries: list[timedelta] = []
    for _ in range(10):
        await scheduler.round()
        async with sessions() as session:
            send = (await session.execute(select(Send))).scalar_one()
        if send.status != "pending":
            break
        retries.append(send.send_at - now[0])
        now[0] = send.send_at + timedelta(seconds=1)
    assert (provider.calls, send.status, send.attempts) == (3, "failed", 3)
    # Back-off doubles from the base (with jitter of at most half either way).
    assert len(retries) == 2
    assert timedelta(seconds=30) <= retries[0] <= timedelta(seconds=90)
    assert timedelta(seconds=60) <= retries[1] <= timedelta(seconds=180)
