"""Fatigue limits are exact under concurrency: four trigger workers in one consumer group, events
for the same accounts on different partitions at once, and no customer or account ever gets more
surveys than its limits allow, checked against what was actually published. Also: deferral,
quiet hours and the decision ledger API through the real broker."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from sqlalchemy import func, select

from services.common import events
from services.common.config import DatabaseSettings, HttpSettings, KafkaSettings
from services.common.kafka import Outgoing, ensure_topics
from services.common.program import parse_program
from services.common.settings import CommonSettings
from services.trigger.app import create_app
from services.trigger.models import Decision, Invitation
from tests.conftest import read_topic
from tests.support import client, eventually, running

TOKEN = "fatigue-" + uuid.uuid4().hex
QUESTION = '{en: "Q?", fi: "K?", sv: "F?"}'

PROGRAM = f"""
version: 1
defaults: {{timezone: Europe/Helsinki}}
surveys:
  - {{id: support-csat, metric: csat, question: {QUESTION}}}
  - {{id: relationship-nps, metric: nps, question: {QUESTION}}}
triggers:
  - {{id: solved-csat, event: ticket.solved, survey: support-csat}}
  - {{id: delivered-nps, event: order.delivered, survey: relationship-nps}}
fatigue:
  rules:
    - {{id: account-weekly, key: account, scope: global, channel: any, clock: invited,
       window: 7d, limit: 2, action: drop}}
    - {{id: customer-monthly, key: customer, scope: global, channel: any, clock: invited,
       window: 30d, limit: 1, action: drop}}
"""


def event(customer: str, account: str, kind: str = "ticket.solved", **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"e-{uuid.uuid4().hex}",
        "source": "crm://x",
        "type": kind,
        "time": datetime.now(UTC).isoformat(),
        "data": {
            "customer": {
                "id": customer,
                "email": f"{customer}@example.com",
                "account_id": account,
                **extra,
            }
        },
    }


def settings(kafka: KafkaSettings, db: DatabaseSettings) -> CommonSettings:
    return CommonSettings(kafka=kafka, database=db, http=HttpSettings(api_token=SecretStr(TOKEN)))


async def decision_count(app: Any) -> int:
    async with app.state.runtime.sessions() as s:
        return int((await s.execute(select(func.count()).select_from(Decision))).scalar_one())


@pytest.mark.parametrize("round_", range(2))
async def test_limits_hold_with_four_concurrent_workers(
    kafka: KafkaSettings, postgres: DatabaseSettings, round_: int
) -> None:
    program = parse_program(PROGRAM)
    await ensure_topics(kafka)
    # 12 accounts x 8 customers, 3 events per customer in shuffled order: every customer and
    # every account is contended; customers hash to different partitions than their accounts.
    batch = [
        event(
            f"c{a}-{c}-{round_}", f"acct-{a}", random.choice(["ticket.solved", "order.delivered"])
        )
        for a in range(12)
        for c in range(8)
        for _ in range(3)
    ]
    random.shuffle(batch)
    workers = [create_app(settings(kafka, postgres), program=program) for _ in range(4)]
    async with running(*workers):
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=5)
        await producer.start()
        await asyncio.gather(
            *[
                producer.send_and_wait(
                    kafka.topic(events.EVENTS),
                    json.dumps(e).encode(),
                    key=e["data"]["customer"]["id"].encode(),
                )
                for e in batch
            ]
        )
        await producer.stop()

        async def all_decided() -> bool:
            return await decision_count(workers[0]) >= len(batch)

        await eventually(all_decided, timeout=60, what="a decision for every event")
    busy = sum(1 for w in workers if w.state.runtime.loops[0].processed)
    assert busy >= 2, "the events were not spread over several workers"

    published = await read_topic(kafka, events.INVITATIONS, expect=len(batch), timeout=5)
    invitations = {}
    for record in published:  # a redelivered event re-publishes the same invitation: count once
        message = json.loads(record.value)  # type: ignore[attr-defined]
        invitations[message["invitation_id"]] = message
    per_account = Counter(m["customer"]["account_id"] for m in invitations.values())
    per_customer = Counter(m["customer"]["id"] for m in invitations.values())
    assert max(per_customer.values()) == 1  # customer-monthly: 1 in 30 days
    assert max(per_account.values()) == 2  # account-weekly: 2 in 7 days
    assert len(per_account) == 12  # and every account got its two: nothing over-dropped
    assert sum(per_account.values()) == 24


async def test_a_send_that_failed_does_not_count(
    kafka: KafkaSettings, postgres: DatabaseSettings
) -> None:
    """The dispatcher's report that an invitation bounced (on kaiku.deliveries) takes it out of
    the customer's and the account's counts: the next event surveys them. A delivered one
    still counts."""
    app = create_app(settings(kafka, postgres), program=parse_program(PROGRAM))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with running(app), client(app) as http:

        async def ledger(customer: str, n: int) -> list[dict[str, Any]] | None:
            r = await http.get(f"/v1/customers/{customer}/decisions", headers=auth)
            rows: list[dict[str, Any]] = r.json()["decisions"]
            return rows if len(rows) >= n else None

        async def invite_and_report(customer: str, status: str) -> None:
            posted = await http.post("/v1/events", json=[event(customer, customer)], headers=auth)
            assert posted.status_code == 202
            [first] = await eventually(lambda: ledger(customer, 1), what="the first decision")
            assert first["decision"] == "invited"
            report = events.DeliveryRecorded(
                invitation_id=first["invitation_id"],
                survey_id=first["survey_id"],
                customer_id=customer,
                channel="email",
                provider="smtp",
                status=status,
                reason="550 5.1.1 no such user" if status == "bounced" else None,
                occurred_at=datetime.now(UTC),
            )
            # As the dispatcher publishes it (on the trigger's own producer, already started).
            await app.state.runtime.producer.publish(
                [Outgoing(events.DELIVERIES, customer, report)]
            )

        await invite_and_report("cust-bounced", "bounced")
        await invite_and_report("cust-reached", "delivered")

        async def recorded() -> bool:  # the trigger has taken both reports in
            async with app.state.runtime.sessions() as s:
                stmt = select(func.count()).where(
                    (Invitation.failed_at.is_not(None)) | (Invitation.delivered_at.is_not(None))
                )
                return int((await s.execute(stmt)).scalar_one()) == 2

        await eventually(recorded, what="the delivery reports at the trigger")
        for customer in ("cust-bounced", "cust-reached"):
            again = event(customer, customer, "order.delivered")
            assert (await http.post("/v1/events", json=[again], headers=auth)).status_code == 202
        [bounced, _] = await eventually(lambda: ledger("cust-bounced", 2), what="a decision")
        [reached, _] = await eventually(lambda: ledger("cust-reached", 2), what="a decision")
        assert bounced["decision"] == "invited"
        assert (reached["decision"], reached["reason"]) == ("skipped", "fatigue:customer-monthly")


NIGHT_ZONES = [
    "Pacific/Kiritimati",
    "Pacific/Auckland",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Europe/Helsinki",
    "Atlantic/Azores",
    "America/New_York",
    "America/Denver",
    "Pacific/Honolulu",
]


def a_zone_at_night() -> ZoneInfo:
    """A zone where it is between 01:00 and 05:59 right now (one always exists)."""
    for name in NIGHT_ZONES:
        if 1 <= datetime.now(ZoneInfo(name)).hour <= 5:
            return ZoneInfo(name)
    raise AssertionError("no zone at night: extend NIGHT_ZONES")


async def test_defer_quiet_hours_and_the_decision_ledger(
    kafka: KafkaSettings, postgres: DatabaseSettings
) -> None:
    program = parse_program(
        PROGRAM.replace("limit: 1, action: drop", "limit: 1, action: defer")
        + '  quiet_hours:\n    - {start: "21:00", end: "08:00"}\n'
    )
    zone = a_zone_at_night()
    app = create_app(settings(kafka, postgres), program=program)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with running(app), client(app) as http:

        async def ledger(n: int) -> list[dict[str, Any]] | None:
            r = await http.get("/v1/customers/cust-ledger/decisions", headers=auth)
            rows: list[dict[str, Any]] = r.json()["decisions"]
            return rows if len(rows) >= n else None

        # A night-time event where the customer lives: the survey waits for 08:00 there.
        first = event("cust-ledger", "acct-L", timezone=zone.key)
        assert (await http.post("/v1/events", json=[first], headers=auth)).status_code == 202
        [one] = await eventually(lambda: ledger(1), what="the first decision")
        assert (one["decision"], one["reason"]) == ("invited", "quiet_hours")
        first_send = datetime.fromisoformat(one["detail"]["send_at"]).astimezone(zone)
        assert (first_send.hour, first_send.minute) == (8, 0)
        assert first_send - datetime.now(zone) < timedelta(hours=8)

        # A second survey within 30 days is deferred until the first leaves the window.
        second = event("cust-ledger", "acct-L", "order.delivered", timezone=zone.key)
        assert (await http.post("/v1/events", json=[second], headers=auth)).status_code == 202
        rows = await eventually(lambda: ledger(2), what="the second decision")
        newest = rows[0]
        assert (newest["decision"], newest["reason"]) == ("deferred", "fatigue:customer-monthly")
        assert (newest["detail"]["limit"], newest["detail"]["counted"]) == (1, 1)
        eligible = datetime.fromisoformat(newest["next_eligible_at"])
        assert eligible >= first_send + timedelta(days=30)
        assert 8 <= eligible.astimezone(zone).hour < 21  # and not at night either

        invitations = await read_topic(kafka, events.INVITATIONS, expect=2)
        sends = sorted(
            datetime.fromisoformat(json.loads(r.value)["send_at"])  # type: ignore[attr-defined]
            for r in invitations
        )
        assert sends == [first_send, eligible]

        # Paging: one per page, newest first; the API needs the bearer token.
        page = (
            await http.get("/v1/customers/cust-ledger/decisions", params={"limit": 1}, headers=auth)
        ).json()
        assert page["decisions"][0]["id"] == newest["id"]
        older = (
            await http.get(
                "/v1/customers/cust-ledger/decisions",
                params={"limit": 1, "before": page["next_before"]},
                headers=auth,
            )
        ).json()
        assert older["decisions"][0]["id"] == one["id"]
        assert older["next_before"] is None
        assert (await http.get("/v1/customers/cust-ledger/decisions")).status_code == 401

        # A third would wait past the second's window too: longer than the rule's max_defer
        # (its 30-day window by default), so it is dropped, and the ledger says until when.
        third = event("cust-ledger", "acct-L", timezone=zone.key)
        assert (await http.post("/v1/events", json=[third], headers=auth)).status_code == 202
        latest = (await eventually(lambda: ledger(3), what="the third decision"))[0]
        assert (latest["decision"], latest["reason"]) == ("skipped", "fatigue:customer-monthly")
        assert latest["detail"]["max_defer"] == str(timedelta(days=30))
        assert datetime.fromisoformat(latest["next_eligible_at"]) >= eligible + timedelta(days=30)
