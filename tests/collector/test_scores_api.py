"""``GET /v1/scores`` on PostgreSQL and SQLite: the grouped rows summed from the cells equal a
brute-force recount of the answers, and bad parameters get a 422 naming the field."""

from __future__ import annotations

import itertools
import random
import statistics
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import select, update

from services.collector import alerting, api, cursors, erasure, repository, responses, scoring
from services.collector.config import local_day
from services.collector.models import (
    Base,
    ContactWait,
    DeliveryCell,
    DeliveryRollup,
    Invitation,
    Response,
    ScoreCell,
    ScoreRollup,
)
from services.common.config import DatabaseSettings
from services.common.db import create_engine, create_sessionmaker, create_tables, unit_of_work
from services.common.http import bearer_auth, install_error_handlers
from services.common.program import Program, parse_program
from tests.conftest import ROOT
from tests.support import client, run_migration_step

TOKEN = "scores-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ZONE = ZoneInfo("Europe/Helsinki")
FIRST_DAY = date(2026, 1, 1)
DAYS = 120
SEGMENT_VALUES: dict[str, list[str | None]] = {
    "touchpoint": ["delivery", "support", "billing", None],
    "channel": ["email", "sms"],
    "team": ["north", "south", "east", "west", None],
    "agent": [f"agent-{i}" for i in range(8)] + [None],
    "account_id": [f"acct-{i}" for i in range(5)] + [None],
}
SCALES = {"nps": (0, 10), "csat": (1, 5), "ces": (1, 7)}
MICROSECOND = timedelta(microseconds=1)


@pytest.fixture
def program() -> Program:
    """The local program and a CES survey."""
    raw = yaml.safe_load((ROOT / "deploy/local/program.yaml").read_text())
    raw["surveys"].append(
        {"id": "effort-ces", "metric": "ces", "question": {"en": "How easy was it?"}, "target": 5}
    )
    return parse_program(yaml.safe_dump(raw), "test")


@dataclass
class Clock:
    now: datetime = datetime(2026, 2, 10, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Stack:
    http: httpx.AsyncClient
    db: DatabaseSettings
    sessions: Any
    program: Program
    clock: Clock


@pytest.fixture
async def stack(database: DatabaseSettings, program: Program) -> AsyncIterator[Stack]:
    """The scores API, and the follow-up (PATCH /v1/responses/{id}) and erasure APIs that
    change what it counts, on a clock of the test's."""
    engine = create_engine(database)
    await create_tables(engine, Base.metadata, database.schema_name)
    sessions = create_sessionmaker(engine)
    clock = Clock()
    auth = bearer_auth(SecretStr(TOKEN))
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(
        api.router(
            program=program,
            sessions=sessions,
            auth=auth,
            min_n=30,
            cursor_key=cursors.cursor_key(SecretStr(TOKEN)),
            zone=ZONE,
        )
    )
    app.include_router(
        responses.router(
            sessions=sessions,
            auth=auth,
            cursor_key=cursors.cursor_key(SecretStr(TOKEN)),
            clock=clock,
        )
    )
    app.include_router(
        erasure.router(
            sessions=sessions,
            auth=auth,
            salt=SecretStr("salt"),
            on_change=lambda: None,
            clock=clock,
        )
    )
    async with client(app) as http:
        yield Stack(http, database, sessions, program, clock)
    await engine.dispose()


def at(rng: random.Random) -> datetime:
    """A moment within the DAYS days, often near midnight (where UTC and local days differ)."""
    day = FIRST_DAY + timedelta(days=rng.randrange(DAYS))
    minute = rng.choice([rng.randrange(24 * 60), rng.randrange(0, 180), rng.randrange(1320, 1440)])
    local = datetime.combine(day, datetime.min.time(), ZONE) + timedelta(minutes=minute)
    return local.astimezone(UTC)


async def fill(stack: Stack, answers: int, seed: int = 7) -> None:
    """``answers`` invitations through the repository as the collector stores them: most
    delivered, most answered, some answers changed, some skipped, some flagged as bots, some
    alerted and contacted."""
    rng = random.Random(seed)
    surveys = [(s.id, s.metric) for s in stack.program.surveys]
    for start in range(0, answers, 500):
        async with unit_of_work(stack.sessions) as session:
            invitations = []
            for _ in range(start, min(start + 500, answers)):
                survey_id, metric = rng.choice(surveys)
                invitations.append(
                    {
                        "invitation_id": uuid.uuid4(),
                        "token": uuid.uuid4().hex[:24],
                        "survey_id": survey_id,
                        "metric": metric,
                        "customer_id": f"cust-{rng.randrange(10_000)}",
                        "locale": "fi",
                        "survey_channel": "email",
                        "expires_at": datetime(2027, 1, 1, tzinfo=UTC),
                        "created_at": datetime(2025, 12, 1, tzinfo=UTC),
                        "case_id": None,
                        **{k: rng.choice(v) for k, v in SEGMENT_VALUES.items()},
                    }
                )
            await repository.store_invitations(session, invitations)
            stored = (
                (
                    await session.execute(
                        select(Invitation).where(
                            Invitation.invitation_id.in_([i["invitation_id"] for i in invitations])
                        )
                    )
                )
                .scalars()
                .all()
            )
            delivered = {}
            for inv in stored:
                if rng.random() < 0.9:
                    sent = at(rng)
                    delivered[inv.invitation_id] = (sent, local_day(sent, ZONE))
            await repository.mark_delivered(session, delivered)
            for inv in stored:
                if rng.random() < 0.25:
                    continue  # never answered
                low, high = SCALES[inv.metric]
                for _ in range(rng.choice([1, 1, 1, 2, 3])):  # changed answers: the last counts
                    when = at(rng)
                    score = None if rng.random() < 0.06 else rng.randint(low, high)
                    bot = "too_fast" if rng.random() < 0.03 else None
                    answer = await repository.save_response(
                        session,
                        inv,
                        score=score,
                        comment=None,
                        now=when,
                        day=local_day(when, ZONE),
                        bot_reason=bot,
                    )
                    # Now and then a follow-up before any alert (contacted_at first: a
                    # negative wait once an alert comes), and an alert on any revision (the
                    # first one sets alerted_at; a later change moves it to the new day).
                    if rng.random() < 0.05:
                        status = rng.choice(["contacted", "resolved"])
                        await repository.set_followup_status(
                            session, answer, status, later(rng, when, 3)
                        )
                    if rng.random() < 0.08:
                        alerted = later(rng, when, 10)
                        await repository.record_alert(
                            session, answer, rules=["r"], deliveries=[], now=alerted, due=alerted
                        )
                if rng.random() < 0.03 and not answer.suspected_bot:
                    await repository.flag_bot(session, answer, "trap")
                if answer.alerted_at is not None and rng.random() < 0.6:
                    # Contacted (PATCH status contacted or resolved), minutes to days later;
                    # a later status change keeps the first contacted_at.
                    for status in rng.choice([["contacted"], ["resolved"], ["contacted", "open"]]):
                        await repository.set_followup_status(
                            session, answer, status, later(rng, answer.alerted_at, 5000)
                        )
            # Some customers erased: their answers keep counting, without identity.
            for customer in {i["customer_id"] for i in invitations if rng.random() < 0.05}:
                await repository.erase_customer(session, customer, "hash", datetime.now(UTC))
            await session.flush()


def later(rng: random.Random, start: datetime, minutes: int) -> datetime:
    """A moment within ``minutes`` after ``start``, to the microsecond."""
    return start + timedelta(minutes=rng.randrange(minutes), microseconds=rng.randrange(60 * 10**6))


@dataclass
class Group:
    hist: dict[int, int] = field(default_factory=dict)
    responses: int = 0
    bots: int = 0
    delivered: int = 0
    alerts: int = 0
    waits: list[float] = field(default_factory=list)


def start_of(day: date, period: str) -> date | None:
    if period == "none":
        return None
    if period == "week":
        return day - timedelta(days=day.isoweekday() - 1)
    if period == "month":
        return date(day.year, day.month, 1)
    return day


async def stored(stack: Stack) -> tuple[Sequence[Response], Sequence[Invitation]]:
    """Every answer and invitation, as rows (what ``recount`` counts)."""
    async with unit_of_work(stack.sessions) as session:
        answers = (await session.execute(select(Response))).scalars().all()
        invitations = (await session.execute(select(Invitation))).scalars().all()
    return answers, invitations


def recount(
    rows: tuple[Sequence[Response], Sequence[Invitation]],
    period: str,
    segments: list[str],
    since: date | None,
    until: date | None,
) -> dict[tuple[Any, ...], Group]:
    """Every group recomputed from the answers and invitations themselves, no cells."""
    answers, invitations = rows
    groups: dict[tuple[Any, ...], Group] = defaultdict(Group)

    def key(row: Response | Invitation, day: date) -> tuple[Any, ...] | None:
        if (since is not None and day < since) or (until is not None and day >= until):
            return None
        values = tuple(getattr(row, api.GROUPS[s]) for s in segments)
        return (row.survey_id, start_of(day, period), values)

    for r in answers:
        k = key(r, r.day)
        if k is None:
            continue
        g = groups[k]
        if r.suspected_bot:
            g.bots += 1
        else:
            g.responses += 1
            if r.score is not None:
                g.hist[r.score] = g.hist.get(r.score, 0) + 1
        if r.alerted_at is not None:
            g.alerts += 1
            if r.contacted_at is not None:
                g.waits.append((r.contacted_at - r.alerted_at).total_seconds() / 60)
    for inv in invitations:
        if inv.delivered_at is not None:
            k = key(inv, local_day(inv.delivered_at, ZONE))
            if k is not None:
                groups[k].delivered += 1
    return groups


def previous_start(start: date, period: str) -> date:
    if period == "day":
        return start - timedelta(days=1)
    if period == "week":
        return start - timedelta(days=7)
    return (start - timedelta(days=1)).replace(day=1)


def check_row(row: dict[str, Any], g: Group, before: Group | None, metric: str) -> None:
    s = scoring.score(metric, g.hist)
    assert (row["n"], row["responses"], row["suspected_bots"], row["delivered"]) == (
        s.n,
        g.responses,
        g.bots,
        g.delivered,
    )
    for name in ("value", "ci_low", "ci_high"):
        assert row[name] == pytest.approx(getattr(s, name)), name
    if metric == "nps":
        assert (row["promoters"], row["passives"], row["detractors"]) == (
            s.promoters,
            s.passives,
            s.detractors,
        )
    else:
        assert row["top_box"] == s.top_box
    assert row["low_n"] is (s.n < 30)
    rate = g.responses / g.delivered if g.delivered else None
    assert row["response_rate"] == pytest.approx(rate)
    assert row["alerts"] == g.alerts
    assert row["loop_closure_rate"] == pytest.approx(len(g.waits) / g.alerts if g.alerts else None)
    # Exact, not approximately: the median of the waits to the microsecond.
    assert row["median_minutes_to_contact"] == (statistics.median(g.waits) if g.waits else None)
    moved = scoring.change(metric, g.hist, before.hist if before else {})
    assert row["previous"] == pytest.approx(moved.previous)
    assert row["change"] == pytest.approx(moved.change)
    assert row["p_value"] == pytest.approx(moved.p_value)


COMBINATIONS = [
    # period, group_by, from, to
    ("none", [], None, None),
    ("none", ["team"], "2026-02-01", "2026-03-01"),
    ("none", ["touchpoint", "channel"], "2026-03-10", "2026-04-10"),
    ("month", [], None, None),
    ("month", ["team"], "2026-02-01", "2026-05-01"),
    ("week", ["agent"], "2026-01-05", "2026-03-02"),
    ("week", [], "2026-01-07", "2026-02-11"),  # widened to whole ISO weeks
    ("day", ["account"], "2026-02-01", "2026-02-15"),
    ("day", ["team", "agent"], "2026-03-01", "2026-03-04"),
    # The roll-ups (at most one segment): partial months at both ends (day grain) around
    # whole months (month grain), one end open, no whole month at all, each segment.
    ("none", [], "2026-01-10", "2026-03-20"),
    ("none", ["touchpoint"], "2026-01-10", "2026-04-05"),
    ("none", ["channel"], "2026-01-31", "2026-02-02"),
    ("none", ["agent"], "2026-02-15", None),
    ("none", ["account"], None, "2026-03-15"),
    ("none", ["team"], "2026-01-01", "2026-04-01"),
    ("month", ["account"], None, None),
    ("month", ["channel"], "2026-01-20", "2026-03-10"),
    ("month", ["touchpoint"], "2026-02-01", None),
    ("week", ["channel"], None, "2026-02-01"),
    ("day", ["touchpoint"], "2026-01-30", "2026-02-03"),
    # Two or more segments but the account: the roll-ups of a pair (team and agent,
    # touchpoint and channel) or of every segment but the account.
    ("month", ["touchpoint", "channel", "team"], None, None),
    ("none", ["agent", "team"], "2026-01-10", "2026-03-20"),
    ("week", ["channel", "agent"], "2026-02-01", "2026-03-01"),
    ("month", ["channel", "touchpoint"], "2026-01-01", "2026-03-01"),
    # The account and other segments: by whole months the month roll-ups of the account with
    # one other segment, with the touchpoint and channel, or with the team and agent; else the
    # full cells.
    ("month", ["account", "team"], "2026-01-01", "2026-04-01"),
    ("month", ["channel", "account"], None, None),
    ("none", ["account", "touchpoint", "channel"], "2026-02-01", "2026-04-01"),
    ("none", ["account", "channel"], "2026-02-01", "2026-04-01"),
    ("none", ["account", "team"], "2026-01-10", "2026-03-20"),
    ("month", ["agent", "account"], "2026-02-01", "2026-04-01"),
    ("month", ["account", "touchpoint"], "2026-01-01", None),
    ("none", ["account", "agent"], "2026-01-10", "2026-03-20"),
    ("month", ["account", "team", "agent"], "2026-02-01", "2026-04-01"),
    ("none", ["account", "team", "agent"], "2026-01-10", "2026-03-20"),
    ("month", ["account", "channel", "agent"], "2026-02-01", "2026-04-01"),
    ("day", ["account", "channel", "touchpoint"], "2026-03-01", "2026-03-03"),
    # Ranges that start weeks or months before the first answer: a page's first windows of
    # periods find nothing (read a few periods at a time, the windows grow).
    ("week", ["team"], "2025-11-03", "2026-02-02"),
    ("month", ["account", "touchpoint", "agent"], "2025-10-01", "2026-03-01"),
    # The full cells without a period: a page read a few touchpoints at a time.
    ("none", ["account", "touchpoint", "agent"], "2026-01-10", "2026-03-20"),
]


async def paged(stack: Stack, params: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """Every row of a report, page by page (``limit`` rows at most each), as a client reads it:
    following ``next_cursor`` until it is null."""
    rows: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        page = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        r = await stack.http.get("/v1/scores", params=page, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["rows"]) <= limit
        rows += body["rows"]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows
        assert len(body["rows"]) == limit  # only the last page is short
    raise AssertionError("the pages did not end")


async def test_grouped_rows_equal_a_recount_of_the_answers(
    stack: Stack, database: DatabaseSettings
) -> None:
    await fill(stack, 2500)
    rows = await stored(stack)
    metric = {s.id: s.metric for s in stack.program.surveys}
    target = {s.id: s.target for s in stack.program.surveys}
    tested = paged_rows = 0
    for i, (period, group_by, since, until) in enumerate(COMBINATIONS):
        params: dict[str, Any] = {"period": period, "group_by": ",".join(group_by)}
        if since:
            params["from"] = since
        if until:
            params["to"] = until
        r = await stack.http.get("/v1/scores", params={**params, "limit": 50000}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        label = f"{period} {group_by} {since}..{until}"
        # The documented shape (the OpenAPI schema's), every field of every row, in order.
        api.ScoresOut.model_validate(body)
        assert list(body) == [
            "time_zone",
            "from",
            "to",
            "period",
            "group_by",
            "min_n",
            "rows",
            "next_cursor",
        ]
        assert body["next_cursor"] is None
        # Page by page the same rows in the same order: of every survey, or of one (the
        # reads differ: one survey's pages are ranges of the roll-ups' index).
        if i % 2:
            one = stack.program.surveys[i % 3].id
            alone = [row for row in body["rows"] if row["survey"] == one]
            assert await paged(stack, {**params, "survey": one}, 7) == alone, label
        else:
            assert await paged(stack, params, 29) == body["rows"], label
        paged_rows += len(body["rows"])
        assert all(list(row) == list(api.ScoreRow.model_fields) for row in body["rows"]), label
        lo, hi = body["from"], body["to"]
        lo_day = date.fromisoformat(lo) if lo else None
        hi_day = date.fromisoformat(hi) if hi else None
        if period != "none" and since:  # widened to whole periods
            assert lo_day == start_of(date.fromisoformat(since), period), label
        if period != "none" and until:
            assert hi_day is not None and start_of(hi_day, period) == hi_day, label
        expected = recount(rows, period, group_by, lo_day, hi_day)
        if period == "none" and lo_day is not None:  # `to` defaults to tomorrow
            end = hi_day or datetime.now(ZONE).date() + timedelta(days=1)
            earlier = recount(rows, period, group_by, lo_day - (end - lo_day), lo_day)
        elif period == "none":  # all time: nothing before it to compare with
            earlier = {}
        else:
            earlier = recount(rows, period, group_by, None, hi_day)
        got = {
            (row["survey"], row["period_start"], tuple(row["group"][g] for g in group_by)): row
            for row in body["rows"]
        }
        want = {
            (k[0], None if k[1] is None else k[1].isoformat(), k[2]): g for k, g in expected.items()
        }
        if period == "none" and not group_by:
            for s in stack.program.surveys:
                want.setdefault((s.id, None, ()), Group())
        assert set(got) == set(want), label
        assert len(got) == len(body["rows"]), label
        for k, row in got.items():
            start = None if k[1] is None else date.fromisoformat(k[1])
            before_key = (k[0], None if start is None else previous_start(start, period), k[2])
            check_row(row, want[k], earlier.get(before_key), metric[k[0]])
            assert row["target"] == target[k[0]]
            assert row["metric"] == metric[k[0]]
            tested += row["p_value"] is not None
    assert tested > 100  # the changes were compared, not all left out
    assert paged_rows > 2000  # most reports had many pages
    # The rows are not trivially empty: most answers were counted.
    whole = (await stack.http.get("/v1/scores", headers=AUTH)).json()["rows"]
    assert sum(row["n"] for row in whole) > 1500
    assert sum(row["suspected_bots"] for row in whole) > 50
    assert all(0 < row["response_rate"] < 1 for row in whole)
    # ... and so were the alerts, the contacts and their waits.
    assert sum(row["alerts"] for row in whole) > 100
    assert all(0.3 < row["loop_closure_rate"] < 0.9 for row in whole)
    assert all(row["median_minutes_to_contact"] > 60 for row in whole)


@pytest.mark.parametrize(
    ("period", "since", "until", "segments"),
    [
        # Whole months without a period: read month by month (a range of the index each).
        ("none", date(2026, 1, 1), date(2026, 4, 1), ("team",)),
        ("none", date(2026, 2, 1), date(2026, 4, 1), ("channel", "account_id")),
        # Whole weeks: a range of the week roll-ups' index.
        ("week", date(2025, 12, 29), date(2026, 4, 6), ("agent",)),
        # Partial weeks at both ends (the API widens to whole weeks; the repository need not):
        # their days from the day roll-ups, a page read a few weeks at a time.
        ("week", date(2025, 12, 31), date(2026, 4, 8), ("agent",)),
        # The full cells: a page of a period read a few touchpoints (or channels) at a time.
        ("month", date(2026, 1, 1), date(2026, 4, 1), ("channel", "agent", "account_id")),
        ("none", date(2026, 1, 10), date(2026, 3, 20), ("touchpoint", "agent", "account_id")),
    ],
)
async def test_a_range_of_groups_is_the_same_groups_of_the_whole_read(
    stack: Stack, period: str, since: date, until: date, segments: tuple[str, ...]
) -> None:
    """Reads of a range of groups (from and after a group, up to one, the first few: what a
    page and its previous period read) give those groups of the whole read, summed alike, over
    every survey."""
    await fill(stack, 600, seed=5)
    q = repository.CellQuery(
        tuple(s.id for s in stack.program.surveys), since, until, period, segments
    )
    async with unit_of_work(stack.sessions) as session:
        whole = await repository.cell_counts(session, q)
        assert len({g[0] for g, _ in whole}) == 3 and len(whole) >= 12
        a, b = whole[2][0], whole[-3][0]
        for r, want in [
            (repository.KeyRange(a, True, b), whole[2:-2]),
            (repository.KeyRange(a, False, b), whole[3:-2]),
            (repository.KeyRange(a, False, None, 7), whole[3:10]),
            (repository.KeyRange(None, False, None, 4), whole[:4]),
            (repository.KeyRange(whole[-3][0], False, None, 9), whole[-2:]),
        ]:
            assert await repository.cell_counts(session, q, r) == want, r
        # A range within one survey and period (the one with the most groups: the generated
        # answers' days vary from run to run): its reads are bounded by the first segment's
        # values of its first and last group too.
        by_period = Counter(g[:2] for g, _ in whole)
        busiest = max(by_period, key=lambda k: by_period[k])
        same = [i for i, (g, _) in enumerate(whole) if g[:2] == busiest]
        assert len(same) >= 4
        i, j = same[1], same[-2]
        r = repository.KeyRange(whole[i][0], True, whole[j][0])
        assert whole[i][0][2][0] != whole[j][0][2][0] or len(segments) == 1
        assert await repository.cell_counts(session, q, r) == whole[i : j + 1]


async def test_a_page_read_month_by_month_skips_rows_that_came_down_to_nothing(
    stack: Stack,
) -> None:
    """A page without a period over whole months is read up to the group its months' first
    keys reach (``_page_end``); roll-up rows whose answers and deliveries all moved away are
    among those keys but are no group: the page still holds as many groups as it may, the
    ones after them too."""
    await fill(stack, 600, seed=5)
    survey = stack.program.surveys[0].id
    q = repository.CellQuery((survey,), date(2026, 1, 1), date(2026, 4, 1), "none", ("agent",))
    async with unit_of_work(stack.sessions) as session:
        before = await repository.cell_counts(session, q)
        assert len(before) >= 9
        # The first three agents' month rows come down to nothing, as when every answer and
        # delivery of theirs moved to another agent.
        gone = [g[2][0] for g, _ in before[:3]]
        month_rows = {"survey_id": survey, "grain": "month", "dim": "agent"}
        for model in (ScoreRollup, DeliveryRollup):
            key = set(model.__table__.primary_key.columns.keys())
            counts = {c.name: 0 for c in model.__table__.c if c.name not in key}
            await session.execute(
                update(model)
                .where(*(getattr(model, k) == v for k, v in month_rows.items()))
                .where(model.agent.in_(gone))
                .values(counts)
            )
        whole = await repository.cell_counts(session, q)
        assert whole == before[3:]
        for limit in (1, 4, 5):
            r = repository.KeyRange(None, False, None, limit)
            assert await repository.cell_counts(session, q, r) == whole[:limit], limit
            r = repository.KeyRange(before[1][0], False, None, limit)
            assert await repository.cell_counts(session, q, r) == whole[:limit], limit


async def test_cells_equal_a_recount_and_rollups_equal_the_cells(stack: Stack) -> None:
    """The score cells (answers, alerts, contacts) and the contact waits equal a recount of the
    answers, and every roll-up row is the sum of the cells it covers (changed answers, bots,
    alerts, follow-ups and deliveries moved them around), for each grain and each segment."""
    await fill(stack, 800, seed=11)
    async with unit_of_work(stack.sessions) as session:
        answers = (await session.execute(select(Response))).scalars().all()
        cells = (await session.execute(select(ScoreCell))).scalars().all()
        waits = (await session.execute(select(ContactWait))).scalars().all()
        rollups = (await session.execute(select(ScoreRollup))).scalars().all()
        delivery_cells = (await session.execute(select(DeliveryCell))).scalars().all()
        delivery_rollups = (await session.execute(select(DeliveryRollup))).scalars().all()

    def cell_of(row: Any) -> tuple[Any, ...]:
        return (row.survey_id, row.day, *(getattr(row, f) or "" for f in repository.SEGMENTS))

    want_cells: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    want_waits: dict[uuid.UUID, tuple[Any, ...]] = {}
    for r in answers:
        score = repository.NO_SCORE if r.score is None else r.score
        counts = want_cells[(*cell_of(r), score, r.suspected_bot)]
        counts["n"] += 1
        if r.alerted_at is not None:
            counts["alerted"] += 1
            if r.contacted_at is not None:
                counts["contacted"] += 1
                wait = (r.contacted_at - r.alerted_at) // MICROSECOND
                want_waits[r.response_id] = (*cell_of(r), wait)
    got_cells = {
        (*cell_of(c), c.score, c.suspected_bot): Counter(
            {"n": c.n, "alerted": c.alerted, "contacted": c.contacted}
        )
        for c in cells
    }
    assert {k: +c for k, c in got_cells.items() if +c} == want_cells
    assert {w.response_id: (*cell_of(w), w.wait_us) for w in waits} == want_waits
    assert sum(c["alerted"] for c in want_cells.values()) > 30
    assert len(want_waits) > 20
    assert any(key[-1] < 0 for key in want_waits.values())  # contacted before the alert

    def rollup_keys(c: Any) -> list[tuple[Any, ...]]:
        return [
            (
                c.survey_id,
                grain,
                ",".join(grouping),
                bucket,
                *(getattr(c, s) if s in grouping else "" for s in repository.SEGMENTS),
            )
            for grain, bucket in (
                ("day", c.day),
                ("week", c.day - timedelta(days=c.day.weekday())),
                ("month", c.day.replace(day=1)),
            )
            for grouping in repository.GRAIN_SETS[grain]
        ]

    def key_of(r: Any) -> tuple[Any, ...]:
        return (
            r.survey_id,
            r.grain,
            r.dim,
            r.bucket,
            *(getattr(r, s) for s in repository.SEGMENTS),
        )

    want: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    for c in cells:
        column = "bots" if c.suspected_bot else repository.SCORE_COLUMNS[c.score]
        for key in rollup_keys(c):
            want[key].update({column: c.n, "alerted": c.alerted, "contacted": c.contacted})
    columns = [*repository.SCORE_COLUMNS.values(), "bots", "alerted", "contacted"]
    got = {key_of(r): Counter({col: getattr(r, col) for col in columns}) for r in rollups}
    assert {k: +c for k, c in got.items() if +c} == {k: +c for k, c in want.items() if +c}

    want_delivered: Counter[tuple[Any, ...]] = Counter()
    for d in delivery_cells:
        for key in rollup_keys(d):
            want_delivered[key] += d.n
    got_delivered = Counter({key_of(r): r.n for r in delivery_rollups})
    assert +got_delivered == +want_delivered
    assert sum(want_delivered.values()) > 1000


@pytest.mark.parametrize(
    ("migration", "grain", "sets"),
    [
        (
            "0002_account_month_rollups",
            "month",
            [("account_id", "touchpoint", "channel"), ("account_id", "team")],
        ),
        (
            "0003_more_account_month_rollups",
            "month",
            [("account_id", "touchpoint"), ("account_id", "channel"), ("account_id", "agent")],
        ),
        ("0004_week_rollups", "week", list(repository.ROLLUP_SETS)),
        ("0005_account_team_agent_month_rollups", "month", [("account_id", "team", "agent")]),
    ],
)
async def test_the_upgrade_fills_the_new_rollups_as_the_collector_keeps_them(
    stack: Stack, migration: str, grain: str, sets: list[tuple[str, ...]]
) -> None:
    """A collector upgraded from the release before had no roll-ups of these sets at this
    grain (the account with other segments by month; every set by week): the migration fills
    them from what was counted, equal to what the collector keeps from then on (the rows
    ``fill`` made through the repository), and its downgrade removes them."""
    assert set(sets) <= set(repository.GRAIN_SETS[grain])
    await fill(stack, 600, seed=5)
    dims = [",".join(g) for g in sets]
    tables = (ScoreRollup, DeliveryRollup)

    async def snapshot() -> list[set[tuple[Any, ...]]]:
        async with unit_of_work(stack.sessions) as session:
            out = []
            for table in tables:
                rows = await session.execute(
                    select(table).where(table.grain == grain, table.dim.in_(dims))
                )
                out.append(
                    {
                        tuple(v for k, v in vars(r).items() if not k.startswith("_"))
                        for r in rows.scalars()
                    }
                )
            return out

    kept = await snapshot()
    assert all(len(rows) > 100 for rows in kept), [len(rows) for rows in kept]

    async def run(step: str) -> None:
        async with unit_of_work(stack.sessions) as session:
            connection = await session.connection()
            await connection.run_sync(run_migration_step, "collector", migration, step)

    await run("downgrade")
    assert await snapshot() == [set(), set()]
    await run("upgrade")
    assert await snapshot() == kept
    await run("upgrade")  # again, over rows already there (the rebuild after a roll)
    assert await snapshot() == kept


async def test_close_the_loop_figures_follow_alerts_contacts_and_changes(stack: Stack) -> None:
    """What a team sees while it closes the loop: alerts (the program's nps-detractor rule),
    contacts recorded with PATCH /v1/responses/{id}, the exact median wait (to the
    microsecond), an answer changed after its alert (it moves to its new day), a contact
    before the alert (a negative wait), a bot flag and an erasure (neither changes them)."""
    t0 = datetime(2026, 2, 10, 10, 0, tzinfo=UTC)
    ids = {name: uuid.uuid4() for name in "abcd"}
    async with unit_of_work(stack.sessions) as session:
        await repository.store_invitations(
            session,
            [
                {
                    "invitation_id": ids[name],
                    "token": f"close-the-loop-{name}",
                    "survey_id": "relationship-nps",
                    "metric": "nps",
                    "customer_id": f"cust-{name}",
                    "locale": "fi",
                    "survey_channel": "email",
                    "expires_at": datetime(2027, 1, 1, tzinfo=UTC),
                    "created_at": t0,
                    "team": "north",
                }
                for name in ids
            ],
        )

    async def answer(name: str, score: int, when: datetime) -> uuid.UUID:
        async with unit_of_work(stack.sessions) as session:
            inv = await repository.invitation_by_token(session, f"close-the-loop-{name}")
            assert inv is not None
            saved = await repository.save_response(
                session, inv, score=score, comment=None, now=when, day=local_day(when, ZONE)
            )
            await alerting.record(session, stack.program, saved, when)
            return saved.response_id

    async def follow_up(response_id: uuid.UUID, status: str, when: datetime) -> None:
        stack.clock.now = when
        r = await stack.http.patch(
            f"/v1/responses/{response_id}", json={"status": status}, headers=AUTH
        )
        assert r.status_code == 200, r.text

    async def figures(period: str = "none") -> dict[str | None, tuple[Any, ...]]:
        r = await stack.http.get(
            "/v1/scores",
            params={
                "survey": "relationship-nps",
                "from": "2026-02-01",
                "to": "2026-04-01",
                "period": period,
                "group_by": "team",
            },
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
        return {
            row["period_start"]: (
                row["alerts"],
                row["loop_closure_rate"],
                row["median_minutes_to_contact"],
                row["suspected_bots"],
            )
            for row in r.json()["rows"]
        }

    a = await answer("a", 3, t0)
    await answer("b", 2, t0 + timedelta(hours=1))
    c = await answer("c", 9, t0 + timedelta(hours=1))  # a promoter: no alert
    d = await answer("d", 5, t0 + timedelta(hours=2))
    assert await figures() == {None: (3, 0.0, None, 0)}

    waited = timedelta(minutes=10, seconds=30, microseconds=250)
    await follow_up(a, "contacted", t0 + waited)
    wait_a = waited.total_seconds() / 60  # 10.504170833… minutes, to the microsecond
    assert await figures() == {None: (3, 1 / 3, wait_a, 0)}
    await follow_up(d, "resolved", t0 + timedelta(hours=2, minutes=20))  # contacted too
    assert await figures() == {None: (3, 2 / 3, (wait_a + 20) / 2, 0)}
    await follow_up(a, "open", t0 + timedelta(days=1))  # contacted_at stays the first one
    await follow_up(a, "resolved", t0 + timedelta(days=2))
    assert await figures() == {None: (3, 2 / 3, (wait_a + 20) / 2, 0)}

    # Contacted before any alert: not an alert yet. Then the customer changes the answer to a
    # detractor's: alerted after the contact, a wait of −30 minutes.
    await follow_up(c, "contacted", t0 + timedelta(hours=2, minutes=30))
    assert await figures() == {None: (3, 2 / 3, (wait_a + 20) / 2, 0)}
    await answer("c", 1, t0 + timedelta(hours=3))
    assert await figures() == {None: (4, 3 / 4, wait_a, 0)}

    # B changes its answer in March: its alert moves with it, out of February.
    await answer("b", 0, datetime(2026, 3, 5, 12, 0, tzinfo=UTC))
    assert await figures("month") == {
        "2026-02-01": (3, 1.0, wait_a, 0),
        "2026-03-01": (1, 0.0, None, 0),
    }

    # A bot flag keeps D's alert (it was raised and handled); an erasure keeps A's figures.
    async with unit_of_work(stack.sessions) as session:
        found = await repository.response_by_id(session, d)
        assert found is not None
        await repository.flag_bot(session, found, "trap")
    erased = await stack.http.delete("/v1/customers/cust-a", headers=AUTH)
    assert erased.status_code == 202
    assert await figures("month") == {
        "2026-02-01": (3, 1.0, wait_a, 1),
        "2026-03-01": (1, 0.0, None, 0),
    }
    # The multi-segment path (the cells) says the same.
    r = await stack.http.get(
        "/v1/scores",
        params={"survey": "relationship-nps", "period": "month", "group_by": "team,agent"},
        headers=AUTH,
    )
    assert [
        (row["alerts"], row["loop_closure_rate"], row["median_minutes_to_contact"])
        for row in r.json()["rows"]
    ] == [(3, 1.0, wait_a), (1, 0.0, None)]


@pytest.mark.parametrize(
    ("period", "since", "until", "ranges"),
    [
        ("day", date(2026, 1, 5), None, [("day", date(2026, 1, 5), None)]),
        ("week", None, None, [("week", None, None)]),
        # 2026-01-05 and -12 are Mondays.
        (
            "week",
            date(2026, 1, 5),
            date(2026, 2, 2),
            [("week", date(2026, 1, 5), date(2026, 2, 2))],
        ),
        (
            "week",
            date(2026, 1, 7),
            date(2026, 2, 4),
            [
                ("day", date(2026, 1, 7), date(2026, 1, 12)),
                ("week", date(2026, 1, 12), date(2026, 2, 2)),
                ("day", date(2026, 2, 2), date(2026, 2, 4)),
            ],
        ),
        (
            "week",
            date(2026, 1, 7),
            date(2026, 1, 16),
            [("day", date(2026, 1, 7), date(2026, 1, 16))],
        ),
        (
            "month",
            date(2026, 1, 1),
            date(2026, 3, 1),
            [("month", date(2026, 1, 1), date(2026, 3, 1))],
        ),
        ("none", None, None, [("month", None, None)]),
        (
            "none",
            date(2026, 1, 10),
            date(2026, 3, 20),
            [
                ("day", date(2026, 1, 10), date(2026, 2, 1)),
                ("month", date(2026, 2, 1), date(2026, 3, 1)),
                ("day", date(2026, 3, 1), date(2026, 3, 20)),
            ],
        ),
        (
            "none",
            date(2026, 1, 10),
            date(2026, 2, 20),
            [("day", date(2026, 1, 10), date(2026, 2, 20))],
        ),
        (
            "none",
            date(2026, 1, 10),
            date(2026, 1, 20),
            [("day", date(2026, 1, 10), date(2026, 1, 20))],
        ),
        (
            "none",
            date(2026, 1, 10),
            None,
            [("day", date(2026, 1, 10), date(2026, 2, 1)), ("month", date(2026, 2, 1), None)],
        ),
        (
            "none",
            None,
            date(2026, 3, 20),
            [("month", None, date(2026, 3, 1)), ("day", date(2026, 3, 1), date(2026, 3, 20))],
        ),
        (
            "none",
            date(2026, 1, 1),
            date(2026, 2, 1),
            [("month", date(2026, 1, 1), date(2026, 2, 1))],
        ),
    ],
)
def test_rollup_ranges(
    period: str, since: date | None, until: date | None, ranges: list[Any]
) -> None:
    q = repository.CellQuery(("s",), since, until, period, ("team",))
    assert repository.rollup_ranges(q) == ranges
    # No gap and no overlap: each range ends where the next begins.
    assert (ranges[0][1], ranges[-1][2]) == (since, until)
    assert all(a[2] == b[1] for a, b in itertools.pairwise(ranges))


@pytest.mark.parametrize(
    ("segments", "grouping"),
    [
        ((), ()),
        (("team",), ("team",)),
        (("account_id",), ("account_id",)),
        (("agent", "team"), ("team", "agent")),
        (("channel", "touchpoint"), ("touchpoint", "channel")),
        (("channel", "team"), ("touchpoint", "channel", "team", "agent")),
        (("touchpoint", "channel", "team", "agent"), ("touchpoint", "channel", "team", "agent")),
        # The account with another segment: kept by the month alone.
        (("team", "account_id"), ("account_id", "team")),
        (("account_id", "channel"), ("account_id", "channel")),
        (("account_id", "agent"), ("account_id", "agent")),
        (("touchpoint", "account_id"), ("account_id", "touchpoint")),
        (("account_id", "touchpoint", "channel"), ("account_id", "touchpoint", "channel")),
        (("account_id", "team", "agent"), ("account_id", "team", "agent")),
        (("account_id", "team", "channel"), None),  # the full cells
        (("account_id", "touchpoint", "agent"), None),
    ],
)
def test_rollup_set(segments: tuple[str, ...], grouping: tuple[str, ...] | None) -> None:
    q = repository.CellQuery(("s",), None, None, "month", segments)
    assert repository.rollup_set(q) == grouping


@pytest.mark.parametrize(
    ("period", "since", "until", "grouping"),
    [
        ("month", date(2026, 1, 1), date(2026, 3, 1), ("account_id", "team")),
        ("none", date(2026, 1, 1), date(2026, 3, 1), ("account_id", "team")),
        ("none", None, None, ("account_id", "team")),
        ("month", date(2026, 1, 10), date(2026, 3, 1), None),  # widened by the API, not here
        ("none", date(2026, 1, 1), date(2026, 2, 20), None),  # a partial month: the day grain
        ("week", date(2026, 1, 5), date(2026, 2, 2), None),
        ("day", date(2026, 1, 1), date(2026, 2, 1), None),
    ],
)
def test_the_account_with_another_segment_is_kept_by_the_month_only(
    period: str, since: date | None, until: date | None, grouping: tuple[str, ...] | None
) -> None:
    q = repository.CellQuery(("s",), since, until, period, ("account_id", "team"))
    assert repository.rollup_set(q) == grouping


D = date  # (short: the tables below)


@pytest.mark.parametrize(
    ("period", "since", "until", "segments", "parts"),
    [
        # A set covers the segments at every grain read: the roll-ups alone.
        ("none", D(2026, 1, 10), D(2026, 3, 20), ("team",), [(D(2026, 1, 10), D(2026, 3, 20), 1)]),
        (
            "none",
            D(2026, 1, 1),
            D(2026, 3, 1),
            ("account_id", "team"),
            [(D(2026, 1, 1), D(2026, 3, 1), 1)],
        ),
        # The account and another segment over more than whole months: the whole months from
        # the month roll-ups, the days around them from the cells.
        (
            "none",
            D(2025, 12, 31),
            D(2026, 4, 1),
            ("account_id", "team"),
            [(D(2025, 12, 31), D(2026, 1, 1), 0), (D(2026, 1, 1), D(2026, 4, 1), 1)],
        ),
        (
            "none",
            D(2026, 1, 10),
            D(2026, 3, 20),
            ("agent", "account_id"),
            [
                (D(2026, 1, 10), D(2026, 2, 1), 0),
                (D(2026, 2, 1), D(2026, 3, 1), 1),
                (D(2026, 3, 1), D(2026, 3, 20), 0),
            ],
        ),
        (
            "none",
            D(2026, 2, 1),
            D(2026, 3, 2),
            ("account_id", "team", "agent"),
            [(D(2026, 2, 1), D(2026, 3, 1), 1), (D(2026, 3, 1), D(2026, 3, 2), 0)],
        ),
        (
            "none",
            None,
            D(2026, 3, 20),
            ("account_id", "channel"),
            [(None, D(2026, 3, 1), 1), (D(2026, 3, 1), D(2026, 3, 20), 0)],
        ),
        # No whole month, by week or day, or no set of the segments at all: the cells alone.
        (
            "none",
            D(2026, 1, 10),
            D(2026, 2, 20),
            ("account_id", "team"),
            [(D(2026, 1, 10), D(2026, 2, 20), 0)],
        ),
        (
            "week",
            D(2026, 1, 5),
            D(2026, 3, 2),
            ("account_id", "team"),
            [(D(2026, 1, 5), D(2026, 3, 2), 0)],
        ),
        (
            "none",
            D(2026, 1, 10),
            D(2026, 3, 20),
            ("touchpoint", "agent", "account_id"),
            [(D(2026, 1, 10), D(2026, 3, 20), 0)],
        ),
    ],
)
def test_sources_read_whole_months_from_the_rollups_and_the_days_around_them_from_the_cells(
    period: str,
    since: date | None,
    until: date | None,
    segments: tuple[str, ...],
    parts: list[tuple[date | None, date | None, int]],
) -> None:
    q = repository.CellQuery(("s",), since, until, period, segments)
    got = repository.sources(q)
    assert [(p.since, p.until, int(rollups)) for p, rollups in got] == parts
    assert all((p.surveys, p.period, p.segments) == (q.surveys, period, segments) for p, _ in got)


async def test_survey_and_metric_filters(stack: Stack) -> None:
    await fill(stack, 300, seed=3)
    one = await stack.http.get("/v1/scores", params={"survey": "support-csat"}, headers=AUTH)
    assert [row["survey"] for row in one.json()["rows"]] == ["support-csat"]
    assert one.json()["rows"][0]["top_box"] is not None
    two = await stack.http.get(
        "/v1/scores", params=[("survey", "support-csat"), ("survey", "effort-ces")], headers=AUTH
    )
    assert [row["survey"] for row in two.json()["rows"]] == ["effort-ces", "support-csat"]
    comma = await stack.http.get(
        "/v1/scores", params={"survey": "support-csat,effort-ces"}, headers=AUTH
    )
    assert comma.json()["rows"] == two.json()["rows"]
    nps = await stack.http.get("/v1/scores", params={"metric": "nps"}, headers=AUTH)
    assert {row["metric"] for row in nps.json()["rows"]} == {"nps"}
    assert nps.json()["time_zone"] == "Europe/Helsinki"


async def test_a_survey_without_answers_has_an_empty_row(stack: Stack) -> None:
    r = await stack.http.get(
        "/v1/scores",
        params={"survey": "relationship-nps", "from": "2026-01-01", "to": "2026-02-01"},
        headers=AUTH,
    )
    assert r.status_code == 200
    (row,) = r.json()["rows"]
    assert (row["n"], row["value"], row["ci_low"], row["p_value"]) == (0, None, None, None)
    assert (row["response_rate"], row["loop_closure_rate"], row["low_n"]) == (None, None, True)
    assert row["target"] == 40


async def test_a_scores_cursor_is_signed_and_bound_to_its_report(stack: Stack) -> None:
    await fill(stack, 300)
    report = {"survey": "relationship-nps", "period": "month", "group_by": "team"}
    first = (await stack.http.get("/v1/scores", params={**report, "limit": 2}, headers=AUTH)).json()
    cursor = first["next_cursor"]
    assert cursor and len(first["rows"]) == 2
    # Another report (another grouping, period or range) refuses it; the page size may change.
    for change in ({"group_by": "agent"}, {"period": "week"}, {"from": "2026-02-01"}):
        other = await stack.http.get(
            "/v1/scores", params={**report, **change, "cursor": cursor}, headers=AUTH
        )
        assert other.status_code == 422 and other.json()["error"]["field"] == "cursor", change
    data, _, sig = cursor.partition(".")
    forged = await stack.http.get(
        "/v1/scores", params={**report, "cursor": f"{data}.{sig[::-1]}"}, headers=AUTH
    )
    assert forged.status_code == 422 and forged.json()["error"]["field"] == "cursor"
    rest = await stack.http.get(
        "/v1/scores", params={**report, "cursor": cursor, "limit": 1000}, headers=AUTH
    )
    assert rest.status_code == 200 and rest.json()["next_cursor"] is None
    whole = await stack.http.get("/v1/scores", params=report, headers=AUTH)
    assert first["rows"] + rest.json()["rows"] == whole.json()["rows"]


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"from": "2026-13-01"}, 422, "from"),
        ({"from": "yesterday"}, 422, "from"),
        ({"to": "2026-02-30"}, 422, "to"),
        ({"from": "2026-01-01T00:00:00Z"}, 422, "from"),
        ({"from": "2026-02-01", "to": "2026-02-01"}, 422, "to"),
        ({"from": "2026-03-01", "to": "2026-02-01"}, 422, "to"),
        ({"period": "year"}, 422, "period"),
        ({"group_by": "region"}, 422, "group_by"),
        ({"group_by": "team,customer"}, 422, "group_by"),
        ({"metric": "ces+"}, 422, "metric"),
        ({"survey": "relationship-nps", "metric": "csat"}, 422, "metric"),
        ({"survey": "no-such-survey"}, 404, "survey"),
        ({"limit": "0"}, 422, "limit"),
        ({"limit": "50001"}, 422, "limit"),
        ({"cursor": "not-a-cursor"}, 422, "cursor"),
        ({"cursor": "e30.AAAA"}, 422, "cursor"),
    ],
)
async def test_bad_parameters(
    stack: Stack, params: dict[str, str], status: int, field: str
) -> None:
    r = await stack.http.get("/v1/scores", params=params, headers=AUTH)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert r.json()["error"]["message"]


async def test_bearer_token_required(stack: Stack) -> None:
    r = await stack.http.get("/v1/scores")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    wrong = await stack.http.get("/v1/scores", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_openapi_documents_the_shape(program: Program) -> None:
    app = FastAPI()
    app.include_router(
        api.router(
            program=program,
            sessions=None,
            auth=lambda: None,
            min_n=30,
            cursor_key=b"",
        )  # type: ignore[arg-type]
    )
    spec = app.openapi()
    op = spec["paths"]["/v1/scores"]["get"]
    assert {"200", "401", "404", "422"} <= set(op["responses"])
    assert {p["name"] for p in op["parameters"]} == {
        "survey",
        "metric",
        "from",
        "to",
        "period",
        "group_by",
        "limit",
        "cursor",
    }
    row = spec["components"]["schemas"]["ScoreRow"]["properties"]
    assert {"p_value", "response_rate", "loop_closure_rate", "median_minutes_to_contact"} <= set(
        row
    )
    assert {"from", "next_cursor"} <= set(spec["components"]["schemas"]["ScoresOut"]["properties"])
