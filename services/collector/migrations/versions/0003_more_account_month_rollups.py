"""more account month roll-ups: the account with the touchpoint, the channel, the agent

The month grain of the roll-ups gains three grouping sets (``repository.MONTH_SETS``), which
the collector keeps from this version on: a report by month of the account and one of those
then reads one roll-up row per group, in pages that are ranges of the primary key, instead of
summing the touchpoints of ``account_id,touchpoint,channel`` or the full cells. This fills them
from the cells counted so far. The schema does not change.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 04:20:00.000000
"""

from collections.abc import Sequence

from services.collector.migrations import month_sets

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As of this version (migrations do not import the code they migrate).
MONTH_SETS = (("account_id", "touchpoint"), ("account_id", "channel"), ("account_id", "agent"))


def upgrade() -> None:
    """Fill the month sets from the cells, exactly, whenever it runs (``month_sets.fill``)."""
    month_sets.fill(MONTH_SETS)


def downgrade() -> None:
    """Remove the month sets' rows (the collector of the release before keeps none)."""
    month_sets.remove(MONTH_SETS)
