"""Scheduling through the real broker, PostgreSQL and an SMTP sink: reminders (sent when nobody
answered; not after an answer or an opt-out) and quiet hours checked again at the moment of
sending, in the recipient's time zone."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiokafka import AIOKafkaProducer
from sqlalchemy import select

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.program import Program, parse_program
from services.dispatcher.models import Send
from services.embedded import EmbeddedApp
from tests.support import (
    SmtpSink,
    client,
    email_invitation,
    eventually,
    running,
    smtp_stack,
    survey_link,
)

TOKEN = "sched-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = {"fi": "Kysymys?", "sv": "Fråga?", "en": "Question?"}

PROGRAM = f"""
version: 1
surveys:
  - id: support-csat
    metric: csat
    question: {json.dumps(QUESTION)}
    reminder: {{after: 8s}}
triggers:
  - {{id: solved-csat, event: ticket.solved, survey: support-csat}}
fatigue:
  quiet_hours:
    - {{channel: email, start: "21:00", end: "08:00"}}
"""


def program() -> Program:
    return parse_program(PROGRAM)


def stack(kafka: KafkaSettings, db: DatabaseSettings, sink: SmtpSink) -> EmbeddedApp:
    return smtp_stack(kafka, db, program(), sink, TOKEN)


def daytime_zone() -> str:
    """A zone where it is now between 10:00 and 18:00 (well outside the quiet hours)."""
    return _zone_where(lambda hour: 10 <= hour < 18)


def night_zone() -> str:
    """A zone where it is now between 23:00 and 05:00 (inside the quiet hours)."""
    return _zone_where(lambda hour: hour >= 23 or hour < 5)


def _zone_where(ok: Any) -> str:
    now = datetime.now(UTC)
    for offset in range(-12, 15):
        # Etc/GMT signs are inverted: Etc/GMT-3 is UTC+3.
        name = "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"
        if ok(now.astimezone(ZoneInfo(name)).hour):
            return name
    raise AssertionError("no zone found")  # 27 offsets cover every hour of the day


def solved(customer: str, zone: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"solved-{customer}-{uuid.uuid4().hex[:6]}",
        "source": "helpdesk://acme",
        "type": "ticket.solved",
        "time": datetime.now(UTC).isoformat(),
        "data": {
            "customer": {"id": customer, "email": f"{customer}@example.com", "timezone": zone},
            "case_id": f"T-{customer}",
        },
    }


async def sends(app: EmbeddedApp) -> dict[tuple[str, str], Send]:
    sessions = app.apps["dispatcher"].state.runtime.sessions
    async with sessions() as s:
        rows = (await s.execute(select(Send))).scalars().all()
    return {(r.customer_id, r.kind): r for r in rows}


def to(sink: SmtpSink, customer: str) -> list[Any]:
    return [m for m in sink.messages if m["To"] == f"{customer}@example.com"]


async def test_reminder_goes_only_to_those_who_neither_answered_nor_opted_out(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink
) -> None:
    app = stack(kafka, postgres, smtp_sink)
    zone = daytime_zone()
    async with running(*app.apps.values()), client(app) as http:
        batch = [solved(c, zone) for c in ("silent", "answers", "opts-out")]
        assert (await http.post("/v1/events", json=batch, headers=AUTH)).status_code == 202
        await eventually(lambda: smtp_sink.count() >= 3, timeout=20, what="three invitations")
        links = {c: survey_link(to(smtp_sink, c)[0]) for c in ("answers", "opts-out")}

        # One answers, one unsubscribes with the mail client's one-click POST, before the
        # reminders are due (8 s after each send).
        path = links["answers"].split("kaiku.test", 1)[1]

        async def collector_knows(path: str = path) -> bool:
            return (await http.get(path)).status_code == 200

        await eventually(collector_knows, timeout=10, what="the collector to have the link")
        r = await http.post(path, data={"score": "4"})
        assert r.status_code == 303, r.text
        token = links["opts-out"].rsplit("/", 1)[1]
        r = await http.post(
            f"/u/{token}",
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 200, r.text

        # The silent customer gets the reminder, with the same survey link.
        await eventually(lambda: len(to(smtp_sink, "silent")) == 2, timeout=40, what="the reminder")
        first, reminder = to(smtp_sink, "silent")
        assert survey_link(reminder) == survey_link(first)
        assert reminder["Message-ID"] != first["Message-ID"]
        assert reminder["Subject"] != first["Subject"]

        async def settled() -> bool:
            rows = await sends(app)
            return all(
                rows.get((c, "reminder")) is not None
                and rows[(c, "reminder")].status in ("sent", "cancelled")
                for c in ("silent", "answers", "opts-out")
            )

        await eventually(settled, timeout=20, what="every reminder sent or cancelled")
        rows = await sends(app)
        assert rows[("silent", "reminder")].status == "sent"
        assert rows[("answers", "reminder")].status == "cancelled"
        assert rows[("answers", "reminder")].reason == "cancelled: answered"
        assert rows[("opts-out", "reminder")].status == "cancelled"
        # ... and neither of the others got a second email.
        assert len(to(smtp_sink, "answers")) == 1
        assert len(to(smtp_sink, "opts-out")) == 1


async def test_a_send_due_in_quiet_hours_waits_for_the_morning(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink
) -> None:
    """An invitation that arrives due now while it is night for the recipient (a foreign
    producer, or a program whose quiet hours changed) is moved by the dispatcher to 08:00 in the
    recipient's zone; a daytime recipient's goes out."""
    app = stack(kafka, postgres, smtp_sink)
    night, day = night_zone(), daytime_zone()
    now = datetime.now(UTC)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    async with running(*app.apps.values()):
        await producer.start()
        try:
            for customer, zone in (("sleeper", night), ("worker", day)):
                invitation = email_invitation(
                    customer,
                    survey_id="support-csat",
                    trigger_id="solved-csat",
                    metric="csat",
                    event_type="ticket.solved",
                    locale="en",
                    timezone=zone,
                    send_at=now,
                    expires_in=timedelta(days=7),
                )
                await producer.send_and_wait(
                    kafka.topic(events.INVITATIONS),
                    invitation.model_dump_json().encode(),
                    key=customer.encode(),
                )
        finally:
            await producer.stop()

        await eventually(lambda: to(smtp_sink, "worker"), timeout=20, what="the daytime email")

        async def moved() -> Send | None:
            row = (await sends(app)).get(("sleeper", "invitation"))
            return row if row is not None and row.send_at > now + timedelta(minutes=1) else None

        row = await eventually(moved, timeout=10, what="the night-time send to be moved")
        local = row.send_at.astimezone(ZoneInfo(night))
        assert (local.hour, local.minute) == (8, 0)
        assert row.status == "pending" and row.attempts == 0
        assert local - datetime.now(UTC).astimezone(ZoneInfo(night)) < timedelta(hours=10)
        assert to(smtp_sink, "sleeper") == []
