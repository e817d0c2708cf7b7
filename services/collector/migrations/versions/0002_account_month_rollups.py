"""account month roll-ups: the account with the touchpoint and channel, and with the team

The month grain of the roll-ups gains two grouping sets (``repository.MONTH_SETS``), which the
collector keeps from this version on; this fills them from the cells counted so far. The
schema does not change.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 22:45:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEGMENTS = ("touchpoint", "channel", "team", "agent", "account_id")
# As of this version (migrations do not import the code they migrate).
MONTH_SETS = (("account_id", "touchpoint", "channel"), ("account_id", "team"))
SCORE_SUMS = {
    "no_score": "NOT suspected_bot AND score = -1",
    **{f"score_{s}": f"NOT suspected_bot AND score = {s}" for s in range(11)},
    "bots": "suspected_bot",
}
SCORE_COLUMNS = (*SCORE_SUMS, "alerted", "contacted")


def _month(dialect: str) -> str:
    if dialect == "postgresql":
        return "CAST(date_trunc('month', CAST(day AS timestamp)) AS date)"
    return "date(day, 'start of month')"  # SQLite keeps dates as YYYY-MM-DD text


def _fill(rollups: str, cells: str, columns: Sequence[str], sums: Sequence[str]) -> None:
    month = _month(op.get_bind().dialect.name)
    names = ", ".join((*SEGMENTS, *columns))
    for grouping in MONTH_SETS:
        dim, group = ",".join(grouping), ", ".join(grouping)
        values = ", ".join(s if s in grouping else "''" for s in SEGMENTS)
        select = f"survey_id, 'month', '{dim}', {month}, {values}, {', '.join(sums)}"
        # Every name and value here is a constant of this file.
        sql = f"INSERT INTO {rollups} (survey_id, grain, dim, bucket, {names}) SELECT {select}"
        op.execute(f"{sql} FROM {cells} GROUP BY survey_id, {month}, {group}")


def upgrade() -> None:
    """Fill the month sets from the cells, exactly, whenever it runs: on PostgreSQL the roll-ups
    are locked against writes meanwhile (readers go on), any month-set rows there already (a
    re-run after ``downgrade``, see docs/operations.md) are replaced."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "LOCK TABLE collector_score_rollups, collector_delivery_rollups IN EXCLUSIVE MODE"
        )
    downgrade()
    score_sums = [
        *(f"SUM(CASE WHEN {when} THEN n ELSE 0 END)" for when in SCORE_SUMS.values()),
        "SUM(alerted)",
        "SUM(contacted)",
    ]
    _fill("collector_score_rollups", "collector_score_cells", SCORE_COLUMNS, score_sums)
    _fill("collector_delivery_rollups", "collector_delivery_cells", ["n"], ["SUM(n)"])


def downgrade() -> None:
    """Remove the month sets' rows (the collector of the release before keeps none)."""
    dims = ", ".join(f"'{','.join(g)}'" for g in MONTH_SETS)
    for table in ("collector_score_rollups", "collector_delivery_rollups"):
        op.execute(f"DELETE FROM {table} WHERE grain = 'month' AND dim IN ({dims})")  # noqa: S608
