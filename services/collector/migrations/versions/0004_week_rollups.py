"""week roll-ups: every grouping set of the day grain, by ISO week

The roll-ups gain a grain, ``week`` (``bucket`` the week's Monday), with the grouping sets of
the day grain (``repository.GRAIN_SETS``), which the collector keeps from this version on: a
report by week then reads one roll-up row per group and week, in pages that are ranges of the
primary key, instead of summing seven day rows per group. This fills the week rows from the
day rows counted so far (their sums, exactly). The schema does not change.

On PostgreSQL the roll-ups are locked against writes while it runs (readers go on); rows of
the week grain there already (a re-run after a downgrade, see docs/operations.md) are
replaced.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 10:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

from services.collector.migrations import month_sets

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The roll-ups' columns as of this version (migrations do not import the code they migrate).
TABLES = (
    ("collector_score_rollups", month_sets.SCORE_COLUMNS),
    ("collector_delivery_rollups", ("n",)),
)


def _week(dialect: str) -> str:
    """The Monday of the ISO week of the day in ``bucket``."""
    if dialect == "postgresql":
        return "CAST(date_trunc('week', CAST(bucket AS timestamp)) AS date)"
    # SQLite keeps dates as YYYY-MM-DD text: to the coming Sunday (or stay), then 6 days back.
    return "date(bucket, 'weekday 0', '-6 days')"


def upgrade() -> None:
    """Fill the week rows from the day rows, exactly, whenever it runs."""
    month_sets.lock()
    downgrade()
    week = _week(op.get_bind().dialect.name)
    segments = ", ".join(month_sets.SEGMENTS)
    for table, columns in TABLES:
        names = ", ".join(columns)
        sums = ", ".join(f"SUM({c})" for c in columns)
        # Every name here is a constant of the migrations.
        op.execute(
            f"INSERT INTO {table} (survey_id, grain, dim, bucket, {segments}, {names}) "  # noqa: S608
            f"SELECT survey_id, 'week', dim, {week}, {segments}, {sums} FROM {table} "
            f"WHERE grain = 'day' GROUP BY survey_id, dim, {week}, {segments}"
        )


def downgrade() -> None:
    """Remove the week rows (the collector of the release before keeps none)."""
    for table, _ in TABLES:
        op.execute(f"DELETE FROM {table} WHERE grain = 'week'")  # noqa: S608
