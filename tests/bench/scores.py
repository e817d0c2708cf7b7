"""``GET /v1/scores`` over many answers, beside ``SELECT count(*)`` of the same answers.

A fresh PostgreSQL schema is filled with ``KAIKU_BENCH_SCORE_ANSWERS`` answers (default
10,000,000) by ``INSERT ... SELECT generate_series``: 3 surveys (NPS, CSAT, CES), 365 days,
5 touchpoints, 4 channels, 300 agents in 20 teams, 2,000 accounts (a few large, many small),
5% skipped scores, 1% suspected bots, 5% alerted (60% of them contacted, up to three days
later). The score and delivery cells, the contact waits and the roll-ups are then filled by
``INSERT ... SELECT ... GROUP BY``, equal to what the repository keeps with every answer. The
plans of the reads of a first page of a few requests (month by account, by team and agent,
June by account and channel and by account and agent: the roll-ups; June by account,
touchpoint and agent: the cells) are printed by ``EXPLAIN ANALYZE``. Each figure is the
median of a few runs after a warm-up:

- a ``/v1/scores`` request (through the ASGI app, with scoring and the comparison with the
  previous period; the first page, of at most 5,000 rows, the default ``limit``) for one
  survey over the year: by month and team, agent or account, the database reads of the
  account's page alone, without a period (partial months at both ends, the whole year), by day
  and team over June, by month, team and agent; June by account and channel, by account and
  team, by account and agent and by account, team and agent (the month roll-ups of the account
  with other segments); June by account, touchpoint and agent (the full cells: no roll-up
  keeps those);
- by week over the year by agent and by account (the week roll-ups);
  the second quarter by account and team without a period (whole months, and a previous
  period that is not);
- for the reports of more than a page, every page of it, following ``next_cursor`` as a client
  does (the time to read the whole report);
- the same grouping computed from the answers instead of the cells, for contrast;
- the baseline: ``SELECT count(*) FROM collector_responses``, in the same run.

Run it alone with ``python -m tests.bench.scores`` (``KAIKU_BENCH_SCORE_ANSWERS=100000`` for a
quicker look, a minute: some reports then fit one page, which the bench says); ``make bench``
runs it with the rest. Loading 10M answers and their counts takes 25–60 minutes, so a schema
can be kept: with ``KAIKU_BENCH_SCORE_SCHEMA=<name>`` the bench loads into that schema and
leaves it there, and a later run with the same name reuses what still fits, by fingerprints
stored beside the tables: the answers when their number, table and fill are the same (the
cells and roll-ups are then filled again when their tables or fills changed), all of it when
nothing changed. Drop the schema when done (``DROP SCHEMA <name> CASCADE``).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import yaml
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import Table, event, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.schema import CreateIndex, CreateTable

from services.collector import api
from services.collector.cursors import cursor_key
from services.collector.models import Base
from services.collector.repository import GRAIN_SETS, ROLLUP_SETS, SEGMENTS, CellQuery
from services.collector.repository import SCORE_COLUMNS as SCORE_NAMES
from services.common.config import DatabaseSettings, HttpSettings
from services.common.db import create_engine, create_sessionmaker, create_tables
from services.common.http import bearer_auth, install_error_handlers
from services.common.program import Program, parse_program
from services.common.serve import tune_gc
from tests.support import run_migration_step

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get(
    "KAIKU_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
ANSWERS = int(os.environ.get("KAIKU_BENCH_SCORE_ANSWERS", "10000000"))
# Opt-in: load into this schema once, keep it, and reuse it on later runs (see above).
KEEP_SCHEMA = os.environ.get("KAIKU_BENCH_SCORE_SCHEMA") or None
TOKEN = "bench-token"
# What the loading statements may sort and hash in memory (this session only; the requests run
# with the server's settings).
FILL_WORK_MEM = "256MB"
RUNS = 5
UTC = ZoneInfo("UTC")
SURVEY = "relationship-nps"  # the survey every figure reads

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

# What repository.count_answer keeps: one count per survey, day, segments, score, bot, with
# how many of those answers alerted and how many of the alerted were contacted. The counts are
# inserted in day order, as a running collector adds them (each day's cells after the day
# before's), so the tables' physical order follows the day as it does in production.
FILL_SCORE_CELLS = """
INSERT INTO collector_score_cells
    (survey_id, day, touchpoint, channel, team, agent, account_id, score, suspected_bot, n,
     alerted, contacted)
SELECT survey_id, day, coalesce(touchpoint, ''), coalesce(channel, ''), coalesce(team, ''),
       coalesce(agent, ''), coalesce(account_id, ''), coalesce(score, -1), suspected_bot,
       count(*), count(alerted_at),
       count(*) FILTER (WHERE alerted_at IS NOT NULL AND contacted_at IS NOT NULL)
FROM collector_responses
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
ORDER BY 2, 1
"""

# ... and the waits of the contacted alerts, to the microsecond, one row each.
FILL_CONTACT_WAITS = """
INSERT INTO collector_contact_waits
    (response_id, survey_id, day, touchpoint, channel, team, agent, account_id, wait_us)
SELECT response_id, survey_id, day, coalesce(touchpoint, ''), coalesce(channel, ''),
       coalesce(team, ''), coalesce(agent, ''), coalesce(account_id, ''),
       (extract(epoch FROM contacted_at - alerted_at) * 1000000)::bigint
FROM collector_responses
WHERE alerted_at IS NOT NULL AND contacted_at IS NOT NULL
ORDER BY day
"""

# Deliveries: about three invitations delivered per answer, in the answers' segments.
FILL_DELIVERY_CELLS = """
INSERT INTO collector_delivery_cells
    (survey_id, day, touchpoint, channel, team, agent, account_id, n)
SELECT survey_id, day, coalesce(touchpoint, ''), coalesce(channel, ''), coalesce(team, ''),
       coalesce(agent, ''), coalesce(account_id, ''), 3 * count(*)
FROM collector_responses
GROUP BY 1, 2, 3, 4, 5, 6, 7
ORDER BY 2, 1
"""

# What repository.count_answer and mark_delivered keep beside the cells: per survey, day and
# one segment (or none), then per month from the days (per week: migration 0004, below). A
# score roll-up has a column per score of the persons' answers, the bots' answers, the
# alerted and the contacted.
SCORE_COLUMNS = [*SCORE_NAMES.values(), "bots", "alerted", "contacted"]
SCORE_SUMS = ", ".join(
    [
        *(
            f"coalesce(sum(n) FILTER (WHERE NOT suspected_bot AND score = {score}), 0)"
            for score in SCORE_NAMES
        ),
        "coalesce(sum(n) FILTER (WHERE suspected_bot), 0)",
        "sum(alerted)",
        "sum(contacted)",
    ]
)
ROLLUP_DAYS = """
INSERT INTO {table} (survey_id, grain, dim, bucket, {segments}, {columns})
SELECT survey_id, 'day', '{dim}', day, {values}, {sums}
FROM {cells}
GROUP BY survey_id, day{group}
"""
ROLLUP_MONTHS = """
INSERT INTO {table} (survey_id, grain, dim, bucket, {segments}, {columns})
SELECT survey_id, 'month', dim, date_trunc('month', bucket::timestamp)::date, {segments}, {sums}
FROM {table}
WHERE grain = 'day'
GROUP BY survey_id, dim, date_trunc('month', bucket::timestamp)::date, {segments}
"""
# (roll-up, cells, the roll-up's count columns, their sums over the cells)
ROLLUPS = (
    ("collector_score_rollups", "collector_score_cells", SCORE_COLUMNS, SCORE_SUMS),
    ("collector_delivery_rollups", "collector_delivery_cells", ["n"], "sum(n)"),
)
# The migrations that fill roll-ups the collector's first release did not keep: the month-only
# sets (repository.MONTH_SETS) from the cells, the week grain from the day grain.
FILL_MIGRATIONS = (
    "0002_account_month_rollups",
    "0003_more_account_month_rollups",
    "0004_week_rollups",
    "0005_account_team_agent_month_rollups",
)
COUNT_STATEMENTS = (
    repr(GRAIN_SETS),
    *(
        (ROOT / f"services/collector/migrations/versions/{name}.py").read_text()
        for name in FILL_MIGRATIONS
    ),
    (ROOT / "services/collector/migrations/month_sets.py").read_text(),
    FILL_SCORE_CELLS,
    FILL_CONTACT_WAITS,
    FILL_DELIVERY_CELLS,
    ROLLUP_DAYS,
    ROLLUP_MONTHS,
    repr(ROLLUPS),
)

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


async def fill_answers(engine: AsyncEngine, answers: int) -> None:
    started = time.perf_counter()
    async with engine.begin() as conn:
        indexes = await drop_indexes(conn, ["collector_responses"])
        await conn.execute(text(FILL_ANSWERS), {"n": answers})
        for definition in indexes:
            await conn.execute(text(definition))
    await vacuum(engine, ["collector_responses"])
    print(
        f"scores bench: {answers:,} answers loaded in {time.perf_counter() - started:.0f} s",
        flush=True,
    )


async def drop_indexes(conn: AsyncConnection, tables: list[str]) -> list[str]:
    """Drop the tables' indexes but the unique ones (the primary keys, which the fills' upserts
    need), for a load: loading first and indexing afterwards is much faster than maintaining
    the indexes row by row. Returns the statements that create them again."""
    indexes = (
        await conn.execute(
            text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(:tables) "
                "AND schemaname = current_schema() AND indexdef NOT LIKE 'CREATE UNIQUE%'"
            ),
            {"tables": tables},
        )
    ).all()
    await conn.execute(text(f"SET LOCAL maintenance_work_mem = '{FILL_WORK_MEM}'"))
    for name, _ in indexes:
        await conn.execute(text(f'DROP INDEX "{name}"'))
    return [definition for _, definition in indexes]


async def fill_counts(engine: AsyncEngine) -> None:
    """The cells and roll-ups from the answers, as the repository would have kept them."""
    started = time.perf_counter()
    async with engine.begin() as conn:
        await conn.execute(text(f"SET LOCAL work_mem = '{FILL_WORK_MEM}'"))
        indexes = await drop_indexes(conn, [t for t, *_ in ROLLUPS])
        await conn.execute(text(FILL_SCORE_CELLS))
        await conn.execute(text(FILL_CONTACT_WAITS))
        await conn.execute(text(FILL_DELIVERY_CELLS))
        segments = ", ".join(SEGMENTS)
        for table, cells_table, columns, sums in ROLLUPS:
            for grouping in ROLLUP_SETS:
                await conn.execute(
                    text(
                        ROLLUP_DAYS.format(
                            table=table,
                            cells=cells_table,
                            dim=",".join(grouping),
                            segments=segments,
                            values=", ".join(s if s in grouping else "''" for s in SEGMENTS),
                            group="".join(f", {s}" for s in grouping),
                            columns=", ".join(columns),
                            sums=sums,
                        )
                    )
                )
            await conn.execute(
                text(
                    ROLLUP_MONTHS.format(
                        table=table,
                        segments=segments,
                        columns=", ".join(columns),
                        sums=", ".join(f"sum({c})" for c in columns),
                    )
                )
            )
        # The month-only roll-ups of the account with other segments, from the cells, and the
        # week grain, from the days: what the migrations that introduced them fill in.
        for name in FILL_MIGRATIONS:
            await conn.run_sync(run_migration_step, "collector", name, "upgrade")
        for definition in indexes:
            await conn.execute(text(definition))
    await vacuum(engine, [t for t in Base.metadata.tables if t != "collector_responses"])
    print(
        f"scores bench: cells and roll-ups filled in {time.perf_counter() - started:.0f} s",
        flush=True,
    )


async def vacuum(engine: AsyncEngine, tables: list[str]) -> None:
    autocommit = await engine.connect()
    try:
        conn = await autocommit.execution_options(isolation_level="AUTOCOMMIT")
        for table in tables:
            await conn.execute(text(f"VACUUM ANALYZE {table}"))
    finally:
        await autocommit.close()


async def sizes(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        counts = {
            table: await conn.scalar(text(f"SELECT count(*) FROM {table}"))
            for table in ("collector_responses", "collector_score_cells", "collector_contact_waits")
        }
        rollups = (
            await conn.execute(
                text("SELECT grain, count(*) FROM collector_score_rollups GROUP BY 1 ORDER BY 1")
            )
        ).all()
    return (
        f"{counts['collector_responses']:,} answers, {counts['collector_score_cells']:,} score "
        f"cells, {counts['collector_contact_waits']:,} contact waits, "
        f"{', '.join(f'{n:,} {grain}' for grain, n in rollups)} score roll-ups"
    )


def _ddl(table: Table) -> str:
    return "\n".join(
        [
            str(CreateTable(table).compile(dialect=postgresql.dialect())),
            *sorted(
                str(CreateIndex(i).compile(dialect=postgresql.dialect())) for i in table.indexes
            ),
        ]
    )


def fingerprints(answers: int) -> dict[str, str]:
    """What a kept schema was loaded with: the answers (their number, table and fill) and the
    counts (the other tables and the statements that fill them)."""
    answers_table = Base.metadata.tables["collector_responses"]
    parts = {
        "answers": [str(answers), FILL_ANSWERS, _ddl(answers_table)],
        "counts": [
            inspect.getsource(fill_counts),
            *COUNT_STATEMENTS,
            *(_ddl(t) for t in Base.metadata.sorted_tables if t is not answers_table),
        ],
    }
    return {k: hashlib.sha256("\n".join(v).encode()).hexdigest() for k, v in parts.items()}


async def kept(admin: AsyncEngine, schema: str) -> dict[str, str]:
    """The fingerprints stored in a kept schema (none when it is not one)."""
    async with admin.connect() as conn:
        table = f'"{schema}".bench_loaded'
        if not await conn.scalar(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}):
            return {}
        return {
            part: value
            for part, value in (await conn.execute(text(f"SELECT part, fingerprint FROM {table}")))
        }


async def prepare(admin: AsyncEngine, engine: AsyncEngine, schema: str, answers: int) -> None:
    """Load the schema, or reuse what a kept one holds: the answers if they are the same, the
    counts too if they are filled the same way. Each part's fingerprint is stored once it is
    loaded (a run stopped while filling the counts keeps its answers)."""
    want = fingerprints(answers)
    have = await kept(admin, schema) if KEEP_SCHEMA is not None else {}
    if have == want:
        print(f"scores bench: reusing schema {schema}: {await sizes(engine)}", flush=True)
        return
    async with admin.begin() as conn:
        if have.get("answers") == want["answers"]:
            print(f"scores bench: reusing the answers of schema {schema}", flush=True)
            for table in Base.metadata.tables:
                if table != "collector_responses":
                    await conn.execute(text(f'DROP TABLE IF EXISTS "{schema}".{table}'))
            await conn.execute(
                text(f"DELETE FROM \"{schema}\".bench_loaded WHERE part <> 'answers'")
            )
        else:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            await conn.execute(
                text(f'CREATE TABLE "{schema}".bench_loaded (part text, fingerprint text)')
            )

    async def done(part: str) -> None:
        async with admin.begin() as conn:
            await conn.execute(
                text(f'INSERT INTO "{schema}".bench_loaded VALUES (:p, :f)'),
                {"p": part, "f": want[part]},
            )

    await create_tables(engine, Base.metadata, schema)
    if have.get("answers") != want["answers"]:
        await fill_answers(engine, answers)
        await done("answers")
    await fill_counts(engine)
    await done("counts")
    print(f"scores bench: {await sizes(engine)}", flush=True)


async def plans(engine: AsyncEngine, sessions: Any, q: CellQuery) -> None:
    """The plan of every statement the reads of the first page of ``q`` make
    (``api.read_page``), by EXPLAIN ANALYZE."""
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not statement.startswith("SET "):  # the report's SET LOCAL jit = off
            statements.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with sessions() as session:
            surveys = [program().survey(SURVEY)]
            await api.read_page(session, surveys, q, UTC, None, api.DEFAULT_LIMIT)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    label = f"{q.period} by {'+'.join(q.segments) or 'nothing'}"
    async with engine.connect() as conn:
        await conn.execute(text("SET jit = off"))  # as a report's transaction runs them
        for statement, parameters in statements:
            result = await conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters
            )
            plan = [row[0] for row in result]
            print(f"scores bench: plan of a read of {label}:", *plan, sep="\n  ", flush=True)


async def figures(answers: int = ANSWERS, *, echo: bool = False) -> list[Result]:
    """The figures; ``echo`` prints each as soon as it is measured."""
    schema = KEEP_SCHEMA or f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(PG_URL)
    database = DatabaseSettings(url=PG_URL, schema_name=schema)
    engine = create_engine(database)
    try:
        await prepare(admin, engine, schema, answers)
        sessions = create_sessionmaker(engine)
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(
            api.router(
                program=program(),
                sessions=sessions,
                auth=bearer_auth(SecretStr(TOKEN)),
                min_n=30,
                cursor_key=cursor_key(SecretStr(TOKEN)),
            )
        )
        tune_gc(HttpSettings().gc_threshold)  # as the collector does once started
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=600
        )

        async def count() -> None:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT count(*) FROM collector_responses"))

        def scores(
            group: str,
            period: str = "month",
            since: str = "2025-01-01",
            until: str = "2026-01-01",
            *,
            every_page: bool = False,
        ) -> Callable[[], Awaitable[None]]:
            """The first page of a report, or (``every_page``) all of them in turn."""
            params = {
                "survey": SURVEY,
                "from": since,
                "to": until,
                "period": period,
                "group_by": group,
            }
            auth = {"Authorization": f"Bearer {TOKEN}"}
            checked = told = False

            async def run() -> None:
                # Timed to the last byte of the last page; the JSON is parsed outside the timed
                # runs (parsing megabytes is the client's time, not the server's), but for the
                # cursor of the next page: the last field of the answer.
                nonlocal checked, told
                cursor = None
                pages = 0
                while True:
                    page = {**params, **({"cursor": cursor} if cursor else {})}
                    r = await http.get("/v1/scores", params=page, headers=auth)
                    assert r.status_code == 200, r.text
                    if not checked:
                        assert r.json()["rows"], "no rows"
                        checked = True
                    pages += 1
                    tail = r.content[r.content.rindex(b'"next_cursor":') :]
                    cursor = json.loads(tail[len(b'"next_cursor":') : -1])
                    if cursor is None or not every_page:
                        break
                if every_page and pages == 1 and not told:
                    # At a smaller KAIKU_BENCH_SCORE_ANSWERS the whole report fits a page.
                    print(f"scores bench: {params['group_by']} is one page at this size")
                    told = True

            return run

        def from_answers(column: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                async with engine.connect() as conn:
                    await conn.execute(text(FROM_ANSWERS.format(column=column)))

            return run

        def reads(group: str) -> Callable[[], Awaitable[None]]:
            """The database reads of a report's first page alone (the page's score, alert and
            delivery sums, the same groups a period earlier, the page's waits)."""
            q = CellQuery(
                (SURVEY,),
                date(2025, 1, 1),
                date(2026, 1, 1),
                "month",
                (api.GROUPS[group],),
            )

            surveys = [program().survey(SURVEY)]

            async def run() -> None:
                async with sessions() as session:
                    await api.read_page(session, surveys, q, UTC, None, api.DEFAULT_LIMIT)

            return run

        for segments in (("account_id",), ("team", "agent")):
            year = CellQuery((SURVEY,), date(2025, 1, 1), date(2026, 1, 1), "month", segments)
            await plans(engine, sessions, year)
        for segments in (("channel", "account_id"), ("agent", "account_id")):
            june = CellQuery((SURVEY,), date(2025, 6, 1), date(2025, 7, 1), "month", segments)
            await plans(engine, sessions, june)
        cells = CellQuery(
            (SURVEY,),
            date(2025, 6, 1),
            date(2025, 7, 1),
            "month",
            ("touchpoint", "agent", "account_id"),
        )
        await plans(engine, sessions, cells)

        size = f"{answers / 1e6:g}M"
        baseline = await timed(count)
        results: list[Result] = []

        def add(name: str, value: float) -> None:
            results.append((f"scores_{size}_{name}", value, "ms", baseline, "ms"))
            if echo:
                print(line(results[-1]), flush=True)

        # One page each (the first, of at most 5,000 rows); for the reports of more than a page
        # also every page in turn (_every_page).
        for group in ("team", "agent", "account"):
            add(f"month_by_{group}", await timed(scores(group)))
        add("month_by_account_reads_only", await timed(reads("account")))
        add("month_by_account_every_page", await timed(scores("account", every_page=True)))
        add("none_partial_months", await timed(scores("", "none", "2025-01-15", "2025-12-15")))
        add("none_one_year", await timed(scores("", "none")))
        add("day_by_team_one_month", await timed(scores("team", "day", "2025-06-01", "2025-07-01")))
        add("month_by_team_agent", await timed(scores("team,agent")))
        in_june = ("month", "2025-06-01", "2025-07-01")
        for pair in ("channel", "team", "agent", "team,agent"):
            name = pair.replace(",", "_")
            add(f"june_by_account_{name}", await timed(scores(f"account,{pair}", *in_june)))
            every = scores(f"account,{pair}", *in_june, every_page=True)
            add(f"june_by_account_{name}_every_page", await timed(every, runs=3))
        # Weeks: a row per group and week in the week roll-ups (migration 0004).
        for group in ("agent", "account"):
            add(f"week_by_{group}", await timed(scores(group, "week")))
        # A quarter without a period: its months from the month roll-ups of the account and
        # the team; its previous period (as many days before April) is December 31 from the
        # cells and January to March from the roll-ups.
        quarter = ("none", "2025-04-01", "2025-07-01")
        add("quarter_by_account_team", await timed(scores("account,team", *quarter)))
        # Without a period over more months: the year by account and agent (twelve months of
        # the month roll-ups), January 15 to December 15 by account and team (the days at the
        # ends from the cells), the quarter by account, touchpoint and agent (no roll-up: the
        # full cells of three months).
        year = ("none", "2025-01-01", "2026-01-01")
        add("year_by_account_agent", await timed(scores("account,agent", *year)))
        partial = ("none", "2025-01-15", "2025-12-15")
        add("partial_months_by_account_team", await timed(scores("account,team", *partial)))
        add(
            "quarter_by_account_touchpoint_agent_cells",
            await timed(scores("account,touchpoint,agent", *quarter), runs=3),
        )
        # No roll-up: the full cells (about as many cells as answers), for contrast.
        add(
            "june_by_account_touchpoint_agent_cells",
            await timed(scores("account,touchpoint,agent", *in_june), runs=1),
        )
        add("month_by_team_from_answers", await timed(from_answers("team"), runs=3))
        add("count_again", await timed(count))
        await http.aclose()
        return results
    finally:
        await engine.dispose()
        if KEEP_SCHEMA is None:
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
