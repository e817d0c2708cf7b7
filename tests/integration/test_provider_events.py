"""Provider receipts through the running stack (real broker, PostgreSQL): an invitation sent with
Mailgun (a local server that enforces Mailgun's contract) hard-bounces; Mailgun's signed webhook
becomes a ``bounced`` delivery on ``kaiku.deliveries`` and a ``hard_bounce`` opt-out on
``kaiku.optouts``; the trigger then suppresses the address. A retried webhook changes nothing; a
forged one is refused with nothing stored."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.program import parse_program
from services.dispatcher.config import DispatcherSettings
from services.dispatcher.models import Receipt
from services.trigger.models import Decision
from tests.conftest import read_topic
from tests.dispatcher import mailgun_api
from tests.dispatcher.mailgun_api import MailgunApi
from tests.support import SmtpSink, client, eventually, running, smtp_stack

TOKEN = "receipts-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = {"fi": "Kysymys?", "sv": "Fråga?", "en": "Question?"}
PROGRAM = f"""
version: 1
surveys:
  - {{id: support-csat, metric: csat, question: {json.dumps(QUESTION)}}}
triggers:
  - {{id: solved-csat, event: ticket.solved, survey: support-csat}}
"""


def solved(customer: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"solved-{uuid.uuid4().hex[:8]}",
        "source": "helpdesk://acme",
        "type": "ticket.solved",
        "time": datetime.now(UTC).isoformat(),
        "data": {"customer": {"id": customer, "email": f"{customer}@example.com"}},
    }


async def test_a_hard_bounce_reported_by_mailgun_suppresses_the_address(
    kafka: KafkaSettings,
    postgres: DatabaseSettings,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with MailgunApi() as mailgun:
        monkeypatch.setenv("KAIKU_MAILGUN_API_KEY", mailgun_api.API_KEY)
        monkeypatch.setenv("KAIKU_MAILGUN_DOMAIN", mailgun_api.DOMAIN)
        monkeypatch.setenv("KAIKU_MAILGUN_BASE_URL", mailgun.url)
        monkeypatch.setenv("KAIKU_MAILGUN_WEBHOOK_SIGNING_KEY", mailgun_api.SIGNING_KEY)
        from services.dispatcher.channels.mailgun import MailgunEmail
        from services.dispatcher.config import MailgunSettings

        app = smtp_stack(
            kafka,
            postgres,
            parse_program(PROGRAM),
            smtp_sink,
            TOKEN,
            dispatcher=DispatcherSettings(email_provider="mailgun", poll_seconds=0.1),
        )
        # The stack's email goes to Mailgun instead of the SMTP sink.
        scheduler = app.apps["dispatcher"].state.scheduler
        scheduler.providers["email"] = MailgunEmail(MailgunSettings())
        async with running(*app.apps.values()), client(app) as http:
            r = await http.post("/v1/events", json=solved("bouncer"), headers=AUTH)
            assert r.status_code == 202
            await eventually(lambda: mailgun.accepted, timeout=20, what="the send to Mailgun")
            sent = mailgun.accepted[0]
            assert sent.get("to") == "bouncer@example.com"

            bounce = mailgun_api.event_data(
                "failed",
                sent,
                severity="permanent",
                reason="bounce",
                **{"delivery-status": {"code": 550, "message": "5.1.1 No such user"}},
            )
            body = mailgun_api.webhook(bounce)
            headers = {"content-type": "application/json"}
            r = await http.post("/v1/provider-events/mailgun", content=body, headers=headers)
            assert r.status_code == 200, r.text
            assert r.json() == {"received": 1, "new": 1}
            # Mailgun retries until it gets a 200: the retry is stored once.
            r = await http.post("/v1/provider-events/mailgun", content=body, headers=headers)
            assert r.json() == {"received": 1, "new": 0}
            # A forged signature: 401, nothing stored.
            forged = mailgun_api.webhook(
                mailgun_api.event_data("delivered", sent), key="not-the-key"
            )
            r = await http.post("/v1/provider-events/mailgun", content=forged, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "bad_signature"
            r = await http.post("/v1/provider-events/nobody", content=body, headers=headers)
            assert r.status_code == 404

            deliveries = await read_topic(kafka, events.DELIVERIES, expect=2, timeout=20)
            statuses = [json.loads(m.value)["status"] for m in deliveries]  # type: ignore[attr-defined]
            assert statuses == ["sent", "bounced"]
            optouts = await read_topic(kafka, events.OPTOUTS, expect=1, timeout=20)
            optout = json.loads(optouts[0].value)  # type: ignore[attr-defined]
            assert optout["customer_id"] == "bouncer"
            assert (optout["source"], optout["reason"], optout["channel"]) == (
                "provider",
                "hard_bounce",
                "email",
            )
            sessions = app.apps["dispatcher"].state.runtime.sessions
            async with sessions() as s:
                stored = (await s.execute(select(func.count()).select_from(Receipt))).scalar()
            assert stored == 1

            # The trigger consumed the opt-out: the next survey for that address is suppressed.
            trigger_sessions = app.apps["trigger"].state.runtime.sessions

            async def knows_optout() -> bool:
                from services.trigger.models import OptOut

                async with trigger_sessions() as s:
                    n = (await s.execute(select(func.count()).select_from(OptOut))).scalar()
                return bool(n)

            await eventually(knows_optout, timeout=20, what="the trigger to record the opt-out")
            r = await http.post("/v1/events", json=solved("bouncer"), headers=AUTH)
            assert r.status_code == 202

            async def second_decision() -> list[tuple[str, str]] | None:
                async with trigger_sessions() as s:
                    rows = (
                        await s.execute(
                            select(Decision.decision, Decision.reason)
                            .where(Decision.customer_id == "bouncer")
                            .order_by(Decision.id)
                        )
                    ).all()
                return [(d, r) for d, r in rows] if len(rows) == 2 else None

            decisions = await eventually(second_decision, timeout=20, what="the second decision")
            assert decisions[1] == ("skipped", "suppressed:opted_out"), decisions
            assert len(mailgun.accepted) == 1
