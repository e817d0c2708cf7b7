"""Close the loop end to end, on the real broker and PostgreSQL: an unhappy answer is marked for
follow-up and posted, signed, to the program's webhook (a real local HTTP server that answers
503 first): it arrives exactly once, the retry carrying the same webhook-id; the follow-up is
then recorded through the API."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response as HttpResponse

from services.collector.config import CollectorSettings
from services.collector.models import AlertDelivery
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.db import unit_of_work
from services.common.program import Program
from services.common.webhooks import (
    WebhookError,
    WebhookRequest,
    standard_secret_key,
    verify_standard,
)
from tests.conftest import ROOT
from tests.support import SmtpSink, client, eventually, running, smtp_stack, survey_link
from tests.vendor_api import LocalApi

TOKEN = "test-token-" + uuid.uuid4().hex
PUBLIC = "http://kaiku.test"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Receiver:
    """The CRM's webhook endpoint: checks the signature, answers 503 to the first request."""

    api: LocalApi = field(default_factory=LocalApi)
    seen: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.api.url}/kaiku-alerts?tenant=acme"

    def handle(self, request: Request, body: bytes) -> HttpResponse:
        try:
            verify_standard(
                WebhookRequest("POST", self.url, request.headers, body, datetime.now(UTC)),
                standard_secret_key(SECRET),
                tolerance=300,
            )
            status = 503 if not self.seen else 200
        except WebhookError:
            status = 401
        self.seen.append((status, dict(request.headers), body))
        return HttpResponse(status_code=status)

    def delivered(self) -> list[tuple[int, dict[str, str], bytes]]:
        return [s for s in self.seen if s[0] == 200]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()

    @r.api.route("POST", "/kaiku-alerts")
    async def hook(request: Request) -> HttpResponse:
        return r.handle(request, await request.body())

    with r.api:
        yield r


def alerting_program(url: str) -> Program:
    raw = yaml.safe_load((ROOT / "deploy/local/program.yaml").read_text())
    raw["alerts"] = {
        "rules": [
            {"id": "nps-detractor", "survey": "relationship-nps", "score_at_most": 6},
            {"id": "angry-words", "comment_contains": ["huono", "terrible"]},
        ],
        "webhooks": [{"url": url, "secret_env": "KAIKU_ALERT_SECRET_CRM"}],
    }
    return Program.model_validate(raw)


def order_delivered(customer: str) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"ord-{uuid.uuid4().hex[:8]}",
        "source": "shop://acme",
        "type": "order.delivered",
        "time": "2026-11-20T14:03:00Z",
        "subject": customer,
        "data": {
            "customer": {
                "id": customer,
                "email": "aino@example.fi",
                "locale": "fi",
                "timezone": "Europe/Helsinki",
                "account_id": "acct-77",
            },
            "touchpoint": "delivery",
            "team": "logistics",
        },
    }


async def test_an_unhappy_answer_alerts_once_and_is_followed_up(
    kafka: KafkaSettings,
    postgres: DatabaseSettings,
    smtp_sink: SmtpSink,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAIKU_ALERT_SECRET_CRM", SECRET)
    collector = CollectorSettings(
        bot_min_seconds=0,
        trap_window_seconds=1,  # how long an alert waits for a late trap-link hit
        alert_retry_base_seconds=0.2,
        alert_poll_seconds=0.1,
    )
    app = smtp_stack(
        kafka,
        postgres,
        alerting_program(receiver.url),
        smtp_sink,
        TOKEN,
        PUBLIC,
        collector=collector,
    )
    sessions = app.apps["collector"].state.runtime.sessions

    async def alert_rows() -> list[AlertDelivery]:
        async with unit_of_work(sessions) as session:
            return list((await session.execute(select(AlertDelivery))).scalars())

    async with running(*app.apps.values()), client(app, PUBLIC) as http:
        posted = await http.post("/v1/events", json=order_delivered("cust-5150"), headers=AUTH)
        assert posted.status_code == 202, posted.text
        await eventually(smtp_sink.count, what="the invitation email at the SMTP server")
        token = urlsplit(survey_link(smtp_sink.messages[0])).path.rsplit("/", 1)[1]

        async def page_served(token: str) -> httpx.Response | None:
            page = await http.get(f"/s/{token}")
            return page if page.status_code == 200 else None

        await eventually(lambda: page_served(token), timeout=10, what="the survey page")
        answer = await http.post(
            f"/s/{token}", data={"score": "3", "comment": "Huono toimitus"}, follow_redirects=False
        )
        assert answer.status_code == 303

        # 503 first, then 200: delivered once, the retry with the same webhook-id.
        await eventually(receiver.delivered, what="the alert at the CRM's webhook")
        assert [s[0] for s in receiver.seen] == [503, 200]
        ids = {s[1]["webhook-id"] for s in receiver.seen}

        async def recorded() -> list[AlertDelivery]:  # the 200 is seen before it is recorded
            return [d for d in await alert_rows() if d.status == "delivered"]

        [delivery] = await eventually(recorded, what="the delivery recorded as delivered")
        assert ids == {str(delivery.id)}
        assert (delivery.status, delivery.attempts) == ("delivered", 2)
        body = json.loads(receiver.seen[-1][2])
        assert body["type"] == "response.alert"
        data = body["data"]
        assert (data["survey"], data["metric"], data["score"]) == ("relationship-nps", "nps", 3)
        assert (data["comment"], data["locale"]) == ("Huono toimitus", "fi")
        assert data["rules"] == ["nps-detractor", "angry-words"]
        assert data["customer_id"] == "cust-5150"
        assert data["segments"]["team"] == "logistics"
        assert data["segments"]["account_id"] == "acct-77"

        # The answer waits for follow-up.
        listed = await http.get("/v1/responses", params={"alerted": "true"}, headers=AUTH)
        assert listed.status_code == 200, listed.text
        [item] = listed.json()["items"]
        assert item["response_id"] == data["response_id"]
        assert item["followup"]["status"] == "open"
        assert item["followup"]["alert_rules"] == ["nps-detractor", "angry-words"]
        assert item["followup"]["alerted_at"] is not None

        # Changed, still unhappy: the same rules do not alert again (stored in the answer's
        # own transaction, so there is nothing more to wait for than the POST).
        again = await http.post(
            f"/s/{token}", data={"score": "2", "comment": "Huono"}, follow_redirects=False
        )
        assert again.status_code == 303
        assert len(await alert_rows()) == 1
        await asyncio.sleep(0.5)  # several rounds of the sender
        assert len(receiver.seen) == 2

        # Someone calls the customer.
        patched = await http.patch(
            f"/v1/responses/{item['response_id']}",
            json={"status": "contacted", "note": "Soitettu, uusi toimitus sovittu"},
            headers=AUTH,
        )
        assert patched.status_code == 200, patched.text
        followup = patched.json()["followup"]
        assert followup["status"] == "contacted" and followup["contacted_at"] is not None
        assert followup["note"] == "Soitettu, uusi toimitus sovittu"
        open_ones = await http.get("/v1/responses", params={"status": "open"}, headers=AUTH)
        assert open_ones.json()["items"] == []

        exported = await http.get("/v1/responses.csv", params={"alerted": "true"}, headers=AUTH)
        assert exported.status_code == 200
        lines = exported.text.strip().split("\r\n")
        assert len(lines) == 2 and "contacted" in lines[1] and "Huono" in lines[1]

        # A link scanner that POSTs a detractor's score and only then follows the hidden trap
        # link: its answer is re-marked a suspected bot within the trap window, and its alert,
        # waiting out that window, is withdrawn: the CRM never hears of it.
        posted = await http.post("/v1/events", json=order_delivered("cust-6160"), headers=AUTH)
        assert posted.status_code == 202, posted.text
        await eventually(lambda: smtp_sink.count() == 2, what="the second invitation email")
        scanned = urlsplit(survey_link(smtp_sink.messages[1])).path.rsplit("/", 1)[1]
        await eventually(lambda: page_served(scanned), timeout=10, what="the second page")
        bot = await http.post(f"/s/{scanned}", data={"score": "0"}, follow_redirects=False)
        assert bot.status_code == 303
        assert (await http.get(f"/s/{scanned}/trap")).status_code == 200

        async def withdrawn() -> list[AlertDelivery]:
            return [d for d in await alert_rows() if d.status == "withdrawn"]

        [pulled] = await eventually(withdrawn, what="the scanner's alert withdrawn")
        assert pulled.last_error == "the answer is a suspected bot: trap"
        assert pulled.attempts == 0 and len(receiver.seen) == 2

        metrics = (await http.get("/collector/metrics")).text
        assert 'kaiku_alert_webhooks_total{outcome="delivered"}' in metrics
        assert 'kaiku_alert_webhooks_total{outcome="withdrawn"}' in metrics
