"""Test helpers: an SMTP sink (aiosmtpd), waiting for conditions, running the services."""

from __future__ import annotations

import asyncio
import email
import email.policy
import importlib.util
import re
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.config import DatabaseSettings, HttpSettings, KafkaSettings, LinkSettings
from services.common.db import create_engine, create_sessionmaker, create_tables
from services.common.events import Customer, InvitationRequested, Metric
from services.common.program import Program
from services.common.settings import CommonSettings
from services.embedded import EmbeddedApp, free_port

T = TypeVar("T")


@dataclass
class SmtpSink:
    """A real SMTP server (aiosmtpd) on a free port that keeps every message it receives."""

    port: int = field(default_factory=free_port)
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Controller | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        with self._lock:
            self.messages.append(msg)
            self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"

    def start(self) -> None:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()

    def count(self) -> int:
        with self._lock:
            return len(self.messages)


def text_part(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None, "the email has no text/plain part"
    return str(part.get_content())


def html_part(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("html",))
    assert part is not None, "the email has no text/html part"
    return str(part.get_content())


def survey_link(msg: EmailMessage) -> str:
    match = re.search(r"https?://[^\s\"'<>]+/s/[A-Za-z0-9_-]+", text_part(msg))
    assert match, "no survey link in the email"
    return match.group(0)


async def eventually(
    check: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    *,
    timeout: float = 20.0,
    what: str = "condition",
) -> T:
    """Poll ``check`` until it returns something truthy; fail saying ``what`` did not happen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(*apps: FastAPI) -> AsyncIterator[None]:
    """Run the apps' lifespans (consumers, workers) for the duration of the block."""
    async with AsyncExitStack() as stack:
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
        yield


def client(app: Any, base_url: str = "http://kaiku.test") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


def email_invitation(
    customer: str,
    *,
    survey_id: str = "relationship-nps",
    trigger_id: str = "order-delivered-nps",
    metric: Metric = "nps",
    event_type: str = "order.delivered",
    locale: str = "fi",
    timezone: str | None = "Europe/Helsinki",
    send_at: datetime | None = None,
    expires_in: timedelta = timedelta(days=14),
) -> InvitationRequested:
    """An invitation as the trigger publishes it, due now, to ``<customer>@example.com``."""
    at = send_at or datetime.now(UTC)
    return InvitationRequested(
        invitation_id=uuid.uuid4(),
        token=uuid.uuid4().hex[:24],
        survey_id=survey_id,
        trigger_id=trigger_id,
        metric=metric,
        event_id=f"event-{customer}",
        event_source="test",
        event_type=event_type,
        customer=Customer(id=customer, email=f"{customer}@example.com"),
        channel="email",
        locale=locale,
        send_at=at,
        expires_at=at + expires_in,
        requested_at=at,
        timezone=timezone,
    )


def smtp_stack(
    kafka: KafkaSettings,
    database: DatabaseSettings,
    program: Program,
    sink: SmtpSink,
    token: str,
    public_url: str = "http://kaiku.test",
    dispatcher: Any = None,
    sms: Any = None,
    collector: Any = None,
) -> EmbeddedApp:
    """The three services, routed as under ``make run``, sending email to ``sink``.

    Tests answer within a second of the email's arrival, faster than any person: unless
    ``collector`` says otherwise, such answers are not taken for a link scanner's."""
    from services.collector.app import create_app as collector_app
    from services.collector.config import CollectorSettings
    from services.dispatcher.app import create_app as dispatcher_app
    from services.dispatcher.channels.smtp import SmtpEmail
    from services.dispatcher.config import DispatcherSettings, SmtpSettings
    from services.trigger.app import create_app as trigger_app

    settings = CommonSettings(
        kafka=kafka,
        database=database,
        http=HttpSettings(api_token=SecretStr(token)),
        links=LinkSettings(public_url=public_url),
    )
    smtp = SmtpEmail(SmtpSettings(host="127.0.0.1", port=sink.port))
    return EmbeddedApp(
        trigger_app(settings, program=program),
        dispatcher_app(
            settings,
            dispatcher or DispatcherSettings(poll_seconds=0.1),
            program=program,
            email=smtp,
            sms=sms,
        ),
        collector_app(settings, collector or CollectorSettings(bot_min_seconds=0), program=program),
    )


def run_migration_step(connection: Any, service: str, revision_file: str, step: str) -> None:
    """Run one migration's ``upgrade`` or ``downgrade`` on a synchronous connection (inside
    ``AsyncConnection.run_sync``), outside alembic's version bookkeeping: a data migration
    applied to tables built from the models."""
    module = migration_module(service, revision_file)
    with Operations.context(MigrationContext.configure(connection)):
        getattr(module, step)()


def migration_module(service: str, revision_file: str) -> Any:
    """One migration of a service, loaded from its file (revisions are not a package)."""
    root = Path(__file__).resolve().parent.parent
    path = root / f"services/{service}/migrations/versions/{revision_file}.py"
    spec = importlib.util.spec_from_file_location(f"{service}_migration_{revision_file}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def service_tables(
    database: DatabaseSettings, metadata: MetaData
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on a service's tables, created in the test's database (a PostgreSQL schema or
    a SQLite file): what each service's ``sessions`` fixture yields."""
    engine = create_engine(database)
    await create_tables(engine, metadata, database.schema_name)
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()
