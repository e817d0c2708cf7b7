"""GET /v1/responses, GET /v1/responses.csv and PATCH /v1/responses/{id}, on PostgreSQL and
SQLite: filters, keyset paging, the CSV export and the follow-up."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import cursors, responses
from services.collector.models import Base, Response
from services.common.config import DatabaseSettings
from services.common.db import create_engine, create_sessionmaker, create_tables, unit_of_work
from services.common.http import bearer_auth, install_error_handlers
from tests.support import client

TOKEN = "responses-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@dataclass
class Clock:
    now: datetime = T0 + timedelta(days=30)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Api:
    http: httpx.AsyncClient
    sessions: async_sessionmaker[AsyncSession]
    clock: Clock
    rows: list[Response] = field(default_factory=list)

    async def add(self, **kwargs: Any) -> Response:
        row = response_row(**kwargs)
        async with unit_of_work(self.sessions) as session:
            session.add(row)
        self.rows.append(row)
        return row

    async def get(self, **params: Any) -> httpx.Response:
        return await self.http.get("/v1/responses", params=params, headers=AUTH)


def response_row(
    *,
    minute: int = 0,
    survey_id: str = "relationship-nps",
    metric: str = "nps",
    score: int | None = 9,
    comment: str | None = None,
    suspected_bot: bool = False,
    **extra: Any,
) -> Response:
    at = T0 + timedelta(minutes=minute)
    values: dict[str, Any] = {
        "response_id": uuid.uuid4(),
        "invitation_id": uuid.uuid4(),
        "survey_id": survey_id,
        "metric": metric,
        "customer_id": f"cust-{uuid.uuid4().hex[:6]}",
        "score": score,
        "comment": comment,
        "locale": "fi",
        "revision": 1,
        "suspected_bot": suspected_bot,
        "bot_reason": "too_fast" if suspected_bot else None,
        "day": date(2026, 11, 2),
        "first_submitted_at": at,
        "submitted_at": at,
    }
    values.update(extra)
    return Response(**values)


@pytest.fixture
async def api(database: DatabaseSettings) -> AsyncIterator[Api]:
    engine = create_engine(database)
    await create_tables(engine, Base.metadata, database.schema_name)
    sessions = create_sessionmaker(engine)
    clock = Clock()
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(
        responses.router(
            sessions=sessions,
            auth=bearer_auth(SecretStr(TOKEN)),
            cursor_key=cursors.cursor_key(SecretStr(TOKEN)),
            clock=clock,
        )
    )
    async with client(app) as http:
        yield Api(http, sessions, clock)
    await engine.dispose()


async def seed(api: Api) -> None:
    await api.add(minute=1, score=3, comment="Huono palvelu", team="billing", alerted_at=T0)
    await api.add(minute=2, score=10, comment="", team="billing", account_id="acct-1")
    await api.add(minute=3, score=7, channel="email", agent="aino", touchpoint="delivery")
    await api.add(minute=4, survey_id="support-csat", metric="csat", score=2, comment="meh")
    await api.add(minute=5, survey_id="support-csat", metric="csat", score=5, team="support")
    await api.add(minute=6, score=None, comment="Only a comment", followup_status="contacted")
    await api.add(minute=7, score=0, suspected_bot=True)
    await api.add(
        minute=8, score=1, followup_status="open", alerted_at=T0, alert_rules="nps-detractor"
    )


def ids(body: dict[str, Any]) -> list[str]:
    return [i["response_id"] for i in body["items"]]


def expected(api: Api, keep: Callable[[Response], bool]) -> list[str]:
    rows = sorted(api.rows, key=lambda r: (r.submitted_at, r.response_id), reverse=True)
    return [str(r.response_id) for r in rows if keep(r)]


def person(r: Response) -> bool:
    return not r.suspected_bot


FILTERS: list[tuple[dict[str, Any], Callable[[Response], bool]]] = [
    ({}, person),
    ({"survey": "support-csat"}, lambda r: person(r) and r.survey_id == "support-csat"),
    ({"metric": "nps"}, lambda r: person(r) and r.metric == "nps"),
    (
        {"from": "2026-11-02T09:02:00Z", "to": "2026-11-02T11:05:00+02:00"},
        lambda r: (
            person(r) and T0 + timedelta(minutes=2) <= r.submitted_at < T0 + timedelta(minutes=5)
        ),
    ),
    ({"score_max": 6}, lambda r: person(r) and r.score is not None and r.score <= 6),
    (
        {"score_min": 3, "score_max": 7},
        lambda r: person(r) and r.score is not None and 3 <= r.score <= 7,
    ),
    ({"status": "open"}, lambda r: person(r) and r.followup_status == "open"),
    ({"status": "contacted"}, lambda r: person(r) and r.followup_status == "contacted"),
    ({"alerted": "true"}, lambda r: person(r) and r.alerted_at is not None),
    ({"alerted": "false"}, lambda r: person(r) and r.alerted_at is None),
    ({"suspected_bot": "include"}, lambda r: True),
    ({"suspected_bot": "only"}, lambda r: r.suspected_bot),
    ({"has_comment": "true"}, lambda r: person(r) and bool(r.comment)),
    ({"has_comment": "false"}, lambda r: person(r) and not r.comment),
    ({"team": "billing"}, lambda r: person(r) and r.team == "billing"),
    ({"account": "acct-1"}, lambda r: person(r) and r.account_id == "acct-1"),
    (
        {"channel": "email", "agent": "aino", "touchpoint": "delivery"},
        lambda r: person(r) and r.agent == "aino",
    ),
    ({"team": "billing", "score_max": 6}, lambda r: r.team == "billing" and r.score == 3),
    ({"team": "nobody"}, lambda r: False),
]


@pytest.mark.parametrize(("params", "keep"), FILTERS, ids=[str(p) for p, _ in FILTERS])
async def test_filters(api: Api, params: dict[str, Any], keep: Callable[[Response], bool]) -> None:
    await seed(api)
    got = await api.get(**params)
    assert got.status_code == 200, got.text
    assert ids(got.json()) == expected(api, keep)
    assert got.json()["next_cursor"] is None


async def test_an_item_carries_the_answer_its_segments_and_its_follow_up(api: Api) -> None:
    row = await api.add(
        score=2,
        comment="Paketti myöhässä",
        team="logistics",
        case_id="case-9",
        alerted_at=T0,
        alert_rules="nps-detractor,angry-words",
        followup_status="open",
    )
    erased = await api.add(minute=1, comment="my name is Aino", erased_at=T0)
    body = (await api.get()).json()
    first, second = body["items"]
    assert second == {
        "response_id": str(row.response_id),
        "invitation_id": str(row.invitation_id),
        "customer_id": row.customer_id,
        "survey": "relationship-nps",
        "metric": "nps",
        "score": 2,
        "comment": "Paketti myöhässä",
        "locale": "fi",
        "submitted_at": "2026-11-02T09:00:00Z",
        "revision": 1,
        "segments": {
            "touchpoint": None,
            "channel": None,
            "team": "logistics",
            "agent": None,
            "account_id": None,
            "case_id": "case-9",
        },
        "suspected_bot": False,
        "bot_reason": None,
        "followup": {
            "status": "open",
            "note": None,
            "alerted_at": "2026-11-02T09:00:00Z",
            "alert_rules": ["nps-detractor", "angry-words"],
            "contacted_at": None,
            "resolved_at": None,
            "updated_at": None,
        },
    }
    # An erased customer's answer: the score stays, without identity or words.
    assert first["response_id"] == str(erased.response_id)
    assert (first["customer_id"], first["comment"], first["score"]) == (None, None, 9)


async def test_paging_walks_every_answer_once_in_order(api: Api) -> None:
    # Several answers share a second: the response id breaks the tie.
    for i in range(23):
        await api.add(minute=i // 4, score=i % 11)
    await api.add(minute=2, score=5, suspected_bot=True)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor:
            params["cursor"] = cursor
        page = await api.get(**params)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) <= 5
        seen += ids(body)
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert len(seen) == len(set(seen)) == 23
    assert seen == expected(api, person)


async def test_a_page_exactly_at_the_end_says_there_is_no_more(api: Api) -> None:
    for i in range(4):
        await api.add(minute=i)
    first = (await api.get(limit=2)).json()
    second = (await api.get(limit=2, cursor=first["next_cursor"])).json()
    assert len(second["items"]) == 2 and second["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"from": "2026-11-02T09:00:00"}, "from"),
        ({"to": "yesterday"}, "to"),
        ({"from": "2026-11-03T00:00:00Z", "to": "2026-11-02T00:00:00Z"}, "to"),
        ({"metric": "eps"}, "metric"),
        ({"score_min": 11}, "score_min"),
        ({"score_min": 8, "score_max": 2}, "score_max"),
        ({"status": "closed"}, "status"),
        ({"alerted": "maybe"}, "alerted"),
        ({"suspected_bot": "yes"}, "suspected_bot"),
        ({"has_comment": "perhaps"}, "has_comment"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "e30.AAAA"}, "cursor"),
        ({"team": "x" * 201}, "team"),
    ],
)
async def test_bad_parameters_are_422_naming_the_field(
    api: Api, params: dict[str, Any], field: str
) -> None:
    got = await api.get(**params)
    assert got.status_code == 422, got.text
    assert got.json()["error"]["field"] == field
    csv_got = await api.http.get("/v1/responses.csv", params=params, headers=AUTH)
    if field not in ("limit", "cursor"):  # the export has neither
        assert csv_got.status_code == 422, csv_got.text
        assert csv_got.json()["error"]["field"] == field


async def test_a_cursor_is_signed_and_bound_to_its_filters(api: Api) -> None:
    for i in range(3):
        await api.add(minute=i, team="billing")
    cursor = (await api.get(limit=1, team="billing")).json()["next_cursor"]
    assert cursor
    other = await api.get(limit=1, cursor=cursor, team="support")
    assert other.status_code == 422 and other.json()["error"]["field"] == "cursor"
    data, _, sig = cursor.partition(".")
    forged = await api.get(limit=1, cursor=f"{data}.{sig[::-1]}", team="billing")
    assert forged.status_code == 422 and forged.json()["error"]["field"] == "cursor"
    good = await api.get(limit=1, cursor=cursor, team="billing")
    assert good.status_code == 200


async def test_a_bearer_token_is_required(api: Api) -> None:
    assert (await api.http.get("/v1/responses")).status_code == 401
    assert (await api.http.get("/v1/responses.csv")).status_code == 401
    patched = await api.http.patch(f"/v1/responses/{uuid.uuid4()}", json={"status": "open"})
    assert patched.status_code == 401
    wrong = await api.http.get("/v1/responses", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


async def test_csv_streams_every_answer_in_batches(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(responses, "CSV_BATCH", 3)  # several keyset batches
    for i in range(10):
        await api.add(minute=i % 4, score=i, team="billing" if i % 2 else "support")
    await api.add(minute=1, suspected_bot=True)
    got = await api.http.get("/v1/responses.csv", headers=AUTH)
    assert got.status_code == 200
    assert got.headers["content-type"] == "text/csv; charset=utf-8"
    disposition = got.headers["content-disposition"]
    assert disposition.startswith("attachment;") and ".csv" in disposition
    rows = read_csv(got.text)
    assert list(rows[0]) == list(responses.CSV_COLUMNS)
    assert [r["response_id"] for r in rows] == expected(api, person)
    filtered = read_csv(
        (await api.http.get("/v1/responses.csv", params={"team": "billing"}, headers=AUTH)).text
    )
    assert [r["response_id"] for r in filtered] == expected(
        api, lambda r: person(r) and r.team == "billing"
    )
    empty = await api.http.get("/v1/responses.csv", params={"team": "none"}, headers=AUTH)
    assert empty.text == ",".join(responses.CSV_COLUMNS) + "\r\n"


async def test_csv_cells_cannot_become_formulas(api: Api) -> None:
    dangerous = {
        '=HYPERLINK("http://evil","x")': '\'=HYPERLINK("http://evil","x")',
        "+358401234567": "'+358401234567",
        "-2+3": "'-2+3",
        "@SUM(A1)": "'@SUM(A1)",
        "\tindented": "'\tindented",
        "\rcarriage": "'\rcarriage",
        'Hyvä palvelu, kiitos – åäö "lainaus"\nrivi 2': (
            'Hyvä palvelu, kiitos – åäö "lainaus"\nrivi 2'
        ),
    }
    for minute, comment in enumerate(dangerous):
        await api.add(minute=minute, comment=comment, team="=cmd|' /C calc'!A0")
    got = await api.http.get("/v1/responses.csv", headers=AUTH)
    rows = read_csv(got.content.decode("utf-8"))
    assert sorted(r["comment"] for r in rows) == sorted(dangerous.values())
    assert {r["team"] for r in rows} == {"'=cmd|' /C calc'!A0"}
    assert all(r["score"] == "9" and r["suspected_bot"] == "False" for r in rows)


async def patch(api: Api, response_id: object, body: Any, **kwargs: Any) -> httpx.Response:
    return await api.http.patch(f"/v1/responses/{response_id}", json=body, headers=AUTH, **kwargs)


async def test_follow_up_transitions(api: Api) -> None:
    row = await api.add(score=2, alerted_at=T0, alert_rules="nps-detractor", followup_status="open")
    t1 = api.clock.now
    got = await patch(api, row.response_id, {"status": "contacted", "note": "Soitettu"})
    assert got.status_code == 200, got.text
    followup = got.json()["followup"]
    assert followup["status"] == "contacted" and followup["note"] == "Soitettu"
    assert (
        followup["contacted_at"] == followup["updated_at"] == t1.isoformat().replace("+00:00", "Z")
    )
    assert followup["resolved_at"] is None

    api.clock.now = t1 + timedelta(hours=2)
    got = await patch(api, row.response_id, {"status": "resolved"})
    followup = got.json()["followup"]
    assert followup["status"] == "resolved" and followup["note"] == "Soitettu"  # kept
    assert followup["contacted_at"] == t1.isoformat().replace("+00:00", "Z")  # the first time
    assert followup["resolved_at"] == api.clock.now.isoformat().replace("+00:00", "Z")

    # Reopened: no longer resolved; it was contacted, and the note can be cleared.
    api.clock.now += timedelta(hours=1)
    got = await patch(api, row.response_id, {"status": "open", "note": None})
    followup = got.json()["followup"]
    assert (followup["status"], followup["note"], followup["resolved_at"]) == ("open", None, None)
    assert followup["contacted_at"] == t1.isoformat().replace("+00:00", "Z")

    listed = (await api.get(status="open")).json()["items"]
    assert [i["response_id"] for i in listed] == [str(row.response_id)]


async def test_resolving_at_once_counts_as_contacted(api: Api) -> None:
    row = await api.add(score=9)
    got = await patch(api, row.response_id, {"status": "resolved", "note": "Kiitetty"})
    followup = got.json()["followup"]
    assert followup["contacted_at"] == followup["resolved_at"] is not None
    # A note alone changes only the note.
    got = await patch(api, row.response_id, {"note": "Kiitetty puhelimitse"})
    assert got.json()["followup"]["status"] == "resolved"
    assert got.json()["followup"]["note"] == "Kiitetty puhelimitse"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "closed"}, "status"),
        ({"status": "open", "note": "x" * 5001}, "note"),
        ({"status": "open", "assignee": "aino"}, "assignee"),
        ({"note": 5}, "note"),
        ({}, "status"),
        ([], "(body)"),
    ],
)
async def test_a_bad_follow_up_is_422_naming_the_field(api: Api, body: Any, field: str) -> None:
    row = await api.add()
    got = await patch(api, row.response_id, body)
    assert got.status_code == 422, got.text
    assert got.json()["error"]["field"] == field


async def test_patch_refuses_what_it_cannot_apply(api: Api) -> None:
    row = await api.add()
    unknown = await patch(api, uuid.uuid4(), {"status": "contacted"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    not_uuid = await patch(api, "nope", {"status": "contacted"})
    assert not_uuid.status_code == 422 and not_uuid.json()["error"]["field"] == "response_id"
    form = await api.http.patch(
        f"/v1/responses/{row.response_id}", data={"status": "contacted"}, headers=AUTH
    )
    assert form.status_code == 415
    broken = await api.http.patch(
        f"/v1/responses/{row.response_id}",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert broken.status_code == 422
    assert (await api.get()).json()["items"][0]["followup"]["status"] is None
