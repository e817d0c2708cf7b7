"""An SMS survey through the running stack, served over real HTTP: the event becomes an SMS sent
through Twilio (a local server that enforces Twilio's contract), with its segments recorded;
Twilio's signed status callback becomes a ``delivered`` receipt; the customer's STOP reply becomes
an opt-out on ``kaiku.optouts`` and the pending reminder is cancelled."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import uvicorn
from sqlalchemy import select

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.program import parse_program
from services.dispatcher.config import DispatcherSettings
from services.dispatcher.models import Send
from services.dispatcher.sms import segments
from services.embedded import free_port
from tests.conftest import read_topic
from tests.dispatcher import twilio_api
from tests.dispatcher.twilio_api import TwilioApi
from tests.support import SmtpSink, eventually, running, smtp_stack

TOKEN = "sms-" + uuid.uuid4().hex
QUESTION = {"fi": "Miten onnistuimme?", "sv": "Hur gick det?", "en": "How did we do?"}
PROGRAM = f"""
version: 1
surveys:
  - id: support-csat
    metric: csat
    question: {json.dumps(QUESTION)}
    channels: [sms]
    reminder: {{after: 1h}}
triggers:
  - {{id: solved-csat, event: ticket.solved, survey: support-csat}}
"""
PHONE = "+358401234567"


def solved() -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"solved-{uuid.uuid4().hex[:8]}",
        "source": "helpdesk://acme",
        "type": "ticket.solved",
        "time": datetime.now(UTC).isoformat(),
        "data": {
            "customer": {"id": "texter", "phone": PHONE, "locale": "fi", "timezone": "UTC"},
            "channel": "sms",
        },
    }


async def test_sms_sent_through_twilio_delivered_then_stopped(
    kafka: KafkaSettings,
    postgres: DatabaseSettings,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with TwilioApi() as twilio:
        monkeypatch.setenv("KAIKU_TWILIO_ACCOUNT_SID", twilio_api.ACCOUNT_SID)
        monkeypatch.setenv("KAIKU_TWILIO_AUTH_TOKEN", twilio_api.AUTH_TOKEN)
        monkeypatch.setenv("KAIKU_TWILIO_MESSAGING_SERVICE_SID", twilio_api.MESSAGING_SERVICE_SID)
        monkeypatch.setenv("KAIKU_TWILIO_BASE_URL", twilio.url)
        app = smtp_stack(
            kafka,
            postgres,
            parse_program(PROGRAM),
            smtp_sink,
            TOKEN,
            public_url=base,
            dispatcher=DispatcherSettings(sms_provider="twilio", poll_seconds=0.1),
        )
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
        )
        async with running(*app.apps.values()):
            serving = asyncio.create_task(server.serve())
            try:
                await eventually(lambda: server.started, timeout=10, what="the HTTP server")
                import httpx

                async with httpx.AsyncClient(base_url=base) as http:
                    r = await http.post(
                        "/v1/events", json=solved(), headers={"Authorization": f"Bearer {TOKEN}"}
                    )
                    assert r.status_code == 202, r.text
                await eventually(lambda: twilio.messages, timeout=20, what="the SMS at Twilio")
                sms = twilio.messages[0]
                assert sms["To"] == PHONE
                assert f"{base}/s/" in sms["Body"] and "STOP" in sms["Body"]
                assert sms["StatusCallback"] == f"{base}/v1/provider-events/twilio"

                sessions = app.apps["dispatcher"].state.runtime.sessions

                async def sent() -> Send | None:
                    async with sessions() as s:
                        row = (
                            await s.execute(select(Send).where(Send.kind == "invitation"))
                        ).scalar_one_or_none()
                    return row if row is not None and row.status == "sent" else None

                row = await eventually(sent, timeout=10, what="the send recorded")
                # What was recorded is what Twilio received, counted per GSM 03.38.
                assert (row.sms_encoding, row.sms_segments) == segments(sms["Body"])
                assert row.sms_encoding == "GSM-7"  # ä and ö are in the GSM-7 alphabet

                r = await twilio.status_callback(sms["sid"], "delivered")
                assert r.status_code == 200, r.text
                r = await twilio.incoming(f"{base}/v1/provider-events/twilio", PHONE, "stop")
                assert r.status_code == 200, r.text
                assert r.headers["content-type"].startswith("text/xml")

                # The STOP reply is a receipt of the last SMS to that number too: published
                # after the delivery receipt (receipts go out in the order they arrived).
                deliveries = await read_topic(kafka, events.DELIVERIES, expect=3, timeout=20)
                statuses = [json.loads(m.value)["status"] for m in deliveries]  # type: ignore[attr-defined]
                assert statuses == ["sent", "delivered", "opted_out"]
                optouts = await read_topic(kafka, events.OPTOUTS, expect=1, timeout=20)
                optout = json.loads(optouts[0].value)  # type: ignore[attr-defined]
                assert (optout["customer_id"], optout["channel"], optout["reason"]) == (
                    "texter",
                    "sms",
                    "stop",
                )

                async def reminder_cancelled() -> bool:
                    async with sessions() as s:
                        status = (
                            await s.execute(select(Send.status).where(Send.kind == "reminder"))
                        ).scalar_one_or_none()
                    return status == "cancelled"

                await eventually(reminder_cancelled, timeout=10, what="the reminder cancelled")
            finally:
                server.should_exit = True
                await serving
