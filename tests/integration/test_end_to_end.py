"""One survey end to end through the real broker: event → email → page → answer → score."""

from __future__ import annotations

import json
import re
import uuid
from urllib.parse import urlsplit

import httpx

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings, LinkSettings
from services.common.program import Program
from services.common.tokens import LinkKeys
from services.embedded import EmbeddedApp
from tests.conftest import read_topic
from tests.support import SmtpSink, client, eventually, html_part, running, smtp_stack, survey_link

TOKEN = "test-token-" + uuid.uuid4().hex
PUBLIC = "http://kaiku.test"


def stack(
    kafka: KafkaSettings, database: DatabaseSettings, program: Program, sink: SmtpSink
) -> EmbeddedApp:
    return smtp_stack(kafka, database, program, sink, TOKEN, PUBLIC)


def order_delivered(customer: str = "cust-4411") -> dict[str, object]:
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


async def test_event_to_email_to_answer_to_score(
    kafka: KafkaSettings, database: DatabaseSettings, program: Program, smtp_sink: SmtpSink
) -> None:
    app = stack(kafka, database, program, smtp_sink)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with running(*app.apps.values()), client(app, PUBLIC) as http:
        event = order_delivered()
        posted = await http.post("/v1/events", json=event, headers=auth)
        assert posted.status_code == 202, posted.text
        assert posted.json() == {"accepted": [event["id"]]}

        await eventually(smtp_sink.count, what="the invitation email at the SMTP server")
        msg = smtp_sink.messages[0]
        assert smtp_sink.envelopes[0][1] == ["aino@example.fi"]
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert "/u/" in msg["List-Unsubscribe"]
        link = survey_link(msg)
        assert link.startswith(f"{PUBLIC}/s/")
        token = urlsplit(link).path.rsplit("/", 1)[1]
        assert len(token) <= 32
        # The Finnish question and the eleven NPS score buttons are in the email.
        html = html_part(msg)
        assert "suosittelisit" in html
        for n in range(11):
            assert f"/s/{token}?score={n}" in html

        # A score button in the email only pre-selects: nothing is recorded by a GET.
        # The collector learns of the invitation from kaiku.invitations, in parallel with the
        # dispatcher: give it the moment a person would take to open the email.
        async def page_served() -> httpx.Response | None:
            page = await http.get(f"/s/{token}?score=9")
            return page if page.status_code == 200 else None

        page = await eventually(page_served, timeout=10, what="the survey page")
        assert re.search(r'value="9" id="score-9" checked', page.text), "score 9 not selected"
        assert len(re.findall(r"<input[^>]* checked", page.text)) == 1
        scores = await http.get("/v1/scores", params={"survey": "relationship-nps"}, headers=auth)
        assert scores.json()["rows"][0]["n"] == 0

        answer = await http.post(
            f"/s/{token}", data={"score": "9", "comment": "Nopea toimitus"}, follow_redirects=False
        )
        assert answer.status_code == 303
        thanks = await http.get(answer.headers["location"])
        assert thanks.status_code == 200

        scores = await http.get("/v1/scores", params={"survey": "relationship-nps"}, headers=auth)
        assert scores.status_code == 200
        (body,) = scores.json()["rows"]
        assert (body["metric"], body["n"], body["value"]) == ("nps", 1, 100.0)
        assert body["promoters"] == 1 and body["low_n"] is True
        assert (body["responses"], body["suspected_bots"]) == (1, 0)

        async def response_rate() -> float | None:
            r = await http.get("/v1/scores", params={"survey": "relationship-nps"}, headers=auth)
            return r.json()["rows"][0]["response_rate"]  # type: ignore[no-any-return]

        # One answer to one delivered invitation (the delivery report comes on its own topic).
        assert await eventually(response_rate, what="the delivery in the response rate") == 1.0

        # The answer and the delivery went out on their topics, keyed by customer.
        responses = await read_topic(kafka, events.RESPONSES, expect=1)
        assert len(responses) == 1
        published = json.loads(responses[0].value)  # type: ignore[attr-defined]
        assert (published["score"], published["survey_id"]) == (9, "relationship-nps")
        assert responses[0].key == b"cust-4411"  # type: ignore[attr-defined]
        deliveries = await read_topic(kafka, events.DELIVERIES, expect=1)
        assert json.loads(deliveries[0].value)["status"] == "sent"  # type: ignore[attr-defined]

        # Changing the answer: the last one counts, still one answer.
        await http.post(f"/s/{token}", data={"score": "3"})
        scores = await http.get("/v1/scores", params={"survey": "relationship-nps"}, headers=auth)
        (body,) = scores.json()["rows"]
        assert (body["n"], body["value"], body["detractors"]) == (1, -100.0, 1)
    assert smtp_sink.count() == 1


async def test_unsubscribe_by_page_and_one_click_and_bad_links(
    kafka: KafkaSettings, postgres: DatabaseSettings, program: Program, smtp_sink: SmtpSink
) -> None:
    app = stack(kafka, postgres, program, smtp_sink)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with running(*app.apps.values()), client(app, PUBLIC) as http:
        event = order_delivered("cust-unsub")
        assert (await http.post("/v1/events", json=event, headers=auth)).status_code == 202
        await eventually(smtp_sink.count, what="the invitation email")
        msg = smtp_sink.messages[0]
        unsubscribe = re.search(r"<([^>]+/u/[^>]+)>", msg["List-Unsubscribe"])
        assert unsubscribe
        path = urlsplit(unsubscribe.group(1)).path
        token = path.rsplit("/", 1)[1]

        async def page() -> httpx.Response | None:
            r = await http.get(path)
            return r if r.status_code == 200 else None

        confirm = await eventually(page, timeout=10, what="the unsubscribe page")
        assert "Peru kyselyt" in confirm.text  # Finnish, the invitation's language
        assert f'action="/u/{token}"' in confirm.text
        # A mail client's RFC 8058 one-click POST, then the person's own click: one opt-out.
        one_click = await http.post(
            path,
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert one_click.status_code == 200
        again = await http.post(path, data={"confirm": "1", "locale": "sv"})
        assert again.status_code == 200
        assert "Enkäterna avslutade" in again.text
        assert "Kyselyt peruttu" in (await http.get(path)).text

        optouts = await read_topic(kafka, events.OPTOUTS, expect=2, timeout=5)
        assert len(optouts) == 1
        optout = json.loads(optouts[0].value)  # type: ignore[attr-defined]
        assert (optout["customer_id"], optout["channel"], optout["source"]) == (
            "cust-unsub",
            "email",
            "one_click",
        )

        # Damaged or forged links get a clear page (400), unknown ones 404; never a server error.
        tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
        unknown = LinkKeys.parse(LinkSettings().link_keys).issue()  # signed, never sent
        for bad, status, text in (
            (f"/s/{tampered}", 400, "This link is damaged"),
            (f"/u/{tampered}", 400, "This link is damaged"),
            ("/s/not-a-token", 400, "This link is damaged"),
            (f"/s/{token}x", 400, "This link is damaged"),
            (f"/s/{unknown}", 404, "We could not find this survey"),
        ):
            r = await http.get(bad, headers={"Accept-Language": "en"})
            assert (r.status_code, "text/html" in r.headers["content-type"]) == (status, True), bad
            assert text in r.text, bad
        finnish = await http.get(f"/s/{tampered}", headers={"Accept-Language": "fi-FI,fi;q=0.9"})
        assert "Linkki on vaurioitunut" in finnish.text
        assert (await http.post(f"/s/{tampered}", data={"score": "9"})).status_code == 400
        scores = await http.get("/v1/scores", params={"survey": "relationship-nps"}, headers=auth)
        assert scores.json()["rows"][0]["n"] == 0
