"""Erasure end to end, through the real broker, PostgreSQL and an SMTP sink: after
``DELETE /v1/customers/{id}`` no table of any service holds the customer's id, addresses, phone
number or comment; the pending invitation is cancelled and never sent; the answer still counts;
the survey link no longer resolves; and the opt-out, kept as a salted hash, still suppresses the
address for a new customer id."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import func, select

from services.collector.models import Base as CollectorBase
from services.collector.models import ScoreCell
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.program import parse_program
from services.dispatcher.models import Base as DispatcherBase
from services.dispatcher.models import Send
from services.trigger.models import Base as TriggerBase
from services.trigger.models import Invitation, OptOut
from tests.pii import tables_holding
from tests.support import SmtpSink, client, eventually, running, smtp_stack, survey_link

TOKEN = "erasure-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = {"fi": "Kysymys?", "sv": "Fråga?", "en": "Question?"}
PROGRAM = f"""
version: 1
surveys:
  - {{id: relationship-nps, metric: nps, question: {json.dumps(QUESTION)}}}
  - {{id: support-csat, metric: csat, question: {json.dumps(QUESTION)}}}
triggers:
  - {{id: delivered-nps, event: order.delivered, survey: relationship-nps}}
  - {{id: solved-csat, event: ticket.solved, survey: support-csat, delay: 2h}}
"""


def event(kind: str, customer: str, email: str, case: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "customer": {
            "id": customer,
            "email": email,
            "phone": "+358401239876",
            "locale": "fi",
            "timezone": "Europe/Helsinki",
        },
        "team": "billing",
    }
    if case:
        data["case_id"] = case
    return {
        "specversion": "1.0",
        "id": f"ev-{uuid.uuid4().hex[:10]}",
        "source": "shop://acme",
        "type": kind,
        "time": datetime.now(UTC).isoformat(),
        "data": data,
    }


def counted(body: dict[str, Any]) -> int:
    """n of a /v1/scores answer (a single score, or rows of them)."""
    if "rows" in body:
        return sum(int(r["n"]) for r in body["rows"])
    return int(body["n"])


async def test_erasure_across_the_three_services(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink
) -> None:
    tag = uuid.uuid4().hex[:8]
    customer = f"zz-erase-me-{tag}"
    email, second = f"Aino.Zz{tag}@Example.fi", f"aino.work.zz{tag}@example.org"
    comment = f"zz secret comment {tag}"
    app = smtp_stack(kafka, postgres, parse_program(PROGRAM), smtp_sink, TOKEN)
    state = {name: a.state.runtime for name, a in app.apps.items()}
    metadata = {
        "trigger": TriggerBase.metadata,
        "dispatcher": DispatcherBase.metadata,
        "collector": CollectorBase.metadata,
    }

    async def scalar(service: str, stmt: Any) -> Any:
        async with state[service].sessions() as s:
            return (await s.execute(stmt)).scalar()

    async with running(*app.apps.values()), client(app) as http:
        # The customer is invited, and a second survey (to their other address) waits two hours.
        posted = await http.post(
            "/v1/events", json=event("order.delivered", customer, email), headers=AUTH
        )
        assert posted.status_code == 202, posted.text
        await eventually(smtp_sink.count, what="the invitation email")
        assert [r.lower() for r in smtp_sink.envelopes[0][1]] == [email.lower()]
        path = survey_link(smtp_sink.messages[0]).split("kaiku.test", 1)[1]
        token = path.rsplit("/", 1)[1]
        later = event("ticket.solved", customer, second, case=f"case-zz-{tag}")
        assert (await http.post("/v1/events", json=later, headers=AUTH)).status_code == 202
        pending = select(Send).where(Send.contact == second, Send.status == "pending")
        await eventually(lambda: scalar("dispatcher", pending), what="the pending second send")

        # The customer answers with a comment, then unsubscribes with the mail client's one-click.
        async def page() -> httpx.Response | None:
            r = await http.get(path)
            return r if r.status_code == 200 else None

        await eventually(page, timeout=10, what="the survey page")
        answer = await http.post(path, data={"score": "3", "comment": comment})
        assert answer.status_code == 303, answer.text
        one_click = await http.post(
            f"/u/{token}",
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert one_click.status_code == 200
        # Wait until the trigger has taken the answer and the opt-out (they travel on other
        # topics than the erasure, so an answer still in flight could arrive after it).
        answered = select(Invitation.responded_at).where(Invitation.responded_at.is_not(None))
        await eventually(lambda: scalar("trigger", answered), what="the trigger to see the answer")
        await eventually(lambda: scalar("trigger", select(OptOut.id)), what="the opt-out")
        scores = await http.get("/v1/scores", params={"survey": "relationship-nps"}, headers=AUTH)
        assert counted(scores.json()) == 1

        erased = await http.delete(f"/v1/customers/{customer}", headers=AUTH)
        assert erased.status_code == 202, erased.text
        assert uuid.UUID(erased.json()["erasure_id"])
        assert (await http.delete(f"/v1/customers/{customer}", headers=AUTH)).status_code == 202
        unauthorized = await http.delete(f"/v1/customers/{customer}")
        assert unauthorized.status_code == 401

        # Eventually no table of any service holds the customer.
        needles = [customer, email, second, "+358401239876", comment, f"case-zz-{tag}"]

        async def everywhere() -> dict[str, Any]:
            found = {}
            for name, meta in metadata.items():
                held = await tables_holding(state[name].sessions, meta, needles)
                if held:
                    found[name] = held
            return found

        async def forgotten() -> bool:
            return await everywhere() == {}

        try:
            await eventually(forgotten, timeout=20, what="every service to forget the customer")
        except AssertionError:
            raise AssertionError(f"still held: {await everywhere()}") from None

        # The pending send is cancelled for the erasure (it had not been sent).
        async with state["dispatcher"].sessions() as s:
            sends = (await s.execute(select(Send))).scalars().all()
        assert sorted((x.survey_id, x.status) for x in sends) == [
            ("relationship-nps", "sent"),
            ("support-csat", "cancelled"),
        ]
        assert [x.reason for x in sends if x.survey_id == "support-csat"] == ["cancelled: erased"]
        # The answer still counts; the link no longer resolves.
        scores = await http.get("/v1/scores", params={"survey": "relationship-nps"}, headers=AUTH)
        assert counted(scores.json()) == 1
        cells = select(func.sum(ScoreCell.n)).where(ScoreCell.survey_id == "relationship-nps")
        assert await scalar("collector", cells) == 1
        assert (await http.get(path)).status_code == 404
        assert (await http.post(path, data={"score": "9"})).status_code == 404

        # A new customer id with the erased customer's address: suppressed by the hashed
        # opt-out, and the ledger says why.
        newcomer = f"zz-newcomer-{tag}"
        again = event("order.delivered", newcomer, email.upper())
        assert (await http.post("/v1/events", json=again, headers=AUTH)).status_code == 202

        async def ledger() -> list[dict[str, Any]] | None:
            r = await http.get(f"/v1/customers/{newcomer}/decisions", headers=AUTH)
            return r.json()["decisions"] or None

        decisions = await eventually(ledger, what="the newcomer's decision")
        assert [(d["decision"], d["reason"]) for d in decisions] == [
            ("skipped", "suppressed:opted_out")
        ]
        erased_ledger = await http.get(f"/v1/customers/{customer}/decisions", headers=AUTH)
        assert erased_ledger.json()["decisions"] == []
        await asyncio.sleep(1.0)  # give a wrong send the time to arrive
    assert smtp_sink.count() == 1
    assert [[r.lower() for r in rcpt] for _, rcpt in smtp_sink.envelopes] == [[email.lower()]]
