"""A link scanner's visit ends up as a suspected bot; a person's single POST counts.

Through the real broker, PostgreSQL (and SQLite), the three services and an SMTP sink. The bot
windows are shortened (2 s after delivery, 3 s around a trap hit, 3 s bursts) so the test does
not have to wait out the production defaults (10 s, 120 s, 60 s); the rules are the same.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select

from services.collector.config import CollectorSettings
from services.collector.models import Hit, Invitation, Response, ScoreCell
from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.db import create_engine, create_sessionmaker, unit_of_work
from services.common.program import Program
from tests.conftest import read_topic
from tests.support import (
    SmtpSink,
    client,
    eventually,
    html_part,
    running,
    smtp_stack,
    survey_link,
)

TOKEN = "test-token-" + uuid.uuid4().hex
PUBLIC = "http://kaiku.test"
WINDOWS = CollectorSettings(
    bot_min_seconds=2, trap_window_seconds=3, burst_window_seconds=3, burst_scores=3
)


def delivered(customer: str, email: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"ord-{uuid.uuid4().hex[:8]}",
        "source": "shop://acme",
        "type": "order.delivered",
        "subject": customer,
        "data": {
            "customer": {"id": customer, "email": email, "locale": "en"},
            "touchpoint": "delivery",
        },
    }


async def test_scanner_sequence_is_kept_apart_and_a_person_counts(
    kafka: KafkaSettings, database: DatabaseSettings, program: Program, smtp_sink: SmtpSink
) -> None:
    app = smtp_stack(kafka, database, program, smtp_sink, TOKEN, PUBLIC, collector=WINDOWS)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    engine = create_engine(database)
    sessions = create_sessionmaker(engine)

    async def invitation(token: str) -> Invitation | None:
        async with unit_of_work(sessions) as s:
            found = (
                await s.execute(select(Invitation).where(Invitation.token == token))
            ).scalar_one_or_none()
        return found if found is not None and found.delivered_at is not None else None

    async def response(token: str) -> Response | None:
        async with unit_of_work(sessions) as s:
            return (
                await s.execute(
                    select(Response)
                    .join(Invitation, Invitation.invitation_id == Response.invitation_id)
                    .where(Invitation.token == token)
                )
            ).scalar_one_or_none()

    try:
        async with running(*app.apps.values()), client(app, PUBLIC) as http:
            for customer in ("cust-scanned", "cust-person"):
                event = delivered(customer, f"{customer}@example.com")
                assert (await http.post("/v1/events", json=event, headers=auth)).status_code == 202
            await eventually(
                lambda: smtp_sink.count() >= 2 or None, what="two invitation emails at the sink"
            )
            mails = {m["To"]: m for m in smtp_sink.messages}
            scanned = mails["cust-scanned@example.com"]
            token = urlsplit(survey_link(scanned)).path.rsplit("/", 1)[1]
            person_token = urlsplit(survey_link(mails["cust-person@example.com"])).path.rsplit(
                "/", 1
            )[1]
            # The collector learns of each delivery from kaiku.deliveries.
            inv = await eventually(lambda: invitation(token), what="the delivery at the collector")
            assert inv is not None
            await eventually(lambda: invitation(person_token), what="the second delivery")

            # The scanner, within a second of delivery: every link of the email (the eleven
            # score buttons, the hidden trap link, unsubscribe excluded: it only shows a page)...
            html = html_part(scanned)
            links = sorted(set(re.findall(r'href="(http://kaiku\.test/s/[^"]+)"', html)))
            assert f"{PUBLIC}/s/{token}/trap" in links, "the email carries the hidden trap link"
            assert len([u for u in links if "?score=" in u]) == 11
            for url in links:
                page = await http.get(url.replace("&amp;", "&"))
                assert page.status_code == 200, url
            # ...a GET never records an answer...
            assert await response(token) is None
            # ...then it runs the page's JavaScript and submits the form with different scores.
            for score in (0, 5, 10):
                posted = await http.post(f"/s/{token}", data={"score": str(score)})
                assert posted.status_code in (200, 303)
            bot = await response(token)
            assert bot is not None and bot.suspected_bot and bot.score == 10
            assert bot.bot_reason == "trap"  # the first rule it met: the hidden link

            # A person, a few seconds after their email arrived: opens the link, answers once.
            await asyncio.sleep(WINDOWS.bot_min_seconds + 0.5)
            opened = await http.get(f"/s/{person_token}")
            assert opened.status_code == 200
            answered = await http.post(
                f"/s/{person_token}", data={"score": "8", "comment": "ok"}, follow_redirects=False
            )
            assert answered.status_code == 303
            person = await response(person_token)
            assert person is not None and not person.suspected_bot and person.score == 8

            # What was seen of the scanner's link: the plain link, 11 score links, the trap and
            # 3 POSTs.
            async with unit_of_work(sessions) as s:
                kinds = [
                    h.kind
                    for h in (
                        await s.execute(select(Hit).where(Hit.invitation_id == inv.invitation_id))
                    ).scalars()
                ]
                cells = {
                    (c.score, c.suspected_bot): c.n
                    for c in (
                        await s.execute(
                            select(ScoreCell).where(ScoreCell.survey_id == "relationship-nps")
                        )
                    ).scalars()
                    if c.n
                }
            assert sorted(kinds) == sorted(["open"] + ["score_link"] * 11 + ["trap"] + ["post"] * 3)
            # Scores count the person only; the scanner's answer is counted apart.
            assert cells == {(8, False): 1, (10, True): 1}

            # Downstream hears only the person's answer (a bot's must not cancel reminders).
            published = await read_topic(kafka, events.RESPONSES, expect=2, timeout=4)
            assert [m.key for m in published] == [b"cust-person"]  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
