"""Suppression and quotas through the real broker: an unhappy answer starts a cool-down, an
unsubscribe suppresses the contact point, and a daily quota caps a survey. The answers and the
opt-outs travel from the collector to the trigger over kaiku.responses and kaiku.optouts."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from services.common.config import DatabaseSettings, KafkaSettings
from services.common.program import parse_program
from tests.support import SmtpSink, client, eventually, running, smtp_stack, survey_link

TOKEN = "supp-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Q = '{en: "Q?", fi: "K?", sv: "F?"}'
PROGRAM = f"""
version: 1
surveys:
  - {{id: support-csat, metric: csat, question: {Q}}}
  - {{id: relationship-nps, metric: nps, question: {Q}}}
triggers:
  - {{id: solved, event: ticket.solved, survey: support-csat}}
  - {{id: delivered, event: order.delivered, survey: relationship-nps}}
suppression:
  detractor_cooldown: 90d
  excluded_domains: [competitor.example]
quotas:
  - {{survey: relationship-nps, per: day, limit: 2}}
"""


def event(kind: str, customer: str, email: str | None = None) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{kind}-{uuid.uuid4().hex[:8]}",
        "source": "crm://s",
        "type": kind,
        "time": datetime.now(UTC).isoformat(),
        "data": {"customer": {"id": customer, "email": email or f"{customer}@example.com"}},
    }


async def test_cooldown_optout_domain_and_quota(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink
) -> None:
    program = parse_program(PROGRAM)
    app = smtp_stack(kafka, postgres, program, smtp_sink, TOKEN)

    async def post(*batch: dict[str, Any]) -> None:
        r = await http.post("/v1/events", json=list(batch), headers=AUTH)
        assert r.status_code == 202, r.text

    async def latest(customer: str) -> tuple[str, str] | None:
        r = await http.get(f"/v1/customers/{customer}/decisions", headers=AUTH)
        rows = r.json()["decisions"]
        return (rows[0]["decision"], rows[0]["reason"]) if rows else None

    def email_to(address: str) -> Any:
        return next((m for m in smtp_sink.messages if m["To"] == address), None)

    async def page_ready(path: str) -> bool:
        return (await http.get(path)).status_code == 200

    async with running(*app.apps.values()), client(app, "http://kaiku.test") as http:
        await post(
            event("ticket.solved", "unhappy"),
            event("ticket.solved", "leaver"),
            event("ticket.solved", "rival", "boss@competitor.example"),
        )
        grumpy = await eventually(lambda: email_to("unhappy@example.com"), what="email 1")
        leaver = await eventually(lambda: email_to("leaver@example.com"), what="email 2")
        assert await eventually(lambda: latest("rival"), what="the rival's decision") == (
            "skipped",
            "suppressed:excluded_domain",
        )

        # An unhappy answer (csat 1) ...
        path = urlsplit(survey_link(grumpy)).path
        await eventually(lambda: page_ready(path), what="the survey page")
        assert (await http.post(path, data={"score": "1"})).status_code == 303
        # ... and a one-click unsubscribe.
        unsubscribe = re.search(r"<([^>]+/u/[^>]+)>", leaver["List-Unsubscribe"])
        assert unsubscribe
        upath = urlsplit(unsubscribe.group(1)).path
        await eventually(lambda: page_ready(upath), what="the unsubscribe page")
        r = await http.post(
            upath,
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 200

        async def suppressed(customer: str, reason: str) -> bool:
            await post(event("ticket.solved", customer))
            return await eventually(lambda: latest(customer), what=customer) == (
                "skipped",
                f"suppressed:{reason}",
            )

        # The trigger hears of both through Kafka; until it has, the next survey would go out,
        # so keep sending events until it says "suppressed" (each is a new event).
        await eventually(
            lambda: suppressed("unhappy", "detractor_cooldown"),
            timeout=30,
            what="the cool-down after an unhappy answer",
        )
        await eventually(lambda: suppressed("leaver", "opted_out"), timeout=30, what="the opt-out")

        # The quota: 2 relationship surveys a day. "unhappy" and "leaver" were suppressed before
        # reserving; the first attempts that got through may have used some of the quota.
        for n in range(3):
            await post(event("order.delivered", f"quota-{n}"))
        decisions = [
            await eventually(lambda c=f"quota-{n}": latest(c), what=f"quota-{n}") for n in range(3)
        ]
        assert ("skipped", "quota:relationship-nps:day") in decisions
    nps_invited = sum(
        1
        for m in smtp_sink.messages
        if m["To"] not in ("unhappy@example.com", "leaver@example.com") or "Q?" in str(m)
    )
    assert nps_invited >= 2
