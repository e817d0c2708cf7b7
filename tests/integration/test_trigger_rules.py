"""Trigger rules through the real broker and PostgreSQL: cancel-on-reopen before the delay
expires (no email), coalescing (one email, about the latest case), conditions, sampling and
priority (read from what was published and from the decision ledger)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.program import Program, parse_program
from services.dispatcher.models import Send
from services.embedded import EmbeddedApp
from services.trigger.models import Decision
from tests.conftest import read_topic
from tests.support import SmtpSink, client, eventually, running, smtp_stack

TOKEN = "rules-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = {"fi": "Kysymys?", "sv": "Fråga?", "en": "Question?"}

PROGRAM = f"""
version: 1
surveys:
  - {{id: support-csat, metric: csat, question: {json.dumps(QUESTION)}}}
  - {{id: relationship-nps, metric: nps, question: {json.dumps(QUESTION)}}}
triggers:
  - id: solved-csat
    event: ticket.solved
    survey: support-csat
    delay: 2s
    cancel_on: [ticket.reopened]
    coalesce: 2d
    when:
      all:
        - {{field: data.attributes.priority, not_in: [spam]}}
        - any:
          - {{field: data.team, eq: billing}}
          - {{field: data.touchpoint, matches: "^support"}}
  - {{id: delivered-nps, event: order.delivered, survey: relationship-nps, priority: 10}}
  - {{id: delivered-csat, event: order.delivered, survey: support-csat, priority: 1}}
  - {{id: churned-nps, event: customer.churned, survey: relationship-nps, sample: 0.5}}
"""


def program() -> Program:
    return parse_program(PROGRAM)


def stack(kafka: KafkaSettings, db: DatabaseSettings, sink: SmtpSink) -> EmbeddedApp:
    return smtp_stack(kafka, db, program(), sink, TOKEN)


def ticket(kind: str, customer: str, case: str, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{kind}-{case}-{uuid.uuid4().hex[:6]}",
        "source": "helpdesk://acme",
        "type": kind,
        "time": datetime.now(UTC).isoformat(),
        "data": {
            "customer": {"id": customer, "email": f"{customer}@example.com"},
            "team": "billing",
            "case_id": case,
            **data,
        },
    }


async def test_reopened_ticket_cancels_the_pending_survey_before_it_is_sent(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink
) -> None:
    app = stack(kafka, postgres, smtp_sink)
    async with running(*app.apps.values()), client(app) as http:
        solved = ticket("ticket.solved", "cust-reopen", "T-1")
        control = ticket("ticket.solved", "cust-control", "T-2")
        r = await http.post("/v1/events", json=[solved, control], headers=AUTH)
        assert r.status_code == 202
        reopened = ticket("ticket.reopened", "cust-reopen", "T-1")
        assert (await http.post("/v1/events", json=reopened, headers=AUTH)).status_code == 202

        # The control customer's survey arrives after its 2 s delay ...
        await eventually(smtp_sink.count, timeout=20, what="the control customer's email")
        await eventually(lambda: _sends_settled(app), timeout=10, what="all sends settled")
        # ... and the reopened ticket's never does.
        assert [env[1] for env in smtp_sink.envelopes] == [["cust-control@example.com"]]
        sessions = app.apps["dispatcher"].state.runtime.sessions
        async with sessions() as s:
            statuses = dict((await s.execute(select(Send.customer_id, Send.status))).all())
        assert statuses == {"cust-reopen": "cancelled", "cust-control": "sent"}
        ledger = await _decisions(app, "cust-reopen")
        assert ("cancelled", "cancel_on:ticket.reopened") in ledger


async def _sends_settled(app: EmbeddedApp) -> bool:
    sessions = app.apps["dispatcher"].state.runtime.sessions
    async with sessions() as s:
        rows = (await s.execute(select(Send.status))).scalars().all()
    return len(rows) == 2 and "pending" not in rows and "sending" not in rows


async def _decisions(app: EmbeddedApp, customer: str) -> list[tuple[str, str]]:
    sessions = app.apps["trigger"].state.runtime.sessions
    async with sessions() as s:
        rows = await s.execute(
            select(Decision.decision, Decision.reason)
            .where(Decision.customer_id == customer)
            .order_by(Decision.id)
        )
        return [(d, r) for d, r in rows.all()]


async def test_three_tickets_solved_give_one_survey_about_the_latest(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink
) -> None:
    app = stack(kafka, postgres, smtp_sink)
    async with running(*app.apps.values()), client(app) as http:
        for case in ("A", "B", "C"):  # one request each, as a helpdesk would send them
            r = await http.post(
                "/v1/events", json=ticket("ticket.solved", "cust-many", case), headers=AUTH
            )
            assert r.status_code == 202
        await eventually(smtp_sink.count, timeout=20, what="the coalesced email")
        invitations = await read_topic(kafka, events.INVITATIONS, expect=5, timeout=8)
        # A later ticket within the window, after the survey went out: skipped, saying when the
        # customer may be surveyed again.
        await http.post("/v1/events", json=ticket("ticket.solved", "cust-many", "D"), headers=AUTH)
        await eventually(
            lambda: _has(app, "cust-many", ("skipped", "coalesced")),
            what="the coalesced skip in the ledger",
        )
    assert smtp_sink.count() == 1
    messages = [json.loads(r.value) for r in invitations]  # type: ignore[attr-defined]
    requested = {m["invitation_id"]: m for m in messages if m["type"] == "invitation.requested"}
    cancelled = {m["invitation_id"] for m in messages if m["type"] == "invitation.cancelled"}
    alive = [m for i, m in requested.items() if i not in cancelled]
    assert len(requested) == 3
    assert len(cancelled) == 2
    assert [m["context"]["case_id"] for m in alive] == ["C"]


async def _has(app: EmbeddedApp, customer: str, decision: tuple[str, str]) -> bool:
    return decision in await _decisions(app, customer)


async def test_conditions_sampling_and_priority(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink
) -> None:
    app = stack(kafka, postgres, smtp_sink)
    async with running(app.apps["trigger"]), client(app) as http:
        batch = [
            ticket("ticket.solved", "c-spam", "S1", attributes={"priority": "spam"}),
            ticket("ticket.solved", "c-sales", "S2", team="sales"),
            ticket("ticket.solved", "c-support", "S3", team="sales", touchpoint="support-chat"),
            {**ticket("order.delivered", "c-order", "O1")},
        ] + [ticket("customer.churned", f"c-{i}", f"X{i}") for i in range(40)]
        assert (await http.post("/v1/events", json=batch, headers=AUTH)).status_code == 202
        again = [ticket("customer.churned", f"c-{i}", f"Y{i}") for i in range(40)]
        assert (await http.post("/v1/events", json=again, headers=AUTH)).status_code == 202

        async def ledger_complete() -> bool:
            sessions = app.apps["trigger"].state.runtime.sessions
            async with sessions() as s:
                return len((await s.execute(select(Decision.id))).all()) >= 85

        await eventually(ledger_complete, what="every decision in the ledger")

    assert await _decisions(app, "c-spam") == [("skipped", "conditions_not_met")]
    assert await _decisions(app, "c-sales") == [("skipped", "conditions_not_met")]
    assert await _decisions(app, "c-support") == [("invited", "trigger_matched")]
    assert sorted(await _decisions(app, "c-order")) == [
        ("invited", "trigger_matched"),
        ("skipped", "lower_priority"),
    ]
    sampled = [await _decisions(app, f"c-{i}") for i in range(40)]
    ins = [d for d in sampled if d[0] == ("invited", "trigger_matched")]
    # Stable: each customer is in (or out) both times; and roughly half are in.
    assert all(len(set(d)) == 1 for d in sampled), sampled
    assert 8 <= len(ins) <= 32
    invitations = await read_topic(kafka, events.INVITATIONS, expect=2 + 2 * len(ins), timeout=8)
    surveys = {
        (json.loads(r.value)["customer"]["id"], json.loads(r.value)["survey_id"])  # type: ignore[attr-defined]
        for r in invitations
    }
    assert ("c-order", "relationship-nps") in surveys
    assert ("c-order", "support-csat") not in surveys
