"""account month roll-ups: the account with the touchpoint and channel, and with the team

The month grain of the roll-ups gains two grouping sets (``repository.MONTH_SETS``), which the
collector keeps from this version on; this fills them from the cells counted so far. The
schema does not change.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 22:45:00.000000
"""

from collections.abc import Sequence

from services.collector.migrations import month_sets

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As of this version (migrations do not import the code they migrate).
MONTH_SETS = (("account_id", "touchpoint", "channel"), ("account_id", "team"))


def upgrade() -> None:
    """Fill the month sets from the cells, exactly, whenever it runs (``month_sets.fill``)."""
    month_sets.fill(MONTH_SETS)


def downgrade() -> None:
    """Remove the month sets' rows (the collector of the release before keeps none)."""
    month_sets.remove(MONTH_SETS)
