"""account, team and agent month roll-ups

The month grain of the roll-ups gains the grouping set of the account with the team and the
agent (``repository.MONTH_SETS``: the drill-down from an account to its agents, an agent in
their team), which the collector keeps from this version on: a report by month of those three
then reads one roll-up row per group, in pages that are ranges of the primary key, instead of
summing the full cells of the month (about as many as its answers). This fills them from the
cells counted so far. The schema does not change.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 10:40:00.000000
"""

from collections.abc import Sequence

from services.collector.migrations import month_sets

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As of this version (migrations do not import the code they migrate).
MONTH_SETS = (("account_id", "team", "agent"),)


def upgrade() -> None:
    """Fill the month set from the cells, exactly, whenever it runs (``month_sets.fill``)."""
    month_sets.fill(MONTH_SETS)


def downgrade() -> None:
    """Remove the month set's rows (the collector of the release before keeps none)."""
    month_sets.remove(MONTH_SETS)
