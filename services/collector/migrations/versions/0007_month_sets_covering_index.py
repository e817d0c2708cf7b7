"""month sets' covering index: the month rows of the account's grouping sets, counts included

A read of the month roll-ups of the account with other segments (``repository.MONTH_SETS``)
fetched a table page per row from the primary key: the rows of a month are written over the
month among every other set's, so each row read is on a page of its own (at 10M answers, 2,300
pages for 2,000 rows). This index holds those rows' counts beside their keys (PostgreSQL's
``INCLUDE``): such a read is an index-only scan of a few dozen pages. PostgreSQL only; SQLite
keeps none.

Its key is the primary key's without the grain (one value in the index: a key column without
a condition would end the scan's bounds there). The predicate's list is a constant text array:
PostgreSQL proves that ``dim = '…'`` implies it (a list of cast values it would not).

``IF NOT EXISTS``: an operator may build it beforehand with ``CREATE INDEX CONCURRENTLY`` and
this statement (docs/operations.md): the build here holds writes to the roll-ups meanwhile.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 19:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DIMS = (
    "account_id,touchpoint",
    "account_id,channel",
    "account_id,team",
    "account_id,agent",
    "account_id,touchpoint,channel",
    "account_id,team,agent",
)
KEY = "survey_id, dim, bucket, touchpoint, channel, team, agent, account_id"
SCORE_COUNTS = ["no_score", *(f"score_{s}" for s in range(11)), "bots", "alerted", "contacted"]
TABLES = {"collector_score_rollups": SCORE_COUNTS, "collector_delivery_rollups": ["n"]}


def create_statement(table: str) -> str:
    dims = ",".join(f'"{d}"' for d in DIMS)
    return (
        f"CREATE INDEX IF NOT EXISTS ix_{table}_month_sets ON {table} ({KEY}) "
        f"INCLUDE ({', '.join(TABLES[table])}) "
        f"WHERE grain = 'month' AND dim::text = ANY ('{{{dims}}}'::text[])"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(create_statement(table))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"DROP INDEX IF EXISTS ix_{table}_month_sets")
