"""Close the loop: which answers alert (pure, table-driven), the program's alerts section, and
the alert outbox: recorded once per rule, posted signed, retried, failed for good."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import Response as HttpResponse

from services.collector import alerting, alerts, repository
from services.collector.config import CollectorSettings
from services.collector.models import AlertDelivery, Response
from services.common.db import unit_of_work
from services.common.program import AlertRule, Program, ProgramError, parse_program
from services.common.webhooks import WebhookRequest, standard_secret_key, verify_standard
from tests.vendor_api import LocalApi

ROOT = Path(__file__).resolve().parents[2]
GOOD = (ROOT / "deploy/local/program.yaml").read_text()
# The shipped program without its alerts section, for tests that bring their own.
BASE = GOOD[: GOOD.index("\nalerts:")] + "\n"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)

RULES = [
    AlertRule(id="nps-detractor", survey="relationship-nps", score_at_most=6),
    AlertRule(id="csat-low", metric="csat", score_at_most=2),
    AlertRule(id="nps-promoter", metric="nps", score_at_least=9),
    AlertRule(id="nps-passive", metric="nps", score_at_least=7, score_at_most=8),
    AlertRule(id="angry-words", comment_contains=["huono", "Dålig", "cancel", "ill"]),
    AlertRule(
        id="detractor-says-cancel",
        survey="relationship-nps",
        score_at_most=6,
        comment_contains=["cancel"],
    ),
]


def answer(
    score: int | None,
    comment: str | None = None,
    survey: str = "relationship-nps",
    bot: bool = False,
) -> alerts.Answer:
    metric = {"relationship-nps": "nps", "support-csat": "csat"}[survey]
    return alerts.Answer(survey, metric, score, comment, bot)


@pytest.mark.parametrize(
    ("given", "rules"),
    [
        (answer(0), ["nps-detractor"]),
        (answer(6), ["nps-detractor"]),
        (answer(7), ["nps-passive"]),
        (answer(8), ["nps-passive"]),
        (answer(9), ["nps-promoter"]),
        (answer(10, "Loistavaa"), ["nps-promoter"]),
        (answer(None, "Kiitos"), []),  # no score: no score rule
        (answer(3, survey="support-csat"), []),
        (answer(2, survey="support-csat"), ["csat-low"]),
        (answer(1, survey="support-csat"), ["csat-low"]),
        (answer(9, "HUONOA palvelua"), ["nps-promoter", "angry-words"]),  # case, word start
        (answer(None, "Väldigt dålig service"), ["angry-words"]),
        (
            answer(5, "I will cancel my order"),
            ["nps-detractor", "angry-words", "detractor-says-cancel"],
        ),
        (answer(9, "I cancelled, then came back"), ["nps-promoter", "angry-words"]),
        (answer(7, "I will stay"), ["nps-passive"]),  # "ill" only at the start of a word
        (answer(4, survey="support-csat", comment="ill-mannered agent"), ["angry-words"]),
        (answer(2, "Terrible. Cancel!", bot=True), []),  # suspected bots never alert
        (answer(10, ""), ["nps-promoter"]),
    ],
)
def test_which_rules_an_answer_matches(given: alerts.Answer, rules: list[str]) -> None:
    assert alerts.matching_rules(RULES, given) == rules


@pytest.mark.parametrize(
    ("already", "matched", "new"),
    [
        ([], ["a"], ["a"]),
        (["a"], ["a"], []),  # a changed answer that still matches does not alert again
        (["a"], ["a", "b"], ["b"]),  # a newly matching rule alerts
        (["a"], [], []),
        (["a", "b"], ["b", "a"], []),
    ],
)
def test_only_new_rules_alert(already: list[str], matched: list[str], new: list[str]) -> None:
    assert alerts.new_rules(already, matched) == new


def test_the_shipped_program_has_alert_rules() -> None:
    program = parse_program(GOOD)
    assert [r.id for r in program.alerts.rules] == ["nps-detractor", "csat-unhappy", "angry-words"]
    assert program.alerts.webhooks == []


def errors(extra: str) -> list[str]:
    with pytest.raises(ProgramError) as info:
        parse_program(BASE + extra, "p.yaml")
    return info.value.errors


def line_of(extra: str) -> int:
    """The line of ``extra`` marked ``#!``, in the program ``errors`` parses."""
    lines = extra.split("\n")
    return BASE.count("\n") + 1 + next(i for i, line in enumerate(lines) if "#!" in line)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "alerts:\n  rules:\n    - id: a\n      survey: nope  #!\n      score_at_most: 6\n",
            "alerts.rules.0.survey: unknown survey 'nope'",
        ),
        (
            "alerts:\n  rules:\n    - id: a  #!\n      survey: relationship-nps\n",
            "needs score_at_most, score_at_least or comment_contains",
        ),
        (
            "alerts:\n  rules:\n    - id: a  #!\n      score_at_most: 6\n",
            "a score bound needs a survey or a metric",
        ),
        (
            "alerts:\n  rules:\n    - id: a\n      survey: support-csat\n"
            "      score_at_most: 6  #!\n",
            "alerts.rules.0.score_at_most: csat scores are 1-5",
        ),
        (
            "alerts:\n  rules:\n    - id: a\n      survey: support-csat\n      metric: nps  #!\n"
            "      score_at_most: 1\n",
            "survey 'support-csat' measures csat",
        ),
        (
            "alerts:\n  rules:\n    - id: a\n      comment_contains: [x]\n"
            "    - id: a  #!\n      comment_contains: [y]\n",
            "duplicate alert rule id 'a'",
        ),
        (
            "alerts:\n  rules:\n    - id: a  #!\n      comment_contains: []\n",
            "needs score_at_most, score_at_least or comment_contains",
        ),
        (
            "alerts:\n  webhooks:\n    - url: ftp://crm.example.com/x  #!\n      secret_env: S\n",
            "alerts.webhooks.0.url: Value error, must be an http:// or https:// URL",
        ),
        (
            "alerts:\n  webhooks:\n    - url: https://u:p@crm.example.com/x  #!\n"
            "      secret_env: S\n",
            "must not carry credentials",
        ),
        (
            "alerts:\n  webhooks:\n    - url: https://crm.example.com/x\n"
            "      secret_env: whsec_abc  #!\n",
            "alerts.webhooks.0.secret_env",
        ),
        (
            "alerts:\n  webhooks:\n    - url: https://crm.example.com/x\n      secret_env: S\n"
            "      rules: [nope]  #!\n",
            "alerts.webhooks.0.rules: unknown rule 'nope'",
        ),
    ],
)
def test_bad_alerts_are_reported_with_their_line(extra: str, message: str) -> None:
    found = errors(extra)
    assert len(found) == 1, found
    assert message in found[0], found
    assert found[0].startswith(f"p.yaml:{line_of(extra)}:"), found


# -- the alert outbox, on PostgreSQL and SQLite ---------------------------------------------------


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


def program_with(webhooks: list[dict[str, Any]]) -> Program:
    extra = {
        "alerts": {
            "rules": [
                {"id": "nps-detractor", "survey": "relationship-nps", "score_at_most": 6},
                {"id": "angry-words", "comment_contains": ["huono", "terrible"]},
            ],
            "webhooks": webhooks,
        }
    }
    import yaml

    raw = yaml.safe_load(BASE)
    raw.update(extra)
    return Program.model_validate(raw)


@pytest.fixture
def receiver() -> Iterator[tuple[LocalApi, list[int | tuple[int, dict[str, str]]]]]:
    """A webhook receiver answering with the queued statuses (then 200)."""
    api = LocalApi()
    answers: list[int | tuple[int, dict[str, str]]] = []

    @api.route("POST", "/hooks/kaiku")
    def hook(request: Request) -> HttpResponse:
        given = answers.pop(0) if answers else 200
        status, headers = given if isinstance(given, tuple) else (given, {})
        return HttpResponse(status_code=status, headers=headers)

    with api:
        yield api, answers


async def store(
    sessions: async_sessionmaker[AsyncSession],
    program: Program,
    now: datetime,
    *,
    score: int | None,
    comment: str | None = None,
    response_id: uuid.UUID | None = None,
    bot: bool = False,
    hold: timedelta = timedelta(0),
) -> tuple[uuid.UUID, list[str]]:
    """Store (or change) an answer and alert on it in one transaction, as the survey POST does."""
    async with unit_of_work(sessions) as session:
        row = await session.get(Response, response_id) if response_id else None
        if row is None:
            row = Response(
                response_id=uuid.uuid4(),
                invitation_id=uuid.uuid4(),
                survey_id="relationship-nps",
                metric="nps",
                customer_id="cust-1",
                locale="fi",
                revision=1,
                day=date(2026, 11, 2),
                first_submitted_at=now,
                team="billing",
            )
            session.add(row)
        else:
            row.revision += 1
        row.score, row.comment, row.submitted_at = score, comment, now
        row.suspected_bot, row.bot_reason = bot, ("too_fast" if bot else None)
        await session.flush()
        new = await alerting.record(session, program, row, now, hold=hold)
        return row.response_id, new


async def deliveries(sessions: async_sessionmaker[AsyncSession]) -> list[AlertDelivery]:
    async with unit_of_work(sessions) as session:
        stmt = select(AlertDelivery).order_by(AlertDelivery.created_at, AlertDelivery.rules)
        return list((await session.execute(stmt)).scalars())


async def response(sessions: async_sessionmaker[AsyncSession], rid: uuid.UUID) -> Response:
    async with unit_of_work(sessions) as session:
        found = await session.get(Response, rid)
        assert found is not None
        return found


async def test_an_alert_is_recorded_once_per_rule_and_webhook(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    program = program_with(
        [
            {"url": "https://crm.example.com/a?key=1", "secret_env": "A"},
            {"url": "https://ops.example.com/b", "secret_env": "B", "rules": ["angry-words"]},
        ]
    )
    rid, new = await store(sessions, program, T0, score=9)
    assert new == [] and await deliveries(sessions) == []
    assert (await response(sessions, rid)).followup_status is None

    t1 = T0 + timedelta(minutes=1)
    rid, new = await store(sessions, program, t1, score=4, response_id=rid)
    assert new == ["nps-detractor"]
    row = await response(sessions, rid)
    assert (row.alerted_at, row.alert_rules, row.followup_status) == (t1, "nps-detractor", "open")
    assert [(d.url, d.rules, d.revision) for d in await deliveries(sessions)] == [
        ("https://crm.example.com/a?key=1", "nps-detractor", 2)
    ]

    # Changed again, still a detractor: no second alert. Now with angry words: one more.
    t2 = T0 + timedelta(minutes=2)
    assert (await store(sessions, program, t2, score=3, response_id=rid))[1] == []
    t3 = T0 + timedelta(minutes=3)
    new = (await store(sessions, program, t3, score=3, comment="Huono!", response_id=rid))[1]
    assert new == ["angry-words"]
    row = await response(sessions, rid)
    assert row.alerted_at == t1  # the first time
    assert row.alert_rules == "nps-detractor,angry-words"
    assert [(d.url, d.rules, d.revision) for d in await deliveries(sessions)][1:] == [
        ("https://crm.example.com/a?key=1", "angry-words", 4),
        ("https://ops.example.com/b", "angry-words", 4),
    ]


async def test_suspected_bots_never_alert(sessions: async_sessionmaker[AsyncSession]) -> None:
    program = program_with([{"url": "https://crm.example.com/a", "secret_env": "A"}])
    rid, new = await store(sessions, program, T0, score=0, comment="terrible", bot=True)
    assert new == [] and await deliveries(sessions) == []
    row = await response(sessions, rid)
    assert (row.alerted_at, row.followup_status) == (None, None)


async def test_a_follow_up_already_in_hand_is_not_reopened(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    program = program_with([])
    rid, _ = await store(sessions, program, T0, score=9)
    async with unit_of_work(sessions) as session:
        row = await session.get(Response, rid)
        assert row is not None
        row.followup_status = "contacted"
    assert (await store(sessions, program, T0, score=1, response_id=rid))[1] == ["nps-detractor"]
    assert (await response(sessions, rid)).followup_status == "contacted"


def sender(
    program: Program,
    sessions: async_sessionmaker[AsyncSession],
    clock: Clock,
    **settings: Any,
) -> alerting.AlertSender:
    return alerting.AlertSender(
        settings=CollectorSettings(
            alert_retry_base_seconds=10, alert_retry_max_seconds=600, **settings
        ),
        program=program,
        sessions=sessions,
        environ={"KAIKU_ALERT_SECRET_TEST": SECRET},
        clock=clock,
    )


async def test_posts_signed_retries_transient_and_honours_retry_after(
    sessions: async_sessionmaker[AsyncSession],
    receiver: tuple[LocalApi, list[int | tuple[int, dict[str, str]]]],
) -> None:
    api, answers = receiver
    url = f"{api.url}/hooks/kaiku?token=abc"
    program = program_with([{"url": url, "secret_env": "KAIKU_ALERT_SECRET_TEST"}])
    clock = Clock()
    worker = sender(program, sessions, clock)
    rid, _ = await store(sessions, program, T0, score=2, comment="Terrible delivery")
    answers += [503, (429, {"Retry-After": "120"}), 200]
    try:
        assert await worker.round() == 1
        [d] = await deliveries(sessions)
        assert (d.status, d.attempts, d.last_error) == ("pending", 1, "HTTP 503")
        assert 5 <= (d.next_attempt_at - T0).total_seconds() <= 15  # 10s, jittered
        assert await worker.round() == 0  # not due yet

        clock.now = d.next_attempt_at
        assert await worker.round() == 1
        [d] = await deliveries(sessions)
        assert (d.status, d.attempts, d.last_error) == ("pending", 2, "HTTP 429")
        assert (d.next_attempt_at - clock.now).total_seconds() >= 120  # Retry-After

        clock.now = d.next_attempt_at
        assert await worker.round() == 1
        [d] = await deliveries(sessions)
        assert (d.status, d.attempts, d.delivered_at) == ("delivered", 3, clock.now)
    finally:
        await worker.aclose()

    assert len(api.calls) == 3
    assert {c.headers["webhook-id"] for c in api.calls} == {str(d.id)}  # the same every time
    assert all(c.query == {"token": "abc"} for c in api.calls)
    call = api.calls[-1]
    verify_standard(
        WebhookRequest("POST", url, call.headers, call.body, datetime.now(UTC)),
        standard_secret_key(SECRET),
        tolerance=300,
    )
    body = json.loads(call.body)
    assert body["type"] == "response.alert"
    assert body["data"]["response_id"] == str(rid)
    assert body["data"]["rules"] == ["nps-detractor", "angry-words"]
    assert (body["data"]["score"], body["data"]["comment"]) == (2, "Terrible delivery")
    assert body["data"]["segments"]["team"] == "billing"


async def test_an_alert_waits_out_the_trap_window_and_a_bot_s_is_withdrawn(
    sessions: async_sessionmaker[AsyncSession],
    receiver: tuple[LocalApi, list[int | tuple[int, dict[str, str]]]],
) -> None:
    api, _ = receiver
    program = program_with(
        [{"url": f"{api.url}/hooks/kaiku", "secret_env": "KAIKU_ALERT_SECRET_TEST"}]
    )
    hold = timedelta(minutes=2)
    person, _ = await store(sessions, program, T0, score=1, hold=hold)
    scanner, _ = await store(sessions, program, T0, score=0, hold=hold)
    # The scanner reaches the email's hidden trap link after its POST: its answer is re-marked,
    # as the trap route does.
    async with unit_of_work(sessions) as session:
        row = await session.get(Response, scanner)
        assert row is not None
        await repository.flag_bot(session, row, "trap")
    clock = Clock()
    worker = sender(program, sessions, clock)
    try:
        assert await worker.round() == 0  # both held while a trap hit may still come
        clock.now = T0 + hold
        assert await worker.round() == 2
    finally:
        await worker.aclose()
    status = {d.response_id: (d.status, d.last_error) for d in await deliveries(sessions)}
    assert status == {
        person: ("delivered", None),
        scanner: ("withdrawn", "the answer is a suspected bot: trap"),
    }
    assert [json.loads(c.body)["data"]["response_id"] for c in api.calls] == [str(person)]


@pytest.mark.parametrize(
    ("answers", "attempts", "error"),
    [
        ([400], 1, "HTTP 400"),  # the request is wrong: never retried
        ([410], 1, "HTTP 410"),
        ([500, 502, 503], 3, "HTTP 503"),  # out of attempts
    ],
)
async def test_fails_for_good(
    sessions: async_sessionmaker[AsyncSession],
    receiver: tuple[LocalApi, list[int | tuple[int, dict[str, str]]]],
    answers: list[int],
    attempts: int,
    error: str,
) -> None:
    api, queued = receiver
    queued += answers
    program = program_with(
        [{"url": f"{api.url}/hooks/kaiku", "secret_env": "KAIKU_ALERT_SECRET_TEST"}]
    )
    clock = Clock()
    worker = sender(program, sessions, clock, alert_max_attempts=3)
    await store(sessions, program, T0, score=1)
    try:
        for _ in range(5):
            await worker.round()
            clock.now += timedelta(hours=1)
    finally:
        await worker.aclose()
    [d] = await deliveries(sessions)
    assert (d.status, d.attempts, d.last_error, d.delivered_at) == ("failed", attempts, error, None)
    assert len(api.calls) == attempts


async def test_no_answer_is_retried(sessions: async_sessionmaker[AsyncSession]) -> None:
    from tests.support import free_port

    program = program_with(
        [{"url": f"http://127.0.0.1:{free_port()}/x", "secret_env": "KAIKU_ALERT_SECRET_TEST"}]
    )
    worker = sender(program, sessions, Clock())
    await store(sessions, program, T0, score=1)
    try:
        await worker.round()
    finally:
        await worker.aclose()
    [d] = await deliveries(sessions)
    assert (d.status, d.attempts, d.last_error) == ("pending", 1, "ConnectError")


async def test_erased_answers_and_removed_webhooks_are_not_posted(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    old = program_with([{"url": "https://gone.example.com/x", "secret_env": "A"}])
    await store(sessions, old, T0, score=1)
    program = program_with(
        [{"url": "https://crm.example.com/x", "secret_env": "KAIKU_ALERT_SECRET_TEST"}]
    )
    rid, _ = await store(sessions, program, T0, score=1)
    async with unit_of_work(sessions) as session:
        row = await session.get(Response, rid)
        assert row is not None
        row.erased_at = T0
    worker = sender(program, sessions, Clock())
    try:
        assert await worker.round() == 2
    finally:
        await worker.aclose()
    errors = sorted((d.status, d.last_error) for d in await deliveries(sessions))
    assert errors == [
        ("failed", "the answer was erased"),
        ("failed", "the webhook is no longer in the program"),
    ]


def test_a_missing_or_bad_secret_stops_the_start() -> None:
    program = program_with([{"url": "https://crm.example.com/x", "secret_env": "KAIKU_S"}])
    settings = CollectorSettings()
    with pytest.raises(ValueError, match="KAIKU_S: the webhook's signing secret is not set"):
        alerting.AlertSender(settings=settings, program=program, sessions=None, environ={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="KAIKU_S: whsec_ must be followed by base64") as info:
        alerting.AlertSender(
            settings=settings,
            program=program,
            sessions=None,  # type: ignore[arg-type]
            environ={"KAIKU_S": "whsec_!!!secret!!!"},
        )
    assert "secret!!!" not in str(info.value)


def test_log_lines_name_the_webhook_without_its_query_or_credentials() -> None:
    assert alerting.where("https://crm.example.com:8443/hooks/kaiku?token=s3cret#x") == (
        "https://crm.example.com:8443/hooks/kaiku"
    )
