"""roll-up groups index: the month rows of the roll-ups in the order of their groups

A report without a period over whole months (a quarter by account and team, say) read each
month of the page's groups apart by the primary key (whose months come first) and sorted them
together; with this index it reads the page's groups as one range, each group's months
together, and on PostgreSQL from the index alone (it includes the counts). Month rows only (a
partial index): the day and week grains are read by period.

At 10M answers (18M month rows) the two indexes take about four and a half minutes to build,
the tables locked against writes meanwhile (docs/operations.md), and 2.7 GB beside the score
roll-ups' 4.4 GB.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 13:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.collector.migrations import month_sets

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (roll-up, its counts)
TABLES = (
    ("collector_score_rollups", month_sets.SCORE_COLUMNS),
    ("collector_delivery_rollups", ("n",)),
)
COLUMNS = ["survey_id", "dim", *month_sets.SEGMENTS, "bucket"]


def upgrade() -> None:
    month = sa.text("grain = 'month'")
    for table, counts in TABLES:
        op.create_index(
            f"ix_{table}_groups",
            table,
            COLUMNS,
            postgresql_where=month,
            postgresql_include=list(counts),
            sqlite_where=month,
        )


def downgrade() -> None:
    for table, _ in TABLES:
        op.drop_index(f"ix_{table}_groups", table_name=table)
