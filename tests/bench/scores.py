"""``GET /v1/scores`` over many answers, beside ``SELECT count(*)`` of the same answers.

A fresh PostgreSQL schema is filled with ``KAIKU_BENCH_SCORE_ANSWERS`` answers (default
10,000,000) by ``INSERT ... SELECT generate_series``: 3 surveys (NPS, CSAT, CES), 365 days,
5 touchpoints, 4 channels, 300 agents in 20 teams, 2,000 accounts (a few large, many small),
5% skipped scores, 1% suspected bots, 5% alerted (60% of them contacted). The score and delivery
cells are then filled by one ``INSERT ... SELECT ... GROUP BY`` each, equal to what the
repository keeps with every answer. Each figure is the median of a few runs after a warm-up:

- the whole ``/v1/scores`` request (through the ASGI app, with scoring and the comparison with
  the previous month) for one survey over the year, by month and team, and by month and agent;
- the same grouping computed from the answers instead of the cells, for contrast;
- the baseline: ``SELECT count(*) FROM collector_responses``, in the same run.

Run it alone with ``python -m tests.bench.scores`` (``KAIKU_BENCH_SCORE_ANSWERS=1000000`` for
a quicker look); ``make bench`` runs it with the rest.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path

import httpx
import yaml
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.collector import api
from services.collector.models import Base
from services.collector.repository import SEGMENTS, CellQuery
from services.common.config import DatabaseSettings
from services.common.db import create_engine, create_sessionmaker, create_tables
from services.common.http import bearer_auth, install_error_handlers
from services.common.program import Program, parse_program

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get(
    "KAIKU_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
ANSWERS = int(os.environ.get("KAIKU_BENCH_SCORE_ANSWERS", "10000000"))
TOKEN = "bench-token"
RUNS = 5

# (name, value, unit, baseline, baseline unit): a Figure in tests/bench/__main__.py.
Result = tuple[str, float, str, float, str]

FILL_ANSWERS = """
INSERT INTO collector_responses (
    response_id, invitation_id, survey_id, metric, customer_id, score, locale, revision,
    suspected_bot, bot_reason, day, first_submitted_at, submitted_at,
    touchpoint, channel, team, agent, account_id, alerted_at, followup_status, contacted_at)
SELECT
    gen_random_uuid(), gen_random_uuid(), s.survey_id, s.metric, 'cust-' || (i % 2000000),
    CASE WHEN r_skip < 0.05 THEN NULL
         ELSE s.low + floor((s.high - s.low + 1) * sqrt(r_score))::int END,
    'fi', 1, r_bot < 0.01, CASE WHEN r_bot < 0.01 THEN 'too_fast' END,
    d, d + time '12:00', d + time '12:00',
    'touchpoint-' || (i % 5), 'channel-' || (i % 4),
    'team-' || (agent % 20), 'agent-' || agent,
    'acct-' || floor(2000 * r_account * r_account)::int,
    CASE WHEN r_alert < 0.05 THEN d + time '12:01' END,
    CASE WHEN r_alert < 0.05 THEN 'open' END,
    CASE WHEN r_alert < 0.03 THEN d + time '12:01' + (r_wait * interval '3 days') END
FROM (
    SELECT i, date '2025-01-01' + floor(random() * 365)::int AS d,
           floor(random() * 300)::int AS agent, random() AS r_skip, random() AS r_score,
           random() AS r_bot, random() AS r_account, random() AS r_alert, random() AS r_wait
    FROM generate_series(1, :n) AS i
) AS g
JOIN (VALUES (0, 'relationship-nps', 'nps', 0, 10), (1, 'support-csat', 'csat', 1, 5),
             (2, 'effort-ces', 'ces', 1, 7)) AS s (k, survey_id, metric, low, high)
  ON s.k = g.i % 3
"""

# What repository.count_answer keeps: one count per survey, day, segments, score, bot.
FILL_SCORE_CELLS = """
INSERT INTO collector_score_cells
    (survey_id, day, touchpoint, channel, team, agent, account_id, score, suspected_bot, n)
SELECT survey_id, day, coalesce(touchpoint, ''), coalesce(channel, ''), coalesce(team, ''),
       coalesce(agent, ''), coalesce(account_id, ''), coalesce(score, -1), suspected_bot,
       count(*)
FROM collector_responses
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
"""

# Deliveries: about three invitations delivered per answer, in the answers' segments.
FILL_DELIVERY_CELLS = """
INSERT INTO collector_delivery_cells
    (survey_id, day, touchpoint, channel, team, agent, account_id, n)
SELECT survey_id, day, coalesce(touchpoint, ''), coalesce(channel, ''), coalesce(team, ''),
       coalesce(agent, ''), coalesce(account_id, ''), 3 * count(*)
FROM collector_responses
GROUP BY 1, 2, 3, 4, 5, 6, 7
"""

# What repository._add_to_cell keeps beside the cells: per survey, day and one segment (or
# none), then per month from the days.
ROLLUP_DAYS = """
INSERT INTO {table} (survey_id, grain, dim, bucket, value{extra}, n)
SELECT survey_id, 'day', '{dim}', day, {value}{extra}, sum(n)
FROM {cells}
GROUP BY survey_id, day{group}{extra}
"""
ROLLUP_MONTHS = """
INSERT INTO {table} (survey_id, grain, dim, bucket, value{extra}, n)
SELECT survey_id, 'month', dim, date_trunc('month', bucket::timestamp)::date, value{extra}, sum(n)
FROM {table}
WHERE grain = 'day'
GROUP BY survey_id, dim, date_trunc('month', bucket::timestamp)::date, value{extra}
"""
ROLLUPS = (
    ("collector_score_rollups", "collector_score_cells", ", score, suspected_bot"),
    ("collector_delivery_rollups", "collector_delivery_cells", ""),
)

# What the month-by-account request reads, for its plan.
EXPLAIN_ACCOUNTS = """
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
SELECT bucket, value, score, suspected_bot, sum(n)
FROM collector_score_rollups
WHERE survey_id = 'relationship-nps' AND grain = 'month' AND dim = 'account_id'
  AND bucket >= date '2024-12-01' AND bucket < date '2026-01-01'
GROUP BY 1, 2, 3, 4
"""

# The same figures computed from the answers, without the cells (the contrast).
FROM_ANSWERS = """
SELECT date_trunc('month', day::timestamp)::date AS month, {column}, score, suspected_bot,
       count(*)
FROM collector_responses
WHERE survey_id = 'relationship-nps' AND day >= date '2025-01-01' AND day < date '2026-01-01'
GROUP BY 1, 2, 3, 4
"""


def program() -> Program:
    raw = yaml.safe_load((ROOT / "deploy/local/program.yaml").read_text())
    raw["surveys"].append(
        {"id": "effort-ces", "metric": "ces", "question": {"en": "How easy was it?"}, "target": 5}
    )
    return parse_program(yaml.safe_dump(raw), "bench")


async def timed(run: Callable[[], Awaitable[object]], runs: int = RUNS) -> float:
    """Median milliseconds of ``runs`` runs after one warm-up."""
    await run()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def fill(engine: AsyncEngine, answers: int) -> None:
    started = time.perf_counter()
    async with engine.begin() as conn:
        # Load first, index afterwards: much faster than maintaining the indexes row by row.
        indexes = (
            await conn.execute(
                text(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = "
                    "'collector_responses' AND schemaname = current_schema() "
                    "AND indexdef NOT LIKE 'CREATE UNIQUE%'"
                )
            )
        ).all()
        for name, _ in indexes:
            await conn.execute(text(f'DROP INDEX "{name}"'))
        await conn.execute(text(FILL_ANSWERS), {"n": answers})
        for _, definition in indexes:
            await conn.execute(text(definition))
        await conn.execute(text(FILL_SCORE_CELLS))
        await conn.execute(text(FILL_DELIVERY_CELLS))
        for table, cells_table, extra in ROLLUPS:
            for dim in ("", *SEGMENTS):
                value = dim or "''"
                await conn.execute(
                    text(
                        ROLLUP_DAYS.format(
                            table=table,
                            cells=cells_table,
                            dim=dim,
                            value=value,
                            group=f", {dim}" if dim else "",
                            extra=extra,
                        )
                    )
                )
            await conn.execute(text(ROLLUP_MONTHS.format(table=table, extra=extra)))
    autocommit = await engine.connect()
    try:
        conn = await autocommit.execution_options(isolation_level="AUTOCOMMIT")
        tables = ("collector_responses", "collector_score_cells", "collector_delivery_cells")
        for table in (*tables, *(t for t, _, _ in ROLLUPS)):
            await conn.execute(text(f"VACUUM ANALYZE {table}"))
        cells = (await conn.execute(text("SELECT count(*) FROM collector_score_cells"))).scalar()
        rollups = (
            await conn.execute(
                text("SELECT grain, count(*) FROM collector_score_rollups GROUP BY 1 ORDER BY 1")
            )
        ).all()
        plan = (await conn.execute(text(EXPLAIN_ACCOUNTS))).scalars().all()
    finally:
        await autocommit.close()
    print(
        f"scores bench: {answers:,} answers, {cells:,} score cells and "
        f"{', '.join(f'{n:,} {grain}' for grain, n in rollups)} score roll-ups loaded in "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    print("scores bench: plan of the month-by-account roll-up read:", *plan, sep="\n  ")


async def figures(answers: int = ANSWERS, *, echo: bool = False) -> list[Result]:
    """The figures; ``echo`` prints each as soon as it is measured."""
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(PG_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    database = DatabaseSettings(url=PG_URL, schema_name=schema)
    engine = create_engine(database)
    try:
        await create_tables(engine, Base.metadata, schema)
        await fill(engine, answers)
        sessions = create_sessionmaker(engine)
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(
            api.router(
                program=program(),
                sessions=sessions,
                auth=bearer_auth(SecretStr(TOKEN)),
                min_n=30,
            )
        )
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=600
        )

        async def count() -> None:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT count(*) FROM collector_responses"))

        def scores(
            group: str, period: str = "month", since: str = "2025-01-01", until: str = "2026-01-01"
        ) -> Callable[[], Awaitable[None]]:
            params = {
                "survey": "relationship-nps",
                "from": since,
                "to": until,
                "period": period,
                "group_by": group,
            }

            async def run() -> None:
                r = await http.get(
                    "/v1/scores", params=params, headers={"Authorization": f"Bearer {TOKEN}"}
                )
                assert r.status_code == 200, r.text
                assert r.json()["rows"], "no rows"

            return run

        def from_answers(column: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                async with engine.connect() as conn:
                    await conn.execute(text(FROM_ANSWERS.format(column=column)))

            return run

        def reads(group: str) -> Callable[[], Awaitable[None]]:
            """The request's database reads alone (score and delivery sums, alerts)."""
            q = CellQuery(
                ("relationship-nps",),
                date(2024, 12, 1),
                date(2026, 1, 1),
                "month",
                (api.GROUPS[group],),
            )

            async def run() -> None:
                async with sessions() as session:
                    await api._sums(session, q)

            return run

        size = f"{answers / 1e6:g}M"
        baseline = await timed(count)
        results: list[Result] = []

        def add(name: str, value: float) -> None:
            results.append((f"scores_{size}_{name}", value, "ms", baseline, "ms"))
            if echo:
                print(line(results[-1]), flush=True)

        for group in ("team", "agent", "account"):
            add(f"month_by_{group}", await timed(scores(group)))
        add("month_by_account_reads_only", await timed(reads("account")))
        add("none_partial_months", await timed(scores("", "none", "2025-01-15", "2025-12-15")))
        add("none_one_year", await timed(scores("", "none")))
        add("day_by_team_one_month", await timed(scores("team", "day", "2025-06-01", "2025-07-01")))
        add("month_by_team_agent_cells", await timed(scores("team,agent"), runs=3))
        add("month_by_team_from_answers", await timed(from_answers("team"), runs=3))
        add("count_again", await timed(count))
        await http.aclose()
        return results
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


def line(result: Result) -> str:
    name, value, unit, baseline, baseline_unit = result
    ratio = value / baseline if baseline else 0.0
    return (
        f"bench: {name} {value:.0f} {unit} "
        f"(baseline {baseline:.0f} {baseline_unit}, ratio {ratio:.2f})"
    )


if __name__ == "__main__":
    asyncio.run(figures(echo=True))
