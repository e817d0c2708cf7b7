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
from pathlib import Path

import httpx
import yaml
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.collector import api
from services.collector.models import Base
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
    autocommit = await engine.connect()
    try:
        conn = await autocommit.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("collector_responses", "collector_score_cells", "collector_delivery_cells"):
            await conn.execute(text(f"VACUUM ANALYZE {table}"))
        cells = (await conn.execute(text("SELECT count(*) FROM collector_score_cells"))).scalar()
    finally:
        await autocommit.close()
    print(
        f"scores bench: {answers:,} answers and {cells:,} score cells loaded in "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )


async def figures(answers: int = ANSWERS) -> list[Result]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(PG_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    database = DatabaseSettings(url=PG_URL, schema_name=schema)
    engine = create_engine(database)
    try:
        await create_tables(engine, Base.metadata, schema)
        await fill(engine, answers)
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(
            api.router(
                program=program(),
                sessions=create_sessionmaker(engine),
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

        def scores(group: str) -> Callable[[], Awaitable[None]]:
            params = {
                "survey": "relationship-nps",
                "from": "2025-01-01",
                "to": "2026-01-01",
                "period": "month",
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

        size = f"{answers / 1e6:g}M"
        baseline = await timed(count)
        results: list[Result] = []
        for group in ("team", "agent"):
            results.append(
                (
                    f"scores_{size}_month_by_{group}",
                    await timed(scores(group)),
                    "ms",
                    baseline,
                    "ms",
                )
            )
            results.append(
                (
                    f"scores_{size}_month_by_{group}_from_answers",
                    await timed(from_answers(group), runs=3),
                    "ms",
                    baseline,
                    "ms",
                )
            )
        results.append((f"scores_{size}_count_again", await timed(count), "ms", baseline, "ms"))
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
    for result in asyncio.run(figures()):
        print(line(result), flush=True)
