"""Filling month grouping sets of the roll-ups from the cells: what the migrations that add a
set to ``repository.MONTH_SETS`` run (each with its own sets, as of its version: migrations do
not import the code they migrate, and the SQL here is of the schema of 0001). The roll-ups'
columns and ``lock`` serve the migration of the week grain (0004) too.

``fill`` is exact whenever it runs: on PostgreSQL the roll-ups are locked against writes
meanwhile (readers go on), and any rows of the sets there already (a re-run after a
downgrade, see docs/operations.md) are replaced.
"""

from collections.abc import Sequence

from alembic import op

SEGMENTS = ("touchpoint", "channel", "team", "agent", "account_id")
SCORE_SUMS = {
    "no_score": "NOT suspected_bot AND score = -1",
    **{f"score_{s}": f"NOT suspected_bot AND score = {s}" for s in range(11)},
    "bots": "suspected_bot",
}
SCORE_COLUMNS = (*SCORE_SUMS, "alerted", "contacted")
Sets = Sequence[Sequence[str]]


def _month(dialect: str) -> str:
    if dialect == "postgresql":
        return "CAST(date_trunc('month', CAST(day AS timestamp)) AS date)"
    return "date(day, 'start of month')"  # SQLite keeps dates as YYYY-MM-DD text


def _fill(
    sets: Sets, rollups: str, cells: str, columns: Sequence[str], sums: Sequence[str]
) -> None:
    month = _month(op.get_bind().dialect.name)
    names = ", ".join((*SEGMENTS, *columns))
    for grouping in sets:
        dim, group = ",".join(grouping), ", ".join(grouping)
        values = ", ".join(s if s in grouping else "''" for s in SEGMENTS)
        select = f"survey_id, 'month', '{dim}', {month}, {values}, {', '.join(sums)}"
        # Every name and value here is a constant of a migration.
        sql = f"INSERT INTO {rollups} (survey_id, grain, dim, bucket, {names}) SELECT {select}"
        op.execute(f"{sql} FROM {cells} GROUP BY survey_id, {month}, {group}")


def lock() -> None:
    """On PostgreSQL, lock the roll-ups against writes (readers go on) until the migration's
    transaction ends: the rows a refill reads and writes cannot move meanwhile."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "LOCK TABLE collector_score_rollups, collector_delivery_rollups IN EXCLUSIVE MODE"
        )


def fill(sets: Sets) -> None:
    """Fill the month rows of ``sets`` from the cells (replacing any there)."""
    lock()
    remove(sets)
    score_sums = [
        *(f"SUM(CASE WHEN {when} THEN n ELSE 0 END)" for when in SCORE_SUMS.values()),
        "SUM(alerted)",
        "SUM(contacted)",
    ]
    _fill(sets, "collector_score_rollups", "collector_score_cells", SCORE_COLUMNS, score_sums)
    _fill(sets, "collector_delivery_rollups", "collector_delivery_cells", ["n"], ["SUM(n)"])


def remove(sets: Sets) -> None:
    """Remove the month rows of ``sets`` (a collector of the release before keeps none)."""
    dims = ", ".join(f"'{','.join(g)}'" for g in sets)
    for table in ("collector_score_rollups", "collector_delivery_rollups"):
        op.execute(f"DELETE FROM {table} WHERE grain = 'month' AND dim IN ({dims})")  # noqa: S608
